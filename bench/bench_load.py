"""Peak memory and time of nf4lora.load_model on a ~1B-parameter Llama checkpoint: writes random bf16
weights as a transformers-style sharded safetensors folder (config.json, model-0000k-of-0000n.safetensors,
model.safetensors.index.json), one tensor at a time so the writer never holds the model, then loads
it with quantize="nf4" in a fresh process and reports peak RSS above that process' baseline (VmHWM
minus VmRSS after the imports, from /proc/self/status), the load time and the 4-bit model's own
bytes. The finetune issue's bound: at most 1.6 GB above the baseline. The checkpoint is deleted
afterwards (about 2.2 GB of disk while it exists).

    python bench/bench_load.py                    # TinyLlama-1.1B shapes: hidden 2048, 22 layers
    python bench/bench_load.py --layers 4         # a quick smaller run
    python bench/bench_load.py --keep DIR         # write (or reuse) the checkpoint in DIR, keep it"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import proc_status  # bench/timing.py (this script's folder is on sys.path)


def llama_tensors(hidden: int, layers: int, inter: int, vocab: int, heads: int, kv_heads: int):
    """(name, shape) in transformers' Llama naming, embeddings and head untied."""
    kv = hidden // heads * kv_heads
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "self_attn.q_proj.weight", (hidden, hidden)
        yield p + "self_attn.k_proj.weight", (kv, hidden)
        yield p + "self_attn.v_proj.weight", (kv, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, hidden)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def write_checkpoint(folder: Path, args) -> int:
    """Writes the sharded bf16 checkpoint; returns the parameter count. Each shard's header is
    computed from the shapes first, then each tensor is generated and written on its own."""
    import torch
    from transformers import LlamaConfig
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         vocab_size=args.vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                         torch_dtype="bfloat16")
    config.save_pretrained(str(folder))
    tensors = list(llama_tensors(args.hidden, args.layers, args.inter, args.vocab, args.heads, args.kv_heads))
    shards, current, size = [], [], 0
    for name, shape in tensors:  # transformers' rule: a new shard once the next tensor would overflow
        n = 2
        for d in shape:
            n *= d
        if current and size + n > args.shard_mb << 20:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, n))
        size += n
    shards.append(current)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, n in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape, n in shard:
                if name.endswith("norm.weight"):
                    t = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
                f.write(t.view(torch.uint8).numpy().tobytes())
                total += t.numel()
                del t
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(n for s in shards for _, _, n in s)}, "weight_map": weight_map}))
    return total


def child(folder: str) -> None:
    """Runs in a fresh process: imports, baseline, load, report (one JSON line)."""
    import torch
    import transformers  # noqa: F401  (part of the baseline: load_model needs it anyway)
    import nf4lora
    base = proc_status("VmRSS")
    t0 = time.perf_counter()
    model, _ = nf4lora.load_model(folder, quantize="nf4")
    dt = time.perf_counter() - t0
    peak, rss = proc_status("VmHWM"), proc_status("VmRSS")
    params = sum(p.numel() for p in model.parameters())
    own = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # codes, scales, dense tensors
    print(json.dumps({"baseline_rss": base, "peak_rss": peak, "rss_after": rss, "load_s": dt,
                      "model_bytes": own, "linears_4bit": sum(isinstance(m, nf4lora.Linear4bit)
                                                              for m in model.modules()), "numel": params}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--shard-mb", type=int, default=500, help="shard size, as transformers' max_shard_size")
    ap.add_argument("--keep", help="write (or reuse) the checkpoint here and keep it")
    ap.add_argument("--limit-gb", type=float, default=1.6)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run (CI): a 2-layer Llama of hidden 256 "
                    "(~1M params, 1 MB shards); the 1.6 GB bound means nothing at that size")
    a = ap.parse_args()
    if a.quick:
        a.hidden, a.layers, a.inter, a.vocab, a.heads, a.kv_heads, a.shard_mb = 256, 2, 512, 1000, 4, 2, 1
    if a.child:
        child(a.child)
        return
    folder = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="nf4lora-load-"))
    try:
        if not (folder / "model.safetensors.index.json").is_file():
            t0 = time.perf_counter()
            n = write_checkpoint(folder, a)
            disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
            print(f"wrote {n / 1e9:.2f}B parameters, {len(list(folder.glob('*.safetensors')))} shards, "
                  f"{disk / 1e9:.2f} GB bf16, in {time.perf_counter() - t0:.0f}s ({folder})", flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", str(folder)], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:])
            sys.exit(1)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        above = r["peak_rss"] - r["baseline_rss"]
        print(f"load_model(quantize='nf4'): {r['load_s']:.1f}s, {r['linears_4bit']} Linear4bit; "
              f"interpreter baseline {r['baseline_rss'] / 1e9:.2f} GB RSS (torch, transformers, nf4lora imported)")
        print(f"peak RSS above baseline {above / 1e9:.2f} GB (bound {a.limit_gb} GB: "
              f"{'ok' if above <= a.limit_gb * 1e9 else 'OVER'}); RSS after load {(r['rss_after'] - r['baseline_rss']) / 1e9:.2f} GB "
              f"above; the loaded model's tensors {r['model_bytes'] / 1e9:.2f} GB "
              f"(4-bit linears + bf16 embeddings, lm_head, norms)")
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
