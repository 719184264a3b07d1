"""You can skip this on first reading: what the trainers refuse, and why.

The course's Llama computes what transformers.LlamaForCausalLM computes, for the configs it
accepts. A config.json can ask for more: another model_type, a sliding window, another activation,
dropout, partial or interleaved rotary embeddings, quantization, a RoPE type transformers does not
know, a shape the attention cannot split. Training on such a config would give a model that only
looks like the one asked for, so each of these stops the run here, in one line that names the key.

The same goes for the flags (every number has a range, checked once they are parsed: Range,
check_flags), for files the trainer reads back (check_json: each entry has the type it needs),
and for the run itself: a step whose loss or gradient norm is not finite stops it before anything
is saved (stop_if_not_finite). A check that only some ranks can make, all ranks agree on (agree).
"""
import argparse
import json
import math
from pathlib import Path

# What LlamaForCausalLM can be told that the course's model does not do: key -> the one value it takes.
NOT_IMPLEMENTED = {"hidden_act": "silu", "attention_dropout": 0.0, "sliding_window": None,
                   "use_sliding_window": False, "rope_interleaved": False, "partial_rotary_factor": 1.0,
                   "quantization_config": None}


def read_llama_config(directory):
    """transformers.LlamaConfig of DIRECTORY/config.json; ValueError (one line) if it is not one."""
    from transformers import LlamaConfig

    try:
        model_type = json.loads((Path(directory) / "config.json").read_text()).get("model_type")
        if model_type == "llama":
            return LlamaConfig.from_pretrained(directory)
    except Exception as e:  # unreadable JSON, or a value LlamaConfig's own validation refuses
        raise ValueError(f"{directory}/config.json: {str(e).strip().splitlines()[-1].strip()}") from None
    raise ValueError(f"{directory}/config.json has model_type={model_type!r}; the course trains model_type "
                     f"'llama' (transformers.LlamaForCausalLM) only")


def check_config(cfg, seq_len):
    """ValueError (one line naming the key) for a config the course's model would not compute exactly."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if cfg.hidden_size % cfg.num_attention_heads:  # LlamaConfig refuses it even with an explicit head_dim
        raise ValueError(f"hidden_size={cfg.hidden_size} is not divisible by num_heads={cfg.num_attention_heads}; "
                         f"change --hidden-size or --num-heads")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"num_heads={cfg.num_attention_heads} is not a multiple of "
                         f"num_kv_heads={cfg.num_key_value_heads}")
    if cfg.head_dim % 2:
        raise ValueError(f"head_dim={cfg.head_dim} must be even for rotary embeddings; change --hidden-size, "
                         f"--num-heads or --head-dim")
    rope = cfg.rope_parameters
    for key, value in NOT_IMPLEMENTED.items():
        got = rope.get(key, getattr(cfg, key, value)) if key == "partial_rotary_factor" else getattr(cfg, key, value)
        if got != value:
            raise ValueError(f"{key}={got!r} is not implemented by the course's Llama (it needs {value!r}); "
                             f"use a config without it")
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not one of transformers' RoPE types "
                         f"(default, {', '.join(ROPE_INIT_FUNCTIONS)})")
    if seq_len > cfg.max_position_embeddings:  # also keeps 'dynamic' RoPE at its fixed frequencies
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}; lower --seq-len")
    original = rope.get("original_max_position_embeddings") or cfg.max_position_embeddings
    if rope_type == "longrope" and seq_len > original:
        raise ValueError(f"rope_type 'longrope' switches to its long_factor beyond "
                         f"original_max_position_embeddings={original}, which the course does not do; "
                         f"use --seq-len {original} or less")


def check_size(cfg, device=None):
    """ValueError if the model's float32 weights alone exceed the memory of every device of the job
    together (a typo such as --num-layers 100000 would otherwise fail deep inside an allocation)."""
    import os

    import torch

    D, L, V, hd = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.head_dim
    layer = D * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 3 * D * cfg.intermediate_size
    n = V * D * (1 if cfg.tie_word_embeddings else 2) + L * (layer + 2 * D) + D
    if device != "cpu" and torch.cuda.is_available():
        where, total = "GPUs", torch.cuda.get_device_properties(0).total_memory * int(os.environ.get("WORLD_SIZE", 1))
    else:
        where, total = "CPU memory", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * n > total:
        raise ValueError(f"the model has {n:,} parameters: their float32 weights alone need {4 * n / 2**30:,.0f} GiB, "
                         f"more than the {total / 2**30:,.0f} GiB of this job's {where}; lower --num-layers, "
                         f"--hidden-size, --intermediate-size or --vocab-size")


# --- flags ---
class Range:
    """An argparse type: an int (or a finite float) in [lo, hi]; lo excluded with above=True.
    Out of range, argparse stops with one line that names the flag and the range."""

    def __init__(self, kind, lo, hi=None, above=False):
        self.kind, self.lo, self.hi, self.above = kind, lo, hi, above
        self.__name__ = kind.__name__  # argparse's "invalid int value: 'x'" for what does not parse

    def __call__(self, value):
        try:
            v = self.kind(value)
            ok = (not isinstance(value, bool) and not (self.kind is int and isinstance(value, float))
                  and math.isfinite(v) and v >= self.lo and not (self.above and v == self.lo)
                  and (self.hi is None or v <= self.hi))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"{value} is not {self}")
        return v

    def __str__(self):
        what = "an integer" if self.kind is int else "a number"
        if self.hi is not None:
            hi = f"{self.hi:g}" if self.kind is float else f"{self.hi:,}"
            return f"{what} {'above' if self.above else 'from'} {self.lo} {'and at most' if self.above else 'to'} {hi}"
        return f"{what} {'>' if self.above else '>='} {self.lo}"


positive, nonneg = Range(int, 1), Range(int, 0)
positive_float, nonneg_float = Range(float, 0, above=True), Range(float, 0)


def check_flags(parser, args):
    """After parsing: a value that did not come through its flag's type (a config file's default)
    is checked against it here, so a JSON value out of range stops like a typed one."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if isinstance(action.type, Range) and value is not None:
            try:
                setattr(args, action.dest, action.type(value))
            except argparse.ArgumentTypeError as e:
                parser.error(f"argument {'/'.join(action.option_strings)}: {e}")
    return args


# --- the run ---
def stop_if_not_finite(step, loss, grad_norm, last_checkpoint=None):
    """Stop the run if step `step`'s loss or gradient norm is NaN or inf, before anything is saved.

    Both are host numbers already: the loss was read with .item(), which waited for the whole step,
    so reading the norm here waits for nothing. The norm is summed over every rank that holds a
    part of the model and the gradients are averaged over the replicas, so every rank takes the same
    branch (a non-finite loss makes non-finite gradients), and none is left in a collective."""
    grad_norm = float(grad_norm)
    bad = [f"{what} is {v}" for what, v in (("the loss", loss), ("the gradient norm", grad_norm))
           if not math.isfinite(v)]
    if bad:
        last = f" (the last good checkpoint is {last_checkpoint})" if last_checkpoint else ""
        raise SystemExit(f"error: step {step}: {' and '.join(bad)}; stopped, nothing saved{last}; "
                         f"lower --lr or raise --warmup-steps")


# --- what a run reads back ---
def check_json(value, schema, path="", what="a JSON file"):
    """ValueError (one line naming the entry) unless parsed JSON `value` has `schema`'s shape: a type
    (int is not bool), {key: schema} (every key present; the key `str` stands for any other), [schema]
    (a list of them) or (schema, ...) (a list of exactly these)."""
    def fail(expected):
        raise ValueError(f"{what}: {path or 'the top level'} should be {expected}, it is {value!r:.60}")

    if isinstance(schema, type):
        if not isinstance(value, schema) or (isinstance(value, bool) and schema is not bool):
            fail(f"of type {schema.__name__}")
    elif isinstance(schema, dict):
        if not isinstance(value, dict):
            fail("an object")
        for k, sub in schema.items():
            if k is not str and k not in value:
                raise ValueError(f"{what}: {path + '.' if path else ''}{k} is missing")
            for key in ([k] if k is not str else [x for x in value if x not in schema]):
                check_json(value[key], sub, f"{path}.{key}" if path else str(key), what)
    elif not isinstance(value, list) or (isinstance(schema, tuple) and len(value) != len(schema)):
        fail(f"a list of {len(schema)}" if isinstance(schema, tuple) else "a list")
    else:
        for i, v in enumerate(value):
            check_json(v, schema[i] if isinstance(schema, tuple) else schema[0], f"{path}[{i}]", what)


def agree(work, world):
    """Run work() on every rank, then all-gather over the world whether it failed and why: if one rank
    failed, every rank stops with its line, so none goes on into a collective the failed one never joins."""
    import torch.distributed as dist

    try:
        out, error = work(), ""
    except SystemExit as e:  # die(): this rank's one line
        out, error = None, str(e.code)
    except Exception as e:  # anything a damaged file raises that no check foresaw
        out, error = None, f"error: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    errors = [""] * world
    if world > 1:
        dist.all_gather_object(errors, error)  # all-gather over the world: a few bytes per rank
    else:
        errors = [error]
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        r, e = failed[0]
        raise SystemExit(e if len(failed) == world and len({x for _, x in failed}) == 1
                         else f"{e} (rank {r}; every rank stopped)")
    return out
