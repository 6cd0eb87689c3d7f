"""The check rules of every format but qcow2, held against `qemu-img check` 7.2.

* Clean images qemu-img makes (every VMDK subformat it writes, VDI static and
  dynamic, VHD fixed/dynamic with and without force_size, VHDX fixed/dynamic with
  several block sizes, qcow with a backing file and compressed clusters), the
  VMDK and VHDX fixture builders and the cow fixtures give no finding, and where
  qemu-img checks the format the same `qemu_dict()` as `qemu-img check
  --output=json` (elsewhere qemu-img exits 63).
* Damaged copies give qemu-img's counts: VDI block maps, VHDX BATs (past the
  end, overflowing, over the log or a region), VMDK grains past the end of an
  extent file (the sector qemu-img names is the one imgscope names).
* The corrupted samples of sample_images/corrupt/other_cases.py give exactly
  their codes and qemu-img's verdict (exit 1 = "incomplete").
* Counters of the formats qemu-img cannot check follow qemu-img map; hostile
  sizes stay bounded.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

import imgscope
from imgscope.analysis.check import check_path

import oracle

KiB, MiB, GiB = oracle.KiB, oracle.MiB, oracle.GiB
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
sys.path.insert(0, str(SAMPLES))
sys.path.insert(0, str(SAMPLES / "corrupt"))
import make_cow_fixtures  # noqa: E402
import make_vhdx_fixtures  # noqa: E402
import make_vmdk_fixtures  # noqa: E402
import other_cases  # noqa: E402
from cases import apply  # noqa: E402

#: qemu-img check's exit code -> CheckReport.verdict (63: the format cannot be checked)
VERDICT = {0: "clean", 1: "incomplete", 2: "corruptions", 3: "leaks"}
QEMU_CHECKS = ("vmdk", "vdi", "vhdx")


def qemu_check(path: Path, fmt: str):
    """(exit code, JSON or None, stderr) of qemu-img check, run in the image's folder."""
    p = subprocess.run([oracle.QEMU_IMG, "check", "--output=json", "-f", fmt, path.name],
                       cwd=path.parent, capture_output=True, text=True)
    text = p.stdout.strip()
    return p.returncode, (json.loads(text) if text.startswith("{") else None), p.stderr


def ours(path: Path, fmt: str):
    """imgscope's report, named as qemu-img names the file (run in its folder)."""
    return check_path(path, fmt, given_name=path.name)


def codes(report) -> set:
    return {f.code for f in report.findings}


def assert_as_qemu(path: Path, fmt: str, report=None):
    """imgscope's verdict is qemu-img's; where qemu-img prints JSON, so is the dict."""
    report = report or ours(path, fmt)
    rc, theirs, err = qemu_check(path, fmt)
    assert rc in VERDICT, (rc, err)
    assert report.verdict == VERDICT[rc], (path.name, report.verdict, rc, err, report.human())
    assert report.exit_code == rc
    if theirs is not None:
        assert report.qemu_dict() == theirs, (report.qemu_dict(), theirs)
    return report, err


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def copy(src: Path, dest_dir: Path, name: str) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / name
    shutil.copy(src, out)
    return out


# --------------------------------------------------------------------------- clean images
WRITES = ["write -P 0x11 0 100k", "write -P 0x22 2M 64k", "write -z 3M 64k",
          "write -P 0x33 6140k 4k"]


def _make(d: Path, fmt: str, name: str, opts=(), writes=WRITES, size="6M", backing=None):
    args = ["create", "-q", "-f", fmt]
    if backing:
        args += ["-b", backing, "-F", fmt]
    args += [*(["-o", ",".join(opts)] if opts else []), name]
    oracle.run(oracle.QEMU_IMG, *args, *([] if backing else [size]), cwd=d)
    if writes:
        oracle.qemu_io(d / name, *writes, fmt=fmt, cwd=d)
    return d / name


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    oracle.require_tools()
    d = tmp_path_factory.mktemp("clean")
    out = {}
    for sub in ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        out[f"vmdk_{sub}"] = (_make(d, "vmdk", f"{sub}.vmdk", [f"subformat={sub}"]), "vmdk")
    out["vmdk_zeroed_grain"] = (_make(d, "vmdk", "zg.vmdk", ["zeroed_grain=on"]), "vmdk")
    out["vmdk_child"] = (_make(d, "vmdk", "child.vmdk", writes=["write -P 0x44 64k 4k"],
                               backing="monolithicSparse.vmdk"), "vmdk")
    raw = d / "source.raw"
    oracle.run(oracle.QEMU_IMG, "convert", "-f", "vmdk", "-O", "raw", "monolithicSparse.vmdk",
               raw.name, cwd=d)
    oracle.run(oracle.QEMU_IMG, "convert", "-f", "raw", "-O", "vmdk", "-o",
               "subformat=streamOptimized", raw.name, "stream.vmdk", cwd=d)
    out["vmdk_streamOptimized"] = (d / "stream.vmdk", "vmdk")
    out["vdi_dynamic"] = (_make(d, "vdi", "dynamic.vdi"), "vdi")
    out["vdi_static"] = (_make(d, "vdi", "static.vdi", ["static=on"]), "vdi")
    for sub in ("dynamic", "fixed"):
        for force in ("off", "on"):
            out[f"vpc_{sub}_force_{force}"] = (_make(d, "vpc", f"{sub}_{force}.vhd",
                                                     [f"subformat={sub}", f"force_size={force}"]),
                                               "vpc")
    for sub, bs in (("dynamic", "1M"), ("dynamic", "8M"), ("dynamic", "32M"), ("fixed", "1M"),
                    ("fixed", "8M")):
        out[f"vhdx_{sub}_{bs}"] = (_make(d, "vhdx", f"{sub}_{bs}.vhdx",
                                         [f"subformat={sub}", f"block_size={bs}"]), "vhdx")
    out["vhdx_fixed_no_zero_state"] = (_make(d, "vhdx", "fixed_nz.vhdx",
                                             ["subformat=fixed", "block_size=1M",
                                              "block_state_zero=off"]), "vhdx")
    out["qcow"] = (_make(d, "qcow", "base.qcow"), "qcow")
    out["qcow_backing"] = (_make(d, "qcow", "top.qcow", writes=["write -P 0x55 1M 8k",
                                                                  "write -P 0x56 5M 700"],
                                 backing="base.qcow"), "qcow")
    out["qcow_compressed"] = (_make(d, "qcow", "comp.qcow", writes=[
        "write -c -P 0x41 0 4k", "write -c -P 0x42 4k 4k", "write -P 0x43 64k 4k"]), "qcow")
    out["raw"] = (_make(d, "raw", "disk.raw", writes=["write -P 0x12 1M 4k"]), "raw")
    return out


CLEAN = ["vmdk_monolithicSparse", "vmdk_monolithicFlat", "vmdk_twoGbMaxExtentSparse",
         "vmdk_twoGbMaxExtentFlat", "vmdk_zeroed_grain", "vmdk_child", "vmdk_streamOptimized",
         "vdi_dynamic", "vdi_static", "vpc_dynamic_force_off", "vpc_dynamic_force_on",
         "vpc_fixed_force_off", "vpc_fixed_force_on", "vhdx_dynamic_1M", "vhdx_dynamic_8M",
         "vhdx_dynamic_32M", "vhdx_fixed_1M", "vhdx_fixed_8M", "vhdx_fixed_no_zero_state", "qcow",
         "qcow_backing", "qcow_compressed", "raw"]


@pytest.mark.parametrize("name", CLEAN)
def test_clean_qemu_images_give_no_finding(clean, name):
    """No finding, verdict clean; qemu-img check prints the same JSON (or cannot check)."""
    path, fmt = clean[name]
    report = ours(path, fmt)
    assert not report.findings, report.human()
    assert report.verdict == "clean" and report.exit_code == 0
    rc, theirs, err = qemu_check(path, fmt)
    if fmt in QEMU_CHECKS:
        assert rc == 0, err
        assert report.qemu_dict() == theirs
    else:
        assert rc == 63, (rc, err)


def test_clean_check_through_the_cli_prints_qemus_json(clean):
    path, fmt = clean["vdi_dynamic"]
    rc, out, err = _cli(path, fmt)
    assert rc == 0, err
    mine = json.loads(out)
    assert mine.pop("findings") == []
    assert mine == qemu_check(path, fmt)[1]


def _cli(path: Path, fmt: str):
    p = subprocess.run([sys.executable, "-m", "imgscope", "check", "--output=json", "-f", fmt,
                        path.name], cwd=path.parent, capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


# --------------------------------------------------------------------------- fixture builders
@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    oracle.require_tools()
    d = tmp_path_factory.mktemp("fixtures")
    vmdk = make_vmdk_fixtures.build_fixtures(d / "vmdk")
    vhdx = {name: getattr(f, "path", f) for name, f in
            make_vhdx_fixtures.build_fixtures(d / "vhdx").items()}
    cow = make_cow_fixtures.build_fixtures(d / "cow")
    return {"vmdk": vmdk, "vhdx": vhdx, "cow": cow}


@pytest.mark.parametrize("name", sorted(make_vmdk_fixtures.FIXTURES))
def test_vmdk_fixtures_give_no_finding(fixtures, name):
    """Every fixture is valid VMDK: no finding; where qemu-img opens it, its JSON."""
    path = fixtures["vmdk"][name]
    report = ours(path, "vmdk")
    assert not report.findings, report.human()
    rc, theirs, err = qemu_check(path, "vmdk")
    if make_vmdk_fixtures.FIXTURES[name]["qemu"] == "refuses":
        assert rc == 1, (rc, err)           # not supported by QEMU, not damaged
    else:
        assert rc == 0 and report.qemu_dict() == theirs, (rc, err)


#: what the VHDX fixtures give: the valid ones nothing but the driver's own remarks on
#: what QEMU 7.2 lacks; a pending log is what `qemu-img check` fails on (exit 1)
VHDX_FIXTURE_CODES = {
    "base": set(),
    "child": set(),
    "child_stale": {"parent_linkage_mismatch"},      # its parent_linkage is stale on purpose
    "sector4k": {"qemu_4k_sectors"},
    "dirty_log": {"log_replay_needed", "qemu_check_fails"},
    "dirty_log_wrap": {"log_replay_needed", "log_sequence_qemu_differs", "qemu_check_fails"},
}


@pytest.mark.parametrize("name", sorted(make_vhdx_fixtures.FIXTURES))
def test_vhdx_fixtures(fixtures, name):
    path = fixtures["vhdx"][name]
    report = ours(path, "vhdx")
    assert codes(report) == VHDX_FIXTURE_CODES[name], report.human()
    rc, theirs, err = qemu_check(path, "vhdx")
    if make_vhdx_fixtures.FIXTURES[name]["qemu"] == "reads":
        assert rc == 0 and report.qemu_dict() == theirs
    else:
        assert rc == 1, (rc, err)
        want = "incomplete" if "qemu_check_fails" in VHDX_FIXTURE_CODES[name] else "clean"
        assert report.verdict == want


@pytest.mark.parametrize("name", sorted(make_cow_fixtures.FIXTURES))
def test_cow_fixtures_give_no_finding(fixtures, name):
    report = ours(fixtures["cow"][name], "cow")
    assert not report.findings and report.exit_code == 0, report.human()


# --------------------------------------------------------------------------- the corrupted samples
@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    oracle.require_tools()
    d = tmp_path_factory.mktemp("damaged")
    for case in other_cases.CASES:
        case.build(d / case.name)
        apply(case, d / case.name)
    return d


@pytest.mark.parametrize("case", other_cases.CASES, ids=[c.name for c in other_cases.CASES])
def test_damaged_samples_give_their_codes_and_qemus_verdict(damaged, case):
    path = damaged / case.name
    before = oracle.sha256_file(path)
    report = ours(path, case.format)
    assert codes(report) == set(case.expected), report.human()
    assert oracle.sha256_file(path) == before
    if case.qemu is None:
        assert case.format not in QEMU_CHECKS
        assert report.verdict in ("corruptions", "clean", "leaks")
    else:
        assert case.qemu == assert_as_qemu(path, case.format, report)[0].verdict
    for f in report.findings:              # where, and how bad
        assert f.message and f.severity in ("info", "warning", "error", "critical")


def test_damaged_samples_are_small(damaged):
    for case in other_cases.CASES:
        st = (damaged / case.name).stat()
        assert st.st_blocks * 512 <= 1536 * KiB, (case.name, st.st_blocks * 512)


# --------------------------------------------------------------------------- VDI block maps
@pytest.fixture(scope="module")
def vdi_base(tmp_path_factory) -> Path:
    oracle.require_tools()
    d = tmp_path_factory.mktemp("vdi")
    # blocks 0, 1, 3 of 5 allocated in that order
    return _make(d, "vdi", "base.vdi", writes=["write -P 1 0 4k", "write -P 2 1M 4k",
                                                "write -P 3 3M 4k"], size="5M")


def _vdi_pokes(path: Path) -> dict:
    m = struct.unpack_from("<I", path.read_bytes(), 0x154)[0]
    e = lambda k, v: (m + 4 * k, struct.pack("<I", v))
    return {
        "duplicate": [e(1, 0)],
        "three_users": [e(1, 0), e(3, 0)],
        "too_large": [e(3, 99)],
        "too_large_and_duplicate": [e(3, 99), e(4, 1)],
        "counter_high": [(0x184, struct.pack("<I", 4))],
        "counter_low": [(0x184, struct.pack("<I", 1))],
        "free_zeroed": [e(1, 0xFFFFFFFE)],
    }


@pytest.mark.parametrize("damage", ["duplicate", "three_users", "too_large",
                                    "too_large_and_duplicate", "counter_high", "counter_low",
                                    "free_zeroed"])
def test_vdi_block_map_counts_as_qemu(vdi_base, tmp_path, damage):
    path = copy(vdi_base, tmp_path, "d.vdi")
    for off, data in _vdi_pokes(path)[damage]:
        poke(path, off, data)
    report, err = assert_as_qemu(path, "vdi")
    n_dups = len(re.findall("also used by", err))
    mine = [f for f in report.findings if f.code == "block_duplicate"]
    assert len(mine) == n_dups
    assert ("block_index_too_large" in codes(report)) == ("too large" in err)
    # (the driver also counts entries past blocks_in_image as allocated, so it may list a
    # mismatch QEMU does not see; the count above is QEMU's)
    assert "allocated_count_mismatch" in codes(report) or "mismatch" not in err


def test_vdi_duplicate_names_the_entry(vdi_base, tmp_path):
    path = copy(vdi_base, tmp_path, "d.vdi")
    m = struct.unpack_from("<I", path.read_bytes(), 0x154)[0]
    poke(path, m + 4 * 3, struct.pack("<I", 1))          # entry 3 takes entry 1's block
    dup = [f for f in ours(path, "vdi").findings if f.code == "block_duplicate"]
    assert [(f.index, f.host_offset) for f in dup] == [(3, m + 12)]
    assert "data block 1" in dup[0].message


def test_vdi_map_cut_by_the_end_of_the_file_counts_as_qemu(tmp_path):
    """A 2000-block map cut in half by the end of the file: QEMU reads zeros (index 0)
    for the rest, 1000 duplicates and a wrong count; imgscope counts them alike without
    building them."""
    path = _make(tmp_path, "vdi", "cut.vdi", writes=["write -P 1 0 4k"], size="2000M")
    m = struct.unpack_from("<I", path.read_bytes(), 0x154)[0]
    with open(path, "r+b") as f:
        f.truncate(m + 4000)
    report, err = assert_as_qemu(path, "vdi")
    assert report.counts.corruptions == err.count("ERROR") == 1001


def test_vdi_huge_map_is_bounded(vdi_base, tmp_path):
    """blocks_in_image of 3 * 2^28: a 3 GiB map running far past the end of the file; the
    check stays bounded in time and memory and says what it could not count."""
    path = copy(vdi_base, tmp_path, "d.vdi")
    poke(path, 0x180, struct.pack("<I", 0x30000000))
    poke(path, 0x158, struct.pack("<I", 0xF0000000))              # offset_data after the map
    tracemalloc.start()
    t0 = time.perf_counter()
    report = ours(path, "vdi")
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # a hang guard (about 0.1 s normally), not a benchmark; the memory bound is the point
    assert seconds < 60 and peak < 256 * MiB, (seconds, peak)
    assert report.verdict in ("corruptions", "incomplete") and report.findings


# --------------------------------------------------------------------------- VHDX BATs
@pytest.fixture(scope="module")
def vhdx_base(tmp_path_factory) -> Path:
    oracle.require_tools()
    d = tmp_path_factory.mktemp("vhdx")
    # 1 MiB blocks: blocks 0-2 at 8, 9 and 10 MiB, the file ends at 11 MiB
    return _make(d, "vhdx", "base.vhdx", ["block_size=1M"], writes=["write -P 1 0 3M"],
                 size="8M")


BAT = 2 * MiB
E = lambda k, mib, state=6: (BAT + 8 * k, struct.pack("<Q", (mib << 20) | state))
VHDX_DAMAGE = {
    "past_eof": [E(0, 11)],
    "two_past_eof": [E(0, 11), E(1, 12)],
    "overflow": [(BAT, struct.pack("<Q", 0xFFFFFFFFFFF00006))],
    "over_log": [E(0, 1)],
    "over_metadata": [E(0, 3)],
    "over_header_section": [E(0, 0)],        # QEMU does not register the header section
    "duplicate": [E(1, 8)],                  # QEMU does not compare entries
    "state_invalid": [E(0, 8, 4)],
    "partial_without_parent": [E(0, 8, 7)],
    "header1_checksum": [(64 * KiB + 1000, b"\x01")],
    "region_table2_checksum": [(256 * KiB + 1000, b"\x01")],
    "region_table1_checksum": [(192 * KiB + 1000, b"\x01")],
}


@pytest.mark.parametrize("damage", sorted(VHDX_DAMAGE))
def test_vhdx_counts_as_qemu(vhdx_base, tmp_path, damage):
    path = copy(vhdx_base, tmp_path, "d.vhdx")
    for off, data in VHDX_DAMAGE[damage]:
        poke(path, off, data)
    report, err = assert_as_qemu(path, "vhdx")
    assert report.findings, "damage without a finding"
    if report.counts.corruptions:
        counted = [f for f in report.findings if f.code.startswith("bat_entry")]
        assert counted and all(f.structure == "bat" and f.host_offset >= BAT for f in counted)


# --------------------------------------------------------------------------- VMDK grains past EOF
@pytest.fixture(scope="module")
def vmdk_split(tmp_path_factory) -> Path:
    """twoGbMaxExtentSparse of 2 GiB + 4 MiB: the second extent holds the grain at 2 GiB."""
    oracle.require_tools()
    d = tmp_path_factory.mktemp("vmdk_split")
    return _make(d, "vmdk", "split.vmdk", ["subformat=twoGbMaxExtentSparse"],
                 writes=["write -P 1 0 64k", f"write -P 2 {2 * GiB + 128 * KiB} 64k"],
                 size=str(2 * GiB + 4 * MiB))


def _gt_entry(path: Path, gt_index: int) -> int:
    """Byte offset of entry `gt_index` of the first primary grain table of a KDMV file."""
    gd = struct.unpack_from("<Q", path.read_bytes(), 0x38)[0] * 512
    return struct.unpack_from("<I", path.read_bytes(), gd)[0] * 512 + 4 * gt_index


@pytest.mark.parametrize("extent,entry", [("split-s001.vmdk", 1), ("split-s002.vmdk", 2)])
def test_vmdk_grain_past_eof_names_qemus_sector(vmdk_split, tmp_path, extent, entry):
    """qemu-img check stops at the first grain past the end of its extent file and names
    its sector; imgscope's check fails the same way and names the same sector."""
    d = tmp_path / "w"
    d.mkdir()
    for f in vmdk_split.parent.glob("split*.vmdk"):
        shutil.copy(f, d / f.name)
    ext = d / extent
    poke(ext, _gt_entry(ext, entry), struct.pack("<I", 1 << 20))
    report, err = assert_as_qemu(d / "split.vmdk", "vmdk")
    sector = int(re.search(r"for sector (\d+) points after EOF", err).group(1))
    stop = [f for f in report.findings if f.code == "qemu_check_fails"]
    assert len(stop) == 1 and f"sector {sector} " in stop[0].message
    assert stop[0].file == str(ext)
    assert report.counts.corruptions == 1


def test_vmdk_empty_flat_extent_fails_as_qemu(clean, tmp_path):
    src, _ = clean["vmdk_monolithicFlat"]
    path = copy(src, tmp_path, src.name)
    flat = copy(src.parent / "monolithicFlat-flat.vmdk", tmp_path, "monolithicFlat-flat.vmdk")
    flat.write_bytes(b"")
    report, err = assert_as_qemu(path, "vmdk")
    assert {"flat_extent_short", "qemu_check_fails"} <= codes(report)
    assert "for sector 0 points after EOF" in err


def test_vmdk_redundant_tables_compared_with_progress(clean, tmp_path):
    """A redundant grain table entry changed: named with its guest offset, reported while
    the tables are compared with progress; qemu-img (primary copy only) sees nothing."""
    src, _ = clean["vmdk_monolithicSparse"]
    path = copy(src, tmp_path, "r.vmdk")
    data = path.read_bytes()
    rgd = struct.unpack_from("<Q", data, 0x30)[0] * 512
    rgt = struct.unpack_from("<I", data, rgd)[0] * 512
    old = struct.unpack_from("<I", data, rgt + 4 * 32)[0]        # guest 2 MiB
    assert old > 1
    poke(path, rgt + 4 * 32, struct.pack("<I", old + 128))
    stages = []
    with imgscope.open(path, "vmdk") as img:
        img.given_name = path.name
        report = img.check(progress=lambda stage, done, total: stages.append(stage))
    found = [f for f in report.findings if f.code == "redundant_grain_table_mismatch"]
    assert len(found) == 1 and found[0].guest_offset == 2 * MiB
    assert "redundant grain tables" in stages
    assert_as_qemu(path, "vmdk", report)


def test_vmdk_cid_chain_reported_for_every_layer(clean, tmp_path):
    """A grandchild over a child whose parent changed: the broken link one layer down is
    reported on the top image, naming the layer (qemu-img check does not look)."""
    d = tmp_path / "chain"
    d.mkdir()
    base = _make(d, "vmdk", "base.vmdk", writes=["write -P 1 0 64k"], size="4M")
    _make(d, "vmdk", "mid.vmdk", writes=["write -P 2 64k 64k"], backing="base.vmdk")
    top = _make(d, "vmdk", "top.vmdk", writes=["write -P 3 128k 64k"], backing="mid.vmdk")
    oracle.qemu_io(base, "write -P 4 1M 64k", fmt="vmdk", cwd=d)       # new CID in base
    report, _ = assert_as_qemu(top, "vmdk")
    cid = [f for f in report.findings if f.code == "cid_mismatch"]
    assert [Path(f.file).name for f in cid] == ["mid.vmdk"]


# --------------------------------------------------------------------------- counters
def _qemu_map(path: Path, fmt: str) -> list[dict]:
    return oracle.qemu_map(path, fmt)


def test_vpc_counters_follow_qemu_map(clean):
    path, fmt = clean["vpc_dynamic_force_off"]
    report = ours(path, fmt)
    with imgscope.open(path, fmt) as img:
        bs = img.block_size
    blocks = {b for e in _qemu_map(path, fmt) if e["data"]
              for b in range(e["start"] // bs, (e["start"] + e["length"] - 1) // bs + 1)}
    assert report.counts.allocated_clusters == len(blocks)
    assert report.counts.total_clusters == -(-report_size(path, fmt) // bs)


def report_size(path: Path, fmt: str) -> int:
    return oracle.qemu_info(path, fmt=fmt)["virtual-size"]


def test_qcow_counters_follow_qemu_map(clean):
    path, fmt = clean["qcow_compressed"]
    report = ours(path, fmt)
    cs = 4096
    entries = [e for e in _qemu_map(path, fmt) if e["data"]]
    allocated = sum(e["length"] // cs for e in entries)
    compressed = sum(e["length"] // cs for e in entries if "offset" not in e)
    c = report.counts
    assert (c.allocated_clusters, c.compressed_clusters) == (allocated, compressed) == (3, 2)
    assert c.total_clusters == report_size(path, fmt) // cs
    assert "allocated" in report.human()


def test_qcow_rewritten_compressed_cluster_is_unreferenced_not_counted(clean, tmp_path):
    """Rewriting a compressed cluster leaves its old bytes behind (qcow v1 has no
    refcounts): an info finding, the verdict stays clean."""
    src, fmt = clean["qcow_compressed"]
    path = copy(src, tmp_path, "rw.qcow")
    oracle.qemu_io(path, "write -P 0x99 0 512", fmt=fmt, cwd=tmp_path)
    report = ours(path, fmt)
    assert codes(report) == {"unreferenced_space"} and report.verdict == "clean"
    assert [f.severity for f in report.findings] == ["info"]


def test_vhdx_states_invalid_for_the_disk_type(clean, tmp_path):
    """A fixed disk's block left NOT_PRESENT, a sector bitmap present in a disk without
    parent: warnings, not counted (qemu-img check does not look at states)."""
    src, _ = clean["vhdx_fixed_1M"]
    fixed = copy(src, tmp_path, "fixed.vhdx")
    poke(fixed, BAT, struct.pack("<Q", 0))
    report, _ = assert_as_qemu(fixed, "vhdx")
    assert codes(report) == {"fixed_block_not_allocated"}
    assert [(f.index, f.host_offset) for f in report.findings] == [(0, BAT)]
    big = _make(tmp_path, "vhdx", "big.vhdx", ["block_size=1M"], writes=["write -P 1 0 64k"],
                size="5G")
    chunk = 2 ** 23 * 512 // MiB                     # payload blocks per sector bitmap block
    poke(big, BAT + 8 * chunk, struct.pack("<Q", (8 << 20) | 6))    # its bitmap slot
    report, _ = assert_as_qemu(big, "vhdx")
    assert "sector_bitmap_without_parent" in codes(report)
