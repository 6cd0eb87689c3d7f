"""VMDK metadata as DataFrames: descriptor, extents, grain directories and tables, markers."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ...schemas import vmdk as V
from .extents import SparseExtent, CowdExtent, SeSparseExtent, GrainExtent, SECTOR

U64 = np.uint64


def extents_frame(img) -> pd.DataFrame:
    rows = []
    for e in img.extents_list:
        rows.append({"index": e.index, "type": e.type, "kind": e.kind,
                     "access": e.line.access if e.line is not None else "RW",
                     "start": e.start, "length": e.length, "sectors": e.length // SECTOR,
                     "file": str(e.source.path) if e.source is not None else None,
                     "offset": getattr(e, "offset", 0), "grain_size": e.cluster_size,
                     "compressed": e.compressed})
    return pd.DataFrame(rows)


def _entries(entries) -> pd.DataFrame:
    return pd.DataFrame([{"key": e.key, "value": e.value, "line": e.line, "offset": e.offset,
                          "length": e.length, "raw": e.raw.rstrip("\r\n")} for e in entries],
                        columns=["key", "value", "line", "offset", "length", "raw"])


def descriptor_frame(img) -> pd.DataFrame:
    d = img.descriptor
    return _entries(d.header) if d is not None else _entries([])


def ddb_frame(img) -> pd.DataFrame:
    d = img.descriptor
    return _entries(d.ddb) if d is not None else _entries([])


def _directory(img, attr: str) -> pd.DataFrame:
    parts = []
    for e in img.extents_list:
        d = getattr(e, attr, None)
        if not isinstance(e, GrainExtent) or d is None or not d.size:
            continue
        h = getattr(e, "footer", None) or e.header
        if isinstance(e, SparseExtent):
            base = (h["gdOffset"] if attr == "gd" else h["rgdOffset"]) * SECTOR
            width = 4
            gt_offset = d * U64(SECTOR)
        elif isinstance(e, CowdExtent):
            base, width, gt_offset = h["gdOffset"] * SECTOR, 4, d * U64(SECTOR)
        else:
            base, width = h["grain_dir_offset"] * SECTOR, 8
            alloc, index = V.decode_sesparse_gd(d)
            gt_offset = np.where(alloc, (U64(h["grain_tables_offset"]) + index
                                         * U64(h["grain_table_size"])) * U64(SECTOR), 0)
        parts.append(pd.DataFrame({
            "extent": e.index, "index": np.arange(d.size, dtype=np.int64),
            "entry_offset": U64(base) + U64(width) * np.arange(d.size, dtype=U64),
            "raw": d.astype(U64), "gt_offset": np.asarray(gt_offset, U64)}))
    cols = ["extent", "index", "entry_offset", "raw", "gt_offset"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)


def grain_directory_frame(img) -> pd.DataFrame:
    return _directory(img, "gd")


def redundant_grain_directory_frame(img) -> pd.DataFrame:
    return _directory(img, "rgd")


def grain_tables_frame(img) -> pd.DataFrame:
    """Every entry of every grain table reached from the primary directories."""
    gd = _directory(img, "gd")
    parts = []
    for e in img.extents_list:
        if not isinstance(e, GrainExtent):
            continue
        dirs = gd[(gd.extent == e.index) & (gd.gt_offset != 0)]
        offs = dirs.gt_offset.to_numpy(U64)
        offs = offs[offs + U64(e.per_table * e.entry_bytes) <= U64(e.source.size)]
        if not offs.size:
            continue
        tables = np.concatenate([e.parse_gts(e.source.read(int(o), e.per_table * e.entry_bytes,
                                                           "grain table"), 1) for o in offs])
        gi = np.repeat(dirs.index.to_numpy()[:offs.size] if False else
                       dirs["index"].to_numpy()[:offs.size], e.per_table)
        k = np.tile(np.arange(e.per_table), offs.size)
        raw = tables.reshape(-1)
        guest = e.start + (gi * e.per_table + k).astype(U64) * U64(e.cluster_size)
        parts.append(pd.DataFrame({
            "extent": e.index, "gt_index": gi, "index": k,
            "entry_offset": np.repeat(offs, e.per_table) + (k * e.entry_bytes).astype(U64),
            "guest_offset": guest, "raw": raw}))
    cols = ["extent", "gt_index", "index", "entry_offset", "guest_offset", "raw"]
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)
    return df[df.guest_offset < U64(img.virtual_size)].reset_index(drop=True) if len(df) else df


def markers_frame(img) -> pd.DataFrame:
    """Walk a stream-optimized extent record by record: grains and metadata markers."""
    rows = []
    for e in img.extents_list:
        if not (isinstance(e, SparseExtent) and e.markers):
            continue
        src, pos = e.source, e.header["overHead"] * SECTOR
        limit = src.size
        while pos + 12 <= limit and len(rows) < img.limits.max_extents:
            head = src.read(pos, min(512, limit - pos), "stream record")
            val = int.from_bytes(head[:8], "little")
            size = int.from_bytes(head[8:12], "little")
            if size:
                rows.append({"extent": e.index, "offset": pos, "type": "grain", "lba": val,
                             "size": size, "sectors": -(-(12 + size) // SECTOR)})
                pos += rows[-1]["sectors"] * SECTOR
                continue
            mtype = int.from_bytes(head[12:16], "little") if len(head) >= 16 else 0
            name = V.MARKER_NAMES.get(mtype, f"unknown {mtype}")
            rows.append({"extent": e.index, "offset": pos, "type": name, "lba": val, "size": 0,
                         "sectors": 1 + val})
            if mtype == V.MARKER_EOS:
                break
            pos += (1 + (val if mtype in (V.MARKER_GT, V.MARKER_GD) else
                         1 if mtype == V.MARKER_FOOTER else 0)) * SECTOR
    return pd.DataFrame(rows, columns=["extent", "offset", "type", "lba", "size", "sectors"])
