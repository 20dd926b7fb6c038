"""Where paged optimizer state lives, as two allocators testable on their own:

- PageFiles (CPU): each buffer is a file in a page directory (a private temporary one when none is
  given), its blocks reserved with posix_fallocate (a full disk fails here, with the parameters
  untouched, not later inside a kernel as SIGBUS) and mapped shared, so the kernel may write state
  out under memory pressure. The files go when their param's state is replaced or when the
  allocator is garbage-collected.
- managed_zeros (CUDA): cudaMallocManaged memory (nf4lora.ops.memory), prefetched to the GPU by
  the optimizer before each update.

Only buffers of at least MIN_PAGED_ELEMENTS elements are paged; smaller ones are ordinary tensors.
Tested by tests/test_optim.py (page files, full disk, cleanup) and bench/soak.py."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import weakref
from typing import Dict, List, Optional

import torch
from torch import Tensor

from ..ops.memory import managed_zeros
from ..ops.optim import MIN_PAGED_ELEMENTS

__all__ = ["MIN_PAGED_ELEMENTS", "PageFiles", "managed_zeros"]


def _remove(files: List[str], directory: Optional[str]) -> None:
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    files.clear()
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


class PageFiles:
    """File-backed zero-filled tensors in `page_dir` (None: a temporary directory this object owns
    and removes). Raises ValueError for a missing or unwritable directory."""

    def __init__(self, page_dir: Optional[str] = None):
        self._files: List[str] = []
        self._files_of: Dict[int, List[str]] = {}  # owner key -> its files
        self._own_dir: Optional[str] = None
        if page_dir is None:
            self._own_dir = tempfile.mkdtemp(prefix="nf4lora-paged-")
            self.directory = self._own_dir
        else:
            self.directory = self._check_dir(os.fspath(page_dir))
        self._finalizer = weakref.finalize(self, _remove, self._files, self._own_dir)

    @staticmethod
    def _check_dir(page_dir: str) -> str:
        if not os.path.isdir(page_dir):
            raise ValueError(f"page_dir {page_dir!r} is not a directory")
        try:  # os.access is not enough (read-only mounts, ACLs): create and remove a probe file
            fd, probe = tempfile.mkstemp(prefix=".nf4lora-probe-", dir=page_dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ValueError(f"page_dir {page_dir!r} is not writable: {exc}") from exc
        return page_dir

    def zeros(self, numel: int, dtype: torch.dtype, owner: int) -> Tensor:
        """A zero-filled tensor of `numel` elements backed by a new file, filed under `owner`."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        fd, path = tempfile.mkstemp(prefix="nf4lora-optim-", suffix=".state", dir=self.directory)
        try:
            # fallocate reserves the blocks now and zero-fills them, which is the fresh state.
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            why = "is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"failed ({exc})"
            raise RuntimeError(f"page_dir {self.directory!r} {why}: cannot reserve {nbytes} bytes of "
                               "optimizer state; the parameters were left as they were") from exc
        os.close(fd)
        self._files.append(path)
        self._files_of.setdefault(owner, []).append(path)
        return torch.from_file(path, shared=True, size=numel, dtype=dtype)

    def remove(self, paths: List[str]) -> None:
        """Deletes these files (state that was replaced); a mapped tensor over one stays valid."""
        gone = set(paths)
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._files[:] = [f for f in self._files if f not in gone]
        for owner, files in list(self._files_of.items()):
            files[:] = [f for f in files if f not in gone]
            if not files:
                del self._files_of[owner]

    def files(self) -> List[str]:
        return list(self._files)
