"""LoRA overhead benchmark, one process: forward + backward of a LoRA layer (r=16 by default) over a
4-bit NF4 base against the bare 4-bit matmul forward + backward of the same layer (the baseline:
ratio = LoRA / bare), and beside it the unfused PEFT-style composition on our base and, when
installed, PEFT's LoRA over bitsandbytes' Linear4bit. Rounds interleave the variants so that
load from other processes hits them alike; the ratio is the median of paired (same step)
ratios, printed overall and per round. --dora adds DoRA (use_dora=True) on the same base, ours and
PEFT's over bitsandbytes, and prints DoRA's cost over plain LoRA (median of paired ratios).
--smollm2 then also times whole forward + backward steps of the shipped SmolLM2-135M (4-bit NF4
base, r=16 on every linear, bf16 autocast) with LoRA and with DoRA, interleaved, in process CPU time.

    python bench/bench_lora.py [--n 4096] [--k 4096] [--m 512] [--r 16] [--iters 5] [--rounds 3]
                               [--threads T] [--device cpu|cuda] [--no-peft] [--dora] [--smollm2] [--json F]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

import nf4lora as nl


def fwd_bwd(fn, x, gy):
    def step():
        x.grad = None
        fn(x).backward(gy)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (on a loaded machine every extra "
                    "parallel region waits for a descheduled thread; 1 thread measures the work itself)")
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT over bitsandbytes")
    ap.add_argument("--dora", action="store_true", help="also DoRA (use_dora=True), ours and PEFT's")
    ap.add_argument("--smollm2", action="store_true", help="also whole SmolLM2-135M steps, LoRA vs DoRA "
                    "(--batch x --seq tokens, --steps interleaved pairs)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="smoke run (CI): 256x512 layer, M 16, 1 iteration, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.n, args.k, args.m, args.iters, args.rounds = 256, 512, 16, 1, 1
        args.batch, args.seq, args.steps = 1, 16, 1
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = nn.Linear(args.k, args.n, bias=False, device=dev)
    base = nl.Linear4bit.from_linear(dense, compute_dtype=torch.bfloat16)
    lora = nl.LoraLinear(copy.deepcopy(base), r=args.r, lora_alpha=2 * args.r)
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(std=0.01)
    A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    dora = nl.LoraLinear(copy.deepcopy(base), r=args.r, lora_alpha=2 * args.r, use_dora=True)
    with torch.no_grad():
        dora.lora_B["default"].weight.copy_(B)
    s = lora.scaling["default"]

    def unfused(x):  # what PEFT does over a 4-bit base: the base, then separate small GEMMs in fp32
        y = base(x)
        return y + (((x.float() @ A.T) @ B.T) * s).to(y.dtype)

    x = torch.randn(args.m, args.k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(args.m, args.n, device=dev, dtype=torch.bfloat16)
    variants = {"bare 4-bit matmul": fwd_bwd(base, x, gy), "nf4lora LoraLinear (fused)": fwd_bwd(lora, x, gy),
                "unfused on our base": fwd_bwd(unfused, x, gy)}
    if args.dora:
        variants["nf4lora DoRA"] = fwd_bwd(dora, x, gy)
    if not args.no_peft:
        try:
            import bitsandbytes as bnb
            import peft

            def bnb_base():
                seq = nn.Sequential(bnb.nn.Linear4bit(args.k, args.n, bias=False, compute_dtype=torch.bfloat16,
                                                      quant_type="nf4", compress_statistics=True))
                seq[0].load_state_dict({"weight": dense.weight.detach().to(torch.bfloat16)})
                return seq.to(dev)  # quantizes

            pm = peft.get_peft_model(bnb_base(), peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["0"]))
            pm.train()  # bitsandbytes' CPU path drops input grads after eval mode
            variants["PEFT over bitsandbytes Linear4bit"] = fwd_bwd(pm, x, gy)
            if args.dora:
                pd = peft.get_peft_model(bnb_base(), peft.LoraConfig(
                    r=args.r, lora_alpha=2 * args.r, target_modules=["0"], use_dora=True))
                pd.train()
                variants["PEFT DoRA over bitsandbytes"] = fwd_bwd(pd, x, gy)
        except ImportError as exc:
            print(f"(PEFT/bitsandbytes not installed: {exc})")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def once(step) -> float:
        t0 = time.perf_counter()
        step()
        sync()
        return (time.perf_counter() - t0) * 1e3

    print(f"nf4lora {nl.__version__}; {dev}; CPU variant {nl.active_cpu_variant()}; {torch.get_num_threads()} "
          f"thread(s); W {args.n}x{args.k} NF4 block 64 + double quant, bf16 compute; x [{args.m}, {args.k}] "
          f"bf16 requires grad; LoRA r={args.r}; forward+backward; {args.rounds} rounds x {args.iters} "
          "interleaved steps (each step runs every variant once, back to back)")
    for step in variants.values():
        step()
        step()
    times = {name: [] for name in variants}
    for rnd in range(args.rounds):
        for _ in range(args.iters):
            for name, step in variants.items():
                times[name].append(once(step))
        got = {name: statistics.median(t[-args.iters:]) for name, t in times.items()}
        print(f"round {rnd + 1}: " + "; ".join(f"{name} {got[name]:.1f} ms" for name in variants))
    bare = times["bare 4-bit matmul"]
    print(f"{'variant':36s} {'median ms':>10s} {'median of paired ratios':>24s} {'per-round':>22s}")
    summary = {}
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, bare)]
        per_round = [statistics.median(ratios[i * args.iters:(i + 1) * args.iters]) for i in range(args.rounds)]
        summary[name] = {"ms": statistics.median(t), "ratio": statistics.median(ratios), "per_round": per_round}
        print(f"{name:36s} {statistics.median(t):10.2f} {statistics.median(ratios):23.3f}x "
              f"{' '.join(f'{r:.3f}' for r in per_round):>22s}")
    pairs = [("nf4lora DoRA", "nf4lora LoraLinear (fused)"), ("PEFT DoRA over bitsandbytes", "PEFT over bitsandbytes Linear4bit")]
    for dora_name, lora_name in pairs:
        if dora_name in times:
            ratio = statistics.median(a / b for a, b in zip(times[dora_name], times[lora_name]))
            summary[f"{dora_name} / {lora_name}"] = {"ratio": ratio}
            print(f"{dora_name} / {lora_name}: {ratio:.3f}x (median of paired ratios)")
    if args.smollm2:
        summary["smollm2"] = whole_model(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": summary}, f, indent=2)


def whole_model(args) -> dict:
    """Forward + backward steps of SmolLM2-135M (4-bit base) with LoRA and with DoRA, interleaved
    pairs, each step's process CPU time (other processes' load does not count); the first pair warms up."""
    model, _ = nl.load_model(None)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    models = {name: nl.get_lora_model(copy.deepcopy(model), nl.LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                                           use_dora=dora))
              for name, dora in (("LoRA", False), ("DoRA", True))}
    del model
    times = {name: [] for name in models}
    for _ in range(args.steps + 1):
        for name, m in models.items():
            t0 = time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            times[name].append(time.process_time() - t0)
    t = {name: v[1:] if len(v) > 1 else v for name, v in times.items()}
    ratio = statistics.median(b / a for a, b in zip(t["LoRA"], t["DoRA"]))
    print(f"SmolLM2-135M NF4, r={args.r} all linears, x [{args.batch}, {args.seq}], bf16 autocast, forward + "
          f"backward, process CPU s per step: LoRA {statistics.median(t['LoRA']):.2f}, DoRA "
          f"{statistics.median(t['DoRA']):.2f}; DoRA / LoRA {ratio:.3f}x (median of {len(t['LoRA'])} paired steps)")
    return {"lora_s": statistics.median(t["LoRA"]), "dora_s": statistics.median(t["DoRA"]), "ratio": ratio}


if __name__ == "__main__":
    main()
