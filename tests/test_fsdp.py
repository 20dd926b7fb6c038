"""FSDP2 over a 4-bit Llama with LoRA (nf4lora.train.fsdp), 2 gloo processes started by torchrun running
tests/fsdp_worker.py, against one process without FSDP: the same adapter after 3 AdamW steps
(rtol 1e-5; adapters sharded, and replicated), each rank holding <= 0.55 of the 4-bit base, bf16
mixed precision giving the one-process bf16 loss, the gathered adapter saved once in PEFT's format,
a DCP checkpoint that resumes bit for bit; odd sizes throughout (packed bytes and absmax blocks
that do not divide by 2). The command line: finetune --fsdp equals one process, resumes after a
rank is killed mid-checkpoint, and refuses to resume with another world size. Bad use raises
clear errors; a CUDA-marked test runs the worker with world size 1 on NCCL."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nf4lora as nl

from . import fsdp_worker as W

ROOT = Path(__file__).resolve().parents[1]


def _pythonpath() -> str:
    """The children import the nf4lora this process imported (installed, or a checkout with its
    built extension) and the repository root (tests.tiny_lm)."""
    here = str(Path(nl.__file__).resolve().parents[1])
    return os.pathsep.join(filter(None, [here, str(ROOT), os.environ.get("PYTHONPATH")]))
HAS_GPU = torch.cuda.is_available() and nl.has_cuda()


def _torchrun(out: Path, nproc: int, *extra: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=_pythonpath())
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(ROOT / "tests" / "fsdp_worker.py"), str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    report = _torchrun(out, 2)
    W.reference(out)
    return out, report


def test_fsdp_adapter_equals_one_process(run):
    out, _ = run
    got, ref = torch.load(out / "fsdp.pt"), torch.load(out / "ref.pt")
    assert got.keys() == ref.keys() and len(got) == 2 * 7 * 2  # 2 layers x 7 linears x (A, B)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
    assert any(v.abs().sum() > 0 for k, v in got.items() if "lora_B" in k)  # it trained


def test_replicated_adapters_equal_one_process(run):
    out, _ = run
    got, ref = torch.load(out / "replicated.pt"), torch.load(out / "ref.pt")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)


def test_fsdp_saves_the_full_adapter_once_in_peft_format(run):
    out, _ = run
    config, got = nl.read_adapter(out / "adapter")
    ref_config, ref = nl.read_adapter(out / "ref_adapter")  # what one process saves
    assert config == ref_config and got.keys() == ref.keys() and len(got) == 28
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=k)
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_each_rank_holds_about_half_of_the_4bit_base(run):
    _, report = run
    total = report[0]["bytes"]["total"]
    assert total == sum(t.numel() * t.element_size() for m in W.make_model().modules()
                        if isinstance(m, nl.Linear4bit) for t in [m.weight, *m.buffers()] if t is not None)
    for r in report:
        assert r["bytes"]["local"] <= 0.55 * total, r["bytes"]
    assert report[0]["bytes"]["local"] + report[1]["bytes"]["local"] - report[0]["bytes"]["replicated"] >= total
    # replicated: only the nested absmax, the two code tables and the offset (the 8-bit absmax is sharded)
    assert report[0]["bytes"]["replicated"] == sum(
        t.numel() * t.element_size() for m in W.make_model().modules() if isinstance(m, nl.Linear4bit)
        for name, t in m.named_buffers(recurse=False) if t is not None and name != "absmax")


def test_bf16_mixed_precision_gives_the_one_process_bf16_loss(run):
    out, report = run
    ref = torch.load(out / "ref_bf16.pt")
    for rank, r in enumerate(report):
        assert r["loss_bf16"] == pytest.approx(ref[rank], rel=1e-6)


def test_dcp_checkpoint_resumes_exactly(run):
    _, report = run
    for r in report:
        assert r["resume_keys"] and r["resume_exact"]


def test_bad_use_is_refused(tmp_path):
    from nf4lora.train import fsdp
    import torch.distributed as dist
    with pytest.raises(RuntimeError, match="not initialized"):
        fsdp.shard_model(W.make_model())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="no Linear4bit"):
            fsdp.shard_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        model = fsdp.shard_model(W.make_model())
        with pytest.raises(ValueError, match="already sharded"):
            fsdp.shard_model(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and nf4lora built with CUDA "
                    f"(torch.cuda.is_available()={torch.cuda.is_available()}, nf4lora.has_cuda()={nl.has_cuda()})")
def test_fsdp_world_size_1_on_cuda(tmp_path):
    report = _torchrun(tmp_path, 1, "cuda")
    assert report[0]["resume_exact"] and report[0]["bytes"]["local"] == report[0]["bytes"]["total"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


# ---- the command line: torchrun -m nf4lora finetune --fsdp ------------------------------------

KILL_RANK1_IN_SECOND_SAVE = """
import os, sys
import torch.distributed.checkpoint as dcp
real, calls = dcp.save, []
def save(*args, **kwargs):  # rank 1 dies in the middle of the second checkpoint (step 4)
    calls.append(1)
    if len(calls) == 2 and os.environ["RANK"] == "1":
        os._exit(9)
    return real(*args, **kwargs)
dcp.save = save
from nf4lora.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from .tiny_lm import save_tiny_model
    root = tmp_path_factory.mktemp("cli")
    rows = [{"prompt": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}."} for i in range(40)]
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, save_tiny_model(root / "tiny")


def _finetune_args(root, tiny, out, *extra):
    return ["finetune", "--fsdp", "--model", str(tiny), "--data", str(root / "d.jsonl"), "--steps", "6",
            "--batch-size", "4", "--grad-accum", "2", "--seq-len", "64", "--lr", "1e-2", "--warmup-steps", "1",
            "--max-eval", "4", "--save-every", "2", "--quiet", "--output-dir", str(out), *extra]


def _cli_torchrun(args, script=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=_pythonpath())
    target = [str(script)] if script else ["-m", "nf4lora"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *target, *args], env=env, capture_output=True, text=True, timeout=300)


def test_cli_fsdp_equals_one_process_and_resumes_after_a_rank_is_killed(tiny_run):
    from safetensors.torch import load_file
    from nf4lora.train import loop as T
    root, tiny = tiny_run
    done = _cli_torchrun(_finetune_args(root, tiny, root / "full"))
    assert done.returncode == 0, done.stderr[-4000:]
    full = load_file(str(root / "full" / "adapter" / "adapter_model.safetensors"))
    # one process, the same micro-batches (4 of one example) and options
    T.finetune(T.TrainOptions(model=str(tiny), data=str(root / "d.jsonl"), output_dir=str(root / "one"), steps=6,
                              batch_size=4, grad_accum=4, seq_len=64, lr=1e-2, warmup_steps=1, max_eval=4,
                              quiet=True))
    one = load_file(str(root / "one" / "adapter" / "adapter_model.safetensors"))
    assert full.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(full[k], one[k], rtol=1e-5, atol=1e-7, msg=k)

    script = root / "kill.py"
    script.write_text(KILL_RANK1_IN_SECOND_SAVE)
    killed = _cli_torchrun(_finetune_args(root, tiny, root / "kill"), script)
    assert killed.returncode != 0
    names = sorted(p.name for p in (root / "kill").iterdir())
    assert "checkpoint-2" in names and "checkpoint-4" not in names and "adapter" not in names, names
    assert (root / "kill" / "checkpoint-2" / "trainer_state.pt").is_file()
    resumed = _cli_torchrun(_finetune_args(root, tiny, root / "kill", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    got = load_file(str(root / "kill" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == full.keys() and all(torch.equal(got[k], full[k]) for k in full)

    # another world size cannot resume a sharded checkpoint: a clear error, exit status 2
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=_pythonpath())
    one = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                          "-m", "nf4lora", *_finetune_args(root, tiny, root / "kill", "--resume")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode != 0 and "written by 2 process(es), this run has 1" in one.stderr, one.stderr[-2000:]


def test_cli_fsdp_needs_torchrun(tiny_run, capsys):
    from nf4lora.cli import main
    root, tiny = tiny_run
    assert main(_finetune_args(root, tiny, root / "x")) == 2
    assert "start the run with torchrun" in capsys.readouterr().err
