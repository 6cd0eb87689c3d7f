"""qcow2 driver: header, extensions, L1/L2, refcounts, snapshots, bitmaps, LUKS header.

Reads only through schemas/qcow2.py; decodes tables with numpy; turns what it
cannot read into findings (or errors with strict=True).
"""
from __future__ import annotations

import numpy as np

from ...errors import ImageError, ParseError
from ...io.source import Source
from ...model import (Image, ExtentTable, KIND_DATA, KIND_ZERO, KIND_COMPRESSED,
                      KIND_ENCRYPTED, NO_HOST)
from ...schemas import qcow2 as S
from ...schemas._types import field_layout
from .. import open_backing
from ..base import validate_table
from .bitmaps import parse_bitmaps
from .clusters import Geometry, map_l1, read_table
from .header import parse_header
from .refcounts import read_reftable, refcounts as _refcounts, refblock_offsets
from .snapshots import parse_snapshots


class Qcow2Image(Image):
    format = "qcow2"

    def __init__(self, source: Source, **kw) -> None:
        super().__init__(source, **kw)
        self.header = hdr = parse_header(self)
        v = hdr.values
        self.variant = f"v{v['version']}"
        self.cluster_size = 1 << v["cluster_bits"]
        self.slack_unit = self.cluster_size
        self.virtual_size = v["size"]
        self._field_rows = list(hdr.rows)
        incompat = v["incompatible_features"]
        self.data_file_source: Source | None = None
        self.data_file_name = hdr.data_file
        if incompat & S.INCOMPAT_DATA_FILE:
            self._open_data_file()
        self.geometry = Geometry(
            cluster_bits=v["cluster_bits"], size=v["size"], version=v["version"],
            extended_l2=bool(incompat & S.INCOMPAT_EXTL2), encrypted=v["crypt_method"] != 0,
            data_file=bool(incompat & S.INCOMPAT_DATA_FILE),
            codec="zstd" if v["compression_type"] == 1 else "deflate")
        self.luks = self._parse_luks()
        self.snapshots = parse_snapshots(self)
        for snap in self.snapshots:
            self._field_rows += snap.pop("rows")
        self.bitmaps = parse_bitmaps(self)
        for bm in self.bitmaps:
            self._field_rows += bm.pop("rows")
        self._l1_cache: np.ndarray | None = None
        self._reftable_cache = None
        self._own_cache: ExtentTable | None = None
        self.backing_name = hdr.backing_file
        self.backing_format = hdr.backing_format
        if hdr.backing_file:
            self.backing = open_backing(self, hdr.backing_file, hdr.backing_format)
        self._register_tables()

    # ---- helpers ------------------------------------------------------------------
    def files(self) -> list[Source]:
        return [self.source] + ([self.data_file_source] if self.data_file_source else [])

    def _open_data_file(self) -> None:
        from ...io.paths import resolve_named_file
        if not self.data_file_name:
            self.note("error", "data_file_missing_name",
                      "external data file bit set but no data file name extension",
                      structure="header.incompatible_features", host_offset=72)
            return
        path = resolve_named_file(self.data_file_name, self.path, self.allow_paths,
                                  "external data file")
        try:
            self.data_file_source = Source(path)
            self.data_file_source.named_as = self.data_file_name
        except ImageError as exc:
            self.note("error", "data_file_unreadable", f"external data file: {exc.message}",
                      structure="external data file")

    def _parse_luks(self) -> dict | None:
        ext = self.header.crypto_ext
        if self.header.values["crypt_method"] != 2:
            if ext:
                self.note("error", "crypto_extension_unexpected",
                          "encryption header pointer present without LUKS encryption",
                          structure="extension full disk encryption header pointer")
            return None
        if not ext:
            self.note("error", "crypto_extension_missing",
                      "LUKS encryption without an encryption header pointer extension",
                      structure="header.crypt_method", host_offset=32)
            return None
        off = ext["offset"]
        if not validate_table(self, off, 592, "LUKS header", align=self.cluster_size):
            return None
        rows = field_layout(S.luks_header, self.source.read(off, 592, "LUKS header"),
                            structure="LUKS header", base_offset=off)
        slots = rows[-1].value
        self._field_rows += rows[:-1]
        for i, slot in enumerate(slots):
            self._field_rows += field_layout(S.luks_keyslot, S.luks_keyslot.build(slot),
                                             structure=f"LUKS key slot[{i}]",
                                             base_offset=off + 208 + 48 * i)
        return {r.field: r.value for r in rows}

    def l1(self) -> np.ndarray:
        """The active L1 table (native uint64); empty when unreadable."""
        if self._l1_cache is None:
            v = self.header.values
            n = v["l1_size"]
            if n * 8 > S.MAX_L1_BYTES:
                self.note("error", "l1_table_too_large",
                          f"active L1 table of {n * 8} bytes exceeds QEMU's 32 MiB limit",
                          structure="header.l1_size", host_offset=36)
            if n < self.geometry.l1_needed:
                self.note("error", "l1_table_too_small",
                          f"L1 table has {n} entries, {self.geometry.l1_needed} needed for "
                          f"the virtual size", structure="header.l1_size", host_offset=36)
            t = read_table(self, v["l1_table_offset"], n, "L1 table", self.cluster_size)
            self._l1_cache = np.zeros(0, np.uint64) if t is None else t
        return self._l1_cache

    def _reftable(self):
        if self._reftable_cache is None:
            t = read_reftable(self)
            self._reftable_cache = np.zeros(0, np.uint64) if t is None else t
        return self._reftable_cache

    def _own_extents(self) -> ExtentTable:
        if self._own_cache is None:
            t = map_l1(self, self.geometry, self.l1(), self.header.values["l1_table_offset"])
            self._own_cache = self._flag_preallocated(t)
        return self._own_cache

    def _flag_preallocated(self, table: ExtentTable) -> ExtentTable:
        """Mark never-written data clusters the way QEMU's map does.

        QEMU considers an image metadata-preallocated when more clusters are
        refcounted than the host file really allocates (by 10% or 2 clusters);
        it then asks the host file which data clusters are holes.
        """
        if self.geometry.encrypted:
            return table
        from ...io.chain import mark_host_holes
        from .refcounts import count_in_use
        cs = self.cluster_size
        real_clusters = self.source.allocated // cs
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = -(-self.source.size // cs)
        if end_cluster < threshold:
            return table
        if count_in_use(self, end_cluster, threshold) < threshold:
            return table
        self.metadata_preallocated = True
        return mark_host_holes(table, 1 if self.geometry.data_file else 0)

    # ---- snapshots --------------------------------------------------------------------
    def find_snapshot(self, name_or_id) -> dict:
        key = str(name_or_id)
        for s in self.snapshots:
            if s["id_str"] == key:
                return s
        for s in self.snapshots:
            if s["name"] == key:
                return s
        raise ImageError(f"no snapshot named or numbered {key!r}", path=str(self.path),
                         structure="snapshot table")

    def snapshot_l1(self, snap: dict) -> np.ndarray:
        t = read_table(self, snap["l1_table_offset"], snap["l1_size"],
                       f"snapshot {snap['name']!r} L1 table", self.cluster_size)
        return np.zeros(0, np.uint64) if t is None else t

    def snapshot(self, name_or_id) -> "Qcow2Snapshot":
        """The disk as it was in a snapshot: its own extents and guest reader."""
        return Qcow2Snapshot(self, self.find_snapshot(name_or_id))

    # ---- tables ------------------------------------------------------------------------
    def _register_tables(self) -> None:
        """Table frames are built on first access (pandas is imported only then)."""
        def lazy(name):
            def make():
                from . import tables
                return getattr(tables, name)(self)
            return make
        names = {"extensions": "extensions_frame", "feature_names": "feature_names_frame",
                 "l1": "l1_frame", "l2": "l2_frame", "refcount_table": "reftable_frame",
                 "refcounts": "refcounts_frame", "snapshots": "snapshots_frame",
                 "bitmaps": "bitmaps_frame", "bitmap_tables": "bitmap_tables_frame"}
        if self.luks:
            names["luks_keyslots"] = "luks_slots_frame"
        self._tables.update({table: lazy(fn) for table, fn in names.items()})

    def _host_regions(self) -> list:
        from .regions import host_regions
        return host_regions(self)

    @property
    def dirty(self) -> bool:
        return bool(self.header.values["incompatible_features"] & S.INCOMPAT_DIRTY)

    def format_specific(self) -> dict:
        from .info import format_specific
        return format_specific(self)


class Qcow2Snapshot(Image):
    """A read-only view of an internal snapshot (same file, the snapshot's L1)."""

    format = "qcow2"

    def __init__(self, image: Qcow2Image, snap: dict) -> None:
        self.__dict__.update({k: v for k, v in image.__dict__.items() if k != "_extents_cache"})
        self._extents_cache = None
        self.parent_image = image
        self.snap = snap
        self.virtual_size = snap["disk_size"]
        self.variant = f"snapshot {snap['name']}"

    def _own_extents(self) -> ExtentTable:
        return map_l1(self.parent_image, self.geometry, self.parent_image.snapshot_l1(self.snap),
                      self.snap["l1_table_offset"], size=self.virtual_size,
                      structure=f"snapshot {self.snap['name']!r} L1 table",
                      files=self.parent_image.files())
