"""QEMU ``cow`` and User-Mode-Linux COW files (magic ``OOOM``): headers and bitmap.

A header naming the backing file, a one-bit-per-sector allocation bitmap (bit
``n % 8`` of byte ``n // 8``, least significant bit first: set = the sector is
in this file, clear = read the backing file or zeros), then the data area where
guest sector ``n`` lives at ``data_offset + n * 512``.

Header layouts (all integers big endian):

* ``qemu``: QEMU's ``struct cow_header_v2`` (version 2) as a 64-bit build lays it
  out: not packed, 4 padding bytes before ``size`` and after ``sectorsize`` (1056 bytes);
* ``qemu-i386``: the same struct from a 32-bit build, no padding (1048 bytes);
* ``uml-v2``: User-Mode-Linux version 2, a 4096-byte name, packed (4120 bytes);
* ``uml-v3``: User-Mode-Linux version 3, packed, name last (4128 bytes), with
  ``alignment`` for bitmap and data;
* ``uml-v3-64bit``: the unpacked version 3 some 64-bit UML builds wrote until
  2005 (64-bit ``mtime``; 4136 bytes).

``geometry()`` gives where bitmap and data start for each layout, exactly as the
writer computed them; the fixtures and any writer build files with these structs.
"""
from __future__ import annotations

from dataclasses import dataclass

import construct as cs
import numpy as np

from ._types import NumpyArray

MAGIC = b"OOOM"                  # 0x4F4F4F4D
SECTOR = 512
COW_BITMAP = 0                   # UML v3 cow_format: the allocation bitmap (the only one)

preamble = cs.Struct(
    "magic" / cs.Const(MAGIC) * "magic 0x4F4F4F4D ('OOOM')",
    "version" / cs.Int32ub * "header version: 2 (QEMU, UML v2) or 3 (UML v3); 1 is UML's host-endian v1",
)

header_qemu = cs.Struct(
    "magic" / cs.Const(MAGIC) * "magic 0x4F4F4F4D ('OOOM'; QEMU's source calls it MOOO)",
    "version" / cs.Int32ub * "header version: 2 (QEMU's only version)",
    "backing_file" / cs.Bytes(1024) * "backing file path, NUL terminated (empty = no backing file); QEMU copies at most 1023 bytes",
    "mtime" / cs.Int32sb * "backing file's st_mtime when the image was made (0 if unknown); never checked on open",
    cs.Padding(4) * "alignment padding before the u64 size (64-bit ABI, struct not packed)",
    "size" / cs.Int64ub * "virtual disk size in bytes; QEMU uses size // 512 whole sectors",
    "sectorsize" / cs.Int32ub * "sector size, written as 512 and not checked by QEMU",
    cs.Padding(4) * "tail padding of the struct to a multiple of 8 bytes (64-bit ABI)",
)

header_qemu_i386 = cs.Struct(
    "magic" / cs.Const(MAGIC) * "magic 0x4F4F4F4D ('OOOM')",
    "version" / cs.Int32ub * "header version: 2",
    "backing_file" / cs.Bytes(1024) * "backing file path, NUL terminated (empty = no backing file)",
    "mtime" / cs.Int32sb * "backing file's st_mtime when the image was made (0 if unknown); never checked on open",
    "size" / cs.Int64ub * "virtual disk size in bytes (i386 ABI: no padding before it)",
    "sectorsize" / cs.Int32ub * "sector size, written as 512 and not checked by QEMU",
)

header_uml_v2 = cs.Struct(
    "magic" / cs.Const(MAGIC) * "magic 0x4F4F4F4D ('OOOM')",
    "version" / cs.Int32ub * "header version: 2",
    "backing_file" / cs.Bytes(4096) * "backing file path (MAXPATHLEN), NUL terminated",
    "mtime" / cs.Int32ub * "backing file's modification time (32-bit), checked by UML on open",
    "size" / cs.Int64ub * "size of the backing file (the disk) in bytes",
    "sectorsize" / cs.Int32sb * "sector size (512); the bitmap has (size + sectorsize - 1) // (8 * sectorsize) bytes",
)

header_uml_v3 = cs.Struct(
    "magic" / cs.Const(MAGIC) * "magic 0x4F4F4F4D ('OOOM')",
    "version" / cs.Int32ub * "header version: 3",
    "mtime" / cs.Int32ub * "backing file's modification time (32-bit), checked by UML on open",
    "size" / cs.Int64ub * "size of the backing file (the disk) in bytes",
    "sectorsize" / cs.Int32ub * "sector size (512): one bitmap bit per sector",
    "alignment" / cs.Int32ub * "bitmap and data area start on multiples of this (UML: the page size)",
    "cow_format" / cs.Int32ub * "0 = the allocation bitmap (the only format defined)",
    "backing_file" / cs.Bytes(4096) * "absolute backing file path, NUL terminated (last, so it may grow into the alignment padding)",
)

header_uml_v3_64bit = cs.Struct(
    "magic" / cs.Const(MAGIC) * "magic 0x4F4F4F4D ('OOOM')",
    "version" / cs.Int32ub * "header version: 3",
    "mtime" / cs.Int64sb * "backing file's modification time; 64-bit in this unpacked layout (UML reads its low 32 bits)",
    "size" / cs.Int64ub * "size of the backing file (the disk) in bytes",
    "sectorsize" / cs.Int32ub * "sector size (512): one bitmap bit per sector",
    "alignment" / cs.Int32ub * "bitmap and data area start on multiples of this",
    "cow_format" / cs.Int32ub * "0 = the allocation bitmap (its place holds 0, which tells this layout apart)",
    "backing_file" / cs.Bytes(4096) * "absolute backing file path, NUL terminated",
    cs.Padding(4) * "tail padding of the struct to a multiple of 8 bytes",
)


@dataclass(frozen=True)
class Layout:
    name: str
    version: int
    struct: cs.Struct
    header_size: int
    description: str


LAYOUTS = {
    "qemu": Layout("qemu", 2, header_qemu, 1056, "QEMU cow (64-bit build)"),
    "qemu-i386": Layout("qemu-i386", 2, header_qemu_i386, 1048, "QEMU cow (32-bit build)"),
    "uml-v2": Layout("uml-v2", 2, header_uml_v2, 4120, "User-Mode-Linux COW v2"),
    "uml-v3": Layout("uml-v3", 3, header_uml_v3, 4128, "User-Mode-Linux COW v3"),
    "uml-v3-64bit": Layout("uml-v3-64bit", 3, header_uml_v3_64bit, 4136,
                           "User-Mode-Linux COW v3, unpacked 64-bit layout"),
}
for _l in LAYOUTS.values():
    assert _l.struct.sizeof() == _l.header_size, _l.name
#: where each layout keeps sectorsize (the value 512 tells version-2 layouts apart)
SECTORSIZE_AT = {"qemu": 1048, "qemu-i386": 1044, "uml-v2": 4116}
#: where the packed UML v3 name starts: 4 zero bytes there mean the unpacked 64-bit layout
#: (its cow_format, always 0, sits there), as UML itself decides
UML_V3_NAME_AT = 32
u32 = cs.Int32ub


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def geometry(layout: str, size: int, sectorsize: int = SECTOR,
             alignment: int = SECTOR) -> tuple[int, int, int]:
    """(bitmap_offset, bitmap_bytes, data_offset) the writer of `layout` used.

    `sectorsize` and `alignment` must be positive (callers replace invalid ones).
    QEMU: bitmap right after the header, one bit per whole 512-byte sector,
    data at the next 512-byte boundary.  UML v2: the bitmap length rounds the
    wrong way ((size + ss - 1) // (8 * ss)).  UML v3: bitmap and data aligned.
    """
    hsize = LAYOUTS[layout].header_size
    if layout.startswith("qemu"):
        nbytes = (size // SECTOR + 7) // 8
        return hsize, nbytes, round_up(hsize + nbytes, SECTOR)
    if layout == "uml-v2":
        nbytes = (size + sectorsize - 1) // (8 * sectorsize)
        return hsize, nbytes, round_up(hsize + nbytes, sectorsize)
    start = round_up(hsize, alignment)
    nbytes = -(-(-(-size // sectorsize)) // 8)
    return start, nbytes, round_up(start + nbytes, alignment)


def bitmap_table(count) -> cs.Construct:
    """The allocation bitmap: `count` bytes, bit n % 8 (LSB first) of byte n // 8 is sector n."""
    return NumpyArray(count, np.uint8)


def pack_bitmap(present: np.ndarray) -> np.ndarray:
    """Bitmap bytes for a bool per sector (the inverse of unpack_bitmap)."""
    return np.packbits(np.asarray(present, bool), bitorder="little")


def unpack_bitmap(data: np.ndarray, sectors: int) -> np.ndarray:
    """Bool per sector from bitmap bytes (least significant bit first)."""
    return np.unpackbits(np.asarray(data, np.uint8), count=sectors, bitorder="little").astype(bool)
