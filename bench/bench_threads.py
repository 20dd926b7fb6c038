"""Threads when our calls alternate with torch ops: nf4lora.matmul_4bit at M = 1 (bf16, NF4 + double
quant) called right after a dense torch op, on 1 and 2 threads. Each call reads another copy of
the weight, with enough copies to exceed the last-level cache, as a model's layers do. Two
interleavings: after a dense bf16 GEMV of the same shape (the baseline the 4-bit GEMV is compared
with, itself timed right after ours), and after an elementwise torch op (torch's OpenMP workers are
left spinning when our call starts). Thread counts alternate within every round; the figures are
medians over rounds of each round's median. Run it on two builds to compare them, e.g.

    PYTHONPATH=python python bench/bench_threads.py [--quick] [--rounds R] [--calls C] [--json F]
    PYTHONPATH=/path/to/other/checkout/python python bench/bench_threads.py ...

The machine may be shared: the header prints its load average; compare ratios, and repeat.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

import nf4lora
from timing import llc_bytes, lscpu, machine_header  # bench/timing.py (this script's folder is on sys.path)


def header(info: dict[str, str], args, copies: int, dense_copies: int, copy_mib: float) -> str:
    """timing.machine_header() (CPU, flags, threads, load, builds, dispatch choices) and this run's setup."""
    return "\n".join([
        machine_header(),
        f"# L3 {info.get('L3 cache', '?')}; {os.cpu_count()} logical CPUs; "
        f"torch {torch.__config__.parallel_info().splitlines()[-1].strip()}",
        f"# weight {args.n}x{args.k} bf16 -> NF4 block 64 + double quant, {copies} copies of "
        f"{copy_mib:.1f} MiB (dense: {dense_copies} copies of {args.n * args.k * 2 / 2**20:.0f} MiB), "
        f"x: 1x{args.k} bf16; {args.rounds} rounds x {args.calls} calls per thread count",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="out_features (default 4096)")
    ap.add_argument("--k", type=int, default=4096, help="in_features (default 4096)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=60, help="timed calls per thread count per round")
    ap.add_argument("--llc-mib", type=float, help="override the last-level cache size lscpu reports")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds of 12 calls")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.calls = 3, 12
    info = lscpu()
    llc = int(args.llc_mib * 2**20) if args.llc_mib else llc_bytes(info)

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(args.n, args.k, generator=g) * 0.02).to(torch.bfloat16)
    packed, state = nf4lora.quantize_4bit(w, 64, "nf4", double_quant=True)
    w_dense = nf4lora.dequantize_4bit(packed, state)
    copy_bytes = state.nbytes  # packed codes + scales: what one call reads
    # Enough copies that the rotation does not fit in the LLC (1.5x: it is not all ours to use).
    copies = max(2, math.ceil(1.5 * llc / copy_bytes))
    dense_copies = max(2, math.ceil(1.5 * llc / (w_dense.numel() * 2)))
    weights = [(packed.clone(), state) for _ in range(copies)]
    denses = [w_dense.clone() for _ in range(dense_copies)]
    x = torch.randn(1, args.k, generator=g).to(torch.bfloat16)
    act = torch.randn(64, args.k, generator=g)  # the elementwise op's operand: 1 MiB fp32
    print(header(info, args, copies, dense_copies, copy_bytes / 2**20))

    def between_linear(i):
        t0 = time.perf_counter()
        F.linear(x, denses[i % dense_copies])
        t1 = time.perf_counter()
        nf4lora.matmul_4bit(x, *weights[i % copies])
        t2 = time.perf_counter()
        return t2 - t1, t1 - t0  # ours, dense

    def between_elementwise(i):
        torch.nn.functional.silu(act, inplace=True)
        t1 = time.perf_counter()
        nf4lora.matmul_4bit(x, *weights[i % copies])
        return time.perf_counter() - t1, float("nan")

    cases = {"after dense GEMV": between_linear, "after elementwise op": between_elementwise}
    # samples[case][threads] = per-round medians (ms) of (ours, dense)
    samples = {c: {t: ([], []) for t in args.threads} for c in cases}
    old_threads = torch.get_num_threads()
    i = 0
    for r in range(args.rounds):
        order = args.threads if r % 2 == 0 else args.threads[::-1]
        for case, fn in cases.items():
            for t in order:
                torch.set_num_threads(t)
                for _ in range(3):  # untimed: the pool at this size, the caches rotated
                    fn(i)
                    i += 1
                ours, dense = [], []
                for _ in range(args.calls):
                    a, b = fn(i)
                    i += 1
                    ours.append(a * 1e3)
                    dense.append(b * 1e3)
                samples[case][t][0].append(statistics.median(ours))
                samples[case][t][1].append(statistics.median(dense))
    torch.set_num_threads(old_threads)

    t1 = args.threads[0]
    print(f"{'case':<22s} {'threads':>7s} {'nf4lora ms':>10s} {'dense ms':>9s} {'vs dense':>8s} "
          f"{'vs ' + str(t1) + ' thr':>9s} {'GB/s':>6s}  per-round nf4lora ms")
    results = []
    for case in cases:
        base = statistics.median(samples[case][t1][0])
        for t in args.threads:
            ours_ms = statistics.median(samples[case][t][0])
            dense_ms = statistics.median(samples[case][t][1])
            row = dict(case=case, threads=t, nf4lora_ms=ours_ms,
                       dense_ms=None if math.isnan(dense_ms) else dense_ms,
                       vs_dense=None if math.isnan(dense_ms) else ours_ms / dense_ms,
                       speedup_vs_first=base / ours_ms, gb_per_s=copy_bytes / ours_ms / 1e6,
                       rounds=samples[case][t][0])
            results.append(row)
            dense_s = "" if row["dense_ms"] is None else f"{dense_ms:.3f}"
            vs_s = "" if row["vs_dense"] is None else f"{row['vs_dense']:.2f}x"
            print(f"{case:<22s} {t:>7d} {ours_ms:>10.3f} {dense_s:>9s} {vs_s:>8s} "
                  f"{row['speedup_vs_first']:>8.2f}x {row['gb_per_s']:>6.1f}  "
                  + " ".join(f"{v:.3f}" for v in samples[case][t][0]))
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"'vs {t1} thr' > 1 means faster than on {t1} thread(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpu=info.get("Model name"), build=nf4lora.BUILD_INFO,
                           nf4lora_path=os.path.dirname(nf4lora.__file__), load_before_after=load,
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
