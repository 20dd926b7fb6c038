"""Large-M forward of matmul_4bit on the CPU, the two candidate designs side by side in one
process (interleaved, median of --iters, several rounds): "scratch" = dequantize all of W into a
reused buffer + one dense GEMM (what matmul_4bit does above DISPATCH.cpu_fused_max_rows), "panels" = dequantize
row panels of W (about --panel-kib each, so they stay in L2) and feed each to the dense GEMM
(oneDNN's AMX/AVX-512 micro-kernels) as it is produced, y[:, panel] = x W[panel]^T (panels are
dequantized on one thread: two std::threads per panel next to oneDNN's OpenMP team were slower). Checks
both first under the 2x error rule (error against a float64 product of the same x and dequantized W
at most twice that of dense bf16 F.linear; bf16 products may run as fp32 GEMMs, see
nf4lora.matmul, so bit equality with F.linear does not hold); prints the ratio panels/scratch.
With --crossover, instead: the fused kernels against the scratch path, forward and backward, for
small M, which is how DISPATCH.cpu_fused_max_rows and cpu_fused_t_max_rows (nf4lora/ops/dispatch.py) were chosen.

    python bench/bench_large_m.py [--m 16 64 512] [--iters 5] [--rounds 3] [--panel-kib 1024]
    python bench/bench_large_m.py --crossover [--m 1 4 8 16 32]
    python bench/bench_large_m.py --quick [--crossover]     # smoke run (CI): one small shape, 1 iteration
"""
from __future__ import annotations

import argparse
import math

import torch

import nf4lora
from nf4lora.ops.native import _C, dtype_code, quant_type_code
from timing import machine_header, median_ms  # bench/timing.py

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


_PANELS: dict = {}  # (rows, K, dtype) -> the reused panel buffer


def forward_panels(x2, packed, state, panel_bytes, threads=1):
    """y = x2 @ W^T through L2-sized row panels of W (blocksize divides K; double quant)."""
    N, K = state.shape
    M, bs, nbs = x2.shape[0], state.blocksize, state.nested_blocksize
    bpr = K // bs
    step = nbs // math.gcd(bpr, nbs)  # panel rows must start on a nested block
    P = max(step, panel_bytes // (K * x2.element_size()) // step * step)
    key = (P, K, x2.dtype)
    if key not in _PANELS:
        _PANELS[key] = torch.empty(P, K, dtype=x2.dtype)
    wp = _PANELS[key]
    y = torch.empty(M, N, dtype=x2.dtype)
    for n0 in range(0, N, P):
        rows = min(P, N - n0)
        b0 = n0 * bpr
        _C.dequantize_4bit_cpu(packed.data_ptr() + n0 * K // 2, 0, state.absmax.data_ptr() + b0,
                               state.nested_absmax.data_ptr() + 4 * (b0 // nbs),
                               state.nested_code.data_ptr(), state.offset.data_ptr(), nbs, rows * K, bs,
                               quant_type_code("nf4"), wp.data_ptr(), dtype_code(x2.dtype), threads)
        # F.linear's own layout (x row-major, W panel row-major): a torch.mm(W panel, x^T, out=y^T
        # rows) variant made oneDNN reorder x for every panel and ran 4-30x slower.
        y[:, n0:n0 + rows] = torch.nn.functional.linear(x2, wp[:rows])
    return y


def check_2x(name: str, got, x, w32) -> None:
    """The 2x error rule: |got - ref| <= 2 |F.linear in x's dtype - ref| (max over elements), ref in float64."""
    ref = x.double() @ w32.double().T
    dense = torch.nn.functional.linear(x, w32.to(x.dtype)).double()
    err, err_dense = (got.double() - ref).abs().max().item(), (dense - ref).abs().max().item()
    if not err <= 2 * err_dense + 1e-6 * ref.abs().max().item():
        raise AssertionError(f"{name}: max error {err:.3g} > 2x dense {x.dtype} F.linear's {err_dense:.3g}")


def crossover(Ms, iters, rounds) -> None:
    """Fused native kernel / scratch path time ratios (median over interleaved rounds)."""
    from nf4lora.ops import DISPATCH
    print(f"fused/scratch time ratio (< 1: fused wins), bf16, {torch.get_num_threads()} thread(s), "
          f"variant {nf4lora.active_cpu_variant()}, median of {iters}, {rounds} interleaved rounds")
    for N, K in SHAPES:
        w = torch.randn(N, K) * 0.02
        packed, state = nf4lora.quantize_4bit(w, 64, "nf4", double_quant=True)
        w32 = nf4lora.dequantize_4bit(packed, state, dtype=torch.float32)
        args = (packed.view(-1), state.absmax, 64, "nf4", [N, K], state.nested_absmax, state.nested_code,
                state.offset, state.nested_blocksize)
        for M in Ms:
            x, gy = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(M, N, dtype=torch.bfloat16)
            fwd = lambda: nf4lora.matmul_4bit(x, packed, state)
            bwd = lambda: torch.ops.nf4lora.matmul_4bit_t(gy, *args)
            for path, limit in (("fused", 1 << 30), ("scratch", 0)):
                DISPATCH.cpu_fused_max_rows = DISPATCH.cpu_fused_t_max_rows = limit
                check_2x(f"{path} forward {N}x{K} M={M}", fwd(), x, w32)
                check_2x(f"{path} backward {N}x{K} M={M}", bwd(), gy, w32.T)
            out = []
            for name, fn in (("fwd", fwd), ("bwd", bwd)):
                t = {"fused": [], "scratch": []}
                for _ in range(rounds):
                    for path, limit in (("fused", 1 << 30), ("scratch", 0)):
                        DISPATCH.cpu_fused_max_rows = DISPATCH.cpu_fused_t_max_rows = limit
                        t[path].append(median_ms(fn, iters))
                ratios = sorted(f / s for f, s in zip(t["fused"], t["scratch"]))
                out.append(f"{name} {min(t['fused']):7.2f} / {min(t['scratch']):7.2f} ms = "
                           f"{ratios[len(ratios) // 2]:5.2f}x")
            print(f"{f'{N}x{K}':>12s} M={M:<4d} " + "   ".join(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[16, 64, 512])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--panel-kib", type=int, default=1024)
    ap.add_argument("--crossover", action="store_true", help="fused kernels vs scratch path for small M")
    ap.add_argument("--quick", action="store_true", help="smoke run (CI): one 512x1024 shape, 1 iteration, 1 round")
    args = ap.parse_args()
    print(machine_header())
    if args.quick:
        SHAPES[:] = [(512, 1024)]
        args.iters, args.rounds = 1, 1
        args.m = [1, 16] if args.crossover else [16, 64]
    if args.crossover:
        crossover(args.m if args.m != [16, 64, 512] else [1, 4, 8, 16, 32], args.iters, args.rounds)
        return
    dtype = torch.bfloat16
    print(f"bf16, NF4 block 64 + double quant, {torch.get_num_threads()} thread(s), median of {args.iters}, "
          f"{args.rounds} interleaved rounds, panels of ~{args.panel_kib} KiB")
    print(f"{'N x K':>12s} {'M':>4s} {'scratch ms':>22s} {'panels ms':>22s} {'panels/scratch':>15s} {'dense ms':>9s}")
    for N, K in SHAPES:
        w = torch.randn(N, K) * 0.02
        packed, state = nf4lora.quantize_4bit(w, 64, "nf4", double_quant=True)
        w32 = nf4lora.dequantize_4bit(packed, state, dtype=torch.float32)
        w_dense = w32.to(dtype)
        for M in args.m:
            x = torch.randn(M, K, dtype=dtype)
            check_2x(f"panels {N}x{K} M={M}", forward_panels(x, packed, state, args.panel_kib << 10), x, w32)
            check_2x(f"scratch {N}x{K} M={M}", nf4lora.matmul_4bit(x, packed, state), x, w32)
            ts, tp, td = [], [], []
            for _ in range(args.rounds):
                ts.append(median_ms(lambda: nf4lora.matmul_4bit(x, packed, state), args.iters))
                tp.append(median_ms(lambda: forward_panels(x, packed, state, args.panel_kib << 10), args.iters))
                td.append(median_ms(lambda: torch.nn.functional.linear(x, w_dense), args.iters))
            ratios = sorted(p / s for p, s in zip(tp, ts))
            fmt = lambda v: "/".join(f"{t:.1f}" for t in v)
            print(f"{f'{N}x{K}':>12s} {M:>4d} {fmt(ts):>22s} {fmt(tp):>22s} "
                  f"{ratios[len(ratios) // 2]:14.2f}x {min(td):9.1f}")


if __name__ == "__main__":
    main()
