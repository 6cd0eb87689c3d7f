"""Check rules of VMDK disks, counted the way `qemu-img check` counts.

QEMU's check (block/vmdk.c, vmdk_co_check) walks the disk grain by grain
through the primary grain directory and stops at the first grain whose host
offset lies at or past the end of its extent file ("cluster offset for sector
N points after EOF"): one corruption, and the check fails (exit 1).  Nothing
else counts: grain tables past the end of the file read as zeros, the
redundant directory, the CID chain, overlapping grains and unclean shutdowns
are never looked at.  imgscope reports all of them, but counts only what
qemu-img counts, so that its verdict is qemu-img's:

* the first grain past the end of its file: a corruption plus the check error
  `qemu_check_fails` (exit 1, as qemu-img);
* a disk qemu-img cannot open (missing extent file, version > 3, grain table
  geometry it refuses...): the check error `qemu_check_fails` only;
* everything else is a finding that is not counted: the primary and redundant
  grain directories and tables disagreeing (`redundant_directory_mismatch`,
  `redundant_grain_table_mismatch`), stream records sharing bytes, CIDs that
  do not chain, extent sizes that disagree with the descriptor.

qemu-img's writer leaves gaps (the grain-table area is padded up to
`overHead`, grains of zeroed writes are leaked), so unreferenced space is not
suspect.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...errors import ImageError
from ...formats.twolevel import read_tables
from ...formats.vmdk.extents import (CowdExtent, FlatExtent, GrainExtent, SeSparseExtent,
                                     SparseExtent, SECTOR)
from ...model import KIND_COMPRESSED, KIND_UNALLOCATED, NO_HOST

if TYPE_CHECKING:
    from ..check import CheckContext

counts_parse_findings = False
counts_generic = False
unreferenced_is_suspect = False

#: findings listed one by one per rule; the rest is one summary finding
LISTED = 20
#: grain tables compared per step (memory: 2 x this x numGTEsPerGT x 8 bytes)
TABLES_PER_STEP = 4096
U64 = np.uint64

#: findings of the driver after which qemu-img 7.2 cannot open the disk (its check fails);
#: verified: version > 3, numGTEsPerGT > 512, a missing extent file, a huge capacity
QEMU_CANNOT_OPEN = {
    "extent_missing": "an extent file is missing",
    "extent_magic": "a sparse extent file has no sparse magic",
    "extent_type_unknown": "an extent line has an unknown type",
    "extent_line_invalid": "an extent line has no size",
    "extent_no_file": "an extent line names no file",
    "extent_too_large": "an extent is too large",
    "flat_offset_missing": "a FLAT extent line has no offset",
    "descriptor_no_extents": "the descriptor lists no extents",
    "extent_is_descriptor": "the descriptor names itself as an extent",
    "gtes_per_gt_invalid": "numGTEsPerGT is not usable ('L2 table size too big')",
    "capacity_invalid": "the capacity does not fit 63 bits",
    "stream_footer_missing": "the stream footer is missing",
    "stream_footer_invalid": "the stream footer is invalid",
    "sesparse_geometry_invalid": "the seSparse geometry is not QEMU's",
}


def check(ctx: CheckContext) -> None:
    img = ctx.image
    files = img.files()
    for rule in (_qemu_refuses, _grains_past_eof):
        if rule(ctx, img, files):
            break
    for ext in img.extents_list:
        try:
            if isinstance(ext, SparseExtent) and ext.usable and ext.rgd is not None:
                _redundant_directory(ctx, img, ext)
            if isinstance(ext, SparseExtent) and ext.markers and ext.usable:
                _records_shared(ctx, ext, files)
        except ImageError as exc:
            ctx.check_error("check_incomplete", f"{ext.label}: {exc.message}",
                            structure=exc.structure or ext.label, host_offset=exc.offset,
                            file=str(ext.source.path))
        _capacity(ctx, img, ext)
    _cid_chain(ctx, img)


# ---- what qemu-img check counts --------------------------------------------------------------
def _qemu_refuses(ctx, img, files) -> bool:
    """qemu-img cannot open the disk: its check fails (exit 1) before looking at a grain."""
    reasons = {f.code for f in img._findings} & set(QEMU_CANNOT_OPEN)
    reasons = [QEMU_CANNOT_OPEN[c] for c in sorted(reasons)]
    reasons += [f"{e.label} has version {e.header['version']} (QEMU opens 1 to 3)"
                for e in img.extents_list
                if isinstance(e, SparseExtent) and e.header["version"] > 3]
    if not reasons:
        return False
    ctx.check_error("qemu_check_fails", "qemu-img cannot open this disk (" + "; ".join(reasons)
                    + "), so its check fails (exit 1); imgscope's findings are listed",
                    structure="descriptor")
    return True


def _grains_past_eof(ctx, img, files) -> bool:
    """QEMU's own check: the first grain (in guest order) whose host offset is at or past
    the end of its extent file is one corruption, and the check stops and fails."""
    for ext in img.extents_list:             # extents are in guest order
        if isinstance(ext, FlatExtent):
            if ext.length and ext.offset >= ext.source.size:
                ctx.corruption("flat_extent_short", f"{ext.label} starts at {ext.offset:#x} in "
                               f"{ext.source.path.name}, which has {ext.source.size} bytes: none "
                               "of its data is there", structure=ext.label,
                               host_offset=ext.source.size, file=str(ext.source.path))
                _stops(ctx, ext.start // SECTOR, ext.offset, ext)
                return True
            continue
        if not isinstance(ext, GrainExtent) or not ext.usable or not ext.length:
            continue
        try:
            t = ext.table(files)
        except ImageError:
            continue                        # the map could not be read: the parse said so
        hosted = (t.host != NO_HOST) & (t.kind != KIND_UNALLOCATED)
        if not hosted.any():
            continue
        gb = U64(ext.grain_bytes())
        size = U64(ext.source.size)
        grains = np.where(t.kind == KIND_COMPRESSED, U64(1), (t.length + gb - U64(1)) // gb)
        # the first grain of each run that starts at or past the end of the file
        inside = size - np.minimum(t.host, size)
        first = np.where(t.host >= size, U64(0), (inside + gb - U64(1)) // gb)
        bad = np.flatnonzero(hosted & (first < grains))
        if not bad.size:
            continue
        k = int(bad[0])
        guest = ext.start + int(t.guest[k] + first[k] * gb)
        host = int(t.host[k] + first[k] * gb) if t.kind[k] != KIND_COMPRESSED else int(t.host[k])
        ctx.corruption("cluster_beyond_eof", f"guest {guest:#x} maps to host {host:#x}, past the "
                       f"end of {ext.source.path.name} ({int(size)} bytes): its data is lost",
                       structure=f"{ext.label} grain table", index=k, host_offset=int(t.host[k]),
                       guest_offset=guest)
        _stops(ctx, guest // SECTOR, host, ext)
        return True
    return False


def _stops(ctx, sector: int, host: int, ext) -> None:
    ctx.check_error("qemu_check_fails", f"qemu-img check stops at guest sector {sector} ('cluster "
                    f"offset for sector {sector} points after EOF': host {host:#x} in "
                    f"{ext.source.path.name}) and fails (exit 1) without looking further",
                    structure=ext.label, host_offset=host, guest_offset=sector * SECTOR,
                    file=str(ext.source.path))


# ---- what imgscope finds besides ---------------------------------------------------------------
def _listed(ctx, idx: np.ndarray, code: str, message, *, structure: str, offsets, file: str,
            guest=None, fixable: bool = False) -> None:
    """An error finding (not counted) for each of the first LISTED entries, then a summary."""
    for k in idx[:LISTED].tolist():
        ctx.notice("error", code, message(k), structure=structure, index=k, file=file,
                   host_offset=int(offsets[k]), fixable=fixable,
                   guest_offset=None if guest is None else int(guest[k]))
    if idx.size > LISTED:
        ctx.notice("error", code, f"{idx.size - LISTED} more entries of {structure} with the "
                   f"same problem ({code})", structure=structure, file=file, fixable=fixable)


def _redundant_directory(ctx, img, ext: SparseExtent) -> None:
    """Spec check V10: the redundant directory and its tables must copy the primary ones.

    QEMU reads only the primary copy; a disagreement means one copy is stale or
    damaged, and a reader that trusts the other one gets other data."""
    h = ext.footer or ext.header
    gd, rgd = ext.gd, ext.rgd
    n = min(gd.size, rgd.size)
    gd, rgd = gd[:n], rgd[:n]
    per, gb = ext.per_table, ext.grain_bytes()
    tb = per * 4
    size = U64(ext.source.size)
    src = str(ext.source.path)
    r_base = h["rgdOffset"] * SECTOR
    r_offsets = U64(r_base) + np.arange(n, dtype=U64) * U64(4)
    guest = U64(ext.start) + np.arange(n, dtype=U64) * U64(per * gb)
    inside = lambda d: (d != 0) & (d * U64(SECTOR) + U64(tb) <= size)
    g_ok, r_ok = inside(gd), inside(rgd)
    one_side = (gd == 0) != (rgd == 0)
    shared = (gd != 0) & (gd == rgd)
    r_lost = (rgd != 0) & ~r_ok & g_ok
    bad = np.flatnonzero(one_side | shared | r_lost)

    def why(k: int) -> str:
        where = f"{ext.label} grain directory entry {k} (guest {int(guest[k]):#x})"
        if one_side[k]:
            return (f"{where}: the primary copy {'has no grain table' if gd[k] == 0 else 'has one'}"
                    f" (sector {int(gd[k])}), the redundant copy "
                    f"{'has none' if rgd[k] == 0 else 'has one'} (sector {int(rgd[k])})")
        if shared[k]:
            return (f"{where}: primary and redundant copy name the same grain table "
                    f"(sector {int(gd[k])}): there is no second copy")
        return (f"{where}: the redundant grain table at sector {int(rgd[k])} lies past the end of "
                f"{ext.source.path.name}")
    if bad.size:
        _listed(ctx, bad, "redundant_directory_mismatch", why,
                structure=f"{ext.label} redundant grain directory", offsets=r_offsets, file=src,
                guest=guest, fixable=True)
    both = np.flatnonzero(g_ok & r_ok & (gd != rgd))
    found, total = [], 0
    for c in range(0, both.size, TABLES_PER_STEP):
        ctx.step("redundant grain tables", c, both.size)
        ks = both[c:c + TABLES_PER_STEP]
        prim = _tables(img, ext, gd[ks] * U64(SECTOR), tb)
        red = _tables(img, ext, rgd[ks] * U64(SECTOR), tb)
        differ = prim != red
        rows = np.flatnonzero(differ.any(axis=1))
        total += rows.size
        for r in rows[:max(0, LISTED - len(found))].tolist():
            cols = np.flatnonzero(differ[r])
            j = int(cols[0])
            found.append((int(ks[r]), cols.size, j, int(prim[r, j]), int(red[r, j])))
    ctx.step("redundant grain tables", both.size, both.size)
    structure = f"{ext.label} grain table"
    for k, ndiff, j, a, b in found:
        g = int(guest[k]) + j * gb
        ctx.notice("error", "redundant_grain_table_mismatch",
                   f"{ext.label} grain table {k} (guest {int(guest[k]):#x}): {ndiff} of {per} "
                   f"entries differ between the primary table at sector {int(gd[k])} and the "
                   f"redundant one at sector {int(rgd[k])}; the first, guest {g:#x}, maps to "
                   f"sector {a} in the primary and {b} in the redundant copy (QEMU reads the "
                   "primary one)",
                   structure=structure, index=k, host_offset=int(gd[k]) * SECTOR, guest_offset=g,
                   file=src, fixable=True)
    if total > len(found):
        ctx.notice("error", "redundant_grain_table_mismatch", f"{total - len(found)} more grain "
                   "tables differ from their redundant copies", structure=structure, file=src,
                   fixable=True)


def _tables(img, ext, offsets: np.ndarray, table_bytes: int) -> np.ndarray:
    """The grain tables at byte `offsets` (in that order), one row each."""
    uniq, tables = read_tables(img, offsets, table_bytes, ext.parse_gts,
                               f"{ext.label} grain table", ext.source)
    return tables[np.searchsorted(uniq, offsets)]


def _records_shared(ctx, ext: SparseExtent, files) -> None:
    """Stream records (12-byte header + compressed grain) must not share bytes (V13)."""
    for fi, off, length, kind, _owner in ext.grain_regions(files):
        if kind != "compressed_data" or np.size(off) < 2:
            continue
        order = np.argsort(off, kind="stable")
        start, end = off[order], off[order] + length[order]
        reach = np.maximum.accumulate(end)
        clash = np.flatnonzero(start[1:] < reach[:-1]) + 1
        for k in clash[:LISTED].tolist():
            ctx.notice("error", "host_data_shared", f"{ext.label}: the stream record at "
                       f"{int(start[k]):#x} overlaps an earlier record (two grains share "
                       "stored bytes)", structure=f"{ext.label} stream records",
                       host_offset=int(start[k]), size=int(reach[k - 1] - start[k]),
                       file=str(ext.source.path))


def _capacity(ctx, img, ext) -> None:
    """Extent sizes the driver does not compare: COWD and seSparse capacities against
    their descriptor line, and a monolithic file's capacity against the extent line of
    its embedded descriptor (QEMU uses the header's capacity there)."""
    if not getattr(ext, "usable", False):
        return
    if isinstance(ext, (CowdExtent, SeSparseExtent)) and ext.line is not None \
            and ext.capacity != ext.length:
        ctx.notice("error", "extent_size_mismatch", f"{ext.label}: descriptor says "
                   f"{ext.length // SECTOR} sectors, the extent header {ext.capacity // SECTOR}",
                   structure=ext.label, host_offset=0, file=str(ext.source.path))
    desc = img.descriptor
    if isinstance(ext, SparseExtent) and ext.line is None and desc is not None and desc.extents:
        line = desc.extents[0]
        if line.sectors is not None and line.sectors * SECTOR != ext.capacity:
            ctx.notice("warning", "extent_size_mismatch", f"the embedded descriptor's extent line "
                       f"says {line.sectors} sectors, the header capacity {ext.capacity // SECTOR} "
                       "(the capacity is used, as QEMU does)", structure="descriptor",
                       host_offset=line.byte_offset, file=str(ext.source.path))


def _cid_chain(ctx, img) -> None:
    """Spec check V17 over the whole chain: each child's parentCID is its parent's CID.
    (The driver reports the top layer's link when it opens it; deeper links are reported
    here on the top image, naming the layer.)"""
    for child, parent in zip(img.chain, img.chain[1:]):
        desc = getattr(child, "descriptor", None)
        want, have = (desc.parent_cid if desc is not None else None), getattr(parent, "cid", None)
        if want is None or have is None or want == have:
            continue
        ctx.notice("error", "cid_mismatch", f"parentCID {want:08x} does not match the parent's CID "
                   f"{have:08x} (parent modified since this child was made)" if child is img else
                   f"{child.path.name}: parentCID {want:08x} does not match the CID {have:08x} of "
                   f"its parent {parent.path.name} (parent modified since the child was made)",
                   structure="descriptor", file=str(child.path))
