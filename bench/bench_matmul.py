"""4-bit matmul benchmark on LLaMA-7B layer shapes, one process, one run: nf4lora.matmul_4bit
forward and backward (grad_x = grad_y @ W, the op autograd calls) against dense
torch.nn.functional.linear / grad_y @ W in the same dtype on the same shape and, when installed,
bitsandbytes (matmul_4bit forward; its backward's grad_y @ dequantize_4bit(W)); time, TFLOP/s,
GB/s of 4-bit weight bytes, ratios. The machine is shared: compare ratios, and repeat.

    python bench/bench_matmul.py [--m 1 8 64 512] [--dtype bf16] [--iters 10] [--forward-only]
                                 [--quick] [--json F]
    python bench/bench_matmul.py --overhead   # fixed cost per call on a 64x64 weight, M = 1
    python bench/bench_matmul.py --m 512 --rotate  # weights beyond the last-level cache

--rotate runs the calls in the conditions of a model: each call reads another copy of the weight
(ours and bitsandbytes: copies of the packed codes; dense: copies of W), with enough copies to
exceed 1.5x the last-level cache lscpu reports (--llc-mib overrides it), and our call and the
dense one alternate call by call; bitsandbytes is timed after them, each of its copies called once
first (its first call on a tensor costs up to 60 ms at M = 1, and between ours those calls slowed
our M = 1 calls by a third). Without --rotate every call reuses one weight, which stays in cache
between calls: that favours dense W (4x the bytes) most.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time

import torch

import nf4lora
from timing import llc_bytes, lscpu, machine_header, median_ms  # bench/timing.py (this script's folder is on sys.path)

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N = out_features, K = in_features)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8, 64, 512])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--forward-only", action="store_true", help="skip grad_x = grad_y @ W")
    ap.add_argument("--backward", action="store_true", help=argparse.SUPPRESS)  # the default now
    ap.add_argument("--quick", action="store_true", help="smoke run: 4096x4096, M 1 and 64, 3 iterations")
    ap.add_argument("--shapes", type=int, nargs="+", help="N K pairs (default: LLaMA-7B)")
    ap.add_argument("--json")
    ap.add_argument("--overhead", action="store_true",
                    help="only the fixed cost per call: a 64x64 weight at M = 1, microseconds")
    ap.add_argument("--rotate", action="store_true",
                    help="each call reads another copy of the weight, beyond the last-level cache; ours and dense alternate")
    ap.add_argument("--llc-mib", type=float, help="with --rotate: the last-level cache size (default: lscpu's)")
    args = ap.parse_args()
    print(machine_header())
    if args.overhead:
        overhead()
        return
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    shapes = list(zip(args.shapes[::2], args.shapes[1::2])) if args.shapes else SHAPES
    if args.quick:
        shapes, args.m, args.iters = shapes[:1], [1, 64], 3
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError:
        bnb = None
    llc = int(args.llc_mib * 2**20) if args.llc_mib else llc_bytes(lscpu())
    print(f"nf4lora {nf4lora.__version__}; CPU variant {nf4lora.active_cpu_variant()}; "
          f"{torch.get_num_threads()} thread(s); {args.dtype}; NF4 block 64 + double quant; median of {args.iters}"
          + (f"; weights rotated beyond 1.5 x {llc / 2**20:.0f} MiB, ours and dense alternating" if args.rotate else ""))
    print(f"{'N x K':>12s} {'M':>4s} {'pass':>4s} {'nf4lora ms':>10s} {'TFLOP/s':>8s} {'W GB/s':>7s} "
          f"{'dense ms':>9s} {'vs dense':>8s} {'bnb ms':>8s} {'vs bnb':>7s}")
    rows = []
    for N, K in shapes:
        w = torch.randn(N, K, dtype=dtype) * 0.02
        packed, state = nf4lora.quantize_4bit(w, 64, "nf4", double_quant=True)
        w_dense = nf4lora.dequantize_4bit(packed, state, dtype=dtype)
        if bnb is not None:
            pb, sb = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        wbytes = state.nbytes
        # One weight, or (--rotate) a ring of copies that the calls walk through.
        n_ours = max(2, math.ceil(1.5 * llc / wbytes)) if args.rotate else 1
        n_dense = max(2, math.ceil(1.5 * llc / w_dense.nbytes)) if args.rotate else 1
        packs = [packed] + [packed.clone() for _ in range(n_ours - 1)]
        denses = [w_dense] + [w_dense.clone() for _ in range(n_dense - 1)]
        pbs = ([pb] + [pb.clone() for _ in range(n_ours - 1)]) if bnb is not None else []
        ring = itertools.count()
        if args.rotate:
            print(f"{N}x{K}: {n_ours} copies of the 4-bit weight ({wbytes / 2**20:.1f} MiB each), "
                  f"{n_dense} of the dense one ({w_dense.nbytes / 2**20:.0f} MiB each)")

        def mine(): return packs[next(ring) % n_ours]
        def dense_w(): return denses[next(ring) % n_dense]
        def bnb_w(): return pbs[next(ring) % n_ours]
        for M in args.m:
            x = torch.randn(M, K, dtype=dtype)
            passes = [("fwd", lambda: nf4lora.matmul_4bit(x, mine(), state),
                       lambda: torch.nn.functional.linear(x, dense_w()),
                       (lambda: bnb.matmul_4bit(x, bnb_w().t(), quant_state=sb)) if bnb is not None else None)]
            if not args.forward_only:
                gy = torch.randn(M, N, dtype=dtype)
                passes.append(("bwd", lambda: torch.ops.nf4lora.matmul_4bit_t(
                    gy, mine().view(-1), state.absmax, 64, "nf4", [N, K], state.nested_absmax,
                    state.nested_code, state.offset, 256),
                    lambda: gy @ dense_w(),
                    (lambda: gy @ F.dequantize_4bit(bnb_w(), sb).to(dtype)) if bnb is not None else None))
            for name, ours, dense, theirs in passes:
                if args.rotate:  # bitsandbytes apart: its slow CPU calls would sit between ours
                    t, td = alternating_medians_ms([ours, dense], args.iters)
                    if theirs is not None:
                        for _ in range(n_ours):  # its first call on a tensor prepares it: once per copy
                            theirs()
                    tb = median_ms(theirs, args.iters) if theirs is not None else float("nan")
                else:
                    t = median_ms(ours, args.iters)
                    td = median_ms(dense, args.iters)
                    tb = median_ms(theirs, args.iters) if theirs is not None else float("nan")
                flops = 2 * M * N * K
                row = dict(N=N, K=K, M=M, pass_=name, ms=t, dense_ms=td, bnb_ms=tb,
                           tflops=flops / t / 1e9, weight_gbs=wbytes / t / 1e6)
                rows.append(row)
                print(f"{f'{N}x{K}':>12s} {M:>4d} {name:>4s} {t:10.3f} {row['tflops']:8.3f} {row['weight_gbs']:7.1f} "
                      f"{td:9.3f} {t / td:7.2f}x {tb:8.3f} {t / tb:6.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def alternating_medians_ms(fns, iters: int, warmup: int = 2) -> list[float]:
    """Median wall time in ms of each of fns, called in turn `iters` times after `warmup` untimed
    turns, so that all of them run in the same conditions."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + iters):
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[j].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def overhead(n: int = 64, calls: int = 2000, rounds: int = 5) -> None:
    """Microseconds per call where the kernel is nothing: matmul_4bit (eager CPU path), the
    registered op it bypasses, the same with x requiring grad (forward only), a LoraLinear over
    the same weight (r 8, no grad), dense F.linear."""
    import time
    w = torch.randn(n, n) * 0.02
    packed, state = nf4lora.quantize_4bit(w.bfloat16(), 64, "nf4", double_quant=True)
    w_dense = w.bfloat16()
    x = torch.randn(1, n, dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()
    nested = (state.nested_absmax, state.nested_code, state.offset)
    lora = nf4lora.get_lora_model(torch.nn.Sequential(torch.nn.Linear(n, n, bias=False)),
                                  nf4lora.LoraConfig(r=8, target_modules=["0"]), quantize="nf4")[0]

    def lora_call():
        with torch.no_grad():
            return lora(x)

    layer = nf4lora.Linear4bit.from_linear(torch.nn.Linear(n, n, bias=False))

    def layer_call():
        with torch.no_grad():
            return layer(x)

    def layer_fwd_bwd():
        layer(xg).sum().backward()

    calls_ = {
        "matmul_4bit": lambda: nf4lora.matmul_4bit(x, packed, state),
        "matmul_4bit, x.requires_grad": lambda: nf4lora.matmul_4bit(xg, packed, state),
        "torch.ops.nf4lora.matmul_4bit": lambda: torch.ops.nf4lora.matmul_4bit(
            x, packed.view(-1), state.absmax, 64, "nf4", [n, n], *nested, state.nested_blocksize, None),
        "Linear4bit": layer_call,
        "Linear4bit forward + backward": layer_fwd_bwd,
        "LoraLinear(Linear4bit), r 8": lora_call,
        "dense F.linear": lambda: torch.nn.functional.linear(x, w_dense),
    }
    best = {name: float("inf") for name in calls_}
    best_cpu = dict(best)
    for _ in range(rounds):  # interleaved rounds, best of each
        for name, fn in calls_.items():
            for _ in range(50):
                fn()
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls * 1e6)
            best_cpu[name] = min(best_cpu[name], (time.thread_time() - c0) / calls * 1e6)
    print(f"fixed cost per call, {n}x{n} bf16 weight, M = 1, best of {rounds} rounds of {calls} calls "
          "(wall time; this thread's CPU time, steadier on a shared machine)")
    for name, us in best.items():
        print(f"  {name:32s} {us:7.1f} us  {best_cpu[name]:7.1f} us CPU")


if __name__ == "__main__":
    main()
