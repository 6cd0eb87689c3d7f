"""qcow2 (versions 2 and 3): every on-disk structure, parse and build.

Field names follow QEMU's (block/qcow2.h); docs are the format's own rules.
Uniform tables are numpy dtypes; decoding masks live here too so drivers,
checkers and writers share one definition.
"""
from __future__ import annotations

import construct as cs
from construct import this
import numpy as np

from ._types import NumpyArray, flags, enum

MAGIC = b"QFI\xfb"
HEADER_V2_SIZE = 72
HEADER_V3_MIN = 104
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024

# ---- feature bits -----------------------------------------------------------
INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file",
                  3: "compression type", 4: "extended L2 entries"}
COMPAT_NAMES = {0: "lazy refcounts"}
AUTOCLEAR_NAMES = {0: "bitmaps", 1: "raw external data"}
INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1, 2, 4
INCOMPAT_COMPRESSION, INCOMPAT_EXTL2 = 8, 16
INCOMPAT_KNOWN = 0x1F
COMPAT_LAZY = 1
AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW = 1, 2

CRYPT_METHODS = {0: "none", 1: "aes", 2: "luks"}
COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}

# ---- table entry masks ----------------------------------------------------------
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED_MASK = 0x1FF
BME_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_TABLE_RESERVED_MASK = 0xFF000000000001FE
COMPRESSED_SECTOR = 512
SUBCLUSTERS = 32

TABLE_DTYPE = np.dtype(">u8")          # L1, L2 (standard), refcount table, bitmap table
EXTENDED_L2_DTYPE = np.dtype([("entry", ">u8"), ("bitmap", ">u8")])


def csize_shift(cluster_bits: int) -> int:
    """Bit where the compressed descriptor's sector count starts (QEMU csize_shift)."""
    return 62 - (cluster_bits - 8)


def refcount_dtype(refcount_order: int) -> np.dtype | None:
    """numpy dtype of a refcount entry, None for widths below 8 bits (bit-packed)."""
    return {3: np.dtype("u1"), 4: np.dtype(">u2"), 5: np.dtype(">u4"),
            6: np.dtype(">u8")}.get(refcount_order)


def decode_refcounts(block: np.ndarray | bytes, refcount_order: int) -> np.ndarray:
    """Refcounts of a refcount block (bytes) as uint64, any width 1..64 bits.

    Widths below 8 bits are packed LSB first inside each byte.
    """
    raw = np.frombuffer(block, dtype=np.uint8) if isinstance(block, (bytes, bytearray, memoryview)) else block.view(np.uint8)
    dt = refcount_dtype(refcount_order)
    if dt is not None:
        return raw.view(dt).astype(np.uint64)
    bits = 1 << refcount_order
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)
    vals = (raw[:, None] >> shifts[None, :]) & ((1 << bits) - 1)
    return vals.reshape(-1).astype(np.uint64)


def encode_refcounts(values: np.ndarray, refcount_order: int) -> bytes:
    """Inverse of decode_refcounts, for writers and repair."""
    values = np.asarray(values, dtype=np.uint64)
    dt = refcount_dtype(refcount_order)
    if dt is not None:
        return values.astype(dt).tobytes()
    bits = 1 << refcount_order
    per_byte = 8 // bits
    v = values.reshape(-1, per_byte).astype(np.uint8)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)
    return np.bitwise_or.reduce(v << shifts[None, :], axis=1).astype(np.uint8).tobytes()


# ---- header ----------------------------------------------------------------------
header_v2 = cs.Struct(
    "magic" / cs.Const(MAGIC) * "QCOW magic 'QFI\\xfb'",
    "version" / cs.Int32ub * "format version: 2 or 3",
    "backing_file_offset" / cs.Int64ub * "offset of the backing file name in cluster 0 (not NUL terminated); 0 = no backing file",
    "backing_file_size" / cs.Int32ub * "length of the backing file name in bytes (at most 1023)",
    "cluster_bits" / cs.Int32ub * "cluster size = 1 << cluster_bits (QEMU: 9..21)",
    "size" / cs.Int64ub * "virtual disk size in bytes",
    "crypt_method" / enum(cs.Int32ub, CRYPT_METHODS) * "encryption: 0 none, 1 legacy AES-CBC, 2 LUKS",
    "l1_size" / cs.Int32ub * "number of entries in the active L1 table",
    "l1_table_offset" / cs.Int64ub * "offset of the active L1 table (cluster aligned)",
    "refcount_table_offset" / cs.Int64ub * "offset of the refcount table (cluster aligned)",
    "refcount_table_clusters" / cs.Int32ub * "size of the refcount table in clusters",
    "nb_snapshots" / cs.Int32ub * "number of internal snapshots",
    "snapshots_offset" / cs.Int64ub * "offset of the snapshot table (cluster aligned, 0 if none)",
)

header_v3_tail = cs.Struct(
    "incompatible_features" / flags(cs.Int64ub, INCOMPAT_NAMES) * "a reader must refuse the image if it does not know a set bit",
    "compatible_features" / flags(cs.Int64ub, COMPAT_NAMES) * "bits a reader may ignore",
    "autoclear_features" / flags(cs.Int64ub, AUTOCLEAR_NAMES) * "bits a writer that does not understand them must clear",
    "refcount_order" / cs.Int32ub * "refcount width = 1 << refcount_order bits (0..6)",
    "header_length" / cs.Int32ub * "length of the header structure in bytes (>= 104, multiple of 8)",
)

header_v3_compression = cs.Struct(
    "compression_type" / enum(cs.Int8ub, COMPRESSION_TYPES) * "compression of compressed clusters: 0 deflate, 1 zstd (present when header_length > 104)",
    "padding" / cs.Bytes(7) * "zero padding of the header to a multiple of 8 bytes",
)

# ---- header extensions -------------------------------------------------------------
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
EXTENSION_NAMES = {EXT_END: "end of extensions", EXT_BACKING_FORMAT: "backing file format",
                   EXT_FEATURE_TABLE: "feature name table", EXT_BITMAPS: "bitmaps",
                   EXT_CRYPTO: "full disk encryption header pointer",
                   EXT_DATA_FILE: "external data file name"}

extension_header = cs.Struct(
    "type" / enum(cs.Int32ub, EXTENSION_NAMES) * "header extension type (magic); 0 ends the list",
    "length" / cs.Int32ub * "length of the extension data, without padding to 8 bytes",
)

feature_entry = cs.Struct(
    "type" / enum(cs.Int8ub, {0: "incompatible", 1: "compatible", 2: "autoclear"}) * "which feature field the bit belongs to",
    "bit" / cs.Int8ub * "bit number within that field (0..63)",
    "name" / cs.PaddedString(46, "ascii") * "feature name, zero padded",
)

bitmaps_extension = cs.Struct(
    "nb_bitmaps" / cs.Int32ub * "number of bitmaps in the bitmap directory (>= 1)",
    "reserved" / cs.Int32ub * "reserved, must be 0",
    "bitmap_directory_size" / cs.Int64ub * "size of the bitmap directory in bytes",
    "bitmap_directory_offset" / cs.Int64ub * "offset of the bitmap directory (cluster aligned)",
)

crypto_extension = cs.Struct(
    "offset" / cs.Int64ub * "offset of the LUKS header area (cluster aligned)",
    "length" / cs.Int64ub * "length of the LUKS header area in bytes",
)

# ---- snapshot table entry --------------------------------------------------------------
snapshot_entry = cs.Struct(
    "l1_table_offset" / cs.Int64ub * "offset of this snapshot's L1 table (cluster aligned)",
    "l1_size" / cs.Int32ub * "number of entries in the snapshot's L1 table",
    "id_str_size" / cs.Int16ub * "length of the unique ID string",
    "name_size" / cs.Int16ub * "length of the snapshot name",
    "date_sec" / cs.Int32ub * "creation time, seconds since the Unix epoch",
    "date_nsec" / cs.Int32ub * "creation time, nanosecond part",
    "vm_clock_nsec" / cs.Int64ub * "guest run time at the snapshot, in nanoseconds",
    "vm_state_size" / cs.Int32ub * "size of the saved VM state (0 = disk-only); overridden by vm_state_size_large",
    "extra_data_size" / cs.Int32ub * "bytes of extra data following this fixed part",
    "extra_data" / cs.Bytes(this.extra_data_size) * "extra data: vm_state_size_large, disk_size, icount, then unknown fields",
    "id_str" / cs.PaddedString(this.id_str_size, "utf8") * "unique ID string (QEMU: decimal counter)",
    "name" / cs.PaddedString(this.name_size, "utf8") * "snapshot name",
    "padding" / cs.Padding(lambda c: -(40 + c.extra_data_size + c.id_str_size + c.name_size) % 8) * "zero padding to the next 8-byte boundary",
)

snapshot_extra = cs.Struct(
    "vm_state_size_large" / cs.Int64ub * "VM state size (64-bit)",
    "disk_size" / cs.Int64ub * "virtual disk size at snapshot time",
    "icount" / cs.Int64sb * "record/replay instruction count, -1 if disabled",
)

# ---- bitmap directory entry -------------------------------------------------------------
BME_FLAG_NAMES = {0: "in_use", 1: "auto", 2: "extra_data_compatible"}
bitmap_dir_entry = cs.Struct(
    "bitmap_table_offset" / cs.Int64ub * "offset of the bitmap table (cluster aligned)",
    "bitmap_table_size" / cs.Int32ub * "number of u64 entries in the bitmap table",
    "flags" / flags(cs.Int32ub, BME_FLAG_NAMES) * "bit 0 in_use (not saved cleanly), bit 1 auto (tracks writes), bit 2 extra_data_compatible",
    "type" / enum(cs.Int8ub, {1: "dirty tracking bitmap"}) * "bitmap type; 1 = dirty tracking",
    "granularity_bits" / cs.Int8ub * "each bit covers 1 << granularity_bits guest bytes",
    "name_size" / cs.Int16ub * "length of the bitmap name",
    "extra_data_size" / cs.Int32ub * "size of extra data (should be 0)",
    "extra_data" / cs.Bytes(this.extra_data_size) * "type-specific extra data",
    "name" / cs.PaddedString(this.name_size, "utf8") * "bitmap name, unique within the image",
    "padding" / cs.Padding(lambda c: -(24 + c.extra_data_size + c.name_size) % 8) * "zero padding to the next 8-byte boundary",
)

# ---- LUKS1 header (inside the FDE area) ---------------------------------------------------
LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_KEY_ENABLED, LUKS_KEY_DISABLED = 0x00AC71F3, 0x0000DEAD
luks_keyslot = cs.Struct(
    "active" / enum(cs.Int32ub, {LUKS_KEY_ENABLED: "enabled", LUKS_KEY_DISABLED: "disabled"}) * "0x00AC71F3 enabled, 0x0000DEAD disabled",
    "iterations" / cs.Int32ub * "PBKDF2 iterations for this slot's passphrase",
    "salt" / cs.Bytes(32) * "PBKDF2 salt",
    "key_material_offset" / cs.Int32ub * "start of the key material, in 512-byte sectors from the LUKS header",
    "stripes" / cs.Int32ub * "anti-forensic splitter stripes",
)
luks_header = cs.Struct(
    "magic" / cs.Const(LUKS_MAGIC) * "LUKS magic 'LUKS\\xba\\xbe'",
    "version" / cs.Int16ub * "LUKS version (1)",
    "cipher_name" / cs.PaddedString(32, "ascii") * "cipher name, e.g. aes",
    "cipher_mode" / cs.PaddedString(32, "ascii") * "cipher mode and IV generator, e.g. xts-plain64",
    "hash_spec" / cs.PaddedString(32, "ascii") * "hash used by PBKDF2 and the AF splitter",
    "payload_offset" / cs.Int32ub * "start of the payload in sectors (unused inside qcow2)",
    "key_bytes" / cs.Int32ub * "master key length in bytes",
    "mk_digest" / cs.Bytes(20) * "PBKDF2 digest of the master key",
    "mk_digest_salt" / cs.Bytes(32) * "salt of the master key digest",
    "mk_digest_iterations" / cs.Int32ub * "iterations of the master key digest",
    "uuid" / cs.PaddedString(40, "ascii") * "UUID of the LUKS volume",
    "key_slots" / cs.Array(8, luks_keyslot) * "eight key slots",
)


def u64_table(count) -> cs.Construct:
    """`count` big-endian u64 entries: L1 tables (active and snapshot), the
    refcount table and bitmap tables all share this layout; the masks above
    say what each entry's bits mean."""
    return NumpyArray(count, TABLE_DTYPE)


def l2_table(entries: int, extended: bool) -> cs.Construct:
    """L2 entries: u64 descriptors, or (descriptor, subcluster bitmap) pairs."""
    return NumpyArray(entries, EXTENDED_L2_DTYPE if extended else TABLE_DTYPE)


# ---- building a header cluster (writers) ---------------------------------------------
# The feature name table qemu-img writes into every version 3 image, in its order.
FEATURE_TABLE = ([("incompatible", bit, name) for bit, name in INCOMPAT_NAMES.items()]
                 + [("compatible", bit, name) for bit, name in COMPAT_NAMES.items()]
                 + [("autoclear", bit, name) for bit, name in AUTOCLEAR_NAMES.items()])
_FEATURE_TYPES = {"incompatible": 0, "compatible": 1, "autoclear": 2}


def build_extension(ext_type: int, payload: bytes) -> bytes:
    """One header extension: type, length, data padded to 8 bytes."""
    return (extension_header.build({"type": ext_type, "length": len(payload)})
            + payload + bytes(-len(payload) % 8))


def build_header(values: dict, *, backing_format: str | None = None,
                 backing_name: str | None = None, feature_table: bool = True) -> bytes:
    """Header, extensions and backing file name as qemu-img lays them out.

    `values` holds the header_v2 fields (offsets of the backing name filled in
    here) plus, for version 3, the header_v3_tail fields and compression_type.
    Version 3 images get the backing format extension (when given), the feature
    name table and the end marker; version 2 images get the backing format
    extension only (qemu-img writes no feature table there), then the end marker
    only when some extension precedes it.  qemu-img leaves the feature table out
    when it does not fit in cluster 0 (512-byte clusters): callers pass
    `feature_table=False` then.
    """
    v3 = values["version"] >= 3
    head_len = HEADER_V3_MIN + 8 if v3 else HEADER_V2_SIZE
    exts = b""
    if backing_format:
        exts += build_extension(EXT_BACKING_FORMAT, backing_format.encode())
    if v3 and feature_table:
        table = cs.GreedyRange(feature_entry).build(
            [{"type": _FEATURE_TYPES[t], "bit": bit, "name": name} for t, bit, name in FEATURE_TABLE])
        exts += build_extension(EXT_FEATURE_TABLE, table)
    if exts:
        exts += extension_header.build({"type": EXT_END, "length": 0})
    name = (backing_name or "").encode()
    fields = dict(values, backing_file_offset=head_len + len(exts) if name else 0,
                  backing_file_size=len(name))
    out = header_v2.build(fields)
    if v3:
        out += header_v3_tail.build(dict(fields, header_length=head_len))
        out += header_v3_compression.build({"compression_type": fields.get("compression_type", 0),
                                            "padding": bytes(7)})
    return out + exts + name
