"""Launch real torchrun jobs (gloo, CPU) from tests and read back what they wrote.

Every equivalence test in the course goes through `run_step`: it starts a step's
`train.py` under `python -m torch.distributed.run`, waits with a timeout (so a
deadlock fails the test instead of hanging CI) and returns the JSON-lines metrics.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = sorted(p.name for p in REPO.glob("step0*") if p.is_dir())

# Small enough that an 8-process run takes seconds on a 2-core machine.
TINY = ["--model", "tiny", "--seq-len", "32", "--micro-batch-size", "2",
        "--lr", "3e-3", "--warmup-steps", "2", "--dtype", "float32", "--device", "cpu"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra=None):
    env = dict(os.environ)  # under pytest this carries conftest's per-session HF_DATASETS_CACHE
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               COURSE_PG_TIMEOUT_S="60")  # a hung collective fails in a minute
    env.update(extra or {})
    return env


def torchrun(script, nproc, args=(), timeout=300, env=None, check=True):
    """Run `script` on `nproc` local processes; return the CompletedProcess.

    With check=True a non-zero exit raises AssertionError carrying the tail of the output.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(script), *map(str, args)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(env), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-4000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-4000:]
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(path):
    """The per-step records of a --log-file (its last line may be the run's summary: read_summary)."""
    return [r for r in map(json.loads, filter(str.strip, Path(path).read_text().splitlines())) if "step" in r]


def read_summary(path):
    """The run's summary record of a --log-file ({} if it has none)."""
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return next((r for r in recs if r.get("summary")), {})


TRACER = REPO / "notebooks" / "trace.py"


def run_step(step, nproc, args, tmp_path, timeout=300, env=None, tag=None, trace=None, summary=False):
    """Train `step` (e.g. "step03_tensor_parallel") on `nproc` gloo ranks; return its metrics list
    (and the run's summary record too with summary=True). trace=DIR: under notebooks/trace.py."""
    tag = tag or f"{step}_{nproc}_{abs(hash(tuple(map(str, args)))) % 10**8}"
    log = Path(tmp_path) / f"{tag}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    script, args = Path(REPO / step) / "train.py", [*args, "--log-file", log]
    if trace is not None:
        script, args = TRACER, ["--out", trace, script, *args]
    torchrun(script, nproc, args, timeout, env)
    return (read_metrics(log), read_summary(log)) if summary else read_metrics(log)


def assert_same_losses(ref, got, rtol=1e-4, what=""):
    """Per-step loss equality: the course's definition of 'this layout is correct'."""
    assert len(ref) == len(got), f"{what}: {len(ref)} reference steps vs {len(got)}"
    for a, b in zip(ref, got):
        assert a["step"] == b["step"]
        rel = abs(a["loss"] - b["loss"]) / abs(a["loss"])
        assert rel <= rtol, f"{what}: step {a['step']} loss {a['loss']:.7f} vs {b['loss']:.7f} (rel {rel:.2e})"


def run_python(step, args, timeout=300):
    """Run a step's train.py as a plain `python` process (no torchrun)."""
    cmd = [sys.executable, str(REPO / step / "train.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)


def load_full_params(directory):
    """Reassemble whole tensors from DIR/rank*.safetensors written by --dump-params.

    Returns {name: full tensor} and checks that every copy of the same slice (data-parallel
    replicas, tensor-parallel copies of unsharded weights) is identical.
    """
    from safetensors import safe_open

    slices = {}  # name -> {(dim, index, count) or (): tensor}
    for f in sorted(Path(directory).glob("rank*.safetensors")):
        with safe_open(f, "pt") as fh:
            meta = fh.metadata() or {}
            for name in fh.keys():
                key = tuple(int(v) for v in meta.get(name, "").split(",") if v)
                t = fh.get_tensor(name)
                prev = slices.setdefault(name, {}).setdefault(key, t)
                assert torch_equal(prev, t), f"{name} {key}: replicas differ ({f.name})"
    full = {}
    for name, parts in slices.items():
        if () in parts:
            full[name] = parts[()]
        else:
            (dim, _, count), = {(k[0], 0, k[2]) for k in parts}
            import torch
            full[name] = torch.cat([parts[(dim, i, count)] for i in range(count)], dim=dim)
    return full


def torch_equal(a, b):
    import torch
    return a.shape == b.shape and torch.equal(a, b)


_REFERENCES = {}


def step01_reference(args, workdir):
    """step01's metrics and final parameters for `args` (computed once per test session)."""
    key = tuple(map(str, args))
    if key not in _REFERENCES:
        d = Path(workdir) / f"step01_ref_{len(_REFERENCES)}"
        log = d / "metrics.jsonl"
        d.mkdir(parents=True, exist_ok=True)
        proc = run_python("step01_single_gpu", [*args, "--log-file", log, "--dump-params", d / "params"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        _REFERENCES[key] = (read_metrics(log), load_full_params(d / "params"))
    return _REFERENCES[key]


def assert_matches_step01(step, nproc, common, layout, ref_grad_acc, workdir, params=True, atol=5e-5):
    """Train `step` with `layout` flags on `nproc` ranks and compare with step01 run with
    grad_acc = ref_grad_acc (the same global batch): per-step loss (rel 1e-4) and final params.

    Parameters get atol 5e-5 by default (they are ~0.02 in scale): AdamW's m/sqrt(v) turns the
    float32 reduction-order noise of near-zero gradients into small but visible weight noise."""
    d = Path(workdir) / f"{step}_{'_'.join(map(str, layout)).replace('-', '')}"
    got, summary = run_step(step, nproc, [*common, *layout, "--dump-params", d / "params"], d, summary=True)
    ref_args = _with_flag(common, "--grad-acc-steps", ref_grad_acc)
    ref, ref_params = step01_reference(ref_args, workdir)
    assert_same_losses(ref, got, what=f"{step} {' '.join(map(str, layout))}")
    if params:
        full = load_full_params(d / "params")
        if "lm_head.weight" in full and "lm_head.weight" not in ref_params:
            # tied embeddings split across pipeline stages: the last stage's copy must have stayed equal
            assert (full.pop("lm_head.weight") - full["model.embed_tokens.weight"]).abs().max() <= 1e-6
        assert set(full) == set(ref_params), set(full) ^ set(ref_params)
        for name, t in ref_params.items():
            diff = (full[name] - t).abs().max().item()
            assert diff <= atol, f"{name}: max abs diff {diff:.2e} after training"
    return got, summary


def _with_flag(args, flag, value):
    args = list(map(str, args))
    if flag in args:
        i = args.index(flag)
        return args[:i] + [flag, str(value)] + args[i + 2:]
    return args + [flag, str(value)]
