"""Corrupted samples of every format but qcow2: VMDK, VDI, VHD, VHDX, qcow v1, cow.

Each sample is a clean image made by qemu-img / qemu-io (cow: by the schema-based
fixture builder, no qemu-img writes cow any more) and then poked; every offset
is computed from the clean file with plain ``struct`` reads, never through
imgscope.  ``qemu`` is qemu-img check's verdict by its exit code: 0 clean,
2 corruptions, 1 "incomplete" (the check failed: qemu-img cannot open the file,
or its VMDK check stops at a grain past the end of the file); None where
qemu-img cannot check the format (vpc, qcow, cow: exit 63).
"""
from __future__ import annotations

import struct
import sys
from pathlib import Path

from cases import Case, Poke, qemu_image

HERE = Path(__file__).resolve().parent
KiB, MiB = 1024, 1024 * 1024


# ---------------------------------------------------------------------------- plain reads
def _u(path: Path, offset: int, fmt: str) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _size(path: Path) -> int:
    return path.stat().st_size


# VMDK (KDMV header, little endian): rgdOffset at 0x30, gdOffset at 0x38 (sectors)
def _vmdk_gd(path: Path) -> int:
    return _u(path, 0x38, "<Q") * 512


def _vmdk_rgd(path: Path) -> int:
    return _u(path, 0x30, "<Q") * 512


def _vmdk_gt0(path: Path) -> int:
    """Byte offset of the primary grain table of grain directory entry 0."""
    return _u(path, _vmdk_gd(path), "<I") * 512


# VDI: offset_bmap at 0x154, blocks_allocated at 0x184 (u32 little endian)
def _vdi_map(path: Path) -> int:
    return _u(path, 0x154, "<I")


# VHD (big endian): the footer's checksum at 64; dynamic header at 512, tableOffset at +16
def _vhd_bat(path: Path) -> int:
    return _u(path, 512 + 16, ">Q")


# VHDX (little endian): headers at 64 KiB and 128 KiB, region table 1 at 192 KiB
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE1 = 192 * KiB
BAT_GUID_LE = bytes.fromhex("6677c22d23f600429d64115e9bfd4a08")


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected 0x82F63B78) as VHDX uses it."""
    table = _crc32c.table
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc_table() -> list[int]:
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        out.append(c)
    return out


_crc32c.table = _crc_table()


def _vhdx_bat(path: Path) -> int:
    """File offset of the BAT region, from region table 1's entries."""
    with open(path, "rb") as f:
        f.seek(REGION_TABLE1)
        table = f.read(64 * KiB)
    count = struct.unpack_from("<I", table, 8)[0]
    for k in range(count):
        entry = table[16 + 32 * k:48 + 32 * k]
        if entry[:16] == BAT_GUID_LE:
            return struct.unpack_from("<Q", entry, 16)[0]
    raise ValueError(f"{path}: no BAT region")


def _vhdx_header_with_log_guid(path: Path, which: int) -> bytes:
    """Header `which` (0/1) with its log GUID set to the GUID of the log entry qemu left
    at the start of the log, and its CRC-32C recomputed."""
    with open(path, "rb") as f:
        f.seek(HEADER_OFFSETS[which])
        head = bytearray(f.read(4 * KiB))
        log_offset = struct.unpack_from("<Q", head, 72)[0]
        f.seek(log_offset)
        entry = f.read(64)
    assert entry[:4] == b"loge", "qemu-io left no log entry"
    head[48:64] = entry[32:48]
    head[4:8] = bytes(4)
    head[4:8] = struct.pack("<I", _crc32c(bytes(head)))
    return bytes(head)


# qcow v1 (big endian): l1_table_offset at 40; L1[0] is the first L2 table
def _qcow_l2(path: Path) -> int:
    return _u(path, _u(path, 40, ">Q"), ">Q")


# cow (QEMU x86-64 header of 1056 bytes): size (u64 BE) at 1040, bitmap right after
COW_HEADER = 1056


def _cow_plain(path: Path) -> None:
    """A QEMU cow file of 2 MiB with sectors 0-7, 2000-2015 and 4095 stored (no backing)."""
    sys.path.insert(0, str(HERE.parent))
    import numpy as np
    from make_cow_fixtures import cow_file, sectors_from
    size = 2 * MiB
    present = sectors_from([(0, 8), (2000, 16), 4095], size // 512)
    guest = np.random.default_rng(11).integers(0, 256, size, dtype=np.uint8)
    cow_file(path, "qemu", size, present, guest)


def _cow_half_bitmap(path: Path) -> int:
    sectors = _u(path, 1040, ">Q") // 512
    return COW_HEADER + (sectors + 7) // 8 // 2


# ---------------------------------------------------------------------------- the cases
VMDK_DATA = ["write -P 0x11 0 96k", "write -P 0x22 2M 64k"]

CASES = [
    Case("vmdk_redundant_directory_zeroed.vmdk", "vmdk",
         "redundant grain directory entry 0 zeroed: the redundant copy lost grain table 0 "
         "(QEMU reads only the primary copy)",
         qemu_image("vmdk", "4M", VMDK_DATA),
         [Poke(_vmdk_rgd, bytes(4), "RGD[0] = 0")],
         expected=frozenset({"redundant_directory_mismatch"}), qemu="clean"),
    Case("vmdk_grain_table_entry_moved.vmdk", "vmdk",
         "primary GT entry 1 points at grain 0's sectors; the redundant table keeps the "
         "right grain: guest 64 KiB silently reads guest 0's data",
         qemu_image("vmdk", "4M", VMDK_DATA),
         [Poke(lambda p: _vmdk_gt0(p) + 4, lambda p: struct.pack("<I", _u(p, _vmdk_gt0(p), "<I")),
               "GT[0][1] = GT[0][0]")],
         expected=frozenset({"redundant_grain_table_mismatch", "host_data_shared"}), qemu="clean"),
    Case("vmdk_grain_table_beyond_eof.vmdk", "vmdk",
         "grain directory entry 0 points at sector 2^20, past the end of the file: "
         "grains 0-511 read as unallocated (QEMU reads zeros there and says nothing)",
         qemu_image("vmdk", "4M", VMDK_DATA),
         [Poke(_vmdk_gd, struct.pack("<I", 1 << 20), "GD[0] = sector 0x100000")],
         expected=frozenset({"grain_table_beyond_eof"}), qemu="clean"),
    Case("vmdk_grain_beyond_eof.vmdk", "vmdk",
         "primary GT entry 1 points at sector 2^20, past the end of the file: qemu-img check "
         "stops there ('cluster offset for sector 128 points after EOF') and fails",
         qemu_image("vmdk", "4M", VMDK_DATA),
         [Poke(lambda p: _vmdk_gt0(p) + 4, struct.pack("<I", 1 << 20),
               "GT[0][1] = sector 0x100000")],
         expected=frozenset({"cluster_beyond_eof", "qemu_check_fails",
                             "redundant_grain_table_mismatch"}), qemu="incomplete"),
    Case("vmdk_unclean_shutdown.vmdk", "vmdk",
         "uncleanShutdown byte set: the disk was not closed cleanly (QEMU ignores it)",
         qemu_image("vmdk", "4M", VMDK_DATA),
         [Poke(0x48, b"\x01", "uncleanShutdown = 1")],
         expected=frozenset({"unclean_shutdown"}), qemu="clean"),
    Case("vdi_duplicate_block.vdi", "vdi",
         "block map entry 1 reuses data block 0: guest blocks 0 and 1 share their data, "
         "blocks_allocated still says 1",
         qemu_image("vdi", "2M", ["write -P 0x33 0 4k"]),
         [Poke(lambda p: _vdi_map(p) + 4, struct.pack("<I", 0), "block_map[1] = 0")],
         expected=frozenset({"block_duplicate", "allocated_count_mismatch", "host_data_shared"}),
         qemu="corruptions"),
    Case("vdi_allocated_counter.vdi", "vdi",
         "blocks_allocated raised from 1 to 2: the map has 1 allocated entry (a writer "
         "would place the next block past the end of the data, leaving a hole)",
         qemu_image("vdi", "2M", ["write -P 0x44 1M 4k"]),
         [Poke(0x184, struct.pack("<I", 2), "blocks_allocated = 2")],
         expected=frozenset({"allocated_count_mismatch", "file_truncated"}), qemu="corruptions"),
    Case("vhd_footer_checksum.vhd", "vpc",
         "checksum of the footer at the end of the file changed (QEMU refuses a footer with a "
         "bad checksum; the copy at offset 0 is intact)",
         qemu_image("vpc", "2M", ["write -P 0x55 0 4k"]),
         [Poke(lambda p: _size(p) - 512 + 64, lambda p: struct.pack(
             ">I", _u(p, _size(p) - 512 + 64, ">I") ^ 1), "footer checksum ^= 1")],
         expected=frozenset({"footer_checksum", "footer_mismatch"})),
    Case("vhd_bat_beyond_eof.vhd", "vpc",
         "BAT entry 0 points at sector 2^20, past the end of the file: block 0 (guest 0-2 MiB) "
         "is lost and its old storage is unreferenced",
         qemu_image("vpc", "2M", ["write -P 0x56 0 4k"]),
         [Poke(_vhd_bat, struct.pack(">I", 1 << 20), "BAT[0] = sector 0x100000")],
         expected=frozenset({"bat_entry_beyond_eof", "unreferenced_space"})),
    Case("vhdx_header1_checksum.vhdx", "vhdx",
         "a reserved byte of header 1 changed: its CRC-32C no longer matches, header 2 is "
         "used (recoverable: QEMU does the same)",
         qemu_image("vhdx", "2M", ["write -P 0x66 0 4k"], "-o", "block_size=1M,log_size=1M"),
         [Poke(HEADER_OFFSETS[0] + 1000, b"\x01", "header1 byte 1000 = 1")],
         expected=frozenset({"header_checksum", "header_copy_invalid"}), qemu="clean"),
    Case("vhdx_region_table1_checksum.vhdx", "vhdx",
         "a reserved byte of region table 1 changed: its CRC-32C no longer matches; QEMU reads "
         "only table 1 and refuses the file, imgscope reads table 2",
         qemu_image("vhdx", "2M", ["write -P 0x67 0 4k"], "-o", "block_size=1M,log_size=1M"),
         [Poke(REGION_TABLE1 + 1000, b"\x01", "region table 1 byte 1000 = 1")],
         expected=frozenset({"region_table_checksum", "region_table1_invalid", "qemu_check_fails"}),
         qemu="incomplete"),
    Case("vhdx_region_table2_checksum.vhdx", "vhdx",
         "a reserved byte of region table 2 changed: the spare copy is damaged (QEMU never "
         "reads it)",
         qemu_image("vhdx", "2M", ["write -P 0x68 0 4k"], "-o", "block_size=1M,log_size=1M"),
         [Poke(REGION_TABLE1 + 64 * KiB + 1000, b"\x01", "region table 2 byte 1000 = 1")],
         expected=frozenset({"region_table_checksum"}), qemu="clean"),
    Case("vhdx_pending_log.vhdx", "vhdx",
         "both headers name the GUID of the log entry qemu-io left behind: the log must be "
         "replayed before the file is read (qemu-img check: 'To replay the log, run: qemu-img "
         "check -r all'); the entry's data is already in place",
         qemu_image("vhdx", "2M", ["write -P 0x69 0 4k"], "-o", "block_size=1M,log_size=1M"),
         [Poke(HEADER_OFFSETS[0], lambda p: _vhdx_header_with_log_guid(p, 0),
               "header1: log_guid = the log entry's GUID, checksum recomputed"),
          Poke(HEADER_OFFSETS[1], lambda p: _vhdx_header_with_log_guid(p, 1),
               "header2: log_guid = the log entry's GUID, checksum recomputed")],
         expected=frozenset({"log_replay_needed", "qemu_check_fails"}), qemu="incomplete"),
    Case("vhdx_bat_beyond_eof.vhdx", "vhdx",
         "BAT entry 0 (FULLY_PRESENT) moved to 100 MiB, past the end of the file: payload "
         "block 0 is lost (QEMU: 'points after end of file')",
         qemu_image("vhdx", "2M", ["write -P 0x6a 0 4k"], "-o", "block_size=1M,log_size=1M"),
         [Poke(_vhdx_bat, struct.pack("<Q", (100 << 20) | 6), "BAT[0] = 100 MiB | FULLY_PRESENT")],
         expected=frozenset({"bat_entry_beyond_eof"}), qemu="corruptions"),
    Case("qcow_l2_entry_beyond_eof.qcow", "qcow",
         "L2 entry 1 points at 1 GiB, past the end of the file: guest 4-8 KiB is lost and "
         "its old data cluster is unreferenced",
         qemu_image("qcow", "4M", ["write -P 0x77 0 8k"]),
         [Poke(lambda p: _qcow_l2(p) + 8, struct.pack(">Q", 1 << 30), "L2[0][1] = 0x40000000")],
         expected=frozenset({"cluster_beyond_eof", "unreferenced_space"})),
    Case("cow_bitmap_short.cow", "cow",
         "the file ends half way through the allocation bitmap: sectors 2048 and up have no "
         "bit, the stored sectors' data is gone",
         _cow_plain, [],
         truncate=_cow_half_bitmap,
         expected=frozenset({"bitmap_truncated", "cluster_beyond_eof"})),
]
