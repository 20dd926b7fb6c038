"""Training throughput of `nf4lora finetune` three ways on the same data, batches and options:
1 process (2 threads, then 1), 2 processes of 1 thread with DDP (torchrun), and with FSDP2
(torchrun ... --fsdp); then
LoRA adapters sharded vs replicated under FSDP2 (nf4lora.train.fsdp.shard_model(shard_adapters=...)):
time per step and the adapter + gradient + optimizer bytes each rank holds.

    python bench/bench_fsdp.py            # the default model (SmolLM2-135M-Instruct GGUF), 8 steps
    python bench/bench_fsdp.py --quick    # a small random Llama (SmolLM2 shapes, 4 layers), 4 steps
Tokens/s are the trainer's own (metrics.json: training tokens of all ranks / training time, loading
and evaluation excluded). On a shared machine, wall time says as much about the neighbours."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from timing import machine_header  # bench/timing.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _env(threads: int) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # tests.tiny_lm
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=path)


def _small_model(folder: Path) -> Path:
    from tests.tiny_lm import save_tiny_model
    return save_tiny_model(folder, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                           num_key_value_heads=3, num_hidden_layers=4, max_position_embeddings=512)


def run_cli(kind: str, common: list[str], out: Path) -> dict:
    if kind.startswith("1 process"):
        cmd, threads = [sys.executable, "-m", "nf4lora"], 1 if "1 thread" in kind else 2
    else:
        cmd, threads = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "nf4lora"], 1
    extra = ["--fsdp"] if kind.endswith("FSDP2") else []
    t0 = time.perf_counter()
    subprocess.run(cmd + ["finetune", *common, "--output-dir", str(out), *extra], env=_env(threads), check=True,
                   capture_output=True, timeout=3600)
    m = json.loads((out / "metrics.json").read_text())
    return {"tok_s": m["train_tokens_per_s"], "train_s": m["train_time_s"], "wall_s": time.perf_counter() - t0,
            "peak_rss": m["peak_rss_bytes"], "loss": m["history"][-1]["loss"]}


def adapters_child(model_path: str, steps: int, out: str) -> None:
    """(torchrun, 2 processes) FSDP2 with adapters sharded, then replicated: seconds per step
    (median) and per-rank bytes of adapters + grads + optimizer state."""
    import statistics
    import torch
    import torch.distributed as dist
    from nf4lora.train import fsdp
    from nf4lora.loading import load_model
    from nf4lora.train import CausalLMLoss
    import nf4lora as nl
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {}
    for shard in (True, False):
        model, _ = load_model(model_path or None)
        torch.manual_seed(0)
        model = nl.get_lora_model(model, nl.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        model.train()
        lm = CausalLMLoss(model)
        fsdp.shard_model(model, root=lm, shard_adapters=shard)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = fsdp.ShardedOptimizer(params, lambda ps: nl.optim.PagedAdamW(ps, lr=2e-4))
        g = torch.Generator().manual_seed(rank)
        times = []
        for _ in range(steps):
            ids = torch.randint(0, min(1000, model.config.vocab_size), (2, 192), generator=g)
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, n = lm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
            (loss / n).backward()
            opt.optimizer.step()
            opt.optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        local = sum(loc.numel() for loc in opt.locals)
        state = sum(t.numel() * t.element_size() for st in opt.optimizer.state.values() for t in st.values()
                    if isinstance(t, torch.Tensor))
        report["sharded" if shard else "replicated"] = {
            "s_per_step": statistics.median(times[1:] or times), "adapter_bytes": 4 * local,
            "grad_bytes": 4 * local, "optimizer_bytes": state}
        del model, lm, opt
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 4-layer random model with SmolLM2's shapes, 4 steps")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--adapters-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    print(machine_header())
    if args.adapters_child:
        adapters_child(args.adapters_child[0], int(args.adapters_child[1]), args.adapters_child[2])
        return 0
    steps = args.steps or (4 if args.quick else 8)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = str(_small_model(tmp / "model")) if args.quick else ""
        common = ["--steps", str(steps), "--batch-size", "4", "--seq-len", "192", "--max-eval", "4",
                  "--save-every", "0", "--quiet", "--warmup-steps", "1"] + (["--model", model] if model else [])
        print(f"model: {model and 'random 4-layer Llama, SmolLM2 shapes' or 'SmolLM2-135M-Instruct (GGUF)'}; "
              f"{steps} steps of 4 examples (seq <= 192), bf16 autocast, paged AdamW")
        print(f"{'':21} {'tokens/s':>9} {'train s':>8} {'wall s':>7} {'peak RSS/rank':>13} {'last loss':>9}")
        for kind in ("1 process", "1 process, 1 thread", "2 processes, DDP", "2 processes, FSDP2"):
            r = run_cli(kind, common, tmp / kind.replace(" ", "_").replace(",", ""))
            print(f"{kind:21} {r['tok_s']:9.1f} {r['train_s']:8.1f} {r['wall_s']:7.1f} "
                  f"{r['peak_rss'] / 2**30:11.2f}Gi {r['loss']:9.4f}", flush=True)
        out = tmp / "adapters.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        __file__, "--adapters-child", model, str(max(3, steps // 2)), str(out)],
                       env=_env(1), check=True, capture_output=True, timeout=3600)
        rep = json.loads(out.read_text())
        print("FSDP2, 2 processes, LoRA adapters:   s/step (median)  adapters+grads+optimizer per rank")
        for k, v in rep.items():
            total = v["adapter_bytes"] + v["grad_bytes"] + v["optimizer_bytes"]
            print(f"  {k:12} {v['s_per_step']:20.3f} {total / 2**20:20.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
