"""The communication recorder (notebooks/trace.py, run from outside the steps) against analytic counts.

What is counted, per rank and per optimizer step (records of DIR/rank{N}.jsonl, see trace.py):
  step02, dp=2: the gradient all-reduces over dp (the buckets: issued during backward or in
    finish_gradient_synchronization) add up to 4 x n_params bytes, n_params from the model's
    shapes; plus one 4-byte all-reduce of the logged loss, outside any phase.
  step03, tp=2, per micro-batch of B x T tokens, x = B*T*D float32:
    forward: 1 all-reduce of x in embed_tokens + 2 per decoder layer (o_proj, down_proj outputs);
    backward: 1 in lm_head (its input grad) + 2 per decoder layer (the grads of each block's input);
    loss: the vocab-parallel cross-entropy's 2 all-reduces (max: B*T, then 2*B*T floats),
    issued between the model's forward and backward (no phase); per step: 1 scalar over mp
    (grad norm, optimizer phase) and 1 over dp (logged loss).
  step03, tp=2 --sp: per layer 4 all-gathers and 4 reduce-scatters along T instead of the 4
    all-reduces, the same bytes sent; the norm gains' grads summed over tp once per step.
  step05, pp=2: B*T*D float32 sent forward per micro-batch and back per micro-batch (B*T/tp*D
    with --sp), and each stage's forward/backward order = the schedule's event list.
  step02, dp=2: DataParallel's facts, read from the trace: one all-reduce per bucket, in bucket
    order (last layers first), none before the last micro-batch, and the first one issued while
    later modules' backward still runs (it overlaps); with one huge bucket (the control) the one
    all-reduce waits for the very end of backward.
Recording must not change a single number: a learner's modified copy of step03, recorded, logs
the losses of step03 run plainly. No step folder holds tracing code. A step folder can be
replaced by $COURSE_STEP0N_DIR as in the other tests.
(run_step is given a tag: its default tag is built from the step, an absolute path here.)
"""
import importlib.util
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from launch import REPO, STEPS, TINY, TRACER, run_step, torchrun


def step_dir(name):
    return Path(os.environ.get(f"COURSE_{name[:6].upper()}_DIR", REPO / name))


STEP02, STEP03, STEP05 = (step_dir(s) for s in ("step02_data_parallel", "step03_tensor_parallel",
                                                "step05_pipeline_1f1b"))


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read(trace_dir):
    """{rank: [records]} of a trace directory."""
    out = {}
    for f in sorted(Path(trace_dir).glob("rank*.jsonl")):
        out[int(f.stem[4:])] = [json.loads(line) for line in f.read_text().splitlines() if line]
    return out


def comms(recs, step):
    return [r for r in recs if r["ev"] == "comm" and r["step"] == step]


def tiny_n_params(step):
    """Parameter count of the tiny preset from its shapes (not from the model code)."""
    c = json.loads((step.parent / "data" / "models" / "tiny" / "config.json").read_text())  # the preset
    D, I, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = D // c["num_attention_heads"]
    attn = D * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])  # q, o + k, v
    per_layer = attn + 3 * D * I + 2 * D  # + gate, up, down + two RMSNorm gains
    return V * D * (1 if c["tie_word_embeddings"] else 2) + L * per_layer + D, c


# ---------------------------------------------------------------- without processes
def test_no_step_holds_tracing_code():
    for step in STEPS:
        for f in (REPO / step).rglob("*.py"):
            text = f.read_text()
            for word in ("CommTracer", "trace_dir", "--trace-dir", "comm_trace"):
                assert word not in text, f"{f} mentions {word}: recording lives in notebooks/trace.py"


# ---------------------------------------------------------------- every op, on 4 ranks
WORKER = r'''
import importlib.util, sys
import torch, torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
spec = importlib.util.spec_from_file_location("course_trace", sys.argv[1])
course_trace = importlib.util.module_from_spec(spec)
spec.loader.exec_module(course_trace)

dist.init_process_group("gloo")
r = dist.get_rank()


class Grid:  # dp x pp = 2 x 2
    pass


pgm, groups = Grid(), {}
for name, rows in (("dp", [[0, 2], [1, 3]]), ("pp", [[0, 1], [2, 3]])):
    for ranks in rows:
        g = dist.new_group(ranks)
        if r in ranks:
            setattr(pgm, name + "_group", g)
pgm.dp_rank, pgm.pp_rank = r // 2, r % 2
pgm.dp_size, pgm.pp_size = 2, 2
original = dist.all_reduce
tracer = course_trace.CommTracer(sys.argv[2])
tracer.set_pgm(pgm)
tracer.step(0)
peer = r ^ 1  # the other stage of my pipeline
dist.all_reduce(torch.ones(10), group=pgm.dp_group)
dist.all_reduce(torch.ones(3, 2, dtype=torch.float64), group=pgm.pp_group, async_op=True).wait()
dist.all_gather_into_tensor(torch.empty(4 * 5), torch.ones(5))
dist.reduce_scatter_tensor(torch.empty(5), torch.ones(4 * 5))
dist.broadcast(torch.ones(7), src=0)
dist.all_to_all_single(torch.empty(8), torch.ones(8))
with tracer.phase("p2p"):
    ops = [dist.P2POp(dist.isend, torch.ones(6), peer), dist.P2POp(dist.irecv, torch.empty(6), peer)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    ops = [dist.P2POp(dist.isend, torch.ones(9), group=pgm.pp_group, group_peer=1 - pgm.pp_rank),
           dist.P2POp(dist.irecv, torch.empty(9), group=pgm.pp_group, group_peer=1 - pgm.pp_rank)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    if r % 2 == 0:
        dist.send(torch.ones(3), peer)
        dist.irecv(torch.empty(4), peer).wait()
    else:
        dist.recv(torch.empty(3), peer)
        dist.isend(torch.ones(4), peer).wait()
tracer.close()
assert dist.all_reduce is original and c10d.isend is dist.isend and "_wrap" not in dist.isend.__qualname__
dist.barrier()  # not traced any more
dist.destroy_process_group()
print("OPS_OK")
'''


def test_every_op_is_recorded(tmp_path):
    script = tmp_path / "ops.py"
    script.write_text(WORKER)
    proc = torchrun(script, 4, [TRACER, tmp_path / "trace"], timeout=120)
    assert proc.stdout.count("OPS_OK") == 4
    for rank, recs in read(tmp_path / "trace").items():
        meta = recs[0]
        assert meta["ev"] == "meta" and meta["rank"] == rank and meta["world"] == 4
        assert meta["groups"] == {"dp": [rank % 2, rank % 2 + 2], "pp": [rank - rank % 2, rank - rank % 2 + 1]}
        machine = meta["machine"]  # what the timings were measured on
        assert machine["processes"] == 4 and machine["device"] == "cpu", machine
        assert 1 <= machine["cpus_usable"] <= machine["cpus"] and machine["threads"] >= 1, machine
        (p2p_span,) = [r for r in recs if r["ev"] == "span" and r["phase"] == "p2p"]
        assert 0 <= p2p_span["cpu"] <= p2p_span["t1"] - p2p_span["t0"] + 0.01, p2p_span  # CPU seconds, one thread
        got = [(r["op"], r["dim"], r["bytes"], r["peer"]) for r in sorted(comms(recs, 0), key=lambda r: r["seq"])]
        peer = rank ^ 1
        p2p = ([("send", "pp", 12, peer), ("irecv", "pp", 16, peer)] if rank % 2 == 0 else
               [("recv", "pp", 12, peer), ("isend", "pp", 16, peer)])
        assert got == [("all_reduce", "dp", 40, None), ("all_reduce", "pp", 48, None),
                       ("all_gather_into_tensor", "world", 80, None), ("reduce_scatter_tensor", "world", 80, None),
                       ("broadcast", "world", 28, None), ("all_to_all_single", "world", 32, None),
                       ("isend", "pp", 24, peer), ("irecv", "pp", 24, peer),
                       ("isend", "pp", 36, peer), ("irecv", "pp", 36, peer), *p2p], (rank, got)
        for r in comms(recs, 0):
            assert r["t0"] <= r["t1"], r
            assert r["phase"] == ("p2p" if r["op"] in ("isend", "irecv", "send", "recv") else None)
            if r["async"]:  # the end of an async op is when wait() returned
                assert r["t0"] <= r["t_wait"] <= r["t1"], r
        ar = comms(recs, 0)[1]
        assert ar["async"] and ar["dtype"] == "float64" and ar["shape"] == [3, 2] and ar["sent"] == 48


# ---------------------------------------------------------------- step02: dp buckets
def bucket_sizes(n_params_by_tensor, cap_bytes):
    """DataParallel's bucketing, from its documented rule: tensors in reverse order, a bucket closes
    once it holds >= cap bytes. -> bytes per bucket, in bucket order."""
    sizes, cur = [], 0
    for n in reversed(n_params_by_tensor):
        cur += 4 * n
        if cur >= cap_bytes:
            sizes, cur = sizes + [cur], 0
    return sizes + ([cur] if cur else [])


def tiny_tensors(c):
    """Element counts of the tiny Llama's parameters in registration order (untied)."""
    D, I, V, H, Hkv = (c[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
                                     "num_key_value_heads"))
    hd = D // H
    layer = [D, H * hd * D, Hkv * hd * D, Hkv * hd * D, D * H * hd, D, I * D, I * D, D * I]
    return [V * D, *layer * c["num_hidden_layers"], D, V * D]


@pytest.mark.parametrize("bucket_mb", [0.1, 100.0], ids=["buckets", "one-bucket"])
def test_step02_dp_buckets_from_the_trace(bucket_mb, tmp_path):
    n_params, c = tiny_n_params(STEP02)
    steps, grad_acc = 2, 2
    run_step(str(STEP02), 2, [*TINY, "--max-steps", steps, "--grad-acc-steps", grad_acc, "--dp", 2,
                              "--bucket-size-mb", bucket_mb], tmp_path, tag="traced", trace=tmp_path / "trace")
    trace = read(tmp_path / "trace")
    assert sorted(trace) == [0, 1]
    want = bucket_sizes(tiny_tensors(c), bucket_mb * 2**20)
    for step in range(steps):
        seqs = []
        for rank, recs in trace.items():
            rs = comms(recs, step)
            buckets = [r for r in rs if r["phase"] is not None]
            assert {(r["op"], r["dim"], r["ranks"] == [0, 1]) for r in rs} == {("all_reduce", "dp", True)}
            assert sum(r["bytes"] for r in buckets) == 4 * n_params, (rank, step, [r["bytes"] for r in buckets])
            assert [r["bytes"] for r in sorted(buckets, key=lambda r: r["seq"])] == want  # bucket order
            assert all(r["async"] and r["sent"] == r["bytes"] for r in buckets)  # 2(n-1)/n = 1 for n = 2
            # no communication in the accumulation micro-batch; the buckets go during the last backward
            assert {(r["phase"], r["mb"]) for r in buckets} <= {("backward", grad_acc - 1), ("optimizer", 0)}
            first = min(buckets, key=lambda r: r["seq"])
            layer0 = [s for s in recs if s["ev"] == "span" and s["step"] == step and s["phase"] == "backward"
                      and s["module"] == "layers.0" and s["mb"] == grad_acc - 1]
            if len(want) > 2:  # overlap: on the wire before the first layer's backward even began
                assert first["t0"] < layer0[0]["t0"], (first, layer0)
            else:  # control: one bucket is complete only with the embedding's grad, after every layer
                assert first["t0"] > layer0[0]["t1"], (first, layer0)
            logged = [r for r in rs if r["phase"] is None]
            assert [r["bytes"] for r in logged] == [4]  # the logged loss
            seqs.append([(r["op"], r["bytes"]) for r in sorted(rs, key=lambda r: r["seq"])])
        assert seqs[0] == seqs[1], "the ranks issued different collective sequences"


# ---------------------------------------------------------------- step03: tp all-reduces
def test_step03_tp_allreduces_per_layer_of_a_modified_copy(tmp_path):
    """The recorder needs no change in the step: here it records a learner's edited copy."""
    _, c = tiny_n_params(STEP03)
    L, D = c["num_hidden_layers"], c["hidden_size"]
    B, T, grad_acc, steps = 2, 32, 2, 2
    copy = tmp_path / "course" / "my_step03"  # beside the course's data/, as `cp -r` in the repo makes it
    shutil.copytree(STEP03, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy.parent / "data").symlink_to(REPO / "data")
    train = copy / "train.py"
    train.write_text(train.read_text().replace('print(f"model {args.model}', 'print(f"my copy: model {args.model}'))
    args = [*TINY, "--max-steps", steps, "--grad-acc-steps", grad_acc, "--tp", 2,
            "--dataset", REPO / "data" / "pydoc_topics.jsonl", "--tokenizer", REPO / "data" / "tokenizer"]
    traced = run_step(str(copy), 2, args, tmp_path, tag="traced", trace=tmp_path / "trace")
    plain = run_step(str(STEP03), 2, args, tmp_path, tag="plain")
    assert [m["loss"] for m in traced] == [m["loss"] for m in plain]  # hooks and wrappers change no number
    x = B * T * D * 4
    for rank, recs in read(tmp_path / "trace").items():
        for step in range(steps):
            where = Counter()
            for r in comms(recs, step):
                assert r["op"] == "all_reduce", r
                module = r["module"] or ""
                layer = module.split(".")[1] if module.startswith("layers.") else module
                where[(r["dim"], r["phase"], layer, r["mb"], r["bytes"])] += 1
            want = Counter()
            for m in range(grad_acc):
                want[("tp", "forward", "embed_tokens", m, x)] = 1
                want[("tp", "backward", "lm_head", m, x)] = 1
                for i in range(L):
                    want[("tp", "forward", str(i), m, x)] = 2
                    want[("tp", "backward", str(i), m, x)] = 2
            want[("tp", None, "", None, B * T * 4)] = grad_acc  # loss: the max over the vocab shards
            want[("tp", None, "", None, 2 * B * T * 4)] = grad_acc  # loss: sum of exp, target logit
            want[("mp", "optimizer", "", 0, 4)] = 1  # squared grad norm
            want[("dp", None, "", None, 4)] = 1  # logged loss (dp = 1: a group of one)
            assert where == want, (rank, step, where - want, want - where)


def test_step03_sp_bytes_per_layer(tmp_path):
    """--sp: per layer and micro-batch, 4 all-gathers + 4 reduce-scatters along T of B*T*D in place
    of the 4 all-reduces; each sends (tp-1)/tp of its bytes, so the bytes on the wire do not grow.
    What autograd saves outside the blocks shrinks by tp (the recorder's "mem" record)."""
    _, c = tiny_n_params(STEP03)
    L, D = c["num_hidden_layers"], c["hidden_size"]
    B, T, grad_acc, tp = 2, 32, 2, 2
    for sp in ([], ["--sp"]):
        run_step(str(STEP03), tp, [*TINY, "--max-steps", 1, "--grad-acc-steps", grad_acc, "--tp", tp, *sp],
                 tmp_path, tag=f"tp{sp}", trace=tmp_path / ("trace" if sp else "plain"))
    # outside the blocks (norms, residual: the layer's own span) autograd keeps 1/tp of the bytes
    mem = {k: next(r for r in recs if r["ev"] == "mem")["saved_by_module"]
           for k, recs in (("plain", read(tmp_path / "plain")[0]), ("sp", read(tmp_path / "trace")[0]))}
    for i in range(L):
        assert mem["sp"][f"layers.{i}"] * tp == mem["plain"][f"layers.{i}"], mem
        assert mem["sp"][f"layers.{i}.mlp"] == mem["plain"][f"layers.{i}.mlp"], mem  # inside: the same
    x = B * T * D * 4
    AG, RS = "all_gather_into_tensor", "reduce_scatter_tensor"
    for rank, recs in read(tmp_path / "trace").items():
        where, sent = Counter(), Counter()
        for r in comms(recs, 0):
            module = r["module"] or ""
            layer = module.split(".")[1] if module.startswith("layers.") else module
            where[(r["op"], r["phase"], layer, r["bytes"])] += 1
            if layer.isdigit():
                sent[layer] += r["sent"]
                assert r["sent"] == r["bytes"] * (tp - 1) // tp, r
        want = Counter()
        for i in range(L):  # entries gather, row-parallel outputs reduce-scatter; backward the other way round
            want[(AG, "forward", str(i), x)] = want[(RS, "forward", str(i), x)] = 2 * grad_acc
            want[(RS, "backward", str(i), x)] = want[(AG, "backward", str(i), x)] = 2 * grad_acc
        want[(RS, "forward", "embed_tokens", x)] = grad_acc  # the embedding's output: reduce-scatter
        want[(AG, "backward", "model", x)] = grad_acc  # ... whose backward all-gathers (embed_tokens: no span)
        want[(AG, "forward", "lm_head", x)] = want[(RS, "backward", "lm_head", x)] = grad_acc
        want[("all_reduce", None, "", B * T * 4)] = grad_acc  # loss: the max over the vocab shards
        want[("all_reduce", None, "", 2 * B * T * 4)] = grad_acc  # loss: sum of exp, target logit
        want[("all_reduce", "optimizer", "", (2 * L + 1) * D * 4)] = 1  # the norm gains' grads over tp
        want[("all_reduce", "optimizer", "", 4)] = 1  # squared grad norm (over mp)
        want[("all_reduce", None, "", 4)] += 1  # logged loss
        assert where == want, (rank, where - want, want - where)
        # the same bytes on the wire as the 4 all-reduces of 2(tp-1)/tp x B*T*D per layer they replace
        assert all(s == grad_acc * 4 * 2 * (tp - 1) * x // tp for s in sent.values()) and len(sent) == L, sent


# ---------------------------------------------------------------- step05: pipeline p2p
@pytest.mark.parametrize("engine, tp", [("afab", 1), ("1f1b", 1), ("1f1b", 2)], ids=["afab", "1f1b", "1f1b-tp2-sp"])
def test_step05_pipeline_sends_and_order(engine, tp, tmp_path):
    """Per micro-batch, one (B, T, D) float32 message forward and one back; with --sp (B, T/tp, D)."""
    _, c = tiny_n_params(STEP05)
    pp_mod = load_module(STEP05 / "pipeline_parallel.py", "pp_for_trace")
    B, T, D, m, pp = 2, 32, c["hidden_size"], 4, 2
    sp = ["--tp", tp, "--sp"] if tp > 1 else []
    run_step(str(STEP05), pp * tp, [*TINY, "--max-steps", 1, "--grad-acc-steps", m, "--pp", pp, *sp,
                                    "--pp-engine", engine], tmp_path, tag="traced", trace=tmp_path / "trace")
    for rank, recs in read(tmp_path / "trace").items():
        stage = rank // tp  # ranks (pp, tp), tp fastest
        p2p = [r for r in comms(recs, 0) if r["op"] in ("isend", "irecv")]
        peer = (1 - stage) * tp + rank % tp
        assert {r["dim"] for r in p2p} == {"pp"} and {r["peer"] for r in p2p} == {peer}
        msg = B * (T // tp) * D * 4
        assert Counter((r["op"], r["bytes"]) for r in p2p) == {("isend", msg): m, ("irecv", msg): m}
        spans = sorted((r for r in recs if r["ev"] == "span" and r["module"] == "model"), key=lambda r: r["t0"])
        order = [("F" if r["phase"] == "forward" else "B", r["mb"]) for r in spans]
        assert order == pp_mod.SCHEDULES[engine](pp, stage, m), (rank, order)
