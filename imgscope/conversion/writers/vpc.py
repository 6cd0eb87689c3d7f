"""VHD writer (QEMU's ``vpc``): dynamic and fixed disks, as ``qemu-img convert -O vpc``.

Dynamic layout (QEMU's): footer copy at 0, dynamic header at 512, the BAT at
1536 padded to a sector with 0xFF, then 2 MiB blocks (a 512-byte sector bitmap,
all ones, and the data) appended in guest order, the footer after the last one.
Fixed layout: the guest bytes (a sparse file: only data is written) and the
footer.  Without ``force_size`` the size grows to the next CHS geometry, exactly
as qemu-img does, so ``qemu-img info`` shows the same virtual size; with it the
size is kept, the geometry is the maximum one and the creator is 'qem2'.
"""
from __future__ import annotations

import os
import time
import uuid

import numpy as np

from ...errors import ConvertError
from ...schemas import vhd as V
from ..base import ImageWriter, Option, pwrite_all


class VpcWriter(ImageWriter):
    """Writes a VHD image (see the module docstring)."""

    format = "vpc"
    accepts_runs = True               # write() takes runs of whole units
    sparse_unit_adjustable = True     # the unit is only the zero-test granule (-S)
    OPTIONS = {
        "subformat": Option("subformat", "choice", "dynamic",
                            "Type of virtual hard disk format. Supported formats are "
                            "{dynamic (default) | fixed}", ("dynamic", "fixed")),
        "force_size": Option("force_size", "bool", False,
                             "Force disk size calculation to use the actual size specified, "
                             "rather than using the nearest CHS-based calculation"),
    }

    def __init__(self, path, size, options=None, **kw) -> None:
        super().__init__(path, size, options, **kw)
        self.fixed = self.options["subformat"] == "fixed"
        force = bool(self.options["force_size"])
        sectors, self.geometry = V.qemu_create_geometry(self.size, force)
        if sectors > V.VHD_MAX_SECTORS:
            raise ConvertError("vpc: disk size is too large, max size is 2040 GiB",
                               path=str(path))
        self.virtual_size = sectors * V.SECTOR
        self.creator = V.QEMU_FORCE_SIZE_CREATOR if force else V.QEMU_CREATOR
        self.block_size = V.DEFAULT_BLOCK_SIZE
        self.unit = 4096
        self.bitmap_size = V.bitmap_bytes(self.block_size)
        self.entries = -(-self.virtual_size // self.block_size)
        self.bat = np.full(self.entries, V.BAT_UNUSED, V.BAT_DTYPE)
        self.bat_offset = V.FOOTER_SIZE + V.HEADER_SIZE
        self.bat_bytes = -(-self.entries * 4 // V.SECTOR) * V.SECTOR
        self.next_free = self.bat_offset + self.bat_bytes     # where the next block goes
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

    # ---- data --------------------------------------------------------------------------
    def write(self, guest_offset: int, data) -> None:
        view = memoryview(data).cast("B")
        if guest_offset + len(view) > self.virtual_size:
            raise ConvertError(f"vpc: write beyond the disk end at {guest_offset}",
                               path=str(self.path))
        if self.fixed:
            pwrite_all(self.fd, view, guest_offset)
            return
        pos = 0
        while pos < len(view):            # one pass per block touched
            off = guest_offset + pos
            block, inside = divmod(off, self.block_size)
            piece = view[pos:pos + self.block_size - inside]
            pos += len(piece)
            if self.bat[block] == V.BAT_UNUSED:
                self.bat[block] = self.next_free // V.SECTOR
                pwrite_all(self.fd, b"\xff" * self.bitmap_size, self.next_free)
                self.next_free += self.bitmap_size + self.block_size
            pwrite_all(self.fd, piece,
                       int(self.bat[block]) * V.SECTOR + self.bitmap_size + inside)

    # ---- end ---------------------------------------------------------------------------
    def _footer(self) -> bytes:
        c, h, s = self.geometry
        values = dict(
            cookie=V.FOOTER_COOKIE, features=V.FEATURES_RESERVED,
            fileFormatVersion=V.VERSION_1_0,
            dataOffset=V.NO_DATA_OFFSET if self.fixed else V.FOOTER_SIZE,
            timeStamp=max(0, int(time.time()) - V.TIMESTAMP_EPOCH) & 0xFFFFFFFF,
            creatorApplication=self.creator, creatorVersion=V.QEMU_CREATOR_VERSION,
            creatorHostOS=V.QEMU_CREATOR_OS, originalSize=self.virtual_size,
            currentSize=self.virtual_size, cylinders=c, heads=h, sectorsPerTrack=s,
            diskType=V.DISK_FIXED if self.fixed else V.DISK_DYNAMIC, checksum=0,
            uniqueId=uuid.uuid4().bytes, savedState=0, reserved=bytes(427))
        raw = V.footer.build(values)
        values["checksum"] = V.checksum(raw, 64)
        return V.footer.build(values)

    def _dynamic_header(self) -> bytes:
        values = dict(
            cookie=V.HEADER_COOKIE, dataOffset=V.NO_DATA_OFFSET, tableOffset=self.bat_offset,
            headerVersion=V.VERSION_1_0, maxTableEntries=self.entries,
            blockSize=self.block_size, checksum=0, parentUniqueId=bytes(16),
            parentTimeStamp=0, reserved1=0, parentUnicodeName=bytes(512),
            parentLocators=bytes(V.N_PARENT_LOCATORS * V.PARENT_LOCATOR_SIZE),
            reserved2=bytes(256))
        raw = V.dynamic_header.build(values)
        values["checksum"] = V.checksum(raw, 36)
        return V.dynamic_header.build(values)

    def close(self) -> None:
        try:
            footer = self._footer()
            if self.fixed:
                os.ftruncate(self.fd, self.virtual_size)
                pwrite_all(self.fd, footer, self.virtual_size)
            else:
                bat = V.bat_table(self.entries).build(self.bat)
                bat += b"\xff" * (self.bat_bytes - len(bat))
                pwrite_all(self.fd, footer + self._dynamic_header() + bat, 0)
                pwrite_all(self.fd, footer, self.next_free)
        finally:
            self._close_fd()
