"""Hugging Face interop: start from a transformers Llama checkpoint, hand the result back as one.

Problem: pre-training rarely starts from nothing (continued pre-training, fine-tuning), and the
trained model is only useful where the ecosystem can load it. Our parameter names are those of
transformers.LlamaForCausalLM, so both directions are bookkeeping about shards.

Import (--init-from-hf DIR or hub name): the config comes from DIR/config.json; every rank
builds its part of the model (its pipeline stage, its tp shards), then reads from the
safetensors only the slices it owns (safe_open(...).get_slice: no rank loads the full model).
That is model.load_hf_weights; this file adds the hub download and one-line errors.
Export (--export-hf DIR): ranks with dp_rank = cp_rank = 0 (one copy of every weight: dp and
cp replicas are identical) write their slices and their .shard = (dim, index, count) to
DIR/.parts/; after a barrier rank 0 concatenates the slices of each tensor along `dim` and
writes DIR/model.safetensors (float32) + config.json (+ the tokenizer). A tied embedding is
written once, as model.embed_tokens.weight (the copy a pipeline's last stage holds as
lm_head.weight is skipped), which is what save_pretrained does and from_pretrained expects.
Cost: rank 0 holds the whole model in CPU memory once (4 bytes x parameters); the parts pass
through the shared filesystem, which multi-node runs need anyway for checkpoints.
"""
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from model import load_hf_weights
from utils import atomic_save_file, die


def add_hf_args(parser):
    a = parser.add_argument
    a("--init-from-hf", default=None, help="start from a transformers Llama: a directory with config.json + "
                                           "*.safetensors, or a hub name (online); its config sets the model")
    a("--export-hf", default=None, help="after training write this directory: config.json + model.safetensors "
                                        "for transformers.LlamaForCausalLM.from_pretrained")


def resolve_hf_source(name):
    """A local directory for --init-from-hf: the directory itself, or a hub snapshot (every rank
    calls snapshot_download; the hub client's file locks make concurrent calls safe)."""
    p = Path(name).expanduser()
    if p.is_dir() or name.startswith((".", "/", "~")):
        if not (p / "config.json").is_file():
            die(f"--init-from-hf {name}: no config.json there; pass a directory written by save_pretrained")
        if not list(p.glob("*.safetensors")):
            die(f"--init-from-hf {name}: no *.safetensors there (only safetensors checkpoints are read)")
        return str(p)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # offline, unknown repo, gated model...
        die(f"--init-from-hf {name}: not a local directory and the hub download failed "
            f"({type(e).__name__}: {str(e).splitlines()[0]})")


def load_hf(model, path):
    """model.load_hf_weights (each rank reads its own slices) with one-line errors."""
    try:
        load_hf_weights(model, path)
    except (ValueError, KeyError, FileNotFoundError) as e:
        msg = str(e).strip("'\"").splitlines()[0].split(";")[0]  # the tensor and both shapes
        die(f"the weights in {path} do not fit the model its config.json (and any shape flags) "
            f"describes: {msg}")


def assemble(parts):
    """{name: [(shard tuple or (), tensor), ...]} -> {name: full tensor}: cat the slices along dim."""
    full = {}
    for name, pieces in parts.items():
        shard, t = pieces[0]
        if not shard:
            full[name] = t
            continue
        dim, _, count = shard
        by_index = {s[1]: x for s, x in pieces}
        if sorted(by_index) != list(range(count)):
            raise RuntimeError(f"{name}: slices {sorted(by_index)} of {count} were written")
        full[name] = torch.cat([by_index[i] for i in range(count)], dim=dim).contiguous()
    return full


@torch.no_grad()
def export_hf(model, pgm, config, out_dir, tokenizer=None):
    """Write out_dir as a transformers checkpoint (collective: every rank must call it)."""
    core = getattr(model, "module", model)
    out = Path(out_dir)
    parts_dir = out / ".parts"
    rank = dist.get_rank()
    parts_dir.mkdir(parents=True, exist_ok=True)
    if getattr(pgm, "dp_rank", 0) == 0 and getattr(pgm, "cp_rank", 0) == 0:  # one copy of each slice
        tensors, meta = {}, {}
        for name, p in core.named_parameters():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # a pipeline's last-stage copy of the tied embedding: written once, by stage 0
            tensors[name] = p.detach().float().cpu().contiguous()
            meta[name] = json.dumps(list(getattr(p, "shard", ())))
        save_file(tensors, parts_dir / f"rank{rank:05d}.safetensors", metadata=meta)
    dist.barrier()  # every slice is on disk
    if rank == 0:
        parts = {}
        for f in sorted(parts_dir.glob("rank*.safetensors")):
            with safe_open(f, "pt") as fh:
                shards = fh.metadata()
                for name in fh.keys():
                    parts.setdefault(name, []).append((tuple(json.loads(shards[name])), fh.get_tensor(name)))
        full = assemble(parts)
        # transformers checks the "format" entry
        atomic_save_file(full, out / "model.safetensors", {"format": "pt"})
        cfg = config.__class__.from_dict(config.to_dict())  # a copy: the run's config stays as it is
        cfg.architectures = ["LlamaForCausalLM"]
        cfg.dtype = "float32"
        cfg.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        shutil.rmtree(parts_dir)
        n = sum(t.numel() for t in full.values())
        print(f"exported {len(full)} tensors ({n / 1e6:.2f}M parameters) to {out}", flush=True)
    dist.barrier()  # the directory is complete before anyone exits
