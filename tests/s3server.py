"""A real S3 server for the tests: moto's, in a thread, on a free port; the standard AWS environment
variables point at it, so the code under test finds it the way it would find AWS."""

from __future__ import annotations

import socket
import uuid
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(monkeypatch_env):
    """Start the server, create a bucket; yields (bucket, endpoint). `monkeypatch_env(name, value)`
    sets an environment variable for the test's duration."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true"}
    for name, value in env.items():
        monkeypatch_env(name, value)
    bucket = f"runs-{uuid.uuid4().hex[:8]}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing-secret").create_bucket(Bucket=bucket)
        yield bucket, endpoint, env
    finally:
        server.stop()
