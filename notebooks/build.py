"""Execute the notebooks on their shipped traces and save them with their outputs, so that a reader
on GitHub sees the figures; also write the figures the step READMEs embed (notebooks/figures/).

    python notebooks/build.py                   # every notebook
    python notebooks/build.py 04_pipeline       # some of them
    python notebooks/build.py --check           # only say which ones are stale (what the tests check)
    python notebooks/build.py --rerecord NAME   # re-record NAME's traces first (RERECORD = True; slow)

A notebook's cells come from its jupytext twin NAME.py (edit that, no sync needed before building).
Each saved NAME.ipynb carries metadata["course"]:
  made_from  sha256 of what the outputs were made from: the cells' sources, nbtools.py, and every
             input the kernel read (traces, JSON files, step modules: nbtools notes them; an extra
             cell, executed last and then removed, prints the list);
  inputs     that list (repository paths);
  figures    {name: sha256 of notebooks/figures/NAME.png} of the figures the run wrote (nbtools.save).
tests/test_notebooks.py recomputes made_from from the current files, checks the figures' hashes,
and re-executes each notebook to check that it still runs, reads the same inputs and draws the same
number of figures per cell. Outputs are reproducible: no timings, no PNG metadata, fixed cell ids,
so building twice changes nothing.
"""
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import jupytext
import nbclient
import nbformat
from jupyter_client.manager import KernelManager

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIGURES = HERE / "figures"
NAMES = sorted(p.stem for p in HERE.glob("0*.py"))
REPORT = "COURSE-REPORT "
REPORT_CELL = f'import json as _json, nbtools as _nbtools\nprint("{REPORT}" + _json.dumps(' \
              '{"inputs": _nbtools.inputs(), "figures": _nbtools.SAVED}))'


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def made_from(cells, inputs, repo=REPO):
    """The hash of the cells' sources and of the input files (repository paths, read under `repo`)."""
    h = hashlib.sha256()
    for cell in cells:
        h.update(f"{cell.cell_type}\0{cell.source}\0".encode())
    for rel in sorted(set(inputs) | {"notebooks/nbtools.py"}):
        h.update(f"{rel}\0{sha256(Path(repo) / rel)}\0".encode())
    return h.hexdigest()


def png_counts(nb):
    """Figures (PNG outputs) per code cell."""
    return [sum("image/png" in o.get("data", {}) for o in c.get("outputs", [])) for c in nb.cells
            if c.cell_type == "code"]


def execute(nb, workdir, figures=None, timeout=120):
    """Run `nb` in place (kernel python3, cwd `workdir`); -> the kernel's report: {"inputs", "figures"}.

    figures: the folder nbtools.save writes to (None: it writes nothing)."""
    nb.cells.append(nbformat.v4.new_code_cell(REPORT_CELL))
    env = {"OMP_NUM_THREADS": "1", "COURSE_FIGURES": str(figures) if figures else ""}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:  # over IPC sockets in a folder of our own: a TCP kernel warns that it is unencrypted
        with tempfile.TemporaryDirectory(prefix="kernel_") as sockets:
            km = KernelManager(kernel_name="python3", transport="ipc", ip=str(Path(sockets) / "kernel"))
            try:
                nbclient.NotebookClient(nb, km=km, timeout=timeout, record_timing=False,
                                        resources={"metadata": {"path": str(workdir)}}).execute()
            finally:  # a kernel manager we made is ours to shut down (else: "Parent appears to have exited")
                if km.has_kernel:
                    km.shutdown_kernel()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    cell = nb.cells.pop()
    text = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")
    return json.loads(text.split(REPORT, 1)[1])


def from_twin(name):
    """NAME.py's cells with NAME.ipynb's metadata and cell ids (where a cell's source is unchanged)."""
    nb = jupytext.read(HERE / f"{name}.py")
    ipynb = HERE / f"{name}.ipynb"
    old = nbformat.read(ipynb, as_version=4) if ipynb.exists() else None
    nb.metadata = dict(old.metadata) if old else {"jupytext": {"formats": "ipynb,py:percent"},
                                                  "kernelspec": nb.metadata["kernelspec"]}
    nb.metadata.pop("course", None)
    ids = {}
    for c in old.cells if old else []:
        ids.setdefault((c.cell_type, c.source), []).append(c.id)
    for i, c in enumerate(nb.cells):
        free = ids.get((c.cell_type, c.source))
        c.id = free.pop(0) if free else hashlib.sha1(f"{name}:{i}:{c.source}".encode()).hexdigest()[:8]
    return nb, old


def build(name):
    nb, old = from_twin(name)
    for fig in ((old.metadata.get("course") or {}).get("figures") or {}) if old else {}:
        (FIGURES / f"{fig}.png").unlink(missing_ok=True)  # what this notebook wrote before
    report = execute(nb, HERE, FIGURES)
    nb.metadata["course"] = {"made_from": made_from(nb.cells, report["inputs"]), "inputs": report["inputs"],
                             "figures": {f: sha256(FIGURES / f"{f}.png") for f in report["figures"]}}
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, HERE / f"{name}.ipynb")
    print(f"{name}: {sum(png_counts(nb))} figures in the notebook, {len(report['figures'])} in figures/, "
          f"made from {len(report['inputs'])} files")


def rerecord(name):
    """Execute a copy of NAME with RERECORD = True: it overwrites its traces (outputs discarded)."""
    nb, _ = from_twin(name)
    for cell in nb.cells:
        cell.source = cell.source.replace("RERECORD = False", "RERECORD = True")
    execute(nb, HERE, timeout=900)


def stale(name, repo=REPO):
    """Why NAME.ipynb's outputs are not those of its current cells and inputs ([]: they are)."""
    ipynb = Path(repo) / "notebooks" / f"{name}.ipynb"
    if not ipynb.is_file():
        return [f"{name}.ipynb was never built"]
    nb = nbformat.read(ipynb, as_version=4)
    twin = jupytext.read(Path(repo) / "notebooks" / f"{name}.py")
    course = nb.metadata.get("course") or {}
    why = []
    if [(c.cell_type, c.source) for c in nb.cells] != [(c.cell_type, c.source) for c in twin.cells]:
        why.append(f"{name}.ipynb's cells differ from {name}.py's")
    missing = [f for f in course.get("inputs", []) if not (Path(repo) / f).is_file()]
    if "made_from" not in course or missing:
        why.append(f"no stamp or missing inputs {missing}")
    elif course["made_from"] != made_from(nb.cells, course["inputs"], repo):
        why.append("its cells, nbtools.py or an input changed since it was executed")
    for fig, digest in course.get("figures", {}).items():
        path = Path(repo) / "notebooks" / "figures" / f"{fig}.png"
        if not path.is_file() or sha256(path) != digest:
            why.append(f"figures/{fig}.png is not the one this notebook wrote")
    return why


def main(argv):
    names = [a for a in argv if not a.startswith("--")] or NAMES
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        raise SystemExit(f"no notebook {', '.join(unknown)}; notebooks: {', '.join(NAMES)}")
    if "--check" in argv:
        bad = {n: why for n in names if (why := stale(n))}
        for n, why in bad.items():
            print(f"{n}: {'; '.join(why)}: run python notebooks/build.py {n}")
        return 1 if bad else 0
    for name in names:
        if "--rerecord" in argv:
            rerecord(name)
        build(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
