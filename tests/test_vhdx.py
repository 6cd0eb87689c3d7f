"""VHDX read by imgscope versus qemu-img 7.2 on real images, and on fixtures it cannot make.

The qemu corpus (built once per module with qemu-img / qemu-io): dynamic disks with
1, 8 and 32 MiB blocks, ``block_state_zero`` on (ZERO blocks) and off (NOT_PRESENT),
a 4 MiB log, fixed disks with and without ZERO blocks, sizes that are no multiple of
the block, a 4.3 GiB disk whose data lies past the first sector-bitmap BAT entry,
``qemu-img convert -O vhdx`` from a qcow2, and a disk whose log still needs replay
(the BAT update of a write failed through blkdebug: a real QEMU-made dirty log).
``sample_images/make_vhdx_fixtures.py`` builds what qemu-img cannot: differencing
disks (sector bitmaps, parent locator), 4096-byte sectors, every payload state,
hand-made logs (one wrapped around the circular buffer).  Damaged copies only give
findings or ImageError, in bounded time and memory.
"""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import imgscope
from imgscope.errors import ImageError, UnsafePath
from imgscope.map import map_entries
from imgscope.schemas import vhdx as X

import checks
import oracle
from test_qcow2_damaged import check_bounded, run_isolated

MiB = oracle.MiB
GiB = oracle.GiB

_BUILDER = Path(__file__).resolve().parents[1] / "sample_images" / "make_vhdx_fixtures.py"
_spec = importlib.util.spec_from_file_location("make_vhdx_fixtures", _BUILDER)
fx = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fx            # dataclasses look their module up while it loads
_spec.loader.exec_module(fx)


@dataclass
class Sample:
    name: str
    path: Path
    writes: list = field(default_factory=list)       # (offset, bytes written)
    fixed: bool = False

    def info(self):
        return oracle.qemu_info(self.path, fmt="vhdx")

    def map(self):
        return oracle.qemu_map(self.path, fmt="vhdx")


def qemu_map_view(img) -> list[dict]:
    """imgscope.map's entries without file names (qemu-img map's view of a VHDX)."""
    return [{k: v for k, v in e.items() if k != "filename"} for e in map_entries(img)]


def _pattern_writes(path: Path, writes: list[tuple[int, int]], tag: str) -> list:
    """Random bytes written with qemu-io; returns (offset, data)."""
    pay = path.parent / "_payload"
    pay.mkdir(exist_ok=True)
    cmds, out = [], []
    for off, n in writes:
        data = random.Random(f"{tag}:{off}:{n}").randbytes(n)
        f = pay / f"{tag}-{off:x}-{n:x}.bin"
        f.write_bytes(data)
        cmds.append(f"write -s {f} {off} {n}")
        out.append((off, data))
    oracle.qemu_io(path, *cmds, fmt="vhdx")
    return out


def _create(root: Path, name: str, size: int, *opts: str) -> Path:
    path = root / f"{name}.vhdx"
    o = ["-o", ",".join(opts)] if opts else []
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "vhdx", *o, path, str(size))
    return path


BLKDEBUG_FAIL_BAT = """[inject-error]
event = "pwritev"
iotype = "write"
sector = "4096"
errno = "5"
"""


def make_dirty_with_qemu(root: Path, name: str = "dirty_qemu") -> tuple[Path, bytes]:
    """A dynamic disk (1 MiB blocks, BAT at 2 MiB) whose write of 64 KiB at 1 MiB reached
    the data block and the log, but whose BAT update failed (blkdebug fails writes to
    sector 4096 = the BAT): the log still holds the BAT sector, log_guid is set."""
    path = _create(root, name, 5 * MiB, "block_size=1M")
    (root / "bd.conf").write_text(BLKDEBUG_FAIL_BAT)
    data = random.Random(name).randbytes(64 * 1024)
    (root / f"{name}.bin").write_bytes(data)
    spec = {"driver": "vhdx", "file": {"driver": "blkdebug", "config": "bd.conf",
                                       "image": {"driver": "file", "filename": path.name}}}
    proc = oracle.run(oracle.QEMU_IO, "-c", f"write -s {name}.bin 1M 64k", "json:" + json.dumps(spec),
                      cwd=root, check=False)
    assert proc.returncode != 0 and "Input/output error" in proc.stdout + proc.stderr, proc
    return path, data


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Sample]:
    oracle.require_tools()
    root = tmp_path_factory.mktemp("vhdx")
    out: dict[str, Sample] = {}

    def sample(name, size, *opts, writes=(), fixed=False):
        path = _create(root, name, size, *opts)
        s = Sample(name, path, fixed=fixed)
        if writes:
            s.writes = _pattern_writes(path, list(writes), name)
        out[name] = s
        return s

    sample("dyn_default", 10 * MiB + 1536,
           writes=[(0, 65536), (8 * MiB - 3000, 6000), (10 * MiB + 1536 - 700, 700)])
    sample("dyn_1m", 5 * MiB + 512, "block_size=1M",
           writes=[(MiB - 512, 1024), (3 * MiB + 4096, 70000), (5 * MiB, 512)])
    sample("dyn_nozero", 6 * MiB, "block_size=1M", "block_state_zero=off",
           writes=[(2 * MiB + 17, 3000), (5 * MiB - 4096, 4096)])
    sample("dyn_32m_log4m", 100 * MiB, "block_size=32M", "log_size=4M",
           writes=[(31 * MiB, 2 * MiB), (99 * MiB, 4096)])
    sample("dyn_empty", 0)
    sample("fixed_zero", 10 * MiB, "subformat=fixed", writes=[(4 * MiB, 8192)], fixed=True)
    sample("fixed_full", 6 * MiB + 512, "subformat=fixed", "block_state_zero=off", "block_size=1M",
           writes=[(0, 4096), (5 * MiB + 100, 612)], fixed=True)
    oracle.qemu_io(out["dyn_1m"].path, "write -z 2M 1M", fmt="vhdx")       # zeros, written out
    out["dyn_1m"].writes.append((2 * MiB, bytes(MiB)))
    # convert from a qcow2 with data
    src = root / "source.qcow2"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", src, str(20 * MiB))
    _pattern_writes_qcow2(src)
    conv = root / "converted.vhdx"
    oracle.run(oracle.QEMU_IMG, "convert", "-q", "-f", "qcow2", "-O", "vhdx", src, conv)
    out["converted"] = Sample("converted", conv)
    return out


def _pattern_writes_qcow2(path: Path) -> None:
    oracle.qemu_io(path, "write -P 0x5a 0 1M", "write -P 0xa5 9M 64k", "write -P 0x01 19M 1M",
                   fmt="qcow2")


@pytest.fixture(scope="module")
def raws(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("vhdx_raw")
    return {name: oracle.qemu_raw(s.path, d / f"{name}.raw", fmt="vhdx") for name, s in corpus.items()}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    oracle.require_tools()
    return fx.build_fixtures(tmp_path_factory.mktemp("vhdx_fixtures"))


def _bat_of(path: Path) -> tuple[np.ndarray, int]:
    """The BAT straight from the file (region table 1), independent of imgscope."""
    data = path.read_bytes()
    n = struct.unpack_from("<I", data, X.REGION_TABLE1_OFFSET + 8)[0]
    for k in range(n):
        guid, off, length, _ = struct.unpack_from("<16sQII", data, X.REGION_TABLE1_OFFSET + 16 + 32 * k)
        if guid == X.guid_bytes(X.BAT_GUID):
            return np.frombuffer(data, "<u8", count=length // 8, offset=off), off
    raise AssertionError("no BAT region")


# =========================================================================== the corpus


def test_corpus_is_what_it_claims(corpus):
    """BAT states as QEMU writes them: ZERO with block_state_zero, NOT_PRESENT without,
    FULLY_PRESENT once written (write -z too: QEMU 7.2 writes zeros out)."""
    bat, _ = _bat_of(corpus["dyn_1m"].path)
    assert (bat[:6] & 7).tolist() == [6, 6, 6, 6, 2, 6]          # block 4 never written
    bat, _ = _bat_of(corpus["dyn_nozero"].path)
    assert (bat[:6] & 7).tolist() == [0, 0, 6, 0, 6, 0]
    bat, _ = _bat_of(corpus["fixed_zero"].path)
    assert (bat[:2] & 7).tolist() == [6, 2]              # write moved block 0 to the end
    bat, _ = _bat_of(corpus["fixed_full"].path)
    assert set((bat[:7] & 7).tolist()) == {6}
    head = corpus["dyn_default"].path.read_bytes()[:X.HEADER_SECTION_END]
    assert head[:8] == b"vhdxfile" and head[8:40].decode("utf-16-le").startswith("QEMU v")
    for off in (X.HEADER1_OFFSET, X.HEADER2_OFFSET):
        assert X.checksum(head[off:off + X.HEADER_SIZE]) == struct.unpack_from("<I", head, off + 4)[0]
    assert X.crc32c(b"123456789") == 0xE3069283


def test_info_matches_qemu(corpus):
    bad = []
    for name, s in corpus.items():
        with checks.open_named(s.path, "vhdx") as img:
            bad += checks.differences(img.info(), s.info(), f"{name}: ")
    assert not bad, "\n".join(bad)


def test_cli_info_text_equals_qemu(corpus):
    s = corpus["dyn_1m"]
    p = subprocess.run([sys.executable, "-m", "imgscope", "info", "--output=json", s.path.name],
                       capture_output=True, text=True, cwd=s.path.parent)
    assert p.returncode == 0, p.stderr
    theirs = oracle.run(oracle.QEMU_IMG, "info", "-U", "--output=json", s.path.name,
                        cwd=s.path.parent).stdout
    assert json.loads(p.stdout) == json.loads(theirs)


def test_map_matches_qemu(corpus):
    """qemu-img 7.2 maps a VHDX as one data run without offsets (no block-status callback)."""
    bad = []
    for name, s in corpus.items():
        with checks.open_named(s.path, "vhdx") as img:
            mine = qemu_map_view(img)
            if img.virtual_size:
                checks.assert_extents_cover_the_disk(img, name)
        theirs = s.map()
        if mine != theirs:
            bad.append(f"{name}: {mine[:2]} vs {theirs[:2]}")
    assert not bad, "\n".join(bad)


def test_guest_sha256_equals_qemu_convert(corpus, raws):
    for name, s in corpus.items():
        with imgscope.open(s.path, "vhdx") as img:
            assert checks.guest_sha(img) == oracle.sha256_file(raws[name]), name


def test_random_reads_and_written_data(corpus, raws):
    rng = random.Random(5)
    for name, s in corpus.items():
        ref = raws[name].read_bytes()
        with imgscope.open(s.path, "vhdx") as img, img.open_guest() as g:
            assert img.virtual_size == len(ref)
            for off, data in s.writes:
                g.seek(off)
                assert g.read(len(data)) == data, (name, off)
            for _ in range(30 if ref else 0):
                off = rng.randrange(len(ref))
                n = rng.randrange(1, 3 * MiB)
                g.seek(off)
                assert g.read(n) == ref[off:off + n], (name, off, n)


def test_extents_follow_the_bat(corpus):
    """extents() kinds come from the BAT states: FULLY_PRESENT data at the BAT offset,
    ZERO zero, NOT_PRESENT unallocated (read as zeros without a parent)."""
    for name in ("dyn_1m", "dyn_nozero", "fixed_zero", "fixed_full", "dyn_default"):
        s = corpus[name]
        bat, _ = _bat_of(s.path)
        with imgscope.open(s.path, "vhdx") as img:
            bs = img.block_size
            ext = img.extents(merge=False)
            for blk in range(-(-img.virtual_size // bs)):
                e = int(bat[blk + blk // img.chunk_ratio])
                row = ext[(ext.guest_offset <= blk * bs) & (ext.guest_offset + ext.length > blk * bs)].iloc[0]
                want = {6: "data", 2: "zero", 0: "unallocated"}[e & 7]
                assert row.kind == want, (name, blk)
                if want == "data":
                    assert int(row.host_offset) + (blk * bs - int(row.guest_offset)) == e & ~0xFFFFF
            assert img.variant == ("fixed" if s.fixed else "dynamic")


def test_regions_tile_and_no_findings(corpus):
    bad = []
    for name, s in corpus.items():
        with imgscope.open(s.path, "vhdx") as img:
            reg = img.regions()
            bad += [f"{name}: {p}" for p in checks.tiling_problems(checks.file_regions(reg, img.source), img.source)]
            kinds = set(reg.kind)
            assert {"header", "log", "bat", "metadata"} <= kinds, name
            f = img.findings
            bad += [f"{name}: finding {c}: {m}" for c, m in zip(f.code, f.message)]
            owners = set(reg.owner)
            assert {"header 1", "region table 2", "metadata item virtual_disk_size"} <= owners, name
            if ((_bat_of(s.path)[0][:4] & 7) == 6).any():
                assert "data" in kinds, name
    assert not bad, "\n".join(bad)


def test_strict_open_and_schema_round_trip(corpus):
    """Clean QEMU images open in strict mode; every record parses and builds back to its bytes."""
    for name, s in corpus.items():
        with imgscope.open(s.path, "vhdx", strict=True) as img:
            img.extents()
    data = corpus["dyn_1m"].path.read_bytes()
    for struct_, off, n in ((X.file_identifier, 0, 520), (X.header, X.HEADER1_OFFSET, 4096),
                            (X.header, X.HEADER2_OFFSET, 4096),
                            (X.region_table_header, X.REGION_TABLE1_OFFSET, 16),
                            (X.region_table_entry, X.REGION_TABLE1_OFFSET + 16, 32),
                            (X.metadata_table_header, 3 * MiB, 32),
                            (X.metadata_table_entry, 3 * MiB + 32, 32),
                            (X.file_parameters, 3 * MiB + 65536, 8),
                            (X.page83_data, 3 * MiB + 65536 + 16, 16),
                            (X.log_entry_header, MiB, 64), (X.data_descriptor, MiB + 64, 32),
                            (X.data_sector, MiB + 4096, 4096)):
        raw = data[off:off + n]
        assert struct_.build(struct_.parse(raw)) == raw, (struct_, off)
    for array, dtype_size, off, count in ((X.region_entries, 32, X.REGION_TABLE1_OFFSET + 16, 2),
                                          (X.metadata_entries, 32, 3 * MiB + 32, 5),
                                          (X.bat_table, 8, 2 * MiB, 6),
                                          (X.log_descriptors, 32, MiB + 64, 1)):
        raw = data[off:off + dtype_size * count]
        assert array(count).build(array(count).parse(raw)) == raw


def test_fields_match_raw_bytes(corpus):
    for name, s in corpus.items():
        data = s.path.read_bytes()
        with imgscope.open(s.path, "vhdx") as img:
            f = img.fields
            real = f[f.structure != "vhdx"]
            for off, size, raw in zip(real.offset, real["size"], real.raw):
                assert bytes(raw) == data[int(off):int(off) + int(size)], (name, off)
            assert set(f.structure) >= {"file_identifier", "header1", "header2", "region_table1",
                                        "metadata_table", "file_parameters", "virtual_disk_size",
                                        "page83_data", "logical_sector_size", "vhdx"}
            v = f.set_index(["structure", "field"])["value"]
            assert v[("virtual_disk_size", "virtual_disk_size")] == img.virtual_size
            assert v[("file_parameters", "block_size")] == img.cluster_size
            seq = [v[(h, "sequence_number")] for h in ("header1", "header2")]
            assert v[("vhdx", "current_header")] == 1 + int(seq[1] > seq[0])
            assert v[("vhdx", "qemu_7_2")] == "reads"
            assert all(d for d in real.description), name


def test_bat_table_matches_raw_bytes(corpus):
    for name, s in corpus.items():
        bat, off = _bat_of(s.path)
        with imgscope.open(s.path, "vhdx") as img:
            t = img.tables["bat"]
            n = len(t)
            assert (t.raw.to_numpy() == bat[:n]).all(), name
            assert (t.entry_offset.to_numpy() == off + 8 * np.arange(n)).all()
            state = bat[:n] & 7
            names = {0: "NOT_PRESENT", 2: "ZERO", 6: "FULLY_PRESENT"}
            assert list(t.state.astype(str)) == [names[int(x)] for x in state], name
            present = state == 6
            assert (t.file_offset[present].to_numpy() == (bat[:n][present] & ~np.uint64(0xFFFFF))).all()
            assert t.file_offset[~present].isna().all()


def test_interleaved_sector_bitmap_entry(tmp_path):
    """256 MiB blocks: the chunk ratio is 16, BAT entry 16 is a sector-bitmap slot and
    payload block 16 lives at entry 17 (qemu-io writes there; both read the same)."""
    size = 17 * 256 * MiB + 3 * MiB
    path = _create(tmp_path, "interleave", size, "block_size=256M")
    writes = [(16 * 256 * MiB - 4096, 8192), (17 * 256 * MiB + MiB, 4096)]
    oracle.qemu_io(path, *(f"write -P 0x{0x31 + k:x} {o} {n}" for k, (o, n) in enumerate(writes)),
                   fmt="vhdx")
    # qemu's view of those bytes (read -P fails unless every byte is the pattern)
    oracle.qemu_io(path, *(f"read -P 0x{0x31 + k:x} {o} {n}" for k, (o, n) in enumerate(writes)),
                   fmt="vhdx")
    assert oracle.qemu_info(path, fmt="vhdx")["virtual-size"] == size
    with checks.open_named(path, "vhdx") as img:
        assert img.chunk_ratio == 16
        t = img.tables["bat"]
        assert len(t) == 19 and list(t.kind.astype(str)).count("sector_bitmap") == 1
        assert t.kind[16] == "sector_bitmap" and t.state[16] == "SB_NOT_PRESENT"
        assert t.block[17] == 16 and t.state[17] == "FULLY_PRESENT" and t.state[18] == "FULLY_PRESENT"
        assert t.state[15] == "FULLY_PRESENT"
        with img.open_guest() as g:
            for k, (o, n) in enumerate(writes):
                g.seek(o - 512)
                got = g.read(n + 1024)
                assert got == bytes(512) + bytes([0x31 + k]) * n + bytes(512), k
        assert not checks.differences(img.info(), oracle.qemu_info(path, fmt="vhdx"))
        assert not len(img.findings)


def test_large_disk_opens_without_a_loop_per_block(tmp_path):
    """64 TiB (the maximum qemu-img creates): a million BAT entries, one extent."""
    path = _create(tmp_path, "huge", 64 * 1024 * GiB)
    with imgscope.open(path, "vhdx") as img:
        assert len(img.tables["bat"]) > 1_000_000
        ext = img.extents()
        assert len(ext) == 1 and ext.kind[0] == "zero"
        assert img.info()["virtual-size"] == 64 * 1024 * GiB


# =========================================================================== the log


def test_qemu_made_dirty_log(tmp_path):
    path, data = make_dirty_with_qemu(tmp_path)
    before = oracle.sha256_file(path)
    proc = oracle.run(oracle.QEMU_IMG, "info", "-f", "vhdx", path, check=False)
    assert proc.returncode != 0 and "needs to be replayed" in proc.stderr
    raw_bat, _ = _bat_of(path)
    assert int(raw_bat[1]) & 7 == X.PAYLOAD_BLOCK_ZERO          # the file's BAT is stale
    with imgscope.open(path, "vhdx") as img:
        assert "log_replay_needed" in set(img.findings.code)
        assert img.tables["bat"].state[1] == "FULLY_PRESENT"     # replayed in memory
        log = img.tables["log"]
        assert log.active.sum() == 1 and log.valid[log.active].all()
        with img.open_guest() as g:
            g.seek(MiB)
            assert g.read(len(data)) == data
        mine = checks.guest_sha(img)
        fields = img.fields.set_index(["structure", "field"])["value"]
        assert fields[("vhdx", "log_state")].startswith("replay needed")
        assert "refuses" in fields[("vhdx", "qemu_7_2")]
    assert oracle.sha256_file(path) == before                    # imgscope never writes
    copy = tmp_path / "replayed.vhdx"
    shutil.copy(path, copy)
    assert oracle.run(oracle.QEMU_IMG, "check", "-r", "all", "-f", "vhdx", copy).returncode == 0
    theirs = oracle.qemu_raw(copy, tmp_path / "replayed.raw", fmt="vhdx")
    assert mine == oracle.sha256_file(theirs)
    with imgscope.open(copy, "vhdx") as img:
        assert checks.guest_sha(img) == mine and not len(img.findings)


def test_stale_log_entries_are_listed_not_replayed(corpus):
    """QEMU leaves its last entries in the log with log_guid zeroed: listed, inactive."""
    with imgscope.open(corpus["dyn_1m"].path, "vhdx") as img:
        log = img.tables["log"]
        assert len(log) >= 1 and not log.active.any()
        assert (log.checksum_ok & log.descriptors_ok & ~log.guid_matches).all()
        d = img.tables["log_descriptors"]
        assert len(d) == log.descriptor_count.sum() and set(d.kind) <= {"data", "zero"}
        bat_off = img.bat_region[0]
        assert ((d.target_offset >= bat_off) & (d.target_offset < bat_off + img.bat_region[1])).all()


# =========================================================================== fixtures


def _expected_sha(f) -> str:
    return oracle.sha256_file(f.expected)


def test_fixture_base_is_read_alike_by_qemu(fixtures, tmp_path):
    f = fixtures["base"]
    raw = oracle.qemu_raw(f.path, tmp_path / "base.raw", fmt="vhdx")
    assert oracle.sha256_file(raw) == _expected_sha(f)        # the builder makes valid VHDX
    with checks.open_named(f.path, "vhdx") as img:
        assert checks.guest_sha(img) == _expected_sha(f)
        assert not checks.differences(img.info(), oracle.qemu_info(f.path, fmt="vhdx"))
        assert qemu_map_view(img) == oracle.qemu_map(f.path, fmt="vhdx")
        assert not len(img.findings)
        states = list(img.tables["bat"].state.astype(str)[:9])
        assert states == ["FULLY_PRESENT", "ZERO", "NOT_PRESENT", "FULLY_PRESENT", "UNMAPPED",
                          "UNDEFINED", "UNMAPPED_v095", "FULLY_PRESENT", "FULLY_PRESENT"]
        kinds = img.extents(merge=False)
        assert set(kinds.kind) == {"data", "zero", "unallocated"}


@pytest.mark.parametrize("name", ["child", "child_stale"])
def test_differencing_reads_through_parent(fixtures, name):
    f = fixtures[name]
    proc = oracle.run(oracle.QEMU_IMG, "info", "-f", "vhdx", f.path, check=False)
    assert proc.returncode != 0 and fx.FIXTURES[name]["error"] in proc.stderr
    with imgscope.open(f.path) as img:
        assert img.format == "vhdx" and img.variant == "differencing"
        assert img.backing is not None and img.backing.path == fixtures["base"].path.resolve()
        assert img.backing_name == "base.vhdx" and img.info()["backing-filename"] == "base.vhdx"
        assert checks.guest_sha(img) == _expected_sha(f)
        codes = set(img.findings.code)
        if name == "child":
            assert not codes
        else:
            assert codes == {"parent_linkage_mismatch"}
        ext = img.extents()
        assert set(ext.depth) == {0, 1}
        loc = img.tables["parent_locator"].set_index("key")["value"]
        assert loc["relative_path"] == ".\\base.vhdx"
        assert loc["parent_linkage"].strip("{}").lower() == f.notes["linkage"]
        t = img.tables["bat"]
        cr = img.chunk_ratio
        assert len(t) == cr + 1 and t.kind[cr] == "sector_bitmap" and t.state[cr] == "SB_PRESENT"
        assert list(t.state.astype(str)[[2, 3, 8]]) == ["PARTIALLY_PRESENT"] * 3
        bits = img.sector_bitmap(2)
        assert bits.size == img.block_size // 512 and sorted(np.flatnonzero(bits)) == [0, 1, 2, 100, 2047]
        # sectors whose bit is clear come from the parent, set ones from this file
        with img.open_guest() as g, img.backing.open_guest() as pg:
            g.seek(2 * MiB + 3 * 512)
            pg.seek(2 * MiB + 3 * 512)
            assert g.read(512) == pg.read(512)
        reg = img.regions()
        assert not checks.tiling_problems(checks.file_regions(reg, img.source), img.source)
        assert "bitmap_data" in set(reg.kind)
        assert img.fields.set_index(["structure", "field"])["value"][("vhdx", "qemu_7_2")].startswith("refuses")


def test_differencing_parent_confined(fixtures, tmp_path):
    """A parent named outside the child's folder is refused unless allowed."""
    base = fixtures["base"]
    sub = tmp_path / "sub"
    sub.mkdir()
    shutil.copy(base.path, tmp_path / "base.vhdx")
    data = random.Random(9).randbytes(MiB)
    child = sub / "child.vhdx"
    fx.build_vhdx(child, virtual_size=base.virtual_size,
                  blocks={4: (X.PAYLOAD_BLOCK_FULLY_PRESENT, data)},
                  parent={"parent_linkage": "{" + fx.GUID_BASE_DATA + "}",
                          "relative_path": "..\\base.vhdx"})
    with pytest.raises(UnsafePath):
        imgscope.open(child)
    with imgscope.open(child, allow_paths=[tmp_path]) as img:
        expect = bytearray(base.expected.read_bytes())
        expect[4 * MiB:5 * MiB] = data
        with img.open_guest() as g:
            assert g.read() == bytes(expect)
        assert not len(img.findings)


def test_sector4k_fixture(fixtures):
    f = fixtures["sector4k"]
    proc = oracle.run(oracle.QEMU_IMG, "info", "-f", "vhdx", f.path, check=False)
    assert proc.returncode != 0 and "not supported" in proc.stderr
    with imgscope.open(f.path) as img:
        assert img.logical_sector_size == 4096 and img.chunk_ratio == 32768
        assert checks.guest_sha(img) == _expected_sha(f)
        assert set(img.findings.code) == {"qemu_4k_sectors"}


@pytest.mark.parametrize("name", ["dirty_log", "dirty_log_wrap"])
def test_fixture_logs_replay_like_qemu(fixtures, tmp_path, name):
    """imgscope replays in memory what 'qemu-img check -r all' replays on disk; for the
    wrapped log QEMU replays only the last entry (its own rule), the specification both."""
    f = fixtures[name]
    proc = oracle.run(oracle.QEMU_IMG, "info", "-f", "vhdx", f.path, check=False)
    assert proc.returncode != 0 and "needs to be replayed" in proc.stderr
    copy = tmp_path / f.path.name
    shutil.copy(f.path, copy)
    oracle.run(oracle.QEMU_IMG, "check", "-r", "all", "-f", "vhdx", copy)
    theirs = oracle.sha256_file(oracle.qemu_raw(copy, tmp_path / "q.raw", fmt="vhdx"))
    with imgscope.open(f.path) as img:
        mine = checks.guest_sha(img)
        codes = set(img.findings.code)
        log = img.tables["log"]
        assert sorted(log[log.active].sequence_number) == [10, 11]
        assert [e["sequence_number"] for e in img.log_sequence] == [10, 11]      # replay order
        d = img.tables["log_descriptors"]
        assert sorted(d[d.active].kind) == ["data", "data", "zero"]
    assert mine == _expected_sha(f)
    if name == "dirty_log":
        assert theirs == mine and codes == {"log_replay_needed"}
    else:
        assert theirs == oracle.sha256_file(f.qemu_expected) != mine
        assert codes == {"log_replay_needed", "log_sequence_qemu_differs"}


# =========================================================================== damaged input


def _copy(path: Path, tmp_path: Path, name: str | None = None) -> Path:
    p = tmp_path / (name or path.name)
    shutil.copy(path, p)
    return p


def _poke(path: Path, offset: int, data: bytes, crc_at: int | None = None, crc_len: int = 0) -> None:
    """Overwrite bytes; with crc_at recompute the CRC-32C of [crc_at, crc_at + crc_len)."""
    b = bytearray(path.read_bytes())
    b[offset:offset + len(data)] = data
    if crc_at is not None:
        b[crc_at + 4:crc_at + 8] = struct.pack("<I", X.checksum(bytes(b[crc_at:crc_at + crc_len])))
    path.write_bytes(b)


def _codes(path) -> set:
    with imgscope.open(path, "vhdx") as img:
        img.extents()
        img.regions()
        return set(img.findings.code)


def _current_header(path: Path) -> int:
    d = path.read_bytes()
    s1, s2 = (struct.unpack_from("<Q", d, o + 8)[0] for o in (X.HEADER1_OFFSET, X.HEADER2_OFFSET))
    return X.HEADER1_OFFSET if s1 > s2 else X.HEADER2_OFFSET


def test_bad_header_checksum(corpus, raws, tmp_path):
    s = corpus["dyn_1m"]
    p = _copy(s.path, tmp_path)
    cur = _current_header(p)
    _poke(p, cur + 100, b"\x01")                    # inside reserved: CRC now wrong
    codes = _codes(p)
    assert {"header_checksum", "header_copy_invalid"} <= codes
    with imgscope.open(p, "vhdx") as img:
        assert img.current_header == (0 if cur == X.HEADER2_OFFSET else 1)
        assert checks.guest_sha(img) == oracle.sha256_file(raws["dyn_1m"])
    info = oracle.qemu_info(p, fmt="vhdx")                   # qemu uses the other one too
    assert info["virtual-size"] == s.info()["virtual-size"]
    other = X.HEADER1_OFFSET + X.HEADER2_OFFSET - cur
    _poke(p, other + 100, b"\x01")
    with pytest.raises(ImageError, match="no valid VHDX header"):
        imgscope.open(p, "vhdx")
    assert oracle.run(oracle.QEMU_IMG, "info", "-f", "vhdx", p, check=False).returncode != 0
    check_bounded(p, "both headers bad", "vhdx")


def test_bad_region_table_uses_the_copy(corpus, raws, tmp_path):
    p = _copy(corpus["dyn_1m"].path, tmp_path)
    _poke(p, X.REGION_TABLE1_OFFSET + 1000, b"\x07")
    assert "region_table1_invalid" in _codes(p)
    assert oracle.run(oracle.QEMU_IMG, "info", "-f", "vhdx", p, check=False).returncode != 0
    with imgscope.open(p, "vhdx") as img:
        assert checks.guest_sha(img) == oracle.sha256_file(raws["dyn_1m"])
    _poke(p, X.REGION_TABLE2_OFFSET + 1000, b"\x07")
    with pytest.raises(ImageError, match="no valid region table"):
        imgscope.open(p, "vhdx")


def test_bat_entry_beyond_eof_and_overlaps(corpus, tmp_path):
    s = corpus["dyn_1m"]
    bat, off = _bat_of(s.path)
    p = _copy(s.path, tmp_path)
    _poke(p, off + 8 * 1, struct.pack("<Q", X.bat_entry(6, 1 << 40)))      # block 1 at 1 TiB
    assert "bat_entry_beyond_eof" in _codes(p)
    proc = oracle.run(oracle.QEMU_IMG, "info", "-f", "vhdx", p, check=False)
    assert proc.returncode != 0 and "truncated" in proc.stderr
    with imgscope.open(p, "vhdx") as img, img.open_guest() as g:
        g.seek(MiB)
        assert g.read(MiB) == bytes(MiB)                                  # reads zeros, no crash
    check_bounded(p, "beyond eof", "vhdx")
    p = _copy(s.path, tmp_path, "overlap.vhdx")
    _poke(p, off + 8 * 3, struct.pack("<Q", int(bat[0])))                 # block 3 shares block 0
    assert "bat_entry_overlap" in _codes(p)
    _poke(p, off + 8 * 3, struct.pack("<Q", X.bat_entry(6, off)))         # block 3 on the BAT
    assert "bat_entry_overlaps_metadata" in _codes(p)
    _poke(p, off + 8 * 3, struct.pack("<Q", 4 | (1 << 8)))                # invalid state, reserved bits
    assert {"bat_state_invalid", "bat_reserved_bits"} <= _codes(p)


def test_truncated_at_many_lengths(corpus, tmp_path):
    data = corpus["dyn_1m"].path.read_bytes()
    cuts = sorted({0, 7, 8, 600, X.HEADER1_OFFSET + 100, X.HEADER2_OFFSET + 100,
                   X.REGION_TABLE1_OFFSET + 10, X.REGION_TABLE2_OFFSET + 10, MiB + 100,
                   2 * MiB + 8, 3 * MiB + 40, 3 * MiB + 65536 + 10, 4 * MiB, 8 * MiB + 4096,
                   len(data) - MiB - 1, len(data) - 1})
    for cut in cuts:
        p = tmp_path / f"cut{cut}.vhdx"
        p.write_bytes(data[:cut])
        out = check_bounded(p, f"cut at {cut}", "vhdx")
        if cut < 3 * MiB + 65536:
            assert out.open_error is not None, cut        # no header / region table / metadata
        else:
            assert out.open_error is None and out.codes, cut
        if 8 * MiB < cut < len(data):
            assert {"bat_entry_beyond_eof", "bat_entry_truncated"} & set(out.codes), cut


@pytest.mark.parametrize("what", ["metadata_count", "item_offset", "item_length", "virtual_size",
                                  "block_size", "region_count", "region_length", "log_flood",
                                  "sector_size", "locator_count"])
def test_hostile_sizes_bounded(corpus, fixtures, tmp_path, what):
    s = corpus["dyn_1m"]
    p = _copy(s.path, tmp_path)
    meta = 3 * MiB                      # qemu: BAT at 2 MiB, metadata at 3 MiB (1 MiB log)
    entry = lambda k: meta + X.METADATA_TABLE_HEADER_SIZE + 32 * k
    expect = None
    if what == "metadata_count":
        _poke(p, meta + 10, struct.pack("<H", 0xFFFF))
        expect = "metadata_entry_count"
    elif what == "item_offset":
        _poke(p, entry(1) + 16, struct.pack("<I", 0xFFFFFFF0))       # virtual disk size item
        expect = "metadata_item_out_of_place"
    elif what == "item_length":
        _poke(p, entry(0) + 20, struct.pack("<I", 0xFFFFFFFF))       # file parameters
        expect = "metadata_item_out_of_place"
    elif what == "virtual_size":
        _poke(p, meta + 65536 + 8, struct.pack("<Q", (1 << 64) - 512))
        expect = "bat_region_too_small"
    elif what == "block_size":
        _poke(p, meta + 65536, struct.pack("<I", 3 * MiB))
        expect = "block_size_invalid"
    elif what == "sector_size":
        _poke(p, meta + 65536 + 32, struct.pack("<I", 1000))
        expect = "logical_sector_size_invalid"
    elif what == "region_count":
        _poke(p, X.REGION_TABLE1_OFFSET + 8, struct.pack("<I", 0xFFFFFFFF), X.REGION_TABLE1_OFFSET,
              X.REGION_TABLE_SIZE)
        expect = "region_table_entry_count"
    elif what == "region_length":
        _poke(p, X.REGION_TABLE1_OFFSET + 16 + 24, struct.pack("<I", 0xFFF00000),
              X.REGION_TABLE1_OFFSET, X.REGION_TABLE_SIZE)
        expect = "region_beyond_eof"
    elif what == "log_flood":
        # log_guid set in both headers, every log sector claims a huge entry
        sector = struct.pack("<4sIIIQII", b"loge", 0, 0xFFFFF000, 0, 1, 0xFFFFFF, 0).ljust(4096, b"\0")
        _poke(p, MiB, sector * 256)
        for off in (X.HEADER1_OFFSET, X.HEADER2_OFFSET):
            _poke(p, off + 48, b"\x11" * 16, off, X.HEADER_SIZE)
        expect = "log_guid_without_entries"
    else:
        p = _copy(fixtures["child"].path, tmp_path)
        shutil.copy(fixtures["base"].path, tmp_path / "base.vhdx")
        with imgscope.open(p) as img:
            loc = img.metadata_items[X.PARENT_LOCATOR_GUID]["file_offset"]
        _poke(p, loc + 18, struct.pack("<H", 0xFFFF))
        expect = "parent_locator_entries_overflow"
    out = check_bounded(p, what, "vhdx")
    assert out.open_error is None, out.open_error
    assert expect in out.codes, (what, out.codes)


def test_random_mutations_raise_only_image_errors(corpus, fixtures, tmp_path):
    bases = [corpus["dyn_1m"].path.read_bytes(), fixtures["dirty_log"].path.read_bytes()]
    areas = [(0, 600), (X.HEADER1_OFFSET, X.HEADER1_OFFSET + 80), (X.HEADER2_OFFSET, X.HEADER2_OFFSET + 80),
             (X.REGION_TABLE1_OFFSET, X.REGION_TABLE1_OFFSET + 80), (MiB, MiB + 8192),
             (2 * MiB, 2 * MiB + 64), (3 * MiB, 3 * MiB + 256), (3 * MiB + 65536, 3 * MiB + 65600)]
    rng = random.Random(13)

    def body():
        bad = []
        for k in range(50):
            b = bytearray(bases[k % 2])
            for _ in range(rng.randrange(1, 6)):
                b[rng.randrange(*rng.choice(areas))] = rng.randrange(256)
            p = tmp_path / f"m{k}.vhdx"
            p.write_bytes(b)
            problem = checks.use_everything(p, "vhdx", 2 << 20)
            if problem:
                bad.append(f"{k}: {problem}")
        return bad
    res = run_isolated(body, timeout=120)
    assert res[0] == "ok", res
    assert not res[1], "\n".join(res[1])
