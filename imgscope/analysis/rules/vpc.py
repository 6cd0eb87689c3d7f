"""Check rules of VHD images (QEMU's `vpc`).

qemu-img cannot check VHD files (exit 63), so imgscope counts its own way: one
corruption per error the driver found while parsing (footer or dynamic header
checksum, BAT entries past the end of the file, overlapping each other or the
metadata, a missing footer...), plus what the rules below add:

* the footer copy at offset 0 and the footer at the end differ although both
  checksums are right: one of them is stale (QEMU trusts the copy) -- counted;
* parent locator data overlapping the header, the BAT or a block -- counted;
* sector bitmaps of a dynamic disk with clear bits: QEMU ignores bitmaps and
  reads the stored bytes, the specification says zeros -- listed, not counted;
  an allocated block of a differencing disk whose bitmap marks no sector;
* a saved-state disk (it belongs to a hibernated VM) -- listed.

The driver checks BAT entries against each other and the metadata itself, so the
generic layout overlaps are listed without being counted twice.  QEMU's writer
leaves no gaps (footer copy, header, BAT padded to a sector, blocks, footer), so
unreferenced host bytes are worth a finding.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...schemas import vhd as V

if TYPE_CHECKING:
    from ..check import CheckContext

counts_generic = False
unreferenced_is_suspect = True

#: findings listed one by one per rule; the rest is one summary finding
LISTED = 20
U64 = np.uint64


def check(ctx: CheckContext) -> None:
    img = ctx.image
    _footers(ctx, img)
    if img.footer["savedState"]:
        ctx.notice("warning", "saved_state", "savedState is set: the disk belongs to a saved "
                   "(hibernated) virtual machine; writing to it breaks that VM's resume",
                   structure=f"{img.footer_name}.savedState",
                   host_offset=(0 if img.footer_copy is not None else img.footer_offset) + 84)
    if img.dynamic and img.bat is not None and img.block_size:
        _locators(ctx, img)
        _bitmaps(ctx, img)
        _counters(ctx, img)


def _footers(ctx, img) -> None:
    """Both footers have the right checksum yet differ: one of them is stale."""
    codes = {f.code for f in img._findings}
    if "footer_mismatch" in codes and "footer_checksum" not in codes:
        ctx.corruption("footer_mismatch", "the footer copy at offset 0 differs from the footer "
                       "at the end of the file although both checksums are right: one of them "
                       "is stale (QEMU uses the copy)", structure="footer_copy", host_offset=0,
                       size=V.FOOTER_SIZE)


def _locators(ctx, img) -> None:
    """Parent locator data must not overlap the footers, the header, the BAT or a block."""
    spans = [(0, V.FOOTER_SIZE, "the footer copy")]
    if img.footer_offset is not None:
        spans.append((img.footer_offset, img.footer_bytes, "the footer"))
    if img.header_offset is not None:
        spans.append((img.header_offset, V.HEADER_SIZE, "the dynamic header"))
    spans.append((img.bat_offset, -(-img.bat.size * 4 // V.SECTOR) * V.SECTOR, "the BAT"))
    idx, start, end = img._block_ranges()
    for loc in img.locators:                 # at most 8
        off, n = loc["platformDataOffset"], loc["platformDataLength"]
        if not n:
            continue
        hits = [what for s, length, what in spans if off < s + length and s < off + n]
        blocks = np.flatnonzero((start < U64(min(off + n, (1 << 64) - 1))) & (U64(off) < end))
        if blocks.size:
            hits.append(f"block {int(idx[blocks[0]])}" + (f" and {blocks.size - 1} more"
                                                          if blocks.size > 1 else ""))
        if hits:
            ctx.corruption("locator_overlap", f"parent locator {loc['index']} data at {off:#x} "
                           f"(+{n}) overlaps {', '.join(hits)}: the parent name or the data "
                           "there is wrong", structure=f"parent_locator[{loc['index']}]",
                           index=loc["index"], host_offset=loc["entry_offset"], size=n)


def _bitmaps(ctx, img) -> None:
    idx, start, end = img._block_ranges()
    if not idx.size:
        return
    if idx.size * img.bitmap_size > img.limits.max_table_bytes:
        ctx.notice("info", "bitmaps_not_checked", f"{idx.size} sector bitmaps exceed the table "
                   "limit; they were not checked", structure="bitmaps")
        return
    frame = img.tables["bitmaps"]
    readable = frame["readable"].to_numpy()
    present = frame["sectors_present"].to_numpy()
    blocks = frame["block"].to_numpy()
    offsets = frame["bitmap_offset"].to_numpy()
    spb = img.block_size // V.SECTOR
    # sectors of the last block past the end of the disk do not matter
    need = np.minimum(U64(spb), (U64(img.virtual_size) - np.minimum(
        blocks.astype(U64) * U64(img.block_size), U64(img.virtual_size))) // U64(V.SECTOR))
    if img.disk_type == V.DISK_DIFFERENCING:
        code, severity = "bitmap_empty", "info"
        bad = np.flatnonzero(readable & (present == 0) & (need > 0))
        message = lambda k: (f"block {int(blocks[k])} is allocated but its sector bitmap marks no "
                             "sector: the parent shows through everywhere (wasted space)")
    else:
        code, severity = "bitmap_sectors_clear", "warning"
        bits = _bits_in_disk(img, frame, need)
        bad = np.flatnonzero(readable & (bits < need))
        message = lambda k: (f"block {int(blocks[k])}: {int(need[k] - bits[k])} of {int(need[k])} "
                             "sectors have a clear bitmap bit; QEMU reads their stored bytes, "
                             "the specification (and Virtual PC) zeros")
    for k in bad[:LISTED].tolist():
        ctx.notice(severity, code, message(k), structure="sector bitmap", index=int(blocks[k]),
                   host_offset=int(offsets[k]))
    if bad.size > LISTED:
        ctx.notice(severity, code, f"{bad.size - LISTED} more sector bitmaps with the same "
                   f"problem ({code})", structure="sector bitmap")


def _bits_in_disk(img, frame, need):
    """Set bits counted over the sectors inside the disk only (the last block may be cut)."""
    present = frame["sectors_present"].to_numpy().astype(U64)
    spb = img.block_size // V.SECTOR
    cut = np.flatnonzero((need < U64(spb)) & frame["readable"].to_numpy())
    if cut.size:                             # at most one block: the last one
        for k in cut.tolist():
            bits = img.sector_bitmap(int(frame["block"].iloc[k]))
            present[k] = int(bits[:int(need[k])].sum())
    return present


def _counters(ctx, img) -> None:
    """Blocks of the disk and allocated ones, in qemu-img check's counters."""
    bs = img.block_size
    n = -(-img.virtual_size // bs)
    bat = img.bat[:n]
    alloc = np.flatnonzero(bat != V.BAT_UNUSED)
    c = ctx.counts
    c.total_clusters = n
    c.allocated_clusters = int(alloc.size)
    if alloc.size > 1:
        host = bat[alloc] * U64(V.SECTOR)
        step = U64(img.bitmap_size + bs)
        c.fragmented_clusters = int(np.count_nonzero(host[1:] != host[:-1] + step))
