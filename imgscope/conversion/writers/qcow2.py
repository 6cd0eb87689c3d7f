"""qcow2 writer (compat 0.10 and 1.1).

Layout: cluster 0 holds the header (built with the driver's schema, laid out
as qemu-img lays it out); guest data follows in guest order in contiguous host
clusters (compressed clusters packed byte after byte as qemu's allocator
does); at close the L2 tables, the L1 table, the refcount table and the
refcount blocks are appended.  L2 tables live in numpy arrays allocated per
L2 table touched (memory follows the data, not the disk size); refcounts are
computed with numpy from the finished tables.  With preallocation the data
area holds a host cluster for every guest cluster (host = area + guest offset),
left as holes (metadata) or allocated with fallocate (falloc, full).
"""
from __future__ import annotations

import os
import threading
import zlib
from pathlib import Path

import numpy as np

from ...errors import ConvertError
from ...schemas import qcow2 as S
from ..base import ImageWriter, Option
from ..base import pwrite_all
from ..zeros import write_nonzero

_local = threading.local()


def _zstd_compressor():
    c = getattr(_local, "zstd", None)
    if c is None:
        import zstandard
        c = _local.zstd = zstandard.ZstdCompressor(level=3)
    return c


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class Qcow2Writer(ImageWriter):
    format = "qcow2"
    OPTIONS = {
        "compat": Option("compat", "choice", "1.1",
                         "Compatibility level (v2 [0.10] or v3 [1.1])",
                         ("0.10", "v2", "1.1", "v3")),
        "backing_file": Option("backing_file", "str", None, "File name of a base image"),
        "backing_fmt": Option("backing_fmt", "str", None, "Image format of the base image"),
        "cluster_size": Option("cluster_size", "size", 65536, "qcow2 cluster size"),
        "preallocation": Option("preallocation", "choice", "off",
                                "Preallocation mode (allowed values: off, metadata, falloc, full)",
                                ("off", "metadata", "falloc", "full")),
        "lazy_refcounts": Option("lazy_refcounts", "bool", False,
                                 "Postpone refcount updates"),
        "refcount_bits": Option("refcount_bits", "int", 16,
                                "Width of a reference count entry in bits"),
        "extended_l2": Option("extended_l2", "bool", False, "Extended L2 tables"),
        "compression_type": Option("compression_type", "choice", "zlib",
                                   "Compression method used for image cluster compression",
                                   ("zlib", "zstd")),
    }
    accepts_runs = True
    sparse_writes = True         # zero 4 KiB pieces of new clusters stay holes (-S 4k)
    supports_backing = True
    supports_compression = True

    def __init__(self, path: Path, size: int, options: dict | None = None, *,
                 backing: str | None = None, backing_format: str | None = None) -> None:
        opts = dict(options or {})
        backing = backing or opts.get("backing_file")
        backing_format = backing_format or opts.get("backing_fmt")
        super().__init__(path, size, opts, backing=backing, backing_format=backing_format)
        o = self.options
        where = str(self.path)
        cs_ = int(o["cluster_size"])
        if cs_ & (cs_ - 1) or not 1 << S.MIN_CLUSTER_BITS <= cs_ <= 1 << S.MAX_CLUSTER_BITS:
            raise ConvertError("Cluster size must be a power of two between 512 and 2048k",
                               path=where)
        bits = int(o["refcount_bits"])
        if bits not in (1, 2, 4, 8, 16, 32, 64):
            raise ConvertError("Refcount width must be a power of two and may not exceed "
                               "64 bits", path=where)
        self.version = 2 if o["compat"] in ("0.10", "v2") else 3
        if self.version == 2:
            for bad, what in ((o["lazy_refcounts"], "Lazy refcounts"),
                              (o["extended_l2"], "Extended L2 entries"),
                              (o["compression_type"] != "zlib", "Compression type other than zlib"),
                              (bits != 16, "Different refcount widths than 16 bits")):
                if bad:
                    raise ConvertError(f"{what} require{'s' if 'type' in what else ''} "
                                       "compatibility level 1.1 or above (use compat=1.1 "
                                       "or greater)", path=where)
        if o["extended_l2"] and cs_ < 16384:
            raise ConvertError("Extended L2 entries are only supported with cluster sizes "
                               "of at least 16384 bytes", path=where)
        if self.backing and o["preallocation"] != "off":
            raise ConvertError("Backing file and preallocation can only be used at the same "
                               "time if extended_l2 is on" if not o["extended_l2"] else
                               "preallocation with a backing file is not supported",
                               path=where)
        if self.size < 0 or self.size > 1 << 56:
            raise ConvertError(f"invalid image size {self.size}", path=where)
        self.cluster_size = self.unit = cs_
        self.cluster_bits = cs_.bit_length() - 1
        self.refcount_order = bits.bit_length() - 1
        self.extended = bool(o["extended_l2"])
        self.l2_entries = cs_ // (16 if self.extended else 8)
        self.n_clusters = -(-self.size // cs_)
        self.l1_size = -(-self.n_clusters // self.l2_entries)
        if self.l1_size * 8 > S.MAX_L1_BYTES:
            raise ConvertError("Image size too large for this cluster size", path=where)
        self.compression = o["compression_type"]
        self.prealloc = o["preallocation"]
        self._l2: dict[int, np.ndarray] = {}        # L1 index -> L2 entries (uint64)
        self._bitmap: dict[int, np.ndarray] = {}    # L1 index -> subcluster bitmaps
        self.data_start = cs_
        self.next_free = cs_                 # next free host cluster
        self._c_ptr = self._c_end = 0        # byte pointer into clusters holding compressed data
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        if self.prealloc != "off":
            self._preallocate()

    # ---- mapping ----------------------------------------------------------------------
    def _tables(self, l1_index: int) -> tuple[np.ndarray, np.ndarray | None]:
        t = self._l2.get(l1_index)
        if t is None:
            t = self._l2[l1_index] = np.zeros(self.l2_entries, np.uint64)
            if self.extended:
                self._bitmap[l1_index] = np.zeros(self.l2_entries, np.uint64)
        return t, self._bitmap.get(l1_index)

    def _map(self, first: int, entries: np.ndarray, bitmap: int) -> None:
        """Set L2 entries of guest clusters first.. (one numpy slice per L2 table)."""
        done, n = 0, entries.size
        while done < n:
            cluster = first + done
            l1, i = divmod(cluster, self.l2_entries)
            k = min(n - done, self.l2_entries - i)
            table, bm = self._tables(l1)
            table[i:i + k] = entries[done:done + k]
            if bm is not None:
                bm[i:i + k] = bitmap
            done += k

    def _preallocate(self) -> None:
        cs_ = self.cluster_size
        area = self.n_clusters * cs_
        hosts = self.data_start + np.arange(self.n_clusters, dtype=np.uint64) * np.uint64(cs_)
        self._map(0, hosts | np.uint64(S.OFLAG_COPIED), 0xFFFFFFFF)
        self.next_free = self.data_start + area
        if self.prealloc in ("falloc", "full") and area:
            try:
                os.posix_fallocate(self._fd, self.data_start, area)
            except OSError as exc:
                raise ConvertError(f"cannot preallocate {area} bytes: {exc}",
                                   path=str(self.path)) from None

    # ---- data -------------------------------------------------------------------------
    def write(self, guest_offset: int, data) -> None:
        cs_ = self.cluster_size
        n = memoryview(data).nbytes
        count = -(-n // cs_)
        if self.prealloc != "off":
            host = self.data_start + guest_offset
        else:
            host = self.next_free
            self.next_free += count * cs_
        if self.sparse_writes and self.prealloc in ("off", "metadata"):
            write_nonzero(self._fd, data, host)
        else:
            pwrite_all(self._fd, data, host)
        if self.prealloc != "off":
            return
        hosts = host + np.arange(count, dtype=np.uint64) * np.uint64(cs_)
        self._map(guest_offset // cs_, hosts | np.uint64(S.OFLAG_COPIED), 0xFFFFFFFF)

    def write_zeros(self, guest_offset: int, length: int) -> None:
        cs_ = self.cluster_size
        first = guest_offset // cs_
        count = -(-(guest_offset + length) // cs_) - first
        if self.version == 2:          # no zero flag: real zero clusters
            zero = bytes(min(count, 64) * cs_)
            for k in range(0, count, 64):
                off = (first + k) * cs_
                n = min(64 * cs_, self.size - off)
                self.write(off, memoryview(zero)[:n])
            return
        if self.extended:
            self._map(first, np.zeros(count, np.uint64), 0xFFFFFFFF << 32)
        else:
            self._map(first, np.full(count, S.OFLAG_ZERO, np.uint64), 0)

    def compress_unit(self, data) -> tuple[bool, bytes]:
        """(True, compressed bytes) or (False, the data) when it does not get smaller."""
        raw = bytes(data)
        if len(raw) < self.cluster_size:        # the disk's short last cluster: pad
            raw += bytes(self.cluster_size - len(raw))
        if self.compression == "zstd":
            out = _zstd_compressor().compress(raw)
        else:
            c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
            out = c.compress(raw) + c.flush()
        if len(out) >= self.cluster_size:
            return False, bytes(data)
        return True, out

    def write_compressed(self, guest_offset: int, payload, length: int) -> None:
        compressed, blob = payload
        if not compressed:
            self.write(guest_offset, blob)
            return
        cs_ = self.cluster_size
        n = len(blob)
        if not self._c_ptr or self._c_ptr >= self._c_end:
            self._c_ptr = self._c_end = self.next_free
        while self._c_ptr + n > self._c_end:
            if self._c_end != self.next_free:        # a data cluster came in between
                self._c_ptr = self._c_end = self.next_free
                continue
            self._c_end += cs_
            self.next_free += cs_
        host = self._c_ptr
        pwrite_all(self._fd, blob, host)
        self._c_ptr += n
        sectors = ((host + n - 1) >> 9) - (host >> 9)
        entry = (S.OFLAG_COMPRESSED | (sectors << S.csize_shift(self.cluster_bits)) | host)
        self._map(guest_offset // cs_, np.array([entry], np.uint64), 0)

    # ---- end --------------------------------------------------------------------------
    def close(self) -> None:
        if self._fd < 0:
            return
        cs_ = self.cluster_size
        fd = self._fd
        data_end = _round_up(self.next_free, cs_)
        indexes = np.array(sorted(self._l2), np.int64)
        n_l2 = indexes.size
        l2_start = data_end
        meta_start = l2_start + n_l2 * cs_
        l1_clusters = -(-self.l1_size * 8 // cs_)     # 0 for an empty disk, as qemu-img

        # refcount structures cover every cluster, themselves included; the L1 table
        # comes last and the file ends right after its entries (as qemu-img's do)
        rb_entries = cs_ * 8 // (1 << self.refcount_order)
        base = meta_start // cs_ + l1_clusters
        n_rb, rt_clusters = 1, 1
        while True:
            total = base + rt_clusters + n_rb
            need_rb = -(-total // rb_entries)
            need_rt = -(-need_rb * 8 // cs_)
            if (need_rb, need_rt) == (n_rb, rt_clusters):
                break
            n_rb, rt_clusters = max(n_rb, need_rb), max(rt_clusters, need_rt)
        rt_start = meta_start
        rb_start = rt_start + rt_clusters * cs_
        l1_start = rb_start + n_rb * cs_
        total = base + rt_clusters + n_rb

        refs = np.zeros(n_rb * rb_entries, np.uint64)
        refs[0] = 1                                          # header
        refs[l2_start // cs_:total] = 1                      # L2, L1, refcount structures
        if n_l2:
            entries = np.concatenate([self._l2[int(i)] for i in indexes])
            compressed = (entries & np.uint64(S.OFLAG_COMPRESSED)) != 0
            plain = entries[~compressed] & np.uint64(S.L2E_OFFSET_MASK)
            plain = plain[plain != 0]
            refs[(plain // np.uint64(cs_)).astype(np.int64)] += np.uint64(1)
            if compressed.any():
                shift = S.csize_shift(self.cluster_bits)
                desc = entries[compressed]
                off = desc & np.uint64((1 << shift) - 1)
                sectors = (desc >> np.uint64(shift)) & np.uint64((1 << (62 - shift)) - 1)
                end = (off & ~np.uint64(511)) + (sectors + np.uint64(1)) * np.uint64(512)
                first = (off // np.uint64(cs_)).astype(np.int64)
                last = ((end - np.uint64(1)) // np.uint64(cs_)).astype(np.int64)
                np.add.at(refs, first, 1)
                more = last != first
                np.add.at(refs, last[more], 1)
        if refs.max(initial=0) >= 1 << (1 << self.refcount_order):
            raise ConvertError(f"refcount_bits={1 << self.refcount_order} is too narrow for "
                               "the shared clusters of compressed data", path=str(self.path))

        # tables
        copied = np.uint64(S.OFLAG_COPIED)
        for k, i in enumerate(indexes):
            table = self._l2[int(i)]
            if self.extended:
                rows = np.empty(self.l2_entries, S.EXTENDED_L2_DTYPE)
                rows["entry"], rows["bitmap"] = table, self._bitmap[int(i)]
                blob = S.l2_table(self.l2_entries, True).build(rows)
            else:
                blob = S.l2_table(self.l2_entries, False).build(table)
            pwrite_all(fd, blob, l2_start + k * cs_)
        reftable = np.zeros(rt_clusters * cs_ // 8, np.uint64)
        reftable[:n_rb] = rb_start + np.arange(n_rb, dtype=np.uint64) * np.uint64(cs_)
        # only the used part of the refcount table and blocks is written: the rest stays
        # a hole (zeros), the L1 table after them keeps the file long enough
        pwrite_all(fd, S.u64_table(n_rb).build(reftable[:n_rb]), rt_start)
        used = _round_up(total, 8 >> min(self.refcount_order, 3)) if self.refcount_order < 3 else total
        pwrite_all(fd, S.encode_refcounts(refs[:used], self.refcount_order), rb_start)
        l1 = np.zeros(self.l1_size, np.uint64)
        if n_l2:
            l1[indexes] = (l2_start + np.arange(n_l2, dtype=np.uint64) * np.uint64(cs_)) | copied
        if l1.size:
            pwrite_all(fd, S.u64_table(l1.size).build(l1), l1_start)
        else:                           # an empty disk: the file ends after the refcounts
            os.ftruncate(fd, l1_start)

        # header last: the image is valid only once everything it points at is there
        o = self.options
        values = {"version": self.version, "cluster_bits": self.cluster_bits,
                  "size": self.size, "crypt_method": 0, "l1_size": self.l1_size,
                  "l1_table_offset": l1_start, "refcount_table_offset": rt_start,
                  "refcount_table_clusters": rt_clusters, "nb_snapshots": 0,
                  "snapshots_offset": 0,
                  "incompatible_features": ((S.INCOMPAT_COMPRESSION if self.compression == "zstd" else 0)
                                            | (S.INCOMPAT_EXTL2 if self.extended else 0)),
                  "compatible_features": S.COMPAT_LAZY if o["lazy_refcounts"] else 0,
                  "autoclear_features": 0, "refcount_order": self.refcount_order,
                  "compression_type": 1 if self.compression == "zstd" else 0}
        header = S.build_header(values, backing_format=self.backing_format,
                                backing_name=self.backing)
        if len(header) > cs_ or cs_ == 512:     # qemu-img drops the table at 512 bytes
            header = S.build_header(values, backing_format=self.backing_format,
                                    backing_name=self.backing, feature_table=False)
        if len(header) > cs_:
            raise ConvertError("the backing file name does not fit in the header cluster",
                               path=str(self.path))
        pwrite_all(fd, header, 0)
        self._fd = -1
        os.close(fd)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().abort()
