"""The op layer's dispatch policy: one object, ``DISPATCH``, holding every machine-dependent choice
of how a 4-bit product runs (fused kernel or dequantize + dense GEMM, the GEMM's precision on the
CPU, which CUDA kernel). The ops read it on each call; code above the op layer asks it
(``DISPATCH.fused_rows``, ``DISPATCH.cpu_gemm_in_fp32``) instead of keeping constants of its own.
Tests and benchmarks force a choice with ``DISPATCH.override(...)``. Where the defaults come from
is written in docs/decisions.md. Tested by tests/test_matmul.py, tests/test_cuda_matmul.py."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import torch


def _cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # pragma: no cover - torch without the probe compiled in
        return False


@dataclasses.dataclass
class DispatchPolicy:
    """Crossovers are row counts M of x (of grad_y for the transposed product): up to them the
    fused kernel runs, above them W is dequantized into a scratch buffer for a dense GEMM."""

    cpu_fused_max_rows: int = 8        # forward, fused CPU kernel (the kernels take up to 8)
    cpu_fused_t_max_rows: int = 8      # transposed product (backward), fused CPU kernel
    # A bf16 dense GEMM on the CPU as an fp32 GEMM over the same values, rounded once: None =
    # automatic (where torch reports no AMX), True/False force it.
    cpu_gemm_fp32: Optional[bool] = None
    cuda_gemv_max_rows: int = 3        # forward fused GEMV on CUDA
    cuda_gemv_t_max_rows: int = 1      # transposed fused GEMV on CUDA
    cuda_tc_max_rows: int = 0          # tensor-core kernel: off (slower than dequantize + cuBLAS)
    has_amx: bool = dataclasses.field(default_factory=_cpu_has_amx)

    def fused_rows(self, device: torch.device) -> int:
        """Rows up to which a product on `device` (either direction) runs in a fused kernel."""
        if device.type == "cpu":
            return max(self.cpu_fused_max_rows, self.cpu_fused_t_max_rows)
        if device.type == "cuda":
            return max(self.cuda_gemv_max_rows, self.cuda_gemv_t_max_rows)
        return 0

    def cpu_gemm_in_fp32(self, dtype: torch.dtype) -> bool:
        """Whether a CPU GEMM in `dtype` above the fused sizes runs as an fp32 GEMM (bf16 only)."""
        if dtype != torch.bfloat16:
            return False
        return (not self.has_amx) if self.cpu_gemm_fp32 is None else bool(self.cpu_gemm_fp32)

    @contextlib.contextmanager
    def override(self, **choices) -> Iterator["DispatchPolicy"]:
        """Sets the given fields for the duration of the block, then restores them."""
        unknown = set(choices) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown dispatch choices {sorted(unknown)}; known: "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        saved = {name: getattr(self, name) for name in choices}
        for name, value in choices.items():
            setattr(self, name, value)
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)


DISPATCH = DispatchPolicy()
