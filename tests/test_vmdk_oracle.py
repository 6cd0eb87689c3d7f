"""VMDK parsed by imgscope versus what qemu-img says about the same real images.

Every subformat qemu-img 7.2 writes (monolithicSparse, monolithicFlat,
twoGbMaxExtentSparse/Flat, streamOptimized), the create options, delta chains and a
child whose parent changed after it was made (tests/oracle.py, ``build_vmdk_corpus``).
Each test walks the whole corpus and collects every disagreement, so one run shows
all of them.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import imgscope

import checks
import oracle

GRAIN, GT_SPAN = oracle.GRAIN, oracle.GT_SPAN
SUBFORMATS = {"monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
              "streamOptimized"}


def _u32(path, offsets) -> np.ndarray:
    """Little-endian u32 at each byte offset of a file (read here, not by imgscope)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    idx = offsets[:, None] + np.arange(4)[None, :]
    return (data[idx].astype(np.uint64) << (np.arange(4, dtype=np.uint64) * np.uint64(8))).sum(axis=1)


# =========================================================================== the corpus


def test_corpus_is_broad(vmdk_corpus):
    """The corpus really contains the variants the other tests claim to cover."""
    created = {s.subformat for s in vmdk_corpus.values()}
    assert SUBFORMATS <= created, created
    ddb = {}
    flags = set()
    for name, s in vmdk_corpus.items():
        text = oracle.vmdk_descriptor_text(s.path)
        assert f'createType="{s.subformat}"' in text, name
        for line in text.splitlines():
            if line.startswith("ddb."):
                k, _, v = line.partition("=")
                ddb.setdefault(k.strip(), set()).add(v.strip().strip('"'))
        for f in [s.path, *s.extra_files]:
            with open(f, "rb") as fh:
                if fh.read(4) == b"KDMV":
                    flags.add(oracle.vmdk_header(f)["flags"])
    assert {"ide", "lsilogic", "buslogic", "legacyESX"} <= ddb["ddb.adapterType"]
    assert {"4", "6", "7", "9"} <= ddb["ddb.virtualHWVersion"]
    assert {0x3, 0x7, 0x30003, 0x30007} <= flags, sorted(map(hex, flags))
    # zeroed_grain=on + write -z really stored GTE = 1 (zeroed grains), also in the grandchild
    for name in ("zeroed_grain", "chain_grandchild"):
        gts = oracle.vmdk_grain_tables(vmdk_corpus[name].path)["gts"]
        assert any(1 in entries for entries in gts.values()), name
    split = [s for s in vmdk_corpus.values() if s.subformat.startswith("twoGb")]
    assert split and all(s.virtual_size > oracle.SPLIT and len(s.extra_files) == 2 for s in split)
    assert any(len(s.backing) >= 2 for s in vmdk_corpus.values())
    assert any(s.expect_findings == {"cid_mismatch"} for s in vmdk_corpus.values())
    # the big samples stay small on disk
    used = sum(os.stat(f).st_blocks * 512 for s in vmdk_corpus.values() for f in s.files)
    assert used < 64 * oracle.MiB, used


def test_cid_mismatch_sample_is_what_it_claims(vmdk_corpus, tmp_path):
    """cid_child's parentCID differs from cid_base's CID, and qemu-img convert refuses it."""
    child, base = vmdk_corpus["cid_child"], vmdk_corpus["cid_base"]
    info = child.info()["format-specific"]["data"]
    assert info["parent-cid"] != base.info()["format-specific"]["data"]["cid"]
    proc = oracle.run(oracle.QEMU_IMG, "convert", "-U", "-O", "raw", child.path, tmp_path / "x.raw",
                      check=False, cwd=child.path.parent)
    assert proc.returncode != 0 and "Invalid argument" in proc.stderr, proc


# =========================================================================== info and map


def test_info_json_matches_qemu(vmdk_corpus):
    bad = checks.info_differences(vmdk_corpus)
    assert not bad, "\n".join(bad)


def test_info_backing_chain_matches_qemu(vmdk_corpus):
    bad = checks.chain_info_differences(vmdk_corpus)
    assert not bad, "\n".join(bad)


def test_map_matches_qemu(vmdk_corpus):
    bad = checks.map_differences(vmdk_corpus)
    assert not bad, "\n".join(bad)


def test_map_extents_cover_the_disk(vmdk_corpus):
    for name, s in vmdk_corpus.items():
        with imgscope.open(s.path) as img:
            assert img.virtual_size == s.virtual_size, name
            checks.assert_extents_cover_the_disk(img, name)


# =========================================================================== guest bytes


@pytest.fixture(scope="module")
def raw_conversions(vmdk_corpus, tmp_path_factory):
    """qemu-img convert -O raw of every sample qemu can read (sparse output files)."""
    out = tmp_path_factory.mktemp("vmdk_raw")
    return {name: s.to_raw(out / f"{name}.raw") for name, s in vmdk_corpus.items() if s.qemu_reads}


def _first_difference(img, raw) -> int | None:
    """Guest offset of the first byte where imgscope and the raw file differ, or None."""
    data = np.memmap(raw, dtype=np.uint8, mode="r")
    if data.size != img.virtual_size:
        return min(data.size, img.virtual_size)
    step = 32 << 20
    with img.open_guest() as g:
        for off in range(0, img.virtual_size, step):
            mine = np.frombuffer(g.read(step), np.uint8)
            theirs = data[off:off + step]
            if mine.size != theirs.size or not np.array_equal(mine, theirs):
                n = min(mine.size, theirs.size)
                diff = np.flatnonzero(mine[:n] != theirs[:n])
                return off + int(diff[0] if diff.size else n)
    return None


SHA_LIMIT = 256 << 20      # bigger disks: byte-for-byte comparison (same verdict, 3x faster)


def test_guest_bytes_equal_qemu_convert(vmdk_corpus, raw_conversions):
    """SHA-256 of the guest equals that of ``qemu-img convert -O raw`` (disks over 256 MiB
    are compared byte for byte instead, which proves the same and names the offset)."""
    def one(name):
        raw = raw_conversions[name]
        try:
            with imgscope.open(vmdk_corpus[name].path) as img:
                if img.virtual_size > SHA_LIMIT:
                    at = _first_difference(img, raw)
                    return None if at is None else f"{name}: first difference at guest offset {at:#x}"
                if checks.guest_sha(img, 32 << 20) != oracle.sha256_file(raw):
                    return f"{name}: SHA-256 differs (first difference at {_first_difference(img, raw):#x})"
        except imgscope.ImageError as exc:
            return f"{name}: {type(exc).__name__}: {exc}"
        return None
    big = [n for n in raw_conversions if vmdk_corpus[n].virtual_size > SHA_LIMIT]
    with ThreadPoolExecutor(max_workers=2) as pool:
        bad = [r for r in pool.map(one, big + [n for n in raw_conversions if n not in big]) if r]
    assert not bad, "guest bytes differ from qemu-img convert:\n" + "\n".join(bad)


def test_random_reads_cross_boundaries(vmdk_corpus, raw_conversions):
    """Reads across grain, grain-table and extent boundaries equal the raw conversion."""
    rng = random.Random(20261122)
    bad = []
    for name, raw in raw_conversions.items():
        data = np.memmap(raw, dtype=np.uint8, mode="r")
        with imgscope.open(vmdk_corpus[name].path) as img:
            size = img.virtual_size
            starts = [int(x) for x in img.tables["extents"].start][1:]
            points = [GRAIN - 7, 2 * GRAIN - 1, 5 * GRAIN - 300, size - 5, size - GRAIN - 1]
            points += [k * GT_SPAN - 3 for k in range(1, 4) if k * GT_SPAN < size]
            points += [b - d for b in starts for d in (1, 512, 4096, 96 * 1024 + 1)]
            points += [rng.randrange(size) for _ in range(40)]
            g = img.open_guest()
            for p in points:
                p = max(0, min(p, size - 1))
                for n in (rng.choice([1, 511, 513, GRAIN + 3, 3 * GRAIN + 17, 1 << 20]), 200_001):
                    g.seek(p)
                    try:
                        got = g.read(n)
                    except imgscope.ImageError as exc:
                        bad.append(f"{name}: read at {p:#x}+{n}: {type(exc).__name__}: {exc}")
                        continue
                    if got != data[p:p + n].tobytes():
                        bad.append(f"{name}: read at {p:#x}+{n} differs")
    assert not bad, "\n".join(bad[:40])


def test_cid_mismatch_child_reads_its_own_grains(vmdk_corpus, tmp_path):
    """No raw oracle for cid_child (qemu refuses it): its own grain equals the payload
    qemu-io wrote, and the findings name the mismatch."""
    s = vmdk_corpus["cid_child"]
    with imgscope.open(s.path) as img:
        g = img.open_guest()
        g.seek(4 * oracle.MiB)
        own = g.read(GRAIN)
        codes = set(img.findings.code)
    payload = s.path.parent / s.commands[0].split()[2]
    assert own == payload.read_bytes()
    assert codes == s.expect_findings, codes


# =========================================================================== host layout, findings


def test_regions_tile_every_file_exactly_once(vmdk_corpus):
    bad = []
    for name, s in vmdk_corpus.items():
        with imgscope.open(s.path) as img:
            reg = img.regions()
            files = img.files()
            names = {str(src.path) for src in files}
            expected = {str(p.resolve()) for p in [s.path, *s.extra_files]} - {
                str(p.resolve()) for b in s.backing for p in [b, *oracle.vmdk_extent_files(b)]}
            if {str(os.path.realpath(n)) for n in names} != expected:
                bad.append(f"{name}: files {sorted(names)} != {sorted(expected)}")
            for src in files:
                r = checks.file_regions(reg, src)
                bad += [f"{name}: {p}" for p in checks.tiling_problems(r, src)]
                if not len(r):
                    continue
                with open(src.path, "rb") as fh:
                    magic = fh.read(4)
                if magic == b"KDMV":
                    want = {"header", "grain_directory", "grain_table"}
                elif src.path == s.path.resolve() or src.path == s.path:
                    want = {"descriptor"}
                else:
                    want = {"data"}
                if not want <= set(r.kind):
                    bad.append(f"{name}: {src.path.name}: kinds {sorted(set(r.kind))} lack {want}")
    assert not bad, "\n".join(bad)


def test_findings_are_the_expected_ones(vmdk_corpus):
    """No findings on clean images; cid_child reports exactly its CID mismatch."""
    bad = {}
    for name, s in vmdk_corpus.items():
        with imgscope.open(s.path) as img:
            img.extents(), img.regions()
            for t in list(img.tables):
                img.tables[t]
            codes = set(img.findings.code)
            if codes != s.expect_findings:
                bad[name] = (sorted(codes), sorted(s.expect_findings), img.findings.message.tolist()[:5])
    assert not bad, bad


# =========================================================================== tables and fields


def _descriptor_checks(name, img, bad) -> None:
    data = img.path.read_bytes()
    base = oracle.vmdk_header(img.path)["descriptorOffset"] * 512 if data[:4] == b"KDMV" else 0
    lines = data[base:].split(b"\0", 1)[0].decode("utf-8", "surrogateescape").split("\n")
    rows = []
    for tname in ("descriptor", "ddb"):
        t = img.tables[tname]
        if not len(t):
            bad.append(f"{name}: table {tname} is empty")
        rows += list(t.itertuples())
    for r in rows:
        at = data[int(r.offset):int(r.offset) + int(r.length)].decode("utf-8", "surrogateescape")
        if at.rstrip("\r\n") != r.raw:
            bad.append(f"{name}: descriptor row {r.key}: bytes at {r.offset} are {at!r}, raw {r.raw!r}")
        if not 0 < r.line <= len(lines) or lines[r.line - 1].rstrip("\r") != r.raw:
            bad.append(f"{name}: descriptor row {r.key}: line {r.line} is not {r.raw!r}")
        key, _, value = r.raw.partition("=")
        if key.strip() != r.key or value.strip().strip('"') != r.value:
            bad.append(f"{name}: descriptor row {r.key}={r.value!r} does not match {r.raw!r}")
    settings = [l for l in lines if "=" in l and not l.lstrip().startswith("#")]
    if sorted(settings) != sorted(r.raw for r in rows):
        bad.append(f"{name}: descriptor rows {sorted(r.raw for r in rows)} != text lines {sorted(settings)}")


def _extent_checks(name, s, img, bad) -> dict:
    ext = img.tables["extents"]
    lines = oracle.vmdk_extent_lines(s.path)
    if len(ext) != len(lines):
        bad.append(f"{name}: {len(ext)} extent rows, {len(lines)} extent lines")
    start = 0
    files = {}
    for r, (access, sectors, etype, fname, off) in zip(ext.itertuples(), lines):
        if (r.access, r.sectors, r.type, r.start, r.length) != (access, sectors, etype, start, sectors * 512):
            bad.append(f"{name}: extent {r.index}: {(r.access, r.sectors, r.type, r.start, r.length)} vs "
                       f"line {(access, sectors, etype, start, sectors * 512)}")
        want = (s.path.parent / fname).resolve()
        if os.path.realpath(r.file) != str(want):
            bad.append(f"{name}: extent {r.index} file {r.file} != {want}")
        if etype == "FLAT" and r.offset != (off or 0) * 512:
            bad.append(f"{name}: extent {r.index} offset {r.offset} != {off}")
        files[r.index] = r.file
        start += sectors * 512
    if start != img.virtual_size:
        bad.append(f"{name}: extents sum to {start}, virtual size {img.virtual_size}")
    return files


def _grain_checks(name, s, img, files, bad) -> None:
    kdmv = {i: f for i, f in files.items() if open(f, "rb").read(4) == b"KDMV"}
    gd = img.tables["grain_directory"]
    gt = img.tables["grain_tables"]
    if not kdmv:
        if len(gd) or len(gt):
            bad.append(f"{name}: flat image with grain directory/table rows")
        return
    if not len(gd) or not len(gt):
        bad.append(f"{name}: grain_directory ({len(gd)}) or grain_tables ({len(gt)}) empty")
        return
    for tname in ("grain_directory", "redundant_grain_directory"):
        if tname not in img.tables:
            bad.append(f"{name}: no table {tname} (qemu writes a redundant GD)")
            continue
        d = img.tables[tname]
        for i, path in kdmv.items():
            rows = d[d.extent == i]
            h = oracle.vmdk_header(path)
            n = -(-h["capacity"] // (h["grainSize"] * h["numGTEsPerGT"]))
            if len(rows) != n:
                bad.append(f"{name}: {tname} of extent {i}: {len(rows)} rows, {n} expected")
            sector = h["gdOffset"] if tname == "grain_directory" else h["rgdOffset"]
            if len(rows) and int(rows.entry_offset.min()) != sector * 512:
                bad.append(f"{name}: {tname} of extent {i} starts at {rows.entry_offset.min()}, "
                           f"header says sector {sector}")
            got = _u32(path, rows.entry_offset.to_numpy())
            if not (got == rows.raw.to_numpy(np.uint64)).all():
                bad.append(f"{name}: {tname} raw values differ from the file bytes (extent {i})")
            if not (rows.gt_offset.to_numpy(np.uint64) == rows.raw.to_numpy(np.uint64) * np.uint64(512)).all():
                bad.append(f"{name}: {tname} gt_offset != raw * 512 (extent {i})")
    # the redundant tables hold the same entries as the primary ones (qemu updates both)
    rgd = img.tables["redundant_grain_directory"] if "redundant_grain_directory" in img.tables else None
    for i, path in kdmv.items():
        rows = gt[gt.extent == i]
        got = _u32(path, rows.entry_offset.to_numpy())
        if not (got == rows.raw.to_numpy(np.uint64)).all():
            k = int(np.flatnonzero(got != rows.raw.to_numpy(np.uint64))[0])
            bad.append(f"{name}: grain table raw {rows.raw.iloc[k]} != u32 {got[k]} at "
                       f"{rows.entry_offset.iloc[k]} (extent {i})")
        if rgd is not None:
            r = rgd[rgd.extent == i]
            red = np.concatenate([_u32(path, int(o) + 4 * np.arange(512)) for o in r.gt_offset if o])
            prim = np.concatenate([_u32(path, int(o) + 4 * np.arange(512))
                                   for o in gd[gd.extent == i].gt_offset if o])
            if not np.array_equal(red, prim):
                bad.append(f"{name}: redundant grain tables differ from the primary ones (extent {i})")
    # grain tables against qemu's map (top layer only)
    theirs = s.map()
    m_start = np.array([e["start"] for e in theirs], np.uint64)
    zero_flag = {i: bool(oracle.vmdk_header(p)["flags"] & 4) for i, p in kdmv.items()}
    comp = {i: bool(oracle.vmdk_header(p)["flags"] & 0x10000) for i, p in kdmv.items()}
    problems = 0
    for r in gt.itertuples():
        e = theirs[int(np.searchsorted(m_start, np.uint64(r.guest_offset), side="right")) - 1]
        top = e["depth"] == 0 and e["present"]
        raw = int(r.raw)
        if raw == 0:
            ok = not top
        elif raw == 1 and zero_flag[r.extent]:
            ok = top and e["zero"] and not e["data"] and "offset" not in e
        elif comp[r.extent]:
            ok = top and e["data"] and "offset" not in e
        else:
            ok = top and e["data"] and e.get("offset", -1) + (r.guest_offset - e["start"]) == raw * 512
        if not ok:
            problems += 1
            if problems <= 5:
                bad.append(f"{name}: grain table entry {r.gt_index}/{r.index} of extent {r.extent} "
                           f"(guest {r.guest_offset:#x}) raw={raw} vs qemu map {e}")


def _marker_checks(name, img, files, bad) -> None:
    if "markers" not in img.tables:
        bad.append(f"{name}: stream file without a markers table")
        return
    mk = img.tables["markers"]
    gt = img.tables["grain_tables"]
    grains = mk[mk.type == "grain"]
    if not len(grains):
        bad.append(f"{name}: markers lists no grain records")
        return
    path = files[0]
    lba = _u32(path, grains.offset.to_numpy()) | (_u32(path, grains.offset.to_numpy() + 4) << np.uint64(32))
    size = _u32(path, grains.offset.to_numpy() + 8)
    if not (lba == grains.lba.to_numpy(np.uint64)).all() or not (size == grains["size"].to_numpy(np.uint64)).all():
        bad.append(f"{name}: markers lba/size differ from the record headers in the file")
    used = gt[gt.raw != 0]
    want = sorted(zip((used.guest_offset // 512).astype(int), (used.raw * 512).astype(int)))
    got = sorted(zip(grains.lba.astype(int), grains.offset.astype(int)))
    if want != got:
        bad.append(f"{name}: grain records (lba, offset) {got[:4]}... != grain table {want[:4]}... "
                   f"({len(got)} vs {len(want)})")


def _fields_checks(name, img, files, bad) -> None:
    """Every fields row: raw == the ``size`` file bytes at ``offset`` (the frame contract,
    see tests/test_model.py); reported once per structure with the first example."""
    f = img.fields
    if not len(f):
        bad.append(f"{name}: no fields")
        return
    blobs, wrong = {}, {}
    for r in f.itertuples():
        st = str(r.structure)
        if st.startswith("extent[") and " " in st:
            path = files.get(int(st[7:st.index("]")]))
        else:
            path = str(img.path)
        if path not in blobs:
            with open(path, "rb") as fh:
                blobs[path] = fh.read(1 << 20)
        at = blobs[path][int(r.offset):int(r.offset) + int(r.size)]
        if at != r.raw:
            wrong.setdefault(st, []).append(
                f"{r.field}: {int(r.size)} bytes at {int(r.offset)} are {at[:40]!r}, raw is {bytes(r.raw)[:40]!r}")
    if wrong:
        st, msgs = next(iter(wrong.items()))
        bad.append(f"{name}: {sum(map(len, wrong.values()))} fields rows whose raw is not the file bytes "
                   f"(structures {sorted(wrong)}), e.g. {st}.{msgs[0]}")
    magic = f[f.field == "magicNumber"]
    if any(open(p, "rb").read(4) == b"KDMV" for p in files.values()) and not len(magic):
        bad.append(f"{name}: no magicNumber field")


def test_tables_are_consistent_with_the_bytes(vmdk_corpus):
    """extents = descriptor lines; GD/GT raw values = the u32 at entry_offset; GT entries
    agree with qemu's map; descriptor rows = text lines; stream markers = grain tables."""
    bad = []
    for name, s in vmdk_corpus.items():
        with imgscope.open(s.path) as img:
            names = set(img.tables)
            need = {"extents", "descriptor", "ddb", "grain_directory", "grain_tables"}
            if not need <= names:
                bad.append(f"{name}: tables {sorted(names)} lack {sorted(need - names)}")
                continue
            files = _extent_checks(name, s, img, bad)
            _descriptor_checks(name, img, bad)
            _grain_checks(name, s, img, files, bad)
            if s.subformat == "streamOptimized":
                _marker_checks(name, img, files, bad)
            elif "markers" in names:
                bad.append(f"{name}: markers table on a non-stream image")
    assert not bad, f"{len(bad)} problems:\n" + "\n".join(bad[:60])


def test_fields_raw_is_the_file_bytes(vmdk_corpus):
    """Every fields row's raw = the file bytes at offset..offset+size (the frame
    contract tests/test_model.py checks for qcow2), in the file the structure lives in."""
    bad = []
    for name, s in vmdk_corpus.items():
        with imgscope.open(s.path) as img:
            files = {int(r.index): r.file for r in img.tables["extents"].itertuples()}
            _fields_checks(name, img, files, bad)
    assert not bad, f"{len(bad)} problems:\n" + "\n".join(bad)


# =========================================================================== command line


def _qemu_text(verb, name, cwd) -> str:
    return oracle.run(oracle.QEMU_IMG, *verb, "-U", "--output=json", name, cwd=cwd).stdout


def _verbs(s):
    return [["info"], ["map"]] + ([["info", "--backing-chain"]] if s.backing else [])


def test_cli_json_text_equals_qemu_in_process(vmdk_corpus, monkeypatch):
    """``imgscope info/map --output=json NAME`` from the image's folder prints exactly
    qemu-img's text (every sample, through cli.main in this process)."""
    from imgscope.cli import main
    bad = []
    for name, s in vmdk_corpus.items():
        folder = s.path.parent
        monkeypatch.chdir(folder)
        for verb in _verbs(s):
            # a text stream with a .buffer, like sys.stdout (map writes bytes to it)
            out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main([*verb, "--output=json", s.path.name])
            out.flush()
            text = out.buffer.getvalue().decode("utf-8")
            theirs = _qemu_text(verb, s.path.name, folder)
            if rc != 0:
                bad.append(f"{name} {verb}: exit {rc}: {err.getvalue().strip()}")
            elif text != theirs:
                try:
                    same = json.loads(text) == json.loads(theirs)
                except ValueError:
                    same = False
                bad.append(f"{name} {verb}: text differs ({'same values' if same else 'values differ'})")
    assert not bad, "\n".join(bad)


CLI_SAMPLES = ["sparse", "split_flat", "stream", "chain_grandchild", "cid_child"]


def test_cli_subprocess_json_text_equals_qemu(vmdk_corpus):
    """The real command line (``python -m imgscope``) on one sample of each kind."""
    jobs = [(n, verb) for n in CLI_SAMPLES for verb in _verbs(vmdk_corpus[n])]

    def one(job):
        n, verb = job
        s = vmdk_corpus[n]
        p = subprocess.run([sys.executable, "-m", "imgscope", *verb, "--output=json", s.path.name],
                           capture_output=True, text=True, cwd=s.path.parent)
        return n, verb, p.returncode, p.stdout, p.stderr, _qemu_text(verb, s.path.name, s.path.parent)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(one, jobs))
    bad = [f"{n} {verb}: exit {rc} {err.strip()}" if rc else f"{n} {verb}: text differs"
           for n, verb, rc, out, err, theirs in results if rc or out != theirs]
    assert not bad, "\n".join(bad)
