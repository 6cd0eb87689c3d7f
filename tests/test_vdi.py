"""VDI (VirtualBox) read support held against qemu-img 7.2 on real images.

Images are made with ``qemu-img create -f vdi`` (dynamic and ``static=on``),
written with random data across block boundaries and ``write -z`` by qemu-io,
and converted from a sparse raw file with ``qemu-img convert -O vdi``.  qemu-img
cannot create differencing VDIs, so one is built here from the schema (a copy of
a dynamic image with image_type = diff and the parent's UUIDs).  Damaged copies
(truncated, map entries beyond EOF, duplicates, lying header sizes) must give
findings or ImageErrors only, in bounded memory.
"""
from __future__ import annotations

import random
import shutil
import struct
import uuid
from pathlib import Path

import numpy as np
import pytest

import imgscope
from imgscope.errors import ImageError, ParseError
from imgscope.schemas import vdi as S

import checks
import oracle
from test_qcow2_damaged import check_bounded, examine, run_isolated

MiB = oracle.MiB
BLOCK = S.DEFAULT_BLOCK_SIZE
VSIZE = 6 * MiB + 3 * 512          # not a whole number of blocks


# --------------------------------------------------------------------------- building images


def _workload(path: Path, pattern: Path) -> None:
    """Random data across block boundaries, plus zero writes (qemu-io)."""
    oracle.qemu_io(path, f"write -s {pattern.name} {BLOCK - 4096} 8192",          # blocks 0|1
                   f"write -s {pattern.name} {3 * BLOCK + 51200} {BLOCK}",         # blocks 3|4
                   f"write -s {pattern.name} {6 * BLOCK} 1536",                     # last, partial block
                   f"write -z {2 * BLOCK - 1024} 512",                              # inside block 1
                   f"write -z {5 * BLOCK} {BLOCK}", fmt="vdi")                      # a whole block


def _raw_source(path: Path) -> None:
    """A sparse raw file with data in blocks 0, 3 and 7 (the others are holes)."""
    rnd = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(8 * MiB + 4096)
        for off, n in ((100, 3000), (3 * BLOCK - 2048, 4096), (7 * BLOCK + 5, 70000)):
            f.seek(off)
            f.write(rnd.randbytes(n))


@pytest.fixture(scope="module")
def vdi_corpus(tmp_path_factory) -> dict[str, Path]:
    oracle.require_tools()
    root = tmp_path_factory.mktemp("vdi_corpus")
    pattern = root / "pattern.bin"
    pattern.write_bytes(random.Random(1).randbytes(2 * MiB))
    out = {}
    for name, opts in (("dynamic", []), ("static", ["-o", "static=on"])):
        p = root / f"{name}.vdi"
        oracle.run(oracle.QEMU_IMG, "create", "-f", "vdi", *opts, p, str(VSIZE))
        _workload(p, pattern)
        out[name] = p
    p = root / "empty.vdi"
    oracle.run(oracle.QEMU_IMG, "create", "-f", "vdi", p, "3000000")   # rounded up to 512
    out["empty_odd_size"] = p
    raw = root / "source.raw"
    _raw_source(raw)
    for name, opts in (("converted", []), ("converted_static", ["-o", "static=on"])):
        p = root / f"{name}.vdi"
        oracle.run(oracle.QEMU_IMG, "convert", "-f", "raw", "-O", "vdi", *opts, raw, p)
        out[name] = p
    return out


def _hdr(path: Path) -> dict:
    data = path.read_bytes()[:S.PRE_HEADER_SIZE + S.HEADER_V1_SIZE]
    return dict(S.header_v1.parse(data[S.PRE_HEADER_SIZE:]))


def _put_header(path: Path, **values) -> None:
    """Rewrite header fields through the schema (parse, change, build)."""
    h = S.header_v1.parse(path.read_bytes()[S.PRE_HEADER_SIZE:S.PRE_HEADER_SIZE + S.HEADER_V1_SIZE])
    h.update(values)
    with open(path, "r+b") as f:
        f.seek(S.PRE_HEADER_SIZE)
        f.write(S.header_v1.build(h))


def _put_u32(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<I", value))


def _map(path: Path) -> np.ndarray:
    h = _hdr(path)
    return np.fromfile(path, "<u4", h["blocks_in_image"], offset=h["offset_bmap"])


# --------------------------------------------------------------------------- against qemu-img

SAMPLES = ["dynamic", "static", "empty_odd_size", "converted", "converted_static"]


@pytest.mark.parametrize("name", SAMPLES)
def test_info_map_guest_equal_qemu(vdi_corpus, name, tmp_path):
    path = vdi_corpus[name]
    with checks.open_named(path) as img:
        assert img.format == "vdi"
        assert img.info() == oracle.qemu_info(path)
        assert checks.map_view(img) == oracle.qemu_map(path)
        assert checks.guest_sha(img) == oracle.qemu_guest_sha256(path, workdir=tmp_path)
        assert img.cluster_size == BLOCK
        assert img.variant == ("static" if "static" in name else "dynamic")
        assert img.findings.empty, img.findings.to_string()
        checks.assert_extents_cover_the_disk(img, name)
        reg = img.regions()
        assert not checks.tiling_problems(checks.file_regions(reg, img.source), img.source)
        assert {"header", "block_map"} <= set(reg.kind)
        assert set(reg.kind) <= {"header", "block_map", "data", "slack"}, reg.to_string()


def test_corpus_is_what_it_claims(vdi_corpus):
    dyn = _map(vdi_corpus["dynamic"])
    # written: blocks 0, 1, 3, 4, 5 (write -z allocates a block in QEMU), 6; block 2 free
    assert (dyn == S.BLOCK_FREE).sum() >= 1 and (dyn < S.BLOCK_ZERO).sum() >= 5
    assert sorted(dyn[dyn < S.BLOCK_ZERO]) == list(range(int((dyn < S.BLOCK_ZERO).sum())))
    st = _map(vdi_corpus["static"])
    assert list(st) == list(range(st.size)) and _hdr(vdi_corpus["static"])["image_type"] == 2
    conv = _map(vdi_corpus["converted"])
    assert list(conv < S.BLOCK_ZERO) == [True, False, True, True, False, False, False, True, False]
    assert _hdr(vdi_corpus["empty_odd_size"])["disk_size"] % 512 == 0



@pytest.mark.parametrize("name", ["dynamic", "static", "converted"])
def test_cli_json_text_equals_qemu(vdi_corpus, name):
    checks.assert_cli_json_equals_qemu(vdi_corpus[name], (["info"], ["map"]))


@pytest.mark.parametrize("name", ["dynamic", "static", "converted"])
def test_random_reads_across_blocks(vdi_corpus, name, tmp_path):
    path = vdi_corpus[name]
    raw = oracle.qemu_raw(path, tmp_path / "guest.raw").read_bytes()
    rnd = random.Random(name)
    with imgscope.open(path) as img, img.open_guest() as g:
        size = img.virtual_size
        assert size == len(raw)
        points = [k * BLOCK + d for k in range(size // BLOCK + 1) for d in (-700, -1, 0, 1)]
        points += [rnd.randrange(size) for _ in range(200)]
        for pos in points:
            pos = max(0, min(pos, size - 1))
            n = rnd.choice([1, 511, 4096, BLOCK + 3000])
            g.seek(pos)
            assert g.read(n) == raw[pos:pos + n], (pos, n)
        g.seek(size - 10)
        assert g.read(100) == raw[-10:]


def test_tables_and_fields_match_bytes(vdi_corpus):
    path = vdi_corpus["dynamic"]
    data = path.read_bytes()
    h = _hdr(path)
    with imgscope.open(path) as img:
        bm = img.tables["block_map"]
        assert list(bm.columns) == ["index", "entry_offset", "raw", "state", "host_offset"]
        raw = _map(path)
        assert (bm.raw.to_numpy() == raw).all()
        assert (bm.entry_offset.to_numpy() == h["offset_bmap"] + 4 * np.arange(raw.size)).all()
        alloc = raw < S.BLOCK_ZERO
        assert list(bm.state[alloc].unique()) == ["allocated"]
        assert (bm.state[raw == S.BLOCK_FREE] == "free").all()
        assert (bm.host_offset[alloc].to_numpy(np.uint64)
                == h["offset_data"] + raw[alloc].astype(np.uint64) * BLOCK).all()
        assert bm.host_offset[~alloc].isna().all()
        f = img.fields
        for row in f.itertuples():
            assert data[row.offset:row.offset + row.size] == row.raw, row.field
            assert row.description, row.field
        v = dict(zip(f.field, f.value))
        assert v["signature"] == S.SIGNATURE and v["version"] == S.VERSION_1_1
        assert v["uuid_image"] == str(uuid.UUID(bytes_le=data[0x188:0x198]))
        assert uuid.UUID(v["uuid_image"]).version == 4
        assert v["uuid_link"] == S.NULL_UUID
        assert v["disk_size"] == VSIZE and v["blocks_in_image"] == 7
        assert {"pre_header", "header"} == set(f.structure)
    # schema round trip: parse -> build gives the same bytes
    assert S.pre_header.build(S.pre_header.parse(data[:72])) == data[:72]
    assert S.header_v1.build(S.header_v1.parse(data[72:456])) == data[72:456]
    assert S.block_map(7).build(S.block_map(7).parse(data[512:540])) == data[512:540]


def test_extents_use_block_runs(vdi_corpus):
    with imgscope.open(vdi_corpus["converted"]) as img:
        ext = img.extents()
        assert list(ext.kind.astype(str)) == ["data", "zero", "data", "zero", "data", "zero"]
        # blocks 2 and 3 are consecutive in the data area: one run
        assert ext.length.tolist()[2] == 2 * BLOCK


def test_lchs_and_v0_headers(vdi_corpus, tmp_path):
    """A v1.1+ header (400 bytes, LCHS) parses its geometry; a v0 header is read too."""
    p = tmp_path / "plus.vdi"
    shutil.copy(vdi_corpus["converted"], p)
    _put_header(p, header_size=400)
    with open(p, "r+b") as f:
        f.seek(0x1C8)
        f.write(struct.pack("<4I", 100, 16, 63, 512))
    with imgscope.open(p) as img:
        v = dict(zip(img.fields.field, img.fields.value))
        assert v["lchs_cylinders"] == 100 and v["lchs_sector_size"] == 512
        assert img.findings.empty, img.findings.to_string()
        assert checks.guest_sha(img) == oracle.qemu_guest_sha256(vdi_corpus["converted"], workdir=tmp_path)
    # version 0: same content re-laid out with the v0 header and implied offsets
    src = vdi_corpus["converted"]
    h = _hdr(src)
    data = src.read_bytes()
    v0 = dict(image_type=1, image_flags=0, description="v0", cylinders=0, heads=0, sectors=0,
              sector_size=512, disk_size=h["disk_size"], block_size=BLOCK,
              blocks_in_image=h["blocks_in_image"], blocks_allocated=h["blocks_allocated"],
              uuid_image=str(uuid.uuid4()), uuid_last_snap=str(uuid.uuid4()), uuid_link=S.NULL_UUID)
    bmap, doff = S.v0_offsets(h["blocks_in_image"])
    out = (S.pre_header.build(dict(text="<<< innotek VirtualBox Disk Image >>>\n",
                                   signature=S.SIGNATURE, version=S.VERSION_0))
           + S.header_v0.build(v0) + data[h["offset_bmap"]:h["offset_bmap"] + 4 * h["blocks_in_image"]])
    assert len(out) == doff
    p0 = tmp_path / "v0.vdi"
    p0.write_bytes(out + data[h["offset_data"]:])
    with imgscope.open(p0) as img:
        assert img.findings.empty, img.findings.to_string()
        assert img.info()["virtual-size"] == h["disk_size"]
        assert checks.guest_sha(img) == oracle.qemu_guest_sha256(src, workdir=tmp_path)


# --------------------------------------------------------------------------- differencing images


def _make_diff(parent: Path, child: Path, *, parent_modify: str | None = None) -> None:
    """Turn the dynamic image ``child`` into a differencing child of ``parent``."""
    ph = _hdr(parent)
    _put_header(child, image_type=S.TYPE_DIFF, uuid_link=ph["uuid_image"],
                uuid_parent=parent_modify or ph["uuid_last_snap"])


@pytest.fixture
def chain(tmp_path):
    oracle.require_tools()
    rnd = random.Random(3)
    (tmp_path / "pa.bin").write_bytes(rnd.randbytes(3 * MiB))
    (tmp_path / "ch.bin").write_bytes(rnd.randbytes(3 * MiB))
    parent, child = tmp_path / "parent.vdi", tmp_path / "child.vdi"
    for p in (parent, child):
        oracle.run(oracle.QEMU_IMG, "create", "-f", "vdi", p, str(5 * MiB))
    oracle.qemu_io(parent, f"write -s pa.bin 0 {3 * MiB}", f"write -s pa.bin {4 * MiB} 4096", fmt="vdi")
    oracle.qemu_io(child, f"write -s ch.bin {2 * MiB - 100} 200", f"write -s ch.bin {4 * MiB} 8192", fmt="vdi")
    praw = oracle.qemu_raw(parent, tmp_path / "p.raw").read_bytes()
    craw = oracle.qemu_raw(child, tmp_path / "c.raw").read_bytes()
    cmap = _map(child)
    # expected guest: the child's block where allocated, else the parent's
    want = b"".join(craw[k * MiB:(k + 1) * MiB] if cmap[k] < S.BLOCK_ZERO else praw[k * MiB:(k + 1) * MiB]
                    for k in range(5))
    _make_diff(parent, child)
    return parent, child, want, cmap


def test_diff_chain_reads_parent(chain):
    parent, child, want, cmap = chain
    with checks.open_named(child) as img:
        assert img.variant == "diff"
        assert [l.path.name for l in img.chain] == ["child.vdi", "parent.vdi"]
        assert img.findings.empty and img.backing.findings.empty, img.findings.to_string()
        with img.open_guest() as g:
            assert g.read() == want
        ext = img.extents()
        depth_by_block = {int(o // MiB): int(d) for o, d in zip(ext.guest_offset, ext.depth)}
        assert depth_by_block[0] == 1 and depth_by_block[1] == 0 and depth_by_block[4] == 0
        m = checks.map_view(img)
        assert all(e["present"] for e in m[:-1]) and m[0]["depth"] == 1
        info = img.info(backing_chain=True)
        assert info[0]["backing-filename"] == "parent.vdi" and len(info) == 2
        assert info[1] == oracle.qemu_info(parent)
        reg = img.regions()
        assert not checks.tiling_problems(checks.file_regions(reg, img.source), img.source)


def test_diff_zero_entry_hides_parent(chain):
    parent, child, want, cmap = chain
    h = _hdr(child)
    _put_u32(child, h["offset_bmap"] + 0, S.BLOCK_ZERO)       # block 0: parent data hidden
    with imgscope.open(child) as img:
        with img.open_guest() as g:
            assert g.read(MiB) == bytes(MiB)
            assert g.read() == want[MiB:]


def test_diff_parent_modified_is_a_finding(chain):
    parent, child, want, cmap = chain
    _put_header(child, uuid_parent=str(uuid.uuid4()))
    with imgscope.open(child) as img:
        assert list(img.findings.code) == ["parent_uuid_mismatch"]
        with img.open_guest() as g:
            assert g.read() == want
    with pytest.raises(ParseError):
        imgscope.open(child, strict=True)


def test_diff_parent_only_in_same_folder(chain, tmp_path):
    parent, child, want, cmap = chain
    sub = tmp_path / "sub"
    sub.mkdir()
    shutil.move(parent, sub / "parent.vdi")
    with imgscope.open(child) as img:
        assert "parent_not_found" in set(img.findings.code)
        assert img.backing is None
        with img.open_guest() as g:
            data = g.read()
        assert data[:MiB] == bytes(MiB)                # block 0 free, no parent: zeros
    # a symlink leading out of the folder is not followed
    a = tmp_path / "a"
    a.mkdir()
    shutil.move(child, a / "child.vdi")
    (a / "link.vdi").symlink_to(sub / "parent.vdi")
    with imgscope.open(a / "child.vdi") as img:
        assert img.backing is None and "parent_not_found" in set(img.findings.code)
    # allowed inside the folder: the link finds it
    shutil.move(sub / "parent.vdi", a / "real_parent.vdi")
    with imgscope.open(a / "child.vdi") as img:
        assert img.backing is not None and img.backing.path.name == "real_parent.vdi"
        assert img.findings.empty


def test_diff_self_link_is_a_chain_error(chain):
    parent, child, want, cmap = chain
    other = child.parent / "loop.vdi"
    shutil.copy(child, other)
    # loop.vdi names child.vdi and child.vdi names loop.vdi
    _put_header(other, uuid_image=str(uuid.uuid4()))
    _put_header(child, uuid_link=_hdr(other)["uuid_image"])
    _put_header(other, uuid_link=_hdr(child)["uuid_image"])
    with pytest.raises(ImageError):
        imgscope.open(child)


# --------------------------------------------------------------------------- damaged input


def _codes(out) -> set:
    return set(out.codes)


def test_truncated_at_many_lengths(vdi_corpus, tmp_path):
    src = vdi_corpus["dynamic"].read_bytes()
    lengths = sorted({0, 10, 64, 71, 72, 100, 455, 456, 500, 512, 515, 530, 1024, 1025,
                      1024 + BLOCK // 2, 1024 + BLOCK, 1024 + 3 * BLOCK + 7, len(src) - 1})
    for n in lengths:
        p = tmp_path / f"cut{n}.vdi"
        p.write_bytes(src[:n])
        out = examine(p, "vdi")
        assert not out.problems, (n, out.problems)
        if n < 456:
            assert out.open_error is not None, n
        else:
            assert out.open_error is None, (n, out.open_error)
            assert _codes(out) & {"table_beyond_eof", "file_truncated", "block_beyond_eof",
                                  "data_truncated"}, (n, out.codes)
    # without -f: probing a cut file must also end in an ImageError, never anything else
    for n in (0, 50, 70):
        p = tmp_path / f"cut{n}.vdi"
        out = examine(p, None)
        assert not out.problems


def test_map_entry_beyond_eof(vdi_corpus, tmp_path):
    p = tmp_path / "eof.vdi"
    shutil.copy(vdi_corpus["converted"], p)
    h = _hdr(p)
    _put_u32(p, h["offset_bmap"] + 4 * 7, 1000)          # block 7 -> data block 1000
    out = examine(p, "vdi", read_limit=None)
    assert not out.problems and out.open_error is None
    assert "block_beyond_eof" in _codes(out) and "block_index_too_large" in _codes(out)
    with imgscope.open(p) as img, img.open_guest() as g:
        g.seek(7 * BLOCK)
        assert g.read(BLOCK) == bytes(BLOCK)
        reg = img.regions()
        assert "beyond_eof" in set(reg.kind)
    with pytest.raises(ParseError):
        imgscope.open(p, strict=True)


def test_duplicate_entries(vdi_corpus, tmp_path):
    p = tmp_path / "dup.vdi"
    shutil.copy(vdi_corpus["converted"], p)
    h = _hdr(p)
    m = _map(p)
    _put_u32(p, h["offset_bmap"] + 4 * 1, int(m[0]))     # block 1 also uses block 0's data
    with imgscope.open(p) as img:
        f = img.findings
        assert {"block_duplicate", "allocated_count_mismatch"} <= set(f.code)
        dup = f[f.code == "block_duplicate"]
        assert list(dup["index"]) == [1] and list(dup.host_offset) == [h["offset_bmap"] + 4]
        with img.open_guest() as g:
            a = g.read(BLOCK)
            assert g.read(BLOCK) == a
        reg = img.regions()
        assert not checks.tiling_problems(checks.file_regions(reg, img.source), img.source)


def test_allocated_counter_and_header_sizes(vdi_corpus, tmp_path):
    cases = {
        "count": (dict(blocks_allocated=1), {"allocated_count_mismatch", "trailing_data"}),
        "count_big": (dict(blocks_allocated=50), {"blocks_allocated_too_large"}),
        "disk_big": (dict(disk_size=100 * MiB), {"disk_size_exceeds_blocks"}),
        "blocks_more": (dict(blocks_in_image=20), {"blocks_in_image_too_many"}),
        "map_into_data": (dict(blocks_in_image=300), {"data_overlaps_block_map"}),
        "bmap_in_header": (dict(offset_bmap=0x100), {"block_map_overlaps_header"}),
        "unaligned": (dict(disk_size=VSIZE - 3), {"disk_size_unaligned"}),
        "block_size": (dict(block_size=3000), {"block_size_invalid"}),
        "extra": (dict(block_extra=3), {"block_extra_invalid"}),
        "type": (dict(image_type=9), {"image_type_invalid"}),
        "link": (dict(uuid_link=str(uuid.uuid4())), {"link_in_base_image"}),
        "diff_nolink": (dict(image_type=4), {"diff_without_parent"}),
    }
    for name, (values, want) in cases.items():
        p = tmp_path / f"{name}.vdi"
        shutil.copy(vdi_corpus["converted"], p)
        _put_header(p, **values)
        out = examine(p, "vdi", read_limit=None)
        assert not out.problems, (name, out.problems)
        assert out.open_error is None, (name, out.open_error)
        assert want <= _codes(out), (name, out.codes)


HOSTILE = {
    "huge_disk": dict(disk_size=(1 << 63) - 512),
    "max_disk": dict(disk_size=(1 << 64) - 1),
    "huge_block_count": dict(blocks_in_image=0xFFFFFFFF),
    "huge_both": dict(disk_size=(1 << 62), blocks_in_image=0xFFFFFFFF, blocks_allocated=0xFFFFFFFF),
    "map_far": dict(offset_bmap=0xFFFFFE00, offset_data=0xFFFFFE00),
    "data_far": dict(offset_data=0xFFFFFE00),
    "block_huge": dict(block_size=1 << 31),
    "block_zero": dict(block_size=0, blocks_in_image=0),
    "small_blocks_many": dict(block_size=512, disk_size=(1 << 62), blocks_in_image=0xFFFFFFFF),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_headers_bounded(vdi_corpus, tmp_path, name):
    p = tmp_path / f"{name}.vdi"
    shutil.copy(vdi_corpus["dynamic"], p)
    _put_header(p, **HOSTILE[name])
    out = check_bounded(p, name, "vdi")
    assert out.open_error is None or out.open_error[0] in ("ParseError", "Truncated", "Unsupported",
                                                            "LimitExceeded"), out.open_error
    assert out.codes, name


def test_hostile_map_entries(vdi_corpus, tmp_path):
    """Every kind of entry value at once: out of range, duplicates, specials."""
    p = tmp_path / "entries.vdi"
    shutil.copy(vdi_corpus["dynamic"], p)
    h = _hdr(p)
    vals = [0xFFFFFFFD, 0, 0, 0x7FFFFFFF, S.BLOCK_ZERO, S.BLOCK_FREE, 0x12345678]
    with open(p, "r+b") as f:
        f.seek(h["offset_bmap"])
        f.write(np.array(vals, "<u4").tobytes())
    out = check_bounded(p, "entries", "vdi")
    assert out.open_error is None
    assert {"block_duplicate", "block_index_too_large", "block_beyond_eof"} <= _codes(out)


def test_bad_signature_and_version(vdi_corpus, tmp_path):
    p = tmp_path / "sig.vdi"
    shutil.copy(vdi_corpus["dynamic"], p)
    _put_u32(p, 0x40, 0x12345678)
    with pytest.raises(ParseError):
        imgscope.open(p, "vdi")
    shutil.copy(vdi_corpus["dynamic"], p)
    _put_u32(p, 0x44, 0x00030000)
    with pytest.raises(imgscope.Unsupported):
        imgscope.open(p)


def test_random_mutations_raise_only_image_errors(vdi_corpus, tmp_path):
    src = bytearray(vdi_corpus["converted"].read_bytes()[:4096 + 2 * BLOCK])
    rnd = random.Random(11)
    for i in range(40):
        data = bytearray(src)
        for _ in range(rnd.randrange(1, 8)):
            pos = rnd.randrange(0x40, 0x230)
            data[pos] = rnd.randrange(256)
        p = tmp_path / f"m{i}.vdi"
        p.write_bytes(data)
    def body():
        bad = []
        for i in range(40):
            out = examine(tmp_path / f"m{i}.vdi", "vdi", read_limit=2 * BLOCK)
            if out.problems:
                bad.append((i, out.problems))
        return bad
    res = run_isolated(body, timeout=120)
    assert res[0] == "ok", res
    assert res[1] == [], res[1]
