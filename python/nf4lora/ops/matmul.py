"""The 4-bit product as the layers above call it: ``matmul_4bit(x, w, bias)`` with w a Weight4bit,
differentiable in x and bias; the frozen base weight never gets a gradient, and backward keeps
nothing but references to the packed weight (no dequantized weight, no activation).

    forward:   y = x W^T + b            W = dequantize(w)   [N, K]
    backward:  dL/dx = dL/dy W          (from the packed weight again: nf4lora::matmul_4bit_t)
               dL/db = sum over all leading dims of dL/dy
               dL/dW: none (frozen)

One backward formula (``_backward``) serves both routes into the op: the registered autograd of
``nf4lora::matmul_4bit`` (under torch.compile/export, dispatch modes, functorch transforms,
tensor subclasses, CUDA) and, for plain CPU tensors in eager mode, ``_EagerCpu``, which
calls the op's CPU implementation without the custom-op dispatcher (it costs more than a small
product). Both routes run the same checks, kernels and dispatch policy. ``forward``,
``grad_input`` and ``dequantized`` give fused layers (LoRA) the same routes without autograd.
Tested by tests/test_matmul.py (float64 reference, finite differences, opcheck, torch.compile)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cpu, library
from .buffers import scratch
from .checks import check_grad_input, check_matmul, check_weight
from .weight import Weight4bit

_PLAIN = (Tensor, torch.nn.Parameter)


def is_plain_eager_cpu(x: Tensor) -> bool:
    """True when a product may skip the custom op: a plain CPU tensor, run eagerly. Under
    torch.compile/export, a dispatch mode (fake tensors, FlopCounterMode, ...), functorch
    transforms or functionalization, and for tensor subclasses, the op is called as registered."""
    return (x.device.type == "cpu" and type(x) in _PLAIN
            and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and not torch._is_functional_tensor(x))


def forward(x: Tensor, w: Weight4bit, bias: Optional[Tensor] = None, *, weight_checked: bool = False) -> Tensor:
    """x W^T + b without autograd of its own, through the eager CPU route or the op.
    weight_checked: the caller has run check_weight on these very tensors (Linear4bit's cached
    weight, tests/test_linear4bit.py): the eager CPU route skips it."""
    if is_plain_eager_cpu(x) and (bias is None or type(bias) in _PLAIN):
        check_matmul(x, w, bias)
        if not weight_checked:
            check_weight(w)
        return cpu.matmul(x, w, bias)
    return library.matmul_4bit(x, *w.op_args(), bias)


def grad_input(grad_y: Tensor, w: Weight4bit) -> Tensor:
    """grad_y @ W, as forward chooses. Under create_graph (grad mode on) always the op, which has
    no double backward: a second derivative is then an error, not a silent zero."""
    if is_plain_eager_cpu(grad_y) and not torch.is_grad_enabled():
        check_grad_input(grad_y, w)
        check_weight(w)
        return cpu.matmul_t(grad_y, w)
    return library.matmul_4bit_t(grad_y, *w.op_args())


def dequantized(w: Weight4bit, dtype: torch.dtype) -> Tensor:
    """W [N, K] in `dtype`, in this thread's reused scratch buffer (valid until the next product
    of the same shape on this thread); fp32 gives the values the fused CPU kernels use."""
    if is_plain_eager_cpu(w.packed):
        check_weight(w)
        return cpu.dequantized(w, dtype)
    out = scratch(w.shape, dtype, w.packed.device)
    library.dequantize_4bit_out(w.packed, w.absmax, w.blocksize, w.quant_type, w.nested_absmax,
                                w.nested_code, w.offset, w.nested_blocksize, out)
    return out


def _backward(w: Weight4bit, grad_y: Tensor, need_x: bool, need_bias: bool):
    grad_x = grad_input(grad_y, w) if need_x else None
    grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if need_bias else None
    return grad_x, grad_bias


class _EagerCpu(torch.autograd.Function):
    """matmul_4bit's autograd for plain CPU tensors in eager mode (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, bias, w):
        ctx.w = w
        ctx.has_bias = bias is not None
        return forward(x, w, bias)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x, grad_bias = _backward(ctx.w, grad_y, ctx.needs_input_grad[0],
                                      ctx.has_bias and ctx.needs_input_grad[1])
        return grad_x, grad_bias, None


def _setup_context(ctx, inputs, output):
    x, *weight_args, bias = inputs
    ctx.w = Weight4bit.from_op_args(*weight_args)
    ctx.has_bias = bias is not None


def _op_backward(ctx, grad_y):
    grad_x, grad_bias = _backward(ctx.w, grad_y, ctx.needs_input_grad[0],
                                  ctx.has_bias and ctx.needs_input_grad[10])
    return (grad_x,) + (None,) * 9 + (grad_bias,)


torch.library.register_autograd("nf4lora::matmul_4bit", _op_backward, setup_context=_setup_context)


def matmul_4bit(x: Tensor, w: Weight4bit, bias: Optional[Tensor] = None) -> Tensor:
    """x [..., K] @ W^T (+ bias), in x's dtype (the autocast dtype inside torch.autocast);
    differentiable in x and bias only."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        if bias is not None:
            bias = bias.to(dtype)
    if (is_plain_eager_cpu(x) and torch.is_grad_enabled()
            and (x.requires_grad or (bias is not None and bias.requires_grad))):
        return _EagerCpu.apply(x, bias, w)
    return forward(x, w, bias)  # no grad needed, or the op and its registered autograd
