"""A GGUF file read once: its metadata and tensor table parsed with struct from a memory map (the
gguf package's GGUFReader builds numpy views for every one of the 49k vocabulary strings and takes
seconds), its tensors handed out one at a time as numpy arrays in GGUFReader's layout, and the
transformers config dict made from the metadata. Reference: transformers' load_gguf_checkpoint and
the gguf package's GGUFReader; tests/test_loading.py checks the config and every tensor against them."""
from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np

_VERSIONS = (2, 3)
# Fixed-size metadata value types (GGUF spec): u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# Architectures whose transformers config comes from the generic mapping alone (load_gguf_checkpoint
# has no special case for them); any other architecture goes through load_gguf_checkpoint itself.
FAST_CONFIG_ARCHITECTURES = frozenset({"llama"})


class TensorInfo(NamedTuple):
    name: str
    dims: tuple[int, ...]   # ggml order: fastest-moving first
    ggml_type: int
    offset: int             # from the start of the data section


class GgufFile:
    """metadata: {key: value} (arrays as lists); tensors: [TensorInfo] in file order. Every size and
    offset is checked against the file before it is used: a truncated or corrupt file raises a
    ValueError naming the problem."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise ValueError(f"{self.path.name}: not a GGUF file ({size} bytes)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._map
        if buf[:4] != b"GGUF":
            raise ValueError(f"{self.path.name}: not a GGUF file (no GGUF magic)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in _VERSIONS:
            raise ValueError(f"{self.path.name}: GGUF version {version} is not supported (only 2 and 3)")
        self._pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (kind,) = self._unpack("<I")
            self.metadata[key] = self._value(kind)
        self.tensors: list[TensorInfo] = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            if n_dims > 8:
                raise ValueError(f"{self.path.name}: tensor {name} has {n_dims} dimensions (corrupt file?)")
            dims = self._unpack(f"<{n_dims}Q")
            ggml_type, offset = self._unpack("<IQ")
            self.tensors.append(TensorInfo(name, tuple(dims), ggml_type, offset))
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            raise ValueError(f"{self.path.name}: general.alignment is {alignment!r}")
        self.data_start = -(-self._pos // alignment) * alignment

    # ---- parsing -----------------------------------------------------------------------------
    def _unpack(self, fmt: str) -> tuple:
        n = struct.calcsize(fmt)
        if self._pos + n > len(self._map):
            raise ValueError(f"{self.path.name}: the file ends inside its metadata (truncated download?)")
        out = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += n
        return out

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        if self._pos + n > len(self._map):
            raise ValueError(f"{self.path.name}: the file ends inside its metadata (truncated download?)")
        s = self._map[self._pos:self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, kind: int) -> Any:
        if kind in _SCALAR:
            return self._unpack(_SCALAR[kind])[0]
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._unpack("<IQ")
            if item in _SCALAR:
                fmt = _SCALAR[item][1]
                if self._pos + count * struct.calcsize(fmt) > len(self._map):
                    raise ValueError(f"{self.path.name}: the file ends inside its metadata (truncated download?)")
                return list(self._unpack(f"<{count}{fmt}"))
            if count > len(self._map):
                raise ValueError(f"{self.path.name}: an array claims {count} items (corrupt file?)")
            return [self._value(item) for _ in range(count)]
        raise ValueError(f"{self.path.name}: metadata value type {kind} is not a GGUF type (corrupt file?)")

    # ---- tensors -----------------------------------------------------------------------------
    def array(self, info: TensorInfo) -> np.ndarray:
        """The tensor's stored data as GGUFReader.tensors[i].data holds it: a typed array in torch
        order for float types, for block-quantized types uint8 with the last dimension in bytes."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        try:
            qtype = GGMLQuantizationType(info.ggml_type)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ValueError(f"{self.path.name}: tensor {info.name} has unknown ggml type {info.ggml_type}") from None
        shape = list(reversed(info.dims))
        plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                 GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                 GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                 GGMLQuantizationType.I64: np.int64}.get(qtype)
        if plain is not None:
            dtype, nbytes = np.dtype(plain), int(np.prod(shape)) * np.dtype(plain).itemsize
        else:
            if shape and shape[-1] % block:
                raise ValueError(f"{self.path.name}: tensor {info.name}: row length {shape[-1]} is not a "
                                 f"multiple of {qtype.name}'s block of {block}")
            if shape:
                shape[-1] = shape[-1] // block * block_bytes
            dtype, nbytes = np.dtype(np.uint8), int(np.prod(shape))
        start = self.data_start + info.offset
        if start + nbytes > len(self._map):
            raise ValueError(f"{self.path.name}: tensor {info.name} lies outside the file (truncated download?)")
        return np.frombuffer(self._map, dtype=dtype, count=nbytes // dtype.itemsize, offset=start).reshape(shape)

    def dequantized(self) -> Iterator[tuple[str, np.ndarray]]:
        """(GGUF name, float32 array) per tensor, in file order: Q4_0, Q4_1 and Q8_0 blocks decoded
        here (the gguf package's float32 operations in the same order, so the same bits, on the
        whole tensor at once), every other type by the gguf package."""
        from gguf import GGMLQuantizationType, dequantize
        for info in self.tensors:
            qtype = GGMLQuantizationType(info.ggml_type)
            data = self.array(info)
            if qtype.name in _DECODERS and data.ndim >= 1:
                yield info.name, _DECODERS[qtype.name](data)
                continue
            try:
                weights = dequantize(data, qtype)
            except NotImplementedError as exc:
                raise ValueError(f"source: GGUF tensor {info.name} has type {qtype.name}, which the installed "
                                 f"gguf package cannot dequantize ({exc})") from exc
            yield info.name, weights if weights.flags.writeable else weights.copy()

    # ---- the transformers config -------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ValueError(f"{self.path.name}: no general.architecture in the GGUF metadata")
        return arch

    def has_fast_config(self) -> bool:
        name = self.metadata.get("general.name", "")
        return self.architecture in FAST_CONFIG_ARCHITECTURES and "mistral" not in str(name)

    def transformers_config(self) -> dict[str, Any]:
        """The config dict transformers' load_gguf_checkpoint(path)["config"] returns, for an
        architecture in FAST_CONFIG_ARCHITECTURES: its generic mapping applied to this metadata."""
        from transformers import modeling_gguf_pytorch_utils as hf_gguf
        if not self.has_fast_config():
            raise ValueError(f"{self.path.name}: architecture {self.architecture!r} needs transformers' own GGUF parser")
        mapping = hf_gguf.GGUF_TO_TRANSFORMERS_MAPPING["config"]
        config: dict[str, Any] = {"tie_word_embeddings": all(t.name != "output.weight" for t in self.tensors)}
        config.update(getattr(hf_gguf, "GGUF_CONFIG_DEFAULTS_MAPPING", {}).get(self.architecture, {}))
        for key, value in self.metadata.items():
            prefix, _, rest = key.partition(".")
            if isinstance(value, list) and len(value) == 1:
                value = value[0]  # as load_gguf_checkpoint does
            renamed = mapping.get(prefix, {}).get(rest)
            if renamed is not None and renamed != -1:
                config[renamed] = value
        if "vocab_size" not in config and isinstance(self.metadata.get("tokenizer.ggml.tokens"), list):
            config["vocab_size"] = len(self.metadata["tokenizer.ggml.tokens"])
        return config


# ---- block decoders (ggml's block layouts; reference: the gguf package's quants.py) ---------------
# Whole-tensor numpy: the gguf package runs the same operations over groups of 16 rows (tens of
# thousands of small numpy calls per model). numpy rather than torch: single-threaded, so it does
# not wake torch's OpenMP pool for each small tensor.

def _blocks(data: np.ndarray, block_bytes: int) -> np.ndarray:
    return data.reshape(-1, block_bytes)


def _scale(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 scale stored at byte `at` of each block, as float32 (blocks, 1)."""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 4-bit order: a block's low nibbles are its first half, the high nibbles its second."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _decode_q4_0(data: np.ndarray) -> np.ndarray:
    blocks = _blocks(data, 18)
    q = (_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)).astype(np.float32)
    return (_scale(blocks, 0) * q).reshape(*data.shape[:-1], -1)


def _decode_q4_1(data: np.ndarray) -> np.ndarray:
    blocks = _blocks(data, 20)
    q = _nibbles(blocks[:, 4:]).astype(np.float32)
    return ((_scale(blocks, 0) * q) + _scale(blocks, 2)).reshape(*data.shape[:-1], -1)


def _decode_q8_0(data: np.ndarray) -> np.ndarray:
    blocks = _blocks(data, 34)
    x = blocks[:, 2:].view(np.int8).astype(np.float32)
    return (x * _scale(blocks, 0)).reshape(*data.shape[:-1], -1)


_DECODERS = {"Q4_0": _decode_q4_0, "Q4_1": _decode_q4_1, "Q8_0": _decode_q8_0}


def block_count(tensor_names) -> int:
    """The number of transformer blocks the tensors belong to (distinct N in blk.N.*)."""
    return len({n.split(".")[1] for n in tensor_names if n.startswith("blk.") and n.count(".") >= 2})
