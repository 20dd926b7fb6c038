"""The ``nf4lora::`` custom ops: one declaration each (torch.library.custom_op), a fake
(meta) implementation for torch.compile/export, and CPU and CUDA kernels that hand raw
pointers to ``nf4lora._C``. Every argument check happens here, once, with messages that name
the argument and show shapes; the native layer re-checks sizes only as a last line of defence.
Tested by tests/test_quantize.py and tests/test_matmul.py (torch.library.opcheck, torch.compile)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._native import FLOAT_DTYPES, QUANT_TYPES, _C, dtype_code, num_threads, quant_type_code

# ---- argument checks shared by fake and real kernels -----------------------------------------


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


def _check_dequant_args(packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                        shape: Sequence[int], dtype: torch.dtype, nested_absmax: Optional[Tensor],
                        nested_code: Optional[Tensor], offset: Optional[Tensor],
                        nested_blocksize: int) -> int:
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    check_float_dtype(dtype, "dtype")
    if any(int(s) < 0 for s in shape):
        raise ValueError(f"shape must not have negative sizes, got {list(shape)}")
    n = math.prod(int(s) for s in shape)
    dev = packed.device
    check_tensor(packed, "packed", torch.uint8, (n + 1) // 2)
    nb = num_blocks(n, blocksize)
    nested = (nested_absmax, nested_code, offset)
    if all(t is None for t in nested):
        check_tensor(absmax, "absmax", torch.float32, nb, dev)
    elif any(t is None for t in nested):
        raise ValueError("double quantization needs nested_absmax, nested_code and offset together")
    else:
        check_blocksize(nested_blocksize, "nested_blocksize", 16, 4096)
        check_tensor(absmax, "absmax (8-bit codes with double quantization)", torch.uint8, nb, dev)
        check_tensor(nested_absmax, "nested_absmax", torch.float32, num_blocks(nb, nested_blocksize), dev)
        check_tensor(nested_code, "nested_code", torch.float32, 256, dev)
        check_tensor(offset, "offset", torch.float32, 1, dev)
    return n


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


_HUGE_PAGE_MIN_BYTES = 4 << 20


def empty_cpu(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """torch.empty on the CPU; a large buffer is advised onto transparent huge pages before its
    first touch, so that filling it does not cost thousands of 4 KiB page faults."""
    out = torch.empty(tuple(shape), dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if nbytes >= _HUGE_PAGE_MIN_BYTES:
        _C.advise_huge_pages(out.data_ptr(), nbytes)
    return out


def _cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _require_cuda_build() -> None:
    if not _C.has_cuda():
        raise RuntimeError("this nf4lora build has no CUDA kernels (built without nvcc, or with "
                           "NF4LORA_CUDA=OFF); reinstall with nvcc available to use CUDA tensors")


# ---- quantize_4bit ---------------------------------------------------------------------------


@torch.library.custom_op("nf4lora::quantize_4bit", mutates_args=())
def quantize_4bit(A: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    """Blockwise 4-bit quantization of A (flattened, row-major). Returns (packed uint8
    [(n+1)//2, 1], absmax fp32 [ceil(n/blocksize)]). Blocks holding NaN/Inf get absmax NaN."""
    raise NotImplementedError(f"nf4lora::quantize_4bit has no kernel for device {A.device}")


def _quantize_4bit_check(A: Tensor, blocksize: int, quant_type: str) -> tuple[int, int]:
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    check_float_dtype(A.dtype, "A.dtype")
    check_tensor(A, "A")
    n = A.numel()
    return n, num_blocks(n, blocksize)


@quantize_4bit.register_fake
def _(A, blocksize, quant_type):
    n, nb = _quantize_4bit_check(A, blocksize, quant_type)
    return A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), A.new_empty((nb,), dtype=torch.float32)


@quantize_4bit.register_kernel("cpu")
def _(A, blocksize, quant_type):
    n, nb = _quantize_4bit_check(A, blocksize, quant_type)
    packed = empty_cpu(((n + 1) // 2, 1), torch.uint8)
    absmax = torch.empty((nb,), dtype=torch.float32)
    _C.quantize_4bit_cpu(A.data_ptr(), dtype_code(A.dtype), n, blocksize,
                         quant_type_code(quant_type), packed.data_ptr(), absmax.data_ptr(),
                         num_threads())
    return packed, absmax


@quantize_4bit.register_kernel("cuda")
def _(A, blocksize, quant_type):
    _require_cuda_build()
    n, nb = _quantize_4bit_check(A, blocksize, quant_type)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=A.device)
    absmax = torch.empty((nb,), dtype=torch.float32, device=A.device)
    with torch.cuda.device(A.device):
        _C.quantize_4bit_cuda(A.data_ptr(), dtype_code(A.dtype), n, blocksize,
                              quant_type_code(quant_type), packed.data_ptr(), absmax.data_ptr(),
                              0, _cuda_stream(A.device))
    return packed, absmax


# ---- dequantize_4bit (+ out variant); double quantization fused -------------------------------


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


@dequantize_4bit.register_fake
def _(packed, absmax, blocksize, quant_type, shape, dtype, nested_absmax, nested_code, offset,
      nested_blocksize):
    _check_dequant_args(packed, absmax, blocksize, quant_type, shape, dtype, nested_absmax,
                        nested_code, offset, nested_blocksize)
    return packed.new_empty(tuple(shape), dtype=dtype)


@dequantize_4bit_out.register_fake
def _(packed, absmax, blocksize, quant_type, nested_absmax, nested_code, offset, nested_blocksize, out):
    _check_dequant_out(packed, absmax, blocksize, quant_type, nested_absmax, nested_code, offset,
                       nested_blocksize, out)


def _check_dequant_out(packed, absmax, blocksize, quant_type, nested_absmax, nested_code, offset,
                       nested_blocksize, out) -> int:
    check_tensor(out, "out", device=packed.device)
    check_float_dtype(out.dtype, "out.dtype")
    return _check_dequant_args(packed, absmax, blocksize, quant_type, out.shape, out.dtype,
                               nested_absmax, nested_code, offset, nested_blocksize)


def _absmax_ptrs(absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                 offset: Optional[Tensor], nested_blocksize: int) -> tuple:
    """The six absmax arguments every native 4-bit entry point takes (bindings.cpp's
    absmax_source): fp32 absmax, or the 8-bit codes + nested absmax, map, offset, block size."""
    nested = nested_absmax is not None
    return (0 if nested else absmax.data_ptr(), absmax.data_ptr() if nested else 0,
            _ptr(nested_absmax), _ptr(nested_code), _ptr(offset), nested_blocksize)


def _dequant_cpu(packed, absmax, blocksize, quant_type, nested_absmax, nested_code, offset,
                 nested_blocksize, out, n):
    _C.dequantize_4bit_cpu(packed.data_ptr(),
                           *_absmax_ptrs(absmax, nested_absmax, nested_code, offset, nested_blocksize),
                           n, blocksize, quant_type_code(quant_type), out.data_ptr(),
                           dtype_code(out.dtype), num_threads())


def _dequant_cuda(packed, absmax, blocksize, quant_type, nested_absmax, nested_code, offset,
                  nested_blocksize, out, n):
    _require_cuda_build()
    with torch.cuda.device(packed.device):
        _C.dequantize_4bit_cuda(packed.data_ptr(),
                                *_absmax_ptrs(absmax, nested_absmax, nested_code, offset, nested_blocksize),
                                n, blocksize, quant_type_code(quant_type), out.data_ptr(),
                                dtype_code(out.dtype), _cuda_stream(packed.device))


def _register_dequant(device: str, impl) -> None:
    @dequantize_4bit.register_kernel(device)
    def _(packed, absmax, blocksize, quant_type, shape, dtype, nested_absmax, nested_code, offset,
          nested_blocksize):
        n = _check_dequant_args(packed, absmax, blocksize, quant_type, shape, dtype,
                                nested_absmax, nested_code, offset, nested_blocksize)
        out = (empty_cpu(shape, dtype) if device == "cpu"
               else torch.empty(tuple(shape), dtype=dtype, device=packed.device))
        if n:
            impl(packed, absmax, blocksize, quant_type, nested_absmax, nested_code, offset,
                 nested_blocksize, out, n)
        return out

    @dequantize_4bit_out.register_kernel(device)
    def _(packed, absmax, blocksize, quant_type, nested_absmax, nested_code, offset,
          nested_blocksize, out):
        n = _check_dequant_out(packed, absmax, blocksize, quant_type, nested_absmax, nested_code,
                               offset, nested_blocksize, out)
        if n:
            impl(packed, absmax, blocksize, quant_type, nested_absmax, nested_code, offset,
                 nested_blocksize, out, n)


_register_dequant("cpu", _dequant_cpu)
_register_dequant("cuda", _dequant_cuda)


# ---- 8-bit blockwise (double quantization of the absmax) --------------------------------------


@torch.library.custom_op("nf4lora::quantize_blockwise_8bit", mutates_args=())
def quantize_blockwise_8bit(A: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Nearest entry of the sorted 256-value `code` for A / absmax per block (ties to the lower
    entry). Returns (uint8 codes shaped like A, fp32 absmax [ceil(n/blocksize)])."""
    raise NotImplementedError(f"nf4lora::quantize_blockwise_8bit has no kernel for device {A.device}")


def _q8_check(A: Tensor, code: Tensor, blocksize: int) -> tuple[int, int]:
    check_blocksize(blocksize, "blocksize", 16, 4096)
    check_tensor(A, "A", torch.float32)
    check_tensor(code, "code", torch.float32, 256, A.device)
    return A.numel(), num_blocks(A.numel(), blocksize)


@quantize_blockwise_8bit.register_fake
def _(A, code, blocksize):
    _, nb = _q8_check(A, code, blocksize)
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty((nb,), dtype=torch.float32)


@quantize_blockwise_8bit.register_kernel("cpu")
def _(A, code, blocksize):
    n, nb = _q8_check(A, code, blocksize)
    q = torch.empty(A.shape, dtype=torch.uint8)
    absmax = torch.empty((nb,), dtype=torch.float32)
    _C.quantize_8bit_blockwise_cpu(A.data_ptr(), n, blocksize, code.data_ptr(), q.data_ptr(),
                                   absmax.data_ptr(), num_threads())
    return q, absmax


@quantize_blockwise_8bit.register_kernel("cuda")
def _(A, code, blocksize):
    _require_cuda_build()
    n, nb = _q8_check(A, code, blocksize)
    q = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
    absmax = torch.empty((nb,), dtype=torch.float32, device=A.device)
    with torch.cuda.device(A.device):
        _C.quantize_8bit_blockwise_cuda(A.data_ptr(), n, blocksize, code.data_ptr(), q.data_ptr(),
                                        absmax.data_ptr(), 0, _cuda_stream(A.device))
    return q, absmax


@torch.library.custom_op("nf4lora::dequantize_blockwise_8bit", mutates_args=())
def dequantize_blockwise_8bit(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    """code[q] * absmax per block, fp32, shaped like q."""
    raise NotImplementedError(f"nf4lora::dequantize_blockwise_8bit has no kernel for device {q.device}")


def _dq8_check(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> int:
    check_blocksize(blocksize, "blocksize", 16, 4096)
    check_tensor(q, "q", torch.uint8)
    check_tensor(absmax, "absmax", torch.float32, num_blocks(q.numel(), blocksize), q.device)
    check_tensor(code, "code", torch.float32, 256, q.device)
    return q.numel()


@dequantize_blockwise_8bit.register_fake
def _(q, absmax, code, blocksize):
    _dq8_check(q, absmax, code, blocksize)
    return q.new_empty(q.shape, dtype=torch.float32)


@dequantize_blockwise_8bit.register_kernel("cpu")
def _(q, absmax, code, blocksize):
    n = _dq8_check(q, absmax, code, blocksize)
    out = torch.empty(q.shape, dtype=torch.float32)
    _C.dequantize_8bit_blockwise_cpu(q.data_ptr(), absmax.data_ptr(), code.data_ptr(), n,
                                     blocksize, out.data_ptr(), num_threads())
    return out


@dequantize_blockwise_8bit.register_kernel("cuda")
def _(q, absmax, code, blocksize):
    _require_cuda_build()
    n = _dq8_check(q, absmax, code, blocksize)
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    with torch.cuda.device(q.device):
        _C.dequantize_8bit_blockwise_cuda(q.data_ptr(), absmax.data_ptr(), code.data_ptr(), n,
                                          blocksize, out.data_ptr(), _cuda_stream(q.device))
    return out
