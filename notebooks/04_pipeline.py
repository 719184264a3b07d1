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
# What do the two schedules look like on real processes, how big is the measured bubble, and
# how many micro-batches of activations does each stage keep alive?
#
# The traces: `step05_pipeline_1f1b` with `--pp 4 --grad-acc-steps 8` (p = 4 stages, m = 8
# micro-batches; the tiny model widened to D = 256 with 8 layers, 2 per stage, so that compute
# outweighs the latency of a send), once with `--pp-engine afab` and once with `--pp-engine 1f1b`,
# on 4 CPU processes. We keep the second optimizer step of each run.

# %%
RERECORD = False  # True: rerun step05 twice under torchrun (~1 min on 2 cores) and overwrite traces/04_pipeline_*.jsonl

# %%
import matplotlib.pyplot as plt

from nbtools import COLORS, TINY, bar, load, of, record

P, M, ENGINES = 4, 8, ("afab", "1f1b")
WIDER = ["--num-layers", 2 * P, "--hidden-size", 256, "--intermediate-size", 1024]  # compute >> send latency
if RERECORD:
    for engine in ENGINES:
        record(f"04_pipeline_{engine}", "step05_pipeline_1f1b", P,
               [*TINY, *WIDER, "--max-steps", 2, "--pp", P, "--grad-acc-steps", M, "--pp-engine", engine],
               keep=lambda r: r.get("step") == 1 and (r["ev"] == "comm" or r.get("module") == "model"
                                                       or r.get("phase") == "optimizer"))
traces = {e: load(f"04_pipeline_{e}") for e in ENGINES}


def stage_of(recs):
    """global rank -> pipeline stage, from the trace's header lines"""
    return {m["rank"]: m["coords"].get("pp_rank", m["rank"]) for m in of(recs, "meta")}


def work(recs):
    """[(stage, kind, micro-batch, t0, t1)] of the model's forward/backward on every stage, and the
    window [first forward start, last backward end] of the step."""
    st = stage_of(recs)
    ev = [(st[s["rank"]], "F" if s["phase"] == "forward" else "B", s["mb"], s["t0"], s["t1"])
          for s in of(recs, "span", module="model")]
    return ev, min(e[3] for e in ev), max(e[4] for e in ev)


# %% [markdown]
# ## Gantt charts from the traces
# One row per stage; blue = forward of micro-batch k, green = its backward.

# %%
fig, axes = plt.subplots(len(ENGINES), 1, figsize=(12, 2.0 * len(ENGINES) + 0.6))
for ax, engine in zip(axes, ENGINES):
    ev, start, end = work(traces[engine])
    for stage, kind, mb, t0, t1 in ev:
        bar(ax, stage, t0 - start, t1 - start, COLORS["forward" if kind == "F" else "backward"],
            text=str(mb), edgecolor="white")
    ax.set_yticks(range(P), [f"stage {s}" for s in range(P)])
    ax.invert_yaxis()
    ax.set_xlim(0, (end - start) * 1e3)
    ax.set_title(f"{engine}: p={P}, m={M} (measured)")
axes[-1].set_xlabel("ms since the first forward of the step")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The bubble: measured vs (p-1)/(m+p-1)
# Measured bubble = 1 - (time stages spent in forward/backward) / (p x step window). The
# schedule's own prediction comes from `pipeline_parallel.simulate` (forward = 1, backward = 2
# time units, free communication), when step05 is there to import.

# %%
formula = (P - 1) / (M + P - 1)
measured = {}
for engine in ENGINES:
    ev, start, end = work(traces[engine])
    measured[engine] = 1 - sum(t1 - t0 for *_, t0, t1 in ev) / (P * (end - start))
simulated = {}
try:
    import importlib.util

    from nbtools import step_dir

    spec = importlib.util.spec_from_file_location("pp", step_dir("step05_pipeline_1f1b") / "pipeline_parallel.py")
    pp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pp)
    simulated = {e: pp.simulate([pp.SCHEDULES[e](P, s, M) for s in range(P)])[1] for e in ENGINES}
except FileNotFoundError:
    pass
fig, ax = plt.subplots(figsize=(7, 3))
for i, engine in enumerate(ENGINES):
    ax.bar(i - 0.2, measured[engine], width=0.4, color="tab:blue", label="measured (this trace)")
    if engine in simulated:
        ax.bar(i + 0.2, simulated[engine], width=0.4, color="tab:gray", label="simulated schedule")
ax.axhline(formula, color="black", ls="--", label=f"(p-1)/(m+p-1) = {formula:.0%}")
ax.set_xticks(range(len(ENGINES)), ENGINES)
ax.set_ylabel("idle share of the stages")
handles, labels = ax.get_legend_handles_labels()
ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=8)
plt.tight_layout()
plt.show()
for engine in ENGINES:
    print(f"{engine}: measured {measured[engine]:.0%}, simulated {simulated.get(engine, float('nan')):.0%}, "
          f"formula {formula:.0%}")

# %% [markdown]
# ## Activations in flight
# A stage keeps a micro-batch's activations from the start of its forward to the end of its
# backward. Count them over time, per stage.

# %%
fig, axes = plt.subplots(1, len(ENGINES), figsize=(12, 3), sharey=True)
for ax, engine in zip(axes, ENGINES):
    ev, start, _ = work(traces[engine])
    for stage in range(P):
        steps = sorted([(t0, +1) for s, k, _, t0, _ in ev if s == stage and k == "F"] +
                       [(t1, -1) for s, k, _, _, t1 in ev if s == stage and k == "B"])
        t, n = [0.0], [0]
        for when, d in steps:
            t += [(when - start) * 1e3]
            n += [n[-1] + d]
        ax.step(t, n, where="post", label=f"stage {stage} (peak {max(n)})")
    ax.set_title(f"{engine}: micro-batches alive per stage")
    ax.set_xlabel("ms since the first forward")
    ax.legend(fontsize=8)
axes[0].set_ylabel("activations held")
plt.tight_layout()
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
# - Both schedules have the same bubble in theory: the simulation of the exact event lists
#   the trainer runs gives (p-1)/(m+p-1) for both. The measured one is larger: 4 processes
#   share 2 CPU cores, so stages that compute at the same time slow each other down, and each
#   hand-off between stages adds the latency of a send/recv pair that nothing hides.
# - The shape is the schedule's: AFAB is a forward wave then a backward wave, 1F1B settles into
#   alternating one forward and one backward per stage after p - s - 1 warm-up forwards.
# - AFAB: every stage holds all m = 8 micro-batches' activations before its first backward.
#   1F1B starts the backward of micro-batch 0 as soon as it can: stage s holds at most p - s
#   micro-batches, i.e. activation memory bounded by p instead of m, for the same bubble.
# - Raising m shrinks the bubble (p-1)/(m+p-1), but with AFAB it raises activation memory
#   linearly; with 1F1B it does not. That is why 1F1B is the default.
