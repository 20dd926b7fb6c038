"""The paged optimizer doing its job on a GPU: with torch's CUDA allocator capped
(torch.cuda.set_per_process_memory_fraction) to what the parameters and gradients need plus a margin,
AdamW with unpaged state runs out of memory on its first step (the state is 8 bytes per parameter
more), while PagedAdamW, whose state lives in CUDA managed memory (cudaMallocManaged, outside the
capped allocator, paged by the driver), completes. Then the price: the step time of paged against
unpaged state without the cap (both fit), 32- and 8-bit, CUDA events, median of --iters.

What the cap shows and what it does not: the fraction limits torch's caching allocator only, as a
model whose weights and activations fill the GPU leaves no room for optimizer state there; the
managed state then has to live somewhere, and with less physical GPU memory than all of it the
driver pages it to host memory and back (on every step; the slowdown measured here is for state
that still fits in GPU memory, the best case).

    python bench/bench_paged_oom.py [--params 250e6] [--iters 10] [--json out.json]
    python bench/bench_paged_oom.py --quick      # 20M params, 3 iterations; skips without a GPU
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics

import torch

import nf4lora
from timing import gpu_available, machine_header  # bench/timing.py (this script's folder is on sys.path)



def margin(n: int) -> int:
    """Bytes of the cap above what params + grads hold (the allocator's segments): half a byte per
    param, at least 16 MiB: room for the small unpaged buffers, well below the 8-bit state (2 bytes
    per param) and the 32-bit state (8)."""
    return max(16 << 20, n // 2)


def make_params(n: int, tensors: int = 8) -> list:
    """`tensors` fp32 params of n elements in all, each with a gradient of ones."""
    sizes = [n // tensors] * tensors
    sizes[-1] += n - sum(sizes)
    params = []
    for s in sizes:
        p = torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02)
        p.grad = torch.full_like(p, 1e-3)
        params.append(p)
    return params


def free() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def capped_run(n: int, paged: bool, bits: int) -> dict:
    """One optimizer step with the allocator capped to what params + grads reserve + margin(n)."""
    params = make_params(n)
    total = torch.cuda.get_device_properties(0).total_memory
    need = torch.cuda.memory_reserved() + margin(n)
    torch.cuda.set_per_process_memory_fraction(min(1.0, need / total))
    out = {"paged": paged, "bits": bits, "cap_bytes": need}
    opt = None
    try:
        opt = nf4lora.optim.AdamW(params, lr=1e-4, optim_bits=bits, paged=paged)
        for _ in range(2):
            opt.step()
        torch.cuda.synchronize()
        out.update(result="completed", allocator_peak=torch.cuda.max_memory_allocated(),
                   state_bytes=opt.state_bytes())
    except torch.OutOfMemoryError as exc:
        out.update(result="out of memory", error=str(exc).splitlines()[0][:160])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        del opt
        params.clear()
        free()
    return out


def step_ms(n: int, paged: bool, bits: int, iters: int) -> float:
    params = make_params(n)
    opt = nf4lora.optim.AdamW(params, lr=1e-4, optim_bits=bits, paged=paged)
    for _ in range(2):
        opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        opt.step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del opt
    params.clear()
    free()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=250e6, help="parameters in all (fp32)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="20M params, 3 iterations (CI; skips without a GPU)")
    args = ap.parse_args()
    print(machine_header())
    if not gpu_available(__file__, args.quick):
        return
    n, iters = (int(20e6), 3) if args.quick else (int(args.params), args.iters)
    print(f"# GPU: {torch.cuda.get_device_name(0)}; {n / 1e6:.0f}M fp32 params in 8 tensors; "
          f"the cap: what params + grads reserve + {margin(n) >> 20} MiB")
    torch.cuda.reset_peak_memory_stats()
    results = {"gpu": torch.cuda.get_device_name(0), "params": n, "capped": [], "step_ms": {}}
    print(f"{'state':<16} {'under the cap':<16} {'allocator peak':>15} {'state':>10}")
    for bits in (32, 8):
        for paged in (False, True):
            torch.cuda.reset_peak_memory_stats()
            r = capped_run(n, paged, bits)
            results["capped"].append(r)
            name = f"{bits}-bit {'paged' if paged else 'unpaged'}"
            peak = f"{r['allocator_peak'] / 2**20:.0f} MiB" if "allocator_peak" in r else "-"
            state = f"{r['state_bytes'] / 2**20:.0f} MiB" if "state_bytes" in r else "-"
            print(f"{name:<16} {r['result']:<16} {peak:>15} {state:>10}")
    print(f"\n{'state':<16} {'step ms (no cap)':>17} {'paged / unpaged':>16}")
    for bits in (32, 8):
        plain = step_ms(n, False, bits, iters)
        paged = step_ms(n, True, bits, iters)
        results["step_ms"][f"{bits}bit"] = {"unpaged": plain, "paged": paged}
        print(f"{bits}-bit unpaged   {plain:>17.3f}")
        print(f"{bits}-bit paged     {paged:>17.3f} {paged / plain:>15.2f}x")
    ok = all(r["result"] == ("completed" if r["paged"] else "out of memory") for r in results["capped"])
    print(f"\nunpaged OOMs and paged completes under the cap: {'yes' if ok else 'NO'}")
    results["claim_shown"] = ok
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not ok:
        raise SystemExit("the paged optimizer did not show its claim (see the table above)")


if __name__ == "__main__":
    main()
