"""cr.watch in a plain torch loop: parameters, gradients, optimizer state and loss, bit-exact."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn

import crucible_record as cr
from crucible_record.errors import CrucibleError


class Tiny(nn.Module):
    def __init__(self, vocab=30, hidden=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.head(self.wte(ids))


def train_watched(path, steps=6, **watch_options):
    """A plain loop recorded through cr.watch; returns the copies the loop took at each step."""
    torch.manual_seed(0)
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    w = cr.watch(model, optimizer, **watch_options)
    copies = []
    with cr.record(path, w.fields, commit_interval=1e6) as rec:
        rec.record(0, **w.capture(0))
        copies.append({"wte.weight": model.wte.weight.detach().clone()})
        for step in range(1, steps + 1):
            ids = torch.randint(0, 20, (4, 5))  # tokens 20..29 never occur: no gradient flows to them
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
            loss.backward()
            optimizer.step()
            rec.record(step, **w.capture(step, loss=loss.detach()))
            state = optimizer.state[model.wte.weight]
            copies.append({"wte.weight": model.wte.weight.detach().clone(), "wte.weight.grad": model.wte.weight.grad.clone(),
                           "wte.weight.exp_avg": state["exp_avg"].clone(), "wte.weight.exp_avg_sq": state["exp_avg_sq"].clone(),
                           "head.bias.grad": model.head.bias.grad.clone(), "loss": loss.detach().clone()})
    return copies


def test_watch_records_params_grads_state_and_loss_bit_exact(tmp_path):
    copies = train_watched(tmp_path / "run", params="wte.weight", grads=["wte.weight", "head.*"],
                           optim_state=("exp_avg", "exp_avg_sq"))
    t = cr.open(tmp_path / "run")
    assert set(t.fields) == {"wte.weight", "wte.weight.exp_avg", "wte.weight.exp_avg_sq", "wte.weight.grad",
                             "head.weight.grad", "head.bias.grad", "loss"}
    assert t.committed_steps == 7
    for step, copy in enumerate(copies):
        for name, value in copy.items():
            assert torch.equal(t[name][step], value), (name, step)
    for name in ("wte.weight.grad", "wte.weight.exp_avg", "wte.weight.exp_avg_sq", "head.bias.grad", "loss"):
        assert torch.isnan(t[name][0]).all(), name  # step 0: the initial state, nothing else exists yet
    assert torch.equal(t["wte.weight"][0], copies[0]["wte.weight"])


def test_watch_names_axes_for_xarray_and_keeps_the_run_attributes(tmp_path):
    """A parameter, its gradient and its state share named axes (xarray lines them up); the run's
    attributes reach to_xarray().attrs."""
    torch.manual_seed(0)
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    w = cr.watch(model, optimizer, params="wte.weight", grads=["wte.weight", "head.*"], optim_state=("exp_avg",))
    with cr.record(tmp_path / "run", w.fields, attributes={"model": "tiny", "lr": 0.05}) as rec:
        rec.record(0, **w.capture(0))
    ds = cr.open(tmp_path / "run").to_xarray()
    for name in ("wte.weight", "wte.weight.grad", "wte.weight.exp_avg"):
        assert ds[name].dims == ("step", "wte.num_embeddings", "wte.embedding_dim"), name
    assert ds["head.weight.grad"].dims == ("step", "head.out_features", "head.in_features")
    assert ds["head.bias.grad"].dims == ("step", "head.out_features")
    assert ds.attrs["model"] == "tiny" and ds.attrs["lr"] == 0.05 and ds.attrs["committed_steps"] == 1


def test_watch_every_and_rows_in_any_order(tmp_path):
    rows = [25, 3, 17]  # unsorted: stored in the order given
    copies = train_watched(tmp_path / "run", params="wte.weight", grads="wte.weight", optim_state="exp_avg",
                           every=2, rows=rows, loss=False)
    t = cr.open(tmp_path / "run")
    assert set(t.fields) == {"wte.weight", "wte.weight.exp_avg", "wte.weight.grad"}
    for name in t.fields:
        assert list(t[name].steps) == [0, 2, 4, 6] and t[name].rows.tolist() == rows
    for i, step in enumerate([2, 4, 6]):
        assert torch.equal(t["wte.weight"][i + 1], copies[step]["wte.weight"][rows])
        assert torch.equal(t["wte.weight.grad"][i + 1], copies[step]["wte.weight.grad"][rows])
        assert torch.equal(t["wte.weight.exp_avg"][i + 1], copies[step]["wte.weight.exp_avg"][rows])
    assert (t["wte.weight.grad"][1:, 0] == 0).all()  # token 25 never occurs: its gradient row is zero


@pytest.mark.parametrize("options, message", [
    (dict(params="nope.*"), "no parameter of the model matches 'nope.*'"),
    (dict(params=["wte.weight", 3]), "parameter names or globs are strings"),
    (dict(grads="wte.weight", optim_state="exp_avg"), "optim_state is recorded for the parameters named in params="),
    (dict(params="wte.weight", optim_state=("exp_avg", "exp_avg")), "distinct state names"),
    (dict(loss=False), "nothing to watch"),
    (dict(params="wte.weight", rows=[1, 1]), "without repeats"),
])
def test_watch_refuses_bad_options(options, message):
    model = Tiny()
    with pytest.raises(CrucibleError, match=re.escape(message)):
        cr.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), **options)


def test_watch_refuses_what_cannot_have_state_or_grads():
    model = Tiny()
    with pytest.raises(CrucibleError, match="needs the optimizer"):
        cr.watch(model, params="wte.weight", optim_state="exp_avg")
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with pytest.raises(CrucibleError, match="'wte.weight' is not in the optimizer's param_groups"):
        cr.watch(model, optimizer, params="wte.weight", optim_state="momentum_buffer")
    model.wte.weight.requires_grad_(False)
    with pytest.raises(CrucibleError, match="does not require a gradient"):
        cr.watch(model, grads="wte.weight")


def test_watch_capture_needs_the_loss_it_records(tmp_path):
    model = Tiny()
    w = cr.watch(model, params="head.bias")
    assert w.capture(0)["loss"] != w.capture(0)["loss"]  # NaN at step 0
    with pytest.raises(CrucibleError, match="pass capture\\(step, loss=...\\)"):
        w.capture(1)
    with pytest.raises(CrucibleError, match="the loss is one number"):
        w.capture(1, loss=torch.ones(3))
    assert math.isclose(w.capture(1, loss=torch.tensor([2.5]))["loss"].item(), 2.5)
    python_loss = w.capture(1, loss=0.1)["loss"]  # loss.item(): not exactly a float32, still taken
    assert python_loss.dtype == torch.float32 and python_loss.item() == torch.tensor(0.1).item()
