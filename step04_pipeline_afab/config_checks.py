"""You can skip this on first reading: what make_config (utils.py) refuses, and why.

The course's Llama computes what transformers.LlamaForCausalLM computes, for the configs it
accepts. A config.json can ask for more: another model_type, a sliding window, another activation,
dropout, partial or interleaved rotary embeddings, quantization, a RoPE type transformers does not
know, a shape the attention cannot split. Training on such a config would give a model that only
looks like the one asked for, so each of these stops the run here, in one line that names the key.
"""
import json
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
