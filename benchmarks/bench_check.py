#!/usr/bin/env python3
"""Time ``imgscope check`` against ``qemu-img check`` on the same large qcow2 image.

    python benchmarks/bench_check.py [--workdir DIR] [--quick] [--runs N] [--profile] [--no-write]

Builds (or reuses) one image in the work directory (default ``benchmarks/work/``,
git-ignored) with more than 10^6 clusters whose every cluster is referenced
three times (the active L1 and two internal snapshots), then runs
``qemu-img check --output=json -U`` and ``imgscope check --output=json -U`` on it
as whole subprocesses, alternately, after one warm-up each (page cache warm),
and keeps the best wall-clock time of ``--runs`` runs.  The outputs must agree:
imgscope's JSON without its ``findings`` key must be qemu-img's text exactly.
It then times the stages of imgscope's check in-process (open, the parse the
checker does first, the qcow2 rules), prints the ratio and, unless
``--no-write``, adds a dated block at the top of ``benchmarks/RESULTS.md``.

Images (full run / ``--quick``):

* ``check-prealloc-1t-snap2.qcow2`` / ``check-prealloc-64g-snap2.qcow2``:
  ``qemu-img create -f qcow2 -o preallocation=metadata,cluster_size=65536 FILE 1T``
  (16 777 216 clusters; quick: 64G, 1 048 576), then ``qemu-img snapshot -c s1`` and
  ``-c s2`` (every L2 table and data cluster gets refcount 3), then
  ``qemu-io -c 'write -P 0x5a 0 64k'`` (one cluster and its L2 table copied, so the
  active tables differ from the snapshots' and COPIED flags vary).

An image is reused when it and its ``*.build.json`` side file are present with the
same parameters (the helpers of bench_map_info.py).  Nothing here is a test:
timings depend on the machine and never go into tests/.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_map_info as bm  # noqa: E402  (timing, RSS, machine facts, image side files)

REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"
KiB, MiB, GiB, TiB = bm.KiB, bm.MiB, bm.GiB, bm.TiB
QEMU_IMG = bm.QEMU_IMG
QEMU_IO = os.environ.get("IMGSCOPE_QEMU_IO") or shutil.which("qemu-io") or "/usr/bin/qemu-io"
CURRENT = "## Current figures (latest first)"


@dataclass(frozen=True)
class CheckSpec:
    name: str
    virtual_size: int
    cluster_size: int = 64 * KiB
    snapshots: int = 2
    write_after: str = "write -P 0x5a 0 64k"

    def params(self) -> dict:
        return asdict(self)

    @property
    def clusters(self) -> int:
        return self.virtual_size // self.cluster_size


FULL = CheckSpec("check-prealloc-1t-snap2.qcow2", 1 * TiB)
QUICK = CheckSpec("check-prealloc-64g-snap2.qcow2", 64 * GiB)


def build(workdir: Path, spec: CheckSpec) -> dict:
    """Build the image (under a temporary name) or reuse it; returns its build metadata."""
    path, side = workdir / spec.name, workdir / (spec.name + ".build.json")
    if bm.image_is_built(workdir, spec):
        meta = json.loads(side.read_text())
        meta["reused"] = True
        return meta
    need = spec.clusters * 10 * 2 + 64 * MiB      # L2 entries + refcounts, twice (snapshot COW)
    if need > shutil.disk_usage(workdir).free * 0.9:
        sys.exit(f"not enough free space in {workdir}: need ~{need / GiB:.1f} GiB allocated")
    tmp = workdir / (".building-" + spec.name)
    tmp.unlink(missing_ok=True)
    side.unlink(missing_ok=True)
    print(f"building {spec.name} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    commands = [[QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
                 f"preallocation=metadata,cluster_size={spec.cluster_size}", tmp.name,
                 str(spec.virtual_size)]]
    commands += [[QEMU_IMG, "snapshot", "-c", f"s{i + 1}", tmp.name] for i in range(spec.snapshots)]
    if spec.write_after:
        commands.append([QEMU_IO, "-f", "qcow2", "-c", spec.write_after, tmp.name])
    for cmd in commands:
        subprocess.run(cmd, check=True, cwd=workdir, stdout=subprocess.DEVNULL,
                       timeout=bm.RUN_TIMEOUT)
    os.replace(tmp, path)
    st = path.stat()
    meta = {"params": spec.params(), "file_size": st.st_size, "allocated_bytes": st.st_blocks * 512,
            "build_seconds": round(time.monotonic() - t0, 2),
            "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commands": [" ".join(c).replace(tmp.name, spec.name).replace(QEMU_IMG, "qemu-img")
                         .replace(QEMU_IO, "qemu-io") for c in commands]}
    side.write_text(json.dumps(meta, indent=2) + "\n")
    meta["reused"] = False
    return meta


# --------------------------------------------------------------------------- timing


def commands(name: str) -> dict[str, list[str]]:
    args = ["check", "--output=json", "-U", name]
    return {"qemu-img": [QEMU_IMG, *args], "imgscope": [*bm.imgscope_cmd(), *args]}


def compare(qemu_path: Path, imgscope_path: Path) -> dict:
    """imgscope's JSON without `findings` must print as qemu-img's text."""
    qtext = qemu_path.read_text()
    try:
        q, mine = json.loads(qtext), json.loads(imgscope_path.read_text())
    except ValueError as exc:
        return {"equal": False, "identical_text": False, "differences": [f"JSON: {exc}"]}
    findings = mine.pop("findings", [])
    return {"equal": q == mine, "identical_text": json.dumps(mine, indent=4) == qtext.rstrip("\n"),
            "findings": [f["code"] for f in findings],
            "differences": [] if q == mine else bm._json_diff(q, mine)}


def time_both(workdir: Path, spec: CheckSpec, runs: int) -> dict:
    outdir = workdir / "out"
    outdir.mkdir(exist_ok=True)
    cmds = commands(spec.name)
    outs = {t: outdir / f"{spec.name}.check.{t}.json" for t in cmds}
    results: dict[str, list] = {t: [] for t in cmds}
    for round_ in range(runs + 1):                  # round 0 is the warm-up
        for tool, cmd in cmds.items():
            r = bm.timed_run(cmd, outs[tool], workdir)
            if r.returncode != 0:
                raise RuntimeError(f"{tool} check {spec.name} exited {r.returncode}: {r.stderr}")
            if round_:
                results[tool].append(r)
    best = {t: min(rs, key=lambda r: r.seconds) for t, rs in results.items()}
    return {
        "image": spec.name, "commands": {t: " ".join(c) for t, c in cmds.items()},
        "runs": {t: [round(r.seconds, 4) for r in rs] for t, rs in results.items()},
        "best": {t: round(r.seconds, 4) for t, r in best.items()},
        "cpu_best": {t: round(r.user + r.sys, 4) for t, r in best.items()},
        "maxrss_mib": {t: bm.peak_rss_mib(cmds[t], workdir,
                                          outs[t].with_name(outs[t].name + ".rss"))
                       for t in cmds},
        "ratio": round(best["imgscope"].seconds / best["qemu-img"].seconds, 2),
        "compare": compare(outs["qemu-img"], outs["imgscope"]),
    }


def stages(workdir: Path, spec: CheckSpec, runs: int) -> dict:
    """Seconds of each stage of imgscope's check, in this process (best of `runs`; the
    installed imgscope, whatever --imgscope-src says)."""
    import imgscope
    from imgscope.analysis import check as engine
    from imgscope.analysis.rules import qcow2 as rules
    best: dict[str, float] = {}
    for _ in range(runs):
        t = [time.perf_counter()]
        image = imgscope.open(workdir / spec.name)
        t.append(time.perf_counter())
        image.extent_table()
        t.append(time.perf_counter())
        image._own_extents()
        image.regions()
        t.append(time.perf_counter())
        ctx = engine.CheckContext(image, engine.CheckCounts(), rules=rules)
        rules.check(ctx)
        t.append(time.perf_counter())
        image.close()
        for name, a, b in (("open", 0, 1), ("extent_table", 1, 2), ("regions", 2, 3),
                           ("qcow2 rules", 3, 4)):
            best[name] = round(min(best.get(name, 1e9), t[b] - t[a]), 4)
    return best


# --------------------------------------------------------------------------- RESULTS.md


def results_block(facts: dict, spec: CheckSpec, meta: dict, case: dict, stage: dict,
                  runs: int, command: str) -> str:
    c = case
    agree = ("yes, byte-identical apart from `findings`" if c["compare"]["identical_text"]
             else "yes (JSON equal)" if c["compare"]["equal"] else "**NO**")
    date = facts["date"][:16].replace("T", " ") + " UTC"
    lines = [
        f"**{date}, git {facts['git_head']}** — `imgscope check` against `qemu-img check` "
        "(benchmarks/bench_check.py)",
        "",
        f"Machine: {facts['nproc']} CPUs ({facts['cpu_model'] or 'unknown model'}), "
        f"{facts['ram']}, "
        f"kernel {facts['kernel']}, Python {facts['python'].split()[0]}, numpy {facts['numpy']}, "
        f"{facts['qemu_img']}; load {facts['loadavg_at_start']} at start, "
        f"{facts.get('loadavg_at_end', '?')} at end.",
        f"Command: `{command}` (best of {runs} after a warm-up, whole processes, alternating, "
        "warm page cache).",
        f"Image: `{spec.name}` — {'; '.join(meta.get('commands', []))}; "
        f"{spec.clusters} clusters, every one referenced 3 times; apparent "
        f"{meta['file_size'] / GiB:.1f} GiB, allocated {meta['allocated_bytes'] / MiB:.0f} MiB.",
        "",
        "| tool | command | best s | CPU s | peak RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for tool in ("qemu-img", "imgscope"):
        argv = c["commands"][tool].split()
        shown = " ".join([tool, *argv[argv.index("check"):]])
        lines.append(f"| {tool} | `{shown}` | "
                     f"{c['best'][tool]:.3f} | {c['cpu_best'][tool]:.3f} | "
                     f"{c['maxrss_mib'][tool]} |")
    lines += [
        "",
        f"Ratio imgscope / qemu-img: **{c['ratio']:.2f}**. Outputs agree: {agree}"
        + (f" (imgscope's findings: {', '.join(sorted(set(c['compare']['findings'])))})"
           if c["compare"].get("findings") else "") + ".",
        "In-process stages of imgscope's check (best of 3): "
        + ", ".join(f"{k} {v:.3f} s" for k, v in stage.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def write_results(block: str) -> None:
    text = RESULTS.read_text()
    if CURRENT not in text:
        raise SystemExit(f"{RESULTS}: no '{CURRENT}' heading to add the figures under")
    head, tail = text.split(CURRENT, 1)
    RESULTS.write_text(head + CURRENT + "\n\n" + block + "\n" + tail.lstrip("\n"))


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=HERE / "work",
                    help="where the image and outputs live (default benchmarks/work/, git-ignored)")
    ap.add_argument("--quick", action="store_true", help="64 GiB instead of 1 TiB")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per tool after a warm-up")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile imgscope's check when it is slower than qemu-img's")
    ap.add_argument("--no-write", action="store_true", help="do not add the figures to RESULTS.md")
    ap.add_argument("--env-as-is", action="store_true",
                    help="run the tools with this environment unchanged (default: bytecode caching "
                         "on, see bench_map_info.child_env())")
    ap.add_argument("--imgscope-src", type=Path, metavar="DIR",
                    help="run imgscope from this source tree instead of the installed one")
    args = ap.parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    spec = QUICK if args.quick else FULL
    if args.imgscope_src is not None:
        bm.IMGSCOPE_SRC = args.imgscope_src.resolve()
    bm.CHILD_ENV = bm.child_env(workdir, args.env_as_is)
    facts = bm.machine_facts(workdir)
    command = "python " + " ".join([os.path.relpath(__file__, REPO),
                                    *(argv if argv is not None else sys.argv[1:])])

    meta = build(workdir, spec)
    print(f"# imgscope check vs qemu-img check ({'quick' if args.quick else 'full'})\n")
    for k, v in facts.items():
        print(f"- {k}: {v}")
    how = "reused" if meta["reused"] else f"built in {meta['build_seconds']:.1f} s"
    print(f"- image: {spec.name}: {how}, apparent {meta['file_size'] / GiB:.1f} GiB, "
          f"allocated {meta['allocated_bytes'] / MiB:.0f} MiB\n")
    case = time_both(workdir, spec, args.runs)
    stage = stages(workdir, spec, 3)
    facts["loadavg_at_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    bm.print_table(["tool", "best s", "cpu s", "RSS MiB", "runs"],
                   [[t, f"{case['best'][t]:.4f}", f"{case['cpu_best'][t]:.4f}",
                     case["maxrss_mib"][t], case["runs"][t]] for t in ("qemu-img", "imgscope")])
    print(f"\nratio imgscope / qemu-img: {case['ratio']:.2f}")
    print(f"outputs agree: {case['compare']['equal']} (text identical apart from findings: "
          f"{case['compare']['identical_text']}); findings: {case['compare'].get('findings')}")
    for d in case["compare"]["differences"]:
        print(f"    {d}")
    print("stages (in-process, s): " + ", ".join(f"{k} {v}" for k, v in stage.items()))
    profile = None
    if args.profile and case["ratio"] > 1.0:
        profile = bm.profile_case(workdir, spec, "check")
        print(f"\n## Profile ({profile['command']}), top by own time\n")
        bm.print_table(["function", "file:line", "calls", "tottime s", "cumtime s"],
                       [[r["function"], r["where"], r["calls"], r["tottime"], r["cumtime"]]
                        for r in profile["by_tottime"][:15]])
    out = workdir / f"results-check-{'quick' if args.quick else 'full'}.json"
    out.write_text(json.dumps({"machine": facts, "image": meta, "case": case, "stages": stage,
                               "profile": profile}, indent=2, default=str) + "\n")
    print(f"\nraw results: {out}")
    if not args.no_write:
        write_results(results_block(facts, spec, meta, case, stage, args.runs, command))
        print(f"figures added to {RESULTS}")
    return 0 if case["compare"]["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
