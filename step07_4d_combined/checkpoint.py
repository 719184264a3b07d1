"""Checkpoints: stop a 4D run anywhere and continue it exactly, under the same or any other layout.

Problem: long runs die (node failures, time limits) and come back on other machines. A resumed
run must give the losses of one that never stopped, so a checkpoint holds the weights, AdamW's
exp_avg / exp_avg_sq / step of every parameter, the step counter (the data position: step k
always reads global batch k, see data.py) and the RNG state.

Format, one folder per checkpoint, readable with safetensors and json alone (no pickle, no code):
    SAVE_DIR/step_000010/rank00000.safetensors ...  `model/<hf name>`, `adam/<hf name>/<state>`, `rng/cpu`
    SAVE_DIR/step_000010/meta.json   layout, model config, data position, file sizes, and for every
                                     tensor key {"shape": global, "dtype", "pieces": [[file, key, region]]}
    SAVE_DIR/latest                  "step_000010": the newest COMPLETE checkpoint
A piece is a region of the global tensor (reshard.py): a box such as a tp chunk, or a flat range.
One copy of each piece is written: dp and cp replicas are identical, so are the tp copies of
unsharded tensors and a tied lm_head on the last stage (= model.embed_tokens). Ranks with
dp = cp = 0 write their slices (tp rank 0 the unsharded tensors and every `step`), the others
their RNG state only. With --zero 1 (zero.py) every dp x cp rank also writes AdamW's state of
its own slices: flat ranges of the parameters, region {"box", "flat": [a, b]}, which any layout,
ZeRO or not, reads back. Bytes: 12 x parameters in all (float32 weights + two moments), at most
12 x parameters / (tp x pp) on one rank.

Save: every rank writes its file into step_N.tmp/ (temporary name, fsync, rename; its crc32 read
back); one all_gather_object over the world carries each rank's (ok, cause, size, pieces, crc32).
If a write failed, every rank stops with the same line naming that rank, and `latest` stays. Else
rank 0 writes meta.json, renames the folder step_N, writes `latest`, and broadcasts that it worked;
then it prunes (--keep-last). A crash at any moment leaves `latest` on the previous complete
checkpoint.
Resume, any layout: every rank runs the same checks (meta.json's schema, model, data, global batch,
file sizes) and the crc32 of each file it reads, and all agree before training (an all-gather of
every rank's outcome), so all stop with the same line. Each tensor it holds is filled from the
saved pieces that overlap it (reshard.read_region reads only the overlaps, into the rank's own
tensors: it holds its slices plus one overlap, never the model). Under the same layout a rank reads back exactly
what was written (replicas are bit-identical): the continuation is bit for bit.

Why not torch.distributed.checkpoint (DCP, torchtitan's choice)? It reshards the same way (a
file per rank + an index of chunks of global tensors), but it needs every parameter as a DTensor
on a device mesh to describe its shard, its .metadata index is a pickle, and a flat ZeRO range
of a tp shard has no public DTensor placement. Our parameters already carry .shard, a region is
a few integers, and the reader is 70 lines.
References: safetensors (Hugging Face); torch.distributed.checkpoint (PyTorch documentation).
"""
import errno
import json
import os
import shutil
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from model import full_shape
from reshard import read_region, region_of
from utils import agree, atomic_save_file, check_json, die, file_crc32, nonneg

LAYOUT = ("dp", "pp", "cp", "tp")
MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias",
              "rope_parameters")
# Change any of these and "global batch k" is other data: the flags that set each one.
DATA_KEYS = {"seq_len": "--seq-len", "seed": "--seed",
             "sequences": "--dataset, --tokenizer and --max-tokens (the packed dataset)",
             "tokens_crc32": "--dataset and --tokenizer (the first packed sequences differ)"}
ADAM_STATE = ("exp_avg", "exp_avg_sq", "step")  # what AdamW keeps per parameter: all of it, or --reset-optimizer
META = {"step": int, "tokens": int, "world": int, "layout": {d: int for d in LAYOUT}, "config": dict,
        "data": {k: int for k in (*DATA_KEYS, "global_batch", "micro_batch_size", "grad_acc_steps")},
        "files": {str: int}, "crc32": {str: int},
        "tensors": {str: {"shape": [int], "dtype": str, "pieces": [(str, str, dict)]}}}


def add_checkpoint_args(parser):
    a = parser.add_argument
    a("--save-dir", default=None, help="write checkpoints here: step_NNNNNN/ folders and a `latest` pointer")
    a("--save-every", type=nonneg, default=0, help="save every N optimizer steps and after the last (0: after "
                                                    "the last)")
    a("--keep-last", type=nonneg, default=0, help="after each save keep only the newest N checkpoints (0: keep all)")
    a("--resume", default=None, help="'latest' (newest complete checkpoint in --save-dir; none yet: start "
                                     "from step 0) or a checkpoint directory; any layout with the same global batch")
    a("--reset-optimizer", action="store_true", help="--resume the weights only: AdamW's moments start from zero")


def crash_here(where, step):
    """Tests only: exit abruptly, like a killed job (no cleanup, no flush), if the environment
    variable COURSE_CRASH_<where> equals `step`."""
    if os.environ.get(f"COURSE_CRASH_{where}") == str(step):
        os._exit(86)


def fail_here(rank, step):
    """Tests only: this rank's checkpoint write fails like a full disk if COURSE_FAIL_SAVE_RANK is
    its rank (and COURSE_FAIL_SAVE_STEP, when set, the checkpoint's step)."""
    if (os.environ.get("COURSE_FAIL_SAVE_RANK") == str(rank)
            and os.environ.get("COURSE_FAIL_SAVE_STEP", str(step)) == str(step)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _atomic_write_text(path, text):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: readers see the old or the new file, never half of one


class Checkpointer:
    def __init__(self, args, pgm, config, global_batch, sequences):
        self.args, self.pgm, self.config = args, pgm, config
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.layout = {d: getattr(pgm, f"{d}_size", 1) for d in LAYOUT}
        first = sequences[torch.arange(min(16, len(sequences)))]  # (16, T + 1): the corpus's first rows
        self.data = {"seq_len": args.seq_len, "global_batch": global_batch, "seed": args.seed,
                     "sequences": len(sequences), "tokens_crc32": zlib.crc32(first.numpy().tobytes()),
                     "micro_batch_size": args.micro_batch_size, "grad_acc_steps": args.grad_acc_steps}
        if (args.save_every or (args.resume == "latest")) and not args.save_dir:
            die("--save-every and --resume latest need --save-dir")
        self.last = None  # the newest checkpoint this run saved or resumed from, for stop_if_not_finite

    def _logical(self, name):
        """Tied embeddings: a last stage's lm_head.weight is a copy of model.embed_tokens.weight."""
        return "model.embed_tokens.weight" if name == "lm_head.weight" and self.config.tie_word_embeddings else name

    # ------------------------------------------------------------------ save
    def maybe_save(self, step, model, optimizer, tokens):
        """Call after optimizer step `step` (0-based) finished; saves as step_{step+1}."""
        done = step + 1
        a = self.args
        if a.save_dir and ((a.save_every and done % a.save_every == 0) or done == a.max_steps):
            self.save(done, model, optimizer, tokens)

    @staticmethod
    def stepped(model, optimizer):
        """(name, parameter, the tensor AdamW steps, its region): the parameter itself, or with
        --zero 1 this rank's flat slice [a, b) of it (region {"box": ..., "flat": [a, b]})."""
        names = {id(p): n for n, p in getattr(model, "module", model).named_parameters()}
        for group in optimizer.param_groups:
            for t in group["params"]:
                p, offset = getattr(t, "source", (t, None))  # zero.py marks its slices with .source
                region = region_of(p)
                if offset is not None:
                    region = {**region, "flat": [offset, offset + t.numel()]}
                yield names[id(p)], p, t, region

    def pieces(self, model, optimizer):
        """(key, tensor, global shape, region) this rank writes: one copy of every piece (docstring)."""
        pgm, replica = self.pgm, bool(self.pgm.dp_rank or self.pgm.cp_rank)  # dp = cp = 0 writes the copies
        zero = hasattr(model, "shards")  # --zero 1: every dp x cp rank holds its own slice of AdamW's state
        for name, p in getattr(model, "module", model).named_parameters():
            if self._logical(name) == name and not replica and (hasattr(p, "shard") or pgm.tp_rank == 0):
                yield f"model/{name}", p, full_shape(p), region_of(p)  # tp copies of unsharded tensors are equal
        for name, p, t, region in self.stepped(model, optimizer):
            if self._logical(name) != name or (replica and not zero) or (not hasattr(p, "shard") and pgm.tp_rank):
                continue  # the tied copy (written as model.embed_tokens.weight), or a copy of what is written
            for k, v in optimizer.state.get(t, {}).items():  # exp_avg, exp_avg_sq: like t; step: ()
                v = torch.as_tensor(v)
                if v.dim() == 0:  # equal in every copy: one holder writes it
                    if pgm.tp_rank == 0 and region.get("flat", [0])[0] == 0:
                        yield f"adam/{name}/{k}", v, [], {"box": []}
                else:
                    yield f"adam/{name}/{k}", v, full_shape(p), region

    def _latest_note(self):
        latest = Path(self.args.save_dir) / "latest"
        return f"latest still names {latest.read_text().strip()}" if latest.is_file() else "no checkpoint is complete"

    @torch.no_grad()
    def save(self, done, model, optimizer, tokens):
        t0, root = time.perf_counter(), Path(self.args.save_dir)
        final, name = root / f"step_{done:06d}", f"rank{self.rank:05d}.safetensors"
        folder = final.with_name(final.name + ".tmp")  # renamed once complete: never old and new files mixed
        tensors, index = {}, []
        for key, t, shape, region in self.pieces(model, optimizer):
            tensors[key] = t.detach().cpu().contiguous()
            index.append((key, shape, str(t.dtype).removeprefix("torch."), region))
        tensors["rng/cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng/cuda"] = torch.cuda.get_rng_state()
        ok, cause, size, crc = True, "", 0, 0
        try:  # a full disk, a permission, an I/O error: report it below instead of raising alone
            folder.mkdir(parents=True, exist_ok=True)  # every rank: exist_ok is race-free
            fail_here(self.rank, done)
            atomic_save_file(tensors, folder / name, {"step": str(done)})
            size, crc = (folder / name).stat().st_size, file_crc32(folder / name)  # read back: what resume checks
        except Exception as e:
            ok, cause = False, (e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0])
            (folder / f".{name}.tmp").unlink(missing_ok=True)  # give a full disk its space back
        crash_here("IN_SAVE", done)  # tests: every rank wrote its file, nobody wrote `latest`
        reports = [None] * self.world
        dist.all_gather_object(reports, (ok, cause, name, size, index, crc))  # all-gather over the world
        failed = [r for r, rep in enumerate(reports) if not rep[0]]
        if failed:  # every rank takes this branch: the same line everywhere, nobody left in a collective
            r, more = failed[0], f" (and {len(failed) - 1} more ranks)" if len(failed) > 1 else ""
            die(f"checkpoint {final.name} not saved: rank {r} could not write {folder / reports[r][2]} "
                f"({reports[r][1]}){more}; {self._latest_note()}")
        outcome = [""]
        if self.rank == 0:  # only now is the checkpoint complete: describe it, then point at it
            tensors_index = {}
            for _, _, fname, _, entries, _ in reports:
                for key, shape, dtype, region in entries:
                    e = tensors_index.setdefault(key, {"shape": shape, "dtype": dtype, "pieces": []})
                    e["pieces"].append([fname, key, region])
            meta = {"step": done, "tokens": tokens, "layout": self.layout, "world": self.world, "data": self.data,
                    "config": self.config.to_dict(), "files": {rep[2]: rep[3] for rep in reports},
                    "crc32": {rep[2]: rep[5] for rep in reports}, "tensors": tensors_index}
            try:
                _atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1, default=str))
                old = final.with_name(final.name + ".old")  # a step_N of a run that went further: replaced
                if final.exists():
                    os.replace(final, old)
                os.replace(folder, final)
                _atomic_write_text(root / "latest", final.name)
                shutil.rmtree(old, ignore_errors=True)
            except OSError as e:
                outcome = [f"checkpoint {final.name} not saved: rank 0 could not write {e.filename} "
                           f"({e.strerror}); {self._latest_note()}"]
        dist.broadcast_object_list(outcome, src=0)  # broadcast over the world: nobody runs ahead of `latest`
        if outcome[0]:
            die(outcome[0])
        self.last = final
        if self.rank == 0:
            self.prune(final.name)
        if self.rank == self.world - 1:
            print(f"saved {final} ({sum(rep[3] for rep in reports):,} bytes in {self.world} files, at most "
                  f"{max(rep[3] for rep in reports):,} per rank, {time.perf_counter() - t0:.2f} s)", flush=True)

    def prune(self, current):
        """Rank 0, once `latest` names `current`: keep it and the newest keep_last - 1 complete
        checkpoints before it; delete older ones and older incomplete folders (failed or crashed
        saves, never resumable). Folders after `current` (a run that went further before this one
        resumed from an earlier checkpoint) are left alone: this run overwrites them when it gets there."""
        if not self.args.keep_last:
            return
        step = lambda p: int(p.name[5:].removesuffix(".tmp"))  # noqa: E731  step_000010(.tmp) -> 10
        older = sorted((p for p in Path(self.args.save_dir).glob("step_*") if p.is_dir()
                        and p.name[5:].removesuffix(".tmp").isdigit() and step(p) < int(current[5:])), key=step)
        complete = [p for p in older if (p / "meta.json").is_file() and not p.name.endswith(".tmp")]
        keep = set(complete[-(self.args.keep_last - 1):]) if self.args.keep_last > 1 else set()
        for p in older:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)  # a folder it cannot delete stays: never worth a stop

    # ------------------------------------------------------------------ resume
    def find(self):
        """The checkpoint folder --resume names, or None (--resume latest before any save)."""
        r = Path(self.args.save_dir or ".") if self.args.resume == "latest" else Path(self.args.resume)
        if (r / "latest").is_file():  # a save dir: follow its pointer
            r = r / (r / "latest").read_text().strip()
        elif self.args.resume == "latest":
            return None
        if not (r / "meta.json").is_file():
            die(f"checkpoint {r} is missing or incomplete (no meta.json); pass a step_NNNNNN folder "
                f"written by --save-dir, or --resume latest")
        return r

    def check(self, folder):
        """Every rank runs every check, so every rank stops with the same line: no one hangs."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as e:
            die(f"checkpoint {folder.name}: meta.json is unreadable ({e})")
        if "tensors" not in meta or "crc32" not in meta:
            die(f"checkpoint {folder.name} has no tensor index or checksums (an older format); resume it with "
                f"the commit that wrote it")
        try:  # every entry read below has its type, every file its size and checksum, every piece its file
            check_json(meta, META, what=f"checkpoint {folder.name}: meta.json")
            lost = {f for e in meta["tensors"].values() for f, _, _ in e["pieces"]} - set(meta["files"])
            if set(meta["crc32"]) != set(meta["files"]) or lost:
                raise ValueError(f"checkpoint {folder.name}: meta.json names files it has no size or checksum of")
        except ValueError as e:
            die(f"{e}; resume from another checkpoint")
        for k in MODEL_KEYS:
            old, new = meta["config"].get(k), getattr(self.config, k, None)
            if old != new:
                die(f"checkpoint {folder.name} is for a model with {k}={old}, this run has {k}={new}; "
                    f"resume with the same --model and shape flags")
        old, new, a, dp = meta["data"], self.data, self.args, self.layout["dp"]
        if old["global_batch"] != new["global_batch"]:  # step k must read the same G sequences
            G = old["global_batch"]
            per = G // dp  # sequences per dp rank and step
            mbs = max(m for m in range(1, min(a.micro_batch_size, max(per, 1)) + 1) if per % m == 0) if per else 0
            fix = (f"use --micro-batch-size {mbs} --grad-acc-steps {per // mbs} with dp {dp}" if G % dp == 0
                   else f"use a dp that divides {G}")
            die(f"checkpoint {folder.name} was trained with a global batch of {G} sequences (--micro-batch-size "
                f"{old['micro_batch_size']} x --grad-acc-steps {old['grad_acc_steps']} x dp {meta['layout']['dp']}), "
                f"this run has {new['global_batch']} ({a.micro_batch_size} x {a.grad_acc_steps} x dp {dp}); "
                f"{fix} so step k reads global batch k")
        for k, flags in DATA_KEYS.items():
            if old[k] != new[k]:
                die(f"checkpoint {folder.name} was written with {k}={old[k]}, this run has "
                    f"{new[k]}; resume with the same {flags} so step k reads the same data")
        for name, size in sorted(meta["files"].items()):
            f = folder / name
            if not f.is_file():
                die(f"checkpoint {folder.name}: {name} is missing")
            if f.stat().st_size != size:
                die(f"checkpoint {folder.name}: {name} is truncated or changed "
                    f"({f.stat().st_size} bytes, {size} were written)")
        return meta

    def resume(self, model, optimizer):
        """Fill model and optimizer from a checkpoint of any layout; return (first step to run, tokens seen).
        Every rank loads what it holds, then all agree (config_checks.agree) before any training
        collective: one rank's damaged piece stops every rank, with that rank's line."""
        return agree(lambda: self._load(model, optimizer), self.world)

    @torch.no_grad()
    def _load(self, model, optimizer):
        folder = self.find()
        if folder is None:
            if self.rank == self.world - 1:
                print(f"no checkpoint in {self.args.save_dir} yet: starting from step 0", flush=True)
            return 0, 0
        meta = self.check(folder)
        t0, nbytes, index = time.perf_counter(), 0, meta["tensors"]
        state = optimizer.state_dict()  # rebuilt with the saved moments; load_state_dict moves them
        position = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        # Same layout: every rank's own RNG state. Another layout: rank 0's for everyone; every rank
        # seeds the same --seed and training draws no random numbers, so all saved states are equal.
        rng_file = f"rank{self.rank:05d}.safetensors" if meta["layout"] == self.layout else "rank00000.safetensors"
        handles = {}  # file name -> safe_open handle, opened on first use

        def open_file(fname):
            if fname not in handles:  # each file this rank reads is checked whole, once
                if file_crc32(folder / fname) != meta["crc32"][fname]:
                    die(f"checkpoint {folder.name}: {fname} does not match its checksum (changed or damaged "
                        f"since it was written); resume from another checkpoint")
                handles[fname] = safe_open(folder / fname, "pt")
            return handles[fname]

        def fill(dst, key, region):
            if key not in index:
                die(f"checkpoint {folder.name} has no {key}; it was written for another model")
            try:
                return read_region(dst, region, index[key], open_file)
            except Exception as e:  # a file that passed the size check but does not parse
                files = ", ".join(sorted({f for f, _, _ in index[key]["pieces"]}))
                die(f"checkpoint {folder.name}: cannot read {key} from {files} ({str(e).splitlines()[0]})")

        for name, p in getattr(model, "module", model).named_parameters():
            logical = self._logical(name)
            saved_shape = index.get(f"model/{logical}", {}).get("shape")
            if saved_shape is not None and saved_shape != full_shape(p):
                die(f"checkpoint {folder.name}: {logical} is {saved_shape}, this model's is {full_shape(p)}; "
                    f"resume with the same --model and shape flags")
            nbytes += fill(p.data, f"model/{logical}", region_of(p))
        for name, p, t, region in self.stepped(model, optimizer):  # with --zero 1: this rank's slices
            logical, saved = self._logical(name), {}
            if self.args.reset_optimizer:  # on purpose: fresh moments
                continue
            missing = [k for k in ADAM_STATE if f"adam/{logical}/{k}" not in index]
            if missing:
                die(f"checkpoint {folder.name} has no adam/{logical}/{missing[0]}: AdamW's state is incomplete; "
                    f"resume from another checkpoint, or pass --reset-optimizer to start its moments from zero")
            for key in (k for k in index if k.startswith(f"adam/{logical}/")):  # exp_avg, exp_avg_sq, step
                shape = index[key]["shape"]
                saved[key.rsplit("/", 1)[1]] = dst = torch.empty(t.shape if shape else (),
                                                                 dtype=getattr(torch, index[key]["dtype"]))
                nbytes += fill(dst, key, region if shape else {"box": []})
            if saved:
                state["state"][position[id(t)]] = saved
        f = open_file(rng_file)
        rng_cpu = f.get_tensor("rng/cpu")
        rng_cuda = f.get_tensor("rng/cuda") if "rng/cuda" in f.keys() else None
        handles.clear()
        optimizer.load_state_dict(state)
        torch.set_rng_state(rng_cpu)
        if rng_cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng_cuda)
        if self.rank == self.world - 1:
            was = " ".join(f"{d}={meta['layout'][d]}" for d in LAYOUT)
            print(f"resumed from {folder} (step {meta['step']}, written with {was}): this rank read "
                  f"{nbytes:,} bytes in {time.perf_counter() - t0:.2f} s", flush=True)
        self.last = folder
        return meta["step"], meta["tokens"]
