"""Test oracle: build real disk images with qemu-img / qemu-io and ask qemu for its answers.

Everything here shells out to the QEMU tools (qemu-img, qemu-io; qemu-nbd only for
``qemu_bitmap_dirty``).  Nothing here imports ``imgscope``: this module is the
independent reference the parser is checked against.  Tests must FAIL, never skip,
when the tools are missing: call ``require_tools()`` (the ``qcow2_corpus`` fixture does).

The tool paths can be overridden with the environment variables ``IMGSCOPE_QEMU_IMG``,
``IMGSCOPE_QEMU_IO`` and ``IMGSCOPE_QEMU_NBD``.

Behaviour observed with qemu-img / qemu-io 7.2 (Debian 1:7.2+dfsg-7+deb12u18)
-------------------------------------------------------------------------------
Treat these as facts about the oracle, checked while writing this module.

``qemu-img map --output=json``
    One JSON list; each entry has ``start``, ``length``, ``depth``, ``present``,
    ``zero``, ``data`` and, only when qemu knows a host offset, ``offset``.  There is
    no ``filename`` key in JSON mode (the human format has a "File" column).
    Adjacent clusters with the same flags and contiguous host offsets are merged.

    * Unallocated cluster, no backing file:
      ``{"present": false, "zero": true, "data": false}`` (no offset).
    * Plain data: ``{"present": true, "zero": false, "data": true, "offset": H}``.
    * ZERO cluster (v3 ``write -z`` on an unallocated cluster, or ``discard`` on v3):
      ``{"present": true, "zero": true, "data": false}`` (no offset).
    * ZERO cluster that keeps its allocation (v3 ``write -z`` without ``-u`` over a
      cluster that already held data; L2 entry = offset | COPIED | bit 0):
      ``{"present": true, "zero": true, "data": false, "offset": H}``.
      ``write -z -u`` over data instead frees the host cluster (no offset).
    * On compat=0.10 (v2) there is no zero flag: ``write -z`` on an unallocated cluster
      and ``discard`` just leave/make the cluster unallocated; ``write -z`` over
      allocated data writes literal zero bytes (the cluster stays ``data``).
    * Compressed cluster: ``{"present": true, "zero": false, "data": true}`` with NO
      ``offset`` key.  ``qemu-img convert -c`` stores incompressible clusters
      uncompressed (those do get an ``offset``), and all-zero input becomes a hole.
    * Encrypted (LUKS) image: data clusters (and zero clusters that keep their
      allocation) are reported without an ``offset`` key, like compressed ones.  map/check/convert on a LUKS image need the secret
      (``--object secret,... --image-opts ...,encrypt.key-secret=...``), otherwise
      they fail with "Parameter 'encrypt.key-secret' is required for cipher";
      ``qemu-img info`` works without it.
    * preallocation=metadata: every cluster is allocated (plain L2 entries with host
      offsets, no zero flag), but the host file is sparse, so qemu reports
      ``{"present": true, "zero": true, "data": true, "offset": H}`` for
      never-written clusters: "zero" there comes from the file-level hole, not from the
      qcow2 metadata.
    * Backing chain: ``depth`` is the chain layer that provides the data (0 = top);
      ``offset`` is in that layer's file.  Unallocated everywhere ->
      ``depth`` = chain length - 1 (the bottom layer), present false.  A raw backing
      file reports everything as present (``"present": true, "zero": true, "data":
      false, "offset": guest_offset`` for its holes).  ``discard`` in an overlay over
      backing data makes a ZERO cluster (depth 0, present, zero) that hides the backing.
    * Extended L2 (subclusters): map is subcluster granular; unallocated/zero
      subclusters of an allocated cluster still carry the cluster's ``offset``
      (``{"present": false, "zero": true, "data": false, "offset": H}``).  A
      subcluster-aligned partial ``write -z`` inside an allocated cluster sets subcluster
      zero bits (``{"present": true, "zero": true, "data": false, "offset": H}`` for just
      that range) instead of writing zero bytes as it does without extended L2.
    * External data file (data_file_raw=off): ``offset`` is the offset in the data
      file, which equals the guest offset (qemu allocates guest offset == host offset
      in the data file).  With data_file_raw=on ``qemu-img create`` preallocates the
      metadata, so every cluster is reported ``present``/``data`` with offset == start.
    * Persistent dirty bitmaps exported through qemu-nbd and read with
      ``x-dirty-bitmap=qemu:dirty-bitmap:NAME``: DIRTY ranges show up as
      ``"data": false`` (present false) and clean ranges as ``"data": true``
      (inverted, as documented for x-dirty-bitmap).

Other surprises
    * ``data_file=NAME`` (relative) is resolved against the CURRENT WORKING DIRECTORY,
      both by ``qemu-img create`` (it creates ``./NAME``) and when the image is opened
      later ("Could not open 'x.data': No such file or directory" from another cwd).
      Backing file names, in contrast, are resolved relative to the overlay image.
      Therefore every helper here runs qemu with ``cwd`` = the image's directory.
    * LUKS key derivation is slow by default (create ~4 s, every open ~2.4 s).  With
      ``encrypt.iter-time=10`` opens are ~20 ms, but create still takes ~1.8 s (QEMU
      benchmarks PBKDF2 for a fixed time regardless of iter-time).
    * qemu-io writes persistent bitmaps: bitmaps added with ``qemu-img bitmap --add``
      are enabled ("auto" flag) and a later ``qemu-io -c write`` sets their bits and
      allocates their bitmap tables on close.  ``--add --disable`` leaves a bitmap whose
      table has only zero entries.  No ``--merge``/``--enable`` step was needed.
    * Dirty lazy-refcount image: ``qemu-io -c 'write ...' -c abort`` dies with SIGABRT
      (returncode -6, core dumps suppressed here), leaving incompatible-feature bit 0
      (dirty) set in the header (bytes 72..79 = 00..01) and refcounts not updated.
      Read-only opens (info/map/convert/check without -r, always with -U here) keep it
      dirty; ``qemu-img check`` (no -r) then returns exit code 2 with
      ``"corruptions": N`` ("ERROR cluster N refcount=0 reference=1", "ERROR OFLAG_COPIED
      ...").  ANY read-write open (qemu-io, qemu-img snapshot/commit/check -r ...)
      silently repairs it and clears the bit, so never open that sample read-write.
    * qemu-io returns exit code 1 if any ``-c`` command failed (errors are printed on
      stdout, e.g. "write failed: Input/output error").  Commands can also be fed on
      stdin (interactive mode, terminated by EOF), which is how long scripts are run.
      ``write -s FILE off len`` fills the buffer from the start of FILE (used here to
      write unique, non-repeating data).  ``-t unsafe`` (no flushes) makes 20 000 small
      allocating writes take ~1 s instead of ~8 s.
    * ``qemu-img check`` exit codes: 0 clean, 1 check failed, 2 corruptions,
      3 leaks, 63 check not supported.  JSON goes to stdout, ERROR lines to stderr.
    * ``qemu-img convert -O qcow2`` from a sparse raw file allocates whole clusters
      (a 29-byte extent costs a full cluster of disk; ``-S`` does not help), and so does
      a small qemu-io write into an unallocated cluster.  512-byte clusters make
      convert/qemu-io ~10x slower than 4 KiB ones.  See ``build_fragmented_qcow2``.
    * ``qemu-img check`` on a raw file returns 63 ("not supported"), no JSON.
    * The snapshot "date-sec" fields follow the host clock; nothing to rely on.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

QEMU_IMG = os.environ.get("IMGSCOPE_QEMU_IMG") or shutil.which("qemu-img") or "/usr/bin/qemu-img"
QEMU_IO = os.environ.get("IMGSCOPE_QEMU_IO") or shutil.which("qemu-io") or "/usr/bin/qemu-io"
QEMU_NBD = os.environ.get("IMGSCOPE_QEMU_NBD") or shutil.which("qemu-nbd") or "/usr/bin/qemu-nbd"

#: id of the ``--object secret`` used for LUKS images
SECRET_ID = "sec0"
#: passphrase of the LUKS sample
LUKS_SECRET = "abc123"

QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4


# --------------------------------------------------------------------------- tools


def require_tools(nbd: bool = False) -> str:
    """Raise RuntimeError unless qemu-img and qemu-io (and qemu-nbd if asked) work.

    Returns the ``qemu-img --version`` first line.
    """
    tools = [("qemu-img", QEMU_IMG), ("qemu-io", QEMU_IO)]
    if nbd:
        tools.append(("qemu-nbd", QEMU_NBD))
    missing = [f"{name} ({path})" for name, path in tools
               if not (os.path.isfile(path) and os.access(path, os.X_OK))]
    if missing:
        raise RuntimeError(
            "the imgscope test oracle needs the QEMU tools, missing: " + ", ".join(missing)
            + ". Install them (Debian/Ubuntu: apt-get install qemu-utils) or point "
            "IMGSCOPE_QEMU_IMG / IMGSCOPE_QEMU_IO / IMGSCOPE_QEMU_NBD at them. "
            "These tests fail rather than skip on purpose."
        )
    try:
        out = subprocess.run([QEMU_IMG, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as exc:
        raise RuntimeError(f"cannot run {QEMU_IMG}: {exc}") from exc
    if out.returncode != 0:
        raise RuntimeError(f"{QEMU_IMG} --version failed: {out.stderr.strip()}")
    return out.stdout.splitlines()[0] if out.stdout else ""


def run(*args, check: bool = True, input: str | None = None, cwd: str | os.PathLike | None = None,
        no_core: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command (text mode, stdout/stderr captured).

    With ``check`` a non-zero exit raises RuntimeError naming the command and stderr.
    ``no_core`` disables core dumps in the child (for ``qemu-io -c abort``).
    """
    cmd = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]
    # no preexec_fn: the corpus is built from several threads, where preexec_fn is unsafe
    full = ["sh", "-c", 'ulimit -c 0; exec "$@"', "sh", *cmd] if no_core else cmd
    try:
        proc = subprocess.run(full, capture_output=True, text=True, input=input, cwd=cwd, timeout=timeout)
    except FileNotFoundError as exc:
        raise RuntimeError(f"cannot run {cmd[0]!r}: {exc}; did you call oracle.require_tools()?") from exc
    if check and proc.returncode != 0:
        stdout = proc.stdout if len(proc.stdout) < 4000 else proc.stdout[:2000] + "\n...\n" + proc.stdout[-2000:]
        raise RuntimeError(
            f"command failed (exit {proc.returncode}): {_show(cmd)}\n"
            f"cwd: {cwd or os.getcwd()}\nstderr: {proc.stderr.strip()}\nstdout: {stdout.strip()}"
        )
    return proc


def _show(cmd: Sequence[str]) -> str:
    s = shlex.join(cmd)
    return s if len(s) < 3000 else s[:1500] + " ... " + s[-1500:]


def image_opts(path: str | os.PathLike, secret: str | None = None, fmt: str | None = None) -> str:
    """``--image-opts`` string for ``path`` (commas escaped), with the LUKS key if given."""
    opts = f"driver={fmt or 'qcow2'},file.filename={os.fspath(path).replace(',', ',,')}"
    if secret is not None:
        opts += f",encrypt.key-secret={SECRET_ID}"
    return opts


def _image_args(path, fmt: str | None, secret: str | None) -> list[str]:
    """How to name an image on a qemu-img/qemu-io command line."""
    path = os.path.abspath(os.fspath(path))
    if secret is None:
        return (["-f", fmt] if fmt else []) + [path]
    return ["--object", f"secret,id={SECRET_ID},data={secret}", "--image-opts", image_opts(path, secret, fmt)]


def _cwd_for(path) -> str:
    # relative data_file names are resolved against the cwd by qemu 7.2 (see docstring)
    return os.path.dirname(os.path.abspath(os.fspath(path)))


def _json(proc: subprocess.CompletedProcess, what: str):
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"{what}: could not parse qemu JSON output: {exc}\n{proc.stdout[:2000]}") from exc


# --------------------------------------------------------------------------- queries


def qemu_info(path, backing_chain: bool = False, fmt: str | None = None, *, secret: str | None = None):
    """``qemu-img info --output=json -U``: a dict, or a list of dicts (top first) with backing_chain."""
    args = [QEMU_IMG, "info", "--output=json", "-U"]
    if backing_chain:
        args.append("--backing-chain")
    proc = run(*args, *_image_args(path, fmt, secret), cwd=_cwd_for(path))
    return _json(proc, "qemu-img info")


def qemu_map(path, fmt: str | None = None, *, secret: str | None = None) -> list[dict]:
    """``qemu-img map --output=json -U`` (see the module docstring for the entry shapes)."""
    proc = run(QEMU_IMG, "map", "--output=json", "-U", *_image_args(path, fmt, secret), cwd=_cwd_for(path))
    return _json(proc, "qemu-img map")


def qemu_check(path, fmt: str | None = None, *, secret: str | None = None,
               repair: str | None = None) -> tuple[int, dict | None]:
    """``qemu-img check --output=json``: (exit code, parsed JSON or None).

    Exit codes: 0 clean, 1 check not completed, 2 corruptions, 3 leaks, 63 unsupported.
    ``repair`` ("leaks" or "all") adds ``-r`` and opens the image read-write.
    """
    args = [QEMU_IMG, "check", "--output=json"]
    args += ["-r", repair] if repair else ["-U"]
    proc = run(*args, *_image_args(path, fmt, secret), check=False, cwd=_cwd_for(path))
    data = None
    text = proc.stdout.strip()
    if text.startswith("{"):
        data = json.loads(text)
    return proc.returncode, data


def qemu_raw(path, dest, snapshot: str | None = None, fmt: str | None = None, *,
             secret: str | None = None) -> Path:
    """Convert the guest view of ``path`` (or of internal snapshot ``snapshot``) to a raw file."""
    dest = Path(dest).absolute()
    args = [QEMU_IMG, "convert", "-U", "-O", "raw"]
    if snapshot is not None:
        args += ["-l", f"snapshot.name={snapshot}"]
    run(*args, *_image_args(path, fmt, secret), dest, cwd=_cwd_for(path))
    return dest


def sha256_file(path, block_size: int = 8 * MiB) -> str:
    """sha256 hex digest of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            buf = f.read(block_size)
            if not buf:
                break
            h.update(buf)
    return h.hexdigest()


def qemu_guest_sha256(path, snapshot: str | None = None, fmt: str | None = None, *,
                      secret: str | None = None, workdir=None) -> str:
    """sha256 of the guest-visible disk content as qemu sees it (converted to a temporary raw file)."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="oracle-raw-") as tmp:
        raw = qemu_raw(path, Path(tmp) / "guest.raw", snapshot=snapshot, fmt=fmt, secret=secret)
        return sha256_file(raw)


def qemu_io(path, *commands: str, fmt: str | None = None, extra: Iterable[str] = (),
            secret: str | None = None, cache: str | None = None, cwd=None,
            check: bool = True, no_core: bool = False) -> subprocess.CompletedProcess:
    """Run ``qemu-io -f FMT -c CMD -c CMD ... path``.

    ``fmt`` defaults to "raw" for *.raw/*.img/*.bin and "qcow2" otherwise.  With
    ``secret`` the image is opened with ``--object secret`` + ``--image-opts``.
    Long scripts (more than 100 commands) are fed on stdin instead of ``-c``.
    ``cache`` is passed as ``-t`` (e.g. "unsafe").  ``cwd`` defaults to the image's
    directory (relative ``write -s FILE`` names are resolved against it).
    """
    if fmt is None:
        fmt = "raw" if Path(path).suffix in (".raw", ".img", ".bin") else "qcow2"
    args = [QEMU_IO, *extra]
    if cache:
        args += ["-t", cache]
    args += _image_args(path, fmt, secret)
    stdin = None
    if len(commands) > 100:
        stdin = "\n".join(commands) + "\n"
    else:
        for c in commands:
            args += ["-c", c]
    return run(*args, check=check, input=stdin, cwd=cwd or _cwd_for(path), no_core=no_core)


def qemu_bitmap_dirty(path, bitmap: str, fmt: str = "qcow2", timeout: float = 30) -> list[tuple[int, int]]:
    """Dirty (offset, length) ranges of persistent bitmap ``bitmap`` as qemu sees them.

    Exports the image read-only with qemu-nbd and reads ``qemu:dirty-bitmap:NAME`` via
    ``qemu-img map`` (x-dirty-bitmap).  Dirty ranges are the ones reported "data": false.
    """
    require_tools(nbd=True)
    with tempfile.TemporaryDirectory(prefix="oracle-nbd-") as tmp:
        sock = os.path.join(tmp, "nbd.sock")
        proc = subprocess.Popen(
            [QEMU_NBD, "-r", "-B", bitmap, "-f", fmt, "-k", sock, "-x", "e", os.path.abspath(path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=_cwd_for(path),
        )
        try:
            deadline = time.monotonic() + timeout
            while not os.path.exists(sock):
                if proc.poll() is not None:
                    raise RuntimeError(f"qemu-nbd exited early: {proc.stderr.read()}")
                if time.monotonic() > deadline:
                    raise RuntimeError("qemu-nbd did not create its socket")
                time.sleep(0.01)
            opts = (f"driver=nbd,server.type=unix,server.path={sock},export=e,"
                    f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}")
            out = run(QEMU_IMG, "map", "--output=json", "--image-opts", opts)
            entries = json.loads(out.stdout)
        finally:
            try:
                proc.wait(timeout=5)  # exits by itself after its single client disconnects
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return [(e["start"], e["length"]) for e in entries if not e["data"]]


# --------------------------------------------------------------------------- header peeks


def qcow2_header(path) -> dict:
    """The few fixed qcow2 header fields the corpus builder checks (not a parser under test)."""
    with open(path, "rb") as f:
        h = f.read(104)
    magic, version = struct.unpack_from(">4sI", h, 0)
    if magic != b"QFI\xfb":
        raise ValueError(f"{path}: not a qcow2 file")
    out = {"version": version, "cluster_bits": struct.unpack_from(">I", h, 20)[0]}
    if version >= 3:
        inc, comp, auto, rorder, hlen = struct.unpack_from(">QQQII", h, 72)
        out.update(incompatible_features=inc, compatible_features=comp,
                   autoclear_features=auto, refcount_order=rorder, header_length=hlen)
    else:
        out.update(incompatible_features=0, compatible_features=0, autoclear_features=0,
                   refcount_order=4, header_length=72)
    return out


def incompatible_features(path) -> int:
    return qcow2_header(path)["incompatible_features"]


# --------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """One image of the corpus.

    ``path`` is the image to open (the top of a chain).  ``create_args`` are the
    arguments (without the ``qemu-img`` binary) that created it.  ``commands`` are the
    qemu-io commands applied to this file afterwards, in order (``write -s _payload/...``
    names are relative to the corpus directory; lines starting with ``#`` are notes on
    non-qemu-io steps such as snapshot creation).  ``backing`` lists backing files
    nearest first; ``extra_files`` lists other files belonging to the image (external
    data file).  ``secret`` is the LUKS passphrase: pass it to the ``qemu_*`` helpers
    (they then use ``--object secret,id=sec0,data=SECRET --image-opts
    driver=qcow2,file.filename=PATH,encrypt.key-secret=sec0``).  ``expect_check`` is the
    ``qemu-img check`` exit code the image should produce.
    """

    name: str
    path: Path
    fmt: str
    create_args: list[str]
    snapshots: list[str] = field(default_factory=list)
    notes: str = ""
    secret: str | None = None
    virtual_size: int = 0
    cluster_size: int | None = None
    commands: list[str] = field(default_factory=list)
    backing: list[Path] = field(default_factory=list)
    extra_files: list[Path] = field(default_factory=list)
    expect_check: int = 0
    tags: set[str] = field(default_factory=set)

    # convenience wrappers, all with this sample's format and secret
    def info(self, backing_chain: bool = False):
        return qemu_info(self.path, backing_chain=backing_chain, fmt=self.fmt, secret=self.secret)

    def map(self) -> list[dict]:
        return qemu_map(self.path, fmt=self.fmt, secret=self.secret)

    def check(self) -> tuple[int, dict | None]:
        return qemu_check(self.path, fmt=self.fmt, secret=self.secret)

    def to_raw(self, dest, snapshot: str | None = None) -> Path:
        return qemu_raw(self.path, dest, snapshot=snapshot, fmt=self.fmt, secret=self.secret)

    def guest_sha256(self, snapshot: str | None = None, workdir=None) -> str:
        return qemu_guest_sha256(self.path, snapshot=snapshot, fmt=self.fmt, secret=self.secret,
                                 workdir=workdir)

    @property
    def files(self) -> list[Path]:
        """Every file the image needs (image, backing chain, data files)."""
        return [self.path, *self.backing, *self.extra_files]


def copy_sample(sample: Sample, dest_dir) -> Sample:
    """Copy a sample and all its files (same names, so relative references keep working).

    Use this before anything that modifies an image: corpus images are shared by the
    whole session.  Files are copied sparsely (``cp --sparse=always``).
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    src_dir = sample.path.parent
    mapping = {}
    for f in sample.files:
        target = dest_dir / f.relative_to(src_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        run("cp", "--sparse=always", f, target)
        mapping[f] = target
    return Sample(
        name=sample.name, path=mapping[sample.path], fmt=sample.fmt, create_args=list(sample.create_args),
        snapshots=list(sample.snapshots), notes=sample.notes, secret=sample.secret,
        virtual_size=sample.virtual_size, cluster_size=sample.cluster_size, commands=list(sample.commands),
        backing=[mapping[b] for b in sample.backing], extra_files=[mapping[x] for x in sample.extra_files],
        expect_check=sample.expect_check, tags=set(sample.tags),
    )


# --------------------------------------------------------------------------- building blocks


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _pattern(tag: str) -> str:
    """A deterministic non-zero byte value (as qemu-io wants it) for a tag."""
    return f"0x{zlib.crc32(tag.encode()) % 254 + 1:02x}"


class _Payload:
    """Writes unique deterministic data files used with ``qemu-io write -s FILE``."""

    def __init__(self, root: Path):
        self.root = root
        self.dir = root / "_payload"
        self.dir.mkdir(parents=True, exist_ok=True)

    def data(self, tag: str, n: int) -> bytes:
        return random.Random(f"{tag}:{n}").randbytes(n)

    def write(self, tag: str, off: int, n: int) -> str:
        name = f"{tag}-{off:x}-{n:x}.bin"
        p = self.dir / name
        if not p.exists():
            p.write_bytes(self.data(f"{tag}@{off}", n))
        return f"write -s _payload/{name} {off} {n}"


def _create(path: Path, size: int | str | None, *, fmt: str = "qcow2", opts: Sequence[str] = (),
            backing: str | None = None, backing_fmt: str | None = None,
            objects: Sequence[str] = ()) -> list[str]:
    """qemu-img create, run in the image's directory; returns the argument list used."""
    args = ["create", "-f", fmt]
    for o in objects:
        args += ["--object", o]
    if backing is not None:
        args += ["-b", backing]
        if backing_fmt:
            args += ["-F", backing_fmt]
    if opts:
        args += ["-o", ",".join(opts)]
    args.append(path.name)
    if size is not None:
        args.append(str(size))
    run(QEMU_IMG, *args, cwd=path.parent)
    return args


def _workload(payload: _Payload, tag: str, cs: int, vsize: int, *, l2_entry: int = 8,
              subclusters: bool = False, tail: bool = True) -> list[str]:
    """qemu-io commands putting known data into an image with cluster size ``cs``.

    Layout (holes of >= 2 clusters between regions):
      R1  unique data at 0, 1.5 clusters (crosses a cluster boundary, partial 2nd cluster)
      R2  constant pattern starting a quarter into a cluster, 2.5 clusters long
      L2X unique data straddling an L2-table boundary (when the disk is big enough)
      LNG unique data crossing >= 2 L2-table boundaries (small clusters only)
      Z1  ``write -z`` of 2 unallocated clusters (v3: ZERO clusters; v2: nothing)
      Z2  3 data clusters, then ``write -z`` of the full middle cluster (v3: zero flag,
          allocation kept) and an unaligned ``write -z`` inside the third one
      D   3 data clusters, ``discard`` of the middle one
      SUB (extended L2) 4 KiB writes and a 4 KiB zero write inside one cluster, and a
          lone 4 KiB zero write into an unallocated cluster
      T   4 KiB of unique data ending exactly at the end of the disk
    """
    l2_span = cs * (cs // l2_entry)
    cmds: list[str] = []
    gap = 2 * cs
    h = max(cs, 4096)

    def nxt(cur: int, extra: int = 0) -> int:
        return _align_up(cur, cs) + gap + extra

    n = cs + cs // 2
    cmds.append(payload.write(tag + "-r1", 0, n))
    cur = n

    off = nxt(cur, cs // 4)
    n = 2 * cs + cs // 2
    cmds.append(f"write -P {_pattern(tag + '-r2')} {off} {n}")
    cur = off + n

    b = _align_up(cur + gap + h, l2_span)
    if b + h + 8 * cs + 4 * MiB < vsize:
        cmds.append(payload.write(tag + "-l2x", b - h, 2 * h))
        cur = b + h

    if 2 * l2_span + 2 * cs <= vsize // 4:
        b = _align_up(cur + gap + cs, l2_span)
        n = 2 * l2_span + 2 * cs
        cmds.append(payload.write(tag + "-long", b - cs, n))
        cur = b - cs + n

    off = nxt(cur)
    cmds.append(f"write -z {off} {2 * cs}")
    cur = off + 2 * cs

    off = nxt(cur)
    cmds.append(f"write -P {_pattern(tag + '-z2')} {off} {3 * cs}")
    cmds.append(f"write -z {off + cs} {cs}")
    zoff, zlen = off + 2 * cs + cs // 4, max(cs // 4, 1)
    cmds.append(f"write -z {zoff} {zlen}")
    cur = off + 3 * cs

    off = nxt(cur)
    cmds.append(payload.write(tag + "-d", off, 3 * cs))
    cmds.append(f"discard {off + cs} {cs}")
    cur = off + 3 * cs

    if subclusters:
        off = nxt(cur)
        sc = cs // 32
        u = max(4096, sc)
        cmds.append(payload.write(tag + "-sub1", off + 2 * u, u))
        cmds.append(f"write -P {_pattern(tag + '-sub2')} {off + 5 * u} {u}")
        cmds.append(f"write -z {off + 8 * u} {u}")
        cmds.append(f"write -P {_pattern(tag + '-sub3')} {off + 9 * u + sc // 2} {sc}")  # 2 half subclusters
        cur = off + cs
        off = nxt(cur)
        cmds.append(f"write -z {off + u} {u}")  # zero subclusters in an unallocated cluster
        cur = off + cs

    if tail:
        t = vsize - 4096
        if t < cur + cs:
            raise ValueError(f"{tag}: workload does not fit in {vsize} bytes (needs {cur + cs + 4096})")
        cmds.append(payload.write(tag + "-tail", t, 4096))
    elif cur > vsize:
        raise ValueError(f"{tag}: workload does not fit in {vsize} bytes")
    return cmds


def _qcow2_sample(root: Path, payload: _Payload, name: str, vsize: int, opts: Sequence[str], *,
                  cs: int = 64 * KiB, notes: str = "", tags: Iterable[str] = (), l2_entry: int = 8,
                  subclusters: bool = False) -> Sample:
    path = root / f"{name}.qcow2"
    args = _create(path, vsize, opts=opts)
    cmds = _workload(payload, name, cs, vsize, l2_entry=l2_entry, subclusters=subclusters)
    qemu_io(path, *cmds, fmt="qcow2", cwd=root)
    return Sample(name, path, "qcow2", args, notes=notes, virtual_size=vsize, cluster_size=cs,
                  commands=cmds, tags=set(tags))


# --------------------------------------------------------------------------- builders


def _build_versions(root, payload) -> list[Sample]:
    return [
        _qcow2_sample(root, payload, "v2_compat010", 32 * MiB, ["compat=0.10"], tags={"v2"},
                      notes="compat=0.10 (version 2): no zero flag, so write -z / discard leave holes "
                            "or literal zeros; 64 KiB clusters"),
        _qcow2_sample(root, payload, "v3_compat11", 32 * MiB, ["compat=1.1"], tags={"v3"},
                      notes="compat=1.1 (version 3), defaults: 64 KiB clusters, refcount_bits=16, zlib"),
        _qcow2_sample(root, payload, "v3_l2_boundary", 520 * MiB, ["compat=1.1"], tags={"v3", "large"},
                      notes="v3, 64 KiB clusters, 520 MiB virtual (sparse) so a write straddles the "
                            "first L2-table boundary at 512 MiB (two L2 tables)"),
    ]


def _build_cluster_sizes(root, payload) -> list[Sample]:
    out = []
    for cs, vsize, label in [
        (512, 32 * MiB, "512"),
        (4096, 32 * MiB, "4k"),
        (65536, 40 * MiB + 1536, "64k"),
        (2 * MiB, 128 * MiB, "2m"),
    ]:
        note = f"cluster_size={cs}, virtual size {vsize}"
        if vsize % cs:
            note += " (not a multiple of the cluster size: the last cluster is partial)"
        if cs == 2 * MiB:
            note += "; 128 MiB so 3-cluster regions with gaps fit"
        out.append(_qcow2_sample(root, payload, f"cluster_{label}", vsize,
                                 ["compat=1.1", f"cluster_size={cs}"], cs=cs, notes=note,
                                 tags={"v3", "cluster_size"}))
    return out


def _build_refcount_bits(root, payload) -> list[Sample]:
    return [
        _qcow2_sample(root, payload, f"refcount_bits_{bits}", 32 * MiB,
                      ["compat=1.1", f"refcount_bits={bits}"], tags={"v3", "refcount_bits"},
                      notes=f"refcount_bits={bits} (refcount_order={bits.bit_length() - 1})")
        for bits in (1, 2, 4, 8, 16, 32, 64)
    ]


def _build_extended_l2(root, payload) -> list[Sample]:
    return [
        _qcow2_sample(root, payload, "extended_l2", 32 * MiB, ["compat=1.1", "extended_l2=on"],
                      l2_entry=16, subclusters=True, tags={"v3", "extended_l2"},
                      notes="extended_l2=on, 64 KiB clusters = 32 subclusters of 2 KiB; 4 KiB partial "
                            "writes, half-subcluster writes and 4 KiB zero writes so subcluster "
                            "allocation/zero bitmaps differ"),
    ]


def _build_lazy(root, payload) -> list[Sample]:
    clean = _qcow2_sample(root, payload, "lazy_refcounts", 32 * MiB, ["compat=1.1", "lazy_refcounts=on"],
                          tags={"v3", "lazy_refcounts"},
                          notes="lazy_refcounts=on, cleanly closed (dirty bit clear)")
    name = "lazy_refcounts_dirty"
    path = root / f"{name}.qcow2"
    args = _create(path, 32 * MiB, opts=["compat=1.1", "lazy_refcounts=on"])
    cmds = [
        payload.write(name + "-a", 0, 96 * KiB),
        f"write -P {_pattern(name + '-b')} {1 * MiB} {128 * KiB}",
        payload.write(name + "-c", 5 * MiB - 4096, 8192),
        "abort",
    ]
    proc = qemu_io(path, *cmds, fmt="qcow2", cwd=root, check=False, no_core=True)
    if proc.returncode == 0:
        raise RuntimeError(f"qemu-io abort did not abort: {proc.stdout}")
    inc = incompatible_features(path)
    if not inc & QCOW2_INCOMPAT_DIRTY:
        raise RuntimeError(f"{path}: dirty bit not set after qemu-io abort (incompatible features {inc:#x})")
    dirty = Sample(name, path, "qcow2", args, virtual_size=32 * MiB, cluster_size=64 * KiB, commands=cmds,
                   expect_check=2, tags={"v3", "lazy_refcounts", "dirty"},
                   notes="lazy_refcounts=on, qemu-io killed by 'abort' after writes: incompatible "
                         "feature bit 0 (dirty) set, refcounts NOT updated (qemu-img check: exit 2, "
                         "corruptions). Never open read-write: qemu repairs it on open.")
    return [clean, dirty]


def _build_prealloc(root, payload) -> list[Sample]:
    return [
        _qcow2_sample(root, payload, "prealloc_metadata", 256 * MiB, ["compat=1.1", "preallocation=metadata"],
                      tags={"v3", "preallocation"},
                      notes="preallocation=metadata, 256 MiB: every cluster has an L2 entry and a host "
                            "offset (sparse host file); then the usual workload"),
    ]


def _compress_source(path: Path, size: int) -> None:
    rnd = random.Random("compress-source")
    with open(path, "wb") as f:
        f.truncate(size)

        def put(off, data):
            f.seek(off)
            f.write(data)

        text = b"".join(b"imgscope compressible line %06d: the quick brown fox\n" % i for i in range(8000))
        put(0, text[: 256 * KiB])                                  # compressible text, 4 clusters
        put(256 * KiB, b"\x5a" * (256 * KiB))                      # constant bytes
        put(1 * MiB, rnd.randbytes(192 * KiB))                     # incompressible: stored uncompressed
        put(2 * MiB + 32 * KiB, text[:32 * KiB] + rnd.randbytes(32 * KiB))  # mixed, crosses a cluster boundary
        put(3 * MiB + 100, b"sparse bytes in a mostly-zero cluster")
        put(4 * MiB, b"\0" * (64 * KiB))                           # explicit zeros -> hole
        put(5 * MiB, bytes(range(256)) * 1024)                     # 256 KiB repeating counter
        put(size - 8192, text[:4096] + rnd.randbytes(4096))        # last cluster


def _build_compressed(root, payload) -> list[Sample]:
    src = root / "_compress_source.raw"
    size = 32 * MiB
    _compress_source(src, size)
    out = []
    for name, extra in (("compressed_zlib", []), ("compressed_zstd", ["-o", "compression_type=zstd"])):
        path = root / f"{name}.qcow2"
        args = ["convert", "-c", "-f", "raw", "-O", "qcow2", *extra, src.name, path.name]
        run(QEMU_IMG, *args, cwd=root)
        # an uncompressed partial overwrite of a compressed cluster (forces decompress + COW)
        cmds = [f"write -P {_pattern(name + '-ow')} {64 * KiB + 4096} 4096"]
        qemu_io(path, *cmds, fmt="qcow2", cwd=root)
        out.append(Sample(name, path, "qcow2", args, virtual_size=size, cluster_size=64 * KiB, commands=cmds,
                          tags={"v3", "compressed"},
                          notes=f"qemu-img convert -c from {src.name} ({'zstd' if extra else 'zlib'}): "
                                "compressible text/constant/counter clusters are compressed, random "
                                "clusters stored uncompressed, explicit zeros become holes; then one "
                                "4 KiB uncompressed overwrite at 68 KiB"))
    return out


def _build_snapshots(root, payload) -> list[Sample]:
    name = "snapshots"
    path = root / f"{name}.qcow2"
    args = _create(path, 32 * MiB, opts=["compat=1.1"])
    steps = [
        ("snap-1", [payload.write(name + "-a", 0, 192 * KiB),
                    f"write -P {_pattern(name + '-b')} {4 * MiB} {128 * KiB}"]),
        ("snap-2", [payload.write(name + "-c", 64 * KiB, 192 * KiB),   # overlaps a
                    "write -z 4M 64k",                                   # zero over snapshotted data
                    payload.write(name + "-d", 8 * MiB, 64 * KiB)]),
        ("snap 3", ["discard 0 64k",
                    f"write -P {_pattern(name + '-e')} {8 * MiB + 32 * KiB} {64 * KiB}",
                    payload.write(name + "-f", 31 * MiB, MiB)]),
    ]
    cmds: list[str] = []
    snaps = []
    for snap, step in steps:
        qemu_io(path, *step, fmt="qcow2", cwd=root)
        run(QEMU_IMG, "snapshot", "-c", snap, path.name, cwd=root)
        cmds += step + [f"# qemu-img snapshot -c '{snap}'"]
        snaps.append(snap)
    last = [payload.write(name + "-g", 128 * KiB, 128 * KiB), "write -z 8M 32k"]
    qemu_io(path, *last, fmt="qcow2", cwd=root)
    cmds += last
    return [Sample(name, path, "qcow2", args, snapshots=snaps, virtual_size=32 * MiB, cluster_size=64 * KiB,
                   commands=cmds, tags={"v3", "snapshots"},
                   notes="three internal snapshots (names in .snapshots; 'snap 3' contains a space) "
                         "with different data written before each, and more writes after the last: "
                         "the active layer differs from every snapshot; shared clusters have refcount > 1")]


def _build_bitmaps(root, payload) -> list[Sample]:
    name = "bitmaps"
    path = root / f"{name}.qcow2"
    args = _create(path, 32 * MiB, opts=["compat=1.1"])
    before = [payload.write(name + "-pre", 0, 64 * KiB)]
    qemu_io(path, *before, fmt="qcow2", cwd=root)
    run(QEMU_IMG, "bitmap", "--add", path.name, "bm-64k", cwd=root)
    run(QEMU_IMG, "bitmap", "--add", "-g", "128K", path.name, "bm-128k", cwd=root)
    run(QEMU_IMG, "bitmap", "--add", "--disable", path.name, "bm-disabled", cwd=root)
    after = [payload.write(name + "-a", 1 * MiB, 64 * KiB),
             f"write -P {_pattern(name + '-b')} {4 * MiB + 32 * KiB} {256 * KiB}",
             payload.write(name + "-c", 20 * MiB, 4096)]
    qemu_io(path, *after, fmt="qcow2", cwd=root)
    cmds = before + ["# qemu-img bitmap --add bm-64k; --add -g 128K bm-128k; --add --disable bm-disabled"] + after
    return [Sample(name, path, "qcow2", args, virtual_size=32 * MiB, cluster_size=64 * KiB, commands=cmds,
                   tags={"v3", "bitmaps"},
                   notes="persistent bitmaps bm-64k (granularity 64K) and bm-128k (128K), both enabled "
                         "('auto'), plus bm-disabled; qemu-io writes after --add set bits in the enabled "
                         "ones (dirty: 1M+64K, 4M+32K..+256K, 20M+4K; the write at 0 came before). "
                         "bm-disabled has an all-zero table. Ask qemu with qemu_bitmap_dirty().")]


def _build_chain(root, payload) -> list[Sample]:
    vs = 32 * MiB
    base = root / "chain_base.qcow2"
    mid = root / "chain_mid.qcow2"
    top = root / "chain_top.qcow2"
    a_base = _create(base, vs, opts=["compat=1.1"])
    c_base = [payload.write("chain-base-a", 0, 512 * KiB),
              f"write -P {_pattern('chain-base-b')} {4 * MiB} {256 * KiB}",
              payload.write("chain-base-c", 16 * MiB - 32 * KiB, 64 * KiB),
              payload.write("chain-base-d", vs - 64 * KiB, 64 * KiB)]
    qemu_io(base, *c_base, fmt="qcow2", cwd=root)
    a_mid = _create(mid, None, opts=["compat=1.1"], backing=base.name, backing_fmt="qcow2")
    c_mid = [payload.write("chain-mid-a", 128 * KiB, 256 * KiB),                  # overlaps base a
             "write -z 4M 64k",                                                     # hides base b cluster
             f"write -P {_pattern('chain-mid-b')} {4 * MiB + 128 * KiB + 4096} 8192",  # partial: COW from base
             payload.write("chain-mid-c", 8 * MiB, 128 * KiB)]
    qemu_io(mid, *c_mid, fmt="qcow2", cwd=root)
    a_top = _create(top, None, opts=["compat=1.1"], backing=mid.name, backing_fmt="qcow2")
    c_top = [payload.write("chain-top-a", 192 * KiB + 512, 4096),                  # partial over mid
             "discard 0 64k",                                                      # zero cluster hides base
             f"write -P {_pattern('chain-top-b')} {8 * MiB + 96 * KiB} {64 * KiB}",   # crosses mid's clusters
             "write -z 16M 64k",                                                   # hides half of base c
             payload.write("chain-top-c", 20 * MiB, 64 * KiB)]
    qemu_io(top, *c_top, fmt="qcow2", cwd=root)
    return [
        Sample("chain_base", base, "qcow2", a_base, virtual_size=vs, cluster_size=64 * KiB, commands=c_base,
               tags={"v3", "chain"}, notes="bottom of the 3-deep chain"),
        Sample("chain_mid", mid, "qcow2", a_mid, virtual_size=vs, cluster_size=64 * KiB, commands=c_mid,
               backing=[base], tags={"v3", "chain", "backing"},
               notes="middle of the chain: backing 'chain_base.qcow2' (relative), -F qcow2"),
        Sample("chain_top", top, "qcow2", a_top, virtual_size=vs, cluster_size=64 * KiB, commands=c_top,
               backing=[mid, base], tags={"v3", "chain", "backing"},
               notes="top of base <- mid <- top (relative backing names, -F qcow2); overlapping "
                     "writes, partial writes (COW from the backing), zero clusters hiding backing data"),
    ]


def _build_raw_backing(root, payload) -> list[Sample]:
    base = root / "rawbase.raw"
    size = 16 * MiB
    rnd = random.Random("rawbase")
    with open(base, "wb") as f:
        f.truncate(size)
        for off, n in ((64 * KiB, 64 * KiB), (1 * MiB + 512, 3000), (8 * MiB - 4096, 12288), (size - 4096, 4096)):
            f.seek(off)
            f.write(rnd.randbytes(n))
    name = "overlay_on_raw"
    path = root / f"{name}.qcow2"
    args = _create(path, None, opts=["compat=1.1"], backing=base.name, backing_fmt="raw")
    cmds = [payload.write(name + "-a", 96 * KiB, 64 * KiB),            # half over backing data
            f"write -P {_pattern(name + '-b')} {8 * MiB} {4096}",        # inside backing data, partial
            "discard 64k 32k",                                           # partial discard: no effect
            "write -z 1M 64k",                                           # zero cluster hides backing bytes
            payload.write(name + "-c", 12 * MiB, 64 * KiB)]
    qemu_io(path, *cmds, fmt="qcow2", cwd=root)
    return [
        Sample("rawbase", base, "raw", ["truncate", str(size)], virtual_size=size, tags={"raw"}, expect_check=63,
               notes="sparse raw backing file: truncate + random data at 64K, 1M+512, 8M-4K, end-4K"),
        Sample(name, path, "qcow2", args, virtual_size=size, cluster_size=64 * KiB, commands=cmds,
               backing=[base], tags={"v3", "backing", "raw_backing"},
               notes="qcow2 overlay (-F raw) on the sparse raw file rawbase.raw"),
    ]


def _build_overlay_larger(root, payload) -> list[Sample]:
    bsize = 16 * MiB + 1536                      # not cluster aligned
    base = root / "small_base.qcow2"
    a_base = _create(base, bsize, opts=["compat=1.1"])
    c_base = [payload.write("small-base-a", 0, 64 * KiB),
              payload.write("small-base-end", bsize - 65536, 65536)]     # data up to the very end
    qemu_io(base, *c_base, fmt="qcow2", cwd=root)
    name = "overlay_larger"
    path = root / f"{name}.qcow2"
    vs = 48 * MiB
    args = _create(path, vs, opts=["compat=1.1"], backing=base.name, backing_fmt="qcow2")
    cmds = [f"write -P {_pattern(name + '-a')} {16 * MiB - 4096} 2048",     # COW of a cluster with backing data
            payload.write(name + "-b", 16 * MiB + 2048, 2048),               # cluster holding backing EOF
            payload.write(name + "-c", 20 * MiB, 64 * KiB)]                  # beyond the backing file
    qemu_io(path, *cmds, fmt="qcow2", cwd=root)
    return [
        Sample(name, path, "qcow2", args, virtual_size=vs, cluster_size=64 * KiB, commands=cmds,
               backing=[base], tags={"v3", "backing", "larger_than_backing"},
               notes=f"48 MiB overlay over small_base.qcow2 ({bsize} bytes, not cluster aligned, data up "
                     "to its last byte): reads past the backing size must be zero, including the rest "
                     "of the cluster that holds the backing EOF"),
    ]


def _build_data_file(root, payload) -> list[Sample]:
    out = []
    for name, opts, note in (
        ("data_file", [], "external data file data_file.data (relative name in the header)"),
        ("data_file_raw", ["data_file_raw=on"],
         "external data file data_file_raw.data with data_file_raw=on (qemu preallocates the "
         "metadata: all L2 entries point at guest offset == host offset)"),
    ):
        path = root / f"{name}.qcow2"
        data = root / f"{name}.data"
        vs = 32 * MiB
        args = _create(path, vs, opts=["compat=1.1", f"data_file={data.name}", *opts])
        cmds = _workload(payload, name, 64 * KiB, vs)
        qemu_io(path, *cmds, fmt="qcow2", cwd=root)
        out.append(Sample(name, path, "qcow2", args, virtual_size=vs, cluster_size=64 * KiB, commands=cmds,
                          extra_files=[data], tags={"v3", "data_file"},
                          notes=note + "; qemu 7.2 resolves the relative name against the CWD"))
    return out


def _build_luks(root, payload) -> list[Sample]:
    name = "luks"
    path = root / f"{name}.qcow2"
    vs = 32 * MiB
    secret_obj = f"secret,id={SECRET_ID},data={LUKS_SECRET}"
    args = _create(path, vs, opts=["compat=1.1", "encrypt.format=luks", f"encrypt.key-secret={SECRET_ID}",
                                   "encrypt.iter-time=10"],
                   objects=[secret_obj])
    cmds = _workload(payload, name, 64 * KiB, vs)
    qemu_io(path, *cmds, secret=LUKS_SECRET, cwd=root)
    return [Sample(name, path, "qcow2", args, secret=LUKS_SECRET, virtual_size=vs, cluster_size=64 * KiB,
                   commands=cmds, tags={"v3", "luks", "encrypted"},
                   notes=f"LUKS-encrypted qcow2 (aes-256-xts, plain64), passphrase {LUKS_SECRET!r} "
                         f"(Sample.secret), iter-time=10ms. qemu needs: --object {secret_obj} "
                         f"--image-opts driver=qcow2,file.filename=PATH,encrypt.key-secret={SECRET_ID}; "
                         "the qemu_* helpers do this when given secret=")]


def build_raw_sample(directory, name: str = "raw") -> Sample:
    """A sparse raw image: truncate, then random/pattern data at a few offsets."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.raw"
    size = 24 * MiB
    rnd = random.Random("raw-sample")
    pieces = [(0, 4096), (64 * KiB - 512, 1024), (3 * MiB + 7, 100_000), (12 * MiB, 64 * KiB), (size - 512, 512)]
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in pieces:
            f.seek(off)
            f.write(rnd.randbytes(n))
    return Sample(name, path, "raw", ["truncate", str(size)], virtual_size=size, tags={"raw"}, expect_check=63,
                  notes="sparse raw: truncate to 24 MiB, random data at " + ", ".join(f"{o}+{n}" for o, n in pieces))


_BUILDERS = (
    _build_versions, _build_cluster_sizes, _build_refcount_bits, _build_extended_l2, _build_lazy,
    _build_prealloc, _build_compressed, _build_snapshots, _build_bitmaps, _build_chain,
    _build_raw_backing, _build_overlay_larger, _build_data_file, _build_luks,
)


def build_qcow2_corpus(directory, jobs: int | None = None) -> dict[str, Sample]:
    """Build every sample into ``directory`` and return them by name.

    The builders are independent and only run subprocesses, so they run on a few
    threads (``jobs``, default 4; 1 = sequential).  Data written with ``write -s`` comes
    from ``directory/_payload``.
    """
    # LUKS first: its key derivation alone takes ~2 s
    builders = [_build_luks] + [b for b in _BUILDERS if b is not _build_luks]
    builders.append(lambda r, p: [build_raw_sample(r)])
    return _run_builders(directory, builders, jobs)


def _run_builders(directory, builders, jobs: int | None) -> dict[str, Sample]:
    """Run ``builder(root, payload)`` for every builder on ``jobs`` threads (default 4;
    1 = sequential) and return all the samples they made by name (names must be unique)."""
    from concurrent.futures import ThreadPoolExecutor

    root = Path(directory).absolute()
    root.mkdir(parents=True, exist_ok=True)
    payload = _Payload(root)
    jobs = jobs or 4
    if jobs == 1:
        results = [b(root, payload) for b in builders]
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda b: b(root, payload), builders))
    corpus: dict[str, Sample] = {}
    for group in results:
        for s in group:
            if s.name in corpus:
                raise RuntimeError(f"duplicate sample name {s.name}")
            corpus[s.name] = s
    return corpus


# --------------------------------------------------------------------------- benchmarks


def build_fragmented_qcow2(path, virtual_size: int, n_extents: int, *, cluster_size: int | None = None,
                           scramble_every: int = 4, seed: int = 0) -> dict:
    """A qcow2 with about ``n_extents`` separate data extents, some in scrambled host order.

    Extent ``i`` is one data cluster at guest offset ``i * stride`` (stride >= 2 clusters,
    so extents are separated by holes).  Extents with ``i % scramble_every != 0`` are
    written as a few bytes into a sparse raw file and converted with
    ``qemu-img convert -O qcow2`` (host order == guest order); the others are then
    written (512 bytes each) by qemu-io in REVERSE guest order (``-t unsafe``), so they
    are allocated at the end of the file in descending host order.

    qemu allocates whole clusters, so the file takes about ``n_extents * cluster_size``
    bytes of disk.  ``cluster_size=None`` picks the largest power of two between 4 KiB and
    64 KiB keeping that under 512 MiB (and leaving room for a 2-cluster stride).
    Measured: 10^5 extents in 1 GiB with 4 KiB clusters ~3.7 s / 410 MB; with 64 KiB
    clusters (needs >= 13 GiB virtual) ~4.9 s / 6.5 GB; 512-byte clusters are slow (~27 s).
    Returns a dict describing what was built.
    """
    path = Path(path).absolute()
    if n_extents < 1:
        raise ValueError("n_extents must be >= 1")
    if cluster_size is None:
        cs = 64 * KiB
        while cs > 4 * KiB and (n_extents * cs > 512 * MiB or virtual_size // n_extents < 2 * cs):
            cs //= 2
    else:
        cs = cluster_size
    stride = virtual_size // n_extents // cs * cs
    if stride < 2 * cs:
        raise ValueError(f"{n_extents} extents of {cs}-byte clusters do not fit in {virtual_size} bytes "
                         f"(need {2 * cs * n_extents})")
    raw = path.with_name(path.name + ".src.raw")
    t0 = time.monotonic()
    late = []
    try:
        with open(raw, "wb") as f:
            f.truncate(virtual_size)
            for i in range(n_extents):
                off = i * stride
                if scramble_every and i % scramble_every == 0:
                    late.append((i, off))
                    continue
                f.seek(off)
                f.write(struct.pack(">QQ", i, seed) + b"imgscope-frag")
        run(QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cs}", raw, path)
    finally:
        raw.unlink(missing_ok=True)
    cmds = [f"write -q -P 0x{(i % 254) + 1:02x} {off} 512" for i, off in reversed(late)]
    if cmds:
        qemu_io(path, *cmds, fmt="qcow2", cache="unsafe")
    return {"path": path, "virtual_size": virtual_size, "cluster_size": cs, "stride": stride,
            "n_extents": n_extents, "scrambled": len(late), "seconds": time.monotonic() - t0}


# =========================================================================== VMDK
#
# Behaviour of qemu-img / qemu-io 7.2 on VMDK, observed while writing this section
# (facts about the oracle, like the qcow2 notes in the module docstring):
#
# * ``qemu-img create -f vmdk -o subformat=...`` writes monolithicSparse (default),
#   monolithicFlat (``NAME.vmdk`` descriptor + ``NAME-flat.vmdk``), twoGbMaxExtentSparse
#   (descriptor + ``NAME-s001.vmdk``, ``-s002``, ... of 2 GiB = 4194304 sectors each),
#   twoGbMaxExtentFlat (``NAME-f001.vmdk`` ...; sparse files of exactly the extent size)
#   and streamOptimized.  Grains are 64 KiB, a grain table maps 512 grains (32 MiB).
# * qemu-io can write every subformat except streamOptimized in a useful way; stream
#   samples come from ``qemu-img convert -O vmdk -o subformat=streamOptimized`` of a raw
#   file (all-zero grains are skipped, i.e. become holes; qemu puts GD/GTs in the
#   overhead like monolithicSparse, records back to back from sector 128).
# * The first write after each open gives the descriptor a new random CID; qemu then
#   rewrites a separate descriptor file NUL-padded to 512 bytes.
# * ``write -z`` without ``zeroed_grain=on`` allocates grains full of zeros (map:
#   ``data: true, zero: false`` with an offset).  With ``zeroed_grain=on`` (header
#   version 2, flag 0x4) a grain-aligned ``write -z`` stores GTE = 1 (map: ``present:
#   true, zero: true, data: false``, no offset), even over an allocated grain, whose
#   host grain is then leaked; an unaligned ``write -z`` writes zero bytes.
# * ``compat6=on`` writes ``ddb.virtualHWVersion = "6"`` and cannot be combined with
#   ``hwversion``; heads are 16 for ``adapter_type=ide`` and 255 otherwise.
# * Children: ``qemu-img create -f vmdk -b PARENT -F vmdk CHILD`` stores
#   ``parentCID`` = the parent's CID and ``parentFileNameHint`` = the -b name.  Writing
#   to the parent afterwards changes its CID: ``qemu-img info`` and ``map`` still work
#   on the child, but ``qemu-img convert`` fails ("error while reading at byte N:
#   Invalid argument") at the first read that reaches the parent.
# * map of flat extents: every byte is ``present``/``data`` with the flat-file offset;
#   holes of the sparse flat file are ``zero: true`` too.


@dataclass
class VmdkSample(Sample):
    """A VMDK corpus image (``fmt`` = "vmdk").

    ``subformat`` is the createType; ``extra_files`` lists every other file the image
    needs (separate extent files of every layer, in descriptor order); ``backing``
    the parent disks (nearest first).  ``expect_findings`` is the set of finding codes
    imgscope should report for the image (empty for clean images).  ``qemu_reads`` is
    False when ``qemu-img convert`` cannot read the guest (CID mismatch), so there is no
    raw oracle for its content.
    """

    subformat: str = ""
    expect_findings: set[str] = field(default_factory=set)
    qemu_reads: bool = True


GRAIN = 64 * KiB
GT_SPAN = 512 * GRAIN          # 32 MiB of guest per grain table
SPLIT = 2 * GiB                # qemu's twoGbMax extent size

def vmdk_descriptor_text(path) -> str:
    """The descriptor text of a VMDK file: the file itself, or the embedded one of a KDMV
    file (sector ``descriptorOffset``, ``descriptorSize`` sectors), cut at the first NUL."""
    with open(path, "rb") as f:
        head = f.read(512)
        if head[:4] == b"KDMV":
            d_off, d_size = struct.unpack_from("<QQ", head, 0x1C)
            f.seek(d_off * 512)
            raw = f.read(d_size * 512)
        else:
            f.seek(0)
            raw = f.read(1 << 20)
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def vmdk_extent_lines(path) -> list[tuple[str, int, str, str | None, int | None]]:
    """(access, sectors, type, file name or None, offset or None) of each extent line."""
    import re
    pattern = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?')
    out = []
    for line in vmdk_descriptor_text(path).splitlines():
        m = pattern.match(line)
        if m:
            out.append((m.group(1), int(m.group(2)), m.group(3), m.group(4),
                        None if m.group(5) is None else int(m.group(5))))
    return out


def vmdk_extent_files(path) -> list[Path]:
    """Files named by the extent lines of ``path``, other than ``path`` itself."""
    path = Path(path).absolute()
    out = []
    for _a, _s, _t, name, _o in vmdk_extent_lines(path):
        if name:
            p = (path.parent / name).absolute()
            if p != path and p not in out:
                out.append(p)
    return out


def vmdk_header(path) -> dict:
    """The KDMV header fields (not a parser under test: a fixed struct unpack)."""
    with open(path, "rb") as f:
        h = f.read(512)
    names = ("magic", "version", "flags", "capacity", "grainSize", "descriptorOffset",
             "descriptorSize", "numGTEsPerGT", "rgdOffset", "gdOffset", "overHead",
             "uncleanShutdown", "newline", "compressAlgorithm")
    vals = struct.unpack_from("<4sIIQQQQIQQQB4sH", h, 0)
    if vals[0] != b"KDMV":
        raise ValueError(f"{path}: not a KDMV file")
    return dict(zip(names, vals))


def vmdk_grain_tables(path) -> dict:
    """KDMV header, primary/redundant grain directory entries and every primary grain
    table (GT sector -> list of entries): a plain struct unpack, not a parser under test."""
    h = vmdk_header(path)
    data = Path(path).read_bytes()
    n = -(-h["capacity"] // (h["grainSize"] * h["numGTEsPerGT"]))
    gd = list(struct.unpack_from(f"<{n}I", data, h["gdOffset"] * 512))
    rgd = list(struct.unpack_from(f"<{n}I", data, h["rgdOffset"] * 512)) if h["rgdOffset"] else []
    gts = {s: list(struct.unpack_from(f"<{h['numGTEsPerGT']}I", data, s * 512)) for s in gd if s}
    return {"header": h, "gd": gd, "rgd": rgd, "gts": gts, "size": len(data)}


def _vmdk_create(path: Path, size: int | None, opts: Sequence[str] = (), *, backing: str | None = None
                 ) -> list[str]:
    return _create(path, size, fmt="vmdk", opts=opts, backing=backing,
                   backing_fmt="vmdk" if backing else None)


def _vmdk_workload(payload: _Payload, tag: str, vsize: int, *, boundaries: Sequence[int] = ()
                   ) -> list[str]:
    """qemu-io commands putting known data into a VMDK with 64 KiB grains.

      R1   unique data at 0, 1.5 grains (crosses grain 0/1, partial second grain)
      R2   constant pattern from a quarter into grain 4, 2.5 grains
      P    4 KiB of unique data at 1 MiB + 512 (inside one grain, unaligned)
      Z1   ``write -z`` of 2 unallocated grains at 2 MiB
      Z2   3 data grains at 3 MiB, grain-aligned ``write -z`` of the middle one and an
           unaligned 4 KiB ``write -z`` inside the third
      GTX  unique data straddling the first three grain-table boundaries (32 MiB
           multiples) inside the disk, starting mid-grain (1.5 grains before, 1.5 after)
      LNG  100 000 unique bytes at 32 MiB + 8 MiB + 7 (unaligned, in the second GT)
      B    unique data straddling each offset in ``boundaries`` (extent boundaries),
           the first GT boundary after it, and 5000 bytes at boundary + 5 MiB + 3
      T    4 KiB of unique data ending exactly at the end of the disk
    """
    g = GRAIN
    cmds = [payload.write(tag + "-r1", 0, g + g // 2),
            f"write -P {_pattern(tag + '-r2')} {4 * g + g // 4} {2 * g + g // 2}",
            payload.write(tag + "-p", MiB + 512, 4096),
            f"write -z {2 * MiB} {2 * g}",
            f"write -P {_pattern(tag + '-z2')} {3 * MiB} {3 * g}",
            f"write -z {3 * MiB + g} {g}",
            f"write -z {3 * MiB + 2 * g + 8192} 4096"]
    gts = list(range(GT_SPAN, vsize - 4 * g, GT_SPAN))[:3]      # a few are enough (2 GiB has 64)
    for b in gts:
        cmds.append(payload.write(f"{tag}-gtx{b // GT_SPAN}", b - g - g // 2, 3 * g))
    if vsize > GT_SPAN + 9 * MiB:
        cmds.append(payload.write(tag + "-long", GT_SPAN + 8 * MiB + 7, 100_000))
    for b in boundaries:
        cmds.append(payload.write(f"{tag}-b{b:x}", b - 96 * KiB, 192 * KiB))
        if b + GT_SPAN < vsize - 4 * g:         # a GT boundary inside the next extent
            cmds.append(payload.write(f"{tag}-b{b:x}-gt", b + GT_SPAN - g // 2, 2 * g))
        cmds.append(payload.write(f"{tag}-b{b:x}-after", b + 5 * MiB + 3, 5000))
    cmds.append(payload.write(tag + "-tail", vsize - 4096, 4096))
    return cmds


def _vmdk_sample(root: Path, payload: _Payload, name: str, vsize: int, opts: Sequence[str] = (), *,
                 subformat: str = "monolithicSparse", boundaries: Sequence[int] = (), notes: str = "",
                 tags: Iterable[str] = ()) -> VmdkSample:
    path = root / f"{name}.vmdk"
    args = _vmdk_create(path, vsize, [f"subformat={subformat}", *opts])
    cmds = _vmdk_workload(payload, name, vsize, boundaries=boundaries)
    qemu_io(path, *cmds, fmt="vmdk", cwd=root)
    return VmdkSample(name, path, "vmdk", args, notes=notes, virtual_size=vsize, cluster_size=GRAIN,
                      commands=cmds, extra_files=vmdk_extent_files(path), tags={"vmdk", *tags},
                      subformat=subformat)


def _build_vmdk_subformats(root, payload) -> list[VmdkSample]:
    big = SPLIT + 40 * MiB
    return [
        _vmdk_sample(root, payload, "sparse", 80 * MiB, tags={"sparse"},
                     notes="monolithicSparse (qemu default: ide, hwversion 4), 80 MiB = 2.5 GTs"),
        _vmdk_sample(root, payload, "flat", 80 * MiB, subformat="monolithicFlat", tags={"flat"},
                     notes="monolithicFlat: flat.vmdk descriptor + flat-flat.vmdk (sparse raw file)"),
        _vmdk_sample(root, payload, "split_sparse", big, subformat="twoGbMaxExtentSparse",
                     boundaries=[SPLIT], tags={"sparse", "split", "large"},
                     notes="twoGbMaxExtentSparse, 2 GiB + 40 MiB: split_sparse-s001.vmdk (2 GiB) and "
                           "-s002.vmdk (40 MiB); data straddles the extent boundary"),
        _vmdk_sample(root, payload, "split_flat", big, subformat="twoGbMaxExtentFlat",
                     boundaries=[SPLIT], tags={"flat", "split", "large"},
                     notes="twoGbMaxExtentFlat, 2 GiB + 40 MiB: two sparse flat files -f001/-f002; "
                           "data straddles the extent boundary"),
    ]


def _build_vmdk_options(root, payload) -> list[VmdkSample]:
    out = []
    small = 40 * MiB
    for adapter in ("ide", "lsilogic", "buslogic", "legacyESX"):
        out.append(_vmdk_sample(root, payload, f"adapter_{adapter}", small, [f"adapter_type={adapter}"],
                                tags={"sparse", "adapter"},
                                notes=f"monolithicSparse, adapter_type={adapter} "
                                      f"(heads {16 if adapter == 'ide' else 255})"))
    for hw in ("4", "7", "9"):
        out.append(_vmdk_sample(root, payload, f"hwversion_{hw}", small, [f"hwversion={hw}"],
                                tags={"sparse", "hwversion"}, notes=f"monolithicSparse, hwversion={hw}"))
    out.append(_vmdk_sample(root, payload, "compat6", small, ["compat6=on"], tags={"sparse", "hwversion"},
                            notes="monolithicSparse, compat6=on (ddb.virtualHWVersion 6)"))
    out.append(_vmdk_sample(root, payload, "zeroed_grain", 80 * MiB, ["zeroed_grain=on"],
                            tags={"sparse", "zeroed_grain"},
                            notes="monolithicSparse, zeroed_grain=on (version 2, flags 0x7): grain-aligned "
                                  "write -z stores GTE=1, also over the allocated middle grain of Z2 "
                                  "(its host grain is leaked)"))
    out.append(_vmdk_sample(root, payload, "flat_lsilogic", small, ["adapter_type=lsilogic", "hwversion=7"],
                            subformat="monolithicFlat", tags={"flat", "adapter"},
                            notes="monolithicFlat, adapter_type=lsilogic, hwversion=7"))
    return out


def _stream_source(path: Path, size: int) -> None:
    """Raw source for the stream samples: compressible text, incompressible random data,
    all-zero grains inside data, data across GT boundaries, random bytes up to the end
    (a partial last grain when ``size`` is not a grain multiple)."""
    rnd = random.Random("vmdk-stream")
    text = b"".join(b"imgscope stream line %08d: compressible text\n" % i for i in range(8000))
    with open(path, "wb") as f:
        f.truncate(size)
        pieces = [(0, rnd.randbytes(GRAIN + 12345)),                         # incompressible, 2 grains
                  (MiB, text[:5 * GRAIN + 999]),                              # compressible, 6 grains
                  (3 * MiB, rnd.randbytes(GRAIN) + bytes(2 * GRAIN) + rnd.randbytes(GRAIN)),  # zero grains inside
                  (GT_SPAN - 70_000, rnd.randbytes(140_000)),                 # across GT 0/1
                  (2 * GT_SPAN - GRAIN // 2, text[:GRAIN]),                   # across GT 1/2, compressible
                  (2 * GT_SPAN + 5 * MiB + 100, b"\x5a" * 3000),              # tiny, very compressible
                  (size - 3000, rnd.randbytes(3000))]                         # up to the end
        for off, data in pieces:
            f.seek(off)
            f.write(data)


def _build_vmdk_stream(root, payload) -> list[VmdkSample]:
    size = 2 * GT_SPAN + 8 * MiB                   # 3 GTs, whole grains
    out = []
    for name, vsize, opts, note in (
        ("stream", size, [], "streamOptimized (version 3, flags 0x30003, zlib) converted from a raw file"),
        ("stream_zeroed_grain", size, ["zeroed_grain=on"],
         "streamOptimized with zeroed_grain=on (flags 0x30007)"),
        ("stream_tail", size + 4096, [],
         "streamOptimized whose size is not a grain multiple: the last grain record holds "
         "4 KiB (qemu compresses only the bytes inside the disk)"),
    ):
        src = root / f"_{name}_source.raw"
        _stream_source(src, vsize)
        path = root / f"{name}.vmdk"
        args = ["convert", "-f", "raw", "-O", "vmdk", "-o", ",".join(["subformat=streamOptimized", *opts]),
                src.name, path.name]
        run(QEMU_IMG, *args, cwd=root)
        out.append(VmdkSample(name, path, "vmdk", args, virtual_size=vsize, cluster_size=GRAIN,
                              tags={"vmdk", "stream", "compressed"}, subformat="streamOptimized",
                              notes=note + "; source: incompressible random grains, compressible text, "
                                           "all-zero grains inside data (holes), data across GT "
                                           "boundaries, 3000 random bytes ending at the end of the disk"))
    return out


def _build_vmdk_chain(root, payload) -> list[VmdkSample]:
    vs = 80 * MiB
    g = GRAIN
    base = root / "chain_base.vmdk"
    child = root / "chain_child.vmdk"
    grand = root / "chain_grandchild.vmdk"
    a_base = _vmdk_create(base, vs)
    c_base = _vmdk_workload(payload, "chain_base", vs)
    qemu_io(base, *c_base, fmt="vmdk", cwd=root)
    a_child = _vmdk_create(child, None, backing=base.name)
    c_child = [payload.write("chain-child-a", g // 2 + 512, 4096),                  # partial: COW from base
               payload.write("chain-child-b", GT_SPAN - g, 2 * g),                   # over base GTX
               "write -z 4M 64k",                                                   # over a base hole
               f"write -z {3 * MiB} {g}",                                            # zeros over base data
               payload.write("chain-child-c", 10 * MiB + 3, 3 * g)]                  # new data
    qemu_io(child, *c_child, fmt="vmdk", cwd=root)
    a_grand = _vmdk_create(grand, None, ["zeroed_grain=on"], backing=child.name)
    c_grand = [f"write -z 0 {g}",                                                    # GTE=1 hides base R1
               payload.write("chain-grand-a", 10 * MiB + 3 + g, 4096),               # partial over child c
               f"write -z {GT_SPAN} {g}",                                            # hides child b / base
               payload.write("chain-grand-b", 50 * MiB, 2 * g + 1)]
    qemu_io(grand, *c_grand, fmt="vmdk", cwd=root)

    fbase = root / "flatbase.vmdk"
    fchild = root / "flatbase_child.vmdk"
    a_fbase = _vmdk_create(fbase, 40 * MiB, ["subformat=monolithicFlat"])
    c_fbase = [payload.write("flatbase-a", 0, 3 * g), payload.write("flatbase-b", 20 * MiB, g)]
    qemu_io(fbase, *c_fbase, fmt="vmdk", cwd=root)
    a_fchild = _vmdk_create(fchild, None, backing=fbase.name)
    c_fchild = [payload.write("flatbase-child-a", g + 100, 1000), "write -z 20M 4k",
                payload.write("flatbase-child-b", 30 * MiB, g)]
    qemu_io(fchild, *c_fchild, fmt="vmdk", cwd=root)
    fb_files = vmdk_extent_files(fbase)
    return [
        VmdkSample("chain_base", base, "vmdk", a_base, virtual_size=vs, cluster_size=g, commands=c_base,
                   tags={"vmdk", "sparse", "chain"}, subformat="monolithicSparse",
                   notes="bottom of chain_base <- chain_child <- chain_grandchild"),
        VmdkSample("chain_child", child, "vmdk", a_child, virtual_size=vs, cluster_size=g, commands=c_child,
                   backing=[base], tags={"vmdk", "sparse", "chain", "backing"}, subformat="monolithicSparse",
                   notes="child of chain_base.vmdk: partial writes (COW from the parent), zeros over "
                         "parent data (allocated zero grains: no zeroed_grain)"),
        VmdkSample("chain_grandchild", grand, "vmdk", a_grand, virtual_size=vs, cluster_size=g,
                   commands=c_grand, backing=[child, base], tags={"vmdk", "sparse", "chain", "backing",
                                                                  "zeroed_grain"},
                   subformat="monolithicSparse",
                   notes="zeroed_grain=on grandchild: write -z stores GTE=1, hiding parent data"),
        VmdkSample("flatbase", fbase, "vmdk", a_fbase, virtual_size=40 * MiB, cluster_size=None,
                   commands=c_fbase, extra_files=fb_files, tags={"vmdk", "flat", "chain"},
                   subformat="monolithicFlat", notes="monolithicFlat parent of flatbase_child"),
        VmdkSample("flatbase_child", fchild, "vmdk", a_fchild, virtual_size=40 * MiB, cluster_size=g,
                   commands=c_fchild, backing=[fbase], extra_files=fb_files,
                   tags={"vmdk", "sparse", "chain", "backing", "flat_parent"}, subformat="monolithicSparse",
                   notes="monolithicSparse child whose parent is a monolithicFlat descriptor"),
    ]


def _build_vmdk_cid_mismatch(root, payload) -> list[VmdkSample]:
    vs = 40 * MiB
    base = root / "cid_base.vmdk"
    child = root / "cid_child.vmdk"
    a_base = _vmdk_create(base, vs)
    c_base = [payload.write("cid-base-a", 0, 2 * GRAIN), payload.write("cid-base-b", 8 * MiB, GRAIN)]
    qemu_io(base, *c_base, fmt="vmdk", cwd=root)
    a_child = _vmdk_create(child, None, backing=base.name)
    c_child = [payload.write("cid-child-a", 4 * MiB, GRAIN)]
    qemu_io(child, *c_child, fmt="vmdk", cwd=root)
    late = [payload.write("cid-base-late", 16 * MiB, GRAIN)]       # new CID in cid_base.vmdk
    qemu_io(base, *late, fmt="vmdk", cwd=root)
    return [
        VmdkSample("cid_base", base, "vmdk", a_base, virtual_size=vs, cluster_size=GRAIN,
                   commands=c_base + ["# after cid_child was made:"] + late, tags={"vmdk", "sparse"},
                   subformat="monolithicSparse",
                   notes="parent of cid_child, written AFTER the child was made (its CID changed)"),
        VmdkSample("cid_child", child, "vmdk", a_child, virtual_size=vs, cluster_size=GRAIN,
                   commands=c_child, backing=[base], tags={"vmdk", "sparse", "backing", "cid_mismatch"},
                   subformat="monolithicSparse", expect_findings={"cid_mismatch"}, qemu_reads=False,
                   notes="child whose parentCID no longer matches cid_base's CID: qemu-img info/map "
                         "work, qemu-img convert fails ('Invalid argument'); imgscope reports the "
                         "finding 'cid_mismatch'"),
    ]


_VMDK_BUILDERS = (_build_vmdk_subformats, _build_vmdk_options, _build_vmdk_stream, _build_vmdk_chain,
                  _build_vmdk_cid_mismatch)


def build_vmdk_corpus(directory, jobs: int | None = None) -> dict[str, VmdkSample]:
    """Build every VMDK sample into ``directory`` and return them by name.

    Every subformat qemu-img writes (monolithicSparse, monolithicFlat,
    twoGbMaxExtentSparse/Flat of 2 GiB + 40 MiB, streamOptimized), the create options
    (adapter_type, hwversion, compat6, zeroed_grain), a 3-deep chain, a child of a flat
    parent and a child whose parent changed after it was made (CID mismatch).  The big
    disks are sparse: the whole corpus takes a few MiB of disk.
    """
    return _run_builders(directory, _VMDK_BUILDERS, jobs)
