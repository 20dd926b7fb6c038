"""nf4lora.train.device: --device specs resolved (auto picks CUDA only when torch sees a GPU and nf4lora
has its CUDA kernels; a missing GPU, a missing CUDA build, a missing index and a malformed spec are
clear errors), torchrun's LOCAL_RANK picks each process's GPU, the process-group backend follows the
device, and a CUDA RNG state in a checkpoint is ignored on the CPU. The GPU's presence is simulated
by patching torch.cuda's queries; nothing here allocates on a GPU. The trainer and CLI on a device
are tested in test_finetune.py and test_cli.py."""
import pytest
import torch

from nf4lora.train import device as DV


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretends torch sees `n` GPUs and nf4lora has CUDA kernels (set n with the returned function)."""
    def set_(n, built=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(DV, "has_cuda", lambda: built)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return set_


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "", " cpu", "cpu:0", 3, None])
def test_malformed_spec(spec):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        DV.resolve(spec)


def test_cpu_and_auto_without_gpu(fake_gpus):
    fake_gpus(0)
    assert DV.resolve("cpu") == torch.device("cpu")
    assert DV.resolve("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device cuda: torch sees no CUDA GPU.*use --device cpu"):
        DV.resolve("cuda")
    with pytest.raises(ValueError, match="device cuda:1: torch sees no CUDA GPU"):
        DV.resolve("cuda:1")


def test_auto_needs_the_cuda_build(fake_gpus):
    fake_gpus(1, built=False)
    assert DV.resolve("auto") == torch.device("cpu")  # a GPU, but no kernels for it: the CPU
    with pytest.raises(ValueError, match="built without its CUDA kernels"):
        DV.resolve("cuda")


def test_cuda_indices(fake_gpus, monkeypatch):
    fake_gpus(2)
    assert DV.resolve("auto") == torch.device("cuda", 0)
    assert DV.resolve("cuda") == torch.device("cuda", 0)
    assert DV.resolve("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"cuda:2 does not exist \(2 GPU\(s\)\)"):
        DV.resolve("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun: each process its own GPU
    assert DV.resolve("cuda") == torch.device("cuda", 1)
    assert DV.resolve("auto") == torch.device("cuda", 1)
    assert DV.resolve("cuda:0") == torch.device("cuda", 0)  # an explicit index wins
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="cuda:2 does not exist"):
        DV.resolve("cuda")


def test_backend_follows_the_device():
    assert DV.backend(torch.device("cpu")) == "gloo"
    assert DV.backend(torch.device("cuda", 1)) == "nccl"


def test_cpu_rng_ignores_a_cuda_state():
    cpu = torch.device("cpu")
    assert DV.rng_state(cpu) is None
    before = torch.get_rng_state()
    DV.set_rng_state(torch.zeros(16, dtype=torch.uint8), cpu)  # as a CUDA run's checkpoint holds
    assert torch.equal(torch.get_rng_state(), before)


def test_move_model_keeps_the_4bit_weight():
    """move_model to the meta device keeps every tensor's dtype and shape (the packed uint8 codes
    and the 8-bit double-quantized scales are not turned into floats); materialized again and
    given the saved tensors, the layer computes what it did before the move: what .to(device)
    does for a GPU, without one."""
    import nf4lora as nl
    torch.manual_seed(0)
    m = torch.nn.Sequential(nl.Linear4bit.from_linear(torch.nn.Linear(128, 64), quant_type="nf4"))
    x = torch.randn(3, 128)
    with torch.no_grad():
        before = m(x)
    assert DV.move_model(m, torch.device("cpu")) is m

    def tensors():  # not state_dict(): QuantState.to_dict reads the offset with .item(), which meta refuses
        return dict(list(m.named_parameters()) + list(m.named_buffers()))

    saved = {k: v.detach().clone() for k, v in tensors().items()}
    assert {v.dtype for v in saved.values()} >= {torch.uint8, torch.float32}
    DV.move_model(m, torch.device("meta"))
    assert DV.model_device(m) == torch.device("meta")
    moved = tensors()
    assert moved.keys() == saved.keys()
    for k, v in moved.items():
        assert v.device.type == "meta" and v.dtype == saved[k].dtype and v.shape == saved[k].shape, k
    m.to_empty(device="cpu")
    with torch.no_grad():
        for k, v in tensors().items():
            v.copy_(saved[k])
        assert torch.equal(m(x), before)


def test_finetune_refuses_one_gpu_for_several_processes(tmp_path, monkeypatch, fake_gpus):
    """Under torchrun every process would take the same cuda:N (NCCL fails on that much later): the
    trainer says so before it starts a process group or loads anything."""
    from nf4lora.train import loop as T
    fake_gpus(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="device cuda:1: with several processes use --device cuda or auto"):
        T.finetune(T.TrainOptions(output_dir=str(tmp_path / "o"), device="cuda:1", quiet=True))
    assert not (tmp_path / "o").exists()


def test_load_model_builds_on_the_device(tmp_path, monkeypatch):
    """load_model(device=...) moves each tensor there as it is read and casts or quantizes it there:
    on the meta device every parameter and buffer ends on meta with the CPU load's dtype and shape
    (the 4-bit codes and 8-bit scales come out of quantize_4bit on meta), so nothing of the model
    was kept on the CPU; device="cpu" is the default load, bit for bit."""
    import nf4lora as nl
    from .tiny_lm import save_tiny_model
    path = save_tiny_model(tmp_path)

    def tensors(model):
        return dict(list(model.named_parameters()) + list(model.named_buffers()))

    ref = tensors(nl.load_model(path)[0])
    from nf4lora.loading import models as M
    seen = []

    def spy(t, *a, **kw):  # each weight reaches the quantizer already on the device, one at a time
        seen.append(t.device.type)
        return nl.quantize_4bit(t, *a, **kw)

    monkeypatch.setattr(M, "quantize_4bit", spy)
    meta = tensors(nl.load_model(path, device="meta")[0])
    assert seen and set(seen) == {"meta"}
    assert meta.keys() == ref.keys() and any(isinstance(m, nl.Linear4bit) for m in nl.load_model(path)[0].modules())
    for k, v in meta.items():
        assert v.device.type == "meta" and v.dtype == ref[k].dtype and v.shape == ref[k].shape, k
    cpu = tensors(nl.load_model(path, device="cpu")[0])
    assert all(torch.equal(cpu[k], ref[k]) for k in ref)
