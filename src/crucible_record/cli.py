"""The `crucible-record` command. Thin: parsing, printing, exit codes; the work lives elsewhere."""

from __future__ import annotations

import datetime as dt
import os
import sys
import warnings
from pathlib import Path

import click

from .codecs import CODEC_PRESETS, Layout
from .crucible3.config import DEVICES, RECORD_ROWS, RECORDABLE, RunConfig, load_config_file, parse_record
from .errors import CrucibleError, Interrupted
from .writer import DEFAULT_COMMIT_INTERVAL
from .steps_text import steps_committed
from .storage import DURABILITY, is_url

# A run is a local directory or a URL (s3://, file://, memory://): kept as a string, since pathlib
# would fold "s3://bucket" into "s3:/bucket".
RUN = click.STRING

# (flag, RunConfig field, type, help)
_EXPERIMENT_OPTIONS = [
    ("--steps", "steps", int, "training steps"),
    ("--batch-size", "batch_size", int, "sequences per batch"),
    ("--seq-len", "seq_len", int, "tokens per sequence"),
    ("--lr", "lr", float, "AdamW learning rate"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--beta1", "beta1", float, "AdamW beta1"),
    ("--beta2", "beta2", float, "AdamW beta2"),
    ("--eps", "eps", float, "AdamW epsilon"),
    ("--vocab-size", "vocab_size", int, "tokenizer vocabulary size"),
    ("--hidden-dim", "hidden_dim", int, "model width"),
    ("--num-layers", "num_layers", int, "transformer layers"),
    ("--num-heads", "num_heads", int, "attention heads"),
    ("--seed", "seed", int, "random seed"),
    ("--corpus", "corpus", str, "corpus text file [default: the shipped corpus]"),
    ("--tokenizer", "tokenizer", str, "tokenizers JSON file [default: the shipped tokenizer]"),
    ("--dead-mask", "dead_mask", str, "safetensors mask file [default: tokens absent from the corpus]"),
]


def _experiment_options(func):
    defaults = RunConfig()
    for flag, field, kind, text in reversed(_EXPERIMENT_OPTIONS):
        default = getattr(defaults, field)
        func = click.option(flag, field, type=kind, default=default, show_default=default is not None, help=text)(func)
    return func


@click.group()
@click.version_option(package_name="crucible-record")
def cli() -> None:
    """Record every training step of the Crucible-3 experiment into a Zarr v3 store."""


@cli.command()
@_experiment_options
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="auto = cuda, then mps, then cpu (the notebook's detection)")
@click.option("--out", "out", type=RUN, default=None,
              help="new run: a directory or an s3://bucket/prefix URL [default: runs/crucible3-<time>]")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="JSON or TOML file of the same keys; flags override it")
@click.option("--resume", "resume", type=RUN, default=None,
              help="continue a stopped run (its own config is used)")
@click.option("--commit-interval", type=float, default=DEFAULT_COMMIT_INTERVAL, show_default=True,
              help="seconds of training a crash may lose at most (also bounded by one block)")
@click.option("--durability", type=click.Choice(DURABILITY), default="fsync", show_default=True,
              help="fsync: committed steps survive a power loss; none: they survive a process kill")
@click.option("--writer-threads", type=int, default=None,
              help="threads compressing each block [default: 1 on the CPU, all cores but one on a GPU]")
@click.option("--checkpoints/--no-checkpoints", default=True, show_default=True,
              help="save model/optimizer/RNG state at each commit, for exact resume")
@click.option("--time-chunk", type=int, default=64, show_default=True,
              help="steps per stored block (buffered in RAM, written once)")
@click.option("--token-chunk", type=int, default=Layout.row_chunk, show_default=True,
              help="tokens per inner chunk (smaller = faster single-token reads)")
@click.option("--codec", type=click.Choice(CODEC_PRESETS), default=Layout.codec, show_default=True,
              help="compression preset (all lossless)")
@click.option("--record", "record", default=None, metavar="NAME,...",
              help=f"also record, every step, W's gradient and AdamW's state for W: any of {','.join(RECORDABLE)} "
                   f"(fields {', '.join(RECORDABLE.values())}; NaN at step 0) [default: none]")
@click.option("--record-rows", "record_rows", type=click.Choice(RECORD_ROWS), default="all", show_default=True,
              help="the tokens whose rows of the --record fields are kept")
@click.option("--progress/--no-progress", default=True, help="show the progress bar")
@click.pass_context
def train(ctx, out, config_file, resume, commit_interval, durability, writer_threads, checkpoints, time_chunk,
          token_chunk, codec, progress, **values):
    """Train the notebook's model and record every step into OUT/trajectory.zarr."""
    from .crucible3.run import resume_run, start_run

    given = {name for name in ctx.params if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if not commit_interval > 0:
        raise CrucibleError(f"--commit-interval must be a positive number of seconds, got {commit_interval}")
    if writer_threads is not None and writer_threads < 1:
        raise CrucibleError(f"--writer-threads must be at least 1, got {writer_threads}")
    if resume is not None:
        extra = sorted(given - {"resume", "progress", "commit_interval", "durability", "writer_threads"})
        if extra:
            raise CrucibleError(
                f"--resume continues a run with its own settings; drop {', '.join('--' + e.replace('_', '-') for e in extra)}"
            )
        summary = resume_run(resume, commit_interval=commit_interval, durability=durability, progress=progress,
                             writer_threads=writer_threads, say=lambda line: click.echo(line, err=True))
    else:
        settings = load_config_file(config_file) if config_file else {}
        settings.update({k: v for k, v in values.items() if k in given or k == "device" and "device" in given})
        if "record" in given:
            settings["record"] = parse_record(values["record"])
        config = RunConfig.from_dict(settings)
        if "record_rows" in given and not config.record:
            raise CrucibleError("--record-rows needs --record (it selects the rows of the recorded fields)")
        if out is None:
            out = Path("runs") / f"crucible3-{dt.datetime.now():%Y%m%d-%H%M%S}"
        layout = Layout(time_chunk=time_chunk, row_chunk=token_chunk, codec=codec)
        summary = start_run(config, out, layout=layout, checkpoints=checkpoints, commit_interval=commit_interval,
                            durability=durability, progress=progress, writer_threads=writer_threads)
    click.echo(
        f"Training complete. Final loss: {summary.final_loss:.4f}, epochs: {summary.epochs}, "
        f"{steps_committed(summary.steps + 1, of=summary.planned + 1, training=True)}, time: {summary.seconds:.1f} s"
    )
    click.echo(f"Run: {summary.run_dir} ({_size(summary.bytes_on_disk)} on disk)")


@cli.command()
@click.argument("run_dir", type=RUN)
@click.option("--format", "fmt", type=click.Choice(["safetensors"]), default="safetensors", show_default=True)
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="output directory [default: RUN_DIR/export]")
@click.option("--force", is_flag=True, help="overwrite existing files")
def export(run_dir, fmt, out, force):
    """Write a run's committed steps as safetensors (a Crucible-3 run: the notebook's two files)."""
    from . import open as open_run
    from .crucible3.trajectory import Trajectory

    run = open_run(run_dir)
    out = out or default_out(run_dir, "export")
    if isinstance(run, Trajectory):
        from .crucible3.export import export_safetensors

        target, meta = export_safetensors(run, out, force=force)
        click.echo(f"Wrote {target} ({_size(target.stat().st_size)}) and {meta}: "
                   f"{steps_committed(run.committed_steps, of=run.info.steps, training=True)}")
    else:
        from .export import export_run

        target = export_run(run, out, force=force)
        click.echo(f"Wrote {target} ({_size(target.stat().st_size)}): {steps_committed(run.committed_steps, of=run.info.steps)}, "
                   f"fields {', '.join(run.fields)}")


@cli.command()
@click.argument("run_dir", type=RUN)
def info(run_dir):
    """Fields, committed steps, size on disk; for a Crucible-3 run its config and Quick Stats."""
    from . import open as open_run
    from .crucible3.trajectory import Trajectory

    run = open_run(run_dir)
    on_disk, raw = run.bytes_on_disk(), run.raw_bytes()
    layout = run.info.layout
    click.echo(f"Run: {run_dir} (format {run.version})")
    crucible = isinstance(run, Trajectory)
    click.echo("Progress: " + steps_committed(run.committed_steps, of=run.info.steps, training=crucible))
    for name, spec in run.fields.items():
        field = run[name]
        rows = f", {len(spec.row_indices)} of {spec.shape[0]} rows" if spec.row_indices is not None else ""
        click.echo(f"  {name}: {tuple(spec.shape)} {str(spec.dtype).replace('torch.', '')}, every {spec.every}{rows}; "
                   f"{len(field)} rows committed")
    if run.info.constants:
        click.echo("Constants: " + ", ".join(run.info.constants))
    click.echo(f"Size: {_size(on_disk)} on disk, {_size(raw)} raw, compression {raw / max(on_disk, 1):.2f}x "
               f"(codec {layout.codec}, {layout.row_chunk} rows per inner chunk)")
    if not isinstance(run, Trajectory):
        return
    from .crucible3.analysis import format_quick_stats, quick_stats

    config = run.config
    epochs = run.epochs if run.epochs >= 0 else "unknown (imported without metadata)"
    click.echo(f"Crucible-3: epochs: {epochs}")
    click.echo("Config: " + ", ".join(f"{k}={v}" for k, v in config.to_dict().items()))
    prov = run.attrs.get("provenance", {})
    click.echo("Recorded with: " + ", ".join(f"{k} {v}" for k, v in prov.items()))
    n_dead = int(run.dead_mask.sum())
    click.echo(f"Tokens: {n_dead} dead, {config.vocab_size - n_dead} live")
    if run.steps > 0:
        click.echo(f"Loss: first {run.loss[1].item():.4f}, last {run.loss[-1].item():.4f}")
    click.echo(format_quick_stats(run, quick_stats(run)))


@cli.command()
@click.argument("run_dir", type=RUN)
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="output directory [default: RUN_DIR/analysis]")
@click.option("--force", is_flag=True, help="overwrite an earlier analysis in --out")
@click.option("--scheduler", default=None, help="run the pass over W on this Dask cluster (tcp://HOST:PORT)")
@click.option("--workers", type=int, default=None, help="start a local Dask cluster of N worker processes for it")
def analyze(run_dir, out, force, scheduler, workers):
    """Answer the experiment's questions: analysis.json, PNG plots and a short table."""
    from .crucible3.report import analyze_run

    click.echo(analyze_run(run_dir, out or default_out(run_dir, "analysis"), force=force,
                           scheduler=scheduler, workers=workers))


@cli.command()
@click.argument("run_dir", type=RUN)
@click.option("--repair", is_flag=True,
              help="move the commit marker back to the last step before the first damaged block")
def verify(run_dir, repair):
    """Read every committed chunk; report corruption by field and step range."""
    from .crucible3.trajectory import is_crucible
    from .reader import Run
    from .verify import repair_run, verify_run

    report = verify_run(run_dir)
    run = Run(run_dir)
    progress = steps_committed(report.steps, of=run.info.steps, training=is_crucible(run))
    for problem in report.problems:
        click.echo(f"CORRUPT {problem}")
    if not report.ok and repair:
        before, after = repair_run(run_dir)
        click.echo(f"Repaired: commit marker moved back from steps 0..{before - 1}: "
                   f"{steps_committed(after, of=run.info.steps, training=is_crucible(run))}; "
                   f"continue with `crucible-record train --resume {run_dir}` (Crucible-3 runs) or cr.record(..., resume=True)")
        return
    if not report.ok:
        raise CrucibleError(f"{run_dir}: {len(report.problems)} damaged chunk(s); {progress} "
                            f"(--repair rolls the commit back before them)")
    click.echo(f"OK: {progress}; {report.blocks_read} blocks read, all checksums match")


@cli.command("dead-mask")
@click.option("--corpus", type=click.Path(path_type=Path), default=None, help="[default: the shipped corpus]")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, help="[default: the shipped tokenizer]")
@click.option("--vocab-size", type=int, default=10000, show_default=True)
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="mask file to write")
@click.option("--force", is_flag=True, help="overwrite an existing file")
def dead_mask(corpus, tokenizer, vocab_size, out, force):
    """Write the notebook's mask file: tokens that never occur in the tokenized corpus are dead."""
    from .crucible3.data import (default_corpus_path, default_tokenizer_path, derive_dead_mask, load_tokenizer,
                       save_dead_mask, tokenize_corpus)

    if vocab_size <= 0:
        raise CrucibleError(f"--vocab-size must be positive, got {vocab_size}")
    if out.exists() and not force:
        raise CrucibleError(f"{out} already exists; pass --force to overwrite it")
    tok = load_tokenizer(tokenizer or default_tokenizer_path(), vocab_size)
    masks = derive_dead_mask(tokenize_corpus(corpus or default_corpus_path(), tok), vocab_size)
    save_dead_mask(masks, out)
    n_dead = int(masks.dead_mask.sum())
    click.echo(f"Wrote {out}: {n_dead} dead, {vocab_size - n_dead} live tokens")


@cli.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--metadata", "metadata", type=click.Path(path_type=Path), default=None,
              help="the notebook's metadata.json (config, epochs, date, device) [default: config from the shapes]")
@click.option("--out", "out", type=RUN, required=True, help="new run: a directory or an s3:// URL")
@click.option("--time-chunk", type=int, default=64, show_default=True, help="steps per stored block")
@click.option("--token-chunk", type=int, default=Layout.row_chunk, show_default=True, help="tokens per inner chunk")
@click.option("--codec", type=click.Choice(CODEC_PRESETS), default=Layout.codec, show_default=True,
              help="compression preset (all lossless)")
def import_notebook_file(file, metadata, out, time_chunk, token_chunk, codec):
    """Turn the notebook's crucible_3_trajectory.safetensors into a Crucible-3 run (export gives it back)."""
    from .crucible3.importer import import_notebook

    s = import_notebook(file, out, metadata, layout=Layout(time_chunk=time_chunk, row_chunk=token_chunk, codec=codec))
    click.echo(f"Imported {file}: {s.steps} steps, vocab {s.vocab}, hidden {s.hidden} -> {s.run_dir} "
               f"({_size(s.bytes_on_disk)} on disk)")
    click.echo(f"Config from {s.config_from}; epoch known at {s.epochs_known} of {s.steps} steps (-1 = unknown)")
    click.echo("`crucible-record export` gives back the file byte for byte" if s.byte_identical_export else
               "`crucible-record export` gives back the same tensors; the bytes differ (the file's header is not "
               "laid out as safetensors' save_file lays it out)")


def default_out(run: str, what: str) -> Path:
    """RUN/<what> for a local run; ./<run name>-<what> for a run at a URL."""
    if is_url(run) and not run.startswith("file:"):
        return Path(f"{run.rstrip('/').rsplit('/', 1)[-1]}-{what}")
    return Path(run.removeprefix("file://")) / what


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


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
        text = str(e).splitlines()[0] if str(e) else ""
        click.echo(f"error: {type(e).__name__}: {text} (set CRUCIBLE_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)
