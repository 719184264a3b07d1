"""Step 01: pre-train a Llama model on a single device.

This trainer is the reference every later step is checked against: same seed, same global
batch, same per-step loss. Read it top to bottom; README.md has the commands.
"""
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this step's own modules
from data import DEFAULT_DATASET, DEFAULT_TOKENIZER, global_batch, load_sequences, load_tokenizer
from model import Llama, init_weights, load_hf_weights, materialize
from utils import (Metrics, base_parser, batch_note, clip_grad_norm_, die, dump_params, lr_at, make_config,
                   memory_gib, resolve_device_dtype, stop_if_not_finite)


def main():
    # --- command line ---
    parser = base_parser("Step 01: train a Llama model on one device")
    args = parser.parse_args()

    # --- distributed setup ---
    # One process. (Launched by torchrun with one process, we simply ignore its variables.)
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        die("step01 trains on one device; launch it with --nproc_per_node 1, or use step02+ for more")
    world_size, rank = 1, 0
    device, dtype = resolve_device_dtype(args)
    is_logger = True
    torch.manual_seed(args.seed)

    # --- model ---
    config = make_config(args, device)
    with torch.device("meta"):  # shapes only: no memory, no time spent on a throw-away init
        model = Llama(config)
    materialize(model, device)
    init_weights(model, args.seed)
    if os.path.isdir(args.model) and any(f.endswith(".safetensors") for f in os.listdir(args.model)):
        load_hf_weights(model, args.model)  # --model DIR with weights: start from them
    n_params = sum(p.numel() for p in model.parameters())

    # --- data ---
    G = args.micro_batch_size * args.grad_acc_steps  # sequences per optimizer step
    try:
        tokenizer = load_tokenizer(args.tokenizer or DEFAULT_TOKENIZER)
        sequences = load_sequences(args.dataset or DEFAULT_DATASET, tokenizer, args.seq_len, G,
                                   max_tokens=args.max_tokens, cache_dir=args.data_cache,
                                   text_column=args.text_column)  # (N, T + 1), mapped
    except (OSError, ValueError) as e:
        die(str(e).splitlines()[0])
    if len(tokenizer) > config.vocab_size:
        die(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}; "
            f"pass --vocab-size {len(tokenizer)} or a matching --tokenizer")

    def local_micro_batches(step):
        """The micro-batches this process runs for optimizer step `step`: (x, y) pairs of (mbs, T)."""
        batch = global_batch(len(sequences), step, G, args.seed)  # (G,) row indices of global batch `step`
        for m in range(args.grad_acc_steps):
            mine = batch[m * args.micro_batch_size:(m + 1) * args.micro_batch_size]  # (mbs,) row indices
            rows = sequences[mine].to(device)  # (mbs, T + 1): only these rows are read from the token file
            yield rows[:, :-1], rows[:, 1:]  # inputs and next-token targets, each (mbs, T)

    # --- optimizer ---
    # Weight decay on matrices only (not on norm gains), as in GPT-2/Llama training.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.startswith("cuda"))
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if dtype == "bfloat16"
                else nullcontext())  # bf16 compute, float32 weights and gradients

    def loss_fn(logits, targets):
        """Mean token cross-entropy of one micro-batch: logits (mbs, T, V), targets (mbs, T)."""
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    # --- training loop ---
    def forward_backward(micro_batches):
        """Forward and backward of each micro-batch; gradients add up in p.grad. -> summed loss"""
        loss_sum = torch.zeros((), device=device)
        for x, y in micro_batches:
            with autocast:
                logits = model(x)  # (mbs, T, V)
            loss = loss_fn(logits, y)
            (loss / args.grad_acc_steps).backward()  # gradients add up over the micro-batches
            loss_sum += loss.detach()
        return loss_sum

    if is_logger:
        print(f"model {args.model}: {n_params / 1e6:.2f}M parameters | {len(sequences)} sequences of "
              f"{args.seq_len} tokens | global batch {G} sequences{batch_note(G, args.micro_batch_size)} | "
              f"{device} {dtype}")
    metrics = Metrics(args.log_file, enabled=is_logger)
    tokens_seen = 0
    for step in range(args.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        loss_sum = forward_backward(local_micro_batches(step))

        grad_norm = clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # --- logging ---
        loss_avg = (loss_sum / args.grad_acc_steps).item()  # .item() waits for the device: a sync point
        dt = time.perf_counter() - t0
        tokens_seen += G * args.seq_len
        metrics.log(step=step, loss=loss_avg, lr=lr, grad_norm=grad_norm.item(), tokens=tokens_seen,
                    tokens_per_s=G * args.seq_len / dt, step_time_s=dt, mem_gib=memory_gib(device))
        stop_if_not_finite(step, loss_avg, grad_norm)  # NaN or inf: stop before anything is saved

    metrics.close()
    if args.dump_params:
        dump_params(model, args.dump_params, rank)


if __name__ == "__main__":
    main()
