"""qcow2 parsed by imgscope versus what qemu-img says about the same real images.

Each test walks the whole corpus (built once per session by tests/oracle.py) and
collects every disagreement, so one run shows all of them.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

import imgscope
from imgscope.errors import Unsupported

import checks
import oracle


def test_corpus_is_broad(qcow2_corpus):
    """The corpus really contains the variants the other tests claim to cover."""
    headers = {n: oracle.qcow2_header(s.path) for n, s in qcow2_corpus.items() if s.fmt == "qcow2"}
    versions = {h["version"] for h in headers.values()}
    cluster_bits = {h["cluster_bits"] for h in headers.values()}
    orders = {h.get("refcount_order", 4) for h in headers.values()}
    assert versions == {2, 3}
    assert {9, 12, 16, 21} <= cluster_bits
    assert set(range(7)) <= orders
    assert any(s.snapshots for s in qcow2_corpus.values())
    assert any(s.secret for s in qcow2_corpus.values())
    assert any(len(s.backing) >= 2 for s in qcow2_corpus.values())


def test_info_json_matches_qemu(qcow2_corpus):
    bad = checks.info_differences(qcow2_corpus)
    assert not bad, "\n".join(bad)


def test_info_backing_chain_matches_qemu(qcow2_corpus):
    bad = checks.chain_info_differences(qcow2_corpus)
    assert not bad, "\n".join(bad)


def test_map_matches_qemu(qcow2_corpus):
    bad = checks.map_differences(qcow2_corpus)
    assert not bad, "\n".join(bad)


def test_map_extents_cover_the_disk(qcow2_corpus):
    for name, s in qcow2_corpus.items():
        with imgscope.open(s.path) as img:
            checks.assert_extents_cover_the_disk(img, name)


@pytest.fixture(scope="module")
def raw_conversions(qcow2_corpus, tmp_path_factory):
    """qemu-img convert -O raw of every readable sample (LUKS excluded: no decryption yet)."""
    out = tmp_path_factory.mktemp("raw")
    return {name: s.to_raw(out / f"{name}.raw") for name, s in qcow2_corpus.items()
            if not s.secret}


def test_guest_bytes_equal_qemu_convert(qcow2_corpus, raw_conversions):
    bad = []
    for name, raw in raw_conversions.items():
        with imgscope.open(qcow2_corpus[name].path) as img:
            if checks.guest_sha(img) != oracle.sha256_file(raw):
                bad.append(name)
    assert not bad, f"guest SHA-256 differs from qemu-img convert for: {bad}"


def test_random_reads_cross_boundaries(qcow2_corpus, raw_conversions):
    rng = random.Random(20261121)
    for name, raw in raw_conversions.items():
        data = np.memmap(raw, dtype=np.uint8, mode="r")
        with imgscope.open(qcow2_corpus[name].path) as img:
            cs = img.cluster_size or 65536
            l2_span = cs * (cs // 8)
            g = img.open_guest()
            size = img.virtual_size
            points = [cs - 7, 2 * cs - 1, l2_span - 3, size - 5]
            points += [rng.randrange(size) for _ in range(40)]
            for p in points:
                p = max(0, min(p, size - 1))
                n = rng.choice([1, 511, 513, cs + 3, 3 * cs + 17, 1 << 20])
                g.seek(p)
                got = g.read(n)
                assert got == data[p:p + n].tobytes(), f"{name}: read at {p:#x}+{n}"


def test_luks_data_is_refused_clearly(qcow2_corpus):
    for s in qcow2_corpus.values():
        if not s.secret:
            continue
        with imgscope.open(s.path) as img:
            assert img.info()["encrypted"] is True
            kinds = set(img.extents().kind)
            if "encrypted" in kinds:
                with pytest.raises(Unsupported, match="encrypted"):
                    img.open_guest().read(img.virtual_size)
            assert img.tables["luks_keyslots"].active.any()


def test_snapshot_readers_equal_qemu_convert_l(qcow2_corpus, tmp_path):
    checked = 0
    for name, s in qcow2_corpus.items():
        with imgscope.open(s.path) as img:
            assert [x["name"] for x in img.snapshots] == s.snapshots, name
            for snap in s.snapshots:
                raw = s.to_raw(tmp_path / f"{name}-{snap}.raw", snapshot=snap)
                view = img.snapshot(snap)
                assert checks.guest_sha(view) == oracle.sha256_file(raw), f"{name} snapshot {snap}"
                checked += 1
            if s.snapshots:
                # the snapshots differ from each other and from the active disk
                shas = {checks.guest_sha(img.snapshot(x)) for x in s.snapshots} | {checks.guest_sha(img)}
                assert len(shas) == len(s.snapshots) + 1, name
    assert checked >= 2


def test_regions_tile_every_file_exactly_once(qcow2_corpus):
    for name, s in qcow2_corpus.items():
        with imgscope.open(s.path) as img:
            reg = img.regions()
            for src in img.files():
                problems = checks.tiling_problems(checks.file_regions(reg, src), src,
                                                  odd_kinds=s.expect_check == 0)
                assert not problems, f"{name}: " + "\n".join(problems)
            kinds = set(reg.kind)
            if s.fmt == "qcow2":
                assert {"header", "l1_table", "refcount_table", "refcount_block"} <= kinds, name
            else:
                assert kinds == {"data"}, name


def test_clean_images_have_no_findings(qcow2_corpus):
    bad = {}
    for name, s in qcow2_corpus.items():
        with imgscope.open(s.path) as img:
            img.extents(), img.regions()
            if len(img.findings):
                bad[name] = img.findings.code.tolist()
    assert not bad, bad


def test_l2_frame_flags_follow_the_entry_kind(qcow2_corpus):
    """zero_flag is bit 0 of standard entries only (in compressed entries bit 0 is part
    of the host offset); the frame's zero rows are exactly the guest ranges qemu-img map
    reports as zero without data of this layer, compressed rows never zero."""
    from pathlib import Path
    seen_compressed = False
    paths = [s.path for s in qcow2_corpus.values()]
    paths.append(Path(__file__).resolve().parents[1] / "sample_images" / "compressed.qcow2")
    for path in paths:
        with imgscope.open(path) as img:
            if "l2" not in img.tables:
                continue
            l2 = img.tables["l2"]
            comp = l2["compressed"].to_numpy()
            zero = l2["zero_flag"].to_numpy()
            raw = l2["raw"].to_numpy().astype(np.uint64)
            assert not (comp & zero).any(), path
            std = ~comp
            assert ((raw[std] & np.uint64(1)) == 1).tolist() == zero[std].tolist(), path
            seen_compressed |= bool((comp & ((raw & np.uint64(1)) == 1)).any())
    assert seen_compressed, "the corpus should hold a compressed entry with bit 0 set"
