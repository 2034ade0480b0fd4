"""Name what to record of a model and its optimizer; get the fields and each step's tensors.

    w = cr.watch(model, optimizer, params="wte.weight", grads="wte.weight",
                 optim_state=("exp_avg", "exp_avg_sq"))
    with cr.record("runs/x", w.fields) as rec:
        rec.record(0, **w.capture(0))                 # step 0: the initial state
        for step in range(1, n + 1):
            optimizer.zero_grad(); loss = ...; loss.backward(); optimizer.step()
            rec.record(step, **w.capture(step, loss=loss.detach()))   # before the next zero_grad

Field names: a parameter's own name (``wte.weight``), its gradient ``wte.weight.grad``, its
optimizer state ``wte.weight.exp_avg``, and ``loss``. Step ``s >= 1`` holds the parameters after
the s-th optimizer step, the gradients that step used and the optimizer state it left; step 0 holds
the initial parameters, and NaN for what does not exist yet (gradients, state, loss). The loss is
stored as float32 (a float64 loss, or a Python float, is rounded to it).

Under torch.distributed (more than one rank) each rank records its own rows of a sharded model
(FSDP2's DTensors, see fields.local_part) and its own loss: ``loss`` is then a ``(world_size,)``
field (dim ``rank``), row r the loss rank r passed; ``t["loss"][:].mean(1)`` is the loss over all
ranks when their batches are equal. No collective is run for it.

The training-framework callbacks (crucible_record.integrations) are built on this.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

import torch

from .errors import CrucibleError
from .fields import Field, Shard
from .ranks import Ranks

LOSS = "loss"


class Watch:
    """The fields of the watched tensors, and a capture of them at one step (see the module doc)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 params: str | Sequence[str] = (), grads: str | Sequence[str] = (),
                 optim_state: Sequence[str] = (), every: int = 1, rows=None, loss: bool = True,
                 distributed: bool | None = None):
        named = dict(model.named_parameters(remove_duplicate=False))  # a tied lm_head keeps its name
        self.model, self.optimizer = model, optimizer
        self.params = _select(named, params, "params")
        self.grads = _select(named, grads, "grads")
        self.optim_state = _state_keys(optim_state)
        if self.optim_state:
            if optimizer is None:
                raise CrucibleError("optim_state needs the optimizer: cr.watch(model, optimizer, ...)")
            if not self.params:
                raise CrucibleError("optim_state is recorded for the parameters named in params=; name at least one")
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for name, param in self.params.items():
                if id(param) not in held:
                    raise CrucibleError(f"parameter {name!r} is not in the optimizer's param_groups: it has no state")
        for name, param in self.grads.items():
            if not param.requires_grad:
                raise CrucibleError(f"parameter {name!r} does not require a gradient (requires_grad=False)")
        if not (self.params or self.grads or loss):
            raise CrucibleError("nothing to watch: name params=, grads= or keep loss=True")
        self.fields: dict[str, Field] = {}
        for name, param in self.params.items():
            for field_name in [name, *(f"{name}.{key}" for key in self.optim_state)]:
                self.fields[field_name] = _field(field_name, param, every, rows, _dims(model, name, param))
        for name, param in self.grads.items():
            self.fields[f"{name}.grad"] = _field(f"{name}.grad", param, every, rows, _dims(model, name, param))
        # recorded by several ranks (as cr.record decides, from the same `distributed`): each rank
        # records its own loss, one row per rank
        ranks = Ranks.current() if distributed is not False else None
        self.rank, self.world_size = (ranks.rank, ranks.size) if ranks else (0, 1)
        if loss:
            self.fields[LOSS] = Field((), torch.float32) if ranks is None else \
                Field((ranks.size,), torch.float32, dims=("rank",))
        if len(self.fields) != len(self.params) * (1 + len(self.optim_state)) + len(self.grads) + bool(loss):
            raise CrucibleError(f"two watched tensors share a field name; fields: {', '.join(self.fields)}")
        self._nan: dict[str, torch.Tensor] = {}

    def capture(self, step: int, loss: torch.Tensor | float | None = None) -> dict[str, torch.Tensor]:
        """The tensors due at `step`, for ``rec.record(step, **...)``. Not copies: record them before
        the parameters change or the gradients are zeroed (the recorder copies them)."""
        due = {name for name, spec in self.fields.items() if step % spec.every == 0}
        out: dict[str, torch.Tensor] = {}
        for name, param in self.params.items():
            if name in due:
                out[name] = param.detach()
            for key in self.optim_state:
                if f"{name}.{key}" in due:
                    state = self.optimizer.state.get(param, {}).get(key) if step > 0 else None
                    out[f"{name}.{key}"] = self._missing(f"{name}.{key}", param) if state is None else state
        for name, param in self.grads.items():
            if f"{name}.grad" in due:
                grad = param.grad if step > 0 else None
                out[f"{name}.grad"] = self._missing(f"{name}.grad", param) if grad is None else grad.detach()
        if LOSS in due:
            if step == 0:
                out[LOSS] = float("nan")
            elif loss is None:
                raise CrucibleError(f"step {step}: the watch records the loss; pass capture(step, loss=...)")
            elif isinstance(loss, torch.Tensor):
                if loss.numel() != 1:
                    raise CrucibleError(f"step {step}: the loss is one number, got a tensor of shape {tuple(loss.shape)}")
                out[LOSS] = loss.detach().reshape(()).float()  # the loss field is float32
            else:  # loss.item() too: rounded to float32 like a tensor loss
                out[LOSS] = torch.tensor(float(loss), dtype=torch.float32)
            if self.world_size > 1:
                out[LOSS] = Shard(torch.as_tensor(out[LOSS]).reshape(1).float(), offset=self.rank)
        return out

    def _missing(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """NaN of the field's shape: nothing exists yet (step 0) or this step gave no gradient."""
        nan = self._nan.get(name)
        if nan is None or nan.device != like.device:
            nan = self._nan[name] = torch.full_like(like, float("nan"), memory_format=torch.contiguous_format).detach()
        return nan


def watch(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
          params: str | Sequence[str] = (), grads: str | Sequence[str] = (), optim_state: Sequence[str] = (),
          every: int = 1, rows=None, loss: bool = True, distributed: bool | None = None) -> Watch:
    """What to record of `model` (parameters and gradients by name or glob, e.g. ``"*.wte.weight"``)
    and of `optimizer` (``optim_state``: state keys such as Adam's ``"exp_avg"``, ``"exp_avg_sq"``,
    for each of the `params`); `every` and `rows` apply to all of them; the loss every step.
    `distributed`: pass what you pass to cr.record (False: this process records alone, its loss a scalar)."""
    return Watch(model, optimizer, params=params, grads=grads, optim_state=optim_state, every=every,
                 rows=rows, loss=loss, distributed=distributed)


def _select(named: Mapping[str, torch.nn.Parameter], patterns: str | Iterable[str], what: str) -> dict:
    """Parameters by exact name or glob, in the model's order; each pattern must match."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen: dict[str, torch.nn.Parameter] = {}
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise CrucibleError(f"{what}: parameter names or globs are strings, got {pattern!r}")
        hits = [name for name in named if name == pattern or fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            some = ", ".join(list(named)[:6]) + (", ..." if len(named) > 6 else "")
            raise CrucibleError(f"{what}: no parameter of the model matches {pattern!r} (it has {some})")
        chosen.update((name, named[name]) for name in hits)
    return {name: chosen[name] for name in named if name in chosen}


def _state_keys(keys: Sequence[str]) -> tuple[str, ...]:
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    if any(not isinstance(k, str) or not k.isidentifier() for k in keys) or len(set(keys)) != len(keys):
        raise CrucibleError(f"optim_state: distinct state names such as 'exp_avg', got {keys!r}")
    return keys


def _field(name: str, param: torch.Tensor, every: int, rows, dims: tuple[str, ...]) -> Field:
    if not param.is_floating_point():
        raise CrucibleError(f"parameter {name!r} is {param.dtype}: only floating-point tensors are watched")
    return Field(tuple(param.shape), param.dtype, every=every, rows=rows, dims=dims)


# The axes of common layers' parameters, by torch's own argument names (nn.Embedding(num_embeddings,
# embedding_dim), nn.Linear(in_features, out_features)).
_AXES = {(torch.nn.Embedding, "weight"): ("num_embeddings", "embedding_dim"),
         (torch.nn.Linear, "weight"): ("out_features", "in_features"),
         (torch.nn.Linear, "bias"): ("out_features",)}


def _dims(model: torch.nn.Module, name: str, param: torch.Tensor) -> tuple[str, ...]:
    """Axis names of a watched parameter, shared by its gradient and optimizer state (so xarray
    lines them up): ``<module>.<axis>`` for an Embedding or Linear (``wte.num_embeddings``), else
    ``<parameter>_<i>``; prefixed by the module, so two layers' axes of different sizes never meet."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    for (kind, param_name), axes in _AXES.items():
        if isinstance(module, kind) and attr == param_name and len(axes) == param.dim():
            return tuple(f"{module_name}.{axis}" if module_name else axis for axis in axes)
    return tuple(f"{name}_{i}" for i in range(param.dim()))
