"""Loads the native core ``nf4lora._C`` and holds the small glue shared by the op layer:
dtype/quant-type codes, the CPU variant switch, the thread count passed to kernels."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

try:
    from . import _C  # type: ignore[attr-defined]
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


if os.environ.get("NF4LORA_CPU_VARIANT"):
    set_cpu_variant(os.environ["NF4LORA_CPU_VARIANT"])
