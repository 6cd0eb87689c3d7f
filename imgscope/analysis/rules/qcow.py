"""Check rules of qcow (version 1) images.

qemu-img cannot check qcow v1 (exit 63), so imgscope counts its own way: one
corruption per error the driver found while mapping the image -- L1 table or
L2 tables past or cut by the end of the file, data clusters past the end of
the file or not sector aligned, compressed clusters whose stored bytes the file
does not hold or whose stored size is 0, and any two structures or clusters
sharing host bytes (qcow v1 has no refcounts, so shared bytes are always
damage).  The driver finds overlaps between every structure and cluster itself,
so the generic layout overlaps are listed without being counted twice.

The counters qemu-img prints for qcow2 are filled in: clusters of the disk,
allocated, compressed and fragmented (an allocated cluster not stored right
after the previous one in guest order; a compressed cluster always counts, as
qemu-img counts them for qcow2).

QEMU's writer appends every table and cluster at the end of the file, so
unreferenced host bytes are worth a finding -- with one exception it does
produce itself: rewriting a compressed cluster leaves the old compressed bytes
behind (there are no refcounts to free them); that space is reported as
unreferenced too, as an `info` finding that is not counted.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...errors import ImageError
from ...model import KIND_COMPRESSED, KIND_UNALLOCATED, NO_HOST

if TYPE_CHECKING:
    from ..check import CheckContext

counts_generic = False
unreferenced_is_suspect = True

U64 = np.uint64


def check(ctx: CheckContext) -> None:
    img = ctx.image
    if not img.usable or not img.virtual_size:
        return
    cs = img.cluster_size
    try:
        t = img._own_extents()
    except ImageError:
        return                      # the checker reported that the map cannot be read
    c = ctx.counts
    c.total_clusters = -(-img.virtual_size // cs)
    hosted = (t.host != NO_HOST) & (t.kind != KIND_UNALLOCATED)
    comp = hosted & (t.kind == KIND_COMPRESSED)
    plain = hosted & ~comp
    clusters = (t.length[plain] + U64(cs - 1)) // U64(cs)
    c.compressed_clusters = int(np.count_nonzero(comp))
    c.allocated_clusters = int(clusters.sum()) + c.compressed_clusters
    # runs are contiguous inside; a run starting elsewhere than where the last one ended
    # is one fragmented cluster, every compressed cluster is one
    order = np.flatnonzero(hosted)
    start, end, is_comp = t.host[order], t.host[order] + t.length[order], comp[order]
    jumps = np.count_nonzero(~is_comp[1:] & (start[1:] != end[:-1])) if order.size > 1 else 0
    c.fragmented_clusters = int(jumps) + c.compressed_clusters
