"""Every snippet in README.md and docs/*.md runs as written.

```python blocks run in order, one script per page, in an empty directory (docs/crucible3.md reads
runs/crucible3: a tiny Crucible-3 run is put there first). ```bash lines that call crucible-record
are parsed by the command itself (every option and choice checked, nothing run: a first run takes
minutes); the install and test lines are what .ci/run runs. ```text blocks are usage, not snippets.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from crucible_record.cli import cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
NOT_CRUCIBLE = ("pip install", "export AWS_", "python -m pytest")


def blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(page.read_text()) if lang == language]


def test_pages_exist_and_readme_is_short():
    assert {p.name for p in PAGES} >= {"README.md", "record-your-loop.md", "crucible3.md", "crashes-and-resume.md",
                                       "object-storage.md", "speed.md"}
    assert len((ROOT / "README.md").read_bytes()) < 8192
    for page in PAGES:  # every fenced block is python, bash or text
        assert set(re.findall(r"^```(\w+)", page.read_text(), re.M)) <= {"python", "bash", "text"}, page.name


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=lambda p: p.name)
def test_python_snippets_run(tmp_path, tiny_run, page):
    if page.name == "crucible3.md":
        shutil.copytree(tiny_run, tmp_path / "runs" / "crucible3")
    script = tmp_path / "snippets.py"
    script.write_text("\n\n".join(blocks(page, "python")))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{page.name}\n{proc.stdout}\n{proc.stderr}"


def command_lines(page: Path) -> list[str]:
    lines = []
    for body in blocks(page, "bash"):
        for line in body.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith(NOT_CRUCIBLE):
                lines.append(line)
    return lines


@pytest.mark.parametrize("page", [p for p in PAGES if command_lines(p)], ids=lambda p: p.name)
def test_commands_parse(page):
    for line in command_lines(page):
        words = shlex.split(line)
        assert words[0] == "crucible-record", line
        command = cli.commands[words[1]]
        try:
            command.make_context(words[1], words[2:])
        except click.ClickException as e:
            pytest.fail(f"{page.name}: {line}: {e.format_message()}")
