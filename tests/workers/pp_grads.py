"""Worker for tests/test_pipeline_grads.py, run under torchrun (gloo, CPU) on 4 ranks.

argv: PP_DIR MODEL_DIR OUT_DIR [DP_DIR]. PP_DIR holds pipeline_parallel.py, MODEL_DIR the
course model.py, DP_DIR data_parallel.py (default PP_DIR). For every case it builds a tiny
Llama on meta, applies the pipeline split, materialises and initialises it, runs
train_step, finishes DataParallel if wrapped, sync_tied_embeddings, and compares every local
grad with the full single-process model's on the same micro-batches (each rank computes that
reference itself). Writes OUT_DIR/rank{r}.json: one record per case.
"""
import json
import os
import sys
import weakref
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace  # the config fields model.py reads; no transformers import (slow)

PP_DIR, MODEL_DIR, OUT = sys.argv[1:4]
DP_DIR = sys.argv[4] if len(sys.argv) > 4 else PP_DIR
sys.path[:0] = [MODEL_DIR, PP_DIR, DP_DIR]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.nn  # noqa: E402,F401  (before any group: see process_group_manager.py)
import torch.nn.functional as F  # noqa: E402

import pipeline_parallel as pp  # noqa: E402
from model import Llama, init_weights, materialize  # noqa: E402

VOCAB, D, T, MBS, SEED = 128, 32, 16, 2, 7
LAYOUTS = [(1, 4, False), (2, 2, False), (2, 2, True), (4, 1, False)]  # (dp, pp, DataParallel?)


class Grid:
    """Minimal process-group manager: ranks laid out as arange(world).view(dp, pp)."""

    def __init__(self, dp, pp_size):
        rank = self.rank = dist.get_rank()
        grid = self.grid = torch.arange(dist.get_world_size()).view(dp, pp_size)  # (dp, pp)
        self.sizes = {"dp": dp, "pp": pp_size}
        (d, s), = (grid == rank).nonzero().tolist()
        self.dp_size, self.dp_rank, self.pp_size, self.pp_rank = dp, d, pp_size, s
        self.pp_prev_rank = int(grid[d, s - 1]) if s > 0 else None
        self.pp_next_rank = int(grid[d, s + 1]) if s < pp_size - 1 else None
        self.pp_is_first_stage, self.pp_is_last_stage = s == 0, s == pp_size - 1
        for ranks in grid.t().tolist():  # the dp groups: every rank creates all, in the same order
            group = dist.new_group(ranks)
            if rank in ranks:
                self.dp_group = group


def config(layers, tied):
    return SimpleNamespace(hidden_size=D, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                           rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=tied,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def ce(logits, y):
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # (mbs*T, V), (mbs*T,)


def build(cfg, pgm=None):
    with torch.device("meta"):
        model = Llama(cfg)
    if pgm is not None:
        pp.apply_pipeline_parallel(model, pgm)
    materialize(model, "cpu")
    init_weights(model, SEED)
    return model


def run_config(pgm, layers, tied, wrap, seed):
    """Build this stage (and the full reference) once, then run every grad_acc x engine as
    consecutive steps on it (grads reset to None between them, as zero_grad does)."""
    from data_parallel import DataParallel

    cfg = config(layers, tied)
    model, ref = build(cfg, pgm), build(cfg)
    stage = DataParallel(model, pgm.dp_group) if wrap else model
    flags = []  # require_backward_grad_sync as each backward saw it (DataParallel reads it then)
    stage_ref = weakref.ref(stage)  # a strong reference in a parameter hook would keep the stage alive
    next(model.parameters()).register_post_accumulate_grad_hook(
        lambda p: flags.append(getattr(stage_ref(), "require_backward_grad_sync", None)))
    ref_params = dict(ref.named_parameters())
    own = pp.stage_layers(layers, pgm.pp_size, pgm.pp_rank)
    expect = {n for n in ref_params if not n.startswith("model.layers.") or int(n.split(".")[2]) in own}
    if not pgm.pp_is_first_stage:
        expect.discard("model.embed_tokens.weight")
    if not pgm.pp_is_last_stage:
        expect -= {"model.norm.weight", "lm_head.weight"}
    elif tied and pgm.pp_size > 1:
        expect.add("lm_head.weight")  # the last stage's own copy of the tied embedding
    base = dict(pp=pgm.pp_size, stage=pgm.pp_rank, tied=tied, last=pgm.pp_is_last_stage,
                names=sorted(n for n, _ in model.named_parameters()), expected_names=sorted(expect),
                replicas={n: p.replicas for n, p in model.named_parameters() if getattr(p, "replicas", 1) != 1})
    records = []
    for grad_acc in (1, 2, 8):  # 1 and 2 < pp=4: stages never reach their steady state
        seed += 1
        G = MBS * grad_acc * pgm.dp_size  # global batch
        data = torch.randint(0, VOCAB, (G, T + 1), generator=torch.Generator().manual_seed(seed))
        micro = [(data[r:r + MBS, :-1], data[r:r + MBS, 1:]) for r in range(0, G, MBS)]  # (mbs, T) each
        mine = micro[pgm.dp_rank * grad_acc:(pgm.dp_rank + 1) * grad_acc]

        # single-process reference: step01's loop over the micro-batches the stage's grads cover
        seen = micro if wrap else mine
        losses = []
        for x, y in seen:
            loss = ce(ref(x), y)
            (loss / len(seen)).backward()  # wrapped: also the mean over dp, like DataParallel
            losses.append(loss.item())
        ref_loss = sum(losses[pgm.dp_rank * grad_acc:][:grad_acc] if wrap else losses)

        for schedule in pp.SCHEDULES:  # same data for every engine
            loss_sum, peak = pp.train_step(stage, mine, pgm, ce, grad_acc, nullcontext(), schedule=schedule)
            if wrap:
                stage.finish_gradient_synchronization()  # p.grad = average over dp
            pp.sync_tied_embeddings(stage, pgm)  # after DataParallel, which overwrites p.grad
            grad_err = param_err = grad_scale = 0.0
            for name, p in model.named_parameters():
                r = ref_params["model.embed_tokens.weight" if tied and name == "lm_head.weight" else name]
                grad_err = max(grad_err, (p.grad - r.grad).abs().max().item())
                param_err = max(param_err, (p - r).abs().max().item())
                grad_scale = max(grad_scale, r.grad.abs().max().item())
                p.grad = None  # as zero_grad(set_to_none=True) before the next step
            name = (f"dp{pgm.dp_size}_pp{pgm.pp_size}{'_DP' if wrap else ''}_L{layers}_"
                    f"{'tied' if tied else 'untied'}_{schedule}_acc{grad_acc}")
            records.append(dict(base, name=name, schedule=schedule, grad_acc=grad_acc, grad_err=grad_err,
                                grad_scale=grad_scale, param_err=param_err, loss_sum=loss_sum.item(),
                                ref_loss_sum=ref_loss, peak=peak, sync_flags=flags[:]))
            flags.clear()
        for p in ref.parameters():
            p.grad = None
    return records


def main():
    timeout = timedelta(seconds=int(os.environ.get("COURSE_PG_TIMEOUT_S", "60")))
    dist.init_process_group("gloo", timeout=timeout)
    assert dist.get_world_size() == 4, "run this worker on 4 ranks"
    records = []
    for dp, pp_size, wrap in LAYOUTS:
        pgm = Grid(dp, pp_size)
        for layers in (4, 5):  # 5 layers: uneven split (3+2 on pp=2, 2+1+1+1 on pp=4)
            for tied in (False, True):
                records += run_config(pgm, layers, tied, wrap, seed=1000 + len(records))
    Path(OUT, f"rank{dist.get_rank()}.json").write_text(json.dumps(records))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
