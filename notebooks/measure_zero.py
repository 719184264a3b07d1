"""What ZeRO 0, 1, 2 and 3 keep per rank and send per step, measured at dp 4.

    python notebooks/measure_zero.py                   # tiny widened: 4 layers, D = 128, dp 4
    python notebooks/measure_zero.py --grad-acc-steps 2 --out zero.json

Runs step07 for each --zero under notebooks/trace.py with --memory-report and prints, for one rank:
  - the bytes it keeps of weights, gradients and AdamW's state (measured; memory.py's prediction
    beside), the bucket on the wire and, with --zero 3, the layers whole at once (peaks);
  - the bytes it put on the wire over dp per step (the ring estimate "sent", from the trace), beside
    the formula of zero.py's docstring: b = (W-1)/W x 4 P per reduce-scatter or all-gather of the
    P parameters, zero 0 and 1: 2 b; zero 2: (m + 1) b; zero 3: m b + 2 m b_layers + b_rest;
  - the median step time against --zero 1's, with the machine named (an oversubscribed CPU
    machine: only a coarse ratio, and the bytes, mean anything).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def run(zero, args):
    out = Path(tempfile.mkdtemp(prefix=f"zero{zero}_"))
    flags = ["--model", "tiny", "--num-layers", args.layers, "--hidden-size", args.hidden,
             "--intermediate-size", 4 * args.hidden, "--num-heads", 4, "--num-kv-heads", 2,
             "--seq-len", 64, "--micro-batch-size", 2, "--grad-acc-steps", args.grad_acc_steps,
             "--max-steps", args.steps, "--dp", args.dp, "--zero", zero, "--memory-report",
             "--dtype", "float32", "--device", "cpu", "--log-file", out / "log.jsonl"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.dp),
           str(HERE / "trace.py"), "--out", str(out / "trace"), str(REPO / "step07_4d_combined" / "train.py"),
           *map(str, flags)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"step"' in line]
    sent = defaultdict(float)  # (step, op) -> bytes sent over dp by the last rank
    for line in (out / "trace" / f"rank{args.dp - 1}.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["ev"] == "comm" and r["dim"] == "dp" and r["step"] is not None:
            sent[(r["step"], r["op"])] += r["sent"]
    return log, sent


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dp", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--grad-acc-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=None, help="also write the figures here as JSON")
    args = p.parse_args()
    W, m = args.dp, args.grad_acc_steps
    results = {}
    for zero in (0, 1, 2, 3):
        log, sent = run(zero, args)
        first = log[0]
        step1 = {op: b for (s, op), b in sent.items() if s == 1}  # a steady step (step 0 also gathers once)
        results[zero] = {"kept": {k: first[f"{m_}_bytes_measured"] for k, m_ in (
            ("weights", "weight"), ("gradients", "grad"), ("optimizer", "optimizer"))},
            "predicted": {k: first[f"predicted_{k}"] for k in ("weights", "gradients", "optimizer")},
            "peaks": {k: first.get(f"{k}_bytes_measured") for k in ("bucket", "gathered")},
            "sent": step1, "step_s": statistics.median(r["step_time_s"] for r in log[1:])}
    P = results[0]["kept"]["weights"] // 4  # parameters of the model (dp: all of them)
    rest = 2 * 1024 * args.hidden + args.hidden  # embedding, head, final norm (untied)
    b = lambda n: (W - 1) / W * 4 * n  # noqa: E731  one ring reduce-scatter or all-gather of n parameters
    formula = {0: 2 * b(P), 1: 2 * b(P), 2: (m + 1) * b(P), 3: m * b(P) + 2 * m * b(P - rest) + b(rest)}
    print(f"tiny, {args.layers} layers, D = {args.hidden}: {P:,} parameters ({rest:,} in embedding, head and "
          f"norm), dp {W}, {m} micro-batch(es) per step")
    print(f"{'zero':>4} | {'weights':>10} {'gradients':>10} {'AdamW':>10} | {'% of zero 0':>11} | "
          f"{'bucket peak':>11} {'gathered':>10} | {'sent/step':>10} {'formula':>10} | {'x zero 1':>8} | step time")
    base = sum(results[0]["kept"].values())
    for zero, r in results.items():
        kept = sum(r["kept"].values())
        sent = sum(r["sent"].values())
        assert r["kept"] == r["predicted"], (zero, r)
        print(f"{zero:>4} | {r['kept']['weights']:>10,} {r['kept']['gradients']:>10,} {r['kept']['optimizer']:>10,} | "
              f"{kept / base:>10.1%} | {r['peaks']['bucket'] or 0:>11,} {r['peaks']['gathered'] or 0:>10,} | "
              f"{sent:>10,.0f} {formula[zero]:>10,.0f} | {sent / sum(results[1]['sent'].values()):>8.2f} | "
              f"{r['step_s'] * 1000:.0f} ms ({r['step_s'] / results[1]['step_s']:.2f} x zero 1)")
    print("sent per op:", {z: {op: round(v) for op, v in r["sent"].items()} for z, r in results.items()})
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}, {W} processes")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
