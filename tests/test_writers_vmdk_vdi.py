"""VMDK and VDI writers held against qemu-img 7.2.

Two sources: a sparse raw file of 2 GiB + 1 MiB + 1536 bytes (not a whole number
of grains or blocks) with random and repetitive data, holes, an allocated run of
zeros and data across the 2 GiB split boundary; and a qcow2 made with
``qemu-img convert -c`` (compressed clusters).  Every subformat and option is
written by imgscope's writer and by ``qemu-img convert -O FMT -o same-options``;
the oracle: ``qemu-img check`` clean, ``qemu-img compare`` identical, qemu-img info
(create type, virtual size) and the descriptor / headers equal to qemu's image,
actual size within 10% of qemu's, and imgscope re-opens the output with no findings
and a clean check.  streamOptimized is checked to be VMware's layout (GD_AT_END,
footer, GT markers after their grains), which qemu's own writer does not produce.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import pytest

import imgscope
from imgscope.conversion.pipeline import convert
from imgscope.conversion.writers import writer_class
from imgscope.errors import ConvertError
from imgscope.model import KIND_COMPRESSED, KIND_DATA
from imgscope.schemas import vdi as S
from imgscope.schemas import vmdk as V

import checks
import oracle

MiB = oracle.MiB
GiB = 1024 * MiB
RAW_SIZE = 2 * GiB + MiB + 1536
QCOW_SIZE = 24 * MiB + 512

# (offset, length, kind) of the raw source's data; kinds: random, text, zeros (allocated)
RAW_PIECES = [(100, 3 * MiB, "random"), (5 * MiB + 7, 2 * MiB, "text"),
              (10 * MiB, MiB, "zeros"), (2 * GiB - 100 * 1024, 300 * 1024, "random"),
              (RAW_SIZE - 1000, 1000, "random")]

VMDK_CASES = {
    "sparse": {},
    "sparse-zeroed-lsilogic": {"zeroed_grain": "on", "adapter_type": "lsilogic"},
    "flat-buslogic": {"subformat": "monolithicFlat", "adapter_type": "buslogic"},
    "split-sparse-hw7": {"subformat": "twoGbMaxExtentSparse", "hwversion": "7"},
    "split-flat-esx": {"subformat": "twoGbMaxExtentFlat", "adapter_type": "legacyESX",
                       "toolsversion": "10240"},
    "stream": {"subformat": "streamOptimized"},
    "stream-hw11-lsilogic": {"subformat": "streamOptimized", "hwversion": "11",
                             "adapter_type": "lsilogic"},
    "compat6": {"compat6": "on"},
}
VDI_CASES = {"dynamic": {}, "static": {"static": "on"}}
CASES = [("vmdk", k) for k in VMDK_CASES] + [("vdi", k) for k in VDI_CASES]


def _piece(kind: str, n: int, seed: int) -> bytes:
    if kind == "random":
        return random.Random(seed).randbytes(n)
    if kind == "zeros":
        return bytes(n)
    line = b"imgscope writes vmdk and vdi images %d\n"
    return b"".join(line % i for i in range(n // 30 + 1))[:n]


# --------------------------------------------------------------------------- driving a writer

#: cases converted with -c (compression: streamOptimized only, as in qemu-img)
COMPRESSED = {"stream-hw11-lsilogic"}


def drive(src: Path, dst: Path, fmt: str, options: dict, compress: bool = False) -> Path:
    """The conversion pipeline, as `imgscope convert` runs it."""
    return convert(src, dst, format=fmt, options=dict(options), compress=compress)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    oracle.require_tools()
    root = tmp_path_factory.mktemp("writer_sources")
    raw = root / "pattern.raw"
    with open(raw, "wb") as f:
        f.truncate(RAW_SIZE)
        for i, (off, n, kind) in enumerate(RAW_PIECES):
            f.seek(off)
            f.write(_piece(kind, n, i))
    plain = root / "forqcow.raw"
    with open(plain, "wb") as f:
        f.truncate(QCOW_SIZE)
        for i, (off, n, kind) in enumerate([(0, 5 * MiB, "text"), (8 * MiB + 512, 2 * MiB, "random"),
                                            (QCOW_SIZE - 70000, 70000, "text")]):
            f.seek(off)
            f.write(_piece(kind, n, 10 + i))
    qcow = root / "compressed.qcow2"
    oracle.run(oracle.QEMU_IMG, "convert", "-c", "-O", "qcow2", plain, qcow)
    return {"raw": raw, "qcow2": qcow}


@pytest.fixture(scope="module")
def outputs(sources, tmp_path_factory):
    """(source, format, case) -> (imgscope's image, qemu-img's image), built on first use."""
    root = tmp_path_factory.mktemp("writer_outputs")
    made: dict = {}

    def get(src: str, fmt: str, case: str) -> tuple[Path, Path]:
        key = (src, fmt, case)
        if key not in made:
            opts = (VMDK_CASES if fmt == "vmdk" else VDI_CASES)[case]
            folder = root / f"{src}-{fmt}-{case}"
            folder.mkdir()
            mine, ref = folder / f"mine.{fmt}", folder / f"ref.{fmt}"
            drive(sources[src], mine, fmt, opts, compress=case in COMPRESSED)
            o = ",".join(f"{k}={v}" for k, v in opts.items())
            oracle.run(oracle.QEMU_IMG, "convert", *(["-c"] if case in COMPRESSED else []),
                       "-O", fmt, *(["-o", o] if o else []), sources[src], ref, cwd=folder)
            made[key] = (mine, ref)
        return made[key]
    return get


def _descriptor_text(path: Path) -> str:
    head = path.read_bytes()[:512]
    if head[:4] == V.SPARSE_MAGIC:
        h = V.sparse_header.parse(head)
        with open(path, "rb") as f:
            f.seek(h["descriptorOffset"] * 512)
            raw = f.read(h["descriptorSize"] * 512)
    else:
        raw = path.read_bytes()
    return raw.split(b"\0", 1)[0].decode()


def _without_cid(text: str, mine: str, ref: str) -> str:
    return re.sub(r"^CID=[0-9a-f]+$", "CID=", text, flags=re.M).replace(mine, "NAME").replace(ref, "NAME")


def _header(path: Path, at: int = 0) -> dict:
    with open(path, "rb") as f:
        f.seek(at)
        h = dict(V.sparse_header.parse(f.read(512)))
    return {k: v for k, v in h.items() if not k.startswith("_")}


# --------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("src", ["raw", "qcow2"])
@pytest.mark.parametrize("fmt,case", CASES)
def test_qemu_accepts_and_agrees(outputs, sources, src, fmt, case):
    """qemu-img check clean, compare identical, info as qemu's own image, size within 10%."""
    mine, ref = outputs(src, fmt, case)
    code, report = oracle.qemu_check(mine)
    assert code == 0, report
    cmp = oracle.run(oracle.QEMU_IMG, "compare", "-U", sources[src], mine, check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    mi, ri = oracle.qemu_info(mine), oracle.qemu_info(ref)
    assert mi["format"] == fmt and mi["virtual-size"] == ri["virtual-size"]
    assert mi.get("format-specific") == ri.get("format-specific") or fmt == "vmdk"
    if fmt == "vmdk":
        md, rd = mi["format-specific"]["data"], ri["format-specific"]["data"]
        assert md["create-type"] == rd["create-type"] == VMDK_CASES[case].get("subformat", "monolithicSparse")
        assert [(e["virtual-size"], Path(e["filename"]).name.replace("mine", "X"), e.get("compressed"),
                 e.get("cluster-size")) for e in md["extents"]] == \
               [(e["virtual-size"], Path(e["filename"]).name.replace("ref", "X"), e.get("compressed"),
                 e.get("cluster-size")) for e in rd["extents"]]
    assert abs(mi["actual-size"] - ri["actual-size"]) <= 0.1 * ri["actual-size"], \
        (mi["actual-size"], ri["actual-size"])


@pytest.mark.parametrize("fmt,case", [c for c in CASES if c[0] == "vmdk"])
def test_vmdk_descriptor_and_headers_as_qemu(outputs, fmt, case):
    """The descriptor is qemu-img's byte for byte but for the CID (ddb: adapter, hwversion,
    toolsversion, geometry); sparse headers equal qemu's field by field."""
    mine, ref = outputs("raw", fmt, case)
    assert _without_cid(_descriptor_text(mine), "mine", "ref") == \
        _without_cid(_descriptor_text(ref), "mine", "ref")
    opts = VMDK_CASES[case]
    with imgscope.open(mine) as img:
        ddb = {e.key: e.value for e in img.descriptor.ddb}
    assert ddb["ddb.adapterType"] == opts.get("adapter_type", "ide")
    assert ddb["ddb.virtualHWVersion"] == ("6" if "compat6" in opts else opts.get("hwversion", "4"))
    assert ddb["ddb.toolsVersion"] == opts.get("toolsversion", "2147483647")
    if opts.get("subformat") == "streamOptimized":
        return
    mine_files = sorted(p for p in mine.parent.glob("mine*") if p.read_bytes()[:4] == V.SPARSE_MAGIC) \
        if "Sparse" in opts.get("subformat", "Sparse") else []
    ref_files = sorted(p for p in ref.parent.glob("ref*") if p.read_bytes()[:4] == V.SPARSE_MAGIC) \
        if mine_files else []
    assert len(mine_files) == len(ref_files)
    for a, b in zip(mine_files, ref_files):
        assert _header(a) == _header(b), a.name
    flat = sorted(p.name for p in mine.parent.glob("mine-*"))
    assert flat == sorted(p.name.replace("ref", "mine") for p in ref.parent.glob("ref-*"))


@pytest.mark.parametrize("case", ["stream", "stream-hw11-lsilogic"])
def test_stream_is_vmware_layout(outputs, case):
    """Header GD_AT_END, version 3, flags 0x30001, footer with the real directory, GT markers
    right after the grains they map, then GD, footer and end-of-stream markers."""
    mine, _ = outputs("raw", "vmdk", case)
    h = _header(mine)
    assert (h["version"], h["flags"], h["gdOffset"], h["rgdOffset"], h["compressAlgorithm"]) == \
        (3, V.VMWARE_STREAM_FLAGS, V.GD_AT_END, 0, V.COMPRESSION_DEFLATE)
    size = mine.stat().st_size
    footer = _header(mine, size - 1024)
    assert footer["gdOffset"] != V.GD_AT_END and footer["gdOffset"] * 512 < size - 1536
    assert {**footer, "gdOffset": 0} == {**h, "gdOffset": 0}
    with imgscope.open(mine) as img:
        ext = img.extents_list[0]
        assert ext.footer is not None and ext.markers and ext.compressed
        marks = img.tables["markers"]
    kinds = marks["type"].tolist()
    assert kinds[-3:] == ["grain directory", "footer", "end of stream"]
    body = marks.iloc[:-3]
    per_gt = V.DEFAULT_GTES_PER_GT * V.DEFAULT_GRAIN_SIZE
    table_of_grain = (body["lba"] // per_gt).where(body["type"] == "grain")
    # the table each GT marker closes = the table of the grains just before it
    closes = table_of_grain.ffill()[body["type"] == "grain table"]
    assert closes.notna().all() and closes.is_monotonic_increasing and closes.is_unique
    grains = body[body["type"] == "grain"]["lba"]
    assert grains.is_monotonic_increasing and (grains % V.DEFAULT_GRAIN_SIZE == 0).all()
    assert set(body["type"]) == {"grain", "grain table"}


@pytest.mark.parametrize("fmt,case", CASES)
def test_imgscope_reopens_clean(outputs, sources, fmt, case):
    """imgscope opens what it wrote with no findings, its check is clean, and the guest
    it reads is the source's (whole guest for the qcow2 source, the data pieces for the raw)."""
    mine, _ = outputs("qcow2", fmt, case)
    with imgscope.open(mine) as img:
        assert img.findings.empty, img.findings.to_string()
        report = img.check()
        assert report.exit_code == 0 and not report.findings, report.frame.to_string()
        assert checks.guest_sha(img) == oracle.qemu_guest_sha256(sources["qcow2"])
    mine, _ = outputs("raw", fmt, case)
    with imgscope.open(mine) as img:
        assert img.findings.empty, img.findings.to_string()
        assert img.check().exit_code == 0
        assert img.virtual_size == -(-RAW_SIZE // 512) * 512
        with img.open_guest() as g:
            for i, (off, n, kind) in enumerate(RAW_PIECES):
                g.seek(off)
                assert g.read(n) == _piece(kind, n, i), (off, kind)
        variant = img.variant
    expected = VMDK_CASES.get(case, {}).get("subformat", "monolithicSparse") if fmt == "vmdk" \
        else ("static" if case == "static" else "dynamic")
    assert variant == expected


def test_sources_are_what_the_tests_need(sources):
    """The qcow2 source really has compressed clusters; the raw one holes and written zeros."""
    with imgscope.open(sources["qcow2"]) as img:
        assert (img.extent_table().kind == KIND_COMPRESSED).any()
    with imgscope.open(sources["raw"]) as img:
        t = img.extent_table()
        assert int(t.length[t.kind == KIND_DATA].sum()) < RAW_SIZE // 100


def test_vdi_static_map_and_sparse_file(outputs):
    """Static: every block preallocated in order (block k at data block k), holes where the
    guest is zero; dynamic: blocks numbered in write order, only non-zero blocks stored."""
    mine, _ = outputs("raw", "vdi", "static")
    raw = mine.read_bytes()[:S.HEADER_AREA]
    h = S.header_v1.parse(raw[S.PRE_HEADER_SIZE:])
    assert h.image_type == S.TYPE_FIXED and h.blocks_allocated == h.blocks_in_image
    with open(mine, "rb") as f:
        f.seek(h.offset_bmap)
        m = np.frombuffer(f.read(4 * h.blocks_in_image), S.MAP_DTYPE)
    assert (m == np.arange(h.blocks_in_image)).all()
    assert mine.stat().st_size == h.offset_data + h.blocks_in_image * h.block_size
    assert mine.stat().st_blocks * 512 < 16 * MiB            # the 2 GiB file stays sparse
    mine, _ = outputs("raw", "vdi", "dynamic")
    h = S.header_v1.parse(mine.read_bytes()[S.PRE_HEADER_SIZE:S.HEADER_AREA])
    with open(mine, "rb") as f:
        f.seek(h.offset_bmap)
        m = np.frombuffer(f.read(4 * h.blocks_in_image), S.MAP_DTYPE)
    used = m[m != S.BLOCK_FREE]
    assert (used == np.arange(used.size)).all() and used.size == h.blocks_allocated
    assert mine.stat().st_size == h.offset_data + used.size * h.block_size


# --------------------------------------------------------------------------- backing, zeros, options


def test_child_with_backing_and_zeroed_grains(sources, tmp_path):
    """A sparse child names its parent (parentCID = the parent's CID); write_zeros makes
    zeroed-grain entries (zeroed_grain=on) or grains left as holes (off), hiding the parent."""
    parent = tmp_path / "parent.vmdk"
    oracle.run(oracle.QEMU_IMG, "convert", "-O", "vmdk", sources["qcow2"], parent)
    expected = tmp_path / "expected.raw"
    oracle.qemu_raw(parent, expected)
    with open(expected, "r+b") as f:
        f.seek(MiB)
        f.write(bytes(2 * MiB))
    with imgscope.open(parent) as p:
        parent_cid = p.cid
    for zg in ("on", "off"):
        child = tmp_path / f"child-{zg}.vmdk"
        w = writer_class("vmdk")(child, QCOW_SIZE, {"zeroed_grain": zg}, backing="parent.vmdk",
                                 backing_format="vmdk")
        w.write_zeros(MiB, 2 * MiB)
        w.close()
        assert oracle.qemu_check(child)[0] == 0
        assert oracle.run(oracle.QEMU_IMG, "compare", "-U", expected, child, check=False).returncode == 0
        with imgscope.open(child) as img:
            assert img.findings.empty, img.findings.to_string()
            assert img.descriptor.parent_cid == parent_cid
            assert img.backing is not None
        info = oracle.qemu_info(child)
        assert info["backing-filename"] == "parent.vmdk"
        gt = V.sparse_header.parse(child.read_bytes()[:512])
        assert bool(gt["flags"] & V.FLAG_ZERO_GRAIN) == (zg == "on")
        assert child.stat().st_blocks * 512 < 512 * 1024       # no zero bytes written


@pytest.mark.parametrize("fmt,opts,message", [
    ("vmdk", {"subformat": "monolithicSparse2"}, "must be one of"),
    ("vmdk", {"adapter_type": "scsi"}, "must be one of"),
    ("vmdk", {"compat6": "on", "hwversion": "7"}, "compat6"),
    ("vmdk", {"zeroed_grain": "maybe"}, "invalid value"),
    ("vmdk", {"cluster_size": "65536"}, "does not support"),
    ("vdi", {"static": "x"}, "invalid value"),
    ("vdi", {"subformat": "static"}, "does not support"),
])
def test_bad_options_refused(tmp_path, fmt, opts, message):
    with pytest.raises(ConvertError, match=message):
        writer_class(fmt)(tmp_path / f"x.{fmt}", MiB, opts)
    assert not any(tmp_path.iterdir())


def test_refusals(tmp_path):
    """As qemu-img: no backing file for flat kinds, compression only for streamOptimized,
    no VDI larger than its block map can describe, no writes outside the disk."""
    with pytest.raises(ConvertError, match="flat"):
        writer_class("vmdk")(tmp_path / "f.vmdk", MiB, {"subformat": "monolithicFlat"},
                             backing="p.vmdk")
    w = writer_class("vmdk")(tmp_path / "s.vmdk", MiB, {})
    assert not w.supports_compression and w.compress_unit is None
    with pytest.raises(ConvertError, match="compression"):
        w.write_compressed(0, b"x", 65536)
    with pytest.raises(ConvertError, match="past the end"):
        w.write(2 * MiB, bytes(65536))
    w.abort()
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConvertError, match="blocks"):
        writer_class("vdi")(tmp_path / "big.vdi", (S.QEMU_BLOCKS_MAX + 1) * S.DEFAULT_BLOCK_SIZE, {})
    s = writer_class("vmdk")(tmp_path / "st.vmdk", MiB, {"subformat": "streamOptimized"})
    assert s.supports_compression and s.compress_unit is not None
    s.abort()
    assert not any(tmp_path.iterdir())


def test_empty_and_tiny_disks(tmp_path):
    """Disks of one sector and of a partial grain: every kind passes qemu-img check."""
    for size in (512, 70000):
        for sub in ("monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse", "monolithicFlat"):
            p = tmp_path / f"t{size}-{sub}.vmdk"
            w = writer_class("vmdk")(p, size, {"subformat": sub})
            w.write(0, b"\x5a" * min(size, w.unit))
            w.close()
            assert oracle.qemu_check(p)[0] == 0, (size, sub)
            with imgscope.open(p) as img:
                assert img.findings.empty
                with img.open_guest() as g:
                    assert g.read(min(size, w.unit)) == b"\x5a" * min(size, w.unit)
        for static in ("off", "on"):
            p = tmp_path / f"t{size}-{static}.vdi"
            w = writer_class("vdi")(p, size, {"static": static})
            w.write(0, b"\x5a" * size)
            w.close()
            assert oracle.qemu_check(p)[0] == 0
            assert os.path.getsize(p) == 1024 + S.DEFAULT_BLOCK_SIZE
