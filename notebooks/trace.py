"""Record the communication of an unmodified training run: every collective and send/recv, with
bytes and times, and the forward/backward of the model's layers around them.

    torchrun --nproc_per_node 4 notebooks/trace.py --out DIR step03_tensor_parallel/train.py --tp 2
    python notebooks/trace.py --print DIR        # count and bytes per step, group and op

The step folders know nothing about this file. Before it runs the trainer (runpy, as __main__),
the recorder wraps, from the outside:
  - torch.distributed's collectives and point-to-point functions (the steps look them up as
    dist.xxx at call time, so replacing the module attributes is enough);
  - the step's ProcessGroupManager.__init__, to name each group after its dimension (pgm.tp_group
    -> "tp") and write this rank's coordinates;
  - module forward hooks on the first module that looks like the course's Llama (it has
    .model.layers, an nn.ModuleDict; a global hook finds it at its first call), its decoder
    layers, their self_attn and mlp blocks, embed_tokens and lm_head;
  - optimizer step hooks, the step's lr_at (called at the top of every optimizer step with its
    number) and, where the step has one, DataParallel.finish_gradient_synchronization and
    clip_grad_norm_ (the "optimizer" phase runs from the first of these to optimizer.step()).
So it also records a learner's modified copy of a step, as long as it keeps these names.

Every rank appends one JSON object per line to DIR/rank{N}.jsonl:
  {"ev": "meta", ...}  once: rank, world size, backend, this rank's coordinates and groups, and
     "machine": {"cpus": os.cpu_count(), "cpus_usable": the CPUs this process may run on
       (sched_getaffinity; = cpus where the OS cannot say), "processes": the processes of the run
       on this machine (LOCAL_WORLD_SIZE), "threads": torch's intra-op threads, "device": "cpu"
       under gloo, the GPU's name under nccl, "load": the 1-minute load average when the run
       started (other work on the machine), or null}. Timings from more processes than usable
       CPUs are oversubscribed: a span's wall time then includes waiting for a core (use "cpu").
  {"ev": "comm", "seq", "op", "dim", "ranks", "peer", "batch", "bytes", "sent", "dtype", "shape",
   "async", "t0", "t1", "t_wait", "t_done", "step", "phase", "module", "mb"}  per operation
     (seq: issue order on this rank; batch: ops posted by one batch_isend_irecv share it).
     dim: the group's name on the process-group manager ("dp", "tp", "pp", "cp", "mp", ...;
       "world" for the default group). A name made of axes ("cp_dp") drops the axes of size 1,
       so with cp = 1 the gradient all-reduce is "dp". A send/recv on the default group is
       named after the smallest named group holding both ends (a pipeline send is "pp").
     bytes: the whole logical tensor (all-reduce: the tensor; all-gather: the gathered output;
       reduce-scatter / all-to-all: the input; send/recv: the message).
     sent: estimate of what this rank puts on the wire with ring algorithms
       (all-reduce 2(n-1)/n x bytes; all-gather, reduce-scatter, all-to-all (n-1)/n x bytes).
     t0: issued; t1: returned (async ops: when wait() returned); t_wait: wait() called;
       t_done (gloo only): when gloo's background thread finished the op.
       Times are host seconds since the epoch: on a GPU they are launch times, not kernel times.
     step: the optimizer step (the argument of the trainer's lr_at call); phase/module/mb: the
       innermost open span when the op was issued (null: outside any).
  {"ev": "span", "phase", "module", "mb", "step", "t0", "t1", "cpu"}  forward/backward of a
     watched module (micro-batch mb = how many times it ran before in this step), or a named phase.
     cpu: the CPU seconds the thread consumed between t0 and t1 (time.thread_time; a CPU model's
     forward and backward run on the calling thread, so this is the compute without the waits:
     for a core, or in a blocking collective); null when the span ended on another thread.
  {"ev": "mem", "step", "saved_peak", "saved_at_start", "saved_by_module"}  per step: the most
     bytes autograd held at once for backward (saved tensors, counted once per storage, the
     model's parameters not counted), what was still held when the step began, and the bytes
     saved during the step by the innermost watched module (or phase) that saved them. Exact
     and device-independent: a saved_tensors_hooks pack hook counts what each graph keeps until
     the graph is freed.
Records are buffered and written between steps, so that encoding them does not stretch the spans.
"""
import atexit
import inspect
import json
import os
import runpy
import sys
import threading
import time
import weakref
from collections import Counter
from contextlib import contextmanager
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
# recorded under torch 2.11's names, so that a trace reads the same whichever torch recorded it
RENAMED = {"all_gather_single": "all_gather_into_tensor", "reduce_scatter_single": "reduce_scatter_tensor"}
P2P = ("send", "recv", "isend", "irecv")
FULL = {"all_gather_into_tensor": "output_tensor", "all_gather_single": "output_tensor", "all_gather": "tensor_list",
        "reduce_scatter_tensor": "input", "reduce_scatter_single": "input", "reduce_scatter": "input_list",
        "all_to_all_single": "input", "all_to_all": "input_tensor_list"}  # else the arg "tensor"
RING = {"all_reduce": lambda n: 2 * (n - 1) / n, "broadcast": lambda n: n > 1, "reduce": lambda n: n > 1,
        "send": lambda n: 1, "isend": lambda n: 1}  # the rest: (n-1)/n; recv, barrier: 0
AXES = ("dp", "pp", "cp", "tp")
_CLOCK = time.time() - time.perf_counter()  # perf_counter (monotonic) shifted to epoch seconds


def now():
    return time.perf_counter() + _CLOCK


def machine():
    """What the timings were measured on: CPUs, processes, threads, device (see the meta record)."""
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    on = dist.is_initialized()
    device = "cpu"
    if on and dist.get_backend() == "nccl" and torch.cuda.is_available():
        device = torch.cuda.get_device_name(torch.cuda.current_device())
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"cpus": cpus, "cpus_usable": usable, "threads": torch.get_num_threads(), "device": device,
            "processes": int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size() if on else 1)),
            "load": load}


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


class _Saved:
    """A tensor autograd keeps for backward; when the graph lets go of it, the count drops."""

    def __init__(self, tensor, key, tracer):
        self.tensor, self.key, self.tracer = tensor, key, tracer

    def __del__(self):
        self.tracer._release(self.key)


class CommTracer:
    """Wraps torch.distributed while it is open; .watch(model), .step(n), .phase(name), .close()."""

    def __init__(self, out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.rank = int(os.environ.get("RANK", dist.get_rank() if dist.is_initialized() else 0))
        self.file, self.buf = open(Path(out_dir) / f"rank{self.rank}.jsonl", "w"), []
        self.names, self.by_ranks, self.cache = {}, {}, {}  # id(group) / ranks -> name; (id, peer) -> (name, ranks)
        self.seq, self.batch, self.step_no, self.stack, self.counts, self.pending = 0, 0, None, [], {}, {}
        self.meta_written, self.closed, self.opt_span, self.pgm = False, False, None, None
        self.watched, self.open = {}, {}  # id(module) -> (name, top, backward); -> (open span, input)
        self.hooked = set()  # id of each hooked module's hook dict: a chunk view shares its model's
        self.params, self.held, self.live, self.peak, self.live_at_start = set(), {}, 0, 0, 0
        self.by_module = {}  # module or phase -> bytes first saved there this step
        self.threads = {}  # id(open span) -> the thread that opened it
        # every graph of the run packs its saved tensors through these (outer-most) hooks
        torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack).__enter__()
        # until the model is found, a global hook looks at every module's call (see _find_model)
        self.finder = nn.modules.module.register_module_forward_pre_hook(self._find_model)
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

    # --- the records ---
    def _write(self, rec):
        self.buf.append(rec)  # encoded between steps, so that tracing does not stretch the spans

    def _flush(self):
        self.file.write("".join(json.dumps(rec) + "\n" for rec in self.buf))
        self.file.flush()
        self.buf = []

    def set_pgm(self, pgm):
        """Name the groups of a process-group manager (pgm.tp_group -> "tp") and write the meta line."""
        self.pgm = weakref.ref(pgm)  # weakly: the tracer must not keep a process group alive
        groups = self._name_groups(pgm)
        coords = {k: v for k, v in vars(pgm).items() if k.endswith(("_rank", "_size")) and isinstance(v, int)}
        self._meta(groups, coords)

    def _name_groups(self, pgm):
        groups = {}
        sizes = {a: getattr(pgm, f"{a}_size", 1) for a in AXES}
        for attr, value in vars(pgm).items():
            if attr.endswith("_group") and isinstance(value, dist.ProcessGroup):
                attr, ranks = attr[:-len("_group")], tuple(dist.get_process_group_ranks(value))
                parts = attr.split("_")
                if all(p in AXES for p in parts) and len(parts) > 1:  # cp_dp with cp = 1 is "dp"
                    parts = [p for p in parts if sizes[p] > 1] or parts[-1:]
                name = "_".join(parts)
                groups[attr], self.names[id(value)] = list(ranks), name
                self.by_ranks.setdefault(ranks, name)
        return groups

    def _meta(self, groups=None, coords=None):
        if self.meta_written:
            return
        self.meta_written = True
        on = dist.is_initialized()
        self.futures = on and dist.get_backend() == "gloo"  # NCCL futures complete at launch: no t_done
        self.buf.insert(0, {"ev": "meta", "rank": self.rank, "world": dist.get_world_size() if on else 1,
                            "backend": dist.get_backend() if on else None, "groups": groups or {},
                            "coords": coords or {}, "machine": machine()})

    def _group(self, group, peer=None):
        """(name, global ranks) of a process group (None: the default group)."""
        key = (id(group), peer)
        if key not in self.cache:
            pgm = self.pgm() if self.pgm is not None else None
            if group is not None and id(group) not in self.names and pgm is not None:
                self._name_groups(pgm)  # a group made after the manager (pgm.pp_embed_group)
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
        self._meta()
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
            if depth or self.closed:  # called by another traced function: recorded there
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
                recs = [self._record(RENAMED.get(name, name), tensor, group, peer if name in P2P else None)]
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
        if self.opt_span is not None:  # a phase the optimizer hook did not close
            self._end(self.opt_span)
        self._mem_record()
        self.step_no, self.counts, self.stack, self.opt_span = step, {}, [], None
        self._meta()
        self._flush()

    def _begin(self, phase, module=None, outer=False, **fields):
        key = (phase, module)
        mb = self.counts.get(key, 0)
        self.counts[key] = mb + 1
        span = {"ev": "span", "phase": phase, "module": module, "mb": mb, "step": self.step_no,
                "t0": now(), "t1": None, "cpu": time.thread_time(), **fields}
        self.threads[id(span)] = threading.get_ident()
        if outer:
            self.stack.insert(0, span)
        else:
            self.stack.append(span)
        return span

    def _end(self, span):
        span["t1"] = now()
        same = self.threads.pop(id(span), None) == threading.get_ident()
        span["cpu"] = time.thread_time() - span["cpu"] if same else None  # CPU seconds of this thread
        if span in self.stack:
            self.stack.remove(span)
        self._write(span)

    @contextmanager
    def phase(self, name, **fields):
        """Context manager marking a named phase ("optimizer", ...) of this rank."""
        span = self._begin(name, **fields)
        try:
            yield
        finally:
            self._end(span)

    def optimizer_begins(self, *_):
        if self.opt_span is None:
            self.opt_span = self._begin("optimizer")

    def optimizer_ends(self, *_):
        if self.opt_span is not None:
            self._end(self.opt_span)
            self.opt_span = None

    def watch(self, model):
        """Spans for the forward and backward of `model` (a Llama), of each decoder layer, of their
        self_attn and mlp blocks and of lm_head; embed_tokens: forward only."""
        self.watched[id(model)] = ("model", True, True)
        self.params |= {p.untyped_storage().data_ptr() for p in model.parameters()}
        if isinstance(getattr(model.model, "embed_tokens", None), nn.Module):
            self.watched[id(model.model.embed_tokens)] = ("embed_tokens", False, False)
        for i, layer in model.model.layers.items():
            self.watched[id(layer)] = (f"layers.{i}", False, True)
            for block in ("self_attn", "mlp"):
                if isinstance(getattr(layer, block, None), nn.Module):
                    self.watched[id(getattr(layer, block))] = (f"layers.{i}.{block}", False, True)
        head = getattr(model, "lm_head", None)
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            self.watched[id(head)] = ("lm_head", False, True)
        for m in model.modules():
            if id(m) in self.watched and id(m._forward_pre_hooks) not in self.hooked:
                self.hooked.add(id(m._forward_pre_hooks))
                m.register_forward_pre_hook(self._fwd_pre)
                m.register_forward_hook(self._fwd_post)
        return self

    def _find_model(self, module, args):
        """Global forward pre-hook: the first module that looks like the course's Llama is watched.
        Then the hook goes (every module call paid for it); the hooks just registered on the model
        miss its current call, so its forward span is opened here."""
        if _looks_like_llama(module):
            self.finder.remove()
            self.watch(module)
            self._fwd_pre(module, args)

    # A module's backward starts when the grad of its output arrives and ends when the grad of its
    # input is complete (tensor hooks: cheaper than module backward hooks, which add autograd
    # nodes). The whole model's backward ends when the autograd pass ends.
    def _fwd_pre(self, module, args):
        if self.closed:
            return
        if id(module) not in self.watched:  # interleaved: a chunk's view of the model (its hooks are the model's)
            self.watch(module)
        name, top, _ = self.watched[id(module)]
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.open[id(module)] = (self._begin("forward", name), x if (x is not None and x.requires_grad and not top)
                                 else None)

    def _fwd_post(self, module, args, out):
        if id(module) not in self.open:
            return
        span, x = self.open.pop(id(module))
        self._end(span)
        name, top, backward = self.watched[id(module)]
        if backward and isinstance(out, torch.Tensor) and out.requires_grad:
            state = {}  # the open backward span of this call
            out.register_hook(partial(self._bwd_begin, state, name, top, x is None))
            if x is not None:
                x.register_hook(partial(self._bwd_end, state))

    def _bwd_begin(self, state, name, top, at_pass_end, grad):
        # the model's output may also be lm_head's: its span goes below the others
        state["span"] = self._begin("backward", name, outer=top)
        if at_pass_end:  # no input grad to wait for: the span ends with this autograd pass
            Variable._execution_engine.queue_callback(partial(self._bwd_end, state))

    def _bwd_end(self, state, *_):
        if "span" in state:
            self._end(state.pop("span"))

    # --- bytes saved for backward ---
    def _pack(self, t):
        key = t.untyped_storage().data_ptr()
        if t.device.type == "meta" or key in self.params:  # weights are not activations
            return t
        n = self.held.get(key, (0, 0))[0]
        if n == 0:
            self.live += t.untyped_storage().nbytes()
            self.peak = max(self.peak, self.live)
            span = self.stack[-1] if self.stack else {}
            where = span.get("module") or span.get("phase") or "other"
            self.by_module[where] = self.by_module.get(where, 0) + t.untyped_storage().nbytes()
        self.held[key] = (n + 1, t.untyped_storage().nbytes())
        return _Saved(t, key, self)

    def _release(self, key):
        n, nbytes = self.held[key]
        if n == 1:
            del self.held[key]
            self.live -= nbytes
        else:
            self.held[key] = (n - 1, nbytes)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _mem_record(self):
        if self.step_no is not None:
            self._write({"ev": "mem", "step": self.step_no, "saved_peak": self.peak,
                         "saved_at_start": self.live_at_start, "saved_by_module": self.by_module})
        self.peak = self.live_at_start = self.live
        self.by_module = {}

    def close(self):
        """Write what is still open and put torch.distributed back as it was."""
        if self.closed:
            return
        self.closed = True
        self._mem_record()
        for rec in list(self.pending.values()):  # async ops nobody waited for: t1 stays null
            self._write(rec)
        for mod, name, fn in self.saved:
            setattr(mod, name, fn)
        self._meta()
        self._flush()
        self.file.close()
        self.cache.clear()  # nothing here may keep a process group alive (see shutdown_distributed)


# ------------------------------------------------------------------ the launcher
def _looks_like_llama(module):
    return isinstance(getattr(getattr(module, "model", None), "layers", None), nn.ModuleDict)


def _wrap_method(cls, name, before):
    """cls.name now calls before() first (the original is kept as __wrapped__)."""
    fn = getattr(cls, name)

    def wrapped(*args, **kwargs):
        before()
        return fn(*args, **kwargs)

    wrapped.__wrapped__ = fn
    setattr(cls, name, wrapped)


def instrument(tracer, step_dir):
    """Patch the step's own modules (imported now from step_dir, so train.py gets the patched ones)."""
    import importlib

    sys.path.insert(0, str(step_dir))  # what train.py does first: the step's own modules
    mods = {}
    for name in ("utils", "process_group_manager", "data_parallel"):
        if (Path(step_dir) / f"{name}.py").is_file():
            mods[name] = importlib.import_module(name)
    utils = mods.get("utils")
    if utils is not None and hasattr(utils, "lr_at"):  # called with the step number at the top of each step
        lr_at = utils.lr_at
        utils.lr_at = lambda step, *a, **k: (tracer.step(step), lr_at(step, *a, **k))[1]
    if utils is not None and hasattr(utils, "clip_grad_norm_"):
        clip = utils.clip_grad_norm_
        utils.clip_grad_norm_ = lambda *a, **k: (tracer.optimizer_begins(), clip(*a, **k))[1]
    pgm_mod = mods.get("process_group_manager")
    if pgm_mod is not None and hasattr(pgm_mod, "ProcessGroupManager"):
        cls, init = pgm_mod.ProcessGroupManager, pgm_mod.ProcessGroupManager.__init__

        def pgm_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            tracer.set_pgm(self)

        cls.__init__ = pgm_init
    dp_mod = mods.get("data_parallel")
    if dp_mod is not None and hasattr(dp_mod, "DataParallel"):
        _wrap_method(dp_mod.DataParallel, "finish_gradient_synchronization", tracer.optimizer_begins)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(tracer.optimizer_ends)

    destroy = dist.destroy_process_group

    def destroy_then_close(*args, **kwargs):  # close first: the tracer must not outlive the groups
        tracer.close()
        return destroy(*args, **kwargs)

    dist.destroy_process_group = destroy_then_close


def main(argv):
    if argv[:1] == ["--print"]:
        return print_summary(argv[1])
    if len(argv) < 3 or argv[0] != "--out":
        raise SystemExit("usage: torchrun ... notebooks/trace.py --out DIR STEP/train.py [train.py flags]\n"
                         "       python notebooks/trace.py --print DIR")
    out, script, script_args = argv[1], Path(argv[2]).resolve(), argv[3:]
    tracer = CommTracer(out)
    instrument(tracer, script.parent)
    atexit.register(tracer.close)  # also when the trainer stops with an error
    sys.argv = [str(script), *script_args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        tracer.close()


def load_trace(trace_dir):
    """All records of DIR/rank*.jsonl as one list of dicts, each with its "rank"."""
    out = []
    for f in sorted(Path(trace_dir).glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        out += [dict(json.loads(line), rank=rank) for line in f.read_text().splitlines() if line]
    return out


def print_summary(trace_dir):
    """Count and bytes per step, group, op and rank."""
    n, b = Counter(), Counter()
    for r in load_trace(trace_dir):
        if r["ev"] == "comm":
            key = (r["step"], r["dim"], r["op"], r["rank"])
            n[key] += 1
            b[key] += r["bytes"]
    print(f"{'step':>4} {'dim':>6} {'op':<24} {'rank':>4} {'count':>6} {'bytes':>12}")
    for key in sorted(n, key=lambda k: tuple(str(x) for x in k)):
        print(f"{str(key[0]):>4} {key[1]:>6} {key[2]:<24} {key[3]:>4} {n[key]:>6} {b[key]:>12,}")


if __name__ == "__main__":
    main(sys.argv[1:])
