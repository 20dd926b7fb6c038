"""head_cross_entropy: sum over rows of cross_entropy(h W^T + b, t) for a frozen dense output head
(the lm_head over a vocabulary of V tokens), computed the way bf16 autocast computes it on the CPU
but without its float32 [rows, V] tensors and with fp32 GEMMs over bf16 values.

    reference (bf16 autocast):  z = bf16(h W^T + b)        (bf16 GEMM, fp32 accumulation)
                                loss = sum_i  logsumexp(z_i) - z_i[t_i]       (fp32)
                                dL/dz = g * (softmax(z) - onehot(t)), rounded to bf16
                                dL/dh = bf16(dL/dz W)
    here: z is written into one bf16 [rows, V] buffer, a vocabulary slice of W at a time widened to
    fp32 for the GEMM (exact); the loss is taken from z in fp32 a few rows at a time, and the same
    buffer is overwritten in place with softmax(z) - onehot(t) rounded to bf16 (the only thing
    backward keeps); backward multiplies by g and runs dL/dh the same way. fp32 GEMMs only on a CPU
    where they beat bf16 ones (no AMX: ~2x; nf4lora.ops.DISPATCH.cpu_gemm_in_fp32, calibrated).
    Against the reference: the same rounding points except that softmax - onehot is rounded before
    the multiplication by g rather than after (g is a scalar 1/tokens in training), and summation
    order. Memory: one bf16 [rows, V] buffer instead of bf16 logits + fp32 logits + fp32 log-softmax.
Elsewhere (a CPU with fast bf16 GEMMs, CUDA) the same chunks and rounding points, but each
vocabulary slice's GEMM runs in bf16 with fp32 accumulation (AMX, tensor cores: what autocast runs
there), backward's slices are summed in fp32, and the scale g stays a tensor (no host sync in
backward). On a CPU with AMX this beats the dense head + fp32 log-softmax, mostly by the fp32
[tokens, vocab] tensors it never makes (docs/decisions.md). Autocast is turned off
for the device the tensors are on, whichever it is.
Tested by tests/test_head_loss.py (against the autocast reference: loss, dL/dh, bias, odd sizes;
the CUDA route on the CPU and, with a GPU, on CUDA)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..ops.buffers import empty_cpu, scratch

VOCAB_CHUNK = 4096  # rows of W widened to fp32 at a time (9.4 MB for hidden 576)
ROW_CHUNK = 64      # rows of z taken to fp32 at a time for the softmax


def _fp32_gemm(device: torch.device) -> bool:
    """Whether the vocabulary slices' GEMMs run in fp32 over bf16 values (a CPU where calibration
    found fp32 GEMMs faster than bf16 ones: nf4lora.ops.DISPATCH.cpu_gemm_in_fp32) or in bf16 (a CPU
    with fast bf16 GEMMs, e.g. AMX, and every other device)."""
    from ..ops import DISPATCH
    return device.type == "cpu" and DISPATCH.cpu_gemm_in_fp32(torch.bfloat16)


class HeadCrossEntropy(torch.autograd.Function):
    """(h [T, H] bf16, W [V, H], b [V] or None, targets [T] int64) -> sum of the T token losses
    (fp32 scalar); differentiable in h only (the head is frozen). See the module docstring."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
        # fp32 GEMMs on the CPU, bf16 ones elsewhere: not autocast's choice either way
        with torch.autocast(hidden.device.type, enabled=False):
            return HeadCrossEntropy._forward(ctx, hidden, weight, bias, targets)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets):
        T, V = hidden.shape[0], weight.shape[0]
        dtype, device = hidden.dtype, hidden.device
        fp32 = _fp32_gemm(device)
        h = hidden.float() if fp32 else hidden
        # On the CPU z is advised onto huge pages before its first touch, and the per-chunk
        # temporaries (a GEMM output, the fp32 rows) are this thread's reused buffers: 4 KiB page
        # faults on fresh buffers of tens of MB cost more than the softmax (bench/bench_step.py).
        cpu = device.type == "cpu"
        z = empty_cpu((T, V), dtype) if cpu else torch.empty((T, V), dtype=dtype, device=device)
        part_buf = scratch((T * min(V, VOCAB_CHUNK),), torch.float32 if fp32 else dtype, device) if cpu else None
        for v0 in range(0, V, VOCAB_CHUNK):
            v1 = min(V, v0 + VOCAB_CHUNK)
            w = weight[v0:v1].to(dtype)
            out = None if part_buf is None else part_buf[: T * (v1 - v0)].view(T, v1 - v0)
            if fp32:
                part = torch.mm(h, w.float().t(), out=out)
                if bias is not None:
                    part += bias[v0:v1].to(dtype).float()
            elif bias is None:  # one bf16 GEMM with fp32 accumulation (and the bias in its epilogue), as F.linear
                part = torch.mm(h, w.t(), out=out)
            else:
                part = torch.addmm(bias[v0:v1].to(dtype), h, w.t(), out=out)
            z[:, v0:v1].copy_(part)  # rounded to bf16 here, as the autocast GEMM rounds its output
        total = torch.zeros((), dtype=torch.float32, device=device)
        need_grad = ctx.needs_input_grad[0]
        rows = scratch((min(T, ROW_CHUNK), V), torch.float32, device) if cpu and T else None
        for r0 in range(0, T, ROW_CHUNK):
            r1 = min(T, r0 + ROW_CHUNK)
            if rows is None:
                zc = z[r0:r1].float()
            else:
                zc = rows[: r1 - r0]
                zc.copy_(z[r0:r1])
            tc = targets[r0:r1]
            picked = zc.gather(1, tc[:, None])[:, 0]
            # logsumexp as torch computes it (max with infinities taken as 0, exp of the
            # difference, sum, log, plus the max), in place in the fp32 rows
            m = zc.amax(dim=1, keepdim=True)
            m.masked_fill_(m.abs() == float("inf"), 0.0)
            e_sum = zc.sub_(m).exp_().sum(dim=1, keepdim=True)
            lse = e_sum.log().add_(m)
            total += (lse[:, 0] - picked).sum()
            if need_grad:  # softmax(z) - onehot(t): exp(z - max) / its sum
                zc.div_(e_sum)
                zc.scatter_add_(1, tc[:, None], torch.full((r1 - r0, 1), -1.0, device=device))
                z[r0:r1].copy_(zc)
        if need_grad:
            ctx.save_for_backward(z, weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        z, weight = ctx.saved_tensors
        with torch.autocast(z.device.type, enabled=False):
            T, V = z.shape
            grad_h = torch.zeros((T, weight.shape[1]), dtype=torch.float32, device=z.device)
            if _fp32_gemm(z.device):
                g = float(grad_total)  # the loss is a scalar
                for v0 in range(0, V, VOCAB_CHUNK):
                    v1 = min(V, v0 + VOCAB_CHUNK)
                    w = weight[v0:v1].to(z.dtype).float()
                    grad_h.addmm_(z[:, v0:v1].float(), w, alpha=g)
            else:
                for v0 in range(0, V, VOCAB_CHUNK):
                    v1 = min(V, v0 + VOCAB_CHUNK)
                    grad_h += z[:, v0:v1] @ weight[v0:v1].to(z.dtype)
                grad_h.mul_(grad_total.float())
            return grad_h.to(z.dtype), None, None, None


def head_cross_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, targets) in fp32, hidden in bf16."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [T, H] and [V, H]")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected ({hidden.shape[0]},)")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if hidden.shape[0] and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"targets must be in [0, {weight.shape[0]}) (ignored positions removed first)")
    return HeadCrossEntropy.apply(hidden, weight, bias, targets.long())
