"""Context parallel (ring attention, zig-zag layout): exact equality with full attention.

Multi-process tests run tests/workers/ring_attention.py under torchrun (gloo, CPU) with the
module found in $COURSE_CP_DIR (default step06_context_parallel/).
"""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from launch import REPO, torchrun

CP_DIR = Path(os.environ.get("COURSE_CP_DIR", REPO / "step06_context_parallel"))
WORKER = REPO / "tests" / "workers" / "ring_attention.py"
if not (CP_DIR / "context_parallel.py").exists():
    pytest.skip(f"no {CP_DIR}/context_parallel.py yet", allow_module_level=True)
# load under a unique name: other steps have their own context_parallel.py
_spec = importlib.util.spec_from_file_location("cp_under_test", CP_DIR / "context_parallel.py")
cp_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cp_mod)


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
def run_worker(nproc, cp_sizes, out_dir):
    torchrun(WORKER, nproc, [CP_DIR, ",".join(map(str, cp_sizes)), out_dir], timeout=120)
    return [json.loads(line) for f in sorted(Path(out_dir).glob("rank*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()]


def test_ring_attention_equals_full_attention(tmp_path):
    # one launch (process start-up dominates): 4 ranks run cp=1 (no ring), cp=2 as two
    # groups {0,1} {2,3} (checks group -> global rank mapping) and cp=4
    nproc, cp_sizes = 4, (1, 2, 4)
    results = run_worker(nproc, cp_sizes, tmp_path)
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
