"""A reader over pieces of another reader: partitions and logical volumes.

A partition is one span of the guest disk; a linear logical volume is several
spans of its physical volume.  Both are served by `SpanReader`, so there is one
place that maps an inner offset to an outer one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ImageError
from .reader import PositionalReader


class SpanReader(PositionalReader):
    """Readable, seekable file made of spans of `base` (anything with `pread_into`).

    `spans` are (start, length, base_offset) in this file's coordinates; bytes
    covered by no span read as zeros.  Spans past the end of `base` are refused
    when built, so a hostile table cannot make a read go beyond the disk.
    """

    def __init__(self, base, spans: Sequence[tuple[int, int, int]], size: int | None = None,
                 *, name: str = "span") -> None:
        super().__init__()
        self.base = base
        rows = sorted((int(s), int(n), int(b)) for s, n, b in spans if int(n) > 0)
        base_size = int(getattr(base, "size", 0))
        for start, length, offset in rows:
            if start < 0 or offset < 0 or offset + length > base_size:
                raise ImageError(f"{name}: span of {length} bytes at {offset} lies outside "
                                 f"the {base_size}-byte disk", offset=offset, structure=name)
        for (s0, n0, _), (s1, _, _) in zip(rows, rows[1:]):
            if s0 + n0 > s1:
                raise ImageError(f"{name}: spans overlap at {s1}", offset=s1, structure=name)
        self.starts = np.array([r[0] for r in rows], np.int64)
        self.lengths = np.array([r[1] for r in rows], np.int64)
        self.offsets = np.array([r[2] for r in rows], np.int64)
        end = int(self.starts[-1] + self.lengths[-1]) if rows else 0
        self.size = end if size is None else int(size)
        self.name = name

    def pread_into(self, offset: int, out: np.ndarray) -> None:
        pos, end = offset, offset + out.size
        while pos < end:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1
            if i >= 0 and pos < int(self.starts[i] + self.lengths[i]):
                stop = min(end, int(self.starts[i] + self.lengths[i]))
                self.base.pread_into(int(self.offsets[i]) + pos - int(self.starts[i]),
                                     out[pos - offset:stop - offset])
            else:                      # a gap before the next span (or after the last)
                stop = min(end, int(self.starts[i + 1])) if i + 1 < self.starts.size else end
                out[pos - offset:stop - offset] = 0
            pos = stop
