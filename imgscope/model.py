"""The common model every format driver produces and every consumer reads.

Frame column contracts (checked by tests; see frames.py for dtypes):

fields   structure, field, offset, size, raw, value, display, description
extents  guest_offset, length, kind, depth, file, host_offset, codec, source
regions  file, offset, length, kind, owner
findings severity, code, structure, index, file, host_offset, size, message, fixable,
         guest_offset

Extent kinds: data, zero, unallocated, compressed, encrypted.  `zero` with a
host offset is a preallocated zero cluster; `unallocated` at the bottom of a
chain reads as zeros.  `depth` is the chain layer that supplies the bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from .errors import ParseError
from .limits import Limits, DEFAULT_LIMITS
from .io.source import Source

KINDS = ("data", "zero", "unallocated", "compressed", "encrypted")
KIND_DATA, KIND_ZERO, KIND_UNALLOCATED, KIND_COMPRESSED, KIND_ENCRYPTED = range(5)
CODECS = ("none", "zlib", "zstd", "deflate")
NO_HOST = np.uint64(0xFFFFFFFFFFFFFFFF)   # host_offset sentinel: no host location

SEVERITIES = ("info", "warning", "error", "critical")
FINDINGS_PER_CODE = 100   # a hostile file cannot flood memory with findings


@dataclass
class Finding:
    """One thing noticed about an image: what, where, how bad, fixable or not."""

    severity: str
    code: str
    message: str
    structure: str = ""
    index: int | None = None
    file: str = ""
    host_offset: int | None = None
    size: int | None = None
    fixable: bool = False
    guest_offset: int | None = None     # where on the guest disk, when it is about guest data


FLAG_HOST_HOLE = 1   # data run whose host bytes are a hole (QEMU reports zero too)
FLAG_HIDDEN_OFFSET = 2   # host offset not reported by qemu-img map (encrypted images)
FLAG_RECORD = 4          # compressed run whose host points at a stream record header
                         # (VMDK: u64 lba, u32 size, payload): its length is read there


@dataclass
class ExtentTable:
    """A guest map as parallel numpy arrays (no Python object per run).

    Runs are sorted, non-overlapping and cover [0, virtual_size).  For data
    runs `host` is the offset in `files[file]`; compressed runs are exactly one
    cluster with `host`/`host_length` giving the stored byte range and
    `inner` the offset of the run inside the decompressed cluster.
    """

    guest: np.ndarray          # uint64
    length: np.ndarray         # uint64
    kind: np.ndarray           # uint8 index into KINDS
    host: np.ndarray           # uint64, NO_HOST when none
    host_length: np.ndarray    # uint64 (compressed: stored bytes)
    file: np.ndarray           # int16 index into files (-1: none)
    depth: np.ndarray          # int16
    files: list                # Source per file index
    codec: str = "none"        # codec of compressed runs
    inner: np.ndarray | None = None  # uint64, compressed pieces: offset inside the cluster
    cluster_size: int = 0      # size a compressed run decompresses to
    flags: np.ndarray | None = None  # uint8, FLAG_* bits
    # per file (chains mix layers): codec and decompressed cluster size of its compressed runs
    file_codecs: list | None = None
    file_cluster_sizes: list | None = None

    ARRAYS = ("guest", "length", "kind", "host", "host_length", "file", "depth", "inner", "flags")

    def __post_init__(self) -> None:
        if self.inner is None:
            self.inner = np.zeros(self.guest.size, np.uint64)
        if self.flags is None:
            self.flags = np.zeros(self.guest.size, np.uint8)

    def __len__(self) -> int:
        return int(self.guest.size)

    def replace(self, **arrays) -> "ExtentTable":
        """A copy with some arrays (or files/codec) replaced."""
        kw = {name: getattr(self, name) for name in self.ARRAYS}
        kw.update(files=self.files, codec=self.codec, cluster_size=self.cluster_size,
                  file_codecs=self.file_codecs, file_cluster_sizes=self.file_cluster_sizes)
        kw.update(arrays)
        return ExtentTable(**kw)

    def per_file(self) -> tuple[list, list]:
        """(codec, cluster size) of every file's compressed runs."""
        n = len(self.files)
        return (self.file_codecs or [self.codec] * n,
                self.file_cluster_sizes or [self.cluster_size] * n)

    @classmethod
    def empty(cls, files=None) -> "ExtentTable":
        z = np.zeros(0, np.uint64)
        return cls(z, z.copy(), np.zeros(0, np.uint8), z.copy(), z.copy(),
                   np.zeros(0, np.int16), np.zeros(0, np.int16), list(files or []))

    @classmethod
    def run(cls, start: int, length: int, kind: int, files=None, host: int | None = None,
            file: int = -1) -> "ExtentTable":
        """A table of one run (empty when length <= 0)."""
        if length <= 0:
            return cls.empty(files)
        return cls(np.array([start], np.uint64), np.array([length], np.uint64),
                   np.array([kind], np.uint8),
                   np.array([NO_HOST if host is None else host], np.uint64),
                   np.zeros(1, np.uint64), np.array([file], np.int16),
                   np.zeros(1, np.int16), list(files or []))

    def take(self, mask_or_index) -> "ExtentTable":
        return self.replace(**{n: getattr(self, n)[mask_or_index] for n in self.ARRAYS})


class Image:
    """An opened image: header fields, tables, guest map, host layout, findings.

    Drivers subclass this and fill `_field_rows`, `_tables`, implement
    `_own_extents()` (this layer only, unallocated where a parent would be
    read) and `_host_regions()` (structures by host offset).
    """

    format: str = "raw"
    variant: str = ""

    def __init__(self, source: Source, *, strict: bool = False,
                 allow_paths: Iterable[str | os.PathLike] | None = None,
                 limits: Limits | None = None, depth: int = 0,
                 seen: frozenset = frozenset()) -> None:
        self.source = source
        self.path = source.path
        self.strict = strict
        self.allow_paths = list(allow_paths or [])
        self.limits = limits or DEFAULT_LIMITS
        self.chain_depth = depth
        self._seen = seen | {str(self.path.resolve())}
        self.virtual_size = 0
        self.cluster_size: int | None = None
        self.backing: Image | None = None
        self.backing_name: str | None = None     # as written in the image
        self.backing_format: str | None = None
        self._findings: list[Finding] = []
        self._finding_keys: set = set()
        self._finding_counts: dict[str, int] = {}
        self._field_rows: list = []
        self._tables: dict[str, Any] = {}
        self._extents_cache: ExtentTable | None = None
        self.snapshots: list[dict] = []

    # ---- findings ---------------------------------------------------------------
    def note(self, severity: str, code: str, message: str, *, raise_in_strict: bool = True,
             **where) -> None:
        """Record a finding; in strict mode errors raise instead."""
        where.setdefault("file", str(self.path))
        for key in ("host_offset", "guest_offset"):
            if where.get(key) is not None and not 0 <= where[key] < 1 << 64:
                where[key] = None                # a hostile value that is no offset at all
        f = Finding(severity, code, message, **where)
        if self.strict and raise_in_strict and severity in ("error", "critical"):
            raise ParseError(message, path=f.file, offset=f.host_offset,
                             structure=f.structure or code)
        key = (code, f.structure, f.index, f.host_offset, f.file)
        if key in self._finding_keys:        # the same place found again by another consumer
            return
        self._finding_keys.add(key)
        count = self._finding_counts.get(code, 0) + 1
        self._finding_counts[code] = count
        if count <= FINDINGS_PER_CODE:
            self._findings.append(f)

    def _all_findings(self) -> list[Finding]:
        """Findings plus one summary per code that hit the per-code cap."""
        extra = [Finding("info", code, f"{n - FINDINGS_PER_CODE} more findings with code "
                         f"{code} not listed", file=str(self.path))
                 for code, n in self._finding_counts.items() if n > FINDINGS_PER_CODE]
        return self._findings + extra

    # ---- the model's members ----------------------------------------------------------
    @property
    def chain(self) -> list["Image"]:
        """This image followed by its backing files, top first."""
        out, img = [], self
        while img is not None:
            out.append(img)
            img = img.backing
        return out

    @property
    def fields(self):
        from .frames import fields_frame
        return fields_frame(self._field_rows)

    @property
    def tables(self) -> dict:
        from .frames import TableDict
        return TableDict(self._tables)

    @property
    def findings(self):
        from .frames import findings_frame
        return findings_frame(self._all_findings())

    def files(self) -> list[Source]:
        """Host files of this layer (image file first, then data files/extents)."""
        return [self.source]

    def _own_extents(self) -> ExtentTable:
        raise NotImplementedError

    def extent_table(self) -> ExtentTable:
        """Resolved guest map over the whole backing chain (numpy form)."""
        if self._extents_cache is None:
            from .io.chain import resolve_chain
            self._extents_cache = resolve_chain(self)
        return self._extents_cache

    def map_extent_table(self) -> ExtentTable:
        """The table ``qemu-img map`` reports: the guest map, unless the format's QEMU
        driver answers no block status (VHDX: one data run without offsets)."""
        return self.extent_table()

    def extents(self, merge: bool = True):
        """Guest map: which layer and host bytes supply each guest range."""
        from .frames import extents_frame
        table = self.extent_table()
        if merge:
            from .io.chain import merge_for_map
            table = merge_for_map(table)
        return extents_frame(table, [str(layer.path) for layer in self.chain])

    def _host_regions(self) -> list:
        """(file, offset, length, kind, owner) structures; drivers override."""
        return []

    def regions(self):
        """Host-file layout tiling every file of this layer exactly once."""
        from .analysis.layout import tile_regions
        return tile_regions(self._host_regions(), [s for s in self.files()], self.slack_unit)

    def open_guest(self):
        """A read-only, seekable binary file over the guest disk."""
        from .io.reader import GuestReader
        # compressed runs of every layer decode to their own file's cluster size
        # (ExtentTable.file_cluster_sizes), whatever this layer's cluster size is
        return GuestReader(self.extent_table(), self.virtual_size, self.cluster_size)

    def check(self, progress=None):
        """Every rule of the checker (read-only): findings plus qemu-img check's counters."""
        from .analysis.check import check_image
        return check_image(self, progress=progress)

    # ---- inside the guest disk --------------------------------------------------------
    def partition_table(self):
        """The guest disk's MBR or GPT (scheme "none" when there is neither); cached."""
        if getattr(self, "_partition_table", None) is None:
            from .guest.partitions import read_partition_table
            self._partition_table = read_partition_table(self.open_guest(), path=str(self.path),
                                                         note=self.note, limits=self.limits)
        return self._partition_table

    def partitions(self):
        """One row per partition of the guest disk (MBR primary/extended/logical or GPT)."""
        return self.partition_table().frame

    def partition(self, number: int):
        """Partition `number` (as Linux numbers them: sda1, sda5...); `.open()` reads it."""
        return self.partition_table().partition(number)

    def lvm(self):
        """The LVM2 physical volume on the guest disk or in one of its partitions."""
        if getattr(self, "_lvm", None) is None:
            from .guest.lvm import find_lvm
            self._lvm = find_lvm(self)
        return self._lvm

    def info(self, backing_chain: bool = False):
        """qemu-img info --output=json compatible dict (list for the chain)."""
        from .info import image_info
        if backing_chain:
            return [image_info(img) for img in self.chain]
        return image_info(self)

    dirty = False   # qemu-img info's dirty-flag
    info_complete = True    # False: qemu-img info has no cluster-size / dirty-flag to show
    slack_unit: int | None = None   # allocation unit whose unused tail is `slack` in regions()

    def actual_size(self) -> int:
        """Host bytes allocated to the image file (st_blocks), as qemu-img info counts."""
        return self.source.allocated

    def format_specific(self) -> dict | None:
        return None

    def close(self) -> None:
        for img in self.chain:
            for s in img.files():
                s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.format}"
                f"{' ' + self.variant if self.variant else ''} {self.path.name} "
                f"virtual_size={self.virtual_size}>")

    def _repr_html_(self) -> str:
        from .frames import image_card_html
        return image_card_html(self)
