"""cow (QEMU's old copy-on-write format, User-Mode-Linux COW files) read support.

No qemu-img that reads or writes cow exists any more (QEMU 2.1 was the last), so
``sample_images/make_cow_fixtures.py`` builds the images from imgscope's schemas
(every header layout, sparse bitmaps, a size that is no multiple of 8 sectors,
backing files: a raw file and a qcow2 made by qemu-img) and writes the guest
each must read as beside it; the tests compare SHA-256 with those.  qemu-img
still is the oracle for the backing layers (info), and the bitmap decoder is
held against ``np.unpackbits``.  Damaged copies (bitmap shorter than the disk
needs, data area cut, lying header fields, hostile bitmaps) must give findings
or ImageErrors, bounded in time and memory.
"""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import imgscope
from imgscope.errors import ChainError, LimitExceeded, ParseError, UnsafePath
from imgscope.formats.cow import bitmap_runs
from imgscope.schemas import cow as S

import checks
import oracle
from test_qcow2_damaged import check_bounded, examine, run_isolated

KiB, MiB = oracle.KiB, oracle.MiB
SECTOR = 512

_BUILDER = Path(__file__).resolve().parents[1] / "sample_images" / "make_cow_fixtures.py"
_spec = importlib.util.spec_from_file_location("make_cow_fixtures", _BUILDER)
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

NAMES = list(fx.FIXTURES)
KINDS_OK = {"header", "metadata", "slack", "data", "unreferenced"}


def sha(path) -> str:
    return oracle.sha256_file(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    oracle.require_tools()
    return fx.build_fixtures(tmp_path_factory.mktemp("cow_fixtures"))


@pytest.fixture(scope="module", autouse=True)
def _warm(built):
    """Use the whole model once so forked children do not trace pandas' import."""
    with imgscope.open(built["raw_backing"]) as img:
        img.extents(), img.regions(), img.fields, img.findings, img.info()
        for name in img.tables:
            img.tables[name]


def expected(built, name: str) -> Path:
    return fx.expected_path(built[name].parent, name)


def present_sectors(path: Path, layout: str) -> np.ndarray:
    """Bool per sector read straight from the file (independent of imgscope): the
    bitmap at the layout's offset, bit n % 8 of byte n // 8."""
    data = path.read_bytes()
    size_at = {"qemu": 1040, "qemu-i386": 1036, "uml-v2": 4108, "uml-v3": 12,
               "uml-v3-64bit": 16}[layout]
    size = struct.unpack_from(">Q", data, size_at)[0]
    start = {"qemu": 1056, "qemu-i386": 1048, "uml-v2": 4120, "uml-v3": 8192,
             "uml-v3-64bit": 8192}[layout]
    n = size // SECTOR
    raw = np.frombuffer(data, np.uint8, (n + 7) // 8, start)
    return ((raw[np.arange(n) // 8] >> (np.arange(n) % 8)) & 1).astype(bool)


# --------------------------------------------------------------------------- the fixtures read as built


@pytest.mark.parametrize("name", NAMES)
def test_fixture_reads_as_expected(built, name):
    path = built[name]
    info = fx.FIXTURES[name]
    with checks.open_named(path) as img:
        assert img.format == "cow" and img.variant == info["layout"]
        assert checks.guest_sha(img) == sha(expected(built, name))
        assert img.virtual_size == expected(built, name).stat().st_size
        assert img.findings.empty, img.findings.to_string()
        checks.assert_extents_cover_the_disk(img, name)
        reg = img.regions()
        assert not checks.tiling_problems(checks.file_regions(reg, img.source), img.source)
        assert {"header", "metadata", "data"} <= set(reg.kind) <= KINDS_OK, reg.to_string()
        # the map: a data run exactly where the file's bitmap has a set bit
        ext = img.extents(merge=False)
        own = ext[ext.depth == 0]
        want = present_sectors(path, info["layout"])
        got = np.zeros(want.size, bool)
        for g, ln, k in zip(own.guest_offset, own.length, own.kind.astype(str)):
            got[g // SECTOR:(g + ln) // SECTOR] = k == "data"
        assert (got == want).all()
        i = img.info()
        assert i["format"] == "cow" and i["virtual-size"] == img.virtual_size
        assert "cluster-size" not in i and "dirty-flag" not in i      # qemu-img had neither
        if info["backing"]:
            assert i["backing-filename"] == info["backing"]
            assert [l.path.name for l in img.chain] == [path.name, info["backing"]]
            # the backing layer is a real qemu image: qemu-img is its oracle
            assert img.info(backing_chain=True)[1] == oracle.qemu_info(img.chain[1].path)
        else:
            assert "backing-filename" not in i and img.backing is None


def test_fixture_structures(built):
    """The fixtures hold what they claim, read back with plain struct/numpy."""
    d = built["plain"].parent
    plain = built["plain"].read_bytes()
    assert plain[:4] == b"OOOM" and struct.unpack_from(">I", plain, 4)[0] == 2
    assert struct.unpack_from(">iIQI", plain, 1032) == (0, 0, 2 * MiB, 512)   # x86-64 padding
    # LSB first: sectors 0, 1, 2, 7 in byte 0; 8, 9 in byte 1; 16..31 two 0xFF bytes
    assert plain[1056] & 0x87 == 0x87 and plain[1057] & 0x03 == 0x03
    assert plain[1058:1060] == b"\xff\xff"
    assert len(plain) == S.geometry("qemu", 2 * MiB)[2] + 4096 * SECTOR   # last sector written
    i386 = built["i386"].read_bytes()
    assert struct.unpack_from(">QI", i386, 1036) == (fx.BASE_RAW_SIZE, 512)
    v3 = built["uml_v3"].read_bytes()
    assert struct.unpack_from(">IIIQIII", v3, 0)[1:] == (3, fx.MTIME, fx.BASE_RAW_SIZE, 512, 4096, 0)
    assert v3[32:40] == b"base.raw"
    v3b = built["uml_v3_64bit"].read_bytes()
    assert struct.unpack_from(">qQIII", v3b, 8) == (fx.MTIME, fx.BASE_RAW_SIZE, 512, 4096, 0)
    assert v3b[36:44] == b"base.raw"
    v2 = built["uml_v2"].read_bytes()
    assert v2[8:16] == b"base.raw" and struct.unpack_from(">IQi", v2, 4104) == (fx.MTIME, fx.BASE_RAW_SIZE, 512)
    odd = built["odd_size"].read_bytes()
    n = 4093
    assert struct.unpack_from(">Q", odd, 1040)[0] == n * SECTOR
    assert odd[1056 + n // 8] == 0b00011111                      # 5 bits used, 3 bits padding
    # the stale sector of raw_backing: data in the file, bit clear
    rb = built["raw_backing"]
    geo = S.geometry("qemu", fx.BASE_RAW_SIZE)
    assert not present_sectors(rb, "qemu")[20]
    assert any(rb.read_bytes()[geo[2] + 20 * SECTOR:geo[2] + 21 * SECTOR])
    # the qcow2 backing was made by qemu-img and is smaller than its overlay
    assert oracle.qemu_info(d / "base.qcow2")["virtual-size"] < \
        struct.unpack_from(">Q", built["qcow2_backing"].read_bytes(), 1040)[0]


def test_fixtures_are_deterministic_and_small(built, tmp_path):
    again = fx.build_fixtures(tmp_path)
    folder = built["plain"].parent
    for path in sorted(folder.iterdir()):
        assert sha(path) == sha(tmp_path / path.name), f"{path.name} differs between builds"
    used = sum(p.stat().st_blocks * 512 for p in folder.iterdir())
    assert used < 6 << 20, f"fixtures use {used} bytes on disk"
    assert set(again) == set(NAMES)


def test_stale_sector_is_unreferenced(built):
    """A sector written to the data area whose bit was never set: the guest shows the
    backing file there and the layout calls the bytes unreferenced."""
    path = built["raw_backing"]
    with imgscope.open(path) as img:
        geo = S.geometry("qemu", fx.BASE_RAW_SIZE)
        at = geo[2] + 20 * SECTOR
        reg = img.regions()
        row = reg[(reg.offset <= at) & (reg.offset + reg.length > at)]
        assert row.kind.astype(str).tolist() == ["unreferenced"]
        with img.open_guest() as g:
            g.seek(20 * SECTOR)
            base = (path.parent / "base.raw").read_bytes()
            assert g.read(SECTOR) == base[20 * SECTOR:21 * SECTOR]
        assert not img.sector_present(20, 1)[0] and img.sector_present(0, 5).all()


def test_tables_fields_and_schema_round_trip(built):
    for name in NAMES:
        path = built[name]
        layout = fx.FIXTURES[name]["layout"]
        data = path.read_bytes()
        lay = S.LAYOUTS[layout]
        with imgscope.open(path) as img:
            f = img.fields
            for row in f.itertuples():
                assert data[row.offset:row.offset + row.size] == row.raw, (name, row.field)
                assert row.description, (name, row.field)
            assert f.offset.max() + f[f.offset == f.offset.max()]["size"].iloc[0] == lay.header_size
            bm = img.tables["bitmap"]
            want = present_sectors(path, layout)
            assert int(bm.sectors.sum()) == want.size
            assert int(bm[bm.present].sectors.sum()) == int(want.sum())
            first = bm.first_sector.to_numpy()
            assert (want[first] == bm.present.to_numpy()).all()
            assert (bm.bitmap_offset.to_numpy() == img.bitmap_offset + first // 8).all()
            hosted = bm[bm.present]
            assert (hosted.host_offset.to_numpy(np.uint64)
                    == img.data_offset + hosted.guest_offset.to_numpy()).all()
        assert lay.struct.build(lay.struct.parse(data[:lay.header_size])) == data[:lay.header_size]
        n = img.bitmap_bytes
        bits = data[img.bitmap_offset:img.bitmap_offset + n]
        assert S.bitmap_table(n).build(S.bitmap_table(n).parse(bits)) == bits


@pytest.mark.parametrize("seed", range(6))
def test_bitmap_runs_equal_unpackbits(seed):
    """The byte-run decoder against a plain bit-by-bit decoding (np.unpackbits)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    kind = seed % 3
    if kind == 0:                      # random bytes
        data = rng.integers(0, 256, n, dtype=np.uint8)
    elif kind == 1:                    # mostly whole 0x00 / 0xFF bytes
        data = rng.choice(np.array([0, 0xFF, 0x0F, 0x80], np.uint8), n, p=[0.5, 0.4, 0.05, 0.05])
    else:                              # long runs crossing bytes
        bits = np.repeat(rng.integers(0, 2, 200).astype(bool), rng.integers(1, 200, 200))
        data = np.packbits(bits, bitorder="little")
        n = data.size
    starts, lengths, values = bitmap_runs(data, 8 * 1000)
    bits = np.unpackbits(data, bitorder="little")
    change = np.flatnonzero(bits[1:] != bits[:-1]) + 1
    want_starts = np.concatenate([[0], change])
    assert (starts == want_starts + 8000).all()
    assert (lengths == np.diff(np.append(want_starts, bits.size))).all()
    assert (values == bits[want_starts].astype(bool)).all()
    assert (S.unpack_bitmap(data, bits.size) == bits.astype(bool)).all()
    assert (S.pack_bitmap(bits.astype(bool)) == data).all()


def test_cli_verbs(built):
    path = built["qcow2_backing"]
    for verb in ("info", "map", "fields", "regions"):
        p = subprocess.run([sys.executable, "-m", "imgscope", verb, "--output=json", path.name],
                           capture_output=True, text=True, cwd=path.parent)
        assert p.returncode == 0, (verb, p.stderr)
        assert p.stdout.strip()
    with checks.open_named(path, given_name=path.name) as img:
        p = subprocess.run([sys.executable, "-m", "imgscope", "info", "--output=json", path.name],
                           capture_output=True, text=True, cwd=path.parent)
        assert json.loads(p.stdout) == img.info()


# --------------------------------------------------------------------------- damaged copies


def _copy(built, name, tmp_path) -> Path:
    """A copy of a fixture and its backing files in tmp_path (mtimes kept)."""
    src = built[name]
    for f in src.parent.glob("base.*"):
        if not (tmp_path / f.name).exists():
            shutil.copy2(f, tmp_path / f.name)
    shutil.copy2(src, tmp_path / src.name)
    return tmp_path / src.name


def poke(path, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def test_bitmap_shorter_than_the_disk_needs(built, tmp_path):
    """The file ends inside the bitmap: the missing bits read as clear (backing file)."""
    p = _copy(built, "raw_backing", tmp_path)
    cut = 1056 + 80                                # sectors 640.. have no bit any more
    with open(p, "r+b") as f:
        f.truncate(cut)
    with imgscope.open(p) as img:
        f = img.findings
        assert "bitmap_truncated" in set(f.code)
        assert set(f[f.code == "bitmap_truncated"].host_offset) == {cut}
        want = np.frombuffer(expected(built, "raw_backing").read_bytes(), np.uint8).copy()
        base = np.frombuffer((tmp_path / "base.raw").read_bytes(), np.uint8)
        want[640 * SECTOR:] = base[640 * SECTOR:]
        # the first 640 sectors keep their bits but their data is gone: zeros, with findings
        present = present_sectors(built["raw_backing"], "qemu")[:640]
        mask = np.repeat(present, SECTOR)
        want[:640 * SECTOR][mask] = 0
        with img.open_guest() as g:
            assert g.read() == want.tobytes()
        assert "cluster_beyond_eof" in set(img.findings.code)
    out = check_bounded(p, "bitmap cut", "cow")
    assert out.open_error is None


def test_data_area_cut(built, tmp_path):
    p = _copy(built, "plain", tmp_path)
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size - 700)                     # the last sector and part of the one before
    with imgscope.open(p) as img:
        codes = set(img.findings.code)
        assert {"cluster_beyond_eof", "data_truncated"} & codes, codes
        want = bytearray(expected(built, "plain").read_bytes())
        data_offset = S.geometry("qemu", 2 * MiB)[2]
        lost_from = size - 700 - data_offset
        want[lost_from:] = bytes(len(want) - lost_from)
        with img.open_guest() as g:
            assert g.read() == bytes(want)
        assert "beyond_eof" in set(img.regions().kind)
    with pytest.raises(ParseError):
        imgscope.open(p, strict=True)


def test_truncated_headers(built, tmp_path):
    for name, lengths in (("plain", (0, 3, 4, 7, 8, 500, 1040, 1055)),
                          ("uml_v3", (100, 4127)), ("i386", (1047,))):
        src = built[name].read_bytes()
        for n in lengths:
            p = tmp_path / f"{name}{n}.cow"
            p.write_bytes(src[:n])
            out = examine(p, "cow")
            assert not out.problems, (name, n, out.problems)
            assert out.open_error is not None and out.open_error[0] in ("Truncated", "ParseError"), \
                (name, n, out.open_error)
    # the QEMU 32-bit header is shorter: a file cut at 1050 still opens as qemu-i386
    p = _copy(built, "i386", tmp_path)
    with open(p, "r+b") as f:
        f.truncate(1050)
    with imgscope.open(p, "cow") as img:
        assert img.variant == "qemu-i386" and "bitmap_truncated" in set(img.findings.code)


HEADER_POKES = {
    # name: (fixture, offset, format, values, expected codes or error type)
    "sectorsize_zero_qemu": ("plain", 1048, ">I", (0,), {"sector_size_invalid"}),
    "sectorsize_uml": ("uml_v3", 20, ">I", (4096,), {"sector_size_invalid"}),
    "alignment_zero": ("uml_v3", 24, ">I", (0,), {"alignment_invalid"}),
    "alignment_huge": ("uml_v3", 24, ">I", (0xFFFFFFFF,), {"alignment_invalid"}),
    "cow_format": ("uml_v3", 28, ">I", (5,), {"cow_format_unknown"}),
    "size_odd": ("plain", 1040, ">Q", (2 * MiB + 100,), {"size_unaligned"}),
    # the rest of the file becomes bitmap: every byte of it may start 8 runs, so the memory a
    # huge size costs follows the file's contents (odd_size: little random data)
    "size_huge": ("odd_size", 1040, ">Q", (1 << 62,), {"bitmap_truncated"}),
    "size_max": ("odd_size", 1040, ">Q", ((1 << 64) - 1,), {"size_too_large", "bitmap_truncated"}),
    "size_uml_max": ("uml_v3", 12, ">Q", ((1 << 64) - 1,), {"size_too_large"}),
    "mtime": ("raw_backing", 1032, ">i", (12345,), {"backing_mtime_mismatch"}),
    "name_unterminated": ("uml_v3", 32, ">4096s", (b"x" * 4096,), "ChainError"),
    "version_1": ("plain", 4, ">I", (1,), "Unsupported"),
    "version_7": ("plain", 4, ">I", (7,), "Unsupported"),
    "magic_le": ("plain", 0, ">4s", (b"MOOO",), "Unsupported"),
    "magic_bad": ("plain", 0, ">4s", (b"XXXX",), "ParseError"),
}


@pytest.mark.parametrize("name", sorted(HEADER_POKES))
def test_hostile_headers_bounded(built, tmp_path, name):
    fixture, off, fmt, values, want = HEADER_POKES[name]
    p = _copy(built, fixture, tmp_path)
    poke(p, off, fmt, *values)
    out = check_bounded(p, name, "cow")
    if isinstance(want, str):
        assert out.open_error is not None and out.open_error[0] == want, out.open_error
        return
    assert out.open_error is None, out.open_error
    assert want <= set(out.codes), (name, out.codes)


def test_hostile_bitmaps(built, tmp_path):
    """Alternating bits (a run per sector): bounded under the default limits, and a
    LimitExceeded error (not an unbounded table) under a small extent limit."""
    p = tmp_path / "alternating.cow"
    nbytes = 32 * KiB
    size = nbytes * 8 * SECTOR
    lay = S.LAYOUTS["qemu"]
    start, n, data_offset = S.geometry("qemu", size)
    with open(p, "wb") as f:
        f.write(lay.struct.build(dict(version=2, backing_file=bytes(1024), mtime=0, size=size,
                                      sectorsize=512)))
        f.write(S.bitmap_table(n).build(np.full(n, 0x55, np.uint8)))
        f.truncate(data_offset + size)
    out = check_bounded(p, "alternating", "cow")
    assert out.open_error is None and not out.codes
    with imgscope.open(p) as img:
        assert len(img.extent_table()) == 8 * nbytes
    with pytest.raises(LimitExceeded):
        imgscope.open(p, limits=imgscope.Limits(max_extents=1000))
    # a bitmap past the table limit: read up to the limit, a finding for the rest
    with imgscope.open(p, limits=imgscope.Limits(max_table_bytes=1024)) as img:
        assert "table_too_large" in set(img.findings.code)
        assert img.sector_present(0, 8).tolist() == [True, False] * 4


def test_random_mutations_raise_only_image_errors(built, tmp_path):
    names = ["plain", "i386", "uml_v3", "uml_v3_64bit"]
    rnd = random.Random(17)
    files = []
    for name in names:
        src = _copy(built, name, tmp_path)
        data0 = src.read_bytes()
        lay = S.LAYOUTS[fx.FIXTURES[name]["layout"]]
        hot = [(0, 64), (lay.header_size - 64, lay.header_size + 600)]
        for i in range(10):
            data = bytearray(data0)
            for _ in range(rnd.randrange(1, 8)):
                lo, hi = rnd.choice(hot)
                data[rnd.randrange(lo, hi)] = rnd.randrange(256)
            p = tmp_path / f"m{name}{i}.cow"
            p.write_bytes(data)
            files.append(p)

    def body():
        bad = []
        for p in files:
            out = examine(p, "cow", read_limit=MiB)
            if out.problems:
                bad.append((p.name, out.problems))
        return bad
    res = run_isolated(body, timeout=120)
    assert res == ("ok", []), res


def test_backing_names_are_confined(built, tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    p = _copy(built, "raw_backing", inner)
    (inner / "base.raw").rename(tmp_path / "base.raw")
    with pytest.raises(ChainError, match="base.raw"):
        imgscope.open(p)
    poke(p, 8, ">16s", b"../base.raw\0".ljust(16, b"\0"))
    with pytest.raises(UnsafePath):
        imgscope.open(p)
    with imgscope.open(p, allow_paths=[tmp_path]) as img:
        assert img.backing_name == "../base.raw" and img.backing.format == "raw"
    poke(p, 8, ">16s", b"/etc/passwd\0".ljust(16, b"\0"))
    with pytest.raises(UnsafePath):
        imgscope.open(p)


def test_probe(built):
    for name in NAMES:
        assert imgscope.probe(built[name])[0].format == "cow", name
