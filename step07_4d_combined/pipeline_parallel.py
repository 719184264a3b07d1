"""Pipeline parallelism: cut the model by depth into stages that pass activations along.

Problem: the weights, grads and optimizer states do not fit on one GPU, and tensor parallelism
only scales inside a node (it all-reduces in every layer). Stage s of pp owns a contiguous
block of decoder layers (the first also the embedding, the last the norm, lm_head and loss);
the m = grad_acc micro-batches flow through the stages like parts on an assembly line.

Communication: point-to-point send/recv between neighbouring stages only. Per micro-batch and
stage boundary, forward sends the activations (mbs, T, D) to the next stage, backward sends
their gradient to the previous one: mbs * T * hidden * 4 bytes each way (float32: the residual
stream stays float32 under bf16 autocast). Tied embeddings add one all-reduce of the (V, D)
embedding grad per step between the first and last stage (sync_tied_embeddings).

The bubble: stage s waits for the s stages before it to fill, and idles while the pipeline
drains. With times f, b per micro-batch and stage, a step takes (m + p - 1)(f + b) of which
each stage works m(f + b): idle fraction (p - 1) / (m + p - 1). More micro-batches shrink it.

Activation memory: AFAB (all-forward-all-backward, GPipe) runs the m forwards before any
backward, so every stage holds the activations of all m micro-batches at its peak; raising m
to shrink the bubble grows memory with it.
1F1B (PipeDream-Flush): stage s runs min(p - s - 1, m) warm-up forwards, then alternates one
forward and one backward, then drains the remaining backwards. Same bubble as AFAB, but a
micro-batch's activations are freed by its backward as soon as possible: at most p - s
micro-batches are alive on stage s, whatever m is.

A schedule is a pure function giving one stage's event list [("F", micro), ("B", micro), ...];
train_step runs any list; simulate/plot_schedule replay the same lists for the README.
References: Huang et al. 2019, "GPipe: Efficient Training of Giant Neural Networks using
Pipeline Parallelism", arXiv:1811.06965.
Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", SC'21, arXiv:2104.04473 (Sec. 2.2.1: the 1F1B schedule).
"""
import torch
import torch.distributed as dist
import torch.nn as nn


def check_pp(num_layers, pp_size):
    if not 1 <= pp_size <= num_layers:
        raise ValueError(f"--pp {pp_size} needs 1 <= pp <= num_layers={num_layers} (every stage owns at "
                         f"least one decoder layer); use --pp {min(max(pp_size, 1), num_layers)} or more --num-layers")


def stage_layers(num_layers, pp_size, stage):
    """Global indices of the decoder layers stage `stage` owns: a contiguous block.

    As even as possible; when pp does not divide num_layers the EARLIER stages take one extra
    layer each, because the last stage also runs the final norm, lm_head and the loss (the
    (D, V) head matmul costs about as much as a layer for small models).
    """
    check_pp(num_layers, pp_size)
    base, extra = divmod(num_layers, pp_size)
    start = stage * base + min(stage, extra)
    return list(range(start, start + base + (stage < extra)))


def apply_pipeline_parallel(model, pgm):
    """Keep only this stage's part of the (meta) course Llama, in place; Llama.forward is unchanged.

    Layers this stage does not own are deleted from the ModuleDict (names stay global, e.g.
    model.layers.7 on stage 1), the embedding becomes nn.Identity unless first stage, norm and
    lm_head unless last stage; later stages then feed hidden states (B, T, D) through forward.
    Apply after apply_tensor_parallel, so the last stage's copy of a tied lm_head inherits the
    shard. Collective when embeddings are tied and pp > 1 (builds the tied-embedding group).
    """
    pp, stage = pgm.pp_size, pgm.pp_rank
    check_pp(model.config.num_hidden_layers, pp)
    if pp == 1:
        return model
    mine = {str(i) for i in stage_layers(model.config.num_hidden_layers, pp, stage)}
    for name in list(model.model.layers.keys()):
        if name not in mine:
            del model.model.layers[name]
    if model.config.tie_word_embeddings:
        # Embedding (first stage) and lm_head (last stage) now live on different ranks: give the
        # last stage its own Parameter. init_weights draws it from the embedding's name, so both
        # copies start equal; sync_tied_embeddings sums their grads so they stay equal.
        emb = model.model.embed_tokens.weight
        head = nn.Parameter(torch.empty_like(emb))  # meta, (V, D) or (V/tp, D)
        head.__dict__.update(emb.__dict__)  # .shard (vocab-parallel), .replicas
        for p in (emb, head):
            p.replicas = getattr(p, "replicas", 1) * 2  # two copies in the grad-norm group: count once
        model.lm_head.weight = head
        tied_embedding_group(pgm)  # every rank, same order: dist.new_group is collective
    if not pgm.pp_is_first_stage:
        model.model.embed_tokens = nn.Identity()
    if not pgm.pp_is_last_stage:
        model.model.norm = nn.Identity()
        model.lm_head = nn.Identity()
    return model


def tied_embedding_group(pgm):
    """The group {first stage, last stage} of this rank's coordinates on the other axes.

    Built on first use, one group per cell of the other axes of pgm.grid (every rank creates all,
    in the same order, as dist.new_group requires); this rank's is kept on pgm (None on middle
    stages).
    """
    if not hasattr(pgm, "pp_embed_group"):
        pgm.pp_embed_group = None
        grid = pgm.grid.movedim(list(pgm.sizes).index("pp"), -1)  # (..., pp): stages last
        for ranks in grid[..., [0, -1]].reshape(-1, 2).tolist():  # (cells, 2): first, last stage
            group = dist.new_group(ranks)
            if pgm.rank in ranks:
                pgm.pp_embed_group = group
    return pgm.pp_embed_group


def sync_tied_embeddings(model, pgm):
    """All-reduce (sum) the tied embedding's grad between the first and the last stage.

    Each copy holds the gradient of one use (lookup on the first stage, lm_head on the last);
    the tied parameter's gradient is their sum. V*D*4 bytes (V/tp with tensor parallel).
    Call after DataParallel.finish_gradient_synchronization (which overwrites p.grad) and
    before clipping. A no-op without tied embeddings, with pp == 1, and on middle stages.
    """
    core = getattr(model, "module", model)  # DataParallel keeps the Llama in .module
    first, last = pgm.pp_is_first_stage, pgm.pp_is_last_stage
    if pgm.pp_size == 1 or not core.config.tie_word_embeddings or not (first or last):
        return
    w = core.model.embed_tokens.weight if first else core.lm_head.weight
    dist.all_reduce(w.grad, group=tied_embedding_group(pgm))  # all-reduce (sum) over {first, last}


def pipeline_p2p(pgm, send_next=None, send_prev=None, recv_prev=None, recv_next=None):
    """Post the given ops together (batch_isend_irecv, peers = global ranks), then wait.

    Each batch meets the neighbour's matching batch (train_step's table), so no rank deadlocks
    although every batch is waited for. wait() blocks the host on gloo; on NCCL only the compute
    stream waits for the P2P stream. NCCL: a first batch_isend_irecv must involve every rank, so
    run one world collective (a barrier) first.
    """
    ops = []
    for op, t, peer in ((dist.isend, send_next, pgm.pp_next_rank), (dist.isend, send_prev, pgm.pp_prev_rank),
                        (dist.irecv, recv_prev, pgm.pp_prev_rank), (dist.irecv, recv_next, pgm.pp_next_rank)):
        if t is not None:
            assert t.is_contiguous() and t.dtype == torch.float32, "P2P buffers: contiguous float32"
            ops.append(dist.P2POp(op, t, peer))
    for work in (dist.batch_isend_irecv(ops) if ops else []):
        work.wait()


# ------------------------------------------------------------ schedules: pure event lists
def afab_schedule(pp_size, stage, n_micro):
    """GPipe: all forwards, then all backwards (in the same micro-batch order)."""
    return [("F", m) for m in range(n_micro)] + [("B", m) for m in range(n_micro)]


def one_f_one_b_schedule(pp_size, stage, n_micro):
    """1F1B: warm up with the forwards that fill the pipeline below this stage, then alternate."""
    warmup = min(pp_size - stage - 1, n_micro)
    events = [("F", m) for m in range(warmup)]
    for m in range(n_micro - warmup):  # steady state: each forward is followed by the oldest backward
        events += [("F", warmup + m), ("B", m)]
    return events + [("B", m) for m in range(n_micro - warmup, n_micro)]  # cool-down


SCHEDULES = {
    "afab": afab_schedule,
    "1f1b": one_f_one_b_schedule,
}


# ------------------------------------------------------------ the executor
def train_step(model, micro_batches, pgm, loss_fn, grad_acc, autocast, schedule="afab", seq_shards=1,
               position_ids=None):
    """Run this stage's part of one optimizer step; return (loss_sum, peak_inflight).

    model: this stage's Llama, maybe in DataParallel. micro_batches: this dp rank's grad_acc
    (x, y) pairs of (mbs, T) token ids, on every stage (the first feeds x, the last scores y).
    autocast: a context manager instance as in step01 (torch.autocast(...) or nullcontext()),
    entered once per forward (forwards never nest). schedule: a key of SCHEDULES. seq_shards:
    the activations between stages are split along T into this many pieces (--sp: tp), so a
    message is (mbs, T/seq_shards, D). position_ids: those of the tokens, (mbs, T) (default: 0..T-1).
    Grads accumulate in p.grad. loss_sum: sum of the micro-batch losses on the last stage, 0
    elsewhere; peak_inflight: most micro-batches whose activations were alive at once here.

    After each event, one batch_isend_irecv sends what the event produced and receives what the
    next event reads (the first stage has no previous stage, the last no next one):
        event, next    sends                          receives
        F -> F         activations to the next stage  activations from the previous stage
        F -> B         activations to the next stage  output grad from the next stage
        B -> F         input grad to the previous     activations from the previous stage
        B -> B         input grad to the previous     output grad from the next stage
    """
    micro_batches = list(micro_batches)
    events = SCHEDULES[schedule](pgm.pp_size, pgm.pp_rank, len(micro_batches))
    first, last = pgm.pp_is_first_stage, pgm.pp_is_last_stage
    hidden = getattr(model, "module", model).config.hidden_size
    last_backward = max(i for i, (kind, _) in enumerate(events) if kind == "B")

    def exchange(then, send_next=None, send_prev=None):
        """Send what the event just done produced, receive what the event `then` will read."""
        buf = None
        if then is not None and not (then[0] == "F" and first) and not (then[0] == "B" and last):
            x = micro_batches[then[1]][0]
            buf = torch.empty(x.shape[0], x.shape[1] // seq_shards, hidden, dtype=torch.float32,
                              device=x.device)  # (mbs, T/seq_shards, D)
        forward = then is not None and then[0] == "F"
        pipeline_p2p(pgm, send_next, send_prev, recv_prev=buf if forward else None,
                     recv_next=None if forward else buf)
        return buf

    if position_ids is None:  # a later stage gets hidden states, maybe split along T: not their length
        x0 = micro_batches[0][0]
        position_ids = torch.arange(x0.shape[1], device=x0.device).expand(x0.shape[0], -1)  # (mbs, T)
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    stash, peak = {}, 0  # micro -> (stage input, backward root): the activations kept alive
    received = exchange(events[0])
    for i, (kind, m) in enumerate(events):
        then = events[i + 1] if i + 1 < len(events) else None
        x, y = micro_batches[m]
        if kind == "F":
            inp = x if first else received.requires_grad_()  # a leaf: backward leaves dL/dinput in .grad
            with autocast:
                out = model(inp, position_ids=position_ids)  # (mbs, T, V) logits if last, else (mbs, T, D)
            if last:
                loss = loss_fn(out, y)  # mean over the micro-batch
                loss_sum += loss.detach()
                out = loss / grad_acc  # the only division: earlier stages receive scaled grads
            stash[m] = (inp, out)
            peak = max(peak, len(stash))
            received = exchange(then, send_next=None if last else out.detach().contiguous())
        else:
            inp, out = stash.pop(m)  # its activations die with this backward
            if hasattr(model, "require_backward_grad_sync"):  # DataParallel: all-reduce on the last one
                model.require_backward_grad_sync = i == last_backward
            torch.autograd.backward(out, None if last else received)
            received = exchange(then, send_prev=None if first else inp.grad.contiguous())
    return loss_sum, peak


# ------------------------------------------------------------ timelines for the README
def simulate(events_per_stage, fwd=1, bwd=2):
    """Replay one event list per stage with F/B durations and free communication.

    F m on stage s waits for F m on s-1; B m on s waits for B m on s+1 and F m on s; each stage
    runs its list in order. Returns (timeline, bubble): timeline[s] = [(start, end, kind,
    micro), ...] and bubble = idle fraction of (stages x makespan). Raises on a deadlock.
    """
    p = len(events_per_stage)
    done, timeline, free, pos = {}, [[] for _ in range(p)], [0.0] * p, [0] * p
    while any(pos[s] < len(events_per_stage[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while pos[s] < len(events_per_stage[s]):
                kind, m = events_per_stage[s][pos[s]]
                deps = [("F", s - 1, m)] if kind == "F" else [("F", s, m), ("B", s + 1, m)]
                deps = [d for d in deps if 0 <= d[1] < p]  # no stage before the first / after the last
                if any(d not in done for d in deps):
                    break
                start = max([free[s]] + [done[d] for d in deps])
                free[s] = done[(kind, s, m)] = start + (fwd if kind == "F" else bwd)
                timeline[s].append((start, free[s], kind, m))
                pos[s], progressed = pos[s] + 1, True
        if not progressed:
            raise ValueError(f"schedule deadlocks: stages wait at events {pos}")
    busy = sum(end - start for stage in timeline for start, end, _, _ in stage)
    return timeline, 1.0 - busy / (p * max(free))


def plot_schedule(kind, pp, n_micro, path, fwd=1, bwd=2):
    """Gantt chart of SCHEDULES[kind] (the lists train_step runs) saved to `path`; returns the bubble."""
    from matplotlib.figure import Figure  # no pyplot: leaves any notebook backend alone; png -> Agg

    timeline, bubble = simulate([SCHEDULES[kind](pp, s, n_micro) for s in range(pp)], fwd, bwd)
    makespan = max(end for stage in timeline for _, end, _, _ in stage)
    fig = Figure(figsize=(max(6.0, 0.25 * makespan), 0.5 * pp + 1))
    ax = fig.subplots()
    for s, stage in enumerate(timeline):
        for start, end, k, m in stage:
            ax.barh(s, end - start, left=start, color="tab:blue" if k == "F" else "tab:green", edgecolor="white")
            ax.text((start + end) / 2, s, str(m), ha="center", va="center", color="white", fontsize=8)
    ax.set_yticks(range(pp), [f"stage {s}" for s in range(pp)])
    ax.invert_yaxis()
    ax.set_xlabel(f"time (forward = {fwd}, backward = {bwd})")
    ax.set_title(f"{kind}: p={pp}, m={n_micro}, bubble {bubble:.1%} (blue F, green B)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return bubble
