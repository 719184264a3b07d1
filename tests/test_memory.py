"""step07's memory: --recompute and --zero 1 equal step01, and memory.py's prediction matches the run.

Each launch trains a few steps with --memory-report: the logging rank (the last one, on the last
pipeline stage) logs in its first step what autograd held for backward at the peak
(act_bytes_measured), the weights, gradients and AdamW state it holds, and memory.py's prediction
of each. The layouts between them cover AFAB and 1F1B, cp 1 and 2, tp 1 and 2 (with --sp),
recompute on and off, ZeRO-1 on and off, tied embeddings on a pipeline; the 8-process ones mix
all four dimensions and are also checked against step01, loss by loss and weight by weight.
"""
import importlib.util
import subprocess
import sys

import pytest
from transformers import LlamaConfig

from launch import REPO, TINY, assert_matches_step01, assert_same_losses, run_step

STEP = "step07_4d_combined"
COMMON = [*TINY, "--max-steps", "6", "--grad-acc-steps", "2"]
REPORT = ["--memory-report"]  # step07's flags go with the layout: step01 is run with COMMON and extra alone

LAYOUTS = {  # name: (processes, step07's layout flags, flags for both, step01's grad_acc for the same global batch)
    "dp2-pp2-cp2-afab-tied-zero-recompute": (8, ["--dp", 2, "--pp", 2, "--cp", 2, "--pp-engine", "afab", "--zero", 1,
                                                 "--recompute"], ["--tie-word-embeddings", 1], 4),
    "dp2-cp2-tp2-sp-zero": (8, ["--dp", 2, "--cp", 2, "--tp", 2, "--sp", "--zero", 1], [], 4),
    "pp2-cp2-tp2-1f1b-recompute": (8, ["--pp", 2, "--cp", 2, "--tp", 2, "--recompute"], ["--grad-acc-steps", 4], 4),
    "pp2-afab": (2, ["--pp", 2, "--pp-engine", "afab"], ["--grad-acc-steps", 4], 4),
    "pp2-tp2-1f1b-recompute": (4, ["--pp", 2, "--tp", 2, "--recompute"], ["--grad-acc-steps", 4], 4),
}


ZERO = "dp2-pp2-cp2-afab-tied-zero-recompute"  # also saves at step 3, for the resume tests
_RUNS = {}


def train(name, work):
    """Run layout `name` once per session (it is also compared with step01); -> its metrics."""
    if name not in _RUNS:
        nproc, layout, extra, ref_acc = LAYOUTS[name]
        layout = [*layout, *REPORT]
        if name == ZERO:
            layout += ["--save-dir", work / "zero_ckpt", "--save-every", 3]
        check_params = nproc == 8  # the 8-process layouts are also compared weight by weight
        _RUNS[name], _ = assert_matches_step01(STEP, nproc, [*COMMON, *extra], layout, ref_grad_acc=ref_acc,
                                               workdir=work, params=check_params)
    return _RUNS[name]


@pytest.fixture(params=list(LAYOUTS), ids=list(LAYOUTS))
def run(request, tmp_path_factory):
    return request.param, train(request.param, tmp_path_factory.getbasetemp())


def test_equals_step01_and_prediction_matches(run):
    """Losses equal step01's (inside assert_matches_step01); the prediction matches the measurement."""
    name, got = run
    first = got[0]
    measured, predicted = first["act_bytes_measured"], first["act_bytes_predicted"]
    assert measured > 0 and abs(predicted - measured) <= 0.10 * measured, (name, measured, predicted)
    assert first["weight_bytes_measured"] == first["predicted_weights"], name
    assert first["grad_bytes_measured"] == first["predicted_gradients"], name
    assert first["optimizer_bytes_measured"] == first["predicted_optimizer"], name
    assert "act_bytes_measured" not in got[1]  # the first step only


def load(name):
    spec = importlib.util.spec_from_file_location(f"memory_{name}", REPO / STEP / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / STEP))
    spec.loader.exec_module(mod)
    return mod


def test_pure_arithmetic():
    """Recompute keeps a layer's input only; ZeRO-1 divides AdamW's state by dp x cp; 1F1B holds
    pp - stage micro-batches, AFAB all of them; --sp divides what lies between the blocks by tp."""
    memory = load("memory")
    cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1024, tie_word_embeddings=False)
    base = dict(B=1, T=256, grad_acc=8)
    full, rec = (memory.predict(cfg, **base, recompute=r)["activations"] for r in (False, True))
    assert rec * 4 <= full  # the course's goal for this model: >= 4x fewer bytes held for backward
    plain, zero = (memory.predict(cfg, **base, dp=4, zero=z)["optimizer"] for z in (0, 1))
    assert abs(zero * 4 - plain) / plain < 0.01
    for stage in range(4):
        assert memory.predict(cfg, **base, pp=4, stage=stage)["in_flight"] == 4 - stage
        assert memory.predict(cfg, **base, pp=4, stage=stage, schedule="afab")["in_flight"] == 8
    a = memory.activation_bytes(cfg, 1, 256, tp=2)["per_layer"]
    b = memory.activation_bytes(cfg, 1, 256, tp=2, sp=True)["per_layer"]
    assert b < a


def test_shipped_gpu_configs_fit_80_gb():
    for config in sorted((REPO / STEP / "configs").glob("*gpu*.json")):
        proc = subprocess.run([sys.executable, REPO / STEP / "memory.py", "--config", config], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1].endswith("fits in 80 GiB"), (config.name, proc.stdout)


@pytest.mark.parametrize("how", ["same layout", "no zero, dp1"])
def test_resume_a_zero_checkpoint(how, tmp_path_factory):
    """A --zero 1 checkpoint (each rank's slices of AdamW's state) resumes bit for bit under its own
    layout, and under a layout without ZeRO (the slices are read back into whole moments)."""
    work = tmp_path_factory.getbasetemp()
    straight = train(ZERO, work)
    nproc, layout, extra, _ = LAYOUTS[ZERO]
    if how == "no zero, dp1":
        nproc, layout, extra = 4, ["--pp", 2, "--cp", 2, "--pp-engine", "afab", "--recompute"], []
        extra = ["--tie-word-embeddings", 1, "--grad-acc-steps", 4]  # dp1: the same global batch of 8 sequences
    resumed = run_step(STEP, nproc, [*COMMON, *layout, *extra, "--resume", work / "zero_ckpt" / "step_000003"],
                       work, tag=f"zero_resume_{how.replace(' ', '_').replace(',', '')}")
    assert [m["step"] for m in resumed] == [3, 4, 5]
    assert_same_losses(straight[3:], resumed, rtol=1e-6 if how == "same layout" else 1e-4, what=how)
