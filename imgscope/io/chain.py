"""Backing-chain resolution and qemu-img-map style merging of extent tables.

Both work on whole numpy arrays: the top layer's unallocated runs are cut out
and filled from the parent's (already resolved) table, clipped to the
parent's size; everything past the parent's end stays unallocated, which
reads as zeros (as QEMU does).
"""
from __future__ import annotations

import numpy as np

from ..model import (ExtentTable, KIND_DATA, KIND_ZERO, KIND_UNALLOCATED,
                     KIND_COMPRESSED, KIND_ENCRYPTED, NO_HOST, FLAG_HOST_HOLE, FLAG_HIDDEN_OFFSET)


def split_at(table: ExtentTable, points: np.ndarray) -> ExtentTable:
    """Cut runs at every point in `points` (sorted uint64) that falls inside one."""
    if not len(table) or not points.size:
        return table
    start, end = table.guest, table.guest + table.length
    lo = np.searchsorted(points, start, side="right")
    hi = np.searchsorted(points, end, side="left")
    pieces = (hi - lo) + 1
    if int(pieces.max(initial=1)) == 1:
        return table
    idx = np.repeat(np.arange(len(table)), pieces)
    # k-th piece of run i starts at points[lo[i] + k - 1] (k >= 1) or start[i]
    first = np.cumsum(pieces) - pieces
    k = np.arange(idx.size) - first[idx]
    new_start = np.where(k == 0, start[idx], points[np.minimum(lo[idx] + k - 1, points.size - 1)])
    new_end = np.append(new_start[1:], 0)
    last = np.append(idx[1:] != idx[:-1], True)
    new_end = np.where(last, end[idx], new_end)
    delta = new_start - start[idx]
    kind = table.kind[idx]
    host = table.host[idx].copy()
    shift = (host != NO_HOST) & (kind != KIND_COMPRESSED)
    host[shift] += delta[shift]
    inner = table.inner[idx] + np.where(kind == KIND_COMPRESSED, delta, 0).astype(np.uint64)
    out = table.take(idx)
    return out.replace(guest=new_start.astype(np.uint64),
                       length=(new_end - new_start).astype(np.uint64), host=host, inner=inner)


def concat(tables: list[ExtentTable], files: list) -> ExtentTable:
    tables = [t for t in tables if len(t)]
    if not tables:
        return ExtentTable.empty(files)
    tables = sorted(tables, key=lambda t: int(t.guest[0]))
    order_keys = np.concatenate([t.guest for t in tables])
    # pieces usually arrive sorted and disjoint: only sort when they are not
    order = (slice(None) if bool(np.all(order_keys[1:] >= order_keys[:-1]))
             else np.argsort(order_keys, kind="stable"))
    codec = next((t.codec for t in tables if t.codec != "none"), "none")
    csize = max(t.cluster_size for t in tables)
    arrays = {n: np.concatenate([getattr(t, n) for t in tables])[order] for n in ExtentTable.ARRAYS}
    return tables[0].replace(files=files, codec=codec, cluster_size=csize, **arrays)


def resolve_chain(image) -> ExtentTable:
    """The image's guest map with unallocated runs filled from its parents."""
    own = image._own_extents()
    parent = image.backing
    if parent is None:
        return own
    below = parent.extent_table()
    files = list(own.files) + list(below.files)
    (own_codecs, own_sizes), (below_codecs, below_sizes) = own.per_file(), below.per_file()
    per_file = dict(files=files, file_codecs=own_codecs + below_codecs,
                    file_cluster_sizes=own_sizes + below_sizes)
    shift = len(own.files)
    below = below.replace(file=np.where(below.file >= 0, below.file + shift, -1).astype(np.int16),
                          depth=(below.depth + 1).astype(np.int16), **per_file)
    own = own.replace(**per_file)
    parent_size = np.uint64(parent.virtual_size)
    own = split_at(own, np.array([parent_size], np.uint64))
    holes = (own.kind == KIND_UNALLOCATED) & (own.guest < parent_size)
    if not holes.any():
        return own
    keep = own.take(~holes)
    gaps = own.take(holes)
    # cut the parent's runs at every hole boundary, then keep pieces inside holes
    points = np.unique(np.concatenate([gaps.guest, gaps.guest + gaps.length]))
    below = split_at(below, points)
    pos = np.searchsorted(gaps.guest, below.guest, side="right") - 1
    inside = (pos >= 0) & (below.guest < (gaps.guest + gaps.length)[np.maximum(pos, 0)])
    return concat([keep, below.take(inside)], files)


def map_flags(table: ExtentTable):
    """qemu-img map's (present, zero, data, has_offset) for every run."""
    kind = table.kind
    present = kind != KIND_UNALLOCATED
    zero = (kind == KIND_ZERO) | (kind == KIND_UNALLOCATED) | ((table.flags & FLAG_HOST_HOLE) != 0)
    data = (kind == KIND_DATA) | (kind == KIND_COMPRESSED) | (kind == KIND_ENCRYPTED)
    # unallocated runs may keep a host offset (extended L2 UNALLOCATED_ALLOC)
    has_offset = (table.host != NO_HOST) & ((kind == KIND_DATA) | (kind == KIND_ZERO)
                                            | (kind == KIND_UNALLOCATED))
    has_offset &= (table.flags & FLAG_HIDDEN_OFFSET) == 0
    return present, zero, data, has_offset


def merge_for_map(table: ExtentTable) -> ExtentTable:
    """Merge neighbours the way qemu-img map does (same flags, depth, contiguous host)."""
    n = len(table)
    if n < 2:
        return table
    present, zero, data, has_offset = map_flags(table)
    same = ((present[1:] == present[:-1]) & (zero[1:] == zero[:-1]) & (data[1:] == data[:-1])
            & (has_offset[1:] == has_offset[:-1]) & (table.depth[1:] == table.depth[:-1])
            & (table.kind[1:] == table.kind[:-1]))
    contiguous = (table.host[:-1] + table.length[:-1] == table.host[1:]) & (table.file[1:] == table.file[:-1])
    same &= ~has_offset[:-1] | contiguous
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    ends = np.append(starts[1:], n)
    lengths = np.add.reduceat(table.length, starts)
    out = table.take(starts)
    out.length = lengths.astype(np.uint64)
    # a merged run of compressed clusters is no longer one cluster
    many = (ends - starts) > 1
    out.host_length = np.where(many & (out.kind == KIND_COMPRESSED), 0, out.host_length).astype(np.uint64)
    return out


def mark_host_holes(table: ExtentTable, file_index: int) -> ExtentTable:
    """Split data runs of one host file at its data/hole boundaries; flag the holes.

    QEMU does this for metadata-preallocated qcow2 images: a data cluster whose
    host bytes were never written is reported as data *and* zero.
    """
    src = table.files[file_index]
    runs = np.array(src.data_runs(), dtype=np.uint64).reshape(-1, 2)
    d_start, d_end = runs[:, 0], runs[:, 0] + runs[:, 1]
    bounds = np.unique(np.concatenate([d_start, d_end, [np.uint64(src.size)]]))
    sel = np.flatnonzero((table.kind == KIND_DATA) & (table.file == file_index))
    if not sel.size:
        return table
    h0, h1 = table.host[sel], table.host[sel] + table.length[sel]
    lo = np.searchsorted(bounds, h0, side="right")
    hi = np.searchsorted(bounds, h1, side="left")
    counts = hi - lo
    if counts.sum():
        which = np.repeat(np.arange(sel.size), counts)
        first = np.cumsum(counts) - counts
        k = np.arange(which.size) - first[which]
        hb = bounds[lo[which] + k]
        points = np.unique(table.guest[sel][which] + (hb - h0[which]))
        table = split_at(table, points)
    data = (table.kind == KIND_DATA) & (table.file == file_index)
    host = table.host
    i = np.searchsorted(d_start, host, side="right") - 1
    in_data = (i >= 0) & (host < d_end[np.maximum(i, 0)]) if d_start.size else np.zeros(host.size, bool)
    flags = table.flags.copy()
    flags[data & ~in_data] |= FLAG_HOST_HOLE
    return table.replace(flags=flags)
