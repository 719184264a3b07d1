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
# # 06 · The 4D mesh: who talks to whom, and how much?
#
# **Question.** step07 lays the ranks out as `torch.arange(world).view(dp, pp, cp, tp)` (tp
# varies fastest) and gives every rank one process group per dimension. Which ranks form each
# group, and in one training step, how many bytes does each dimension move?
#
# Part 1 is pure arithmetic on a 16-rank layout dp = pp = cp = tp = 2. Part 2 reads traces of
# `step07_4d_combined` on 8 CPU ranks in two layouts: dp=2 x pp=2 x tp=2, and pp=2 x cp=2 x tp=2.

# %%
RERECORD = False  # True: rerun step07 twice on 8 processes (~1-2 min on 2 cores) and overwrite traces/06_4d_*.json

# %%
import json
from collections import defaultdict
from math import prod

import matplotlib.pyplot as plt
import numpy as np
import torch

from nbtools import COLORS, TINY, TRACES, record

# %% [markdown]
# ## Part 1: the groups of a 16-rank layout
# A dimension's group = the ranks that differ from you only along that axis: fix the other
# three coordinates, vary this one. Two more groups matter: `cp_dp` (data parallelism over
# dp x cp: every rank holding the same weights, where gradients are averaged) and `mp` (the
# model-parallel ranks pp x tp that together hold one copy of the model: the grad-norm group).

# %%
SIZES = {"dp": 2, "pp": 2, "cp": 2, "tp": 2}


def groups_along(sizes, *axes):
    """All groups (lists of global ranks) of the ranks that differ only along `axes`."""
    names = list(sizes)
    grid = torch.arange(prod(sizes.values())).view(*sizes.values())  # (dp, pp, cp, tp)
    keep = [names.index(a) for a in axes]
    rest = [i for i in range(len(names)) if i not in keep]
    return grid.permute(*rest, *keep).reshape(-1, prod(sizes[a] for a in axes)).tolist()


GROUPS = {"dp": ("dp",), "pp": ("pp",), "cp": ("cp",), "tp": ("tp",), "cp_dp": ("dp", "cp"), "mp": ("pp", "tp")}
world = prod(SIZES.values())
coords = np.array(np.unravel_index(np.arange(world), tuple(SIZES.values()))).T  # rank -> (dp, pp, cp, tp)
# draw rank r at row (dp, pp), column (cp, tp): neighbours in the picture are neighbours in the grid
row = coords[:, 0] * SIZES["pp"] + coords[:, 1]
col = coords[:, 2] * SIZES["tp"] + coords[:, 3]
fig, axes = plt.subplots(1, len(GROUPS), figsize=(2.7 * len(GROUPS), 3.3))
cmap = plt.get_cmap("tab20")
for ax, (name, axes_) in zip(axes, GROUPS.items()):
    gs = groups_along(SIZES, *axes_)
    which = {r: i for i, g in enumerate(gs) for r in g}
    for r in range(world):
        ax.add_patch(plt.Rectangle((col[r] - 0.45, row[r] - 0.45), 0.9, 0.9, color=cmap(which[r] % 20)))
        ax.text(col[r], row[r], str(r), ha="center", va="center", fontsize=9)
    ax.set_xlim(-0.6, col.max() + 0.6), ax.set_ylim(row.max() + 0.6, -0.6)
    ax.set_aspect("equal")
    ax.set_xticks(range(col.max() + 1), [f"c{c // SIZES['tp']}t{c % SIZES['tp']}" for c in range(col.max() + 1)], fontsize=7)
    ax.set_yticks(range(row.max() + 1), [f"d{r // SIZES['pp']}p{r % SIZES['pp']}" for r in range(row.max() + 1)], fontsize=7)
    ax.set_title(f"{name}: {len(gs)} groups of {len(gs[0])}", fontsize=9)
plt.suptitle("same colour = same group; rank r has coordinates (d dp, p pp, c cp, t tp)", fontsize=10)
plt.tight_layout()
plt.show()
for name, axes_ in GROUPS.items():
    print(f"{name:>6}: {groups_along(SIZES, *axes_)}")

# %% [markdown]
# ## Part 2: bytes per dimension in one step of step07 (8 ranks)
# Tiny model (2 layers), micro-batch 2 x 32 tokens, 2 micro-batches per step; the second step
# of each run. Each record of the trace names the group of its collective (`dim`); we add up
# the bytes per rank and dimension (`bytes`: the tensor; `sent`: what a ring algorithm puts
# on the wire from this rank). The shipped files hold only these sums.

# %%
LAYOUTS = {"dp2_pp2_tp2": ["--dp", 2, "--pp", 2, "--tp", 2], "pp2_cp2_tp2": ["--pp", 2, "--cp", 2, "--tp", 2]}


def summarize(recs):
    """Per rank, dimension and op: count, bytes, sent; plus every rank's groups."""
    sums = defaultdict(lambda: [0, 0, 0])
    for r in recs:
        if r["ev"] == "comm":
            s = sums[(r["rank"], r["dim"], r["op"])]
            s[0], s[1], s[2] = s[0] + 1, s[1] + r["bytes"], s[2] + r["sent"]
    return {"meta": [r for r in recs if r["ev"] == "meta"],
            "sums": [[*k, *v] for k, v in sorted(sums.items())]}


if RERECORD:
    for name, layout in LAYOUTS.items():
        recs = record(f"06_4d_{name}", "step07_4d_combined", 8,
                      [*TINY, "--max-steps", 2, "--grad-acc-steps", 2, *layout],
                      keep=lambda r: r.get("step") == 1 and r["ev"] == "comm")
        (TRACES / f"06_4d_{name}.json").write_text(json.dumps(summarize(recs)))
        (TRACES / f"06_4d_{name}.jsonl").unlink()
runs = {name: json.loads((TRACES / f"06_4d_{name}.json").read_text())
        for name in LAYOUTS if (TRACES / f"06_4d_{name}.json").exists()}
print("traces:", list(runs) or "none yet (record them with RERECORD = True once step07 exists)")

# %%
# the trace's groups are the ones the process-group manager built: check them against Part 1
for name, run in runs.items():
    sizes = {"dp": 1, "pp": 1, "cp": 1, "tp": 1}
    sizes.update({k[:-5]: v for k, v in run["meta"][0]["coords"].items() if k.endswith("_size") and k[:-5] in sizes})
    for m in run["meta"]:
        for dim, ranks in m["groups"].items():
            if dim in GROUPS:
                assert ranks in groups_along(sizes, *GROUPS[dim]), (name, m["rank"], dim, ranks)
    print(f"{name}: sizes {sizes}, groups of all {len(run['meta'])} ranks match the arithmetic above")

# %%
if runs:
    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 3.6), squeeze=False)
    for ax, (name, run) in zip(axes[0], runs.items()):
        ranks = sorted(m["rank"] for m in run["meta"])
        dims = sorted({d for _, d, *_ in run["sums"]}, key=list(COLORS).index)
        bottom = np.zeros(len(ranks))
        for d in dims:
            v = np.array([sum(s[5] for s in run["sums"] if s[0] == r and s[1] == d) for r in ranks]) / 1e3
            ax.bar(ranks, v, bottom=bottom, color=COLORS[d], label=d, edgecolor="white")
            bottom += v
        ax.set_xticks(ranks)
        ax.set_xlabel("global rank")
        ax.set_ylabel("kB sent in one step (ring estimate)")
        ax.set_title(name.replace("_", " x "))
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plt.tight_layout()
    plt.show()
    for name, run in runs.items():
        print(name)
        for rank, dim, op, count, nbytes, sent in run["sums"]:
            if rank == 0:
                print(f"   rank 0 {dim:>6} {op:<24} x{count:<3} {nbytes:>9,} B  sent {sent:>9,} B")

# %% [markdown]
# ## What to notice
# - tp groups are consecutive ranks (tp varies fastest): they are the ones that talk most often
#   (4 all-reduces per layer per micro-batch), so they belong inside one node. dp groups are
#   the farthest apart: their one all-reduce per step tolerates slower links.
# - `cp_dp` is where gradients are averaged: each cp rank saw only its own tokens, so for
#   gradients cp acts like more data parallelism. With cp = 1 it is just the dp group.
# - Per step and rank the gradient all-reduce moves 4 bytes x the rank's local parameters
#   (1/(tp x pp) of the model), while tp and cp traffic scales with the activations (tokens x
#   hidden size) and pp traffic with one activation per micro-batch and stage boundary.
# - On a tiny model the weights are small, so here the gradient all-reduce dominates; on a
#   large model with long sequences the activation traffic of tp and cp grows instead.
