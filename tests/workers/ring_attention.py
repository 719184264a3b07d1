"""Worker for tests/test_ring_attention.py: ring attention == full causal attention.

usage: torchrun --nproc_per_node N ring_attention.py CP_MODULE_DIR CP_SIZES OUT_DIR
(CP_SIZES e.g. "1,2")
For each cp size the world is cut into groups of cp consecutive ranks. Every rank builds
the same full q/k/v/dout, computes the reference on the whole sequence with SDPA (repeated
kv), zig-zag slices it, and compares ring_attention's output and dq/dk/dv to it. It also
records every tensor sent so the test can check what travels (Hkv heads, hop counts).
Writes one JSON line per case to OUT_DIR/rank{R}.jsonl; exits non-zero on any mismatch.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before any group: see process_group_manager.py)
import torch.nn.functional as F

sys.path.insert(0, sys.argv[1])
from context_parallel import ring_attention, zigzag_slice  # noqa: E402

SENT = []  # (numel, dtype) of every tensor this rank sends
_batch = dist.batch_isend_irecv


def recording_batch(ops):
    SENT.extend((op.tensor.numel(), str(op.tensor.dtype)) for op in ops if op.op is dist.isend)
    return _batch(ops)


dist.batch_isend_irecv = recording_batch


def check(cp, group, cp_rank, B, H, Hkv, T, hd, seed):
    g = torch.Generator().manual_seed(seed)  # identical full tensors on every rank
    q, dout = torch.randn(B, H, T, hd, generator=g), torch.randn(B, H, T, hd, generator=g)
    k, v = torch.randn(B, Hkv, T, hd, generator=g), torch.randn(B, Hkv, T, hd, generator=g)
    # reference: full-sequence causal attention, kv repeated HF-style (head h -> kv h // rep)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    rep = H // Hkv
    out = F.scaled_dot_product_attention(ref[0], ref[1].repeat_interleave(rep, 1),
                                         ref[2].repeat_interleave(rep, 1), is_causal=True)
    out.backward(dout)
    want = [out.detach(), ref[0].grad, ref[1].grad, ref[2].grad]
    want = [zigzag_slice(t, 2, cp_rank, cp) for t in want]  # (B, *, T/cp, hd)
    # ring attention on this rank's zig-zag share
    loc = [zigzag_slice(t, 2, cp_rank, cp).clone().requires_grad_() for t in (q, k, v)]
    SENT.clear()
    got = ring_attention(*loc, group)
    n_fwd = len(SENT)
    got.backward(zigzag_slice(dout, 2, cp_rank, cp))
    got = [got.detach(), loc[0].grad, loc[1].grad, loc[2].grad]
    errs = {n: (a - b).abs().max().item() for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
    return dict(cp=cp, cp_rank=cp_rank, B=B, H=H, Hkv=Hkv, T=T, hd=hd, errs=errs,
                fwd_sends=SENT[:n_fwd], bwd_sends=SENT[n_fwd:])


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    ok, lines = True, []
    for cp in map(int, sys.argv[2].split(",")):
        group = None
        for start in range(0, world, cp):  # every rank must call new_group for every group
            ranks = list(range(start, start + cp))
            pg = dist.new_group(ranks)
            if rank in ranks:
                group = pg
        cp_rank = rank % cp
        for (B, H, Hkv, T) in [(2, 4, 4, 32), (2, 4, 2, 64), (1, 4, 1, 64)]:
            res = check(cp, group, cp_rank, B, H, Hkv, T, 16, seed=1000 * cp + T + Hkv)
            lines.append(json.dumps(res))
            if max(res["errs"].values()) > 1e-5:
                ok = False
                print(f"MISMATCH rank {rank} cp={cp} H={H} Hkv={Hkv} T={T}: {res['errs']}",
                      file=sys.stderr, flush=True)
    with open(os.path.join(sys.argv[3], f"rank{rank}.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
