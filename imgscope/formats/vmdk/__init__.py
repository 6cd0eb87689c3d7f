"""VMDK driver: text descriptors, every createType, KDMV/COWD/seSparse extents, delta chains.

A VMDK disk is a descriptor plus extents concatenated in descriptor order.
The file opened may be the descriptor itself, or a KDMV/COWD/seSparse extent
(monolithicSparse and streamOptimized carry their descriptor inside).
"""
from __future__ import annotations

import os

import numpy as np

from ...errors import ImageError, ParseError
from ...io.source import Source
from ...model import Image, ExtentTable
from ...schemas import vmdk as V
from ...schemas._types import FieldRow
from ...schemas.vmdk_descriptor import parse_descriptor, Descriptor
from .. import open_backing
from .extents import (Extent, FlatExtent, ZeroExtent, MissingExtent, SparseExtent, CowdExtent,
                      SeSparseExtent, SECTOR)

MAX_DESCRIPTOR = 1 << 20
FLAT_TYPES = ("FLAT", "VMFS", "VMFSRAW", "VMFSRDM")
SPARSE_TYPES = ("SPARSE", "VMFSSPARSE", "SESPARSE")


def _magic_kind(head: bytes) -> str:
    if head[:4] == V.SPARSE_MAGIC:
        return "sparse"
    if head[:4] == V.COWD_MAGIC:
        return "cowd"
    if len(head) >= 8 and int.from_bytes(head[:8], "little") == V.SESPARSE_MAGIC:
        return "sesparse"
    return "text"


class VmdkImage(Image):
    format = "vmdk"
    backing_format = "vmdk"      # qemu-img info names it for every VMDK child
    slack_unit = SECTOR          # structures and stream records are padded to sectors

    def __init__(self, source: Source, **kw) -> None:
        super().__init__(source, **kw)
        self._sources: dict[str, Source] = {str(self.path.resolve()): source}
        self._by_name: dict[str, Source] = {}
        self._file_list: list[Source] = [source]
        self.extents_list: list[Extent] = []
        self.descriptor: Descriptor | None = None
        self.backing_format = None
        head = source.read_upto(0, 2048)
        kind = _magic_kind(head)
        self.direct = kind != "text"          # opened an extent file itself (qemu: no type)
        if kind == "sparse":
            self._open_sparse_file()
        elif kind in ("cowd", "sesparse"):
            cls = CowdExtent if kind == "cowd" else SeSparseExtent
            ext = cls(self, 0, "VMFSSPARSE" if kind == "cowd" else "SESPARSE", 0, 0,
                      source=source, file_index=0, header_name="header")
            ext.length = ext.capacity
            self.extents_list = [ext]
            self._field_rows += ext.rows
            self.variant = "vmfsSparse" if kind == "cowd" else "seSparse"
        else:
            if source.size > MAX_DESCRIPTOR:
                raise ParseError(f"descriptor file of {source.size} bytes is too large "
                                 f"(limit {MAX_DESCRIPTOR})", path=str(self.path), offset=0,
                                 structure="descriptor")
            self._use_descriptor(source.read(0, source.size, "descriptor"), 0, self.path.name)
        self.virtual_size = sum(e.length for e in self.extents_list)
        self.cluster_size = self._common_cluster_size()
        self._open_parent()
        self._register_tables()

    def _common_cluster_size(self) -> int | None:
        """The grain size when every extent is of the same kind (qemu's rule), else None."""
        real = [e for e in self.extents_list if not isinstance(e, (ZeroExtent, MissingExtent))]
        if not real:
            return None
        a = real[0]
        same = all(e.flat == a.flat and e.compressed == a.compressed
                   and (a.flat or e.cluster_size == a.cluster_size) for e in real[1:])
        self.info_complete = same      # qemu-img info omits cluster-size and dirty-flag otherwise
        return a.cluster_size if same and not a.flat else None

    # ---- opening --------------------------------------------------------------------
    def _open_sparse_file(self) -> None:
        ext = SparseExtent(self, 0, "SPARSE", 0, 0, source=self.source, file_index=0,
                           header_name="header")
        self._field_rows += ext.rows
        h = ext.header
        text = b""
        if h["descriptorOffset"] and h["descriptorSize"]:
            d_off, d_len = h["descriptorOffset"] * SECTOR, h["descriptorSize"] * SECTOR
            if d_off + d_len > self.source.size:
                self.note("error", "descriptor_beyond_eof", f"embedded descriptor area "
                          f"{d_off:#x} (+{d_len}) extends past the end of the file",
                          structure="header.descriptorSize", host_offset=0x24)
            text = self.source.read_upto(d_off, min(d_len, MAX_DESCRIPTOR))
        desc = parse_descriptor(text, h["descriptorOffset"] * SECTOR) if text.strip(b"\0") else None
        if desc is not None and h["capacity"] == 0 and desc.extents:
            # a descriptor-only KDMV file: its descriptor lists the real extents
            self._use_descriptor(text, h["descriptorOffset"] * SECTOR, self.path.name)
            for e in self.extents_list:
                if e.source is self.source:
                    self.note("error", "extent_is_descriptor",
                              f"{e.label} names this descriptor-only file itself (capacity 0)",
                              structure=e.label, host_offset=0x0C)
            return
        ext.length = ext.capacity
        self.extents_list = [ext]
        if desc is None:
            self.note("warning", "descriptor_missing",
                      "sparse extent without an embedded descriptor (a split extent opened "
                      "on its own?); read as one extent", structure="descriptor")
            self.variant = "monolithicSparse"
            return
        self._adopt_descriptor(desc, text, h["descriptorOffset"] * SECTOR)
        self.variant = desc.create_type or ("streamOptimized" if ext.compressed else "monolithicSparse")

    def _adopt_descriptor(self, desc: Descriptor, text: bytes, base: int) -> None:
        self.descriptor = desc
        raw = lambda off, n: text[off - base:off - base + n]
        for p in desc.problems:
            self.note("warning", "descriptor_syntax", f"descriptor line {p[0]}: {p[2]}",
                      structure="descriptor", host_offset=p[1])
        for group, entries in (("descriptor header", desc.header), ("descriptor ddb", desc.ddb)):
            for e in entries:
                self._field_rows.append(FieldRow(group, e.key, e.offset, e.length,
                                                 raw(e.offset, e.length), e.value, e.value,
                                                 _DESCRIPTIONS.get(e.key, "")))
        # extent lines are rows of tables['extents'] (there may be thousands of them)

    def _use_descriptor(self, text: bytes, base: int, name: str) -> None:
        desc = parse_descriptor(text, base)
        self._adopt_descriptor(desc, text, base)
        self.variant = desc.create_type or "custom"
        if not desc.extents:
            self.note("error", "descriptor_no_extents", "descriptor lists no extents",
                      structure="descriptor")
        start = 0
        for i, line in enumerate(desc.extents):
            ext = self._make_extent(i, line, start)
            self.extents_list.append(ext)
            self._field_rows += ext.rows
            start += ext.length

    def _extent_source(self, name: str, i: int) -> tuple[Source | None, int]:
        from ...io.paths import resolve_named_file
        if name in self._by_name:                 # many lines naming one file: resolve once
            src = self._by_name[name]
            return src, self._file_list.index(src)
        path = resolve_named_file(name.replace("\\", "/"), self.path, self.allow_paths,
                                  f"extent[{i}] file")
        key = str(path)
        if key not in self._sources:
            try:
                src = Source(path)
            except ImageError as exc:
                self.note("error", "extent_missing", f"extent[{i}] file {name!r}: {exc.message}",
                          structure=f"extent[{i}]")
                return None, -1
            src.named_as = name
            self._sources[key] = src
            self._file_list.append(src)
        src = self._sources[key]
        self._by_name[name] = src
        return src, self._file_list.index(src)

    def _make_extent(self, i: int, line, start: int) -> Extent:
        t = (line.type or "").upper()
        if line.sectors is None:
            self.note("error", "extent_line_invalid", f"extent[{i}] line {line.line} has no "
                      f"decimal size: {line.raw.strip()!r}; it is ignored",
                      structure=f"extent[{i}]", host_offset=line.byte_offset)
            return MissingExtent(self, i, t, start, 0, line=line)
        length = line.sectors * SECTOR
        if start + length >= 1 << 63:
            self.note("error", "extent_too_large", f"extent[{i}] of {line.sectors} sectors makes the "
                      "disk larger than 2^63 bytes; it is ignored", structure=f"extent[{i}]",
                      host_offset=line.byte_offset)
            return MissingExtent(self, i, t, start, 0, line=line)
        if t == "ZERO":
            return ZeroExtent(self, i, t, start, length, line=line)
        if not line.filename:
            self.note("error", "extent_no_file", f"extent[{i}] of type {t} names no file",
                      structure=f"extent[{i}]", host_offset=line.byte_offset)
            return MissingExtent(self, i, t, start, length, line=line)
        src, fi = self._extent_source(line.filename, i)
        if src is None:
            return MissingExtent(self, i, t, start, length, line=line)
        kw = dict(source=src, file_index=fi, line=line)
        if t in FLAT_TYPES:
            if line.offset is None and t == "FLAT":
                self.note("warning", "flat_offset_missing", f"extent[{i}] FLAT line has no "
                          "decimal offset; 0 is assumed (QEMU refuses it)",
                          structure=f"extent[{i}]", host_offset=line.byte_offset)
            return FlatExtent(self, i, t, start, length, offset=(line.offset or 0) * SECTOR, **kw)
        if t in SPARSE_TYPES:
            kind = _magic_kind(src.read_upto(0, 8))
            cls = {"sparse": SparseExtent, "cowd": CowdExtent, "sesparse": SeSparseExtent}.get(kind)
            if cls is None:
                self.note("error", "extent_magic", f"extent[{i}] {src.path.name} is not a sparse "
                          "extent (no KDMV/COWD/seSparse magic)", structure=f"extent[{i}]",
                          host_offset=0, file=str(src.path))
                return MissingExtent(self, i, t, start, length, line=line)
            return cls(self, i, t, start, length, **kw)
        self.note("error", "extent_type_unknown", f"extent[{i}] has unknown type {line.type!r}",
                  structure=f"extent[{i}]", host_offset=line.byte_offset)
        return MissingExtent(self, i, t, start, length, line=line)

    def _open_parent(self) -> None:
        desc = self.descriptor
        hint = desc.parent_hint if desc is not None else None
        first = self.extents_list[0] if self.extents_list else None
        if self.direct and isinstance(first, CowdExtent) and not first.header["flags"] & V.COWD_FLAG_ROOT:
            raw = V.cowd_parent_file_name(first.header).split(b"\0")[0]
            hint = hint or (raw.decode("utf-8", "replace") if raw else None)
        if not hint:
            return
        self.backing_name = hint
        self.backing_format = "vmdk"
        self.backing = open_backing(self, hint.replace("\\", "/"), "vmdk", "parent disk")
        parent_cid = desc.parent_cid if desc is not None else None
        cid = getattr(self.backing, "cid", None)
        if parent_cid is not None and cid is not None and parent_cid != cid:
            self.note("error", "cid_mismatch",
                      f"parentCID {parent_cid:08x} does not match the parent's CID {cid:08x} "
                      "(parent modified since this child was made)", structure="descriptor")
        if self.backing.virtual_size != self.virtual_size:
            self.note("warning", "parent_size_mismatch",
                      f"parent is {self.backing.virtual_size} bytes, child {self.virtual_size}",
                      structure="descriptor")

    # ---- the model ---------------------------------------------------------------------
    @property
    def cid(self) -> int | None:
        return self.descriptor.cid if self.descriptor is not None else None

    def actual_size(self) -> int:
        """Descriptor plus each extent's file, once per extent line (as qemu counts)."""
        total = self.source.allocated
        for e in self.extents_list:
            if e.source is not None and e.source is not self.source:
                total += e.source.allocated
        return total

    def files(self) -> list[Source]:
        return list(self._file_list)

    def _own_extents(self) -> ExtentTable:
        from ...io.chain import concat, mark_host_holes
        from ...model import KIND_DATA, KIND_ZERO, KIND_UNALLOCATED, NO_HOST
        files = self.files()
        simple = [e for e in self.extents_list if isinstance(e, (FlatExtent, ZeroExtent, MissingExtent))
                  and e.length]
        pieces = []
        for ext in self.extents_list:
            if ext.length and not isinstance(ext, (FlatExtent, ZeroExtent, MissingExtent)):
                t = ext.table(files)
                pieces.append(t.replace(guest=t.guest + np.uint64(ext.start)))
        if simple:
            # flat, zero and missing extents in one table: a descriptor may list thousands
            n = len(simple)
            kind = np.array([KIND_DATA if isinstance(e, FlatExtent) else
                             KIND_ZERO if isinstance(e, ZeroExtent) else KIND_UNALLOCATED
                             for e in simple], np.uint8)
            t = ExtentTable(np.array([e.start for e in simple], np.uint64),
                            np.array([e.length for e in simple], np.uint64), kind,
                            np.array([e.offset if isinstance(e, FlatExtent) else NO_HOST
                                      for e in simple], np.uint64),
                            np.zeros(n, np.uint64),
                            np.array([e.file_index if isinstance(e, FlatExtent) else -1
                                      for e in simple], np.int16),
                            np.zeros(n, np.int16), files)
            # QEMU asks a flat extent's file: its holes are data *and* zero
            for fi in np.unique(t.file[t.file >= 0]).tolist():
                t = mark_host_holes(t, fi)
            pieces.append(t)
        return concat(pieces, files)

    def _host_regions(self) -> list:
        regs = []
        if not self.direct:
            regs.append((0, 0, self.source.size, "descriptor", "descriptor"))
        for ext in self.extents_list:
            regs += ext.regions()
            if not ext.flat:
                regs += ext.grain_regions(self.files())
        return regs

    def _register_tables(self) -> None:
        def lazy(name):
            def make():
                from . import tables
                return getattr(tables, name)(self)
            return make
        names = {"extents": "extents_frame", "descriptor": "descriptor_frame", "ddb": "ddb_frame",
                 "grain_directory": "grain_directory_frame", "grain_tables": "grain_tables_frame"}
        if any(isinstance(e, SparseExtent) and e.rgd is not None for e in self.extents_list):
            names["redundant_grain_directory"] = "redundant_grain_directory_frame"
        if any(isinstance(e, SparseExtent) and e.markers for e in self.extents_list):
            names["markers"] = "markers_frame"
        self._tables.update({t: lazy(fn) for t, fn in names.items()})

    def format_specific(self) -> dict:
        desc = self.descriptor
        extents = []
        for ext in self.extents_list:
            if ext.source is None:
                continue
            e = {"virtual-size": ext.length,
                 "filename": getattr(ext.source, "given_name", None) or str(ext.source.path),
                 "format": "" if self.direct else ext.type}
            if not ext.flat:
                e["cluster-size"] = ext.cluster_size
            if ext.compressed:
                e["compressed"] = True
            extents.append(e)
        return {"type": "vmdk", "data": {
            "cid": desc.cid if desc is not None and desc.cid is not None else 0,
            "parent-cid": desc.parent_cid if desc is not None and desc.parent_cid is not None
            else 0xFFFFFFFF,
            "create-type": self.variant, "extents": extents}}


_DESCRIPTIONS = {
    "version": "descriptor version (1, 2, or 3 with change tracking)",
    "encoding": "character set of the descriptor text",
    "CID": "content ID: random 32-bit value renewed on the first write after each open",
    "parentCID": "CID of the parent when this child was made; ffffffff = no parent",
    "createType": "disk type: which files and extent kinds make up the disk",
    "parentFileNameHint": "path of the parent disk (relative to this descriptor)",
    "isNativeSnapshot": "whether the disk is a native (array) snapshot",
    "changeTrackPath": "change tracking (CBT) file",
    "ddb.virtualHWVersion": "virtual hardware version of the VM the disk was made for",
    "ddb.geometry.cylinders": "physical CHS geometry: cylinders",
    "ddb.geometry.heads": "physical CHS geometry: heads",
    "ddb.geometry.sectors": "physical CHS geometry: sectors per track",
    "ddb.adapterType": "virtual disk controller (ide, buslogic, lsilogic, legacyESX)",
    "ddb.toolsVersion": "VMware Tools version",
    "ddb.uuid": "disk UUID as 16 hex byte pairs",
    "ddb.longContentID": "long content ID (32 hex digits)",
    "ddb.thinProvisioned": "1 when the disk is thin provisioned",
}
