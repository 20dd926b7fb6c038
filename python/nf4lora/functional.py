"""The functional 4-bit API: quantize_4bit / dequantize_4bit over the nf4lora:: ops, with
double quantization as bitsandbytes does it (offset = mean(absmax); absmax - offset quantized
blockwise to 8 bits with the signed dynamic map, block 256). Bad input raises ValueError or
TypeError naming the problem; NaN/Inf in the input is an error unless allow_nonfinite=True.
Tested by tests/test_quantize.py against a pure-PyTorch reference and bitsandbytes."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ops
from .quant_state import QuantState, codebook, dynamic_map

NESTED_BLOCKSIZE = 256


def quantize_4bit(A: Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True, *, allow_nonfinite: bool = False,
                  ) -> tuple[Tensor, QuantState]:
    """Quantizes A (fp32/fp16/bf16, any non-empty shape or view, flattened row-major) to packed
    4-bit codes.

    Returns (packed uint8 [(n + 1) // 2, 1], QuantState). Codes and fp32 absmax are
    bit-identical to bitsandbytes' quantize_4bit. With ``allow_nonfinite=True`` a block that
    holds NaN or +-Inf is kept, with absmax NaN, and dequantizes to NaN; by default such
    input raises ValueError."""
    if not isinstance(A, Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    _ops.check_blocksize(blocksize)
    _ops.check_quant_type(quant_type)
    if A.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(A.shape)})")
    if A.requires_grad:
        A = A.detach()
    A = A.contiguous()  # a view is quantized in its logical row-major order, like its copy
    packed, absmax = torch.ops.nf4lora.quantize_4bit(A, blocksize, quant_type)
    # Blocks with NaN/Inf come back with absmax NaN, and max() propagates NaN: one reduction.
    if not allow_nonfinite and A.device.type != "meta" and bool(torch.isnan(absmax.max())):
        bad = torch.isnan(absmax)
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"input contains NaN or Inf in {int(bad.sum())} of {absmax.numel()} blocks (first: "
            f"block {first}, flat elements [{first * blocksize}, {min(A.numel(), (first + 1) * blocksize)})); "
            "pass allow_nonfinite=True to keep them as NaN blocks")
    code = codebook(quant_type, A.device)
    if not double_quant:
        return packed, QuantState(absmax=absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize,
                                  quant_type=quant_type, code=code)
    offset = absmax.mean()
    nested_code = dynamic_map(signed=True, device=A.device)
    qabsmax, nested_absmax = torch.ops.nf4lora.quantize_blockwise_8bit(
        absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return packed, QuantState(absmax=qabsmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize,
                              quant_type=quant_type, code=code, offset=offset,
                              nested_absmax=nested_absmax, nested_code=nested_code,
                              nested_blocksize=NESTED_BLOCKSIZE)


def _packed_bytes(packed: Tensor, state: QuantState) -> Tensor:
    """The packed codes as a flat uint8 view: any storage dtype with the right bytes loads."""
    if not isinstance(packed, Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if not packed.is_contiguous():
        raise ValueError(f"packed must be contiguous (shape {tuple(packed.shape)}, stride {packed.stride()})")
    if packed.dtype.is_complex or packed.dtype == torch.bool:
        raise TypeError(f"packed must be uint8 (or a float storage dtype), got {packed.dtype}")
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    expected = state.packed_nbytes
    if flat.numel() < expected or flat.numel() > expected + flat.element_size():
        raise ValueError(f"packed holds {flat.numel()} bytes but a QuantState of shape "
                         f"{tuple(state.shape)} needs {expected}")
    return flat[:expected]


def dequantize_4bit(packed: Tensor, state: QuantState, out: Optional[Tensor] = None,
                    dtype: Optional[torch.dtype] = None) -> Tensor:
    """Dense tensor of shape state.shape from packed codes; dtype = state.dtype unless `dtype`
    or a preallocated `out` (reused as is: no allocation, no page faults) says otherwise."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    flat = _packed_bytes(packed, state)
    if state.absmax.device != flat.device:
        raise ValueError(f"packed is on {flat.device} but the QuantState is on {state.absmax.device}; "
                         "move them together (state.to(device))")
    nested = (state.nested_absmax, state.nested_code, state.offset) if state.nested else (None, None, None)
    if out is not None:
        if dtype is not None and dtype != out.dtype:
            raise ValueError(f"dtype={dtype} conflicts with out.dtype={out.dtype}")
        if tuple(out.shape) != tuple(state.shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(state.shape)}")
        torch.ops.nf4lora.dequantize_4bit_out(flat, state.absmax, state.blocksize, state.quant_type,
                                              *nested, state.nested_blocksize, out)
        return out
    return torch.ops.nf4lora.dequantize_4bit(flat, state.absmax, state.blocksize, state.quant_type,
                                             list(state.shape), dtype or state.dtype, *nested,
                                             state.nested_blocksize)
