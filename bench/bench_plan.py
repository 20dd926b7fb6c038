"""Checks nf4lora.plan against measured peaks: each configuration trains 2 steps (bf16 autocast,
LoRA on every linear, the trainer's CausalLMLoss) in a fresh process (2 torchrun processes with
--fsdp) and reports the peak RSS above a baseline (the interpreter with torch, transformers and
nf4lora imported and a tiny model trained once, so code, thread pools and allocator arenas are
in the baseline), next to the plan's prediction. The peak is reset (/proc/self/clear_refs 5) after
the model is built, so building it (dense, then quantized) does not count.

    python bench/bench_plan.py            # the table (a few minutes on 2 cores)
    python bench/bench_plan.py --quick    # two configurations
Prints one line per configuration: measured, planned, ratio; exits 1 if any is off by > 15%."""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from timing import machine_header, proc_status  # bench/timing.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# SmolLM2-135M's layer shapes with fewer layers (a whole model per configuration in a few seconds)
SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
             vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
CONFIGS = [
    dict(layers=8, seq=256, batch=4, gc=False, optim="adamw", fsdp=False),
    dict(layers=8, seq=512, batch=2, gc=True, optim="paged_adamw_8bit", fsdp=False),
    dict(layers=16, seq=256, batch=2, gc=False, optim="paged_adamw_8bit", fsdp=False),
    dict(layers=4, seq=1024, batch=2, gc=False, optim="adamw", fsdp=False),
    dict(layers=16, seq=256, batch=2, gc=True, optim="adamw", fsdp=False),
    dict(layers=8, seq=256, batch=2, gc=False, optim="adamw", fsdp=True),
]
QUICK = [CONFIGS[0], CONFIGS[5]]


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _step(model, loss_module, optimizer, ids, torch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, n = loss_module(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
    (loss / n).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def child(cfg: dict) -> dict:
    import torch
    import nf4lora as nl
    from nf4lora.train.cpu_attention import use_fp32_cpu_attention
    from nf4lora.train import CausalLMLoss
    from transformers import AutoModelForCausalLM
    from tests.tiny_lm import tiny_config
    rank, world = 0, 1
    nl.ops.DISPATCH.cpu_gemm_fp32 = False  # the bf16 route (GPUs, AMX CPUs) that nf4lora.plan models
    if cfg["fsdp"]:
        import torch.distributed as dist
        from nf4lora.train import fsdp
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()

    def make_opt(params):  # what finetune's --optim builds
        if cfg["optim"] == "adamw":
            return nl.optim.AdamW(params, lr=1e-4)
        return nl.optim.PagedAdamW(params, lr=1e-4, optim_bits=8 if cfg["optim"] == "paged_adamw_8bit" else 32)

    def build(layers, **over):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(tiny_config(**{**SHAPE, "num_hidden_layers": layers, **over}))
        m = m.to(torch.bfloat16)
        nl.quantize_model(m)
        m = nl.get_lora_model(m, nl.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        use_fp32_cpu_attention(m)
        if cfg["gc"]:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        # transformers' head + cross entropy, which nf4lora.plan's loss-head row models; the trainer's
        # chunked head (train/head_loss.py, the default under bf16 autocast) needs less
        loss_module = CausalLMLoss(m, fused_head=False)
        if cfg["fsdp"]:
            fsdp.shard_model(m, root=loss_module)
            params = [p for p in m.parameters() if p.requires_grad]
            opt = fsdp.ShardedOptimizer(params, make_opt).optimizer
        else:
            opt = make_opt([p for p in m.parameters() if p.requires_grad])
        return m, loss_module, opt

    # warm-up: every code path once, on a small model; then the baseline
    m, lm, opt = build(1, vocab_size=512, hidden_size=144, intermediate_size=384, num_attention_heads=9,
                       num_key_value_heads=3)
    _step(m, lm, opt, torch.randint(0, 512, (cfg["batch"], 64)), torch)
    del m, lm, opt
    _trim()
    baseline = proc_status("VmRSS")
    m, lm, opt = build(cfg["layers"])
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current RSS
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        _step(m, lm, opt, torch.randint(0, SHAPE["vocab_size"], (cfg["batch"], cfg["seq"]), generator=g), torch)
    out = {"rank": rank, "peak": proc_status("VmHWM") - baseline, "baseline": baseline}
    if cfg["fsdp"]:
        import torch.distributed as dist
        got = [None] * world
        dist.all_gather_object(got, out)
        dist.destroy_process_group()
        return {"peak": max(x["peak"] for x in got), "ranks": got}
    return out


def predict(cfg: dict, devices: int) -> dict:
    from nf4lora.plan import ModelShape, plan
    shape = ModelShape.from_config({**SHAPE, "num_hidden_layers": cfg["layers"]})
    return plan(shape, devices=devices, seq=cfg["seq"], batch=cfg["batch"], fsdp=cfg["fsdp"],
                gradient_checkpointing=cfg["gc"], optim=cfg["optim"], lora_r=16)


def measure(cfg: dict) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # tests.tiny_lm
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        if cfg["fsdp"]:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   __file__, "--child", json.dumps(cfg), str(out)]
        else:
            cmd = [sys.executable, __file__, "--child", json.dumps(cfg), str(out)]
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
        return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        cfg = json.loads(args.child[0])
        res = child(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.child[1]).write_text(json.dumps(res))
        return 0
    worst = 0.0
    print(machine_header())
    print(f"{'config':62} {'measured':>10} {'planned':>10} {'ratio':>6}")
    for cfg in (QUICK if args.quick else CONFIGS):
        res = measure(cfg)
        p = predict(cfg, 2 if cfg["fsdp"] else 1)
        ratio = p["peak_bytes"] / res["peak"]
        worst = max(worst, abs(ratio - 1))
        name = (f"L={cfg['layers']} seq={cfg['seq']} batch={cfg['batch']} gc={int(cfg['gc'])} {cfg['optim']}"
                f"{' fsdp x2' if cfg['fsdp'] else ''}")
        print(f"{name:62} {res['peak'] / 2**20:8.1f}Mi {p['peak_bytes'] / 2**20:8.1f}Mi {ratio:6.3f}", flush=True)
        print("    " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in p["parts"].items() if v), flush=True)
    print(f"worst |planned/measured - 1| = {worst:.3f}")
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
