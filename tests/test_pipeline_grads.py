"""Pipeline parallelism on real gloo processes: the gradients are step01's.

One 4-rank launch runs every case (workers/pp_grads.py): pp=4; pp=2 twice side by side (two
independent pipelines, global peer ranks != 0/1); pp=2 x dp=2 wrapped in DataParallel; pp=1
x 4 (a no-op split); 4 and 5 layers (uneven: 3+2, 2+1+1+1); tied and untied embeddings;
every engine in SCHEDULES (afab; 1f1b from step05 on); grad_acc 1, 2, 8 (also < pp).
Each rank compares its local grads (after sync_tied_embeddings) with the full model's.
COURSE_PP_DIR: the folder with pipeline_parallel.py (default step05_pipeline_1f1b; set it to
step04_pipeline_afab for AFAB only). COURSE_MODEL_DIR: model.py (default step01_single_gpu).
COURSE_DP_DIR: data_parallel.py (default COURSE_PP_DIR).
"""
import json
import os
from pathlib import Path

import pytest

from launch import REPO, torchrun

PP_DIR = Path(os.environ.get("COURSE_PP_DIR", REPO / "step05_pipeline_1f1b"))
MODEL_DIR = Path(os.environ.get("COURSE_MODEL_DIR", REPO / "step01_single_gpu"))
DP_DIR = Path(os.environ.get("COURSE_DP_DIR", PP_DIR))
WORKER = Path(__file__).parent / "workers" / "pp_grads.py"


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("pp")
    torchrun(WORKER, 4, [PP_DIR, MODEL_DIR, out, DP_DIR], timeout=180)
    return [rec for r in range(4) for rec in json.loads((out / f"rank{r}.json").read_text())]


def test_all_cases_ran(records):
    names = {r["name"] for r in records}
    assert len(records) == 4 * len(names)  # every rank ran every case
    assert {r["pp"] for r in records} == {1, 2, 4} and {r["grad_acc"] for r in records} == {1, 2, 8}
    assert any(n.endswith("_DP_L5_tied_afab_acc8") for n in names)


def test_grads_match_single_process(records):
    for r in records:
        assert r["param_err"] == 0.0, f"{r['name']} stage {r['stage']}: weights differ from step01's init"
        assert r["grad_scale"] > 1e-3, f"{r['name']}: reference grads are suspiciously small"
        assert r["grad_err"] <= 1e-6, f"{r['name']} stage {r['stage']}: max |grad - step01| = {r['grad_err']:.2e}"


def test_loss_sum_on_last_stage_only(records):
    for r in records:
        if r["last"]:
            assert abs(r["loss_sum"] - r["ref_loss_sum"]) <= 1e-6 * r["ref_loss_sum"], r["name"]
        else:
            assert r["loss_sum"] == 0.0, r["name"]


def test_each_stage_owns_its_layers_with_global_names(records):
    for r in records:
        assert r["names"] == r["expected_names"], f"{r['name']} stage {r['stage']}"


def test_tied_copies_count_once_in_grad_norm(records):
    for r in records:
        if r["tied"] and r["pp"] > 1 and (r["stage"] == 0 or r["last"]):
            key = "model.embed_tokens.weight" if r["stage"] == 0 else "lm_head.weight"
            assert r["replicas"] == {key: 2}, f"{r['name']} stage {r['stage']}: {r['replicas']}"
        else:
            assert r["replicas"] == {}, f"{r['name']} stage {r['stage']}: {r['replicas']}"


def test_peak_inflight_micro_batches(records):
    for r in records:
        m = r["grad_acc"]
        want = m if r["schedule"] == "afab" else min(m, r["pp"] - r["stage"])
        assert r["peak"] == want, f"{r['name']} stage {r['stage']}: peak {r['peak']} != {want}"


def test_data_parallel_syncs_on_the_last_backward_only(records):
    wrapped = [r for r in records if "_DP_" in r["name"]]
    assert wrapped
    for r in wrapped:  # flags seen by the backwards, in order: all-reduce only on the last one
        assert r["sync_flags"] == [False] * (r["grad_acc"] - 1) + [True], f"{r['name']}: {r['sync_flags']}"
