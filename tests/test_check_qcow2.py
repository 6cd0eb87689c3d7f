"""`imgscope check` on qcow2 against `qemu-img check --output=json` (QEMU 7.2).

What is checked:

* every qcow2 image of the oracle corpus (v2/v3, cluster sizes, refcount widths,
  snapshots, compressed zlib/zstd, extended L2, bitmaps, LUKS, external data files,
  backing chains, preallocated metadata, lazy refcounts): no finding at all on the
  clean ones, and the counters (`qemu_dict()`) equal qemu-img's JSON; the CLI's JSON
  is qemu-img's text plus a `findings` key;
* the damaged samples of `sample_images/corrupt/qcow2_cases.py` and more damaged
  copies built here (extended L2 bitmaps, misaligned or missing L2 tables, refcount
  table entries, 1-bit refcount overflow, snapshot entries, compressed data past the
  end, compressed entries with a data file, bitmaps, a dirty image with snapshots):
  exactly their finding codes, and qemu-img's counters, verdict and exit code;
* an L2 table reached by two L1 entries is counted twice, as QEMU counts it;
* many errors: every one is counted, few are listed (capped, with a summary);
* hostile headers (huge refcount table, snapshot count, misaligned tables) end in a
  check error quickly, never in an exception; checking never changes the file.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imgscope
import oracle
from imgscope.analysis.check import check_path

CORRUPT = Path(__file__).resolve().parent.parent / "sample_images" / "corrupt"
if str(CORRUPT) not in sys.path:
    sys.path.insert(0, str(CORRUPT))
import cases as corrupt_cases  # noqa: E402
import qcow2_cases  # noqa: E402
from qcow2_cases import (COPIED, MiB, _be64, _header, _l2_entry_at,  # noqa: E402
                         _snapshot_entry, _u64)

DIRTY_CODES = {"dirty_bit_set", "refcount_too_low", "copied_flag_mismatch"}


# --------------------------------------------------------------------------- helpers


def qemu_json(path: Path, secret: str | None = None) -> tuple[int, str]:
    """qemu-img check --output=json: (exit code, stdout text)."""
    args = [oracle.QEMU_IMG, "check", "--output=json", "-U"]
    if secret:
        args += ["--object", f"secret,id={oracle.SECRET_ID},data={secret}", "--image-opts",
                 oracle.image_opts(path.name, secret)]
    else:
        args += ["-f", "qcow2", path.name]
    proc = subprocess.run(args, cwd=path.parent, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout


def check_named(path: Path):
    """imgscope's report for `path`, named as qemu-img names it (the relative name)."""
    return check_path(path, "qcow2", given_name=path.name)


def cli_json_text(report) -> str:
    """What `imgscope check --output json` prints, without the findings key."""
    out = report.to_json()
    out.pop("findings")
    return json.dumps(out, indent=4)


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def change64(path: Path, offset: int, fn) -> None:
    poke(path, offset, _be64(fn(_u64(path, offset))))


def qemu(*args, cwd: Path) -> None:
    corrupt_cases.run(*args, cwd=cwd)


def create(path: Path, *opts: str, size: str = "4M", writes=()) -> None:
    qemu(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", *(["-o", ",".join(opts)] if opts else []),
         path.name, size, cwd=path.parent)
    for w in writes:
        qemu(oracle.QEMU_IO, "-f", "qcow2", "-c", w, path.name, cwd=path.parent)


def bitmap_table_offset(path: Path) -> int:
    """Offset of the first bitmap's table: header extensions -> bitmaps extension ->
    directory entry 0 (plain struct reads)."""
    with open(path, "rb") as f:
        head = f.read(65536)
    (off,) = struct.unpack_from(">I", head, 100)
    while True:
        etype, elen = struct.unpack_from(">II", head, off)
        if etype == 0x23852875:
            (directory,) = struct.unpack_from(">Q", head, off + 8 + 16)
            return _u64(path, directory)
        if etype == 0:
            raise AssertionError("no bitmaps extension")
        off += 8 + (elen + 7) // 8 * 8


# ------------------------------------------------------------------------ damaged copies built here

WRITES = qcow2_cases.WRITES


def _extended_l2(path):
    """Extended L2: allocated cluster 0 gets a zero bit over an allocated subcluster,
    unallocated cluster 5 gets an allocation bit."""
    create(path, "extended_l2=on", writes=["write -P 1 0 4k", "write -P 2 1M 64k"])
    l2 = _u64(path, _header(path)["l1_offset"]) & qcow2_cases.OFFSET_MASK
    change64(path, l2 + 8, lambda b: b | 1 << 32)
    poke(path, l2 + 16 * 5 + 8, _be64(1))


def _zero_alloc_misaligned(path):
    create(path, writes=WRITES + ["write -z 1M 64k"])
    change64(path, _l2_entry_at(path, MiB), lambda e: e + 512)


def _l2_table_misaligned(path):
    create(path, writes=WRITES)
    change64(path, _header(path)["l1_offset"], lambda e: e + 512)


def _l2_table_beyond_eof(path):
    create(path, writes=WRITES)
    poke(path, _header(path)["l1_offset"], _be64(COPIED | 512 * MiB))


def _l2_shared_by_two_l1_entries(path):
    """A 1 GiB disk: L1 entry 1 points at L1 entry 0's L2 table (read twice by QEMU), in
    which the entry of guest 0 lost its COPIED flag."""
    create(path, size="1G", writes=WRITES)
    l1 = _header(path)["l1_offset"]
    poke(path, l1 + 8, _be64(_u64(path, l1)))
    change64(path, _l2_entry_at(path, 0), lambda e: e & ~COPIED)


def _reftable_reserved(path):
    create(path, writes=WRITES)
    change64(path, _header(path)["reftable_offset"], lambda e: e | 1)


def _refblock_misaligned(path):
    create(path, writes=WRITES)
    change64(path, _header(path)["reftable_offset"], lambda e: e + 512)


def _refcount_bits_1_overflow(path):
    create(path, "refcount_bits=1", writes=WRITES)
    poke(path, _l2_entry_at(path, 2 * MiB), _be64(_u64(path, _l2_entry_at(path, MiB))))


def _snapshot_incomplete(path):
    create(path, writes=["write -P 1 0 64k"])
    qemu(oracle.QEMU_IMG, "snapshot", "-c", "s1", path.name, cwd=path.parent)
    poke(path, _snapshot_entry(path, 0) + 36, struct.pack(">I", 8))


def _compressed_beyond_eof(path):
    create(path, writes=["write -c -P 0x11 0 64k", "write -c -P 0x22 64k 64k"])
    change64(path, _l2_entry_at(path, 0), lambda e: e & ~((1 << 54) - 1) | 64 * MiB)


def _data_file_compressed(path):
    qemu(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", f"data_file={path.stem}.data",
         path.name, "4M", cwd=path.parent)
    qemu(oracle.QEMU_IO, "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -P 2 1M 64k",
         path.name, cwd=path.parent)
    change64(path, _l2_entry_at(path, MiB), lambda e: e & ~COPIED | 1 << 62)


def _bitmaps_autoclear_clear(path):
    create(path, writes=["write -P 1 0 64k"])
    qemu(oracle.QEMU_IMG, "bitmap", "--add", path.name, "b0", cwd=path.parent)
    qemu(oracle.QEMU_IO, "-f", "qcow2", "-c", "write -P 2 1M 64k", path.name, cwd=path.parent)
    change64(path, 88, lambda e: e & ~1)


def _bitmap_table_entry_reserved(path):
    create(path, writes=["write -P 1 0 64k"])
    qemu(oracle.QEMU_IMG, "bitmap", "--add", path.name, "b0", cwd=path.parent)
    qemu(oracle.QEMU_IO, "-f", "qcow2", "-c", "write -P 2 1M 64k", path.name, cwd=path.parent)
    change64(path, bitmap_table_offset(path), lambda e: e | 2)


def _dirty_with_snapshot(path):
    """Lazy refcounts, a snapshot, then writes killed by qemu-io's abort: dirty bit set,
    shared clusters rewritten without refcount updates."""
    create(path, "lazy_refcounts=on", writes=["write -P 1 0 64k"])
    qemu(oracle.QEMU_IMG, "snapshot", "-c", "s1", path.name, cwd=path.parent)
    oracle.qemu_io(path, "write -P 2 0 128k", "abort", fmt="qcow2", check=False, no_core=True)
    assert oracle.incompatible_features(path) & 1


# name -> (builder, exactly the codes imgscope gives, qemu-img check's exit code)
BUILT_HERE = {
    "extended_l2_bitmaps.qcow2": (_extended_l2, {"subcluster_bitmap_invalid"}, 2),
    "zero_alloc_misaligned.qcow2": (_zero_alloc_misaligned,
                                    {"data_cluster_misaligned", "refcount_too_low"}, 2),
    "l2_table_misaligned.qcow2": (_l2_table_misaligned,
                                  {"l2_table_misaligned", "l2_reserved_bits", "cluster_leaked",
                                   "data_cluster_misaligned", "cluster_beyond_eof"}, 2),
    "l2_table_beyond_eof.qcow2": (_l2_table_beyond_eof,
                                  {"l2_table_beyond_eof", "cluster_leaked",
                                   "copied_flag_mismatch"}, 2),
    "l2_shared_by_two_l1_entries.qcow2": (_l2_shared_by_two_l1_entries,
                                          {"refcount_too_low", "copied_flag_mismatch"}, 2),
    "reftable_reserved_bits.qcow2": (_reftable_reserved,
                                     {"reftable_reserved_bits", "cluster_leaked"}, 2),
    "refblock_misaligned.qcow2": (_refblock_misaligned,
                                  {"refblock_invalid", "refcount_block_unreadable"}, 1),
    "refcount_bits_1_overflow.qcow2": (_refcount_bits_1_overflow,
                                       {"refcount_overflow", "cluster_leaked"}, 2),
    "snapshot_incomplete.qcow2": (_snapshot_incomplete, {"snapshot_entry_incomplete"}, 2),
    "compressed_beyond_eof.qcow2": (_compressed_beyond_eof,
                                    {"cluster_beyond_eof", "cluster_leaked"}, 2),
    "data_file_compressed.qcow2": (_data_file_compressed,
                                   {"compressed_with_data_file", "cluster_beyond_eof"}, 2),
    "bitmaps_autoclear_clear.qcow2": (_bitmaps_autoclear_clear,
                                      {"bitmaps_inconsistent", "cluster_leaked"}, 3),
    "bitmap_table_entry_reserved.qcow2": (_bitmap_table_entry_reserved,
                                          {"bitmap_table_reserved_bits"}, 1),
    "dirty_with_snapshot.qcow2": (_dirty_with_snapshot, DIRTY_CODES | {"cluster_leaked"}, 2),
}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict[str, tuple[Path, set, int]]:
    """name -> (path, expected codes, qemu-img check exit code) for every damaged sample."""
    oracle.require_tools()
    d = tmp_path_factory.mktemp("qcow2_check")
    out = {}
    for case in qcow2_cases.CASES:
        path = d / case.name
        case.build(path)
        corrupt_cases.apply(case, path)
        rc = {"clean": 0, "corruptions": 2, "leaks": 3}[case.qemu]
        out[case.name] = (path, set(case.expected), rc)
    for name, (build, codes, rc) in BUILT_HERE.items():
        path = d / name
        build(path)
        out[name] = (path, codes, rc)
    return out


# --------------------------------------------------------------------------- the corpus


def _qcow2_samples(corpus):
    return {n: s for n, s in corpus.items() if s.fmt == "qcow2"}


def test_clean_corpus_has_no_findings_and_qemus_counters(qcow2_corpus):
    problems = []
    for name, sample in sorted(_qcow2_samples(qcow2_corpus).items()):
        report = check_named(sample.path)
        codes = {f.code for f in report.findings}
        expected = DIRTY_CODES if "dirty" in sample.tags else set()
        if codes != expected:
            problems.append(f"{name}: findings {sorted(codes)}, expected {sorted(expected)}")
        rc, text = qemu_json(sample.path, sample.secret)
        theirs = json.loads(text)
        mine = report.qemu_dict()
        if sample.secret:       # qemu-img names the image by its --image-opts string
            theirs.pop("filename"), mine.pop("filename")
        elif cli_json_text(report) != text.rstrip("\n"):
            problems.append(f"{name}: JSON text differs:\n{cli_json_text(report)}\n{text}")
        if mine != theirs or rc != sample.expect_check or report.exit_code != rc:
            problems.append(f"{name}: imgscope {mine} exit {report.exit_code}, "
                            f"qemu-img {theirs} exit {rc}")
    assert not problems, "\n".join(problems)


def test_cli_json_is_qemu_img_plus_findings(qcow2_corpus):
    for name in ("snapshots", "lazy_refcounts_dirty"):
        sample = qcow2_corpus[name]
        proc = subprocess.run([sys.executable, "-m", "imgscope", "check", "--output=json",
                               sample.path.name], cwd=sample.path.parent, capture_output=True,
                              text=True, check=False)
        rc, text = qemu_json(sample.path)
        assert proc.returncode == rc == sample.expect_check
        mine = json.loads(proc.stdout)
        findings = mine.pop("findings")
        assert json.dumps(mine, indent=4) == text.rstrip("\n")
        assert {f["code"] for f in findings} == (DIRTY_CODES if rc else set())


def test_dirty_image_says_refcounts_may_be_stale(qcow2_corpus):
    report = imgscope.open(qcow2_corpus["lazy_refcounts_dirty"].path).check()
    notice = [f for f in report.findings if f.code == "dirty_bit_set"]
    assert len(notice) == 1 and "stale" in notice[0].message and notice[0].severity == "warning"
    # QEMU's own message names every cluster: they are all listed too
    low = [f for f in report.findings if f.code == "refcount_too_low"]
    assert len(low) == report.counts.corruptions // 2


# --------------------------------------------------------------------------- damaged samples


def test_damaged_samples_give_their_codes_and_qemus_counters(damaged):
    problems = []
    for name, (path, codes, rc) in sorted(damaged.items()):
        before = oracle.sha256_file(path)
        report = check_named(path)
        got = {f.code for f in report.findings}
        if got != codes:
            problems.append(f"{name}: codes {sorted(got)}, expected {sorted(codes)}")
        qrc, text = qemu_json(path)
        if qrc != rc or report.exit_code != rc:
            problems.append(f"{name}: exit imgscope {report.exit_code} qemu-img {qrc}, "
                            f"expected {rc}")
        if text.strip():        # qemu-img prints no JSON when it cannot check at all
            theirs, mine = json.loads(text), report.qemu_dict()
            if mine != theirs:
                problems.append(f"{name}: imgscope {mine}\n    qemu-img {theirs}")
        if oracle.sha256_file(path) != before:
            problems.append(f"{name}: the check changed the file")
    assert not problems, "\n".join(problems)


def test_case_counts_are_qemus(damaged):
    """The `qemu_counts` written in qcow2_cases.py are what qemu-img says today."""
    for case in qcow2_cases.CASES:
        path = damaged[case.name][0]
        _, text = qemu_json(path)
        theirs = json.loads(text)
        assert {k: theirs.get(k, 0) for k in case.qemu_counts} == case.qemu_counts, case.name


def test_l2_table_read_twice_is_counted_twice(damaged):
    """Two L1 entries reach one L2 table: QEMU checks it twice (refcounts, allocation
    counters, COPIED flags); imgscope reads it once and weighs it by 2."""
    report = check_named(damaged["l2_shared_by_two_l1_entries.qcow2"][0])
    c = report.counts
    assert c.allocated_clusters == 2 * 4            # 4 data clusters, seen twice
    assert c.corruptions == 1 + 4 + 2               # L2 table, 4 data clusters, COPIED x 2
    copied = [f for f in report.findings if f.code == "copied_flag_mismatch"]
    assert len(copied) == 1                         # listed once, counted per reading


def test_findings_flagged_by_the_driver_are_not_listed_twice(damaged):
    report = check_named(damaged["qcow2_l2_entry_misaligned.qcow2"][0])
    assert [f.code for f in report.findings].count("data_cluster_misaligned") == 1
    assert report.counts.corruptions == 2


def test_corrupt_bit_is_a_notice_only(damaged):
    report = check_named(damaged["qcow2_corrupt_bit.qcow2"][0])
    assert report.exit_code == 0 and [f.severity for f in report.findings] == ["warning"]


def test_snapshot_table_ending_the_file(tmp_path):
    """Snapshots taken last: the table ends the file right after the last name (QEMU
    does not pad the last entry); every snapshot is still counted."""
    path = tmp_path / "snapshots_last.qcow2"
    create(path, writes=["write -P 1 0 128k"])
    for name in ("s1", "s2"):
        qemu(oracle.QEMU_IMG, "snapshot", "-c", name, path.name, cwd=tmp_path)
    assert (_snapshot_entry(path, 1) + 40 + 24 + 1 + 2) == path.stat().st_size
    rc, text = qemu_json(path)
    report = check_named(path)
    assert report.qemu_dict() == json.loads(text) and report.exit_code == rc == 0
    assert report.counts.leaks == 0


# ---------------------------------------------------------------------- many errors, hostile input


def test_many_errors_are_all_counted_few_listed(tmp_path):
    """Refcount block zeroed under 200 data clusters: 400+ corruptions, capped listing."""
    path = tmp_path / "zeroed_refblock.qcow2"
    create(path, size="32M", writes=["write -P 7 0 13M"])
    block = _u64(path, _header(path)["reftable_offset"])
    poke(path, block, bytes(65536))
    rc, text = qemu_json(path)
    theirs = json.loads(text)
    report = check_named(path)
    assert report.qemu_dict() == theirs and report.exit_code == rc == 2
    low = [f for f in report.findings if f.code == "refcount_too_low"]
    assert theirs["corruptions"] > 400 and len(low) <= 21
    assert "more" in low[-1].message


@pytest.mark.parametrize("field, offset, value", [
    ("refcount_table_clusters", 56, struct.pack(">I", 0xFFFFFF)),
    ("nb_snapshots", 60, struct.pack(">I", 0xFFFFFFFF)),
    ("snapshots_offset", 64, _be64(0x10200)),
    ("l1 entry -> far away", None, _be64(COPIED | (1 << 55))),
])
def test_hostile_header_values_end_in_a_finding_quickly(tmp_path, field, offset, value):
    path = tmp_path / "hostile.qcow2"
    create(path, writes=WRITES)
    poke(path, _header(path)["l1_offset"] if offset is None else offset, value)
    before = oracle.sha256_file(path)
    t0 = time.monotonic()
    report = check_path(path, "qcow2")
    assert time.monotonic() - t0 < 60   # a hang guard, not a benchmark
    rc, _ = qemu_json(path)
    assert report.findings and report.exit_code == rc, (field, report.qemu_dict(), rc)
    assert oracle.sha256_file(path) == before


def test_progress_is_reported(qcow2_corpus):
    stages = []
    imgscope.open(qcow2_corpus["snapshots"].path).check(
        progress=lambda stage, done, total: stages.append(stage))
    assert "L2 tables" in stages and "refcounts" in stages
