"""LoftQ and PiSSA initialization: adapters computed from the dense weight W so that the
quantized base plus the adapter starts closer to W than the quantized base alone.

LoftQ (arXiv 2310.08659): L R = 0; repeat loftq_iter times { Q = quant(W - L R);
L R = best rank-r approximation of W - deq(Q) (truncated SVD) }; then s.B.A = L R, base = Q.
PiSSA (arXiv 2404.02948): s.B.A = top-r SVD part of W; base = W - s.B.A (quantized: QPiSSA).
Unlike PEFT's loftq_init, the split honours the LoRA scaling s (PEFT's assumes s = 1).
Tested by tests/test_loftq.py (real SmolLM2-135M layers, invariants of the decomposition)."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ..quant import QuantState, dequantize_4bit, quantize_4bit

# Above this many rows/columns a randomized SVD (torch.svd_lowrank) replaces the full one: a full
# SVD of a 4096x11008 fp32 matrix takes about a minute on two cores, the randomized one seconds.
FULL_SVD_MAX_DIM = 2048


@dataclasses.dataclass(eq=False)
class LoftQResult:
    """The quantized base (packed, state), the adapter (A [r, K], B [N, r], fp32) for scaling s,
    and relative Frobenius errors ||W - W_hat|| / ||W|| of plain quantization (error_before)
    and of deq(Q) + s.B.A (error_after)."""

    packed: Tensor
    state: QuantState
    A: Tensor
    B: Tensor
    error_before: float
    error_after: float


def _top_r(m: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U_r [N, r], S_r [r], Vh_r [r, K]) of the best rank-r approximation of m (fp32)."""
    if min(m.shape) <= FULL_SVD_MAX_DIM:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    U, S, V = torch.svd_lowrank(m, q=min(min(m.shape), 2 * r + 8), niter=6)
    return U[:, :r], S[:r], V[:, :r].T


def _check(weight: Tensor, r: int, scaling: float) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor, got {getattr(weight, 'shape', type(weight))}")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if r > min(weight.shape):
        raise ValueError(f"r={r} exceeds min(weight.shape) = {min(weight.shape)}")
    if not (scaling > 0 and math.isfinite(scaling)):
        raise ValueError(f"scaling must be positive and finite, got {scaling}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf")


def _relative_error(w: Tensor, w_hat: Tensor) -> float:
    return float(torch.linalg.matrix_norm(w - w_hat) / torch.linalg.matrix_norm(w).clamp(min=1e-30))


@torch.no_grad()
def loftq_init(weight: Tensor, r: int, scaling: float, num_iter: int = 1, quant_type: str = "nf4",
               blocksize: int = 64, double_quant: bool = True) -> LoftQResult:
    """LoftQ: alternate 4-bit quantization and a rank-r SVD of the residual `num_iter` times.

    Works from any float weight (a bf16 checkpoint included; the math runs in fp32). The
    returned state keeps weight.dtype as its original dtype."""
    _check(weight, r, scaling)
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter must be a positive int, got {num_iter!r}")
    w = weight.detach().float()
    lowrank = None
    error_before = None
    for _ in range(num_iter):
        target = w if lowrank is None else w - lowrank
        packed, state = quantize_4bit(target.contiguous(), blocksize, quant_type, double_quant)
        q = dequantize_4bit(packed, state, dtype=torch.float32)
        if error_before is None:
            error_before = _relative_error(w, q)
        U, S, Vh = _top_r(w - q, r)
        root = (S / scaling).sqrt()
        B, A = U * root, root[:, None] * Vh  # scaling * B @ A = U diag(S) Vh
        lowrank = scaling * (B @ A)
    error_after = _relative_error(w, q + lowrank)
    state = dataclasses.replace(state, dtype=weight.dtype)
    return LoftQResult(packed, state, A.contiguous(), B.contiguous(), error_before, error_after)


@torch.no_grad()
def pissa_init(weight: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA: (A [r, K], B [N, r], residual [N, K]) in fp32 with scaling.B.A the top-r SVD part of
    the weight and residual = weight - scaling.B.A (quantize the residual for QPiSSA)."""
    _check(weight, r, scaling)
    w = weight.detach().float()
    U, S, Vh = _top_r(w, r)
    root = (S / scaling).sqrt()
    B, A = U * root, root[:, None] * Vh
    return A.contiguous(), B.contiguous(), w - scaling * (B @ A)
