"""Lion (Chen et al. 2023) on the fused native step: ``c = beta1 m + (1 - beta1) g``,
``p <- p (1 - lr wd) - lr sign(c)``, ``m <- beta2 m + (1 - beta2) g``, with the momentum in fp32
or bitsandbytes' 8-bit blockwise format, paged or not. Reference: lion-pytorch's update and
bitsandbytes' Lion / Lion8bit. Tested by tests/test_optim_lion.py."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

from ..ops import optim as native
from .base import MIN_8BIT_SIZE, FusedOptimizer, check_types, with_parent_signature


def _check_hyper(lr: Any, betas: Any, weight_decay: Any) -> None:
    check_types(betas, lr=lr, weight_decay=weight_decay)
    native.check_lion(float(lr), float(betas[0]), float(betas[1]), float(weight_decay))


class Lion(FusedOptimizer):
    """Lion with a fused native CPU and CUDA step, as bitsandbytes' Lion / Lion8bit.

    ``optim_bits=32`` keeps the momentum in fp32 (4 bytes/param, ``state["exp_avg"]``); ``8`` in
    bitsandbytes' 8-bit blockwise format with the signed dynamic map (``state1``, ``absmax1``: 1.02
    bytes/param; tensors under ``min_8bit_size`` keep fp32). ``paged=True`` pages large buffers to
    files in ``page_dir`` as AdamW does (managed memory on CUDA). Non-finite gradient blocks are
    skipped as in AdamW.
    """

    ALGORITHM = "lion"
    STATE_KEYS = {32: ("exp_avg",), 8: ("state1", "absmax1")}

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: Tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, optim_bits: int = 32, paged: bool = False,
                 page_dir: Optional[str] = None, min_8bit_size: int = MIN_8BIT_SIZE):
        _check_hyper(lr, betas, weight_decay)
        defaults = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])),
                        weight_decay=float(weight_decay))
        self._setup(params, defaults, optim_bits, paged, page_dir, min_8bit_size)

    def check_group(self, group: Dict[str, Any]) -> None:
        _check_hyper(group["lr"], group["betas"], group["weight_decay"])

    def hyper(self, group: Dict[str, Any], state: Dict[str, Any]) -> Tuple:
        beta1, beta2 = group["betas"]
        return float(group["lr"]), float(beta1), float(beta2), float(group["weight_decay"])


@with_parent_signature
class PagedLion(Lion):
    """Lion with paged state (``paged=True``); ``optim_bits=32`` or ``8``. Takes Lion's arguments."""

    def __init__(self, params: Iterable[Any], *args: Any, paged: bool = True, **kwargs: Any):
        super().__init__(params, *args, paged=paged, **kwargs)


@with_parent_signature
class Lion8bit(Lion):
    """Lion with bitsandbytes-format 8-bit blockwise momentum (``optim_bits=8``)."""

    def __init__(self, params: Iterable[Any], *args: Any, optim_bits: int = 8, **kwargs: Any):
        super().__init__(params, *args, optim_bits=optim_bits, **kwargs)


@with_parent_signature
class PagedLion8bit(Lion):
    """Lion with paged 8-bit blockwise momentum (``optim_bits=8, paged=True``)."""

    def __init__(self, params: Iterable[Any], *args: Any, optim_bits: int = 8, paged: bool = True,
                 **kwargs: Any):
        super().__init__(params, *args, optim_bits=optim_bits, paged=paged, **kwargs)
