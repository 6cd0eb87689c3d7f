"""Check rules of VDI images, counted the way `qemu-img check` counts.

QEMU's check (block/vdi.c, vdi_co_check) reads the block map as it is, entry by
entry, and counts one corruption for

* each entry whose data block index is not below `blocks_in_image`
  ("block index N too large, is M"),
* each entry reusing a data block index an earlier entry uses
  ("block index M also used by M"; the earlier user keeps it),
* a `blocks_allocated` header field that differs from the number of entries
  with an index below `blocks_in_image` ("allocated blocks mismatch").

Entries of a map that runs past the end of the file read as zeros there (index
0, allocated), as QEMU reads them.  Damage for which QEMU refuses to open the
image (a disk larger than its map, a legacy sector size other than 512, link
or parent UUIDs in an image that is no differencing image) makes its check
fail: the check error `qemu_check_fails` (exit 1).  What QEMU refuses only for
lack of support (other versions and block sizes, unaligned offsets,
differencing images) is checked as it is.  Everything else the driver finds
(blocks past the end of the file, header sizes, unused indexes) is listed, not
counted.

QEMU's writer leaves no gaps (header, map, then data blocks in allocation
order), so host bytes no structure owns are worth a finding.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...schemas import vdi as S

if TYPE_CHECKING:
    from ..check import CheckContext

counts_parse_findings = False
counts_generic = False
unreferenced_is_suspect = True

#: findings listed one by one per rule; the rest is one summary finding
LISTED = 20


def check(ctx: CheckContext) -> None:
    img = ctx.image
    _qemu_refuses(ctx, img)
    _block_map(ctx, img)


def qemu_refusals(img) -> list[str]:
    """The damage for which QEMU 7.2's vdi_open refuses the image (empty: none).

    What QEMU refuses only because it lacks support -- versions other than 1.1,
    block sizes other than 1 MiB, unaligned offsets, differencing images, its own
    size limits -- is no damage: imgscope checks such images as they are."""
    h = img.h
    out = []
    if h["sector_size"] != S.SECTOR:
        out.append(f"the legacy geometry's sector size is {h['sector_size']}, not 512")
    disk = -(-h["disk_size"] // S.SECTOR) * S.SECTOR
    if disk > h["blocks_in_image"] * h["block_size"]:
        out.append(f"disk_size {h['disk_size']} exceeds the {h['blocks_in_image']} blocks of "
                   "the map")
    if h["image_type"] != S.TYPE_DIFF:
        for name in ("uuid_link", "uuid_parent"):
            if h.get(name, S.NULL_UUID) != S.NULL_UUID:
                out.append(f"{name} is set in an image that is no differencing image")
    return out


def _qemu_refuses(ctx, img) -> None:
    reasons = qemu_refusals(img)
    if reasons:
        ctx.check_error("qemu_check_fails", "qemu-img cannot open this image ("
                        + "; ".join(reasons) + "), so its check fails (exit 1); imgscope's "
                        "findings are listed", structure="header", host_offset=0)


def _block_map(ctx, img) -> None:
    h, e = img.h, img.entries
    n, base = h["blocks_in_image"], img.map_offset
    where = lambda k: dict(structure="block_map", index=int(k), host_offset=base + 4 * int(k))
    # entries inside the file the driver did not read: the count cannot be QEMU's
    in_file = max(0, min(n, (img.source.size - base) // 4))
    if img.entries_read < in_file:
        ctx.check_error("check_incomplete", f"{in_file - img.entries_read} block map entries "
                        "inside the file were not read (a limit, or the map runs into the data "
                        "area); the block map counts are incomplete", structure="block_map",
                        host_offset=base + 4 * img.entries_read)
    zeros = n - max(img.entries_read, in_file)      # past the end: QEMU reads index 0
    alloc = e < S.BLOCK_ZERO
    too_large = np.flatnonzero(alloc & (e >= n))
    ok = np.flatnonzero(alloc & (e < n))
    for k in too_large[:LISTED].tolist():
        ctx.corruption("block_index_too_large", f"block map entry {k} = {int(e[k])} is not below "
                       f"blocks_in_image {n} (QEMU: 'block index {k} too large, is {int(e[k])}'); "
                       f"guest block {k} has no valid data block", **where(k))
    if too_large.size > LISTED:
        ctx.corruption("block_index_too_large", f"{too_large.size - LISTED} more block map entries "
                       f"are not below blocks_in_image {n}", count=too_large.size - LISTED,
                       structure="block_map")
    vals = e[ok]
    uniq, first = np.unique(vals, return_index=True)
    later = np.ones(vals.size, bool)
    later[first] = False
    dup = ok[later]
    owner = ok[first[np.searchsorted(uniq, vals[later])]]
    for k, j in zip(dup[:LISTED].tolist(), owner[:LISTED].tolist()):
        ctx.corruption("block_duplicate", f"block map entry {k} = {int(e[k])}: data block "
                       f"{int(e[k])} is also used by entry {j} (QEMU: 'block index {int(e[k])} "
                       f"also used by {int(e[k])}'); guest blocks {j} and {k} share their data",
                       **where(k))
    extra_dups = max(0, dup.size - LISTED)
    if zeros > 0:                          # QEMU's zero entries: index 0, all but one reused
        extra_dups += zeros - (0 if (uniq.size and uniq[0] == 0) else 1)
    if extra_dups:
        ctx.corruption("block_duplicate", f"{extra_dups} more block map entries reuse a data "
                       "block an earlier entry uses" + (f" ({zeros} of them lie past the end of "
                       "the file, where QEMU reads index 0)" if zeros > 0 else ""),
                       count=extra_dups, structure="block_map")
    counted = ok.size + max(zeros, 0)
    if counted != h["blocks_allocated"]:
        ctx.corruption("allocated_count_mismatch", f"blocks_allocated is {h['blocks_allocated']} "
                       f"but {counted} block map entries are allocated (QEMU: 'allocated blocks "
                       f"mismatch, is {counted}, should be {h['blocks_allocated']}'); a writer "
                       "would put the next block over existing data or leave a hole",
                       fixable=True, **img._where("blocks_allocated"))
