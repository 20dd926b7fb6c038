"""Weight4bit: one packed 4-bit tensor with its whole quantization state, the one form in which a
4-bit weight enters the op layer (from Linear4bit, LoRA, the functional API). The op layer flattens
it once, into the ``nf4lora::`` ops' arguments (``op_args``) or the native kernels' pointers.

An immutable NamedTuple rather than a tensor subclass: it is rebuilt for each call from the
module's current parameter and buffers (a few hundred nanoseconds), so whatever replaced them —
``.to()``, ``load_state_dict``, FSDP2's all-gathered parameter — is what the kernel reads, and the
packed codes stay a plain uint8 parameter that FSDP2 shards as it is. Tested by
tests/test_linear4bit.py and tests/test_matmul.py."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor


class Weight4bit(NamedTuple):
    """Packed codes + state of a 4-bit tensor of logical `shape` ([N, K] for a matmul weight).

    packed: flat uint8 [(numel + 1) // 2], element 2i in the high nibble. absmax: fp32 per block,
    or with double quantization uint8 codes, block i's scale being
    nested_code[absmax[i]] * nested_absmax[i // nested_blocksize] + offset."""

    packed: Tensor
    absmax: Tensor
    blocksize: int
    quant_type: str
    shape: tuple
    dtype: torch.dtype  # the dtype it was quantized from: dequantization's default
    nested_absmax: Optional[Tensor] = None
    nested_code: Optional[Tensor] = None
    offset: Optional[Tensor] = None
    nested_blocksize: int = 256

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def op_args(self) -> tuple:
        """The weight's arguments of nf4lora::matmul_4bit / matmul_4bit_t, in schema order."""
        return (self.packed, self.absmax, self.blocksize, self.quant_type, list(self.shape),
                self.nested_absmax, self.nested_code, self.offset, self.nested_blocksize)

    @classmethod
    def from_op_args(cls, packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                     shape: Sequence[int], nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                     offset: Optional[Tensor], nested_blocksize: int,
                     dtype: torch.dtype = torch.float32) -> "Weight4bit":
        return cls(packed, absmax, blocksize, quant_type, tuple(int(s) for s in shape), dtype,
                   nested_absmax, nested_code, offset, nested_blocksize)


def packed_bytes(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """The packed codes of a 4-bit tensor of `shape` as a flat uint8 view: any contiguous storage
    dtype holding the right bytes loads (bitsandbytes checkpoints may store them as a float)."""
    if not isinstance(packed, Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype is torch.uint8 and packed.dim() <= 2 and packed.is_contiguous():
        flat = packed.view(-1)  # the common case, Linear4bit's [(n + 1) // 2, 1] parameter
    else:
        if not packed.is_contiguous():
            raise ValueError(f"packed must be contiguous (shape {tuple(packed.shape)}, stride {packed.stride()})")
        if packed.dtype.is_complex or packed.dtype == torch.bool:
            raise TypeError(f"packed must be uint8 (or a float storage dtype), got {packed.dtype}")
        flat = packed.reshape(-1)
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8)
    expected = (math.prod(shape) + 1) // 2
    if flat.numel() < expected or flat.numel() > expected + flat.element_size():
        raise ValueError(f"packed holds {flat.numel()} bytes but a QuantState of shape {tuple(shape)} "
                         f"needs {expected}")
    return flat if flat.numel() == expected else flat[:expected]
