"""LoRA layers: LoraLinear over nn.Linear or Linear4bit, the fused autograd function for the
4-bit base, and ModulesToSave (a module trained in full beside the adapter).

        x ──> W (frozen: dense or packed 4-bit) ─────────────┐
        └──> dropout ──> A [r, in] ──> B [out, r] ──> * s ──(+)──> y     s = alpha / r
                                                                          (alpha / sqrt(r): rsLoRA)
init "kaiming": A ~ kaiming_uniform(a=sqrt(5)), B = 0, so a fresh adapter is a no-op.
Names and state-dict keys are PEFT's (base_layer, lora_A.<adapter>.weight, lora_B.<adapter>.weight).

DoRA (use_dora=True; PEFT 0.21's DoraLinearLayer, arXiv 2402.09353): a trainable magnitude
m [out] (lora_magnitude_vector.<adapter>.weight) per output row, initialised to the row norm
||W + s B A||_2 (over dim 1 of the [out, in] weight), and

        n = ||W + s B A||_row, recomputed each forward, detached (no gradient, the paper's 4.3)
        c = m / n
        y = c * (x W^T + s x A^T B^T) + b                        (eval, or lora_dropout = 0)
        y = base(x) + (c - 1) * x_d W^T + c * s x_d A^T B^T      (training with dropout, x_d = dropout(x))

n comes from dora_weight_norm, which dequantizes a 4-bit W a few rows at a time (no dense copy).
Merging writes c * (W + s B A) into the base.
Tested by tests/test_lora.py (fused vs the unfused composition against float64, dropout, compile)
and tests/test_dora.py (DoRA against PEFT, float64, merge, PEFT's files both ways)."""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..ops import DISPATCH, Weight4bit, matmul_4bit
from ..ops.matmul import dequantized, forward as base_forward, grad_input as base_grad_input, is_plain_eager_cpu
from ..quant import Linear4bit, QuantState, dequantize_4bit, quantize_4bit


def _adapter_in_fp32(x: Tensor, rows: int) -> bool:
    """Whether LoraMatmul4bit computes the adapter's two thin products in fp32 for x of `rows`
    rows: on the CPU for bf16 and fp16 within the fused kernels' range of rows. Such tiny GEMMs in
    bf16 go to oneDNN, which may wake its OpenMP threads for them (docs/decisions.md: ~10x the
    time of the same products in fp32). More rows keep their route (fp32 GEMMs without AMX, bf16
    ones with it)."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
            and rows <= DISPATCH.fused_rows(x.device))


class LoraMatmul4bit(torch.autograd.Function):
    """y = x W^T + b + s (x_d A^T) B^T in one function, W given by its packed 4-bit codes.

    Inputs: x [..., K] (already in the compute dtype), x_d = dropout(x) or None (then x_d = x),
    A [r, K], B [N, r] (cast to x's dtype here), scaling s, bias [N] or None, and the base's
    Weight4bit w. Shapes below flatten x to [M, K].

    Forward (one pass over x for the base, the LoRA product added into the output buffer):
        y   = matmul_4bit(x, W) + b                   [M, N]
        x_a = s * x_d A^T                             [M, r]   (saved)
        y  += x_a B^T                                 (in place, addmm_)

    Backward, with g = dL/dy [M, N] and g_b = s * g B [M, r]:
        dL/dx   = g W            (nf4lora::matmul_4bit_t, from the packed weight)
                + g_b A          (added in place when x_d is x; else returned as dL/dx_d and
                                  the dropout's own backward applies its mask and 1/(1-p))
        dL/dA   = g_b^T x_d      [r, K]   = s B^T g^T x_d
        dL/dB   = g^T x_a        [N, r]   = s g^T x_d A^T
        dL/db   = sum over rows of g
        dL/dW   = none (frozen)
    Saved for backward: x_d (or x), x_a, and A, B in the compute dtype; never the dense W.
    Gradients of A and B come back in their own dtype (fp32 adapters stay fp32).

    bf16 on a CPU where bf16 GEMMs run as fp32 ones (DISPATCH.cpu_gemm_in_fp32; more rows
    than the fused kernels take): the same formulas in fp32 over x widened from bf16, W dequantized
    in fp32 (as matmul_4bit's fp32 route and the fused kernels use it), and the fp32 adapter
    weights as they are; x_a stays fp32, y and dL/dx are rounded to bf16 once at the end. At least
    the precision of the bf16 route (no bf16 rounding of W, A, B, x_a or of the partial sums), at
    fp32 GEMM speed (~2x bf16 without AMX). With fewer rows (the fused kernels' range) on the CPU,
    bf16 and fp16 alike, only the adapter's products run in fp32 (_adapter_in_fp32): the base
    term comes from the fused kernels in x's dtype and the fp32 LoRA term is added to it, as PEFT
    adds its fp32 adapter output."""

    @staticmethod
    def forward(ctx, x, x_d, A, B, scaling, bias, w: Weight4bit):
        N, K = w.shape
        ctx.scaling = scaling
        ctx.separate_dropout = x_d is not None
        ctx.adapter_dtypes = (A.dtype, B.dtype)
        ctx.w = w
        rows = x.numel() // K if K else 0
        ctx.fp32 = (is_plain_eager_cpu(x) and rows > DISPATCH.fused_rows(x.device)
                    and DISPATCH.cpu_gemm_in_fp32(x.dtype))
        ctx.adapter_fp32 = ctx.fp32 or _adapter_in_fp32(x, rows)
        src = x if x_d is None else x_d
        if ctx.adapter_fp32:
            with torch.autocast("cpu", enabled=False):  # fp32 GEMMs, not autocast's bf16 ones
                if ctx.fp32:
                    y = torch.nn.functional.linear(x.reshape(-1, K).float(), dequantized(w, torch.float32),
                                                   None if bias is None else bias.float())
                else:  # the fused kernel for the base, in x's dtype; the LoRA term is added into it
                    y = base_forward(x, w, bias).contiguous().view(-1, N)
                A32, B32 = A.float(), B.float()
                x_a = torch.mm(src.reshape(-1, K).float(), A32.t()).mul_(scaling)
                if y.dtype == torch.float32:
                    y.addmm_(x_a, B32.t())
                else:
                    y.add_(torch.mm(x_a, B32.t()))  # one rounding of the fp32 sum to x's dtype
            ctx.save_for_backward(src, x_a, A32, B32)
            return y.to(x.dtype).view(*x.shape[:-1], N)
        y = base_forward(x, w, bias).contiguous()  # the LoRA term is added in place into this buffer
        Ac, Bc = A.to(x.dtype), B.to(x.dtype)
        x_a = torch.mm(src.reshape(-1, K), Ac.t()).mul_(scaling)
        y.view(-1, N).addmm_(x_a, Bc.t())
        ctx.save_for_backward(src, x_a, Ac, Bc)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        src, x_a, Ac, Bc = ctx.saved_tensors
        need_x, need_xd, need_A, need_B, _, need_bias = ctx.needs_input_grad[:6]
        N, K = grad_y.shape[-1], src.shape[-1]
        g = grad_y.reshape(-1, N)
        grad_x = grad_xd = grad_A = grad_B = grad_bias = None
        lora_x = need_xd or (need_x and not ctx.separate_dropout)
        if ctx.adapter_fp32:
            with torch.autocast("cpu", enabled=False):
                return LoraMatmul4bit._backward_fp32(ctx, g, src, x_a, Ac, Bc, lora_x) + (None,)
        g_b = torch.mm(g, Bc).mul_(ctx.scaling) if (lora_x or need_A) else None
        if need_x:
            grad_x = base_grad_input(grad_y, ctx.w).contiguous()
            if not ctx.separate_dropout:
                grad_x.view(-1, K).addmm_(g_b, Ac)
        if need_xd:
            grad_xd = torch.mm(g_b, Ac).view(src.shape)
        if need_A:
            grad_A = torch.mm(g_b.t(), src.reshape(-1, K)).to(ctx.adapter_dtypes[0])
        if need_B:
            grad_B = torch.mm(g.t(), x_a).to(ctx.adapter_dtypes[1])
        if need_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_xd, grad_A, grad_B, None, grad_bias, None

    @staticmethod
    def _backward_fp32(ctx, g, src, x_a, A32, B32, lora_x):
        """The backward formulas above in fp32 (see the class docstring); g is [M, N] in bf16 or
        fp16. dL/dx's base term is the fp32 GEMM over W dequantized in fp32 (ctx.fp32) or the fused
        transposed kernel's result in g's dtype, widened."""
        need_x, need_xd, need_A, need_B, _, need_bias = ctx.needs_input_grad[:6]
        dtype, K = src.dtype, src.shape[-1]
        g32 = g.float()
        grad_x = grad_xd = grad_A = grad_B = grad_bias = None
        g_b = torch.mm(g32, B32).mul_(ctx.scaling) if (lora_x or need_A) else None
        if need_x:
            gx = (torch.mm(g32, dequantized(ctx.w, torch.float32)) if ctx.fp32
                  else base_grad_input(g, ctx.w).reshape(-1, K).float())
            if not ctx.separate_dropout:
                gx.addmm_(g_b, A32)
            grad_x = gx.to(dtype).view(src.shape)
        if need_xd:
            grad_xd = torch.mm(g_b, A32).to(dtype).view(src.shape)
        if need_A:
            grad_A = torch.mm(g_b.t(), src.reshape(-1, K).float()).to(ctx.adapter_dtypes[0])
        if need_B:
            grad_B = torch.mm(g32.t(), x_a).to(ctx.adapter_dtypes[1])
        if need_bias:
            grad_bias = g32.sum(0).to(dtype)
        return (grad_x, grad_xd, grad_A, grad_B, None, grad_bias)


def lora_matmul_4bit(x: Tensor, base: Linear4bit, A: Tensor, B: Tensor, scaling: float,
                     dropout: Optional[nn.Module] = None) -> Tensor:
    """base(x) + scaling * dropout(x) A^T B^T through LoraMatmul4bit, computed in the base's
    compute dtype (the autocast dtype under torch.autocast) and returned in x's dtype."""
    in_dtype = x.dtype
    dtype = base.compute_dtype or in_dtype
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    xc = x.to(dtype)
    x_d = None
    if dropout is not None and dropout.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        x_d = dropout(xc)
    bias = None if base.bias is None else base.bias.to(dtype)
    y = LoraMatmul4bit.apply(xc, x_d, A, B, float(scaling), bias, base.weight4bit())
    return y if y.dtype == in_dtype else y.to(in_dtype)


class DoraMatmul4bit(torch.autograd.Function):
    """DoRA's product over a 4-bit base, y = c * (x W^T + s x A^T B^T) + b with c = m / n, in
    one function, returned in x's dtype (or fp32 with out_fp32: the caller adds another term
    and rounds once).

    Inputs: x [..., K] in the compute dtype, A [r, K], B [N, r], m [N] (the magnitude), n [N]
    (the row norm ||W + s B A||, fp32, a constant), scaling s, bias [N] or None, Weight4bit w.
    Shapes below flatten x to [M, K]. The adapter's products are fp32, as PEFT's fp32 adapter;
    c is applied to the rows of B (B_c = c * B, [N, r]) instead of to a [M, N] product.

    Forward:
        z   = x W^T                                   [M, N]  compute dtype (fused kernel; saved)
        x_a = s * x A^T                               [M, r]  fp32 (saved)
        y   = b + c * z + x_a B_c^T                   fp32 (addcmul, then addmm_), rounded once

    Backward, with g = dL/dy [M, N]:
        dL/dx = (g * c) W   (matmul_4bit_t over g * c in the compute dtype, or the fp32 GEMM route)
              + (s * g B_c) A          (fp32, added into the base term)
        dL/dA = (s * g B_c)^T x
        dL/dB = c * (g^T x_a)          (rows scaled)
        dL/dm = (sum_i g z + rowsum(B * (g^T x_a))) / n    (= sum_i g_ij u_ij / n_j for
                                                            u = z + x_a B^T, without keeping u)
        dL/db = sum over rows of g
    Saved: x, z, x_a, A and B in fp32, c, n; never the dense W."""

    @staticmethod
    def forward(ctx, x, A, B, m, n, scaling, bias, w: Weight4bit, out_fp32=False):
        N, K = w.shape
        rows = x.numel() // K if K else 0
        ctx.fp32 = (is_plain_eager_cpu(x) and rows > DISPATCH.fused_rows(x.device)
                    and DISPATCH.cpu_gemm_in_fp32(x.dtype))
        ctx.scaling, ctx.w, ctx.x_shape = scaling, w, x.shape
        ctx.dtypes = (x.dtype, A.dtype, B.dtype, m.dtype, None if bias is None else bias.dtype)
        x2 = x.reshape(-1, K)
        with torch.autocast(x.device.type, enabled=False):
            x32 = x2.float()
            if ctx.fp32:
                z = torch.mm(x32, dequantized(w, torch.float32).t())
            else:
                z = base_forward(x2, w, None)
            A32, B32 = A.detach().float(), B.detach().float()
            x_a = torch.mm(x32, A32.t()).mul_(scaling)
            del x32
            c = m.detach().float() / n
            Bc = B32 * c.unsqueeze(1)
            y = torch.mul(z, c) if bias is None else torch.addcmul(bias.float(), z, c)
            y.addmm_(x_a, Bc.t())
        ctx.save_for_backward(x2, z, x_a, A32, B32, c, n)
        y = y.view(*x.shape[:-1], N)
        return y if out_fp32 else y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x2, z, x_a, A32, B32, c, n = ctx.saved_tensors
        need_x, need_A, need_B, need_m, _, _, need_bias = ctx.needs_input_grad[:7]
        x_dtype, a_dtype, b_dtype, m_dtype, bias_dtype = ctx.dtypes
        N = grad_y.shape[-1]
        grad_x = grad_A = grad_B = grad_m = grad_bias = None
        with torch.autocast(grad_y.device.type, enabled=False):
            g = grad_y.reshape(-1, N)
            g32 = g if g.dtype == torch.float32 else g.float()
            Bc = B32 * c.unsqueeze(1)
            g_b = torch.mm(g32, Bc).mul_(ctx.scaling) if (need_x or need_A) else None
            if need_x:
                g_c = g32 * c
                if ctx.fp32:
                    gx = torch.mm(g_c, dequantized(ctx.w, torch.float32)).addmm_(g_b, A32)
                else:
                    gx = base_grad_input(g_c.to(x_dtype), ctx.w).view(-1, x2.shape[1])
                    gx = gx.float().addmm_(g_b, A32) if gx.dtype != torch.float32 else gx.addmm_(g_b, A32)
                del g_c
                grad_x = gx.to(x_dtype).view(ctx.x_shape)
            if need_A:
                grad_A = torch.mm(g_b.t(), x2.float()).to(a_dtype)
            gxa = torch.mm(g32.t(), x_a) if (need_B or need_m) else None  # [N, r]
            if need_B:
                grad_B = (gxa * c.unsqueeze(1)).to(b_dtype)
            if need_m:
                dot = torch.linalg.vecdot(g32, z.float() if z.dtype != torch.float32 else z, dim=0)
                grad_m = ((dot + (B32 * gxa).sum(1)) / n).to(m_dtype)
            if need_bias:
                grad_bias = g32.sum(0).to(bias_dtype)
        return grad_x, grad_A, grad_B, grad_m, None, None, grad_bias, None, None


NORM_CHUNK_BYTES = 4 << 20  # dora_weight_norm's fp32 scratch: rows of W + s B A, at most this many bytes


class DoraMagnitude(nn.Module):
    """DoRA's trainable magnitude of one adapter, weight [out] (PEFT's lora_magnitude_vector[<adapter>])."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def _chunk_rows(base: nn.Module, chunk_bytes: int) -> int:
    """Rows per chunk of dora_weight_norm: about chunk_bytes of fp32, and for a 4-bit base a
    multiple of the rows after which a quantization block starts a row (blocksize / gcd(in,
    blocksize)), so each chunk is whole blocks of the packed weight."""
    K = base.in_features
    step = base.blocksize // math.gcd(K, base.blocksize) if isinstance(base, Linear4bit) else 1
    return max(step, chunk_bytes // (4 * max(K, 1)) // step * step)


def _dequantize_rows(base: Linear4bit, r0: int, r1: int, out: Tensor) -> Tensor:
    """Rows [r0, r1) of the 4-bit base's W, dequantized into out [r1 - r0, in] (fp32). r0 * in
    must be a multiple of the blocksize; double-quantized scales are decoded for these blocks
    only, as the kernels do (code * nested absmax, then + offset: two roundings, no FMA)."""
    K, bs = base.in_features, base.blocksize
    e0, e1 = r0 * K, r1 * K
    b0, b1 = e0 // bs, -(-e1 // bs)
    absmax = base.absmax[b0:b1]
    if base.nested_absmax is not None:
        groups = torch.arange(b0, b1, device=absmax.device) // base.nested_blocksize
        absmax = base.nested_quant_map[absmax.long()] * base.nested_absmax[groups] + base.quant_offset
    state = QuantState(absmax=absmax, shape=(r1 - r0, K), dtype=torch.float32, blocksize=bs,
                       quant_type=base.quant_type, code=base.quant_map)
    packed = base.weight4bit().packed[e0 // 2: (e1 + 1) // 2]
    return dequantize_4bit(packed, state, out=out)


@torch.no_grad()
def dora_weight_norm(base: nn.Module, A: Tensor, B: Tensor, scaling: float,
                     chunk_bytes: int = NORM_CHUNK_BYTES) -> Tensor:
    """||W + scaling * B A||_2 of each output row (dim 1 of [out, in]), fp32 [out], no gradient.

    W (nn.Linear's weight, or a Linear4bit's dequantized) is taken a chunk of rows at a time
    into one fp32 buffer of at most ~chunk_bytes (plus fp32 copies of A and B when they are in
    another dtype): the dense W never exists at once. Each chunk: buf = W[rows] (fp32),
    buf += scaling * B[rows] @ A (addmm_), norm over dim 1."""
    N, K = base.out_features, base.in_features
    A32, B32 = A.detach().float(), B.detach().float()
    out = torch.empty(N, dtype=torch.float32, device=A.device)
    rows = min(N, _chunk_rows(base, chunk_bytes))
    buf = torch.empty((rows, K), dtype=torch.float32, device=A.device)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        chunk = buf[: r1 - r0]
        if isinstance(base, Linear4bit):
            _dequantize_rows(base, r0, r1, chunk)
        else:
            chunk.copy_(base.weight[r0:r1])
        chunk.addmm_(B32[r0:r1], A32, alpha=scaling)
        torch.linalg.vector_norm(chunk, dim=1, out=out[r0:r1])
    return out


class LoraLinear(nn.Module):
    """y = base_layer(x) + scaling * lora_B(lora_A(dropout(x))) for the active adapter.

    base_layer is an nn.Linear or a Linear4bit (then one fused autograd function computes both
    terms). Several named adapters may live side by side; one is active. Adapters are created in
    `adapter_dtype` (fp32 by default, as PEFT does); over a float base x is cast to it (PEFT's
    rule), over a 4-bit base the adapter runs in the base's compute dtype. An adapter added with
    use_dora=True also has a magnitude (lora_magnitude_vector[name], see the module docstring)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", r: int = 16,
                 lora_alpha: float = 32, lora_dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "kaiming", adapter_dtype: Optional[torch.dtype] = torch.float32,
                 use_dora: bool = False) -> None:
        super().__init__()
        if isinstance(base_layer, LoraLinear) or not isinstance(base_layer, (nn.Linear, Linear4bit)):
            raise TypeError(f"LoraLinear wraps an nn.Linear or a Linear4bit, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapter: Optional[str] = None
        self.disabled = False
        self.merged_adapters: list[str] = []
        self._merge_backup = None  # the exact base weight from before merging
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init, adapter_dtype, use_dora)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def is_4bit(self) -> bool:
        return isinstance(self.base_layer, Linear4bit)

    def add_adapter(self, name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "kaiming",
                    adapter_dtype: Optional[torch.dtype] = torch.float32, use_dora: bool = False) -> None:
        """Adds adapter `name` (A [r, in], B [out, r], with use_dora a magnitude [out]) and makes it active."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not (lora_alpha > 0 and math.isfinite(lora_alpha)):
            raise ValueError(f"lora_alpha must be positive and finite, got {lora_alpha!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if not isinstance(use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {type(use_dora).__name__}")
        device = self.base_layer.weight.device
        dtype = adapter_dtype or (self.base_layer.weight.dtype if not self.is_4bit else self.base_layer.weight_dtype)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name], self.lora_alpha[name] = r, float(lora_alpha)
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.reset_adapter(name, init)
        if use_dora:
            self.lora_magnitude_vector[name] = DoraMagnitude(torch.empty(self.out_features, device=device, dtype=dtype))
            self.reset_magnitude(name)
        self.active_adapter = name

    @property
    def use_dora(self) -> dict[str, bool]:
        return {name: name in self.lora_magnitude_vector for name in self.lora_A}

    @torch.no_grad()
    def reset_magnitude(self, name: str) -> None:
        """DoRA: sets adapter `name`'s magnitude to ||W + s B A|| per output row (PEFT's init;
        called again after LoftQ/PiSSA set A and B)."""
        m = self.lora_magnitude_vector[name].weight
        m.copy_(self.weight_norm(name))

    def weight_norm(self, name: str) -> Tensor:
        """||W + s B A||_2 per output row, fp32 [out], detached (dora_weight_norm)."""
        return dora_weight_norm(self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight,
                                self.scaling[name])

    @torch.no_grad()
    def reset_adapter(self, name: str, init: str = "kaiming") -> None:
        """PEFT's initializations that need no weight: kaiming (A kaiming-uniform a=sqrt(5),
        B = 0) or gaussian (A ~ N(0, 1/r), B = 0). LoftQ/PiSSA set A and B from outside."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / self.r[name])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            del d[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def delta_weight(self, name: str) -> Tensor:
        """scaling * B @ A in fp32, [out, in]."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        return (B.detach().float() @ A.detach().float()) * self.scaling[name]

    @torch.no_grad()
    def merged_weight(self, name: str, weight: Tensor) -> Tensor:
        """The base weight with adapter `name` folded in, fp32 [out, in], from the fp32 base
        weight `weight`: W + s B A, or for DoRA c * (W + s B A) with c = m / ||W + s B A||_row."""
        merged = weight.float() + self.delta_weight(name).to(weight.device)
        if name in self.lora_magnitude_vector:
            m = self.lora_magnitude_vector[name].weight.detach().float()
            merged.mul_((m / torch.linalg.vector_norm(merged, dim=1)).unsqueeze(1))
        return merged

    @torch.no_grad()
    def merge(self, name: str, merge_into_4bit: bool = False) -> Optional[float]:
        """Folds adapter `name` into the base weight; keeps the exact original for unmerge. For a
        4-bit base (merge_into_4bit=True) returns the relative Frobenius error of the requantized
        merged weight against the exact merged weight."""
        if self.merged_adapters:
            raise ValueError(f"adapter {self.merged_adapters[0]!r} is already merged; unmerge first")
        if name not in self.lora_A:
            raise ValueError(f"unknown adapter {name!r}; this layer has {list(self.lora_A)}")
        base = self.base_layer
        error = None
        if self.is_4bit:
            if not merge_into_4bit:
                raise ValueError("the base is 4-bit: merging requantizes it; pass merge_into_4bit=True")
            state = base.quant_state
            merged = self.merged_weight(name, base.dequantize(torch.float32))
            packed, new_state = quantize_4bit(merged, state.blocksize, state.quant_type, state.nested)
            self._merge_backup = (base.weight, state)
            base.set_quantized(packed, dataclasses.replace(new_state, dtype=state.dtype))
            error = float(torch.linalg.matrix_norm(dequantize_4bit(packed, new_state, dtype=torch.float32) - merged)
                          / torch.linalg.matrix_norm(merged).clamp(min=1e-30))
        else:
            self._merge_backup = base.weight.data
            base.weight.data = self.merged_weight(name, base.weight.data).to(base.weight.dtype)
        self.merged_adapters = [name]
        return error

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restores the base weight saved by merge, bit for bit (no subtraction, no requantization)."""
        if not self.merged_adapters:
            return
        base = self.base_layer
        if self.is_4bit:
            weight, state = self._merge_backup
            base.set_quantized(weight, state)
        else:
            base.weight.data = self._merge_backup
        self._merge_backup = None
        self.merged_adapters = []

    def forward(self, x: Tensor) -> Tensor:
        name = self.active_adapter
        if self.disabled or name is None or name not in self.lora_A or self.merged_adapters:
            if self.disabled and self.merged_adapters:
                raise RuntimeError("adapters are disabled but merged into the base: unmerge them first")
            return self.base_layer(x)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if name in self.lora_magnitude_vector:
            return self._dora_forward(x, name, A, B)
        if self.is_4bit:
            return lora_matmul_4bit(x, self.base_layer, A, B, self.scaling[name], self.lora_dropout[name])
        y = self.base_layer(x)
        xd = self.lora_dropout[name](x.to(A.dtype))
        return y + (F.linear(F.linear(xd, A), B) * self.scaling[name]).to(y.dtype)

    def _dora_forward(self, x: Tensor, name: str, A: Tensor, B: Tensor) -> Tensor:
        """DoRA's forward (module docstring; PEFT's DoraLinearVariant.forward). Dropout is applied
        as PEFT does: only in training and with lora_dropout > 0, and then the base product is
        computed over both x and x_d."""
        s, base, dropout = self.scaling[name], self.base_layer, self.lora_dropout[name]
        drop = self.training and not isinstance(dropout, nn.Identity)
        m = self.lora_magnitude_vector[name].weight
        n = self.weight_norm(name)  # no gradient
        if self.is_4bit:
            in_dtype = x.dtype
            dtype = base.compute_dtype or in_dtype
            if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
                dtype = torch.get_autocast_dtype(x.device.type)
            xc = x.to(dtype)
            w = base.weight4bit()
            bias = None if base.bias is None else base.bias.to(dtype)
            if drop:
                # base(x) + (c - 1) x_d W^T + c s x_d A^T B^T = (x - x_d) W^T + b + DoRA(x_d)
                xd = dropout(xc)
                y = DoraMatmul4bit.apply(xd, A, B, m, n, float(s), None, w, True) + matmul_4bit(xc - xd, w, bias)
            else:
                y = DoraMatmul4bit.apply(xc, A, B, m, n, float(s), bias, w)
            return y.to(in_dtype)
        c = m.float() / n
        result = base(x)
        xa = x.to(A.dtype)
        if drop:
            xa = dropout(xa)
            base_result = F.linear(xa, base.weight.to(xa.dtype))
        else:
            base_result = result if base.bias is None else result - base.bias
        lora = F.linear(F.linear(xa, A), B)
        return (result + (c - 1) * base_result + c * lora * s).to(result.dtype)

    def extra_repr(self) -> str:
        dora = f", dora={sorted(self.lora_magnitude_vector)}" if len(self.lora_magnitude_vector) else ""
        return (f"adapters={ {n: self.r[n] for n in self.r} }, active={self.active_adapter!r}{dora}, "
                f"merged={self.merged_adapters}, disabled={self.disabled}")


class ModulesToSave(nn.Module):
    """A module trained in full beside the adapters (PEFT's modules_to_save): original_module stays
    frozen and one trainable copy per adapter lives in modules_to_save[<adapter>]."""

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        if isinstance(module, (LoraLinear, ModulesToSave)):
            raise TypeError(f"cannot wrap a {type(module).__name__} in modules_to_save")
        if isinstance(module, Linear4bit):
            raise TypeError("a 4-bit layer cannot be trained in full: leave it out of modules_to_save "
                            "(or out of quantization)")
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disabled = False
        self.add_adapter(adapter_name)

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already exists in this module")
        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @property
    def active_module(self) -> nn.Module:
        name = self.active_adapter
        if self.disabled or name is None or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("original_module", "modules_to_save", "active_adapter", "disabled"):
                raise  # half-built (deepcopy, unpickling): no fallback, no recursion
            # transformers reads attributes of the wrapped head (e.g. lm_head.weight for tying)
            return getattr(self.active_module, name)
