"""Context parallel (ring attention, zig-zag layout): exact equality with full attention.

Multi-process tests run tests/workers/ring_attention.py under torchrun (gloo, CPU) with the
module found in $COURSE_CP_DIR (default step06_context_parallel/). The fused-kernel tests use
step07's module: its switch FUSED = True runs the GPU's bookkeeping (fused backward per block
from the final out/lse) with the CPU kernels; meta tensors check the CUDA flash calls.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import REPO, child_env, torchrun

CP_DIR = Path(os.environ.get("COURSE_CP_DIR", REPO / "step06_context_parallel"))
STEP07 = REPO / "step07_4d_combined"
WORKER = REPO / "tests" / "workers" / "ring_attention.py"


def _load(name, path):  # under a unique name: other steps have their own context_parallel.py
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cp_mod = _load("cp_under_test", CP_DIR / "context_parallel.py")
cp07 = _load("cp07_under_test", STEP07 / "context_parallel.py")
ring_check = _load("ring_check_under_test", STEP07 / "tools" / "ring_check.py")


# ---------------------------------------------------------------- pure layout tests
@pytest.mark.parametrize("T,cp", [(32, 2), (64, 4), (16, 1), (24, 3)])
def test_zigzag_positions_cover_sequence_once(T, cp):
    pos = [cp_mod.zigzag_positions(T, r, cp) for r in range(cp)]
    assert all(p.dtype == torch.long and p.shape == (T // cp,) for p in pos)
    assert torch.equal(torch.cat(pos).sort().values, torch.arange(T))
    for r, p in enumerate(pos):
        assert torch.equal(p, p.sort().values)  # local order = global order (causal block is plain)


def test_zigzag_positions_values():
    c = 64 // 8
    assert cp_mod.zigzag_positions(64, 1, 4).tolist() == [*range(c, 2 * c), *range(6 * c, 7 * c)]
    assert cp_mod.zigzag_positions(64, 3, 4).tolist() == list(range(3 * c, 5 * c))


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_zigzag_slice_matches_positions(dim):
    x = torch.randn(32, 32, 32)
    for r in range(4):
        idx = cp_mod.zigzag_positions(32, r, 4)
        assert torch.equal(cp_mod.zigzag_slice(x, dim, r, 4), x.index_select(dim, idx))
    assert torch.equal(cp_mod.zigzag_slice(x, 1, 0, 1), x)  # cp=1: whole sequence


def test_check_cp():
    cp_mod.check_cp(64, 4)
    cp_mod.check_cp(31, 1)  # no split, no constraint
    with pytest.raises(ValueError, match=r"2\*cp = 8") as e:
        cp_mod.check_cp(60, 4)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError):
        cp_mod.zigzag_slice(torch.zeros(1, 30), 1, 0, 4)


def test_attention_work_balance():
    T, cp = 64, 4
    cont = cp_mod.attention_work(T, cp, "contiguous")
    zz = cp_mod.attention_work(T, cp, "zigzag")
    assert sum(cont) == sum(zz) == T * (T + 1) // 2  # same total: layout only moves work
    assert cont == [136, 392, 648, 904]
    assert max(zz) == min(zz) == 520
    assert max(cont) / min(cont) > 1
    with pytest.raises(ValueError):
        cp_mod.attention_work(T, cp, "striped?")


# ---------------------------------------------------------------- real processes
def run_worker(nproc, cp_sizes, out_dir, script=WORKER, cp_dir=CP_DIR):
    torchrun(script, nproc, [cp_dir, ",".join(map(str, cp_sizes)), out_dir], timeout=120)
    return [json.loads(line) for f in sorted(Path(out_dir).glob("rank*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()]


def test_ring_attention_equals_full_attention(tmp_path):
    # one launch (process start-up dominates): 4 ranks run cp=1 (no ring), cp=2 as two
    # groups {0,1} {2,3} (checks group -> global rank mapping) and cp=4
    nproc, cp_sizes = 4, (1, 2, 4)
    check_worker_results(run_worker(nproc, cp_sizes, tmp_path), nproc, cp_sizes)


def check_worker_results(results, nproc, cp_sizes):
    assert len(results) == nproc * len(cp_sizes) * 3, "worker skipped cases"
    for res in results:
        where = f"cp={res['cp']} rank={res['cp_rank']} H={res['H']} Hkv={res['Hkv']} T={res['T']}"
        for name, err in res["errs"].items():
            assert err <= 1e-5, f"{where}: {name} max abs diff {err:.2e}"
        # what travels: only the Hkv heads; cp-1 k/v hops forward, cp-1 k/v + cp dk/dv backward
        cp, kv_numel = res["cp"], 2 * res["B"] * res["Hkv"] * (res["T"] // res["cp"]) * res["hd"]
        if cp == 1:
            assert res["fwd_sends"] == res["bwd_sends"] == []
            continue
        assert res["fwd_sends"] == [[kv_numel, "torch.float32"]] * (cp - 1), where
        assert sorted(res["bwd_sends"]) == [[kv_numel, "torch.float32"]] * (2 * cp - 1), where


# ---------------------------------------------------------------- fused kernels (step07)
# The worker under a wrapper: step07's FUSED = True before the worker imports the module (same
# name, so the worker gets this one), and a count of the fused backward calls per rank.
FUSED_WRAPPER = """
import atexit, os, runpy, sys
sys.path.insert(0, sys.argv[1])
import context_parallel as cp
cp.FUSED = True
calls, fused_grads = [], cp._fused_grads
cp._fused_grads = lambda *a: calls.append(1) or fused_grads(*a)
atexit.register(lambda: open(os.path.join(sys.argv[3], "fused_calls_" + os.environ["RANK"]), "w")
                .write(str(len(calls))))
runpy.run_path({worker!r}, run_name="__main__")
"""


def test_fused_ring_attention_equals_full_attention(tmp_path):
    # real processes (gloo): the fused path matches full attention as tightly as the
    # materialised one, and sends exactly the same messages
    wrapper = tmp_path / "fused_worker.py"
    wrapper.write_text(FUSED_WRAPPER.format(worker=str(WORKER)))
    out = tmp_path / "out"
    out.mkdir()
    nproc, cp_sizes = 4, (2, 4)
    check_worker_results(run_worker(nproc, cp_sizes, out, script=wrapper, cp_dir=STEP07), nproc, cp_sizes)
    calls = [int((out / f"fused_calls_{r}").read_text()) for r in range(nproc)]
    assert calls == [3 * sum(cp_sizes)] * nproc, calls  # 3 cases x cp blocks per backward


@pytest.fixture
def count_fused(monkeypatch):
    calls = []
    fused_grads = cp07._fused_grads
    monkeypatch.setattr(cp07, "_fused_grads", lambda *a: calls.append(1) or fused_grads(*a))
    return calls


def ring_both_ways(cp, B, H, Hkv, T, hd):
    """(out, dq, dk, dv) of cp threads running step07's _RingAttention (ring_check.run_ring)."""
    torch.manual_seed(100 * cp + Hkv)
    q, do = torch.randn(B, H, T, hd), torch.randn(B, H, T, hd)
    k, v = torch.randn(B, Hkv, T, hd), torch.randn(B, Hkv, T, hd)
    got = {}
    for mode in (None, True):
        cp07.FUSED = mode
        try:
            got[mode] = ring_check.run_ring(cp07, q, k, v, do, cp)
        finally:
            cp07.FUSED = None
    out, _, dq, dk, dv = ring_check.ref_grads(q, k, v, do, True, hd ** -0.5)
    return got[None], got[True], (out, dq, dk, dv)


@pytest.mark.parametrize("cp,Hkv", [(2, 4), (2, 1), (4, 4), (4, 2)])
def test_fused_ring_matches_existing_path(cp, Hkv, count_fused):
    # in one process, threads as cp ranks: FUSED=True (fused backward) vs the default CPU path
    # (materialised backward) vs full attention, float32, tight
    existing, fused, want = ring_both_ways(cp, 2, 4, Hkv, 16 * cp, 16)
    assert len(count_fused) == cp * cp  # every rank, every block: the fused backward, only with FUSED
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), fused, existing, want):
        assert (a - b).abs().max() <= 1e-5, f"{name}: fused vs existing path"
        assert (a - w).abs().max() <= 1e-5, f"{name}: fused vs full attention"


def test_ring_check_catches_grads_from_block_lse(monkeypatch):
    # the bug the fused backward invites: grads from the block's own (out, lse) instead of the
    # final ones. Exact for a lone block, wrong in a ring: ring_check must see it.
    fused_grads = cp07._fused_grads

    def own_lse(q, k, v, do, out, lse, causal, scale):
        o, l = cp07._fused_attn(q, k, v, causal, scale)
        return fused_grads(q, k, v, do, o.to(q.dtype), l.contiguous(), causal, scale)

    monkeypatch.setattr(cp07, "FUSED", True)
    errs, good, _ = ring_check.check_ring(cp07, 2, 1, 4, 2, 16, 16, torch.float32, torch.device("cpu"))
    assert good, errs
    monkeypatch.setattr(cp07, "_fused_grads", own_lse)
    errs, good, _ = ring_check.check_ring(cp07, 2, 1, 4, 2, 16, 16, torch.float32, torch.device("cpu"))
    assert not good and errs["out"] <= 1e-4 and min(errs["dq"], errs["dk"], errs["dv"]) > 1e-2, errs


@pytest.mark.parametrize("shape", list(ring_check.SHAPES))
def test_cuda_flash_calls_on_meta(shape, monkeypatch, count_fused):
    # meta tensors take the CUDA ops (_scaled_dot_product_flash_attention and its backward):
    # their meta kernels check the argument lists, shapes and dtypes of the GPU's calls
    monkeypatch.setattr(cp07, "FUSED", True)  # meta is not CUDA: FUSED sends the backward to the kernel
    Tq, Tk, causal = ring_check.SHAPES[shape](64)
    meta = dict(device="meta", dtype=torch.bfloat16)
    q, do = torch.empty(2, 8, Tq, 64, **meta), torch.empty(2, 8, Tq, 64, **meta)
    k, v = torch.empty(2, 8, Tk, 64, **meta), torch.empty(2, 8, Tk, 64, **meta)
    out, lse = cp07._block_attn(q, k, v, causal, 0.125)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == (q.shape, torch.float32, q.shape[:3], torch.float32)
    D = (do.float() * out).sum(-1)
    grads = cp07._block_grads(q, k, v, do, out.to(q.dtype), lse, D, causal, 0.125)
    assert [(g.shape, g.dtype) for g in grads] == [(t.shape, torch.float32) for t in (q, k, v)]
    assert len(count_fused) == 1


def test_ring_check_runs_on_cpu():
    # ring_check.py is what runs on the GPU; here it must run and pass on CPU (tiny sizes)
    proc = subprocess.run([sys.executable, str(STEP07 / "tools" / "ring_check.py"), "--device", "cpu", "--small"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "PASS"
