"""VHDX writer: dynamic and fixed disks with qemu-img's structures and defaults.

Layout: the file identifier, two headers (sequence numbers 1 and 2, CRC-32C), two
identical region tables, an empty log (all zeros, log GUID zero: nothing to
replay) at 1 MiB, the BAT, the metadata region (five items at 64 KiB with QEMU's
flags), then payload blocks, 1 MiB aligned.  Dynamic disks append a block the
first time guest data lands in it, in guest order; fixed disks own every block
at data_start + i * block_size (a sparse file: only data is written).  Blocks
that never got data are ZERO with ``block_state_zero`` (QEMU's default),
otherwise NOT_PRESENT (dynamic) or FULLY_PRESENT over their reserved zeros
(fixed).  Sector-bitmap entries stay SB_BLOCK_NOT_PRESENT (no parent).
Differences from qemu-img's files, all valid VHDX: payload starts right after
the metadata region (QEMU leaves 4 MiB more), the BAT region is written only as
far as its entries (QEMU writes all of it), and written blocks of a fixed disk
stay in place (QEMU with block_state_zero appends them after the reserved area).
"""
from __future__ import annotations

import os
import uuid

import numpy as np

from ... import __version__
from ...errors import ConvertError
from ...schemas import vhdx as X
from ..base import ImageWriter, Option
from ..base import pwrite_all

MiB = X.MiB
LOGICAL_SECTOR = 512
PHYSICAL_SECTOR = 512


def _round_up(value: int, align: int) -> int:
    return -(-int(value) // align) * align


def _with_checksum(struct, values: dict, size: int) -> bytes:
    """Build `struct`, padded to `size`, with its CRC-32C in the field at offset 4."""
    values = dict(values, checksum=0)
    raw = struct.build(values).ljust(size, b"\0")
    values["checksum"] = X.checksum(raw)
    return struct.build(values).ljust(size, b"\0")


class VhdxWriter(ImageWriter):
    """Writes a VHDX image (see the module docstring)."""

    format = "vhdx"
    accepts_runs = True               # write() takes runs of whole units
    sparse_unit_adjustable = True     # the unit is only the zero-test granule (-S)
    OPTIONS = {
        "subformat": Option("subformat", "choice", "dynamic",
                            "VHDX format type, can be either 'dynamic' or 'fixed'. "
                            "Default is 'dynamic'.", ("dynamic", "fixed")),
        "block_size": Option("block_size", "size", 0,
                             "Block Size; min 1MB, max 256MB. 0 means auto-calculate based "
                             "on image size."),
        "log_size": Option("log_size", "size", X.DEFAULT_LOG_SIZE, "Log size; min 1MB."),
        "block_state_zero": Option("block_state_zero", "bool", True,
                                   "Force use of payload blocks of type 'ZERO'."),
    }

    def __init__(self, path, size, options=None, **kw) -> None:
        super().__init__(path, size, options, **kw)
        self.fixed = self.options["subformat"] == "fixed"
        self.virtual_size = _round_up(self.size, LOGICAL_SECTOR)
        if self.virtual_size > X.MAX_IMAGE_SIZE:
            raise ConvertError("vhdx: image size too large; max of 64TB", path=str(path))
        bs = int(self.options["block_size"]) or X.qemu_default_block_size(self.virtual_size)
        if bs < X.BLOCK_SIZE_MIN or bs > X.BLOCK_SIZE_MAX or bs & (bs - 1):
            raise ConvertError("vhdx: block size must be a power of two between 1 MB and "
                               f"256 MB, not {bs}", path=str(path))
        log = int(self.options["log_size"])
        if log < MiB or log % MiB or log > 0xFFFFFFFF - MiB + 1:
            raise ConvertError(f"vhdx: log size must be a multiple of 1 MB, not {log}",
                               path=str(path))
        self.block_size, self.log_size = bs, log
        self.zero_state = bool(self.options["block_state_zero"])
        self.unit = 4096
        self.blocks = X.data_blocks(self.virtual_size, bs)
        self.ratio = X.chunk_ratio(bs, LOGICAL_SECTOR)
        self.entries = X.bat_entries(self.virtual_size, bs, LOGICAL_SECTOR, False)
        self.log_offset = X.HEADER_SECTION_END
        self.bat_offset = _round_up(self.log_offset + log, MiB)
        # the region holds as many entries as QEMU computes (u32 arithmetic: an empty
        # disk wraps to 8 Mi entries, which QEMU then requires to fit the region)
        qemu_entries = X.qemu_bat_entries(self.virtual_size, bs, LOGICAL_SECTOR, False)
        self.bat_length = max(MiB, _round_up(max(self.entries, qemu_entries) * 8, MiB))
        self.metadata_offset = self.bat_offset + self.bat_length
        self.data_start = self.metadata_offset + MiB
        # host offset of each payload block; 0 = never written
        self.block_offset = np.zeros(self.blocks, np.uint64)
        self.next_free = self.data_start
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

    # ---- data --------------------------------------------------------------------------
    def write(self, guest_offset: int, data) -> None:
        view = memoryview(data).cast("B")
        if guest_offset + len(view) > self.virtual_size:
            raise ConvertError(f"vhdx: write beyond the disk end at {guest_offset}",
                               path=str(self.path))
        pos = 0
        while pos < len(view):            # one pass per block touched
            block, inside = divmod(guest_offset + pos, self.block_size)
            piece = view[pos:pos + self.block_size - inside]
            pos += len(piece)
            host = int(self.block_offset[block])
            if not host:
                if self.fixed:
                    host = self.data_start + block * self.block_size
                else:
                    host, self.next_free = self.next_free, self.next_free + self.block_size
                self.block_offset[block] = host
            pwrite_all(self.fd, piece, host + inside)

    # ---- structures --------------------------------------------------------------------
    def _bat(self) -> np.ndarray:
        """BAT entries: payload blocks at block + block // chunk_ratio, bitmap slots 0."""
        written = self.block_offset != 0
        if self.fixed:     # every block owns its place; idle ones are ZERO over it or plain
            offsets = self.data_start + np.arange(self.blocks, dtype=np.uint64) * np.uint64(self.block_size)
            present = written | (not self.zero_state)
        else:
            offsets, present = self.block_offset, written
        idle = X.PAYLOAD_BLOCK_ZERO if self.zero_state else X.PAYLOAD_BLOCK_NOT_PRESENT
        payload = np.where(present,
                           (offsets & np.uint64(X.BAT_FILE_OFFSET_MASK))
                           | np.uint64(X.PAYLOAD_BLOCK_FULLY_PRESENT),
                           np.uint64(idle))
        bat = np.zeros(self.entries, X.BAT_DTYPE)
        bat[X.bat_index_of_block(np.arange(self.blocks, dtype=np.int64), self.ratio)] = payload
        return bat

    def _metadata(self) -> bytes:
        items = [
            (X.FILE_PARAMETERS_GUID, X.QEMU_FILE_PARAMETERS_FLAGS, X.file_parameters.build(dict(
                block_size=self.block_size,
                data_bits=X.PARAMS_LEAVE_BLOCKS_ALLOCATED if self.fixed else 0))),
            (X.VIRTUAL_DISK_SIZE_GUID, X.QEMU_DISK_ITEM_FLAGS,
             X.virtual_disk_size.build(dict(virtual_disk_size=self.virtual_size))),
            (X.PAGE83_GUID, X.QEMU_DISK_ITEM_FLAGS,
             X.page83_data.build(dict(page_83_data=str(uuid.uuid4())))),
            (X.LOGICAL_SECTOR_SIZE_GUID, X.QEMU_DISK_ITEM_FLAGS,
             X.logical_sector_size.build(dict(logical_sector_size=LOGICAL_SECTOR))),
            (X.PHYSICAL_SECTOR_SIZE_GUID, X.QEMU_DISK_ITEM_FLAGS,
             X.physical_sector_size.build(dict(physical_sector_size=PHYSICAL_SECTOR))),
        ]
        entries = np.zeros(len(items), X.METADATA_ENTRY_DTYPE)
        payload, offset = b"", X.METADATA_ITEMS_OFFSET
        for i, (guid, flag, data) in enumerate(items):      # five records
            entries[i] = (X.guid_bytes(guid), offset, len(data), flag, 0)
            payload += data
            offset += len(data)
        table = X.metadata_table_header.build(dict(
            signature=X.METADATA_SIGNATURE, reserved=0, entry_count=len(items),
            reserved2=bytes(20))) + X.metadata_entries(len(items)).build(entries)
        return table.ljust(X.METADATA_ITEMS_OFFSET, b"\0") + payload

    def _region_table(self) -> bytes:
        entries = np.zeros(2, X.REGION_ENTRY_DTYPE)
        entries[0] = (X.guid_bytes(X.BAT_GUID), self.bat_offset, self.bat_length,
                      X.QEMU_REGION_FLAGS)
        entries[1] = (X.guid_bytes(X.METADATA_GUID), self.metadata_offset, MiB,
                      X.QEMU_REGION_FLAGS)
        body = X.region_entries(2).build(entries)
        values = dict(signature=X.REGION_SIGNATURE, checksum=0, entry_count=2, reserved=0)
        raw = (X.region_table_header.build(values) + body).ljust(X.REGION_TABLE_SIZE, b"\0")
        values["checksum"] = X.checksum(raw)
        return (X.region_table_header.build(values) + body).ljust(X.REGION_TABLE_SIZE, b"\0")

    def _header(self, sequence: int, file_guid: str, data_guid: str) -> bytes:
        return _with_checksum(X.header, dict(
            signature=X.HEADER_SIGNATURE, sequence_number=sequence,
            file_write_guid=file_guid, data_write_guid=data_guid, log_guid=X.NULL_GUID,
            log_version=0, version=1, log_length=self.log_size, log_offset=self.log_offset,
            reserved=bytes(4016)), X.HEADER_SIZE)

    def close(self) -> None:
        try:
            if self.fixed:
                end = self.data_start + self.virtual_size
            else:
                end = self.next_free
            os.ftruncate(self.fd, end)
            ident = X.file_identifier.build(dict(signature=X.FILE_SIGNATURE,
                                                 creator=f"imgscope {__version__}"))
            file_guid, data_guid = str(uuid.uuid4()), str(uuid.uuid4())
            region = self._region_table()
            pwrite_all(self.fd, ident, X.FILE_ID_OFFSET)
            pwrite_all(self.fd, self._header(1, file_guid, data_guid), X.HEADER1_OFFSET)
            pwrite_all(self.fd, self._header(2, file_guid, data_guid), X.HEADER2_OFFSET)
            pwrite_all(self.fd, region, X.REGION_TABLE1_OFFSET)
            pwrite_all(self.fd, region, X.REGION_TABLE2_OFFSET)
            pwrite_all(self.fd, X.bat_table(self.entries).build(self._bat()), self.bat_offset)
            pwrite_all(self.fd, self._metadata(), self.metadata_offset)
        finally:
            self._close_fd()
