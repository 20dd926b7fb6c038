"""RMSNorm over bf16 rows on the CPU (cpp/include/nf4lora/norm.h) for the trainer's fused norm
(train/fused_norm.py): the forward with torch's roundings (the same bits as LlamaRMSNorm's
forward), the backward in one pass per row. Tested by tests/test_fused_norm.py."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .matmul import is_plain_eager_cpu
from .native import TORCH_SUM_LANES, _C, num_threads


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether the native kernels take this norm: bf16 x and weight, plain eager CPU tensors."""
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and is_plain_eager_cpu(x)
            and is_plain_eager_cpu(weight) and weight.dim() == 1 and x.shape[-1] == weight.shape[0]
            and x.numel() > 0)


def rms_norm_bf16(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y bf16 like x, rstd fp32 [rows]) for bf16 x [..., n] and weight [n] (see applies())."""
    n = weight.shape[0]
    xc, wc = x.contiguous(), weight.contiguous()
    rows = xc.numel() // n
    y = torch.empty_like(xc)
    rstd = torch.empty(rows, dtype=torch.float32)
    _C.rms_norm_bf16_cpu(xc.data_ptr(), wc.data_ptr(), rows, n, float(eps), TORCH_SUM_LANES, y.data_ptr(),
                         rstd.data_ptr(), num_threads())
    return y, rstd


def rms_norm_bf16_backward(x: Tensor, weight: Tensor, rstd: Tensor, grad_y: Tensor, need_x: bool,
                           need_w: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(dL/dx bf16 like x or None, dL/dw fp32 [n] or None) of rms_norm_bf16."""
    n = weight.shape[0]
    xc, wc, gc = x.contiguous(), weight.contiguous(), grad_y.contiguous()
    rows = xc.numel() // n
    gx = torch.empty_like(xc) if need_x else None
    gw = torch.empty(n, dtype=torch.float32) if need_w else None
    _C.rms_norm_backward_bf16_cpu(xc.data_ptr(), wc.data_ptr(), rstd.data_ptr(), gc.data_ptr(), rows, n,
                                  TORCH_SUM_LANES, 0 if gx is None else gx.data_ptr(),
                                  0 if gw is None else gw.data_ptr(), num_threads())
    return gx, gw
