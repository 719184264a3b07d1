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
# # 05 · Context parallelism: the ring, and why the split is zig-zag
#
# **Question.** step06 splits every sequence over the cp ranks and computes attention as a
# ring: key/value blocks hop from rank to rank while each rank attends its own queries to the
# block it holds. What travels at each ring step, and why does the course hand each rank two
# chunks (zig-zag) instead of one contiguous piece of the sequence?
#
# The trace: `step06_context_parallel` with `--cp 4` on 4 CPU ranks, tiny model (2 layers,
# 2 kv heads of dim 16), micro-batch B = 2 sequences of T = 32 tokens: 8 tokens per rank.

# %%
RERECORD = False  # True: rerun step06 under torchrun (~20 s) and overwrite traces/05_context_parallel.jsonl

# %%
import matplotlib.pyplot as plt
import numpy as np

from nbtools import COLORS, TINY, bar, load, machine, of, record, save, step_module

NAME, CP, T, B, HKV, HD = "05_context_parallel", 4, 32, 2, 2, 16
if RERECORD:
    record(NAME, "step06_context_parallel", CP, [*TINY, "--max-steps", 2, "--cp", CP],
           keep=lambda r: r.get("step") == 1 and not r.get("module", "").startswith("layers.1")
           and (r["ev"] == "comm" or r.get("module", "").endswith(("self_attn", "model"))))
recs = load(NAME)
ranks = sorted(m["rank"] for m in of(recs, "meta"))
cp_group = of(recs, "meta", rank=0)[0]["groups"]["cp"]
cp_mod = step_module("step06_context_parallel", "context_parallel")  # the zig-zag layout and its work
MACHINE, OVER = machine(recs)
print(len(recs), "records; cp group:", cp_group)
print("recorded on:", MACHINE)

# %% [markdown]
# ## What each rank sends in one layer's attention
# Layer 0 of the last step, per rank: every send over the cp group, with its peer.

# %%
ATTN = "layers.0.self_attn"
for rank in ranks:
    for phase in ("forward", "backward"):
        sends = sorted(of(recs, "comm", rank=rank, op="isend", module=ATTN, phase=phase), key=lambda c: c["seq"])
        print(f"rank {rank} {phase:>8}: {len(sends)} sends to rank {sorted({c['peer'] for c in sends})}, "
              f"{sends[0]['bytes']:,} B each = 2 (k, v) x B x Hkv x T/cp x hd x 4 = "
              f"{2 * B * HKV * T // CP * HD * 4:,}")

# %% [markdown]
# ## The ring, step by step
# At ring step s rank r holds the k/v block of rank (r - s) mod cp: its own at s = 0, then one
# block further back per hop. With zig-zag that block is one of three shapes: the own block is
# plain causal; a block from an earlier rank is attended by all local queries but only with its
# first half; a block from a later rank only by the local second half. Below: which block each
# rank holds, coloured by the work it does with it, and as arrows the sends the trace recorded
# during that step (the block the next step needs, posted before this step's attention).

# %%
sends = {r: sorted(of(recs, "comm", rank=r, op="isend", module=ATTN, phase="forward"), key=lambda c: c["seq"])
         for r in ranks}  # forward send s of rank r carries the block it will need at step s + 1
fig, axes = plt.subplots(1, CP, figsize=(3.0 * CP, 3.0))
kinds = {"own (causal)": "tab:green", "earlier rank (half)": "tab:blue", "later rank (half)": "tab:orange"}
for s, ax in enumerate(axes):
    angle = np.pi / 2 - 2 * np.pi * np.arange(CP) / CP
    xy = np.c_[np.cos(angle), np.sin(angle)]
    for r in range(CP):
        src = (r - s) % CP
        kind = "own (causal)" if s == 0 else "earlier rank (half)" if src < r else "later rank (half)"
        ax.add_patch(plt.Circle(xy[r], 0.33, color=kinds[kind], alpha=0.8))
        ax.text(*xy[r], f"rank {r}\nholds kv{src}", ha="center", va="center", fontsize=8)
        if s < len(sends[r]):  # the traced send of this step: to the next rank of the ring
            a, b = xy[r], xy[cp_group.index(sends[r][s]["peer"])]
            ax.annotate("", b + (a - b) * 0.3, a + (b - a) * 0.3, arrowprops=dict(arrowstyle="->", color="gray"))
    ax.set_title(f"ring step {s}" + ("" if s + 1 < CP else " (last: no send)"), fontsize=9)
    ax.set_xlim(-1.5, 1.5), ax.set_ylim(-1.5, 1.5), ax.set_aspect("equal"), ax.axis("off")
handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in kinds.items()]
fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8)
plt.tight_layout(rect=(0, 0.08, 1, 1))
plt.show()

# %% [markdown]
# ## Which tile each rank computes at each ring step
# The same ring steps as (query chunk, key chunk) tiles of the causal attention matrix. The
# sequence is cut into 2cp = 8 chunks of T/2cp = 4 tokens; rank r holds chunks r and 2cp-1-r
# (zig-zag), so its queries are those two rows of chunks and the k/v block it holds at step s
# is the two chunks of rank (r - s) mod cp. Each tile is coloured by the rank that computes it:
# at step 0 its own block, causal (the triangles on the diagonal, and the full tile of its late
# queries against its early keys); from an earlier rank, all its queries against the FIRST half
# (chunk) of that block; from a later rank, its SECOND half of queries against the whole block.
# The last panel puts the steps together: every unmasked tile is computed exactly once, and the
# rows are coloured by rank exactly as in the load-balance figure below. The bars add up each
# rank's (q, k) pairs per step: one causal block plus cp - 1 half blocks of the same size, on
# every rank, which is `context_parallel.attention_work` (asserted).

# %%
def tiles(cp, rank, s):
    """[(query chunk, key chunk, kind)] rank computes at ring step s; kind: own (causal) / first / second."""
    src, mine = (rank - s) % cp, (rank, 2 * cp - 1 - rank)
    theirs = (src, 2 * cp - 1 - src)
    if s == 0:
        return [(q, k, "own") for q in mine for k in mine if k <= q]
    if src < rank:
        return [(q, theirs[0], "first") for q in mine]
    return [(mine[1], k, "second") for k in theirs]


c = T // (2 * CP)  # tokens per chunk
pairs = {"own": lambda q, k: c * (c + 1) // 2 if q == k else c * c, "first": lambda q, k: c * c,
         "second": lambda q, k: c * c}  # unmasked (q, k) pairs of a tile: triangle on the diagonal
seen, work = {}, np.zeros((CP, CP))  # (q chunk, k chunk) -> computed by; work[step, rank] in (q, k) pairs
for s in range(CP):
    for r in range(CP):
        for q, k, kind in tiles(CP, r, s):
            assert k <= q and (q, k) not in seen, (s, r, q, k)  # causal, and nothing computed twice
            seen[(q, k)] = r
            work[s, r] += pairs[kind](q, k)
assert len(seen) == 2 * CP * (2 * CP + 1) // 2, "every unmasked tile is computed"
expected = cp_mod.attention_work(T, CP, "zigzag")
assert list(work.sum(0)) == expected, (work.sum(0), expected)

cmap = plt.get_cmap("tab10")
fig, axes = plt.subplots(1, CP + 2, figsize=(2.6 * (CP + 2), 3.2), gridspec_kw={"width_ratios": [1] * (CP + 1) + [1.3]})
for s, ax in enumerate(axes[:CP + 1]):
    steps = [s] if s < CP else range(CP)
    for st in steps:
        for r in range(CP):
            for q, k, kind in tiles(CP, r, st):
                corners = ([(k, q), (k, q + 1), (k + 1, q + 1)] if q == k else
                           [(k, q), (k + 1, q), (k + 1, q + 1), (k, q + 1)])  # diagonal: the causal triangle
                ax.add_patch(plt.Polygon(corners, color=cmap(r), alpha=0.9, ec="white", lw=0.8))
                if s < CP:
                    ax.text(k + 0.5 - 0.2 * (q == k), q + 0.5 + 0.2 * (q == k), f"{r}", ha="center", va="center",
                            fontsize=7, color="white")
    ax.set_xlim(0, 2 * CP), ax.set_ylim(2 * CP, 0), ax.set_aspect("equal")
    ax.set_xticks(np.arange(2 * CP) + 0.5, range(2 * CP), fontsize=7)
    ax.set_yticks(np.arange(2 * CP) + 0.5, range(2 * CP), fontsize=7)
    ax.set_xlabel("key chunk", fontsize=8)
    ax.grid(False)
    ax.set_title(f"ring step {s}" if s < CP else "all steps", fontsize=9)
axes[0].set_ylabel("query chunk", fontsize=8)
bottom = np.zeros(CP)
for s in range(CP):
    axes[-1].bar(range(CP), work[s], bottom=bottom, color=[cmap(r) for r in range(CP)], edgecolor="white",
                 alpha=1.0 - 0.18 * s)
    for r in range(CP):
        axes[-1].text(r, bottom[r] + work[s, r] / 2, f"step {s}", ha="center", va="center", fontsize=6, color="white")
    bottom += work[s]
axes[-1].set_xticks(range(CP), [f"rank {r}" for r in range(CP)], fontsize=8)
axes[-1].set_ylabel("unmasked (q, k) pairs")
axes[-1].set_title(f"work per rank and step, T = {T}", fontsize=9)
plt.tight_layout()
save(fig, "05_ring_tiles")
plt.show()

# %% [markdown]
# ## When the hops happen: attention forward of layer 0, per rank
# Per rank, the attention block's forward (blue, wall clock) and each k/v send posted to the
# next rank (brown, from post to the return of its wait). The code posts the hop of step s + 1
# before it computes step s and waits for it after, so the transfer can hide behind the block's
# attention: that order is the code's and holds on any machine. The durations do not: this
# trace was recorded with more processes than cores (title), so a rank that is ready may wait
# for a core, and its peer's send is then late too. The grey bar under each rank is the CPU time
# the attention block consumed: what it computed, the rest of its wall time is waiting.

# %%
fig, ax = plt.subplots(figsize=(11, 0.9 * len(ranks) + 1.2))
for rank in ranks:
    (span,) = [s for s in of(recs, "span", rank=rank, phase="forward", module=ATTN)]
    bar(ax, rank, 0, span["t1"] - span["t0"], COLORS["forward"], "attention forward (wall clock)", height=0.5,
        alpha=0.4)
    bar(ax, rank + 0.35, 0, span["cpu"], "gray", "attention forward: CPU time", height=0.15)
    for c in of(recs, "comm", rank=rank, op="isend", module=ATTN, phase="forward"):
        bar(ax, rank, c["t0"] - span["t0"], c["t1"] - span["t0"], COLORS["cp"], "k/v send: post -> wait returned",
            height=0.2)
ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
ax.invert_yaxis()
ax.set_xlabel("ms since this rank's attention forward started")
ax.set_title(f"{ATTN} forward: {CP - 1} k/v hops over cp per rank; recorded on {MACHINE}", fontsize=9)
handles, labels = ax.get_legend_handles_labels()
ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=8, loc="upper left",
          bbox_to_anchor=(1.0, 1.0))
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Load balance: contiguous vs zig-zag
# Under a causal mask a query at position p looks at p + 1 keys. Colour every unmasked
# (query, key) pair by the rank that owns the query, then count per rank
# (`context_parallel.attention_work`).

# %%
TL = 64
owner = {"contiguous": np.repeat(np.arange(CP), TL // CP), "zigzag": np.zeros(TL, dtype=int)}
for r in range(CP):
    owner["zigzag"][cp_mod.zigzag_positions(TL, r, CP).numpy()] = r
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.3]})
for ax, layout in zip(axes, ("contiguous", "zigzag")):
    img = np.ones((TL, TL, 3))
    for q in range(TL):
        img[q, :q + 1] = cmap(owner[layout][q])[:3]
    ax.imshow(img)
    ax.set_title(f"{layout}: query rows coloured by rank", fontsize=9)
    ax.set_xlabel("key position (token)"), ax.set_ylabel("query position (token)")
for i, layout in enumerate(("contiguous", "zigzag")):
    w = cp_mod.attention_work(TL, CP, layout)
    axes[2].bar(np.arange(CP) + 0.4 * i - 0.2, w, width=0.4, label=f"{layout} (max/min {max(w) / min(w):.1f})",
                color=[cmap(r) for r in range(CP)], alpha=1.0 if i else 0.45, edgecolor="black")
axes[2].set_xticks(range(CP), [f"rank {r}" for r in range(CP)])
axes[2].set_ylabel("unmasked (q, k) pairs")
axes[2].set_ylim(0, 1.3 * max(cp_mod.attention_work(TL, CP, "contiguous")))
axes[2].set_title(f"attention work per rank, T = {TL}, cp = {CP}\n(pale: contiguous, solid: zig-zag)", fontsize=9)
axes[2].legend(fontsize=8, loc="upper left")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What to notice
# - Only k and v travel, and only the Hkv key/value heads (grouped-query attention repeats
#   them locally): per hop 2·B·Hkv·(T/cp)·hd numbers. Forward makes cp - 1 hops per layer;
#   backward repeats the k/v ring and also sends the partial dk/dv home, one hop behind
#   (cp - 1 + cp sends). Nothing is all-gathered: memory per rank stays O(T/cp).
# - The next hop is posted before the current block is computed, so on a fast link the
#   transfer hides behind the attention math.
# - Contiguous: rank 0 owns the first tokens, which attend to almost nothing, and the last
#   rank does ((2cp-1)n + 1)/(n + 1) times its work, n = T/cp tokens per rank: 6.6x here
#   (T = 64, cp = 4), towards 2cp-1 = 7 as T grows. Every ring step waits for it. Zig-zag pairs
#   chunk r with chunk 2cp-1-r so every rank does the same work, with the same messages.
# - Gradients of everything outside attention are per token: they are all-reduced with data
#   parallelism over the cp x dp group (`cp_dp` in the trace) once per step.
