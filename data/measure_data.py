"""Measure the data pipeline on a corpus far larger than the bundled one. Prints figures; it is not a test.

Makes a corpus of about --mb MB from this machine's Python sources (the standard library's .py
files, then site-packages', one document per file, in sorted order) as OUT/py_sources.jsonl, then
launches step07 with --dp N on N local processes, the same tiny model and flags every time:
  bundled   the bundled corpus (its token file built first, so this is a warm start)
  cold      the big corpus with an empty --data-cache: one rank tokenizes, the others wait
  warm      the big corpus again: every rank maps the token file built by `cold`
and prints the time from launch to the first logged step, the logging rank's peak RSS (`mem`
in the log line is ru_maxrss on CPU), and the tokenizing throughput from the token file's header.

    python data/measure_data.py                  # about 2 minutes on 2 cores
    python data/measure_data.py --repo OTHER     # the same runs with another checkout's trainer
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLAGS = ["--model", "tiny", "--seq-len", "64", "--micro-batch-size", "2", "--max-steps", "3",
         "--dtype", "float32", "--device", "cpu"]


def make_corpus(path, mb):
    """One JSON line per .py file (stdlib first, then site-packages) until `mb` MB of text."""
    stdlib, site = Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])
    files = sorted(f for f in stdlib.rglob("*.py") if site not in f.parents) + sorted(site.rglob("*.py"))
    n_bytes = n_docs = 0
    with open(path, "w") as out:
        for f in files:
            text = f.read_text(errors="replace")
            out.write(json.dumps({"path": str(f), "text": text}) + "\n")
            n_bytes, n_docs = n_bytes + len(text.encode()), n_docs + 1
            if n_bytes >= mb * 1e6:
                break
    return n_docs, n_bytes


def launch(repo, nproc, extra, log):
    """step07 on nproc processes -> (seconds to the first logged step, peak RSS GiB, losses)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           str(Path(repo) / "step07_4d_combined" / "train.py"), *FLAGS, "--dp", str(nproc), *extra,
           "--log-file", str(log)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    t0, first = time.perf_counter(), None
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-30:]
        if first is None and re.match(r"step +0 \|", line):
            first = time.perf_counter() - t0
    if proc.wait() != 0 or first is None:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{''.join(tail)}")
    metrics = [json.loads(line) for line in Path(log).read_text().splitlines()]
    return first, max(m["mem_gib"] for m in metrics), [m["loss"] for m in metrics]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/course_measure_data", help="corpus, token caches and logs go here")
    p.add_argument("--mb", type=float, default=60, help="size of the big corpus in MB of text")
    p.add_argument("--nproc", type=int, default=4, help="processes (= --dp)")
    p.add_argument("--repo", default=str(REPO), help="checkout whose step07 runs (an older one: no --data-cache)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "py_sources.jsonl"
    n_docs, n_bytes = make_corpus(data, args.mb)
    print(f"corpus {data}: {n_docs:,} documents, {n_bytes / 1e6:.1f} MB of text")

    cached = "--data-cache" in (Path(args.repo) / "step07_4d_combined" / "utils.py").read_text()
    cache = lambda name: ["--data-cache", str(out / name)] if cached else []
    load0 = os.getloadavg()[0]
    shutil.rmtree(out / "cache_big", ignore_errors=True)  # cold means cold
    launch(args.repo, args.nproc, cache("cache_bundled"), out / "bundled0.jsonl")  # builds the bundled token file
    runs = {"bundled": cache("cache_bundled"), "cold": ["--dataset", str(data), *cache("cache_big")],
            "warm": ["--dataset", str(data), *cache("cache_big")]}
    results = {name: launch(args.repo, args.nproc, extra, out / f"{name}.jsonl") for name, extra in runs.items()}

    cores = len(os.sched_getaffinity(0))
    print(f"step07 --dp {args.nproc}, {' '.join(FLAGS)}; {cores} cores for {args.nproc} processes: timings are "
          f"oversubscribed and include every process's start-up (imports, gloo); load average before/after: "
          f"{load0:.1f}/{os.getloadavg()[0]:.1f} (other users' processes slow everything down)")
    for name, (first, rss, losses) in results.items():
        print(f"{name:8s} first logged step after {first:6.1f} s | logging rank's peak RSS {rss:.2f} GiB | "
              f"losses {', '.join(f'{x:.4f}' for x in losses)}")
    (b, rb, _), (c, rc, lc), (w, rw, lw) = results["bundled"], results["cold"], results["warm"]
    print(f"goals: warm {w:.1f} s <= 1.5 x bundled + 3 s = {1.5 * b + 3:.1f} s: {w <= 1.5 * b + 3} | "
          f"RSS {max(rc, rw):.2f} <= bundled + 0.15 = {rb + 0.15:.2f} GiB: {max(rc, rw) <= rb + 0.15} | "
          f"cold {c:.1f} s < 75 s: {c < 75} | cold and warm losses identical: {lc == lw}")
    for header in (out / "cache_big").glob("*.json") if cached else ():
        h = json.loads(header.read_text())
        print(f"token file {header.with_suffix('.bin').name}: {h['n_tokens']:,} tokens ({h['dtype']}), "
              f"{h['n_documents']:,} documents, built in {h['build_s']:.1f} s = {h['n_tokens'] / h['build_s']:,.0f} "
              f"tokens/s (load + tokenize + write, while {args.nproc - 1} ranks wait)")


    if cached:  # the same build alone, in one process: its wall time and CPU time (user + sys, all processes)
        shutil.rmtree(out / "cache_alone", ignore_errors=True)
        code = ("import sys; sys.path.insert(0, 'step01_single_gpu'); import data as D; "
                "D.load_sequences(sys.argv[1], D.load_tokenizer(D.DEFAULT_TOKENIZER), 64, 8, cache_dir=sys.argv[2])")
        before, t0 = os.times(), time.perf_counter()
        subprocess.run([sys.executable, "-c", code, str(data), str(out / "cache_alone")], cwd=args.repo, check=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), capture_output=True)
        wall, after = time.perf_counter() - t0, os.times()
        cpu = after.children_user + after.children_system - before.children_user - before.children_system
        n = json.loads(next((out / "cache_alone").glob("*.json")).read_text())["n_tokens"]
        print(f"tokenizing alone (python start-up included): {wall:.1f} s wall = {n / wall:,.0f} tokens/s; "
              f"{cpu:.1f} CPU-s = {n / cpu:,.0f} tokens per CPU-second")


if __name__ == "__main__":
    main()
