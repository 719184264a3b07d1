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
# group, which of them cross a node boundary, and in one training step how many bytes does
# each dimension move, for a tiny model here and for a real one on 8 and 16 GPUs?
#
# Part 1 is pure arithmetic on a 16-rank layout dp = pp = cp = tp = 2 (two nodes of 8 GPUs).
# Part 2 reads traces of `step07_4d_combined` on 8 CPU ranks in two layouts, dp=2 x pp=2 x tp=2
# (with tied embeddings) and pp=2 x cp=2 x tp=2, checks formulas for the bytes of every
# collective against them, and applies the formulas to smollm-1.7b and llama2-7b.

# %%
RERECORD = False  # True: rerun step07 twice on 8 processes (~1-2 min on 2 cores) and overwrite traces/06_4d_*.json

# %%
import json
from collections import defaultdict
from math import prod
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import torch

from nbtools import COLORS, TINY, TRACES, preset, read_json, record, save, step_dir, step_module

# %% [markdown]
# ## Part 1: the groups of a 16-rank layout
# A dimension's group = the ranks that differ from you only along that axis: fix the other
# three coordinates, vary this one. Two more groups matter: `cp_dp` (data parallelism over
# dp x cp: every rank holding the same weights, where gradients are averaged) and `mp` (the
# model-parallel ranks pp x tp that together hold one copy of the model: the grad-norm group).
# Each panel draws the 16 ranks as a grid (rows: the dp and pp coordinates, columns: cp and tp)
# and colours the ranks of one group alike; the dashed boxes are the two nodes of 8 GPUs.

# %%
SIZES, GPUS_PER_NODE = {"dp": 2, "pp": 2, "cp": 2, "tp": 2}, 8


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
node = np.arange(world) // GPUS_PER_NODE
fig, axes = plt.subplots(2, 3, figsize=(12, 8.4))
palette = plt.get_cmap("tab10")
for ax, (name, axes_) in zip(axes.flat, GROUPS.items()):
    gs = groups_along(SIZES, *axes_)
    which = {r: i for i, g in enumerate(gs) for r in g}
    crossing = sum(len({node[r] for r in g}) > 1 for g in gs)
    for r in range(world):
        ax.add_patch(plt.Rectangle((col[r] - 0.45, row[r] - 0.45), 0.9, 0.9, color=palette(which[r] % 10)))
        ax.text(col[r], row[r] - 0.1, f"rank {r}", ha="center", va="center", fontsize=8, color="white")
        ax.text(col[r], row[r] + 0.22, f"group {which[r]}", ha="center", va="center", fontsize=6, color="white")
    for n in range(world // GPUS_PER_NODE):  # node boundaries: the rows holding its ranks
        rows = row[node == n]
        ax.add_patch(plt.Rectangle((-0.55, rows.min() - 0.55), col.max() + 1.1, rows.max() - rows.min() + 1.1,
                                   fill=False, ls="--", lw=1.5, ec="black"))
        ax.text(col.max() + 0.62, (rows.min() + rows.max()) / 2, f"node {n}", rotation=90, va="center", fontsize=8)
    ax.set_xlim(-0.7, col.max() + 0.9), ax.set_ylim(row.max() + 0.7, -0.7)
    ax.set_aspect("equal")
    ax.set_xticks(range(col.max() + 1), [f"cp {c // SIZES['tp']}\ntp {c % SIZES['tp']}" for c in range(col.max() + 1)],
                  fontsize=7)
    ax.set_yticks(range(row.max() + 1), [f"dp {r // SIZES['pp']}, pp {r % SIZES['pp']}" for r in range(row.max() + 1)],
                  fontsize=7)
    where = "inside a node" if crossing == 0 else f"{crossing} of them cross nodes"
    ax.set_title(f"{name}: {len(gs)} groups of {len(gs[0])}; {where}", fontsize=9)
plt.suptitle(f"dp = pp = cp = tp = 2 on 2 nodes of {GPUS_PER_NODE} GPUs: same colour = same group", fontsize=10)
plt.tight_layout()
save(fig, "06_mesh_groups")
plt.show()
for name, axes_ in GROUPS.items():
    print(f"{name:>6}: {groups_along(SIZES, *axes_)}")

# %% [markdown]
# ## Part 2: bytes per dimension in one step of step07 (8 ranks)
# Tiny model (2 layers), micro-batch 2 x 32 tokens, 2 micro-batches per step, bf16 autocast
# (as on a GPU); the second step of each run. Each record of the trace names the group of its
# collective (`dim`); we add up the bytes per rank and dimension (`bytes`: the tensor; `sent`:
# what a ring algorithm puts on the wire from this rank). The shipped files hold only these sums.

# %%
LAYOUTS = {"dp2_pp2_tp2": ["--dp", 2, "--pp", 2, "--tp", 2, "--tie-word-embeddings", 1],
           "pp2_cp2_tp2": ["--pp", 2, "--cp", 2, "--tp", 2]}
B, T, M, LAYERS = 2, 32, 2, 2  # the traces' micro-batch, sequence length, micro-batches, layers


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
                      [*TINY, "--dtype", "bfloat16", "--max-steps", 2, "--grad-acc-steps", M, *layout],
                      keep=lambda r: r.get("step") == 1 and r["ev"] == "comm")
        (TRACES / f"06_4d_{name}.json").write_text(json.dumps(summarize(recs)))
        (TRACES / f"06_4d_{name}.jsonl").unlink()
runs = {name: read_json(TRACES / f"06_4d_{name}.json") for name in LAYOUTS}
print("traces:", list(runs))

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
DIM_COLORS = dict(COLORS, pp_embed="thistle")
fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 3.6), squeeze=False)
for ax, (name, run) in zip(axes[0], runs.items()):
    ranks = sorted(m["rank"] for m in run["meta"])
    dims = sorted({d for _, d, *_ in run["sums"]}, key=list(DIM_COLORS).index)
    bottom = np.zeros(len(ranks))
    for d in dims:
        v = np.array([sum(s[5] for s in run["sums"] if s[0] == r and s[1] == d) for r in ranks]) / 1e3
        ax.bar(ranks, v, bottom=bottom, color=DIM_COLORS[d], label=d, edgecolor="white")
        bottom += v
    ax.set_xticks(ranks)
    ax.set_xlabel("global rank")
    ax.set_ylabel("kB sent in one step (ring estimate)")
    ax.set_title(name.replace("_", " x "), fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The bytes of one step, as formulas, checked against the traces
# Per rank of pipeline stage s (L_s layers), with n = B·T/cp tokens per micro-batch on the
# rank, m micro-batches, a = bytes of the autocast dtype (bf16: 2) and float32 = 4:
# - **tp** (per micro-batch): forward 2 all-reduces per layer of n·D·a (the row-parallel
#   outputs are bf16 under autocast) and, on the first stage, 1 of n·D·4 (the embedding is not
#   autocast); backward 2 per layer of n·D·4 (the gradient of each block's float32 input) and,
#   on the last stage, 1 of n·D·4 (lm_head's input) and the loss's 2 of n·4 and 2n·4.
# - **cp** (per layer and micro-batch): forward cp - 1 sends of k and v, 2·B·(Hkv/tp)·(T/cp)·hd·a;
#   backward cp - 1 such sends and cp sends of their gradients in float32 (4 instead of a).
# - **pp** (per micro-batch): the activations (B, T/cp, D) in float32 forward to the next stage,
#   their gradient back; with tied embeddings the first and the last stage all-reduce the
#   embedding's gradient, (V/tp)·D·4, once per step (the trace names that group `pp_embed`).
# - **dp** (over dp x cp, `cp_dp`): the gradients, 4 bytes x this rank's parameters, once per
#   step; and the logged loss, 4 bytes. **mp** (pp x tp): the squared grad norm, 4 bytes.
# - once per run (in the last step): an all-gather over pp of every stage's peak, 8 bytes each.
#
# `sent` applies the ring factors: all-reduce 2(n-1)/n, all-gather (n-1)/n, send 1, receive 0.
# The formulas reproduce every (rank, group, op) sum of both traces, bytes and `sent` alike.

# %%
memory = step_module("step07_4d_combined", "memory")  # param_counts: the parameters one rank holds


def model_config(name, **override):
    c = dict(preset(name), **override)  # data/models/NAME/config.json
    return SimpleNamespace(**c, head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                           attention_bias=False, mlp_bias=False)


def ring(op, n):
    return {"all_reduce": 2 * (n - 1) / n, "isend": 1, "irecv": 0}.get(op, (n - 1) / n)


def step_comm(cfg, dp, pp, cp, tp, B, T, m, stage, a, run_end=False):
    """{(dim, op): (bytes, sent)} one rank of `stage` moves in one optimizer step."""
    D, V, hd, kv = cfg.hidden_size, cfg.vocab_size, cfg.head_dim, cfg.num_key_value_heads // tp
    Ls, first, last = memory.stage_layer_count(cfg.num_hidden_layers, pp, stage), stage == 0, stage == pp - 1
    n, f = B * T // cp, 4
    cp_dp = "_".join(a_ for a_, k in (("cp", cp), ("dp", dp)) if k > 1) or "dp"
    items = []  # (dim, op, count, bytes each, group size)
    if tp > 1:
        items += [("tp", "all_reduce", m * 2 * Ls, n * D * a, tp), ("tp", "all_reduce", m * 2 * Ls, n * D * f, tp)]
        items += [("tp", "all_reduce", m, n * D * f, tp)] if first else []
        items += [("tp", "all_reduce", m, n * D * f, tp), ("tp", "all_reduce", m, n * f, tp),
                  ("tp", "all_reduce", m, 2 * n * f, tp)] if last else []
    if cp > 1:
        hop = 2 * B * kv * (T // cp) * hd
        for op in ("isend", "irecv"):
            items += [("cp", op, m * Ls * 2 * (cp - 1), hop * a, cp), ("cp", op, m * Ls * cp, hop * f, cp)]
    if pp > 1:
        hops = (not first) + (not last)  # boundaries this stage talks across
        items += [("pp", op, m * hops, n * D * f, pp) for op in ("isend", "irecv")]
        if cfg.tie_word_embeddings and (first or last):
            items += [("pp_embed", "all_reduce", 1, V // tp * D * f, 2)]
        if run_end:
            items += [("pp", "all_gather_into_tensor", 1, 8 * pp, pp)]
    if dp * cp > 1:
        items += [(cp_dp, "all_reduce", 1, 4 * memory.param_counts(cfg, tp, pp, stage)[0], dp * cp)]
    items += [(cp_dp, "all_reduce", 1, 4, dp * cp)]  # the logged loss
    items += [("mp", "all_reduce", 1, 4, pp * tp)] if pp * tp > 1 else []
    out = defaultdict(lambda: [0, 0])
    for dim, op, count, each, size in items:
        out[(dim, op)][0] += count * each
        out[(dim, op)][1] += count * int(ring(op, size) * each)
    return {k: tuple(v) for k, v in out.items()}


tiny = {"dp2_pp2_tp2": model_config("tiny", tie_word_embeddings=True), "pp2_cp2_tp2": model_config("tiny")}
for name, run in runs.items():
    traced = defaultdict(dict)
    for rank, dim, op, count, nbytes, sent in run["sums"]:
        traced[rank][(dim, op)] = (nbytes, sent)
    for m_ in run["meta"]:
        c = m_["coords"]
        want = step_comm(tiny[name], c["dp_size"], c["pp_size"], c["cp_size"], c["tp_size"], B, T, M, c["pp_rank"],
                         a=2, run_end=True)
        assert want == traced[m_["rank"]], (name, m_["rank"], want, dict(traced[m_["rank"]]))
    print(f"{name}: the formulas give every rank's bytes and sent per group and op exactly")

# %% [markdown]
# ## At a real size: smollm-1.7b on 8 and 16 GPUs, llama2-7b on 16
# The same formulas with the course's shipped configs (`step07_4d_combined/configs/`):
# smollm-1.7b with dp 2 x pp 2 x tp 2, sequences of 2048 tokens, micro-batches of 4, 8 per
# step; the same run on 16 GPUs with dp 4 and 4 micro-batches per step (the same global batch);
# llama2-7b with dp 2 x pp 2 x cp 2 x tp 2, 4096 tokens, micro-batches of 1, 16 per step.
# bf16 autocast; per rank and step, what a ring puts on the wire (`sent`), for the first and
# the last pipeline stage.

# %%
REAL = [("8gpu_smollm-1.7b", "8 GPUs", {}), ("8gpu_smollm-1.7b", "16 GPUs", {"dp": 4, "grad_acc_steps": 4}),
        ("16gpu_llama2-7b", "16 GPUs", {})]  # (config, GPUs, what changes)
NAMES = {"tp": "tp", "cp": "cp", "pp": "pp", "pp_embed": "pp: tied embedding", "dp": "dp (gradients)",
         "cp_dp": "cp x dp (gradients)", "mp": "mp (grad norm)"}
fig, axes = plt.subplots(1, len(REAL), figsize=(17, 3.8))
table = []
for ax, (config, gpus, change) in zip(axes, REAL):
    raw = read_json(step_dir("step07_4d_combined") / "configs" / f"{config}.json")
    lay = {k: change.get(k, raw["distributed"].get(k, 1)) for k in ("dp", "pp", "cp", "tp")}
    tr = dict(raw["training"], **{k: v for k, v in change.items() if k in raw["training"]})
    config = f"{raw['model']['model']}, {gpus}"
    cfg = model_config(raw["model"]["model"])
    per_stage = {s: step_comm(cfg, lay["dp"], lay["pp"], lay["cp"], lay["tp"], tr["micro_batch_size"], tr["seq_len"],
                              tr["grad_acc_steps"], s, a=2) for s in range(lay["pp"])}
    for j, (stage, comm) in enumerate(per_stage.items()):
        bottom = 0
        total = sum(sent for _, sent in comm.values())
        for d in NAMES:
            v = sum(sent for (dim, _), (_, sent) in comm.items() if dim == d)
            if v:
                ax.bar(j, v / 1e9, bottom=bottom / 1e9, color=DIM_COLORS[d], label=NAMES[d], edgecolor="white",
                       width=0.6)
                if v > 0.04 * total:  # the small ones are in the printout below
                    ax.text(j, (bottom + v / 2) / 1e9, f"{d} {v / 1e9:.1f}", ha="center", va="center", fontsize=8,
                            color="white")
                bottom += v
                table.append((config, stage, d, v))
    ax.set_xticks(range(lay["pp"]), [f"stage {s}" for s in range(lay["pp"])])
    ax.set_ylabel("GB sent per rank in one step")
    ax.set_title(f"{raw['model']['model']} on {gpus}: " + " x ".join(f"{k} {v}" for k, v in lay.items()) +
                 f"\nT = {tr['seq_len']}, {tr['grad_acc_steps']} micro-batches of {tr['micro_batch_size']}, bf16",
                 fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=7, loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
plt.tight_layout()
save(fig, "06_bytes_real_size")
plt.show()
for config, stage, d, v in table:
    print(f"{config:>22} stage {stage}: {NAMES[d]:>20} " + (f"{v / 1e9:7.3f} GB" if v > 1e6 else f"{v:7,} B") +
          " sent per step")

# %% [markdown]
# ## What to notice
# - tp groups are consecutive ranks (tp varies fastest): they talk most often (4 collectives
#   per layer per micro-batch), so they sit inside one node. dp groups are the farthest apart
#   and the only ones here that cross the node boundary: their one all-reduce per step
#   tolerates slower links. With 8 GPUs a node, tp x cp x pp = 8 fit in one node.
# - `cp_dp` is where gradients are averaged: each cp rank saw only its own tokens, so for
#   gradients cp acts like more data parallelism. With cp = 1 it is just the dp group.
# - At real size tp moves the most bytes: the full activations of every layer and
#   micro-batch, several GB per step per rank, which is why it must stay on NVLink. The
#   gradient all-reduce moves 4 bytes x the rank's parameters (1/(tp x pp) of the model) once
#   per step; pp moves one activation per micro-batch and stage boundary; cp moves only the
#   k/v heads, which with llama2-7b's 32 kv heads is not much less than tp.
# - smollm-1.7b on 16 GPUs instead of 8 (dp 4, half the micro-batches per rank): tp and pp
#   bytes per rank halve with the micro-batches, while the gradient all-reduce grows from
#   2 x 1/2 to 2 x 3/4 of the rank's gradient bytes (a ring sends 2 (N - 1)/N of them): more
#   data parallelism costs each rank a little more, never less.
# - On the tiny model the weights are small, so there the gradient all-reduce dominates: sizes
#   change which dimension costs most, the formulas do not.
