# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Pipeline parallelism: AFAB vs 1F1B vs interleaved 1F1B, measured
#
# **Question.** With p pipeline stages and m micro-batches, the textbook bubble (idle share
# of every stage) is (p-1)/(m+p-1) for both all-forward-all-backward (AFAB, GPipe) and 1F1B,
# and (p-1)/(V m+p-1) for interleaved 1F1B with V model chunks per rank. What do the three
# schedules look like on real processes, how big is the bubble, and how many micro-batches of
# activations, and how many bytes, does each stage keep alive?
#
# The traces: `step05_pipeline_1f1b` with `--pp 4 --grad-acc-steps 8` (p = 4 stages, m = 8
# micro-batches; the tiny model widened to D = 256 with 8 layers, 2 per stage, so that compute
# outweighs the latency of a send), once with `--pp-engine afab`, once with `--pp-engine 1f1b`
# and once with `--pp-engine interleaved --pp-chunks 2` (one layer per chunk), on 4 CPU
# processes. We keep the second optimizer step of each run.

# %%
RERECORD = False  # True: rerun step05 three times under torchrun (~2 min on 2 cores) and overwrite traces/04_pipeline_*.jsonl

# %%
import matplotlib.pyplot as plt
import numpy as np

from types import SimpleNamespace

from nbtools import TINY, bar, load, machine, of, preset, record, save, step_module

P, M, ENGINES = 4, 8, ("afab", "1f1b", "interleaved")
CHUNKS = {"afab": 1, "1f1b": 1, "interleaved": 2}  # model chunks per rank, V
WIDER = ["--num-layers", 2 * P, "--hidden-size", 256, "--intermediate-size", 1024]  # compute >> send latency
if RERECORD:
    for engine in ENGINES:
        record(f"04_pipeline_{engine}", "step05_pipeline_1f1b", P,
               [*TINY, *WIDER, "--max-steps", 2, "--pp", P, "--grad-acc-steps", M, "--pp-engine", engine,
                "--pp-chunks", CHUNKS[engine]],
               keep=lambda r: r.get("step") == 1 and (r["ev"] in ("comm", "mem") or r.get("module") == "model"
                                                       or r.get("phase") == "optimizer"),
               fields=("seq", "op", "dim", "peer", "bytes", "t0", "t1", "step", "phase", "module", "mb", "cpu"))
traces = {e: load(f"04_pipeline_{e}") for e in ENGINES}
pp = step_module("step05_pipeline_1f1b", "pipeline_parallel")  # the schedules the trainer runs
MACHINE, OVER = machine(traces["afab"])
print("recorded on:", MACHINE)


def stage_of(recs):
    """global rank -> pipeline stage, from the trace's header lines"""
    return {m["rank"]: m["coords"].get("pp_rank", m["rank"]) for m in of(recs, "meta")}


schedules = {e: [pp.stage_events(e, P, s, M, CHUNKS[e]) for s in range(P)] for e in ENGINES}  # (kind, micro, chunk)


def work(recs, engine):
    """[(stage, kind, micro-batch, chunk, t0, t1, cpu)] of the model's forwards/backwards on every stage,
    and the window [first forward start, last backward end] of the step. A span's mb counts the
    model's calls in the step (a chunk's call, interleaved): the k-th forward of a stage is the
    k-th F of its event list, the k-th backward its k-th B."""
    st = stage_of(recs)
    nth = {(s, k): [e for e in schedules[engine][s] if e[0] == k] for s in range(P) for k in "FB"}
    ev = []
    for r in of(recs, "span", module="model"):
        s, k = st[r["rank"]], "F" if r["phase"] == "forward" else "B"
        _, m, c = nth[(s, k)][r["mb"]]
        ev.append((s, k, m, c, r["t0"], r["t1"], r["cpu"]))
    return ev, min(e[4] for e in ev), max(e[5] for e in ev)


def replay(events_per_stage, duration):
    """pipeline_parallel.simulate's rules with a duration per event, duration[(kind, stage, micro, chunk)]:
    with virtual stage v = chunk p + s, F m on v after F m on v-1; B m on v after B m on v+1 and
    after F m on v; each stage runs its list in order; communication is free.
    -> (timeline, bubble) as simulate returns them."""
    p = len(events_per_stage)
    total = p * (1 + max(c for events in events_per_stage for _, _, c in events))
    done, timeline, free, pos = {}, [[] for _ in range(p)], [0.0] * p, [0] * p
    while any(pos[s] < len(events_per_stage[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while pos[s] < len(events_per_stage[s]):
                kind, m, c = events_per_stage[s][pos[s]]
                v = c * p + s
                deps = [("F", v - 1, m)] if kind == "F" else [("F", v, m), ("B", v + 1, m)]
                deps = [d for d in deps if 0 <= d[1] < total]
                if any(d not in done for d in deps):
                    break
                start = max([free[s]] + [done[d] for d in deps])
                free[s] = done[(kind, v, m)] = start + duration[(kind, s, m, c)]
                timeline[s].append((start, free[s], kind, m, c))
                pos[s], progressed = pos[s] + 1, True
        assert progressed, f"schedule deadlocks at {pos}"
    busy = sum(event[1] - event[0] for stage in timeline for event in stage)
    return timeline, 1.0 - busy / (p * max(free))


for e in ENGINES:  # with F = 1 and B = 2 everywhere the replay is the trainer's own simulate
    unit = {(k, s, m, c): 1 if k == "F" else 2 for s in range(P) for k, m, c in schedules[e][s]}
    assert replay(schedules[e], unit) == pp.simulate(schedules[e]), e
replays = {}
for e in ENGINES:
    ev, _, _ = work(traces[e], e)
    replays[e] = replay(schedules[e], {(k, s, m, c): cpu for s, k, m, c, _, _, cpu in ev})
    order = {s: [(k, m, c) for s_, k, m, c, *_ in sorted(ev, key=lambda x: x[4]) if s_ == s] for s in range(P)}
    assert all(order[s] == schedules[e][s] for s in range(P)), f"{e}: the trace runs the schedule's event lists"
SHADE = {("F", 0): "tab:blue", ("F", 1): "navy", ("B", 0): "tab:green", ("B", 1): "darkgreen"}  # chunk 1 darker

# %% [markdown]
# ## Gantt charts: as recorded, and replayed from CPU time
# One row per stage; blue = forward of micro-batch k, green = its backward (interleaved: darker
# for the second chunk, which holds layers 4-7 of the 8). Left: the wall
# clock as recorded. The recording machine ran 4 processes on fewer cores (title): stages that
# compute at the same time slow each other down, and a stage that is ready may wait for a core,
# so these bars and gaps are partly the machine's. Right: each event's measured CPU time (what
# its thread consumed, which waiting for a core does not add to) replayed on the schedule's
# dependency graph with free communication: the bubble that the schedule and the measured
# compute imply.

# %%
fig, axes = plt.subplots(len(ENGINES), 2, figsize=(15, 2.0 * len(ENGINES) + 1.0))
for row, engine in zip(axes, ENGINES):
    ev, start, end = work(traces[engine], engine)
    for stage, kind, mb, c, t0, t1, _ in ev:
        bar(row[0], stage, t0 - start, t1 - start, SHADE[(kind, c)], text=str(mb), edgecolor="white")
    timeline, bubble = replays[engine]
    for stage, events in enumerate(timeline):
        for t0, t1, kind, mb, c in events:
            bar(row[1], stage, t0, t1, SHADE[(kind, c)], text=str(mb), edgecolor="white")
    raw = 1 - sum(e[5] - e[4] for e in ev) / (P * (end - start))
    row[0].set_title(f"{engine}, as recorded: bubble {raw:.0%} ({MACHINE})", fontsize=9)
    row[1].set_title(f"{engine}, measured CPU time replayed on the schedule: bubble {bubble:.0%}", fontsize=9)
    row[0].set_xlim(0, (end - start) * 1e3)
    row[1].set_xlim(0, max(event[1] for st in timeline for event in st) * 1e3)
    for ax in row:
        ax.set_yticks(range(P), [f"stage {s}" for s in range(P)])
        ax.invert_yaxis()
axes[-1][0].set_xlabel("ms since the first forward of the step (wall clock)")
axes[-1][1].set_xlabel("ms (sum of CPU times along the schedule's dependencies)")
plt.tight_layout()
save(fig, "04_pipeline_gantt")
plt.show()

# %% [markdown]
# ## The bubble: as recorded, replayed, and (p-1)/(V m+p-1)
# Bubble = 1 - (time the stages spent in forward/backward) / (p x step window). The schedule's
# own prediction, `pipeline_parallel.simulate` (forward = 1, backward = 2 time units, free
# communication), gives (p-1)/(m+p-1) for AFAB and 1F1B, (p-1)/(V m+p-1) interleaved. The replay of the measured CPU times
# differs from it only because the measured events are not all equal: the stages differ (the
# last one also runs the norm, lm_head and the loss, the first the embedding), and the same
# event varies from one micro-batch to the next (CPU time on a busy machine varies too: caches,
# shared cores). The printout separates the two: the replay with each stage's own mean F and B
# keeps only the imbalance of the stages, and with every F and every B set to their overall
# means the formula comes back exactly.

# %%
formula = {e: (P - 1) / (CHUNKS[e] * M + P - 1) for e in ENGINES}
simulated = {e: pp.simulate(schedules[e])[1] for e in ENGINES}
raw, mean_replay, stage_replay = {}, {}, {}
for engine in ENGINES:
    ev, start, end = work(traces[engine], engine)
    raw[engine] = 1 - sum(e[5] - e[4] for e in ev) / (P * (end - start))
    mean = {k: np.mean([e[6] for e in ev if e[1] == k]) for k in "FB"}
    by_stage = {(k, s): np.mean([e[6] for e in ev if e[1] == k and e[0] == s]) for k in "FB" for s in range(P)}
    events = [(k, s, m, c) for s in range(P) for k, m, c in schedules[engine][s]]
    mean_replay[engine] = replay(schedules[engine], {e: mean[e[0]] for e in events})[1]
    stage_replay[engine] = replay(schedules[engine], {e: by_stage[(e[0], e[1])] for e in events})[1]
fig, ax = plt.subplots(figsize=(9, 3.2))
bars = {"as recorded (wall clock, oversubscribed)" if OVER else "as recorded (wall clock)": raw,
        "measured CPU time, replayed": {e: replays[e][1] for e in ENGINES},
        "simulate (F = 1, B = 2)": simulated}
for j, (label, values) in enumerate(bars.items()):
    ax.bar(np.arange(len(ENGINES)) + 0.27 * (j - 1), [100 * values[e] for e in ENGINES], width=0.26, label=label,
           color=("tab:red", "tab:blue", "tab:gray")[j])
ax.scatter(range(len(ENGINES)), [100 * formula[e] for e in ENGINES], marker="_", s=900, color="black", zorder=3,
           label="(p-1)/(V m+p-1)")
ax.set_xticks(range(len(ENGINES)), ENGINES)
ax.set_ylabel("bubble: idle share of the stages (%)")
ax.set_title(f"p = {P}, m = {M}; recorded on {MACHINE}", fontsize=9)
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
plt.tight_layout()
plt.show()
for engine in ENGINES:
    ev, _, _ = work(traces[engine], engine)
    per_stage = {s: (np.mean([e[6] for e in ev if e[0] == s and e[1] == "F"]) * 1e3,
                     np.mean([e[6] for e in ev if e[0] == s and e[1] == "B"]) * 1e3) for s in range(P)}
    print(f"{engine}: as recorded {raw[engine]:.1%}, replayed {replays[engine][1]:.1%}; replayed with each stage's "
          f"mean F and B {stage_replay[engine]:.1%}, with the overall mean F and B {mean_replay[engine]:.1%}; "
          f"simulate {simulated[engine]:.1%}, formula {formula[engine]:.1%}")
    print("      CPU ms per micro-batch (interleaved: per chunk) (F, B) by stage:",
          ", ".join(f"stage {s} ({f:.1f}, {b:.1f})" for s, (f, b) in per_stage.items()))

# %% [markdown]
# ## Activations in flight: micro-batches, and bytes
# A stage keeps a micro-batch's activations from the start of its forward to the end of its
# backward. Left: how many micro-batches each stage holds, along the replayed schedule (the
# order of events is the trainer's; only the time axis is the replay's). Right: the bytes that
# autograd held for backward at its peak on each stage (`trace.py`'s `mem` records: every saved
# tensor counted once, weights not counted), for the three schedules. Interleaved counts chunks,
# each half a stage's layers: 11 chunks held on stage 0 are 5.5 micro-batches of a whole stage.

# %%
fig, axes = plt.subplots(1, 4, figsize=(19, 3.3), gridspec_kw={"width_ratios": [1, 1, 1, 1.1]})
for ax, engine in zip(axes, ENGINES):
    timeline, _ = replays[engine]
    for stage in range(P):
        steps = sorted([(e[0], +1) for e in timeline[stage] if e[2] == "F"] +
                       [(e[1], -1) for e in timeline[stage] if e[2] == "B"])
        t, n = [0.0], [0]
        for when, d in steps:
            t += [when * 1e3]
            n += [n[-1] + d]
        ax.step(t, n, where="post", label=f"stage {stage} (peak {max(n)})")
    ax.set_title(f"{engine}: {'chunks' if CHUNKS[engine] > 1 else 'micro-batches'} alive per stage", fontsize=9)
    ax.set_xlabel("ms along the replayed schedule")
    ax.set_ylim(0, 2 * M)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
axes[0].set_ylabel("held")
peaks = {e: {stage_of(traces[e])[m["rank"]]: m["saved_peak"] for m in of(traces[e], "mem", step=1)} for e in ENGINES}
for j, engine in enumerate(ENGINES):
    axes[3].bar(np.arange(P) + 0.27 * (j - 1), [peaks[engine][s] / 2**20 for s in range(P)], width=0.26, label=engine,
                color=("tab:orange", "tab:blue", "tab:purple")[j])
axes[3].set_xticks(range(P), [f"stage {s}" for s in range(P)])
axes[3].set_ylabel("MiB saved for backward, peak")
axes[3].set_title("activation bytes held at the peak, per stage (bytes: any machine)", fontsize=9)
axes[3].set_ylim(0, 1.3 * max(max(v.values()) for v in peaks.values()) / 2**20)
axes[3].legend(fontsize=8, loc="upper center", ncol=3)
plt.tight_layout()
save(fig, "04_pipeline_activations")
plt.show()
per_mb = peaks["afab"][0] / M
for engine in ENGINES:
    print(engine, "peak MiB per stage:", [round(peaks[engine][s] / 2**20, 2) for s in range(P)],
          "= micro-batches of a whole stage x", f"{per_mb / 2**20:.2f} MiB:",
          [round(peaks[engine][s] / per_mb, 2) for s in range(P)])

# %% [markdown]
# ## At real size: bubble and activations, p = 4 and 8, m = 8 to 32, V = 2 and 4
# The same event lists, simulated (F = 1, B = 2), and `memory.py`'s prediction of the
# activations stage 0 holds at its peak (it replays the interleaved list chunk by chunk) for
# Llama-2-7B (32 layers), micro-batch 1 x 4096 tokens, bf16, tp 1: what the three schedules
# cost where it matters. The bubble needs no machine; the bytes are the formula's, which
# `tests/test_memory.py` and `tests/test_pp_interleaved.py` hold to the measurement.

# %%
memory = step_module("step07_4d_combined", "memory")
c7 = preset("llama2-7b")  # data/models/llama2-7b/config.json
cfg7 = SimpleNamespace(**c7, head_dim=c7["hidden_size"] // c7["num_attention_heads"], attention_bias=False, mlp_bias=False)
rows = []
for p_ in (4, 8):
    for m_ in (8, 16, 32):
        for engine, V in (("afab", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 4)):
            bubble = pp.simulate([pp.stage_events(engine, p_, s, m_, V) for s in range(p_)])[1]
            pred = memory.predict(cfg7, B=1, T=4096, grad_acc=m_, pp=p_, stage=0, dtype="bfloat16",
                                  schedule=engine, chunks=V)
            rows.append((p_, m_, engine if V == 1 else f"interleaved V={V}", bubble, pred["in_flight"],
                         pred["activations"] / 2**30))
print(f"{'p':>2} {'m':>3}  {'schedule':<16} {'bubble':>7}  {'in flight, stage 0':>18}  {'activations, stage 0':>20}")
for p_, m_, name, bubble, k, gib in rows:
    print(f"{p_:>2} {m_:>3}  {name:<16} {bubble:>7.1%}  {k:>18}  {gib:>16.1f} GiB")
fig, axes = plt.subplots(1, 2, figsize=(13, 3.4))
for p_, ls in ((4, "-"), (8, "--")):
    for name, color in (("afab", "tab:orange"), ("1f1b", "tab:blue"), ("interleaved V=2", "tab:purple"),
                        ("interleaved V=4", "tab:red")):
        pts = [(m_, b, g) for q, m_, n, b, _, g in rows if q == p_ and n == name]
        axes[0].plot([x[0] for x in pts], [100 * x[1] for x in pts], ls, color=color, marker="o", label=f"{name}, p={p_}")
        axes[1].plot([x[0] for x in pts], [x[2] for x in pts], ls, color=color, marker="o", label=f"{name}, p={p_}")
axes[0].set_ylabel("bubble (%)")
axes[1].set_ylabel("activations on stage 0 (GiB)")
axes[1].set_yscale("log")
for ax in axes:
    ax.set_xlabel("micro-batches m")
    ax.set_xticks([8, 16, 32])
axes[0].legend(fontsize=7, ncol=2)
axes[0].set_title("bubble, simulated from the event lists (F = 1, B = 2; AFAB lies under 1F1B)", fontsize=9)
axes[1].set_title("Llama-2-7B, 1 x 4096 tokens, bf16: memory.py's prediction (any machine)", fontsize=9)
plt.tight_layout()
save(fig, "04_pipeline_real_size")
plt.show()

# %% [markdown]
# ## What travels between stages
# Every forward sends its output activation (B, T, D) to the next stage and every backward
# sends the gradient of its input back: one message per micro-batch per boundary and direction.

# %%
for engine in ENGINES:
    recs, st = traces[engine], stage_of(traces[engine])
    sends = of(recs, "comm", op="isend")
    per_stage = {s: sum(c["bytes"] for c in sends if st[c["rank"]] == s) for s in range(P)}
    print(engine, "bytes sent per stage:", per_stage, "| messages:", len(sends),
          "| sizes:", sorted({c["bytes"] for c in sends}))

# %% [markdown]
# ## What to notice
# - AFAB and 1F1B have the same bubble: the simulation of the exact event lists the trainer
#   runs gives (p-1)/(m+p-1) for both. Interleaved with V = 2 halves the events' length and the
#   bubble with it, (p-1)/(V m+p-1): 16% instead of 27% here, for twice the messages. The replay of the measured CPU times gives a few points
#   more, for both, and the printout says where they come from: unequal stages and events that
#   vary; with the measured means the replay is the formula again.
# - The raw wall clock shows a much larger bubble, and a different one for each schedule: 4
#   processes share too few cores, so a stage's turn comes when a core is free, not when its
#   input has arrived. That is the machine, not the schedule; the replay removes it.
# - The shape is the schedule's: AFAB is a forward wave then a backward wave, 1F1B settles into
#   alternating one forward and one backward per stage after p - s - 1 warm-up forwards.
# - AFAB: every stage holds all m = 8 micro-batches' activations before its first backward.
#   1F1B starts the backward of micro-batch 0 as soon as it can: stage s holds at most p - s
#   micro-batches. In bytes: AFAB's peak is m times one micro-batch's activations on every
#   stage, 1F1B's is p - s times, for the same bubble.
# - Raising m shrinks the bubble (p-1)/(m+p-1), but with AFAB it raises activation memory
#   linearly; with 1F1B it does not. That is why 1F1B is the default.
# - Interleaved holds more on stage 0 than 1F1B (11 half-stage chunks = 5.5 micro-batches'
#   worth against 4), and, at real size, that excess stays bounded as m grows while the bubble
#   keeps shrinking: interleaving buys bubble with messages and a little memory, not with m.
