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
# launched from inside backward as soon as a bucket's gradients are final. How much of the
# gradient is on its way while backward is still computing, how does the bucket size change
# that, and how many bytes does one step move?
#
# We read traces of `step02_data_parallel` on 2 CPU ranks (gloo): tiny model with 4 layers,
# buckets of 0.05 MB so that there are several, and the same run with other bucket sizes.
# Every rank wrote each collective it issued (issue time, completion time, the time `wait()`
# returned) and the forward/backward of each decoder layer (`notebooks/trace.py`, which
# records an unmodified run from the outside), and the machine it ran on.

# %%
RERECORD = False  # True: rerun step02 4 times under torchrun (~2 min on 2 cores) and overwrite traces/02_*.jsonl

# %%
import matplotlib.pyplot as plt
import numpy as np

from nbtools import COLORS, TINY, bar, dedupe_legend, load, machine, of, record, save, tiny_n_params

NAME, STEPS, MAIN, SWEEP = "02_data_parallel", 4, 0.05, (0.02, 0.05, 0.2, 1000)  # bucket sizes in MB
ARGS = [*TINY, "--num-layers", "4", "--max-steps", STEPS, "--dp", 2]
if RERECORD:  # steps 1-3 (step 0 warms up); the sweep keeps only what its figure reads
    record(NAME, "step02_data_parallel", 2, [*ARGS, "--bucket-size-mb", MAIN],
           keep=lambda r: r.get("step", 0) >= 1 and (r["ev"] == "comm" or r.get("phase") == "optimizer"
                                                      or r.get("module", "x.y").count(".") <= 1))
    for mb in set(SWEEP) - {MAIN}:
        record(f"02_bucket_{mb:g}MB", "step02_data_parallel", 2, [*ARGS, "--bucket-size-mb", mb],
               keep=lambda r: r.get("step", 0) >= 1 and r.get("phase") is not None
               and (r["ev"] == "comm" or r.get("module") in ("model", "layers.0")),
               fields=("seq", "op", "bytes", "t0", "t1", "t_wait", "t_done", "step", "phase", "module"))
recs = load(NAME)
MACHINE, OVER = machine(recs)
print(len(recs), "records; run:", of(recs, "run")[0]["args"])
print("recorded on:", MACHINE)


def buckets(recs, rank, step):
    """The gradient all-reduces of one rank and step (issued inside backward or the optimizer phase)."""
    return sorted([c for c in of(recs, "comm", rank=rank, step=step) if c.get("phase")], key=lambda c: c["seq"])


def on_the_wire(cs):
    """[(start, done)] of the buckets as gloo runs them: one at a time per group, in launch order;
    a bucket starts when it was launched and the previous one is done."""
    out, free = [], -np.inf
    for c in cs:
        start = max(c["t0"], free)
        free = max(start, c.get("t_done", c["t1"]))
        out.append((start, free))
    return out


# %% [markdown]
# ## One step, per rank: backward of each layer vs the bucket all-reduces
# Top lane of each rank: forward (blue) and backward (green) of every decoder layer, then the
# optimizer phase (grey, it starts with `finish_gradient_synchronization`, which waits for the
# buckets). Bottom lane: the buckets as gloo runs them, one at a time per process group: a
# bucket is on the wire (orange) from when it was launched (tick) or the previous one finished,
# to when gloo's thread finished it; the time the rank spent blocked in `wait()` is black.
#
# These are wall times on a small CPU machine (title): gloo's threads and the other rank
# compete with backward for the same cores, so the lengths are not those of a GPU cluster.
# The order of events is not affected; the next section reads only that.

# %%
step = STEPS - 1  # the last step: no first-step warm-up
ranks = sorted({r["rank"] for r in of(recs, "meta")})
t_start = min(s["t0"] for s in of(recs, "span", step=step))  # times relative to this step's start
fig, ax = plt.subplots(figsize=(11, 1.6 * len(ranks) + 0.8))
for rank in ranks:
    y = 2 * rank
    for s in of(recs, "span", rank=rank, step=step):
        if s.get("module", "").count(".") == 1 or s["phase"] == "optimizer":  # layers.N, not their blocks
            bar(ax, y, s["t0"] - t_start, s["t1"] - t_start, COLORS[s["phase"]], s["phase"], height=0.7,
                text=s["module"].split(".")[1] if s.get("module") else None, edgecolor="white")
    cs = buckets(recs, rank, step)
    for c, (start, done) in zip(cs, on_the_wire(cs)):
        bar(ax, y + 0.8, start - t_start, done - t_start, COLORS["dp"], "bucket all-reduce on the wire",
            height=0.5, edgecolor="white", linewidth=0.5)
        ax.plot([(c["t0"] - t_start) * 1e3] * 2, [y + 1.1, y + 1.25], color="black", lw=0.8)
        if c.get("t_wait") is not None and c["t1"] > c["t_wait"]:
            bar(ax, y + 1.35, c["t_wait"] - t_start, c["t1"] - t_start, "black", "rank blocked in wait()",
                height=0.2)
ax.plot([], [], "|", color="black", label="bucket launched")
ax.set_yticks([2 * r + y for r in ranks for y in (0, 0.8)],
              [f"rank {r}: {lane}" for r in ranks for lane in ("layers", "buckets")])
ax.invert_yaxis()
ax.set_xlabel(f"time since the start of step {step} (ms, wall clock)")
ax.set_title(f"step {step}, {len(cs)} buckets of {MAIN} MB: measured on {MACHINE}", fontsize=10)
dedupe_legend(ax, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What was launched while backward still had work to do: the order of events
# Whether a bucket can overlap backward at all is decided by when it is launched relative to
# the backward of the layers still to come, and that order is fixed by the code (buckets in
# reverse layer order, launched by gradient hooks), not by the machine. Below: the gradient
# bytes launched so far (y) against where backward was when they were launched (x: the module
# whose backward was running). Everything left of the dashed line was launched before the
# backward of layer 0 (the first layer, the last one backward reaches) began.

# %%
def where(c, n_layers):
    """x position of a launch: 0 lm_head, 1 the last layer ... n_layers layer 0, then after backward."""
    m, phase = c.get("module") or "", c.get("phase")
    if phase == "backward" and m.startswith("layers."):
        return 1 + n_layers - 1 - int(m.split(".")[1])
    return 0 if m == "lm_head" else n_layers + 1 if phase == "backward" else n_layers + 2


N_LAYERS = 4
fig, ax = plt.subplots(figsize=(9, 3.4))
for rank in ranks:
    cs = buckets(recs, rank, step)
    xs = [where(c, N_LAYERS) + 0.1 * rank for c in cs]
    ax.step([0] + xs, np.cumsum([0] + [c["bytes"] for c in cs]) / 1e6, where="post", marker="o", ms=3,
            label=f"rank {rank}", color=f"C{rank}")
    (l0,) = of(recs, "span", rank=rank, step=step, phase="backward", module="layers.0")
    before = sum(c["bytes"] for c in cs if c["t0"] < l0["t0"])
    print(f"rank {rank}: {before:,} of {sum(c['bytes'] for c in cs):,} gradient bytes "
          f"({before / sum(c['bytes'] for c in cs):.0%}) launched before the backward of layer 0 began")
ax.axvline(N_LAYERS - 0.5, color="black", ls="--", lw=1)
ax.text(N_LAYERS - 0.55, 0.02, "backward of layer 0 begins", ha="right", va="bottom", fontsize=8)
ax.set_xticks(range(N_LAYERS + 3), ["lm_head", *[f"layer {i}" for i in reversed(range(N_LAYERS))],
                                    "end of\nbackward", "optimizer\n(finish sync)"], fontsize=8)
ax.set_xlabel("backward was running ... when the bucket was launched")
ax.set_ylabel("gradient MB launched so far")
ax.set_title(f"step {step}, buckets of {MAIN} MB: event order (the same on any machine)", fontsize=10)
ax.legend(fontsize=8, loc="upper left")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Bucket size against overlap: the sweep of exercise 1
# The same run with buckets of 0.02 MB to 1000 MB (one bucket). Left: bytes per step, one box
# per bucket: always 4 bytes x every parameter, whatever the bucket size (a ring all-reduce
# sends 2(n-1)/n of it per rank; n = 2 here: exactly the bytes). Middle: the share of those
# bytes launched before the backward of layer 0 began (event order, machine-independent).
# Right: the measured price of what was not hidden, the time from the end of backward until
# the last bucket was done (median over steps 1-3 and both ranks, wall clock on this machine).

# %%
sweep = {mb: recs if mb == MAIN else load(f"02_bucket_{mb:g}MB") for mb in SWEEP}
n_params = tiny_n_params(num_hidden_layers=N_LAYERS)
early, exposed, sizes = {}, {}, {}
for mb, rs in sweep.items():
    steps = sorted({c["step"] for c in of(rs, "comm")})
    e, x = [], []
    for rank in ranks:
        for st in steps:
            cs = buckets(rs, rank, st)
            (l0,) = of(rs, "span", rank=rank, step=st, phase="backward", module="layers.0")
            (bwd,) = of(rs, "span", rank=rank, step=st, phase="backward", module="model")
            e.append(sum(c["bytes"] for c in cs if c["t0"] < l0["t0"]) / sum(c["bytes"] for c in cs))
            x.append(max(0.0, on_the_wire(cs)[-1][1] - bwd["t1"]) * 1e3)
    early[mb], exposed[mb], sizes[mb] = np.mean(e), x, [c["bytes"] for c in buckets(rs, 0, steps[-1])]
sweep_machine, _ = machine(sweep[SWEEP[0]])
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1.2, 1, 1]})
labels = [f"{mb:g} MB" for mb in SWEEP]
for i, mb in enumerate(SWEEP):
    bottom = 0
    for b in sizes[mb]:
        axes[0].bar(i, b / 1e6, bottom=bottom / 1e6, color=COLORS["dp"], edgecolor="white", linewidth=0.6)
        bottom += b
    axes[0].text(i, bottom / 1e6, f"{len(sizes[mb])}", ha="center", va="bottom", fontsize=8)
axes[0].axhline(4 * n_params / 1e6, color="black", ls="--", lw=1)
axes[0].set_ylim(0, 4 * n_params / 1e6 * 1.25)
axes[0].set_title(f"MB all-reduced per step, one box per bucket (number: buckets)\n"
                  f"dashed: 4 B x {n_params:,} parameters", fontsize=9)
axes[1].bar(range(len(SWEEP)), [100 * early[mb] for mb in SWEEP], color=COLORS["dp"])
axes[1].set_ylim(0, 100)
axes[1].set_title("% of the bytes launched before\nlayer 0's backward began (event order)", fontsize=9)
axes[2].boxplot([exposed[mb] for mb in SWEEP], positions=range(len(SWEEP)), widths=0.5)
axes[2].set_title(f"ms from the end of backward to the last bucket done\n(wall clock; {sweep_machine})",
                  fontsize=9)
for ax, unit in zip(axes, ("MB per step", "% of the gradient bytes", "ms (wall clock)")):
    ax.set_xticks(range(len(SWEEP)), labels)
    ax.set_xlabel("--bucket-size-mb")
    ax.set_ylabel(unit)
plt.tight_layout()
save(fig, "02_bucket_sweep")
plt.show()
for mb in SWEEP:
    print(f"{mb:>6g} MB: {len(sizes[mb]):>3} buckets, {early[mb]:4.0%} launched before layer 0's backward, "
          f"exposed {np.median(exposed[mb]):5.1f} ms (median, wall)")

# %% [markdown]
# ## What to notice
# - The buckets are launched in reverse layer order (lm_head first). With small buckets most
#   of the gradient bytes are launched while the backward of earlier layers is still to run:
#   that is the part that can travel behind compute. The last bucket (it holds the embedding,
#   whose gradient is final only when backward is over) can never overlap.
# - One bucket (1000 MB) launches everything after backward: 0 % overlap by construction, and
#   the whole all-reduce is exposed. Smaller buckets start sooner, but each message pays a
#   latency, and a process group runs its collectives one at a time: a bucket launched early
#   can still queue behind the previous ones (the orange bars start when the previous ends).
# - The bytes per step do not depend on the bucket size or on dp: 4 bytes x every parameter.
# - An all-reduce completes only when every rank has joined it: the slowest rank sets the pace
#   of the whole data-parallel group.
# - The milliseconds here come from a small CPU machine (titles) where gloo's threads compete
#   with backward for the same cores; read them as an illustration, and the event order and the
#   bytes as the facts. On GPUs NCCL runs on its own streams beside the compute kernels.
