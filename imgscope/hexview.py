"""Annotated hex view: every byte of a structure named, coloured and explained.

The view does not interpret bytes on its own.  Header fields come from the model
(`image.fields`: offset, size, display value and the schema's spec sentence of
every field) and table entries from the table frames (an L1, BAT or grain
table entry is a field `l1[3]`, `bat[0]`, `grain_table[5]` with its decoded
columns); the few structures no frame covers are laid out with the schema's
own `field_layout` (VHDX log entry headers, MBR/GPT of a raw disk) or decoded
with the schema's masks (qcow2 L2 tables and refcount blocks, one table at a
time instead of the whole-image frames).

Everything read from a file is bounded: a dump shows at most `max_bytes`
(4 KiB by default, never more than HARD_MAX_BYTES) and says so in its title
when the structure is longer.  HTML escapes every string that comes from a
file; the text form replaces control characters so a hostile name cannot
drive the terminal.
"""
from __future__ import annotations

import html
import zlib
from dataclasses import dataclass, field as dc_field
from typing import Callable, Iterable

import numpy as np

from .errors import ImageError

DEFAULT_MAX_BYTES = 4096        # per dump unless asked otherwise
HARD_MAX_BYTES = 16 << 10       # whatever is asked (HTML: a span per field and line)
DEFAULT_RANGE_BYTES = 256       # --offset without --length
MAX_TEXT = 160                  # characters of a value or meaning kept per field

# light backgrounds: black text stays readable on each, and on white around them
PALETTE = ("#ffd8a8", "#b2f2bb", "#a5d8ff", "#ffc9c9", "#d0bfff", "#fff3bf", "#99e9f2",
           "#fcc2d7", "#c0eb75", "#e9ecef", "#ffe8cc", "#bac8ff", "#96f2d7", "#eebefa",
           "#ffec99", "#d3f9d8")


# ---- the two public records ------------------------------------------------------------
@dataclass
class Field:
    """One named byte range: where it is, what it holds and what the spec says it means."""

    name: str
    structure: str
    offset: int                 # absolute in the file
    size: int
    value: str = ""
    meaning: str = ""
    colour: str = ""

    @property
    def label(self) -> str:
        """`structure.field`; a table entry named after its table (`l1[3]`) stands alone."""
        if not self.structure or self.name.startswith(self.structure + "["):
            return self.name
        return f"{self.structure}.{self.name}"

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass
class HexDump:
    """Bytes of a file (or any buffer) with the fields that name them.

    Fields are kept in offset order; one that overlaps a field met before it is
    dropped, so every byte belongs to at most one field.
    """

    offset: int
    data: bytes
    fields: list = dc_field(default_factory=list)
    title: str = ""

    def __post_init__(self) -> None:
        self.data = bytes(self.data)
        self.offset = int(self.offset)
        n = len(self.data)
        owner = np.full(n, -1, np.int32)
        kept: list[Field] = []
        for f in sorted(self.fields, key=lambda f: f.offset):   # stable: equal offsets keep order
            lo, hi = max(0, f.offset - self.offset), min(n, f.end - self.offset)
            if f.size <= 0 or lo >= hi or (owner[lo:hi] >= 0).any():
                continue
            owner[lo:hi] = len(kept)
            kept.append(f)
        previous = ""
        for f in kept:
            if not f.colour:
                f.colour = _colour_for(f.label, previous)
            previous = f.colour
        self.fields = kept
        self._owner = owner

    # ---- html -------------------------------------------------------------------------
    def html(self) -> str:
        """A self-contained block: the title, a <pre> hex view, a legend table."""
        e = _attr
        out = [_CSS, "<div class='imgscope-hex'>"]
        if self.title:
            out.append(f"<div class='ih-title'>{e(self.title)}</div>")
        out.append("<pre>")
        titles = [e(f"{f.label} = {f.value} \u2014 {f.meaning}") for f in self.fields]
        digits = self._digits()
        for line_start, groups in self._lines(16):
            hex_parts = [f"<span class='ih-o'>{line_start:0{digits}x}</span>  "]
            ascii_parts = []
            for owner, start, sep, text, asc in groups:
                hex_parts.append(sep)
                if owner < 0:
                    hex_parts.append(text)
                    ascii_parts.append(e(asc))
                    continue
                f = self.fields[owner]
                style = f"background:{e(f.colour)}"
                hex_parts.append(f"<span class='ih-h' style='{style}' title='{titles[owner]}' "
                                 f"data-field='{e(f.label)}' data-offset='{f.offset}' "
                                 f"data-size='{f.size}' data-start='{start}'>{text}</span>")
                ascii_parts.append(f"<span class='ih-c' style='{style}'>{e(asc)}</span>")
            out.append("".join(hex_parts) + "  |" + "".join(ascii_parts) + "|\n")
        out.append("</pre>")
        if self.fields:
            out.append("<table class='ih-legend'><tr><th>offset</th><th>size</th><th>field</th>"
                       "<th>value</th><th>meaning</th></tr>")
            for f in self.fields:
                out.append(f"<tr><td>{f.offset:#x}</td><td>{f.size}</td>"
                           f"<td><span style='background:{e(f.colour)}'>{e(f.label)}</span></td>"
                           f"<td>{e(f.value)}</td><td>{e(f.meaning)}</td></tr>")
            out.append("</table>")
        out.append("</div>")
        return "".join(out)

    def _repr_html_(self) -> str:
        return self.html()

    # ---- text -------------------------------------------------------------------------
    def text(self, width: int = 16, colour: bool = False) -> str:
        """`hexdump -C` style lines, then a legend `offset  size  field = value  meaning`."""
        if not 1 <= width <= 256:
            raise ImageError(f"line width {width} must be between 1 and 256")
        digits = self._digits()
        ansi = [_ansi(f.colour) for f in self.fields] if colour else []
        lines = [_printable(self.title)] if self.title else []
        for line_start, groups in self._lines(width):
            hex_parts, ascii_parts = [], []
            for owner, _, sep, text, asc in groups:
                if colour and owner >= 0:
                    text, asc = ansi[owner] + text + _RESET, ansi[owner] + asc + _RESET
                hex_parts.append(sep + text)
                ascii_parts.append(asc)
            lines.append(f"{line_start:0{digits}x}  {''.join(hex_parts)}  |{''.join(ascii_parts)}|")
        lines.append(f"{self.offset + len(self.data):0{digits}x}")
        if self.fields:
            lines.append("")
            for i, f in enumerate(self.fields):
                label = _printable(f.label)
                if colour:
                    label = ansi[i] + label + _RESET
                lines.append(f"{f.offset:#0{digits + 2}x}  {f.size:>6}  {label} = "
                             f"{_printable(f.value)}  {_printable(f.meaning)}".rstrip())
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.text()

    def to_json(self) -> dict:
        """Plain data: the bytes as hex and every field (for scripts and the CLI)."""
        return {"title": self.title, "offset": self.offset, "length": len(self.data),
                "data": self.data.hex(),
                "fields": [{"label": f.label, "structure": f.structure, "name": f.name,
                            "offset": f.offset, "size": f.size, "value": f.value,
                            "meaning": f.meaning, "colour": f.colour} for f in self.fields]}

    # ---- layout shared by both forms ------------------------------------------------------
    def _digits(self) -> int:
        return max(8, len(f"{self.offset + len(self.data):x}"))

    def _lines(self, width: int):
        """Per line (aligned to `width`): its address and groups of consecutive columns with
        one owner (a field index, -1 for plain bytes and blanks), each group as
        (owner, address of its first column, separator before it, hex text, ascii text).

        Columns are separated by one space, two between groups of eight (`hexdump -C`);
        a separator inside a group belongs to the group's text, so a field's span is
        continuous.  Columns before the data are blanks, the last line stops at the end.
        """
        n = len(self.data)
        data, owner_of = self.data, self._owner
        end = self.offset + n
        for line_start in range(self.offset - self.offset % width, end, width):
            groups: list = []
            for col in range(width):
                addr = line_start + col
                i = addr - self.offset
                sep = "" if col == 0 else ("  " if col % 8 == 0 else " ")
                if i >= n:
                    # hexdump -C pads the hex columns of a short last line, not the ascii
                    groups.append([-1, addr, sep, "  ", ""])
                    continue
                inside = i >= 0
                owner = int(owner_of[i]) if inside else -1
                tok = f"{data[i]:02x}" if inside else "  "
                asc = (chr(data[i]) if 0x20 <= data[i] < 0x7F else ".") if inside else " "
                g = groups[-1] if groups else None
                if g is not None and g[0] == owner and (owner >= 0 or inside):
                    g[3] += sep + tok
                    g[4] += asc
                else:
                    groups.append([owner, addr, sep, tok, asc])
            yield line_start, groups


def _ascii(seg: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in seg)


def _attr(text) -> str:
    return html.escape(str(text), quote=True)


def _printable(text) -> str:
    """A string safe for a terminal: control and non-printable characters escaped."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short(text) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "\u2026"


def _colour_for(label: str, previous: str) -> str:
    """The same field gets the same colour every time; neighbours never share one."""
    k = zlib.crc32(label.encode("utf-8", "surrogateescape")) % len(PALETTE)
    if PALETTE[k] == previous:
        k = (k + 1) % len(PALETTE)
    return PALETTE[k]


_RESET = "\x1b[0m"


def _ansi(colour: str) -> str:
    """Black on the nearest xterm-256 background."""
    try:
        r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    except ValueError:
        return ""
    idx = 16 + 36 * round(r / 255 * 5) + 6 * round(g / 255 * 5) + round(b / 255 * 5)
    return f"\x1b[30;48;5;{idx}m"


_CSS = ("<style>.imgscope-hex{font-family:monospace;color:#000;background:#fff}"
        ".imgscope-hex pre{margin:2px 0;line-height:1.25}"
        ".imgscope-hex .ih-o{color:#666}.imgscope-hex .ih-title{font-weight:bold}"
        ".imgscope-hex .ih-legend td,.imgscope-hex .ih-legend th{padding:0 6px;text-align:left;"
        "vertical-align:top;font-size:90%}</style>")


# ---- building dumps ------------------------------------------------------------------
def dump(data: bytes, offset: int = 0, fields: Iterable = (), title: str = "") -> HexDump:
    """A dump of arbitrary bytes (a table entry, guest data) with optional fields."""
    data = bytes(data)
    if len(data) > HARD_MAX_BYTES:
        title = (title + " " if title else "") + f"(first {HARD_MAX_BYTES} of {len(data)} bytes)"
        data = data[:HARD_MAX_BYTES]
    return HexDump(int(offset), data, [_as_field(f) for f in fields], title)


def _as_field(f) -> Field:
    if isinstance(f, Field):
        return Field(f.name, f.structure, int(f.offset), int(f.size), f.value, f.meaning, f.colour)
    if isinstance(f, dict):
        return Field(**f)
    return Field(*f)


Provider = Callable[[int, int], list]     # (lo, hi) -> fields overlapping [lo, hi)


@dataclass
class _Target:
    """A byte range of one host file and where its field names come from."""

    title: str
    file: int
    start: int
    length: int
    providers: list


def structures(image) -> list[str]:
    """Names `annotate` accepts for this image (`structure_forms` adds `l2@OFFSET` ones)."""
    return list(_catalogue(image))


def structure_forms(image) -> list[str]:
    """The `NAME@OFFSET` forms `annotate` accepts for this image (a table at any offset)."""
    return [f"{name}@OFFSET" for (fmt, name) in _AT_FORMS if fmt == image.format]


def annotate(image, structure: str | None = None, *, offset: int | None = None,
             length: int | None = None, file: int = 0,
             max_bytes: int = DEFAULT_MAX_BYTES) -> HexDump:
    """A named structure of `image`, or the byte range [offset, offset + length) of its
    host file number `file`, with every field and table entry in view named.

    For a structure, `length` (or `max_bytes`) caps how much of it is shown.
    """
    max_bytes = max(1, min(int(max_bytes), HARD_MAX_BYTES))
    files = image.files()
    if structure is None and offset is None:
        names = structures(image)
        if names:
            structure = "header" if "header" in names else names[0]
        else:
            offset = 0
            length = 512 if length is None else length
    if structure is not None:
        target = _resolve(image, structure)
        if length is not None:
            max_bytes = max(1, min(int(length), HARD_MAX_BYTES))
    else:
        if not 0 <= file < len(files):
            raise ImageError(f"no host file number {file} (the image has {len(files)})",
                             path=str(image.path))
        offset = int(offset or 0)
        length = DEFAULT_RANGE_BYTES if length is None else int(length)
        if offset < 0 or length < 0:
            raise ImageError(f"offset {offset} and length {length} must not be negative",
                             path=str(image.path))
        name = files[file].path.name
        max_bytes = HARD_MAX_BYTES          # the range is what was asked for, up to the cap
        target = _Target(f"{name}: bytes {offset:#x}..{offset + length:#x}", file, offset,
                         length, _range_providers(image, file))
    return _render(image, target, max_bytes)


def _render(image, target: _Target, max_bytes: int) -> HexDump:
    src = image.files()[target.file]
    want = max(0, min(target.length, max_bytes))
    data = src.read_upto(target.start, want) if want else b""
    title = target.title
    if target.length > want:
        title += f" (first {want} of {target.length} bytes shown)"
    if len(data) < want:
        title += (f" (the file ends at {src.size:#x})" if target.start < src.size
                  else " (beyond the end of the file)")
    lo, hi = target.start, target.start + len(data)
    fields: list[Field] = []
    if hi > lo:
        for provider in target.providers:
            fields += provider(lo, hi)
    return HexDump(target.start, data, fields, title)


# ---- where names come from -------------------------------------------------------------
class _Model:
    """Frames of one image, built once per annotate() call and only when needed."""

    def __init__(self, image) -> None:
        self.image = image
        self._fields = None

    @property
    def fields(self):
        if self._fields is None:
            df = self.image.fields
            df = df[df["size"] > 0]
            derived = _DERIVED.get(self.image.format, ())
            if derived:
                df = df[~df["structure"].astype(str).isin(derived)]
            files = _row_files(self.image, df)
            self._fields = df.assign(_file=files).reset_index(drop=True)
        return self._fields

    def table(self, name: str):
        tables = self.image.tables
        return tables[name] if name in tables else None

    def value(self, structure: str, field: str, default=None):
        df = self.fields
        hit = df[(df["structure"].astype(str) == structure) & (df["field"] == field)]
        return hit["value"].iloc[0] if len(hit) else default


# rows that summarise other rows rather than describe bytes of their own
_DERIVED = {"vpc": ("size",)}


def _row_files(image, df) -> np.ndarray:
    """Host file number of every field row: a VMDK extent's rows (structure `extent[k] ...`)
    live in that extent's file, everything else in file 0."""
    extents = getattr(image, "extents_list", None)
    if not extents or not len(df):
        return np.zeros(len(df), np.int64)
    by_label = {getattr(e, "label", ""): max(0, int(getattr(e, "file_index", 0) or 0))
                for e in extents}
    names = df["structure"].astype(str)
    mapping = {s: by_label.get(s.split(" ", 1)[0], 0) for s in names.unique()}
    return names.map(mapping).to_numpy(np.int64)


def _rows_provider(model: _Model, file: int, structures_: Callable[[str], bool] | None = None
                   ) -> Provider:
    """Header fields of `image.fields` in one file (optionally only some structures)."""
    def provide(lo: int, hi: int) -> list:
        df = model.fields
        if not len(df):
            return []
        off = df["offset"].to_numpy(np.uint64)
        end = off + df["size"].to_numpy(np.uint64)      # a row wrapping past 2**64 is not shown
        mask = (df["_file"].to_numpy() == file) & (off < np.uint64(hi)) & (end > np.uint64(lo))
        sub = df[mask]
        out = []
        for r in sub.itertuples(index=False):       # bounded: fields overlapping the window
            s = str(r.structure)
            if structures_ is not None and not structures_(s):
                continue
            out.append(Field(str(r.field), s, int(r.offset), int(r.size), _short(r.display),
                             _short(r.description)))
        return out
    return provide


def _entries_provider(model: _Model, table: str, label: str, size: int, columns: list,
                      meaning: str, *, index: str = "index",
                      where: Callable | None = None) -> Provider:
    """Entries of a table frame as fields named `label[index]` with the decoded columns."""
    def provide(lo: int, hi: int) -> list:
        df = model.table(table)
        if df is None or not len(df) or "entry_offset" not in df:
            return []
        if where is not None:
            df = df[where(df)]
        off = df["entry_offset"].to_numpy(np.uint64)
        sub = df[(off < np.uint64(hi)) & (off + np.uint64(size) > np.uint64(lo))]
        out = []
        for r in sub.to_dict("records"):            # bounded by the window / entry size
            value = " ".join(f"{c}={_cell(r[c])}" for c in columns if c in r)
            out.append(Field(f"{label}[{int(r[index])}]", label, int(r["entry_offset"]), size,
                             _short(value), meaning))
        return out
    return provide


def _cell(v) -> str:
    """One decoded column of a table entry: small numbers in decimal, offsets in hex."""
    import pandas as pd
    if v is None or (pd.api.types.is_scalar(v) and not isinstance(v, (str, bytes))
                     and pd.isna(v)):
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        v = int(v)
        return f"{v:#x}" if v > 9 else str(v)
    return str(v)


def _span(df, size: int) -> tuple[int, int] | None:
    """(first byte, length) covered by a frame's entries."""
    if df is None or not len(df):
        return None
    off = df["entry_offset"].to_numpy(np.uint64)
    lo, hi = int(off.min()), int(off.max()) + size
    return lo, hi - lo


def _rows_span(model: _Model, match: Callable[[str], bool]) -> tuple[int, int, int] | None:
    """(file, first byte, length) of the field rows whose structure matches."""
    df = model.fields
    if not len(df):
        return None
    names = df["structure"].astype(str)
    hit = df[names.map(match).to_numpy(bool)]
    if not len(hit):
        return None
    lo = int(hit["offset"].min())
    hi = int((hit["offset"] + hit["size"]).max())
    return int(hit["_file"].iloc[0]), lo, hi - lo


def _range_providers(image, file: int) -> list:
    """Everything that can name bytes of host file `file`."""
    model = _Model(image)
    providers = [_rows_provider(model, file)]
    providers += _FORMAT_RANGE.get(image.format, lambda m, f: [])(model, file)
    return providers


# ---- per-format catalogues ---------------------------------------------------------------
def _catalogue(image) -> dict:
    """name -> () -> _Target for every structure this image has."""
    model = _Model(image)
    build = _FORMAT_CATALOGUE.get(image.format)
    return build(model) if build else {}


def _resolve(image, structure: str) -> _Target:
    name, at, where = structure.partition("@")
    if at:
        resolver = _AT_FORMS.get((image.format, name))
        if resolver is None:
            raise ImageError(f"no structure form {name}@OFFSET for {image.format}",
                             path=str(image.path))
        try:
            offset = int(where, 0)
        except ValueError:
            raise ImageError(f"bad offset {where!r} in {structure!r}",
                             path=str(image.path)) from None
        if offset < 0:
            raise ImageError(f"negative offset in {structure!r}", path=str(image.path))
        return resolver(_Model(image), offset)
    cat = _catalogue(image)
    if structure not in cat:
        have = ", ".join(cat) or "none"
        raise ImageError(f"no structure {structure!r} in this {image.format} image "
                         f"(have: {have})", path=str(image.path))
    return cat[structure]()


def _rows_target(model: _Model, title: str, match: Callable[[str], bool]) -> Callable | None:
    span = _rows_span(model, match)
    if span is None:
        return None
    file, lo, n = span
    name = model.image.files()[file].path.name
    return lambda: _Target(f"{name}: {title} at {lo:#x}, {n} bytes", file, lo, n,
                           [_rows_provider(model, file, match)])


def _table_target(model: _Model, title: str, table: str, size: int, providers: list,
                  where: Callable | None = None, file: int = 0) -> Callable | None:
    df = model.table(table)
    if df is not None and where is not None and len(df):
        df = df[where(df)]
    span = _span(df, size)
    if span is None:
        return None
    lo, n = span
    name = model.image.files()[file].path.name
    return lambda: _Target(f"{name}: {title} at {lo:#x}, {n} bytes ({n // size} entries)",
                           file, lo, n, providers)


def _add(cat: dict, name: str, maker) -> None:
    if maker is not None:
        cat[name] = maker


def _exact(*names: str) -> Callable[[str], bool]:
    return lambda s: s in names


def _prefix(*prefixes: str) -> Callable[[str], bool]:
    return lambda s: s.startswith(prefixes)


# ---- qcow2 ---------------------------------------------------------------------------------
_L1_MEANING = ("L1 entry: offset of an L2 table (bits 9-55, 0 = none); bit 63 COPIED "
               "(refcount exactly 1)")
_L2_MEANING = ("L2 entry: host offset of the cluster (bits 9-55); bit 0 reads as zeros, bit 62 "
               "compressed (then offset and sector count), bit 63 COPIED")
_L2_EXTENDED = ("; extended L2: the next 8 bytes are the subcluster bitmaps (allocated: "
                "low 32 bits, reads as zeros: high 32 bits)")
_REFT_MEANING = "refcount table entry: offset of a refcount block (0 = none)"
_REFB_MEANING = "refcount block entry: how many references the host cluster has"
_BMT_MEANING = ("bitmap table entry: offset of a cluster of bitmap data; 0 with bit 0 set = "
                "all ones, 0 = all zeros")


def _qcow2_l2_provider(model: _Model, table_offset: int | None = None) -> Provider:
    """L2 entries decoded with the schema's masks, one table at a time: the active and the
    snapshots' tables, or the table at `table_offset` when one is named."""
    image = model.image
    geo = getattr(image, "geometry", None)

    def tables() -> list[int]:
        if table_offset is not None:
            return [table_offset]
        from .schemas import qcow2 as S
        offs = []
        l1s = [image.l1()]
        for snap in getattr(image, "snapshots", []) or []:
            l1s.append(image.snapshot_l1(snap))
        for l1 in l1s:
            o = l1[:geo.l1_needed] & np.uint64(S.L1E_OFFSET_MASK)
            offs.append(o[o != 0])
        return np.unique(np.concatenate(offs)).tolist() if offs else []

    def provide(lo: int, hi: int) -> list:
        if geo is None:
            return []
        from .formats.qcow2.clusters import classify_standard
        from .model import KINDS
        esize = 16 if geo.extended_l2 else 8
        cs = geo.cluster_size
        offs = np.asarray(tables(), np.uint64)
        offs = offs[(offs < np.uint64(hi)) & (offs + np.uint64(cs) > np.uint64(lo))]
        out = []
        src = image.source
        for t in offs.tolist():                    # at most a few tables touch one window
            a, b = max(lo, t), min(hi, t + cs)
            first = (a - t) // esize
            last = -(-(b - t) // esize)
            raw = src.read_upto(t + first * esize, (last - first) * esize)
            n = len(raw) // esize
            if not n:
                continue
            arr = np.frombuffer(raw[:n * esize], ">u8").astype(np.uint64)
            e = arr[::2] if esize == 16 else arr
            kind, host, hlen = classify_standard(geo, e)
            for k in range(n):                      # bounded by the window
                i = first + k
                parts = [f"raw={int(e[k]):#018x}", f"type={KINDS[int(kind[k])]}"]
                if host[k] != np.uint64(0xFFFFFFFFFFFFFFFF):
                    parts.append(f"host_offset={int(host[k]):#x}")
                if hlen[k]:
                    parts.append(f"compressed_size={int(hlen[k])}")
                if int(e[k]) >> 63:
                    parts.append("copied")
                if esize == 16:
                    bitmap = int(arr[2 * k + 1])
                    parts.append(f"alloc_bitmap={bitmap & 0xFFFFFFFF:#010x} "
                                 f"zero_bitmap={bitmap >> 32:#010x}")
                out.append(Field(f"l2[{i}]", "l2", t + i * esize, esize, " ".join(parts),
                                 f"{_L2_MEANING}{_L2_EXTENDED if esize == 16 else ''} "
                                 f"(table at {t:#x})"))
        return out
    return provide


def _qcow2_refblock_provider(model: _Model, block_offset: int | None = None) -> Provider:
    """Refcount block entries decoded with the schema (any width), one block at a time:
    every block of the refcount table, or the block at `block_offset` when one is named."""
    image = model.image

    def blocks() -> list[tuple[int, int]]:
        """(block offset, its index in the refcount table or -1) of the blocks to consider."""
        df = model.table("refcount_table")
        off = (df["refblock_offset"].to_numpy(np.uint64) if df is not None
               else np.zeros(0, np.uint64))
        if block_offset is not None:
            hit = np.flatnonzero(off == np.uint64(block_offset))
            return [(block_offset, int(hit[0]) if hit.size else -1)]
        keep = np.flatnonzero(off)
        return list(zip(off[keep].tolist(), keep.tolist()))

    def provide(lo: int, hi: int) -> list:
        from .schemas import qcow2 as S
        order = model.value("header", "refcount_order", 4)
        cs = image.cluster_size or 0
        if order is None or order > 6 or not cs:
            return []
        bits = 1 << order
        per_block = cs * 8 // bits
        out = []
        width = max(1, bits // 8)                  # bytes per field
        per_field = max(1, 8 // bits)              # entries sharing one byte below 8 bits
        for off, k in blocks():
            if off >= hi or off + cs <= lo:
                continue
            # whole entries around the window
            a = off + (max(lo, off) - off) // width * width
            b = min(off + cs, off + -(-(min(hi, off + cs) - off) // width) * width)
            raw = image.source.read_upto(a, b - a)
            if not raw:
                continue
            counts = S.decode_refcounts(raw[:len(raw) // width * width], order)
            meaning = f"{_REFB_MEANING} (block at {off:#x})"
            for j in range(len(raw) // width):     # bounded by the window
                i = ((a - off) // width) * per_field + j * per_field
                vals = counts[j * per_field:(j + 1) * per_field]
                value = ",".join(str(int(v)) for v in vals)
                if per_field > 1:
                    value += f" (entries {i}..{i + per_field - 1}, low bits first)"
                if k >= 0:
                    cluster = k * per_block + i
                    value += f" (host cluster {cluster} at {cluster * cs:#x})"
                out.append(Field(f"refcount_block[{i}]", "refcount_block", a + j * width, width,
                                 value, meaning))
        return out
    return provide


def _qcow2_providers(model: _Model, file: int) -> list:
    if file != 0:
        return []
    return [_entries_provider(model, "l1", "l1", 8, ["l2_offset", "copied", "reserved"],
                              _L1_MEANING),
            _qcow2_l2_provider(model),
            _entries_provider(model, "refcount_table", "refcount_table", 8,
                              ["refblock_offset", "reserved"], _REFT_MEANING),
            _qcow2_refblock_provider(model),
            _entries_provider(model, "bitmap_tables", "bitmap_table", 8,
                              ["bitmap", "data_offset", "all_ones"], _BMT_MEANING)]


def _first_offset(model: _Model, table: str, column: str) -> int | None:
    """The first non-zero offset in a table's column (the entry worth showing), or None."""
    rows = model.table(table)
    if rows is None or not len(rows):
        return None
    offs = rows[column].to_numpy(np.uint64)
    offs = offs[offs != 0]
    return int(offs[0]) if offs.size else None


def _qcow2_catalogue(model: _Model) -> dict:
    image = model.image
    cat: dict = {}
    _add(cat, "header", _rows_target(model, "header", _exact("header")))
    _add(cat, "extensions", _rows_target(model, "header extensions", _prefix(
        "extension[", "end of extensions", "backing file name")))
    _add(cat, "l1", _table_target(model, "active L1 table", "l1", 8, _qcow2_providers(model, 0)))
    cs = image.cluster_size or 0
    first_l2 = _first_offset(model, "l1", "l2_offset") if cs else None
    if first_l2 is not None:
        cat["l2"] = lambda: _qcow2_l2_target(model, first_l2)
    _add(cat, "refcount_table", _table_target(model, "refcount table", "refcount_table", 8,
                                              _qcow2_providers(model, 0)))
    first_block = _first_offset(model, "refcount_table", "refblock_offset") if cs else None
    if first_block is not None:
        cat["refcount_block"] = lambda: _qcow2_refblock_target(model, first_block)
    _add(cat, "snapshot_table", _rows_target(model, "snapshot table", _prefix("snapshot[")))
    _add(cat, "bitmap_directory", _rows_target(model, "bitmap directory", _prefix("bitmap[")))
    _add(cat, "bitmap_table", _table_target(model, "bitmap tables", "bitmap_tables", 8,
                                            _qcow2_providers(model, 0)))
    _add(cat, "luks_header", _rows_target(model, "LUKS header", _prefix("LUKS ")))
    return cat


def _qcow2_l2_target(model: _Model, offset: int) -> _Target:
    image = model.image
    cs = image.cluster_size or 0
    if not cs or getattr(image, "geometry", None) is None:
        raise ImageError("this image has no readable geometry for L2 tables", path=str(image.path))
    if offset % 512:
        raise ImageError(f"L2 table offset {offset:#x} is not aligned", path=str(image.path))
    return _Target(f"{image.path.name}: L2 table at {offset:#x}, {cs} bytes", 0, offset, cs,
                   [_rows_provider(model, 0), _qcow2_l2_provider(model, offset)])


def _qcow2_refblock_target(model: _Model, offset: int) -> _Target:
    image = model.image
    cs = image.cluster_size or 0
    if not cs:
        raise ImageError("this image has no cluster size", path=str(image.path))
    return _Target(f"{image.path.name}: refcount block at {offset:#x}, {cs} bytes", 0, offset,
                   cs, [_rows_provider(model, 0), _qcow2_refblock_provider(model, offset)])


# ---- qcow (version 1) ----------------------------------------------------------------------
def _qcow_providers(model: _Model, file: int) -> list:
    if file != 0:
        return []
    return [_entries_provider(model, "l1", "l1", 8, ["l2_offset", "guest_offset"],
                              "L1 entry: offset of an L2 table (0 = none)"),
            _entries_provider(model, "l2", "l2", 8,
                              ["raw", "type", "host_offset", "compressed_size", "guest_offset"],
                              "L2 entry: host offset of the cluster (0 = unallocated); bit 63 "
                              "compressed (then sector count and offset)", index="l2_index")]


def _qcow_catalogue(model: _Model) -> dict:
    cat: dict = {}
    _add(cat, "header", _rows_target(model, "header", _exact("header", "backing file name")))
    providers = _qcow_providers(model, 0)
    _add(cat, "l1", _table_target(model, "L1 table", "l1", 8, providers))
    l2 = model.table("l2")
    if l2 is not None and len(l2):
        first = int(l2["l1_index"].iloc[0])
        _add(cat, "l2", _table_target(model, f"L2 table of L1 entry {first}", "l2", 8, providers,
                                      where=lambda df, f=first: (df["l1_index"] == f).to_numpy()))
    return cat


# ---- vmdk --------------------------------------------------------------------------------------
def _vmdk_extent(model: _Model, index: int):
    for ext in getattr(model.image, "extents_list", []) or []:
        if getattr(ext, "index", None) == index:
            return ext
    return None


def _vmdk_in_file(model: _Model, file: int) -> Callable:
    """Frame rows of the extents stored in host file `file`."""
    def where(df):
        extents = getattr(model.image, "extents_list", []) or []
        ok = {e.index for e in extents if getattr(e, "file_index", 0) == file}
        return df["extent"].isin(ok).to_numpy()
    return where


def _vmdk_gd_size(model: _Model, table: str) -> int:
    df = model.table(table)
    if df is None or not len(df):
        return 4
    ext = _vmdk_extent(model, int(df["extent"].iloc[0]))
    return 8 if getattr(ext, "kind", "") == "sesparse" else 4


def _vmdk_providers(model: _Model, file: int) -> list:
    where = _vmdk_in_file(model, file)
    gd = _vmdk_gd_size(model, "grain_directory")
    rgd = _vmdk_gd_size(model, "redundant_grain_directory")
    gt_size = 8 if gd == 8 else 4
    return [_entries_provider(model, "grain_directory", "grain_directory", gd, ["gt_offset"],
                              "grain directory entry: sector of a grain table (0 = none)",
                              where=where),
            _entries_provider(model, "redundant_grain_directory", "redundant_grain_directory",
                              rgd, ["gt_offset"], "redundant grain directory entry: sector of "
                              "a backup grain table", where=where),
            _entries_provider(model, "grain_tables", "grain_table", gt_size,
                              ["raw", "guest_offset", "gt_index"],
                              "grain table entry: sector of the grain (0 = unallocated, 1 = "
                              "zeroed grain)", where=where)]


def _vmdk_catalogue(model: _Model) -> dict:
    image = model.image
    cat: dict = {}
    df = model.fields
    names = [str(s) for s in df["structure"].astype(str).unique()] if len(df) else []
    headers = [s for s in names if (s == "header" or s.endswith(" header"))
               and not s.startswith("descriptor")]
    if headers:
        _add(cat, "header", _rows_target(model, headers[0], _exact(headers[0])))
    footers = [s for s in names if s == "footer" or s.endswith(" footer")]
    if footers:
        _add(cat, "footer", _rows_target(model, footers[0], _exact(footers[0])))
    desc = _vmdk_descriptor_target(model)
    _add(cat, "descriptor", desc)
    first = _vmdk_first_extent(model)
    if first is not None:
        ext, file = first
        providers = _vmdk_providers(model, file)
        in_ext = lambda df, k=ext.index: (df["extent"] == k).to_numpy()
        gd = _vmdk_gd_size(model, "grain_directory")
        _add(cat, "grain_directory", _table_target(model, f"{ext.label} grain directory",
                                                   "grain_directory", gd, providers, in_ext, file))
        _add(cat, "redundant_grain_directory", _table_target(
            model, f"{ext.label} redundant grain directory", "redundant_grain_directory",
            _vmdk_gd_size(model, "redundant_grain_directory"), providers, in_ext, file))
        gd_df = model.table("grain_directory")
        if gd_df is not None and len(gd_df):
            mine = gd_df[in_ext(gd_df) & (gd_df["gt_offset"].to_numpy(np.uint64) != 0)]
            if len(mine):
                g, lo = int(mine["index"].iloc[0]), int(mine["gt_offset"].iloc[0])
                n = int(getattr(ext, "per_table", 512)) * int(getattr(ext, "entry_bytes", 4))
                name = image.files()[file].path.name
                cat["grain_table"] = lambda: _Target(
                    f"{name}: {ext.label} grain table {g} at {lo:#x}, {n} bytes",
                    file, lo, n, providers)
    return cat


def _vmdk_first_extent(model: _Model):
    for ext in getattr(model.image, "extents_list", []) or []:
        if not getattr(ext, "flat", True) and getattr(ext, "source", None) is not None:
            return ext, max(0, int(getattr(ext, "file_index", 0)))
    return None


def _vmdk_descriptor_target(model: _Model):
    image = model.image
    match = _prefix("descriptor ")
    span = _rows_span(model, match)
    if span is None:
        return None
    if getattr(image, "direct", True):
        # embedded in a sparse extent: the area the header reserves for it
        off = model.value("header", "descriptorOffset") or 0
        size = model.value("header", "descriptorSize") or 0
        lo, n = (off * 512, size * 512) if off and size else span[1:]
    else:
        lo, n = 0, image.source.size
    name = image.path.name
    return lambda: _Target(f"{name}: descriptor at {lo:#x}, {n} bytes", 0, lo, n,
                           [_rows_provider(model, 0, match)])


def _vmdk_gt_at(model: _Model, offset: int) -> _Target:
    first = _vmdk_first_extent(model)
    if first is None:
        raise ImageError("this VMDK has no sparse extent", path=str(model.image.path))
    ext, file = first
    size = int(getattr(ext, "entry_bytes", 4))
    n = int(getattr(ext, "per_table", 512)) * size
    name = model.image.files()[file].path.name
    return _Target(f"{name}: grain table at {offset:#x}, {n} bytes", file, offset, n,
                   _vmdk_providers(model, file))


# ---- vdi / vpc / vhdx / cow / raw ---------------------------------------------------------------
def _vdi_providers(model: _Model, file: int) -> list:
    return [_entries_provider(model, "block_map", "block_map", 4, ["state", "host_offset"],
                              "block map entry: index of the block in the data area "
                              "(0xFFFFFFFF unallocated, 0xFFFFFFFE zero)")] if file == 0 else []


def _vdi_catalogue(model: _Model) -> dict:
    cat: dict = {}
    _add(cat, "header", _rows_target(model, "pre-header and header",
                                     _exact("pre_header", "header")))
    _add(cat, "block_map", _table_target(model, "block map", "block_map", 4,
                                         _vdi_providers(model, 0)))
    return cat


def _vpc_providers(model: _Model, file: int) -> list:
    return [_entries_provider(model, "bat", "bat", 4, ["allocated", "bitmap_offset",
                                                        "host_offset", "guest_offset"],
                              "BAT entry: sector of the block's sector bitmap, data after it "
                              "(0xFFFFFFFF = unallocated)")] if file == 0 else []


def _vpc_catalogue(model: _Model) -> dict:
    cat: dict = {}
    _add(cat, "footer", _rows_target(model, "footer", _exact("footer")))
    _add(cat, "footer_copy", _rows_target(model, "footer copy", _exact("footer_copy")))
    _add(cat, "dynamic_header", _rows_target(model, "dynamic disk header",
                                             _exact("dynamic_header")))
    _add(cat, "bat", _table_target(model, "Block Allocation Table", "bat", 4,
                                   _vpc_providers(model, 0)))
    return cat


_VHDX_FIXED = ("file_identifier", "header1", "header2")


def _vhdx_log_provider(model: _Model) -> Provider:
    """Log entry headers laid out by the schema, descriptors from the frame."""
    def provide(lo: int, hi: int) -> list:
        log = model.table("log")
        if log is None or not len(log):
            return []
        from .schemas import vhdx as X
        from .schemas._types import field_layout
        size = X.log_entry_header.sizeof()
        off = log["file_offset"].to_numpy(np.uint64)
        hit = np.flatnonzero((off < np.uint64(hi)) & (off + np.uint64(size) > np.uint64(lo)))
        out = []
        for k in hit[:64].tolist():               # a window holds at most a few entry headers
            at = int(off[k])
            raw = model.image.source.read_upto(at, size)
            if len(raw) < size:
                continue
            try:
                rows = field_layout(X.log_entry_header, raw, structure=f"log_entry[{k}]",
                                    base_offset=at)
            except Exception:                     # a damaged entry: its bytes stay plain
                continue
            out += [Field(r.field, r.structure, r.offset, r.size, _short(r.display),
                          _short(r.description)) for r in rows]
        return out
    return provide


def _vhdx_providers(model: _Model, file: int) -> list:
    if file != 0:
        return []
    return [_vhdx_log_provider(model),
            _entries_provider(model, "log_descriptors", "log_descriptor", 32,
                              ["kind", "target_offset", "length", "descriptor_sequence"],
                              "log descriptor: a 4 KiB sector to write ('desc') or a range to "
                              "zero ('zero') at target_offset when the log is replayed",
                              index="descriptor"),
            _entries_provider(model, "bat", "bat", 8, ["kind", "block", "state", "file_offset"],
                              "BAT entry: state in bits 0-2, file offset in MiB in bits 20-63")]


def _vhdx_catalogue(model: _Model) -> dict:
    image = model.image
    cat: dict = {}
    for name in _VHDX_FIXED:
        _add(cat, name, _rows_target(model, name, _exact(name)))
    for k in (1, 2):
        name = f"region_table{k}"
        _add(cat, name, _rows_target(model, name,
                                     lambda s, n=name: s == n or s.startswith(n + ".entry[")))
    _add(cat, "metadata", _rows_target(model, "metadata table",
                                       lambda s: s == "metadata_table"
                                       or s.startswith("metadata_table.entry[")))
    meta = model.table("metadata_table")
    if meta is not None and len(meta):
        items = set(meta["name"].astype(str))
        _add(cat, "metadata_items", _rows_target(model, "metadata items",
                                                 lambda s, i=frozenset(items): s in i))
    _add(cat, "bat", _table_target(model, "BAT", "bat", 8, _vhdx_providers(model, 0)))
    log = model.table("log")
    log_off = model.value("header1", "log_offset") or model.value("header2", "log_offset")
    log_len = model.value("header1", "log_length") or model.value("header2", "log_length")
    if log is not None and len(log):
        at, n = int(log["file_offset"].iloc[0]), int(log["entry_length"].iloc[0])
        cat["log"] = lambda: _Target(f"{image.path.name}: log entry 0 at {at:#x}, {n} bytes",
                                     0, at, n,
                                     [_rows_provider(model, 0)] + _vhdx_providers(model, 0))
    elif log_off and log_len:
        cat["log"] = lambda: _Target(f"{image.path.name}: log at {log_off:#x}, {log_len} bytes "
                                     "(no entries)", 0, log_off, log_len,
                                     [_rows_provider(model, 0)])
    return cat


def _cow_providers(model: _Model, file: int) -> list:
    image = model.image
    start = getattr(image, "bitmap_offset", None)
    nbytes = getattr(image, "bitmap_bytes", 0) or 0
    if file != 0 or start is None:
        return []

    def provide(lo: int, hi: int) -> list:
        a, b = max(lo, start), min(hi, start + nbytes)
        if a >= b:
            return []
        raw = image.source.read_upto(a, b - a)
        out = []
        for j, byte in enumerate(raw):            # bounded by the window
            k = a - start + j
            out.append(Field(f"bitmap[{k}]", "bitmap", a + j, 1,
                             f"{byte:08b} (sectors {8 * k}..{8 * k + 7})",
                             "allocation bitmap byte: a set bit means the sector is in this "
                             "file, clear = read from the backing file"))
        return out
    return [provide]


def _cow_catalogue(model: _Model) -> dict:
    image = model.image
    cat: dict = {}
    _add(cat, "header", _rows_target(model, "header", _exact("header")))
    start = getattr(image, "bitmap_offset", None)
    nbytes = getattr(image, "bitmap_bytes", 0) or 0
    if start is not None and nbytes:
        cat["bitmap"] = lambda: _Target(f"{image.path.name}: bitmap at {start:#x}, {nbytes} bytes",
                                        0, start, nbytes, _cow_providers(model, 0))
    return cat


def _raw_tables(model: _Model) -> dict:
    """MBR / GPT header of a raw disk, laid out with the schema (name -> (offset, rows))."""
    image = model.image
    cache = getattr(model, "_raw", None)
    if cache is not None:
        return cache
    from .schemas import mbr_gpt as M
    from .schemas._types import field_layout
    out: dict = {}
    head = image.source.read_upto(0, 2 * M.SECTOR)
    try:
        if len(head) >= M.MBR_SIZE and head[510:512] == M.BOOT_SIGNATURE:
            rows = field_layout(M.mbr, head[:M.MBR_SIZE], structure="mbr")
            fields = []
            for r in rows:
                if r.field != "partition_entries":
                    fields.append(r)
                    continue
                for k in range(M.MBR_N_ENTRIES):
                    at = M.MBR_ENTRIES_OFFSET + k * M.MBR_ENTRY_SIZE
                    fields += field_layout(M.mbr_entry, head[at:at + M.MBR_ENTRY_SIZE],
                                           structure=f"mbr.partition[{k}]", base_offset=at)
            out["mbr"] = (0, M.MBR_SIZE, fields)
        if len(head) >= M.SECTOR + M.GPT_HEADER_SIZE and \
                head[M.SECTOR:M.SECTOR + 8] == M.GPT_SIGNATURE:
            rows = field_layout(M.gpt_header, head[M.SECTOR:M.SECTOR + M.GPT_HEADER_SIZE],
                                structure="gpt_header", base_offset=M.SECTOR)
            out["gpt_header"] = (M.SECTOR, M.GPT_HEADER_SIZE, rows)
    except Exception:                              # not a partition table after all
        pass
    model._raw = out
    return out


def _raw_providers(model: _Model, file: int) -> list:
    if file != 0:
        return []

    def provide(lo: int, hi: int) -> list:
        out = []
        for _, _, rows in _raw_tables(model).values():
            out += [Field(r.field, r.structure, r.offset, r.size, _short(r.display),
                          _short(r.description)) for r in rows
                    if r.size and r.offset < hi and r.offset + r.size > lo]
        return out
    return [provide]


def _raw_catalogue(model: _Model) -> dict:
    image = model.image
    cat: dict = {}
    for name, (at, n, _) in _raw_tables(model).items():
        cat[name] = lambda name=name, at=at, n=n: _Target(
            f"{image.path.name}: {name} at {at:#x}, {n} bytes", 0, at, n,
            _raw_providers(model, 0))
    return cat


_FORMAT_CATALOGUE = {"qcow2": _qcow2_catalogue, "qcow": _qcow_catalogue, "vmdk": _vmdk_catalogue,
                     "vdi": _vdi_catalogue, "vpc": _vpc_catalogue, "vhdx": _vhdx_catalogue,
                     "cow": _cow_catalogue, "raw": _raw_catalogue}
_FORMAT_RANGE = {"qcow2": _qcow2_providers, "qcow": _qcow_providers, "vmdk": _vmdk_providers,
                 "vdi": _vdi_providers, "vpc": _vpc_providers, "vhdx": _vhdx_providers,
                 "cow": _cow_providers, "raw": _raw_providers}
_AT_FORMS = {("qcow2", "l2"): _qcow2_l2_target,
             ("qcow2", "refcount_block"): _qcow2_refblock_target,
             ("vmdk", "grain_table"): _vmdk_gt_at}
