"""Pictures of the common model: guest allocation, host layout, fragmentation,
refcounts, snapshot sharing and backing chains.

Every picture takes an opened Image of any format (and an optional matplotlib
Axes) and returns the Figure.  Nothing here reads a byte of the image itself:
the pictures are drawn from `extent_table()`, `extents()`, `regions()`,
`findings`, `tables` and `chain`.  Runs are merged with numpy first and drawn
as a few `broken_barh` collections or as one raster per row whose width is the
axis width in pixels, recomputed at every draw; in the raster, kinds that must
never disappear (leaks, overlaps, headers, tables, data) win the pixel as soon
as they touch it, the others by the bytes they hold in it.  So a disk with
millions of clusters draws in well under a second and an 8-byte L1 table or a
leaked cluster in a 1 TiB file still shows as one pixel.

This module imports matplotlib (not pyplot: the figures are not registered
with a GUI manager, so a notebook shows each returned figure once).
"""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import FancyBboxPatch, Patch
from matplotlib.lines import Line2D
from matplotlib.ticker import Formatter, Locator
from matplotlib.transforms import offset_copy
import numpy as np
import pandas as pd

from .errors import ImageError
from .frames import REGION_KINDS
from .model import (KINDS, KIND_COMPRESSED, KIND_DATA, KIND_ENCRYPTED, KIND_UNALLOCATED,
                    KIND_ZERO, NO_HOST)
from .units import human_size

__all__ = ["COLOURS", "allocation_map", "layout_strip", "fragmentation", "refcount_histogram",
           "snapshot_sharing", "chain_diagram", "byte_axis", "layer_colour"]

#: One colour per kind, shared by every picture (and by the hex view and widgets).
#: Structures with the same role in different formats share a colour: the first-level
#: table (L1, grain directory, block map, BAT) is orange, the second level light orange.
COLOURS: dict[str, str] = {
    # guest extent kinds
    "data": "#1f77b4",
    "zero": "#9ecae1",
    "unallocated": "#ececec",
    "compressed": "#9467bd",
    "encrypted": "#8c564b",
    # host region kinds
    "header": "#2ca02c",
    "footer": "#98df8a",
    "l1_table": "#ff7f0e",
    "grain_directory": "#ff7f0e",
    "block_map": "#ff7f0e",
    "bat": "#ff7f0e",
    "l2_table": "#fdae6b",
    "grain_table": "#fdae6b",
    "refcount_table": "#17becf",
    "refcount_block": "#9edae5",
    "snapshot_table": "#bcbd22",
    "bitmap_directory": "#6b6ecf",
    "bitmap_table": "#9c9ede",
    "bitmap_data": "#cedb9c",
    "crypto_header": "#843c39",
    "descriptor": "#e7ba52",
    "metadata": "#f7b6d2",
    "log": "#e377c2",
    "marker": "#7f7f7f",
    "compressed_data": "#9467bd",
    "slack": "#c7c7c7",
    "unreferenced": "#d62728",
    "overlap": "#ff00ff",
    "beyond_eof": "#3b0000",
    # marks and states of the other pictures
    "finding": "#000000",
    "shared": "#31a354",
    "snapshot_only": "#e6550d",
}

#: Layers of a backing chain (depth 0 = the image itself), cycled for deep chains.
LAYER_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02",
                 "#a6761d", "#666666")

# region kinds that win a raster pixel as soon as they touch it, highest first: what is
# wrong, the small one-of-a-kind structures, then guest data; the other kinds (second-level
# tables, refcount blocks, bitmaps, metadata, log, slack) share the rest by bytes, a tie
# going to the kind named first in REGION_KINDS
_REGION_STICKY = ("beyond_eof", "overlap", "unreferenced", "header", "footer", "l1_table",
                  "grain_directory", "block_map", "bat", "refcount_table", "snapshot_table",
                  "bitmap_directory", "crypto_header", "descriptor", "compressed_data", "data")
# guest states: any data wins its pixel; zero and unallocated by bytes
_KIND_STICKY = ("compressed", "encrypted", "data")

#: Above this many runs in one row the row is drawn as a raster instead of bars.
MAX_BARS = 20_000
#: Above this many data runs `fragmentation` draws a density raster instead of points.
MAX_POINTS = 200_000
#: Snapshots drawn by `snapshot_sharing` (the rest are counted in the title).
MAX_SNAPSHOT_ROWS = 32


def layer_colour(depth: int) -> str:
    """The colour of chain layer `depth` (0 = the image itself)."""
    return LAYER_COLOURS[int(depth) % len(LAYER_COLOURS)]


# --------------------------------------------------------------------------- byte axes
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(value: float) -> str:
    """'0', '512 B', '1.5 MiB', '64 GiB': a tick label in binary units."""
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    v, i = abs(float(value)), 0
    while v >= 1024 and i < len(_UNITS) - 1:
        v /= 1024
        i += 1
    return f"{sign}{v:.4g} {_UNITS[i]}"


class BinaryLocator(Locator):
    """Ticks at multiples of a power of two, so labels read 512 KiB, 1 MiB, 1.5 MiB."""

    def __init__(self, nbins: int = 8) -> None:
        self.nbins = nbins

    def __call__(self):
        vmin, vmax = self.axis.get_view_interval()
        return self.tick_values(vmin, vmax)

    def tick_values(self, vmin, vmax):
        lo, hi = sorted((float(vmin), float(vmax)))
        span = hi - lo
        if not math.isfinite(span) or span <= 0:
            return np.array([lo])
        step = 2.0 ** math.ceil(math.log2(max(span / self.nbins, 1.0)))
        first = math.ceil(lo / step) * step
        count = int((hi - first) // step) + 1
        return first + step * np.arange(max(count, 1), dtype=float)


class BytesFormatter(Formatter):
    """Tick labels in binary units; none past `upto` (a squeezed part of an axis)."""

    def __init__(self, upto: float | None = None) -> None:
        self.upto = upto

    def __call__(self, x, pos=None) -> str:
        if self.upto is not None and x > self.upto:
            return ""
        return format_bytes(x)


def byte_axis(ax, axis: str = "x", label: str | None = None) -> None:
    """Format an axis ("x", "y" or "both") in bytes with binary units (KiB, MiB, GiB...)."""
    for name in ("x", "y") if axis == "both" else (axis,):
        a = ax.xaxis if name == "x" else ax.yaxis
        a.set_major_locator(BinaryLocator())
        a.set_major_formatter(BytesFormatter())
        if label is not None:
            a.set_label_text(label)


# --------------------------------------------------------------------------- helpers
def _axes(ax, width: float = 10.0, height: float = 2.4):
    """(figure, axes): the caller's axes, or a new figure (not registered with pyplot)."""
    if ax is not None:
        fig = ax.figure
        while getattr(fig, "figure", fig) is not fig:    # a SubFigure: its root figure
            fig = fig.figure
        return fig, ax
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _name(image) -> str:
    return Path(str(image.path)).name


def _same_file(a, b) -> bool:
    try:
        return Path(str(a)).resolve() == Path(str(b)).resolve()
    except (OSError, ValueError):
        return str(a) == str(b)


def merge_runs(starts, lengths, codes):
    """Adjacent runs with the same code merged: (starts, ends, codes) as numpy arrays."""
    s = np.asarray(starts, np.uint64)
    e = s + np.asarray(lengths, np.uint64)
    c = np.asarray(codes, np.int64)
    keep = e > s
    s, e, c = s[keep], e[keep], c[keep]
    if not s.size:
        return s, e, c
    order = np.argsort(s, kind="stable")
    s, e, c = s[order], e[order], c[order]
    new = np.ones(s.size, bool)
    new[1:] = (c[1:] != c[:-1]) | (s[1:] != e[:-1])
    first = np.flatnonzero(new)
    last = np.append(first[1:], s.size) - 1
    return s[first], e[last], c[first]


def _covered_fraction(s: np.ndarray, e: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Bytes of the sorted, disjoint intervals [s, e) inside each [bounds[j], bounds[j+1])."""
    length = e - s
    cum = np.concatenate([[0.0], np.cumsum(length)])
    i = np.searchsorted(s, bounds, side="right") - 1
    ii = np.maximum(i, 0)
    at = np.where(i >= 0, cum[ii] + np.clip(bounds - s[ii], 0, length[ii]), 0.0)
    return np.diff(at)


def raster_codes(starts, ends, codes, n_codes: int, sticky_rank, lo: float, hi: float,
                 width: int) -> np.ndarray:
    """For each of `width` pixels over [lo, hi): the code shown there, or -1.

    sticky_rank[c] >= 0: code c wins any pixel it touches (the highest rank among
    those present); codes with rank -1 share the rest by the bytes they hold (ties
    go to the smaller code)."""
    width = max(int(width), 1)
    out = np.full(width, -1, np.int64)
    span = float(hi) - float(lo)
    if span <= 0 or not len(starts):
        return out
    s = np.asarray(starts, np.float64) - float(lo)
    e = np.asarray(ends, np.float64) - float(lo)
    c = np.asarray(codes, np.int64)
    vis = (e > 0) & (s < span) & (e > s)
    s, e, c = np.clip(s[vis], 0, span), np.clip(e[vis], 0, span), c[vis]
    scale = width / span
    sticky_rank = np.asarray(sticky_rank)
    best_rank = np.full(width, -1, np.int64)
    best_bytes = np.zeros(width)
    bulk = np.full(width, -1, np.int64)
    bounds = np.arange(width + 1, dtype=np.float64) / scale
    present = np.unique(c)
    for code in present.tolist():
        sel = c == code
        cs, ce = s[sel], e[sel]
        if sticky_rank[code] >= 0:
            p0 = np.clip(np.floor(cs * scale).astype(np.int64), 0, width - 1)
            p1 = np.clip(np.ceil(ce * scale).astype(np.int64), p0 + 1, width)
            cover = np.cumsum(np.bincount(p0, minlength=width + 1)
                              - np.bincount(p1, minlength=width + 1))[:width] > 0
            win = cover & (sticky_rank[code] > best_rank)
            out[win] = code
            best_rank[win] = sticky_rank[code]
        else:
            order = np.argsort(cs, kind="stable")
            got = _covered_fraction(cs[order], ce[order], bounds)
            win = got > best_bytes
            bulk[win] = code
            best_bytes[win] = got[win]
    return np.where(best_rank >= 0, out, bulk)


class RunRaster(AxesImage):
    """One row of runs drawn as an image exactly as wide as the axis is in pixels.

    The raster is rebuilt at draw time whenever the axis width or the visible range
    changes (savefig at another dpi, a resized window, a zoom)."""

    def __init__(self, ax, starts, ends, codes, colours, sticky_rank, y0: float, y1: float,
                 domain: tuple[float, float], names=(), **kw) -> None:
        super().__init__(ax, interpolation="nearest", origin="upper", **kw)
        self.starts = np.asarray(starts, np.uint64)
        self.ends = np.asarray(ends, np.uint64)
        self.codes = np.asarray(codes, np.int64)
        self.palette = np.array([[round(v * 255) for v in to_rgba(col)] for col in colours],
                                np.uint8).reshape(-1, 4)
        self.sticky_rank = np.asarray(sticky_rank, np.int64)
        self.names = list(names)
        self.y0, self.y1 = y0, y1
        self.domain = (float(domain[0]), float(max(domain[1], domain[0] + 1)))
        self._key = None
        self.pixel_codes = np.zeros(0, np.int64)
        self.set_data(np.zeros((1, 1, 4), np.uint8))
        self.set_extent((self.domain[0], self.domain[1], y0, y1))

    def render(self, width: int, lo: float, hi: float) -> np.ndarray:
        """The RGBA row for `width` pixels over [lo, hi) (transparent where nothing is)."""
        self.pixel_codes = raster_codes(self.starts, self.ends, self.codes, len(self.palette),
                                        self.sticky_rank, lo, hi, width)
        rgba = np.zeros((1, width, 4), np.uint8)
        shown = self.pixel_codes >= 0
        rgba[0, shown] = self.palette[self.pixel_codes[shown]]
        return rgba

    def draw(self, renderer) -> None:
        ax = self.axes
        x0, x1 = sorted(ax.get_xlim())
        lo, hi = max(x0, self.domain[0]), min(x1, self.domain[1])
        if hi > lo:
            # never wider than the screen: each raster column then covers >= 1 pixel
            px = ax.bbox.width * (hi - lo) / max(x1 - x0, 1e-300)
            width = int(min(max(math.floor(px), 1), 1 << 16))
            key = (width, lo, hi)
            if key != self._key:
                self._key = key
                self.set_data(self.render(width, lo, hi))
                self.set_extent((lo, hi, self.y0, self.y1))
        super().draw(renderer)


def _draw_row(ax, starts, ends, codes, names, colours, sticky_rank, y0: float, height: float,
              *, gid: str, domain: tuple[float, float], force_raster: bool = False) -> list:
    """Merged runs of one row: bars per code (few runs) or one RunRaster (many)."""
    rank = np.asarray(sticky_rank, np.int64)
    if force_raster or starts.size > MAX_BARS:
        img = RunRaster(ax, starts, ends, codes, colours, sticky_rank, y0, y0 + height, domain,
                        names=names, gid=f"{gid}:raster", zorder=2.6)
        ax.add_image(img)
        return [img]
    out = []
    # sticky codes drawn last (on top), by rank; the edge keeps a sub-pixel run visible
    order = sorted(set(codes.tolist()), key=lambda k: (rank[k] >= 0, rank[k]))
    for z, code in enumerate(order):
        sel = codes == code
        xr = np.column_stack([starts[sel].astype(np.float64),
                              (ends[sel] - starts[sel]).astype(np.float64)])
        col = colours[code]
        out.append(ax.broken_barh(xr, (y0, height), facecolors=col, edgecolors=col,
                                  linewidths=0.8, zorder=2 + z * 0.01, gid=f"{gid}:{names[code]}",
                                  label=names[code]))
    return out


def _legend(ax, items: list[tuple[str, str]], ncol: int | None = None) -> None:
    """A legend of (label, colour) swatches below the axes."""
    if not items:
        return
    handles = [Patch(facecolor=c, edgecolor="#555555", linewidth=0.4, label=lab) for lab, c in items]
    # a fixed distance under the axes (below tick labels and axis label), whatever its height
    below = offset_copy(ax.transAxes, fig=ax.figure, y=-34, units="points")
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below,
              ncol=ncol or min(len(handles), 6), fontsize="small", frameon=False)


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, gid="message")
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- allocation
def allocation_map(image, ax=None, by_layer: bool = False):
    """The guest address space by state (data, zero, unallocated, compressed, encrypted);
    with `by_layer`, a second row says which layer of the backing chain supplies each
    range.  Bars carry gid "state:KIND" / "layer:DEPTH" (raster rows "...:raster")."""
    fig, ax = _axes(ax, height=2.2 + (0.5 if by_layer else 0))
    table = image.extent_table()
    size = max(int(image.virtual_size), 1)
    domain = (0.0, float(size))
    names = list(KINDS)
    colours = [COLOURS[k] for k in names]
    rank = [len(_KIND_STICKY) - _KIND_STICKY.index(k) if k in _KIND_STICKY else -1 for k in names]
    s, e, c = merge_runs(table.guest, table.length, table.kind)
    ys = []
    rows = [("state", s, e, c, names, colours, rank)]
    if by_layer:
        chain = image.chain
        depth = table.depth.astype(np.int64)
        code = np.where(table.kind == KIND_UNALLOCATED, len(chain), np.clip(depth, 0, len(chain) - 1))
        ls, le, lc = merge_runs(table.guest, table.length, code)
        lnames = [str(d) for d in range(len(chain))] + ["unallocated"]
        lcol = [layer_colour(d) for d in range(len(chain))] + [COLOURS["unallocated"]]
        lrank = list(range(len(chain), 0, -1)) + [-1]    # the top layer wins a shared pixel
        rows.append(("layer", ls, le, lc, lnames, lcol, lrank))
    for i, (gid, rs, re, rc, rn, rcol, rr) in enumerate(rows):
        y = -i
        _draw_row(ax, rs, re, rc, rn, rcol, rr, y - 0.4, 0.8, gid=gid, domain=domain)
        ys.append(y)
    # findings about guest data, marked above the state row
    f = image.findings
    g = f["guest_offset"].dropna()
    if len(g):
        x = np.clip(g.to_numpy(np.float64), 0, size)
        ax.scatter(x, np.full(x.size, 0.55), marker="v", s=28, color=COLOURS["finding"],
                   zorder=5, gid="findings", label="finding")
    ax.set_xlim(*domain)
    ax.set_ylim(ys[-1] - 0.6, 0.75)
    ax.set_yticks(ys, ["state"] + (["layer"] if by_layer else []))
    byte_axis(ax, "x", "guest offset")
    ax.set_title(f"{_name(image)}: guest allocation ({image.format}, "
                 f"{human_size(image.virtual_size)})")
    used = set(c.tolist())
    items = [(k, COLOURS[k]) for i, k in enumerate(names) if i in used]
    if by_layer:
        items += [(f"layer {d}: {_name(layer)}", layer_colour(d))
                  for d, layer in enumerate(image.chain) if d in set(rows[1][3].tolist())]
    if len(g):
        items.append((f"finding ({len(g)})", COLOURS["finding"]))
    _legend(ax, items)
    return fig


# --------------------------------------------------------------------------- host layout
def _shared_host_ranges(image) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Host byte ranges this layer's guest map references more than once, per file path
    (two guest clusters reading the same host bytes: what corrupt tables look like)."""
    table = image.extent_table()
    sel = ((table.depth == 0) & (table.host != NO_HOST) & (table.file >= 0)
           & np.isin(table.kind, (KIND_DATA, KIND_ZERO, KIND_ENCRYPTED)))
    out = {}
    for fi in np.unique(table.file[sel]).tolist():
        m = sel & (table.file == fi)
        h, ln = table.host[m], table.length[m]
        ln = np.minimum(ln, np.uint64((1 << 64) - 1) - h)      # hostile offsets do not wrap
        pts = np.concatenate([h, h + ln])
        step = np.concatenate([np.ones(h.size, np.int64), -np.ones(h.size, np.int64)])
        order = np.lexsort((step, pts))
        pts, step = pts[order], step[order]
        depth = np.cumsum(step)
        multi = (depth[:-1] >= 2) & (pts[1:] > pts[:-1])
        if multi.any():
            out[str(table.files[fi].path)] = (pts[:-1][multi], pts[1:][multi])
    return out


def layout_strip(image, ax=None, chain: bool = False, check: bool = False):
    """The host file(s) as a strip by region kind (header, tables, data, slack...),
    unreferenced (leaked) space and overlapping structures highlighted, host bytes
    referenced twice by the guest map drawn as `overlap`, findings with a host
    offset marked.  One row per file of the image (of every layer with `chain`);
    `check=True` runs image.check() first so its findings are marked too."""
    if check:
        image.check()
    layers = image.chain if chain else [image]
    rows = []                     # (file path, its regions, host ranges read twice or None)
    for layer in layers:
        reg = layer.regions()
        shared = _shared_host_ranges(layer)
        for fname in pd.unique(reg["file"]).tolist():
            part = reg[(reg["file"] == fname).to_numpy()]
            extra = next((v for k, v in shared.items() if _same_file(k, fname)), None)
            rows.append((str(fname), part, extra))
    fig, ax = _axes(ax, height=1.9 + 0.45 * len(rows))
    if not rows:
        _no_data(ax, "no host files")
        return fig
    names = list(REGION_KINDS)
    idx = {k: i for i, k in enumerate(names)}
    colours = [COLOURS[k] for k in names]
    rank = [len(_REGION_STICKY) - _REGION_STICKY.index(k) if k in _REGION_STICKY else -1
            for k in names]
    # the axis spans the largest file; what is claimed past its end (hostile pointers can
    # claim exabytes) is squeezed into one more tenth, and the title says how far it goes
    file_end, claimed = 1, 1
    for fname, part, _ in rows:
        size = _file_size(layers, fname)
        end = int((part["offset"] + part["length"]).max()) if len(part) else 0
        file_end = max(file_end, size if size is not None else end)
        claimed = max(claimed, end)
    xmax = file_end + max(file_end // 10, 1) if claimed > file_end else file_end
    domain = (0.0, float(xmax))

    def squeeze(x):
        x = np.asarray(x, np.float64)
        if claimed <= file_end:
            return x
        past = file_end + (x - file_end) * ((xmax - file_end) / (claimed - file_end))
        return np.where(x > file_end, past, x)
    used = set()
    yt, yl = [], []
    for i, (fname, part, extra) in enumerate(rows):
        y = -i
        s = part["offset"].to_numpy(np.uint64)
        e = s + part["length"].to_numpy(np.uint64)
        c = part["kind"].cat.codes.to_numpy(np.int64)       # categories: REGION_KINDS
        if extra is not None:
            s = np.concatenate([s, extra[0]])
            e = np.concatenate([e, extra[1]])
            c = np.concatenate([c, np.full(extra[0].size, idx["overlap"])])
        if claimed > file_end:
            s2 = np.round(squeeze(s)).astype(np.uint64)
            s, e = s2, np.maximum(np.round(squeeze(e)).astype(np.uint64), s2 + np.uint64(1))
        order = np.argsort(s, kind="stable")
        s, e, c = s[order], e[order], c[order]
        used |= set(c.tolist())
        strip = RunRaster(ax, s, e, c, colours, rank, y - 0.35, y + 0.35, domain,
                          names=names, gid=f"layout:{i}", zorder=2.6)   # over the spines
        strip.file = fname
        ax.add_image(strip)
        size = _file_size(layers, fname)
        yt.append(y)
        yl.append(f"{Path(fname).name}\n{human_size(size) if size is not None else ''}".strip())
    # findings with a host offset, as triangles over the row of their file
    f = image.findings if not chain else _chain_findings(layers)
    fx, fy = [], []
    for fname, off in zip(f["file"].astype(str), f["host_offset"]):
        if pd.isna(off):
            continue
        row = next((i for i, r in enumerate(rows) if _same_file(r[0], fname)),
                   0 if len(rows) == 1 else None)
        if row is None:
            continue
        fx.append(min(float(squeeze(float(off))), domain[1]))
        fy.append(-row + 0.48)
    if fx:
        ax.scatter(fx, fy, marker="v", s=30, color=COLOURS["finding"], zorder=5,
                   gid="findings", clip_on=False)
    ax.set_xlim(*domain)
    ax.set_ylim(-len(rows) + 0.45, 0.62)
    ax.set_yticks(yt, yl, fontsize="small")
    byte_axis(ax, "x", "host file offset")
    beyond = ""
    if claimed > file_end:
        beyond = (f"\nright of the dashed end of file, not to scale: claims up to "
                  f"{format_bytes(claimed)}")
        ax.xaxis.set_major_formatter(BytesFormatter(upto=file_end))
        ax.axvline(file_end, color="#333333", linestyle="--", linewidth=0.8, zorder=4,
                   gid="end-of-file")
    ax.set_title(f"{_name(image)}: host file layout ({image.format}"
                 f"{' ' + image.variant if image.variant else ''}){beyond}")
    items = [(k, COLOURS[k]) for k in names if idx[k] in used]
    if fx:
        items.append((f"finding ({len(fx)})", COLOURS["finding"]))
    _legend(ax, items)
    return fig


def _file_size(layers, fname) -> int | None:
    for layer in layers:
        for src in layer.files():
            if _same_file(src.path, fname):
                return int(src.size)
    return None


def _chain_findings(layers):
    frames = [layer.findings for layer in layers]
    return pd.concat(frames, ignore_index=True) if frames else frames


# --------------------------------------------------------------------------- fragmentation
def fragmentation(image, ax=None):
    """Guest offset against host offset of every data run (as qemu-img map merges
    them): a straight diagonal is a file in guest order, scattered points are
    fragmentation.  One colour per host file; compressed clusters as crosses.
    Points carry gid "data:N" / "compressed:N" (N = file number in the legend)."""
    fig, ax = _axes(ax, width=7.0, height=5.5)
    ext = image.extents()
    hosted = ext["host_offset"].notna().to_numpy()
    kinds = np.asarray(KINDS, dtype=object)[ext["kind"].cat.codes.to_numpy(np.int64)]
    sel = hosted & np.isin(ext["kind"].cat.codes.to_numpy(),
                           [KIND_DATA, KIND_COMPRESSED, KIND_ENCRYPTED])
    runs = ext[sel]
    if not len(runs):
        _no_data(ax, "no data runs with a host offset")
        ax.set_title(f"{_name(image)}: fragmentation")
        return fig
    # files in the extent table's order (the image's own files first, then each backing
    # layer's), so a single-file chain gets the colours allocation_map(by_layer=True) uses
    order = [str(src.path) for src in image.extent_table().files]
    file_codes = runs["file"].cat.codes.to_numpy(np.int64)
    categories = [str(c) for c in runs["file"].cat.categories]
    present = {categories[i] for i in np.unique(file_codes).tolist() if i >= 0}
    files = [f for f in dict.fromkeys(order) if f in present]
    files += sorted(present - set(files))
    g = runs["guest_offset"].to_numpy(np.float64)
    h = runs["host_offset"].to_numpy(np.float64)
    ln = runs["length"].to_numpy(np.float64)
    fcol = np.asarray(categories + [""], dtype=object)[file_codes]     # code -1: no file
    kcol = kinds[sel]
    items = []
    many = len(runs) > MAX_POINTS
    for n, fname in enumerate(files):
        colour = LAYER_COLOURS[n % len(LAYER_COLOURS)]
        label = f"{Path(fname).name}" + (f" ({n})" if len(files) > 1 else "")
        for kind, marker in (("data", "o"), ("encrypted", "s"), ("compressed", "x")):
            m = (fcol == fname) & (kcol == kind)
            if not m.any():
                continue
            if many:
                _density(ax, g[m], h[m], colour, gid=f"{kind}:{n}")
            else:
                if kind != "compressed":     # a run as a segment of slope 1 from its start
                    xs = np.column_stack([g[m], g[m] + ln[m], np.full(m.sum(), np.nan)]).ravel()
                    ys = np.column_stack([h[m], h[m] + ln[m], np.full(m.sum(), np.nan)]).ravel()
                    ax.add_line(Line2D(xs, ys, color=colour, linewidth=1.2,
                                       gid=f"{kind}-runs:{n}"))
                ax.scatter(g[m], h[m], s=12, marker=marker, color=colour, zorder=3,
                           gid=f"{kind}:{n}")
            items.append((f"{kind}: {label}", colour, marker))
    # runs whose host offset goes backwards (in the same file): the guest order is broken
    back = 0
    for fname in files:
        m = fcol == fname
        order = np.argsort(g[m], kind="stable")
        back += int(np.count_nonzero(np.diff(h[m][order]) < 0))
    ax.set_xlim(0, max(float(image.virtual_size), 1.0))
    hmax = float(np.max(h + ln))
    ax.set_ylim(0, max(hmax, 1.0) * 1.02)
    byte_axis(ax, "x", "guest offset")
    byte_axis(ax, "y", "host file offset")
    ax.set_title(f"{_name(image)}: fragmentation ({len(runs)} data runs, "
                 f"{back} out of host order)")
    ax.grid(True, linewidth=0.3, alpha=0.5)
    ax.legend(handles=[Line2D([], [], marker=mk, linestyle="-" if mk != "x" else "", color=c,
                              label=lab) for lab, c, mk in items],
              loc="upper left", fontsize="small")
    return fig


def _density(ax, x, y, colour, gid: str) -> None:
    """Many points as a 2-D histogram (pixels holding at least one run start)."""
    counts, xe, ye = np.histogram2d(x, y, bins=(600, 400))
    rgba = np.zeros(counts.T.shape + (4,), np.float64)
    rgba[..., :] = to_rgba(colour)
    rgba[..., 3] = np.where(counts.T > 0, 0.35 + 0.65 * np.log1p(counts.T)
                            / max(np.log1p(counts.max()), 1e-9), 0)
    ax.imshow(rgba, origin="lower", extent=(xe[0], xe[-1], ye[0], ye[-1]), aspect="auto",
              interpolation="nearest", gid=gid)


# --------------------------------------------------------------------------- refcounts
def refcount_histogram(image, ax=None):
    """How many host clusters have each reference count.  qcow2: the refcounts stored
    in the image; other formats: guest references per host cluster counted from the
    extent table (0 = holds no guest data: metadata or free space).  The bars carry
    gid "refcounts"; their x tick labels are the counts."""
    fig, ax = _axes(ax, width=7.0, height=4.0)
    stored = image.format == "qcow2" and "refcounts" in image.tables
    if stored:
        values = image.tables["refcounts"]["refcount"].to_numpy(np.uint64)
        counts_of, n_of = np.unique(values, return_counts=True)
        unit = image.cluster_size
        what = "stored refcount"
    else:
        unit = int(image.cluster_size or 512)
        counts_of, n_of = _reference_counts(image, unit)
        what = "guest references"
    if not counts_of.size:
        _no_data(ax, "no host clusters")
        ax.set_title(f"{_name(image)}: {what} per host cluster")
        return fig
    pos = np.arange(counts_of.size)
    colours = [COLOURS["unallocated"] if v == 0 else COLOURS["data"] if v == 1
               else COLOURS["shared"] for v in counts_of.tolist()]
    bars = ax.bar(pos, n_of, color=colours, edgecolor="#555555", linewidth=0.5, gid="refcounts")
    ax.bar_label(bars, [f"{int(v)}" for v in n_of], fontsize="small")
    ax.set_xticks(pos, [str(int(v)) for v in counts_of])
    if n_of.max() > 50 * max(n_of.min(), 1):
        ax.set_yscale("log")
    ax.set_xlabel(what)
    ax.set_ylabel(f"host clusters ({human_size(unit)} each)")
    total = int(n_of.sum())
    ax.set_title(f"{_name(image)}: {what} per host cluster ({total} clusters)")
    _legend(ax, [("0: free" if stored else "0: no guest data (metadata, free)",
                  COLOURS["unallocated"]),
                 ("1: used once", COLOURS["data"]), ("2+: shared", COLOURS["shared"])], ncol=3)
    return fig


def _reference_counts(image, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference count, number of host clusters with it) over this layer's files,
    from the extent table; a cluster takes the highest count of any byte in it."""
    table = image.extent_table()
    u = np.uint64(unit)
    hosted = (table.depth == 0) & (table.host != NO_HOST) & (table.file >= 0) \
        & (table.kind != KIND_UNALLOCATED)
    tally: dict[int, int] = {}
    for fi, src in enumerate(table.files):
        m = hosted & (table.file == fi)
        size = np.uint64(src.size)
        n_clusters = int(-(-int(size) // unit))
        if not m.any():
            if any(_same_file(src.path, f.path) for f in image.files()):
                tally[0] = tally.get(0, 0) + n_clusters
            continue
        # offsets past 2^62 are garbage in any real file: cap them so sums cannot wrap
        cap = np.uint64(1 << 62)
        h = np.minimum(table.host[m], cap)
        ln = np.where(table.kind[m] == KIND_COMPRESSED, table.host_length[m], table.length[m])
        end = h + np.minimum(np.maximum(ln, 1).astype(np.uint64), cap)
        # constant-coverage segments by an event sweep
        pts = np.concatenate([h, end, [np.uint64(0), max(size, end.max())]])
        step = np.concatenate([np.ones(h.size, np.int64), -np.ones(h.size, np.int64), [0, 0]])
        b, inv = np.unique(pts, return_inverse=True)
        delta = np.bincount(inv, weights=step, minlength=b.size).astype(np.int64)
        cov = np.cumsum(delta)[:-1]                       # coverage of [b[i], b[i+1])
        lo, hi = b[:-1], b[1:]
        # whole clusters inside each segment keep its coverage
        c_first = (lo + u - np.uint64(1)) // u
        c_end = hi // u
        whole = np.where(c_end > c_first, c_end - c_first, 0).astype(np.int64)
        # clusters cut by a segment boundary take the highest coverage they touch
        cut = np.unique(b[(b % u) != 0] // u)
        if cut.size:
            first_seg = np.searchsorted(b, cut * u, side="right") - 1
            last_seg = np.searchsorted(b, (cut + np.uint64(1)) * u, side="left") - 1
            last_seg = np.minimum(last_seg, cov.size - 1)
            nseg = last_seg - first_seg + 1
            segs = np.repeat(first_seg, nseg) + (np.arange(nseg.sum())
                                                 - np.repeat(np.cumsum(nseg) - nseg, nseg))
            starts = np.cumsum(nseg) - nseg
            cut_cov = np.maximum.reduceat(cov[segs], starts)
        else:
            cut_cov = np.zeros(0, np.int64)
        vals = np.concatenate([cov, cut_cov])
        weights = np.concatenate([whole, np.ones(cut_cov.size, np.int64)])
        for v, w in zip(*_sum_by(vals, weights)):
            tally[int(v)] = tally.get(int(v), 0) + int(w)
    keys = np.array(sorted(k for k, w in tally.items() if w), np.int64)
    return keys, np.array([tally[int(k)] for k in keys], np.int64)


def _sum_by(keys: np.ndarray, weights: np.ndarray):
    uk, inv = np.unique(keys, return_inverse=True)
    return uk, np.bincount(inv, weights=weights, minlength=uk.size).astype(np.int64)


# --------------------------------------------------------------------------- snapshots
def snapshot_states(active, snap, size: int):
    """Guest ranges of one snapshot against the active image: (starts, ends, codes) with
    codes 0 shared (same host bytes), 1 snapshot_only (its own copy), 2 zero,
    3 unallocated (reads from the backing file or as zeros)."""
    def own(t):
        keep = t.depth == 0
        return t.take(keep) if not keep.all() else t
    a, b = own(active), own(snap)
    pts = np.unique(np.concatenate([a.guest, a.guest + a.length, b.guest, b.guest + b.length,
                                    np.array([0, size], np.uint64)]))
    pts = pts[pts <= np.uint64(size)]
    lo, hi = pts[:-1], pts[1:]

    def at(t):
        """kind, host byte and file at the start of every piece [lo, hi)"""
        if not len(t):
            return (np.full(lo.size, KIND_UNALLOCATED), np.full(lo.size, NO_HOST),
                    np.full(lo.size, -1))
        i = np.searchsorted(t.guest, lo, side="right") - 1
        ii = np.maximum(i, 0)
        inside = (i >= 0) & (lo < (t.guest + t.length)[ii])
        kind = np.where(inside, t.kind[ii], KIND_UNALLOCATED)
        host = np.where(inside & (t.host[ii] != NO_HOST),
                        t.host[ii] + np.where(t.kind[ii] == KIND_COMPRESSED, np.uint64(0),
                                              lo - t.guest[ii]), NO_HOST)
        return kind, host, np.where(inside, t.file[ii], -1)
    ka, ha, fa = at(a)
    kb, hb, fb = at(b)
    has_b = hb != NO_HOST
    shared = has_b & (ha == hb) & (fa == fb) & (ka == kb)
    code = np.where(shared, 0,
                    np.where(np.isin(kb, (KIND_DATA, KIND_COMPRESSED, KIND_ENCRYPTED)), 1,
                             np.where(kb == KIND_ZERO, 2, 3)))
    return merge_runs(lo, hi - lo, code)


def snapshot_sharing(image, ax=None):
    """Per internal snapshot (qcow2), which guest clusters still share their host
    cluster with the active image, which the snapshot holds alone (the active image
    has rewritten them since), which are zero or unallocated.  Bars carry gid
    "snapshot:NAME:STATE"; images without snapshots get an axis saying so."""
    snaps = list(getattr(image, "snapshots", []) or [])
    shown = snaps[:MAX_SNAPSHOT_ROWS]
    fig, ax = _axes(ax, height=1.9 + 0.45 * (len(shown) + 1))
    if not snaps or not hasattr(image, "snapshot"):
        _no_data(ax, f"{_name(image)} has no internal snapshots")
        ax.set_title(f"{_name(image)}: snapshot sharing")
        return fig
    active = image.extent_table()
    size = max([int(image.virtual_size)] + [int(s.get("disk_size") or 0) for s in shown] + [1])
    domain = (0.0, float(size))
    names = ["shared", "snapshot_only", "zero", "unallocated"]
    colours = [COLOURS[k] for k in names]
    rank = [-1, -1, -1, -1]
    # the active image's own state as the first row, for reference
    s, e, c = merge_runs(active.guest, active.length, active.kind)
    knames = list(KINDS)
    _draw_row(ax, s, e, c, knames, [COLOURS[k] for k in knames], [-1] * len(knames), -0.4, 0.8,
              gid="active", domain=domain)
    active_used = set(c.tolist())
    labels, ys = ["active"], [0]
    cs = int(image.cluster_size or 1)
    used = set()
    for i, snap in enumerate(shown, start=1):
        try:
            view = image.snapshot(snap["id_str"])
            table = view.extent_table()
        except ImageError as exc:           # an unreadable snapshot table: say so on its row
            ax.text(0.01, -i, f"unreadable: {exc}", transform=ax.get_yaxis_transform(),
                    va="center", fontsize="small")
            labels.append(str(snap.get("name")))
            ys.append(-i)
            continue
        s, e, c = snapshot_states(active, table, size)
        used |= set(c.tolist())
        _draw_row(ax, s, e, c, names, colours, rank, -i - 0.4, 0.8,
                  gid=f"snapshot:{snap['name']}", domain=domain)
        n_shared = int(np.sum((e - s)[c == 0])) // cs
        n_own = int(np.sum((e - s)[c == 1])) // cs
        labels.append(f"{snap['name']}\n{n_shared} shared, {n_own} own")
        ys.append(-i)
    ax.set_xlim(*domain)
    ax.set_ylim(-len(shown) - 0.6, 0.6)
    ax.set_yticks(ys, labels, fontsize="small")
    byte_axis(ax, "x", "guest offset")
    more = f", first {len(shown)} of {len(snaps)}" if len(snaps) > len(shown) else ""
    ax.set_title(f"{_name(image)}: clusters each snapshot shares with the active image "
                 f"({len(snaps)} snapshots{more})")
    items = [(f"active: {knames[k]}", COLOURS[knames[k]]) for k in sorted(active_used)]
    items += [(k.replace("_", " "), COLOURS[k]) for i, k in enumerate(names) if i in used]
    _legend(ax, items, ncol=4)
    return fig


# --------------------------------------------------------------------------- chain
def chain_diagram(image, ax=None):
    """The backing chain as boxes (file, format, virtual size, file size), the image
    itself on the left, an arrow to each backing file with the name written in the
    image.  Boxes carry gid "chain:DEPTH"."""
    chain = image.chain
    fig, ax = _axes(ax, width=max(4.0, 3.3 * len(chain)), height=2.6)
    w, gap = 2.6, 0.8
    for d, layer in enumerate(chain):
        x = d * (w + gap)
        box = FancyBboxPatch((x, 0.1), w, 0.8, boxstyle="round,pad=0.02,rounding_size=0.08",
                             facecolor=to_rgba(layer_colour(d), 0.18),
                             edgecolor=layer_colour(d), linewidth=1.6, gid=f"chain:{d}")
        ax.add_patch(box)
        variant = f" {layer.variant}" if layer.variant else ""
        files = layer.files()
        size = human_size(sum(int(src.size) for src in files))
        in_files = f" in {len(files)} files" if len(files) > 1 else ""
        text = (f"{_name(layer)}\n{layer.format}{variant}\n"
                f"virtual {human_size(layer.virtual_size)}, file {size}{in_files}")
        ax.text(x + w / 2, 0.5, text, ha="center", va="center", fontsize="small",
                gid=f"chain-text:{d}")
        ax.text(x + w / 2, 0.96, "image" if d == 0 else f"backing {d}", ha="center",
                va="bottom", fontsize="x-small", color="#555555")
        if d + 1 < len(chain):
            ax.annotate("", xy=(x + w + gap, 0.5), xytext=(x + w, 0.5),
                        arrowprops=dict(arrowstyle="-|>", color="#333333", linewidth=1.2),
                        gid=f"chain-arrow:{d}")
            name = layer.backing_name or ""
            if name:
                ax.text(x + w + gap / 2, 0.56, name if len(name) < 24 else "..." + name[-21:],
                        ha="center", va="bottom", fontsize="x-small", rotation=0)
    ax.set_xlim(-0.1, len(chain) * (w + gap) - gap + 0.1)
    ax.set_ylim(0, 1.1)
    ax.set_axis_off()
    ax.set_title(f"{_name(image)}: backing chain ({len(chain)} "
                 f"layer{'s' if len(chain) != 1 else ''})")
    return fig
