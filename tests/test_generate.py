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
    """Records (step class name, position) for every call of a Llama decode step."""
    from nf4lora import generate as gen
    calls = []
    for cls in (gen._LlamaStep, gen._NativeLlamaStep):
        original = cls.__call__

        def counted(self, token, pos, _original=original, _name=cls.__name__):
            calls.append((_name, pos))
            return _original(self, token, pos)
        monkeypatch.setattr(cls, "__call__", counted)
    return calls


def _randomize_adapters(model, seed: int, std: float) -> None:
    """Every trainable (adapter) parameter from N(0, std): LoRA's B starts at 0, so that every term counts."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.data.copy_(torch.randn(p.shape, generator=g) * std)


def _assert_native_equals_python_step(monkeypatch, model, ids, n, calls=None):
    """generate_tokens with the native step, then with the Python step (NATIVE_DECODE_STEP off):
    the same tokens and every logit bit for bit; with `calls` (_count_llama_steps), which step ran."""
    from nf4lora import generate as gen
    runs = []
    for native in (True, False):
        monkeypatch.setattr(gen, "NATIVE_DECODE_STEP", native)
        if calls is not None:
            calls.clear()
        logits = []
        runs.append((generate_tokens(model, ids, n, eos_token_id=[], on_logits=logits.append), logits))
        if calls is not None:
            assert {c[0] for c in calls} == {"_NativeLlamaStep" if native else "_LlamaStep"}
    monkeypatch.setattr(gen, "NATIVE_DECODE_STEP", True)
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("adapter", [False, True])
def test_llama_decode_step_is_used_and_equals_the_model_forward(tiny_model, tiny_folder, monkeypatch, adapter):
    """The Llama decode step runs for a transformers Llama (native layers for 4-bit projections,
    bare or under a LoRA adapter) and gives the logits of the model's own forward loop
    (LLAMA_DECODE_STEP off) and of generate(), bit for bit."""
    from nf4lora import generate as gen
    model, _ = tiny_model
    if adapter:
        model = nl.get_lora_model(load_model(tiny_folder)[0], nl.LoraConfig(r=4, lora_alpha=8))
        _randomize_adapters(model, 1, 0.05)
    prompt = list(range(3, 30))
    calls = _count_llama_steps(monkeypatch)
    fast_logits = []
    fast = generate_tokens(model, prompt, 24, eos_token_id=[], on_logits=fast_logits.append)
    assert calls == [("_NativeLlamaStep", p) for p in range(len(prompt), len(prompt) + 23)]  # every step after the prompt's
    monkeypatch.setattr(gen, "LLAMA_DECODE_STEP", False)
    calls.clear()
    slow_logits = []
    slow = generate_tokens(model, prompt, 24, eos_token_id=[], on_logits=slow_logits.append)
    assert calls == [] and fast == slow
    ref_ids, ref_logits = _reference(model, prompt, 24, eos=None)
    assert fast == ref_ids
    for a, b, c in zip(fast_logits, slow_logits, ref_logits):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("quantize,double_quant,blocksize", [("nf4", True, 64), ("fp4", False, 128),
                                                             ("nf4", False, 32)])
@pytest.mark.parametrize("shape", [dict(), dict(num_key_value_heads=4), dict(hidden_size=96, num_attention_heads=3,
                                                                              num_key_value_heads=1,
                                                                              intermediate_size=160)])
def test_native_decode_step_equals_the_python_step(tmp_path, monkeypatch, quantize, double_quant, blocksize, shape):
    """The native layers (nf4lora/decode.h) against _LlamaStep's torch operations, bit for bit in
    every logit: NF4 and FP4, double-quantized and plain scales, blocksizes 32-128, grouped and
    plain attention, odd head counts, one and two threads."""
    from nf4lora import generate as gen
    folder = save_tiny_model(tmp_path / "m", seed=3, **shape)
    model, _ = load_model(folder, quantize=quantize, double_quant=double_quant, blocksize=blocksize)
    assert gen._NativeLlamaStep.supports_native(model)
    calls = _count_llama_steps(monkeypatch)
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        _assert_native_equals_python_step(monkeypatch, model, list(range(10, 50)), 30, calls)


def test_native_decode_step_applies_only_to_what_it_computes(tiny_folder):
    """fp32 compute, a dense projection, a bias, a DoRA or disabled adapter: the Python step,
    which runs the modules themselves. A plain LoRA adapter: the native step."""
    from nf4lora import generate as gen
    from nf4lora.quant.linear import Linear4bit
    assert not gen._NativeLlamaStep.supports_native(load_model(tiny_folder, compute_dtype=torch.float32)[0])
    assert not gen._NativeLlamaStep.supports_native(load_model(tiny_folder, quantize=None)[0])
    model = load_model(tiny_folder)[0]
    assert gen._NativeLlamaStep.supports_native(model)
    proj = model.model.layers[1].mlp.down_proj
    assert type(proj) is Linear4bit
    proj.bias = torch.nn.Parameter(torch.zeros(proj.out_features, dtype=torch.bfloat16))
    assert not gen._NativeLlamaStep.supports_native(model)
    lora = nl.get_lora_model(load_model(tiny_folder)[0], nl.LoraConfig(r=4, lora_alpha=8))
    assert gen._NativeLlamaStep.supports_native(lora)
    lora.model.layers[0].self_attn.v_proj.disabled = True
    assert not gen._NativeLlamaStep.supports_native(lora)
    dora = nl.get_lora_model(load_model(tiny_folder)[0], nl.LoraConfig(r=4, lora_alpha=8, use_dora=True))
    assert not gen._NativeLlamaStep.supports_native(dora)


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj"], ["down_proj"], ["o_proj", "gate_proj", "k_proj"]])
def test_native_decode_step_with_adapters_equals_the_python_step(tmp_path, monkeypatch, targets):
    """LoRA adapters on all or some projections (fp32 adapters, and bf16 ones): the native
    layers in segments with each adapter's term added between them, against the Python step
    (LoraLinear's own forward), bit for bit in every logit, one and two threads."""
    from nf4lora import generate as gen
    folder = save_tiny_model(tmp_path / "m", seed=3, num_key_value_heads=1)
    calls = _count_llama_steps(monkeypatch)
    for adapter_dtype in (torch.float32, torch.bfloat16):
        config = nl.LoraConfig(r=4, lora_alpha=8) if targets is None else nl.LoraConfig(
            r=4, lora_alpha=8, target_modules=targets)
        model = nl.get_lora_model(load_model(folder)[0], config, adapter_dtype=adapter_dtype)
        _randomize_adapters(model, 1, 0.05)
        assert gen._NativeLlamaStep.supports_native(model)
        for threads in (1, 2):
            monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
            _assert_native_equals_python_step(monkeypatch, model, list(range(10, 50)), 24, calls)


def test_native_decoder_rejects_bad_layers(tiny_model):
    """ops.decode.LlamaDecoder checks every layer once (Python: dtypes and the weights; native:
    every shape) and each call's layer and position: a ValueError naming the problem, never a
    crash."""
    from nf4lora import generate as gen
    from nf4lora.ops.decode import LlamaDecoder
    model, _ = tiny_model
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
        step = gen._NativeLlamaStep(model, out.past_key_values, 3, 8)
    cfg = model.config
    shape = dict(hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                 head_dim=step.head_dim, intermediate=cfg.intermediate_size, max_len=8, norm_eps=1e-5)
    layers = step.native_layers()
    LlamaDecoder(**shape, layers=layers)
    swapped = [dict(e) for e in layers]
    swapped[1]["q"], swapped[1]["v"] = swapped[1]["v"], swapped[1]["q"]
    with pytest.raises(ValueError, match="layer 1 q_proj: expected a"):
        LlamaDecoder(**shape, layers=swapped)
    fp32 = [dict(e) for e in layers]
    fp32[0]["post_norm"] = fp32[0]["post_norm"].float()
    with pytest.raises(ValueError, match="layer 0 post_norm: expected a contiguous bfloat16 CPU tensor"):
        LlamaDecoder(**shape, layers=fp32)
    with pytest.raises(ValueError, match="must divide heads"):
        LlamaDecoder(**dict(shape, kv_heads=3), layers=layers)
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        LlamaDecoder(**shape, layers=[])
    h = torch.zeros(1, 1, cfg.hidden_size, dtype=torch.bfloat16)
    seg = step.native.segments
    with pytest.raises(ValueError, match="pos must be in"):
        seg(-1, "qkv", "rope", None, h, step.cos[0], step.sin[0], 8)
    with pytest.raises(ValueError, match="layer must be in"):
        seg(2, "o_proj", "residual", step.q, h, step.cos[0], step.sin[0], 0)
    with pytest.raises(ValueError, match="unknown segment 'mlp'"):
        seg(0, "o_proj", "mlp", step.q, h, step.cos[0], step.sin[0], 0)
    with pytest.raises(ValueError, match="first <= last"):
        seg(0, "down", "o_proj", step.q, h, step.cos[0], step.sin[0], 0)
    with pytest.raises(ValueError, match="layer -1 has no segment before kQkv"):
        seg(-1, "residual", "rope", None, h, step.cos[0], step.sin[0], 0)
    with pytest.raises(ValueError, match="is the last: no segment after kResidual"):
        seg(1, "down", "qkv", None, h, step.cos[0], step.sin[0], 0)
    with pytest.raises(ValueError, match="att must not be null"):
        seg(0, "o_proj", "o_proj", None, h, step.cos[0], step.sin[0], 0)


def test_torch_bf16_silu_is_the_correctly_rounded_formula():
    """decode_llama.cpp's SiLU table is x / (1 + exp(-x)) in fp32 with a correctly rounded exp,
    rounded to bf16: torch's bf16 silu gives the same value for every one of the 65,536 inputs
    (NaNs aside), which is what lets the native step equal the Python step."""
    import numpy as np
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    xf = x.float().numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(-xf.astype(np.float64)).astype(np.float32)
        formula = torch.from_numpy((xf / (np.float32(1) + e)).astype(np.float32)).to(torch.bfloat16)
    silu = torch.nn.functional.silu(x)
    both_nan = silu.isnan() & formula.isnan()
    assert torch.equal(silu[~both_nan].view(torch.int16), formula[~both_nan].view(torch.int16))


def test_llama_decode_step_falls_back_for_other_attention(tiny_folder, monkeypatch):
    model, _ = load_model(tiny_folder)
    model.config._attn_implementation = "eager"
    calls = _count_llama_steps(monkeypatch)
    ids = generate_tokens(model, [4, 5, 6], 6, eos_token_id=[])
    assert calls == [] and ids == _reference(model, [4, 5, 6], 6, eos=None)[0]


def test_default_model_native_step_equals_the_python_step(monkeypatch):
    """The default SmolLM2-135M GGUF (30 layers, GQA 9/3, the model the speed is measured on):
    the native step's logits equal the Python step's bit for bit over 96 tokens of three chat
    prompts, the greedy output included."""
    from nf4lora import generate as gen
    from nf4lora.train.data import format_prompt
    model, tok = load_model(None)
    assert gen._NativeLlamaStep.supports_native(model)
    for text in ("Write a short story about a robot learning to paint.", "What is the capital of France?",
                 "Explain gradient descent."):
        _assert_native_equals_python_step(monkeypatch, model, format_prompt(tok, text), 96)


def test_default_model_native_step_with_an_adapter_equals_the_python_step(monkeypatch):
    """The default SmolLM2-135M GGUF with a random rank-8 LoRA adapter on every projection (what
    `nf4lora generate --adapter` runs after training): native segments with the adapters' terms
    between them against LoraLinear's own forward, every logit bit for bit over 48 tokens."""
    from nf4lora import generate as gen
    from nf4lora.train.data import format_prompt
    model, tok = load_model(None)
    model = nl.get_lora_model(model, nl.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    _randomize_adapters(model, 2, 0.02)
    assert gen._NativeLlamaStep.supports_native(model)
    _assert_native_equals_python_step(monkeypatch, model, format_prompt(tok, "Explain gradient descent."), 48)


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
