"""Interleaved 1F1B (--pp-engine interleaved --pp-chunks V): the schedule as data, and real runs
that equal step01.

Pure (no processes): every F before its B, the bubble (p - 1)/(V m + p - 1), the peak in flight
min(V m, (V - 1) p + 2 (p - r - 1) + 1), and p2p_plan's clock: every send meets its receive at the
same tick and every message arrives before the event that reads it (p <= 8, V <= 4, m <= 32).
Launches: step05 pp2 V2; pp4 V2 on 8 layers; dp2 x tp2 --sp x pp2 V2; step06 pp2 V2 x cp2, tied;
step07 dp2 x pp2 V2 with --zero 1 --recompute, tied, whose checkpoint resumes under pp4 1F1B and
back under interleaved, whose --export-hf is its weights and whose --memory-report matches memory.py.
All tied (the embedding on rank 0's first chunk, its copy on the last rank's last chunk).
"""
import importlib.util
import json
from pathlib import Path

import pytest

from launch import REPO, TINY, assert_matches_step01, assert_same_losses, load_full_params, run_step

_spec = importlib.util.spec_from_file_location("pp_interleaved", REPO / "step05_pipeline_1f1b" / "pipeline_parallel.py")
pp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pp)


def peak(events):
    live = best = 0
    for kind, *_ in events:
        live += 1 if kind == "F" else -1
        best = max(best, live)
    return best


def cases():  # p up to 8, V up to 4, m from p to 32 (a multiple of p: the engine's condition)
    return [(p, V, m) for p in range(2, 9) for V in range(2, 5) for m in sorted({p, 2 * p, 3 * p, 32 - 32 % p})]


def test_schedule_is_valid_with_the_textbook_bubble_and_peak():
    for p, V, m in cases():
        lists = [pp.stage_events("interleaved", p, s, m, V) for s in range(p)]
        for s, events in enumerate(lists):
            want = [(k, i, c) for k in "FB" for i in range(m) for c in range(V)]
            assert sorted(events) == sorted(want), (p, V, m, s)
            assert all(events.index(("F", i, c)) < events.index(("B", i, c)) for i in range(m) for c in range(V))
            assert peak(events) == min(V * m, (V - 1) * p + 2 * (p - s - 1) + 1), (p, V, m, s)
        _, bubble = pp.simulate(lists)  # raises on a deadlock
        assert bubble == pytest.approx((p - 1) / (V * m + p - 1)), (p, V, m)


def test_p2p_plan_matches_every_send_and_receives_in_time():
    for p, V, m in cases() + [(p, 1, m) for p in (2, 4) for m in (1, 3, 8)]:
        for engine in (["interleaved"] if V > 1 else ["afab", "1f1b"]):
            plan = pp.p2p_plan([pp.stage_events(engine, p, s, m, V) for s in range(p)])
            assert len({len(rows) for rows in plan}) == 1  # one clock
            for s, rows in enumerate(plan):
                arrived, first_v, last_v = set(), s == 0, s == p - 1
                for t, (event, sends, recvs) in enumerate(rows):
                    if event and not (event[0] == "F" and first_v and event[2] == 0) and \
                            not (event[0] == "B" and last_v and event[2] == V - 1):
                        assert event in arrived, (p, V, m, s, t, event)  # received at an earlier tick
                    for direction, key in sends:  # the neighbour receives it in the same tick's batch
                        peer = (s + 1) % p if direction == "next" else (s - 1) % p
                        assert ({"next": "prev", "prev": "next"}[direction], key) in plan[peer][t][2]
                    arrived |= {key for _, key in recvs}
                assert sum(len(r[2]) for r in rows) == sum(1 for e, *_ in rows if e) - m * (first_v + last_v)


def test_bubble_table_p4_m8():
    def bubble(engine, V=1):
        return pp.simulate([pp.stage_events(engine, 4, s, 8, V) for s in range(4)])[1]
    assert [round(100 * b, 1) for b in (bubble("afab"), bubble("1f1b"), bubble("interleaved", 2),
                                       bubble("interleaved", 4))] == [27.3, 27.3, 15.8, 8.6]


@pytest.mark.parametrize("args, text", [
    (("1f1b", 2, 2, 4, 4), "--pp-chunks 2 needs --pp-engine interleaved"),
    (("interleaved", 1, 2, 4, 4), "--pp-engine interleaved needs --pp-chunks >= 2"),
    (("interleaved", 2, 1, 4, 4), "--pp-engine interleaved needs --pp >= 2"),
    (("interleaved", 2, 2, 3, 4), "divisible by --pp 2 (micro-batches go round in groups of pp), got 3; "
                                  "use --grad-acc-steps 4"),
    (("interleaved", 2, 4, 4, 4), "--pp 4 x --pp-chunks 2 needs at least 8 layers"),
])
def test_each_constraint_is_one_line(args, text):
    with pytest.raises(ValueError) as e:
        pp.check_chunks(*args)
    assert text in str(e.value) and "\n" not in str(e.value)
    pp.check_chunks("interleaved", 2, 2, 4, 4)
    pp.check_chunks("1f1b", 1, 4, 3, 4)


def test_chunk_layers_are_megatrons_virtual_stages():
    assert pp.chunk_layers(8, 2, 0, 2) == [[0, 1], [4, 5]] and pp.chunk_layers(8, 2, 1, 2) == [[2, 3], [6, 7]]
    assert pp.chunk_layers(8, 4, 3, 2) == [[3], [7]]


# ------------------------------------------------------------------ real runs
# one step01 reference (global batch 8, tied) for all but pp4, which needs 8 layers
COMMON = [*TINY, "--max-steps", "6", "--num-layers", "4", "--tie-word-embeddings", "1"]
V2 = ["--pp-engine", "interleaved", "--pp-chunks", 2]


@pytest.mark.parametrize("step, nproc, layout, extra, ref_acc, peaks", [
    ("step05_pipeline_1f1b", 2, ["--pp", 2], ["--grad-acc-steps", 4], 4, [5, 3]),
    ("step05_pipeline_1f1b", 4, ["--pp", 4], ["--grad-acc-steps", 8, "--micro-batch-size", 1, "--num-layers", 8],
     8, [11, 9, 7, 5]),
    ("step05_pipeline_1f1b", 8, ["--dp", 2, "--tp", 2, "--sp", "--pp", 2], ["--grad-acc-steps", 2], 4, [4, 3]),
    ("step06_context_parallel", 4, ["--pp", 2, "--cp", 2], ["--grad-acc-steps", 4], 4, [5, 3]),
], ids=["step05-pp2", "step05-pp4-L8", "step05-dp2-tp2-sp-pp2", "step06-pp2-cp2"])
def test_interleaved_equals_step01(step, nproc, layout, extra, ref_acc, peaks, tmp_path_factory):
    _, summary = assert_matches_step01(step, nproc, [*COMMON, *extra], [*layout, *V2], ref_grad_acc=ref_acc,
                                       workdir=tmp_path_factory.getbasetemp())
    assert summary["pp_peak_inflight"] == peaks


STEP7 = "step07_4d_combined"
BASE7 = [*COMMON, "--grad-acc-steps", "2"]


@pytest.fixture(scope="module")
def step07_run(tmp_path_factory):
    """dp2 x pp2 V2, --zero 1 --recompute, tied; saves at 3; exports HF; reports memory."""
    work = tmp_path_factory.getbasetemp()
    d = work / "s7_interleaved"
    layout = ["--dp", 2, "--pp", 2, *V2, "--zero", 1, "--recompute", "--memory-report",
              "--save-dir", d / "ckpt", "--save-every", 3, "--export-hf", d / "hf"]
    got, summary = assert_matches_step01(STEP7, 4, BASE7, layout, ref_grad_acc=4, workdir=work)
    params = Path(work) / f"{STEP7}_{'_'.join(map(str, layout)).replace('-', '')}" / "params"  # where it dumped
    return d, got, summary, params


def test_step07_equals_step01_and_memory_matches(step07_run):
    d, got, summary, _ = step07_run
    assert summary["pp_peak_inflight"] == [4, 3]
    first = got[0]
    measured, predicted = first["act_bytes_measured"], first["act_bytes_predicted"]
    assert abs(predicted - measured) <= 0.02 * measured, (measured, predicted)
    assert first["weight_bytes_measured"] == first["predicted_weights"]
    assert first["optimizer_bytes_measured"] == first["predicted_optimizer"]


def test_step07_hf_export_is_the_trained_weights(step07_run):
    from safetensors.torch import load_file

    d, _, _, params = step07_run
    exported = load_file(d / "hf" / "model.safetensors")
    trained = {k: v for k, v in load_full_params(params).items() if k != "lm_head.weight"}  # tied: written once
    assert set(exported) == set(trained)
    assert all((exported[k] == trained[k]).all() for k in trained)


def test_step07_checkpoint_reshards_to_1f1b_and_back(step07_run):
    """Saved at step 3 under dp2 x pp2 V2; resumed under pp4 1F1B (which saves at 4), and that one
    resumed under dp2 x pp2 V2 again: the losses are the uninterrupted run's."""
    d, straight, _, _ = step07_run
    plain = run_step(STEP7, 4, [*BASE7, "--pp", 4, "--grad-acc-steps", 4, "--resume", d / "ckpt" / "step_000003",
                                "--save-dir", d / "ckpt_plain", "--save-every", 2], d, tag="plain")
    assert_same_losses(straight[3:], plain, what="saved interleaved, resumed pp4 1f1b")
    back = run_step(STEP7, 4, [*BASE7, "--dp", 2, "--pp", 2, *V2, "--resume", d / "ckpt_plain" / "step_000004"],
                    d, tag="back")
    assert_same_losses(straight[4:], back, what="saved pp4 1f1b, resumed interleaved")
