"""convert / create and the raw and qcow2 writers, held against qemu-img.

Every source kind imgscope reads (a qcow2 backing chain, compressed qcow2, an
internal snapshot, VMDK stream, VDI, VPC, VHDX, qcow v1, raw, a partition and
an LVM volume of an image) is converted to raw and to qcow2 with each option
set; for every output: `qemu-img check` is clean, `qemu-img compare` with the
source's guest (qemu-img's own raw conversion, or the fixture's expected LV
bytes) says identical, `qemu-img info` shows the asked-for options, imgscope
re-opens it with no findings, and its actual size is within 10% of what
`qemu-img convert` makes with the same options from the same source.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import imgscope
from imgscope.cli import main as cli_main
from imgscope.conversion.pipeline import convert, create
from imgscope.errors import ConvertError, ImageError
from imgscope.model import KIND_COMPRESSED

import oracle

SAMPLES = Path(__file__).resolve().parents[1] / "sample_images"
MiB = 1 << 20

# source name -> (spec relative to the work folder, source format, snapshot)
SOURCES = {
    "qcow2_chain": ("chain-top.qcow2", None, None),
    "qcow2_compressed": ("compressed.qcow2", None, None),
    "qcow2_snapshot": ("demo.qcow2", None, "before-update"),
    "vmdk_stream": ("stream.vmdk", None, None),
    "vdi": ("sparse.vdi", None, None),
    "vpc": ("sparse.vhd", "vpc", None),
    "vhdx": ("sparse.vhdx", None, None),
    "qcow": ("sparse.qcow", None, None),
    "raw": ("mixed.raw", "raw", None),
    "partition": ("gpt-disk.qcow2:part2", None, None),
    "lvm": ("lvm_pv.qcow2:lvm:data", None, None),
}

# target name -> (format, -o options, compress)
TARGETS = {
    "raw": ("raw", {}, False),
    "raw_full": ("raw", {"preallocation": "full"}, False),
    "qcow2": ("qcow2", {}, False),
    "qcow2_v2_4k": ("qcow2", {"compat": "0.10", "cluster_size": "4096"}, False),
    "qcow2_l2ext_lazy_rc1": ("qcow2", {"extended_l2": "on", "lazy_refcounts": "on",
                                       "refcount_bits": "1", "cluster_size": "32k"}, False),
    "qcow2_rc64_meta": ("qcow2", {"refcount_bits": "64", "preallocation": "metadata"}, False),
    "qcow2_zlib_c": ("qcow2", {"cluster_size": "4k"}, True),
    "qcow2_zstd_c": ("qcow2", {"compression_type": "zstd", "refcount_bits": "8"}, True),
}


def _mixed_raw(path: Path) -> None:
    """8 MiB raw: text-like data, random blocks, a zero block written out, holes."""
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        text = (b"imgscope converts disk images; " * 40000)[:MiB]
        f.seek(0)
        f.write(text)
        f.seek(3 * MiB + 4096)
        f.write(rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes())
        f.seek(5 * MiB)
        f.write(bytes(256 * 1024))                      # zeros written: must stay a hole
        f.seek(7 * MiB - 512)
        f.write(b"\xa5" * 1024)                         # crosses a 64 KiB boundary
        f.seek(8 * MiB - 100)
        f.write(b"end" * 33)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    oracle.require_tools()
    d = tmp_path_factory.mktemp("convert")
    for name in ("chain-base.qcow2", "chain-top.qcow2", "compressed.qcow2", "demo.qcow2",
                 "stream.vmdk", "sparse.vdi", "sparse.vhd", "sparse.vhdx", "sparse.qcow",
                 "gpt-disk.qcow2", "sparse.raw"):
        shutil.copy(SAMPLES / name, d / name)
    _mixed_raw(d / "mixed.raw")
    spec = importlib.util.spec_from_file_location("make_lvm_fixtures",
                                                  SAMPLES / "make_lvm_fixtures.py")
    lvm = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_lvm_fixtures", lvm)
    spec.loader.exec_module(lvm)
    lvm.build_fixtures(d / "lvm")
    oracle.run(oracle.QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", d / "lvm" / "lvm_pv.raw",
               d / "lvm_pv.qcow2")
    return d


@pytest.fixture(scope="module")
def references(work) -> dict[str, Path]:
    """Each source's guest as a raw file qemu-img made (LV and partition: sliced bytes)."""
    out = {}
    ref = work / "ref"
    ref.mkdir()
    for name, (spec, fmt, snap) in SOURCES.items():
        dest = ref / f"{name}.raw"
        if name == "partition":
            whole = oracle.qemu_raw(work / "gpt-disk.qcow2", ref / "gpt-disk.raw")
            with imgscope.open(work / "gpt-disk.qcow2") as img:
                part = img.partition(2)
                start, size = part.start, part.readable
            with open(whole, "rb") as f:
                f.seek(start)
                dest.write_bytes(f.read(size))
        elif name == "lvm":
            shutil.copy(work / "lvm" / "lvm_pv.data.expected.raw", dest)
        else:
            oracle.qemu_raw(work / spec, dest, snapshot=snap, fmt=fmt)
        out[name] = dest
    return out


def _qemu_convert(src: Path, dst: Path, snap, fmt, target) -> None:
    out_fmt, opts, comp = target
    args = [oracle.QEMU_IMG, "convert", "-U", "-O", out_fmt]
    if fmt:
        args += ["-f", fmt]
    if snap:
        args += ["-l", f"snapshot.name={snap}"]
    if opts:
        args += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    if comp:
        args.append("-c")
    oracle.run(*args, src, dst, cwd=src.parent)


def _actual(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture(scope="module")
def matrix(work, references) -> dict:
    """Every source converted to every target by imgscope and by qemu-img."""
    out = {}
    ours_dir, theirs_dir = work / "ours", work / "theirs"
    ours_dir.mkdir()
    theirs_dir.mkdir()
    for sname, (spec, fmt, snap) in SOURCES.items():
        for tname, target in TARGETS.items():
            out_fmt, opts, comp = target
            ours = ours_dir / f"{sname}.{tname}.{out_fmt}"
            convert(work / spec, ours, out_fmt, options=opts, compress=comp,
                    source_format=fmt, snapshot=snap)
            theirs = theirs_dir / ours.name
            if sname in ("partition", "lvm"):      # qemu-img reads them from our reference
                _qemu_convert(references[sname], theirs, None, "raw", target)
            else:
                _qemu_convert(work / spec, theirs, snap, fmt, target)
            out[sname, tname] = (ours, theirs)
    return out


CASES = [(s, t) for s in SOURCES for t in TARGETS]


@pytest.mark.parametrize("source,target", CASES, ids=[f"{s}-{t}" for s, t in CASES])
def test_output_agrees_with_qemu(matrix, references, source, target):
    ours, theirs = matrix[source, target]
    out_fmt, opts, comp = TARGETS[target]
    # the guest is the source's guest
    proc = oracle.run(oracle.QEMU_IMG, "compare", "-f", "raw", "-F", out_fmt,
                      references[source], ours, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # qemu-img check is clean
    if out_fmt == "qcow2":
        rc, report = oracle.qemu_check(ours)
        assert rc == 0, report
        assert not report.get("leaks") and not report.get("corruptions"), report
    # the options show in qemu-img info
    info = oracle.qemu_info(ours)
    assert info["format"] == out_fmt
    assert info["virtual-size"] == oracle.qemu_info(theirs)["virtual-size"]
    if out_fmt == "qcow2":
        spec = info["format-specific"]["data"]
        assert info["cluster-size"] == imgscope.units.parse_size(opts.get("cluster_size", "64k"))
        assert spec["compat"] == ("0.10" if opts.get("compat") == "0.10" else "1.1")
        if spec["compat"] == "1.1":
            assert spec["refcount-bits"] == int(opts.get("refcount_bits", 16))
            assert spec["lazy-refcounts"] == (opts.get("lazy_refcounts") == "on")
            assert spec["extended-l2"] == (opts.get("extended_l2") == "on")
            assert spec["compression-type"] == opts.get("compression_type", "zlib")
        if comp:
            kinds = {e.get("data") for e in oracle.qemu_map(ours)}
            assert kinds      # the map is readable
    # imgscope re-opens it with no findings and reads the same guest
    with imgscope.open(ours, out_fmt) as img:
        assert len(img.findings) == 0, img.findings.to_string()
        assert img.info()["virtual-size"] == info["virtual-size"]
    # as small as qemu-img's: never more than 10% larger.  raw outputs are within 10%
    # either way; qcow2 outputs may be smaller: qemu-img writes its header, refcount
    # table, refcount block and L1 clusters out whole, imgscope leaves their zero
    # tails as holes (on these small disks that is most of qemu-img's file)
    a, b = _actual(ours), _actual(theirs)
    assert a <= 1.1 * b + 4096, (a, b)
    if out_fmt == "raw":
        assert a >= 0.9 * b - 4096, (a, b)


def test_compressed_output_is_compressed(matrix, references):
    """-c on compressible data: compressed clusters in the map, smaller than uncompressed."""
    ours, _ = matrix["raw", "qcow2_zstd_c"]
    plain, _ = matrix["raw", "qcow2"]
    with imgscope.open(ours) as img:
        table = img.extent_table()
        assert (table.kind == KIND_COMPRESSED).any()
        assert img.format_specific()["data"]["compression-type"] == "zstd"
    assert _actual(ours) < _actual(plain)


def test_raw_qcow2_raw_round_trip_is_bit_identical(work, tmp_path):
    src = work / "mixed.raw"
    for opts, comp in (({}, False), ({"compat": "0.10", "cluster_size": "512"}, False),
                       ({"extended_l2": "on"}, True)):
        q = tmp_path / "rt.qcow2"
        back = tmp_path / "rt.raw"
        convert(src, q, "qcow2", options=opts, compress=comp, overwrite=True)
        convert(q, back, "raw", overwrite=True)
        assert oracle.sha256_file(back) == oracle.sha256_file(src)
        assert os.path.getsize(back) == os.path.getsize(src)
        # holes stay holes: the written zero block and the unwritten ranges
        assert _actual(back) <= _actual(src)


def test_sparse_size_zero_writes_everything(work, tmp_path):
    dst = tmp_path / "full.raw"
    convert(work / "sparse.raw", dst, "raw", sparse_size=0)
    assert _actual(dst) >= os.path.getsize(dst)
    assert oracle.sha256_file(dst) == oracle.sha256_file(work / "sparse.raw")
    with pytest.raises(ConvertError):
        convert(work / "sparse.raw", tmp_path / "bad.raw", "raw", sparse_size=1000)


def test_backing_file_output_holds_only_differences(work, tmp_path):
    """-B: ranges equal to the backing are left out; source zeros over backing data
    become zero clusters (v3) or written zeros (v2)."""
    base = tmp_path / "base.qcow2"
    oracle.run(oracle.QEMU_IMG, "convert", "-O", "qcow2", work / "mixed.raw", base)
    changed = tmp_path / "changed.raw"
    shutil.copy(work / "mixed.raw", changed)
    with open(changed, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"new data" * 8192)        # 64 KiB of new data in a hole of the base
        f.seek(0)
        f.write(bytes(128 * 1024))          # zeros over the base's text
    for compat in ("1.1", "0.10"):
        out = tmp_path / f"overlay-{compat}.qcow2"
        convert(changed, out, "qcow2", options={"compat": compat}, backing="base.qcow2",
                backing_format="qcow2")
        rc, report = oracle.qemu_check(out)
        assert rc == 0, report
        info = oracle.qemu_info(out)
        assert info["backing-filename"] == "base.qcow2"
        assert info["backing-filename-format"] == "qcow2"
        proc = oracle.run(oracle.QEMU_IMG, "compare", "-F", "qcow2", changed, out, check=False)
        assert proc.returncode == 0, proc.stdout
        top = [e for e in oracle.qemu_map(out) if e["depth"] == 0]
        covered = sum(e["length"] for e in top)
        assert covered == 64 * 1024 + 128 * 1024, top   # only the two changed ranges
        if compat == "1.1":
            assert any(e["zero"] and not e["data"] and e["start"] == 0 for e in top), top
    # the header of a backing-file image is byte for byte what qemu-img writes
    ref = tmp_path / "ref-overlay.qcow2"
    oracle.run(oracle.QEMU_IMG, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
               ref, cwd=tmp_path)
    ours = create(tmp_path / "our-overlay.qcow2", "qcow2", backing="base.qcow2",
                  backing_format="qcow2")
    head = 0x300
    assert ours.read_bytes()[:head] == ref.read_bytes()[:head]


def test_create_matches_qemu_img(work, tmp_path):
    for fmt, opts in (("qcow2", {}), ("qcow2", {"compat": "0.10"}),
                      ("qcow2", {"cluster_size": "512"}), ("raw", {})):
        ours = create(tmp_path / "c.img", fmt, "100M", opts, overwrite=True)
        theirs = tmp_path / "q.img"
        args = ["-o", ",".join(f"{k}={v}" for k, v in opts.items())] if opts else []
        oracle.run(oracle.QEMU_IMG, "create", "-f", fmt, *args, theirs, "100M")
        assert ours.read_bytes() == theirs.read_bytes(), (fmt, opts)
        theirs.unlink()
    # size from the backing file
    made = create(tmp_path / "over.qcow2", "qcow2", backing=str(work / "chain-top.qcow2"))
    assert oracle.qemu_info(made)["virtual-size"] == oracle.qemu_info(work / "chain-top.qcow2")["virtual-size"]
    with pytest.raises(ConvertError):
        create(tmp_path / "nosize.qcow2", "qcow2")
    with pytest.raises(ConvertError):
        create(tmp_path / "bad.qcow2", "qcow2", "1M", {"compat": "0.10", "lazy_refcounts": "on"})
    with pytest.raises(ConvertError):
        create(tmp_path / "bad.qcow2", "qcow2", "1M", {"cluster_size": "3000"})
    assert not (tmp_path / "bad.qcow2").exists()


def _leftovers(folder: Path, name: str) -> list[str]:
    return [p.name for p in folder.iterdir() if name in p.name]


def test_existing_destination_is_refused(work, tmp_path):
    dst = tmp_path / "exists.qcow2"
    dst.write_bytes(b"keep me")
    with pytest.raises(ConvertError, match="already exists"):
        convert(work / "sparse.raw", dst, "qcow2")
    assert dst.read_bytes() == b"keep me"
    assert cli_main(["convert", "-O", "qcow2", str(work / "sparse.raw"), str(dst)]) == 1
    assert dst.read_bytes() == b"keep me"
    assert cli_main(["convert", "-O", "qcow2", "--force", str(work / "sparse.raw"), str(dst)]) == 0
    assert oracle.qemu_info(dst)["format"] == "qcow2"
    assert _leftovers(tmp_path, "exists.qcow2") == ["exists.qcow2"]


def test_failed_conversion_leaves_nothing(work, tmp_path):
    """A compressed cluster that does not decode, met mid-way: no file under dst."""
    bad = tmp_path / "damaged.qcow2"
    shutil.copy(work / "compressed.qcow2", bad)
    with imgscope.open(bad) as img:
        t = img.extent_table()
        hosts = t.host[t.kind == KIND_COMPRESSED]
        assert hosts.size >= 2
        victim = int(hosts[-1])
    with open(bad, "r+b") as f:
        f.seek(victim)
        f.write(b"\xff" * 64)
    for fmt in ("raw", "qcow2"):
        dst = tmp_path / f"out.{fmt}"
        with pytest.raises(ImageError):
            convert(bad, dst, fmt)
        assert _leftovers(tmp_path, f"out.{fmt}") == []
    assert cli_main(["convert", "-O", "qcow2", str(bad), str(tmp_path / "cli.qcow2")]) == 1
    assert _leftovers(tmp_path, "cli.qcow2") == []


def test_ctrl_c_leaves_nothing(work, tmp_path):
    calls = []

    def progress(done, total):
        calls.append((done, total))
        if done > 0:
            raise KeyboardInterrupt

    for comp in (False, True):
        dst = tmp_path / "int.qcow2"
        with pytest.raises(KeyboardInterrupt):
            convert(work / "mixed.raw", dst, "qcow2", compress=comp, progress=progress)
        assert _leftovers(tmp_path, "int.qcow2") == []
    assert calls[0][0] == 0 and calls[0][1] > 0


def test_progress_reaches_total_and_skips_holes(work, tmp_path):
    seen = []
    convert(work / "mixed.raw", tmp_path / "p.qcow2", progress=lambda d, t: seen.append((d, t)))
    done, total = seen[-1]
    assert done == total
    assert total < os.path.getsize(work / "mixed.raw")     # holes are never read


def test_source_objects(work, references, tmp_path):
    """An open image, a partition object, an LV reader as sources."""
    with imgscope.open(work / "gpt-disk.qcow2") as img:
        convert(img, tmp_path / "img.raw", "raw")
        convert(img.partition(2), tmp_path / "part.raw", "raw")
        assert (tmp_path / "part.raw").read_bytes() == references["partition"].read_bytes()
    with imgscope.open(work / "lvm_pv.qcow2") as img:
        convert(img.lvm().open("data"), tmp_path / "lv.qcow2", "qcow2")
    assert oracle.run(oracle.QEMU_IMG, "compare", "-f", "raw", references["lvm"],
                      tmp_path / "lv.qcow2", check=False).returncode == 0
    assert oracle.run(oracle.QEMU_IMG, "compare", "-F", "raw", work / "gpt-disk.qcow2",
                      tmp_path / "img.raw", check=False).returncode == 0


def test_cli_convert_create_compare(work, tmp_path, capsys):
    out = tmp_path / "cli.qcow2"
    assert cli_main(["convert", "-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=8", "-c",
                     "-p", str(work / "gpt-disk.qcow2") + ":part1", str(out)]) == 0
    info = oracle.qemu_info(out)
    assert info["cluster-size"] == 4096
    assert info["format-specific"]["data"]["refcount-bits"] == 8
    assert cli_main(["convert", "-l", "after-update", str(work / "demo.qcow2"),
                     str(tmp_path / "snap.raw")]) == 0
    ref = oracle.qemu_raw(work / "demo.qcow2", tmp_path / "snapref.raw", snapshot="after-update")
    assert oracle.sha256_file(tmp_path / "snap.raw") == oracle.sha256_file(ref)
    assert cli_main(["create", "-f", "qcow2", "-q", "-b", "cli.qcow2", "-F", "qcow2",
                     str(tmp_path / "top.qcow2")]) == 0
    assert oracle.qemu_info(tmp_path / "top.qcow2")["backing-filename"] == "cli.qcow2"
    capsys.readouterr()
    assert cli_main(["compare", str(out), str(tmp_path / "top.qcow2")]) == 0
    assert "identical" in capsys.readouterr().out
    assert cli_main(["compare", str(work / "sparse.raw"), str(work / "mixed.raw")]) == 1
    assert cli_main(["convert", "-O", "qcow2", "-o", "help", "x", "y"]) == 0
    assert "refcount_bits" in capsys.readouterr().out
    assert cli_main(["convert", "-O", "qcow2", "-o", "nosuch=1", str(work / "sparse.raw"),
                     str(tmp_path / "n.qcow2")]) == 1
    assert not (tmp_path / "n.qcow2").exists()
    assert cli_main(["convert", "-O", "raw", "-B", "x", str(work / "sparse.raw"),
                     str(tmp_path / "nb.raw")]) == 1


def test_into_existing_target_is_written_in_place(work, tmp_path):
    """-n (qemu-img's 'skip target creation'): an existing raw target full of
    garbage, larger than the source, ends up holding the source's guest in its
    first bytes (holes punched, so they read as zeros) and keeps its tail; the
    file is the same inode, never replaced."""
    src = work / "mixed.raw"
    size = os.path.getsize(src)
    dst = tmp_path / "device.raw"
    rng = np.random.default_rng(11)
    tail = rng.integers(0, 256, MiB, dtype=np.uint8).tobytes()
    dst.write_bytes(rng.integers(1, 256, size, dtype=np.uint8).tobytes() + tail)
    inode = os.stat(dst).st_ino
    convert(src, dst, "raw", into_existing=True)
    assert os.stat(dst).st_ino == inode
    assert os.path.getsize(dst) == size + MiB
    with open(dst, "rb") as f:
        head = f.read(size)
        assert f.read() == tail
    assert hashlib.sha256(head).hexdigest() == oracle.sha256_file(src)
    # the zero ranges were punched out, not written: the file is sparse again
    assert _actual(dst) < size + MiB
    # a qcow2 source through the CLI, with -S 0 (every byte written)
    dst.write_bytes(b"\xee" * (size + MiB))
    q = tmp_path / "src.qcow2"
    oracle.run(oracle.QEMU_IMG, "convert", "-O", "qcow2", src, q)
    assert cli_main(["convert", "-n", "-S", "0", "-O", "raw", str(q), str(dst)]) == 0
    with open(dst, "rb") as f:
        assert hashlib.sha256(f.read(size)).hexdigest() == oracle.sha256_file(src)
        assert f.read() == b"\xee" * MiB


def test_into_existing_refusals_leave_the_target(work, tmp_path):
    src = work / "mixed.raw"
    small = tmp_path / "small.raw"
    small.write_bytes(b"\x01" * 4096)
    with pytest.raises(ConvertError, match="smaller"):
        convert(src, small, "raw", into_existing=True)
    assert small.read_bytes() == b"\x01" * 4096
    with pytest.raises(ConvertError, match="Could not open"):
        convert(src, tmp_path / "missing.raw", "raw", into_existing=True)
    assert not (tmp_path / "missing.raw").exists()
    q = tmp_path / "t.qcow2"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", q, "16M")
    before = oracle.sha256_file(q)
    with pytest.raises(ConvertError, match="existing raw"):
        convert(src, q, "qcow2", into_existing=True)
    assert cli_main(["convert", "-n", "-O", "qcow2", str(src), str(q)]) == 1
    assert oracle.sha256_file(q) == before


def test_package_functions_survive_their_modules_loading(work, tmp_path):
    """imgscope.convert / create / compare / resize stay callable after the modules
    behind them are imported (a package attribute must not shadow them)."""
    import importlib
    for name in ("pipeline", "compare", "resize", "writers", "zeros"):
        importlib.import_module(f"imgscope.conversion.{name}")
    for _ in range(2):
        out = imgscope.convert(work / "sparse.raw", tmp_path / "twice.qcow2", "qcow2",
                               overwrite=True)
        assert imgscope.compare(work / "sparse.raw", out).identical
    assert callable(imgscope.create) and callable(imgscope.resize)


def test_progress_true_draws_a_tqdm_bar(work, tmp_path, capsys):
    """progress=True: a tqdm bar (text on stderr outside Jupyter) that reaches the total."""
    convert(work / "mixed.raw", tmp_path / "bar.qcow2", progress=True)
    err = capsys.readouterr().err
    assert "convert: 100%" in err and "B/s" in err
    assert imgscope.compare(work / "mixed.raw", tmp_path / "bar.qcow2", progress=True).identical
    assert "compare: 100%" in capsys.readouterr().err


def test_many_small_runs_are_packed_and_kept(tmp_path):
    """Hundreds of small data runs (packed several to a read buffer), an odd-sized
    disk whose last unit is short, a backing file differing in some of them: every
    output reads back bit-identical and qemu-img compare agrees."""
    size = 16 * MiB + 1536
    src = tmp_path / "small-runs.raw"
    rng = np.random.default_rng(5)
    with open(src, "wb") as f:
        f.truncate(size)
        for k in range(0, 16 * MiB, 24 * 1024):
            f.seek(k + 512 * (k // 24576 % 7))
            f.write(rng.integers(1, 256, 4096, dtype=np.uint8).tobytes())
        f.seek(size - 700)
        f.write(b"tail" * 100)
    for fmt, opts in (("qcow2", {"cluster_size": "4096"}), ("qcow2", {}), ("vmdk", {}),
                      ("vdi", {}), ("raw", {})):
        out = tmp_path / f"out-{fmt}-{len(opts)}.{fmt}"
        convert(src, out, fmt, options=opts)
        back = oracle.qemu_raw(out, tmp_path / f"back-{fmt}-{len(opts)}.raw", fmt=fmt)
        with open(back, "rb") as f:
            assert hashlib.sha256(f.read(size)).hexdigest() == oracle.sha256_file(src), fmt
    base = tmp_path / "base.qcow2"
    oracle.run(oracle.QEMU_IMG, "convert", "-O", "qcow2", src, base)
    changed = tmp_path / "changed.raw"
    shutil.copy(src, changed)
    with open(changed, "r+b") as f:
        for k in range(0, 16 * MiB, 1 * MiB):
            f.seek(k + 100)
            f.write(b"\0" * 300 + b"new")
    out = tmp_path / "overlay.qcow2"
    convert(changed, out, "qcow2", backing="base.qcow2", backing_format="qcow2")
    assert oracle.run(oracle.QEMU_IMG, "compare", "-f", "raw", changed, out,
                      check=False).returncode == 0
