"""A trainer leaves no gloo worker thread behind when it returns.

gloo joins a process group's worker threads only when the last reference to the group goes.
If that happens during interpreter shutdown while a thread still frees a collective launched in
backward (such works carry a Python object from autograd), the thread needs the GIL, cannot
get it, and the process aborts with "terminate called without an active exception"
(pytorch/pytorch#190489). It failed two CI runs of this suite, one job in ~90 each time.

So nothing may hold a group once train.py is done: train.py runs in main() and collects
main()'s objects before exit; DataParallel's gradient hooks hold it weakly (a parameter's
hooks live in C++, beyond the cycle collector); the tracer unregisters its atexit hook; and
process_group_manager.py imports torch.distributed.nn before any group exists (its functions
take the world group as a default argument). Undo any one of these and this test fails.
"""
import json
import sys

import pytest

from launch import REPO, TINY, torchrun

WORKER = REPO / "tests" / "workers" / "exit_threads.py"
COMMON = [*TINY, "--max-steps", "3", "--grad-acc-steps", "2"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
@pytest.mark.parametrize("step, layout, extra", [
    ("step03_tensor_parallel", ["--dp", "2", "--tp", "2"], []),  # tp all-reduces inside backward
    ("step06_context_parallel", ["--cp", "2", "--tp", "2"], []),  # ring send/recv inside backward
    ("step07_4d_combined", ["--pp", "2", "--cp", "2"], ["--trace-dir"]),  # and the tracer's atexit
], ids=["step03", "step06", "step07-traced"])
def test_no_gloo_thread_outlives_train(step, layout, extra, tmp_path):
    if extra:
        extra = [*extra, str(tmp_path / "trace")]
    torchrun(WORKER, 4, [REPO / step / "train.py", tmp_path, *COMMON, *layout, *extra])
    counts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert all(c["at_destroy"] > 0 for c in counts), counts  # the counter sees gloo's threads
    assert all(c["after_train"] == 0 for c in counts), f"process groups outlive train.py: {counts}"
