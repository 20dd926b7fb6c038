"""The CPU implementations of the nf4lora:: ops (registered by ops/library.py's ``register``):
arguments arrive checked; each function hands raw pointers to ``nf4lora._C`` (cpp/src: scalar
reference, AVX2, AVX-512 variants chosen at run time).

The 4-bit product, forward y = x W^T (+ b) and transposed g W, takes one of two routes, chosen by
the dispatch policy (ops/dispatch.py) from the number of rows:
    rows <= DISPATCH.cpu_rows() (cpu_t_rows() for g W): the fused native kernel; W is dequantized
        in registers, never materialized;
    above: W dequantized into this thread's reused scratch buffer, then a dense torch GEMM in x's
        dtype — or, for bf16 where DISPATCH.cpu_gemm_in_fp32 says so, an fp32 GEMM over x widened
        exactly and W dequantized in fp32 (the values the fused kernels use), rounded to bf16 once.
Tested by tests/test_matmul.py (each route forced, against a float64 reference) and
tests/test_quantize.py."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from .buffers import empty_cpu, scratch
from .dispatch import DISPATCH
from .native import _C, absmax_pointers, dtype_code, num_threads, ptr, quant_type_code
from .weight import Weight4bit

_CPU = torch.device("cpu")


def quantize_4bit(A: Tensor, blocksize: int, quant_type: str, n: int, nblocks: int) -> tuple[Tensor, Tensor]:
    packed = empty_cpu(((n + 1) // 2, 1), torch.uint8)
    absmax = torch.empty((nblocks,), dtype=torch.float32)
    _C.quantize_4bit_cpu(A.data_ptr(), dtype_code(A.dtype), n, blocksize, quant_type_code(quant_type),
                         packed.data_ptr(), absmax.data_ptr(), num_threads())
    return packed, absmax


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    return empty_cpu(shape, dtype)


def dequantize_into(w: Weight4bit, out: Tensor, n: int) -> None:
    _C.dequantize_4bit_cpu(w.packed.data_ptr(), *absmax_pointers(w), n, w.blocksize,
                           quant_type_code(w.quant_type), out.data_ptr(), dtype_code(out.dtype),
                           num_threads())


def quantize_8bit(A: Tensor, code: Tensor, blocksize: int, n: int, nblocks: int) -> tuple[Tensor, Tensor]:
    q = torch.empty(A.shape, dtype=torch.uint8)
    absmax = torch.empty((nblocks,), dtype=torch.float32)
    _C.quantize_8bit_blockwise_cpu(A.data_ptr(), n, blocksize, code.data_ptr(), q.data_ptr(),
                                   absmax.data_ptr(), num_threads())
    return q, absmax


def dequantize_8bit(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int, n: int) -> Tensor:
    out = torch.empty(q.shape, dtype=torch.float32)
    _C.dequantize_8bit_blockwise_cpu(q.data_ptr(), absmax.data_ptr(), code.data_ptr(), n, blocksize,
                                     out.data_ptr(), num_threads())
    return out


def dequantized(w: Weight4bit, dtype: torch.dtype) -> Tensor:
    """W [N, K] in `dtype`, in this thread's scratch buffer (fp32: code * absmax as the fused
    kernels use it)."""
    out = scratch(w.shape, dtype, _CPU)
    n = out.numel()
    if n:
        dequantize_into(w, out, n)
    return out


def _fused(fn, inp: Tensor, w: Weight4bit, cols_in: int, cols_out: int, *extra) -> Tensor:
    """One call of a fused native product: fn(inp [rows, cols_in], W, *extra) -> [rows, cols_out]."""
    inp2 = inp.reshape(-1, cols_in).contiguous()
    out = torch.empty((inp2.shape[0], cols_out), dtype=inp.dtype)
    fn(inp2.data_ptr(), dtype_code(inp.dtype), inp2.shape[0], cols_in, w.packed.data_ptr(),
       *absmax_pointers(w), cols_out, w.blocksize, quant_type_code(w.quant_type), *extra,
       out.data_ptr(), num_threads())
    return out.reshape(*inp.shape[:-1], cols_out)


def matmul(x: Tensor, w: Weight4bit, bias: Optional[Tensor]) -> Tensor:
    N, K = w.shape
    rows = x.numel() // K if K else 0
    if 0 < rows <= DISPATCH.cpu_rows():
        b = None if bias is None else bias.contiguous()  # kept alive across the native call
        return _fused(_C.matmul_4bit_cpu, x, w, K, N, ptr(b))
    if DISPATCH.cpu_gemm_in_fp32(x.dtype):
        w32 = dequantized(w, torch.float32)
        with torch.autocast("cpu", enabled=False):  # an fp32 GEMM even when called under autocast
            return F.linear(x.float(), w32, None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, dequantized(w, x.dtype), bias)


def matmul_t(grad_y: Tensor, w: Weight4bit) -> Tensor:
    N, K = w.shape
    rows = grad_y.numel() // N if N else 0
    if 0 < rows <= DISPATCH.cpu_t_rows():
        return _fused(_C.matmul_4bit_t_cpu, grad_y, w, N, K)
    if DISPATCH.cpu_gemm_in_fp32(grad_y.dtype):
        w32 = dequantized(w, torch.float32)
        with torch.autocast("cpu", enabled=False):
            return (grad_y.float() @ w32).to(grad_y.dtype)
    return grad_y @ dequantized(w, grad_y.dtype)
