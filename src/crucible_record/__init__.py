"""crucible-record: record any tensors of a training run, every step, into a Zarr v3 run; read lazily.

    import crucible_record as cr
    with cr.record("runs/x", {"wte": cr.Field((V, H), torch.bfloat16)}) as rec:
        rec.record(step, wte=model.wte.weight)
    cr.open("runs/x")["wte"][10:20, 5]

Under torch.distributed, every rank calls ``cr.record`` and passes its rows of a split field as
``cr.Shard(rows, offset=first_row)``; a plain tensor is replicated (rank 0 writes it).
"""

__version__ = "0.2.0"

from .codecs import Layout  # noqa: E402
from .errors import CrucibleError, RecorderError  # noqa: E402
from .fields import Field, Shard  # noqa: E402
from .reader import LazyField, Run  # noqa: E402
from .api import record  # noqa: E402
from .writer import Recorder  # noqa: E402
from .watch import Watch, watch  # noqa: E402


def open(path):  # noqa: A001 - the public name is cr.open
    """Open a run for lazy reading (committed steps only): a generic :class:`Run` (``t["W"]``,
    ``t.fields``) whatever recorded it. A Crucible-3 run's notebook names (``t.W``, ``t.h_mean``)
    come from ``crucible_record.crucible3.open_trajectory``, above this layer."""
    return Run(path)


__all__ = ["CrucibleError", "Field", "Layout", "LazyField", "Recorder", "RecorderError", "Run", "Shard",
           "Watch", "open", "record", "watch", "__version__"]
