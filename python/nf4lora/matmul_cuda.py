"""The CUDA side of matmul_4bit: picks, per call, the kernel of cuda/matmul.cu that fits the
shape, or falls back to dequantize-into-scratch + cuBLAS (always correct, any shape).

    forward  y = x W^T:  M <= GEMV_MAX_M and K % 8 == 0         -> matmul_4bit_cuda
                         fp16/bf16, K % 32 == 0, M <= TC_MAX_M  -> matmul_4bit_tc_cuda (tensor cores)
                         otherwise                              -> dequantize + F.linear
    backward g W:        M <= GEMV_T_MAX_M and K % 8 == 0       -> matmul_4bit_t_cuda (fp32 atomics)
                         fp16/bf16, N % 32 == 0, K % 8 == 0, M <= TC_MAX_M -> matmul_4bit_tc_cuda
                         otherwise                              -> dequantize + matmul

Arguments arrive validated by matmul.py. Tested by tests/test_cuda.py (each path forced through
the module constants, against a float64 reference); timed by bench/bench_cuda.py."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ._native import _C, dtype_code, quant_type_code
from ._ops import _absmax_ptrs, _check_dequant_args, _cuda_stream, _ptr, _require_cuda_build

# Rows of x (of grad_y) up to which each fused kernel runs instead of dequantize + cuBLAS; the
# kernels take up to 8 (kMatmulCudaMaxM in nf4lora/matmul.h). Chosen from bench/bench_cuda_matmul.py
# on an H200 (LLaMA-7B shapes, bf16; figures in the README): the forward GEMV beats dequantize +
# cuBLAS up to M = 3 (M=1 4096x4096: 9.8 us vs 25.4, dense bf16 12.9); the transposed GEMV only
# ties it at M = 1; the tensor-core GEMM (a simple single-buffered WMMA kernel) runs 7-10x slower
# than dequantize + cuBLAS at every M, so it is off until it is rewritten.
GEMV_MAX_M = 3
GEMV_T_MAX_M = 1
TC_MAX_M = 0
_HALF = (torch.float16, torch.bfloat16)


def _aligned(t: Tensor, bytes_: int = 16) -> bool:
    return t.data_ptr() % bytes_ == 0


def _kernel_absmax(packed, absmax, blocksize, quant_type, N, K, dtype, nested_absmax, nested_code,
                   offset, nested_blocksize) -> tuple:
    """The absmax pointers for a fused kernel, after checking what the kernels read by raw
    pointer (the fallback's dequantize_4bit_out checks the same itself, so only here)."""
    _check_dequant_args(packed, absmax, blocksize, quant_type, [N, K], dtype, nested_absmax,
                        nested_code, offset, nested_blocksize)
    return _absmax_ptrs(absmax, nested_absmax, nested_code, offset, nested_blocksize)


def forward(x: Tensor, packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str, N: int,
            K: int, nested_absmax, nested_code, offset, nested_blocksize: int,
            bias: Optional[Tensor], dequant_linear: Callable[[Tensor], Tensor]) -> Tensor:
    """x [..., K] @ W^T (+ bias) on the GPU; dequant_linear(x) is the fallback."""
    _require_cuda_build()
    M = x.numel() // K if K else 0
    words_ok = K % 8 == 0 and K > 0 and N > 0 and _aligned(packed, 4)  # kernels read 32-bit words
    x2 = x.reshape(M, K).contiguous() if words_ok and M else x
    use_gemv = 0 < M <= GEMV_MAX_M and words_ok and _aligned(x2)
    use_tc = (not use_gemv and 0 < M <= TC_MAX_M and x.dtype in _HALF and K % 32 == 0
              and words_ok and _aligned(x2))
    if not (use_gemv or use_tc):
        return dequant_linear(x)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    b = None if bias is None else bias.contiguous()
    args = _kernel_absmax(packed, absmax, blocksize, quant_type, N, K, x.dtype, nested_absmax,
                          nested_code, offset, nested_blocksize)
    with torch.cuda.device(x.device):
        stream = _cuda_stream(x.device)
        if use_gemv:
            _C.matmul_4bit_cuda(x2.data_ptr(), dtype_code(x.dtype), M, K, packed.data_ptr(), *args, N,
                                blocksize, quant_type_code(quant_type), _ptr(b), y.data_ptr(), stream)
        else:
            _C.matmul_4bit_tc_cuda(x2.data_ptr(), dtype_code(x.dtype), M, K, packed.data_ptr(), *args,
                                   N, blocksize, quant_type_code(quant_type), False, _ptr(b),
                                   y.data_ptr(), stream)
    return y.reshape(*x.shape[:-1], N)


def grad_input(grad_y: Tensor, packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
               N: int, K: int, nested_absmax, nested_code, offset, nested_blocksize: int,
               dequant_matmul: Callable[[Tensor], Tensor]) -> Tensor:
    """grad_y [..., N] @ W [N, K] on the GPU; dequant_matmul(grad_y) is the fallback."""
    _require_cuda_build()
    M = grad_y.numel() // N if N else 0
    words_ok = K % 8 == 0 and K > 0 and N > 0 and _aligned(packed, 4)
    g2 = grad_y.reshape(M, N).contiguous() if words_ok and M else grad_y
    use_gemv = 0 < M <= GEMV_T_MAX_M and words_ok
    use_tc = (not use_gemv and 0 < M <= TC_MAX_M and grad_y.dtype in _HALF and N % 32 == 0
              and words_ok and _aligned(g2))
    if not (use_gemv or use_tc):
        return dequant_matmul(grad_y)
    args = _kernel_absmax(packed, absmax, blocksize, quant_type, N, K, grad_y.dtype, nested_absmax,
                          nested_code, offset, nested_blocksize)
    with torch.cuda.device(grad_y.device):
        stream = _cuda_stream(grad_y.device)
        if use_gemv:
            acc = torch.zeros((M, K), dtype=torch.float32, device=grad_y.device)
            _C.matmul_4bit_t_cuda(g2.data_ptr(), dtype_code(grad_y.dtype), M, N, packed.data_ptr(),
                                  *args, K, blocksize, quant_type_code(quant_type), acc.data_ptr(),
                                  stream)
            out = acc.to(grad_y.dtype)
        else:
            out = torch.empty((M, K), dtype=grad_y.dtype, device=grad_y.device)
            _C.matmul_4bit_tc_cuda(g2.data_ptr(), dtype_code(grad_y.dtype), M, N, packed.data_ptr(),
                                   *args, K, blocksize, quant_type_code(quant_type), True, 0,
                                   out.data_ptr(), stream)
    return out.reshape(*grad_y.shape[:-1], K)
