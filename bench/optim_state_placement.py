"""Does where AdamW's fp32 state lives change the 32-bit step's time? One process, interleaved
rounds, medians: nf4lora.optim.AdamW with its state as torch allocates it (offset 0x40 into a
page here), PagedAdamW (file-backed shared mappings, page-aligned), and AdamW with the state
copied into page-aligned and 1 KiB-offset buffers. Written to check the 37.5 vs 31.2 ms gap
between unpaged and paged once seen in bench_optim.py (it did not reproduce).

    python bench/optim_state_placement.py [--millions 50] [--rounds 7]
"""
import argparse
import statistics
import tempfile
import time

import torch

from nf4lora import optim
from timing import machine_header  # bench/timing.py (this script's folder is on sys.path)


def placed_zeros(numel: int, offset_bytes: int) -> torch.Tensor:
    buf = torch.zeros(numel + 2048, dtype=torch.float32)
    k = ((-buf.data_ptr()) % 4096) // 4 + offset_bytes // 4
    return buf[k:k + numel]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--millions", type=float, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="smoke run (CI): 0.2M params, 1 round")
    args = ap.parse_args()
    print(machine_header())
    if args.quick:
        args.millions, args.rounds = 0.2, 1
    n = int(args.millions * 1e6)
    p = torch.randn(n).requires_grad_()
    p.grad = torch.randn(n) * 1e-3
    with tempfile.TemporaryDirectory() as d:
        opts = {"unpaged (torch allocation)": optim.AdamW([p], lr=1e-5),
                "paged (file mapping)": optim.PagedAdamW([p], lr=1e-5, page_dir=d)}
        for name, off in (("unpaged, page-aligned", 0), ("unpaged, 1 KiB offset", 1024)):
            o = optim.AdamW([p], lr=1e-5)
            o.step()
            for key in ("exp_avg", "exp_avg_sq"):
                t = placed_zeros(n, off)
                t.copy_(o.state[p][key])
                o.state[p][key] = t
            opts[name] = o
        for o in opts.values():
            o.step()
        times = {k: [] for k in opts}
        for _ in range(args.rounds):
            for k, o in opts.items():
                t0 = time.perf_counter()
                o.step()
                times[k].append(time.perf_counter() - t0)
        for k, o in opts.items():
            s = o.state[p]
            print(f"{k:28s} {statistics.median(times[k]) * 1e3:7.1f} ms   state at page offset "
                  f"{s['exp_avg'].data_ptr() % 4096:#x} / {s['exp_avg_sq'].data_ptr() % 4096:#x}")


if __name__ == "__main__":
    main()
