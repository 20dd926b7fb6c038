"""nf4lora.generate.generate_tokens against transformers' generate() on the same 4-bit model: every
step's fp32 logits bit for bit and the tokens, greedy, with a LoRA adapter, stopping at the end of
sequence; bad arguments. The speed is bench/bench_generate.py's job."""
import pytest
import torch

import nf4lora as nl
from nf4lora.generate import generate_tokens
from nf4lora.loading import load_model
from tests.tiny_lm import save_tiny_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_model(tiny_folder):
    return load_model(tiny_folder)


def _reference(model, ids, n, eos):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=eos, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), [x.float() for x in out.logits]


@pytest.mark.parametrize("prompt", [[5], [1, 2, 3], list(range(40, 97))])
@pytest.mark.parametrize("adapter", [False, True])
def test_greedy_equals_transformers_generate(tiny_model, tiny_folder, prompt, adapter):
    model, _ = tiny_model
    if adapter:
        model = nl.get_lora_model(load_model(tiny_folder)[0], nl.LoraConfig(r=4, lora_alpha=8))
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():  # a non-zero adapter, so that it takes part
            if p.requires_grad:
                p.data.normal_(0, 0.05, generator=g)
    ref_ids, ref_logits = _reference(model, prompt, 20, eos=None)
    logits = []
    ids = generate_tokens(model, prompt, 20, eos_token_id=[], on_logits=logits.append)
    assert ids == ref_ids and len(ids) == 20
    assert len(logits) == len(ref_logits)
    for a, b in zip(logits, ref_logits):
        assert torch.equal(a, b)


def test_stops_after_end_of_sequence(tiny_model):
    model, _ = tiny_model
    free = generate_tokens(model, [7, 8, 9], 12, eos_token_id=[])
    eos = free[4]
    ref_ids, _ = _reference(model, [7, 8, 9], 12, eos=eos)
    ids = generate_tokens(model, [7, 8, 9], 12, eos_token_id=eos)
    assert ids == ref_ids == free[: free.index(eos) + 1]


def test_bad_arguments(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError, match="input_ids"):
        generate_tokens(model, [], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_tokens(model, [1], 0)
    with pytest.raises(ValueError, match="temperature"):
        generate_tokens(model, [1], 3, temperature=-1.0)


def _count_llama_steps(monkeypatch):
    from nf4lora import generate as gen
    calls = []
    original = gen._LlamaStep.__call__

    def counted(self, token, pos):
        calls.append(pos)
        return original(self, token, pos)
    monkeypatch.setattr(gen._LlamaStep, "__call__", counted)
    return calls


@pytest.mark.parametrize("adapter", [False, True])
def test_llama_decode_step_is_used_and_equals_the_model_forward(tiny_model, tiny_folder, monkeypatch, adapter):
    """The Llama decode step (generate.py's _LlamaStep) runs for a transformers Llama and gives the
    logits of the model's own forward loop (LLAMA_DECODE_STEP off) and of generate(), bit for bit."""
    from nf4lora import generate as gen
    model, _ = tiny_model
    if adapter:
        model = nl.get_lora_model(load_model(tiny_folder)[0], nl.LoraConfig(r=4, lora_alpha=8))
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.05, generator=g)
    prompt = list(range(3, 30))
    calls = _count_llama_steps(monkeypatch)
    fast_logits = []
    fast = generate_tokens(model, prompt, 24, eos_token_id=[], on_logits=fast_logits.append)
    assert calls == list(range(len(prompt), len(prompt) + 23))  # every step after the prompt's
    monkeypatch.setattr(gen, "LLAMA_DECODE_STEP", False)
    calls.clear()
    slow_logits = []
    slow = generate_tokens(model, prompt, 24, eos_token_id=[], on_logits=slow_logits.append)
    assert calls == [] and fast == slow
    ref_ids, ref_logits = _reference(model, prompt, 24, eos=None)
    assert fast == ref_ids
    for a, b, c in zip(fast_logits, slow_logits, ref_logits):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_llama_decode_step_falls_back_for_other_attention(tiny_folder, monkeypatch):
    model, _ = load_model(tiny_folder)
    model.config._attn_implementation = "eager"
    calls = _count_llama_steps(monkeypatch)
    ids = generate_tokens(model, [4, 5, 6], 6, eos_token_id=[])
    assert calls == [] and ids == _reference(model, [4, 5, 6], 6, eos=None)[0]


def test_default_model_greedy_equals_transformers_generate():
    """The default SmolLM2-135M GGUF, several chat prompts: the decode step's tokens are
    transformers generate()'s (the speed that matters is this model's; bench/bench_generate.py)."""
    from nf4lora.train.data import format_prompt
    model, tok = load_model(None)
    for text in ("Write a short story about a robot learning to paint.", "What is the capital of France?",
                 "List three prime numbers."):
        ids = format_prompt(tok, text)
        ref, _ = _reference(model, ids, 24, eos=None)
        assert generate_tokens(model, ids, 24, eos_token_id=[]) == ref
