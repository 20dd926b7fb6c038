"""Paged AdamW and Lion optimizers with fp32 or 8-bit blockwise state on fused native update kernels
(``nf4lora._C.{adamw,lion}_{32,8}bit_{cpu,cuda}``; nf4lora/optim.h holds the math, cuda/optim.cu
the GPU kernels). Reference: torch.optim.AdamW and lion-pytorch's Lion (the updates)
and bitsandbytes' AdamW8bit / Lion8bit / PagedAdamW (the 8-bit state layout and what is paged).
Tested by tests/test_optim.py against them.

Steps call ``_C`` directly rather than through torch.library custom ops: an optimizer step mutates
its state in place and is not meant to be traced, so ``torch.compile`` graph-breaks around it.

What is where:

- 32-bit state: ``state["exp_avg"]``, ``state["exp_avg_sq"]`` (fp32 for every param dtype).
- 8-bit state (params of at least ``min_8bit_size`` = 4096 elements; smaller ones keep fp32 state):
  ``state1``/``state2`` uint8 codes into bitsandbytes' signed / unsigned dynamic maps and
  ``absmax1``/``absmax2`` fp32 per block of 256, as bitsandbytes stores them.
- Paging (``paged=True``), for buffers of at least 1e5 elements: on CUDA, ``cudaMallocManaged`` memory
  prefetched to the GPU before each parameter's update; on the CPU, files in ``page_dir`` (a temporary
  directory when not given) mapped shared, so the kernel can write state out under memory pressure.
  The files are removed when the optimizer is garbage-collected.

Non-finite gradients: every block of 256 gradient elements holding a NaN or Inf is skipped (its
params and state are left exactly as they were), ``skipped_blocks`` counts them and a RuntimeWarning
says so; the state never takes a NaN from a gradient.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import tempfile
import warnings
import weakref
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from ._native import FLOAT_DTYPES, _C, dtype_code, num_threads

__all__ = ["AdamW", "AdamW8bit", "Lion", "Lion8bit", "PagedAdamW", "PagedAdamW8bit", "PagedLion",
           "PagedLion8bit"]

BLOCK = int(_C.OPTIM_BLOCK)
MIN_8BIT_SIZE = int(_C.MIN_8BIT_ELEMENTS)
MIN_PAGED_SIZE = int(_C.MIN_PAGED_ELEMENTS)


def _check_types(betas: Any, **scalars: Any) -> None:
    """TypeError unless every scalar hyperparameter is a real number and betas a pair of them."""
    for name, value in scalars.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas):
        raise TypeError(f"betas must be floats, got {betas!r}")


def _check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    _check_types(betas, lr=lr, eps=eps, weight_decay=weight_decay)
    # The native check names the first bad value: lr < 0, a beta outside [0, 1), eps <= 0,
    # weight_decay < 0, or anything non-finite.
    _C.adamw_check(float(lr), float(betas[0]), float(betas[1]), float(eps), float(weight_decay), 1)


class _ManagedBuffer:
    """Owns one cudaMallocManaged allocation and lends it to torch as a CUDA tensor without a copy
    (through the CUDA array interface, which keeps this owner alive as long as the tensor)."""

    _TYPESTR = {torch.float32: "<f4", torch.uint8: "|u1"}

    def __init__(self, numel: int, dtype: torch.dtype):
        self.nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self.ptr = int(_C.managed_alloc(self.nbytes))
        self.__cuda_array_interface__ = {"shape": (numel,), "typestr": self._TYPESTR[dtype],
                                         "data": (self.ptr, False), "version": 3,
                                         "strides": None, "stream": None}

    def __del__(self) -> None:
        if getattr(self, "ptr", 0):
            _C.managed_free(self.ptr)
            self.ptr = 0


def _remove_page_files(files: List[str], directory: Optional[str]) -> None:
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    files.clear()
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with a fused native step.

    ``optim_bits=32`` matches ``torch.optim.AdamW`` (to ~1e-6 relative over 100 steps); ``8`` keeps
    the moments in bitsandbytes' 8-bit blockwise format (2.03 bytes/param instead of 8).
    ``paged=True`` pages large state buffers (CUDA managed memory, or files in ``page_dir`` on the
    CPU). Params may be fp32, fp16 or bf16 (state is fp32 or 8-bit either way), on the CPU or CUDA.
    """

    _KERNEL = "adamw"  # the native steps: _C.<_KERNEL>_{32,8}bit_{cpu,cuda}
    # State buffers per state width, in the native steps' argument order.
    _STATE_KEYS = {32: ("exp_avg", "exp_avg_sq"), 8: ("state1", "state2", "absmax1", "absmax2")}

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, optim_bits: int = 32,
                 paged: bool = False, page_dir: Optional[str] = None,
                 min_8bit_size: int = MIN_8BIT_SIZE):
        _check_hyper(lr, betas, eps, weight_decay)
        defaults = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])), eps=float(eps),
                        weight_decay=float(weight_decay))
        self._setup(params, defaults, optim_bits, paged, page_dir, min_8bit_size)

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
        self._start_paging(page_dir)

    def _start_paging(self, page_dir: Optional[str]) -> None:
        self._page_files: List[str] = []
        self._files_of: Dict[int, List[str]] = {}  # id(param) -> its state files
        self._own_dir: Optional[str] = None
        self.page_dir: Optional[str] = self._open_page_dir(page_dir) if self.paged else None
        self._finalizer = weakref.finalize(self, _remove_page_files, self._page_files, self._own_dir)

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state.update(optim_bits=self.optim_bits, paged=self.paged, min_8bit_size=self.min_8bit_size,
                     skipped_blocks=self.skipped_blocks)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # A copy (deepcopy, pickle) holds its state in ordinary tensors (torch copies file-backed and
        # managed tensors by value) and owns no files; state it creates later is paged under a new
        # temporary directory.
        super().__setstate__(state)
        self._start_paging(None)

    # ---- paging ---------------------------------------------------------------------------

    def _open_page_dir(self, page_dir: Optional[str]) -> str:
        if page_dir is None:
            self._own_dir = tempfile.mkdtemp(prefix="nf4lora-paged-")
            return self._own_dir
        page_dir = os.fspath(page_dir)
        if not os.path.isdir(page_dir):
            raise ValueError(f"page_dir {page_dir!r} is not a directory")
        try:  # os.access is not enough (read-only mounts, ACLs): create and remove a probe file
            fd, probe = tempfile.mkstemp(prefix=".nf4lora-probe-", dir=page_dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ValueError(f"page_dir {page_dir!r} is not writable: {exc}") from exc
        return page_dir

    def _paged_file_tensor(self, numel: int, dtype: torch.dtype, owner: Tensor) -> Tensor:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        assert self.page_dir is not None
        fd, path = tempfile.mkstemp(prefix="nf4lora-optim-", suffix=".state", dir=self.page_dir)
        try:
            # Reserve the blocks now: a sparse file on a full disk would fail later, inside the
            # kernel, as SIGBUS. fallocate also zero-fills, which is the fresh state.
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            why = "is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"failed ({exc})"
            raise RuntimeError(f"page_dir {self.page_dir!r} {why}: cannot reserve {nbytes} bytes of "
                               "optimizer state; the parameters were left as they were") from exc
        os.close(fd)
        self._page_files.append(path)
        self._files_of.setdefault(id(owner), []).append(path)
        return torch.from_file(path, shared=True, size=numel, dtype=dtype)

    def _buffer(self, numel: int, dtype: torch.dtype, p: Tensor) -> Tensor:
        """A zero-filled state buffer for param p: paged when asked for and large enough."""
        if self.paged and numel >= MIN_PAGED_SIZE:
            if p.device.type == "cuda":
                return torch.as_tensor(_ManagedBuffer(numel, dtype), device=p.device)
            if p.device.type == "cpu":
                return self._paged_file_tensor(numel, dtype, p)
        return torch.zeros(numel, dtype=dtype, device=p.device)

    def _drop_files(self, p: Tensor) -> None:
        for path in self._files_of.pop(id(p), []):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if path in self._page_files:
                self._page_files.remove(path)

    def page_files(self) -> List[str]:
        """The files currently backing paged CPU state (empty on CUDA or when not paged)."""
        return list(self._page_files)

    # ---- state ------------------------------------------------------------------------------

    def _uses_8bit(self, p: Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _expected_shapes(self, p: Tensor) -> Dict[str, Tuple[int, torch.dtype]]:
        n = p.numel()
        blocks = (n + BLOCK - 1) // BLOCK
        shapes = {"exp_avg": (n, torch.float32), "exp_avg_sq": (n, torch.float32),
                  "state1": (n, torch.uint8), "state2": (n, torch.uint8),
                  "absmax1": (blocks, torch.float32), "absmax2": (blocks, torch.float32)}
        return {key: shapes[key] for key in self._STATE_KEYS[8 if self._uses_8bit(p) else 32]}

    def _state_keys(self, state: Dict[str, Any]) -> Tuple[str, ...]:
        """The buffers of an initialized state, in the native steps' argument order."""
        return self._STATE_KEYS[8 if "state1" in state else 32]

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
        if p.device.type == "cuda" and not _C.has_cuda():
            raise RuntimeError(f"{where}: nf4lora was built without CUDA kernels")

    # ---- step ---------------------------------------------------------------------------------

    def _check_group(self, group: Dict[str, Any]) -> None:
        _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def _hyper(self, group: Dict[str, Any], state: Dict[str, Any]) -> Tuple:
        """The kernel's hyperparameter arguments for one param of `group`."""
        beta1, beta2 = group["betas"]
        return (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                float(group["weight_decay"]), int(state["step"]))

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
            self._check_group(group)
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                self._check_param(p, f"param {pi} of group {gi}")
                work.append((group, p))
        for _, p in work:
            self._init_state(p)

        skipped = 0
        cuda_skipped: Dict[torch.device, Tensor] = {}
        for group, p in work:
            if p.numel() == 0:
                continue
            state = self.state[p]
            state["step"] += 1
            grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
            hyper = self._hyper(group, state)
            if p.device.type == "cpu":
                skipped += self._step_cpu(p, grad, state, hyper)
            else:
                counter = cuda_skipped.setdefault(
                    p.device, torch.zeros(1, dtype=torch.int32, device=p.device))
                self._step_cuda(p, grad, state, hyper, counter)
        for counter in cuda_skipped.values():
            skipped += int(counter.item())
        if skipped:
            self.skipped_blocks += skipped
            warnings.warn(f"nf4lora.optim: skipped {skipped} block(s) of {BLOCK} elements whose "
                          "gradients hold NaN or Inf (their params and state are unchanged)",
                          RuntimeWarning, stacklevel=2)
        return loss

    def _native_step(self, p: Tensor, grad: Tensor, state: Dict[str, Any], device: str, *tail: Any) -> Any:
        """_C.<_KERNEL>_<bits>bit_<device>(param, dtype, grad, *state buffers, n, *tail)."""
        kernel = getattr(_C, f"{self._KERNEL}_{8 if 'state1' in state else 32}bit_{device}")
        buffers = [state[k].data_ptr() for k in self._state_keys(state)]
        return kernel(p.data_ptr(), dtype_code(p.dtype), grad.data_ptr(), *buffers, p.numel(), *tail)

    def _step_cpu(self, p: Tensor, grad: Tensor, state: Dict[str, Any], hyper: Tuple) -> int:
        return self._native_step(p, grad, state, "cpu", *hyper, num_threads())

    def _step_cuda(self, p: Tensor, grad: Tensor, state: Dict[str, Any], hyper: Tuple,
                   counter: Tensor) -> None:
        stream = torch.cuda.current_stream(p.device).cuda_stream
        device = p.device.index or 0
        if self.paged and _C.managed_prefetch_supported(device):
            for key in self._state_keys(state):  # page the state in before the update reads it
                t = state[key]
                if t.numel() >= MIN_PAGED_SIZE:
                    _C.managed_prefetch(t.data_ptr(), t.numel() * t.element_size(), device, stream)
        self._native_step(p, grad, state, "cuda", *hyper, counter.data_ptr(), stream)

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
            self._check_group(saved)
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
        # Everything checked: allocate (paged where configured) and copy.
        new_state: Dict[Tensor, Dict[str, Any]] = {}
        for p, values in loaded.items():
            fresh: Dict[str, Any] = {"step": values["step"]}
            for key, (numel, dtype) in self._expected_shapes(p).items():
                buf = self._buffer(numel, dtype, p)
                buf.copy_(values[key].reshape(-1))
                fresh[key] = buf
            new_state[p] = fresh
        for p in list(self.state):
            if p in new_state:
                self._drop_files(p)
        self.state = defaultdict(dict, new_state)
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = value

    def state_bytes(self) -> int:
        """Bytes of optimizer state held now (all params)."""
        return sum(t.numel() * t.element_size() for s in self.state.values()
                   for t in s.values() if isinstance(t, Tensor))


class PagedAdamW(AdamW):
    """AdamW with paged state (``paged=True``); ``optim_bits=32`` or ``8``. Takes AdamW's arguments."""

    def __init__(self, params: Iterable[Any], *args: Any, paged: bool = True, **kwargs: Any):
        super().__init__(params, *args, paged=paged, **kwargs)


class AdamW8bit(AdamW):
    """AdamW with bitsandbytes-format 8-bit blockwise state (``optim_bits=8``). Takes AdamW's arguments."""

    def __init__(self, params: Iterable[Any], *args: Any, optim_bits: int = 8, **kwargs: Any):
        super().__init__(params, *args, optim_bits=optim_bits, **kwargs)


class PagedAdamW8bit(AdamW):
    """AdamW with paged 8-bit blockwise state (``optim_bits=8, paged=True``). Takes AdamW's arguments."""

    def __init__(self, params: Iterable[Any], *args: Any, optim_bits: int = 8, paged: bool = True,
                 **kwargs: Any):
        super().__init__(params, *args, optim_bits=optim_bits, paged=paged, **kwargs)


def _check_lion_hyper(lr: Any, betas: Any, weight_decay: Any) -> None:
    _check_types(betas, lr=lr, weight_decay=weight_decay)
    _C.lion_check(float(lr), float(betas[0]), float(betas[1]), float(weight_decay))


class Lion(AdamW):
    """Lion (Chen et al. 2023): ``c = beta1 m + (1 - beta1) g``, ``p <- p (1 - lr wd) - lr sign(c)``,
    ``m <- beta2 m + (1 - beta2) g``, with a fused native CPU and CUDA step, as bitsandbytes' Lion /
    Lion8bit.

    ``optim_bits=32`` keeps the momentum in fp32 (4 bytes/param, ``state["exp_avg"]``); ``8`` in
    bitsandbytes' 8-bit blockwise format with the signed dynamic map (``state1``, ``absmax1``: 1.02
    bytes/param; tensors under ``min_8bit_size`` keep fp32). ``paged=True`` pages large buffers to
    files in ``page_dir`` as AdamW does (managed memory on CUDA). Non-finite gradient blocks are
    skipped as in AdamW.
    """

    _KERNEL = "lion"
    _STATE_KEYS = {32: ("exp_avg",), 8: ("state1", "absmax1")}

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: Tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, optim_bits: int = 32, paged: bool = False,
                 page_dir: Optional[str] = None, min_8bit_size: int = MIN_8BIT_SIZE):
        _check_lion_hyper(lr, betas, weight_decay)
        defaults = dict(lr=float(lr), betas=(float(betas[0]), float(betas[1])),
                        weight_decay=float(weight_decay))
        self._setup(params, defaults, optim_bits, paged, page_dir, min_8bit_size)

    def _check_group(self, group: Dict[str, Any]) -> None:
        _check_lion_hyper(group["lr"], group["betas"], group["weight_decay"])

    def _hyper(self, group: Dict[str, Any], state: Dict[str, Any]) -> Tuple:
        beta1, beta2 = group["betas"]
        return float(group["lr"]), float(beta1), float(beta2), float(group["weight_decay"])



class PagedLion(Lion):
    """Lion with paged state (``paged=True``); ``optim_bits=32`` or ``8``. Takes Lion's arguments."""

    def __init__(self, params: Iterable[Any], *args: Any, paged: bool = True, **kwargs: Any):
        super().__init__(params, *args, paged=paged, **kwargs)


class Lion8bit(Lion):
    """Lion with bitsandbytes-format 8-bit blockwise momentum (``optim_bits=8``)."""

    def __init__(self, params: Iterable[Any], *args: Any, optim_bits: int = 8, **kwargs: Any):
        super().__init__(params, *args, optim_bits=optim_bits, **kwargs)


class PagedLion8bit(Lion):
    """Lion with paged 8-bit blockwise momentum (``optim_bits=8, paged=True``)."""

    def __init__(self, params: Iterable[Any], *args: Any, optim_bits: int = 8, paged: bool = True,
                 **kwargs: Any):
        super().__init__(params, *args, optim_bits=optim_bits, paged=paged, **kwargs)


def _parent_signature(cls: type) -> None:
    """The variants above pass *args/**kwargs on to AdamW / Lion: their __init__ gets the parent's
    real signature with the variant's own defaults (paged, optim_bits), so inspect.signature,
    help() and editors show what they take (tests/test_signatures.py)."""
    import inspect
    own = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
           if p.kind is inspect.Parameter.KEYWORD_ONLY}
    sig = inspect.signature(cls.__mro__[1].__init__)
    cls.__init__.__signature__ = sig.replace(parameters=[
        p.replace(default=own.get(p.name, p.default)) for p in sig.parameters.values()])


for _variant in (PagedAdamW, AdamW8bit, PagedAdamW8bit, PagedLion, Lion8bit, PagedLion8bit):
    _parent_signature(_variant)
del _variant


def state_bytes_per_param(n: int, optim_bits: int, moments: int = 2) -> float:
    """Bytes of optimizer state per parameter for an n-element tensor (8-bit: codes + block
    absmax); ``moments`` = 2 for AdamW, 1 for Lion."""
    if optim_bits == 8 and n >= MIN_8BIT_SIZE:
        return moments * (n + 4 * math.ceil(n / BLOCK)) / n
    return 4.0 * moments
