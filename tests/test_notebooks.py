"""Every notebook runs headless (nbclient, kernel python3) on its shipped traces and draws.

Each notebook is executed in a temporary copy of notebooks/ (so nothing is written into the
repository), with OMP_NUM_THREADS=1 and COURSE_REPO pointing at this checkout. It must run
without an error and produce at least one PNG figure. COURSE_NOTEBOOKS_RERECORD=1 also flips
RERECORD to True, so the notebooks re-record their traces with notebooks/trace.py (slow; use it
after changing a step).
"""
import os
import shutil

import jupytext
import nbclient
import nbformat
import pytest

from launch import REPO

NOTEBOOKS = REPO / "notebooks"
NEEDS = {  # notebook -> the step folder it reads (None: none)
    "01_collectives": None,
    "02_data_parallel": "step02_data_parallel",
    "03_tensor_parallel": "step03_tensor_parallel",
    "04_pipeline": "step05_pipeline_1f1b",
    "05_context_parallel": "step06_context_parallel",
    "06_4d_mesh": "step07_4d_combined",
}
RERECORD = os.environ.get("COURSE_NOTEBOOKS_RERECORD") == "1"


def test_every_notebook_is_listed():
    assert {p.stem for p in NOTEBOOKS.glob("*.ipynb")} == set(NEEDS)


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_notebook_is_paired_and_clean(name):
    """The .ipynb has no outputs and the same cells as its jupytext .py twin."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    twin = jupytext.read(NOTEBOOKS / f"{name}.py")
    assert [c.source for c in nb.cells] == [c.source for c in twin.cells], \
        f"{name}.ipynb and {name}.py differ: run `jupytext --sync notebooks/{name}.py`"
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}.ipynb has outputs"
    assert nb.cells[0].cell_type == "markdown" and "**Question.**" in nb.cells[0].source
    assert nb.cells[-1].cell_type == "markdown" and "What to notice" in nb.cells[-1].source
    assert any("RERECORD = False" in c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_notebook_runs_and_draws(name, tmp_path, monkeypatch):
    work = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, work, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    monkeypatch.setenv("COURSE_REPO", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(work / f"{name}.ipynb", as_version=4)
    if RERECORD:
        for cell in nb.cells:
            cell.source = cell.source.replace("RERECORD = False", "RERECORD = True")
    client = nbclient.NotebookClient(nb, timeout=600 if RERECORD else 120, kernel_name="python3",
                                     resources={"metadata": {"path": str(work)}})
    # Speed is not asserted here (timing belongs in scripts that print figures); the client's
    # per-cell timeout still stops a notebook that hangs.
    client.execute()  # raises CellExecutionError with the cell's traceback on any error
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert pngs, f"{name} drew no figure"
