"""Damaged qcow2 samples: refcounts, L1/L2 entries, COPIED flags, snapshots, truncation.

Every sample is a small image made by qemu-img / qemu-io (64 KiB clusters, a few MiB
of virtual size), then poked.  Offsets are found in the clean file with plain struct
reads of the header and tables (never through imgscope).  `qemu_counts` are the
corruptions and leaks `qemu-img check` 7.2 reports for the sample; `expected` are the
finding codes imgscope gives (its own rules plus what the driver notices while
parsing).
"""
from __future__ import annotations

import struct
from pathlib import Path

from cases import Case, Poke, QEMU_IMG, QEMU_IO, qemu_image, run

KiB, MiB = 1 << 10, 1 << 20
COPIED = 1 << 63
OFFSET_MASK = 0x00FFFFFFFFFFFE00


# ---- plain reads of the clean file -------------------------------------------------------

def _u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        h = f.read(104)
    (cluster_bits,) = struct.unpack_from(">I", h, 20)
    l1_size, l1_offset, rt_offset, _, nb_snap, snap_offset = struct.unpack_from(">IQQIIQ", h, 36)
    (refcount_order,) = struct.unpack_from(">I", h, 96)
    return dict(cluster_size=1 << cluster_bits, l1_size=l1_size, l1_offset=l1_offset,
                reftable_offset=rt_offset, nb_snapshots=nb_snap, snapshots_offset=snap_offset,
                refcount_order=refcount_order)


def _l2_entry_at(path: Path, guest: int) -> int:
    """File offset of the active L2 entry that maps guest offset `guest`."""
    h = _header(path)
    cs = h["cluster_size"]
    per_l2 = cs // 8
    l1 = _u64(path, h["l1_offset"] + 8 * (guest // (cs * per_l2)))
    return (l1 & OFFSET_MASK) + 8 * (guest // cs % per_l2)


def _data_at(path: Path, guest: int) -> int:
    """Host offset of the data cluster mapping guest offset `guest`."""
    return _u64(path, _l2_entry_at(path, guest)) & OFFSET_MASK


def _refcount_at(path: Path, host: int) -> int:
    """File offset of the 16-bit refcount of the cluster at `host` (first refcount block)."""
    h = _header(path)
    assert h["refcount_order"] == 4
    block = _u64(path, h["reftable_offset"]) & ~0x1FF
    return block + 2 * (host // h["cluster_size"])


def _snapshot_entry(path: Path, index: int = 0) -> int:
    """File offset of snapshot table entry `index`."""
    h = _header(path)
    pos = h["snapshots_offset"]
    for _ in range(index):
        with open(path, "rb") as f:
            f.seek(pos)
            head = f.read(40)
        _, _, id_size, name_size = struct.unpack_from(">QIHH", head, 0)
        (extra,) = struct.unpack_from(">I", head, 36)
        pos = -(-(pos + 40 + extra + id_size + name_size) // 8) * 8
    return pos


def _be16(value: int) -> bytes:
    return struct.pack(">H", value)


def _be64(value: int) -> bytes:
    return struct.pack(">Q", value)


def _entry_with(path: Path, where: int, change) -> bytes:
    return _be64(change(_u64(path, where)))


# ---- builders ------------------------------------------------------------------------------

WRITES = ["write -P 0x11 0 128k", "write -P 0x22 1M 64k", "write -P 0x33 2M 64k"]
plain = qemu_image("qcow2", "4M", WRITES)


def with_snapshot(path: Path) -> None:
    """Data at 0..128k, snapshot 's1', then new data at 1M: the active L2 table is a
    copy whose first entries share clusters with the snapshot (refcount 2, COPIED clear)
    and whose entry for 1M is the active layer's own (refcount 1, COPIED set)."""
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", path, "4M")
    run(QEMU_IO, "-f", "qcow2", "-c", "write -P 0x11 0 128k", path)
    run(QEMU_IMG, "snapshot", "-c", "s1", path)
    run(QEMU_IO, "-f", "qcow2", "-c", "write -P 0x22 1M 64k", path)


compressed = qemu_image("qcow2", "4M", ["write -c -P 0x11 0 64k", "write -c -P 0x22 64k 64k",
                                        "write -P 0x33 1M 64k"])


# ---- the cases -------------------------------------------------------------------------------

CASES = [
    Case("qcow2_leaked_cluster.qcow2", "qcow2",
         "the L2 entry of guest 1M is cleared: its data cluster keeps refcount 1 but nothing "
         "references it any more (a leak)",
         plain,
         [Poke(lambda p: _l2_entry_at(p, 1 * MiB), bytes(8),
               "active L2 entry for guest 1M -> 0 (unallocated)")],
         expected=frozenset({"cluster_leaked"}), qemu="leaks",
         qemu_counts={"corruptions": 0, "leaks": 1}),
    Case("qcow2_refcount_too_low.qcow2", "qcow2",
         "the refcount of the data cluster of guest 1M is 0 although its L2 entry uses it "
         "(and says COPIED)",
         plain,
         [Poke(lambda p: _refcount_at(p, _data_at(p, 1 * MiB)), _be16(0),
               "16-bit refcount of the data cluster of guest 1M: 1 -> 0")],
         expected=frozenset({"refcount_too_low", "copied_flag_mismatch"}), qemu="corruptions",
         qemu_counts={"corruptions": 2, "leaks": 0}),
    Case("qcow2_refcount_too_high.qcow2", "qcow2",
         "the refcount of the data cluster of guest 1M is 2 although one L2 entry uses it: "
         "a leak, and its COPIED flag no longer matches",
         plain,
         [Poke(lambda p: _refcount_at(p, _data_at(p, 1 * MiB)), _be16(2),
               "16-bit refcount of the data cluster of guest 1M: 1 -> 2")],
         expected=frozenset({"cluster_leaked", "copied_flag_mismatch"}), qemu="corruptions",
         qemu_counts={"corruptions": 1, "leaks": 1}),
    Case("qcow2_shared_data_cluster.qcow2", "qcow2",
         "the L2 entry of guest 2M points at the data cluster of guest 1M: two entries share "
         "a cluster whose refcount is 1, and 2M's own cluster is leaked",
         plain,
         [Poke(lambda p: _l2_entry_at(p, 2 * MiB),
               lambda p: _be64(_u64(p, _l2_entry_at(p, 1 * MiB))),
               "active L2 entry for guest 2M := the entry for guest 1M")],
         expected=frozenset({"refcount_too_low", "cluster_leaked"}), qemu="corruptions",
         qemu_counts={"corruptions": 1, "leaks": 1}),
    Case("qcow2_l2_entry_beyond_eof.qcow2", "qcow2",
         "the L2 entry of guest 1M points 256 MiB into a file of about 400 KiB",
         plain,
         [Poke(lambda p: _l2_entry_at(p, 1 * MiB), _be64(COPIED | 256 * MiB),
               "active L2 entry for guest 1M -> COPIED | 0x10000000")],
         expected=frozenset({"cluster_beyond_eof", "cluster_leaked", "copied_flag_mismatch"}),
         qemu="corruptions", qemu_counts={"corruptions": 2, "leaks": 1}),
    Case("qcow2_l2_entry_misaligned.qcow2", "qcow2",
         "the L2 entry of guest 1M points 512 bytes into its data cluster (not cluster "
         "aligned), so it also reaches into the next cluster",
         plain,
         [Poke(lambda p: _l2_entry_at(p, 1 * MiB),
               lambda p: _entry_with(p, _l2_entry_at(p, 1 * MiB), lambda e: e + 512),
               "active L2 entry for guest 1M: offset + 0x200")],
         expected=frozenset({"data_cluster_misaligned", "refcount_too_low"}),
         qemu="corruptions", qemu_counts={"corruptions": 2, "leaks": 0}),
    Case("qcow2_copied_flag_wrong.qcow2", "qcow2",
         "COPIED set on an active L2 entry whose cluster the snapshot shares (refcount 2) "
         "and cleared on one whose cluster is the active layer's own (refcount 1)",
         with_snapshot,
         [Poke(lambda p: _l2_entry_at(p, 0),
               lambda p: _entry_with(p, _l2_entry_at(p, 0), lambda e: e | COPIED),
               "active L2 entry for guest 0 (shared with snapshot s1): set COPIED"),
          Poke(lambda p: _l2_entry_at(p, 1 * MiB),
               lambda p: _entry_with(p, _l2_entry_at(p, 1 * MiB), lambda e: e & ~COPIED),
               "active L2 entry for guest 1M (refcount 1): clear COPIED")],
         expected=frozenset({"copied_flag_mismatch"}), qemu="corruptions",
         qemu_counts={"corruptions": 2, "leaks": 0}),
    Case("qcow2_truncated.qcow2", "qcow2",
         "the file is cut 32 KiB into the data cluster of guest 1M: the cluster of guest 2M "
         "lies wholly past the end, the one of 1M partly",
         plain,
         truncate=lambda p: _data_at(p, 1 * MiB) + 32 * KiB,
         expected=frozenset({"cluster_beyond_eof", "data_truncated"}), qemu="corruptions",
         qemu_counts={"corruptions": 1, "leaks": 0}),
    Case("qcow2_l1_reserved_bits.qcow2", "qcow2",
         "L1 entry 0 has reserved bit 1 set (its L2 offset is intact)",
         plain,
         [Poke(lambda p: _header(p)["l1_offset"],
               lambda p: _entry_with(p, _header(p)["l1_offset"], lambda e: e | 0x2),
               "active L1 entry 0: set reserved bit 1")],
         expected=frozenset({"l1_reserved_bits"}), qemu="corruptions",
         qemu_counts={"corruptions": 1, "leaks": 0}),
    Case("qcow2_refblock_twice.qcow2", "qcow2",
         "refcount table entry 1 points at the same refcount block as entry 0",
         plain,
         [Poke(lambda p: _header(p)["reftable_offset"] + 8,
               lambda p: _be64(_u64(p, _header(p)["reftable_offset"])),
               "refcount table entry 1 := entry 0")],
         expected=frozenset({"refblock_shared", "refcount_too_low"}), qemu="corruptions",
         qemu_counts={"corruptions": 2, "leaks": 0}),
    Case("qcow2_refblock_outside.qcow2", "qcow2",
         "refcount table entry 1 points at a refcount block 1 GiB into a file of about "
         "400 KiB",
         plain,
         [Poke(lambda p: _header(p)["reftable_offset"] + 8, _be64(1 << 30),
               "refcount table entry 1 -> 0x40000000")],
         expected=frozenset({"refblock_invalid"}), qemu="corruptions",
         qemu_counts={"corruptions": 1, "leaks": 0}),
    Case("qcow2_snapshot_l1_misaligned.qcow2", "qcow2",
         "the L1 table offset of snapshot 's1' is moved 512 bytes off its cluster: the "
         "snapshot is not counted, so everything only it used is leaked",
         with_snapshot,
         [Poke(lambda p: _snapshot_entry(p, 0),
               lambda p: _entry_with(p, _snapshot_entry(p, 0), lambda e: e + 512),
               "snapshot entry 0: l1_table_offset + 0x200")],
         expected=frozenset({"table_misaligned", "cluster_leaked"}), qemu="corruptions",
         qemu_counts={"corruptions": 1, "leaks": 4}),
    Case("qcow2_compressed_copied.qcow2", "qcow2",
         "the COPIED flag is set on the compressed cluster of guest 0",
         compressed,
         [Poke(lambda p: _l2_entry_at(p, 0),
               lambda p: _entry_with(p, _l2_entry_at(p, 0), lambda e: e | COPIED),
               "active L2 entry for guest 0 (compressed): set COPIED")],
         expected=frozenset({"compressed_copied"}), qemu="corruptions",
         qemu_counts={"corruptions": 1, "leaks": 0}),
    Case("qcow2_corrupt_bit.qcow2", "qcow2",
         "the corrupt bit (incompatible feature bit 1) is set on a consistent image: QEMU "
         "opens it read-only only, qemu-img check finds nothing",
         plain,
         [Poke(72, _be64(2), "incompatible_features: corrupt bit")],
         expected=frozenset({"corrupt_bit_set"}), qemu="clean",
         qemu_counts={"corruptions": 0, "leaks": 0}),
]
