"""Write a train.py --config file from flags (README.md has the commands).

The file has sections (distributed, model, training, data, checkpoint, logging) whose keys are
train.py's flags; only the values given are written, so the trainer's defaults fill in the rest.
--set KEY=VALUE adds any other flag train.py has. It prints the world size, the tokens per step
and the command that runs the file. train.py reads it with config_file.py.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # step07_4d_combined/tools
TRAIN = HERE.parent / "train.py"

SECTIONS = {  # section -> flags (dests) this maker writes there
    "distributed": ["dp", "pp", "cp", "tp", "pp_engine"],
    "model": ["model", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
              "vocab_size", "tie_word_embeddings", "init_from_hf"],
    "training": ["seq_len", "micro_batch_size", "grad_acc_steps", "max_steps", "lr", "warmup_steps",
                 "weight_decay", "grad_clip", "seed", "dtype", "device"],
    "data": ["dataset", "tokenizer", "data_cache", "max_tokens", "text_column"],
    "checkpoint": ["save_dir", "save_every", "keep_last", "resume", "export_hf"],
    "logging": ["log_file", "peak_tflops"],
}


def make(args):
    """The config dict for these maker flags: only values that differ from the trainer's defaults."""
    cfg = {}
    for section, keys in SECTIONS.items():
        values = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
        if values:
            cfg[section] = values
    known = trainer_flags() if args.set else set()
    for item in args.set:
        k, _, v = item.partition("=")
        k = k.replace("-", "_")
        if k not in known:
            raise SystemExit(f"error: --set {item}: train.py has no flag --{k.replace('_', '-')}; "
                             f"see `python {os.path.relpath(TRAIN)} --help`")
        try:
            v = json.loads(v)
        except ValueError:
            pass  # a plain string
        cfg.setdefault("extra", {})[k] = v
    return cfg


def trainer_flags():
    """The flags train.py takes (as dests), read from its --help so that this list cannot go stale."""
    out = subprocess.run([sys.executable, str(TRAIN), "--help"], capture_output=True, text=True).stdout
    return {f.replace("-", "_") for f in re.findall(r"--([a-z][a-z0-9-]*)", out)}


def main(argv=None):
    p = argparse.ArgumentParser(description="write a train.py --config file")
    for section, keys in SECTIONS.items():
        g = p.add_argument_group(section)
        for k in keys:
            typ = float if k in ("lr", "weight_decay", "grad_clip", "peak_tflops") else (
                int if k in ("dp", "pp", "cp", "tp", "num_layers", "hidden_size", "num_heads", "num_kv_heads",
                             "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings", "seq_len",
                             "micro_batch_size", "grad_acc_steps", "max_steps", "warmup_steps", "seed",
                             "save_every", "max_tokens", "keep_last") else str)
            g.add_argument("--" + k.replace("_", "-"), type=typ, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other train.py flag, e.g. --set bucket_size_mb=50 (repeatable)")
    p.add_argument("--out", required=True, help="the JSON file to write")
    args = p.parse_args(argv)
    cfg = make(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(cfg, indent=2) + "\n")
    d = {k: getattr(args, k) or 1 for k in ("dp", "pp", "cp", "tp")}
    world = d["dp"] * d["pp"] * d["cp"] * d["tp"]
    mbs, acc, T = args.micro_batch_size or 8, args.grad_acc_steps or 1, args.seq_len or 64
    print(f"{args.out}: world {world} = dp {d['dp']} x pp {d['pp']} x cp {d['cp']} x tp {d['tp']} | "
          f"global batch {mbs * acc * d['dp']} sequences x {T} tokens = {mbs * acc * d['dp'] * T:,} tokens/step")
    train = os.path.relpath(TRAIN)
    if world <= 8:
        print(f"run: torchrun --nproc_per_node {world} {train} --config {args.out}")
    else:  # more GPUs than one node has: see slurm.sbatch
        print(f"run: CONFIG={args.out} sbatch --nodes {world // 8} {os.path.relpath(HERE / 'slurm.sbatch')}"
              f"   (8 GPUs per node)")


if __name__ == "__main__":
    main()
