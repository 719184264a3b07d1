"""CP's native twin, on GPUs: step06's ring attention vs torch's context_parallel (gpu_check.sh, part cp).

    python3 -m torch.distributed.run --standalone --nproc_per_node 2 tests/workers/native_cp_gpu.py

context_parallel shards only CUDA attention kernels (tests/test_native_twins.py asserts that it
raises on CPU), so this comparison lives in the GPU check. Both sides compute causal attention over
a sequence split across the cp ranks, forward and backward, from the same bf16 q, k, v, dout: ours
on zig-zag shards (chunks r and 2cp-1-r of 2cp), the native one on the shards its load balancer
cuts (head-tail: the same chunks); each is made whole again and compared with the other and with
float32 attention on the whole sequence: err = max|got - ref| / max|ref| <= 2e-2 (bf16, as
ring_check.py). Two GPUs: NCCL, one per rank. One GPU: both ranks on it, gloo on CUDA tensors
with the all-gather rotation (NCCL refuses two ranks on one device). No GPU: checks that the
native API still raises, and says so. Exit 1 on failure.
"""
import importlib.util
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
B, H, T, HD, TOL = 2, 8, 1024, 64, 2e-2


def load_cp():
    spec = importlib.util.spec_from_file_location("course_cp", REPO / "step06_context_parallel" / "context_parallel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def err(got, ref):
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


def main():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard, set_rotate_method

    cuda = torch.cuda.is_available()
    two = cuda and torch.cuda.device_count() >= 2
    timeout = timedelta(seconds=int(os.environ.get("COURSE_PG_TIMEOUT_S", 120)))  # a hung collective fails
    dist.init_process_group("nccl" if two else "gloo", timeout=timeout)
    rank, cp = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank if two else 0}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (cp,), mesh_dim_names=("cp",))
    if not cuda:
        q = torch.randn(1, 2, 16, 8)
        try:
            with context_parallel(mesh, buffers=[q], buffer_seq_dims=[2]):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
        except NotImplementedError as e:
            print(f"rank {rank}: no GPU; native context_parallel raises on CPU as expected: {str(e)[:90]}")
            dist.destroy_process_group()
            return
        sys.exit("native context_parallel ran on CPU: move this twin into tests/test_native_twins.py")
    if not two:
        set_rotate_method("allgather")  # gloo on CUDA tensors has all-gather, not all-to-all

    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, HD, generator=g).to(device, torch.bfloat16) for _ in range(4))
    ref = [t.float().requires_grad_() for t in (q, k, v)]
    out_ref = F.scaled_dot_product_attention(*ref, is_causal=True)
    out_ref.backward(do.float())
    want = [out_ref.detach(), *(t.grad for t in ref)]

    # ours: this rank's zig-zag shard in, ring attention, then all-gather and undo the zig-zag
    cpm = load_cp()
    mine = [cpm.zigzag_slice(t, 2, rank, cp).detach().requires_grad_() for t in (q, k, v)]
    out = cpm.ring_attention(*mine, group=dist.group.WORLD)
    out.backward(cpm.zigzag_slice(do, 2, rank, cp))
    pos = torch.cat([cpm.zigzag_positions(T, r, cp, device) for r in range(cp)])  # (T,) gathered order

    def whole(local):  # (B, H, T/cp, HD) zig-zag shards of every rank -> (B, H, T, HD) in order
        parts = [torch.empty_like(local) for _ in range(cp)]
        dist.all_gather(parts, local.contiguous())
        full = torch.empty(B, H, T, HD, dtype=local.dtype, device=device)
        full[:, :, pos] = torch.cat(parts, 2)
        return full

    ours = [whole(out.detach()), *(whole(t.grad) for t in mine)]

    # native: whole tensors in, sharded in place by context_parallel, SDPA becomes ring attention
    bufs = [t.clone() for t in (q, k, v, do)]
    with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2]):
        leaves = [t.detach().requires_grad_() for t in bufs[:3]]
        out_n = F.scaled_dot_product_attention(*leaves, is_causal=True)
        out_n.backward(bufs[3])
    native = context_parallel_unshard(mesh, [out_n.detach(), *(t.grad for t in leaves)], [2, 2, 2, 2])

    ok = True
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), ours, native, want):
        e_ours, e_native, e_twin = err(a, r), err(b, r), err(a, b.float())
        good = max(e_ours, e_native, e_twin) <= TOL
        ok &= good
        if rank == 0:
            print(f"{name}: ours vs float32 {e_ours:.1e} | native vs float32 {e_native:.1e} | ours vs native "
                  f"{e_twin:.1e} {'ok' if good else 'FAIL'}")
    if rank == 0:
        print(f"cp={cp} {'nccl' if two else 'gloo on one GPU'} B={B} H={H} T={T} hd={HD} bf16: "
              f"{'ok' if ok else 'FAIL'} (tolerance {TOL})")
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
