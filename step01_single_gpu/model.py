"""A Llama decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) in plain PyTorch.

Parameter names and shapes are those of `transformers.LlamaForCausalLM`, so its safetensors
load directly and the test suite can use transformers as the reference: any head_dim, q/k/v/o
biases (attention_bias), MLP biases (mlp_bias), tied or untied embeddings, and every RoPE type
whose frequencies are fixed (rope_frequencies). The file is written once for the whole course:
later steps parallelise the model from the outside, never by editing it.
  - attention infers its local head count from tensor shapes, so tensor parallelism can
    swap q/k/v/o for sharded linears (step03);
  - each block's input passes through an nn.Identity (`attn_entry`, `mlp_entry`), where
    tensor parallelism puts the communication a block's sharded linears need (step03);
  - layers sit in an nn.ModuleDict keyed by their global index, so a pipeline stage can
    drop the layers it does not own and keep HF names (step04);
  - attention calls `self.attn_fn`, so context parallelism can plug in ring attention
    and pass the positions of the tokens a rank holds (step06).
Reference: Touvron et al. 2023, "Llama 2"; Su et al. 2021, "RoFormer" (RoPE).
"""
import json
import zlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()  # normalise in float32 even under bf16 autocast, as HF does
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_frequencies(cfg):
    """RoPE's inverse frequencies (hd/2,) float32 on the CPU, and the factor cos/sin are scaled by.

    Every rope_type but the plain one comes from transformers' own table (linear, llama3, yarn, ...),
    so each matches LlamaForCausalLM by construction. transformers 5.x keeps the plain one out of the
    table (each model class computes it): below is LlamaRotaryEmbedding.compute_default_rope_parameters'
    formula, checked bit for bit by the tests, which spares every rank importing the modeling code.
    'dynamic' and 'longrope' change with the sequence length at run time; within the --seq-len that
    make_config allows they are these fixed frequencies.
    """
    rope_type = cfg.rope_parameters.get("rope_type", "default")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    with torch.device("cpu"):  # inside `with torch.device("meta")`: these values are computed, not drawn
        if rope_type == "default":
            theta = cfg.rope_parameters["rope_theta"]
            return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    return inv_freq.float(), float(attention_scaling)


def rope_cos_sin(position_ids, inv_freq, attention_scaling):
    """cos/sin tables for the given positions: (B, T) -> two (B, T, hd)."""
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hd)
    # scaled where transformers scales them (yarn, longrope: attention_scaling != 1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + hd/2) of x (B, H, T, hd) by the angle of each position."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def causal_attention(q, k, v):
    """q (B, H, T, hd), k/v (B, Hkv, T, hd) -> (B, H, T, hd). Query head h reads kv head h // (H/Hkv)."""
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)  # (B, H, T, hd)
    v = v.repeat_interleave(n_rep, dim=1)  # (B, H, T, hd)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        q_dim = cfg.num_attention_heads * self.head_dim
        kv_dim = cfg.num_key_value_heads * self.head_dim
        bias = getattr(cfg, "attention_bias", False)
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=bias)
        self.attn_fn = causal_attention  # step06: ring attention over the cp ranks

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        # -1 heads: the full count here, H/tp once tensor parallelism (step03) shards the projections
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.attn_fn(q, k, v)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        bias = getattr(cfg, "mlp_bias", False)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn_entry = nn.Identity()  # step03: the tensor-parallel block's input operator
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp_entry = nn.Identity()  # step03: the same for the MLP block
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.attn_entry(self.input_layernorm(x)), cos, sin)
        return x + self.mlp(self.mlp_entry(self.post_attention_layernorm(x)))


class LlamaBody(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # keyed by the global index: a pipeline stage (step04) keeps its layers under their HF names
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_attention_scaling = rope_frequencies(cfg)
        # a buffer: follows the model to its device; not persistent: state_dict keeps exactly the HF names
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)  # (hd/2,)

    def forward(self, x, position_ids=None):
        """x: token ids (B, T) -> logits (B, T, V). (step04: a pipeline stage without the embedding
        passes hidden states (B, T, D); step06: position_ids of the tokens a rank holds.)"""
        B, T = x.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device).expand(B, T)  # (B, T)
        cos, sin = rope_cos_sin(position_ids, self.rope_inv_freq, self.rope_attention_scaling)
        h = self.model.embed_tokens(x)  # (B, T, D)
        for layer in self.model.layers.values():
            h = layer(h, cos, sin)
        return self.lm_head(self.model.norm(h))  # (B, T, V)


def materialize(model, device):
    """Give a model built on the meta device real (uninitialised) storage on `device`.

    Unlike nn.Module.to_empty this keeps tied parameters tied and keeps the Python attributes
    that step03 on attaches to parameters (.shard, .replicas). Buffers (RoPE's frequencies) are
    computed on the CPU even under the meta device: they move with their values.
    """
    new = {}
    for module in model.modules():
        for name, b in list(module.named_buffers(recurse=False)):
            setattr(module, name, b.to(device))
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in new:
                q = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                q.__dict__.update(p.__dict__)
                new[id(p)] = q
            setattr(module, name, new[id(p)])
    return model


def full_shape(p):
    """The shape of the whole tensor this parameter is (a slice of)."""
    shape = list(p.shape)
    if hasattr(p, "shard"):  # step03+: p is full.chunk(count, dim)[index]
        dim, _, count = p.shard
        shape[dim] *= count
    return shape


def local_slice(full, p):
    if not hasattr(p, "shard"):
        return full
    dim, index, count = p.shard
    return full.chunk(count, dim)[index]


@torch.no_grad()
def init_weights(model, seed):
    """Initialise every parameter as a pure function of (seed, its HF name, its full shape).

    Each full tensor is drawn on the CPU from its own generator, then sliced, so any device
    and any parallel layout starts from exactly the same weights as this single-device run.
    """
    std = model.config.initializer_range
    for name, p in model.named_parameters():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            name = "model.embed_tokens.weight"  # step04: a last stage holds lm_head without the embedding
        if name.endswith("norm.weight"):
            full = torch.ones(full_shape(p))
        elif name.endswith(".bias"):  # linear biases start at zero, as transformers' _init_weights does
            full = torch.zeros(full_shape(p))
        else:
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
            full = torch.empty(full_shape(p)).normal_(0.0, std, generator=g)
        p.copy_(local_slice(full, p))


@torch.no_grad()
def load_hf_weights(model, path):
    """Copy a transformers Llama checkpoint (one or several *.safetensors) into `model`.

    Each parameter reads only its own slice from disk (safetensors get_slice).
    """
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        where = json.loads(index.read_text())["weight_map"]
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}; pass a directory written by save_pretrained")
        where = {}
        for f in files:
            with safe_open(f, "pt") as fh:
                where.update({k: f.name for k in fh.keys()})
    for name, p in model.named_parameters():
        key = name
        if key not in where and name == "lm_head.weight" and model.config.tie_word_embeddings:
            key = "model.embed_tokens.weight"
        if key not in where:
            raise KeyError(f"{key} missing from the checkpoint in {path}")
        with safe_open(path / where[key], "pt") as fh:
            sl = fh.get_slice(key)
            shape = list(sl.get_shape())
            if shape != full_shape(p):
                raise ValueError(f"{key}: checkpoint shape {shape} != model shape {full_shape(p)}; "
                                 f"the checkpoint's config.json does not match --model")
            if hasattr(p, "shard"):
                dim, index, count = p.shard
                n = shape[dim] // count
                idx = [slice(None)] * len(shape)
                idx[dim] = slice(index * n, (index + 1) * n)
                t = sl[tuple(idx)]
            else:
                t = sl[:]
        p.copy_(t)
