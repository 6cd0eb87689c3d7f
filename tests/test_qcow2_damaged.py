"""Forensic soundness of the qcow2 driver on damaged and hostile input.

What is checked here (every image is a real qemu-img/qemu-io image from the oracle
corpus, or one built here with qemu-img, then damaged byte by byte):

* truncated copies, cut inside the header, the extension area, the backing name, the
  refcount structures, the L1/L2 tables, the snapshot table and the data: they either
  raise ONE ImageError naming where (``.structure``, ``.offset``), or open, and then
  every part of the model either works or raises an ImageError, and the damage shows
  up in ``findings``;
* single header / table pokes with the exact outcome recorded (error type or finding
  codes), a tracemalloc peak bound and a wall-clock bound;
* random byte mutations (hypothesis) of the metadata of a small real image;
* confinement of names written inside an image (backing file, external data file);
* read-only: nothing in the corpus changes, whatever imgscope is asked to do.

Hostile inputs are opened in a forked child with an address-space cap and a time
limit, so a runaway allocation or a hang fails one test instead of the whole session.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import resource
import select
import shutil
import signal
import struct
import sys
import time
import traceback
import tracemalloc
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import imgscope
from imgscope.errors import ChainError, ImageError, ParseError, Unsupported, UnsafePath

import oracle

KiB, MiB = oracle.KiB, oracle.MiB

#: tracemalloc peak allowed while opening a hostile image and using its model
PEAK_LIMIT = 64 * MiB
#: wall-clock allowed (untraced) for open + extents + regions + fields + tables + info + 1 MiB:
#: a guard against hangs and per-entry loops on hostile sizes (normal runs take well under
#: a second), not a benchmark; generous because CI machines may be loaded
TIME_LIMIT = 60.0
#: address space a forked child may add on top of what it inherited
CHILD_EXTRA_AS = 1536 * MiB


# --------------------------------------------------------------------------- isolation


def run_isolated(fn: Callable[[], object], *, timeout: float = 60.0,
                 extra_as: int = CHILD_EXTRA_AS):
    """Run ``fn()`` in a forked child (RLIMIT_AS capped, wall-clock limited).

    Returns ("ok", value), ("exc", type name, message, traceback text),
    ("timeout", seconds) or ("died", wait status).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            with open("/proc/self/statm") as f:
                vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (vm + extra_as, vm + extra_as))
            try:
                res = ("ok", fn())
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                res = ("exc", type(exc).__name__, str(exc)[:2000],
                       "".join(traceback.format_exception(exc))[-6000:])
            try:
                data = pickle.dumps(res)
            except Exception as exc:  # noqa: BLE001
                data = pickle.dumps(("exc", type(exc).__name__, f"unpicklable result: {exc}", ""))
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BaseException:  # noqa: BLE001
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    with os.fdopen(r, "rb") as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return ("timeout", timeout)
            ready, _, _ = select.select([f], [], [], left)
            if ready:
                b = os.read(f.fileno(), 1 << 16)
                if not b:
                    break
                chunks.append(b)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return ("died", status)
    return pickle.loads(b"".join(chunks))


def isolated_value(fn, *, timeout: float = 60.0, what: str = ""):
    """run_isolated, failing the test unless fn returned normally."""
    res = run_isolated(fn, timeout=timeout)
    if res[0] == "timeout":
        pytest.fail(f"{what}: no answer after {res[1]} s (hang?)")
    if res[0] == "died":
        pytest.fail(f"{what}: child died with wait status {res[1]}")
    if res[0] == "exc":
        pytest.fail(f"{what}: {res[1]}: {res[2]}\n{res[3]}")
    return res[1]


class _Alarm(BaseException):
    """Raised by SIGALRM inside a child (not an Exception: nothing may swallow it)."""


@contextlib.contextmanager
def alarm(seconds: int):
    def handler(signum, frame):
        raise _Alarm(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- using the model


def _read_guest(img, limit: int | None) -> int:
    total = 0
    with img.open_guest() as g:
        want = img.virtual_size if limit is None else min(limit, img.virtual_size)
        while total < want:
            b = g.read(min(4 * MiB, want - total))
            if not b:
                break
            total += len(b)
    return total


def stages(img, read_limit: int | None):
    """(name, callable) for every part of the model a user can touch."""
    yield "extents()", lambda: img.extents()
    yield "extents(merge=False)", lambda: img.extents(merge=False)
    yield "regions()", lambda: img.regions()
    yield "fields", lambda: img.fields
    for name in list(img.tables):
        yield f"tables[{name!r}]", lambda name=name: img.tables[name]
    yield "info()", lambda: img.info()
    yield "info(backing_chain=True)", lambda: img.info(backing_chain=True)
    yield "read guest", lambda: _read_guest(img, read_limit)
    for snap in list(getattr(img, "snapshots", []) or [])[:8]:
        sid = snap.get("id_str") if isinstance(snap, dict) else None

        def use_snapshot(sid=sid):
            s = img.snapshot(sid)
            s.extents()
            _read_guest(s, MiB)
        yield f"snapshot({sid!r})", use_snapshot
    yield "findings", lambda: img.findings


def tb_tail(exc: BaseException, n: int = 6) -> str:
    """The deepest imgscope frame, then the last lines of the traceback."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/imgscope/" in f.filename]
    lines = "".join(traceback.format_exception(exc)).rstrip().splitlines()
    head = [f"  (in imgscope at {frames[-1].filename}:{frames[-1].lineno} {frames[-1].name}: "
            f"{frames[-1].line})"] if frames else []
    return "\n".join(head + lines[-n:])


@dataclass
class Outcome:
    """What happened to one damaged image."""

    open_error: tuple | None = None            # (type, structure, offset, path, message)
    stage_errors: list = field(default_factory=list)   # (stage, type, structure, offset)
    problems: list = field(default_factory=list)       # non-ImageError exceptions etc.
    codes: list = field(default_factory=list)
    findings: list = field(default_factory=list)       # (severity, code, structure, host_offset)
    chain: list = field(default_factory=list)
    seconds: float = 0.0


def examine(path, fmt: str | None = "qcow2", *, read_limit: int | None = MiB, **open_kw) -> Outcome:
    """Open and use everything; ImageErrors are recorded, anything else is a problem."""
    out = Outcome()
    t0 = time.perf_counter()
    try:
        img = imgscope.open(path, fmt, **open_kw)
    except ImageError as exc:
        out.open_error = (type(exc).__name__, exc.structure, exc.offset, exc.path, str(exc))
        out.seconds = time.perf_counter() - t0
        return out
    except _Alarm:
        raise
    except BaseException as exc:  # noqa: BLE001
        out.problems.append(f"open: {type(exc).__name__}: {exc}\n{tb_tail(exc)}")
        out.seconds = time.perf_counter() - t0
        return out
    try:
        for name, fn in stages(img, read_limit):
            try:
                fn()
            except ImageError as exc:
                out.stage_errors.append((name, type(exc).__name__, exc.structure, exc.offset))
            except _Alarm:
                raise
            except BaseException as exc:  # noqa: BLE001
                out.problems.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}\n{tb_tail(exc)}")
        try:
            f = img.findings
            out.codes = list(f["code"])
            out.findings = [(str(s), c, st_, None if pd_isna(h) else int(h))
                            for s, c, st_, h in zip(f["severity"], f["code"], f["structure"],
                                                    f["host_offset"])]
        except Exception as exc:  # noqa: BLE001
            out.problems.append(f"findings: {type(exc).__name__}: {exc}\n{tb_tail(exc)}")
        out.chain = [str(layer.path) for layer in img.chain]
    finally:
        with contextlib.suppress(Exception):
            img.close()
    out.seconds = time.perf_counter() - t0
    return out


def pd_isna(v) -> bool:
    import pandas as pd
    return v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))


def measure(path, fmt="qcow2", *, read_limit=MiB, **open_kw):
    """In a child: one untraced timed pass, then a tracemalloc pass (open, extents, regions, info)."""
    def body():
        with alarm(20):   # far above TIME_LIMIT: a hang shows up as _Alarm
            out = examine(path, fmt, read_limit=read_limit, **open_kw)
        if out.seconds > TIME_LIMIT:
            return out, None
        tracemalloc.start()
        try:
            with alarm(60):
                # exceptions other than ImageError were recorded by the untraced pass
                try:
                    img = imgscope.open(path, fmt, **open_kw)
                    for name, fn in (("extents", img.extents), ("regions", img.regions),
                                     ("info", img.info), ("fields", lambda: img.fields)):
                        try:
                            fn()
                        except Exception:  # noqa: BLE001
                            pass
                except Exception:  # noqa: BLE001
                    pass
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return out, peak
    return run_isolated(body, timeout=150)


def _no_problems(out: Outcome, what: str) -> None:
    assert not out.problems, f"{what}: non-ImageError exceptions:\n" + "\n".join(out.problems)


def check_bounded(path, what: str, fmt="qcow2", *, peak_limit: int = PEAK_LIMIT, **open_kw) -> Outcome:
    """``measure`` the image: the child answers, only ImageErrors are raised, open and use
    take at most TIME_LIMIT and the tracemalloc peak is at most ``peak_limit``."""
    res = measure(path, fmt, **open_kw)
    assert res[0] != "timeout", f"{what}: no answer after {res[1]} s (hang)"
    assert res[0] != "died", f"{what}: child died (status {res[1]})"
    assert res[0] == "ok", f"{what}: {res[1]}: {res[2]}\n{res[3]}"
    out, peak = res[1]
    _no_problems(out, what)
    assert out.seconds <= TIME_LIMIT, f"{what}: open and use took {out.seconds:.1f} s"
    assert peak is not None and peak <= peak_limit, (
        f"{what}: tracemalloc peak {peak / MiB:.0f} MiB while opening / mapping")
    return out


def read_after_damage(path, fmt: str, guest: int, length: int, *, what: str):
    """In a child: open, ``extents()``, then read ``length`` guest bytes at ``guest``.

    Returns ([(finding code, host offset or None)], the ImageError type the read raised
    or None, whether the read returned only zeros).
    """
    def body():
        img = imgscope.open(path, fmt)
        img.extents()
        data, read_error = None, None
        try:
            with img.open_guest() as g:
                g.seek(guest)
                data = g.read(length)
        except ImageError as exc:
            read_error = type(exc).__name__
        f = img.findings
        return ([(c, None if pd_isna(h) else int(h)) for c, h in zip(f.code, f.host_offset)],
                read_error, data is not None and not any(data))
    return isolated_value(body, what=what)


# --------------------------------------------------------------------------- qcow2 byte surgery (independent of imgscope)

_HDR = struct.Struct(">4sIQIIQIIQQIIQ")
_HDR_NAMES = ("magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size",
              "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
              "refcount_table_clusters", "nb_snapshots", "snapshots_offset")


def header(path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(112)
    h = dict(zip(_HDR_NAMES, _HDR.unpack_from(raw, 0)))
    h["header_length"] = struct.unpack_from(">I", raw, 100)[0] if h["version"] >= 3 else 72
    h["cluster_size"] = 1 << h["cluster_bits"]
    return h


def extensions(path) -> list[tuple[int, int, int]]:
    """(offset, type, length) of every header extension, end marker included."""
    h = header(path)
    cs = h["cluster_size"]
    end = h["backing_file_offset"] or cs
    with open(path, "rb") as f:
        area = f.read(end)
    out, off = [], h["header_length"]
    while off + 8 <= len(area):
        etype, elen = struct.unpack_from(">II", area, off)
        out.append((off, etype, elen))
        if etype == 0:
            break
        off += 8 + (elen + 7) // 8 * 8
    return out


def read_u64s(path, offset: int, count: int) -> np.ndarray:
    with open(path, "rb") as f:
        f.seek(offset)
        return np.frombuffer(f.read(8 * count), ">u8").astype(np.uint64)


def poke(path, offset: int, fmt: str, value) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value) if fmt != "raw" else value)


L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00


def first_l2(path) -> tuple[int, int]:
    """(offset of the active L1 entry, L2 table offset) of the first allocated L2 table."""
    h = header(path)
    l1 = read_u64s(path, h["l1_table_offset"], h["l1_size"])
    for i, e in enumerate(l1.tolist()):
        if e & L2_OFFSET_MASK:
            return h["l1_table_offset"] + 8 * i, e & L2_OFFSET_MASK
    raise AssertionError(f"{path}: no L2 table")


def first_data_entry(path) -> tuple[int, int]:
    """(file offset, value) of the first standard L2 entry with a host cluster."""
    h = header(path)
    _, l2 = first_l2(path)
    entries = read_u64s(path, l2, h["cluster_size"] // 8)
    for i, e in enumerate(entries.tolist()):
        if not e >> 62 & 1 and e & L2_OFFSET_MASK:
            return l2 + 8 * i, e
    raise AssertionError(f"{path}: no data cluster in the first L2 table")


def l2_entries_of(path) -> list[tuple[int, int]]:
    """(file offset, value) of every non-zero entry of every active L2 table."""
    h = header(path)
    l1 = read_u64s(path, h["l1_table_offset"], h["l1_size"])
    out = []
    for e in l1.tolist():
        l2 = e & L2_OFFSET_MASK
        if not l2:
            continue
        ent = read_u64s(path, l2, h["cluster_size"] // 8)
        out += [(l2 + 8 * i, v) for i, v in enumerate(ent.tolist()) if v]
    return out


def write_backing_name(path, name: bytes) -> None:
    """Put ``name`` as the backing file name (after the extensions, inside cluster 0)."""
    h = header(path)
    exts = extensions(path)
    end_marker = exts[-1][0] if exts and exts[-1][1] == 0 else h["header_length"]
    if h["backing_file_offset"]:
        off = h["backing_file_offset"]
    else:
        off = end_marker + 8
        with open(path, "r+b") as f:   # make sure an end marker is there
            f.seek(end_marker)
            f.write(bytes(8))
    assert off + len(name) <= h["cluster_size"]
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(name)
        f.seek(8)
        f.write(struct.pack(">QI", off, len(name)))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _warm(qcow2_corpus):
    """Import and exercise everything once so children fork with warm modules.

    tracemalloc in a child then measures the hostile image, not pandas' import.
    """
    for name in ("v3_compat11", "snapshots", "compressed_zlib", "bitmaps", "chain_top"):
        out = examine(qcow2_corpus[name].path, read_limit=MiB)
        assert not out.problems and out.open_error is None, (name, out)
    with contextlib.redirect_stdout(io.StringIO()):
        from imgscope import cli
        cli.main(["map", "--output", "json", str(qcow2_corpus["v3_compat11"].path)])


# =========================================================================== truncation

TRUNCATION_SAMPLES = ["v3_compat11", "v2_compat010", "cluster_512", "cluster_4k", "snapshots",
                      "compressed_zlib", "compressed_zstd", "bitmaps", "extended_l2",
                      "chain_top", "data_file", "refcount_bits_1"]


def cut_points(path) -> list[int]:
    """Lengths that end inside every structure of the image, plus a few in the data."""
    h = header(path)
    cs = h["cluster_size"]
    size = os.path.getsize(path)
    cuts = {0, 1, 3, 4, 7, 8, 12, 16, 20, 24, 32, 36, 40, 48, 56, 60, 64, 71, 72, 73, 96, 100,
            103, 104, 105, 111, 112}
    cuts |= {h["header_length"] - 1, h["header_length"], h["header_length"] + 4}
    for off, _etype, elen in extensions(path):                    # extension area
        cuts |= {off + 2, off + 4, off + 7, off + 8, off + 8 + elen // 2, off + 8 + elen - 1}
    if h["backing_file_offset"]:                                   # backing file name
        bo, bs = h["backing_file_offset"], h["backing_file_size"]
        cuts |= {bo, bo + 1, bo + bs // 2, bo + bs - 1}
    cuts |= {cs - 1, cs, cs + 1}
    rt = h["refcount_table_offset"]                                # refcount table + block 0
    cuts |= {rt, rt + 4, rt + 8, rt + 12, rt + cs - 1}
    reft = read_u64s(path, rt, 2)
    if reft[0]:
        rb = int(reft[0]) & ~0x1FF
        cuts |= {rb, rb + 1, rb + cs // 2, rb + cs - 1}
    l1 = h["l1_table_offset"]                                      # L1 table
    cuts |= {l1, l1 + 4, l1 + 8, l1 + 8 * h["l1_size"] // 2, l1 + 8 * h["l1_size"] - 1}
    entries = l2_entries_of(path)
    l1_ent = read_u64s(path, l1, h["l1_size"])
    for l2 in sorted({int(e) & L2_OFFSET_MASK for e in l1_ent.tolist()} - {0})[:3]:  # L2 tables
        cuts |= {l2, l2 + 8, l2 + cs // 2, l2 + cs - 1}
    data = sorted({v & L2_OFFSET_MASK for _, v in entries if not v >> 62 & 1} - {0})
    comp = sorted({v & ((1 << (62 - (h["cluster_bits"] - 8))) - 1) for _, v in entries if v >> 62 & 1})
    for d in data[:2] + data[len(data) // 2:len(data) // 2 + 1] + data[-1:]:   # data clusters
        cuts |= {d, d + cs // 2}
    for c in comp[:2] + comp[-1:]:                                  # compressed streams
        cuts |= {c, c + 10}
    if h["nb_snapshots"]:                                           # snapshot table
        so = h["snapshots_offset"]
        cuts |= {so, so + 8, so + 20, so + 39, so + 40, so + 60, so + 100, so + 200}
    cuts |= {size // 2, size - cs - 1, size - cs, size - cs // 2, size - 1}
    return sorted(c for c in cuts if 0 <= c < size)


def _expected_image_end(sample) -> int:
    """qemu-img check's image-end-offset: one past the last referenced cluster."""
    rc, data = sample.check()
    assert data and "image-end-offset" in data, (sample.name, rc, data)
    return int(data["image-end-offset"])


@pytest.mark.parametrize("name", TRUNCATION_SAMPLES)
def test_truncated_copies_fail_cleanly_or_report_findings(qcow2_corpus, tmp_path, name):
    """Cut at every structure: one located ImageError, or an opened model with findings.

    An opened model must let every part be used (or raise ImageError), and when the cut
    removes a whole cluster that qemu-img check counts as in use (cut + cluster_size <=
    image-end-offset) the damage must show up in ``findings``.
    """
    sample = qcow2_corpus[name]
    work = oracle.copy_sample(sample, tmp_path / "work")
    image_end = _expected_image_end(sample)
    cs = sample.cluster_size or header(sample.path)["cluster_size"]
    cuts = cut_points(sample.path)
    assert len(cuts) >= 40, cuts
    full = sample.path.read_bytes()

    def body():
        results = []
        for cut in cuts:
            work.path.write_bytes(full[:cut])
            try:
                with alarm(20):
                    out = examine(work.path, "qcow2", read_limit=None)
            except _Alarm as exc:
                out = Outcome(problems=[f"timeout: {exc}"])
            results.append((cut, out))
        return results

    results = isolated_value(body, timeout=600, what=f"{name} truncations")
    bad = []
    for cut, out in results:
        where = f"{name} cut at {cut} ({cut:#x})"
        for p in out.problems:
            bad.append(f"{where}: {p}")
        if out.seconds > TIME_LIMIT:
            bad.append(f"{where}: took {out.seconds:.1f} s")
        if out.open_error:
            etype, structure, offset, epath, msg = out.open_error
            if not structure or not epath:
                bad.append(f"{where}: {etype} without structure/path: {msg}")
            if etype in ("Truncated", "ParseError") and offset is None:
                bad.append(f"{where}: {etype} without offset: {msg}")
            continue
        if cut < 72:
            bad.append(f"{where}: opened although the file is shorter than a qcow2 header")
        if cut + cs <= image_end and not out.codes:
            bad.append(f"{where}: opened with no findings although a cluster in use "
                       f"(image end {image_end:#x}) is missing; stage errors: {out.stage_errors}")
    assert not bad, f"{len(bad)} problems:\n" + "\n".join(bad)


def test_truncated_backing_name_is_not_followed(qcow2_corpus, tmp_path):
    """A backing name cut short by EOF must not be used as a (different) file name.

    chain_top names 'chain_mid.qcow2' (15 bytes at offset 528); cut after 5 bytes the
    file holds 'chain'.  A decoy image called 'chain' sits next to it: following the
    shortened name would silently read another disk.
    """
    work = oracle.copy_sample(qcow2_corpus["chain_top"], tmp_path)
    h = header(work.path)
    bo, bs = h["backing_file_offset"], h["backing_file_size"]
    assert work.path.read_bytes()[bo:bo + bs] == b"chain_mid.qcow2"
    data = work.path.read_bytes()
    work.path.write_bytes(data[:bo + 5])
    shutil.copy(qcow2_corpus["v3_compat11"].path, tmp_path / "chain")

    out = isolated_value(lambda: examine(work.path, "qcow2"), what="truncated backing name")
    assert not out.problems, out.problems
    if out.open_error is None:
        assert not any(Path(p).name == "chain" for p in out.chain), (
            f"the truncated backing name {data[bo:bo + 5]!r} was followed to the decoy: "
            f"chain={out.chain} findings={out.codes}")


# =========================================================================== header/table pokes


@dataclass
class Expect:
    """Accepted outcomes of one poke.

    raises: the ImageError subclass the open may raise (its structure must contain
    ``structure`` and its offset equal ``offset`` when given);
    codes: finding codes that must all be present when the image opens (an opened
    image must have at least one finding in any case);
    finding_at: host offsets one of which an error/critical finding must name (used
    where no finding is produced today, so there is no code name to pin yet);
    may_open: False when the open itself must fail.
    """

    raises: type | None = None
    structure: str | None = None
    offset: int | None = None
    codes: frozenset = frozenset()
    finding_at: frozenset = frozenset()
    may_open: bool = True


@dataclass
class Poke:
    id: str
    sample: str
    edit: Callable  # (path) -> Expect


def _p_header(offset, fmt, value, expect: Expect):
    def edit(path):
        poke(path, offset, fmt, value)
        return expect
    return edit


def _p_nb_snapshots_zero_table(path):
    """nb_snapshots = 2^32-1 and a snapshot table offset at a zero-filled (sparse) tail."""
    size = os.path.getsize(path)
    off = (size + 0xFFFF) // 0x10000 * 0x10000
    with open(path, "r+b") as f:
        f.seek(60)
        f.write(struct.pack(">IQ", 0xFFFFFFFF, off))
        f.truncate(off + 4 * MiB)
    return Expect(codes=frozenset({"too_many_snapshots"}))


def _p_l1_entry(value_fn, codes=frozenset()):
    def edit(path):
        l1e, l2 = first_l2(path)
        old = int(read_u64s(path, l1e, 1)[0])
        poke(path, l1e, ">Q", value_fn(old, l2))
        return Expect(codes=frozenset(codes))
    return edit


def _p_l2_entry(value_fn, target_fn=None):
    """Change the first data L2 entry; a finding must name the entry (or its target)."""
    def edit(path):
        off, old = first_data_entry(path)
        new = value_fn(old)
        poke(path, off, ">Q", new)
        at = {off}
        if target_fn:
            at.add(target_fn(new))
        return Expect(finding_at=frozenset(at))
    return edit


def _p_extension_crossing(path):
    exts = extensions(path)
    off, etype, elen = exts[0]
    assert etype != 0
    poke(path, off + 4, ">I", 0x10000)       # 64 KiB of data from offset 0x70: crosses cluster 0
    return Expect(codes=frozenset({"extension_too_large"}))


def _p_backing_size(path):
    poke(path, 16, ">I", 5000)
    # QEMU: "Backing file name too long"; imgscope may refuse or note it
    return Expect(raises=ImageError, structure="backing", codes=frozenset({"backing_name_invalid"}))


def _p_reftable_entry_eof(path):
    h = header(path)
    poke(path, h["refcount_table_offset"], ">Q", 0x7FFF0000)
    return Expect(codes=frozenset({"refblock_invalid"}))


POKES = [
    Poke("l1_size_7fffffff", "v3_compat11",
         _p_header(36, ">I", 0x7FFFFFFF, Expect(codes=frozenset({"l1_table_too_large", "table_too_large"})))),
    Poke("l1_size_ffffffff", "v3_compat11",
         _p_header(36, ">I", 0xFFFFFFFF, Expect(codes=frozenset({"l1_table_too_large", "table_too_large"})))),
    Poke("refcount_table_clusters_7fffffff", "v3_compat11",
         _p_header(56, ">I", 0x7FFFFFFF, Expect(codes=frozenset({"refcount_table_too_large", "table_too_large"})))),
    Poke("refcount_table_clusters_ffffffff", "v3_compat11",
         _p_header(56, ">I", 0xFFFFFFFF, Expect(codes=frozenset({"refcount_table_too_large", "table_too_large"})))),
    Poke("nb_snapshots_ffffffff", "snapshots",
         _p_header(60, ">I", 0xFFFFFFFF, Expect(codes=frozenset({"too_many_snapshots"})))),
    Poke("nb_snapshots_ffffffff_zero_table", "v3_compat11", _p_nb_snapshots_zero_table),
    Poke("snapshots_offset_past_eof", "snapshots",
         _p_header(64, ">Q", 0x10000000, Expect(codes=frozenset({"snapshot_table_invalid"})))),
    Poke("snapshots_offset_misaligned", "snapshots",
         _p_header(64, ">Q", 0x260008, Expect(codes=frozenset({"snapshot_table_invalid"})))),
    Poke("l1_offset_misaligned", "v3_compat11",
         _p_header(40, ">Q", 0x30008, Expect(codes=frozenset({"table_misaligned"})))),
    Poke("l1_offset_past_eof", "v3_compat11",
         _p_header(40, ">Q", 0x7FFF0000, Expect(codes=frozenset({"table_beyond_eof"})))),
    Poke("refcount_table_offset_at_2p64_end", "v3_compat11",   # offset + one cluster == 2^64
         _p_header(48, ">Q", 0xFFFFFFFFFFFF0000, Expect(codes=frozenset({"table_beyond_eof"})))),
    Poke("l1_entry_past_eof", "v3_compat11",
         _p_l1_entry(lambda old, l2: (1 << 63) | 0x40000000, {"l2_table_beyond_eof"})),
    Poke("l1_entry_misaligned", "v3_compat11",
         _p_l1_entry(lambda old, l2: (1 << 63) | (l2 + 0x200), {"l2_table_misaligned"})),
    Poke("l1_entry_reserved_bits", "v3_compat11",
         _p_l1_entry(lambda old, l2: old | 0x0100000000000000, {"l1_reserved_bits"})),
    Poke("l2_entry_reserved_bits_high", "v3_compat11",
         _p_l2_entry(lambda old: old | 0x0200000000000000)),
    Poke("l2_entry_reserved_bits_low", "v3_compat11",
         _p_l2_entry(lambda old: old | 0x2)),
    Poke("l2_entry_past_eof", "v3_compat11",
         _p_l2_entry(lambda old: (1 << 63) | 0x40000000, lambda new: new & L2_OFFSET_MASK)),
    Poke("l2_entry_misaligned", "v3_compat11",
         _p_l2_entry(lambda old: old + 0x200, lambda new: new & L2_OFFSET_MASK)),
    Poke("cluster_bits_30", "v3_compat11",
         _p_header(20, ">I", 30, Expect(raises=ParseError, structure="header.cluster_bits", offset=20,
                                        may_open=False))),
    Poke("version_4", "v3_compat11",
         _p_header(4, ">I", 4, Expect(raises=Unsupported, structure="header.version", offset=4,
                                      may_open=False))),
    Poke("incompatible_unknown_bit5", "v3_compat11",
         _p_header(72, ">Q", 1 << 5, Expect(codes=frozenset({"incompatible_feature_unknown"})))),
    Poke("header_length_ffffffff", "v3_compat11",
         _p_header(100, ">I", 0xFFFFFFFF, Expect(codes=frozenset({"header_length_invalid"})))),
    Poke("extension_length_crosses_cluster", "v3_compat11", _p_extension_crossing),
    Poke("backing_file_size_5000", "chain_top", _p_backing_size),
    Poke("refcount_order_ffffffff", "v3_compat11",
         _p_header(96, ">I", 0xFFFFFFFF, Expect(codes=frozenset({"refcount_order_invalid"})))),
    Poke("refcount_table_entry_past_eof", "v3_compat11", _p_reftable_entry_eof),
    Poke("crypt_method_9", "v3_compat11",
         _p_header(32, ">I", 9, Expect(codes=frozenset({"crypt_method_unknown"})))),
    # QEMU refuses such sizes ("Image is too big"); imgscope must not size arrays by them
    Poke("virtual_size_2p56_small_l1", "v3_compat11",
         _p_header(24, ">Q", 1 << 56, Expect(codes=frozenset({"l1_table_too_small"})))),
    Poke("virtual_size_2p63_minus_512", "v3_compat11",
         _p_header(24, ">Q", (1 << 63) - 512, Expect(codes=frozenset({"l1_table_too_small"})))),
]


@pytest.mark.parametrize("p", POKES, ids=[p.id for p in POKES])
def test_header_and_table_pokes(qcow2_corpus, tmp_path, p):
    """One poke, one recorded outcome; bounded memory (tracemalloc) and time."""
    work = oracle.copy_sample(qcow2_corpus[p.sample], tmp_path)
    expect = p.edit(work.path)
    out = check_bounded(work.path, p.id)
    if out.open_error:
        etype, structure, offset, _path, msg = out.open_error
        assert expect.raises is not None, f"{p.id}: unexpected {etype}: {msg}"
        assert issubclass(getattr(imgscope.errors, etype), expect.raises), (p.id, etype, msg)
        if expect.structure:
            assert structure and expect.structure in structure, (p.id, structure, msg)
        if expect.offset is not None:
            assert offset == expect.offset, (p.id, offset, msg)
        return
    assert expect.may_open, f"{p.id}: opened, expected {expect.raises.__name__}"
    assert out.codes, f"{p.id}: opened without any finding"
    missing = expect.codes - set(out.codes)
    assert not missing, f"{p.id}: finding codes {sorted(missing)} missing; got {sorted(set(out.codes))}"
    if expect.finding_at:
        hits = [f for f in out.findings if f[0] in ("error", "critical") and f[3] in expect.finding_at]
        assert hits, (f"{p.id}: no error finding at {sorted(hex(o) for o in expect.finding_at)}; "
                      f"findings: {out.findings}")


def test_findings_are_not_duplicated(qcow2_corpus, tmp_path):
    """One damaged entry, one finding: looking at more views must not repeat it.

    Otherwise the findings frame depends on which tables the examiner happened to open.
    """
    work = oracle.copy_sample(qcow2_corpus["v3_compat11"], tmp_path)
    l1e, _ = first_l2(work.path)
    poke(work.path, l1e, ">Q", (1 << 63) | 0x40000000)                    # L2 table past EOF
    poke(work.path, header(work.path)["refcount_table_offset"], ">Q", 0x7FFF0000)  # refblock past EOF

    def body():
        img = imgscope.open(work.path, "qcow2")
        img.extents()
        first = img.findings[["code", "structure", "index", "host_offset"]].astype(str)
        for _name, fn in stages(img, MiB):
            try:
                fn()
            except ImageError:
                pass
        img.extents()
        img.regions()
        again = img.findings[["code", "structure", "index", "host_offset"]].astype(str)
        return ([tuple(r) for r in first.itertuples(index=False)],
                [tuple(r) for r in again.itertuples(index=False)])
    first, again = isolated_value(body, what="findings duplication")
    assert {r[0] for r in again} >= {"l2_table_beyond_eof", "refblock_invalid"}, again
    dups = sorted({r for r in again if again.count(r) > 1})
    assert not dups, f"findings repeated: {dups}"
    assert set(first) <= set(again)


def test_l2_entry_past_eof_is_not_read_as_silent_zeros(qcow2_corpus, tmp_path):
    """A data cluster whose host offset lies past EOF: a finding, or an error on read.

    Zero bytes returned for it with nothing reported would let an examiner believe
    the guest held zeros there.
    """
    work = oracle.copy_sample(qcow2_corpus["v3_compat11"], tmp_path)
    off, old = first_data_entry(work.path)
    l2_index = (off - first_l2(work.path)[1]) // 8
    guest = l2_index * 65536
    poke(work.path, off, ">Q", (1 << 63) | 0x40000000)
    findings, read_error, zeros = read_after_damage(work.path, "qcow2", guest, 65536, what="l2 entry past eof")
    assert findings or read_error, (
        f"guest cluster at {guest:#x} maps to host 0x40000000 past EOF; read returned "
        f"{'zeros' if zeros else 'data'} and no finding was recorded")


def test_tiny_limits_give_findings_or_limit_errors(qcow2_corpus):
    """imgscope.Limits caps table sizes: tiny caps never cause other exception types."""
    lim = imgscope.Limits(max_table_bytes=1024, max_metadata_bytes=64 * KiB, max_extents=16,
                          max_chain_depth=1, max_snapshots=1, max_header_bytes=4096)

    def body():
        outs = {}
        for name in ("cluster_512", "cluster_4k", "snapshots", "chain_top", "bitmaps"):
            outs[name] = examine(qcow2_corpus[name].path, "qcow2", limits=lim)
        return outs
    outs = isolated_value(body, what="tiny limits")
    bad = [f"{n}: {p}" for n, o in outs.items() for p in o.problems]
    assert not bad, "\n".join(bad)
    # cluster_512 has an 8 KiB L1 table: over the 1 KiB cap
    o = outs["cluster_512"]
    assert o.open_error or "table_too_large" in o.codes or any(
        e[1] == "LimitExceeded" for e in o.stage_errors), o
    # chain_top is 3 deep: over max_chain_depth=1
    assert outs["chain_top"].open_error and outs["chain_top"].open_error[0] == "ChainError", outs["chain_top"]


# =========================================================================== hypothesis


@pytest.fixture(scope="module")
def fuzz_image(tmp_path_factory):
    """A small real qcow2 rich in metadata: 4 KiB clusters, data, zero, compressed
    clusters, an internal snapshot, later writes and a persistent bitmap."""
    oracle.require_tools()
    d = tmp_path_factory.mktemp("fuzz")
    p = d / "small.qcow2"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p.name, "4M",
               cwd=d)
    oracle.qemu_io(p, "write -P 0x11 0 8k", "write -z 64k 4k", "write -c -P 0x22 128k 4k",
                   "write -P 0x33 2M 4k", fmt="qcow2")
    oracle.run(oracle.QEMU_IMG, "snapshot", "-c", "s1", p.name, cwd=d)
    oracle.qemu_io(p, "write -P 0x44 4k 4k", "write -P 0x55 3M 4k", fmt="qcow2")
    oracle.run(oracle.QEMU_IMG, "bitmap", "--add", p.name, "bm0", cwd=d)
    oracle.qemu_io(p, "write -P 0x66 1M 4k", fmt="qcow2")
    rc, _ = oracle.qemu_check(p)
    assert rc == 0
    return p


def _hot_ranges(path) -> list[tuple[int, int]]:
    """(offset, length) of metadata: header+extensions, refcount table/block, L1, L2,
    snapshot table and snapshot L1 tables."""
    h = header(path)
    cs = h["cluster_size"]
    ranges = [(0, 112), (0, 512), (0, cs), (h["refcount_table_offset"], cs)]
    rb = int(read_u64s(path, h["refcount_table_offset"], 1)[0]) & ~0x1FF
    if rb:
        ranges.append((rb, 64))
    ranges.append((h["l1_table_offset"], 8 * h["l1_size"]))
    for e in read_u64s(path, h["l1_table_offset"], h["l1_size"]).tolist():
        if e & L2_OFFSET_MASK:
            ranges.append((e & L2_OFFSET_MASK, cs))
            ranges.append((e & L2_OFFSET_MASK, 64))
    if h["nb_snapshots"]:
        so = h["snapshots_offset"]
        ranges.append((so, 128))
        snap_l1 = struct.unpack(">QI", open(path, "rb").read()[so:so + 12])
        ranges.append((snap_l1[0], 8 * snap_l1[1]))
    return ranges


def mutations(ranges, hows, interesting):
    """Strategy: one mutation ((start, length), pos, how, value) landing in one of
    ``ranges`` (see ``mutate``)."""
    return st.tuples(
        st.sampled_from(ranges), st.integers(0, 1 << 16), st.sampled_from(hows),
        st.one_of(st.integers(0, (1 << 64) - 1), st.sampled_from(interesting)))


def mutate(data: bytearray, m, byteorder: str) -> None:
    """Apply one mutation of ``mutations``: set a byte, flip a bit, put a decimal
    digit, or write a u32/u64 (``byteorder``) at a position aligned to its size."""
    (start, length), pos, how, value = m
    if how == "byte":
        data[start + pos % length] = value & 0xFF
    elif how == "bitflip":
        data[start + pos % length] ^= 1 << (value % 8)
    elif how == "digit":       # a plausible text edit: another decimal digit
        data[start + pos % length] = ord("0") + value % 10
    else:
        n = 4 if how == "u32" else 8
        o = start + (pos % max(1, length // n)) * n
        data[o:o + n] = (value & ((1 << (8 * n)) - 1)).to_bytes(n, byteorder)


def assert_fuzz_passes(check: Callable[[], None], timeout: float) -> None:
    """Run a hypothesis test in a forked child (address-space cap): it must pass in time."""
    res = run_isolated(check, timeout=timeout)
    assert res[0] != "timeout", f"hypothesis run did not finish in {timeout} s"
    assert res[0] != "died", f"hypothesis child died: {res}"
    assert res[0] == "ok", f"{res[1]}: {res[2]}\n{res[3]}"


INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF,
               1 << 62, 1 << 63, 0x200, 0x10000, 0x40000000]


def test_random_metadata_mutations_raise_only_image_errors(fuzz_image, tmp_path):
    """Random bytes/words in the header, extensions, refcount, L1/L2 and snapshot areas.

    open + extents + regions + fields + tables + info + reading the first MiB may only
    raise ImageError subclasses, each within 10 s (hypothesis runs in a forked child
    with an address-space cap, so a huge allocation shows up as MemoryError).
    """
    original = fuzz_image.read_bytes()
    ranges = _hot_ranges(fuzz_image)
    target = tmp_path / "mutant.qcow2"
    mutation = mutations(ranges, ["byte", "bitflip", "u32", "u64"], INTERESTING)
    apply = partial(mutate, byteorder="big")

    # With derandomize=True hypothesis seeds from the source of check, decorators
    # included: any edit of these lines changes the examples that are run.
    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(st.lists(mutation, min_size=1, max_size=6))
    def check(muts):
        data = bytearray(original)
        for m in muts:
            apply(data, m)
        target.write_bytes(bytes(data))
        try:
            with alarm(10):
                out = examine(target, "qcow2", read_limit=MiB)
        except _Alarm as exc:
            raise AssertionError(f"hang: {exc}") from None
        assert not out.problems, "\n".join(out.problems)

    assert_fuzz_passes(check, timeout=300)


# =========================================================================== confinement


def _img(cwd: Path, name: str, *args: str, size: str | None = "1M") -> Path:
    cmd = [oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", *args, name]
    if size:
        cmd.append(size)
    oracle.run(*cmd, cwd=cwd)
    return cwd / name


def make_folders(tmp_path) -> tuple[Path, Path, Path]:
    """tmp/case/inner (the image's folder), tmp/case (its parent), tmp/elsewhere."""
    inner = tmp_path / "case" / "inner"
    inner.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return inner, tmp_path / "case", elsewhere


@pytest.fixture
def folders(tmp_path):
    """``make_folders``, with tmp/case/outside.qcow2 (0x5a in its first 64 KiB) and
    tmp/elsewhere/abs.qcow2."""
    oracle.require_tools()
    inner, parent, elsewhere = make_folders(tmp_path)
    _img(parent, "outside.qcow2")
    _img(elsewhere, "abs.qcow2")
    oracle.qemu_io(parent / "outside.qcow2", "write -P 0x5a 0 64k")
    return inner, parent, elsewhere


def _open_err(path, **kw):
    try:
        img = imgscope.open(path, **kw)
    except ImageError as exc:
        return exc
    img.close()
    return None


def test_backing_dotdot_is_refused_unless_allowed(folders):
    inner, parent, _ = folders
    top = _img(inner, "top.qcow2", "-u", "-b", "../outside.qcow2", "-F", "qcow2")
    err = _open_err(top)
    assert isinstance(err, UnsafePath), err
    assert err.structure and "backing" in err.structure
    assert "../outside.qcow2" in str(err)
    with imgscope.open(top, allow_paths=[parent]) as img:
        assert [p.path.resolve() for p in img.chain] == [top.resolve(), (parent / "outside.qcow2").resolve()]
        with img.open_guest() as g:
            assert g.read(4) == b"\x5a" * 4


def test_backing_absolute_path_outside_is_refused_unless_allowed(folders):
    inner, _, elsewhere = folders
    top = _img(inner, "top.qcow2", "-u", "-b", str(elsewhere / "abs.qcow2"), "-F", "qcow2")
    assert isinstance(_open_err(top), UnsafePath)
    # allowing an unrelated folder does not help; allowing its folder does
    assert isinstance(_open_err(top, allow_paths=[inner.parent]), UnsafePath)
    with imgscope.open(top, allow_paths=[elsewhere]) as img:
        assert len(img.chain) == 2


def test_allow_paths_is_not_a_string_prefix(folders, tmp_path):
    """allow_paths=[tmp/out] must not admit tmp/outside/... (prefix of the name)."""
    inner, _, _ = folders
    (tmp_path / "out").mkdir()
    (tmp_path / "outside").mkdir()
    _img(tmp_path / "outside", "x.qcow2")
    top = _img(inner, "top.qcow2", "-u", "-b", str(tmp_path / "outside" / "x.qcow2"), "-F", "qcow2")
    assert isinstance(_open_err(top, allow_paths=[tmp_path / "out"]), UnsafePath)


def test_backing_symlink_leaving_the_folder_is_refused(folders):
    inner, parent, _ = folders
    os.symlink("../outside.qcow2", inner / "link.qcow2")
    top = _img(inner, "top.qcow2", "-u", "-b", "link.qcow2", "-F", "qcow2")
    assert isinstance(_open_err(top), UnsafePath)


@pytest.mark.parametrize("name", [
    'json:{"file":{"driver":"file","filename":"/etc/passwd"}}',
    "nbd://127.0.0.1:10809/export",
    "nbd:127.0.0.1:10809",
    "http://127.0.0.1/x.qcow2",
    "file:../outside.qcow2",
])
def test_protocol_backing_names_are_refused(folders, name):
    inner, parent, _ = folders
    top = _img(inner, "top.qcow2", "-u", "-b", name, "-F", "raw")
    for kw in ({}, {"allow_paths": [parent, "/"]}):
        err = _open_err(top, **kw)
        assert isinstance(err, UnsafePath), (name, kw, err)


def test_backing_loop_raises_chain_error(folders):
    inner, _, _ = folders
    b = _img(inner, "b.qcow2")
    a = _img(inner, "a.qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2")
    oracle.run(oracle.QEMU_IMG, "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", cwd=inner)
    for p in (a, b):
        res = run_isolated(lambda p=p: type(_open_err(p)).__name__, timeout=30)
        assert res == ("ok", "ChainError"), (p.name, res)
    # a self-loop written by hand, and a loop through a symlinked name
    c = _img(inner, "c.qcow2")
    write_backing_name(c, b"c.qcow2")
    assert isinstance(_open_err(c), ChainError)
    os.symlink("d.qcow2", inner / "d-link.qcow2")
    d = _img(inner, "d.qcow2")
    write_backing_name(d, b"d-link.qcow2")
    assert isinstance(_open_err(d), ChainError)


def test_missing_backing_file_raises_chain_error_naming_it(folders):
    inner, _, _ = folders
    top = _img(inner, "top.qcow2", "-u", "-b", "no-such-base.qcow2", "-F", "qcow2")
    err = _open_err(top)
    assert isinstance(err, ChainError), err
    assert "no-such-base.qcow2" in str(err)
    assert err.path and Path(err.path).name == "top.qcow2"


def test_backing_fifo_does_not_hang(folders):
    """A FIFO named as backing file (inside the folder) must not block the open."""
    inner, _, _ = folders
    os.mkfifo(inner / "base.qcow2")
    top = _img(inner, "top.qcow2", "-u", "-b", "base.qcow2", "-F", "qcow2")
    res = run_isolated(lambda: repr(_open_err(top)), timeout=10)
    assert res[0] == "ok", f"opening an image whose backing file is a FIFO: {res}"
    assert "Error" in res[1], res


def test_data_file_outside_is_refused_unless_allowed(folders):
    inner, parent, elsewhere = folders
    rel = _img(inner, "rel.qcow2", "-o", "data_file=../rel.data")          # qemu: relative to cwd
    assert (parent / "rel.data").exists()
    ab = _img(inner, "abs.qcow2", "-o", f"data_file={elsewhere / 'abs.data'}")
    for img_path, allow in ((rel, parent), (ab, elsewhere)):
        oracle.qemu_io(img_path, "write -P 0x77 0 64k", cwd=inner)
        err = _open_err(img_path)
        assert isinstance(err, UnsafePath), (img_path.name, err)
        assert err.structure and "data file" in err.structure
        with imgscope.open(img_path, allow_paths=[allow]) as img:
            with img.open_guest() as g:
                assert g.read(4) == b"\x77" * 4


def _rewrite_data_file_name(path, new: bytes) -> None:
    for off, etype, elen in extensions(path):
        if etype == 0x44415441:
            assert len(new) == elen, (len(new), elen)
            poke(path, off + 8, "raw", new)
            return
    raise AssertionError("no data file extension")


@pytest.mark.parametrize("kind", ["json", "nbd"])
def test_protocol_data_file_names_are_refused(folders, kind):
    inner, parent, _ = folders
    placeholder = "x" * 64
    p = _img(inner, "df.qcow2", "-o", f"data_file={placeholder}")
    if kind == "json":
        name = 'json:{"file":{"driver":"file","filename":"/etc/passwd"}}'
    else:
        name = "nbd://127.0.0.1:10809/"
    _rewrite_data_file_name(p, name.ljust(64, " " if kind == "json" else "x").encode())
    for kw in ({}, {"allow_paths": [parent, "/"]}):
        assert isinstance(_open_err(p, **kw), UnsafePath), kind


def test_missing_data_file_reports_and_never_crashes(qcow2_corpus, tmp_path):
    """data_file.qcow2 copied without data_file.data: a finding or an ImageError, and
    every part of the model raises only ImageError."""
    shutil.copy(qcow2_corpus["data_file"].path, tmp_path / "data_file.qcow2")
    out = isolated_value(lambda: examine(tmp_path / "data_file.qcow2", read_limit=MiB),
                         what="missing data file")
    assert not out.problems, "\n".join(out.problems)
    assert out.open_error or out.codes, out


# =========================================================================== read-only


def _fingerprint(paths) -> dict:
    return {str(p): (oracle.sha256_file(p), os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths}


def test_corpus_is_never_modified(qcow2_corpus, tmp_path):
    """SHA-256, mtime and size of every corpus file are unchanged after imgscope opened,
    parsed and read everything (guest of every layer and snapshot, every table, every CLI
    verb); no file is added to the corpus folder; every fd imgscope holds is read-only."""
    root = next(iter(qcow2_corpus.values())).path.parent
    files = sorted({f for s in qcow2_corpus.values() for f in s.files})
    before = _fingerprint(files)
    listing = sorted(p.name for p in root.iterdir())
    from imgscope import cli

    bad = []
    for name, s in qcow2_corpus.items():
        try:
            img = imgscope.open(s.path, s.fmt)
        except ImageError as exc:
            bad.append(f"{name}: open: {exc}")
            continue
        with img:
            for fd in os.listdir("/proc/self/fd"):
                try:
                    target = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    continue
                if target in before:
                    with open(f"/proc/self/fdinfo/{fd}") as f:
                        flags = int(next(l for l in f if l.startswith("flags:")).split()[1], 8)
                    if flags & os.O_ACCMODE != os.O_RDONLY:
                        bad.append(f"{name}: fd {fd} on {target} has flags {flags:o}")
            for stage, fn in stages(img, None):
                try:
                    fn()
                except ImageError:
                    pass
                except Exception as exc:  # noqa: BLE001
                    bad.append(f"{name}: {stage}: {type(exc).__name__}: {exc}")
        for verb in (["info", "--backing-chain"], ["info", "--output", "json"], ["map"],
                     ["map", "--output", "json"], ["fields"], ["tables"], ["tables", "l2"],
                     ["regions"]):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    cli.main([*verb, "-f", s.fmt, str(s.path)])
                except SystemExit:
                    pass
                except Exception as exc:  # noqa: BLE001 - reported, the fingerprints still run
                    bad.append(f"{name}: imgscope {' '.join(verb)}: {type(exc).__name__}: {exc}")
    # and the real command line, as a separate process
    for verb in ("info", "map", "fields", "tables", "regions"):
        for name in ("chain_top", "snapshots", "data_file"):
            oracle.run(sys.executable, "-m", "imgscope", verb, qcow2_corpus[name].path, check=False)

    after = _fingerprint(files)
    changed = [f"{p}: {before[p]} -> {after[p]}" for p in before if before[p] != after[p]]
    assert not changed, "corpus files changed:\n" + "\n".join(changed)
    assert sorted(p.name for p in root.iterdir()) == listing, "files appeared in the corpus folder"
    assert not bad, "\n".join(bad)
