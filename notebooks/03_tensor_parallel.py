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
# # 03 · Tensor parallelism: where do the all-reduces sit in a layer?
#
# **Question.** step03 splits every decoder layer's matrices over the tp ranks (Megatron):
# q/k/v and gate/up by output columns, o_proj and down_proj by input rows. Where exactly in
# one layer's forward and backward does that force an all-reduce over tp, and how big is it?
#
# The trace: `step03_tensor_parallel` with `--tp 2` on 2 CPU ranks, tiny model (2 layers,
# hidden D = 64), micro-batch B = 2 sequences of T = 32 tokens, 2 steps.

# %%
RERECORD = False  # True: rerun step03 under torchrun (~20 s on 2 cores) and overwrite traces/03_tensor_parallel.jsonl

# %%
from collections import Counter

import matplotlib.pyplot as plt

from nbtools import COLORS, TINY, bar, dedupe_legend, load, of, record

NAME, STEPS, B, T, D = "03_tensor_parallel", 2, 2, 32, 64
if RERECORD:
    record(NAME, "step03_tensor_parallel", 2, [*TINY, "--max-steps", STEPS, "--tp", 2])
recs = load(NAME)
step, ranks = STEPS - 1, sorted(r["rank"] for r in of(recs, "meta"))
print(len(recs), "records; tp group of rank 0:", of(recs, "meta", rank=0)[0]["groups"]["tp"])

# %% [markdown]
# ## Inside one decoder layer
# For layer 0 of the last step: the layer, its attention block and its MLP block (bars), and
# every all-reduce over tp that the rank issued meanwhile (red, from call to return). Left:
# forward; right: backward. Times are relative to the start of the layer on each rank.

# %%
LAYER = "layers.0"
fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 1.3 * len(ranks)), sharey=True)
lanes = {LAYER: 0, f"{LAYER}.self_attn": 1, f"{LAYER}.mlp": 1, "all-reduce": 2}
for ax, phase in zip(axes, ("forward", "backward")):
    for rank in ranks:
        y0 = 4 * rank
        (layer,) = of(recs, "span", rank=rank, step=step, phase=phase, module=LAYER)
        t0 = layer["t0"]
        for s in of(recs, "span", rank=rank, step=step, phase=phase):
            if s["module"] in lanes:
                name = s["module"].split(".")[-1] if s["module"] != LAYER else "layer 0"
                bar(ax, y0 + lanes[s["module"]], s["t0"] - t0, s["t1"] - t0, COLORS[phase], height=0.7,
                    text=name, edgecolor="white", alpha=1.0 if s["module"] == LAYER else 0.7)
        for c in of(recs, "comm", rank=rank, step=step, phase=phase):
            if c.get("module", "").startswith(LAYER):
                bar(ax, y0 + 2, c["t0"] - t0, c["t1"] - t0, COLORS["tp"], "all-reduce over tp", height=0.7)
                ax.text((c["t0"] - t0) * 1e3, y0 + 2.55, f"{c['bytes'] // 1024} KiB in {c['module'][len(LAYER) + 1:] or 'layer'}",
                        fontsize=7, va="top")
    ax.set_title(f"{phase} of layer 0")
    ax.set_xlabel("ms since the layer started")
axes[0].set_yticks([4 * r + y for r in ranks for y in (0, 1, 2)],
                   [f"rank {r}: {n}" for r in ranks for n in ("layer", "blocks", "tp comm")])
axes[0].invert_yaxis()
dedupe_legend(axes[1], loc="lower right", fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## One micro-batch end to end: the order of compute and all-reduces
# The trace's events in the order rank 0 issued them (evenly spaced, not to time scale): the
# compute blocks (boxes) and every all-reduce over tp (red diamonds, with its size in floats).

# %%
rank = ranks[0]
BLOCKS = ("embed_tokens", "self_attn", "mlp", "lm_head")
items = [(s["t0"], s["phase"], s["module"]) for s in of(recs, "span", rank=rank, step=step)
         if s.get("module", "").endswith(BLOCKS)]
items += [(c["t0"], "comm", c) for c in of(recs, "comm", rank=rank, step=step, dim="tp")]
items.sort(key=lambda it: it[0])
fig, ax = plt.subplots(figsize=(13, 2.8))
row = {"forward": 0, "backward": 1}
x, current = 0, "forward"
for _, kind, what in items:
    if kind == "comm":
        y = row[what.get("phase", current)] if what.get("phase") in row else 0.5
        ax.plot(x, y, "D", color=COLORS["tp"], ms=9)
        ax.text(x, y - 0.28, f"{what['bytes'] // 4}", ha="center", fontsize=7, color=COLORS["tp"])
        if y == 0.5:
            ax.text(x, y + 0.3, "loss", ha="center", fontsize=7, color="gray")
    else:
        current = kind
        label = what.replace("layers.", "L").replace(".self_attn", " attn").replace(".mlp", " mlp")
        ax.add_patch(plt.Rectangle((x - 0.4, row[kind] - 0.15), 0.8, 0.3, color=COLORS[kind]))
        ax.text(x, row[kind], label.replace("embed_tokens", "embed").replace("lm_head", "head"),
                ha="center", va="center", fontsize=7, color="white")
    x += 1
ax.set_xlim(-1, x)
ax.set_ylim(1.5, -0.6)
ax.set_yticks([0, 1], ["forward", "backward"])
ax.set_xticks([])
ax.set_title(f"rank {rank}, step {step}: {sum(k == 'comm' for _, k, _ in items)} all-reduces over tp, in issue order")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Counted against the formula
# Per micro-batch, with x = B·T·D floats: forward 1 (embedding) + 2 per layer, backward
# 1 (lm_head input) + 2 per layer, all of x; the loss adds 2 small ones (B·T and 2·B·T floats).

# %%
L = len({s["module"] for s in of(recs, "span", phase="forward") if s.get("module", "").count(".") == 1})
count = Counter()
for c in of(recs, "comm", rank=rank, step=step, dim="tp"):
    module = c.get("module", "")
    key = ("layer" if module.startswith("layers.") else module or "loss", c.get("phase", "-"))
    count[key] += c["bytes"] // 4
x = B * T * D
expect = {("embed_tokens", "forward"): x, ("layer", "forward"): 2 * L * x, ("loss", "-"): 3 * B * T,
          ("lm_head", "backward"): x, ("layer", "backward"): 2 * L * x}
fig, ax = plt.subplots(figsize=(8, 3))
keys = list(expect)
ax.bar(range(len(keys)), [count[k] for k in keys], color=COLORS["tp"], label="traced")
ax.scatter(range(len(keys)), [expect[k] for k in keys], color="black", marker="_", s=600, label="formula", zorder=3)
ax.set_xticks(range(len(keys)), [f"{m}\n{p}" for m, p in keys])
ax.set_ylabel("floats all-reduced per micro-batch")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
assert all(count[k] == expect[k] for k in keys), (count, expect)

# %% [markdown]
# ## What to notice
# - Forward: one all-reduce at the end of each block (after `o_proj` and after `down_proj`):
#   a row-parallel linear's output is a partial sum over its input shards. Nothing moves
#   between the column-parallel and the row-parallel linear: attention heads and SwiGLU are
#   computed locally.
# - Backward: the mirror image. The all-reduce sits at the block's input (the gradient of x is
#   a partial sum because q, k, v, gate and up each saw the whole x), so in the trace it comes
#   right after the block's own backward, still inside the layer.
# - All of them carry the full activation (B, T, D), whatever tp is: tensor parallelism
#   trades memory for 4 all-reduces per layer per micro-batch on the critical path (nothing
#   overlaps them here), which is why it is kept inside a node with fast links.
# - The loss never gathers the (B, T, V) logits: only per-token maxima and sums travel.
