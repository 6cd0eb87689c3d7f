"""QCOW version 1 driver (QEMU ``qcow``): header, backing name, L1 and L2 tables.

What QEMU 7.2 does (block/qcow.c), and so what info, map and the guest follow:
* the disk is ``size // 512`` whole sectors; the L1 table is not sized in the
  header but holds ``ceil(size / (cluster_size << l2_bits))`` entries;
* L1 entries are plain L2 table offsets (0 = none), L2 entries plain data
  cluster offsets (0 = unallocated: backing file or zeros); bit 63 marks a
  compressed cluster whose next ``cluster_bits`` bits hold the exact stored byte
  count, a raw deflate stream decoding to one cluster;
* reads past the end of the file give zeros (L1, L2 tables, data), so a table
  cut by the end of the file still maps its first entries (a finding says so);
* an encrypted image (crypt_method 1, AES per sector) maps its clusters as data
  without a host offset; imgscope shows them as ``encrypted`` and does not read them;
* the backing file has no stored format: it is probed, relative to this image.
"""
from __future__ import annotations

import construct as cs
import numpy as np

from ..errors import ParseError, Truncated, Unsupported
from ..io.source import Source
from ..model import (Image, ExtentTable, KIND_DATA, KIND_COMPRESSED, KIND_ENCRYPTED,
                     KIND_UNALLOCATED, NO_HOST, FLAG_HIDDEN_OFFSET)
from ..schemas import qcow as S
from ..schemas._types import FieldRow, field_layout
from . import open_backing
from .base import coalesce, extent_regions, note_bad_entries, note_beyond_eof, validate_table
from .twolevel import read_tables, run_starts, two_level_map, units_at

U64 = np.uint64
SECTOR = 512
#: largest virtual size imgscope maps (offsets stay below 2^63)
MAX_SIZE = (1 << 63) - SECTOR


class _ZeroFilled:
    """Reads of one Source where bytes past the end of the file are zeros (as QEMU reads)."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def read(self, offset: int, length: int, structure: str = "data") -> bytes:
        data = self.source.read_upto(offset, length)
        return data + bytes(length - len(data)) if len(data) < length else data


class QcowImage(Image):
    format = "qcow"
    variant = "v1"

    def __init__(self, source: Source, **kw) -> None:
        super().__init__(source, **kw)
        self.h: dict = {}
        self.usable = True           # False: cluster / L2 geometry QEMU refuses, nothing mapped
        self.encrypted = False
        self.l1 = np.zeros(0, U64)
        self.l1_count = 0            # entries the disk size needs
        self.l2_offsets = np.zeros(0, U64)   # validated directory (0 = no table)
        self._own_cache: ExtentTable | None = None
        self._parse_header()
        self._read_backing_name()
        if self.usable:
            self._read_l1()
        if self.backing_name is not None:
            self.backing = open_backing(self, self.backing_name, None)   # format probed
        self._tables.update(l1=self._l1_frame, l2=self._l2_frame)
        self._own_extents()      # entry-level findings are known once the image is open

    # ---- header ------------------------------------------------------------------------
    def _parse_header(self) -> None:
        src = self.source
        if src.size < S.HEADER_SIZE:
            raise Truncated(f"file of {src.size} bytes is shorter than the {S.HEADER_SIZE}-byte "
                            "qcow header", path=str(self.path), offset=0, structure="header")
        data = src.read(0, S.HEADER_SIZE, "header")
        try:
            rows = field_layout(S.header, data, structure="header")
        except cs.ConstructError:
            raise ParseError("not a qcow image: bytes 0-3 are not 'QFI\\xfb'", path=str(self.path),
                             offset=0, structure="header.magic") from None
        self._field_rows = rows
        h = self.h = {r.field: r.value for r in rows}
        if h["version"] != S.VERSION:
            hint = " (a qcow2 image: open it with format 'qcow2')" if h["version"] in (2, 3) else ""
            raise Unsupported(f"qcow version {h['version']} is not 1{hint}", path=str(self.path),
                              offset=4, structure="header.version")
        cb, l2b = h["cluster_bits"], h["l2_bits"]
        if not S.MIN_CLUSTER_BITS <= cb <= S.MAX_CLUSTER_BITS:
            self.note("error", "cluster_bits_invalid", f"cluster_bits {cb} is outside 9..16 "
                      "(QEMU: 'Cluster size must be between 512 and 64k'); nothing can be mapped",
                      structure="header.cluster_bits", host_offset=32)
            self.usable = False
        if not S.MIN_L2_BITS <= l2b <= S.MAX_L2_BITS:
            self.note("error", "l2_bits_invalid", f"l2_bits {l2b} is outside 6..13 (QEMU: 'L2 "
                      "table size must be between 512 and 64k'); nothing can be mapped",
                      structure="header.l2_bits", host_offset=33)
            self.usable = False
        if h["padding"]:
            self.note("warning", "header_padding_nonzero", f"header padding is {h['padding']:#x}, "
                      "not 0", structure="header.padding", host_offset=34, raise_in_strict=False)
        method = h["crypt_method"]
        if method == S.CRYPT_AES:
            self.encrypted = True
        elif method != S.CRYPT_NONE:
            self.encrypted = True
            self.note("error", "crypt_method_invalid", f"crypt_method {method} is neither 0 (none) "
                      "nor 1 (AES); QEMU refuses the image; clusters are shown as encrypted",
                      structure="header.crypt_method", host_offset=36)
        size = h["size"]
        if size <= 1:
            self.note("error", "size_too_small", f"size {size} is below 2 bytes (QEMU: 'Image size "
                      "is too small')", structure="header.size", host_offset=24)
        elif size % SECTOR:
            self.note("info", "size_unaligned", f"size {size} is no multiple of 512; QEMU uses "
                      f"{size // SECTOR} whole sectors", structure="header.size", host_offset=24,
                      raise_in_strict=False)
        vsize = size // SECTOR * SECTOR
        if self.usable:
            self.cluster_size = 1 << cb
            self.slack_unit = self.cluster_size
            shift = cb + l2b
            self.l1_count = S.l1_entries(size, cb, l2b)
            if size > (1 << 64) - 1 - (1 << shift) or self.l1_count > S.MAX_L1_ENTRIES:
                self.note("error", "size_too_large", f"size {size} needs {self.l1_count} L1 entries, "
                          f"more than QEMU's {S.MAX_L1_ENTRIES} ('Image too large')",
                          structure="header.size", host_offset=24)
        if vsize > MAX_SIZE:
            vsize = MAX_SIZE
        self.virtual_size = vsize

    def _read_backing_name(self) -> None:
        off, n = self.h["backing_file_offset"], self.h["backing_file_size"]
        if not off:
            return
        follow = True
        if n > S.MAX_BACKING_NAME:
            self.note("error", "backing_name_too_long", f"backing_file_size {n} exceeds 1023 "
                      "(QEMU: 'Backing file name too long'); the name is not followed",
                      structure="header.backing_file_size", host_offset=16)
            follow = False
            n = S.MAX_BACKING_NAME
        raw = self.source.read_upto(off, n)
        if len(raw) < n:
            self.note("error", "backing_name_beyond_eof", f"backing file name at {off:#x} "
                      f"(+{n}) extends past the end of the file; it is not followed",
                      structure="header.backing_file_offset", host_offset=off, size=n)
            follow = False
        if off < S.HEADER_SIZE and n:
            self.note("warning", "backing_name_in_header", f"backing file name at {off:#x} "
                      "overlaps the header", structure="header.backing_file_offset", host_offset=8)
        # QEMU copies the bytes and then stops at the first NUL (pstrcpy)
        name = raw.split(b"\0")[0].decode("utf-8", "surrogateescape")
        self._field_rows.append(FieldRow("backing file name", "backing_file", off, len(raw), raw,
                                         name, name, "backing file name, not NUL terminated; "
                                         "relative names are relative to the image's folder"))
        if follow and name:
            self.backing_name = name

    # ---- L1 table ----------------------------------------------------------------------
    @property
    def table_bytes(self) -> int:
        """Bytes of one L2 table (independent of the cluster size)."""
        return 8 << self.h["l2_bits"]

    def _read_l1(self) -> None:
        off, n = self.h["l1_table_offset"], self.l1_count
        count = n
        if not validate_table(self, off, 8 * n, "L1 table"):
            # what lies inside the file and the limits; QEMU reads zeros past the end
            count = max(0, min(n, -(-(self.source.size - off) // 8),
                               self.limits.max_table_bytes // 8))
        data = _ZeroFilled(self.source).read(off, 8 * count, "L1 table") if count else b""
        self.l1 = S.u64_table(count).parse(data).astype(U64)
        self.l2_offsets = self._check_l1(self.l1)

    def _l1_entry_offsets(self) -> np.ndarray:
        return U64(self.h["l1_table_offset"]) + U64(8) * np.arange(self.l1.size, dtype=U64)

    def _check_l1(self, l1: np.ndarray) -> np.ndarray:
        """L2 table offsets QEMU would read: tables wholly past the end of the file are
        dropped (they read as zeros), cut or misaligned ones are findings."""
        size, tb = U64(self.source.size), U64(self.table_bytes)
        where = self._l1_entry_offsets()
        alloc = l1 != 0
        past = alloc & (l1 >= size)
        cut = alloc & ~past & (l1 + tb > size)
        misaligned = alloc & (l1 % U64(self.cluster_size) != 0)
        for code, mask, sev, what in (
                ("l2_table_beyond_eof", past, "error", "lies beyond the end of the file; its "
                 "clusters read as unallocated"),
                ("l2_table_truncated", cut, "error", "is cut by the end of the file; its missing "
                 "entries read as unallocated"),
                ("l2_table_misaligned", misaligned, "warning", "is not cluster aligned")):
            idx = np.flatnonzero(mask)
            if idx.size:
                note_bad_entries(self, idx, code, lambda k, what=what: f"L2 table "
                                 f"{int(l1[k]):#x} of L1 entry {k} {what}", "L1 table", where,
                                 severity=sev)
        out = l1.copy()
        out[past] = 0
        return out

    # ---- guest map -----------------------------------------------------------------------
    def _parse_l2(self, data: bytes, n: int) -> np.ndarray:
        per = 1 << self.h["l2_bits"]
        return S.u64_table(n * per).parse(data).astype(U64).reshape(n, per)

    def _own_extents(self) -> ExtentTable:
        if self._own_cache is None:
            self._own_cache = self._map()
        return self._own_cache

    def _map(self) -> ExtentTable:
        files = self.files()
        size = self.virtual_size
        if not size:
            return ExtentTable.empty(files)
        if not self.usable:
            return ExtentTable.run(0, size, KIND_UNALLOCATED, files)
        cs_ = self.cluster_size
        t = two_level_map(self, directory=self.l2_offsets, per_table=1 << self.h["l2_bits"],
                          unit_bytes=cs_, size=size, table_bytes=self.table_bytes,
                          parse_tables=self._parse_l2, classify=self._classify, files=files,
                          codec="deflate", cluster_size=cs_, structure="L2 table",
                          source=_ZeroFilled(self.source))
        self._check_overlaps(t)
        return t

    def _classify(self, e: np.ndarray, first_units: np.ndarray, tables: np.ndarray) -> ExtentTable:
        """Runs of one chunk of L2 entries (classified at run starts only)."""
        cb = self.h["cluster_bits"]
        cs_ = self.cluster_size
        per = 1 << self.h["l2_bits"]
        compressed = (e >> U64(63)) == U64(1)
        hosted = (e != 0) & ~compressed
        self._check_entries(e, compressed, hosted, first_units, tables)
        starts = run_starts(e, hosted, cs_, compressed, per)
        counts = np.diff(np.append(starts, e.size)).astype(U64)
        s = e[starts]
        comp = compressed[starts]
        data_kind = KIND_ENCRYPTED if self.encrypted else KIND_DATA
        kind = np.select([comp, s == 0], [KIND_COMPRESSED, KIND_UNALLOCATED],
                         default=data_kind).astype(np.uint8)
        host = np.where(s == 0, NO_HOST, s).astype(U64)
        hlen = np.zeros(s.size, U64)
        if comp.any():
            host[comp] = s[comp] & U64(S.cluster_offset_mask(cb))
            hlen[comp] = (s[comp] >> U64(S.compressed_size_shift(cb))) & U64(cs_ - 1)
        guest = units_at(first_units, starts, per) << U64(cb)
        file = np.where(host == NO_HOST, -1, 0).astype(np.int16)
        flags = np.full(s.size, FLAG_HIDDEN_OFFSET if self.encrypted else 0, np.uint8)
        t = coalesce(guest, counts * U64(cs_), kind, host, hlen, file, self.files(),
                     codec="deflate", cluster_size=cs_, flags=flags)
        self._note_past_eof(t)
        return t

    def _check_entries(self, e, compressed, hosted, first_units, tables) -> None:
        """Entry-level findings, vectorised over the chunk; each names the entry's offset."""
        cb = self.h["cluster_bits"]
        per = 1 << self.h["l2_bits"]
        csize = (e >> U64(S.compressed_size_shift(cb))) & U64(self.cluster_size - 1)
        for code, bad, sev, what in (
                ("data_cluster_misaligned", hosted & (e % U64(SECTOR) != 0), "error",
                 "is not sector aligned (QEMU fails to read it)"),
                ("data_cluster_unaligned", hosted & (e % U64(SECTOR) == 0)
                 & (e % U64(self.cluster_size) != 0), "warning", "is not cluster aligned"),
                ("compressed_size_invalid", compressed & (csize == 0), "error",
                 "is compressed with a stored size of 0 bytes (QEMU fails to read it)")):
            pos = np.flatnonzero(bad)
            if not pos.size:
                continue
            guest = units_at(first_units, pos, per) << U64(cb)
            where = tables[pos // per] + (pos % per).astype(U64) * U64(8)
            note_bad_entries(self, np.arange(pos.size), code,
                             lambda k, what=what: f"L2 entry {int(e[pos[k]]):#x} for guest "
                             f"{int(guest[k]):#x} {what}", "L2 table", where, severity=sev)

    def _note_past_eof(self, t: ExtentTable) -> None:
        """Data clusters past the end (QEMU reads zeros there) and compressed streams
        whose stored bytes the file does not hold completely."""
        comp = t.kind == KIND_COMPRESSED
        note_beyond_eof(self, t.take(~comp), self.cluster_size, "L2 table")
        if not comp.any():
            return
        c = t.take(comp)
        size = U64(self.source.size)
        for code, bad, what in (
                ("cluster_beyond_eof", c.host >= size, "starts beyond the end of the file"),
                ("compressed_data_truncated", (c.host < size) & (c.host + c.host_length > size),
                 "is cut by the end of the file")):
            idx = np.flatnonzero(bad)
            if idx.size:
                note_bad_entries(self, idx, code, lambda k, what=what: f"compressed cluster for "
                                 f"guest {int(c.guest[k]):#x} at {int(c.host[k]):#x} "
                                 f"(+{int(c.host_length[k])}) {what}", "L2 table", c.host)

    def _metadata_ranges(self) -> list:
        """(offset, length, name) of header, backing name, L1 and L2 tables."""
        h = self.h
        out = [(np.array([0], U64), np.array([S.HEADER_SIZE], U64), "header")]
        if h["backing_file_offset"] and h["backing_file_size"]:
            out.append((np.array([h["backing_file_offset"]], U64),
                        np.array([min(h["backing_file_size"], S.MAX_BACKING_NAME)], U64),
                        "backing file name"))
        if self.usable and self.l1_count:
            out.append((np.array([h["l1_table_offset"]], U64),
                        np.array([min(8 * self.l1_count, 1 << 62)], U64), "L1 table"))
            l2 = np.unique(self.l2_offsets[self.l2_offsets != 0])
            if l2.size:
                out.append((l2, np.full(l2.size, self.table_bytes, U64), "L2 table"))
        return out

    def _check_overlaps(self, t: ExtentTable) -> None:
        """Host bytes claimed twice: no two structures or clusters may share bytes
        (qcow v1 has no refcounts, so a shared cluster is always corruption)."""
        parts = self._metadata_ranges()
        hosted = (t.host != NO_HOST) & (t.kind != KIND_UNALLOCATED)
        comp = hosted & (t.kind == KIND_COMPRESSED)
        data = hosted & ~comp
        parts.append((t.host[data], t.length[data], "data cluster"))
        parts.append((t.host[comp], t.host_length[comp], "compressed cluster"))
        names = [p[2] for p in parts]
        start = np.concatenate([p[0] for p in parts]).astype(U64)
        length = np.concatenate([p[1] for p in parts]).astype(U64)
        label = np.concatenate([np.full(p[0].size, i, np.int16) for i, p in enumerate(parts)])
        keep = length > 0
        start, label = start[keep], label[keep]
        end = start + np.minimum(length[keep], U64((1 << 64) - 1) - start)
        if start.size < 2:
            return
        order = np.argsort(start, kind="stable")
        start, end, label = start[order], end[order], label[order]
        reach = np.maximum.accumulate(end)
        holder = np.maximum.accumulate(np.where(end == reach, np.arange(end.size), 0))
        bad = np.flatnonzero(start[1:] < reach[:-1]) + 1
        if bad.size:
            other = holder[bad - 1]
            note_bad_entries(self, np.arange(bad.size), "host_overlap",
                             lambda k: f"{names[label[bad[k]]]} at {int(start[bad[k]]):#x} "
                             f"(+{int(end[bad[k]] - start[bad[k]])}) overlaps the "
                             f"{names[label[other[k]]]} at {int(start[other[k]]):#x}",
                             "L2 table", start[bad])

    # ---- host layout ---------------------------------------------------------------------
    def _host_regions(self) -> list:
        h = self.h
        regs = [(0, 0, S.HEADER_SIZE, "header", "header")]
        if h["backing_file_offset"] and h["backing_file_size"]:
            regs.append((0, h["backing_file_offset"], min(h["backing_file_size"],
                                                          S.MAX_BACKING_NAME),
                         "header", "backing file name"))
        if not self.usable:
            return regs
        if self.l1_count:
            # QEMU writes the L1 table in whole 512-byte sectors
            l1_bytes = -(-8 * self.l1_count // SECTOR) * SECTOR
            regs.append((0, h["l1_table_offset"], min(l1_bytes, 1 << 62), "l1_table", "L1 table"))
        l2 = np.unique(self.l2_offsets[self.l2_offsets != 0])
        if l2.size:
            regs.append((0, l2, np.full(l2.size, self.table_bytes, U64), "l2_table", "L2 tables"))
        regs += extent_regions(self._own_extents(), "guest data")
        return regs

    # ---- tables ---------------------------------------------------------------------------
    def _l1_frame(self):
        import pandas as pd
        n = self.l1.size
        span = U64(self.cluster_size or 0) << U64(self.h["l2_bits"])
        return pd.DataFrame({
            "index": np.arange(n, dtype=np.int64),
            "entry_offset": self._l1_entry_offsets(),
            "raw": self.l1,
            "l2_offset": self.l1,
            "guest_offset": np.arange(n, dtype=U64) * span,
            "allocated": self.l1 != 0,
        })

    def _l2_frame(self):
        """Every entry of every L2 table the L1 table points to (guest offsets < disk size)."""
        import pandas as pd
        from ..frames import nullable_offsets
        from ..model import KINDS
        cols = ["l1_index", "l2_index", "entry_offset", "guest_offset", "raw", "type",
                "host_offset", "compressed", "compressed_size"]
        if not self.usable:
            return pd.DataFrame(columns=cols)
        cb, per = self.h["cluster_bits"], 1 << self.h["l2_bits"]
        off = self.l2_offsets
        alloc = np.flatnonzero(off)
        uniq, tables = read_tables(self, off[alloc], self.table_bytes, self._parse_l2, "L2 table",
                                   _ZeroFilled(self.source))
        e = tables[np.searchsorted(uniq, off[alloc])].reshape(-1) if alloc.size else np.zeros(0, U64)
        l1_index = np.repeat(alloc, per)
        l2_index = np.tile(np.arange(per), alloc.size)
        guest = (l1_index.astype(U64) * U64(per) + l2_index.astype(U64)) << U64(cb)
        compressed = (e >> U64(63)) == U64(1)
        kind = np.select([compressed, e == 0], [KIND_COMPRESSED, KIND_UNALLOCATED],
                         default=KIND_ENCRYPTED if self.encrypted else KIND_DATA)
        host = np.where(e == 0, NO_HOST, np.where(compressed, e & U64(S.cluster_offset_mask(cb)), e))
        csize = np.where(compressed, (e >> U64(S.compressed_size_shift(cb)))
                         & U64(self.cluster_size - 1), U64(0))
        df = pd.DataFrame({
            "l1_index": l1_index, "l2_index": l2_index,
            "entry_offset": np.repeat(off[alloc], per) + l2_index.astype(U64) * U64(8),
            "guest_offset": guest, "raw": e,
            "type": pd.Categorical.from_codes(kind.astype(np.int64), categories=list(KINDS)),
            "host_offset": nullable_offsets(host.astype(U64)),
            "compressed": compressed, "compressed_size": csize.astype(U64),
        }, columns=cols)
        return df[df.guest_offset < U64(self.virtual_size)].reset_index(drop=True)
