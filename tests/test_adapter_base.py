"""`nf4lora finetune --init loftq|pissa` and the base it trains on: LoftQ picks its own 4-bit codes
and PiSSA quantizes the residual, so generate / merge (nl.load_model_for_adapter) rebuild that base
from the dense source. Checked against nl.loftq_init / nl.pissa_init on the dense weights (every
target's codes), against generate's streamed tokens and merge's logits, and against the plain
NF4 base + adapter (which gives other logits: the reason to rebuild)."""
import json

import pytest
import torch

import nf4lora as nl
from nf4lora.cli import main

from .tiny_lm import save_tiny_model

pytest.importorskip("transformers", reason="loading models needs transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def _finetune(tmp_path, tiny, init):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"say {i}", "response": f"{i} {i}"}) for i in range(16)))
    out = tmp_path / f"out-{init}"
    assert main(["finetune", "--model", str(tiny), "--data", str(data), "--output-dir", str(out), "--steps", "2",
                 "--seq-len", "40", "--lr", "5e-2", "--quiet", "--max-eval", "2", "--init", init, "--loftq-iter", "2", "--r", "4",
                 "--save-every", "0"]) == 0
    return out / "adapter"


def _targets(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nl.LoraLinear)}


@pytest.mark.parametrize("init", ["loftq", "pissa"])
def test_rebuilt_base_is_the_one_the_init_made(tmp_path, tiny, init):
    adapter = _finetune(tmp_path, tiny, init)
    config, tensors = nl.read_adapter(adapter)
    from nf4lora.loading.adapter_base import adapter_base_init
    assert adapter_base_init(adapter) == {"init": init, "loftq_iter": 2}
    model, _ = nl.load_model_for_adapter(tiny, adapter)
    dense, _ = nl.load_model(tiny, quantize=None)
    dense_linears = dict(dense.named_modules())
    layers = _targets(model)
    assert len(layers) == 14  # 7 linears x 2 layers
    s = config.lora_alpha / config.r
    for name, layer in layers.items():
        w = dense_linears[name].weight
        if init == "loftq":
            expected_packed = nl.loftq_init(w, config.r, s, 2).packed
        else:
            residual = nl.pissa_init(w, config.r, s)[2]
            expected_packed = nl.quantize_4bit(residual.to(w.dtype).contiguous(), 64, "nf4", True)[0]
        assert torch.equal(layer.base_layer.weight.view(torch.uint8), expected_packed.view(torch.uint8)), name
        plain = nl.quantize_4bit(w.contiguous(), 64, "nf4", True)[0]
        assert not torch.equal(layer.base_layer.weight.view(torch.uint8), plain.view(torch.uint8)), name
        # the trained A, B, not the initial ones
        key = f"base_model.model.{name}.lora_A.weight"
        torch.testing.assert_close(layer.lora_A["default"].weight.detach().float(), tensors[key].float())

    naive, _ = nl.load_model(tiny)
    naive = nl.load_adapter(naive, adapter)
    x = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        ours, plain_logits = model(x).logits.float(), naive(x).logits.float()
    assert (ours - plain_logits).abs().max() > 1e-2   # the plain base is not the trained one


def test_generate_and_merge_use_the_rebuilt_base(tmp_path, tiny, capsys):
    adapter = _finetune(tmp_path, tiny, "loftq")
    model, tok = nl.load_model_for_adapter(tiny, adapter)
    model.eval()
    capsys.readouterr()
    assert main(["generate", "say 3", "--model", str(tiny), "--adapter", str(adapter), "--max-new-tokens", "10"]) == 0
    streamed = capsys.readouterr().out
    ids = tok.apply_chat_template([{"role": "user", "content": "say 3"}], tokenize=True,
                                  add_generation_prompt=True)["input_ids"]
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert streamed.strip() == tok.decode(gen[0, len(ids):], skip_special_tokens=True).strip()

    from transformers import AutoModelForCausalLM
    assert main(["merge", "--model", str(tiny), "--adapter", str(adapter), "--output-dir", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    naive = nl.load_adapter(nl.load_model(tiny)[0], adapter).eval()
    x = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        ref, m, n = model(x).logits.float(), merged(x).logits.float(), naive(x).logits.float()
    err, naive_err = (m - ref).abs().max(), (n - ref).abs().max()
    assert err <= 5e-2 * ref.abs().max()     # bf16 merge of the rebuilt base + adapter
    assert err < naive_err / 2


def test_loftq_adapter_needs_a_quantized_base(tmp_path, tiny):
    adapter = _finetune(tmp_path, tiny, "loftq")
    with pytest.raises(ValueError, match="4-bit base"):
        nl.load_model_for_adapter(tiny, adapter, quantize=None)
