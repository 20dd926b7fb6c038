"""Side-by-side CPU benchmark of 4-bit quantize/dequantize, one process, one run:
nf4lora against the memory-copy limit (the same output bytes copied between two
preallocated tensors with torch's copy_, same threads) and against bitsandbytes' CPU path
when it is installed. Default: a 4096x4096 bf16 weight, NF4, block 64, double quantization.

    python bench/bench_quantize.py [--shape 4096 4096] [--iters 20] [--json out.json] [--quick]
"""
from __future__ import annotations

import argparse
import json

import torch

import nf4lora
from timing import machine_header, median_ms  # bench/timing.py (this script's folder is on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=2, default=[4096, 4096])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="smoke run (CI): 512x512, 3 iterations")
    args = ap.parse_args()
    print(machine_header())
    if args.quick:
        args.shape, args.iters = [512, 512], 3

    torch.manual_seed(0)
    w = torch.randn(*args.shape, dtype=torch.bfloat16) * 0.02
    out_bytes = w.numel() * w.element_size()
    results: dict[str, float] = {}

    src, dst = torch.empty_like(w).fill_(1.0), torch.empty_like(w)
    copy_ms = median_ms(lambda: dst.copy_(src), args.iters)
    results["copy_ms"] = copy_ms

    q = lambda: nf4lora.quantize_4bit(w, 64, args.quant_type, double_quant=True)  # noqa: E731
    packed, state = q()
    results["quantize_ms"] = median_ms(q, max(3, args.iters // 4))
    out = torch.empty_like(w)
    results["dequantize_out_ms"] = median_ms(lambda: nf4lora.dequantize_4bit(packed, state, out=out), args.iters)
    results["dequantize_fresh_ms"] = median_ms(lambda: nf4lora.dequantize_4bit(packed, state), args.iters)

    try:
        import bitsandbytes.functional as F
    except ImportError:
        F = None
    if F is not None:
        bq = lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=args.quant_type)  # noqa: E731
        pb, sb = bq()
        results["bnb_quantize_ms"] = median_ms(bq, max(3, args.iters // 4))
        results["bnb_dequantize_fresh_ms"] = median_ms(lambda: F.dequantize_4bit(pb, sb), args.iters)
        # (bitsandbytes 0.50 registers no CPU kernel for dequantize_4bit.out: fresh output only)

    gbs = lambda ms, nbytes: f"{nbytes / ms / 1e6:8.1f}"  # noqa: E731
    io = out_bytes + state.packed_nbytes  # bytes a dequantize moves (written + packed read)
    print(f"nf4lora {nf4lora.__version__} ({nf4lora.BUILD_INFO}; active CPU variant "
          f"{nf4lora.active_cpu_variant()}; {torch.get_num_threads()} thread(s))")
    print(f"{args.shape[0]}x{args.shape[1]} bf16 -> {args.quant_type} block 64 + double quant -> bf16; "
          f"median of {args.iters}")
    print(f"{'what':44s} {'ms':>9s} {'GB/s':>8s}  ratio")
    print(f"{'copy_ limit (bf16 output, preallocated)':44s} {copy_ms:9.3f} {gbs(copy_ms, 2 * out_bytes)}  1.00x")
    print(f"{'nf4lora dequantize, out= preallocated':44s} {results['dequantize_out_ms']:9.3f} "
          f"{gbs(results['dequantize_out_ms'], io)}  {results['dequantize_out_ms'] / copy_ms:.2f}x copy")
    line = f"{'nf4lora dequantize, fresh output':44s} {results['dequantize_fresh_ms']:9.3f} {gbs(results['dequantize_fresh_ms'], io)}"
    if F is not None:
        line += f"  {results['dequantize_fresh_ms'] / results['bnb_dequantize_fresh_ms']:.2f}x bitsandbytes"
    print(line)
    if F is not None:
        print(f"{'bitsandbytes dequantize, fresh output':44s} {results['bnb_dequantize_fresh_ms']:9.3f} "
              f"{gbs(results['bnb_dequantize_fresh_ms'], io)}")
    line = f"{'nf4lora quantize (+ double quant)':44s} {results['quantize_ms']:9.3f} {gbs(results['quantize_ms'], io)}"
    if F is not None:
        speedup = results["bnb_quantize_ms"] / results["quantize_ms"]
        results["quantize_speedup_vs_bnb"] = speedup
        line += f"  {speedup:.1f}x faster than bitsandbytes"
    print(line)
    if F is not None:
        print(f"{'bitsandbytes quantize (+ double quant)':44s} {results['bnb_quantize_ms']:9.3f} "
              f"{gbs(results['bnb_quantize_ms'], io)}")
    if F is None:
        print("(bitsandbytes not installed: pip install bitsandbytes for the side-by-side rows)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "threads": torch.get_num_threads(),
                       "variant": nf4lora.active_cpu_variant(), **results}, f, indent=2)


if __name__ == "__main__":
    main()
