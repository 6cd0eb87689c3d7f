"""The check engine itself: reports, exit codes, progress, files that cannot be opened.

Format rules have their own tests (test_check_qcow2.py, test_check_formats.py) and
the corrupted sample set is test_corrupt_samples.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import checks
import imgscope
import oracle
from imgscope.analysis.check import CheckCounts, CheckReport, check_path



def _qcow2(tmp_path, name="x.qcow2", size="4M", writes=("write -P 0x11 0 64k",)):
    path = tmp_path / name
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", "qcow2", path, size)
    for w in writes:
        oracle.run(oracle.QEMU_IO, "-f", "qcow2", "-c", w, path)
    return path


def test_report_exit_codes_follow_qemu_img():
    def report(**counts):
        return CheckReport("f", "qcow2", CheckCounts(**counts), [])
    assert report().exit_code == 0 and report().verdict == "clean"
    assert report(leaks=3).exit_code == 3
    assert report(leaks=3, corruptions=1).exit_code == 2
    assert report(check_errors=1, corruptions=5).exit_code == 1
    # optional keys only when non-zero, as qemu-img prints them
    assert report().qemu_dict() == {"filename": "f", "format": "qcow2", "check-errors": 0}
    assert report(leaks=2).qemu_dict()["leaks"] == 2


def test_unopenable_image_is_a_report_not_an_exception(tmp_path):
    path = _qcow2(tmp_path)
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(path.read_bytes()[:50])
    before = oracle.sha256_file(cut)
    report = check_path(cut, "qcow2")
    assert report.exit_code == 1 and [f.code for f in report.findings] == ["open_failed"]
    assert "shorter than" in report.findings[0].message
    rc, out, err = checks.run_cli("check", "--output=json", "-f", "qcow2", cut.name,
                                  cwd=tmp_path)
    theirs = subprocess.run([oracle.QEMU_IMG, "check", "-f", "qcow2", cut.name], cwd=tmp_path,
                            capture_output=True)
    assert rc == theirs.returncode == 1 and "Traceback" not in err
    assert json.loads(out)["findings"][0]["code"] == "open_failed"
    assert oracle.sha256_file(cut) == before


def test_progress_reports_stages(tmp_path):
    path = _qcow2(tmp_path)
    seen = []
    with imgscope.open(path) as img:
        img.check(progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert ("parse", 0, 1) in seen and ("parse", 1, 1) in seen
    assert all(0 <= done <= total for _, done, total in seen)


def test_cli_progress_goes_to_stderr_only(tmp_path):
    path = _qcow2(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "imgscope", "check", "-p", "--output=json",
                           path.name], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)          # stdout stays clean JSON
    assert out["filename"] == path.name and out["findings"] == []
    assert proc.stderr.strip()             # tqdm drew on stderr
    quiet = subprocess.run([sys.executable, "-m", "imgscope", "check", "-q", path.name],
                           cwd=tmp_path, capture_output=True, text=True)
    assert quiet.stderr == "" and "No errors were found on the image." in quiet.stdout


@pytest.mark.parametrize("fmt", ["qcow2", "vdi", "vmdk", "vhdx"])
def test_clean_image_gives_qemu_img_check_verdict(tmp_path, fmt):
    """Where qemu-img checks a format, a fresh image is clean for both, exit 0."""
    path = tmp_path / f"x.{fmt}"
    oracle.run(oracle.QEMU_IMG, "create", "-q", "-f", fmt, path, "8M")
    oracle.run(oracle.QEMU_IO, "-f", fmt, "-c", "write -P 0x5a 1M 128k", path)
    theirs = subprocess.run([oracle.QEMU_IMG, "check", "--output=json", path.name],
                            cwd=tmp_path, capture_output=True, text=True)
    report = check_path(path, given_name=path.name)
    assert report.exit_code == theirs.returncode == 0
    assert report.findings == []
    assert report.qemu_dict() == json.loads(theirs.stdout)
