"""Everything the trainers share that is not the lesson: flags, the model's config (a preset is a
Hugging Face config.json in data/models/), the learning rate schedule, gradient clipping, metrics,
and dumping parameters for the tests."""
import argparse
import json
import math
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from config_checks import (Range, agree, check_config, check_flags, check_json, check_size, nonneg,  # noqa: F401
                           nonneg_float, positive, positive_float, read_llama_config, stop_if_not_finite)
from tensor_files import atomic_save_file, dump_params, file_crc32  # noqa: F401  (for train.py and the checkpoints)

MODELS = Path(__file__).resolve().parent.parent / "data" / "models"  # a preset: MODELS/NAME/config.json
PRESETS = sorted(p.name for p in MODELS.iterdir() if (p / "config.json").is_file()) if MODELS.is_dir() else []
OVERRIDES = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
             "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
             "head_dim": "head_dim", "intermediate_size": "intermediate_size", "vocab_size": "vocab_size",
             "tie_word_embeddings": "tie_word_embeddings"}


def die(msg):
    """Stop with one line that says what to change (no traceback)."""
    raise SystemExit(f"error: {msg}")


class Parser(argparse.ArgumentParser):
    """argparse, with each number checked against its range (config_checks.py) and one line per error."""

    def parse_args(self, args=None, namespace=None):
        return check_flags(self, super().parse_args(args, namespace))

    def error(self, message):
        die(f"{message} (see --help)")


def base_parser(description):
    p = Parser(description=description)
    a = p.add_argument
    a("--model", default="tiny", help=f"preset ({', '.join(PRESETS)}) or a directory with an HF config.json")
    for flag in OVERRIDES:
        a("--" + flag.replace("_", "-"), type=Range(int, 0, 1) if flag == "tie_word_embeddings" else positive,
          default=None, help="override the model's " + OVERRIDES[flag])
    a("--dataset", default=None, help="local .jsonl/.txt/.parquet/.csv file or directory, or a hub NAME[@REVISION] "
                                      "(default: bundled)")
    a("--text-column", default=None, help="the corpus's column of documents (default: `text`, else its only "
                                          "column of strings)")
    a("--tokenizer", default=None, help="local tokenizer directory or hub name (default: bundled)")
    a("--data-cache", default=None, help="folder of token files (default: course_tokens/ in the datasets cache, "
                                         "$HF_DATASETS_CACHE or $HF_HOME/datasets)")
    a("--max-tokens", type=positive, default=None, help="tokenize at most N tokens of --dataset (default: all of "
                                                        "a local corpus, 100M of a hub dataset)")
    a("--seq-len", type=positive, default=64)
    a("--micro-batch-size", type=positive, default=8)
    a("--grad-acc-steps", type=positive, default=1)
    a("--max-steps", type=nonneg, default=300)  # 0: no step (step07: convert or export)
    a("--lr", type=Range(float, 0, 1e3), default=3e-3)  # 0: a step that changes nothing (tests)
    a("--warmup-steps", type=nonneg, default=20)
    a("--weight-decay", type=nonneg_float, default=0.1)
    a("--grad-clip", type=positive_float, default=1.0)
    a("--seed", type=Range(int, 0, 2**32 - 1), default=42)
    a("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bfloat16 on cuda, float32 on cpu")
    a("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    a("--log-file", default=None, help="JSON lines, one object per optimizer step")
    a("--dump-params", default=None, help="directory: each rank writes its parameters at the end (tests)")
    return p


def batch_note(G, micro_batch_size):
    """What the first log line adds when the global batch G is not step01's default, the one whose
    losses the READMEs compare with: how to match it."""
    default = 8  # base_parser's --micro-batch-size 8 x --grad-acc-steps 1
    if G == default:
        return ""
    micro_batches = G // micro_batch_size  # per optimizer step, over all ranks
    how = (f"--micro-batch-size {default // micro_batches} matches it" if default % micro_batches == 0
           else f"step01 with --micro-batch-size {G} runs this batch")
    return f" (step01's default is {default}: {how})"


def make_config(args, device=None):
    """A transformers.LlamaConfig from --model (a preset, or a directory with a Hugging Face config.json)
    plus the shape overrides, checked: anything the course's model would not compute exactly as
    LlamaForCausalLM does stops here, in one line naming the key (config_checks.py). With the run's
    `device`, so does a model whose float32 weights alone exceed the job's memory.

    --hidden-size/--num-heads: head_dim follows them (hidden / heads), unless the model's head_dim was
    not hidden / heads (set on purpose in its config.json): that one is kept. --head-dim sets it."""
    directory = str(MODELS / args.model) if args.model in PRESETS else args.model  # the same path for both
    if not (Path(directory) / "config.json").is_file():
        die(f"--model {args.model} is neither a preset ({', '.join(PRESETS)}) nor a directory with config.json")
    try:
        cfg = read_llama_config(directory)
        head_dim_follows = cfg.head_dim == cfg.hidden_size // cfg.num_attention_heads
        for flag, key in OVERRIDES.items():
            if getattr(args, flag) is not None:
                setattr(cfg, key, bool(getattr(args, flag)) if key == "tie_word_embeddings" else getattr(args, flag))
        if args.head_dim is None and head_dim_follows:
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        check_config(cfg, args.seq_len)
        if device:  # a run on it: the weights must fit
            check_size(cfg, device)
    except ValueError as e:
        die(str(e))
    return cfg


def resolve_device_dtype(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda but no GPU is visible; use --device cpu")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    return device, dtype


def lr_at(step, args):
    """Linear warmup to --lr, then cosine decay to lr/10 at --max-steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def clip_grad_norm_(params, max_norm, group=None):
    """Scale gradients so their global L2 norm is at most max_norm; return the norm before.

    From step03 on a model is split over ranks: a parameter present on k ranks of `group`
    (p.replicas = k) counts once, sharded ones add up their slices, and summing the squares over
    `group` makes the norm that of the whole model. No .item(): the norm stays on the device, so
    there is no host sync here.
    """
    params = [p for p in params if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for p in params:
        sq += p.grad.float().pow(2).sum() / getattr(p, "replicas", 1)
    if group is not None:
        dist.all_reduce(sq, group=group)  # all-reduce (sum) over the model-parallel group
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef)
    return norm


def memory_gib(device):
    """Peak memory of this process: allocated on the GPU, resident (RSS) on the CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class Metrics:
    """One JSON object per optimizer step in --log-file, and a human line on stdout."""

    def __init__(self, path, enabled=True):
        self.enabled = enabled
        self.file = open(path, "w") if (path and enabled) else None

    def log(self, **m):
        if not self.enabled:
            return
        line = (f"step {m['step']:4d} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | grad_norm {m['grad_norm']:.3f}"
                f" | {m['step_time_s'] * 1000:.0f} ms | {m['tokens_per_s']:,.0f} tok/s | mem {m['mem_gib']:.2f} GiB")
        known = {"step", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "mem_gib", "tokens"}
        for k, v in m.items():
            if k not in known:
                line += f" | {k} {v:.2f}" if isinstance(v, float) else f" | {k} {v}"
        print(line, flush=True)
        if self.file:
            self.file.write(json.dumps(m) + "\n")
            self.file.flush()

    def summary(self, **m):
        """Facts about the whole run, once at its end (step04: the pipeline's activations in flight):
        a human line, and a JSON object with "summary": true in the log file."""
        if not self.enabled:
            return
        print("run | " + " | ".join(f"{k} {v}" for k, v in m.items()), flush=True)
        if self.file:
            self.file.write(json.dumps({"summary": True, **m}) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
