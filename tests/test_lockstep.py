"""Consecutive steps stay in lock-step: a file a step does not own is byte-identical to the
previous step's copy, so `diff -ru stepNN stepNN+1` shows only that step's lesson. And the lessons'
sizes (tests/lesson_size.py), which step01's README and step07's reading order state."""
import re

import pytest

from launch import REPO, STEPS

# What each step may add or change relative to the step before it. Keep this short.
OWNS = {
    "step02_data_parallel": {"train.py", "README.md", "data_parallel.py", "process_group_manager.py"},
    "step03_tensor_parallel": {"train.py", "README.md", "tensor_parallel.py", "process_group_manager.py"},
    "step04_pipeline_afab": {"train.py", "README.md", "pipeline_parallel.py", "process_group_manager.py",
                             "schedule_afab.png"},
    "step05_pipeline_1f1b": {"train.py", "README.md", "pipeline_parallel.py", "schedule_1f1b.png",
                             "schedule_interleaved.png"},
    "step06_context_parallel": {"train.py", "README.md", "context_parallel.py", "process_group_manager.py"},
    "step07_4d_combined": {"train.py", "README.md", "REFERENCE.md", "checkpoint.py", "reshard.py", "hf_interop.py",
                           "mfu.py", "memory.py", "zero.py", "config_file.py", "configs", "speed.py",
                           "context_parallel.py",  # the fused CUDA kernels of its ring blocks
                           "tools"},  # stand-alone programs (benchmark, GPU checks, config maker, Slurm)
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


def test_lesson_sizes(capsys):
    """The course's own figure, printed with every run: read-lines per lesson (tests/lesson_size.py).
    The first reading and the last lesson stay within issue 23's bars."""
    import lesson_size

    with capsys.disabled():
        print("\n" + lesson_size.report())
    must, skip = lesson_size.first_reading()
    assert {"train.py", "model.py", "data.py", "utils.py"} <= set(must) and "token_file.py" in skip
    assert sum(must.values()) <= 700, f"step01's first reading is {sum(must.values())} lines: move what a " \
                                      f"learner may skip into a module whose docstring says so"
    readme = (REPO / "step01_single_gpu" / "README.md").read_text()
    for files, what in ((must, "The first reading is"), (skip, "you may skip")):
        said = f"{len(files)} files, {sum(files.values())} lines"
        assert said in readme, f"step01's README: '{what}' should say {said} ({files})"
        assert all(f"`{f}` {n}" in readme for f, n in files.items()), files
    name, n, tools = lesson_size.lessons()[-1]
    assert n <= 1500, f"{name} is {n} read-lines without tools/: stand-alone programs go to tools/"


ROW = re.compile(r"^\|(?: \d+ \|)? `([^`]+)`( \(diff\))? \| [^|]+ \| (\+?)([\d,]+) \| ([^|]+) \|$")
SCALE = {"throughput", "memory", "failure", "interop", "launch"}


def test_step07_reading_order_lists_every_new_file_with_its_lines():
    import lesson_size

    prev, step = STEPS[-2], STEPS[-1]
    readme = (REPO / step / "README.md").read_text()
    rows = {m[1]: m for m in map(ROW.match, readme.splitlines()) if m}
    added = lesson_size.added_lines(prev, step)
    for f in sorted(files(step) - files(prev)):
        if f.endswith((".md", ".png")):
            continue
        entry = f if f in rows else f.split("/")[0] + "/"
        assert entry in rows, f"step07's README: the reading order does not list {f}"
    for name, m in rows.items():
        path = REPO / step / name
        if m[2]:  # (diff): the lines it adds to step06's copy
            assert m[3] == "+" and int(m[4]) == added[name], (name, m[4], added.get(name))
        else:
            lines = sum(len(p.read_text().splitlines()) for p in ([path] if path.is_file() else path.rglob("*")))
            assert int(m[4].replace(",", "")) == lines, f"step07's README says {name} has {m[4]} lines, it has {lines}"
        assert m[5].strip() == "all five" or set(m[5].strip().split(", ")) <= SCALE, m[5]
    name, n, tools = lesson_size.lessons()[-1]
    assert f"06 -> 07 is {n:,} read-lines without `tools/`" in readme and f"({tools:,} in `tools/`)" in readme
