"""The corrupted sample set (sample_images/corrupt/): every sample gives exactly its codes.

Each sample is built afresh from a clean qemu-img image plus documented pokes
(`make_corrupt.py`).  For each one: imgscope's finding codes equal the expected
ones; where qemu-img can check the format its verdict (and, for qcow2, its
corruption and leak counts) is imgscope's too; checking never changes a byte of
the file; the CLI exits with qemu-img's code and prints no traceback.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import oracle
from imgscope.analysis.check import check_path

CORRUPT = Path(__file__).resolve().parent.parent / "sample_images" / "corrupt"
sys.path.insert(0, str(CORRUPT))
import make_corrupt  # noqa: E402

CASES = {c.name: c for c in make_corrupt.all_cases()}
VERDICT_BY_EXIT = {0: "clean", 1: "incomplete", 2: "corruptions", 3: "leaks"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    oracle.require_tools()
    d = tmp_path_factory.mktemp("corrupt")
    make_corrupt.build_all(d)
    return d


def test_the_set_is_not_empty_and_documented(built):
    manifest = json.loads((built / "MANIFEST.json").read_text())
    assert set(manifest) == set(CASES) and len(CASES) >= 10
    for name, entry in manifest.items():
        assert entry["what"] and (entry["pokes"] or name.startswith("clean")), name
        assert entry["expected"] or entry["qemu"] in (None, "clean"), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_sample_gives_exactly_its_codes(built, name):
    case = CASES[name]
    path = built / name
    before = oracle.sha256_file(path)
    report = check_path(path, case.format)
    assert oracle.sha256_file(path) == before, "the check changed the file"
    codes = {f.code for f in report.findings}
    assert codes == set(case.expected), f"{name}: got {sorted(codes)}"


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.qemu is not None))
def test_verdict_equals_qemu_img_check(built, name):
    case = CASES[name]
    path = built / name
    before = oracle.sha256_file(path)
    proc = subprocess.run([oracle.QEMU_IMG, "check", "--output=json", "-f", case.format, name],
                          cwd=built, capture_output=True, text=True)
    assert oracle.sha256_file(path) == before
    assert VERDICT_BY_EXIT.get(proc.returncode) == case.qemu, (proc.returncode, proc.stderr)
    report = check_path(path, case.format, given_name=name)
    assert report.verdict == case.qemu
    if case.qemu_counts is not None:
        theirs = json.loads(proc.stdout)
        mine = report.qemu_dict()
        for key, value in case.qemu_counts.items():
            assert theirs.get(key, 0) == value, f"qemu-img's {key} changed: {theirs}"
            assert mine.get(key, 0) == value, f"{key}: {mine} vs {theirs}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_exit_code_and_no_traceback(built, name):
    case = CASES[name]
    path = built / name
    before = oracle.sha256_file(path)
    for output in ("human", "json"):
        proc = subprocess.run([sys.executable, "-m", "imgscope", "check", f"--output={output}",
                               "-f", case.format, name], cwd=built, capture_output=True,
                              text=True)
        assert "Traceback" not in proc.stderr + proc.stdout
        assert proc.returncode == check_path(path, case.format).exit_code
        if output == "json":
            out = json.loads(proc.stdout)
            assert {f["code"] for f in out["findings"]} == set(case.expected)
            assert out["filename"] == name
    assert oracle.sha256_file(path) == before
