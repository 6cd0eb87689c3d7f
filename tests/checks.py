"""Checks shared by the tests that hold imgscope against qemu-img on real images
(tests/test_qcow2_oracle.py, tests/test_vmdk_oracle.py, tests/test_vmdk_fixtures.py).

The ``*_differences`` / ``*_problems`` helpers return messages (empty when all is well)
so a test can collect every disagreement of a corpus before it asserts; the
``assert_*`` helpers assert directly (conftest.py has pytest rewrite their asserts).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import imgscope
from imgscope.errors import ImageError
from imgscope.map import map_entries

# --------------------------------------------------------------------------- opening


def open_named(path, fmt: str | None = None, given_name: str | None = None):
    """Open as the CLI does when given ``given_name`` (default: ``str(path)``), so that
    names in the output are the ones qemu-img prints when given the same name."""
    from imgscope.cli import _name_chain
    img = imgscope.open(path, fmt)
    img.given_name = str(path) if given_name is None else given_name
    _name_chain(img)
    return img


def guest_sha(img, chunk: int = 8 << 20) -> str:
    """SHA-256 of the whole guest, read through ``open_guest()`` ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with img.open_guest() as g:
        while data := g.read(chunk):
            h.update(data)
    return h.hexdigest()


# --------------------------------------------------------------------------- info and map against qemu-img


def differences(mine: dict, theirs: dict, prefix: str = "", skip=()) -> list[str]:
    """One message per key whose value differs between imgscope's and qemu's dict."""
    return [f"{prefix}{key}: imgscope={mine.get(key)!r} qemu={theirs.get(key)!r}"
            for key in sorted(set(theirs) | set(mine))
            if key not in skip and theirs.get(key) != mine.get(key)]


def chain_differences(mine: list[dict], theirs: list[dict], prefix: str = "") -> list[str]:
    """``differences`` of each layer of two ``info(backing_chain=True)`` lists."""
    return [d for depth, (a, b) in enumerate(zip(mine, theirs))
            for d in differences(a, b, f"{prefix}[{depth}]: ")]


def map_view(img) -> list[dict]:
    """imgscope's map entries as ``qemu-img map --output=json`` lists them (no filename)."""
    return [{k: v for k, v in e.items() if k != "filename"} for e in map_entries(img)]


def first_difference(mine: list, theirs: list) -> int:
    """Index of the first entry where two lists differ (the shorter length if one is a
    prefix of the other)."""
    return next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))


def info_differences(corpus) -> list[str]:
    """``imgscope info`` against ``qemu-img info --output=json`` for every sample.

    actual-size is st_blocks of the same file: it must be equal too.  qemu names a LUKS
    image opened with its secret by a json: string, so filename is skipped there.
    """
    bad = []
    for name, s in corpus.items():
        theirs = s.info()
        with open_named(s.path, s.fmt) as img:
            mine = img.info()
        bad += differences(mine, theirs, f"{name}: ", skip={"filename"} if s.secret else ())
    return bad


def chain_info_differences(corpus) -> list[str]:
    """``info(backing_chain=True)`` against ``qemu-img info --backing-chain`` for every
    sample that has a backing file."""
    bad = []
    for name, s in corpus.items():
        if not s.backing:
            continue
        theirs = s.info(backing_chain=True)
        with open_named(s.path, s.fmt) as img:
            mine = img.info(backing_chain=True)
        if len(theirs) != len(mine):
            bad.append(f"{name}: chain length {len(mine)} != {len(theirs)}")
            continue
        bad += chain_differences(mine, theirs, name)
    return bad


def map_differences(corpus) -> list[str]:
    """``map_entries`` against ``qemu-img map --output=json`` for every sample (one
    message per sample naming the first differing entry)."""
    bad = []
    for name, s in corpus.items():
        theirs = s.map()
        with open_named(s.path, s.fmt) as img:
            mine = map_view(img)
        if mine != theirs:
            first = first_difference(mine, theirs)
            bad.append(f"{name}: {len(mine)} vs {len(theirs)} entries; first difference at "
                       f"{first}: imgscope={mine[first:first + 1]} qemu={theirs[first:first + 1]}")
    return bad


# --------------------------------------------------------------------------- guest map and host layout


def assert_extents_cover_the_disk(img, what: str = "") -> None:
    """``extents()`` starts at 0, has neither gap nor overlap and ends at the virtual size."""
    ext = img.extents()
    starts = ext.guest_offset.to_numpy()
    ends = (ext.guest_offset + ext.length).to_numpy()
    assert starts[0] == 0, what
    assert (ends[:-1] == starts[1:]).all(), f"{what}: gap or overlap in the guest map"
    assert int(ends[-1]) == img.virtual_size, what


def file_regions(reg, src):
    """The rows of ``regions()`` that lie in the file ``src`` (one of ``img.files()``), by offset."""
    return reg[reg.file == str(src.path)].sort_values("offset")


def tiling_problems(r, src, odd_kinds: bool = True) -> list[str]:
    """How the regions ``r`` of the file ``src`` fail to tile it exactly once from 0 to
    its size (empty when they do); with ``odd_kinds``, "overlap" / "beyond_eof"
    regions are problems too."""
    where = src.path.name
    if not len(r):
        return [f"{where}: no regions"]
    off, ln = r.offset.to_numpy(), r.length.to_numpy()
    bad = []
    if off[0] != 0:
        bad.append(f"{where}: tiling starts at {off[0]}")
    if not (off[1:] == off[:-1] + ln[:-1]).all():
        bad.append(f"{where}: gap or overlap in tiling")
    if int(off[-1] + ln[-1]) != src.size:
        bad.append(f"{where}: tiling ends at {off[-1] + ln[-1]}, file size {src.size}")
    odd = set(r.kind) & {"overlap", "beyond_eof"} if odd_kinds else set()
    if odd:
        bad.append(f"{where}: {sorted(odd)}\n{r[r.kind.isin(odd)].to_string()}")
    return bad


# --------------------------------------------------------------------------- the command line
def run_cli(*args, cwd=None) -> tuple[int, str, str]:
    """`python -m imgscope ARGS` in `cwd`: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "imgscope", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd)
    return p.returncode, p.stdout, p.stderr


def assert_cli_json_equals_qemu(path, verbs, fmt: str | None = None) -> None:
    """For each verb (a list of words), our JSON text is qemu-img's, byte for byte."""
    import oracle
    fopt = ["-f", fmt] if fmt else []
    for verb in verbs:
        rc, out, err = run_cli(*verb, "--output=json", *fopt, path.name, cwd=path.parent)
        assert rc == 0, err
        theirs = oracle.run(oracle.QEMU_IMG, *verb, "-U", "--output=json", *fopt, path.name,
                            cwd=path.parent).stdout
        assert json.loads(out) == json.loads(theirs), verb
        assert out == theirs, verb


# --------------------------------------------------------------------------- damaged input
def use_everything(path, fmt: str, read_bytes: int) -> str | None:
    """Open `path` and touch every member of the model; None when that went well or ended
    in an ImageError, else the unexpected exception as text."""
    try:
        with imgscope.open(path, fmt) as img:
            img.extents(); img.regions(); img.fields; img.info(); img.findings
            for t in list(img.tables):
                img.tables[t]
            with img.open_guest() as g:
                g.read(read_bytes)
    except ImageError:
        pass
    except Exception as exc:  # noqa: BLE001 - the point is to catch what should not escape
        return f"{type(exc).__name__}: {exc}"
    return None
