#!/usr/bin/env python3
"""Time ``imgscope convert`` against ``qemu-img convert`` on the same inputs, in one run.

    python benchmarks/bench_convert.py [--workdir DIR] [--quick] [--profile CASE]

Inputs (built once, reused while their ``*.build.json`` side file matches):

* ``holes-4g.raw``: 4 GiB raw, every other MiB data (half random, half low-entropy
  bytes), the rest holes: 50% holes.
* ``frag-8g.qcow2``: 8 GiB qcow2 with 1.5 GiB of data in 3000 extents of 64 KiB..1 MiB
  scattered over the disk (``qemu-img convert`` of a sparse raw, then 2000 single
  clusters rewritten by qemu-io in reverse guest order, so host order is scrambled).

Cases: raw->qcow2, qcow2->raw, qcow2->vmdk streamOptimized and qcow2->vdi (when
imgscope has those writers), and ``-c`` to qcow2.  Both tools run as whole
processes on a warm page cache, alternating, best of ``--runs`` (default 1), with
``sync`` before each run so one tool's writeback does not slow the other; outputs are checked with
``qemu-img compare`` and deleted after each case.  ``--quick`` uses 1/8 sizes.
Nothing here is a test; results go to stdout and ``WORKDIR/convert-results.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MiB, GiB = 1 << 20, 1 << 30


def run(*args, cwd=None) -> float:
    t = time.perf_counter()
    subprocess.run([str(a) for a in args], check=True, cwd=cwd,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def _fresh(path: Path, params: dict) -> bool:
    side = path.with_suffix(path.suffix + ".build.json")
    return path.exists() and side.exists() and json.loads(side.read_text()) == params


def _done(path: Path, params: dict) -> None:
    path.with_suffix(path.suffix + ".build.json").write_text(json.dumps(params))


def _chunk(rng, n: int) -> bytes:
    half = n // 2
    return (rng.integers(0, 256, half, dtype=np.uint8).tobytes()
            + rng.integers(0, 4, n - half, dtype=np.uint8).tobytes())


def build_holes_raw(path: Path, size: int) -> None:
    params = {"size": size, "v": 1}
    if _fresh(path, params):
        return
    rng = np.random.default_rng(1)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 2 * MiB):
            f.seek(off)
            f.write(_chunk(rng, MiB))
    _done(path, params)


def build_frag_qcow2(path: Path, size: int, data: int) -> None:
    params = {"size": size, "data": data, "v": 1}
    if _fresh(path, params):
        return
    rng = np.random.default_rng(2)
    raw = path.with_suffix(".src.raw")
    n = min(3000, size // MiB // 4)
    lengths = rng.integers(1, 17, n) * 64 * 1024
    lengths = (lengths * (data / lengths.sum())).astype(np.int64) // 65536 * 65536
    slots = np.sort(rng.choice(size // MiB // 2, n, replace=False)) * 2 * MiB
    with open(raw, "wb") as f:
        f.truncate(size)
        for off, length in zip(slots.tolist(), lengths.tolist()):
            f.seek(off)
            f.write(_chunk(rng, max(length, 65536)))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
    raw.unlink()
    # rewrite single clusters in reverse guest order: they land at the end of the file
    cmds = "\n".join(f"write -P {0x40 + i % 64} {int(off) + (1 << 16)} 64k"
                     for i, off in enumerate(slots[::-1][:2 * n // 3]))
    subprocess.run(["qemu-io", "-f", "qcow2", "-t", "unsafe", str(path)], input=cmds,
                   text=True, check=True, stdout=subprocess.DEVNULL)
    _done(path, params)


def has_writer(fmt: str) -> bool:
    from imgscope.conversion.writers import writer_class
    try:
        writer_class(fmt)
        return True
    except Exception:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=str(ROOT / "benchmarks" / "work"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", metavar="CASE", help="profile imgscope on one case")
    ap.add_argument("--runs", type=int, default=1, help="best of N, tools alternating")
    ap.add_argument("--only", metavar="CASE", action="append", help="run only these cases")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    scale = 8 if args.quick else 1
    raw = work / ("holes-512m.raw" if args.quick else "holes-4g.raw")
    q = work / ("frag-1g.qcow2" if args.quick else "frag-8g.qcow2")
    t = time.perf_counter()
    build_holes_raw(raw, 4 * GiB // scale)
    build_frag_qcow2(q, 8 * GiB // scale, 3 * GiB // 2 // scale)
    print(f"inputs ready in {time.perf_counter() - t:.1f} s")

    cases = [("raw->qcow2", raw, "raw", "qcow2", [], False),
             ("qcow2->raw", q, "qcow2", "raw", [], False)]
    if has_writer("vmdk"):
        cases.append(("qcow2->vmdk stream", q, "qcow2", "vmdk",
                      ["-o", "subformat=streamOptimized"], False))
    if has_writer("vdi"):
        cases.append(("qcow2->vdi", q, "qcow2", "vdi", [], False))
    cases.append(("qcow2 -c ->qcow2", q, "qcow2", "qcow2", [], True))
    imgscope = [sys.executable, "-m", "imgscope", "convert"]
    results = []
    for name, src, ifmt, ofmt, opts, comp in cases:
        if (args.profile and args.profile != name) or (args.only and name not in args.only):
            continue
        outs = {tool: work / f"out-{tool}.{ofmt}" for tool in ("qemu", "imgscope")}
        for p in outs.values():
            p.unlink(missing_ok=True)
        c = ["-c"] if comp else []
        cmd_q = ["qemu-img", "convert", "-f", ifmt, "-O", ofmt, *opts, *c, src, outs["qemu"]]
        cmd_i = [*imgscope, "-f", ifmt, "-O", ofmt, *opts, *c, src, outs["imgscope"]]
        if args.profile:
            cmd_i = [sys.executable, "-m", "cProfile", "-s", "cumtime", "-m", "imgscope",
                     "convert", *cmd_i[4:]]
            out = subprocess.run([str(a) for a in cmd_i], capture_output=True, text=True)
            print("\n".join(out.stdout.splitlines()[:45]))
            for p in outs.values():
                p.unlink(missing_ok=True)
            return 0
        tq = ti = float("inf")
        for k in range(args.runs):          # alternate, best of N, writeback settled
            for tool in (("qemu", "imgscope") if k % 2 == 0 else ("imgscope", "qemu")):
                outs[tool].unlink(missing_ok=True)
                os.sync()
                if tool == "qemu":
                    tq = min(tq, run(*cmd_q))
                else:
                    ti = min(ti, run(*cmd_i))
        same = subprocess.run(["qemu-img", "compare", "-f", ofmt, "-F", ofmt, outs["qemu"],
                               outs["imgscope"]], capture_output=True).returncode == 0
        sizes = {k: os.stat(p).st_blocks * 512 for k, p in outs.items()}
        row = {"case": name, "qemu_s": round(tq, 3), "imgscope_s": round(ti, 3),
               "ratio": round(ti / tq, 2), "identical": same,
               "qemu_actual_mib": round(sizes["qemu"] / MiB, 1),
               "imgscope_actual_mib": round(sizes["imgscope"] / MiB, 1)}
        results.append(row)
        print(f"{name:20s} qemu-img {tq:7.2f} s  imgscope {ti:7.2f} s  ratio {ti / tq:5.2f}  "
              f"identical {same}  actual {row['qemu_actual_mib']} / "
              f"{row['imgscope_actual_mib']} MiB", flush=True)
        for p in outs.values():
            p.unlink(missing_ok=True)
    (work / "convert-results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
