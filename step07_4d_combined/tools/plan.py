"""Which layout for model M on N GPUs: will it fit, how fast will it be? A planner that predicts
memory, step time and MFU of any 4D layout, and searches them.

    python step07_4d_combined/tools/plan.py --model llama3.1-8b --hardware h100-sxm --gpus 8 \\
        --seq-len 8192 --global-batch-size 16 --dp 8 --zero 3 --micro-batch-size 2 --json
    python step07_4d_combined/tools/plan.py --model llama3.1-405b --hardware h100-sxm --gpus 512 \\
        --seq-len 8192 --global-batch-size 512            # no layout flags: search, print the top 10
    python step07_4d_combined/tools/plan.py --calibrate   # measure this CPU: tools/hardware/cpu.json

Memory is memory.py's model of train.py (the one tests/test_memory.py checks against measured
bytes), extended with the ZeRO paper's bytes for --zero 2/3 (Rajbhandari et al. 2020, Sec. 5) and
Narayanan et al.'s in-flight micro-batches for the interleaved engine (2021, Sec. 2.2.2), so the
planner covers them whether or not the trainer has them yet.

The time model, per rank and optimizer step (m = micro-batches = gbs / (mbs x dp)):
  FLOPs      mfu.py's 6 N + 12 L (H hd) T per token, over tp x pp x cp ranks for one micro-batch;
             --recompute adds one more forward of the layers (2 of the 6).
  compute    FLOPs at the hardware's matmul rate: peak x matmul_fraction (measured on large
             GEMMs) x d / (d + 512) for a layer whose narrowest GEMM side on the rank is d (tiles
             and waves: small GEMMs do not fill the GPU; 512 is assumed, not fitted), plus the
             elementwise work as HBM traffic: each byte autograd saves (memory.py's count) moves
             EAGER_PASSES times in eager PyTorch, COMPILED_PASSES when --compile fuses the chains
             (counted op by op for model.py's layer), plus AdamW (28 bytes per local parameter,
             fused) and, on a CPU, a fixed cost per op launched (eager PyTorch's dispatch, measured).
  collective α-β: a ring all-reduce of S bytes over n ranks costs 2(n-1)(α + S/(n β)); an
             all-gather or reduce-scatter half of that; a point-to-point send α + S/β. β is the
             link of the slowest hop: NVLink when the group's ranks share a node (tp varies
             fastest, then cp, pp, dp: process_group_manager.py), the network otherwise. These are
             the ring volumes notebook 06 checks against traces.
  overlap    dp: the bucketed all-reduce (ZeRO-1: reduce-scatter + all-gather) overlaps the last
             micro-batch's backward, all but the last bucket; ZeRO-2 reduce-scatters every
             micro-batch's gradients behind its backward; ZeRO-3's gathers overlap the previous
             layer's compute (only what exceeds it shows). cp: the ring's K/V passes overlap
             attention (what exceeds it shows). tp and pp sit on the critical path.
  bubble     afab and 1f1b: (pp - 1) micro-batch slots; interleaved: (pp - 1) / V of them
             (bubble fraction (pp - 1) / (m V), Narayanan et al. 2021).
  cores      on a CPU, ranks beyond the cores share them: compute and launches slow down by
             ranks / cores, and by the contention --calibrate measures when every core is busy
             (shared caches and memory, the other ranks' gloo threads).
A GPU's constants and their sources are in tools/hardware/NAME.json; cpu.json is measured here.
"""
import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

TOOLS = Path(__file__).resolve().parent
STEP = TOOLS.parent
sys.path.insert(0, str(STEP))
import memory  # noqa: E402  the trainer's own model of the bytes per rank
from mfu import flops_per_token  # noqa: E402

MODELS = STEP.parent / "data" / "models"
HARDWARE = TOOLS / "hardware"
GIB = 2**30
EAGER_PASSES, COMPILED_PASSES = 9, 3  # HBM passes per saved activation byte (module docstring)
GEMM_KNEE = 512  # d / (d + 512): the rate of a GEMM whose narrowest side is d, against a large one
ADAMW_BYTES = 28  # fused AdamW reads p, g, m, v and writes p, m, v: 7 x 4 bytes per parameter
ENGINES = ("afab", "1f1b", "interleaved")


# ------------------------------------------------------------------ inputs
def load_model(spec):
    """A preset name, a path to a Hugging Face config.json (or its folder), or a dict of its keys."""
    if isinstance(spec, dict):
        c = dict(spec)
    else:
        path = MODELS / spec / "config.json" if (MODELS / spec / "config.json").is_file() else Path(spec)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            presets = sorted(p.name for p in MODELS.iterdir() if (p / "config.json").is_file())
            sys.exit(f"error: --model {spec} is neither a preset ({', '.join(presets)}) nor a config.json")
        c = json.loads(path.read_text())
    c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
    c.setdefault("num_key_value_heads", c["num_attention_heads"])
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        c[key] = bool(c.get(key, False))
    return SimpleNamespace(**c)


def load_hardware(name):
    path = HARDWARE / f"{name}.json" if not name.endswith(".json") else Path(name)
    if not path.is_file():
        known = sorted(p.stem for p in HARDWARE.glob("*.json"))
        hint = " (run plan.py --calibrate first)" if name == "cpu" else ""
        sys.exit(f"error: --hardware {name}: no such file; known: {', '.join(known)}{hint}")
    return json.loads(path.read_text())


# ------------------------------------------------------------------ layouts
def layout_error(cfg, lay, gpus, gbs, T):
    """Why a layout cannot run (one line), or None. The rules train.py and its checks apply."""
    if lay.dp * lay.tp * lay.pp * lay.cp != gpus:
        return f"dp x tp x pp x cp = {lay.dp * lay.tp * lay.pp * lay.cp}, not --gpus {gpus}"
    if gbs % (lay.mbs * lay.dp):
        return f"--global-batch-size {gbs} is not a multiple of micro-batch {lay.mbs} x dp {lay.dp}"
    m = gbs // (lay.mbs * lay.dp)
    H, Hkv, L = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    if H % lay.tp or Hkv % lay.tp or cfg.intermediate_size % lay.tp:
        return f"tp {lay.tp} must divide the heads ({H}), kv heads ({Hkv}) and intermediate size"
    if lay.sp and lay.tp == 1:
        return "--sp needs tp > 1"
    if T % (2 * lay.cp):
        return f"seq-len {T} must be a multiple of 2 x cp = {2 * lay.cp} (ring attention's zig-zag)"
    if lay.pp > L:
        return f"pp {lay.pp} > {L} layers"
    if lay.zero and lay.dp * lay.cp == 1:
        return "--zero needs dp x cp > 1"
    if lay.engine == "interleaved":
        if lay.pp < 2 or lay.chunks < 2 or m % lay.pp or lay.pp * lay.chunks > L:
            return (f"interleaved needs pp >= 2, --pp-chunks >= 2, micro-batches ({m}) divisible by pp and "
                    f"pp x chunks <= {L} layers")
    elif lay.chunks != 1:
        return "--pp-chunks needs --pp-engine interleaved"
    return None


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg, gpus, gbs, T, fixed):
    """Every layout that divides the GPUs (the flags the user gave stay fixed)."""
    pick = lambda key, options: [fixed[key]] if fixed.get(key) is not None else options  # noqa: E731
    for tp, pp, cp in itertools.product(pick("tp", divisors(gpus)), pick("pp", divisors(gpus)),
                                        pick("cp", divisors(gpus))):
        if gpus % (tp * pp * cp):
            continue
        dp = gpus // (tp * pp * cp)
        if fixed.get("dp") not in (None, dp):
            continue
        engines = [("1f1b", 1)] if pp == 1 else [("afab", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 4)]
        if fixed.get("engine"):
            engines = [(e, v) for e, v in engines if e == fixed["engine"]] or [(fixed["engine"], fixed.get("chunks") or 2)]
        for (engine, chunks), zero, mbs, rc, sp in itertools.product(
                engines, pick("zero", [0, 1, 2, 3] if dp * cp > 1 else [0]), pick("mbs", [1, 2, 4, 8, 16]),
                pick("recompute", [False, True]), pick("sp", [tp > 1])):
            lay = SimpleNamespace(dp=dp, tp=tp, pp=pp, cp=cp, zero=zero, mbs=mbs, sp=sp, engine=engine,
                                  chunks=fixed.get("chunks") or chunks, recompute=rc, compile=fixed["compile"])
            if layout_error(cfg, lay, gpus, gbs, T) is None:
                yield lay


# ------------------------------------------------------------------ memory per rank
def in_flight_chunks(lay, m, stage):
    """Interleaved 1F1B: (chunk, micro-batch) activations rank `stage` holds at its peak."""
    p, V = lay.pp, lay.chunks
    return min(V * m, (V - 1) * p + 2 * (p - stage - 1) + 1)


_CACHE = {}


def _shape(cfg):
    """What decides the parameter counts (a key for _CACHE: configs come and go, their ids are reused)."""
    return tuple(getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size",
                                           "num_attention_heads", "num_key_value_heads", "head_dim",
                                           "tie_word_embeddings", "attention_bias", "mlp_bias"))


def layer_params(cfg, tp):
    """Elements of one decoder layer on one tp rank."""
    key = ("layer", _shape(cfg), tp)
    if key not in _CACHE:
        _CACHE[key] = sum(n for name, n in memory.stage_params(cfg, tp, cfg.num_hidden_layers, 0)
                          if name not in ("embed_tokens", "norm", "lm_head"))
    return _CACHE[key]


def param_counts(cfg, tp, pp, stage):
    """memory.param_counts, remembered: the search asks for the same stage many times."""
    key = ("stage", _shape(cfg), tp, pp, stage)
    if key not in _CACHE:
        _CACHE[key] = memory.param_counts(cfg, tp, pp, stage)
    return _CACHE[key]


def rank_memory(cfg, lay, T, m, dtype, stage, reserved_gib=0.0, bucket_mb=25.0, weights="fp32"):
    """Bytes one rank of pipeline stage `stage` holds at its peak, by kind (memory.py's terms).
    weights="fp32": train.py's float32 parameters (bf16 runs autocast them); "bf16": bf16 parameters
    with float32 master weights and gradient accumulation, as nanotron and Megatron-LM keep them."""
    n, tensors = param_counts(cfg, lay.tp, lay.pp, stage)
    W = lay.dp * lay.cp
    z = lay.zero if W > 1 else 0
    one_layer = 4 * layer_params(cfg, lay.tp)
    out = {"weights": 4 * n if z < 3 else 4 * n / W + 2 * one_layer,  # ZeRO-3: shard + this and next layer
           "gradients": 4 * n if z < 2 else 4 * n / W + one_layer}  # ZeRO-2/3: shard + a layer before its RS
    if W == 1:
        out["buckets"] = 0
    elif z == 0:
        out["buckets"] = 4 * n
    elif z == 1:
        out["buckets"] = 4 * n + 4 * n / W
    else:
        out["buckets"] = 2 * bucket_mb * 2**20  # two buckets in flight
    out["optimizer"] = (8 * n / W if z else 8 * n) + 4 * tensors
    act = memory.activation_bytes(cfg, lay.mbs, T, lay.tp, lay.cp, lay.pp, stage, lay.sp, dtype, lay.recompute)
    if lay.engine == "interleaved":
        k = in_flight_chunks(lay, m, stage)
        layers, micro = k / lay.chunks, min(m, k)  # layers' activations held, in units of the stage's
    else:
        layers = micro = memory.in_flight(lay.engine, lay.pp, stage, m)
    out["activations"] = layers * act["layers"] + micro * act["other"]
    if weights == "bf16":  # bf16 parameters: 2 bytes each, a float32 master copy beside AdamW's state,
        out["weights"] /= 2  # and no per-micro-batch autocast copy of each weight in the activations
        out["optimizer"] += 4 * n / W if z else 4 * n
        if dtype == "bfloat16" and not lay.recompute:
            L = memory.stage_layer_count(cfg.num_hidden_layers, lay.pp, stage)
            out["activations"] -= layers * L * 2 * layer_params(cfg, lay.tp)
    out["transient"] = act["transient"]
    out["reserved"] = reserved_gib * GIB
    out["peak"] = sum(out.values())
    return out


def exact_memory(cfg, lay, T, m, dtype, stage, reserved_gib=0.0, weights="fp32"):
    """memory.py's own prediction (ZeRO's buckets bucket by bucket, the interleaved schedule replayed):
    what train.py holds, where rank_memory is the closed form the search screens with."""
    W = lay.dp * lay.cp
    out = memory.predict(cfg, B=lay.mbs, T=T, grad_acc=m, dp=lay.dp, pp=lay.pp, cp=lay.cp, tp=lay.tp, stage=stage,
                         sp=lay.sp, dtype=dtype, recompute=lay.recompute, zero=lay.zero if W > 1 else 0,
                         schedule=lay.engine, chunks=lay.chunks)
    out = {k: v for k, v in out.items() if k not in ("peak", "in_flight")}
    if weights == "bf16":  # as rank_memory: 2-byte weights, a float32 master, no autocast copies
        n = param_counts(cfg, lay.tp, lay.pp, stage)[0]
        out["weights"] /= 2
        out["optimizer"] += 4 * n / W if lay.zero and W > 1 else 4 * n
        if dtype == "bfloat16" and not lay.recompute:
            L = memory.stage_layer_count(cfg.num_hidden_layers, lay.pp, stage)
            held = (out["activations"] / memory.activation_bytes(cfg, lay.mbs, T, lay.tp, lay.cp, lay.pp, stage,
                                                                 lay.sp, dtype)["total"])
            out["activations"] -= held * L * 2 * layer_params(cfg, lay.tp)
    out["reserved"] = reserved_gib * GIB
    out["peak"] = sum(v for k, v in out.items() if k != "chunks")
    out.pop("chunks", None)
    return out


# ------------------------------------------------------------------ time per step
def ring(n, nbytes, alpha, beta, kind="all_reduce"):
    """α-β seconds of a ring collective of `nbytes` (the full tensor) over n ranks."""
    if n == 1:
        return 0.0
    steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
    return steps * (alpha + nbytes / n / beta)


def link(hw, lay, axis, gpus_per_node):
    """(α seconds, β bytes/s) of a group along `axis`: NVLink if it fits in a node."""
    order = ["tp", "cp", "pp", "dp"]  # fastest-varying first
    sizes = {"tp": lay.tp, "cp": lay.cp, "pp": lay.pp, "dp": lay.dp}
    span = math.prod(sizes[a] for a in order[:order.index(axis) + 1])
    where = "intra_node" if span <= gpus_per_node else "inter_node"
    return hw[f"{where}_latency_us"] * 1e-6, hw[f"{where}_gbps"] * 1e9


def step_time(cfg, lay, T, m, hw, gpus_per_node, overlap=True):
    """Seconds of one optimizer step on the slowest rank, by where they go (overlap=False: dp's
    collectives wait for backward to end, as without buckets: what the overlap buys)."""
    cpu = hw.get("cores") is not None
    dtype = "float32" if cpu else "bfloat16"
    c = 4 if cpu else 2
    ranks_here = min(gpus_per_node, lay.dp * lay.tp * lay.pp * lay.cp)
    slow = 1.0
    if cpu:  # oversubscribed cores; and ranks that share the machine slow each other (calibrated)
        slow = max(1.0, ranks_here / hw["cores"]) * (hw.get("contention", 1.0) if ranks_here > 1 else 1.0)
    D, L = cfg.hidden_size, cfg.num_hidden_layers
    H, Hkv, hd, I = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    tokens = lay.mbs * T // lay.cp  # tokens of one micro-batch on a rank
    # compute: matmuls of one micro-batch, then the elementwise traffic, then AdamW
    flops = flops_per_token(cfg, T) * lay.mbs * T / (lay.tp * lay.pp * lay.cp)
    d = min(D, H * hd // lay.tp, Hkv * hd // lay.tp * max(1, H // Hkv), I // lay.tp, tokens)
    rate = hw["peak_tflops"] * 1e12 * hw["matmul_fraction"] * (d / (d + GEMM_KNEE) if not cpu else 1.0)
    act = memory.activation_bytes(cfg, lay.mbs, T, lay.tp, lay.cp, lay.pp, 0, lay.sp, dtype)
    passes = COMPILED_PASSES if lay.compile else EAGER_PASSES
    ew_bytes = passes * (act["per_layer"] * L / lay.pp + act["other"]) + 3 * act["transient"]
    bw = hw["hbm_gbps"] * 1e9
    ops = hw.get("ops_per_layer", 0) * L / lay.pp * 3 + hw.get("ops_per_micro_batch", 0)  # fwd + bwd ~ 3x fwd
    launch = ops * hw.get("op_overhead_us", 0) * 1e-6
    t_mb = (flops / rate + ew_bytes / bw + launch) * slow  # one micro-batch, forward + backward
    head = 6 * cfg.vocab_size * D
    layer_share = 1 - head / flops_per_token(cfg, T)  # recompute runs the layers' forward, not the head
    t_recompute = m * t_mb * layer_share / 3 if lay.recompute else 0.0
    n_local = param_counts(cfg, lay.tp, lay.pp, 0)[0]
    W = lay.dp * lay.cp
    t_opt = ADAMW_BYTES * n_local / (W if lay.zero and W > 1 else 1) / bw * slow
    compute = m * t_mb + t_opt

    # tp: 2 all-reduces per layer forward, 2 backward (or an all-gather + reduce-scatter pair each,
    # the same bytes with --sp), plus the embedding's and the head's; recompute runs the forward's again
    a, b = link(hw, lay, "tp", gpus_per_node)
    x = tokens * D * c
    per_layer = 4 + 2 * lay.recompute
    t_tp = m * (per_layer * L / lay.pp + 2) * ring(lay.tp, x, a, b) * slow if lay.tp > 1 else 0.0
    # pp: each micro-batch's activation forward and its gradient back, per chunk boundary
    a, b = link(hw, lay, "pp", gpus_per_node)
    hops = lay.chunks if lay.engine == "interleaved" else 1
    xp = x / lay.tp if lay.sp else x
    t_pp = 2 * m * hops * (a + xp / b) * slow if lay.pp > 1 else 0.0
    # cp: the ring passes K and V (cp - 1 steps) in forward, K, V and their gradients in backward,
    # behind attention: only what exceeds attention's time shows
    t_cp = 0.0
    if lay.cp > 1:
        a, b = link(hw, lay, "cp", gpus_per_node)
        kv = 2 * tokens * Hkv // lay.tp * hd * c
        comm = (lay.cp - 1) * 3 * (a + kv / b)  # fwd: kv; bwd: kv and dkv
        attn = 12 * H * hd * T * tokens / lay.tp / rate * slow  # this layer's attention matmuls
        t_cp = m * L / lay.pp * max(0.0, comm - attn) * (1 + lay.recompute / 3)
    # dp (with cp: the same replicas): float32 gradients, bucketed
    t_dp = 0.0
    if W > 1:
        a, b = link(hw, lay, "dp", gpus_per_node) if lay.dp > 1 else link(hw, lay, "cp", gpus_per_node)
        g = 4 * n_local
        bucket = min(g, 25 * 2**20)
        last = ring(W, bucket, a, b)
        backward = t_mb * 2 / 3 if overlap else 0.0
        if lay.zero <= 1:
            t_dp = max(last, ring(W, g, a, b) - backward)
        elif lay.zero == 2:
            rs = ring(W, g, a, b, "reduce_scatter")
            t_dp = m * max(ring(W, bucket, a, b, "reduce_scatter"), rs - backward) + ring(W, g, a, b, "all_gather")
        else:  # ZeRO-3: gather weights forward and backward, reduce-scatter gradients, per micro-batch
            per_layer_comm = 3 * ring(W, g / (L / lay.pp), a, b, "all_gather")
            hidden = t_mb / (L / lay.pp) if overlap else 0.0
            t_dp = m * (L / lay.pp) * max(0.0, per_layer_comm - hidden) + last
        t_dp *= slow
    # the bubble: pp - 1 slots of one micro-batch's work (/ V interleaved)
    slot = t_mb + (t_tp + t_pp) / m
    t_bubble = (lay.pp - 1) * slot / (lay.chunks if lay.engine == "interleaved" else 1) if lay.pp > 1 else 0.0
    return {"compute": compute, "recompute": t_recompute, "bubble": t_bubble,
            "dp": t_dp, "tp": t_tp, "pp": t_pp, "cp": t_cp}


# ------------------------------------------------------------------ one layout's prediction
def predict(cfg, lay, *, gpus, gpus_per_node, T, gbs, hw, weights="fp32", exact=True):
    """The planner's answer for one layout: the dict --json prints. exact=False: the closed-form
    memory (rank_memory), fast enough to screen thousands of layouts; True: memory.py's own."""
    m = gbs // (lay.mbs * lay.dp)
    cpu = hw.get("cores") is not None
    stages = sorted({0, lay.pp - 1})
    budget = exact_memory if exact else rank_memory
    mem = max((budget(cfg, lay, T, m, "float32" if cpu else "bfloat16", s, hw.get("reserved_gib", 0.0),
                      weights=weights)
               for s in stages), key=lambda r: r["peak"])
    t = step_time(cfg, lay, T, m, hw, gpus_per_node)
    step_s = sum(t.values())
    tokens = gbs * T
    mfu = flops_per_token(cfg, T) * tokens / (step_s * gpus * hw["peak_tflops"] * 1e12)
    exposed = {k: v for k, v in t.items() if k != "compute"}
    bottleneck = max(exposed, key=exposed.get) if max(exposed.values()) > 0.1 * t["compute"] else "compute"
    return {"layout": describe(lay, m), "memory_gib": round(mem["peak"] / GIB, 2),
            "memory": {k: round(v / GIB, 3) for k, v in mem.items() if k != "peak"},
            "fits": mem["peak"] <= hw["memory_gib"] * GIB, "step_s": step_s,
            "tokens_per_s_per_gpu": tokens / step_s / gpus, "mfu": mfu,
            "time": t, "bottleneck": bottleneck, "grad_acc_steps": m, "_layout": lay}


def describe(lay, m):
    parts = [f"dp{lay.dp}", f"tp{lay.tp}{'+sp' if lay.sp else ''}", f"pp{lay.pp}", f"cp{lay.cp}",
             f"zero{lay.zero}", f"mbs{lay.mbs}", f"gas{m}"]
    if lay.pp > 1:
        parts.append(lay.engine + (f"x{lay.chunks}" if lay.engine == "interleaved" else ""))
    return " ".join(parts + (["recompute"] if lay.recompute else []) + (["compile"] if lay.compile else []))


def table(results, hw):
    rows = [f"{'layout':<58} {'GiB':>6} {'step s':>8} {'tok/s/gpu':>10} {'MFU':>6}  "
            f"{'compute recomp bubble dp tp pp cp (s)':<44} bottleneck"]
    for r in results:
        t = r["time"]
        times = " ".join(f"{t[k]:.3g}" for k in ("compute", "recompute", "bubble", "dp", "tp", "pp", "cp"))
        fit = "" if r["fits"] else f" (> {hw['memory_gib']:g})"
        rows.append(f"{r['layout']:<58} {r['memory_gib']:>6.1f} {r['step_s']:>8.3g} "
                    f"{r['tokens_per_s_per_gpu']:>10.1f} {100 * r['mfu']:>5.1f}%  {times:<44} {r['bottleneck']}{fit}")
    return "\n".join(rows)


def search(cfg, fixed, top=10, **kw):
    """(every layout screened, the `top` fastest that fit by memory.py's exact bytes), or None.
    The closed form screens (within about 15% of memory.py), the exact one decides."""
    screened = [predict(cfg, lay, exact=False, **kw)
                for lay in candidate_layouts(cfg, kw["gpus"], kw["gbs"], kw["T"], fixed)]
    if not screened:
        return None
    cap = kw["hw"]["memory_gib"]
    maybe = sorted((r for r in screened if r["memory_gib"] <= 1.15 * cap), key=lambda r: -r["tokens_per_s_per_gpu"])
    fitting = []
    for r in maybe:
        exact = predict(cfg, r["_layout"], exact=True, **kw)
        if exact["fits"]:
            fitting.append(exact)
            if len(fitting) == top:
                break
    return screened, fitting


def public(r):
    """A prediction without the layout object (for --json)."""
    return {k: v for k, v in r.items() if not k.startswith("_")}


# ------------------------------------------------------------------ --calibrate: this CPU
def _allreduce_worker(rank, world, port, sizes, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    times = {}
    for n in sizes:
        x = torch.ones(n // 4)
        for _ in range(3):
            dist.all_reduce(x)
        calls = []
        for _ in range(100 if n < 2**20 else 10):
            t0 = time.perf_counter()
            dist.all_reduce(x)
            calls.append(time.perf_counter() - t0)
        times[n] = statistics.median(calls)  # a busy machine adds outliers, not a new typical call
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def _busy_worker(rank, barrier, out):
    """One rank's share of a busy machine: the same eager work as _eager_bench, all ranks at once."""
    import torch

    torch.set_num_threads(1)
    barrier.wait()
    out.put(_eager_bench())


def _eager_bench():
    """Seconds of a fixed mix of small eager ops (matmuls, adds): what a tiny model's rank does."""
    import torch

    a, b = torch.randn(64, 64), torch.randn(64, 64)
    for _ in range(200):
        a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(3000):
            c = a @ b
            c = c + 1.0
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate(path):
    """Measure this CPU as train.py uses it (one thread per rank, float32, gloo) -> hardware JSON."""
    import socket

    import torch
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    b = torch.randn(256, 256)
    for _ in range(5):
        a @ b
    gflops, reps = 0.0, 100
    for _ in range(5):  # the best of five: what the core does when nothing else runs
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        gflops = max(gflops, 2 * 256**3 * reps / (time.perf_counter() - t0) / 1e9)
    x = torch.randn(8 * 2**20)
    y = torch.empty_like(x)
    gbps = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            torch.add(x, 1.0, out=y)
        gbps = max(gbps, 2 * x.numel() * 4 * 10 / (time.perf_counter() - t0) / 1e9)  # read + write
    ops_layer, ops_mb, op_us = count_ops()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    small, big = 4096, 16 * 2**20
    mp.spawn(_allreduce_worker, args=(2, port, [small, big], q), nprocs=2, join=True)
    times = q.get()
    # ranks that share the machine slow each other down even with a core each (caches, memory,
    # the other processes' threads): the same work in `cores` processes at once against one alone
    alone = _eager_bench()
    busy = ctx.Queue()
    cores = os.cpu_count()
    mp.spawn(_busy_worker, args=(ctx.Barrier(cores), busy), nprocs=cores, join=True)
    contention = max(1.0, statistics.mean(busy.get() for _ in range(cores)) / alone)
    # two ranks: all_reduce = 2 (n - 1) = 2 steps of α + S/(2β)
    alpha = times[small] / 2
    beta = (big / 2) / max(times[big] / 2 - alpha, 1e-9)
    hw = {"name": f"this CPU ({os.cpu_count()} cores), one thread per rank, gloo", "peak_tflops": gflops / 1e3,
          "matmul_fraction": 1.0, "memory_gib": round(_mem_gib(), 1), "reserved_gib": 0.0,
          "hbm_gbps": round(gbps, 2), "intra_node_gbps": round(beta / 1e9, 3),
          "intra_node_latency_us": round(alpha * 1e6, 1), "inter_node_gbps": round(beta / 1e9, 3),
          "inter_node_latency_us": round(alpha * 1e6, 1), "cores": os.cpu_count(),
          "op_overhead_us": round(op_us, 2), "ops_per_layer": ops_layer, "ops_per_micro_batch": ops_mb,
          "contention": round(contention, 3),
          "sources": {"all": f"measured by plan.py --calibrate on {time.strftime('%Y-%m-%d')}: float32 256^3 "
                              "matmul, an 8M-float add, the tiny model's layer forward + backward over its ops, gloo all-reduce of 4 KiB and 16 MiB on 2 "
                              "ranks, the aten ops of one step07 decoder layer's forward, a mix of small ops in one process and in "
                              "one per core at once (contention)"}}
    path.write_text(json.dumps(hw, indent=2) + "\n")
    return hw


def _mem_gib():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError):
        return 16.0


def count_ops():
    """step07's model on this CPU: aten ops launched in forward per decoder layer and outside the
    layers, and the cost of one op as training runs it (forward + backward of a layer, timed, over
    its ops x 3: backward launches about twice the forward's)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from utils import base_parser, make_config
    import model as M

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    counts, seconds = [], []
    for layers in (1, 3):
        args = base_parser("count").parse_args(["--model", "tiny", "--num-layers", str(layers)])
        model = M.Llama(make_config(args))
        ids = torch.randint(0, 100, (2, 64))
        Count.n = 0
        with Count():
            model(ids)
        counts.append(Count.n)
        for _ in range(3):
            model(ids).float().sum().backward()
        runs = []
        for _ in range(7):
            t0 = time.perf_counter()
            model(ids).float().sum().backward()
            runs.append(time.perf_counter() - t0)
        seconds.append(statistics.median(runs))
    per_layer = (counts[1] - counts[0]) / 2
    op_us = (seconds[1] - seconds[0]) / 2 / (3 * per_layer) * 1e6
    return int(per_layer), int(counts[0] - per_layer), op_us


# ------------------------------------------------------------------ the command line
def parse(argv=None):
    p = argparse.ArgumentParser(description="predict memory, step time and MFU of 4D layouts")
    a = p.add_argument
    a("--calibrate", nargs="?", const=str(HARDWARE / "cpu.json"), default=None, metavar="FILE",
      help="measure this CPU into FILE (default tools/hardware/cpu.json) and exit")
    a("--model", default="llama3.1-8b", help="a preset of data/models/, or a path to a config.json")
    a("--hardware", default="h100-sxm", help="a file of tools/hardware/ (h100-sxm, h200, a100-80gb, cpu)")
    a("--gpus", type=int, default=8)
    a("--gpus-per-node", type=int, default=8)
    a("--seq-len", type=int, default=4096)
    a("--global-batch-size", type=int, default=None, help="sequences per optimizer step (default: 4 x gpus)")
    for flag in ("dp", "tp", "pp", "cp", "zero", "micro-batch-size", "pp-chunks"):
        a(f"--{flag}", type=int, default=None)
    a("--sp", action="store_true", default=None)
    a("--pp-engine", choices=ENGINES, default=None)
    a("--recompute", action="store_true", default=None)
    a("--compile", action="store_true", help="train.py --compile: fused elementwise kernels")
    a("--weights", choices=["fp32", "bf16"], default="fp32",
      help="fp32: train.py's parameters (autocast in bf16); bf16: bf16 parameters + float32 master (nanotron)")
    a("--top", type=int, default=10)
    a("--json", action="store_true", help="one JSON object (a search: a list of them)")
    args = p.parse_args(argv)
    for flag in ("gpus", "gpus_per_node", "seq_len", "global_batch_size", "micro_batch_size", "dp", "tp", "pp", "cp",
                 "pp_chunks"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if args.zero is not None and args.zero not in (0, 1, 2, 3):
        p.error(f"--zero must be 0, 1, 2 or 3, got {args.zero}")
    return args


def main(argv=None):
    args = parse(argv)
    if args.calibrate:
        hw = calibrate(Path(args.calibrate))
        print(json.dumps(hw, indent=2))
        return hw
    cfg, hw = load_model(args.model), load_hardware(args.hardware)
    gbs = args.global_batch_size or 4 * args.gpus
    T = args.seq_len
    fixed = {"dp": args.dp, "tp": args.tp, "pp": args.pp, "cp": args.cp, "zero": args.zero,
             "mbs": args.micro_batch_size, "sp": args.sp, "engine": args.pp_engine, "chunks": args.pp_chunks,
             "recompute": args.recompute, "compile": args.compile}
    kw = dict(gpus=args.gpus, gpus_per_node=args.gpus_per_node, T=T, gbs=gbs, hw=hw, weights=args.weights)
    if any(fixed[k] is not None for k in ("dp", "tp", "pp", "cp")):  # one layout; dp fills the rest
        tp, pp, cp = args.tp or 1, args.pp or 1, args.cp or 1
        lay = SimpleNamespace(dp=args.dp or max(1, args.gpus // (tp * pp * cp)), tp=tp, pp=pp, cp=cp,
                              zero=args.zero or 0, mbs=args.micro_batch_size or 1, sp=bool(args.sp),
                              engine=args.pp_engine or "1f1b", chunks=args.pp_chunks or 1,
                              recompute=bool(args.recompute), compile=args.compile)
        if lay.engine == "interleaved" and args.pp_chunks is None:
            lay.chunks = 2
        err = layout_error(cfg, lay, args.gpus, gbs, T)
        if err:
            sys.exit(f"error: {err}")
        r = predict(cfg, lay, **kw)
        print(json.dumps(public(r), indent=2) if args.json else table([r], hw))
        return public(r)
    t0 = time.perf_counter()
    results = search(cfg, fixed, args.top, **kw)
    if results is None:
        sys.exit(f"error: no layout of {args.gpus} GPUs runs global batch {gbs} at seq {T} with the flags given")
    results, fitting = results
    if args.json:
        print(json.dumps([public(r) for r in fitting], indent=2))
    else:
        print(f"{args.model} on {args.gpus} x {hw['name']}, seq {T}, global batch {gbs}: {len(results)} layouts, "
              f"{sum(r['fits'] for r in results)} fit by the closed form ({time.perf_counter() - t0:.1f} s)")
        print(table(fitting, hw) if fitting else "none fits: more GPUs, a shorter sequence or a smaller batch")
    return [public(r) for r in fitting]


if __name__ == "__main__":
    main()
