"""Every ``nf4lora::`` custom op: its one declaration (torch.library.custom_op), its fake (meta)
implementation for torch.compile/export, and ``register``, which binds one device's
implementation module (ops/cpu.py, ops/cuda.py) to all ops at once. A 4-bit weight crosses the op
boundary as the flat arguments of its Weight4bit (``Weight4bit.op_args``) and is rebuilt here,
once, for the device code. Tested by tests/test_matmul.py and tests/test_quantize.py
(torch.library.opcheck, torch.compile(fullgraph=True))."""
from __future__ import annotations

from types import ModuleType
from typing import Optional, Sequence

import torch
from torch import Tensor

from .checks import (check_blocksize, check_dequant_out, check_float_dtype, check_grad_input,
                     check_matmul, check_quant_type, check_tensor, check_weight, num_blocks)
from .weight import Weight4bit

# ---- declarations: the schema of each op (bodies run only for a device nothing registered) ----


@torch.library.custom_op("nf4lora::quantize_4bit", mutates_args=())
def quantize_4bit(A: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    """Blockwise 4-bit quantization of A (flattened, row-major). Returns (packed uint8
    [(n+1)//2, 1], absmax fp32 [ceil(n/blocksize)]). Blocks holding NaN/Inf get absmax NaN."""
    raise NotImplementedError(f"nf4lora::quantize_4bit has no kernel for device {A.device}")


@torch.library.custom_op("nf4lora::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                    shape: Sequence[int], dtype: torch.dtype, nested_absmax: Optional[Tensor],
                    nested_code: Optional[Tensor], offset: Optional[Tensor],
                    nested_blocksize: int) -> Tensor:
    """codebook[code] * absmax rounded to `dtype`, shaped `shape`. With double quantization,
    absmax is uint8 and each block's scale is nested_code[absmax] * nested_absmax + offset."""
    raise NotImplementedError(f"nf4lora::dequantize_4bit has no kernel for device {packed.device}")


@torch.library.custom_op("nf4lora::dequantize_4bit_out", mutates_args=("out",))
def dequantize_4bit_out(packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                        nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                        offset: Optional[Tensor], nested_blocksize: int, out: Tensor) -> None:
    """dequantize_4bit written into a preallocated `out` (its dtype and shape decide)."""
    raise NotImplementedError(f"nf4lora::dequantize_4bit_out has no kernel for device {packed.device}")


@torch.library.custom_op("nf4lora::quantize_blockwise_8bit", mutates_args=())
def quantize_blockwise_8bit(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Nearest entry of the sorted 256-value `code` for A / absmax per block (ties to the lower
    entry). Returns (uint8 codes shaped like A, fp32 absmax [ceil(n/blocksize)])."""
    raise NotImplementedError(f"nf4lora::quantize_blockwise_8bit has no kernel for device {A.device}")


@torch.library.custom_op("nf4lora::dequantize_blockwise_8bit", mutates_args=())
def dequantize_blockwise_8bit(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    """code[q] * absmax per block, fp32, shaped like q."""
    raise NotImplementedError(f"nf4lora::dequantize_blockwise_8bit has no kernel for device {q.device}")


@torch.library.custom_op("nf4lora::matmul_4bit", mutates_args=())
def matmul_4bit(x: Tensor, packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                shape: Sequence[int], nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                offset: Optional[Tensor], nested_blocksize: int, bias: Optional[Tensor]) -> Tensor:
    """x [..., K] @ W[N, K].T (+ bias) in x's dtype; W given by its packed codes and state.
    Differentiable in x and bias (autograd registered in ops/matmul.py)."""
    raise NotImplementedError(f"nf4lora::matmul_4bit has no kernel for device {x.device}")


@torch.library.custom_op("nf4lora::matmul_4bit_t", mutates_args=())
def matmul_4bit_t(grad_y: Tensor, packed: Tensor, absmax: Tensor, blocksize: int,
                           quant_type: str, shape: Sequence[int], nested_absmax: Optional[Tensor],
                           nested_code: Optional[Tensor], offset: Optional[Tensor],
                           nested_blocksize: int) -> Tensor:
    """grad_y [..., N] @ W [N, K] -> [..., K], in grad_y's dtype (matmul_4bit's backward)."""
    raise NotImplementedError(f"nf4lora::matmul_4bit_t has no kernel for device {grad_y.device}")


# ---- checks shared by the fakes and the device kernels ----------------------------------------


def _check_quantize(A: Tensor, blocksize: int, quant_type: str) -> tuple[int, int]:
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    check_float_dtype(A.dtype, "A.dtype")
    check_tensor(A, "A")
    n = A.numel()
    return n, num_blocks(n, blocksize)


def _check_quantize_8bit(A: Tensor, code: Tensor, blocksize: int) -> tuple[int, int]:
    check_blocksize(blocksize, "blocksize", 16, 4096)
    check_tensor(A, "A", torch.float32)
    check_tensor(code, "code", torch.float32, 256, A.device)
    return A.numel(), num_blocks(A.numel(), blocksize)


def _check_dequantize_8bit(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> int:
    check_blocksize(blocksize, "blocksize", 16, 4096)
    check_tensor(q, "q", torch.uint8)
    check_tensor(absmax, "absmax", torch.float32, num_blocks(q.numel(), blocksize), q.device)
    check_tensor(code, "code", torch.float32, 256, q.device)
    return q.numel()


def _weight(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
            nested_blocksize, dtype=torch.float32) -> Weight4bit:
    return Weight4bit.from_op_args(packed, absmax, blocksize, quant_type, shape, nested_absmax,
                                   nested_code, offset, nested_blocksize, dtype)


# ---- fakes --------------------------------------------------------------------------------------


@quantize_4bit.register_fake
def _(A, blocksize, quant_type):
    n, nb = _check_quantize(A, blocksize, quant_type)
    return A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), A.new_empty((nb,), dtype=torch.float32)


@dequantize_4bit.register_fake
def _(packed, absmax, blocksize, quant_type, shape, dtype, nested_absmax, nested_code, offset,
      nested_blocksize):
    check_float_dtype(dtype, "dtype")
    check_weight(_weight(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code,
                         offset, nested_blocksize))
    return packed.new_empty(tuple(shape), dtype=dtype)


@dequantize_4bit_out.register_fake
def _(packed, absmax, blocksize, quant_type, nested_absmax, nested_code, offset, nested_blocksize, out):
    check_dequant_out(_weight(packed, absmax, blocksize, quant_type, out.shape, nested_absmax,
                              nested_code, offset, nested_blocksize), out)


@quantize_blockwise_8bit.register_fake
def _(A, code, blocksize):
    _, nb = _check_quantize_8bit(A, code, blocksize)
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((nb,), dtype=torch.float32)


@dequantize_blockwise_8bit.register_fake
def _(q, absmax, code, blocksize):
    _check_dequantize_8bit(q, absmax, code, blocksize)
    return q.new_empty(q.shape, dtype=torch.float32)


@matmul_4bit.register_fake
def _(x, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
      nested_blocksize, bias):
    w = _weight(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
                nested_blocksize)
    N, _ = check_matmul(x, w, bias)
    return x.new_empty((*x.shape[:-1], N))


@matmul_4bit_t.register_fake
def _(grad_y, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
      nested_blocksize):
    w = _weight(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
                nested_blocksize)
    _, K = check_grad_input(grad_y, w)
    return grad_y.new_empty((*grad_y.shape[:-1], K))


# ---- device kernels -----------------------------------------------------------------------------


def register(device: str, impl: ModuleType) -> None:
    """Registers `impl` (ops/cpu.py or ops/cuda.py) as every op's kernel for `device`. An
    implementation module provides, over checked arguments:
        quantize_4bit(A, blocksize, quant_type, n, nblocks) -> (packed, absmax)
        empty(shape, dtype, device) -> Tensor
        dequantize_into(w: Weight4bit, out, n) -> None
        quantize_8bit(A, code, blocksize, n, nblocks) -> (q, absmax)
        dequantize_8bit(q, absmax, code, blocksize, n) -> Tensor
        matmul(x, w, bias) -> Tensor             x [..., K] @ W^T (+ bias)
        matmul_t(grad_y, w) -> Tensor            grad_y [..., N] @ W"""

    @quantize_4bit.register_kernel(device)
    def _(A, blocksize, quant_type):
        n, nb = _check_quantize(A, blocksize, quant_type)
        return impl.quantize_4bit(A, blocksize, quant_type, n, nb)

    @dequantize_4bit.register_kernel(device)
    def _(packed, absmax, blocksize, quant_type, shape, dtype, nested_absmax, nested_code, offset,
          nested_blocksize):
        check_float_dtype(dtype, "dtype")
        w = _weight(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
                    nested_blocksize, dtype)
        n = check_weight(w)
        out = impl.empty(shape, dtype, packed.device)
        if n:
            impl.dequantize_into(w, out, n)
        return out

    @dequantize_4bit_out.register_kernel(device)
    def _(packed, absmax, blocksize, quant_type, nested_absmax, nested_code, offset,
          nested_blocksize, out):
        w = _weight(packed, absmax, blocksize, quant_type, out.shape, nested_absmax, nested_code,
                    offset, nested_blocksize, out.dtype)
        n = check_dequant_out(w, out)
        if n:
            impl.dequantize_into(w, out, n)

    @quantize_blockwise_8bit.register_kernel(device)
    def _(A, code, blocksize):
        n, nb = _check_quantize_8bit(A, code, blocksize)
        return impl.quantize_8bit(A, code, blocksize, n, nb)

    @dequantize_blockwise_8bit.register_kernel(device)
    def _(q, absmax, code, blocksize):
        n = _check_dequantize_8bit(q, absmax, code, blocksize)
        return impl.dequantize_8bit(q, absmax, code, blocksize, n)

    @matmul_4bit.register_kernel(device)
    def _(x, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
          nested_blocksize, bias):
        w = _weight(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
                    nested_blocksize)
        check_matmul(x, w, bias)
        check_weight(w)
        return impl.matmul(x, w, bias)

    @matmul_4bit_t.register_kernel(device)
    def _(grad_y, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
          nested_blocksize):
        w = _weight(packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
                    nested_blocksize)
        check_grad_input(grad_y, w)
        check_weight(w)
        return impl.matmul_t(grad_y, w)
