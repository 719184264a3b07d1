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
# # 07 · Memory per rank: predicted, and measured
#
# **Question.** Every dimension of the course exists because something runs out of memory. Where
# do a rank's bytes go (weights, gradients, the gradient buckets, AdamW's state, activations),
# how does each layout (dp, tp, tp with sp, pp, cp) and each trick (`--recompute`, `--zero 1`)
# change them, what do AFAB and 1F1B hold in bytes rather than in micro-batches, and does
# `step07_4d_combined/memory.py`'s arithmetic agree with what a run holds?
#
# Part 1 runs step07 with `--memory-report` on the tiny model (CPU, float32) in ten layouts: in
# its first step every rank counts what it holds beside memory.py's prediction. Part 2 is AFAB
# against 1F1B per stage, measured on 4 stages and predicted at real size. Part 3 is memory.py
# alone (no launch) for smollm-1.7b on 8 GPUs and llama2-7b on 16, against an 80 GiB GPU.

# %%
RERECORD = False  # True: rerun step07 in 10 layouts on 1-8 processes (~2 min on 2 cores): traces/07_memory.json

# %%
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np

from nbtools import TINY, TRACES, preset, read_json, save, step_dir, step_module, torchrun

memory = step_module("step07_4d_combined", "memory")  # predict, activation_bytes, in_flight, describe
MIB, GIB = 2**20, 2**30
PARTS = {"weights": "tab:blue", "gradients": "tab:green", "buckets": "tab:olive", "optimizer": "tab:purple",
         "activations": "tab:orange", "transient": "tab:red"}
UNMEASURED = ("buckets", "transient")  # --memory-report does not count these: predicted only


def model_config(name, **override):
    c = {"attention_bias": False, "mlp_bias": False, **preset(name), **override}  # data/models/NAME/config.json
    c["head_dim"] = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return SimpleNamespace(**c)


def real_size_axes(fig, ax, ticks, labels, title, name):
    """Finish a predicted-peak-at-real-size chart: the 80 GiB line, labels, legend; save it as NAME."""
    ax.axhline(80, color="black", ls="--", lw=1, label="80 GiB GPU")
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_ylabel("GiB per rank, predicted peak")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plt.tight_layout()
    save(fig, name)
    plt.show()


# %% [markdown]
# ## Part 1: the tiny model, measured beside the prediction
# The tiny preset widened to 4 layers (D = 64, vocab 1024), micro-batches of 2 x 64 tokens, 8
# micro-batches per step, float32 on CPU. `--memory-report` makes step 0's log line carry, per
# rank, what it holds: the parameters' bytes, `p.grad`'s bytes before the optimizer step,
# AdamW's state after it, and the peak of what autograd saved for backward (a saved-tensors
# hook: each storage once, parameters not counted), each next to `memory.predict` for that
# rank. Buckets (DataParallel's flat gradient buffers) and the transients (logits, the loss's
# float32 copy, the layer being recomputed) are predicted only: nothing measures them.
#
# train.py logs from its last rank only; to read every rank, the launch runs train.py through a
# four-line wrapper that gives each rank its own `--log-file` (train.py itself is unchanged).

# %%
M = 8  # micro-batches per step
FLAGS = [*TINY, "--seq-len", 64, "--num-layers", 4, "--grad-acc-steps", M, "--max-steps", 1, "--memory-report"]
LAYOUTS = {  # name: (processes, layout flags)
    "1 rank": (1, []), "recompute": (1, ["--recompute"]), "dp2": (2, ["--dp", 2]),
    "dp2 zero 1": (2, ["--dp", 2, "--zero", 1]), "tp2": (2, ["--tp", 2]), "tp2 sp": (2, ["--tp", 2, "--sp"]),
    "cp2": (2, ["--cp", 2]), "pp4 afab": (4, ["--pp", 4, "--pp-engine", "afab"]), "pp4 1f1b": (4, ["--pp", 4]),
    "dp2 pp2 tp2 sp recompute zero 1": (8, ["--dp", 2, "--pp", 2, "--tp", 2, "--sp", "--recompute", "--zero", 1]),
}
EVERY_RANK_LOGS = """import os, runpy, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
import utils  # step07's: train.py's `from utils import Metrics` then finds this subclass
class EveryRank(utils.Metrics):
    def __init__(self, path, enabled=True):
        super().__init__(f"{path}.rank{os.environ['RANK']}", enabled=True)
utils.Metrics = EveryRank
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
KEEP = ("act_bytes_measured", "weight_bytes_measured", "grad_bytes_measured", "optimizer_bytes_measured")

if RERECORD:
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "every_rank_logs.py").write_text(EVERY_RANK_LOGS)
        for name, (nproc, layout) in LAYOUTS.items():
            log = Path(tmp) / name.replace(" ", "_")
            torchrun(Path(tmp) / "every_rank_logs.py", nproc, [step_dir("step07_4d_combined") / "train.py",
                                                               *FLAGS, *layout, "--log-file", log])
            steps = [json.loads(Path(f"{log}.rank{r}").read_text().splitlines()[0]) for r in range(nproc)]
            runs[name] = [{k: v for k, v in s.items() if k in KEEP or k.startswith("predicted_")} for s in steps]
    (TRACES / "07_memory.json").write_text(json.dumps({"flags": list(map(str, FLAGS)), "runs": runs}, indent=0))
shipped = read_json(TRACES / "07_memory.json")
assert shipped["flags"] == list(map(str, FLAGS)) and list(shipped["runs"]) == list(LAYOUTS), "RERECORD = True"
print(f"{len(shipped['runs'])} layouts, {sum(map(len, shipped['runs'].values()))} ranks")

# %%
TINY_CFG = model_config("tiny", num_hidden_layers=4)


def layout_of(flags):
    f = [str(x) for x in flags]
    size = {d: int(f[f.index(f"--{d}") + 1]) if f"--{d}" in f else 1 for d in ("dp", "pp", "cp", "tp")}
    return size, dict(sp="--sp" in f, recompute="--recompute" in f, zero=int("--zero" in f),
                      schedule="afab" if "afab" in f else "1f1b")


def rank_coords(rank, size):
    """rank -> (dp, pp, cp, tp) coordinates: the grid arange(world).view(dp, pp, cp, tp)."""
    return dict(zip(size, np.unravel_index(rank, tuple(size.values()))))


def predicted(name, rank):
    """memory.predict for one rank of a Part 1 run, as train.py's predict_run calls it."""
    size, opts = layout_of(LAYOUTS[name][1])
    c = rank_coords(rank, size)
    return memory.predict(TINY_CFG, B=2, T=64, grad_acc=M, **size, stage=int(c["pp"]), dtype="float32",
                          zero_rank=int(c["dp"] * size["cp"] + c["cp"]), **opts)


def measured(rec):
    return {"weights": rec["weight_bytes_measured"], "gradients": rec["grad_bytes_measured"],
            "optimizer": rec["optimizer_bytes_measured"], "activations": rec["act_bytes_measured"]}


stale = [(n, r) for n, recs in shipped["runs"].items() for r, rec in enumerate(recs)
         if any(rec[f"predicted_{k}"] != v for k, v in predicted(n, r).items())]
print("memory.py predicts what the recorded runs logged as their prediction:", not stale or f"no, {stale}")

# %%
def stacked(ax, x, parts, width, hatch_unmeasured=False):
    """One bar of MiB per part, stacked in PARTS' order; -> its top."""
    bottom = 0.0
    for part, color in PARTS.items():
        v = parts.get(part, 0) / MIB
        ax.bar(x, v, width, bottom=bottom, color=color, edgecolor="white",
               hatch="//" if hatch_unmeasured and part in UNMEASURED else None)
        bottom += v
    return bottom


BAR_LAYOUTS = [n for n in LAYOUTS if not n.startswith("pp4")]  # the pipelines are Part 2's
groups = [(n, r) for n in BAR_LAYOUTS for r, rec in enumerate(shipped["runs"][n])
          if all(v == 0 for d, v in rank_coords(r, layout_of(LAYOUTS[n][1])[0]).items() if d != "pp")]
fig, ax = plt.subplots(figsize=(13, 4.2))
for i, (name, rank) in enumerate(groups):
    for dx, text, parts in ((-0.2, "P", predicted(name, rank)), (0.2, "M", measured(shipped["runs"][name][rank]))):
        top = stacked(ax, i + dx, parts, 0.38, hatch_unmeasured=True)
        ax.text(i + dx, top, text, ha="center", va="bottom", fontsize=7)
ticks = [name.replace(" sp recompute zero 1", "\nsp recompute\nzero 1") + (f"\nstage {stage}" if "pp" in name else "")
         for name, rank in groups for stage in [rank_coords(rank, layout_of(LAYOUTS[name][1])[0])["pp"]]]
ax.set_xticks(range(len(groups)), ticks, fontsize=8)
ax.set_ylabel("MiB per rank")
ax.set_title("tiny model (4 layers, D = 64), 8 micro-batches of 2 x 64 tokens, float32: "
             "P = memory.py's prediction, M = measured (hatched: predicted only, not measured)", fontsize=9)
handles = [plt.Rectangle((0, 0), 1, 1, fc=c, ec="white", hatch="//" if p in UNMEASURED else None)
           for p, c in PARTS.items()]
ax.legend(handles, [p + (" (predicted only)" if p in UNMEASURED else "") for p in PARTS], fontsize=8,
          loc="upper left", bbox_to_anchor=(1.0, 1.0))
plt.tight_layout()
save(fig, "07_measured_vs_predicted")
plt.show()

# %% [markdown]
# Measured / predicted, for every rank of every run (the smallest and the largest ratio over
# the ranks). Weights, gradients and AdamW's state are exact; activations are counted op by op
# and agree to a few percent.

# %%
ratios = {}
print(f"{'layout':>32} {'ranks':>5} | " + " | ".join(f"{k:>11}" for k in ("weights", "gradients", "optimizer",
                                                                          "activations")))
for name, recs in shipped["runs"].items():
    r = {k: [measured(rec)[k] / predicted(name, i)[k] for i, rec in enumerate(recs)] for k in measured(recs[0])}
    ratios[name] = r
    print(f"{name:>32} {len(recs):>5} | " + " | ".join(
        (f"{min(v):.3f}-{max(v):.3f}" if round(max(v), 3) != round(min(v), 3) else f"{min(v):.3f}").rjust(11)
        for v in r.values()))
worst = max(ratios, key=lambda n: max(abs(x - 1) for x in ratios[n]["activations"]))
print(f"largest activation error: {worst}, {max(abs(x - 1) for x in ratios[worst]['activations']):.1%}")

# %% [markdown]
# ## Part 2: AFAB against 1F1B, in bytes
# A stage keeps a micro-batch's activations from its forward to its backward. AFAB runs all m
# forwards first, so every stage holds m micro-batches; 1F1B starts backward as soon as it can,
# so stage s holds min(m, p - s) (`memory.in_flight`). Left: the tiny model on p = 4 stages with
# m = 8, what each stage held at its peak, measured and predicted. Right: the same schedules at
# real size with the shipped configs (bf16), each stage's whole predicted budget.

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1, 1.3]})
P = 4
for j, (engine, color) in enumerate((("afab", "tab:orange"), ("1f1b", "tab:blue"))):
    recs = shipped["runs"][f"pp4 {engine}"]
    x = np.arange(P) + 0.4 * j - 0.2
    axes[0].bar(x, [r["act_bytes_measured"] / MIB for r in recs], 0.38, color=color, label=f"{engine}, measured")
    axes[0].scatter(x, [predicted(f"pp4 {engine}", s)["activations"] / MIB for s in range(P)], marker="_", s=300,
                    color="black", zorder=3, label="predicted" if j else None)
    for s, r in enumerate(recs):
        axes[0].text(x[s], r["act_bytes_measured"] / MIB / 2, f"{r['predicted_in_flight']}", ha="center",
                     fontsize=8, color="white")
axes[0].set_xticks(range(P), [f"stage {s}" for s in range(P)])
axes[0].set_ylabel("MiB saved for backward, peak")
axes[0].set_title(f"tiny, p = {P}, m = {M}: activations held (white: micro-batches in flight)", fontsize=9)
axes[0].legend(fontsize=8, loc="upper left")
axes[0].set_ylim(0, 1.25 * max(r["act_bytes_measured"] for r in shipped["runs"]["pp4 afab"]) / MIB)

REAL = {"8gpu_smollm-1.7b": "8 GPUs", "16gpu_llama2-7b": "16 GPUs"}


def real_config(config):
    raw = read_json(step_dir("step07_4d_combined") / "configs" / f"{config}.json")
    size = {k: raw.get("distributed", {}).get(k, 1) for k in ("dp", "pp", "cp", "tp")}
    tr = raw["training"]
    base = dict(B=tr["micro_batch_size"], T=tr["seq_len"], grad_acc=tr["grad_acc_steps"], dtype="bfloat16")
    return raw["model"]["model"], size, base


pipeline, ax, x, ticks = {}, axes[1], 0, {}
for config, gpus in REAL.items():
    model, size, base = real_config(config)
    start = x
    for engine in ("afab", "1f1b"):
        for s in range(size["pp"]):
            p = pipeline[(model, engine, s)] = memory.predict(model_config(model), **base, **size, stage=s,
                                                              schedule=engine)
            bottom = 0
            for part, color in PARTS.items():
                ax.bar(x, p[part] / GIB, 0.8, bottom=bottom, color=color, edgecolor="white",
                       label=part if x == 0 else None)
                bottom += p[part] / GIB
            ax.text(x, bottom, f"{p['in_flight']}", ha="center", va="bottom", fontsize=8)
            ticks[x] = f"{engine}\nstage {s}"
            x += 1
    ax.text((start + x - 1) / 2, -0.2, f"{model} on {gpus}, m = {base['grad_acc']}", ha="center", va="top",
            transform=ax.get_xaxis_transform(), fontsize=8)
    x += 0.6
real_size_axes(fig, ax, list(ticks), list(ticks.values()),
               "at real size, bf16, shipped layouts (above each bar: micro-batches in flight)", "07_afab_1f1b")
for engine in ("afab", "1f1b"):  # one micro-batch of a stage: its activation_bytes (the last one has the loss)
    held = [r["act_bytes_measured"] for r in shipped["runs"][f"pp4 {engine}"]]
    one_mb = [memory.activation_bytes(TINY_CFG, 2, 64, pp=P, stage=s)["total"] for s in range(P)]
    print(f"tiny {engine}: MiB held per stage {[round(h / MIB, 2) for h in held]} = that stage's micro-batch x "
          f"{[round(h / b, 2) for h, b in zip(held, one_mb)]}")
for model in dict.fromkeys(m for m, _, _ in pipeline):
    for engine in ("afab", "1f1b"):
        ps = [v for (m, e, _), v in pipeline.items() if m == model and e == engine]
        print(f"{model} {engine}: activations {[round(p['activations'] / GIB, 1) for p in ps]} GiB, peak "
              f"{[round(p['peak'] / GIB, 1) for p in ps]} GiB per stage")

# %% [markdown]
# ## Part 3: at real size, predicted
# memory.py alone, no launch: the worst stage of each layout (the one with the largest peak),
# bf16 autocast, the shipped configs' sequence length, micro-batch and micro-batches per step.
# smollm-1.7b on 8 GPUs: pure data parallelism, then ZeRO-1 and recompute, then the shipped
# dp 2 x pp 2 x tp 2 and what sp, recompute and ZeRO-1 take off it. llama2-7b on 16 GPUs: the
# same from dp 16 to the shipped dp 2 x pp 2 x cp 2 x tp 2.

# %%
def variants(size):
    """label: (layout, options); the shipped layout's name is in the panel's title."""
    dp = {"dp": size["dp"] * size["pp"] * size["cp"] * size["tp"]}
    return {f"dp{dp['dp']}": (dp, {}), f"dp{dp['dp']}\nzero 1": (dp, dict(zero=1)),
            f"dp{dp['dp']}\nzero 1\nrecompute": (dp, dict(zero=1, recompute=True)),
            "shipped\nafab": (size, dict(schedule="afab")), "shipped\n1f1b": (size, {}),
            "shipped\n+ sp": (size, dict(sp=True)),
            "shipped\n+ sp\n+ recompute": (size, dict(sp=True, recompute=True)),
            "shipped\n+ sp\n+ recompute\n+ zero 1": (size, dict(sp=True, recompute=True, zero=1))}


def flat(label):
    return label.replace("\n", " ")


fig, axes = plt.subplots(1, len(REAL), figsize=(15, 4.6), sharey=True)
real = {}
for ax, (config, gpus) in zip(axes, REAL.items()):
    model, size, base = real_config(config)
    for i, (name, (lay, opts)) in enumerate(variants(size).items()):
        worst = max((memory.predict(model_config(model), **base, **lay, stage=s, **opts)
                     for s in range(lay.get("pp", 1))), key=lambda p: p["peak"])
        real[(model, name)] = worst
        bottom = 0
        for part, color in PARTS.items():
            ax.bar(i, worst[part] / GIB, 0.7, bottom=bottom, color=color, edgecolor="white",
                   label=part if i == 0 else None)
            bottom += worst[part] / GIB
        ax.text(i, bottom + 1, f"{bottom:.0f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(80, color="black", ls="--", lw=1, label="80 GiB GPU")
    ax.set_xticks(range(len(variants(size))), list(variants(size)), fontsize=7)
    shipped_layout = " x ".join(f"{k} {v}" for k, v in size.items() if v > 1)
    ax.set_title(f"{model} on {gpus}, shipped: {shipped_layout}, 1f1b\nT = {base['T']}, {base['grad_acc']} "
                 f"micro-batches of {base['B']}, bf16 (above each bar: peak GiB)", fontsize=9)
axes[0].set_ylabel("GiB per rank, predicted peak (worst stage)")
axes[0].set_ylim(0, 1.1 * max(p["peak"] for p in real.values()) / GIB)
axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
plt.tight_layout()
save(fig, "07_real_size")
plt.show()
for (model, name), p in real.items():
    verdict = "fits" if p["peak"] <= 80 * GIB else "does NOT fit"
    print(f"{model:>12} {flat(name):>34}: {memory.describe(p)} -> {verdict}")

# %% [markdown]
# ## Part 4: ZeRO 0, 1, 2 and 3
# Left: one rank of a dp 4 run (tiny widened to D = 128, 4 layers, float32), what it keeps of
# weights, gradients and AdamW's state, measured by `--memory-report` beside memory.py's
# prediction, and the transient peaks (the gradient bucket on the wire; with `--zero 3` the
# layers whole at once), recorded by `python notebooks/measure_zero.py --out
# notebooks/traces/07_zero.json`. Right: the same four levels at real size, predicted, for
# llama2-7b and llama3.1-8b on 8 GPUs of pure data parallelism (bf16, `--recompute`, T = 4096,
# 8 micro-batches of 1).

# %%
ZPARTS = {"weights": "tab:blue", "gradients": "tab:green", "optimizer": "tab:purple", "buckets": "tab:olive",
          "gathered": "tab:cyan", "activations": "tab:orange", "transient": "tab:red"}
zrec = read_json(TRACES / "07_zero.json")
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1.4]})
ax = axes[0]
for z, r in zrec["results"].items():
    peaks = {"buckets": r["peaks"]["bucket"] or 0, "gathered": r["peaks"]["gathered"] or 0}
    for dx, text, parts in ((-0.2, "P", {**r["predicted"], **peaks}), (0.2, "M", {**r["kept"], **peaks})):
        bottom = 0.0
        for part in ("weights", "gradients", "optimizer", "buckets", "gathered"):
            v = parts.get(part, 0) / MIB
            ax.bar(int(z) + dx, v, 0.38, bottom=bottom, color=ZPARTS[part], edgecolor="white",
                   hatch="//" if part in ("buckets", "gathered") else None, label=part if z == "3" and dx > 0 else None)
            bottom += v
        ax.text(int(z) + dx, bottom, text, ha="center", va="bottom", fontsize=7)
ax.set_xticks(range(4), [f"zero {z}" for z in range(4)])
ax.set_ylabel("MiB per rank")
ax.set_title(f"tiny D = {zrec['args']['hidden']}, dp {zrec['args']['dp']}: P predicted, M measured "
             "(hatched: peaks of what comes and goes)", fontsize=9)
ax.legend(fontsize=7)
ax, zreal = axes[1], {}
for j, model in enumerate(("llama2-7b", "llama3.1-8b")):
    for z in range(4):
        p = zreal[(model, z)] = memory.predict(model_config(model), B=1, T=4096, grad_acc=8, dp=8, zero=z,
                                               recompute=True, dtype="bfloat16")
        x, bottom = 5 * j + z, 0.0
        for part, color in ZPARTS.items():
            ax.bar(x, p.get(part, 0) / GIB, 0.8, bottom=bottom, color=color, edgecolor="white",
                   label=part if x == 0 else None)
            bottom += p.get(part, 0) / GIB
        ax.text(x, bottom + 1, f"{bottom:.0f}", ha="center", va="bottom", fontsize=8)
real_size_axes(fig, ax, [5 * j + z for j in range(2) for z in range(4)],
               [f"{m}\nzero {z}" for m in ("llama2-7b", "llama3.1-8b") for z in range(4)],
               "dp 8, bf16, --recompute, T = 4096, 8 micro-batches of 1 (above each bar: GiB)", "07_zero")
base0 = sum(zrec["results"]["0"]["kept"].values())
for z, r in zrec["results"].items():
    print(f"tiny dp 4 zero {z}: keeps {sum(r['kept'].values()) / base0:.1%} of zero 0's weights, gradients and "
          f"AdamW state (predicted exactly: {r['kept'] == r['predicted']}); sends {sum(r['sent'].values()):,.0f} "
          f"bytes per step over dp")
for (model, z), p in zreal.items():
    print(f"{model:>12} dp 8 zero {z}: {memory.describe(p)} -> {'fits' if p['peak'] <= 80 * GIB else 'does NOT fit'}")

# %% [markdown]
# ## The lesson, in numbers

# %%
runs = shipped["runs"]
one, rec, zero = runs["1 rank"][0], runs["recompute"][0], runs["dp2 zero 1"][0]
print(f"tiny: recompute keeps {rec['act_bytes_measured'] / one['act_bytes_measured']:.0%} of the activations "
      f"(measured); zero 1 on dp2 keeps {zero['optimizer_bytes_measured'] / one['optimizer_bytes_measured']:.0%}"
      " of AdamW's state")
for key in ("tp2", "tp2 sp", "cp2"):
    r = runs[key][0]
    print(f"tiny: {key} holds {r['act_bytes_measured'] / one['act_bytes_measured']:.0%} of one rank's activations, "
          f"{r['weight_bytes_measured'] / one['weight_bytes_measured']:.0%} of its weights")
for model in dict.fromkeys(m for m, _ in real):
    rows = {n: p for (m, n), p in real.items() if m == model}
    fits = [flat(n) for n, p in rows.items() if p["peak"] <= 80 * GIB]
    static = {n: p["weights"] + p["gradients"] + p["buckets"] + p["optimizer"] for n, p in rows.items()}
    first = next(iter(rows))
    print(f"{model}: {flat(first)} needs {rows[first]['peak'] / GIB:.0f} GiB per rank, {static[first] / GIB:.0f} of it "
          f"static (weights, gradients, buckets, AdamW); fits in 80 GiB: {', '.join(fits) or 'none'}")

# %% [markdown]
# ## What to notice
# - The prediction is the measurement: weights, gradients and AdamW's state to the byte in every
#   layout, activations to a few percent (the table in Part 1), for every rank. So memory.py can
#   be trusted where nothing can be measured here: at real size.
# - Each dimension divides something else. dp divides nothing by itself (every rank holds the
#   whole model, plus the buckets); `--zero 1` divides AdamW's state, the largest static part, by
#   dp x cp. tp divides the weights and the activations inside the blocks, but not the ones
#   between them (norms, residual stream): `--sp` divides those too. cp divides the activations
#   by splitting the sequence, pp divides the layers, weights and activations alike.
# - AFAB against 1F1B is a difference in bytes, not only in counts: AFAB holds m micro-batches on
#   every stage, 1F1B p - s, so its first stage holds p times one micro-batch and its last one
#   once. At real size that is the difference between fitting in 80 GiB and not (Part 2).
# - `--recompute` trades a forward per layer for nearly all of the activations: each layer keeps
#   only its input. With it, what is left is mostly static (weights, gradients, buckets, AdamW):
#   where ZeRO-1 and model parallelism take over.
# - ZeRO divides what dp alone leaves whole: `--zero 1` AdamW's state, `--zero 2` the gradients,
#   `--zero 3` the layers' weights, each by dp x cp (Part 4). The price of the last one is on the
#   wire: every layer is gathered twice per micro-batch, 1.5x plain data parallelism's bytes when
#   everything is sharded (less here: tiny's embedding and head stay whole).
# - Activations grow with the tokens of a micro-batch (B x T) and the micro-batches in flight;
#   the static part grows with the parameters per rank. The real-size panels read which one
#   dominates, and which layouts fit, from the printed numbers above.
