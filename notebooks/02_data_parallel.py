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
# # 02 · Data parallelism: does the gradient all-reduce hide behind backward?
#
# **Question.** step02 all-reduces the gradients over the data-parallel group in buckets,
# launched from inside backward as soon as a bucket's gradients are final. On a real run, do
# those all-reduces overlap the rest of backward, and how many bytes does one step move?
#
# We read a trace of `step02_data_parallel` on 2 CPU ranks (gloo): tiny model with 4 layers,
# buckets of 0.05 MB so that there are several. Every rank wrote each collective it issued
# (issue time, completion time, the time `wait()` returned) and the forward/backward of each
# decoder layer (`notebooks/trace.py`, which records an unmodified run from the outside).

# %%
RERECORD = False  # True: rerun step02 under torchrun (~20 s on 2 cores) and overwrite traces/02_data_parallel.jsonl

# %%
import matplotlib.pyplot as plt

from nbtools import COLORS, TINY, bar, dedupe_legend, load, of, record, tiny_n_params

NAME, STEPS = "02_data_parallel", 3
ARGS = [*TINY, "--num-layers", "4", "--max-steps", STEPS, "--dp", 2, "--bucket-size-mb", "0.05"]
if RERECORD:
    record(NAME, "step02_data_parallel", 2, ARGS)
recs = load(NAME)
print(len(recs), "records; run:", of(recs, "run")[0]["args"])

# %% [markdown]
# ## One step, per rank: backward of each layer vs the bucket all-reduces
# Top lane of each rank: forward (blue) and backward (green) of every decoder layer, then the
# optimizer phase (grey, it starts with `finish_gradient_synchronization`, which waits for the
# buckets). Bottom lane: each bucket's all-reduce from launch to completion (orange), and the
# time the rank spent blocked in `wait()` on it (black).

# %%
step = STEPS - 1  # the last step: no first-step warm-up
ranks = sorted({r["rank"] for r in of(recs, "meta")})
t_start = min(s["t0"] for s in of(recs, "span", step=step))  # times relative to this step's start
fig, ax = plt.subplots(figsize=(11, 2.2 * len(ranks) + 0.5))
for rank in ranks:
    y = 3 * rank
    for s in of(recs, "span", rank=rank, step=step):
        if s.get("module", "").count(".") == 1 or s["phase"] == "optimizer":  # layers.N, not their blocks
            bar(ax, y, s["t0"] - t_start, s["t1"] - t_start, COLORS[s["phase"]], s["phase"], height=0.7,
                text=s["module"].split(".")[1] if s.get("module") else None, edgecolor="white")
    buckets = [c for c in of(recs, "comm", rank=rank, step=step) if c.get("phase")]
    for i, c in enumerate(buckets):  # one thin row per bucket, in launch order
        yb = y + 0.6 + 1.5 * (i + 0.5) / len(buckets)
        bar(ax, yb, c["t0"] - t_start, c.get("t_done", c["t1"]) - t_start, COLORS["dp"],
            "all-reduce over dp: launch -> done", height=1.2 / len(buckets))
        if c.get("t_wait") is not None:
            bar(ax, yb, c["t_wait"] - t_start, c["t1"] - t_start, "black", "rank blocked in wait()",
                height=0.4 / len(buckets))
ax.set_yticks([3 * r + 0.8 for r in ranks], [f"rank {r}" for r in ranks])
ax.invert_yaxis()
ax.set_xlabel(f"ms since the start of step {step}")
ax.set_title(f"step {step}: backward of each layer (green) vs the bucket all-reduces (orange, one row each)")
dedupe_legend(ax, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## How much of each all-reduce ran while backward was still computing?

# %%
for rank in ranks:
    bwd = [s for s in of(recs, "span", rank=rank, step=step, phase="backward", module="model")]
    bwd_end = max(s["t1"] for s in bwd)
    print(f"rank {rank}: backward ends at {bwd_end * 1e3:.1f} ms")
    for c in [c for c in of(recs, "comm", rank=rank, step=step) if c.get("phase")]:
        done = c.get("t_done", c["t1"])
        hidden = max(0.0, min(done, bwd_end) - c["t0"]) / max(done - c["t0"], 1e-9)
        print(f"   {c['bytes']:>8,} B launched in {c['phase']:>9} {c.get('module', ''):<20} "
              f"{(done - c['t0']) * 1e3:5.2f} ms on the wire, {hidden:4.0%} of it during backward")

# %% [markdown]
# ## Bytes per step: the buckets add up to 4 x the parameter count
# Every float32 gradient is all-reduced exactly once per optimizer step, whatever the bucket
# size. A ring all-reduce sends 2(n-1)/n of that per rank (n = 2 here: exactly the bytes).

# %%
n_params = tiny_n_params("step02_data_parallel", num_hidden_layers=4)
fig, ax = plt.subplots(figsize=(7, 3))
for rank in ranks:
    per_step = [[c["bytes"] for c in of(recs, "comm", rank=rank, step=s) if c.get("phase")] for s in range(STEPS)]
    bottoms = [0] * STEPS
    for b in range(max(map(len, per_step))):
        sizes = [p[b] if b < len(p) else 0 for p in per_step]
        ax.bar([s + 0.4 * rank for s in range(STEPS)], [x / 1e6 for x in sizes], width=0.38,
               bottom=[x / 1e6 for x in bottoms], edgecolor="white", color=COLORS["dp"])
        bottoms = [x + y for x, y in zip(bottoms, sizes)]
ax.axhline(4 * n_params / 1e6, color="black", ls="--", label=f"4 x {n_params:,} params")
ax.legend(fontsize=8)
ax.set_xticks([s + 0.2 for s in range(STEPS)], [f"step {s}\nranks {ranks}" for s in range(STEPS)])
ax.set_ylabel("MB all-reduced (one box per bucket)")
ax.set_title("gradient bytes all-reduced per step, per rank")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What to notice
# - The buckets are launched in reverse layer order (lm_head first). The first ones travel
#   entirely while the backward of earlier layers is still computing, later ones less and less,
#   and the last one (the embedding's gradient, ready only when backward is over) not at all.
#   What is not hidden shows up as time blocked in `wait()` (black) in the optimizer phase.
# - A process group runs its collectives one at a time, in launch order: a bucket launched
#   early can still queue behind the previous ones. Smaller buckets start sooner but each pays
#   a per-message latency; one huge bucket cannot start before backward ends.
# - An all-reduce completes only when every rank has joined it: if one rank runs late, the
#   other's bars stretch until the late rank launches the same bucket. The slowest rank sets
#   the pace of the whole data-parallel group.
# - The bytes per step do not depend on the bucket size or on dp: 4 bytes x every parameter.
# - On 2 CPU cores the "network" (gloo threads) competes with backward for the same cores, so
#   the overlap is smaller than on GPUs, where NCCL runs beside the compute kernels.
