"""What the notebooks share: record a step's run under torchrun with trace.py, keep a small copy
of the trace in notebooks/traces/, load it back, and draw per-rank timelines.

A trace is the JSON lines trace.py writes (one file per rank); `record` merges the ranks into
one file, drops empty fields and shifts the times so that the run starts at t = 0 s.

What a notebook was made from: every trace or JSON file it reads (`load`, `read_json`), every
step module it imports (`step_module`, or a module from a step folder in sys.modules) is noted
here; `inputs()` lists them. notebooks/build.py stamps the executed notebook with a hash of
its cells, this file and those inputs, and the tests recompute it (see build.py).
`machine(recs)` says what recorded a trace's timings; `save(fig, name)` also writes a figure
to notebooks/figures/ when build.py runs the notebook.
"""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = Path(os.environ.get("COURSE_REPO", HERE.parent))
TRACES = HERE / "traces"
TINY = ["--model", "tiny", "--seq-len", "32", "--micro-batch-size", "2", "--lr", "3e-3",
        "--warmup-steps", "2", "--dtype", "float32", "--device", "cpu"]
COLORS = {"forward": "tab:blue", "backward": "tab:green", "optimizer": "tab:gray",
          "dp": "tab:orange", "tp": "tab:red", "pp": "tab:purple", "cp": "tab:brown",
          "cp_dp": "tab:olive", "mp": "tab:pink", "world": "black"}


USED, SAVED = set(), []  # input files this kernel read; figures it saved (names)


def use(path):
    """Note `path` as an input of this notebook; return it."""
    USED.add(Path(path).resolve())
    return Path(path)


def _rel(path):
    """A path as the repository names it: notebooks/... (also in a copy of notebooks/), or REPO-relative."""
    for root, prefix in ((HERE, "notebooks"), (REPO.resolve(), "")):
        try:
            return str(Path(prefix) / path.relative_to(root))
        except ValueError:
            pass
    return str(path)


def inputs():
    """Sorted repository paths of what this kernel read: traces, JSON files, step modules (also those
    imported through sys.path, such as a step's utils.py), and this file."""
    files = set(USED) | {Path(__file__).resolve()}
    steps = [p.resolve() for p in REPO.glob("step0*")]
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and any(Path(f).resolve().is_relative_to(s) for s in steps):
            files.add(Path(f).resolve())
    return sorted(_rel(f) for f in files)


def read_json(path):
    """json.loads of a file, noted as an input."""
    return json.loads(use(path).read_text())


def preset(name):
    """The --model preset NAME as a dict: its Hugging Face config.json in data/models/, noted."""
    return read_json(REPO / "data" / "models" / name / "config.json")


def step_module(step, module):
    """Import `module`.py of a step folder under a private name (the steps share module names), noted.

    The step folder goes first on sys.path while it runs, so its own imports find their siblings."""
    path = step_dir(step) / f"{module}.py"
    spec = importlib.util.spec_from_file_location(f"{module}_{step[:6]}", use(path))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    return mod


def machine(recs):
    """One line on what recorded a trace's timings, from its meta records: cores, processes, backend.

    -> (text, oversubscribed): oversubscribed when the processes outnumber the usable cores."""
    metas = [r for r in recs if r.get("ev") == "meta"]
    m = next((r["machine"] for r in metas if r.get("machine")), None)
    backend = metas[0].get("backend") if metas else None
    if m is None:
        return f"unknown machine, {len(metas)} processes, {backend}", True
    cores, procs = m["cpus_usable"], m["processes"]
    over = procs * m.get("threads", 1) > cores and m["device"] == "cpu"
    text = f"{cores} cores, {procs} processes"
    if over:
        text += f" ({procs * m.get('threads', 1) / cores:g}x oversubscribed)"
    text += f", {backend}" + ("" if m["device"] == "cpu" else f", {m['device']}")
    if m.get("load") is not None and m["device"] == "cpu":  # other work on the machine also takes cores
        text += f", load {m['load']:.1f}"
    return text, over


def save(fig, name):
    """Under build.py (COURSE_FIGURES set): also write `fig` as COURSE_FIGURES/NAME.png for the READMEs."""
    out = os.environ.get("COURSE_FIGURES")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(out) / f"{name}.png", dpi=80, metadata={"Software": None}, bbox_inches="tight")
        SAVED.append(name)


def _inline_png_without_metadata():
    """Inline figures: PNG without the matplotlib version in it, so that outputs are reproducible."""
    try:
        from IPython import get_ipython
        from matplotlib_inline.config import InlineBackend
    except ImportError:
        return
    ip = get_ipython()
    if ip is not None:  # the trait's observer re-selects the formatters now and whenever the backend loads
        InlineBackend.instance(parent=ip).print_figure_kwargs = {"bbox_inches": "tight",
                                                                 "metadata": {"Software": None}}


_inline_png_without_metadata()


def step_dir(name):
    """A step folder of the course ($COURSE_STEP0N_DIR overrides it, as in the tests)."""
    return Path(os.environ.get(f"COURSE_{name[:6].upper()}_DIR", REPO / name))


def torchrun(script, nproc, args=(), timeout=300):
    """Run `script` on `nproc` local gloo processes (one thread each); return its stdout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               COURSE_PG_TIMEOUT_S="120")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def record(name, step, nproc, args, keep=None, fields=None):
    """Train `step` on `nproc` ranks under trace.py; save the merged trace as traces/NAME.jsonl.

    keep(record) -> bool filters what is saved, fields (names) trims the comm and span records to
    those fields (the shipped traces stay small). Meta and mem records are kept whole."""
    tmp = Path(tempfile.mkdtemp(prefix="trace_"))
    try:
        out = torchrun(HERE / "trace.py", nproc, ["--out", tmp, step_dir(step) / "train.py", *args])
        recs = []
        for f in sorted(tmp.glob("rank*.jsonl")):
            rank = int(f.stem[4:])
            recs += [dict(json.loads(line), rank=rank) for line in f.read_text().splitlines() if line]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t0 = min(r["t0"] for r in recs if "t0" in r)
    TRACES.mkdir(exist_ok=True)
    with open(TRACES / f"{name}.jsonl", "w") as f:
        f.write(json.dumps({"ev": "run", "step": step, "nproc": nproc, "args": list(map(str, args))}) + "\n")
        for r in recs:
            r = {k: (round(v - t0, 6) if k in ("t0", "t1", "t_wait", "t_done") else
                     round(v, 6) if k == "cpu" else v) for k, v in r.items() if v is not None and k != "ranks"}
            if keep is None or r["ev"] == "meta" or keep(r):
                if fields is not None and r["ev"] in ("comm", "span"):
                    r = {k: v for k, v in r.items() if k in ("ev", "rank", *fields)}
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
    print(out.strip().splitlines()[-1])
    return load(name)


def load(name):
    """The records of traces/NAME.jsonl; absent fields read as None (use r.get)."""
    return [json.loads(line) for line in use(TRACES / f"{name}.jsonl").read_text().splitlines() if line]


def of(recs, ev, **match):
    """The records of kind `ev` ("comm", "span", "meta") whose fields equal `match`."""
    return [r for r in recs if r["ev"] == ev and all(r.get(k) == v for k, v in match.items())]


def bar(ax, y, t0, t1, color, label=None, height=0.8, text=None, **kw):
    """One horizontal bar from t0 to t1 (seconds) drawn in milliseconds."""
    ax.barh(y, (t1 - t0) * 1e3, left=t0 * 1e3, height=height, color=color, label=label, **kw)
    if text is not None:
        ax.text((t0 + t1) / 2 * 1e3, y, text, ha="center", va="center", fontsize=7, color="white")


def dedupe_legend(ax, **kw):
    handles, labels = ax.get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    ax.legend(seen.values(), seen.keys(), **kw)


def tiny_n_params(**override):
    """Parameter count of the tiny preset (data/models/tiny/config.json) with config overrides,
    computed from the shapes: embedding, 4 attention and 3 MLP matrices per layer, norms, head."""
    c = dict(preset("tiny"), **override)
    D, I, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = D // c["num_attention_heads"]
    per_layer = D * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"]) + 3 * D * I + 2 * D
    return V * D * (1 if c["tie_word_embeddings"] else 2) + L * per_layer + D
