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
