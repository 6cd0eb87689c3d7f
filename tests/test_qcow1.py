"""qcow version 1 read support held against qemu-img 7.2 on real images.

Images are made with ``qemu-img create -f qcow`` (no cluster_size option exists:
4 KiB clusters and 4 KiB L2 tables, or 512-byte clusters and 32 KiB L2 tables with a
backing file), written by qemu-io (plain, unaligned, across an L2 table boundary,
compressed ``write -c`` including the last partial cluster), converted with
``qemu-img convert [-c] -O qcow`` (``-c`` exits 1 after writing a complete image:
its final empty compressed write is refused; ``qemu-img compare`` proves the image),
layered over raw, qcow2 (compressed, 64 KiB clusters) and qcow files, and encrypted
(``-o encrypt.format=aes`` still works in 7.2).  info, map and the guest SHA-256
must equal qemu's; damaged copies must give findings or ImageErrors, bounded, and
where qemu still opens them, the same map (qemu reads zeros past the end of the file).
"""
from __future__ import annotations

import random
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

import imgscope
from imgscope.errors import ChainError, ImageError, LimitExceeded, ParseError, Truncated, \
    UnsafePath, Unsupported
from imgscope.schemas import qcow as S

import checks
import oracle
from test_qcow2_damaged import check_bounded, examine, run_isolated

KiB, MiB = oracle.KiB, oracle.MiB
PLAIN_SIZE = 5 * MiB + 1000          # qemu-img rounds it up to 5 MiB + 1024
SECRET = "pass123"
HDR = struct.Struct(">4sIQIIQBBHIQ")
HDR_NAMES = ("magic", "version", "backing_file_offset", "backing_file_size", "mtime", "size",
             "cluster_bits", "l2_bits", "padding", "crypt_method", "l1_table_offset")


# --------------------------------------------------------------------------- independent byte reading


def header(path) -> dict:
    with open(path, "rb") as f:
        return dict(zip(HDR_NAMES, HDR.unpack(f.read(48))))


def l1_of(path) -> np.ndarray:
    h = header(path)
    n = -(-h["size"] // (1 << (h["cluster_bits"] + h["l2_bits"])))
    return np.fromfile(path, ">u8", n, offset=h["l1_table_offset"]).astype(np.uint64)


def l2_entries(path) -> list[tuple[int, int, int]]:
    """(guest offset, entry offset, entry) of every non-zero L2 entry."""
    h = header(path)
    out = []
    for i, l2 in enumerate(l1_of(path).tolist()):
        if l2:
            t = np.fromfile(path, ">u8", 1 << h["l2_bits"], offset=l2)
            for j in np.flatnonzero(t).tolist():
                guest = ((i << h["l2_bits"]) + j) << h["cluster_bits"]
                out.append((guest, l2 + 8 * j, int(t[j])))
    return out


def poke(path, offset: int, fmt: str, *values) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


# --------------------------------------------------------------------------- the corpus


def _create(path: Path, size, *args) -> Path:
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow", *args, path.name, str(size),
               cwd=path.parent)
    return path


def _io(path: Path, *commands: str, fmt: str = "qcow", secret: str | None = None) -> None:
    oracle.qemu_io(path, *commands, fmt=fmt, secret=secret)


def _source_raw(path: Path, size: int) -> None:
    """Compressible text, incompressible random data and holes (all-zero clusters)."""
    rnd = random.Random(5)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in ((0, b"qcow v1 text block " * 6000),
                          (300 * KiB + 77, rnd.randbytes(90 * KiB)),
                          (1 * MiB + 100, bytes(range(256)) * 40),
                          (size - 5000, rnd.randbytes(5000))):
            f.seek(off)
            f.write(data)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    oracle.require_tools()
    d = tmp_path_factory.mktemp("qcow1")
    (d / "pattern.bin").write_bytes(random.Random(1).randbytes(2 * MiB))
    out = {}
    p = out["plain"] = _create(d / "plain.qcow", PLAIN_SIZE)
    _io(p, "write -s pattern.bin 4000 10000",                         # unaligned, 4 clusters
        f"write -P 0x41 {2 * MiB - 4096} 8192",                       # across the L2 boundary
        "write -c -P 0x42 1M 4k",                                     # compressed cluster
        f"write -c -s pattern.bin {5 * MiB} 1024",                    # compressed last partial cluster
        "write -z 3M 64k",                                            # zeros: plain data in qcow v1
        "write -c -s pattern.bin 1040k 4k",                           # incompressible: stored plain
        "write -c -P 0x43 1044k 4k")
    src = d / "source.raw"
    _source_raw(src, 3 * MiB + 4096)
    out["converted"] = d / "converted.qcow"
    oracle.run(oracle.QEMU_IMG, "convert", "-f", "raw", "-O", "qcow", src.name, "converted.qcow", cwd=d)
    # -c: exit 1 after a complete image (the final zero-length compressed write fails)
    res = oracle.run(oracle.QEMU_IMG, "convert", "-f", "raw", "-O", "qcow", "-c", src.name,
                     "compressed.qcow", cwd=d, check=False)
    assert res.returncode in (0, 1), res.stderr
    assert oracle.run(oracle.QEMU_IMG, "compare", "-f", "raw", "-F", "qcow", src.name,
                      "compressed.qcow", cwd=d, check=False).returncode == 0
    out["compressed"] = d / "compressed.qcow"
    out["empty"] = _create(d / "empty.qcow", "1G")
    # backing chains: raw, qcow2 (compressed, 64 KiB clusters), qcow, qcow over qcow over raw
    base = d / "base.raw"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "raw", base.name, str(3 * MiB), cwd=d)
    _io(base, "write -s pattern.bin 0 700k", "write -P 0x33 2M 300k", fmt="raw")
    p = out["raw_chain"] = _create(d / "over_raw.qcow", 4 * MiB, "-b", "base.raw", "-F", "raw")
    _io(p, "write -P 0x51 4096 1000", "write -s pattern.bin 600k 200k", "write -P 0x52 3584k 4k")
    oracle.run(oracle.QEMU_IMG, "convert", "-c", "-f", "raw", "-O", "qcow2", src.name,
               "base.qcow2", cwd=d)
    p = out["qcow2_chain"] = _create(d / "over_qcow2.qcow", 3 * MiB + 4096, "-b", "base.qcow2",
                                     "-F", "qcow2")
    _io(p, "write -P 0x61 70k 3000")
    p = out["qcow_chain"] = _create(d / "over_qcow.qcow", 3 * MiB + 4096, "-b", "compressed.qcow",
                                    "-F", "qcow")
    _io(p, "write -P 0x71 1M 4k")
    p = out["chain3"] = _create(d / "top3.qcow", 4 * MiB, "-b", "over_raw.qcow", "-F", "qcow")
    _io(p, "write -P 0x81 2M 512")
    # encrypted: qemu-img 7.2 still creates AES qcow images
    p = out["encrypted"] = d / "encrypted.qcow"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow", "--object",
               f"secret,id={oracle.SECRET_ID},data={SECRET}", "-o",
               f"encrypt.format=aes,encrypt.key-secret={oracle.SECRET_ID}", p.name, "1M", cwd=d)
    _io(p, "write -P 0x5a 0x1200 512", "write -P 0x5b 300k 9000", secret=SECRET)
    return out


@pytest.fixture(scope="module", autouse=True)
def _warm(corpus):
    """Use the whole model once so forked children do not trace pandas' import."""
    with imgscope.open(corpus["plain"]) as img:
        img.extents(), img.regions(), img.fields, img.findings, img.info()
        for name in img.tables:
            img.tables[name]


SAMPLES = ["plain", "converted", "compressed", "empty", "raw_chain", "qcow2_chain", "qcow_chain",
           "chain3"]
KINDS_OK = {"header", "l1_table", "l2_table", "data", "compressed_data", "slack"}


# --------------------------------------------------------------------------- against qemu-img


@pytest.mark.parametrize("name", SAMPLES)
def test_info_map_guest_equal_qemu(corpus, name, tmp_path):
    path = corpus[name]
    with checks.open_named(path) as img:
        assert img.format == "qcow" and img.variant == "v1"
        assert img.info() == oracle.qemu_info(path)
        assert img.info(backing_chain=True) == oracle.qemu_info(path, backing_chain=True)
        assert checks.map_view(img) == oracle.qemu_map(path)
        assert checks.guest_sha(img) == oracle.qemu_guest_sha256(path, workdir=tmp_path)
        for layer in img.chain:
            assert layer.findings.empty, layer.findings.to_string()
        checks.assert_extents_cover_the_disk(img, name)
        reg = img.regions()
        assert not checks.tiling_problems(checks.file_regions(reg, img.source), img.source)
        assert {"header", "l1_table"} <= set(reg.kind) <= KINDS_OK, reg.to_string()


def test_corpus_is_what_it_claims(corpus):
    """Defaults of qemu-img create, compressed entries where claimed, the chains' names."""
    h = header(corpus["plain"])
    assert (h["cluster_bits"], h["l2_bits"], h["l1_table_offset"]) == (*S.DEFAULT_BITS, 48)
    assert h["size"] == 5 * MiB + 1024 and h["backing_file_offset"] == 0
    hb = header(corpus["raw_chain"])
    assert (hb["cluster_bits"], hb["l2_bits"]) == S.DEFAULT_BACKING_BITS
    assert (hb["backing_file_offset"], hb["backing_file_size"]) == (48, len("base.raw"))
    assert hb["l1_table_offset"] == 56                       # 48 + 8 rounded up to 8
    comp = lambda p: [e for _, _, e in l2_entries(p) if e >> 63]
    assert len(comp(corpus["plain"])) == 3
    assert len(comp(corpus["compressed"])) > 10 and not comp(corpus["converted"])
    # convert -c stored the incompressible random clusters uncompressed
    assert any(not e >> 63 for _, _, e in l2_entries(corpus["compressed"]))
    assert header(corpus["encrypted"])["crypt_method"] == S.CRYPT_AES
    with imgscope.open(corpus["chain3"]) as img:
        assert [l.format for l in img.chain] == ["qcow", "qcow", "raw"]


def test_encrypted_image(corpus):
    """info equal qemu's (no secret needed), map equal qemu's with the secret: encrypted
    clusters are data without an offset; reading them is refused, the rest reads."""
    path = corpus["encrypted"]
    with checks.open_named(path) as img:
        assert img.info() == oracle.qemu_info(path) and img.info()["encrypted"] is True
        assert checks.map_view(img) == oracle.qemu_map(path, fmt="qcow", secret=SECRET)
        ext = img.extents()
        assert set(ext.kind.astype(str)) == {"encrypted", "unallocated"}
        enc = ext[ext.kind == "encrypted"]
        assert enc.guest_offset.tolist() == [4096, 300 * KiB]
        with img.open_guest() as g:
            assert g.read(4096) == bytes(4096)               # unallocated cluster 0
            with pytest.raises(Unsupported):
                g.read(512)
        assert img.findings.empty
        v = dict(zip(img.fields.field, img.fields.display))
        assert v["crypt_method"] == "1 (aes)"
        reg = img.regions()
        assert not checks.tiling_problems(checks.file_regions(reg, img.source), img.source)


def test_compressed_clusters_decode_as_qcow_c(corpus, tmp_path):
    """L2 bit 63 = compressed; the next cluster_bits bits the exact stored byte count; the
    rest the host offset.  The stream is raw deflate (not zlib) of one cluster."""
    path = corpus["plain"]
    raw = oracle.qemu_raw(path, tmp_path / "g.raw").read_bytes()
    data = path.read_bytes()
    h = header(path)
    cb, cs = h["cluster_bits"], 1 << h["cluster_bits"]
    found = 0
    with imgscope.open(path) as img:
        l2 = img.tables["l2"]
        for guest, entry_off, e in l2_entries(path):
            if not e >> 63:
                continue
            found += 1
            off = e & ((1 << (63 - cb)) - 1)
            size = (e >> (63 - cb)) & (cs - 1)
            stream = data[off:off + size]
            cluster = zlib.decompressobj(-12).decompress(stream)
            assert len(cluster) == cs
            want = raw[guest:guest + cs]
            assert cluster[:len(want)] == want
            with pytest.raises(zlib.error):
                zlib.decompress(stream)                      # no zlib header
            row = l2[l2.entry_offset == entry_off].iloc[0]
            assert bool(row.compressed) and row.type == "compressed"
            assert (int(row.host_offset), int(row.compressed_size)) == (off, size)
    assert found == 3


def test_tables_and_fields_match_bytes(corpus):
    path = corpus["raw_chain"]
    data = path.read_bytes()
    h = header(path)
    with imgscope.open(path) as img:
        f = img.fields
        for row in f.itertuples():
            assert data[row.offset:row.offset + row.size] == row.raw, row.field
            assert row.description, row.field
        v = dict(zip(f.field, f.value))
        assert {k: v[k] for k in HDR_NAMES if k != "magic"} == {k: h[k] for k in HDR_NAMES
                                                                if k != "magic"}
        assert v["backing_file"] == "base.raw"
        l1 = img.tables["l1"]
        assert (l1.raw.to_numpy() == l1_of(path)).all()
        assert (l1.entry_offset.to_numpy() == 56 + 8 * np.arange(len(l1))).all()
        l2 = img.tables["l2"]
        nz = l2[l2.raw != 0]
        assert sorted(zip(nz.guest_offset.tolist(), nz.entry_offset.tolist(), nz.raw.tolist())) \
            == sorted(l2_entries(path))
        assert (nz.host_offset.to_numpy(np.uint64) == nz.raw.to_numpy()).all()
        assert set(nz.type.astype(str)) == {"data"}
        assert len(l2) == len(l1[l1.allocated]) * (1 << h["l2_bits"])
    assert S.header.build(S.header.parse(data[:48])) == data[:48]
    n = l1_of(path).size
    assert S.u64_table(n).build(S.u64_table(n).parse(data[56:56 + 8 * n])) == data[56:56 + 8 * n]
    assert S.compressed_entry(0x2200, 22, 12) == 0x80B0000000002200



@pytest.mark.parametrize("name", ["plain", "compressed", "raw_chain"])
def test_cli_json_text_equals_qemu(corpus, name):
    checks.assert_cli_json_equals_qemu(corpus[name], (["info"], ["map"],
                                                      ["info", "--backing-chain"]))


@pytest.mark.parametrize("name", ["plain", "compressed", "chain3"])
def test_random_reads(corpus, name, tmp_path):
    path = corpus[name]
    raw = oracle.qemu_raw(path, tmp_path / "guest.raw").read_bytes()
    rnd = random.Random(name)
    with imgscope.open(path) as img, img.open_guest() as g:
        size = img.virtual_size
        assert size == len(raw)
        cs = img.cluster_size
        points = [k * cs + d for k in (0, 1, 3, 256, 257, 511, 512, 768) for d in (-1, 0, 1, 700)]
        points += [rnd.randrange(size) for _ in range(150)] + [size - 1, size - 1024]
        for pos in points:
            pos = max(0, min(pos, size - 1))
            n = rnd.choice([1, 511, cs, 3 * cs + 17])
            g.seek(pos)
            assert g.read(n) == raw[pos:pos + n], (pos, n)


def test_probe_and_aliases(corpus):
    assert imgscope.probe(corpus["plain"])[0].format == "qcow"
    with imgscope.open(corpus["plain"], "qcow1") as img:
        assert img.format == "qcow"
    with pytest.raises(Unsupported):
        imgscope.open(corpus["plain"], "qcow2")              # version 1 is no qcow2


# --------------------------------------------------------------------------- damaged copies qemu still reads


def _copy(corpus, name, tmp_path, new=None) -> Path:
    p = tmp_path / (new or corpus[name].name)
    shutil.copy(corpus[name], p)
    return p


def _l1_entry_past_eof(p):
    poke(p, header(p)["l1_table_offset"], ">Q", 1 << 30)


def _l2_entry_past_eof(p):
    poke(p, l2_entries(p)[0][1], ">Q", 1 << 30)


def _l1_table_past_eof(p):
    poke(p, 40, ">Q", 1 << 40)


def _l2_table_cut(p):
    """L2 table 1 moved to the end of the file, its second half cut off (qemu reads
    zeros there: those clusters become unallocated)."""
    data = p.read_bytes()
    table = int(l1_of(p)[1])
    with open(p, "ab") as f:
        f.write(data[table:table + 2048])
    poke(p, header(p)["l1_table_offset"] + 8, ">Q", len(data))


QEMU_READS = {
    "l1_entry_past_eof": (_l1_entry_past_eof, {"l2_table_beyond_eof"}),
    "l2_entry_past_eof": (_l2_entry_past_eof, {"cluster_beyond_eof"}),
    "l1_table_past_eof": (_l1_table_past_eof, {"table_beyond_eof"}),
    "l2_table_cut": (_l2_table_cut, {"l2_table_truncated"}),
}


@pytest.mark.parametrize("case", sorted(QEMU_READS))
def test_damage_qemu_still_reads(corpus, tmp_path, case):
    """Damage qemu opens: it reads zeros past the end of the file.  Same map, same guest,
    and a finding naming the damage; strict mode raises."""
    p = _copy(corpus, "plain", tmp_path)
    damage, codes = QEMU_READS[case]
    damage(p)
    with checks.open_named(p) as img:
        assert codes <= set(img.findings.code), img.findings.to_string()
        assert checks.map_view(img) == oracle.qemu_map(p)
        assert checks.guest_sha(img) == oracle.qemu_guest_sha256(p, workdir=tmp_path)
        reg = img.regions()
        inside = reg[reg.kind != "beyond_eof"]          # structures past the end stay listed
        assert not checks.tiling_problems(checks.file_regions(inside, img.source), img.source,
                                          odd_kinds=False)
    with pytest.raises(ParseError):
        imgscope.open(p, strict=True)


def test_damage_qemu_cannot_read(corpus, tmp_path):
    """A compressed entry with a stored size of 0 and a data entry that is not sector
    aligned: qemu maps both and fails to read them (EIO); imgscope maps them the same,
    says why, and raises an ImageError for the compressed one."""
    p = _copy(corpus, "plain", tmp_path)
    entries = l2_entries(p)
    (g1, e1, _), (_, e2, v2) = entries[0], entries[1]
    poke(p, e1, ">Q", (1 << 63) | 0x3000)
    poke(p, e2, ">Q", v2 + 1)
    assert oracle.run(oracle.QEMU_IMG, "convert", "-O", "raw", p, tmp_path / "x.raw",
                      check=False).returncode == 1
    with checks.open_named(p) as img:
        f = img.findings
        assert {"compressed_size_invalid", "data_cluster_misaligned", "host_overlap"} <= set(f.code)
        assert set(f[f.code == "compressed_size_invalid"].host_offset) == {e1}
        assert checks.map_view(img) == oracle.qemu_map(p)
        with img.open_guest() as g:
            g.seek(g1)
            with pytest.raises(ParseError):
                g.read(10)


def _cut_points(path) -> list[int]:
    h = header(path)
    entries = l2_entries(path)
    comp = [(e & ((1 << (63 - h["cluster_bits"])) - 1), (e >> (63 - h["cluster_bits"]))
             & ((1 << h["cluster_bits"]) - 1)) for _, _, e in entries if e >> 63]
    data = [e for _, _, e in entries if not e >> 63]
    l2 = [int(x) for x in l1_of(path) if x]
    pts = {0, 10, 47, 48, 50, 100, 560, l2[0] + 8, l2[0] + 2048, l2[1] + 100,
           data[0] + 100, data[-1] + 4095, comp[0][0] + comp[0][1] // 2, comp[-1][0] + 5,
           path.stat().st_size - 1}
    return sorted(pts)


def test_truncated_at_many_lengths(corpus, tmp_path):
    """Cut copies: shorter than the header -> Truncated; else findings, qemu's map, and
    the guest reads exactly when qemu's convert does (then the same bytes)."""
    src = corpus["plain"].read_bytes()
    for n in _cut_points(corpus["plain"]):
        p = tmp_path / f"cut{n}.qcow"
        p.write_bytes(src[:n])
        out = examine(p, "qcow", read_limit=None)
        assert not out.problems, (n, out.problems)
        if n < 48:
            assert out.open_error is not None and out.open_error[0] == "Truncated", (n, out)
            continue
        assert out.open_error is None, (n, out.open_error)
        assert out.codes, n
        with checks.open_named(p) as img:
            assert checks.map_view(img) == oracle.qemu_map(p), n
            qemu = oracle.run(oracle.QEMU_IMG, "convert", "-O", "raw", p, tmp_path / "c.raw",
                              check=False)
            try:
                mine = checks.guest_sha(img)
            except ImageError:
                mine = None
            if qemu.returncode == 0:
                assert mine == oracle.sha256_file(tmp_path / "c.raw"), n
            else:
                assert mine is None, n


def test_l2_table_inside_metadata_and_shared_cluster(corpus, tmp_path):
    """Structures sharing bytes: an L1 entry pointing at the L1 table itself, two L2
    entries naming one data cluster."""
    p = _copy(corpus, "plain", tmp_path)
    entries = l2_entries(p)
    poke(p, entries[1][1], ">Q", entries[0][2])               # cluster 1 -> cluster 0's data
    poke(p, header(p)["l1_table_offset"] + 16, ">Q", 48)      # L2 table 2 = the L1 table
    out = examine(p, "qcow", read_limit=None)
    assert not out.problems and out.open_error is None
    assert {"host_overlap", "l2_table_misaligned"} <= set(out.codes)
    with imgscope.open(p) as img, img.open_guest() as g:
        a = g.read(4096)
        assert g.read(4096) == a


# --------------------------------------------------------------------------- hostile headers and tables


HEADER_POKES = {
    # name: (offset, struct format, value, expected codes or error type)
    "cluster_bits_small": (32, ">B", 8, {"cluster_bits_invalid"}),
    "cluster_bits_large": (32, ">B", 255, {"cluster_bits_invalid"}),
    "l2_bits_small": (33, ">B", 5, {"l2_bits_invalid"}),
    "l2_bits_large": (33, ">B", 14, {"l2_bits_invalid"}),
    "crypt_unknown": (36, ">I", 2, {"crypt_method_invalid"}),
    "size_zero": (24, ">Q", 0, {"size_too_small"}),
    "size_huge": (24, ">Q", 1 << 62, {"size_too_large"}),
    "size_max": (24, ">Q", (1 << 64) - 1, {"size_too_large"}),
    "size_odd": (24, ">Q", 5 * MiB + 700, {"size_unaligned"}),
    "padding": (34, ">H", 0xBEEF, {"header_padding_nonzero"}),
    "l1_far": (40, ">Q", (1 << 64) - 8, {"table_beyond_eof"}),
    "backing_too_long": (8, ">QI", (48, 5000), {"backing_name_too_long"}),
    "backing_past_eof": (8, ">QI", (1 << 40, 100), {"backing_name_beyond_eof"}),
    "version_2": (4, ">I", 2, "Unsupported"),
    "version_0": (4, ">I", 0, "Unsupported"),
}


@pytest.mark.parametrize("name", sorted(HEADER_POKES))
def test_hostile_headers_bounded(corpus, tmp_path, name):
    off, fmt, value, want = HEADER_POKES[name]
    p = _copy(corpus, "plain", tmp_path)
    poke(p, off, fmt, *(value if isinstance(value, tuple) else (value,)))
    out = check_bounded(p, name, "qcow")
    if isinstance(want, str):
        assert out.open_error is not None and out.open_error[0] == want, out.open_error
        return
    assert out.open_error is None, out.open_error
    assert want <= set(out.codes), (name, out.codes)


def test_header_values_that_stop_mapping(corpus, tmp_path):
    p = _copy(corpus, "plain", tmp_path)
    poke(p, 32, ">B", 40)
    with imgscope.open(p) as img:
        assert img.cluster_size is None and "cluster_bits_invalid" in set(img.findings.code)
        assert img.extents().kind.astype(str).tolist() == ["unallocated"]
        assert "cluster-size" not in img.info()
    poke(p, 32, ">B", 12)
    poke(p, 36, ">I", 9)
    with imgscope.open(p) as img:
        assert img.info()["encrypted"] is True
        assert "encrypted" in set(img.extents().kind.astype(str))
    with pytest.raises(ParseError):
        imgscope.open(p, strict=True)
    poke(p, 0, ">I", 0x12345678)
    with pytest.raises(ParseError):
        imgscope.open(p, "qcow")
    short = tmp_path / "short.qcow"
    short.write_bytes(corpus["plain"].read_bytes()[:30])
    with pytest.raises(Truncated):
        imgscope.open(short, "qcow")


def test_hostile_l1_tables_bounded(corpus, tmp_path):
    """L1 entries naming overlapping L2 tables at every byte, or past the end; a huge
    disk whose L1 is the whole file; and tiny limits that must raise LimitExceeded."""
    p = _copy(corpus, "empty", tmp_path)
    h = header(p)
    n = -(-h["size"] // (1 << 21))
    size = p.stat().st_size
    vals = np.arange(n, dtype=np.uint64) % np.uint64(size - 4096) + np.uint64(1)
    vals[::7] = np.uint64(1 << 50)
    with open(p, "r+b") as f:
        f.seek(h["l1_table_offset"])
        f.write(vals.astype(">u8").tobytes())
    out = check_bounded(p, "overlapping L2 tables", "qcow")
    assert out.open_error is None or out.open_error[0] == "LimitExceeded", out.open_error
    assert {"l2_table_beyond_eof", "l2_table_misaligned"} <= set(out.codes) or out.open_error
    with pytest.raises(LimitExceeded):
        imgscope.open(p, limits=imgscope.Limits(max_metadata_bytes=64 * KiB))
    q = _copy(corpus, "plain", tmp_path, "huge.qcow")
    poke(q, 24, ">Q", 1 << 56)
    poke(q, 32, ">BB", 16, 13)
    out = check_bounded(q, "huge disk", "qcow")
    # 2^27 L1 entries: QEMU would allocate 1 GiB for them; imgscope stops at its table limit
    assert out.open_error is None and "table_too_large" in out.codes


def test_random_mutations_raise_only_image_errors(corpus, tmp_path):
    src = bytearray(corpus["plain"].read_bytes())
    l2 = [int(x) for x in l1_of(corpus["plain"]) if x]
    hot = [(0, 48), (48, 600)] + [(o, o + 4096) for o in l2]
    rnd = random.Random(13)
    for i in range(40):
        data = bytearray(src)
        for _ in range(rnd.randrange(1, 10)):
            lo, hi = rnd.choice(hot)
            data[rnd.randrange(lo, hi)] = rnd.randrange(256)
        (tmp_path / f"m{i}.qcow").write_bytes(data)

    def body():
        bad = []
        for i in range(40):
            out = examine(tmp_path / f"m{i}.qcow", "qcow", read_limit=2 * MiB)
            if out.problems:
                bad.append((i, out.problems))
        return bad
    res = run_isolated(body, timeout=120)
    assert res == ("ok", []), res


# --------------------------------------------------------------------------- backing files


def test_backing_names_are_confined(corpus, tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    shutil.copy(corpus["raw_chain"].parent / "base.raw", tmp_path / "outside.raw")
    top = _create(inner / "top.qcow", 3 * MiB, "-u", "-b", "../outside.raw", "-F", "raw")
    with pytest.raises(UnsafePath):
        imgscope.open(top)
    with imgscope.open(top, allow_paths=[tmp_path]) as img:
        assert [l.format for l in img.chain] == ["qcow", "raw"]
        assert img.backing_name == "../outside.raw"
    gone = _create(inner / "gone.qcow", 3 * MiB, "-u", "-b", "missing.raw", "-F", "raw")
    with pytest.raises(ChainError, match="missing.raw"):
        imgscope.open(gone)
    # a name with a NUL inside: QEMU stops at the NUL (pstrcpy)
    nul = _create(inner / "nul.qcow", 3 * MiB, "-u", "-b", "base.raw", "-F", "raw")
    shutil.copy(corpus["raw_chain"].parent / "base.raw", inner / "base.raw")
    poke(nul, 48, ">4s", b"bas\0")
    with pytest.raises(ChainError, match="'bas'"):
        imgscope.open(nul)


def test_corpus_is_never_modified(corpus, tmp_path):
    before = {p: oracle.sha256_file(p) for p in corpus.values()}
    for p in corpus.values():
        examine(p, "qcow", read_limit=MiB)
    assert before == {p: oracle.sha256_file(p) for p in corpus.values()}
