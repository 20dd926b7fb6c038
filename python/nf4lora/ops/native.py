"""Loads the native core ``nf4lora._C`` (the op layer's modules are the only ones that use it) and
holds the small glue they share: dtype/quant-type codes, the codebook tables read from the native
format header, the CPU variant switch and the thread count passed to kernels."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Union

import torch

try:
    from .. import _C  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "nf4lora's native extension nf4lora._C is missing or failed to load "
        f"({exc}). Install the package with `pip install .` so that CMake builds it."
    ) from exc

BUILD_INFO: str = _C.BUILD_INFO

_DTYPE_CODES = {
    torch.float32: _C.DTYPE_F32,
    torch.float16: _C.DTYPE_F16,
    torch.bfloat16: _C.DTYPE_BF16,
}
FLOAT_DTYPES = tuple(_DTYPE_CODES)
QUANT_TYPES = {"nf4": _C.QUANT_TYPE_NF4, "fp4": _C.QUANT_TYPE_FP4}


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES[dtype]


def quant_type_code(quant_type: str) -> int:
    return QUANT_TYPES[quant_type]


def codebook(quant_type: str, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """The 16-entry fp32 codebook (bitsandbytes' quant_map) from the native format header."""
    if quant_type == "nf4":
        values = _C.nf4_codebook()
    elif quant_type == "fp4":
        values = _C.fp4_codebook()
    else:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return torch.tensor(values, dtype=torch.float32, device=device)


def dynamic_map(signed: bool = True, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (signed: double quantization; unsigned: Adam's 2nd moment)."""
    return torch.tensor(_C.dynamic_map(signed), dtype=torch.float32, device=device)


def num_threads() -> int:
    return max(1, torch.get_num_threads())


def has_cuda() -> bool:
    """True when this build contains the CUDA kernels (a GPU is still needed to run them)."""
    return bool(_C.has_cuda())


def cpu_variants(supported_only: bool = True) -> list[str]:
    """Names of the CPU kernel variants: the ones this machine can run, or all compiled ones."""
    return [name for name, compiled, supported in _C.cpu_variants()
            if (supported if supported_only else compiled)]


def active_cpu_variant() -> str:
    return _C.active_cpu_variant()


_forced: list[Optional[str]] = [None]  # the variant forced through set_cpu_variant, if any


def set_cpu_variant(name: Optional[str]) -> None:
    """Force a CPU variant ("ref", "avx2", "avx512", "avx512_bf16") for all later calls;
    None = automatic (which never picks avx512_bf16: see best_cpu_variant in dispatch.cpp).

    Raises ValueError for an unknown name or one this machine cannot run."""
    if name is not None and name not in cpu_variants(supported_only=False):
        raise ValueError(f"unknown CPU variant {name!r}; compiled: {cpu_variants(False)}")
    _C.force_cpu_variant(name)  # ValueError if not supported here
    _forced[0] = name


@contextlib.contextmanager
def use_cpu_variant(name: Optional[str]) -> Iterator[None]:
    """Context manager form of set_cpu_variant; restores the previous choice on exit."""
    previous = _forced[0]
    set_cpu_variant(name)
    try:
        yield
    finally:
        set_cpu_variant(previous)


def cpu_variant_forced() -> bool:
    """Whether set_cpu_variant / NF4LORA_CPU_VARIANT forces a variant (it then wins over the
    calibrated product variant below)."""
    return _forced[0] is not None


def best_cpu_variant() -> str:
    """The variant used when nothing is forced or calibrated (dispatch.cpp's best_cpu_variant)."""
    return _C.best_cpu_variant()


def set_matmul_choices(variant: Optional[str], grain_bytes: int) -> None:
    """Installs the machine-dependent choices of the CPU 4-bit products (matmul.h): the kernel
    variant used when none is forced (None: best_cpu_variant()), and the least packed-weight bytes
    a thread gets before another one is woken. DISPATCH calls this; ValueError on a bad value."""
    if variant is not None and variant not in cpu_variants(supported_only=True):
        raise ValueError(f"CPU variant {variant!r} is not one this machine runs ({cpu_variants()})")
    _C.set_matmul_cpu_variant(variant)
    _C.set_matmul_grain_bytes(int(grain_bytes))


def matmul_choices() -> tuple[str, int]:
    """(the products' active variant, their grain in bytes), as the native core holds them."""
    return _C.active_matmul_cpu_variant(), int(_C.matmul_grain_bytes())


if os.environ.get("NF4LORA_CPU_VARIANT"):
    set_cpu_variant(os.environ["NF4LORA_CPU_VARIANT"])


def ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


# Lanes of torch's fp32 sum kernel, whose order the native RMSNorms (decode step, trainer's norm)
# follow to give torch's bits: torch registers that kernel without its AVX-512 build, so 8 on every
# x86 CPU (cpp/src/torch_order.h).
TORCH_SUM_LANES = 8


def absmax_pointers(w) -> tuple:
    """The six absmax arguments every native 4-bit entry point takes (bindings.cpp's
    absmax_source) for a Weight4bit: fp32 absmax, or the 8-bit codes + nested absmax, map,
    offset and nested block size."""
    if w.nested_absmax is None:
        return (w.absmax.data_ptr(), 0, 0, 0, 0, w.nested_blocksize)
    return (0, w.absmax.data_ptr(), w.nested_absmax.data_ptr(), w.nested_code.data_ptr(),
            w.offset.data_ptr(), w.nested_blocksize)
