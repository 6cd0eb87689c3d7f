"""VDI (VirtualBox) driver: headers v0 / v1.1 / v1.1+, dynamic, fixed and differencing images.

One block map of u32 entries maps guest blocks to blocks of the data area
(see schemas/vdi.py).  What qemu-img 7.2 reports, and so what the guest map
follows: a free or zero entry is a zero block (``present``, ``zero``, no
offset); an allocated entry is data at ``offset_data + k * (extra + block) +
extra``; for fixed (static) images QEMU also asks the host file, so never
written (sparse) parts of a block are data *and* zero.  In a differencing
image a free entry shows the parent's block.  VDI files do not name their
parent: it is the ``*.vdi`` file in the same folder whose ``uuid_image``
equals this image's ``uuid_link``.
"""
from __future__ import annotations

import construct as cs
import numpy as np

from ..errors import ImageError, ParseError, Truncated, Unsupported
from ..io.source import Source
from ..model import Image, ExtentTable, KIND_DATA, KIND_ZERO, KIND_UNALLOCATED, NO_HOST
from ..schemas import vdi as S
from ..schemas._types import field_layout
from . import open_backing
from .base import coalesce, note_bad_entries, validate_table

#: largest block size / per-block prefix imgscope maps (VirtualBox opens up to 128 MiB blocks)
MAX_BLOCK_SIZE = 1 << 30
#: at most this many ``*.vdi`` files are looked at when searching a parent
MAX_PARENT_CANDIDATES = 4096
U64 = np.uint64


class _EntryOffsets:
    """Host offset of block map entry k, computed on demand (no array per entry)."""

    def __init__(self, base: int) -> None:
        self.base = base

    def __getitem__(self, k) -> int:
        return self.base + 4 * int(k)


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


class VdiImage(Image):
    format = "vdi"
    slack_unit = S.SECTOR        # header and block map are padded to sectors

    def __init__(self, source: Source, **kw) -> None:
        super().__init__(source, **kw)
        self.header_rows_end = 0
        self.h: dict = {}
        self.usable = True              # False: block geometry too broken to map anything
        self._parse_headers()
        self._read_block_map()
        self._check_map()
        self._open_parent()
        self._tables["block_map"] = self._block_map_frame

    # ---- headers --------------------------------------------------------------------
    def _layout(self, struct, offset: int, size: int, name: str) -> list:
        data = self.source.read(offset, size, name)     # Truncated when the file is shorter
        try:
            return field_layout(struct, data, structure=name, base_offset=offset)
        except (cs.ConstructError, ValueError) as exc:   # pragma: no cover - fixed-size records
            raise ParseError(f"{name} does not parse: {exc}", path=str(self.path), offset=offset,
                             structure=name) from None

    def _parse_headers(self) -> None:
        rows = self._layout(S.pre_header, 0, S.PRE_HEADER_SIZE, "pre_header")
        v = {r.field: r.value for r in rows}
        if v["signature"] != S.SIGNATURE:
            raise ParseError(f"not a VDI image: signature {v['signature']:#010x} at 0x40 is not "
                             f"{S.SIGNATURE:#010x}", path=str(self.path), offset=0x40,
                             structure="pre_header.signature")
        version = v["version"]
        self.version = version
        if version >> 16 == 1:
            hrows = self._layout(S.header_v1, S.PRE_HEADER_SIZE, S.HEADER_V1_SIZE, "header")
            h = {r.field: r.value for r in hrows}
            if version != S.VERSION_1_1:
                self.note("warning", "version_unknown_minor", f"header version 1.{version & 0xFFFF}; "
                          "read as 1.1 (QEMU opens only 1.1)", structure="pre_header.version",
                          host_offset=0x44)
            hsize = h["header_size"]
            if hsize < S.HEADER_V1_SIZE:
                self.note("error", "header_size_invalid", f"header_size {hsize} is smaller than "
                          f"the {S.HEADER_V1_SIZE} bytes of a version 1.1 header",
                          structure="header.header_size", host_offset=0x48)
            if hsize >= S.HEADER_V1_PLUS_SIZE:
                lrows = self._layout(S.header_v1_lchs, S.PRE_HEADER_SIZE + S.HEADER_V1_SIZE, 16,
                                     "header_lchs")
                hrows += lrows
                h.update({r.field: r.value for r in lrows})
                self.variant_version = "1.1+"
            else:
                self.variant_version = "1.1"
            self.header_length = max(S.HEADER_V1_SIZE, S.HEADER_V1_PLUS_SIZE if hsize >= 400 else 0)
        elif version == S.VERSION_0:
            hrows = self._layout(S.header_v0, S.PRE_HEADER_SIZE, S.HEADER_V0_SIZE, "header")
            h = {r.field: r.value for r in hrows}
            h["header_size"] = S.HEADER_V0_SIZE
            h["block_extra"] = 0
            h["uuid_parent"] = S.NULL_UUID
            h["offset_bmap"], h["offset_data"] = S.v0_offsets(h["blocks_in_image"])
            self.variant_version = "0"
            self.header_length = S.HEADER_V0_SIZE
        else:
            raise Unsupported(f"VDI header version {version >> 16}.{version & 0xFFFF} "
                              f"({version:#010x}) is not supported", path=str(self.path),
                              offset=0x44, structure="pre_header.version")
        self._field_rows = rows + hrows
        self.h = h
        self.variant = S.VARIANTS.get(h["image_type"], f"type {h['image_type']}")
        self._check_header()

    def _where(self, name: str) -> dict:
        off = next((r.offset for r in self._field_rows if r.field == name), None)
        return dict(structure=f"header.{name}", host_offset=off)

    def _check_header(self) -> None:
        h, note, w = self.h, self.note, self._where
        if h["image_type"] not in S.IMAGE_TYPES:
            note("error", "image_type_invalid", f"image_type {h['image_type']} is none of 1..4; "
                 "read as a normal (dynamic) image", **w("image_type"))
        if h["image_flags"] & ~S.FLAGS_KNOWN:
            note("warning", "image_flags_unknown", f"image_flags {h['image_flags']:#x} has bits "
                 "VirtualBox rejects", **w("image_flags"))
        if h["sector_size"] != S.SECTOR:
            note("warning", "sector_size_invalid", f"legacy geometry sector size {h['sector_size']} "
                 "is not 512 (QEMU refuses the image)", **w("sector_size"))
        if "lchs_sector_size" in h and h["lchs_sector_size"] != S.SECTOR:
            note("warning", "lchs_sector_size_invalid", f"LCHS sector size {h['lchs_sector_size']} "
                 "is not 512", **w("lchs_sector_size"))
        bs, extra, n = h["block_size"], h["block_extra"], h["blocks_in_image"]
        if not _is_pow2(bs) or bs < S.SECTOR or bs > MAX_BLOCK_SIZE:
            note("error", "block_size_invalid", f"block_size {bs} is not a power of two between 512 "
                 f"and {MAX_BLOCK_SIZE}; no block can be mapped", **w("block_size"))
            self.usable = False
        elif bs != S.DEFAULT_BLOCK_SIZE:
            note("info", "block_size_not_qemu", f"block_size {bs} (QEMU opens only 1 MiB blocks)",
                 **w("block_size"), raise_in_strict=False)
        if extra and (not _is_pow2(extra) or extra > MAX_BLOCK_SIZE):
            note("error", "block_extra_invalid", f"block_extra {extra} is neither 0 nor a power of "
                 f"two up to {MAX_BLOCK_SIZE}; no block can be mapped", **w("block_extra"))
            self.usable = False
        disk = h["disk_size"]
        if disk % S.SECTOR:
            note("warning", "disk_size_unaligned", f"disk_size {disk} is no multiple of 512 "
                 "(QEMU rounds it up, VirtualBox down)", **w("disk_size"), fixable=True)
        size = -(-disk // S.SECTOR) * S.SECTOR
        if size >= 1 << 63:
            note("error", "disk_size_too_large", f"disk_size {disk} is 2^63 bytes or more; the "
                 "disk is cut there", **w("disk_size"))
            size = (1 << 63) - S.SECTOR
        self.virtual_size = size
        if disk == 0:
            note("warning", "disk_size_zero", "disk_size is 0", **w("disk_size"))
        if self.usable:
            self.cluster_size = bs
            if n * bs < size:
                note("error", "disk_size_exceeds_blocks", f"disk_size {disk} is larger than "
                     f"blocks_in_image {n} x block_size {bs}; the rest reads as zeros "
                     "(QEMU refuses the image)", **w("blocks_in_image"))
            elif n > -(-size // bs):
                note("warning", "blocks_in_image_too_many", f"blocks_in_image {n} is more than "
                     f"the {-(-size // bs)} blocks disk_size needs", **w("blocks_in_image"))
        if n > S.QEMU_BLOCKS_MAX:
            note("warning", "blocks_in_image_qemu_max", f"blocks_in_image {n} exceeds QEMU's "
                 f"maximum {S.QEMU_BLOCKS_MAX}", **w("blocks_in_image"), raise_in_strict=False)
        if h["blocks_allocated"] > n:
            note("error", "blocks_allocated_too_large", f"blocks_allocated {h['blocks_allocated']} "
                 f"exceeds blocks_in_image {n}", **w("blocks_allocated"))
        header_end = S.PRE_HEADER_SIZE + self.header_length
        if self.variant_version != "0":
            if h["offset_bmap"] < header_end:
                note("error", "block_map_overlaps_header", f"offset_bmap {h['offset_bmap']:#x} lies "
                     f"inside the header (which ends at {header_end:#x})", **w("offset_bmap"))
            if h["offset_data"] < h["offset_bmap"] + 4 * n:
                note("error", "data_overlaps_block_map", f"offset_data {h['offset_data']:#x} lies "
                     f"inside the block map ({h['offset_bmap']:#x} + {4 * n} bytes)",
                     **w("offset_data"))
            for name in ("offset_bmap", "offset_data"):
                if h[name] % S.SECTOR:
                    note("warning", f"{name}_unaligned", f"{name} {h[name]:#x} is no multiple of "
                         "512 (QEMU refuses the image)", **w(name))
        for name in ("uuid_image", "uuid_last_snap"):
            if h[name] == S.NULL_UUID:
                note("warning", "uuid_null", f"{name} is null (VirtualBox refuses the image)",
                     **w(name))
        diff = h["image_type"] == S.TYPE_DIFF
        if diff and h["uuid_link"] == S.NULL_UUID:
            note("error", "diff_without_parent", "differencing image with a null uuid_link: "
                 "its parent cannot be found; free blocks read as zeros", **w("uuid_link"))
        if not diff and h["uuid_link"] != S.NULL_UUID:
            note("warning", "link_in_base_image", f"uuid_link {h['uuid_link']} is set but the image "
                 "is no differencing image (QEMU refuses it); it is ignored", **w("uuid_link"))

    # ---- block map ------------------------------------------------------------------
    def _read_block_map(self) -> None:
        h = self.h
        n, off = h["blocks_in_image"], h["offset_bmap"]
        self.map_offset = off
        count = n
        if not validate_table(self, off, 4 * n, "block_map"):
            # read what lies inside the file and within limits, and no more entries than
            # the disk needs; the rest is unknown (read as unallocated)
            count = max(0, min(n, (self.source.size - off) // 4, self.limits.max_table_bytes // 4))
            if self.usable:
                count = min(count, -(-self.virtual_size // h["block_size"]))
        if off < h["offset_data"] < off + 4 * count:
            count = (h["offset_data"] - off) // 4       # the data area is no block map
        data = self.source.read(off, 4 * count, "block_map") if count else b""
        self.entries = S.block_map(count).parse(data)
        self.entries_read = count

    def _entry_offsets(self, idx) -> np.ndarray:
        return U64(self.map_offset) + np.asarray(idx, U64) * U64(4)

    def _check_map(self) -> None:
        h, e = self.h, self.entries
        alloc = e < S.BLOCK_ZERO
        offs = lambda: _EntryOffsets(self.map_offset)
        n, nalloc = h["blocks_in_image"], h["blocks_allocated"]
        count = int(np.count_nonzero(alloc))
        if count != nalloc and self.entries_read == n:
            self.note("error", "allocated_count_mismatch", f"blocks_allocated is {nalloc} but "
                      f"{count} block map entries are allocated", **self._where("blocks_allocated"),
                      fixable=True)
        too_large = np.flatnonzero(alloc & (e >= n))
        if too_large.size:
            note_bad_entries(self, too_large, "block_index_too_large",
                             lambda k: f"block map entry {k} = {int(e[k])} is not below "
                             f"blocks_in_image {n}", "block_map", offs())
        beyond_count = np.flatnonzero(alloc & (e >= nalloc) & (e < n))
        if beyond_count.size:
            note_bad_entries(self, beyond_count, "block_index_beyond_allocated",
                             lambda k: f"block map entry {k} = {int(e[k])} is not below "
                             f"blocks_allocated {nalloc}", "block_map", offs(), severity="warning")
        # duplicates: a later guest block using a data block an earlier one uses
        idx = np.flatnonzero(alloc)
        if idx.size > 1:
            order = np.argsort(e[idx], kind="stable")
            sv = e[idx][order]
            dup = np.flatnonzero(sv[1:] == sv[:-1]) + 1
            if dup.size:
                later = np.sort(idx[order[dup]])
                note_bad_entries(self, later, "block_duplicate",
                                 lambda k: f"block map entry {k} = {int(e[k])}: data block "
                                 f"{int(e[k])} is also used by an earlier guest block",
                                 "block_map", offs())
            used = int(np.unique(e[idx][e[idx] < nalloc]).size)
            if used < min(nalloc, n) and count == nalloc:
                self.note("info", "block_index_unused", f"{min(nalloc, n) - used} data block "
                          f"indexes below blocks_allocated {nalloc} are used by no entry "
                          "(wasted space or lost data)", structure="block_map",
                          host_offset=self.map_offset)
        if not self.usable:
            return
        step = h["block_extra"] + h["block_size"]
        size = self.source.size
        start = lambda k: h["offset_data"] + int(e[k]) * step
        # data blocks past the end: index >= first_out; cut by the end: index == first_cut
        first_out = max(0, -(-(size - h["offset_data"]) // step))
        past = np.flatnonzero(alloc & (e >= first_out))
        if past.size:
            note_bad_entries(self, past, "block_beyond_eof",
                             lambda k: f"block map entry {k}: data block {int(e[k])} at "
                             f"{start(k):#x} lies beyond the end of the file ({size} bytes); "
                             "it reads as zeros", "block_map", offs())
        first_cut = (size - h["offset_data"]) // step
        cut = (np.flatnonzero(alloc & (e == first_cut)) if 0 <= first_cut < first_out
               else np.zeros(0, np.int64))
        if cut.size:
            note_bad_entries(self, cut, "data_truncated",
                             lambda k: f"block map entry {k}: data block {int(e[k])} at "
                             f"{start(k):#x} (+{step}) is cut by the end of the file; the "
                             "rest reads as zeros", "block_map", offs(), severity="warning")
        if h["image_type"] == S.TYPE_FIXED:
            ident = e.size == n and bool(np.array_equal(e, np.arange(n, dtype=e.dtype)))
            if not ident:
                self.note("warning", "fixed_map_not_identity", "fixed image whose block map is not "
                          "entry i = i", structure="block_map", host_offset=self.map_offset)
            if nalloc != n:
                self.note("warning", "fixed_not_fully_allocated", f"fixed image with "
                          f"blocks_allocated {nalloc} != blocks_in_image {n}",
                          **self._where("blocks_allocated"))
        expected = h["offset_data"] + nalloc * step
        if self.variant_version != "0" and nalloc <= n:
            if size < expected:
                self.note("error", "file_truncated", f"file of {size} bytes is shorter than the "
                          f"{expected} bytes its {nalloc} allocated blocks need",
                          structure="data", host_offset=size)
            elif size > expected:
                self.note("info", "trailing_data", f"{size - expected} bytes after the last "
                          f"allocated block (file {size} bytes, expected {expected})",
                          structure="data", host_offset=expected, size=size - expected,
                          raise_in_strict=False)

    # ---- parent (differencing images) ---------------------------------------------------
    def _find_parent(self) -> list:
        """``*.vdi`` files in this image's folder whose uuid_image is our uuid_link."""
        from ..io.paths import resolve_named_file
        from ..errors import UnsafePath
        want = self.h["uuid_link"]
        me = self.path.resolve()
        found = []
        try:
            names = sorted(p.name for p in self.path.resolve().parent.glob("*.vdi"))
        except OSError:
            return []
        for name in names[:MAX_PARENT_CANDIDATES]:
            try:
                path = resolve_named_file(name, self.path, (), "parent image")
            except UnsafePath:
                continue          # a symlink leading out of the folder: not looked at
            if path == me:
                continue
            try:
                with Source(path) as src:
                    head = src.read_upto(0, S.PRE_HEADER_SIZE + S.HEADER_V1_SIZE)
            except ImageError:
                continue
            if len(head) < S.PRE_HEADER_SIZE + S.HEADER_V0_SIZE:
                continue
            if int.from_bytes(head[0x40:0x44], "little") != S.SIGNATURE:
                continue
            version = int.from_bytes(head[0x44:0x48], "little")
            at = 0x188 if version >> 16 == 1 else 0x174 if version == S.VERSION_0 else None
            if at is None or len(head) < at + 16:
                continue
            if S.UuidAdapter(cs.Bytes(16)).parse(head[at:at + 16]) == want:
                found.append(name)
        return found

    def _open_parent(self) -> None:
        h = self.h
        if h["image_type"] != S.TYPE_DIFF or h["uuid_link"] == S.NULL_UUID:
            return
        found = self._find_parent()
        if not found:
            self.note("error", "parent_not_found", f"no *.vdi file in {self.path.parent} has "
                      f"uuid_image {h['uuid_link']} (this image's uuid_link); free blocks read "
                      "as zeros", **self._where("uuid_link"))
            return
        if len(found) > 1:
            self.note("warning", "parent_ambiguous", f"{len(found)} files have uuid_image "
                      f"{h['uuid_link']}: {', '.join(found[:5])}; {found[0]} is used",
                      **self._where("uuid_link"))
        self.backing_name = found[0]
        self.backing = open_backing(self, found[0], "vdi", "parent image")
        parent = self.backing
        pmod = getattr(parent, "h", {}).get("uuid_last_snap")
        if h["uuid_parent"] != S.NULL_UUID and pmod is not None and pmod != h["uuid_parent"]:
            self.note("error", "parent_uuid_mismatch", f"uuid_parent {h['uuid_parent']} does not "
                      f"match the parent's uuid_last_snap {pmod} (parent {found[0]} changed after "
                      "this child was made)", **self._where("uuid_parent"))
        if parent.virtual_size != self.virtual_size:
            self.note("warning", "parent_size_mismatch", f"parent is {parent.virtual_size} bytes, "
                      f"this image {self.virtual_size}", **self._where("disk_size"))

    # ---- the model ---------------------------------------------------------------------
    def _own_extents(self) -> ExtentTable:
        files = self.files()
        size = self.virtual_size
        if not size:
            return ExtentTable.empty(files)
        if not self.usable:
            return ExtentTable.run(0, size, KIND_UNALLOCATED, files)
        h, e = self.h, self.entries
        bs, extra = h["block_size"], h["block_extra"]
        needed = -(-size // bs)
        e = e[:needed]
        m = e.size
        if m == 0:
            return ExtentTable.run(0, size, KIND_UNALLOCATED, files)
        diff = h["image_type"] == S.TYPE_DIFF
        alloc = e < S.BLOCK_ZERO
        # 0 data, 1 zero, 2 free; a free block is a zero block except in a diff image
        cls = np.where(alloc, np.uint8(0), np.where(e == S.BLOCK_ZERO, np.uint8(1), np.uint8(2)))
        # runs: same class and, for data, the next data block (no prefix between them)
        same = cls[1:] == cls[:-1]
        same &= ~alloc[:-1] | ((e[1:] - e[:-1] == 1) & (extra == 0))
        starts = np.flatnonzero(np.concatenate([[True], ~same]))
        nblocks = np.diff(np.append(starts, m)).astype(U64)
        c = cls[starts]
        free_kind = KIND_UNALLOCATED if diff else KIND_ZERO
        kind = np.choose(c, [np.uint8(KIND_DATA), np.uint8(KIND_ZERO), np.uint8(free_kind)]).astype(np.uint8)
        host = np.where(c == 0, S.block_host_offset(h["offset_data"], e[starts], bs, extra), NO_HOST)
        k = starts.size
        t = coalesce(starts.astype(U64) * U64(bs), nblocks * U64(bs), kind, host.astype(U64),
                     np.zeros(k, U64), np.where(c == 0, 0, -1).astype(np.int16), files)
        covered = m * bs
        if covered < size:           # entries that could not be read / disk beyond the map
            from ..io.chain import concat
            t = concat([t, ExtentTable.run(covered, size - covered, KIND_UNALLOCATED, files)], files)
        over = t.guest + t.length > U64(size)
        if over.any():
            t.length[over] = U64(size) - t.guest[over]
        if h["image_type"] == S.TYPE_FIXED:
            # QEMU asks the host file for static images (BDRV_BLOCK_RECURSE)
            from ..io.chain import mark_host_holes
            t = mark_host_holes(t, 0)
        return t

    def _host_regions(self) -> list:
        h = self.h
        regs = [(0, 0, S.PRE_HEADER_SIZE, "header", "pre-header"),
                (0, S.PRE_HEADER_SIZE, self.header_length, "header",
                 f"header v{self.variant_version}")]
        n = h["blocks_in_image"]
        if n:
            regs.append((0, h["offset_bmap"], 4 * n, "block_map", "block map"))
        if not self.usable:
            return regs
        e = self.entries
        used = np.unique(e[e < S.BLOCK_ZERO]).astype(U64)
        bs, extra = h["block_size"], h["block_extra"]
        first_out = max(0, -(-(self.source.size - h["offset_data"]) // (bs + extra)))
        if used.size and int(used[-1]) >= first_out:
            # blocks past the end of the file: one region (they are all beyond_eof)
            beyond = used[used >= U64(first_out)]
            b0 = h["offset_data"] + int(beyond[0]) * (bs + extra)
            regs.append((0, b0, h["offset_data"] + (int(beyond[-1]) + 1) * (bs + extra) - b0,
                         "data", "data blocks"))
            used = used[used < U64(first_out)]
        if used.size:
            step = U64(bs + extra)
            if extra == 0:      # runs of consecutive data blocks are one region
                brk = np.flatnonzero(np.diff(used) != 1) + 1
                first = np.concatenate([[0], brk])
                count = np.diff(np.append(first, used.size)).astype(U64)
                used, length = used[first], count * step
            else:
                length = np.full(used.size, bs, U64)
            start = U64(h["offset_data"]) + used * step
            regs.append((0, start + U64(extra), length, "data", "data blocks"))
            if extra:
                regs.append((0, start, np.full(used.size, extra, U64), "metadata", "block extra"))
        return regs

    def _block_map_frame(self):
        import pandas as pd
        h, e = self.h, self.entries
        n = e.size
        alloc = e < S.BLOCK_ZERO
        state = np.where(alloc, 0, np.where(e == S.BLOCK_ZERO, 2, 1))
        host = (S.block_host_offset(h["offset_data"], e, h["block_size"], h["block_extra"])
                if self.usable else np.zeros(n, U64))
        return pd.DataFrame({
            "index": np.arange(n, dtype=np.int64),
            "entry_offset": self._entry_offsets(np.arange(n)),
            "raw": e.astype(np.uint32),
            "state": pd.Categorical.from_codes(state, ["allocated", "free", "zero"]),
            "host_offset": pd.arrays.IntegerArray(np.where(alloc, host, 0).astype(U64),
                                                  ~(alloc & self.usable)),
        })
