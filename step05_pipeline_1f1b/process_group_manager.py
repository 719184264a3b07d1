"""Who talks to whom: the rank grid and one process group per parallel dimension.

Every rank has coordinates in a grid of axes (dp, pp, tp).
tp varies fastest, so a tp group is made of neighbouring ranks: on a GPU machine they share a
node and its fast links, which tensor parallelism needs most. A dimension's group is the set of
ranks that differ only along that axis: the data-parallel group of rank r is every rank holding
the same model shard, and it is where gradients are averaged.
"""
import gc
import os
from datetime import timedelta
from math import prod

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before any group: it binds the world group (test_clean_exit.py)


def init_distributed(device):
    """Join the job torchrun started (or a job of one for `python train.py`): -> (rank, world)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # A collective that waits longer than this is a bug (a rank took another branch): fail.
    timeout = timedelta(seconds=int(os.environ.get("COURSE_PG_TIMEOUT_S", 600)))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=timeout)
    return rank, world


def shutdown_distributed():
    """Destroy the process groups once main() has returned (workaround for pytorch/pytorch#190489).

    A gloo worker thread still alive at interpreter exit can abort the process, and gloo joins a
    group's threads only when nothing references the group any more: tests/test_clean_exit.py
    explains it, and checks that no thread is left.
    """
    gc.collect()  # main()'s objects, cycles among them included
    if dist.is_initialized():
        dist.destroy_process_group()


# torch 2.13 renamed two collectives and warns on the old names; torch 2.11 has only the old ones.
# These pick by feature detection, at each call (notebooks/trace.py records both names as the old).
def all_gather_flat(out, x, group, async_op=False):
    """All-gather over `group`: every rank's `x`, concatenated along dim 0 in rank order, into `out`."""
    gather = dist.all_gather_single if hasattr(dist, "all_gather_single") else dist.all_gather_into_tensor
    return gather(out, x, group=group, async_op=async_op)


def reduce_scatter_flat(out, x, group, async_op=False):
    """Reduce-scatter (sum) over `group`: rank r's `out` is the sum of the r-th 1/size of `x` along dim 0."""
    scatter = dist.reduce_scatter_single if hasattr(dist, "reduce_scatter_single") else dist.reduce_scatter_tensor
    return scatter(out, x, group=group, async_op=async_op)


class ProcessGroupManager:
    def __init__(self, dp, pp, tp):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.sizes = {"dp": dp, "pp": pp, "tp": tp}  # slowest-varying axis first
        assert prod(self.sizes.values()) == self.world_size, (self.sizes, self.world_size)
        self.grid = torch.arange(self.world_size).view(*self.sizes.values())  # (dp, pp, tp)
        coords = dict(zip(self.sizes, (self.grid == self.rank).nonzero()[0].tolist()))
        self.dp_rank, self.dp_size = coords["dp"], dp
        self.tp_rank, self.tp_size = coords["tp"], tp
        self.pp_rank, self.pp_size = coords["pp"], pp
        self.pp_is_first_stage, self.pp_is_last_stage = self.pp_rank == 0, self.pp_rank == pp - 1
        # global ranks of the neighbouring stages (same coordinates on the other axes)
        self.pp_prev_rank = self._rank_at(coords, pp=(self.pp_rank - 1) % pp)
        self.pp_next_rank = self._rank_at(coords, pp=(self.pp_rank + 1) % pp)
        self.dp_group = self._group_along("dp")
        self.tp_group = self._group_along("tp")
        self.pp_group = self._group_along("pp")
        # the ranks that together hold one copy of the model: the gradient norm sums over them
        self.mp_group = self._group_along("pp", "tp")

    def _rank_at(self, coords, **changes):
        """Global rank of the grid cell with this rank's coordinates except `changes`."""
        return int(self.grid[tuple({**coords, **changes}[a] for a in self.sizes)])

    def _group_along(self, *axes):
        """The group of ranks that differ from this one only along `axes`.

        new_group is collective: every rank creates every group, in the same order, and
        keeps the one it belongs to.
        """
        names = list(self.sizes)
        keep = [names.index(a) for a in axes]
        rest = [i for i in range(len(names)) if i not in keep]
        rows = self.grid.permute(*rest, *keep).reshape(-1, prod(self.sizes[a] for a in axes))
        mine = None
        for row in rows.tolist():
            g = dist.new_group(row)
            if self.rank in row:
                mine = g
        return mine

    def __repr__(self):
        return " ".join(f"{a}={getattr(self, a + '_rank')}/{n}" for a, n in self.sizes.items())
