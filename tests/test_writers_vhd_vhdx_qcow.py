"""The vpc (VHD), vhdx and qcow (v1) writers against qemu-img 7.2.

Sources (built once per module): a sparse raw file with a known random pattern, holes,
data across block boundaries and a size that is not a multiple of 512, and a qcow2
converted from it and then written to by qemu-io.  Every source is converted by
imgscope (`imgscope.conversion.pipeline.convert`) and by `qemu-img convert` with the same
options; the output must be identical to the source for `qemu-img compare`, pass
`qemu-img check` (vhdx; qemu-img has no check for vpc and qcow: exit 63), show the
asked-for options and the same virtual size in `qemu-img info`, reopen in imgscope
with no findings and no check findings, read back (through imgscope's guest reader)
with the source's SHA-256, and take within 10% of the disk space of qemu-img's output.
"""
from __future__ import annotations

import hashlib
import os
import random
import uuid
from pathlib import Path

import checks
import numpy as np
import oracle
import pytest

import imgscope
from imgscope.conversion.pipeline import convert
from imgscope.conversion.writers import writer_class
from imgscope.errors import ConvertError
from imgscope.schemas import qcow as Q
from imgscope.schemas import vhd as V
from imgscope.schemas import vhdx as X

MiB = oracle.MiB
RAW_SIZE = 64 * MiB + 12345          # not a multiple of 512: the writers round up
#: (offset, length) of random data in the raw source: block edges, a 9 MiB run, the end;
#: 34..64 MiB holds no data (whole empty blocks of every block size)
RAW_WRITES = [(0, 4096), (2 * MiB - 3000, 6000), (5 * MiB + 512, 100),
              (8 * MiB - 4096, 9 * MiB + 8192), (24 * MiB, 3 * MiB), (33 * MiB + 7, 777),
              (RAW_SIZE - 700, 700)]
#: qemu-io writes on top of the qcow2 copy (zeros over data too)
QCOW2_WRITES = ["write -P 0x5a 1M 3M", "write -z 9M 1M", "write -P 0xa5 30M 2M"]

# (format, imgscope options, qemu-img -o text)
CASES = [
    ("vpc", {}, ""),
    ("vpc", {"subformat": "fixed"}, "subformat=fixed"),
    ("vpc", {"force_size": "on"}, "force_size=on"),
    ("vhdx", {}, ""),
    ("vhdx", {"subformat": "fixed"}, "subformat=fixed"),
    ("vhdx", {"subformat": "fixed", "block_state_zero": "off"}, "subformat=fixed,block_state_zero=off"),
    ("vhdx", {"block_size": "1M", "log_size": "2M"}, "block_size=1M,log_size=2M"),
    ("vhdx", {"block_state_zero": "off"}, "block_state_zero=off"),
    ("qcow", {}, ""),
]


def _sha_file(path: Path, size: int) -> str:
    """SHA-256 of the file padded with zeros to `size` (the rounded-up virtual size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(8 * MiB):
            h.update(data)
    h.update(bytes(size - path.stat().st_size))
    return h.hexdigest()


def _check_codes(img) -> list[str]:
    """Codes of imgscope's checker findings (plus "exit N" unless it is clean)."""
    report = img.check()
    codes = [f.code for f in report.findings]
    return codes + ([f"exit {report.exit_code}"] if report.exit_code else [])


def _disk_usage(path: Path) -> int:
    return path.stat().st_blocks * 512


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    oracle.require_tools()
    root = tmp_path_factory.mktemp("writers_vhd")
    raw = root / "source.raw"
    with open(raw, "wb") as f:
        f.truncate(RAW_SIZE)
        for off, n in RAW_WRITES:
            f.seek(off)
            f.write(random.Random(f"{off}:{n}").randbytes(n))
    qcow2 = root / "source.qcow2"
    oracle.run(oracle.QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", raw, qcow2)
    oracle.qemu_io(qcow2, *QCOW2_WRITES, fmt="qcow2")
    return {"raw": raw, "qcow2": qcow2}


@pytest.fixture(scope="module")
def outputs(sources, tmp_path_factory) -> dict:
    """(source, format, case index) -> (imgscope output, qemu-img output, seconds)."""
    root = tmp_path_factory.mktemp("writers_vhd_out")
    out = {}
    for src_name, src in sources.items():
        for i, (fmt, opts, qopts) in enumerate(CASES):
            mine = root / f"{src_name}-{i}.mine.{fmt}"
            theirs = root / f"{src_name}-{i}.qemu.{fmt}"
            convert(src, mine, fmt, options=opts)
            o = ["-o", qopts] if qopts else []
            oracle.run(oracle.QEMU_IMG, "convert", "-q", "-O", fmt, *o, src, theirs)
            out[src_name, fmt, i] = (mine, theirs)
    return out


@pytest.mark.parametrize("src_name", ["raw", "qcow2"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_output_matches_qemu(sources, outputs, src_name, case, tmp_path):
    fmt, opts, _ = CASES[case]
    mine, theirs = outputs[src_name, fmt, case]
    src = sources[src_name]
    # qemu-img compare: the guest contents are the source's
    cmp = oracle.run(oracle.QEMU_IMG, "compare", "-f", src_name, "-F", fmt, src, mine, check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # qemu-img check: clean for vhdx; vpc and qcow are not checked by qemu-img
    code, report = oracle.qemu_check(mine, fmt=fmt)
    assert code == (0 if fmt == "vhdx" else 63), report
    # qemu-img info: same virtual size as qemu-img's own output, the asked-for options
    info, ref = oracle.qemu_info(mine, fmt=fmt), oracle.qemu_info(theirs, fmt=fmt)
    assert info["format"] == fmt
    assert info["virtual-size"] == ref["virtual-size"]
    assert info.get("cluster-size") == ref.get("cluster-size")
    if fmt == "vhdx":
        want = int(opts.get("block_size", "0").rstrip("M") or 0) * MiB
        assert info["cluster-size"] == (want or X.qemu_default_block_size(info["virtual-size"]))
    # disk space within 10% of qemu-img convert's
    assert abs(_disk_usage(mine) - _disk_usage(theirs)) <= 0.1 * _disk_usage(theirs), \
        (_disk_usage(mine), _disk_usage(theirs))
    # imgscope reopens it without findings, and reads the source's bytes back
    img = imgscope.open(mine, fmt)
    assert img.format == fmt and img.virtual_size == info["virtual-size"]
    assert list(img.findings["code"]) == []
    assert _check_codes(img) == []
    flat = src if src_name == "raw" else _raw_of(src, tmp_path)
    assert checks.guest_sha(img) == _sha_file(flat, img.virtual_size)


def _raw_of(path: Path, tmp: Path) -> Path:
    dest = tmp / (path.name + ".raw")
    if not dest.exists():
        oracle.run(oracle.QEMU_IMG, "convert", "-q", "-O", "raw", path, dest)
    return dest


def _mask(data: bytes, ranges) -> bytearray:
    out = bytearray(data)
    for start, end in ranges:
        for base in (0, len(out) - 512):
            out[base + start:base + end] = bytes(end - start)
    return out


@pytest.mark.parametrize("case", [0, 1, 2])
def test_vpc_bytes_equal_qemu(outputs, case):
    """Apart from time stamp, unique id and the checksums over them, the VHD is
    byte for byte what qemu-img writes (layout, geometry, creator, BAT, bitmaps)."""
    mine, theirs = outputs["raw", "vpc", case]
    a, b = mine.read_bytes(), theirs.read_bytes()
    assert len(a) == len(b)
    volatile = [(24, 28), (64, 68), (68, 84)]       # timeStamp, checksum, uniqueId
    assert _mask(a, volatile) == _mask(b, volatile)
    footer = V.footer.parse(a[-512:])
    assert footer.checksum == V.checksum(a[-512:], 64)
    assert footer.creatorApplication == (b"qem2" if case == 2 else b"qemu")
    if case != 1:
        assert a[:512] == a[-512:]
        header = V.dynamic_header.parse(a[512:1536])
        assert header.checksum == V.checksum(a[512:1536], 36)
        bat = np.frombuffer(a[1536:1536 + 4 * header.maxTableEntries], ">u4")
        used = bat[bat != V.BAT_UNUSED].astype(np.int64) * 512
        assert used.size and all(a[o:o + 512] == b"\xff" * 512 for o in used.tolist())


def test_vpc_size_rounding():
    """Without force_size the size grows to the CHS geometry qemu-img picks."""
    for size in (1, 10 * MiB, 10 * MiB + 1, 127 * 1024 ** 3 + 5, 300 * 1024 ** 3):
        sectors, (c, h, s) = V.qemu_create_geometry(size, False)
        assert sectors * 512 >= size
        assert sectors == c * h * s or (c, h, s) == (65535, 16, 255)
        fsectors, chs = V.qemu_create_geometry(size, True)
        assert fsectors == -(-size // 512) and chs == (65535, 16, 255)


def test_vhdx_structures(outputs):
    """Headers and region tables carry valid CRC-32C; BAT states follow the options."""
    def bat_of(path: Path) -> tuple[bytes, np.ndarray]:
        with open(path, "rb") as f:          # header section, BAT, metadata
            data = f.read(16 * MiB)
        rt = X.region_table_header.parse(data[X.REGION_TABLE1_OFFSET:])
        entries = np.frombuffer(data, X.REGION_ENTRY_DTYPE, rt.entry_count,
                                X.REGION_TABLE1_OFFSET + 16)
        regions = {str(uuid.UUID(bytes_le=bytes(e["guid"]))): e for e in entries}
        img = imgscope.open(path)
        count = X.bat_entries(img.virtual_size, img.cluster_size, 512, False)
        bat = np.frombuffer(data, X.BAT_DTYPE, count, int(regions[X.BAT_GUID]["file_offset"]))
        payload = bat[~X.is_bitmap_index(np.arange(count), X.chunk_ratio(img.cluster_size, 512))]
        return data, payload

    for case, (fmt, opts, _) in enumerate(CASES):
        if fmt != "vhdx":
            continue
        mine = outputs["raw", fmt, case][0]
        data, bat = bat_of(mine)
        for off in (X.HEADER1_OFFSET, X.HEADER2_OFFSET):
            h = X.header.parse(data[off:off + X.HEADER_SIZE])
            assert h.checksum == X.checksum(data[off:off + X.HEADER_SIZE])
            assert h.log_guid == X.NULL_GUID
        t1 = data[X.REGION_TABLE1_OFFSET:X.REGION_TABLE1_OFFSET + X.REGION_TABLE_SIZE]
        assert t1 == data[X.REGION_TABLE2_OFFSET:X.REGION_TABLE2_OFFSET + X.REGION_TABLE_SIZE]
        assert X.region_table_header.parse(t1).checksum == X.checksum(t1)
        states = set((bat & X.BAT_STATE_MASK).tolist())
        fixed = opts.get("subformat") == "fixed"
        zero = opts.get("block_state_zero", "on") == "on"
        assert X.PAYLOAD_BLOCK_FULLY_PRESENT in states
        if fixed and not zero:
            img = imgscope.open(mine)
            n = X.data_blocks(img.virtual_size, img.cluster_size)
            assert int((bat & X.BAT_STATE_MASK == X.PAYLOAD_BLOCK_FULLY_PRESENT).sum()) == n
        else:
            assert (X.PAYLOAD_BLOCK_ZERO in states) == zero


def test_qcow_bytes_equal_qemu(outputs):
    """The uncompressed qcow from the raw source is byte for byte qemu-img's."""
    mine, theirs = outputs["raw", "qcow", len(CASES) - 1]
    assert mine.read_bytes() == theirs.read_bytes()


def test_qcow_compressed(sources, tmp_path):
    """-c: raw deflate clusters, incompressible ones stored plain, as qemu-img -c."""
    src = sources["qcow2"]
    mine, theirs = tmp_path / "c.mine.qcow", tmp_path / "c.qemu.qcow"
    convert(src, mine, "qcow", compress=True)
    # qemu-img 7.2 exits 1 after writing a valid compressed qcow (see the report)
    oracle.run(oracle.QEMU_IMG, "convert", "-q", "-c", "-O", "qcow", src, theirs, check=False)
    cmp = oracle.run(oracle.QEMU_IMG, "compare", "-F", "qcow", src, mine, check=False)
    assert cmp.returncode == 0, cmp.stdout
    assert abs(_disk_usage(mine) - _disk_usage(theirs)) <= 0.1 * _disk_usage(theirs)
    data = mine.read_bytes()
    h = Q.header.parse(data)
    l1 = np.frombuffer(data, Q.TABLE_DTYPE, Q.l1_entries(h.size, h.cluster_bits, h.l2_bits),
                       h.l1_table_offset)
    l2 = np.concatenate([np.frombuffer(data, Q.TABLE_DTYPE, 1 << h.l2_bits, int(o))
                         for o in l1[l1 != 0]])
    compressed = (l2 & np.uint64(Q.OFLAG_COMPRESSED)) != 0
    plain = (l2 != 0) & ~compressed
    assert compressed.any() and plain.any()      # pattern clusters shrink, random ones not
    img = imgscope.open(mine)
    assert list(img.findings["code"]) == [] and _check_codes(img) == []
    assert checks.guest_sha(img) == _sha_file(_raw_of(src, tmp_path), img.virtual_size)


def test_qcow_backing(sources, tmp_path):
    """-B: 512-byte clusters, the backing name in the header, only differing data stored."""
    work = tmp_path
    base = work / "base.raw"
    os.link(sources["raw"], base)
    out = work / "overlay.qcow"
    convert(sources["qcow2"], out, "qcow", backing="base.raw", backing_format="raw")
    info = oracle.qemu_info(out)
    assert info["cluster-size"] == 512 and info["backing-filename"] == "base.raw"
    cmp = oracle.run(oracle.QEMU_IMG, "compare", "-F", "qcow", sources["qcow2"], out, check=False)
    assert cmp.returncode == 0, cmp.stdout
    # the qemu-io writes (6 MiB, 1 MiB of it zeros over data) and their L2 tables are all
    # that is stored
    assert 6 * MiB <= _disk_usage(out) < 6.5 * MiB
    img = imgscope.open(out)
    assert list(img.findings["code"]) == []


def test_options_refused(tmp_path):
    for fmt, opts in [("vhdx", {"block_size": "3M"}), ("vhdx", {"log_size": "1536K"}),
                      ("vhdx", {"subformat": "diff"}), ("vpc", {"cluster_size": "64k"}),
                      ("vpc", {"force_size": "maybe"}), ("qcow", {"encryption": "on"})]:
        with pytest.raises(ConvertError):
            writer_class(fmt)(tmp_path / f"x.{fmt}", 10 * MiB, opts)
    with pytest.raises(ConvertError):
        writer_class("vpc")(tmp_path / "big.vhd", 2041 * 1024 ** 3, {"force_size": "on"})
    assert not list(tmp_path.iterdir())


def test_abort_leaves_nothing(tmp_path):
    for fmt in ("vpc", "vhdx", "qcow"):
        w = writer_class(fmt)(tmp_path / f"a.{fmt}", 10 * MiB)
        w.write(0, b"\x01" * w.unit)
        w.abort()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt,size,opts", [
    ("vhdx", 0, {}), ("vhdx", 64 * 1024 ** 4, {}), ("vhdx", 3 * 1024 ** 3, {"subformat": "fixed"}),
    ("vpc", 2040 * 1024 ** 3, {}), ("vpc", 100 * 1024 ** 3 + 1, {"subformat": "fixed"}),
    ("qcow", 1024 ** 4, {})])
def test_create_matches_qemu_create(fmt, size, opts, tmp_path):
    """Empty images (imgscope create) at the edges: qemu-img info gives the virtual size and
    cluster size of `qemu-img create` with the same options; vhdx passes qemu-img check."""
    from imgscope.conversion.pipeline import create
    mine, theirs = tmp_path / f"mine.{fmt}", tmp_path / f"qemu.{fmt}"
    create(mine, fmt, size, opts)
    o = ["-o", ",".join(f"{k}={v}" for k, v in opts.items())] if opts else []
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", fmt, *o, theirs, str(size))
    info, ref = oracle.qemu_info(mine, fmt=fmt), oracle.qemu_info(theirs, fmt=fmt)
    assert (info["virtual-size"], info.get("cluster-size")) == \
        (ref["virtual-size"], ref.get("cluster-size"))
    code, report = oracle.qemu_check(mine, fmt=fmt)
    assert code == (0 if fmt == "vhdx" else 63), report
    img = imgscope.open(mine, fmt)
    assert list(img.findings["code"]) == [] and _check_codes(img) == []
    assert _disk_usage(mine) <= _disk_usage(theirs) + 64 * 1024


def test_qcow_empty_refused(tmp_path):
    with pytest.raises(ConvertError):
        writer_class("qcow")(tmp_path / "e.qcow", 0)


def test_write_beyond_end_refused(tmp_path):
    """A unit past the (rounded) disk end is an error, not a silently larger file."""
    for fmt in ("vpc", "vhdx", "qcow"):
        w = writer_class(fmt)(tmp_path / f"e.{fmt}", 10 * MiB)
        with pytest.raises(ConvertError):
            w.write(w.virtual_size, b"\x01" * w.unit)
        w.abort()
    assert not list(tmp_path.iterdir())
