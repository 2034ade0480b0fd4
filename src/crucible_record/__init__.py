"""crucible-record: record any tensors of a training run, every step, into a Zarr v3 run; read lazily.

    import crucible_record as cr
    with cr.record("runs/x", {"wte": cr.Field((V, H), torch.bfloat16)}) as rec:
        rec.record(step, wte=model.wte.weight)
    cr.open("runs/x")["wte"][10:20, 5]

Under torch.distributed, every rank calls ``cr.record`` and passes its rows of a split field as
``cr.Shard(rows, offset=first_row)``; a plain tensor is replicated (rank 0 writes it).

The names below are imported on first use (PEP 562): the `crucible-record` command then starts
without importing torch and zarr (1-2 s), so its first line comes at once.
"""

import importlib

__version__ = "0.2.0"

# public name -> the module that defines it (watcher.py, not watch.py: importing a submodule named
# `watch` would set the package's attribute `watch` to that module, hiding the function)
_WHERE = {
    "Layout": "codecs",
    "CrucibleError": "errors", "RecorderError": "errors",
    "Field": "fields", "Shard": "fields",
    "LazyField": "reader", "Run": "reader",
    "record": "api",
    "Recorder": "writer",
    "Watch": "watcher", "watch": "watcher",
}


def __getattr__(name):
    if name not in _WHERE:  # a submodule (cr.reader, ...), as an eager import made them attributes
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'crucible_record' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(__all__)


def open(path):  # noqa: A001 - the public name is cr.open
    """Open a run for lazy reading (committed steps only): a generic :class:`Run` (``t["W"]``,
    ``t.fields``) whatever recorded it. A Crucible-3 run's notebook names (``t.W``, ``t.h_mean``)
    come from ``crucible_record.crucible3.open_trajectory``, above this layer."""
    from .reader import Run

    return Run(path)


__all__ = ["CrucibleError", "Field", "Layout", "LazyField", "Recorder", "RecorderError", "Run", "Shard",
           "Watch", "open", "record", "watch", "__version__"]
