"""The partition table of a guest disk: MBR (primaries, EBR chain) or GPT.

Works on any image through its guest reader (anything with `size` and
`pread`), so a qcow2, VMDK, VDI or VHD disk is read exactly like a raw one.
The rules are Linux's (``block/partitions/msdos.c`` and ``efi.c``) where they
decide what a partition is, and libfdisk's where they decide what ``sfdisk
--json`` prints, so `PartitionTable.to_sfdisk()` can be compared with it:

* MBR: 55 AA at 510; a boot indicator other than 0x00/0x80 means "no table"
  (Linux); an entry with a sector count is a partition (number = slot);
  extended types 0x05/0x0F/0x85 are followed as an EBR chain (logical
  partitions numbered from 5 in chain order), with cycle detection and
  Linux's bounds (100 links without data, 256 partitions).
* GPT (protective MBR type 0xEE): header at LBA 1 and the backup at the
  primary's alternate LBA (the last LBA when the primary is bad), both CRCs
  checked; a bad primary with a good backup reads the backup (libfdisk).  A
  header at byte 4096 instead of 512 means 4 KiB logical sectors.
* A partition running past the end of the disk is clipped for reading, with
  a finding; nothing is ever read outside the disk.

Findings carry guest-disk offsets (`host_offset` = offset on the guest disk).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import construct as cs
import numpy as np

from ..errors import ImageError, ParseError
from ..limits import DEFAULT_LIMITS, Limits
from ..model import Finding, FINDINGS_PER_CODE
from ..schemas import mbr_gpt as S
from ..schemas._types import FieldRow, field_layout
from ..io.spans import SpanReader

#: Linux's bounds on an EBR chain (msdos.c) and on partitions per disk (DISK_MAX_PARTS)
MAX_LINKS_WITHOUT_DATA = 100
MAX_PARTITIONS = 256
#: the largest GPT entry array read (Linux has no cap; real disks use 16 KiB)
MAX_GPT_ARRAY_BYTES = 4 << 20
FINDINGS_PER_CHECK = 20

KINDS = ("primary", "extended", "logical", "gpt")
FRAME_COLUMNS = ["number", "kind", "start", "size", "end", "start_sector", "sectors",
                 "end_sector", "type", "type_name", "bootable", "name", "uuid", "attributes",
                 "table_offset", "clipped"]


@dataclass
class Partition:
    """One partition: where it lies on the guest disk (bytes and sectors) and its type.

    `size` is what the table says; `readable` is the part inside the disk, which
    is all `open()` serves.
    """

    number: int
    kind: str
    start: int
    size: int
    start_sector: int
    sectors: int
    type: str
    type_name: str
    bootable: bool = False
    name: str = ""
    uuid: str = ""
    attributes: int = 0
    table_offset: int = 0
    readable: int = 0
    _reader: Any = field(default=None, repr=False, compare=False)

    @property
    def end(self) -> int:
        """First byte after the partition (as the table says)."""
        return self.start + self.size

    @property
    def clipped(self) -> bool:
        return self.readable < self.size

    def open(self) -> SpanReader:
        """A read-only, seekable file over the partition's bytes inside the disk."""
        spans = [(0, self.readable, self.start)] if self.readable > 0 else []
        return SpanReader(self._reader, spans, self.readable, name=f"partition {self.number}")


class PartitionTable:
    """What `read_partition_table` found: scheme, partitions, raw tables, header fields, findings."""

    def __init__(self, reader, path: str, sector_size: int) -> None:
        self.reader = reader
        self.path = path
        self.scheme = "none"
        self.disk_id = ""
        self.sector_size = sector_size
        self.disk_size = int(reader.size)
        self.first_lba: int | None = None      # GPT usable range
        self.last_lba: int | None = None
        self.gpt_entry_count: int | None = None
        self.used_header = ""                  # "primary" or "backup" (GPT)
        self._columns: dict[str, list] = {c: [] for c in FRAME_COLUMNS}
        self._partitions: list[Partition] | None = None
        self._frame = None
        self._field_rows: list[FieldRow] = []
        self._tables: dict[str, Any] = {}
        self._findings: list[Finding] = []
        self._finding_counts: dict[str, int] = {}

    # ---- the members ------------------------------------------------------------------------
    @property
    def partitions(self) -> list[Partition]:
        if self._partitions is None:
            c = self._columns
            self._partitions = [
                Partition(number=int(c["number"][i]), kind=str(c["kind"][i]),
                          start=int(c["start"][i]), size=int(c["size"][i]),
                          start_sector=int(c["start_sector"][i]), sectors=int(c["sectors"][i]),
                          type=str(c["type"][i]), type_name=str(c["type_name"][i]),
                          bootable=bool(c["bootable"][i]), name=str(c["name"][i]),
                          uuid=str(c["uuid"][i]), attributes=int(c["attributes"][i]),
                          table_offset=int(c["table_offset"][i]),
                          readable=_readable(int(c["start"][i]), int(c["size"][i]), self.disk_size),
                          _reader=self.reader)
                for i in range(len(c["number"]))]
        return self._partitions

    @property
    def frame(self):
        """One row per partition (columns: FRAME_COLUMNS; offsets in bytes, sectors in LBAs)."""
        if self._frame is None:
            import pandas as pd
            c = self._columns
            u64 = lambda name: np.asarray(c[name], dtype=np.uint64)   # noqa: E731
            self._frame = pd.DataFrame({
                "number": np.asarray(c["number"], dtype=np.int64),
                "kind": pd.Categorical(c["kind"], categories=list(KINDS)),
                "start": u64("start"), "size": u64("size"), "end": u64("end"),
                "start_sector": u64("start_sector"), "sectors": u64("sectors"),
                "end_sector": u64("end_sector"),
                "type": pd.Series(c["type"], dtype=str), "type_name": pd.Series(c["type_name"], dtype=str),
                "bootable": np.asarray(c["bootable"], dtype=bool),
                "name": pd.Series(c["name"], dtype=str), "uuid": pd.Series(c["uuid"], dtype=str),
                "attributes": u64("attributes"), "table_offset": u64("table_offset"),
                "clipped": np.asarray(c["clipped"], dtype=bool),
            }, columns=FRAME_COLUMNS)
        return self._frame

    @property
    def fields(self):
        from ..frames import fields_frame
        return fields_frame(self._field_rows)

    @property
    def tables(self):
        from ..frames import TableDict
        return TableDict(self._tables)

    @property
    def findings(self):
        from ..frames import findings_frame
        return findings_frame(self._findings)

    def partition(self, number: int) -> Partition:
        """Partition `number` (Linux numbering); ImageError naming the ones there are."""
        for p in self.partitions:
            if p.number == number:
                return p
        have = ", ".join(str(p.number) for p in self.partitions) or "none"
        raise ImageError(f"no partition {number} on this {self.scheme} disk (partitions: {have})",
                         path=self.path or None, structure="partition table")

    def to_sfdisk(self, device: str | None = None) -> dict:
        """The table as `sfdisk --json` (util-linux 2.38) prints it: same keys, same value forms."""
        if self.scheme == "none":
            raise ImageError("the disk does not contain a recognized partition table",
                             path=self.path or None, offset=0, structure="partition table")
        device = self.path if device is None else device
        pt: dict[str, Any] = {"label": "gpt" if self.scheme == "gpt" else "dos",
                              "id": self.disk_id, "device": device, "unit": "sectors"}
        if self.scheme == "gpt":
            pt["firstlba"] = self.first_lba
            pt["lastlba"] = self.last_lba
            if self.gpt_entry_count != 128:
                pt["table-length"] = str(self.gpt_entry_count)
        pt["sectorsize"] = self.sector_size
        parts = []
        for p in sorted(self.partitions, key=lambda p: p.number):
            entry: dict[str, Any] = {"node": _partname(device, p.number), "start": p.start_sector,
                                     "size": p.sectors, "type": p.type}
            if self.scheme == "gpt":
                entry["uuid"] = p.uuid
                if p.name:
                    entry["name"] = p.name
                attrs = _sfdisk_attrs(p.attributes)
                if attrs:
                    entry["attrs"] = attrs
            elif p.bootable:
                entry["bootable"] = True
            parts.append(entry)
        if parts:
            pt["partitions"] = parts
        return {"partitiontable": pt}

    def __len__(self) -> int:
        return len(self._columns["number"])

    def __repr__(self) -> str:
        return (f"<PartitionTable {self.scheme} {len(self)} partitions sector_size={self.sector_size}"
                f"{' id=' + self.disk_id if self.disk_id else ''}>")


# ---------------------------------------------------------------------------------------------
# helpers


def _readable(start: int, size: int, disk_size: int) -> int:
    return max(0, min(start + size, disk_size) - start) if start < disk_size else 0


def _partname(device: str, number: int) -> str:
    """fdisk_partname(): a 'p' between a name ending in a digit and the number."""
    if not device:
        return str(number)
    if device.endswith("disc"):
        return f"{device[:-4]}part{number}"
    sep = "p" if device[-1].isdigit() else ""
    if device.startswith(("/dev/disk/by-id", "/dev/disk/by-path", "/dev/mapper")):
        sep = "-part"
    return f"{device}{sep}{number}"


def _sfdisk_attrs(attrs: int) -> str:
    """libfdisk's text of GPT attribute bits: names of bits 0-2, then 'GUID:48,50'."""
    words = [name for bit, name in S.GPT_ATTRIBUTE_BITS.items() if attrs >> bit & 1]
    type_bits = [str(b) for b in range(S.GPT_TYPE_BITS_FIRST,
                                       S.GPT_TYPE_BITS_FIRST + S.GPT_TYPE_BITS_COUNT) if attrs >> b & 1]
    if type_bits:
        words.append("GUID:" + ",".join(type_bits))
    return " ".join(words)


class _Context:
    """Reading state: the reader, sizes, limits and the finding sink."""

    def __init__(self, reader, table: PartitionTable, note: Callable | None, limits: Limits) -> None:
        self.reader = reader
        self.table = table
        self.size = table.disk_size
        self.note_fn = note
        self.limits = limits
        self.ebr_count = 0          # EBRs read so far, in chain order (table names)

    def note(self, severity: str, code: str, message: str, **where) -> None:
        """A finding; offsets found on the guest disk are guest offsets."""
        if "host_offset" in where:
            where["guest_offset"] = where.pop("host_offset")
        t = self.table
        count = t._finding_counts.get(code, 0) + 1
        t._finding_counts[code] = count
        if count <= FINDINGS_PER_CODE:
            t._findings.append(Finding(severity, code, message, file=t.path, **where))
        if self.note_fn is not None:
            self.note_fn(severity, code, message, **where)

    def note_entries(self, idx: np.ndarray, code: str, message: Callable[[int], str],
                     structure: str, offsets: np.ndarray, numbers: np.ndarray,
                     severity: str = "error") -> None:
        """A finding for each of the first few bad entries, then one summary."""
        for k in idx[:FINDINGS_PER_CHECK].tolist():
            self.note(severity, code, message(k), structure=structure, index=int(numbers[k]),
                      host_offset=int(offsets[k]))
        if idx.size > FINDINGS_PER_CHECK:
            self.note(severity, code, f"{idx.size - FINDINGS_PER_CHECK} more entries of "
                      f"{structure} with the same problem ({code})", structure=structure)

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`, or fewer at the end of the disk (never past it)."""
        if offset >= self.size or length <= 0:
            return b""
        return self.reader.pread(offset, min(length, self.size - offset))


def _layout(struct: cs.Struct, data: bytes, name: str, base: int) -> list[FieldRow]:
    try:
        return field_layout(struct, data, structure=name, base_offset=base)
    except (cs.ConstructError, ValueError, UnicodeError) as exc:
        raise ParseError(f"{name} cannot be parsed: {exc}", offset=base, structure=name) from None


def _entry_frame(entries: np.ndarray, base: int, absolute: np.ndarray, extra: dict | None = None):
    """An MBR/EBR entry table: raw fields, decoded CHS and the absolute start sector."""
    import pandas as pd
    c0, h0, s0 = S.decode_chs(entries["start_chs"])
    c1, h1, s1 = S.decode_chs(entries["end_chs"])
    types = entries["partition_type"].astype(np.int64)
    return pd.DataFrame({
        **(extra or {}),
        "slot": np.arange(1, entries.size + 1, dtype=np.int64),
        "offset": (base + S.MBR_ENTRIES_OFFSET
                   + S.MBR_ENTRY_SIZE * np.arange(entries.size)).astype(np.uint64),
        "boot_indicator": entries["boot_indicator"].astype(np.uint8),
        "start_cylinder": c0, "start_head": h0, "start_sector": s0,
        "partition_type": entries["partition_type"].astype(np.uint8),
        "type_name": [S.mbr_type_name(t) for t in types.tolist()],
        "end_cylinder": c1, "end_head": h1, "end_sector": s1,
        "start_lba": entries["start_lba"].astype(np.uint64),
        "num_sectors": entries["num_sectors"].astype(np.uint64),
        "absolute_start_lba": absolute.astype(np.uint64),
        "in_use": entries["num_sectors"] != 0,
    })


def _mbr_frame(entries: np.ndarray):
    return _entry_frame(entries, 0, entries["start_lba"].astype(np.uint64))


def _ebr_frame(entries: np.ndarray, offset: int, ebr_lba: int, ext_start: int):
    """EBR entries: data entries count from this EBR, links from the extended partition."""
    link = np.isin(entries["partition_type"], S.EXTENDED_TYPES)
    origin = np.where(link, np.uint64(ext_start), np.uint64(ebr_lba))
    return _entry_frame(entries, offset, entries["start_lba"].astype(np.uint64) + origin,
                        {"ebr_lba": np.full(entries.size, ebr_lba, np.uint64)})


# ---------------------------------------------------------------------------------------------
# entry point


def read_partition_table(reader, *, path: str = "", note: Callable | None = None,
                         sector_size: int = 512, limits: Limits | None = None) -> PartitionTable:
    """Find and decode the MBR or GPT of a guest disk read through `reader`.

    `note` is `Image.note` (findings are forwarded there and kept on the table);
    `sector_size` is the logical sector size assumed for MBR disks (a GPT found
    at byte 4096 switches to 4096-byte sectors).
    """
    if sector_size < 512 or sector_size & (sector_size - 1) or sector_size > 65536:
        raise ImageError(f"sector size {sector_size} is not a power of two from 512 to 65536",
                         path=path or None, structure="partition table")
    table = PartitionTable(reader, path, sector_size)
    ctx = _Context(reader, table, note, limits or DEFAULT_LIMITS)
    if ctx.size < S.MBR_SIZE:
        ctx.note("info", "no_partition_table", f"the disk has {ctx.size} bytes, less than one "
                 "sector: no partition table", structure="mbr", host_offset=0)
        return table
    lba0 = ctx.read(0, S.MBR_SIZE)
    rows = _layout(S.mbr, lba0, "mbr", 0)
    mbr = {r.field: r.value for r in rows}
    if mbr["boot_signature"] != S.BOOT_SIGNATURE:
        if any(ctx.read(off, 8) == S.GPT_SIGNATURE for off in (512, 4096)):
            ctx.note("warning", "gpt_without_pmbr", "a GPT header is present but LBA 0 has no "
                     "55 AA signature (no protective MBR): Linux and fdisk ignore the GPT",
                     structure="mbr.boot_signature", host_offset=510)
        else:
            ctx.note("info", "no_partition_table", "no 55 AA boot signature at offset 510: "
                     "the disk has no MBR or GPT", structure="mbr.boot_signature", host_offset=510)
        return table
    table._field_rows += rows
    entries = S.mbr_entries().parse(lba0[S.MBR_ENTRIES_OFFSET:S.MBR_ENTRIES_OFFSET + 64])
    table._tables["mbr"] = lambda: _mbr_frame(entries)
    if (entries["partition_type"] == S.TYPE_GPT_PROTECTIVE).any():
        if _read_gpt(ctx, entries):
            return table
    _read_mbr(ctx, entries, mbr)
    return table


# ---------------------------------------------------------------------------------------------
# MBR


class _Collector:
    """Partition rows gathered while walking an MBR and its EBR chains."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.cols = ctx.table._columns

    def add(self, number: int, kind: str, start_lba: int, sectors: int, type_code: int,
            boot: int, entry_offset: int, structure: str) -> None:
        ctx, ss = self.ctx, self.ctx.table.sector_size
        start, size = start_lba * ss, sectors * ss
        clipped = start + size > ctx.size
        if clipped:
            inside = _readable(start, size, ctx.size)
            ctx.note("error", "partition_beyond_disk",
                     f"partition {number} ({kind}, sectors {start_lba}..{start_lba + sectors - 1}) "
                     f"ends past the end of the {ctx.size}-byte disk; only {inside} bytes can be read",
                     structure=structure, index=number, host_offset=entry_offset, size=size)
        c = self.cols
        c["number"].append(number)
        c["kind"].append(kind)
        c["start"].append(start)
        c["size"].append(size)
        c["end"].append(start + size)
        c["start_sector"].append(start_lba)
        c["sectors"].append(sectors)
        c["end_sector"].append(start_lba + sectors - 1)
        c["type"].append(f"{type_code:x}")
        c["type_name"].append(S.mbr_type_name(type_code))
        c["bootable"].append(boot == S.BOOT_ACTIVE)
        c["name"].append("")
        c["uuid"].append("")
        c["attributes"].append(boot)
        c["table_offset"].append(entry_offset)
        c["clipped"].append(clipped)


def _read_mbr(ctx: _Context, entries: np.ndarray, mbr: dict) -> None:
    table = ctx.table
    boot = entries["boot_indicator"]
    bad_boot = np.flatnonzero((boot != 0) & (boot != S.BOOT_ACTIVE))
    if bad_boot.size:
        k = int(bad_boot[0])
        ctx.note("warning", "mbr_boot_indicator",
                 f"entry {k + 1} has boot indicator {int(boot[k]):#04x} (only 0x00 and 0x80 are "
                 "valid): as Linux does, the sector is not taken for a partition table (a FAT "
                 "boot sector?)", structure=f"mbr.entry[{k}].boot_indicator", index=k + 1,
                 host_offset=S.MBR_ENTRIES_OFFSET + S.MBR_ENTRY_SIZE * k)
        return
    table.scheme = "mbr"
    table.disk_id = f"0x{mbr['disk_signature']:08x}"
    out = _Collector(ctx)
    next_logical = [5]
    extended = np.flatnonzero(np.isin(entries["partition_type"], S.EXTENDED_TYPES)
                              & (entries["num_sectors"] != 0))
    if extended.size > 1:
        ctx.note("warning", "multiple_extended", f"{extended.size} extended partitions in the "
                 "MBR; Linux follows each chain, fdisk only the first", structure="mbr",
                 host_offset=S.MBR_ENTRIES_OFFSET + S.MBR_ENTRY_SIZE * int(extended[1]))
    for k in range(S.MBR_N_ENTRIES):
        e = entries[k]
        n, t, lba = int(e["num_sectors"]), int(e["partition_type"]), int(e["start_lba"])
        off = S.MBR_ENTRIES_OFFSET + S.MBR_ENTRY_SIZE * k
        if n == 0:
            if t != S.TYPE_EMPTY or lba:
                ctx.note("info", "mbr_entry_no_size", f"entry {k + 1} has type {t:#04x} / start "
                         f"{lba} but 0 sectors: not a partition", structure=f"mbr.entry[{k}]",
                         index=k + 1, host_offset=off)
            continue
        if t == S.TYPE_EMPTY:
            ctx.note("warning", "mbr_entry_type_empty", f"entry {k + 1} has {n} sectors but type "
                     "0x00 (empty); Linux still exposes it as a partition",
                     structure=f"mbr.entry[{k}].partition_type", index=k + 1, host_offset=off + 4)
        is_ext = t in S.EXTENDED_TYPES
        out.add(k + 1, "extended" if is_ext else "primary", lba, n, t, int(e["boot_indicator"]),
                off, f"mbr.entry[{k}]")
        if is_ext:
            _walk_ebr_chain(ctx, out, lba, n, next_logical, k + 1)
    c = table._columns                  # rows by number: primaries, then logicals in chain order
    order = np.argsort(np.asarray(c["number"], np.int64), kind="stable").tolist()
    for name in FRAME_COLUMNS:
        c[name] = [c[name][i] for i in order]
    _check_mbr_overlaps(ctx)


def _walk_ebr_chain(ctx: _Context, out: _Collector, ext_start: int, ext_size: int,
                    next_logical: list, slot: int) -> None:
    """Follow the EBRs of the extended partition in `slot` (msdos.c parse_extended)."""
    table, ss = ctx.table, ctx.table.sector_size
    ext_end = ext_start + ext_size
    this_lba, this_size = ext_start, ext_size
    seen: set[int] = set()
    links_without_data = 0
    while True:
        where = f"ebr@{this_lba}"
        off = this_lba * ss
        if this_lba in seen:
            ctx.note("error", "ebr_loop", f"the EBR chain of extended partition {slot} comes back "
                     f"to the EBR at sector {this_lba}: the chain loops and ends here",
                     structure=where, host_offset=off)
            return
        seen.add(this_lba)
        if links_without_data >= MAX_LINKS_WITHOUT_DATA:
            ctx.note("error", "ebr_chain_too_long", f"{links_without_data} EBR links without a "
                     f"logical partition (Linux stops after {MAX_LINKS_WITHOUT_DATA})",
                     structure=where, host_offset=off)
            return
        if next_logical[0] > MAX_PARTITIONS:
            ctx.note("error", "too_many_partitions", f"more than {MAX_PARTITIONS} partitions "
                     "(Linux's limit); the rest of the EBR chain is not read",
                     structure=where, host_offset=off)
            return
        if off + S.MBR_SIZE > ctx.size:
            ctx.note("error", "ebr_beyond_disk", f"the EBR at sector {this_lba} lies past the end "
                     f"of the {ctx.size}-byte disk", structure=where, host_offset=off)
            return
        data = ctx.read(off, S.MBR_SIZE)
        entries = S.mbr_entries().parse(data[S.MBR_ENTRIES_OFFSET:S.MBR_ENTRIES_OFFSET + 64])
        table._tables[f"ebr[{ctx.ebr_count}]"] = (
            lambda e=entries, o=off, t=this_lba, x=ext_start: _ebr_frame(e, o, t, x))
        ctx.ebr_count += 1
        if data[510:512] != S.BOOT_SIGNATURE:
            if any(data):
                ctx.note("warning", "ebr_signature", f"the EBR at sector {this_lba} has no 55 AA "
                         "signature: the chain ends here", structure=f"{where}.boot_signature",
                         host_offset=off + 510)
            return
        types = entries["partition_type"].astype(np.int64)
        sizes = entries["num_sectors"].astype(np.int64)
        starts = entries["start_lba"].astype(np.int64)
        is_link = np.isin(types, S.EXTENDED_TYPES)
        found_data = False
        for i in np.flatnonzero((sizes != 0) & ~is_link).tolist():
            rel, n = int(starts[i]), int(sizes[i])
            first = this_lba + rel
            entry_off = off + S.MBR_ENTRIES_OFFSET + S.MBR_ENTRY_SIZE * i
            outside = first < ext_start or first + n > ext_end
            if i >= 2 and (rel + n > this_size or outside):
                ctx.note("info", "ebr_entry_ignored", f"entry {i + 1} of the EBR at sector "
                         f"{this_lba} does not fit its link or the extended partition; Linux "
                         "ignores such entries", structure=f"{where}.entry[{i}]", host_offset=entry_off)
                continue
            if next_logical[0] > MAX_PARTITIONS:
                break
            if outside:
                ctx.note("warning", "logical_outside_extended",
                         f"logical partition {next_logical[0]} (sectors {first}..{first + n - 1}) "
                         f"is not inside extended partition {slot} ({ext_start}..{ext_end - 1})",
                         structure=f"{where}.entry[{i}]", index=next_logical[0], host_offset=entry_off)
            out.add(next_logical[0], "logical", first, n, int(types[i]), int(entries["boot_indicator"][i]),
                    entry_off, f"{where}.entry[{i}]")
            next_logical[0] += 1
            found_data = True
        links = np.flatnonzero(is_link & (sizes != 0))
        if links.size == 0:
            return
        if links.size > 1:
            ctx.note("warning", "ebr_extra_link", f"the EBR at sector {this_lba} has {links.size} "
                     "links to a next EBR; the first is followed", structure=where,
                     host_offset=off + S.MBR_ENTRIES_OFFSET + S.MBR_ENTRY_SIZE * int(links[1]))
        link = int(links[0])
        links_without_data = 0 if found_data else links_without_data + 1
        next_lba = ext_start + int(starts[link])
        if not ext_start <= next_lba < ext_end:
            ctx.note("warning", "ebr_outside_extended", f"the EBR at sector {this_lba} links to "
                     f"sector {next_lba}, outside extended partition {slot} "
                     f"({ext_start}..{ext_end - 1})", structure=f"{where}.entry[{link}]",
                     host_offset=off + S.MBR_ENTRIES_OFFSET + S.MBR_ENTRY_SIZE * link)
        this_lba, this_size = next_lba, int(sizes[link])




def _check_mbr_overlaps(ctx: _Context) -> None:
    """Primaries (and extended partitions) must not overlap; neither may logicals."""
    c = ctx.table._columns
    kinds = np.asarray(c["kind"], dtype=object)
    for group in (("primary", "extended"), ("logical",)):
        sel = np.flatnonzero(np.isin(kinds, group))
        if sel.size < 2:
            continue
        start = np.asarray(c["start_sector"], np.uint64)[sel]
        end = start + np.asarray(c["sectors"], np.uint64)[sel]
        order = np.argsort(start, kind="stable")
        s, e = start[order], end[order]
        clash = np.flatnonzero(s[1:] < np.maximum.accumulate(e)[:-1]) + 1
        if clash.size:
            bad = sel[order[clash]]
            numbers = np.asarray(c["number"], np.int64)
            offsets = np.asarray(c["table_offset"], np.uint64)
            ctx.note_entries(np.arange(bad.size), "partition_overlap",
                             lambda k: f"partition {int(numbers[bad[k]])} overlaps another "
                             f"{group[0]} partition", "partition table", offsets[bad],
                             numbers[bad], severity="warning")


# ---------------------------------------------------------------------------------------------
# GPT


@dataclass
class _Header:
    name: str
    lba: int
    values: dict
    rows: list
    valid: bool
    array: bytes = b""
    problems: list = field(default_factory=list)


def _gpt_sector_size(ctx: _Context) -> int:
    """The logical sector size: where 'EFI PART' is, at LBA 1 or at the last LBA."""
    given = ctx.table.sector_size
    candidates = [given] + ([4096] if given == 512 else [])
    for ss in candidates:
        if ctx.read(ss, 8) == S.GPT_SIGNATURE:
            return ss
    for ss in candidates:
        last = ctx.size // ss - 1
        if last > 1 and ctx.read(last * ss, 8) == S.GPT_SIGNATURE:
            return ss
    return given


def _read_gpt_header(ctx: _Context, lba: int, name: str, ss: int) -> _Header:
    """Read and validate one GPT header and its entry array (efi.c is_gpt_valid)."""
    off = lba * ss
    n_lba = ctx.size // ss
    data = ctx.read(off, ss) if 0 < lba < n_lba else b""
    problems: list[tuple[str, str, int]] = []      # (code, message, offset)
    if len(data) < S.GPT_HEADER_SIZE:
        return _Header(name, lba, {}, [], False,
                       problems=[("gpt_header_missing", f"{name}: LBA {lba} is not on the "
                                  f"{ctx.size}-byte disk", off)])
    rows = _layout(S.gpt_header, data, name, off)
    h = {r.field: r.value for r in rows}
    hdr = _Header(name, lba, h, rows, False, problems=problems)
    if h["signature"] != S.GPT_SIGNATURE:
        problems.append(("gpt_signature", f"{name}: no 'EFI PART' signature at LBA {lba}", off))
        return hdr
    hs = h["header_size"]
    if not S.GPT_HEADER_SIZE <= hs <= ss:
        problems.append(("gpt_header_size", f"{name}: header_size {hs} is outside 92..{ss}", off + 12))
        return hdr
    want = S.gpt_header_crc(data, hs)
    if h["header_crc32"] != want:
        problems.append(("gpt_header_crc", f"{name}: header_crc32 {h['header_crc32']:#010x} is "
                         f"wrong (computed {want:#010x})", off + 16))
    if h["my_lba"] != lba:
        problems.append(("gpt_my_lba", f"{name}: my_lba {h['my_lba']} but the header is at LBA {lba}",
                         off + 24))
    if not h["first_usable_lba"] <= h["last_usable_lba"] < n_lba:
        problems.append(("gpt_usable_range", f"{name}: usable range {h['first_usable_lba']}.."
                         f"{h['last_usable_lba']} is empty or past the last LBA {n_lba - 1}", off + 40))
    es, count = h["sizeof_partition_entry"], h["num_partition_entries"]
    if es < S.GPT_ENTRY_SIZE or es % S.GPT_ENTRY_SIZE or (es // S.GPT_ENTRY_SIZE) & (es // S.GPT_ENTRY_SIZE - 1):
        problems.append(("gpt_entry_size", f"{name}: sizeof_partition_entry {es} is not 128 * 2^k",
                         off + 84))
        return hdr
    nbytes = es * count
    array_off = h["partition_entry_lba"] * ss
    if nbytes > min(ctx.limits.max_table_bytes, MAX_GPT_ARRAY_BYTES):
        problems.append(("gpt_entry_array_too_large", f"{name}: {count} entries of {es} bytes "
                         f"({nbytes} bytes) exceed the limit of "
                         f"{min(ctx.limits.max_table_bytes, MAX_GPT_ARRAY_BYTES)} bytes", off + 80))
        return hdr
    if array_off + nbytes > ctx.size or h["partition_entry_lba"] == 0:
        problems.append(("gpt_entry_array_beyond_disk", f"{name}: entry array at LBA "
                         f"{h['partition_entry_lba']} (+{nbytes} bytes) is not inside the disk", off + 72))
        return hdr
    array = ctx.read(array_off, nbytes)
    want = S.crc32(array)
    if h["partition_entry_array_crc32"] != want:
        problems.append(("gpt_entry_array_crc", f"{name}: partition_entry_array_crc32 "
                         f"{h['partition_entry_array_crc32']:#010x} is wrong (computed {want:#010x})",
                         off + 88))
    hdr.array = array
    hdr.valid = not problems
    return hdr


def _report_header(ctx: _Context, hdr: _Header, severity: str = "error") -> None:
    for code, message, off in hdr.problems:
        ctx.note(severity, code, message, structure=hdr.name, host_offset=off)


def _read_gpt(ctx: _Context, mbr_entries: np.ndarray) -> bool:
    """Decode the GPT behind a protective MBR; False when neither header is usable."""
    table = ctx.table
    ss = _gpt_sector_size(ctx)
    n_lba = ctx.size // ss
    last = n_lba - 1
    pmbr = np.flatnonzero(mbr_entries["partition_type"] == S.TYPE_GPT_PROTECTIVE)
    k = int(pmbr[0])
    pmbr_off = S.MBR_ENTRIES_OFFSET + S.MBR_ENTRY_SIZE * k
    primary = _read_gpt_header(ctx, 1, "gpt_header", ss)
    backup_lba = primary.values.get("alternate_lba", last) if primary.valid else last
    if not 1 < backup_lba < n_lba:
        backup_lba = last
    backup = _read_gpt_header(ctx, backup_lba, "gpt_backup_header", ss)
    if not primary.valid and not backup.valid:
        _report_header(ctx, primary)
        _report_header(ctx, backup)
        ctx.note("error", "gpt_invalid", "neither the primary nor the backup GPT header is valid; "
                 "the protective MBR is read as an MBR", structure="gpt_header", host_offset=ss)
        return False
    if ss != table.sector_size:
        ctx.note("info", "sector_size", f"GPT header found at byte {ss}, not "
                 f"{table.sector_size}: {ss}-byte logical sectors", structure="gpt_header",
                 host_offset=ss)
    table.scheme = "gpt"
    table.sector_size = ss
    for hdr in (primary, backup):
        table._field_rows += hdr.rows
        if hdr.rows:
            table._tables[hdr.name] = (lambda r=hdr.rows: _fields_of(r))
    used = primary if primary.valid else backup
    table.used_header = "primary" if primary.valid else "backup"
    if primary.valid:
        if not backup.valid:
            _report_header(ctx, backup)
            ctx.note("error", "gpt_backup_invalid", f"the backup GPT header at LBA {backup_lba} is "
                     "not valid; the primary is used", structure="gpt_backup_header",
                     host_offset=backup_lba * ss, fixable=True)
        else:
            _compare_headers(ctx, primary, backup, last)
    else:
        _report_header(ctx, primary)
        ctx.note("warning", "gpt_backup_used", f"the primary GPT header is not valid; the backup at "
                 f"LBA {backup_lba} is used", structure="gpt_header", host_offset=ss, fixable=True)
    h = used.values
    table.disk_id = h["disk_guid"]
    table.first_lba, table.last_lba = h["first_usable_lba"], h["last_usable_lba"]
    table.gpt_entry_count = h["num_partition_entries"]
    _check_pmbr(ctx, mbr_entries, k, pmbr_off, n_lba)
    if h["revision"] != S.GPT_REVISION_1_0:
        ctx.note("warning", "gpt_revision", f"revision {h['revision']:#010x} is not 1.0",
                 structure=f"{used.name}.revision", host_offset=used.lba * ss + 8)
    if h["sizeof_partition_entry"] != S.GPT_ENTRY_SIZE:
        ctx.note("warning", "gpt_entry_size", f"sizeof_partition_entry {h['sizeof_partition_entry']}: "
                 "Linux accepts only 128", structure=f"{used.name}.sizeof_partition_entry",
                 host_offset=used.lba * ss + 84)
    array_lbas = -(-h["num_partition_entries"] * h["sizeof_partition_entry"] // ss)
    if (h["partition_entry_lba"] <= h["last_usable_lba"]
            and h["partition_entry_lba"] + array_lbas > h["first_usable_lba"]):
        ctx.note("warning", "gpt_entries_in_usable_area", f"the entry array (LBA "
                 f"{h['partition_entry_lba']}, {array_lbas} sectors) lies inside the usable range "
                 f"{h['first_usable_lba']}..{h['last_usable_lba']}",
                 structure=f"{used.name}.partition_entry_lba", host_offset=used.lba * ss + 72)
    _decode_gpt_entries(ctx, used, ss, n_lba)
    return True


def _fields_of(rows):
    from ..frames import fields_frame
    return fields_frame(rows)


def _check_pmbr(ctx: _Context, entries: np.ndarray, k: int, off: int, n_lba: int) -> None:
    lba, size = int(entries["start_lba"][k]), int(entries["num_sectors"][k])
    if lba != 1:
        ctx.note("warning", "pmbr_start", f"protective MBR entry starts at LBA {lba}, not 1 (Linux "
                 "does not accept it as protective)", structure=f"mbr.entry[{k}].start_lba",
                 host_offset=off + 8)
    want = min(n_lba - 1, 0xFFFFFFFF)
    if size != want and size != 0xFFFFFFFF:
        ctx.note("warning", "pmbr_size_mismatch", f"protective MBR covers {size} sectors, the disk "
                 f"has {want} after LBA 0 (disk resized?)", structure=f"mbr.entry[{k}].num_sectors",
                 host_offset=off + 12, fixable=True)
    others = np.flatnonzero((entries["num_sectors"] != 0) & (np.arange(4) != k))
    if others.size:
        ctx.note("info", "hybrid_mbr", f"hybrid MBR: {others.size} entries besides the protective "
                 "one; the GPT is authoritative", structure="mbr", host_offset=S.MBR_ENTRIES_OFFSET)


def _compare_headers(ctx: _Context, p: _Header, b: _Header, last: int) -> None:
    """Linux compare_gpts(): the backup must mirror the primary."""
    pv, bv = p.values, b.values
    boff = b.lba * ctx.table.sector_size
    pairs = [("my_lba", pv["my_lba"], bv["alternate_lba"], 32),
             ("alternate_lba", pv["alternate_lba"], bv["my_lba"], 24)]
    pairs += [(f, pv[f], bv[f], o) for f, o in (("first_usable_lba", 40), ("last_usable_lba", 48),
                                               ("disk_guid", 56), ("num_partition_entries", 80),
                                               ("sizeof_partition_entry", 84),
                                               ("partition_entry_array_crc32", 88))]
    for name, mine, theirs, o in pairs:
        if mine != theirs:
            ctx.note("warning", "gpt_backup_mismatch", f"backup header disagrees with the primary "
                     f"on {name}: primary {mine}, backup {theirs}", structure=f"gpt_backup_header.{name}",
                     host_offset=boff + o, fixable=True)
    if b.lba != last:
        ctx.note("warning", "gpt_backup_not_at_end", f"the backup GPT header is at LBA {b.lba}, not "
                 f"at the last LBA {last} (disk resized?)", structure="gpt_backup_header",
                 host_offset=boff, fixable=True)


def _decode_gpt_entries(ctx: _Context, hdr: _Header, ss: int, n_lba: int) -> None:
    """All entries in one numpy pass; partitions are the slots with a type GUID."""
    import pandas as pd
    h = hdr.values
    es, count = h["sizeof_partition_entry"], h["num_partition_entries"]
    arr = S.gpt_entries(count, es).parse(hdr.array)
    array_off = h["partition_entry_lba"] * ss
    offsets = array_off + np.arange(count, dtype=np.uint64) * np.uint64(es)
    type_raw = np.ascontiguousarray(arr["type_guid"]).view(np.uint8).reshape(-1, 16)
    uniq_raw = np.ascontiguousarray(arr["unique_guid"]).view(np.uint8).reshape(-1, 16)
    first = arr["first_lba"].astype(np.uint64)
    last = arr["last_lba"].astype(np.uint64)
    attrs = arr["attributes"].astype(np.uint64)
    names_u16 = np.array(arr["name"], dtype=np.uint16).reshape(-1, S.GPT_NAME_UNITS)
    used = type_raw.any(axis=1)
    idx = np.flatnonzero(used)
    numbers = np.arange(1, count + 1, dtype=np.int64)
    names = _utf16_names(names_u16[idx])
    type_guids = S.guid_text(type_raw[idx])
    uniq_guids = S.guid_text(uniq_raw[idx])

    def entries_frame():
        all_names = np.full(count, "", dtype=object)
        all_names[idx] = names
        all_types = S.guid_text(type_raw)
        return pd.DataFrame({
            "index": np.arange(count, dtype=np.int64), "offset": offsets,
            "partition_type_guid": all_types,
            "type_name": [S.gpt_type_name(g) for g in all_types],
            "unique_partition_guid": S.guid_text(uniq_raw),
            "starting_lba": first, "ending_lba": last, "attributes": attrs,
            "required": (attrs & np.uint64(1)) != 0, "no_block_io": (attrs & np.uint64(2)) != 0,
            "legacy_bios_bootable": (attrs & np.uint64(4)) != 0,
            "type_bits": (attrs >> np.uint64(48)).astype(np.uint16),
            "partition_name": pd.Series(all_names, dtype=str), "used": used,
        })
    ctx.table._tables["gpt_entries"] = entries_frame
    structure = f"{'gpt' if hdr.name == 'gpt_header' else 'gpt_backup'}_entries"
    f, l = first[idx], last[idx]
    inverted = np.flatnonzero(f > l)
    if inverted.size:
        ctx.note_entries(inverted, "gpt_entry_range", lambda k: f"partition {int(idx[k]) + 1}: "
                         f"starting_lba {int(f[k])} is after ending_lba {int(l[k])}", structure,
                         offsets[idx], numbers[idx])
    lo, hi = np.uint64(h["first_usable_lba"]), np.uint64(h["last_usable_lba"])
    outside = np.flatnonzero((f <= l) & ((f < lo) | (l > hi)))
    if outside.size:
        ctx.note_entries(outside, "gpt_entry_outside_usable", lambda k: f"partition "
                         f"{int(idx[k]) + 1} (LBA {int(f[k])}..{int(l[k])}) is outside the usable "
                         f"range {int(lo)}..{int(hi)}", structure, offsets[idx], numbers[idx],
                         severity="warning")
    sectors = np.where(f <= l, l - f + np.uint64(1), np.uint64(0))
    # byte offsets: sector counts this large cannot be on any disk; cap to avoid wrapping
    cap = np.uint64((1 << 63) // ss)
    start_b = np.minimum(f, cap) * np.uint64(ss)
    size_b = np.minimum(sectors, cap) * np.uint64(ss)
    end_b = start_b + np.minimum(size_b, np.uint64(1 << 63) - start_b)
    clipped = end_b > np.uint64(ctx.size)
    beyond = np.flatnonzero(clipped)
    if beyond.size:
        ctx.note_entries(beyond, "partition_beyond_disk", lambda k: f"partition {int(idx[k]) + 1} "
                         f"(LBA {int(f[k])}..{int(l[k])}) ends past the end of the {ctx.size}-byte "
                         f"disk (last LBA {n_lba - 1}); only the part inside the disk can be read",
                         structure, offsets[idx], numbers[idx])
    ok = np.flatnonzero(f <= l)
    if ok.size > 1:
        order = ok[np.argsort(f[ok], kind="stable")]
        clash = np.flatnonzero(f[order][1:] <= np.maximum.accumulate(l[order])[:-1]) + 1
        if clash.size:
            bad = order[clash]
            ctx.note_entries(bad, "partition_overlap", lambda k: f"partition {int(idx[k]) + 1} "
                             "overlaps another partition", structure, offsets[idx], numbers[idx],
                             severity="warning")
    c = ctx.table._columns
    c["number"] = numbers[idx].tolist()
    c["kind"] = ["gpt"] * idx.size
    c["start"] = start_b.tolist()
    c["size"] = size_b.tolist()
    c["end"] = end_b.tolist()
    c["start_sector"] = f.tolist()
    c["sectors"] = sectors.tolist()
    c["end_sector"] = l.tolist()
    c["type"] = type_guids
    c["type_name"] = [S.gpt_type_name(g) for g in type_guids]
    c["bootable"] = ((attrs[idx] & np.uint64(4)) != 0).tolist()
    c["name"] = names
    c["uuid"] = uniq_guids
    c["attributes"] = attrs[idx].tolist()
    c["table_offset"] = offsets[idx].tolist()
    c["clipped"] = clipped.tolist()


def _utf16_names(units: np.ndarray) -> list[str]:
    """Names up to the first NUL, decoded from UTF-16LE code units in one numpy pass."""
    if not units.size:
        return []
    units = units.copy()
    units[np.logical_or.accumulate(units == 0, axis=1)] = 0
    names = units.astype("<u4").view(f"<U{S.GPT_NAME_UNITS}").ravel().tolist()
    surrogate = np.flatnonzero(((units >= 0xD800) & (units < 0xE000)).any(axis=1))
    for i in surrogate.tolist():            # pairs (and lone halves) need a real UTF-16 decode
        n = int(np.argmax(units[i] == 0)) if (units[i] == 0).any() else S.GPT_NAME_UNITS
        names[i] = units[i, :n].astype("<u2").tobytes().decode("utf-16-le", "replace")
    return names
