"""QuantState: everything needed to dequantize a packed 4-bit tensor, and its bitsandbytes
state-dict form. ``to_dict("weight.")`` writes exactly the keys (and the same JSON bytes)
that bitsandbytes writes beside a packed ``weight``; ``from_dict`` reads them back, also
from files bitsandbytes wrote, validating every key, dtype, size and JSON field.
Tested by tests/test_quant_state.py and tests/test_bnb_compat.py."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from ..ops import FLOAT_DTYPES, Weight4bit, check_blocksize, codebook, num_blocks, packed_bytes

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
_STATE_KEY = "quant_state.bitsandbytes__"


@dataclasses.dataclass(eq=False)  # tensors have no single truth value: compare fields yourself
class QuantState:
    """Metadata of one quantized tensor (the packed data itself is kept by the caller).

    absmax is fp32 [nblocks], or with double quantization uint8 codes [nblocks] plus
    nested_absmax fp32 [ceil(nblocks / nested_blocksize)], nested_code fp32 [256] and a 0-dim
    fp32 offset, so that block i's scale is nested_code[absmax[i]] * nested_absmax[i // 256]
    + offset."""

    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: Tensor
    offset: Optional[Tensor] = None
    nested_absmax: Optional[Tensor] = None
    nested_code: Optional[Tensor] = None
    nested_blocksize: int = 256

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    @property
    def packed_nbytes(self) -> int:
        return (self.numel + 1) // 2

    @property
    def nbytes(self) -> int:
        """Bytes this tensor costs in memory: packed codes plus every state tensor (absmax,
        nested absmax, offset and the 16/256-entry code tables)."""
        tensors = [self.absmax, self.code, self.offset, self.nested_absmax, self.nested_code]
        return self.packed_nbytes + sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_param(self) -> float:
        """nbytes * 8 / numel: 4.127 for NF4 + double quant at block 64 on large tensors."""
        return self.nbytes * 8 / max(1, self.numel)

    def weight(self, packed: Tensor) -> Weight4bit:
        """The op layer's form of the 4-bit tensor whose codes are `packed` (any contiguous
        storage dtype holding the right bytes) and whose state this is."""
        return Weight4bit(packed_bytes(packed, self.shape), self.absmax, self.blocksize, self.quant_type,
                          tuple(self.shape), self.dtype, self.nested_absmax, self.nested_code, self.offset,
                          self.nested_blocksize)

    def to(self, device: Union[str, torch.device]) -> "QuantState":
        """A copy with every tensor on `device` (no requantization)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, absmax=move(self.absmax), code=move(self.code),
                                   offset=move(self.offset), nested_absmax=move(self.nested_absmax),
                                   nested_code=move(self.nested_code))

    # ---- bitsandbytes state-dict format ------------------------------------------------------

    def to_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """The tensors bitsandbytes' Linear4bit writes beside its packed weight, keyed
        prefix + absmax / quant_map / nested_absmax / nested_quant_map /
        quant_state.bitsandbytes__<quant_type> (UTF-8 JSON as a uint8 tensor)."""
        meta: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        out = {prefix + "absmax": self.absmax, prefix + "quant_map": self.code}
        if self.nested:
            out[prefix + "nested_absmax"] = self.nested_absmax
            out[prefix + "nested_quant_map"] = self.nested_code.clone()  # safetensors refuses shared storage
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=float(self.offset.item()))
        blob = json.dumps(meta).encode("utf-8")
        out[prefix + _STATE_KEY + self.quant_type] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], prefix: str = "",
                  device: Union[str, torch.device, None] = None) -> "QuantState":
        """Reads the keys to_dict (or bitsandbytes) wrote under `prefix`. Raises ValueError or
        TypeError naming the key for anything missing, malformed or inconsistent."""
        state_keys = [k for k in d if k.startswith(prefix + _STATE_KEY)]
        if len(state_keys) != 1:
            found = state_keys or "none"
            raise ValueError(f"expected exactly one key '{prefix}{_STATE_KEY}nf4' or '...fp4', found {found}")
        state_key = state_keys[0]
        key_type = state_key[len(prefix + _STATE_KEY):]
        if key_type not in ("nf4", "fp4"):
            raise ValueError(f"{state_key!r}: unknown quantization type {key_type!r} (expected nf4 or fp4)")
        meta = _parse_meta(d[state_key], state_key)

        def get(name: str, required: bool = True) -> Optional[Tensor]:
            key = prefix + name
            if key not in d:
                if required:
                    raise ValueError(f"missing key {key!r} in the quantization state dict")
                return None
            t = d[key]
            if not isinstance(t, Tensor):
                raise TypeError(f"{key!r} must be a tensor, got {type(t).__name__}")
            return t

        quant_type = _field(meta, "quant_type", str, state_key)
        if quant_type != key_type:
            raise ValueError(f"{state_key!r}: JSON quant_type {quant_type!r} does not match the key")
        blocksize = _field(meta, "blocksize", int, state_key)
        try:
            check_blocksize(blocksize)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{state_key!r}: {exc}") from None
        dtype_name = _field(meta, "dtype", str, state_key)
        if dtype_name not in _NAME_DTYPES:
            raise ValueError(f"{state_key!r}: dtype must be one of {sorted(_NAME_DTYPES)}, got {dtype_name!r}")
        shape = _field(meta, "shape", list, state_key)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise ValueError(f"{state_key!r}: shape must be a list of non-negative ints, got {shape}")
        n = math.prod(shape)
        if n > 1 << 46:
            raise ValueError(f"{state_key!r}: shape {shape} has {n} elements, beyond any real tensor")
        nb = num_blocks(n, blocksize)

        code = get("quant_map")
        _check_state_tensor(code, prefix + "quant_map", torch.float32, 16)
        expected_code = codebook(quant_type)
        if not torch.equal(code.detach().cpu(), expected_code):
            raise ValueError(f"{prefix}quant_map is not the standard {quant_type} codebook; "
                             "custom codebooks are not supported")
        absmax = get("absmax")
        nested_absmax = get("nested_absmax", required=False)
        offset = nested_code = None
        nested_blocksize = 256
        if nested_absmax is None:
            for extra in ("nested_quant_map", "nested_offset", "nested_blocksize"):
                if prefix + extra in d or extra in meta:
                    raise ValueError(f"{extra!r} present but {prefix}nested_absmax is missing")
            _check_state_tensor(absmax, prefix + "absmax", torch.float32, nb)
        else:
            nested_blocksize = _field(meta, "nested_blocksize", int, state_key)
            try:
                check_blocksize(nested_blocksize, "nested_blocksize", 16, 4096)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{state_key!r}: {exc}") from None
            if meta.get("nested_dtype", "float32") != "float32":
                raise ValueError(f"{state_key!r}: nested_dtype must be 'float32', got {meta['nested_dtype']!r}")
            offset_value = _field(meta, "nested_offset", (int, float), state_key)
            if not math.isfinite(offset_value):
                raise ValueError(f"{state_key!r}: nested_offset must be finite, got {offset_value}")
            _check_state_tensor(absmax, prefix + "absmax", torch.uint8, nb)
            _check_state_tensor(nested_absmax, prefix + "nested_absmax", torch.float32,
                                num_blocks(nb, nested_blocksize))
            nested_code = get("nested_quant_map")
            _check_state_tensor(nested_code, prefix + "nested_quant_map", torch.float32, 256)
            offset = torch.tensor(float(offset_value), dtype=torch.float32)
        target = device if device is not None else absmax.device
        move = lambda t: None if t is None else t.detach().to(target).contiguous()  # noqa: E731
        return cls(absmax=move(absmax.reshape(-1)), shape=torch.Size(shape),
                   dtype=_NAME_DTYPES[dtype_name], blocksize=blocksize, quant_type=quant_type,
                   code=move(code), offset=move(offset),
                   nested_absmax=move(None if nested_absmax is None else nested_absmax.reshape(-1)),
                   nested_code=move(nested_code), nested_blocksize=nested_blocksize)


def _parse_meta(blob: Any, key: str) -> dict[str, Any]:
    if not isinstance(blob, Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"{key!r} must be a 1-D uint8 tensor of UTF-8 JSON")
    try:
        meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{key!r} does not hold valid UTF-8 JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key!r}: JSON must be an object, got {type(meta).__name__}")
    return meta


def _field(meta: Mapping[str, Any], name: str, kind, key: str):
    if name not in meta:
        raise ValueError(f"{key!r}: JSON has no field {name!r}")
    value = meta[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{key!r}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _check_state_tensor(t: Tensor, key: str, dtype: torch.dtype, numel: int) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{key!r} must have dtype {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{key!r} must have {numel} elements, got {t.numel()} (shape {tuple(t.shape)})")


assert set(_DTYPE_NAMES) == set(FLOAT_DTYPES)
