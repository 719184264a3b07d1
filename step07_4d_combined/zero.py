"""ZeRO (--zero 1, 2, 3): shard AdamW's state, then the gradients, then the weights, over the
replicas that hold the same weights (dp x cp).

Problem: plain data parallelism keeps everything on every replica: float32 weights (4 bytes per
parameter), gradients (4) and AdamW's two moments (8), identical on all W = dp x cp replicas.
ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", Sec. 5) keeps 1/W of them per rank: rank r owns slice r of every bucket (a flat run of
parameters, padded to a multiple of W) and steps the parameters in that slice.
  stage 1  AdamW's state: 8/W bytes per parameter instead of 8 (and one 4-byte step per slice).
  stage 2  + gradients: each micro-batch's bucket is reduce-scattered as soon as its gradients are
           final, and rank r adds only slice r to its 4/W-byte accumulator. What stays full size,
           and why: a parameter's p.grad from the moment autograd writes it to the moment its
           bucket is launched (autograd writes whole gradients; at most a bucket's worth is
           waiting), and the one bucket on the wire (its flat buffer and the received slice,
           freed when the next bucket is launched or the step ends).
  stage 3  + weights, per decoder layer (the unit of sharding; FSDP's "wrap each block"): rank r
           keeps slice r of each layer's flat weights, 4/W bytes per parameter. Unsharded, as in
           stage 2: the embedding, the final norm and lm_head (2 V D + D parameters untied,
           V D + D tied, per tp rank: 131 K of tiny's 205 K, 0.26 B of llama2-7b's 6.7 B).
Units and collectives, all over the dp x cp group, W = dp x cp, P the parameters of the stage:
  reduce-scatter (sum) of each bucket, from backward (stage 1: the last micro-batch only;
      stages 2, 3: every micro-batch): (W-1)/W x 4 P sent per rank, per time.
  all-gather of the updated slices after optimizer.step() (stage 3: not the layers'): the same.
  stage 3, per layer and micro-batch: all-gather of its weights in a forward pre-hook (the next
      layer's is launched asynchronously, a prefetch, before this one computes), freed after the
      forward; all-gathered again in backward (a hook on the layer's output gradient), freed as
      soon as its gradients are final, and the layer below prefetched then. At most two layers
      are whole at once.
Bytes sent per rank and step, m micro-batches, b = (W-1)/W x 4 P: stage 0 and 1, 2 b (a ring
all-reduce is a reduce-scatter then an all-gather); stage 2, (m + 1) b; stage 3, (3 m) b for the
layers: with m = 1, 1.5 x plain data parallelism (the paper's figure, Sec. 7).
With a pipeline (pp > 1) a stage runs its layers for many micro-batches at once, interleaved:
gathering per forward and per backward would cost 2 m all-gathers per step. Stage 3 gathers a
layer at its first forward of the step and keeps it until the step's last backward: one
all-gather per step, b_layers, exactly what stage 2's all-gather after the step costs, and the
weights are sharded between steps (while the optimizer runs); at the peak a stage holds its own
layers whole, as stage 2 does.
Not done: --compile with --zero 3 (the gathers live in module hooks; refused in speed.py); each
rank builds its whole stage once before sharding it (the init peak is 4 bytes per parameter).

Gradient clipping sees the whole model: every element of the model lives in exactly one slice
of one rank, so summing the slices' squares over the world gives the full norm (the norm gains,
copied on every tp rank, count once through p.replicas, as without ZeRO).
Tied embeddings on a pipeline: the first stage's embedding and the last stage's lm_head copy
are each a bucket of their own, so their slices line up element by element; after the
reduce-scatter each slice is summed over {first, last stage}, and both copies take the same
step from the same state.
"""
import math
import weakref
from functools import partial

import torch
import torch.distributed as dist

from data_parallel import Bucket, DataParallel
from pipeline_parallel import tied_embedding_group
from process_group_manager import all_gather_flat, reduce_scatter_flat


class ZeroDataParallel(DataParallel):
    """DataParallel whose buckets are reduce-scattered; `shards` are this rank's slices, as views."""

    def __init__(self, module, pgm, bucket_size_mb=25.0, stage=1):
        self.W, self.stage = dist.get_world_size(pgm.cp_dp_group), stage
        core, self.tied_group, self.first_stage = module, None, pgm.pp_is_first_stage
        self.tied = set()  # ids of the tied embedding's copies on a pipeline (a bucket of their own)
        if core.config.tie_word_embeddings and pgm.pp_size > 1:
            if pgm.pp_is_first_stage:
                self.tied.add(id(core.model.embed_tokens.weight))
            if pgm.pp_is_last_stage:
                self.tied.add(id(core.lm_head.weight))
            if self.tied:
                self.tied_group = tied_embedding_group(pgm)
        self.layers = list(core.model.layers.values()) if stage == 3 else []
        self.keep = pgm.pp_size > 1  # --zero 3 on a pipeline: a layer stays whole from its first forward
        self.in_flight, self.peak_in_flight, self.gathered, self.peak_gathered = None, 0, 0, 0
        super().__init__(module, pgm.cp_dp_group, bucket_size_mb)
        rank = dist.get_rank(self.group)
        self.units = [next(b for b in self.buckets if b.unit is layer) for layer in self.layers]  # forward order
        me = weakref.ref(self)  # weakly, as DataParallel's hooks
        for i, b in enumerate(self.units):  # --zero 3: the layer's weights become views of its bucket
            n = b.size // self.W
            for p, (lo, hi) in zip(b.params, b.slices):
                b.buffer[lo:hi].copy_(p.detach().view(-1))
                p.data = b.buffer[lo:hi].view_as(p)  # the same Parameter (hooks, names), its storage the bucket's
                p.zero3 = True  # checkpoint.py: its weights live in the slices
            b.weights = b.buffer[rank * n:(rank + 1) * n].clone()  # this rank's slice: the only copy it keeps
            b.gather_work, b.whole, self.gathered = None, True, self.gathered + 4 * b.size
            self._free(b)
            b.unit.register_forward_pre_hook(partial(_before_layer, me, i))
            b.unit.register_forward_hook(partial(_after_layer, me, i))
        self.shards = self._slices()

    def make_buckets(self, params, bucket_size_mb):
        """DataParallel's buckets, the tied embedding alone in one, each padded to a multiple of W;
        with --zero 3 every decoder layer a bucket of its own (its parameters in registration order)."""
        layer_of = {id(p): layer for layer in self.layers for p in layer.parameters()}
        segments = []  # runs of consecutive parameters: (their layer or None, [params])
        for p in (p for p in params if id(p) not in self.tied):
            if segments and segments[-1][0] is layer_of.get(id(p)):
                segments[-1][1].append(p)
            else:
                segments.append((layer_of.get(id(p)), [p]))
        groups = []
        for layer, ps in reversed(segments):  # backward's order
            groups += [(layer, ps)] if layer is not None else [
                (None, b.params) for b in super().make_buckets(ps, bucket_size_mb)]
        tied = [p for p in params if id(p) in self.tied]
        if tied:  # the first stage's embedding gets its grad last, the last stage's lm_head first
            groups = groups + [(None, tied)] if self.first_stage else [(None, tied)] + groups
        buckets = []
        for i, (layer, ps) in enumerate(groups):
            size = self.W * math.ceil(sum(p.numel() for p in ps) / self.W)
            b = Bucket(i, ps, size)
            b.size, b.unit, b.received = size, layer, None
            b.shard = torch.zeros(size // self.W, device=b.buffer.device)  # this rank's slice, summed
            if self.stage >= 2 and layer is None:
                b.buffer = None  # made when launched, freed once sent
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
                if b.unit is not None:  # --zero 3: a view of the layer's slice, the weights' only copy here
                    piece = b.weights[a - lo_r:z - lo_r]
                else:
                    piece = p.detach().view(-1)[a - lo:z - lo]  # a view: stepping it steps p
                piece.decay, piece.replicas = p.dim() >= 2, getattr(p, "replicas", 1)
                if hasattr(p, "shard"):  # a slice of a tp shard (what --sp's grad sum leaves alone)
                    piece.shard = p.shard
                piece.source = (p, a - lo)  # which parameter, from which flat offset (checkpoints)
                b.pieces.append((piece, a - lo_r))
                shards.append(piece)
        return shards

    # --- zero 3: a layer's weights, whole only while it runs
    def _gather(self, b, wait=True):
        if not b.whole:
            b.buffer.untyped_storage().resize_(4 * b.size)
            # all-gather over dp x cp, async: every rank's slice of the layer into its flat buffer
            b.gather_work = all_gather_flat(b.buffer, b.weights, self.group, async_op=True)
            b.whole, self.gathered = True, self.gathered + 4 * b.size
            self.peak_gathered = max(self.peak_gathered, self.gathered)
        if wait and b.gather_work is not None:
            b.gather_work.wait()
            b.gather_work = None

    def _free(self, b):
        if b.gather_work is not None:  # an all-gather still in flight writes into the buffer: wait for it
            b.gather_work.wait()
            b.gather_work = None
        b.buffer.untyped_storage().resize_(0)  # the views (the layer's parameters) keep their shapes
        b.whole, self.gathered = False, self.gathered - 4 * b.size

    def gather_layers(self):
        """Every layer whole, for good (--dump-params, --export-hf at the end of a run)."""
        for b in self.units:
            self._gather(b)

    # --- gradients
    def _on_grad_ready(self, bucket, i, p):
        if self.stage == 1:
            return super()._on_grad_ready(bucket, i, p)
        bucket.ready[i] = True  # stages 2, 3: every micro-batch's gradients leave at once
        bucket.pending -= 1
        if bucket.pending == 0:
            if bucket.unit is not None:  # --zero 3: backward is done with this layer's weights
                k = self.units.index(bucket)
                if not self.keep or self.require_backward_grad_sync:  # a pipeline: until the last backward
                    self._free(bucket)
                if k > 0 and not self.keep:
                    self._gather(self.units[k - 1], wait=False)  # prefetch the layer backward runs next
            self._launch_ready_buckets()
            if self._next == len(self.buckets):  # the micro-batch's last bucket is on the wire
                self._next = 0

    def _launch(self, bucket):
        if self.stage == 1:
            bucket.flatten_grads()
            # reduce-scatter (sum) over dp x cp, async: rank r receives the sum of slice r of the bucket
            bucket.work = reduce_scatter_flat(bucket.shard, bucket.buffer, self.group, async_op=True)
            return
        self._retire()  # one bucket on the wire at a time: the previous one's buffers go first
        flat = torch.zeros(bucket.size, device=bucket.shard.device)  # (size,) full size while in flight
        for p, (lo, hi) in zip(bucket.params, bucket.slices):
            if p.grad is not None:
                flat[lo:hi].copy_(p.grad.reshape(-1))  # (numel,) <- param shape
                p.grad = None  # the full gradient is freed as soon as the bucket holds it
        bucket.received = torch.empty_like(bucket.shard)
        # reduce-scatter (sum) over dp x cp, async: rank r receives slice r summed, added to its shard later
        bucket.work = reduce_scatter_flat(bucket.received, flat, self.group, async_op=True)
        bucket.flat, self.in_flight = flat, bucket
        self.peak_in_flight = max(self.peak_in_flight, 4 * (flat.numel() + bucket.received.numel()))
        bucket.reset()

    def _retire(self):
        b, self.in_flight = self.in_flight, None
        if b is not None:
            b.work.wait()
            b.shard += b.received  # this rank's slice, summed over the micro-batches
            b.work = b.flat = b.received = None

    def finish_gradient_synchronization(self):
        """Wait for the buckets; afterwards each slice's .grad is the average over dp x cp."""
        if self.stage == 1 or self._next:  # unused parameters: launch in order, as DataParallel does
            for b in self.buckets[self._next:]:
                b.pending = 0
            self._launch_ready_buckets()
        self._retire()
        for b in self.buckets:
            if b.work is not None:
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
        """After the step: all-gather over dp x cp the updated slices into every replica's parameters
        (--zero 3: not the layers', gathered when they next run)."""
        for b in self.buckets:
            if b.unit is not None:
                b.shard.zero_()
                continue
            for piece, off in b.pieces:  # the slice's new values, into the send buffer
                b.shard[off:off + piece.numel()].copy_(piece)
            buffer = b.buffer if b.buffer is not None else torch.empty(b.size, device=b.shard.device)
            all_gather_flat(buffer, b.shard, self.group)  # all-gather over dp x cp
            for p, (lo, hi) in zip(b.params, b.slices):
                p.view(-1).copy_(buffer[lo:hi])  # (numel,) -> param shape
            if self.stage >= 2:
                b.shard.zero_()  # the accumulator of the next step's micro-batches

    def held_bytes(self):
        """(weights, gradients) this rank keeps between steps, as --memory-report counts them."""
        weights = sum(4 * p.numel() for p in self.module.parameters() if not getattr(p, "zero3", False))
        weights += sum(4 * b.weights.numel() for b in self.units)
        grads = sum(4 * p.grad.numel() for p in self.module.parameters() if p.grad is not None)
        return weights, grads + (sum(4 * b.shard.numel() for b in self.buckets) if self.stage >= 2 else 0)


def _before_layer(me, i, module, args):
    """Forward pre-hook of layer i (--zero 3): its weights whole, the next layer's on their way."""
    zero = me()
    zero._gather(zero.units[i])
    if i + 1 < len(zero.units):
        zero._gather(zero.units[i + 1], wait=False)  # prefetch: its all-gather runs while layer i computes


def _after_layer(me, i, module, args, output):
    """Forward hook of layer i (--zero 3): free its weights; backward gathers them again."""
    zero = me()
    if torch.is_grad_enabled() and output.requires_grad:
        output.register_hook(lambda grad: me()._gather(me().units[i]))  # backward reaches layer i
    if not zero.keep:
        zero._free(zero.units[i])


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
