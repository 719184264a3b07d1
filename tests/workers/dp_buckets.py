"""Worker for test_data_parallel_buckets.py: run under torchrun (gloo, CPU).

argv: DP_DIR OUT_DIR. Imports DataParallel from DP_DIR/data_parallel.py, trains a tiny
tied-embedding MLP language model for two optimizer steps in several configurations, and
writes OUT_DIR/rank{r}.json with what the test asserts on:
  grad_err / param_err   max |dp - single process on the whole global batch|
  calls_before_last      dist.all_reduce calls made during the accumulation micro-batches
  calls_in_step          dist.all_reduce calls made in the whole step
  launches               per all-reduce of the step, in issue order: the index of the bucket whose
                         buffer it reduces, its bytes, and how many parameters had no final grad
                         yet when it was issued (> 0: it overlaps the rest of backward)
  launched_before_first_layer  all-reduces already issued when the FIRST block's weight got
                               its final grad (> 0: communication overlaps backward)
All of it is observed from outside DataParallel: a wrapper around dist.all_reduce and
post-accumulate-grad hooks of the worker's own.
"""
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before any group: see process_group_manager.py)
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, sys.argv[1])
from data_parallel import DataParallel  # noqa: E402

VOCAB, D, LAYERS, T, MBS = 64, 32, 3, 16, 2


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block(D) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter used twice

    def forward(self, x):  # (B, T) -> (B, T, V)
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h))


def ce(logits, y):
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))  # (B*T, V), (B*T,)


# Count every dist.all_reduce call and note what it reduces, from outside DataParallel.
CALLS = [0]
LAUNCHES = []  # (bucket index, bytes, parameters still without a final grad) per call
WATCH = {"buffers": {}, "pending": 0}  # data_ptr of each bucket buffer -> index; grads not yet final
_all_reduce = dist.all_reduce


def counting_all_reduce(tensor, *a, **k):
    CALLS[0] += 1
    LAUNCHES.append((WATCH["buffers"].get(tensor.data_ptr()), tensor.numel() * tensor.element_size(),
                     WATCH["pending"]))
    return _all_reduce(tensor, *a, **k)


dist.all_reduce = counting_all_reduce


def sgd_step(params, lr=0.5):
    """optimizer.step(); optimizer.zero_grad(set_to_none=True), without torch.optim
    (its import pulls in dynamo: ~2 s per process on a small CPU box)."""
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None


def run(grad_acc, mode, bucket_mb, rank, world, steps=2):
    torch.manual_seed(0)
    model = TinyLM()
    ref = copy.deepcopy(model)  # single-process reference on the whole global batch
    probe, sync = {}, [False]
    first_w = model.blocks[0].fc1.weight  # registered early -> its grad is final late

    def grad_final(p):  # registered before DataParallel's hooks, so it runs first
        if sync[0]:
            WATCH["pending"] -= 1
            if p is first_w:
                probe["launched"] = CALLS[0]

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(grad_final)
    dp = DataParallel(model, group=dist.group.WORLD, bucket_size_mb=bucket_mb)
    WATCH["buffers"] = {b.buffer.data_ptr(): b.index for b in dp.buckets}
    n_tensors = sum(1 for _ in model.parameters())

    out = {"n_buckets": len(dp.buckets), "steps": []}
    G = MBS * grad_acc * world
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        x = torch.randint(0, VOCAB, (G, T + 1), generator=g)
        inp, tgt = x[:, :-1], x[:, 1:]  # (G, T)
        mine = slice(rank * G // world, (rank + 1) * G // world)
        CALLS[0] = 0
        LAUNCHES.clear()
        calls_before_last = 0
        for m in range(grad_acc):
            dp.require_backward_grad_sync = sync[0] = m == grad_acc - 1
            WATCH["pending"] = n_tensors
            rows = slice(mine.start + m * MBS, mine.start + (m + 1) * MBS)
            logits = dp(inp[rows])
            if mode == "loss":
                (ce(logits, tgt[rows]) / grad_acc).backward()
            else:  # pipeline-stage style: backward driven by an upstream output grad
                detached = logits.detach().requires_grad_()
                (ce(detached, tgt[rows]) / grad_acc).backward()
                torch.autograd.backward([logits], [detached.grad])
            if m < grad_acc - 1:
                calls_before_last += CALLS[0]
        dp.finish_gradient_synchronization()
        sync[0] = False

        ce(ref(inp), tgt).backward()
        grad_err = max((a.grad - b.grad).abs().max().item()
                       for a, b in zip(model.parameters(), ref.parameters()))
        sgd_step(dp.parameters())  # sets p.grad = None: next step starts from no grads
        sgd_step(ref.parameters())
        param_err = max((a - b).abs().max().item()
                        for a, b in zip(model.parameters(), ref.parameters()))
        out["steps"].append(dict(grad_err=grad_err, param_err=param_err, launches=list(LAUNCHES),
                                 calls_before_last=calls_before_last, calls_in_step=CALLS[0],
                                 launched_before_first_layer=probe.pop("launched", None)))
    out["n_params"] = sum(p.numel() for p in model.parameters())
    out["tied"] = model.head.weight is model.embed.weight
    return out


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    configs = {  # name: (grad_acc, backward mode, bucket size MB)
        "acc1": (1, "loss", 0.02),
        "acc3": (3, "loss", 0.02),
        "acc3_autograd": (3, "autograd", 0.02),
        "one_bucket": (1, "loss", 100.0),  # negative control: no overlap possible
    }
    res = {name: run(*cfg, rank, world) for name, cfg in configs.items()}
    Path(sys.argv[2], f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
