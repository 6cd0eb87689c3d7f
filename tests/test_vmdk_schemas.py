"""VMDK schemas (imgscope.schemas.vmdk, vmdk_descriptor) against real qemu-img 7.2 files.

Every KDMV header and descriptor checked here is made by qemu-img in tmp folders;
COWD and seSparse (which qemu-img cannot write) are built from values and parsed
back.  A VMware-style streamOptimized file built only from these schemas must be
read by qemu-img as identical to its source.
"""
from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import construct as cs
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from imgscope.schemas import _types
from imgscope.schemas import vmdk as V
from imgscope.schemas.vmdk_descriptor import (
    QEMU_CREATE_TYPES, Descriptor, DescriptorEntry, ExtentLine, build_descriptor,
    format_extent, parse_cid, parse_descriptor, qemu_ddb,
)

import oracle

MiB = 1 << 20
CAPACITY = 20480                      # 10 MiB in sectors
DATA_AT = {0: 64 * 1024, 3 * MiB: 4096, 10 * MiB - 4096: 4096}   # offset -> length


# ---------------------------------------------------------------------------- real images
def _qemu_img(*args, cwd):
    return oracle.run(oracle.QEMU_IMG, *args, cwd=cwd)


def _source_bytes() -> bytes:
    data = bytearray(10 * MiB)
    for off, length in DATA_AT.items():
        chunk = b"".join(b"grain data %08d at %010d|" % (i, off) for i in range(length // 16))
        data[off:off + length] = chunk[:length]
    return bytes(data)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """name -> path of every qemu-img made VMDK (and the raw source)."""
    oracle.require_tools()
    root = tmp_path_factory.mktemp("vmdk")
    src = root / "src.raw"
    src.write_bytes(_source_bytes())
    out = {"src": src}
    for t in QEMU_CREATE_TYPES:
        _qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={t}", f"new_{t}.vmdk", "10M", cwd=root)
        _qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={t}", "src.raw",
                  f"conv_{t}.vmdk", cwd=root)
        out[f"new_{t}"] = root / f"new_{t}.vmdk"
        out[f"conv_{t}"] = root / f"conv_{t}.vmdk"
    _qemu_img("create", "-q", "-f", "vmdk", "-b", "new_monolithicSparse.vmdk", "-F", "vmdk",
              "child.vmdk", cwd=root)
    out["child"] = root / "child.vmdk"
    _qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", "zeroed.vmdk", "10M", cwd=root)
    out["zeroed"] = root / "zeroed.vmdk"
    _qemu_img("create", "-q", "-f", "vmdk", "-o",
              "subformat=monolithicFlat,adapter_type=lsilogic,hwversion=7,toolsversion=1234",
              "opts.vmdk", "100M", cwd=root)
    out["opts"] = root / "opts.vmdk"
    _qemu_img("create", "-q", "-f", "vmdk", "-o", "compat6=on,adapter_type=legacyESX",
              "compat6.vmdk", "100M", cwd=root)
    out["compat6"] = root / "compat6.vmdk"
    # 5 GiB split sparse: three small KDMV files (2 GiB, 2 GiB, 1 GiB)
    _qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "big.vmdk", "5G", cwd=root)
    out["big"] = root / "big.vmdk"
    return out


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _sparse_files(images):
    """(name, path) of every KDMV file among the images."""
    found = []
    for p in sorted(images["src"].parent.glob("*.vmdk")):
        with open(p, "rb") as f:
            if f.read(4) == V.SPARSE_MAGIC:
                found.append(p)
    return found


def _descriptor_text(path: Path) -> tuple[bytes, int]:
    """(descriptor bytes as stored, host offset) of a descriptor file or KDMV extent."""
    data = _read(path)
    if data[:4] == V.SPARSE_MAGIC:
        h = V.sparse_header.parse(data[:512])
        off = h.descriptorOffset * 512
        return data[off:off + h.descriptorSize * 512], off
    return data, 0


# ---------------------------------------------------------------------------- KDMV header
EXPECTED_HEADER = {
    # name: (version, flags, compressAlgorithm)
    "new_monolithicSparse": (1, 0x3, 0),
    "conv_monolithicSparse": (1, 0x3, 0),
    "new_twoGbMaxExtentSparse-s001": (1, 0x3, 0),
    "conv_twoGbMaxExtentSparse-s001": (1, 0x3, 0),
    "new_streamOptimized": (3, 0x30003, 1),
    "conv_streamOptimized": (3, 0x30003, 1),
    "child": (1, 0x3, 0),
    "zeroed": (2, 0x7, 0),
}

SPEC_OFFSETS = {"magicNumber": (0x00, 4), "version": (0x04, 4), "flags": (0x08, 4),
                "capacity": (0x0C, 8), "grainSize": (0x14, 8), "descriptorOffset": (0x1C, 8),
                "descriptorSize": (0x24, 8), "numGTEsPerGT": (0x2C, 4), "rgdOffset": (0x30, 8),
                "gdOffset": (0x38, 8), "overHead": (0x40, 8), "uncleanShutdown": (0x48, 1),
                "singleEndLineChar": (0x49, 1), "nonEndLineChar": (0x4A, 1),
                "doubleEndLineChar1": (0x4B, 1), "doubleEndLineChar2": (0x4C, 1),
                "compressAlgorithm": (0x4D, 2), "pad": (0x4F, 433)}


@pytest.mark.parametrize("name", sorted(EXPECTED_HEADER))
def test_sparse_header_round_trip_on_qemu_files(images, name):
    path = images["src"].parent / f"{name}.vmdk"
    raw = _read(path)[:512]
    h = V.sparse_header.parse(raw)
    assert V.sparse_header.build(h) == raw
    version, flag_bits, compress = EXPECTED_HEADER[name]
    assert h.magicNumber == V.SPARSE_MAGIC
    assert (h.version, h.flags, h.compressAlgorithm) == (version, flag_bits, compress)
    assert h.capacity == CAPACITY
    assert (h.grainSize, h.numGTEsPerGT) == (128, 512)
    assert (h.descriptorOffset, h.descriptorSize) == (1, 20)
    assert (h.rgdOffset, h.gdOffset, h.overHead) == (21, 26, 128)
    assert h.uncleanShutdown == 0
    assert (h.singleEndLineChar + h.nonEndLineChar + h.doubleEndLineChar1
            + h.doubleEndLineChar2) == V.NEWLINE_CHARS
    assert h.pad == bytes(433)
    layout = V.qemu_sparse_layout(h.capacity, h.grainSize, h.numGTEsPerGT)
    assert (layout["rgdOffset"], layout["gdOffset"], layout["overHead"]) == (21, 26, 128)
    # header field offsets are the spec's, and they tile the sector
    rows = _types.field_layout(V.sparse_header, raw, structure="sparse_header")
    assert {r.field: (r.offset, r.size) for r in rows} == SPEC_OFFSETS
    _assert_tiles(rows, 512)
    flags_row = next(r for r in rows if r.field == "flags")
    assert "redundant grain table" in flags_row.display


def test_flag_constants_and_names():
    assert V.FLAG_VALID_NEWLINE | V.FLAG_REDUNDANT_GRAIN_TABLE == 0x3
    assert V.FLAG_VALID_NEWLINE | V.FLAG_REDUNDANT_GRAIN_TABLE | V.FLAG_COMPRESSED | V.FLAG_MARKERS == 0x30003
    assert (V.FLAG_ZERO_GRAIN, V.FLAG_COMPRESSED, V.FLAG_MARKERS) == (4, 0x10000, 0x20000)
    assert V.GD_AT_END == 2**64 - 1
    assert (V.COMPRESSION_NONE, V.COMPRESSION_DEFLATE) == (0, 1)
    flags_sc = V.sparse_header.subcons[2]
    d = _types.describer_of(flags_sc)
    assert d.describe(0x30007) == ("valid newline test, redundant grain table, zeroed-grain GTE, "
                                   "compressed grains, markers")
    assert "unknown bit 18" in d.describe(1 << 18)


def test_split_extent_headers_match_qemu_layout(images):
    root = images["src"].parent
    sizes = [4194304, 4194304, 2097152]
    for i, size in enumerate(sizes, 1):
        raw = _read(root / f"big-s{i:03d}.vmdk")[:512]
        h = V.sparse_header.parse(raw)
        assert V.sparse_header.build(h) == raw
        assert h.capacity == size
        layout = V.qemu_sparse_layout(size)
        assert (h.rgdOffset, h.gdOffset, h.overHead) == (
            layout["rgdOffset"], layout["gdOffset"], layout["overHead"])
    assert V.qemu_sparse_layout(4194304) == {"rgdOffset": 21, "gdOffset": 278, "overHead": 640,
                                             "numGDEntries": 64}


def test_geometry_helpers():
    assert V.gt_coverage(128, 512) == 65536
    assert V.num_gd_entries(20480, 128, 512) == 1
    assert V.num_gd_entries(4194304, 128, 512) == 64
    assert V.num_gd_entries(65537, 128) == 2
    assert V.num_gd_entries(0, 128) == 0
    assert V.gd_sectors(1) == 1 and V.gd_sectors(128) == 1 and V.gd_sectors(129) == 2
    assert V.gt_sectors(512) == 4 and V.gt_sectors(4096) == 32 and V.gt_sectors(1) == 1
    assert V.cowd_num_gd_entries(8192, 1) == 2
    with pytest.raises(ValueError):
        V.num_gd_entries(100, 0, 512)


# ---------------------------------------------------------------------------- GD / GT tables
def _tables(data: bytes, h):
    n = V.num_gd_entries(h.capacity, h.grainSize, h.numGTEsPerGT)
    gds, gts = V.gd_sectors(n), V.gt_sectors(h.numGTEsPerGT)
    gd = V.gd_table(n).parse(data[h.gdOffset * 512:])
    rgd = V.gd_table(n).parse(data[h.rgdOffset * 512:])
    return n, gds, gts, gd, rgd


@pytest.mark.parametrize("name", ["conv_monolithicSparse", "conv_twoGbMaxExtentSparse-s001",
                                  "conv_streamOptimized"])
def test_gd_gt_tables_point_at_sane_sectors(images, name):
    src = _read(images["src"])
    data = _read(images["src"].parent / f"{name}.vmdk")
    h = V.sparse_header.parse(data[:512])
    n, gds, gts, gd, rgd = _tables(data, h)
    assert n == 1 and gd.dtype == np.dtype("<u4")
    # primary GTs live between the primary GD and overHead, redundant ones before the GD
    assert ((gd >= h.gdOffset + gds) & (gd + gts <= h.overHead)).all()
    assert ((rgd >= h.rgdOffset + gds) & (rgd + gts <= h.gdOffset)).all()
    assert (gd != rgd).all()                      # different copies ...
    grain_bytes = h.grainSize * 512
    expected = {off // grain_bytes for off in DATA_AT}
    for g, r in zip(gd, rgd):
        gt = V.gt_table(h.numGTEsPerGT).parse(data[int(g) * 512:])
        rgt = V.gt_table(h.numGTEsPerGT).parse(data[int(r) * 512:])
        assert (gt == rgt).all()                  # ... with identical contents
        assert V.gt_table(512).build(gt) == data[int(g) * 512:int(g) * 512 + 2048]
        allocated = np.nonzero(gt)[0]
        assert set(allocated.tolist()) == expected
        sectors = gt[allocated].astype(np.int64)
        assert (sectors >= h.overHead).all() and (sectors * 512 < len(data)).all()
        assert len(set(sectors.tolist())) == len(sectors)
        for idx, sector in zip(allocated.tolist(), sectors.tolist()):
            want = src[idx * grain_bytes:(idx + 1) * grain_bytes]
            if h.flags & V.FLAG_COMPRESSED:
                rec = V.grain_record.parse(data[sector * 512:])
                assert rec.lba == idx * h.grainSize
                assert zlib.decompress(rec.data) == want
                assert V.grain_record.build(rec) == data[sector * 512:sector * 512 + 12 + rec.size + len(rec.padding)]
                assert V.grain_record_header.parse(data[sector * 512:]).size == rec.size
            else:
                assert sector % h.grainSize == 0
                assert data[sector * 512:sector * 512 + grain_bytes] == want


# ---------------------------------------------------------------------------- field_layout tiling
def _assert_tiles(rows, size):
    pos = rows[0].offset
    for r in rows:
        assert r.offset == pos, r.field
        pos += r.size
    assert pos - rows[0].offset == size
    assert sum(r.size for r in rows) == size


def _cowd_values(**over):
    v = dict(version=1, flags=3, numSectors=8192, grainSize=1, gdOffset=4, numGDEntries=2,
             freeSector=4 + 1 + 64, parentFileName=b"base-flat.vmdk".ljust(1024, b"\0"),
             parentGeneration=7, generation=9, name=b"disk".ljust(60, b"\0"),
             description=b"redo log".ljust(512, b"\0"), savedGeneration=8, reserved=bytes(8),
             uncleanShutdown=1, padding=bytes(396))
    v.update(over)
    return v


def _sesparse_values(**over):
    v = dict(version=V.SESPARSE_VERSION, capacity=2097152, grain_size=8, grain_table_size=64,
             flags=0, reserved1=0, reserved2=0, reserved3=0, reserved4=0,
             volatile_header_offset=1, volatile_header_size=1, journal_header_offset=2,
             journal_header_size=2, journal_offset=2048, journal_size=4096,
             grain_dir_offset=6144, grain_dir_size=16, grain_tables_offset=8192,
             grain_tables_size=32768, free_bitmap_offset=40960, free_bitmap_size=8,
             backmap_offset=40968, backmap_size=512, grains_offset=65536, grains_size=2097152,
             pad=bytes(304))
    v.update(over)
    return v


def _all_structs():
    return {name: obj for name, obj in vars(V).items() if isinstance(obj, cs.Struct)}


def test_every_vmdk_struct_field_is_documented():
    structs = _all_structs()
    assert {"sparse_header", "cowd_header", "sesparse_header", "sesparse_volatile_header",
            "marker", "grain_record_header"} <= set(structs)
    for name, st_ in structs.items():
        for sc in st_.subcons:
            if sc.name:
                assert _types.docs_of(sc), f"{name}.{sc.name} has no doc string"


def test_field_layout_tiles_every_struct():
    samples = {
        "sparse_header": V.sparse_header.build(dict(
            version=1, flags=3, capacity=CAPACITY, grainSize=128, descriptorOffset=1,
            descriptorSize=20, numGTEsPerGT=512, rgdOffset=21, gdOffset=26, overHead=128,
            uncleanShutdown=0, singleEndLineChar=b"\n", nonEndLineChar=b" ",
            doubleEndLineChar1=b"\r", doubleEndLineChar2=b"\n", compressAlgorithm=0, pad=bytes(433))),
        "cowd_header": V.cowd_header.build(_cowd_values()),
        "cowd_root": V.cowd_root.build(dict(root_cylinders=1, root_heads=2, root_sectors=3)),
        "sesparse_header": V.sesparse_header.build(_sesparse_values()),
        "sesparse_volatile_header": V.sesparse_volatile_header.build(dict(
            free_gt_number=1, next_txn_seq_number=2, replay_journal=0, pad=bytes(480))),
        "marker": V.marker.build(dict(val=4, size=0, type=V.MARKER_GT, pad=bytes(496))),
        "grain_record_header": V.grain_record_header.build(dict(lba=128, size=77)),
        "grain_record": V.grain_record.build(dict(lba=0, size=5, data=b"abcde", padding=bytes(495))),
    }
    assert set(samples) == set(_all_structs())
    for name, raw in samples.items():
        st_ = getattr(V, name)
        prefix = b"\xAA" * 7
        rows = _types.field_layout(st_, prefix + raw, structure=name, base_offset=1000, start=7)
        assert rows[0].offset == 1007
        _assert_tiles(rows, len(raw))
        assert all(r.field != "<padding>" for r in rows)
        assert st_.build(st_.parse(raw)) == raw
        if name != "grain_record":
            assert st_.sizeof() == len(raw)


# ---------------------------------------------------------------------------- streamOptimized
def test_markers_and_grain_records():
    for kind, val in ((V.MARKER_EOS, 0), (V.MARKER_GT, 4), (V.MARKER_GD, 1), (V.MARKER_FOOTER, 1)):
        raw = V.marker.build(dict(val=val, size=0, type=kind, pad=bytes(496)))
        assert len(raw) == V.MARKER_SIZE == 512
        assert raw[:16] == struct.pack("<QII", val, 0, kind)
        m = V.marker.parse(raw)
        assert (m.val, m.size, m.type) == (val, 0, kind)
    eos = V.marker.parse(bytes(512))
    assert (eos.val, eos.size, eos.type) == (0, 0, V.MARKER_EOS)
    assert [V.MARKER_EOS, V.MARKER_GT, V.MARKER_GD, V.MARKER_FOOTER] == [0, 1, 2, 3]
    rows = _types.field_layout(V.marker, V.marker.build(dict(val=1, size=0, type=3, pad=bytes(496))),
                               structure="marker")
    assert [r.display for r in rows if r.field == "type"] == ["3 (footer)"]
    hdr = V.grain_record_header.build(dict(lba=2**40, size=12345))
    assert hdr == struct.pack("<QI", 2**40, 12345)
    assert V.grain_record_header.sizeof() == V.GRAIN_RECORD_HEADER_SIZE == 12
    payload = zlib.compress(b"x" * 65536)
    rec = V.grain_record.build(dict(lba=256, size=len(payload), data=payload,
                                    padding=bytes(-(12 + len(payload)) % 512)))
    assert len(rec) % 512 == 0
    back = V.grain_record.parse(rec + b"trailing")
    assert back.lba == 256 and zlib.decompress(back.data) == b"x" * 65536


def test_vmware_style_stream_built_from_schemas_reads_in_qemu(images, tmp_path):
    """GD_AT_END stream (markers, footer, EOS) written with these schemas only: qemu-img
    must read it as identical to the raw source."""
    src = _read(images["src"])
    grain = 128
    n_gd = V.num_gd_entries(CAPACITY, grain)
    header = dict(version=3, flags=V.FLAG_VALID_NEWLINE | V.FLAG_COMPRESSED | V.FLAG_MARKERS,
                  capacity=CAPACITY, grainSize=grain, descriptorOffset=1, descriptorSize=20,
                  numGTEsPerGT=512, rgdOffset=0, gdOffset=V.GD_AT_END, overHead=128,
                  uncleanShutdown=0, singleEndLineChar=b"\n", nonEndLineChar=b" ",
                  doubleEndLineChar1=b"\r", doubleEndLineChar2=b"\n",
                  compressAlgorithm=V.COMPRESSION_DEFLATE, pad=bytes(433))
    desc = build_descriptor("streamOptimized", [("RW", CAPACITY, "SPARSE", "w.vmdk")],
                            cid=0x1234abcd, ddb=qemu_ddb(CAPACITY)).encode()
    out = bytearray(V.sparse_header.build(header))
    out += desc.ljust(20 * 512, b"\0")
    out += bytes(128 * 512 - len(out))
    gt = np.zeros(512, np.uint32)
    for idx in range(CAPACITY // grain):
        chunk = src[idx * grain * 512:(idx + 1) * grain * 512]
        if not chunk.strip(b"\0"):
            continue
        gt[idx] = len(out) // 512
        payload = zlib.compress(chunk)
        out += V.grain_record.build(dict(lba=idx * grain, size=len(payload), data=payload,
                                         padding=bytes(-(12 + len(payload)) % 512)))
    out += V.marker.build(dict(val=V.gt_sectors(), size=0, type=V.MARKER_GT, pad=bytes(496)))
    gt_sector = len(out) // 512
    out += V.gt_table(512).build(gt)
    out += V.marker.build(dict(val=V.gd_sectors(n_gd), size=0, type=V.MARKER_GD, pad=bytes(496)))
    gd_sector = len(out) // 512
    out += V.gd_table(n_gd).build([gt_sector]).ljust(V.gd_sectors(n_gd) * 512, b"\0")
    out += V.marker.build(dict(val=1, size=0, type=V.MARKER_FOOTER, pad=bytes(496)))
    out += V.sparse_header.build(dict(header, gdOffset=gd_sector))
    out += V.marker.build(dict(val=0, size=0, type=V.MARKER_EOS, pad=bytes(496)))
    path = tmp_path / "w.vmdk"
    path.write_bytes(bytes(out))
    # parse our own footer back
    assert V.marker.parse(out[-1536:]).type == V.MARKER_FOOTER
    assert V.sparse_header.parse(out[-1024:]).gdOffset == gd_sector
    assert V.marker.parse(out[-512:]).type == V.MARKER_EOS
    proc = oracle.run(oracle.QEMU_IMG, "compare", "-f", "vmdk", "-F", "raw", str(path),
                      str(images["src"]), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = oracle.qemu_info(path, fmt="vmdk")
    assert info["virtual-size"] == CAPACITY * 512


# ---------------------------------------------------------------------------- COWD
def test_cowd_header_built_from_values_parses_back():
    raw = V.cowd_header.build(_cowd_values())
    assert len(raw) == V.COWD_HEADER_SIZE == 2048
    assert raw[:4] == V.COWD_MAGIC
    assert struct.unpack_from("<7I", raw, 4) == (1, 3, 8192, 1, 4, 2, 69)
    h = V.cowd_header.parse(raw)
    for k, v in _cowd_values().items():
        assert h[k] == v, k
    assert V.cowd_header.build(h) == raw
    assert V.cowd_parent_file_name(h) == b"base-flat.vmdk"
    rows = {r.field: (r.offset, r.size) for r in _types.field_layout(V.cowd_header, raw, structure="cowd")}
    assert rows["parentFileName"] == (32, 1024)
    assert rows["parentGeneration"] == (1056, 4)
    assert rows["generation"] == (1060, 4)
    assert rows["name"] == (1064, 60)
    assert rows["description"] == (1124, 512)
    assert rows["savedGeneration"] == (1636, 4)
    assert rows["uncleanShutdown"] == (1648, 4)
    assert rows["padding"] == (1652, 396)
    assert struct.unpack_from("<I", raw, 1648) == (1,)
    with pytest.raises(cs.ConstructError):
        V.cowd_header.parse(b"KDMV" + raw[4:])


def test_cowd_root_geometry_union():
    geo = struct.pack("<III", 1024, 16, 63).ljust(1024, b"\0")
    raw = V.cowd_header.build(_cowd_values(parentFileName=geo, parentGeneration=0))
    h = V.cowd_header.parse(raw)
    assert V.cowd_root_geometry(h) == {"root_cylinders": 1024, "root_heads": 16, "root_sectors": 63}
    assert V.cowd_root_geometry(raw[32:44]) == V.cowd_root_geometry(h)
    assert struct.unpack_from("<III", raw, 32) == (1024, 16, 63)
    assert V.COWD_GT_ENTRIES == 4096
    gt = np.arange(V.COWD_GT_ENTRIES, dtype=np.uint32)
    assert len(V.gt_table(V.COWD_GT_ENTRIES).build(gt)) == 16384


# ---------------------------------------------------------------------------- seSparse
def test_sesparse_headers_built_from_values_parse_back():
    raw = V.sesparse_header.build(_sesparse_values())
    assert len(raw) == 512
    assert raw[:8] == b"\xBE\xBA\xFE\xCA\x00\x00\x00\x00"
    assert struct.unpack_from("<Q", raw, 8) == (V.SESPARSE_VERSION,)
    h = V.sesparse_header.parse(raw)
    for k, v in _sesparse_values().items():
        assert h[k] == v, k
    assert h.magic == V.SESPARSE_MAGIC
    assert V.sesparse_header.build(h) == raw
    rows = {r.field: (r.offset, r.size) for r in _types.field_layout(V.sesparse_header, raw, structure="se")}
    assert rows["volatile_header_offset"] == (80, 8)
    assert rows["grain_dir_offset"] == (128, 8)
    assert rows["grains_size"] == (200, 8)
    assert rows["pad"] == (208, 304)
    vol = V.sesparse_volatile_header.build(dict(free_gt_number=3, next_txn_seq_number=99,
                                                replay_journal=1, pad=bytes(480)))
    assert len(vol) == 512 and struct.unpack_from("<QQQQ", vol) == (0xCAFECAFE, 3, 99, 1)
    v = V.sesparse_volatile_header.parse(vol)
    assert (v.magic, v.replay_journal) == (V.SESPARSE_VOLATILE_MAGIC, 1)
    assert V.sesparse_volatile_header.build(v) == vol
    with pytest.raises(cs.ConstructError):
        V.sesparse_volatile_header.parse(raw)      # CAFEBABE is not the volatile magic


def _spec_cluster(e: int) -> int:
    return ((e & 0x0FFF000000000000) >> 48) | ((e & 0x0000FFFFFFFFFFFF) << 12)


def test_sesparse_entry_decoding():
    entries = np.array([0, 0x1000000000000000, 0x2000000000000000,
                        0x3000000000000000 | 0x0123000000000456, 0x3FFFFFFFFFFFFFFF,
                        0x4000000000000000, 0x0000000000000007], dtype=np.uint64)
    raw = V.sesparse_table(len(entries)).build(entries)
    assert raw == entries.astype("<u8").tobytes()
    parsed = V.sesparse_table(len(entries)).parse(raw)
    kind, cluster = V.decode_sesparse_gt(parsed)
    assert kind.tolist() == [0, 1, 2, 3, 3, 4, 0]
    assert cluster.tolist() == [0, 0, 0, _spec_cluster(0x3123000000000456),
                                _spec_cluster(0x3FFFFFFFFFFFFFFF), 0, 0]
    assert V.sesparse_gt_malformed(parsed).tolist() == [False] * 5 + [True, True]
    gd = np.array([0, 0x1000000000000005, 0x2000000000000005, 0x10000001FFFFFFFF], dtype=np.uint64)
    alloc, index = V.decode_sesparse_gd(gd)
    assert alloc.tolist() == [False, True, False, False]
    assert index.tolist() == [0, 5, 0, 0]
    # vectorised: a million entries in one call
    big = np.full(1 << 20, 0x3000000000000001, dtype=np.uint64)
    k, c = V.decode_sesparse_gt(big)
    assert (k == 3).all() and (c == 4096).all()


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, (1 << 60) - 1)), min_size=1, max_size=50))
def test_sesparse_gt_encode_decode_round_trip(pairs):
    kinds = np.array([k for k, _ in pairs], dtype=np.uint8)
    clusters = np.array([c if k == 3 else 0 for k, c in pairs], dtype=np.uint64)
    entries = V.encode_sesparse_gt(kinds, clusters)
    for e, (k, c) in zip(entries.tolist(), pairs):
        assert e >> 60 == k
        if k == 3:
            assert _spec_cluster(e) == c
    k2, c2 = V.decode_sesparse_gt(entries)
    assert (k2 == kinds).all() and (c2 == clusters).all()
    assert not V.sesparse_gt_malformed(entries).any()


# ---------------------------------------------------------------------------- descriptors from qemu-img
def _descriptor_cases(images):
    root = images["src"].parent
    names = [f"{p}_{t}" for t in QEMU_CREATE_TYPES for p in ("new", "conv")]
    names += ["child", "zeroed", "opts", "compat6", "big"]
    return [(n, root / f"{n}.vmdk") for n in names]


def test_qemu_descriptors_parse_and_rebuild_byte_for_byte(images):
    seen_types = set()
    for name, path in _descriptor_cases(images):
        stored, base = _descriptor_text(path)
        text = stored.split(b"\0", 1)[0]
        d = parse_descriptor(stored, base)
        assert d.problems == [], (name, d.problems)
        assert d.size == len(text) and d.base_offset == base
        assert d.version == 1 and d.encoding is None and d.codec == "utf-8"
        seen_types.add(d.create_type)
        cid_hex = re.search(rb"^CID=([0-9a-f]+)$", text, re.M).group(1)
        assert d.cid == int(cid_hex, 16)
        assert d.get("CID") == cid_hex.decode()
        assert [c.value for c in d.comments] == ["Disk DescriptorFile", "Extent description",
                                                 "The Disk Data Base", "DDB"]
        folder = path.parent
        for e in d.extents:
            assert e.access == "RW" and e.type in ("SPARSE", "FLAT") and e.extra == ()
            assert (folder / e.filename).is_file(), (name, e.filename)
            assert e.offset == (0 if e.type == "FLAT" else None)
        if name == "big":
            assert [e.sectors for e in d.extents] == [4194304, 4194304, 2097152]
            assert [e.filename for e in d.extents] == ["big-s001.vmdk", "big-s002.vmdk", "big-s003.vmdk"]
        assert d.total_sectors == sum(e.sectors for e in d.extents)
        # every entry's raw text sits at its offset; lines tile the text
        spans = []
        for e in d.header + d.ddb + d.comments:
            assert stored[e.offset - base:e.offset - base + e.length].rstrip(b"\n").decode() == e.raw
            spans.append((e.offset, e.length))
        for e in d.extents:
            assert stored[e.byte_offset - base:e.byte_offset - base + e.length].rstrip(b"\n").decode() == e.raw
            spans.append((e.byte_offset, e.length))
        blank = text.count(b"\n\n") + text.startswith(b"\n")
        assert sum(n for _, n in spans) + blank == len(text)
        # the canonical writer reproduces qemu's bytes from the parsed values
        built = build_descriptor(d.create_type, d.extents, cid=d.cid, parent_cid=d.parent_cid,
                                 parent_hint=d.parent_hint, ddb={e.key: e.value for e in d.ddb})
        assert built.encode() == text, name
        again = parse_descriptor(built)
        assert again.problems == [] and again.cid == d.cid and again.create_type == d.create_type
        assert [(e.access, e.sectors, e.type, e.filename, e.offset) for e in again.extents] == \
               [(e.access, e.sectors, e.type, e.filename, e.offset) for e in d.extents]
        # and qemu_ddb reproduces qemu's disk database
        ddb = {e.key: e.value for e in d.ddb}
        assert qemu_ddb(d.total_sectors, adapter_type=ddb["ddb.adapterType"],
                        hw_version=ddb["ddb.virtualHWVersion"],
                        tools_version=ddb["ddb.toolsVersion"]) == ddb
    assert seen_types == set(QEMU_CREATE_TYPES)


def test_qemu_descriptor_values(images):
    root = images["src"].parent
    base = parse_descriptor(*_descriptor_text(images["new_monolithicSparse"]))
    child = parse_descriptor(*_descriptor_text(images["child"]))
    assert base.parent_cid == 0xFFFFFFFF and base.parent_hint is None
    assert child.parent_cid == base.cid
    assert child.parent_hint == "new_monolithicSparse.vmdk"
    assert [e.key for e in child.header] == ["version", "CID", "parentCID", "createType",
                                             "parentFileNameHint"]
    text = _descriptor_text(images["child"])[0].split(b"\0")[0]
    assert b'parentFileNameHint="new_monolithicSparse.vmdk"\n# Extent description\n' in text
    assert child.extents[0].filename == "child.vmdk" and child.extents[0].sectors == CAPACITY
    flat = parse_descriptor(_read(images["conv_monolithicFlat"]))
    assert len(_read(images["conv_monolithicFlat"])) == 512          # convert pads with NULs
    assert flat.extents[0].filename == "conv_monolithicFlat-flat.vmdk" and flat.extents[0].offset == 0
    opts = parse_descriptor(_read(images["opts"]))
    assert opts.get("ddb.adapterType") == "lsilogic" and opts.get("ddb.geometry.heads") == "255"
    assert opts.get("ddb.virtualHWVersion") == "7" and opts.get("ddb.toolsVersion") == "1234"
    assert opts.get("ddb.geometry.cylinders") == str(204800 // (63 * 255))
    c6 = parse_descriptor(*_descriptor_text(images["compat6"]))
    assert c6.get("ddb.virtualHWVersion") == "6" and c6.get("ddb.adapterType") == "legacyESX"
    # split sparse extents reserve the descriptor area but leave it empty
    empty = parse_descriptor(*_descriptor_text(root / "big-s001.vmdk"))
    assert empty.size == 0 and empty.problems == [(0, 512, "empty descriptor")]


# ---------------------------------------------------------------------------- descriptor variants
VMWARE_VMFS = b"""# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=fffffffe
parentCID=ffffffff
isNativeSnapshot="no"
createType="vmfs"

# Extent description
RW 41943040 VMFS "My VM disk-flat.vmdk"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.deletable = "true"
ddb.geometry.cylinders = "2610"
ddb.geometry.heads = "255"
ddb.geometry.sectors = "63"
ddb.longContentID = "4d6f0b1a2b3c4d5e6f708192fffffffe"
ddb.thinProvisioned = "1"
ddb.uuid = "60 00 C2 9a 1b 2c 3d 4e-5f 60 71 82 93 a4 b5 c6"
ddb.virtualHWVersion = "8"
"""


def test_vmware_descriptor_has_no_problems():
    d = parse_descriptor(VMWARE_VMFS)
    assert d.problems == []
    assert d.encoding == "UTF-8" and d.cid == 0xFFFFFFFE and d.create_type == "vmfs"
    assert d.get("isNativeSnapshot") == "no"
    e = d.extents[0]
    assert (e.access, e.sectors, e.type, e.filename, e.offset, e.extra) == \
           ("RW", 41943040, "VMFS", "My VM disk-flat.vmdk", None, ())
    assert d.get("ddb.uuid") == "60 00 C2 9a 1b 2c 3d 4e-5f 60 71 82 93 a4 b5 c6"
    assert d.get("DDB.THINPROVISIONED") == "1"            # lenient lookup
    assert d.get("missing", "x") == "x"
    assert len(d.ddb) == 9


def test_crlf_is_equivalent_to_lf():
    lf = parse_descriptor(VMWARE_VMFS)
    crlf_bytes = VMWARE_VMFS.replace(b"\n", b"\r\n")
    crlf = parse_descriptor(crlf_bytes, base_offset=512)
    assert crlf.problems == []
    for a, b in zip(lf.header + lf.ddb, crlf.header + crlf.ddb):
        assert (a.key, a.value, a.line) == (b.key, b.value, b.line)
        assert b.length == a.length + 1
        assert crlf_bytes[b.offset - 512:b.offset - 512 + b.length].endswith(b"\r\n")
    assert [(e.sectors, e.filename) for e in crlf.extents] == [(e.sectors, e.filename) for e in lf.extents]
    assert crlf.size == len(crlf_bytes)


def test_odd_spacing_quotes_and_comments():
    text = (b"   # Disk DescriptorFile with leading spaces\n"
            b"#\n"
            b"\n\n"
            b"  version = 1  \n"
            b"\t# a tab-indented comment\n"
            b"CID =   0a1b2c3d\n"
            b"parentCID=\"ffffffff\"\n"
            b"createType = monolithicFlat\n"
            b"parentFileNameHint=\"C:\\VMs\\base disk.vmdk\"\n"
            b"# comment between settings = with an equals sign\n"
            b"futureKey=\"whatever\"\n"
            b"  RW    2048   FLAT   \"disk with  spaces-flat.vmdk\"   0\n"
            b"RDONLY 1024 FLAT \"/vmfs/volumes/ds 1/vm/ro-flat.vmdk\" 16\n"
            b"NOACCESS 512 ZERO\n"
            b"RW 63 FLAT \"\\\\.\\PhysicalDrive2\" 0 partitionUUID-1234 \\\\?\\Volume{abc}\n"
            b"RW 100 ZERO \"zero-file.vmdk\"\n"
            b"#DDB\n"
            b"ddb.adapterType=\"ide\"\n"
            b"ddb.geometry.heads    =    \"16\"\n"
            b"ddb.unknown.thing = bare value\n"
            b"ddb.empty = \"\"\n")
    d = parse_descriptor(text)
    assert d.problems == []
    assert d.version == 1 and d.cid == 0x0A1B2C3D and d.parent_cid == 0xFFFFFFFF
    assert d.create_type == "monolithicFlat"
    assert d.parent_hint == "C:\\VMs\\base disk.vmdk"
    assert d.get("futureKey") == "whatever"
    assert [(e.access, e.sectors, e.type, e.filename, e.offset, e.extra) for e in d.extents] == [
        ("RW", 2048, "FLAT", "disk with  spaces-flat.vmdk", 0, ()),
        ("RDONLY", 1024, "FLAT", "/vmfs/volumes/ds 1/vm/ro-flat.vmdk", 16, ()),
        ("NOACCESS", 512, "ZERO", None, None, ()),
        ("RW", 63, "FLAT", "\\\\.\\PhysicalDrive2", 0, ("partitionUUID-1234", "\\\\?\\Volume{abc}")),
        ("RW", 100, "ZERO", "zero-file.vmdk", None, ()),
    ]
    assert d.total_sectors == 2048 + 1024 + 512 + 63 + 100
    assert d.get("ddb.geometry.heads") == "16" and d.get("ddb.unknown.thing") == "bare value"
    assert d.get("ddb.empty") == ""
    assert len(d.comments) == 5 and d.comments[1].value == ""
    assert d.comments[0].raw == "   # Disk DescriptorFile with leading spaces"
    assert d.extents[0].line == 13
    # round trip through the writer keeps the extents (extra fields included)
    rebuilt = parse_descriptor(build_descriptor("custom", d.extents, cid=5, ddb={"adapterType": "ide"}))
    assert rebuilt.problems == []
    assert [(e.access, e.sectors, e.type, e.filename, e.offset, e.extra) for e in rebuilt.extents] == \
           [(e.access, e.sectors, e.type, e.filename, e.offset, e.extra) for e in d.extents]
    assert rebuilt.get("ddb.adapterType") == "ide" and rebuilt.cid == 5


def test_version3_change_tracking_and_aliases():
    text = ("# Disk DescriptorFile\nversion=3\nencoding=\"windows-1252\"\nCID=1\nparentCID=ffffffff\n"
            "createType=\"2GbMaxExtentSparse\"\n\n# Extent description\n"
            "RW 4192256 SPARSE \"caf\xe9-s001.vmdk\"\n\n# Change Tracking File\n"
            "changeTrackPath=\"caf\xe9-ctk.vmdk\"\n").encode("cp1252")
    d = parse_descriptor(text)
    assert d.problems == []
    assert d.version == 3 and d.codec == "cp1252" and d.encoding == "windows-1252"
    assert d.extents[0].filename == "caf\xe9-s001.vmdk"
    assert d.get("changeTrackPath") == "caf\xe9-ctk.vmdk"
    sjis = ('version=1\nencoding="Shift_JIS"\nCID=2\ncreateType="monolithicFlat"\n'
            'RW 8 FLAT "ディスク-flat.vmdk" 0\n').encode("shift_jis")
    d = parse_descriptor(sjis)
    assert d.problems == [] and d.extents[0].filename == "ディスク-flat.vmdk"
    # byte offsets stay byte offsets under a multi-byte codec
    assert d.extents[0].byte_offset == sjis.index(b"RW") and d.extents[0].length == len(sjis) - sjis.index(b"RW")


def test_encoding_problems_fall_back_to_utf8():
    for enc in ("no-such-codec", "utf-16", "rot13", "unicode_escape", "base64"):
        d = parse_descriptor(f'version=1\nencoding="{enc}"\nCID=1\ncreateType="vmfs"\nRW 1 VMFS "a"\n'.encode())
        assert d.codec == "utf-8", enc
        assert [p[0] for p in d.problems] == [2], (enc, d.problems)
    d = parse_descriptor(b'version=1\nCID=1\ncreateType="vmfs"\nRW 1 VMFS "bad\xff\xfename"\n')
    assert d.extents[0].filename == "bad\udcff\udcfename"
    assert d.problems == [(4, 34, "bytes not valid in utf-8")]
    d = parse_descriptor('\ufeffversion=1\nCID=1\ncreateType="vmfs"\nRW 1 VMFS "é"\n'.encode())
    assert d.problems == [] and d.version == 1 and d.extents[0].filename == "é"


def test_nul_cuts_the_text():
    text = VMWARE_VMFS + b"\0" * 100 + b"RW 5 FLAT \"hidden\" 0\n"
    d = parse_descriptor(text, base_offset=512)
    assert d.size == len(VMWARE_VMFS) and len(d.extents) == 1 and d.problems == []


def test_bad_lines_become_problems():
    text = (b"# Disk DescriptorFile\n"
            b"version=7\n"
            b"CID=xyz\n"
            b"parentCID=0x1F\n"
            b"createType=\"monolithicSparse\n"
            b"createtype=\"vmfs\"\n"
            b"this line is garbage\n"
            b"=novalue\n"
            b"bad key=1\n"
            b"RW abc SPARSE \"f.vmdk\"\n"
            b"RW 10 WEIRD \"f.vmdk\"\n"
            b"RW 10 FLAT \"f.vmdk\"\n"
            b"RW 10 FLAT \"f.vmdk\" zz\n"
            b"RW 10 SPARSE\n"
            b"RW 10 SPARSE unquoted.vmdk\n"
            b"RW 10 SPARSE \"unterminated.vmdk\n"
            b"rw 10 sparse \"lower.vmdk\"\n"
            b"RW\n")
    d = parse_descriptor(text, base_offset=1000)
    lines = {}
    for line, off, msg in d.problems:
        lines.setdefault(line, []).append(msg)
        if line:
            assert off == 1000 + sum(len(x) + 1 for x in text.split(b"\n")[:line - 1])
    assert "is not 1, 2 or 3" in lines[2][0]
    assert "not 1-8 hex digits (unreadable)" in lines[3][0]
    assert "read by QEMU as 1f" in lines[4][0]
    assert "unterminated quote" in lines[5][0]
    assert any("differs in case" in m for m in lines[6]) and any("duplicate" in m for m in lines[6])
    assert "unrecognised line" in lines[7][0]
    assert "without a key" in lines[8][0]
    assert "contains whitespace" in lines[9][0]
    assert "not a decimal sector count" in lines[10][0]
    assert "unknown extent type" in lines[11][0]
    assert "without an offset" in lines[12][0]
    assert "offset 'zz'" in lines[13][0]
    assert "without a file name" in lines[14][0]
    assert "not quoted" in lines[15][0]
    assert "unterminated quote" in lines[16][0]
    assert len(lines[17]) == 2 and all("upper case" in m for m in lines[17])
    assert "unrecognised line" in lines[18][0]
    assert d.version == 7 and d.cid is None and d.parent_cid == 0x1F
    assert d.create_type == "monolithicSparse"        # unterminated quote: value kept
    assert [e.filename for e in d.extents] == ["f.vmdk", "f.vmdk", "f.vmdk", "f.vmdk", None,
                                               "unquoted.vmdk", "unterminated.vmdk", "lower.vmdk"]
    assert d.extents[0].sectors is None and d.extents[-1].type == "SPARSE"
    assert d.extents[3].offset is None and d.extents[3].extra == ("zz",)


def test_missing_settings_and_empty_text():
    assert parse_descriptor(b"").problems == [(0, 0, "empty descriptor")]
    assert parse_descriptor(b"\0" * 10240, 512).problems == [(0, 512, "empty descriptor")]
    d = parse_descriptor(b"# only a comment\nddb.adapterType = \"ide\"\n")
    msgs = [m for _, _, m in d.problems]
    assert msgs == ["no version setting", "no createType setting", "no CID setting", "no extent lines"]
    d = parse_descriptor(b'CID=1\nversion=1\ncreateType="vmfs"\nRW 1 VMFS "x"\n')
    assert [m for _, _, m in d.problems] == [
        "first setting is not 'version' (QEMU's probe would not recognise the text)"]


def test_parse_cid_like_qemu():
    assert parse_cid("ffffffff") == 0xFFFFFFFF
    assert parse_cid("ae553db") == 0xAE553DB
    assert parse_cid("  0x10") == 16
    assert parse_cid("-1") == 0xFFFFFFFF
    assert parse_cid("123456789") == 0x23456789
    assert parse_cid("1g") == 1
    assert parse_cid("ff" * 20) == 0xFFFFFFFF
    assert parse_cid("zz") is None and parse_cid("") is None and parse_cid(None) is None


def test_build_descriptor_template():
    text = build_descriptor("monolithicSparse", [ExtentLine("RW", 20480, "SPARSE", "a.vmdk")],
                            cid=0xAE553DB, parent_cid=0x1234, parent_hint="base.vmdk",
                            ddb=qemu_ddb(20480))
    assert text == ('# Disk DescriptorFile\nversion=1\nCID=ae553db\nparentCID=1234\n'
                    'createType="monolithicSparse"\nparentFileNameHint="base.vmdk"\n'
                    '# Extent description\nRW 20480 SPARSE "a.vmdk"\n\n'
                    '# The Disk Data Base\n#DDB\n\n'
                    'ddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "20"\n'
                    'ddb.geometry.heads = "16"\nddb.geometry.sectors = "63"\n'
                    'ddb.adapterType = "ide"\nddb.toolsVersion = "2147483647"\n')
    assert format_extent(("RW", 2048, "FLAT", "x-flat.vmdk", 0)) == 'RW 2048 FLAT "x-flat.vmdk" 0'
    assert format_extent(("NOACCESS", 5, "ZERO")) == "NOACCESS 5 ZERO"
    assert qemu_ddb(10 << 21, adapter_type="buslogic")["ddb.geometry.cylinders"] == str((10 << 21) // (63 * 255))
    assert isinstance(parse_descriptor(text), Descriptor)
    assert isinstance(parse_descriptor(text).header[0], DescriptorEntry)


# ---------------------------------------------------------------------------- fuzzing
def _check_invariants(d: Descriptor, size: int, base: int) -> None:
    assert 0 <= d.size <= size
    for p in d.problems:
        assert isinstance(p, tuple) and len(p) == 3
        line, off, msg = p
        assert isinstance(line, int) and isinstance(off, int) and isinstance(msg, str)
        assert base <= off <= base + d.size
    for e in d.header + d.ddb + d.comments:
        assert base <= e.offset and e.offset + e.length <= base + d.size
    for e in d.extents:
        assert base <= e.byte_offset and e.byte_offset + e.length <= base + d.size
    # properties never raise either
    d.version, d.cid, d.parent_cid, d.create_type, d.parent_hint, d.encoding, d.total_sectors


_FRAGMENTS = [
    "# Disk DescriptorFile", "version=1", "version=", 'encoding="UTF-8"', 'encoding="', "CID=",
    "CID=zz", "parentCID=ffffffff", 'createType="', 'createType="vmfs"', "RW", "RW 1", "RW 1 FLAT",
    'RW 1 FLAT "a b"', 'RW 1 FLAT "a" 0 x y', "RDONLY x y z", "NOACCESS 0 ZERO", "ddb.", "ddb.x=",
    'ddb.uuid = "60 00"', "=", '"', "#", " ", "\t", "\r", "\u00e9", "\udcff", "\x00", "\x85",
    'encoding="shift_jis"', 'encoding="utf-16"', "\\\\.\\PhysicalDrive0",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048), st.integers(0, 1 << 40))
def test_random_bytes_never_raise(data, base):
    d = parse_descriptor(data, base)
    _check_invariants(d, len(data), base)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=1024))
def test_random_text_never_raises(text):
    d = parse_descriptor(text)
    _check_invariants(d, 4 * len(text), 0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_FRAGMENTS), max_size=6).map(lambda xs: " ".join(xs)),
                max_size=20),
       st.sampled_from(["\n", "\r\n", "\n\n"]),
       st.sampled_from(["utf-8", "cp1252", "latin-1"]))
def test_descriptor_shaped_noise_never_raises(lines, sep, enc):
    text = sep.join(lines)
    for data in (text, text.encode(enc, "surrogateescape") if enc == "utf-8"
                 else text.encode(enc, "replace")):
        d = parse_descriptor(data, 512)
        _check_invariants(d, len(data) * 4, 512)
