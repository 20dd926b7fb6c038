"""PEFT's on-disk adapter format, against real PEFT: adapters we save load in PEFT on the same base
with the same outputs, PEFT-saved adapters load into ours with the same outputs (a tiny Llama
built from a LlamaConfig, and nn.Linear stacks), the same file keys and shapes as PEFT writes,
LoraConfig.to_dict()/from_dict() against PEFT's LoraConfig, and files that must be refused
(truncated, tampered, wrong shapes, missing keys, another model's config) leaving the model unchanged."""
import dataclasses
import json

import pytest
import torch
from torch import nn

import nf4lora as nl
from nf4lora import LoraConfig

peft = pytest.importorskip("peft", reason="PEFT is needed for the round trips (pip install '.[test]')")
transformers = pytest.importorskip("transformers", reason="a transformers model is the PEFT base")


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def stack(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 8)).eval()


IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))
X = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))


def run(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits if isinstance(model, transformers.PreTrainedModel) or hasattr(
            model, "base_model") and isinstance(model.base_model.model, transformers.PreTrainedModel) else model(X)


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


CASES = [
    # (base factory, our LoraConfig, PEFT LoraConfig kwargs)
    (tiny_llama, dict(r=4, lora_alpha=8, target_modules="all-linear"),
     dict(r=4, lora_alpha=8, target_modules="all-linear")),
    (tiny_llama, dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                      rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
                      modules_to_save=["lm_head"]),
     dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
          rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}, modules_to_save=["lm_head"])),
    (stack, dict(r=3, lora_alpha=6, target_modules=["0", "2", "4"]),
     dict(r=3, lora_alpha=6, target_modules=["0", "2", "4"])),
    (stack, dict(r=2, lora_alpha=2, target_modules=r"[02]", bias="lora_only"),
     dict(r=2, lora_alpha=2, target_modules=r"[02]", bias="lora_only")),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_ours_loads_in_peft_with_the_same_outputs(case, tmp_path):
    factory, ours, _ = CASES[case]
    model = nl.get_lora_model(factory(), LoraConfig(**ours))
    randomize(model)
    if ours.get("bias") == "lora_only":
        with torch.no_grad():
            model[0].base_layer.bias.add_(1.0)
    expected = run(model)
    nl.save_adapter(model, tmp_path)
    base = factory()
    assert not torch.allclose(run(base), expected, atol=1e-3)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    assert torch.allclose(run(loaded), expected, atol=1e-5)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_peft_adapter_loads_into_ours_with_the_same_outputs(case, tmp_path):
    factory, _, theirs = CASES[case]
    pm = peft.get_peft_model(factory(), peft.LoraConfig(**theirs))
    randomize(pm)
    if theirs.get("bias") == "lora_only":
        with torch.no_grad():
            pm.base_model.model[0].base_layer.bias.add_(1.0)
    pm.eval()
    expected = run(pm)
    pm.save_pretrained(tmp_path)
    model = nl.load_adapter(factory(), tmp_path)
    assert torch.allclose(run(model), expected, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())  # PEFT's inference default
    ours_keys = {k: tuple(v.shape) for k, v in nl.read_adapter(tmp_path)[1].items()}
    out = tmp_path / "ours"
    nl.save_adapter(model, out)  # and what we write back has PEFT's keys and shapes
    assert {k: tuple(v.shape) for k, v in nl.read_adapter(out)[1].items()} == ours_keys


def test_saved_keys_match_what_peft_writes(tmp_path):
    ours = nl.get_lora_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    nl.save_adapter(ours, tmp_path / "ours")
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    pm.save_pretrained(tmp_path / "peft")
    from safetensors import safe_open
    shapes = {}
    for name in ("ours", "peft"):
        with safe_open(str(tmp_path / name / "adapter_model.safetensors"), "pt") as f:
            shapes[name] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["ours"] == shapes["peft"] and len(shapes["ours"]) == 2 * 7 * 2
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["init_lora_weights"] is True
    assert "model.layers.0.self_attn.q_proj" in cfg["target_modules"]  # "all-linear" expanded, as PEFT does


def test_adapter_trained_on_a_4bit_base_loads_in_peft_on_the_dequantized_base(tmp_path):
    model = nl.get_lora_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8), quantize="nf4", compute_dtype=None)
    randomize(model)
    expected = run(model)
    nl.save_adapter(model, tmp_path)
    base = tiny_llama()
    nl.quantize_model(base, compute_dtype=None)
    nl.merge_and_unload(nl.get_lora_model(base, LoraConfig(r=1, target_modules=["q_proj"])), dtype=None)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)  # base: the dense dequantized weights
    assert torch.allclose(run(loaded), expected, atol=1e-4)


def test_config_dicts_round_trip_through_peft():
    ours = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], use_rslora=True,
                      init="gaussian", rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 2.0},
                      modules_to_save=["lm_head"], bias="lora_only", task_type="CAUSAL_LM")
    theirs = peft.LoraConfig(**{k: v for k, v in ours.to_dict().items() if k not in ("peft_type", "revision")})
    for field in ("r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "rank_pattern",
                  "alpha_pattern", "bias", "modules_to_save"):
        assert getattr(theirs, field) == ours.to_dict()[field], field
    assert set(theirs.target_modules) == {"q_proj", "v_proj"}
    back = LoraConfig.from_dict(json.loads(json.dumps(theirs.to_dict(), default=list)))
    assert sorted(back.target_modules) == ["q_proj", "v_proj"]  # PEFT keeps a set: any order
    assert back == dataclasses.replace(ours, target_modules=back.target_modules)
    with pytest.raises(ValueError, match="lora_bias=True"):
        LoraConfig.from_dict({**theirs.to_dict(), "lora_bias": True, "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="peft_type"):
        LoraConfig.from_dict({"peft_type": "IA3", "target_modules": ["q_proj"]})
    with pytest.raises(ValueError, match="init_lora_weights='olora'"):
        LoraConfig.from_dict({"target_modules": ["q_proj"], "init_lora_weights": "olora"})


def snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys() and all(torch.equal(v, before[1][k]) for k, v in after[1].items())


def test_bad_adapter_files_are_refused_and_the_model_left_unchanged(tmp_path):
    src = nl.get_lora_model(stack(), LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"]))
    randomize(src)
    good = nl.save_adapter(src, tmp_path / "good")
    weights = (good / "adapter_model.safetensors").read_bytes()
    config = json.loads((good / "adapter_config.json").read_text())

    def variant(name, weights_bytes=weights, cfg=config):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(weights_bytes)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        return d

    from safetensors.torch import save as st_save
    tensors = nl.read_adapter(good)[1]
    cases = [
        (variant("truncated", weights[: len(weights) - 7]), "not a valid safetensors file"),
        (variant("garbage", b"\x00" * 64), "not a valid safetensors file"),
        (variant("tampered", weights[:-1] + bytes([weights[-1] ^ 1])), "does not match the checksum"),
        (variant("wrong_shape", st_save({**tensors, "base_model.model.0.lora_A.weight": torch.zeros(3, 31)})),
         r"lora_A.weight' has shape \[3, 31\], this model needs \[3, 32\]"),
        (variant("missing", st_save({k: v for k, v in tensors.items() if not k.startswith("base_model.model.2.")})),
         "2 missing keys"),
        (variant("no_prefix", st_save({k.replace("base_model.model.", ""): v for k, v in tensors.items()})),
         "lacks PEFT's 'base_model.model.' prefix"),
        (variant("other_model", cfg={**config, "target_modules": ["q_proj", "0"]}), "'q_proj' matches no module"),
        (variant("wrong_rank", cfg={**config, "r": 4}), "this model needs \\[4, 32\\]"),
        (variant("bad_json", cfg="{"), "not valid JSON|must be a dict|expected a dict"),
        (variant("dora", cfg={**config, "use_dora": True}), "missing keys.*lora_magnitude_vector"),
    ]
    model = stack()
    before = snapshot(model)
    for directory, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            nl.load_adapter(model, directory)
        assert_unchanged(model, before)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        nl.load_adapter(model, tmp_path / "empty")
    nl.load_adapter(model, good)
    assert torch.equal(run(model), run(src))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        nl.load_adapter(model, good)


def test_load_as_a_second_named_adapter_and_failed_save_keeps_the_old_files(tmp_path, monkeypatch):
    src = nl.get_lora_model(stack(), LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"]))
    randomize(src)
    d = nl.save_adapter(src, tmp_path / "a")
    model = nl.get_lora_model(stack(), LoraConfig(r=2, target_modules=["4"]))
    nl.load_adapter(model, d, adapter_name="loaded")
    assert nl.active_adapter(model) == "default" and nl.adapter_names(model) == ["default", "loaded"]
    nl.set_adapter(model, "loaded")
    assert torch.equal(run(model), run(src))
    old = {p.name: p.read_bytes() for p in d.iterdir()}
    randomize(src, seed=9)
    import nf4lora.lora.io as lora_io
    real = lora_io.json.dumps
    monkeypatch.setattr(lora_io.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        nl.save_adapter(src, d)
    monkeypatch.setattr(lora_io.json, "dumps", real)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == old  # no temp files left, old files intact
