"""convert() and create(): any readable source into any writer, driven by the extent map.

The source's guest map decides what is read: zero and unallocated runs (and
raw holes) are never read nor handed to the writer.  Data runs, widened to the
writer's allocation unit, are read in large blocks through the guest reader
and zero-detected per unit with numpy (qemu-img's `-S`); the remaining units
go to the writer in guest order, several consecutive units per call when the
writer accepts runs.  With compression the units are compressed in a thread
pool (zlib and zstd release the GIL) and written in order from a bounded
queue.  The output is built in a temporary folder beside the destination and
moved into place only when the writer closed cleanly; on any error, or
Ctrl-C, the folder is removed and nothing appears under the destination name.
"""
from __future__ import annotations

import collections
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConvertError, ImageError
from ..model import KIND_DATA, KIND_COMPRESSED, KIND_ENCRYPTED, FLAG_HOST_HOLE
from .writers import writer_class
from .zeros import differ_units, nonzero_units, unit_runs

BLOCK = 8 << 20                      # bytes read per step
DEPTH = 4                            # blocks in flight: read ahead, being scanned, written
MAX_PIECES = 256                     # runs packed into one block at most
Progress = Callable[[int, int], None]
_SPEC = re.compile(r"^(?P<file>.+):(?:part(?P<part>\d+)|lvm:(?P<lv>[^:/]+))$")


@dataclass
class SourceView:
    """What the pipeline reads: a size, a positional reader and the ranges worth reading."""

    size: int
    reader: Any                       # has pread_into(offset, numpy uint8 array)
    starts: np.ndarray                # int64, sorted, merged: ranges that may hold data
    ends: np.ndarray
    close: list = field(default_factory=list)

    def release(self) -> None:
        for img in self.close:
            img.close()


# ---- where the data is ----------------------------------------------------------------
def _merge(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, overlapping or touching ranges merged (numpy, no loop per range)."""
    if starts.size == 0:
        return starts.astype(np.int64), ends.astype(np.int64)
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order].astype(np.int64), ends[order].astype(np.int64)
    reach = np.maximum.accumulate(ends)
    new = np.ones(starts.size, bool)
    new[1:] = starts[1:] > reach[:-1]
    group = np.cumsum(new) - 1
    out_ends = np.zeros(int(group[-1]) + 1, np.int64)
    np.maximum.at(out_ends, group, ends)
    return starts[new], out_ends


def table_runs(table) -> tuple[np.ndarray, np.ndarray]:
    """Guest ranges of an ExtentTable that must be read (data, compressed, encrypted)."""
    want = np.isin(table.kind, (KIND_DATA, KIND_COMPRESSED, KIND_ENCRYPTED))
    want &= (table.flags & FLAG_HOST_HOLE) == 0
    starts = table.guest[want].astype(np.int64)
    return _merge(starts, starts + table.length[want].astype(np.int64))


def reader_runs(reader) -> tuple[np.ndarray, np.ndarray]:
    """Data ranges of a reader: from its extent table, through spans, or all of it."""
    table = getattr(reader, "table", None)
    if table is not None and hasattr(table, "kind"):
        return table_runs(table)
    base = getattr(reader, "base", None)
    if base is not None and hasattr(reader, "starts") and hasattr(reader, "offsets"):
        bs, be = reader_runs(base)
        out_s, out_e = [], []
        for start, length, offset in zip(reader.starts.tolist(), reader.lengths.tolist(),
                                         reader.offsets.tolist()):   # a few spans
            lo, hi = offset, offset + length
            s = np.clip(bs, lo, hi)
            e = np.clip(be, lo, hi)
            keep = e > s
            out_s.append(s[keep] - offset + start)
            out_e.append(e[keep] - offset + start)
        if not out_s:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return _merge(np.concatenate(out_s), np.concatenate(out_e))
    size = int(reader.size)
    return np.array([0] if size else [], np.int64), np.array([size] if size else [], np.int64)


def parse_source_spec(text: str) -> tuple[str, int | None, str | None]:
    """`FILE`, `FILE:partN` or `FILE:lvm:LVNAME` -> (file, partition, lv).

    An existing file whose name happens to end like a spec is taken as a file.
    """
    if os.path.exists(text):
        return text, None, None
    m = _SPEC.match(text)
    if not m or not os.path.exists(m["file"]):
        return text, None, None
    return m["file"], (int(m["part"]) if m["part"] else None), m["lv"]


def open_source(src, source_format: str | None = None, snapshot: str | None = None,
                allow_paths=None) -> SourceView:
    """Any source convert() accepts, as a SourceView."""
    import imgscope
    opened = []
    part = lv = None
    if isinstance(src, (str, os.PathLike)):
        path, part, lv = parse_source_spec(os.fspath(src))
        src = imgscope.open(path, source_format, allow_paths=allow_paths)
        opened.append(src)
    try:
        if snapshot is not None:
            if not hasattr(src, "snapshot"):
                raise ConvertError(f"snapshots can only be read from qcow2 images, not from "
                                   f"{getattr(src, 'format', type(src).__name__)}")
            src = src.snapshot(snapshot)
        if part is not None:
            src = src.partition(part)
        elif lv is not None:
            src = src.lvm().open(lv)
        if hasattr(src, "extent_table"):                     # an image or snapshot
            size = int(src.virtual_size)
            reader = src.open_guest()
            starts, ends = table_runs(src.extent_table())
        elif hasattr(src, "open_guest"):
            size = int(src.virtual_size)
            reader = src.open_guest()
            starts, ends = reader_runs(reader)
        elif hasattr(src, "pread_into") and hasattr(src, "size"):   # a reader (LV, span)
            reader, size = src, int(src.size)
            starts, ends = reader_runs(reader)
        elif hasattr(src, "open") and hasattr(src, "readable"):     # a partition
            reader = src.open()
            size = int(reader.size)
            starts, ends = reader_runs(reader)
        else:
            raise ConvertError(f"cannot convert from a {type(src).__name__}: give a path, "
                               "an image, a partition or a reader")
        return SourceView(size, reader, starts, ends, opened)
    except BaseException:
        for img in opened:
            img.close()
        raise


# ---- the output's temporary folder --------------------------------------------------
class _Staging:
    """A temporary folder beside `dst`; `commit()` moves the writer's files into place."""

    def __init__(self, dst: Path, overwrite: bool) -> None:
        self.dst = Path(dst)
        if (self.dst.exists() or self.dst.is_symlink()) and not overwrite:
            raise ConvertError(f"{self.dst} already exists (use --force, or overwrite=True, "
                               "to replace it)", path=str(self.dst))
        if self.dst.is_dir():
            raise ConvertError(f"{self.dst} is a directory", path=str(self.dst))
        parent = self.dst.parent
        if not parent.is_dir():
            raise ConvertError(f"folder {parent} does not exist", path=str(self.dst))
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.", suffix=".tmp",
                                            dir=parent))
        self.path = self.folder / self.dst.name

    def commit(self, files: list[Path]) -> None:
        # extent files first, the main file last: it appears only once all it names exist
        for f in list(files[1:]) + list(files[:1]):
            os.replace(f, self.dst.parent / Path(f).name)

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _make_writer(fmt, path, size, options, backing, backing_format):
    cls = writer_class(fmt)
    opts = dict(options or {})
    if "size" in opts and "size" not in cls.OPTIONS:
        opts.pop("size")
    return cls(path, size, opts, backing=backing, backing_format=backing_format)


def _backing_image(backing: str, backing_format: str | None, dst: Path, allow_paths):
    """Open the backing file named for the output (relative names: to the output's folder)."""
    import imgscope
    path = Path(backing)
    if not path.is_absolute():
        path = Path(dst).parent / path
    try:
        return imgscope.open(path, backing_format, allow_paths=allow_paths)
    except ImageError as exc:
        raise ConvertError(f"could not open backing file {backing!r}: {exc.message}",
                           path=str(dst)) from None


# ---- convert ------------------------------------------------------------------------
class _Copier:
    """Hands the units of a block to the writer, directly or through the compressor pool."""

    def __init__(self, writer, compress: bool, threads: int | None) -> None:
        self.writer = writer
        self.runs_ok = bool(getattr(writer, "accepts_runs", False))
        self.pool = None
        if compress or writer.compress_always:
            if not writer.supports_compression or writer.compress_unit is None:
                raise ConvertError(f"{writer.format} images do not support compression",
                                   path=str(writer.path))
            workers = max(1, threads or os.cpu_count() or 1)
            self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgscope-compress")
            self.pending: collections.deque = collections.deque()
            self.limit = workers * 8

    def data(self, offset: int, block: np.ndarray, first: int, stop: int) -> None:
        unit = self.writer.unit
        if self.pool is not None:
            for k in range(first, stop):
                chunk = block[k * unit:(k + 1) * unit].tobytes()
                fut = self.pool.submit(self.writer.compress_unit, chunk)
                self.pending.append((offset + k * unit, fut, len(chunk)))
                while len(self.pending) > self.limit:
                    self._drain_one()
            return
        if self.runs_ok:
            self.writer.write(offset + first * unit, block[first * unit:stop * unit])
            return
        for k in range(first, stop):
            self.writer.write(offset + k * unit, block[k * unit:(k + 1) * unit].tobytes())

    def zeros(self, offset: int, length: int) -> None:
        self.flush()
        self.writer.write_zeros(offset, length)

    def _drain_one(self) -> None:
        off, fut, length = self.pending.popleft()
        self.writer.write_compressed(off, fut.result(), length)

    def flush(self) -> None:
        if self.pool is not None:
            while self.pending:
                self._drain_one()

    def shutdown(self) -> None:
        if self.pool is not None:
            for _, fut, _ in self.pending:
                fut.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)


def _aligned_runs(starts, ends, unit: int, size: int) -> list[tuple[int, int]]:
    s = (starts // unit) * unit
    e = np.minimum(-(-ends // unit) * unit, size)
    s, e = _merge(s, e)
    return list(zip(s.tolist(), e.tolist()))


def _steps(runs: list[tuple[int, int]], block: int, unit: int):
    """Read steps: (pieces, bytes used), each piece (guest offset, length, buffer offset).

    Runs are cut into `block`-sized pieces and small runs packed together, each at a
    unit-aligned place in one buffer, so a disk of many small runs costs one read
    task, one scan and one write task per buffer, not per run."""
    pieces: list[tuple[int, int, int]] = []
    used = 0
    for start, end in runs:
        pos = start
        while pos < end:
            n = min(end - pos, block - used)
            pieces.append((pos, n, used))
            used += -(-n // unit) * unit
            pos += n
            if used >= block or len(pieces) >= MAX_PIECES:
                yield pieces, used
                pieces, used = [], 0
    if pieces:
        yield pieces, used


def _read_step(view: SourceView, backing: SourceView | None, pieces: list, data: np.ndarray,
               other: np.ndarray | None, unit: int) -> None:
    """Runs in the read thread: each piece's source bytes (and the backing's) into place;
    a short last unit is padded with zeros."""
    for pos, n, at in pieces:
        pad = -(-n // unit) * unit
        view.reader.pread_into(pos, data[at:at + n])
        data[at + n:at + pad] = 0
        if other is not None:
            m = max(0, min(n, backing.size - pos))
            if m:
                backing.reader.pread_into(pos, other[at:at + m])
            other[at + m:at + pad] = 0


def _copy(view: SourceView, copier: _Copier, sparse_size: int, progress: Progress | None,
          backing: SourceView | None, zero_fill: bool = False) -> None:
    """Three stages overlap: a thread reads step k+1 and a thread writes step k-1
    while this one decides, per unit, what step k holds (os.preadv/pwrite and the
    numpy scans release the GIL).  Buffers go round a small ring, so memory stays
    at DEPTH blocks whatever the disk size.  `zero_fill` (a target that was not
    created empty) also hands every range holding no data to write_zeros()."""
    writer = copier.writer
    unit = writer.unit
    size = view.size
    if sparse_size == 0:          # -S 0: everything is written, zeros included
        starts, ends = np.array([0], np.int64), np.array([size], np.int64)
    else:
        starts, ends = view.starts, view.ends
    if backing is not None:       # also where the backing has data the source may lack
        bs = np.clip(backing.starts, 0, size)
        be = np.clip(backing.ends, 0, size)
        starts, ends = _merge(np.concatenate([starts, bs]), np.concatenate([ends, be]))
    runs = _aligned_runs(starts, ends, unit, size) if size else []
    total = sum(e - s for s, e in runs)
    done = 0
    if progress:
        progress(0, total)
    block = max(unit, BLOCK // unit * unit)
    write_all = sparse_size == 0 or writer.wants_zero_units
    ring = [(np.empty(block, np.uint8),
             np.empty(block, np.uint8) if backing is not None else None)
            for _ in range(DEPTH)]
    reads: collections.deque = collections.deque()     # (pieces, used, buffers, future)
    writes: collections.deque = collections.deque()    # (buffers, future)
    free = collections.deque(ring)
    steps = _steps(runs, block, unit)
    covered = 0                                        # zero_fill: the target is right below
    with ThreadPoolExecutor(1, thread_name_prefix="imgscope-read") as read_pool, \
            ThreadPoolExecutor(1, thread_name_prefix="imgscope-write") as write_pool:
        try:
            def refill() -> None:
                while free:
                    step = next(steps, None)
                    if step is None:
                        return
                    bufs = free.popleft()
                    pieces, used = step
                    fut = read_pool.submit(_read_step, view, backing, pieces, bufs[0],
                                           bufs[1], unit)
                    reads.append((pieces, used, bufs, fut))

            refill()
            while reads:
                pieces, used, bufs, fut = reads.popleft()
                fut.result()
                data = bufs[0][:used]
                other = None if bufs[1] is None else bufs[1][:used]
                nonzero, zeros = _unit_masks(data, other, unit, write_all, zero_fill)
                work = []
                for pos, n, at in pieces:
                    if zero_fill and pos > covered:      # the gap before this piece
                        work.append((covered, None, (), pos - covered))
                    covered = pos + n
                    u0, u1 = at // unit, (at + -(-n // unit) * unit) // unit
                    work.append((pos, data[at:at + n],
                                 _piece_actions(nonzero[u0:u1], zeros[u0:u1]), n))
                    done += n
                writes.append((bufs, write_pool.submit(_apply, copier, work)))
                # buffers whose step is written go back to the ring; wait for the
                # oldest write only when nothing is left to read ahead into
                while writes and (writes[0][1].done() or (not reads and not free)):
                    done_bufs, wfut = writes.popleft()
                    wfut.result()
                    free.append(done_bufs)
                    refill()
                if progress:
                    progress(done, total)
            if zero_fill and covered < size:
                write_pool.submit(copier.zeros, covered, size - covered)
            while writes:
                writes.popleft()[1].result()
            write_pool.submit(copier.flush).result()
        except BaseException:
            for item in list(reads) + list(writes):
                item[-1].cancel()
            raise


def _unit_masks(data: np.ndarray, other: np.ndarray | None, unit: int, write_all: bool,
                zero_fill: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per unit of a step's buffer: write it as data; hand it to write_zeros()."""
    units = data.size // unit
    nonzero = np.ones(units, bool) if write_all and other is None \
        else nonzero_units(data, unit)
    zeros = np.zeros(units, bool)
    if zero_fill and not write_all:
        zeros = ~nonzero
    if other is not None:
        differ = differ_units(data, other, unit)
        zeros = differ & ~nonzero
        nonzero = differ & (nonzero | write_all)
    return nonzero, zeros


def _piece_actions(nonzero: np.ndarray, zeros: np.ndarray) -> list[tuple[str, int, int]]:
    """("data"|"zeros", first unit, stop unit) of one piece, in guest order."""
    actions = [("data", a, b) for a, b in unit_runs(nonzero)]
    if zeros.any():
        actions += [("zeros", a, b) for a, b in unit_runs(zeros)]
        actions.sort(key=lambda a: a[1])
    return actions


def _apply(copier: _Copier, work: list) -> None:
    """Runs in the write thread: each piece's units to the writer, in guest order."""
    unit = copier.writer.unit
    for pos, data, actions, n in work:
        if data is None:                              # a gap of a zero_fill target
            copier.zeros(pos, n)
            continue
        for what, a, b in actions:
            if what == "data":
                copier.data(pos, data, a, b)
            else:
                copier.zeros(pos + a * unit, min(b * unit, n) - a * unit)


def convert(src, dst, format: str = "qcow2", *, options: dict | None = None,
            compress: bool = False, source_format: str | None = None,
            snapshot: str | None = None, sparse_size: int = 4096,
            backing: str | None = None, backing_format: str | None = None,
            overwrite: bool = False, into_existing: bool = False,
            progress: Progress | bool | None = None, allow_paths=None,
            threads: int | None = None) -> Path:
    """Convert `src` (a path, `FILE:partN`, `FILE:lvm:LV`, an image, partition or reader)
    into a new image `dst` of `format`; returns the destination path.

    `options` are the format's `-o` options; `sparse_size` is qemu-img's `-S`
    (0: write every byte); `backing`/`backing_format` give the output a backing
    file and write only what differs from it; `progress(done, total)` is called
    after every block (`progress=True`: a tqdm bar, the widget inside Jupyter).
    An existing `dst` is refused unless `overwrite`.
    `into_existing` is qemu-img's -n: `dst` (a raw file or block device at
    least as large as the source) is written in place, every byte of the guest
    disk, holes punched or zeroed, nothing created or removed.
    """
    if sparse_size < 0 or (sparse_size and sparse_size % 512):
        raise ConvertError(f"invalid sparse size {sparse_size}: a multiple of 512 bytes "
                           "(or 0) is needed")
    if into_existing:
        _refuse_into_existing(format, compress, backing)
    from ..progress import resolve
    progress, close_bar = resolve(progress, "convert")
    try:
        return _convert(src, dst, format, options, compress, source_format, snapshot,
                        sparse_size, backing, backing_format, overwrite, into_existing,
                        progress, allow_paths, threads)
    finally:
        close_bar()


def _convert(src, dst, format, options, compress, source_format, snapshot, sparse_size,
             backing, backing_format, overwrite, into_existing, progress, allow_paths,
             threads) -> Path:
    view = open_source(src, source_format, snapshot, allow_paths)
    staging = writer = copier = back = None
    try:
        if into_existing:
            writer = writer_class(format)(Path(dst), view.size, dict(options or {}),
                                          existing=True)
            if sparse_size:
                writer.unit = sparse_size
            copier = _Copier(writer, False, threads)
            _copy(view, copier, sparse_size, progress, None, zero_fill=True)
            writer.close()
            return Path(dst)
        if backing:
            back_img = _backing_image(backing, backing_format, Path(dst), allow_paths)
            view.close.append(back_img)
            backing_format = backing_format or back_img.format
            bs, be = table_runs(back_img.extent_table())
            back = SourceView(int(back_img.virtual_size), back_img.open_guest(), bs, be)
        staging = _Staging(Path(dst), overwrite)
        writer = _make_writer(format, staging.path, view.size, options, backing, backing_format)
        if getattr(writer, "sparse_unit_adjustable", False) and sparse_size:
            writer.unit = sparse_size
        if hasattr(writer, "sparse_writes"):
            writer.sparse_writes = sparse_size != 0
        copier = _Copier(writer, compress, threads)
        try:
            _copy(view, copier, sparse_size, progress, back)
        finally:
            copier.shutdown()
        return _finish(writer, staging, dst)
    except BaseException:
        _abort_quietly(writer)
        raise
    finally:
        if staging is not None:
            staging.cleanup()
        view.release()


def _finish(writer, staging: _Staging, dst) -> Path:
    """Close the writer, then move its files under the destination name."""
    writer.close()
    staging.commit(writer.written_files())
    return Path(dst)


def _abort_quietly(writer) -> None:
    """Undo a writer after a failure; its own errors must not hide the first one
    (the temporary folder is removed anyway)."""
    if writer is not None:
        try:
            writer.abort()
        except Exception:
            pass


def _refuse_into_existing(format: str, compress: bool, backing: str | None) -> None:
    if format != "raw":
        raise ConvertError(f"-n writes into an existing raw file or block device; a {format} "
                           "target is created (use --force to replace one)")
    if compress or backing:
        raise ConvertError("-n cannot be combined with -c or -B")


def create(path, format: str, size: int | str | None = None, options: dict | None = None,
           backing: str | None = None, backing_format: str | None = None, *,
           overwrite: bool = False, allow_paths=None) -> Path:
    """A new empty image (qemu-img create); the size may come from the backing file."""
    from ..units import parse_size
    opts = dict(options or {})
    if size is None and "size" in opts:
        size = opts.pop("size")
    if isinstance(size, str):
        try:
            size = parse_size(size)
        except (ValueError, IndexError):
            raise ConvertError(f"invalid size {size!r}") from None
    backing = backing or opts.pop("backing_file", None)
    backing_format = backing_format or opts.pop("backing_fmt", None)
    if backing:
        img = _backing_image(backing, backing_format, Path(path), allow_paths)
        try:
            backing_format = backing_format or img.format
            if size is None:
                size = int(img.virtual_size)
        finally:
            img.close()
    if size is None:
        raise ConvertError("Image creation needs a size parameter", path=str(path))
    if size < 0:
        raise ConvertError(f"invalid image size {size}", path=str(path))
    staging = _Staging(Path(path), overwrite)
    writer = None
    try:
        writer = _make_writer(format, staging.path, int(size), opts, backing, backing_format)
        return _finish(writer, staging, path)
    except BaseException:
        _abort_quietly(writer)
        raise
    finally:
        staging.cleanup()
