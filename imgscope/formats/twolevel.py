"""The two-level table walk every sparse format shares.

qcow2 (L1 -> L2), VMDK (grain directory -> grain tables), COWD and seSparse
all map guest units through a directory of table offsets.  This module does
the common part once: directory holes become unallocated spans, tables are
read chunk by chunk (contiguous tables in one read, memory bounded), a
format-specific classifier turns each chunk's entries into runs, and the
result is coalesced and clipped to the disk size.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import LimitExceeded
from ..model import ExtentTable, KIND_UNALLOCATED, NO_HOST
from .base import coalesce

CHUNK_UNITS = 1 << 21


def read_tables(image, offsets: np.ndarray, table_bytes: int, parse: Callable[[bytes, int], np.ndarray],
                structure: str, source=None) -> tuple[np.ndarray, np.ndarray]:
    """Unique table offsets (sorted) and their parsed tables stacked (n, entries).

    `parse(data, n_tables)` decodes n contiguous tables with the format's schema.
    Contiguous tables are read in one pread.
    """
    uniq = np.unique(offsets[offsets != 0])
    budget = image.limits.max_metadata_bytes
    if uniq.size * table_bytes > budget:
        raise LimitExceeded(f"{uniq.size} {structure}s exceed the metadata limit of {budget} bytes",
                            path=str(image.path), structure=structure)
    parts = []
    if uniq.size:
        breaks = np.flatnonzero(np.diff(uniq) != table_bytes) + 1
        starts = np.concatenate([[0], breaks]).tolist()
        ends = np.concatenate([breaks, [uniq.size]]).tolist()
        for a, b in zip(starts, ends):
            data = (source or image.source).read(int(uniq[a]), (b - a) * table_bytes, structure)
            parts.append(parse(data, b - a))
    tables = np.concatenate(parts) if parts else parse(b"", 0)
    return uniq, tables


def units_at(first_units: np.ndarray, pos: np.ndarray, per_table: int) -> np.ndarray:
    """Guest unit number of entries `pos` of a chunk (see two_level_map)."""
    pos = np.asarray(pos)
    return first_units[pos // per_table] + (pos % per_table).astype(np.uint64)


def run_starts(entries: np.ndarray, hosted: np.ndarray, step: int, breaks: np.ndarray,
               per_table: int) -> np.ndarray:
    """Indices where a run of entries starts.

    A run goes on while the next entry equals this one (no host) or this one
    plus `step` (contiguous host, same flags) and `breaks` is not set; runs
    never cross a table boundary.  Classifying only run starts is what makes
    a terabyte of preallocated metadata a handful of runs.
    """
    step_ok = np.where(hosted[:-1], entries[1:] - entries[:-1] == entries.dtype.type(step),
                       entries[1:] == entries[:-1]) & ~breaks[1:]
    step_ok[per_table - 1::per_table] = False
    return np.flatnonzero(np.concatenate([[True], ~step_ok]))


def two_level_map(image, *, directory: np.ndarray, per_table: int, unit_bytes: int, size: int,
                  table_bytes: int, parse_tables: Callable[[bytes, int], np.ndarray],
                  classify: Callable[[np.ndarray, np.ndarray], ExtentTable], files: list,
                  codec: str = "none", cluster_size: int = 0,
                  structure: str = "table", source=None) -> ExtentTable:
    """Guest map of one layer from a directory of table byte offsets (0 = none).

    Tables are read from `source` (default: the image's own file).
    `classify(entries, first_units, table_offsets)` receives a chunk of
    entries (its tables flattened), the guest unit number of each table's
    first entry (see units_at) and each table's host offset (to name the
    place of a bad entry), and returns that chunk's runs.
    """
    span = unit_bytes * per_table
    size = min(size, (1 << 63) - 1)
    needed = -(-size // span)
    directory = directory[:needed]
    allocated = np.flatnonzero(directory != 0)
    if allocated.size * table_bytes > image.limits.max_metadata_bytes:
        raise LimitExceeded(f"{allocated.size} {structure}s exceed the metadata limit",
                            path=str(image.path), structure=structure)
    pieces = []
    # directory entries without a table: one unallocated run per gap between
    # allocated entries (never an array as long as the disk: sizes may be 2^63)
    gap_start = np.concatenate([[0], allocated + 1]).astype(np.uint64)
    gap_end = np.concatenate([allocated, [needed]]).astype(np.uint64)
    gaps = gap_end > gap_start
    if gaps.any():
        g0, g1 = gap_start[gaps], gap_end[gaps]
        n = g0.size
        pieces.append(ExtentTable(g0 * np.uint64(span), (g1 - g0) * np.uint64(span),
                                  np.full(n, KIND_UNALLOCATED, np.uint8), np.full(n, NO_HOST, np.uint64),
                                  np.zeros(n, np.uint64), np.full(n, -1, np.int16),
                                  np.zeros(n, np.int16), files))
    per_chunk = max(1, CHUNK_UNITS // per_table)
    for c in range(0, allocated.size, per_chunk):
        idx = allocated[c:c + per_chunk]
        uniq, tables = read_tables(image, directory[idx], table_bytes, parse_tables, structure,
                                   source)
        entries = tables[np.searchsorted(uniq, directory[idx])].reshape(-1)
        pieces.append(classify(entries, idx.astype(np.uint64) * np.uint64(per_table),
                               directory[idx]))
    if not pieces:
        return ExtentTable.empty(files)
    from ..io.chain import concat
    t = concat(pieces, files)
    t = coalesce(t.guest, t.length, t.kind, t.host, t.host_length, t.file, files,
                 codec=codec, cluster_size=cluster_size, flags=t.flags)
    t = t.take(t.guest < np.uint64(size))
    if len(t):
        over = t.guest + t.length > np.uint64(size)
        t.length[over] = np.uint64(size) - t.guest[over]
    return t
