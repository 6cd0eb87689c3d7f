"""QCOW version 1 (QEMU ``qcow``): header, L1/L2 tables and the entry bit layout.

* ``header``: the fixed 48-byte record at offset 0 (QEMU's QCowHeader, packed).
* The L1 and L2 tables as numpy tables of big-endian u64 entries.
* Helpers drivers, checkers and writers share: the L1 size QEMU derives from the
  disk size, the compressed-entry masks, QEMU's creation defaults.

Field names are QEMU's (block/qcow.c).  All integers are big endian.
"""
from __future__ import annotations

import construct as cs
import numpy as np

from ._types import NumpyArray, enum

MAGIC = b"QFI\xfb"
VERSION = 1
HEADER_SIZE = 48
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 16
MIN_L2_BITS, MAX_L2_BITS = 6, 13
MAX_BACKING_NAME = 1023
#: QEMU refuses an L1 table of more than INT_MAX / 8 entries ("Image too large")
MAX_L1_ENTRIES = (2**31 - 1) // 8

CRYPT_NONE, CRYPT_AES = 0, 1
CRYPT_METHODS = {CRYPT_NONE: "none", CRYPT_AES: "aes"}

OFLAG_COMPRESSED = 1 << 63

#: qemu-img create: 4 KiB clusters and 4 KiB L2 tables, or with a backing file
#: 512-byte clusters (unmodified sectors need no copy) and 32 KiB L2 tables
DEFAULT_BITS = (12, 9)
DEFAULT_BACKING_BITS = (9, 12)

header = cs.Struct(
    "magic" / cs.Const(MAGIC) * "QCOW magic 'QFI\\xfb' (shared with qcow2)",
    "version" / cs.Int32ub * "format version: 1 (2 and 3 are qcow2)",
    "backing_file_offset" / cs.Int64ub * "offset of the backing file name (not NUL terminated); 0 = no backing file",
    "backing_file_size" / cs.Int32ub * "length of the backing file name in bytes, at most 1023 ('Backing file name too long')",
    "mtime" / cs.Int32ub * "modification time of the backing file (POSIX seconds); QEMU writes 0 and never checks it",
    "size" / cs.Int64ub * "virtual disk size in bytes, at least 2; QEMU uses size // 512 whole sectors",
    "cluster_bits" / cs.Int8ub * "cluster size = 1 << cluster_bits, 9..16 ('Cluster size must be between 512 and 64k')",
    "l2_bits" / cs.Int8ub * "entries per L2 table = 1 << l2_bits, 6..13 (L2 tables of 512 B..64 KiB, independent of the cluster size)",
    "padding" / cs.Int16ub * "zero",
    "crypt_method" / enum(cs.Int32ub, CRYPT_METHODS) * "encryption: 0 none, 1 AES-128-CBC per 512-byte sector (IV = sector number); anything else is invalid",
    "l1_table_offset" / cs.Int64ub * "offset of the L1 table; QEMU puts it after the header and name, 8-byte aligned (not cluster aligned); its size follows from size",
)

TABLE_DTYPE = np.dtype(">u8")


def u64_table(count) -> cs.Construct:
    """`count` big-endian u64 entries: the L1 table (plain L2 table offsets, 0 = none,
    no flag bits) or L2 tables (see cluster_offset_mask / compressed_size_shift)."""
    return NumpyArray(count, TABLE_DTYPE)


def l1_entries(size: int, cluster_bits: int, l2_bits: int) -> int:
    """Entries of the L1 table: it is not stored but derived from the disk size."""
    shift = cluster_bits + l2_bits
    return (size + (1 << shift) - 1) >> shift


def cluster_offset_mask(cluster_bits: int) -> int:
    """Mask of the host offset inside a compressed L2 entry (QEMU cluster_offset_mask)."""
    return (1 << (63 - cluster_bits)) - 1


def compressed_size_shift(cluster_bits: int) -> int:
    """Bit where the compressed byte count starts; it is `cluster_bits` bits wide
    (masked with cluster_size - 1), so a stream is always shorter than a cluster."""
    return 63 - cluster_bits


def compressed_entry(offset: int, size: int, cluster_bits: int) -> int:
    """The L2 entry of a compressed cluster of `size` bytes at host `offset`."""
    return OFLAG_COMPRESSED | (size << compressed_size_shift(cluster_bits)) | offset
