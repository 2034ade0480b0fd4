"""A run recorded to and scanned from S3 (a local moto server, started here) vs the local disk.

The field is a Crucible-size bf16 embedding (10,000 x 64) drifting a little each step, --steps steps
in blocks of 64 (one 82 MB block -> one shard object). Each child records the run
(cr.record to a path or an s3:// URL; MB/s from the first record() to close() returning), then
scans it (cr.open(location)["W"][a:a+64] for every block). moto serves from this process's threads
over local HTTP, so the S3 figures are the protocol path (signing, one PUT per shard), not a
network: an upper bound for a real endpoint. Needs moto[server] and boto3.

    python benchmarks/bench_s3.py [--rounds 5] [--steps 256] [--quick] [--baseline-src DIR]
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import uuid

import harness


def child(location: str, steps: int) -> dict:
    import torch

    import crucible_record as cr

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(10_000, 64, generator=gen) * 0.02
    values = [(base + 1e-4 * i * torch.randn(10_000, 64, generator=gen)).to(torch.bfloat16) for i in range(16)]
    raw_mb = steps * 10_000 * 64 * 2 / 1e6
    location = location.replace("{}", uuid.uuid4().hex[:8])  # a new object prefix each run
    if "://" not in location:
        shutil.rmtree(location, ignore_errors=True)
    started = time.perf_counter()
    with cr.record(location, {"W": cr.Field((10_000, 64), torch.bfloat16)}, layout=cr.Layout(time_chunk=64),
                   commit_interval=1e9) as rec:
        for step in range(steps):
            rec.record(step, W=values[step % len(values)])
    write = raw_mb / (time.perf_counter() - started)
    W = cr.open(location)["W"]
    started = time.perf_counter()
    for first in range(0, steps, 64):
        W[first:first + 64]
    scan = raw_mb / (time.perf_counter() - started)
    if "://" not in location:
        shutil.rmtree(location, ignore_errors=True)
    return {"write_MBps": write, "scan_MBps": scan}


def moto_server():
    """moto's S3 server on a free port, a bucket in it, the AWS variables pointing at it (children inherit them)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing-secret", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ALLOW_HTTP="true")
    bucket = f"runs-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(Bucket=bucket)
    return server, bucket


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--steps", type=int, default=256)
    args = p.parse_args()
    steps = 64 if args.quick else args.steps
    res = harness.Result("s3", args)
    server, bucket = moto_server()
    try:
        disk = str(args.scratch / f"crucible-bench-s3-{os.getpid()}")
        variants = {"disk": {"location": disk, "steps": steps},
                    "s3": {"location": f"s3://{bucket}/run-{{}}", "steps": steps}}
        runs = harness.compare(__file__, variants, "disk", args,
                               baseline_spec=lambda s: {**s, "location": s["location"] + "-base"})
    finally:
        server.stop()
    for what in ("write", "scan"):
        res.table(f"{what}, W 10,000 x 64 bf16, {steps} steps, MB/s", harness.summarize(runs, f"{what}_MBps", "disk"))
    res.details["runs"] = runs
    res.save()


if __name__ == "__main__":
    harness.child_main(child)
    main()
