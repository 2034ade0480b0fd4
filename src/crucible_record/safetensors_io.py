"""The one place that writes and parses a safetensors header.

The safetensors library takes every tensor in memory to write and gives neither byte offsets nor,
from bytes, the metadata. :func:`parse_header` refuses in one line what safetensors' reader refuses.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import dtypes
from .errors import CrucibleError

MAX_HEADER = 100_000_000  # safetensors' own limit on N
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class Header:
    """A parsed header: where each tensor's bytes are, and the metadata."""

    raw: bytes  # length prefix + JSON, as in the file
    entries: dict[str, tuple[str, list[int], int, int]]  # name -> (dtype, shape, begin, end) in the data
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return len(self.raw)


def header(tensors: Mapping[str, tuple[str, list[int], int]],
           metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[str]]:
    """Header bytes (length prefix included) and the order the tensors' data must follow.

    tensors: name -> (safetensors dtype, shape, number of bytes). Byte for byte ``save_file``'s
    layout when there is no metadata (save_file writes metadata keys in a random order; here sorted).
    """
    order = sorted(tensors, key=lambda name: (-dtypes.SAFETENSORS_ORDER.index(tensors[name][0]), name))
    layout: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise CrucibleError("safetensors metadata holds strings only (encode other values as JSON)")
        layout[METADATA_KEY] = dict(sorted(metadata.items()))
    offset = 0
    for name in order:
        dtype, shape, nbytes = tensors[name]
        layout[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(layout, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text, order


def parse_header(read: Callable[[int], bytes], size: int, where: str) -> Header:
    """Parse and check the header of a safetensors file of `size` bytes whose first bytes `read(n)`
    returns; every refusal is one CrucibleError."""

    def bad(why: str) -> CrucibleError:
        return CrucibleError(f"{where} is not a safetensors file ({why})")

    prefix = read(8)
    if len(prefix) < 8:
        raise bad(f"only {size} bytes")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER or 8 + n > size:
        raise bad(f"its first 8 bytes give a header of {n} bytes")
    text = read(n)
    if len(text) != n:
        raise bad("it ends inside its header")
    try:
        layout = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("its header is not JSON") from None
    if not isinstance(layout, dict):
        raise bad("its header is not a JSON object")
    metadata = layout.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("its __metadata__ is not an object of strings")
    entries = {}
    for name, entry in layout.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
            ok = (dtype in dtypes.SAFETENSORS_ITEMSIZE
                  and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (*shape, begin, end))
                  and end - begin == math.prod(shape) * dtypes.SAFETENSORS_ITEMSIZE[dtype])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"bad header entry for tensor {name!r}")
        entries[name] = (dtype, shape, begin, end)
    position = 0
    for begin, end in sorted(entry[2:] for entry in entries.values()):
        if begin != position:
            raise bad("tensor data overlaps or leaves gaps")
        position = end
    if 8 + n + position != size:
        raise bad(f"its header describes {position} bytes of data, the file holds {size - 8 - n}: truncated or padded")
    return Header(prefix + text, entries, metadata)


def parse_bytes(data: bytes, where: str) -> Header:
    """:func:`parse_header` of a file held whole."""
    return parse_header(io.BytesIO(data).read, len(data), where)
