"""Run a step's train.py as torchrun does (as __main__) and count gloo's worker threads.

    torchrun --nproc_per_node N tests/workers/exit_threads.py SCRIPT OUT_DIR [script args]

Writes OUT_DIR/rank{R}.json with the number of live `pt_gloo_runloop` threads when train.py
calls destroy_process_group() (gloo threads exist then: the count is real) and after train.py
has returned (none may be left: a gloo thread that lives into interpreter shutdown can abort
the process while it frees a collective launched in backward).
"""
import json
import os
import runpy
import sys
from pathlib import Path

import torch.distributed as dist


def gloo_threads():
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            n += Path(f"/proc/self/task/{tid}/comm").read_text().strip() == "pt_gloo_runloop"
        except OSError:  # the thread ended while we looked
            pass
    return n


def main():
    script, out, train_args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    counts = {}
    destroy = dist.destroy_process_group

    def counting_destroy(*args, **kwargs):
        counts["at_destroy"] = gloo_threads()
        return destroy(*args, **kwargs)

    dist.destroy_process_group = counting_destroy  # train.py looks it up on the module at call time
    rank = os.environ["RANK"]
    sys.argv = [script, *train_args]
    runpy.run_path(script, run_name="__main__")
    counts["after_train"] = gloo_threads()
    (out / f"rank{rank}.json").write_text(json.dumps(counts))


if __name__ == "__main__":
    main()
