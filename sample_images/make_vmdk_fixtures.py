#!/usr/bin/env python3
"""Build the VMDK variants qemu-img cannot write, so qemu-img can be tested *reading* them.

    python3 sample_images/make_vmdk_fixtures.py DIR       # or, from Python:
    from make_vmdk_fixtures import build_fixtures; paths = build_fixtures(DIR)

Every binary structure is made with imgscope's construct schemas
(``imgscope.schemas.vmdk``: ``sparse_header``, ``cowd_header``, ``sesparse_header``,
``marker``, ``grain_record``, the GD/GT tables ...) and every descriptor with
``build_descriptor`` / ``format_extent`` (``imgscope.schemas.vmdk_descriptor``); numpy
holds the guest contents.  Only the pieces QEMU itself can write are made by
qemu-img / qemu-io: the monolithicFlat parent ``base.vmdk`` and the hosted sparse
extent ``mixedsp-s001.vmdk`` (taken from a twoGbMaxExtentSparse image).

Next to every fixture NAME the script writes ``NAME.expected.raw``: the guest disk
the fixture must read as (a sparse file).  ``build_fixtures`` returns
``{NAME: path of the file to open}``; ``FIXTURES[NAME]`` says whether qemu-img
7.2 reads it (``"reads"``), opens it but reads a different disk (``"misreads"``:
its view is written as ``NAME.qemu.raw``) or refuses it (``"refuses"``), and why.

Deterministic: fixed seeds, fixed CIDs (the random CID qemu-io gives the base on
its first write is replaced by ``CID_BASE``), no timestamps; ~1.5 s.  The images
take ~2.3 MiB of disk and the expected raws ~4 MiB (apparent sizes are larger:
the seSparse extent and the expected raws are sparse files).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

from imgscope.schemas import vmdk as V
from imgscope.schemas.vmdk_descriptor import build_descriptor, format_extent, qemu_ddb

SECTOR = 512
KiB, MiB = 1024, 1024 * 1024
SEED = 20261122

CID_BASE = 0x0BA5E001           # written into the qemu-made base descriptor
CID_VMFS_SPARSE = 0x0DE17A01
CID_COWD_ROOT = 0x0C0D0001
CID_SESPARSE = 0x05E5BA5E
CID_MIXED = 0x0317ED01
CID_STREAM = 0x057EA301
CID_ZERO_GRAIN = 0x0E60C001

QEMU_IMG = os.environ.get("IMGSCOPE_QEMU_IMG") or shutil.which("qemu-img") or "/usr/bin/qemu-img"
QEMU_IO = os.environ.get("IMGSCOPE_QEMU_IO") or shutil.which("qemu-io") or "/usr/bin/qemu-io"

#: what qemu-img 7.2 does with each fixture (checked by tests/test_vmdk_fixtures.py):
#: "qemu" reads / misreads / refuses; "why" qemu cannot be the oracle; "error" a part of
#: qemu-img's message when it refuses; "oracle_via" a fixture qemu reads that holds the
#: same extent file (its qemu-img map then stands for this one's)
FIXTURES: dict[str, dict[str, str]] = {
    "base": {"qemu": "reads", "what": "monolithicFlat made by qemu-img/qemu-io: the parent of "
             "vmfsSparse and zero_grain_child (CID pinned to CID_BASE)"},
    "vmfsSparse": {"qemu": "reads", "what": "createType vmfsSparse descriptor + COWD delta "
                   "(grainSize 1, 4096-entry GTs, one GT unallocated) over base.vmdk"},
    "cowd_root": {"qemu": "reads", "what": "vmfsSparse descriptor without parent around "
                  "cowd_standalone-root.vmdk (a root COWD: flags 3, geometry in the union)"},
    "cowd_standalone": {"qemu": "refuses", "what": "the root COWD file opened on its own",
                        "error": "Invalid argument", "oracle_via": "cowd_root",
                        "why": "vmdk_open() reads the CID from the text at byte 512 of a "
                        "COWD/KDMV file; a COWD header has none there ('Invalid argument')"},
    "seSparse": {"qemu": "reads", "what": "createType seSparse descriptor + seSparse extent: "
                 "allocated (split cluster encoding, cluster >= 4096), zero, unmapped and "
                 "unallocated grains, one GT unallocated"},
    "seSparse_extent": {"qemu": "refuses", "what": "the seSparse extent opened on its own",
                        "error": "invalid VMDK image descriptor", "oracle_via": "seSparse",
                        "why": "qemu only opens seSparse through a descriptor: the file has no "
                        "KDMV/COWD magic, so it is parsed as descriptor text ('invalid VMDK "
                        "image descriptor')"},
    "mixed": {"qemu": "reads", "what": "monolithicFlat descriptor: FLAT at a non-zero offset "
              "into a shared file, SPARSE (qemu-img's -s001 extent), another FLAT in the "
              "same file"},
    "mixed_sparse_first": {"qemu": "reads", "what": "the same extents, SPARSE first"},
    "mixed_zero_rdonly": {"qemu": "misreads", "what": "monolithicFlat descriptor adding a "
                          "ZERO extent and a RDONLY FLAT line",
                          "why": "vmdk_parse_extents() skips ZERO lines (no file name / not "
                          "a known type) and every non-RW line without a word, so the "
                          "extents after them move up and the disk shrinks"},
    "mixed_custom": {"qemu": "refuses", "what": "createType custom with the extents of "
                     "mixed_zero_rdonly", "error": "Unsupported image type 'custom'",
                     "why": "vmdk_open_desc_file() only accepts monolithicFlat, vmfs, "
                     "vmfsSparse, seSparse, twoGbMaxExtentSparse, twoGbMaxExtentFlat "
                     "('Unsupported image type 'custom'')"},
    "streamOptimized": {"qemu": "reads", "what": "VMware-style stream (GD_AT_END, flags "
                        "0x30001): grain records, GT markers after their grains, an empty "
                        "GT skipped, GD marker + GD, footer marker + footer + EOS; an all-zero "
                        "grain skipped and an incompressible grain"},
    "streamOptimized_partial": {"qemu": "reads", "what": "VMware-style stream whose capacity "
                                "is not a multiple of the grain: the last record inflates to "
                                "less than a grain"},
    "zero_grain": {"qemu": "reads", "what": "hand-built monolithicSparse, version 2, flags 0x7: "
                   "GTE = 1 zeroed grains, data grains out of order, an unallocated GT"},
    "zero_grain_child": {"qemu": "reads", "what": "the same layout as a child of base.vmdk: "
                         "zeroed grains hide parent data, unallocated grains show it"},
}


# ---------------------------------------------------------------------------- helpers
def _run(*args, cwd) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _text(tag: str, n: int) -> bytes:
    """`n` compressible, position-tagged bytes."""
    assert len(tag) <= 24
    line = lambda i: b"%-24s %08x|" % (tag.encode(), i)
    out = b"".join(line(i) for i in range(-(-n // 34)))
    return out[:n]


def _random(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


class Disk:
    """The expected guest bytes of one fixture."""

    def __init__(self, size: int) -> None:
        self.data = np.zeros(size, np.uint8)

    def put(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = np.frombuffer(data, np.uint8)

    def get(self, offset: int, n: int) -> bytes:
        return self.data[offset:offset + n].tobytes()

    def copy(self) -> "Disk":
        d = Disk(0)
        d.data = self.data.copy()
        return d


def write_sparse(path: Path, data, size: int | None = None, block: int = 4096) -> None:
    """Write `data` (bytes or uint8 array) leaving holes where whole blocks are zero."""
    arr = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else data
    size = arr.size if size is None else size
    with open(path, "wb") as f:
        f.truncate(size)
        n = arr.size // block
        nz = np.zeros(n + 1, bool)
        if n:
            nz[:n] = arr[:n * block].reshape(n, block).any(axis=1)
        nz[n] = bool(arr[n * block:].any())
        edges = np.flatnonzero(np.diff(np.concatenate([[0], nz.astype(np.int8), [0]])))
        for start, end in zip(edges[::2], edges[1::2]):
            lo, hi = int(start) * block, min(int(end) * block, arr.size)
            f.seek(lo)
            f.write(arr[lo:hi].tobytes())


class HostFile:
    """A host file assembled from pieces at byte offsets (written sparse)."""

    def __init__(self) -> None:
        self.pieces: list[tuple[int, bytes]] = []
        self.size = 0

    def put(self, offset: int, data: bytes) -> None:
        self.pieces.append((offset, bytes(data)))
        self.size = max(self.size, offset + len(data))

    def write(self, path: Path, size: int | None = None) -> None:
        size = max(self.size, size or 0)
        with open(path, "wb") as f:
            f.truncate(size)
            for off, data in sorted(self.pieces):
                f.seek(off)
                f.write(data)


def _pad(data: bytes, unit: int = SECTOR) -> bytes:
    return data + bytes(-len(data) % unit)


def _ddb(capacity: int) -> dict:
    return qemu_ddb(capacity, adapter_type="lsilogic", hw_version="7")


def _sparse_header(**kw) -> bytes:
    h = dict(version=1, flags=V.FLAG_VALID_NEWLINE, capacity=0, grainSize=V.DEFAULT_GRAIN_SIZE,
             descriptorOffset=0, descriptorSize=0, numGTEsPerGT=V.DEFAULT_GTES_PER_GT,
             rgdOffset=0, gdOffset=0, overHead=0, uncleanShutdown=0,
             singleEndLineChar=b"\n", nonEndLineChar=b" ", doubleEndLineChar1=b"\r",
             doubleEndLineChar2=b"\n", compressAlgorithm=V.COMPRESSION_NONE, pad=bytes(433))
    h.update(kw)
    return V.sparse_header.build(h)


# ---------------------------------------------------------------------------- base (qemu)
BASE_SECTORS = 12288                                   # 6 MiB
BASE_WRITES = [(0x11, 0, 64 * KiB), (0x22, 1 * MiB, 8 * KiB), (0x33, 2 * MiB, 256 * KiB),
               (0x44, 5 * MiB, 4 * KiB)]


def _read_cid(descriptor: Path) -> int:
    m = re.search(rb"^CID=([0-9a-fA-F]+)", descriptor.read_bytes(), re.M)
    if not m:
        raise RuntimeError(f"no CID in {descriptor}")
    return int(m.group(1), 16)


def build_base(d: Path) -> Disk:
    """monolithicFlat base.vmdk + base-flat.vmdk by qemu-img/qemu-io; CID pinned."""
    _run(QEMU_IMG, "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat",
         "base.vmdk", str(BASE_SECTORS * SECTOR), cwd=d)
    cmds = []
    disk = Disk(BASE_SECTORS * SECTOR)
    for pat, off, n in BASE_WRITES:
        cmds += ["-c", f"write -P {pat:#x} {off} {n}"]
        disk.put(off, bytes([pat]) * n)
    _run(QEMU_IO, "-f", "vmdk", *cmds, "base.vmdk", cwd=d)
    # qemu-io gave the base a random CID on its first write: pin it (same length:
    # the NUL padding qemu added to 512 bytes keeps the file size)
    desc = d / "base.vmdk"
    desc.write_bytes(pin_cid(desc.read_bytes(), CID_BASE))
    return disk


def pin_cid(raw: bytes, cid: int) -> bytes:
    """The descriptor block with CID set to ``cid``, same length, NUL-padded.

    qemu leaves stale bytes after the descriptor's NUL when the CID it wrote was
    shorter than the one before, so only the text up to the first NUL is kept."""
    text = raw.split(b"\0", 1)[0]
    text = re.sub(rb"^CID=[0-9a-fA-F]+\n", b"CID=%x\n" % cid, text, count=1, flags=re.M)
    return text + bytes(max(0, len(raw) - len(text)))


# ---------------------------------------------------------------------------- COWD
def cowd_file(path: Path, num_sectors: int, grains: dict[int, bytes], *, grain_size: int = 1,
              order: list[int] | None = None, root_geometry=None,
              name: bytes = b"", description: bytes = b"") -> None:
    """A COWD extent: header (4 sectors), GD at sector 4, GTs (32 sectors each) for the
    GT ranges holding grains, then the grains in `order` (ESX allocates in write order)."""
    gt_entries = V.COWD_GT_ENTRIES
    n_gd = V.cowd_num_gd_entries(num_sectors, grain_size)
    gd_off = 4
    gd_secs = V.gd_sectors(n_gd)
    gt_secs = V.gt_sectors(gt_entries)
    used = sorted({g // gt_entries for g in grains})
    gd = np.zeros(n_gd, np.uint32)
    gts = {t: np.zeros(gt_entries, np.uint32) for t in used}
    next_sector = gd_off + gd_secs
    for t in used:
        gd[t] = next_sector
        next_sector += gt_secs
    f = HostFile()
    for g in (order or sorted(grains)):
        data = grains[g]
        assert len(data) == grain_size * SECTOR and g // gt_entries in gts
        gts[g // gt_entries][g % gt_entries] = next_sector
        f.put(next_sector * SECTOR, data)
        next_sector += grain_size
    if root_geometry is not None:       # a base ("root") disk: geometry in the union
        flags = 0x3                     # COWDISK_ROOT | COWDISK_CHECKCAPABLE (VMware cow_ext.h)
        union = V.cowd_root.build(dict(zip(("root_cylinders", "root_heads", "root_sectors"),
                                           root_geometry)))
    else:                               # a delta ("child") disk: parent found by the descriptor
        flags = 0x2
        union = b""
    header = V.cowd_header.build(dict(
        version=V.COWD_VERSION, flags=flags, numSectors=num_sectors, grainSize=grain_size,
        gdOffset=gd_off, numGDEntries=n_gd, freeSector=next_sector,
        parentFileName=union.ljust(1024, b"\0"), parentGeneration=0, generation=1,
        name=name.ljust(60, b"\0"), description=description.ljust(512, b"\0"),
        savedGeneration=1, reserved=bytes(8), uncleanShutdown=0, padding=bytes(396)))
    f.put(0, header)
    f.put(gd_off * SECTOR, _pad(V.gd_table(n_gd).build(gd)))
    for t in used:
        f.put(int(gd[t]) * SECTOR, V.gt_table(gt_entries).build(gts[t]))
    f.write(path, next_sector * SECTOR)


def build_vmfs_sparse(d: Path, base: Disk, rng) -> dict[str, Disk]:
    # delta: 1-sector grains; GT1 (sectors 4096..8191) unallocated -> all from the parent
    grains: dict[int, bytes] = {}
    for s in list(range(1, 9)) + [100] + list(range(2048, 2052)) + list(range(3000, 3004)) \
            + list(range(10240, 10248)) + [12287]:
        grains[s] = _text(f"delta s{s}", SECTOR)
    order = sorted(grains)
    order[9:13] = order[9:13][::-1]        # 2048..2051 allocated backwards: host not contiguous
    order = order[14:] + order[:14]        # later grains first (write order != guest order)
    cowd_file(d / "vmfsSparse-delta.vmdk", BASE_SECTORS, grains, order=order)
    text = build_descriptor("vmfsSparse", [("RW", BASE_SECTORS, "VMFSSPARSE", "vmfsSparse-delta.vmdk")],
                            cid=CID_VMFS_SPARSE, parent_cid=_read_cid(d / "base.vmdk"),
                            parent_hint="base.vmdk", ddb=_ddb(BASE_SECTORS))
    (d / "vmfsSparse.vmdk").write_text(text)
    disk = base.copy()
    for s, data in grains.items():
        disk.put(s * SECTOR, data)

    # a root COWD (no parent): opened on its own and through a vmfsSparse descriptor
    n = 8192                                                    # 4 MiB, 2 GTs
    root: dict[int, bytes] = {s: _text(f"root s{s}", SECTOR) for s in range(0, 16)}
    root.update({s: _random(rng, SECTOR) for s in range(4096, 4104)})
    root[8191] = _text("root last", SECTOR)
    cowd_file(d / "cowd_standalone-root.vmdk", n, root, root_geometry=(8, 16, 63),
              name=b"imgscope root COWD", description=b"standalone COWD extent, no parent")
    text = build_descriptor("vmfsSparse", [("RW", n, "VMFSSPARSE", "cowd_standalone-root.vmdk")],
                            cid=CID_COWD_ROOT, ddb=_ddb(n))
    (d / "cowd_root.vmdk").write_text(text)
    rdisk = Disk(n * SECTOR)
    for s, data in root.items():
        rdisk.put(s * SECTOR, data)
    return {"vmfsSparse": disk, "cowd_root": rdisk, "cowd_standalone": rdisk}


# ---------------------------------------------------------------------------- seSparse
def build_sesparse(d: Path, rng) -> dict[str, Disk]:
    capacity = 81920                                   # 40 MiB: 3 GTs of 16 MiB
    gsec = V.SESPARSE_GRAIN_SIZE                       # 8 sectors
    gbytes = gsec * SECTOR
    per_gt = V.SESPARSE_GT_ENTRIES
    n_gd = -(-capacity // (per_gt * gsec))
    # guest grain -> (kind, cluster); kinds: 1 unmapped, 2 zero, 3 allocated
    A, Z, U = V.SESPARSE_GTE_ALLOCATED, V.SESPARSE_GTE_ZERO, V.SESPARSE_GTE_UNMAPPED
    entries = {0: (A, 0), 1: (A, 4097), 2: (Z, 0), 3: (U, 0), 4: (Z, 0), 5: (Z, 0),
               10: (A, 1), 11: (A, 2), 12: (A, 3), 13: (A, 4), 20: (A, 4096),
               4095: (A, 5),                                   # last grain of GT0
               2 * per_gt: (A, 6), 2 * per_gt + 1: (U, 0),      # GT2 (GT1 unallocated)
               capacity // gsec - 1: (A, 7)}
    layout = dict(volatile_header=(1, 1), journal_header=(2, 1), journal=(3, 13),
                  grain_dir=(16, 1), grain_tables=(17, 2 * V.SESPARSE_GRAIN_TABLE_SIZE),
                  free_bitmap=(145, 8), backmap=(153, 7), grains=(160, 4098 * gsec))
    clusters = {c: (g, _random(rng, gbytes) if c % 2 else _text(f"sesparse g{g}", gbytes))
                for g, (k, c) in entries.items() if k == A}
    gd = np.zeros(layout["grain_dir"][1] * SECTOR // 8, np.uint64)
    gt_index = {0: 0, 2: 1}                          # GD entry -> GT number (GT1 unallocated)
    for t, i in gt_index.items():
        gd[t] = V.SESPARSE_GDE_ALLOCATED | i
    gts = np.zeros((len(gt_index), per_gt), np.uint64)
    for g, (k, c) in entries.items():
        gts[gt_index[g // per_gt], g % per_gt] = V.encode_sesparse_gt(k, c)
    f = HostFile()
    hdr = {"capacity": capacity, "version": V.SESPARSE_VERSION, "grain_size": gsec,
           "grain_table_size": V.SESPARSE_GRAIN_TABLE_SIZE, "flags": 0, "reserved1": 0,
           "reserved2": 0, "reserved3": 0, "reserved4": 0, "pad": bytes(304)}
    for key, (off, size) in layout.items():
        hdr[f"{key}_offset"], hdr[f"{key}_size"] = off, size
    f.put(0, V.sesparse_header.build(hdr))
    f.put(SECTOR, V.sesparse_volatile_header.build(dict(
        free_gt_number=len(gt_index), next_txn_seq_number=1, replay_journal=0, pad=bytes(480))))
    f.put(layout["grain_dir"][0] * SECTOR, V.sesparse_table(gd.size).build(gd))
    f.put(layout["grain_tables"][0] * SECTOR, V.sesparse_table(gts.size).build(gts.reshape(-1)))
    disk = Disk(capacity * SECTOR)
    for c, (g, data) in clusters.items():
        f.put((layout["grains"][0] + c * gsec) * SECTOR, data)
        disk.put(g * gbytes, data)
    f.write(d / "seSparse-sesparse.vmdk", (layout["grains"][0] + layout["grains"][1]) * SECTOR)
    text = build_descriptor("seSparse", [("RW", capacity, "SESPARSE", "seSparse-sesparse.vmdk")],
                            cid=CID_SESPARSE, ddb=_ddb(capacity))
    (d / "seSparse.vmdk").write_text(text)
    return {"seSparse": disk, "seSparse_extent": disk}


# ---------------------------------------------------------------------------- mixed
def build_mixed(d: Path, rng) -> dict[str, Disk]:
    # the SPARSE extent: qemu-img's first -s001 file of a twoGbMaxExtentSparse disk
    sp_sectors = 2048
    _run(QEMU_IMG, "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
         "mixedsp.vmdk", str(sp_sectors * SECTOR), cwd=d)
    sp = Disk(sp_sectors * SECTOR)
    cmds = []
    for pat, off, n in [(0x61, 0, 64 * KiB), (0x62, 512 * KiB, 4 * KiB), (0x63, 1 * MiB - 4 * KiB, 4 * KiB)]:
        cmds += ["-c", f"write -P {pat:#x} {off} {n}"]
        sp.put(off, bytes([pat]) * n)
    _run(QEMU_IO, "-f", "vmdk", *cmds, "mixedsp.vmdk", cwd=d)
    (d / "mixedsp.vmdk").unlink()              # only the extent file is used (random CID inside)
    sparse_name = "mixedsp-s001.vmdk"

    # one shared raw file: junk around three FLAT windows, a hole inside the first
    flat_name = "mixed-flat.vmdk"
    flat = np.frombuffer(_text("not in any extent", 2560 * SECTOR), np.uint8).copy()
    win = {"A": (64, 512), "D": (1024, 256), "R": (2048, 256)}       # (offset, sectors)
    for key, (off, n) in win.items():
        flat[off * SECTOR:(off + n) * SECTOR] = np.frombuffer(_text(f"flat {key}", n * SECTOR), np.uint8)
    a0 = win["A"][0] * SECTOR
    flat[a0 + 128 * KiB:a0 + 192 * KiB] = 0                         # a host hole inside A
    flat[a0 + 200 * KiB:a0 + 204 * KiB] = np.frombuffer(_random(rng, 4 * KiB), np.uint8)
    write_sparse(d / flat_name, flat)

    def window(key: str) -> bytes:
        off, n = win[key]
        return flat[off * SECTOR:(off + n) * SECTOR].tobytes()

    ext = {"A": ("RW", win["A"][1], "FLAT", flat_name, win["A"][0]),
           "S": ("RW", sp_sectors, "SPARSE", sparse_name),
           "Z": ("RW", 1024, "ZERO"),
           "R": ("RDONLY", win["R"][1], "FLAT", flat_name, win["R"][0]),
           "D": ("RW", win["D"][1], "FLAT", flat_name, win["D"][0])}
    content = {"A": window("A"), "S": sp.get(0, sp_sectors * SECTOR), "Z": bytes(1024 * SECTOR),
               "R": window("R"), "D": window("D")}
    variants = {"mixed": ("monolithicFlat", "ASD"), "mixed_sparse_first": ("monolithicFlat", "SAD"),
                "mixed_zero_rdonly": ("monolithicFlat", "ASZRD"), "mixed_custom": ("custom", "ASZRD")}
    # build_descriptor writes every line with format_extent; ZERO has no file name
    assert format_extent(ext["A"]) == f'RW 512 FLAT "{flat_name}" 64'
    assert format_extent(ext["Z"]) == "RW 1024 ZERO"
    out = {}
    for i, (name, (ctype, keys)) in enumerate(variants.items()):
        lines = [ext[k] for k in keys]
        text = build_descriptor(ctype, lines, cid=CID_MIXED + i,
                                ddb=_ddb(sum(e[1] for e in lines)))
        (d / f"{name}.vmdk").write_text(text)
        disk = Disk(0)
        disk.data = np.frombuffer(b"".join(content[k] for k in keys), np.uint8).copy()
        out[name] = disk
        if FIXTURES[name]["qemu"] == "misreads":     # qemu drops ZERO and non-RW lines
            seen = b"".join(content[k] for k in keys if ext[k][0] == "RW" and ext[k][2] != "ZERO")
            write_sparse(d / f"{name}.qemu.raw", np.frombuffer(seen, np.uint8))
    return out


# ---------------------------------------------------------------------------- streamOptimized
def stream_file(path: Path, disk: Disk, capacity: int, *, cid: int, grain: int = 128) -> None:
    """VMware-style streamOptimized (§6.3): GD_AT_END, records, GT markers after their
    grains, GD marker + GD, footer marker + footer + EOS marker at the end."""
    gbytes = grain * SECTOR
    per_gt = V.DEFAULT_GTES_PER_GT
    n_gd = V.num_gd_entries(capacity, grain, per_gt)
    text = build_descriptor("streamOptimized", [("RW", capacity, "SPARSE", path.name)],
                            cid=cid, ddb=_ddb(capacity)).encode()
    desc_secs = -(-len(text) // SECTOR)
    overhead = -(-(1 + desc_secs) // grain) * grain
    fields = dict(version=3, flags=V.FLAG_VALID_NEWLINE | V.FLAG_COMPRESSED | V.FLAG_MARKERS,
                  capacity=capacity, grainSize=grain, descriptorOffset=1,
                  descriptorSize=desc_secs, numGTEsPerGT=per_gt, rgdOffset=0,
                  overHead=overhead, compressAlgorithm=V.COMPRESSION_DEFLATE)
    out = bytearray(_sparse_header(gdOffset=V.GD_AT_END, **fields))
    out += _pad(text)
    out += bytes(overhead * SECTOR - len(out))
    gd = np.zeros(n_gd, np.uint32)
    n_grains = -(-capacity // grain)

    def marker(val: int, mtype: int) -> bytes:
        return V.marker.build(dict(val=val, size=0, type=mtype, pad=bytes(496)))

    for t in range(n_gd):
        gt = np.zeros(per_gt, np.uint32)
        for i in range(per_gt):
            g = t * per_gt + i
            if g >= n_grains:
                break
            data = disk.get(g * gbytes, min(gbytes, capacity * SECTOR - g * gbytes))
            if not any(data):
                continue                        # all-zero grains are not stored
            z = zlib.compress(data, 9)
            gt[i] = len(out) // SECTOR
            out += V.grain_record.build(dict(lba=g * grain, size=len(z), data=z,
                                             padding=bytes(-(12 + len(z)) % SECTOR)))
        if gt.any():
            out += marker(V.gt_sectors(per_gt), V.MARKER_GT)
            gd[t] = len(out) // SECTOR
            out += V.gt_table(per_gt).build(gt)
    out += marker(V.gd_sectors(n_gd), V.MARKER_GD)
    gd_sector = len(out) // SECTOR
    out += _pad(V.gd_table(n_gd).build(gd))
    out += marker(1, V.MARKER_FOOTER)
    out += _sparse_header(gdOffset=gd_sector, **fields)
    out += marker(0, V.MARKER_EOS)
    path.write_bytes(bytes(out))


def build_stream(d: Path, rng) -> dict[str, Disk]:
    capacity = 147456                                   # 72 MiB: GTs 0, (1 empty), 2
    g = 128 * SECTOR
    disk = Disk(capacity * SECTOR)
    disk.put(0, _text("stream grain 0", g))
    disk.put(g, _text("stream grain 1", g // 2))        # half a grain, rest zeros
    # grain 2 stays all zero: skipped; grain 3 incompressible (record > one grain)
    disk.put(3 * g, _random(rng, g))
    disk.put(5 * g + 512, _text("stream grain 5", 4 * KiB))
    disk.put(511 * g, _text("last of GT0", g))
    disk.put(64 * MiB + 3 * g, _text("GT2 grain", 3 * g))
    disk.put(capacity * SECTOR - 4 * KiB, _text("the end", 4 * KiB))
    stream_file(d / "streamOptimized.vmdk", disk, capacity, cid=CID_STREAM)

    capacity2 = 2088                                    # 1 MiB + 20 KiB: last grain partial
    disk2 = Disk(capacity2 * SECTOR)
    disk2.put(0, _text("partial 0", 8 * KiB))
    disk2.put(1 * MiB, _text("partial tail", 20 * KiB))
    stream_file(d / "streamOptimized_partial.vmdk", disk2, capacity2, cid=CID_STREAM + 1)
    return {"streamOptimized": disk, "streamOptimized_partial": disk2}


# ---------------------------------------------------------------------------- zeroed grains
def zero_grain_file(path: Path, capacity: int, grains: dict[int, bytes | None], *, cid: int,
                    grain: int = 16, per_gt: int = 512, parent: tuple[int, str] | None = None,
                    order: list[int] | None = None) -> None:
    """A monolithicSparse KDMV extent, version 2, flags 0x7 (newline, RGD, zeroed-grain GTE).

    `grains`: grain index -> data (allocated) or None (GTE = 1, zeroed).  GTs are only
    allocated (in both the GD and the redundant GD) for GT ranges named in `grains`.
    """
    n_gd = V.num_gd_entries(capacity, grain, per_gt)
    gds, gts_secs = V.gd_sectors(n_gd), V.gt_sectors(per_gt)
    used = sorted({g // per_gt for g in grains})
    text = build_descriptor("monolithicSparse", [("RW", capacity, "SPARSE", path.name)], cid=cid,
                            parent_cid=parent[0] if parent else 0xFFFFFFFF,
                            parent_hint=parent[1] if parent else None, ddb=_ddb(capacity)).encode()
    desc_off, desc_secs = 1, V.QEMU_DESCRIPTOR_SIZE
    assert len(text) <= desc_secs * SECTOR
    rgd = desc_off + desc_secs
    gd_sector = rgd + gds + gts_secs * len(used)
    end = gd_sector + gds + gts_secs * len(used)
    overhead = -(-end // grain) * grain
    gd, rgdt = np.zeros(n_gd, np.uint32), np.zeros(n_gd, np.uint32)
    for k, t in enumerate(used):
        rgdt[t] = rgd + gds + k * gts_secs
        gd[t] = gd_sector + gds + k * gts_secs
    gts = {t: np.zeros(per_gt, np.uint32) for t in used}
    f = HostFile()
    nxt = overhead
    for g in sorted(g for g, data in grains.items() if data is None):
        gts[g // per_gt][g % per_gt] = V.GTE_ZEROED
    order = order or sorted(g for g, data in grains.items() if data is not None)
    assert sorted(order) == sorted(g for g, data in grains.items() if data is not None)
    for g in order:
        data = grains[g]
        assert len(data) == grain * SECTOR
        gts[g // per_gt][g % per_gt] = nxt
        f.put(nxt * SECTOR, data)
        nxt += grain
    f.put(0, _sparse_header(version=2, flags=V.FLAG_VALID_NEWLINE | V.FLAG_REDUNDANT_GRAIN_TABLE
                            | V.FLAG_ZERO_GRAIN, capacity=capacity, grainSize=grain,
                            descriptorOffset=desc_off, descriptorSize=desc_secs,
                            numGTEsPerGT=per_gt, rgdOffset=rgd, gdOffset=gd_sector,
                            overHead=overhead))
    f.put(desc_off * SECTOR, text)
    f.put(rgd * SECTOR, _pad(V.gd_table(n_gd).build(rgdt)))
    f.put(gd_sector * SECTOR, _pad(V.gd_table(n_gd).build(gd)))
    for t in used:
        table = V.gt_table(per_gt).build(gts[t])
        f.put(int(rgdt[t]) * SECTOR, table)
        f.put(int(gd[t]) * SECTOR, table)
    f.write(path, nxt * SECTOR)


def build_zero_grain(d: Path, base: Disk, rng) -> dict[str, Disk]:
    grain = 16                                        # 8 KiB grains, a GT covers 4 MiB
    gb = grain * SECTOR
    capacity = BASE_SECTORS                           # 6 MiB = 2 GTs, same size as base
    out = {}
    for name, parent in (("zero_grain", None), ("zero_grain_child", (CID_BASE, "base.vmdk"))):
        grains: dict[int, bytes | None] = {
            0: _text(f"{name} g0", gb),                # over base 0x11 data (child)
            1: None, 2: None, 3: None,                  # zeroed: hide base 0x11 data
            5: _random(rng, gb),
            64: None,                                   # zeroed over a base hole
            128: _text(f"{name} g128", gb),             # 1 MiB: over base 0x22
            129: _text(f"{name} g129", gb),
            260: None,                                  # 2.03 MiB: hides base 0x33
            511: _text(f"{name} g511", gb),             # last grain of GT0
        }
        # GT1 (4..6 MiB) unallocated: base 0x44 at 5 MiB shows through in the child
        order = [129, 5, 511, 0, 128]
        zero_grain_file(d / f"{name}.vmdk", capacity, grains, cid=CID_ZERO_GRAIN + (parent is not None),
                        grain=grain, parent=parent, order=order)
        disk = base.copy() if parent else Disk(capacity * SECTOR)
        for g, data in grains.items():
            disk.put(g * gb, data if data is not None else bytes(gb))
        out[name] = disk
    return out


# ---------------------------------------------------------------------------- entry point
def open_path(directory, name: str) -> Path:
    """The file a fixture is opened by."""
    special = {"cowd_standalone": "cowd_standalone-root.vmdk",
               "seSparse_extent": "seSparse-sesparse.vmdk"}
    return Path(directory) / special.get(name, f"{name}.vmdk")


def expected_path(directory, name: str) -> Path:
    return Path(directory) / f"{name}.expected.raw"


def build_fixtures(directory) -> dict[str, Path]:
    """Build every fixture in `directory` (created if needed); {name: path to open}."""
    d = Path(directory).absolute()
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    disks: dict[str, Disk] = {}
    base = build_base(d)
    disks["base"] = base
    disks.update(build_vmfs_sparse(d, base, rng))
    disks.update(build_sesparse(d, rng))
    disks.update(build_mixed(d, rng))
    disks.update(build_stream(d, rng))
    disks.update(build_zero_grain(d, base, rng))
    assert set(disks) == set(FIXTURES), set(disks) ^ set(FIXTURES)
    for name, disk in disks.items():
        write_sparse(expected_path(d, name), disk.data)
    return {name: open_path(d, name) for name in FIXTURES}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} DIRECTORY", file=sys.stderr)
        return 2
    for name, path in build_fixtures(argv[1]).items():
        print(f"{name:<24} {FIXTURES[name]['qemu']:<9} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
