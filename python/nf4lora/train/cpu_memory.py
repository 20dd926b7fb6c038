"""Freed CPU memory kept in the process for the training loop to reuse.

A training step on the CPU allocates and frees the same activation, gradient and logit buffers
(MBs each) every step. glibc's malloc serves blocks above its mmap threshold (128 KiB, raised
dynamically up to 32 MiB) with fresh mmaps and returns a freed heap top to the kernel past its trim
threshold, so every step touches tens of thousands of fresh 4 KiB pages, each a page fault that
zeroes it: ~20,000-30,000 per SmolLM2-135M step of 768 tokens on the 2-vCPU VM here, ~12% of the
step's CPU time. retain_freed_memory() raises both thresholds with mallopt (mmap 256 MiB, trim
1 GiB), so the step's buffers are reused from the heap instead. Measured there (`python
bench/bench_step.py --configs fp32+norm:fp32:1` against the same with NF4LORA_MALLOC=0): step CPU
time 2.24 against 2.55 s (-12%). The cost: the process keeps up to 1 GiB of freed memory instead
of returning it while it runs, and its peak RSS grows a little (1.70-1.72 against 1.61-1.62 GiB in
`python bench/bench_finetune.py --steps 8 --no-eval --only nf4lora`, heap fragmentation).

Process-wide and one-way (glibc cannot report the previous values), so the trainer (`nf4lora
finetune`, nf4lora.train.finetune) calls it only for CPU training; NF4LORA_MALLOC=0 turns it off.
Elsewhere than glibc (musl, macOS, Windows) it does nothing. Tested by tests/test_cpu_memory.py
(in a child process: fewer page faults for a repeated large allocation, and the opt-out)."""
from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers

_applied = False


def retain_freed_memory() -> bool:
    """Raises glibc's mmap and trim thresholds once per process (see the module docstring);
    True when they are set (now or before), False where it does nothing."""
    global _applied
    if _applied:
        return True
    if os.environ.get("NF4LORA_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mmap first: setting the trim threshold alone turns off glibc's dynamic mmap threshold, which
    # would leave it at 128 KiB (every block mmapped: 30x the faults, measured)
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
