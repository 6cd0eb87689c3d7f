"""qcow2 internal snapshot table: entries, extra data, and each snapshot's L1."""
from __future__ import annotations

from ...schemas import qcow2 as S
from ..base import parse_records


def parse_snapshots(image) -> list[dict]:
    """Every snapshot entry as a dict (offset, fields, decoded extra data)."""
    h = image.header.values
    n, off = h["nb_snapshots"], h["snapshots_offset"]
    if n == 0:
        return []
    if n > S.MAX_SNAPSHOTS:
        # QEMU refuses such an image: the count itself is corrupt, so nothing is parsed
        image.note("error", "too_many_snapshots", f"{n} snapshots exceed the limit of 65536",
                   structure="header.nb_snapshots", host_offset=60)
        return []
    if n > image.limits.max_snapshots:
        image.note("warning", "snapshot_limit",
                   f"only the first {image.limits.max_snapshots} of {n} snapshots are parsed "
                   "(raise Limits.max_snapshots to see more)", structure="snapshot table")
        n = image.limits.max_snapshots
    if off % image.cluster_size or off >= image.source.size:
        image.note("error", "snapshot_table_invalid",
                   f"snapshot table offset {off:#x} is misaligned or outside the file",
                   structure="header.snapshots_offset", host_offset=64)
        return []
    # the table is at most 64 MiB; read what the file holds of it
    # QEMU does not pad the last entry: a table written last ends the file right after its
    # last name, so the 8-byte alignment padding the schema reads is supplied here
    area = image.source.read_upto(off, min(64 << 20, image.source.size - off)) + bytes(7)
    out, end = [], 0
    for i, rows, pos, size in parse_records(image, S.snapshot_entry, area, off, n,
                                            name="snapshot", code="snapshot_table_truncated"):
        v = {r.field: r.value for r in rows}
        end = pos + size
        extra = v["extra_data"]
        if v["extra_data_size"] > S.MAX_SNAPSHOT_EXTRA:
            image.note("error", "snapshot_extra_too_large",
                       f"snapshot {i} has {v['extra_data_size']} bytes of extra data (max 1024)",
                       structure=f"snapshot[{i}]", index=i, host_offset=off + pos + 36)
        if h["version"] >= 3 and len(extra) < 16:
            image.note("warning", "snapshot_entry_incomplete",
                       f"snapshot table entry {i} is incomplete (extra data < 16 bytes)",
                       structure=f"snapshot[{i}]", index=i, host_offset=off + pos)
        padded = extra + bytes(max(0, 24 - len(extra)))
        x = S.snapshot_extra.parse(padded[:24])
        entry = dict(v)
        entry["index"] = i
        entry["offset"] = off + pos
        entry["entry_size"] = size
        entry["vm_state_size_large"] = x.vm_state_size_large if len(extra) >= 8 else v["vm_state_size"]
        entry["disk_size"] = x.disk_size if len(extra) >= 16 else h["size"]
        entry["icount"] = x.icount if len(extra) >= 24 else -1
        entry["rows"] = rows
        out.append(entry)
    image._snapshot_table_bytes = end
    return out
