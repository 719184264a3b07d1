"""Benchmark one GPU: the course's model against transformers.LlamaForCausalLM, same shapes.

Problem: equal losses prove the parallel code correct, not fast. This script trains a preset
for a few steps on random tokens, in this process on one device (no torchrun, no data
pipeline), and prints one JSON line: tokens/s, tokens/s/GPU, MFU and peak memory for
  course:        this step's Llama (model.py), float32 weights + bf16 autocast, as train.py;
  transformers:  LlamaForCausalLM built from the same config, same precision, same loss,
                 same optimizer: the baseline a reader would otherwise use.
Fast path, both models: fused AdamW (one kernel for all parameters), SDPA restricted to
the flash-attention backend on CUDA (where no flash kernel fits, SDPA's default choice, and
the JSON's "attention" says so), --compile compiles every decoder layer (torch.compile),
and no host synchronisation inside a step (the loss stays on the device; the clock is read
after torch.cuda.synchronize() around the timed steps only). Multi-GPU numbers come from
train.py's own log line (mfu, tokens_per_s_per_gpu) under torchrun.
MFU uses mfu.py's formula and peak table (or --peak-tflops).
"""
import gc
import json
import os
import sys
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the trainer's modules
from mfu import MFU, add_mfu_args
from model import Llama, materialize
from utils import PRESETS, base_parser, clip_grad_norm_, die, make_config


def parse_args(argv=None):
    p = base_parser("benchmark the course model against transformers' Llama on one device")
    p.set_defaults(model="smollm-1.7b", seq_len=2048, micro_batch_size=4, lr=3e-4)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    p.add_argument("--compile", action="store_true", help="torch.compile every decoder layer (both models)")
    p.add_argument("--baseline", choices=["transformers", "none"], default="transformers")
    add_mfu_args(p)
    return p.parse_args(argv)


def init_(model, std):
    """Benchmark weights: values do not matter for speed, so draw them on the device (fast)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, std)


def measure(name, model, logits_of, args, device, dtype, mfu, flash):
    """Train `model` for warmup + steps on random tokens; return the numbers for the JSON line."""
    V = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randint(0, V, (args.micro_batch_size, args.seq_len + 1), generator=g).to(device)
               for _ in range(4)]  # (mbs, T + 1), made before the clock starts
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.startswith("cuda"))
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if dtype == "bfloat16" \
        else nullcontext()
    attention = nullcontext  # a factory: sdpa_kernel's context manager is single-use
    if flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        attention = partial(sdpa_kernel, [SDPBackend.FLASH_ATTENTION])  # only flash: errors, never falls back
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step(i):
        rows = batches[i % len(batches)]
        with autocast, attention():
            logits = logits_of(rows[:, :-1])  # (mbs, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        loss.backward()
        clip_grad_norm_(model.parameters(), args.grad_clip)  # the norm stays on the device: no sync
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for i in range(args.warmup):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i)
    sync()
    dt = time.perf_counter() - t0
    tokens_per_s = args.steps * args.micro_batch_size * args.seq_len / dt
    m = mfu(tokens_per_s)
    out = {"tokens_per_s": round(tokens_per_s, 1), "tokens_per_s_per_gpu": m["tokens_per_s_per_gpu"],
           "mfu": m.get("mfu"), "step_time_s": round(dt / args.steps, 4), "loss": round(loss.item(), 4),
           "attention": "sdpa-flash" if flash else "sdpa-default"}
    if device.startswith("cuda"):
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(f"{name}: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def measure_flash_first(name, model, logits_of, args, device, dtype, mfu):
    """On CUDA try flash attention only; if no flash kernel fits (dtype, head_dim, a mask), say so
    and measure with SDPA's default backend choice instead."""
    if not device.startswith("cuda"):
        return measure(name, model, logits_of, args, device, dtype, mfu, flash=False)
    try:
        return measure(name, model, logits_of, args, device, dtype, mfu, flash=True)
    except RuntimeError as e:
        print(f"{name}: no flash-attention kernel ({str(e).splitlines()[0][:200]}); using SDPA's default",
              file=sys.stderr)
        model.zero_grad(set_to_none=True)
        return measure(name, model, logits_of, args, device, dtype, mfu, flash=False)


def main(argv=None):
    args = parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        die("no CUDA GPU visible: benchmark.py measures GPU throughput; "
            "for a smoke run on this machine pass --device cpu --model tiny")
    if args.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda but no GPU is visible; use --device cpu --model tiny for a smoke run")
    device = "cuda:0" if (args.device or "cuda") == "cuda" else "cpu"
    dtype = args.dtype or ("bfloat16" if device != "cpu" else "float32")
    if device == "cpu" and args.model not in ("tiny",) and args.model in PRESETS:
        print(f"note: {args.model} on a CPU is slow; --model tiny is the smoke-test size", file=sys.stderr)
    config = make_config(args)
    mfu = MFU(config, args.seq_len, 1, device, args.peak_tflops)
    result = {"model": args.model, "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size,
              "device": mfu.device_name, "dtype": dtype, "compile": args.compile, "steps": args.steps,
              "flops_per_token": mfu.flops_per_token,
              "peak_tflops": mfu.peak / 1e12 if mfu.peak else None}

    # --- the course's model ---
    with torch.device("meta"):
        model = Llama(config)
    materialize(model, device)
    init_(model, config.initializer_range)
    if args.compile:
        for layer in model.model.layers.values():
            layer.compile()  # in place: parameter names (and the HF mapping) stay the same
    result["course"] = measure_flash_first("course", model, model, args, device, dtype, mfu)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    # --- the baseline: transformers ---
    if args.baseline == "transformers":
        from transformers import LlamaForCausalLM

        config._attn_implementation = "sdpa"
        with torch.device(device):
            hf = LlamaForCausalLM(config)
        init_(hf, config.initializer_range)
        if args.compile:
            for layer in hf.model.layers:
                layer.compile()
        logits_of = lambda x: hf(x, use_cache=False).logits  # noqa: E731  (B, T) -> (B, T, V)
        result["transformers"] = measure_flash_first("transformers", hf, logits_of, args, device, dtype, mfu)
        result["course_vs_transformers"] = round(
            result["course"]["tokens_per_s"] / result["transformers"]["tokens_per_s"], 3)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
