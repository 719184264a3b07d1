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
# # 04 · Pipeline parallelism: AFAB vs 1F1B, measured
#
# **Question.** With p pipeline stages and m micro-batches, the textbook bubble (idle share
# of every stage) is (p-1)/(m+p-1) for both all-forward-all-backward (AFAB, GPipe) and 1F1B.
# What do the two schedules look like on real processes, how big is the bubble, and how many
# micro-batches of activations, and how many bytes, does each stage keep alive?
#
# The traces: `step05_pipeline_1f1b` with `--pp 4 --grad-acc-steps 8` (p = 4 stages, m = 8
# micro-batches; the tiny model widened to D = 256 with 8 layers, 2 per stage, so that compute
# outweighs the latency of a send), once with `--pp-engine afab` and once with `--pp-engine 1f1b`,
# on 4 CPU processes. We keep the second optimizer step of each run.

# %%
RERECORD = False  # True: rerun step05 twice under torchrun (~1 min on 2 cores) and overwrite traces/04_pipeline_*.jsonl

# %%
import matplotlib.pyplot as plt
import numpy as np

from nbtools import COLORS, TINY, bar, load, machine, of, record, save, step_module

P, M, ENGINES = 4, 8, ("afab", "1f1b")
WIDER = ["--num-layers", 2 * P, "--hidden-size", 256, "--intermediate-size", 1024]  # compute >> send latency
if RERECORD:
    for engine in ENGINES:
        record(f"04_pipeline_{engine}", "step05_pipeline_1f1b", P,
               [*TINY, *WIDER, "--max-steps", 2, "--pp", P, "--grad-acc-steps", M, "--pp-engine", engine],
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


def work(recs):
    """[(stage, kind, micro-batch, t0, t1, cpu)] of the model's forward/backward on every stage, and the
    window [first forward start, last backward end] of the step."""
    st = stage_of(recs)
    ev = [(st[s["rank"]], "F" if s["phase"] == "forward" else "B", s["mb"], s["t0"], s["t1"], s["cpu"])
          for s in of(recs, "span", module="model")]
    return ev, min(e[3] for e in ev), max(e[4] for e in ev)


def replay(events_per_stage, duration):
    """pipeline_parallel.simulate's rules with a duration per event, duration[(kind, stage, micro)]:
    F m on s after F m on s-1; B m on s after B m on s+1 and after F m on s; each stage runs its
    list in order; communication is free. -> (timeline, bubble) as simulate returns them."""
    p = len(events_per_stage)
    done, timeline, free, pos = {}, [[] for _ in range(p)], [0.0] * p, [0] * p
    while any(pos[s] < len(events_per_stage[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            while pos[s] < len(events_per_stage[s]):
                kind, m = events_per_stage[s][pos[s]]
                deps = [("F", s - 1, m)] if kind == "F" else [("F", s, m), ("B", s + 1, m)]
                deps = [d for d in deps if 0 <= d[1] < p]
                if any(d not in done for d in deps):
                    break
                start = max([free[s]] + [done[d] for d in deps])
                free[s] = done[(kind, s, m)] = start + duration[(kind, s, m)]
                timeline[s].append((start, free[s], kind, m))
                pos[s], progressed = pos[s] + 1, True
        assert progressed, f"schedule deadlocks at {pos}"
    busy = sum(end - start for stage in timeline for start, end, _, _ in stage)
    return timeline, 1.0 - busy / (p * max(free))


schedules = {e: [pp.SCHEDULES[e](P, s, M) for s in range(P)] for e in ENGINES}
for e in ENGINES:  # with F = 1 and B = 2 everywhere the replay is the trainer's own simulate
    unit = {(k, s, m): 1 if k == "F" else 2 for s in range(P) for k, m in schedules[e][s]}
    assert replay(schedules[e], unit) == pp.simulate(schedules[e]), e
replays = {}
for e in ENGINES:
    ev, _, _ = work(traces[e])
    replays[e] = replay(schedules[e], {(k, s, m): cpu for s, k, m, _, _, cpu in ev})
    order = {s: [(k, m) for s_, k, m, *_ in sorted(ev, key=lambda x: x[3]) if s_ == s] for s in range(P)}
    assert all(order[s] == schedules[e][s] for s in range(P)), f"{e}: the trace runs the schedule's event lists"

# %% [markdown]
# ## Gantt charts: as recorded, and replayed from CPU time
# One row per stage; blue = forward of micro-batch k, green = its backward. Left: the wall
# clock as recorded. The recording machine ran 4 processes on fewer cores (title): stages that
# compute at the same time slow each other down, and a stage that is ready may wait for a core,
# so these bars and gaps are partly the machine's. Right: each event's measured CPU time (what
# its thread consumed, which waiting for a core does not add to) replayed on the schedule's
# dependency graph with free communication: the bubble that the schedule and the measured
# compute imply.

# %%
fig, axes = plt.subplots(len(ENGINES), 2, figsize=(15, 2.0 * len(ENGINES) + 1.0))
for row, engine in zip(axes, ENGINES):
    ev, start, end = work(traces[engine])
    for stage, kind, mb, t0, t1, _ in ev:
        bar(row[0], stage, t0 - start, t1 - start, COLORS["forward" if kind == "F" else "backward"],
            text=str(mb), edgecolor="white")
    timeline, bubble = replays[engine]
    for stage, events in enumerate(timeline):
        for t0, t1, kind, mb in events:
            bar(row[1], stage, t0, t1, COLORS["forward" if kind == "F" else "backward"], text=str(mb),
                edgecolor="white")
    raw = 1 - sum(e[4] - e[3] for e in ev) / (P * (end - start))
    row[0].set_title(f"{engine}, as recorded: bubble {raw:.0%} ({MACHINE})", fontsize=9)
    row[1].set_title(f"{engine}, measured CPU time replayed on the schedule: bubble {bubble:.0%}", fontsize=9)
    row[0].set_xlim(0, (end - start) * 1e3)
    row[1].set_xlim(0, max(t1 for st in timeline for _, t1, _, _ in st) * 1e3)
    for ax in row:
        ax.set_yticks(range(P), [f"stage {s}" for s in range(P)])
        ax.invert_yaxis()
axes[-1][0].set_xlabel("ms since the first forward of the step (wall clock)")
axes[-1][1].set_xlabel("ms (sum of CPU times along the schedule's dependencies)")
plt.tight_layout()
save(fig, "04_pipeline_gantt")
plt.show()

# %% [markdown]
# ## The bubble: as recorded, replayed, and (p-1)/(m+p-1)
# Bubble = 1 - (time the stages spent in forward/backward) / (p x step window). The schedule's
# own prediction, `pipeline_parallel.simulate` (forward = 1, backward = 2 time units, free
# communication), gives (p-1)/(m+p-1) for both schedules. The replay of the measured CPU times
# differs from it only because the measured events are not all equal: the stages differ (the
# last one also runs the norm, lm_head and the loss, the first the embedding), and the same
# event varies from one micro-batch to the next (CPU time on a busy machine varies too: caches,
# shared cores). The printout separates the two: the replay with each stage's own mean F and B
# keeps only the imbalance of the stages, and with every F and every B set to their overall
# means the formula comes back exactly.

# %%
formula = (P - 1) / (M + P - 1)
simulated = {e: pp.simulate(schedules[e])[1] for e in ENGINES}
raw, mean_replay, stage_replay = {}, {}, {}
for engine in ENGINES:
    ev, start, end = work(traces[engine])
    raw[engine] = 1 - sum(e[4] - e[3] for e in ev) / (P * (end - start))
    mean = {k: np.mean([e[5] for e in ev if e[1] == k]) for k in "FB"}
    by_stage = {(k, s): np.mean([e[5] for e in ev if e[1] == k and e[0] == s]) for k in "FB" for s in range(P)}
    events = [(k, s, m) for s in range(P) for k, m in schedules[engine][s]]
    mean_replay[engine] = replay(schedules[engine], {(k, s, m): mean[k] for k, s, m in events})[1]
    stage_replay[engine] = replay(schedules[engine], {(k, s, m): by_stage[(k, s)] for k, s, m in events})[1]
fig, ax = plt.subplots(figsize=(8, 3.2))
bars = {"as recorded (wall clock, oversubscribed)" if OVER else "as recorded (wall clock)": raw,
        "measured CPU time, replayed": {e: replays[e][1] for e in ENGINES},
        "simulate (F = 1, B = 2)": simulated}
for j, (label, values) in enumerate(bars.items()):
    ax.bar(np.arange(len(ENGINES)) + 0.27 * (j - 1), [100 * values[e] for e in ENGINES], width=0.26, label=label,
           color=("tab:red", "tab:blue", "tab:gray")[j])
ax.axhline(100 * formula, color="black", ls="--", lw=1, label=f"(p-1)/(m+p-1) = {formula:.0%}")
ax.set_xticks(range(len(ENGINES)), ENGINES)
ax.set_ylabel("bubble: idle share of the stages (%)")
ax.set_title(f"p = {P}, m = {M}; recorded on {MACHINE}", fontsize=9)
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
plt.tight_layout()
plt.show()
for engine in ENGINES:
    ev, _, _ = work(traces[engine])
    per_stage = {s: (np.mean([e[5] for e in ev if e[0] == s and e[1] == "F"]) * 1e3,
                     np.mean([e[5] for e in ev if e[0] == s and e[1] == "B"]) * 1e3) for s in range(P)}
    print(f"{engine}: as recorded {raw[engine]:.1%}, replayed {replays[engine][1]:.1%}; replayed with each stage's "
          f"mean F and B {stage_replay[engine]:.1%}, with the overall mean F and B {mean_replay[engine]:.1%}; "
          f"simulate {simulated[engine]:.1%}, formula {formula:.1%}")
    print("      CPU ms per micro-batch (F, B) by stage:",
          ", ".join(f"stage {s} ({f:.1f}, {b:.1f})" for s, (f, b) in per_stage.items()))

# %% [markdown]
# ## Activations in flight: micro-batches, and bytes
# A stage keeps a micro-batch's activations from the start of its forward to the end of its
# backward. Left: how many micro-batches each stage holds, along the replayed schedule (the
# order of events is the trainer's; only the time axis is the replay's). Right: the bytes that
# autograd held for backward at its peak on each stage (`trace.py`'s `mem` records: every saved
# tensor counted once, weights not counted), AFAB against 1F1B.

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.3), gridspec_kw={"width_ratios": [1, 1, 1.1]})
for ax, engine in zip(axes, ENGINES):
    timeline, _ = replays[engine]
    for stage in range(P):
        steps = sorted([(t0, +1) for t0, _, k, _ in timeline[stage] if k == "F"] +
                       [(t1, -1) for _, t1, k, _ in timeline[stage] if k == "B"])
        t, n = [0.0], [0]
        for when, d in steps:
            t += [when * 1e3]
            n += [n[-1] + d]
        ax.step(t, n, where="post", label=f"stage {stage} (peak {max(n)})")
    ax.set_title(f"{engine}: micro-batches alive per stage", fontsize=9)
    ax.set_xlabel("ms along the replayed schedule")
    ax.set_ylim(0, M + 2.5)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
axes[0].set_ylabel("micro-batches held")
peaks = {e: {stage_of(traces[e])[m["rank"]]: m["saved_peak"] for m in of(traces[e], "mem", step=1)} for e in ENGINES}
for j, engine in enumerate(ENGINES):
    axes[2].bar(np.arange(P) + 0.4 * j - 0.2, [peaks[engine][s] / 2**20 for s in range(P)], width=0.38, label=engine,
                color=("tab:orange", "tab:blue")[j])
axes[2].set_xticks(range(P), [f"stage {s}" for s in range(P)])
axes[2].set_ylabel("MiB saved for backward, peak")
axes[2].set_title("activation bytes held at the peak, per stage (bytes: any machine)", fontsize=9)
axes[2].set_ylim(0, 1.3 * max(max(v.values()) for v in peaks.values()) / 2**20)
axes[2].legend(fontsize=8, loc="upper center", ncol=2)
plt.tight_layout()
save(fig, "04_pipeline_activations")
plt.show()
per_mb = peaks["afab"][0] / M
for engine in ENGINES:
    print(engine, "peak MiB per stage:", [round(peaks[engine][s] / 2**20, 2) for s in range(P)],
          "= micro-batches x", f"{per_mb / 2**20:.2f} MiB:", [round(peaks[engine][s] / per_mb, 2) for s in range(P)])

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
# - Both schedules have the same bubble: the simulation of the exact event lists the trainer
#   runs gives (p-1)/(m+p-1) for both. The replay of the measured CPU times gives a few points
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
