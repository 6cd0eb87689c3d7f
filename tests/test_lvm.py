"""LVM2 physical volumes read through any image format, held against lvm2's own tools.

``sample_images/make_lvm_fixtures.py`` builds PVs from imgscope's schemas with lvm2's
layout: VG ``vgfix`` with three linear LVs (one made of two non-adjacent segments),
two metadata areas (the second at the end of the PV), the current metadata copy
wrapping around the circular buffer of area 0; and a VG over two PVs (LVs on the
other PV, a two-stripe LV).  Each LV holds seeded random bytes placed by the
fixture's own extent arithmetic.

Oracles:

* lvm2's ``pvck --dump headers`` / ``--dump metadata`` read the fixture files (they
  work on plain files): every header value, the wrap and the text must agree;
* ``lvmconfig --config TEXT VG`` re-parses the text with libdevmapper's parser;
* where ``losetup`` works, lvm2 itself reads the fixture (``pvs/vgs/lvs
  --reportformat json``) and builds a real PV (pvcreate/vgcreate/lvcreate, metadata
  driven round its buffer) that imgscope must read back;
* qemu-img wraps the PVs in qcow2 / vmdk; ``image.lvm().open(lv)`` must read exactly
  the bytes written.

Damaged copies (label CRC, metadata checksum, unbalanced braces, hostile sizes, a
segment beyond the PV) must give findings or ImageErrors, in bounded time and memory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import imgscope
from imgscope.errors import ImageError, LimitExceeded, ParseError, Unsupported
from imgscope.guest.lvm import MetadataSyntaxError, parse_metadata, read_physical_volume
from imgscope.schemas import lvm2 as L

import oracle
from test_qcow2_damaged import run_isolated

MiB = oracle.MiB
_BUILDER = Path(__file__).resolve().parents[1] / "sample_images" / "make_lvm_fixtures.py"
_spec = importlib.util.spec_from_file_location("make_lvm_fixtures", _BUILDER)
fx = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fx            # dataclasses look their module up there
_spec.loader.exec_module(fx)

#: lvm2 commands never write backups/archives to /etc/lvm and see only the given device
LVM_CONFIG = "backup { backup = 0 archive = 0 }"
LVM_ENV = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")


def lvm(*args, check: bool = True) -> subprocess.CompletedProcess:
    """An lvm2 command (pvck, lvmconfig, pvs ...), text output captured."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          env=LVM_ENV, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()}")
    return proc


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    oracle.require_tools()
    missing = [t for t in ("pvck", "lvmconfig") if shutil.which(t) is None]
    assert not missing, f"lvm2 tools missing: {missing} (apt-get install lvm2)"
    return fx.build_fixtures(tmp_path_factory.mktemp("lvm"))


@pytest.fixture(scope="module")
def single(built):
    return built["lvm_pv"]


@pytest.fixture(scope="module")
def wrapped(single, tmp_path_factory) -> dict[str, Path]:
    """lvm_pv.raw as the guest disk of a qcow2 and a vmdk (qemu-img convert)."""
    d = tmp_path_factory.mktemp("lvm_wrapped")
    out = {"raw": single.path}
    for fmt in ("qcow2", "vmdk"):
        dest = d / f"lvm_pv.{fmt}"
        oracle.run(oracle.QEMU_IMG, "convert", "-f", "raw", "-O", fmt, single.path, dest)
        out[fmt] = dest
    return out


def open_pv(path, fmt="raw", **kw):
    return imgscope.open(path, fmt, **kw).lvm()


# --------------------------------------------------------------------------- pvck oracle


def pvck_headers(path) -> tuple[dict[str, str], list[str]]:
    """``pvck --dump headers``: {field: value} and the lines pvck flags (CHECK: ...)."""
    out = lvm("pvck", "--config", LVM_CONFIG, "--dump", "headers", path, check=False)
    values, checks = {}, []
    for line in (out.stdout + out.stderr).splitlines():
        line = line.strip()
        if line.startswith("CHECK:"):
            checks.append(line)
            continue
        m = re.match(r"metadata text at (\d+) crc (0x[0-9a-f]+) # vgname (\S+) seqno (\d+)", line)
        if m:
            values.setdefault("metadata_text", []).append(m.groups())
            continue
        m = re.match(r"([\w.\[\]]+) (\S+)( # .*)?$", line)
        if m and m.group(2) != "at":
            values[m.group(1)] = m.group(2)
        m = re.match(r"(mda_header_\d\.raw_locn\[0\]) at \d+ # commit( wrapped)?", line)
        if m:
            values[m.group(1) + ".wrapped"] = bool(m.group(2))
    return values, checks


def pvck_metadata(path, tmp_path) -> bytes:
    dest = tmp_path / f"pvck-{time.monotonic_ns()}.txt"
    lvm("pvck", "--config", LVM_CONFIG, "--dump", "metadata", "-f", dest, path)
    return dest.read_bytes()


def assert_matches_pvck(pv, path, tmp_path) -> None:
    """Every header value pvck prints equals imgscope's, and the current text too."""
    v, checks = pvck_headers(path)
    assert checks == [], checks
    label = pv.tables["label"].iloc[0]
    assert int(v["label_header.sector"]) == label.sector
    assert int(v["label_header.crc"], 16) == label.crc_xl == label.crc_computed
    assert int(v["label_header.offset"]) == label.offset_xl
    assert v["pv_header.pv_uuid"] == pv.pv_uuid.replace("-", "")
    assert int(v["pv_header.device_size"]) == pv.device_size
    locns = [(int(v[f"pv_header.disk_locn[{i}].offset"]), int(v[f"pv_header.disk_locn[{i}].size"]))
             for i in range(len(pv.data_areas) + len(pv.metadata_locations) + 2)]
    assert locns == pv.data_areas + [(0, 0)] + pv.metadata_locations + [(0, 0)]
    ext = pv.tables["pv_header"].iloc[0]
    assert int(v["pv_header_extension.version"]) == ext.extension_version
    assert int(v["pv_header_extension.flags"]) == ext.extension_flags
    texts = []
    for row in pv.tables["metadata_areas"].itertuples():
        k = f"mda_header_{row.index + 1}"
        assert int(v[f"{k}.start"]) == row.header_start == row.offset - pv.base_offset
        assert int(v[f"{k}.size"]) == row.header_size
        assert int(v[f"{k}.raw_locn[0].offset"]) == row.text_offset
        assert int(v[f"{k}.raw_locn[0].size"]) == row.text_size
        assert int(v[f"{k}.raw_locn[0].checksum"], 16) == row.text_checksum == row.text_checksum_computed
        assert v[f"{k}.raw_locn[0].wrapped"] == row.wrapped
        texts.append((str(row.header_start + row.text_offset), f"{row.text_checksum:#x}",
                      row.vg_name, str(row.seqno)))
    assert v["metadata_text"] == texts
    assert pvck_metadata(path, tmp_path) == pv.metadata_text.encode()


def test_fixture_headers_and_text_match_pvck(built, tmp_path):
    for name, f in built.items():
        pv = open_pv(f.path)
        assert pv.findings.empty, pv.findings.message.tolist()
        assert_matches_pvck(pv, f.path, tmp_path)
        assert pv.metadata_text.encode() + b"\0" == f.text, name


def _unlist(tree):
    """lvmconfig writes one-element lists as scalars: compare that way."""
    if isinstance(tree, dict):
        return {k: _unlist(v) for k, v in tree.items()}
    if isinstance(tree, list) and len(tree) == 1:
        return tree[0]
    return tree


def lvmconfig_tree(text: str, node: str) -> dict:
    out = lvm("lvmconfig", "--config", text, node).stdout
    tree = parse_metadata(out)
    return tree.get(node, tree)


def test_parsed_metadata_equals_fixture_and_lvmconfig(built):
    for f in built.values():
        pv = open_pv(f.path)
        assert pv.metadata == f.tree          # what the fixture wrote, globals included
        assert _unlist(lvmconfig_tree(pv.metadata_text, f.vg_name)) == _unlist(f.tree[f.vg_name])


def test_parser_against_lvmconfig_on_escapes_comments_and_mixed_lists():
    text = ('a { b = "x\\"y\\\\z"   # a comment with "quotes" and { braces\n'
            'c = [1, "q", 2.5, -7] d=-3 e = "" f = [] g="#not a comment"\n'
            'h { i = 9223372036854775807 j = "multi\nline" } }')
    ours = parse_metadata(text)
    assert ours == {"a": {"b": 'x"y\\z', "c": [1, "q", 2.5, -7], "d": -3, "e": "", "f": [],
                          "g": "#not a comment", "h": {"i": 2 ** 63 - 1, "j": "multi\nline"}}}
    assert _unlist(lvmconfig_tree(text, "a")) == _unlist(ours["a"])
    assert L.format_value(ours["a"]["b"]) == '"x\\"y\\\\z"'


# --------------------------------------------------------------------------- reading LVs


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk"])
def test_lv_bytes_through_every_format(single, wrapped, fmt):
    # a bare PV is probed as "lvm2", which has no driver: it is opened as the raw disk it is
    img = imgscope.open(wrapped[fmt], "raw" if fmt == "raw" else None)
    assert img.format == fmt
    pv = img.lvm()
    assert pv is img.lvm()                      # cached by the image
    assert pv.metadata == single.tree
    assert pv.logical_volumes() == list(single.lv_data)
    for lv, data in single.lv_data.items():
        reader = pv.open(lv)
        assert reader.size == len(data)
        assert sha(reader.read()) == sha(data), (fmt, lv)
        # a read across the boundary of data's two segments (LE 1 | LE 2)
        if lv == "data":
            reader.seek(2 * fx.EXTENT - 100)
            assert reader.read(200) == data[2 * fx.EXTENT - 100:2 * fx.EXTENT + 100]


def test_tables_follow_the_fixture_layout(single):
    pv = open_pv(single.path)
    lay = single.layout
    t = pv.tables
    assert set(t) == {"label", "pv_header", "data_areas", "metadata_areas", "volume_group",
                      "physical_volumes", "logical_volumes", "segments"}
    assert t["pv_header"].pv_uuid[0] == L.format_uuid(single.pv_uuid)
    assert t["pv_header"].in_use[0]
    assert t["data_areas"][["offset", "size"]].values.tolist() == [[lay.pe_start, 0]]
    mda = t["metadata_areas"]
    assert mda[["offset", "size"]].values.tolist() == [list(a) for a in lay.metadata_areas]
    assert [(s.offset, s.size, s.checksum, s.wrapped) for s in single.slots] == \
        list(zip(mda.text_offset, mda.text_size, mda.text_checksum, mda.wrapped))
    assert mda.wrapped[0] and mda.text_checksum_ok.all() and mda.used.sum() == 1
    assert (mda.seqno == single.copies).all()
    vg = t["volume_group"].iloc[0]
    assert (vg["name"], vg.seqno, vg.extent_bytes, vg.lv_count) == \
        ("vgfix", single.copies, fx.EXTENT, len(single.lv_data))
    pvs = t["physical_volumes"]
    assert pvs[["name", "pe_start", "pe_count", "dev_size"]].values.tolist() == \
        [["pv0", lay.pe_start // 512, lay.pe_count, lay.device_size // 512]]
    lvs = t["logical_volumes"].set_index("name")
    assert {n: int(lvs.loc[n, "size"]) for n in single.lv_data} == \
        {n: len(d) for n, d in single.lv_data.items()}
    segs = t["segments"]
    want = []
    for lv_name, lv in single.tree["vgfix"]["logical_volumes"].items():
        for k in range(1, lv["segment_count"] + 1):
            s = lv[f"segment{k}"]
            pe = s["stripes"][1]
            want.append([lv_name, k, s["start_extent"], s["extent_count"], "pv0", pe,
                         lay.pe_start + pe * fx.EXTENT, s["extent_count"] * fx.EXTENT])
    got = segs[["lv", "segment", "start_extent", "extent_count", "pv", "pv_start_extent",
                "offset", "length"]].astype(object).values.tolist()
    assert got == want
    assert len(want) == 4 and sum(r[0] == "data" for r in want) == 2
    fields = pv.fields
    crc = fields[(fields.structure == "label_header") & (fields.field == "crc_xl")]
    assert crc.offset.tolist() == [512 + 16] and crc.value.tolist() == [t["label"].crc_xl[0]]
    assert (fields.structure == "mda_header[1].raw_locn[0]").sum() == 4
    assert all(fields.description.str.len() > 0)


def test_to_dict_is_json(single):
    pv = open_pv(single.path)
    d = json.loads(json.dumps(pv.to_dict()))
    assert d["metadata"] == single.tree
    assert d["vg_name"] == "vgfix" and d["pv_uuid"] == L.format_uuid(single.pv_uuid)
    assert [r["name"] for r in d["tables"]["logical_volumes"]] == list(single.lv_data)
    assert d["tables"]["metadata_areas"][0]["wrapped"] is True
    assert d["findings"] == []


def test_lvs_on_other_pvs_and_striped_lvs(built):
    for i in (0, 1):
        f = built[f"lvm_two_pvs_{i}"]
        pv = open_pv(f.path)
        assert pv.pv_name == f"pv{i}"
        for lv, data in f.lv_data.items():
            assert sha(pv.open(lv).read()) == sha(data)
        other = "remote" if i == 0 else "local"
        with pytest.raises(ImageError, match=f"lies on pv{1 - i} .*not on this PV") as exc:
            pv.open(other)
        assert not isinstance(exc.value, Unsupported) and exc.value.path == str(f.path)
        with pytest.raises(ImageError, match="lies on pv"):
            pv.open("spread")
        with pytest.raises(Unsupported, match="'striped' .*2 stripes"):
            pv.open("striped")
        with pytest.raises(ImageError, match="no logical volume 'nope'"):
            pv.open("nope")
        segs = pv.tables["segments"]
        assert segs[segs.lv == "striped"].stripe.tolist() == [0, 1]


def test_unsupported_segment_type_is_named(single, tmp_path):
    vg = json.loads(json.dumps(single.tree["vgfix"]))
    vg["logical_volumes"]["swap"]["segment1"]["type"] = "raid1"
    path = _pv_with_text(single, tmp_path / "raid.raw", fx.metadata_text("vgfix", vg, "raid"))
    pv = open_pv(path)
    with pytest.raises(Unsupported, match="'raid1'"):
        pv.open("swap")
    assert sha(pv.open("root").read()) == sha(single.lv_data["root"])


# --------------------------------------------------------------------------- partitions


def _mbr(entries: list[tuple[int, int, int]]) -> bytes:
    """An MBR: (type, first sector, sector count) per primary partition."""
    mbr = bytearray(512)
    for i, (ptype, first, count) in enumerate(entries):
        struct.pack_into("<B3sB3sII", mbr, 446 + 16 * i, 0, b"\xfe\xff\xff", ptype,
                         b"\xfe\xff\xff", first, count)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


PV_START = 3 * MiB


@pytest.fixture(scope="module")
def partitioned(single, tmp_path_factory) -> Path:
    """qcow2 disk: MBR, partition 1 (0x83, random bytes), partition 2 (0x8E) = lvm_pv."""
    d = tmp_path_factory.mktemp("lvm_part")
    pv_bytes = single.path.read_bytes()
    raw = d / "disk.raw"
    first = _mbr([(0x83, 2048, 2048), (L.MBR_TYPE_LVM, PV_START // 512, len(pv_bytes) // 512)])
    with open(raw, "wb") as f:
        f.truncate(PV_START + len(pv_bytes) + MiB)
        f.write(first)
        f.seek(MiB)
        f.write(np.random.default_rng(5).integers(0, 256, MiB, dtype=np.uint8).tobytes())
        f.seek(PV_START)
        f.write(pv_bytes)
    out = d / "disk.qcow2"
    oracle.run(oracle.QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", raw, out)
    return out


def _check_partition_pv(pv, single) -> None:
    assert pv.base_offset == PV_START and pv.partition == 2
    for lv, data in single.lv_data.items():
        assert sha(pv.open(lv).read()) == sha(data)
    assert pv.tables["label"].offset[0] == PV_START + 512
    segs = pv.tables["segments"]
    root = segs[segs.lv == "root"].iloc[0]
    assert root.offset == PV_START + single.layout.pe_start
    crc = pv.fields[pv.fields.field == "crc_xl"].offset.tolist()
    assert crc == [PV_START + 512 + 16]


def test_pv_in_an_mbr_partition(single, partitioned):
    """image.lvm() finds the PV in partition 2 through the partition table, and the CLI
    prints the same volume group."""
    img = imgscope.open(partitioned)
    assert img.partitions().number.tolist() == [1, 2]
    _check_partition_pv(img.lvm(), single)
    out = subprocess.run([sys.executable, "-m", "imgscope", "lvm", "--output=json",
                          str(partitioned)], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == json.loads(json.dumps(img.lvm().to_dict(), default=str))
    table = subprocess.run([sys.executable, "-m", "imgscope", "lvm", str(partitioned)],
                           capture_output=True, text=True, check=True).stdout
    for lv in single.lv_data:
        assert lv in table


def test_disk_without_pv(tmp_path):
    path = tmp_path / "empty.qcow2"
    oracle.run(oracle.QEMU_IMG, "create", "-f", "qcow2", path, "4M")
    with pytest.raises(ImageError, match="no LVM2 physical volume") as exc:
        imgscope.open(path).lvm()
    assert exc.value.path == str(path)
    assert read_physical_volume(imgscope.open(path).open_guest()) is None


# --------------------------------------------------------------------------- damage


def _copy(single, dest: Path, pokes: dict[int, bytes] = {}) -> Path:
    data = bytearray(single.path.read_bytes())
    for off, value in pokes.items():
        data[off:off + len(value)] = value
    dest.write_bytes(data)
    return dest


def _pv_with_text(single, dest: Path, text: bytes, *, layout=None) -> Path:
    """The single fixture with `text` as the only metadata copy in every metadata area
    (checksums correct), its data area unchanged; with another `layout` a PV of that
    layout without LV data."""
    if layout is None:
        disk = bytearray(single.path.read_bytes())
        for start, size in single.layout.metadata_areas:
            disk[start:start + size] = bytes(size)
            fx.write_area(disk, start, size, [text])
    else:
        disk, _ = fx.build_pv_bytes(layout, single.pv_uuid, [text])
    dest.write_bytes(disk)
    return dest


def _text_offset(single, area: int, pos: int) -> int:
    """Where byte `pos` of the current text lies on the PV in metadata area `area`."""
    start, size = single.layout.metadata_areas[area]
    slot = single.slots[area]
    first = size - slot.offset
    return start + slot.offset + pos if pos < first else start + 512 + pos - first


def codes(pv) -> set[str]:
    return set(pv.findings.code)


def test_bad_label_crc(single, tmp_path):
    path = _copy(single, tmp_path / "crc.raw", {512 + 32 + 32: b"\x01"})  # device_size_xl
    img = imgscope.open(path, "raw")
    pv = img.lvm()
    assert {"label_crc_mismatch", "pv_size_mismatch"} <= codes(pv)
    f = pv.findings.set_index("code").loc["label_crc_mismatch"]
    assert f.guest_offset == 512 + 16 and f.severity == "error"
    assert "label_crc_mismatch" in set(img.findings.code)         # forwarded to the image
    assert sha(pv.open("root").read()) == sha(single.lv_data["root"])
    _, checks = pvck_headers(path)
    assert any("label_header.crc" in c for c in checks)             # pvck sees it too
    with pytest.raises(ParseError, match="label checksum"):
        open_pv(path, strict=True)


def test_metadata_checksum_mismatch(single, tmp_path):
    pos = single.text.index(b"description = ") + 20
    area0 = _text_offset(single, 0, pos)
    path = _copy(single, tmp_path / "text0.raw", {area0: b"X"})
    pv = open_pv(path)
    mda = pv.tables["metadata_areas"]
    assert mda.text_checksum_ok.tolist() == [False, True] and mda.used.tolist() == [False, True]
    assert pv.metadata == single.tree                  # the intact copy in area 1 is used
    assert {"metadata_checksum_mismatch", "metadata_copies_differ"} <= codes(pv)
    _, checks = pvck_headers(path)
    assert any("crc does not match mda_header_1" in c for c in checks)
    # both copies damaged: the text is still read, with a finding per area
    path = _copy(single, tmp_path / "text01.raw",
                 {area0: b"X", _text_offset(single, 1, pos): b"X"})
    pv = open_pv(path)
    assert pv.metadata["description"] != single.tree["description"]
    bad = pv.findings[pv.findings.code == "metadata_checksum_mismatch"]
    assert sorted(bad["index"].tolist()) == [0, 1]
    # a byte poked in the part that wrapped to the start of the buffer
    tail = _text_offset(single, 0, len(single.text) - 5)
    assert tail < single.layout.metadata_areas[0][0] + 512 + 512
    pv = open_pv(_copy(single, tmp_path / "tail.raw", {tail: b"#"}))
    assert pv.findings[pv.findings.code == "metadata_checksum_mismatch"]["index"].tolist() == [0]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace(b"}\n# Generated", b"\n# Generated", 1), "not closed"),
    (lambda t: t.replace(b"segment_count = 1\n", b"segment_count = 1\n}\n", 1), "without a matching"),
    (lambda t: t.replace(b'format = "lvm2"', b'format = "lvm2', 1), "expected"),
    (lambda t: t.replace(b"max_lv = 0", b"max_lv = zero", 1), "unquoted value"),
])
def test_metadata_syntax_errors(single, tmp_path, edit, message):
    text = edit(single.text)
    assert text != single.text
    path = _pv_with_text(single, tmp_path / "syntax.raw", text)
    pv = open_pv(path)
    f = pv.findings[pv.findings.code == "metadata_syntax"]
    assert len(f) == 2 and f.message.str.contains(message).all(), f.message.tolist()
    assert f.message.str.contains("line").all()
    assert pv.vg is None and pv.tables["logical_volumes"].empty
    with pytest.raises(ImageError, match="no readable volume group"):
        pv.open("root")


def test_segment_beyond_the_pv_end(single, tmp_path):
    vg = json.loads(json.dumps(single.tree["vgfix"]))
    vg["logical_volumes"]["swap"]["segment1"]["stripes"] = ["pv0", single.layout.pe_count - 1]
    path = _pv_with_text(single, tmp_path / "beyond.raw",
                         fx.metadata_text("vgfix", vg, "beyond"))
    pv = open_pv(path)
    assert {"segment_beyond_pv", "segment_beyond_device"} <= codes(pv)
    with pytest.raises(ImageError, match="past the end of the PV") as exc:
        pv.open("swap")
    assert exc.value.path == str(path) and not isinstance(exc.value, Unsupported)
    assert sha(pv.open("root").read()) == sha(single.lv_data["root"])


def test_truncated_pv(single, tmp_path):
    path = tmp_path / "cut.raw"
    path.write_bytes(single.path.read_bytes()[:8 * MiB])
    pv = open_pv(path)
    assert {"pv_size_mismatch", "metadata_area_invalid", "extents_beyond_device",
            "segment_beyond_device"} <= codes(pv)
    assert pv.metadata == single.tree                          # area 0 is intact
    assert sha(pv.open("root").read()) == sha(single.lv_data["root"])
    with pytest.raises(ImageError, match="past the end of the PV"):
        pv.open("data")


def _u64(v: int) -> bytes:
    return v.to_bytes(8, "little")


def _hostile_cases(single) -> dict[str, tuple[dict, set]]:
    """name -> (pokes, finding codes expected)."""
    mda0, _ = single.layout.metadata_areas[0]
    label = 512
    pvh = label + 32
    slot0 = mda0 + 40

    def rehash_mda(pokes):      # keep the mda header checksum valid after the pokes
        hdr = bytearray(single.path.read_bytes()[mda0:mda0 + 512])
        for off, val in pokes.items():
            hdr[off - mda0:off - mda0 + len(val)] = val
        hdr[0:4] = L.lvm_crc(bytes(hdr[4:])).to_bytes(4, "little")
        return {mda0: bytes(hdr)}

    return {
        "text_size_2^63": (rehash_mda({slot0 + 8: _u64(1 << 63)}), {"metadata_location_invalid"}),
        "text_offset_max": (rehash_mda({slot0: _u64(2 ** 64 - 1)}), {"metadata_location_invalid"}),
        "mda_size_max": (rehash_mda({mda0 + 32: _u64(2 ** 64 - 1)}), {"metadata_size_mismatch"}),
        "mda_offset_max": ({pvh + 40 + 32: _u64(2 ** 64 - 512)}, {"label_crc_mismatch",
                                                                  "metadata_area_invalid"}),
        "device_size_max": ({pvh + 32: _u64(2 ** 64 - 1)}, {"pv_size_mismatch"}),
        "no_list_terminator": ({pvh + 40: b"\x01" * (512 - 72)}, {"areas_overflow_label"}),
        "mda_magic": ({mda0 + 4: b"NOT LVM2 MAGIC!!"}, {"metadata_magic_invalid"}),
    }


def _hostile_texts(single) -> dict[str, tuple[bytes, set]]:
    vg = single.tree["vgfix"]

    def with_vg(**changes):
        v = json.loads(json.dumps(vg))
        for path, value in changes.items():
            node = v
            *parents, key = path.split("/")
            for p in parents:
                node = node[p]
            node[key] = value
        return fx.metadata_text("vgfix", v, "hostile")

    return {
        "extent_size_2^40": (with_vg(extent_size=1 << 40), {"metadata_value_invalid"}),
        "pe_count_2^60": (with_vg(**{"physical_volumes/pv0/pe_count": 1 << 60}),
                          {"extents_beyond_device"}),
        "segment_count_10^9": (with_vg(**{"logical_volumes/root/segment_count": 10 ** 9}),
                               {"segment_count_mismatch"}),
        "extent_count_2^62": (with_vg(**{"logical_volumes/root/segment1/extent_count": 1 << 62}),
                              {"segment_beyond_pv", "segment_beyond_device"}),
        "stripes_garbage": (with_vg(**{"logical_volumes/root/segment1/stripes": ["pv0", "x", 3]}),
                            {"segment_invalid"}),
        "depth_bomb": (b"vgfix {\n" + b"a {\n" * 100000 + b"}\n" * 100001 + b"\0",
                       {"metadata_syntax"}),
        "list_bomb": (b"vgfix {\nx = [" + b"1," * 400000 + b"]\n}\n\0", {"metadata_syntax"}),
        "not_utf8": (single.text.replace(b"fixture-host", b"fixture-\xff\xfe", 1),
                     {"metadata_text_warning"}),
    }


def _examine(path: str) -> dict:
    """In a child: the PV, every table, to_dict, every LV (first MiB)."""
    out = {"error": None, "codes": [], "open": {}}
    try:
        pv = imgscope.open(path, "raw").lvm()
    except ImageError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    for frame in pv.tables.values():
        len(frame)
    len(pv.fields)
    json.dumps(pv.to_dict())
    out["codes"] = sorted(set(pv.findings.code))
    for lv in pv.logical_volumes():
        try:
            pv.open(lv).read(MiB)
            out["open"][lv] = "ok"
        except ImageError as exc:
            out["open"][lv] = type(exc).__name__
    return out


def test_hostile_sizes_are_bounded(single, tmp_path):
    paths = {}
    for name, (pokes, want) in _hostile_cases(single).items():
        paths[name] = (_copy(single, tmp_path / f"{name}.raw", pokes), want)
    big = fx.Layout(16 * MiB, pe_start=4 * MiB, mda0_size=4 * MiB - 4096, mda1_size=None)
    for name, (text, want) in _hostile_texts(single).items():
        layout = big if len(text) > single.layout.mda0_size // 2 else None
        paths[name] = (_pv_with_text(single, tmp_path / f"{name}.raw", text, layout=layout), want)
    for name, (path, want) in paths.items():
        t0 = time.perf_counter()
        res = run_isolated(lambda: _examine(str(path)), timeout=30)
        assert res[0] == "ok", (name, res)
        out = res[1]
        assert out["error"] is None, (name, out)
        assert want <= set(out["codes"]), (name, out["codes"])
        assert time.perf_counter() - t0 < 60, name   # a hang guard, not a benchmark
    # the root LV of the intact-text cases still reads; the broken one does not
    assert _examine(str(paths["extent_count_2^62"][0]))["open"]["root"] == "ImageError"
    assert _examine(str(paths["text_size_2^63"][0]))["open"]["root"] == "ok"


# --------------------------------------------------------------------------- the grammar


_GRAMMAR_ERRORS = {
    "unclosed": ("a {", MetadataSyntaxError, "section 'a' opened at line 1, column 1 is not closed"),
    "extra_brace": ("a = 1 }", MetadataSyntaxError, "'}' without a matching '{' at line 1"),
    "unterminated": ('a = "abc', MetadataSyntaxError, "unterminated string"),
    "double_comma": ("a = [1,,2]", MetadataSyntaxError, "expected a value"),
    "open_list": ("a = [1 2", MetadataSyntaxError, "expected a value, found the end of the text"),
    "section_in_list": ("a = [1 {", MetadataSyntaxError, "expected a value, found '{'"),
    "no_key": ("= 3", MetadataSyntaxError, "expected a key"),
    "no_equals": ("a b", MetadataSyntaxError, "expected '=' or '{'"),
    "huge_int": ("a = 99999999999999999999999", MetadataSyntaxError, "out of range"),
    "deep": ("x {\n" * 40 + "}" * 40, LimitExceeded, "nested deeper"),
    "many_items": ("a = [" + "1," * 300000 + "]", LimitExceeded, "items"),
    "huge_text": ("#" * (5 << 20), LimitExceeded, "exceeds"),
}


@pytest.mark.parametrize("case", list(_GRAMMAR_ERRORS))
def test_parser_errors(case):
    text, error, message = _GRAMMAR_ERRORS[case]
    t0 = time.perf_counter()
    with pytest.raises(error, match=re.escape(message)):
        parse_metadata(text)
    assert time.perf_counter() - t0 < 60   # a hang guard, not a benchmark


def test_parser_duplicates_and_bytes():
    warnings = []
    tree = parse_metadata(b'a = 1\na = 2\ns { k = "\xc3\xa9\xff" }', warnings=warnings)
    assert tree == {"a": 1, "s": {"k": "\u00e9\ufffd"}}
    assert len(warnings) == 2 and "repeated at line 2" in warnings[1]
    assert parse_metadata("a = [1 2 3,]") == {"a": [1, 2, 3]}      # libdevmapper: commas optional


# --------------------------------------------------------------------------- real lvm2


def _attach(path: Path, readonly: bool) -> str | None:
    """A loop device over `path`, or None where this machine does not allow one."""
    try:
        proc = subprocess.run(["losetup", "-f", "--show", *(["-r"] if readonly else []), str(path)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    dev = proc.stdout.strip()
    return dev if proc.returncode == 0 and dev.startswith("/dev/") else None


def _detach(dev: str) -> None:
    subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)


def _report(kind: str, dev: str, fields: str, *extra) -> list[dict]:
    out = lvm(kind, "--config", LVM_CONFIG, "--devices", dev, "--reportformat", "json",
              "--units", "b", "--nosuffix", "-o", fields, *extra).stdout
    return json.loads(out)["report"][0][kind[:2]]


def _lvm_view(dev: str) -> dict:
    """What lvm2 reports about the PV on `dev` (sizes in bytes)."""
    pv = _report("pvs", dev, "pv_uuid,pe_start,dev_size,pv_pe_count,pv_mda_count")[0]
    vg = _report("vgs", dev, "vg_name,vg_uuid,vg_seqno,vg_extent_size,lv_count")[0]
    segs = _report("lvs", dev, "lv_name,lv_uuid,lv_size,seg_start_pe,seg_size_pe,seg_pe_ranges,"
                   "segtype", "-a")
    return {"pv": pv, "vg": vg, "segs": segs}


def _assert_matches_lvm(pv, view: dict) -> None:
    p, v = view["pv"], view["vg"]
    this = pv.tables["physical_volumes"].set_index("name").loc[pv.pv_name]
    assert (p["pv_uuid"], int(p["pe_start"]), int(p["dev_size"]), int(p["pv_pe_count"]),
            int(p["pv_mda_count"])) == (pv.pv_uuid, this.pe_start * 512, pv.size,
                                        this.pe_count, len(pv.metadata_areas))
    row = pv.tables["volume_group"].iloc[0]
    assert (v["vg_name"], v["vg_uuid"], int(v["vg_seqno"]), int(v["vg_extent_size"]),
            int(v["lv_count"])) == (row["name"], row.id, row.seqno, row.extent_bytes, row.lv_count)
    theirs = sorted((s["lv_name"], int(s["seg_start_pe"]), int(s["seg_size_pe"]),
                     s["seg_pe_ranges"].split(":", 1)[1]) for s in view["segs"])
    segs = pv.tables["segments"]
    ours = sorted((r.lv, r.start_extent, r.extent_count,
                   f"{r.pv_start_extent}-{r.pv_start_extent + r.extent_count - 1}")
                  for r in segs.itertuples())
    assert ours == theirs
    sizes = {s["lv_name"]: int(s["lv_size"]) for s in view["segs"]}
    assert dict(zip(pv.tables["logical_volumes"].name, pv.tables["logical_volumes"]["size"])) == sizes


def _real_pv(path: Path, dev: str) -> dict:
    """pvcreate/vgcreate/lvcreate on `dev`: LVs a (two non-adjacent segments) and b, then
    small LVs until the metadata in area 0 wraps (pvck says so)."""
    common = ["--config", LVM_CONFIG, "--devices", dev]
    vg = f"imgscope{os.getpid()}"
    lvm("pvcreate", *common, "-y", "--pvmetadatacopies", "2", "--metadatasize", "60k",
        "--dataalignment", "64k", dev)
    lvm("vgcreate", *common, "-s", "1M", vg, dev)
    make = ["--driverloaded", "n", "-an", "-Zn", "-y"]
    lvm("lvcreate", *common, *make, "-L", "2M", "-n", "a", vg)
    lvm("lvcreate", *common, *make, "-L", "3M", "-n", "b", vg)
    lvm("lvextend", *common, "--driverloaded", "n", "-L", "4M", f"{vg}/a")
    for i in range(40):
        if pvck_headers(dev)[0].get("mda_header_1.raw_locn[0].wrapped"):
            break
        lvm("lvcreate", *common, *make, "-l", "1", "-n", f"c{i}", vg)
    return _lvm_view(dev)


def test_real_lvm2(built, single, tmp_path):
    """lvm2 reads the fixture as imgscope does, and imgscope reads a PV lvm2 made.
    Without loop devices the fixture is checked with pvck on the plain file instead."""
    dev = _attach(single.path, readonly=True)
    if dev is None:
        for f in built.values():
            assert_matches_pvck(open_pv(f.path), f.path, tmp_path)
        return
    try:
        view = _lvm_view(dev)
    finally:
        _detach(dev)
    _assert_matches_lvm(open_pv(single.path), view)

    path = tmp_path / "real.raw"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    dev = _attach(path, readonly=False)
    assert dev is not None
    try:
        view = _real_pv(path, dev)
    finally:
        _detach(dev)
    # known bytes into every LV, placed by lvm2's own report of its extents
    pe_start = int(view["pv"]["pe_start"])
    extent = int(view["vg"]["vg_extent_size"])
    rng = np.random.default_rng(11)
    want: dict[str, bytearray] = {}
    with open(path, "r+b") as f:
        for s in sorted(view["segs"], key=lambda s: (s["lv_name"], int(s["seg_start_pe"]))):
            first, last = map(int, s["seg_pe_ranges"].split(":", 1)[1].split("-"))
            data = rng.integers(0, 256, (last - first + 1) * extent, dtype=np.uint8).tobytes()
            f.seek(pe_start + first * extent)
            f.write(data)
            want.setdefault(s["lv_name"], bytearray()).extend(data)
    qcow = tmp_path / "real.qcow2"
    oracle.run(oracle.QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", path, qcow)
    pv = imgscope.open(qcow).lvm()
    assert pv.findings.empty, pv.findings.message.tolist()
    _assert_matches_lvm(pv, view)
    assert pv.tables["metadata_areas"].wrapped[0]
    assert len(pv.tables["segments"][pv.tables["segments"].lv == "a"]) == 2
    assert_matches_pvck(pv, path, tmp_path)
    for lv, data in want.items():
        assert sha(pv.open(lv).read()) == sha(bytes(data)), lv
