"""Worker for tests/test_native_twins.py, run under torchrun (gloo, CPU; 2 ranks, the 4d twin 8).

"The same in PyTorch": each twin trains the course's Llama (the step's own model.py) a few steps
twice from the same seed on the same global batch, once with the module the course wrote and once
with torch.distributed's own implementation of that dimension, and records per-step losses and the
final parameters (whole tensors) of both. Rank 0 writes them to argv[1] as JSON; the pytest side
compares them. argv[2]: comma-separated twin names (default: all but NOT_BY_DEFAULT).

The steps have no package structure and share module names (model, utils, ...): load_step imports
one step's modules in a scope of their own and takes them out of sys.modules again.
"""
import importlib
import json
import os
import sys
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before any group (see process_group_manager.py)
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
# A tiny Llama with grouped-query attention; untied embeddings, because the native TP and PP
# pieces shard or place embedding and head separately (the course's tie handling is tested elsewhere).
CFG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, vocab_size=64, tie_word_embeddings=False, rms_norm_eps=1e-5,
           initializer_range=0.02, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
           attention_bias=False, mlp_bias=False)
SEED, STEPS, MBS, T, LR, CLIP = 42, 3, 2, 16, 3e-3, 1.0


def load_step(step, *names):
    """Import modules `names` from REPO/step in their own scope: -> namespace of modules."""
    folder = REPO / step
    own = {f.stem for f in folder.glob("*.py")}
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if n in own}
    path = list(sys.path)
    sys.path.insert(0, str(folder))
    try:
        return SimpleNamespace(**{n: importlib.import_module(n) for n in names})
    finally:
        for n in own:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
        sys.path[:] = path


def config():
    return SimpleNamespace(**CFG)  # the fields model.py reads; no transformers import (slow)


def batches(n_seq):
    """STEPS global batches of n_seq sequences: (STEPS, n_seq, T + 1) token ids, equal on every rank."""
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, CFG["vocab_size"], (STEPS, n_seq, T + 1), generator=g)


def build(step_mod, parallelize=None):
    """The course's way to build a model: shapes on meta, parallelize, materialize, init_weights."""
    with torch.device("meta"):
        model = step_mod.model.Llama(config())
    if parallelize:
        parallelize(model)
    step_mod.model.materialize(model, "cpu")
    step_mod.model.init_weights(model, SEED)
    return model


def adamw(params, cls=torch.optim.AdamW, **kw):
    """The course's AdamW (train.py): weight decay on matrices only."""
    params = list(params)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return cls(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8, **kw)


def ce(logits, y):
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def mean_over(loss_sum, n, group=None):
    t = loss_sum.detach().clone()
    dist.all_reduce(t, group=group)
    return t.item() / n


def gathered(parts):
    """Merge each rank's {name: whole tensor} on every rank -> {name: flat list}."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, {k: v.detach().reshape(-1).tolist() for k, v in parts.items()})
    merged = {}
    for d in out:
        merged.update(d)
    return merged


def whole_course(model, group):
    """Whole tensors of a course model whose tp shards carry .shard = (dim, index, count)."""
    full = {}
    for name, p in model.named_parameters():
        if hasattr(p, "shard"):
            dim, _, count = p.shard
            pieces = [torch.empty_like(p) for _ in range(count)]
            dist.all_gather(pieces, p.detach().contiguous(), group=group)  # all-gather over tp
            full[name] = torch.cat(pieces, dim)
        else:
            full[name] = p.detach()
    return full


# ------------------------------------------------------------------ DP: DataParallel vs DDP
def twin_dp():
    """step02 DataParallel vs DistributedDataParallel, 2 micro-batches per rank (no_sync)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    s = load_step("step02_data_parallel", "model", "data_parallel", "utils")
    rank, world, ga = dist.get_rank(), dist.get_world_size(), 2
    data = batches(MBS * ga * world)

    def micro(step):  # this rank's share of global batch `step`, as ga (x, y) pairs of (MBS, T)
        rows = data[step].chunk(world)[rank]
        return [(r[:, :-1], r[:, 1:]) for r in rows.split(MBS)]

    def run(native):
        model = build(s)
        # small buckets: several all-reduces per step, launched during backward
        wrapped = DDP(model, bucket_cap_mb=0.01) if native else s.data_parallel.DataParallel(model, None, 0.01)
        opt, losses = adamw(model.parameters()), []
        for step in range(STEPS):
            loss_sum = torch.zeros(())
            for m, (x, y) in enumerate(micro(step)):
                last = m == ga - 1
                if native:
                    ctx = nullcontext() if last else wrapped.no_sync()  # no all-reduce before the last
                else:
                    wrapped.require_backward_grad_sync, ctx = last, nullcontext()
                with ctx:
                    loss = ce(wrapped(x), y)
                    (loss / ga).backward()
                loss_sum += loss.detach()
            if native:
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            else:
                wrapped.finish_gradient_synchronization()
                s.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(mean_over(loss_sum, ga * world))
        return {"loss": losses, "params": gathered(dict(model.named_parameters()) if rank == 0 else {})}

    return {"course": run(False), "native": run(True)}


# ------------------------------------------------------------------ ZeRO vs ZeroRedundancyOptimizer / FSDP2
def twin_zero(stage):
    """step07 --zero 1 (ZeroDataParallel + ShardedAdamW) vs DDP + ZeroRedundancyOptimizer; --zero 2 / 3
    vs FSDP2's fully_shard on each decoder layer and the root, reshard_after_forward False / True
    (FSDP's SHARD_GRAD_OP / FULL_SHARD). 2 micro-batches per rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP
    s = load_step("step07_4d_combined", "model", "zero", "process_group_manager", "utils")
    rank, world, ga = dist.get_rank(), dist.get_world_size(), 2
    data = batches(MBS * ga * world)

    def run(native):
        model = build(s)
        if native and stage == 1:
            wrapped = DDP(model, bucket_cap_mb=0.01)
            opt = adamw(model.parameters(), ZeroRedundancyOptimizer, optimizer_class=torch.optim.AdamW)
        elif native:
            mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
            for layer in model.model.layers.values():  # the unit of sharding, as --zero 3's
                fully_shard(layer, mesh=mesh, reshard_after_forward=stage == 3)
            wrapped = fully_shard(model, mesh=mesh, reshard_after_forward=stage == 3)  # embedding, norm, head
            opt = adamw(model.parameters())
        else:
            pgm = s.process_group_manager.ProcessGroupManager(dp=world, pp=1, cp=1, tp=1)
            extra = {"stage": stage} if stage > 1 else {}  # --zero 2, 3: the stage argument
            wrapped = s.zero.ZeroDataParallel(model, pgm, 0.01, **extra)
            opt = s.zero.ShardedAdamW(wrapped, adamw(model.parameters()))
        losses = []
        for step in range(STEPS):
            loss_sum = torch.zeros(())
            for m, r in enumerate(data[step].chunk(world)[rank].split(MBS)):  # (MBS, T + 1) each
                last = m == ga - 1
                if native and stage == 1:
                    ctx = nullcontext() if last else wrapped.no_sync()
                else:  # FSDP2 reduce-scatters every micro-batch's gradients, as --zero 2 and 3 do
                    wrapped.require_backward_grad_sync, ctx = last, nullcontext()
                with ctx:
                    loss = ce(wrapped(r[:, :-1]), r[:, 1:])
                    (loss / ga).backward()
                loss_sum += loss.detach()
            if native:  # DDP: whole gradients; FSDP2: DTensor shards, whose norm is the whole model's
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            else:  # reduce-scattered slices: their squares summed over the world
                wrapped.finish_gradient_synchronization()
                s.utils.clip_grad_norm_(wrapped.shards, CLIP, dist.group.WORLD)
            opt.step()  # each rank steps its share, then the parameters are all-gathered / broadcast
            opt.zero_grad(set_to_none=True)
            losses.append(mean_over(loss_sum, ga * world))
        if native:
            full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in model.named_parameters()}
        else:
            if stage == 3:
                wrapped.gather_layers()  # the layers' weights whole again
            full = dict(model.named_parameters())
        return {"loss": losses, "params": gathered(full if rank == 0 else {})}

    return {"course": run(False), "native": run(True)}


# ------------------------------------------------------------------ TP/SP vs parallelize_module
def tp_plan(cfg, sp):
    """torchtitan's Llama plan, in our module names: the native twin of apply_tensor_parallel."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)
    between = Shard(1) if sp else Replicate()  # the residual stream: split along T under --sp
    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=between),
            "lm_head": ColwiseParallel(input_layouts=between, output_layouts=Shard(-1), use_local_output=False)}
    norm = SequenceParallel(use_local_output=True)  # --sp: a norm on this rank's T/tp tokens
    entry = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))  # all-gather along T
    for i in range(cfg["num_hidden_layers"]):
        layer = {n: ColwiseParallel() for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "mlp.gate_proj", "mlp.up_proj")}
        layer |= {n: RowwiseParallel(output_layouts=between) for n in ("self_attn.o_proj", "mlp.down_proj")}
        layer |= {"input_layernorm": norm, "post_attention_layernorm": norm,
                  "attn_entry": entry, "mlp_entry": entry} if sp else {}
        plan |= {f"model.layers.{i}.{n}": style for n, style in layer.items()}
    plan |= {"model.norm": norm} if sp else {}
    return plan


def clip_mixed(params, max_norm):
    """clip_grad_norm_'s arithmetic over DTensor and plain grads: each grad's norm made whole first."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in params if p.grad is not None]
    norms = [torch.linalg.vector_norm(g) for g in grads]  # a sharded grad's norm: a partial DTensor
    total = torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]))
    coef = min(1.0, max_norm / (total.item() + 1e-6))
    for g in grads:
        g.mul_(coef)


def twin_tp(sp):
    """step03 apply_tensor_parallel (--tp 2 [--sp]) vs parallelize_module + loss_parallel on a mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module
    s = load_step("step03_tensor_parallel", "model", "tensor_parallel", "utils")
    tp, group, ga = dist.get_world_size(), dist.group.WORLD, 2
    data = batches(MBS * ga)  # every tp rank reads the whole batch
    mesh = init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))

    def run(native):
        if native:
            model = build(s)  # whole, then distribute_tensor'd by the plan
            parallelize_module(model, mesh, tp_plan(CFG, sp))
            ctx = loss_parallel  # cross-entropy on logits sharded over the vocab, never gathered
        else:
            model = build(s, lambda m: s.tensor_parallel.apply_tensor_parallel(m, group, sp=sp))
            ctx = nullcontext
        opt, losses = adamw(model.parameters()), []
        for step in range(STEPS):
            loss_sum = torch.zeros(())
            for r in data[step].split(MBS):
                x, y = r[:, :-1], r[:, 1:]
                with ctx():
                    if native:
                        loss = ce(model(x), y)
                    else:
                        loss = s.tensor_parallel.vocab_parallel_cross_entropy(model(x), y, group).mean()
                    (loss / ga).backward()
                loss_sum += (loss.full_tensor() if isinstance(loss, DTensor) else loss).detach()
            if native and sp:  # all DTensors; the norms' Replicate grads were summed over tp by autograd
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            elif native:  # no --sp: the norms stay plain tensors, which clip_grad_norm_ cannot mix with DTensors
                clip_mixed(model.parameters(), CLIP)
            else:
                if sp:
                    s.tensor_parallel.allreduce_sequence_parallel_grads(model.parameters(), group)
                s.utils.clip_grad_norm_(model.parameters(), CLIP, group)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss_sum.item() / ga)  # the same on every tp rank
        if native:
            full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in model.named_parameters()}
        else:
            full = whole_course(model, group)
        return {"loss": losses, "params": gathered(full if dist.get_rank() == 0 else {})}

    return {"course": run(False), "native": run(True)}


# ------------------------------------------------------------------ PP vs torch.distributed.pipelining
def stage_model(s, pp, stage):
    """torchtitan's manual split: the whole model, then drop what pipeline stage `stage` does not own."""
    model = build(s)
    mine = {str(i) for i in s.pipeline_parallel.stage_layers(CFG["num_hidden_layers"], pp, stage)}
    for name in [n for n in model.model.layers if n not in mine]:
        del model.model.layers[name]
    if stage != 0:
        model.model.embed_tokens = nn.Identity()
    if stage != pp - 1:
        model.model.norm, model.lm_head = nn.Identity(), nn.Identity()
    return model


def twin_pp(schedule):
    """step04 (afab) / step05 (1f1b) train_step vs PipelineStage + ScheduleGPipe / Schedule1F1B."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    step = "step04_pipeline_afab" if schedule == "afab" else "step05_pipeline_1f1b"
    s = load_step(step, "model", "pipeline_parallel", "process_group_manager")
    pp, stage, ga = dist.get_world_size(), dist.get_rank(), 4  # 1F1B wants micro-batches >= stages
    first, last = stage == 0, stage == pp - 1
    data = batches(MBS * ga)

    def run(native):
        if native:  # torchtitan's manual split: the whole model, then drop what this stage does not own
            model = stage_model(s, pp, stage)
            pipe = PipelineStage(model, stage, pp, torch.device("cpu"))
            cls = ScheduleGPipe if schedule == "afab" else Schedule1F1B
            sched = cls(pipe, n_microbatches=ga, loss_fn=ce)  # scale_grads: grads / n_microbatches
        else:
            pgm = s.process_group_manager.ProcessGroupManager(dp=1, pp=pp, tp=1)
            model = build(s, lambda m: s.pipeline_parallel.apply_pipeline_parallel(m, pgm))
        opt, losses = adamw(model.parameters()), []
        for k in range(STEPS):
            x, y = data[k][:, :-1], data[k][:, 1:]  # (ga * MBS, T): split into ga micro-batches
            if native:
                out = []
                if first:
                    sched.step(x)
                else:
                    sched.step(target=y, losses=out)
                loss_sum = torch.stack(out).sum() if last else torch.zeros(())
            else:
                mbs = list(zip(x.split(MBS), y.split(MBS)))
                loss_sum, _ = s.pipeline_parallel.train_step(model, mbs, pgm, ce, ga, nullcontext(), schedule=schedule)
            opt.step()  # no clipping here: the native pipeline has no cross-stage grad norm of its own
            opt.zero_grad(set_to_none=True)
            losses.append(mean_over(loss_sum, ga))  # the sum over stages: only the last has a loss
        return {"loss": losses, "params": gathered(dict(model.named_parameters()))}

    return {"course": run(False), "native": run(True)}


# ------------------------------------------------------------------ PP interleaved vs ScheduleInterleaved1F1B
def twin_pp_interleaved():
    """step05 --pp-engine interleaved --pp-chunks 2 vs one PipelineStage per virtual stage and
    ScheduleInterleaved1F1B: 2 ranks x 2 chunks = 4 virtual stages of one layer, 4 micro-batches.
    Needs step05's interleaved engine (train_step(..., chunks=)): not in the default run until it lands."""
    from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B
    s = load_step("step05_pipeline_1f1b", "model", "pipeline_parallel", "process_group_manager")
    pp, stage, ga, chunks = dist.get_world_size(), dist.get_rank(), 4, 2
    layers, virtual = 4, pp * chunks  # virtual stage c * pp + stage is chunk c of this rank
    data = batches(MBS * ga)
    CFG["num_hidden_layers"] = layers
    try:
        def run(native):
            if native:
                parts = []
                for c in range(chunks):  # a model of its own per chunk: init_weights draws by name, so equal
                    v, part = c * pp + stage, build(s)
                    mine = {str(i) for i in s.pipeline_parallel.stage_layers(layers, virtual, v)}
                    for name in [n for n in part.model.layers if n not in mine]:
                        del part.model.layers[name]
                    if v > 0:
                        part.model.embed_tokens = nn.Identity()
                    if v < virtual - 1:
                        part.model.norm, part.lm_head = nn.Identity(), nn.Identity()
                    parts.append(part)
                stages = [PipelineStage(m, c * pp + stage, virtual, torch.device("cpu")) for c, m in enumerate(parts)]
                sched = ScheduleInterleaved1F1B(stages, n_microbatches=ga, loss_fn=ce)
                params = {n: p for m in parts for n, p in m.named_parameters()}
            else:
                pgm = s.process_group_manager.ProcessGroupManager(dp=1, pp=pp, tp=1)
                model = build(s, lambda m: s.pipeline_parallel.apply_pipeline_parallel(m, pgm, chunks))
                params = dict(model.named_parameters())
            opt, losses = adamw(params.values()), []
            for k in range(STEPS):
                x, y = data[k][:, :-1], data[k][:, 1:]
                if native:
                    out = []
                    if stage == 0:  # virtual stage 0
                        sched.step(x)
                    else:  # the last rank holds the last virtual stage
                        sched.step(target=y, losses=out)
                    loss_sum = torch.stack(out).sum() if out else torch.zeros(())
                else:
                    mbs = list(zip(x.split(MBS), y.split(MBS)))
                    loss_sum, _ = s.pipeline_parallel.train_step(model, mbs, pgm, ce, ga, nullcontext(),
                                                                 schedule="interleaved", chunks=chunks)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(mean_over(loss_sum, ga))
            return {"loss": losses, "params": gathered(params)}

        return {"course": run(False), "native": run(True)}
    finally:
        CFG["num_hidden_layers"] = 2


# ------------------------------------------------------------------ 4D: step07 vs the native pieces on a 3-D mesh
def twin_4d():
    """step07 dp2 x pp2 x tp2 (8 ranks, 1F1B) vs a 3-D DeviceMesh composed as torchtitan does: the cut
    by hand, parallelize_module on mesh["tp"], FSDP2's fully_shard on mesh["dp"] (torchtitan's data
    parallelism next to TP: every element's gradient averaged over dp, as our all-reduce does), a
    PipelineStage on mesh["pp"] with Schedule1F1B, and loss_parallel around the schedule."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module
    s = load_step("step07_4d_combined", "model", "tensor_parallel", "pipeline_parallel", "data_parallel",
                  "process_group_manager")
    dp, pp, tp, ga = 2, 2, 2, 2
    pgm = s.process_group_manager.ProcessGroupManager(dp=dp, pp=pp, cp=1, tp=tp)
    first, last = pgm.pp_is_first_stage, pgm.pp_is_last_stage
    data = batches(MBS * ga * dp)
    keep = pgm.dp_rank == 0 and pgm.tp_rank == 0  # one copy of each stage's whole weights

    def run(native):
        if native:
            mesh = init_device_mesh("cpu", (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))
            assert mesh["pp"].get_local_rank() == pgm.pp_rank and mesh["tp"].get_local_rank() == pgm.tp_rank
            model = stage_model(s, pp, pgm.pp_rank)
            plan = {k: v for k, v in tp_plan(CFG, False).items()
                    if isinstance(_submodule(model, k), (nn.Linear, nn.Embedding))}  # this stage's modules
            parallelize_module(model, mesh["tp"], plan)
            fully_shard(model, mesh=mesh["dp"])
            pipe = PipelineStage(model, pgm.pp_rank, pp, torch.device("cpu"), group=mesh["pp"].get_group())
            sched = Schedule1F1B(pipe, n_microbatches=ga, loss_fn=ce)
        else:
            def parallelize(m):
                s.tensor_parallel.apply_tensor_parallel(m, pgm.tp_group)
                s.pipeline_parallel.apply_pipeline_parallel(m, pgm)
            model = build(s, parallelize)
            wrapped = s.data_parallel.DataParallel(model, pgm.cp_dp_group, 0.01)

            def loss_fn(logits, y):
                return s.tensor_parallel.vocab_parallel_cross_entropy(logits, y, pgm.tp_group).mean()
        opt, losses = adamw(model.parameters()), []
        for k in range(STEPS):
            rows = data[k].chunk(dp)[pgm.dp_rank]  # this dp rank's (ga * MBS, T + 1)
            x, y = rows[:, :-1], rows[:, 1:]
            if native:
                out = []
                with loss_parallel():
                    if first:
                        sched.step(x)
                    else:
                        sched.step(target=y, losses=out)
                loss_sum = (torch.stack([o.full_tensor() if isinstance(o, DTensor) else o for o in out]).sum()
                            if last else torch.zeros(()))
            else:
                mbs = list(zip(x.split(MBS), y.split(MBS)))
                loss_sum, _ = s.pipeline_parallel.train_step(wrapped, mbs, pgm, loss_fn, ga, nullcontext(),
                                                             schedule="1f1b")
                wrapped.finish_gradient_synchronization()
            opt.step()  # no clipping, as for PP alone
            opt.zero_grad(set_to_none=True)
            losses.append(mean_over(loss_sum, ga * dp * tp))  # the last stage's dp x tp ranks hold a loss each
        if native:
            full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in model.named_parameters()}
        else:
            full = whole_course(model, pgm.tp_group)
        return {"loss": losses, "params": gathered(full if keep else {})}

    return {"course": run(False), "native": run(True)}


def _submodule(model, name):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# ------------------------------------------------------------------ CP: what the native API does on CPU
def twin_cp():
    """context_parallel has no CPU attention kernel to shard: record what it raises on gloo/CPU.
    (The comparison with step06's ring attention runs on GPUs: step07/tools/gpu_check.sh.)"""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    q, k, v = (t.clone() for t in torch.randn(3, 1, 2, T, 8, generator=torch.Generator().manual_seed(0)))
    try:
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return {"raised": None}
    except Exception as e:  # noqa: BLE001  what it raises is the record
        return {"raised": f"{type(e).__name__}: {str(e).splitlines()[0]}"}


TWINS = {"dp": twin_dp, "zero1": lambda: twin_zero(1), "tp": lambda: twin_tp(False), "sp": lambda: twin_tp(True),
         "pp_gpipe": lambda: twin_pp("afab"), "pp_1f1b": lambda: twin_pp("1f1b"), "cp": twin_cp,
         "4d": twin_4d,  # 8 ranks: its own launch
         "pp_interleaved": twin_pp_interleaved, "zero2": lambda: twin_zero(2), "zero3": lambda: twin_zero(3)}
NOT_BY_DEFAULT = {"4d"}  # 8 ranks: a launch of its own


def main():
    out = sys.argv[1]
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else [n for n in TWINS if n not in NOT_BY_DEFAULT]
    dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ.get("COURSE_PG_TIMEOUT_S", 60))))
    torch.manual_seed(SEED)
    results = {}
    for name in names:
        results[name] = {**TWINS[name](), "steps": STEPS, "lr": LR}
        dist.barrier()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
