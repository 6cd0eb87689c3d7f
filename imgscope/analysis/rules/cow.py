"""Check rules of cow images (QEMU's old `cow` format and User-Mode-Linux COW files).

No qemu-img that reads cow exists any more, so imgscope counts its own way: one
corruption per error the driver found while mapping the image -- an allocation
bitmap the file does not hold completely (it must cover every sector of `size`;
the sectors without a bit read as the backing file or zeros), sectors whose bit
is set but whose data lies past the end of the file (their data is lost), an
unusable alignment or cow_format.  The layout is fixed (header, bitmap, data
area at computed offsets), so the generic layout rules count as they are.

The data area is addressed sector for sector and is sparse: sectors whose bit
is clear are holes or stale bytes, never referenced by anything, so
unreferenced space is normal (not suspect).  The counters qemu-img prints for
cluster formats are filled in with sectors: sectors of the disk and sectors
stored in this file.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import ImageError
from ...model import KIND_DATA

if TYPE_CHECKING:
    from ..check import CheckContext

unreferenced_is_suspect = False

SECTOR = 512


def check(ctx: CheckContext) -> None:
    img = ctx.image
    try:
        t = img._own_extents()
    except ImageError:
        return                      # the checker reported that the map cannot be read
    c = ctx.counts
    c.total_clusters = img.virtual_size // SECTOR
    c.allocated_clusters = int(t.length[t.kind == KIND_DATA].sum()) // SECTOR
