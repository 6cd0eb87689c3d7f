"""Address translation (imgscope.translate) held against qemu-img map and the guest reader.

For every format, on images made by qemu-img / qemu-io and on the sample images, a set
of guest offsets (start, middle and last byte of every range qemu-img map reports, and
the disk's last byte) is translated: the last Step's host offset must be qemu-img map's
``offset + (guest - start)`` for data ranges, its kind must agree with qemu's flags
(zero, unallocated, compressed), its depth with qemu's depth (chains continue into the
base), and the bytes it shows must be what ``image.open_guest()`` reads there.  The
same offsets are checked against imgscope's own extent table (VHDX, which qemu-img map
reports without offsets, is checked only there).  Damaged images: entries poked beyond
the end of the file give a Step saying so, never an exception.
"""
from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import imgscope
from imgscope.errors import ImageError
from imgscope.model import KINDS
from imgscope.translate import Step, translate

import oracle

MiB = oracle.MiB
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
MAX_RANGES = 48          # qemu-img map entries probed per image (three offsets each)


# --------------------------------------------------------------------------- building images
def _raw_source(path: Path, size: int, pieces) -> None:
    """A sparse raw file: (offset, bytes) pieces, holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces:
            f.seek(off)
            f.write(data)


def _compressible(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefgh") for _ in range(7)) for _ in range(16)]
    return b"".join(rnd.choice(words) for _ in range(n // 7 + 1))[:n]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (path, format) of images made by qemu-img / qemu-io."""
    oracle.require_tools()
    root = tmp_path_factory.mktemp("translate")
    rnd = random.Random(7)
    (root / "pattern.bin").write_bytes(rnd.randbytes(1 * MiB))
    qimg, out = oracle.QEMU_IMG, {}

    def create(name, fmt, size, *opts):
        p = root / name
        oracle.run(qimg, "create", "-q", "-f", fmt, *opts, p, str(size))
        out[name] = (p, fmt)
        return p

    # qcow2, 4 KiB clusters: data across clusters, a zero cluster, data at the very end
    p = create("q4k.qcow2", "qcow2", 4 * MiB, "-o", "cluster_size=4096")
    oracle.qemu_io(p, "write -s pattern.bin 1000 9000", "write -s pattern.bin 1048576 4096",
                   "write -z 2097152 8192", f"write -s pattern.bin {4 * MiB - 4096} 4096")
    # extended L2: partial subclusters, a zeroed subcluster inside an allocated cluster
    p = create("extl2.qcow2", "qcow2", 4 * MiB, "-o", "cluster_size=65536,extended_l2=on")
    oracle.qemu_io(p, "write -s pattern.bin 4096 2048", "write -s pattern.bin 65536 16384",
                   "write -z 69632 2048", f"write -s pattern.bin {3 * MiB + 10240} 4096")
    # an external data file: L2 entries give offsets in datafile.data
    p = root / "datafile.qcow2"
    oracle.run(qimg, "create", "-q", "-f", "qcow2", "-o", "data_file=datafile.data", p,
               str(2 * MiB), cwd=root)
    oracle.qemu_io(p, "write -s pattern.bin 70000 5000")
    out["datafile.qcow2"] = (p, "qcow2")
    # a backing chain: the overlay's zero cluster hides base data, the rest shows through
    base = create("base.qcow2", "qcow2", 4 * MiB, "-o", "cluster_size=65536")
    oracle.qemu_io(base, "write -s pattern.bin 0 262144", "write -s pattern.bin 1048576 65536")
    top = root / "top.qcow2"
    oracle.run(qimg, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top,
               cwd=root)
    oracle.qemu_io(top, "write -s pattern.bin 65536 4096", "write -z 131072 65536",
                   "write -s pattern.bin 2097152 65536")
    out["top.qcow2"] = (top, "qcow2")
    # a raw source for the converted formats: compressible, random and empty clusters
    raw = root / "source.raw"
    _raw_source(raw, 3 * MiB, [(0, _compressible(70000, 1)), (262144, rnd.randbytes(65536)),
                               (1048576 + 512, _compressible(5000, 2)),
                               (3 * MiB - 4096, rnd.randbytes(4096))])
    out["source.raw"] = (raw, "raw")
    for name, fmt, opts in (("compressed.qcow2", "qcow2", ["-c"]), ("conv.qcow", "qcow", []),
                            ("conv.vdi", "vdi", []), ("conv.vhdx", "vhdx", []),
                            ("sparse.vmdk", "vmdk", []),
                            ("stream.vmdk", "vmdk", ["-o", "subformat=streamOptimized"])):
        p = root / name
        oracle.run(qimg, "convert", "-q", "-f", "raw", "-O", fmt, *opts, raw, p)
        out[name] = (p, fmt)
    # VMDK monolithicFlat and twoGbMaxExtentSparse (data on both sides of 2 GiB)
    p = create("flat.vmdk", "vmdk", 3 * MiB, "-o", "subformat=monolithicFlat")
    oracle.qemu_io(p, "write -s pattern.bin 512 70000", fmt="vmdk")
    p = create("split.vmdk", "vmdk", 2048 * MiB + 4 * MiB, "-o", "subformat=twoGbMaxExtentSparse")
    oracle.qemu_io(p, "write -s pattern.bin 0 4096",
                   f"write -s pattern.bin {2048 * MiB - 4096} 8192",
                   f"write -s pattern.bin {2048 * MiB + 4 * MiB - 512} 512", fmt="vmdk")
    # VDI with a written and a zero-written block; VHD dynamic and fixed
    p = create("dyn.vdi", "vdi", 3 * MiB + 512)
    oracle.qemu_io(p, "write -s pattern.bin 1040000 20000", "write -z 2097152 1048576", fmt="vdi")
    p = create("dyn.vhd", "vpc", 5 * MiB)
    oracle.qemu_io(p, "write -s pattern.bin 100000 9000", "write -s pattern.bin 4194304 512",
                   fmt="vpc")
    p = create("fixed.vhd", "vpc", 3 * MiB, "-o", "subformat=fixed")
    oracle.qemu_io(p, "write -s pattern.bin 4096 8192", fmt="vpc")
    return out


# --------------------------------------------------------------------------- the checks
def _qemu_kind(entry: dict) -> str:
    if not entry["present"]:
        return "unallocated"
    if entry["data"]:
        return "data" if "offset" in entry else "compressed"
    return "zero"


def _offsets(entry: dict) -> list[int]:
    s, n = entry["start"], entry["length"]
    return sorted({s, s + n // 2, s + n - 1})


def _guest_bytes(img, g: int, n: int) -> bytes:
    with img.open_guest() as r:
        r.seek(g)
        return r.read(n)


def _check_against_extents(img, g: int, last: Step) -> None:
    """The last Step agrees with the image's resolved extent table."""
    t = img.extent_table()
    i = int(np.searchsorted(t.guest, np.uint64(g), side="right")) - 1
    assert KINDS[int(t.kind[i])] == last.kind, (g, last)
    assert int(t.depth[i]) == last.depth, (g, last)
    if last.kind == "data":
        assert int(t.host[i]) + g - int(t.guest[i]) == last.host_offset, (g, last)
        assert str(t.files[int(t.file[i])].path) == last.file, (g, last)


def _check_image(path: Path, fmt: str | None, qemu: bool = True) -> int:
    """Every probed offset of one image; returns how many offsets were checked."""
    qmap = oracle.qemu_map(path, fmt)
    seen = 0
    with imgscope.open(path, fmt) as img:
        probes = [(e, g) for e in qmap[:MAX_RANGES] for g in _offsets(e)]
        last_entry = qmap[-1]
        probes.append((last_entry, img.virtual_size - 1))
        for entry, g in probes:
            steps = translate(img, g)
            last = steps[-1]
            assert all(isinstance(s, Step) for s in steps)
            assert last.kind and not any(s.kind for s in steps[:-1]), steps
            assert last.guest_offset == g
            assert last.raw, steps
            assert last.raw == _guest_bytes(img, g, len(last.raw)), (path.name, g, steps)
            _check_against_extents(img, g, last)
            if qemu:
                assert last.kind == _qemu_kind(entry), (path.name, g, entry, steps)
                assert last.depth == entry["depth"], (path.name, g, entry, steps)
                if entry["data"] and "offset" in entry:
                    assert last.host_offset == entry["offset"] + g - entry["start"], \
                        (path.name, g, entry, steps)
            seen += 1
    return seen


QEMU_MADE = ["q4k.qcow2", "extl2.qcow2", "top.qcow2", "base.qcow2", "compressed.qcow2",
             "datafile.qcow2",
             "source.raw", "conv.qcow", "conv.vdi", "dyn.vdi", "dyn.vhd", "fixed.vhd",
             "sparse.vmdk", "stream.vmdk", "flat.vmdk", "split.vmdk"]


@pytest.mark.parametrize("name", QEMU_MADE)
def test_qemu_made_images_agree_with_qemu_map(images, name):
    path, fmt = images[name]
    assert _check_image(path, fmt) >= 4


def test_vhdx_agrees_with_extents_and_reader(images):
    # qemu-img map reports a VHDX as one data run without offsets: the extent table
    # (itself held against qemu-img convert elsewhere) is the oracle for host offsets
    path, fmt = images["conv.vhdx"]
    assert _check_image(path, fmt, qemu=False) >= 4


@pytest.mark.parametrize("name", ["demo.qcow2", "chain-top.qcow2", "compressed.qcow2",
                                  "stream.vmdk", "sparse.vmdk", "sparse.vdi", "sparse.vhd",
                                  "sparse.qcow", "sparse.raw", "gpt-disk.qcow2"])
def test_sample_images_agree_with_qemu_map(name):
    assert _check_image(SAMPLES / name, None) >= 4


def test_sample_vhdx():
    assert _check_image(SAMPLES / "sparse.vhdx", None, qemu=False) >= 4


def test_the_steps_each_format_takes(images):
    """Titles name the structures of the format, in order, with the entry numbers."""
    root = images["q4k.qcow2"][0].parent

    def titles(name, g, fmt=None):
        with imgscope.open(root / name, fmt) as img:
            return [s.title for s in translate(img, g)]

    assert titles("q4k.qcow2", 1048576 + 10) == ["L1 entry 0", "L2 entry 256", "guest data"]
    assert titles("compressed.qcow2", 10) == ["L1 entry 0", "L2 entry 0", "compressed data",
                                              "guest data (decompressed)"]
    assert titles("top.qcow2", 0) == ["L1 entry 0", "L2 entry 0", "backing file base.qcow2",
                                      "L1 entry 0", "L2 entry 0", "guest data"]
    assert titles("top.qcow2", 131072)[-1] == "guest data (zeros)"
    assert titles("split.vmdk", 2048 * MiB + 10) == [
        "extent line 1", "grain directory entry 0", "grain table entry 0", "guest data"]
    assert titles("stream.vmdk", 0) == ["extent line 0", "grain directory entry 0",
                                        "grain table entry 0", "grain record header",
                                        "compressed data", "guest data (decompressed)"]
    assert titles("flat.vmdk", 600) == ["extent line 0", "guest data"]
    assert titles("dyn.vdi", 1040000) == ["block map entry 0", "guest data"]
    assert titles("dyn.vhd", 100000) == ["BAT entry 0", "sector bitmap bit 195", "guest data"]
    assert titles("fixed.vhd", 5000, "vpc") == ["footer diskType", "guest data"]
    assert titles("conv.vhdx", 0) == ["BAT entry 0", "guest data"]
    assert titles("conv.qcow", 0) == ["L1 entry 0", "L2 entry 0", "guest data"]
    assert titles("source.raw", 0) == ["guest data"]
    with imgscope.open(root / "datafile.qcow2") as img:
        last = translate(img, 70000)[-1]
        assert Path(last.file).name == "datafile.data" and last.host_offset == 70000
    ext = titles("extl2.qcow2", 69632 + 100)
    assert ext[:2] == ["L1 entry 0", "L2 entry 1"] and ext[-1] == "guest data (zeros)"


def test_steps_carry_the_bytes_at_their_offsets(images):
    """Every Step with a host offset shows the bytes of its file at that offset."""
    root = images["q4k.qcow2"][0].parent
    for name in ("q4k.qcow2", "extl2.qcow2", "top.qcow2", "split.vmdk", "stream.vmdk",
                 "dyn.vdi", "dyn.vhd", "conv.vhdx", "conv.qcow"):
        with imgscope.open(root / name) as img:
            for g in (0, 4096 + 100, 1048576, img.virtual_size - 1):
                for s in translate(img, g):
                    if s.host_offset is None or not s.raw or s.structure == "decompressed cluster":
                        continue
                    with open(s.file, "rb") as f:
                        f.seek(s.host_offset)
                        assert f.read(len(s.raw)) == s.raw, (name, g, s)


def test_extended_l2_entry_shows_the_subcluster_bits(images):
    path = images["extl2.qcow2"][0]
    with imgscope.open(path) as img:
        cs = img.cluster_size
        sc = cs // 32
        l2 = translate(img, 65536 + 2 * sc + 7)[1]
        assert len(l2.raw) == 16 and set(l2.value) == {"entry", "bitmap"}
        bitmap = l2.value["bitmap"]
        # subclusters 0-7 written, then subcluster 2 zeroed: its allocation bit is cleared
        assert [bitmap >> k & 1 for k in range(9)] == [1, 1, 0, 1, 1, 1, 1, 1, 0]
        assert bitmap >> (32 + 2) & 1 == 1 and translate(img, 65536 + 2 * sc)[-1].kind == "zero"
        assert "subcluster 2 of 32" in l2.note
        assert int.from_bytes(l2.raw[8:], "big") == bitmap


def test_internal_snapshots_walk_their_own_l1_table(tmp_path):
    """A snapshot view translates through the snapshot's L1 table; the bytes shown are
    what qemu-img convert -l snapshot.name=... gives."""
    path = SAMPLES / "demo.qcow2"
    with imgscope.open(path) as img:
        for snap in img.snapshots:
            view = img.snapshot(snap["name"])
            want = oracle.qemu_raw(path, tmp_path / "s.raw", snapshot=snap["name"]).read_bytes()
            offsets = _run_starts(view, 60)
            for g in offsets:
                steps = translate(view, g)
                assert steps[0].structure == f"snapshot {snap['name']!r} L1 table"
                assert steps[0].host_offset == snap["l1_table_offset"] + 8 * (g >> 29)
                assert steps[-1].raw == want[g:g + len(steps[-1].raw)], (snap["name"], g)
                _check_against_extents(view, g, steps[-1])
            assert len(offsets) >= 4


def test_guest_offset_outside_the_disk_is_an_image_error():
    with imgscope.open(SAMPLES / "demo.qcow2") as img:
        for g in (-1, img.virtual_size, 1 << 64):
            with pytest.raises(ImageError):
                translate(img, g)


# --------------------------------------------------------------------------- damaged input
def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_l2_entry_poked_beyond_eof(images, tmp_path):
    src = images["q4k.qcow2"][0]
    bad = tmp_path / "bad.qcow2"
    shutil.copy(src, bad)
    g = 1048576 + 100
    with imgscope.open(bad) as img:
        l2 = translate(img, g)[1]
        size = img.source.size
    far = (size // 4096 + 1000) * 4096
    _poke(bad, l2.host_offset, struct.pack(">Q", (1 << 63) | far))
    with imgscope.open(bad) as img:
        steps = translate(img, g)
        last = steps[-1]
        assert last.kind == "data" and last.host_offset == far + 100
        assert "beyond the end of the file" in last.note
        assert last.raw == bytes(len(last.raw)) == _guest_bytes(img, g, len(last.raw))
        assert "cluster_beyond_eof" in set(img.findings.code)


def test_l1_entry_poked_beyond_eof(images, tmp_path):
    src = images["q4k.qcow2"][0]
    bad = tmp_path / "bad.qcow2"
    shutil.copy(src, bad)
    with imgscope.open(bad) as img:
        l1 = translate(img, 0)[0]
        size = img.source.size
    _poke(bad, l1.host_offset, struct.pack(">Q", (1 << 63) | (size // 4096 + 50) * 4096))
    with imgscope.open(bad) as img:
        steps = translate(img, 5)
        assert "beyond the end of the file" in steps[0].note
        assert steps[-1].kind == "unallocated" and steps[-1].raw == bytes(len(steps[-1].raw))
        assert steps[-1].raw == _guest_bytes(img, 5, len(steps[-1].raw))


def test_stream_record_with_a_huge_length(images, tmp_path):
    bad = tmp_path / "bad.vmdk"
    shutil.copy(images["stream.vmdk"][0], bad)
    with imgscope.open(bad) as img:
        rec = next(s for s in translate(img, 0) if s.title == "grain record header")
    _poke(bad, rec.host_offset + 8, struct.pack("<I", 0xFFFFFFF0))
    with imgscope.open(bad) as img:
        steps = translate(img, 0)
        assert steps[-1].kind == "compressed" and "not read" in steps[-1].note
        assert steps[-2].value == {"lba": 0, "size": 0xFFFFFFF0}


MANIFEST = json.loads((SAMPLES / "corrupt" / "MANIFEST.json").read_text())
BEYOND = [n for n in MANIFEST if "beyond_eof" in n]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corrupt_samples_translate_without_exceptions(name):
    """Every run start of every damaged sample translates; the bytes shown are the reader's;
    where an entry was poked beyond the end of the file, the walk visiting it says so."""
    path = SAMPLES / "corrupt" / name
    poked = {p.get("offset") for p in MANIFEST[name]["pokes"]} - {None}
    try:
        img = imgscope.open(path, MANIFEST[name]["format"])
    except ImageError:
        return                          # refused at open: nothing to translate
    with img:
        t = img.extent_table()
        starts = np.unique(np.concatenate([t.guest[:200], [img.virtual_size - 1]]))
        said_beyond = False
        for g in starts.tolist():
            steps = translate(img, int(g))
            last = steps[-1]
            assert last.kind
            visited = any(s.host_offset in poked for s in steps)
            if visited and any("beyond the end" in s.note for s in steps):
                said_beyond = True
            try:
                want = _guest_bytes(img, int(g), len(last.raw))
            except ImageError:
                continue
            if last.raw:
                assert last.raw == want, (name, g, steps)
        if name in BEYOND:
            assert said_beyond, name


# --------------------------------------------------------------------------- images qemu-img cannot make
@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, images) -> dict[str, Path]:
    """Differencing VDI / VHD built from the schemas here, and the fixture scripts' images
    (VHDX differencing and 4 KiB sectors, COWD, seSparse, VMware streams, cow files)."""
    import subprocess
    import sys
    from test_vdi import _make_diff
    from test_vhd import _build_child
    root = tmp_path_factory.mktemp("translate_fixtures")
    out = {}
    runs = []
    for script in ("make_vhdx_fixtures.py", "make_vmdk_fixtures.py", "make_cow_fixtures.py"):
        d = root / script.split("_")[1]
        d.mkdir()
        runs.append((d, subprocess.Popen([sys.executable, str(SAMPLES / script), str(d)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    for d, proc in runs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode(errors="replace")
        for raw in d.glob("*.expected.raw"):
            stem = raw.name[:-len(".expected.raw")]
            image = next((p for p in d.glob(stem + ".*") if not p.name.endswith(".raw")), None)
            if image is not None:
                out[f"{d.name}/{image.name}"] = image
    # VDI: a child whose free blocks show the parent
    pattern = root / "p.bin"
    pattern.write_bytes(random.Random(5).randbytes(2 * MiB))
    parent, child = root / "parent.vdi", root / "child.vdi"
    for p in (parent, child):
        oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "vdi", p, str(3 * MiB))
    oracle.qemu_io(parent, f"write -s p.bin 0 {2 * MiB}", fmt="vdi")
    oracle.qemu_io(child, f"write -s p.bin {MiB + 100} 300", fmt="vdi")
    _make_diff(parent, child)
    out["vdi/child.vdi"] = child
    # VHD: a differencing child whose sector bitmap picks child or parent per sector
    vparent = root / "vparent.vhd"
    shutil.copy(images["dyn.vhd"][0], vparent)
    rng = random.Random(3)
    _build_child(vparent, root / "vchild.vhd", {s: rng.randbytes(512) for s in (0, 1, 7, 200)},
                 ".\\vparent.vhd")
    out["vhd/vchild.vhd"] = root / "vchild.vhd"
    return out


def _run_starts(img, limit: int = 300) -> list[int]:
    t = img.extent_table()
    g = np.concatenate([t.guest, t.guest + t.length // np.uint64(2),
                        t.guest + t.length - np.uint64(1)])
    return np.unique(g)[:limit].tolist()


def test_fixture_images_agree_with_their_expected_bytes(fixtures):
    """Every run of every fixture: the bytes shown are the expected guest bytes (the
    fixture scripts' own `.expected.raw`) and the reader's; kinds and host offsets are
    the extent table's."""
    checked = {}
    for name, path in sorted(fixtures.items()):
        expected = path.parent / (path.name.rsplit(".", 1)[0] + ".expected.raw")
        want = expected.read_bytes() if expected.exists() else None
        with imgscope.open(path) as img:
            for g in _run_starts(img):
                steps = translate(img, g)
                last = steps[-1]
                _check_against_extents(img, g, last)
                assert last.raw == _guest_bytes(img, g, len(last.raw)), (name, g, steps)
                if want is not None:
                    assert last.raw == want[g:g + len(last.raw)], (name, g, steps)
                checked[name] = checked.get(name, 0) + 1
    assert len(checked) >= 20, sorted(checked)


def test_differencing_walks_decide_per_sector(fixtures):
    with imgscope.open(fixtures["vhd/vchild.vhd"]) as img:
        here, parent = translate(img, 7 * 512 + 3), translate(img, 8 * 512)
        bit = next(s for s in here if s.title.startswith("sector bitmap bit"))
        assert bit.value == 1 and here[-1].depth == 0 and here[-1].kind == "data"
        bit = next(s for s in parent if s.title.startswith("sector bitmap bit"))
        assert bit.value == 0 and parent[-1].depth == 1
        assert any(s.title == "backing file vparent.vhd" for s in parent)
    with imgscope.open(fixtures["vdi/child.vdi"]) as img:
        free = translate(img, 100)
        assert "free block" in free[0].note and free[-1].depth == 1 and free[-1].kind == "data"
        own = translate(img, MiB + 150)
        assert own[-1].depth == 0 and own[-1].kind == "data"
    child = next(p for n, p in fixtures.items() if n == "vhdx/child.vhdx")
    with imgscope.open(child) as img:
        titles = {s.title.split(" ")[0] + " " + s.title.split(" ")[1]
                  for g in _run_starts(img) for s in translate(img, g)}
        assert {"BAT entry", "sector bitmap", "backing file"} <= titles


@pytest.mark.parametrize("name", ["demo.qcow2", "stream.vmdk", "sparse.vmdk", "sparse.vdi",
                                  "sparse.vhd", "sparse.vhdx", "sparse.qcow", "compressed.qcow2"])
def test_mutated_images_give_steps_not_exceptions(name, tmp_path):
    """Bytes of the metadata flipped at random (seeded): opening may fail with an
    ImageError; once open, every offset translates to Steps, and the bytes shown are
    the reader's wherever the reader can read."""
    data = (SAMPLES / name).read_bytes()
    rnd = random.Random(name)
    meta_end = min(len(data), 1 << 16) if not name.endswith("vhdx") else 4 << 20
    for trial in range(12):
        buf = bytearray(data)
        for _ in range(rnd.choice((1, 4, 16))):
            at = rnd.randrange(meta_end)
            buf[at] = rnd.randrange(256)
        path = tmp_path / f"m{trial}{Path(name).suffix}"
        path.write_bytes(bytes(buf))
        try:
            img = imgscope.open(path)
        except ImageError:
            continue
        with img:
            size = img.virtual_size
            offsets = {0, size // 3, size // 2, size - 1} if size else set()
            try:
                offsets |= set(_run_starts(img, 40))
            except ImageError:
                pass
            for g in sorted(o for o in offsets if 0 <= o < size):
                steps = translate(img, g)
                assert steps and steps[-1].kind, (trial, g)
                try:
                    want = _guest_bytes(img, g, len(steps[-1].raw))
                except ImageError:
                    continue
                if steps[-1].raw and steps[-1].kind != "encrypted":
                    assert steps[-1].raw == want, (name, trial, g, steps)
