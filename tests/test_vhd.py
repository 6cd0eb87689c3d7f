"""VHD (qemu's ``vpc``) read by imgscope versus qemu-img 7.2 on real images.

The corpus (built once per module with qemu-img / qemu-io): dynamic and fixed disks,
with and without ``force_size=on``, sizes where the CHS geometry rounding changes the
size, random data written across block boundaries, and ``qemu-img convert -O vpc``
from a raw source.  qemu-img probes a fixed VHD as raw, so every qemu call says
``-f vpc``.  A differencing child is built from the schema (qemu-img cannot create
one).  Damaged copies only ever raise ImageError and use bounded memory.
"""
from __future__ import annotations

import random
import shutil
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import imgscope
from imgscope.errors import ImageError
from imgscope.schemas import vhd as V

import checks
import oracle
from test_qcow2_damaged import check_bounded, run_isolated

MiB = oracle.MiB
BLOCK = V.DEFAULT_BLOCK_SIZE


@dataclass
class VhdSample:
    name: str
    path: Path
    requested: int
    fixed: bool = False
    force: bool = False
    writes: list = field(default_factory=list)      # (offset, length)

    def info(self):
        return oracle.qemu_info(self.path, fmt="vpc")

    def map(self):
        return oracle.qemu_map(self.path, fmt="vpc")


def _writes(vsize: int) -> list[tuple[int, int]]:
    """Writes across block boundaries, inside blocks and at the very end of the disk."""
    w = [(0, 4096), (BLOCK - 3000, 6000), (BLOCK + 17 * 512, 70000), (vsize - 1536, 1536)]
    if vsize > 3 * BLOCK:
        w.append((3 * BLOCK - 512, 1024))
    return [(o, n) for o, n in w if 0 <= o and o + n <= vsize]


def _write_random(path: Path, writes, tag: str, fmt: str = "vpc") -> None:
    pay = path.parent / "_payload"
    pay.mkdir(exist_ok=True)
    cmds = []
    for off, n in writes:
        f = pay / f"{tag}-{off:x}-{n:x}.bin"
        f.write_bytes(random.Random(f"{tag}:{off}:{n}").randbytes(n))
        cmds.append(f"write -s {f} {off} {n}")
    oracle.qemu_io(path, *cmds, fmt=fmt)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, VhdSample]:
    oracle.require_tools()
    root = tmp_path_factory.mktemp("vhd")
    out = {}

    def create(name, size, *opts, fixed=False, force=False, write=True):
        path = root / f"{name}.vhd"
        o = [] if not opts else ["-o", ",".join(opts)]
        oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "vpc", *o, path, str(size))
        s = VhdSample(name, path, size, fixed=fixed, force=force)
        if write:
            vsize = oracle.qemu_info(path, fmt="vpc")["virtual-size"]
            s.writes = _writes(vsize)
            _write_random(path, s.writes, name)
        out[name] = s

    create("dyn_10m", 10 * MiB)                                  # CHS rounds 10 MiB up
    create("dyn_odd", 5_000_000)                                 # not a sector multiple
    create("dyn_empty", 64 * MiB, write=False)
    create("dyn_force", 10 * MiB, "force_size=on", force=True)
    create("dyn_force_odd", 5_000_000, "force_size=on", force=True)
    create("dyn_100m", 100 * MiB + 4096)
    create("fixed_10m", 10 * MiB, "subformat=fixed", fixed=True)
    create("fixed_force", 7 * MiB, "subformat=fixed", "force_size=on", fixed=True, force=True)
    create("fixed_odd", 3_333_333, "subformat=fixed", fixed=True)
    # qemu-img convert -O vpc from a raw source with data in a few places
    raw = root / "source.raw"
    with open(raw, "wb") as f:
        f.truncate(12 * MiB)
    _write_random(raw, [(0, 65536), (2 * BLOCK - 100, 200), (11 * MiB, 4096)], "src", fmt="raw")
    for name, opts in (("conv_dyn", []), ("conv_fixed", ["-o", "subformat=fixed"])):
        path = root / f"{name}.vhd"
        oracle.run(oracle.QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "vpc", *opts, raw, path)
        out[name] = VhdSample(name, path, 12 * MiB, fixed="fixed" in name)
    return out


# =========================================================================== the corpus


def test_corpus_is_what_it_claims(corpus):
    for name, s in corpus.items():
        data = s.path.read_bytes()
        foot = V.footer.parse(data[-512:])
        assert foot.cookie == V.FOOTER_COOKIE, name
        assert foot.diskType == (V.DISK_FIXED if s.fixed else V.DISK_DYNAMIC), name
        assert foot.creatorApplication == (b"qem2" if s.force else b"qemu"), name
        chs = foot.cylinders * foot.heads * foot.sectorsPerTrack * 512
        if not s.force:
            assert chs == foot.currentSize, name
    # CHS rounding changed the size where asked for, force_size kept it
    assert corpus["dyn_10m"].info()["virtual-size"] == 10514432 != 10 * MiB
    assert corpus["dyn_force"].info()["virtual-size"] == 10 * MiB
    assert corpus["fixed_force"].info()["virtual-size"] == 7 * MiB
    f = V.footer.parse(corpus["dyn_force_odd"].path.read_bytes()[:512])
    assert f.cylinders * f.heads * f.sectorsPerTrack * 512 != f.currentSize


# =========================================================================== info, map, bytes


def test_info_matches_qemu(corpus):
    bad = []
    for name, s in corpus.items():
        with checks.open_named(s.path, "vpc") as img:
            bad += checks.differences(img.info(), s.info(), f"{name}: ")
    assert not bad, "\n".join(bad)


def test_probe_says_vpc_for_every_sample(corpus):
    for name, s in corpus.items():
        with imgscope.open(s.path) as img:
            assert img.format == "vpc", name
        with imgscope.open(s.path, "raw") as img:      # still readable as raw, like qemu
            assert img.format == "raw"


def test_map_matches_qemu(corpus):
    bad = []
    for name, s in corpus.items():
        with checks.open_named(s.path, "vpc") as img:
            mine = checks.map_view(img)
            checks.assert_extents_cover_the_disk(img, name)
        theirs = s.map()
        if mine != theirs:
            i = checks.first_difference(mine, theirs)
            bad.append(f"{name}: first difference at {i}: {mine[i:i + 1]} vs {theirs[i:i + 1]}")
    assert not bad, "\n".join(bad)



@pytest.mark.parametrize("name", ["dyn_10m", "fixed_force", "conv_dyn"])
def test_cli_json_text_equals_qemu(corpus, name):
    checks.assert_cli_json_equals_qemu(corpus[name].path, (["info"], ["map"]), fmt="vpc")


@pytest.fixture(scope="module")
def raws(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("vhd_raw")
    return {name: oracle.qemu_raw(s.path, d / f"{name}.raw", fmt="vpc") for name, s in corpus.items()}


def test_guest_sha256_equals_qemu_convert(corpus, raws):
    for name, s in corpus.items():
        with imgscope.open(s.path, "vpc") as img:
            assert checks.guest_sha(img) == oracle.sha256_file(raws[name]), name


def test_random_reads_across_blocks(corpus, raws):
    rng = random.Random(7)
    for name, s in corpus.items():
        ref = raws[name].read_bytes()
        with imgscope.open(s.path, "vpc") as img, img.open_guest() as g:
            assert img.virtual_size == len(ref)
            spots = [o for w in s.writes for o in (w[0], w[0] + w[1] - 1)] + \
                [k * BLOCK for k in range(1, len(ref) // BLOCK + 1)]
            for _ in range(40):
                spots.append(rng.randrange(len(ref)))
            for centre in spots:
                off = max(0, centre - rng.randrange(1, 5000))
                n = rng.randrange(1, 12000)
                g.seek(off)
                assert g.read(n) == ref[off:off + n], (name, off, n)


def test_written_data_is_where_it_was_written(corpus):
    s = corpus["dyn_10m"]
    with imgscope.open(s.path, "vpc") as img, img.open_guest() as g:
        for off, n in s.writes:
            g.seek(off)
            assert g.read(n) == random.Random(f"dyn_10m:{off}:{n}").randbytes(n)


# =========================================================================== model


def test_regions_tile_and_no_findings(corpus):
    bad = []
    for name, s in corpus.items():
        with imgscope.open(s.path, "vpc") as img:
            reg = img.regions()
            bad += checks.tiling_problems(checks.file_regions(reg, img.source), img.source)
            bad += [f"{name}: unreferenced {len(reg[reg.kind == 'unreferenced'])}"
                    for _ in [0] if (reg.kind == "unreferenced").any()]
            f = img.findings
            bad += [f"{name}: finding {c}: {m}" for c, m in zip(f.code, f.message)]
    assert not bad, "\n".join(bad)


def test_fields_match_raw_bytes(corpus):
    for name, s in corpus.items():
        data = s.path.read_bytes()
        with imgscope.open(s.path, "vpc") as img:
            f = img.fields
            real = f[f.structure.isin(["footer", "footer_copy", "dynamic_header"])]
            assert len(real), name
            for off, size, raw in zip(real.offset, real["size"], real.raw):
                assert bytes(raw) == data[int(off):int(off) + int(size)], (name, off)
            end = f[f.structure == "footer"]
            assert end.offset.min() == len(data) - 512
            assert set(end.field) >= {"cookie", "currentSize", "cylinders", "checksum", "uniqueId"}
            assert all(d for d in end.description), name
            size = f[f.structure == "size"].set_index("field")["value"]
            foot = V.footer.parse(data[-512:])
            assert size["footer_size"] == foot.currentSize
            assert size["geometry_size"] == foot.cylinders * foot.heads * foot.sectorsPerTrack * 512
            assert size["virtual_size"] == img.virtual_size
            if not s.fixed:
                assert set(f[f.structure == "footer_copy"].raw.map(bytes)) <= set(end.raw.map(bytes))


def test_bat_table_matches_raw_bytes(corpus):
    for name, s in corpus.items():
        if s.fixed:
            continue
        data = s.path.read_bytes()
        with imgscope.open(s.path, "vpc") as img:
            bat = img.tables["bat"]
            h = V.dynamic_header.parse(data[512:1536])
            assert len(bat) == h.maxTableEntries
            raw = np.frombuffer(data, ">u4", count=len(bat), offset=h.tableOffset)
            assert (bat.raw.to_numpy() == raw).all(), name
            assert (bat.entry_offset.to_numpy() == h.tableOffset + 4 * np.arange(len(bat))).all()
            alloc = raw != 0xFFFFFFFF
            assert (bat.allocated.to_numpy() == alloc).all()
            assert bat.host_offset[~alloc].isna().all()
            assert (bat.host_offset[alloc].to_numpy() == raw[alloc].astype(np.uint64) * 512 + 512).all()
            written = {o // BLOCK for w in s.writes for o in range(w[0], w[0] + w[1], 512)}
            if not name.startswith("conv"):
                assert set(np.flatnonzero(alloc)) == written, name
            bm = img.tables["bitmaps"]
            assert len(bm) == alloc.sum()
            assert bm.all_present.all(), name          # qemu sets whole bitmaps on allocation
            for b in bm.block[:3]:
                assert img.sector_bitmap(int(b)).all()


def test_extents_built_without_a_python_loop_per_block(corpus):
    """64 GiB-ish of unallocated blocks still gives one run (runs are made with numpy)."""
    with imgscope.open(corpus["dyn_empty"].path, "vpc") as img:
        ext = img.extents()
        assert len(ext) == 1 and ext.kind[0] == "zero"


# =========================================================================== differencing


def _build_child(parent: Path, child: Path, sectors: dict[int, bytes], name_in_locator: str) -> None:
    """A differencing VHD over `parent`, built from the schema: one allocated block per
    touched block, bitmap bits set only for `sectors` (sector number -> 512 bytes)."""
    pdata = parent.read_bytes()
    pfoot = V.footer.parse(pdata[:512])
    bs = BLOCK
    bmp = V.bitmap_bytes(bs)
    nbat = pfoot.currentSize // bs + 1
    bat_off = 1536
    loc_off = bat_off + -(-nbat * 4 // 512) * 512
    loc_data = name_in_locator.encode("utf-16-le")
    first = loc_off + 512
    blocks = sorted({s * 512 // bs for s in sectors})
    bat = np.full(nbat, 0xFFFFFFFF, ">u4")
    body = bytearray()
    for k, b in enumerate(blocks):
        bat[b] = (first + k * (bmp + bs)) // 512
        bits = np.zeros(bs // 512, np.uint8)
        payload = bytearray(bs)
        for s, d in sectors.items():
            if s * 512 // bs == b:
                i = s - b * bs // 512
                bits[i] = 1
                payload[i * 512:(i + 1) * 512] = d
        # sectors whose bit is 0 hold junk: the parent must show through
        for i in np.flatnonzero(bits == 0)[:8]:
            payload[i * 512:(i + 1) * 512] = b"\xEE" * 512
        body += np.packbits(bits).tobytes().ljust(bmp, b"\0") + payload
    foot = dict(pfoot)
    foot.pop("_io", None)
    foot.update(diskType=V.DISK_DIFFERENCING, dataOffset=512, uniqueId=uuid.uuid4().bytes,
                checksum=0)
    fb = bytearray(V.footer.build(foot))
    fb[64:68] = struct.pack(">I", V.checksum(bytes(fb), 64))
    locs = V.parent_locator.build(dict(platformCode=V.PLATFORM_W2RU, platformDataSpace=1,
                                       platformDataLength=len(loc_data), reserved=0,
                                       platformDataOffset=loc_off))
    locs += bytes(24 * 7)
    hdr = dict(cookie=V.HEADER_COOKIE, dataOffset=V.NO_DATA_OFFSET, tableOffset=bat_off,
               headerVersion=V.VERSION_1_0, maxTableEntries=nbat, blockSize=bs, checksum=0,
               parentUniqueId=pfoot.uniqueId, parentTimeStamp=pfoot.timeStamp, reserved1=0,
               parentUnicodeName=parent.name.encode("utf-16-be").ljust(512, b"\0"),
               parentLocators=locs, reserved2=bytes(256))
    hb = bytearray(V.dynamic_header.build(hdr))
    hb[36:40] = struct.pack(">I", V.checksum(bytes(hb), 36))
    out = bytes(fb) + bytes(hb) + V.bat_table(nbat).build(bat).ljust(loc_off - bat_off, b"\xff") \
        + loc_data.ljust(512, b"\0") + bytes(body) + bytes(fb)
    child.write_bytes(out)


def test_differencing_child_reads_parent_through_bitmap(corpus, raws, tmp_path):
    src = corpus["dyn_10m"]
    parent = tmp_path / "parent.vhd"
    shutil.copy(src.path, parent)
    rng = random.Random(3)
    sectors = {s: rng.randbytes(512) for s in (0, 1, 7, 4095, 4096, 4100, 9000)}
    child = tmp_path / "child.vhd"
    _build_child(parent, child, sectors, ".\\parent.vhd")
    expect = bytearray(raws["dyn_10m"].read_bytes())
    for s, d in sectors.items():
        expect[s * 512:(s + 1) * 512] = d
    with imgscope.open(child) as img:
        assert img.format == "vpc" and img.variant == "differencing"
        assert img.backing is not None and img.backing.path == parent.resolve()
        assert img.backing_name == "parent.vhd"
        assert list(img.findings.code) == []
        with img.open_guest() as g:
            assert g.read() == bytes(expect)
        ext = img.extents()
        assert set(ext.depth) == {0, 1}
        loc = img.tables["parent_locators"]
        assert list(loc.value) == [".\\parent.vhd"]
        assert img.info()["backing-filename"] == "parent.vhd"
        reg = img.regions()
        assert not checks.tiling_problems(checks.file_regions(reg, img.source), img.source)
    # qemu 7.2 opens it as a dynamic disk without a parent (ignoring bitmaps)
    theirs = oracle.qemu_info(child, fmt="vpc")
    assert "backing-filename" not in theirs and theirs["virtual-size"] == img.virtual_size
    # a parent outside the folder is refused like a backing file
    other = tmp_path / "sub"
    other.mkdir()
    _build_child(parent, other / "child2.vhd", sectors, "..\\parent.vhd")
    with pytest.raises(ImageError):
        imgscope.open(other / "child2.vhd")
    with imgscope.open(other / "child2.vhd", allow_paths=[tmp_path]) as img:
        assert img.backing is not None


def test_differencing_parent_uuid_mismatch(corpus, tmp_path):
    parent = tmp_path / "parent.vhd"
    shutil.copy(corpus["dyn_odd"].path, parent)
    child = tmp_path / "child.vhd"
    _build_child(parent, child, {3: b"x" * 512}, "parent.vhd")
    data = bytearray(parent.read_bytes())
    for base in (0, len(data) - 512):
        f = data[base:base + 512]
        f[68:84] = uuid.uuid4().bytes
        f[64:68] = struct.pack(">I", V.checksum(bytes(f), 64))
        data[base:base + 512] = f
    parent.write_bytes(data)
    with imgscope.open(child) as img:
        assert "parent_uuid_mismatch" in set(img.findings.code)


# =========================================================================== damaged input


def _copy(s: VhdSample, tmp_path: Path, name: str | None = None) -> Path:
    p = tmp_path / (name or s.path.name)
    shutil.copy(s.path, p)
    return p


def _poke(path: Path, offset: int, data: bytes, fix: str | None = None) -> None:
    """Overwrite bytes; `fix` = "footer"/"header" recomputes that checksum after the poke."""
    b = bytearray(path.read_bytes())
    b[offset:offset + len(data)] = data
    if fix == "footer":
        for base in ((0, len(b) - 512) if b[:8] == V.FOOTER_COOKIE else (len(b) - 512,)):
            b[base + 64:base + 68] = struct.pack(">I", V.checksum(bytes(b[base:base + 512]), 64))
    elif fix == "header":
        b[512 + 36:512 + 40] = struct.pack(">I", V.checksum(bytes(b[512:1536]), 36))
    path.write_bytes(b)


def _codes(path, fmt="vpc"):
    with imgscope.open(path, fmt) as img:
        img.extents()
        img.regions()
        return set(img.findings.code)


def test_bad_footer_checksum(corpus, tmp_path):
    for name in ("dyn_10m", "fixed_10m"):
        p = _copy(corpus[name], tmp_path)
        size = p.stat().st_size
        _poke(p, size - 512 + 70, b"\x55")            # inside uniqueId of the end footer
        codes = _codes(p)
        assert "footer_checksum" in codes, name
        if name.startswith("dyn"):
            assert "footer_mismatch" in codes
            _poke(p, 70, b"\x55")                    # the copy qemu uses
            assert "footer_checksum" in _codes(p)
            proc = oracle.run(oracle.QEMU_IMG, "info", "-f", "vpc", p, check=False)
            assert proc.returncode != 0 and "checksum" in proc.stderr
        check_bounded(p, name, "vpc")


def test_bad_header_checksum_and_cookie(corpus, tmp_path):
    p = _copy(corpus["dyn_10m"], tmp_path)
    _poke(p, 512 + 40, b"\x01")
    assert "header_checksum" in _codes(p)
    _poke(p, 512, b"xxsparse")
    assert "header_cookie" in _codes(p)
    check_bounded(p, "cookie", "vpc")


def test_truncated_at_many_lengths(corpus, tmp_path):
    s = corpus["dyn_10m"]
    data = s.path.read_bytes()
    cuts = sorted({1, 100, 511, 512, 513, 1000, 1536, 1540, 2048, 2560, 4096, 100000,
                   BLOCK, BLOCK + 2560, len(data) // 2, len(data) - 513, len(data) - 512,
                   len(data) - 1})
    for cut in cuts:
        p = tmp_path / f"cut{cut}.vhd"
        p.write_bytes(data[:cut])
        out = check_bounded(p, f"cut at {cut}", "vpc")
        if out.open_error is None and cut < len(data) - 512:
            assert out.codes, f"cut at {cut}: no finding"
        if out.open_error is None and 2048 <= cut < len(data) - 511:
            assert "footer_missing" in out.codes, cut
        if cut == len(data) - 1:                    # looks like an old 511-byte footer
            assert "footer_511" in out.codes
        if cut > 2560 and cut < len(data) - 512:
            assert "bat_entry_beyond_eof" in out.codes, cut
    fixed = corpus["fixed_10m"].path.read_bytes()
    for cut in (0, 511, 4096, len(fixed) - 1):
        p = tmp_path / f"fcut{cut}.vhd"
        p.write_bytes(fixed[:cut])
        out = check_bounded(p, f"fixed cut at {cut}", "vpc")
        if cut == len(fixed) - 1:                   # the reserved tail byte lost: 511-byte footer
            assert out.open_error is None and out.codes == ["footer_511"]
        else:
            assert out.open_error is not None, cut  # no footer: not a VHD


def test_bat_entry_beyond_eof_and_overlap(corpus, tmp_path):
    p = _copy(corpus["dyn_10m"], tmp_path)
    _poke(p, 1536 + 4 * 3, struct.pack(">I", 0x00F00000))     # block 3 far beyond EOF
    codes = _codes(p)
    assert "bat_entry_beyond_eof" in codes
    proc = oracle.run(oracle.QEMU_IMG, "info", "-f", "vpc", p, check=False)
    assert proc.returncode != 0 and "truncated" in proc.stderr
    with imgscope.open(p, "vpc") as img, img.open_guest() as g:
        g.seek(3 * BLOCK)
        g.read(4096)
    check_bounded(p, "beyond eof", "vpc")
    p = _copy(corpus["dyn_10m"], tmp_path, "overlap.vhd")
    raw = p.read_bytes()
    _poke(p, 1536 + 4 * 3, raw[1536:1540])                     # block 3 shares block 0's storage
    assert "bat_entry_overlap" in _codes(p)
    _poke(p, 1536 + 4 * 3, struct.pack(">I", 2))               # block 3 on top of the header
    assert "bat_entry_overlaps_metadata" in _codes(p)


@pytest.mark.parametrize("what", ["current_size_huge", "table_entries_huge", "block_size_tiny",
                                  "block_size_odd", "geometry_max", "table_offset_huge"])
def test_huge_sizes_bounded(corpus, tmp_path, what):
    p = _copy(corpus["dyn_10m"], tmp_path)
    if what == "current_size_huge":
        _poke(p, 28, b"qem2")
        _poke(p, 48, struct.pack(">Q", (1 << 64) - 512), fix="footer")
        expect = "size_too_large"
    elif what == "geometry_max":
        _poke(p, 56, struct.pack(">HBB", 65535, 16, 255), fix="footer")
        expect = None
    elif what == "table_entries_huge":
        _poke(p, 512 + 28, struct.pack(">I", 0xFFFFFFF0), fix="header")
        expect = "table_too_large"
    elif what == "block_size_tiny":
        _poke(p, 512 + 32, struct.pack(">I", 512), fix="header")
        expect = "bat_too_small"
    elif what == "block_size_odd":
        _poke(p, 512 + 32, struct.pack(">I", 3000), fix="header")
        expect = "block_size_invalid"
    else:
        _poke(p, 512 + 16, struct.pack(">Q", 1 << 62), fix="header")
        expect = "table_beyond_eof"
    out = check_bounded(p, what, "vpc")
    assert out.open_error is None, out.open_error
    if expect:
        assert expect in out.codes, (what, out.codes)


def test_random_mutations_raise_only_image_errors(corpus, tmp_path):
    base = corpus["dyn_10m"].path.read_bytes()
    rng = random.Random(11)

    def body():
        bad = []
        for k in range(60):
            b = bytearray(base)
            for _ in range(rng.randrange(1, 6)):
                area = rng.choice([(0, 512), (512, 1536), (1536, 1560), (len(b) - 512, len(b))])
                b[rng.randrange(*area)] = rng.randrange(256)
            p = tmp_path / f"m{k}.vhd"
            p.write_bytes(b)
            problem = checks.use_everything(p, "vpc", 1 << 20)
            if problem:
                bad.append(f"{k}: {problem}")
        return bad
    res = run_isolated(body, timeout=120)
    assert res[0] == "ok", res
    assert not res[1], "\n".join(res[1])
