"""Argument checks of the op layer, run once per call before any native code sees a pointer:
each error names the argument and shows the shapes. The fake (meta) implementations run the same
checks, so torch.compile reports bad input at trace time. The native layer re-checks sizes only
as a last line of defence. Tested through every op's tests (tests/test_quantize.py,
tests/test_matmul.py, tests/test_fuzz.py)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .native import FLOAT_DTYPES, QUANT_TYPES
from .weight import Weight4bit


def check_blocksize(blocksize: int, name: str = "blocksize", lo: int = 32, hi: int = 4096) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name} must be an int, got {type(blocksize).__name__}")
    if blocksize < lo or blocksize > hi or blocksize & (blocksize - 1):
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {blocksize}")


def check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def check_float_dtype(dtype: torch.dtype, name: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype}")


def check_tensor(t: Tensor, name: str, dtype: Optional[torch.dtype] = None,
                 numel: Optional[int] = None, device: Optional[torch.device] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()} (shape {tuple(t.shape)})")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the data is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
                         "call .contiguous() first")


def num_blocks(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize


def check_weight(w: Weight4bit, shape: Optional[Sequence[int]] = None) -> int:
    """Checks every tensor of a 4-bit weight against its block size and shape (or `shape`, for a
    weight handed over as op arguments); returns the element count."""
    shape = w.shape if shape is None else shape
    check_blocksize(w.blocksize)
    check_quant_type(w.quant_type)
    if any(int(s) < 0 for s in shape):
        raise ValueError(f"shape must not have negative sizes, got {list(shape)}")
    n = math.prod(int(s) for s in shape)
    dev = w.packed.device
    check_tensor(w.packed, "packed", torch.uint8, (n + 1) // 2)
    nb = num_blocks(n, w.blocksize)
    nested = (w.nested_absmax, w.nested_code, w.offset)
    if all(t is None for t in nested):
        check_tensor(w.absmax, "absmax", torch.float32, nb, dev)
    elif any(t is None for t in nested):
        raise ValueError("double quantization needs nested_absmax, nested_code and offset together")
    else:
        check_blocksize(w.nested_blocksize, "nested_blocksize", 16, 4096)
        check_tensor(w.absmax, "absmax (8-bit codes with double quantization)", torch.uint8, nb, dev)
        check_tensor(w.nested_absmax, "nested_absmax", torch.float32, num_blocks(nb, w.nested_blocksize), dev)
        check_tensor(w.nested_code, "nested_code", torch.float32, 256, dev)
        check_tensor(w.offset, "offset", torch.float32, 1, dev)
    return n


def check_dequant_out(w: Weight4bit, out: Tensor) -> int:
    check_tensor(out, "out", device=w.packed.device)
    check_float_dtype(out.dtype, "out.dtype")
    return check_weight(w, out.shape)


def weight_shape(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D [N, K], its QuantState shape is {list(shape)}")
    return int(shape[0]), int(shape[1])


def check_matmul(x: Tensor, w: Weight4bit, bias: Optional[Tensor]) -> tuple[int, int]:
    N, K = weight_shape(w.shape)
    check_float_dtype(x.dtype, "x.dtype")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x has shape {tuple(x.shape)} but the weight is [{N}, {K}]: x.shape[-1] must be {K}")
    if x.device != w.packed.device or w.absmax.device != w.packed.device:
        raise ValueError(f"x is on {x.device}, the packed weight on {w.packed.device} and its absmax on "
                         f"{w.absmax.device}: they must be on one device")
    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    return N, K


def check_grad_input(grad_y: Tensor, w: Weight4bit) -> tuple[int, int]:
    N, K = weight_shape(w.shape)
    check_float_dtype(grad_y.dtype, "grad_y.dtype")
    if grad_y.dim() < 1 or grad_y.shape[-1] != N:
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}, its last dimension must be {N}")
    return N, K
