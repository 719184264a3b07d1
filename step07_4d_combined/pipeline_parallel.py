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
Interleaved 1F1B (virtual stages): each rank holds V model chunks of L/(p V) layers; chunk c of
rank r is virtual stage c p + r, so a micro-batch goes round the ranks V times (the last rank
sends to the first for the next chunk). A warm-up of (V - 1) p + 2 (p - r - 1) forwards, then
1F1B over (micro, chunk) pairs: the bubble shrinks V times, (p - 1)/(V m + p - 1), for V times
the messages, and rank r holds at most min(V m, (V - 1) p + 2 (p - r - 1) + 1) chunk-sized
micro-batches. Needs m divisible by p: micro-batches go round in groups of p.

A schedule is a pure function giving one stage's event list [("F", micro), ("B", micro), ...]
(interleaved: ("F", micro, chunk)); train_step runs any list; simulate/plot_schedule replay the
same lists for the README.
References: Huang et al. 2019, "GPipe: Efficient Training of Giant Neural Networks using
Pipeline Parallelism", arXiv:1811.06965.
Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", SC'21, arXiv:2104.04473 (Sec. 2.2.1: the 1F1B schedule; Sec. 2.2.2: interleaved).
"""
import copy

import torch
import torch.distributed as dist
import torch.nn as nn


def check_pp(num_layers, pp_size):
    if not 1 <= pp_size <= num_layers:
        raise ValueError(f"--pp {pp_size} needs 1 <= pp <= num_layers={num_layers} (every stage owns at "
                         f"least one decoder layer); use --pp {min(max(pp_size, 1), num_layers)} or more --num-layers")


def check_chunks(engine, chunks, pp_size, n_micro, num_layers):
    """The interleaved schedule's conditions, each with a one-line fix."""
    if engine != "interleaved":
        if chunks != 1:
            raise ValueError(f"--pp-chunks {chunks} needs --pp-engine interleaved")
        return
    if chunks < 2:
        raise ValueError(f"--pp-engine interleaved needs --pp-chunks >= 2 (model chunks per rank), got {chunks}")
    if pp_size < 2:
        raise ValueError(f"--pp-engine interleaved needs --pp >= 2, got --pp {pp_size}")
    if n_micro % pp_size:
        raise ValueError(f"--pp-engine interleaved needs --grad-acc-steps divisible by --pp {pp_size} (micro-batches "
                         f"go round in groups of pp), got {n_micro}; use --grad-acc-steps {-(-n_micro // pp_size) * pp_size}")
    if pp_size * chunks > num_layers:
        raise ValueError(f"--pp {pp_size} x --pp-chunks {chunks} needs at least {pp_size * chunks} layers (one per "
                         f"virtual stage), the model has {num_layers}; use more --num-layers or fewer --pp-chunks")


def chunk_layers(num_layers, pp_size, stage, chunks=1):
    """[layers of chunk c for c in range(chunks)]: chunk c of `stage` is virtual stage c * pp + stage."""
    return [stage_layers(num_layers, pp_size * chunks, c * pp_size + stage) for c in range(chunks)]


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


def apply_pipeline_parallel(model, pgm, chunks=1):
    """Keep only this stage's part of the (meta) course Llama, in place; Llama.forward is unchanged.

    Layers this stage does not own are deleted from the ModuleDict (names stay global, e.g.
    model.layers.7 on stage 1), the embedding becomes nn.Identity unless first stage, norm and
    lm_head unless last stage; later stages then feed hidden states (B, T, D) through forward.
    chunks > 1 (interleaved): the rank keeps the layers of all its chunks (chunk_layers).
    Apply after apply_tensor_parallel, so the last stage's copy of a tied lm_head inherits the
    shard. Collective when embeddings are tied and pp > 1 (builds the tied-embedding group).
    """
    pp, stage = pgm.pp_size, pgm.pp_rank
    check_pp(model.config.num_hidden_layers, pp)
    if pp == 1:
        return model
    mine = {str(i) for c in chunk_layers(model.config.num_hidden_layers, pp, stage, chunks) for i in c}
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


def interleaved_schedule(pp_size, stage, n_micro, chunks=2):
    """Interleaved 1F1B: the k-th forward runs micro-batch group k // (p V), chunk (k // p) % V."""
    def forward(k):  # micro-batches go round in groups of pp, each group through every chunk in turn
        group, i = divmod(k, pp_size * chunks)
        return "F", group * pp_size + i % pp_size, i // pp_size
    total = chunks * n_micro
    warmup = min((chunks - 1) * pp_size + 2 * (pp_size - stage - 1), total)
    fwd = [forward(k) for k in range(total)]
    bwd = [("B", m, chunks - 1 - c) for _, m, c in fwd]  # the same order, chunks from the last
    events = fwd[:warmup]
    for k in range(total - warmup):  # steady state: each forward is followed by the oldest backward
        events += [fwd[warmup + k], bwd[k]]
    return events + bwd[total - warmup:]  # cool-down


SCHEDULES = {
    "afab": afab_schedule,
    "1f1b": one_f_one_b_schedule,
}


def stage_events(engine, pp_size, stage, n_micro, chunks=1):
    """One stage's events as (kind, micro, chunk) triples, whatever the engine."""
    if engine == "interleaved":
        return interleaved_schedule(pp_size, stage, n_micro, chunks)
    return [(kind, m, 0) for kind, m in SCHEDULES[engine](pp_size, stage, n_micro)]


def p2p_plan(events_per_stage):
    """Put every stage's events on one clock and say what each tick sends and receives.

    The clock is simulate() with every event one tick long: an event's input was produced at
    an earlier tick. After its tick's event, a stage sends what that event produced and
    receives what its neighbours produced at the same tick, in ONE batch_isend_irecv: tick t of
    a stage meets tick t of both neighbours, so every send has its receive in the batch it
    meets, and no rank waits on a later tick (no deadlock, whatever the schedule).
    -> plan[s][t] = (event or None, sends, recvs); sends and recvs are lists of
    ("next" | "prev", (kind, micro, chunk) of the event that reads the message).
    """
    p = len(events_per_stage)
    total = p * (1 + max(c for events in events_per_stage for _, _, c in events))  # virtual stages
    timeline, _ = simulate(events_per_stage, fwd=1, bwd=1)
    at = [{int(start): (kind, m, c) for start, _, kind, m, c in stage} for stage in timeline]

    def message(s, event):  # -> (peer stage, direction seen from the receiver, event that reads it)
        kind, m, c = event
        v = c * p + s  # virtual stage
        if kind == "F" and v + 1 < total:  # activations to the next virtual stage (last rank -> first)
            return (s + 1) % p, "prev", ("F", m, (v + 1) // p)
        if kind == "B" and v > 0:  # input grad to the previous virtual stage (first rank -> last)
            return (s - 1) % p, "next", ("B", m, (v - 1) // p)
        return None

    plan = [[] for _ in range(p)]
    for t in range(1 + max(max(a) for a in at)):
        for s in range(p):
            sends, recvs = [], []
            if t in at[s] and message(s, at[s][t]):
                _, frm, key = message(s, at[s][t])
                sends.append(("next" if frm == "prev" else "prev", key))
            for peer in {(s - 1) % p, (s + 1) % p}:
                msg = message(peer, at[peer][t]) if t in at[peer] else None
                if msg and msg[0] == s:
                    recvs.append(msg[1:])
            plan[s].append((at[s].get(t), sends, recvs))
    return plan


def model_chunks(model, pgm, chunks):
    """Light views of this rank's Llama, one per chunk: the same modules, only the chunk's layers.

    Chunk c runs Llama.forward over its own layers; only the first rank's chunk 0 embeds and only
    the last rank's last chunk has the norm and lm_head. Parameters stay registered once, with
    global names, on the one Llama (checkpoints, DataParallel and the optimizer see one model).
    """
    if chunks == 1:
        return [model]
    core = getattr(model, "module", model)
    views = []
    for c, layers in enumerate(chunk_layers(core.config.num_hidden_layers, pgm.pp_size, pgm.pp_rank, chunks)):
        view, body = copy.copy(core), copy.copy(core.model)  # shallow: they share every module and buffer
        view._modules, body._modules = dict(core._modules), dict(core.model._modules)
        body.layers = nn.ModuleDict({str(i): core.model.layers[str(i)] for i in layers})
        if c > 0:
            body.embed_tokens = nn.Identity()
        if c < chunks - 1:
            body.norm, view.lm_head = nn.Identity(), nn.Identity()
        view.model = body
        views.append(view)
    return views


# ------------------------------------------------------------ the executor
def train_step(model, micro_batches, pgm, loss_fn, grad_acc, autocast, schedule="afab", seq_shards=1,
               position_ids=None, chunks=1):
    """Run this stage's part of one optimizer step; return (loss_sum, peak_inflight).

    model: this stage's Llama, maybe in DataParallel. micro_batches: this dp rank's grad_acc
    (x, y) pairs of (mbs, T) token ids, on every stage (the first feeds x, the last scores y).
    autocast: a context manager instance as in step01 (torch.autocast(...) or nullcontext()),
    entered once per forward (forwards never nest). schedule: a key of SCHEDULES, or
    "interleaved" with `chunks` model chunks per rank. seq_shards: the activations between
    stages are split along T into this many pieces (--sp: tp), so a message is (mbs, T/seq_shards, D). position_ids: those of the tokens, (mbs, T) (default: 0..T-1).
    Grads accumulate in p.grad. loss_sum: sum of the micro-batch losses on the last stage, 0
    elsewhere; peak_inflight: most (micro-batch, chunk) activations alive at once here.

    The stages run their lists on one clock (p2p_plan): after each tick, one batch_isend_irecv
    with both neighbours sends what the tick's event produced and receives what theirs did:
        event    sends                                  its neighbour receives, same tick
        F        activations to the next (virtual)      from its previous stage (recv_prev)
        B        input grad to the previous (virtual)   from its next stage (recv_next)
    Interleaved, the next virtual stage of the last rank is the first rank's next chunk.
    """
    micro_batches = list(micro_batches)
    p, n = pgm.pp_size, len(micro_batches)
    plan = p2p_plan([stage_events(schedule, p, s, n, chunks) for s in range(p)])[pgm.pp_rank]
    first = [pgm.pp_is_first_stage] + [False] * (chunks - 1)  # per chunk: does it embed / score?
    last = [False] * (chunks - 1) + [pgm.pp_is_last_stage]
    views = model_chunks(model, pgm, chunks)
    hidden = getattr(model, "module", model).config.hidden_size
    last_backward = {}  # chunk -> tick of its last backward, when DataParallel all-reduces its grads
    for t, (event, _, _) in enumerate(plan):
        if event is not None and event[0] == "B":
            last_backward[event[2]] = t

    if position_ids is None:  # a later stage gets hidden states, maybe split along T: not their length
        x0 = micro_batches[0][0]
        position_ids = torch.arange(x0.shape[1], device=x0.device).expand(x0.shape[0], -1)  # (mbs, T)
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    stash, inbox, peak = {}, {}, 0  # (micro, chunk) -> (input, backward root); received messages
    for t, (event, sends, recvs) in enumerate(plan):
        out_next = out_prev = None
        if event is not None:
            kind, m, c = event
            x, y = micro_batches[m]
            if kind == "F":
                inp = x if first[c] else inbox.pop(event).requires_grad_()  # a leaf: backward fills .grad
                with autocast:
                    out = views[c](inp, position_ids=position_ids)  # (mbs, T, V) logits if last, else (mbs, T, D)
                if last[c]:
                    loss = loss_fn(out, y)  # mean over the micro-batch
                    loss_sum += loss.detach()
                    out = loss / grad_acc  # the only division: earlier stages receive scaled grads
                stash[m, c] = (inp, out)
                peak = max(peak, len(stash))
                out_next = out.detach().contiguous() if sends else None
            else:
                inp, out = stash.pop((m, c))  # its activations die with this backward
                if hasattr(model, "require_backward_grad_sync"):  # DataParallel: all-reduce on a chunk's last one
                    model.require_backward_grad_sync = t == last_backward[c]
                torch.autograd.backward(out, None if last[c] else inbox.pop(event))
                out_prev = inp.grad.contiguous() if sends else None
        bufs = {}
        for frm, key in recvs:
            xk = micro_batches[key[1]][0]
            bufs[frm] = inbox[key] = torch.empty(xk.shape[0], xk.shape[1] // seq_shards, hidden, dtype=torch.float32,
                                                 device=xk.device)  # (mbs, T/seq_shards, D)
        if sends or recvs:
            pipeline_p2p(pgm, out_next, out_prev, recv_prev=bufs.get("prev"), recv_next=bufs.get("next"))
    return loss_sum, peak


# ------------------------------------------------------------ timelines for the README
def simulate(events_per_stage, fwd=1, bwd=2):
    """Replay one event list per stage with F/B durations and free communication.

    F m on stage s waits for F m on s-1; B m on s waits for B m on s+1 and F m on s; each stage
    runs its list in order. Events may carry a chunk, (kind, micro, chunk): then the stages are
    virtual, v = chunk * p + s. Returns (timeline, bubble): timeline[s] = [(start, end, *event),
    ...] and bubble = idle fraction of (stages x makespan). Raises on a deadlock.
    """
    p = len(events_per_stage)
    total = p * (1 + max((e[2] for events in events_per_stage for e in events if len(e) > 2), default=0))
    done, timeline, free, pos = {}, [[] for _ in range(p)], [0.0] * p, [0] * p
    while any(pos[s] < len(events_per_stage[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while pos[s] < len(events_per_stage[s]):
                event = events_per_stage[s][pos[s]]
                kind, m, v = event[0], event[1], event[2] * p + s if len(event) > 2 else s  # virtual stage
                deps = [("F", v - 1, m)] if kind == "F" else [("F", v, m), ("B", v + 1, m)]
                deps = [d for d in deps if 0 <= d[1] < total]  # no stage before the first / after the last
                if any(d not in done for d in deps):
                    break
                start = max([free[s]] + [done[d] for d in deps])
                free[s] = done[(kind, v, m)] = start + (fwd if kind == "F" else bwd)
                timeline[s].append((start, free[s], *event))
                pos[s], progressed = pos[s] + 1, True
        if not progressed:
            raise ValueError(f"schedule deadlocks: stages wait at events {pos}")
    busy = sum(stage_event[1] - stage_event[0] for stage in timeline for stage_event in stage)
    return timeline, 1.0 - busy / (p * max(free))


def plot_schedule(kind, pp, n_micro, path, fwd=1, bwd=2, chunks=1):
    """Gantt chart of stage_events(kind, ...) (the lists train_step runs) saved to `path`; returns the bubble."""
    from matplotlib.figure import Figure  # no pyplot: leaves any notebook backend alone; png -> Agg

    timeline, bubble = simulate([stage_events(kind, pp, s, n_micro, chunks) for s in range(pp)], fwd, bwd)
    makespan = max(end for stage in timeline for _, end, *_ in stage)
    fig = Figure(figsize=(max(6.0, 0.25 * makespan), 0.5 * pp + 1))
    ax = fig.subplots()
    shades = {"F": ["tab:blue", "navy", "tab:cyan", "slateblue"], "B": ["tab:green", "darkgreen", "olive", "teal"]}
    for s, stage in enumerate(timeline):
        for start, end, k, m, c in stage:
            ax.barh(s, end - start, left=start, color=shades[k][c % 4], edgecolor="white")
            ax.text((start + end) / 2, s, str(m), ha="center", va="center", color="white", fontsize=8)
    ax.set_yticks(range(pp), [f"stage {s}" for s in range(pp)])
    ax.invert_yaxis()
    ax.set_xlabel(f"time (forward = {fwd}, backward = {bwd})")
    what = f", V={chunks} (darker: later chunks)" if chunks > 1 else ""
    ax.set_title(f"{kind}: p={pp}, m={n_micro}{what}, bubble {bubble:.1%} (blue F, green B)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return bubble
