"""VMDK extents: flat, zero, hosted sparse (KDMV, incl. streamOptimized), COWD, seSparse.

Each extent knows its place in the virtual disk (start, length), reads its own
metadata through schemas/vmdk.py and yields its guest runs in local
coordinates (the driver shifts them by `start`).
"""
from __future__ import annotations

import numpy as np

from ...model import (ExtentTable, KIND_DATA, KIND_ZERO, KIND_UNALLOCATED, KIND_COMPRESSED,
                      NO_HOST, FLAG_RECORD)
from ...schemas import vmdk as V
from ...schemas._types import field_layout
from ..base import coalesce, extent_regions, note_bad_entries, note_beyond_eof, validate_table
from ..twolevel import run_starts, two_level_map, units_at

SECTOR = 512


class Extent:
    """One extent line of the descriptor (or the single extent of a bare file)."""

    kind = "unknown"
    compressed = False
    flat = True

    def __init__(self, image, index: int, type_: str, start: int, length: int, source=None,
                 file_index: int = -1, line=None) -> None:
        self.image, self.index, self.type = image, index, type_
        self.start, self.length = start, length      # bytes in the virtual disk
        self.source, self.file_index, self.line = source, file_index, line
        self.rows: list = []
        self.cluster_size: int | None = None

    @property
    def label(self) -> str:
        return f"extent[{self.index}]"

    def table(self, files: list) -> ExtentTable:
        """This extent's runs in local coordinates.  Flat, zero and missing extents
        are tabulated by the driver for all of them at once (a descriptor may list
        thousands), so only the sparse kinds implement this."""
        raise NotImplementedError

    def regions(self) -> list:
        return []

    def tables(self) -> dict:
        return {}


class ZeroExtent(Extent):
    kind = "zero"


class MissingExtent(Extent):
    """An extent whose file could not be opened: unreadable, reported as unallocated."""
    kind = "missing"


class FlatExtent(Extent):
    """FLAT / VMFS / VMFSRAW / VMFSRDM: the bytes at offset in a raw file or device."""

    kind = "flat"

    def __init__(self, *a, offset: int = 0, **kw) -> None:
        super().__init__(*a, **kw)
        self.offset = offset
        need = offset + self.length
        if self.source.size < need:
            self.image.note("error", "flat_extent_short",
                            f"{self.label} file {self.source.path.name} holds "
                            f"{self.source.size} bytes, {need} needed",
                            structure=self.label, host_offset=self.source.size,
                            file=str(self.source.path))

    def regions(self):
        return [(self.file_index, self.offset, self.length, "data", f"{self.label} flat data")]


class GrainExtent(Extent):
    """Common part of the sparse kinds: a directory of grain tables of grains."""

    flat = False
    per_table = 512
    entry_bytes = 4

    def grain_bytes(self) -> int:
        return self.grain_sectors * SECTOR

    def table(self, files) -> ExtentTable:
        """The walk is done once: extents() and regions() both need it."""
        if getattr(self, "_table", None) is None:
            self._table = self.build_table(files)
        return self._table

    def grain_regions(self, files) -> list:
        """Host ranges of this extent's grains (stream records include their 12-byte header)."""
        regs = extent_regions(self.table(files), f"{self.label} grains")
        if getattr(self, "markers", False):
            # stream records: 12-byte header + payload, lengths read in one gathered pass
            out = []
            for fi, off, ln, kind, owner in regs:
                if kind == "compressed_data":
                    head = self.source.gather(off, V.GRAIN_RECORD_HEADER_SIZE)
                    ln = head[:, 8:12].copy().view("<u4").reshape(-1).astype(np.uint64) \
                        + np.uint64(V.GRAIN_RECORD_HEADER_SIZE)
                out.append((fi, off, ln, kind, owner))
            regs = out
        return regs

    def parse_header(self, struct, data: bytes, base: int, name: str) -> dict:
        rows = field_layout(struct, data, structure=name, base_offset=base)
        for r in rows:
            r.structure = name
        self.rows += rows
        return {r.field: r.value for r in rows}

    def validated_directory(self, gt_offsets: np.ndarray, structure: str) -> np.ndarray:
        """GT byte offsets with the ones outside the file zeroed (and reported)."""
        table_bytes = self.per_table * self.entry_bytes
        bad = np.flatnonzero((gt_offsets != 0) & (gt_offsets + np.uint64(table_bytes)
                                                  > np.uint64(self.source.size)))
        if bad.size:
            note_bad_entries(self.image, bad, "grain_table_beyond_eof",
                             lambda k: f"{self.label} grain table {k} at {int(gt_offsets[k]):#x} "
                             "lies beyond the end of the file", structure, gt_offsets)
            gt_offsets = gt_offsets.copy()
            gt_offsets[bad] = 0
        return gt_offsets

    def walk(self, files, directory: np.ndarray, parse, classify) -> ExtentTable:
        return two_level_map(self.image, directory=directory, per_table=self.per_table,
                             unit_bytes=self.grain_bytes(), size=self.length,
                             table_bytes=self.per_table * self.entry_bytes,
                             parse_tables=parse, classify=classify, files=files,
                             codec="zlib", cluster_size=self.grain_bytes(),
                             structure=f"{self.label} grain table", source=self.source)

    def runs(self, files, first_units, e, hosted, step, breaks, classify_starts,
             record_flag: bool = False) -> ExtentTable:
        starts = run_starts(e, hosted, step, breaks, self.per_table)
        counts = np.diff(np.append(starts, e.size)).astype(np.uint64)
        kind, host, hlen = classify_starts(starts)
        gb = np.uint64(self.grain_bytes())
        guest = units_at(first_units, starts, self.per_table) * gb
        length = np.where(kind == KIND_COMPRESSED, gb, counts * gb).astype(np.uint64)
        file = np.where(host == NO_HOST, -1, self.file_index).astype(np.int16)
        flags = np.where((kind == KIND_COMPRESSED) & record_flag, FLAG_RECORD, 0).astype(np.uint8)
        t = coalesce(guest, length, kind, host, hlen, file, files, codec="zlib",
                     cluster_size=int(gb), flags=flags)
        note_beyond_eof(self.image, t, int(gb), f"{self.label} grain table")
        return t


class SparseExtent(GrainExtent):
    """Hosted sparse extent (KDMV): monolithicSparse, split -sNNN files, streamOptimized."""

    kind = "sparse"

    def __init__(self, *a, header_name: str = "", **kw) -> None:
        super().__init__(*a, **kw)
        src = self.source
        name = header_name or f"{self.label} header"
        self.header = h = self.parse_header(V.sparse_header, src.read(0, 512, "sparse header"),
                                            0, name)
        self.footer = None
        self.check_header(h)
        if h["gdOffset"] == V.GD_AT_END:
            self.read_footer()
            if self.footer is not None:
                self.check_header(self.footer)
        h = self.footer or self.header
        self.flags = h["flags"]
        self.compressed = bool(self.flags & V.FLAG_COMPRESSED)
        self.markers = bool(self.flags & V.FLAG_MARKERS)
        self.grain_sectors = h["grainSize"] if self.usable else V.DEFAULT_GRAIN_SIZE
        self.per_table = h["numGTEsPerGT"] if self.usable else V.DEFAULT_GTES_PER_GT
        self.capacity = h["capacity"] * SECTOR if self.usable else 0
        self.cluster_size = self.grain_bytes()
        n = V.num_gd_entries(h["capacity"], self.grain_sectors, self.per_table) if h["capacity"] else 0
        self.gd = self.read_dir(h["gdOffset"], n, "grain directory")
        self.rgd = (self.read_dir(h["rgdOffset"], n, "redundant grain directory")
                    if self.flags & V.FLAG_REDUNDANT_GRAIN_TABLE and h["rgdOffset"] else None)

    def check_header(self, h: dict) -> None:
        img, where = self.image, dict(structure=self.label, file=str(self.source.path))
        if h["version"] not in (1, 2, 3):
            img.note("error", "sparse_version", f"{self.label}: unsupported version {h['version']}",
                     host_offset=4, **where)
        unknown = h["flags"] & V.FLAGS_INCOMPAT_MASK & ~V.FLAGS_KNOWN
        if unknown:
            img.note("error", "sparse_flags_unknown",
                     f"{self.label}: unknown incompatible flags {unknown:#x}", host_offset=8, **where)
        raw = self.source.read(0x49, 4, "newline check")
        if h["flags"] & V.FLAG_VALID_NEWLINE and raw != V.NEWLINE_CHARS:
            img.note("error", "newline_chars_damaged",
                     f"{self.label}: newline check bytes {raw.hex(' ')} are not 0a 20 0d 0a "
                     "(the file went through a text-mode transfer)", host_offset=0x49, **where)
        if h["uncleanShutdown"]:
            img.note("warning", "unclean_shutdown", f"{self.label}: not closed cleanly",
                     host_offset=0x48, **where)
        gs = h["grainSize"]
        # a geometry QEMU refuses makes the tables unreadable: the extent reads as unallocated
        self.usable = True
        if gs < 1 or gs & (gs - 1) or gs > V.QEMU_MAX_GRAIN_SIZE:
            img.note("error", "grain_size_invalid", f"{self.label}: grain size {gs} sectors",
                     host_offset=0x14, **where)
            self.usable = False
        if not 0 < h["numGTEsPerGT"] <= V.QEMU_MAX_GTES_PER_GT:
            img.note("error", "gtes_per_gt_invalid",
                     f"{self.label}: numGTEsPerGT {h['numGTEsPerGT']}", host_offset=0x2C, **where)
            self.usable = False
        if h["capacity"] * SECTOR >= 1 << 63:
            img.note("error", "capacity_invalid", f"{self.label}: capacity {h['capacity']} sectors "
                     "does not fit a 63-bit byte size", host_offset=0x0C, **where)
            self.usable = False
        if self.line is not None and h["capacity"] * SECTOR != self.length:
            img.note("error", "extent_size_mismatch",
                     f"{self.label}: descriptor says {self.length // SECTOR} sectors, header "
                     f"capacity {h['capacity']}", host_offset=0x0C, **where)

    def read_footer(self) -> None:
        """streamOptimized with the directory at the end: footer marker, footer, EOS."""
        src = self.source
        if src.size < 1536 + 512:
            self.image.note("error", "stream_footer_missing",
                            f"{self.label}: directory at end but the file is too short for a footer",
                            structure=self.label, file=str(src.path))
            return
        tail = src.read(src.size - 1536, 1536, "stream footer")
        marker = V.marker.parse(tail[:512])
        eos = V.marker.parse(tail[1024:])
        if marker.type != V.MARKER_FOOTER or marker.size or tail[512:516] != V.SPARSE_MAGIC \
                or eos.type != V.MARKER_EOS or eos.val or eos.size:
            self.image.note("error", "stream_footer_invalid",
                            f"{self.label}: no valid footer marker / footer / end-of-stream "
                            "at the end of the file", structure=self.label,
                            host_offset=src.size - 1536, file=str(src.path))
            return
        self.footer = self.parse_header(V.sparse_header, tail[512:1024], src.size - 1024,
                                        f"{self.label} footer")

    def read_dir(self, sector: int, n: int, name: str) -> np.ndarray:
        """A grain directory, or an empty one (all unallocated) when it cannot be read."""
        if n == 0 or not self.usable:
            return np.zeros(0, np.uint64)
        off = sector * SECTOR
        if sector == V.GD_AT_END or off >= 1 << 63 or not validate_table(
                self.image, off, n * 4, f"{self.label} {name}", source=self.source):
            return np.zeros(0, np.uint64)
        return V.gd_table(n).parse(self.source.read(off, n * 4, name)).astype(np.uint64)

    def parse_gts(self, data: bytes, n: int) -> np.ndarray:
        return V.gt_table(n * self.per_table).parse(data).astype(np.uint64).reshape(n, self.per_table)

    def build_table(self, files) -> ExtentTable:
        directory = self.validated_directory(self.gd * np.uint64(SECTOR), f"{self.label} grain directory")
        return self.walk(files, directory, self.parse_gts, lambda e, first, _tables: self.classify(files, e, first))

    def classify(self, files, e: np.ndarray, first_units: np.ndarray) -> ExtentTable:
        zero_flag = bool(self.flags & V.FLAG_ZERO_GRAIN)
        zero = (e == 1) & zero_flag
        compressed = (e > 1) & self.compressed if self.compressed else np.zeros(e.size, bool)
        hosted = (e != 0) & ~zero & ~compressed

        def at_starts(starts):
            s = e[starts]
            kind = np.select([s == 0, zero[starts], compressed[starts]],
                             [KIND_UNALLOCATED, KIND_ZERO, KIND_COMPRESSED], KIND_DATA).astype(np.uint8)
            host = np.where(kind == KIND_DATA, s * np.uint64(SECTOR), NO_HOST).astype(np.uint64)
            hlen = np.zeros(s.size, np.uint64)
            comp = np.flatnonzero(kind == KIND_COMPRESSED)
            if comp.size:
                rec = s[comp] * np.uint64(SECTOR)
                # stream records carry their length: read when the grain is read
                # (checking every record's lba is the checker's work, not the map's)
                host[comp] = rec
                hlen[comp] = 0 if self.markers else np.uint64(2 * self.grain_bytes())
            return kind, host, hlen
        return self.runs(files, first_units, e, hosted, self.grain_sectors, compressed, at_starts,
                         record_flag=self.markers)

    def regions(self) -> list:
        h, fi, lbl = self.footer or self.header, self.file_index, self.label
        regs = [(fi, 0, 512, "header", f"{lbl} header")]
        if self.header["descriptorOffset"]:
            regs.append((fi, self.header["descriptorOffset"] * SECTOR,
                         self.header["descriptorSize"] * SECTOR, "descriptor", f"{lbl} descriptor"))
        gt_bytes = self.per_table * 4
        for name, d, sector in (("grain_directory", self.gd, h["gdOffset"]),
                                ("grain_directory", self.rgd, h["rgdOffset"])):
            if d is None or not d.size or sector == V.GD_AT_END:
                continue
            owner = f"{lbl} {'redundant ' if d is self.rgd else ''}grain directory"
            regs.append((fi, sector * SECTOR, d.size * 4, name, owner))
            gts = np.unique(d[d != 0]) * np.uint64(SECTOR)
            if gts.size:
                regs.append((fi, gts, np.full(gts.size, gt_bytes, np.uint64), "grain_table",
                             owner.replace("directory", "tables")))
        if self.footer is not None:
            end = self.source.size
            regs += [(fi, end - 1536, 512, "marker", f"{lbl} footer marker"),
                     (fi, end - 1024, 512, "footer", f"{lbl} footer"),
                     (fi, end - 512, 512, "marker", f"{lbl} end-of-stream marker")]
            if self.markers and h["gdOffset"] != V.GD_AT_END and self.gd.size:
                regs.append((fi, h["gdOffset"] * SECTOR - SECTOR, SECTOR, "marker", f"{lbl} GD marker"))
                gts = np.unique(self.gd[self.gd != 0]) * np.uint64(SECTOR) - np.uint64(SECTOR)
                regs.append((fi, gts, np.full(gts.size, SECTOR, np.uint64), "marker", f"{lbl} GT markers"))
        return regs


class CowdExtent(GrainExtent):
    """ESX COWD extent (vmfsSparse / redo logs): 4096-entry grain tables."""

    kind = "cowd"
    per_table = V.COWD_GT_ENTRIES

    def __init__(self, *a, header_name: str = "", **kw) -> None:
        super().__init__(*a, **kw)
        self.header = h = self.parse_header(V.cowd_header, self.source.read(0, 2048, "COWD header"),
                                            0, header_name or f"{self.label} COWD header")
        self.usable = 0 < h["grainSize"] <= V.QEMU_MAX_GRAIN_SIZE
        if not self.usable:
            self.image.note("error", "grain_size_invalid", f"{self.label}: grain size "
                            f"{h['grainSize']} sectors", structure=self.label, host_offset=16,
                            file=str(self.source.path))
        self.grain_sectors = h["grainSize"] if self.usable else 1
        self.cluster_size = self.grain_bytes()
        self.capacity = h["numSectors"] * SECTOR
        if h["uncleanShutdown"]:
            self.image.note("warning", "unclean_shutdown", f"{self.label}: not closed cleanly",
                            structure=self.label, host_offset=1648, file=str(self.source.path))
        n = h["numGDEntries"]
        if self.usable and validate_table(self.image, h["gdOffset"] * SECTOR, n * 4, f"{self.label} grain directory",
                          source=self.source):
            self.gd = V.gd_table(n).parse(self.source.read(h["gdOffset"] * SECTOR, n * 4,
                                                           "grain directory")).astype(np.uint64)
        else:
            self.gd = np.zeros(0, np.uint64)

    def parse_gts(self, data, n):
        return V.gt_table(n * self.per_table).parse(data).astype(np.uint64).reshape(n, self.per_table)

    def build_table(self, files):
        directory = self.validated_directory(self.gd * np.uint64(SECTOR), f"{self.label} grain directory")

        def classify(e, first, _tables):
            def at_starts(starts):
                s = e[starts]
                kind = np.where(s == 0, KIND_UNALLOCATED, KIND_DATA).astype(np.uint8)
                host = np.where(s == 0, NO_HOST, s * np.uint64(SECTOR)).astype(np.uint64)
                return kind, host, np.zeros(s.size, np.uint64)
            return self.runs(files, first, e, e != 0, self.grain_sectors,
                             np.zeros(e.size, bool), at_starts)
        return self.walk(files, directory, self.parse_gts, classify)

    def regions(self):
        fi, lbl, h = self.file_index, self.label, self.header
        regs = [(fi, 0, 2048, "header", f"{lbl} COWD header"),
                (fi, h["gdOffset"] * SECTOR, self.gd.size * 4, "grain_directory", f"{lbl} grain directory")]
        gts = np.unique(self.gd[self.gd != 0]) * np.uint64(SECTOR)
        if gts.size:
            regs.append((fi, gts, np.full(gts.size, self.per_table * 4, np.uint64), "grain_table",
                         f"{lbl} grain tables"))
        return regs


class SeSparseExtent(GrainExtent):
    """ESXi seSparse extent (read side): u64 directory and tables, 4 KiB grains."""

    kind = "sesparse"
    per_table = V.SESPARSE_GT_ENTRIES
    entry_bytes = 8

    def __init__(self, *a, header_name: str = "", **kw) -> None:
        super().__init__(*a, **kw)
        name = header_name or f"{self.label} seSparse header"
        self.header = h = self.parse_header(V.sesparse_header, self.source.read(0, 512, "seSparse header"),
                                            0, name)
        self.usable = (h["grain_size"] == V.SESPARSE_GRAIN_SIZE
                       and h["grain_table_size"] == V.SESPARSE_GRAIN_TABLE_SIZE
                       and h["capacity"] * SECTOR < 1 << 63)
        if not self.usable:
            self.image.note("error", "sesparse_geometry_invalid",
                            f"{self.label}: grain size {h['grain_size']}, grain table size "
                            f"{h['grain_table_size']}, capacity {h['capacity']} (QEMU requires 8, "
                            "64 and a 63-bit size)", structure=self.label, host_offset=16,
                            file=str(self.source.path))
        self.grain_sectors = V.SESPARSE_GRAIN_SIZE
        self.cluster_size = self.grain_bytes()
        self.capacity = h["capacity"] * SECTOR if self.usable else 0
        vh_off = h["volatile_header_offset"] * SECTOR
        if validate_table(self.image, vh_off, 512, f"{self.label} volatile header", source=self.source):
            vh = self.parse_header(V.sesparse_volatile_header, self.source.read(vh_off, 512, "volatile header"),
                                   vh_off, f"{self.label} volatile header")
            if vh["replay_journal"]:
                self.image.note("warning", "sesparse_journal_pending",
                                f"{self.label}: the journal must be replayed (unclean shutdown)",
                                structure=self.label, host_offset=vh_off, file=str(self.source.path))
        n = h["grain_dir_size"] * SECTOR // 8
        off = h["grain_dir_offset"] * SECTOR
        self.gd = (V.sesparse_table(n).parse(self.source.read(off, n * 8, "grain directory")).astype(np.uint64)
                   if self.usable and validate_table(self.image, off, n * 8, f"{self.label} grain directory",
                                     source=self.source)
                   else np.zeros(0, np.uint64))

    def parse_gts(self, data, n):
        return V.sesparse_table(n * self.per_table).parse(data).astype(np.uint64).reshape(n, self.per_table)

    def build_table(self, files):
        h = self.header
        allocated, index = V.decode_sesparse_gd(self.gd)
        gt_sector = np.uint64(h["grain_tables_offset"]) + index * np.uint64(h["grain_table_size"])
        directory = np.where(allocated, gt_sector * np.uint64(SECTOR), 0).astype(np.uint64)
        directory = self.validated_directory(directory, f"{self.label} grain directory")
        grains = np.uint64(h["grains_offset"])

        def classify(e, first, _tables):
            kinds, cluster = V.decode_sesparse_gt(e)
            hosted = kinds == 3

            def at_starts(starts):
                k = kinds[starts]
                kind = np.select([k == 0, (k == 1) | (k == 2)], [KIND_UNALLOCATED, KIND_ZERO],
                                 KIND_DATA).astype(np.uint8)
                host = np.where(kind == KIND_DATA,
                                (grains + cluster[starts] * np.uint64(self.grain_sectors)) * np.uint64(SECTOR),
                                NO_HOST).astype(np.uint64)
                return kind, host, np.zeros(starts.size, np.uint64)
            # contiguous clusters: compare decoded cluster numbers, not raw entries
            breaks = np.concatenate([[False], hosted[1:] != hosted[:-1]])
            return self.runs(files, first, np.where(hosted, cluster, kinds.astype(np.uint64)),
                             hosted, 1, breaks, at_starts)
        return self.walk(files, directory, self.parse_gts, classify)

    def regions(self):
        fi, lbl, h = self.file_index, self.label, self.header
        regs = [(fi, 0, 512, "header", f"{lbl} seSparse header")]
        for key, kind in (("volatile_header", "header"), ("journal_header", "log"), ("journal", "log"),
                          ("grain_dir", "grain_directory"), ("grain_tables", "grain_table"),
                          ("free_bitmap", "metadata"), ("backmap", "metadata")):
            if h[f"{key}_size"]:
                regs.append((fi, h[f"{key}_offset"] * SECTOR, h[f"{key}_size"] * SECTOR, kind,
                             f"{lbl} {key.replace('_', ' ')}"))
        return regs
