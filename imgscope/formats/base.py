"""Pieces every driver shares: table validation gate and run coalescing."""
from __future__ import annotations

import construct as cs
import numpy as np

from ..schemas._types import field_layout

from ..model import ExtentTable, KIND_COMPRESSED, KIND_UNALLOCATED, NO_HOST


FINDINGS_PER_CALL = 20


def note_bad_entries(image, idx: np.ndarray, code: str, message, structure: str,
                     offsets: np.ndarray, severity: str = "error") -> None:
    """A finding per bad entry for the first few, then one summary finding."""
    for k in idx[:FINDINGS_PER_CALL]:
        image.note(severity, code, message(int(k)), structure=structure, index=int(k),
                   host_offset=int(offsets[k]))
    if idx.size > FINDINGS_PER_CALL:
        image.note(severity, code, f"{idx.size - FINDINGS_PER_CALL} more entries of {structure} "
                   f"with the same problem ({code})", structure=structure)


def validate_table(image, offset: int, nbytes: int, structure: str, *,
                   align: int = 1, index: int | None = None,
                   limit: int | None = None, severity: str = "error", source=None) -> bool:
    """True when a table lies aligned, inside the file and within limits.

    Otherwise a finding is recorded (or, in strict mode, raised) and the
    caller must not read it: this is the one gate before every table read.
    """
    source = source or image.source
    size = source.size
    limit = image.limits.max_table_bytes if limit is None else limit
    where = dict(structure=structure, index=index, host_offset=offset, size=nbytes,
                 file=str(source.path))
    if nbytes > limit:
        image.note(severity, "table_too_large",
                   f"{structure} of {nbytes} bytes exceeds the limit of {limit} bytes", **where)
        return False
    if align > 1 and offset % align:
        image.note(severity, "table_misaligned",
                   f"{structure} at {offset:#x} is not aligned to {align} bytes", **where)
        return False
    if offset + nbytes > size:
        image.note(severity, "table_beyond_eof",
                   f"{structure} at {offset:#x} (+{nbytes}) extends past the end of the "
                   f"file ({size} bytes)", **where)
        return False
    return True


def coalesce(guest: np.ndarray, length: np.ndarray, kind: np.ndarray, host: np.ndarray,
             host_length: np.ndarray, file: np.ndarray, files: list, *,
             codec: str = "none", cluster_size: int = 0, depth: int = 0,
             flags: np.ndarray | None = None) -> ExtentTable:
    """Merge neighbouring units of the same kind whose host bytes are contiguous.

    Units must be sorted; gaps in the guest are never bridged.  Compressed units stay
    one per cluster (each has its own stored range).
    """
    n = guest.size
    if n == 0:
        return ExtentTable.empty(files)
    has_host = host != NO_HOST
    same = (kind[1:] == kind[:-1]) & (file[1:] == file[:-1]) & (has_host[1:] == has_host[:-1])
    same &= ~has_host[1:] | (host[:-1] + length[:-1] == host[1:])
    same &= kind[1:] != KIND_COMPRESSED
    same &= guest[:-1] + length[:-1] == guest[1:]
    if flags is not None:
        same &= flags[1:] == flags[:-1]
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    lengths = np.add.reduceat(length, starts).astype(np.uint64)
    return ExtentTable(guest[starts].astype(np.uint64), lengths, kind[starts].astype(np.uint8),
                       host[starts].astype(np.uint64), host_length[starts].astype(np.uint64),
                       file[starts].astype(np.int16),
                       np.full(starts.size, depth, np.int16), files, codec,
                       None, cluster_size, None if flags is None else flags[starts])


def parse_records(image, struct, area: bytes, base: int, count: int, *, name: str,
                  code: str):
    """Yield (index, rows, start, size) for consecutive variable-size records.

    A record that does not fit `area` ends the walk with a finding `code`.
    """
    pos = 0
    for i in range(count):
        try:
            rows = field_layout(struct, area, structure=f"{name}[{i}]", base_offset=base,
                                start=pos)
        except (cs.ConstructError, UnicodeDecodeError):
            image.note("error", code, f"{name} entry {i} does not fit its table",
                       structure=name, index=i, host_offset=base + pos)
            return
        size = sum(r.size for r in rows)
        yield i, rows, pos, size
        pos += size


def extent_regions(table: ExtentTable, owner: str) -> list:
    """Host ranges holding guest data in one layer's extent table, as region tuples."""
    out = []
    hosted = (table.host != NO_HOST) & (table.kind != KIND_COMPRESSED) & (table.kind != KIND_UNALLOCATED)
    for fi in np.unique(table.file[hosted]).tolist():
        sel = hosted & (table.file == fi)
        out.append((fi, table.host[sel], table.length[sel], "data", owner))
    comp = table.kind == KIND_COMPRESSED
    for fi in np.unique(table.file[comp]).tolist():
        sel = comp & (table.file == fi)
        out.append((fi, table.host[sel], table.host_length[sel], "compressed_data", owner))
    return out


def note_beyond_eof(image, t: ExtentTable, unit: int, structure: str) -> None:
    """Clusters/grains that start at or after the end of their host file (QEMU's rule:
    a last unit that only overhangs the end is tolerated); compressed data whose
    stored range runs a whole unit past the end."""
    hosted = (t.host != NO_HOST) & (t.file >= 0) & (t.kind != KIND_UNALLOCATED)
    if not hosted.any():
        return
    sizes = np.array([s.size for s in t.files], np.uint64)
    end = sizes[np.maximum(t.file, 0)]
    u = np.uint64(unit)
    last = t.host + t.length - np.minimum(t.length, u)
    beyond = np.where(t.kind == KIND_COMPRESSED,
                      (t.host >= end) | (t.host + t.host_length > end + u - np.uint64(1)), last >= end)
    bad = np.flatnonzero(hosted & beyond)
    if bad.size:
        note_bad_entries(image, bad, "cluster_beyond_eof",
                         lambda k: f"guest {int(t.guest[k]):#x} maps to host {int(t.host[k]):#x}, "
                         "beyond the end of the file", structure, t.host)
    # data that starts inside the file but is cut by its end: a truncated file
    cut = np.flatnonzero(hosted & ~beyond & (t.kind != KIND_COMPRESSED) & (t.host + t.length > end))
    if cut.size:
        note_bad_entries(image, cut, "data_truncated",
                         lambda k: f"guest {int(t.guest[k]):#x}: host bytes {int(t.host[k]):#x} "
                         f"(+{int(t.length[k])}) end past the end of the file; the rest reads as zeros",
                         structure, t.host, severity="warning")
