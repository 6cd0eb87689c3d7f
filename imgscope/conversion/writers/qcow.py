"""QCOW version 1 writer, laid out as ``qemu-img convert -O qcow`` does.

Layout: the 48-byte header, the backing file name, the L1 table (8-byte aligned,
padded to a sector), then L2 tables and clusters appended in guest order: an L2
table is placed (cluster aligned) when the first cluster of its range arrives,
data clusters are cluster aligned, compressed clusters sector aligned right
after the previous one.  Only the current L2 table is kept in memory; the L1
table (8 bytes per L2 range) and the header are written at close.  4 KiB
clusters and 4 KiB L2 tables, or with a backing file 512-byte clusters and
32 KiB L2 tables, as qemu-img.  Compression: raw deflate (window 2^12, memory
level 9, QEMU's parameters), one cluster per stream; a cluster that does not
shrink is stored plain.
"""
from __future__ import annotations

import os
import zlib

import numpy as np

from ...errors import ConvertError
from ...schemas import qcow as Q
from ..base import ImageWriter, Option
from ..base import pwrite_all

SECTOR = 512
DEFLATE_WINDOW_BITS = -12      # raw deflate, 4 KiB window (QEMU's deflateInit2)
DEFLATE_MEM_LEVEL = 9


def _round_up(value: int, align: int) -> int:
    return -(-int(value) // align) * align


class QcowWriter(ImageWriter):
    """Writes a QCOW v1 image (see the module docstring)."""

    format = "qcow"
    supports_backing = True
    supports_compression = True
    accepts_runs = True               # write() takes runs of whole clusters
    OPTIONS = {
        "backing_file": Option("backing_file", "str", None, "File name of a base image"),
        "backing_fmt": Option("backing_fmt", "str", None, "Format of the backing image"),
    }

    def __init__(self, path, size, options=None, *, backing=None, backing_format=None) -> None:
        opts = dict(options or {})
        backing = backing or opts.get("backing_file")
        backing_format = backing_format or opts.get("backing_fmt")
        super().__init__(path, size, opts, backing=backing, backing_format=backing_format)
        self.virtual_size = _round_up(self.size, SECTOR)
        if self.virtual_size == 0:
            raise ConvertError("qcow: image size is too small, cannot be zero length",
                               path=str(path))
        name = os.fsencode(backing) if backing else b""
        if len(name) > Q.MAX_BACKING_NAME:
            raise ConvertError("qcow: backing file name too long", path=str(path))
        self.backing_name = name
        self.cluster_bits, self.l2_bits = Q.DEFAULT_BACKING_BITS if name else Q.DEFAULT_BITS
        self.cluster_size = 1 << self.cluster_bits
        self.unit = self.cluster_size
        self.l2_entries = 1 << self.l2_bits
        self.l2_bytes = 8 * self.l2_entries
        self.range_bytes = self.cluster_size * self.l2_entries     # guest bytes per L2 table
        n = Q.l1_entries(self.virtual_size, self.cluster_bits, self.l2_bits)
        if n > Q.MAX_L1_ENTRIES:
            raise ConvertError("qcow: image too large", path=str(path))
        self.l1 = np.zeros(n, Q.TABLE_DTYPE)
        self.l1_offset = _round_up(Q.HEADER_SIZE + len(name), 8)
        self.l1_bytes = _round_up(8 * n, SECTOR)
        self.eof = self.l1_offset + self.l1_bytes       # end of everything placed so far
        self.l2 = np.zeros(self.l2_entries, Q.TABLE_DTYPE)
        self.l2_index = -1                               # L1 index of the L2 table in memory
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

    # ---- L2 tables -------------------------------------------------------------------------
    def _table_for(self, guest_offset: int) -> None:
        """Make the L2 table covering `guest_offset` the current one (placing it if new)."""
        index = guest_offset // self.range_bytes
        if index == self.l2_index:
            return
        self._flush_table()
        self.l2_index = index
        self.l2[:] = 0
        offset = _round_up(self.eof, self.cluster_size)
        self.l1[index] = offset
        self.eof = offset + self.l2_bytes

    def _flush_table(self) -> None:
        if self.l2_index >= 0:
            pwrite_all(self.fd, Q.u64_table(self.l2_entries).build(self.l2),
                       int(self.l1[self.l2_index]))

    # ---- data ------------------------------------------------------------------------------
    def _check_range(self, guest_offset: int, length: int) -> None:
        if guest_offset % self.cluster_size or guest_offset + length > self.virtual_size:
            raise ConvertError(f"qcow: bad write at {guest_offset} (+{length})",
                               path=str(self.path))

    def write(self, guest_offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self._check_range(guest_offset, len(view))
        pos = 0
        while pos < len(view):            # one pass per L2 table touched
            off = guest_offset + pos
            piece = view[pos:pos + self.range_bytes - off % self.range_bytes]
            pos += len(piece)
            self._table_for(off)
            host = _round_up(self.eof, self.cluster_size)
            count = -(-len(piece) // self.cluster_size)
            first = (off % self.range_bytes) // self.cluster_size
            self.l2[first:first + count] = host + np.arange(count, dtype=np.uint64) * np.uint64(self.cluster_size)
            pwrite_all(self.fd, piece, host)
            self.eof = host + count * self.cluster_size

    def write_zeros(self, guest_offset: int, length: int) -> None:
        """qcow has no zero clusters: over a backing file zeros are stored as data."""
        chunk = bytes(min(length, 1 << 20) // self.cluster_size * self.cluster_size
                      or self.cluster_size)
        end = min(guest_offset + length, self.virtual_size)
        pos = guest_offset - guest_offset % self.cluster_size
        while pos < end:
            n = min(len(chunk), end - pos)
            self.write(pos, chunk[:n])
            pos += n

    def compress_unit(self, data) -> bytes:
        """Raw deflate of one cluster (zero padded); the plain cluster if it does not shrink."""
        buf = bytes(data).ljust(self.cluster_size, b"\0")
        comp = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED,
                                DEFLATE_WINDOW_BITS, DEFLATE_MEM_LEVEL)
        out = comp.compress(buf) + comp.flush()
        return buf if len(out) >= self.cluster_size else out

    def write_compressed(self, guest_offset: int, payload: bytes, length: int) -> None:
        self._check_range(guest_offset, length)
        if len(payload) >= self.cluster_size:
            self.write(guest_offset, memoryview(payload)[:length])
            return
        self._table_for(guest_offset)
        host = _round_up(self.eof, SECTOR)
        index = (guest_offset % self.range_bytes) // self.cluster_size
        self.l2[index] = Q.compressed_entry(host, len(payload), self.cluster_bits)
        pwrite_all(self.fd, payload, host)
        self.eof = host + len(payload)

    # ---- end ---------------------------------------------------------------------------------
    def close(self) -> None:
        try:
            self._flush_table()
            name = self.backing_name
            header = Q.header.build(dict(
                version=Q.VERSION, backing_file_offset=Q.HEADER_SIZE if name else 0,
                backing_file_size=len(name), mtime=0, size=self.virtual_size,
                cluster_bits=self.cluster_bits, l2_bits=self.l2_bits, padding=0,
                crypt_method=Q.CRYPT_NONE, l1_table_offset=self.l1_offset))
            l1 = Q.u64_table(self.l1.size).build(self.l1)
            head = (header + name).ljust(self.l1_offset, b"\0") + l1.ljust(self.l1_bytes, b"\0")
            pwrite_all(self.fd, head, 0)
            os.ftruncate(self.fd, max(self.eof, os.fstat(self.fd).st_size))
        finally:
            self._close_fd()
