"""nf4lora.plan / `nf4lora plan`: its static rows equal the bytes of a real quantized model with
LoRA (4-bit base, dense tensors, adapters); its peak is within 15% of a measured training peak
(bench/bench_plan.py's first configuration, in a fresh process); presets, config files and folders
resolve; FSDP divides what it shards; bad input is refused with exit status 2."""
import json
import sys
from pathlib import Path

import torch

import nf4lora as nl
from nf4lora.cli import main
from nf4lora.plan import ModelShape, parse_size, plan, resolve_model

from .tiny_lm import save_tiny_model, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_static_rows_equal_the_models_bytes():
    from transformers import AutoModelForCausalLM
    over = dict(hidden_size=128, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=3, vocab_size=300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(**over)).to(torch.bfloat16)
    nl.quantize_model(model)
    model = nl.get_lora_model(model, nl.LoraConfig(r=8, target_modules="all-linear"))
    four = [m for m in model.modules() if isinstance(m, nl.Linear4bit)]
    base = sum(t.numel() * t.element_size() for m in four for t in [m.weight, *m.buffers()] if t is not None)
    owned = {id(t) for m in four for t in [m.weight, *m.buffers()]}
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in owned and not p.requires_grad)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    p = plan(ModelShape.from_config(tiny_config(**over).to_dict()), seq=16, lora_r=8, optim="adamw")
    assert p["lora_params"] == lora
    assert p["parts"]["adapters"] == 8 * lora and p["parts"]["optimizer"] == 8 * lora
    assert p["parts"]["dense"] == dense
    assert abs(p["parts"]["base_4bit"] - base) <= 8 * len(four)  # partial (nested) blocks: ceil per layer
    sharded = plan(ModelShape.from_config(tiny_config(**over).to_dict()), devices=4, fsdp=True, seq=16,
                   lora_r=8, optim="adamw")
    assert sharded["parts"]["adapters"] == 2 * lora and sharded["parts"]["gathered"] > 0


def test_plan_within_15_percent_of_a_measured_peak(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_plan
    finally:
        sys.path.remove(str(ROOT / "bench"))
    cfg = bench_plan.CONFIGS[0]
    measured = bench_plan.measure(cfg)["peak"]
    planned = bench_plan.predict(cfg, 1)["peak_bytes"]
    assert abs(planned / measured - 1) <= 0.15, (planned, measured)


def test_models_resolve(tmp_path):
    folder = save_tiny_model(tmp_path / "m")
    a, b = resolve_model(str(folder)), resolve_model(str(folder / "config.json"))
    assert a == b and a.hidden == 64 and a.kvd == 32
    seventy = resolve_model("llama-2-70b")
    assert plan(seventy)["params_4bit"] == 80 * (2 * 8192 ** 2 + 2 * 8192 * 1024 + 3 * 8192 * 28672)
    assert parse_size("24GiB") == 24 * 2 ** 30 and parse_size("80GB") == 80 * 10 ** 9


def test_cli(capsys, tmp_path):
    assert main(["plan", "--model", "llama-2-7b", "--gradient-checkpointing", "--device-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "fits in 24.00 GiB" in out and "4-bit base" in out
    assert main(["plan", "--model", "llama-2-70b", "--devices", "8", "--fsdp", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["devices"] == 8 and got["peak_bytes"] == sum(got["parts"].values())
    assert main(["plan", "--model", "no-such-model"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-2-7b", "--device-memory", "lots"]) == 2
    assert main(["plan", "--model", "llama-2-7b", "--devices", "0"]) == 2
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
    assert main(["plan", "--model", str(tmp_path / "bad.json")]) == 2
    assert "missing" in capsys.readouterr().err
