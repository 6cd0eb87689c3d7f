"""The one funnel every DataFrame leaves through: column order and dtypes.

Column contracts (tests check them):

FIELDS_COLUMNS    structure:category field:str offset:uint64 size:uint64 raw:object(bytes)
                  value:object display:str description:str
EXTENTS_COLUMNS   guest_offset:uint64 length:uint64 kind:category depth:int16 file:category
                  host_offset:UInt64 (NA = none) codec:category source:category
REGIONS_COLUMNS   file:category offset:uint64 length:uint64 kind:category owner:str
                  (kind `slack`: the unused tail of a cluster a structure occupies)
FINDINGS_COLUMNS  severity:category code:str structure:str index:Int64 file:str
                  host_offset:UInt64 size:UInt64 message:str fixable:bool
                  guest_offset:UInt64 (NA: not about a guest range)
"""
from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import pandas as pd

from .units import human_size
from .model import KINDS, NO_HOST, KIND_COMPRESSED, SEVERITIES, Finding

FIELDS_COLUMNS = ["structure", "field", "offset", "size", "raw", "value", "display", "description"]
EXTENTS_COLUMNS = ["guest_offset", "length", "kind", "depth", "file", "host_offset", "codec", "source"]
REGIONS_COLUMNS = ["file", "offset", "length", "kind", "owner"]
FINDINGS_COLUMNS = ["severity", "code", "structure", "index", "file", "host_offset", "size",
                    "message", "fixable", "guest_offset"]
REGION_KINDS = ("header", "l1_table", "l2_table", "refcount_table", "refcount_block",
                "snapshot_table", "bitmap_directory", "bitmap_table", "bitmap_data",
                "crypto_header", "grain_directory", "grain_table", "block_map", "bat",
                "footer", "descriptor", "metadata", "log", "marker", "data", "compressed_data", "slack",
                "unreferenced", "overlap", "beyond_eof")


def _obj_col(values) -> pd.Series:
    s = pd.Series(values, dtype=object)
    return s


def fields_frame(rows) -> pd.DataFrame:
    return pd.DataFrame({
        "structure": pd.Categorical([r.structure for r in rows]),
        "field": pd.Series([r.field for r in rows], dtype=str),
        "offset": np.array([r.offset for r in rows], dtype=np.uint64),
        "size": np.array([r.size for r in rows], dtype=np.uint64),
        "raw": _obj_col([bytes(r.raw) for r in rows]),
        "value": _obj_col([r.value for r in rows]),
        "display": pd.Series([r.display for r in rows], dtype=str),
        "description": pd.Series([r.description for r in rows], dtype=str),
    }, columns=FIELDS_COLUMNS)


def nullable_offsets(values: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """uint64 offsets with NO_HOST shown as <NA> (pandas nullable UInt64)."""
    values = np.asarray(values, dtype=np.uint64)
    mask = values == NO_HOST
    return pd.arrays.IntegerArray(np.where(mask, np.uint64(0), values), mask)


def extents_frame(table, layer_paths: list[str] | None = None) -> pd.DataFrame:
    n = len(table)
    file_names = [str(s.path) for s in table.files]
    fidx = table.file.astype(np.int64)
    # file paths are unique per table (chains never repeat a file; VMDK dedups extents)
    file_col = (pd.Categorical.from_codes(fidx, categories=file_names) if n and file_names
                else pd.Categorical([None] * n))
    codec = np.where(table.kind == KIND_COMPRESSED, table.codec, "none")
    layers = layer_paths or []
    depth = table.depth.astype(np.int64)
    source = pd.Categorical.from_codes(np.where(depth < len(layers), depth, -1),
                                       categories=pd.Index(layers)) if layers else \
        pd.Categorical([None] * n)
    return pd.DataFrame({
        "guest_offset": table.guest.astype(np.uint64),
        "length": table.length.astype(np.uint64),
        "kind": pd.Categorical.from_codes(table.kind.astype(np.int64), categories=list(KINDS)),
        "depth": table.depth.astype(np.int16),
        "file": file_col,
        "host_offset": nullable_offsets(table.host),
        "codec": pd.Categorical(codec, categories=["none", "deflate", "zstd", "zlib"]),
        "source": source,
    }, columns=EXTENTS_COLUMNS)


def regions_frame(files, offsets, lengths, kinds, owners) -> pd.DataFrame:
    return pd.DataFrame({
        "file": pd.Categorical(files),
        "offset": np.asarray(offsets, dtype=np.uint64),
        "length": np.asarray(lengths, dtype=np.uint64),
        "kind": pd.Categorical(kinds, categories=list(REGION_KINDS)),
        "owner": pd.Series(owners, dtype=str),
    }, columns=REGIONS_COLUMNS)


def findings_frame(findings: list[Finding]) -> pd.DataFrame:
    def opt(vals):
        return pd.array(vals, dtype="Int64")
    return pd.DataFrame({
        "severity": pd.Categorical([f.severity for f in findings], categories=list(SEVERITIES)),
        "code": pd.Series([f.code for f in findings], dtype=str),
        "structure": pd.Series([f.structure for f in findings], dtype=str),
        "index": opt([f.index for f in findings]),
        "file": pd.Series([f.file for f in findings], dtype=str),
        "host_offset": pd.array([f.host_offset for f in findings], dtype="UInt64"),
        "size": pd.array([f.size for f in findings], dtype="UInt64"),
        "message": pd.Series([f.message for f in findings], dtype=str),
        "fixable": np.array([f.fixable for f in findings], dtype=bool),
        "guest_offset": pd.array([f.guest_offset for f in findings], dtype="UInt64"),
    }, columns=FINDINGS_COLUMNS)


class TableDict(Mapping):
    """name -> DataFrame, each built on first access (tables can be large)."""

    def __init__(self, makers: dict[str, Any]) -> None:
        self._makers = makers

    def __getitem__(self, name: str) -> pd.DataFrame:
        value = self._makers[name]
        if callable(value):
            value = value()
            self._makers[name] = value
        return value

    def __iter__(self):
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)

    def __repr__(self) -> str:
        return f"TableDict({', '.join(self._makers)})"


_CARD_CSS = ("<style>.imgscope-card{font-family:monospace;border:1px solid #ccc;padding:6px;"
             "display:inline-block}.imgscope-card td{padding:0 8px}"
             ".imgscope-card th{text-align:left;padding:0 8px}</style>")


def image_card_html(image) -> str:
    """A compact, escaped, static summary card for notebooks."""
    e = html.escape
    rows = [("format", f"{image.format} {image.variant}".strip()),
            ("file", str(image.path)),
            ("virtual size", f"{human_size(image.virtual_size)} ({image.virtual_size} bytes)"),
            ("cluster size", str(image.cluster_size) if image.cluster_size else "-"),
            ("file size", f"{human_size(image.source.size)}")]
    if image.backing is not None:
        rows.append(("backing", " \u2192 ".join(str(i.path.name) for i in image.chain[1:])))
    rows.append(("tables", ", ".join(image.tables) or "-"))
    rows.append(("findings", str(len(image._findings))))
    body = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
    return f"{_CARD_CSS}<div class='imgscope-card'><table>{body}</table></div>"
