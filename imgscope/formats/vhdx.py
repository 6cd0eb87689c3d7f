"""VHDX driver: fixed, dynamic and differencing disks, with the metadata log.

Layout: a 1 MiB header section (file identifier, two headers, two region tables),
then the log, the BAT and the metadata region (QEMU: at 1, 2 and 3 MiB) and the
payload / sector-bitmap blocks (QEMU: from 8 MiB on).

What QEMU 7.2 does, and imgscope copies so that info and guest bytes agree:
* the current header is the valid one (CRC-32C, 'head', version 1) with the higher
  sequence number; equal numbers are accepted only for identical headers;
* only region table 1 is read; the BAT and metadata regions must not overlap each
  other or the log; an unknown *required* region or metadata item refuses the file;
* reads: FULLY_PRESENT is data at the BAT offset; NOT_PRESENT, UNDEFINED, ZERO and
  UNMAPPED read as zeros; PARTIALLY_PRESENT and differencing disks are refused;
* a log that still holds entries for the current log GUID is replayed when QEMU
  opens the file read-write and refuses every read-only open (qemu-img info / map /
  convert fail with "opened read-only, but contains a log that needs to be replayed");
* ``qemu-img map`` reports the whole disk as one data run without offsets (the
  driver has no block-status callback): ``map_extent_table()`` gives that view.
imgscope never writes: it applies a pending log in memory (``self.view``), reads
differencing disks through their parent as the VHDX specification says (sector
bitmap bit set = this file, LSB first, one bit per logical sector) and reports what
QEMU would refuse as findings.
"""
from __future__ import annotations

import construct as cs
import numpy as np

from ..errors import ChainError, ImageError, ParseError, Truncated, UnsafePath
from ..io.source import Source
from ..model import Image, ExtentTable, KIND_DATA, KIND_ZERO, KIND_UNALLOCATED, NO_HOST
from ..schemas import vhdx as X
from ..schemas._types import FieldRow, field_layout
from . import open_backing
from .base import coalesce, note_bad_entries, validate_table

U64 = np.uint64
MiB = X.MiB
_MAX_U64 = (1 << 64) - 1
#: field rows are listed for at most this many entries of a table of records
ROWS_PER_TABLE = 16
#: log entries examined (a hostile log could hold one per 4 KiB sector)
MAX_LOG_ENTRIES = 4096
#: bytes of log entries checksummed in total
LOG_CRC_BUDGET = 32 * MiB
#: parent locator key/value pairs decoded
MAX_LOCATOR_ENTRIES = 256
_PAYLOAD_VALID = np.array(sorted(X.PAYLOAD_STATES), np.uint64)
_QEMU_LOG_NOTE = ("QEMU 7.2 refuses every read-only open of a file whose log still needs "
                  "replay (qemu-img info/map/convert: 'opened read-only, but contains a log that "
                  "needs to be replayed') and replays it when it opens the file read-write "
                  "(qemu-io, qemu-img check -r all); imgscope applies it in memory and never writes")


def _guid(raw) -> str:
    """Canonical text of 16 GUID bytes in Microsoft order."""
    return X.GuidAdapter(cs.Bytes(16)).parse(bytes(raw))


def _norm_guid(text: str | None) -> str | None:
    """'{ABC...}' -> 'abc...' (None when it is no GUID)."""
    if not text:
        return None
    try:
        return _guid(X.guid_bytes(text.strip()))
    except ValueError:
        return None


class _ReplayedSource:
    """A Source with the pending log applied in memory: reads see the replayed bytes.

    The patches are parallel arrays in replay order (later ones win): target offset,
    length, and the row of `bodies` holding the 4 KiB sector (-1: zeros).  The file is
    never written; everything else is the underlying Source's.
    """

    def __init__(self, source: Source, offsets: np.ndarray, lengths: np.ndarray,
                 body_rows: np.ndarray, bodies: np.ndarray, size: int) -> None:
        self._source = source
        self._off, self._len, self._row, self._bodies = offsets, lengths, body_rows, bodies
        self._end = offsets + np.minimum(lengths, U64(_MAX_U64) - offsets)   # no wrap-around
        self.size = max(size, source.size)

    def __getattr__(self, name):
        return getattr(self._source, name)

    def _patch(self, offset: int, buf: np.ndarray) -> None:
        end = offset + buf.size
        hit = np.flatnonzero((self._off < U64(end)) & (U64(offset) < self._end))
        for i in hit.tolist():                  # patches touching this read, in replay order
            p_off = int(self._off[i])
            lo, hi = max(offset, p_off), min(end, p_off + int(self._len[i]))
            row = int(self._row[i])
            buf[lo - offset:hi - offset] = 0 if row < 0 else self._bodies[row, lo - p_off:hi - p_off]

    def pread_into(self, offset: int, out: np.ndarray) -> int:
        want = max(0, min(out.size, self.size - offset))
        got = self._source.pread_into(offset, out[:want]) if offset < self._source.size else 0
        out[got:want] = 0
        self._patch(offset, out[:want])
        return want

    def read_upto(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length <= 0:
            return b""
        buf = np.zeros(length, np.uint8)
        data = self._source.read_upto(offset, length)
        buf[:len(data)] = np.frombuffer(data, np.uint8)
        self._patch(offset, buf)
        return buf.tobytes()

    def read(self, offset: int, length: int, structure: str = "data") -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise Truncated(f"{structure} of {length} bytes extends past end of file "
                            f"({self.size} bytes)", path=str(self._source.path),
                            offset=offset, structure=structure)
        return self.read_upto(offset, length)

    def gather(self, offsets: np.ndarray, width: int) -> np.ndarray:
        offsets = np.asarray(offsets, np.uint64)
        out = self._source.gather(offsets, width)
        touched = np.zeros(offsets.size, bool)
        for p_off, p_len in zip(self._off.tolist(), self._len.tolist()):
            p_end = U64(min(p_off + p_len, _MAX_U64))
            touched |= (offsets < p_end) & (U64(p_off) < offsets + U64(width))
        for row in np.flatnonzero(touched).tolist():
            self._patch(int(offsets[row]), out[row])
        return out

    def close(self) -> None:       # the Image closes the real source
        pass


class VhdxImage(Image):
    format = "vhdx"

    def __init__(self, source: Source, **kw) -> None:
        super().__init__(source, **kw)
        self.view = source                   # what structures and data are read from
        self.creator = ""
        self.headers: list[dict | None] = [None, None]
        self.header: dict = {}
        self.current_header = 0
        self.log_entries: list[dict] = []
        self.log_sequence: list[dict] = []   # entries replayed, in order
        self.region_tables: list[dict | None] = [None, None]
        self.region_table_used: int | None = None
        self.regions_found: list[dict] = []
        self.bat_region: tuple[int, int] | None = None
        self.metadata_region: tuple[int, int] | None = None
        self.metadata_items: dict[str, dict] = {}
        self.block_size = 0
        self.logical_sector_size = 512
        self.physical_sector_size = 512
        self.has_parent = False
        self.leave_blocks_allocated = False
        self.usable = False
        self.chunk_ratio = 0
        self.bat: np.ndarray | None = None
        self.parent_locator: dict[str, str] = {}
        self.locator_entries: list[dict] = []
        self._read_file_identifier()
        self._read_headers()
        self._read_log()
        self._read_region_tables()
        self._read_metadata()
        self._read_bat()
        if self.has_parent:
            self._open_parent()
        self._summary_rows()
        self._register_tables()

    # ---- file identifier and headers -------------------------------------------------
    def _layout(self, struct, data: bytes, structure: str, base: int, start: int = 0) -> list:
        try:
            return field_layout(struct, data, structure=structure, base_offset=base, start=start)
        except (cs.ConstructError, ValueError) as exc:
            raise ParseError(f"{structure} does not parse: {exc}", path=str(self.path),
                             offset=base + start, structure=structure) from None

    def _records(self, struct, array, data: bytes, base: int, first: int, size: int, count: int,
                 name: str) -> np.ndarray:
        """`count` records of `size` bytes from `first` in `data`: field rows for the first
        ROWS_PER_TABLE, one numpy record array (`array(count)`) for all of them."""
        for k in range(min(count, ROWS_PER_TABLE)):
            self._field_rows += self._layout(struct, data, f"{name}.entry[{k}]", base, first + k * size)
        return array(count).parse(data[first:first + count * size])

    def _read_file_identifier(self) -> None:
        size = len(X.FILE_SIGNATURE) + X.CREATOR_SIZE
        data = self.source.read_upto(0, size)
        if data[:8] != X.FILE_SIGNATURE:
            raise ParseError("not a VHDX image: bytes 0-7 are not 'vhdxfile'", path=str(self.path),
                             offset=0, structure="file_identifier.signature")
        rows = self._layout(X.file_identifier, data.ljust(size, b"\0"), "file_identifier", 0)
        self._field_rows += rows
        self.creator = rows[1].value

    def _read_headers(self) -> None:
        raws = []
        for i, off in enumerate((X.HEADER1_OFFSET, X.HEADER2_OFFSET)):
            name = f"header{i + 1}"
            raw = self.source.read_upto(off, X.HEADER_SIZE)
            raws.append(raw)
            if len(raw) < X.HEADER_SIZE:
                self.note("error", "header_truncated", f"{name} at {off:#x} is cut by the end of "
                          f"the file ({self.source.size} bytes)", structure=name, host_offset=off)
                continue
            rows = self._layout(X.header, raw, name, off)
            self._field_rows += rows
            h = {r.field: r.value for r in rows}
            want = X.checksum(raw)
            problems = []
            if h["checksum"] != want:
                problems.append(("header_checksum", f"checksum {h['checksum']:#010x} is wrong "
                                 f"(CRC-32C {want:#010x})", 4))
            if h["signature"] != X.HEADER_SIGNATURE:
                problems.append(("header_signature", f"signature {h['signature']!r} is not 'head'", 0))
            if h["version"] != 1:
                problems.append(("header_version", f"version {h['version']} is not 1", 66))
            for code, msg, at in problems:
                self.note("error", code, f"{name}: {msg}; the header is not valid",
                          structure=f"{name}.{code.split('_', 1)[1]}", host_offset=off + at)
            h["_valid"] = not problems
            self.headers[i] = h
        valid = [i for i in (0, 1) if self.headers[i] is not None and self.headers[i]["_valid"]]
        if not valid:
            raise ParseError("no valid VHDX header: both headers fail their checksum, signature "
                             "or version check (QEMU: 'No valid VHDX header found')",
                             path=str(self.path), offset=X.HEADER1_OFFSET, structure="header")
        if len(valid) == 1:
            cur = valid[0]
            self.note("warning", "header_copy_invalid", f"only header{cur + 1} is valid; it is "
                      "used (QEMU does the same)", structure=f"header{2 - cur}",
                      host_offset=(X.HEADER2_OFFSET if cur == 0 else X.HEADER1_OFFSET))
        else:
            h1, h2 = self.headers
            if h1["sequence_number"] != h2["sequence_number"]:
                cur = 0 if h1["sequence_number"] > h2["sequence_number"] else 1
            else:
                cur = 0
                if raws[0] != raws[1]:
                    self.note("error", "header_sequence_tie", "both headers are valid with the "
                              f"same sequence_number {h1['sequence_number']} but differ (QEMU "
                              "refuses the file); header1 is used", structure="header2.sequence_number",
                              host_offset=X.HEADER2_OFFSET + 8)
            other = self.headers[1 - cur]
            # not data_write_guid: QEMU gives each header its own on the first write
            differ = [k for k in ("log_guid", "log_version", "version", "log_length", "log_offset")
                      if other[k] != self.headers[cur][k]]
            if differ:
                self.note("warning", "headers_differ", f"header{2 - cur} (the older copy) differs "
                          f"from the current header{cur + 1} in {', '.join(differ)} (an update "
                          "that did not reach both copies)", structure=f"header{2 - cur}",
                          host_offset=X.HEADER2_OFFSET if cur == 0 else X.HEADER1_OFFSET,
                          raise_in_strict=False)
        self.current_header = cur
        self.header = self.headers[cur]

    # ---- log ---------------------------------------------------------------------------
    def _read_log(self) -> None:
        h = self.header
        off, length = h["log_offset"], h["log_length"]
        hname = f"header{self.current_header + 1}"
        hoff = X.HEADER1_OFFSET if self.current_header == 0 else X.HEADER2_OFFSET
        self.log_offset, self.log_length = off, length
        pending = h["log_guid"] != X.NULL_GUID
        if h["log_version"] != 0:
            self.note("error", "log_version", f"log_version {h['log_version']} is not 0 (QEMU "
                      "refuses the file)", structure=f"{hname}.log_version", host_offset=hoff + 64)
        if off < MiB or off % MiB:
            self.note("error", "log_offset_invalid", f"log_offset {off:#x} is not a multiple of "
                      "1 MiB past the header section (QEMU refuses the file)",
                      structure=f"{hname}.log_offset", host_offset=hoff + 72)
            self.log_length = length = 0
        if length % MiB:
            self.note("error" if pending else "warning", "log_length_invalid",
                      f"log_length {length} is not a multiple of 1 MiB" +
                      (" (QEMU refuses the file)" if pending else ""),
                      structure=f"{hname}.log_length", host_offset=hoff + 68)
            length -= length % X.LOG_SECTOR_SIZE
        if not length:
            return
        if not validate_table(self, off, length, "log", severity="error" if pending else "warning"):
            self.log_length = 0
            return
        self._scan_log(off, length)
        if not pending:
            return
        self._choose_log_sequence(length)
        if not self.log_sequence:
            self.note("info", "log_guid_without_entries", f"log_guid {h['log_guid']} is set but "
                      "no valid log entry carries it: nothing to replay (QEMU opens the file)",
                      structure=f"{hname}.log_guid", host_offset=hoff + 48, raise_in_strict=False)
            return
        seqs = [e["sequence_number"] for e in self.log_sequence]
        self.note("warning", "log_replay_needed", f"the log holds {len(seqs)} entr"
                  f"{'y' if len(seqs) == 1 else 'ies'} (sequence {seqs[0]}..{seqs[-1]}) not yet "
                  "written to their places: a reader that ignores them returns stale data. "
                  + _QEMU_LOG_NOTE, structure="log",
                  host_offset=off + self.log_sequence[0]["log_position"], raise_in_strict=False)
        last = self.source.size
        for e in self.log_sequence:
            if e["flushed_file_offset"] > self.source.size:
                self.note("error", "log_flushed_beyond_eof", f"log entry {e['sequence_number']}: "
                          f"flushed_file_offset {e['flushed_file_offset']} is past the end of the "
                          f"file ({self.source.size} bytes): the file lost data after the entry was "
                          "written (QEMU refuses to replay it)", structure="log",
                          host_offset=off + e["log_position"])
            last = max(last, min(e["last_file_offset"], 1 << 62))
        parts = [e["_patches"] for e in self.log_sequence]
        shift = np.cumsum([0] + [p[3].shape[0] for p in parts])[:-1]
        rows = np.concatenate([np.where(p[2] >= 0, p[2] + k, -1) for p, k in zip(parts, shift)])
        # replay extends a short file to last_file_offset (rounded up to 1 MiB)
        size = -(-last // MiB) * MiB if last > self.source.size else self.source.size
        self.view = _ReplayedSource(self.source, np.concatenate([p[0] for p in parts]),
                                    np.concatenate([p[1] for p in parts]), rows,
                                    np.concatenate([p[3] for p in parts]), size)

    def _read_log_bytes(self, off: int, length: int, pos: int, n: int) -> bytes:
        """`n` bytes of the circular log starting `pos` bytes into it."""
        first = min(n, length - pos)
        data = self.source.read(off + pos, first, "log")
        if first < n:
            data += self.source.read(off, n - first, "log")
        return data

    def _scan_log(self, off: int, length: int) -> None:
        """Every 4 KiB log sector that starts with 'loge' is examined as an entry."""
        step = 8 * MiB
        starts = []
        for base in range(0, length, step):
            chunk = np.frombuffer(self.source.read(off + base, min(step, length - base), "log"),
                                  np.uint8).reshape(-1, X.LOG_SECTOR_SIZE)
            hit = np.flatnonzero((chunk[:, :4] == np.frombuffer(X.LOG_SIGNATURE, np.uint8)).all(axis=1))
            starts += (base + hit * X.LOG_SECTOR_SIZE).tolist()
            if len(starts) > MAX_LOG_ENTRIES:
                break
        if len(starts) > MAX_LOG_ENTRIES:
            self.note("warning", "log_scan_limited", f"more than {MAX_LOG_ENTRIES} log sectors "
                      "start with 'loge'; only the first ones are examined", structure="log",
                      host_offset=off)
            starts = starts[:MAX_LOG_ENTRIES]
        budget = LOG_CRC_BUDGET
        guid = self.header["log_guid"]
        for k, pos in enumerate(starts):
            raw = self.source.read(off + pos, X.LOG_ENTRY_HEADER_SIZE, "log entry")
            e = X.log_entry_header.parse(raw)
            e = {name: e[name] for name in e if not name.startswith("_")}
            e.update(index=k, log_position=pos, file_offset=off + pos, checksum_ok=False,
                     descriptors_ok=False, guid_matches=e["log_guid"] == guid, valid=False,
                     active=False, data_descriptors=0, zero_descriptors=0, problem="",
                     _descriptors=None, _patches=None)
            self.log_entries.append(e)
            n = e["entry_length"]
            nsect = n // X.LOG_SECTOR_SIZE
            dsect = (e["descriptor_count"] + 2 + 127) // 128
            if not n or n % X.LOG_SECTOR_SIZE or n > length:
                e["problem"] = f"entry_length {n} is not a multiple of 4 KiB up to the log length"
                continue
            if e["sequence_number"] == 0:
                e["problem"] = "sequence_number is 0"
                continue
            if e["descriptor_count"] * X.LOG_DESCRIPTOR_SIZE > n or dsect > nsect:
                e["problem"] = f"{e['descriptor_count']} descriptors do not fit {n} bytes"
                continue
            if n > budget:
                e["problem"] = "not checked (checksum budget spent)"
                continue
            budget -= n
            data = self._read_log_bytes(off, length, pos, n)
            e["checksum_ok"] = X.checksum(data) == e["checksum"]
            if not e["checksum_ok"]:
                e["problem"] = "checksum mismatch"
            self._check_log_descriptors(e, data, dsect, nsect)

    def _check_log_descriptors(self, e: dict, data: bytes, dsect: int, nsect: int) -> None:
        count = e["descriptor_count"]
        desc = np.frombuffer(data, X.LOG_DESCRIPTOR_DTYPE, count=count,
                             offset=X.LOG_ENTRY_HEADER_SIZE).copy()     # the entry's bytes can go
        seq = e["sequence_number"]
        is_data = desc["signature"] == X.LOG_DESC_SIGNATURE
        is_zero = desc["signature"] == X.LOG_ZERO_SIGNATURE
        ok = (is_data | is_zero) & (desc["sequence_number"] == U64(seq)) \
            & (desc["file_offset"] % U64(X.LOG_SECTOR_SIZE) == 0) \
            & (~is_zero | (desc["leading_bytes"] % U64(X.LOG_SECTOR_SIZE) == 0))
        ndata = int(is_data.sum())
        e["data_descriptors"], e["zero_descriptors"] = ndata, int(is_zero.sum())
        e["_descriptors"] = desc
        if not ok.all():
            e["problem"] = e["problem"] or f"descriptor {int(np.flatnonzero(~ok)[0])} is invalid"
            return
        if dsect + ndata > nsect:
            e["problem"] = e["problem"] or f"{ndata} data sectors do not fit the entry"
            return
        sectors = np.frombuffer(data, X.LOG_DATA_SECTOR_DTYPE, count=ndata,
                                offset=dsect * X.LOG_SECTOR_SIZE)
        high, low = sectors["sequence_high"].astype(U64), sectors["sequence_low"].astype(U64)
        sector_seq = (high << U64(32)) | low
        good = (sectors["signature"] == X.LOG_DATA_SIGNATURE) & (sector_seq == U64(seq))
        if not good.all():
            e["problem"] = e["problem"] or f"data sector {int(np.flatnonzero(~good)[0])} is invalid"
            return
        e["descriptors_ok"] = True
        e["valid"] = e["checksum_ok"] and e["guid_matches"]
        if not e["guid_matches"] and not e["problem"]:
            e["problem"] = "log_guid differs from the current header's (a stale entry)"
        # the patches this entry applies, in descriptor order
        leading = desc["leading_bytes"][is_data].astype("<u8").view(np.uint8).reshape(-1, 8)
        trailing = desc["trailing_bytes"][is_data].astype("<u4").view(np.uint8).reshape(-1, 4)
        body = np.frombuffer(sectors["data"].tobytes(), np.uint8).reshape(-1, X.LOG_DATA_BYTES)
        rows = np.where(is_data, np.cumsum(is_data) - 1, -1).astype(np.int64)
        lengths = np.where(is_data, U64(X.LOG_SECTOR_SIZE), desc["leading_bytes"]).astype(U64)
        e["_patches"] = (desc["file_offset"].astype(U64), lengths, rows,
                         np.concatenate([leading, body, trailing], axis=1))

    def _choose_log_sequence(self, length: int) -> None:
        """The active sequence as the specification defines it: the valid entry with the
        highest sequence number is the head; its tail names the first entry; the entries
        from there to the head follow each other with consecutive sequence numbers.
        Without such a chain, QEMU's rule (below) decides."""
        valid = {e["log_position"]: e for e in self.log_entries if e["valid"]}
        if not valid:
            return
        qemu = self._qemu_log_sequence(valid, length)
        head = max(valid.values(), key=lambda e: e["sequence_number"])
        run, pos = [], head["tail"]
        while pos in valid and len(run) < len(valid):
            e = valid[pos]
            if run and e["sequence_number"] != run[-1]["sequence_number"] + 1:
                break
            run.append(e)
            if e is head:
                break
            pos = (pos + e["entry_length"]) % length
        best = run if run and run[-1] is head else qemu
        if [e["index"] for e in best] != [e["index"] for e in qemu]:
            self.note("warning", "log_sequence_qemu_differs", "QEMU 7.2 would replay log entries "
                      f"{[e['sequence_number'] for e in qemu]} (the run whose first entry has the "
                      "highest sequence number), the specification's active sequence is "
                      f"{[e['sequence_number'] for e in best]} (from the head's tail to the head); "
                      "imgscope replays the latter", structure="log",
                      host_offset=self.log_offset + head["log_position"], raise_in_strict=False)
        for e in best:
            e["active"] = True
        self.log_sequence = best

    @staticmethod
    def _qemu_log_sequence(valid: dict, length: int) -> list:
        """QEMU's choice: runs of valid entries, each starting where the previous one ends
        with the next sequence number; the run whose first entry has the highest sequence
        number wins (vhdx_log_search)."""
        used: set = set()
        best: list = []
        for pos in sorted(valid):
            if pos in used:
                continue
            run = [valid[pos]]
            used.add(pos)
            nxt = (pos + run[-1]["entry_length"]) % length
            while nxt in valid and nxt not in used and \
                    valid[nxt]["sequence_number"] == run[-1]["sequence_number"] + 1:
                run.append(valid[nxt])
                used.add(nxt)
                nxt = (nxt + run[-1]["entry_length"]) % length
            if not best or run[0]["sequence_number"] > best[0]["sequence_number"]:
                best = run
        return best

    # ---- region tables -------------------------------------------------------------------
    def _read_region_tables(self) -> None:
        raws = [b"", b""]
        for i, off in enumerate((X.REGION_TABLE1_OFFSET, X.REGION_TABLE2_OFFSET)):
            name = f"region_table{i + 1}"
            raw = self.view.read_upto(off, X.REGION_TABLE_SIZE)
            raws[i] = raw
            if len(raw) < X.REGION_TABLE_SIZE:
                self.note("error" if i == 0 else "warning", "region_table_truncated",
                          f"{name} at {off:#x} is cut by the end of the file", structure=name,
                          host_offset=off)
                continue
            rows = self._layout(X.region_table_header, raw, name, off)
            self._field_rows += rows
            t = {r.field: r.value for r in rows}
            problems = []
            want = X.checksum(raw)
            if t["checksum"] != want:
                problems.append(("region_table_checksum", f"checksum {t['checksum']:#010x} is "
                                 f"wrong (CRC-32C {want:#010x})", 4))
            if t["signature"] != X.REGION_SIGNATURE:
                problems.append(("region_table_signature", f"signature {t['signature']!r} is not "
                                 "'regi'", 0))
            count = t["entry_count"]
            if count > X.REGION_TABLE_MAX_ENTRIES:
                problems.append(("region_table_entry_count", f"entry_count {count} exceeds 2047", 8))
                count = X.REGION_TABLE_MAX_ENTRIES
            for code, msg, at in problems:      # QEMU reads only table 1: table 2 is a spare
                self.note("error" if i == 0 else "warning", code, f"{name}: {msg}" +
                          (" (QEMU reads only region table 1 and refuses the file)" if i == 0 else ""),
                          structure=name, host_offset=off + at)
            t["entries"] = self._records(X.region_table_entry, X.region_entries, raw, off,
                                         X.REGION_TABLE_HEADER_SIZE, X.REGION_ENTRY_SIZE, count, name)
            t["valid"] = not problems
            t["offset"] = off
            self.region_tables[i] = t
        usable = [i for i, t in enumerate(self.region_tables) if t is not None and t["valid"]]
        if not usable:
            raise ParseError("no valid region table: both fail their checksum, signature or entry "
                             "count check", path=str(self.path), offset=X.REGION_TABLE1_OFFSET,
                             structure="region_table")
        used = usable[0]
        if used == 1:
            self.note("error", "region_table1_invalid", "region table 1 is not valid; region "
                      "table 2 is used (QEMU reads only table 1 and refuses the file)",
                      structure="region_table1", host_offset=X.REGION_TABLE1_OFFSET)
        elif len(usable) == 2:
            n = [X.REGION_TABLE_HEADER_SIZE + len(t["entries"]) * X.REGION_ENTRY_SIZE
                 for t in self.region_tables]
            if raws[0][8:n[0]] != raws[1][8:n[1]]:
                self.note("warning", "region_tables_differ", "region table 2 is not a copy of "
                          "region table 1 (table 1 is used, as QEMU does)", structure="region_table2",
                          host_offset=X.REGION_TABLE2_OFFSET)
        self.region_table_used = used
        self._check_regions(self.region_tables[used])

    def _check_regions(self, table: dict) -> None:
        entries = table["entries"]
        name = f"region_table{self.region_table_used + 1}"
        base = table["offset"] + X.REGION_TABLE_HEADER_SIZE
        known = [("header section", 0, X.HEADER_SECTION_END)]
        if self.log_length:
            known.append(("log", self.log_offset, self.log_length))
        for k, entry in enumerate(entries):            # at most 2047 records
            guid = _guid(entry["guid"])
            off, length, bits = int(entry["file_offset"]), int(entry["length"]), int(entry["data_bits"])
            what = X.REGION_NAMES.get(guid)
            where = dict(structure=f"{name}.entry[{k}]", index=k,
                         host_offset=base + k * X.REGION_ENTRY_SIZE)
            r = dict(table=self.region_table_used + 1, index=k, guid=guid, name=what or "unknown",
                     file_offset=off, length=length, required=bool(bits & X.REGION_REQUIRED),
                     used=False)
            self.regions_found.append(r)
            if what is None:
                if bits & X.REGION_REQUIRED:
                    self.note("error", "region_unknown_required", f"region {guid} is unknown and "
                              "marked required (QEMU refuses the file)", **where)
                else:
                    self.note("info", "region_unknown", f"region {guid} is unknown (ignored)",
                              raise_in_strict=False, **where)
            elif (what == "BAT" and self.bat_region) or (what == "metadata" and self.metadata_region):
                self.note("error", "region_duplicate", f"a second {what} region (QEMU refuses the "
                          "file); the first is used", **where)
                continue
            if off % MiB or length % MiB:
                self.note("warning", "region_misaligned", f"region {what or guid} at {off:#x} "
                          f"(+{length}) is not aligned to 1 MiB", **where)
            for other, o_off, o_len in known:
                if off < o_off + o_len and o_off < off + length:
                    self.note("error", "region_overlap", f"region {what or guid} at {off:#x} "
                              f"(+{length}) overlaps the {other} (QEMU refuses the file)", **where)
            if off + length > self.source.size:
                self.note("warning", "region_beyond_eof", f"region {what or guid} at {off:#x} "
                          f"(+{length}) extends past the end of the file ({self.source.size} bytes; "
                          "the rest reads as zeros)", **where)
            known.append((f"{what or guid} region", off, length))
            if what == "BAT":
                self.bat_region = (off, length)
                r["used"] = True
            elif what == "metadata":
                self.metadata_region = (off, length)
                r["used"] = True
        for what, attr in (("BAT", "bat_region"), ("metadata", "metadata_region")):
            if getattr(self, attr) is None:
                self.note("error", "region_missing", f"the region table has no {what} region (QEMU "
                          "refuses the file)", structure=name, host_offset=table["offset"])
        if self.metadata_region is None:
            raise ParseError("no metadata region: the disk size and block size are unknown",
                             path=str(self.path), offset=table["offset"], structure=name)

    # ---- metadata --------------------------------------------------------------------------
    def _read_metadata(self) -> None:
        r_off, r_len = self.metadata_region
        want = min(X.METADATA_TABLE_SIZE, max(r_len, X.METADATA_TABLE_HEADER_SIZE))
        raw = self.view.read_upto(r_off, want)
        if len(raw) < X.METADATA_TABLE_HEADER_SIZE:
            raise ParseError("the metadata table lies past the end of the file", path=str(self.path),
                             offset=r_off, structure="metadata_table")
        raw = raw.ljust(X.METADATA_TABLE_SIZE, b"\0")
        rows = self._layout(X.metadata_table_header, raw, "metadata_table", r_off)
        self._field_rows += rows
        t = {r.field: r.value for r in rows}
        if t["signature"] != X.METADATA_SIGNATURE:
            raise ParseError(f"metadata table signature {t['signature']!r} is not 'metadata'",
                             path=str(self.path), offset=r_off, structure="metadata_table.signature")
        count = t["entry_count"]
        if count > X.METADATA_TABLE_MAX_ENTRIES:
            self.note("error", "metadata_entry_count", f"entry_count {count} exceeds 2047 (QEMU "
                      "refuses the file); the first 2047 entries are read",
                      structure="metadata_table.entry_count", host_offset=r_off + 10)
            count = X.METADATA_TABLE_MAX_ENTRIES
        entries = self._records(X.metadata_table_entry, X.metadata_entries, raw, r_off,
                                X.METADATA_TABLE_HEADER_SIZE, X.METADATA_ENTRY_SIZE, count,
                                "metadata_table")
        self.metadata_table = []
        for k, entry in enumerate(entries):            # at most 2047 records
            guid = _guid(entry["item_id"])
            off, length, bits = int(entry["offset"]), int(entry["length"]), int(entry["data_bits"])
            name = X.METADATA_ITEM_NAMES.get(guid)
            where = dict(structure=f"metadata_table.entry[{k}]", index=k,
                         host_offset=r_off + X.METADATA_TABLE_HEADER_SIZE + k * X.METADATA_ENTRY_SIZE)
            item = dict(index=k, item_id=guid, name=name or "unknown", offset=off, length=length,
                        file_offset=r_off + off, flags=bits,
                        required=bool(bits & X.METADATA_IS_REQUIRED), used=False)
            self.metadata_table.append(item)
            if name is None:
                if bits & X.METADATA_IS_REQUIRED:
                    self.note("error", "metadata_unknown_required", f"metadata item {guid} is "
                              "unknown and marked required (QEMU refuses the file)", **where)
                continue
            if guid in self.metadata_items:
                self.note("error", "metadata_duplicate", f"a second {name} item (QEMU refuses the "
                          "file); the first is used", **where)
                continue
            if length > X.METADATA_ITEM_MAX_LENGTH or off + length > r_len or \
                    (length and off < X.METADATA_TABLE_SIZE) or (not length and off):
                self.note("error", "metadata_item_out_of_place", f"{name} item at region offset "
                          f"{off:#x} (+{length}) is not inside the metadata region after its "
                          f"table (region of {r_len} bytes; items are at most 1 MiB)", **where)
            item["used"] = True
            self.metadata_items[guid] = item
        self._read_items()

    def _item_bytes(self, guid: str, need: int) -> bytes | None:
        item = self.metadata_items.get(guid)
        if item is None:
            return None
        if item["length"] < need:
            self.note("error", "metadata_item_short", f"{item['name']} item is {item['length']} "
                      f"bytes, {need} are needed (QEMU reads {need} bytes anyway)",
                      structure=f"metadata_table.entry[{item['index']}]", index=item["index"],
                      host_offset=item["file_offset"])
        data = self.view.read_upto(item["file_offset"], need)
        if len(data) < need:
            self.note("error", "metadata_item_beyond_eof", f"{item['name']} item at "
                      f"{item['file_offset']:#x} lies past the end of the file (read as zeros)",
                      structure=item["name"], host_offset=item["file_offset"])
        return data.ljust(need, b"\0")

    def _read_items(self) -> None:
        values: dict = {}
        for guid, struct in X.ITEM_STRUCTS.items():
            name = X.METADATA_ITEM_NAMES[guid]
            data = self._item_bytes(guid, X.ITEM_SIZES[guid])
            if data is None:
                if guid in X.REQUIRED_ITEMS:
                    self.note("error", "metadata_missing", f"the required {name} item is missing "
                              "(QEMU refuses the file)", structure="metadata_table",
                              host_offset=self.metadata_region[0])
                continue
            rows = self._layout(struct, data, name, self.metadata_items[guid]["file_offset"])
            self._field_rows += rows
            values.update({r.field: r.value for r in rows})
        if "virtual_disk_size" not in values or "block_size" not in values:
            raise ParseError("the metadata has no virtual disk size or file parameters item",
                             path=str(self.path), offset=self.metadata_region[0],
                             structure="metadata_table")
        where = lambda g: dict(structure=X.METADATA_ITEM_NAMES[g],
                               host_offset=self.metadata_items[g]["file_offset"]
                               if g in self.metadata_items else None)
        bs, flags_ = values["block_size"], values["data_bits"]
        self.has_parent = bool(flags_ & X.PARAMS_HAS_PARENT)
        self.leave_blocks_allocated = bool(flags_ & X.PARAMS_LEAVE_BLOCKS_ALLOCATED)
        self.variant = ("differencing" if self.has_parent else
                        "fixed" if self.leave_blocks_allocated else "dynamic")
        usable = True
        if not (X.BLOCK_SIZE_MIN <= bs <= X.BLOCK_SIZE_MAX) or bs & (bs - 1):
            self.note("error", "block_size_invalid", f"block_size {bs} is not a power of two from "
                      "1 MiB to 256 MiB (QEMU refuses the file); no block can be mapped",
                      **where(X.FILE_PARAMETERS_GUID))
            usable = False
        lss = values.get("logical_sector_size", 512)
        if lss not in X.SECTOR_SIZES:
            self.note("error", "logical_sector_size_invalid", f"logical_sector_size {lss} is "
                      "neither 512 nor 4096 (QEMU refuses the file); no block can be mapped",
                      **where(X.LOGICAL_SECTOR_SIZE_GUID))
            usable, lss = False, 512
        pss = values.get("physical_sector_size", 512)
        if pss not in X.SECTOR_SIZES:
            self.note("warning", "physical_sector_size_invalid", f"physical_sector_size {pss} is "
                      "neither 512 nor 4096", **where(X.PHYSICAL_SECTOR_SIZE_GUID))
        if lss == 4096:
            self.note("info", "qemu_4k_sectors", "logical sectors of 4096 bytes: QEMU 7.2 refuses "
                      "the file ('Operation not supported'); imgscope follows the specification",
                      raise_in_strict=False, **where(X.LOGICAL_SECTOR_SIZE_GUID))
        self.block_size, self.logical_sector_size, self.physical_sector_size = bs, lss, pss
        vds = values["virtual_disk_size"]
        if vds % lss:
            self.note("warning", "virtual_size_unaligned", f"virtual_disk_size {vds} is not a "
                      f"multiple of the {lss}-byte logical sector (QEMU drops the partial sector)",
                      **where(X.VIRTUAL_DISK_SIZE_GUID))
        size = vds // lss * lss
        if size > X.MAX_IMAGE_SIZE:
            self.note("warning", "virtual_size_too_large", f"virtual_disk_size {vds} exceeds the "
                      "64 TiB VHDX limit", **where(X.VIRTUAL_DISK_SIZE_GUID))
            if size >= 1 << 62:
                size = X.MAX_IMAGE_SIZE
        self.virtual_size = size
        self.usable = usable
        if usable:
            self.cluster_size = bs
            self.chunk_ratio = X.chunk_ratio(bs, lss)
        if self.has_parent and X.PARENT_LOCATOR_GUID not in self.metadata_items:
            self.note("error", "parent_locator_missing", "has_parent is set but there is no parent "
                      "locator item (QEMU: invalid); the parent cannot be found",
                      **where(X.FILE_PARAMETERS_GUID))
        if X.PARENT_LOCATOR_GUID in self.metadata_items:
            if not self.has_parent:
                self.note("warning", "parent_locator_unused", "a parent locator item without "
                          "has_parent: it is ignored", **where(X.PARENT_LOCATOR_GUID))
            self._read_parent_locator(self.metadata_items[X.PARENT_LOCATOR_GUID])

    def _read_parent_locator(self, item: dict) -> None:
        base, length = item["file_offset"], min(item["length"], X.METADATA_ITEM_MAX_LENGTH)
        data = self.view.read_upto(base, length)
        if len(data) < X.PARENT_LOCATOR_HEADER_SIZE:
            self.note("error", "parent_locator_truncated", "the parent locator item is shorter than "
                      "its 20-byte header", structure="parent_locator", host_offset=base)
            return
        rows = self._layout(X.parent_locator_header, data, "parent_locator", base)
        self._field_rows += rows
        h = {r.field: r.value for r in rows}
        self.parent_locator_type = h["locator_type"]
        if h["locator_type"] != X.PARENT_TYPE_VHDX_GUID:
            self.note("warning", "parent_locator_type", f"locator_type {h['locator_type']} is not "
                      "the VHDX parent type", structure="parent_locator.locator_type", host_offset=base)
        count = h["key_value_count"]
        fit = (len(data) - X.PARENT_LOCATOR_HEADER_SIZE) // X.PARENT_LOCATOR_ENTRY_SIZE
        if count > fit:
            self.note("error", "parent_locator_entries_overflow", f"key_value_count {count} entries "
                      f"do not fit the {len(data)}-byte item; {fit} are read",
                      structure="parent_locator.key_value_count", host_offset=base + 18)
            count = fit
        if count > MAX_LOCATOR_ENTRIES:
            self.note("warning", "parent_locator_entries_limited", f"{count} key/value entries; "
                      f"the first {MAX_LOCATOR_ENTRIES} are decoded", structure="parent_locator",
                      host_offset=base + 18)
            count = MAX_LOCATOR_ENTRIES
        first, size = X.PARENT_LOCATOR_HEADER_SIZE, X.PARENT_LOCATOR_ENTRY_SIZE
        entries = self._records(X.parent_locator_entry, X.parent_locator_entries, data, base, first,
                                size, count, "parent_locator")
        for k, ent in enumerate(entries):            # at most MAX_LOCATOR_ENTRIES records
            ko, vo, kl, vl = (int(ent["key_offset"]), int(ent["value_offset"]),
                              int(ent["key_length"]), int(ent["value_length"]))
            row = dict(index=k, entry_offset=base + first + k * size, key_offset=base + ko,
                       key_length=kl, value_offset=base + vo, value_length=vl, key=None, value=None)
            self.locator_entries.append(row)
            if ko + kl > len(data) or vo + vl > len(data) or not kl:
                self.note("error", "parent_locator_entry_invalid", f"key/value entry {k} points "
                          f"outside the {len(data)}-byte parent locator item",
                          structure="parent_locator", index=k, host_offset=row["entry_offset"])
                continue
            key = data[ko:ko + kl].decode("utf-16-le", "replace")
            value = data[vo:vo + vl].decode("utf-16-le", "replace")
            row.update(key=key, value=value)
            if key in self.parent_locator:
                self.note("warning", "parent_locator_duplicate_key", f"key {key!r} appears twice; "
                          "the first value is used", structure="parent_locator", index=k,
                          host_offset=row["entry_offset"])
                continue
            self.parent_locator[key] = value

    # ---- BAT -----------------------------------------------------------------------------
    def _read_bat(self) -> None:
        if not self.usable or self.bat_region is None:
            return
        off, length = self.bat_region
        bs, lss = self.block_size, self.logical_sector_size
        need = X.bat_entries(self.virtual_size, bs, lss, self.has_parent)
        qemu_need = X.qemu_bat_entries(self.virtual_size, bs, lss, self.has_parent)
        room = length // 8
        where = dict(structure="bat", host_offset=off)
        if need > room:
            self.note("error", "bat_region_too_small", f"the disk needs {need} BAT entries, the BAT "
                      f"region holds {room} (QEMU refuses the file); the rest reads as unallocated",
                      **where)
        elif qemu_need > room:
            self.note("warning", "qemu_bat_entries", f"QEMU 7.2 computes {qemu_need} BAT entries for "
                      f"this disk (u32 arithmetic), more than the {room} the region holds: it refuses "
                      "the file", raise_in_strict=False, **where)
        count = min(need, room)
        avail = max(0, (self.source.size - off) // 8)
        if count > avail:
            self.note("error", "bat_beyond_eof", f"the BAT ({count} entries at {off:#x}) extends "
                      f"past the end of the file; {avail} entries are read, the rest reads as "
                      "unallocated", **where)
            count = avail
        limit = self.limits.max_table_bytes // 8
        if count > limit:
            self.note("error", "table_too_large", f"BAT of {count} entries exceeds the limit of "
                      f"{limit}; the rest reads as unallocated", **where)
            count = limit
        self.bat_offset = off
        self.bat = np.asarray(X.bat_table(count).parse(self.view.read(off, count * 8, "bat")), U64) \
            if count else np.zeros(0, U64)
        self._check_bat()

    def _bat_geometry(self):
        """Per BAT entry: is it a bitmap slot, payload block / chunk number, state, offset, length."""
        n = self.bat.size
        cr = self.chunk_ratio
        idx = np.arange(n, dtype=U64)
        sb = idx % U64(cr + 1) == U64(cr)
        number = np.where(sb, idx // U64(cr + 1), idx - idx // U64(cr + 1))
        state = self.bat & U64(X.BAT_STATE_MASK)
        offset = self.bat & U64(X.BAT_FILE_OFFSET_MASK)
        stored = (state == X.PAYLOAD_BLOCK_FULLY_PRESENT) | (state == X.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
        present = np.where(sb, state == X.SB_BLOCK_PRESENT, stored)
        guest = number * U64(self.block_size)
        size = U64(self.virtual_size)
        length = np.where(sb, U64(X.SECTOR_BITMAP_BLOCK_SIZE),
                          np.minimum(U64(self.block_size), size - np.minimum(guest, size)))
        return sb, number, state, offset, present, length

    def _check_bat(self) -> None:
        if not self.bat.size:
            return
        sb, number, state, offset, present, length = self._bat_geometry()
        off = self.bat_offset
        entry_off = _EntryOffsets(off)
        desc = lambda k: (f"BAT entry {k} ({'sector bitmap of chunk' if sb[k] else 'payload block'} "
                          f"{int(number[k])}, {_state_name(int(state[k]), bool(sb[k]))})")
        bad = np.flatnonzero(self.bat & U64(X.BAT_RESERVED_MASK))
        if bad.size:
            note_bad_entries(self, bad, "bat_reserved_bits", lambda k: f"{desc(k)}: reserved bits "
                             f"3-19 are set ({int(self.bat[k]):#x})", "bat", entry_off, "warning")
        bad_bitmap = (state != X.SB_BLOCK_NOT_PRESENT) & (state != X.SB_BLOCK_PRESENT)
        invalid = np.flatnonzero(np.where(sb, bad_bitmap, ~np.isin(state, _PAYLOAD_VALID)))
        if invalid.size:
            note_bad_entries(self, invalid, "bat_state_invalid", lambda k: f"{desc(k)}: state "
                             f"{int(state[k])} is not valid here (QEMU returns I/O errors; imgscope "
                             "reads zeros)", "bat", entry_off)
        if not self.has_parent:
            partial = np.flatnonzero(~sb & (state == X.PAYLOAD_BLOCK_PARTIALLY_PRESENT))
            if partial.size:
                note_bad_entries(self, partial, "bat_partial_without_parent", lambda k: f"{desc(k)}: "
                                 "PARTIALLY_PRESENT in a disk without a parent (QEMU returns I/O "
                                 "errors; sectors whose bitmap bit is clear read as zeros)", "bat",
                                 entry_off)
        sel = np.flatnonzero(present & (length > 0))
        if not sel.size:
            return
        start, end = offset[sel], offset[sel] + length[sel]
        size = U64(self.source.size)
        beyond = np.flatnonzero(start >= size)
        if beyond.size:
            note_bad_entries(self, sel[beyond], "bat_entry_beyond_eof", lambda k: f"{desc(k)} at "
                             f"{int(offset[k]):#x} starts past the end of the file ({int(size)} bytes; "
                             "QEMU: 'Image has probably been truncated' and refuses the file); it "
                             "reads as zeros", "bat", entry_off)
        cut = np.flatnonzero((start < size) & (end > size))
        if cut.size:
            note_bad_entries(self, sel[cut], "bat_entry_truncated", lambda k: f"{desc(k)} at "
                             f"{int(offset[k]):#x} (+{int(length[k])}) ends past the end of the file "
                             f"({int(size)} bytes; QEMU refuses the file); the rest reads as zeros",
                             "bat", entry_off)
        spans = [(0, X.HEADER_SECTION_END)]
        if self.log_length:
            spans.append((self.log_offset, self.log_length))
        spans += [(r["file_offset"], r["length"]) for r in self.regions_found]
        clash = np.zeros(sel.size, bool)
        for s_off, s_len in spans:                        # a handful of structures
            clash |= (start < U64(min(s_off + s_len, _MAX_U64))) & (U64(s_off) < end)
        hit = np.flatnonzero(clash)
        if hit.size:
            note_bad_entries(self, sel[hit], "bat_entry_overlaps_metadata", lambda k: f"{desc(k)} at "
                             f"{int(offset[k]):#x} overlaps the header section, the log or a region "
                             "(QEMU refuses the file)", "bat", entry_off)
        order = np.argsort(start, kind="stable")
        s, e = start[order], end[order]
        over = np.flatnonzero(s[1:] < np.maximum.accumulate(e)[:-1]) + 1
        if over.size:
            note_bad_entries(self, np.sort(sel[order[over]]), "bat_entry_overlap",
                             lambda k: f"{desc(k)} at {int(offset[k]):#x} overlaps another block's "
                             "storage", "bat", entry_off)

    # ---- differencing --------------------------------------------------------------------
    def parent_names(self) -> list[str]:
        """Candidate parent names: relative_path, then absolute_win32_path and volume_path with
        the drive / volume prefix removed (both are then absolute, so confined)."""
        loc = self.parent_locator
        out = []
        for key in ("relative_path", "absolute_win32_path", "volume_path"):
            name = (loc.get(key) or "").replace("\\", "/")
            if not name:
                continue
            if key == "absolute_win32_path" and len(name) > 1 and name[1] == ":":
                name = name[2:]
            elif key == "volume_path" and name.startswith("//?/"):
                rest = name[4:].split("/", 1)
                name = "/" + rest[1] if len(rest) == 2 else ""
            while name.startswith("./"):
                name = name[2:]
            if name and name not in out:
                out.append(name)
        return out

    def _open_parent(self) -> None:
        names = self.parent_names()
        where = dict(structure="parent_locator", host_offset=self.metadata_items[X.PARENT_LOCATOR_GUID]
                     ["file_offset"] if X.PARENT_LOCATOR_GUID in self.metadata_items else None)
        if not names:
            self.note("error", "parent_unnamed", "differencing disk whose parent locator has no "
                      "relative_path, absolute_win32_path or volume_path; the parent's blocks read "
                      "as zeros", **where)
            return
        errors = []
        for name in names:
            try:
                self.backing = open_backing(self, name, "vhdx", "parent locator")
            except (UnsafePath, ChainError) as exc:
                if isinstance(exc, ChainError) and "not found" not in exc.message:
                    raise
                errors.append(exc)
                continue
            self.backing_name, self.backing_format = name, "vhdx"
            break
        if self.backing is None:
            unsafe = [e for e in errors if isinstance(e, UnsafePath)]
            raise (unsafe or errors)[0]
        parent = self.backing
        pdw = getattr(parent, "header", {}).get("data_write_guid")
        links = [_norm_guid(self.parent_locator.get(k)) for k in ("parent_linkage", "parent_linkage2")]
        if links[0] is None:
            self.note("warning", "parent_linkage_missing", "the parent locator has no valid "
                      "parent_linkage GUID: the parent cannot be verified", **where)
        elif pdw is not None and pdw not in links:
            self.note("error", "parent_linkage_mismatch", f"the parent's data_write_guid {pdw} is "
                      f"not this disk's parent_linkage {links[0]}: the parent was written after this "
                      "child was made, or is another disk; reads through the chain may mix old and "
                      "new data", **where)
        if parent.virtual_size != self.virtual_size:
            self.note("warning", "parent_size_mismatch", f"parent is {parent.virtual_size} bytes, "
                      f"this disk {self.virtual_size}", **where)
        if getattr(parent, "logical_sector_size", self.logical_sector_size) != self.logical_sector_size:
            self.note("error", "parent_sector_size_mismatch", "the parent's logical sector size "
                      "differs from this disk's", **where)

    # ---- the model -----------------------------------------------------------------------
    def _payload_entries(self):
        """(payload block numbers, their BAT entries) for the blocks the BAT covers."""
        n, cr = self.bat.size, self.chunk_ratio
        m = min(n - n // (cr + 1), X.data_blocks(self.virtual_size, self.block_size))
        p = np.arange(m, dtype=U64)
        return p, self.bat[p + p // U64(cr)]

    def _own_extents(self) -> ExtentTable:
        files = [self.view]
        size = self.virtual_size
        if not size:
            return ExtentTable.empty(files)
        if not self.usable or self.bat is None:
            return ExtentTable.run(0, size, KIND_UNALLOCATED, files)
        bs = U64(self.block_size)
        p, entry = self._payload_entries()
        state = entry & U64(X.BAT_STATE_MASK)
        offset = entry & U64(X.BAT_FILE_OFFSET_MASK)
        kind = np.select([state == X.PAYLOAD_BLOCK_FULLY_PRESENT,
                          state == X.PAYLOAD_BLOCK_PARTIALLY_PRESENT,
                          state == X.PAYLOAD_BLOCK_NOT_PRESENT],
                         [KIND_DATA, KIND_DATA, KIND_UNALLOCATED], KIND_ZERO).astype(np.uint8)
        guest = p * bs
        length = np.minimum(bs, U64(size) - guest)
        host = np.where(kind == KIND_DATA, offset, NO_HOST)
        partial = state == X.PAYLOAD_BLOCK_PARTIALLY_PRESENT
        if partial.any():
            runs = self._bitmap_runs(p[partial], offset[partial])
            if runs is not None:
                keep = ~partial
                guest, length, kind, host = (np.concatenate([a[keep], b]) for a, b in
                                             zip((guest, length, kind, host), runs))
                order = np.argsort(guest, kind="stable")
                guest, length, kind, host = guest[order], length[order], kind[order], host[order]
        n = guest.size
        t = coalesce(guest, length, kind, host.astype(U64), np.zeros(n, U64),
                     np.where(kind == KIND_DATA, 0, -1).astype(np.int16), files)
        covered = int(p.size) * self.block_size
        if covered < size:            # blocks the BAT does not reach
            from ..io.chain import concat
            t = concat([t, ExtentTable.run(covered, size - covered, KIND_UNALLOCATED, files)], files)
        return t

    def _bitmap_runs(self, blocks: np.ndarray, offsets: np.ndarray):
        """PARTIALLY_PRESENT blocks cut into runs by their sector bitmap bits (1: this file,
        0: unallocated, the parent shows).  None when the bitmaps cannot be used."""
        lss, bs, cr = self.logical_sector_size, self.block_size, self.chunk_ratio
        spb = bs // lss
        if blocks.size * spb > self.limits.max_extents:
            self.note("warning", "bitmaps_not_used", f"{blocks.size} partially present blocks of "
                      f"{spb} sectors exceed the extent limit; they are read as fully present",
                      structure="bat")
            return None
        chunk = blocks // U64(cr)
        sbi = chunk * U64(cr + 1) + U64(cr)
        inside = sbi < U64(self.bat.size)
        sb_entry = np.where(inside, self.bat[np.minimum(sbi, U64(max(self.bat.size - 1, 0)))], U64(0))
        sb_ok = inside & ((sb_entry & U64(X.BAT_STATE_MASK)) == X.SB_BLOCK_PRESENT)
        missing = np.flatnonzero(~sb_ok)
        if missing.size:
            note_bad_entries(self, missing, "sector_bitmap_missing", lambda k: f"payload block "
                             f"{int(blocks[k])} is PARTIALLY_PRESENT but the sector bitmap of chunk "
                             f"{int(chunk[k])} is not present; the block is read as fully present",
                             "bat", _EntryOffsets(self.bat_offset, sbi))
        sb_off = (sb_entry & U64(X.BAT_FILE_OFFSET_MASK)) + (blocks % U64(cr)) * U64(spb // 8)
        raw = self.view.gather(sb_off, spb // 8)
        bits = np.unpackbits(raw, axis=1, bitorder="little").astype(bool)
        bits[~sb_ok] = True
        mark = np.empty(bits.shape, bool)
        mark[:, 0] = True
        mark[:, 1:] = bits[:, 1:] != bits[:, :-1]
        start = np.flatnonzero(mark)
        del mark
        flat = bits.reshape(-1)
        stop = np.append(start[1:], flat.size)
        row = start // spb
        sector = (start % spb).astype(U64)
        guest = blocks[row] * U64(bs) + sector * U64(lss)
        length = (stop - start).astype(U64) * U64(lss)
        size = U64(self.virtual_size)
        inside_disk = guest < size
        guest, length = guest[inside_disk], length[inside_disk]
        sector, row = sector[inside_disk], row[inside_disk]
        length = np.minimum(length, size - guest)
        present = flat[start[inside_disk]]
        kind = np.where(present, KIND_DATA, KIND_UNALLOCATED).astype(np.uint8)
        host = np.where(present, offsets[row] + sector * U64(lss), NO_HOST)
        return guest, length, kind, host

    def sector_bitmap(self, block: int) -> np.ndarray:
        """Bool per logical sector of payload block `block`: True = the sector is in this file."""
        if self.bat is None or not self.usable:
            raise ImageError("the disk has no usable BAT", path=str(self.path), structure="bat")
        cr = self.chunk_ratio
        sbi = block // cr * (cr + 1) + cr
        if not 0 <= sbi < self.bat.size or int(self.bat[sbi]) & X.BAT_STATE_MASK != X.SB_BLOCK_PRESENT:
            raise ImageError(f"no sector bitmap for block {block}", path=str(self.path),
                             structure="bat")
        spb = self.block_size // self.logical_sector_size
        off = (int(self.bat[sbi]) & X.BAT_FILE_OFFSET_MASK) + block % cr * (spb // 8)
        raw = np.frombuffer(self.view.read(off, spb // 8, "sector bitmap"), np.uint8)
        return np.unpackbits(raw, bitorder="little").astype(bool)

    def map_extent_table(self) -> ExtentTable:
        """What ``qemu-img map`` 7.2 reports for a VHDX: the vhdx driver has no block-status
        callback, so the whole disk is one present data run at depth 0 without offsets."""
        return ExtentTable.run(0, self.virtual_size, KIND_DATA, [self.view])

    def _host_regions(self) -> list:
        regs = [(0, 0, X.SLOT_SIZE, "header", "file identifier"),
                (0, X.HEADER1_OFFSET, X.SLOT_SIZE, "header", "header 1"),
                (0, X.HEADER2_OFFSET, X.SLOT_SIZE, "header", "header 2"),
                (0, X.REGION_TABLE1_OFFSET, X.SLOT_SIZE, "header", "region table 1"),
                (0, X.REGION_TABLE2_OFFSET, X.SLOT_SIZE, "header", "region table 2"),
                (0, X.REGION_TABLE2_OFFSET + X.SLOT_SIZE,
                 X.HEADER_SECTION_END - X.REGION_TABLE2_OFFSET - X.SLOT_SIZE, "header",
                 "header section (reserved)")]
        if self.log_length:
            regs.append((0, self.log_offset, self.log_length, "log", "log"))
        for r in self.regions_found:
            if r["name"] == "unknown":
                regs.append((0, r["file_offset"], r["length"], "metadata", f"region {r['guid']}"))
        if self.bat_region:
            regs.append((0, self.bat_region[0], self.bat_region[1], "bat", "BAT"))
        regs += self._metadata_regions()
        if self.bat is not None and self.bat.size:
            sb, number, state, offset, present, length = self._bat_geometry()
            data = present & ~sb & (length > 0)
            if data.any():
                regs.append((0, offset[data], length[data], "data", "payload blocks"))
                # the last block's storage past the end of the disk, as far as the file goes
                cut = data & (length < U64(self.block_size)) & (offset + length < U64(self.source.size))
                if cut.any():
                    end = np.minimum(offset[cut] + U64(self.block_size), U64(self.source.size))
                    regs.append((0, offset[cut] + length[cut], end - offset[cut] - length[cut],
                                 "slack", "payload blocks"))
            bitmaps = present & sb
            if bitmaps.any():
                regs.append((0, offset[bitmaps], length[bitmaps], "bitmap_data",
                             "sector bitmap blocks"))
        return regs

    def _metadata_regions(self) -> list:
        """The metadata table, each item, and the free rest of the region between them."""
        r_off, r_len = self.metadata_region
        spans = [(r_off, min(X.METADATA_TABLE_SIZE, r_len), "metadata table")]
        spans += [(i["file_offset"], i["length"], f"metadata item {i['name']}")
                  for i in self.metadata_table if i["length"]]
        regs = [(0, o, n, "metadata", w) for o, n, w in spans]
        # free parts of the region: [r_off, r_end) minus the spans
        pos, r_end = r_off, r_off + r_len
        for s, n, _ in sorted(spans):
            if s > pos:
                regs.append((0, pos, min(s, r_end) - pos, "metadata", "metadata region (free)"))
            pos = max(pos, s + n)
        if pos < r_end:
            regs.append((0, pos, r_end - pos, "metadata", "metadata region (free)"))
        return [r for r in regs if r[2] > 0]

    # ---- fields and tables -----------------------------------------------------------------
    def _summary_rows(self) -> None:
        hoff = X.HEADER1_OFFSET if self.current_header == 0 else X.HEADER2_OFFSET
        rows = [("current_header", hoff, self.current_header + 1, f"header{self.current_header + 1}",
                 "the header in use: the valid one (CRC-32C, 'head', version 1) with the higher "
                 "sequence_number")]
        if self.usable:
            rows += [
                ("chunk_ratio", self.metadata_region[0], self.chunk_ratio, str(self.chunk_ratio),
                 "payload blocks per sector-bitmap block: 2^23 * logical_sector_size / block_size"),
                ("bat_entries", self.bat_region[0] if self.bat_region else 0,
                 X.bat_entries(self.virtual_size, self.block_size, self.logical_sector_size,
                               self.has_parent),
                 None, "BAT entries the disk needs: payload entries with a sector-bitmap entry after "
                 "every chunk_ratio of them (differencing: whole chunks)"),
            ]
        n = len(self.log_sequence)
        state = (f"replay needed: {n} entr{'y' if n == 1 else 'ies'}, applied in memory" if n else
                 "clean (log_guid is zero)" if self.header["log_guid"] == X.NULL_GUID else
                 "clean (no valid entry for log_guid)")
        rows.append(("log_state", self.log_offset, state, state, _QEMU_LOG_NOTE))
        qemu = ("refuses: the log needs replay (read-only opens)" if n else
                "refuses: differencing disks are not supported" if self.has_parent else
                "refuses: 4096-byte logical sectors" if self.logical_sector_size == 4096 else
                "reads")
        rows.append(("qemu_7_2", 0, qemu, qemu, "what qemu-img 7.2 does with this file"))
        for field, off, value, display, description in rows:
            shown = display if display is not None else str(value)
            self._field_rows.append(FieldRow("vhdx", field, off, 0, b"", value, shown, description))

    def _register_tables(self) -> None:
        self._tables["region_table"] = self._region_frame
        self._tables["metadata_table"] = self._metadata_frame
        self._tables["parent_locator"] = self._locator_frame
        self._tables["log"] = self._log_frame
        self._tables["log_descriptors"] = self._log_descriptor_frame
        if self.bat is not None:
            self._tables["bat"] = self._bat_frame

    def _region_frame(self):
        import pandas as pd
        rows = []
        for i, t in enumerate(self.region_tables):
            if t is None:
                continue
            for k, e in enumerate(t["entries"]):
                guid = _guid(e["guid"])
                at = t["offset"] + X.REGION_TABLE_HEADER_SIZE + k * X.REGION_ENTRY_SIZE
                rows.append(dict(table=i + 1, index=k, entry_offset=at, guid=guid,
                                 name=X.REGION_NAMES.get(guid, "unknown"),
                                 file_offset=int(e["file_offset"]), length=int(e["length"]),
                                 required=bool(int(e["data_bits"]) & X.REGION_REQUIRED),
                                 used=i == self.region_table_used))
        return pd.DataFrame(rows, columns=["table", "index", "entry_offset", "guid", "name",
                                           "file_offset", "length", "required", "used"])

    def _metadata_frame(self):
        import pandas as pd
        return pd.DataFrame(self.metadata_table, columns=["index", "item_id", "name", "offset",
                                                          "length", "file_offset", "flags",
                                                          "required", "used"])

    def _locator_frame(self):
        import pandas as pd
        return pd.DataFrame(self.locator_entries, columns=["index", "entry_offset", "key", "value",
                                                           "key_offset", "key_length", "value_offset",
                                                           "value_length"])

    def _log_frame(self):
        import pandas as pd
        cols = ["index", "file_offset", "log_position", "sequence_number", "tail", "entry_length",
                "descriptor_count", "data_descriptors", "zero_descriptors", "flushed_file_offset",
                "last_file_offset", "log_guid", "checksum", "checksum_ok", "descriptors_ok",
                "guid_matches", "valid", "active", "problem"]
        return pd.DataFrame([{c: e[c] for c in cols} for e in self.log_entries], columns=cols)

    def _log_descriptor_frame(self):
        import pandas as pd
        parts = []
        for e in self.log_entries:
            d = e["_descriptors"]
            if d is None or not d.size:
                continue
            is_zero = d["signature"] == X.LOG_ZERO_SIGNATURE
            is_data = d["signature"] == X.LOG_DESC_SIGNATURE
            at = e["file_offset"] + X.LOG_ENTRY_HEADER_SIZE + X.LOG_DESCRIPTOR_SIZE * np.arange(d.size)
            parts.append(pd.DataFrame({
                "entry": e["index"], "sequence_number": e["sequence_number"],
                "descriptor": np.arange(d.size),
                "entry_offset": at,
                "kind": np.where(is_zero, "zero", np.where(is_data, "data", "invalid")),
                "target_offset": d["file_offset"],
                "length": np.where(is_zero, d["leading_bytes"], U64(X.LOG_SECTOR_SIZE)),
                "descriptor_sequence": d["sequence_number"], "active": e["active"]}))
        cols = ["entry", "sequence_number", "descriptor", "entry_offset", "kind", "target_offset",
                "length", "descriptor_sequence", "active"]
        return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)

    def _bat_frame(self):
        import pandas as pd
        from ..frames import nullable_offsets
        sb, number, state, offset, present, length = self._bat_geometry()
        codes = _state_codes(state, sb)
        n = self.bat.size
        return pd.DataFrame({
            "index": np.arange(n, dtype=np.int64),
            "entry_offset": U64(self.bat_offset) + np.arange(n, dtype=U64) * U64(8),
            "raw": self.bat,
            "kind": pd.Categorical.from_codes(sb.astype(np.int8), ["payload", "sector_bitmap"]),
            "block": number.astype(np.int64),
            "state": pd.Categorical.from_codes(codes, list(X.STATE_NAMES)),
            "state_value": state.astype(np.uint8),
            "guest_offset": nullable_offsets(np.where(sb, NO_HOST, number * U64(self.block_size))),
            "file_offset": nullable_offsets(np.where(present, offset, NO_HOST)),
            "length": length,
        })


class _EntryOffsets:
    """Host offset of BAT entry k (or of entry idx[k]), computed on demand."""

    def __init__(self, base: int, idx: np.ndarray | None = None) -> None:
        self.base, self.idx = base, idx

    def __getitem__(self, k) -> int:
        i = int(k) if self.idx is None else int(self.idx[int(k)])
        return self.base + 8 * i


def _state_codes(state: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """Index into X.STATE_NAMES of every entry (INVALID for values not allowed at its place)."""
    lookup_payload = np.full(8, X.STATE_NAMES.index("INVALID"), np.int8)
    for value, name in X.PAYLOAD_STATES.items():
        lookup_payload[value] = X.STATE_NAMES.index(name)
    lookup_bitmap = np.full(8, X.STATE_NAMES.index("INVALID"), np.int8)
    for value, name in X.BITMAP_STATES.items():
        lookup_bitmap[value] = X.STATE_NAMES.index(name)
    s = state.astype(np.int64)
    return np.where(sb, lookup_bitmap[s], lookup_payload[s]).astype(np.int8)


def _state_name(state: int, bitmap: bool) -> str:
    names = X.BITMAP_STATES if bitmap else X.PAYLOAD_STATES
    return names.get(state, f"invalid state {state}")
