"""Soak run: thousands of QLoRA training steps of a tiny 4-bit Llama (NF4 + double quant bases,
LoRA r=8 on every linear, the lm_head trained in full as a modules_to_save copy, PagedAdamW with
file-backed paged state) on real text (CPython's pydoc_data.topics, byte-level), sampling the
process's resident memory every 100 steps. The lm_head (vocab 1024 x 128 = 131,072 elements) is
above the optimizer's paging threshold (nf4lora.optim.MIN_PAGED_SIZE), so its AdamW state really
lives in page files: checked after the first step, and checked gone after the optimizer is freed.
Passes when RSS grows by less than 2% between the end of warm-up and the last sample, and the loss
stays finite (and goes down). Prints a table and, with --json, writes the samples.

    python bench/soak.py [--steps 2000] [--warmup 200] [--json soak.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Optional

import torch
from timing import machine_header  # bench/timing.py (this script's folder is on sys.path)


def rss_mib() -> float:
    """Current resident set size (not the peak), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def corpus_batches(seq: int, batch: int, seed: int):
    from pydoc_data.topics import topics
    data = torch.tensor(list("\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        chunk = torch.stack([data[s: s + seq + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200, help="steps before the RSS baseline is taken")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-growth", type=float, default=0.02)
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="smoke run (CI): 30 steps, warm-up 10, a sample every 5, "
                    "10%% RSS growth allowed (a short run has not settled)")
    args = ap.parse_args(argv)
    print(machine_header())
    if args.quick:
        args.steps, args.warmup, args.every, args.max_growth = 30, 10, 5, 0.10

    from transformers import LlamaConfig, LlamaForCausalLM

    import nf4lora as nl

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, max_position_embeddings=args.seq,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    cfg = nl.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["lm_head"])
    model = nl.get_lora_model(model, cfg, quantize="nf4")
    params = [p for p in model.parameters() if p.requires_grad]
    paged = [tuple(p.shape) for p in params if p.numel() >= nl.optim.MIN_PAGED_SIZE]
    if not paged:
        print(f"no trainable tensor reaches the paging threshold ({nl.optim.MIN_PAGED_SIZE} elements): "
              "the soak would page nothing")
        return 1
    page_dir = tempfile.mkdtemp(prefix="nf4lora-soak-")
    opt = nl.optim.PagedAdamW(params, lr=1e-3, paged=True, page_dir=page_dir)
    batches = corpus_batches(args.seq, args.batch, seed=0)
    samples, losses = [], []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = next(batches)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 1:
            files = os.listdir(page_dir)
            print(f"paged tensors {paged}: {len(files)} page files in {page_dir} after step 1")
            if len(files) < 2 * len(paged):  # exp_avg and exp_avg_sq of each
                print(f"expected at least {2 * len(paged)} page files, found {files}")
                return 1
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            print(f"step {step}: loss is {losses[-1]}")
            return 1
        if step % args.every == 0 or step == 1:
            samples.append({"step": step, "rss_mib": rss_mib(), "loss": sum(losses[-args.every:]) / len(losses[-args.every:]),
                            "seconds": time.perf_counter() - t0})
            s = samples[-1]
            print(f"step {s['step']:5d}  rss {s['rss_mib']:8.1f} MiB  loss {s['loss']:.4f}  {s['seconds']:6.1f} s",
                  flush=True)
    base = next(s for s in samples if s["step"] >= args.warmup)
    last = samples[-1]
    growth = (last["rss_mib"] - base["rss_mib"]) / base["rss_mib"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    first_loss, last_loss = samples[0]["loss"], last["loss"]
    ok = growth < args.max_growth and last_loss < first_loss
    print(f"RSS after warm-up (step {base['step']}): {base['rss_mib']:.1f} MiB; at step {last['step']}: "
          f"{last['rss_mib']:.1f} MiB; growth {growth:+.2%} (limit {args.max_growth:.0%}); peak {peak:.1f} MiB")
    print(f"loss {first_loss:.4f} -> {last_loss:.4f}; {args.steps} steps in {last['seconds']:.1f} s; "
          f"{'PASS' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": samples, "growth": growth, "peak_mib": peak, "pass": ok}, f, indent=1)
    del opt  # its page files go with it
    left = os.listdir(page_dir)
    shutil.rmtree(page_dir, ignore_errors=True)
    if left:
        print(f"page files left behind after the optimizer was freed: {left}")
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
