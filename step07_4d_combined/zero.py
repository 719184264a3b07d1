"""ZeRO-1 (--zero 1): shard AdamW's state over the replicas that hold the same weights (dp x cp).

Problem: plain data parallelism keeps the whole optimizer state on every replica. AdamW's two
moments are 8 bytes per parameter, twice the float32 weights, and identical on all W = dp x cp
replicas. ZeRO stage 1 (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", Sec. 5.1) keeps 1/W of it per rank: rank r owns slice r of every
gradient bucket, steps the parameters in that slice, and hands them to the others.

Communication per step, over the dp x cp group, in place of each bucket's all-reduce:
  reduce-scatter (sum) of the bucket, launched from backward as soon as its gradients are final
      (bucketed and overlapped exactly like DataParallel's all-reduce): rank r gets slice r;
  all-gather of the updated slices after the optimizer step (optimizer.step() does it).
A ring all-reduce is a reduce-scatter followed by an all-gather, so the bytes are the same:
2 (W-1)/W x 4 bytes per parameter sent per rank. Memory per rank against plain data
parallelism: AdamW's state 8/W instead of 8 bytes per parameter (and one 4-byte step per slice),
plus a 4/W-byte slice of reduced gradients; weights, p.grad and the buckets (padded to a
multiple of W) stay as they are. ZeRO-2 and -3 would shard the gradients and the weights too.

Gradient clipping sees the whole model: every element of the model lives in exactly one slice
of one rank, so summing the slices' squares over the world gives the full norm (the norm gains,
copied on every tp rank, count once through p.replicas, as without ZeRO).
Tied embeddings on a pipeline: the first stage's embedding and the last stage's lm_head copy
are each a bucket of their own, so their slices line up element by element; after the
reduce-scatter each slice is summed over {first, last stage}, and both copies take the same
step from the same state.
"""
import math

import torch
import torch.distributed as dist

from data_parallel import Bucket, DataParallel
from pipeline_parallel import tied_embedding_group
from process_group_manager import all_gather_flat, reduce_scatter_flat


class ZeroDataParallel(DataParallel):
    """DataParallel whose buckets are reduce-scattered; `shards` are this rank's slices, as views."""

    def __init__(self, module, pgm, bucket_size_mb=25.0):
        self.W = dist.get_world_size(pgm.cp_dp_group)
        core, self.tied_group, self.first_stage = module, None, pgm.pp_is_first_stage
        self.tied = set()  # ids of the tied embedding's copies on a pipeline (a bucket of their own)
        if core.config.tie_word_embeddings and pgm.pp_size > 1:
            if pgm.pp_is_first_stage:
                self.tied.add(id(core.model.embed_tokens.weight))
            if pgm.pp_is_last_stage:
                self.tied.add(id(core.lm_head.weight))
            if self.tied:
                self.tied_group = tied_embedding_group(pgm)
        super().__init__(module, pgm.cp_dp_group, bucket_size_mb)
        self.shards = self._slices()

    def make_buckets(self, params, bucket_size_mb):
        """DataParallel's buckets, the tied embedding alone in one, each padded to a multiple of W."""
        tied = [p for p in params if id(p) in self.tied]
        groups = [b.params for b in super().make_buckets([p for p in params if id(p) not in self.tied],
                                                         bucket_size_mb)]
        if tied:  # the first stage's embedding gets its grad last, the last stage's lm_head first
            groups = groups + [tied] if self.first_stage else [tied] + groups
        buckets = []
        for i, ps in enumerate(groups):
            size = self.W * math.ceil(sum(p.numel() for p in ps) / self.W)
            b = Bucket(i, ps, size)
            b.shard = torch.zeros(size // self.W, device=b.buffer.device)  # this rank's slice, summed
            buckets.append(b)
        return buckets

    def _slices(self):
        """This rank's slice of every bucket, cut into one flat view per parameter it overlaps."""
        rank = dist.get_rank(self.group) if self.world > 1 else 0
        shards = []
        for b in self.buckets:
            n = b.shard.numel()
            lo_r, hi_r = rank * n, (rank + 1) * n
            b.pieces = []
            for p, (lo, hi) in zip(b.params, b.slices):
                a, z = max(lo, lo_r), min(hi, hi_r)
                if a >= z:
                    continue
                piece = p.detach().view(-1)[a - lo:z - lo]  # a view: stepping it steps p
                piece.decay, piece.replicas = p.dim() >= 2, getattr(p, "replicas", 1)
                if hasattr(p, "shard"):  # a slice of a tp shard (what --sp's grad sum leaves alone)
                    piece.shard = p.shard
                piece.source = (p, a - lo)  # which parameter, from which flat offset (checkpoints)
                b.pieces.append((piece, a - lo_r))
                shards.append(piece)
        return shards

    def _launch(self, bucket):
        bucket.flatten_grads()
        # reduce-scatter (sum) over dp x cp, async: rank r receives the sum of slice r of the bucket
        bucket.work = reduce_scatter_flat(bucket.shard, bucket.buffer, self.group, async_op=True)

    def finish_gradient_synchronization(self):
        """Wait for the buckets; afterwards each slice's .grad is the average over dp x cp."""
        for b in self.buckets[self._next:]:  # unused parameters: launch in order, as DataParallel does
            b.pending = 0
        self._launch_ready_buckets()
        for b in self.buckets:
            b.work.wait()
            b.work = None
            b.shard.div_(self.W)  # gloo has no AVG: sum, then divide
            if self.tied and id(b.params[0]) in self.tied:  # all-reduce (sum) over {first, last stage}
                dist.all_reduce(b.shard, group=self.tied_group)
            for piece, off in b.pieces:
                piece.grad = b.shard[off:off + piece.numel()]  # (numel,) a view of the summed slice
            b.reset()
        self._next = 0

    @torch.no_grad()
    def all_gather_parameters(self):
        """After the step: all-gather over dp x cp the updated slices into every replica's parameters."""
        for b in self.buckets:
            for piece, off in b.pieces:  # the slice's new values, into the send buffer
                b.shard[off:off + piece.numel()].copy_(piece)
            all_gather_flat(b.buffer, b.shard, self.group)  # all-gather over dp x cp
            for p, (lo, hi) in zip(b.params, b.slices):
                p.view(-1).copy_(b.buffer[lo:hi])  # (numel,) -> param shape


class ShardedAdamW(torch.optim.AdamW):
    """AdamW over this rank's slices: step() then all-gathers the parameters, zero_grad() also
    clears the model's own gradients (the slices' .grad are views of the reduced buckets)."""

    def __init__(self, zero_dp, optimizer):
        self.zero_dp = zero_dp
        hyper = {k: v for k, v in optimizer.defaults.items() if k in ("lr", "betas", "eps", "fused", "foreach")}
        decay = optimizer.param_groups[0]["weight_decay"]  # the course's groups: matrices, then gains
        groups = [{"params": [s for s in zero_dp.shards if s.decay], "weight_decay": decay},
                  {"params": [s for s in zero_dp.shards if not s.decay], "weight_decay": 0.0}]
        super().__init__([g for g in groups if g["params"]], **hyper)

    def step(self, closure=None):
        loss = super().step(closure)
        self.zero_dp.all_gather_parameters()
        return loss

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)
        self.zero_dp.module.zero_grad(set_to_none)
