"""The VMDK text descriptor: a tolerant parser and qemu-img's canonical writer.

Pure Python, no I/O.  ``parse_descriptor`` never raises on bad content: whatever
does not fit the grammar becomes a ``(line_number, byte_offset, message)`` entry
of ``Descriptor.problems`` and parsing goes on with the next line.  Every entry
keeps its raw text, 1-based line number, host byte offset and byte length
(including the line terminator), so drivers can build fields/regions frames.

Grammar (lines are classified by content, never by section):

* blank lines; comments (``#`` after optional whitespace; section titles such as
  ``# Extent description`` and ``#DDB`` are comments);
* extent lines ``ACCESS SECTORS TYPE ["FILENAME" [OFFSET [EXTRA...]]]`` with ACCESS
  RW/RDONLY/NOACCESS (the filename is optional for ZERO);
* ``key = value`` settings, value quoted or bare, any spacing around ``=``; keys
  starting with ``ddb.`` form the disk database, the others the header.

``build_descriptor`` writes the exact text ``qemu-img create`` 7.2 writes.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from typing import Iterable

ACCESS_MODES = ("RW", "RDONLY", "NOACCESS")
EXTENT_TYPES = ("FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW", "SESPARSE")
CREATE_TYPES = (
    "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "2GbMaxExtentSparse",
    "twoGbMaxExtentFlat", "2GbMaxExtentFlat", "streamOptimized", "vmfs", "vmfsPreallocated",
    "vmfsEagerZeroedThick", "vmfsThin", "vmfsSparse", "seSparse", "vmfsRaw", "vmfsRDM",
    "vmfsRawDeviceMap", "vmfsRDMP", "vmfsPassthroughRawDeviceMap", "fullDevice",
    "partitionedDevice", "custom",
)
#: createTypes qemu-img 7.2 writes
QEMU_CREATE_TYPES = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                     "twoGbMaxExtentFlat", "streamOptimized")
HEADER_KEYS = ("version", "encoding", "CID", "parentCID", "isNativeSnapshot", "createType",
               "parentFileNameHint", "changeTrackPath")
NO_PARENT_CID = 0xFFFFFFFF
DEFAULT_ENCODING = "UTF-8"

_HEADER_KEYS_LOWER = {k.lower(): k for k in HEADER_KEYS}
_CREATE_TYPES_LOWER = {k.lower(): k for k in CREATE_TYPES}
_ENCODING_RE = re.compile(r'^\s*encoding\s*=\s*"?\s*([^"]*?)\s*"?\s*$')
_CID_RE = re.compile(r"[0-9a-fA-F]{1,8}")
_QEMU_HEX_RE = re.compile(r"[ \t\n\r\f\v]*([+-]?)(0[xX])?([0-9a-fA-F]+)")
_DIGITS_RE = re.compile(r"[0-9]+")
_ESCAPED_RE = re.compile("[\udc80-\udcff]")
_WS_RE = re.compile(r"\s")


# ---- data model -----------------------------------------------------------------------------
@dataclass
class DescriptorEntry:
    """A ``key = value`` setting (header or ``ddb.*``) or, in ``comments``, a
    comment line (key ``"#"``, value = the text after ``#``).

    ``value`` has surrounding whitespace and quotes removed; ``raw`` is the line as
    written (without its terminator); ``offset`` is the host byte offset of the line
    start and ``length`` its byte length including the terminator.
    """
    key: str
    value: str
    raw: str = ""
    line: int = 0
    offset: int = 0
    length: int = 0


@dataclass
class ExtentLine:
    """``ACCESS SECTORS TYPE ["FILENAME" [OFFSET [EXTRA...]]]``.

    ``access`` and ``type`` are upper-cased; ``sectors``/``offset`` are None when
    missing or not decimal; ``extra`` holds further fields (partition UUID, device
    id).  ``byte_offset``/``length`` place the line in the host file (terminator
    included); ``offset`` is the FLAT start sector inside the backing file/device.
    """
    access: str
    sectors: int | None
    type: str
    filename: str | None = None
    offset: int | None = None
    extra: tuple = ()
    raw: str = ""
    line: int = 0
    byte_offset: int = 0
    length: int = 0


@dataclass
class Descriptor:
    header: list = field(default_factory=list)      # DescriptorEntry, in file order
    extents: list = field(default_factory=list)     # ExtentLine, in file (= guest) order
    ddb: list = field(default_factory=list)         # DescriptorEntry for ddb.* keys
    comments: list = field(default_factory=list)    # DescriptorEntry(key="#")
    problems: list = field(default_factory=list)    # (line_number, byte_offset, message)
    codec: str = "utf-8"     # Python codec the text was decoded with
    size: int = 0            # bytes of descriptor text (up to the first NUL)
    base_offset: int = 0     # host offset of the first text byte

    def _find(self, key: str) -> DescriptorEntry | None:
        entries = self.ddb if key.lower().startswith("ddb.") else self.header
        for e in entries:
            if e.key == key:
                return e
        low = key.lower()
        for e in entries:
            if e.key.lower() == low:
                return e
        return None

    def entry(self, key: str) -> DescriptorEntry | None:
        """The first entry for `key` (exact match first, then case-insensitive)."""
        return self._find(key)

    def get(self, key: str, default=None):
        """The value of the first setting `key` (header or ``ddb.*``), else `default`."""
        e = self._find(key)
        return default if e is None else e.value

    @property
    def version(self) -> int | None:
        v = self.get("version")
        return int(v) if v is not None and _DIGITS_RE.fullmatch(v) else None

    @property
    def encoding(self) -> str | None:
        """The ``encoding`` value as written (None if absent: UTF-8 is implied)."""
        return self.get("encoding")

    @property
    def create_type(self) -> str | None:
        return self.get("createType")

    @property
    def cid(self) -> int | None:
        """``CID`` read like QEMU (sscanf %x): see ``parse_cid``."""
        return parse_cid(self.get("CID"))

    @property
    def parent_cid(self) -> int | None:
        return parse_cid(self.get("parentCID"))

    @property
    def parent_hint(self) -> str | None:
        return self.get("parentFileNameHint")

    @property
    def total_sectors(self) -> int:
        """Sum of the extent sizes (the virtual disk size in sectors)."""
        return sum(e.sectors or 0 for e in self.extents)


def parse_cid(value: str | None) -> int | None:
    """A CID/parentCID value as QEMU reads it with ``sscanf("%x")``.

    Leading whitespace, a sign and a ``0x`` prefix are accepted, the longest run of
    hex digits is taken, values wider than 32 bits are truncated (glibc strtoul
    semantics, saturating at 2**64-1); None when no hex digit follows.  QEMU
    locates the value with ``strstr`` on the whole text ("CID" may even match inside
    ``parentCID`` when that line comes first); this reads the key's own value.
    """
    if value is None:
        return None
    m = _QEMU_HEX_RE.match(value)
    if not m:
        return None
    v = min(int(m.group(3), 16), (1 << 64) - 1)
    if m.group(1) == "-":
        v = (-v) % (1 << 64)
    return v & 0xFFFFFFFF


# ---- parser ----------------------------------------------------------------------------------------
def _resolve_codec(name: str) -> tuple[str | None, str | None]:
    """Python codec for an ``encoding=`` value, or (None, why not)."""
    try:
        info = codecs.lookup(name)
    except Exception:
        return None, f"unknown encoding {name!r}"
    if not getattr(info, "_is_text_encoding", True) or "escape" in info.name \
            or info.name in ("idna", "punycode", "utf-7"):
        return None, f"encoding {name!r} is not a text encoding"
    sample = bytes(range(0x20, 0x7F)) + b"\t\r\n"
    try:
        ok = sample.decode(info.name) == sample.decode("ascii")
    except Exception:
        ok = False
    if not ok:
        return None, f"encoding {name!r} is not ASCII compatible"
    return info.name, None


def _to_bytes(data) -> tuple[bytes, bool]:
    if isinstance(data, str):
        try:
            return data.encode("utf-8", "surrogateescape"), True
        except UnicodeEncodeError:
            return data.encode("utf-8", "surrogatepass"), True
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"descriptor must be bytes or str, not {type(data).__name__}")
    return bytes(data), False


def _decode(raw: bytes, codec: str) -> tuple[str, bool]:
    """Decode one line; (text, clean)."""
    try:
        text = raw.decode(codec, "surrogateescape")
    except Exception:
        try:
            text = raw.decode(codec, "replace")
        except Exception:
            text = raw.decode("utf-8", "surrogateescape")
        return text, False
    return text, not _ESCAPED_RE.search(text)


def _tokens(text: str) -> tuple[list[tuple[str, bool]], bool]:
    """Split on whitespace; ``"..."`` is one token.  ([(token, quoted)], quotes_ok)."""
    out: list[tuple[str, bool]] = []
    i, n, ok = 0, len(text), True
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        if text[i] == '"':
            j = text.find('"', i + 1)
            if j < 0:
                out.append((text[i + 1:], True))
                ok = False
                break
            out.append((text[i + 1:j], True))
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace():
                j += 1
            out.append((text[i:j], False))
            i = j
    return out, ok


def _unquote(value: str) -> tuple[str, bool]:
    if value.startswith('"'):
        if len(value) >= 2 and value.endswith('"'):
            return value[1:-1], True
        return value[1:], False
    return value, True


def _parse_extent(text: str, raw: str, lineno: int, off: int, length: int,
                  problem) -> ExtentLine:
    toks, quotes_ok = _tokens(text)
    if not quotes_ok:
        problem("unterminated quote in extent line")
    access_tok = toks[0][0]
    access = access_tok.upper()
    if access_tok != access:
        problem(f"access mode {access_tok!r} is not upper case (VMware and QEMU compare exactly)")
    rest = toks[1:]
    sectors = None
    if rest:
        tok, _ = rest.pop(0)
        if _DIGITS_RE.fullmatch(tok):
            sectors = int(tok)
        else:
            problem(f"extent size {tok!r} is not a decimal sector count")
    else:
        problem("extent line without size")
    etype = ""
    if rest:
        tok, _ = rest.pop(0)
        etype = tok.upper()
        if etype not in EXTENT_TYPES:
            problem(f"unknown extent type {tok!r}")
        elif tok != etype:
            problem(f"extent type {tok!r} is not upper case (VMware and QEMU compare exactly)")
    else:
        problem("extent line without type")
    filename = None
    if rest:
        filename, quoted = rest.pop(0)
        if not quoted:
            problem(f"extent file name {filename!r} is not quoted")
    elif etype and etype != "ZERO":
        problem(f"{etype} extent without a file name")
    offset = None
    if rest:
        tok, quoted = rest[0]
        if not quoted and _DIGITS_RE.fullmatch(tok):
            offset = int(tok)
            rest.pop(0)
        else:
            problem(f"extent offset {tok!r} is not a decimal sector number")
    elif etype == "FLAT" and filename is not None:
        problem("FLAT extent without an offset (QEMU rejects the line)")
    extra = tuple(t for t, _ in rest)
    return ExtentLine(access, sectors, etype, filename, offset, extra, raw, lineno, off, length)


def parse_descriptor(data: bytes | str, base_offset: int = 0) -> Descriptor:
    """Parse descriptor text (a separate file or the embedded area of a KDMV extent).

    The text ends at the first NUL.  Bytes are decoded as UTF-8 with
    ``surrogateescape`` unless the ``encoding=`` setting names an ASCII-compatible
    Python codec (``windows-1252``, ``Shift_JIS``, ``GBK``...); a ``str`` is taken as
    already decoded (offsets are then those of its UTF-8 encoding).  Offsets
    reported are ``base_offset`` + the byte position in `data`.
    """
    raw, from_text = _to_bytes(data)
    nul = raw.find(b"\0")
    if nul >= 0:
        raw = raw[:nul]
    d = Descriptor(size=len(raw), base_offset=base_offset)

    # split into lines (byte positions), terminators LF or CRLF
    lines: list[tuple[int, bytes, int]] = []      # (start, content bytes, length with terminator)
    pos = 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        end = len(raw) if nl < 0 else nl + 1
        content = raw[pos:end]
        if content.endswith(b"\n"):
            content = content[:-1]
        if content.endswith(b"\r"):
            content = content[:-1]
        lines.append((pos, content, end - pos))
        pos = end

    codec = "utf-8"
    if not from_text:
        for i, (start, content, _) in enumerate(lines):
            m = _ENCODING_RE.match(content.decode("latin-1"))
            if m:
                name = m.group(1)
                resolved, why = _resolve_codec(name)
                if resolved is None:
                    d.problems.append((i + 1, base_offset + start, f"{why}; decoded as UTF-8"))
                else:
                    codec = resolved
                break
    d.codec = codec

    seen: dict[str, int] = {}
    first_setting: str | None = None
    for i, (start, content, length) in enumerate(lines):
        lineno, off = i + 1, base_offset + start

        def problem(msg: str, _l=lineno, _o=off) -> None:
            d.problems.append((_l, _o, msg))

        text, clean = _decode(content, codec)
        if i == 0 and text.startswith("\ufeff"):
            text = text[1:]
        if not clean:
            problem(f"bytes not valid in {codec}")
        s = text.strip()
        if not s:
            continue
        if s.startswith("#"):
            d.comments.append(DescriptorEntry("#", s[1:].strip(), text, lineno, off, length))
            continue
        first = s.split(None, 1)
        if len(first) == 2 and first[0].upper() in ACCESS_MODES:
            d.extents.append(_parse_extent(s, text, lineno, off, length, problem))
            if first_setting is None:
                first_setting = ""
            continue
        if "=" not in s:
            problem(f"unrecognised line {s[:60]!r}")
            continue
        key, _, value = s.partition("=")
        key, value = key.strip(), value.strip()
        value, quotes_ok = _unquote(value)
        if not quotes_ok:
            problem(f"unterminated quote in value of {key!r}")
        if not key:
            problem("setting without a key")
        elif _WS_RE.search(key):
            problem(f"key {key!r} contains whitespace")
        entry = DescriptorEntry(key, value, text, lineno, off, length)
        if first_setting is None:
            first_setting = key
        if key.lower().startswith("ddb."):
            d.ddb.append(entry)
        else:
            d.header.append(entry)
            canon = _HEADER_KEYS_LOWER.get(key.lower())
            if canon is not None and canon != key:
                problem(f"key {key!r} differs in case from {canon!r}")
            if canon in ("CID", "parentCID") and not _CID_RE.fullmatch(value):
                cid = parse_cid(value)
                how = "unreadable" if cid is None else f"read by QEMU as {cid:x}"
                problem(f"{canon} {value!r} is not 1-8 hex digits ({how})")
            if canon == "version" and value not in ("1", "2", "3"):
                problem(f"descriptor version {value!r} is not 1, 2 or 3")
            if canon == "createType" and value.lower() not in _CREATE_TYPES_LOWER:
                problem(f"unknown createType {value!r}")
        low = key.lower()
        if low in seen:
            problem(f"duplicate key {key!r} (first on line {seen[low]})")
        else:
            seen[low] = lineno

    end_off = base_offset + len(raw)
    if not raw.strip():
        d.problems.append((0, base_offset, "empty descriptor"))
        return d
    if d._find("version") is None:
        d.problems.append((0, end_off, "no version setting"))
    elif first_setting not in (None, "version"):
        d.problems.append((0, base_offset, "first setting is not 'version' "
                                           "(QEMU's probe would not recognise the text)"))
    if d._find("createType") is None:
        d.problems.append((0, end_off, "no createType setting"))
    if d._find("CID") is None:
        d.problems.append((0, end_off, "no CID setting"))
    if not d.extents:
        d.problems.append((0, end_off, "no extent lines"))
    return d


# ---- writer -------------------------------------------------------------------------------------------
def format_extent(extent) -> str:
    """One extent line (no terminator) from an ExtentLine or a tuple
    ``(access, sectors, type[, filename[, offset[, *extra]]])``."""
    if isinstance(extent, ExtentLine):
        access, sectors, etype = extent.access, extent.sectors, extent.type
        filename, offset, extra = extent.filename, extent.offset, tuple(extent.extra)
    else:
        t = tuple(extent)
        access, sectors, etype = t[0], t[1], t[2]
        filename = t[3] if len(t) > 3 else None
        offset = t[4] if len(t) > 4 else None
        extra = t[5:]
    parts = [str(access), str(int(sectors)), str(etype)]
    if filename is not None:
        parts.append(f'"{filename}"')
        if offset is not None:
            parts.append(str(int(offset)))
            parts.extend(str(x) for x in extra)
    return " ".join(parts)


def qemu_ddb(capacity_sectors: int, *, adapter_type: str = "ide", hw_version: str = "4",
             tools_version: str = "2147483647") -> dict[str, str]:
    """The disk database qemu-img 7.2 writes: heads 16 for ide, 255 otherwise,
    63 sectors, cylinders = size / (63 * heads * 512) rounded down and not capped."""
    heads = 16 if adapter_type == "ide" else 255
    return {
        "ddb.virtualHWVersion": str(hw_version),
        "ddb.geometry.cylinders": str(int(capacity_sectors) // (63 * heads)),
        "ddb.geometry.heads": str(heads),
        "ddb.geometry.sectors": "63",
        "ddb.adapterType": str(adapter_type),
        "ddb.toolsVersion": str(tools_version),
    }


def build_descriptor(create_type: str, extents: Iterable, *, cid: int,
                     parent_cid: int = NO_PARENT_CID, parent_hint: str | None = None,
                     ddb: dict) -> str:
    """Descriptor text in qemu-img 7.2's canonical template (byte for byte).

    `extents`: ExtentLine objects or ``(access, sectors, type, filename[, offset])``
    tuples (QEMU: ``RW n SPARSE "f"`` and ``RW n FLAT "f" 0``).  `ddb` maps keys (with
    or without the ``ddb.`` prefix) to values, written in order as ``key = "value"``
    (``qemu_ddb`` gives QEMU's).  CIDs are written as ``%x`` (no zero padding).  As in
    QEMU, ``parentFileNameHint`` follows createType with no blank line after it.
    The caller NUL-pads it when embedding (descriptorSize sectors).
    """
    parts = [
        "# Disk DescriptorFile\n",
        "version=1\n",
        f"CID={int(cid) & 0xFFFFFFFF:x}\n",
        f"parentCID={int(parent_cid) & 0xFFFFFFFF:x}\n",
        f'createType="{create_type}"\n',
    ]
    if parent_hint is not None:
        parts.append(f'parentFileNameHint="{parent_hint}"')
    parts.append("\n# Extent description\n")
    parts.extend(format_extent(e) + "\n" for e in extents)
    parts.append("\n# The Disk Data Base\n#DDB\n\n")
    for key, value in ddb.items():
        key = key if key.startswith("ddb.") else "ddb." + key
        parts.append(f'{key} = "{value}"\n')
    return "".join(parts)
