"""GPU benchmark of 4-bit quantize/dequantize on real LLaMA weight shapes (bf16, NF4, block 64,
double quantization): GPU time from CUDA events, median of N, against the limit (a
device-to-device copy of the same output bytes) and bitsandbytes' CUDA kernels when installed.
Kernel rows replay CUDA graphs of back-to-back calls over rotating buffers larger than L2, so
they measure HBM traffic, not Python dispatch or cache hits; API rows time plain calls.

    python bench/bench_cuda.py [--shapes 4096x4096 11008x4096] [--iters 30] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable, Optional

import torch

import nf4lora
from timing import gpu_available, machine_header  # bench/timing.py (this script's folder is on sys.path)

ROTATE = 4       # buffer sets cycled through, so that a working set never stays in L2
PER_GRAPH = 20   # calls captured per CUDA graph


def gpu_ms(fn: Callable[[int], object], iters: int, warmup: int, graph: bool) -> tuple[float, str]:
    """Median GPU milliseconds per call of fn(i) (i selects the rotating buffer set)."""
    for i in range(warmup):
        fn(i % ROTATE)
    torch.cuda.synchronize()
    run, per, how = None, 1, "events"
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on the capture stream, as torch advises
                fn(0)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(PER_GRAPH):
                    fn(i % ROTATE)
            run, per, how = g.replay, PER_GRAPH, f"graph x{PER_GRAPH}"
        except Exception as exc:  # not capturable (a host sync inside): time plain calls
            torch.cuda.synchronize()
            print(f"  (CUDA graph capture failed, timing plain calls: {type(exc).__name__}: {exc})")
    if run is None:
        state = {"i": 0}

        def run() -> None:
            fn(state["i"] % ROTATE)
            state["i"] += 1
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per)
    return statistics.median(times), how


def bnb_functional():
    try:
        import bitsandbytes.functional as F
        F.quantize_4bit(torch.ones(64, device="cuda"), blocksize=64, quant_type="nf4")
        return F
    except Exception:
        return None


def bench_shape(rows_out: int, cols: int, qt: str, bs: int, iters: int, warmup: int, F) -> dict:
    torch.manual_seed(0)
    ws = [torch.randn(rows_out, cols, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(ROTATE)]
    n = ws[0].numel()
    quantized = [nf4lora.quantize_4bit(w, bs, qt, double_quant=True) for w in ws]
    outs = [torch.empty_like(w) for w in ws]
    srcs = [torch.ones_like(w) for w in ws]
    state = quantized[0][1]
    out_bytes = n * 2
    state_bytes = state.nbytes - state.packed_nbytes
    dequant_io = out_bytes + state.packed_nbytes + state_bytes  # bytes read + written
    quant_io = out_bytes + state.packed_nbytes + state.absmax.numel() * 4  # bf16 in, codes + fp32 absmax out
    r: dict[str, object] = {"shape": [rows_out, cols], "n": n, "quant_type": qt, "blocksize": bs,
                            "dequant_bytes": dequant_io, "quant_bytes": quant_io, "copy_bytes": 2 * out_bytes}

    def timed(name: str, fn, graph: bool) -> None:
        ms, how = gpu_ms(fn, iters, warmup, graph)
        r[name + "_ms"] = ms
        r[name + "_method"] = how

    timed("copy", lambda i: outs[i].copy_(srcs[i]), graph=True)
    timed("dequant", lambda i: nf4lora.dequantize_4bit(quantized[i][0], quantized[i][1], out=outs[i]), graph=True)
    timed("dequant_api", lambda i: nf4lora.dequantize_4bit(quantized[i][0], quantized[i][1], out=outs[i]),
          graph=False)
    timed("quant_kernel", lambda i: torch.ops.nf4lora.quantize_4bit(ws[i], bs, qt), graph=True)
    timed("quant_api", lambda i: nf4lora.quantize_4bit(ws[i], bs, qt, double_quant=True), graph=False)
    if F is not None:
        bnb = [F.quantize_4bit(w, blocksize=bs, compress_statistics=True, quant_type=qt) for w in ws]
        timed("bnb_dequant", lambda i: F.dequantize_4bit(bnb[i][0], bnb[i][1], out=outs[i]), graph=True)
        timed("bnb_quant", lambda i: F.quantize_4bit(ws[i], blocksize=bs, compress_statistics=True, quant_type=qt),
              graph=False)
    return r


def table(r: dict, iters: int) -> str:
    gbs = lambda nbytes, ms: nbytes / ms / 1e6  # noqa: E731
    copy_gbs = gbs(r["copy_bytes"], r["copy_ms"])
    rows_out, cols = r["shape"]
    lines = [f"{rows_out}x{cols} bf16 -> {r['quant_type']} block {r['blocksize']} + double quant; "
             f"median of {iters}",
             f"  {'what':50s} {'ms':>9s} {'GB/s':>8s} {'of copy':>8s}  {'timing':s}"]

    def row(label: str, key: str, nbytes: int, extra: str = "") -> None:
        if key + "_ms" not in r:
            return
        ms = r[key + "_ms"]
        g = gbs(nbytes, ms)
        lines.append(f"  {label:50s} {ms:9.4f} {g:8.0f} {g / copy_gbs:7.0%}  {r[key + '_method']}{extra}")

    row("limit: device-to-device copy of the bf16 output", "copy", r["copy_bytes"])
    vs = ""
    if "bnb_dequant_ms" in r:
        vs = f", {r['bnb_dequant_ms'] / r['dequant_ms']:.2f}x bitsandbytes' speed"
    row("nf4lora dequantize -> bf16, out= (kernel)", "dequant", r["dequant_bytes"], vs)
    row("nf4lora dequantize -> bf16, out= (API call)", "dequant_api", r["dequant_bytes"])
    row("bitsandbytes dequantize_4bit -> bf16, out=", "bnb_dequant", r["dequant_bytes"])
    row("nf4lora quantize (kernel, no double quant)", "quant_kernel", r["quant_bytes"])
    vs = ""
    if "bnb_quant_ms" in r:
        vs = f", {r['bnb_quant_ms'] / r['quant_api_ms']:.2f}x bitsandbytes' speed"
    row("nf4lora quantize_4bit + double quant (API call)", "quant_api", r["quant_bytes"], vs)
    row("bitsandbytes quantize_4bit + double quant", "bnb_quant", r["quant_bytes"])
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096"],
                    help="weight shapes OUTxIN (default: LLaMA-7B attention and MLP)")
    ap.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="smoke run (CI): one 1024x1024 shape, 3 iterations; "
                    "without a GPU it prints why and exits 0")
    args = ap.parse_args(argv)
    print(machine_header())
    if args.quick:
        args.shapes, args.iters, args.warmup = ["1024x1024"], 3, 1
    if not gpu_available(__file__, args.quick):
        return

    props = torch.cuda.get_device_properties(0)
    F = bnb_functional()
    header = (f"nf4lora {nf4lora.__version__} ({nf4lora.BUILD_INFO}); torch {torch.__version__}; "
              f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
              f"{props.total_memory / 2**30:.0f} GiB)")
    print(header)
    print("GB/s = bytes read + written per call; 'of copy' = that rate over the copy's rate"
          + ("" if F is not None else "; bitsandbytes (CUDA) not installed: no side-by-side rows"))
    results = []
    for spec in args.shapes:
        rows_out, cols = (int(v) for v in spec.lower().split("x"))
        r = bench_shape(rows_out, cols, args.quant_type, args.blocksize, args.iters, args.warmup, F)
        results.append(r)
        print(table(r, args.iters))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "device": props.name, "iters": args.iters,
                       "bitsandbytes": F is not None, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
