"""What sequence parallelism saves, measured: tensor parallelism with and without --sp.

    python notebooks/measure_sp.py                      # 4 layers, D = 256, T = 512, tp 2 and 4
    python notebooks/measure_sp.py --tp 2 --seq-len 256 --out sp.json

Records one optimizer step of step05 (a 2-stage pipeline, so that the messages between stages are
measured too) with notebooks/trace.py for each tp, with and without --sp, and prints per rank:
  - activation bytes saved for backward at the step's peak (trace.py's "mem" record: exact,
    device-independent), and how much of it lies outside the attention/MLP blocks (norms,
    residual stream, block entries, embedding, head);
  - bytes put on the wire per decoder layer and micro-batch over tp (the ring estimate "sent");
  - the bytes of one pipeline message (activations sent to the next stage).
Bytes, not times: nothing here depends on how loaded the machine is.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def record(tp, sp, args):
    out = Path(tempfile.mkdtemp(prefix="sp_"))
    flags = ["--model", "tiny", "--num-layers", args.layers, "--hidden-size", args.hidden,
             "--intermediate-size", 4 * args.hidden, "--num-heads", 4, "--num-kv-heads", 4,
             "--seq-len", args.seq_len, "--micro-batch-size", 1, "--grad-acc-steps", 2, "--max-steps", 1,
             "--pp", 2, "--tp", tp, "--dtype", "float32", "--device", "cpu", *(["--sp"] if sp else [])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(2 * tp),
           str(HERE / "trace.py"), "--out", str(out), str(REPO / "step05_pipeline_1f1b" / "train.py"),
           *map(str, flags)]
    subprocess.run(cmd, check=True, capture_output=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    recs = {int(f.stem[4:]): [json.loads(line) for line in f.read_text().splitlines()]
            for f in out.glob("rank*.jsonl")}
    return recs


def summarize(recs, layers):
    """Stage 0, tp rank 0 (rank 0): saved bytes, inside/outside the blocks; tp bytes per layer; message."""
    r0 = recs[0]
    mem = next(r for r in r0 if r["ev"] == "mem")
    inside = sum(v for k, v in mem["saved_by_module"].items() if k.endswith(("self_attn", "mlp")))
    tp_sent = defaultdict(int)
    for r in r0:
        if r["ev"] == "comm" and r["dim"] == "tp" and (r.get("module") or "").startswith("layers."):
            tp_sent[r["module"].split(".")[1]] += r["sent"]
    sends = [r["bytes"] for r in r0 if r["ev"] == "comm" and r["op"] == "isend"]
    n_layers_here = len(tp_sent) or 1
    return {"saved_peak": mem["saved_peak"], "saved_inside_blocks": inside,
            "saved_outside_blocks": sum(mem["saved_by_module"].values()) - inside,
            "tp_sent_per_layer_and_micro_batch": sum(tp_sent.values()) / n_layers_here / 2,
            "pp_message": sends[0] if sends else 0}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", default=None, help="also write the figures as JSON")
    args = p.parse_args()
    rows = {}
    for tp in args.tp:
        for sp in (False, True):
            rows[f"tp{tp}{' sp' if sp else ''}"] = summarize(record(tp, sp, args), args.layers)
    mib = 2**20
    print(f"{args.layers} layers, D = {args.hidden}, T = {args.seq_len}, 2 micro-batches of 1 sequence, float32, "
          f"pp = 2 (1F1B); rank 0 = stage 0, tp rank 0. MiB. 'peak': the most held at once for backward; "
          f"'outside'/'inside': saved during the step outside/inside the attention and MLP blocks")
    print(f"{'layout':<8} {'peak':>8} {'outside':>8} {'inside':>8} {'tp sent/layer/mb':>17} {'pp message':>11}")
    for name, r in rows.items():
        print(f"{name:<8} {r['saved_peak'] / mib:8.2f} {r['saved_outside_blocks'] / mib:8.2f} "
              f"{r['saved_inside_blocks'] / mib:8.2f} {r['tp_sent_per_layer_and_micro_batch'] / mib:17.2f} "
              f"{r['pp_message'] / mib:11.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
