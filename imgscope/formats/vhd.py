"""VHD driver (QEMU's ``vpc``): fixed, dynamic and differencing disks.

Layout: a fixed disk is the guest bytes followed by a 512-byte footer; a dynamic
or differencing disk has a copy of the footer at 0, a dynamic header, a Block
Allocation Table, blocks (sector bitmap + data) and the footer at the end.

What QEMU 7.2 does, and imgscope copies so that info/map/convert agree:
* the footer at offset 0 is used when it has the cookie, else the one at EOF;
* virtual size = C*H*S*512 unless the creator is one of 'win ', 'qem2', 'd2v ',
  'CTXS', 'tap\\0' or the geometry is the maximum one (then currentSize);
* dynamic disks: the sector bitmaps are ignored on read (QEMU sets them to all
  ones on allocation); an allocated block is data, an unallocated one zeros;
* a fixed disk is mapped like a raw file (its holes read as zeros).
Differencing disks (QEMU 7.2 reads them as dynamic disks without a parent) are
resolved here as the spec says: the parent is found through the locators, and
a block's sector bitmap decides, per sector, child (1) or parent (0).
"""
from __future__ import annotations

import numpy as np

from ..errors import ChainError, ImageError, ParseError
from ..model import (Image, ExtentTable, KIND_DATA, KIND_ZERO, KIND_UNALLOCATED, NO_HOST)
from ..schemas import vhd as V
from ..schemas._types import FieldRow, field_layout
from . import open_backing
from .base import coalesce, note_bad_entries, validate_table

SECTOR = V.SECTOR
U64 = np.uint64


class VhdImage(Image):
    format = "vpc"
    slack_unit = SECTOR

    def __init__(self, source, **kw) -> None:
        super().__init__(source, **kw)
        self.footer_copy: dict | None = None      # footer at offset 0
        self.footer_end: dict | None = None       # footer at EOF
        self.footer_offset: int | None = None     # where the EOF footer starts
        self.footer_bytes = 0
        self.header: dict | None = None
        self.header_offset: int | None = None
        self.bat: np.ndarray | None = None        # uint64 copy of the BAT entries
        self.bat_offset = 0
        self.block_size = 0
        self.bitmap_size = 0
        self.locators: list[dict] = []
        self._read_footers()
        f = self.footer
        self.disk_type = f["diskType"]
        self.variant = V.DISK_TYPES.get(self.disk_type, f"type {self.disk_type}")
        self._size_rule()
        if self.dynamic:
            self._read_dynamic_header()
        elif self.footer_offset is not None and self.virtual_size > self.footer_offset:
            self.note("warning", "fixed_data_short",
                      f"fixed disk of {self.virtual_size} bytes but only {self.footer_offset} "
                      "bytes before the footer (QEMU reads the footer and beyond as guest data)",
                      structure="footer.currentSize", host_offset=self.footer_offset)
        if self.disk_type == V.DISK_DIFFERENCING and self.header is not None:
            self._open_parent()
        self._register_tables()

    # ---- footer ----------------------------------------------------------------------
    @property
    def dynamic(self) -> bool:
        return self.disk_type in (V.DISK_DYNAMIC, V.DISK_DIFFERENCING) or (
            self.disk_type != V.DISK_FIXED and self.footer["dataOffset"] != V.NO_DATA_OFFSET)

    def _parse_footer(self, data: bytes, base: int, name: str) -> dict:
        rows = field_layout(V.footer, data, structure=name, base_offset=base)
        self._field_rows += rows
        values = {r.field: r.value for r in rows}
        want = V.checksum(data, 64)
        if values["checksum"] != want:
            self.note("error", "footer_checksum", f"{name} checksum {values['checksum']:#010x} "
                      f"is wrong (computed {want:#010x}); QEMU refuses the image",
                      structure=f"{name}.checksum", host_offset=base + 64, size=4)
        if not values["features"] & 2:
            self.note("warning", "footer_features", f"{name} features {values['features']:#x}: "
                      "reserved bit 1 is not set", structure=f"{name}.features", host_offset=base + 8)
        if values["fileFormatVersion"] != V.VERSION_1_0:
            self.note("warning", "footer_version", f"{name} fileFormatVersion "
                      f"{values['fileFormatVersion']:#010x} is not 0x00010000",
                      structure=f"{name}.fileFormatVersion", host_offset=base + 12)
        return values

    def _read_footers(self) -> None:
        src = self.source
        size = src.size
        head = src.read_upto(0, V.FOOTER_SIZE)
        tail_off = size - V.FOOTER_SIZE
        raw_end = src.read_upto(tail_off, V.FOOTER_SIZE) if tail_off >= 0 else b""
        if len(head) == V.FOOTER_SIZE and head[:8] == V.FOOTER_COOKIE:
            self.footer_copy = self._parse_footer(head, 0, "footer_copy")
        if tail_off > 0 and raw_end[:8] == V.FOOTER_COOKIE:
            self.footer_offset, self.footer_bytes = tail_off, V.FOOTER_SIZE
            self.footer_end = self._parse_footer(raw_end, tail_off, "footer")
        elif size >= 511 and src.read_upto(size - 511, 8) == V.FOOTER_COOKIE and size - 511 > 0:
            self.footer_offset, self.footer_bytes = size - 511, 511
            self.note("info", "footer_511", "511-byte footer at the end of the file (old Virtual PC)",
                      structure="footer", host_offset=size - 511)
            self.footer_end = self._parse_footer(src.read(size - 511, 511) + b"\0", size - 511,
                                                 "footer")
        if self.footer_copy is None and self.footer_end is None:
            raise ParseError("no VHD footer: neither offset 0 nor the end of the file holds "
                             "'conectix'", path=str(self.path), offset=max(0, tail_off),
                             structure="footer")
        if self.footer_copy is not None:
            if self.footer_end is None:
                if self.footer_copy["diskType"] != V.DISK_FIXED:
                    self.note("error", "footer_missing", "no footer at the end of the file "
                              "(truncated?); the copy at offset 0 is used",
                              structure="footer", host_offset=max(0, tail_off))
            elif head != raw_end[:V.FOOTER_SIZE]:
                self.note("warning", "footer_mismatch", "the footer copy at offset 0 differs "
                          "from the footer at the end of the file; QEMU uses the copy",
                          structure="footer_copy", host_offset=0, size=V.FOOTER_SIZE)

    @property
    def footer(self) -> dict:
        """The footer QEMU uses: the copy at offset 0 when present, else the one at EOF."""
        return self.footer_copy if self.footer_copy is not None else self.footer_end

    @property
    def footer_name(self) -> str:
        return "footer_copy" if self.footer_copy is not None else "footer"

    def _size_rule(self) -> None:
        f = self.footer
        base = 0 if self.footer_copy is not None else self.footer_offset
        chs = f["cylinders"] * f["heads"] * f["sectorsPerTrack"]
        self.geometry_size = chs * SECTOR
        self.footer_size = f["currentSize"]
        use_current = V.uses_current_size(f["creatorApplication"], chs)
        size = (f["currentSize"] // SECTOR * SECTOR) if use_current else chs * SECTOR
        rule = ("currentSize (creator " + repr(bytes(f["creatorApplication"]))[1:] + ")"
                if use_current else "cylinders*heads*sectorsPerTrack*512")
        geo_raw = self.source.read_upto(base + 56, 4)
        self._field_rows += [
            FieldRow("size", "geometry_size", base + 56, 4, geo_raw, self.geometry_size,
                     f"{self.geometry_size} ({f['cylinders']}/{f['heads']}/{f['sectorsPerTrack']})",
                     "C*H*S*512: the disk size Virtual PC and QEMU use for 'vpc '/'qemu' images"),
            FieldRow("size", "footer_size", base + 48, 8, self.source.read_upto(base + 48, 8),
                     self.footer_size, str(self.footer_size),
                     "currentSize: the disk size Hyper-V and QEMU force_size ('qem2') images use"),
            FieldRow("size", "virtual_size", base + (48 if use_current else 56),
                     8 if use_current else 4, b"", size, f"{size} from {rule}",
                     "the guest disk size QEMU 7.2 reports: currentSize for 'win ', 'qem2', "
                     "'d2v ', 'CTXS', 'tap\\0' or the maximum geometry, else C*H*S*512"),
        ]
        if size > V.VHD_MAX_SECTORS * SECTOR:
            self.note("error", "size_too_large", f"disk size {size} exceeds QEMU's VHD limit "
                      f"of {V.VHD_MAX_SECTORS * SECTOR} bytes (2040 GiB); QEMU refuses it",
                      structure=f"{self.footer_name}.currentSize", host_offset=base + 48)
            if size >= 1 << 62:
                size = V.VHD_MAX_SECTORS * SECTOR
        self.virtual_size = int(size)

    # ---- dynamic header and BAT ------------------------------------------------------
    def _read_dynamic_header(self) -> None:
        off = self.footer["dataOffset"]
        name = "dynamic_header"
        if not validate_table(self, off, V.HEADER_SIZE, name):
            return
        data = self.source.read(off, V.HEADER_SIZE, name)
        rows = field_layout(V.dynamic_header, data, structure=name, base_offset=off)
        self._field_rows += rows
        h = {r.field: r.value for r in rows}
        if h["cookie"] != V.HEADER_COOKIE:
            self.note("error", "header_cookie", f"no 'cxsparse' at the dynamic header offset "
                      f"{off:#x} (footer.dataOffset); QEMU refuses the image",
                      structure=f"{name}.cookie", host_offset=off)
            return
        self.header, self.header_offset = h, off
        want = V.checksum(data, 36)
        if h["checksum"] != want:
            self.note("error", "header_checksum", f"dynamic header checksum {h['checksum']:#010x} "
                      f"is wrong (computed {want:#010x})", structure=f"{name}.checksum",
                      host_offset=off + 36, size=4)
        if h["headerVersion"] != V.VERSION_1_0:
            self.note("warning", "header_version", f"headerVersion {h['headerVersion']:#010x} "
                      "is not 0x00010000", structure=f"{name}.headerVersion", host_offset=off + 24)
        self._read_locators(data, off)
        bs = h["blockSize"]
        if bs < SECTOR or bs & (bs - 1):
            self.note("error", "block_size_invalid", f"blockSize {bs} is not a power of two "
                      ">= 512; QEMU refuses the image", structure=f"{name}.blockSize",
                      host_offset=off + 32)
            return
        self.block_size, self.bitmap_size = bs, V.bitmap_bytes(bs)
        self.cluster_size = bs
        n = h["maxTableEntries"]
        need = -(-self.virtual_size // bs)
        if n < need:
            self.note("error", "bat_too_small", f"maxTableEntries {n} covers {n * bs} bytes, "
                      f"the disk is {self.virtual_size} ('page table too small'); the rest reads "
                      "as zeros", structure=f"{name}.maxTableEntries", host_offset=off + 28)
        self.bat_offset = h["tableOffset"]
        if not validate_table(self, self.bat_offset, n * 4, "bat"):
            return
        self.bat = V.bat_table(n).parse(self.source.read(self.bat_offset, n * 4, "bat")).astype(U64)
        self._check_bat()

    def _block_ranges(self):
        """(index, bitmap offset, end of data) of every allocated BAT entry."""
        idx = np.flatnonzero(self.bat != V.BAT_UNUSED)
        start = self.bat[idx] * U64(SECTOR)
        return idx, start, start + U64(self.bitmap_size + self.block_size)

    def _check_bat(self) -> None:
        idx, start, end = self._block_ranges()
        if not idx.size:
            return
        entry_off = U64(self.bat_offset) + idx.astype(U64) * U64(4)
        limit = U64(self.footer_offset if self.footer_offset is not None else self.source.size)
        beyond = np.flatnonzero(end > limit)
        if beyond.size:
            note_bad_entries(self, beyond, "bat_entry_beyond_eof",
                             lambda k: f"block {int(idx[k])} at {int(start[k]):#x} (+"
                             f"{self.bitmap_size + self.block_size}) ends past the data area "
                             f"({int(limit)} bytes; QEMU: 'the image has been truncated')",
                             "bat", entry_off)
        meta_end = max(self.bat_offset + -(-self.bat.size * 4 // SECTOR) * SECTOR,
                       (self.header_offset or 0) + V.HEADER_SIZE, V.FOOTER_SIZE)
        low = np.flatnonzero(start < U64(meta_end))
        if low.size:
            note_bad_entries(self, low, "bat_entry_overlaps_metadata",
                             lambda k: f"block {int(idx[k])} at {int(start[k]):#x} overlaps the "
                             "footer copy, dynamic header or BAT", "bat", entry_off)
        order = np.argsort(start, kind="stable")
        s, e = start[order], end[order]
        clash = np.flatnonzero(s[1:] < np.maximum.accumulate(e)[:-1]) + 1
        if clash.size:
            bad = np.sort(order[clash])
            note_bad_entries(self, bad, "bat_entry_overlap",
                             lambda k: f"block {int(idx[k])} at {int(start[k]):#x} overlaps "
                             "another block's storage", "bat", entry_off)

    def _read_locators(self, data: bytes, base: int) -> None:
        p0 = V.PARENT_LOCATORS_OFFSET
        for i in range(V.N_PARENT_LOCATORS):
            rows = field_layout(V.parent_locator, data, structure=f"parent_locator[{i}]",
                                base_offset=base, start=p0 + i * V.PARENT_LOCATOR_SIZE)
            loc = {r.field: r.value for r in rows}
            loc["index"], loc["entry_offset"] = i, base + p0 + i * V.PARENT_LOCATOR_SIZE
            loc["value"] = None
            code, n, off = loc["platformCode"], loc["platformDataLength"], loc["platformDataOffset"]
            if code == 0:
                continue
            self._field_rows += rows
            if n and validate_table(self, off, n, f"parent_locator[{i}] data", index=i,
                                    limit=64 << 10, severity="warning"):
                raw = self.source.read(off, n, "parent locator data")
                loc["raw_data"] = raw
                if code in (V.PLATFORM_W2RU, V.PLATFORM_W2KU):
                    loc["value"] = raw.decode("utf-16-le", "replace").split("\0")[0]
                elif code in (V.PLATFORM_WI2R, V.PLATFORM_WI2K, V.PLATFORM_MACX):
                    loc["value"] = raw.decode("utf-8", "replace").split("\0")[0]
            self.locators.append(loc)

    # ---- differencing ------------------------------------------------------------------
    def parent_names(self) -> list[str]:
        """Candidate parent names: W2ru (relative), parentUnicodeName, W2ku, Wi2r, MacX."""
        by_code = {}
        for loc in self.locators:
            if loc["value"]:
                by_code.setdefault(loc["platformCode"], loc["value"])
        uname = self.header["parentUnicodeName"].decode("utf-16-be", "replace").split("\0")[0]
        out = []
        for name in (by_code.get(V.PLATFORM_W2RU), uname, by_code.get(V.PLATFORM_W2KU),
                     by_code.get(V.PLATFORM_WI2R), by_code.get(V.PLATFORM_WI2K)):
            if name:
                name = name.replace("\\", "/")
                if name.startswith("./"):
                    name = name[2:]
                if name not in out:
                    out.append(name)
        mac = by_code.get(V.PLATFORM_MACX)
        if mac and mac.startswith("file://"):
            out.append(mac[7:])
        return out

    def _open_parent(self) -> None:
        names = self.parent_names()
        if not names:
            self.note("error", "parent_unnamed", "differencing disk names no parent (no locator, "
                      "empty parentUnicodeName); unallocated sectors read as zeros",
                      structure="dynamic_header.parentUnicodeName", host_offset=self.header_offset + 64)
            return
        first_error = None
        for name in names:
            try:
                self.backing = open_backing(self, name, "vpc", "parent locator")
            except ChainError as exc:
                if "not found" not in exc.message:
                    raise
                first_error = first_error or exc
                continue
            self.backing_name, self.backing_format = name, "vpc"
            break
        if self.backing is None:
            raise first_error
        parent = self.backing
        h = self.header
        pf = getattr(parent, "footer", None)
        if pf is not None and pf["uniqueId"] != h["parentUniqueId"]:
            self.note("error", "parent_uuid_mismatch", "parentUniqueId does not match the "
                      "parent's uniqueId (wrong or modified parent)",
                      structure="dynamic_header.parentUniqueId", host_offset=self.header_offset + 40)
        elif pf is not None and pf["timeStamp"] != h["parentTimeStamp"]:
            self.note("warning", "parent_timestamp_mismatch", "parentTimeStamp differs from the "
                      "parent's timeStamp", structure="dynamic_header.parentTimeStamp",
                      host_offset=self.header_offset + 56)
        if pf is not None and pf["uniqueId"] == self.footer["uniqueId"]:
            self.note("warning", "parent_same_uuid", "parent and child have the same uniqueId",
                      structure="footer.uniqueId")
        if parent.virtual_size != self.virtual_size:
            self.note("warning", "parent_size_mismatch", f"parent is {parent.virtual_size} "
                      f"bytes, child {self.virtual_size}", structure="footer.currentSize")

    # ---- the model ---------------------------------------------------------------------
    def _own_extents(self) -> ExtentTable:
        files = [self.source]
        size = self.virtual_size
        if not self.dynamic:
            from ..io.chain import mark_host_holes
            t = ExtentTable.run(0, size, KIND_DATA, files, host=0, file=0)
            return mark_host_holes(t, 0) if len(t) else t
        # without a parent QEMU's reading applies: the bitmap is ignored, holes are zeros
        diff = self.disk_type == V.DISK_DIFFERENCING and self.backing is not None
        empty = KIND_UNALLOCATED if diff else KIND_ZERO
        if self.bat is None or not self.block_size or not size or \
                not (self.bat[:-(-size // self.block_size)] != V.BAT_UNUSED).any():
            return ExtentTable.run(0, size, empty, files)
        bs = U64(self.block_size)
        n_blocks = -(-size // self.block_size)
        bat = self.bat[:n_blocks]
        idx = np.flatnonzero(bat != V.BAT_UNUSED).astype(U64)
        host = bat[idx] * U64(SECTOR) + U64(self.bitmap_size)
        # guest boundaries: every allocated block's start and end, plus 0 and the disk end
        g0 = idx * bs
        g1 = np.minimum(g0 + bs, U64(size))
        pts = np.unique(np.concatenate([[U64(0), U64(size)], g0, g1]))
        guest, length = pts[:-1], np.diff(pts)
        pos = np.searchsorted(g0, guest, side="right") - 1
        alloc = (pos >= 0) & (guest < g1[np.maximum(pos, 0)])
        kind = np.where(alloc, KIND_DATA, empty).astype(np.uint8)
        hosts = np.where(alloc, host[np.maximum(pos, 0)] + (guest - g0[np.maximum(pos, 0)]), NO_HOST)
        n = guest.size
        if diff and idx.size:
            guest, length, kind, hosts = self._bitmap_units(guest, length, kind, hosts, bat, empty)
            n = guest.size
        return coalesce(guest, length, kind, hosts.astype(U64), np.zeros(n, U64),
                        np.where(kind == KIND_DATA, 0, -1).astype(np.int16), files)

    def _bitmap_units(self, guest, length, kind, hosts, bat, empty):
        """Differencing: split allocated blocks into sectors, kept where the bitmap bit is 1."""
        sel = kind == KIND_DATA
        spb = self.block_size // SECTOR
        starts = guest[sel]
        bmp_off = hosts[sel] - U64(self.bitmap_size)
        if starts.size * spb > self.limits.max_extents:
            self.note("warning", "bitmaps_not_used", f"{starts.size} allocated blocks of {spb} "
                      "sectors exceed the extent limit; sector bitmaps are ignored",
                      structure="bitmaps")
            return guest, length, kind, hosts
        bits = np.unpackbits(self.source.gather(bmp_off, -(-spb // 8)), axis=1)[:, :spb]
        k = np.arange(spb, dtype=U64)
        sg = (starts[:, None] + k[None, :] * U64(SECTOR)).reshape(-1)
        sh = (hosts[sel][:, None] + k[None, :] * U64(SECTOR)).reshape(-1)
        present = bits.reshape(-1).astype(bool)
        keep = sg < U64(self.virtual_size)
        sg, sh, present = sg[keep], sh[keep], present[keep]
        sl = np.minimum(U64(SECTOR), U64(self.virtual_size) - sg)
        g = np.concatenate([guest[~sel], sg])
        order = np.argsort(g, kind="stable")
        return (g[order], np.concatenate([length[~sel], sl])[order],
                np.concatenate([kind[~sel], np.where(present, KIND_DATA, empty).astype(np.uint8)])[order],
                np.concatenate([hosts[~sel], np.where(present, sh, NO_HOST)])[order])

    def _host_regions(self) -> list:
        size = self.source.size
        regs = []
        if self.footer_end is not None:
            regs.append((0, self.footer_offset, self.footer_bytes, "footer", "footer"))
        if not self.dynamic:
            data_end = self.footer_offset if self.footer_offset is not None else size
            regs.append((0, 0, min(self.virtual_size, data_end), "data", "guest disk"))
            return regs
        if self.footer_copy is not None:
            regs.append((0, 0, V.FOOTER_SIZE, "footer", "footer copy"))
        if self.header_offset is not None:
            regs.append((0, self.header_offset, V.HEADER_SIZE, "header", "dynamic header"))
        for loc in self.locators:
            if loc["platformDataLength"]:
                regs.append((0, loc["platformDataOffset"], loc["platformDataLength"], "metadata",
                             f"parent locator {loc['index']} data"))
        if self.bat is not None:
            regs.append((0, self.bat_offset, -(-self.bat.size * 4 // SECTOR) * SECTOR, "bat", "bat"))
            idx, start, end = self._block_ranges()
            if idx.size:
                regs.append((0, start, np.full(idx.size, self.bitmap_size, U64), "metadata",
                             "sector bitmap"))
                regs.append((0, start + U64(self.bitmap_size), np.full(idx.size, self.block_size, U64),
                             "data", "blocks"))
        return regs

    def _register_tables(self) -> None:
        self._tables["parent_locators"] = self._locators_frame
        if self.bat is not None:
            self._tables["bat"] = self._bat_frame
            self._tables["bitmaps"] = self._bitmaps_frame

    def _bat_frame(self):
        import pandas as pd
        from ..frames import nullable_offsets
        n = self.bat.size
        alloc = self.bat != V.BAT_UNUSED
        i = np.arange(n, dtype=U64)
        return pd.DataFrame({
            "index": np.arange(n, dtype=np.int64),
            "entry_offset": U64(self.bat_offset) + i * U64(4),
            "raw": self.bat.astype(np.uint32),
            "guest_offset": i * U64(self.block_size),
            "allocated": alloc,
            "bitmap_offset": nullable_offsets(np.where(alloc, self.bat * U64(SECTOR), NO_HOST)),
            "host_offset": nullable_offsets(np.where(alloc, self.bat * U64(SECTOR)
                                                     + U64(self.bitmap_size), NO_HOST)),
        })

    def _bitmaps_frame(self):
        """One row per allocated block: where its sector bitmap is and how many bits are set."""
        import pandas as pd
        idx, start, end = self._block_ranges()
        spb = self.block_size // SECTOR
        inside = end - U64(self.block_size) <= U64(self.source.size)   # bitmap readable
        present = np.zeros(idx.size, np.int64)
        if idx.size and idx.size * self.bitmap_size <= self.limits.max_table_bytes:
            bits = np.unpackbits(self.source.gather(start, self.bitmap_size), axis=1)[:, :spb]
            present = bits.sum(axis=1, dtype=np.int64)
        return pd.DataFrame({"block": idx.astype(np.int64), "bitmap_offset": start,
                             "bitmap_bytes": self.bitmap_size, "sectors": spb,
                             "sectors_present": present, "all_present": present == spb,
                             "readable": inside},
                            columns=["block", "bitmap_offset", "bitmap_bytes", "sectors",
                                     "sectors_present", "all_present", "readable"])

    def sector_bitmap(self, block: int) -> np.ndarray:
        """Bool per sector of one block: True = the bit is set (MSB first)."""
        if self.bat is None or not 0 <= block < self.bat.size or self.bat[block] == V.BAT_UNUSED:
            raise ImageError(f"block {block} is not allocated", path=str(self.path), structure="bat")
        spb = self.block_size // SECTOR
        raw = V.bitmap_table(self.bitmap_size).parse(
            self.source.read(int(self.bat[block]) * SECTOR, self.bitmap_size, "sector bitmap"))
        return np.unpackbits(raw)[:spb].astype(bool)

    def _locators_frame(self):
        import pandas as pd
        cols = ["index", "entry_offset", "platform_code", "platform", "data_space",
                "data_length", "data_offset", "value"]
        return pd.DataFrame([{
            "index": l["index"], "entry_offset": l["entry_offset"],
            "platform_code": l["platformCode"],
            "platform": V.PLATFORM_CODES.get(l["platformCode"], f"unknown {l['platformCode']:#x}"),
            "data_space": l["platformDataSpace"], "data_length": l["platformDataLength"],
            "data_offset": l["platformDataOffset"], "value": l["value"]} for l in self.locators],
            columns=cols)
