"""The QLoRA training loop behind `nf4lora finetune`: load (4-bit base + LoRA), seeded batches
with gradient accumulation, bf16 autocast, optional gradient checkpointing, a warmup + cosine /
linear / constant schedule, paged AdamW, eval loss/perplexity before and after, atomic checkpoints
(adapter + optimizer + scheduler + RNG + data position) with an exact --resume, Ctrl-C -> final
checkpoint, DDP over torch.distributed (gloo on CPUs, NCCL on CUDA; --device, train/device.py)
or FSDP2 with --fsdp (nf4lora.train.fsdp: the 4-bit base, adapters and optimizer state sharded,
DCP checkpoints), metrics.json and a loss-curve PNG.
Tested by tests/test_finetune.py (save/reload logits, kill + resume == uninterrupted, 2-process DDP
== 1 process)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from . import device as DV
from .. import lora
from ..files import publish_folder, write_atomic
from ..lora import LoraConfig, adapter_names, get_lora_model
from .plot import describe_run, write_loss_png

_CKPT_PREFIX = "checkpoint-"
_STATE_FILE = "trainer_state.pt"
_OPTIONS_FILE = "options.json"
# Options that do not change what a run computes: a resume may differ in these (device: only in
# rounding; resuming a checkpoint on another device is what its device-independent form is for).
_RESUME_FREE = ("output_dir", "resume", "save_every", "log_every", "quiet", "device")


@dataclasses.dataclass
class TrainOptions:
    """Everything `nf4lora finetune` takes (the CLI flags map 1:1 onto these fields)."""

    model: Optional[str] = None            # None: the default SmolLM2-135M-Instruct GGUF
    data: Optional[str] = None             # None: the pydoc instruction set
    output_dir: str = "nf4lora-out"
    steps: int = 0                         # optimizer steps; 0: from epochs
    epochs: float = 1.0
    batch_size: int = 4                    # global batch (examples per optimizer step, all ranks)
    grad_accum: int = 1                    # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 2e-4
    schedule: str = "cosine"               # cosine | linear | constant
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0             # 0: no clipping
    seed: int = 0
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    use_dora: bool = False                 # DoRA: a trainable magnitude per output row (LoraConfig.use_dora)
    target_modules: str = "all-linear"     # or a comma-separated list of module names
    init: str = "kaiming"                  # kaiming | gaussian | loftq | pissa (LoraConfig.init)
    loftq_iter: int = 1                    # LoftQ's alternations (1: the plain 4-bit base, LoftQ adapters)
    quantize: Optional[str] = "nf4"        # nf4 | fp4 | None (bf16 base: plain LoRA)
    bf16: bool = True                      # bf16 autocast
    gradient_checkpointing: bool = False
    optim: str = "paged_adamw"             # paged_adamw | paged_adamw_8bit | adamw
    eval_fraction: float = 0.1
    max_eval: int = 64
    on_bad_line: str = "error"
    save_every: int = 0                    # checkpoint every N steps (0: only at the end / Ctrl-C)
    log_every: int = 1
    resume: Optional[str] = None           # a checkpoint folder, or "latest" in output_dir
    fsdp: bool = False                     # FSDP2 over the processes torchrun started (nf4lora.train.fsdp)
    device: str = "auto"                   # auto | cpu | cuda | cuda:N (train/device.py)
    quiet: bool = False

    def check(self) -> None:
        for name in ("batch_size", "grad_accum", "seq_len", "r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps < 0 or self.epochs <= 0:
            raise ValueError(f"steps must be >= 0 and epochs > 0, got steps={self.steps}, epochs={self.epochs}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.optim not in ("paged_adamw", "paged_adamw_8bit", "adamw"):
            raise ValueError(f"optim must be paged_adamw, paged_adamw_8bit or adamw, got {self.optim!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.init not in ("kaiming", "gaussian", "loftq", "pissa"):
            raise ValueError(f"init must be kaiming, gaussian, loftq or pissa, got {self.init!r}")
        if self.warmup_steps < 0 or self.save_every < 0:
            raise ValueError("warmup_steps and save_every must be >= 0")
        DV.check_spec(self.device)


# ---- the LoRA and optimizer interfaces: every call site is here ------------------------------

def _lora_config(opts: TrainOptions) -> Any:
    targets: Any = opts.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=opts.r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                      use_dora=opts.use_dora, target_modules=targets, task_type="CAUSAL_LM", base_model_name_or_path=opts.model,
                      init=opts.init, loftq_iter=opts.loftq_iter)


def _add_lora(model: nn.Module, opts: TrainOptions) -> nn.Module:
    if adapter_names(model):  # LoftQ / PiSSA: injected while loading (loading/adapter_base.py)
        return model
    return get_lora_model(model, _lora_config(opts))


def _optimizer(params: list[nn.Parameter], opts: TrainOptions) -> torch.optim.Optimizer:
    from ..optim import AdamW, PagedAdamW
    if opts.optim == "adamw":
        return AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    return PagedAdamW(params, lr=opts.lr, weight_decay=opts.weight_decay,
                      optim_bits=8 if opts.optim == "paged_adamw_8bit" else 32)


def save_adapter(model: nn.Module, directory: Path) -> None:
    lora.save_adapter(_unwrap(model), directory)


# ---- helpers --------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def rss_bytes() -> int:
    """Resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _schedule(opts: TrainOptions, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < opts.warmup_steps:
            return (step + 1) / (opts.warmup_steps + 1)
        if opts.schedule == "constant":
            return 1.0
        progress = (step - opts.warmup_steps) / max(1, total - opts.warmup_steps)
        progress = min(1.0, progress)
        return 0.5 * (1 + math.cos(math.pi * progress)) if opts.schedule == "cosine" else 1.0 - progress
    return factor


class CausalLMLoss(nn.Module):
    """(sum of token losses, token count) for a batch; logits are computed only where a label
    is, so prompt tokens skip the vocabulary-sized output head (most of the head's cost on
    instruction data). Wrapping this, not the model, in DDP keeps DDP's hooks on the real call.

    fused_head: under bf16 autocast on a CPU or CUDA, a frozen nn.Linear head and the cross entropy
    go through train/head_loss.py (the same rounding points, chunked over the vocabulary, no fp32
    [tokens, vocab] tensors; its GEMMs in fp32 on a CPU where calibration found them faster);
    False keeps the plain head + F.cross_entropy (what bench_finetune's PEFT baselines use)."""

    def __init__(self, model: nn.Module, fused_head: bool = True) -> None:
        super().__init__()
        self.model = model
        self.fused_head = fused_head

    def _fused(self, head: nn.Module, hidden: torch.Tensor) -> bool:
        kind = hidden.device.type
        return (self.fused_head and type(head) is nn.Linear and not head.weight.requires_grad
                and (head.bias is None or not head.bias.requires_grad) and kind in ("cpu", "cuda")
                and torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16
                and head.weight.dtype in (torch.bfloat16, torch.float32))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        base = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        head = self.model.get_output_embeddings() if base is not None else None
        targets = labels[:, 1:]
        keep = targets != D.IGNORE_INDEX
        if torch.compiler.is_compiling():
            # Boolean-mask indexing has a data-dependent shape (a graph break): under torch.compile
            # the head runs over every position and cross_entropy skips the ignored ones (same sum).
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=D.IGNORE_INDEX, reduction="sum")
            return loss, keep.sum()
        if base is None or head is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            picked = logits[keep]
        else:
            hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
            if self._fused(head, hidden):
                from .head_loss import head_cross_entropy
                return head_cross_entropy(hidden[keep].to(torch.bfloat16), head.weight, head.bias,
                                          targets[keep]), keep.sum()
            picked = head(hidden[keep])
        loss = F.cross_entropy(picked.float(), targets[keep], reduction="sum")
        return loss, keep.sum()


def _rng_state(device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    # Only tensors and plain values, so the checkpoint loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    cuda = DV.rng_state(device)
    if cuda is not None:
        state["cuda"] = cuda
    return state


def _set_rng_state(s: dict[str, Any], device: torch.device = torch.device("cpu")) -> None:
    torch.set_rng_state(s["torch"])
    DV.set_rng_state(s.get("cuda"), device)
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# ---- checkpoints ----------------------------------------------------------------------------

def write_checkpoint(out: Path, step: int, model: nn.Module, state: dict[str, Any], opts: TrainOptions) -> Path:
    """Writes out/checkpoint-<step> atomically: everything goes into a temp folder, is fsynced,
    then renamed into place; older checkpoints are removed only after that. On any failure (out
    of disk, ...) the temp folder is removed, the previous checkpoint is intact, and the error
    propagates."""
    final = out / f"{_CKPT_PREFIX}{step}"
    tmp = out / f".tmp-{_CKPT_PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_adapter(model, tmp / "adapter")
        torch.save(state, tmp / _STATE_FILE)
        (tmp / _OPTIONS_FILE).write_text(json.dumps(dataclasses.asdict(opts), indent=1, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_folder(tmp, final)
    _remove_older(out, final)
    return final


def _remove_older(out: Path, final: Path) -> None:
    for old in out.glob(f"{_CKPT_PREFIX}*"):
        if old != final and old.name[len(_CKPT_PREFIX):].isdigit():
            shutil.rmtree(old, ignore_errors=True)


def _write_state_files(tmp: Path, state: dict[str, Any], opts: TrainOptions) -> None:
    torch.save(state, tmp / _STATE_FILE)
    (tmp / _OPTIONS_FILE).write_text(json.dumps(dataclasses.asdict(opts), indent=1, sort_keys=True))


def find_checkpoint(resume: str, output_dir: str) -> Path:
    if resume != "latest":
        path = Path(resume)
        if not (path / _STATE_FILE).is_file():
            raise ValueError(f"resume: {resume} is not a checkpoint folder (no {_STATE_FILE})")
        return path
    found = sorted((p for p in Path(output_dir).glob(f"{_CKPT_PREFIX}*")
                    if p.name[len(_CKPT_PREFIX):].isdigit() and (p / _STATE_FILE).is_file()),
                   key=lambda p: int(p.name[len(_CKPT_PREFIX):]))
    if not found:
        raise ValueError(f"resume: no checkpoint in {output_dir}")
    return found[-1]


def _check_resume_options(path: Path, opts: TrainOptions) -> None:
    saved = json.loads((path / _OPTIONS_FILE).read_text())
    now = dataclasses.asdict(opts)
    # options added after the checkpoint was written had their default then
    defaults = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    saved = {**{k: defaults[k] for k in now if k not in saved and k in defaults}, **saved}
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
             if k not in _RESUME_FREE and saved.get(k) != now.get(k)]
    if diffs:
        raise ValueError(f"resume: {path} was made with other options; differences:\n  " + "\n  ".join(diffs))


# ---- distributed ----------------------------------------------------------------------------

def _dist(fsdp: bool = False, device: torch.device = torch.device("cpu")) -> tuple[int, int]:
    """(rank, world size); initializes the process group when torchrun started us (also for one
    process with fsdp): NCCL when the run is on CUDA, gloo on the CPU (DV.backend)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if fsdp and "MASTER_ADDR" not in os.environ:
        raise ValueError("fsdp: start the run with torchrun (e.g. torchrun --nproc_per_node 2 -m nf4lora finetune --fsdp)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or fsdp:
        # The backend follows the run's device, not the machine: NCCL refuses CPU tensors (seen on
        # the H200 machine by bench/gpu_check.sh), so a --device cpu run uses gloo where CUDA is present.
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=DV.backend(device))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(x)
    return x


def _wrap_ddp(loss_module: CausalLMLoss, world: int) -> nn.Module:
    if world == 1:
        return loss_module
    # Only the trainable adapter weights are all-reduced: the frozen 4-bit codes, their scales and
    # every other frozen tensor are left out of DDP's buckets and of its start-up broadcast (each
    # rank loaded the same checkpoint), and buffers are not re-broadcast every forward.
    ignore = [n for n, p in loss_module.named_parameters() if not p.requires_grad]
    ignore += [n for n, _ in loss_module.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(loss_module, ignore)
    return nn.parallel.DistributedDataParallel(loss_module, broadcast_buffers=False)


# ---- evaluation -----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(loss_module: nn.Module, items: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
             bf16: bool) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over `items` (in eval mode, no dropout)."""
    if not items:
        return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0}
    device = DV.model_device(loss_module)
    was = loss_module.training
    loss_module.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(items), batch_size):
            batch = DV.to_device(D.collate(items[i:i + batch_size], pad_id), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, n = loss_module(**batch)
            total += float(loss)
            count += int(n)
    finally:
        loss_module.train(was)
    mean = total / max(1, count)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


# ---- progress -------------------------------------------------------------------------------

class Progress:
    """One status line on stderr: step, loss, lr, tokens/s, memory, time left."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, lr: float, tok_s: float, first_step: int) -> None:
        if not self.enabled:
            return
        done = step - first_step
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(1, done) * (self.total - step)
        width = 20
        filled = int(width * step / max(1, self.total))
        bar = "#" * filled + "." * (width - filled)
        line = (f"[{bar}] step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                f"RSS {rss_bytes() / 2**30:.2f} GiB | {elapsed:,.0f}s, ~{eta:,.0f}s left")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


# ---- the run --------------------------------------------------------------------------------

def finetune(opts: TrainOptions, model: Optional[nn.Module] = None, tokenizer: Any = None,
             on_step: Optional[Callable[[int], None]] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs a QLoRA fine-tune as `opts` says and returns the metrics (also in metrics.json).

    model/tokenizer: an already loaded model (tests; it gets the adapter injected) instead of
    opts.model. on_step(step) runs after each optimizer step (a KeyboardInterrupt raised there
    acts like Ctrl-C). Exits early with a final checkpoint on KeyboardInterrupt, re-raising it."""
    opts.check()
    if opts.device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"device {opts.device}: with several processes use --device cuda or auto "
                         "(each process takes cuda:LOCAL_RANK)")
    device = DV.resolve(opts.device)
    rank, world = _dist(opts.fsdp, device)
    main = rank == 0
    say = log if main and not opts.quiet else (lambda *_: None)
    out = Path(opts.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    resume_path = find_checkpoint(opts.resume, opts.output_dir) if opts.resume else None
    if resume_path is not None:
        _check_resume_options(resume_path, opts)

    # -- model and data
    if model is None:
        from ..loading import load_model
        say(f"loading {opts.model or 'the default model (SmolLM2-135M-Instruct GGUF)'} ...")
        if opts.init in ("loftq", "pissa"):  # the adapters and the base come from the dense weights
            from ..loading.adapter_base import load_base_for_init
            model, tokenizer = load_base_for_init(opts.model, _lora_config(opts), opts.quantize, device=device)
        else:
            model, tokenizer = load_model(opts.model, quantize=opts.quantize, device=device)
    if tokenizer is None:
        raise ValueError("model: the source has no tokenizer (tokenizer.json / tokenizer_config.json)")
    model = DV.move_model(model, device)  # a model given by the caller; load_model built it there
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and opts.seq_len > max_pos:
        raise ValueError(f"seq_len {opts.seq_len} is larger than the model's {max_pos} positions")
    t_loaded = time.perf_counter()
    examples = D.load_examples(opts.data, opts.on_bad_line)
    train_ex, eval_ex = D.split_examples(examples, opts.eval_fraction, opts.max_eval)
    train_items = D.tokenize(train_ex, tokenizer, opts.seq_len)
    eval_items = D.tokenize(eval_ex, tokenizer, opts.seq_len) if eval_ex else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    say(f"data: {len(train_items)} training and {len(eval_items)} held-out examples "
        f"({opts.data or 'pydoc topics'})")

    if opts.batch_size % (opts.grad_accum * world):
        raise ValueError(f"batch_size ({opts.batch_size}) must be a multiple of grad_accum x processes "
                         f"({opts.grad_accum} x {world})")
    order = D.BatchOrder(len(train_items), opts.batch_size, opts.seed)
    total = opts.steps or max(1, math.ceil(opts.epochs * order.steps_per_epoch))

    # bf16 attention by the route calibrated for this CPU (fp32, bf16 without repeated kv heads or
    # sdpa) and RMSNorm with a hand-written backward, for this run only: the model goes back to its
    # own attention and norms afterwards
    from .cpu_attention import use_fp32_cpu_attention
    from .cpu_memory import retain_freed_memory
    from .fused_norm import restore_rmsnorm, use_fused_rmsnorm
    if device.type == "cpu":
        retain_freed_memory()  # the step's buffers reused from the heap, not fresh pages each step
    attn_before = getattr(model.config, "_attn_implementation", None)
    switched = device.type == "cpu" and use_fp32_cpu_attention(model)
    norms = use_fused_rmsnorm(model) if device.type == "cpu" else []
    try:
        return _train(opts, model, tokenizer, on_step, say, rank, world, main, out, t_start, t_loaded,
                      resume_path, train_items, eval_items, pad_id, order, total, device)
    finally:
        restore_rmsnorm(norms)
        if switched:
            model.set_attn_implementation(attn_before)


def _train(opts: TrainOptions, model: nn.Module, tokenizer: Any, on_step: Optional[Callable[[int], None]],
           say: Callable[..., None], rank: int, world: int, main: bool, out: Path, t_start: float,
           t_loaded: float, resume_path: Optional[Path], train_items: list, eval_items: list,
           pad_id: int, order: D.BatchOrder, total: int, device: torch.device) -> dict[str, Any]:
    """The rest of finetune (see there): adapters, optimizer, the loop, evaluation, outputs."""
    # -- adapters, optimizer, schedule (seeded identically on every rank: same adapter init)
    _seed_all(opts.seed)
    model = _add_lora(model, opts)
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss_module = CausalLMLoss(model)
    sharded = None
    if opts.fsdp:
        from . import fsdp as FS
        FS.shard_model(model, root=loss_module)  # the loss module's forward gathers embeddings and head
        params = [p for p in model.parameters() if p.requires_grad]
        sharded = FS.ShardedOptimizer(params, lambda local: _optimizer(local, opts))
        optimizer, runner = sharded.optimizer, loss_module
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(params, opts)
        runner = _wrap_ddp(loss_module, world)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(opts, total))
    n_train = sum(p.numel() for p in params)
    say(f"LoRA r={opts.r}: {n_train:,} trainable parameters; {world} process(es) on {device}; {total} steps of "
        f"{opts.batch_size} examples")

    step, history, eval_before = 0, [], None
    if resume_path is not None:
        # On the CPU first, whatever device wrote it; copy_ and the optimizers' load_state_dict put
        # each value on its parameter's device.
        state = torch.load(resume_path / _STATE_FILE, map_location="cpu", weights_only=True)
        named = dict(model.named_parameters())
        if sharded is not None:
            FS.load_checkpoint(resume_path, model, sharded, state["param_groups"])
        elif set(state["trainable"]) != {n for n, p in named.items() if p.requires_grad}:
            raise ValueError(f"resume: {resume_path} holds other trainable parameters than this model has")
        else:
            with torch.no_grad():
                for name, value in state["trainable"].items():
                    named[name].copy_(value)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        order.load_state_dict(state["data"])
        step, history, eval_before = state["step"], state["history"], state["eval_before"]
        _set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0], device)
        say(f"resumed from {resume_path} at step {step}")
    if eval_before is None:
        eval_before = evaluate(loss_module, eval_items, pad_id, max(1, opts.batch_size // opts.grad_accum), opts.bf16)
        say(f"held-out before: loss {eval_before['loss']:.4f}, perplexity {eval_before['perplexity']:.2f}")

    def snapshot() -> dict[str, Any]:
        rngs = [_rng_state(device)]
        if world > 1:
            import torch.distributed as dist
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        return {"trainable": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "data": order.state_dict(), "step": step, "history": list(history),
                "eval_before": eval_before, "rng": rngs}

    def checkpoint(state: dict[str, Any]) -> Optional[Path]:
        if sharded is not None:  # collective: DCP shards, then rank 0's trainer state and the rename
            extra = {k: v for k, v in state.items() if k not in ("trainable", "optimizer")}
            extra["param_groups"] = FS.param_groups(sharded)
            path = FS.save_checkpoint(out / f"{_CKPT_PREFIX}{state['step']}", model, sharded,
                                      lambda tmp: _write_state_files(tmp, extra, opts))
            if main:
                _remove_older(out, path)
            return path
        if not main:
            return None
        return write_checkpoint(out, state["step"], model, state, opts)

    progress = Progress(total, main and not opts.quiet)
    first = step
    micro = opts.batch_size // opts.grad_accum // world
    train_tokens = 0
    t_train = time.perf_counter()
    start_state = snapshot()
    interrupted = False
    try:
        while step < total:
            t0 = time.perf_counter()
            indices = order.next()
            micro_batches = [indices[i:i + micro] for i in range(rank * micro, len(indices), micro * world)]
            # The loss is a mean over every labelled token of the global batch, so accumulation and
            # processes give the same gradient as one big batch.
            counts = torch.tensor([sum(sum(1 for t in train_items[j][1][1:] if t != D.IGNORE_INDEX)
                                       for j in indices)], dtype=torch.float64)
            n_tokens = float(counts)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for k, mb in enumerate(micro_batches):
                batch = DV.to_device(D.collate([train_items[j] for j in mb], pad_id), device)
                sync = k == len(micro_batches) - 1
                if sharded is not None:
                    ctx = FS.no_sync(runner, enabled=not sync)
                else:
                    ctx = runner.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
                with ctx:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.bf16):
                        loss, _ = runner(**batch)
                    (loss * (world / n_tokens)).backward()
                loss_sum += loss.detach().double()
                train_tokens += int(batch["attention_mask"].sum())
            if opts.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = float(_all_sum(loss_sum, world)) / n_tokens
            step += 1
            history.append({"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0]})
            dt = time.perf_counter() - t0
            if step % max(1, opts.log_every) == 0 or step == total:
                tokens_here = sum(len(train_items[j][0]) for j in indices)
                progress.update(step, step_loss, history[-1]["lr"], tokens_here / dt, first)
            start_state = snapshot()
            if opts.save_every and step % opts.save_every == 0 and step < total:
                checkpoint(start_state)
            if on_step is not None:
                on_step(step)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
    train_time = time.perf_counter() - t_train
    if interrupted and sharded is not None:
        # Other ranks may be inside a collective: no checkpoint now; the last periodic one stays.
        say("interrupted: continue from the last periodic checkpoint with --resume latest")
        raise KeyboardInterrupt
    if interrupted:
        # The state as of the last completed step (a half-accumulated step is dropped).
        path = checkpoint(start_state)
        say(f"interrupted: checkpoint at step {start_state['step']} in {path}; continue with --resume latest")
        raise KeyboardInterrupt

    eval_after = evaluate(loss_module, eval_items, pad_id, max(1, opts.batch_size // opts.grad_accum), opts.bf16)
    say(f"held-out after:  loss {eval_after['loss']:.4f}, perplexity {eval_after['perplexity']:.2f}")
    metrics = {
        "options": dataclasses.asdict(opts), "processes": world, "steps": step,
        "trainable_parameters": n_train,
        "eval_before": eval_before, "eval_after": eval_after,
        "train_tokens_per_s": train_tokens * world / train_time if step > first else None,
        "train_time_s": train_time, "load_time_s": t_loaded - t_start,
        "wall_time_s": time.perf_counter() - t_start, "peak_rss_bytes": peak_rss_bytes(),
        "history": history,
    }
    if sharded is not None:
        FS.save_adapter(model, out / "adapter")  # gathered, written once by rank 0
    elif main:
        save_adapter(model, out / "adapter")
    if main:
        write_atomic(out / "metrics.json", json.dumps(metrics, indent=1).encode())
        note = write_loss_png(out / "loss.png", history, eval_before, eval_after, describe_run(opts))
        say(f"adapter (PEFT format): {out / 'adapter'}; metrics: {out / 'metrics.json'}; {note}")
    return metrics
