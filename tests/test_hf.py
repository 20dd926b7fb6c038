"""nf4lora.hf: from_pretrained(..., quantization_config=NF4Config()) through transformers' quantizer
registry gives nf4lora Linear4bit layers with the codes and logits of nl.load_model; save_pretrained
writes a checkpoint that transformers + bitsandbytes loads (bitsandbytes Linear4bit, the same
dequantized weights, logits to 1e-4 in fp32) and nl.load_model reads back bit for bit; `import
nf4lora` does not import transformers."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nf4lora as nl

from .tiny_lm import save_tiny_model

transformers = pytest.importorskip("transformers", reason="the integration is for transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits.float()


def test_import_nf4lora_does_not_import_transformers():
    code = "import sys, nf4lora; assert 'transformers' not in sys.modules; nf4lora.hf.NF4Config; " \
           "assert 'transformers' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_from_pretrained_gives_load_models_codes_and_logits(tiny):
    from nf4lora.hf import NF4Config
    ours = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16,
                                                             quantization_config=NF4Config())
    ref, _ = nl.load_model(tiny)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, nl.Linear4bit)}
    assert len(layers) == 14 and not isinstance(ours.lm_head, nl.Linear4bit)
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    for k in sd:
        assert torch.equal(sd[k], ref_sd[k]), k
    x = torch.randint(0, 259, (2, 10))
    assert torch.equal(_logits(ours, x), _logits(ref, x))


def test_save_pretrained_loads_in_bitsandbytes_and_nf4lora(tiny, tmp_path):
    from nf4lora.hf import NF4Config
    bnb = pytest.importorskip("bitsandbytes", reason="the saved checkpoint is checked in transformers + bitsandbytes")
    ours = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32,
                                                             quantization_config=NF4Config(compute_dtype=None))
    ours.save_pretrained(tmp_path / "q")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu", dtype=torch.float32)
    mods = dict(theirs.named_modules())
    import bitsandbytes.functional as F
    for name, m in ours.named_modules():
        if isinstance(m, nl.Linear4bit):
            t = mods[name]
            assert isinstance(t, bnb.nn.Linear4bit), name
            assert torch.equal(m.dequantize(), F.dequantize_4bit(t.weight.data, t.weight.quant_state)), name
    x = torch.randint(0, 259, (2, 10))
    a = _logits(ours, x)
    # bitsandbytes 0.50's CPU inference path (eval mode) is off by ~2e-3 from its own dequantized
    # weight; its train-mode path (dequantize + matmul, as tests/test_bnb_checkpoint.py uses) is exact
    theirs.train()
    assert torch.allclose(a, _logits(theirs, x), rtol=1e-4, atol=1e-4)
    back, _ = nl.load_model(tmp_path / "q", compute_dtype=torch.float32)
    sd = back.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_from_pretrained_peak_is_the_4bit_model_plus_one_tensor(tmp_path):
    """A random Llama of 61M parameters (hidden 1024, 4 layers; 245 MB fp32 safetensors, 122 MB
    dense in bf16) loaded in bf16 with NF4Config in a fresh process (bench/bench_hf_load.py's
    measurement: anonymous memory sampled every millisecond, above the level before the load):
    the peak stays within the 4-bit model plus two of its largest dense bf16 tensors, and under
    half the dense model. The dense-first route (from_pretrained, then nl.quantize_model, what
    NF4Quantizer did before) measured the same way holds the dense model, which shows the
    measurement sees it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import bench_hf_load
    finally:
        sys.path.pop(0)
    sizes = bench_hf_load.write_checkpoint(tmp_path, hidden=1024, inter=4096, layers=4, heads=16, kv_heads=4)
    ours = bench_hf_load.measure("nf4config", tmp_path)
    dense_first = bench_hf_load.measure("dense-first", tmp_path)
    print(f"dense bf16 {sizes['bf16_bytes'] / 1e6:.1f} MB; NF4Config peak {ours['anon_peak'] / 1e6:.1f} MB "
          f"(4-bit model {ours['model_bytes'] / 1e6:.1f} MB); dense-first peak {dense_first['anon_peak'] / 1e6:.1f} MB")
    one_tensor = 2 * ours["largest_linear_numel"]
    assert ours["anon_peak"] >= 0.9 * ours["model_bytes"]  # the sampler sees the model it loads
    assert ours["anon_peak"] <= ours["model_bytes"] + 2 * one_tensor
    assert ours["anon_peak"] < sizes["bf16_bytes"] / 2
    assert dense_first["anon_peak"] > 0.9 * sizes["bf16_bytes"]


def test_bad_config():
    from nf4lora.hf import NF4Config
    with pytest.raises(ValueError, match="quant_type"):
        NF4Config(quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        NF4Config(blocksize=128)
    with pytest.raises(TypeError, match="compute_dtype"):
        NF4Config(compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="double_quant"):
        NF4Config(double_quant="no")
    for bad in ("lm_head", None, ["lm_head", 3]):  # a bare str would skip every name ending in one letter
        with pytest.raises(TypeError, match="skip_modules"):
            NF4Config(skip_modules=bad)
    with pytest.raises(TypeError, match="bnb_4bit_quant_type"):  # BitsAndBytesConfig's names are not ours
        NF4Config(bnb_4bit_quant_type="nf4")


def test_checkpoint_without_a_weight_to_quantize_is_refused(tiny, tmp_path):
    """A layer NF4Config would quantize whose weight the checkpoint lacks: a ValueError naming it
    (transformers would initialise a dense one at random; a 4-bit one has nothing to start from)."""
    import shutil
    from safetensors.torch import load_file, save_file
    from nf4lora.hf import NF4Config
    shutil.copytree(tiny, tmp_path / "m")
    sd = load_file(tmp_path / "m" / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no weight for 1 layer\(s\).*model\.layers\.1\.mlp\.up_proj\.weight"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=NF4Config())


def test_tied_lm_head_left_in_is_quantized_from_the_embeddings(tmp_path):
    """skip_modules=() on a model with tied embeddings: the checkpoint has no lm_head.weight;
    the head is quantized from the embedding it is tied to, as the dense-first route (from_pretrained,
    then nl.quantize_model) does, with equal state and logits."""
    from nf4lora.hf import NF4Config
    path = save_tiny_model(tmp_path, tie_word_embeddings=True)
    ours = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                             quantization_config=NF4Config(skip_modules=()))
    ref = nl.quantize_model(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16),
                            skip_modules=())
    assert isinstance(ours.lm_head, nl.Linear4bit)
    sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    x = torch.randint(0, 259, (2, 10))
    assert torch.equal(_logits(ours, x), _logits(ref, x))


def test_pre_quantized_checkpoint_with_nf4config_is_refused(tiny, tmp_path):
    """A checkpoint already in bitsandbytes' 4-bit format (what save_pretrained writes) names
    BitsAndBytesConfig in its config.json; transformers refuses another config class for it with
    a ValueError naming both (load it without quantization_config, or with nl.load_model)."""
    from nf4lora.hf import NF4Config
    ours = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32,
                                                             quantization_config=NF4Config(compute_dtype=None))
    ours.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="quantized with BitsAndBytesConfig but you are passing a NF4Config"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=NF4Config())
