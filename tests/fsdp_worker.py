"""What tests/test_fsdp.py runs in each of its torchrun processes (and, unsharded, in the test process
for the reference): a small 4-bit Llama with LoRA trained a few steps with nf4lora.train.fsdp, its
gathered adapter, resident 4-bit bytes, a bf16 mixed-precision loss and a DCP checkpoint resume.
Usage: torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR [cuda]"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nf4lora as nl  # noqa: E402
from tests.tiny_lm import tiny_config  # noqa: E402

# Odd sizes on purpose: gate/up are 509 x 254 (64,643 packed bytes, 2,021 absmax blocks: neither
# divides by 2, and a 64-weight block straddles the two shards); the vocabulary is 259 rows.
CONFIG = dict(hidden_size=254, intermediate_size=509, num_attention_heads=1, num_key_value_heads=1)
STEPS, BATCH, SEQ = 3, 4, 24


def make_model(device: str = "cpu"):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(**CONFIG))
    nl.quantize_model(model)
    model = nl.get_lora_model(model, nl.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model.to(device)


def batches(device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 259, (BATCH, SEQ), generator=g).to(device) for _ in range(STEPS + 2)]


def loss_sum(model, ids):
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum")


def train(model, optimizer, data, rank=0, world=1, accumulate=1):
    """Global batch BATCH, each rank its BATCH/world rows; the loss is the mean over the global
    batch's tokens (x world: FSDP averages the reduce-scattered gradients over ranks). One process
    takes the same rows as `accumulate` micro-batches (the same products, as the ranks compute them)."""
    losses = []
    for ids in data:
        n = ids[:, 1:].numel()
        part = ids[rank * BATCH // world:(rank + 1) * BATCH // world]
        total = 0.0
        for mb in part.chunk(accumulate):
            loss = loss_sum(model, mb)
            (loss * (world / n)).backward()
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def make_optimizer(params):
    return nl.optim.AdamW(params, lr=1e-2)


def reference(out: Path, world: int = 2) -> None:
    """One process, no FSDP: the adapter after STEPS steps and the bf16 loss of each rank's rows of
    the first batch."""
    model = make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    train(model, make_optimizer(params), batches()[:STEPS], accumulate=world)
    torch.save({k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}, out / "ref.pt")
    nl.save_adapter(model, out / "ref_adapter")
    bf16 = make_model()
    for p in bf16.parameters():  # what FSDP's MixedPrecisionPolicy(param_dtype=bf16) computes with:
        if p.is_floating_point():  # float params in bf16, buffers (rotary inv_freq) as they are
            p.data = p.data.to(torch.bfloat16)
    with torch.no_grad():
        ids = batches()[0]
        torch.save([float(loss_sum(bf16, ids[r * BATCH // world:(r + 1) * BATCH // world])) for r in range(world)],
                   out / "ref_bf16.pt")


def main(out: Path, device: str) -> None:
    import torch.distributed as dist
    from nf4lora.train import fsdp
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    report = {}

    model = fsdp.shard_model(make_model(device))
    report["bytes"] = fsdp.resident_4bit_bytes(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = fsdp.ShardedOptimizer(params, make_optimizer)
    data = batches(device)
    report["losses"] = train(model, opt.optimizer, data[:STEPS], rank, world)
    with fsdp.gathered_parameters(model) as full:
        if rank == 0:
            torch.save({k: v.cpu() for k, v in full.items()}, out / "fsdp.pt")
    fsdp.save_adapter(model, out / "adapter")

    # DCP: a checkpoint after STEPS steps, two more steps; then a fresh sharded model resumes from
    # the checkpoint and takes the same two steps: the adapters must agree bit for bit.
    groups = fsdp.param_groups(opt)
    fsdp.save_checkpoint(out / "ckpt", model, opt, lambda tmp: (tmp / "extra.json").write_text("{}"))
    train(model, opt.optimizer, data[STEPS:], rank, world)
    with fsdp.gathered_parameters(model) as full:
        after = {k: v.cpu().clone() for k, v in full.items()}
    fresh = fsdp.shard_model(make_model(device))
    opt2 = fsdp.ShardedOptimizer([p for p in fresh.parameters() if p.requires_grad], make_optimizer)
    fsdp.load_checkpoint(out / "ckpt", fresh, opt2, groups)
    train(fresh, opt2.optimizer, data[STEPS:], rank, world)
    with fsdp.gathered_parameters(fresh) as full:
        report["resume_exact"] = all(torch.equal(after[k], v.cpu()) for k, v in full.items())
        report["resume_keys"] = sorted(full) == sorted(after)

    # adapters replicated (FSDP's ignored_params; ShardedOptimizer all-reduces their gradients)
    rep = fsdp.shard_model(make_model(device), shard_adapters=False)
    rparams = [p for p in rep.parameters() if p.requires_grad]
    train(rep, fsdp.ShardedOptimizer(rparams, make_optimizer).optimizer, data[:STEPS], rank, world)
    if rank == 0:
        torch.save({k: v.detach().cpu().clone() for k, v in rep.named_parameters() if v.requires_grad},
                   out / "replicated.pt")

    # bf16 mixed precision: fp32 shards, bf16 all-gathered params and compute.
    mp = fsdp.shard_model(make_model(device), param_dtype=torch.bfloat16)
    with torch.no_grad():
        report["loss_bf16"] = float(loss_sum(mp, data[0][rank * BATCH // world:(rank + 1) * BATCH // world]))
    gathered = [None] * world
    dist.all_gather_object(gathered, report)
    if rank == 0:
        (out / "report.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "cpu")
