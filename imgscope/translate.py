"""Address translation: follow one guest offset through a format's tables to the host byte.

`translate(image, guest_offset)` returns the Steps a reader takes: qcow2 L1 entry ->
L2 entry (extended L2: the subcluster's bits) -> cluster; qcow v1 likewise; VMDK
extent line -> grain directory entry -> grain table entry -> grain; VDI block map
entry -> block; VHD BAT entry -> sector bitmap -> sector; VHDX BAT entry (and the
sector bitmap entry of a partially present block) -> block; cow: the bitmap bit;
raw: the identity.  Each Step carries the bytes read there, so a notebook can show
them in the hex view.  An unallocated range continues in the backing file.

Values come from the tables the driver already parsed and validated (header
values, L1 arrays, grain directories, block maps, BATs); the entry bytes are read
again from the host file, through the image's Source (or the replayed VHDX view),
only ever a few bytes at a time, never written.  What cannot be read (an entry or
a cluster beyond the end of the file, a table the driver refused) becomes a Step
that says so and ends the walk the way the guest reader ends it: with zeros.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ImageError

#: guest bytes the last Step shows (clipped to the mapping unit and the disk end)
SHOW_BYTES = 64
#: largest compressed stream read to show one compressed cluster or grain
MAX_COMPRESSED_BYTES = 8 << 20


@dataclass
class Step:
    """One read on the way from a guest offset to its host byte."""

    title: str               # "L1 entry 3"
    structure: str           # "L1 table"
    file: str                # host file the bytes were read from
    host_offset: int | None  # where in `file` (None: nothing stored there)
    size: int                # bytes this structure occupies at host_offset
    raw: bytes               # the bytes read at this step (guest bytes in the last step)
    value: Any               # decoded value
    note: str                # what the value means / what happens next
    kind: str = ""           # last step: data, zero, unallocated, compressed or encrypted
    depth: int = 0           # chain layer read (0 = the image itself)
    guest_offset: int | None = None

    @property
    def final(self) -> bool:
        return bool(self.kind)

    def hexdump(self):
        """The bytes of this step as an annotated hex view (imgscope.hexview.HexDump)."""
        from .hexview import Field, dump
        base = self.host_offset or 0
        fields = [Field(self.title, self.structure, base, len(self.raw), _short_value(self.value),
                        self.note)] if self.raw else []
        where = f" at {_hex(self.host_offset)}" if self.host_offset is not None else ""
        return dump(self.raw, base, fields, f"{self.title}{where}")

    def _repr_html_(self) -> str:
        return self.hexdump().html()


@dataclass
class _Outcome:
    """How one layer resolves the offset (internal)."""

    kind: str                         # data, zero, unallocated, compressed, encrypted
    span: int                         # bytes from the offset that share this mapping
    source: Any = None                # Source holding the data (data, encrypted)
    host: int | None = None           # host byte of the guest offset (data, zero+offset)
    note: str = ""
    # compressed clusters / grains
    stored_offset: int = 0
    stored_length: int = 0
    codec: str = "none"
    unit: int = 0                     # bytes a compressed unit decodes to
    inner: int = 0                    # offset of the guest byte inside the decoded unit
    record: bool = False              # VMDK stream record: length in a 12-byte header
    extra: dict = field(default_factory=dict)


# ---- small helpers ------------------------------------------------------------------------
def _short_value(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value} ({value:#x})"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short_value(v)}" for k, v in value.items())
    return "" if value is None else str(value)


def _hex(n: int | None) -> str:
    return "-" if n is None else f"{int(n):#x}"


def _path(src) -> str:
    return str(getattr(src, "path", "")) if src is not None else ""


def _read(src, offset: int, size: int) -> tuple[bytes, str]:
    """Up to `size` bytes at `offset` and, when the file does not hold them all, why."""
    if offset < 0 or size <= 0:
        return b"", ""
    try:
        data = src.read_upto(offset, size)
    except ImageError as exc:
        return b"", f"cannot be read: {exc.message}"
    if len(data) < size:
        end = getattr(src, "size", 0)
        if not data:
            return b"", f"lies beyond the end of the file ({end} bytes)"
        return data, f"is cut by the end of the file ({end} bytes)"
    return data, ""


def _beyond(src, offset: int, size: int) -> bool:
    return offset + size > getattr(src, "size", 0)


def _hole_run(src, host: int) -> tuple[bool, int]:
    """(is this host byte in a hole of a sparse host file, bytes to the next data/hole
    boundary); a file without holes is one data run."""
    size = getattr(src, "size", 0)
    if getattr(src, "allocated", size) >= size or not hasattr(src, "data_runs"):
        return False, max(1, size - host)
    runs = src.data_runs()
    if not runs:
        return True, max(1, size - host)
    starts = np.fromiter((r[0] for r in runs), np.int64, len(runs))
    i = int(np.searchsorted(starts, host, side="right")) - 1
    if i >= 0 and host < runs[i][0] + runs[i][1]:
        return False, runs[i][0] + runs[i][1] - host
    nxt = runs[i + 1][0] if i + 1 < len(runs) else size
    return True, max(1, nxt - host)


def _in_hole(src, host: int) -> bool:
    return _hole_run(src, host)[0]


def _field_row(image, structure: str, name: str):
    for r in image._field_rows:
        if r.structure == structure and r.field == name:
            return r
    return None


def _field_step(image, structure: str, name: str, title: str, note: str, depth: int) -> Step | None:
    """A header field as a Step (its bytes and decoded value from image.fields)."""
    r = _field_row(image, structure, name)
    if r is None:
        return None
    return Step(title, f"{structure}.{name}", str(image.path), int(r.offset), int(r.size),
                bytes(r.raw), r.value, note, depth=depth)


def _unit_span(g: int, unit: int) -> int:
    return unit - g % unit if unit > 0 else SHOW_BYTES


# ---- the public entry point -------------------------------------------------------------------
def translate(image, guest_offset: int, *, show: int = SHOW_BYTES) -> list[Step]:
    """The Steps that map `guest_offset` to its host byte, through the whole backing chain.

    The last Step's `kind` says what the guest reads there (data, zero, unallocated,
    compressed, encrypted), its `raw` holds the first guest bytes from that offset (as
    image.open_guest() reads them, up to the end of the mapping unit) and, for data,
    `host_offset` is the byte in `file` that holds the guest byte.
    """
    g = int(guest_offset)
    if not 0 <= g < image.virtual_size:
        raise ImageError(f"guest offset {g} is outside the disk (0 to {image.virtual_size - 1})",
                         path=str(image.path), structure="guest offset")
    steps: list[Step] = []
    layer, depth = image, 0
    room = max(1, int(show))
    while True:
        walker = _WALKERS.get(_format_of(layer), _walk_generic)
        try:
            outcome = walker(layer, g, depth, steps)
        except ImageError as exc:     # a table the driver could not give us: say so, stop
            steps.append(Step("cannot translate", exc.structure or "image", str(layer.path),
                              exc.offset, 0, b"", None, f"{exc.message}; the guest reader "
                              "cannot map this offset either", kind="unallocated", depth=depth,
                              guest_offset=g))
            return steps
        room = max(1, min(room, outcome.span, layer.virtual_size - g))
        parent = layer.backing
        if outcome.kind == "unallocated" and parent is not None:
            name = layer.backing_name or parent.path.name
            if g >= parent.virtual_size:
                steps.append(Step(f"backing file {name}", "backing file", str(parent.path), None,
                                  0, bytes(room), parent.format,
                                  f"unallocated here, and the backing file ({parent.virtual_size} "
                                  "bytes) ends before this offset: the guest reads zeros",
                                  kind="unallocated", depth=depth, guest_offset=g))
                return steps
            steps.append(Step(f"backing file {name}", "backing file", str(parent.path), None, 0,
                              b"", parent.format, f"unallocated in {layer.path.name}: the "
                              f"{parent.format} backing file {name} supplies guest offset "
                              f"{_hex(g)}", depth=depth + 1, guest_offset=g))
            layer, depth = parent, depth + 1
            continue
        steps += _final_steps(layer, g, depth, outcome, room)
        return steps


def _format_of(layer) -> str:
    return getattr(layer, "format", "raw")


def _final_steps(layer, g: int, depth: int, o: _Outcome, n: int) -> list[Step]:
    """The last Step(s): the guest bytes and where they come from."""
    path = _path(o.source) or str(layer.path)
    if o.kind in ("zero", "unallocated"):
        where = (f" (host offset {_hex(o.host)} keeps the allocation)"
                 if o.host is not None and o.extra.get("allocated") else "")
        return [Step("guest data (zeros)", "zeros", path, o.host, 0, bytes(n), 0,
                     (o.note or ("reads as zeros" if o.kind == "zero" else
                                 "unallocated, no backing file: reads as zeros")) + where,
                     kind=o.kind, depth=depth, guest_offset=g)]
    if o.kind in ("data", "encrypted"):
        if o.source is None:
            return [Step("guest data", "data", path, o.host, n, b"", None, "the data lives in a "
                         "file that could not be opened: the guest reader fails here",
                         kind=o.kind, depth=depth, guest_offset=g)]
        data, problem = _read(o.source, o.host, n)
        note = o.note or (f"guest offset {_hex(g)} is host byte {_hex(o.host)} of "
                          f"{o.source.path.name}")
        if problem:
            note += f"; the host range {problem}: the missing bytes read as zeros"
            data = data + bytes(n - len(data))
        elif _in_hole(o.source, o.host):
            note += " (a hole of the host file, never written: zeros)"
        if o.kind == "encrypted":
            note += "; encrypted: these bytes are ciphertext"
        return [Step("guest data", "data", path, o.host, n, data, o.host, note, kind=o.kind,
                     depth=depth, guest_offset=g)]
    # compressed: the stored stream, then the decoded unit
    src = o.source
    out = []
    length = o.stored_length
    start = o.stored_offset
    if o.record:
        head, problem = _read(src, start, 12)
        if problem or len(head) < 12:
            return [Step("grain record", "grain record", path, start, 12, head, None,
                         f"the grain record header {problem or 'is short'}: the guest reader "
                         "fails here", kind="compressed", depth=depth, guest_offset=g)]
        from .schemas import vmdk as V
        rec = V.grain_record_header.parse(head)
        out.append(Step("grain record header", "grain record", path, start, 12, head,
                        {"lba": rec.lba, "size": rec.size},
                        f"compressed grain of {rec.size} bytes for extent sector {rec.lba}",
                        depth=depth, guest_offset=g))
        start, length = start + 12, rec.size
    if length > MAX_COMPRESSED_BYTES:
        out.append(Step("compressed data", "compressed cluster", path, start, length, b"", length,
                        f"a stored length of {length} bytes is implausible for a "
                        f"{o.unit}-byte unit: not read", kind="compressed", depth=depth,
                        guest_offset=g))
        return out
    stored, problem = _read(src, start, length)
    note = (f"{length} stored bytes at {_hex(start)} hold the {o.codec} stream of one "
            f"{o.unit}-byte unit")
    if problem:
        note += f"; the stored range {problem}"
    out.append(Step("compressed data", "compressed cluster", path, start, length,
                    stored[:SHOW_BYTES], {"offset": start, "stored_bytes": length,
                                          "codec": o.codec}, note, depth=depth, guest_offset=g))
    from .io.codecs import decompress
    try:
        unit = decompress(stored, o.codec, o.unit, path=path, offset=start,
                          min_size=o.inner + n)
    except ImageError as exc:
        out.append(Step("decompressed unit", "decompressed cluster", path, None, 0, b"", None,
                        f"{exc.message}: the guest reader fails here", kind="compressed",
                        depth=depth, guest_offset=g))
        return out
    piece = unit[o.inner:o.inner + n]
    out.append(Step("guest data (decompressed)", "decompressed cluster", path, None, len(piece),
                    piece, o.inner, f"byte {o.inner} of the decompressed {o.unit}-byte unit is "
                    f"guest offset {_hex(g)}", kind="compressed", depth=depth, guest_offset=g))
    return out


# ---- qcow2 -----------------------------------------------------------------------------------
def _l2_entry_text(e: int, compressed: bool, zero: bool, copied: bool, off: int) -> str:
    bits = [f"raw {e:#018x}"]
    if compressed:
        bits.append("compressed")
    else:
        bits.append(f"offset {_hex(off)}")
        if zero:
            bits.append("ZERO flag")
    if copied:
        bits.append("COPIED")
    return ", ".join(bits)


def _walk_qcow2(img, g: int, depth: int, steps: list[Step]) -> _Outcome:
    from .formats.qcow2.clusters import classify_standard
    from .schemas import qcow2 as S
    geo = img.geometry
    cs, l2e = geo.cluster_size, geo.l2_entries
    src = img.source
    path = str(img.path)
    snap = getattr(img, "snap", None)
    if snap is not None:      # a snapshot view: the snapshot's L1 table
        owner = img.parent_image
        l1, l1_off = owner.snapshot_l1(snap), snap["l1_table_offset"]
        l1_name = f"snapshot {snap['name']!r} L1 table"
    else:
        l1, l1_off = img.l1(), img.header.values["l1_table_offset"]
        l1_name = "L1 table"
    i, j = g // (cs * l2e), (g // cs) % l2e
    at = l1_off + 8 * i
    if i >= l1.size:
        raw, _ = _read(src, at, 8)
        steps.append(Step(f"L1 entry {i}", l1_name, path, at, 8, raw, None,
                          f"the {l1_name} has {l1.size} readable entries: no L2 table, the cluster "
                          "is unallocated", depth=depth, guest_offset=g))
        return _Outcome("unallocated", _unit_span(g, cs * l2e))
    e = int(l1[i])
    raw, _ = _read(src, at, 8)
    l2_off = e & S.L1E_OFFSET_MASK
    head = f"guest {_hex(g)} is in L1 entry {i} (each covers {cs * l2e} bytes): "
    if l2_off == 0:
        steps.append(Step(f"L1 entry {i}", l1_name, path, at, 8, raw, e,
                          head + "no L2 table: the cluster is unallocated", depth=depth,
                          guest_offset=g))
        return _Outcome("unallocated", _unit_span(g, cs * l2e))
    if l2_off % cs:
        steps.append(Step(f"L1 entry {i}", l1_name, path, at, 8, raw, e,
                          head + f"L2 table at {_hex(l2_off)} is not cluster aligned: it is not "
                          "read, the cluster counts as unallocated", depth=depth, guest_offset=g))
        return _Outcome("unallocated", _unit_span(g, cs * l2e))
    if _beyond(src, l2_off, cs):
        steps.append(Step(f"L1 entry {i}", l1_name, path, at, 8, raw, e,
                          head + f"L2 table at {_hex(l2_off)} lies beyond the end of the file "
                          f"({src.size} bytes): it is not read, the cluster counts as unallocated",
                          depth=depth, guest_offset=g))
        return _Outcome("unallocated", _unit_span(g, cs * l2e))
    reserved = e & S.L1E_RESERVED_MASK
    steps.append(Step(f"L1 entry {i}", l1_name, path, at, 8, raw, e,
                      head + f"L2 table at {_hex(l2_off)}"
                      + (", COPIED" if e >> 63 else "")
                      + (f"; reserved bits {reserved:#x} are set" if reserved else ""),
                      depth=depth, guest_offset=g))
    esize = 16 if geo.extended_l2 else 8
    at2 = l2_off + esize * j
    raw2 = src.read(at2, esize, "L2 table")
    parsed = S.l2_table(1, geo.extended_l2).parse(raw2)
    entry = int(parsed["entry"][0]) if geo.extended_l2 else int(parsed[0])
    kind, host, hlen = classify_standard(geo, np.array([entry], np.uint64))
    kind, host, hlen = int(kind[0]), int(host[0]), int(hlen[0])
    compressed = bool(entry >> 62 & 1)
    off = entry & S.L2E_OFFSET_MASK
    text = _l2_entry_text(entry, compressed, bool(entry & 1) and geo.version >= 3,
                          bool(entry >> 63), off)
    title = f"L2 entry {j}"
    value: Any = entry
    inner = g % cs
    span = cs - inner
    from .model import KINDS, NO_HOST
    kname = KINDS[kind]
    if geo.extended_l2 and not compressed:
        bitmap = int(parsed["bitmap"][0])
        value = {"entry": entry, "bitmap": bitmap}
        sc = cs // S.SUBCLUSTERS
        k = inner // sc
        alloc, zero = bitmap >> k & 1, bitmap >> (32 + k) & 1
        text += (f"; subcluster {k} of {S.SUBCLUSTERS} ({sc} bytes): allocation bit {alloc}, "
                 f"zero bit {zero}")
        kname = ("data" if not geo.encrypted else "encrypted") if alloc else (
            "zero" if zero else "unallocated")
        host = off if off else int(NO_HOST)
        span = sc - inner % sc
        if alloc and zero:
            text += " (both set: invalid, read as data)"
    steps.append(Step(title, f"L2 table at {_hex(l2_off)}", path, at2, esize, raw2, value,
                      f"guest {_hex(g)} is entry {j} of the L2 table: {text}", depth=depth,
                      guest_offset=g))
    has_host = host != int(NO_HOST)
    files = img.files()
    if kname == "compressed":
        return _Outcome("compressed", span, source=src, stored_offset=host, stored_length=hlen,
                        codec=geo.codec, unit=cs, inner=inner,
                        note="a compressed cluster")
    if kname in ("data", "encrypted"):
        data_src = src
        if geo.data_file:
            data_src = files[1] if len(files) > 1 else None
        return _Outcome(kname, span, source=data_src, host=host + inner)
    if kname == "zero":
        return _Outcome("zero", span, source=src, host=host + inner if has_host else None,
                        note="a zero cluster: reads as zeros", extra={"allocated": has_host})
    return _Outcome("unallocated", span,
                    host=host + inner if has_host and geo.extended_l2 else None)


# ---- qcow version 1 -----------------------------------------------------------------------------
def _walk_qcow(img, g: int, depth: int, steps: list[Step]) -> _Outcome:
    from .schemas import qcow as S
    if not img.usable:
        steps.append(Step("header", "header", str(img.path), 0, S.HEADER_SIZE, b"", None,
                          "the cluster / L2 geometry is invalid: nothing is mapped", depth=depth,
                          guest_offset=g))
        return _Outcome("unallocated", SHOW_BYTES)
    src, path = img.source, str(img.path)
    cb, l2b = img.h["cluster_bits"], img.h["l2_bits"]
    cs, per = 1 << cb, 1 << l2b
    i, j = g >> (cb + l2b), (g >> cb) & (per - 1)
    at = img.h["l1_table_offset"] + 8 * i
    raw, problem = _read(src, at, 8)
    if i >= img.l1.size:
        steps.append(Step(f"L1 entry {i}", "L1 table", path, at, 8, raw, None,
                          f"the L1 table {problem or 'is not read this far'}: the cluster is "
                          "unallocated", depth=depth, guest_offset=g))
        return _Outcome("unallocated", _unit_span(g, cs * per))
    l2 = int(img.l1[i])
    head = f"guest {_hex(g)} is in L1 entry {i} (each covers {cs * per} bytes): "
    if l2 == 0:
        steps.append(Step(f"L1 entry {i}", "L1 table", path, at, 8, raw, l2,
                          head + "no L2 table: the cluster is unallocated", depth=depth,
                          guest_offset=g))
        return _Outcome("unallocated", _unit_span(g, cs * per))
    if int(img.l2_offsets[i]) == 0:
        steps.append(Step(f"L1 entry {i}", "L1 table", path, at, 8, raw, l2,
                          head + f"L2 table at {_hex(l2)} lies beyond the end of the file "
                          f"({src.size} bytes): it reads as zeros, the cluster is unallocated",
                          depth=depth, guest_offset=g))
        return _Outcome("unallocated", _unit_span(g, cs * per))
    steps.append(Step(f"L1 entry {i}", "L1 table", path, at, 8, raw, l2,
                      head + f"L2 table at {_hex(l2)}", depth=depth, guest_offset=g))
    at2 = l2 + 8 * j
    raw2, problem = _read(src, at2, 8)
    raw2 = raw2 + bytes(8 - len(raw2))           # QEMU reads zeros past the end of the file
    e = int(S.u64_table(1).parse(raw2)[0])
    inner = g & (cs - 1)
    note = f"guest {_hex(g)} is entry {j} of the L2 table"
    if problem:
        note += f"; the entry {problem} and reads as zero"
    title, structure = f"L2 entry {j}", f"L2 table at {_hex(l2)}"
    if e == 0:
        steps.append(Step(title, structure, path, at2, 8, raw2, e, note + ": 0, unallocated",
                          depth=depth, guest_offset=g))
        return _Outcome("unallocated", cs - inner)
    if e >> 63:
        host = e & S.cluster_offset_mask(cb)
        stored = (e >> S.compressed_size_shift(cb)) & (cs - 1)
        steps.append(Step(title, structure, path, at2, 8, raw2, e,
                          note + f": compressed, {stored} bytes at {_hex(host)}", depth=depth,
                          guest_offset=g))
        return _Outcome("compressed", cs - inner, source=src, stored_offset=host,
                        stored_length=stored, codec="deflate", unit=cs, inner=inner)
    steps.append(Step(title, structure, path, at2, 8, raw2, e,
                      note + f": data cluster at {_hex(e)}", depth=depth, guest_offset=g))
    return _Outcome("encrypted" if img.encrypted else "data", cs - inner, source=src,
                    host=e + inner)


# ---- VMDK ------------------------------------------------------------------------------------
def _walk_vmdk(img, g: int, depth: int, steps: list[Step]) -> _Outcome:
    from .formats.vmdk.extents import (FlatExtent, ZeroExtent, SparseExtent, CowdExtent,
                                       SeSparseExtent)
    exts = [e for e in img.extents_list if e.length]
    starts = np.array([e.start for e in exts], np.int64)
    k = int(np.searchsorted(starts, g, side="right")) - 1
    if k < 0 or g >= exts[k].start + exts[k].length:
        steps.append(Step("extent", "descriptor", str(img.path), None, 0, b"", None,
                          "no extent covers this offset: unallocated", depth=depth,
                          guest_offset=g))
        return _Outcome("unallocated", SHOW_BYTES)
    ext = exts[k]
    local = g - ext.start
    line = ext.line
    desc = img.descriptor
    if line is None and desc is not None and len(exts) == 1 and len(desc.extents) == 1:
        line = desc.extents[0]        # monolithicSparse / streamOptimized: embedded descriptor
    ext_file = ext.source.path.name if ext.source is not None else "-"
    if line is not None:
        raw, _ = _read(img.source, line.byte_offset, line.length)
        steps.append(Step(f"extent line {ext.index}", "descriptor", str(img.path),
                          line.byte_offset, line.length, raw, line.raw.strip(),
                          f"guest bytes {_hex(ext.start)}..{_hex(ext.start + ext.length)} come "
                          f"from extent {ext.index}: {ext.type} {ext_file}; guest {_hex(g)} is "
                          f"byte {_hex(local)} of the extent", depth=depth, guest_offset=g))
    end = ext.length - local
    if isinstance(ext, ZeroExtent):
        return _Outcome("zero", end, note="a ZERO extent: reads as zeros")
    if isinstance(ext, FlatExtent):
        return _Outcome("data", end, source=ext.source, host=ext.offset + local,
                        note=f"a flat extent: byte {_hex(local)} of the extent is host byte "
                        f"{_hex(ext.offset + local)} of {ext_file}")
    if not isinstance(ext, (SparseExtent, CowdExtent, SeSparseExtent)):
        return _Outcome("unallocated", end, note=f"extent {ext.index} cannot be read "
                        "(missing file): unallocated")
    src, path = ext.source, str(ext.source.path)
    gb, per = ext.grain_bytes(), ext.per_table
    gdi, gti = local // (gb * per), (local // gb) % per
    inner = local % gb
    span = min(gb - inner, end)
    wide = isinstance(ext, SeSparseExtent)
    width = 8 if wide else 4
    if isinstance(ext, SparseExtent):
        h = ext.footer or ext.header
        gd_off = h["gdOffset"] * 512
    elif isinstance(ext, CowdExtent):
        gd_off = ext.header["gdOffset"] * 512
    else:
        gd_off = ext.header["grain_dir_offset"] * 512
    at = gd_off + width * gdi
    raw, _ = _read(src, at, width)
    title = f"grain directory entry {gdi}"
    structure = f"{ext.label} grain directory"
    head = f"guest {_hex(g)} is in grain table {gdi} (each covers {gb * per} bytes): "
    if gdi >= ext.gd.size:
        steps.append(Step(title, structure, path, at, width, raw, None,
                          head + "the grain directory could not be read this far: unallocated",
                          depth=depth, guest_offset=g))
        return _Outcome("unallocated", span)
    d = int(ext.gd[gdi])
    if wide:
        from .schemas import vmdk as V
        allocated, index = V.decode_sesparse_gd(np.array([d], np.uint64))
        h = ext.header
        gt_off = ((h["grain_tables_offset"] + int(index[0]) * h["grain_table_size"]) * 512
                  if allocated[0] else 0)
    else:
        gt_off = d * 512
    if gt_off == 0:
        steps.append(Step(title, structure, path, at, width, raw, d,
                          head + "no grain table: unallocated", depth=depth, guest_offset=g))
        return _Outcome("unallocated", span)
    if _beyond(src, gt_off, per * width):
        steps.append(Step(title, structure, path, at, width, raw, d,
                          head + f"grain table at {_hex(gt_off)} lies beyond the end of the file "
                          f"({src.size} bytes): not read, unallocated", depth=depth,
                          guest_offset=g))
        return _Outcome("unallocated", span)
    steps.append(Step(title, structure, path, at, width, raw, d,
                      head + f"grain table at {_hex(gt_off)}", depth=depth, guest_offset=g))
    from .schemas import vmdk as V
    at2 = gt_off + width * gti
    raw2 = src.read(at2, width, "grain table")
    title2, structure2 = f"grain table entry {gti}", f"{ext.label} grain table {gdi}"
    note = f"guest {_hex(g)} is entry {gti} of grain table {gdi}"
    if wide:
        e = int(V.sesparse_table(1).parse(raw2)[0])
        kinds, cluster = V.decode_sesparse_gt(np.array([e], np.uint64))
        kd, cl = int(kinds[0]), int(cluster[0])
        if kd == 0:
            steps.append(Step(title2, structure2, path, at2, width, raw2, e,
                              note + ": unallocated", depth=depth, guest_offset=g))
            return _Outcome("unallocated", span)
        if kd in (1, 2):
            what = "SCSI-unmapped" if kd == 1 else "a zero grain"
            steps.append(Step(title2, structure2, path, at2, width, raw2, e,
                              note + f": {what}, reads as zeros", depth=depth, guest_offset=g))
            return _Outcome("zero", span)
        host = (ext.header["grains_offset"] + cl * ext.grain_sectors) * 512
        steps.append(Step(title2, structure2, path, at2, width, raw2, e,
                          note + f": grain {cl} at {_hex(host)}", depth=depth, guest_offset=g))
        return _Outcome("data", span, source=src, host=host + inner)
    e = int(V.gt_table(1).parse(raw2)[0])
    if e == 0:
        steps.append(Step(title2, structure2, path, at2, width, raw2, e, note + ": 0, unallocated",
                          depth=depth, guest_offset=g))
        return _Outcome("unallocated", span)
    zero_flag = isinstance(ext, SparseExtent) and bool(ext.flags & V.FLAG_ZERO_GRAIN)
    if e == V.GTE_ZEROED and zero_flag:
        steps.append(Step(title2, structure2, path, at2, width, raw2, e,
                          note + ": 1 with the zeroed-grain flag, reads as zeros", depth=depth,
                          guest_offset=g))
        return _Outcome("zero", span)
    if ext.compressed:
        steps.append(Step(title2, structure2, path, at2, width, raw2, e,
                          note + f": compressed grain {'record ' if ext.markers else ''}at "
                          f"sector {e} ({_hex(e * 512)})", depth=depth, guest_offset=g))
        return _Outcome("compressed", span, source=src, stored_offset=e * 512,
                        stored_length=0 if ext.markers else 2 * gb, codec="zlib", unit=gb,
                        inner=inner, record=ext.markers)
    steps.append(Step(title2, structure2, path, at2, width, raw2, e,
                      note + f": grain at sector {e} ({_hex(e * 512)})", depth=depth,
                      guest_offset=g))
    return _Outcome("data", span, source=src, host=e * 512 + inner)


# ---- VDI ---------------------------------------------------------------------------------------
def _walk_vdi(img, g: int, depth: int, steps: list[Step]) -> _Outcome:
    from .schemas import vdi as S
    path, src = str(img.path), img.source
    if not img.usable:
        steps.append(Step("header", "header", path, None, 0, b"", None, "the block geometry is "
                          "invalid: nothing is mapped", depth=depth, guest_offset=g))
        return _Outcome("unallocated", SHOW_BYTES)
    h = img.h
    bs, extra = h["block_size"], h["block_extra"]
    b, inner = g // bs, g % bs
    at = img.map_offset + 4 * b
    raw, _ = _read(src, at, 4)
    title = f"block map entry {b}"
    head = f"guest {_hex(g)} is in block {b} ({bs} bytes each): "
    diff = h["image_type"] == S.TYPE_DIFF
    if b >= img.entries.size:
        steps.append(Step(title, "block_map", path, at, 4, raw, None,
                          head + "the block map could not be read this far: unallocated",
                          depth=depth, guest_offset=g))
        return _Outcome("unallocated", bs - inner)
    e = int(img.entries[b])
    if e == S.BLOCK_ZERO:
        steps.append(Step(title, "block_map", path, at, 4, raw, e,
                          head + "0xfffffffe, a zero block: reads as zeros", depth=depth,
                          guest_offset=g))
        return _Outcome("zero", bs - inner)
    if e == S.BLOCK_FREE:
        steps.append(Step(title, "block_map", path, at, 4, raw, e,
                          head + "0xffffffff, a free block: " + (
                              "the parent supplies it" if diff else "reads as zeros"),
                          depth=depth, guest_offset=g))
        return _Outcome("unallocated" if diff else "zero", bs - inner)
    host = S.block_host_offset(h["offset_data"], e, bs, extra)
    steps.append(Step(title, "block_map", path, at, 4, raw, e,
                      head + f"data block {e} at offset_data {_hex(h['offset_data'])} + {e} x "
                      f"{bs + extra} = {_hex(host)}", depth=depth, guest_offset=g))
    return _Outcome("data", bs - inner, source=src, host=host + inner)


# ---- VHD ---------------------------------------------------------------------------------------
def _walk_vpc(img, g: int, depth: int, steps: list[Step]) -> _Outcome:
    from .schemas import vhd as V
    path, src = str(img.path), img.source
    if not img.dynamic:
        st = _field_step(img, img.footer_name, "diskType", "footer diskType",
                         "a fixed disk: guest byte n is host byte n", depth)
        if st is not None:
            st.guest_offset = g
            steps.append(st)
        return _Outcome("data", img.virtual_size - g, source=src, host=g,
                        note=f"fixed disk: guest offset {_hex(g)} is host byte {_hex(g)}")
    diff = img.disk_type == V.DISK_DIFFERENCING and img.backing is not None
    empty = "unallocated" if diff else "zero"
    if img.bat is None or not img.block_size:
        steps.append(Step("BAT", "bat", path, None, 0, b"", None, "the BAT could not be read: "
                          + ("the parent supplies every block" if diff else "reads as zeros"),
                          depth=depth, guest_offset=g))
        return _Outcome(empty, SHOW_BYTES)
    bs = img.block_size
    b, inner = g // bs, g % bs
    at = img.bat_offset + 4 * b
    raw, _ = _read(src, at, 4)
    title = f"BAT entry {b}"
    head = f"guest {_hex(g)} is in block {b} ({bs} bytes each): "
    if b >= img.bat.size:
        steps.append(Step(title, "bat", path, at, 4, raw, None, head + "beyond maxTableEntries: "
                          + ("unallocated" if diff else "reads as zeros"), depth=depth,
                          guest_offset=g))
        return _Outcome(empty, bs - inner)
    e = int(img.bat[b])
    if e == V.BAT_UNUSED:
        steps.append(Step(title, "bat", path, at, 4, raw, e, head + "0xffffffff, not allocated: "
                          + ("the parent supplies it" if diff else "reads as zeros"), depth=depth,
                          guest_offset=g))
        return _Outcome(empty, bs - inner)
    bitmap_at = e * 512
    data_at = bitmap_at + img.bitmap_size
    steps.append(Step(title, "bat", path, at, 4, raw, e,
                      head + f"sector {e}: the block's sector bitmap at {_hex(bitmap_at)}, its "
                      f"data at {_hex(data_at)}", depth=depth, guest_offset=g))
    sector = inner // 512
    byte_at = bitmap_at + sector // 8
    braw, problem = _read(src, byte_at, 1)
    bit = (braw[0] >> (7 - sector % 8)) & 1 if braw else 0
    if diff:
        note = (f"bit {sector} of the sector bitmap (most significant bit first) is {bit}: "
                + ("this file holds the sector" if bit else "the parent supplies the sector"))
    else:
        note = (f"bit {sector} of the sector bitmap is {bit}; a dynamic disk's bitmap is not "
                "consulted (QEMU reads the block's data)")
    if problem:
        note += f"; the bitmap byte {problem} (reads as 0)"
    steps.append(Step(f"sector bitmap bit {sector}", f"sector bitmap of block {b}", path, byte_at,
                      1, braw, bit, note, depth=depth, guest_offset=g))
    if diff:
        if not bit:
            return _Outcome("unallocated", 512 - inner % 512)
        return _Outcome("data", 512 - inner % 512, source=src, host=data_at + inner)
    return _Outcome("data", bs - inner, source=src, host=data_at + inner)


# ---- VHDX --------------------------------------------------------------------------------------
def _walk_vhdx(img, g: int, depth: int, steps: list[Step]) -> _Outcome:
    from .schemas import vhdx as X
    path, src = str(img.path), img.view
    if not img.usable or img.bat is None:
        steps.append(Step("BAT", "bat", path, None, 0, b"", None, "no usable BAT: unallocated",
                          depth=depth, guest_offset=g))
        return _Outcome("unallocated", SHOW_BYTES)
    bs, cr = img.block_size, img.chunk_ratio
    p, inner = g // bs, g % bs
    idx = p + p // cr
    at = img.bat_offset + 8 * idx
    raw, _ = _read(src, at, 8)
    title = f"BAT entry {idx}"
    head = f"guest {_hex(g)} is in payload block {p} ({bs} bytes each), BAT entry {idx}: "
    if idx >= img.bat.size:
        steps.append(Step(title, "bat", path, at, 8, raw, None,
                          head + "the BAT is not read this far: unallocated", depth=depth,
                          guest_offset=g))
        return _Outcome("unallocated", bs - inner)
    e = int(img.bat[idx])
    state, off = e & X.BAT_STATE_MASK, e & X.BAT_FILE_OFFSET_MASK
    name = X.PAYLOAD_STATES.get(state, f"invalid state {state}")
    value = {"state": name, "file_offset": off}
    if state == X.PAYLOAD_BLOCK_NOT_PRESENT:
        steps.append(Step(title, "bat", path, at, 8, raw, value, head + "NOT_PRESENT: "
                          + ("the parent supplies it" if img.backing is not None else
                             "unallocated, reads as zeros"), depth=depth, guest_offset=g))
        return _Outcome("unallocated", bs - inner)
    if state not in (X.PAYLOAD_BLOCK_FULLY_PRESENT, X.PAYLOAD_BLOCK_PARTIALLY_PRESENT):
        steps.append(Step(title, "bat", path, at, 8, raw, value,
                          head + f"{name}: reads as zeros", depth=depth, guest_offset=g))
        return _Outcome("zero", bs - inner)
    steps.append(Step(title, "bat", path, at, 8, raw, value,
                      head + f"{name}, block at {_hex(off)}", depth=depth, guest_offset=g))
    if state == X.PAYLOAD_BLOCK_FULLY_PRESENT:
        return _Outcome("data", bs - inner, source=src, host=off + inner)
    # partially present: the chunk's sector bitmap decides, per logical sector
    lss = img.logical_sector_size
    spb = bs // lss
    sbi = p // cr * (cr + 1) + cr
    sat = img.bat_offset + 8 * sbi
    sraw, _ = _read(src, sat, 8)
    sb = int(img.bat[sbi]) if sbi < img.bat.size else 0
    sb_state, sb_off = sb & X.BAT_STATE_MASK, sb & X.BAT_FILE_OFFSET_MASK
    present = sbi < img.bat.size and sb_state == X.SB_BLOCK_PRESENT
    steps.append(Step(f"BAT entry {sbi}", "bat", path, sat, 8, sraw,
                      {"state": X.BITMAP_STATES.get(sb_state, f"invalid state {sb_state}"),
                       "file_offset": sb_off},
                      f"the sector bitmap entry of chunk {p // cr}: " + (
                          f"bitmap block at {_hex(sb_off)}" if present else
                          "not present: the block is read as fully present"),
                      depth=depth, guest_offset=g))
    if not present:
        return _Outcome("data", bs - inner, source=src, host=off + inner)
    sector = inner // lss
    byte_at = sb_off + (p % cr) * (spb // 8) + sector // 8
    braw, problem = _read(src, byte_at, 1)
    bit = (braw[0] >> (sector % 8)) & 1 if braw else 0
    steps.append(Step(f"sector bitmap bit {sector}", f"sector bitmap of block {p}", path, byte_at,
                      1, braw, bit, f"bit {sector % 8} (least significant first) of this byte is "
                      f"{bit}: " + ("this file holds the sector" if bit else
                                    "the parent supplies the sector")
                      + (f"; the bitmap byte {problem}" if problem else ""),
                      depth=depth, guest_offset=g))
    span = lss - inner % lss
    if not bit:
        return _Outcome("unallocated", span)
    return _Outcome("data", span, source=src, host=off + inner)


# ---- cow ---------------------------------------------------------------------------------------
def _walk_cow(img, g: int, depth: int, steps: list[Step]) -> _Outcome:
    path, src = str(img.path), img.source
    s = g // 512
    at = img.bitmap_offset + s // 8
    title = f"bitmap bit {s}"
    if s // 8 >= img.bitmap_read:
        raw, _ = _read(src, at, 1)
        steps.append(Step(title, "bitmap", path, at, 1, raw, None,
                          f"sector {s}: the allocation bitmap is not read this far: unallocated",
                          depth=depth, guest_offset=g))
        return _Outcome("unallocated", 512 - g % 512)
    raw = src.read(at, 1, "bitmap")
    bit = raw[0] >> (s % 8) & 1
    host = img.data_offset + g
    steps.append(Step(title, "bitmap", path, at, 1, raw, bit,
                      f"sector {s} is bit {s % 8} (least significant first) of the bitmap byte at "
                      f"{_hex(at)}: {bit}, " + (f"the sector is in this file at {_hex(host)}" if bit
                                                 else "unallocated here"),
                      depth=depth, guest_offset=g))
    if not bit:
        return _Outcome("unallocated", 512 - g % 512)
    return _Outcome("data", 512 - g % 512, source=src, host=host)


# ---- raw and anything else ---------------------------------------------------------------------
def _walk_raw(img, g: int, depth: int, steps: list[Step]) -> _Outcome:
    src = img.source
    hole, run = _hole_run(src, g)
    if hole:
        return _Outcome("zero", run, source=src, host=g,
                        note=f"raw image: guest offset {_hex(g)} is host byte {_hex(g)}, in a "
                        "hole of the file: reads as zeros")
    return _Outcome("data", run, source=src, host=g,
                    note=f"raw image: guest offset {_hex(g)} is host byte {_hex(g)}")


def _walk_generic(img, g: int, depth: int, steps: list[Step]) -> _Outcome:
    """Formats without a walker: the driver's own extent table (one lookup)."""
    from .model import KINDS, NO_HOST
    t = img._own_extents()
    i = int(np.searchsorted(t.guest, np.uint64(g), side="right")) - 1
    if i < 0 or g >= int(t.guest[i] + t.length[i]):
        return _Outcome("unallocated", SHOW_BYTES)
    kind = KINDS[int(t.kind[i])]
    end = int(t.guest[i] + t.length[i]) - g
    steps.append(Step("extent", "extent table", str(img.path), None, 0, b"", kind,
                      f"run {i}: guest {_hex(int(t.guest[i]))} +{int(t.length[i])} is {kind}",
                      depth=depth, guest_offset=g))
    if kind in ("data", "encrypted") and int(t.host[i]) != int(NO_HOST) and int(t.file[i]) >= 0:
        return _Outcome(kind, end, source=t.files[int(t.file[i])],
                        host=int(t.host[i]) + g - int(t.guest[i]))
    if kind == "compressed":
        return _Outcome("unallocated", end, note="compressed run (no walker for this format)")
    return _Outcome(kind if kind != "data" else "unallocated", end)


_WALKERS = {"qcow2": _walk_qcow2, "qcow": _walk_qcow, "vmdk": _walk_vmdk, "vdi": _walk_vdi,
            "vpc": _walk_vpc, "vhdx": _walk_vhdx, "cow": _walk_cow, "raw": _walk_raw}
