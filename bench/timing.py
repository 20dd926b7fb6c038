"""Wall-clock timing shared by the CPU benchmarks (bench_quantize.py, bench_matmul.py)."""
from __future__ import annotations

import statistics
import time


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
