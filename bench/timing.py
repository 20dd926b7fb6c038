"""Timing, the machine header and /proc memory fields shared by the Python benchmarks."""
from __future__ import annotations

import re
import statistics
import subprocess
import time


def proc_status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM, RssAnon, ...); Linux only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def lscpu() -> dict[str, str]:
    """lscpu's fields ({} when it is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def llc_bytes(info: dict[str, str]) -> int:
    """Size of the last-level cache lscpu reports (all instances), 32 MiB when it reports none."""
    for key in ("L3 cache", "L2 cache"):
        m = re.match(r"([\d.]+)\s*([KMG])i?B?", info.get(key, ""))
        if m:
            return int(float(m.group(1)) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)])
    return 32 << 20


def median_ms(fn, iters: int, warmup: int = 2) -> float:
    """Median wall time of fn() in milliseconds over `iters` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def machine_header() -> str:
    """What every benchmark prints first: the CPU (model, the SIMD/AMX flags that change our
    choices), thread count, torch and nf4lora builds, the load average, and the CPU dispatch
    choices in force (calibrated or forced, nf4lora.ops.DISPATCH)."""
    import os
    import torch
    import nf4lora
    from nf4lora.ops import DISPATCH
    from nf4lora.ops.calibrate import cpu_model_and_flags
    model, flags = cpu_model_and_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512vbmi", "gfni", "amx_tile", "amx_bf16",
              "asimd", "sve")
    have = [f for f in wanted if f in flags.split()]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    variant, grain = DISPATCH.cpu_matmul_choices()
    choices = (f"fused rows {DISPATCH.cpu_rows()}/{DISPATCH.cpu_t_rows()}, bf16 GEMM as "
               f"{'fp32' if DISPATCH.cpu_gemm_in_fp32(torch.bfloat16) else 'bf16'}, product variant {variant}, "
               f"grain {grain} KiB ({DISPATCH.calibration.source if DISPATCH.calibration else 'forced'})")
    return (f"# CPU: {model} [{' '.join(have)}]; {torch.get_num_threads()} thread(s); load average {load:.1f}\n"
            f"# torch {torch.__version__}; nf4lora {nf4lora.__version__}: {nf4lora.BUILD_INFO}\n"
            f"# dispatch: {choices}; CPU variant {nf4lora.active_cpu_variant()}")


def gpu_available(script: str, quick: bool) -> bool:
    """True when a CUDA GPU and a CUDA build of nf4lora are there. Otherwise a --quick run (CI's
    smoke run on machines without a GPU) prints why and returns False; a full run exits with it."""
    import torch
    import nf4lora
    if torch.cuda.is_available() and nf4lora.has_cuda():
        return True
    why = (f"needs a CUDA GPU and nf4lora built with CUDA (torch.cuda.is_available()="
           f"{torch.cuda.is_available()}, nf4lora.has_cuda()={nf4lora.has_cuda()})")
    if not quick:
        raise SystemExit(why)
    print(f"{script.rsplit('/', 1)[-1]} --quick: skipped: {why}")
    return False
