"""VMDK binary structures: every on-disk record, parse and build.

* ``sparse_header``: the 512-byte hosted sparse extent header ("KDMV"), also the
  footer of streamOptimized extents whose header says ``gdOffset == GD_AT_END``.
* ``grain_record_header`` / ``grain_record`` / ``marker``: streamOptimized
  compressed grains and metadata markers.
* ``cowd_header``: the 2048-byte ESX "COWD" (vmfsSparse, redo log) header.
* ``sesparse_header`` / ``sesparse_volatile_header``: ESXi seSparse extents.
* Grain directories / grain tables as numpy tables, plus the geometry helpers
  drivers, checkers and writers share.

Field names follow QEMU (block/vmdk.c) and VMware's spec names (magicNumber,
capacity, grainSize, ...); seSparse names are QEMU's.  All integers are little
endian; offsets and sizes in headers count 512-byte sectors.  The text
descriptor grammar lives in ``vmdk_descriptor``.
"""
from __future__ import annotations

import construct as cs
from construct import this
import numpy as np

from ._types import NumpyArray, flags, enum

SECTOR = 512

# ---- hosted sparse extent (KDMV) -----------------------------------------------------
SPARSE_MAGIC = b"KDMV"
SPARSE_HEADER_SIZE = 512
GD_AT_END = 0xFFFFFFFFFFFFFFFF

FLAG_VALID_NEWLINE = 0x1
FLAG_REDUNDANT_GRAIN_TABLE = 0x2
FLAG_ZERO_GRAIN = 0x4
FLAG_COMPRESSED = 0x10000
FLAG_MARKERS = 0x20000
FLAGS_COMPAT_MASK = 0x0000FFFF      # bits a reader may ignore
FLAGS_INCOMPAT_MASK = 0xFFFF0000    # bits a reader must understand
FLAGS_KNOWN = (FLAG_VALID_NEWLINE | FLAG_REDUNDANT_GRAIN_TABLE | FLAG_ZERO_GRAIN
               | FLAG_COMPRESSED | FLAG_MARKERS)
SPARSE_FLAG_NAMES = {
    0: "valid newline test",
    1: "redundant grain table",
    2: "zeroed-grain GTE",
    16: "compressed grains",
    17: "markers",
}

COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1
COMPRESSION_NAMES = {COMPRESSION_NONE: "none", COMPRESSION_DEFLATE: "deflate (zlib stream)"}

#: the four newline-detection bytes at 0x49..0x4C when FLAG_VALID_NEWLINE is set
NEWLINE_CHARS = b"\n \r\n"

#: GT entry value meaning "grain reads as zeros" when FLAG_ZERO_GRAIN is set
GTE_ZEROED = 1

#: QEMU limits and defaults (block/vmdk.c, qemu-img 7.2)
QEMU_MAX_VERSION = 3
QEMU_MAX_GRAIN_SIZE = 0x200000          # sectors
QEMU_MAX_GTES_PER_GT = 512
QEMU_DESCRIPTOR_SIZE = 20               # sectors reserved for the embedded descriptor
DEFAULT_GRAIN_SIZE = 128                # sectors (64 KiB)
DEFAULT_GTES_PER_GT = 512
#: extent size of twoGbMax* splits: QEMU 2 GiB, VMware/VirtualBox 2047 MiB (sectors)
QEMU_SPLIT_SECTORS = 4194304
VMWARE_SPLIT_SECTORS = 4192256

sparse_header = cs.Struct(
    "magicNumber" / cs.Const(SPARSE_MAGIC) * "hosted sparse extent magic 'KDMV' (u32 0x564D444B, 'VMDK' read little endian)",
    "version" / cs.Int32ul * "format version: 1, 2 (adds the zeroed-grain GTE) or 3 (change tracking; QEMU writes 3 for streamOptimized); QEMU refuses > 3",
    "flags" / flags(cs.Int32ul, SPARSE_FLAG_NAMES) * "bit 0 newline test valid, 1 redundant grain directory/tables, 2 zeroed-grain GTE, 16 compressed grains, 17 markers; bits 16..31 are incompatible",
    "capacity" / cs.Int64ul * "extent size in sectors (its contribution to the virtual disk); 0 with a descriptor = descriptor-only file",
    "grainSize" / cs.Int64ul * "sectors per grain; a power of two > 8 (VMware), default 128 = 64 KiB, QEMU caps at 0x200000",
    "descriptorOffset" / cs.Int64ul * "sector of the embedded text descriptor, 0 if none (QEMU: 1)",
    "descriptorSize" / cs.Int64ul * "sectors reserved for the embedded descriptor (QEMU: 20)",
    "numGTEsPerGT" / cs.Int32ul * "entries per grain table; 512 in practice, QEMU rejects > 512",
    "rgdOffset" / cs.Int64ul * "sector of the redundant (backup) grain directory, 0 if unused",
    "gdOffset" / cs.Int64ul * "sector of the primary grain directory; 0xFFFFFFFFFFFFFFFF (GD_AT_END) = read the footer near the end of the file",
    "overHead" / cs.Int64ul * "sectors of metadata at the start of the file; grains start at or after it (QEMU rounds it up to a grain)",
    "uncleanShutdown" / cs.Int8ul * "non-zero = the extent was not closed cleanly (dirty)",
    "singleEndLineChar" / cs.Bytes(1) * "newline check: must be '\\n' (0x0A) when flag bit 0 is set",
    "nonEndLineChar" / cs.Bytes(1) * "newline check: must be ' ' (0x20) when flag bit 0 is set",
    "doubleEndLineChar1" / cs.Bytes(1) * "newline check: must be '\\r' (0x0D) when flag bit 0 is set",
    "doubleEndLineChar2" / cs.Bytes(1) * "newline check: must be '\\n' (0x0A) when flag bit 0 is set",
    "compressAlgorithm" / enum(cs.Int16ul, COMPRESSION_NAMES) * "grain compression: 0 none, 1 deflate (zlib stream, needs flag bit 16)",
    "pad" / cs.Bytes(433) * "zero padding to 512 bytes",
)


def gt_coverage(grain_size: int, num_gtes_per_gt: int = DEFAULT_GTES_PER_GT) -> int:
    """Sectors mapped by one grain table (numGTEsPerGT * grainSize)."""
    return int(num_gtes_per_gt) * int(grain_size)


def num_gd_entries(capacity: int, grain_size: int,
                   num_gtes_per_gt: int = DEFAULT_GTES_PER_GT) -> int:
    """Grain directory entries needed for `capacity` sectors: ceil(capacity / gt_coverage).

    Raises ValueError when the coverage is not positive (a lying header).
    """
    cov = gt_coverage(grain_size, num_gtes_per_gt)
    if cov <= 0:
        raise ValueError(f"grain table coverage must be positive (grainSize={grain_size}, "
                         f"numGTEsPerGT={num_gtes_per_gt})")
    return -(-int(capacity) // cov)


def gd_sectors(n_gd_entries: int) -> int:
    """Whole sectors a grain directory of `n_gd_entries` u32 entries occupies."""
    return -(-int(n_gd_entries) * 4 // SECTOR)


def gt_sectors(num_gtes_per_gt: int = DEFAULT_GTES_PER_GT) -> int:
    """Whole sectors one grain table of `num_gtes_per_gt` u32 entries occupies (4 for 512)."""
    return -(-int(num_gtes_per_gt) * 4 // SECTOR)


def qemu_sparse_layout(capacity: int, grain_size: int = DEFAULT_GRAIN_SIZE,
                       num_gtes_per_gt: int = DEFAULT_GTES_PER_GT,
                       descriptor_offset: int = 1,
                       descriptor_size: int = QEMU_DESCRIPTOR_SIZE) -> dict[str, int]:
    """Metadata placement qemu-img 7.2 writes for a new sparse extent.

    Redundant GD right after the descriptor area, then its GTs, then the primary GD
    and its GTs, overhead rounded up to a grain: returns ``rgdOffset``, ``gdOffset``,
    ``overHead`` (header field names) plus ``numGDEntries``.
    """
    n = num_gd_entries(capacity, grain_size, num_gtes_per_gt)
    gds, gts = gd_sectors(n), gt_sectors(num_gtes_per_gt)
    rgd = descriptor_offset + descriptor_size
    gd = rgd + gds + gts * n
    end = gd + gds + gts * n
    return {"rgdOffset": rgd, "gdOffset": gd,
            "overHead": -(-end // grain_size) * grain_size, "numGDEntries": n}


# ---- grain directory / grain tables ---------------------------------------------------------
TABLE_DTYPE = np.dtype("<u4")             # KDMV and COWD GD/GT entries: sector numbers
SESPARSE_TABLE_DTYPE = np.dtype("<u8")    # seSparse GD/GT entries


def gd_table(count) -> cs.Construct:
    """Grain directory: `count` u32 LE sector numbers of grain tables (0 = GT not allocated).

    Also the COWD grain directory (numGDEntries entries)."""
    return NumpyArray(count, TABLE_DTYPE)


def gt_table(count) -> cs.Construct:
    """Grain table: `count` u32 LE sector numbers of grains or compressed-grain records
    (0 = unallocated, 1 = zeroed grain with FLAG_ZERO_GRAIN).  COWD GTs have 4096 entries."""
    return NumpyArray(count, TABLE_DTYPE)


def sesparse_table(count) -> cs.Construct:
    """seSparse grain directory or grain table: `count` u64 LE entries (see the masks)."""
    return NumpyArray(count, SESPARSE_TABLE_DTYPE)


# ---- streamOptimized: grain records and markers -------------------------------------------------
MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3
MARKER_NAMES = {MARKER_EOS: "end of stream", MARKER_GT: "grain table",
                MARKER_GD: "grain directory", MARKER_FOOTER: "footer"}
MARKER_SIZE = 512
GRAIN_RECORD_HEADER_SIZE = 12

grain_record_header = cs.Struct(
    "lba" / cs.Int64ul * "first sector (extent relative, grain aligned) of the grain this record holds",
    "size" / cs.Int32ul * "byte length of the compressed payload that follows; > 0 tells a grain record from a marker",
)

grain_record = cs.Struct(
    "lba" / cs.Int64ul * "first sector (extent relative, grain aligned) of the grain this record holds",
    "size" / cs.Int32ul * "byte length of the compressed payload that follows; > 0 tells a grain record from a marker",
    "data" / cs.Bytes(this.size) * "compressed grain: a zlib stream (RFC 1950 header + deflate)",
    "padding" / cs.Bytes(lambda c: -(GRAIN_RECORD_HEADER_SIZE + c.size) % SECTOR) * "zero padding to the next 512-byte boundary",
)

marker = cs.Struct(
    "val" / cs.Int64ul * "number of metadata sectors that follow (GT: 4, GD: gd sectors, footer: 1, EOS: 0)",
    "size" / cs.Int32ul * "always 0 for a metadata marker (a grain record has its payload size here)",
    "type" / enum(cs.Int32ul, MARKER_NAMES) * "0 end of stream, 1 grain table, 2 grain directory, 3 footer (dissect also lists 4 = progress, unverified)",
    "pad" / cs.Bytes(496) * "zero padding to 512 bytes",
)

# ---- ESX COWD (vmfsSparse / server sparse / redo log) -------------------------------------------
COWD_MAGIC = b"COWD"
COWD_HEADER_SIZE = 2048
COWD_GT_ENTRIES = 4096              # fixed, whatever the header says
COWD_VERSION = 1
COWD_FLAG_ROOT = 0x1          # base disk: bytes 32.. hold geometry, not a parent name

# The header has a union at byte 32: a base ("root") disk stores its geometry there
# (cylinders, heads, sectors: 3 x u32), a delta ("child") disk stores
# parentFileName[1024] + parentGeneration (u32), 1028 bytes in all.  This flat layout
# exposes the child view (parentFileName covers bytes 32..1055, whose first 12 bytes
# are the root geometry: see cowd_root_geometry).
#
# Ambiguity: libvmdk and VirtualBox place savedGeneration at 1636 and
# uncleanShutdown at 1648 (32 + 1028 + 4 + 60 + 512 = 1636 supports them);
# DiscUtils reads/writes them 4 bytes earlier, at 1632 (0x660) and 1644 (0x66C).
# This layout follows libvmdk/VirtualBox; a checker should also look at 1644 when the
# 1648 value looks wrong (no real sample was available to settle it).
cowd_header = cs.Struct(
    "magicNumber" / cs.Const(COWD_MAGIC) * "ESX sparse extent magic 'COWD'",
    "version" / cs.Int32ul * "format version: 1",
    "flags" / cs.Int32ul * "flags; 3 observed, meaning undocumented",
    "numSectors" / cs.Int32ul * "extent capacity in sectors",
    "grainSize" / cs.Int32ul * "sectors per grain (ESX redo logs: 1)",
    "gdOffset" / cs.Int32ul * "sector of the grain directory (4, right after this header)",
    "numGDEntries" / cs.Int32ul * "grain directory entries = ceil(numSectors / (4096 * grainSize))",
    "freeSector" / cs.Int32ul * "next free sector (allocation pointer, logical end of the file)",
    "parentFileName" / cs.Bytes(1024) * "delta disk: parent file name, NUL padded (often empty); base disk: the first 12 bytes are the root geometry cylinders, heads, sectors (u32 each, see cowd_root_geometry)",
    "parentGeneration" / cs.Int32ul * "delta disk: generation of the parent when this child was made",
    "generation" / cs.Int32ul * "generation counter of this extent",
    "name" / cs.Bytes(60) * "disk name, NUL padded",
    "description" / cs.Bytes(512) * "disk description, NUL padded",
    "savedGeneration" / cs.Int32ul * "generation at the last clean save (offset 1636 per libvmdk/VirtualBox; DiscUtils: 1632)",
    "reserved" / cs.Bytes(8) * "reserved",
    "uncleanShutdown" / cs.Int32ul * "non-zero = not closed cleanly (offset 1648 per libvmdk/VirtualBox; DiscUtils: 1644)",
    "padding" / cs.Bytes(396) * "padding to 2048 bytes",
)

cowd_root = cs.Struct(
    "root_cylinders" / cs.Int32ul * "base disk geometry: cylinders (union with parentFileName bytes 0..3)",
    "root_heads" / cs.Int32ul * "base disk geometry: heads (union with parentFileName bytes 4..7)",
    "root_sectors" / cs.Int32ul * "base disk geometry: sectors per track (union with parentFileName bytes 8..11)",
)


def cowd_root_geometry(parsed) -> dict[str, int]:
    """The root (base disk) view of the COWD union: ``root_cylinders``,
    ``root_heads``, ``root_sectors`` decoded from the first 12 bytes of
    ``parentFileName`` (a parsed ``cowd_header`` or those raw bytes)."""
    raw = parsed if isinstance(parsed, (bytes, bytearray, memoryview)) else parsed["parentFileName"]
    root = cowd_root.parse(bytes(raw[:12]))
    return {k: int(root[k]) for k in ("root_cylinders", "root_heads", "root_sectors")}


def cowd_parent_file_name(parsed) -> bytes:
    """``parentFileName`` up to its first NUL (raw bytes; decode as the caller sees fit)."""
    raw = bytes(parsed if isinstance(parsed, (bytes, bytearray, memoryview)) else parsed["parentFileName"])
    return raw.split(b"\0", 1)[0]


def cowd_num_gd_entries(num_sectors: int, grain_size: int) -> int:
    """GD entries a COWD extent needs: ceil(numSectors / (4096 * grainSize))."""
    return num_gd_entries(num_sectors, grain_size, COWD_GT_ENTRIES)


# ---- ESXi seSparse ----------------------------------------------------------------------------------
SESPARSE_MAGIC = 0xCAFEBABE
SESPARSE_VOLATILE_MAGIC = 0xCAFECAFE
SESPARSE_VERSION = 0x0000000200000001
SESPARSE_GRAIN_SIZE = 8                 # sectors (4 KiB), required by QEMU
SESPARSE_GRAIN_TABLE_SIZE = 64          # sectors (32 KiB = 4096 u64 entries), required by QEMU
SESPARSE_GT_ENTRIES = 4096

#: GD entries: 0 = unallocated; allocated = 0x10000000 in the top 32 bits, GT index below
SESPARSE_GDE_TYPE_MASK = 0xFFFFFFFF00000000
SESPARSE_GDE_ALLOCATED = 0x1000000000000000
SESPARSE_GDE_INDEX_MASK = 0x00000000FFFFFFFF
#: GT entries: the top nibble is the kind
SESPARSE_GTE_KIND_SHIFT = 60
SESPARSE_GTE_KIND_MASK = 0xF000000000000000
SESPARSE_GTE_CLUSTER_HI_MASK = 0x0FFF000000000000   # low 12 bits of the cluster number
SESPARSE_GTE_CLUSTER_LO_MASK = 0x0000FFFFFFFFFFFF   # cluster number >> 12
SESPARSE_GTE_UNALLOCATED = 0
SESPARSE_GTE_UNMAPPED = 1
SESPARSE_GTE_ZERO = 2
SESPARSE_GTE_ALLOCATED = 3
SESPARSE_GTE_KINDS = {SESPARSE_GTE_UNALLOCATED: "unallocated",
                      SESPARSE_GTE_UNMAPPED: "scsi unmapped (QEMU: zeros; dissect: parent)",
                      SESPARSE_GTE_ZERO: "zero grain",
                      SESPARSE_GTE_ALLOCATED: "allocated"}

sesparse_header = cs.Struct(
    "magic" / cs.Const(SESPARSE_MAGIC, cs.Int64ul) * "seSparse magic 0x00000000CAFEBABE",
    "version" / cs.Int64ul * "format version; QEMU requires 0x0000000200000001",
    "capacity" / cs.Int64ul * "extent size in sectors",
    "grain_size" / cs.Int64ul * "sectors per grain; QEMU requires 8 (4 KiB)",
    "grain_table_size" / cs.Int64ul * "sectors per grain table; QEMU requires 64 (4096 u64 entries)",
    "flags" / cs.Int64ul * "flags; QEMU requires 0",
    "reserved1" / cs.Int64ul * "reserved, 0",
    "reserved2" / cs.Int64ul * "reserved, 0",
    "reserved3" / cs.Int64ul * "reserved, 0",
    "reserved4" / cs.Int64ul * "reserved, 0",
    "volatile_header_offset" / cs.Int64ul * "sector of the volatile header",
    "volatile_header_size" / cs.Int64ul * "sectors of the volatile header",
    "journal_header_offset" / cs.Int64ul * "sector of the journal header",
    "journal_header_size" / cs.Int64ul * "sectors of the journal header",
    "journal_offset" / cs.Int64ul * "sector of the journal",
    "journal_size" / cs.Int64ul * "sectors of the journal",
    "grain_dir_offset" / cs.Int64ul * "sector of the grain directory (u64 entries)",
    "grain_dir_size" / cs.Int64ul * "sectors of the grain directory",
    "grain_tables_offset" / cs.Int64ul * "sector of the first grain table; GT i starts at grain_tables_offset + i * grain_table_size",
    "grain_tables_size" / cs.Int64ul * "sectors of the grain table area",
    "free_bitmap_offset" / cs.Int64ul * "sector of the free-space bitmap",
    "free_bitmap_size" / cs.Int64ul * "sectors of the free-space bitmap",
    "backmap_offset" / cs.Int64ul * "sector of the backmap (grain -> guest mapping)",
    "backmap_size" / cs.Int64ul * "sectors of the backmap",
    "grains_offset" / cs.Int64ul * "sector of grain (cluster) 0; grain c starts at grains_offset + c * grain_size",
    "grains_size" / cs.Int64ul * "sectors of the grain area",
    "pad" / cs.Bytes(304) * "zero padding to 512 bytes",
)

sesparse_volatile_header = cs.Struct(
    "magic" / cs.Const(SESPARSE_VOLATILE_MAGIC, cs.Int64ul) * "seSparse volatile header magic 0x00000000CAFECAFE",
    "free_gt_number" / cs.Int64ul * "number of the next free grain table",
    "next_txn_seq_number" / cs.Int64ul * "next journal transaction sequence number",
    "replay_journal" / cs.Int64ul * "non-zero = dirty: the journal must be replayed before use (QEMU refuses)",
    "pad" / cs.Bytes(480) * "zero padding to 512 bytes",
)


def decode_sesparse_gd(entries) -> tuple[np.ndarray, np.ndarray]:
    """seSparse GD entries -> (allocated: bool, gt_index: uint64), vectorised.

    An entry is allocated when its top 32 bits are 0x10000000; ``gt_index`` is then
    the low 32 bits (0 where not allocated).  Entries that are neither 0 nor
    allocated are malformed: ``(entries != 0) & ~allocated``.
    """
    e = np.asarray(entries, dtype=np.uint64)
    allocated = (e & np.uint64(SESPARSE_GDE_TYPE_MASK)) == np.uint64(SESPARSE_GDE_ALLOCATED)
    index = np.where(allocated, e & np.uint64(SESPARSE_GDE_INDEX_MASK), np.uint64(0))
    return allocated, index.astype(np.uint64)


def decode_sesparse_gt(entries) -> tuple[np.ndarray, np.ndarray]:
    """seSparse GT entries -> (kind: uint8 top nibble, cluster: uint64), vectorised.

    kind 0 unallocated, 1 SCSI-unmapped, 2 zero grain, 3 allocated (SESPARSE_GTE_*);
    4..15 are invalid.  ``cluster`` is the grain number for kind 3 (sector =
    grains_offset + cluster * grain_size) and 0 otherwise.  See
    ``sesparse_gt_malformed`` for entries QEMU rejects.
    """
    e = np.asarray(entries, dtype=np.uint64)
    kind = (e >> np.uint64(SESPARSE_GTE_KIND_SHIFT)).astype(np.uint8)
    cluster = (((e & np.uint64(SESPARSE_GTE_CLUSTER_HI_MASK)) >> np.uint64(48))
               | ((e & np.uint64(SESPARSE_GTE_CLUSTER_LO_MASK)) << np.uint64(12)))
    cluster = np.where(kind == SESPARSE_GTE_ALLOCATED, cluster, np.uint64(0)).astype(np.uint64)
    return kind, cluster


def encode_sesparse_gt(kind, cluster=0) -> np.ndarray:
    """Inverse of decode_sesparse_gt (for writers and repair): uint64 entries."""
    k = np.asarray(kind, dtype=np.uint64)
    c = np.asarray(cluster, dtype=np.uint64)
    body = (((c & np.uint64(0xFFF)) << np.uint64(48))
            | ((c >> np.uint64(12)) & np.uint64(SESPARSE_GTE_CLUSTER_LO_MASK)))
    body = np.where(k == SESPARSE_GTE_ALLOCATED, body, np.uint64(0))
    return ((k << np.uint64(SESPARSE_GTE_KIND_SHIFT)) | body).astype(np.uint64)


def sesparse_gt_malformed(entries) -> np.ndarray:
    """Bool mask of GT entries QEMU rejects: kind > 3, or kind 0 with other bits set."""
    e = np.asarray(entries, dtype=np.uint64)
    kind = e >> np.uint64(SESPARSE_GTE_KIND_SHIFT)
    return (kind > np.uint64(3)) | ((kind == np.uint64(0)) & (e != np.uint64(0)))


# ---- build helpers (writers) ------------------------------------------------------------------------
#: flags of what qemu-img writes for a new sparse extent, and of VMware's stream format
QEMU_SPARSE_FLAGS = FLAG_VALID_NEWLINE | FLAG_REDUNDANT_GRAIN_TABLE
VMWARE_STREAM_FLAGS = FLAG_VALID_NEWLINE | FLAG_COMPRESSED | FLAG_MARKERS


def sparse_header_values(capacity: int, *, version: int = 1, flags: int = QEMU_SPARSE_FLAGS,
                         grain_size: int = DEFAULT_GRAIN_SIZE, descriptor_offset: int = 0,
                         descriptor_size: int = 0, num_gtes_per_gt: int = DEFAULT_GTES_PER_GT,
                         rgd_offset: int = 0, gd_offset: int = 0, overhead: int = 0,
                         compress_algorithm: int = COMPRESSION_NONE) -> dict:
    """Every field of ``sparse_header`` for building one (a clean shutdown, newline bytes set)."""
    return {"version": version, "flags": flags, "capacity": capacity, "grainSize": grain_size,
            "descriptorOffset": descriptor_offset, "descriptorSize": descriptor_size,
            "numGTEsPerGT": num_gtes_per_gt, "rgdOffset": rgd_offset, "gdOffset": gd_offset,
            "overHead": overhead, "uncleanShutdown": 0,
            "singleEndLineChar": NEWLINE_CHARS[0:1], "nonEndLineChar": NEWLINE_CHARS[1:2],
            "doubleEndLineChar1": NEWLINE_CHARS[2:3], "doubleEndLineChar2": NEWLINE_CHARS[3:4],
            "compressAlgorithm": compress_algorithm, "pad": bytes(433)}


def build_marker(marker_type: int, val: int) -> bytes:
    """One 512-byte metadata marker (`val` metadata sectors follow; EOS: type 0, val 0)."""
    return marker.build({"val": val, "size": 0, "type": marker_type, "pad": bytes(496)})


def stream_overhead(descriptor_offset: int, descriptor_size: int,
                    grain_size: int = DEFAULT_GRAIN_SIZE) -> int:
    """``overHead`` of a VMware-style stream: header and descriptor rounded up to a grain."""
    end = max(1, int(descriptor_offset) + int(descriptor_size))
    return -(-end // int(grain_size)) * int(grain_size)
