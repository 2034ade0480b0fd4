"""The Crucible-3 experiment's side of the `crucible-record` command, kept beside the experiment so
the generic cli.py holds no experiment code: its own commands (train, analyze, dead-mask, import),
added by :func:`register`, and its view of a run for the generic commands (info adds the config and
Quick Stats, export writes the notebook's two files, progress counts training steps)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..cli_common import RUN, default_out, size_text
from ..codecs import CODEC_PRESETS, Layout
from ..errors import CrucibleError
from ..steps_text import steps_committed
from ..storage import DEFAULT_COMMIT_INTERVAL, DURABILITY
from .config import (DEVICES, PRESETS, RECORD_ROWS, RECORDABLE, RunConfig, device_without_torch, load_config_file,
                     training_line)

if TYPE_CHECKING:  # what imports torch and zarr (1-2 s) is imported where a command needs it
    from ..reader import Run
    from .trajectory import Trajectory


def register(group: click.Group) -> None:
    """Add the experiment's commands to the `crucible-record` group."""
    for command in (train, analyze, dead_mask, import_notebook_file):
        group.add_command(command)


# -- the experiment's view of a run, for the generic commands (info, export, verify) -------------


def owns(run: Run) -> bool:
    """A Crucible-3 run: its recorded steps 0..T are T training steps (step 0: the initial state)."""
    from .trajectory import is_crucible

    return is_crucible(run)


def view(run: Run) -> Trajectory:
    """The notebook's view of one of its runs (refuses one with no committed step)."""
    from .trajectory import Trajectory

    return Trajectory(run)


# The notebook saves W as the uint16 bits of its bf16 values; its export keeps that (byte-identical).
W_DTYPE = ("W in crucible_3_trajectory.safetensors is torch.uint16: the bits of bf16, as the notebook saves it; "
           "load it with: load_file(path)['W'].view(torch.bfloat16)")


def info_lines(traj: Trajectory) -> Iterator[str]:
    """What `info` says of a Crucible-3 run after the generic lines."""
    from .analysis import format_quick_stats, quick_stats

    config = traj.config
    epochs = traj.epochs if traj.epochs >= 0 else "unknown (imported without metadata)"
    yield f"Crucible-3: epochs: {epochs}"
    yield "Export: " + W_DTYPE
    yield "Config: " + ", ".join(f"{k}={v}" for k, v in config.to_dict().items())
    prov = traj.attrs.get("provenance", {})
    yield "Recorded with: " + ", ".join(f"{k} {v}" for k, v in prov.items())
    n_dead = int(traj.dead_mask.sum())
    yield f"Tokens: {n_dead} dead, {config.vocab_size - n_dead} live"
    if traj.steps > 0:
        yield f"Loss: first {traj.loss[1].item():.4f}, last {traj.loss[-1].item():.4f}"
    yield format_quick_stats(traj, quick_stats(traj))


def export(traj: Trajectory, out: Path, force: bool) -> str:
    """`export` of a Crucible-3 run: the notebook's safetensors file and its metadata.json."""
    from .export import export_safetensors

    target, meta = export_safetensors(traj, out, force=force)
    return (f"Wrote {target} ({size_text(target.stat().st_size)}) and {meta}: "
            f"{steps_committed(traj.committed_steps, of=traj.run.info.steps, training=True)}\n{W_DTYPE}")


def view_panels(run: Run) -> dict[str, dict[str, tuple]]:
    """The live page's panels for a Crucible-3 run: analyze's questions over the committed steps,
    {title: {series: (x, y)}} (reads W once: the page asks at most every few seconds)."""
    import torch

    from .analysis import alignment, centroid_dynamics, h_mean_persistence, scan_W
    from .trajectory import Trajectory

    if run.committed_steps < 3:  # the questions need 2 training steps
        return {}
    traj = Trajectory(run)
    n = traj.steps
    scan = scan_W(traj)
    persistence, centroids, align = h_mean_persistence(traj), centroid_dynamics(scan), alignment(traj, scan)
    steps, transitions = torch.arange(n + 1), torch.arange(1, n + 1)
    return {
        "h_mean persistence": {"cos(h_mean[i], h_mean[i+1])": (torch.arange(2, n + 1), persistence["h_mean_cos_lag1"]),
                               "cos to the first h_mean": (transitions, persistence["h_mean_cos_to_first"])},
        "centroid separation": {"|c_dead - c_live|": (steps, centroids["centroid_separation"]),
                                "dead displacement": (steps, centroids["centroid_dead_displacement"]),
                                "live displacement": (steps, centroids["centroid_live_displacement"])},
        "alignment of drift with h_mean": {"cos(live drift, h_mean)": (transitions, align["cos_live_drift_hmean"]),
                                           "cos(dead drift, -h_mean)": (transitions, align["cos_dead_drift_neg_hmean"]),
                                           "cos(h_mean, c_live)": (transitions, align["cos_hmean_live_centroid"])},
    }


# -- the experiment's own commands --------------------------------------------------------------


# RunConfig field -> the help of its flag (--field-name; the type and default are the field's)
_EXPERIMENT_OPTIONS = {
    "steps": "training steps", "batch_size": "sequences per batch", "seq_len": "tokens per sequence",
    "lr": "AdamW learning rate", "weight_decay": "AdamW weight decay", "beta1": "AdamW beta1", "beta2": "AdamW beta2",
    "eps": "AdamW epsilon", "vocab_size": "tokenizer vocabulary size", "hidden_dim": "model width",
    "num_layers": "transformer layers", "num_heads": "attention heads", "seed": "random seed",
    "corpus": "corpus text file [default: the shipped corpus]",
    "tokenizer": "tokenizers JSON file [default: the shipped tokenizer]",
    "dead_mask": "safetensors mask file [default: tokens absent from the corpus]",
}


def _experiment_options(func):
    defaults = RunConfig()
    for field, text in reversed(_EXPERIMENT_OPTIONS.items()):
        default = getattr(defaults, field)
        func = click.option(f"--{field.replace('_', '-')}", field, type=str if default is None else type(default),
                            default=default, show_default=default is not None, help=text)(func)
    return func


@click.command()
@_experiment_options
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="auto = cuda, then mps, then cpu (the notebook's detection)")
@click.option("--out", "out", type=RUN, default=None,
              help="new run: a directory or an s3://bucket/prefix URL [default: runs/crucible3-<time>]")
@click.option("--preset", type=click.Choice(PRESETS), default=None,
              help="quick: batch 16 x 64 tokens (a first run of a minute or two on a CPU); "
                   "--config and flags override it")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="JSON or TOML file of the same keys; flags override it")
@click.option("--resume", "resume", type=RUN, default=None,
              help="continue a stopped run (its own config is used); with --steps N, extend a stopped or "
                   "finished run to N steps")
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
def train(ctx, out, preset, config_file, resume, commit_interval, durability, writer_threads, checkpoints, time_chunk,
          token_chunk, codec, progress, **values):
    """Train the notebook's model and record every step into OUT/trajectory.zarr."""
    given = {name for name in ctx.params if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if not commit_interval > 0:
        raise CrucibleError(f"--commit-interval must be a positive number of seconds, got {commit_interval}")
    if writer_threads is not None and writer_threads < 1:
        raise CrucibleError(f"--writer-threads must be at least 1, got {writer_threads}")
    common = {"commit_interval": commit_interval, "durability": durability, "progress": progress,
              "writer_threads": writer_threads, "say": lambda line: click.echo(line, err=True)}
    if resume is not None:
        extra = sorted(given - {"resume", "steps", "progress", "commit_interval", "durability", "writer_threads"})
        if extra:
            raise CrucibleError(f"--resume continues a run with its own settings (only --steps may extend it); "
                                f"drop {', '.join('--' + e.replace('_', '-') for e in extra)}")
        from .run import resume_run

        summary = resume_run(resume, steps=values["steps"] if "steps" in given else None, announce=click.echo, **common)
    else:
        settings = dict(PRESETS[preset]) if preset else {}
        settings.update(load_config_file(config_file) if config_file else {})
        settings.update({k: v for k, v in values.items() if k in given})  # (RunConfig splits --record's names)
        config = RunConfig.from_dict(settings)
        if "record_rows" in given and not config.record:
            raise CrucibleError("--record-rows needs --record (it selects the rows of the recorded fields)")
        if out is None:
            out = Path("runs") / f"crucible3-{dt.datetime.now():%Y%m%d-%H%M%S}"
        layout = Layout(time_chunk=time_chunk, row_chunk=token_chunk, codec=codec)
        layout.validate()
        device = device_without_torch(config.device)
        if device is not None:  # the first line, before torch is imported (1-2 s)
            click.echo(training_line(out, device, config))
        from .run import start_run

        summary = start_run(config, out, layout=layout, checkpoints=checkpoints,
                            announce=click.echo if device is None else lambda line: None, **common)
    click.echo(
        f"Training complete. Final loss: {summary.final_loss:.4f}, epochs: {summary.epochs}, "
        f"{steps_committed(summary.steps + 1, of=summary.planned + 1, training=True)}, time: {summary.seconds:.1f} s"
    )
    click.echo(f"Run: {summary.run_dir} ({size_text(summary.bytes_on_disk)} on disk)")


@click.command()
@click.argument("run_dir", type=RUN)
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="output directory [default: RUN_DIR/analysis]")
@click.option("--force", is_flag=True, help="overwrite an earlier analysis in --out")
@click.option("--scheduler", default=None, help="run the pass over W on this Dask cluster (tcp://HOST:PORT)")
@click.option("--workers", type=int, default=None, help="start a local Dask cluster of N worker processes for it")
def analyze(run_dir, out, force, scheduler, workers):
    """Answer the experiment's questions: analysis.json, PNG plots and a short table."""
    from .report import analyze_run

    click.echo(analyze_run(run_dir, out or default_out(run_dir, "analysis"), force=force,
                           scheduler=scheduler, workers=workers))


@click.command("dead-mask")
@click.option("--corpus", type=click.Path(path_type=Path), default=None, help="[default: the shipped corpus]")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, help="[default: the shipped tokenizer]")
@click.option("--vocab-size", type=int, default=10000, show_default=True)
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="mask file to write")
@click.option("--force", is_flag=True, help="overwrite an existing file")
def dead_mask(corpus, tokenizer, vocab_size, out, force):
    """Write the notebook's mask file: tokens that never occur in the tokenized corpus are dead."""
    from .data import (default_corpus_path, default_tokenizer_path, derive_dead_mask, load_tokenizer, save_dead_mask,
                       tokenize_corpus)

    if vocab_size <= 0:
        raise CrucibleError(f"--vocab-size must be positive, got {vocab_size}")
    if out.exists() and not force:
        raise CrucibleError(f"{out} already exists; pass --force to overwrite it")
    tok = load_tokenizer(tokenizer or default_tokenizer_path(), vocab_size)
    masks = derive_dead_mask(tokenize_corpus(corpus or default_corpus_path(), tok), vocab_size)
    save_dead_mask(masks, out)
    n_dead = int(masks.dead_mask.sum())
    click.echo(f"Wrote {out}: {n_dead} dead, {vocab_size - n_dead} live tokens")


@click.command("import")
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
    from .importer import import_notebook

    s = import_notebook(file, out, metadata, layout=Layout(time_chunk=time_chunk, row_chunk=token_chunk, codec=codec))
    click.echo(f"Imported {file}: {s.steps} steps, vocab {s.vocab}, hidden {s.hidden} -> {s.run_dir} "
               f"({size_text(s.bytes_on_disk)} on disk)")
    click.echo(f"Config from {s.config_from}; epoch known at {s.epochs_known} of {s.steps} steps (-1 = unknown)")
    click.echo("`crucible-record export` gives back the file byte for byte" if s.byte_identical_export else
               "`crucible-record export` gives back the same tensors; the bytes differ (the file's header is not "
               "laid out as safetensors' save_file lays it out)")
