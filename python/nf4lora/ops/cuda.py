"""The CUDA implementations of the nf4lora:: ops (registered by ops/library.py's ``register``):
arguments arrive checked; kernels of cuda/*.cu run on the caller's current stream.

The 4-bit product picks, per call, the fused GEMV kernel of cuda/matmul.cu where it fits (row
limits from the dispatch policy, ops/dispatch.py), or dequantize-into-scratch + cuBLAS (always
correct, any shape):
    forward  y = x W^T:  M <= DISPATCH.cuda_gemv_max_rows and K % 8 == 0     -> fused GEMV
                         otherwise                                           -> dequantize + F.linear
    backward g W:        M <= DISPATCH.cuda_gemv_t_max_rows and K % 8 == 0   -> transposed GEMV (fp32 atomics)
                         otherwise                                           -> dequantize + matmul
There is no fused 4-bit GEMM for larger M: the one we had measured 7-10x slower than dequantize +
cuBLAS and was removed (docs/decisions.md).
Tested by tests/test_cuda.py and tests/test_cuda_matmul.py (each route forced, against a float64
reference; skipped without a GPU); timed by bench/bench_cuda.py and bench/bench_cuda_matmul.py."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from .buffers import scratch
from .dispatch import DISPATCH
from .native import _C, absmax_pointers, dtype_code, ptr, quant_type_code
from .weight import Weight4bit

def _require_cuda_build() -> None:
    if not _C.has_cuda():
        raise RuntimeError("this nf4lora build has no CUDA kernels (built without nvcc, or with "
                           "NF4LORA_CUDA=OFF); reinstall with nvcc available to use CUDA tensors")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _aligned(t: Tensor, bytes_: int = 16) -> bool:
    return t.data_ptr() % bytes_ == 0


def quantize_4bit(A: Tensor, blocksize: int, quant_type: str, n: int, nblocks: int) -> tuple[Tensor, Tensor]:
    _require_cuda_build()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=A.device)
    absmax = torch.empty((nblocks,), dtype=torch.float32, device=A.device)
    with torch.cuda.device(A.device):
        _C.quantize_4bit_cuda(A.data_ptr(), dtype_code(A.dtype), n, blocksize, quant_type_code(quant_type),
                              packed.data_ptr(), absmax.data_ptr(), 0, _stream(A.device))
    return packed, absmax


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def dequantize_into(w: Weight4bit, out: Tensor, n: int) -> None:
    _require_cuda_build()
    with torch.cuda.device(w.packed.device):
        _C.dequantize_4bit_cuda(w.packed.data_ptr(), *absmax_pointers(w), n, w.blocksize,
                                quant_type_code(w.quant_type), out.data_ptr(), dtype_code(out.dtype),
                                _stream(w.packed.device))


def quantize_8bit(A: Tensor, code: Tensor, blocksize: int, n: int, nblocks: int) -> tuple[Tensor, Tensor]:
    _require_cuda_build()
    q = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    absmax = torch.empty((nblocks,), dtype=torch.float32, device=A.device)
    with torch.cuda.device(A.device):
        _C.quantize_8bit_blockwise_cuda(A.data_ptr(), n, blocksize, code.data_ptr(), q.data_ptr(),
                                        absmax.data_ptr(), 0, _stream(A.device))
    return q, absmax


def dequantize_8bit(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int, n: int) -> Tensor:
    _require_cuda_build()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        _C.dequantize_8bit_blockwise_cuda(q.data_ptr(), absmax.data_ptr(), code.data_ptr(), n,
                                          blocksize, out.data_ptr(), _stream(q.device))
    return out


def dequantized(w: Weight4bit, dtype: torch.dtype) -> Tensor:
    """W [N, K] in `dtype`, in this thread's scratch buffer on w's device."""
    out = scratch(w.shape, dtype, w.packed.device)
    n = out.numel()
    if n:
        dequantize_into(w, out, n)
    return out


def _words_ok(w: Weight4bit) -> bool:
    N, K = w.shape
    return K % 8 == 0 and K > 0 and N > 0 and _aligned(w.packed, 4)  # kernels read 32-bit words


def matmul(x: Tensor, w: Weight4bit, bias: Optional[Tensor]) -> Tensor:
    _require_cuda_build()
    N, K = w.shape
    M = x.numel() // K if K else 0
    x2 = x.reshape(M, K).contiguous() if 0 < M <= DISPATCH.cuda_gemv_max_rows and _words_ok(w) else None
    if x2 is None or not _aligned(x2):
        return F.linear(x, dequantized(w, x.dtype), bias)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    b = None if bias is None else bias.contiguous()
    with torch.cuda.device(x.device):
        _C.matmul_4bit_cuda(x2.data_ptr(), dtype_code(x.dtype), M, K, w.packed.data_ptr(),
                            *absmax_pointers(w), N, w.blocksize, quant_type_code(w.quant_type), ptr(b),
                            y.data_ptr(), _stream(x.device))
    return y.reshape(*x.shape[:-1], N)


def matmul_t(grad_y: Tensor, w: Weight4bit) -> Tensor:
    _require_cuda_build()
    N, K = w.shape
    M = grad_y.numel() // N if N else 0
    if not (0 < M <= DISPATCH.cuda_gemv_t_max_rows and _words_ok(w)):
        return grad_y @ dequantized(w, grad_y.dtype)
    g2 = grad_y.reshape(M, N).contiguous()
    acc = torch.zeros((M, K), dtype=torch.float32, device=grad_y.device)
    with torch.cuda.device(grad_y.device):
        _C.matmul_4bit_t_cuda(g2.data_ptr(), dtype_code(grad_y.dtype), M, N, w.packed.data_ptr(),
                              *absmax_pointers(w), K, w.blocksize, quant_type_code(w.quant_type),
                              acc.data_ptr(), _stream(grad_y.device))
    return acc.to(grad_y.dtype).reshape(*grad_y.shape[:-1], K)
