"""LVM2 physical volumes inside a guest disk: label, metadata areas, VG text, LV readers.

A physical volume (PV) is found by its "LABELONE" label in sectors 0..3 of the
disk or of a partition.  The label sector holds the PV header (UUID, size, data
and metadata area lists); each metadata area starts with a header whose slot 0
points at the current copy of the volume-group text in a circular buffer (the
copy may wrap from the end of the buffer to its start).  The text is parsed
into plain dicts; a linear logical volume (LV) whose extents all lie on this PV
is then served as a `SpanReader` over the PV.

Offsets in fields, tables and findings are offsets on the guest disk (the PV
start `base_offset` included): they are where a hex viewer of the guest finds
the bytes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import construct as cs
import numpy as np

from ..errors import ImageError, LimitExceeded, ParseError, Unsupported
from ..limits import DEFAULT_LIMITS, Limits
from ..model import FINDINGS_PER_CODE, Finding
from ..schemas import lvm2 as S
from ..schemas._types import FieldRow, field_layout

#: metadata text larger than this is not parsed (lvm2's default area holds ~0.5 MiB)
MAX_METADATA_TEXT = 4 << 20
#: keys, sections and list items one metadata text may hold
MAX_METADATA_ITEMS = 1 << 18
#: sections nested deeper than this are refused (real metadata nests 4 deep)
MAX_METADATA_DEPTH = 32
#: metadata areas read from one PV header (lvm2 writes at most 2)
MAX_METADATA_AREAS = 8
#: raw_locn slots looked at in a metadata area header: committed and precommitted
RAW_LOCN_SLOTS = 2
#: segment types that map extents one to one onto PV extents
LINEAR_TYPES = ("striped", "linear")

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"[^"\\]*(?:\\.[^"\\]*)*")
  | (?P<punct>[{}\[\]=,])
  | (?P<word>[^\s{}\[\]=,"'\#]+)
  | (?P<bad>.)
""", re.X | re.S)
_INT = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+)\Z")
_KEY = re.compile(r"[A-Za-z0-9_.+\-]+\Z")
_UNESCAPE = re.compile(r"\\(.)", re.S)
_EOF = ("eof", "", -1)


class MetadataSyntaxError(ParseError):
    """LVM text metadata that does not follow the config grammar."""


# ---- the text metadata grammar ----------------------------------------------------------


def _tokens(text: str) -> Iterator[tuple[str, str, int]]:
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind in ("space", "comment"):
            continue
        value = m.group()
        yield (value if kind == "punct" else kind), value, m.start()


def _line_col(text: str, pos: int) -> str:
    if pos < 0:
        return "at the end of the text"
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"at line {line}, column {col}"


def parse_metadata(text: str | bytes, *, max_depth: int = MAX_METADATA_DEPTH,
                   max_bytes: int = MAX_METADATA_TEXT, max_items: int = MAX_METADATA_ITEMS,
                   warnings: list | None = None, path: str | None = None,
                   offset: int | None = None) -> dict:
    """LVM/device-mapper config text -> nested dicts.

    ``name { ... }`` is a dict, ``key = value`` a str, int, float or flat list
    (commas between list items are optional, as in libdevmapper).  A repeated
    key keeps its first value (libdevmapper's lookup finds the first one) and
    adds a message to `warnings`.  Text beyond `max_bytes`, more than
    `max_items` items or sections nested deeper than `max_depth` raise
    LimitExceeded; bad syntax raises MetadataSyntaxError naming line and column.
    The parser keeps its own stack, so no input makes it recurse.
    """
    where = dict(path=path, offset=offset, structure="metadata text")
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        if len(raw) > max_bytes:
            raise LimitExceeded(f"metadata text of {len(raw)} bytes exceeds {max_bytes}", **where)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if warnings is not None:
                warnings.append(f"metadata text is not UTF-8 (byte {exc.start}); "
                                "undecodable bytes are shown as U+FFFD")
            text = raw.decode("utf-8", "replace")
    if len(text) > max_bytes:
        raise LimitExceeded(f"metadata text of {len(text)} characters exceeds {max_bytes}", **where)

    def fail(message: str, pos: int) -> None:
        raise MetadataSyntaxError(f"{message} {_line_col(text, pos)}", **where)

    def scalar(kind: str, value: str, pos: int):
        if kind == "string":
            return _UNESCAPE.sub(r"\1", value[1:-1])
        if kind == "word":
            if _INT.match(value):
                number = int(value)
                if not -(1 << 63) <= number < 1 << 64:
                    fail(f"integer {value[:30]} out of range", pos)
                return number
            if _FLOAT.match(value):
                return float(value)
            fail(f"unquoted value {value[:40]!r}", pos)
        fail(f"expected a value, found {_describe(kind, value)}", pos)

    def put(section: dict, key: str, value, pos: int) -> None:
        if key in section:
            if warnings is not None:
                warnings.append(f"key {key!r} repeated {_line_col(text, pos)}; the first value "
                                "is kept")
            return
        section[key] = value

    root: dict = {}
    stack: list[tuple[dict, str, int]] = [(root, "", -1)]
    items = 0
    tokens = _tokens(text)
    for kind, value, pos in tokens:
        section = stack[-1][0]
        if kind == "}":
            if len(stack) == 1:
                fail("'}' without a matching '{'", pos)
            stack.pop()
            continue
        if kind != "word" or not _KEY.match(value):
            fail(f"expected a key, found {_describe(kind, value)}", pos)
        key = value
        items += 1
        if items > max_items:
            raise LimitExceeded(f"metadata text holds more than {max_items} items", **where)
        kind, value, vpos = next(tokens, _EOF)
        if kind == "{":
            if len(stack) > max_depth:
                raise LimitExceeded(f"metadata sections nested deeper than {max_depth} "
                                    f"{_line_col(text, vpos)}", **where)
            child: dict = {}
            put(section, key, child, pos)
            stack.append((child, key, pos))
            continue
        if kind != "=":
            fail(f"expected '=' or '{{' after {key!r}, found {_describe(kind, value)}", vpos)
        kind, value, vpos = next(tokens, _EOF)
        if kind != "[":
            put(section, key, scalar(kind, value, vpos), pos)
            continue
        array: list = []
        pending = None
        while True:
            kind, value, vpos = pending or next(tokens, _EOF)
            pending = None
            if kind == "]":
                break
            array.append(scalar(kind, value, vpos))
            items += 1
            if items > max_items:
                raise LimitExceeded(f"metadata text holds more than {max_items} items", **where)
            kind, value, vpos = next(tokens, _EOF)
            if kind == "]":
                break
            if kind != ",":
                pending = (kind, value, vpos)
        put(section, key, array, pos)
    if len(stack) > 1:
        _, name, pos = stack[-1]
        fail(f"section {name!r} opened {_line_col(text, pos)} is not closed (missing '}}')", -1)
    return root


def _describe(kind: str, value: str) -> str:
    if kind == "eof":
        return "the end of the text"
    if kind == "bad":
        return "an unterminated string" if value == '"' else f"the character {value!r}"
    return repr(value[:40])


# ---- the physical volume ------------------------------------------------------------------


@dataclass
class MetadataArea:
    """One metadata area: its header, its committed slot and the text found there."""

    index: int
    offset: int                  # disk_locn offset on the PV
    size: int                    # disk_locn size
    header: dict | None = None
    header_checksum_ok: bool = False
    magic_ok: bool = False
    slots: list = field(default_factory=list)
    text_bytes: bytes | None = None
    text_checksum: int | None = None
    text_checksum_ok: bool = False
    wrapped: bool = False
    tree: dict | None = None
    seqno: int | None = None
    vg_name: str | None = None
    used: bool = False


@dataclass
class Segment:
    """One stripe area of one LV segment (a linear segment has exactly one)."""

    lv: str
    segment: int
    start_extent: int
    extent_count: int
    type: str
    stripe_count: int
    stripe: int | None = None
    pv: str | None = None
    pv_start_extent: int | None = None
    valid: bool = True
    problem: str = ""


class PhysicalVolume:
    """An LVM2 PV read through a reader of its device (a guest disk or partition)."""

    def __init__(self, reader, *, path: str = "", note: Callable | None = None,
                 base_offset: int = 0, limits: Limits | None = None) -> None:
        self.reader = reader
        self.size = int(getattr(reader, "size", 0))
        self.path = str(path)
        self.base_offset = int(base_offset)
        self.limits = limits or DEFAULT_LIMITS
        self._forward = note
        self._findings: list[Finding] = []
        self._finding_counts: dict[str, int] = {}
        self._field_rows: list[FieldRow] = []
        self.label_sector: int | None = None
        self.label: dict = {}
        self.label_crc: int | None = None
        self.pv_uuid_raw = b""
        self.pv_uuid = ""
        self.device_size = 0
        self.data_areas: list[tuple[int, int]] = []
        self.metadata_locations: list[tuple[int, int]] = []
        self.bootloader_areas: list[tuple[int, int]] = []
        self.extension: dict | None = None
        self.metadata_areas: list[MetadataArea] = []
        self.metadata: dict | None = None
        self.metadata_text = ""
        self.vg_name: str | None = None
        self.vg: dict | None = None
        self.extent_bytes = 0
        self.segments: list[Segment] = []
        self.lv_segments: dict[str, list[Segment]] = {}   # LV name -> its rows of `segments`
        self.pv_name: str | None = None         # this PV's name (pvN) in the metadata
        self.partition: int | None = None       # partition number when found in one

    # ---- findings -----------------------------------------------------------------
    def note(self, severity: str, code: str, message: str, *, offset: int | None = None,
             structure: str = "lvm2", index: int | None = None, size: int | None = None) -> None:
        """A finding about this PV; forwarded to the image's note() when given
        (which raises in strict mode)."""
        where = dict(structure=structure, index=index, size=size,
                     guest_offset=None if offset is None else self.base_offset + offset)
        if self._forward is not None:
            self._forward(severity, code, message, **where)
        count = self._finding_counts.get(code, 0) + 1
        self._finding_counts[code] = count
        if count <= FINDINGS_PER_CODE:
            self._findings.append(Finding(severity, code, message, file=self.path, **where))

    def _error(self, cls, message: str, offset: int | None = None, structure: str = "lvm2"):
        return cls(message, path=self.path or None,
                   offset=None if offset is None else self.base_offset + offset,
                   structure=structure)

    # ---- reading ------------------------------------------------------------------
    def _layout(self, struct, data: bytes, start: int, structure: str, base: int = 0) -> list:
        try:
            rows = field_layout(struct, data, structure=structure,
                                base_offset=self.base_offset + base, start=start)
        except (cs.ConstructError, ValueError) as exc:
            raise self._error(ParseError, f"{structure} does not parse: {exc}",
                              base + start, structure) from None
        self._field_rows.extend(rows)
        return rows

    @staticmethod
    def _values(rows) -> dict:
        return {r.field: r.value for r in rows}

    def _parse(self, head: bytes, sectors: list[int]) -> None:
        self._read_label(head, sectors)
        self._read_pv_header(head)
        for i, (off, size) in enumerate(self.metadata_locations[:MAX_METADATA_AREAS]):
            self.metadata_areas.append(self._read_mda(i, off, size))
        self._choose_metadata()
        if self.vg is not None:
            self._read_vg()

    def _read_label(self, head: bytes, sectors: list[int]) -> None:
        good = []
        for s in sectors:
            raw = head[s * S.SECTOR:(s + 1) * S.SECTOR]
            if len(raw) < S.SECTOR:
                continue
            sector_ok = int.from_bytes(raw[8:16], "little") == s
            crc_ok = S.lvm_crc(raw[20:]) == int.from_bytes(raw[16:20], "little")
            good.append((not (sector_ok and crc_ok), s))
        good.sort()
        sector = good[0][1]
        for _, other in good[1:]:
            self.note("warning", "label_duplicate", f"a second LVM2 label in sector {other} "
                      f"is ignored (the label in sector {sector} is used)", offset=other * S.SECTOR,
                      structure="lvm2.label")
        self.label_sector = sector
        start = sector * S.SECTOR
        lab = self._values(self._layout(S.label_header, head, start, "label_header"))
        self.label = lab
        sector_bytes = head[start:start + S.SECTOR]
        self.label_crc = S.lvm_crc(sector_bytes[20:])
        if lab["sector_xl"] != sector:
            self.note("error", "label_sector_mismatch", f"label in sector {sector} says it is in "
                      f"sector {lab['sector_xl']} (LVM ignores such a label)",
                      offset=start + 8, structure="lvm2.label_header.sector_xl")
        if lab["crc_xl"] != self.label_crc:
            self.note("error", "label_crc_mismatch", f"label checksum {lab['crc_xl']:#010x} does "
                      f"not match the sector's {self.label_crc:#010x} (LVM ignores the label)",
                      offset=start + 16, structure="lvm2.label_header.crc_xl")
        if lab["type"] != S.LABEL_TYPE:
            self.note("error", "label_type_unknown", f"label type {lab['type']!r} is not "
                      f"{S.LABEL_TYPE!r}; read as LVM2 text format",
                      offset=start + 24, structure="lvm2.label_header.type")

    def _read_pv_header(self, head: bytes) -> None:
        sector = self.label_sector * S.SECTOR
        off = self.label["offset_xl"]
        if off != S.LABEL_HEADER_SIZE:
            bad = off + S.PV_HEADER_FIXED_SIZE > S.SECTOR or off < S.LABEL_HEADER_SIZE
            self.note("error" if bad else "warning", "label_offset_unusual",
                      f"offset_xl {off} is not 32" + ("; the PV header is read at 32" if bad
                                                      else ""),
                      offset=sector + 20, structure="lvm2.label_header.offset_xl")
            if bad:
                off = S.LABEL_HEADER_SIZE
        end = sector + S.SECTOR
        pos = sector + off
        pvh = self._values(self._layout(S.pv_header, head, pos, "pv_header"))
        self.pv_uuid_raw = pvh["pv_uuid"]
        self.pv_uuid = S.format_uuid(self.pv_uuid_raw)
        self.device_size = pvh["device_size_xl"]
        if not S.valid_uuid(self.pv_uuid_raw):
            self.note("warning", "pv_uuid_invalid", "PV UUID has characters outside LVM's "
                      "alphabet 0-9a-zA-Z!#", offset=pos, structure="lvm2.pv_header.pv_uuid")
        if self.device_size != self.size:
            severity = "error" if self.device_size > self.size else "info"
            self.note(severity, "pv_size_mismatch", f"PV header device size {self.device_size} "
                      f"differs from the {self.size} bytes of the device"
                      + (" (the PV is truncated)" if self.device_size > self.size else ""),
                      offset=pos + 32, structure="lvm2.pv_header.device_size_xl")
        pos += S.PV_HEADER_FIXED_SIZE
        lists = []
        for name in ("data_area", "metadata_area"):
            areas, pos, ok = self._read_locn_list(head, pos, end, f"pv_header.{name}")
            lists.append(areas)
            if not ok:
                break
        else:
            pos = self._read_extension(head, pos, end)
        self.data_areas = lists[0]
        self.metadata_locations = lists[1] if len(lists) > 1 else []
        self._check_areas()

    def _read_locn_list(self, head: bytes, pos: int, end: int, name: str):
        """disk_locn entries up to the all-zero terminator; (areas, next pos, complete)."""
        areas = []
        while True:
            if pos + S.DISK_LOCN_SIZE > end:
                self.note("error", "areas_overflow_label", f"{name} list runs past the end of "
                          "the label sector (no terminator)", offset=pos, structure=f"lvm2.{name}")
                return areas, pos, False
            i = len(areas)
            v = self._values(self._layout(S.disk_locn, head, pos, f"{name}[{i}]"))
            pos += S.DISK_LOCN_SIZE
            if v["offset"] == 0:
                return areas, pos, True
            areas.append((v["offset"], v["size"]))

    def _read_extension(self, head: bytes, pos: int, end: int) -> int:
        if pos + S.EXTENSION_FIXED_SIZE > end:
            return pos
        ext = self._values(self._layout(S.pv_header_extension, head, pos,
                                        "pv_header_extension"))
        self.extension = ext
        pos += S.EXTENSION_FIXED_SIZE
        if ext["version"] == 0:
            return pos
        if ext["version"] > S.PV_EXT_VERSION:
            self.note("warning", "extension_version_unknown", f"PV header extension version "
                      f"{ext['version']} is newer than {S.PV_EXT_VERSION}",
                      offset=pos - S.EXTENSION_FIXED_SIZE, structure="lvm2.pv_header_extension")
        self.bootloader_areas, pos, _ = self._read_locn_list(head, pos, end,
                                                             "pv_header_extension.bootloader_area")
        return pos

    def _check_areas(self) -> None:
        sector = self.label_sector * S.SECTOR
        if not self.data_areas:
            self.note("warning", "no_data_area", "the PV header lists no data area",
                      offset=sector + 32, structure="lvm2.pv_header")
        if len(self.data_areas) > 1:
            self.note("warning", "data_areas_many", f"the PV header lists {len(self.data_areas)} "
                      "data areas (lvm2 writes one)", structure="lvm2.pv_header")
        for i, (off, size) in enumerate(self.data_areas):
            if off >= self.size or off % S.SECTOR:
                self.note("error", "data_area_invalid", f"data area {i} at {off:#x} is "
                          + ("beyond the end of the device" if off >= self.size
                             else "not sector aligned"), structure="lvm2.pv_header.data_area",
                          index=i)
        if len(self.metadata_locations) > MAX_METADATA_AREAS:
            self.note("warning", "metadata_areas_many", f"the PV header lists "
                      f"{len(self.metadata_locations)} metadata areas; the first "
                      f"{MAX_METADATA_AREAS} are read", structure="lvm2.pv_header.metadata_area")

    # ---- metadata areas -------------------------------------------------------------
    def _read_mda(self, i: int, start: int, size: int) -> MetadataArea:
        mda = MetadataArea(i, start, size)
        name = f"mda_header[{i}]"
        st = f"lvm2.{name}"
        if size < S.MDA_HEADER_SIZE or start + S.MDA_HEADER_SIZE > self.size:
            self.note("error", "metadata_area_invalid", f"metadata area {i} at {start:#x} "
                      f"(+{size}) " + ("is smaller than its 512-byte header"
                                       if size < S.MDA_HEADER_SIZE
                                       else "lies beyond the end of the device"),
                      offset=start if start < 1 << 62 else None, structure=st, index=i)
            return mda
        if start % S.SECTOR:
            self.note("warning", "metadata_area_unaligned", f"metadata area {i} at {start:#x} "
                      "is not sector aligned", offset=start, structure=st, index=i)
        if start + size > self.size:
            self.note("error", "metadata_area_beyond_end", f"metadata area {i} at {start:#x} "
                      f"(+{size}) extends past the end of the device ({self.size} bytes)",
                      offset=start, structure=st, index=i)
        raw = self.reader.pread(start, S.MDA_HEADER_SIZE)
        h = self._values(self._layout(S.mda_header, raw, 0, name, base=start))
        mda.header = h
        for j in range(RAW_LOCN_SLOTS):
            rows = self._layout(S.raw_locn, raw, S.MDA_HEADER_FIXED_SIZE + j * S.RAW_LOCN_SIZE,
                                f"{name}.raw_locn[{j}]", base=start)
            mda.slots.append(self._values(rows))
        mda.header_checksum_ok = S.lvm_crc(raw[4:]) == h["checksum_xl"]
        mda.magic_ok = h["magic"] == S.MDA_MAGIC
        if not mda.magic_ok:
            self.note("error", "metadata_magic_invalid", f"metadata area {i} header has magic "
                      f"{h['magic']!r}, not {S.MDA_MAGIC!r}; its text is not read",
                      offset=start + 4, structure=f"{st}.magic", index=i)
            return mda
        if not mda.header_checksum_ok:
            self.note("error", "metadata_header_checksum_mismatch", f"metadata area {i} header "
                      f"checksum {h['checksum_xl']:#010x} does not match its bytes "
                      f"({S.lvm_crc(raw[4:]):#010x})", offset=start, structure=f"{st}.checksum_xl",
                      index=i)
        if h["version"] != S.MDA_VERSION:
            self.note("warning", "metadata_version_unknown", f"metadata area {i} header version "
                      f"{h['version']} is not 1", offset=start + 20, structure=f"{st}.version",
                      index=i)
        if h["start"] != start:
            self.note("error", "metadata_start_mismatch", f"metadata area {i} header says it "
                      f"starts at {h['start']:#x}, the PV header at {start:#x}",
                      offset=start + 24, structure=f"{st}.start", index=i)
        mda_size = h["size"]
        if mda_size != size:
            self.note("warning", "metadata_size_mismatch", f"metadata area {i} header size "
                      f"{mda_size} differs from the PV header's {size}; the header's is used",
                      offset=start + 32, structure=f"{st}.size", index=i)
        if mda_size < S.MDA_HEADER_SIZE:
            self.note("error", "metadata_size_invalid", f"metadata area {i} size {mda_size} is "
                      "smaller than its header", offset=start + 32, structure=f"{st}.size",
                      index=i)
            return mda
        self._read_text(mda, start, mda_size, st)
        return mda

    def _read_text(self, mda: MetadataArea, start: int, mda_size: int, st: str) -> None:
        i = mda.index
        slot = mda.slots[0]
        where = dict(offset=start + S.MDA_HEADER_FIXED_SIZE, structure=f"{st}.raw_locn[0]",
                     index=i)
        off, length = slot["offset"], slot["size"]
        if off == 0 and length == 0:
            self.note("info", "metadata_empty", f"metadata area {i} holds no metadata (a PV "
                      "in no volume group)", **where)
            return
        if slot["flags"] & S.RAW_LOCN_IGNORED:
            self.note("info", "metadata_area_ignored", f"metadata area {i} is marked ignored "
                      "(pvchange --metadataignore); its text is not used", **where)
            return
        if off < S.MDA_HEADER_SIZE or off >= mda_size or length > mda_size - S.MDA_HEADER_SIZE:
            self.note("error", "metadata_location_invalid", f"metadata area {i}: text at "
                      f"{off} (+{length}) lies outside the circular buffer "
                      f"[512, {mda_size})", **where)
            return
        limit = min(MAX_METADATA_TEXT, self.limits.max_table_bytes)
        if length > limit:
            self.note("error", "metadata_too_large", f"metadata area {i}: text of {length} "
                      f"bytes exceeds the limit of {limit} bytes; not read", **where)
            return
        if length == 0:
            self.note("error", "metadata_location_invalid", f"metadata area {i}: slot 0 has "
                      f"offset {off} but no text", **where)
            return
        first = min(length, mda_size - off)
        mda.wrapped = first < length
        part1 = self.reader.pread(start + off, first)
        part2 = self.reader.pread(start + S.MDA_HEADER_SIZE, length - first) if mda.wrapped else b""
        text = part1 + part2
        if len(text) < length:
            self.note("error", "metadata_truncated", f"metadata area {i}: text of {length} "
                      f"bytes is cut by the end of the device after {len(text)} bytes",
                      offset=start + off, structure=f"{st}.text", index=i)
        mda.text_bytes = text
        mda.text_checksum = S.lvm_crc(part2, S.lvm_crc(part1))
        mda.text_checksum_ok = mda.text_checksum == slot["checksum"] and len(text) == length
        if not mda.text_checksum_ok:
            self.note("error", "metadata_checksum_mismatch", f"metadata area {i}: text checksum "
                      f"{mda.text_checksum:#010x} does not match the recorded "
                      f"{slot['checksum']:#010x}", offset=start + S.MDA_HEADER_FIXED_SIZE + 16,
                      structure=f"{st}.raw_locn[0].checksum", index=i)
        nul = text.find(b"\0")
        if nul != len(text) - 1:
            self.note("warning", "metadata_not_terminated", f"metadata area {i}: text "
                      + ("has no terminating NUL" if nul < 0 else f"ends at a NUL at {nul} of "
                         f"{len(text)} bytes"), offset=start + off, structure=f"{st}.text",
                      index=i)
        body = text[:nul] if nul >= 0 else text
        warnings: list[str] = []
        try:
            tree = parse_metadata(body, warnings=warnings, path=self.path or None,
                                  offset=self.base_offset + start + off)
        except (MetadataSyntaxError, LimitExceeded) as exc:
            self.note("error", "metadata_syntax", f"metadata area {i}: {exc.message}",
                      offset=start + off, structure=f"{st}.text", index=i)
            return
        for w in warnings:
            self.note("warning", "metadata_text_warning", f"metadata area {i}: {w}",
                      offset=start + off, structure=f"{st}.text", index=i)
        mda.tree = tree
        mda.vg_name = next((k for k, v in tree.items() if isinstance(v, dict)), None)
        if mda.vg_name is None:
            self.note("error", "metadata_no_vg", f"metadata area {i}: the text holds no "
                      "volume group section", offset=start + off, structure=f"{st}.text", index=i)
            return
        seqno = tree[mda.vg_name].get("seqno")
        mda.seqno = seqno if isinstance(seqno, int) else None

    def _choose_metadata(self) -> None:
        usable = [m for m in self.metadata_areas if m.tree is not None and m.vg_name is not None]
        if not usable:
            return
        best = max(usable, key=lambda m: (m.text_checksum_ok, m.seqno or 0, -m.index))
        best.used = True
        for m in usable:
            if m is best:
                continue
            if (m.vg_name, m.seqno) != (best.vg_name, best.seqno):
                self.note("warning", "metadata_copies_disagree", f"metadata area {m.index} holds "
                          f"VG {m.vg_name!r} seqno {m.seqno}, area {best.index} VG "
                          f"{best.vg_name!r} seqno {best.seqno} (which is used)",
                          offset=m.offset, structure=f"lvm2.mda_header[{m.index}]", index=m.index)
            elif m.tree != best.tree:
                self.note("warning", "metadata_copies_differ", f"metadata areas {m.index} and "
                          f"{best.index} hold different text with the same seqno {m.seqno}",
                          offset=m.offset, structure=f"lvm2.mda_header[{m.index}]", index=m.index)
        self.metadata = best.tree
        body = best.text_bytes.split(b"\0", 1)[0]
        self.metadata_text = body.decode("utf-8", "replace")
        self.vg_name = best.vg_name
        self.vg = best.tree[best.vg_name]

    # ---- the volume group --------------------------------------------------------------
    def _vg_note(self, severity: str, code: str, message: str, **kw) -> None:
        self.note(severity, code, f"VG {self.vg_name!r}: {message}", structure="lvm2.metadata",
                  **kw)

    def _int(self, section: dict, key: str, what: str, *, minimum: int = 0,
             required: bool = True) -> int | None:
        value = section.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self._vg_note("error", "metadata_value_invalid", f"{what}: {key} = {value!r} is not "
                          f"an integer >= {minimum}")
            return None
        return value

    def _read_vg(self) -> None:
        vg = self.vg
        extent_size = self._int(vg, "extent_size", "volume group", minimum=1)
        if extent_size is not None and extent_size >= 1 << 32:
            self._vg_note("error", "metadata_value_invalid", f"extent_size {extent_size} sectors "
                          "does not fit lvm2's 32 bits")
            extent_size = None
        self.extent_bytes = (extent_size or 0) * S.SECTOR
        pvs = vg.get("physical_volumes")
        if not isinstance(pvs, dict) or not pvs:
            self._vg_note("error", "metadata_no_pvs", "no physical_volumes section")
            pvs = {}
        for name, pv in pvs.items():
            if isinstance(pv, dict) and isinstance(pv.get("id"), str) and \
                    S.unformat_uuid(pv["id"]) == self.pv_uuid_raw:
                self.pv_name = name
                break
        if self.pv_name is None:
            self._vg_note("error", "pv_not_in_metadata", f"this PV ({self.pv_uuid}) is not "
                          "listed in physical_volumes")
        else:
            self._check_this_pv(pvs[self.pv_name])
        lvs = vg.get("logical_volumes", {})
        if not isinstance(lvs, dict):
            self._vg_note("error", "metadata_value_invalid", "logical_volumes is no section")
            lvs = {}
        for lv_name, lv in lvs.items():
            if isinstance(lv, dict):
                self._read_lv(lv_name, lv)
        self._check_extents()

    def _check_this_pv(self, pv: dict) -> None:
        pe_start = self._int(pv, "pe_start", f"{self.pv_name}")
        pe_count = self._int(pv, "pe_count", f"{self.pv_name}")
        dev_size = self._int(pv, "dev_size", f"{self.pv_name}", required=False)
        data_start = self.data_areas[0][0] if self.data_areas else None
        if pe_start is not None and data_start is not None and pe_start * S.SECTOR != data_start:
            self._vg_note("warning", "pe_start_mismatch", f"{self.pv_name}.pe_start "
                          f"{pe_start} sectors differs from the data area offset "
                          f"{self.data_areas[0][0]} bytes in the PV header; the metadata's is used")
        if dev_size is not None and dev_size * S.SECTOR != self.device_size:
            self._vg_note("info", "dev_size_mismatch", f"{self.pv_name}.dev_size {dev_size} "
                          f"sectors differs from the PV header's {self.device_size} bytes")
        if None not in (pe_start, pe_count) and self.extent_bytes:
            end = pe_start * S.SECTOR + pe_count * self.extent_bytes
            if end > self.size:
                self._vg_note("error", "extents_beyond_device", f"{self.pv_name}: {pe_count} "
                              f"extents from sector {pe_start} end at {end}, past the end of the "
                              f"device ({self.size} bytes)")

    def _read_lv(self, name: str, lv: dict) -> None:
        count = self._int(lv, "segment_count", f"LV {name!r}", minimum=1)
        seg_names = [k for k, v in lv.items() if isinstance(v, dict) and k.startswith("segment")]
        if count is not None and count != len(seg_names):
            self._vg_note("error", "segment_count_mismatch", f"LV {name!r}: segment_count {count} "
                          f"but {len(seg_names)} segment sections")
        first = len(self.segments)
        for k in range(1, len(seg_names) + 1):
            seg = lv.get(f"segment{k}")
            if not isinstance(seg, dict):
                self._vg_note("error", "segment_missing", f"LV {name!r}: no section segment{k}")
                continue
            self._read_segment(name, k, seg)
        self.lv_segments[name] = self.segments[first:]
        self._check_lv_coverage(name)

    def _read_segment(self, lv: str, k: int, seg: dict) -> None:
        what = f"LV {lv!r} segment{k}"
        start = self._int(seg, "start_extent", what)
        count = self._int(seg, "extent_count", what, minimum=1)
        seg_type = seg.get("type") if isinstance(seg.get("type"), str) else "?"
        base_type = seg_type.split("+", 1)[0]
        stripe_count = seg.get("stripe_count", 1) if base_type in LINEAR_TYPES else 0
        make = lambda **kw: Segment(lv, k, start or 0, count or 0, seg_type,
                                    stripe_count if isinstance(stripe_count, int) else 0, **kw)
        if start is None or count is None:
            self.segments.append(make(valid=False, problem="start_extent/extent_count invalid"))
            return
        if base_type not in LINEAR_TYPES:
            self.segments.append(make(problem=f"segment type {seg_type!r}"))
            return
        stripe_count = self._int(seg, "stripe_count", what, minimum=1)
        stripes = seg.get("stripes")
        pairs = stripes if isinstance(stripes, list) else []
        ok = (stripe_count is not None and len(pairs) == 2 * stripe_count
              and all(isinstance(pairs[2 * j], str) and isinstance(pairs[2 * j + 1], int)
                      and not isinstance(pairs[2 * j + 1], bool) and pairs[2 * j + 1] >= 0
                      for j in range(stripe_count)))
        if not ok or count % stripe_count:
            self._vg_note("error", "segment_invalid", f"{what}: stripes {str(stripes)[:80]} do "
                          f"not give {stripe_count} (pv, extent) pairs dividing {count} extents")
            self.segments.append(make(valid=False, problem="stripes invalid"))
            return
        for j in range(stripe_count):
            self.segments.append(make(stripe=j, pv=pairs[2 * j], pv_start_extent=pairs[2 * j + 1]))

    def _check_lv_coverage(self, lv: str) -> None:
        rows = sorted({(s.start_extent, s.extent_count, s.segment)
                       for s in self.lv_segments[lv] if s.valid})
        pos = 0
        for start, count, k in rows:
            if start != pos:
                self._vg_note("warning", "lv_segments_gap", f"LV {lv!r}: segment{k} starts at "
                              f"extent {start}, the segments before it end at {pos}")
            pos = max(pos, start + count)

    def _check_extents(self) -> None:
        """Areas on this PV: inside [0, pe_count), inside the device, not overlapping."""
        pvs = self.vg.get("physical_volumes", {}) if self.vg else {}
        pv = pvs.get(self.pv_name) if isinstance(pvs, dict) and self.pv_name else None
        if not isinstance(pv, dict) or not self.extent_bytes:
            return
        pe_start, pe_count = pv.get("pe_start"), pv.get("pe_count")
        if not isinstance(pe_start, int) or not isinstance(pe_count, int):
            return
        here = [s for s in self.segments if s.valid and s.pv == self.pv_name]
        if not here:
            return
        first = np.array([s.pv_start_extent for s in here], dtype=object)
        length = np.array([s.extent_count // max(s.stripe_count, 1) for s in here], dtype=object)
        end = first + length
        for idx in np.flatnonzero(end > pe_count).tolist()[:20]:
            s = here[idx]
            self._vg_note("error", "segment_beyond_pv", f"LV {s.lv!r} segment{s.segment}: PV "
                          f"extents {s.pv_start_extent}..{int(end[idx]) - 1} lie beyond the "
                          f"{pe_count} extents of {self.pv_name}")
        byte_end = pe_start * S.SECTOR + end * self.extent_bytes
        for idx in np.flatnonzero(byte_end > self.size).tolist()[:20]:
            s = here[idx]
            self._vg_note("error", "segment_beyond_device", f"LV {s.lv!r} segment{s.segment} "
                          f"ends at byte {int(byte_end[idx])}, past the end of the device "
                          f"({self.size} bytes)")
        order = sorted(range(len(here)), key=lambda j: (first[j], end[j]))
        reach = None
        for j in order:
            if reach is not None and first[j] < reach[0]:
                a, b = here[reach[1]], here[j]
                self._vg_note("error", "extents_overlap", f"PV extent {first[j]} is used by LV "
                              f"{a.lv!r} segment{a.segment} and LV {b.lv!r} segment{b.segment}")
            if reach is None or end[j] > reach[0]:
                reach = (end[j], j)

    # ---- the model -----------------------------------------------------------------------
    @property
    def fields(self):
        from ..frames import fields_frame
        return fields_frame(self._field_rows)

    @property
    def findings(self):
        from ..frames import findings_frame
        return findings_frame(self._findings)

    @property
    def tables(self):
        from ..frames import TableDict
        return TableDict({"label": self._label_frame, "pv_header": self._pv_header_frame,
                          "data_areas": self._data_areas_frame,
                          "metadata_areas": self._metadata_areas_frame,
                          "volume_group": self._vg_frame, "physical_volumes": self._pvs_frame,
                          "logical_volumes": self._lvs_frame, "segments": self._segments_frame})

    def logical_volumes(self) -> list[str]:
        """Names of the LVs in the metadata, in metadata order."""
        lvs = self.vg.get("logical_volumes", {}) if self.vg else {}
        return [k for k, v in lvs.items() if isinstance(v, dict)] if isinstance(lvs, dict) else []

    def _label_frame(self):
        import pandas as pd
        lab = self.label
        return pd.DataFrame([{
            "sector": self.label_sector, "offset": self.base_offset + self.label_sector * S.SECTOR,
            "id": bytes(lab["id"]).decode("latin-1"), "sector_xl": lab["sector_xl"],
            "crc_xl": lab["crc_xl"], "crc_computed": self.label_crc,
            "crc_ok": lab["crc_xl"] == self.label_crc, "offset_xl": lab["offset_xl"],
            "type": bytes(lab["type"]).decode("latin-1")}])

    def _pv_header_frame(self):
        import pandas as pd
        ext = self.extension or {}
        return pd.DataFrame([{
            "pv_uuid": self.pv_uuid, "device_size": self.device_size,
            "data_areas": len(self.data_areas), "metadata_areas": len(self.metadata_locations),
            "extension_version": ext.get("version"), "extension_flags": ext.get("flags"),
            "in_use": bool(ext.get("flags", 0) & S.PV_EXT_USED) if ext else None,
            "bootloader_areas": len(self.bootloader_areas)}])

    def _data_areas_frame(self):
        import pandas as pd
        rows = [{"index": i, "offset": self.base_offset + off, "size": size,
                 "end": self.base_offset + (off + size if size else self.size)}
                for i, (off, size) in enumerate(self.data_areas)]
        return pd.DataFrame(rows, columns=["index", "offset", "size", "end"])

    def _metadata_areas_frame(self):
        import pandas as pd
        cols = ["index", "offset", "size", "magic_ok", "header_checksum_ok", "version",
                "header_start", "header_size", "text_offset", "text_size", "text_checksum",
                "text_checksum_computed", "text_checksum_ok", "flags", "ignored", "wrapped",
                "vg_name", "seqno", "used"]
        rows = []
        for m in self.metadata_areas:
            h, slot = m.header or {}, (m.slots[0] if m.slots else {})
            rows.append({"index": m.index, "offset": self.base_offset + m.offset, "size": m.size,
                         "magic_ok": m.magic_ok, "header_checksum_ok": m.header_checksum_ok,
                         "version": h.get("version"), "header_start": h.get("start"),
                         "header_size": h.get("size"), "text_offset": slot.get("offset"),
                         "text_size": slot.get("size"), "text_checksum": slot.get("checksum"),
                         "text_checksum_computed": m.text_checksum,
                         "text_checksum_ok": m.text_checksum_ok, "flags": slot.get("flags"),
                         "ignored": bool(slot.get("flags", 0) & S.RAW_LOCN_IGNORED),
                         "wrapped": m.wrapped, "vg_name": m.vg_name, "seqno": m.seqno,
                         "used": m.used})
        return pd.DataFrame(rows, columns=cols)

    def _vg_frame(self):
        import pandas as pd
        cols = ["name", "id", "seqno", "format", "status", "flags", "extent_size",
                "extent_bytes", "max_lv", "max_pv", "metadata_copies", "pv_count", "lv_count"]
        if self.vg is None:
            return pd.DataFrame(columns=cols)
        vg = self.vg
        pvs = vg.get("physical_volumes", {})
        return pd.DataFrame([{
            "name": self.vg_name, "id": vg.get("id"), "seqno": vg.get("seqno"),
            "format": vg.get("format"), "status": _joined(vg.get("status")),
            "flags": _joined(vg.get("flags")), "extent_size": vg.get("extent_size"),
            "extent_bytes": self.extent_bytes, "max_lv": vg.get("max_lv"),
            "max_pv": vg.get("max_pv"), "metadata_copies": vg.get("metadata_copies"),
            "pv_count": len(pvs) if isinstance(pvs, dict) else 0,
            "lv_count": len(self.logical_volumes())}], columns=cols)

    def _pvs_frame(self):
        """dev_size and pe_start in sectors, as the metadata holds them."""
        import pandas as pd
        cols = ["name", "id", "device", "dev_size", "pe_start", "pe_count", "status", "this_pv"]
        pvs = self.vg.get("physical_volumes", {}) if self.vg else {}
        rows = [{"name": name, "id": pv.get("id"), "device": pv.get("device"),
                 "dev_size": pv.get("dev_size"), "pe_start": pv.get("pe_start"),
                 "pe_count": pv.get("pe_count"), "status": _joined(pv.get("status")),
                 "this_pv": name == self.pv_name}
                for name, pv in (pvs.items() if isinstance(pvs, dict) else ())
                if isinstance(pv, dict)]
        return pd.DataFrame(rows, columns=cols)

    def _lvs_frame(self):
        import pandas as pd
        cols = ["name", "id", "status", "visible", "segment_count", "segment_types",
                "extent_count", "size"]
        lvs = self.vg.get("logical_volumes", {}) if self.vg else {}
        rows = []
        for name in self.logical_volumes():
            lv = lvs[name]
            segs = {s.segment: s for s in self.lv_segments.get(name, [])}
            extents = sum(s.extent_count for s in segs.values())
            status = lv.get("status") if isinstance(lv.get("status"), list) else []
            rows.append({"name": name, "id": lv.get("id"), "status": _joined(status),
                         "visible": "VISIBLE" in status, "segment_count": lv.get("segment_count"),
                         "segment_types": _joined(sorted({s.type for s in segs.values()})),
                         "extent_count": extents, "size": extents * self.extent_bytes})
        return pd.DataFrame(rows, columns=cols)

    def _segments_frame(self):
        """One row per stripe area; `offset` is where the area starts on the guest disk
        when it lies on this PV."""
        import pandas as pd
        cols = ["lv", "segment", "start_extent", "extent_count", "type", "stripe_count",
                "stripe", "pv", "pv_start_extent", "offset", "length"]
        start = self._pe_start_bytes()
        rows = []
        for s in self.segments:
            here = s.valid and s.pv is not None and s.pv == self.pv_name and start is not None
            area = s.extent_count // max(s.stripe_count, 1)
            rows.append({"lv": s.lv, "segment": s.segment, "start_extent": s.start_extent,
                         "extent_count": s.extent_count, "type": s.type,
                         "stripe_count": s.stripe_count, "stripe": s.stripe, "pv": s.pv,
                         "pv_start_extent": s.pv_start_extent,
                         "offset": (self.base_offset + start
                                    + s.pv_start_extent * self.extent_bytes) if here else None,
                         "length": area * self.extent_bytes if s.pv is not None else None})
        frame = pd.DataFrame(rows, columns=cols)
        for col in ("stripe", "pv_start_extent", "offset", "length"):
            try:
                frame[col] = pd.array(frame[col].tolist(), dtype="Int64")
            except (OverflowError, TypeError):
                pass            # a hostile value beyond 64 bits: the column stays Python ints
        return frame

    def _pe_start_bytes(self) -> int | None:
        pvs = self.vg.get("physical_volumes", {}) if self.vg else {}
        pv = pvs.get(self.pv_name) if isinstance(pvs, dict) and self.pv_name else None
        pe_start = pv.get("pe_start") if isinstance(pv, dict) else None
        if isinstance(pe_start, int) and pe_start >= 0:
            return pe_start * S.SECTOR
        return self.data_areas[0][0] if self.data_areas else None

    def to_dict(self) -> dict:
        """What ``--output=json`` prints: the PV, the parsed metadata, every table, findings."""
        tables = {name: _records(frame) for name, frame in self.tables.items()}
        return {"format": "lvm2", "path": self.path, "offset": self.base_offset,
                "label_sector": self.label_sector, "pv_uuid": self.pv_uuid,
                "vg_name": self.vg_name, "metadata": self.metadata, "tables": tables,
                "findings": _records(self.findings)}

    # ---- logical volumes --------------------------------------------------------------
    def open(self, lv_name: str):
        """A read-only, seekable file over a linear LV whose extents lie on this PV."""
        from ..io.spans import SpanReader
        structure = f"lvm2.logical_volumes.{lv_name}"
        if self.vg is None:
            raise self._error(ImageError, "the PV holds no readable volume group metadata",
                              structure="lvm2.metadata")
        if lv_name not in self.logical_volumes():
            names = ", ".join(self.logical_volumes()) or "none"
            raise self._error(ImageError, f"VG {self.vg_name!r} has no logical volume "
                              f"{lv_name!r} (it has: {names})", structure=structure)
        segs = self.lv_segments.get(lv_name, [])
        start = self._pe_start_bytes()
        if not self.extent_bytes or start is None:
            raise self._error(ImageError, f"LV {lv_name!r} cannot be mapped: the VG extent size "
                              "or the PV's pe_start is unusable", structure=structure)
        spans = []
        for s in segs:
            base_type = s.type.split("+", 1)[0]
            where = f"LV {self.vg_name}/{lv_name} segment{s.segment}"
            if not s.valid:
                raise self._error(ImageError, f"{where} cannot be mapped: {s.problem}",
                                  structure=structure)
            if base_type not in LINEAR_TYPES:
                raise self._error(Unsupported, f"{where} has segment type {s.type!r}; only "
                                  "linear (striped with one stripe) segments are read",
                                  structure=structure)
            if s.stripe_count != 1:
                raise self._error(Unsupported, f"{where} has segment type {s.type!r} with "
                                  f"{s.stripe_count} stripes; only linear (one stripe) segments "
                                  "are read",
                                  structure=structure)
            if s.pv != self.pv_name:
                pvs = self.vg.get("physical_volumes", {})
                other = pvs.get(s.pv) if isinstance(pvs, dict) else None
                pid = other.get("id") if isinstance(other, dict) else "unknown"
                raise self._error(ImageError, f"{where} lies on {s.pv} (id {pid}), not on this "
                                  f"PV ({self.pv_name or 'not in the metadata'}, id "
                                  f"{self.pv_uuid})", structure=structure)
            offset = start + s.pv_start_extent * self.extent_bytes
            length = s.extent_count * self.extent_bytes
            if offset + length > self.size:
                raise self._error(ImageError, f"{where}: extents {s.pv_start_extent}.."
                                  f"{s.pv_start_extent + s.extent_count - 1} end at byte "
                                  f"{offset + length}, past the end of the PV ({self.size} bytes)",
                                  offset=offset, structure=structure)
            spans.append((s.start_extent * self.extent_bytes, length, offset))
        spans.sort()
        for (a, n, _), (b, _, _) in zip(spans, spans[1:]):
            if a + n > b:
                raise self._error(ImageError, f"LV {lv_name!r}: segments overlap at LV byte {b}",
                                  structure=structure)
        size = sum(s.extent_count for s in segs) * self.extent_bytes
        return SpanReader(self.reader, spans, size, name=f"LV {self.vg_name}/{lv_name}")

    def __repr__(self) -> str:
        return (f"<PhysicalVolume {self.pv_uuid} VG {self.vg_name} "
                f"LVs {', '.join(self.logical_volumes()) or '-'}>")


def _joined(value) -> str | None:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return None if value is None else str(value)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    try:
        import pandas as pd
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    return str(value)


def _records(frame) -> list[dict]:
    return [{k: _plain(v) for k, v in row.items()}
            for row in frame.astype(object).to_dict("records")]


# ---- entry points ---------------------------------------------------------------------------


def read_physical_volume(reader, *, path: str = "", note: Callable | None = None,
                         base_offset: int = 0,
                         limits: Limits | None = None) -> PhysicalVolume | None:
    """The PV on `reader` (a disk or partition), or None when sectors 0..3 hold no
    LVM2 label.  Damage becomes findings (forwarded to `note`); only ImageErrors leave."""
    head = reader.pread(0, S.LABEL_SCAN_SIZE)
    sectors = [s for s in range(S.LABEL_SCAN_SECTORS)
               if head[s * S.SECTOR:s * S.SECTOR + len(S.LABEL_ID)] == S.LABEL_ID]
    if not sectors:
        return None
    pv = PhysicalVolume(reader, path=path, note=note, base_offset=base_offset, limits=limits)
    if all(len(head) < (s + 1) * S.SECTOR for s in sectors):
        pv.note("warning", "label_truncated", "an LVM2 label signature lies in a sector cut by "
                "the end of the device; no physical volume is read", offset=sectors[0] * S.SECTOR,
                structure="lvm2.label")
        return None
    pv._parse(head, sectors)
    return pv


def _partitions(image) -> list:
    """The guest disk's partitions, or [] while no partition reader is available."""
    try:
        table = image.partition_table()
    except ModuleNotFoundError as exc:
        if exc.name != "imgscope.guest.partitions":
            raise
        return []
    except ImageError as exc:
        image.note("warning", "lvm_partition_table_unreadable", f"partition table could not be "
                   f"read while looking for LVM2: {exc.message}", structure="lvm2")
        return []
    return list(getattr(table, "partitions", []) or [])


def find_lvm(image) -> PhysicalVolume:
    """The PV on the whole guest disk, else in the first partition that holds one."""
    path = str(image.path)
    pv = read_physical_volume(image.open_guest(), path=path, note=image.note,
                              limits=image.limits)
    if pv is not None:
        return pv
    looked = 0
    for part in _partitions(image):
        looked += 1
        pv = read_physical_volume(part.open(), path=path, note=image.note,
                                  base_offset=int(part.start), limits=image.limits)
        if pv is not None:
            pv.partition = part.number
            return pv
    raise ImageError(f"no LVM2 physical volume on the guest disk or in its {looked} "
                     "partition(s)", path=path, structure="lvm2")
