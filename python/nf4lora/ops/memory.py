"""CUDA managed memory for paged optimizer state: one cudaMallocManaged allocation lent to torch
as a CUDA tensor without a copy, and the prefetch that pages it in before an update reads it
(cuda/memory: managed_alloc/free/prefetch; prefetch is guarded by the device's
concurrent-managed-access attribute). Used by nf4lora/optim/paging.py; tested by
tests/test_optim.py (CUDA-marked)."""
from __future__ import annotations

import torch
from torch import Tensor

from .native import _C

_TYPESTR = {torch.float32: "<f4", torch.uint8: "|u1"}


class _ManagedAllocation:
    """Owns one managed allocation; the CUDA array interface keeps it alive as long as the tensor
    torch builds over it."""

    def __init__(self, numel: int, dtype: torch.dtype):
        self.nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self.ptr = int(_C.managed_alloc(self.nbytes))
        self.__cuda_array_interface__ = {"shape": (numel,), "typestr": _TYPESTR[dtype],
                                         "data": (self.ptr, False), "version": 3,
                                         "strides": None, "stream": None}

    def __del__(self) -> None:
        if getattr(self, "ptr", 0):
            _C.managed_free(self.ptr)
            self.ptr = 0


def managed_zeros(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero-filled fp32 or uint8 tensor of `numel` elements in managed memory, seen on `device`."""
    if not _C.has_cuda():
        raise RuntimeError("this nf4lora build has no CUDA kernels: managed memory needs a CUDA build")
    return torch.as_tensor(_ManagedAllocation(numel, dtype), device=device)


def prefetch_supported(device: torch.device) -> bool:
    return bool(_C.managed_prefetch_supported(device.index or 0))


def prefetch(t: Tensor, device: torch.device) -> None:
    """Pages t's managed memory in on `device`, on the current stream."""
    _C.managed_prefetch(t.data_ptr(), t.numel() * t.element_size(), device.index or 0,
                        torch.cuda.current_stream(device).cuda_stream)
