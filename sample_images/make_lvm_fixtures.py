#!/usr/bin/env python3
"""Build LVM2 physical volumes (PVs) from imgscope's schemas, laid out as lvm2 2.03 does.

    python3 sample_images/make_lvm_fixtures.py DIR       # or, from Python:
    from make_lvm_fixtures import build_fixtures; fixtures = build_fixtures(DIR)

The label sector, the metadata area headers and the metadata text are made by
``imgscope.schemas.lvm2`` (``build_label_sector``, ``build_mda_header``,
``export_metadata``).  The layout is the one ``pvcreate --pvmetadatacopies 2
--metadatasize 60k --dataalignment 64k`` + ``vgcreate -s 1M`` + ``lvcreate`` of
lvm2 2.03.16 write (checked byte for byte against PVs made on a loop device):

* sector 0 zero, the label in sector 1 (PV header extension version 2, flag USED);
* metadata area 0 at 4096 running up to ``pe_start`` (60 KiB); metadata area 1 in the
  last 64 KiB of the device (the device is a whole number of MiB);
* every metadata change is a new copy written at the next 512-byte boundary after the
  previous one in each area's circular buffer, wrapping to byte 512 of the area (the
  copy is split there); older copies stay in the buffer;
* the text: the VG section first (no indentation), then the global keys, NUL ended.

Each logical volume (LV) is filled with seeded random bytes through the fixture's own
extent arithmetic (``pe_start`` + extent x extent size); free extents hold a fixed
pattern.  Next to every PV the script writes ``NAME.LV.expected.raw`` (what reading
LV must give) and ``NAME.metadata.txt`` (the current metadata text).

Deterministic: fixed seeds, UUIDs and times; ~0.5 s, ~47 MiB of files.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgscope.schemas import lvm2 as L

SECTOR = 512
KiB, MiB = 1024, 1024 * 1024
SEED = 20261122
EXTENT_SECTORS = 2048                  # vgcreate -s 1M
EXTENT = EXTENT_SECTORS * SECTOR
CREATION_TIME = 1795310790             # fixed, so the text never changes
HOST = "fixture-host"
UNAME = "Linux fixture-host 6.1.0-imgscope #1 SMP x86_64"
FREE_PATTERN = b"FREE EXTENT "         # what unused extents hold


def make_uuid(rng: np.random.Generator) -> bytes:
    """32 characters as lvm2 generates them: 0-9a-zA-Z (lvm2 also accepts '!' and '#'
    but never generates them)."""
    idx = rng.integers(0, 62, L.ID_LEN)
    return "".join(L.UUID_CHARS[i] for i in idx).encode("ascii")


def ctime(t: int) -> str:
    return time.asctime(time.gmtime(t))


@dataclass
class Layout:
    """Where lvm2 puts things on a PV of `device_size` bytes (a whole number of MiB)."""

    device_size: int
    pe_start: int = 64 * KiB                 # --dataalignment 64k
    mda0_size: int = 60 * KiB                # --metadatasize 60k: 4096 .. pe_start
    mda1_size: int | None = 64 * KiB         # --pvmetadatacopies 2: the last 64 KiB
    extent: int = EXTENT

    @property
    def metadata_areas(self) -> list[tuple[int, int]]:
        areas = [(4096, self.mda0_size)]
        if self.mda1_size:
            areas.append((self.device_size // MiB * MiB - self.mda1_size, self.mda1_size))
        return areas

    @property
    def pe_count(self) -> int:
        end = self.metadata_areas[1][0] if self.mda1_size else self.device_size
        return (end - self.pe_start) // self.extent


@dataclass
class Lv:
    """A linear LV: segments of (pv name, first PV extent, extent count), in LV order."""

    name: str
    segments: list[tuple[str, int, int]]
    uuid: bytes = b""


def lv_section(lv: Lv, rng_time: int) -> dict:
    sec: dict = {"id": L.format_uuid(lv.uuid), "status": ["READ", "WRITE", "VISIBLE"],
                 "flags": [], "creation_time": rng_time, "creation_host": HOST,
                 "segment_count": len(lv.segments)}
    le = 0
    for k, (pv, pe, count) in enumerate(lv.segments, 1):
        sec[f"segment{k}"] = {"start_extent": le, "extent_count": count, "type": "striped",
                              "stripe_count": 1, "stripes": [pv, pe]}
        le += count
    return sec


def vg_section(vg_uuid: bytes, seqno: int, pvs: list[tuple[str, bytes, Layout, str]],
               lvs: list[Lv]) -> dict:
    """The VG section as lvm2 writes it (key order included)."""
    vg: dict = {"id": L.format_uuid(vg_uuid), "seqno": seqno, "format": "lvm2",
                "status": ["RESIZEABLE", "READ", "WRITE"], "flags": [],
                "extent_size": EXTENT_SECTORS, "max_lv": 0, "max_pv": 0, "metadata_copies": 0,
                "physical_volumes": {}}
    for name, uuid, layout, device in pvs:
        vg["physical_volumes"][name] = {
            "id": L.format_uuid(uuid), "device": device, "status": ["ALLOCATABLE"],
            "flags": [], "dev_size": layout.device_size // SECTOR,
            "pe_start": layout.pe_start // SECTOR, "pe_count": layout.pe_count}
    if lvs:
        vg["logical_volumes"] = {lv.name: lv_section(lv, CREATION_TIME) for lv in lvs}
    return vg


def metadata_text(vg_name: str, vg: dict, description: str) -> bytes:
    return L.export_metadata(vg_name, vg, description=description, creation_host=HOST,
                             creation_time=CREATION_TIME, uname=UNAME,
                             time_text=ctime(CREATION_TIME))


def metadata_tree(vg_name: str, vg: dict, description: str) -> dict:
    """What parsing `metadata_text` must give."""
    return {vg_name: vg, "contents": "Text Format Volume Group", "version": 1,
            "description": description, "creation_host": HOST, "creation_time": CREATION_TIME}


@dataclass
class Slot:
    """Where the last copy of an area's history lies (raw_locn slot 0)."""

    offset: int
    size: int
    checksum: int
    wrapped: bool


def write_area(disk: bytearray, start: int, size: int, copies: list[bytes]) -> Slot | None:
    """Write copies one after the other in the circular buffer of the area at `start`,
    as lvm2 does, then the header pointing at the last one."""
    slot = None
    for text in copies:
        off = L.MDA_HEADER_SIZE if slot is None else L.next_copy_offset(slot.offset, slot.size,
                                                                        size)
        first = min(len(text), size - off)
        disk[start + off:start + off + first] = text[:first]
        rest = text[first:]
        disk[start + L.MDA_HEADER_SIZE:start + L.MDA_HEADER_SIZE + len(rest)] = rest
        slot = Slot(off, len(text), L.lvm_crc(text), bool(rest))
    locs = [dict(offset=slot.offset, size=slot.size, checksum=slot.checksum)] if slot else []
    locs.append(dict(offset=0, size=0, checksum=0))          # precommitted slot: empty
    disk[start:start + L.MDA_HEADER_SIZE] = L.build_mda_header(start, size, locs)
    return slot


def build_pv_bytes(layout: Layout, pv_uuid: bytes, copies: list[bytes]) -> tuple[bytearray,
                                                                                   list]:
    """A zero PV with its label and metadata areas (history `copies`, last = current)."""
    disk = bytearray(layout.device_size)
    disk[SECTOR:2 * SECTOR] = L.build_label_sector(
        pv_uuid, layout.device_size, [(layout.pe_start, 0)], layout.metadata_areas)
    slots = [write_area(disk, start, size, copies) for start, size in layout.metadata_areas]
    return disk, slots


def place_lvs(disk: bytearray, layout: Layout, pv_name: str, lvs: list[Lv],
              rng: np.random.Generator) -> dict[str, bytes]:
    """Fill free extents with FREE_PATTERN and each LV with random bytes, extent by extent."""
    free = (FREE_PATTERN * (EXTENT // len(FREE_PATTERN) + 1))[:EXTENT]
    for pe in range(layout.pe_count):
        at = layout.pe_start + pe * layout.extent
        disk[at:at + EXTENT] = free
    contents = {}
    for lv in lvs:
        total = sum(count for _, _, count in lv.segments)
        data = rng.integers(0, 256, total * EXTENT, dtype=np.uint8).tobytes()
        le = 0
        for pv, pe, count in lv.segments:
            if pv == pv_name:
                at = layout.pe_start + pe * layout.extent
                disk[at:at + count * EXTENT] = data[le * EXTENT:(le + count) * EXTENT]
            le += count
        contents[lv.name] = data
    return contents


@dataclass
class Fixture:
    name: str
    path: Path
    layout: Layout
    pv_uuid: bytes
    pv_name: str
    vg_name: str
    tree: dict                       # the parsed form of the current text
    text: bytes                      # current metadata copy, NUL included
    slots: list                      # per metadata area: Slot of the current copy
    lv_data: dict = field(default_factory=dict)   # LV name -> bytes it reads as (LVs here)
    copies: int = 0                  # metadata copies written (seqno of the current one)


def history(vg_name: str, final: dict, lvs: list[Lv], wrap_size: int | None) -> list[tuple]:
    """(seqno, text, tree) of successive metadata copies: vgcreate, one lvcreate per LV,
    then renames until the copy written last wraps in a buffer of `wrap_size` bytes."""
    steps: list[tuple[str, list[Lv]]] = [(f"vgcreate -s 1M {vg_name}", [])]
    for i in range(len(lvs)):
        steps.append((f"lvcreate -n {lvs[i].name} {vg_name}", lvs[:i + 1]))
    out, offset, size = [], None, None
    seq = 0
    while True:
        seq += 1
        if seq <= len(steps):
            desc, lv_list = steps[seq - 1]
        else:
            desc, lv_list = f'lvchange --addtag "step {seq}" {vg_name}/{lvs[0].name}', lvs
        vg = dict(final, seqno=seq)
        if lv_list:
            vg["logical_volumes"] = {lv.name: final["logical_volumes"][lv.name] for lv in lv_list}
        else:
            vg.pop("logical_volumes", None)
        text = metadata_text(vg_name, vg, f"Write from {desc}.")
        out.append((seq, text, metadata_tree(vg_name, vg, f"Write from {desc}.")))
        offset = L.MDA_HEADER_SIZE if offset is None else L.next_copy_offset(offset, size,
                                                                            wrap_size or 1 << 62)
        size = len(text)
        if seq >= len(steps) and (wrap_size is None or offset + size > wrap_size):
            return out


def build_single(d: Path, rng: np.random.Generator) -> Fixture:
    """lvm_pv: VG 'vgfix' on one 16 MiB PV; root (contiguous), data (two non-adjacent
    segments), swap; two metadata areas, the current copy wrapping in area 0."""
    layout = Layout(16 * MiB)
    pv_uuid, vg_uuid = make_uuid(rng), make_uuid(rng)
    lvs = [Lv("root", [("pv0", 0, 4)]), Lv("data", [("pv0", 4, 2), ("pv0", 9, 3)]),
           Lv("swap", [("pv0", 6, 2)])]
    for lv in lvs:
        lv.uuid = make_uuid(rng)
    final = vg_section(vg_uuid, 0, [("pv0", pv_uuid, layout, "/dev/vda")], lvs)
    steps = history("vgfix", final, lvs, layout.mda0_size)
    seqno, text, tree = steps[-1]
    disk, slots = build_pv_bytes(layout, pv_uuid, [t for _, t, _ in steps])
    contents = place_lvs(disk, layout, "pv0", lvs, rng)
    path = d / "lvm_pv.raw"
    path.write_bytes(disk)
    return Fixture("lvm_pv", path, layout, pv_uuid, "pv0", "vgfix", tree, text, slots,
                   contents, seqno)


def build_two_pvs(d: Path, rng: np.random.Generator) -> list[Fixture]:
    """lvm_two_pvs_0 / _1: VG 'vgpair' over two 8 MiB PVs (one metadata area each):
    'local' on pv0, 'remote' on pv1, 'spread' linear over both, 'striped' over both."""
    layout = Layout(8 * MiB, mda1_size=None)
    uuids = [make_uuid(rng), make_uuid(rng)]
    vg_uuid = make_uuid(rng)
    lvs = [Lv("local", [("pv0", 0, 2)]), Lv("remote", [("pv1", 0, 2)]),
           Lv("spread", [("pv0", 2, 1), ("pv1", 2, 1)])]
    for lv in lvs:
        lv.uuid = make_uuid(rng)
    vg = vg_section(vg_uuid, 5, [("pv0", uuids[0], layout, "/dev/vdb"),
                                 ("pv1", uuids[1], layout, "/dev/vdc")], lvs)
    striped_uuid = make_uuid(rng)
    vg["logical_volumes"]["striped"] = {
        "id": L.format_uuid(striped_uuid), "status": ["READ", "WRITE", "VISIBLE"], "flags": [],
        "creation_time": CREATION_TIME, "creation_host": HOST, "segment_count": 1,
        "segment1": {"start_extent": 0, "extent_count": 2, "type": "striped",
                     "stripe_count": 2, "stripe_size": 128, "stripes": ["pv0", 3, "pv1", 3]}}
    desc = "Write from lvcreate -i 2 -n striped vgpair."
    text = metadata_text("vgpair", vg, desc)
    tree = metadata_tree("vgpair", vg, desc)
    out = []
    for i, uuid in enumerate(uuids):
        disk, slots = build_pv_bytes(layout, uuid, [text])
        contents = place_lvs(disk, layout, f"pv{i}", lvs, np.random.default_rng(SEED + 1))
        here = {lv.name: contents[lv.name] for lv in lvs
                if all(pv == f"pv{i}" for pv, _, _ in lv.segments)}
        path = d / f"lvm_two_pvs_{i}.raw"
        path.write_bytes(disk)
        out.append(Fixture(f"lvm_two_pvs_{i}", path, layout, uuid, f"pv{i}", "vgpair", tree,
                           text, slots, here, 5))
    return out


def build_fixtures(directory) -> dict[str, Fixture]:
    """Build every fixture in `directory` (created if needed); {name: Fixture}."""
    d = Path(directory).absolute()
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    fixtures = [build_single(d, rng), *build_two_pvs(d, rng)]
    for fx in fixtures:
        (d / f"{fx.name}.metadata.txt").write_bytes(fx.text[:-1])
        for lv, data in fx.lv_data.items():
            (d / f"{fx.name}.{lv}.expected.raw").write_bytes(data)
    return {fx.name: fx for fx in fixtures}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write(f"usage: {argv[0]} DIRECTORY\n")
        return 2
    for name, fx in build_fixtures(argv[1]).items():
        wrapped = ["wrapped" if s and s.wrapped else "contiguous" for s in fx.slots]
        sys.stdout.write(f"{name:<16} VG {fx.vg_name} seqno {fx.copies} LVs "
                         f"{','.join(fx.lv_data) or '-':<20} metadata {'/'.join(wrapped)} "
                         f"{fx.path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
