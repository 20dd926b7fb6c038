"""The fused optimizer steps' native entry points, as one explicit table (``STEPS``), and the
checks of their hyperparameters. The math is in cpp/include/nf4lora/optim.h (scalar reference,
AVX2/AVX-512 variants in cpp/src/optim_*.cpp) and cuda/optim.cu. The steps call ``_C`` directly
rather than through torch.library ops: a step mutates its state in place and is not meant to be
traced, so torch.compile graph-breaks around it as around torch's own optimizers.
Used by nf4lora/optim; tested by tests/test_optim.py and tests/test_optim_lion.py."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .native import _C, dtype_code, num_threads

BLOCK = int(_C.OPTIM_BLOCK)                    # gradient elements per block (NaN skipping, 8-bit absmax)
MIN_8BIT_ELEMENTS = int(_C.MIN_8BIT_ELEMENTS)  # smaller tensors keep fp32 state
MIN_PAGED_ELEMENTS = int(_C.MIN_PAGED_ELEMENTS)  # smaller state buffers are never paged

# (algorithm, state bits, device type) -> native step. Arguments: param, dtype code, grad, the
# state buffers in the order the optimizer lists them, numel, the algorithm's hyperparameters,
# then num_threads (CPU; returns the skipped-block count) or skipped counter + stream (CUDA).
STEPS = {
    ("adamw", 32, "cpu"): _C.adamw_32bit_cpu,
    ("adamw", 8, "cpu"): _C.adamw_8bit_cpu,
    ("lion", 32, "cpu"): _C.lion_32bit_cpu,
    ("lion", 8, "cpu"): _C.lion_8bit_cpu,
}
if _C.has_cuda():
    STEPS.update({
        ("adamw", 32, "cuda"): _C.adamw_32bit_cuda,
        ("adamw", 8, "cuda"): _C.adamw_8bit_cuda,
        ("lion", 32, "cuda"): _C.lion_32bit_cuda,
        ("lion", 8, "cuda"): _C.lion_8bit_cuda,
    })


def check_adamw(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """ValueError naming the first bad value: lr < 0, a beta outside [0, 1), eps <= 0,
    weight_decay < 0, or anything non-finite."""
    _C.adamw_check(lr, beta1, beta2, eps, weight_decay, 1)


def check_lion(lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    _C.lion_check(lr, beta1, beta2, weight_decay)


def step(algorithm: str, bits: int, p: Tensor, grad: Tensor, buffers: Sequence[Tensor],
         hyper: tuple, skipped: Optional[Tensor] = None) -> int:
    """One fused update of p in place from grad and its state `buffers`. On the CPU returns the
    number of gradient blocks skipped for NaN/Inf; on CUDA adds it to the int32 device tensor
    `skipped` (read once per optimizer step, not per param) and returns 0."""
    kernel = STEPS[(algorithm, bits, p.device.type)]
    ptrs = [t.data_ptr() for t in buffers]
    if skipped is None:
        return kernel(p.data_ptr(), dtype_code(p.dtype), grad.data_ptr(), *ptrs, p.numel(), *hyper,
                      num_threads())
    kernel(p.data_ptr(), dtype_code(p.dtype), grad.data_ptr(), *ptrs, p.numel(), *hyper,
           skipped.data_ptr(), torch.cuda.current_stream(p.device).cuda_stream)
    return 0


def set_vbmi_codec(enabled: bool) -> None:
    """Let (True, the default) or stop the AVX-512 kernels using their VBMI+GFNI 8-bit codec."""
    _C.set_optim_vbmi(bool(enabled))


def vbmi_codec_supported() -> bool:
    return bool(_C.optim_vbmi_supported())
