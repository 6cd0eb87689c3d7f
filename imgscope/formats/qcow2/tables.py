"""qcow2 metadata tables as DataFrames (one row per entry, bit fields as columns)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ...frames import nullable_offsets
from ...model import KINDS, NO_HOST
from ...schemas import qcow2 as S
from .clusters import classify_standard, read_l2_tables, l2_offsets
from .refcounts import refcounts, refblock_offsets

U64 = np.uint64


def extensions_frame(img) -> pd.DataFrame:
    ex = img.header.extensions
    return pd.DataFrame({
        "index": [e.index for e in ex],
        "offset": np.array([e.offset for e in ex], U64),
        "type": np.array([e.type for e in ex], np.uint32),
        "name": [e.name for e in ex],
        "length": np.array([e.length for e in ex], np.uint32),
        "data": pd.Series([e.data for e in ex], dtype=object),
    })


def feature_names_frame(img) -> pd.DataFrame:
    fn = img.header.feature_names
    kinds = {0: "incompatible", 1: "compatible", 2: "autoclear"}
    return pd.DataFrame({
        "offset": np.array([f["offset"] for f in fn], U64),
        "type": [kinds.get(f["type"], str(f["type"])) for f in fn],
        "bit": np.array([f["bit"] for f in fn], np.uint8),
        "name": [f["name"] for f in fn],
    })


def l1_frame(img) -> pd.DataFrame:
    l1, l1_offset = img.l1(), img.header.values["l1_table_offset"]
    n = l1.size
    return pd.DataFrame({
        "index": np.arange(n, dtype=np.int64),
        "entry_offset": U64(l1_offset) + U64(8) * np.arange(n, dtype=U64),
        "raw": l1.astype(U64),
        "l2_offset": (l1 & U64(S.L1E_OFFSET_MASK)).astype(U64),
        "copied": (l1 >> U64(63)) == 1,
        "reserved": (l1 & U64(S.L1E_RESERVED_MASK)).astype(U64),
    })


def l2_frame(img) -> pd.DataFrame:
    """Every entry of every L2 table reachable from the active L1."""
    geo = img.geometry
    l1 = img.l1()
    l1 = l1[:geo.l1_needed]
    off = l2_offsets(img, geo, l1, img.header.values["l1_table_offset"], "L1 table")
    alloc = np.flatnonzero(off)
    uniq, tables = read_l2_tables(img, geo, off)
    rows = np.searchsorted(uniq, off[alloc])
    l2e = geo.l2_entries
    ent = tables[rows].reshape(-1)
    l1_index = np.repeat(alloc, l2e)
    l2_index = np.tile(np.arange(l2e), alloc.size)
    esize = 16 if geo.extended_l2 else 8
    entry_offset = np.repeat(off[alloc], l2e) + (l2_index * esize).astype(U64)
    guest = (l1_index.astype(U64) * U64(l2e) + l2_index.astype(U64)) << U64(geo.cluster_bits)
    e = ent["entry"].astype(U64) if geo.extended_l2 else ent.astype(U64)
    kind, host, hlen = classify_standard(geo, e)
    df = pd.DataFrame({
        "l1_index": l1_index, "l2_index": l2_index, "entry_offset": entry_offset,
        "guest_offset": guest, "raw": e,
        "type": pd.Categorical.from_codes(kind.astype(np.int64), categories=list(KINDS)),
        "host_offset": nullable_offsets(host),
        "compressed_size": hlen,
        "copied": (e >> U64(63)) == 1,
        "compressed": ((e >> U64(62)) & U64(1)) == 1,
        # bit 0 is a zero flag only in standard entries; in compressed ones it
        # belongs to the compressed data's host offset
        "zero_flag": ((e & U64(1)) == 1) & (((e >> U64(62)) & U64(1)) == 0),
        "reserved": np.where(((e >> U64(62)) & U64(1)) == 1, U64(0),
                             e & U64(S.L2E_STD_RESERVED_MASK)).astype(U64),
    })
    if geo.extended_l2:
        bm = ent["bitmap"].astype(U64)
        df["alloc_bitmap"] = (bm & U64(0xFFFFFFFF)).astype(np.uint32)
        df["zero_bitmap"] = (bm >> U64(32)).astype(np.uint32)
    return df[df.guest_offset < U64(geo.size)].reset_index(drop=True)


def reftable_frame(img) -> pd.DataFrame:
    t = img._reftable()
    base = img.header.values["refcount_table_offset"]
    return pd.DataFrame({
        "index": np.arange(t.size, dtype=np.int64),
        "entry_offset": U64(base) + U64(8) * np.arange(t.size, dtype=U64),
        "raw": t,
        "refblock_offset": (t & U64(S.REFT_OFFSET_MASK)).astype(U64),
        "reserved": (t & U64(S.REFT_RESERVED_MASK)).astype(U64),
    })


def refcounts_frame(img) -> pd.DataFrame:
    """Stored refcount of every host cluster up to the end of the file."""
    _, rc = refcounts(img)
    n_clusters = -(-img.source.size // img.cluster_size)
    n = max(n_clusters, int(np.flatnonzero(rc).max()) + 1 if rc.any() else 0)
    counts = np.zeros(n, U64)
    m = min(n, rc.size)
    counts[:m] = rc[:m]
    return pd.DataFrame({
        "cluster": np.arange(n, dtype=np.int64),
        "host_offset": np.arange(n, dtype=U64) * U64(img.cluster_size),
        "refcount": counts,
    })


SNAPSHOT_COLUMNS = ["id_str", "name", "l1_table_offset", "l1_size", "date_sec", "date_nsec",
                    "vm_clock_nsec", "vm_state_size", "extra_data_size", "vm_state_size_large",
                    "disk_size", "icount", "offset", "entry_size"]


def snapshots_frame(img) -> pd.DataFrame:
    return pd.DataFrame([{c: s[c] for c in SNAPSHOT_COLUMNS} for s in img.snapshots],
                        columns=SNAPSHOT_COLUMNS)


BITMAP_COLUMNS = ["index", "name", "offset", "bitmap_table_offset", "bitmap_table_size",
                  "flags", "in_use", "auto", "type", "granularity_bits", "granularity",
                  "extra_data_size"]


def bitmaps_frame(img) -> pd.DataFrame:
    rows = []
    for b in img.bitmaps:
        r = {c: b.get(c) for c in BITMAP_COLUMNS}
        r["in_use"], r["auto"] = bool(b["flags"] & 1), bool(b["flags"] & 2)
        rows.append(r)
    return pd.DataFrame(rows, columns=BITMAP_COLUMNS)


def bitmap_tables_frame(img) -> pd.DataFrame:
    parts = []
    for b in img.bitmaps:
        t = b["table"]
        parts.append(pd.DataFrame({
            "bitmap": b["name"], "index": np.arange(t.size, dtype=np.int64),
            "entry_offset": U64(b["bitmap_table_offset"]) + U64(8) * np.arange(t.size, dtype=U64),
            "raw": t, "data_offset": (t & U64(S.BME_TABLE_OFFSET_MASK)).astype(U64),
            "all_ones": ((t & U64(S.BME_TABLE_OFFSET_MASK)) == 0) & ((t & U64(1)) == 1),
        }))
    cols = ["bitmap", "index", "entry_offset", "raw", "data_offset", "all_ones"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)


def luks_slots_frame(img) -> pd.DataFrame:
    base = img.header.crypto_ext["offset"]
    rows = []
    for i, s in enumerate(img.luks["key_slots"]):
        rows.append({"slot": i, "offset": base + 208 + 48 * i,
                     "active": s.active == S.LUKS_KEY_ENABLED, "iterations": s.iterations,
                     "key_material_offset": s.key_material_offset * 512, "stripes": s.stripes})
    return pd.DataFrame(rows)
