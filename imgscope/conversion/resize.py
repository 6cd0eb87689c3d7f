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
with refcounts kept right) and the header's size.  Shrinking needs
`shrink=True` and, for the formats with tables, a tail without stored data.

vdi (dynamic and static), vmdk (monolithicSparse, monolithicFlat) and vpc
(dynamic and fixed), which qemu-img 7.2 cannot resize:

* vdi: the block map grows into the room before ``offset_data``; a static
  image appends preallocated blocks in guest order.  When a dynamic image's
  map has no room, the first data blocks are copied to the end of the file,
  their map entries pointed at the copies (with ``blocks_allocated`` raised
  first), then the grown map is written where those blocks were and one header
  write moves ``offset_bmap`` and ``offset_data`` there (every block index
  shifts by the blocks the map took).  A crash between the two header writes
  leaves every block readable (by QEMU and imgscope) but ``blocks_allocated``
  ahead of the map -- what a crash inside QEMU's own block allocation leaves --
  and, when the map had fewer free entries than blocks moved, entries past
  ``blocks_in_image``: qemu-img check counts both, no data is lost.  Afterwards
  the old map area is unreferenced (zeroed).  A static image whose map has no
  room is refused.
* vmdk: new grain tables (zeros: a hole at the end of the file) for the new
  directory entries, written into the directories' spare entries or into new
  directories at the end, then the header's ``capacity`` (and directory
  offsets), then the descriptor's extent line and ``ddb.geometry.cylinders``.
  monolithicFlat grows its flat file first, then its descriptor.
  streamOptimized, split (twoGbMaxExtent*) and delta disks are refused.
* vpc: the size follows QEMU's rule: CHS-sized creators get the smallest CHS
  geometry covering the request (the size returned is that one), currentSize
  creators ('qem2', 'win '...) the size asked.  Dynamic disks grow their BAT
  into the room before the first block, or copy the blocks in the way to the
  end of the file first; then the dynamic header, the footer copy at 0 and the
  footer at the end.  Fixed disks write the footer at the new end, then zero
  the old footer bytes (now guest data).  Differencing disks are refused.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConvertError, Unsupported
from ..units import parse_size
from .base import pwrite_all, zero_range

MAX_SIZE = 1 << 63
#: most data blocks a resize copies out of a growing table's way (vdi, vpc): with 1 MiB
#: blocks a VDI map grows to 16 TiB, a VHD BAT (2 MiB blocks) much further
MAX_MOVED_BLOCKS = 64


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
    # a format may round the size (vpc: to a CHS geometry); the plan says to what
    return getattr(plan, "new_size", None) or new_size


def _refuse_damaged(image) -> None:
    """An image with errors is not written to: resizing could spread the damage."""
    report = image.check()
    bad = [f for f in report.findings if f.severity in ("error", "critical")]
    if bad or report.counts.corruptions or report.counts.check_errors:
        first = bad[0].message if bad else "the check found corruptions"
        raise ConvertError(f"refusing to resize an image with errors ({first}); "
                           "check and repair it first", path=str(image.path))


class _Copy:
    """A write step whose bytes are `length` bytes of the same file at `src`
    (read when the step runs, in pieces: a moved data block is not held in memory)."""

    PIECE = 8 << 20

    def __init__(self, src: int, length: int) -> None:
        self.src, self.length = src, length

    def apply(self, fd: int, offset: int) -> None:
        done = 0
        while done < self.length:
            n = min(self.PIECE, self.length - done)
            buf = os.pread(fd, n, self.src + done)
            if len(buf) < n:                 # a block ending at the end of the file
                buf += bytes(n - len(buf))
            pwrite_all(fd, buf, offset + done)
            done += n


#: a write step ``(size, EXTEND)`` makes the file at least `size` bytes long (a hole)
EXTEND = object()


class _Zero:
    """A write step that leaves `length` bytes reading as zeros: a punched hole where the
    file system can, else written zeros (structures a resize stops using)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def apply(self, fd: int, offset: int) -> None:
        zero_range(fd, offset, self.length)


class _Writes:
    """Ordered write steps in phases (default: `data`, `commit`, `release`), a sync
    after each phase that has steps.  A step is ``(offset, bytes)``, ``(offset,
    _Copy)``, ``(size, EXTEND)`` or a callable (work on another file)."""

    PHASES = ("data", "commit", "release")

    def __init__(self, path: Path, truncate_to: int | None = None,
                 phases: tuple = PHASES) -> None:
        self.path = path
        self.phases = tuple(phases)
        for name in self.phases:
            setattr(self, name, [])
        self.truncate_to = truncate_to
        self.new_size: int | None = None      # set when the format rounds the size asked

    def __call__(self, phases: int | None = None) -> None:
        """Apply every phase, or only the first `phases` (what a crash would leave)."""
        fd = os.open(self.path, os.O_RDWR)
        try:
            for name in self.phases[:phases]:
                steps = getattr(self, name)
                for step in steps:
                    self._apply(fd, step)
                if steps:
                    os.fsync(fd)
            if self.truncate_to is not None and phases is None:
                os.ftruncate(fd, self.truncate_to)
                os.fsync(fd)
        except OSError as exc:
            raise ConvertError(f"resize failed while writing: {exc.strerror or exc}",
                               path=str(self.path)) from None
        finally:
            os.close(fd)

    @staticmethod
    def _apply(fd: int, step) -> None:
        if callable(step):
            step()
            return
        offset, what = step
        if what is EXTEND:
            if os.fstat(fd).st_size < offset:
                os.ftruncate(fd, offset)
        elif isinstance(what, (_Copy, _Zero)):
            what.apply(fd, offset)
        else:
            pwrite_all(fd, what, offset)


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
    from ..formats.qcow2.refcounts import refcounts
    from ..schemas import qcow2 as S
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


# ---- shared by vdi, vmdk, vpc -----------------------------------------------------------
def _need_sector_multiple(new_size: int, path) -> None:
    if new_size % 512:
        raise ConvertError("The new size must be a multiple of 512", path=str(path))


def _refuse_stored_data_beyond(image, new_size: int, zeros_allowed: bool = False) -> None:
    """A shrink only drops guest space without stored data: no data grain/block (and, in a
    preallocated file, no written host bytes) may reach past the new end.  With
    `zeros_allowed` (a disk stored in place in its file: static vdi, flat vmdk, fixed vpc)
    written host bytes past the end are read and may be zeros (a copy that lost its holes)."""
    from ..model import FLAG_HOST_HOLE, KIND_COMPRESSED, KIND_DATA, KIND_ENCRYPTED
    own = image._own_extents()
    stored = np.isin(own.kind, (KIND_DATA, KIND_COMPRESSED, KIND_ENCRYPTED))
    stored &= (own.flags & FLAG_HOST_HOLE) == 0
    end = own.guest + own.length
    busy = stored & (end > np.uint64(new_size))
    for k in np.flatnonzero(busy).tolist():      # one step per stored run, not per cluster
        first = max(int(own.guest[k]), new_size)
        if zeros_allowed and own.kind[k] == KIND_DATA and own.file[k] >= 0 \
                and _reads_zero(own.files[int(own.file[k])],
                                int(own.host[k]) + first - int(own.guest[k]), int(end[k]) - first):
            continue
        raise ConvertError(f"refusing to shrink: guest data is allocated at offset {first}, "
                           "beyond the new end", path=str(image.path))


def _reads_zero(source, offset: int, length: int, piece: int = 8 << 20) -> bool:
    """The host bytes read as zeros (numpy over pieces; stops at the first non-zero one)."""
    done = 0
    while done < length:
        n = min(piece, length - done)
        buf = source.read_upto(offset + done, n)
        if np.frombuffer(buf, np.uint8).any():
            return False
        done += n
    return True


def _zero_hidden_tail(writes_list: list, source, host: int, length: int) -> None:
    """Bytes of a partly used last grain/block that growing makes visible must read as
    zeros: a write of zeros when they do not (they are outside the disk until the commit)."""
    if length <= 0:
        return
    data = source.read_upto(host, length)
    if np.frombuffer(data, np.uint8).any():
        writes_list.append((host, bytes(length)))


def _table_limit(image, nbytes: int, what: str) -> None:
    """A table the resize would build must stay within the image's limits."""
    if nbytes > image.limits.max_table_bytes:
        raise Unsupported(f"the {what} for the new size would take {nbytes} bytes, more than "
                          f"the limit of {image.limits.max_table_bytes}", path=str(image.path))


def _geometry_unset(values: dict, names: tuple) -> None:
    """A stored CHS geometry describes the old size: mark it 'not set' (0/0/0)."""
    for name in names:
        if values.get(name):
            values[name] = 0


# ---- vdi --------------------------------------------------------------------------------
def _resize_vdi(image, new_size: int):
    """vdi: header and block map; static images append preallocated blocks."""
    from ..schemas import vdi as S
    path, h = image.path, image.h
    where = {"path": str(path)}
    _need_sector_multiple(new_size, path)
    if image.variant_version == "0":
        raise Unsupported("resizing a VDI image with a version 0 header is not supported",
                          **where)
    if h["image_type"] not in (S.TYPE_NORMAL, S.TYPE_FIXED):
        raise Unsupported(f"resizing a VDI {image.variant} image is not supported (only dynamic "
                          "and static base images)", **where)
    if not image.usable or image.entries_read != h["blocks_in_image"]:
        raise ConvertError("the VDI block map cannot be read whole", **where)
    static = h["image_type"] == S.TYPE_FIXED
    bs, extra = h["block_size"], h["block_extra"]
    step = bs + extra
    n_old, n_new = h["blocks_in_image"], -(-new_size // bs)
    if n_new > S.QEMU_BLOCKS_MAX:
        raise ConvertError(f"a VDI disk of {new_size} bytes needs {n_new} blocks, more than the "
                           f"{S.QEMU_BLOCKS_MAX} a VDI image can hold", **where)
    _table_limit(image, 4 * n_new, "VDI block map")
    bmap, data = h["offset_bmap"], h["offset_data"]
    e = image.entries
    alloc = e < S.BLOCK_ZERO
    count = int(np.count_nonzero(alloc))
    old_size = image.virtual_size
    header_raw = image.source.read(S.PRE_HEADER_SIZE, image.header_length, "header")
    hv = dict(S.header_v1.parse(header_raw[:S.HEADER_V1_SIZE]))
    lchs = (dict(S.header_v1_lchs.parse(header_raw[S.HEADER_V1_SIZE:]))
            if image.header_length >= S.HEADER_V1_PLUS_SIZE else None)
    _geometry_unset(hv, ("cylinders", "heads", "sectors"))
    if lchs is not None:
        _geometry_unset(lchs, ("lchs_cylinders", "lchs_heads", "lchs_sectors"))
    hv.update(disk_size=new_size, blocks_in_image=n_new)

    def header_bytes(**changes) -> bytes:
        values = dict(hv, **changes)
        out = S.header_v1.build(values)
        return out + (S.header_v1_lchs.build(lchs) if lchs is not None else b"")

    block_host = lambda k: data + int(e[k]) * step + extra
    if new_size < old_size:
        _refuse_stored_data_beyond(image, new_size, zeros_allowed=static)
        writes = _Writes(path, truncate_to=data + n_new * step if static else None)
        writes.commit.append((S.PRE_HEADER_SIZE, header_bytes(
            blocks_allocated=n_new if static else count)))
        if n_new < n_old:                     # the dropped entries, as a fresh map pads
            writes.release.append((bmap + 4 * n_new, bytes(4 * (n_old - n_new))))
        return writes

    tail_writes: list = []
    last = (old_size - 1) // bs if old_size else -1
    if old_size % bs and 0 <= last < n_old and alloc[last]:
        _zero_hidden_tail(tail_writes, image.source, block_host(last) + old_size % bs,
                          bs - old_size % bs)
    if n_new * 4 <= data - bmap:              # the map grows into its own room
        writes = _Writes(path)
        writes.data += tail_writes
        added = (np.arange(n_old, n_new, dtype=S.MAP_DTYPE) if static
                 else np.full(n_new - n_old, S.BLOCK_FREE, S.MAP_DTYPE))
        if static:
            writes.data.append((data + n_new * step, EXTEND))
        if added.size:
            writes.data.append((bmap + 4 * n_old, S.block_map(added.size).build(added)))
        writes.commit.append((S.PRE_HEADER_SIZE, header_bytes(
            blocks_allocated=n_new if static else count)))
        return writes
    if static:
        raise Unsupported(f"the block map of this static VDI image has room for "
                          f"{(data - bmap) // 4} blocks, {n_new} are needed; a static image keeps "
                          "its blocks in guest order, so none can be moved to make room "
                          "(VirtualBox does not resize static images either): convert it to a "
                          "larger image instead", **where)
    return _vdi_relocate(image, new_size, header_bytes, tail_writes, count)


def _vdi_relocate(image, new_size: int, header_bytes, tail_writes: list, count: int):
    """Make room for a grown block map: the first data blocks move to the end of the file
    and the map is rewritten where they were (see the module docstring for the order)."""
    from ..schemas import vdi as S
    path, h = image.path, image.h
    where = {"path": str(path)}
    bs, extra = h["block_size"], h["block_extra"]
    step = bs + extra
    n_old, n_new = h["blocks_in_image"], -(-new_size // bs)
    bmap, data = h["offset_bmap"], h["offset_data"]
    e = image.entries
    alloc = e < S.BLOCK_ZERO
    used = np.sort(e[alloc])
    if used.size and (used != np.arange(used.size, dtype=used.dtype)).any():
        raise Unsupported("the VDI block map has no room for the new size and its data blocks "
                          "are not numbered 0..blocks_allocated-1, so the first ones cannot be "
                          "moved to make room", **where)
    map_bytes = -(-4 * n_new // S.SECTOR) * S.SECTOR
    moved_blocks = -(-map_bytes // step)          # data blocks the new map takes the place of
    new_data = data + moved_blocks * step
    if new_data >= 1 << 32:
        raise Unsupported("the grown VDI block map would push offset_data past 4 GiB", **where)
    n = count
    moved = min(moved_blocks, n)
    if moved > MAX_MOVED_BLOCKS:
        raise Unsupported(f"growing the VDI block map would move {moved} data blocks; at most "
                          f"{MAX_MOVED_BLOCKS} are moved", **where)
    first_copy = max(n, moved_blocks)             # index of the first copy (after the shift >= 0)
    phases = ("copy", "redirect", "data", "commit", "release")
    writes = _Writes(path, phases=phases)
    writes.copy += tail_writes                    # zeroed in place, before any copy is made
    for j in range(moved):
        writes.copy.append((data + (first_copy + j) * step, _Copy(data + j * step, step)))
    # the copies become the live blocks, counted first (a crash leaves a count ahead)
    redirected = e.copy()
    low = alloc & (e < moved)
    redirected[low] = e[low] + np.uint32(first_copy)
    writes.redirect.append((S.PRE_HEADER_SIZE, header_bytes(
        disk_size=h["disk_size"], blocks_in_image=n_old, blocks_allocated=first_copy + moved)))
    writes.redirect.append((bmap, S.block_map(n_old).build(redirected)))
    # the grown map where the moved blocks were; every index shifts by `moved_blocks`
    new_map = np.full(n_new, S.BLOCK_FREE, S.MAP_DTYPE)
    new_map[:n_old] = e
    r_alloc = np.flatnonzero(alloc)
    new_map[r_alloc] = (redirected[r_alloc].astype(np.int64) - moved_blocks).astype(S.MAP_DTYPE)
    writes.data.append((data, S.block_map(n_new).build(new_map).ljust(map_bytes, b"\0")))
    # the file reaches offset_data at least (no allocated block: nothing after the map)
    writes.data.append((new_data + n * step, EXTEND))
    writes.commit.append((S.PRE_HEADER_SIZE, header_bytes(
        offset_bmap=data, offset_data=new_data, blocks_allocated=n)))
    # the old map and what the new one leaves of the moved blocks: no stale bytes
    writes.release.append((bmap, bytes(data - bmap)))
    writes.release.append((data + map_bytes, _Zero(new_data - data - map_bytes)))
    return writes


# ---- vpc --------------------------------------------------------------------------------
def _vpc_footer(raw: bytes, size: int, geometry: tuple) -> bytes:
    from ..schemas import vhd as V
    values = dict(V.footer.parse(raw))
    values.update(currentSize=size, cylinders=geometry[0], heads=geometry[1],
                  sectorsPerTrack=geometry[2], checksum=0)
    values["checksum"] = V.checksum(V.footer.build(values), 64)
    return V.footer.build(values)


def _vpc_size(image, new_size: int) -> tuple[int, tuple]:
    """(bytes, geometry) QEMU gives a VHD asked to be `new_size` bytes: the smallest CHS
    geometry covering it for CHS-sized creators; the size itself for the others."""
    from ..schemas import vhd as V
    f = image.footer
    old_geo = (f["cylinders"], f["heads"], f["sectorsPerTrack"])
    if V.uses_current_size(f["creatorApplication"], old_geo[0] * old_geo[1] * old_geo[2]):
        sectors = new_size // V.SECTOR
        max_geo = old_geo[0] * old_geo[1] * old_geo[2] == V.VHD_MAX_GEOMETRY
        geometry = old_geo if max_geo else V.chs_geometry(sectors)
    else:
        sectors, geometry = V.qemu_create_geometry(new_size, False)
    if sectors > V.VHD_MAX_SECTORS:
        raise ConvertError("disk size is too large, max size is 2040 GiB", path=str(image.path))
    return sectors * V.SECTOR, geometry


def _resize_vpc(image, new_size: int):
    """vpc: footers (size, geometry, checksum), dynamic header and BAT, or a fixed disk's
    data area."""
    from ..schemas import vhd as V
    path = image.path
    where = {"path": str(path)}
    _need_sector_multiple(new_size, path)
    if image.disk_type == V.DISK_DIFFERENCING:
        raise Unsupported("resizing a differencing VHD is not supported: its size must stay "
                          "its parent's", **where)
    if image.footer_end is None or image.footer_bytes != V.FOOTER_SIZE:
        raise Unsupported("resizing a VHD without a 512-byte footer at the end is not "
                          "supported", **where)
    size, geometry = _vpc_size(image, new_size)
    old_size = image.virtual_size
    if size < old_size:
        _refuse_stored_data_beyond(image, size, zeros_allowed=not image.dynamic)
    if not image.dynamic:
        writes = _vpc_fixed(image, size, geometry)
    else:
        writes = _vpc_dynamic(image, size, geometry)
    writes.new_size = size
    return writes


def _vpc_fixed(image, size: int, geometry: tuple):
    from ..schemas import vhd as V
    path, old = image.path, image.virtual_size
    if image.footer_copy is not None or image.footer_offset != old:
        raise Unsupported("this fixed VHD's data area does not end where its footer starts "
                          "(or its first sector looks like a footer); it is not resized",
                          path=str(path))
    footer = _vpc_footer(image.source.read(image.footer_offset, V.FOOTER_SIZE, "footer"),
                         size, geometry)
    if size == old:
        writes = _Writes(path)
        writes.commit.append((image.footer_offset, footer))
        return writes
    if size < old:
        # the footer goes into the dropped (data-free) tail, then the file is cut after it
        writes = _Writes(path, truncate_to=size + V.FOOTER_SIZE)
        writes.data.append((size, footer))
        return writes
    writes = _Writes(path)
    writes.commit.append((size, footer))                     # the new end: the footer is live
    writes.release.append((old, bytes(V.FOOTER_SIZE)))       # the old footer is guest data now
    return writes


def _vpc_dynamic(image, size: int, geometry: tuple):
    from ..schemas import vhd as V
    path = image.path
    where = {"path": str(path)}
    if image.header is None or image.bat is None or not image.block_size:
        raise ConvertError("the VHD dynamic header or BAT cannot be read", **where)
    src, bs, bitmap = image.source, image.block_size, image.bitmap_size
    block_bytes = bitmap + bs
    footer_off, old = image.footer_offset, image.virtual_size
    if footer_off % V.SECTOR:
        raise Unsupported("the VHD footer is not sector aligned", **where)
    copy_at_0 = image.footer_copy is not None     # QEMU reads the copy; write it first
    footer_raw = src.read(0 if copy_at_0 else footer_off, V.FOOTER_SIZE, "footer")
    new_footer = _vpc_footer(footer_raw, size, geometry)
    n_old, n_new = int(image.bat.size), -(-size // bs)
    if size <= old or n_new <= n_old:
        # the BAT covers the new size already (a shrink keeps it: more entries are valid)
        writes = _Writes(path, phases=("data", "footer", "release"))
        if size > old:
            _vpc_hidden_tail(image, writes.data)
        if copy_at_0:
            writes.footer.append((0, new_footer))
        writes.release.append((footer_off, new_footer))
        return writes
    bat_off = image.bat_offset
    need = -(-n_new * 4 // V.SECTOR) * V.SECTOR
    _table_limit(image, need, "VHD BAT")
    idx, start, _ = image._block_ranges()
    start = start.astype(np.int64)
    others = []                   # what may not move (the end footer does move)
    if image.header_offset is not None and image.header_offset >= bat_off:
        others.append(image.header_offset)
    others += [loc["platformDataOffset"] for loc in image.locators
               if loc["platformDataLength"] and loc["platformDataOffset"] >= bat_off]
    if others and min(others) < bat_off + need:
        raise Unsupported("the VHD BAT cannot grow: the dynamic header or parent locator data "
                          "follows it", **where)
    in_way = np.flatnonzero((start >= bat_off) & (start < bat_off + need))
    if in_way.size > MAX_MOVED_BLOCKS:
        raise Unsupported(f"growing the VHD BAT would move {in_way.size} blocks (its blocks are "
                          f"small); at most {MAX_MOVED_BLOCKS} are moved", **where)
    phases = ("copy", "redirect", "data", "header", "footer", "release")
    writes = _Writes(path, phases=phases)
    _vpc_hidden_tail(image, writes.copy)          # in place, before any block is copied
    end_footer = footer_off
    bat = image.bat.astype(V.BAT_DTYPE)
    # where moved blocks (and the end footer) go: past the old footer and the grown BAT
    new_base = max(footer_off, -(-(bat_off + need) // V.SECTOR) * V.SECTOR)
    if in_way.size or new_base > footer_off:
        # the footer first (the file always ends with one), then the copies of the
        # blocks in the way, then the BAT points at them
        end_footer = new_base + in_way.size * block_bytes
        writes.copy.append((end_footer, src.read(footer_off, V.FOOTER_SIZE, "footer")))
    if in_way.size:
        targets = new_base + np.arange(in_way.size, dtype=np.int64) * block_bytes
        for target, k in zip(targets.tolist(), in_way.tolist()):     # a few blocks
            writes.copy.append((target, _Copy(int(start[k]), block_bytes)))
        bat[idx[in_way]] = (targets // V.SECTOR).astype(V.BAT_DTYPE)
        writes.redirect.append((bat_off, V.bat_table(n_old).build(bat)))
        # what the grown BAT leaves of the moved blocks: no stale copies
        freed = int(start[in_way].max()) + block_bytes - (bat_off + need)
        writes.release.append((bat_off + need, _Zero(freed)))
    grown = np.full(n_new - n_old, V.BAT_UNUSED, V.BAT_DTYPE)
    ext = V.bat_table(grown.size).build(grown)
    writes.data.append((bat_off + 4 * n_old, ext + b"\xff" * (need - 4 * n_new)))
    hv = dict(V.dynamic_header.parse(src.read(image.header_offset, V.HEADER_SIZE, "header")))
    hv.update(maxTableEntries=n_new, checksum=0)
    hv["checksum"] = V.checksum(V.dynamic_header.build(hv), 36)
    writes.header.append((image.header_offset, V.dynamic_header.build(hv)))
    if copy_at_0:
        writes.footer.append((0, new_footer))
    writes.release.append((end_footer, new_footer))
    return writes


def _vpc_hidden_tail(image, steps: list) -> None:
    """The part of the old last block beyond the old end: zeros, and its sector bitmap bits
    set (QEMU reads the stored bytes, the specification clear bits as zeros: both agree)."""
    from ..schemas import vhd as V
    bs, old = image.block_size, image.virtual_size
    k = (old - 1) // bs if old else -1
    if not old % bs or not 0 <= k < image.bat.size or image.bat[k] == V.BAT_UNUSED:
        return
    base = int(image.bat[k]) * V.SECTOR
    inside = old % bs
    _zero_hidden_tail(steps, image.source, base + image.bitmap_size + inside, bs - inside)
    spb = bs // V.SECTOR
    raw = image.source.read(base, image.bitmap_size, "sector bitmap")
    bits = np.unpackbits(np.frombuffer(raw, np.uint8))
    if not bits[inside // V.SECTOR:spb].all():
        bits[inside // V.SECTOR:spb] = 1
        steps.append((base, np.packbits(bits).tobytes()))


# ---- vmdk -------------------------------------------------------------------------------
def _resize_vmdk(image, new_size: int):
    """vmdk: a monolithicSparse file or a descriptor with one flat extent."""
    from ..formats.vmdk.extents import FlatExtent, SparseExtent
    path = image.path
    where = {"path": str(path)}
    _need_sector_multiple(new_size, path)
    variant = str(image.variant or "")
    desc = image.descriptor
    if image.backing is not None or (desc is not None and desc.parent_hint):
        raise Unsupported("resizing a VMDK delta (child) disk is not supported: its size must "
                          "stay its parent's", **where)
    if variant == "streamOptimized" or any(getattr(e, "compressed", False)
                                           for e in image.extents_list):
        raise Unsupported("resizing a streamOptimized VMDK is not supported: it is a "
                          "write-once stream of compressed grains; convert it to "
                          "monolithicSparse, resize, and convert back", **where)
    if len(image.extents_list) != 1 or variant.lower().startswith(("twogb", "2gb")):
        raise Unsupported(f"resizing a VMDK of {len(image.extents_list)} extent(s) "
                          f"({variant}) is not supported: only monolithicSparse and "
                          "monolithicFlat disks", **where)
    if desc is None:
        raise Unsupported("resizing a VMDK extent without a descriptor is not supported", **where)
    ext = image.extents_list[0]
    if isinstance(ext, SparseExtent) and image.direct and ext.usable:
        return _vmdk_sparse(image, ext, new_size)
    if isinstance(ext, FlatExtent) and not image.direct:
        return _vmdk_flat(image, ext, new_size)
    raise Unsupported(f"resizing a VMDK {variant} disk ({ext.type} extent) is not supported: "
                      "only monolithicSparse and monolithicFlat disks", **where)


def _vmdk_descriptor(image, text: bytes, base: int, new_sectors: int) -> bytes:
    """The descriptor text with the extent line's size and ddb.geometry.cylinders (QEMU's
    size / (sectors * heads * 512)) for the new size; every other byte kept."""
    import dataclasses
    import re

    from ..schemas.vmdk_descriptor import format_extent
    desc = image.descriptor
    codec = getattr(desc, "codec", "utf-8")
    edits = []
    line = desc.extents[0]
    at = line.byte_offset - base
    old_line = text[at:at + line.length]
    ending = old_line[len(old_line.rstrip(b"\r\n")):]
    new_line = format_extent(dataclasses.replace(line, sectors=new_sectors))
    edits.append((at, at + line.length, new_line.encode(codec, "surrogateescape") + ending))
    cyl = desc.entry("ddb.geometry.cylinders")
    if cyl is not None:
        as_int = lambda key, default: (int(desc.get(key)) if str(desc.get(key, "")).isdigit()
                                       and int(desc.get(key)) > 0 else default)
        adapter = desc.get("ddb.adapterType", "ide")
        heads = as_int("ddb.geometry.heads", 16 if adapter == "ide" else 255)
        spt = as_int("ddb.geometry.sectors", 63)
        at = cyl.offset - base
        raw = text[at:at + cyl.length]
        value = str(new_sectors // (heads * spt)).encode()
        new_raw, n = re.subn(rb'(=\s*"?)\d+', lambda m: m.group(1) + value, raw, count=1)
        if n:
            edits.append((at, at + cyl.length, new_raw))
    for a, b, repl in sorted(edits, reverse=True):
        text = text[:a] + repl + text[b:]
    return text


def _vmdk_sparse(image, ext, new_size: int):
    """monolithicSparse: grain tables and directories for the new capacity, the header,
    the embedded descriptor."""
    from ..schemas import vmdk as K
    path, src = image.path, ext.source
    where = {"path": str(path)}
    h = ext.header
    SECTOR = K.SECTOR
    grain, per = h["grainSize"], h["numGTEsPerGT"]
    cov = grain * per
    old_cap, new_cap = h["capacity"], new_size // SECTOR
    if h["gdOffset"] == K.GD_AT_END:
        raise Unsupported("resizing a VMDK whose grain directory is at the end is not "
                          "supported", **where)
    n_old, n_new = int(ext.gd.size), -(-new_cap // cov)
    _table_limit(image, 4 * n_new, "VMDK grain directory")
    if n_old != -(-old_cap // cov) or (ext.rgd is not None and ext.rgd.size != n_old):
        raise ConvertError("the VMDK grain directory cannot be read whole", **where)
    rgd = ext.rgd
    gts = K.gt_sectors(per)
    d_off, d_size = h["descriptorOffset"] * SECTOR, h["descriptorSize"] * SECTOR
    old_text = src.read(d_off, d_size, "descriptor").split(b"\0", 1)[0]
    text = _vmdk_descriptor(image, old_text, d_off, new_cap)
    if len(text) > d_size:
        raise Unsupported("the new descriptor does not fit the embedded descriptor area",
                          **where)
    header = dict(K.sparse_header.parse(src.read(0, SECTOR, "header")))
    header["capacity"] = new_cap
    writes = _Writes(path, phases=("data", "commit", "describe", "release"))
    gt_bytes = per * 4
    dirs = [("gdOffset", ext.gd)] + ([("rgdOffset", rgd)] if rgd is not None else [])
    # grain-table entries past the capacity inside the last table read as nothing
    keep = -(-min(old_cap, new_cap) // grain) - (min(n_old, n_new) - 1) * per
    last = min(n_old, n_new) - 1
    if last >= 0 and keep < per:
        for _, d in dirs:
            if d[last]:
                raw = src.read(int(d[last]) * SECTOR, gt_bytes, "grain table")
                entries = np.frombuffer(raw, K.TABLE_DTYPE)
                if entries[keep:].any():
                    writes.data.append((int(d[last]) * SECTOR + 4 * keep,
                                        bytes(4 * (per - keep))))
    if new_cap < old_cap:
        _refuse_stored_data_beyond(image, new_size)
        writes.commit.append((0, K.sparse_header.build(header)))
        writes.describe.append((d_off, text.ljust(len(old_text), b"\0")))
        for name, d in dirs:                  # directory entries past the new end: unused
            if n_new < n_old:
                writes.release.append((h[name] * SECTOR + 4 * n_new, bytes(4 * (n_old - n_new))))
        return writes
    # the old last grain's part past the old capacity becomes guest space: zeros
    if old_cap % grain and n_old:
        g = old_cap // grain
        gte_raw = src.read(int(ext.gd[g // per]) * SECTOR + 4 * (g % per), 4, "grain table")
        gte = int.from_bytes(gte_raw, "little")
        if gte > 1:
            inside = (old_cap % grain) * SECTOR
            _zero_hidden_tail(writes.data, src, gte * SECTOR + inside, grain * SECTOR - inside)
    pos = -(-src.size // SECTOR)                 # new tables go after the end of the file
    added = n_new - n_old
    used = _vmdk_used_sectors(ext, h)
    for name, d in reversed(dirs):             # redundant copy first, as qemu-img lays them out
        new_gts = pos + np.arange(added, dtype=np.uint64) * np.uint64(gts)
        pos += added * gts
        full = np.concatenate([d, new_gts]).astype(K.TABLE_DTYPE)
        room = (_next_used(used, h[name]) - h[name]) * SECTOR // 4
        if n_new <= room:
            if added:
                writes.data.append((h[name] * SECTOR + 4 * n_old,
                                    K.gd_table(added).build(full[n_old:])))
        else:                                   # a new directory at the end of the file
            header[name] = pos
            writes.data.append((pos * SECTOR, K.gd_table(n_new).build(full)))
            pos += K.gd_sectors(n_new)
    if pos > 0xFFFFFFFF:
        raise Unsupported("the grown VMDK would need sectors past 2 TiB", **where)
    writes.data.insert(0, (pos * SECTOR, EXTEND))     # the new grain tables: zeros (a hole)
    writes.commit.append((0, K.sparse_header.build(header)))
    writes.describe.append((d_off, text.ljust(len(old_text), b"\0")))
    return writes


def _vmdk_used_sectors(ext, h) -> np.ndarray:
    """Start sectors of everything the sparse extent holds (sorted), to find how much room
    follows a grain directory."""
    from ..schemas import vmdk as K
    starts = [0, h["overHead"], -(-ext.source.size // K.SECTOR)]
    for name in ("descriptorOffset", "rgdOffset", "gdOffset"):
        if h[name]:
            starts.append(h[name])
    tables = [ext.gd] + ([ext.rgd] if ext.rgd is not None else [])
    return np.unique(np.concatenate([np.array(starts, np.uint64)] +
                                    [t[t != 0].astype(np.uint64) for t in tables]))


def _next_used(used: np.ndarray, sector: int) -> int:
    later = used[used > np.uint64(sector)]
    return int(later[0]) if later.size else sector


def _vmdk_flat(image, ext, new_size: int):
    """monolithicFlat: the flat file first, then the descriptor file."""
    import stat
    path = image.path
    where = {"path": str(path)}
    flat = ext.source.path
    try:
        mode = os.stat(flat).st_mode
    except OSError as exc:
        raise ConvertError(f"cannot stat the flat extent: {exc.strerror}", **where) from None
    if not stat.S_ISREG(mode):
        raise Unsupported(f"the flat extent {flat.name} is not a regular file", **where)
    if ext.source.size != ext.offset + ext.length:
        raise Unsupported(f"the flat extent file {flat.name} holds {ext.source.size} bytes, "
                          f"not the extent's {ext.offset + ext.length}: resizing it would expose "
                          "or cut bytes that are not this extent's", **where)
    old_text = image.source.read(0, image.source.size, "descriptor")
    body = old_text.split(b"\0", 1)[0]
    text = _vmdk_descriptor(image, body, 0, new_size // 512).ljust(len(old_text), b"\0")
    new_end = ext.offset + new_size

    def set_flat_size() -> None:
        fd = os.open(flat, os.O_RDWR)
        try:
            os.ftruncate(fd, new_end)
            os.fsync(fd)
        finally:
            os.close(fd)
    writes = _Writes(path)
    if new_size < image.virtual_size:
        _refuse_stored_data_beyond(image, new_size, zeros_allowed=True)
        writes.commit.append((0, text))
        writes.release.append(set_flat_size)
    else:
        writes.data.append(set_flat_size)
        writes.commit.append((0, text))
    return writes


_RESIZERS = {"raw": _resize_raw, "qcow2": _resize_qcow2, "vdi": _resize_vdi,
             "vmdk": _resize_vmdk, "vpc": _resize_vpc}
