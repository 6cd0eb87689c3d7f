"""compare and resize held against qemu-img 7.2.

compare: every pair of a corpus made by `qemu-img convert` from one sparse raw
disk (raw, qcow2 in several layouts, vmdk sparse and flat, vdi dynamic and
static, vpc dynamic and fixed, vhdx, qcow v1, a qcow2 overlay) plus copies with
one byte changed (inside data, inside a hole) and with a larger size must give
qemu-img compare's exit code and text, with and without -s.

resize: a copy resized by imgscope and a copy resized by `qemu-img resize`
must both pass `qemu-img check`, show the new size in `qemu-img info`, keep
the old data, read zeros in the new space, and compare identical (also with
-s); refusals leave the file untouched.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import imgscope
from imgscope.conversion.compare import compare_images
from imgscope.conversion.resize import resize_image, parse_new_size
from imgscope.errors import ImageError

import oracle

MiB = 1 << 20
SIZE = 64 * MiB
DATA_AT = ((1 * MiB, 3 * MiB), (40 * MiB, 100_000))   # (offset, length) of random data
BYTE_IN_DATA = 2 * MiB + 777
BYTE_IN_HOLE = 20 * MiB + 1000


def _sparse_raw(path: Path, size: int = SIZE, pokes=()) -> Path:
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in DATA_AT:
            f.seek(off)
            f.write(rng.integers(0, 256, length, dtype=np.uint8).tobytes())
        for off, value in pokes:
            f.seek(off)
            f.write(bytes([value]))
    return path


# (name, qemu-img convert -O format, options); `fmt` names the format for qemu-img
VARIANTS = [
    ("qcow2", "qcow2", []), ("qcow2_4k", "qcow2", ["-o", "cluster_size=4096"]),
    ("qcow2_z", "qcow2", ["-c"]), ("vmdk", "vmdk", []),
    ("vmdk_flat", "vmdk", ["-o", "subformat=monolithicFlat"]), ("vdi", "vdi", []),
    ("vdi_static", "vdi", ["-o", "static=on"]), ("vpc", "vpc", []),
    ("vpc_fixed", "vpc", ["-o", "subformat=fixed"]), ("vhdx", "vhdx", []),
    ("qcow", "qcow", []),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    oracle.require_tools()
    root = tmp_path_factory.mktemp("compare")
    images = {"raw": (_sparse_raw(root / "a.raw"), "raw")}
    for name, fmt, opts in VARIANTS:
        dst = root / f"a_{name}.{fmt}"
        oracle.run(oracle.QEMU_IMG, "convert", "-O", fmt, *opts, images["raw"][0], dst)
        images[name] = (dst, fmt)
    overlay = root / "overlay.qcow2"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", images["qcow2"][0].name,
               "-F", "qcow2", overlay)
    images["overlay"] = (overlay, "qcow2")
    # differing copies: a byte changed inside data / inside a hole, a bigger disk
    images["diff_data"] = (_sparse_raw(root / "d.raw", pokes=[(BYTE_IN_DATA, 0x5A)]), "raw")
    images["diff_hole"] = (_sparse_raw(root / "h.raw", pokes=[(BYTE_IN_HOLE, 0x5A)]), "raw")
    for name in ("diff_data", "diff_hole"):
        for fmt in ("qcow2", "vmdk", "vdi"):
            dst = root / f"{name}.{fmt}"
            oracle.run(oracle.QEMU_IMG, "convert", "-O", fmt, images[name][0], dst)
            images[f"{name}_{fmt}"] = (dst, fmt)
    images["bigger"] = (_sparse_raw(root / "big.raw", SIZE + MiB), "raw")
    images["bigger_tail"] = (_sparse_raw(root / "bigt.raw", SIZE + MiB,
                                         pokes=[(SIZE + 5000, 1)]), "raw")
    dst = root / "bigger_tail.qcow2"
    oracle.run(oracle.QEMU_IMG, "convert", "-O", "qcow2", images["bigger_tail"][0], dst)
    images["bigger_tail_qcow2"] = (dst, "qcow2")
    return images


def qemu_compare(a, fa, b, fb, strict=False):
    proc = oracle.run(oracle.QEMU_IMG, "compare", "-f", fa, "-F", fb,
                      *(["-s"] if strict else []), a, b, check=False)
    return proc.returncode, proc.stdout.strip()


def assert_agrees(corpus, x, y, strict):
    (a, fa), (b, fb) = corpus[x], corpus[y]
    ours = compare_images(a, b, fmt_a=fa, fmt_b=fb, strict=strict)
    code, text = qemu_compare(a, fa, b, fb, strict)
    assert (ours.exit_code, ours.message) == (code, text), (x, y, strict)
    assert ours.identical == (code == 0)
    return ours


SAME = ["raw"] + [v[0] for v in VARIANTS] + ["overlay"]


@pytest.mark.parametrize("strict", [False, True])
def test_identical_pairs_across_formats(corpus, strict):
    """Every format against raw and against every other one: qemu-img's code and text
    (with -s the block-status model: raw holes vs unallocated, per-call spans, EOF)."""
    identical = 0
    pairs = {(x, y) for x in SAME for y in ("raw", "qcow2", "vmdk") if x != y}
    for x, y in sorted(pairs):
        identical += assert_agrees(corpus, x, y, strict).identical
    assert identical > 0


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("changed", ["diff_data", "diff_hole", "diff_data_qcow2",
                                     "diff_hole_qcow2", "diff_data_vmdk", "diff_hole_vdi"])
def test_one_byte_changed(corpus, changed, strict):
    """A byte changed in data or in a spot the other side has unallocated/zero."""
    for other in ("raw", "qcow2", "vmdk", "vdi", "vpc", "vhdx", "qcow"):
        ours = assert_agrees(corpus, changed, other, strict)
        if not strict:
            poke = BYTE_IN_DATA if "data" in changed else BYTE_IN_HOLE
            assert ours.exit_code == 1 and ours.first_difference == poke - poke % 512
        assert_agrees(corpus, other, changed, strict)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("bigger", ["bigger", "bigger_tail", "bigger_tail_qcow2"])
def test_size_mismatch(corpus, bigger, strict):
    """The larger image's tail must read as zeros (no -s); with -s sizes must match."""
    for other in ("raw", "qcow2", "vdi"):
        ours = assert_agrees(corpus, other, bigger, strict)
        assert ours.size_mismatch
        assert_agrees(corpus, bigger, other, strict)


def test_compare_reads_only_data_and_reports_progress(corpus):
    seen = []
    ours = compare_images(corpus["qcow2"][0], corpus["vmdk"][0],
                          progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert ours.identical and seen
    assert seen[-1][1] == seen[-1][2] == SIZE
    assert all(b[1] >= a[1] for a, b in zip(seen, seen[1:]))


def test_compare_unopenable(corpus, tmp_path):
    bad = tmp_path / "garbage.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 200)
    missing = tmp_path / "missing.raw"
    for a, b in ((bad, corpus["raw"][0]), (corpus["raw"][0], missing)):
        ours = compare_images(a, b)
        code, _ = qemu_compare(a, "qcow2" if a == bad else "raw", b,
                               "raw", False)
        assert ours.exit_code == code == 2
        assert not ours.identical


# ---- resize -----------------------------------------------------------------------------
def guest_sha(path, fmt, length=None):
    with imgscope.open(path, fmt) as img:
        size = img.virtual_size if length is None else length
        h = hashlib.sha256()
        with img.open_guest() as g:
            pos = 0
            while pos < size:
                buf = g.read(min(8 * MiB, size - pos))
                h.update(buf)
                pos += len(buf)
        return h.hexdigest(), img


def tail_is_zero(path, fmt, start):
    """The guest from `start` on reads as zeros: its map says zero/unallocated there, and
    whatever data runs it names read as zeros."""
    with imgscope.open(path, fmt) as img:
        ext = img.extents()
        ext = ext[ext.guest_offset + ext.length > start]
        with img.open_guest() as g:
            for row in ext[~ext.kind.isin(["zero", "unallocated"])].itertuples():
                lo = max(start, int(row.guest_offset))
                g.seek(lo)
                buf = g.read(int(row.guest_offset + row.length) - lo)
                if np.frombuffer(buf, np.uint8).any():
                    return False
        return not ext.empty or img.virtual_size <= start


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    oracle.require_tools()
    root = tmp_path_factory.mktemp("resize")
    raw = _sparse_raw(root / "src.raw")
    out = {"raw": (raw, "raw")}
    for name, opts in [("qcow2", []), ("qcow2_512", ["-o", "cluster_size=512"]),
                       ("qcow2_4k", ["-o", "cluster_size=4096"]),
                       ("qcow2_r1", ["-o", "cluster_size=512,refcount_bits=1"]),
                       ("qcow2_r64", ["-o", "cluster_size=1024,refcount_bits=64"]),
                       ("qcow2_v2", ["-o", "compat=0.10"]),
                       ("qcow2_ext", ["-o", "extended_l2=on,cluster_size=16384"]),
                       ("qcow2_z", ["-c"])]:
        dst = root / f"src_{name}.qcow2"
        oracle.run(oracle.QEMU_IMG, "convert", "-O", "qcow2", *opts, raw, dst)
        out[name] = (dst, "qcow2")
    empty = root / "empty.qcow2"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", empty, "0")
    out["qcow2_empty"] = (empty, "qcow2")
    overlay = root / "overlay.qcow2"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", out["qcow2"][0].name,
               "-F", "qcow2", overlay)
    out["qcow2_overlay"] = (overlay, "qcow2")
    return out


RESIZES = [
    ("raw", "+1001", False), ("raw", "+3G", False), ("raw", "-1M", True),
    ("qcow2", "+1G", False), ("qcow2", "3T", False),           # L1 grows inside its cluster
    ("qcow2_4k", "+10G", False), ("qcow2_4k", "+200G", False),   # L1 moves to the end
    ("qcow2_512", "+10G", False),                               # ... and needs new refblocks
    ("qcow2_r1", "+3G", False), ("qcow2_r64", "+8G", False), ("qcow2_v2", "+5T", False),
    ("qcow2_ext", "+20G", False), ("qcow2_z", "+600G", False), ("qcow2_empty", "1T", False),
    ("qcow2_overlay", "+2G", False),
    ("qcow2", "-1M", True), ("qcow2", "48M", True),
    ("qcow2_4k", "-20M", True),                                 # drops whole L2 tables
]


@pytest.mark.parametrize("name,size,shrink", RESIZES)
def test_resize_like_qemu(sources, tmp_path, name, size, shrink):
    src, fmt = sources[name]
    ours, theirs = tmp_path / f"ours_{src.name}", tmp_path / f"qemu_{src.name}"
    for dst in (ours, theirs):
        shutil.copy(src, dst)
    if name == "qcow2_overlay":
        shutil.copy(sources["qcow2"][0], tmp_path / sources["qcow2"][0].name)
    old_size = imgscope.open(src, fmt).virtual_size
    new_size = resize_image(ours, size, fmt=fmt, shrink=shrink)
    oracle.run(oracle.QEMU_IMG, "resize", "-f", fmt, *(["--shrink"] if shrink else []),
               theirs, size)
    assert new_size == parse_new_size(size, old_size)
    shown = oracle.qemu_info(ours, fmt=fmt)["virtual-size"]
    assert shown == oracle.qemu_info(theirs, fmt=fmt)["virtual-size"]
    if fmt == "raw":      # qemu-img info rounds a raw size up to whole sectors
        assert os.path.getsize(ours) == os.path.getsize(theirs) == new_size
        assert shown == -(-new_size // 512) * 512
    else:
        assert shown == new_size
    if fmt == "qcow2":
        code, report = oracle.qemu_check(ours, fmt)
        assert code == 0, report
    kept = min(old_size, new_size)
    assert guest_sha(ours, fmt, kept)[0] == guest_sha(src, fmt, kept)[0]
    assert tail_is_zero(ours, fmt, kept)
    assert qemu_compare(ours, fmt, theirs, fmt, strict=True)[0] == 0
    assert compare_images(ours, theirs, fmt_a=fmt, fmt_b=fmt).identical
    with imgscope.open(ours, fmt) as img:
        report = img.check()
        assert report.exit_code == 0, report.human()
        assert not [f for f in report.findings if f.severity in ("error", "critical")]


def _unchanged(path, action):
    before = oracle.sha256_file(path)
    with pytest.raises(ImageError) as info:
        action()
    assert oracle.sha256_file(path) == before
    return info.value


def test_resize_refusals(sources, tmp_path):
    qcow2 = tmp_path / "q.qcow2"
    shutil.copy(sources["qcow2"][0], qcow2)
    raw = tmp_path / "r.raw"
    shutil.copy(sources["raw"][0], raw)
    # qemu-img refuses the same ones
    for path, fmt, size, shrink in ((qcow2, "qcow2", "-1M", False), (raw, "raw", "-1M", False),
                                    (qcow2, "qcow2", "+1001", False)):
        err = _unchanged(path, lambda: resize_image(path, size, fmt=fmt, shrink=shrink))
        proc = oracle.run(oracle.QEMU_IMG, "resize", "-f", fmt, path, size, check=False)
        assert proc.returncode == 1 and err.message in proc.stderr
    # shrinking over allocated data (qemu-img would drop it): refused
    err = _unchanged(qcow2, lambda: resize_image(qcow2, "-40M", shrink=True))
    assert "allocated" in err.message
    _unchanged(qcow2, lambda: resize_image(qcow2, "-70M", shrink=True))
    _unchanged(qcow2, lambda: resize_image(qcow2, "+", shrink=True))
    # a format without resize support
    vhdx = tmp_path / "v.vhdx"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "vhdx", vhdx, "1M")
    _unchanged(vhdx, lambda: resize_image(vhdx, "+1M"))


def test_resize_refuses_damaged_image(sources, tmp_path):
    """An L1 entry pointing beyond the end of the file is an error finding: no write."""
    bad = tmp_path / "bad.qcow2"
    shutil.copy(sources["qcow2"][0], bad)
    with open(bad, "r+b") as f:
        f.seek(40)
        (l1_offset,) = struct.unpack(">Q", f.read(8))
        f.seek(l1_offset)
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
    err = _unchanged(bad, lambda: resize_image(bad, "+1G"))
    assert "error" in err.message


def test_resize_with_snapshot(sources, tmp_path):
    """Growing keeps the snapshot (its own size and L1); shrinking is refused."""
    ours, theirs = tmp_path / "s.qcow2", tmp_path / "q.qcow2"
    shutil.copy(sources["qcow2"][0], ours)
    oracle.run(oracle.QEMU_IMG, "snapshot", "-c", "one", ours)
    shutil.copy(ours, theirs)
    _unchanged(ours, lambda: resize_image(ours, "-1M", shrink=True))
    resize_image(ours, "+1G")
    oracle.run(oracle.QEMU_IMG, "resize", theirs, "+1G")
    assert oracle.qemu_check(ours, "qcow2")[0] == 0
    assert qemu_compare(ours, "qcow2", theirs, "qcow2", strict=True)[0] == 0
    with imgscope.open(ours) as img:
        assert img.snapshots[0]["disk_size"] == SIZE
        snap = img.snapshot("one")
        with snap.open_guest() as g:
            assert hashlib.sha256(g.read(SIZE)).hexdigest() == guest_sha(sources["qcow2"][0],
                                                                         "qcow2")[0]
