"""Smoke test on a GPU: every step's train.py, CUDA + NCCL, bf16, a few steps, one table.

The test suite runs on CPU (gloo, float32); this is the check that the same code also runs
where it is meant to: NCCL process groups, bf16 autocast, fused AdamW, CUDA memory stats.
Each step folder of the repository runs in its own torchrun subprocess (world size --nproc,
default 1, so any machine with one GPU will do); a step passes if it exits 0 and logs
--max-steps finite losses. "vs first" compares each step's last loss with the first step
folder's: at world size 1 every step trains the same model on the same data, so they should
agree to bf16 noise (a few 1e-3), and a larger gap is worth a look.
"""
import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent  # tools/ -> step07_4d_combined/ -> the repository


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(step_dir, args, log):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(step_dir / "train.py"),
           "--model", args.model, "--seq-len", str(args.seq_len), "--max-steps", str(args.max_steps),
           "--device", args.device, "--dtype", args.dtype, "--log-file", str(log)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        rc, out = "timeout", ""
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()] if log.exists() else []
    ok = rc == 0 and len(losses) == args.max_steps and all(math.isfinite(v) for v in losses)
    return ok, rc, losses, time.perf_counter() - t0, out


def main(argv=None):
    p = argparse.ArgumentParser(description="run every step's train.py on CUDA + NCCL for a few steps")
    p.add_argument("--model", default="tiny")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=5)
    p.add_argument("--nproc", type=int, default=1, help="processes per step (GPUs)")
    p.add_argument("--timeout", type=int, default=600, help="seconds per step")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: the same table on gloo, to test this script on a machine without a GPU")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    import torch

    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        sys.exit(f"error: gpu_smoke.py needs {args.nproc} CUDA GPU(s) and sees {torch.cuda.device_count()}; "
                 f"run it on a GPU machine (or pass --device cpu to test the script itself)")
    steps = sorted(d for d in REPO.glob("step0*") if (d / "train.py").is_file())
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{len(steps)} steps | {device} x {args.nproc} | {args.model} seq {args.seq_len} | "
          f"{args.dtype} | {args.max_steps} steps each")
    print(f"{'step':28s} {'result':6s} {'time':>7s} {'first loss':>10s} {'last loss':>10s} {'vs first':>9s}")
    failed, ref = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for d in steps:
            ok, rc, losses, dt, out = run(d, args, Path(tmp) / f"{d.name}.jsonl")
            if ok and ref is None:
                ref = losses[-1]
            first = f"{losses[0]:.4f}" if losses else "-"
            last = f"{losses[-1]:.4f}" if losses else "-"
            rel = f"{abs(losses[-1] - ref) / abs(ref):.1e}" if ok and ref else "-"
            print(f"{d.name:28s} {'PASS' if ok else 'FAIL':6s} {dt:6.1f}s {first:>10s} {last:>10s} {rel:>9s}",
                  flush=True)
            if not ok:
                failed.append((d.name, rc, out))
    for name, rc, out in failed:
        print(f"\n--- {name}: exit {rc}, last lines ---\n" + "\n".join(out.strip().splitlines()[-15:]))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
