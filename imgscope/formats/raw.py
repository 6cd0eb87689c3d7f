"""raw: the guest disk is the file; sparse holes are reported as zero runs."""
from __future__ import annotations

import numpy as np

from ..model import Image, ExtentTable, KIND_DATA, KIND_ZERO


class RawImage(Image):
    format = "raw"

    def __init__(self, source, **kw) -> None:
        super().__init__(source, **kw)
        self.virtual_size = source.size

    def _own_extents(self) -> ExtentTable:
        """Data runs from SEEK_DATA/SEEK_HOLE; holes read as zeros (host offset kept)."""
        size = self.virtual_size
        runs = self.source.data_runs()
        bounds = [0]
        kinds = []
        for start, length in runs:
            if start > bounds[-1]:
                kinds.append(KIND_ZERO)
                bounds.append(start)
            kinds.append(KIND_DATA)
            bounds.append(min(start + length, size))
        if bounds[-1] < size:
            kinds.append(KIND_ZERO)
            bounds.append(size)
        b = np.array(bounds, np.uint64)
        n = len(kinds)
        return ExtentTable(b[:-1].copy(), np.diff(b).astype(np.uint64),
                           np.array(kinds, np.uint8), b[:-1].copy(),
                           np.zeros(n, np.uint64), np.zeros(n, np.int16),
                           np.zeros(n, np.int16), [self.source])

    def _host_regions(self) -> list:
        return [(0, 0, self.virtual_size, "data", "guest disk")] if self.virtual_size else []
