"""Communication trace: every collective and send/recv a rank issues, with bytes and times.

Problem: parallel training is invisible. Which collective runs over which group, how many
bytes it moves, and whether it overlaps compute cannot be read off the code alone.

With --trace-dir DIR every rank appends one JSON object per line to DIR/rank{N}.jsonl:
  {"ev": "meta", ...}  once: rank, world size, this rank's coordinates and group members.
  {"ev": "comm", "seq", "op", "dim", "ranks", "peer", "batch", "bytes", "sent", "dtype", "shape",
   "async", "t0", "t1", "t_wait", "t_done", "step", "phase", "module", "mb"}  per operation
     (seq: issue order on this rank; batch: ops posted by one batch_isend_irecv share it).
     dim: the group's name on the process-group manager ("dp", "tp", "pp", "cp", "cp_dp",
       "mp", ...; "world" for the default group). A send/recv on the default group is named
       after the smallest named group holding both ends (a pipeline send is "pp").
     bytes: the whole logical tensor (all-reduce: the tensor; all-gather: the gathered output;
       reduce-scatter / all-to-all: the input; send/recv: the message).
     sent: estimate of what this rank puts on the wire with ring algorithms
       (all-reduce 2(n-1)/n x bytes; all-gather, reduce-scatter, all-to-all (n-1)/n x bytes).
     t0: issued; t1: returned (async ops: when wait() returned); t_wait: wait() called;
       t_done (gloo only): when gloo's background thread finished the op.
       Times are host seconds since the epoch: on a GPU they are launch times, not kernel times.
     phase/module/mb: the innermost open span when the op was issued (null: outside any).
  {"ev": "span", "phase", "module", "mb", "step", "t0", "t1"}  forward/backward of a watched
     module (micro-batch mb = how many times it ran before in this step), or a named phase.
Use: tracer = CommTracer(args.trace_dir, pgm).watch(model); tracer.step(step) at the top of
each optimizer step; `with tracer.phase("optimizer"):`; tracer.close() at the end.
Off by default and then free: nothing is patched and every method is a no-op.
How: torch.distributed's functions are replaced by timing wrappers (the course calls them as
dist.xxx at call time); forward hooks and tensor hooks mark forward and backward of the model,
its decoder layers and their attention and MLP blocks. Records are encoded between steps.
`python comm_trace.py DIR` prints count and bytes per step, group and op.
"""
import atexit
import inspect
import json
import threading
import time
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.nn as nn
from torch.autograd import Variable

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "all_to_all_single",
               "all_gather", "reduce_scatter", "reduce", "all_to_all", "barrier", "gather", "scatter",
               "all_gather_single", "reduce_scatter_single")  # the last two: torch >= 2.13 names
P2P = ("send", "recv", "isend", "irecv")
FULL = {"all_gather_into_tensor": "output_tensor", "all_gather_single": "output_tensor", "all_gather": "tensor_list",
        "reduce_scatter_tensor": "input", "reduce_scatter_single": "input", "reduce_scatter": "input_list",
        "all_to_all_single": "input", "all_to_all": "input_tensor_list"}  # else the arg "tensor"
RING = {"all_reduce": lambda n: 2 * (n - 1) / n, "broadcast": lambda n: n > 1, "reduce": lambda n: n > 1,
        "send": lambda n: 1, "isend": lambda n: 1}  # the rest: (n-1)/n; recv, barrier: 0
_CLOCK = time.time() - time.perf_counter()  # perf_counter (monotonic) shifted to epoch seconds


def now():
    return time.perf_counter() + _CLOCK


class _TracedWork:
    """Stands in for the Work an async op returns: wait() stamps the end of its records."""

    def __init__(self, work, tracer, recs):
        self._work, self._tracer, self._recs = work, tracer, recs

    def wait(self, *args, **kwargs):
        t = now()
        out = self._work.wait(*args, **kwargs)
        self._tracer._finish(self._recs, t)
        self._recs = []
        return out

    def __getattr__(self, name):  # is_completed, get_future, ...
        return getattr(self._work, name)


class CommTracer:
    def __init__(self, trace_dir, pgm=None):
        self.on = bool(trace_dir)
        if not self.on:
            return
        self.rank = dist.get_rank()
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        self.file, self.buf = open(Path(trace_dir) / f"rank{self.rank}.jsonl", "w"), []
        self.pgm, self.names, self.by_ranks, self.cache = pgm, {}, {}, {}  # id(group), ranks -> name
        groups = self._scan()
        coords = {k: v for k, v in (vars(pgm) if pgm is not None else {}).items() if k.endswith(("_rank", "_size"))
                  and isinstance(v, int)}
        self._write({"ev": "meta", "rank": self.rank, "world": dist.get_world_size(),
                     "backend": dist.get_backend(), "groups": groups, "coords": coords})
        self.seq, self.batch, self.step_no, self.stack, self.counts, self.pending = 0, 0, None, [], {}, {}
        self.futures = dist.get_backend() == "gloo"  # NCCL futures complete at launch: no t_done
        self.local = threading.local()  # nesting depth: dist.send calls dist.isend inside
        self.saved = [(mod, name, getattr(mod, name)) for name in (*COLLECTIVES, *P2P, "batch_isend_irecv")
                      for mod in (dist, c10d) if hasattr(mod, name)]
        for name in (*COLLECTIVES, *P2P):
            if hasattr(dist, name):
                wrapped = self._wrap(name, getattr(dist, name))
                setattr(dist, name, wrapped)
                if name in ("isend", "irecv"):  # P2POp checks `op in [isend, irecv]` in c10d
                    setattr(c10d, name, wrapped)
        dist.batch_isend_irecv = self._wrap("batch_isend_irecv", dist.batch_isend_irecv)
        atexit.register(self.close)

    # --- the records ---
    def _write(self, rec):
        self.buf.append(rec)  # encoded between steps, so that tracing does not stretch the spans

    def _flush(self):
        self.file.write("".join(json.dumps(rec) + "\n" for rec in self.buf))
        self.file.flush()
        self.buf = []

    def _scan(self):
        """Name the groups the process-group manager holds: pgm.tp_group -> "tp"."""
        groups = {}
        for attr, value in (vars(self.pgm) if self.pgm is not None else {}).items():
            if attr.endswith("_group") and isinstance(value, dist.ProcessGroup):
                name, ranks = attr[:-len("_group")], tuple(dist.get_process_group_ranks(value))
                groups[name], self.names[id(value)] = list(ranks), name
                self.by_ranks.setdefault(ranks, name)
        return groups

    def _group(self, group, peer=None):
        """(name, global ranks) of a process group (None: the default group)."""
        key = (id(group), peer)
        if key not in self.cache:
            if group is not None and id(group) not in self.names:
                self._scan()  # a group created after the tracer (e.g. pp_embed_group)
            world = group is None or group is dist.group.WORLD
            ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
            name = "world" if world else self.names.get(id(group)) or self.by_ranks.get(ranks, "other")
            fits = [r for r in self.by_ranks if peer in r and self.rank in r] if world and peer is not None else []
            if fits:  # send/recv on the default group: name it after the dimension it crosses
                ranks = min(fits, key=len)
                name = self.by_ranks[ranks]
            self.cache[key] = (name, ranks)
        return self.cache[key]

    def _record(self, op, tensor, group, peer=None, batch=None):
        name, ranks = self._group(group, peer)
        if isinstance(tensor, (list, tuple)):  # list variants: the sum of the list
            n_bytes = sum(t.numel() * t.element_size() for t in tensor)
            dtype, shape = (tensor[0].dtype, [len(tensor), *tensor[0].shape]) if tensor else (None, [])
        else:
            n_bytes = 0 if tensor is None else tensor.numel() * tensor.element_size()
            dtype, shape = (None, []) if tensor is None else (tensor.dtype, list(tensor.shape))
        n = len(ranks)
        frac = RING.get(op, lambda n: 0 if op in ("recv", "irecv", "barrier") else (n - 1) / n)(n)
        span = self.stack[-1] if self.stack else {}
        self.seq += 1
        return {"ev": "comm", "seq": self.seq, "op": op, "dim": name, "ranks": list(ranks),
                "peer": peer, "batch": batch, "bytes": n_bytes, "sent": int(frac * n_bytes),
                "dtype": str(dtype).replace("torch.", "") if dtype else None, "shape": shape,
                "async": False, "t0": now(), "t1": None, "t_wait": None, "t_done": None,
                "step": self.step_no, "phase": span.get("phase"), "module": span.get("module"),
                "mb": span.get("mb")}

    def _finish(self, recs, t_wait=None):
        t = now()
        for rec in recs:
            rec["t1"], rec["t_wait"] = t, t_wait
            if self.pending.pop(rec["seq"], None) is not None or not rec["async"]:
                self._write(rec)

    def _track(self, work, recs):
        """An async op: keep its records open until wait(); stamp t_done from the future."""
        for rec in recs:
            rec["async"] = True
            self.pending[rec["seq"]] = rec
        works = work if isinstance(work, list) else [work]
        try:  # gloo: the callback runs on gloo's thread as soon as the op completes
            for w, rec in zip(works, recs if len(works) == len(recs) else [recs[-1]] * len(works)):
                if self.futures:
                    w.get_future().add_done_callback(lambda _, rec=rec: rec.__setitem__("t_done", now()))
        except RuntimeError:
            pass  # gloo send/recv have no future: t_done stays null
        if not isinstance(work, list):
            return _TracedWork(work, self, recs)
        if len(work) == len(recs):
            return [_TracedWork(w, self, [r]) for w, r in zip(work, recs)]
        return [_TracedWork(w, self, recs if i == len(work) - 1 else []) for i, w in enumerate(work)]

    def _wrap(self, name, fn):
        params = list(inspect.signature(fn).parameters)  # to read args by name (defaults: absent)

        def traced(*args, **kwargs):
            depth = getattr(self.local, "depth", 0)
            if depth:  # called by another traced function: recorded there
                return fn(*args, **kwargs)
            a = {**dict(zip(params, args)), **kwargs}
            if name == "batch_isend_irecv":
                self.batch, recs = self.batch + 1, []
                for p in a["p2p_op_list"]:
                    send = getattr(p.op, "__name__", "") == "isend"  # the original or our wrapper
                    p.op = c10d.isend if send else c10d.irecv  # what batch_isend_irecv compares to
                    recs.append(self._record("isend" if send else "irecv", p.tensor, p.group, p.peer, self.batch))
            else:
                group = a.get("group")
                peer = next((a[k] for k in ("dst", "src") if a.get(k) is not None), None)
                for k in ("group_dst", "group_src"):
                    if a.get(k) is not None:
                        peer = dist.get_global_rank(group, a[k])
                tensor = a.get(FULL.get(name, "tensor"))
                recs = [self._record(name, tensor, group, peer if name in P2P else None)]
            self.local.depth = 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self.local.depth = 0
            if out is not None and (name in ("isend", "irecv", "batch_isend_irecv") or a.get("async_op")):
                return self._track(out, recs)
            self._finish(recs)
            return out

        traced.__name__, traced.__wrapped__ = name, fn
        return traced

    # --- phases ---
    def step(self, step):
        """Call at the top of every optimizer step: records get this step number; the
        micro-batch counters restart."""
        if self.on:
            self.step_no, self.counts, self.stack = step, {}, []
            self._flush()

    def _begin(self, phase, module=None, outer=False, **fields):
        key = (phase, module)
        mb = self.counts.get(key, 0)
        self.counts[key] = mb + 1
        span = {"ev": "span", "phase": phase, "module": module, "mb": mb, "step": self.step_no,
                "t0": now(), "t1": None, **fields}
        if outer:
            self.stack.insert(0, span)
        else:
            self.stack.append(span)
        return span

    def _end(self, span):
        span["t1"] = now()
        if span in self.stack:
            self.stack.remove(span)
        self._write(span)

    def phase(self, name, **fields):
        """Context manager marking a named phase ("optimizer", ...) of this rank."""
        return self._phase(name, **fields) if self.on else nullcontext()

    @contextmanager
    def _phase(self, name, **fields):
        span = self._begin(name, **fields)
        try:
            yield
        finally:
            self._end(span)

    def watch(self, model):
        """Spans for the forward and backward of the Llama inside `model` (any wrapper), of each
        decoder layer, of their self_attn and mlp blocks and of lm_head; embed_tokens: forward."""
        if not self.on:
            return self
        llama = next((m for m in model.modules()
                      if isinstance(getattr(getattr(m, "model", None), "layers", None), nn.ModuleDict)), None)
        if llama is None:
            raise ValueError("CommTracer.watch: no module with .model.layers (an nn.ModuleDict) inside")
        self._hook(llama, "model", top=True)
        if isinstance(getattr(llama.model, "embed_tokens", None), nn.Module):
            self._hook(llama.model.embed_tokens, "embed_tokens", backward=False)
        for i, layer in llama.model.layers.items():
            self._hook(layer, f"layers.{i}")
            for block in ("self_attn", "mlp"):
                if isinstance(getattr(layer, block, None), nn.Module):
                    self._hook(getattr(layer, block), f"layers.{i}.{block}")
        head = getattr(llama, "lm_head", None)
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            self._hook(head, "lm_head")
        return self

    def _hook(self, module, name, top=False, backward=True):
        """A module's backward starts when the grad of its output arrives and ends when the grad
        of its input is complete (tensor hooks: cheaper than module backward hooks, which add
        autograd nodes). The whole model's backward ends when the autograd pass ends."""
        open_ = {}  # "forward" / "backward" -> the open span; "x" -> the input of this forward

        def fwd_pre(mod, args):
            open_["forward"] = self._begin("forward", name)
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            open_["x"] = x if (x is not None and x.requires_grad and not top) else None

        def fwd_post(mod, args, out):
            self._end(open_.pop("forward"))
            x = open_.pop("x")
            if backward and isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(partial(bwd_begin, x is None))
                if x is not None:
                    x.register_hook(bwd_end)

        def bwd_begin(at_pass_end, grad):
            # the model's output may also be lm_head's: its span goes below the others
            open_["backward"] = self._begin("backward", name, outer=top)
            if at_pass_end:  # no input grad to wait for: the span ends with this autograd pass
                Variable._execution_engine.queue_callback(bwd_end)

        def bwd_end(*_):
            if "backward" in open_:
                self._end(open_.pop("backward"))

        module.register_forward_pre_hook(fwd_pre)
        module.register_forward_hook(fwd_post)

    def close(self):
        """Write what is still open and put torch.distributed back as it was."""
        if not self.on or self.file.closed:
            return
        for rec in list(self.pending.values()):  # async ops nobody waited for: t1 stays null
            self._write(rec)
        for mod, name, fn in self.saved:
            setattr(mod, name, fn)
        self._flush()
        self.file.close()
        atexit.unregister(self.close)  # it holds the process groups: let them go with main()


def load_trace(trace_dir):
    """All records of DIR/rank*.jsonl as one list of dicts, each with its "rank"."""
    out = []
    for f in sorted(Path(trace_dir).glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        out += [dict(json.loads(line), rank=rank) for line in f.read_text().splitlines() if line]
    return out


if __name__ == "__main__":  # python comm_trace.py DIR: bytes per step, group and op
    import sys
    from collections import Counter
    recs = [r for r in load_trace(sys.argv[1]) if r["ev"] == "comm"]
    n, b = Counter(), Counter()
    for r in recs:
        key = (r["step"], r["dim"], r["op"], r["rank"])
        n[key] += 1
        b[key] += r["bytes"]
    print(f"{'step':>4} {'dim':>6} {'op':<24} {'rank':>4} {'count':>6} {'bytes':>12}")
    for key in sorted(n, key=lambda k: tuple(str(x) for x in k)):
        print(f"{str(key[0]):>4} {key[1]:>6} {key[2]:<24} {key[3]:>4} {n[key]:>6} {b[key]:>12,}")
