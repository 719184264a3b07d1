"""A trainer leaves no gloo worker thread behind when it returns.

gloo joins a process group's worker threads only when the last reference to the group goes. If
that happens during interpreter shutdown while a thread still frees a collective launched in
backward (such works carry a Python object from autograd), the thread needs the GIL, cannot get
it, and the process aborts with "terminate called without an active exception"
(pytorch/pytorch#190489). It failed two CI runs of this suite, one job in ~90 each time.

So no thread may be left when Python shuts down, i.e. nothing may hold a group after train.py:
  - every train.py calls process_group_manager.shutdown_distributed() once main() has returned:
    main()'s objects (model, pgm, ...) are gone, gc.collect() frees the cycles among them, and
    destroy_process_group() drops torch's own references;
  - DataParallel's post-accumulate-grad hooks hold their module weakly: a parameter keeps its
    hooks on the C++ side, beyond the cycle collector, so a strong hook would keep the module,
    the model and the group alive for ever;
  - process_group_manager.py imports torch.distributed.nn before any group exists: its
    functions bind the world group as a default argument when first imported, and transformers
    imports it lazily, after init_process_group.
Undo any one of them and this test fails. The recorder (notebooks/trace.py) holds no group either.
(Keeping each DataParallel bucket's finished work until the next launch, an earlier part of
the workaround, is not needed once no gloo thread outlives train.py.)
"""
import json
import sys

import pytest

from launch import REPO, TINY, TRACER, torchrun

WORKER = REPO / "tests" / "workers" / "exit_threads.py"
COMMON = [*TINY, "--max-steps", "3", "--grad-acc-steps", "2"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
@pytest.mark.parametrize("step, layout, traced", [
    ("step03_tensor_parallel", ["--dp", "2", "--tp", "2"], False),  # tp all-reduces inside backward
    ("step06_context_parallel", ["--cp", "2", "--tp", "2"], False),  # ring send/recv inside backward
    ("step07_4d_combined", ["--pp", "2", "--cp", "2"], True),  # under the recorder
], ids=["step03", "step06", "step07-traced"])
def test_no_gloo_thread_outlives_train(step, layout, traced, tmp_path):
    script, args = REPO / step / "train.py", [*COMMON, *layout]
    if traced:
        script, args = TRACER, ["--out", tmp_path / "trace", script, *args]
    torchrun(WORKER, 4, [script, tmp_path, *args])
    counts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert all(c["at_destroy"] > 0 for c in counts), counts  # the counter sees gloo's threads
    assert all(c["after_train"] == 0 for c in counts), f"process groups outlive train.py: {counts}"
    if traced:
        assert all((tmp_path / "trace" / f"rank{r}.jsonl").stat().st_size > 0 for r in range(4))
