"""Crash-safe file writing shared by everything that writes user files (adapters, checkpoints,
merged models, metrics, plots): data goes to a temporary name beside the target, is fsynced, and
is renamed into place, so a crash leaves the previous file or none, never a torn one.
Tested by tests/test_crash_safety.py (SIGKILLed writers) and tests/test_finetune.py."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_temp(path: Path, data: bytes) -> Path:
    """Writes data to a temp file beside `path` and fsyncs it; returns the temp path (the caller
    renames it, so several files can be prepared before any is replaced)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def write_atomic(path: Path, data: bytes) -> None:
    """Replaces `path` by a file holding `data`, atomically."""
    os.replace(write_temp(path, data), path)


def fsync_tree(path: Path) -> None:
    """fsyncs every file and folder under `path`, then `path` itself (before renaming the folder)."""
    for p in sorted(path.rglob("*"), reverse=True):  # files, then their folders
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_folder(tmp: Path, final: Path) -> None:
    """Makes the filled temp folder `tmp` the folder `final`: fsyncs it, replaces `final` (a
    checkpoint of the same step from an earlier run) and renames. On any failure `tmp` is removed
    and the error propagates; `final`'s siblings (earlier checkpoints) are untouched."""
    try:
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
