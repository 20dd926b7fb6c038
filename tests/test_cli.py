"""The nf4lora command line, in process (cli.main): finetune writes adapter/metrics/PNG and reports
bad input with exit status 2 and the line number; generate streams exactly the tokens of a greedy
model.generate with base + adapter; merge's bf16 checkpoint gives (to bf16 rounding) the adapted
4-bit model's logits in transformers, and its 4-bit checkpoint equals that bf16 merge quantized on
load and loads in transformers + bitsandbytes with the same codes; inspect's totals add up from the model's own tensors."""
import json

import pytest
import torch

import nf4lora as nl
from nf4lora.cli import main
from nf4lora.loading import load_model

from .tiny_lm import save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny):
    """A tiny model fine-tuned for 2 steps through the CLI: (model folder, output folder)."""
    d = tmp_path_factory.mktemp("run")
    data = d / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"say {i}", "response": f"{i} {i} {i}"}) for i in range(20)))
    out = d / "out"
    assert main(["finetune", "--model", str(tiny), "--data", str(data), "--output-dir", str(out), "--steps", "2",
                 "--seq-len", "48", "--lr", "5e-2", "--quiet", "--max-eval", "4"]) == 0
    return tiny, out


def test_finetune_outputs(trained):
    _, out = trained
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["eval_before"]["tokens"] > 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("checkpoint-*"))  # finished: periodic checkpoints are not needed


def test_finetune_bad_input(tmp_path, tiny, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    args = ["finetune", "--model", str(tiny), "--data", str(bad), "--output-dir", str(tmp_path / "o"), "--quiet"]
    assert main(args) == 2
    assert "bad.jsonl:2:" in capsys.readouterr().err
    assert main(args[:-1] + ["--seq-len", "4096", "--quiet"]) == 2
    assert "larger than the model's 256 positions" in capsys.readouterr().err
    assert main(["finetune", "--model", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_streams_greedy_tokens(trained, capsys):
    tiny, out = trained
    assert main(["generate", "say 3", "--model", str(tiny), "--adapter", str(out / "adapter"),
                 "--max-new-tokens", "12"]) == 0
    streamed = capsys.readouterr().out
    model, tok = load_model(tiny)
    model = nl.load_adapter(model, out / "adapter").eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "say 3"}], tokenize=True,
                                  add_generation_prompt=True)["input_ids"]
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    expected = tok.decode(gen[0, len(ids):], skip_special_tokens=True)
    assert streamed.strip() == expected.strip()


def test_merge_bf16_and_4bit(tmp_path, trained):
    tiny, out = trained
    from transformers import AutoModelForCausalLM
    model, _ = load_model(tiny)
    model = nl.load_adapter(model, out / "adapter").eval()
    x = torch.randint(0, 259, (2, 10))
    with torch.no_grad():
        ours = model(x).logits.float()

    assert main(["merge", "--model", str(tiny), "--adapter", str(out / "adapter"), "--output-dir",
                 str(tmp_path / "bf16")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).eval()
    assert dense.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        merged = dense(x).logits.float()
    assert (merged - ours).abs().max() <= 5e-2 * ours.abs().max()  # bf16 weights vs 4-bit + fp32 adapter

    assert main(["merge", "--model", str(tiny), "--adapter", str(out / "adapter"), "--output-dir",
                 str(tmp_path / "nf4"), "--format", "nf4"]) == 0
    ours4, _ = load_model(tmp_path / "nf4")  # loaded as is, no requantization
    requantized, _ = load_model(tmp_path / "bf16", quantize="nf4")  # the bf16 merge, quantized on load
    with torch.no_grad():
        logits4 = ours4(x).logits.float()
        assert torch.equal(logits4, requantized(x).logits.float())
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: cannot load the 4-bit export")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "nf4"))
    q = theirs.model.layers[0].mlp.down_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    assert torch.equal(q.weight.data.view(torch.uint8).flatten(),
                       ours4.model.layers[0].mlp.down_proj.weight.view(torch.uint8).flatten())
    theirs.train()
    with torch.no_grad():
        assert (theirs(x).logits.float() - logits4).abs().max() <= 2e-2 * logits4.abs().max()


def test_inspect_totals(tiny, capsys):
    assert main(["inspect", "--model", str(tiny), "--json", "--r", "8"]) == 0
    rep = json.loads(capsys.readouterr().out)
    model, _ = load_model(tiny)
    four = [m for m in model.modules() if isinstance(m, nl.Linear4bit)]
    assert sum(x["bytes"] for x in rep["layers"] if x["kind"] == "4-bit") == sum(m.quant_state.nbytes for m in four)
    assert rep["adapter_params"] == sum(8 * (m.in_features + m.out_features) for m in four)
    dense_params = sum(p.numel() for p in model.parameters() if p.dtype != torch.uint8)
    assert rep["bf16_base_bytes"] == 2 * (dense_params + sum(m.in_features * m.out_features for m in four))
    # Independent totals: from the dense model's own tensors and the format's definition (NF4
    # block 64: N*K/2 code bytes; double quant: one uint8 absmax per block, one fp32 nested absmax
    # per 256 blocks, an fp32 offset, the 16- and 256-entry fp32 code tables), not from QuantState.
    dense, _ = load_model(tiny, quantize=None)
    linears = {n: m for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert len(linears) == len(four) == 14  # 2 layers x 7 projections
    blocks = {n: -(-m.weight.numel() // 64) for n, m in linears.items()}
    four_bytes = sum(-(-m.weight.numel() // 2) + blocks[n] + 4 * -(-blocks[n] // 256) + 4 + 4 * 16 + 4 * 256
                     for n, m in linears.items())
    linear_weights = {id(m.weight) for m in linears.values()}
    others = [p for p in dense.parameters() if id(p) not in linear_weights]
    buffers = sum(b.numel() * b.element_size() for b in dense.buffers())
    dense_bytes = sum(2 * p.numel() for p in others)  # bf16 (compute dtype)
    adapters = sum(8 * (m.in_features + m.out_features) for m in linears.values())
    weights = sum(p.numel() for p in dense.parameters())
    assert sum(x["bytes"] for x in rep["layers"] if x["kind"] == "4-bit") == four_bytes
    assert rep["base_bytes"] == four_bytes + dense_bytes + buffers
    assert rep["bf16_base_bytes"] == 2 * weights
    assert rep["adapter_params"] == adapters and rep["adapter_bytes"] == 4 * adapters
    assert rep["optimizer_bytes"] == 8 * adapters
    assert rep["total_training_bytes"] == four_bytes + dense_bytes + buffers + 16 * adapters
    assert main(["inspect", "--model", str(tiny)]) == 0
    text = capsys.readouterr().out
    assert "q_proj" in text and "bf16 would need" in text


def test_device_flag_on_the_cpu(tmp_path, trained, capsys):
    """--device cpu is what the default does on this machine; a malformed device and a GPU that is
    not there end with exit status 2 and say why, before anything is loaded."""
    tiny, out = trained
    gen = ["generate", "say 3", "--model", str(tiny), "--adapter", str(out / "adapter"), "--max-new-tokens", "8"]
    assert main(gen) == 0
    default = capsys.readouterr().out
    assert main(gen + ["--device", "cpu"]) == 0
    assert capsys.readouterr().out == default
    assert main(["inspect", "--model", str(tiny), "--json", "--device", "cpu"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["device"] == "cpu" and "device_allocated_bytes" not in rep
    assert main(["finetune", "--model", str(tiny), "--output-dir", str(tmp_path / "o"), "--device", "gpu",
                 "--quiet"]) == 2
    assert "device must be auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        for cmd in (["finetune", "--output-dir", str(tmp_path / "o"), "--quiet"], ["merge", "--adapter",
                    str(out / "adapter"), "--output-dir", str(tmp_path / "m")], ["inspect"], gen[:2]):
            assert main(cmd + ["--model", str(tiny), "--device", "cuda:0"]) == 2, cmd
            assert "device cuda:0: torch sees no CUDA GPU" in capsys.readouterr().err, cmd
        assert not (tmp_path / "m").exists() and not (tmp_path / "o").exists()


HAS_GPU = torch.cuda.is_available() and nl.has_cuda()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and an nf4lora build with CUDA kernels "
                    f"(torch.cuda.is_available()={torch.cuda.is_available()}, nf4lora.has_cuda()={nl.has_cuda()})")
def test_generate_merge_inspect_on_cuda(tmp_path, trained, capsys):
    """generate runs on the GPU; inspect reports the GPU's bytes (at least the 4-bit base); merge
    computes there and writes CPU tensors whose model gives the CPU merge's logits (to bf16 rounding)."""
    tiny, out = trained
    assert main(["generate", "say 3", "--model", str(tiny), "--adapter", str(out / "adapter"),
                 "--max-new-tokens", "8", "--device", "cuda"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["inspect", "--model", str(tiny), "--json", "--device", "cuda"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["device"].startswith("cuda") and rep["device_allocated_bytes"] >= rep["base_bytes"]
    x = torch.randint(0, 259, (2, 10))
    logits = {}
    for dev in ("cpu", "cuda"):
        for fmt in ("bf16", "nf4"):
            d = tmp_path / f"{dev}-{fmt}"
            assert main(["merge", "--model", str(tiny), "--adapter", str(out / "adapter"), "--output-dir", str(d),
                         "--format", fmt, "--device", dev]) == 0
            with torch.no_grad():
                logits[dev, fmt] = load_model(d, quantize="nf4" if fmt == "nf4" else None)[0].eval()(x).logits.float()
    for fmt in ("bf16", "nf4"):
        ref = logits["cpu", fmt]
        assert (logits["cuda", fmt] - ref).abs().max() <= 2e-2 * ref.abs().max(), fmt
