"""FSDP2 (torch.distributed.fsdp.fully_shard) over nf4lora 4-bit models with LoRA: shard_model,
an optimizer over the local shards, the full adapter gathered for PEFT-format saving, and atomic
sharded checkpoints written with torch.distributed.checkpoint (DCP).

What is sharded (dim 0, one shard per rank, the last shards padded by FSDP when sizes do not divide):
- the packed 4-bit codes of every Linear4bit (an nn.Parameter of uint8, requires_grad=False);
- its 8-bit absmax (double quantization): moved from a buffer to a frozen uint8 nn.Parameter so
  FSDP shards and all-gathers it with the codes (1/64 byte per weight: 1.07 GB for Llama-2-70B's
  68.5e9 4-bit weights, on every rank if replicated: 25% on top of a 4.3 GB code shard at 8 ranks);
- the LoRA adapters, their gradients (reduce-scattered) and so their optimizer state (each rank
  steps its own shard), and the dense embeddings / head / norms.
Replicated: the nested fp32 absmax (4 bytes per 16,384 weights: 17 MB at 70B), the two code tables
and the offset, and an fp32 absmax (no double quantization: 0.5 bit/weight, it stays a buffer so
that a bf16 MixedPrecisionPolicy cannot round it). FSDP does not cast integer parameters, so
codes and 8-bit absmax cross a bf16 policy unchanged.

Blocks of 64 weights may straddle two ranks' shards and the packed byte count may not divide by
the world size: compute only ever sees the all-gathered tensors, so neither matters (the tests use
a 509 x 254 layer: 64,643 packed bytes, 2,021 absmax blocks, on 2 ranks). Adapters are sharded by
default: the same time per step as replicated ones and 1/N of the bytes (bench/bench_fsdp.py).
Tested by tests/test_fsdp.py (2 gloo processes against one process)."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from ..files import publish_folder
from ..lora import save_adapter as _save_adapter_files
from ..quant import Linear4bit

__all__ = ["decoder_layers", "shard_model", "is_sharded", "resident_4bit_bytes", "ShardedOptimizer",
           "gathered_parameters", "save_adapter", "no_sync", "param_groups", "save_checkpoint",
           "load_checkpoint"]


def _dist():
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("nf4lora.train.fsdp: torch.distributed is not initialized (start with torchrun, "
                           "then torch.distributed.init_process_group)")
    return dist


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the decoder's `layers` (transformers causal LMs),
    else the largest nn.ModuleList in the model."""
    base = model
    if hasattr(model, "get_decoder"):
        try:
            base = model.get_decoder()
        except (AttributeError, NotImplementedError):
            base = model
    layers = getattr(base, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return list(layers)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError("nf4lora.train.fsdp: the model has no decoder layers (no nn.ModuleList) to shard")
    return list(max(lists, key=len))


def _shard_scales(model: nn.Module) -> int:
    """Makes each Linear4bit's uint8 absmax a frozen parameter (so FSDP shards it); returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, Linear4bit) and "absmax" in m._buffers and m.absmax is not None \
                and m.absmax.dtype == torch.uint8:
            absmax = m._buffers.pop("absmax")
            m.register_parameter("absmax", nn.Parameter(absmax, requires_grad=False))
            n += 1
    return n


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, *, root: Optional[nn.Module] = None, mesh: Any = None,
                param_dtype: Optional[torch.dtype] = None, reduce_dtype: Optional[torch.dtype] = None,
                reshard_after_forward: bool = True, shard_scales: bool = True,
                shard_adapters: bool = True) -> nn.Module:
    """Applies fully_shard to every decoder layer, then to the root, in place; returns the model.

    root: the module whose forward is called (default: the model), e.g. a loss module that calls
    the decoder and the head separately: its pre-forward all-gathers the parameters outside the
    layers (embeddings, final norm, head) for both calls.
    shard_adapters=False keeps the LoRA weights whole on every rank (FSDP's ignored_params; their
    gradients are all-reduced by ShardedOptimizer before each step) - measured by bench/bench_fsdp.py.

    param_dtype / reduce_dtype: FSDP's MixedPrecisionPolicy (e.g. torch.bfloat16: float params,
    LoRA included, are all-gathered and computed in bf16; the fp32 shards stay the master copy).
    shard_scales: shard the 8-bit absmax with the codes (see the module docstring). Call after the
    adapters are added and before building the optimizer (see ShardedOptimizer)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    dist = _dist()
    if is_sharded(model):
        raise ValueError("nf4lora.train.fsdp: the model is already sharded")
    if not any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ValueError("nf4lora.train.fsdp: the model has no Linear4bit layers (quantize it first)")
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        raise ValueError(f"nf4lora.train.fsdp: the model's parameters are on several devices: {sorted(map(str, devices))}")
    device = devices.pop()
    backend = dist.get_backend()
    cpu_ok = ("gloo", "cpu:gloo,cuda:nccl")
    if (device.type == "cuda" and backend != "nccl") or (device.type == "cpu" and backend not in cpu_ok):
        raise ValueError(f"nf4lora.train.fsdp: the model is on {device} but the process group's backend is "
                         f"{backend!r} (use gloo for CPU models, nccl for CUDA ones)")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if shard_scales:
        _shard_scales(model)
    root = model if root is None else root
    if not any(m is model for m in root.modules()):
        raise ValueError("nf4lora.train.fsdp: root must contain the model")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    ignored = None if shard_adapters else {p for p in model.parameters() if p.requires_grad}
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored)
    fully_shard(root, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def resident_4bit_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the 4-bit weights (codes + every scale tensor of each Linear4bit) this rank holds
    ("local"), of the whole base ("total"), and the replicated part of "local"."""
    from torch.distributed.tensor import DTensor
    local = total = replicated = 0
    for m in model.modules():
        if not isinstance(m, Linear4bit):
            continue
        for t in [m.weight, *m.buffers(recurse=False), *(p for n, p in m.named_parameters(recurse=False)
                                                         if n not in ("weight", "bias"))]:
            if t is None:
                continue
            size = t.element_size()
            total += t.numel() * size
            here = _local(t).numel() * size
            local += here
            if not isinstance(t, DTensor):
                replicated += here
    return {"local": local, "total": total, "replicated": replicated}


class ShardedOptimizer:
    """Builds an nf4lora (or torch) optimizer over each DTensor parameter's local shard, so kernels
    that take plain tensors (nf4lora.optim's native steps) step the shard this rank owns.

    make(params) -> torch.optim.Optimizer gets plain tensors standing for the local shards; the
    returned optimizer (`.optimizer`, a real Optimizer: LR schedulers take it) gets a step pre-hook
    that points them at the current shards and their reduce-scattered gradients, and a post-hook
    that clears the DTensor gradients (FSDP accumulates into them otherwise). Element-wise updates
    (32-bit AdamW, Lion) give one process's result; 8-bit state is blockwise over each shard."""

    def __init__(self, params: list[nn.Parameter], make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]):
        self.params = list(params)
        self.locals = [nn.Parameter(_local(p).detach(), requires_grad=True) for p in self.params]
        self.optimizer = make(self.locals)
        self.optimizer.register_step_pre_hook(lambda *_: self._bind())
        self.optimizer.register_step_post_hook(lambda *_: self._clear())

    @torch.no_grad()
    def _bind(self) -> None:
        from torch.distributed.tensor import DTensor
        import torch.distributed as dist
        whole = [p.grad for p in self.params if not isinstance(p, DTensor) and p.grad is not None]
        if whole and dist.is_initialized() and dist.get_world_size() > 1:
            # replicated adapters (shard_adapters=False): one flat all-reduce, then the mean
            flat = torch.cat([g.reshape(-1) for g in whole])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            for g, part in zip(whole, flat.split([g.numel() for g in whole])):
                g.copy_(part.view_as(g))
        for p, loc in zip(self.params, self.locals):
            shard = _local(p.detach())
            if loc.data.data_ptr() != shard.data_ptr() or loc.shape != shard.shape:
                loc.data = shard  # FSDP re-pads its shards on the first forward
            loc.grad = None if p.grad is None else _local(p.grad)

    def _clear(self) -> None:
        for p, loc in zip(self.params, self.locals):
            p.grad = None
            loc.grad = None


@contextlib.contextmanager
def gathered_parameters(model: nn.Module, trainable_only: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Collective (every rank must enter): within the block, the model's sharded (trainable by
    default) parameters are plain full tensors, e.g. for nf4lora.save_adapter on rank 0; the shards
    are put back on exit. Yields {name: full tensor}. No forward may run inside."""
    from torch.distributed.tensor import DTensor
    swapped = []
    full: dict[str, torch.Tensor] = {}
    for mname, m in model.named_modules():
        for pname, p in list(m._parameters.items()):
            if p is None or not isinstance(p, DTensor) or (trainable_only and not p.requires_grad):
                continue
            t = p.full_tensor().detach()
            m._parameters[pname] = nn.Parameter(t, requires_grad=p.requires_grad)
            swapped.append((m, pname, p))
            full[f"{mname}.{pname}" if mname else pname] = t
    try:
        yield full
    finally:
        for m, pname, p in swapped:
            m._parameters[pname] = p


def save_adapter(model: nn.Module, directory: Path) -> None:
    """nf4lora.save_adapter of a sharded model: the full adapter gathered on every rank, written
    once by rank 0 (PEFT's format, the same file one process writes). Collective."""
    dist = _dist()
    with gathered_parameters(model):
        if dist.get_rank() == 0:
            _save_adapter_files(model, directory)
    dist.barrier()


@contextlib.contextmanager
def no_sync(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Gradient accumulation without a reduce-scatter per micro-batch (FSDP2's
    set_requires_gradient_sync); the last micro-batch outside this block reduces the sum."""
    if not enabled:
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ---- checkpoints (DCP) ------------------------------------------------------------------------

_DCP_DIR = "dcp"


def _optim_flat(optimizer: ShardedOptimizer, rank: int) -> dict[str, torch.Tensor]:
    """This rank's optimizer state as flat tensors keyed optim.rank<r>.<param index>.<name>[#int|#float]
    (numbers become 0-d tensors): its shards are this rank's alone, so resume needs the same world size."""
    out = {}
    for i, st in optimizer.optimizer.state_dict()["state"].items():
        for k, v in st.items():
            key = f"optim.rank{rank}.{i}.{k}"
            if isinstance(v, torch.Tensor):
                out[key] = v
            elif isinstance(v, (bool, int, float)):
                kind = "float" if isinstance(v, float) else "int"
                out[f"{key}#{kind}"] = torch.tensor(v, dtype=torch.float64 if kind == "float" else torch.int64)
            else:
                raise TypeError(f"nf4lora.train.fsdp: optimizer state {k!r} of type {type(v).__name__} is not checkpointable")
    return out


def param_groups(optimizer: ShardedOptimizer) -> list[dict[str, Any]]:
    """The optimizer's hyperparameters (the same on every rank), for the trainer's state file."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.optimizer.state_dict()["param_groups"]]


def save_checkpoint(final: Path, model: nn.Module, optimizer: ShardedOptimizer,
                    write_extra: Callable[[Path], None]) -> Path:
    """Writes a checkpoint folder atomically. Collective: every rank writes its shards (the trainable
    DTensors, each stored once, and its own optimizer state) with DCP into a temp folder beside
    `final`; after a barrier rank 0 calls write_extra(temp) (trainer state, options), fsyncs the tree
    and renames it to `final`. A rank killed mid-write leaves only the temp folder: the previous
    complete checkpoint stays as it was."""
    import torch.distributed.checkpoint as dcp
    dist = _dist()
    rank = dist.get_rank()
    tmp = final.parent / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = {"model." + n: p for n, p in model.named_parameters() if p.requires_grad}
    state.update(_optim_flat(optimizer, rank))
    dcp.save(state, checkpoint_id=str(tmp / _DCP_DIR))
    dist.barrier()
    if rank == 0:
        try:
            write_extra(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_folder(tmp, final)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: ShardedOptimizer,
                    groups: list[dict[str, Any]]) -> None:
    """Loads what save_checkpoint wrote into the (already sharded) model and optimizer, in place;
    groups: param_groups() as saved. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    dist = _dist()
    rank, world = dist.get_rank(), dist.get_world_size()
    meta = dcp.FileSystemReader(str(path / _DCP_DIR)).read_metadata().state_dict_metadata
    ranks = {k.split(".")[1] for k in meta if k.startswith("optim.rank")}
    if ranks and (f"rank{rank}" not in ranks or len(ranks) != world):
        raise ValueError(f"resume: {path} was written by {len(ranks)} process(es), this run has {world}; "
                         "a sharded checkpoint resumes with the same world size")
    named = {"model." + n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(named) != {k for k in meta if k.startswith("model.")}:
        raise ValueError(f"resume: {path} holds other trainable parameters than this model has")
    mine = f"optim.rank{rank}."
    flat = {}
    for k, m in meta.items():
        if k.startswith(mine):
            if not isinstance(m, TensorStorageMetadata):
                raise ValueError(f"resume: {path}: {k} is not a tensor")
            index = int(k[len(mine):].split(".", 1)[0])
            device = optimizer.locals[index].device if index < len(optimizer.locals) else "cpu"
            flat[k] = torch.empty(m.size, dtype=m.properties.dtype, device=device)
    dcp.load({**named, **flat}, checkpoint_id=str(path / _DCP_DIR))
    state: dict[int, dict[str, Any]] = {}
    for k, v in flat.items():
        i, name = k[len(mine):].split(".", 1)
        name, _, kind = name.partition("#")
        state.setdefault(int(i), {})[name] = (v.item() if kind else v)
    n = len(optimizer.locals)
    sd = {"state": state, "param_groups": [dict(g) for g in groups]}
    start = 0
    for g, live in zip(sd["param_groups"], optimizer.optimizer.param_groups):
        g["params"] = list(range(start, start + len(live["params"])))
        start += len(live["params"])
    if start != n:
        raise ValueError(f"resume: {path}: the optimizer has {n} parameters, the checkpoint's groups {start}")
    optimizer._bind()
    optimizer.optimizer.load_state_dict(sd)
    optimizer._clear()


