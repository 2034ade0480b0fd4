"""The CLI end to end on tiny runs: train, info, export, dead-mask, config files, overrides."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import torch
from safetensors.torch import load_file

import crucible_record as cr
from crucible_record.crucible3 import open_trajectory

from .clirun import assert_one_line_error, run_cli
from .conftest import TINY


def tiny_flags(corpus):
    flags = []
    for key, value in TINY.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags + ["--corpus", str(corpus), "--device", "cpu", "--no-progress"]


def test_train_info_export(capsys, tmp_path, tiny_corpus, tiny_run):
    run = tmp_path / "run"
    result = run_cli(capsys, "train", *tiny_flags(tiny_corpus), "--out", run, "--time-chunk", "8")
    assert result.code == 0, result.err
    assert "Final loss" in result.out and str(run) in result.out and "on disk" in result.out
    # the first line, before the inputs are read: the run, the device, the config
    assert result.out.splitlines()[0] == f"training {run} on cpu: 25 steps of 4 x 16 tokens, hidden_dim=16, num_layers=1, corpus={tiny_corpus}"
    traj = open_trajectory(run)
    assert traj.steps == TINY["steps"] and traj.config.hidden_dim == TINY["hidden_dim"]
    # the CLI run records exactly what the API run (tiny_run fixture) recorded
    assert torch.equal(traj.W[:].view(torch.uint16), open_trajectory(tiny_run).W[:].view(torch.uint16))

    info = run_cli(capsys, "info", run)
    assert info.code == 0, info.err
    for text in ("Crucible-3: epochs: ", "is torch.uint16: the bits of bf16", ".view(torch.bfloat16)", "Progress: steps 0..25 committed (25 of 25 training steps)", "W: (10000, 16) bfloat16", "compression", "Dead token centroid", "Live/Dead separation", "h_mean"):
        assert text in info.out

    exported = run_cli(capsys, "export", run, "--format", "safetensors", "--out", tmp_path / "exp")
    assert exported.code == 0, exported.err
    tensors = load_file(str(tmp_path / "exp" / "crucible_3_trajectory.safetensors"))
    assert tensors["W"].shape == (26, 10000, 16) and tensors["W"].dtype == torch.uint16
    # what export says: W is uint16, and the one line that gives its bf16 values works
    said = exported.out.splitlines()[-1]
    assert "W in crucible_3_trajectory.safetensors is torch.uint16: the bits of bf16" in said
    load = said.split("load it with: ")[1].replace("path", repr(str(tmp_path / "exp" / "crucible_3_trajectory.safetensors")))
    assert torch.equal(eval(load, {"load_file": load_file, "torch": torch}), traj.W[:])
    meta = json.loads((tmp_path / "exp" / "metadata.json").read_text())
    assert meta["total_steps"] == 25 and meta["hidden_dim"] == 16 and meta["device"] == "cpu"

    before = (tmp_path / "exp" / "crucible_3_trajectory.safetensors").read_bytes()
    again = run_cli(capsys, "export", run, "--out", tmp_path / "exp")
    assert_one_line_error(again, "already exists", "--force")
    assert (tmp_path / "exp" / "crucible_3_trajectory.safetensors").read_bytes() == before
    forced = run_cli(capsys, "export", run, "--out", tmp_path / "exp", "--force")
    assert forced.code == 0


def test_preset_quick_is_overridden_by_flags(capsys, tmp_path, tiny_corpus):
    run = tmp_path / "run"
    flags = [f for f in tiny_flags(tiny_corpus)]
    del flags[flags.index("--batch-size"):flags.index("--batch-size") + 2]
    result = run_cli(capsys, "train", "--preset", "quick", *flags, "--steps", "2", "--seq-len", "16", "--out", run)
    assert result.code == 0, result.err
    config = open_trajectory(run).config
    assert (config.batch_size, config.seq_len, config.steps) == (16, 16, 2)  # batch from the preset, the rest from flags
    assert_one_line_error(run_cli(capsys, "train", "--resume", run, "--preset", "quick"), "drop --preset")


def test_config_file_and_flag_override(capsys, tmp_path, tiny_corpus):
    cfg = tmp_path / "c.toml"
    body = "\n".join(f"{k.replace('_', '-')} = {v}" for k, v in TINY.items())
    cfg.write_text(body + f'\ncorpus = "{tiny_corpus}"\ndevice = "cpu"\nlr = 2e-3\n')
    run = tmp_path / "run"
    result = run_cli(capsys, "train", "--config", cfg, "--steps", "3", "--out", run, "--no-progress")
    assert result.code == 0, result.err
    config = open_trajectory(run).config
    assert config.steps == 3  # flag beats file
    assert config.lr == 2e-3 and config.hidden_dim == 16  # file beats defaults

    cfg_json = tmp_path / "c.json"
    cfg_json.write_text(json.dumps({**TINY, "corpus": str(tiny_corpus), "device": "cpu", "steps": 2}))
    result = run_cli(capsys, "train", "--config", cfg_json, "--out", tmp_path / "run2", "--no-progress")
    assert result.code == 0, result.err
    assert open_trajectory(tmp_path / "run2").steps == 2


def test_dead_mask_command(capsys, tmp_path, tiny_corpus, tiny_run):
    out = tmp_path / "mask.safetensors"
    result = run_cli(capsys, "dead-mask", "--corpus", tiny_corpus, "--out", out)
    assert result.code == 0, result.err
    masks = load_file(str(out))
    assert masks["dead_mask"].dtype == torch.bool and masks["dead_indices"].dtype == torch.int64
    assert torch.equal(masks["dead_mask"], open_trajectory(tiny_run).dead_mask)
    assert_one_line_error(run_cli(capsys, "dead-mask", "--corpus", tiny_corpus, "--out", out), "already exists")


def test_default_data_ships_with_a_realistic_dead_share():
    from crucible_record.crucible3.data import (default_corpus_path, default_tokenizer_path, derive_dead_mask,
                                      load_tokenizer, tokenize_corpus)

    tokens = tokenize_corpus(default_corpus_path(), load_tokenizer(default_tokenizer_path(), 10000))
    dead = int(derive_dead_mask(tokens, 10000).dead_mask.sum())
    assert len(tokens) // 128 >= 128  # at least one default batch
    assert 1000 < dead < 9000


def test_help_lists_notebook_defaults(capsys):
    result = run_cli(capsys, "train", "--help")
    assert result.code == 0
    for text in ("--steps", "500", "--batch-size", "128", "--lr", "0.001", "--seed", "42", "--resume"):
        assert text in result.out


def test_every_command_words_progress_alike(capsys, tmp_path, tiny_run):
    """One vocabulary: the recorded steps 0..n-1, and for a Crucible-3 run its training steps."""
    crucible = "steps 0..25 committed (25 of 25 training steps)"
    for command in (["info", tiny_run], ["verify", tiny_run], ["export", tiny_run, "--out", tmp_path / "exp"],
                    ["analyze", tiny_run, "--out", tmp_path / "an"]):
        result = run_cli(capsys, *command)
        assert result.code == 0 and crucible in result.out, (command, result)
    assert_one_line_error(run_cli(capsys, "train", "--resume", tiny_run), "already complete: " + crucible)

    generic = tmp_path / "generic"
    with cr.record(generic, {"w": cr.Field((2,), torch.float32)}) as rec:
        for step in range(5):
            rec.record(step, w=torch.zeros(2))
    for command in (["info", generic], ["verify", generic], ["export", generic, "--out", tmp_path / "gexp"]):
        result = run_cli(capsys, *command)
        assert result.code == 0 and "steps 0..4 committed (5 steps, open-ended)" in result.out, (command, result)


def test_progress_bar_shows_the_current_steps_loss(capsys, tmp_path, tiny_corpus):
    """Each bar line's loss is its own step's: the last one is the final loss, and no two steps
    show the loss of one (the writer's copy lagged a step)."""
    flags = [f for f in tiny_flags(tiny_corpus) if f != "--no-progress"]
    result = run_cli(capsys, "train", *flags, "--out", tmp_path / "run")
    assert result.code == 0, result.err
    shown = {}
    for count, loss in re.findall(r"(\d+)/25 \[[^\]]*loss=([0-9.]+)", result.err):
        shown.setdefault(int(count), set()).add(loss)
    final = re.search(r"Final loss: ([0-9.]+)", result.out).group(1)
    assert shown[25] == {final}, (shown, final)
    t = open_trajectory(tmp_path / "run")
    for count, losses in shown.items():
        assert losses == {f"{t.loss[count].item():.4f}"}, (count, losses)


def test_train_first_line_comes_before_torch_is_imported(tmp_path, tiny_corpus):
    """`train` names the run, device and config at once: before the 1-2 s import of torch (and zarr).

    A fresh interpreter (this one has torch already) records, for each line the CLI prints, whether
    torch was imported yet; 'auto' on this CPU-only torch build is known to be the CPU without it."""
    flags = [f for f in tiny_flags(tiny_corpus) if f not in ("--device", "cpu")] + ["--steps", "1"]
    script = (
        "import sys, click\n"
        "printed, echo = [], click.echo\n"
        "click.echo = lambda message=None, *a, **k: (printed.append(('torch' in sys.modules, str(message))),"
        " echo(message, *a, **k))\n"
        "from crucible_record.cli import main\n"
        "try:\n"
        f"    main(['train', *{flags!r}, '--out', {str(tmp_path / 'run')!r}])\n"
        "finally:\n"
        "    print('PRINTED', printed, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    printed = ast.literal_eval(done.stderr.split("PRINTED ", 1)[1].strip())
    assert printed[0] == (False, f"training {tmp_path / 'run'} on cpu: 1 steps of 4 x 16 tokens, hidden_dim=16, "
                                 f"num_layers=1, corpus={tiny_corpus}")
    assert printed[-1][0] and printed[-1][1].startswith("Run: ")  # torch was imported for the training


def test_package_import_is_lazy_and_names_resolve():
    """`import crucible_record` imports neither torch nor zarr; every public name still resolves, and
    importing the submodule behind cr.watch (as the framework callbacks do) leaves cr.watch a function."""
    script = ("import sys, crucible_record as cr\n"
              "assert 'torch' not in sys.modules and 'zarr' not in sys.modules, 'eager import'\n"
              "import crucible_record.integrations.hf\n"
              "assert callable(cr.watch) and cr.watch.__name__ == 'watch', cr.watch\n"
              "names = [getattr(cr, n) for n in cr.__all__]\n"
              "assert cr.reader.Run is cr.Run and not hasattr(cr, 'no_such_name')\n"
              "from crucible_record import Field, Shard, record, open\n"
              "from crucible_record.crucible3 import open_trajectory, Trajectory\n"
              "print(len(names))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(cr.__all__))
