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
import importlib.util

import matplotlib.pyplot as plt
import numpy as np

from nbtools import COLORS, TINY, bar, load, of, record, step_dir

NAME, CP, T, B, HKV, HD = "05_context_parallel", 4, 32, 2, 2, 16
if RERECORD:
    record(NAME, "step06_context_parallel", CP, [*TINY, "--max-steps", 2, "--cp", CP],
           keep=lambda r: r.get("step") == 1 and not r.get("module", "").startswith("layers.1")
           and (r["ev"] == "comm" or r.get("module", "").endswith(("self_attn", "model"))))
recs = load(NAME)
ranks = sorted(m["rank"] for m in of(recs, "meta"))
cp_group = of(recs, "meta", rank=0)[0]["groups"]["cp"]
print(len(recs), "records; cp group:", cp_group)

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
# ## When the hops happen: attention forward of layer 0, per rank
# Bars: the attention block (blue), each k/v send posted to the next rank (brown, from post to
# wait) - it is posted before the block's attention is computed, so the transfer can hide
# behind it.

# %%
fig, ax = plt.subplots(figsize=(11, 0.7 * len(ranks) + 1))
for rank in ranks:
    (span,) = [s for s in of(recs, "span", rank=rank, phase="forward", module=ATTN)]
    bar(ax, rank, 0, span["t1"] - span["t0"], COLORS["forward"], height=0.8, alpha=0.4)
    for c in of(recs, "comm", rank=rank, op="isend", module=ATTN, phase="forward"):
        bar(ax, rank, c["t0"] - span["t0"], c["t1"] - span["t0"], COLORS["cp"], height=0.3)
ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
ax.invert_yaxis()
ax.set_xlabel("ms since this rank's attention forward started")
ax.set_title(f"{ATTN} forward: {CP - 1} k/v hops over cp per rank")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Load balance: contiguous vs zig-zag
# Under a causal mask a query at position p looks at p + 1 keys. Colour every unmasked
# (query, key) pair by the rank that owns the query, then count per rank
# (`context_parallel.attention_work`).

# %%
cp_mod = None
try:
    spec = importlib.util.spec_from_file_location("cp", step_dir("step06_context_parallel") / "context_parallel.py")
    cp_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cp_mod)
except FileNotFoundError:
    print("step06_context_parallel/ is not there yet: skipping the load-balance figure")
if cp_mod is not None:
    TL = 64
    owner = {"contiguous": np.repeat(np.arange(CP), TL // CP),
             "zigzag": np.zeros(TL, dtype=int)}
    for r in range(CP):
        owner["zigzag"][cp_mod.zigzag_positions(TL, r, CP).numpy()] = r
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    cmap = plt.get_cmap("tab10")
    for ax, layout in zip(axes, ("contiguous", "zigzag")):
        img = np.ones((TL, TL, 3))
        for q in range(TL):
            img[q, :q + 1] = cmap(owner[layout][q])[:3]
        ax.imshow(img)
        ax.set_title(f"{layout}: query rows coloured by rank", fontsize=9)
        ax.set_xlabel("key position"), ax.set_ylabel("query position")
    for i, layout in enumerate(("contiguous", "zigzag")):
        work = cp_mod.attention_work(TL, CP, layout)
        axes[2].bar(np.arange(CP) + 0.4 * i - 0.2, work, width=0.4, label=f"{layout} (max/min {max(work) / min(work):.1f})",
                    color=[cmap(r) for r in range(CP)], alpha=1.0 if i else 0.45, edgecolor="black")
    axes[2].set_xticks(range(CP), [f"rank {r}" for r in range(CP)])
    axes[2].set_ylabel("unmasked (q, k) pairs")
    axes[2].set_title(f"attention work per rank, T = {TL}, cp = {CP}\n(pale: contiguous, solid: zig-zag)", fontsize=9)
    axes[2].legend(fontsize=8)
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
#   rank does (2cp-1)x more work - every ring step waits for it. Zig-zag pairs chunk r with
#   chunk 2cp-1-r so every rank does the same work, with the same messages.
# - Gradients of everything outside attention are per token: they are all-reduced with data
#   parallelism over the cp x dp group (`cp_dp` in the trace) once per step.
