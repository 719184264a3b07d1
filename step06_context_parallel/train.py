"""Step 06: context parallelism. Every sequence is split across the cp ranks (zig-zag, so
causal attention work is balanced) and attention runs as a ring that passes key/value blocks
around the cp group, on top of the other three dimensions: world = dp x pp x cp x tp.

Same seed, same global batch and same per-step loss as step01. README.md has the commands.
"""
import os
import sys
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this step's own modules
from context_parallel import check_cp, ring_attention, zigzag_positions, zigzag_slice
from data_parallel import DataParallel
from data import DEFAULT_DATASET, DEFAULT_TOKENIZER, global_batch, load_sequences, load_tokenizer
from model import Llama, init_weights, load_hf_weights, materialize
from pipeline_parallel import apply_pipeline_parallel, check_chunks, check_pp, sync_tied_embeddings, train_step
from process_group_manager import ProcessGroupManager, all_gather_flat, init_distributed, shutdown_distributed
from tensor_parallel import (allreduce_sequence_parallel_grads, apply_tensor_parallel, check_sp,
                             check_tp_divisibility, vocab_parallel_cross_entropy)
from utils import (Metrics, base_parser, batch_note, clip_grad_norm_, die, dump_params, lr_at, make_config,
                   memory_gib, positive, positive_float, resolve_device_dtype, stop_if_not_finite)


def main():
    # --- command line ---
    parser = base_parser("Step 06: context-parallel (+ pipeline-, tensor- and data-parallel) training")
    parser.add_argument("--tp", type=positive, default=1, help="tensor-parallel size")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism: split the activations "
                                                          "between blocks along the sequence over tp")
    parser.add_argument("--pp", type=positive, default=1, help="pipeline-parallel size (stages)")
    parser.add_argument("--pp-engine", choices=["afab", "1f1b", "interleaved"], default="1f1b", help="pipeline schedule")
    parser.add_argument("--pp-chunks", type=positive, default=1, help="interleaved: model chunks (virtual stages) per rank")
    parser.add_argument("--cp", type=positive, default=1, help="context-parallel size (sequence split)")
    parser.add_argument("--dp", type=positive, default=None, help="data-parallel size (default: world size)")
    parser.add_argument("--bucket-size-mb", type=positive_float, default=25.0, help="gradient all-reduce bucket size")
    args = parser.parse_args()

    # --- distributed setup ---
    # Check the layout against the number of processes before any collective can hang.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.dp = args.dp or max(1, world_size // (args.pp * args.cp * args.tp))
    if args.dp * args.pp * args.cp * args.tp != world_size:
        die(f"--dp {args.dp} x --pp {args.pp} x --cp {args.cp} x --tp {args.tp} needs "
            f"{args.dp * args.pp * args.cp * args.tp} processes but torchrun started {world_size}; "
            f"change --nproc_per_node or the layout")
    device, dtype = resolve_device_dtype(args)
    rank, world_size = init_distributed(device)
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    pgm = ProcessGroupManager(dp=args.dp, pp=args.pp, cp=args.cp, tp=args.tp)
    is_logger = rank == world_size - 1  # the last rank is on the last pipeline stage, which has the loss
    torch.manual_seed(args.seed)

    # --- model ---
    config = make_config(args, device)
    try:
        check_tp_divisibility(config, args.tp)
        if args.sp:
            check_sp(args.seq_len // args.cp, args.tp)  # each cp rank holds T/cp tokens
        check_pp(config.num_hidden_layers, args.pp)
        check_chunks(args.pp_engine, args.pp_chunks, args.pp, args.grad_acc_steps, config.num_hidden_layers)
        check_cp(args.seq_len, args.cp)
    except ValueError as e:
        die(str(e))
    with torch.device("meta"):  # shapes only: no memory, no time spent on a throw-away init
        model = Llama(config)
    # --- tensor parallel ---
    # Swap q/k/v/gate/up (column) and o/down (row), embedding and head (vocab) for tp shards.
    if pgm.tp_size > 1:
        apply_tensor_parallel(model, pgm.tp_group, sp=args.sp)
    # --- pipeline parallel ---
    # Keep this stage's layers; the first stage embeds, the last one has the norm, head and loss.
    apply_pipeline_parallel(model, pgm, args.pp_chunks)
    # --- context parallel ---
    # Attention is the only op that mixes tokens: swap it for ring attention over the cp group.
    if pgm.cp_size > 1:
        for layer in model.model.layers.values():
            layer.self_attn.attn_fn = partial(ring_attention, group=pgm.cp_group)
    materialize(model, device)
    init_weights(model, args.seed)
    if os.path.isdir(args.model) and any(f.endswith(".safetensors") for f in os.listdir(args.model)):
        load_hf_weights(model, args.model)  # --model DIR with weights: start from them
    n_params = sum(p.numel() for p in model.parameters())
    # --- data parallel ---
    # Gradients are all-reduced over dp in buckets as soon as backward produces them.
    model = DataParallel(model, pgm.cp_dp_group, args.bucket_size_mb)  # each cp rank saw only its tokens
    dist.barrier()  # NCCL: a subgroup's first point-to-point must not be the first collective

    # --- data ---
    G = args.micro_batch_size * args.grad_acc_steps * args.dp  # sequences per optimizer step
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
        batch = batch.chunk(args.dp)[pgm.dp_rank]  # this rank's share: (G/dp,)
        for m in range(args.grad_acc_steps):
            mine = batch[m * args.micro_batch_size:(m + 1) * args.micro_batch_size]  # (mbs,) row indices
            rows = sequences[mine].to(device)  # (mbs, T + 1): only these rows are read from the token file
            x, y = rows[:, :-1], rows[:, 1:]  # inputs and next-token targets, each (mbs, T)
            # shift first, then cut: this rank keeps zig-zag chunks cp_rank and 2cp-1-cp_rank
            yield (zigzag_slice(x, 1, pgm.cp_rank, pgm.cp_size),  # (mbs, T/cp)
                   zigzag_slice(y, 1, pgm.cp_rank, pgm.cp_size))  # (mbs, T/cp)

    # RoPE needs the global positions of the tokens this rank holds: (mbs, T/cp)
    position_ids = zigzag_positions(args.seq_len, pgm.cp_rank, pgm.cp_size, device).expand(args.micro_batch_size, -1)

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
        if pgm.tp_size > 1:  # logits are (mbs, T, V/tp): the softmax is computed without gathering them
            return vocab_parallel_cross_entropy(logits, targets, pgm.tp_group).mean()
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    # --- training loop ---
    def forward_backward(micro_batches):
        """Forward and backward of each micro-batch; gradients add up in p.grad. -> summed loss"""
        loss_sum = torch.zeros((), device=device)
        for m, (x, y) in enumerate(micro_batches):
            # only the last micro-batch's backward launches the all-reduces
            model.require_backward_grad_sync = m == args.grad_acc_steps - 1
            with autocast:
                logits = model(x, position_ids=position_ids)  # (mbs, T/cp, V)
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
    peak_inflight = 0  # the most micro-batches this stage held at once, over the run
    for step in range(args.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if pgm.pp_size > 1:  # the schedule runs every stage's forwards and backwards, passing activations
            loss_sum, peak = train_step(model, list(local_micro_batches(step)), pgm, loss_fn,
                                        args.grad_acc_steps, autocast, schedule=args.pp_engine,
                                        seq_shards=pgm.tp_size if args.sp else 1,  # --sp: (mbs, T/tp, D) sent
                                        position_ids=position_ids, chunks=args.pp_chunks)
            peak_inflight = max(peak_inflight, peak)  # micro-batches whose activations were alive at once
        else:
            loss_sum = forward_backward(local_micro_batches(step))

        model.finish_gradient_synchronization()  # wait for the buckets: grads are the dp average
        if args.sp:  # each tp rank's norms saw only its T/tp tokens: all-reduce their grads over tp
            allreduce_sequence_parallel_grads(model.parameters(), pgm.tp_group)
        sync_tied_embeddings(model, pgm)  # all-reduce over {first, last stage}: the tied weight's two uses
        grad_norm = clip_grad_norm_(model.parameters(), args.grad_clip, pgm.mp_group)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # --- logging ---
        dist.all_reduce(loss_sum, group=pgm.cp_dp_group)  # all-reduce over dp x cp: the mean of the whole global batch
        loss_avg = (loss_sum / (args.grad_acc_steps * args.dp * args.cp)).item()  # .item(): a sync point
        dt = time.perf_counter() - t0
        tokens_seen += G * args.seq_len
        metrics.log(step=step, loss=loss_avg, lr=lr, grad_norm=grad_norm.item(), tokens=tokens_seen,
                    tokens_per_s=G * args.seq_len / dt, step_time_s=dt, mem_gib=memory_gib(device))
        stop_if_not_finite(step, loss_avg, grad_norm)  # NaN or inf: stop before anything is saved

    if pgm.pp_size > 1:  # once per run, not per step: all-gather over pp of every stage's peak
        peaks = torch.zeros(pgm.pp_size, dtype=torch.long, device=device)
        all_gather_flat(peaks, torch.tensor([peak_inflight], device=device), pgm.pp_group)
        metrics.summary(pp_peak_inflight=peaks.tolist())
    metrics.close()
    if args.dump_params:
        dump_params(model.module, args.dump_params, rank)


if __name__ == "__main__":
    main()
    shutdown_distributed()  # after main(): no object of the run holds a process group any more
