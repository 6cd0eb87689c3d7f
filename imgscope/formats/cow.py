"""cow driver: QEMU's old ``cow`` format and User-Mode-Linux COW files (magic ``OOOM``).

One bit per 512-byte guest sector says where the sector is: set = in this
file's data area (``data_offset + n * 512``), clear = in the backing file (or
zeros without one).  QEMU read version 2 headers (64-bit or 32-bit struct
layout, told apart by where ``sectorsize`` = 512 sits); User-Mode Linux wrote
version 2 with a 4096-byte name and version 3 (packed, or the unpacked 64-bit
layout recognised as UML does: its ``cow_format`` 0 sits where the packed
layout's name starts).  The bitmap is decoded with numpy a chunk at a time and
never expanded to a bool per sector of the whole disk.

No qemu-img that reads ``cow`` still exists (QEMU 2.1 was the last), so what
qemu-img 2.1 printed is followed where known: no cluster size, no dirty flag.
"""
from __future__ import annotations

import os

import construct as cs
import numpy as np

from ..errors import LimitExceeded, ParseError, Truncated, Unsupported
from ..io.source import Source
from ..model import Image, ExtentTable, KIND_DATA, KIND_UNALLOCATED, NO_HOST
from ..schemas import cow as S
from ..schemas._types import field_layout
from . import open_backing
from .base import note_beyond_eof

U64 = np.uint64
SECTOR = S.SECTOR
MAX_SIZE = (1 << 63) - SECTOR
#: bitmap bytes decoded per step (bounds the temporary arrays)
CHUNK_BYTES = 1 << 16
#: bitmap bytes read at a time (uniform chunks and holes of the file are one run each)
READ_BYTES = 1 << 20


def bitmap_runs(data: np.ndarray, first_bit: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start bit, bit count, value) of the runs of equal bits in LSB-first bitmap bytes.

    Whole 0x00 / 0xFF bytes are handled per run of bytes; only mixed bytes are
    unpacked to bits, so a mostly uniform bitmap costs a few passes over its bytes.
    """
    b = np.asarray(data, np.uint8)
    if not b.size:
        z = np.zeros(0, U64)
        return z, z.copy(), np.zeros(0, bool)
    mixed = (b != 0) & (b != 0xFF)
    brk = np.ones(b.size, bool)
    brk[1:] = (b[1:] != b[:-1]) | mixed[1:] | mixed[:-1]
    rs = np.flatnonzero(brk)
    rlen = np.diff(np.append(rs, b.size)).astype(U64)
    rmixed = mixed[rs]
    cnt = np.where(rmixed, 8, 1)
    ridx = np.repeat(np.arange(rs.size), cnt)
    k = (np.arange(ridx.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)).astype(U64)
    is_mixed = rmixed[ridx]
    ustart = rs[ridx].astype(U64) * U64(8) + k
    ulen = np.where(is_mixed, U64(1), rlen[ridx] * U64(8))
    uval = b[rs[ridx]] == 0xFF
    # mixed bytes become their 8 bits, least significant first (sector n = bit n % 8)
    uval[is_mixed] = np.unpackbits(b[rs[rmixed]], bitorder="little").astype(bool)
    s = np.flatnonzero(np.concatenate([[True], uval[1:] != uval[:-1]]))
    return ustart[s] + U64(first_bit), np.add.reduceat(ulen, s).astype(U64), uval[s]


def _merge_runs(starts, lengths, values):
    """Join neighbouring runs of the same value (runs from consecutive chunks)."""
    if starts.size < 2:
        return starts, lengths, values
    s = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))
    return starts[s], np.add.reduceat(lengths, s).astype(U64), values[s]


class CowImage(Image):
    format = "cow"
    info_complete = False        # qemu-img showed neither cluster size nor dirty flag for cow
    slack_unit = SECTOR

    def __init__(self, source: Source, **kw) -> None:
        super().__init__(source, **kw)
        self.h: dict = {}
        self.layout: S.Layout | None = None
        self._runs = None
        self._own_cache: ExtentTable | None = None
        self._parse_header()
        self._geometry()
        self._open_backing()
        self._tables["bitmap"] = self._bitmap_frame
        self._own_extents()      # sectors past the end of the file are findings once open

    # ---- header ------------------------------------------------------------------------
    def _choose_layout(self, head: bytes) -> str:
        version = S.preamble.parse(head).version
        if version == 2:
            for name in ("qemu", "qemu-i386", "uml-v2"):
                at = S.SECTORSIZE_AT[name]
                if len(head) >= at + 4 and S.u32.parse(head[at:at + 4]) == SECTOR:
                    return name
            return "qemu"
        if version == 3:
            at = S.UML_V3_NAME_AT
            return "uml-v3" if S.u32.parse(head[at:at + 4].ljust(4, b"\0")) else "uml-v3-64bit"
        if version == 1:
            raise Unsupported("cow version 1 (User-Mode-Linux, host-endian header) is not "
                              "supported", path=str(self.path), offset=4, structure="header.version")
        raise Unsupported(f"cow version {version} is not supported (2 or 3)", path=str(self.path),
                          offset=4, structure="header.version")

    def _parse_header(self) -> None:
        src = self.source
        head = src.read_upto(0, max(l.header_size for l in S.LAYOUTS.values()))
        if len(head) < 8:
            raise Truncated(f"file of {src.size} bytes is shorter than a cow header",
                            path=str(self.path), offset=0, structure="header")
        if head[:4] != S.MAGIC:
            if head[:4] == S.MAGIC[::-1]:
                raise Unsupported("little-endian cow magic 'MOOO': a host-endian User-Mode-Linux "
                                  "COW v1 file, not supported", path=str(self.path), offset=0,
                                  structure="header.magic")
            raise ParseError("not a cow image: bytes 0-3 are not 'OOOM'", path=str(self.path),
                             offset=0, structure="header.magic")
        name = self._choose_layout(head)
        layout = self.layout = S.LAYOUTS[name]
        self.variant = name
        if len(head) < layout.header_size:
            raise Truncated(f"file of {src.size} bytes is shorter than the {layout.header_size}-"
                            f"byte {layout.description} header", path=str(self.path), offset=0,
                            structure="header")
        try:
            rows = field_layout(layout.struct, head[:layout.header_size], structure="header")
        except cs.ConstructError as exc:   # pragma: no cover - fixed-size record, magic checked
            raise ParseError(f"cow header does not parse: {exc}", path=str(self.path), offset=0,
                             structure="header") from None
        self._field_rows = rows
        self.h = {r.field: r.value for r in rows}
        self._offsets = {r.field: r.offset for r in rows}

    def _where(self, name: str) -> dict:
        return dict(structure=f"header.{name}", host_offset=self._offsets.get(name))

    def _geometry(self) -> None:
        h, name = self.h, self.layout.name
        size = h["size"]
        ss = h["sectorsize"]
        if ss != SECTOR:
            sev = "warning" if name.startswith("qemu") else "error"
            self.note(sev, "sector_size_invalid", f"sectorsize {ss} is not 512"
                      + (" (QEMU ignores it)" if sev == "warning" else "; 512 is used"),
                      **self._where("sectorsize"), raise_in_strict=sev == "error")
            ss = SECTOR
        align = h.get("alignment", ss)
        if "alignment" in h and not 0 < align <= 1 << 30:
            self.note("error", "alignment_invalid", f"alignment {align} is not a usable size; "
                      "512 is used", **self._where("alignment"))
            align = SECTOR
        if h.get("cow_format", S.COW_BITMAP) != S.COW_BITMAP:
            self.note("error", "cow_format_unknown", f"cow_format {h['cow_format']} is not 0 "
                      "(the allocation bitmap); read as a bitmap", **self._where("cow_format"))
        if size % SECTOR:
            self.note("info", "size_unaligned", f"size {size} is no multiple of 512; the disk is "
                      f"{size // SECTOR} whole sectors", **self._where("size"),
                      raise_in_strict=False)
        vsize = size // SECTOR * SECTOR
        if vsize > MAX_SIZE:
            self.note("error", "size_too_large", f"size {size} is 2^63 bytes or more; the disk is "
                      "cut there", **self._where("size"))
            vsize = MAX_SIZE
        self.virtual_size = vsize
        self.sectors = vsize // SECTOR
        self.bitmap_offset, declared, self.data_offset = S.geometry(name, min(size, MAX_SIZE), ss,
                                                                     align)
        # one bit per sector of the disk, whatever the writer's rounding
        self.bitmap_bytes = max(declared, (self.sectors + 7) // 8)
        avail = max(0, min(self.bitmap_bytes, self.source.size - self.bitmap_offset))
        if avail < self.bitmap_bytes:
            self.note("error", "bitmap_truncated", f"the allocation bitmap needs "
                      f"{self.bitmap_bytes} bytes at {self.bitmap_offset:#x} but the file ends "
                      f"after {avail}; the sectors without a bit read as unallocated",
                      structure="bitmap", host_offset=self.bitmap_offset + avail,
                      size=self.bitmap_bytes - avail)
        limit = self.limits.max_table_bytes
        if avail > limit:
            self.note("error", "table_too_large", f"allocation bitmap of {avail} bytes exceeds "
                      f"the limit of {limit} bytes; sectors past it read as unallocated",
                      structure="bitmap", host_offset=self.bitmap_offset, size=avail)
            avail = limit
        self.bitmap_read = avail

    # ---- backing file ------------------------------------------------------------------
    def _open_backing(self) -> None:
        raw = self.h["backing_file"]
        name = raw.split(b"\0")[0]
        if self.layout.name.startswith("qemu"):
            name = name[:1023]            # QEMU's pstrcpy into a 1024-byte buffer
        elif b"\0" not in raw:
            self.note("warning", "backing_name_unterminated", "backing file name fills its field "
                      "without a terminating NUL", **self._where("backing_file"))
        if not name:
            return
        self.backing_name = name.decode("utf-8", "surrogateescape")
        self.backing = open_backing(self, self.backing_name, None)   # format probed
        mtime = self.h["mtime"] & 0xFFFFFFFF
        if mtime:
            try:
                actual = int(os.stat(self.backing.path).st_mtime) & 0xFFFFFFFF
            except OSError:
                actual = None
            if actual is not None and actual != mtime:
                self.note("info", "backing_mtime_mismatch", f"header mtime {mtime} differs from "
                          f"the backing file's modification time {actual} (changed or copied "
                          "since the overlay was made; QEMU never checked, UML refuses)",
                          **self._where("mtime"), raise_in_strict=False)

    # ---- bitmap --------------------------------------------------------------------------
    def runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first sector, sectors, present) of every run of equal bits, covering the disk."""
        if self._runs is None:
            parts = []
            total = 0
            for pos, n, data in self._bitmap_chunks():
                if data is None or (data[0] in (0, 0xFF) and (data == data[0]).all()):
                    # a hole of the host file (zeros) or a uniform chunk: one run
                    part = (np.array([pos * 8], U64), np.array([n * 8], U64),
                            np.array([data is not None and data[0] == 0xFF], bool))
                else:
                    pieces = [bitmap_runs(data[i:i + CHUNK_BYTES], (pos + i) * 8)
                              for i in range(0, n, CHUNK_BYTES)]
                    part = _merge_runs(*(np.concatenate([p[k] for p in pieces]) for k in range(3)))
                total += part[0].size
                if total > self.limits.max_extents:
                    raise LimitExceeded(f"the allocation bitmap has more than "
                                        f"{self.limits.max_extents} runs", path=str(self.path),
                                        offset=self.bitmap_offset + pos, structure="bitmap")
                parts.append(part)
            starts, lengths, values = (np.concatenate([p[i] for p in parts]) for i in range(3)) \
                if parts else (np.zeros(0, U64), np.zeros(0, U64), np.zeros(0, bool))
            covered = U64(self.bitmap_read * 8)
            if covered < U64(self.sectors):       # bits the file does not hold: clear
                starts = np.append(starts, covered)
                lengths = np.append(lengths, U64(self.sectors) - covered)
                values = np.append(values, False)
            starts, lengths, values = _merge_runs(starts, lengths, values)
            keep = starts < U64(self.sectors)     # padding bits of the last byte
            starts, lengths, values = starts[keep], lengths[keep], values[keep]
            if starts.size:
                lengths[-1] = U64(self.sectors) - starts[-1]
            self._runs = (starts, lengths, values)
        return self._runs

    def _bitmap_chunks(self):
        """(position, length, bytes or None) over the readable bitmap, READ_BYTES at a
        time; None for a chunk that lies in a hole of the (sparse) host file."""
        holes_known = self.bitmap_read > READ_BYTES
        runs = self.source.data_runs() if holes_known else []
        starts = np.array([r[0] for r in runs], np.int64)
        ends = starts + np.array([r[1] for r in runs], np.int64)
        for pos in range(0, self.bitmap_read, READ_BYTES):
            n = min(READ_BYTES, self.bitmap_read - pos)
            lo = self.bitmap_offset + pos
            if holes_known:
                i = int(np.searchsorted(ends, lo, side="right"))
                if i >= starts.size or starts[i] >= lo + n:
                    yield pos, n, None
                    continue
            yield pos, n, S.bitmap_table(n).parse(self.source.read(lo, n, "bitmap"))

    def sector_present(self, first: int, count: int) -> np.ndarray:
        """Bool per sector of [first, first + count): is the sector in this file?"""
        first, count = max(0, int(first)), max(0, int(count))
        count = min(count, self.sectors - first) if first < self.sectors else 0
        out = np.zeros(count, bool)
        b0 = first // 8
        b1 = min(-(-(first + count) // 8), self.bitmap_read)
        if count and b1 > b0:
            data = S.bitmap_table(b1 - b0).parse(self.source.read(self.bitmap_offset + b0, b1 - b0,
                                                                   "bitmap"))
            bits = S.unpack_bitmap(data, (b1 - b0) * 8)[first - 8 * b0:]
            out[:min(count, bits.size)] = bits[:count]
        return out

    # ---- the model -------------------------------------------------------------------------
    def _own_extents(self) -> ExtentTable:
        if self._own_cache is None:
            files = self.files()
            starts, lengths, values = self.runs()
            n = starts.size
            if not n:
                self._own_cache = ExtentTable.empty(files)
                return self._own_cache
            guest = starts * U64(SECTOR)
            host = np.where(values, U64(self.data_offset) + guest, NO_HOST).astype(U64)
            t = ExtentTable(guest, lengths * U64(SECTOR),
                            np.where(values, KIND_DATA, KIND_UNALLOCATED).astype(np.uint8), host,
                            np.zeros(n, U64), np.where(values, 0, -1).astype(np.int16),
                            np.zeros(n, np.int16), files)
            note_beyond_eof(self, t, SECTOR, "bitmap")
            self._own_cache = t
        return self._own_cache

    def _host_regions(self) -> list:
        hsize = self.layout.header_size
        regs = [(0, 0, hsize, "header", f"header ({self.layout.description})")]
        if self.bitmap_offset > hsize:
            regs.append((0, hsize, self.bitmap_offset - hsize, "slack", "header"))
        end = self.bitmap_offset + self.bitmap_bytes
        if self.bitmap_bytes:
            regs.append((0, self.bitmap_offset, self.bitmap_bytes, "metadata", "allocation bitmap"))
        if self.data_offset > end:
            regs.append((0, end, self.data_offset - end, "slack", "allocation bitmap"))
        t = self._own_extents()
        data = t.kind == KIND_DATA
        if data.any():
            regs.append((0, t.host[data], t.length[data], "data", "guest data"))
        return regs

    def _bitmap_frame(self):
        """One row per run of equal bits: where it is in the guest, the bitmap and the file."""
        import pandas as pd
        from ..frames import nullable_offsets
        starts, lengths, values = self.runs()
        guest = starts * U64(SECTOR)
        return pd.DataFrame({
            "first_sector": starts, "sectors": lengths, "present": values,
            "guest_offset": guest, "length": lengths * U64(SECTOR),
            "bitmap_offset": U64(self.bitmap_offset) + starts // U64(8),
            "bit": (starts % U64(8)).astype(np.uint8),
            "host_offset": nullable_offsets(np.where(values, U64(self.data_offset) + guest, NO_HOST)),
        })
