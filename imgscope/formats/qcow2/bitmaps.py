"""qcow2 persistent dirty bitmaps: directory entries and bitmap tables."""
from __future__ import annotations

import numpy as np

from ...schemas import qcow2 as S
from ..base import validate_table, parse_records


def parse_bitmaps(image) -> list[dict]:
    ext = image.header.bitmaps_ext
    if not ext:
        if image.header.values["autoclear_features"] & S.AUTOCLEAR_BITMAPS:
            image.note("error", "bitmaps_bit_without_extension",
                       "autoclear bit 'bitmaps' is set but there is no bitmaps extension",
                       structure="header.autoclear_features", host_offset=88)
        return []
    if not image.header.values["autoclear_features"] & S.AUTOCLEAR_BITMAPS:
        image.note("warning", "bitmaps_inconsistent",
                   "bitmaps extension present but the autoclear 'bitmaps' bit is clear: "
                   "bitmaps must be treated as inconsistent", structure="bitmaps extension")
    off, size, n = ext["bitmap_directory_offset"], ext["bitmap_directory_size"], ext["nb_bitmaps"]
    if not validate_table(image, off, size, "bitmap directory", align=image.cluster_size,
                          limit=1024 * 65535):
        return []
    area = image.source.read(off, size, "bitmap directory")
    out = []
    for i, rows, pos, size in parse_records(image, S.bitmap_dir_entry, area, off, min(n, 65535),
                                            name="bitmap", code="bitmap_directory_truncated"):
        v = {r.field: r.value for r in rows}
        entry = dict(v, index=i, offset=off + pos, rows=rows,
                     granularity=1 << v["granularity_bits"])
        entry["table"] = read_bitmap_table(image, entry)
        out.append(entry)
    return out


def read_bitmap_table(image, entry: dict) -> np.ndarray:
    n, off = entry["bitmap_table_size"], entry["bitmap_table_offset"]
    if not validate_table(image, off, n * 8, f"bitmap table of {entry['name']!r}",
                          align=image.cluster_size):
        return np.zeros(0, np.uint64)
    t = S.u64_table(n).parse(image.source.read(off, n * 8, "bitmap table")).astype(np.uint64)
    bad = np.flatnonzero(t & np.uint64(S.BME_TABLE_RESERVED_MASK))
    if bad.size:
        image.note("error", "bitmap_table_reserved_bits",
                   f"{bad.size} entries of bitmap table {entry['name']!r} have reserved bits set",
                   structure="bitmap table", host_offset=off + 8 * int(bad[0]))
    return t
