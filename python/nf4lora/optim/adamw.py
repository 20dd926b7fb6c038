"""AdamW (decoupled weight decay, bias correction) on the fused native step, with fp32 or
bitsandbytes-format 8-bit state, paged or not. Reference: torch.optim.AdamW (the update) and
bitsandbytes' AdamW8bit / PagedAdamW (the 8-bit layout, what is paged). Tested by
tests/test_optim.py against both."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

from ..ops import optim as native
from .base import MIN_8BIT_SIZE, FusedOptimizer, check_types, with_parent_signature


def _check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    check_types(betas, lr=lr, eps=eps, weight_decay=weight_decay)
    native.check_adamw(float(lr), float(betas[0]), float(betas[1]), float(eps), float(weight_decay))


class AdamW(FusedOptimizer):
    """AdamW with a fused native step.

    ``optim_bits=32`` matches ``torch.optim.AdamW`` (to ~1e-6 relative over 100 steps); ``8`` keeps
    the moments in bitsandbytes' 8-bit blockwise format (2.03 bytes/param instead of 8).
    ``paged=True`` pages large state buffers (CUDA managed memory, or files in ``page_dir`` on the
    CPU). Params may be fp32, fp16 or bf16 (state is fp32 or 8-bit either way), on the CPU or CUDA.
    """

    ALGORITHM = "adamw"
    STATE_KEYS = {32: ("exp_avg", "exp_avg_sq"), 8: ("state1", "state2", "absmax1", "absmax2")}

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, optim_bits: int = 32,
                 paged: bool = False, page_dir: Optional[str] = None,
                 min_8bit_size: int = MIN_8BIT_SIZE):
        _check_hyper(lr, betas, eps, weight_decay)
        defaults = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
                        weight_decay=float(weight_decay))
        self._setup(params, defaults, optim_bits, paged, page_dir, min_8bit_size)

    def check_group(self, group: Dict[str, Any]) -> None:
        _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def hyper(self, group: Dict[str, Any], state: Dict[str, Any]) -> Tuple:
        beta1, beta2 = group["betas"]
        return (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                float(group["weight_decay"]), int(state["step"]))


@with_parent_signature
class PagedAdamW(AdamW):
    """AdamW with paged state (``paged=True``); ``optim_bits=32`` or ``8``. Takes AdamW's arguments."""

    def __init__(self, params: Iterable[Any], *args: Any, paged: bool = True, **kwargs: Any):
        super().__init__(params, *args, paged=paged, **kwargs)


@with_parent_signature
class AdamW8bit(AdamW):
    """AdamW with bitsandbytes-format 8-bit blockwise state (``optim_bits=8``). Takes AdamW's arguments."""

    def __init__(self, params: Iterable[Any], *args: Any, optim_bits: int = 8, **kwargs: Any):
        super().__init__(params, *args, optim_bits=optim_bits, **kwargs)


@with_parent_signature
class PagedAdamW8bit(AdamW):
    """AdamW with paged 8-bit blockwise state (``optim_bits=8, paged=True``). Takes AdamW's arguments."""

    def __init__(self, params: Iterable[Any], *args: Any, optim_bits: int = 8, paged: bool = True,
                 **kwargs: Any):
        super().__init__(params, *args, optim_bits=optim_bits, paged=paged, **kwargs)
