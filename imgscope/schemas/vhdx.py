"""Microsoft VHDX: file identifier, headers, region tables, log, metadata, BAT.

* ``file_identifier``: 'vhdxfile' + creator string at offset 0.
* ``header``: the two 4 KiB headers at 64 KiB and 128 KiB (CRC-32C over 4 KiB).
* ``region_table_header`` + ``REGION_ENTRY_DTYPE``: the two 64 KiB region tables
  at 192 KiB and 256 KiB that place the BAT and the metadata region.
* ``metadata_table_header`` + ``METADATA_ENTRY_DTYPE`` and the metadata items
  (file parameters, virtual disk size, page 83 data, sector sizes, parent locator).
* ``log_entry_header``, ``LOG_DESCRIPTOR_DTYPE``, ``LOG_DATA_SECTOR_DTYPE``: the
  metadata log (a circular buffer of 4 KiB sectors).
* The BAT as a numpy table of u64 entries (state in bits 0-2, offset in MiB in
  bits 20-63) and the geometry helpers drivers and writers share: chunk ratio,
  BAT entry counts, CRC-32C.

Field names are QEMU's (block/vhdx.h).  All integers are little endian; GUIDs are
in Microsoft byte order (first three fields little endian) and parse to the
canonical text form.
"""
from __future__ import annotations

import uuid
from functools import lru_cache

import construct as cs
import numpy as np

from ._types import NumpyArray, flags

KiB, MiB = 1024, 1024 * 1024

FILE_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
LOG_SIGNATURE = b"loge"
LOG_DESC_SIGNATURE = b"desc"
LOG_ZERO_SIGNATURE = b"zero"
LOG_DATA_SIGNATURE = b"data"

FILE_ID_OFFSET = 0
HEADER1_OFFSET = 64 * KiB
HEADER2_OFFSET = 128 * KiB
REGION_TABLE1_OFFSET = 192 * KiB
REGION_TABLE2_OFFSET = 256 * KiB
HEADER_SECTION_END = 1 * MiB
SLOT_SIZE = 64 * KiB                 # each header-section object owns a 64 KiB slot
HEADER_SIZE = 4 * KiB                # the part of a header slot the checksum covers
REGION_TABLE_SIZE = 64 * KiB
REGION_TABLE_MAX_ENTRIES = 2047
METADATA_TABLE_SIZE = 64 * KiB
METADATA_TABLE_MAX_ENTRIES = 2047
METADATA_ITEM_MAX_LENGTH = 1 * MiB
LOG_SECTOR_SIZE = 4 * KiB
LOG_ENTRY_HEADER_SIZE = 64
LOG_DESCRIPTOR_SIZE = 32
LOG_DATA_BYTES = 4084
CREATOR_SIZE = 512

BLOCK_SIZE_MIN = 1 * MiB
BLOCK_SIZE_MAX = 256 * MiB
SECTOR_SIZES = (512, 4096)
#: sectors described by one sector-bitmap block (1 MiB of bits)
SECTORS_PER_BITMAP_BLOCK = 1 << 23
SECTOR_BITMAP_BLOCK_SIZE = 1 * MiB
#: QEMU's largest image (qemu-img create refuses more)
MAX_IMAGE_SIZE = 64 * 1024 ** 4

NULL_GUID = "00000000-0000-0000-0000-000000000000"

# region table entries
BAT_GUID = "2dc27766-f623-4200-9d64-115e9bfd4a08"
METADATA_GUID = "8b7ca206-4790-4b9a-b8fe-575f050f886e"
REGION_NAMES = {BAT_GUID: "BAT", METADATA_GUID: "metadata"}

# metadata items
FILE_PARAMETERS_GUID = "caa16737-fa36-4d43-b3b6-33f0aa44e76b"
VIRTUAL_DISK_SIZE_GUID = "2fa54224-cd1b-4876-b211-5dbed83bf4b8"
PAGE83_GUID = "beca12ab-b2e6-4523-93ef-c309e000c746"
LOGICAL_SECTOR_SIZE_GUID = "8141bf1d-a96f-4709-ba47-f233a8faab5f"
PHYSICAL_SECTOR_SIZE_GUID = "cda348c7-445d-4471-9cc9-e9885251c556"
PARENT_LOCATOR_GUID = "a8d35f2d-b30b-454d-abf7-d3d84834ab0c"
METADATA_ITEM_NAMES = {FILE_PARAMETERS_GUID: "file_parameters",
                       VIRTUAL_DISK_SIZE_GUID: "virtual_disk_size",
                       PAGE83_GUID: "page83_data",
                       LOGICAL_SECTOR_SIZE_GUID: "logical_sector_size",
                       PHYSICAL_SECTOR_SIZE_GUID: "physical_sector_size",
                       PARENT_LOCATOR_GUID: "parent_locator"}
#: items every VHDX must have (the parent locator only when has_parent is set)
REQUIRED_ITEMS = (FILE_PARAMETERS_GUID, VIRTUAL_DISK_SIZE_GUID, PAGE83_GUID,
                  LOGICAL_SECTOR_SIZE_GUID, PHYSICAL_SECTOR_SIZE_GUID)
#: parent locator type of a VHDX parent
PARENT_TYPE_VHDX_GUID = "b04aefb7-d19e-4a81-b789-25b8e9445913"
PARENT_KEYS = ("parent_linkage", "parent_linkage2", "relative_path", "volume_path",
               "absolute_win32_path")

REGION_FLAG_NAMES = {0: "required"}
REGION_REQUIRED = 1
METADATA_FLAG_NAMES = {0: "is_user", 1: "is_virtual_disk", 2: "is_required"}
METADATA_IS_REQUIRED = 4
PARAMS_FLAG_NAMES = {0: "leave_blocks_allocated", 1: "has_parent"}
PARAMS_LEAVE_BLOCKS_ALLOCATED = 1
PARAMS_HAS_PARENT = 2

# BAT entry states (bits 0-2)
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_UNMAPPED_V095 = 5      # value of UNMAPPED in draft 0.95; QEMU still accepts it
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6
PAYLOAD_STATES = {0: "NOT_PRESENT", 1: "UNDEFINED", 2: "ZERO", 3: "UNMAPPED",
                  5: "UNMAPPED_v095", 6: "FULLY_PRESENT", 7: "PARTIALLY_PRESENT"}
BITMAP_STATES = {0: "SB_NOT_PRESENT", 6: "SB_PRESENT"}
#: every name a BAT row can carry, in a fixed order (a categorical's categories)
STATE_NAMES = ("NOT_PRESENT", "UNDEFINED", "ZERO", "UNMAPPED", "UNMAPPED_v095",
               "FULLY_PRESENT", "PARTIALLY_PRESENT", "SB_NOT_PRESENT", "SB_PRESENT", "INVALID")
BAT_STATE_MASK = 0x7
BAT_RESERVED_MASK = 0xFFFF8               # bits 3-19
BAT_FILE_OFFSET_MASK = 0xFFFFFFFFFFF00000  # bits 20-63: offset in MiB

BAT_DTYPE = np.dtype("<u8")


class GuidAdapter(cs.Adapter):
    """16 bytes in Microsoft GUID order <-> canonical lower-case GUID text."""

    def _decode(self, obj, context, path):
        return str(uuid.UUID(bytes_le=bytes(obj)))

    def _encode(self, obj, context, path):
        return uuid.UUID(str(obj).strip("{}")).bytes_le


class Utf16Adapter(cs.Adapter):
    """Fixed-size NUL-padded UTF-16LE text (undecodable units replaced)."""

    def _decode(self, obj, context, path):
        text = bytes(obj).decode("utf-16-le", "replace")
        return text.split("\0", 1)[0]

    def _encode(self, obj, context, path):
        data = obj.encode("utf-16-le") if isinstance(obj, str) else bytes(obj)
        size = self.subcon.sizeof()
        if len(data) > size:
            raise cs.ConstructError(f"text of {len(data)} bytes does not fit {size}")
        return data.ljust(size, b"\0")


def Guid() -> cs.Construct:
    return GuidAdapter(cs.Bytes(16))


def guid_bytes(text: str) -> bytes:
    """The 16 on-disk bytes of a GUID given as text ('{...}' accepted)."""
    return uuid.UUID(text.strip("{}")).bytes_le


file_identifier = cs.Struct(
    "signature" / cs.Bytes(8) * "file type identifier 'vhdxfile'",
    "creator" / Utf16Adapter(cs.Bytes(CREATOR_SIZE)) * "UTF-16LE name of the software that created the file; optional, diagnostic only (QEMU: 'QEMU v7.2.22')",
)

header = cs.Struct(
    "signature" / cs.Bytes(4) * "header signature 'head'",
    "checksum" / cs.Int32ul * "CRC-32C of the 4 KiB header with this field taken as 0",
    "sequence_number" / cs.Int64ul * "the valid header with the higher value is the current one",
    "file_write_guid" / Guid() * "changed on the first write to the file after each open",
    "data_write_guid" / Guid() * "changed on the first guest-visible write; differencing children record it as parent_linkage",
    "log_guid" / Guid() * "identifies the log entries that belong to the file; all zero = no log to replay",
    "log_version" / cs.Int16ul * "log format version, must be 0",
    "version" / cs.Int16ul * "header version, must be 1",
    "log_length" / cs.Int32ul * "bytes of the log, a multiple of 1 MiB",
    "log_offset" / cs.Int64ul * "absolute byte offset of the log, a multiple of 1 MiB, at least 1 MiB",
    "reserved" / cs.Bytes(4016) * "zero",
)

region_table_header = cs.Struct(
    "signature" / cs.Bytes(4) * "region table signature 'regi'",
    "checksum" / cs.Int32ul * "CRC-32C of the 64 KiB region table with this field taken as 0",
    "entry_count" / cs.Int32ul * "number of region entries, at most 2047",
    "reserved" / cs.Int32ul * "zero",
)
REGION_TABLE_HEADER_SIZE = 16

region_table_entry = cs.Struct(
    "guid" / Guid() * "region kind: BAT 2DC27766-F623-4200-9D64-115E9BFD4A08, metadata 8B7CA206-4790-4B9A-B8FE-575F050F886E",
    "file_offset" / cs.Int64ul * "absolute byte offset of the region, a multiple of 1 MiB",
    "length" / cs.Int32ul * "bytes of the region, a multiple of 1 MiB",
    "data_bits" / flags(cs.Int32ul, REGION_FLAG_NAMES) * "bit 0 required: a reader that does not know the region must not open the file (QEMU writes 0)",
)
REGION_ENTRY_SIZE = 32
REGION_ENTRY_DTYPE = np.dtype([("guid", "V16"), ("file_offset", "<u8"), ("length", "<u4"),
                               ("data_bits", "<u4")])


def region_entries(count) -> cs.Construct:
    """`count` region table entries as one numpy record array."""
    return NumpyArray(count, REGION_ENTRY_DTYPE)


metadata_table_header = cs.Struct(
    "signature" / cs.Bytes(8) * "metadata table signature 'metadata'",
    "reserved" / cs.Int16ul * "zero",
    "entry_count" / cs.Int16ul * "number of metadata entries, at most 2047",
    "reserved2" / cs.Bytes(20) * "zero",
)
METADATA_TABLE_HEADER_SIZE = 32

metadata_table_entry = cs.Struct(
    "item_id" / Guid() * "which metadata item (file parameters, virtual disk size, page 83 data, sector sizes, parent locator)",
    "offset" / cs.Int32ul * "byte offset of the item from the start of the metadata region (at least 64 KiB; 0 only when length is 0)",
    "length" / cs.Int32ul * "bytes of the item, at most 1 MiB",
    "data_bits" / flags(cs.Int32ul, METADATA_FLAG_NAMES) * "bit 0 is_user, bit 1 is_virtual_disk, bit 2 is_required (an unknown required item makes the file unopenable)",
    "reserved2" / cs.Int32ul * "zero",
)
METADATA_ENTRY_SIZE = 32
METADATA_ENTRY_DTYPE = np.dtype([("item_id", "V16"), ("offset", "<u4"), ("length", "<u4"),
                                 ("data_bits", "<u4"), ("reserved2", "<u4")])


def metadata_entries(count) -> cs.Construct:
    """`count` metadata table entries as one numpy record array."""
    return NumpyArray(count, METADATA_ENTRY_DTYPE)


file_parameters = cs.Struct(
    "block_size" / cs.Int32ul * "bytes of guest data per payload block: a power of two from 1 MiB to 256 MiB (QEMU default 8 MiB up to 1 GiB disks)",
    "data_bits" / flags(cs.Int32ul, PARAMS_FLAG_NAMES) * "bit 0 leave_blocks_allocated (a fixed disk), bit 1 has_parent (a differencing disk)",
)
virtual_disk_size = cs.Struct(
    "virtual_disk_size" / cs.Int64ul * "guest disk size in bytes, a multiple of the logical sector size",
)
page83_data = cs.Struct(
    "page_83_data" / Guid() * "unique identifier of the virtual disk (SCSI page 83 data)",
)
logical_sector_size = cs.Struct(
    "logical_sector_size" / cs.Int32ul * "guest sector size: 512 or 4096 (the unit of the sector bitmaps)",
)
physical_sector_size = cs.Struct(
    "physical_sector_size" / cs.Int32ul * "physical sector size reported to the guest: 512 or 4096",
)
ITEM_STRUCTS = {FILE_PARAMETERS_GUID: file_parameters, VIRTUAL_DISK_SIZE_GUID: virtual_disk_size,
                PAGE83_GUID: page83_data, LOGICAL_SECTOR_SIZE_GUID: logical_sector_size,
                PHYSICAL_SECTOR_SIZE_GUID: physical_sector_size}
ITEM_SIZES = {guid: s.sizeof() for guid, s in ITEM_STRUCTS.items()}

parent_locator_header = cs.Struct(
    "locator_type" / Guid() * "kind of parent: B04AEFB7-D19E-4A81-B789-25B8E9445913 = a VHDX parent",
    "reserved" / cs.Int16ul * "zero",
    "key_value_count" / cs.Int16ul * "number of key/value entries that follow",
)
PARENT_LOCATOR_HEADER_SIZE = 20

parent_locator_entry = cs.Struct(
    "key_offset" / cs.Int32ul * "byte offset of the key from the start of the parent locator item",
    "value_offset" / cs.Int32ul * "byte offset of the value from the start of the parent locator item",
    "key_length" / cs.Int16ul * "bytes of the UTF-16LE key (no terminator)",
    "value_length" / cs.Int16ul * "bytes of the UTF-16LE value (no terminator)",
)
PARENT_LOCATOR_ENTRY_SIZE = 12
PARENT_LOCATOR_ENTRY_DTYPE = np.dtype([("key_offset", "<u4"), ("value_offset", "<u4"),
                                       ("key_length", "<u2"), ("value_length", "<u2")])


def parent_locator_entries(count) -> cs.Construct:
    """`count` parent locator key/value entries as one numpy record array."""
    return NumpyArray(count, PARENT_LOCATOR_ENTRY_DTYPE)


log_entry_header = cs.Struct(
    "signature" / cs.Bytes(4) * "log entry signature 'loge'",
    "checksum" / cs.Int32ul * "CRC-32C over the whole entry (entry_length bytes) with this field taken as 0",
    "entry_length" / cs.Int32ul * "bytes of the entry (header, descriptors, data sectors), a multiple of 4 KiB",
    "tail" / cs.Int32ul * "offset in the log of the first entry of the active sequence this entry belongs to",
    "sequence_number" / cs.Int64ul * "non-zero; consecutive entries of a sequence count up by one",
    "descriptor_count" / cs.Int32ul * "number of data and zero descriptors that follow the header",
    "reserved" / cs.Int32ul * "zero",
    "log_guid" / Guid() * "must equal the current header's log_guid for the entry to count",
    "flushed_file_offset" / cs.Int64ul * "file size when the entry was written; a shorter file means data was lost",
    "last_file_offset" / cs.Int64ul * "file size the entry needs: replay extends the file to it",
)

LOG_DESCRIPTOR_DTYPE = np.dtype([("signature", "S4"), ("trailing_bytes", "<u4"),
                                 ("leading_bytes", "<u8"), ("file_offset", "<u8"),
                                 ("sequence_number", "<u8")])
"""Log descriptors ('desc' data / 'zero' zero), 32 bytes each.  For a data descriptor
trailing_bytes / leading_bytes are the last 4 and first 8 bytes of the target sector;
for a zero descriptor bytes 4-7 are reserved and leading_bytes is the zero length."""

data_descriptor = cs.Struct(
    "signature" / cs.Bytes(4) * "'desc': one 4 KiB sector to write, its data in the next data sector",
    "trailing_bytes" / cs.Bytes(4) * "the last 4 bytes of the sector",
    "leading_bytes" / cs.Bytes(8) * "the first 8 bytes of the sector",
    "file_offset" / cs.Int64ul * "where the sector goes, a multiple of 4 KiB",
    "sequence_number" / cs.Int64ul * "the entry's sequence number",
)
zero_descriptor = cs.Struct(
    "signature" / cs.Bytes(4) * "'zero': a range to fill with zeros",
    "reserved" / cs.Int32ul * "zero",
    "zero_length" / cs.Int64ul * "bytes to zero, a multiple of 4 KiB",
    "file_offset" / cs.Int64ul * "where the range starts, a multiple of 4 KiB",
    "sequence_number" / cs.Int64ul * "the entry's sequence number",
)

LOG_DATA_SECTOR_DTYPE = np.dtype([("signature", "S4"), ("sequence_high", "<u4"),
                                  ("data", "V4084"), ("sequence_low", "<u4")])
"""A 4 KiB log data sector: 'data', the high and low halves of the entry's sequence
number around bytes 8..4091 of the target sector."""

data_sector = cs.Struct(
    "signature" / cs.Bytes(4) * "'data'",
    "sequence_high" / cs.Int32ul * "high 32 bits of the entry's sequence number",
    "data" / cs.Bytes(LOG_DATA_BYTES) * "bytes 8..4091 of the target sector",
    "sequence_low" / cs.Int32ul * "low 32 bits of the entry's sequence number",
)


def log_descriptors(count) -> cs.Construct:
    return NumpyArray(count, LOG_DESCRIPTOR_DTYPE)


def log_data_sectors(count) -> cs.Construct:
    return NumpyArray(count, LOG_DATA_SECTOR_DTYPE)


def bat_table(count) -> cs.Construct:
    """Block Allocation Table: `count` u64 LE entries (state bits 0-2, MiB offset bits 20-63)."""
    return NumpyArray(count, BAT_DTYPE)


def bat_entry(state: int, file_offset: int = 0) -> int:
    """One BAT entry value (file_offset in bytes, a multiple of 1 MiB)."""
    return (int(file_offset) & BAT_FILE_OFFSET_MASK) | (int(state) & BAT_STATE_MASK)


# ---- geometry ------------------------------------------------------------------------------

def chunk_ratio(block_size: int, logical_sector: int) -> int:
    """Payload blocks described by one sector-bitmap block: 2^23 sectors / sectors per block."""
    return SECTORS_PER_BITMAP_BLOCK * logical_sector // block_size


def data_blocks(virtual_size: int, block_size: int) -> int:
    return -(-int(virtual_size) // int(block_size))


def bat_entries(virtual_size: int, block_size: int, logical_sector: int, has_parent: bool) -> int:
    """BAT entries the disk needs: payload entries with a sector-bitmap entry after every
    chunk_ratio of them (differencing: every chunk complete, bitmap entry included)."""
    n = data_blocks(virtual_size, block_size)
    cr = chunk_ratio(block_size, logical_sector)
    if has_parent:
        return -(-n // cr) * (cr + 1)
    return n + max(n - 1, 0) // cr


def qemu_bat_entries(virtual_size: int, block_size: int, logical_sector: int,
                     has_parent: bool) -> int:
    """bat_entries as QEMU 7.2 computes it (u32 arithmetic: a 0-byte disk without a parent
    wraps to 0xFFFFFFFF >> log2(chunk_ratio) entries)."""
    n = data_blocks(virtual_size, block_size) & 0xFFFFFFFF
    cr = chunk_ratio(block_size, logical_sector)
    if has_parent:
        return (-(-n // cr) * (cr + 1)) & 0xFFFFFFFF
    return (n + (((n - 1) & 0xFFFFFFFF) >> (cr.bit_length() - 1))) & 0xFFFFFFFF


def bat_index_of_block(block, ratio: int):
    """BAT index of payload block(s) `block`: block + block // chunk_ratio."""
    return block + block // ratio


def bat_index_of_bitmap(chunk, ratio: int):
    """BAT index of the sector-bitmap entry of chunk(s) `chunk`."""
    return chunk * (ratio + 1) + ratio


def is_bitmap_index(index, ratio: int):
    """True for BAT indexes that hold sector-bitmap entries."""
    return index % (ratio + 1) == ratio


# ---- CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) ---------------------------------

CRC32C_POLY = 0x82F63B78


def _crc_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> np.uint32(1)) ^ np.uint32(CRC32C_POLY), t >> np.uint32(1))
    return t.astype(np.uint32)


_TABLE = _crc_table()
_BYTE_BITS = ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1).astype(bool)


def _apply(columns: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A 32x32 GF(2) matrix (the images of the 32 unit vectors) applied to u32 values."""
    out = np.zeros(values.shape, np.uint32)
    for b in range(4):
        sub = columns[8 * b:8 * b + 8]
        table = np.bitwise_xor.reduce(np.where(_BYTE_BITS, sub[None, :], np.uint32(0)), axis=1)
        out ^= table[(values >> np.uint32(8 * b)) & np.uint32(0xFF)]
    return out


_UNIT = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)
#: the CRC register after one zero byte, as a matrix
_ONE_ZERO_BYTE = (_TABLE[_UNIT & np.uint32(0xFF)] ^ (_UNIT >> np.uint32(8))).astype(np.uint32)


@lru_cache(maxsize=64)
def _zeros_operator(nbytes: int) -> np.ndarray:
    """Matrix that advances a (init 0) CRC register over `nbytes` zero bytes (read-only)."""
    result = _UNIT.copy()
    square = _ONE_ZERO_BYTE
    while nbytes:
        if nbytes & 1:
            result = _apply(square, result)
        nbytes >>= 1
        if nbytes:
            square = _apply(square, square)
    result.flags.writeable = False
    return result


def _raw_crc_rows(rows: np.ndarray) -> np.ndarray:
    """Register (init 0, no final xor) of every row of a 2-D uint8 array, side by side."""
    crc = np.zeros(rows.shape[0], np.uint32)
    for j in range(rows.shape[1]):
        crc = _TABLE[(crc ^ rows[:, j]) & np.uint32(0xFF)] ^ (crc >> np.uint32(8))
    return crc


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of `data`, continuing from `crc` (the value of the bytes before it).

    Table driven over many chunks at once with numpy, the chunk registers combined
    pairwise by GF(2) matrices; crc32c(b"123456789") == 0xE3069283.
    """
    buf = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    n = buf.size
    if n == 0:
        return crc
    width = 64
    while width * width < n and width < 1 << 16:
        width <<= 1
    rows = 1
    while rows * width < n:
        rows <<= 1
    # leading zero bytes do not change a register that starts at 0
    padded = np.zeros(rows * width, np.uint8)
    padded[rows * width - n:] = buf
    regs = _raw_crc_rows(padded.reshape(rows, width))
    op = _zeros_operator(width)
    while regs.size > 1:
        regs = _apply(op, regs[0::2]) ^ regs[1::2]
        if regs.size > 1:
            op = _apply(op, op)
    start = np.array([(crc ^ 0xFFFFFFFF) & 0xFFFFFFFF], np.uint32)
    value = int(regs[0]) ^ int(_apply(_zeros_operator(n), start)[0])
    return value ^ 0xFFFFFFFF


def checksum(data: bytes, field_offset: int = 4) -> int:
    """VHDX checksum: CRC-32C of the structure with its 4 checksum bytes taken as 0."""
    data = bytes(data)
    return crc32c(data[:field_offset] + b"\0\0\0\0" + data[field_offset + 4:])


# ---- creation defaults (QEMU's vhdx_co_create) ----------------------------------------------

DEFAULT_LOG_SIZE = 1 * MiB
#: region/metadata entry flags qemu-img writes
QEMU_REGION_FLAGS = 0
QEMU_FILE_PARAMETERS_FLAGS = METADATA_IS_REQUIRED
QEMU_DISK_ITEM_FLAGS = 0x6                 # is_virtual_disk | is_required
#: where qemu-img puts the metadata items inside the metadata region
METADATA_ITEMS_OFFSET = 64 * KiB


def qemu_default_block_size(virtual_size: int) -> int:
    """Block size qemu-img picks when block_size is 0: 8 MiB up to 1 GiB, 16 MiB up to
    100 GiB, 32 MiB up to 32 TiB, 64 MiB beyond."""
    if virtual_size > 32 * 1024 ** 4:
        return 64 * MiB
    if virtual_size > 100 * 1024 ** 3:
        return 32 * MiB
    if virtual_size > 1024 ** 3:
        return 16 * MiB
    return 8 * MiB
