"""Tensor parallelism (Megatron-style): split every big weight matrix across the tp ranks.

Problem: a layer's weights (and their grads and Adam states) no longer fit on one GPU, or one
GPU is too slow for one layer. Data parallelism does not help: every dp rank holds a full copy.

Idea (Megatron-LM): pair the linears of a block. The first is column-parallel (each rank owns
out/tp output features, so it needs the full input and produces a slice of the output); the
second is row-parallel (each rank owns in/tp input features, consumes exactly that slice and
produces a partial sum of the full output). Attention splits by heads (q/k/v column, o row),
the MLP by intermediate features (gate/up column, down row). Everything between the two
linears (RoPE, attention, SiLU * up) is local: no communication inside a block.
Megatron's two operators (Shoeybi et al., Sec. 3 and Fig. 3) carry all of it:
  f = copy_to_tp:     identity forward, all-reduce over tp backward. Where a replicated x enters
                      column-parallel linears: each block's entry (`attn_entry`, `mlp_entry`, in
                      print(model) as CopyToTP), and lm_head.
  g = reduce_from_tp: all-reduce over tp forward, identity backward. Where row-parallel partial
                      sums leave: o_proj, down_proj, and the vocab-parallel embedding.

Communication, all over the tp group, activations x of shape (B, T, D):
  per decoder layer, forward:  2 all-reduces of B*T*D (o_proj, down_proj outputs are partial sums)
  per decoder layer, backward: 2 all-reduces of B*T*D (the grad wrt each block's input is a
      partial sum: q, k, v - or gate, up - saw the full input). One f per block, at its entry,
      serves all its column linears.
  embedding: 1 all-reduce of B*T*D forward (each rank embeds only the ids in its vocab range).
  lm_head: 1 all-reduce of B*T*D backward. Loss: 1 all-reduce of B*T (max) + 1 of 2*B*T floats.
  A ring all-reduce of N bytes sends and receives 2*(tp-1)/tp * N bytes per rank.
Memory: weights, grads and optimizer states of the linears/embedding are 1/tp per rank (norm
weights and row-parallel biases stay replicated); activations inside attention/MLP are 1/tp; the (B, T, D) activations
between blocks are replicated. The logits are never gathered: (B, T, V/tp) per rank.

Sequence parallelism (--sp; Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", Sec. 4.2.2) splits what lies between the blocks along the sequence: the
residual stream, the norms and what autograd saves for them are (B, T/tp, D) per rank. Entering a
block, an all-gather along T rebuilds the (B, T, D) its column linears read (their g; backward:
reduce-scatter); leaving it, a reduce-scatter along T replaces the all-reduce of the row-parallel
partial sums (their g-bar; backward: all-gather). The embedding's output is reduce-scattered and
lm_head's input all-gathered. A ring all-reduce is a reduce-scatter followed by an all-gather,
so the bytes are those of the all-reduces they replace: (tp-1)/tp * B*T*D sent per rank for
each. Memory saved per rank and layer: (tp-1)/tp of the (B, T, D) activations the norms and the
residual keep (the gathered block input is still saved whole, for the linears' weight grads),
and of every pipeline message. The norm weights (and row-parallel biases) now see T/tp tokens on
each rank, so their grads are partial sums over the sequence: allreduce_sequence_parallel_grads
sums them over tp.

Reference: Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language
Models Using Model Parallelism", arXiv:1909.08053.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from process_group_manager import all_gather_flat, reduce_scatter_flat


def _rank_size(group):
    """(rank, size) inside `group`; (0, 1) when no process group exists (single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _CopyToTP(torch.autograd.Function):
    """Megatron's f. Forward: identity (x is already replicated). Backward: all-reduce over tp,
    because every rank's column-parallel linear used x, so each rank holds a partial dL/dx."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        # clone: autograd may hand the same grad tensor to other branches; never reduce it in place
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)  # all-reduce (sum) over tp: partial input grads
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's g. Forward: all-reduce over tp (row-parallel outputs are partial sums).
    Backward: identity (the summed output is replicated: each rank's grad is the full dL/dy)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone(memory_format=torch.contiguous_format)  # do not mutate autograd's input
        dist.all_reduce(x, group=group)  # all-reduce (sum) over tp
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x, group):  # f
    return x if _rank_size(group)[1] == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):  # g
    return x if _rank_size(group)[1] == 1 else _ReduceFromTP.apply(x, group)


class CopyToTP(nn.Module):
    """Megatron's f as a module, for a block's entry: one all-reduce of dL/dx in backward serves
    all the block's column-parallel linears (q, k, v or gate, up)."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, x):
        return copy_to_tp(x, self.group)

    def extra_repr(self):
        return "f: identity forward, all-reduce over tp backward"


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b, W (out, in) split by rows: this rank owns out/tp output features (and their bias).
    Input x (..., in) replicated -> output (..., out/tp), sharded on the last dim."""

    def __init__(self, in_features, out_features, group, device=None, copy_input=True, sp=False, bias=False):
        super().__init__()
        rank, size = _rank_size(group)
        assert out_features % size == 0, f"tp={size} does not divide out_features={out_features}"
        self.group, self.in_features, self.out_features = group, in_features, out_features
        self.copy_input = copy_input  # False: the block's entry already applied f
        self.sp = sp  # --sp: the input is (..., T/tp, in), all-gathered along T instead of f
        self.weight = nn.Parameter(torch.empty(out_features // size, in_features, device=device))
        self.weight.shard = (0, rank, size)  # local = full.chunk(size, 0)[rank]
        self.bias = None
        if bias:  # one entry per output feature: sharded with them
            self.bias = nn.Parameter(torch.empty(out_features // size, device=device))
            self.bias.shard = (0, rank, size)

    def forward(self, x):
        if self.copy_input:
            x = gather_sequence(x, self.group) if self.sp else copy_to_tp(x, self.group)
        return F.linear(x, self.weight, self.bias)  # (..., out/tp)

    def extra_repr(self):
        bias = ", bias" if self.bias is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}/tp{bias} (column)"


class RowParallelLinear(nn.Module):
    """y = x W^T + b, W (out, in) split by columns: this rank owns in/tp input features; b is whole.
    Input x (..., in/tp) sharded (a column-parallel output) -> output (..., out) replicated."""

    def __init__(self, in_features, out_features, group, device=None, sp=False, bias=False):
        super().__init__()
        rank, size = _rank_size(group)
        assert in_features % size == 0, f"tp={size} does not divide in_features={in_features}"
        self.group, self.in_features, self.out_features = group, in_features, out_features
        self.sp = sp  # --sp: reduce-scatter along T instead of g's all-reduce
        self.weight = nn.Parameter(torch.empty(out_features, in_features // size, device=device))
        self.weight.shard = (1, rank, size)  # local = full.chunk(size, 1)[rank]
        # the same (out,) on every tp rank (no .shard): apply_tensor_parallel sets its .replicas
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    def forward(self, x):
        partial = F.linear(x, self.weight)  # (..., out): this rank's partial sum over in/tp
        if self.sp:  # (B, T, out) partial sums -> (B, T/tp, out) summed: this rank's tokens
            y = scatter_sequence(partial, self.group)
        else:
            y = reduce_from_tp(partial, self.group)  # g: all-reduce over tp -> full y on every rank
        # the bias once, after the sum: added to each partial sum it would count tp times
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        bias = ", bias after g" if self.bias is not None else ""
        return f"in_features={self.in_features}/tp, out_features={self.out_features} (row, then g{bias})"


class VocabParallelEmbedding(nn.Module):
    """Embedding table (V, D) split by rows: this rank owns ids [rank*V/tp, (rank+1)*V/tp).
    Ids outside that range give zeros; the all-reduce over tp fills in every row."""

    def __init__(self, num_embeddings, embedding_dim, group, device=None, sp=False):
        super().__init__()
        rank, size = _rank_size(group)
        assert num_embeddings % size == 0, f"tp={size} does not divide vocab={num_embeddings}"
        self.group, self.num_embeddings, self.embedding_dim = group, num_embeddings, embedding_dim
        self.sp = sp  # --sp: reduce-scatter along T instead of g's all-reduce
        self.weight = nn.Parameter(torch.empty(num_embeddings // size, embedding_dim, device=device))
        self.weight.shard = (0, rank, size)
        self.vocab_start = rank * (num_embeddings // size)

    def forward(self, ids):  # ids (B, T) global token ids
        lo, hi = self.vocab_start, self.vocab_start + self.weight.shape[0]
        outside = (ids < lo) | (ids >= hi)  # (B, T)
        local = (ids - lo).masked_fill(outside, 0)  # any valid row; zeroed below
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, D)
        if self.sp:  # reduce-scatter along T over tp: (B, T/tp, D), this rank's tokens
            return scatter_sequence(out, self.group)
        return reduce_from_tp(out, self.group)  # g, all-reduce over tp: exactly one rank is non-zero

    def extra_repr(self):
        return f"{self.num_embeddings}/tp, {self.embedding_dim} (vocab parallel)"


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss = logsumexp(z) - z[target] where z (..., V) lives as (..., V/tp) shards."""

    @staticmethod
    def forward(ctx, logits, targets, group):
        rank, size = _rank_size(group)
        v_local = logits.shape[-1]
        m = logits.detach().amax(dim=-1).float()  # (...) local max
        if size > 1:  # all-reduce MAX over tp: the global max, for a stable exp
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = logits.float() - m.unsqueeze(-1)  # (..., V/tp) float32, a new tensor
        lo = rank * v_local
        mine = (targets >= lo) & (targets < lo + v_local)  # (...) target id in this shard?
        t_local = (targets - lo).masked_fill(~mine, 0)  # (...)
        target_z = z.gather(-1, t_local.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)  # (...)
        exp = z.exp_()  # (..., V/tp), in place: z is ours
        stats = torch.stack([exp.sum(-1), target_z])  # (2, ...)
        if size > 1:  # all-reduce SUM over tp: global sum of exp, and the one non-zero target logit
            dist.all_reduce(stats, group=group)
        sum_exp, target_z = stats[0], stats[1]
        softmax = exp.div_(sum_exp.unsqueeze(-1))  # (..., V/tp) this rank's slice of softmax(z)
        ctx.save_for_backward(softmax, t_local, mine)
        ctx.logits_dtype = logits.dtype
        return sum_exp.log() - target_z  # (...) float32

    @staticmethod
    def backward(ctx, grad_loss):
        # d loss / d z = softmax - onehot(target); the onehot is non-zero only on the owning rank.
        softmax, t_local, mine = ctx.saved_tensors
        grad_loss = grad_loss.float()
        grad = softmax * grad_loss.unsqueeze(-1)  # (..., V/tp), out of place: safe to re-run
        grad.scatter_add_(-1, t_local.unsqueeze(-1), -(grad_loss * mine).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(logits, targets, group):
    """Per-token cross-entropy (...) float32 from local logits (..., V/tp) and global target ids
    (...); full logits are never gathered. Equals F.cross_entropy(full, targets, reduction='none')."""
    return _VocabParallelCrossEntropy.apply(logits, targets, group)


def _choices(values):
    g = math.gcd(*values)
    ds = [str(d) for d in range(1, g + 1) if g % d == 0]
    return ds[0] if len(ds) == 1 else ", ".join(ds[:-1]) + " or " + ds[-1]


def check_tp_divisibility(config, tp):
    """Raise ValueError (one line, with the fix) unless tp divides every sharded dimension."""
    shapes = {"num_attention_heads": config.num_attention_heads,
              "num_key_value_heads": getattr(config, "num_key_value_heads", None)
              or config.num_attention_heads,
              "intermediate_size": config.intermediate_size,
              "vocab_size": config.vocab_size}
    for name, value in shapes.items():
        if tp < 1 or value % tp:
            pad = f" (or pad vocab_size to a multiple of {tp})" if name == "vocab_size" and tp > 0 else ""
            raise ValueError(f"--tp {tp} does not divide {name}={value}; "
                             f"use --tp {_choices(shapes.values())}{pad}")


def apply_tensor_parallel(model, group, sp=False):
    """Swap the Llama's linears/embedding for tp-sharded ones, in place (meta model is fine).
    After this, model(x) returns logits (B, T, V/tp): use vocab_parallel_cross_entropy for the
    loss. Modules that are missing, None or nn.Identity are skipped (step04: a pipeline stage).
    sp: sequence parallelism (see the module docstring)."""
    _, tp = _rank_size(group)
    check_tp_divisibility(model.config, tp)  # before touching anything

    def swap(parent, name, cls, **kw):
        old = getattr(parent, name, None)
        if isinstance(old, nn.Linear):
            setattr(parent, name, cls(old.in_features, old.out_features, group, old.weight.device,
                                      bias=old.bias is not None, **kw))

    entry = GatherSequence if sp else CopyToTP  # --sp: the block's input arrives split along T
    for layer in model.model.layers.values():
        layer.attn_entry = entry(group)  # f: q, k and v read the block's input
        for name in ("q_proj", "k_proj", "v_proj"):  # split by heads
            swap(layer.self_attn, name, ColumnParallelLinear, copy_input=False)
        swap(layer.self_attn, "o_proj", RowParallelLinear, sp=sp)
        layer.mlp_entry = entry(group)  # f: gate and up read the block's input
        for name in ("gate_proj", "up_proj"):  # split by intermediate features
            swap(layer.mlp, name, ColumnParallelLinear, copy_input=False)
        swap(layer.mlp, "down_proj", RowParallelLinear, sp=sp)

    emb = getattr(model.model, "embed_tokens", None)
    if isinstance(emb, nn.Embedding):
        model.model.embed_tokens = VocabParallelEmbedding(
            emb.num_embeddings, emb.embedding_dim, group, emb.weight.device, sp=sp)
    swap(model, "lm_head", ColumnParallelLinear, sp=sp)  # f on its input; logits stay sharded over the vocab
    new_emb = getattr(model.model, "embed_tokens", None)
    if (model.config.tie_word_embeddings and isinstance(new_emb, VocabParallelEmbedding)
            and isinstance(getattr(model, "lm_head", None), ColumnParallelLinear)):
        model.lm_head.weight = new_emb.weight  # same shard (0, rank, tp) of the same (V, D) table

    for p in model.parameters():  # norms, row-parallel biases: tp identical copies in the grad-norm group
        if not hasattr(p, "shard"):
            p.replicas = tp
    return model


# ---------------------------------------------------------------- sequence parallel (--sp)
def _all_gather_t(x, group):
    """(B, T/tp, D) on each rank -> (B, T, D): rank r's tokens land at rows [r T/tp, (r+1) T/tp)."""
    x = x.transpose(0, 1).contiguous()  # (T/tp, B, D): the all-gather concatenates dim 0
    out = x.new_empty(dist.get_world_size(group) * x.shape[0], *x.shape[1:])  # (T, B, D)
    all_gather_flat(out, x, group)  # all-gather over tp
    return out.transpose(0, 1).contiguous()  # (B, T, D); one copy here, not one in each linear reading it


def _reduce_scatter_t(x, group):
    """(B, T, D) partial sums on each rank -> (B, T/tp, D): the sum over tp of this rank's rows."""
    x = x.transpose(0, 1).contiguous()  # (T, B, D)
    out = x.new_empty(x.shape[0] // dist.get_world_size(group), *x.shape[1:])  # (T/tp, B, D)
    reduce_scatter_flat(out, x, group)  # reduce-scatter (sum) over tp
    return out.transpose(0, 1)  # (B, T/tp, D)


class _GatherSequence(torch.autograd.Function):
    """Korthikanti et al.'s g. Forward: all-gather along T. Backward: reduce-scatter along T (every
    rank's linears used the whole sequence: their dL/dx are partial sums; keep this rank's rows)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_t(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_t(grad, ctx.group), None


class _ScatterSequence(torch.autograd.Function):
    """Korthikanti et al.'s g-bar. Forward: reduce-scatter along T (partial sums -> this rank's
    summed tokens). Backward: all-gather along T (each rank holds dL/dy of its own tokens only)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_t(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_t(grad, ctx.group), None


def gather_sequence(x, group):  # g of sequence parallelism
    return x if _rank_size(group)[1] == 1 else _GatherSequence.apply(x, group)


def scatter_sequence(x, group):  # g-bar of sequence parallelism
    return x if _rank_size(group)[1] == 1 else _ScatterSequence.apply(x, group)


class GatherSequence(nn.Module):
    """--sp: a block's entry all-gathers its (B, T/tp, D) input along T, in place of f."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, x):
        return gather_sequence(x, self.group)

    def extra_repr(self):
        return "all-gather along T over tp forward, reduce-scatter backward"


def check_sp(tokens, tp):
    """Raise ValueError (one line) unless the `tokens` of a sequence on each rank split over tp."""
    if tokens % tp:
        raise ValueError(f"--sp splits the {tokens} tokens of a sequence on each rank over --tp {tp}, "
                         f"which does not divide them; change --seq-len")


def allreduce_sequence_parallel_grads(params, group):
    """All-reduce (sum) over tp the grads of the weights every tp rank holds whole (the norm gains,
    and the row-parallel biases o_proj.bias and down_proj.bias if the model has them).

    Under --sp each rank's norms (and row biases) saw only its T/tp tokens, so each of these grads is
    a partial sum over the sequence; their sum is the grad of the whole sequence, then the same on
    every rank. One flat all-reduce per step, after backward and before clipping."""
    grads = [p.grad for p in params if not hasattr(p, "shard") and p.grad is not None]
    if not grads or _rank_size(group)[1] == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # (n,)
    dist.all_reduce(flat, group=group)  # all-reduce (sum) over tp
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))
