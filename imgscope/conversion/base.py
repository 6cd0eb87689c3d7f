"""What every image writer offers the conversion pipeline.

A writer builds one image file (plus its extent files, for some VMDK kinds)
from guest data handed over in ascending guest order, in whole allocation
units.  It describes its options the way `qemu-img create -o` does, builds
every on-disk structure with the same construct schemas the drivers parse
with, and writes only into the folder of the path it was given: the pipeline
hands it a path inside a temporary folder beside the destination (so names
written inside the image, like VMDK extent files, are already the final ones)
and moves `written_files()` into place when everything succeeded.

The pipeline (convert/pipeline.py) guarantees:
* `write()` gets whole units (`unit` bytes, aligned), except the last unit of
  the disk which may be short; never a unit that is all zeros unless
  `wants_zero_units` is True (fixed/preallocated layouts);
* `write_zeros()` names guest ranges that must read as zeros even over a
  backing file (only called when the image has a backing file);
* with compression on, `compress_unit()` runs in worker threads (it must be a
  pure function of its input) and `write_compressed()` gets the result in
  guest order;
* `close()` is called once at the end (tables, headers, footers), `abort()`
  instead when anything failed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ConvertError


@dataclass(frozen=True)
class Option:
    """One `-o key=value` option of a format, as `qemu-img create -o help` lists it."""

    name: str
    kind: str              # "size" | "bool" | "int" | "str" | "choice"
    default: Any
    help: str
    choices: tuple = ()

    def parse(self, text: str, fmt: str):
        from ..units import parse_size
        try:
            if self.kind == "size":
                return parse_size(text)
            if self.kind == "int":
                return int(text, 0)
            if self.kind == "bool":
                if text.lower() in ("on", "true", "yes", "1"):
                    return True
                if text.lower() in ("off", "false", "no", "0"):
                    return False
                raise ValueError(text)
        except ValueError:
            raise ConvertError(f"{fmt}: invalid value {text!r} for option {self.name!r} "
                               f"({self.kind})") from None
        if self.kind == "choice" and text not in self.choices:
            raise ConvertError(f"{fmt}: option {self.name!r} must be one of "
                               f"{', '.join(self.choices)}, not {text!r}")
        return text


def parse_options(fmt: str, declared: dict[str, Option], given: dict[str, str]) -> dict:
    """Defaults overlaid with the given `-o` values, each parsed; unknown keys refused."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ConvertError(f"{fmt} does not support the option(s) {', '.join(unknown)} "
                           f"(supported: {', '.join(declared)})")
    out = {name: opt.default for name, opt in declared.items()}
    for key, text in given.items():
        out[key] = declared[key].parse(text, fmt) if isinstance(text, str) else text
    return out


def pwrite_all(fd: int, data, offset: int) -> None:
    """os.pwrite until every byte of `data` is at `offset` (pwrite may write less)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError("short write")
        view, offset = view[n:], offset + n



ZERO_CHUNK = 8 << 20                  # zeros are written this much at a time
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range of a file so it reads as zeros (Linux fallocate); False when
    the system or file system cannot, and the caller writes zeros instead."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


def zero_range(fd: int, offset: int, length: int, punch: bool = True) -> None:
    """Make `length` bytes at `offset` read as zeros: a punched hole where allowed and
    possible, else zeros written a chunk at a time (bounded memory)."""
    if length <= 0 or (punch and punch_hole(fd, offset, length)):
        return
    zero = memoryview(bytes(min(length, ZERO_CHUNK)))
    end = offset + length
    for off in range(offset, end, ZERO_CHUNK):
        pwrite_all(fd, zero[:min(ZERO_CHUNK, end - off)], off)

class ImageWriter:
    """Base class of the format writers (see the module docstring for the contract)."""

    format: str = ""
    OPTIONS: dict[str, Option] = {}
    wants_zero_units = False          # fixed layouts want every unit, zeros included
    supports_backing = False
    supports_compression = False
    compress_always = False          # every unit goes through compress_unit (streamOptimized)
    accepts_runs = False             # write() may get several whole units at once
    sparse_unit_adjustable = False   # the unit is only a zero-test granule: the pipeline may
                                     # set it to the -S size
    sparse_writes = True             # the pipeline clears it for -S 0 (write every byte)

    def __init__(self, path: Path, size: int, options: dict | None = None, *,
                 backing: str | None = None, backing_format: str | None = None) -> None:
        self.path = Path(path)
        self.size = int(size)
        self.options = parse_options(self.format, self.OPTIONS, options or {})
        if backing and not self.supports_backing:
            raise ConvertError(f"{self.format} images cannot have a backing file",
                               path=str(path))
        self.backing, self.backing_format = backing, backing_format
        self.unit = 65536                 # set by the subclass from its options

    # ---- data, in ascending guest order ---------------------------------------------
    def write(self, guest_offset: int, data) -> None:
        raise NotImplementedError

    def write_zeros(self, guest_offset: int, length: int) -> None:
        """Ranges that must read as zeros over a backing file; default: write zero units."""
        zero = bytes(self.unit)
        end = guest_offset + length
        for off in range(guest_offset - guest_offset % self.unit, end, self.unit):
            self.write(off, zero[:min(self.unit, self.size - off)])

    compress_unit: Callable[[bytes], bytes] | None = None

    def write_compressed(self, guest_offset: int, payload: bytes, length: int) -> None:
        raise ConvertError(f"{self.format} does not support compression", path=str(self.path))

    # ---- end ---------------------------------------------------------------------------
    def close(self) -> None:
        raise NotImplementedError

    fd = -1                           # writers that keep one open file descriptor use this

    def _close_fd(self) -> None:
        if isinstance(self.fd, int) and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        """Remove what was written (the pipeline only ever gives temporary folders)."""
        self._close_fd()
        for p in self.written_files():
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def written_files(self) -> list[Path]:
        """Every file this writer created (main file first)."""
        return [self.path]
