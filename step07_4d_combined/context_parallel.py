"""Context parallelism: ring attention over a sequence split across cp ranks.

Problem. With cp ranks each rank holds T/cp tokens of every sequence. Everything in a
decoder layer is per token (norms, projections, MLP) except attention: a query needs the
keys/values of all earlier positions, which live on other ranks.

Communication (ring attention, Liu et al. 2023). The k/v blocks travel around the cp ring:
at step s rank r holds the k/v block of rank (r - s) mod cp, computes its queries against
it, and merges the partial result with the log-sum-exp rule (out, lse) in float32. Before
computing step s it already posts isend(k/v -> next cp rank) + irecv(k/v <- previous cp
rank) for step s+1, so the transfer overlaps the block's attention. After cp - 1 hops every
rank has seen every block. Only the Hkv key/value heads travel (GQA: heads are repeated
locally). Backward repeats the k/v ring; the gradients dk/dv of the block a rank holds are
accumulated in float32 and travel with it, one hop behind, so after cp hops they are back
on the rank that owns that block. No all-gather: memory stays O(T/cp).

Kernels (per block, chosen by device: see FUSED). A fused kernel never materialises the
(B, H, Tq, Tk) scores and returns the log-sum-exp the merge needs. On CUDA the blocks run
flash attention forward and backward (bf16/fp16, head_dim a multiple of 8 and <= 256): a
block's memory is O(T/cp) (inputs, outputs, lse, the kernel's float32 dq accumulator) and its
time is the kernel's. The backward kernel gets the block's rows of the FINAL out and lse and
recomputes P = exp(S - lse) and D = rowsum(dO * O) from them: the softmax of the full row,
so the block's grads are exact. CPU keeps step06's kernels: fused forward, materialised
backward. Float32 on CUDA (the course's exactness runs) materialises the block in float32:
O((T/cp)^2) memory per block.

Bytes per ring step (per rank, each direction, one hop):
  forward:  2 * B * Hkv * (T/cp) * hd * bytes(dtype)            (k and v)
  backward: the same for k/v, plus 2 * B * Hkv * (T/cp) * hd * 4 (dk, dv in float32)
  per layer: (cp - 1) hops forward, (cp - 1) k/v hops + cp dk/dv hops backward.

Load balance (zig-zag). Under a causal mask, a contiguous split gives rank 0 the first T/cp
positions (almost nothing to attend to) and the last rank the most (~(2cp-1)x rank 0's
work), so everyone waits for the last rank. Zig-zag cuts the sequence into 2*cp chunks and
gives rank r chunks r and 2cp-1-r: an early chunk paired with a late one, so every rank
has the same number of unmasked (q, k) pairs. It also makes every ring block one of three
shapes, with no mask other than a plain causal one:
  own k/v (step 0):         causal over the local T/cp tokens (local order = global order);
  k/v from an earlier rank: all local q vs the FIRST half of that k/v (second half is later);
  k/v from a later rank:    the SECOND half of local q vs all of that k/v.
Every rank therefore does one causal block plus cp-1 half blocks.

References: Liu, Zaharia, Abbeel 2023, "Ring Attention with Blockwise Transformers for
Near-Infinite Context"; Brandon et al. 2023, "Striped Attention" (load-balanced causal ring
attention); the zig-zag layout used by Llama 3 context parallel (Dubey et al. 2024).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


# ---------------------------------------------------------------- layout helpers (pure)
def check_cp(seq_len, cp_size):
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if cp_size > 1 and seq_len % (2 * cp_size) != 0:
        raise ValueError(f"seq_len {seq_len} is not divisible by 2*cp = {2 * cp_size} (zig-zag "
                         f"cuts the sequence into 2*cp chunks): use a seq_len that is a multiple "
                         f"of {2 * cp_size} or a smaller cp")


def zigzag_positions(seq_len, cp_rank, cp_size, device=None):
    """Global positions held by cp rank `cp_rank`: chunks r and 2cp-1-r of 2cp chunks."""
    check_cp(seq_len, cp_size)
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    c = seq_len // (2 * cp_size)
    first, second = cp_rank * c, (2 * cp_size - 1 - cp_rank) * c
    return torch.cat([torch.arange(first, first + c, device=device),
                      torch.arange(second, second + c, device=device)])  # (T/cp,)


def zigzag_slice(x, dim, cp_rank, cp_size):
    """This rank's zig-zag share of the full sequence dimension `dim` of x."""
    check_cp(x.size(dim), cp_size)
    if cp_size == 1:
        return x
    chunks = x.chunk(2 * cp_size, dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim)


def attention_work(seq_len, cp_size, layout):
    """Unmasked causal (q, k) pairs whose scores each rank must compute, per rank.

    Counts only pairs with k_pos <= q_pos (what an ideal kernel computes), so the total over
    ranks is always T(T+1)/2. layout: "contiguous" (rank r holds [r*T/cp, (r+1)*T/cp)) or
    "zigzag". For zig-zag this also equals the blocks ring_attention computes: one causal
    T/cp block plus cp-1 blocks of (T/cp) x (T/2cp).
    """
    check_cp(seq_len, cp_size)
    n = seq_len // cp_size
    work = []
    for r in range(cp_size):
        if layout == "contiguous":
            pos = torch.arange(r * n, (r + 1) * n)
        elif layout == "zigzag":
            pos = zigzag_positions(seq_len, r, cp_size)
        else:
            raise ValueError(f"layout must be 'contiguous' or 'zigzag', got {layout!r}")
        work.append(int((pos + 1).sum()))  # query at position p sees keys 0..p
    return work


# ---------------------------------------------------------------- one block of attention
def _repeat_kv(x, rep):
    # (B, Hkv, T, hd) -> (B, Hkv*rep, T, hd); head h uses kv head h // rep (HF repeat_kv)
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _reduce_kv(g, rep):
    # (B, Hkv*rep, T, hd) -> (B, Hkv, T, hd): sum the grads of the copies of each kv head
    B, H, T, hd = g.shape
    return g if rep == 1 else g.view(B, H // rep, rep, T, hd).sum(2)


def _causal_mask(n, device):
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)  # True = masked


# Which kernels the blocks use. None (default): flash attention on CUDA where it applies
# (_flash); on CPU the fused forward and the materialised backward, as in step06.
# True: the fused backward on CPU too, i.e. the GPU's bookkeeping run by the CPU kernels (tests).
# False: materialised on CUDA too (tools/ring_check.py's memory baseline).
FUSED = None


def _flash(q):
    """Whether the CUDA flash kernels take this block: bf16/fp16, head_dim % 8 == 0 and <= 256,
    sm80+. float32 is not one of its dtypes: there the block is materialised in exact float32
    (the memory-efficient kernel would take float32, but with a padded lse and one more kernel
    to get right, for runs that are about exactness, not memory)."""
    return (q.is_cuda and FUSED is not False and q.dtype in (torch.bfloat16, torch.float16)
            and q.size(-1) % 8 == 0 and q.size(-1) <= 256
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def _fused_attn(q, k, v, causal, scale):
    """(out, lse (B, H, Tq) float32) from the fused kernel of q's device; never (Tq, Tk) scores.
    Meta tensors take the CUDA op: its meta kernel checks the call without a GPU (tests)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p=0.0, is_causal=causal, scale=scale)
    # -> out, lse, cum_seq_q, cum_seq_k, max_q, max_k, rng state (2 tensors), debug mask
    return torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, dropout_p=0.0, is_causal=causal, return_debug_mask=False, scale=scale)[:2]


def _fused_grads(q, k, v, do, out, lse, causal, scale):
    """dq, dk, dv (input dtype) from the fused backward kernel, given out and lse."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, causal, scale=scale)
    unused = torch.empty((), dtype=torch.long, device=q.device)  # rng state: read only under dropout
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, out, lse, None, None, q.size(2), k.size(2), 0.0, causal,  # None: not varlen
        unused, unused, scale=scale)


def _block_attn(q, k, v, causal, scale):
    """(out, lse) of q against one k/v block, both float32. Causal blocks are square."""
    if not q.is_cuda or _flash(q):  # fused: the kernel returns the logsumexp we need to merge blocks
        out, lse = _fused_attn(q.contiguous(), k.contiguous(), v.contiguous(), causal, scale)
        return out.float(), lse.float()
    q, k, v = q.float(), k.float(), v.float()
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if causal:
        s = s.masked_fill(_causal_mask(s.size(-1), s.device), float("-inf"))
    lse = s.logsumexp(-1)  # (B, H, Tq)
    return torch.exp(s - lse.unsqueeze(-1)) @ v, lse


def _merge(out, lse, blk_out, blk_lse):
    """In place: fold one block's (out, lse) into the running (out, lse) views."""
    new_lse = torch.logaddexp(lse, blk_lse)
    out.mul_(torch.exp(lse - new_lse).unsqueeze(-1))
    out.add_(torch.exp(blk_lse - new_lse).unsqueeze(-1) * blk_out)
    lse.copy_(new_lse)


def _block_grads(q, k, v, do, out, lse, D, causal, scale):
    """float32 dq, dk, dv of one block given the FINAL out, lse and D = rowsum(dO * O).

    q, k, v, do, out in the input dtype (the fused kernel takes them as they are)."""
    if _flash(q) or (FUSED and not q.is_cuda):
        # the kernel recomputes P = exp(S - lse) and D = rowsum(dO * O) from the out and lse it
        # is given: with the final ones that is the full row's softmax, so its grads are exact.
        # It reads raw pointers: dense tensors (lse above all: a strided slice would be misread)
        grads = _fused_grads(*(t.contiguous() for t in (q, k, v, do, out, lse)), causal, scale)
        return [g.float() for g in grads]
    q, k, v, do = q.float(), k.float(), v.float(), do.float()
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if causal:
        s = s.masked_fill(_causal_mask(s.size(-1), s.device), float("-inf"))
    p = torch.exp(s - lse.unsqueeze(-1))  # the softmax probabilities of the full row
    dv = p.transpose(-1, -2) @ do  # (B, H, Tk, hd)
    ds = p * (do @ v.transpose(-1, -2) - D.unsqueeze(-1))  # (B, H, Tq, Tk)
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, dv


# ---------------------------------------------------------------- the ring
def _ring_exchange(send, group, next_rank, prev_rank):
    """Post isend(send -> next cp rank) + irecv(<- previous cp rank); return (recv, works).

    Both ops are posted together on every rank, so gloo cannot deadlock (no blocking send).
    """
    recv = torch.empty_like(send)
    works = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, next_rank, group),
                                    dist.P2POp(dist.irecv, recv, prev_rank, group)])
    return recv, works


def _wait(works):
    for w in works:
        w.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group):
        cp, r = dist.get_world_size(group), dist.get_rank(group)
        next_rank = dist.get_global_rank(group, (r + 1) % cp)
        prev_rank = dist.get_global_rank(group, (r - 1) % cp)
        rep, half, scale = q.size(1) // k.size(1), q.size(2) // 2, q.size(-1) ** -0.5
        with torch.autocast(q.device.type, enabled=False):  # merge math stays float32
            kv = torch.stack([k, v]).contiguous()  # (2, B, Hkv, T/cp, hd): one message per hop
            for s in range(cp):
                if s + 1 < cp:  # start the next hop now so it overlaps this block's attention
                    next_kv, works = _ring_exchange(kv, group, next_rank, prev_rank)
                src = (r - s) % cp  # the cp rank whose k/v we hold at this step
                kk, vv = _repeat_kv(kv[0], rep), _repeat_kv(kv[1], rep)  # (B, H, T/cp, hd)
                if s == 0:  # own block: causal; every row sees itself, so lse is finite
                    out, lse = _block_attn(q, kk, vv, True, scale)  # (B, H, T/cp, hd), (B, H, T/cp)
                elif src < r:  # earlier rank: all q vs its first chunk
                    _merge(out, lse, *_block_attn(q, kk[:, :, :half], vv[:, :, :half], False, scale))
                else:  # later rank: our second chunk vs all of its k/v
                    _merge(out[:, :, half:], lse[:, :, half:],
                           *_block_attn(q[:, :, half:], kk, vv, False, scale))
                if s + 1 < cp:
                    _wait(works)
                    kv = next_kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.ranks = group, (cp, r, next_rank, prev_rank)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, (cp, r, next_rank, prev_rank) = ctx.group, ctx.ranks
        rep, half, scale = q.size(1) // k.size(1), q.size(2) // 2, q.size(-1) ** -0.5
        with torch.autocast(q.device.type, enabled=False):
            D = (dout.float() * out.float()).sum(-1)  # (B, H, T/cp): rowsum(dO * O)
            dq = torch.zeros_like(q, dtype=torch.float32)  # (B, H, T/cp, hd)
            kv = torch.stack([k, v]).contiguous()  # (2, B, Hkv, T/cp, hd)
            for s in range(cp):
                if s + 1 < cp:  # the same k/v ring as forward, overlapped with this block
                    next_kv, works = _ring_exchange(kv, group, next_rank, prev_rank)
                src = (r - s) % cp
                kk, vv = _repeat_kv(kv[0], rep), _repeat_kv(kv[1], rep)  # (B, H, T/cp, hd), input dtype
                g = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # d(k, v) of src's block
                if s == 0:
                    dq_b, dk_b, dv_b = _block_grads(q, kk, vv, dout, out, lse, D, True, scale)
                    dq += dq_b
                    g[0], g[1] = _reduce_kv(dk_b, rep), _reduce_kv(dv_b, rep)
                elif src < r:
                    dq_b, dk_b, dv_b = _block_grads(q, kk[:, :, :half], vv[:, :, :half],
                                                    dout, out, lse, D, False, scale)
                    dq += dq_b
                    g[0, :, :, :half], g[1, :, :, :half] = _reduce_kv(dk_b, rep), _reduce_kv(dv_b, rep)
                else:
                    dq_b, dk_b, dv_b = _block_grads(q[:, :, half:], kk, vv, dout[:, :, half:],
                                                    out[:, :, half:], lse[:, :, half:], D[:, :, half:],
                                                    False, scale)
                    dq[:, :, half:] += dq_b
                    g[0], g[1] = _reduce_kv(dk_b, rep), _reduce_kv(dv_b, rep)
                if s > 0:  # add the partial d(k, v) of this block from the ranks that held it before
                    _wait(dkv_works)
                    g += dkv
                # d(k, v) follows its block one hop behind: send to next, receive from previous
                dkv, dkv_works = _ring_exchange(g, group, next_rank, prev_rank)
                if s + 1 < cp:
                    _wait(works)
                    kv = next_kv
            _wait(dkv_works)  # after cp hops our own block's d(k, v) is complete and home
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None


def ring_attention(q, k, v, group=None):
    """Causal attention over the GLOBAL sequence, inputs in zig-zag layout on each cp rank.

    q (B, H, T/cp, hd), k/v (B, Hkv, T/cp, hd) with Hkv dividing H -> (B, H, T/cp, hd).
    group: the cp process group (None = the default group). Scale is hd ** -0.5.
    """
    if q.size(1) % k.size(1) != 0:
        raise ValueError(f"kv heads {k.size(1)} must divide q heads {q.size(1)}")
    if group is None:
        group = dist.group.WORLD
    if dist.get_world_size(group) == 1:  # no ring: plain causal attention
        rep = q.size(1) // k.size(1)
        return F.scaled_dot_product_attention(q, _repeat_kv(k, rep), _repeat_kv(v, rep), is_causal=True)
    if q.size(2) % 2 != 0:
        raise ValueError(f"local sequence {q.size(2)} must be even (zig-zag holds two chunks)")
    return _RingAttention.apply(q, k, v, group)
