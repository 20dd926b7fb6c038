"""RMSNorm with a hand-written backward, for the trainer: transformers' LlamaRMSNorm (and the
norms of the same formula) as one autograd function instead of the ~6 forward and ~12 backward
ops autograd records for it. Same forward formula and roundings as transformers:

    y = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)     (the statistics in fp32)

and the backward of that formula in fp32 from the saved x and 1/rms (the rounding of x_hat to
x's dtype is taken as identity, as autograd does for a dtype cast):

    g_hat = g * w;  dL/dx = rstd * (g_hat - x_hat * mean(g_hat * x_hat));  dL/dw = sum(g * x_hat)

Fewer ops (each reading and writing the whole activation) on every CPU alike, so it is not a
calibrated choice (docs/decisions.md has the measurement). bf16 on the CPU runs the native
kernels of nf4lora/norm.h (ops/norm.py): the same forward bits, the backward's formula in fp32 in
one pass per row (NATIVE = False: the torch ops below). use_fused_rmsnorm(model) switches a
model's norms of a known class; restore_rmsnorm(modules) switches them back. Tested by
tests/test_fused_norm.py (forward and gradients against transformers' module and float64)."""
from __future__ import annotations

import types

import torch
from torch import nn

from ..ops import norm as native_norm

# Set to False to run the torch-ops version everywhere (A/B, tests).
NATIVE = True

# Classes whose forward is exactly LlamaRMSNorm's formula (Gemma's uses 1 + w: not listed).
KNOWN_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.native = NATIVE and native_norm.applies(x, weight)
        if ctx.native:  # bf16 on the CPU: one pass per row, the same bits as below (ops/norm.py)
            y, rstd = native_norm.rms_norm_bf16(x, weight, eps)
            ctx.save_for_backward(x, weight, rstd)
            return y
        x32 = x.to(torch.float32, copy=True)  # a fresh buffer even for fp32 x (scaled in place below)
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return weight * x32.mul_(rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        if ctx.native:
            grad_x, grad_w = native_norm.rms_norm_bf16_backward(x, weight, rstd, grad_y, ctx.needs_input_grad[0],
                                                                ctx.needs_input_grad[1])
            return grad_x, None if grad_w is None else grad_w.to(weight.dtype), None
        x_hat = x.to(torch.float32, copy=True).mul_(rstd)
        g32 = grad_y.float()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_hat = g32 * weight.float()
            dot = (g_hat * x_hat).mean(-1, keepdim=True)
            grad_x = g_hat.sub_(x_hat * dot).mul_(rstd).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g32 * x_hat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's forward, through RMSNormFunction."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: x's last dimension {x.shape[-1]} != weight's {weight.shape[-1]}")
    return RMSNormFunction.apply(x, weight, float(eps))


def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def use_fused_rmsnorm(model: nn.Module) -> list:
    """Switches every norm of a KNOWN_NORMS class in `model` to rms_norm; returns those modules."""
    switched = []
    for module in model.modules():
        if (type(module).__name__ in KNOWN_NORMS and "forward" not in module.__dict__
                and isinstance(getattr(module, "weight", None), torch.Tensor)
                and isinstance(getattr(module, "variance_epsilon", None), float)):
            module.forward = types.MethodType(_forward, module)
            switched.append(module)
    return switched


def restore_rmsnorm(modules: list) -> None:
    """Undoes use_fused_rmsnorm for the modules it returned."""
    for module in modules:
        module.__dict__.pop("forward", None)
