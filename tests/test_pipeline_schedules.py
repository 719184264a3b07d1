"""Pipeline schedules as pure event lists (no processes): valid, bounded in memory, with the
textbook bubble. Also the layer split and the --pp check.
COURSE_PP_DIR: the folder with pipeline_parallel.py (default step05_pipeline_1f1b; with
step04_pipeline_afab the 1F1B tests skip).
"""
import importlib.util
import os
from pathlib import Path

import pytest

from launch import REPO

PP_DIR = Path(os.environ.get("COURSE_PP_DIR", REPO / "step05_pipeline_1f1b"))
_spec = importlib.util.spec_from_file_location("pipeline_parallel_under_test", PP_DIR / "pipeline_parallel.py")
pp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pp)

KINDS = sorted(pp.SCHEDULES)
SIZES = [(p, m) for p in range(1, 6) for m in range(1, 11)]


def peak(events):
    live = best = 0
    for kind, _ in events:
        live += 1 if kind == "F" else -1
        best = max(best, live)
    return best


@pytest.mark.parametrize("kind", KINDS)
def test_event_lists_are_valid_orderings(kind):
    for p, m in SIZES:
        lists = [pp.SCHEDULES[kind](p, s, m) for s in range(p)]
        for s, events in enumerate(lists):
            assert sorted(events) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)]), (p, m, s)
            assert [i for k, i in events if k == "F"] == list(range(m)), "forwards in micro-batch order"
            assert [i for k, i in events if k == "B"] == list(range(m)), "backwards in micro-batch order"
            assert all(events.index(("F", i)) < events.index(("B", i)) for i in range(m))
        pp.simulate(lists)  # raises if the stages wait on each other forever


def test_afab_keeps_every_micro_batch_alive():
    for p, m in SIZES:
        assert all(peak(pp.afab_schedule(p, s, m)) == m for s in range(p))


def test_1f1b_memory_is_bounded_by_pipeline_depth():
    if "1f1b" not in pp.SCHEDULES:
        pytest.skip("1F1B arrives in step05")
    for p, m in SIZES:
        for s in range(p):
            assert peak(pp.SCHEDULES["1f1b"](p, s, m)) == min(p - s, m), (p, m, s)


@pytest.mark.parametrize("kind", KINDS)
def test_bubble_is_textbook(kind):
    p, m = 4, 8
    timeline, bubble = pp.simulate([pp.SCHEDULES[kind](p, s, m) for s in range(p)], fwd=1, bwd=2)
    assert bubble == pytest.approx((p - 1) / (m + p - 1))  # 3/11
    assert max(end for stage in timeline for _, end, _, _ in stage) == (m + p - 1) * 3
    for p, m in SIZES:
        _, bubble = pp.simulate([pp.SCHEDULES[kind](p, s, m) for s in range(p)])
        assert bubble == pytest.approx((p - 1) / (m + p - 1)), (p, m)


def test_simulate_detects_a_deadlock():
    bad = [[("F", 0), ("B", 0)], [("B", 0), ("F", 0)]]  # stage 1 wants a backward before its forward
    with pytest.raises(ValueError, match="deadlock"):
        pp.simulate(bad)


def test_plot_schedule(tmp_path):
    pytest.importorskip("matplotlib")
    for kind in KINDS:
        bubble = pp.plot_schedule(kind, 4, 8, tmp_path / f"{kind}.png")
        assert bubble == pytest.approx(3 / 11) and (tmp_path / f"{kind}.png").stat().st_size > 1000


def test_stage_layers_split():
    assert [pp.stage_layers(5, 2, s) for s in range(2)] == [[0, 1, 2], [3, 4]]
    assert [pp.stage_layers(5, 4, s) for s in range(4)] == [[0, 1], [2], [3], [4]]
    for L in range(1, 13):
        for p in range(1, L + 1):
            parts = [pp.stage_layers(L, p, s) for s in range(p)]
            assert sum(parts, []) == list(range(L))  # contiguous, in order, all covered
            sizes = [len(x) for x in parts]
            assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1


def test_check_pp_names_the_fix():
    pp.check_pp(4, 4)
    with pytest.raises(ValueError) as e:
        pp.check_pp(4, 8)
    msg = str(e.value)
    assert "\n" not in msg and "--pp 4" in msg and "num_layers=4" in msg
