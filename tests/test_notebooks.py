"""The teaching notebooks run top to bottom on the sample images, headless.

Every `notebooks/*.ipynb` is executed with nbclient in a fresh `python3` kernel
(the interpreter running the tests, so the editable imgscope is importable),
cwd = the notebooks folder, `MPLBACKEND=Agg`.  The notebooks are executed once
per module, a few kernels at a time; the tests then look at what they produced:
no error, figures (image/png), widget views where the notebook shows widgets,
and nothing written into `sample_images/` or next to the notebooks.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
SAMPLES = ROOT / "sample_images"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
NAMES = [p.name for p in NOTEBOOKS]

# The five notebooks; a missing one fails test_every_planned_notebook_exists.
PLANNED = ["01-quick-start.ipynb", "02-qcow2-internals.ipynb",
           "03-vmdk-vdi-vhd-side-by-side.ipynb", "04-diagnosing-a-damaged-image.ipynb",
           "05-converting-between-formats.ipynb"]
# Notebooks that show ipywidgets (the explorer or the translation stepper).
WITH_WIDGETS = {"01-quick-start.ipynb", "02-qcow2-internals.ipynb",
                "03-vmdk-vdi-vhd-side-by-side.ipynb", "04-diagnosing-a-damaged-image.ipynb"}
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
CELL_TIMEOUT = 120      # seconds per cell
PARALLEL_KERNELS = 3


def _digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` (byte-code caches aside)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts)


async def _run_all(paths: list[Path]) -> dict[str, tuple]:
    """Execute every notebook (a few kernels at a time): name -> (notebook, error or None)."""
    gate = asyncio.Semaphore(PARALLEL_KERNELS)

    async def run_one(path: Path):
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
        async with gate:
            try:
                await client.async_execute()
            except CellExecutionError as exc:     # the failing cell's traceback, as text
                return path.name, (nb, re.sub(r"\x1b\[[0-9;]*m", "", str(exc)))
        return path.name, (nb, None)

    return dict(await asyncio.gather(*(run_one(p) for p in paths)))


@pytest.fixture(scope="module")
def executed():
    """Run every notebook once; also the sample digests and folder listings around the run."""
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] in {"python", "python3", f"python{sys.version_info[0]}",
                            sys.executable}, (
        f"the python3 kernelspec runs {spec.argv[0]}, not this interpreter ({sys.executable}):"
        " imgscope would not be importable there")
    before = _digests(SAMPLES)
    listing = _listing(NOTEBOOK_DIR)
    env = {"MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)              # the kernels inherit the environment
    try:
        results = asyncio.run(_run_all(NOTEBOOKS))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {"results": results, "samples_before": before, "samples_after": _digests(SAMPLES),
            "listing_before": listing, "listing_after": _listing(NOTEBOOK_DIR)}


def _outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            yield from cell.get("outputs", [])


def _mime_types(nb) -> set[str]:
    return {mime for out in _outputs(nb) for mime in out.get("data", {})}


def test_every_planned_notebook_exists():
    assert sorted(PLANNED) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "a notebook without code teaches nothing here"
    assert [c for c in code if c.outputs or c.execution_count is not None] == []
    assert "widgets" not in nb.metadata          # no saved widget state


@pytest.mark.parametrize("name", NAMES)
def test_prose_before_every_code_cell(name):
    """Each code cell follows a markdown cell saying what the reader is about to see."""
    cells = nbformat.read(NOTEBOOK_DIR / name, as_version=4).cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ")
    lonely = [i for i, c in enumerate(cells)
              if c.cell_type == "code" and cells[i - 1].cell_type != "markdown"]
    assert lonely == [], f"code cells {lonely} have no prose before them"


@pytest.mark.parametrize("name", NAMES)
def test_runs_top_to_bottom(executed, name):
    nb, error = executed["results"][name]
    assert error is None, error
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)      # every cell ran
    errors = [o for o in _outputs(nb) if o.output_type == "error"]
    assert errors == []


@pytest.mark.parametrize("name", NAMES)
def test_renders_figures(executed, name):
    nb, error = executed["results"][name]
    assert error is None, error
    pngs = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert pngs, "no figure was rendered"
    assert all(len(o["data"]["image/png"]) > 1000 for o in pngs)   # base64 of a real picture


@pytest.mark.parametrize("name", NAMES)
def test_widget_views(executed, name):
    nb, error = executed["results"][name]
    assert error is None, error
    shown = WIDGET_MIME in _mime_types(nb)
    assert shown == (name in WITH_WIDGETS)


def test_samples_untouched(executed):
    """No notebook writes into sample_images/ (notebook 05 converts into a temporary folder)."""
    assert executed["samples_after"] == executed["samples_before"]


def test_nothing_written_next_to_the_notebooks(executed):
    assert executed["listing_after"] == executed["listing_before"]
