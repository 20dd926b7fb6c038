"""Output and scratch buffers of the device kernels: large CPU buffers advised onto transparent
huge pages before their first touch, and one reused dequantization buffer per (shape, dtype,
device) and thread for the dequantize + dense GEMM route. Used by ops/cpu.py and ops/cuda.py."""
from __future__ import annotations

import threading
from typing import Sequence

import torch
from torch import Tensor

from .native import _C

_HUGE_PAGE_MIN_BYTES = 4 << 20
_SCRATCH = threading.local()  # per thread: concurrent forwards must not share a buffer
_MAX_SCRATCH_BUFFERS = 16


def empty_cpu(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """torch.empty on the CPU; a large buffer is advised onto transparent huge pages before its
    first touch, so that filling it does not cost thousands of 4 KiB page faults."""
    out = torch.empty(tuple(shape), dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if nbytes >= _HUGE_PAGE_MIN_BYTES:
        _C.advise_huge_pages(out.data_ptr(), nbytes)
    return out


def scratch(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """This thread's reused buffer for a dequantized weight of `shape` and `dtype`: a fresh 32 MB
    weight costs more in page faults than the whole dequantization. Valid until the next call
    with the same key on this thread."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    key = (tuple(shape), dtype, device)
    buf = buffers.get(key)
    if buf is None:
        if len(buffers) > _MAX_SCRATCH_BUFFERS:
            buffers.clear()
        buf = (empty_cpu(shape, dtype) if device.type == "cpu"
               else torch.empty(tuple(shape), dtype=dtype, device=device))
        buffers[key] = buf
    return buf
