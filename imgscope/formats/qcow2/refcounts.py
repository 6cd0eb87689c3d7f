"""qcow2 refcount table and refcount blocks of any width, decoded with numpy."""
from __future__ import annotations

import numpy as np

from ...schemas import qcow2 as S
from ..base import validate_table
from .clusters import read_table
from ..base import note_bad_entries


def read_reftable(image) -> np.ndarray | None:
    h = image.header.values
    cs = image.cluster_size
    nbytes = h["refcount_table_clusters"] * cs
    if nbytes > S.MAX_REFTABLE_BYTES:
        image.note("error", "refcount_table_too_large",
                   f"refcount table of {nbytes} bytes exceeds QEMU's 8 MiB limit",
                   structure="header.refcount_table_clusters", host_offset=56)
    return read_table(image, h["refcount_table_offset"], nbytes // 8, "refcount table", cs)


def refblock_offsets(image, reftable: np.ndarray) -> np.ndarray:
    """Validated refcount block offsets per refcount table entry (0 = none/invalid)."""
    cs = image.cluster_size
    base = image.header.values["refcount_table_offset"]
    entry_offsets = np.uint64(base) + np.uint64(8) * np.arange(reftable.size, dtype=np.uint64)
    reserved = np.flatnonzero(reftable & np.uint64(S.REFT_RESERVED_MASK))
    if reserved.size:
        note_bad_entries(image, reserved, "reftable_reserved_bits",
                         lambda k: f"refcount table entry {k} has reserved bits set",
                         "refcount table", entry_offsets)
    off = reftable & np.uint64(S.REFT_OFFSET_MASK)
    bad = np.flatnonzero((off != 0) & ((off % np.uint64(cs) != 0)
                                       | (off + np.uint64(cs) > np.uint64(image.source.size))))
    if bad.size:
        note_bad_entries(image, bad, "refblock_invalid",
                         lambda k: f"refcount block {k} at {int(off[k]):#x} is misaligned or "
                         "outside the image", "refcount table", entry_offsets)
        off = off.copy()
        off[bad] = 0
    return off


def refcounts(image) -> tuple[np.ndarray, np.ndarray]:
    """(refcount table entries, stored refcount of every cluster covered by a block).

    The refcount array covers refcount-table-entries x block-entries clusters;
    clusters of missing blocks have refcount 0.
    """
    reftable = image._reftable()
    if reftable is None:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    order = image.header.values["refcount_order"]
    if order > 6:
        return reftable, np.zeros(0, np.uint64)
    cs = image.cluster_size
    per_block = cs * 8 >> order
    off = refblock_offsets(image, reftable)
    used = np.flatnonzero(off)
    if used.size == 0:
        return reftable, np.zeros(0, np.uint64)
    n_blocks = int(used[-1]) + 1
    if n_blocks * per_block * 8 > image.limits.max_metadata_bytes:
        from ...errors import LimitExceeded
        raise LimitExceeded("refcount array would exceed the metadata limit",
                            path=str(image.path), structure="refcount table")
    out = np.zeros(n_blocks * per_block, np.uint64)
    for k in used.tolist():
        block = image.source.read(int(off[k]), cs, "refcount block")
        out[k * per_block:(k + 1) * per_block] = S.decode_refcounts(block, order)
    return reftable, out


def count_in_use(image, end_cluster: int, stop_at: int) -> int:
    """Clusters below `end_cluster` with a non-zero refcount, counted block by
    block and stopping at `stop_at` (QEMU's metadata-preallocation test)."""
    reftable = image._reftable()
    order = image.header.values["refcount_order"]
    if not reftable.size or order > 6:
        return 0
    cs = image.cluster_size
    per_block = cs * 8 >> order
    off = refblock_offsets(image, reftable)
    count = 0
    for k in np.flatnonzero(off).tolist():
        first = k * per_block
        if first >= end_cluster:
            break
        block = S.decode_refcounts(image.source.read(int(off[k]), cs, "refcount block"), order)
        count += int(np.count_nonzero(block[:end_cluster - first]))
        if count >= stop_at:
            break
    return count
