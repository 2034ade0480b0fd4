"""The `crucible-record` command. Thin: parsing, printing, exit codes; the work lives elsewhere.

The generic commands (info, verify, export, view) live here. An experiment's commands, and its view of
its own runs in info and export, live with the experiment (crucible3/cli.py): this module is the
one generic module that imports it."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .cli_common import RUN, default_out, size_text
from .crucible3 import cli as crucible3_cli
from .errors import CrucibleError, Interrupted, describe
from .steps_text import steps_committed

if TYPE_CHECKING:  # reader imports torch and zarr (1-2 s): each command imports it when it runs
    from .reader import Run

# The experiments whose runs the generic commands show in their own terms (each: owns(run),
# view(run), info_lines(view), export(view, out, force), view_panels(run) for the live page); each
# adds its commands in register(cli).
EXPERIMENTS = (crucible3_cli,)


@click.group()
@click.version_option(package_name="crucible-record")
def cli() -> None:
    """Record every training step of the Crucible-3 experiment into a Zarr v3 store."""


@cli.command()
@click.argument("run_dir", type=RUN)
@click.option("--format", "fmt", type=click.Choice(["safetensors"]), default="safetensors", show_default=True)
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="output directory [default: RUN_DIR/export]")
@click.option("--force", is_flag=True, help="overwrite existing files")
def export(run_dir, fmt, out, force):
    """Write a run's committed steps as safetensors (a Crucible-3 run: the notebook's two files)."""
    from .reader import Run

    run = Run(run_dir)
    experiment = experiment_of(run)
    out = out or default_out(run_dir, "export")
    if experiment:
        click.echo(experiment.export(experiment.view(run), out, force))
        return
    from .export import export_run

    target = export_run(run, out, force=force)
    click.echo(f"Wrote {target} ({size_text(target.stat().st_size)}): "
               f"{steps_committed(run.committed_steps, of=run.info.steps)}, fields {', '.join(run.fields)}")


@cli.command()
@click.argument("run_dir", type=RUN)
def info(run_dir):
    """Fields, committed steps, size on disk; for a Crucible-3 run its config and Quick Stats."""
    from .reader import Run

    run = Run(run_dir)
    experiment = experiment_of(run)
    view = experiment.view(run) if experiment else None
    on_disk, raw, layout = run.bytes_on_disk(), run.raw_bytes(), run.info.layout
    click.echo(f"Run: {run_dir} (format {run.version})")
    click.echo("Progress: " + steps_committed(run.committed_steps, of=run.info.steps, training=bool(experiment)))
    for name, spec in run.fields.items():
        field = run[name]
        rows = f", {len(spec.row_indices)} of {spec.shape[0]} rows" if spec.row_indices is not None else ""
        click.echo(f"  {name}: {tuple(spec.shape)} {str(spec.dtype).replace('torch.', '')}, every {spec.every}{rows}; "
                   f"{len(field)} rows committed")
    if run.info.constants:
        click.echo("Constants: " + ", ".join(run.info.constants))
    click.echo(f"Size: {size_text(on_disk)} on disk, {size_text(raw)} raw, compression {raw / max(on_disk, 1):.2f}x "
               f"(codec {layout.codec}, {layout.row_chunk} rows per inner chunk)")
    if experiment:
        for line in experiment.info_lines(view):
            click.echo(line)


@cli.command()
@click.argument("run_dir", type=RUN)
@click.option("--repair", is_flag=True,
              help="move the commit marker back to the last step before the first damaged block")
def verify(run_dir, repair):
    """Read every committed chunk; report corruption by field and step range."""
    from .verify import repair_run, verify_run

    report = verify_run(run_dir)
    for problem in report.problems:
        click.echo(f"CORRUPT {problem}")
    if not report.ok and repair:
        before, after = repair_run(run_dir)
        training = _is_experiment(run_dir)
        click.echo(f"Repaired: commit marker moved back from steps 0..{before - 1}: "
                   f"{steps_committed(after, of=report.sized_steps, training=training)}; "
                   f"continue with `crucible-record train --resume {run_dir}` (Crucible-3 runs) or cr.record(..., resume=True)")
        return
    progress = steps_committed(report.steps, of=report.sized_steps, training=_is_experiment(run_dir))
    if not report.ok:
        raise CrucibleError(f"{run_dir}: {len(report.problems)} damaged chunk(s); {progress} "
                            f"(--repair rolls the commit back before them)")
    click.echo(f"OK: {progress}; {report.blocks_read} blocks read, all checksums match")


@cli.command("view")
@click.argument("run_dir", type=RUN)
@click.option("--port", type=click.IntRange(1, 65535), default=5006, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; 0.0.0.0 shows the run to every machine that can reach this one")
@click.option("--no-browser", is_flag=True, help="do not open the page in the default browser")
def view_command(run_dir, port, host, no_browser):
    """Serve a live page of a run (local or s3://): a panel per field, new steps as they commit.
    Ctrl-C stops it (exit 0)."""
    from .reader import Run
    from .view import serve

    experiment = experiment_of(Run(run_dir))  # not a run: one line, before anything is served
    try:
        serve(run_dir, port=port, host=host, browser=not no_browser, training=experiment is not None,
              panels=experiment.view_panels if experiment else None, say=click.echo)
    except KeyboardInterrupt:  # Ctrl-C is how a server is meant to stop: exit 0, one line
        click.echo(f"stopped serving {run_dir} (Ctrl-C)", err=True)


def _is_experiment(run_dir) -> bool:
    """Whether an experiment recorded the run (its steps are then counted as training steps)."""
    from .reader import Run

    try:
        return experiment_of(Run(run_dir)) is not None
    except CrucibleError:  # e.g. a marker past the arrays, which verify has just reported
        return False


def experiment_of(run: Run):
    """The experiment that recorded `run` (one of EXPERIMENTS), or None for a generic run."""
    return next((experiment for experiment in EXPERIMENTS if experiment.owns(run)), None)


for experiment in EXPERIMENTS:
    experiment.register(cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
    try:
        cli.main(args=argv, prog_name="crucible-record", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except Interrupted as e:  # the user's own stop, not an error: what was kept and how to go on
        click.echo(str(e), err=True)
        sys.exit(130)
    except CrucibleError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("stopped (Ctrl-C)", err=True)
        sys.exit(130)
    except Exception as e:  # a bug or an environment fault: still one line, unless debugging
        if os.environ.get("CRUCIBLE_DEBUG"):
            raise
        click.echo(f"error: {describe(e)} (set CRUCIBLE_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)
