"""matmul_4bit: y = x @ W.T (+ bias) with W a packed 4-bit weight, differentiable in x (and
bias); the frozen base weight never gets a gradient, and backward keeps nothing but references
to the packed weight and its QuantState (no dequantized weight, no activation).

    forward:   y = x W^T + b            W = dequantize(packed, state)   [N, K]
    backward:  dL/dx = dL/dy W          (from the packed weight again)
               dL/db = sum over all leading dims of dL/dy
               dL/dW: none (frozen)

CPU (_forward_cpu, _grad_input_cpu): for up to GEMV_MAX_M (GRAD_INPUT_MAX_M) rows of x
(grad_y), the fused native kernels (the weight is dequantized in registers, never
materialized); above that, dequantize into a reused per-thread scratch buffer and run a dense
torch GEMM in x's dtype. CUDA: matmul_cuda.py picks the fused GEMV / tensor-core kernels or the
scratch path. Under torch.autocast, x is first cast to the autocast dtype. A bf16 product on
the scratch path runs as an fp32 GEMM over the same bf16 values where the CPU has no AMX
(cpu_gemm_in_fp32).
Tested by tests/test_matmul.py (float64 reference, finite differences, torch.compile)."""
from __future__ import annotations

import threading
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _ops, matmul_cuda
from ._native import _C, dtype_code, num_threads, quant_type_code
from .functional import _packed_bytes
from .quant_state import QuantState

_SCRATCH = threading.local()  # per thread: concurrent forwards must not share a buffer
# Rows of x (grad_y) up to which the fused CPU kernels beat dequantize + dense GEMM, re-measured
# with `python bench/bench_large_m.py --crossover --m 8 16 --rounds 3 --iters 3` (bf16, 2 threads,
# AVX-512, the three LLaMA-7B shapes; the 2-core VM was under load ~9, so ratios only): fused /
# scratch time forward 0.56-0.61x at M=8, 0.95-1.29x at M=16; backward 0.81-0.91x at M=8,
# 1.41-1.84x at M=16 (an earlier run: about 0.2x at M=1 and 2.2-3.3x at M=32, both directions).
GEMV_MAX_M = 8
GRAD_INPUT_MAX_M = 8
# Above them, one design only: dequantize all of W into the scratch buffer + one dense GEMM
# (oneDNN for bf16; MKL fp32 where the CPU has no AMX, as on this VM: lscpu lists no amx flags and
# torch.cpu._is_amx_tile_supported() is False, contrary to what an earlier note here said).
# Dequantizing L2-sized row panels of W and feeding each to the dense GEMM as it is produced
# measured 5-11x SLOWER at M = 16 / 64 / 512 on all three shapes
# (`python bench/bench_large_m.py --rounds 2 --iters 3`, its final form; 1.7-38x for the other
# forms tried): every panel is a separate oneDNN call with its own setup and thread hand-off.
# A hand-written AVX-512 micro-kernel was not tried (it cannot approach AMX where AMX exists).

# bf16 GEMMs on a CPU without AMX: oneDNN's AVX512-BF16 micro-kernel measured 0.5-0.6x the speed
# of MKL's fp32 GEMM on this 2-core VM (Xeon with AVX512-BF16/FP16, AMX not exposed; one thread,
# thread CPU time, min of 7 rounds: M=768 x 576 x 1536 13.5 ms bf16, 6.9 ms fp32, 7.4 ms fp16;
# the LoRA-sized products 768 x 576 x 16 0.16 / 0.08 ms). So where the CPU has no AMX, a bf16
# product on the scratch path widens x to fp32 (exact), dequantizes W straight into an fp32
# scratch buffer (the fp32 weight values the fused kernels use, not rounded to bf16; one pass and
# no bf16 buffer besides), runs the fp32 GEMM and rounds the result to bf16 once. fp16 GEMMs are as
# fast as fp32 here and stay as they are. The cost: the fp32 scratch buffer is twice the bf16 one
# (per weight shape and thread, as before). None: automatic (fp32 unless torch reports AMX);
# True/False force it (tests, benchmarks).
CPU_GEMM_FP32: Optional[bool] = None


def _cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:  # pragma: no cover - torch without the probe compiled in
        return False


_HAS_AMX = _cpu_has_amx()


def cpu_gemm_in_fp32(dtype: torch.dtype) -> bool:
    """Whether a CPU GEMM in `dtype` above the fused-kernel sizes runs as an fp32 GEMM (bf16 only)."""
    if dtype != torch.bfloat16:
        return False
    return (not _HAS_AMX) if CPU_GEMM_FP32 is None else bool(CPU_GEMM_FP32)


def _scratch(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reused dequantization buffer per (shape, dtype, device): a fresh 32 MB weight costs
    more in page faults than the whole dequantization."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    key = (tuple(shape), dtype, device)
    buf = buffers.get(key)
    if buf is None:
        if len(buffers) > 16:
            buffers.clear()
        buf = (_ops.empty_cpu(shape, dtype) if device.type == "cpu"
               else torch.empty(tuple(shape), dtype=dtype, device=device))
        buffers[key] = buf
    return buf


def _weight_shape(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D [N, K], its QuantState shape is {list(shape)}")
    return int(shape[0]), int(shape[1])


def _check_matmul(x: Tensor, packed: Tensor, absmax: Tensor, shape: Sequence[int],
                  bias: Optional[Tensor]) -> tuple[int, int]:
    N, K = _weight_shape(shape)
    _ops.check_float_dtype(x.dtype, "x.dtype")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x has shape {tuple(x.shape)} but the weight is [{N}, {K}]: x.shape[-1] must be {K}")
    if x.device != packed.device or absmax.device != packed.device:
        raise ValueError(f"x is on {x.device}, the packed weight on {packed.device} and its absmax on "
                         f"{absmax.device}: they must be on one device")
    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({N},)")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from x dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    return N, K


@torch.library.custom_op("nf4lora::matmul_4bit", mutates_args=())
def matmul_4bit_op(x: Tensor, packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                   shape: Sequence[int], nested_absmax: Optional[Tensor],
                   nested_code: Optional[Tensor], offset: Optional[Tensor], nested_blocksize: int,
                   bias: Optional[Tensor]) -> Tensor:
    """x [..., K] @ W[N, K].T (+ bias) in x's dtype; W given by its packed codes and state."""
    N, K = _check_matmul(x, packed, absmax, shape, bias)
    weight = (packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code, offset,
              nested_blocksize)
    if x.device.type == "cuda":
        return matmul_cuda.forward(
            x, *weight, bias,
            lambda x_: torch.nn.functional.linear(x_, _dequantized(*weight, x.dtype, x.device), bias))
    if x.device.type == "cpu":
        return _forward_cpu(x, weight, bias)
    return torch.nn.functional.linear(x, _dequantized(*weight, x.dtype, x.device), bias)


def _dequantized(packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code, offset,
                 nested_blocksize, dtype, device) -> Tensor:
    """W [N, K] in dtype, in this thread's reused scratch buffer. Plain CPU tensors, eagerly: the
    op's own checks and kernel called directly (the dispatcher of a mutating custom op costs
    ~200 us a call here, more than the dequantization of a 576 x 1536 weight)."""
    w = _scratch((N, K), dtype, device)
    if _plain_eager_cpu(w) and _plain_eager_cpu(packed):
        n = _ops._check_dequant_out(packed, absmax, blocksize, quant_type, nested_absmax, nested_code,
                                    offset, nested_blocksize, w)
        if n:
            _ops._dequant_cpu(packed, absmax, blocksize, quant_type, nested_absmax, nested_code, offset,
                              nested_blocksize, w, n)
        return w
    torch.ops.nf4lora.dequantize_4bit_out(packed, absmax, blocksize, quant_type, nested_absmax,
                                          nested_code, offset, nested_blocksize, w)
    return w


def _dequantized_fp32(packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code, offset,
                      nested_blocksize) -> Tensor:
    """W [N, K] in fp32 (code * absmax, as the fused CPU kernels use it), in this thread's fp32
    scratch buffer."""
    return _dequantized(packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code, offset,
                        nested_blocksize, torch.float32, torch.device("cpu"))


def _native_cpu(fn, inp, weight, cols_in, cols_out, *extra):
    """One call of a fused native product: fn(inp [rows, cols_in], W, *extra) -> [rows, cols_out]."""
    packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code, offset, nested_blocksize = weight
    _ops._check_dequant_args(packed, absmax, blocksize, quant_type, [N, K], inp.dtype,
                             nested_absmax, nested_code, offset, nested_blocksize)
    inp2 = inp.reshape(-1, cols_in).contiguous()
    out = torch.empty((inp2.shape[0], cols_out), dtype=inp.dtype)
    fn(inp2.data_ptr(), dtype_code(inp.dtype), inp2.shape[0], cols_in, packed.data_ptr(),
       *_ops._absmax_ptrs(absmax, nested_absmax, nested_code, offset, nested_blocksize),
       cols_out, blocksize, quant_type_code(quant_type), *extra, out.data_ptr(), num_threads())
    return out.reshape(*inp.shape[:-1], cols_out)


def _forward_cpu(x, weight, bias):
    N, K = weight[4], weight[5]
    rows = x.numel() // K if K else 0
    if 0 < rows <= GEMV_MAX_M:
        b = None if bias is None else bias.contiguous()  # kept alive across the native call
        return _native_cpu(_C.matmul_4bit_cpu, x, weight, K, N, _ops._ptr(b))
    if cpu_gemm_in_fp32(x.dtype):
        w = _dequantized_fp32(*weight)
        with torch.autocast("cpu", enabled=False):  # an fp32 GEMM even when called under autocast
            return torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
    return torch.nn.functional.linear(x, _dequantized(*weight, x.dtype, x.device), bias)


def _grad_input_cpu(grad_y, weight):
    N, K = weight[4], weight[5]
    rows = grad_y.numel() // N if N else 0
    if 0 < rows <= GRAD_INPUT_MAX_M:
        return _native_cpu(_C.matmul_4bit_t_cpu, grad_y, weight, N, K)
    if cpu_gemm_in_fp32(grad_y.dtype):
        w = _dequantized_fp32(*weight)
        with torch.autocast("cpu", enabled=False):
            return (grad_y.float() @ w).to(grad_y.dtype)
    return grad_y @ _dequantized(*weight, grad_y.dtype, grad_y.device)


@matmul_4bit_op.register_fake
def _(x, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
      nested_blocksize, bias):
    N, _ = _check_matmul(x, packed, absmax, shape, bias)
    return x.new_empty((*x.shape[:-1], N))


def _check_grad_input(grad_y: Tensor, N: int) -> None:
    _ops.check_float_dtype(grad_y.dtype, "grad_y.dtype")
    if grad_y.dim() < 1 or grad_y.shape[-1] != N:
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}, its last dimension must be {N}")


@torch.library.custom_op("nf4lora::matmul_4bit_grad_input", mutates_args=())
def matmul_4bit_grad_input(grad_y: Tensor, packed: Tensor, absmax: Tensor, blocksize: int,
                           quant_type: str, shape: Sequence[int], nested_absmax: Optional[Tensor],
                           nested_code: Optional[Tensor], offset: Optional[Tensor],
                           nested_blocksize: int) -> Tensor:
    """grad_y [..., N] @ W [N, K] -> [..., K], in grad_y's dtype."""
    N, K = int(shape[0]), int(shape[1])
    _check_grad_input(grad_y, N)
    weight = (packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code, offset,
              nested_blocksize)
    if grad_y.device.type == "cuda":
        return matmul_cuda.grad_input(
            grad_y, *weight, lambda g: g @ _dequantized(*weight, grad_y.dtype, grad_y.device))
    if grad_y.device.type == "cpu":
        return _grad_input_cpu(grad_y, weight)
    return grad_y @ _dequantized(*weight, grad_y.dtype, grad_y.device)


@matmul_4bit_grad_input.register_fake
def _(grad_y, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
      nested_blocksize):
    return grad_y.new_empty((*grad_y.shape[:-1], int(shape[1])))


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code, offset,
     nested_blocksize, bias) = inputs
    ctx.weight_args = (packed, absmax, blocksize, quant_type, shape, nested_absmax, nested_code,
                       offset, nested_blocksize)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.nf4lora.matmul_4bit_grad_input(grad_y, *ctx.weight_args)
    if ctx.has_bias and ctx.needs_input_grad[10]:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, None, None, None, None, grad_bias


torch.library.register_autograd("nf4lora::matmul_4bit", _backward, setup_context=_setup_context)


def _plain_eager_cpu(x: Tensor) -> bool:
    """True when a product may skip the custom op: a plain CPU tensor, run eagerly. Under
    torch.compile/export, a dispatch mode (fake tensors, FlopCounterMode, ...), functorch
    transforms or functionalization, and for tensor subclasses, the op is called as registered."""
    return (x.device.type == "cpu" and (type(x) is Tensor or type(x) is torch.nn.Parameter)
            and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and not torch._is_functional_tensor(x))


def _forward(x: Tensor, weight: tuple, bias: Optional[Tensor]) -> Tensor:
    """x W^T + b, no autograd of its own (matmul_4bit, LoraMatmul4bit). Plain CPU tensors in eager
    mode run the op's own CPU code (same checks, kernels and numbers) without the custom op's
    dispatcher, which costs ~30 us a call (`python bench/bench_matmul.py --overhead`); everything
    else calls the op. weight: (packed, absmax, blocksize, quant_type, N, K, nested_absmax,
    nested_code, offset, nested_blocksize)."""
    packed, absmax, blocksize, quant_type, N, K = weight[:6]
    if _plain_eager_cpu(x) and (bias is None or type(bias) in (Tensor, torch.nn.Parameter)):
        _check_matmul(x, packed, absmax, (N, K), bias)
        return _forward_cpu(x, weight, bias)
    return torch.ops.nf4lora.matmul_4bit(x, packed, absmax, blocksize, quant_type, [N, K], *weight[6:], bias)


def _grad_input(grad_y: Tensor, weight: tuple) -> Tensor:
    """grad_y @ W, as _forward chooses. Under create_graph (grad mode on) always the op, which has
    no double backward: a second derivative is then an error, not a silent zero."""
    packed, absmax, blocksize, quant_type, N, K = weight[:6]
    if _plain_eager_cpu(grad_y) and not torch.is_grad_enabled():
        _check_grad_input(grad_y, N)
        return _grad_input_cpu(grad_y, weight)
    return torch.ops.nf4lora.matmul_4bit_grad_input(grad_y, packed, absmax, blocksize, quant_type, [N, K],
                                                    *weight[6:])


class _EagerCpu(torch.autograd.Function):
    """matmul_4bit's autograd for plain CPU tensors in eager mode, around _forward / _grad_input
    (the registered op's autograd is the same formula). Like it, it keeps only references to the
    frozen weight."""

    @staticmethod
    def forward(ctx, x, bias, weight):
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return _forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = _grad_input(grad_y, ctx.weight) if ctx.needs_input_grad[0] else None
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_bias, None


def matmul_4bit(x: Tensor, packed: Tensor, state: QuantState, bias: Optional[Tensor] = None) -> Tensor:
    """x [..., K] @ W.T (+ bias) for the 4-bit weight (packed, state) of shape [N, K].

    Computes in x's dtype (the autocast dtype inside torch.autocast); differentiable in x and
    bias only. Raises ValueError/TypeError for mismatched shapes, dtypes or devices."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
    if autocast and x.is_floating_point():
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        if bias is not None:
            bias = bias.to(dtype)
    N, K = _weight_shape(state.shape)
    nested = (state.nested_absmax, state.nested_code, state.offset) if state.nested else (None, None, None)
    weight = (_packed_bytes(packed, state), state.absmax, state.blocksize, state.quant_type, N, K, *nested,
              state.nested_blocksize)
    if (_plain_eager_cpu(x) and torch.is_grad_enabled()
            and (x.requires_grad or (bias is not None and bias.requires_grad))):
        return _EagerCpu.apply(x, bias, weight)
    return _forward(x, weight, bias)  # no grad needed, or the op and its registered autograd
