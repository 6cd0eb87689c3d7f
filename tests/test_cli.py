"""The command line: qemu-img compatible output and clean errors."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout, redirect_stderr

import pandas as pd
import pytest

from imgscope.cli import main

import oracle


def run_cli(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "imgscope", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize("name", ["v3_compat11", "chain_top", "compressed_zstd", "snapshots",
                                  "data_file", "extended_l2"])
def test_info_and_map_json_equal_qemu(qcow2_corpus, name):
    """Same values, and (run from the same folder) the very same text as qemu-img 7.2."""
    s = qcow2_corpus[name]
    folder = s.path.parent
    for verb in (["info"], ["info", "--backing-chain"], ["map"]):
        rc, out, err = run_cli(*verb, "--output=json", s.path.name, cwd=folder)
        assert rc == 0, err
        theirs = oracle.run("qemu-img", *verb, "-U", "--output=json", s.path.name, cwd=folder).stdout
        assert json.loads(out) == json.loads(theirs), verb
        assert out == theirs, verb


def test_human_map_and_info_text(qcow2_corpus):
    s = qcow2_corpus["chain_top"]
    folder = s.path.parent
    rc, out, _ = run_cli("map", s.path.name, cwd=folder)
    theirs = oracle.run("qemu-img", "map", "-U", s.path.name, cwd=folder).stdout
    assert rc == 0 and out == theirs
    rc, out, _ = run_cli("info", "--backing-chain", s.path.name, cwd=folder)
    assert rc == 0
    assert "backing file: chain_mid.qcow2" in out and out.count("image: ") == 3


def test_human_map_refuses_compressed_like_qemu(qcow2_corpus):
    rc, out, err = run_cli("map", qcow2_corpus["compressed_zlib"].path)
    assert rc == 1 and "compressed" in err and "Traceback" not in err


def test_fields_tables_regions_outputs(qcow2_corpus):
    path = qcow2_corpus["snapshots"].path
    rc, out, _ = run_cli("fields", "--output", "csv", path)
    assert rc == 0
    df = pd.read_csv(io.StringIO(out))
    assert {"structure", "field", "offset", "size", "raw", "display", "description"} <= set(df.columns)
    assert (df[df.field == "magic"].raw == "514649fb").all()
    rc, out, _ = run_cli("tables", path)
    assert rc == 0 and "snapshots: 3 rows" in out and "l2:" in out
    rc, out, _ = run_cli("tables", "snapshots", "--output", "json", path)
    assert [r["name"] for r in json.loads(out)] == qcow2_corpus["snapshots"].snapshots
    rc, out, _ = run_cli("regions", "--output", "json", path)
    regions = json.loads(out)
    assert regions[0]["offset"] == 0 and regions[0]["kind"] == "header"
    assert sum(r["length"] for r in regions) == path.stat().st_size
    rc, out, err = run_cli("tables", "nope", path)
    assert rc == 1 and err.count("\n") == 1 and "no table" in err


def test_errors_are_one_line(tmp_path):
    for args in (["info", tmp_path / "missing.qcow2"], ["map", tmp_path],
                 ["info", "-f", "vmdk", tmp_path / "missing"]):
        rc, out, err = run_cli(*args)
        assert rc == 1, args
        assert err.startswith("imgscope: ") and err.count("\n") == 1, err
        assert "Traceback" not in err


def test_survey_lists_sample_images():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "sample_images"
    rc, out, err = run_cli("survey", root)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["FILE", "FORMAT"]
    names = {l.split()[0] for l in lines[1:]}
    assert {"demo.qcow2", "chain-top.qcow2", "sparse.raw", "compressed.qcow2"} <= names
    top = next(l for l in lines if l.startswith("chain-top.qcow2"))
    assert "chain-base.qcow2" in top


def test_sample_images_agree_with_qemu():
    """The bundled samples are real: imgscope and qemu-img agree on each."""
    from pathlib import Path
    import imgscope
    from imgscope.map import map_entries
    root = Path(__file__).resolve().parent.parent / "sample_images"
    for path in sorted(root.glob("*.qcow2")):
        with imgscope.open(path) as img:
            mine = [{k: v for k, v in e.items() if k != "filename"} for e in map_entries(img)]
        assert mine == oracle.qemu_map(path), path.name


@pytest.mark.parametrize("size, extra", [("0", []), ("1M", ["--start-offset", "64k", "--max-length", "0"])])
def test_empty_map_is_one_empty_entry_as_qemu(tmp_path, size, extra):
    """qemu-img map prints one zero-length entry when nothing is mapped; so do we."""
    path = tmp_path / "e.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    theirs = subprocess.run(["qemu-img", "map", "--output=json", *extra, path.name], cwd=tmp_path,
                            capture_output=True, check=True).stdout
    mine = subprocess.run([sys.executable, "-m", "imgscope", "map", "--output=json", *extra,
                           path.name], cwd=tmp_path, capture_output=True, check=True).stdout
    assert mine == theirs
