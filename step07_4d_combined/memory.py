"""Where each rank's memory goes: a model that predicts it from the config and the layout, and
the measurement that checks it.

    python step07_4d_combined/memory.py --config step07_4d_combined/configs/16gpu_llama2-7b.json
    python step07_4d_combined/memory.py --model smollm-1.7b --tp 2 --pp 2 --seq-len 2048 --recompute

Every dimension of the course exists because something runs out of memory. Per rank and step:
  weights      4 bytes x local parameters: float32 master weights (bf16 runs autocast them).
  gradients    4 bytes x local parameters (p.grad, float32).
  buckets      4 bytes x local parameters: DataParallel's flat buffers, when dp x cp > 1;
               with --zero 1 padded to a multiple of dp x cp, plus this rank's 1/(dp x cp) shard.
  optimizer    AdamW's exp_avg and exp_avg_sq, 8 bytes x local parameters (and a 4-byte step per
               tensor); with --zero 1, 1/(dp x cp) of them.
  activations  what autograd saves for backward: per micro-batch, times the micro-batches in
               flight on the stage (pp = 1: 1; AFAB: m; 1F1B: min(m, pp - stage); interleaved:
               min(V m, (V - 1) pp + 2 (pp - stage - 1) + 1) chunks, each of 1/V of the layers).
  peak         their sum, plus the transients of one micro-batch: the logits and the softmax of
               the loss, and with --recompute the activations of the one layer being recomputed.
               An upper bound: gradients grow while activations are freed, and both are counted.

Activations are counted op by op (what each op of model.py keeps for its backward; float32, or
bf16 autocast, where every matmul saves bf16 casts of its input and of its weight). n = B x T/cp
tokens of a micro-batch on a rank, n_sp = n/tp with --sp (n otherwise), H' = H/tp, I' = I/tp:
  each norm (2 per layer)    input, rsqrt, normalised input: (2 D + 1) n_sp floats
  each block's input         the (gathered) norm output its linears read: n D floats
  attention                  q, k, v after RoPE (GQA: repeated to H'), output: 4 n H' hd; log-sum-exp
                             n H'; context parallelism keeps k, v unrepeated and copies the output
  MLP (SwiGLU)               gate, up, silu(gate), their product: 4 n I'
  per micro-batch            RoPE cos/sin, token ids; the first stage's embedding; the last stage's
                             final norm, head input and the loss's softmax (n V/tp floats)
With --recompute each layer keeps only its input (n_sp D floats); the layer being recomputed in
backward holds its full activations for a moment (the transient).

How it is checked: `train.py --memory-report` counts, in step 0, the bytes autograd holds for
backward (a saved_tensors_hooks pack hook: each storage once, parameters not counted, released
when the graph lets go of it; with --recompute, the inputs each layer keeps) and logs the peak
as act_bytes_measured beside act_bytes_predicted and the other predictions; the weights,
gradients and optimizer state it finds are logged too (tests/test_memory.py compares them).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

GIB = 2**30


# ------------------------------------------------------------------ the layout of one rank
def stage_layer_count(num_layers, pp, stage, chunks=1):
    """How many decoder layers stage `stage` owns (pipeline_parallel.stage_layers' rule; chunks > 1:
    the layers of its virtual stages c * pp + stage, chunk_layers')."""
    if chunks > 1:
        return sum(stage_layer_count(num_layers, pp * chunks, c * pp + stage) for c in range(chunks))
    base, extra = divmod(num_layers, pp)
    return base + (stage < extra)


def stage_params(cfg, tp=1, pp=1, stage=0, chunks=1):
    """[(name, elements)] of the parameters one rank of `stage` holds, in registration order."""
    D, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or D // H
    ab, mb = bool(getattr(cfg, "attention_bias", False)), bool(getattr(cfg, "mlp_bias", False))
    layer = [("input_layernorm", D)]
    for name, out in (("q_proj", H * hd), ("k_proj", Hkv * hd), ("v_proj", Hkv * hd)):
        layer += [(name, D * out // tp)] + ab * [(name + ".bias", out // tp)]
    layer += [("o_proj", H * hd * D // tp)] + ab * [("o_proj.bias", D)] + [("post_attention_layernorm", D)]
    for name in ("gate_proj", "up_proj"):
        layer += [(name, D * I // tp)] + mb * [(name + ".bias", I // tp)]
    layer += [("down_proj", I * D // tp)] + mb * [("down_proj.bias", D)]
    first, last = stage == 0, stage == pp - 1
    out = [("embed_tokens", V * D // tp)] if first else []
    out += layer * stage_layer_count(cfg.num_hidden_layers, pp, stage, chunks)
    if last:
        out += [("norm", D)]
        if not (cfg.tie_word_embeddings and first):  # tied on one stage: lm_head is the embedding
            out += [("lm_head", V * D // tp)]
    return out


def param_counts(cfg, tp=1, pp=1, stage=0, chunks=1):
    """(elements, tensors) of the parameters one rank of `stage` holds."""
    params = stage_params(cfg, tp, pp, stage, chunks)
    return sum(n for _, n in params), len(params)


def zero_slices(cfg, tp, pp, stage, W, rank, bucket_size_mb, chunks=1):
    """--zero 1: (elements, pieces, padded bucket elements) of group rank `rank`'s slices, from
    ZeroDataParallel's buckets: DataParallel's (reverse order, ~bucket_size_mb each), a tied
    embedding on a pipeline alone in its own, each padded to a multiple of W."""
    params = [n for _, n in stage_params(cfg, tp, pp, stage, chunks)]
    tied = cfg.tie_word_embeddings and pp > 1 and stage in (0, pp - 1)
    alone = ([params.pop(0)] if stage == 0 else [params.pop()]) if tied else None
    groups, cur, cap = [], [], bucket_size_mb * 2**20
    for n in reversed(params):
        cur.append(n)
        if 4 * sum(cur) >= cap:
            groups, cur = groups + [cur], []
    groups += [cur] if cur else []
    if alone:
        groups = groups + [alone] if stage == 0 else [alone] + groups
    elements = pieces = padded = 0
    for sizes in groups:
        size = W * math.ceil(sum(sizes) / W)
        lo_r, hi_r, lo = rank * size // W, (rank + 1) * size // W, 0
        for n in sizes:
            overlap = min(lo + n, hi_r) - max(lo, lo_r)
            elements, pieces, lo = elements + max(0, overlap), pieces + (overlap > 0), lo + n
        padded += size
    return elements, pieces, padded


def in_flight(schedule, pp, stage, micro_batches, chunks=1):
    """Micro-batches whose activations a stage holds at once (interleaved: (micro-batch, chunk) pairs)."""
    if pp == 1:
        return 1
    if schedule == "interleaved":  # the warm-up forwards and the steady state's first one
        return min(chunks * micro_batches, (chunks - 1) * pp + 2 * (pp - stage - 1) + 1)
    return micro_batches if schedule == "afab" else min(micro_batches, pp - stage)


def held_at_peak(schedule, pp, stage, micro_batches, chunks, chunk_bytes):
    """Interleaved: the stage's event list replayed, chunk c's forward adding chunk_bytes[c] and its
    backward freeing them; -> the most bytes held at once (chunks may differ: the last scores)."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("pipeline_parallel_beside_memory", Path(__file__).with_name("pipeline_parallel.py"))
    pipeline = module_from_spec(spec)
    spec.loader.exec_module(pipeline)  # the trainer's own event lists, also when memory.py is loaded alone
    held = peak = 0
    for kind, _, c in pipeline.stage_events(schedule, pp, stage, micro_batches, chunks):
        held += chunk_bytes[c] if kind == "F" else -chunk_bytes[c]
        peak = max(peak, held)
    return peak


# ------------------------------------------------------------------ activations, op by op
def activation_bytes(cfg, B, T, tp=1, cp=1, pp=1, stage=0, sp=False, dtype="float32", recompute=False, chunks=1):
    """Bytes autograd saves for backward in one micro-batch of B sequences of T tokens, on one rank
    of `stage`: {"layers": ..., "per_layer": ..., "other": ..., "transient": ...}."""
    D, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or D // H
    Hq, Hk = H // tp, Hkv // tp
    n = B * (T // cp)  # tokens of the micro-batch on this rank
    n_sp = n // tp if (sp and tp > 1) else n
    f = 4  # float32: the residual stream, the norms, the log-sum-exp and the loss
    c = 2 if dtype == "bfloat16" else 4  # what a matmul computes in: bf16 under autocast
    ab, mb = bool(getattr(cfg, "attention_bias", False)), bool(getattr(cfg, "mlp_bias", False))

    norm = (2 * D + 1) * n_sp * f  # input, rsqrt (n, 1), normalised input
    if c == 4:  # float32: each block's linears save its (gathered) input once
        entry_attn = entry_mlp = n * D * f
        weights = 0
    else:  # autocast casts the input for every linear, and each linear keeps its bf16 weight
        entry_attn, entry_mlp = 3 * n * D * c, 2 * n * D * c
        weights = (2 * D * H * hd + 2 * D * Hkv * hd + 3 * D * I) // tp * c
        weights += (ab * (H + 2 * Hkv) * hd // tp + mb * 2 * I // tp) * c
    rep = H // Hkv
    if cp == 1:  # SDPA keeps q, k, v (repeated to H' heads when GQA), its output, the log-sum-exp
        kv = 2 * n * (Hq if rep > 1 else Hk) * hd * c
        attn = 2 * n * Hq * hd * c + kv + n * Hq * f
    else:  # ring attention keeps q, k, v unrepeated, its output and lse; o_proj copies the output
        attn = 3 * n * Hq * hd * c + 2 * n * Hk * hd * c + n * Hq * f
    rope = 4 * n * hd * c if c == 2 else 0  # autocast: cos and sin cast for q and for k
    mlp = 4 * n * (I // tp) * c  # gate, up, silu(gate), silu(gate) * up
    per_layer = 2 * norm + entry_attn + entry_mlp + attn + rope + mlp + weights
    L = stage_layer_count(cfg.num_hidden_layers, pp, stage, chunks)
    first, last = stage == 0, stage == pp - 1

    other = 2 * n * hd * f  # cos, sin of the micro-batch's positions (float32, shared by the layers)
    other += 8 * n  # token ids (embedding) or targets (loss)
    if last:
        other += norm + n * D * c  # final norm; lm_head's input (gathered with --sp)
        other += c * V * D // tp if c == 2 else 0  # lm_head's bf16 weight
        other += n * (V // tp) * f  # the loss's softmax (log-softmax output), float32
    layers = L * (n_sp * D * f if recompute else per_layer)
    transient = n * (V // tp) * (f + c) if last else 0  # logits and the float32 copy the loss makes
    if recompute:
        transient += per_layer  # the layer being recomputed
    out = {"layers": layers, "per_layer": per_layer, "other": other, "transient": transient, "total": layers + other}
    if chunks > 1:  # per chunk: its layers, its own cos/sin and ids; the last rank's last chunk scores
        base = 2 * n * hd * f + 8 * n
        out["chunks"] = [stage_layer_count(cfg.num_hidden_layers, pp * chunks, k * pp + stage) * layers // L + base
                         for k in range(chunks)]
        out["chunks"][-1] += other - base
    return out


# ------------------------------------------------------------------ one rank's budget
def predict(cfg, *, B, T, grad_acc, dp=1, pp=1, cp=1, tp=1, stage=None, sp=False, dtype="float32",
            recompute=False, zero=0, schedule="1f1b", bucket_size_mb=25.0, zero_rank=None, chunks=1):
    """Bytes per rank of the pipeline stage `stage` (default: the first, which holds the most).
    With --zero 1 the optimizer state is that of group rank `zero_rank` (default: the last)."""
    stage = 0 if stage is None else stage
    n, tensors = param_counts(cfg, tp, pp, stage, chunks)
    W = dp * cp  # the ranks that hold the same weights: gradients are averaged over them
    out = {"weights": 4 * n, "gradients": 4 * n}
    if zero and W > 1:
        mine, pieces, padded = zero_slices(cfg, tp, pp, stage, W, W - 1 if zero_rank is None else zero_rank,
                                           bucket_size_mb, chunks)
        out["buckets"] = 4 * padded + 4 * padded // W  # the buckets, and the slice they reduce into
        out["optimizer"] = 8 * mine + 4 * pieces
    else:
        out["buckets"] = 4 * n if W > 1 else 0
        out["optimizer"] = 8 * n + 4 * tensors
    act = activation_bytes(cfg, B, T, tp, cp, pp, stage, sp, dtype, recompute, chunks)
    k = in_flight(schedule, pp, stage, grad_acc, chunks)
    out["activations"] = k * act["total"]
    if chunks > 1:
        out["activations"] = held_at_peak(schedule, pp, stage, grad_acc, chunks, act["chunks"])
    out["transient"] = act["transient"]
    out["peak"] = sum(out.values())
    out["in_flight"] = k
    return out


def predict_run(cfg, args, pgm, dtype):
    """predict() for this rank of a train.py run."""
    return predict(cfg, B=args.micro_batch_size, T=args.seq_len, grad_acc=args.grad_acc_steps, dp=pgm.dp_size,
                   pp=pgm.pp_size, cp=pgm.cp_size, tp=pgm.tp_size, stage=pgm.pp_rank, sp=args.sp, dtype=dtype,
                   recompute=args.recompute, zero=args.zero, schedule=args.pp_engine,
                   bucket_size_mb=args.bucket_size_mb, zero_rank=pgm.dp_rank * pgm.cp_size + pgm.cp_rank,
                   chunks=args.pp_chunks)


def describe(pred):
    keys = ("weights", "gradients", "buckets", "optimizer", "activations", "transient", "peak")
    unit, name = (GIB, "GiB") if pred["peak"] >= GIB else (2**20, "MiB")
    return " | ".join(f"{k} {pred[k] / unit:.2f}" for k in keys) + f" {name}"


# ------------------------------------------------------------------ measuring it
class SavedBytes:
    """Counts what autograd holds for backward while active: each storage once, parameters not."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.held, self.live, self.peak = {}, 0, 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key in self.params or t.device.type == "meta":
            return t
        count, nbytes = self.held.get(key, (0, t.untyped_storage().nbytes()))
        if count == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.held[key] = (count + 1, nbytes)
        return _Held(t, key, self)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def release(self, key):
        count, nbytes = self.held[key]
        if count == 1:
            del self.held[key]
            self.live -= nbytes
        else:
            self.held[key] = (count - 1, nbytes)

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


class _Held:
    def __init__(self, tensor, key, counter):
        self.tensor, self.key, self.counter = tensor, key, counter

    def __del__(self):
        self.counter.release(self.key)


class _KeepInputs(torch.autograd.Function):
    """Identity whose backward needs its inputs: makes what a recomputed layer keeps (its inputs,
    held by torch.utils.checkpoint) visible to SavedBytes, for exactly as long."""

    @staticmethod
    def forward(ctx, *xs):
        ctx.save_for_backward(*xs)
        return xs if len(xs) > 1 else xs[0]

    @staticmethod
    def backward(ctx, *grads):
        return grads


def apply_recompute(model, count_inputs=False):
    """--recompute: each decoder layer keeps only its inputs; backward runs its forward again
    (torch.utils.checkpoint, non-reentrant). The layers' collectives (tp all-reduces or, with
    --sp, all-gathers and reduce-scatters; cp's ring) run again too, in the same order on every
    rank: one more forward's worth of tp and cp traffic per layer and micro-batch."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers.values():
        def forward(x, cos, sin, _run=layer.forward):
            if count_inputs and torch.is_grad_enabled():
                x, cos, sin = _KeepInputs.apply(x, cos, sin)
            return checkpoint(_run, x, cos, sin, use_reentrant=False)
        layer.forward = forward  # an instance attribute: names, hooks and print(model) unchanged
    return model


class MemoryReport:
    """--memory-report: the first step's measured bytes next to the predicted ones, for its log line.

    Counting starts here and stops at the first optimizer step (backward is over by then)."""

    def __init__(self, enabled, model, optimizer, prediction):
        self.enabled, self.prediction, self.fields, self.done = enabled, prediction, {}, False
        if not enabled:
            return
        self.model, self.optimizer = model, optimizer
        self.counter = SavedBytes(model.parameters()).__enter__()
        optimizer.register_step_pre_hook(self._grads)  # the gradients exist until zero_grad
        optimizer.register_step_post_hook(self._state)

    def _grads(self, *_):
        if "grad_bytes_measured" not in self.fields:
            self.counter.__exit__(None, None, None)
            self.fields["grad_bytes_measured"] = sum(p.grad.numel() * p.grad.element_size()
                                                     for p in self.model.parameters() if p.grad is not None)

    def _state(self, *_):
        if "optimizer_bytes_measured" not in self.fields:
            self.fields["optimizer_bytes_measured"] = sum(
                t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))

    def log(self, step):
        """Fields for the first step's log line (and nothing afterwards)."""
        if not self.enabled or self.done:
            return {}
        self.done = True
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {"act_bytes_measured": self.counter.peak, "act_bytes_predicted": self.prediction["activations"],
                "weight_bytes_measured": weights, **self.fields,
                **{f"predicted_{k}": v for k, v in self.prediction.items()}}


def add_memory_args(parser):
    a = parser.add_argument
    a("--recompute", action="store_true", help="recompute each decoder layer's activations in backward")
    a("--zero", type=int, choices=[0, 1], default=0, help="1: shard AdamW's state over the dp x cp replicas")
    a("--memory-report", action="store_true", help="step 0's log line: measured and predicted bytes per rank")


# ------------------------------------------------------------------ the table
def main(argv=None):
    """Print the predicted budget of every pipeline stage for train.py's flags (or --config)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from utils import base_parser, make_config, positive, positive_float

    parser = base_parser("memory per rank, predicted")
    for flag in ("dp", "pp", "cp", "tp"):
        parser.add_argument(f"--{flag}", type=positive, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--pp-engine", choices=["afab", "1f1b", "interleaved"], default="1f1b")
    parser.add_argument("--pp-chunks", type=int, default=1)
    add_memory_args(parser)
    parser.add_argument("--gpu-gib", type=positive_float, default=80.0, help="memory per device, for the verdict")
    parser.add_argument("--config", default=None, help="a train.py config file (its other keys are ignored)")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:  # its values become the defaults, as in train.py
        flat = {}
        for key, value in json.loads(Path(pre.config).read_text()).items():
            flat.update(value if isinstance(value, dict) else {key: value})
        dests = vars(parser.parse_args([]))
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in flat.items() if k.replace("-", "_") in dests})
    args = parser.parse_args(argv)
    dtype = args.dtype or "bfloat16"  # what a GPU run uses
    cfg = make_config(args)
    print(f"{args.model}: dp {args.dp} x pp {args.pp} x cp {args.cp} x tp {args.tp}{' sp' if args.sp else ''}, "
          f"micro-batch {args.micro_batch_size} x {args.seq_len} tokens, {args.grad_acc_steps} micro-batches, "
          f"{args.pp_engine}, {dtype}{', recompute' if args.recompute else ''}{', zero 1' if args.zero else ''}")
    worst = 0
    for stage in range(args.pp):
        pred = predict(cfg, B=args.micro_batch_size, T=args.seq_len, grad_acc=args.grad_acc_steps, dp=args.dp,
                       pp=args.pp, cp=args.cp, tp=args.tp, stage=stage, sp=args.sp, dtype=dtype,
                       recompute=args.recompute, zero=args.zero, schedule=args.pp_engine, chunks=args.pp_chunks)
        worst = max(worst, pred["peak"])
        print(f"stage {stage} ({pred['in_flight']} in flight): {describe(pred)}")
    verdict = "fits" if worst <= args.gpu_gib * GIB else "does NOT fit"
    print(f"peak {worst / GIB:.1f} GiB per rank: {verdict} in {args.gpu_gib:g} GiB")
    return worst


if __name__ == "__main__":
    main()
