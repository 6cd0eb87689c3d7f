"""Build large line-oriented text (10^5+ lines) with numpy instead of a Python loop.

A line is a sequence of segments: constant text, one of a few texts chosen
per line, or an unsigned integer in decimal; any segment can be switched off
per line.  All lines are laid out in one fixed-width 2-D byte array (built column-major) (each
segment owns a block of columns; numbers are right-aligned in as many columns
as the largest needs) with a mask of the bytes really there; one boolean
compression then yields the text.  The cost is a few whole-array passes.
"""
from __future__ import annotations

import numpy as np


class Lines:
    """Accumulates segments for `n` lines; `render(sep)` joins them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.segments: list[tuple] = []

    def const(self, text: str, where: np.ndarray | None = None) -> "Lines":
        b = np.frombuffer(text.encode(), np.uint8)
        self.segments.append((b.size, self._const(b), where))
        return self

    def choice(self, codes: np.ndarray, texts: list[str], where: np.ndarray | None = None) -> "Lines":
        enc = [t.encode() for t in texts]
        w = max(len(t) for t in enc)
        table = np.zeros((len(enc), w), np.uint8)
        lens = np.array([len(t) for t in enc])
        for i, t in enumerate(enc):
            table[i, :len(t)] = np.frombuffer(t, np.uint8)
        codes = np.asarray(codes, np.int64)

        def fill(data, keep):
            data[:] = table.T[:, codes]
            keep[:] = np.arange(w)[:, None] < lens[codes][None, :]
        self.segments.append((w, fill, where))
        return self

    def number(self, values: np.ndarray, where: np.ndarray | None = None) -> "Lines":
        v = np.asarray(values, np.uint64)
        if where is not None:
            v = np.where(where, v, 0).astype(np.uint64)
        top = int(v.max(initial=0))
        width = max(1, len(str(top)))

        def fill(data, keep, v=v):
            # 32-bit division is much faster; most offsets and lengths fit
            v = v.astype(np.uint32) if top < 1 << 32 else v.copy()
            ten = v.dtype.type(10)
            for col in range(width - 1, -1, -1):
                q = v // ten
                data[col] = (v - q * ten).astype(np.uint8) + 48
                v = q
                if col:
                    keep[col - 1] = v > 0      # a significant digit remains on the left
        self.segments.append((width, fill, where))
        return self

    @staticmethod
    def _const(b):
        def fill(data, keep):
            data[:] = b[:, None]
        return fill

    def render_bytes(self, sep: str = "\n") -> bytes:
        if self.n == 0:
            return b""
        sep_b = np.frombuffer(sep.encode(), np.uint8)
        segments = list(self.segments)
        if sep_b.size:
            last = np.ones(self.n, bool)
            last[-1] = False
            segments.append((sep_b.size, self._const(sep_b), last))
        # built transposed (one row per byte column: contiguous writes), then
        # transposed once so that the compression reads line by line
        total = sum(w for w, _, _ in segments)
        data = np.empty((total, self.n), np.uint8)
        keep = np.ones((total, self.n), bool)
        col = 0
        for w, fill, where in segments:
            fill(data[col:col + w], keep[col:col + w])
            if where is not None:
                keep[col:col + w] &= np.asarray(where, bool)[None, :]
            col += w
        return np.ascontiguousarray(data.T)[np.ascontiguousarray(keep.T)].tobytes()

    def render(self, sep: str = "\n") -> str:
        return self.render_bytes(sep).decode()
