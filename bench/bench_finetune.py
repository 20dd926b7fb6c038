"""Fine-tuning SmolLM2-135M on the pydoc set, three ways with the same data, batches, steps and
hyperparameters, each in its own process (so peak RSS is its own): nf4lora QLoRA (NF4 base +
nf4lora LoRA + paged AdamW), PEFT LoRA on the bf16 model (torch AdamW), and PEFT LoRA on a
bitsandbytes 4-bit model. Prints training tokens/s, held-out loss before/after and peak RSS, and
the ratios the finetune issue asks for (improvement vs bf16 LoRA, tokens/s vs PEFT + bitsandbytes,
peak RSS). Timings on a shared machine are noisy: repeat, and read the ratios, not the absolutes.

    python bench/bench_finetune.py --steps 20        # all three
    python bench/bench_finetune.py --only nf4lora    # one
    python bench/bench_finetune.py --steps 3 --no-eval   # tokens/s and peak RSS only
    python bench/bench_finetune.py --steps 8 --no-eval --rounds 3 --only nf4lora,peft_bnb4   # medians

All ways share one loss module (nf4lora.train.CausalLMLoss: logits only where a label is). The
PEFT ways use its plain head + F.cross_entropy and transformers' sdpa attention, as they did
before nf4lora's fused head (nf4lora.train.head_loss) and fp32-on-CPU attention (nf4lora.train.cpu_attention)
existed; the nf4lora way uses both, and keeps freed memory for reuse (nf4lora.train.cpu_memory), as
`nf4lora finetune` does. --baseline-fused-head gives the PEFT ways all three too (what is then left
is the 4-bit + LoRA layers and the optimizer). Besides wall-clock tokens/s each way reports its process CPU seconds per
step: on a VM shared with other jobs the wall clock swings by 2-5x, CPU time much less."""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

WAYS = ("nf4lora", "peft_bf16", "peft_bnb4")


def run_one(way: str, steps: int, batch: int, seq_len: int, lr: float, r: int, do_eval: bool = True,
            baseline_fused_head: bool = False) -> dict:
    import torch
    import nf4lora as nl
    from nf4lora.train import data as D
    from nf4lora.loading import load_model
    from nf4lora.train import CausalLMLoss, evaluate

    torch.manual_seed(0)
    model, tok = load_model(None, quantize="nf4" if way == "nf4lora" else None)
    if way == "nf4lora" or baseline_fused_head:  # freed memory kept for reuse, as `nf4lora finetune` does
        from nf4lora.train.cpu_memory import retain_freed_memory
        retain_freed_memory()
    if way == "nf4lora":  # as `nf4lora finetune` does: calibrated attention route, fused RMSNorm and head
        from nf4lora.train.cpu_attention import use_fp32_cpu_attention
        from nf4lora.train.fused_norm import use_fused_rmsnorm
        use_fp32_cpu_attention(model)
        use_fused_rmsnorm(model)
        model = nl.get_lora_model(model, nl.LoraConfig(r=r, lora_alpha=2 * r))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = nl.optim.PagedAdamW(params, lr=lr, weight_decay=0.0)
    else:
        import peft
        if way == "peft_bnb4":
            import bitsandbytes as bnb
            for name, m in list(model.named_modules()):
                for child_name, child in list(m.named_children()):
                    if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=torch.bfloat16, quant_type="nf4")
                        q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                                     quant_type="nf4").to("cpu")
                        setattr(m, child_name, q)
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
        model = peft.get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if way != "nf4lora" and baseline_fused_head:
        from nf4lora.train.cpu_attention import use_fp32_cpu_attention
        use_fp32_cpu_attention(base)
    loss_mod = CausalLMLoss(base, fused_head=way == "nf4lora" or baseline_fused_head)
    train, held = D.split_examples(D.load_examples(None), 0.1)
    items, held_items = D.tokenize(train, tok, seq_len), D.tokenize(held, tok, seq_len)
    pad = tok.pad_token_id or 0
    nan = float("nan")
    before = evaluate(loss_mod, held_items, pad, batch, True)["loss"] if do_eval else nan
    order = D.BatchOrder(len(items), batch, seed=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
    step_rates = []
    for _ in range(steps):
        ts = time.perf_counter()
        batch_items = [items[j] for j in order.next()]
        b = D.collate(batch_items, pad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, n = loss_mod(**b)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
        step_rates.append(int(b["attention_mask"].sum()) / (time.perf_counter() - ts))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    after = evaluate(loss_mod, held_items, pad, batch, True)["loss"] if do_eval else nan
    # steady state: the median step after the first (one-time allocations, library start-up)
    steady = statistics.median(step_rates[1:]) if steps > 1 else step_rates[0]
    return {"way": way, "tokens_per_s": tokens / dt, "steady_tokens_per_s": steady, "cpu_s_per_step": cpu / steps,
            "loss_before": before, "loss_after": after,
            "improvement": before - after, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=192)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(WAYS))
    ap.add_argument("--rounds", type=int, default=1, help="run the ways this many times, alternating; medians")
    ap.add_argument("--baseline-fused-head", action="store_true",
                    help="the PEFT ways use nf4lora's fused head, fp32-on-CPU attention and kept freed memory too")
    ap.add_argument("--no-eval", dest="eval", action="store_false", help="tokens/s and RSS only")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the GPU benchmark on Llama-shaped models, bench/bench_finetune_cuda.py "
                    "(the arguments after --device cuda go to it)")
    ap.add_argument("--quick", action="store_true", help="smoke run (CI): each way 1 step of 1 example of "
                    "up to 64 tokens, r 4, no evaluation")
    argv = sys.argv[1:]
    if "--device" in argv and argv[argv.index("--device") + 1:argv.index("--device") + 2] == ["cuda"]:
        import bench_finetune_cuda  # bench/ (this script's folder is on sys.path)
        i = argv.index("--device")
        return bench_finetune_cuda.main(argv[:i] + argv[i + 2:])
    a = ap.parse_args()
    if not a.child:
        from timing import machine_header  # bench/timing.py
        print(machine_header())
    if a.quick:
        a.steps, a.batch, a.seq_len, a.r, a.eval = 1, 1, 64, 4, False
    if a.child:
        print(json.dumps(run_one(a.only, a.steps, a.batch, a.seq_len, a.lr, a.r, a.eval, a.baseline_fused_head)))
        return
    ways = a.only.split(",") if a.only else list(WAYS)
    for way in ways:
        if way not in WAYS:
            ap.error(f"--only: unknown way {way!r}; ways: {', '.join(WAYS)}")
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    failed = []
    for k in range(a.rounds):
        for way in (ways if k % 2 == 0 else ways[::-1]):
            cmd = [sys.executable, __file__, "--child", "--only", way, "--steps", str(a.steps), "--batch", str(a.batch),
                   "--seq-len", str(a.seq_len), "--lr", str(a.lr), "--r", str(a.r)]
            cmd += ([] if a.eval else ["--no-eval"]) + (["--baseline-fused-head"] if a.baseline_fused_head else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{way}: failed\n{out.stderr[-2000:]}")
                failed.append(way)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[way].append(r)
            print(f"{way:10} {r['tokens_per_s']:8.1f} tok/s ({r['steady_tokens_per_s']:.1f} median step after the first)  "
                  f"{r['cpu_s_per_step']:6.2f} CPU s/step  held-out loss "
                  f"{r['loss_before']:.4f} -> {r['loss_after']:.4f} (-{r['improvement']:.4f})  "
                  f"peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
    med = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "way"} for w, rs in runs.items() if rs}
    if a.rounds > 1:
        for w, m in med.items():
            print(f"median {w:10} {m['tokens_per_s']:8.1f} tok/s ({m['steady_tokens_per_s']:.1f} steady)  "
                  f"{m['cpu_s_per_step']:6.2f} CPU s/step  "
                  f"peak RSS {m['peak_rss_gib']:.2f} GiB  ({len(runs[w])} runs)")
    if "nf4lora" in med and "peft_bf16" in med and a.eval:
        print(f"improvement vs bf16 LoRA (PEFT): {med['nf4lora']['improvement'] / med['peft_bf16']['improvement']:.1%}")
    if "nf4lora" in med and "peft_bnb4" in med:
        n, b = med["nf4lora"], med["peft_bnb4"]
        print(f"tokens/s vs PEFT + bitsandbytes 4-bit: {n['tokens_per_s'] / b['tokens_per_s']:.2f}x wall clock "
              f"({n['steady_tokens_per_s'] / b['steady_tokens_per_s']:.2f}x steady), "
              f"{b['cpu_s_per_step'] / n['cpu_s_per_step']:.2f}x by CPU time; peak RSS ratio "
              f"{n['peak_rss_gib'] / b['peak_rss_gib']:.2f}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
