"""Checkpoints: stop a 4D run anywhere and continue it exactly, from files every rank writes itself.

Problem: long runs die (node failures, job time limits). Resuming must give the same losses
as a run that never stopped, so a checkpoint holds everything the next step depends on:
the weights, AdamW's exp_avg / exp_avg_sq / step of every parameter, the step counter (the
data position: step k always reads the global batch k, see data.py) and the RNG state.

Layout on disk, one folder per checkpoint:
    SAVE_DIR/step_000010/rank00000.safetensors ... rank{world-1}   this rank's shards and Adam state
    SAVE_DIR/step_000010/meta.json     layout, model config, data position, size of every file
    SAVE_DIR/latest                    "step_000010": the newest COMPLETE checkpoint
Each rank writes only its own slices (no gather, no rank holding the whole model): bytes per
rank = 12 x its parameters (float32 weights + two Adam moments). Every file is written to a
temporary name and renamed (os.replace is atomic), so a reader never sees half a file.
Communication: one all-gather of the file sizes (all_gather_object over the world), then
rank 0 writes meta.json and only then `latest`: a crash at any moment leaves `latest` on the
previous complete checkpoint. Resuming checks meta.json and every file's size on every rank
before reading anything, so a bad checkpoint stops all ranks with the same one-line error
instead of leaving some of them waiting in a collective.
A checkpoint resumes only under the layout (dp, pp, cp, tp) that wrote it: each file holds
slices cut for that layout (their .shard is stored, so resharding is possible; see README).
Reference: safetensors (Hugging Face), a format with no code execution on load.
"""
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from utils import atomic_save_file, die

LAYOUT = ("dp", "pp", "cp", "tp")
MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias",
              "rope_parameters")
# Change any of these and "global batch k" is other data: the flags that set each one.
DATA_KEYS = {"seq_len": "--seq-len", "global_batch": "--micro-batch-size x --grad-acc-steps x dp",
             "seed": "--seed", "sequences": "--dataset, --tokenizer and --max-tokens (the packed dataset)"}


def add_checkpoint_args(parser):
    a = parser.add_argument
    a("--save-dir", default=None, help="write checkpoints here: step_NNNNNN/ folders and a `latest` pointer")
    a("--save-every", type=int, default=0, help="save every N optimizer steps and after the last (0: after the last)")
    a("--resume", default=None, help="'latest' (newest complete checkpoint in --save-dir; none yet: start "
                                     "from step 0) or a checkpoint directory")


def crash_here(where, step):
    """Tests only: exit abruptly, like a killed job (no cleanup, no flush), if the environment
    variable COURSE_CRASH_<where> equals `step`."""
    if os.environ.get(f"COURSE_CRASH_{where}") == str(step):
        os._exit(86)


def _atomic_write_text(path, text):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: readers see the old or the new file, never half of one


class Checkpointer:
    def __init__(self, args, pgm, config, global_batch, n_sequences):
        self.args, self.pgm, self.config = args, pgm, config
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.layout = {d: getattr(pgm, f"{d}_size", 1) for d in LAYOUT}
        self.data = {"seq_len": args.seq_len, "global_batch": global_batch, "seed": args.seed,
                     "sequences": n_sequences}
        if (args.save_every or (args.resume == "latest")) and not args.save_dir:
            die("--save-every and --resume latest need --save-dir")

    # ------------------------------------------------------------------ save
    def maybe_save(self, step, model, optimizer, tokens):
        """Call after optimizer step `step` (0-based) finished; saves as step_{step+1}."""
        done = step + 1
        a = self.args
        if a.save_dir and ((a.save_every and done % a.save_every == 0) or done == a.max_steps):
            self.save(done, model, optimizer, tokens)

    @torch.no_grad()
    def save(self, done, model, optimizer, tokens):
        folder = Path(self.args.save_dir) / f"step_{done:06d}"
        folder.mkdir(parents=True, exist_ok=True)  # every rank: no barrier needed, exist_ok is race-free
        core = getattr(model, "module", model)  # DataParallel keeps the Llama in .module
        tensors, shards = {}, {}
        for name, p in core.named_parameters():
            tensors[f"model/{name}"] = p.detach().cpu().contiguous()
            shards[name] = list(getattr(p, "shard", ()))
            for key, value in optimizer.state.get(p, {}).items():  # exp_avg, exp_avg_sq, step
                tensors[f"adam/{name}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        tensors["rng/cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng/cuda"] = torch.cuda.get_rng_state()
        name = f"rank{self.rank:05d}.safetensors"
        atomic_save_file(tensors, folder / name, {"step": str(done), "shards": json.dumps(shards)})
        crash_here("IN_SAVE", done)  # tests: every rank wrote its file, nobody wrote `latest`
        sizes = [None] * self.world
        dist.all_gather_object(sizes, (name, (folder / name).stat().st_size))  # all-gather over the world
        if self.rank == 0:  # only now is the checkpoint complete: describe it, then point at it
            meta = {"step": done, "tokens": tokens, "layout": self.layout, "world": self.world,
                    "data": self.data, "config": self.config.to_dict(), "files": dict(sizes)}
            _atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1, default=str))
            _atomic_write_text(Path(self.args.save_dir) / "latest", folder.name)
        dist.barrier()  # nobody runs ahead (or crashes) before `latest` points here
        if self.rank == self.world - 1:
            print(f"saved {folder}", flush=True)

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
        lay = meta["layout"]
        if lay != self.layout:
            die(f"checkpoint {folder.name} was written with "
                + " ".join(f"{d}={lay[d]}" for d in LAYOUT) + "; resume with that layout")
        for k in MODEL_KEYS:
            old, new = meta["config"].get(k), getattr(self.config, k, None)
            if old != new:
                die(f"checkpoint {folder.name} is for a model with {k}={old}, this run has {k}={new}; "
                    f"resume with the same --model and shape flags")
        for k, flags in DATA_KEYS.items():
            if meta["data"][k] != self.data[k]:
                die(f"checkpoint {folder.name} was written with {k}={meta['data'][k]}, this run has "
                    f"{self.data[k]}; resume with the same {flags} so step k reads the same data")
        for name, size in sorted(meta["files"].items()):
            f = folder / name
            if not f.is_file():
                die(f"checkpoint {folder.name}: {name} is missing")
            if f.stat().st_size != size:
                die(f"checkpoint {folder.name}: {name} is truncated or changed "
                    f"({f.stat().st_size} bytes, {size} were written)")
        return meta

    @torch.no_grad()
    def resume(self, model, optimizer):
        """Load this rank's file into model and optimizer; return (first step to run, tokens seen)."""
        folder = self.find()
        if folder is None:
            if self.rank == self.world - 1:
                print(f"no checkpoint in {self.args.save_dir} yet: starting from step 0", flush=True)
            return 0, 0
        meta = self.check(folder)
        name = f"rank{self.rank:05d}.safetensors"
        core = getattr(model, "module", model)
        params = dict(core.named_parameters())
        try:
            with safe_open(folder / name, "pt") as f:
                for n, p in params.items():
                    p.copy_(f.get_tensor(f"model/{n}"))
                # rebuild optimizer.state_dict() with the saved moments; load_state_dict puts each
                # tensor on its parameter's device (and `step` where the fused kernel wants it)
                state = optimizer.state_dict()
                order = [p for g in optimizer.param_groups for p in g["params"]]
                index = {id(p): i for i, p in enumerate(order)}
                keys = set(f.keys())
                for n, p in params.items():
                    saved = {k.rsplit("/", 1)[1]: f.get_tensor(k) for k in keys if k.startswith(f"adam/{n}/")}
                    if saved:
                        state["state"][index[id(p)]] = saved
                rng_cpu = f.get_tensor("rng/cpu")
                rng_cuda = f.get_tensor("rng/cuda") if "rng/cuda" in keys else None
        except Exception as e:  # a file that passed the size check but does not parse, or lacks a tensor
            die(f"checkpoint {folder.name}: {name} is unreadable ({str(e).splitlines()[0]})")
        optimizer.load_state_dict(state)
        torch.set_rng_state(rng_cpu)
        if rng_cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng_cuda)
        if self.rank == self.world - 1:
            print(f"resumed from {folder} (step {meta['step']})", flush=True)
        return meta["step"], meta["tokens"]
