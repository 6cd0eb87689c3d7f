#!/usr/bin/env python3
"""Build the VHDX variants qemu-img cannot write, from imgscope's schemas.

    python3 sample_images/make_vhdx_fixtures.py DIR       # or, from Python:
    from make_vhdx_fixtures import build_fixtures; fixtures = build_fixtures(DIR)

Every structure (file identifier, headers, region tables, metadata items, parent
locator, BAT, sector bitmaps, log entries) is built with ``imgscope.schemas.vhdx``;
numpy holds the guest contents.  Next to every fixture NAME the script writes
``NAME.expected.raw``: the guest disk the specification says it holds.
``build_fixtures`` returns ``{NAME: Fixture}``; ``FIXTURES[NAME]`` says what
qemu-img 7.2 does with it ("reads", "refuses", or "replays": refuses read-only
opens, replays the log with ``qemu-img check -r all``) and why; ``qemu_expected``
is QEMU's view where it differs from the specification's (the wrapped log).

Deterministic: fixed seeds, fixed GUIDs and sequence numbers; ~0.5 s, ~40 MiB of
(mostly sparse) files.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgscope.schemas import vhdx as X

KiB, MiB = 1024, 1024 * 1024
SEED = 20261123
BLOCK = 1 * MiB
SIZE = 8 * MiB + 1536                    # 9 payload blocks, the last one partial

GUID_BASE_DATA = "5b1a5e00-0000-4000-8000-00000000da7a"
GUID_BASE_FILE = "5b1a5e00-0000-4000-8000-0000000f11e0"
GUID_CHILD_DATA = "c41d0000-0000-4000-8000-00000000da7a"
GUID_STALE = "deadbeef-0000-4000-8000-000000000000"
GUID_LOG = "10600000-0000-4000-8000-000000000001"

FIXTURES: dict[str, dict[str, str]] = {
    "base": {"qemu": "reads", "what": "dynamic disk of 9 1 MiB blocks in every payload state: "
             "FULLY_PRESENT, ZERO, NOT_PRESENT, UNMAPPED, UNDEFINED, UNMAPPED_v095 (5), a partial "
             "last block; the parent of child and child_stale"},
    "child": {"qemu": "refuses", "error": "not supported",
              "what": "differencing disk over base.vhdx: NOT_PRESENT (parent), FULLY_PRESENT, "
              "PARTIALLY_PRESENT over parent data and over parent zeros (sector bitmap, junk "
              "in the sectors whose bit is clear), ZERO over parent data; parent locator with "
              "parent_linkage, relative_path, absolute_win32_path",
              "why": "QEMU 7.2 refuses files with has_parent (differencing is 'not supported')"},
    "child_stale": {"qemu": "refuses", "error": "not supported",
                    "what": "child whose parent_linkage is not base's data_write_guid",
                    "why": "QEMU 7.2 refuses differencing files"},
    "sector4k": {"qemu": "refuses", "error": "not supported",
                 "what": "4096-byte logical and physical sectors (chunk ratio 32768)",
                 "why": "QEMU 7.2 opens only 512-byte logical sectors ('Operation not supported')"},
    "dirty_log": {"qemu": "replays", "what": "base with a log of two consecutive entries for the "
                  "header's log_guid: a data descriptor that rewrites the BAT sector (block 2 "
                  "becomes FULLY_PRESENT at data already in the file, block 3 ZERO), a data "
                  "descriptor inside payload block 0 and a zero descriptor over payload block 7",
                  "why": "qemu-img refuses read-only opens; 'qemu-img check -r all' replays it"},
    "dirty_log_wrap": {"qemu": "replays", "what": "dirty_log with the two entries wrapped around "
                       "the end of the circular log (the first at log offset 1 MiB - 8 KiB, the "
                       "second at 0, its tail naming the first)",
                       "why": "QEMU 7.2 picks the run whose first entry has the highest sequence "
                       "number and replays only the second entry; the specification replays both"},
}


@dataclass
class Fixture:
    name: str
    path: Path
    expected: Path                      # the guest disk the specification says
    virtual_size: int
    qemu: str
    qemu_expected: Path | None = None   # what QEMU shows after replay when it differs (wrap)
    data_write_guid: str = ""
    notes: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- building blocks


def _le(value: int, n: int) -> bytes:
    return int(value).to_bytes(n, "little")


def _with_checksum(data: bytes, offset: int = 4) -> bytes:
    b = bytearray(data)
    b[offset:offset + 4] = _le(X.checksum(bytes(b), offset), 4)
    return bytes(b)


def header_bytes(seq: int, *, data_write_guid: str, file_write_guid: str, log_guid: str = X.NULL_GUID,
                 log_offset: int = MiB, log_length: int = MiB) -> bytes:
    raw = X.header.build(dict(signature=X.HEADER_SIGNATURE, checksum=0, sequence_number=seq,
                              file_write_guid=file_write_guid, data_write_guid=data_write_guid,
                              log_guid=log_guid, log_version=0, version=1, log_length=log_length,
                              log_offset=log_offset, reserved=bytes(4016)))
    return _with_checksum(raw)


def region_table_bytes(regions: list[tuple[str, int, int, int]]) -> bytes:
    entries = np.zeros(len(regions), X.REGION_ENTRY_DTYPE)
    for k, (guid, off, length, bits) in enumerate(regions):
        entries[k] = (np.void(X.guid_bytes(guid)), off, length, bits)
    raw = (X.region_table_header.build(dict(signature=X.REGION_SIGNATURE, checksum=0,
                                             entry_count=len(regions), reserved=0))
           + X.region_entries(len(regions)).build(entries))
    return _with_checksum(raw.ljust(X.REGION_TABLE_SIZE, b"\0"))


def parent_locator_bytes(pairs: dict[str, str]) -> bytes:
    n = len(pairs)
    entries = np.zeros(n, X.PARENT_LOCATOR_ENTRY_DTYPE)
    blob = b""
    pos = X.PARENT_LOCATOR_HEADER_SIZE + n * X.PARENT_LOCATOR_ENTRY_SIZE
    for k, (key, value) in enumerate(pairs.items()):
        kb, vb = key.encode("utf-16-le"), value.encode("utf-16-le")
        entries[k] = (pos + len(blob), pos + len(blob) + len(kb), len(kb), len(vb))
        blob += kb + vb
    return (X.parent_locator_header.build(dict(locator_type=X.PARENT_TYPE_VHDX_GUID, reserved=0,
                                               key_value_count=n))
            + X.parent_locator_entries(n).build(entries) + blob)


def metadata_bytes(*, block_size: int, virtual_size: int, logical: int, physical: int,
                   page83: str, flags: int, locator: bytes | None) -> bytes:
    items = [(X.FILE_PARAMETERS_GUID, X.file_parameters.build(dict(block_size=block_size, data_bits=flags)), 4),
             (X.VIRTUAL_DISK_SIZE_GUID, X.virtual_disk_size.build(dict(virtual_disk_size=virtual_size)), 6),
             (X.PAGE83_GUID, X.page83_data.build(dict(page_83_data=page83)), 6),
             (X.LOGICAL_SECTOR_SIZE_GUID, X.logical_sector_size.build(dict(logical_sector_size=logical)), 6),
             (X.PHYSICAL_SECTOR_SIZE_GUID, X.physical_sector_size.build(dict(physical_sector_size=physical)), 6)]
    if locator is not None:
        items.append((X.PARENT_LOCATOR_GUID, locator, 4))
    entries = np.zeros(len(items), X.METADATA_ENTRY_DTYPE)
    body, pos = b"", X.METADATA_TABLE_SIZE
    for k, (guid, data, bits) in enumerate(items):
        entries[k] = (np.void(X.guid_bytes(guid)), pos + len(body), len(data), bits, 0)
        body += data
    table = (X.metadata_table_header.build(dict(signature=X.METADATA_SIGNATURE, reserved=0,
                                                entry_count=len(items), reserved2=bytes(20)))
             + X.metadata_entries(len(items)).build(entries))
    return table.ljust(X.METADATA_TABLE_SIZE, b"\0") + body


@dataclass
class Layout:
    """Where build_vhdx put things (offsets in the file)."""

    log_offset: int
    bat_offset: int
    metadata_offset: int
    block_offsets: dict
    bitmap_offsets: dict
    chunk_ratio: int
    size: int


def build_vhdx(path: Path, *, virtual_size: int, blocks: dict, block_size: int = BLOCK,
               logical: int = 512, physical: int = 512, bitmaps: dict | None = None,
               parent: dict | None = None, data_write_guid: str = GUID_BASE_DATA,
               page83: str = "83838383-0000-4000-8000-000000000083", sequence: int = 41,
               log_guid: str = X.NULL_GUID, extra_blocks: int = 0) -> Layout:
    """Write a VHDX.  `blocks`: payload index -> (state, block bytes or None);
    `bitmaps`: payload index -> bool per logical sector (PARTIALLY_PRESENT blocks);
    `parent`: key/value pairs of a parent locator (makes a differencing disk);
    `extra_blocks`: spare 1 MiB blocks appended after the data (for log fixtures)."""
    has_parent = parent is not None
    ratio = X.chunk_ratio(block_size, logical)
    n_entries = X.bat_entries(virtual_size, block_size, logical, has_parent)
    bat_len = -(-n_entries * 8 // MiB) * MiB
    log_off, bat_off = MiB, 2 * MiB
    meta_off = bat_off + bat_len
    data_off = meta_off + MiB
    bat = np.zeros(n_entries, X.BAT_DTYPE)
    pos = data_off
    block_offsets, bitmap_offsets, pieces = {}, {}, []
    for p in sorted(blocks):
        state, data = blocks[p]
        off = 0
        if state in (X.PAYLOAD_BLOCK_FULLY_PRESENT, X.PAYLOAD_BLOCK_PARTIALLY_PRESENT):
            off = pos
            block_offsets[p] = off
            pieces.append((off, data))
            pos += block_size
        bat[X.bat_index_of_block(p, ratio)] = X.bat_entry(state, off)
    chunks: dict[int, np.ndarray] = {}
    for p, bits in (bitmaps or {}).items():
        spb = block_size // logical
        c = p // ratio
        chunk = chunks.setdefault(c, np.zeros(X.SECTORS_PER_BITMAP_BLOCK, bool))
        chunk[(p % ratio) * spb:(p % ratio + 1) * spb] = bits
    for c, bits in sorted(chunks.items()):
        bitmap_offsets[c] = pos
        pieces.append((pos, np.packbits(bits, bitorder="little").tobytes()))
        bat[X.bat_index_of_bitmap(c, ratio)] = X.bat_entry(X.SB_BLOCK_PRESENT, pos)
        pos += X.SECTOR_BITMAP_BLOCK_SIZE
    pos += extra_blocks * MiB
    flags = X.PARAMS_HAS_PARENT if has_parent else 0
    meta = metadata_bytes(block_size=block_size, virtual_size=virtual_size, logical=logical,
                          physical=physical, page83=page83, flags=flags,
                          locator=parent_locator_bytes(parent) if has_parent else None)
    regions = region_table_bytes([(X.BAT_GUID, bat_off, bat_len, 1), (X.METADATA_GUID, meta_off, MiB, 1)])
    fid = X.file_identifier.build(dict(signature=X.FILE_SIGNATURE, creator="imgscope fixture"))
    with open(path, "wb") as f:
        f.truncate(pos)
        f.write(fid)
        for i, off in enumerate((X.HEADER1_OFFSET, X.HEADER2_OFFSET)):
            f.seek(off)
            f.write(header_bytes(sequence + i, data_write_guid=data_write_guid,
                                 file_write_guid=GUID_BASE_FILE, log_guid=log_guid))
        for off in (X.REGION_TABLE1_OFFSET, X.REGION_TABLE2_OFFSET):
            f.seek(off)
            f.write(regions)
        f.seek(bat_off)
        f.write(X.bat_table(n_entries).build(bat))
        f.seek(meta_off)
        f.write(meta)
        for off, data in pieces:
            f.seek(off)
            f.write(data)
    return Layout(log_off, bat_off, meta_off, block_offsets, bitmap_offsets, ratio, pos)


def log_entry_bytes(seq: int, tail: int, *, log_guid: str, data: list[tuple[int, bytes]],
                    zeros: list[tuple[int, int]], file_size: int) -> bytes:
    """One log entry: header, descriptors (data then zero), data sectors; checksummed."""
    ndesc = len(data) + len(zeros)
    dsect = (ndesc + 2 + 127) // 128
    length = (dsect + len(data)) * X.LOG_SECTOR_SIZE
    desc = np.zeros(ndesc, X.LOG_DESCRIPTOR_DTYPE)
    sectors = np.zeros(len(data), X.LOG_DATA_SECTOR_DTYPE)
    for k, (off, sector) in enumerate(data):
        desc[k] = (X.LOG_DESC_SIGNATURE, int.from_bytes(sector[-4:], "little"),
                   int.from_bytes(sector[:8], "little"), off, seq)
        sectors[k] = (X.LOG_DATA_SIGNATURE, seq >> 32, np.void(sector[8:-4]), seq & 0xFFFFFFFF)
    for k, (off, n) in enumerate(zeros):
        desc[len(data) + k] = (X.LOG_ZERO_SIGNATURE, 0, n, off, seq)
    head = X.log_entry_header.build(dict(signature=X.LOG_SIGNATURE, checksum=0, entry_length=length,
                                         tail=tail, sequence_number=seq, descriptor_count=ndesc,
                                         reserved=0, log_guid=log_guid, flushed_file_offset=file_size,
                                         last_file_offset=file_size))
    raw = (head + X.log_descriptors(ndesc).build(desc)).ljust(dsect * X.LOG_SECTOR_SIZE, b"\0") \
        + X.log_data_sectors(len(data)).build(sectors)
    return _with_checksum(raw)


def _write(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _expected(path: Path, guest: np.ndarray) -> Path:
    out = path.with_name(path.stem + ".expected.raw") if path.suffix == ".vhdx" else Path(str(path) + ".raw")
    with open(out, "wb") as f:
        f.truncate(guest.size)
        nz = np.flatnonzero(guest.reshape(-1, 512).any(axis=1)) if guest.size % 512 == 0 else \
            np.arange(-(-guest.size // 512))
        for s in nz.tolist():                   # sparse: only non-zero sectors are written
            f.seek(s * 512)
            f.write(guest[s * 512:(s + 1) * 512].tobytes())
    return out


# --------------------------------------------------------------------------- the fixtures


def _rand(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def _build_base(root: Path, rng) -> tuple[Fixture, Layout, dict]:
    path = root / "base.vhdx"
    guest = np.zeros(SIZE, np.uint8)
    states = [X.PAYLOAD_BLOCK_FULLY_PRESENT, X.PAYLOAD_BLOCK_ZERO, X.PAYLOAD_BLOCK_NOT_PRESENT,
              X.PAYLOAD_BLOCK_FULLY_PRESENT, X.PAYLOAD_BLOCK_UNMAPPED, X.PAYLOAD_BLOCK_UNDEFINED,
              X.PAYLOAD_BLOCK_UNMAPPED_V095, X.PAYLOAD_BLOCK_FULLY_PRESENT, X.PAYLOAD_BLOCK_FULLY_PRESENT]
    blocks = {}
    for p, st in enumerate(states):
        data = None
        if st == X.PAYLOAD_BLOCK_FULLY_PRESENT:
            data = _rand(rng, BLOCK)
            n = min(BLOCK, SIZE - p * BLOCK)
            guest[p * BLOCK:p * BLOCK + n] = np.frombuffer(data[:n], np.uint8)
        blocks[p] = (st, data)
    # spare room for the log fixtures: block 2's future data
    layout = build_vhdx(path, virtual_size=SIZE, blocks=blocks, extra_blocks=1)
    spare = layout.size - MiB
    spare_data = _rand(rng, BLOCK)
    _write(path, spare, spare_data)
    fx = Fixture("base", path, _expected(path, guest), SIZE, "reads", data_write_guid=GUID_BASE_DATA)
    return fx, layout, dict(guest=guest, blocks=blocks, spare=spare, spare_data=spare_data)


def _build_child(root: Path, rng, base: dict, name: str, linkage: str) -> Fixture:
    path = root / f"{name}.vhdx"
    spb = BLOCK // 512
    guest = base["guest"].copy()
    blocks, bitmaps = {}, {}
    # 1: fully present over parent zeros; 7: ZERO over parent data; 0/5: parent shows
    d1 = _rand(rng, BLOCK)
    blocks[1] = (X.PAYLOAD_BLOCK_FULLY_PRESENT, d1)
    guest[BLOCK:2 * BLOCK] = np.frombuffer(d1, np.uint8)
    blocks[7] = (X.PAYLOAD_BLOCK_ZERO, None)
    guest[7 * BLOCK:8 * BLOCK] = 0
    blocks[0] = (X.PAYLOAD_BLOCK_NOT_PRESENT, None)
    blocks[6] = (X.PAYLOAD_BLOCK_UNMAPPED, None)
    guest[6 * BLOCK:7 * BLOCK] = 0
    # partially present: over parent zeros (2), over parent data (3), the last partial block (8)
    for p in (2, 3, 8):
        bits = np.zeros(spb, bool)
        if p == 2:
            bits[[0, 1, 2, 100, 2047]] = True
        elif p == 3:
            bits[np.arange(0, spb, 3)] = True
            bits[1000:1300] = True
        else:
            bits[[0, 2, 3, 4]] = True          # sector 4 is past the end of the disk
        data = bytearray(b"\xEE" * BLOCK)      # junk where the bit is clear: the parent shows
        for s in np.flatnonzero(bits).tolist():
            sector = _rand(rng, 512)
            data[s * 512:(s + 1) * 512] = sector
            g = p * BLOCK + s * 512
            if g < SIZE:
                guest[g:g + 512] = np.frombuffer(sector, np.uint8)
        blocks[p] = (X.PAYLOAD_BLOCK_PARTIALLY_PRESENT, bytes(data))
        bitmaps[p] = bits
    locator = {"parent_linkage": "{" + linkage.upper() + "}", "relative_path": ".\\base.vhdx",
               "absolute_win32_path": "C:\\VMs\\base.vhdx"}
    build_vhdx(path, virtual_size=SIZE, blocks=blocks, bitmaps=bitmaps, parent=locator,
               data_write_guid=GUID_CHILD_DATA, sequence=7)
    return Fixture(name, path, _expected(path, guest), SIZE, FIXTURES[name]["qemu"],
                   data_write_guid=GUID_CHILD_DATA, notes=dict(linkage=linkage))


def _build_sector4k(root: Path, rng) -> Fixture:
    path = root / "sector4k.vhdx"
    size = 3 * MiB + 8192
    guest = np.zeros(size, np.uint8)
    blocks = {}
    for p in (0, 3):
        data = _rand(rng, BLOCK)
        n = min(BLOCK, size - p * BLOCK)
        guest[p * BLOCK:p * BLOCK + n] = np.frombuffer(data[:n], np.uint8)
        blocks[p] = (X.PAYLOAD_BLOCK_FULLY_PRESENT, data)
    blocks[1] = (X.PAYLOAD_BLOCK_ZERO, None)
    build_vhdx(path, virtual_size=size, blocks=blocks, logical=4096, physical=4096)
    return Fixture("sector4k", path, _expected(path, guest), size, "refuses")


def _build_dirty(root: Path, rng, base_fx: Fixture, layout: Layout, base: dict, name: str,
                 wrap: bool) -> Fixture:
    """A copy of base whose log holds two entries still to replay."""
    path = root / f"{name}.vhdx"
    path.write_bytes(base_fx.path.read_bytes())
    size = path.stat().st_size
    ratio = layout.chunk_ratio
    bat_sector_off = layout.bat_offset              # BAT entries 0..511 live in its first 4 KiB
    sector = bytearray(Path(path).read_bytes()[bat_sector_off:bat_sector_off + X.LOG_SECTOR_SIZE])
    bat = np.frombuffer(bytes(sector), X.BAT_DTYPE).copy()
    bat[X.bat_index_of_block(2, ratio)] = X.bat_entry(X.PAYLOAD_BLOCK_FULLY_PRESENT, base["spare"])
    bat[X.bat_index_of_block(3, ratio)] = X.bat_entry(X.PAYLOAD_BLOCK_ZERO, 0)
    new_bat = bat.tobytes()
    block0 = layout.block_offsets[0]
    new_data = _rand(rng, X.LOG_SECTOR_SIZE)
    block7 = layout.block_offsets[7]
    entry1 = dict(data=[(bat_sector_off, new_bat)], zeros=[])
    entry2 = dict(data=[(block0 + 8192, new_data)], zeros=[(block7, 64 * KiB)])
    log_len = MiB
    pos1 = log_len - 8192 if wrap else 0
    e1 = log_entry_bytes(10, pos1, log_guid=GUID_LOG, file_size=size, **entry1)
    pos2 = (pos1 + len(e1)) % log_len
    e2 = log_entry_bytes(11, pos1, log_guid=GUID_LOG, file_size=size, **entry2)
    assert pos1 + len(e1) <= log_len and pos2 + len(e2) <= log_len
    _write(path, layout.log_offset + pos1, e1)
    _write(path, layout.log_offset + pos2, e2)
    for i, off in enumerate((X.HEADER1_OFFSET, X.HEADER2_OFFSET)):
        _write(path, off, header_bytes(41 + i, data_write_guid=GUID_BASE_DATA,
                                       file_write_guid=GUID_BASE_FILE, log_guid=GUID_LOG))
    # the guest after replaying entry 1, entry 2 (the specification) or only entry 2 (QEMU, wrapped)
    after2 = base["guest"].copy()
    after2[8192:8192 + X.LOG_SECTOR_SIZE] = np.frombuffer(new_data, np.uint8)
    after2[7 * BLOCK:7 * BLOCK + 64 * KiB] = 0
    both = after2.copy()
    both[2 * BLOCK:3 * BLOCK] = np.frombuffer(base["spare_data"], np.uint8)
    both[3 * BLOCK:4 * BLOCK] = 0
    fx = Fixture(name, path, _expected(path, both), SIZE, "replays", data_write_guid=GUID_BASE_DATA,
                 notes=dict(entries=[pos1, pos2]))
    if wrap:
        fx.qemu_expected = _expected(Path(str(path) + ".qemu"), after2)
    return fx


def build_fixtures(directory) -> dict[str, Fixture]:
    """Build every fixture into `directory` (created if needed); {name: Fixture}."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    base_fx, layout, base = _build_base(root, rng)
    out = {"base": base_fx}
    out["child"] = _build_child(root, rng, base, "child", GUID_BASE_DATA)
    out["child_stale"] = _build_child(root, rng, base, "child_stale", GUID_STALE)
    out["sector4k"] = _build_sector4k(root, rng)
    out["dirty_log"] = _build_dirty(root, rng, base_fx, layout, base, "dirty_log", wrap=False)
    out["dirty_log_wrap"] = _build_dirty(root, rng, base_fx, layout, base, "dirty_log_wrap", wrap=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for name, fx in build_fixtures(sys.argv[1]).items():
        print(f"{name:16} {fx.path}  qemu: {fx.qemu}")
