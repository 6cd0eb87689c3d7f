"""Where every qcow2 structure lies in the host file(s)."""
from __future__ import annotations

import numpy as np

from ...model import KIND_DATA, KIND_ZERO, KIND_COMPRESSED, KIND_ENCRYPTED, NO_HOST
from ...schemas import qcow2 as S
from .refcounts import refblock_offsets
from ..base import extent_regions


def _l2_regions(image, l1: np.ndarray, owner: str) -> list:
    off = l1[: image.geometry.l1_needed] & np.uint64(S.L1E_OFFSET_MASK)
    off = np.unique(off[off != 0])
    return [(0, off, np.full(off.size, image.cluster_size, np.uint64), "l2_table", owner)] if off.size else []


def host_regions(image) -> list:
    v = image.header.values
    cs = image.cluster_size
    regs = [(0, 0, min(cs, image.source.size), "header", "header and extensions")]
    regs.append((0, v["l1_table_offset"], v["l1_size"] * 8, "l1_table", "active L1"))
    l1 = image.l1()
    regs += _l2_regions(image, l1, "active L2")
    regs += extent_regions(image._own_extents(), "guest data")
    regs.append((0, v["refcount_table_offset"], v["refcount_table_clusters"] * cs,
                 "refcount_table", "refcount table"))
    reft = image._reftable()
    if reft.size:
        blocks = refblock_offsets(image, reft)
        blocks = blocks[blocks != 0]
        regs.append((0, blocks, np.full(blocks.size, cs, np.uint64), "refcount_block",
                     "refcount blocks"))
    if image.snapshots:
        regs.append((0, v["snapshots_offset"], getattr(image, "_snapshot_table_bytes", 0),
                     "snapshot_table", "snapshot table"))
        seen_l1 = set()
        for snap in image.snapshots:
            if not snap["l1_size"] or snap["l1_table_offset"] in seen_l1:
                continue     # nothing of its own, or the same table as another snapshot
            seen_l1.add(snap["l1_table_offset"])
            owner = f"snapshot {snap['name']}"
            regs.append((0, snap["l1_table_offset"], snap["l1_size"] * 8, "l1_table", owner + " L1"))
            sl1 = image.snapshot_l1(snap)
            regs += _l2_regions(image, sl1, owner + " L2")
            regs += extent_regions(image.snapshot(snap["id_str"])._own_extents(), "guest data")
    if image.header.bitmaps_ext and image.bitmaps is not None:
        ext = image.header.bitmaps_ext
        regs.append((0, ext["bitmap_directory_offset"], ext["bitmap_directory_size"],
                     "bitmap_directory", "bitmap directory"))
        for bm in image.bitmaps:
            regs.append((0, bm["bitmap_table_offset"], bm["bitmap_table_size"] * 8,
                         "bitmap_table", f"bitmap {bm['name']} table"))
            data = bm["table"] & np.uint64(S.BME_TABLE_OFFSET_MASK)
            data = data[data != 0]
            if data.size:
                regs.append((0, data, np.full(data.size, cs, np.uint64), "bitmap_data",
                             f"bitmap {bm['name']} data"))
    if image.header.crypto_ext:
        ext = image.header.crypto_ext
        regs.append((0, ext["offset"], ext["length"], "crypto_header", "LUKS header"))
    return regs
