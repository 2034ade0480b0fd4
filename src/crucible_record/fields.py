"""What a run records: named fields, each a tensor of fixed shape and dtype, validated up front.

Refusals name the field and the fix, like safetensors' errors do. Under torch.distributed a
:class:`Shard` hands over one rank's rows of a field; a DTensor (FSDP2's parameters, gradients and
optimizer state) is turned into one by :func:`local_part`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import dtypes
from .errors import CrucibleError

# At most this many elements in one step of a field, or in a constant (a bound on what a run's
# metadata may claim, so that a crafted shape is refused before anything is allocated).
MAX_ELEMENTS = 1 << 40
# A name is a directory in the run (and a key segment on object stores): kept well within the
# 255-byte file name limit of common file systems.
MAX_NAME_BYTES = 200
# Names of the format's own files and folders at the group's root (compared case-insensitively).
RESERVED_NAMES = {"zarr.json", "commit.json", ".rows", ".ranks"}


@dataclass(frozen=True, eq=False)
class Field:
    """One recorded tensor.

    shape, dtype: those of the tensor passed to ``record()`` (checked exactly, never cast).
    every: record steps 0, every, 2*every, ...
    rows: keep only these rows of the first axis (selected on the tensor's device before the copy).
    dims: names of the tensor's axes (default ``<name>_0``, ``<name>_1``, ...), for xarray.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    every: int = 1
    rows: Any = None
    dims: tuple[str, ...] | None = None
    # the kept rows (int64, unique, in the order given), or None when every row is stored
    row_indices: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(s) for s in self.shape)
        except (TypeError, ValueError):
            raise CrucibleError(f"Field shape must be a tuple of ints, got {self.shape!r}") from None
        if any(s < 0 for s in shape):
            raise CrucibleError(f"Field shape must not be negative, got {shape}")
        if int(np.prod(shape, dtype=np.float64)) > MAX_ELEMENTS:
            raise CrucibleError(f"Field shape {shape} has more than {MAX_ELEMENTS} elements a step")
        object.__setattr__(self, "shape", shape)
        if not dtypes.supported(self.dtype):
            known = ", ".join(str(d) for d in dtypes.TABLE)
            raise CrucibleError(f"Field dtype {self.dtype!r} is not supported; use one of {known}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise CrucibleError(f"Field every must be an integer >= 1, got {self.every!r}")
        if self.rows is not None:
            object.__setattr__(self, "row_indices", _check_rows(self.rows, shape))
        if self.dims is not None:
            dims = tuple(self.dims)
            if len(dims) != len(shape) or not all(isinstance(d, str) and d for d in dims):
                raise CrucibleError(f"Field dims must name each of the {len(shape)} axes, got {self.dims!r}")
            object.__setattr__(self, "dims", dims)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of one recorded step on disk (the kept rows only)."""
        return self.shape if self.row_indices is None else (len(self.row_indices),) + self.shape[1:]

    @property
    def storage_dtype(self) -> str:
        return dtypes.stored_dtype(self.dtype)

    def rows_at(self, steps: int) -> int:
        """Rows of this field recorded among steps 0 .. steps-1."""
        return 0 if steps <= 0 else (steps - 1) // self.every + 1

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def describe(self) -> dict[str, Any]:
        """JSON form (FORMAT.md, "Field attributes"); row indices are stored apart, as an array."""
        return {
            "shape": list(self.shape),
            "dtype": dtypes.dtype_name(self.dtype),
            "every": self.every,
            "rows": None if self.row_indices is None else len(self.row_indices),
            "dims": list(self.dims) if self.dims else None,
        }

    def same_as(self, other: "Field") -> bool:
        return self == other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Field) or (self.row_indices is None) != (other.row_indices is None):
            return False
        return ((self.shape, self.dtype, self.every, self.dims) == (other.shape, other.dtype, other.every, other.dims)
                and (self.row_indices is None or np.array_equal(self.row_indices, other.row_indices)))

    def __hash__(self) -> int:
        return hash((self.shape, self.dtype, self.every))


@dataclass(frozen=True, eq=False)
class Shard:
    """Rows ``offset .. offset + len(tensor) - 1`` of a field's first axis, held by this rank:
    ``rec.record(step, wte=cr.Shard(local_rows, offset=first_row))``. The ranks' shards tile the
    first axis; with one process a Shard holds every row.
    """

    tensor: Any
    offset: int

    def __post_init__(self) -> None:
        if isinstance(self.offset, bool) or not isinstance(self.offset, (int, np.integer)) or self.offset < 0:
            raise CrucibleError(f"Shard offset must be an integer >= 0 (the shard's first row), got {self.offset!r}")
        object.__setattr__(self, "offset", int(self.offset))

    @property
    def rows(self) -> int:
        shape = getattr(self.tensor, "shape", None)
        return int(shape[0]) if shape else 0

    def __repr__(self) -> str:
        shape = tuple(getattr(self.tensor, "shape", ()))
        return f"Shard(rows {self.offset}..{self.offset + self.rows - 1}, shape={shape})"


def as_shard_tensor(name: str, shard: Shard, spec: Field) -> torch.Tensor:
    """The tensor of one rank's shard of `name`, checked against its Field (dtype exact, the shape
    of the field's but for the first axis, rows within the field)."""
    if not spec.shape:
        raise CrucibleError(f"field {name!r} is a scalar (shape ()): it cannot be sharded; pass the tensor itself")
    if spec.row_indices is not None:
        raise CrucibleError(f"field {name!r} keeps a subset of its rows (rows=...): a Shard (or a DTensor sharded "
                            f"on rows) of it is not supported; drop rows=, or pass the whole tensor on every rank "
                            f"(a DTensor's full_tensor())")
    value = _checked_tensor(name, shard.tensor, spec, "a Shard holds a tensor")
    if value.dim() != len(spec.shape) or tuple(value.shape[1:]) != spec.shape[1:]:
        expected = ("n",) + spec.shape[1:]
        raise CrucibleError(f"field {name!r}: Shard of shape {tuple(value.shape)} given, the field's rows have shape "
                            f"{expected} (field shape {spec.shape})")
    if shard.offset + value.shape[0] > spec.shape[0]:
        raise CrucibleError(f"field {name!r}: Shard rows {shard.offset}..{shard.offset + value.shape[0] - 1} lie past "
                            f"the field's {spec.shape[0]} rows")
    return value.detach()


def local_part(name: str, value: Any) -> Any:
    """What this rank holds of a DTensor on a 1-D mesh, without a collective: ``Shard(0)`` -> a
    :class:`Shard` of its local rows at their global offset (DTensor's own split, torch.chunk's:
    equal shards, a shorter or empty last one); ``Replicate()`` -> its local tensor (a replicated
    value, written by rank 0). Any other value is returned as it is; other placements are refused."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor can exist
    if dtensor is None or not isinstance(value, dtensor.DTensor):
        return value
    mesh, placements = value.device_mesh, tuple(value.placements)
    with torch.no_grad():
        local = value.to_local()
    if mesh.ndim == 1 and type(placements[0]) is dtensor.Replicate:
        return local
    if mesh.ndim == 1 and type(placements[0]) is dtensor.Shard and placements[0].dim == 0:
        rows, per = value.shape[0], -(-value.shape[0] // mesh.size())
        offset = min(mesh.get_local_rank() * per, rows)
        if local.dim() == value.dim() and local.shape[0] == min(per, rows - offset):
            return Shard(local, offset)
    raise CrucibleError(
        f"field {name!r}: a DTensor placed {placements} on a {mesh.ndim}-D mesh of shape {tuple(mesh.shape)} is "
        f"not recorded (only Shard(0) or Replicate() on a 1-D mesh); redistribute it first "
        f"(x.redistribute(x.device_mesh, [Shard(0)])) or pass x.full_tensor()")


def _check_rows(rows: Any, shape: tuple[int, ...]) -> np.ndarray:
    if not shape:
        raise CrucibleError("Field rows needs a tensor with at least one axis")
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu().numpy()
    array = np.asarray(rows)
    if array.dtype == bool:
        if array.shape != (shape[0],):
            raise CrucibleError(f"Field rows mask has shape {array.shape}, expected ({shape[0]},)")
        array = np.flatnonzero(array)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise CrucibleError("Field rows must be a 1-D list of row indices (or a boolean mask)")
    array = array.astype(np.int64)
    if array.size == 0:
        raise CrucibleError("Field rows is empty: keep at least one row")
    if array.min() < 0 or array.max() >= shape[0]:
        raise CrucibleError(f"Field rows must lie in [0, {shape[0]}), got {array.min()}..{array.max()}")
    if np.unique(array).size != array.size:  # any order, stored as given (like W[rows]); repeats are a mistake
        raise CrucibleError("Field rows must be without repeats (np.unique(rows) keeps each once)")
    return array


def check_name(name: Any) -> str:
    """Field and constant names become array names in the store: plain, unique, not reserved."""
    if not isinstance(name, str) or not name:
        raise CrucibleError(f"field name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name:
        raise CrucibleError(f"field name {name!r} must not contain '/'")
    if name.startswith(".") or name.startswith("__"):
        raise CrucibleError(f"field name {name!r} must not start with '.' or '__' (reserved by the format)")
    if name.lower() in RESERVED_NAMES or any(ord(c) < 32 for c in name):
        raise CrucibleError(f"field name {name!r} is reserved by the format (its files: "
                            f"{', '.join(sorted(RESERVED_NAMES))}) or has control characters")
    if name.endswith(".partial"):
        raise CrucibleError(f"field name {name!r} must not end with '.partial' (an interrupted write's temporary file)")
    if (size := len(name.encode("utf-8", "surrogatepass"))) > MAX_NAME_BYTES:
        raise CrucibleError(f"field name {name[:20]!r}... is {size} bytes "
                            f"long in UTF-8; names are at most {MAX_NAME_BYTES} bytes (they are directory names)")
    return name


def check_fields(fields: Mapping[str, Field]) -> dict[str, Field]:
    if not isinstance(fields, Mapping) or not fields:
        raise CrucibleError("fields must be a non-empty dict of name -> cr.Field(...)")
    checked: dict[str, Field] = {}
    for name, spec in fields.items():
        check_name(name)
        if not isinstance(spec, Field):
            raise CrucibleError(f"field {name!r} must be a cr.Field(shape, dtype), got {type(spec).__name__}")
        if name.lower() in {n.lower() for n in checked}:
            raise CrucibleError(f"field name {name!r} is given twice (names are case-insensitive on some disks)")
        checked[name] = spec
    return checked


def field_from_description(description: Any, rows: np.ndarray | None) -> Field:
    """The inverse of :meth:`Field.describe` (rows read from the run's row array), strictly typed:
    a run's metadata is read as written, never coerced (an ``every`` of 2.5 or "2" is damage)."""
    if not isinstance(description, Mapping):
        raise CrucibleError(f"description {description!r} is not an object")
    shape, every, kept, dims = (description.get(k) for k in ("shape", "every", "rows", "dims"))
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise CrucibleError(f"shape {shape!r} is not a list of integers >= 0")
    if not _is_int(every) or every < 1:
        raise CrucibleError(f"every {every!r} is not an integer >= 1")
    if kept is not None and (not _is_int(kept) or kept < 1 or not shape or kept > shape[0]):
        raise CrucibleError(f"rows {kept!r} is not null or a count of the first axis's rows")
    if rows is not None and len(rows) != kept:
        raise CrucibleError(f"rows says {kept} rows are kept, its row index array holds {len(rows)}")
    if dims is not None and (not isinstance(dims, list) or not all(isinstance(d, str) for d in dims)):
        raise CrucibleError(f"dims {dims!r} is not null or a list of names")
    dtype = dtypes.dtype_from_name(description.get("dtype"))
    return Field(tuple(shape), dtype, every=every, rows=rows, dims=tuple(dims) if dims else None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def as_tensor(name: str, value: Any, spec: Field) -> torch.Tensor:
    """The tensor given for `name`, checked against its Field: exact shape and dtype, no cast."""
    value = _checked_tensor(name, value, spec, "pass a tensor", f" (e.g. torch.tensor(x, dtype={spec.dtype}))")
    if tuple(value.shape) != spec.shape:
        raise CrucibleError(f"field {name!r}: shape {tuple(value.shape)} given, the field records {spec.shape}")
    return value.detach()


def _checked_tensor(name: str, value: Any, spec: Field, expected: str, hint: str = "") -> torch.Tensor:
    """`value` as a tensor (a numpy array, or a Python number for a () field) of the field's exact dtype."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if spec.shape == () and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = _python_number(name, value, spec.dtype)
    if not isinstance(value, torch.Tensor):
        raise CrucibleError(f"field {name!r}: {expected}, got {type(value).__name__}{hint}")
    if value.dtype != spec.dtype:
        raise CrucibleError(f"field {name!r}: dtype {value.dtype} given, the field records {spec.dtype} "
                            f"(cast it yourself: .to({spec.dtype}))")
    return value


def stored_dims(name: str, spec: Field) -> tuple[str, ...]:
    """The stored array's axis names. The step axis is 'step_every_K' for a field recorded every K > 1
    steps, so that xarray.open_zarr can put fields of different cadences in one Dataset."""
    dims = spec.dims or tuple(f"{name}_{i}" for i in range(len(spec.shape)))
    if spec.row_indices is not None:
        dims = (f"{name}_row",) + dims[1:]
    return ("step" if spec.every == 1 else f"step_every_{spec.every}",) + dims


def _python_number(name: str, value: int | float, dtype: torch.dtype) -> torch.Tensor:
    """A Python number for a () field, converted only when the field's dtype holds it exactly."""
    if dtype == torch.bool or (isinstance(value, float) and not dtype.is_floating_point):
        raise CrucibleError(f"field {name!r}: a Python {type(value).__name__} {value!r} given, the field records "
                            f"{dtype} (pass torch.tensor(x, dtype={dtype}))")
    try:
        tensor = torch.tensor(value, dtype=dtype)
    except (RuntimeError, OverflowError):
        raise CrucibleError(f"field {name!r}: {value!r} does not fit in {dtype}") from None
    if tensor.item() != value and not math.isnan(value):  # (a float dtype holds NaN as NaN)
        raise CrucibleError(f"field {name!r}: {value!r} is not exactly a {dtype} (it would be stored as "
                            f"{tensor.item()!r}); cast it yourself: torch.tensor(x, dtype={dtype})")
    return tensor
