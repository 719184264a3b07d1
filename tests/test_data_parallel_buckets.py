"""DataParallel (bucketed, overlapped gradient all-reduce) on real gloo processes.

Proves, on 2 and 4 ranks with a tiny tied-embedding MLP LM and several buckets:
  1. the averaged grads equal one process's grads on the whole global batch
     (grad_acc 1 and 3, loss.backward() and pipeline-style autograd.backward(out, grad));
  2. no all-reduce is launched before the last micro-batch;
  3. overlap: the first bucket's all-reduce is launched while other parameters still wait
     for their grads, i.e. before backward ends (and a single bucket cannot do that).
What is counted is observed from outside DataParallel (see the worker).
Set COURSE_DP_DIR to test a data_parallel.py outside step02_data_parallel.
"""
import json
import os
from pathlib import Path

import pytest

from launch import REPO, torchrun

DP_DIR = Path(os.environ.get("COURSE_DP_DIR", REPO / "step02_data_parallel"))
WORKER = Path(__file__).parent / "workers" / "dp_buckets.py"
OVERLAPPED = ("acc1", "acc3", "acc3_autograd")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"dp{n}")
def results(request, tmp_path_factory):
    n = request.param
    out = tmp_path_factory.mktemp(f"dp{n}")
    torchrun(WORKER, n, [DP_DIR, out], timeout=120)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def test_grads_match_whole_batch(results):
    for rank, res in enumerate(results):
        for name, cfg in res.items():
            assert cfg["tied"]
            for k, s in enumerate(cfg["steps"]):  # step 2 follows zero_grad(set_to_none=True)
                assert s["grad_err"] < 1e-6, f"rank {rank} {name} step {k}: {s['grad_err']:.2e}"
                assert s["param_err"] < 1e-6, f"rank {rank} {name} step {k}: {s['param_err']:.2e}"


def test_one_allreduce_per_bucket_only_on_last_microbatch(results):
    for res in results:
        for name, cfg in res.items():
            assert cfg["n_buckets"] > 1 or name == "one_bucket"
            for s in cfg["steps"]:
                assert s["calls_before_last"] == 0, f"{name}: all-reduce during accumulation"
                assert s["calls_in_step"] == len(s["launches"]) == cfg["n_buckets"]
                assert [b for b, _, _ in s["launches"]] == list(range(cfg["n_buckets"]))  # in bucket order
                assert sum(n for _, n, _ in s["launches"]) == 4 * cfg["n_params"]  # fp32, tied weight sent once


def test_allreduce_overlaps_backward(results):
    for res in results:
        for name in OVERLAPPED:
            for s in res[name]["steps"]:
                # params still without a final grad when bucket 0 went on the wire
                assert s["launches"][0][2] > 0, name
                # buckets already in flight when the first block's weight got its grad
                assert s["launched_before_first_layer"] > 0, name
        for s in res["one_bucket"]["steps"]:  # control: the checks above can fail
            assert [pending for _, _, pending in s["launches"]] == [0]
            assert s["launched_before_first_layer"] == 0


def test_single_rank_does_no_communication(tmp_path):
    torchrun(WORKER, 1, [DP_DIR, tmp_path], timeout=120)
    res = json.loads((tmp_path / "rank0.json").read_text())
    for name, cfg in res.items():
        for s in cfg["steps"]:
            assert s["grad_err"] < 1e-6 and s["param_err"] < 1e-6, name
            assert s["calls_in_step"] == 0 and s["launches"] == [], name
