"""A structural check of a GGUF file before anything else reads it: magic and version, every
metadata key/value (lengths and counts within the file, known value types, unique UTF-8 keys,
arrays nested at most 4 deep) and every tensor record (at most 4 dims, a known type, whole blocks,
aligned offsets, data inside the file, unique names). The gguf package trusts these fields and
fails on damage with IndexError/KeyError or huge allocations; this turns each into a ValueError
naming the file, the field and the byte offset. Used by loading.load_model; tested by
tests/test_fuzz.py (damaged GGUF files)."""
from __future__ import annotations

import math
import mmap
import os
import struct
from typing import Union

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DEPTH = 4
_MAX_DIMS = 4
_MAX_ELEMENTS = 1 << 48


class _Cursor:
    def __init__(self, buf: mmap.mmap, name: str, endian: str):
        self.buf, self.name, self.endian, self.pos, self.size = buf, name, endian, 0, len(buf)

    def fail(self, what: str) -> ValueError:
        return ValueError(f"source: {self.name} is not a valid GGUF file: {what} (at byte {self.pos} of {self.size})")

    def take(self, n: int, what: str) -> int:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes, {self.size - self.pos} are left (truncated or damaged)")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str) -> int:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(self.endian + fmt, self.buf, start)[0]

    def string(self, what: str, decode: bool = False) -> str:
        n = self.unpack("Q", f"the length of {what}")
        start = self.take(n, what)
        if not decode:
            return ""
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[vtype], what)
        elif vtype == _STRING:
            self.string(what)
        elif vtype == _ARRAY:
            if depth >= _MAX_DEPTH:
                raise self.fail(f"{what}: arrays nested deeper than {_MAX_DEPTH}")
            etype = self.unpack("I", f"the element type of {what}")
            count = self.unpack("Q", f"the length of {what}")
            if etype in _SCALAR_SIZES:
                self.take(count * _SCALAR_SIZES[etype], f"{what} ({count} elements)")
            elif etype in (_STRING, _ARRAY):
                if count > (self.size - self.pos) // 8:  # every element holds at least a u64
                    raise self.fail(f"{what} claims {count} elements, more than the file can hold")
                for i in range(count):
                    self.value(etype, f"{what}[{i}]", depth + 1)
            else:
                raise self.fail(f"{what} has unknown element type {etype}")
        else:
            raise self.fail(f"{what} has unknown value type {vtype}")


def check_gguf(path: Union[str, os.PathLike]) -> dict[str, list[int]]:
    """Raises ValueError if `path` is not a structurally sound GGUF file (see the module doc);
    returns {tensor name: dims} (GGUF order: the fastest-moving dim first)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    name = os.fspath(path)
    with open(name, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise ValueError(f"source: {name} is not a valid GGUF file: {os.fstat(f.fileno()).st_size} bytes, "
                             "shorter than a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError(f"source: {name} is not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
            endian = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"  # as the gguf package decides
            c = _Cursor(buf, name, endian)
            c.pos = 4
            version = c.unpack("I", "the version")
            if version not in (2, 3):
                raise c.fail(f"version {version} (2 and 3 are read)")
            n_tensors = c.unpack("Q", "the tensor count")
            n_kv = c.unpack("Q", "the metadata count")
            if n_kv > c.size // 12 or n_tensors > c.size // 24:
                raise c.fail(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in the file")
            keys, alignment = set(), 32
            for i in range(n_kv):
                key = c.string(f"metadata key {i}", decode=True)
                if key in keys:
                    raise c.fail(f"metadata key {key!r} appears twice")
                keys.add(key)
                vtype = c.unpack("I", f"the type of {key!r}")
                start = c.pos
                c.value(vtype, f"metadata {key!r}")
                if key == "general.alignment":
                    alignment = struct.unpack_from(endian + "I", buf, start)[0] if vtype == _UINT32 else 0
                    if alignment <= 0 or alignment & (alignment - 1):
                        raise c.fail(f"general.alignment must be a power-of-two uint32, got type {vtype}, "
                                     f"value {alignment}")
            tensors, names = [], set()
            for i in range(n_tensors):
                tname = c.string(f"tensor name {i}", decode=True)
                if tname in names:
                    raise c.fail(f"tensor {tname!r} appears twice")
                names.add(tname)
                n_dims = c.unpack("I", f"the dim count of tensor {tname!r}")
                if not 1 <= n_dims <= _MAX_DIMS:
                    raise c.fail(f"tensor {tname!r} has {n_dims} dims (1 to {_MAX_DIMS})")
                dims = [c.unpack("Q", f"a dim of tensor {tname!r}") for _ in range(n_dims)]
                ttype = c.unpack("I", f"the type of tensor {tname!r}")
                offset = c.unpack("Q", f"the data offset of tensor {tname!r}")
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
                except (ValueError, KeyError):
                    raise c.fail(f"tensor {tname!r} has unknown type {ttype}") from None
                numel = math.prod(dims)
                if not 0 < numel <= _MAX_ELEMENTS or dims[0] % block:
                    raise c.fail(f"tensor {tname!r} has dims {dims}, not whole blocks of {block} elements")
                tensors.append((tname, offset, numel // block * type_size, dims))
            data_start = -(-c.pos // alignment) * alignment
            for tname, offset, nbytes, _ in tensors:
                if offset % alignment or data_start + offset + nbytes > c.size:
                    raise c.fail(f"tensor {tname!r}: {nbytes} bytes at data offset {offset} lie outside the file "
                                 f"or off the {alignment}-byte alignment")
            return {tname: dims for tname, _, _, dims in tensors}


def block_count(tensor_names) -> int:
    """The number of transformer blocks the tensors belong to (distinct N in blk.N.*)."""
    return len({n.split(".")[1] for n in tensor_names if n.startswith("blk.") and n.count(".") >= 2})
