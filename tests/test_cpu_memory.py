"""nf4lora.train.cpu_memory: with freed memory kept (glibc's mmap and trim thresholds raised), a
buffer freed and allocated again every step is reused instead of faulting in fresh pages; the
opt-out leaves malloc alone. Each case runs in a child process (the setting is process-wide)."""
import os
import subprocess
import sys

import pytest

CHILD = r"""
import resource, sys, torch
from nf4lora.train.cpu_memory import retain_freed_memory
on = retain_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # warm up (the first allocations fault in any case)
    torch.ones(12 << 20).sum()
before = faults()
for _ in range(20):  # what a training step does: tens of MB allocated, written, freed
    torch.ones(12 << 20).sum()
print(int(on), faults() - before)
"""


def _run(env_extra: dict) -> tuple[int, int]:
    import nf4lora
    env = dict(os.environ, **env_extra)
    here = os.path.dirname(os.path.dirname(os.path.abspath(nf4lora.__file__)))  # the nf4lora these tests import
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    on, faults = out.stdout.split()
    return int(on), int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.path.exists("/etc/alpine-release"),
                    reason="mallopt's thresholds are glibc's (Linux); elsewhere the function does nothing")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    on, kept = _run({"NF4LORA_MALLOC": "1"})
    off, default = _run({"NF4LORA_MALLOC": "0"})
    assert on == 1 and off == 0
    # 20 x 48 MiB: past the 32 MiB that glibc's dynamic mmap threshold can reach, each block is a
    # fresh mmap by default (~12,000 faults a block); kept, the same heap memory is reused
    assert default > 20 * 1000, default
    assert kept < default // 20, (kept, default)
