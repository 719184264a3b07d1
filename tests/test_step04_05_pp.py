"""steps 04/05: pipeline parallelism (AFAB and 1F1B) reproduces step01 exactly."""
import pytest

from launch import TINY, assert_matches_step01, run_step

COMMON = [*TINY, "--max-steps", "10", "--micro-batch-size", "1", "--num-layers", "4"]


def with_ga(ga, *extra):
    return [*COMMON, "--grad-acc-steps", ga, *extra]


@pytest.mark.parametrize("step, pp, ga, engine", [
    ("step04_pipeline_afab", 2, 8, None),
    ("step04_pipeline_afab", 4, 2, None),      # fewer micro-batches than stages
    ("step05_pipeline_1f1b", 2, 1, "1f1b"),
    ("step05_pipeline_1f1b", 2, 2, "afab"),
    ("step05_pipeline_1f1b", 4, 1, "afab"),
    ("step05_pipeline_1f1b", 4, 2, "1f1b"),
    ("step05_pipeline_1f1b", 4, 8, "1f1b"),
])
def test_pp_equals_step01(step, pp, ga, engine, tmp_path_factory):
    layout = ["--pp", pp] + (["--pp-engine", engine] if engine else [])
    _, summary = assert_matches_step01(step, pp, with_ga(ga), layout, ref_grad_acc=ga,
                                       workdir=tmp_path_factory.getbasetemp())
    peaks = summary["pp_peak_inflight"]  # gathered once, at the end of the run
    assert len(peaks) == pp
    if (engine or "afab") == "afab":
        assert peaks == [ga] * pp  # every micro-batch is alive before the first backward
    else:
        assert all(p <= pp - s for s, p in enumerate(peaks)), peaks  # 1F1B: at most pp - stage
        assert peaks == [min(ga, pp - s) for s in range(pp)]


def test_dp2_pp2_tp2_tied(tmp_path_factory):
    common = with_ga(4, "--tie-word-embeddings", "1", "--micro-batch-size", "2")
    assert_matches_step01("step05_pipeline_1f1b", 8, common, ["--dp", 2, "--pp", 2, "--tp", 2],
                          ref_grad_acc=8, workdir=tmp_path_factory.getbasetemp())


def test_more_stages_than_layers_is_a_clear_error(tmp_path):
    with pytest.raises(AssertionError) as e:
        run_step("step05_pipeline_1f1b", 4, [*TINY, "--max-steps", "1", "--pp", "4"], tmp_path, timeout=90)
    assert "error: --pp 4 needs 1 <= pp <= num_layers=2" in str(e.value)
