"""Output folders of the command line: one run at a time per folder (output_lock: a lock file
beside the folder, held with flock, so a killed holder never blocks the next run; a second run
is refused with the holder's PID), and folders written as a whole (atomic_output_dir: a temp
folder beside the target, every file fsynced, then swapped in with one rename, so a kill leaves
the previous output or the new one, never a mix). Tested by tests/test_outdir.py (SIGKILL loop)."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import Iterator, Union

from .files import fsync_tree

# Written into every folder atomic_output_dir produces: an existing target is replaced only when
# it is empty or holds this file, so a mistyped --output-dir never swallows an unrelated folder.
MARKER = ".nf4lora-output"


class OutputInUseError(BlockingIOError):
    """Another live process holds the output folder's lock."""


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def output_lock(target: Union[str, os.PathLike]) -> Iterator[Path]:
    """Holds `.<name>.lock` beside `target` for the block. The lock is an flock on that file (the
    kernel drops it when the holder dies, so a stale file from a killed run does not block); the
    file holds the holder's PID for the message a second run gets."""
    target = Path(target).absolute()
    path = _lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_pid(path)
            alive = holder is not None and _pid_alive(holder)
            who = f"PID {holder}" if alive else "another process (its PID is not readable yet)"
            raise OutputInUseError(f"output folder {target} is in use by another nf4lora run ({who}; lock file "
                                   f"{path}); wait for it to finish or choose another --output-dir") from None
        # The holder before us may have removed the file between our open and our flock: then
        # our lock is on an unlinked file, and we start over on the path's current file.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still holding the lock (see the inode check above)
        os.close(fd)


def _read_pid(path: Path):
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


@contextlib.contextmanager
def atomic_output_dir(target: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yields an empty temp folder beside `target` to write into; when the block ends without an
    error, every file in it is fsynced and it replaces `target` in one rename (swapped with the
    old folder, which is then deleted). On an error, or a kill, `target` is left as it was (a
    kill can leave a `.<name>.tmp-<pid>` folder, removed by the next run). An existing `target`
    must be empty or an earlier output of this function (ValueError otherwise). Hold
    output_lock(target) around it when other runs may write the same target."""
    target = Path(target).absolute()
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"output folder {target} exists and is not a folder")
        if any(target.iterdir()) and not (target / MARKER).is_file():
            raise ValueError(f"output folder {target} exists, is not empty and was not written by nf4lora "
                             f"(no {MARKER} in it): choose a new or empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by killed runs (we hold the lock)
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        (tmp / MARKER).write_text("written by nf4lora; the whole folder is replaced by the next write\n")
        fsync_tree(tmp)
        if target.exists():
            if not _exchange(tmp, target):  # no RENAME_EXCHANGE: two renames (a kill between them leaves none)
                old = target.parent / f".{target.name}.tmp-old-{os.getpid()}"
                os.rename(target, old)
                os.rename(tmp, target)
                tmp = old
            shutil.rmtree(tmp, ignore_errors=True)  # the old output now
        else:
            os.rename(tmp, target)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
