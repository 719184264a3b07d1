"""Config files: one JSON per experiment instead of a long command line.

    python config_maker.py --dp 2 --pp 2 --tp 2 --model smollm-135m --seq-len 1024 \
        --micro-batch-size 4 --grad-acc-steps 8 --out configs/my_run.json
    torchrun --nproc_per_node 8 train.py --config configs/my_run.json --max-steps 20

The file has sections (distributed, model, training, data, checkpoint, logging) whose keys
are train.py's flags (dashes or underscores). train.py reads it with apply_config_file:
the values become the parser's defaults, so any flag given on the command line still wins.
Unknown keys are an error, not silently ignored (a typo would otherwise train something else).
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

TRAIN = Path(__file__).resolve().parent / "train.py"

SECTIONS = {  # section -> flags (dests) this maker writes there
    "distributed": ["dp", "pp", "cp", "tp", "pp_engine"],
    "model": ["model", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
              "vocab_size", "tie_word_embeddings", "init_from_hf"],
    "training": ["seq_len", "micro_batch_size", "grad_acc_steps", "max_steps", "lr", "warmup_steps",
                 "weight_decay", "grad_clip", "seed", "dtype", "device"],
    "data": ["dataset", "tokenizer", "data_cache", "max_tokens"],
    "checkpoint": ["save_dir", "save_every", "keep_last", "resume", "export_hf"],
    "logging": ["log_file", "peak_tflops"],
}


def read_config(path, known):
    """Flatten a config file into {dest: value}; die on keys train.py does not have."""
    from utils import die

    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        die(f"--config {path}: {str(e).splitlines()[0]}")
    flat = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]  # a section, or a flag
        for k, v in items:
            flat[k.replace("-", "_")] = v
    unknown = sorted(set(flat) - set(known) - {"config"})
    if unknown:
        die(f"--config {path}: unknown key(s) {', '.join(unknown)}; keys are train.py's flags")
    return flat


def apply_config_file(parser, argv=None):
    """Add --config; if given, its values become defaults (so command-line flags override them)."""
    parser.add_argument("--config", default=None, help="JSON file of flag values (see config_maker.py); "
                                                       "flags on the command line override it")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        known = vars(parser.parse_args([]))  # every dest the trainer has, with its built-in default
        parser.set_defaults(**read_config(pre.config, known))


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
    train = os.path.relpath(Path(__file__).resolve().parent / "train.py")
    if world <= 8:
        print(f"run: torchrun --nproc_per_node {world} {train} --config {args.out}")
    else:  # more GPUs than one node has: see slurm.sbatch
        print(f"run: CONFIG={args.out} sbatch --nodes {world // 8} {os.path.dirname(train) or '.'}/slurm.sbatch"
              f"   (8 GPUs per node)")


if __name__ == "__main__":
    main()
