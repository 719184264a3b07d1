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
# # 03 · Tensor parallelism: where do the all-reduces sit in a layer, and what does `--sp` change?
#
# **Question.** step03 splits every decoder layer's matrices over the tp ranks (Megatron):
# q/k/v and gate/up by output columns, o_proj and down_proj by input rows. Where exactly in
# one layer's forward and backward does that force an all-reduce over tp, how big is it, and
# how much of a layer's time is it? With `--sp` (sequence parallelism) each all-reduce becomes
# a reduce-scatter plus an all-gather: what moves then, and what does it save in memory?
#
# The traces: `step03_tensor_parallel` with `--tp 2` and with `--tp 2 --sp` on 2 CPU ranks,
# and with one process (tp = 1, for the memory only); tiny model (2 layers, hidden D = 64),
# micro-batch B = 2 sequences of T = 32 tokens, the second of 2 steps.

# %%
RERECORD = False  # True: rerun step03 three times under torchrun (~1 min on 2 cores) and overwrite traces/03_*.jsonl

# %%
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np

from nbtools import COLORS, TINY, bar, dedupe_legend, load, machine, of, record, save

NAME, STEPS, B, T, D = "03_tensor_parallel", 2, 2, 32, 64
RUNS = {"": (2, ["--tp", 2]), "_sp": (2, ["--tp", 2, "--sp"]), "_tp1": (1, [])}  # file suffix: (ranks, flags)
if RERECORD:
    for suffix, (n, flags) in RUNS.items():
        record(NAME + suffix, "step03_tensor_parallel", n, [*TINY, "--max-steps", STEPS, *flags],
               keep=lambda r: r.get("step") == STEPS - 1 and (n > 1 or r["ev"] == "mem"))
recs, recs_sp, recs_tp1 = (load(NAME + suffix) for suffix in RUNS)
step, ranks = STEPS - 1, sorted(r["rank"] for r in of(recs, "meta"))
MACHINE, OVER = machine(recs)
print(len(recs), "records; tp group of rank 0:", of(recs, "meta", rank=0)[0]["groups"]["tp"])
print("recorded on:", MACHINE)

# %% [markdown]
# ## Inside one decoder layer: compute vs all-reduce
# Layer 0 of the last step, forward (left) and backward (right), per rank. The upper row of a
# rank is the raw trace: the layer, its attention and MLP blocks and every all-reduce over tp
# (red), in wall-clock time since the layer started. On the recording machine the two
# processes, gloo's threads and other work share the cores, and an all-reduce cannot finish
# before the other rank reaches it: a red bar mostly measures waiting for the other rank's core.
#
# The lower row replays the same events in their order with lengths that do not depend on
# that: each block's compute as the CPU time its thread consumed (the span's `cpu`, which
# excludes any wait), the rest of the layer (norms, residual adds) likewise, and each
# all-reduce as the fastest all-reduce of the same size in this trace (solid; still an upper
# bound of its cost), followed by the rest of its recorded wall time (hatched: waiting).

# %%
LAYER = "layers.0"
BLOCKS = (f"{LAYER}.self_attn", f"{LAYER}.mlp")


def layer_events(recs, rank, phase):
    """The layer span, its block spans and its all-reduces over tp (one rank, phase, last step)."""
    (layer,) = of(recs, "span", rank=rank, step=step, phase=phase, module=LAYER)
    spans = [s for s in of(recs, "span", rank=rank, step=step, phase=phase) if s["module"] in BLOCKS]
    comms = [c for c in of(recs, "comm", rank=rank, step=step, phase=phase) if c.get("module", "").startswith(LAYER)]
    return layer, spans, comms


fastest = {}  # bytes -> the shortest wall time of an all-reduce over tp of that size in the trace
for c in of(recs, "comm", op="all_reduce", dim="tp"):
    fastest[c["bytes"]] = min(fastest.get(c["bytes"], np.inf), c["t1"] - c["t0"])
fig, axes = plt.subplots(1, 2, figsize=(13, 1.3 + 1.6 * len(ranks)), sharey=True)
for ax, phase in zip(axes, ("forward", "backward")):
    for rank in ranks:
        y0 = 3 * rank
        layer, spans, comms = layer_events(recs, rank, phase)
        t0, width = layer["t0"], layer["t1"] - layer["t0"]

        def label(text, dt):  # only where it fits
            return text if dt > 0.12 * width else None

        bar(ax, y0, 0, layer["t1"] - t0, COLORS[phase], height=0.35, alpha=0.35)
        for sp in spans:
            bar(ax, y0 - 0.1, sp["t0"] - t0, sp["t1"] - t0, COLORS[phase], height=0.5, edgecolor="white",
                text=label(sp["module"].split(".")[-1], sp["t1"] - sp["t0"]))
        for c in comms:
            bar(ax, y0 + 0.3, c["t0"] - t0, c["t1"] - t0, "salmon", "all-reduce over tp, as recorded (wall clock)",
                height=0.25)
        # the replay: in issue order, compute as CPU time, the all-reduces as the fastest of their size
        events = sorted([(sp["t0"], "compute", sp["cpu"], sp["module"].split(".")[-1]) for sp in spans] +
                        [(c["t0"], "comm", c, f"{c['bytes'] // 1024} KiB") for c in comms], key=lambda e: e[0])
        x = 0.0
        for _, kind, what, text in events + [(None, "compute", layer["cpu"] - sum(sp["cpu"] for sp in spans), "")]:
            if kind == "compute":
                bar(ax, y0 + 1.2, x, x + what, COLORS[phase], f"{phase} compute (CPU time)", height=0.5,
                    edgecolor="white",
                    text=label(text, what))
                x += what
            else:
                fast, wall = fastest[what["bytes"]], what["t1"] - what["t0"]
                bar(ax, y0 + 1.2, x, x + fast, COLORS["tp"], "all-reduce: the fastest of its size in the trace",
                    height=0.5, edgecolor="white")
                bar(ax, y0 + 1.2, x + fast, x + wall, "mistyrose", "all-reduce: the rest of its wall time "
                    "(waiting for the other rank's core)", height=0.5, hatch="//", edgecolor=COLORS["tp"], lw=0)
                ax.text((x + wall / 2) * 1e3, y0 + 1.2, text, ha="center", va="center", fontsize=7)
                x += wall
    ax.set_title(f"{phase} of layer 0", fontsize=10)
    ax.set_xlabel("ms since the layer started")
axes[0].set_yticks([3 * r + y for r in ranks for y in (0, 1.2)],
                   [f"rank {r}: {n}" for r in ranks for n in ("as recorded", "replayed")])
axes[0].invert_yaxis()
fig.suptitle(f"tp = 2, measured on {MACHINE}", fontsize=10)
legend = {}
for ax in axes:
    legend.update({lab: h for h, lab in zip(*ax.get_legend_handles_labels())})
fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=3, fontsize=8)
plt.tight_layout(rect=(0, 0.13, 1, 1))
plt.show()
for rank in ranks:
    for phase in ("forward", "backward"):
        layer, spans, comms = layer_events(recs, rank, phase)
        wall, cpu = layer["t1"] - layer["t0"], layer["cpu"]
        comm, fast = sum(c["t1"] - c["t0"] for c in comms), sum(fastest[c["bytes"]] for c in comms)
        print(f"rank {rank} {phase:>8}: all-reduces {comm / wall:4.0%} of the layer's {wall * 1e3:5.2f} ms "
              "as recorded; "
              f"with the fastest of their size {fast / (cpu + fast):4.0%} of {(cpu + fast) * 1e3:5.2f} ms")
print("fastest all-reduce over tp per size:", {f"{b:,} B": f"{t * 1e3:.2f} ms" for b, t in sorted(fastest.items())})

# %% [markdown]
# ## One micro-batch end to end: the order of compute and collectives, with and without `--sp`
# The trace's events in the order rank 0 issued them (evenly spaced, not to time scale): the
# compute blocks (boxes) and every collective over tp (markers, with its size in KiB).
# Without `--sp` every communication point is an all-reduce of the (B, T, D) activations.
# With `--sp` the activations between blocks are split along T: each block starts with an
# all-gather (rebuild the full sequence for the column-parallel linears) and ends with a
# reduce-scatter (sum the row-parallel partial results and keep this rank's T/tp tokens).

# %%
MARK = {"all_reduce": ("D", COLORS["tp"], "all-reduce"), "all_gather_into_tensor": ("^", "tab:cyan", "all-gather"),
        "reduce_scatter_tensor": ("v", "tab:olive", "reduce-scatter")}
ORDER_BLOCKS = ("embed_tokens", "self_attn", "mlp", "lm_head")
fig, axes = plt.subplots(2, 1, figsize=(14, 5.2), sharex=True)
for ax, (title, rs) in zip(axes, (("tp = 2", recs), ("tp = 2, --sp", recs_sp))):
    rank = ranks[0]
    items = [(s["t0"], s["phase"], s["module"]) for s in of(rs, "span", rank=rank, step=step)
             if s.get("module", "").endswith(ORDER_BLOCKS)]
    items += [(c["t0"], "comm", c) for c in of(rs, "comm", rank=rank, step=step, dim="tp")]
    items.sort(key=lambda it: it[0])
    row, x, ops = {"forward": 0, "backward": 1}, 0, Counter()
    for _, kind, what in items:
        if kind == "comm":
            y = row.get(what.get("phase"), 0.5)
            marker, color, label = MARK[what["op"]]
            ax.plot(x, y, marker, color=color, ms=8, label=label)
            ax.text(x, y - 0.3, f"{what['bytes'] / 1024:g}", ha="center", fontsize=6, color=color)
            ops[label] += 1
        else:
            label = what.replace("layers.", "L").replace(".self_attn", " attn").replace(".mlp", " mlp")
            ax.add_patch(plt.Rectangle((x - 0.4, row[kind] - 0.15), 0.8, 0.3, color=COLORS[kind]))
            ax.text(x, row[kind], label.replace("embed_tokens", "emb").replace("lm_head", "head"),
                    ha="center", va="center", fontsize=6, color="white")
        x += 1
    ax.set_ylim(1.5, -0.65)
    ax.set_yticks([0, 0.5, 1], ["forward", "loss /\noptimizer", "backward"])
    ax.set_title(f"{title}: " + ", ".join(f"{n} {k}s" for k, n in ops.items()) + " over tp (size in KiB)",
                 fontsize=9)
    dedupe_legend(ax, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
axes[1].set_xlabel("event number on rank 0 (issue order, not time)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Counted against the formula
# Per micro-batch, with x = B·T·D floats (16 KiB here) and L layers. Without `--sp`: forward
# 1 all-reduce in the embedding + 2 per layer, backward 1 (lm_head's input) + 2 per layer, all
# of x; the loss adds 2 small ones (B·T and 2·B·T floats). With `--sp` each all-reduce of x
# becomes a reduce-scatter (recorded bytes: its input, x) and an all-gather (its output, x),
# where the block needs them: the embedding reduce-scatters its output (backward: all-gather,
# recorded in the model's backward as the embedding has no backward span of its own), every
# block all-gathers its input and reduce-scatters its output (backward: the reverse), lm_head
# all-gathers its input; the norm gains' gradients add one all-reduce of (2L + 1)·D floats per
# step. `sent` is what a ring puts on the wire per rank: an all-reduce 2(n-1)/n of x, a
# reduce-scatter or an all-gather (n-1)/n each: the same bytes on the wire, with or without
# `--sp`.

# %%
def where(c):
    m = c.get("module") or ""
    return ("layer" if m.startswith("layers.") else m or c.get("phase") or "loss", c.get("phase") or "-")


L = len({s["module"] for s in of(recs, "span", phase="forward") if s.get("module", "").count(".") == 1})
x = B * T * D
AR, AG, RS = "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"
expect = {"tp2": {("embed_tokens", "forward", AR): x, ("layer", "forward", AR): 2 * L * x, ("loss", "-", AR): 3 * B * T,
                  ("lm_head", "backward", AR): x, ("layer", "backward", AR): 2 * L * x},
          "tp2_sp": {("embed_tokens", "forward", RS): x, ("layer", "forward", AG): 2 * L * x,
                     ("layer", "forward", RS): 2 * L * x, ("lm_head", "forward", AG): x, ("loss", "-", AR): 3 * B * T,
                     ("lm_head", "backward", RS): x, ("layer", "backward", AG): 2 * L * x,
                     ("layer", "backward", RS): 2 * L * x, ("model", "backward", AG): x,
                     ("optimizer", "optimizer", AR): (2 * L + 1) * D}}
SHORT = {AR: "AR", AG: "AG", RS: "RS", "embed_tokens": "emb", "lm_head": "head", "optimizer": "opt",
         "forward": "fwd", "backward": "bwd", "-": "", "optimizer_": ""}
fig, axes = plt.subplots(1, 2, figsize=(13, 3.4), sharey=True, gridspec_kw={"width_ratios": [5, 10]})
for ax, (title, rs) in zip(axes, (("tp2", recs), ("tp2_sp", recs_sp))):
    count = Counter()
    for c in of(rs, "comm", rank=ranks[0], step=step, dim="tp"):
        count[(*where(c), c["op"])] += c["bytes"] // 4
    assert count == expect[title], (title, count, expect[title])  # every collective, floats per micro-batch
    keys = sorted(count, key=lambda k: (k[1] != "forward", k[1], k[0], k[2]))
    ax.bar(range(len(keys)), [4 * count[k] / 1024 for k in keys], color=[MARK[k[2]][1] for k in keys])
    ax.scatter(range(len(keys)), [4 * expect[title][k] / 1024 for k in keys], color="black", marker="_", s=500,
               label="formula", zorder=3)
    ax.set_xticks(range(len(keys)), ["\n".join(SHORT.get(w, w) for w in (m, p if m != p else "", op))
                                     for m, p, op in keys], fontsize=7)
    ax.set_title(title.replace("tp2", "tp = 2").replace("_sp", ", --sp") + ", rank 0", fontsize=9)
axes[0].set_ylabel("KiB per micro-batch")
axes[0].legend(fontsize=8, loc="upper left")
fig.suptitle("bytes of every collective over tp, by place and op (AR all-reduce, AG all-gather, RS reduce-scatter)",
             fontsize=10)
plt.tight_layout()
plt.show()
for title, rs in (("tp2", recs), ("tp2_sp", recs_sp)):
    layer = [c for c in of(rs, "comm", rank=ranks[0], step=step, dim="tp")
             if (c.get("module") or "").startswith("layers.")]
    print(f"{title:>7}: per layer and micro-batch {len(layer) // L} collectives, "
          f"{sum(c['sent'] for c in layer) // L:,} bytes sent by rank 0")

# %% [markdown]
# ## Activation memory per rank: what autograd keeps for backward
# `trace.py` counts every tensor autograd saves for backward (each storage once, the weights
# not counted) and notes in which module it was saved. Inside the blocks (attention and MLP)
# the tensors are split over tp; outside (the layer's own span: the norms and the residual
# stream) they are replicated, unless `--sp` splits them along the sequence. Bytes, so these do
# not depend on the machine.

# %%
def saved(rs, rank):
    (m,) = of(rs, "mem", rank=rank, step=step)
    out = Counter()
    for module, n in m["saved_by_module"].items():
        kind = ("inside the blocks" if module.endswith(("self_attn", "mlp")) else
                "outside the blocks" if module.startswith("layers.") else "embedding, head, loss")
        out[kind] += n
    return out, m["saved_peak"]


KINDS = {"outside the blocks": "tab:purple", "inside the blocks": "tab:blue", "embedding, head, loss": "tab:gray"}
cols = [("tp = 1", recs_tp1, 0)] + [(f"tp = 2{sp}\nrank {r}", rs, r) for sp, rs in (("", recs), (", --sp", recs_sp))
                                     for r in ranks]
fig, ax = plt.subplots(figsize=(9, 3.6))
for i, (label, rs, rank) in enumerate(cols):
    by, peak = saved(rs, rank)
    bottom = 0
    for kind, color in KINDS.items():
        ax.bar(i, by[kind] / 1024, bottom=bottom / 1024, color=color, label=kind, edgecolor="white")
        if by[kind] > 0:
            ax.text(i, (bottom + by[kind] / 2) / 1024, f"{by[kind] / 1024:.0f}", ha="center", va="center",
                    fontsize=7, color="white")
        bottom += by[kind]
ax.set_xticks(range(len(cols)), [c[0] for c in cols], fontsize=8)
ax.set_ylabel("KiB saved for backward in one step")
ax.set_title("activation bytes per rank, tiny model, B = 2, T = 32 (bytes: the same on any machine)", fontsize=9)
dedupe_legend(ax, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
plt.tight_layout()
save(fig, "03_tp_sp_memory")
plt.show()
for label, rs, rank in cols:
    by, peak = saved(rs, rank)
    print(f"{label.replace(chr(10), ' '):>22}: " + ", ".join(f"{k} {v:,} B" for k, v in by.items())
          + f"; peak {peak:,} B")

# %% [markdown]
# ## What to notice
# - Forward: one all-reduce at the end of each block (after `o_proj` and after `down_proj`):
#   a row-parallel linear's output is a partial sum over its input shards. Nothing moves
#   between the column-parallel and the row-parallel linear: attention heads and SwiGLU are
#   computed locally.
# - Backward: the mirror image. The all-reduce sits at the block's input (the gradient of x is
#   a partial sum because q, k, v, gate and up each saw the whole x), so in the trace it comes
#   right after the block's own backward, still inside the layer.
# - All of them carry the full activation (B, T, D), whatever tp is: tensor parallelism adds
#   4 collectives per layer per micro-batch on the critical path (nothing overlaps them), which
#   is why it is kept inside a node with fast links.
# - The raw wall clock makes the all-reduces look like most of the layer. On this machine that
#   is mostly waiting: for a core and for the other rank to arrive. The compute measured as CPU
#   time, and the bytes, are what carries over to a real machine: there an all-reduce of x takes
#   about 2(n-1)/n·x / link bandwidth.
# - `--sp` replaces each all-reduce by a reduce-scatter and an all-gather (a ring all-reduce
#   is exactly that), so the bytes on the wire do not change; what changes is memory: the
#   tensors saved outside the blocks are split over tp, and inside the blocks nothing changes.
# - The loss never gathers the (B, T, V) logits: only per-token maxima and sums travel.
