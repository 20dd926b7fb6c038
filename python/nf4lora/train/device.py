"""Where the trainer and the CLI compute: `--device auto|cpu|cuda[:N]` turned into a torch.device,
the process-group backend that goes with it (NCCL for CUDA, gloo for the CPU), moving a batch and a
loaded model there, and the RNG state of that device for exact checkpoints. Everything above the op
layer takes its device from its tensors (Linear4bit.to(device) moves the packed codes and scales as
they are), so this is the only place that decides one.
Tested by tests/test_device.py (parsing, errors, the CPU path, checkpoints resumed across a
simulated device change; CUDA tests marked and skipped without a GPU)."""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..ops import has_cuda

_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_spec(spec: str) -> None:
    """Raises ValueError unless spec is auto, cpu, cuda or cuda:N."""
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def cuda_usable() -> bool:
    """True when torch sees a GPU and nf4lora was built with its CUDA kernels."""
    return torch.cuda.is_available() and has_cuda()


def resolve(spec: str = "auto", local_rank: Optional[int] = None) -> torch.device:
    """The device `spec` names. auto: CUDA when cuda_usable(), else the CPU. cuda without an index
    is cuda:local_rank under torchrun (LOCAL_RANK; each process its own GPU), else the current
    GPU. A CUDA device that is not there is a ValueError saying why."""
    check_spec(spec)
    if spec == "auto":
        spec = "cuda" if cuda_usable() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec}: torch sees no CUDA GPU (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu")
    if not has_cuda():
        raise ValueError(f"device {spec}: nf4lora was built without its CUDA kernels "
                         "(rebuild with CUDA, see the README); use --device cpu")
    if spec == "cuda":
        if local_rank is None and "LOCAL_RANK" in os.environ:
            local_rank = int(os.environ["LOCAL_RANK"])
        index = torch.cuda.current_device() if local_rank is None else local_rank
    else:
        index = int(spec.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {spec}: cuda:{index} does not exist ({torch.cuda.device_count()} GPU(s))")
    return torch.device("cuda", index)


def backend(device: torch.device) -> str:
    """The torch.distributed backend for a process group over `device`: NCCL for CUDA (it refuses CPU
    tensors), gloo for the CPU. nf4lora.train.fsdp checks the same pairing."""
    return "nccl" if device.type == "cuda" else "gloo"


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on `device` (unchanged tensors on the CPU: .to is a no-op there)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def move_model(model: nn.Module, device: torch.device) -> nn.Module:
    """A model built elsewhere (a caller's, or adapters load_adapter made on the CPU) moved to `device`
    (4-bit layers keep their codes and scales bit for bit); nothing moves when all of it is there.
    load_model(device=...) builds on the device directly."""
    if any(t.device != device for t in _tensors(model)):
        model.to(device)
    return model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _tensors(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()


def rng_state(device: torch.device) -> Optional[torch.Tensor]:
    """The RNG state of a CUDA device (dropout there draws from it), None for the CPU (saved apart)."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return None


def set_rng_state(state: Any, device: torch.device) -> None:
    """Restores a state rng_state() saved, when it belongs to this kind of device: a checkpoint made
    on the CPU resumed on CUDA keeps the CUDA generator as seeded (and the other way round), so the
    dropout masks differ from a run that never changed device, but nothing else does."""
    if state is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state.cpu(), device)
