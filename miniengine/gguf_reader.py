"""Read a GGUF file's container: its metadata and where each tensor's bytes lie. Nothing is dequantized here.

    magic "GGUF" | version | tensor count | metadata count
    metadata     key (string), value type, value      (scalars, strings, arrays of either)
    tensor info  name, dims (innermost first), ggml type, offset into the data section
    padding to `general.alignment` (32), then the data section: every tensor's raw bytes

`gguf.GGUFReader` reads the same thing but builds a numpy view for every part of every field: on SmolLM2's
49,152 tokens and 48,900 merges that is four seconds of a cold start. This reader walks the header once with
`struct` and maps the file (copy-on-write, never written); a tensor's data is a uint8 view of it, one row of
bytes per matrix row.
Any length or offset that points outside the file raises `ValueError` (the loader names the file).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # as GGUF lists it: innermost dim first
    data: np.ndarray  # raw bytes, uint8 [outer dims..., bytes of one row]


class _Cursor:
    """Little-endian reads from a buffer, each checked against its end."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, size: int) -> memoryview:
        if size < 0 or self.pos + size > len(self.buf):
            raise ValueError(f"a read of {size} bytes at offset {self.pos} runs past the end ({len(self.buf)} bytes)")
        start, self.pos = self.pos, self.pos + size
        return self.buf[start : self.pos]

    def scalar(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return str(self.take(self.scalar("Q")), "utf-8")

    def strings(self, count: int) -> list[str]:
        buf, pos, end, length = self.buf, self.pos, len(self.buf), struct.Struct("<Q").unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > end:
                raise ValueError(f"a string's length at offset {pos} runs past the end ({end} bytes)")
            (size,) = length(buf, pos)
            pos += 8
            if pos + size > end:
                raise ValueError(f"a read of {size} bytes at offset {pos} runs past the end ({end} bytes)")
            out.append(str(buf[pos : pos + size], "utf-8"))
            pos += size
        self.pos = pos
        return out

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("I"), self.scalar("Q")
            if item in _SCALARS:  # one numpy read for the whole array
                fmt = _SCALARS[item]
                return np.frombuffer(self.take(count * struct.calcsize(fmt)), "<" + fmt).tolist()
            if count > len(self.buf) - self.pos:  # every element takes at least one byte
                raise ValueError(f"an array of {count} elements cannot fit in the file")
            if item == _STRING:  # a vocabulary, merges: ~100,000 strings, read in one loop
                return self.strings(count)
            return [self.value(item) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {kind}")


@dataclass
class GGUFFile:
    path: str
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """The metadata (key -> Python value) and tensors of a GGUF file, its data mapped, not read."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ValueError("the file is empty")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # torch wants writable
    cursor = _Cursor(memoryview(mapped))
    if bytes(cursor.take(4)) != GGUF_MAGIC:
        raise ValueError("GGUF magic invalid")
    version = cursor.scalar("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are; big-endian files are not)")
    num_tensors, num_kv = cursor.scalar("Q"), cursor.scalar("Q")
    metadata: dict[str, Any] = {}
    for _ in range(num_kv):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("I"))
    infos = []
    for _ in range(num_tensors):
        name = cursor.string()
        dims = tuple(cursor.scalar("Q") for _ in range(cursor.scalar("I")))
        infos.append((name, dims, GGMLQuantizationType(cursor.scalar("I")), cursor.scalar("Q")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-cursor.pos // alignment) * alignment
    raw = np.frombuffer(mapped, dtype=np.uint8)
    tensors, names = [], set()
    for name, dims, kind, offset in infos:
        if name in names:
            raise ValueError(f"tensor {name!r} appears twice")
        names.add(name)
        block, block_bytes = GGML_QUANT_SIZES[kind]
        if not dims or dims[0] % block:
            raise ValueError(f"tensor {name!r}: rows of {dims[:1]} elements are not whole {kind.name} blocks")
        row_bytes = dims[0] // block * block_bytes
        nbytes = row_bytes * int(np.prod(dims[1:], dtype=np.int64))
        start = data_start + offset
        if start + nbytes > size:
            raise ValueError(f"tensor {name!r} ends at byte {start + nbytes}, past the end of the file ({size})")
        data = raw[start : start + nbytes].reshape(*reversed(dims[1:]), row_bytes)
        tensors.append(GGUFTensor(name, kind, dims, data))
    return GGUFFile(path, metadata, tensors)
