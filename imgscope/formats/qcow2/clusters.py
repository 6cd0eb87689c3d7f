"""L1/L2 translation for qcow2: tables in, guest runs out, all in numpy.

One function maps any L1 table (the active one or a snapshot's) to an
ExtentTable of this layer: L2 tables are read once each (contiguous ones in
one read), entries are classified with vectorised masks and neighbouring
clusters with contiguous host offsets are merged into runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...model import (ExtentTable, KIND_DATA, KIND_ZERO, KIND_UNALLOCATED,
                      KIND_COMPRESSED, KIND_ENCRYPTED, NO_HOST, FLAG_HIDDEN_OFFSET)
from ...schemas import qcow2 as S
from ..base import coalesce, validate_table, note_bad_entries, note_beyond_eof
from ..twolevel import read_tables, run_starts, two_level_map, units_at



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


def parse_l2_tables(geo: Geometry):
    """Schema-driven decoder of n contiguous L2 tables -> (n, l2_entries) native array."""
    def parse(data: bytes, n: int) -> np.ndarray:
        t = S.l2_table(n * geo.l2_entries, geo.extended_l2).parse(data)
        if geo.extended_l2:
            native = np.empty(t.size, [("entry", np.uint64), ("bitmap", np.uint64)])
            native["entry"], native["bitmap"] = t["entry"], t["bitmap"]
            t = native
        else:
            t = t.astype(np.uint64)
        return t.reshape(n, geo.l2_entries)
    return parse


def read_l2_tables(image, geo: Geometry, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique L2 offsets (sorted) and their tables stacked as (n, l2_entries) entries."""
    return read_tables(image, offsets, geo.cluster_size, parse_l2_tables(geo), "L2 table")


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
    """This layer's guest map described by one L1 table (active or a snapshot's)."""
    size = geo.size if size is None else size
    files = files if files is not None else image.files()
    l1 = l1[:-(-size // (geo.cluster_size * geo.l2_entries))]
    directory = l2_offsets(image, geo, l1, l1_offset, structure)
    return two_level_map(image, directory=directory, per_table=geo.l2_entries,
                         unit_bytes=geo.cluster_size, size=size, table_bytes=geo.cluster_size,
                         parse_tables=parse_l2_tables(geo),
                         classify=lambda e, first, tables: _classify_chunk(image, geo, e, first,
                                                                           tables, files),
                         files=files, codec=geo.codec, cluster_size=geo.cluster_size,
                         structure="L2 table")


def _check_entries(image, geo: Geometry, e, first_units, tables, structure: str) -> None:
    """Reserved bits and misaligned data offsets, on the whole chunk (vectorised).

    Findings name the L2 entry's own offset in the file."""
    compressed = (e & np.uint64(S.OFLAG_COMPRESSED)) != 0
    off = e & np.uint64(S.L2E_OFFSET_MASK)
    l2e = geo.l2_entries
    for code, bad, what in (
            ("l2_reserved_bits", ~compressed & ((e & np.uint64(S.L2E_STD_RESERVED_MASK)) != 0),
             lambda i: f"has reserved bits set: {int(e[i]):#x}"),
            ("data_cluster_misaligned", ~compressed & (off % np.uint64(geo.cluster_size) != 0),
             lambda i: f"points at {int(off[i]):#x}, not cluster aligned")):
        pos = np.flatnonzero(bad)
        if not pos.size:
            continue
        guest = units_at(first_units, pos, l2e) << np.uint64(geo.cluster_bits)
        where = tables[pos // l2e] + (pos % l2e).astype(np.uint64) * np.uint64(8)
        note_bad_entries(image, np.arange(pos.size), code,
                         lambda k: f"L2 entry for guest {int(guest[k]):#x} {what(pos[k])}",
                         structure, where)


def _classify_chunk(image, geo: Geometry, entries, first_units, tables, files) -> ExtentTable:
    """Runs of one chunk of L2 entries; standard entries are classified at run starts only."""
    cs = geo.cluster_size
    # a data file that could not be opened leaves its runs without a file (unreadable)
    data_file_idx = (1 if len(files) > 1 else -1) if geo.data_file else 0
    if not geo.extended_l2:
        e = entries
        _check_entries(image, geo, e, first_units, tables, "L2 table")
        off = e & np.uint64(S.L2E_OFFSET_MASK)
        compressed = (e & np.uint64(S.OFLAG_COMPRESSED)) != 0
        starts = run_starts(e, (off != 0) & ~compressed, cs, compressed, geo.l2_entries)
        counts = np.diff(np.append(starts, e.size)).astype(np.uint64)
        kind, host, hlen = classify_standard(geo, e[starts])
        length = counts * np.uint64(cs)
        guest = units_at(first_units, starts, geo.l2_entries) << np.uint64(geo.cluster_bits)
    else:
        guest = units_at(first_units, np.arange(entries.size), geo.l2_entries) << np.uint64(geo.cluster_bits)
        kind, host, hlen, guest, length = _classify_extended(image, geo, entries, guest)
    file = np.where(host == NO_HOST, -1,
                    np.where(kind == KIND_COMPRESSED, 0, data_file_idx)).astype(np.int16)
    flags = np.full(kind.size, FLAG_HIDDEN_OFFSET if geo.encrypted else 0, np.uint8)
    t = coalesce(guest, length, kind, host, hlen, file, files, codec=geo.codec,
                 cluster_size=cs, flags=flags)
    note_beyond_eof(image, t, geo.cluster_size, "L2 table")
    return t


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
