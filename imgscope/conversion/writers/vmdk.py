"""VMDK writer: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse/Flat, streamOptimized.

Sparse extents get qemu-img 7.2's layout (header, embedded descriptor area,
redundant and primary grain directories with preallocated grain tables, grains
from ``overHead`` on in write order).  streamOptimized is written in VMware's
layout, the one ESXi and OVF tools import: compressed grain records, each grain
table after its grains behind a GT marker, then the GD marker and directory, a
footer marker, the footer (a copy of the header holding the real ``gdOffset``)
and the end-of-stream marker; the header itself says ``gdOffset = GD_AT_END``.
Extent files are named as qemu-img names them (``NAME-flat.vmdk``,
``NAME-s001.vmdk``, ``NAME-f001.vmdk``) beside the descriptor.
"""
from __future__ import annotations

import bisect
import os
import random
import zlib
from pathlib import Path

import numpy as np

from ...errors import ConvertError
from ...schemas import vmdk as V
from ...schemas.vmdk_descriptor import NO_PARENT_CID, build_descriptor, qemu_ddb
from ..base import ImageWriter, Option
from ..zeros import unit_runs, write_nonzero

SECTOR = V.SECTOR
SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")
ADAPTERS = ("ide", "buslogic", "lsilogic", "legacyESX")
MAX_SECTOR = 0xFFFFFFFF             # GD/GT entries are u32 sector numbers
TABLE_CHUNK = 1 << 20               # GT entries built and written per step (4 MiB)


def _open_new(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)


class _FlatExtent:
    """A raw data file; only non-zero 4 KiB pieces are written, the rest stays a hole."""

    def __init__(self, path: Path, sectors: int) -> None:
        self.path, self.sectors = path, sectors
        self.fd = _open_new(path)

    def write(self, offset: int, data) -> None:
        write_nonzero(self.fd, data, offset)

    def write_zeros(self, offset: int, length: int) -> None:
        pass                                # a new flat file reads as zeros

    def close(self) -> None:
        os.ftruncate(self.fd, self.sectors * SECTOR)
        os.close(self.fd)
        self.fd = -1


class _SparseExtent:
    """A hosted sparse extent (KDMV) in qemu-img's layout."""

    def __init__(self, path: Path, sectors: int, *, zeroed_grain: bool,
                 descriptor: str | None = None) -> None:
        self.path, self.sectors = path, sectors
        self.grain = V.DEFAULT_GRAIN_SIZE
        self.grain_bytes = self.grain * SECTOR
        self.layout = V.qemu_sparse_layout(sectors)
        self.n_gd = self.layout["numGDEntries"]
        self.gt = np.zeros(self.n_gd * V.DEFAULT_GTES_PER_GT, V.TABLE_DTYPE)
        self.next_sector = self.layout["overHead"]
        self.zeroed_grain = zeroed_grain
        self.descriptor = descriptor
        self.fd = _open_new(path)

    def _allocate(self, grains: int) -> int:
        start = self.next_sector
        if start + grains * self.grain > MAX_SECTOR:
            raise ConvertError(f"vmdk: {self.path.name} would grow past 2 TiB, the most a "
                               "sparse extent's grain tables can address", path=str(self.path))
        self.next_sector += grains * self.grain
        return start

    def write(self, offset: int, data) -> None:
        """A run of whole grains (the disk's last may be short), stored contiguously."""
        n = -(-len(data) // self.grain_bytes)
        first = self._allocate(n)
        g = offset // self.grain_bytes
        self.gt[g:g + n] = first + np.arange(n, dtype=np.uint64) * self.grain
        os.pwrite(self.fd, data, first * SECTOR)

    def write_zeros(self, offset: int, length: int) -> None:
        g0, g1 = offset // self.grain_bytes, -(-(offset + length) // self.grain_bytes)
        if self.zeroed_grain:
            self.gt[g0:g1] = V.GTE_ZEROED
        else:                               # allocated grains left as holes read as zeros
            first = self._allocate(g1 - g0)
            self.gt[g0:g1] = first + np.arange(g1 - g0, dtype=np.uint64) * self.grain

    def _write_tables(self, gd_sector: int) -> None:
        """One directory (pointing at its own preallocated GTs) and the non-empty GTs."""
        per = V.DEFAULT_GTES_PER_GT
        gts = V.gt_sectors(per)
        first_gt = gd_sector + V.gd_sectors(self.n_gd)
        gd = first_gt + np.arange(self.n_gd, dtype=np.uint64) * gts
        os.pwrite(self.fd, V.gd_table(self.n_gd).build(gd), gd_sector * SECTOR)
        used = self.gt.reshape(self.n_gd, per).any(axis=1)
        step = max(1, TABLE_CHUNK // per)
        for a, b in unit_runs(used):
            for c in range(a, b, step):
                d = min(b, c + step)
                block = V.gt_table((d - c) * per).build(self.gt[c * per:d * per])
                os.pwrite(self.fd, block, (first_gt + c * gts) * SECTOR)

    def close(self) -> None:
        lay = self.layout
        flags = V.QEMU_SPARSE_FLAGS | (V.FLAG_ZERO_GRAIN if self.zeroed_grain else 0)
        header = V.sparse_header.build(V.sparse_header_values(
            self.sectors, version=2 if self.zeroed_grain else 1, flags=flags,
            grain_size=self.grain, descriptor_offset=1, descriptor_size=V.QEMU_DESCRIPTOR_SIZE,
            rgd_offset=lay["rgdOffset"], gd_offset=lay["gdOffset"], overhead=lay["overHead"]))
        os.pwrite(self.fd, header, 0)
        if self.descriptor is not None:
            os.pwrite(self.fd, self.descriptor.encode(), SECTOR)
        self._write_tables(lay["rgdOffset"])
        self._write_tables(lay["gdOffset"])
        os.ftruncate(self.fd, self.next_sector * SECTOR)      # whole grains, overhead included
        os.close(self.fd)
        self.fd = -1


class _StreamExtent:
    """A streamOptimized extent in VMware's layout (see the module docstring)."""

    def __init__(self, path: Path, sectors: int, descriptor: str) -> None:
        self.path, self.sectors = path, sectors
        self.grain = V.DEFAULT_GRAIN_SIZE
        self.grain_bytes = self.grain * SECTOR
        self.per = V.DEFAULT_GTES_PER_GT
        self.n_gd = V.num_gd_entries(sectors, self.grain, self.per)
        self.gd = np.zeros(self.n_gd, V.TABLE_DTYPE)
        self.gt = np.zeros(self.per, V.TABLE_DTYPE)
        self.gt_index = -1                  # the grain table being filled
        self.descriptor = descriptor.encode()
        self.desc_sectors = V.QEMU_DESCRIPTOR_SIZE
        if len(self.descriptor) > self.desc_sectors * SECTOR:
            raise ConvertError("vmdk: descriptor too long", path=str(path))
        self.overhead = V.stream_overhead(1, self.desc_sectors, self.grain)
        self.pos = self.overhead            # next free sector
        self.fd = _open_new(path)

    def _header(self, gd_offset: int) -> bytes:
        return V.sparse_header.build(V.sparse_header_values(
            self.sectors, version=3, flags=V.VMWARE_STREAM_FLAGS, grain_size=self.grain,
            descriptor_offset=1, descriptor_size=self.desc_sectors, gd_offset=gd_offset,
            overhead=self.overhead, compress_algorithm=V.COMPRESSION_DEFLATE))

    def _flush_gt(self) -> None:
        if self.gt_index < 0 or not self.gt.any():
            return
        gts = V.gt_sectors(self.per)
        data = V.build_marker(V.MARKER_GT, gts) + V.gt_table(self.per).build(self.gt)
        os.pwrite(self.fd, data, self.pos * SECTOR)
        self.gd[self.gt_index] = self.pos + 1
        self.pos += 1 + gts
        self.gt[:] = 0

    def write_record(self, offset: int, payload: bytes) -> None:
        grain = offset // self.grain_bytes
        table = grain // self.per
        if table != self.gt_index:
            self._flush_gt()
            self.gt_index = table
        record = V.grain_record_header.build({"lba": grain * self.grain, "size": len(payload)})
        total = len(record) + len(payload)
        pad = -total % SECTOR
        if self.pos + (total + pad) // SECTOR > MAX_SECTOR:
            raise ConvertError(f"vmdk: {self.path.name} would grow past 2 TiB", path=str(self.path))
        os.pwrite(self.fd, record + payload + bytes(pad), self.pos * SECTOR)
        self.gt[grain % self.per] = self.pos
        self.pos += (total + pad) // SECTOR

    def close(self) -> None:
        self._flush_gt()
        gds = V.gd_sectors(self.n_gd)
        gd_at = self.pos + 1
        tail = (V.build_marker(V.MARKER_GD, gds)
                + V.gd_table(self.n_gd).build(self.gd).ljust(gds * SECTOR, b"\0")
                + V.build_marker(V.MARKER_FOOTER, 1) + self._header(gd_at)
                + V.build_marker(V.MARKER_EOS, 0))
        os.pwrite(self.fd, tail, self.pos * SECTOR)
        os.pwrite(self.fd, self._header(V.GD_AT_END) + self.descriptor, 0)
        os.ftruncate(self.fd, self.pos * SECTOR + len(tail))
        os.close(self.fd)
        self.fd = -1


def _compress_grain(grain_bytes: int, data) -> bytes:
    """A zlib stream of one whole grain (a short last grain is padded with zeros)."""
    if len(data) < grain_bytes:
        data = bytes(data) + bytes(grain_bytes - len(data))
    return zlib.compress(data, 6)


class VmdkWriter(ImageWriter):
    format = "vmdk"
    OPTIONS = {
        "adapter_type": Option("adapter_type", "choice", "ide", "Virtual adapter type, can be one "
                               "of ide (default), lsilogic, buslogic or legacyESX", ADAPTERS),
        "compat6": Option("compat6", "bool", False, "VMDK version 6 image"),
        "hwversion": Option("hwversion", "str", None, "VMDK hardware version"),
        "subformat": Option("subformat", "choice", "monolithicSparse", "VMDK flat extent format, "
                            "can be one of {monolithicSparse (default) | monolithicFlat | "
                            "twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized}",
                            SUBFORMATS),
        "toolsversion": Option("toolsversion", "str", "2147483647", "VMware guest tools version"),
        "zeroed_grain": Option("zeroed_grain", "bool", False, "Enable efficient zero writes "
                               "using the zeroed-grain GTE feature"),
    }
    supports_backing = True

    def __init__(self, path: Path, size: int, options: dict | None = None, **kw) -> None:
        super().__init__(path, size, options, **kw)
        o = self.options
        self.subformat = o["subformat"]
        if o["compat6"] and o["hwversion"] not in (None, "undefined"):
            raise ConvertError("vmdk: compat6 cannot be enabled with hwversion set",
                               path=str(path))
        self.hwversion = "6" if o["compat6"] else (o["hwversion"] or "4")
        self.flat = self.subformat in ("monolithicFlat", "twoGbMaxExtentFlat")
        self.stream = self.subformat == "streamOptimized"
        if self.flat and self.backing:
            raise ConvertError("vmdk: a flat image cannot have a backing file", path=str(path))
        if self.backing_format not in (None, "vmdk"):
            raise ConvertError("vmdk: the backing file must be a vmdk image", path=str(path))
        self.sectors = -(-self.size // SECTOR)
        self.unit = V.DEFAULT_GRAIN_SIZE * SECTOR
        self.supports_compression = self.stream
        self.accepts_runs = not self.stream         # runs of units: one pwrite each
        self.sparse_unit_adjustable = self.flat     # flat: the unit is only the zero-test granule
        self.compress_always = self.stream      # streamOptimized grains are always compressed
        self.compress_unit = (lambda data, _g=self.unit: _compress_grain(_g, data)) \
            if self.stream else None
        self.cid = random.getrandbits(32)
        self.parent_cid = self._parent_cid() if self.backing else NO_PARENT_CID
        self._extents: list = []
        self._starts: list[int] = []
        self._files: list[Path] = [self.path]
        self._make_extents()

    # ---- setup ---------------------------------------------------------------------------
    def _parent_cid(self) -> int:
        """The CID of the parent named by `backing` (relative to the destination's folder)."""
        import imgscope
        name = Path(self.backing)
        where = [name] if name.is_absolute() else [self.path.parent.parent / name,
                                                   self.path.parent / name]
        for p in where:
            if p.exists():
                try:
                    with imgscope.open(p, "vmdk") as parent:
                        return parent.cid if parent.cid is not None else NO_PARENT_CID
                except imgscope.ImageError as exc:
                    raise ConvertError(f"vmdk: cannot open the backing file: {exc.message}",
                                       path=str(p)) from None
        raise ConvertError(f"vmdk: backing file {self.backing!r} not found", path=str(self.path))

    def _descriptor(self, extents: list) -> str:
        o = self.options
        ddb = qemu_ddb(self.sectors, adapter_type=o["adapter_type"], hw_version=self.hwversion,
                       tools_version=o["toolsversion"])
        return build_descriptor(self.subformat, extents, cid=self.cid, parent_cid=self.parent_cid,
                                parent_hint=self.backing, ddb=ddb)

    def _make_extents(self) -> None:
        base = self.path.name
        dot = base.rfind(".")
        prefix, postfix = (base[:dot], base[dot:]) if dot >= 0 else (base, "")
        zg = bool(self.options["zeroed_grain"])
        if self.subformat in ("monolithicSparse", "streamOptimized"):
            desc = self._descriptor([("RW", self.sectors, "SPARSE", base)])
            ext = (_StreamExtent(self.path, self.sectors, desc) if self.stream else
                   _SparseExtent(self.path, self.sectors, zeroed_grain=zg, descriptor=desc))
            self._extents, self._starts = [ext], [0]
            self._descriptor_text = None
            return
        split = self.subformat.startswith("twoGb")
        size = V.QEMU_SPLIT_SECTORS if split else max(self.sectors, 1)
        lines, start, i = [], 0, 1
        while start < self.sectors or (start == 0 and not lines):
            n = min(size, self.sectors - start)
            if split:
                name = f"{prefix}-{'f' if self.flat else 's'}{i:03d}{postfix}"
            else:
                name = f"{prefix}-flat{postfix}"
            p = self.path.with_name(name)
            self._files.append(p)
            if self.flat:
                self._extents.append(_FlatExtent(p, n))
                lines.append(("RW", n, "FLAT", name, 0))
            else:
                self._extents.append(_SparseExtent(p, n, zeroed_grain=zg))
                lines.append(("RW", n, "SPARSE", name))
            self._starts.append(start * SECTOR)
            start += n
            i += 1
            if n == 0:
                break
        self._descriptor_text = self._descriptor(lines)

    # ---- data ----------------------------------------------------------------------------
    def _extent_at(self, guest_offset: int):
        if not 0 <= guest_offset < self.sectors * SECTOR:
            raise ConvertError(f"vmdk: guest offset {guest_offset:#x} is outside the disk",
                               path=str(self.path))
        k = bisect.bisect_right(self._starts, guest_offset) - 1
        return self._extents[k], guest_offset - self._starts[k]

    def write(self, guest_offset: int, data) -> None:
        """One unit (streamOptimized: compressed here) or, for the other kinds, a run of
        consecutive units, split where it crosses from one extent file into the next."""
        if guest_offset % self.unit:
            raise ConvertError(f"vmdk: unit at {guest_offset:#x} is not {self.unit}-byte aligned",
                               path=str(self.path))
        if self.stream:
            ext, local = self._extent_at(guest_offset)
            ext.write_record(local, self.compress_unit(data))
            return
        view = memoryview(data).cast("B")
        if guest_offset + len(view) > self.sectors * SECTOR:
            raise ConvertError(f"vmdk: data at {guest_offset:#x} runs past the end of the disk",
                               path=str(self.path))
        pos = 0
        while pos < len(view):
            ext, local = self._extent_at(guest_offset + pos)
            n = min(len(view) - pos, ext.sectors * SECTOR - local)
            ext.write(local, view[pos:pos + n])
            pos += n

    def write_compressed(self, guest_offset: int, payload: bytes, length: int) -> None:
        if not self.stream:
            super().write_compressed(guest_offset, payload, length)
        ext, local = self._extent_at(guest_offset)
        ext.write_record(local, payload)

    def write_zeros(self, guest_offset: int, length: int) -> None:
        if self.stream:
            return super().write_zeros(guest_offset, length)
        end = min(guest_offset + length, self.sectors * SECTOR)
        while guest_offset < end:
            ext, local = self._extent_at(guest_offset)
            n = min(end - guest_offset, ext.sectors * SECTOR - local)
            ext.write_zeros(local, n)
            guest_offset += n

    # ---- end -----------------------------------------------------------------------------
    def close(self) -> None:
        for ext in self._extents:
            ext.close()
        if self._descriptor_text is not None:
            text = self._descriptor_text.encode()
            fd = _open_new(self.path)
            try:                            # NUL padded to a sector, as qemu-img convert does
                os.write(fd, text.ljust(-(-len(text) // SECTOR) * SECTOR, b"\0"))
            finally:
                os.close(fd)

    def abort(self) -> None:
        for ext in self._extents:
            if ext.fd >= 0:
                os.close(ext.fd)
                ext.fd = -1
        super().abort()

    def written_files(self) -> list[Path]:
        return list(self._files)
