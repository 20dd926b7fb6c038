"""The nf4lora training step (bench_finetune's nf4lora way: SmolLM2-135M in NF4, LoRA r 16, paged
AdamW, fused head, bf16 autocast) under several attention routes and RMSNorm choices, in one
process on one model: the configurations alternate step by step over the same batches (lr 0, so
every configuration sees the same weights and its losses can be compared), and each reports its
process CPU seconds and wall seconds per step (median, min). On a shared machine this is much
steadier than comparing separate processes.

    PYTHONPATH=python python bench/bench_step.py [--threads 1] [--rounds 3] [--batches 2]
        [--configs "base:sdpa:0,gqa+norm:gqa:1,fp32+norm:fp32:1"]   # name:attention route:RMSNorm[:fused head]
        # RMSNorm 0: transformers'; 1: fused (its native bf16 kernels on the CPU); 2: fused, torch ops
    PYTHONPATH=python python bench/bench_step.py --configs "ops-norm:fp32:2,native-norm:fp32:1"
    PYTHONPATH=python python bench/bench_step.py --configs "plain-head:fp32:1:0,fused-head:fp32:1:1"
        # the chunked loss head (train/head_loss.py, the default) against the dense head + F.cross_entropy
    NF4LORA_MALLOC=0 PYTHONPATH=python bench/bench_step.py --configs fp32+norm:fp32:1   # freed memory returned
        # to the kernel every step (glibc's default) against the same without NF4LORA_MALLOC=0
    python bench/bench_step.py --quick      # CI smoke: 1 round, 1 batch of 1 example of 64 tokens
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from timing import machine_header  # bench/timing.py (this script's folder is on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=192)
    ap.add_argument("--configs", default="base:sdpa:0,gqa+norm:gqa:1,fp32+norm:fp32:1")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.batches, a.batch, a.seq_len = 1, 1, 1, 64
    import nf4lora as nl
    from nf4lora.loading import load_model
    from nf4lora.ops import DISPATCH
    from nf4lora.ops.attention import ROUTES
    from nf4lora.train import CausalLMLoss
    from nf4lora.train import data as D
    from nf4lora.train.cpu_attention import use_fp32_cpu_attention
    from nf4lora.train import fused_norm
    from nf4lora.train.fused_norm import restore_rmsnorm, use_fused_rmsnorm

    configs = {}
    for spec in a.configs.split(","):
        parts = spec.split(":") + (["1"] if spec.count(":") == 2 else [])  # the fused head by default
        if len(parts) != 4 or parts[1] not in ROUTES or parts[2] not in ("0", "1", "2") or parts[3] not in ("0", "1"):
            ap.error(f"--configs: {spec!r} is not name:{'|'.join(ROUTES)}:0|1|2[:0|1]")
        name, route, norm, head = parts
        configs[name] = (route, norm, head == "1")
    from nf4lora.train.cpu_memory import retain_freed_memory
    torch.set_num_threads(a.threads)
    print(machine_header())
    print(f"freed memory kept for reuse (nf4lora.train.cpu_memory; NF4LORA_MALLOC=0 turns it off): "
          f"{retain_freed_memory()}")
    torch.manual_seed(0)
    model, tok = load_model(None, quantize="nf4")
    use_fp32_cpu_attention(model)
    model = nl.get_lora_model(model, nl.LoraConfig(r=16, lora_alpha=32))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = nl.optim.PagedAdamW(params, lr=0.0, weight_decay=0.0)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    loss_mods = {True: CausalLMLoss(base, fused_head=True), False: CausalLMLoss(base, fused_head=False)}
    items = D.tokenize(D.split_examples(D.load_examples(None), 0.1)[0], tok, a.seq_len)
    order = D.BatchOrder(len(items), a.batch, seed=0)
    batches = [D.collate([items[j] for j in order.next()], tok.pad_token_id or 0) for _ in range(a.batches)]
    model.train()

    def step(b, fused_head: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, n = loss_mods[fused_head](**b)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item() / float(n)

    import resource
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu = {k: [] for k in configs}
    wall = {k: [] for k in configs}
    losses = {k: [] for k in configs}
    for r in range(a.rounds + 1):  # round 0 warms every configuration up
        for name, (route, norm, head) in (list(configs.items()) if r % 2 == 0 else list(configs.items())[::-1]):
            norms = use_fused_rmsnorm(model) if norm != "0" else []
            fused_norm.NATIVE = norm == "1"
            with DISPATCH.override(cpu_attention=route):
                for b in batches:
                    c0, t0 = time.process_time(), time.perf_counter()
                    loss = step(b, head)
                    if r:
                        cpu[name].append(time.process_time() - c0)
                        wall[name].append(time.perf_counter() - t0)
                        losses[name].append(loss)
            restore_rmsnorm(norms)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    for name in configs:
        w = statistics.median(wall[name])
        print(f"{name:12} CPU s/step {statistics.median(cpu[name]):.3f} (min {min(cpu[name]):.3f})  wall s/step "
              f"{w:.3f} (min {min(wall[name]):.3f}, {tokens / w:.1f} tok/s)  losses "
              f"{[round(x, 4) for x in losses[name][:len(batches)]]}")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    steps = (a.rounds + 1) * len(configs) * len(batches)
    print(f"page faults per step (minor, whole run incl. warm-up round): {faults // steps}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
