"""The planner against this machine: predict the step time of tiny layouts on 1-8 gloo ranks, run
the same layouts with train.py, print both side by side, the median |error| and the ranking.

    python step07_4d_combined/tools/plan.py --calibrate      # first: tools/hardware/cpu.json
    python step07_4d_combined/tools/plan_check.py [--steps 8] [--json FILE]

Goal (issue 29): median |error| <= 25% and Spearman's rank correlation >= 0.8. A loaded machine
(other jobs on the 2 cores) slows the runs and not the calibration: run it on a quiet one.
Measured: the median step_time_s of the steps after the first two (warm-up) of each run.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
import plan  # noqa: E402

REPO = TOOLS.parent.parent
MODEL = ["--model", "tiny", "--seq-len", "64", "--dtype", "float32", "--device", "cpu", "--num-layers", "4",
         "--num-kv-heads", "4", "--micro-batch-size", "2"]
# (ranks, flags): every dimension, both pipeline engines, 1 to 8 ranks; global batch 16 sequences
LAYOUTS = [
    (1, {"grad-acc-steps": 8}),
    (2, {"dp": 2, "grad-acc-steps": 4}),
    (2, {"tp": 2, "grad-acc-steps": 8}),
    (2, {"cp": 2, "grad-acc-steps": 8}),
    (2, {"pp": 2, "grad-acc-steps": 8, "pp-engine": "1f1b"}),
    (2, {"pp": 2, "grad-acc-steps": 8, "pp-engine": "afab"}),
    (4, {"dp": 2, "tp": 2, "grad-acc-steps": 4}),
    (4, {"pp": 4, "grad-acc-steps": 8, "pp-engine": "1f1b"}),
    (8, {"dp": 2, "pp": 2, "tp": 2, "grad-acc-steps": 4}),
]


def spearman(xs, ys):
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r
    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))


def measure(ranks, flags, steps, work):
    log = Path(work) / f"run{len(list(Path(work).iterdir()))}.jsonl"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*MODEL, "--max-steps", str(steps), "--log-file", str(log)]
    for k, v in flags.items():
        args += [f"--{k}", str(v)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port),
           str(REPO / "step07_4d_combined" / "train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=600)
    times = [json.loads(line)["step_time_s"] for line in log.read_text().splitlines() if '"step_time_s"' in line]
    return statistics.median(times[2:])


def predicted(ranks, flags, hw):
    cfg = plan.load_model("tiny")
    cfg.num_hidden_layers, cfg.num_key_value_heads = 4, 4
    mbs, ga = 2, flags["grad-acc-steps"]
    dp = flags.get("dp", 1)
    lay = SimpleNamespace(dp=dp, tp=flags.get("tp", 1), pp=flags.get("pp", 1), cp=flags.get("cp", 1), zero=0,
                          mbs=mbs, sp=False, engine=flags.get("pp-engine", "1f1b"), chunks=1, recompute=False,
                          compile=False)
    return plan.predict(cfg, lay, gpus=ranks, gpus_per_node=ranks, T=64, gbs=mbs * dp * ga, hw=hw)["step_s"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--hardware", default="cpu")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args()
    hw = plan.load_hardware(args.hardware)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for ranks, flags in LAYOUTS:
            pred, meas = predicted(ranks, flags, hw), measure(ranks, flags, args.steps, work)
            name = f"{ranks} ranks " + " ".join(f"--{k} {v}" for k, v in flags.items())
            rows.append({"layout": name, "ranks": ranks, "flags": flags, "predicted_s": pred, "measured_s": meas,
                         "error": pred / meas - 1})
            print(f"{name:<58} predicted {pred * 1000:8.1f} ms  measured {meas * 1000:8.1f} ms  "
                  f"{100 * (pred / meas - 1):+6.1f}%", flush=True)
    med = statistics.median(abs(r["error"]) for r in rows)
    rho = spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows])
    print(f"median |error| {100 * med:.1f}% (goal <= 25%), Spearman {rho:.2f} (goal >= 0.8)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "median_abs_error": med, "spearman": rho,
                                               "hardware": hw}, indent=2) + "\n")


if __name__ == "__main__":
    main()
