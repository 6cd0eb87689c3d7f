"""Check rules of VHDX images, counted the way `qemu-img check` counts.

`qemu-img check` opens the file read-only.  QEMU 7.2 then refuses a file whose
log still needs replay, whose region table 1 is damaged (it never reads table
2), whose regions overlap or whose metadata is damaged: its check fails with
exit 1.  imgscope reads such files anyway (it replays the log in memory, falls
back on region table 2) and reports the check error `qemu_check_fails`, so that
its verdict is qemu-img's.  A valid file using what QEMU 7.2 does not support
(a differencing disk, 4 KiB logical sectors) is not damaged: imgscope checks it
as it is (qemu-img exits 1 with "not supported").

Otherwise QEMU's check (block/vhdx.c, vhdx_check_bat_entries) counts, for every
BAT entry in state 6 (FULLY_PRESENT, or a present sector bitmap):

* an offset so large that the block would pass 2^63 ("offset overflow");
* a block starting at or past the end of the file, or a block (cut at the end
  of the disk) ending past it ("points after end of file");
* a payload block overlapping the log or a region of region table 1 ("VHDX
  region ... overlaps with region ...") -- QEMU's count of payload entries skips
  every (chunk_ratio + 1)-th present entry, and imgscope follows it.

Everything else is listed, not counted: one damaged header or region table 2
(QEMU uses the other copy), BAT states invalid for the disk type, blocks
sharing bytes, a present block overlapping the header section.

The writer leaves gaps (1 MiB-aligned regions, payload from 8 MiB, the space a
fixed disk reserves without referencing it), so unreferenced space is not suspect.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...schemas import vhdx as X

if TYPE_CHECKING:
    from ..check import CheckContext

counts_parse_findings = False
counts_generic = False
unreferenced_is_suspect = False

#: findings listed one by one per rule; the rest is one summary finding
LISTED = 20
U64 = np.uint64
INT64_MAX = (1 << 63) - 1

#: driver findings of damage after which QEMU 7.2 refuses to open the file (a valid file
#: using what QEMU 7.2 does not support -- a parent, 4 KiB sectors -- is checked as it is)
QEMU_CANNOT_OPEN = {
    "log_replay_needed": "the log holds entries to replay and the file is opened read-only "
                         "('To replay the log, run: qemu-img check -r all')",
    "log_version": "the log version is not 0",
    "log_offset_invalid": "the log offset is invalid",
    "log_flushed_beyond_eof": "a log entry was flushed past the end of the file",
    "header_sequence_tie": "both headers are valid with the same sequence number",
    "region_table1_invalid": "region table 1 is damaged (QEMU never reads table 2)",
    "region_unknown_required": "a required region is unknown",
    "region_duplicate": "a region appears twice",
    "region_overlap": "regions overlap",
    "region_missing": "the BAT or metadata region is missing",
    "metadata_entry_count": "the metadata table has too many entries",
    "metadata_unknown_required": "a required metadata item is unknown",
    "metadata_duplicate": "a metadata item appears twice",
    "metadata_item_out_of_place": "a metadata item lies outside its region",
    "metadata_missing": "a required metadata item is missing",
    "block_size_invalid": "the block size is invalid",
    "logical_sector_size_invalid": "the logical sector size is invalid",
    "bat_region_too_small": "the BAT region is too small",
    "parent_locator_missing": "a differencing disk without parent locator",
}


def check(ctx: CheckContext) -> None:
    img = ctx.image
    _qemu_refuses(ctx, img)
    if img.usable and img.bat is not None and img.bat.size:
        _bat_entries(ctx, img)
        _states_for_disk_type(ctx, img)


def _qemu_refuses(ctx, img) -> None:
    codes = {f.code for f in img._findings}
    reasons = [QEMU_CANNOT_OPEN[c] for c in sorted(codes & set(QEMU_CANNOT_OPEN))]
    if reasons:
        ctx.check_error("qemu_check_fails", "qemu-img cannot open this file ("
                        + "; ".join(reasons) + "), so its check fails (exit 1); imgscope's "
                        "findings are listed", structure="header", host_offset=0)


def _registered_regions(img):
    """(start, end) of what QEMU registers before its BAT check: the log of the current
    header and every entry of the region table (ends wrap at 2^64 as in QEMU)."""
    h = img.header
    starts = [h["log_offset"]] + [r["file_offset"] for r in img.regions_found]
    lengths = [h["log_length"]] + [r["length"] for r in img.regions_found]
    s = np.array(starts, U64)
    return s, s + np.array(lengths, U64)


def _overlaps_any(start: np.ndarray, end: np.ndarray, r_start: np.ndarray,
                  r_end: np.ndarray) -> np.ndarray:
    """Per block: does [start, end) meet any region?  QEMU's test, `start < r_end and
    end > r_start` in unsigned arithmetic, for every region at once: among the regions
    starting before `end`, the largest end must pass `start`."""
    if not r_start.size:
        return np.zeros(start.size, bool)
    order = np.argsort(r_start, kind="stable")
    r_start, reach = r_start[order], np.maximum.accumulate(r_end[order])
    before = np.searchsorted(r_start, end, side="left")        # regions with r_start < end
    return (before > 0) & (reach[np.maximum(before, 1) - 1] > start)


def _bat_entries(ctx, img) -> None:
    """QEMU's vhdx_check_bat_entries, entry for entry, vectorised."""
    bat, bs = img.bat, img.block_size
    n = bat.size
    i = np.arange(n, dtype=U64)
    state = bat & U64(X.BAT_STATE_MASK)
    offset = bat & U64(X.BAT_FILE_OFFSET_MASK)
    present = np.flatnonzero(state == X.PAYLOAD_BLOCK_FULLY_PRESENT)
    if not present.size:
        return
    size = U64(img.source.size)
    off = offset[present]
    with np.errstate(over="ignore"):
        # QEMU: MIN(block_size, total - i * block_size) in unsigned 64-bit arithmetic
        rest = U64(img.virtual_size) - i[present] * U64(bs)
        block_length = np.minimum(U64(bs), rest)
        end = off + U64(bs)                        # wraps for huge offsets, as in QEMU
    overflow = off > U64(INT64_MAX - bs)
    beyond = off >= size
    cut = ~beyond & (off + block_length > size)
    # QEMU region-checks present entries counted by `payblocks`, skipping one in chunk_ratio+1
    checked = np.arange(present.size) % (img.chunk_ratio + 1) != img.chunk_ratio
    hit = _overlaps_any(off, end, *_registered_regions(img)) & checked
    base = img.bat_offset
    where = lambda k: dict(structure="bat", index=int(present[k]),
                           host_offset=base + 8 * int(present[k]))
    for code, mask, message in (
            ("bat_entry_overflow", overflow, lambda k: f"BAT entry {int(present[k])}: offset "
             f"{int(off[k]):#x} plus the block size passes 2^63 (QEMU: 'offset overflow')"),
            ("bat_entry_beyond_eof", beyond, lambda k: f"BAT entry {int(present[k])}: block at "
             f"{int(off[k]):#x} starts past the end of the file ({int(size)} bytes; QEMU: 'points "
             "after end of file'); its data is lost"),
            ("bat_entry_truncated", cut, lambda k: f"BAT entry {int(present[k])}: block at "
             f"{int(off[k]):#x} (+{int(block_length[k])}) ends past the end of the file "
             f"({int(size)} bytes; QEMU: 'end offset points after end of file'); its tail is lost"),
            ("bat_entry_overlaps_metadata", hit, lambda k: f"BAT entry {int(present[k])}: block at "
             f"{int(off[k]):#x} (+{bs}) overlaps the log or a region (QEMU: 'VHDX region ... "
             "overlaps with region'); writes to it destroy metadata")):
        idx = np.flatnonzero(mask)
        for k in idx[:LISTED].tolist():
            ctx.corruption(code, message(k), **where(k))
        if idx.size > LISTED:
            ctx.corruption(code, f"{idx.size - LISTED} more BAT entries with the same problem "
                           f"({code})", count=idx.size - LISTED, structure="bat")


def _states_for_disk_type(ctx, img) -> None:
    """A fixed disk keeps every block allocated (QEMU writes ZERO or FULLY_PRESENT); a
    disk without parent has no present sector bitmap.  Listed, not counted."""
    sb, number, state, offset, present, length = img._bat_geometry()
    base = img.bat_offset
    checks = []
    if img.leave_blocks_allocated:
        loose = ~sb & (length > 0) & np.isin(state, np.array([0, 1, 3, 5], U64))
        checks.append(("fixed_block_not_allocated", loose, "warning", lambda k: f"BAT entry {k}: "
                       f"payload block {int(number[k])} of a fixed disk is "
                       f"{X.PAYLOAD_STATES[int(state[k])]} (a fixed disk keeps every block "
                       "allocated)"))
    if not img.has_parent:
        checks.append(("sector_bitmap_without_parent", sb & (state == X.SB_BLOCK_PRESENT),
                       "warning",
                       lambda k: f"BAT entry {k}: sector bitmap block of chunk {int(number[k])} is "
                       "present in a disk without parent (nothing reads it)"))
    for code, mask, severity, message in checks:
        idx = np.flatnonzero(mask)
        for k in idx[:LISTED].tolist():
            ctx.notice(severity, code, message(k), structure="bat", index=k,
                       host_offset=base + 8 * k)
        if idx.size > LISTED:
            ctx.notice(severity, code, f"{idx.size - LISTED} more BAT entries with the same "
                       f"problem ({code})", structure="bat")
