"""Zero and difference detection on buffers, per allocation unit, in numpy.

The hot path of convert and compare: each unit's first word is looked at first
(almost every unit of real data has a non-zero byte there), and only the units
whose head is zero are scanned whole, so data costs one strided read and only
zero-looking space costs a full scan, as qemu's buffer_is_zero makes it.
"""
from __future__ import annotations

import numpy as np

from .base import pwrite_all


def _rows(buf: np.ndarray, full: int, unit: int) -> np.ndarray:
    body = buf[:full * unit]
    return (body.view(np.uint64) if unit % 8 == 0 else body).reshape(full, -1)


def nonzero_units(buf: np.ndarray, unit: int) -> np.ndarray:
    """One bool per `unit` bytes of `buf` (the last unit may be short): holds a non-zero byte."""
    full = buf.size // unit
    out = np.empty(full + (buf.size % unit > 0), bool)
    if full:
        rows = _rows(buf, full, unit)
        out[:full] = rows[:, 0] != 0
        doubtful = np.flatnonzero(~out[:full])
        if doubtful.size * 2 > full:            # mostly zero heads: scan all, no copy
            out[:full] = rows.max(axis=1) != 0
        elif doubtful.size:
            out[doubtful] = rows[doubtful].max(axis=1) != 0
    if buf.size % unit:
        out[-1] = bool(buf[full * unit:].max() != 0)
    return out


def differ_units(a: np.ndarray, b: np.ndarray, unit: int) -> np.ndarray:
    """One bool per unit: `a` and `b` (same length) differ somewhere in it."""
    full = a.size // unit
    out = np.empty(full + (a.size % unit > 0), bool)
    if full:
        out[:full] = (_rows(a, full, unit) != _rows(b, full, unit)).any(axis=1)
    if a.size % unit:
        out[-1] = bool((a[full * unit:] != b[full * unit:]).any())
    return out


def unit_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, stop) of each run of True in a boolean array."""
    if mask.all():                       # the common cases, without the edge arithmetic
        return [(0, int(mask.size))] if mask.size else []
    if not mask.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def first_nonzero(buf: np.ndarray, unit: int = 4096) -> int | None:
    """Index of the first non-zero byte of `buf`, or None."""
    hits = np.flatnonzero(nonzero_units(buf, unit))
    if not hits.size:
        return None
    k = int(hits[0]) * unit
    return k + int(np.flatnonzero(buf[k:k + unit])[0])


def first_difference(a: np.ndarray, b: np.ndarray, unit: int = 4096) -> int | None:
    """Index of the first byte where `a` and `b` differ, or None."""
    hits = np.flatnonzero(differ_units(a, b, unit))
    if not hits.size:
        return None
    k = int(hits[0]) * unit
    return k + int(np.flatnonzero(a[k:k + unit] != b[k:k + unit])[0])


def write_nonzero(fd: int, data, offset: int, piece: int = 4096) -> None:
    """Write only the `piece`-sized parts of `data` holding a non-zero byte.

    For freshly allocated host space whose unwritten bytes are holes that read
    as zeros: the zero parts stay holes, as qemu-img's -S leaves them.
    """
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    for a, b in unit_runs(nonzero_units(buf, piece)):
        pwrite_all(fd, buf[a * piece:min(b * piece, buf.size)], offset + a * piece)

