"""qcow2 header, header extensions and backing file name -> fields and values."""
from __future__ import annotations

from dataclasses import dataclass, field

import construct as cs

from ...errors import ParseError, Truncated
from ...schemas import qcow2 as S
from ...schemas._types import field_layout, FieldRow


@dataclass
class Extension:
    index: int
    type: int
    offset: int          # of the 8-byte extension header
    length: int
    data: bytes

    @property
    def name(self) -> str:
        return S.EXTENSION_NAMES.get(self.type, f"unknown {self.type:#010x}")


@dataclass
class Header:
    values: dict
    rows: list
    extensions: list = field(default_factory=list)
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: list = field(default_factory=list)
    bitmaps_ext: dict | None = None
    crypto_ext: dict | None = None


def _parse(struct, data, structure, base, image) -> list[FieldRow]:
    try:
        return field_layout(struct, data, structure=structure, base_offset=base)
    except cs.ConstructError as exc:
        raise ParseError(f"cannot parse {structure}: {exc}", path=str(image.path),
                         offset=base, structure=structure) from None


def parse_header(image) -> Header:
    """Read and validate the header; lenient where a reader can go on."""
    src = image.source
    if src.size < S.HEADER_V2_SIZE:
        raise Truncated(f"file of {src.size} bytes is shorter than a qcow2 header",
                        path=str(src.path), offset=0, structure="header")
    head = src.read(0, S.HEADER_V2_SIZE, "header")
    if head[:4] != S.MAGIC:
        raise ParseError("not a qcow2 image (bad magic)", path=str(src.path), offset=0,
                         structure="header.magic")
    rows = _parse(S.header_v2, head, "header", 0, image)
    v = {r.field: r.value for r in rows}
    version = v["version"]
    if version not in (2, 3):
        from ...errors import Unsupported
        raise Unsupported(f"qcow2 version {version} is not supported", path=str(src.path),
                          offset=4, structure="header.version")
    if not S.MIN_CLUSTER_BITS <= v["cluster_bits"] <= S.MAX_CLUSTER_BITS:
        raise ParseError(f"unsupported cluster_bits {v['cluster_bits']} (9..21)",
                         path=str(src.path), offset=20, structure="header.cluster_bits")
    cluster_size = 1 << v["cluster_bits"]
    defaults = dict(incompatible_features=0, compatible_features=0, autoclear_features=0,
                    refcount_order=4, header_length=S.HEADER_V2_SIZE, compression_type=0)
    v.update(defaults)
    if version == 3:
        tail = src.read(S.HEADER_V2_SIZE, S.HEADER_V3_MIN - S.HEADER_V2_SIZE, "header")
        trows = _parse(S.header_v3_tail, tail, "header", S.HEADER_V2_SIZE, image)
        rows += trows
        v.update({r.field: r.value for r in trows})
        hl = v["header_length"]
        if hl < S.HEADER_V3_MIN or hl % 8 or hl > cluster_size:
            image.note("error", "header_length_invalid",
                       f"header_length {hl} must be >= 104, a multiple of 8 and <= cluster size",
                       structure="header.header_length", host_offset=100)
            hl = max(S.HEADER_V3_MIN, min(hl - hl % 8, cluster_size))
            v["header_length"] = hl
        if hl > S.HEADER_V3_MIN:
            n = min(hl, 112) - S.HEADER_V3_MIN
            crow = _parse(S.header_v3_compression, src.read(104, 8, "header")[:8], "header",
                          104, image) if n == 8 else []
            rows += crow
            v.update({r.field: r.value for r in crow})
            if crow and any(crow[1].raw):
                image.note("warning", "header_padding_nonzero",
                           "header padding after compression_type is not zero",
                           structure="header.padding", host_offset=105)
        if hl > 112:
            extra = src.read(112, hl - 112, "header")
            rows.append(FieldRow("header", "unknown_fields", 112, hl - 112, extra, extra,
                                 extra[:16].hex(" "), "additional header fields unknown to "
                                 "this reader (preserved on rewrite)"))
    check_header_values(image, v, cluster_size)
    hdr = Header(values=v, rows=rows)
    parse_extensions(image, hdr, cluster_size)
    return hdr


def check_header_values(image, v: dict, cluster_size: int) -> None:
    incompat = v["incompatible_features"]
    if incompat & ~S.INCOMPAT_KNOWN:
        image.note("critical", "incompatible_feature_unknown",
                   f"unknown incompatible feature bits {incompat & ~S.INCOMPAT_KNOWN:#x}",
                   structure="header.incompatible_features", host_offset=72)
    if v["crypt_method"] not in S.CRYPT_METHODS:
        image.note("error", "crypt_method_unknown", f"unknown crypt_method {v['crypt_method']}",
                   structure="header.crypt_method", host_offset=32)
    if v["refcount_order"] > 6:
        image.note("error", "refcount_order_invalid",
                   f"refcount_order {v['refcount_order']} is larger than 6",
                   structure="header.refcount_order", host_offset=96)
    ct = v["compression_type"]
    if ct not in S.COMPRESSION_TYPES:
        image.note("error", "compression_type_unknown", f"unknown compression type {ct}",
                   structure="header.compression_type", host_offset=104)
    if bool(ct) != bool(incompat & S.INCOMPAT_COMPRESSION):
        image.note("error", "compression_type_bit_mismatch",
                   "compression type incompatible feature bit does not match compression_type",
                   structure="header.incompatible_features", host_offset=72)
    if v["backing_file_offset"] > cluster_size:
        image.note("error", "backing_name_invalid", "backing file offset lies outside cluster 0",
                   structure="header.backing_file_offset", host_offset=8)
    if v["backing_file_offset"] and v["backing_file_size"] > min(
            1023, cluster_size - v["backing_file_offset"]):
        image.note("error", "backing_name_invalid", "backing file name too long",
                   structure="header.backing_file_size", host_offset=16)
    if v["size"] >= 1 << 63:
        image.note("error", "size_invalid", "virtual size does not fit a signed 64-bit value",
                   structure="header.size", host_offset=24)
    ext_l2 = bool(incompat & S.INCOMPAT_EXTL2)
    if ext_l2 and v["cluster_bits"] < 14:
        image.note("error", "subcluster_too_small",
                   "extended L2 entries need clusters of at least 16 KiB",
                   structure="header.cluster_bits", host_offset=20)


def parse_extensions(image, hdr: Header, cluster_size: int) -> None:
    """Walk the extension list from header_length to the backing name / end of cluster 0."""
    v = hdr.values
    src = image.source
    start = v["header_length"]
    end = v["backing_file_offset"] or cluster_size
    end = min(end, src.size)
    area = src.read_upto(0, end)
    off, i = start, 0
    while off + 8 <= end:
        etype, elen = int.from_bytes(area[off:off + 4], "big"), int.from_bytes(area[off + 4:off + 8], "big")
        rows = _parse(S.extension_header, area[off:off + 8], f"extension[{i}]", off, image)
        if etype == S.EXT_END:
            for r in rows:
                r.structure = "end of extensions"
            hdr.rows += rows
            break
        name = S.EXTENSION_NAMES.get(etype, "unknown")
        structure = f"extension[{i}] {name}"
        for r in rows:
            r.structure = structure
        hdr.rows += rows
        if off + 8 + elen > end:
            image.note("error", "extension_too_large",
                       f"header extension {etype:#x} of {elen} bytes crosses the end of the "
                       "extension area", structure=structure, host_offset=off)
            break
        data = area[off + 8:off + 8 + elen]
        ext = Extension(i, etype, off, elen, data)
        hdr.extensions.append(ext)
        _decode_extension(image, hdr, ext, structure)
        off += 8 + elen + (-elen % 8)
        i += 1
    if v["backing_file_offset"]:
        bo, bs = v["backing_file_offset"], v["backing_file_size"]
        raw = src.read(bo, min(bs, 1023), "backing file name")
        name = raw.decode("utf-8", "surrogateescape")
        # a name the header itself makes invalid is shown but never followed
        hdr.backing_file = None if bo > cluster_size or bs > min(1023, cluster_size - bo) else name
        hdr.rows.append(FieldRow("backing file name", "backing_file", bo, len(raw), raw, name,
                                 name, "backing file name (relative to the image's folder)"))


# fixed-size extensions: type -> (schema, size, finding code on bad length, Header attribute)
FIXED_EXTENSIONS = {
    S.EXT_BITMAPS: (S.bitmaps_extension, 24, "bitmaps_extension_length", "bitmaps_ext"),
    S.EXT_CRYPTO: (S.crypto_extension, 16, "crypto_extension_length", "crypto_ext"),
}


def _decode_extension(image, hdr: Header, ext: Extension, structure: str) -> None:
    base = ext.offset + 8
    data = ext.data
    if ext.type == S.EXT_BACKING_FORMAT:
        fmt = data.decode("ascii", "replace")
        hdr.backing_format = fmt
        hdr.rows.append(FieldRow(structure, "backing_format", base, len(data), data, fmt, fmt,
                                 "format name of the backing file"))
    elif ext.type == S.EXT_DATA_FILE:
        name = data.decode("utf-8", "surrogateescape")
        hdr.data_file = name
        hdr.rows.append(FieldRow(structure, "data_file", base, len(data), data, name, name,
                                 "external data file name (relative to the image's folder)"))
    elif ext.type == S.EXT_FEATURE_TABLE:
        for k in range(len(data) // 48):
            rows = _parse(S.feature_entry, data[48 * k:48 * k + 48], f"{structure} entry[{k}]",
                          base + 48 * k, image)
            hdr.rows += rows
            vals = {r.field: r.value for r in rows}
            hdr.feature_names.append(dict(vals, offset=base + 48 * k))
        if len(data) % 48:
            image.note("warning", "feature_table_length",
                       "feature name table length is not a multiple of 48",
                       structure=structure, host_offset=ext.offset)
    elif ext.type in FIXED_EXTENSIONS:
        struct, size, code, attr = FIXED_EXTENSIONS[ext.type]
        if len(data) != size:
            image.note("error", code, f"{ext.name} has {len(data)} bytes, expected {size}",
                       structure=structure, host_offset=ext.offset)
            return
        rows = _parse(struct, data, structure, base, image)
        hdr.rows += rows
        setattr(hdr, attr, {r.field: r.value for r in rows})
    else:
        hdr.rows.append(FieldRow(structure, "data", base, len(data), data, data,
                                 data[:16].hex(" "), "unknown extension data (kept verbatim)"))
