"""nf4lora.train (the finetune loop) on a tiny random Llama: load -> quantize -> LoRA -> 3 steps -> save -> reload gives
the same logits; a run stopped by Ctrl-C or killed, then resumed, ends with the uninterrupted run's
adapter bit for bit; resuming with other options is refused with the differences; a failing
checkpoint write leaves the previous one intact; 2 gloo processes (torchrun) give the 1-process
adapter (the loss PNG: tests/test_plot.py)."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import nf4lora as nl
from nf4lora.train import loop as T
from nf4lora.loading import load_model

from .tiny_lm import save_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "d.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}."} for i in range(40)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def _opts(tiny, jsonl, out, **kw):
    base = dict(model=str(tiny), data=str(jsonl), output_dir=str(out), steps=6, batch_size=4, grad_accum=2,
                seq_len=64, lr=1e-2, warmup_steps=1, quiet=True, max_eval=8, lora_dropout=0.1)
    base.update(kw)
    return T.TrainOptions(**base)


def _adapter(out):
    from safetensors.torch import load_file
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_save_reload_same_logits(tmp_path, tiny, jsonl):
    model, tok = load_model(tiny)
    metrics = T.finetune(_opts(tiny, jsonl, tmp_path / "o", steps=3), model=model, tokenizer=tok)
    assert metrics["steps"] == 3 and len(metrics["history"]) == 3
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]  # lr 1e-2 on a trivial pattern
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert saved["eval_after"] == metrics["eval_after"]
    assert any(v.abs().sum() > 0 for k, v in _adapter(tmp_path / "o").items() if "lora_B" in k)  # it trained
    # The trained model as finetune leaves it vs the base reloaded from disk + the saved adapter.
    reloaded = nl.load_adapter(load_model(tiny)[0], tmp_path / "o" / "adapter").eval()
    model.eval()
    x = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        y = model(x).logits
        assert torch.equal(reloaded(x).logits, y)
        assert not torch.equal(load_model(tiny)[0](x).logits, y)  # and the adapter does change the output


def test_interrupt_and_kill_then_resume_is_exact(tmp_path, tiny, jsonl):
    T.finetune(_opts(tiny, jsonl, tmp_path / "full"))
    full = _adapter(tmp_path / "full")

    def ctrl_c(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.finetune(_opts(tiny, jsonl, tmp_path / "cut"), on_step=ctrl_c)
    assert (tmp_path / "cut" / "checkpoint-3").is_dir()
    T.finetune(_opts(tiny, jsonl, tmp_path / "cut", resume="latest"))
    _same(_adapter(tmp_path / "cut"), full)

    def killed(step):
        if step == 5:
            raise RuntimeError("killed")  # no final checkpoint: the periodic one at step 4 remains

    with pytest.raises(RuntimeError, match="killed"):
        T.finetune(_opts(tiny, jsonl, tmp_path / "kill", save_every=2), on_step=killed)
    assert sorted(p.name for p in (tmp_path / "kill").glob("checkpoint-*")) == ["checkpoint-4"]
    T.finetune(_opts(tiny, jsonl, tmp_path / "kill", save_every=2, resume="latest"))
    _same(_adapter(tmp_path / "kill"), full)


def test_resume_with_other_options_is_refused(tmp_path, tiny, jsonl):
    with pytest.raises(KeyboardInterrupt):
        T.finetune(_opts(tiny, jsonl, tmp_path / "o"), on_step=lambda s: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(ValueError, match=r"(?s)other options.*lr: checkpoint 0.01, now 0.02.*seed: checkpoint 0, now 1"):
        T.finetune(_opts(tiny, jsonl, tmp_path / "o", lr=2e-2, seed=1, resume="latest"))
    with pytest.raises(ValueError, match="no checkpoint"):
        T.finetune(_opts(tiny, jsonl, tmp_path / "none", resume="latest"))


def test_failed_checkpoint_keeps_the_previous(tmp_path, tiny, jsonl, monkeypatch):
    real_save = torch.save
    calls = []

    def full_disk(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(T.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        T.finetune(_opts(tiny, jsonl, tmp_path / "o", save_every=2))
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["checkpoint-2"]  # no temp folder left behind, step 2 intact
    state = torch.load(tmp_path / "o" / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    monkeypatch.setattr(T.torch, "save", real_save)
    T.finetune(_opts(tiny, jsonl, tmp_path / "o", save_every=2, resume="latest"))
    T.finetune(_opts(tiny, jsonl, tmp_path / "ref", save_every=2))
    _same(_adapter(tmp_path / "o"), _adapter(tmp_path / "ref"))


def test_bad_options(tmp_path, tiny, jsonl):
    with pytest.raises(ValueError, match="seq_len 100000 is larger than the model's 256 positions"):
        T.finetune(_opts(tiny, jsonl, tmp_path / "o", seq_len=100000))
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        T.finetune(_opts(tiny, jsonl, tmp_path / "o", batch_size=3, grad_accum=2))
    with pytest.raises(ValueError, match="schedule"):
        T.finetune(_opts(tiny, jsonl, tmp_path / "o", schedule="step"))


def test_ddp_two_processes_match_one(tmp_path, tiny, jsonl):
    """2 gloo processes with a global batch of 4 (2 each) vs 1 process with 2 x 2 accumulation:
    the same micro-batches, so the adapters agree to float rounding of the gradient sum."""
    common = ["--model", str(tiny), "--data", str(jsonl), "--steps", "3", "--batch-size", "4", "--seq-len", "64",
              "--lr", "1e-2", "--quiet", "--no-bf16", "--max-eval", "4", "--save-every", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "nf4lora", "finetune", "--output-dir", str(tmp_path / "ddp"), "--grad-accum", "1"]
                   + common, check=True, env=env, capture_output=True, timeout=300)
    T.finetune(_opts(tiny, jsonl, tmp_path / "one", steps=3, batch_size=4, grad_accum=2, seq_len=64, lr=1e-2,
                     bf16=False, max_eval=4, warmup_steps=3, lora_dropout=0.0))
    a, b = _adapter(tmp_path / "ddp"), _adapter(tmp_path / "one")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)


def test_resume_accepts_checkpoints_from_before_an_option_existed(tmp_path):
    """A checkpoint written before `init` / `loftq_iter` existed resumes when they have their
    defaults now, and is refused when they do not."""
    opts = T.TrainOptions(output_dir=str(tmp_path))
    saved = dataclasses.asdict(opts)
    del saved["init"], saved["loftq_iter"]
    (tmp_path / T._OPTIONS_FILE).write_text(json.dumps(saved))
    T._check_resume_options(tmp_path, opts)
    with pytest.raises(ValueError, match="init: checkpoint 'kaiming', now 'pissa'"):
        T._check_resume_options(tmp_path, T.TrainOptions(output_dir=str(tmp_path), init="pissa"))


HAS_GPU = torch.cuda.is_available() and nl.has_cuda()
needs_gpu = pytest.mark.skipif(
    not HAS_GPU, reason="needs a CUDA GPU and an nf4lora build with CUDA kernels "
    f"(torch.cuda.is_available()={torch.cuda.is_available()}, nf4lora.has_cuda()={nl.has_cuda()})")


def _metrics(m):
    return m["history"], m["eval_before"], m["eval_after"]


@pytest.mark.skipif(HAS_GPU, reason="auto means CUDA on this machine (compared with the CPU in test_cuda_*)")
def test_device_auto_is_the_cpu_path_here(tmp_path, tiny, jsonl):
    """Without a usable GPU, --device auto is --device cpu: the same losses and adapter, bit for bit."""
    a = T.finetune(_opts(tiny, jsonl, tmp_path / "auto", steps=3, device="auto"))
    c = T.finetune(_opts(tiny, jsonl, tmp_path / "cpu", steps=3, device="cpu"))
    assert _metrics(a) == _metrics(c)
    _same(_adapter(tmp_path / "auto"), _adapter(tmp_path / "cpu"))
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        T.finetune(_opts(tiny, jsonl, tmp_path / "bad", device="gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda: torch sees no CUDA GPU"):
            T.finetune(_opts(tiny, jsonl, tmp_path / "bad", device="cuda"))


def _as_if_saved_on(path, location, cuda_rng):
    """Rewrites a trainer_state.pt as a run on `location` (e.g. cuda:0) would have written it: every
    tensor's storage tagged with that device (torch.save's location tags), and a CUDA RNG state."""
    state = torch.load(path, weights_only=True)
    for r in state["rng"]:
        r["cuda"] = cuda_rng
    real = torch.serialization.location_tag
    try:
        torch.serialization.location_tag = lambda storage: location
        torch.save(state, path)
    finally:
        torch.serialization.location_tag = real


def test_resume_across_a_simulated_device_change(tmp_path, tiny, jsonl):
    """A checkpoint whose tensors were saved on cuda:0 (simulated: the file's location tags say so,
    and it holds a CUDA RNG state) resumes here on the CPU, with another --device than it was made
    with, to the uninterrupted run's adapter bit for bit: nothing assumes the saving device."""
    T.finetune(_opts(tiny, jsonl, tmp_path / "full", steps=4))
    with pytest.raises(KeyboardInterrupt):
        T.finetune(_opts(tiny, jsonl, tmp_path / "cut", steps=4),
                   on_step=lambda s: (_ for _ in ()).throw(KeyboardInterrupt) if s == 2 else None)
    state_file = tmp_path / "cut" / "checkpoint-2" / "trainer_state.pt"
    _as_if_saved_on(state_file, "cuda:0", torch.zeros(16, dtype=torch.uint8))
    if not torch.cuda.is_available():  # the simulation is real: a plain load wants the GPU
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(state_file, weights_only=True)
    T.finetune(_opts(tiny, jsonl, tmp_path / "cut", steps=4, device="cpu", resume="latest"))
    _same(_adapter(tmp_path / "cut"), _adapter(tmp_path / "full"))


@pytest.mark.cuda
@needs_gpu
def test_cuda_run_matches_the_cpu_and_resumes_across_devices(tmp_path, tiny, jsonl):
    """On a GPU: the run trains to the CPU run's held-out loss (within 1%: bf16 rounding differs);
    a CUDA run stopped and resumed on CUDA ends with the uninterrupted CUDA adapter bit for bit; a
    CPU checkpoint resumed on CUDA and a CUDA checkpoint resumed on the CPU reach the same loss."""
    kw = dict(steps=4, lora_dropout=0.0)  # dropout masks come from each device's own generator
    stop = lambda s: (_ for _ in ()).throw(KeyboardInterrupt) if s == 2 else None  # noqa: E731
    cpu = T.finetune(_opts(tiny, jsonl, tmp_path / "cpu", device="cpu", **kw))
    gpu = T.finetune(_opts(tiny, jsonl, tmp_path / "gpu", device="cuda", **kw))
    assert abs(gpu["eval_after"]["loss"] - cpu["eval_after"]["loss"]) <= 0.01 * cpu["eval_after"]["loss"]
    before = cpu["eval_before"]["loss"]
    assert abs(gpu["eval_before"]["loss"] - before) <= 0.01 * before
    with pytest.raises(KeyboardInterrupt):
        T.finetune(_opts(tiny, jsonl, tmp_path / "g2g", device="cuda", **kw), on_step=stop)
    T.finetune(_opts(tiny, jsonl, tmp_path / "g2g", device="cuda", resume="latest", **kw))
    _same(_adapter(tmp_path / "g2g"), _adapter(tmp_path / "gpu"))
    for name, first, then in (("c2g", "cpu", "cuda"), ("g2c", "cuda", "cpu")):
        with pytest.raises(KeyboardInterrupt):
            T.finetune(_opts(tiny, jsonl, tmp_path / name, device=first, **kw), on_step=stop)
        m = T.finetune(_opts(tiny, jsonl, tmp_path / name, device=then, resume="latest", **kw))
        assert abs(m["eval_after"]["loss"] - cpu["eval_after"]["loss"]) <= 0.01 * cpu["eval_after"]["loss"], name


def test_dora_run_saves_a_dora_adapter_that_reloads(tmp_path, tiny, jsonl):
    """`nf4lora finetune --dora`: the adapter file carries PEFT's use_dora and trained magnitudes,
    and the base + that adapter reloaded gives the trained model's logits."""
    from nf4lora.cli import main
    out = tmp_path / "o"
    assert main(["finetune", "--model", str(tiny), "--data", str(jsonl), "--output-dir", str(out), "--steps", "2",
                 "--batch-size", "4", "--seq-len", "64", "--lr", "1e-2", "--max-eval", "4", "--quiet", "--dora"]) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    tensors = _adapter(out)
    magnitudes = {k: v for k, v in tensors.items() if k.endswith("lora_magnitude_vector")}
    assert magnitudes and len(magnitudes) == sum(1 for k in tensors if "lora_A" in k)
    reloaded = nl.load_adapter(load_model(tiny)[0], out / "adapter").eval()
    base = nl.merge_and_unload(nl.load_adapter(load_model(tiny)[0], out / "adapter"))
    x = torch.randint(0, 259, (2, 12))
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, base(x).logits, atol=1e-2, rtol=1e-2)
        plain = nl.load_adapter(load_model(tiny)[0], out / "adapter")
        for m in plain.modules():  # the magnitudes matter: reset to the initial norm, the output moves
            if hasattr(m, "lora_magnitude_vector"):
                for p in m.lora_magnitude_vector.parameters():
                    p.mul_(1.5)
        assert not torch.allclose(plain.eval()(x).logits, reloaded(x).logits, atol=1e-3)
