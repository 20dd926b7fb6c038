"""The functional 4-bit API: quantize_4bit / dequantize_4bit / matmul_4bit over the nf4lora:: ops, with
double quantization as bitsandbytes does it (offset = mean(absmax); absmax - offset quantized
blockwise to 8 bits with the signed dynamic map, block 256). Bad input raises ValueError or
TypeError naming the problem; NaN/Inf in the input is an error unless allow_nonfinite=True.
Tested by tests/test_quantize.py against a pure-PyTorch reference and bitsandbytes, and
tests/test_matmul.py."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops import check_blocksize, check_quant_type, codebook, dynamic_map, library
from ..ops import matmul as _ops_matmul
from .state import QuantState

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
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    if A.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(A.shape)})")
    if A.requires_grad:
        A = A.detach()
    A = A.contiguous()  # a view is quantized in its logical row-major order, like its copy
    packed, absmax = library.quantize_4bit(A, blocksize, quant_type)
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
    qabsmax, nested_absmax = library.quantize_blockwise_8bit(
        absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return packed, QuantState(absmax=qabsmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize,
                              quant_type=quant_type, code=code, offset=offset,
                              nested_absmax=nested_absmax, nested_code=nested_code,
                              nested_blocksize=NESTED_BLOCKSIZE)


def dequantize_4bit(packed: Tensor, state: QuantState, out: Optional[Tensor] = None,
                    dtype: Optional[torch.dtype] = None) -> Tensor:
    """Dense tensor of shape state.shape from packed codes; dtype = state.dtype unless `dtype`
    or a preallocated `out` (reused as is: no allocation, no page faults) says otherwise."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    w = state.weight(packed)
    if state.absmax.device != w.packed.device:
        raise ValueError(f"packed is on {w.packed.device} but the QuantState is on {state.absmax.device}; "
                         "move them together (state.to(device))")
    if out is not None:
        if dtype is not None and dtype != out.dtype:
            raise ValueError(f"dtype={dtype} conflicts with out.dtype={out.dtype}")
        if tuple(out.shape) != tuple(state.shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(state.shape)}")
        library.dequantize_4bit_out(w.packed, w.absmax, w.blocksize, w.quant_type, w.nested_absmax,
                                    w.nested_code, w.offset, w.nested_blocksize, out)
        return out
    return library.dequantize_4bit(w.packed, w.absmax, w.blocksize, w.quant_type, list(w.shape),
                                   dtype or state.dtype, w.nested_absmax, w.nested_code, w.offset,
                                   w.nested_blocksize)


def matmul_4bit(x: Tensor, packed: Tensor, state: QuantState, bias: Optional[Tensor] = None) -> Tensor:
    """x [..., K] @ W.T (+ bias) for the 4-bit weight (packed, state) of shape [N, K].

    Computes in x's dtype (the autocast dtype inside torch.autocast); differentiable in x and
    bias only. Raises ValueError/TypeError for mismatched shapes, dtypes or devices."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    return _ops_matmul.matmul_4bit(x, state.weight(packed), bias)
