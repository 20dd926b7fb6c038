"""Optimizer step benchmark, one process, one run: nf4lora's fused AdamW (32-bit and 8-bit state,
plain and paged) against every torch.optim.AdamW implementation (for-loop, foreach, fused) and,
when installed, bitsandbytes' AdamW8bit, on fp32 params of 10M/50M/100M elements; plus nf4lora's
Lion / Lion8bit (and bitsandbytes' Lion8bit), whose ratio column is against the same torch fused
AdamW (torch has no fused Lion). Prints time per
step (median over interleaved rounds, so machine noise hits every variant alike), GB/s of the bytes
a step must move, the ratio to torch fused, state bytes per parameter, the bytes-moved limit
(bytes / this machine's streaming bandwidth, measured in the same process), and the median process
CPU time per step (all threads) with its ratio to torch fused: on a machine shared with other jobs
the wall time moves with their load, the CPU time much less (CPU device only).

    python bench/bench_optim.py [--sizes 10 50 100] [--rounds 5] [--device cpu|cuda] [--json F]
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
import warnings

import torch

import nf4lora
from nf4lora import optim
from nf4lora.ops.native import _C
from timing import machine_header  # bench/timing.py (this script's folder is on sys.path)

# Bytes a step moves per fp32 parameter (reads + writes of param, grad and state).
BYTES_32 = 4 + 4 + 4 + 8 + 8   # param r/w, grad r, m and v r/w = 28
BYTES_8 = 4 + 4 + 4 + 2 + 2    # param r/w, grad r, two uint8 codes r/w = 16 (+ 16 B per 256 of absmax)
BYTES_LION_32 = 4 + 4 + 4 + 8  # param r/w, grad r, m r/w = 20
BYTES_LION_8 = 4 + 4 + 4 + 2   # param r/w, grad r, one uint8 code r/w = 14


def stream_bandwidth_gbs(device: str, n: int = 1 << 26) -> float:
    """The memory roof a streaming kernel can reach here: the best GB/s (bytes read + written) of
    three multi-threaded torch kernels over 256 MiB tensors (copy, a + b, in-place scale)."""
    a, b = torch.randn(n, device=device), torch.randn(n, device=device)
    c = torch.empty_like(a)
    kernels = [(lambda: c.copy_(a), 8), (lambda: torch.add(a, b, out=c), 12), (lambda: a.mul_(0.999), 8)]
    best = 0.0
    for fn, bytes_per in kernels:
        fn()
        times = []
        for _ in range(5):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        best = max(best, bytes_per * n / statistics.median(times) / 1e9)
    return best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _NoVbmi:
    """Steps an optimizer with the AVX-512 kernels' plain codec (the one before the VBMI codec)."""

    def __init__(self, opt):
        self.opt = opt

    def step(self):
        _C.set_optim_vbmi(False)
        try:
            self.opt.step()
        finally:
            _C.set_optim_vbmi(True)


def make_optimizers(p: torch.Tensor, device: str, page_dir: str, with_bnb: bool):
    hp = dict(lr=1e-5, weight_decay=0.01)
    yield "torch AdamW (for-loop)", 8.0, BYTES_32, lambda: torch.optim.AdamW([p], foreach=False, **hp)
    yield "torch AdamW (foreach)", 8.0, BYTES_32, lambda: torch.optim.AdamW([p], foreach=True, **hp)
    yield "torch AdamW (fused)", 8.0, BYTES_32, lambda: torch.optim.AdamW([p], fused=True, **hp)
    yield "nf4lora AdamW 32-bit", 8.0, BYTES_32, lambda: optim.AdamW([p], **hp)
    yield "nf4lora PagedAdamW 32-bit", 8.0, BYTES_32, lambda: optim.PagedAdamW(
        [p], optim_bits=32, page_dir=page_dir if device == "cpu" else None, **hp)
    b8 = optim.state_bytes_per_param(p.numel(), 8)
    yield "nf4lora AdamW8bit", b8, BYTES_8, lambda: optim.AdamW8bit([p], **hp)
    if device == "cpu" and _C.optim_vbmi_supported():
        yield "nf4lora AdamW8bit no VBMI", b8, BYTES_8, lambda: _NoVbmi(optim.AdamW8bit([p], **hp))
    yield "nf4lora PagedAdamW8bit", b8, BYTES_8, lambda: optim.PagedAdamW8bit(
        [p], page_dir=page_dir if device == "cpu" else None, **hp)
    if with_bnb:
        import bitsandbytes as bnb
        yield "bitsandbytes AdamW8bit", b8, BYTES_8, lambda: bnb.optim.AdamW8bit([p], **hp)
    yield "nf4lora Lion 32-bit", 4.0, BYTES_LION_32, lambda: optim.Lion([p], **hp)
    l8 = optim.state_bytes_per_param(p.numel(), 8, moments=1)
    yield "nf4lora Lion8bit", l8, BYTES_LION_8, lambda: optim.Lion8bit([p], **hp)
    if with_bnb:
        yield "bitsandbytes Lion8bit", l8, BYTES_LION_8, lambda: bnb.optim.Lion8bit([p], **hp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[10, 50, 100], help="millions of params")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="smoke run (CI): 0.2M params (paged: above the "
                    "paging threshold), 1 round")
    args = ap.parse_args()
    print(machine_header())
    if args.quick:
        args.sizes, args.rounds = [0.2], 1
    dev = args.device
    if dev == "cuda" and not (torch.cuda.is_available() and nf4lora.has_cuda()):
        why = "--device cuda needs a CUDA GPU and nf4lora built with CUDA"
        if args.quick:
            print(f"bench_optim.py --quick: skipped: {why}")
            return
        raise SystemExit(why)
    try:
        import bitsandbytes  # noqa: F401
        with_bnb = not args.no_bnb
    except ImportError:
        with_bnb = False
    bw = stream_bandwidth_gbs(dev)
    print(f"nf4lora {nf4lora.BUILD_INFO}; CPU variant {nf4lora.active_cpu_variant()}; "
          f"threads {torch.get_num_threads()}; device {dev}; streaming bandwidth {bw:.1f} GB/s (read+write)")
    results = []
    for millions in args.sizes:
        n = int(millions * 1e6)
        p = torch.randn(n, device=dev).requires_grad_()
        p.grad = torch.randn(n, device=dev) * 1e-3
        with tempfile.TemporaryDirectory(prefix="bench-optim-") as page_dir:
            opts = []
            for name, state_bpp, bpp, make in make_optimizers(p, dev, page_dir, with_bnb and dev == "cpu"):
                o = make()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    o.step()  # creates the state (not timed)
                opts.append((name, state_bpp, bpp, o, [], []))
            for _ in range(args.rounds):  # interleaved: each round times every variant once
                for name, _, _, o, times, cpu in opts:
                    sync(dev)
                    c0, t0 = time.process_time(), time.perf_counter()
                    o.step()
                    sync(dev)
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
            base = statistics.median(next(t for nm, _, _, _, t, _ in opts if nm == "torch AdamW (fused)"))
            base_cpu = statistics.median(next(c for nm, _, _, _, _, c in opts if nm == "torch AdamW (fused)"))
            print(f"\n{millions:g}M fp32 params   (limit at {bw:.1f} GB/s: 32-bit "
                  f"{BYTES_32 * n / bw / 1e6:.1f} ms, 8-bit {BYTES_8 * n / bw / 1e6:.1f} ms)")
            print(f"  {'implementation':28s} {'ms/step':>9s} {'GB/s':>7s} {'vs fused':>9s} "
                  f"{'state B/param':>14s} {'% of limit':>10s} {'CPU ms':>8s} {'CPU vs fused':>12s}")
            for name, state_bpp, bpp, o, times, cpu in opts:
                t, c = statistics.median(times), statistics.median(cpu)
                gbs = bpp * n / t / 1e9
                print(f"  {name:28s} {t * 1e3:9.1f} {gbs:7.1f} {t / base:8.2f}x {state_bpp:14.3f} "
                      f"{100 * gbs / bw:9.0f}% {c * 1e3:8.1f} {c / base_cpu:11.2f}x")
                results.append(dict(params=n, impl=name, ms=t * 1e3, gbs=gbs, ratio_vs_fused=t / base,
                                    cpu_ms=c * 1e3, cpu_ratio_vs_fused=c / base_cpu,
                                    state_bytes_per_param=state_bpp, rounds=[x * 1e3 for x in times]))
            del opts, o
            gc.collect()
        del p
        gc.collect()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(stream_gbs=bw, device=dev, results=results), f, indent=1)


if __name__ == "__main__":
    main()
