"""Fine-tuning throughput and memory on a CUDA GPU, on random-init Llama-shaped models (TinyLlama-1.1B
and Llama-2-7B shapes; no weights are downloaded): tokens/s and peak GPU memory of one training step
(seq 2048, LoRA r 16 / alpha 32 on all linear layers, bf16 autocast, gradient checkpointing, the
same random batches) for

    nf4lora    NF4 + double-quant base (nf4lora.quantize_model), nf4lora LoRA, PagedAdamW,
               the trainer's loss module (nf4lora.train.CausalLMLoss: fused head on CUDA)
    peft_bf16  PEFT LoRA on the bf16 model, torch.optim.AdamW(fused=True), the plain head
    peft_bnb4  PEFT LoRA on bitsandbytes' Linear4bit (NF4, compress_statistics), when bitsandbytes'
               CUDA build is installed (skipped with the reason otherwise)

each in its own process (its own peak memory). Peak memory is torch's allocator peak during the
timed steps (weights included; the bf16 weights a 4-bit model is quantized from are gone by then),
plus the managed (paged) optimizer state, which that allocator does not see. Published anchors:
PEFT + bitsandbytes QLoRA of Mistral-7B on an A100-80GB ran at 2,749 tokens/s (batch 4, 22.8 GB)
against 3,598 tokens/s (26.1 GB) for bf16 LoRA (fms-acceleration's A100 reference table).
Targets (issue 16): QLoRA tokens/s >= 1.0x bf16 LoRA, peak memory <= 0.45x bf16 LoRA's (7B shapes).

    python bench/bench_finetune_cuda.py [--shapes llama2-7b,tinyllama] [--ways nf4lora,peft_bf16,peft_bnb4]
                                        [--batch 0 (per shape)] [--steps 6] [--json out.json]
    python bench/bench_finetune_cuda.py --quick   # a 2-layer model, seq 256; skips without a GPU

Without a CUDA GPU it exits saying it needs one (--quick: prints that and exits 0). The CPU
benchmark is bench/bench_finetune.py."""
from __future__ import annotations

import argparse
from typing import Optional
import json
import os
import statistics
import subprocess
import sys
import time

WAYS = ("nf4lora", "peft_bf16", "peft_bnb4")
# Llama shapes: TinyLlama-1.1B (GQA 32/4) and Llama-2-7B; vocabulary 32000, random init.
SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, batch=8),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, batch=4),
    "quick": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, batch=2),
}


def bnb_cuda_reason() -> str:
    """'' when bitsandbytes can quantize on this GPU, else why not."""
    try:
        import bitsandbytes as bnb
        import torch
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
        layer(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16))
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable CUDA build
        return f"bitsandbytes has no usable CUDA build here ({type(exc).__name__}: {str(exc)[:160]})"


def build(way: str, shape: dict, r: int, device: str = "cuda"):
    """(model, its loss module, trainable params, optimizer) on `device` (the GPU; the CPU only for
    the --child dry run that checks this script without one)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    import nf4lora as nl
    from nf4lora.train import CausalLMLoss
    cfg = LlamaConfig(**{k: v for k, v in shape.items() if k != "batch"}, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if way == "nf4lora":
        nl.quantize_model(model)  # one layer at a time: peak = the 4-bit model + one dense layer
        model = nl.get_lora_model(model, nl.LoraConfig(r=r, lora_alpha=2 * r))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = nl.optim.PagedAdamW(params, lr=1e-4, weight_decay=0.0)
        base = model
    else:
        import peft
        if way == "peft_bnb4":
            import bitsandbytes as bnb
            for _, m in list(model.named_modules()):
                for child_name, child in list(m.named_children()):
                    if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=torch.bfloat16, quant_type="nf4",
                                              compress_statistics=True, device="meta")
                        q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True).to(device)
                        setattr(m, child_name, q)
                        del child
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                           lora_dropout=0.0))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.startswith("cuda"))
        base = model.get_base_model()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    return model, CausalLMLoss(base, fused_head=way == "nf4lora"), params, opt


def run_one(way: str, shape_name: str, batch: int, seq: int, steps: int, r: int, device: str = "cuda") -> dict:
    import torch
    shape = SHAPES[shape_name]
    batch = batch or shape["batch"]
    model, loss_mod, params, opt = build(way, shape, r, device)
    model.train()
    gpu = device.startswith("cuda")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (steps + 2, batch, seq), device=device, generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() if gpu else 0
    times, losses = [], []
    for i in range(steps + 2):  # two untimed warm-up steps (allocator, cuBLAS / kernel set-up)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss, n = loss_mod(input_ids=ids[i], attention_mask=mask, labels=ids[i])
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()) / float(n))
    managed = 0  # paged state buffers (CUDA managed memory; the allocator's peak does not see them)
    if getattr(opt, "paged", False):
        from nf4lora.optim.base import MIN_PAGED_SIZE
        managed = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                      if torch.is_tensor(t) and t.numel() >= MIN_PAGED_SIZE)
    step_s = statistics.median(times)
    return {"way": way, "shape": shape_name, "batch": batch, "seq": seq, "steps": steps,
            "tokens_per_s": batch * seq / step_s, "step_s": step_s,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan"),
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if gpu else float("nan"),
            "weights_gib": weights / 2**30, "managed_state_gib": managed / 2**30,
            "trainable": sum(p.numel() for p in params), "loss_first": losses[0], "loss_last": losses[-1],
            "gpu": torch.cuda.get_device_name(0) if gpu else "none (dry run)"}


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (the only device this benchmark runs on)")
    ap.add_argument("--shapes", default="llama2-7b,tinyllama", help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--batch", type=int, default=0, help="0: the shape's default (8 TinyLlama, 4 7B)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per way and shape")
    ap.add_argument("--quick", action="store_true", help="the 2-layer 'quick' shape, seq 256, 2 steps (CI)")
    # --child --device cpu: one way on the CPU, to check this script's code paths without a GPU
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(run_one(a.ways, a.shapes, a.batch, a.seq_len, a.steps, a.r, a.device)))
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from timing import gpu_available, machine_header
    print(machine_header())
    if not a.device.startswith("cuda"):
        ap.error(f"--device {a.device}: this benchmark needs a CUDA GPU; the CPU one is bench/bench_finetune.py")
    if not gpu_available(__file__, a.quick):
        return
    if a.quick:
        a.shapes, a.seq_len, a.steps = "quick", 256, 2
    shapes, ways = a.shapes.split(","), a.ways.split(",")
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r}; shapes: {', '.join(SHAPES)}")
    for w in ways:
        if w not in WAYS:
            ap.error(f"--ways: unknown way {w!r}; ways: {', '.join(WAYS)}")
    import torch
    print(f"# GPU: {torch.cuda.get_device_name(0)}; seq {a.seq_len}, LoRA r {a.r} on all linears, bf16 autocast, "
          f"gradient checkpointing; {a.steps} timed steps (median) after 2 warm-up steps")
    skip = {}
    if "peft_bnb4" in ways:
        why = bnb_cuda_reason()
        if why:
            skip["peft_bnb4"] = why
    results, failed = [], []
    for shape in shapes:
        print(f"\n## {shape} shapes")
        print(f"{'way':<10} {'batch':>5} {'tokens/s':>9} {'peak GiB':>9} {'weights GiB':>12} {'loss':>15}")
        for way in ways:
            if way in skip:
                print(f"{way:<10} skipped: {skip[way]}")
                continue
            cmd = [sys.executable, __file__, "--child", "--ways", way, "--shapes", shape, "--batch", str(a.batch),
                   "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--r", str(a.r)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            except subprocess.TimeoutExpired:
                print(f"{way:<10} timed out after {a.timeout:.0f} s")
                failed.append(f"{shape}/{way}")
                continue
            if out.returncode:
                tail = out.stderr.strip().splitlines()[-1:] or ["?"]
                oom = "OutOfMemoryError" in out.stderr
                print(f"{way:<10} {'out of memory' if oom else 'failed'}: {tail[0][:200]}")
                if not oom:
                    failed.append(f"{shape}/{way}")
                    print(out.stderr[-3000:], file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["peak_gib"] = r["peak_allocated_gib"] + r["managed_state_gib"]
            results.append(r)
            print(f"{way:<10} {r['batch']:>5} {r['tokens_per_s']:>9.0f} {r['peak_gib']:>9.2f} "
                  f"{r['weights_gib']:>12.2f} {r['loss_first']:>7.3f}->{r['loss_last']:<7.3f}", flush=True)
        by = {r["way"]: r for r in results if r["shape"] == shape}
        if "nf4lora" in by and "peft_bf16" in by:
            n, b = by["nf4lora"], by["peft_bf16"]
            print(f"nf4lora vs PEFT bf16 LoRA: {n['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s (target >= 1.0), "
                  f"{n['peak_gib'] / b['peak_gib']:.2f}x peak memory (target <= 0.45 for 7B)")
        if "nf4lora" in by and "peft_bnb4" in by:
            n, b = by["nf4lora"], by["peft_bnb4"]
            print(f"nf4lora vs PEFT + bitsandbytes 4-bit: {n['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
                  f"{n['peak_gib'] / b['peak_gib']:.2f}x peak memory")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "skipped": skip, "failed": failed}, f, indent=1)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
