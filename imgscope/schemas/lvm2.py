"""LVM2 physical volume (text format "LVM2 001"): label, PV header, metadata areas, text.

* ``label_header``: the 32-byte "LABELONE" record LVM looks for in sectors 0..3
  (almost always sector 1) of a physical volume (PV).
* ``pv_header`` + ``disk_locn`` lists + ``pv_header_extension``: the rest of the
  512-byte label sector (data areas, metadata areas, bootloader areas).
* ``mda_header`` + ``raw_locn``: the 512-byte header of a metadata area (MDA) and
  the slots pointing at the current copy of the text metadata in its circular buffer.
* ``lvm_crc``: LVM's CRC-32 variant (initial value 0xF597A6CF, no final inversion).
* Builders (``build_label_sector``, ``build_mda_header``, ``export_metadata``) make
  byte-faithful PVs for fixtures: the layout and text style of lvm2 2.03.

Field names are LVM's (``sector_xl``, ``crc_xl``, ``device_size_xl``...).  All
integers are little endian; a sector is 512 bytes in every LVM unit.
"""
from __future__ import annotations

import zlib
from typing import Any, Iterable, Sequence

import construct as cs

from ._types import flags

SECTOR = 512
LABEL_SCAN_SECTORS = 4                 # LVM looks for a label in sectors 0..3
LABEL_SCAN_SIZE = LABEL_SCAN_SECTORS * SECTOR
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
LABEL_HEADER_SIZE = 32
PV_HEADER_FIXED_SIZE = 40               # pv_uuid + device_size_xl
DISK_LOCN_SIZE = 16
EXTENSION_FIXED_SIZE = 8
MDA_HEADER_SIZE = 512
MDA_HEADER_FIXED_SIZE = 40
RAW_LOCN_SIZE = 24
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_VERSION = 1
INITIAL_CRC = 0xF597A6CF
ID_LEN = 32
PV_EXT_VERSION = 2
PV_EXT_USED = 0x1
RAW_LOCN_IGNORED = 0x1
#: the alphabet of LVM UUIDs (lib/id/id.c)
UUID_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!#"
#: group lengths of a formatted UUID (6-4-4-4-4-4-6)
UUID_GROUPS = (6, 4, 4, 4, 4, 4, 6)
#: LVM's MBR partition type and GPT partition type GUID for physical volumes
MBR_TYPE_LVM = 0x8E
GPT_TYPE_LVM = "E6D6D379-F507-44C2-A23C-238F2A3DF928"

label_header = cs.Struct(
    "id" / cs.Bytes(8) * "label signature 'LABELONE'",
    "sector_xl" / cs.Int64ul * "sector number of this label; a label found in another sector is ignored",
    "crc_xl" / cs.Int32ul * "lvm_crc of bytes 20..511 of the label sector (from offset_xl to the end)",
    "offset_xl" / cs.Int32ul * "offset of the PV header from the start of the label sector; always 32",
    "type" / cs.Bytes(8) * "label type 'LVM2 001' (text format, version 1)",
)

disk_locn = cs.Struct(
    "offset" / cs.Int64ul * "start of the area in bytes from the start of the PV; 0 ends the list",
    "size" / cs.Int64ul * "size of the area in bytes (a data area of size 0 runs to the end of the device)",
)

pv_header = cs.Struct(
    "pv_uuid" / cs.Bytes(ID_LEN) * "PV UUID: 32 characters of 0-9a-zA-Z!#, printed as 6-4-4-4-4-4-6 groups",
    "device_size_xl" / cs.Int64ul * "size of the PV in bytes when the label was written",
)

pv_header_extension = cs.Struct(
    "version" / cs.Int32ul * "extension version: 2 (1: bootloader areas only, no flags)",
    "flags" / flags(cs.Int32ul, {0: "PV_EXT_USED"}) * "bit 0 PV_EXT_USED: the PV belongs to a volume group",
)

mda_header = cs.Struct(
    "checksum_xl" / cs.Int32ul * "lvm_crc of bytes 4..511 of this metadata area header",
    "magic" / cs.Bytes(16) * "metadata area signature ' LVM2 x[5A%r0N*>'",
    "version" / cs.Int32ul * "metadata area format version: 1",
    "start" / cs.Int64ul * "absolute byte offset of this header on the PV (equals the disk_locn offset)",
    "size" / cs.Int64ul * "size of the whole metadata area in bytes, this header included",
)

raw_locn = cs.Struct(
    "offset" / cs.Int64ul * "start of the text metadata relative to the metadata area start (>= 512); 0 ends the list",
    "size" / cs.Int64ul * "length of the text metadata in bytes, the terminating NUL included",
    "checksum" / cs.Int32ul * "lvm_crc of the text bytes, chained across the wrap of the circular buffer",
    "flags" / flags(cs.Int32ul, {0: "RAW_LOCN_IGNORED"}) * "bit 0 RAW_LOCN_IGNORED: this metadata area is not used",
)
RAW_LOCN_SLOTS = ("committed", "precommitted")


def lvm_crc(data: bytes, init: int = INITIAL_CRC) -> int:
    """LVM's calc_crc(): CRC-32 (zlib's table) from `init`, no final inversion.

    Chained over split buffers by passing the previous result as `init`.
    """
    return zlib.crc32(data, init ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def format_uuid(raw: bytes) -> str:
    """A 32-character LVM UUID as LVM prints it (6-4-4-4-4-4-6 groups joined by '-')."""
    text = bytes(raw).decode("latin-1")
    out, pos = [], 0
    for n in UUID_GROUPS:
        out.append(text[pos:pos + n])
        pos += n
    return "-".join(out)


def unformat_uuid(text: str) -> bytes:
    """The 32 on-disk characters of a formatted UUID (dashes removed)."""
    return text.replace("-", "").encode("latin-1")


def valid_uuid(raw: bytes) -> bool:
    return len(raw) == ID_LEN and all(chr(c) in UUID_CHARS for c in raw)


def next_copy_offset(offset: int, size: int, mda_size: int) -> int:
    """Where lvm2 writes the next metadata copy: the 512-byte boundary after the
    current copy, taken modulo the circular buffer [512, mda_size)."""
    end = offset + size
    if end > mda_size:                       # the current copy wrapped
        end = end - mda_size + MDA_HEADER_SIZE
    nxt = -(-end // SECTOR) * SECTOR
    return MDA_HEADER_SIZE if nxt >= mda_size else nxt


# ---- builders (fixtures, repair) ----------------------------------------------------


def build_label_sector(pv_uuid: bytes, device_size: int, data_areas: Sequence[tuple[int, int]],
                       metadata_areas: Sequence[tuple[int, int]], *, sector: int = 1,
                       extension_version: int | None = PV_EXT_VERSION,
                       extension_flags: int = PV_EXT_USED,
                       bootloader_areas: Sequence[tuple[int, int]] = ()) -> bytes:
    """The 512-byte label sector as lvm2's pvcreate writes it (CRC filled in)."""
    body = pv_header.build(dict(pv_uuid=pv_uuid, device_size_xl=device_size))
    for areas in (data_areas, metadata_areas):
        for off, size in list(areas) + [(0, 0)]:
            body += disk_locn.build(dict(offset=off, size=size))
    if extension_version:
        body += pv_header_extension.build(dict(version=extension_version, flags=extension_flags))
        for off, size in list(bootloader_areas) + [(0, 0)]:
            body += disk_locn.build(dict(offset=off, size=size))
    if LABEL_HEADER_SIZE + len(body) > SECTOR:
        raise ValueError("PV header areas overflow the label sector")
    rest = body.ljust(SECTOR - LABEL_HEADER_SIZE, b"\0")
    head = label_header.build(dict(id=LABEL_ID, sector_xl=sector, crc_xl=0,
                                   offset_xl=LABEL_HEADER_SIZE, type=LABEL_TYPE))
    sector_bytes = bytearray(head + rest)
    crc = lvm_crc(bytes(sector_bytes[20:]))
    sector_bytes[16:20] = crc.to_bytes(4, "little")
    return bytes(sector_bytes)


def build_mda_header(start: int, size: int, locations: Iterable[dict] = ()) -> bytes:
    """A 512-byte metadata area header with its raw_locn slots (dicts of raw_locn
    fields) and a correct checksum."""
    body = mda_header.build(dict(checksum_xl=0, magic=MDA_MAGIC, version=MDA_VERSION,
                                 start=start, size=size))
    for loc in locations:
        body += raw_locn.build(dict(dict(flags=0), **loc))
    if len(body) > MDA_HEADER_SIZE - RAW_LOCN_SIZE:
        raise ValueError("too many raw locations for one metadata area header")
    data = bytearray(body.ljust(MDA_HEADER_SIZE, b"\0"))
    data[0:4] = lvm_crc(bytes(data[4:])).to_bytes(4, "little")
    return bytes(data)


# ---- text metadata (export) -----------------------------------------------------------


def quote(text: str) -> str:
    """A string value as LVM writes it: double quotes, '"' and '\\' escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_value(value: Any) -> str:
    """An integer, float, string or flat list in LVM's text form."""
    if isinstance(value, bool):
        raise TypeError("LVM metadata has no booleans")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:f}"
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} into LVM metadata")


def _assignments(section: dict, blank_before: Sequence[str] = ()) -> list[str]:
    lines = []
    for key, value in section.items():
        if isinstance(value, dict):
            continue
        if key in blank_before:
            lines.append("")
        if key == "stripes":
            # one "pvN", start_extent pair per line
            items = list(value)
            rows = [", ".join(format_value(v) for v in items[i:i + 2])
                    for i in range(0, len(items), 2)]
            lines.append(f"{key} = [")
            lines.extend(row + ("," if i + 1 < len(rows) else "") for i, row in enumerate(rows))
            lines.append("]")
        else:
            lines.append(f"{key} = {format_value(value)}")
    return lines


def _sections(section: dict) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in section.items() if isinstance(v, dict)]


def export_vg(name: str, vg: dict) -> str:
    """The volume-group section as lvm2 2.03 writes it into a metadata area: no
    indentation, blank lines where export.c puts them."""
    out = [f"{name} {{"]
    out += _assignments(vg)
    out.append("")
    for key, sub in _sections(vg):
        out.append(f"{key} {{")
        for child, body in _sections(sub):
            out.append("")
            out.append(f"{child} {{")
            if key == "physical_volumes":
                out += _assignments(body, blank_before=("status",))
            elif key in ("logical_volumes", "historical_logical_volumes"):
                out += _assignments(body)
                segs = _sections(body)
                if segs:
                    out.append("")
                for seg_name, seg in segs:
                    out.append(f"{seg_name} {{")
                    out += _assignments(seg, blank_before=("type", "stripes"))
                    out.append("}")
            else:
                out += _assignments(body)
            out.append("}")
        out.append("}")
        out.append("")
    if "logical_volumes" not in vg:
        out.append("")                # lvm2 writes the blank line of an empty LV list too
    out.append("}")
    return "\n".join(out) + "\n"


def export_metadata(name: str, vg: dict, *, description: str = "", creation_host: str = "",
                    creation_time: int = 0, uname: str = "", time_text: str = "",
                    generated_by: str = "LVM2 version 2.03.16(2) (2022-05-18)") -> bytes:
    """The whole text of one metadata copy, NUL included (its length is raw_locn.size):
    the VG section first, then the global keys, as lvm2 writes them on disk."""
    text = export_vg(name, vg)
    text += f"# Generated by {generated_by}: {time_text}\n\n"
    text += 'contents = "Text Format Volume Group"\nversion = 1\n\n'
    text += f"description = {quote(description)}\n\n"
    text += f"creation_host = {quote(creation_host)}\t# {uname}\n"
    text += f"creation_time = {creation_time}\t# {time_text}\n\n"
    return text.encode("utf-8") + b"\0"
