"""The annotated hex view (imgscope.hexview, `imgscope hexdump`) on real images.

The HTML is parsed with html.parser: the spans carrying `data-field` must sit on
the bytes the format's spec gives each field (offsets written here from the spec
notes, not taken from imgscope), cover every byte of a header exactly once, and
their hover titles must hold the values `qemu-img info` reports.  The text form
is held against Python's own hexdump -C formatting of the file's bytes.  Damaged
and hostile files (truncated, random bytes, a descriptor full of markup and
escape sequences, absurd lengths) give bounded dumps or one-line errors.
"""
from __future__ import annotations

import json
import os
import random
import re
import struct
import subprocess
import sys
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest

import imgscope
from imgscope import hexview
from imgscope.cli import main as cli_main
from imgscope.errors import ImageError

import oracle

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"

# ---- field offsets from the format spec notes ---------------------------------------------
QCOW2_HEADER = {"magic": (0, 4), "version": (4, 4), "backing_file_offset": (8, 8),
                "backing_file_size": (16, 4), "cluster_bits": (20, 4), "size": (24, 8),
                "crypt_method": (32, 4), "l1_size": (36, 4), "l1_table_offset": (40, 8),
                "refcount_table_offset": (48, 8), "refcount_table_clusters": (56, 4),
                "nb_snapshots": (60, 4), "snapshots_offset": (64, 8),
                "incompatible_features": (72, 8), "compatible_features": (80, 8),
                "autoclear_features": (88, 8), "refcount_order": (96, 4),
                "header_length": (100, 4), "compression_type": (104, 1)}
VHD_FOOTER = {"cookie": (0, 8), "features": (8, 4), "fileFormatVersion": (12, 4),
              "dataOffset": (16, 8), "timeStamp": (24, 4), "creatorApplication": (28, 4),
              "creatorVersion": (32, 4), "creatorHostOS": (36, 4), "originalSize": (40, 8),
              "currentSize": (48, 8), "cylinders": (56, 2), "heads": (58, 1),
              "sectorsPerTrack": (59, 1), "diskType": (60, 4), "checksum": (64, 4),
              "uniqueId": (68, 16), "savedState": (84, 1)}
VDI_HEADER = {"pre_header.text": (0x00, 64), "pre_header.signature": (0x40, 4),
              "pre_header.version": (0x44, 4), "header.header_size": (0x48, 4),
              "header.image_type": (0x4C, 4), "header.image_flags": (0x50, 4),
              "header.description": (0x54, 256), "header.offset_bmap": (0x154, 4),
              "header.offset_data": (0x158, 4), "header.cylinders": (0x15C, 4),
              "header.heads": (0x160, 4), "header.sectors": (0x164, 4),
              "header.sector_size": (0x168, 4), "header.disk_size": (0x170, 8),
              "header.block_size": (0x178, 4), "header.block_extra": (0x17C, 4),
              "header.blocks_in_image": (0x180, 4), "header.blocks_allocated": (0x184, 4),
              "header.uuid_image": (0x188, 16), "header.uuid_last_snap": (0x198, 16),
              "header.uuid_link": (0x1A8, 16), "header.uuid_parent": (0x1B8, 16)}
VMDK_HEADER = {"magicNumber": (0x00, 4), "version": (0x04, 4), "flags": (0x08, 4),
               "capacity": (0x0C, 8), "grainSize": (0x14, 8), "descriptorOffset": (0x1C, 8),
               "descriptorSize": (0x24, 8), "numGTEsPerGT": (0x2C, 4), "rgdOffset": (0x30, 8),
               "gdOffset": (0x38, 8), "overHead": (0x40, 8), "uncleanShutdown": (0x48, 1),
               "singleEndLineChar": (0x49, 1), "nonEndLineChar": (0x4A, 1),
               "doubleEndLineChar1": (0x4B, 1), "doubleEndLineChar2": (0x4C, 1),
               "compressAlgorithm": (0x4D, 2)}
VHDX_HEADER = {"signature": (0, 4), "checksum": (4, 4), "sequence_number": (8, 8),
               "file_write_guid": (16, 16), "data_write_guid": (32, 16), "log_guid": (48, 16),
               "log_version": (64, 2), "version": (66, 2), "log_length": (68, 4),
               "log_offset": (72, 8), "reserved": (80, 4016)}
VHDX_HEADER1 = 64 << 10


# ---- helpers -----------------------------------------------------------------------------
class SpanParser(HTMLParser):
    """Every <span data-field> of the hex columns: its attributes and its text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.spans: list[dict] = []
        self.tags: list[str] = []
        self._open: dict | None = None
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag != "span":
            return
        a = dict(attrs)
        if self._open is not None:
            self._depth += 1
        elif "data-field" in a:
            self._open = dict(a, text="")
            self._depth = 0

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            if self._depth:
                self._depth -= 1
            else:
                self.spans.append(self._open)
                self._open = None

    def handle_data(self, data):
        if self._open is not None:
            self._open["text"] += data


def parse_spans(html: str) -> list[dict]:
    p = SpanParser()
    p.feed(html)
    p.close()
    return p.spans


def byte_owners(spans: list[dict]) -> dict[int, dict]:
    """address -> span, from each span's first address and its hex pairs; a byte named
    by two spans fails here."""
    owners: dict[int, dict] = {}
    for s in spans:
        start = int(s["data-start"])
        pairs = s["text"].split()
        assert all(re.fullmatch(r"[0-9a-f]{2}", p) for p in pairs), s["text"]
        for k, p in enumerate(pairs):
            addr = start + k
            assert addr not in owners, f"byte {addr:#x} in two spans"
            owners[addr] = dict(s, byte=int(p, 16))
    return owners


def title_value(title: str) -> str:
    """The display value in a hover title `structure.field = value — meaning`."""
    return title.split(" = ", 1)[1].split(" \u2014 ", 1)[0]


def first_number(title: str) -> int:
    return int(title_value(title).split()[0])


def check_fields(owners: dict, data: bytes, base: int, spec: dict, prefix: str) -> dict:
    """Every byte of each spec field lies in a span naming that field at its offset, and
    the span shows the file's byte.  Returns label -> hover title."""
    titles = {}
    for name, (off, size) in spec.items():
        label = name if "." in name and not prefix else f"{prefix}.{name}"
        for k in range(size):
            addr = base + off + k
            assert addr in owners, f"{label}: byte {addr:#x} not annotated"
            s = owners[addr]
            assert s["data-field"] == label, f"byte {addr:#x}: {s['data-field']} != {label}"
            assert int(s["data-offset"]) == base + off, label
            assert int(s["data-size"]) == size, label
            assert s["byte"] == data[addr - base + 0], f"{label}: byte {addr:#x} differs"
        titles[label] = owners[base + off]["title"]
    return titles


def assert_tiles(owners: dict, lo: int, hi: int) -> None:
    """Every byte of [lo, hi) in exactly one span (byte_owners already refused doubles)."""
    missing = [a for a in range(lo, hi) if a not in owners]
    assert not missing, f"{len(missing)} bytes unannotated, first {missing[0]:#x}"


def hexdump_c(data: bytes, offset: int, width: int = 16) -> list[str]:
    """hexdump -C lines of `data` (offset aligned to width), by Python's formatting."""
    out = []
    for at in range(0, len(data), width):
        chunk = data[at:at + width]
        groups = [" ".join(f"{b:02x}" for b in chunk[g:g + 8]) for g in range(0, width, 8)]
        hexcols = "  ".join(groups)
        full = "  ".join(" ".join("xx" for _ in range(min(8, width - g)))
                         for g in range(0, width, 8))
        asc = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        out.append(f"{offset + at:08x}  {hexcols.ljust(len(full))}  |{asc}|")
    out.append(f"{offset + len(data):08x}")
    return out


def run_cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONFAULTHANDLER="0")
    return subprocess.run([sys.executable, "-m", "imgscope", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd="/")


def cli(capsys, *args) -> tuple[int, str, str]:
    code = cli_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qemu():
    """qemu-img info of the samples the header tests use."""
    oracle.require_tools()
    return {name: oracle.qemu_info(SAMPLES / name)
            for name in ("demo.qcow2", "sparse.vhd", "sparse.vdi", "sparse.vmdk", "sparse.vhdx")}


@pytest.fixture(scope="module")
def demo():
    with imgscope.open(SAMPLES / "demo.qcow2") as img:
        yield img


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hexview-damaged")
    data = (SAMPLES / "demo.qcow2").read_bytes()
    out = {}
    out["header cut at 80"] = d / "cut80.qcow2"
    out["header cut at 80"].write_bytes(data[:80])
    out["cut after the L1"] = d / "cut200k.qcow2"
    out["cut after the L1"].write_bytes(data[:200_000])
    rnd = random.Random(20240607)
    out["random bytes"] = d / "random.bin"
    out["random bytes"].write_bytes(rnd.randbytes(70_000))
    out["qcow2 magic, random rest"] = d / "magic.qcow2"
    out["qcow2 magic, random rest"].write_bytes(b"QFI\xfb" + rnd.randbytes(70_000))
    # a descriptor whose values are markup and terminal escapes
    vmdk = bytearray((SAMPLES / "sparse.vmdk").read_bytes())
    lo, hi = 512, 512 + 20 * 512
    text = bytes(vmdk[lo:hi]).rstrip(b"\0")
    hostile = b'ddb.adapterType = "<script>alert(1)</script>&amp;\x1b[2J\x07x\'y"'
    text = re.sub(rb'ddb\.adapterType = "[^"]*"', hostile, text)
    assert hostile in text
    vmdk[lo:hi] = text.ljust(hi - lo, b"\0")
    out["hostile descriptor"] = d / "hostile.vmdk"
    out["hostile descriptor"].write_bytes(bytes(vmdk))
    # a raw disk with MBR and GPT (qemu-img's view of the GPT sample)
    oracle.require_tools()
    out["gpt raw"] = d / "gpt.raw"
    oracle.run(oracle.QEMU_IMG, "convert", "-O", "raw", str(SAMPLES / "gpt-disk.qcow2"),
               str(out["gpt raw"]))
    return out


# ---- headers at their spec offsets ---------------------------------------------------------
def test_qcow2_header_html(demo, qemu):
    info = qemu["demo.qcow2"]
    d = hexview.annotate(demo, "header")
    data = (SAMPLES / "demo.qcow2").read_bytes()[:len(d.data)]
    header_length = struct.unpack(">I", data[100:104])[0]
    assert d.offset == 0 and len(d.data) == header_length
    owners = byte_owners(parse_spans(d.html()))
    titles = check_fields(owners, data, 0, QCOW2_HEADER, "header")
    assert_tiles(owners, 0, header_length)
    assert set(owners) == set(range(header_length))
    assert first_number(titles["header.size"]) == info["virtual-size"]
    assert 1 << first_number(titles["header.cluster_bits"]) == info["cluster-size"]
    assert first_number(titles["header.nb_snapshots"]) == len(info["snapshots"])
    assert 1 << first_number(titles["header.refcount_order"]) == \
        info["format-specific"]["data"]["refcount-bits"]
    assert first_number(titles["header.version"]) == \
        {"0.10": 2, "1.1": 3}[info["format-specific"]["data"]["compat"]]
    # the hover title is `structure.field = value — meaning`, meaning = the spec sentence
    assert " \u2014 virtual disk size in bytes" in titles["header.size"]


def test_qcow2_extensions_and_tables(demo):
    d = hexview.annotate(demo, "extensions")
    owners = byte_owners(parse_spans(d.html()))
    assert_tiles(owners, d.offset, d.offset + len(d.data))
    data = (SAMPLES / "demo.qcow2").read_bytes()
    # the first extension starts right after the header, its type a big-endian u32
    hl = struct.unpack(">I", data[100:104])[0]
    assert d.offset == hl
    assert owners[hl]["data-field"].endswith(".type")
    assert first_number(owners[hl]["title"]) == struct.unpack(">I", data[hl:hl + 4])[0]
    # L1 entry 0 names the L2 table the "l2" structure shows
    l1_off = struct.unpack(">Q", data[40:48])[0]
    l1 = hexview.annotate(demo, "l1")
    assert l1.offset == l1_off and [f.label for f in l1.fields] == ["l1[0]"]
    l2_off = struct.unpack(">Q", data[l1_off:l1_off + 8])[0] & 0x00FFFFFFFFFFFE00
    assert f"l2_offset={l2_off:#x}" in l1.fields[0].value
    l2 = hexview.annotate(demo, "l2")
    assert l2.offset == l2_off and len(l2.data) == hexview.DEFAULT_MAX_BYTES
    assert "first 4096 of 65536 bytes" in l2.title


def test_qcow2_l2_entries_agree_with_qemu_map(demo):
    """The decoded value of each L2 entry names the host offset qemu-img map reports."""
    l2 = hexview.annotate(demo, "l2", length=8 * 64)
    cluster = demo.cluster_size
    qmap = oracle.qemu_map(SAMPLES / "demo.qcow2")
    checked = 0
    for f in l2.fields:
        k = int(re.fullmatch(r"l2\[(\d+)\]", f.name).group(1))
        guest = k * cluster
        entry = next(e for e in qmap if e["start"] <= guest < e["start"] + e["length"])
        host = re.search(r"host_offset=(0x[0-9a-f]+)", f.value)
        if entry["data"] and "offset" in entry:
            assert host and int(host.group(1), 16) == entry["offset"] + guest - entry["start"], f
            checked += 1
        elif entry["zero"] and entry["present"]:
            assert "type=zero" in f.value, f
        else:
            assert "type=unallocated" in f.value, f
    assert checked >= 2


@pytest.fixture(scope="module")
def qcow2_variants(tmp_path_factory) -> dict[str, Path]:
    """4-bit refcounts and extended L2 entries (subclusters), made by qemu-img/qemu-io."""
    oracle.require_tools()
    d = tmp_path_factory.mktemp("hexview-qcow2")
    rc4, ext = d / "rc4.qcow2", d / "ext.qcow2"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
               "refcount_bits=4,cluster_size=4096", str(rc4), "1M")
    oracle.qemu_io(rc4, "write 0 8k")
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
               "extended_l2=on,cluster_size=64k", str(ext), "4M")
    oracle.qemu_io(ext, "write 0 8k", "write -z 65536 4096")
    return {"rc4": rc4, "ext": ext}


def test_qcow2_narrow_refcounts_and_subclusters(qcow2_variants):
    path = qcow2_variants["rc4"]
    with imgscope.open(path) as img:
        d = hexview.annotate(img, "refcount_block", length=4)
    data = path.read_bytes()[d.offset:d.offset + 4]
    # 4-bit refcounts: two per byte, the low nibble first (the spec's bit order)
    assert [f.name for f in d.fields] == [f"refcount_block[{2 * k}]" for k in range(4)]
    for f, b in zip(d.fields, data):
        assert f.size == 1 and f.value.startswith(f"{b & 15},{b >> 4} ")
    path = qcow2_variants["ext"]
    qmap = oracle.qemu_map(path)
    with imgscope.open(path) as img:
        d = hexview.annotate(img, "l2", length=32)
    assert [f.size for f in d.fields] == [16, 16]
    zero = int(re.search(r"zero_bitmap=(0x[0-9a-f]+)", d.fields[1].value).group(1), 16)
    sub = (64 << 10) // 32
    zeros = [(e["start"], e["length"]) for e in qmap
             if e["zero"] and e.get("present") and 65536 <= e["start"] < 131072]
    assert zeros == [(65536, bin(zero).count("1") * sub)] and zero & 1


def test_vpc_footer_and_copy(qemu):
    info = qemu["sparse.vhd"]
    path = SAMPLES / "sparse.vhd"
    data = path.read_bytes()
    with imgscope.open(path) as img:
        assert {"footer", "footer_copy", "dynamic_header", "bat"} <= set(hexview.structures(img))
        for name, base in (("footer", len(data) - 512), ("footer_copy", 0)):
            d = hexview.annotate(img, name)
            assert d.offset == base and len(d.data) == 512
            owners = byte_owners(parse_spans(d.html()))
            titles = check_fields(owners, data[base:base + 512], base, VHD_FOOTER, name)
            assert_tiles(owners, base, base + 512)
            c, h, s = (first_number(titles[f"{name}.{k}"])
                       for k in ("cylinders", "heads", "sectorsPerTrack"))
            # creator 'qemu': QEMU sizes the disk from the geometry
            assert c * h * s * 512 == info["virtual-size"]
            assert first_number(titles[f"{name}.currentSize"]) == info["virtual-size"]
        bat = hexview.annotate(img, "bat")
        table_offset = struct.unpack(">Q", data[512 + 16:512 + 24])[0]
        assert bat.offset == table_offset
        assert [f.label for f in bat.fields] == [f"bat[{k}]" for k in range(len(bat.data) // 4)]


def test_vdi_header(qemu):
    info = qemu["sparse.vdi"]
    path = SAMPLES / "sparse.vdi"
    data = path.read_bytes()
    with imgscope.open(path) as img:
        d = hexview.annotate(img)
    cb_header = struct.unpack("<I", data[0x48:0x4C])[0]
    assert d.offset == 0 and len(d.data) == 0x48 + cb_header
    owners = byte_owners(parse_spans(d.html()))
    titles = check_fields(owners, data, 0, VDI_HEADER, "")
    assert_tiles(owners, 0, 0x48 + cb_header)
    assert first_number(titles["header.disk_size"]) == info["virtual-size"]
    assert first_number(titles["header.block_size"]) == info["cluster-size"]
    assert title_value(titles["header.uuid_image"]) == \
        str(uuid.UUID(bytes_le=data[0x188:0x198]))


def test_vmdk_sparse_header(qemu):
    info = qemu["sparse.vmdk"]
    path = SAMPLES / "sparse.vmdk"
    data = path.read_bytes()
    with imgscope.open(path) as img:
        assert {"header", "descriptor", "grain_directory", "grain_table"} <= \
            set(hexview.structures(img))
        d = hexview.annotate(img, "header")
        owners = byte_owners(parse_spans(d.html()))
        titles = check_fields(owners, data, 0, VMDK_HEADER, "header")
        assert_tiles(owners, 0, 512)
        assert first_number(titles["header.capacity"]) * 512 == info["virtual-size"]
        assert first_number(titles["header.grainSize"]) * 512 == info["cluster-size"]
        # the grain directory shows where the header says (gdOffset, in sectors)
        gd = hexview.annotate(img, "grain_directory")
        assert gd.offset == struct.unpack("<Q", data[0x38:0x40])[0] * 512
        gt_sector = struct.unpack("<I", data[gd.offset:gd.offset + 4])[0]
        gt = hexview.annotate(img, "grain_table")
        assert gt.offset == gt_sector * 512
        # the descriptor's createType line is named where its text is
        desc = hexview.annotate(img, "descriptor")
        owners = byte_owners(parse_spans(desc.html()))
        at = data.index(b"createType=")
        assert owners[at]["data-field"] == "descriptor header.createType"
        assert title_value(owners[at]["title"]) == info["format-specific"]["data"]["create-type"]


def test_vhdx_headers(qemu):
    info = qemu["sparse.vhdx"]
    path = SAMPLES / "sparse.vhdx"
    data = path.read_bytes()
    with imgscope.open(path) as img:
        names = hexview.structures(img)
        assert {"file_identifier", "header1", "header2", "region_table1", "region_table2",
                "metadata", "bat", "log"} <= set(names)
        for name, base in (("header1", VHDX_HEADER1), ("header2", 2 * VHDX_HEADER1)):
            d = hexview.annotate(img, name)
            assert d.offset == base and len(d.data) == 4096
            owners = byte_owners(parse_spans(d.html()))
            titles = check_fields(owners, data[base:base + 4096], base, VHDX_HEADER, name)
            assert_tiles(owners, base, base + 4096)
            assert first_number(titles[f"{name}.log_offset"]) == \
                struct.unpack("<Q", data[base + 72:base + 80])[0]
        items = hexview.annotate(img, "metadata_items")
        by_name = {f.name: f for f in items.fields}
        assert int(by_name["virtual_disk_size"].value.split()[0]) == info["virtual-size"]
        assert int(by_name["block_size"].value.split()[0]) == info["cluster-size"]
        bat = hexview.annotate(img, "bat")
        assert all(f.size == 8 for f in bat.fields) and bat.fields[0].label == "bat[0]"


def test_raw_disk_mbr_and_gpt(damaged):
    path = damaged["gpt raw"]
    data = path.read_bytes()[:1024]
    with imgscope.open(path) as img:
        assert img.format == "raw"
        assert {"mbr", "gpt_header"} <= set(hexview.structures(img))
        mbr = byte_owners(parse_spans(hexview.annotate(img, "mbr").html()))
        assert_tiles(mbr, 0, 512)
        assert mbr[510]["data-field"] == "mbr.boot_signature" and data[510:512] == b"\x55\xaa"
        assert mbr[446 + 4]["data-field"] == "mbr.partition[0].partition_type"
        gpt = byte_owners(parse_spans(hexview.annotate(img, "gpt_header").html()))
        assert_tiles(gpt, 512, 512 + 92)
        assert gpt[512]["data-field"] == "gpt_header.signature"
        disk_guid = str(uuid.UUID(bytes_le=data[512 + 56:512 + 72])).upper()
        assert title_value(gpt[512 + 56]["title"]) == disk_guid


def test_every_structure_of_every_sample():
    """Each listed structure dumps inside the file, its fields do not overlap, and the
    brief's names are there."""
    expected = {"demo.qcow2": {"header", "extensions", "l1", "l2", "refcount_table",
                               "refcount_block", "snapshot_table"},
                "sparse.qcow": {"header", "l1", "l2"}, "sparse.vdi": {"header", "block_map"},
                "stream.vmdk": {"header", "descriptor", "grain_directory", "grain_table"}}
    for path in sorted(SAMPLES.glob("*.*")):
        if path.suffix in (".py", ".md", ".sh"):
            continue
        with imgscope.open(path) as img:
            names = hexview.structures(img)
            assert expected.get(path.name, set()) <= set(names), (path.name, names)
            for name in names:
                assert 0 < len(hexview.annotate(img, name).data) <= hexview.DEFAULT_MAX_BYTES
                d = hexview.annotate(img, name, length=1024)
                ends = [(f.offset, f.end) for f in d.fields]
                assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:])), (path.name, name)
                assert d.fields, (path.name, name)
                owners = byte_owners(parse_spans(d.html()))
                assert set(owners) <= set(range(d.offset, d.offset + len(d.data)))


# ---- text form ------------------------------------------------------------------------------
def test_text_is_hexdump_c_plus_legend(demo):
    d = hexview.annotate(demo, "header")
    data = (SAMPLES / "demo.qcow2").read_bytes()[:len(d.data)]
    lines = d.text().splitlines()
    assert lines[0] == d.title
    n = len(hexdump_c(data, 0))
    assert lines[1:1 + n] == hexdump_c(data, 0)
    legend = lines[2 + n:]
    assert len(legend) == len(d.fields) == len(QCOW2_HEADER) + 1     # + padding
    for line, f in zip(legend, d.fields):
        off, size, rest = line.split(None, 2)
        assert int(off, 16) == f.offset and int(size) == f.size
        assert rest.startswith(f"{f.label} = {f.value}  ")
    assert legend[0].startswith("0x00000000       4  header.magic = 51 46 49 fb")
    # colour adds ANSI sequences and nothing else
    coloured = d.text(colour=True)
    assert "\x1b[" in coloured and "\x1b" not in d.text()
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured) == d.text()
    # other widths keep the layout
    assert d.text(width=8).splitlines()[1:1 + len(data) // 8 + 1] == hexdump_c(data, 0, 8)


def test_range_crossing_field_boundaries(demo):
    data = (SAMPLES / "demo.qcow2").read_bytes()
    lo, n = 0x1D, 0x28                 # inside header.size .. inside header.snapshots_offset
    d = hexview.annotate(demo, offset=lo, length=n)
    assert d.offset == lo and d.data == data[lo:lo + n]
    owners = byte_owners(parse_spans(d.html()))
    assert set(owners) == set(range(lo, lo + n))
    assert owners[lo]["data-field"] == "header.size" and owners[lo]["data-offset"] == "24"
    assert owners[lo + n - 1]["data-field"] == "header.snapshots_offset"
    assert owners[lo + n - 1]["data-offset"] == "64"
    assert [f.label for f in d.fields][0] == "header.size"
    # text: the first line is aligned, blanks before the range, bytes from the file after
    first = d.text().splitlines()[1]
    assert first.startswith("00000010  " + " " * (13 * 3 + 1))
    assert first.split("|")[1] == " " * 13 + "".join(
        chr(b) if 32 <= b < 127 else "." for b in data[lo:0x20])
    # from the end of the header into the first extension
    d = hexview.annotate(demo, offset=100, length=24)
    assert [f.label for f in d.fields][:3] == ["header.header_length", "header.compression_type",
                                               "header.padding"]
    assert d.fields[3].label.startswith("extension[0]") and d.fields[3].offset == 112
    # inside an L2 table: entries named and cut at both ends
    l2_off = hexview.annotate(demo, "l2").offset
    d = hexview.annotate(demo, offset=l2_off + 12, length=16)
    assert [f.label for f in d.fields] == ["l2[1]", "l2[2]", "l2[3]"]
    owners = byte_owners(parse_spans(d.html()))
    assert owners[l2_off + 12]["data-offset"] == str(l2_off + 8)


def test_at_forms_and_unknown_names(demo):
    # a snapshot's L2 table is shown with its entries although the active L1 does not reach it
    data = (SAMPLES / "demo.qcow2").read_bytes()
    snap0 = struct.unpack(">Q", data[917504:917512])[0]            # l1_table_offset of snapshot 0
    l2 = struct.unpack(">Q", data[snap0:snap0 + 8])[0] & 0x00FFFFFFFFFFFE00
    d = hexview.annotate(demo, f"l2@{l2:#x}", length=16)
    assert d.offset == l2 and [f.label for f in d.fields] == ["l2[0]", "l2[1]"]
    assert "l2@OFFSET" in hexview.structure_forms(demo)
    with pytest.raises(ImageError, match="no structure"):
        hexview.annotate(demo, "footer")
    with pytest.raises(ImageError):
        hexview.annotate(demo, "l2@banana")
    with pytest.raises(ImageError):
        hexview.annotate(demo, offset=-1)
    with pytest.raises(ImageError):
        hexview.annotate(demo, offset=0, file=5)


def test_dump_of_arbitrary_bytes():
    f = hexview.Field("x", "rec", 0x102, 3, "<b>v</b>", "m & n")
    data = b"\x00\x01<>&\x05" * 3
    d = hexview.dump(data, offset=0x100, fields=[f], title="t<i>")
    html = d._repr_html_()
    owners = byte_owners(parse_spans(html))
    assert set(owners) == {0x102, 0x103, 0x104}
    assert owners[0x102]["title"] == "rec.x = <b>v</b> \u2014 m & n"
    assert "<b>" not in html and "<i>" not in html
    assert d.text().splitlines()[1:] == hexdump_c(data, 0x100) + ["", d.text().splitlines()[-1]]


# ---- damaged and hostile input ----------------------------------------------------------------
def test_truncated_image_structures(damaged):
    path = damaged["cut after the L1"]
    size = path.stat().st_size
    with imgscope.open(path) as img:
        for name in hexview.structures(img):
            d = hexview.annotate(img, name)
            assert not d.data or d.offset + len(d.data) <= size
        l2 = hexview.annotate(img, "l2@0x100000")
        assert l2.data == b"" and "beyond the end of the file" in l2.title
        assert l2.text().splitlines() == [l2.title, "00100000"]
        d = hexview.annotate(img, offset=size - 10, length=100)
        assert len(d.data) == 10 and "the file ends at" in d.title


def test_huge_lengths_are_bounded(demo):
    d = hexview.annotate(demo, offset=0, length=1 << 60)
    assert len(d.data) == hexview.HARD_MAX_BYTES and "first" in d.title
    d = hexview.annotate(demo, "refcount_table", length=1 << 62)     # a 64 KiB table
    assert len(d.data) == min(hexview.HARD_MAX_BYTES, demo.cluster_size)
    d = hexview.annotate(demo, offset=1 << 62, length=1 << 62)
    assert d.data == b"" and "beyond the end" in d.title
    d = hexview.dump(bytes(hexview.HARD_MAX_BYTES + 5))
    assert len(d.data) == hexview.HARD_MAX_BYTES


def test_hostile_descriptor_is_escaped(damaged):
    with imgscope.open(damaged["hostile descriptor"]) as img:
        d = hexview.annotate(img, "descriptor")
    html = d.html()
    p = SpanParser()
    p.feed(html)
    assert "script" not in p.tags
    owners = byte_owners(p.spans)
    field = [s for s in owners.values() if s["data-field"] == "descriptor ddb.ddb.adapterType"]
    assert field and "<script>alert(1)</script>&amp;" in field[0]["title"]
    text = d.text()
    assert "\x1b" not in text and "\x07" not in text
    assert "<script>alert(1)</script>&amp;\\x1b[2J\\x07x'y" in text


def test_random_bytes(damaged):
    path = damaged["random bytes"]
    data = path.read_bytes()
    with imgscope.open(path) as img:
        d = hexview.annotate(img)                     # no structure: the first 512 bytes
        assert d.data == data[:512] and not d.fields
        assert hexview.annotate(img, offset=1000, length=64).data == data[1000:1064]


# ---- command line -------------------------------------------------------------------------------
def test_cli_text_json_html_and_list(capsys):
    path = SAMPLES / "demo.qcow2"
    code, out, err = cli(capsys, "hexdump", path)
    assert code == 0 and not err
    assert out.splitlines()[1] == hexdump_c((path.read_bytes()[:16]), 0)[0]
    code, out, _ = cli(capsys, "hexdump", "--structure", "list", path)
    assert code == 0 and out.split() == hexview.structures(imgscope.open(path)) + \
        ["l2@OFFSET", "refcount_block@OFFSET"]
    code, out, _ = cli(capsys, "hexdump", "--offset", "0x18", "--length", "8", "--output",
                       "json", path)
    doc = json.loads(out)
    assert code == 0 and doc["offset"] == 24 and doc["data"] == path.read_bytes()[24:32].hex()
    assert [f["label"] for f in doc["fields"]] == ["header.size"]
    code, out, _ = cli(capsys, "hexdump", "--output", "html", "--structure", "l1", path)
    assert code == 0 and parse_spans(out)[0]["data-field"] == "l1[0]"
    code, out, _ = cli(capsys, "hexdump", "--color", "--length", "16", path)
    assert code == 0 and "\x1b[" in out


def test_cli_errors_are_one_line(capsys, damaged, tmp_path):
    path = SAMPLES / "demo.qcow2"
    code, out, err = cli(capsys, "hexdump", "--structure", "nope", path)
    assert code == 1 and not out and len(err.strip().splitlines()) == 1
    assert err.startswith("imgscope: no structure 'nope'")
    code, out, err = cli(capsys, "hexdump", "--offset", "0", "--file", "3", path)
    assert code == 1 and err.count("\n") == 1
    code, out, err = cli(capsys, "hexdump", tmp_path / "missing.qcow2")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    # an image no driver opens: its bytes, unannotated, with the reason on stderr
    cut = damaged["header cut at 80"]
    code, out, err = cli(capsys, "hexdump", cut)
    assert code == 0 and err.count("\n") == 1 and "unannotated" in err
    assert out.splitlines()[1:] == hexdump_c(cut.read_bytes(), 0)
    code, out, err = cli(capsys, "hexdump", "--structure", "l1", cut)
    assert code == 1 and not out and err.count("\n") == 1
    # a huge length is capped
    code, out, err = cli(capsys, "hexdump", "--offset", "0", "--length", "1E", path)
    hex_lines = [ln for ln in out.splitlines() if re.match(r"[0-9a-f]{8}  ", ln)]
    assert code == 0 and len(hex_lines) == hexview.HARD_MAX_BYTES // 16
    assert f"first {hexview.HARD_MAX_BYTES} of {1 << 60} bytes" in out.splitlines()[0]


def test_cli_real_processes(damaged):
    """As real processes: exit codes and no traceback, on damaged and random files."""
    for name in ("header cut at 80", "random bytes", "qcow2 magic, random rest"):
        r = run_cli("hexdump", damaged[name])
        assert r.returncode in (0, 1), name
        assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 1, (name, r.stderr)
        if r.returncode == 0:
            assert r.stdout.splitlines()[-1].strip()
    r = run_cli("hexdump", "--structure", "bat", "-f", "vpc", SAMPLES / "demo.qcow2")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
    r = run_cli("hexdump", "--structure", "header", "--offset", "0", SAMPLES / "demo.qcow2")
    assert r.returncode == 2 and "not allowed with" in r.stderr
