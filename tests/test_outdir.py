"""Output folders of the command line (nf4lora/outdir.py): `nf4lora merge` writes its folder whole
(a child process merges in a loop, the k-th merge with lm_head and embeddings filled with k and k
in config.json, and is SIGKILLed at a random moment, 50 times: the folder must always read back
as one complete merge), and one run per output folder (a second is refused naming the holder's
PID; a lock left by a killed run does not block)."""
import copy
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import nf4lora
from nf4lora import outdir
from nf4lora.cli import main, merge

from .tiny_lm import tiny_config

KILLS = 50

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux",
                                reason="needs os.fork, flock and SIGKILL (Linux)")


def _lora_model():
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    return nf4lora.get_lora_model(model, nf4lora.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                  quantize="nf4")


def _private_tqdm_lock() -> None:
    """tqdm guards its bars with a multiprocessing lock that forked children share: a child
    SIGKILLed while holding it (transformers' save_pretrained draws bars) would leave it held for
    every later child and the parent. Each child takes a lock of its own."""
    try:
        from tqdm import std
    except ImportError:
        return
    lock, classes = threading.RLock(), [std.tqdm]
    while classes:
        cls = classes.pop()
        cls._lock = lock
        classes.extend(cls.__subclasses__())


def _merger(model, tok, target, ready_fd):
    """Child: merge forever into target, the k-th merge marked k everywhere."""
    try:
        _private_tqdm_lock()
        torch.set_num_threads(1)
        k = 0
        while True:
            k += 1
            m = copy.deepcopy(model)
            with torch.no_grad():
                m.lm_head.weight.fill_(float(k))
                m.model.embed_tokens.weight.fill_(float(k))
            m.config.nf4lora_test_save = k
            merge(m, tok, target, "bf16")
            if k == 1:
                os.write(ready_fd, b"1")
    finally:
        os._exit(1)


def _merge_number(target):
    from safetensors.torch import load_file
    names = sorted(p.name for p in target.iterdir())
    assert outdir.MARKER in names and "config.json" in names, names
    k = json.loads((target / "config.json").read_text())["nf4lora_test_save"]
    tensors = load_file(str(target / "model.safetensors"))
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert bool((tensors[name] == k).all()), f"{name} is not all {k}: files of two merges"
    return k


def test_merge_survives_sigkill_at_random_points(tmp_path):
    if os.environ.get("NF4LORA_FRESH_PROCESS") != "1":
        # Forked children inherit the locks and thread pools that earlier tests of this process set
        # up (the tokenizers library's, a multiprocessing lock: the full suite hung here twice, in
        # the child), so the forking runs in a fresh interpreter: this test again, alone.
        done = subprocess.run(
            [sys.executable, "-m", "pytest", f"{__file__}::test_merge_survives_sigkill_at_random_points",
             "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "fresh")],
            env={**os.environ, "NF4LORA_FRESH_PROCESS": "1"}, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
        return
    model, tok = _lora_model(), None
    rng = random.Random(4321)
    target = tmp_path / "merged"
    last = 0
    for kill in range(KILLS):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (child)
            os.close(read_fd)
            _merger(model, tok, target, write_fd)
        os.close(write_fd)
        if not select.select([read_fd], [], [], 300)[0]:  # a hung child fails the test, not the suite
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"kill {kill}: the merger made no first merge in 300 s (hung?)")
        assert os.read(read_fd, 1) == b"1", "the merger died before its first merge"
        os.close(read_fd)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"kill {kill}: child exited early"
        k = _merge_number(target)
        assert k >= 1, f"kill {kill}: read back merge {k}"
        last = max(last, k)
    assert last > 1, "every kill landed before a second merge: the test did not exercise replacement"
    # A merge that completes removes the temp folders the killed ones left behind.
    merge(copy.deepcopy(model), tok, target, "bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_merge_refuses_a_folder_it_did_not_write(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not written by nf4lora"):
        merge(_lora_model(), None, target, "bf16")
    assert (target / "notes.txt").read_text() == "keep me"


def _hold_lock(target, ready_fd):
    try:
        with outdir.output_lock(target):
            os.write(ready_fd, b"1")
            time.sleep(60)
    finally:
        os._exit(0)


def test_a_second_run_is_refused_and_a_killed_holder_does_not_block(tmp_path, capsys):
    target = tmp_path / "out"
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        os.close(read_fd)
        _hold_lock(target, write_fd)
    os.close(write_fd)
    try:
        assert os.read(read_fd, 1) == b"1"
        with pytest.raises(outdir.OutputInUseError, match=f"in use by another nf4lora run \\(PID {pid};"):
            with outdir.output_lock(target):
                pass
        # The command line says so in one line and exits 1, before loading anything.
        assert main(["merge", "--adapter", str(tmp_path / "none"), "--output-dir", str(target)]) == 1
        assert f"PID {pid}" in capsys.readouterr().err
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_fd)
    # The killed holder left its lock file (with its dead PID) behind: it must not block.
    lock = tmp_path / ".out.lock"
    assert lock.read_text().split() == [str(pid)]
    with outdir.output_lock(target) as path:
        assert path == lock and lock.read_text().split() == [str(os.getpid())]
    assert not lock.exists()
