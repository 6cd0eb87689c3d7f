"""L1/L2 translation for qcow2: tables in, guest runs out, all in numpy.

One function maps any L1 table (the active one or a snapshot's) to an
ExtentTable of this layer: L2 tables are read once each (contiguous ones in
one read), entries are classified with vectorised masks and neighbouring
clusters with contiguous host offsets are merged into runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import LimitExceeded
from ...model import (ExtentTable, KIND_DATA, KIND_ZERO, KIND_UNALLOCATED,
                      KIND_COMPRESSED, KIND_ENCRYPTED, NO_HOST, FLAG_HIDDEN_OFFSET)
from ...schemas import qcow2 as S
from ..base import coalesce, validate_table
from .. import base as _base

FINDINGS_PER_CODE = 20
CHUNK_UNITS = 1 << 21


@dataclass(frozen=True)
class Geometry:
    """Everything needed to decode table entries, derived from the header."""

    cluster_bits: int
    size: int
    version: int
    extended_l2: bool
    encrypted: bool
    data_file: bool
    codec: str

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // (16 if self.extended_l2 else 8)

    @property
    def l1_needed(self) -> int:
        span = self.cluster_size * self.l2_entries
        return -(-self.size // span)

    @property
    def csize_shift(self) -> int:
        return S.csize_shift(self.cluster_bits)


def note_bad_entries(image, idx: np.ndarray, code: str, message, structure: str,
                     offsets: np.ndarray, severity: str = "error") -> None:
    """A finding per bad entry for the first few, then one summary finding."""
    for k in idx[:FINDINGS_PER_CODE]:
        image.note(severity, code, message(int(k)), structure=structure, index=int(k),
                   host_offset=int(offsets[k]))
    if idx.size > FINDINGS_PER_CODE:
        image.note(severity, code, f"{idx.size - FINDINGS_PER_CODE} more entries of {structure} "
                   f"with the same problem ({code})", structure=structure)


def read_table(image, offset: int, count: int, structure: str, align: int) -> np.ndarray | None:
    """A u64 table as native uint64, after the validation gate; None if unreadable."""
    nbytes = count * 8
    if not validate_table(image, offset, nbytes, structure, align=align):
        return None
    data = image.source.read(offset, nbytes, structure)
    return S.u64_table(count).parse(data).astype(np.uint64)


def l2_offsets(image, geo: Geometry, l1: np.ndarray, l1_offset: int, structure: str) -> np.ndarray:
    """Validated L2 table offsets for the L1 entries that matter (0 = none)."""
    cs = geo.cluster_size
    reserved = np.flatnonzero(l1 & np.uint64(S.L1E_RESERVED_MASK))
    if reserved.size:
        note_bad_entries(image, reserved, "l1_reserved_bits",
                         lambda k: f"{structure} entry {k} has reserved bits set: {int(l1[k]):#x}",
                         structure, l1_offset + 8 * np.arange(l1.size, dtype=np.uint64))
    off = l1 & np.uint64(S.L1E_OFFSET_MASK)
    bad_align = np.flatnonzero((off != 0) & (off % np.uint64(cs) != 0))
    beyond = np.flatnonzero((off != 0) & (off + np.uint64(cs) > np.uint64(image.source.size)))
    entry_offsets = np.uint64(l1_offset) + np.uint64(8) * np.arange(l1.size, dtype=np.uint64)
    if bad_align.size:
        note_bad_entries(image, bad_align, "l2_table_misaligned",
                         lambda k: f"L2 table {int(off[k]):#x} of {structure} entry {k} is not "
                         "cluster aligned", structure, entry_offsets)
    if beyond.size:
        note_bad_entries(image, beyond, "l2_table_beyond_eof",
                         lambda k: f"L2 table {int(off[k]):#x} of {structure} entry {k} lies "
                         "beyond the end of the file", structure, entry_offsets)
    off = off.copy()
    off[bad_align] = 0
    off[beyond] = 0
    return off


def read_l2_tables(image, geo: Geometry, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique L2 offsets (sorted) and their tables stacked as (n, l2_entries) entries."""
    uniq = np.unique(offsets[offsets != 0])
    cs = geo.cluster_size
    budget = image.limits.max_metadata_bytes
    if uniq.size * cs > budget:
        raise LimitExceeded(f"{uniq.size} L2 tables exceed the metadata limit of {budget} bytes",
                            path=str(image.path), structure="L2 tables")
    dtype = S.EXTENDED_L2_DTYPE if geo.extended_l2 else S.TABLE_DTYPE
    native = dtype.newbyteorder("=") if not geo.extended_l2 else np.dtype(
        [("entry", np.uint64), ("bitmap", np.uint64)])
    out = np.empty((uniq.size, geo.l2_entries), dtype=native)
    # contiguous tables are read with one pread
    if uniq.size:
        breaks = np.flatnonzero(np.diff(uniq) != cs) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [uniq.size]])
        for a, b in zip(starts.tolist(), ends.tolist()):
            data = image.source.read(int(uniq[a]), (b - a) * cs, "L2 table")
            table = S.l2_table((b - a) * geo.l2_entries, geo.extended_l2).parse(data)
            out[a:b] = table.reshape(b - a, geo.l2_entries)
    return uniq, out


def classify_standard(geo: Geometry, e: np.ndarray):
    """kind, host, host_length for standard (64-bit) L2 entries."""
    compressed = (e >> np.uint64(62)) & np.uint64(1) == 1
    copied = (e >> np.uint64(63)) == 1
    off = e & np.uint64(S.L2E_OFFSET_MASK)
    zero = ((e & np.uint64(1)) == 1) & (geo.version >= 3) & ~compressed
    unalloc = (off == 0) & ~(geo.data_file & copied)
    data_kind = KIND_ENCRYPTED if geo.encrypted else KIND_DATA
    kind = np.select([compressed, zero, unalloc], [KIND_COMPRESSED, KIND_ZERO, KIND_UNALLOCATED],
                     default=data_kind).astype(np.uint8)
    host = np.where((kind == data_kind) | ((kind == KIND_ZERO) & (off != 0)), off,
                    NO_HOST).astype(np.uint64)
    host_length = np.zeros(e.size, np.uint64)
    if compressed.any():
        x = np.uint64(geo.csize_shift)
        cmask = np.uint64((1 << int(x)) - 1)
        smask = np.uint64((1 << (geo.cluster_bits - 8)) - 1)
        coff = e[compressed] & cmask
        nsec = ((e[compressed] >> x) & smask) + np.uint64(1)
        host[compressed] = coff
        host_length[compressed] = nsec * np.uint64(512) - (coff & np.uint64(511))
    return kind, host, host_length


def map_l1(image, geo: Geometry, l1: np.ndarray, l1_offset: int, *, size: int | None = None,
           structure: str = "L1 table", files: list | None = None) -> ExtentTable:
    """This layer's guest map described by one L1 table."""
    cs, l2e = geo.cluster_size, geo.l2_entries
    size = geo.size if size is None else size
    files = files if files is not None else image.files()
    unit_bits = geo.cluster_bits
    span = cs * l2e
    needed = -(-size // span)
    l1 = l1[:needed]
    l2off = l2_offsets(image, geo, l1, l1_offset, structure)
    allocated = np.flatnonzero(l2off != 0)
    if allocated.size * cs > image.limits.max_metadata_bytes:
        raise LimitExceeded(f"{allocated.size} L2 tables exceed the metadata limit",
                            path=str(image.path), structure=structure)
    pieces = []
    # whole L1 ranges without an L2 table (and past the end of a short L1)
    holes = np.setdiff1d(np.arange(needed), allocated)
    if holes.size:
        g = holes.astype(np.uint64) * np.uint64(span)
        n = holes.size
        pieces.append(coalesce(g, np.full(n, span, np.uint64), np.full(n, KIND_UNALLOCATED, np.uint8),
                               np.full(n, NO_HOST, np.uint64), np.zeros(n, np.uint64),
                               np.full(n, -1, np.int16), files))
    per_chunk = max(1, CHUNK_UNITS // l2e)
    for c in range(0, allocated.size, per_chunk):
        idx = allocated[c:c + per_chunk]
        # read this chunk's tables only: memory stays bounded by the chunk size
        uniq, tables = read_l2_tables(image, geo, l2off[idx])
        rows = np.searchsorted(uniq, l2off[idx])
        entries = tables[rows].reshape(-1)
        pieces.append(_classify_chunk(image, geo, entries, idx, files))
    if not pieces:
        return ExtentTable.empty(files)
    from ...io.chain import concat
    t = concat(pieces, files)
    t = coalesce(t.guest, t.length, t.kind, t.host, t.host_length, t.file, files,
                 codec=geo.codec, cluster_size=cs, flags=t.flags)
    # clip to the virtual size
    keep = t.guest < np.uint64(size)
    t = t.take(keep)
    if len(t):
        end = t.guest + t.length
        over = end > np.uint64(size)
        t.length[over] = np.uint64(size) - t.guest[over]
    return t


def _guest_of(geo: Geometry, idx: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Guest offset of entry `pos` of a chunk made of the L2 tables of L1 entries `idx`."""
    l2e = geo.l2_entries
    return ((idx[pos // l2e].astype(np.uint64) * np.uint64(l2e) + (pos % l2e).astype(np.uint64))
            << np.uint64(geo.cluster_bits))


def _classify_chunk(image, geo: Geometry, entries, idx, files) -> ExtentTable:
    """Runs of one chunk of L2 entries.

    Standard entries: a run goes on while the next entry is the same (no host)
    or the same plus one cluster (contiguous host, same flags), so only run
    starts are classified: a metadata-preallocated TiB is a handful of runs.
    """
    cs = geo.cluster_size
    data_file_idx = 1 if geo.data_file else 0
    if not geo.extended_l2:
        e = entries
        step = e[1:] - e[:-1]
        off = e & np.uint64(S.L2E_OFFSET_MASK)
        compressed = (e & np.uint64(S.OFLAG_COMPRESSED)) != 0
        hosted = (off != 0) & ~compressed
        same = np.where(hosted[:-1], step == np.uint64(cs), step == 0) & ~compressed[1:]
        same[geo.l2_entries - 1::geo.l2_entries] = False   # table boundaries
        starts = np.flatnonzero(np.concatenate([[True], ~same]))
        counts = np.diff(np.append(starts, e.size)).astype(np.uint64)
        kind, host, hlen = classify_standard(geo, e[starts])
        length = counts * np.uint64(cs)
        guest = _guest_of(geo, idx, starts)
    else:
        guest = _guest_of(geo, idx, np.arange(entries.size))
        kind, host, hlen, guest, length = _classify_extended(image, geo, entries, guest)
    file = np.where(host == NO_HOST, -1,
                    np.where(kind == KIND_COMPRESSED, 0, data_file_idx)).astype(np.int16)
    flags = np.full(kind.size, FLAG_HIDDEN_OFFSET if geo.encrypted else 0, np.uint8)
    return coalesce(guest, length, kind, host, hlen, file, files, codec=geo.codec,
                    cluster_size=cs, flags=flags)


def _classify_extended(image, geo: Geometry, entries, guest):
    """Extended L2: whole clusters where the bitmap is uniform, subclusters elsewhere."""
    cs = geo.cluster_size
    sc = cs // S.SUBCLUSTERS
    e, bm = entries["entry"].astype(np.uint64), entries["bitmap"].astype(np.uint64)
    compressed = (e >> np.uint64(62)) & np.uint64(1) == 1
    off = e & np.uint64(S.L2E_OFFSET_MASK)
    alloc = bm & np.uint64(0xFFFFFFFF)
    zero = bm >> np.uint64(32)
    full = np.uint64(0xFFFFFFFF)
    data_kind = KIND_ENCRYPTED if geo.encrypted else KIND_DATA
    uniform = compressed | ((alloc == 0) & ((zero == 0) | (zero == full))) | ((alloc == full) & (zero == 0))
    kind = np.select([compressed, alloc == full, zero == full], [KIND_COMPRESSED, data_kind, KIND_ZERO],
                     default=KIND_UNALLOCATED).astype(np.uint8)
    host = np.where(off != 0, off, NO_HOST).astype(np.uint64)
    hlen = np.zeros(e.size, np.uint64)
    if compressed.any():
        k2, h2, l2 = classify_standard(geo, e[compressed])
        host[compressed], hlen[compressed] = h2, l2
    length = np.full(e.size, cs, np.uint64)
    mixed = np.flatnonzero(~uniform)
    if not mixed.size:
        return kind, host, hlen, guest, length
    m = mixed.size
    bits = np.arange(S.SUBCLUSTERS, dtype=np.uint64)
    a = ((alloc[mixed, None] >> bits) & np.uint64(1)) == 1
    z = ((zero[mixed, None] >> bits) & np.uint64(1)) == 1
    skind = np.select([a, z], [data_kind, KIND_ZERO], default=KIND_UNALLOCATED).astype(np.uint8)
    sub_off = off[mixed, None] + bits * np.uint64(sc)
    # every subcluster of an allocated cluster keeps its host offset (QEMU reports it
    # for ZERO_ALLOC and UNALLOCATED_ALLOC too); plain ones have none
    shost = np.where(off[mixed, None] != 0, sub_off, NO_HOST).astype(np.uint64)
    sguest = guest[mixed, None] + bits * np.uint64(sc)
    bad = np.flatnonzero(((alloc[mixed] & zero[mixed]) != 0) | ((off[mixed] == 0) & (alloc[mixed] != 0)))
    if bad.size:
        note_bad_entries(image, bad, "subcluster_bitmap_invalid",
                         lambda k: f"extended L2 entry for guest {int(guest[mixed][k]):#x} has an "
                         "invalid subcluster bitmap", "L2 table", guest[mixed])
    keep = np.flatnonzero(uniform)
    cat = lambda u, s: np.concatenate([u[keep], s.reshape(-1)])
    g_all = cat(guest, sguest)
    order = np.argsort(g_all, kind="stable")
    return (cat(kind, skind)[order], cat(host, shost)[order],
            cat(hlen, np.zeros((m, S.SUBCLUSTERS), np.uint64))[order], g_all[order],
            cat(length, np.full((m, S.SUBCLUSTERS), sc, np.uint64))[order])
