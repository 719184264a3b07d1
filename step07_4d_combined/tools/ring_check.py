"""Ring attention's block kernels, and whole rings, against float32 references on one device.

    python step07_4d_combined/tools/ring_check.py [--device cpu] [--small]

One process, no torch.distributed (one GPU means NCCL runs one rank). On CUDA the blocks run
flash attention (bf16), B=2 H=8 T/cp=1024; on CPU the fused CPU kernels with
context_parallel.FUSED = True (the GPU's bookkeeping, only the ops differ), B=1 T/cp=256 so it
takes seconds; --small: tiny (the test suite).
  blocks  the three block shapes of the zig-zag ring (own causal block; all q vs the first half
          of k/v; second half of q vs all k/v): the module's _block_attn (out, lse), then
          _block_grads (dq, dk, dv) given that out and lse (a lone block's are final), vs
          float32 attention + autograd on the same bf16-rounded inputs. GQA as in the ring: kv
          heads repeated before the kernel, grads of the copies summed.
  ring    cp threads stand in for cp ranks and run the module's own _RingAttention forward and
          backward; out, dq, dk, dv of the whole sequence vs float32 causal attention on it.
  memory  (CUDA) peak of one fused causal block forward+backward vs the materialised one.
Tolerance: err = max|got - ref| / max|ref|. bf16 keeps 8 significant bits (rounding 2^-9); the
kernels round P and dS to bf16 before their matmuls and round what they return, so errors near
1% of the largest entry are bf16 noise: bf16 passes at err <= 2e-2, float32 at 1e-4 (summation
order only). lse: absolute error <= 5e-3 nats (every probability within 0.5%). Exit 1 on failure.
"""
import argparse
import importlib.util
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import torch

TOL, LSE_TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}, 5e-3
SHAPES = {"own causal": lambda n: (n, n, True), "q vs 1st half": lambda n: (n, n // 2, False),
          "2nd half vs all": lambda n: (n // 2, n, False)}  # name -> (Tq, Tk, causal) for T/cp = n


def err(got, ref):
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


def timed(fn, dev, warmup=True):
    """(fn(), milliseconds): CUDA events on CUDA; one warm-up call first (kernel loading)."""
    if warmup:
        fn()
    if dev.type != "cuda":
        t = time.perf_counter()
        return fn(), (time.perf_counter() - t) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    r = fn()
    end.record()
    torch.cuda.synchronize()
    return r, start.elapsed_time(end)


def ref_grads(q, k, v, dout, causal, scale):
    """float32 (out, lse, dq, dk, dv), scores materialised; kv head h // rep serves q head h."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    rep = q.size(1) // k.size(1)
    s = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    out = torch.softmax(s, -1) @ v.repeat_interleave(rep, 1)
    out.backward(dout.float())
    return out.detach(), s.logsumexp(-1).detach(), q.grad, k.grad, v.grad


def inputs(B, H, Hkv, Tq, Tk, hd, dtype, dev):  # q, k, v, dout
    return [torch.randn(B, h, t, hd, device=dev).to(dtype) for h, t in ((H, Tq), (Hkv, Tk), (Hkv, Tk), (H, Tq))]


def check_block(cpm, shape, B, H, Hkv, n, hd, dtype, dev):
    Tq, Tk, causal = SHAPES[shape](n)
    q, k, v, do = inputs(B, H, Hkv, Tq, Tk, hd, dtype, dev)
    rep, scale = H // Hkv, hd ** -0.5
    kk, vv = cpm._repeat_kv(k, rep), cpm._repeat_kv(v, rep)  # (B, H, Tk, hd)
    (out, lse), t_fwd = timed(lambda: cpm._block_attn(q, kk, vv, causal, scale), dev)
    o = out.to(dtype)  # what the ring saves for backward
    D = (do.float() * o.float()).sum(-1)  # (B, H, Tq)
    (dq, dk, dv), t_bwd = timed(lambda: cpm._block_grads(q, kk, vv, do, o, lse, D, causal, scale), dev)
    want = ref_grads(q, k, v, do, causal, scale)
    got = (out, lse, dq, cpm._reduce_kv(dk, rep), cpm._reduce_kv(dv, rep))
    errs = {name: err(a, b) for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want)}
    errs["lse"] = (lse - want[1]).abs().max().item()  # absolute, in nats
    good = errs["lse"] <= LSE_TOL and max(e for c, e in errs.items() if c != "lse") <= TOL[dtype]
    return errs, good, t_fwd, t_bwd


class ThreadRing:
    """Stands in for torch.distributed inside context_parallel (only the calls _RingAttention
    makes): thread r is cp rank r. Like NCCL, messages match in posting order: the n-th send
    from a to b fills slot (a, b, n), the n-th receive posted by b from a waits for it."""
    isend, irecv = "isend", "irecv"

    def __init__(self, cp):
        self.cp, self.me, self.lock, self.slots, self.failed = cp, threading.local(), threading.Lock(), {}, False

    def get_world_size(self, group): return self.cp
    def get_rank(self, group): return self.me.rank
    def get_global_rank(self, group, rank): return rank
    def P2POp(self, op, tensor, peer, group): return op, tensor, peer

    def _slot(self, src, dst):  # a pair's sends are posted by src only, its receives by dst only
        self.me.posted[src, dst] = n = self.me.posted.get((src, dst), -1) + 1
        with self.lock:
            return self.slots.setdefault((src, dst, n), futures.Future())

    def batch_isend_irecv(self, ops):
        works = []
        for op, t, peer in ops:
            if op == self.isend:  # a send never blocks
                self._slot(self.me.rank, peer).set_result(t.clone())
            else:
                slot = self._slot(peer, self.me.rank)
                works.append(SimpleNamespace(wait=lambda slot=slot, t=t: self._recv(slot, t)))
        return works

    def _recv(self, slot, t):
        while True:
            try:
                return t.copy_(slot.result(timeout=0.1))
            except futures.TimeoutError:
                if self.failed:  # its sender never will: fail now, not in minutes
                    raise PeerFailed("another rank failed") from None


class PeerFailed(RuntimeError):
    pass


class _Ctx:  # what autograd hands forward and backward
    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def run_ring(cpm, q, k, v, dout, cp):
    """(out, dq, dk, dv) of the full sequence from cp threads running cpm._RingAttention."""
    ring = ThreadRing(cp)

    def rank(r):
        ring.me.rank, ring.me.posted, ctx = r, {}, _Ctx()
        ql, kl, vl, dl = (cpm.zigzag_slice(t, 2, r, cp) for t in (q, k, v, dout))  # (B, *, T/cp, hd)
        try:
            out = cpm._RingAttention.forward(ctx, ql, kl, vl, None)
            return (out, *cpm._RingAttention.backward(ctx, dl)[:3])
        except BaseException:
            ring.failed = True
            raise

    saved, cpm.dist = cpm.dist, ring
    try:
        with futures.ThreadPoolExecutor(cp) as pool:
            jobs = [pool.submit(rank, r) for r in range(cp)]
    finally:
        cpm.dist = saved
    errors = [j.exception() for j in jobs if j.exception()]
    if errors:  # the rank that failed first, not the ones that gave up waiting for it
        raise min(errors, key=lambda e: isinstance(e, PeerFailed))
    parts = [j.result() for j in jobs]
    # back to global order: position p is entry inv[p] of the ranks' outputs concatenated
    inv = torch.cat([cpm.zigzag_positions(q.size(2), r, cp, q.device) for r in range(cp)]).argsort()
    return [torch.cat([p[i] for p in parts], 2)[:, :, inv] for i in range(4)]


def check_ring(cpm, cp, B, H, Hkv, n, hd, dtype, dev):
    q, k, v, do = inputs(B, H, Hkv, n * cp, n * cp, hd, dtype, dev)
    got, ms = timed(lambda: run_ring(cpm, q, k, v, do, cp), dev, warmup=False)
    out, _, dq, dk, dv = ref_grads(q, k, v, do, True, hd ** -0.5)
    errs = {name: err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, (out, dq, dk, dv))}
    return errs, max(errs.values()) <= TOL[dtype], ms


def memory(cpm, dev, B=1, H=32, n=8192, hd=128):
    """Peak bytes above the inputs of one causal block forward+backward, fused vs materialised."""
    q, k, v, do = inputs(B, H, H, n, n, hd, torch.bfloat16, dev)
    unit, scores = B * H * n * hd * 2, B * H * n * n * 4  # one bf16 (B, H, T/cp, hd); one float32 (B, H, Tq, Tk)

    def block():
        out, lse = cpm._block_attn(q, k, v, True, hd ** -0.5)
        o = out.to(q.dtype)
        return cpm._block_grads(q, k, v, do, o, lse, (do.float() * o.float()).sum(-1), True, hd ** -0.5)

    peaks = {}
    for label, fused in (("fused", None), ("materialised", False)):
        cpm.FUSED = fused
        block()  # warm-up: kernels loaded, library workspaces allocated
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads, ms = timed(block, dev, warmup=False)
        peaks[label] = torch.cuda.max_memory_allocated() - base
        del grads
        print(f"  {label:13s} peak {peaks[label] / 2**20:8.0f} MiB   fwd+bwd {ms:8.2f} ms")
    cpm.FUSED = None
    print(f"  B={B} H={H} T/cp={n} hd={hd}: one float32 (B,H,Tq,Tk) score matrix {scores / 2**20:.0f} MiB;"
          f" fused expected O(T/cp): ~13 bf16 (B,H,T/cp,hd) = {13 * unit / 2**20:.0f} MiB (float32 out,"
          f" dq, dk, dv; the kernel's float32 dq accumulator; bf16 grads and layout copies)")
    ok = peaks["fused"] < scores / 4 and peaks["materialised"] > scores
    print(f"  {'ok' if ok else 'FAIL'}: fused peak < 1/4 score matrix; materialised peak > 1 score matrix")
    return ok


def attempt(fn, *args):
    """fn(*args), or None after printing the error: one failure must not hide the other checks."""
    try:
        return fn(*args)
    except Exception as e:  # report and go on
        print(f"ERROR {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}", flush=True)
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="tiny sizes (the test suite, on CPU)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    spec = importlib.util.spec_from_file_location("ring_check_cp", Path(__file__).parent.parent / "context_parallel.py")
    cpm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpm)
    torch.manual_seed(0)
    B, H, n, hds = (1, 4, 32, (16, 32)) if args.small else (2, 8, 1024, (64, 128)) if dev.type == "cuda" \
        else (1, 8, 256, (64, 128))
    if dev.type == "cpu":
        cpm.FUSED, where = True, "cpu, fused CPU kernels (FUSED=True)"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 references stay float32
        where = f"{torch.cuda.get_device_name()} sm{''.join(map(str, torch.cuda.get_device_capability()))}"
    print(f"torch {torch.__version__} cuda {torch.version.cuda}: {where}")

    def kernel(dtype, hd):
        return "flash" if cpm._flash(torch.empty(1, 1, 1, hd, device=dev, dtype=dtype)) else (
            "cpu fused" if dev.type == "cpu" else "materialised")

    ok = True
    print(f"blocks: bf16 B={B} H={H} T/cp={n}, kernels: {kernel(torch.bfloat16, hds[0])}")
    print(f"  {'shape':16s} {'hd':>4s} {'Hkv':>4s} "
          + " ".join(f"{c:>8s}" for c in ("out", "lse", "dq", "dk", "dv", "fwd ms", "bwd ms")))
    for hd in hds:
        for Hkv in (H, H // 4):
            for shape in SHAPES:
                print(f"  {shape:16s} {hd:4d} {Hkv:4d} ", end="", flush=True)
                r = attempt(check_block, cpm, shape, B, H, Hkv, n, hd, torch.bfloat16, dev)
                ok &= bool(r and r[1])
                if r:
                    print(" ".join(f"{e:8.1e}" for e in r[0].values()) + f" {r[2]:8.2f} {r[3]:8.2f}"
                          + ("" if r[1] else "  FAIL"))
    print(f"ring: cp threads run _RingAttention; whole sequence vs float32 causal attention, B={B} H={H}")
    for cp, Hkv, dtype in ((2, H, torch.bfloat16), (2, H // 4, torch.bfloat16), (4, H, torch.bfloat16),
                           (4, H // 4, torch.bfloat16), (2, H // 4, torch.float32)):
        print(f"  cp={cp} T={n * cp} hd={hds[-1]} Hkv={Hkv} {str(dtype)[6:]} ({kernel(dtype, hds[-1])}): ",
              end="", flush=True)
        r = attempt(check_ring, cpm, cp, B, H, Hkv, n, hds[-1], dtype, dev)
        ok &= bool(r and r[1])
        if r:
            print(" ".join(f"{k} {e:.1e}" for k, e in r[0].items()) + f"  fwd+bwd {r[2]:.1f} ms"
                  + ("" if r[1] else "  FAIL"))
    if dev.type == "cuda" and not args.small:
        print("memory: one causal block, forward + backward, peak above its inputs")
        ok &= bool(attempt(memory, cpm, dev))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
