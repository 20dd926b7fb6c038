"""bf16 against fp32 on this CPU, the measurement behind nf4lora's fp32 routes for bf16 products
(nf4lora.ops.DISPATCH.cpu_gemm_in_fp32, nf4lora.train.cpu_attention): a dense GEMM (default 768x576 @ 576x1536,
SmolLM2's MLP at 4 x 192 tokens) as torch.mm in bf16 and in fp32, and attention forward +
backward (default [4, 9, 192, 64] queries, 3 kv heads: one SmolLM2 layer) as sdpa on bf16 and on
fp32 q, k, v. One process, interleaved rounds, median; thread CPU time beside wall time.
Prints whether torch reports AMX (where bf16 GEMMs are fast and the fp32 routes are off).

    python bench/bench_cpu_bf16.py [--threads 1] [--iters 20] [--rounds 5] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from timing import machine_header  # bench/timing.py (this script's folder is on sys.path)


def timed(fn, iters: int) -> tuple[float, float]:
    """(median wall ms, median thread CPU ms) over iters calls."""
    wall, cpu = [], []
    fn()
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gemm", type=int, nargs=3, default=[768, 576, 1536], metavar=("M", "K", "N"))
    ap.add_argument("--attention", type=int, nargs=5, default=[4, 9, 3, 192, 64],
                    metavar=("BATCH", "HEADS", "KV_HEADS", "TOKENS", "HEAD_DIM"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke run (CI): small shapes, 2 iterations, 1 round")
    args = ap.parse_args()
    print(machine_header())
    if args.quick:
        args.gemm, args.attention, args.iters, args.rounds = [64, 64, 128], [1, 2, 1, 16, 16], 2, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import nf4lora
    print(f"torch {torch.__version__}; {args.threads} thread(s); CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; nf4lora runs bf16 products in fp32 here: "
          f"{nf4lora.ops.DISPATCH.cpu_gemm_in_fp32(torch.bfloat16)}")

    M, K, N = args.gemm
    a32, b32 = torch.randn(M, K), torch.randn(K, N)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    B, H, KV, L, D = args.attention
    q32 = torch.randn(B, H, L, D, requires_grad=True)
    k32, v32 = (torch.randn(B, KV, L, D, requires_grad=True) for _ in range(2))
    q16, k16, v16 = (t.detach().bfloat16().requires_grad_() for t in (q32, k32, v32))

    def attention(q, k, v):
        def step():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            y.backward(torch.ones_like(y))
        return step

    cases = {"GEMM bf16": lambda: torch.mm(a16, b16), "GEMM fp32": lambda: torch.mm(a32, b32),
             "attention fwd+bwd bf16": attention(q16, k16, v16), "attention fwd+bwd fp32": attention(q32, k32, v32)}
    results = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            results[name].append(timed(fn, args.iters))
    print(f"GEMM {M}x{K} @ {K}x{N}; attention [{B}, {H}, {L}, {D}] queries, {KV} kv heads, causal; "
          f"median of {args.iters}, {args.rounds} interleaved rounds (min over rounds shown)")
    for name, r in results.items():
        print(f"{name:26s} {min(w for w, _ in r):9.3f} ms wall {min(c for _, c in r):9.3f} ms thread CPU")
    for what in ("GEMM", "attention fwd+bwd"):
        ratio = min(w for w, _ in results[f"{what} bf16"]) / min(w for w, _ in results[f"{what} fp32"])
        print(f"{what}: bf16 / fp32 time = {ratio:.2f}")


if __name__ == "__main__":
    main()
