"""Positional, bounds-checked, read-only access to one host file.

A Source never writes and never moves a shared file position (os.pread), so
several readers can share one. Every short read becomes a Truncated error
naming the structure and offset that was wanted.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from ..errors import Truncated, ImageError

try:  # Linux and most Unix: find data/holes of sparse files.
    SEEK_DATA, SEEK_HOLE = os.SEEK_DATA, os.SEEK_HOLE
except AttributeError:  # pragma: no cover - other platforms
    SEEK_DATA = SEEK_HOLE = None


class Source:
    """A read-only host file opened once, read with pread."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.given_name: str | None = None   # how the user / parent image named it
        self.named_as: str | None = None     # the name as written inside a parent image
        self._fd = -1
        try:
            # O_NONBLOCK: a FIFO named by a hostile image must not block the open
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(self._fd)
        except OSError as exc:
            self.close()
            raise ImageError(f"cannot open: {exc.strerror}", path=str(path)) from None
        if stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        elif stat.S_ISBLK(st.st_mode):       # a disk device, read like a raw image
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
        else:
            self.close()
            raise ImageError("not a regular file or block device", path=str(path))
        self.allocated = st.st_blocks * 512

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def read(self, offset: int, length: int, structure: str = "data") -> bytes:
        """Exactly `length` bytes at `offset`, or Truncated."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Truncated(f"{structure} of {length} bytes extends past end of file "
                            f"({self.size} bytes)", path=str(self.path),
                            offset=offset, structure=structure)
        return self.pread(offset, length)

    def read_upto(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (short at end of file)."""
        if offset >= self.size or length <= 0:
            return b""
        return self.pread(offset, min(length, self.size - offset))

    def pread(self, offset: int, length: int) -> bytes:
        chunks = []
        while length > 0:
            try:
                chunk = os.pread(self._fd, min(length, 1 << 30), offset)
            except OSError as exc:
                raise ImageError(f"read failed: {exc.strerror}", path=str(self.path),
                                 offset=offset) from None
            if not chunk:
                raise Truncated("unexpected end of file", path=str(self.path), offset=offset)
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def pread_into(self, offset: int, out: np.ndarray) -> int:
        """Fill `out` (a contiguous uint8 array) from `offset` without an extra copy;
        the bytes read (short only at the end of the file; the rest is left as is)."""
        view = memoryview(out).cast("B")
        done, want = 0, min(view.nbytes, max(0, self.size - offset))
        while done < want:
            try:
                n = os.preadv(self._fd, [view[done:want]], offset + done)
            except OSError as exc:
                raise ImageError(f"read failed: {exc.strerror}", path=str(self.path),
                                 offset=offset + done) from None
            if n <= 0:
                break                      # the file shrank under us: the caller zero-fills
            done += n
        return done

    def gather(self, offsets: np.ndarray, width: int) -> np.ndarray:
        """`width` bytes at each offset as an (n, width) uint8 array, in one pass.

        Uses a read-only memory map, so only the touched pages are read; bytes
        past the end of the file read as zeros (callers check ranges first).
        """
        offsets = np.asarray(offsets, dtype=np.uint64)
        out = np.zeros((offsets.size, width), np.uint8)
        if not offsets.size or self.size == 0:
            return out
        view = np.memmap(self.path, dtype=np.uint8, mode="r")
        idx = offsets[:, None] + np.arange(width, dtype=np.uint64)[None, :]
        inside = idx < np.uint64(self.size)
        out[inside] = view[idx[inside]]
        del view
        return out

    def data_runs(self) -> list[tuple[int, int]]:
        """(offset, length) of the non-hole parts of a sparse file (asked once)."""
        if getattr(self, "_data_runs", None) is None:
            self._data_runs = self._find_data_runs()
        return self._data_runs

    def _find_data_runs(self) -> list[tuple[int, int]]:
        if SEEK_DATA is None:
            return [(0, self.size)] if self.size else []
        runs, pos = [], 0
        while pos < self.size:
            try:
                start = os.lseek(self._fd, pos, SEEK_DATA)
            except OSError:
                break  # ENXIO: no more data
            end = os.lseek(self._fd, start, SEEK_HOLE)
            runs.append((start, end - start))
            pos = end
        return runs
