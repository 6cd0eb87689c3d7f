"""Compare two images' guest disks the way `qemu-img compare` does.

Both guest maps drive the walk: ranges where both sides are known to read as
zeros (zero or unallocated runs) are skipped without reading; elsewhere both
guests are read in large blocks and compared with numpy (a side that is a
zero run is not read, its block is compared against zeros).  The result
carries qemu-img's exit code and text: a difference is reported at the first
differing 512-byte sector, counted from the start of the range being compared
(qemu-img's `compare_buffers` / `find_nonzero`).  Without `strict` the larger
image's tail must read as zeros; with it a size difference is a difference and
so is a different allocation status (qemu-img's block status flags, modelled
from the extent kinds).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ImageError
from ..model import KIND_ZERO, KIND_UNALLOCATED
from .zeros import first_difference, first_nonzero

SECTOR = 512
BLOCK = 8 << 20                 # bytes read per side and step (qemu-img: 2 MiB)

# qemu's BDRV_BLOCK_* flags, as far as the extent kinds tell them
_DATA, _ZERO, _OFFSET_VALID, _ALLOCATED, _EOF = 0x01, 0x02, 0x04, 0x10, 0x20
# QEMU drivers without backing support: unallocated blocks are neither allocated nor zero
NO_BACKING_FORMATS = ("vdi", "vpc", "vhdx")

Progress = Callable[[str, int, int], None]


@dataclass
class CompareResult:
    """What `qemu-img compare` answers: exit code, first difference, its text."""

    exit_code: int                      # 0 identical, 1 different, 2 cannot open, 4 read error
    message: str                        # qemu-img's text (lines joined by newlines)
    first_difference: int | None = None   # guest offset qemu-img reports, when it reports one
    size_mismatch: bool = False

    @property
    def identical(self) -> bool:
        return self.exit_code == 0


class _Side:
    """One image's guest map as boundaries plus a per-run 'reads as zeros' flag."""

    def __init__(self, image) -> None:
        self.image = image
        self.size = int(image.virtual_size)
        table = image.extent_table()
        order = np.argsort(table.guest, kind="stable")
        self.starts = table.guest[order].astype(np.uint64)
        self.ends = self.starts + table.length[order].astype(np.uint64)
        kind = table.kind[order]
        self.zero = (kind == KIND_ZERO) | (kind == KIND_UNALLOCATED)
        self._strict_model(image)
        self.reader = image.open_guest()
        self._buffer: np.ndarray | None = None

    def _strict_model(self, image) -> None:
        """qemu's block status flags per run (strict mode compares them, EOF bit included)."""
        from ..io.chain import map_flags, merge_for_map
        table = merge_for_map(image.map_extent_table())
        present, zero, data, has_offset = map_flags(table)
        if image.format in NO_BACKING_FORMATS:   # their unallocated blocks are not 'zero'
            zero = zero & present
        status = (np.where(present, _ALLOCATED, 0) | np.where(zero, _ZERO, 0)
                  | np.where(data, _DATA, 0) | np.where(has_offset, _OFFSET_VALID, 0))
        order = np.argsort(table.guest, kind="stable")
        self.status_starts = table.guest[order].astype(np.uint64)
        self.status = status[order].astype(np.int64)
        # qemu's last block-status call (the one with the EOF bit) starts at the last run
        # or at the last boundary of the format's per-call span, whichever is later
        last = int(self.status_starts[-1]) if self.status_starts.size else 0
        span = _status_span(image)
        if span and self.size:
            last = max(last, (self.size - 1) // span * span)
        self.eof_from = last

    def boundaries(self, lo: int, hi: int) -> np.ndarray:
        b = np.concatenate([self.starts, self.ends]).astype(np.uint64)
        return b[(b > lo) & (b < hi)]

    def run_at(self, offsets: np.ndarray) -> np.ndarray:
        """Index of the run holding each offset (-1 where no run does)."""
        i = np.searchsorted(self.starts, offsets.astype(np.uint64), side="right") - 1
        inside = (i >= 0) & (offsets < self.ends[np.maximum(i, 0)])
        return np.where(inside, i, -1)

    def zero_at(self, offsets: np.ndarray) -> np.ndarray:
        i = self.run_at(offsets)
        return np.where(i >= 0, self.zero[np.maximum(i, 0)], True)

    def status_at(self, offsets: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.status_starts, offsets.astype(np.uint64), side="right") - 1
        status = np.where(i >= 0, self.status[np.maximum(i, 0)], _ZERO)
        return status | np.where(offsets >= self.eof_from, _EOF, 0)

    def read(self, offset: int, length: int) -> np.ndarray:
        """Guest bytes into this side's reused block buffer (valid until the next read)."""
        if self._buffer is None:
            self._buffer = np.empty(BLOCK, np.uint8)
        out = self._buffer[:length]
        self.reader.pread_into(offset, out)
        return out


def _status_span(image) -> int:
    """Most bytes one block-status call of QEMU's driver answers (0: no limit)."""
    cs = int(image.cluster_size or 0)
    if image.format == "qcow2" and cs:
        extended = bool(getattr(getattr(image, "geometry", None), "extended_l2", False))
        return cs * (cs // (16 if extended else 8))       # one L2 table
    if image.format in ("vmdk", "vdi", "vpc", "qcow") and cs:
        return cs                                         # one grain / block / cluster
    return 0


def _segments(sides: list[_Side], lo: int, hi: int) -> np.ndarray:
    """Sorted cut points in [lo, hi] where either side's run changes."""
    cuts = np.unique(np.concatenate([np.array([lo, hi], np.uint64)]
                                    + [s.boundaries(lo, hi) for s in sides]))
    return cuts


def _merge(starts, ends, a_zero, b_zero, keep):
    """Kept segments, adjacent ones of the same zero pattern joined into one range."""
    starts, ends, a_zero, b_zero = starts[keep], ends[keep], a_zero[keep], b_zero[keep]
    if not starts.size:
        return starts, ends, a_zero, b_zero
    same = ((starts[1:] == ends[:-1]) & (a_zero[1:] == a_zero[:-1])
            & (b_zero[1:] == b_zero[:-1]))
    first = np.concatenate([[True], ~same])
    last = np.concatenate([~same, [True]])
    return starts[first], ends[last], a_zero[first], b_zero[first]


def _first_sector(block_start: int, index: int) -> int:
    """The offset qemu-img prints: the differing sector's start, counted from the block."""
    return block_start + index - index % SECTOR


def _compare_range(a: _Side, b: _Side, start: int, end: int, a_zero: bool,
                   b_zero: bool) -> int | None:
    """First reported difference in [start, end) (at most one side is a zero run)."""
    pos = start
    while pos < end:
        n = min(BLOCK, end - pos)
        if a_zero or b_zero:
            hit = first_nonzero((b if a_zero else a).read(pos, n))
        else:
            hit = first_difference(a.read(pos, n), b.read(pos, n))
        if hit is not None:
            return _first_sector(pos, hit)
        pos += n
    return None


def _nonzero_in(side: _Side, start: int, end: int) -> int | None:
    pos = start
    while pos < end:
        n = min(BLOCK, end - pos)
        hit = first_nonzero(side.read(pos, n))
        if hit is not None:
            return _first_sector(pos, hit)
        pos += n
    return None


def _open(path, fmt, allow_paths):
    import imgscope
    if hasattr(path, "extent_table"):
        return path, False
    return imgscope.open(path, fmt, allow_paths=allow_paths), True


def compare_images(a, b, *, fmt_a: str | None = None, fmt_b: str | None = None,
                   strict: bool = False, progress: Progress | bool | None = None,
                   allow_paths=None) -> CompareResult:
    """Compare the guest disks of `a` and `b` (paths or opened images), read-only.

    `progress(stage, done, total)` follows the bytes compared; True: a tqdm bar.
    """
    opened = []
    close_bar = None
    if progress is False:
        progress = None
    elif progress is True:
        from ..progress import byte_bar
        bar, close_bar = byte_bar("compare")
        progress = lambda stage, done, total: bar(done, total)  # noqa: E731
    try:
        sides = []
        for path, fmt in ((a, fmt_a), (b, fmt_b)):
            try:
                image, own = _open(path, fmt, allow_paths)
            except ImageError as exc:
                return CompareResult(2, f"Could not open '{path}': {exc}")
            if own:
                opened.append(image)
            try:
                sides.append(_Side(image))
            except ImageError as exc:
                return CompareResult(3, f"Sector allocation test failed for {path}: {exc}")
        try:
            return _compare(sides[0], sides[1], strict, progress)
        except ImageError as exc:
            off = f" at offset {exc.offset}" if exc.offset is not None else ""
            return CompareResult(4, f"Error while reading{off}: {exc}")
    finally:
        for image in opened:
            image.close()
        if close_bar is not None:
            close_bar()


def _compare(a: _Side, b: _Side, strict: bool, progress: Progress | None) -> CompareResult:
    common, total = min(a.size, b.size), max(a.size, b.size)
    mismatch = a.size != b.size
    if strict and mismatch:
        return CompareResult(1, "Strict mode: Image size mismatch!", size_mismatch=True)

    def step(done: int) -> None:
        if progress is not None:
            progress("compare", done, total)

    step(0)
    cuts = _segments([a, b], 0, common)
    if strict:     # status runs cut the walk too
        extra = [s.status_starts[(s.status_starts > 0) & (s.status_starts < common)]
                 for s in (a, b)] + [np.array([x.eof_from for x in (a, b) if 0 < x.eof_from
                                               < common], np.uint64)]
        cuts = np.unique(np.concatenate([cuts] + extra).astype(np.uint64))
    starts, ends = cuts[:-1], cuts[1:]
    if starts.size:
        a_zero, b_zero = a.zero_at(starts), b.zero_at(starts)
        if strict:
            bad = np.flatnonzero(a.status_at(starts) != b.status_at(starts))
            limit = int(starts[bad[0]]) if bad.size else common
        else:
            limit = common
        starts, ends, a_zero, b_zero = _merge(starts, np.minimum(ends, limit), a_zero, b_zero,
                                              keep=(starts < limit) & ~(a_zero & b_zero))
        for s, e, az, bz in zip(starts.tolist(), ends.tolist(), a_zero.tolist(),
                                b_zero.tolist()):   # one step per differently-mapped range
            hit = _compare_range(a, b, s, e, az, bz)
            if hit is not None:
                return CompareResult(1, f"Content mismatch at offset {hit}!", hit)
            step(e)
        if limit < common:
            return CompareResult(1, f"Strict mode: Offset {limit} block status mismatch!",
                                 limit)
    step(common)
    if not mismatch:
        return CompareResult(0, "Images are identical.")
    warning = "Warning: Image size mismatch!"
    over = a if a.size > b.size else b
    cuts = _segments([over], common, total)
    starts, ends = cuts[:-1], cuts[1:]
    if starts.size:
        zero = over.zero_at(starts)
        starts, ends, zero, _ = _merge(starts, ends, zero, zero, keep=~zero)
        for s, e in zip(starts.tolist(), ends.tolist()):
            hit = _nonzero_in(over, s, e)
            if hit is not None:
                return CompareResult(1, f"{warning}\nContent mismatch at offset {hit}!", hit,
                                     size_mismatch=True)
            step(e)
    step(total)
    return CompareResult(0, f"{warning}\nImages are identical.", size_mismatch=True)
