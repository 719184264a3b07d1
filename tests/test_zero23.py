"""step07's --zero 2 and --zero 3 (zero.py): equal to step01 in every layout, resume exactly, reshard
to and from other zero levels and layouts, export the whole model; memory.py predicts their bytes.

Each layout trains 6 steps of a 4-layer tiny model with --memory-report and is compared with step01
loss by loss (rel 1e-4) and weight by weight: dp4, dp2 x tp2 --sp, dp2 x cp2, dp2 x pp2 x tp2 with
tied embeddings and --recompute, each with --zero 2 and with --zero 3. Its first step's log line
must show the weights, gradients and AdamW state this rank keeps, the bucket on the wire and (zero 3)
the layers held whole at once exactly as memory.py predicts them. The zero 3 dp4 run saves at step 3
and exports; the zero 3 pipeline run saves at step 3 too; the resumes continue them under the same
layout (dp4, bit for bit) and under others, with and without ZeRO (the pipeline's at dp4 --zero 1).
"""
import pytest
import torch

from launch import TINY, assert_matches_step01, assert_same_losses, load_full_params, run_step, torchrun, REPO

STEP = "step07_4d_combined"
COMMON = [*TINY, "--max-steps", "6", "--grad-acc-steps", "2", "--num-layers", "4"]
TIED = ["--tie-word-embeddings", "1"]
LAYOUTS = {  # name: (processes, step07's flags, flags for both, step01's grad_acc for the same global batch)
    "zero3 dp4 recompute": (4, ["--dp", 4, "--zero", 3, "--recompute"], [], 8),
    "zero2 dp4": (4, ["--dp", 4, "--zero", 2], [], 8),
    "zero2 dp2 tp2 sp": (4, ["--dp", 2, "--tp", 2, "--sp", "--zero", 2], [], 4),
    "zero3 dp2 tp2 sp": (4, ["--dp", 2, "--tp", 2, "--sp", "--zero", 3], [], 4),
    "zero2 dp2 cp2": (4, ["--dp", 2, "--cp", 2, "--zero", 2], [], 4),
    "zero3 dp2 cp2": (4, ["--dp", 2, "--cp", 2, "--zero", 3], [], 4),
    "zero2 dp2 pp2 tp2 tied recompute": (8, ["--dp", 2, "--pp", 2, "--tp", 2, "--zero", 2, "--recompute"], TIED, 4),
    "zero3 dp2 pp2 tp2 tied recompute": (8, ["--dp", 2, "--pp", 2, "--tp", 2, "--zero", 3, "--recompute"], TIED, 4),
}
SAVES = ("zero3 dp4 recompute", "zero3 dp2 pp2 tp2 tied recompute")  # save at step 3 for the resumes
_RUNS = {}


def train(name, work):
    """Run layout `name` once per session, compared with step01; -> (its metrics, its folder)."""
    if name not in _RUNS:
        nproc, layout, extra, ref_acc = LAYOUTS[name]
        d = work / name.replace(" ", "_")
        layout = [*layout, "--memory-report"]
        if name in SAVES:
            layout += ["--save-dir", d / "ckpt", "--save-every", 3]
        if name == SAVES[0]:
            layout += ["--export-hf", d / "hf"]
        got, _ = assert_matches_step01(STEP, nproc, [*COMMON, *extra], layout, ref_grad_acc=ref_acc, workdir=d)
        _RUNS[name] = got, d
    return _RUNS[name]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("zero23")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_equals_step01_and_memory_is_predicted(name, work):
    """Losses and weights equal step01's (inside train); every byte count the log line carries is predicted."""
    got, _ = train(name, work)
    first = got[0]
    pairs = [("weight", "weights"), ("grad", "gradients"), ("optimizer", "optimizer"), ("bucket", "buckets")]
    if "--zero 3" in " ".join(map(str, LAYOUTS[name][1])):  # 4 layers: two whole at once, or a pp2 stage's two
        pairs.append(("gathered", "gathered"))
    for measured, predicted in pairs:
        assert first[f"{measured}_bytes_measured"] == first[f"predicted_{predicted}"], (name, predicted, first)
    act, act_pred = first["act_bytes_measured"], first["act_bytes_predicted"]
    assert abs(act - act_pred) <= 0.10 * act, (name, act, act_pred)


def test_zero3_exports_the_whole_model(work):
    from safetensors.torch import load_file

    _, d = train(SAVES[0], work)
    exported = load_file(d / "hf" / "model.safetensors")
    final = load_full_params(next(next(d.glob(f"{STEP}_*")).rglob("params")))  # what was compared with step01
    assert set(exported) == set(final)
    assert all(torch.equal(exported[k], final[k]) for k in final)


RESUMES = {  # saved by: (resumed with, processes, flags; rtol)
    "zero3 dp4, same layout": (SAVES[0], 4, ["--dp", 4, "--zero", 3, "--recompute"], 1e-6),
    "zero3 dp4 -> dp2 tp2 zero0": (SAVES[0], 4, ["--dp", 2, "--tp", 2, "--grad-acc-steps", 4], 1e-4),
    "zero3 dp4 -> dp2 zero2": (SAVES[0], 2, ["--dp", 2, "--zero", 2, "--grad-acc-steps", 4], 1e-4),
    "zero3 dp2 pp2 tp2 -> dp4 zero1": (SAVES[1], 4, ["--dp", 4, "--zero", 1, "--grad-acc-steps", 1, *TIED], 1e-4),
}


@pytest.mark.parametrize("how", list(RESUMES))
def test_resume_and_reshard(how, work):
    saved, nproc, flags, rtol = RESUMES[how]
    straight, d = train(saved, work)
    resumed = run_step(STEP, nproc, [*COMMON, *flags, "--resume", d / "ckpt" / "step_000003"], d,
                       tag="resume_" + how.replace(" ", "_").replace(",", "").replace(">", ""))
    assert [m["step"] for m in resumed] == [3, 4, 5]
    assert_same_losses(straight[3:], resumed, rtol=rtol, what=how)


def test_zero3_with_compile_is_one_line(tmp_path):
    proc = torchrun(REPO / STEP / "train.py", 1, [*TINY, "--max-steps", "1", "--zero", "3", "--compile"],
                    timeout=120, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "error: --zero 3 gathers each layer's weights" in out, out[-2000:]
    assert 'File "' + str(REPO / STEP) not in out, out[-2000:]  # no traceback through the step's files
