"""qemu-img map compatible output built from the merged extent table."""
from __future__ import annotations

import numpy as np

from .io.chain import map_flags, merge_for_map, split_at
from .model import NO_HOST


def map_table(image, start: int = 0, length: int | None = None):
    """The merged extent table for [start, start+length), qemu-img map's entries."""
    table = image.map_extent_table()
    end = image.virtual_size if length is None else min(image.virtual_size, start + length)
    if start or end < image.virtual_size:
        table = split_at(table, np.array(sorted({start, end}), np.uint64))
        table = table.take((table.guest >= np.uint64(start)) & (table.guest < np.uint64(end)))
    return merge_for_map(table)


def map_entries(image, start: int = 0, length: int | None = None) -> list[dict]:
    """The list `qemu-img map --output=json` prints (7.2 keys), plus the file name."""
    table = map_table(image, start, length)
    present, zero, data, has_offset = map_flags(table)
    out = []
    g, ln, d, h = (table.guest.tolist(), table.length.tolist(), table.depth.tolist(),
                   table.host.tolist())
    fi = table.file.tolist()
    names = [getattr(s, "given_name", None) or str(s.path) for s in table.files]
    if not len(table):          # nothing mapped: qemu-img prints one empty entry at start
        return [{"start": start, "length": 0, "depth": 0, "present": False, "zero": False,
                 "data": False}]
    for i in range(len(table)):
        e = {"start": g[i], "length": ln[i], "depth": d[i], "present": bool(present[i]),
             "zero": bool(zero[i]), "data": bool(data[i])}
        if has_offset[i]:
            e["offset"] = h[i]
            e["filename"] = names[fi[i]]
        out.append(e)
    return out


def json_entry(e: dict) -> str:
    s = (f'{{ "start": {e["start"]}, "length": {e["length"]}, "depth": {e["depth"]}, '
         f'"present": {str(e["present"]).lower()}, "zero": {str(e["zero"]).lower()}, '
         f'"data": {str(e["data"]).lower()}')
    if "offset" in e:
        s += f', "offset": {e["offset"]}'
    return s + "}"


def map_json(entries: list[dict]) -> str:
    """Byte-for-byte the layout qemu-img 7.2 prints."""
    return "[" + ",\n".join(json_entry(e) for e in entries) + "]"


def map_json_fast(table, start: int = 0) -> bytes:
    """map_json (as UTF-8 bytes) straight from the arrays, assembled by numpy; `start` is
    where the map begins (an empty map is one empty entry there, as qemu-img prints)."""
    from .textvec import Lines
    present, zero, data, has_offset = map_flags(table)
    n = len(table)
    if n == 0:
        return ("[" + json_entry({"start": start, "length": 0, "depth": 0, "present": False,
                                  "zero": False, "data": False}) + "]").encode()
    tf = ["false", "true"]
    text = (Lines(n).const('{ "start": ').number(table.guest)
            .const(', "length": ').number(table.length)
            .const(', "depth": ').number(table.depth.astype(np.uint64))
            .const(', "present": ').choice(present, tf)
            .const(', "zero": ').choice(zero, tf)
            .const(', "data": ').choice(data, tf)
            .const(', "offset": ', has_offset).number(table.host, has_offset)
            .const("}").render_bytes(",\n"))
    return b"[" + text + b"]"


def map_human(entries: list[dict]) -> str:
    """qemu-img's human table: only data runs with a host offset are listed."""
    from .errors import Unsupported
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e["data"] and "offset" not in e:
            raise Unsupported("File contains external, encrypted or compressed clusters.")
        if e["data"] and not e["zero"]:
            lines.append(f"{_hx(e['start']):<16}{_hx(e['length']):<16}{_hx(e['offset']):<16}"
                         f"{e['filename']}")
    return "\n".join(lines)


def _hx(n: int) -> str:
    return "0" if n == 0 else f"{n:#x}"
