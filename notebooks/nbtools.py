"""What the notebooks share: record a step's run under torchrun with trace.py, keep a small copy
of the trace in notebooks/traces/, load it back, and draw per-rank timelines.

A trace is the JSON lines trace.py writes (one file per rank); `record` merges the ranks into
one file, drops empty fields and shifts the times so that the run starts at t = 0 s.
"""
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


def record(name, step, nproc, args, keep=None):
    """Train `step` on `nproc` ranks under trace.py; save the merged trace as traces/NAME.jsonl.

    keep(record) -> bool filters what is saved (the shipped traces stay small)."""
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
            r = {k: (round(v - t0, 6) if k in ("t0", "t1", "t_wait", "t_done") else v)
                 for k, v in r.items() if v is not None and k != "ranks"}
            if keep is None or r["ev"] == "meta" or keep(r):
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
    print(out.strip().splitlines()[-1])
    return load(name)


def load(name):
    """The records of traces/NAME.jsonl; absent fields read as None (use r.get)."""
    return [json.loads(line) for line in (TRACES / f"{name}.jsonl").read_text().splitlines() if line]


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


def tiny_n_params(step="step02_data_parallel", **override):
    """Parameter count of the tiny preset (from the step's utils.PRESETS) with config overrides,
    computed from the shapes: embedding, 4 attention and 3 MLP matrices per layer, norms, head."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"utils_{step}", step_dir(step) / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    c = dict(utils.PRESETS["tiny"], **override)
    D, I, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = D // c["num_attention_heads"]
    per_layer = D * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"]) + 3 * D * I + 2 * D
    return V * D * (1 if c["tie_word_embeddings"] else 2) + L * per_layer + D
