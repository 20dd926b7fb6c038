"""The shared machinery of nf4lora's fused optimizers (AdamW in optim/adamw.py, Lion in
optim/lion.py): state creation (fp32 or bitsandbytes' 8-bit blockwise layout, paged or not), the
step loop over the native kernels of nf4lora.ops.optim, NaN/Inf block skipping, and a checked
load_state_dict. A subclass names its algorithm, its state buffers and its hyperparameters.

What is where:

- 32-bit state: the subclass's 32-bit keys (``exp_avg``, ``exp_avg_sq``), fp32 for every param dtype.
- 8-bit state (params of at least ``min_8bit_size`` = 4096 elements; smaller ones keep fp32 state):
  ``state1``/``state2`` uint8 codes into bitsandbytes' signed / unsigned dynamic maps and
  ``absmax1``/``absmax2`` fp32 per block of 256, as bitsandbytes stores them.
- Paging (``paged=True``), for buffers of at least 1e5 elements (optim/paging.py): CUDA managed
  memory prefetched to the GPU before each parameter's update, or files in ``page_dir`` on the CPU.

Non-finite gradients: every block of 256 gradient elements holding a NaN or Inf is skipped (its
params and state are left exactly as they were), ``skipped_blocks`` counts them and a RuntimeWarning
says so; the state never takes a NaN from a gradient. On the CPU the count comes back from each
kernel call. On CUDA the kernels add into one int32 counter per device and step, copied to pinned
host memory without waiting (no host sync per step: a step only enqueues work); a later step
adds the copies whose GPU work has finished and warns then, and reading ``skipped_blocks`` waits
for all of them (exact).
Tested by tests/test_optim.py and tests/test_optim_lion.py.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections import defaultdict
from typing import Any, Callable, ClassVar, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor

from ..ops import FLOAT_DTYPES, has_cuda
from ..ops import memory, optim as native
from .paging import MIN_PAGED_ELEMENTS, PageFiles, managed_zeros

BLOCK = native.BLOCK
MIN_8BIT_SIZE = native.MIN_8BIT_ELEMENTS
MIN_PAGED_SIZE = MIN_PAGED_ELEMENTS


def check_types(betas: Any, **scalars: Any) -> None:
    """TypeError unless every scalar hyperparameter is a real number and betas a pair of them."""
    for name, value in scalars.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas):
        raise TypeError(f"betas must be floats, got {betas!r}")


class FusedOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose per-parameter update is one native kernel (nf4lora.ops.optim.STEPS).

    Subclasses set ALGORITHM (the kernel table's key), STATE_KEYS (state buffers per state width,
    in the kernel's argument order) and implement check_group and hyper."""

    ALGORITHM: ClassVar[str]
    STATE_KEYS: ClassVar[Dict[int, Tuple[str, ...]]]

    def _setup(self, params: Iterable[Any], defaults: Dict[str, Any], optim_bits: int, paged: bool,
               page_dir: Optional[str], min_8bit_size: int) -> None:
        if optim_bits not in (8, 32) or isinstance(optim_bits, bool):
            raise ValueError(f"optim_bits must be 32 or 8, got {optim_bits!r}")
        if not isinstance(paged, bool):
            raise TypeError(f"paged must be True or False, got {paged!r}")
        if page_dir is not None and not paged:
            raise ValueError("page_dir is only used with paged=True")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 1:
            raise ValueError(f"min_8bit_size must be a positive int, got {min_8bit_size!r}")
        torch.optim.Optimizer.__init__(self, params, defaults)
        self.optim_bits = optim_bits
        self.paged = paged
        self.min_8bit_size = min_8bit_size
        self.skipped_blocks = 0  # gradient blocks skipped for NaN/Inf, over all steps
        self._pages = PageFiles(page_dir) if paged else None

    # ---- what a subclass provides ---------------------------------------------------------------

    def check_group(self, group: Dict[str, Any]) -> None:
        raise NotImplementedError

    def hyper(self, group: Dict[str, Any], state: Dict[str, Any]) -> Tuple:
        """The kernel's hyperparameter arguments for one param of `group`."""
        raise NotImplementedError

    # ---- the skipped-block count -----------------------------------------------------------------

    @property
    def skipped_blocks(self) -> int:
        """Gradient blocks skipped for NaN/Inf over all steps; waits for pending CUDA counts."""
        self._collect(wait=True)
        return self._skipped

    @skipped_blocks.setter
    def skipped_blocks(self, value: int) -> None:
        self._skipped, self._unwarned, self._pending = int(value), 0, []

    def _collect(self, wait: bool) -> None:
        """Adds the CUDA counts copied to the host whose copies have finished (all: wait=True)."""
        still = []
        for done, host in self._pending:
            if wait:
                done.synchronize()
            elif not done.query():
                still.append((done, host))
                continue
            n = int(host[0])
            self._skipped += n
            self._unwarned += n
        self._pending = still

    def _warn_skipped(self) -> None:
        if self._unwarned:
            n, self._unwarned = self._unwarned, 0
            warnings.warn(f"nf4lora.optim: skipped {n} block(s) of {BLOCK} elements whose "
                          "gradients hold NaN or Inf (their params and state are unchanged)",
                          RuntimeWarning, stacklevel=3)

    # ---- copies -------------------------------------------------------------------------------

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state.update(optim_bits=self.optim_bits, paged=self.paged, min_8bit_size=self.min_8bit_size,
                     skipped_blocks=self.skipped_blocks)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # A copy (deepcopy, pickle) holds its state in ordinary tensors (torch copies file-backed and
        # managed tensors by value) and owns no files; state it creates later is paged under a new
        # temporary directory.
        state = dict(state)
        skipped = state.pop("skipped_blocks", 0)
        super().__setstate__(state)
        self.skipped_blocks = skipped
        self._pages = PageFiles(None) if self.paged else None

    # ---- paging -------------------------------------------------------------------------------

    @property
    def page_dir(self) -> Optional[str]:
        return None if self._pages is None else self._pages.directory

    def page_files(self) -> list[str]:
        """The files currently backing paged CPU state (empty on CUDA or when not paged)."""
        return [] if self._pages is None else self._pages.files()

    def _buffer(self, numel: int, dtype: torch.dtype, p: Tensor) -> Tensor:
        """A zero-filled state buffer for param p: paged when asked for and large enough."""
        if self.paged and numel >= MIN_PAGED_SIZE:
            if p.device.type == "cuda":
                return managed_zeros(numel, dtype, p.device)
            if p.device.type == "cpu":
                return self._pages.zeros(numel, dtype, id(p))
        return torch.zeros(numel, dtype=dtype, device=p.device)

    # ---- state ------------------------------------------------------------------------------

    def _uses_8bit(self, p: Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _expected_shapes(self, p: Tensor) -> Dict[str, Tuple[int, torch.dtype]]:
        n = p.numel()
        blocks = (n + BLOCK - 1) // BLOCK
        shapes = {"exp_avg": (n, torch.float32), "exp_avg_sq": (n, torch.float32),
                  "state1": (n, torch.uint8), "state2": (n, torch.uint8),
                  "absmax1": (blocks, torch.float32), "absmax2": (blocks, torch.float32)}
        return {key: shapes[key] for key in self.STATE_KEYS[8 if self._uses_8bit(p) else 32]}

    def _init_state(self, p: Tensor) -> None:
        state = self.state[p]
        if "step" in state:
            return
        for key, (numel, dtype) in self._expected_shapes(p).items():
            state[key] = self._buffer(numel, dtype, p)
        state["step"] = 0

    def _check_param(self, p: Tensor, where: str) -> None:
        g = p.grad
        if g.is_sparse:
            raise RuntimeError(f"{where}: {type(self).__name__} does not support sparse gradients "
                               "(use torch.optim.SparseAdam)")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where}: params must be float32, float16 or bfloat16, got {p.dtype}")
        if g.dtype != p.dtype:
            raise TypeError(f"{where}: grad dtype {g.dtype} differs from the param dtype {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"{where}: grad shape {tuple(g.shape)} differs from the param shape "
                             f"{tuple(p.shape)}")
        if g.device != p.device:
            raise ValueError(f"{where}: grad is on {g.device} but the param is on {p.device}")
        if p.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{where}: params must be on the CPU or a CUDA device, got {p.device}")
        if not p.is_contiguous():
            raise ValueError(f"{where}: params must be contiguous (shape {tuple(p.shape)}, "
                             f"stride {p.stride()})")
        if p.device.type == "cuda" and not has_cuda():
            raise RuntimeError(f"{where}: nf4lora was built without CUDA kernels")

    # ---- step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check everything and create every missing state buffer before the first update, so a
        # bad input or a full page_dir raises with all parameters left as they were.
        work = []
        for gi, group in enumerate(self.param_groups):
            self.check_group(group)
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                self._check_param(p, f"param {pi} of group {gi}")
                work.append((group, p))
        for _, p in work:
            self._init_state(p)

        self._collect(wait=False)
        skipped = 0
        cuda_skipped: Dict[torch.device, Tensor] = {}
        algorithm, keys = self.ALGORITHM, self.STATE_KEYS
        for group, p in work:
            if p.numel() == 0:
                continue
            state = self.state[p]
            state["step"] += 1
            grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
            bits = 8 if "state1" in state else 32
            buffers = [state[k] for k in keys[bits]]
            if p.device.type == "cpu":
                skipped += native.step(algorithm, bits, p, grad, buffers, self.hyper(group, state))
                continue
            counter = cuda_skipped.get(p.device)
            if counter is None:
                counter = cuda_skipped[p.device] = torch.zeros(1, dtype=torch.int32, device=p.device)
            if self.paged and memory.prefetch_supported(p.device):
                for t in buffers:  # page the state in before the update reads it
                    if t.numel() >= MIN_PAGED_SIZE:
                        memory.prefetch(t, p.device)
            native.step(algorithm, bits, p, grad, buffers, self.hyper(group, state), counter)
        for device, counter in cuda_skipped.items():  # read later, without a host sync now
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(counter, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(device))
            self._pending.append((done, host))
        self._skipped += skipped
        self._unwarned += skipped
        self._warn_skipped()
        return loss

    # ---- state dict -----------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Loads a state dict of an optimizer over the same parameter layout; the next step is then
        bit for bit the one the saved optimizer would have taken. Checks the whole dict first and
        raises ValueError on a different layout, leaving this optimizer unchanged."""
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError("state_dict must be an optimizer state dict with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer has "
                             f"{len(self.param_groups)}")
        id_to_param = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"group {gi} of state_dict has {len(saved['params'])} params, this "
                                 f"optimizer's has {len(group['params'])}")
            self.check_group(saved)
            id_to_param.update(zip(saved["params"], group["params"]))
        loaded: Dict[Tensor, Dict[str, Any]] = {}
        for pid, saved_state in state_dict["state"].items():
            if pid not in id_to_param:
                raise ValueError(f"state_dict holds state for param id {pid}, which no group lists")
            p = id_to_param[pid]
            expected = self._expected_shapes(p)
            missing = [k for k in expected if k not in saved_state] + (["step"] if "step" not in saved_state else [])
            if missing:
                kind = "8-bit" if self._uses_8bit(p) else "32-bit"
                raise ValueError(f"state of param id {pid} (shape {tuple(p.shape)}) lacks {missing}: "
                                 f"it was saved by an optimizer with another layout or state kind "
                                 f"(this one keeps {kind} state for it)")
            for key, (numel, dtype) in expected.items():
                t = saved_state[key]
                if not isinstance(t, Tensor) or t.numel() != numel or t.dtype != dtype:
                    got = f"{t.dtype} with {t.numel()} elements" if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"state {key!r} of param id {pid} must be {dtype} with {numel} "
                                     f"elements (param shape {tuple(p.shape)}), got {got}")
            step = saved_state["step"]
            step = int(step.item()) if isinstance(step, Tensor) else int(step)
            if step < 0:
                raise ValueError(f"state 'step' of param id {pid} must be >= 0, got {step}")
            loaded[p] = {"step": step, **{k: saved_state[k] for k in expected}}
        # Everything checked: allocate (paged where configured) and copy; then delete the files of
        # the state this replaces (all of it: self.state is replaced as a whole).
        stale = self.page_files()
        new_state: Dict[Tensor, Dict[str, Any]] = {}
        for p, values in loaded.items():
            fresh: Dict[str, Any] = {"step": values["step"]}
            for key, (numel, dtype) in self._expected_shapes(p).items():
                buf = self._buffer(numel, dtype, p)
                buf.copy_(values[key].reshape(-1))
                fresh[key] = buf
            new_state[p] = fresh
        if stale:
            self._pages.remove(stale)
        self.state = defaultdict(dict, new_state)
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = value

    def state_bytes(self) -> int:
        """Bytes of optimizer state held now (all params)."""
        return sum(t.numel() * t.element_size() for s in self.state.values()
                   for t in s.values() if isinstance(t, Tensor))


def with_parent_signature(cls: type) -> type:
    """For a variant that passes *args/**kwargs on to AdamW / Lion (PagedAdamW, AdamW8bit, ...):
    its __init__ gets the parent's real signature with the variant's own defaults (paged,
    optim_bits), so inspect.signature, help() and editors show what it takes
    (tests/test_signatures.py)."""
    own = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
           if p.kind is inspect.Parameter.KEYWORD_ONLY}
    sig = inspect.signature(cls.__mro__[1].__init__)
    cls.__init__.__signature__ = sig.replace(parameters=[
        p.replace(default=own.get(p.name, p.default)) for p in sig.parameters.values()])
    return cls


def state_bytes_per_param(n: int, optim_bits: int, moments: int = 2) -> float:
    """Bytes of optimizer state per parameter for an n-element tensor (8-bit: codes + block
    absmax); ``moments`` = 2 for AdamW, 1 for Lion."""
    if optim_bits == 8 and n >= MIN_8BIT_SIZE:
        return moments * (n + 4 * math.ceil(n / BLOCK)) / n
    return 4.0 * moments
