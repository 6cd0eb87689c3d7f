"""VirtualBox Disk Image (VDI) structures: pre-header, headers v0 / v1.1 / v1.1+, block map.

Field names are QEMU's (block/vdi.c ``VdiHeader``); each doc string names the
VirtualBox field (VDICore.h) it corresponds to.  All integers are little endian.
UUIDs are stored in Microsoft GUID byte order (first u32 and two u16 little
endian) and parse to their canonical text form.

File layout: pre-header (72 bytes) and header at 0, the block map (one u32 per
block) at ``offset_bmap``, block ``k`` of the data area at
``offset_data + k * (block_extra + block_size)`` (its data after ``block_extra``
prefix bytes).
"""
from __future__ import annotations

import uuid

import construct as cs
import numpy as np

from ._types import NumpyArray, flags, enum

SECTOR = 512
SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
VERSION_0 = 0x00000002            # the only major-0 version VirtualBox accepts
PRE_HEADER_SIZE = 72
HEADER_V1_SIZE = 384              # v1.1 without LCHS geometry (what QEMU writes)
HEADER_V1_PLUS_SIZE = 400         # v1.1+ with LCHS geometry (what VirtualBox writes)
HEADER_V0_SIZE = 348
DEFAULT_BLOCK_SIZE = 1 << 20      # the only block size QEMU opens
QEMU_BLOCKS_MAX = 0x3FFFFFFF      # QEMU's VDI_BLOCKS_IN_IMAGE_MAX

#: block map values: below these an entry is the index of a block in the data area
BLOCK_FREE = 0xFFFFFFFF           # no storage: zeros in a base image, the parent's data in a diff
BLOCK_ZERO = 0xFFFFFFFE           # no storage, reads as zeros even in a diff (QEMU: "discarded")
MAP_DTYPE = np.dtype("<u4")

TYPE_NORMAL, TYPE_FIXED, TYPE_UNDO, TYPE_DIFF = 1, 2, 3, 4
IMAGE_TYPES = {TYPE_NORMAL: "normal (dynamic)", TYPE_FIXED: "fixed (static)",
               TYPE_UNDO: "undo", TYPE_DIFF: "diff (differencing)"}
VARIANTS = {TYPE_NORMAL: "dynamic", TYPE_FIXED: "static", TYPE_UNDO: "undo", TYPE_DIFF: "diff"}
IMAGE_FLAG_NAMES = {0: "zero expand", 8: "reserved (fixed)", 9: "reserved (diff)"}
FLAGS_KNOWN = 0x301               # bits VirtualBox tolerates on disk

BANNERS = (b"<<< Oracle VirtualBox Disk Image >>>\n", b"<<< Oracle VM VirtualBox Disk Image >>>\n",
           b"<<< Sun VirtualBox Disk Image >>>\n", b"<<< Sun xVM VirtualBox Disk Image >>>\n",
           b"<<< innotek VirtualBox Disk Image >>>\n", b"<<< QEMU VM Virtual Disk Image >>>\n")

NULL_UUID = "00000000-0000-0000-0000-000000000000"


class UuidAdapter(cs.Adapter):
    """16 bytes in Microsoft GUID order <-> canonical UUID text."""

    def _decode(self, obj, context, path):
        return str(uuid.UUID(bytes_le=bytes(obj)))

    def _encode(self, obj, context, path):
        return uuid.UUID(str(obj)).bytes_le


class TextAdapter(cs.Adapter):
    """NUL-padded UTF-8 text of a fixed size (undecodable bytes replaced)."""

    def _decode(self, obj, context, path):
        return bytes(obj).split(b"\0", 1)[0].decode("utf-8", "replace")

    def _encode(self, obj, context, path):
        data = obj.encode("utf-8") if isinstance(obj, str) else bytes(obj)
        size = self.subcon.sizeof()
        if len(data) > size:
            raise cs.ConstructError(f"text of {len(data)} bytes does not fit {size}")
        return data.ljust(size, b"\0")


def Uuid() -> cs.Construct:
    return UuidAdapter(cs.Bytes(16))


def Text(size: int) -> cs.Construct:
    return TextAdapter(cs.Bytes(size))


pre_header = cs.Struct(
    "text" / Text(64) * "szFileInfo: NUL-padded banner, informational only (QEMU writes '<<< QEMU VM Virtual Disk Image >>>\\n', VirtualBox '<<< Oracle VirtualBox Disk Image >>>\\n')",
    "signature" / cs.Int32ul * "u32Signature: 0xBEDA107F (bytes 7F 10 DA BE); detects VDI, not the banner",
    "version" / cs.Int32ul * "u32Version: major << 16 | minor; 0x00010001 = 1.1 (current, the only one QEMU opens); 0x00000002 = old header version 0",
)

header_v1 = cs.Struct(
    "header_size" / cs.Int32ul * "cbHeader: size of this header in bytes; 384 = v1.1 (QEMU), 400 = v1.1+ with LCHS geometry (VirtualBox)",
    "image_type" / enum(cs.Int32ul, IMAGE_TYPES) * "u32Type: 1 normal (dynamic), 2 fixed (static, preallocated), 3 undo, 4 diff (differencing)",
    "image_flags" / flags(cs.Int32ul, IMAGE_FLAG_NAMES) * "fFlags: bit 0 zero-expand (fill new blocks with zeros; a creation hint); bits 8 and 9 tolerated, never written",
    "description" / Text(256) * "szComment: UTF-8 comment, NUL terminated",
    "offset_bmap" / cs.Int32ul * "offBlocks: byte offset of the block map (QEMU 0x200, VirtualBox aligned to 1 MiB)",
    "offset_data" / cs.Int32ul * "offData: byte offset of block 0 of the data area",
    "cylinders" / cs.Int32ul * "LegacyGeometry.cCylinders: legacy (old PCHS) geometry, 0 = not set",
    "heads" / cs.Int32ul * "LegacyGeometry.cHeads: legacy geometry heads, 0 = not set",
    "sectors" / cs.Int32ul * "LegacyGeometry.cSectors: legacy geometry sectors per track, 0 = not set",
    "sector_size" / cs.Int32ul * "LegacyGeometry.cbSector: sector size, 512",
    "unused1" / cs.Int32ul * "u32Dummy: formerly the BIOS translation mode, 0",
    "disk_size" / cs.Int64ul * "cbDisk: virtual disk size in bytes (QEMU rounds a size that is no multiple of 512 up, VirtualBox down)",
    "block_size" / cs.Int32ul * "cbBlock: block (allocation unit) size in bytes, a power of two; 1 MiB default and the only size QEMU opens",
    "block_extra" / cs.Int32ul * "cbBlockExtra: bytes stored before each block's data in the data area; 0 or a power of two",
    "blocks_in_image" / cs.Int32ul * "cBlocks: number of blocks = block map entries = ceil(disk_size / block_size)",
    "blocks_allocated" / cs.Int32ul * "cBlocksAllocated: number of blocks stored in the data area",
    "uuid_image" / Uuid() * "uuidCreate: identity of this image (a diff child names it in uuid_link)",
    "uuid_last_snap" / Uuid() * "uuidModify: changes whenever the image content changes",
    "uuid_link" / Uuid() * "uuidLinkage: diff images: uuid_image of the parent; otherwise null",
    "uuid_parent" / Uuid() * "uuidParentModify: diff images: the parent's uuid_last_snap when the child was made; otherwise null",
)

#: the LCHS geometry that follows header_v1 when header_size >= 400 (v1.1+)
header_v1_lchs = cs.Struct(
    "lchs_cylinders" / cs.Int32ul * "LCHSGeometry.cCylinders: logical geometry cylinders, 0 = not calculated",
    "lchs_heads" / cs.Int32ul * "LCHSGeometry.cHeads: logical geometry heads, 0 = not calculated",
    "lchs_sectors" / cs.Int32ul * "LCHSGeometry.cSectors: logical geometry sectors per track, 0 = not calculated",
    "lchs_sector_size" / cs.Int32ul * "LCHSGeometry.cbSector: must be 512",
)

header_v0 = cs.Struct(
    "image_type" / enum(cs.Int32ul, IMAGE_TYPES) * "u32Type: 1 normal (dynamic), 2 fixed (static), 3 undo, 4 diff",
    "image_flags" / flags(cs.Int32ul, IMAGE_FLAG_NAMES) * "fFlags: bit 0 zero-expand",
    "description" / Text(256) * "szComment: UTF-8 comment, NUL terminated",
    "cylinders" / cs.Int32ul * "LegacyGeometry.cCylinders, 0 = not set",
    "heads" / cs.Int32ul * "LegacyGeometry.cHeads, 0 = not set",
    "sectors" / cs.Int32ul * "LegacyGeometry.cSectors, 0 = not set",
    "sector_size" / cs.Int32ul * "LegacyGeometry.cbSector: sector size, 512",
    "disk_size" / cs.Int64ul * "cbDisk: virtual disk size in bytes",
    "block_size" / cs.Int32ul * "cbBlock: block size in bytes, a power of two",
    "blocks_in_image" / cs.Int32ul * "cBlocks: number of blocks = block map entries",
    "blocks_allocated" / cs.Int32ul * "cBlocksAllocated: number of blocks stored in the data area",
    "uuid_image" / Uuid() * "uuidCreate: identity of this image",
    "uuid_last_snap" / Uuid() * "uuidModify: changes whenever the image content changes",
    "uuid_link" / Uuid() * "uuidLinkage: diff images: uuid_image of the parent; otherwise null",
)


def block_map(count) -> cs.Construct:
    """The block map: `count` u32 LE entries; < 0xFFFFFFFE = index of the block in the data
    area, 0xFFFFFFFF = free (parent / zeros), 0xFFFFFFFE = zero block."""
    return NumpyArray(count, MAP_DTYPE)


def v0_offsets(blocks_in_image: int) -> tuple[int, int]:
    """(offset_bmap, offset_data) implied by a version 0 header."""
    bmap = PRE_HEADER_SIZE + HEADER_V0_SIZE
    return bmap, bmap + 4 * int(blocks_in_image)


def block_host_offset(offset_data: int, index, block_size: int, block_extra: int = 0):
    """Host offset of the data of data-area block `index` (scalar or numpy array)."""
    if isinstance(index, np.ndarray):
        return (np.uint64(offset_data) + index.astype(np.uint64) * np.uint64(block_extra + block_size)
                + np.uint64(block_extra))
    return offset_data + int(index) * (block_extra + block_size) + block_extra


def qemu_layout(disk_size: int) -> dict[str, int]:
    """Header values qemu-img 7.2 writes for a new image of `disk_size` bytes."""
    size = -(-int(disk_size) // SECTOR) * SECTOR
    blocks = -(-size // DEFAULT_BLOCK_SIZE)
    bmap = SECTOR
    data = bmap + -(-blocks * 4 // SECTOR) * SECTOR
    return {"disk_size": size, "blocks_in_image": blocks, "offset_bmap": bmap, "offset_data": data}


# ---- build helpers (writers) ------------------------------------------------------------------------
QEMU_BANNER = BANNERS[-1]
#: qemu writes the pre-header and header into one 512-byte sector (the rest zero)
HEADER_AREA = 512


def header_v1_values(disk_size: int, blocks_in_image: int, blocks_allocated: int, *,
                     image_type: int, offset_bmap: int, offset_data: int, uuid_image: str,
                     uuid_last_snap: str, block_size: int = DEFAULT_BLOCK_SIZE,
                     description: str = "") -> dict:
    """Every field of ``header_v1`` as qemu-img writes it (no legacy geometry, no parent)."""
    return {"header_size": HEADER_V1_SIZE, "image_type": image_type, "image_flags": 0,
            "description": description, "offset_bmap": offset_bmap, "offset_data": offset_data,
            "cylinders": 0, "heads": 0, "sectors": 0, "sector_size": SECTOR, "unused1": 0,
            "disk_size": disk_size, "block_size": block_size, "block_extra": 0,
            "blocks_in_image": blocks_in_image, "blocks_allocated": blocks_allocated,
            "uuid_image": uuid_image, "uuid_last_snap": uuid_last_snap,
            "uuid_link": NULL_UUID, "uuid_parent": NULL_UUID}
