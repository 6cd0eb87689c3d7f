"""The common model's contracts: frame columns and dtypes, schema round trips,
import layering, raw images, probing and the HTML card."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import imgscope
from imgscope import frames
from imgscope.errors import ImageError, Unsupported, UnknownFormat
from imgscope.schemas import qcow2 as S

PKG = Path(imgscope.__file__).parent


def test_fields_columns_dtypes_and_bytes(qcow2_corpus):
    s = qcow2_corpus["v3_compat11"]
    with imgscope.open(s.path) as img:
        f = img.fields
    assert list(f.columns) == frames.FIELDS_COLUMNS
    assert f.offset.dtype == np.uint64 and f["size"].dtype == np.uint64
    assert isinstance(f.structure.dtype, pd.CategoricalDtype)
    data = s.path.read_bytes()
    for row in f.itertuples():
        assert data[row.offset:row.offset + row.size] == row.raw, (row.structure, row.field)
    hdr = f[f.structure == "header"].set_index("field")
    assert hdr.loc["cluster_bits", "value"] == 16
    assert hdr.loc["header_length", "offset"] == 100
    assert (f.description.str.len() > 0).all(), "every field carries its spec sentence"
    # the header rows tile bytes 0..header_length without gaps
    h = f[f.structure == "header"].sort_values("offset")
    assert (h.offset.to_numpy()[1:] == (h.offset + h["size"]).to_numpy()[:-1]).all()
    assert int(h.offset.iloc[-1] + h["size"].iloc[-1]) == hdr.loc["header_length", "value"]


def test_extents_and_regions_dtypes(qcow2_corpus):
    with imgscope.open(qcow2_corpus["chain_top"].path) as img:
        e = img.extents()
        r = img.regions()
        fnd = img.findings
    assert list(e.columns) == frames.EXTENTS_COLUMNS
    assert e.guest_offset.dtype == np.uint64 and e.length.dtype == np.uint64
    assert str(e.host_offset.dtype) == "UInt64"
    assert list(e.kind.cat.categories) == list(imgscope.model.KINDS)
    assert set(e.depth) == {0, 1, 2}
    assert e.source.notna().all()
    assert list(r.columns) == frames.REGIONS_COLUMNS and r.offset.dtype == np.uint64
    assert list(fnd.columns) == frames.FINDINGS_COLUMNS


def test_l1_l2_tables_match_raw_bytes(qcow2_corpus):
    s = qcow2_corpus["cluster_4k"]
    data = s.path.read_bytes()
    with imgscope.open(s.path) as img:
        l1, l2 = img.tables["l1"], img.tables["l2"]
    for row in l1.itertuples():
        assert int.from_bytes(data[row.entry_offset:row.entry_offset + 8], "big") == row.raw
    assert (l1.l2_offset[l1.raw != 0] % 4096 == 0).all()
    sample = l2.sample(min(len(l2), 500), random_state=1)
    for row in sample.itertuples():
        assert int.from_bytes(data[row.entry_offset:row.entry_offset + 8], "big") == row.raw
    data_rows = l2[l2.type == "data"]
    assert len(data_rows) and (data_rows.host_offset.astype("uint64") == data_rows.raw & S.L2E_OFFSET_MASK).all()


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcounts_every_width(qcow2_corpus, bits):
    s = qcow2_corpus[f"refcount_bits_{bits}"]
    with imgscope.open(s.path) as img:
        rc = img.tables["refcounts"]
        l2 = img.tables["l2"]
        reft = img.tables["refcount_table"]
    cs = 65536
    assert rc.refcount.iloc[0] == 1  # header cluster
    for off in reft.refblock_offset[reft.refblock_offset != 0]:
        assert rc.refcount.iloc[int(off) // cs] == 1
    used = l2[l2.type == "data"].host_offset.astype("uint64") // cs
    assert (rc.refcount.to_numpy()[used.to_numpy().astype(int)] == 1).all()
    # clusters past every reference are free
    assert rc.refcount.iloc[-1] in (0, 1)


def test_refcount_codec_round_trip():
    rng = np.random.default_rng(7)
    for order in range(7):
        bits = 1 << order
        values = rng.integers(0, 1 << min(bits, 63), size=4096, dtype=np.uint64)
        raw = S.encode_refcounts(values, order)
        assert len(raw) == 4096 * bits // 8
        assert (S.decode_refcounts(raw, order) == values).all()


def test_header_schema_round_trip(qcow2_corpus):
    for name in ("v2_compat010", "v3_compat11", "snapshots"):
        data = qcow2_corpus[name].path.read_bytes()
        parsed = S.header_v2.parse(data[:72])
        assert S.header_v2.build(parsed) == data[:72]
        if parsed.version == 3:
            tail = S.header_v3_tail.parse(data[72:104])
            assert S.header_v3_tail.build(tail) == data[72:104]


def test_snapshot_entries_round_trip(qcow2_corpus):
    s = qcow2_corpus["snapshots"]
    data = s.path.read_bytes()
    with imgscope.open(s.path) as img:
        for snap in img.snapshots:
            raw = data[snap["offset"]:snap["offset"] + snap["entry_size"]]
            parsed = S.snapshot_entry.parse(raw)
            assert S.snapshot_entry.build(parsed) == raw
            assert parsed.name == snap["name"]
        assert img.tables["snapshots"].name.tolist() == s.snapshots


def test_bitmaps_table_and_directory(qcow2_corpus):
    s = qcow2_corpus["bitmaps"]
    with imgscope.open(s.path) as img:
        bm = img.tables["bitmaps"]
        bt = img.tables["bitmap_tables"]
        kinds = set(img.regions().kind)
    assert {"bm-64k", "bm-128k", "bm-disabled"} == set(bm.name)
    assert bm.set_index("name").granularity["bm-128k"] == 128 << 10
    assert bm.set_index("name").auto["bm-64k"] and not bm.set_index("name").auto["bm-disabled"]
    assert (bt[bt.bitmap == "bm-64k"].data_offset != 0).any()
    assert {"bitmap_directory", "bitmap_table", "bitmap_data"} <= kinds


def test_luks_header_fields(qcow2_corpus):
    s = qcow2_corpus["luks"]
    with imgscope.open(s.path) as img:
        f = img.fields
        luks = f[f.structure == "LUKS header"].set_index("field")
        assert luks.loc["cipher_name", "value"] == "aes"
        assert luks.loc["cipher_mode", "value"] == "xts-plain64"
        enc = img.info()["format-specific"]["data"]["encrypt"]
        assert enc["cipher-alg"] == "aes-256" and enc["slots"][0]["active"]
        assert "crypto_header" in set(img.regions().kind)


def test_raw_extents_follow_seek_data(raw_sample):
    from oracle import qemu_map
    with imgscope.open(raw_sample.path) as img:
        assert img.format == "raw"
        from imgscope.map import map_entries
        mine = [{k: v for k, v in e.items() if k != "filename"} for e in map_entries(img)]
    assert mine == qemu_map(raw_sample.path, fmt="raw")


def test_probe_and_unsupported_format(tmp_path):
    """A recognised format without a driver yet (OVA here) is named in the error."""
    import io, tarfile
    ova = tmp_path / "x.ova"
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tar:
        body = b'<?xml version="1.0"?><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"/>'
        member = tarfile.TarInfo("x.ovf")
        member.size = len(body)
        tar.addfile(member, io.BytesIO(body))
    assert imgscope.probe(ova)[0].format == "ova"
    with pytest.raises(Unsupported, match="ova"):
        imgscope.open(ova)
    with pytest.raises(UnknownFormat):
        imgscope.open(ova, "nonsense")
    # -f raw is always possible
    with imgscope.open(ova, "raw") as img:
        assert img.virtual_size == ova.stat().st_size


def test_html_card_is_escaped(qcow2_corpus, tmp_path):
    odd = tmp_path / "<b>odd&name.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(odd), "1M"], check=True)
    with imgscope.open(odd) as img:
        html = img._repr_html_()
    assert "<b>odd" not in html and "&lt;b&gt;odd&amp;name" in html
    with imgscope.open(qcow2_corpus["chain_top"].path) as img:
        html = img._repr_html_()
    assert "chain_mid.qcow2" in html and "qcow2 v3" in html


# ---- architecture ------------------------------------------------------------------

def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            prefix = "." * node.level + (node.module or "")
            out.add(prefix)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_schemas_import_nothing_from_imgscope():
    for py in (PKG / "schemas").glob("*.py"):
        for mod in _imports(py):
            assert not mod.startswith("..") and not mod.startswith("imgscope"), (py.name, mod)
            assert mod.split(".")[0] not in ("pandas", "matplotlib", "os", "io") or mod == "io", (py.name, mod)


def test_drivers_do_not_draw_or_print():
    for py in [*(PKG / "formats").rglob("*.py"), *(PKG / "guest").rglob("*.py")]:
        text = py.read_text()
        assert "matplotlib" not in text and "print(" not in text, py
        for mod in _imports(py):
            assert "cli" not in mod and "viz" not in mod and "widgets" not in mod, (py, mod)


def test_import_is_light():
    code = ("import sys, imgscope; "
            "print(json.dumps([m for m in ('pandas', 'matplotlib', 'construct') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == []


def test_nothing_reads_the_shared_folder():
    root = PKG.parent
    for py in list(PKG.rglob("*.py")) + list((root / "tests").rglob("*.py")):
        text = py.read_text()
        for needle in ("/".join(["..", "shared"]), "/".join(["work", "shared"])):
            assert needle not in text, (py, needle)


def test_every_schema_field_is_documented():
    import construct as cs
    from imgscope.schemas import _types
    structs = [v for v in vars(S).values() if isinstance(v, cs.Struct)]
    assert len(structs) >= 10
    for st in structs:
        for sc in st.subcons:
            if sc.name:
                assert _types.docs_of(sc), f"{sc.name} has no doc string"


def test_numpy_table_construct_round_trip():
    values = np.arange(1000, dtype=np.uint64) * 65536 | np.uint64(1 << 63)
    raw = S.u64_table(1000).build(values)
    assert raw == values.astype(">u8").tobytes()
    assert (S.u64_table(1000).parse(raw) == values).all()
    ext = np.zeros(4, S.EXTENDED_L2_DTYPE)
    ext["bitmap"] = [1, 2, 3, 0xFFFFFFFF]
    assert (S.l2_table(4, True).parse(S.l2_table(4, True).build(ext)) == ext).all()


def test_textvec_lines_match_python_formatting():
    from imgscope.textvec import Lines
    rng = np.random.default_rng(3)
    n = 500
    a = rng.integers(0, 1 << 63, n, dtype=np.uint64)
    a[:5] = [0, 9, 10, 99, (1 << 64) - 1]
    b = rng.integers(0, 1000, n).astype(np.uint64)
    flag = rng.integers(0, 2, n).astype(bool)
    text = (Lines(n).const("{a=").number(a).const(", f=").choice(flag, ["no", "yes"])
            .const(", b=", flag).number(b, flag).const("}").render(";\n"))
    expect = ";\n".join(f"{{a={x}, f={'yes' if f else 'no'}" + (f", b={y}" if f else "") + "}"
                        for x, f, y in zip(a.tolist(), flag.tolist(), b.tolist()))
    assert text == expect
    assert Lines(0).const("x").render() == ""


def test_chain_mixing_codecs_and_cluster_sizes(tmp_path):
    """qcow2 (raw deflate, 64 KiB clusters) over qcow v1 (512-byte clusters when it has a
    backing file) over a streamOptimized VMDK (zlib grains of 64 KiB), every layer with
    compressed data: each decodes with its own codec and cluster size."""
    run = lambda *a: subprocess.run([str(x) for x in a], check=True, cwd=tmp_path,
                                    capture_output=True)
    run("qemu-img", "create", "-q", "-f", "raw", "base.raw", "2M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 2M", "base.raw")
    run("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", "base.raw",
        "base.vmdk")
    run("qemu-img", "create", "-q", "-f", "qcow", "-b", "base.vmdk", "-F", "vmdk", "mid.qcow")
    run("qemu-io", "-f", "qcow", "-c", "write -c -P 0x22 512k 512", "mid.qcow")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow", "-F", "qcow", "top.qcow2")
    run("qemu-io", "-f", "qcow2", "-c", "write -c -P 0x33 0 64k", "top.qcow2")
    run("qemu-img", "convert", "-O", "raw", "top.qcow2", "top.raw")
    with imgscope.open(tmp_path / "top.qcow2") as img:
        ext = img.extents()
        assert len(img.chain) == 3
        assert set(ext.depth[ext.kind.astype(str) == "compressed"]) == {0, 1, 2}
        data = img.open_guest().read()
    assert data == (tmp_path / "top.raw").read_bytes()
