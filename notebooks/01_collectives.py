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
# # 01 · Collectives: what does each one do to the ranks' tensors?
#
# **Question.** The course is built from six communication primitives: all-reduce,
# reduce-scatter, all-gather, all-to-all, broadcast and send/recv. What does each one leave
# on every rank, and how does a ring all-reduce get there with neighbour-to-neighbour messages?
#
# `collectives_demo.py` runs them on 4 CPU processes (torchrun, gloo) on a few numbers and
# writes every rank's tensor before and after, plus the state after each step of a ring
# all-reduce written with send/recv only. By default we read its saved output.

# %%
RERECORD = False  # True: rerun collectives_demo.py on 4 processes (~10 s) and overwrite traces/01_collectives.json

# %%
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from nbtools import HERE, TRACES, read_json, save, torchrun

SAVED = TRACES / "01_collectives.json"
if RERECORD:
    with tempfile.TemporaryDirectory() as tmp:
        torchrun(HERE / "collectives_demo.py", 4, [tmp], timeout=120)
        ranks = [json.loads(f.read_text()) for f in sorted(Path(tmp).glob("rank*.json"))]
    SAVED.write_text(json.dumps(ranks))
ranks = read_json(SAVED)
n = len(ranks)
print(f"{n} ranks; ops: {', '.join(ranks[0]['ops'])}")


# %% [markdown]
# ## Before and after, per rank
# Each column of panels is one collective: rows are ranks, cells are the elements of the
# rank's tensor (their values written in them), before (top) and after (bottom).

# %%
def grid(ax, rows, title, cmap="Blues"):
    width = max(len(r) for r in rows)
    a = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        a[i, :len(r)] = r
    ax.imshow(a, cmap=cmap, vmin=np.nanmin(a) - 1, vmax=np.nanmax(a) + 1, aspect="auto")
    for (i, j), v in np.ndenumerate(a):
        if not np.isnan(v):
            ax.text(j, i, f"{v:g}", ha="center", va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), [f"rank {i}" for i in range(len(rows))])
    ax.set_xticks(range(width), [str(j) for j in range(width)], fontsize=7)
    ax.set_xlabel("element index", fontsize=8)
    ax.set_title(title, fontsize=10)


ops = list(ranks[0]["ops"])
fig, axes = plt.subplots(2, len(ops), figsize=(2.3 * len(ops), 4.6))
for k, op in enumerate(ops):
    grid(axes[0, k], [r["ops"][op]["before"] for r in ranks], f"{op}\nbefore")
    grid(axes[1, k], [r["ops"][op]["after"] for r in ranks], "after", cmap="Oranges")
    if k:
        axes[0, k].set_yticks([]), axes[1, k].set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# Bytes each rank sends, for a tensor of N bytes on n ranks with ring algorithms (what
# `trace.py` writes as `sent`): all-reduce 2(n-1)/n·N; reduce-scatter and all-gather
# (n-1)/n·N (N = the full tensor); all-to-all (n-1)/n·N; send N.
# These are counts, not times: they hold on any machine.

# %% [markdown]
# ## A ring all-reduce, step by step
# Rank r starts with 2^r in each of its n chunks, so a value's binary digits say which ranks
# are already summed in (shown as e.g. `0+2`). Ranks are the rows, so the ring runs downwards:
# rank r sends to rank r + 1 (the row below; the last rank to rank 0) and receives from rank
# r - 1 (the row above; rank 0 from the last). Reduce-scatter: n-1 steps, each rank sends one
# chunk to the next rank and adds the one arriving from the row above. All-gather: n-1 more
# steps pass the finished chunks (all ranks in: `all`) around.

# %%
def who(v, n):
    bits = [str(b) for b in range(n) if int(v) >> b & 1]
    return "all" if len(bits) == n else "+".join(bits)


n_steps = len(ranks[0]["ring"]["states"])
fig, axes = plt.subplots(1, n_steps + 1, figsize=(2.1 * (n_steps + 1), 2.8), sharey=True)
panels = [("start", [r["ring"]["before"] for r in ranks], None)]
for s in range(n_steps):
    st = [r["ring"]["states"][s] for r in ranks]
    panels.append((f"{st[0]['phase']}\nstep {st[0]['step'] + 1}", [x["x"] for x in st], st))
for ax, (title, rows, st) in zip(axes, panels):
    counts = np.array([[bin(int(v)).count("1") for v in row] for row in rows])
    ax.imshow(counts, cmap="Greens", vmin=0, vmax=n + 1)
    for (i, j), v in np.ndenumerate(np.array(rows)):
        ax.text(j, i, who(v, n), ha="center", va="center", fontsize=8)
    if st:  # outline the chunk each rank just received
        for i, x in enumerate(st):
            ax.add_patch(plt.Rectangle((x["received"] - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(n), [f"c{j}" for j in range(n)])
    ax.set_xlabel("chunk", fontsize=8)
axes[0].set_yticks(range(n), [f"rank {i}" for i in range(n)])
plt.suptitle("ring all-reduce: which ranks are summed into each chunk "
             "(red: just received from the row above; rank 0 from the last rank)", fontsize=10)
plt.tight_layout()
save(fig, "01_ring_allreduce")
plt.show()

# %% [markdown]
# ## What to notice
# - all-reduce = reduce-scatter followed by all-gather: the ring does exactly that, and after
#   the first n-1 steps each rank owns exactly one finished chunk (`all`), a different one per rank.
# - In every ring step each rank sends one chunk (N/n bytes) and receives one: 2(n-1) steps
#   send 2(n-1)/n·N per rank. That is nearly independent of n, which is why data parallelism
#   scales: the bytes per rank do not grow with the number of ranks (the latency, n-1 hops, does).
# - all-to-all is a transpose: rank r's element c goes to rank c. Context and expert
#   parallelism use it to re-shard a tensor along another dimension.
# - send/recv pairs must be posted on both sides at once (here `batch_isend_irecv`): two
#   blocking sends facing each other deadlock.
