"""raw writer: the guest disk is the file; zeros stay holes.

The file is created at its full size with ftruncate (all holes) and only
non-zero units are written, so the output is as sparse as the file system
allows.  `preallocation=falloc|full` reserves the blocks up front as qemu-img
does (full writes nothing but asks for allocated blocks, which read as zeros).
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ...errors import ConvertError
from ..base import ImageWriter, Option, pwrite_all, zero_range

SPARSE_UNIT = 4096


class RawWriter(ImageWriter):
    format = "raw"
    OPTIONS = {
        "preallocation": Option("preallocation", "choice", "off",
                                "Preallocation mode (allowed values: off, falloc, full)",
                                ("off", "falloc", "full")),
    }
    accepts_runs = True          # write() may get several consecutive units at once
    sparse_unit_adjustable = True   # the pipeline may set `unit` from -S

    def __init__(self, path: Path, size: int, options: dict | None = None, *,
                 existing: bool = False, **kw) -> None:
        super().__init__(path, size, options, **kw)
        self.unit = SPARSE_UNIT
        self.existing = existing
        if existing:                 # qemu-img convert -n: a file or device that is kept
            self._open_existing()
            return
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

    def _open_existing(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ConvertError(f"Could not open '{self.path}': {exc.strerror}",
                               path=str(self.path)) from None
        st = os.fstat(self._fd)
        self._regular = stat.S_ISREG(st.st_mode)
        have = st.st_size if self._regular else os.lseek(self._fd, 0, os.SEEK_END)
        if not (self._regular or stat.S_ISBLK(st.st_mode)):
            os.close(self._fd)
            raise ConvertError("-n needs a regular file or a block device", path=str(self.path))
        if have < self.size:
            os.close(self._fd)
            raise ConvertError(f"the existing target is {have} bytes, smaller than the "
                               f"{self.size}-byte source", path=str(self.path))

    def write(self, guest_offset: int, data) -> None:
        pwrite_all(self._fd, data, guest_offset)

    def write_zeros(self, guest_offset: int, length: int) -> None:
        """A new file is already zeros (one hole); an existing target gets its range
        punched out (files) or overwritten with zeros (devices)."""
        if self.existing:
            zero_range(self._fd, guest_offset, length, punch=self._regular)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        self.close()
        if not self.existing:          # an existing target is the caller's: never removed
            super().abort()
