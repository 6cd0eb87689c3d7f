"""VMDK variants qemu-img cannot write, checked against qemu-img *reading* them.

``sample_images/make_vmdk_fixtures.py`` builds them in a tmp folder with imgscope's
own schemas (COWD/vmfsSparse, seSparse, mixed-extent descriptors, a VMware-style
streamOptimized stream, hand-made zeroed grains) next to ``NAME.expected.raw``.
For every fixture:

* ``qemu-img convert -f vmdk -O raw`` (run in the fixture's folder) must give the
  expected bytes: that proves the fixture is a valid VMDK *to QEMU*;
* imgscope must read the same bytes through ``open_guest()``, its ``extents()``
  must cover the disk, ``regions()`` tile every file, ``map_entries`` equal
  ``qemu-img map --output=json``, ``info()`` equal ``qemu-img info --output=json``
  and no error finding be reported.

QEMU refuses some variants (``FIXTURES[name]["qemu"] == "refuses"``) and silently
reads one differently (``"misreads"``); there imgscope is checked against the
expected bytes alone, and the test asserts what qemu-img does instead (see the
``why`` of each entry in ``FIXTURES``).
"""
from __future__ import annotations

import importlib.util
import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest

import imgscope

import checks
import oracle

_BUILDER = Path(__file__).resolve().parents[1] / "sample_images" / "make_vmdk_fixtures.py"
_spec = importlib.util.spec_from_file_location("make_vmdk_fixtures", _BUILDER)
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

NAMES = list(fx.FIXTURES)
READS = [n for n in NAMES if fx.FIXTURES[n]["qemu"] == "reads"]
CHILDREN = ("vmfsSparse", "zero_grain_child")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    oracle.require_tools()
    return fx.build_fixtures(tmp_path_factory.mktemp("vmdk_fixtures"))


def qemu(*args, path: Path, check: bool = True):
    """qemu-img SUBCOMMAND ... -f vmdk NAME, run in the fixture's folder (relative name)."""
    return oracle.run(oracle.QEMU_IMG, *args, "-f", "vmdk", path.name, cwd=path.parent,
                      check=check)


def qemu_convert(path: Path, dest: Path):
    return oracle.run(oracle.QEMU_IMG, "convert", "-U", "-f", "vmdk", "-O", "raw", path.name,
                      str(dest), cwd=path.parent, check=False)


def qemu_map(path: Path) -> list[dict]:
    return json.loads(qemu("map", "--output=json", "-U", path=path).stdout)


def qemu_info(path: Path, chain: bool = False):
    args = ["info", "--output=json", "-U"] + (["--backing-chain"] if chain else [])
    return json.loads(qemu(*args, path=path).stdout)


def open_named(path: Path):
    """Open as the CLI does when given the relative name qemu was given."""
    return checks.open_named(path, given_name=path.name)


def sha(path) -> str:
    return oracle.sha256_file(path)


def expected(built, name) -> Path:
    return fx.expected_path(built[name].parent, name)


# ---------------------------------------------------------------------------- qemu: valid fixtures
@pytest.mark.parametrize("name", NAMES)
def test_qemu_reads_the_expected_bytes(built, name, tmp_path):
    path, spec = built[name], fx.FIXTURES[name]
    out = tmp_path / "qemu.raw"
    proc = qemu_convert(path, out)
    if spec["qemu"] == "refuses":
        # QEMU cannot be the oracle here (spec["why"]); its refusal is pinned so a
        # future QEMU that reads these shows up
        assert proc.returncode != 0 and spec["error"] in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    if spec["qemu"] == "misreads":
        # QEMU drops the ZERO and RDONLY lines (spec["why"]): it reads a shorter disk made
        # of the other extents, which proves those are valid; the full disk is imgscope's
        assert sha(out) == sha(path.parent / f"{name}.qemu.raw")
        assert sha(out) != sha(expected(built, name))
        return
    assert out.stat().st_size == expected(built, name).stat().st_size
    assert sha(out) == sha(expected(built, name))


# ---------------------------------------------------------------------------- imgscope
@pytest.mark.parametrize("name", NAMES)
def test_imgscope_reads_the_expected_bytes(built, name):
    # for "refuses"/"misreads" fixtures this (plus the fixture builder) is the only
    # oracle: qemu-img cannot open them, or reads a different disk
    with imgscope.open(built[name]) as img:
        assert img.virtual_size == expected(built, name).stat().st_size
        assert checks.guest_sha(img) == sha(expected(built, name))


@pytest.mark.parametrize("name", NAMES)
def test_reads_across_grain_and_extent_boundaries(built, name):
    """Unaligned reads straddling grains (512 B COWD grains), GTs and extent ends."""
    raw = np.memmap(expected(built, name), dtype=np.uint8, mode="r")
    rng = random.Random(f"vmdk-fixtures {name}")
    with imgscope.open(built[name]) as img:
        size = img.virtual_size
        g = img.open_guest()
        points = [0, size - 1, size - 4097]
        starts = img.extents().guest_offset.tolist()
        points += [s + d for s in starts for d in (-3, 0, 511)]
        points += [rng.randrange(size) for _ in range(30)]
        for p in points:
            p = max(0, min(p, size - 1))
            n = rng.choice([1, 7, 511, 513, 4097, 65537 + 12, 300_000])
            g.seek(p)
            assert g.read(n) == raw[p:p + n].tobytes(), f"read at {p:#x}+{n}"


@pytest.mark.parametrize("name", NAMES)
def test_extents_cover_the_disk(built, name):
    with imgscope.open(built[name]) as img:
        checks.assert_extents_cover_the_disk(img, name)


@pytest.mark.parametrize("name", NAMES)
def test_regions_tile_every_file(built, name):
    with imgscope.open(built[name]) as img:
        reg = img.regions()
        for src in img.files():
            problems = checks.tiling_problems(checks.file_regions(reg, src), src)
            assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", NAMES)
def test_no_error_findings(built, name):
    with imgscope.open(built[name]) as img:
        img.extents(), img.regions()
        checks.guest_sha(img)
        f = img.findings
        errors = f[f.severity.isin(["error", "critical"])]
        assert errors.empty, errors[["code", "message"]].to_string()


# ---------------------------------------------------------------------------- imgscope vs qemu
@pytest.mark.parametrize("name", [n for n in NAMES if fx.FIXTURES[n]["qemu"] == "reads"
                                  or "oracle_via" in fx.FIXTURES[n]])
def test_map_matches_qemu(built, name):
    # a bare COWD / seSparse extent qemu refuses is mapped by qemu through the
    # descriptor fixture naming the same file: same extents, same host offsets
    via = fx.FIXTURES[name].get("oracle_via", name)
    theirs = qemu_map(built[via])
    with open_named(built[name]) as img:
        mine = checks.map_view(img)
    if mine != theirs:
        first = checks.first_difference(mine, theirs)
        pytest.fail(f"{len(mine)} vs {len(theirs)} entries; first difference at {first}:\n"
                    f"imgscope={mine[first:first + 2]}\nqemu    ={theirs[first:first + 2]}")


@pytest.mark.parametrize("name", READS)
def test_info_matches_qemu(built, name):
    theirs = qemu_info(built[name])
    with open_named(built[name]) as img:
        mine = img.info()
    diff = checks.differences(mine, theirs)
    assert not diff, "\n".join(diff)


@pytest.mark.parametrize("name", CHILDREN)
def test_info_backing_chain_matches_qemu(built, name):
    theirs = qemu_info(built[name], chain=True)
    with open_named(built[name]) as img:
        mine = img.info(backing_chain=True)
    assert len(mine) == len(theirs) == 2
    diff = checks.chain_differences(mine, theirs)
    assert not diff, "\n".join(diff)


def test_misread_variant_info(built):
    """qemu-img opens mixed_zero_rdonly but sees a shorter disk (ZERO/RDONLY dropped)."""
    name = "mixed_zero_rdonly"
    theirs = qemu_info(built[name])
    assert theirs["virtual-size"] == (built[name].parent / f"{name}.qemu.raw").stat().st_size
    with open_named(built[name]) as img:
        mine = img.info()
        assert mine["virtual-size"] == expected(built, name).stat().st_size
        kinds = [e["format"] for e in mine["format-specific"]["data"]["extents"]]
    assert [e["format"] for e in theirs["format-specific"]["data"]["extents"]] \
        == ["FLAT", "SPARSE", "FLAT"]
    assert "ZERO" not in kinds          # the ZERO extent has no file: not listed (as qemu)


# ---------------------------------------------------------------------------- the fixtures themselves
def test_fixtures_are_deterministic_and_small(built, tmp_path):
    again = fx.build_fixtures(tmp_path)
    folder = built[NAMES[0]].parent
    for path in sorted(folder.iterdir()):
        assert sha(path) == sha(tmp_path / path.name), f"{path.name} differs between builds"
    used = sum(p.stat().st_blocks * 512 for p in folder.iterdir())
    assert used < 8 << 20, f"fixtures use {used} bytes on disk"
    assert set(again) == set(NAMES)


def test_pinned_cid_drops_stale_bytes_after_the_nul():
    """qemu rewrites the descriptor in place; a shorter CID leaves old bytes past the NUL."""
    clean = fx.pin_cid(b"CID=12345678\nparentCID=ffffffff\n" + bytes(20), 0xBA5E001)
    stale = fx.pin_cid(b"CID=123456\nparentCID=ffffffff\n\0f\n" + bytes(19), 0xBA5E001)
    assert clean == stale
    assert clean.startswith(b"CID=ba5e001\nparentCID=ffffffff\n\0") and len(clean) == 52


def test_fixture_structures(built):
    """The variants really contain what they claim (read back with plain struct/numpy)."""
    d = built["base"].parent
    delta = (d / "vmfsSparse-delta.vmdk").read_bytes()
    magic, version, flags, sectors, grain, gd_off, n_gd = struct.unpack_from("<4s6I", delta)
    assert (magic, grain, n_gd) == (b"COWD", 1, 3)
    gd = np.frombuffer(delta, "<u4", n_gd, gd_off * 512)
    assert gd[1] == 0 and gd[0] and gd[2]                     # one GT unallocated
    root = (d / "cowd_standalone-root.vmdk").read_bytes()
    assert struct.unpack_from("<4I", root, 8) == (3, 8192, 1, 4)     # ROOT|CHECKCAPABLE
    assert struct.unpack_from("<3I", root, 32) == (8, 16, 63)   # root geometry in the union
    # parentCID of the delta = CID of the base descriptor
    base_cid = fx._read_cid(d / "base.vmdk")
    assert f"parentCID={base_cid:x}\n" in (d / "vmfsSparse.vmdk").read_text()
    # seSparse: a cluster >= 4096 uses both halves of the split encoding
    se = (d / "seSparse-sesparse.vmdk").read_bytes()
    gt_off = struct.unpack_from("<Q", se, 144)[0] * 512
    gt = np.frombuffer(se, "<u8", 4096, gt_off)
    assert int(gt[1]) == 0x3001000000000001 and int(gt[20]) == 0x3000000000000001
    assert {int(x) >> 60 for x in gt} == {0, 1, 2, 3}
    # stream: GD at the end, footer marker / footer / EOS in the last three sectors
    st = (d / "streamOptimized.vmdk").read_bytes()
    assert struct.unpack_from("<I", st, 8)[0] == 0x30001
    assert struct.unpack_from("<Q", st, 0x38)[0] == 0xFFFFFFFFFFFFFFFF
    assert struct.unpack_from("<QII", st, len(st) - 1536) == (1, 0, 3)
    assert st[-1024:-1020] == b"KDMV" and st[-512:] == bytes(512)
    # zeroed grains: GTE == 1 with flag 0x4, version 2
    zg = (d / "zero_grain_child.vmdk").read_bytes()
    assert struct.unpack_from("<II", zg, 4) == (2, 7)
    gd0 = struct.unpack_from("<I", zg, struct.unpack_from("<Q", zg, 0x38)[0] * 512)[0]
    assert (np.frombuffer(zg, "<u4", 512, gd0 * 512) == 1).sum() == 5
