"""Consecutive steps stay in lock-step: a file a step does not own is byte-identical to the
previous step's copy, so `diff -ru stepNN stepNN+1` shows only that step's lesson."""
import pytest

from launch import REPO, STEPS

# What each step may add or change relative to the step before it. Keep this short.
OWNS = {
    "step02_data_parallel": {"train.py", "README.md", "data_parallel.py", "process_group_manager.py"},
    "step03_tensor_parallel": {"train.py", "README.md", "tensor_parallel.py", "process_group_manager.py"},
    "step04_pipeline_afab": {"train.py", "README.md", "pipeline_parallel.py", "process_group_manager.py",
                             "schedule_afab.png"},
    "step05_pipeline_1f1b": {"train.py", "README.md", "pipeline_parallel.py", "schedule_1f1b.png"},
    "step06_context_parallel": {"train.py", "README.md", "context_parallel.py", "process_group_manager.py"},
    "step07_4d_combined": {"train.py", "README.md", "checkpoint.py", "reshard.py", "hf_interop.py", "mfu.py",
                           "memory.py", "zero.py",
                           "benchmark.py", "config_maker.py", "configs", "slurm.sbatch", "gpu_smoke.py",
                           "speed.py", "gpu_check.sh", "ring_check.py",
                           "context_parallel.py"},  # the fused CUDA kernels of its ring blocks
}


def files(step):
    root = REPO / step
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.parametrize("prev, step", list(zip(STEPS, STEPS[1:])), ids=lambda s: s[:6])
def test_unowned_files_are_identical(prev, step):
    owned = OWNS[step]
    owner = lambda f: f.split("/")[0] in owned  # a folder entry owns everything below it
    before, after = files(prev), files(step)
    assert not (before - after), f"{step} dropped {sorted(before - after)}"
    assert not {f for f in after - before if not owner(f)}, f"{step} adds files it does not own"
    drift = [f for f in before & after if not owner(f)
             and (REPO / prev / f).read_bytes() != (REPO / step / f).read_bytes()]
    assert not drift, f"{step} changed {drift} which should be identical to {prev}'s copy"


def test_steps_do_not_import_each_other():
    for step in STEPS:
        for f in (REPO / step).rglob("*.py"):
            text = f.read_text()
            for other in STEPS:
                assert other not in text or other == step, f"{f} mentions {other}"
