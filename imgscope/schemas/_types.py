"""Construct building blocks shared by every format schema.

* NumpyArray: a whole uniform table (L1/L2, refcounts, BATs...) parsed with
  np.frombuffer in one step and built with tobytes(); per-entry construct
  parsing is ~10^4 times slower.
* FlagsInt: an integer whose bits have names, kept as a plain int.
* field_layout(): the offset, size, raw bytes, value and doc string of every
  field of a parsed struct, the source of `Image.fields`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import construct as cs


class NumpyArray(cs.Construct):
    """`count` entries of a numpy dtype (give byte order in the dtype)."""

    def __init__(self, count, dtype) -> None:
        super().__init__()
        self.count = count
        self.dtype = np.dtype(dtype)

    def _count(self, context) -> int:
        n = self.count(context) if callable(self.count) else self.count
        if n < 0:
            raise cs.ConstructError(f"negative table size {n}")
        return int(n)

    def _parse(self, stream, context, path):
        n = self._count(context)
        data = cs.stream_read(stream, n * self.dtype.itemsize, path)
        return np.frombuffer(data, dtype=self.dtype)

    def _build(self, obj, stream, context, path):
        arr = np.asarray(obj, dtype=self.dtype)
        n = self._count(context)
        if arr.size != n:
            raise cs.ConstructError(f"expected {n} entries, got {arr.size}", path=path)
        cs.stream_write(stream, arr.tobytes(), arr.nbytes, path)
        return arr

    def _sizeof(self, context, path):
        return self._count(context) * self.dtype.itemsize


class NamedInt(cs.Adapter):
    """An integer field with names for its values or bits; parses to a plain int."""

    def __init__(self, subcon, names: dict[int, str]) -> None:
        super().__init__(subcon)
        self.names = dict(names)

    def _decode(self, obj, context, path):
        return int(obj)

    def _encode(self, obj, context, path):
        return int(obj)


class FlagsInt(NamedInt):
    """A bit field: `names` maps bit number -> name."""

    def describe(self, value: int) -> str:
        parts = [self.names.get(bit, f"unknown bit {bit}") for bit in range(64) if value >> bit & 1]
        return ", ".join(parts) if parts else "none"


class EnumInt(NamedInt):
    """An enumeration: `names` maps value -> name."""

    def describe(self, value: int) -> str:
        return self.names.get(value, f"unknown ({value})")


def flags(subcon, names: dict[int, str]) -> FlagsInt:
    return FlagsInt(subcon, names)


def enum(subcon, names: dict[int, str]) -> EnumInt:
    return EnumInt(subcon, names)


def docs_of(subcon: cs.Construct) -> str:
    """The doc string attached with `* "..."`, looking through wrappers."""
    while subcon is not None:
        if getattr(subcon, "docs", ""):
            return subcon.docs
        subcon = getattr(subcon, "subcon", None)
    return ""


def describer_of(subcon: cs.Construct):
    while subcon is not None:
        if isinstance(subcon, NamedInt):
            return subcon
        subcon = getattr(subcon, "subcon", None)
    return None


def display_value(value: Any, subcon: cs.Construct | None = None) -> str:
    """A short human form of a parsed field value."""
    d = describer_of(subcon) if subcon is not None else None
    if isinstance(d, FlagsInt) and isinstance(value, int):
        return f"{value:#x} ({d.describe(value)})"
    if isinstance(d, EnumInt) and isinstance(value, int):
        return f"{value} ({d.describe(value)})"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value} ({value:#x})" if value > 9 else str(value)
    if isinstance(value, (bytes, bytearray)):
        if len(value) <= 16:
            return value.hex(" ")
        return value[:16].hex(" ") + f" ... ({len(value)} bytes)"
    if isinstance(value, np.ndarray):
        return f"{value.size} entries"
    return str(value)


@dataclass
class FieldRow:
    structure: str
    field: str
    offset: int
    size: int
    raw: bytes
    value: Any
    display: str
    description: str


def field_layout(struct: cs.Struct, data: bytes, *, structure: str,
                 base_offset: int = 0, start: int = 0) -> list[FieldRow]:
    """Parse `data` with `struct` and describe every named field's place.

    Offsets are found by parsing field by field from one stream, so variable
    sized members are handled; anonymous members (padding) appear as
    `<padding>` rows so the rows tile the structure.  The record starts at
    `start` inside `data`, whose first byte lies at host offset `base_offset`
    (so a table of records is parsed without slicing copies).
    """
    stream = io.BytesIO(data)
    stream.seek(start)
    ctx = cs.Container(_io=stream, _params={}, _root=None, _parsing=True,
                       _building=False, _sizing=False, _subcons=None, _index=None)
    rows: list[FieldRow] = []
    for sc in struct.subcons:
        start = stream.tell()
        value = sc._parsereport(stream, ctx, "(layout)")
        end = stream.tell()
        if sc.name:
            ctx[sc.name] = value
        if end == start and not sc.name:
            continue
        name = sc.name or "<padding>"
        if isinstance(sc, cs.Renamed) and sc.name and sc.name.startswith("_"):
            continue
        rows.append(FieldRow(structure, name, base_offset + start, end - start,
                             data[start:end], value, display_value(value, sc),
                             docs_of(sc)))
    return rows
