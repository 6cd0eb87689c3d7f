"""raw writer: the guest disk is the file; zeros stay holes.

The file is created at its full size with ftruncate (all holes) and only
non-zero units are written, so the output is as sparse as the file system
allows.  `preallocation=falloc|full` reserves the blocks up front as qemu-img
does (full writes nothing but asks for allocated blocks, which read as zeros).
"""
from __future__ import annotations

import os
from pathlib import Path

from ...errors import ConvertError
from ..base import ImageWriter, Option, pwrite_all

SPARSE_UNIT = 4096


def pwrite_sparse(fd: int, data, offset: int, block: int = SPARSE_UNIT) -> None:
    """Write only the `block`-sized pieces of `data` that hold a non-zero byte.

    For freshly allocated host space (its unwritten bytes are holes that read
    as zeros): the zero pieces stay holes, as qemu-img's -S leaves them.
    """
    import numpy as np
    arr = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    full = arr.size // block
    mask = np.zeros(full + (arr.size % block > 0) + 2, np.int8)
    if full:
        mask[1:full + 1] = arr[:full * block].view(np.uint64).reshape(full, -1).any(axis=1)
    if arr.size % block:
        mask[full + 1] = arr[full * block:].any()
    edges = np.flatnonzero(np.diff(mask))
    for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist()):
        pwrite_all(fd, arr[a * block:min(b * block, arr.size)], offset + a * block)


class RawWriter(ImageWriter):
    format = "raw"
    OPTIONS = {
        "preallocation": Option("preallocation", "choice", "off",
                                "Preallocation mode (allowed values: off, falloc, full)",
                                ("off", "falloc", "full")),
    }
    accepts_runs = True          # write() may get several consecutive units at once
    sparse_unit_adjustable = True   # the pipeline may set `unit` from -S

    def __init__(self, path: Path, size: int, options: dict | None = None, **kw) -> None:
        super().__init__(path, size, options, **kw)
        self.unit = SPARSE_UNIT
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(self._fd, self.size)
            if self.options["preallocation"] != "off" and self.size:
                try:
                    os.posix_fallocate(self._fd, 0, self.size)
                except OSError as exc:
                    raise ConvertError(f"cannot preallocate {self.size} bytes: {exc}",
                                       path=str(self.path)) from None
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, guest_offset: int, data) -> None:
        pwrite_all(self._fd, data, guest_offset)

    def write_zeros(self, guest_offset: int, length: int) -> None:
        """Already zeros: the file was created as one hole."""

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        self.close()
        super().abort()
