"""Forensic soundness of the VMDK driver on damaged and hostile input.

Every image starts as a real qemu-img/qemu-io VMDK (the oracle corpus, or one built
here), then loses files, gets hostile names in its descriptor, is poked or truncated
byte by byte, or is replaced by a descriptor of absurd size:

* a descriptor naming a missing extent file: the image opens, ``extent_missing`` is a
  finding, and every part of the model either works or raises an ImageError;
* extent names and ``parentFileNameHint`` leaving the image's folder (``../``, absolute):
  UnsafePath unless ``allow_paths`` admits the folder;
* grain-table / grain-directory entries past EOF: findings, never silent zeros;
* truncated KDMV and stream files cut inside every structure;
* random mutations (hypothesis) of the first 64 KiB (header, descriptor, GD/GT) of a
  small monolithicSparse and a small streamOptimized file;
* 10^6 extent lines, huge ``capacity`` values: bounded memory and time.

Hostile inputs run in a forked child (address-space cap, time limit) with the helpers
of tests/test_qcow2_damaged.py.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import struct
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import imgscope
from imgscope.errors import ImageError, UnsafePath

import oracle
from test_qcow2_damaged import (TIME_LIMIT, Outcome, _Alarm, _no_problems, _open_err, alarm,
                                assert_fuzz_passes, check_bounded, examine, isolated_value,
                                make_folders, mutate, mutations, poke, read_after_damage)

KiB, MiB, GiB = oracle.KiB, oracle.MiB, oracle.GiB
GRAIN = oracle.GRAIN


# --------------------------------------------------------------------------- byte surgery (independent of imgscope)


kdmv_tables = oracle.vmdk_grain_tables


def grain_entries(path) -> list[tuple[int, int]]:
    """(file offset of the GT entry, grain sector) of every allocated primary GT entry."""
    t = kdmv_tables(path)
    return [(s * 512 + 4 * i, v) for s, ents in t["gts"].items() for i, v in enumerate(ents) if v > 1]


def rewrite_descriptor(path, edit) -> str:
    """Replace the text of a separate descriptor file by ``edit(text)``."""
    text = Path(path).read_bytes().split(b"\0", 1)[0].decode()
    new = edit(text)
    Path(path).write_text(new)
    return new


def copy_files(sample, dest: Path, skip=()) -> Path:
    """Copy a sample's files (not its parents) to ``dest``; return the new image path."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in [sample.path, *sample.extra_files]:
        if f.name not in skip:
            shutil.copy(f, dest / f.name)
    return dest / sample.path.name


@pytest.fixture(scope="module", autouse=True)
def _warm(vmdk_corpus):
    """Import and exercise everything once so children fork with warm modules."""
    for name in ("sparse", "stream", "split_flat", "chain_grandchild"):
        out = examine(vmdk_corpus[name].path, "vmdk", read_limit=MiB)
        assert not out.problems and out.open_error is None, (name, out)
    with contextlib.redirect_stdout(io.StringIO()):
        from imgscope import cli  # noqa: F401


# =========================================================================== missing files


@pytest.mark.parametrize("name,missing", [
    ("split_sparse", "split_sparse-s002.vmdk"),
    ("split_sparse", "split_sparse-s001.vmdk"),
    ("split_flat", "split_flat-f002.vmdk"),
    ("flat", "flat-flat.vmdk"),
])
def test_missing_extent_is_a_finding(vmdk_corpus, tmp_path, name, missing):
    """The descriptor names an extent file that is not there: the image opens, the
    finding ``extent_missing`` says so, everything else raises only ImageErrors."""
    path = copy_files(vmdk_corpus[name], tmp_path, skip={missing})
    out = isolated_value(lambda: examine(path, "vmdk", read_limit=MiB), what=f"{name} without {missing}")
    _no_problems(out, name)
    assert out.open_error is None, f"open raised {out.open_error}"
    assert "extent_missing" in out.codes, out.codes


def test_missing_extent_data_is_not_silent(vmdk_corpus, tmp_path):
    """Reading guest bytes that live in the missing extent: an ImageError, or the read
    returns zeros while the findings name the missing extent (never zeros alone)."""
    path = copy_files(vmdk_corpus["flat"], tmp_path, skip={"flat-flat.vmdk"})
    with imgscope.open(path) as img:
        try:
            img.open_guest().read(4096)
        except ImageError:
            return
        f = img.findings
        assert "extent_missing" in set(f.code), f
        assert (f[f.code == "extent_missing"].severity.astype(str) == "error").all()


# =========================================================================== confinement


@pytest.fixture
def folders(tmp_path):
    """tmp/case/inner (the image's folder), tmp/case (its parent), tmp/elsewhere."""
    oracle.require_tools()
    return make_folders(tmp_path)


def _flat_with_data(folder: Path, name: str) -> Path:
    p = folder / f"{name}.vmdk"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", p.name, "1M",
               cwd=folder)
    oracle.qemu_io(p, "write -P 0x5a 0 64k", fmt="vmdk")
    return p


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
def test_extent_outside_the_folder_is_refused_unless_allowed(folders, where):
    inner, parent, elsewhere = folders
    p = _flat_with_data(inner, "d")
    target_dir = parent if where == "dotdot" else elsewhere
    shutil.move(inner / "d-flat.vmdk", target_dir / "outside.vmdk")
    name = "../outside.vmdk" if where == "dotdot" else str(elsewhere / "outside.vmdk")
    rewrite_descriptor(p, lambda t: t.replace('"d-flat.vmdk"', f'"{name}"'))
    err = _open_err(p)
    assert isinstance(err, UnsafePath), err
    assert err.structure and "extent" in err.structure, err.structure
    assert name in str(err)
    assert isinstance(_open_err(p, allow_paths=[inner]), UnsafePath)
    with imgscope.open(p, allow_paths=[target_dir]) as img:
        assert img.open_guest().read(4) == b"\x5a" * 4
        assert img.findings.empty, img.findings


def test_sparse_extent_outside_the_folder_is_refused(vmdk_corpus, folders):
    inner, parent, _ = folders
    p = copy_files(vmdk_corpus["split_sparse"], inner)
    shutil.move(inner / "split_sparse-s002.vmdk", parent / "split_sparse-s002.vmdk")
    rewrite_descriptor(p, lambda t: t.replace('"split_sparse-s002.vmdk"', '"../split_sparse-s002.vmdk"'))
    assert isinstance(_open_err(p), UnsafePath)
    with imgscope.open(p, allow_paths=[parent]) as img:
        assert len(img.tables["extents"]) == 2 and img.findings.empty


def test_extent_symlink_leaving_the_folder_is_refused(folders):
    inner, parent, _ = folders
    p = _flat_with_data(inner, "d")
    shutil.move(inner / "d-flat.vmdk", parent / "real-flat.vmdk")
    os.symlink("../real-flat.vmdk", inner / "d-flat.vmdk")
    assert isinstance(_open_err(p), UnsafePath)


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
def test_parent_hint_outside_the_folder_is_refused_unless_allowed(folders, where):
    inner, parent, elsewhere = folders
    base_dir = parent if where == "dotdot" else elsewhere
    base = base_dir / "base.vmdk"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "vmdk", base.name, "1M", cwd=base_dir)
    oracle.qemu_io(base, "write -P 0x6b 0 64k", fmt="vmdk")
    hint = "../base.vmdk" if where == "dotdot" else str(base)
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "vmdk", "-b", hint, "-F", "vmdk", "child.vmdk", cwd=inner)
    child = inner / "child.vmdk"
    assert f'parentFileNameHint="{hint}"' in oracle.vmdk_descriptor_text(child)
    err = _open_err(child)
    assert isinstance(err, UnsafePath), err
    assert hint in str(err)
    with imgscope.open(child, allow_paths=[base_dir]) as img:
        assert len(img.chain) == 2
        assert img.open_guest().read(4) == b"\x6b" * 4
        assert img.findings.empty, img.findings


# =========================================================================== entry pokes


def test_grain_table_entry_beyond_eof_is_reported(vmdk_corpus, tmp_path):
    """A primary GT entry pointing past EOF: a finding naming the entry (or its target),
    or an ImageError on read -- not zeros with nothing said (qemu-img check: 'points
    after EOF')."""
    path = copy_files(vmdk_corpus["sparse"], tmp_path)
    entry, old = grain_entries(path)[0]
    t = kdmv_tables(path)
    gt_sector = max(s for s in t["gts"] if s * 512 <= entry)
    index = (entry - gt_sector * 512) // 4
    gd_index = t["gd"].index(gt_sector)
    guest = (gd_index * 512 + index) * GRAIN
    new = 0x100000                                     # sector 2^20 = 512 MiB, file is < 2 MiB
    poke(path, entry, "<I", new)
    findings, read_error, zeros = read_after_damage(path, "vmdk", guest, GRAIN, what="GT entry past EOF")
    named = [c for c, h in findings if h in (entry, new * 512)]
    assert named or read_error, (
        f"GT entry at {entry:#x} (guest {guest:#x}) points at sector {new:#x} past EOF; the read "
        f"returned {'zeros' if zeros else 'data'}; findings {findings}")


def test_grain_directory_entry_beyond_eof_is_reported(vmdk_corpus, tmp_path):
    path = copy_files(vmdk_corpus["sparse"], tmp_path)
    h = oracle.vmdk_header(path)
    poke(path, h["gdOffset"] * 512, "<I", 0x100000)
    out = isolated_value(lambda: examine(path, "vmdk", read_limit=MiB), what="GD entry past EOF")
    _no_problems(out, "GD entry past EOF")
    assert out.open_error is None, out.open_error
    assert "grain_table_beyond_eof" in out.codes, out.codes


def test_redundant_directory_disagreeing_is_reported(vmdk_corpus, tmp_path):
    """Primary GT entry changed to another grain inside the file, redundant copy intact
    (spec check V10): the guest silently reads other data; reading finds nothing wrong,
    the checker reports the disagreement."""
    path = copy_files(vmdk_corpus["sparse"], tmp_path)
    entry, old = grain_entries(path)[0]
    poke(path, entry, "<I", old + 128)          # another grain inside the file
    out = isolated_value(lambda: examine(path, "vmdk", read_limit=MiB), what="GD/RGD disagree")
    _no_problems(out, "GD/RGD disagree")
    with imgscope.open(path, "vmdk") as img:
        found = {f.code for f in img.check().findings}
    assert "redundant_grain_table_mismatch" in found, found


# =========================================================================== truncation


def _cut_points(path) -> list[int]:
    """Lengths ending inside every structure of a KDMV file (header fields, descriptor,
    RGD/GD, grain tables, grains or stream grain records, the end)."""
    t = kdmv_tables(path)
    h, size = t["header"], t["size"]
    cuts = {0, 1, 3, 4, 8, 12, 20, 28, 36, 44, 48, 56, 64, 72, 73, 77, 79, 256, 511, 512}
    d0, dn = h["descriptorOffset"] * 512, h["descriptorSize"] * 512
    text_len = len(oracle.vmdk_descriptor_text(path).encode())
    cuts |= {d0 + 1, d0 + text_len // 2, d0 + text_len - 1, d0 + text_len, d0 + dn - 1}
    for sector in (h["rgdOffset"], h["gdOffset"]):
        cuts |= {sector * 512, sector * 512 + 2, sector * 512 + 4}
    for tables in (t["gd"], t["rgd"]):
        for s in sorted(set(tables) - {0}):
            cuts |= {s * 512, s * 512 + 4, s * 512 + 1024, s * 512 + 2047}
    cuts |= {h["overHead"] * 512 - 1, h["overHead"] * 512}
    grains = sorted({v for ents in t["gts"].values() for v in ents if v > 1})
    pick = grains[:2] + grains[len(grains) // 2:len(grains) // 2 + 1] + grains[-2:]
    if h["flags"] & 0x10000:                  # stream: compressed grain records
        data = Path(path).read_bytes()
        for g in pick:
            rec = g * 512
            rsize = struct.unpack_from("<I", data, rec + 8)[0]
            cuts |= {rec, rec + 6, rec + 12, rec + 12 + rsize // 2, rec + 12 + rsize - 1}
    else:
        for g in pick:
            cuts |= {g * 512, g * 512 + 1, g * 512 + GRAIN // 2, g * 512 + GRAIN - 1}
    cuts |= {size // 2, size - 1}
    return sorted(c for c in cuts if 0 <= c < size)


def _grains(path, guest_base: int = 0) -> list[tuple[int, int]]:
    """(guest offset, host end) of every allocated grain of a KDMV file: host end is where
    its grain (or its whole stream record) ends; a shorter file lost it."""
    t = kdmv_tables(path)
    h = t["header"]
    gb = h["grainSize"] * 512
    stream = bool(h["flags"] & 0x10000)
    data = Path(path).read_bytes() if stream else b""
    out = []
    for i, s in enumerate(t["gd"]):
        if not s:
            continue
        for j, v in enumerate(t["gts"][s]):
            if v <= 1:
                continue
            end = v * 512 + (12 + struct.unpack_from("<I", data, v * 512 + 8)[0] if stream else gb)
            out.append((guest_base + (i * h["numGTEsPerGT"] + j) * gb, max(end, s * 512 + 2048)))
    return out


def _truncation_outcomes(image, victim: Path, full: bytes, cuts, grains, original: Path, read_limit):
    """In a child: for each cut, write ``full[:cut]`` to ``victim``, examine ``image`` and
    read up to 3 of the grains the cut removed, comparing them with ``original`` (qemu's
    raw conversion of the undamaged image); (cut, Outcome, [(guest, error or "same" or
    "differs")])."""
    def body():
        fd = os.open(original, os.O_RDONLY)     # pread: a 2 GiB map would exceed the child's cap
        results = []
        for cut in cuts:
            victim.write_bytes(full[:cut])
            reads = []
            try:
                with alarm(20):
                    out = examine(image, "vmdk", read_limit=read_limit)
                    if out.open_error is None:
                        img = imgscope.open(image, "vmdk")
                        for guest, _end in [gr for gr in grains if gr[1] > cut][:3]:
                            try:
                                with img.open_guest() as g:
                                    g.seek(guest)
                                    data = g.read(GRAIN)
                                same = data == os.pread(fd, GRAIN, guest)
                                reads.append((guest, "same" if same else "differs"))
                            except ImageError as exc:
                                reads.append((guest, type(exc).__name__))
                            except Exception as exc:  # noqa: BLE001
                                out.problems.append(f"read {guest:#x}: {type(exc).__name__}: {exc}")
                        img.close()
            except _Alarm as exc:
                out = Outcome(problems=[f"timeout: {exc}"])
            results.append((cut, out, reads))
        os.close(fd)
        return results
    return isolated_value(body, timeout=300, what=f"{victim.name} truncations")


def _judge(where: str, cut: int, out: Outcome, reads, bad: list) -> None:
    bad += [f"{where}: {p}" for p in out.problems]
    if out.seconds > TIME_LIMIT:
        bad.append(f"{where}: took {out.seconds:.1f} s")
    if out.open_error:
        etype, structure, offset, epath, msg = out.open_error
        if not structure or not epath:
            bad.append(f"{where}: {etype} without structure/path: {msg}")
        return
    if cut < 4 and not out.codes:
        # no magic left: read as a (broken) text descriptor, which must be reported
        bad.append(f"{where}: opened without findings")
    elif 4 <= cut < 512:
        bad.append(f"{where}: opened although the file is shorter than a KDMV header")
    silent = [g for g, r in reads if r == "differs"]
    if silent and not out.codes:
        bad.append(f"{where}: grains at guest {', '.join(hex(g) for g in silent)} are cut away; reading "
                   f"them returned other bytes (zeros) than the original, without an error and "
                   f"with no finding; stage errors: {out.stage_errors}")


TRUNCATION_SAMPLES = ["sparse", "zeroed_grain", "stream", "chain_grandchild"]


@pytest.mark.parametrize("name", TRUNCATION_SAMPLES)
def test_truncated_kdmv_files(vmdk_corpus, tmp_path, name):
    """Cut at every structure: a located ImageError, or an opened model that raises only
    ImageErrors; when a grain in use is cut away, a finding or an ImageError when it is
    read -- never other bytes (zeros) than the original's with nothing said."""
    sample = vmdk_corpus[name]
    work = oracle.copy_sample(sample, tmp_path / "work")
    cuts = _cut_points(sample.path)
    assert len(cuts) >= 40, cuts
    grains = _grains(sample.path)
    original = sample.to_raw(tmp_path / "original.raw")
    results = _truncation_outcomes(work.path, work.path, sample.path.read_bytes(), cuts, grains, original,
                                   MiB)
    bad = []
    for cut, out, reads in results:
        _judge(f"{name} cut at {cut} ({cut:#x})", cut, out, reads, bad)
    assert not bad, f"{len(bad)} problems:\n" + "\n".join(bad)


def test_truncated_split_extent(vmdk_corpus, tmp_path):
    """The second extent file of a twoGbMaxExtentSparse disk cut at every structure."""
    sample = vmdk_corpus["split_sparse"]
    ext = sample.extra_files[1]
    cuts = [c for c in _cut_points(ext) if c >= 512]       # shorter: the extent is unreadable
    grains = _grains(ext, guest_base=oracle.SPLIT)
    path = copy_files(sample, tmp_path / "work")
    original = sample.to_raw(tmp_path / "original.raw")
    results = _truncation_outcomes(path, path.parent / ext.name, ext.read_bytes(), cuts, grains, original,
                                   MiB)
    bad = []
    for cut, out, reads in results:
        _judge(f"{ext.name} cut at {cut}", 512, out, reads, bad)
    assert not bad, f"{len(bad)} problems:\n" + "\n".join(bad)


# =========================================================================== hypothesis


@pytest.fixture(scope="module")
def fuzz_images(tmp_path_factory):
    """A small monolithicSparse (data, zero, partial grains) and a small streamOptimized
    file: all their metadata lies in the first 64 KiB."""
    oracle.require_tools()
    d = tmp_path_factory.mktemp("vmdk_fuzz")
    sp = d / "small.vmdk"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", sp.name, "4M", cwd=d)
    oracle.qemu_io(sp, "write -P 0x11 0 96k", "write -z 256k 64k", "write -P 0x22 1M 4k",
                   "write -P 0x33 4032k 64k", fmt="vmdk")
    raw = d / "src.raw"
    with open(raw, "wb") as f:
        f.truncate(4 * MiB)
        f.write(os.urandom(70_000))
        f.seek(2 * MiB)
        f.write(b"compressible " * 9000)
    so = d / "small_stream.vmdk"
    oracle.run(oracle.QEMU_IMG, "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
               raw.name, so.name, cwd=d)
    for p in (sp, so):
        assert oracle.vmdk_header(p)["overHead"] * 512 == 64 * KiB
    return {"sparse": sp, "stream": so}


def _hot_ranges(path) -> list[tuple[int, int]]:
    t = kdmv_tables(path)
    h = t["header"]
    ranges = [(0, 80), (0, 512), (512, len(oracle.vmdk_descriptor_text(path).encode()) or 1), (0, 64 * KiB)]
    for sector in (h["rgdOffset"], h["gdOffset"]):
        ranges.append((sector * 512, 16))
    for s in set(t["gd"]) | set(t["rgd"]):
        if s:
            ranges.append((s * 512, 2048))
    return ranges


INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x200, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FFFFFFFFFFFFFFF,
               0xFFFFFFFFFFFFFFFF, 1 << 32, 1 << 40, 0x10000, 0x30003, 0x30007]


@pytest.mark.parametrize("kind", ["sparse", "stream"])
def test_random_mutations_of_the_first_64k_raise_only_image_errors(fuzz_images, tmp_path, kind):
    """Random bytes/words in the header, embedded descriptor, GD/RGD and GTs: open +
    extents + regions + fields + tables + info + reading 1 MiB raise only ImageErrors,
    each within 10 s (in a forked child with an address-space cap)."""
    original = fuzz_images[kind].read_bytes()
    ranges = _hot_ranges(fuzz_images[kind])
    target = tmp_path / "mutant.vmdk"
    mutation = mutations(ranges, ["byte", "bitflip", "u32", "u64", "digit"], INTERESTING)
    apply = partial(mutate, byteorder="little")

    # With derandomize=True hypothesis seeds from the source of check, decorators
    # included: any edit of these lines changes the examples that are run.
    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(st.lists(mutation, min_size=1, max_size=6))
    def check(muts):
        data = bytearray(original)
        for m in muts:
            apply(data, m)
        target.write_bytes(bytes(data))
        try:
            with alarm(10):
                out = examine(target, "vmdk", read_limit=MiB)
        except _Alarm as exc:
            raise AssertionError(f"hang: {exc}") from None
        assert not out.problems, "\n".join(out.problems)

    assert_fuzz_passes(check, timeout=120)


# =========================================================================== size bombs


DESC_HEAD = ('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
             'createType="{t}"\n\n# Extent description\n')
DESC_TAIL = '\n# The Disk Data Base\n#DDB\n\nddb.adapterType = "ide"\n'


def _descriptor(path: Path, lines, create_type="custom") -> Path:
    with open(path, "w") as f:
        f.write(DESC_HEAD.format(t=create_type))
        f.writelines(lines)
        f.write(DESC_TAIL)
    return path


def test_million_extent_lines(tmp_path):
    """10^6 ZERO extent lines (10 MB of descriptor): a clean error or a bounded open."""
    p = _descriptor(tmp_path / "many.vmdk", ("RW 1 ZERO\n" for _ in range(10 ** 6)))
    out = check_bounded(p, "10^6 extent lines", "vmdk")
    if out.open_error is None:
        assert out.codes, "a 10 MB descriptor opened without any finding"


def test_many_extent_lines_within_a_megabyte(tmp_path):
    """60 000 extent lines (ZERO and FLAT on one small file) in a descriptor under 1 MiB:
    open, map, regions and info stay within the time and memory bounds."""
    (tmp_path / "d.raw").write_bytes(os.urandom(64 * KiB))
    lines = ['RW 1 FLAT "d.raw" %d\n' % (i % 128) if i % 2 else "RW 1 ZERO\n" for i in range(60_000)]
    p = _descriptor(tmp_path / "many.vmdk", lines)
    assert p.stat().st_size < MiB
    # Every extent line is an object of the model (about 2 KiB with its table rows and
    # frames); the 1 MiB descriptor cap bounds a descriptor to ~70 000 lines, so memory is
    # bounded by the cap, not by anything the file claims.
    out = check_bounded(p, "60 000 extent lines", "vmdk", peak_limit=192 * MiB)
    assert out.open_error is None, out.open_error


HUGE = [
    ("zero_2p64_sectors", lambda d: _descriptor(d / "x.vmdk", ["RW 18446744073709551615 ZERO\n"])),
    ("zero_2p40_sectors_x3", lambda d: _descriptor(d / "x.vmdk", ["RW 1099511627776 ZERO\n"] * 3)),
    ("flat_2p55_sectors", lambda d: (d.joinpath("d.raw").write_bytes(b"x" * 4096),
                                     _descriptor(d / "x.vmdk", ['RW 36028797018963968 FLAT "d.raw" 0\n']))[1]),
    ("sparse_line_2p60_sectors", None),
    ("kdmv_capacity_2p62", None),
    ("kdmv_capacity_2p64_minus_1", None),
    ("kdmv_grain_size_2p40", None),
    ("kdmv_gtes_per_gt_2p31", None),
    ("kdmv_descriptor_size_2p40", None),
    ("kdmv_capacity_0_descriptor_2p40", None),
]


def _huge_case(case, vmdk_corpus, d: Path) -> Path:
    name, make = case
    if make is not None:
        return make(d)
    if name == "sparse_line_2p60_sectors":
        p = copy_files(vmdk_corpus["split_sparse"], d)
        rewrite_descriptor(p, lambda t: t.replace("RW 81920 SPARSE", "RW 1152921504606846976 SPARSE"))
        return p
    p = copy_files(vmdk_corpus["sparse"], d)
    field = {"kdmv_capacity_2p62": (0x0C, "<Q", 1 << 62),
             "kdmv_capacity_2p64_minus_1": (0x0C, "<Q", (1 << 64) - 1),
             "kdmv_grain_size_2p40": (0x14, "<Q", 1 << 40),
             "kdmv_gtes_per_gt_2p31": (0x2C, "<I", 1 << 31),
             "kdmv_descriptor_size_2p40": (0x24, "<Q", 1 << 40),
             "kdmv_capacity_0_descriptor_2p40": (0x24, "<Q", 1 << 40)}[name]
    poke(p, field[0], field[1], field[2])
    if name == "kdmv_capacity_0_descriptor_2p40":
        poke(p, 0x0C, "<Q", 0)
    return p


@pytest.mark.parametrize("case", HUGE, ids=[c[0] for c in HUGE])
def test_huge_sizes_are_bounded(vmdk_corpus, tmp_path, case):
    """Absurd capacities / grain geometry: bounded memory (tracemalloc) and time; a
    clean ImageError or an opened model with findings."""
    p = _huge_case(case, vmdk_corpus, tmp_path)
    out = check_bounded(p, case[0], "vmdk")
    if out.open_error is None and case[0].startswith(("kdmv", "sparse", "flat")):
        assert out.codes, f"{case[0]}: opened without any finding"


_LINE = st.one_of(
    st.sampled_from(["RW", "RDONLY", "NOACCESS", "rw", "", "XX"]).flatmap(
        lambda acc: st.tuples(st.just(acc),
                              st.one_of(st.integers(0, 1 << 70).map(str), st.text("0123456789abcx-", max_size=6)),
                              st.sampled_from(["FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "SESPARSE",
                                               "VMFSRDM", "bogus", ""]),
                              st.sampled_from(['"d.raw"', '"missing.vmdk"', '"../x"', '"/etc/passwd"',
                                               '"json:{}"', "d.raw", '"', ""]),
                              st.one_of(st.integers(0, 1 << 66).map(str), st.sampled_from(["", "x", "-1"])))
        .map(lambda t: " ".join(t) + "\n")),
    st.text(max_size=40).map(lambda s: s.replace("\0", "") + "\n"),
    st.sampled_from(['createType="vmfsSparse"\n', 'parentFileNameHint="d.raw"\n', "CID=zz\n",
                     'parentFileNameHint="../up.vmdk"\n', "version=\n", "ddb.x\n"]))


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=12))
def test_random_descriptor_lines_raise_only_image_errors(tmp_path, lines):
    """Descriptor text from a loose grammar: opening and using it raises only ImageError."""
    (tmp_path / "d.raw").write_bytes(b"\x5a" * 8192)
    path = tmp_path / "r.vmdk"
    path.write_text("# Disk DescriptorFile\nversion=1\nCID=12345678\n" + "".join(lines),
                    errors="surrogateescape")
    try:
        img = imgscope.open(path, "vmdk")
    except ImageError:
        return
    with img:
        for stage in (img.extents, img.regions, lambda: img.fields, img.info,
                      lambda: [img.tables[n] for n in img.tables],
                      lambda: img.open_guest().read(1 << 16)):
            try:
                stage()
            except ImageError:
                pass
