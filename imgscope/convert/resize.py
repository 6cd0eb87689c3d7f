"""Resize an image in place, the one verb that writes an existing file.

Everything is validated before the first byte is written: the image opens
with no finding of severity error, the new size is legal for the format and
the format's tables can describe it.  Writes then go in an order a crash
cannot make worse: new metadata (tables, refcounts) first, into space no
current structure uses, then the header that makes them live, and only then
the release of what the header no longer references (a crash there leaves a
leak, never a corruption).

raw grows by extending the file (sparse, like `truncate`); qcow2 grows its L1
table (moved to the end of the file when it must grow beyond its clusters,
with refcounts kept right) and the header's size; vdi grows where the block
map has room before the data area.  Shrinking needs `shrink=True` and, for
the formats with tables, a tail without allocated data.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConvertError, Unsupported
from ..units import parse_size

MAX_SIZE = 1 << 63


def parse_new_size(text, current: int) -> int:
    """'+1G', '-512M' (relative to `current`) or '10G' / an int (absolute) -> bytes."""
    if isinstance(text, int):
        return text
    t = str(text).strip()
    try:
        if t[:1] in "+-":
            delta = parse_size(t[1:])
            return current + delta if t[0] == "+" else current - delta
        return parse_size(t)
    except (ValueError, IndexError):
        raise ConvertError(f"invalid size {text!r}") from None


def resize_image(path, size, *, fmt: str | None = None, shrink: bool = False,
                 allow_paths=None) -> int:
    """Resize the image at `path` to `size` (absolute or '+N'/'-N'); the new size."""
    import imgscope
    path = Path(path)
    image = imgscope.open(path, fmt, allow_paths=allow_paths)
    try:
        new_size = parse_new_size(size, image.virtual_size)
        if new_size < 0:
            raise ConvertError("New image size must be positive", path=str(path))
        if new_size >= MAX_SIZE:
            raise ConvertError("Image size must be less than 8 EiB", path=str(path))
        if new_size < image.virtual_size and not shrink:
            raise ConvertError("Use the --shrink option to perform a shrink operation.",
                               path=str(path))
        _refuse_damaged(image)
        resizer = _RESIZERS.get(image.format)
        if resizer is None:
            raise Unsupported(f"resizing {image.format} images is not supported",
                              path=str(path))
        if new_size == image.virtual_size:
            return new_size
        plan = resizer(image, new_size)      # validates and returns the writes to make
    finally:
        image.close()
    plan()
    return new_size


def _refuse_damaged(image) -> None:
    """An image with errors is not written to: resizing could spread the damage."""
    report = image.check()
    bad = [f for f in report.findings if f.severity in ("error", "critical")]
    if bad or report.counts.corruptions or report.counts.check_errors:
        first = bad[0].message if bad else "the check found corruptions"
        raise ConvertError(f"refusing to resize an image with errors ({first}); "
                           "check and repair it first", path=str(image.path))


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class _Writes:
    """Ordered writes: `data` steps, a sync, the `commit` step, a sync, `release` steps."""

    def __init__(self, path: Path, truncate_to: int | None = None) -> None:
        self.path = path
        self.data: list[tuple[int, bytes]] = []
        self.commit: list[tuple[int, bytes]] = []
        self.release: list[tuple[int, bytes]] = []
        self.truncate_to = truncate_to

    def __call__(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            for offset, data in self.data:
                _pwrite_all(fd, data, offset)
            os.fsync(fd)
            for offset, data in self.commit:
                _pwrite_all(fd, data, offset)
            os.fsync(fd)
            for offset, data in self.release:
                _pwrite_all(fd, data, offset)
            if self.truncate_to is not None:
                os.ftruncate(fd, self.truncate_to)
            os.fsync(fd)
        except OSError as exc:
            raise ConvertError(f"resize failed while writing: {exc.strerror}",
                               path=str(self.path)) from None
        finally:
            os.close(fd)


# ---- raw --------------------------------------------------------------------------------
def _resize_raw(image, new_size: int):
    """raw: the file is the disk; growing appends a hole, shrinking cuts the file."""
    path = image.path

    def apply() -> None:
        try:
            os.truncate(path, new_size)
        except OSError as exc:
            raise ConvertError(f"resize failed: {exc.strerror}", path=str(path)) from None
    return apply


# ---- qcow2 ------------------------------------------------------------------------------
def _resize_qcow2(image, new_size: int):
    from ..schemas import qcow2 as S
    from ..formats.qcow2.refcounts import refcounts
    path, cs = image.path, image.cluster_size
    v = image.header.values
    if new_size % 512:
        raise ConvertError("The new size must be a multiple of 512", path=str(path))
    if image.snapshots and new_size < image.virtual_size:
        raise Unsupported("Can't shrink an image which has snapshots", path=str(path))
    if image.bitmaps:
        raise Unsupported("Can't resize an image which has persistent bitmaps",
                          path=str(path))
    if int(v.get("incompatible_features") or 0) & (S.INCOMPAT_DATA_FILE | S.INCOMPAT_DIRTY):
        raise Unsupported("resizing a qcow2 image with an external data file or the dirty "
                          "bit set is not supported", path=str(path))
    geo = image.geometry
    span = cs * geo.l2_entries                       # guest bytes one L1 entry maps
    new_l1_needed = -(-new_size // span)
    l1 = image.l1()
    l1_size, l1_offset = v["l1_size"], v["l1_table_offset"]
    if l1.size != l1_size:
        raise ConvertError("the L1 table cannot be read whole", path=str(path))
    writes = _Writes(path)
    header = dict(S.header_v2.parse(image.source.read(0, S.HEADER_V2_SIZE, "header")))
    header["size"] = new_size

    if new_size < image.virtual_size:
        _qcow2_shrink_checks(image, new_size)
        # L2 tables wholly beyond the new end hold nothing (checked): drop and free them
        drop = np.flatnonzero(l1[new_l1_needed:] & np.uint64(S.L1E_OFFSET_MASK)) + new_l1_needed
        if drop.size:
            zeros = np.zeros(l1_size - new_l1_needed, S.TABLE_DTYPE)
            kept = l1[:new_l1_needed].astype(S.TABLE_DTYPE)
            writes.data.append((l1_offset, kept.tobytes() + zeros.tobytes()))
            freed = (l1[drop] & np.uint64(S.L1E_OFFSET_MASK)) // np.uint64(cs)
            writes.release += _refcount_writes(image, refcounts(image), freed, -1)
        writes.commit.append((0, S.header_v2.build(header)))
        return writes

    if new_l1_needed <= l1_size:                     # the table already maps the new size
        writes.commit.append((0, S.header_v2.build(header)))
        return writes
    if new_l1_needed * 8 > S.MAX_L1_BYTES:
        raise ConvertError(f"an L1 table of {new_l1_needed} entries exceeds QEMU's 32 MiB "
                           "limit", path=str(path))
    old_clusters = -(-l1_size * 8 // cs)
    new_clusters = -(-new_l1_needed * 8 // cs)
    table = np.zeros(new_l1_needed, S.TABLE_DTYPE)
    table[:l1_size] = l1
    header["l1_size"] = new_l1_needed
    if new_clusters <= old_clusters and l1_size:
        # grows inside its own clusters: the new entries are written (as zeros) first
        writes.data.append((l1_offset, table.tobytes()))
        writes.commit.append((0, S.header_v2.build(header)))
        return writes
    # the table moves to fresh clusters at the end of the file, counted before use
    reftable, counts = refcounts(image)
    used = np.flatnonzero(counts)
    end_cluster = max(-(-image.source.size // cs), int(used[-1]) + 1 if used.size else 0)
    placed = np.arange(end_cluster, end_cluster + new_clusters, dtype=np.uint64)
    new_blocks = _place_refblocks(image, reftable, counts, placed)
    every = np.concatenate([placed, np.array(sorted(new_blocks.values()), np.uint64)])
    writes.data += _refcount_writes(image, (reftable, counts), every, +1, new_blocks)
    padded = np.zeros(new_clusters * cs // 8, S.TABLE_DTYPE)
    padded[:new_l1_needed] = table
    new_offset = int(placed[0]) * cs
    writes.data.append((new_offset, padded.tobytes()))
    header["l1_table_offset"] = new_offset
    writes.commit.append((0, S.header_v2.build(header)))
    if l1_size:
        old = np.arange(old_clusters, dtype=np.uint64) + np.uint64(l1_offset // cs)
        # refcounts as they will be once the new clusters are counted
        counts2 = counts.copy()
        writes.release += _refcount_writes(image, (reftable, counts2), old, -1,
                                           new_blocks, counted=every)
    return writes


def _qcow2_shrink_checks(image, new_size: int) -> None:
    """A shrink only drops guest space that holds nothing (no allocated cluster)."""
    from ..model import KIND_UNALLOCATED
    own = image._own_extents()
    end = own.guest + own.length
    busy = (end > np.uint64(new_size)) & (own.kind != KIND_UNALLOCATED)
    if busy.any():
        first = max(int(own.guest[np.flatnonzero(busy)[0]]), new_size)
        raise ConvertError(f"refusing to shrink: guest data is allocated at offset {first}, "
                           "beyond the new end", path=str(image.path))


def _place_refblocks(image, reftable: np.ndarray, counts: np.ndarray,
                     clusters: np.ndarray) -> dict[int, int]:
    """New refcount blocks (table index -> cluster) so `clusters` and the blocks
    themselves are all covered; placed right after `clusters`."""
    from ..schemas import qcow2 as S
    cs = image.cluster_size
    per_block = cs * 8 >> image.header.values["refcount_order"]
    have = set(np.flatnonzero(reftable & np.uint64(S.REFT_OFFSET_MASK)).tolist())
    new_blocks: dict[int, int] = {}
    next_free = int(clusters[-1]) + 1
    for _ in range(8):               # each round adds blocks that may need a block in turn
        every = np.concatenate([clusters, np.array(list(new_blocks.values()), np.uint64)])
        needed = sorted(set((every // np.uint64(per_block)).tolist()) - have - set(new_blocks))
        if not needed:
            return new_blocks
        for k in needed:
            if k >= reftable.size:
                raise Unsupported("the refcount table would have to grow; resizing such an "
                                  "image is not supported", path=str(image.path),
                                  structure="refcount table")
            new_blocks[k] = next_free
            next_free += 1
    raise ConvertError("could not place refcount blocks", path=str(image.path))


def _refcount_writes(image, tables, clusters: np.ndarray, delta: int,
                     new_blocks: dict | None = None, counted=None) -> list:
    """Refcount block and refcount table writes that add `delta` to `clusters`."""
    from ..schemas import qcow2 as S
    reftable, counts = tables
    cs = image.cluster_size
    v = image.header.values
    order = v["refcount_order"]
    per_block = cs * 8 >> order
    new_blocks = dict(new_blocks or {})
    clusters = np.asarray(clusters, np.uint64)
    top = int(max(clusters.max(initial=0), max(new_blocks.values(), default=0))) + 1
    size = -(-max(top, counts.size) // per_block) * per_block
    after = np.zeros(size, np.uint64)
    after[:counts.size] = counts
    if counted is not None:
        np.add.at(after, np.asarray(counted, np.int64), 1)
    before = after.copy()
    np.add.at(after, clusters.astype(np.int64), np.int64(delta) if delta < 0 else delta)
    if delta < 0 and (before[clusters.astype(np.int64)] == 0).any():
        raise ConvertError("refcount would drop below zero", path=str(image.path))
    limit = (1 << (1 << order)) - 1
    if int(after.max(initial=0)) > limit:
        raise ConvertError("refcount overflow", path=str(image.path))
    out = []
    touched = sorted(set((clusters // np.uint64(per_block)).tolist())
                     | (set(new_blocks) if counted is None else set()))
    for k in touched:
        block = after[k * per_block:(k + 1) * per_block]
        if k in new_blocks and counted is None:
            offset = new_blocks[k] * cs
        else:
            offset = int(reftable[k] & np.uint64(S.REFT_OFFSET_MASK)) if k < reftable.size \
                else 0
            if not offset and k in new_blocks:
                offset = new_blocks[k] * cs
        if not offset:
            raise ConvertError(f"no refcount block for cluster range {k}", path=str(image.path))
        out.append((offset, S.encode_refcounts(block, order)))
    if counted is None:
        for k, cluster in sorted(new_blocks.items()):
            entry = np.array([cluster * cs], S.TABLE_DTYPE).tobytes()
            out.append((v["refcount_table_offset"] + 8 * k, entry))
    return out


_RESIZERS = {"raw": _resize_raw, "qcow2": _resize_qcow2}
