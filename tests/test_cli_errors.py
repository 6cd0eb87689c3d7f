"""The command line on bad input: exit code 1, one ``imgscope:`` line on stderr, no traceback.

Every verb is run as a real process (``python -m imgscope VERB FILE``) on: a missing
file, a directory, truncated qcow2 images, a non-image file forced with ``-f qcow2``,
an image whose backing file leaves its folder, a backing chain that loops and one
whose backing file is missing.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

import oracle

VERBS = [["info"], ["info", "--output", "json"], ["map"], ["map", "--output", "json"],
         ["fields"], ["tables"], ["tables", "l2"], ["regions"]]


def run_cli(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONFAULTHANDLER="0")
    return subprocess.run([sys.executable, "-m", "imgscope", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd="/")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, qcow2_corpus):
    """name -> (extra CLI args, path)."""
    oracle.require_tools()
    d = tmp_path_factory.mktemp("cli-bad")
    out = {"missing file": ([], d / "no-such-image.qcow2")}
    (d / "a-directory.qcow2").mkdir()
    out["directory"] = ([], d / "a-directory.qcow2")
    data = qcow2_corpus["v3_compat11"].path.read_bytes()
    for n in (4, 50, 100):
        p = d / f"truncated-{n}.qcow2"
        p.write_bytes(data[:n])
        out[f"truncated at {n}"] = ([], p)
    rnd = d / "random.bin"
    rnd.write_bytes(random.Random(1234).randbytes(300_000))
    out["random bytes -f qcow2"] = (["-f", "qcow2"], rnd)
    inner = d / "inner"
    inner.mkdir()
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "outside.qcow2", "1M", cwd=d)
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", "../outside.qcow2", "-F", "qcow2",
               "unsafe.qcow2", "1M", cwd=inner)
    out["backing ../outside.qcow2"] = ([], inner / "unsafe.qcow2")
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw",
               "abs.qcow2", "1M", cwd=inner)
    out["backing /etc/passwd"] = ([], inner / "abs.qcow2")
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", 'json:{"file":{"filename":"/etc/passwd"}}',
               "-F", "raw", "json.qcow2", "1M", cwd=inner)
    out["backing json:"] = ([], inner / "json.qcow2")
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "b.qcow2", "1M", cwd=inner)
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2",
               "a.qcow2", "1M", cwd=inner)
    oracle.run(oracle.QEMU_IMG, "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", cwd=inner)
    out["backing loop"] = ([], inner / "a.qcow2")
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2",
               "orphan.qcow2", "1M", cwd=inner)
    out["missing backing"] = ([], inner / "orphan.qcow2")
    return out


CASES = ["missing file", "directory", "truncated at 4", "truncated at 50", "truncated at 100",
         "random bytes -f qcow2", "backing ../outside.qcow2", "backing /etc/passwd", "backing json:",
         "backing loop", "missing backing"]


@pytest.mark.parametrize("case", CASES)
def test_errors_are_one_line_exit_1(bad_inputs, case):
    extra, path = bad_inputs[case]
    bad = []
    for verb in VERBS:
        try:
            proc = run_cli(*verb, *extra, path)
        except subprocess.TimeoutExpired:
            bad.append(f"{verb}: no exit after 60 s")
            continue
        lines = proc.stderr.splitlines()
        what = f"{' '.join(verb)} {' '.join(extra)} ({case}): rc={proc.returncode} stderr={proc.stderr!r}"
        if proc.returncode != 1:
            bad.append(f"{what}: exit code is not 1")
        if len(lines) != 1 or not lines[0].startswith("imgscope:"):
            bad.append(f"{what}: not exactly one 'imgscope:' line on stderr")
        if "Traceback" in proc.stderr or "Traceback" in proc.stdout:
            bad.append(f"{what}: traceback printed")
    assert not bad, "\n".join(bad)


def test_error_line_names_the_file_and_the_place(bad_inputs):
    """The one line says which file and (for damaged structures) which structure/offset."""
    _, path = bad_inputs["truncated at 100"]
    proc = run_cli("info", path)
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert str(path) in line and "header" in line and "offset" in line, line
    _, path = bad_inputs["backing ../outside.qcow2"]
    line = run_cli("info", path).stderr.strip()
    assert "../outside.qcow2" in line and "backing" in line, line
    _, path = bad_inputs["missing backing"]
    line = run_cli("map", path).stderr.strip()
    assert "gone.qcow2" in line, line


def test_allow_path_opens_the_refused_chain(bad_inputs):
    """--allow-path is the documented way out of the confinement error."""
    _, path = bad_inputs["backing ../outside.qcow2"]
    proc = run_cli("info", "--allow-path", path.parent.parent, path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
