#!/usr/bin/env python3
"""Build ``cow`` images (QEMU's old copy-on-write format and User-Mode-Linux COW files).

    python3 sample_images/make_cow_fixtures.py DIR        # or, from Python:
    from make_cow_fixtures import build_fixtures; paths = build_fixtures(DIR)

No qemu-img that writes (or reads) ``cow`` exists any more (QEMU 2.1 was the last),
so every cow file here is built from imgscope's construct schemas
(``imgscope.schemas.cow``: the header structs of each layout, ``geometry`` for where
bitmap and data go, ``bitmap_table`` / ``pack_bitmap`` for the bitmap); numpy holds
the guest contents.  Only the qcow2 backing file is made by qemu-img / qemu-io.

Next to every fixture NAME the script writes ``NAME.expected.raw``: the guest disk
the fixture must read as (a sparse file); for overlays it is the backing file's
guest (``qemu-img convert -O raw``) with the overlay's sectors on top.
``build_fixtures`` returns ``{NAME: path of the .cow file}``; ``FIXTURES[NAME]``
says what each one shows.  Deterministic (fixed seed, fixed mtimes: the header's
mtime is also set on the backing file, so nothing depends on the clock); ~0.5 s,
about 4.5 MiB on disk (1.1 MiB of it the cow files, the rest the expected raws).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from imgscope.schemas import cow as S

SECTOR = 512
KiB, MiB = 1024, 1024 * 1024
SEED = 20261123
MTIME = 1_100_000_000            # written into overlay headers and set on their backing files

QEMU_IMG = os.environ.get("IMGSCOPE_QEMU_IMG") or shutil.which("qemu-img") or "/usr/bin/qemu-img"
QEMU_IO = os.environ.get("IMGSCOPE_QEMU_IO") or shutil.which("qemu-io") or "/usr/bin/qemu-io"

#: name -> what the fixture shows; "layout" is the header layout (schemas/cow.py LAYOUTS),
#: "backing" the backing file (None: unallocated sectors read as zeros)
FIXTURES: dict[str, dict] = {
    "plain": {"layout": "qemu", "backing": None, "what": "QEMU 64-bit header, no backing file: "
              "single sectors, runs across bitmap bytes, whole 0xFF bytes, the last sector"},
    "odd_size": {"layout": "qemu", "backing": None, "what": "4093 sectors (not a multiple of 8): "
                 "the last bitmap byte is partly padding, the last sector is present"},
    "raw_backing": {"layout": "qemu", "backing": "base.raw", "what": "over a sparse raw file; "
                    "a stale sector in the data area whose bit is clear (the backing shows)"},
    "qcow2_backing": {"layout": "qemu", "backing": "base.qcow2", "what": "over a qcow2 made by "
                      "qemu-img (one compressed cluster) that is smaller than the overlay"},
    "i386": {"layout": "qemu-i386", "backing": "base.raw", "what": "QEMU 32-bit header (1048 "
             "bytes, no padding before size)"},
    "uml_v2": {"layout": "uml-v2", "backing": "base.raw", "what": "User-Mode-Linux v2 header "
               "(4096-byte name, packed)"},
    "uml_v3": {"layout": "uml-v3", "backing": "base.raw", "what": "User-Mode-Linux v3 header "
               "(packed), bitmap and data aligned to 4096"},
    "uml_v3_64bit": {"layout": "uml-v3-64bit", "backing": "base.raw", "what": "User-Mode-Linux "
                     "v3 unpacked 64-bit layout (64-bit mtime), alignment 4096"},
}

BASE_RAW_SIZE = 3 * MiB
BASE_QCOW2_SIZE = 1 * MiB


# ---------------------------------------------------------------------------- helpers
def _run(*args, cwd) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def write_sparse(path: Path, data: np.ndarray, block: int = 4096) -> None:
    """Write `data` leaving holes where whole blocks are zero."""
    with open(path, "wb") as f:
        f.truncate(data.size)
        n = -(-data.size // block)
        padded = np.zeros(n * block, np.uint8)
        padded[:data.size] = data
        nz = padded.reshape(n, block).any(axis=1)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], nz.astype(np.int8), [0]])))
        for start, end in zip(edges[::2], edges[1::2]):
            lo, hi = int(start) * block, min(int(end) * block, data.size)
            f.seek(lo)
            f.write(data[lo:hi].tobytes())


def sectors_from(spec: list, total: int) -> np.ndarray:
    """Bool per sector from a list of sector numbers and (first, count) runs."""
    present = np.zeros(total, bool)
    for item in spec:
        if isinstance(item, tuple):
            present[item[0]:item[0] + item[1]] = True
        else:
            present[item] = True
    return present


def cow_file(path: Path, layout: str, size: int, present: np.ndarray, guest: np.ndarray, *,
             backing: str = "", mtime: int = 0, alignment: int = 4096,
             stale: dict[int, bytes] | None = None) -> dict:
    """Write a cow file of `layout` whose present sectors hold `guest`'s bytes.

    `stale`: sector -> 512 bytes left in the data area with the bit clear (a write
    whose bitmap update never happened).  Returns the geometry for the tests.
    """
    lay = S.LAYOUTS[layout]
    field = 1024 if layout.startswith("qemu") else 4096
    values = dict(version=lay.version, backing_file=backing.encode().ljust(field, b"\0"),
                  mtime=mtime, size=size, sectorsize=SECTOR)
    if lay.version == 3:
        values.update(alignment=alignment, cow_format=S.COW_BITMAP)
    header = lay.struct.build(values)
    bitmap_offset, declared, data_offset = S.geometry(layout, size, SECTOR, alignment)
    bits = S.pack_bitmap(present)
    assert bits.size == declared, (layout, bits.size, declared)
    bitmap = S.bitmap_table(bits.size).build(bits)
    idx = np.flatnonzero(present)
    ends = [bitmap_offset + len(bitmap)]
    with open(path, "wb") as f:
        f.write(header)
        f.seek(bitmap_offset)
        f.write(bitmap)
        if idx.size:        # write runs of present sectors (the rest of the data area is sparse)
            brk = np.flatnonzero(np.diff(idx) != 1) + 1
            for run in np.split(idx, brk):
                lo, hi = int(run[0]) * SECTOR, (int(run[-1]) + 1) * SECTOR
                f.seek(data_offset + lo)
                f.write(guest[lo:hi].tobytes())
                ends.append(data_offset + hi)
        for sector, data in (stale or {}).items():
            assert not present[sector] and len(data) == SECTOR
            f.seek(data_offset + sector * SECTOR)
            f.write(data)
            ends.append(data_offset + (sector + 1) * SECTOR)
        f.truncate(max(ends))
    return dict(bitmap_offset=bitmap_offset, bitmap_bytes=declared, data_offset=data_offset,
                header_size=lay.header_size)


def overlay(below: np.ndarray, size: int, present: np.ndarray, top: np.ndarray) -> np.ndarray:
    """The guest of an overlay: `top` where a sector is present, else `below` (zeros past it)."""
    out = np.zeros(size, np.uint8)
    n = min(size, below.size)
    out[:n] = below[:n]
    mask = np.repeat(present, SECTOR)[:size]
    out[mask] = top[mask]
    return out


# ---------------------------------------------------------------------------- backing files
def build_base_raw(d: Path, rng) -> np.ndarray:
    """A sparse raw file: random data with holes (zeros) between."""
    data = np.zeros(BASE_RAW_SIZE, np.uint8)
    for off, n in ((0, 100 * KiB), (700 * KiB + 100, 60 * KiB), (2 * MiB - 3000, 150 * KiB)):
        data[off:off + n] = rng.integers(0, 256, n, dtype=np.uint8)
    write_sparse(d / "base.raw", data)
    return data


def build_base_qcow2(d: Path) -> np.ndarray:
    """A qcow2 made by qemu-img / qemu-io, smaller than its overlay, with a compressed
    cluster; its guest as qemu-img convert -O raw reads it."""
    p = d / "base.qcow2"
    p.unlink(missing_ok=True)
    _run(QEMU_IMG, "create", "-q", "-f", "qcow2", p.name, str(BASE_QCOW2_SIZE), cwd=d)
    _run(QEMU_IO, "-f", "qcow2", "-c", "write -P 0x5a 0 100k", "-c", "write -c -P 0x3c 128k 64k",
         "-c", "write -P 0xa5 900k 124k", p.name, cwd=d)
    raw = d / "base.qcow2.raw"
    _run(QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", p.name, raw.name, cwd=d)
    data = np.fromfile(raw, np.uint8)
    raw.unlink()
    return data


# ---------------------------------------------------------------------------- fixtures
def build_fixtures(directory) -> dict[str, Path]:
    """Build every fixture in `directory` (created if needed); {name: path of the .cow}."""
    d = Path(directory).absolute()
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    bases = {"base.raw": build_base_raw(d, rng), "base.qcow2": build_base_qcow2(d)}
    for name in bases:
        os.utime(d / name, (MTIME, MTIME))
    expected: dict[str, np.ndarray] = {}

    def make(name: str, size: int, spec: list, **kw) -> None:
        info = FIXTURES[name]
        total = size // SECTOR
        present = sectors_from(spec, total)
        top = rng.integers(0, 256, size, dtype=np.uint8)
        backing = info["backing"]
        below = bases[backing] if backing else np.zeros(0, np.uint8)
        cow_file(d / f"{name}.cow", info["layout"], size, present, top, backing=backing or "",
                 mtime=MTIME if backing else 0, **kw)
        expected[name] = overlay(below, size, present, top)

    scattered = [0, 1, 2, (7, 3), (16, 16), 100, (1000, 101), (2040, 9), 4095]
    make("plain", 2 * MiB, scattered + [int(x) for x in rng.choice(4096, 40, replace=False)])
    make("odd_size", 4093 * SECTOR, [(3, 5), (4085, 8)])
    stale = {20: rng.integers(0, 256, SECTOR, dtype=np.uint8).tobytes()}
    make("raw_backing", BASE_RAW_SIZE, [(0, 5), (9, 2), (600, 400), (4096, 64), 6143],
         stale=stale)
    make("qcow2_backing", BASE_QCOW2_SIZE + 512 * KiB, [(250, 20), (1790, 20), (2500, 30)])
    make("i386", BASE_RAW_SIZE, [(8, 8), 77, (5000, 11)])
    make("uml_v2", BASE_RAW_SIZE, [(1, 1), (64, 640), 6000])
    make("uml_v3", BASE_RAW_SIZE, [(33, 3), (3000, 90)])
    make("uml_v3_64bit", BASE_RAW_SIZE, [(2, 30), (6100, 44)])
    assert set(expected) == set(FIXTURES), set(expected) ^ set(FIXTURES)
    for name, data in expected.items():
        write_sparse(expected_path(d, name), data)
    return {name: d / f"{name}.cow" for name in FIXTURES}


def expected_path(directory, name: str) -> Path:
    return Path(directory) / f"{name}.expected.raw"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} DIRECTORY", file=sys.stderr)
        return 2
    for name, path in build_fixtures(argv[1]).items():
        print(f"{name:<14} {FIXTURES[name]['layout']:<13} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
