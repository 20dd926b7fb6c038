"""Crash safety of what nf4lora writes: a child process rewrites an adapter directory in a loop
(each save fills every LoRA tensor with the save's number) and is SIGKILLed at a random moment,
50 times; after every kill the directory must read back as one complete save — never a torn
file, never tensors from two different saves, never nothing once a save has finished.
The child is forked from the test process (torch is already imported), so a kill costs
milliseconds and the kill points spread over every phase of a save (write, fsync, rename)."""
import os
import random
import signal
import sys
import time

import pytest
import torch
from torch import nn

import nf4lora

KILLS = 50

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux",
                                reason="needs os.fork and SIGKILL (Linux)")


def _model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128))
    return nf4lora.get_lora_model(base, nf4lora.LoraConfig(r=32, lora_alpha=32, target_modules=["0", "2"]))


def _writer(directory, ready_fd):
    """Child: save forever, the k-th save with every LoRA tensor filled with k."""
    try:
        torch.set_num_threads(1)
        model = _model()
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        k = 0
        while True:
            k += 1
            with torch.no_grad():
                for p in lora:
                    p.fill_(float(k))
            nf4lora.save_adapter(model, directory)
            if k == 1:
                os.write(ready_fd, b"1")
    finally:
        os._exit(1)


def _saved_number(directory):
    _, tensors = nf4lora.read_adapter(directory)
    values = {float(t.flatten()[0]) for t in tensors.values()}
    assert len(tensors) == 4 and all(bool((t == t.flatten()[0]).all()) for t in tensors.values()), \
        "a tensor holds values of two saves"
    assert len(values) == 1, f"tensors from different saves: {sorted(values)}"
    return values.pop()


def test_adapter_survives_sigkill_at_random_points(tmp_path):
    rng = random.Random(1234)
    directory = tmp_path / "adapter"
    last = 0.0
    for kill in range(KILLS):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (child)
            os.close(read_fd)
            _writer(directory, write_fd)
        os.close(write_fd)
        assert os.read(read_fd, 1) == b"1", "the writer died before its first save"
        os.close(read_fd)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"kill {kill}: child exited early"
        k = _saved_number(directory)
        assert k >= 1, f"kill {kill}: read back save {k}"
        last = max(last, k)
    assert last > 1, "every kill landed before a second save: the test did not exercise overwrites"
    # A save that completes clears the temp files the killed ones left behind.
    nf4lora.save_adapter(_model(), directory)
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
