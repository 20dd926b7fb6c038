"""GPU benchmark of matmul_4bit on LLaMA-7B layer shapes, forward (x W^T) and backward (g W), for
each CUDA path — the fused GEMV (M <= 8), dequantize + cuBLAS — next to dense bf16
torch.nn.functional.linear on the dequantized weight, all in one process: GPU time from CUDA
events (graph replays of back-to-back calls over rotating weights larger than L2), TFLOP/s,
weight GB/s, and the ratio to dense. The fastest path per row tells nf4lora.ops.DISPATCH's
cuda_gemv_max_rows and cuda_gemv_t_max_rows.

    python bench/bench_cuda_matmul.py [--shapes 4096x4096 ...] [--ms 1 8 64 512] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

import nf4lora
from timing import gpu_available, machine_header  # bench/timing.py (this script's folder is on sys.path)
from nf4lora.ops import DISPATCH

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cuda import ROTATE, gpu_ms  # noqa: E402  (same timing method as the dequant benchmark)

PATHS = {"gemv": (8, 8), "dequant+cuBLAS": (0, 0)}
KNOBS = ("cuda_gemv_max_rows", "cuda_gemv_t_max_rows")


def bench(N: int, K: int, M: int, iters: int, warmup: int) -> dict:
    torch.manual_seed(0)
    ws = [torch.randn(N, K, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(ROTATE)]
    qs = [nf4lora.quantize_4bit(w, 64, "nf4", double_quant=True) for w in ws]
    dense = [nf4lora.dequantize_4bit(p, s) for p, s in qs]
    del ws
    xs = [torch.randn(M, K, dtype=torch.bfloat16, device="cuda") for _ in range(ROTATE)]
    gs = [torch.randn(M, N, dtype=torch.bfloat16, device="cuda") for _ in range(ROTATE)]
    r: dict[str, object] = {"N": N, "K": K, "M": M, "flop": 2 * M * N * K,
                            "weight_bytes": qs[0][1].nbytes}
    r["dense_fwd_ms"] = gpu_ms(lambda i: torch.nn.functional.linear(xs[i], dense[i]), iters, warmup, True)[0]
    r["dense_bwd_ms"] = gpu_ms(lambda i: gs[i] @ dense[i], iters, warmup, True)[0]
    saved = [getattr(DISPATCH, k) for k in KNOBS]
    try:
        for name, knobs in PATHS.items():
            if name == "gemv" and M > 8:
                continue
            for k, v in zip(KNOBS, knobs):
                setattr(DISPATCH, k, v)
            op = torch.ops.nf4lora.matmul_4bit_t

            def fwd(i):
                return nf4lora.matmul_4bit(xs[i], qs[i][0], qs[i][1])

            def bwd(i):
                p, s = qs[i]
                return op(gs[i], *s.weight(p).op_args())
            r[name + "_fwd_ms"] = gpu_ms(fwd, iters, warmup, True)[0]
            r[name + "_bwd_ms"] = gpu_ms(bwd, iters, warmup, True)[0]
    finally:
        for k, v in zip(KNOBS, saved):
            setattr(DISPATCH, k, v)
    return r


def lines(r: dict) -> list[str]:
    out = []
    for d in ("fwd", "bwd"):
        base = r[f"dense_{d}_ms"]
        row = [f"{r['N']}x{r['K']} M={r['M']:<5d} {d}  dense bf16 {base * 1e3:8.1f} us "
               f"({r['flop'] / base / 1e9:6.1f} TFLOP/s)"]
        for name in PATHS:
            ms = r.get(f"{name}_{d}_ms")
            if ms is not None:
                row.append(f"{name} {ms * 1e3:8.1f} us ({base / ms:4.2f}x dense, "
                           f"{r['weight_bytes'] / ms / 1e6:5.0f} GB/s of weight)")
        out.append(" | ".join(row))
    return out


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"],
                    help="weight shapes NxK = OUTxIN (default: LLaMA-7B attention, MLP up, MLP down)")
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 2, 4, 8, 64, 512, 2048])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="smoke run (CI): one 1024x1024 shape, M 1 and 64, "
                    "3 iterations; without a GPU it prints why and exits 0")
    args = ap.parse_args(argv)
    print(machine_header())
    if args.quick:
        args.shapes, args.ms, args.iters, args.warmup = ["1024x1024"], [1, 64], 3, 1
    if not gpu_available(__file__, args.quick):
        return
    props = torch.cuda.get_device_properties(0)
    print(f"nf4lora {nf4lora.__version__}; torch {torch.__version__}; {props.name}; NF4 block 64 + "
          "double quant, bf16 activations; 'x dense' = dense time / path time (>1: faster than dense)")
    results = []
    for spec in args.shapes:
        N, K = (int(v) for v in spec.lower().split("x"))
        for M in args.ms:
            r = bench(N, K, M, args.iters, args.warmup)
            results.append(r)
            for line in lines(r):
                print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
