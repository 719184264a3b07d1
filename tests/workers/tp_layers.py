"""Worker for tests/test_tensor_parallel_layers.py, run under torchrun (gloo, CPU).

argv[1]: the directory holding tensor_parallel.py. Every rank draws the same FULL tensors from
fixed seeds, keeps its shard, and checks outputs and input/weight gradients against the
unsharded PyTorch ops (float32, atol 1e-5). Checked on the world group, on tp sub-groups
(group rank != global rank) when world == 4, and on size-1 groups (must be no-ops).
"""
import sys
from types import SimpleNamespace as LlamaConfig  # the fields used here; no transformers import (slow)

sys.path.insert(0, sys.argv[1])

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.nn  # noqa: E402,F401  (before any group: see process_group_manager.py)
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tensor_parallel import (ColumnParallelLinear, GatherSequence, RowParallelLinear,  # noqa: E402
                             VocabParallelEmbedding, allreduce_sequence_parallel_grads,
                             apply_tensor_parallel, copy_to_tp, gather_sequence, reduce_from_tp,
                             scatter_sequence, vocab_parallel_cross_entropy)

ATOL = 1e-5


def close(what, got, want, atol=ATOL):
    assert got.shape == want.shape, f"rank {dist.get_rank()} {what}: shape {got.shape} vs {want.shape}"
    err = (got.float() - want.float()).abs().max().item()
    assert err <= atol, f"rank {dist.get_rank()} {what}: max abs err {err:.3e} > {atol}"


def full(*shape, seed):  # identical on every rank
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def leaf(t):
    return t.detach().clone().requires_grad_()


def check_linears(group):
    r, tp = dist.get_rank(group), dist.get_world_size(group)
    x, g = full(2, 5, 8, seed=1), full(2, 5, 8, seed=4)
    w1, w2 = full(12, 8, seed=2) / 8**0.5, full(8, 12, seed=3) / 12**0.5  # O(1) outputs

    # column: x (2,5,8) replicated -> y (2,5,12/tp) sharded
    xr, wr = leaf(x), leaf(w1)
    y = F.linear(xr, wr)
    (y * full(2, 5, 12, seed=5)).sum().backward()
    col = ColumnParallelLinear(8, 12, group)
    assert col.weight.shape == (12 // tp, 8) and col.weight.shard == (0, r, tp)
    with torch.no_grad():
        col.weight.copy_(w1.chunk(tp, 0)[r])
    xl = leaf(x)
    yl = col(xl)
    close("column out", yl, y.chunk(tp, -1)[r])
    (yl * full(2, 5, 12, seed=5).chunk(tp, -1)[r]).sum().backward()
    close("column x.grad (all-reduced)", xl.grad, xr.grad)
    close("column weight.grad", col.weight.grad, wr.grad.chunk(tp, 0)[r])

    # row: h (2,5,12/tp) sharded -> y (2,5,8) replicated
    h = full(2, 5, 12, seed=6)
    hr, wr = leaf(h), leaf(w2)
    (F.linear(hr, wr) * g).sum().backward()
    row = RowParallelLinear(12, 8, group)
    assert row.weight.shape == (8, 12 // tp) and row.weight.shard == (1, r, tp)
    with torch.no_grad():
        row.weight.copy_(w2.chunk(tp, 1)[r])
    hl = leaf(h.chunk(tp, -1)[r])
    yl = row(hl)
    close("row out (all-reduced)", yl, F.linear(h, w2))
    (yl * g).sum().backward()
    close("row x.grad", hl.grad, hr.grad.chunk(tp, -1)[r])
    close("row weight.grad", row.weight.grad, wr.grad.chunk(tp, 1)[r])

    # SwiGLU MLP: gate/up column -> down row, no communication in between
    wg, wu = full(12, 8, seed=7) / 8**0.5, full(12, 8, seed=8) / 8**0.5
    xr, wgr, wur, wdr = leaf(x), leaf(wg), leaf(wu), leaf(w2)
    (F.linear(F.silu(F.linear(xr, wgr)) * F.linear(xr, wur), wdr) * g).sum().backward()
    gate, up, down = (ColumnParallelLinear(8, 12, group), ColumnParallelLinear(8, 12, group),
                      RowParallelLinear(12, 8, group))
    with torch.no_grad():
        gate.weight.copy_(wg.chunk(tp, 0)[r]), up.weight.copy_(wu.chunk(tp, 0)[r])
        down.weight.copy_(w2.chunk(tp, 1)[r])
    xl = leaf(x)
    yl = down(F.silu(gate(xl)) * up(xl))
    close("mlp out", yl, F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), w2))
    (yl * g).sum().backward()
    close("mlp x.grad", xl.grad, xr.grad)
    close("mlp gate.grad", gate.weight.grad, wgr.grad.chunk(tp, 0)[r])
    close("mlp down.grad", down.weight.grad, wdr.grad.chunk(tp, 1)[r])

    check_biased_linears(group, sp=False)


def check_biased_linears(group, sp):
    """attention_bias / mlp_bias: a column bias is sharded with its output features; a row bias is whole
    on every rank and added once, after the all-reduce (--sp: after the reduce-scatter, on this rank's
    tokens, so its grad is a partial sum that allreduce_sequence_parallel_grads completes)."""
    r, tp = dist.get_rank(group), dist.get_world_size(group)
    B, T, D, H = 2, 8, 8, 12
    mine = (lambda t: t.chunk(tp, 1)[r]) if sp else (lambda t: t)  # noqa: E731  this rank's tokens
    x, g = full(B, T, D, seed=60), full(B, T, D, seed=61)
    w1, b1 = full(H, D, seed=62) / D**0.5, full(H, seed=63)
    w2, b2 = full(D, H, seed=64) / H**0.5, full(D, seed=65)
    xr, w1r, b1r, w2r, b2r = leaf(x), leaf(w1), leaf(b1), leaf(w2), leaf(b2)
    (F.linear(F.silu(F.linear(xr, w1r, b1r)), w2r, b2r) * g).sum().backward()
    col, row = ColumnParallelLinear(D, H, group, sp=sp, bias=True), RowParallelLinear(H, D, group, sp=sp, bias=True)
    assert col.bias.shape == (H // tp,) and col.bias.shard == (0, r, tp)
    assert row.bias.shape == (D,) and not hasattr(row.bias, "shard")
    with torch.no_grad():
        col.weight.copy_(w1.chunk(tp, 0)[r]), col.bias.copy_(b1.chunk(tp, 0)[r])
        row.weight.copy_(w2.chunk(tp, 1)[r]), row.bias.copy_(b2)
    xl = leaf(mine(x))
    yl = row(F.silu(col(xl)))
    what = "sp " if sp else ""
    close(f"{what}biased column -> row out", yl, mine(F.linear(F.silu(F.linear(x, w1, b1)), w2, b2)))
    (yl * mine(g)).sum().backward()
    if sp:  # each rank's row bias saw only its T/tp tokens: a partial sum until summed over tp
        allreduce_sequence_parallel_grads(row.parameters(), group)
    close(f"{what}biased x.grad", xl.grad, mine(xr.grad))
    close(f"{what}column bias.grad (sharded)", col.bias.grad, b1r.grad.chunk(tp, 0)[r])
    close(f"{what}column weight.grad", col.weight.grad, w1r.grad.chunk(tp, 0)[r])
    close(f"{what}row bias.grad (whole, summed over tp)", row.bias.grad, b2r.grad)
    close(f"{what}row weight.grad", row.weight.grad, w2r.grad.chunk(tp, 1)[r])


def check_embedding(group):
    r, tp = dist.get_rank(group), dist.get_world_size(group)
    V, D = 16, 6
    w, g = full(V, D, seed=10), full(3, 7, D, seed=11)
    ids = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(12))
    ids[0, :4] = torch.tensor([0, V - 1, V // tp, V // tp - 1])  # shard boundaries
    wr = leaf(w)
    (F.embedding(ids, wr) * g).sum().backward()
    emb = VocabParallelEmbedding(V, D, group)
    assert emb.weight.shape == (V // tp, D) and emb.weight.shard == (0, r, tp)
    with torch.no_grad():
        emb.weight.copy_(w.chunk(tp, 0)[r])
    out = emb(ids)
    close("embedding out", out, F.embedding(ids, w))
    (out * g).sum().backward()
    close("embedding weight.grad", emb.weight.grad, wr.grad.chunk(tp, 0)[r])


def check_cross_entropy(group):
    r, tp = dist.get_rank(group), dist.get_world_size(group)
    V = 24
    targets = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(20))
    targets[0, :4] = torch.arange(4) * (V // 4)  # a target in every shard
    weight = full(3, 7, seed=21).abs()  # non-uniform upstream grad
    for scale, offset in [(4.0, 0.0), (4.0, 1000.0)]:  # offset: needs the max subtraction
        logits = full(3, 7, V, seed=22) * scale + offset
        lr = leaf(logits)
        ref = F.cross_entropy(lr.flatten(0, 1), targets.flatten(), reduction="none").view(3, 7)
        (ref * weight).sum().backward()
        ll = leaf(logits.chunk(tp, -1)[r])
        loss = vocab_parallel_cross_entropy(ll, targets, group)
        assert loss.dtype == torch.float32 and loss.shape == (3, 7)
        close(f"vocab CE loss (offset {offset})", loss, ref)
        (loss * weight).sum().backward()
        close(f"vocab CE logits.grad (offset {offset})", ll.grad, lr.grad.chunk(tp, -1)[r])

    # bf16 logits (autocast lm_head): computed in float32, grad returned in bf16
    logits = (full(3, 7, V, seed=23) * 4).bfloat16()
    lr = leaf(logits.float())
    ref = F.cross_entropy(lr.flatten(0, 1), targets.flatten(), reduction="none").view(3, 7)
    ref.mean().backward()
    ll = leaf(logits.chunk(tp, -1)[r])
    loss = vocab_parallel_cross_entropy(ll, targets, group)
    assert loss.dtype == torch.float32
    close("vocab CE loss (bf16 logits)", loss, ref)
    loss.mean().backward()
    assert ll.grad.dtype == torch.bfloat16
    want = lr.grad.chunk(tp, -1)[r]
    close("vocab CE grad (bf16 logits)", ll.grad, want, atol=want.abs().max().item() * 2**-8)  # bf16 rounding


def check_sequence_parallel(group):
    """--sp: activations (B, T/tp, D) between blocks; gathers and reduce-scatters along T."""
    r, tp = dist.get_rank(group), dist.get_world_size(group)
    B, T, D, H = 2, 8, 8, 12
    mine = lambda t: t.chunk(tp, 1)[r]  # noqa: E731  this rank's tokens of a (B, T, ...) tensor
    x, g = full(B, T, D, seed=40), full(B, T, H, seed=41)

    # a block's entry: all-gather along T; backward reduce-scatters the ranks' partial grads
    xl = leaf(mine(x))
    gathered = GatherSequence(group)(xl)
    close("sp entry out", gathered, x)
    gr = full(B, T, D, seed=42 + r)  # a different partial dL/dx on every rank
    (gathered * gr).sum().backward()
    close("sp entry x.grad (reduce-scattered)", xl.grad, mine(sum(full(B, T, D, seed=42 + i) for i in range(tp))))

    # lm_head-style column linear: gathers its (B, T/tp, D) input itself
    w = full(H, D, seed=43) / D**0.5
    xr, wr = leaf(x), leaf(w)
    (F.linear(xr, wr) * g).sum().backward()
    col = ColumnParallelLinear(D, H, group, sp=True)
    with torch.no_grad():
        col.weight.copy_(w.chunk(tp, 0)[r])
    xl = leaf(mine(x))
    yl = col(xl)
    close("sp column out", yl, F.linear(x, w).chunk(tp, -1)[r])
    (yl * g.chunk(tp, -1)[r]).sum().backward()
    close("sp column x.grad", xl.grad, mine(xr.grad))
    close("sp column weight.grad", col.weight.grad, wr.grad.chunk(tp, 0)[r])

    # row linear: (B, T, H/tp) -> reduce-scatter along T -> (B, T/tp, D)
    h, w2, g2 = full(B, T, H, seed=44), full(D, H, seed=45) / H**0.5, full(B, T, D, seed=46)
    hr, wr = leaf(h), leaf(w2)
    (F.linear(hr, wr) * g2).sum().backward()
    row = RowParallelLinear(H, D, group, sp=True)
    with torch.no_grad():
        row.weight.copy_(w2.chunk(tp, 1)[r])
    hl = leaf(h.chunk(tp, -1)[r])
    yl = row(hl)
    close("sp row out (reduce-scattered)", yl, mine(F.linear(h, w2)))
    (yl * mine(g2)).sum().backward()
    close("sp row x.grad (all-gathered grad)", hl.grad, hr.grad.chunk(tp, -1)[r])
    close("sp row weight.grad", row.weight.grad, wr.grad.chunk(tp, 1)[r])

    # vocab-parallel embedding: reduce-scatter along T
    V = 16
    we, ids = full(V, D, seed=47), torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(48))
    wr = leaf(we)
    (F.embedding(ids, wr) * g2).sum().backward()
    emb = VocabParallelEmbedding(V, D, group, sp=True)
    with torch.no_grad():
        emb.weight.copy_(we.chunk(tp, 0)[r])
    out = emb(ids)
    close("sp embedding out", out, mine(F.embedding(ids, we)))
    (out * mine(g2)).sum().backward()
    close("sp embedding weight.grad", emb.weight.grad, wr.grad.chunk(tp, 0)[r])

    # norm gains see T/tp tokens per rank: their grads are summed over tp afterwards
    norm_ref, norm = nn.RMSNorm(D), nn.RMSNorm(D)
    with torch.no_grad():
        norm_ref.weight.copy_(full(D, seed=49)), norm.weight.copy_(full(D, seed=49))
    (norm_ref(x) * g2).sum().backward()
    (norm(mine(x)) * mine(g2)).sum().backward()
    allreduce_sequence_parallel_grads(norm.parameters(), group)
    close("sp norm weight.grad (all-reduced over tp)", norm.weight.grad, norm_ref.weight.grad)

    # a whole SP block: norm -> gather -> column -> row (reduce-scatter) + residual, against unsharded
    w1, w2 = full(H, D, seed=50) / D**0.5, full(D, H, seed=51) / H**0.5
    ref_n, sp_n = nn.RMSNorm(D), nn.RMSNorm(D)
    xr, w1r, w2r = leaf(x), leaf(w1), leaf(w2)
    yr = xr + F.linear(F.silu(F.linear(ref_n(xr), w1r)), w2r)
    (yr * g2).sum().backward()
    up, down = ColumnParallelLinear(D, H, group, copy_input=False), RowParallelLinear(H, D, group, sp=True)
    with torch.no_grad():
        up.weight.copy_(w1.chunk(tp, 0)[r]), down.weight.copy_(w2.chunk(tp, 1)[r])
    xl = leaf(mine(x))
    yl = xl + down(F.silu(up(gather_sequence(sp_n(xl), group))))
    close("sp block out", yl, mine(yr))
    (yl * mine(g2)).sum().backward()
    allreduce_sequence_parallel_grads(sp_n.parameters(), group)
    close("sp block x.grad", xl.grad, mine(xr.grad))
    close("sp block up.grad", up.weight.grad, w1r.grad.chunk(tp, 0)[r])
    close("sp block norm.grad", sp_n.weight.grad, ref_n.weight.grad)

    check_biased_linears(group, sp=True)


def check_size_one_is_noop(group):
    x = full(3, 4, seed=30)
    assert copy_to_tp(x, group) is x and reduce_from_tp(x, group) is x
    assert gather_sequence(x, group) is x and scatter_sequence(x, group) is x
    logits, t = full(5, 10, seed=31), torch.arange(5)
    close("tp=1 CE", vocab_parallel_cross_entropy(logits, t, group),
          F.cross_entropy(logits, t, reduction="none"))


class _Layer(nn.Module):  # Llama's attribute layout, without the forward
    def __init__(self, c):
        super().__init__()
        D, hd = c.hidden_size, getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
        ab, mb = getattr(c, "attention_bias", False), getattr(c, "mlp_bias", False)
        self.self_attn, self.mlp = nn.Module(), nn.Module()
        for n, o in [("q_proj", c.num_attention_heads * hd), ("k_proj", c.num_key_value_heads * hd),
                     ("v_proj", c.num_key_value_heads * hd)]:
            setattr(self.self_attn, n, nn.Linear(D, o, bias=ab))
        self.self_attn.o_proj = nn.Linear(c.num_attention_heads * hd, D, bias=ab)
        self.mlp.gate_proj = nn.Linear(D, c.intermediate_size, bias=mb)
        self.mlp.up_proj = nn.Linear(D, c.intermediate_size, bias=mb)
        self.mlp.down_proj = nn.Linear(c.intermediate_size, D, bias=mb)
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(D), nn.RMSNorm(D)


class _Shell(nn.Module):
    def __init__(self, c, layers=(0, 1), first=True, last=True):
        super().__init__()
        self.config, self.model = c, nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size) if first else None
        self.model.layers = nn.ModuleDict({str(i): _Layer(c) for i in layers})
        self.model.norm = nn.RMSNorm(c.hidden_size) if last else nn.Identity()
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False) if last else nn.Identity()
        if c.tie_word_embeddings and first and last:
            self.lm_head.weight = self.model.embed_tokens.weight


def check_apply(group):
    r, tp = dist.get_rank(group), dist.get_world_size(group)
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
                      vocab_size=64, tie_word_embeddings=True)
    with torch.device("meta"):
        m = apply_tensor_parallel(_Shell(cfg), group)
    a, mlp = m.model.layers["1"].self_attn, m.model.layers["1"].mlp
    Col, Row = ColumnParallelLinear, RowParallelLinear
    for lin, cls, shape in [(a.q_proj, Col, (32 // tp, 32)), (a.k_proj, Col, (32 // tp, 32)),
                            (a.o_proj, Row, (32, 32 // tp)), (mlp.up_proj, Col, (64 // tp, 32)),
                            (mlp.down_proj, Row, (32, 64 // tp)), (m.lm_head, Col, (64 // tp, 32))]:
        assert type(lin) is cls and lin.weight.shape == shape and lin.weight.is_meta, (lin, shape)
    assert isinstance(m.model.embed_tokens, VocabParallelEmbedding)
    assert m.lm_head.weight is m.model.embed_tokens.weight, "tied lm_head lost its tie"
    assert m.model.norm.weight.replicas == tp and m.model.layers["0"].input_layernorm.weight.replicas == tp
    assert all(hasattr(p, "shard") != (getattr(p, "replicas", 1) == tp and tp > 1) for p in m.parameters())

    # a middle pipeline stage: one layer left, no embedding, no head
    with torch.device("meta"):
        m = apply_tensor_parallel(_Shell(cfg, layers=(1,), first=False, last=False), group)
    assert m.model.embed_tokens is None and isinstance(m.lm_head, nn.Identity)
    assert type(m.model.layers["1"].mlp.gate_proj) is ColumnParallelLinear

    # untied last stage keeps its own lm_head shard
    cfg.tie_word_embeddings = False
    with torch.device("meta"):
        m = apply_tensor_parallel(_Shell(cfg), group)
    assert m.lm_head.weight is not m.model.embed_tokens.weight and m.lm_head.weight.shard == (0, r, tp)

    # biases and an explicit head_dim (q: 4 heads x 16 = 64 features, not hidden = 32)
    biased = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                         intermediate_size=64, vocab_size=64, tie_word_embeddings=False, attention_bias=True,
                         mlp_bias=True)
    with torch.device("meta"):
        m = apply_tensor_parallel(_Shell(biased), group)
    a, mlp = m.model.layers["0"].self_attn, m.model.layers["0"].mlp
    for lin, shape in [(a.q_proj, (64 // tp, 32)), (a.k_proj, (64 // tp, 32)), (a.o_proj, (32, 64 // tp)),
                       (mlp.gate_proj, (64 // tp, 32)), (mlp.down_proj, (32, 64 // tp))]:
        assert lin.weight.shape == shape, (lin, shape)
    for lin in (a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj):  # column: sharded with the outputs
        assert lin.bias.shape == (lin.weight.shape[0],) and lin.bias.shard == (0, r, tp), lin
    for lin in (a.o_proj, mlp.down_proj):  # row: whole, one of tp copies in the grad norm
        assert lin.bias.shape == (32,) and not hasattr(lin.bias, "shard") and lin.bias.replicas == tp, lin
    assert m.lm_head.bias is None

    # shapes that tp does not divide: clear error, model untouched
    bad = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=4 if tp == 2 else 2,
                      intermediate_size=64 if tp == 4 else 63, vocab_size=64, tie_word_embeddings=False)
    with torch.device("meta"):
        m = _Shell(bad)
    try:
        apply_tensor_parallel(m, group)
        raise AssertionError("apply_tensor_parallel accepted a non-dividing shape")
    except ValueError as e:
        want = "num_key_value_heads=2; use --tp 1 or 2" if tp == 4 else "intermediate_size=63; use --tp 1"
        assert str(e) == f"--tp {tp} does not divide {want}", str(e)
    assert type(m.model.layers["0"].self_attn.q_proj) is nn.Linear, "model modified before the check"


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = [dist.group.WORLD]
    if world == 4:  # tp sub-groups {0,1}, {2,3}: group rank differs from global rank
        subs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        groups.append(subs[rank // 2])
    singles = [dist.new_group([i]) for i in range(world)]  # every rank joins every new_group
    for group in groups:
        check_linears(group)
        check_embedding(group)
        check_cross_entropy(group)
        check_sequence_parallel(group)
        check_apply(group)
    check_size_one_is_noop(singles[rank])
    dist.barrier()
    print(f"TP_LAYERS_OK rank {rank}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
