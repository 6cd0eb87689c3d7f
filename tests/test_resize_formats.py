"""Resize of vdi, vmdk and vpc images (which qemu-img 7.2 cannot resize), held against qemu.

Every image is made by `qemu-img convert` from a sparse raw disk with known random data,
copied sparsely, and resized by imgscope twice: through the API (`imgscope.resize`) and
through the CLI (`imgscope resize [--shrink] FILE SIZE`, exit 0); both copies must come
out byte-identical.  Then qemu-img is the oracle:

* `qemu-img info` shows the new virtual size (for vpc: the size `qemu-img create` gives
  a disk asked to be that big, which is the size imgscope returns);
* `qemu-img check` is clean (vdi, vmdk; qemu-img has no check for vpc);
* `qemu-img compare` says the image equals the raw disk truncated to the new size: old
  data kept, new space (and the hidden tail of a partly used last block) zeros;
* `qemu-io write -P 0x5a` into the new space succeeds, `qemu-img check` stays clean and
  imgscope reads the pattern back (the tables really cover the new space);
* imgscope re-opens the image with no findings and its check is clean (a resize that had
  to move blocks leaves the space they used unreferenced: one `info` finding, no more);
* descriptor / footer geometry equals what `qemu-img create` writes for the new size.

Refusals (shrink without the flag, shrink over data, streamOptimized, split and delta
VMDKs, a full static VDI map, sizes qemu refuses) leave every file's SHA-256 unchanged.
A crash after any phase of a resize that moves blocks leaves an image qemu reads with
its old or its new size and the old data.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import oracle
import pytest

import imgscope
from imgscope.cli import main as cli_main
from imgscope.conversion.compare import compare_images
from imgscope.conversion.resize import _RESIZERS, parse_new_size
from imgscope.errors import ConvertError, ImageError, Unsupported

MiB = 1 << 20
GiB = 1 << 30
SIZE = 64 * MiB
DATA_AT = ((1 * MiB, 3 * MiB), (40 * MiB, 100_000))      # (offset, length) of random data
TAIL_SIZE = SIZE - 4096                                   # last VDI block / VMDK grain partly used

# name -> (format, qemu-img convert options, raw source)
SOURCES = {
    "vdi": ("vdi", [], "raw"),
    "vdi_static": ("vdi", ["-o", "static=on"], "raw"),
    "vdi_low": ("vdi", [], "low"),
    "vdi_tail": ("vdi", [], "tail"),
    "vdi_full": ("vdi", [], "full"),               # every block allocated: the map is full
    "vmdk": ("vmdk", [], "raw"),
    "vmdk_zg": ("vmdk", ["-o", "zeroed_grain=on,adapter_type=lsilogic"], "raw"),
    "vmdk_low": ("vmdk", [], "low"),
    "vmdk_tail": ("vmdk", [], "tail"),
    "vmdk_flat": ("vmdk", ["-o", "subformat=monolithicFlat"], "raw"),
    "vmdk_stream": ("vmdk", ["-o", "subformat=streamOptimized"], "raw"),
    "vmdk_split": ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"], "raw"),
    "vpc": ("vpc", [], "raw"),
    "vpc_tail": ("vpc", [], "vtail"),
    "vpc_fixed": ("vpc", ["-o", "subformat=fixed"], "raw"),
    "vpc_force": ("vpc", ["-o", "force_size=on"], "raw"),
}


def _write_raw(path: Path, size: int, chunks) -> Path:
    rng = np.random.default_rng(7)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in chunks:
            f.seek(off)
            f.write(rng.integers(0, 256, length, dtype=np.uint8).tobytes())
    return path


def _sparse_copy(src: Path, dst: Path) -> None:
    """Copy keeping holes (a static vdi / flat vmdk / fixed vpc stays sparse)."""
    size = os.path.getsize(src)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            fi.seek(start)
            fo.seek(start)
            left = end - start
            while left:
                buf = fi.read(min(8 * MiB, left))
                fo.write(buf)
                left -= len(buf)
            pos = end


def _files(path: Path) -> list[Path]:
    """The image file and the extent files its descriptor names (flat vmdk)."""
    out = [path]
    flat = path.with_name(path.stem + "-flat" + path.suffix)
    if flat.exists():
        out.append(flat)
    out += sorted(path.parent.glob(path.stem + "-s0*" + path.suffix))
    return out


def _place(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in _files(src):
        _sparse_copy(f, folder / f.name)
    if src.name == "child.vmdk":                # and the parent it names
        _sparse_copy(src.with_name("vmdk.vmdk"), folder / "vmdk.vmdk")
    return folder / src.name


def _shas(path: Path) -> list[str]:
    return [oracle.sha256_file(f) for f in _files(path)]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    oracle.require_tools()
    root = tmp_path_factory.mktemp("resize_formats")
    raws = {"raw": _write_raw(root / "src.raw", SIZE, DATA_AT),
            "low": _write_raw(root / "low.raw", SIZE, ((1 * MiB, 65536),)),   # one block
            "tail": _write_raw(root / "tail.raw", TAIL_SIZE, DATA_AT + ((TAIL_SIZE - 5000, 5000),)),
            "full": _write_raw(root / "full.raw", 8 * MiB, ((0, 8 * MiB),))}
    # a CHS size (kept as it is by qemu-img) whose last 2 MiB block is partly used
    probe = root / "probe.vpc"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "vpc", probe, "63M")
    vsize = oracle.qemu_info(probe, fmt="vpc")["virtual-size"]
    raws["vtail"] = _write_raw(root / "vtail.raw", vsize, DATA_AT + ((vsize - 5000, 5000),))
    out = {"raw": raws}
    for name, (fmt, opts, raw) in SOURCES.items():
        dst = root / name / f"{name}.{fmt}"
        dst.parent.mkdir()
        oracle.run(oracle.QEMU_IMG, "convert", "-O", fmt, *opts, raws[raw], dst)
        out[name] = (dst, fmt, raws[raw])
    child = root / "vmdk" / "child.vmdk"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "vmdk", "-b", "vmdk.vmdk", "-F", "vmdk",
               child)
    out["vmdk_child"] = (child, "vmdk", raws["raw"])
    return out


def _ref(raw: Path, size: int, folder: Path) -> Path:
    """The raw source cut or extended to `size`: what the resized disk must hold."""
    ref = folder / f"ref_{size}.raw"
    _sparse_copy(raw, ref)
    os.truncate(ref, size)
    return ref


def _qemu_compare(ref: Path, path: Path, fmt: str) -> tuple[int, str]:
    proc = oracle.run(oracle.QEMU_IMG, "compare", "-f", "raw", "-F", fmt, ref, path,
                      check=False, cwd=path.parent)
    return proc.returncode, proc.stdout.strip()


def _qemu_created(fmt: str, size: int, folder: Path, opts=()) -> Path:
    """What `qemu-img create` makes for `size` (geometry and size oracle)."""
    path = folder / f"created_{size}.{fmt}"
    if not path.exists():
        oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", fmt, *opts, path, str(size))
    return path


def _read(path: Path, fmt: str, offset: int, length: int) -> bytes:
    with imgscope.open(path, fmt) as img, img.open_guest() as g:
        g.seek(offset)
        return g.read(length)


def _assert_clean(path: Path, fmt: str, allowed=()) -> None:
    """imgscope: no findings on open; check exit 0 with nothing above `info`, and only
    the `allowed` info codes."""
    with imgscope.open(path, fmt) as img:
        assert img.findings.empty, img.findings.to_string()
        report = img.check()
        assert report.exit_code == 0, report.human()
        codes = {(f.severity, f.code) for f in report.findings}
        assert codes <= {("info", c) for c in allowed}, codes


# (source, size, shrink, moves blocks)
CASES = [
    ("vdi", "+32M", False, False),             # the block map grows into its sector
    ("vdi", "+1G", False, True),               # the first data block moves to the end
    ("vdi", "48M", True, False),
    ("vdi_static", "+32M", False, False),      # appended preallocated blocks
    ("vdi_static", "48M", True, False),
    ("vmdk", "+32M", False, False),            # spare directory entries, new grain tables
    ("vmdk", "+8G", False, False),             # directories move to the end of the file
    ("vmdk", "48M", True, False),
    ("vmdk_zg", "+5G", False, False),          # version 2, zeroed-grain GTEs, lsilogic geometry
    ("vmdk_flat", "+32M", False, False),
    ("vmdk_flat", "48M", True, False),
    ("vpc", "+32M", False, False),             # rounded up to a CHS geometry
    ("vpc", "+1G", False, True),               # the first block moves out of the BAT's way
    ("vpc", "48M", True, False),
    ("vpc_fixed", "+32M", False, False),
    ("vpc_fixed", "48M", True, False),
    ("vpc_force", "+1000K", False, False),     # currentSize creator: the exact size
]


@pytest.mark.parametrize("name,size,shrink,moves", CASES)
def test_resize_against_qemu(src, tmp_path, name, size, shrink, moves):
    path, fmt, raw = src[name]
    api, cli = _place(path, tmp_path / "api"), _place(path, tmp_path / "cli")
    with imgscope.open(api, fmt) as img:
        old = img.virtual_size
    asked = parse_new_size(size, old)
    got = imgscope.resize(api, size, shrink=shrink)
    argv = ["resize", "-q", "-f", fmt] + (["--shrink"] if shrink else []) + [str(cli), size]
    assert cli_main(argv) == 0
    assert _shas(api) == _shas(cli)

    info = oracle.qemu_info(api, fmt=fmt)
    assert info["virtual-size"] == got
    if fmt == "vpc":          # qemu's size for a disk asked to be `asked` bytes
        opts = ["-o", "force_size=on"] if name == "vpc_force" else []
        made = _qemu_created(fmt, asked, tmp_path, opts)
        assert got == oracle.qemu_info(made, fmt=fmt)["virtual-size"] >= asked
        with imgscope.open(made, fmt) as want, imgscope.open(api, fmt) as have:
            geo = lambda f: (f["cylinders"], f["heads"], f["sectorsPerTrack"])
            assert geo(have.footer) == geo(want.footer)
            assert have.footer_copy == have.footer_end or have.footer_copy is None
    else:
        assert got == asked
    if fmt == "vmdk":
        opts = ["-o", "adapter_type=lsilogic"] if name == "vmdk_zg" else []
        made = _qemu_created(fmt, got, tmp_path, opts)
        with imgscope.open(made, fmt) as want, imgscope.open(api, fmt) as have:
            key = "ddb.geometry.cylinders"
            assert have.descriptor.get(key) == want.descriptor.get(key)
            assert have.descriptor.extents[0].sectors == got // 512
    if fmt != "vpc":
        code, report = oracle.qemu_check(api, fmt)
        assert code == 0, report
    assert _qemu_compare(_ref(raw, got, tmp_path), api, fmt)[0] == 0
    _assert_clean(api, fmt, ("unreferenced_space",) if moves else ())

    if got > old:             # the new space is covered by the tables: qemu can write there
        for off in (old, got - 64 * 1024):
            proc = oracle.qemu_io(api, f"write -P 0x5a {off} 64k", fmt=fmt)
            assert "wrote 65536/65536" in proc.stdout
            assert _read(api, fmt, off, 65536) == b"\x5a" * 65536
        if fmt != "vpc":
            assert oracle.qemu_check(api, fmt)[0] == 0
        _assert_clean(api, fmt, ("unreferenced_space",) if moves else ())
        assert _read(api, fmt, 1 * MiB, 4096) == _read(path, fmt, 1 * MiB, 4096)


@pytest.mark.parametrize("name,size", [("vdi", "+1G"), ("vdi_low", "+300G"), ("vpc", "+1G"),
                                       ("vmdk", "+8G")])
def test_tables_that_had_no_room(src, tmp_path, name, size):
    """The growth that does not fit the tables' room moves what is in the way: the VDI map
    to where the first data blocks were, the VHD blocks after the BAT to the end, the VMDK
    grain directories to the end; the old data stays where the moved copies say."""
    path, fmt, raw = src[name]
    work = _place(path, tmp_path / "w")
    with imgscope.open(path, fmt) as before:
        imgscope.resize(work, size)
        with imgscope.open(work, fmt) as after:
            if fmt == "vdi":
                assert after.h["offset_bmap"] == before.h["offset_data"]
                assert after.h["offset_data"] > before.h["offset_data"]
                used = np.sort(after.entries[after.entries < 0xFFFFFFFE])
                assert (used == np.arange(before.h["blocks_allocated"])).all()   # dense
                assert after.h["blocks_allocated"] == before.h["blocks_allocated"]
            elif fmt == "vpc":
                moved = before.bat != after.bat[:before.bat.size]
                assert moved.any()
                assert (after.bat[:before.bat.size][moved] * 512 >= before.footer_offset).all()
                assert after.bat.size == -(-after.virtual_size // after.block_size)
            else:
                b, a = before.extents_list[0].header, after.extents_list[0].header
                assert a["gdOffset"] > b["overHead"] and a["rgdOffset"] > b["overHead"]
                e = after.extents_list[0]
                assert e.gd.all() and e.rgd.all() and not np.intersect1d(e.gd, e.rgd).size
    assert _qemu_compare(_ref(raw, oracle.qemu_info(work, fmt=fmt)["virtual-size"], tmp_path),
                         work, fmt)[0] == 0


def test_vpc_exact_chs_size(src, tmp_path):
    """A size a CHS geometry represents exactly is kept exactly (qemu-img info shows it);
    one that is not is rounded up, as qemu-img create rounds it, and returned."""
    path, fmt, raw = src["vpc"]
    exact = oracle.qemu_info(_qemu_created(fmt, 3 * GiB, tmp_path), fmt=fmt)["virtual-size"]
    assert exact != 3 * GiB                     # 3 GiB is no CHS size ...
    work = _place(path, tmp_path / "a")
    assert imgscope.resize(work, str(exact)) == exact          # ... this one is
    assert oracle.qemu_info(work, fmt=fmt)["virtual-size"] == exact
    work = _place(path, tmp_path / "b")
    assert imgscope.resize(work, str(3 * GiB)) == exact
    assert oracle.qemu_info(work, fmt=fmt)["virtual-size"] == exact
    assert _qemu_compare(_ref(raw, exact, tmp_path), work, fmt)[0] == 0


@pytest.mark.parametrize("name", ["vdi_tail", "vmdk_tail", "vpc_tail"])
def test_hidden_tail_reads_zero(src, tmp_path, name):
    """Bytes of the last block/grain past the old end (garbage poked there, bitmap bits
    cleared) read as zeros once the disk grows over them."""
    path, fmt, raw = src[name]
    work = _place(path, tmp_path / "w")
    with imgscope.open(work, fmt) as img:
        old = img.virtual_size
        t = img._own_extents()
        last = np.flatnonzero(t.guest + t.length >= np.uint64(old))[-1]
        assert t.kind[last] == 0                # the last unit holds data
        unit = img.cluster_size
        hidden = int(t.host[last]) + (old - int(t.guest[last]))
        bitmap = (int(img.bat[(old - 1) // unit]) * 512 if fmt == "vpc" else None)
    assert old % unit
    with open(work, "r+b") as f:
        f.seek(hidden)
        f.write(b"\xee" * 3000)
        first = -(-(old % unit) // 512 // 8)    # first bitmap byte of hidden sectors only
        if bitmap is not None and first * 8 < unit // 512:
            f.seek(bitmap + first)              # clear the bits of hidden sectors
            f.write(b"\x00")
    assert _qemu_compare(_ref(raw, old, tmp_path), work, fmt)[0] == 0
    new = imgscope.resize(work, "+4M")
    assert _qemu_compare(_ref(raw, new, tmp_path), work, fmt)[0] == 0
    assert _read(work, fmt, old, 3000) == bytes(3000)
    _assert_clean(work, fmt)


@pytest.mark.parametrize("name", ["vdi_low", "vmdk_low"])
def test_shrink_then_grow(src, tmp_path, name):
    """Shrinking drops table entries past the end; growing again reuses the room."""
    path, fmt, raw = src[name]
    work = _place(path, tmp_path / "w")
    assert imgscope.resize(work, "8M", shrink=True) == 8 * MiB
    assert _qemu_compare(_ref(raw, 8 * MiB, tmp_path), work, fmt)[0] == 0
    _assert_clean(work, fmt)
    assert imgscope.resize(work, "100M") == 100 * MiB
    assert oracle.qemu_check(work, fmt)[0] == 0
    assert _qemu_compare(_ref(raw, 100 * MiB, tmp_path), work, fmt)[0] == 0
    oracle.qemu_io(work, "write -P 0x5a 90M 64k", fmt=fmt)
    assert oracle.qemu_check(work, fmt)[0] == 0
    assert _read(work, fmt, 90 * MiB, 65536) == b"\x5a" * 65536
    _assert_clean(work, fmt)


def test_shrink_preallocated_file_with_written_zeros(src, tmp_path):
    """A static vdi / fixed vpc / flat vmdk copied without its holes: the dropped tail is
    written zeros, read and found empty, so the shrink goes ahead."""
    for name in ("vdi_static", "vpc_fixed", "vmdk_flat"):
        path, fmt, raw = src[name]
        folder = tmp_path / name
        folder.mkdir()
        for f in _files(path):
            shutil.copyfile(f, folder / f.name)          # every byte written
        work = folder / path.name
        got = imgscope.resize(work, "48M", shrink=True)
        assert oracle.qemu_info(work, fmt=fmt)["virtual-size"] == got
        assert _qemu_compare(_ref(raw, got, tmp_path), work, fmt)[0] == 0
        _assert_clean(work, fmt)


def _unchanged(path: Path, action, kind=ImageError) -> ImageError:
    before = _shas(path)
    with pytest.raises(kind) as info:
        action()
    assert _shas(path) == before
    return info.value


REFUSALS = [
    # (source, size, shrink, error class, words in the message)
    ("vdi", "-1M", False, ConvertError, "--shrink"),
    ("vmdk", "-1M", False, ConvertError, "--shrink"),
    ("vpc", "-1M", False, ConvertError, "--shrink"),
    ("vdi", "30M", True, ConvertError, "allocated at offset 41943040"),
    ("vdi_static", "30M", True, ConvertError, "allocated"),
    ("vmdk", "30M", True, ConvertError, "allocated"),
    ("vmdk_flat", "30M", True, ConvertError, "allocated"),
    ("vpc", "30M", True, ConvertError, "allocated"),
    ("vpc_fixed", "30M", True, ConvertError, "allocated"),
    ("vdi_static", "+1G", False, Unsupported, "static"),      # the map has no room
    ("vmdk_stream", "+1G", False, Unsupported, "streamOptimized"),
    ("vmdk_split", "+1G", False, Unsupported, "extent"),
    ("vmdk_child", "+1G", False, Unsupported, "delta"),
    ("vdi", "+1000", False, ConvertError, "multiple of 512"),
    ("vpc", "3T", False, ConvertError, "2040 GiB"),
]


@pytest.mark.parametrize("name,size,shrink,kind,words", REFUSALS)
def test_refusals_leave_files_untouched(src, tmp_path, name, size, shrink, kind, words):
    path, fmt, _ = src[name]
    work = _place(path, tmp_path / "w")
    err = _unchanged(work, lambda: imgscope.resize(work, size, shrink=shrink), kind)
    assert words in err.message
    argv = ["resize", "-q", "-f", fmt] + (["--shrink"] if shrink else []) + [str(work), size]
    before = _shas(work)
    assert cli_main(argv) == 1
    assert _shas(work) == before


def test_cli_negative_size(src, tmp_path):
    """`imgscope resize --shrink FILE -16M` (a size argparse would take for an option)."""
    path, fmt, _ = src["vdi"]
    work = _place(path, tmp_path / "w")
    proc = oracle.run(sys.executable, "-m", "imgscope", "resize", "--shrink", work, "-16M",
                      check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Image resized." in proc.stdout
    assert oracle.qemu_info(work, fmt=fmt)["virtual-size"] == SIZE - 16 * MiB


@pytest.mark.parametrize("name,size", [("vdi", "+1G"), ("vdi_low", "+300G"), ("vdi_full", "+1G"),
                                       ("vpc", "+1G"), ("vmdk", "+8G")])
def test_crash_after_any_phase_keeps_data(src, tmp_path, name, size):
    """Stop the resize after each of its phases (fsync'ed): qemu opens the image with its
    old or its new size and reads the old data; the last phase gives the clean result."""
    path, fmt, raw = src[name]
    with imgscope.open(path, fmt) as img:
        old = img.virtual_size
        new = parse_new_size(size, old)
        phases = len(_RESIZERS[fmt](img, new).phases)
    assert phases >= 3
    sizes = set()
    for k in range(phases + 1):
        work = _place(path, tmp_path / f"p{k}")
        with imgscope.open(work, fmt) as img:
            plan = _RESIZERS[fmt](img, new)
        plan(phases=k if k < phases else None)
        shown = oracle.qemu_info(work, fmt=fmt)["virtual-size"]
        sizes.add(shown)
        assert shown == old or shown >= new
        ref = _ref(raw, shown, tmp_path)
        assert _qemu_compare(ref, work, fmt)[0] == 0, k
        assert compare_images(ref, work, fmt_a="raw", fmt_b=fmt).identical, k
        if fmt != "vpc":      # 2: vdi between its two header writes (see resize.py)
            assert oracle.qemu_check(work, fmt)[0] in ((0, 2) if fmt == "vdi" else (0,)), k
    assert len(sizes) == 2
    _assert_clean(work, fmt, ("unreferenced_space",))


def test_vpc_bat_grows_past_the_end_footer(tmp_path, capsys):
    """A freshly made dynamic VHD ends right after its 512-byte BAT: growing it to
    100 GiB moves the end footer (and the blocks in the BAT's way) beyond the new
    BAT; old data stays, the new space is writable, and the CLI says when the
    format rounded the size."""
    from imgscope.cli import main as cli_main
    img = tmp_path / "grow.vhd"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "vpc", img, "64M")
    oracle.run("qemu-io", "-f", "vpc", "-c", "write -P 0x11 0 64k", "-c",
               "write -P 0x22 60M 64k", img)
    assert cli_main(["resize", str(img), "100G"]) == 0
    err = capsys.readouterr().err
    size = oracle.qemu_info(img)["virtual-size"]
    assert size >= 100 << 30 and f"the disk is {size} bytes" in err
    oracle.run("qemu-io", "-f", "vpc", "-c", "write -P 0x5b 90G 64k", img)
    out = oracle.run("qemu-io", "-f", "vpc", "-c", "read -P 0x11 0 64k", "-c",
                     "read -P 0x22 60M 64k", "-c", "read -P 0x5b 90G 64k", "-c",
                     "read -P 0 64M 64k", img).stdout
    assert "Pattern verification failed" not in out and out.count("read ") == 4
    with imgscope.open(img) as image:
        assert image.check().exit_code == 0
        assert set(image.findings.code) <= {"unreferenced_space"}
