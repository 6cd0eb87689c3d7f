"""Microsoft VHD (QEMU's ``vpc``): footer, dynamic disk header, parent locators, BAT.

* ``footer``: the 512-byte "conectix" record at the end of every VHD (and copied
  at offset 0 of dynamic and differencing disks).
* ``dynamic_header``: the 1024-byte "cxsparse" header at ``footer.dataOffset``.
* ``parent_locator``: one of the 8 24-byte entries inside the dynamic header.
* The BAT as a numpy table (u32 big endian sector numbers) and the helpers that
  drivers, checkers and writers share: checksum, CHS geometry, QEMU's size rule.

Field names are the VHD specification's (cookie, dataOffset, currentSize...).
All integers are big endian.
"""
from __future__ import annotations

import construct as cs
import numpy as np

from ._types import NumpyArray, enum, flags

SECTOR = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
BAT_UNUSED = 0xFFFFFFFF
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
VERSION_1_0 = 0x00010000
DEFAULT_BLOCK_SIZE = 0x200000

DISK_NONE, DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING = 0, 2, 3, 4
DISK_TYPES = {0: "none", 1: "reserved (deprecated)", DISK_FIXED: "fixed",
              DISK_DYNAMIC: "dynamic", DISK_DIFFERENCING: "differencing",
              5: "reserved (deprecated)", 6: "reserved (deprecated)"}
FEATURE_NAMES = {0: "temporary disk", 1: "reserved (must be set)"}

#: QEMU (block/vpc.c): the largest CHS geometry and the largest disk it accepts
VHD_MAX_GEOMETRY = 65535 * 16 * 255
VHD_MAX_SECTORS = 0xFF000000
#: creator applications whose images QEMU sizes by currentSize rather than by CHS
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")

PLATFORM_CODES = {0: "none", 0x57693272: "Wi2r (relative path, ANSI, deprecated)",
                  0x5769326B: "Wi2k (absolute path, ANSI, deprecated)",
                  0x57327275: "W2ru (relative path, UTF-16LE)",
                  0x57326B75: "W2ku (absolute path, UTF-16LE)",
                  0x4D616320: "Mac (Mac OS alias blob)", 0x4D616358: "MacX (file URL, UTF-8)"}
PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_WI2R, PLATFORM_WI2K = 0x57327275, 0x57326B75, 0x57693272, 0x5769326B
PLATFORM_MAC, PLATFORM_MACX = 0x4D616320, 0x4D616358

footer = cs.Struct(
    "cookie" / cs.Bytes(8) * "footer signature 'conectix'",
    "features" / flags(cs.Int32ub, FEATURE_NAMES) * "bit 0 temporary disk, bit 1 reserved and must be set (QEMU writes 0x2)",
    "fileFormatVersion" / cs.Int32ub * "format version, major<<16 | minor: 0x00010000",
    "dataOffset" / cs.Int64ub * "absolute byte offset of the dynamic disk header; 0xFFFFFFFFFFFFFFFF for fixed disks (QEMU dynamic: 512)",
    "timeStamp" / cs.Int32ub * "creation time, seconds since 2000-01-01 00:00:00 UTC",
    "creatorApplication" / cs.Bytes(4) * "application that created the image: 'vpc ', 'vs  ', 'win ', 'qemu' (QEMU, CHS sized), 'qem2' (QEMU force_size), 'd2v ', 'tap\\0', 'CTXS'",
    "creatorVersion" / cs.Int32ub * "version of the creator application, major<<16 | minor (QEMU: 0x00050003)",
    "creatorHostOS" / cs.Bytes(4) * "host OS of the creator: 'Wi2k' (Windows) or 'Mac '",
    "originalSize" / cs.Int64ub * "virtual disk size in bytes when the image was created",
    "currentSize" / cs.Int64ub * "current virtual disk size in bytes (QEMU uses it instead of CHS for some creators)",
    "cylinders" / cs.Int16ub * "disk geometry: cylinders",
    "heads" / cs.Int8ub * "disk geometry: heads",
    "sectorsPerTrack" / cs.Int8ub * "disk geometry: sectors per track; C*H*S*512 is the size Virtual PC and QEMU ('vpc ', 'qemu') use",
    "diskType" / enum(cs.Int32ub, DISK_TYPES) * "2 fixed, 3 dynamic, 4 differencing (0 none, 1/5/6 reserved)",
    "checksum" / cs.Int32ub * "one's complement of the byte sum of the footer with this field taken as 0",
    "uniqueId" / cs.Bytes(16) * "UUID of this disk; differencing children record it as parentUniqueId",
    "savedState" / cs.Int8ub * "1 = the disk belongs to a saved (hibernated) virtual machine",
    "reserved" / cs.Bytes(427) * "zero padding to 512 bytes",
)

parent_locator = cs.Struct(
    "platformCode" / enum(cs.Int32ub, PLATFORM_CODES) * "kind of locator data: 0 none, 'W2ru'/'W2ku' UTF-16LE relative/absolute path, 'Wi2r'/'Wi2k' ANSI (deprecated), 'Mac ', 'MacX' file URL",
    "platformDataSpace" / cs.Int32ub * "space reserved for the locator data (512-byte sectors by the spec; some writers store bytes)",
    "platformDataLength" / cs.Int32ub * "length of the locator data in bytes",
    "reserved" / cs.Int32ub * "zero",
    "platformDataOffset" / cs.Int64ub * "absolute byte offset of the locator data",
)
PARENT_LOCATOR_SIZE = 24
N_PARENT_LOCATORS = 8
PARENT_LOCATORS_OFFSET = 576   # inside the dynamic header

dynamic_header = cs.Struct(
    "cookie" / cs.Bytes(8) * "dynamic disk header signature 'cxsparse'",
    "dataOffset" / cs.Int64ub * "unused; 0xFFFFFFFFFFFFFFFF (all 64 bits, whatever the spec text says)",
    "tableOffset" / cs.Int64ub * "absolute byte offset of the Block Allocation Table (QEMU: 1536)",
    "headerVersion" / cs.Int32ub * "header version 0x00010000",
    "maxTableEntries" / cs.Int32ub * "number of BAT entries; must cover the disk (QEMU: 'page table too small')",
    "blockSize" / cs.Int32ub * "data bytes per block, a power of two >= 512 (default 2 MiB); the sector bitmap comes on top",
    "checksum" / cs.Int32ub * "one's complement of the byte sum of the 1024-byte header with this field taken as 0",
    "parentUniqueId" / cs.Bytes(16) * "differencing: uniqueId of the parent's footer",
    "parentTimeStamp" / cs.Int32ub * "differencing: parent's time stamp (seconds since 2000-01-01 UTC)",
    "reserved1" / cs.Int32ub * "zero",
    "parentUnicodeName" / cs.Bytes(512) * "differencing: parent file name, UTF-16 big endian, zero padded",
    "parentLocators" / cs.Bytes(N_PARENT_LOCATORS * PARENT_LOCATOR_SIZE) * "8 parent locator entries of 24 bytes (see parent_locator)",
    "reserved2" / cs.Bytes(256) * "zero padding to 1024 bytes",
)

BAT_DTYPE = np.dtype(">u4")


def bat_table(count) -> cs.Construct:
    """Block Allocation Table: `count` u32 BE sector numbers of block bitmaps (0xFFFFFFFF: none)."""
    return NumpyArray(count, BAT_DTYPE)


def bitmap_table(count) -> cs.Construct:
    """Sector bitmaps: bytes, one bit per 512-byte sector, most significant bit first."""
    return NumpyArray(count, np.uint8)


def checksum(data: bytes, field_offset: int) -> int:
    """VHD checksum: ~(byte sum with the 4 checksum bytes at field_offset taken as 0)."""
    arr = np.frombuffer(data, np.uint8)
    total = int(arr.sum(dtype=np.uint64)) - int(arr[field_offset:field_offset + 4].sum(dtype=np.uint64))
    return ~total & 0xFFFFFFFF


def bitmap_bytes(block_size: int) -> int:
    """Bytes of the sector bitmap in front of each block, rounded up to a sector (QEMU)."""
    return (block_size // (8 * SECTOR) + 511) & ~511


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectorsPerTrack) for a sector count, VHD spec appendix (C*H*S <= n)."""
    ts = min(int(total_sectors), 65535 * 16 * 255)
    if ts >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = ts // spt
    else:
        spt = 17
        cth = ts // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = ts // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = ts // spt
    return cth // heads, heads, spt


def qemu_create_sectors(size: int) -> int:
    """Sectors qemu-img create / convert gives a vpc image of `size` bytes (no force_size):
    the request is increased until C*H*S covers it."""
    want = -(-int(size) // SECTOR)
    for n in range(want, want + 65536):
        c, h, s = chs_geometry(n)
        if c * h * s >= want:
            return c * h * s
    c, h, s = chs_geometry(want)
    return c * h * s


#: VHD time stamps count seconds from 2000-01-01 00:00:00 UTC
TIMESTAMP_EPOCH = 946684800
#: footer values QEMU's create writes (Virtual PC 2007 on Windows)
QEMU_CREATOR = b"qemu"
QEMU_FORCE_SIZE_CREATOR = b"qem2"
QEMU_CREATOR_VERSION = 0x00050003
QEMU_CREATOR_OS = b"Wi2k"
FEATURES_RESERVED = 0x2


def qemu_create_geometry(size: int, force_size: bool) -> tuple[int, tuple[int, int, int]]:
    """(sectors, (cylinders, heads, sectorsPerTrack)) qemu-img create/convert gives a vpc
    image asked to be `size` bytes: the size is rounded up to a sector; without
    force_size the sector count grows until C*H*S covers it and C*H*S is the size;
    with force_size (or when the geometry reaches the maximum) the geometry is
    65535/16/255 and the sector count is the size itself."""
    want = -(-int(size) // SECTOR)
    if force_size:
        chs = (65535, 16, 255)
    else:
        start = min(VHD_MAX_GEOMETRY, want)
        chs = chs_geometry(start)
        n = start
        while chs[0] * chs[1] * chs[2] < start:
            n += 1
            chs = chs_geometry(n)
    total = chs[0] * chs[1] * chs[2]
    return (want if total == VHD_MAX_GEOMETRY else total), chs


def uses_current_size(creator: bytes, chs_sectors: int) -> bool:
    """QEMU 7.2's rule: currentSize for Hyper-V, QEMU force_size, disk2vhd, XenServer,
    XenConverter, or when the geometry is the maximum one; else C*H*S."""
    return bytes(creator) in CURRENT_SIZE_CREATORS or chs_sectors == VHD_MAX_GEOMETRY
