"""What the generic commands (cli.py) and an experiment's commands share, so that an experiment's
command module never imports cli.py (which imports it)."""

from __future__ import annotations

from pathlib import Path

import click

from .storage import is_url

# A run is a local directory or a URL (s3://, file://, memory://): kept as a string, since pathlib
# would fold "s3://bucket" into "s3:/bucket".
RUN = click.STRING


def default_out(run: str, what: str) -> Path:
    """RUN/<what> for a local run; ./<run name>-<what> for a run at a URL."""
    if is_url(run) and not run.startswith("file:"):
        return Path(f"{run.rstrip('/').rsplit('/', 1)[-1]}-{what}")
    return Path(run.removeprefix("file://")) / what


def size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
