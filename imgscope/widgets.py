"""Jupyter widgets: an explorer over one image's model and an address-translation stepper.

    from imgscope.widgets import Explorer, Stepper
    Explorer(img)            # summary, header fields, every table (paged), extents,
                             # regions, findings; a chosen entry or row shows its bytes
    Stepper(img)             # a guest offset followed through the format's tables

Every part is an ipywidgets object with a `.value`, so a test (or a script) drives
them by setting values: `explorer.table_select.value = "l2"`, `explorer.entry.value
= 3`, `stepper.offset.value = "1M"`, then reads the HTML widgets.  Tables are shown
a page of PAGE_ROWS rows at a time, never whole (an L2 frame can hold millions of
rows).  A callback that fails shows its error in the widget's status line instead of
a traceback.  ipywidgets is imported only when this module is.
"""
from __future__ import annotations

import functools
import html
from typing import Any, Callable

import ipywidgets as W
import numpy as np

from .errors import ImageError
from .hexview import Field, annotate, dump
from .translate import Step, translate
from .units import human_size, parse_size

PAGE_ROWS = 50             # rows of a table page
FIELD_ROWS = 200           # rows of a header-fields page (a header usually fits on one)
POINTED_BYTES = 256        # bytes shown of what an entry points to / of a region
ENTRY_MAX_BYTES = 512      # largest record shown as "the entry"

#: columns that hold a host offset an entry points to, most telling first
POINTER_COLUMNS = ("l2_offset", "gt_offset", "refblock_offset", "host_offset", "file_offset",
                   "data_offset", "bitmap_offset", "target_offset", "l1_table_offset",
                   "bitmap_table_offset", "data_offset")
#: entry bytes of the uniform tables (format, table) -> width
ENTRY_WIDTHS = {("qcow2", "l1"): 8, ("qcow2", "refcount_table"): 8, ("qcow2", "bitmap_tables"): 8,
                ("qcow", "l1"): 8, ("qcow", "l2"): 8, ("vdi", "block_map"): 4, ("vpc", "bat"): 4,
                ("vhdx", "bat"): 8, ("vhdx", "log_descriptors"): 32}
#: columns that give a record's own size when it has no neighbour to measure
SIZE_COLUMNS = ("entry_size", "entry_length", "length", "size", "bitmap_bytes")

_CSS = ("<style>.imgscope-w table{border-collapse:collapse;font-family:monospace;font-size:90%}"
        ".imgscope-w td,.imgscope-w th{border-bottom:1px solid #ddd;padding:1px 6px;"
        "text-align:left;white-space:nowrap}.imgscope-w tr.sel td{background:#fff3bf}"
        ".imgscope-w .err{color:#c92a2a}.imgscope-w .muted{color:#666}"
        ".imgscope-step{border:1px solid #ccc;border-radius:4px;padding:4px 8px;margin:4px 0}"
        ".imgscope-step .kind{font-weight:bold;padding:0 4px;border-radius:3px;"
        "background:#e9ecef}</style>")


# ---- rendering helpers ---------------------------------------------------------------------
def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _is_na(v) -> bool:
    if v is None:
        return True
    try:
        import pandas as pd
        return v is pd.NA or (isinstance(v, float) and np.isnan(v))
    except (TypeError, ValueError):
        return False


def _cell(column: str, v) -> str:
    """One value as table text: offsets and raw entries in hex, bytes shortened."""
    if _is_na(v):
        return "\u2013"
    if isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        return b[:16].hex(" ") + (f" \u2026 ({len(b)} bytes)" if len(b) > 16 else "")
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        v = int(v)
        if "offset" in column or column in ("raw", "reserved") or column.endswith("_bitmap"):
            return f"{v:#x}"
        return str(v)
    text = str(v)
    return text if len(text) <= 120 else text[:119] + "\u2026"


def frame_page_html(df, start: int, rows: int = PAGE_ROWS, selected: int | None = None) -> str:
    """Rows [start, start + rows) of a DataFrame as an escaped HTML table (row numbers first)."""
    part = df.iloc[start:start + rows]
    cols = [str(c) for c in part.columns]
    values = [part[c].tolist() for c in part.columns]
    head = "<tr><th>row</th>" + "".join(f"<th>{_esc(c)}</th>" for c in cols) + "</tr>"
    body = []
    for k in range(len(part)):
        row = start + k
        cls = " class='sel'" if row == selected else ""
        cells = "".join(f"<td>{_esc(_cell(c, values[j][k]))}</td>" for j, c in enumerate(cols))
        body.append(f"<tr{cls} data-row='{row}'><td>{row}</td>{cells}</tr>")
    return f"<div class='imgscope-w'>{_CSS}<table>{head}{''.join(body)}</table></div>"


def _error_html(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"
    return f"<div class='imgscope-w'>{_CSS}<span class='err'>error: {_esc(text)}</span></div>"


def _note_html(text: str) -> str:
    return f"<div class='imgscope-w'>{_CSS}<span class='muted'>{_esc(text)}</span></div>"


def _guarded(method: Callable) -> Callable:
    """Run a callback; an exception shows in `self.status` instead of a traceback."""
    @functools.wraps(method)
    def run(self, *args, **kw):
        try:
            result = method(self, *args, **kw)
        except Exception as exc:  # noqa: BLE001 - a widget callback must not raise
            self.status.value = _error_html(exc)
            self.last_error = exc
            return None
        return result
    return run


class _Pager:
    """A page number, previous/next buttons, a 'rows a..b of n' line and the page's HTML."""

    def __init__(self, rows: int = PAGE_ROWS) -> None:
        self.rows = rows
        self.page = W.BoundedIntText(value=1, min=1, max=1, description="page",
                                     layout=W.Layout(width="180px"))
        self.previous = W.Button(description="\u25c0", layout=W.Layout(width="40px"))
        self.next = W.Button(description="\u25b6", layout=W.Layout(width="40px"))
        self.info = W.HTML()
        self.view = W.HTML()
        self.previous.on_click(lambda _: self._step(-1))
        self.next.on_click(lambda _: self._step(1))
        self.frame = None
        self.selected: int | None = None

    def _step(self, delta: int) -> None:
        self.page.value = min(self.page.max, max(1, self.page.value + delta))

    def pages(self) -> int:
        n = 0 if self.frame is None else len(self.frame)
        return max(1, -(-n // self.rows))

    def set_frame(self, frame) -> None:
        """A new frame: back to page 1 (renders)."""
        self.frame = frame
        self.selected = None
        self.page.max = self.pages()
        if self.page.value != 1:
            self.page.value = 1          # the page observer renders
        else:
            self.render()

    def show_row(self, row: int) -> None:
        self.selected = row
        page = row // self.rows + 1
        if self.page.value != page:
            self.page.value = page
        else:
            self.render()

    def render(self) -> None:
        if self.frame is None:
            self.view.value = ""
            self.info.value = ""
            return
        n = len(self.frame)
        start = (self.page.value - 1) * self.rows
        self.view.value = frame_page_html(self.frame, start, self.rows, self.selected)
        last = min(n, start + self.rows)
        self.info.value = (f"<span class='muted'>rows {start}\u2013{max(start, last - 1)} of {n}, "
                           f"page {self.page.value} of {self.pages()}</span>" if n else
                           "<span class='muted'>no rows</span>")

    def controls(self) -> W.HBox:
        return W.HBox([self.previous, self.page, self.next, self.info])


# ---- the explorer --------------------------------------------------------------------------
class Explorer:
    """Everything the model holds about one image, browsable in a notebook.

    Parts (all ipywidgets): `summary`, `fields_view`, `table_select`, `page`,
    `table_view`, `entry` (a row of the chosen table: its bytes, and the first bytes
    of what it points to, appear in `hex`), `extents_view` / `extent`,
    `regions_view` / `region`, `findings_view` / `finding`, `status`, `stepper`.
    """

    def __init__(self, image, *, check: bool = False) -> None:
        self.image = image
        self.report = None                # the CheckReport once the checker ran
        self.last_error: BaseException | None = None
        self.status = W.HTML()
        self.summary = W.HTML()
        self.hex = W.HTML()
        # header fields
        self._fields = _Pager(FIELD_ROWS)
        self.fields_view = self._fields.view
        # tables
        names = list(image.tables)
        self.table_select = W.Dropdown(options=names, value=names[0] if names else None,
                                       description="table")
        self._table = _Pager()
        self.page = self._table.page
        self.table_view = self._table.view
        self.entry = W.IntText(value=0, description="entry")
        # extents, regions, findings
        self._extents, self._regions, self._findings = _Pager(), _Pager(), _Pager()
        self.extents_view, self.extents_page = self._extents.view, self._extents.page
        self.regions_view, self.regions_page = self._regions.view, self._regions.page
        self.findings_view, self.findings_page = self._findings.view, self._findings.page
        # -1: nothing chosen yet (a value that does not change fires no event)
        self.extent = W.IntText(value=-1, description="run")
        self.region = W.IntText(value=-1, description="region")
        self.finding = W.IntText(value=-1, description="finding")
        self.check_button = W.Button(description="run the checker")
        self.check_button.on_click(lambda _: self.run_check())
        self.stepper = Stepper(image)

        for pager in (self._fields, self._table, self._extents, self._regions, self._findings):
            pager.page.observe(lambda ch, p=pager: self._render(p), names="value")
        self.table_select.observe(lambda ch: self._choose_table(), names="value")
        self.entry.observe(lambda ch: self._show_entry(), names="value")
        self.extent.observe(lambda ch: self._show_extent(), names="value")
        self.region.observe(lambda ch: self._show_region(), names="value")
        self.finding.observe(lambda ch: self._show_finding(), names="value")

        tabs = [("header", W.VBox([self._fields.controls(), self.fields_view])),
                ("tables", W.VBox([W.HBox([self.table_select, self.entry]),
                                   self._table.controls(), self.table_view])),
                ("extents", W.VBox([W.HBox([self.extent]), self._extents.controls(),
                                    self.extents_view])),
                ("regions", W.VBox([W.HBox([self.region]), self._regions.controls(),
                                    self.regions_view])),
                ("findings", W.VBox([W.HBox([self.finding, self.check_button]),
                                     self._findings.controls(),
                                     self.findings_view])),
                ("translate", self.stepper.widget)]
        self.tabs = W.Tab(children=[w for _, w in tabs])
        for i, (title, _) in enumerate(tabs):
            self.tabs.set_title(i, title)
        self.widget = W.VBox([self.summary, self.tabs, self.status, self.hex])
        self._load()
        if check:
            self.run_check()

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget)

    def _repr_mimebundle_(self, **kw):
        return self.widget._repr_mimebundle_(**kw)

    # ---- loading ------------------------------------------------------------------------
    def _load(self) -> None:
        """Fill every view; a part that fails says so in the status line, the others load."""
        img = self.image
        parts = (lambda: setattr(self.summary, "value", self._summary_html()),
                 lambda: self._fields.set_frame(img.fields[["structure", "field", "offset",
                                                            "size", "display", "description"]]),
                 lambda: self._extents.set_frame(img.extents()),
                 lambda: self._regions.set_frame(img.regions()),
                 lambda: self._findings.set_frame(img.findings),
                 self._choose_table)
        errors = []
        for part in parts:
            try:
                part()
            except Exception as exc:  # noqa: BLE001 - shown, not raised
                errors.append(_error_html(exc))
                self.last_error = exc
        if errors:
            self.status.value = "".join(errors) + self.status.value

    @_guarded
    def run_check(self):
        """Run every rule of the checker (read-only); findings and summary are refreshed."""
        self.report = self.image.check()
        self.summary.value = self._summary_html()
        self._findings.set_frame(self.image.findings)
        return self.report

    def _summary_html(self) -> str:
        img = self.image
        f = img.findings
        counts = f.severity.value_counts() if len(f) else {}
        by_sev = ", ".join(f"{int(counts[s])} {s}" for s in ("critical", "error", "warning", "info")
                           if s in counts and int(counts[s]))
        rows = [("format", f"{img.format} {img.variant}".strip()),
                ("file", str(img.path)),
                ("virtual size", f"{human_size(img.virtual_size)} ({img.virtual_size} bytes)"),
                ("cluster size", f"{img.cluster_size} bytes" if img.cluster_size else "\u2013"),
                ("file size", f"{human_size(img.source.size)} ({img.source.size} bytes)"),
                ("host files", str(len(img.files())))]
        if img.backing is not None:
            rows.append(("backing chain", " \u2192 ".join(i.path.name for i in img.chain)))
        rows.append(("tables", ", ".join(img.tables) or "\u2013"))
        rows.append(("findings", f"{len(f)}" + (f" ({by_sev})" if by_sev else "")))
        if self.report is not None:
            c = self.report.counts
            rows.append(("check", f"{c.corruptions} corruptions, {c.leaks} leaks, "
                                  f"{c.check_errors} check errors"))
        body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
        return f"<div class='imgscope-w'>{_CSS}<table>{body}</table></div>"

    @_guarded
    def _render(self, pager: _Pager) -> None:
        pager.render()

    # ---- tables and entries -------------------------------------------------------------------
    def table(self):
        """The frame of the chosen table (built on first use by the driver)."""
        name = self.table_select.value
        return None if name is None else self.image.tables[name]

    @_guarded
    def _choose_table(self) -> None:
        self.status.value = ""
        self._table.set_frame(self.table())
        if self.entry.value != 0:
            self.entry.value = 0          # the entry observer shows row 0
        else:
            self._show_entry()

    @_guarded
    def _show_entry(self) -> None:
        df = self.table()
        row = int(self.entry.value)
        name = self.table_select.value
        if df is None or not len(df):
            self.hex.value = _note_html(f"table {name} has no rows")
            return
        if not 0 <= row < len(df):
            raise ImageError(f"table {name} has rows 0 to {len(df) - 1}, not {row}")
        self.status.value = ""
        self._table.show_row(row)
        self.hex.value = self.entry_html(name, df, row)

    def entry_html(self, name: str, df, row: int) -> str:
        """The entry's own bytes and the first bytes of what it points to."""
        rec = df.iloc[row]
        cols = [str(c) for c in df.columns]
        parts = []
        fi = self._file_of(rec)
        src = self.image.files()[fi]
        where = self._entry_place(name, df, row, cols, rec)
        summary = ", ".join(f"{c}={_cell(c, rec[c])}" for c in cols[:10])
        if where is not None:
            at, size = where
            raw = src.read_upto(at, size)
            fields = [Field(f"{name}[{row}]", name, at, len(raw), summary,
                            f"row {row} of table {name}")] if raw else []
            title = f"{name}[{row}]: {size} bytes at {at:#x} of {src.path.name}"
            if len(raw) < size:
                title += " (beyond the end of the file)"
            parts.append(dump(raw, at, fields, title).html())
        target = self._pointer(cols, rec)
        if target is not None:
            col, at = target
            tfi = self._pointer_file(name, rec, col, fi)
            try:
                view = annotate(self.image, offset=at, length=POINTED_BYTES, file=tfi)
                view.title = f"{col} {at:#x}: " + view.title
                parts.append(view.html())
            except ImageError as exc:
                parts.append(_error_html(exc))
        if not parts:
            parts.append(_note_html(f"row {row} of {name} has no host offset to show"))
        return "".join(parts)

    def _entry_width(self, table: str, rec) -> int | None:
        """Bytes of one entry of the uniform tables whose width the format fixes."""
        img = self.image
        if img.format == "vmdk" and table in ("grain_directory", "redundant_grain_directory",
                                              "grain_tables") and "extent" in rec.index:
            return int(getattr(img.extents_list[int(rec["extent"])], "entry_bytes", 4))
        if img.format == "qcow2" and table == "l2":
            return 16 if img.geometry.extended_l2 else 8
        return ENTRY_WIDTHS.get((img.format, table))

    def _entry_place(self, table: str, df, row: int, cols: list, rec) -> tuple[int, int] | None:
        """(offset, size) of the record itself in its host file, when the frame says."""
        col = "entry_offset" if "entry_offset" in cols else "offset" if "offset" in cols else None
        if col is None:
            return None
        at = df[col].iloc[row]
        if _is_na(at):
            return None
        width = self._entry_width(table, rec) if col == "entry_offset" else None
        if width:
            return int(at), width
        for c in SIZE_COLUMNS:
            if c in cols and not _is_na(df[c].iloc[row]) and col == "offset":
                return int(at), max(1, min(int(df[c].iloc[row]), ENTRY_MAX_BYTES))
        # a uniform table: the entry size is the smallest step between neighbouring entries
        near = df[col].iloc[max(0, row - 64):row + 64].to_numpy(dtype=np.float64, na_value=np.nan)
        steps = np.diff(near[~np.isnan(near)])
        steps = steps[steps > 0]
        size = int(steps.min()) if steps.size else 8
        return int(at), max(1, min(size, ENTRY_MAX_BYTES))

    def _pointer(self, cols: list, rec) -> tuple[str, int] | None:
        for c in POINTER_COLUMNS:
            if c in cols:
                v = rec[c]
                if not _is_na(v) and isinstance(v, (int, np.integer)) and int(v) > 0:
                    return c, int(v)
        return None

    def _file_of(self, rec) -> int:
        """Host file (index into image.files()) holding a table's rows."""
        img = self.image
        if "extent" in rec.index and img.format == "vmdk":
            ext = img.extents_list[int(rec["extent"])]
            return max(0, int(getattr(ext, "file_index", 0)))
        return 0

    def _pointer_file(self, table: str, rec, column: str, default: int) -> int:
        img = self.image
        if img.format == "qcow2" and table == "l2" and column == "host_offset" and \
                getattr(img.geometry, "data_file", False) and not bool(rec.get("compressed")):
            return 1 if len(img.files()) > 1 else 0
        return default

    # ---- extents, regions, findings --------------------------------------------------------------
    def _pick(self, pager: _Pager, widget: W.IntText, what: str):
        df = pager.frame
        row = int(widget.value)
        if row == -1:
            return None
        if df is None or not 0 <= row < len(df):
            n = 0 if df is None else len(df)
            raise ImageError(f"there are {n} {what}; {row} is none of them")
        self.status.value = ""
        pager.show_row(row)
        return df.iloc[row]

    def _file_index(self, path: str) -> tuple[Any, int]:
        """(image layer, file index) of a host file named by path."""
        for layer in self.image.chain:
            for i, s in enumerate(layer.files()):
                if str(s.path) == str(path):
                    return layer, i
        raise ImageError(f"{path} is not a file of this image", path=str(path))

    @_guarded
    def _show_extent(self) -> None:
        rec = self._pick(self._extents, self.extent, "extents")
        if rec is None:
            return
        g, n = int(rec["guest_offset"]), int(rec["length"])
        with self.image.open_guest() as r:
            r.seek(g)
            data = r.read(min(n, POINTED_BYTES))
        host = "" if _is_na(rec["host_offset"]) else f", host {int(rec['host_offset']):#x}"
        title = f"guest bytes {g:#x}..{g + n:#x} ({rec['kind']}{host}): first {len(data)} bytes"
        self.hex.value = dump(data, g, (), title).html()

    @_guarded
    def _show_region(self) -> None:
        rec = self._pick(self._regions, self.region, "regions")
        if rec is None:
            return
        layer, fi = self._file_index(rec["file"])
        at, n = int(rec["offset"]), int(rec["length"])
        view = annotate(layer, offset=at, length=max(1, min(n, POINTED_BYTES)), file=fi)
        view.title = f"{rec['kind']} ({rec['owner']}), {n} bytes: " + view.title
        self.hex.value = view.html()

    @_guarded
    def _show_finding(self) -> None:
        rec = self._pick(self._findings, self.finding, "findings")
        if rec is None:
            return
        at = rec["host_offset"]
        if _is_na(at):
            self.hex.value = _note_html(f"{rec['code']}: {rec['message']} (no host offset)")
            return
        layer, fi = self._file_index(rec["file"]) if rec["file"] else (self.image, 0)
        start = int(at) - int(at) % 16
        view = annotate(layer, offset=start, length=POINTED_BYTES, file=fi)
        view.title = f"{rec['code']} at {int(at):#x}: " + view.title
        self.hex.value = view.html()


# ---- the stepper ---------------------------------------------------------------------------
def parse_offset(text: str | int) -> int:
    """'1M', '64k', '0x10000', '4096', '1.5G' -> bytes."""
    if isinstance(text, (int, np.integer)):
        return int(text)
    t = str(text).strip().replace("_", "")
    if not t:
        raise ImageError("no guest offset given")
    try:
        if t.lower().startswith("0x"):
            return int(t, 16)
        return parse_size(t)
    except ValueError:
        raise ImageError(f"{text!r} is not an offset (try 4096, 0x1000, 64k or 1M)") from None


def steps_html(steps: list[Step]) -> str:
    """One card per Step: what was read where, its value and meaning, its bytes."""
    cards = []
    for i, s in enumerate(steps, 1):
        where = (f"{_esc(s.file)} at {s.host_offset:#x}" if s.host_offset is not None
                 else _esc(s.file))
        kind = f" <span class='kind'>{_esc(s.kind)}</span>" if s.kind else ""
        layer = f" <span class='muted'>(layer {s.depth})</span>" if s.depth else ""
        view = s.hexdump() if s.raw else None
        value = view.fields[0].value if view is not None and view.fields else ""
        body = (f"<div><b>{i}. {_esc(s.title)}</b> \u2014 {_esc(s.structure)}{kind}{layer}</div>"
                f"<div class='muted'>{where}</div>"
                + (f"<div>value: {_esc(value)}</div>" if value else "")
                + f"<div>{_esc(s.note)}</div>"
                + (view.html() if view is not None else ""))
        cards.append(f"<div class='imgscope-step' data-step='{i}' data-title='{_esc(s.title)}'"
                     f">{body}</div>")
    return f"<div class='imgscope-w'>{_CSS}{''.join(cards)}</div>"


class Stepper:
    """A guest offset followed through the format's tables, one card per step.

    `offset` (Text: "4096", "0x1000", "1M") re-renders `steps` when it changes;
    `go()` does it on demand; `result` holds the last list of Steps.
    """

    def __init__(self, image, offset: int | str = 0) -> None:
        self.image = image
        self.last_error: BaseException | None = None
        self.result: list[Step] = []
        self.offset = W.Text(value=str(offset), description="guest offset",
                             continuous_update=False)
        self.go_button = W.Button(description="translate")
        self.status = W.HTML()
        self.steps = W.HTML()
        self.offset.observe(lambda ch: self.go(), names="value")
        self.go_button.on_click(lambda _: self.go())
        self.widget = W.VBox([W.HBox([self.offset, self.go_button]), self.status, self.steps])
        self.go()

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget)

    def _repr_mimebundle_(self, **kw):
        return self.widget._repr_mimebundle_(**kw)

    @_guarded
    def go(self) -> list[Step]:
        """Translate the offset in `offset` and show the steps."""
        self.result = []
        self.steps.value = ""
        g = parse_offset(self.offset.value)
        self.result = translate(self.image, g)
        last = self.result[-1]
        self.status.value = _note_html(f"guest offset {g} ({g:#x}): {len(self.result)} steps, "
                                       f"{last.kind}" + (f" at host {last.host_offset:#x}"
                                                         if last.host_offset is not None
                                                         and last.kind == "data" else ""))
        self.steps.value = steps_html(self.result)
        return self.result


def explore(image_or_path, *, check: bool = False, **open_kw) -> Explorer:
    """An Explorer over an image or a path (opened read-only with imgscope.open and
    `open_kw`); `check=True` runs the checker first so its findings are listed."""
    from . import open as open_image
    image = image_or_path if hasattr(image_or_path, "extent_table") else \
        open_image(image_or_path, **open_kw)
    return Explorer(image, check=check)
