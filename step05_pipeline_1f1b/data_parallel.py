"""Data parallelism with bucketed gradient all-reduce that overlaps backward.

The problem: one process sees one batch per step. Data parallelism puts a full copy of the
model on every rank of the data-parallel group and gives each rank 1/dp of the global batch.
Every rank computes gradients of its own shard; before the optimizer step they must agree on
the gradient of the WHOLE batch, i.e. the average over the group. Averaging is enough because
each rank's loss is a mean over the same number of tokens.

Communication: one all-reduce (sum) of every gradient over the data-parallel group per
optimizer step, then a local divide by the group size (gloo has no ReduceOp.AVG). Bytes per
step = 4 x n_params (fp32). A ring all-reduce (reduce-scatter + all-gather) sends and
receives 2(n-1)/n of those bytes per rank, so per-rank traffic ~ 8 x n_params bytes whatever
the group size n. Memory cost: one extra fp32 copy of the gradients (the bucket buffers).

Overlap: backward produces the last layers' gradients first. Parameters are packed, in
REVERSE registration order, into buckets of ~bucket_size_mb. A post-accumulate-grad hook
marks each parameter ready; as soon as a whole bucket is ready its all-reduce is launched
asynchronously, so the network works on the last layers while autograd still computes the
first layers' gradients. Buckets are launched strictly in bucket order, so every rank issues
the same sequence of collectives (collectives are matched by order, not by name).
One huge bucket = no overlap; tiny buckets = many latency-bound messages.

Gradient accumulation: set `require_backward_grad_sync = False` for all but the last
micro-batch; those backwards only accumulate into p.grad locally (no communication at all).
The hooks read the flag when the gradient arrives, at backward time, not at forward time.

Reference: Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training" (VLDB), Sections 3.2.3 (gradient bucketing) and 3.2.4 (overlap with backward).
"""
import weakref
from functools import partial

import torch
import torch.distributed as dist
from torch import nn


class Bucket:
    """A contiguous fp32 buffer holding the flattened gradients of a few parameters."""

    def __init__(self, index, params, size=None):
        self.index = index
        self.params = params
        self.slices, lo = [], 0
        for p in params:
            self.slices.append((lo, lo + p.numel()))
            lo += p.numel()
        self.buffer = torch.zeros(size or lo, dtype=torch.float32, device=params[0].device)  # size: padded
        self.work = None  # the async all-reduce in flight
        self.reset()

    def reset(self):
        self.ready = [False] * len(self.params)  # grad of params[i] is final for this step
        self.pending = len(self.params)

    def flatten_grads(self):
        for p, (lo, hi) in zip(self.params, self.slices):
            flat = self.buffer[lo:hi]  # (numel,)
            if p.grad is None:  # unused this step on this rank: contributes zero
                flat.zero_()
            else:
                flat.copy_(p.grad.reshape(-1))  # (numel,) <- param shape


class DataParallel(nn.Module):
    def __init__(self, module, group=None, bucket_size_mb=25.0):
        super().__init__()
        self.module = module
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.require_backward_grad_sync = True
        # parameters() yields each Parameter once even if it is tied (embed/lm_head)
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:
            assert p.dtype == torch.float32, "params must be fp32 (use autocast for bf16)"
            assert p.device.type != "meta", "wrap the model after materialize()"
        self.buckets = []
        self._next = 0  # first bucket not yet launched this step
        if self.world > 1:  # group of 1: nothing to average, no buckets, no hooks, no communication
            self.buckets = self.make_buckets(params, bucket_size_mb)
            me = weakref.ref(self)  # weakly: hooks live in C++, beyond gc (test_clean_exit.py)
            for b in self.buckets:
                for i, p in enumerate(b.params):
                    p.register_post_accumulate_grad_hook(partial(_grad_ready, me, b.index, i))

    def make_buckets(self, params, bucket_size_mb):
        """Pack the parameters into buckets of ~bucket_size_mb, in reverse registration order:
        backward finishes the last layers first."""
        cap = bucket_size_mb * 2**20
        groups, cur, cur_bytes = [], [], 0
        for p in reversed(params):
            cur.append(p)
            cur_bytes += 4 * p.numel()
            if cur_bytes >= cap:
                groups.append(cur)
                cur, cur_bytes = [], 0
        if cur:
            groups.append(cur)
        return [Bucket(i, ps) for i, ps in enumerate(groups)]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _on_grad_ready(self, bucket, i, p):
        # Runs inside autograd, right after this parameter's grad has been accumulated into
        # p.grad (once per backward, even for a tied parameter used twice).
        if not self.require_backward_grad_sync:
            return  # accumulation micro-batch: keep summing into p.grad, no communication
        assert not bucket.ready[i], ("grad arrived twice in one synced step: set "
                                     "require_backward_grad_sync=False for earlier micro-batches")
        assert p.grad.dtype == torch.float32, f"expected fp32 grads, got {p.grad.dtype}"
        bucket.ready[i] = True
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_ready_buckets()

    def _launch_ready_buckets(self):
        # Strictly in bucket order, so that all ranks issue the same all-reduce sequence even
        # if hooks of different buckets fire in a different order.
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket):
        bucket.flatten_grads()
        # all-reduce (SUM) over the data-parallel group, async: autograd keeps computing the
        # earlier layers' grads while this bucket is on the wire.
        bucket.work = dist.all_reduce(bucket.buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def finish_gradient_synchronization(self):
        """Wait for every bucket; afterwards p.grad is the average over the group.

        Call once per optimizer step, after the last micro-batch's backward and before
        grad clipping / optimizer.step().
        """
        if self.world > 1:
            # Buckets still incomplete hold parameters that got no grad this step (unused):
            # launch them now, still in order, so every rank matches the same collectives.
            for b in self.buckets[self._next:]:
                b.pending = 0
            self._launch_ready_buckets()
            for b in self.buckets:
                b.work.wait()
                b.work = None
                b.buffer.div_(self.world)  # gloo has no AVG: sum, then divide
                for p, (lo, hi) in zip(b.params, b.slices):
                    avg = b.buffer[lo:hi].view_as(p)  # (numel,) -> param shape
                    if p.grad is None:
                        p.grad = avg.clone()
                    else:
                        p.grad.copy_(avg)
                b.reset()
        self._next = 0


def _grad_ready(module_ref, bucket_index, i, p):
    """The post-accumulate-grad hook: hand the parameter to its DataParallel, if still alive."""
    dp = module_ref()
    if dp is not None:
        dp._on_grad_ready(dp.buckets[bucket_index], i, p)
