"""Everything the trainers share that is not the lesson: flags, model presets, the learning
rate schedule, gradient clipping, metrics, and dumping parameters for the tests."""
import argparse
import copy
import json
import math
import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

# Published shapes (config.json of HuggingFaceTB/SmolLM-* and meta-llama/Llama-2-7b-hf); make_config gives
# these rms_norm_eps 1e-5 and plain RoPE with theta 10000.
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024,
                 tie_word_embeddings=False),
    "smollm-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                        max_position_embeddings=2048, tie_word_embeddings=True),
    "smollm-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                        num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
                        max_position_embeddings=2048, tie_word_embeddings=True),
    "smollm-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                        num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                        max_position_embeddings=2048, tie_word_embeddings=True),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, tie_word_embeddings=False),
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    # HuggingFaceTB/SmolLM2-360M
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
                         max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    # HuggingFaceTB/SmolLM2-1.7B
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                         max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 130000.0}),
    # meta-llama/Llama-3.2-1B (its rope_scaling: llama3, factor 32)
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                        max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}),
    # meta-llama/Llama-3.1-8B (its rope_scaling: llama3, factor 8)
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                        max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}),
}
OVERRIDES = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
             "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
             "head_dim": "head_dim", "intermediate_size": "intermediate_size", "vocab_size": "vocab_size",
             "tie_word_embeddings": "tie_word_embeddings"}
# What LlamaForCausalLM can be told that the course's model does not do: key -> the one value it takes.
NOT_IMPLEMENTED = {"hidden_act": "silu", "attention_dropout": 0.0, "sliding_window": None,
                   "use_sliding_window": False, "rope_interleaved": False, "partial_rotary_factor": 1.0,
                   "quantization_config": None}


def die(msg):
    """Stop with one line that says what to change (no traceback)."""
    raise SystemExit(f"error: {msg}")


def base_parser(description):
    p = argparse.ArgumentParser(description=description)
    a = p.add_argument
    a("--model", default="tiny", help=f"preset ({', '.join(PRESETS)}) or a directory with an HF config.json")
    for flag in OVERRIDES:
        a("--" + flag.replace("_", "-"), type=int, default=None, help="override the model's " + OVERRIDES[flag])
    a("--dataset", default=None, help="local .jsonl/.txt/.parquet/.csv file or directory, or a hub NAME[@REVISION] "
                                      "(default: bundled)")
    a("--tokenizer", default=None, help="local tokenizer directory or hub name (default: bundled)")
    a("--data-cache", default=None, help="folder of token files (default: course_tokens/ in the datasets cache, "
                                         "$HF_DATASETS_CACHE or $HF_HOME/datasets)")
    a("--max-tokens", type=int, default=None, help="tokenize at most N tokens of --dataset (default: all of a "
                                                   "local corpus, 100M of a hub dataset)")
    a("--seq-len", type=int, default=64)
    a("--micro-batch-size", type=int, default=8)
    a("--grad-acc-steps", type=int, default=1)
    a("--max-steps", type=int, default=300)
    a("--lr", type=float, default=3e-3)
    a("--warmup-steps", type=int, default=20)
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=1.0)
    a("--seed", type=int, default=42)
    a("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bfloat16 on cuda, float32 on cpu")
    a("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    a("--log-file", default=None, help="JSON lines, one object per optimizer step")
    a("--dump-params", default=None, help="directory: each rank writes its parameters at the end (tests)")
    return p


def make_config(args):
    """A transformers.LlamaConfig from --model plus the shape overrides, checked: anything the course's
    model would not compute exactly as LlamaForCausalLM does stops here, in one line naming the key.

    --hidden-size/--num-heads: head_dim follows them (hidden / heads), unless the model's head_dim was
    not hidden / heads (set on purpose in its config.json): that one is kept. --head-dim sets it."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if args.model in PRESETS:
        preset = copy.deepcopy(PRESETS[args.model])
        cfg = LlamaConfig(**{"rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                             **preset})
    elif (Path(args.model) / "config.json").is_file():
        try:
            model_type = json.loads((Path(args.model) / "config.json").read_text()).get("model_type")
            if model_type != "llama":
                die(f"{args.model}/config.json has model_type={model_type!r}; the course trains model_type "
                    f"'llama' (transformers.LlamaForCausalLM) only")
            cfg = LlamaConfig.from_pretrained(args.model)
        except Exception as e:  # unreadable JSON, or a value LlamaConfig's own validation refuses
            die(f"{args.model}/config.json: {str(e).strip().splitlines()[-1].strip()}")
    else:
        die(f"--model {args.model} is neither a preset ({', '.join(PRESETS)}) nor a directory with config.json")
    head_dim_follows = cfg.head_dim == cfg.hidden_size // cfg.num_attention_heads
    for flag, key in OVERRIDES.items():
        if getattr(args, flag) is not None:
            setattr(cfg, key, bool(getattr(args, flag)) if key == "tie_word_embeddings" else getattr(args, flag))
    if cfg.hidden_size % cfg.num_attention_heads:  # LlamaConfig refuses it even with an explicit head_dim
        die(f"hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_attention_heads}; "
            f"change --hidden-size or --num-heads")
    if args.head_dim is None and head_dim_follows:
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        die(f"num_heads={cfg.num_attention_heads} is not a multiple of num_kv_heads={cfg.num_key_value_heads}")
    if cfg.head_dim % 2:
        die(f"head_dim={cfg.head_dim} must be even for rotary embeddings; change --hidden-size, --num-heads "
            f"or --head-dim")
    rope = cfg.rope_parameters
    for key, value in NOT_IMPLEMENTED.items():
        got = rope.get(key, getattr(cfg, key, value)) if key == "partial_rotary_factor" else getattr(cfg, key, value)
        if got != value:
            die(f"{key}={got!r} is not implemented by the course's Llama (it needs {value!r}); "
                f"use a config without it")
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        die(f"rope_type {rope_type!r} is not one of transformers' RoPE types "
            f"(default, {', '.join(ROPE_INIT_FUNCTIONS)})")
    if args.seq_len > cfg.max_position_embeddings:  # also keeps 'dynamic' RoPE at its fixed frequencies
        die(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings="
            f"{cfg.max_position_embeddings}; lower --seq-len")
    original = rope.get("original_max_position_embeddings") or cfg.max_position_embeddings
    if rope_type == "longrope" and args.seq_len > original:
        die(f"rope_type 'longrope' switches to its long_factor beyond original_max_position_embeddings="
            f"{original}, which the course does not do; use --seq-len {original} or less")
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


def atomic_save_file(tensors, path, metadata=None):
    """safetensors' save_file under a temporary name, synced, given the usual mode, then renamed.

    Readers see the old file or the new one, never half of one; safetensors creates files 0600,
    this gives them 0666 minus the umask like any other file."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())  # on disk before it gets its final name
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)  # atomic on POSIX


def dump_params(model, directory, rank=0):
    """Write this rank's parameters (and how each is sliced) to DIR/rank{N}.safetensors (tests)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    tensors, meta = {}, {}
    for name, p in model.named_parameters():
        tensors[name] = p.detach().float().cpu().contiguous()
        meta[name] = ",".join(map(str, getattr(p, "shard", ())))  # step03+: (dim, index, count) of a slice
    atomic_save_file(tensors, os.path.join(directory, f"rank{rank}.safetensors"), meta)
