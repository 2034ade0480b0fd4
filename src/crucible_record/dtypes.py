"""The one dtype table: how each torch dtype a field may have is stored, filled and exported.

Adding a dtype (float8, say) is one row here; everything else asks this module instead of testing
for bfloat16 itself. bf16 has no numpy or zarr 3.1 dtype, so its bits are stored as uint16 (the
array's ``encoding`` attribute says so) and numpy sees its values decoded exactly to float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import CrucibleError

BF16_NAN_BITS = 0x7FC0  # bf16 NaN: unwritten bf16 rows read as NaN, never as 0
BITS_ENCODING = "bfloat16 bits stored as uint16"  # the array attribute that says so


@dataclass(frozen=True)
class Storage:
    """How one torch dtype lives on disk."""

    name: str  # in the run's metadata (Field.describe)
    stored: str  # the numpy / zarr dtype of the array
    fill: Any  # an unwritten row reads as this (NaN for floats: never mistaken for data)
    safetensors: str  # the dtype name in a safetensors header
    bits_of: torch.dtype | None = None  # stored as the bits of this other dtype's values (bf16 -> uint16)
    shown_as: torch.dtype | None = None  # numpy has no such dtype: numpy sees its values exactly as this one


_NAN = float("nan")
TABLE: dict[torch.dtype, Storage] = {
    torch.bfloat16: Storage("bfloat16", "uint16", BF16_NAN_BITS, "BF16", bits_of=torch.uint16,
                              shown_as=torch.float32),
    torch.float16: Storage("float16", "float16", _NAN, "F16"),
    torch.float32: Storage("float32", "float32", _NAN, "F32"),
    torch.float64: Storage("float64", "float64", _NAN, "F64"),
    torch.int8: Storage("int8", "int8", 0, "I8"),
    torch.int16: Storage("int16", "int16", 0, "I16"),
    torch.int32: Storage("int32", "int32", 0, "I32"),
    torch.int64: Storage("int64", "int64", 0, "I64"),
    torch.uint8: Storage("uint8", "uint8", 0, "U8"),
    torch.bool: Storage("bool", "bool", False, "BOOL"),
}
_BY_NAME = {s.name: dtype for dtype, s in TABLE.items()}


def supported(dtype: Any) -> bool:
    return dtype in TABLE


def dtype_name(dtype: torch.dtype) -> str:
    return TABLE[dtype].name


def dtype_from_name(name: Any) -> torch.dtype:
    if name not in _BY_NAME:
        raise CrucibleError(f"unknown field dtype {name!r} (this crucible-record knows {', '.join(_BY_NAME)})")
    return _BY_NAME[name]


def stored_dtype(dtype: torch.dtype) -> str:
    return TABLE[dtype].stored


def fill_value(dtype: torch.dtype) -> Any:
    """What an unwritten row reads as: NaN for floats (bf16 NaN bits for bf16), else 0/False."""
    return TABLE[dtype].fill


def encoding_attribute(dtype: torch.dtype) -> dict[str, str]:
    """The ``encoding`` attribute of an array holding `dtype` ({} when stored as itself)."""
    return {"encoding": BITS_ENCODING} if TABLE[dtype].bits_of is not None else {}


def to_stored(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as the values its array stores (bf16 -> its uint16 bits; no copy)."""
    bits = TABLE[tensor.dtype].bits_of
    return tensor.view(bits) if bits is not None else tensor


def from_stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored values back as `dtype` (uint16 bits -> bf16; no copy)."""
    return tensor.view(dtype) if TABLE[dtype].bits_of is not None else tensor


def stored_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's stored values as numpy (no copy)."""
    return to_stored(tensor).numpy()


def stored_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the values an array of `dtype` stores (bf16 -> uint16; else itself)."""
    return TABLE[dtype].bits_of or dtype


def shown_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of :func:`decode_stored`'s values (bf16: float32; the rest: as stored)."""
    shown = TABLE[dtype].shown_as
    return np.dtype(TABLE[dtype].stored) if shown is None else torch.empty(0, dtype=shown).numpy().dtype


def decode_stored(stored: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Stored values of a `dtype` array as numpy values; bf16 decoded exactly to float32."""
    shown = TABLE[dtype].shown_as
    if shown is None:
        return stored
    stored = np.ascontiguousarray(stored)
    if not stored.flags.writeable:  # torch.from_numpy warns on read-only arrays
        stored = stored.copy()
    return torch.from_numpy(stored).view(dtype).to(shown).numpy()


def numpy_values(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as numpy: bf16 (no numpy dtype) exactly as float32, the rest as they are."""
    shown = TABLE[tensor.dtype].shown_as if tensor.dtype in TABLE else None
    return tensor.to(shown).numpy() if shown is not None else tensor.numpy()


def safetensors_name(dtype: torch.dtype) -> str:
    return TABLE[dtype].safetensors if dtype in TABLE else _SAFETENSORS_EXTRA[dtype]


# Dtypes a safetensors file may hold beyond the fields' (the notebook's W is saved as its uint16 bits).
_SAFETENSORS_EXTRA = {torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}

# safetensors' dtype names in the order of its Dtype enum: ``save_file`` lays tensors out by this
# order, last first (then by name), and so does crucible_record.safetensors_io. F4 and F6 are sub-byte.
SAFETENSORS_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16",
                     "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
# bytes per element of each whole-byte safetensors dtype
SAFETENSORS_ITEMSIZE = {name: size for names, size in ((("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"), 1),
                                                        (("I16", "U16", "F16", "BF16"), 2),
                                                        (("I32", "U32", "F32"), 4),
                                                        (("C64", "F64", "I64", "U64"), 8))
                        for name in names}
