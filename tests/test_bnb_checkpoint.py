"""A checkpoint written by transformers + bitsandbytes in its 4-bit format (a tiny Llama
quantized by from_pretrained with BitsAndBytesConfig nf4 + double quant on the CPU, then
save_pretrained to safetensors) loads into nf4lora.Linear4bit layers with load_state_dict:
every quantized tensor round-trips, the dequantized weights equal bitsandbytes' bit for bit, and
layer and model outputs match bitsandbytes' (train mode: its CPU eval path repacks weights).
Skips when transformers, bitsandbytes or safetensors is not installed."""
import os

import pytest
import torch

import nf4lora

transformers = pytest.importorskip("transformers", reason="transformers not installed")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors not installed")


def tiny_config():
    # Every in_features a multiple of the blocksize 64: bitsandbytes 0.50.2's CPU dequantize
    # restarts blocks at each row otherwise (see test_bnb_compat.py), which is their bug.
    return transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=32)


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory):
    """(transformers' bitsandbytes-quantized model, the directory it saved itself to)."""
    dense_dir = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config()).save_pretrained(dense_dir)
    qconfig = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=torch.float32)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=qconfig,
                                                                  device_map="cpu", dtype=torch.float32)
    assert isinstance(quantized.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    saved_dir = tmp_path_factory.mktemp("bnb4bit")
    quantized.save_pretrained(saved_dir)
    return quantized, saved_dir


def test_transformers_bnb_checkpoint_loads_into_linear4bit(bnb_checkpoint):
    import bitsandbytes.functional as F
    quantized, saved_dir = bnb_checkpoint
    state_dict = safetensors_torch.load_file(os.path.join(saved_dir, "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in state_dict

    ours = transformers.LlamaForCausalLM(tiny_config())
    nf4lora.quantize_model(ours, skip_modules=("lm_head",), compute_dtype=None)  # the layer layout
    ours.load_state_dict(state_dict, strict=True)  # every key of the file, nothing missing

    theirs = dict(quantized.named_modules())
    layers = [(name, m) for name, m in ours.named_modules() if isinstance(m, nf4lora.Linear4bit)]
    assert len(layers) == 2 * 7
    quantized.train()
    g = torch.Generator().manual_seed(1)
    for name, layer in layers:
        ref = theirs[name]
        assert isinstance(ref, bnb.nn.Linear4bit), name
        assert torch.equal(layer.dequantize(), F.dequantize_4bit(ref.weight.data, ref.weight.quant_state)), name
        # What load_state_dict stored is what the file holds, byte for byte.
        saved = layer.state_dict()
        for key, value in saved.items():
            assert torch.equal(value, state_dict[f"{name}.{key}"]), (name, key)
        x = torch.randn(5, layer.in_features, generator=g, requires_grad=True)
        xb = x.detach().clone().requires_grad_(True)
        y, yb = layer(x), ref(xb)
        assert torch.allclose(y, yb, rtol=1e-5, atol=1e-5), name
        gy = torch.randn(y.shape, generator=g)
        y.backward(gy)
        yb.backward(gy)
        assert torch.allclose(x.grad, xb.grad, rtol=1e-5, atol=1e-5), name

    ids = torch.randint(0, 96, (2, 11), generator=g)
    with torch.no_grad():
        logits, logits_bnb = ours(ids).logits, quantized(ids).logits
    assert torch.allclose(logits, logits_bnb, rtol=1e-4, atol=1e-4)
