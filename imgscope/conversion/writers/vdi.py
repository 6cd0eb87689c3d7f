"""VDI writer: dynamic (blocks allocated in write order) and static (every block preallocated).

Layout as qemu-img 7.2 writes it: pre-header and v1.1 header in sector 0, the
block map at 0x200 (whole sectors), data blocks of 1 MiB from ``offset_data``.
A static image maps block k to data block k and is truncated to its full size,
so unwritten blocks stay holes in the host file (qemu-img's output is sparse too).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

from ...errors import ConvertError
from ...schemas import vdi as S
from ..base import ImageWriter, Option
from ..zeros import write_nonzero


class VdiWriter(ImageWriter):
    format = "vdi"
    OPTIONS = {"static": Option("static", "bool", False, "VDI static (pre-allocated) image")}

    def __init__(self, path: Path, size: int, options: dict | None = None, **kw) -> None:
        super().__init__(path, size, options, **kw)
        self.static = bool(self.options["static"])
        self.wants_zero_units = self.static
        self.accepts_runs = True          # runs of blocks: one pwrite each
        self.unit = S.DEFAULT_BLOCK_SIZE
        self.layout = S.qemu_layout(self.size)
        blocks = self.layout["blocks_in_image"]
        if blocks > S.QEMU_BLOCKS_MAX:
            raise ConvertError(f"vdi: a disk of {self.size} bytes needs {blocks} blocks, more "
                               f"than the {S.QEMU_BLOCKS_MAX} a VDI image can hold", path=str(path))
        if self.static:
            self.bmap = np.arange(blocks, dtype=S.MAP_DTYPE)
            self.allocated = blocks
        else:
            self.bmap = np.full(blocks, S.BLOCK_FREE, S.MAP_DTYPE)
            self.allocated = 0
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def _block_offset(self, index: int) -> int:
        return self.layout["offset_data"] + index * self.unit

    def write(self, guest_offset: int, data) -> None:
        """A run of whole blocks (the disk's last may be short), stored contiguously."""
        n = -(-len(data) // self.unit)
        k = guest_offset // self.unit
        if guest_offset % self.unit or not 0 < n <= len(self.bmap) - k or k < 0:
            raise ConvertError(f"vdi: {len(data)} bytes at {guest_offset:#x} are not whole "
                               "blocks of the disk", path=str(self.path))
        if self.static:
            # zero pieces stay holes of the truncated file, as qemu-img leaves them
            write_nonzero(self.fd, data, self._block_offset(k))
            return
        if (self.bmap[k:k + n] != S.BLOCK_FREE).any():
            raise ConvertError(f"vdi: block {k} written twice", path=str(self.path))
        self.bmap[k:k + n] = self.allocated + np.arange(n, dtype=np.uint32)
        os.pwrite(self.fd, data, self._block_offset(self.allocated))
        self.allocated += n

    def close(self) -> None:
        lay, blocks = self.layout, self.layout["blocks_in_image"]
        pre = S.pre_header.build({"text": S.QEMU_BANNER.decode(), "signature": S.SIGNATURE,
                                  "version": S.VERSION_1_1})
        header = S.header_v1.build(S.header_v1_values(
            lay["disk_size"], blocks, self.allocated,
            image_type=S.TYPE_FIXED if self.static else S.TYPE_NORMAL,
            offset_bmap=lay["offset_bmap"], offset_data=lay["offset_data"],
            uuid_image=str(uuid.uuid4()), uuid_last_snap=str(uuid.uuid4())))
        bmap = S.block_map(blocks).build(self.bmap)
        os.pwrite(self.fd, (pre + header).ljust(S.HEADER_AREA, b"\0"), 0)
        os.pwrite(self.fd, bmap.ljust(lay["offset_data"] - lay["offset_bmap"], b"\0"),
                  lay["offset_bmap"])
        # whole blocks (a short last unit, static holes): the file ends after the last block
        os.ftruncate(self.fd, self._block_offset(self.allocated))
        os.close(self.fd)
        self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().abort()
