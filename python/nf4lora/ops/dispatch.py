"""The op layer's dispatch policy: one object, ``DISPATCH``, holding every machine-dependent choice
of how a 4-bit product runs (fused kernel or dequantize + dense GEMM, the GEMM's precision on the
CPU, which CUDA kernel) and of the CPU attention's route (ops/attention.py). The ops ask it on each
call; code above the op layer asks it too (``DISPATCH.fused_rows``, ``DISPATCH.cpu_gemm_in_fp32``,
``DISPATCH.cpu_attention_route``) instead of keeping constants of its own.

The CPU choices are measured on the running machine (ops/calibrate.py) the first time they are
needed, and cached per machine; a field set here (tests, ``DISPATCH.override(...)``, the
environment variable NF4LORA_DISPATCH="cpu_gemm_fp32=1,cpu_fused_max_rows=4,cpu_attention=gqa")
forces a choice and takes precedence. Two of the choices live in the native core (the CPU
products' kernel variant and their thread grain): DISPATCH installs them there whenever they or its
calibration change. NF4LORA_CALIBRATE=0 turns measuring off (then the kernels' own limits, torch's
own GEMM precision and transformers' sdpa attention are used). Tested by tests/test_calibrate.py,
tests/test_attention.py, tests/test_matmul.py and tests/test_cuda_matmul.py."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator, Optional

import torch

# The fused CPU kernels take at most this many rows (nf4lora/matmul.h), and the CUDA ones too.
FUSED_KERNEL_MAX_ROWS = 8
# matmul.h's kMatmulDefaultGrainBytes, in KiB: below twice this much packed weight a product runs
# on one thread.
DEFAULT_GRAIN_KIB = 256
MAX_GRAIN_KIB = 1 << 20
_NATIVE_FIELDS = ("cpu_matmul_variant", "cpu_grain_kib", "calibration")


@dataclasses.dataclass
class DispatchPolicy:
    """Crossovers are row counts M of x (of grad_y for the transposed product): up to them the
    fused kernel runs, above them W is dequantized into a scratch buffer for a dense GEMM.
    None = the calibrated choice."""

    cpu_fused_max_rows: Optional[int] = None    # forward, fused CPU kernel
    cpu_fused_t_max_rows: Optional[int] = None  # transposed product (backward), fused CPU kernel
    # A bf16 dense GEMM on the CPU as an fp32 GEMM over the same values, rounded once.
    cpu_gemm_fp32: Optional[bool] = None
    # The fused CPU products' kernel variant ("avx512", "avx512_bf16", ...; nf4lora.set_cpu_variant
    # forces one for every kernel and wins) and their thread grain in KiB of packed weight.
    cpu_matmul_variant: Optional[str] = None
    cpu_grain_kib: Optional[int] = None
    # bf16 attention on the CPU: one of ops/attention.py ROUTES ("sdpa", "gqa", "fp32").
    cpu_attention: Optional[str] = None
    # CUDA: measured on an H200 (docs/decisions.md); not calibrated yet.
    cuda_gemv_max_rows: int = 3        # forward fused GEMV
    cuda_gemv_t_max_rows: int = 1      # transposed fused GEMV
    calibration: Any = dataclasses.field(default=None, repr=False)  # ops.calibrate.Calibration

    def __setattr__(self, name: str, value) -> None:
        previous = self.__dict__.get(name)
        object.__setattr__(self, name, value)
        if name in _NATIVE_FIELDS and self.__dict__.get("_owns_native"):
            try:
                self._install_native()
            except ValueError:  # an unusable choice is refused and changes nothing
                object.__setattr__(self, name, previous)
                self._install_native()
                raise

    def _install_native(self) -> None:
        """Pushes the native choices (forced field, else the calibration's, else the defaults)
        into the core; asks for no calibration of its own."""
        from .native import set_matmul_choices
        cal = self.calibration.choices if self.calibration is not None else {}
        variant = self.cpu_matmul_variant or cal.get("cpu_matmul_variant")
        grain = self.cpu_grain_kib if self.cpu_grain_kib is not None else cal.get("cpu_grain_kib", DEFAULT_GRAIN_KIB)
        set_matmul_choices(variant, grain * 1024)

    def cpu_matmul_choices(self) -> tuple[str, int]:
        """(kernel variant, grain in KiB) of the fused CPU products, calibrating first if needed.
        The products themselves read them from the core, which this keeps in step."""
        return self._choice("cpu_matmul_variant"), self._choice("cpu_grain_kib")

    def _choice(self, name: str):
        forced = getattr(self, name)
        if forced is not None:
            return forced
        return _calibrated(self, name)

    def cpu_rows(self) -> int:
        """Rows of x up to which the forward product runs in the fused CPU kernel."""
        return self._choice("cpu_fused_max_rows")

    def cpu_t_rows(self) -> int:
        """Rows of grad_y up to which the transposed product runs in the fused CPU kernel."""
        return self._choice("cpu_fused_t_max_rows")

    def fused_rows(self, device: torch.device) -> int:
        """Rows up to which a product on `device` (either direction) runs in a fused kernel."""
        if device.type == "cpu":
            return max(self.cpu_rows(), self.cpu_t_rows())
        if device.type == "cuda":
            return max(self.cuda_gemv_max_rows, self.cuda_gemv_t_max_rows)
        return 0

    def cpu_gemm_in_fp32(self, dtype: torch.dtype) -> bool:
        """Whether a CPU GEMM in `dtype` above the fused sizes runs as an fp32 GEMM (bf16 only)."""
        if dtype != torch.bfloat16:
            return False
        return bool(self._choice("cpu_gemm_fp32"))

    def cpu_attention_route(self, dtype: torch.dtype) -> str:
        """How attention over `dtype` q, k, v runs on the CPU (ops/attention.py ROUTES); not bf16:
        "sdpa", transformers' own."""
        if dtype != torch.bfloat16:
            return "sdpa"
        return self._choice("cpu_attention")

    @contextlib.contextmanager
    def override(self, **choices) -> Iterator["DispatchPolicy"]:
        """Forces the given fields for the duration of the block, then restores them."""
        _check_names(choices)
        _check_values(choices)
        saved = {name: getattr(self, name) for name in choices}
        try:  # a choice refused while setting (an unusable variant) restores the ones set before it
            for name, value in choices.items():
                setattr(self, name, value)
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)


@torch.compiler.assume_constant_result
def _calibrated(policy: DispatchPolicy, name: str):
    """policy's calibrated choice `name`, measured (or read from the cache) on first use. Under
    torch.compile it runs once at trace time and its result is a constant of the graph: loading a
    calibration reads /proc/cpuinfo and files, which Dynamo cannot trace (a graph break in the
    middle of every model's forward otherwise; tests/test_compile.py). A graph traced before a later
    ``nf4lora.ops.calibrate()`` keeps the choices it was traced with."""
    if policy.calibration is None:
        from .calibrate import current  # the first product that needs a choice measures them
        policy.calibration = current()
    return policy.calibration.choices[name]


_FORCEABLE = ("cpu_fused_max_rows", "cpu_fused_t_max_rows", "cpu_gemm_fp32", "cpu_matmul_variant",
              "cpu_grain_kib", "cpu_attention", "cuda_gemv_max_rows", "cuda_gemv_t_max_rows")


def _check_names(choices) -> None:
    unknown = set(choices) - set(_FORCEABLE)
    if unknown:
        raise ValueError(f"unknown dispatch choices {sorted(unknown)}; known: {list(_FORCEABLE)}")


def _check_values(choices) -> None:
    from .attention import ROUTES
    route = choices.get("cpu_attention")
    if route is not None and route not in ROUTES:
        raise ValueError(f"cpu_attention must be one of {ROUTES}, got {route!r}")


def parse_forced(text: str) -> dict:
    """'cpu_gemm_fp32=1,cpu_fused_max_rows=4' -> {'cpu_gemm_fp32': True, 'cpu_fused_max_rows': 4}.
    A variant name is checked when it is installed (set_matmul_choices: ValueError if this
    machine cannot run it)."""
    out: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip().lower()
        _check_names([name])
        if not sep:
            raise ValueError(f"NF4LORA_DISPATCH: {item!r} is not name=value")
        if name == "cpu_gemm_fp32":
            if value not in ("1", "0", "true", "false"):
                raise ValueError(f"NF4LORA_DISPATCH: cpu_gemm_fp32 must be 1/0/true/false, got {value!r}")
            out[name] = value in ("1", "true")
        elif name == "cpu_attention":
            _check_values({name: value})
            out[name] = value
        elif name == "cpu_matmul_variant":
            out[name] = value
        else:
            if not value.isdigit():
                raise ValueError(f"NF4LORA_DISPATCH: {name} must be a non-negative int, got {value!r}")
            out[name] = int(value)
            if name == "cpu_grain_kib" and not 1 <= out[name] <= MAX_GRAIN_KIB:
                raise ValueError(f"NF4LORA_DISPATCH: cpu_grain_kib must be in 1..{MAX_GRAIN_KIB}, got {value}")
    return out


DISPATCH = DispatchPolicy(**parse_forced(os.environ.get("NF4LORA_DISPATCH", "")))
# DISPATCH alone keeps the core's choices in step (a DispatchPolicy built elsewhere, e.g. in a test,
# changes nothing native); a forced variant or grain takes effect now (ValueError if unusable).
object.__setattr__(DISPATCH, "_owns_native", True)
DISPATCH._install_native()
