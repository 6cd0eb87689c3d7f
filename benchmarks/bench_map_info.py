#!/usr/bin/env python3
"""Time ``imgscope info|map`` against ``qemu-img info|map`` on the same large images.

    python benchmarks/bench_map_info.py [--workdir DIR] [--quick] [--runs N] [--profile]

Builds (or reuses) the benchmark images in the work directory (default
``benchmarks/work/``, git-ignored), then for every image and verb
(``info --output=json``, ``map --output=json``) runs both tools as whole
subprocesses on the same file, alternately, after one warm-up run each (page
cache warm), and keeps the best wall-clock time of ``--runs`` runs.  The
outputs of both tools are compared (parsed JSON values; for map the parsed
lists).  It also measures start-up (``--version``) and, with ``--profile``,
profiles imgscope on every case where it is slower than qemu-img.

Images (full run / ``--quick``):

* ``prealloc-1t.qcow2`` / ``prealloc-64g.qcow2``:
  ``qemu-img create -f qcow2 -o preallocation=metadata FILE 1T`` (64 KiB clusters).
  Sparse host file: ~1 TiB apparent, ~160 MiB allocated.
* ``fragmented.qcow2`` / ``fragmented-quick.qcow2``: 10^5 / 10^4 scattered data
  extents built by ``tests/oracle.py``'s ``build_fragmented_qcow2``.
* ``fragmented-sparse.vmdk``, ``fragmented-stream.vmdk``, ``fragmented.vdi``,
  ``fragmented.vhd``, ``fragmented.vhdx``, ``fragmented.qcow`` (quick: a stream VMDK):
  ``qemu-img convert -O vmdk|vdi|vpc|vhdx|qcow`` of the fragmented qcow2, so the
  same 10^5 extents in every format (VMDK as monolithicSparse and streamOptimized).

An image is reused when it and its ``*.build.json`` side file (written only after
a successful build) are present with the same parameters.

Nothing here is a test: timings depend on the machine and never go into tests/.
Results go to stdout and to ``WORKDIR/results-<mode>.json``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TESTS = REPO / "tests"

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

QEMU_IMG = os.environ.get("IMGSCOPE_QEMU_IMG") or shutil.which("qemu-img") or "/usr/bin/qemu-img"
RUN_TIMEOUT = 3600  # seconds, per single tool run

#: environment of every measured child process (set by main(), see child_env())
CHILD_ENV: dict | None = None
#: run imgscope from this source tree instead of the installed package (--imgscope-src)
IMGSCOPE_SRC: Path | None = None


def child_env(workdir: Path, as_is: bool) -> dict | None:
    """Environment for the measured runs.

    By default bytecode caching is made to work even when the calling environment
    sets PYTHONDONTWRITEBYTECODE (this one does): otherwise every imgscope run
    recompiles imgscope's own modules from source (~40-50 ms here), which no
    installed copy would do.  The .pyc files go to WORKDIR/pycache
    (PYTHONPYCACHEPREFIX), so nothing is written into imgscope/ or site-packages.
    The warm-up run fills that cache before anything is timed.
    """
    env = dict(os.environ)
    if IMGSCOPE_SRC is not None:
        # PathFinder (PYTHONPATH) runs before the editable install's finder
        env["PYTHONPATH"] = os.pathsep.join([str(IMGSCOPE_SRC), *filter(None, [env.get("PYTHONPATH")])])
    if as_is:
        return env if IMGSCOPE_SRC is not None else None
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    return env


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str                 # "prealloc" | "fragmented" | "convert"
    virtual_size: int
    n_extents: int = 0        # fragmented only
    cluster_size: int = 64 * KiB  # prealloc: fixed; fragmented: 0 = oracle's choice
    source: str = ""          # convert: image (built before it) converted with qemu-img
    fmt: str = ""             # convert: -O format
    options: str = ""         # convert: -o options (e.g. subformat=streamOptimized)

    def params(self) -> dict:
        return asdict(self)


FULL = [
    Spec("prealloc-1t.qcow2", "prealloc", 1 * TiB),
    Spec("fragmented.qcow2", "fragmented", 4 * GiB, n_extents=100_000, cluster_size=0),
    Spec("fragmented-sparse.vmdk", "convert", 4 * GiB, source="fragmented.qcow2", fmt="vmdk",
         options="subformat=monolithicSparse"),
    Spec("fragmented-stream.vmdk", "convert", 4 * GiB, source="fragmented.qcow2", fmt="vmdk",
         options="subformat=streamOptimized"),
    Spec("fragmented.vdi", "convert", 4 * GiB, source="fragmented.qcow2", fmt="vdi"),
    Spec("fragmented.vhd", "convert", 4 * GiB, source="fragmented.qcow2", fmt="vpc"),
    Spec("fragmented.vhdx", "convert", 4 * GiB, source="fragmented.qcow2", fmt="vhdx",
         options="block_size=1M"),
    Spec("fragmented.qcow", "convert", 4 * GiB, source="fragmented.qcow2", fmt="qcow"),
]
QUICK = [
    Spec("prealloc-64g.qcow2", "prealloc", 64 * GiB),
    Spec("fragmented-quick.qcow2", "fragmented", 1 * GiB, n_extents=10_000, cluster_size=0),
    Spec("fragmented-quick-stream.vmdk", "convert", 1 * GiB, source="fragmented-quick.qcow2",
         fmt="vmdk", options="subformat=streamOptimized"),
]


def _frag_cluster_size(spec: Spec) -> int:
    """The cluster size build_fragmented_qcow2 picks (same rule as tests/oracle.py)."""
    if spec.cluster_size:
        return spec.cluster_size
    cs = 64 * KiB
    while cs > 4 * KiB and (spec.n_extents * cs > 512 * MiB or spec.virtual_size // spec.n_extents < 2 * cs):
        cs //= 2
    return cs


def estimated_disk_bytes(spec: Spec) -> int:
    """Allocated (not apparent) bytes the image will need, with some margin."""
    if spec.kind == "convert":
        return 600 * MiB
    if spec.kind == "prealloc":
        clusters = spec.virtual_size // spec.cluster_size
        # L2 entries (8 B) + refcounts (2 B) per cluster, plus header/L1/refcount table
        return int((clusters * 10 + 4 * MiB) * 1.25)
    cs = _frag_cluster_size(spec)
    clusters = spec.virtual_size // cs
    return int((spec.n_extents * cs + clusters * 10 + 4 * MiB) * 1.25)


def df_report(path: Path) -> str:
    out = subprocess.run(["df", "-h", "--output=source,fstype,size,used,avail,pcent,target", str(path)],
                         capture_output=True, text=True)
    return out.stdout.strip() or out.stderr.strip()


def check_space(workdir: Path, specs: list[Spec]) -> None:
    todo = [s for s in specs if not image_is_built(workdir, s)]
    need = sum(estimated_disk_bytes(s) for s in todo)
    free = shutil.disk_usage(workdir).free
    print("## Disk space (df) in the work directory\n")
    print("```\n" + df_report(workdir) + "\n```")
    print(f"images to build: {', '.join(s.name for s in todo) or 'none (all reused)'}; "
          f"estimated allocated space needed {need / MiB:.0f} MiB, free {free / GiB:.1f} GiB "
          f"(apparent sizes: {', '.join(f'{s.name} {s.virtual_size / GiB:g} GiB' for s in todo) or '-'}; "
          "host files are sparse)\n")
    if need > free * 0.9:
        sys.exit(f"not enough free space in {workdir}: need ~{need / GiB:.1f} GiB, have {free / GiB:.1f} GiB")


def _side_file(workdir: Path, spec: Spec) -> Path:
    return workdir / (spec.name + ".build.json")


def image_is_built(workdir: Path, spec: Spec) -> bool:
    path, side = workdir / spec.name, _side_file(workdir, spec)
    if not (path.is_file() and side.is_file()):
        return False
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("params") == spec.params() and meta.get("file_size") == path.stat().st_size


def build_image(workdir: Path, spec: Spec) -> dict:
    """Build spec into workdir (via a temporary name), or reuse it; returns its build metadata."""
    path, side = workdir / spec.name, _side_file(workdir, spec)
    if image_is_built(workdir, spec):
        meta = json.loads(side.read_text())
        meta["reused"] = True
        return meta
    tmp = workdir / (".building-" + spec.name)
    tmp.unlink(missing_ok=True)
    side.unlink(missing_ok=True)
    print(f"building {spec.name} ...", flush=True)
    t0 = time.monotonic()
    info: dict = {}
    if spec.kind == "prealloc":
        cmd = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
               f"preallocation=metadata,cluster_size={spec.cluster_size}", str(tmp), str(spec.virtual_size)]
        subprocess.run(cmd, check=True, timeout=RUN_TIMEOUT)
        info["command"] = (f"qemu-img create -f qcow2 -o preallocation=metadata,cluster_size={spec.cluster_size} "
                           f"{spec.name} {spec.virtual_size}")
    elif spec.kind == "fragmented":
        if str(TESTS) not in sys.path:
            sys.path.insert(0, str(TESTS))
        import oracle  # tests/oracle.py: shells out to qemu-img/qemu-io, never imports imgscope
        oracle.require_tools()
        res = oracle.build_fragmented_qcow2(tmp, spec.virtual_size, spec.n_extents,
                                            cluster_size=spec.cluster_size or None)
        info.update({k: v for k, v in res.items() if k not in ("path", "seconds")})
        info["command"] = (f"tests/oracle.py build_fragmented_qcow2(path, {spec.virtual_size}, "
                           f"{spec.n_extents}, cluster_size={spec.cluster_size or None})")
    elif spec.kind == "convert":
        opts = ["-o", spec.options] if spec.options else []
        cmd = [QEMU_IMG, "convert", "-O", spec.fmt, *opts, str(workdir / spec.source), str(tmp)]
        subprocess.run(cmd, check=True, timeout=RUN_TIMEOUT)
        info["command"] = " ".join(["qemu-img convert -O", spec.fmt, *opts, spec.source, spec.name])
    else:
        raise ValueError(spec.kind)
    os.replace(tmp, path)
    st = path.stat()
    meta = {"params": spec.params(), "file_size": st.st_size, "allocated_bytes": st.st_blocks * 512,
            "build_seconds": round(time.monotonic() - t0, 2),
            "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **info}
    side.write_text(json.dumps(meta, indent=2) + "\n")
    meta["reused"] = False
    return meta


# --------------------------------------------------------------------------- running


@dataclass
class RunResult:
    seconds: float
    user: float
    sys: float
    returncode: int
    stderr: str


GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def peak_rss_mib(cmd: list[str], cwd: Path, stdout_path: Path) -> float | None:
    """Peak RSS of one extra (untimed) run, measured by GNU time.

    Not from our own wait4(): a child forked from this (large) Python process
    inherits its RSS high-water mark, so ru_maxrss would never be below ours.
    GNU time is small, so the floor it leaves is ~2 MiB.
    """
    if GNU_TIME is None:
        return None
    rss_file = stdout_path.with_name(stdout_path.name + ".rss")
    with open(stdout_path, "wb") as out:
        proc = subprocess.run([GNU_TIME, "-f", "%M", "-o", str(rss_file), *cmd], stdout=out,
                              stderr=subprocess.DEVNULL, cwd=cwd, timeout=RUN_TIMEOUT, env=CHILD_ENV)
    try:
        return round(int(rss_file.read_text().split()[-1]) / 1024, 1) if proc.returncode == 0 else None
    except (OSError, ValueError, IndexError):
        return None


def timed_run(cmd: list[str], stdout_path: Path, cwd: Path) -> RunResult:
    """Run cmd with stdout to a file; wall clock around fork..reap, plus the child's rusage."""
    err_path = stdout_path.with_name(stdout_path.name + ".stderr")
    with open(stdout_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=CHILD_ENV)
        # blocking wait4 (polling would quantise the short runs); a timer kills runaways
        killer = threading.Timer(RUN_TIMEOUT, proc.kill)
        killer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
            t1 = time.perf_counter()
        finally:
            killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, keep Popen quiet
    if proc.returncode == -9 and t1 - t0 >= RUN_TIMEOUT:
        raise RuntimeError(f"timed out after {RUN_TIMEOUT}s: {' '.join(cmd)}")
    return RunResult(t1 - t0, ru.ru_utime, ru.ru_stime, proc.returncode,
                     err_path.read_text(errors="replace").strip())


def imgscope_cmd() -> list[str]:
    """The real console script next to this interpreter (not a pyenv shim), else python -m."""
    if IMGSCOPE_SRC is not None:
        return [sys.executable, "-m", "imgscope"]
    script = Path(sys.executable).with_name("imgscope")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "imgscope"]


def tool_commands(verb: str, filename: str) -> dict[str, list[str]]:
    args = [verb, "--output=json", "-U", filename]
    return {"qemu-img": [QEMU_IMG, *args], "imgscope": [*imgscope_cmd(), *args]}


def bench_case(workdir: Path, spec: Spec, verb: str, runs: int) -> dict:
    outdir = workdir / "out"
    outdir.mkdir(exist_ok=True)
    cmds = tool_commands(verb, spec.name)   # relative name, cwd = workdir: same "filename" for both
    outs = {t: outdir / f"{spec.name}.{verb}.{t}.json" for t in cmds}
    results: dict[str, list[RunResult]] = {t: [] for t in cmds}
    # warm-up (also fills the page cache), then alternate
    for t, cmd in cmds.items():
        r = timed_run(cmd, outs[t], workdir)
        if r.returncode != 0:
            raise RuntimeError(f"{t} {verb} {spec.name} failed (exit {r.returncode}): {r.stderr}")
    for _ in range(runs):
        for t, cmd in cmds.items():
            r = timed_run(cmd, outs[t], workdir)
            if r.returncode != 0:
                raise RuntimeError(f"{t} {verb} {spec.name} failed (exit {r.returncode}): {r.stderr}")
            results[t].append(r)
    agree = compare_outputs(verb, outs["qemu-img"], outs["imgscope"])
    best = {t: min(rs, key=lambda r: r.seconds) for t, rs in results.items()}
    return {
        "image": spec.name, "verb": verb,
        "commands": {t: " ".join(c) for t, c in cmds.items()},
        "runs": {t: [round(r.seconds, 4) for r in rs] for t, rs in results.items()},
        "best": {t: round(r.seconds, 4) for t, r in best.items()},
        "median": {t: round(statistics.median(r.seconds for r in rs), 4) for t, rs in results.items()},
        "cpu_best": {t: round(r.user + r.sys, 4) for t, r in best.items()},
        "maxrss_mib": {t: peak_rss_mib(cmds[t], workdir, outs[t].with_name(outs[t].name + ".rssrun"))
                       for t in cmds},
        "output_bytes": {t: outs[t].stat().st_size for t in outs},
        "ratio": round(best["imgscope"].seconds / best["qemu-img"].seconds, 2),
        "compare": agree,
    }


# --------------------------------------------------------------------------- comparing


def _json_diff(a, b, path: str = "$", out: list | None = None, limit: int = 20) -> list[str]:
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in b:
                out.append(f"{path}.{k}: only in qemu-img ({a[k]!r})")
            elif k not in a:
                out.append(f"{path}.{k}: only in imgscope ({b[k]!r})")
            else:
                _json_diff(a[k], b[k], f"{path}.{k}", out, limit)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} (qemu-img) != {len(b)} (imgscope)")
        for i, (x, y) in enumerate(zip(a, b)):
            if len(out) >= limit:
                break
            _json_diff(x, y, f"{path}[{i}]", out, limit)
    elif a != b or type(a) is not type(b):
        out.append(f"{path}: qemu-img {a!r} != imgscope {b!r}")
    return out


def compare_outputs(verb: str, qemu_path: Path, imgscope_path: Path) -> dict:
    qraw, iraw = qemu_path.read_bytes(), imgscope_path.read_bytes()
    res: dict = {"bytes_identical": qraw == iraw}
    try:
        q, i = json.loads(qraw), json.loads(iraw)
    except ValueError as exc:
        res.update(equal=False, differences=[f"JSON parse error: {exc}"])
        return res
    res["equal"] = q == i
    if verb == "map":
        res["entries"] = {"qemu-img": len(q), "imgscope": len(i) if isinstance(i, list) else None}
        res["data_entries"] = sum(1 for e in q if e.get("data"))
        if not res["equal"] and isinstance(i, list):
            res["differing_entries"] = sum(1 for x, y in zip(q, i) if x != y) + abs(len(q) - len(i))
    res["differences"] = [] if res["equal"] else _json_diff(q, i)
    return res


# --------------------------------------------------------------------------- start-up, imports, profiles


def bench_startup(workdir: Path, runs: int) -> list[dict]:
    outdir = workdir / "out"
    outdir.mkdir(exist_ok=True)
    cases = [
        ("qemu-img --version", [QEMU_IMG, "--version"]),
        ("imgscope --version (console script)", [*imgscope_cmd(), "--version"]),
        ("python -m imgscope --version", [sys.executable, "-m", "imgscope", "--version"]),
        ("python -c pass (interpreter floor)", [sys.executable, "-c", "pass"]),
        ("python -c 'import imgscope.cli'", [sys.executable, "-c", "import imgscope.cli"]),
    ]
    rows = []
    for label, cmd in cases:
        timed_run(cmd, outdir / "startup.out", workdir)
        rs = [timed_run(cmd, outdir / "startup.out", workdir) for _ in range(runs)]
        rows.append({"label": label, "command": " ".join(cmd),
                     "best": round(min(r.seconds for r in rs), 4),
                     "median": round(statistics.median(r.seconds for r in rs), 4),
                     "maxrss_mib": peak_rss_mib(cmd, workdir, outdir / "startup.out")})
    return rows


def parse_importtime(text: str) -> list[tuple[int, int, int, str]]:
    """(depth, self_us, cumulative_us, module) per line of -X importtime output."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3:
            continue
        self_us, cum_us, name = parts
        if not (self_us.strip().isdigit() and cum_us.strip().isdigit()):
            continue
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((depth, int(self_us), int(cum_us), name.strip()))
    return rows


def summarize_importtime(rows) -> dict:
    """Total, and the time attributable to each top-level package.

    A package is charged the cumulative time of every import of it made from a
    different package (so numpy's time counts once, where it was first pulled in;
    its own dependencies loaded at that moment are included).
    """
    # importtime prints children before their parent; rebuild parents with a stack
    parent_of: dict[int, int] = {}
    stack: list[int] = []
    for idx in range(len(rows) - 1, -1, -1):
        depth = rows[idx][0]
        while stack and rows[stack[-1]][0] >= depth:
            stack.pop()
        parent_of[idx] = stack[-1] if stack else -1
        stack.append(idx)
    per_pkg: dict[str, int] = {}
    self_pkg: dict[str, int] = {}
    for idx, (depth, self_us, cum, name) in enumerate(rows):
        root = name.split(".")[0]
        self_pkg[root] = self_pkg.get(root, 0) + self_us
        p = parent_of[idx]
        if p == -1 or rows[p][3].split(".")[0] != root:
            per_pkg[root] = per_pkg.get(root, 0) + cum
    total = sum(r[2] for r in rows if r[0] == 0)
    top_level = sorted(((r[2], r[3]) for r in rows if r[0] == 0), reverse=True)[:10]
    slow_self = sorted(((r[1], r[3]) for r in rows), reverse=True)[:10]
    return {"total_ms": round(total / 1000, 1),
            "by_package_ms": {k: round(v / 1000, 1) for k, v in
                              sorted(per_pkg.items(), key=lambda kv: -kv[1])[:15]},
            "self_by_package_ms": {k: round(v / 1000, 1) for k, v in
                                   sorted(self_pkg.items(), key=lambda kv: -kv[1])[:15]},
            "top_level_ms": [(n, round(c / 1000, 1)) for c, n in top_level],
            "slowest_self_ms": [(n, round(s / 1000, 1)) for s, n in slow_self]}


def bench_imports(workdir: Path, spec: Spec) -> dict:
    out = {}
    for verb in ("info", "map", "--version"):
        args = ["--version"] if verb == "--version" else [verb, "--output=json", "-U", spec.name]
        cmd = [sys.executable, "-X", "importtime", "-m", "imgscope", *args]
        subprocess.run(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=RUN_TIMEOUT, env=CHILD_ENV)   # fill the bytecode cache first
        proc = subprocess.run(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=RUN_TIMEOUT, env=CHILD_ENV)
        (workdir / "out" / f"importtime-{verb.strip('-')}.txt").write_text(proc.stderr)
        out[verb] = summarize_importtime(parse_importtime(proc.stderr))
        out[verb]["command"] = " ".join(["python", *cmd[1:]])
    return out


def profile_case(workdir: Path, spec: Spec, verb: str, top: int = 25) -> dict:
    profdir = workdir / "prof"
    profdir.mkdir(exist_ok=True)
    prof = profdir / f"{spec.name}.{verb}.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "imgscope", verb, "--output=json", "-U",
           spec.name]
    subprocess.run(cmd, cwd=workdir, stdout=subprocess.DEVNULL, check=True, timeout=RUN_TIMEOUT, env=CHILD_ENV)
    st = pstats.Stats(str(prof))
    st.sort_stats("cumulative")
    rows = []
    for (fn, line, func), (cc, nc, tt, ct, _callers) in sorted(st.stats.items(), key=lambda kv: -kv[1][3]):
        rows.append({"function": func, "where": f"{_short(fn)}:{line}", "calls": nc,
                     "tottime": round(tt, 4), "cumtime": round(ct, 4)})
    by_tottime = sorted(rows, key=lambda r: -r["tottime"])[:top]
    return {"command": "python -m cProfile -o " + str(prof.relative_to(workdir)) + " -m imgscope "
            + f"{verb} --output=json -U {spec.name}",
            "total": round(st.total_tt, 4), "by_cumtime": rows[:top], "by_tottime": by_tottime}


def _short(fn: str) -> str:
    for root in (*([str(IMGSCOPE_SRC) + "/"] if IMGSCOPE_SRC else []), str(REPO) + "/", sys.prefix + "/lib/python3.11/site-packages/", sys.prefix + "/lib/python3.11/"):
        if fn.startswith(root):
            return fn[len(root):]
    return fn


# --------------------------------------------------------------------------- machine facts


def machine_facts(workdir: Path) -> dict:
    def sh(*cmd, strip=True):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO).stdout
        except OSError:
            return ""
        return out.strip() if strip else out
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    versions = {}
    for mod in ("numpy", "pandas"):
        try:
            from importlib.metadata import version
            versions[mod] = version(mod)
        except Exception:  # noqa: BLE001 - informational only
            versions[mod] = "?"
    try:
        from importlib.metadata import version
        versions["imgscope"] = version("imgscope")
    except Exception:  # noqa: BLE001
        versions["imgscope"] = "?"
    dirty = sh("git", "status", "--porcelain", "--", "imgscope", strip=False)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "nproc": sh("nproc") or str(os.cpu_count()),
        "cpu_model": cpu,
        "ram": mem,
        "python": sys.version.split()[0] + f" ({sys.executable})",
        "qemu_img": (sh(QEMU_IMG, "--version").splitlines() or ["?"])[0],
        "numpy": versions["numpy"], "pandas": versions["pandas"], "imgscope": versions["imgscope"],
        "loadavg_at_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "git_head": sh("git", "rev-parse", "--short", "HEAD"),
        "imgscope_source": str(IMGSCOPE_SRC) if IMGSCOPE_SRC else "installed (editable: this repository)",
        "imgscope_tree": ("dirty: " + ", ".join(l[3:] for l in dirty.splitlines() if l.strip())) if dirty else "clean",
        "workdir_fs": df_report(workdir).splitlines()[-1] if df_report(workdir) else "",
        "imgscope_command": " ".join(imgscope_cmd()),
    }


# --------------------------------------------------------------------------- report


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=HERE / "work",
                    help="where images and outputs live (default benchmarks/work/, git-ignored)")
    ap.add_argument("--quick", action="store_true", help="small images (64 GiB prealloc, 10^4 extents)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per tool after one warm-up (default 3)")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile imgscope on every case where it is slower than qemu-img")
    ap.add_argument("--no-imports", action="store_true", help="skip the -X importtime analysis")
    ap.add_argument("--env-as-is", action="store_true",
                    help="run the tools with this environment unchanged (by default bytecode caching is "
                         "enabled via PYTHONPYCACHEPREFIX=WORKDIR/pycache, see child_env())")
    ap.add_argument("--imgscope-src", type=Path, metavar="DIR",
                    help="run imgscope from this source tree (the directory holding imgscope/, e.g. a "
                         "'git archive COMMIT imgscope | tar -x -C DIR' snapshot) instead of the installed one")
    args = ap.parse_args(argv)

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    specs = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"

    global CHILD_ENV, IMGSCOPE_SRC
    if args.imgscope_src is not None:
        IMGSCOPE_SRC = args.imgscope_src.resolve()
        if not (IMGSCOPE_SRC / "imgscope" / "__init__.py").is_file():
            ap.error(f"--imgscope-src {IMGSCOPE_SRC}: no imgscope/__init__.py there")
    CHILD_ENV = child_env(workdir, args.env_as_is)
    facts = machine_facts(workdir)
    facts["bytecode_cache"] = ("as in the calling environment (PYTHONDONTWRITEBYTECODE="
                               f"{os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r})" if CHILD_ENV is None
                               else f"on, PYTHONPYCACHEPREFIX={CHILD_ENV['PYTHONPYCACHEPREFIX']}")
    print(f"# imgscope vs qemu-img: info/map benchmark ({mode})\n")
    print("## Machine\n")
    for k, v in facts.items():
        print(f"- {k}: {v}")
    print(f"- command: python {' '.join([os.path.relpath(__file__, REPO), *(argv if argv is not None else sys.argv[1:])])}")
    print(f"- method: each tool as a whole subprocess, stdout to a file, wall clock fork..reap; "
          f"1 warm-up each, then {args.runs} runs alternating qemu-img/imgscope; best (min) shown; "
          "peak RSS from one extra run under GNU time\n")

    check_space(workdir, specs)
    images = {}
    print("## Images\n")
    for spec in specs:
        meta = build_image(workdir, spec)
        images[spec.name] = meta
        print(f"- {spec.name}: {'reused' if meta['reused'] else 'built in %.1f s' % meta['build_seconds']}; "
              f"apparent {meta['file_size'] / GiB:.2f} GiB, allocated {meta['allocated_bytes'] / MiB:.0f} MiB; "
              f"{meta.get('command', '')}")
    print()

    cases, failed = [], []
    for spec in specs:
        for verb in ("info", "map"):
            print(f"timing {verb} on {spec.name} ...", file=sys.stderr, flush=True)
            try:
                cases.append(bench_case(workdir, spec, verb, args.runs))
            except RuntimeError as exc:   # e.g. a tool failing on the image: report, go on
                print(f"  FAILED: {exc}", file=sys.stderr)
                failed.append({"image": spec.name, "verb": verb, "error": str(exc)})

    print("## Results (seconds, best of %d; ratio = imgscope / qemu-img)\n" % args.runs)
    print_table(["image", "verb", "qemu-img s", "imgscope s", "ratio", "qemu-img RSS MiB",
                 "imgscope RSS MiB", "outputs agree"],
                [[c["image"], c["verb"], f'{c["best"]["qemu-img"]:.4f}', f'{c["best"]["imgscope"]:.4f}',
                  f'{c["ratio"]:.2f}', c["maxrss_mib"]["qemu-img"], c["maxrss_mib"]["imgscope"],
                  ("yes (byte-identical)" if c["compare"]["bytes_identical"] else "yes (JSON equal)")
                  if c["compare"]["equal"] else "NO"] for c in cases])
    for f in failed:
        print(f'- {f["image"]} {f["verb"]}: FAILED: {f["error"]}')
    print("All runs (s):")
    for c in cases:
        extra = ""
        if c["verb"] == "map":
            extra = f'  map entries {c["compare"]["entries"]}, data entries {c["compare"]["data_entries"]}'
        print(f'- {c["image"]} {c["verb"]}: qemu-img {c["runs"]["qemu-img"]}, imgscope {c["runs"]["imgscope"]}; '
              f'cpu(best) qemu-img {c["cpu_best"]["qemu-img"]} imgscope {c["cpu_best"]["imgscope"]}{extra}')
    print()
    mismatches = [c for c in cases if not c["compare"]["equal"]]
    if mismatches:
        print("## Output mismatches\n")
        for c in mismatches:
            print(f'- {c["image"]} {c["verb"]}: ' + (f'{c["compare"].get("differing_entries")} differing entries; '
                                                    if c["verb"] == "map" else ""))
            for d in c["compare"]["differences"]:
                print(f"    {d}")
        print()
    else:
        print("All outputs agree (parsed JSON equal)" + (" in the cases that ran" if failed else "") + ".\n")

    startup = bench_startup(workdir, max(args.runs, 5))
    print(f"## Start-up (best of {max(args.runs, 5)} after a warm-up)\n")
    print_table(["command", "best s", "median s", "RSS MiB"],
                [[r["label"], f'{r["best"]:.4f}', f'{r["median"]:.4f}', r["maxrss_mib"]] for r in startup])

    imports = None
    if not args.no_imports:
        imports = bench_imports(workdir, specs[-1])
        print("## Import time (python -X importtime -m imgscope ...)\n")
        print("cumulative = time of each import of the package made from another package, "
              "including whatever it pulled in; self = its own modules only\n")
        for verb, s in imports.items():
            pk = ", ".join(f"{k} {v}" for k, v in list(s["by_package_ms"].items())[:8])
            sp = ", ".join(f"{k} {v}" for k, v in list(s["self_by_package_ms"].items())[:8])
            print(f"- {verb}: total {s['total_ms']} ms\n  - cumulative by package (ms): {pk}\n"
                  f"  - self by package (ms): {sp}")
        print()

    profiles = {}
    if args.profile:
        slow = [c for c in cases if c["ratio"] > 1.0]
        byname = {s.name: s for s in specs}
        for c in slow:
            p = profile_case(workdir, byname[c["image"]], c["verb"])
            profiles[f'{c["image"]} {c["verb"]}'] = p
            print(f'## Profile: imgscope {c["verb"]} {c["image"]} (cProfile, top by cumulative)\n')
            print(f'`{p["command"]}`\n')
            print_table(["function", "file:line", "calls", "tottime s", "cumtime s"],
                        [[r["function"], r["where"], r["calls"], r["tottime"], r["cumtime"]]
                         for r in p["by_cumtime"][:20]])
            print("top by own time:")
            print_table(["function", "file:line", "calls", "tottime s", "cumtime s"],
                        [[r["function"], r["where"], r["calls"], r["tottime"], r["cumtime"]]
                         for r in p["by_tottime"][:12]])

    facts["loadavg_at_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"load average at start {facts['loadavg_at_start']}, at end {facts['loadavg_at_end']} "
          f"({facts['nproc']} CPUs)")
    result_path = workdir / f"results-{mode}.json"
    result_path.write_text(json.dumps({"mode": mode, "machine": facts, "images": images, "cases": cases,
                                       "failed": failed,
                                       "startup": startup, "imports": imports, "profiles": profiles},
                                      indent=2, default=str) + "\n")
    print(f"raw results: {result_path}")
    return 1 if mismatches or failed else 0


if __name__ == "__main__":
    sys.exit(main())
