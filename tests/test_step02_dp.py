"""step02 = step01 with the global batch split over dp ranks: same losses, same weights."""
import pytest

from launch import TINY, assert_matches_step01, run_step

STEP = "step02_data_parallel"
COMMON = [*TINY, "--max-steps", "10", "--micro-batch-size", "2"]


@pytest.mark.parametrize("dp, grad_acc", [(2, 1), (2, 3), (4, 1), (4, 3)])
def test_dp_equals_step01(dp, grad_acc, tmp_path_factory):
    work = tmp_path_factory.getbasetemp()
    got, _ = assert_matches_step01(STEP, dp, [*COMMON, "--grad-acc-steps", grad_acc],
                                   ["--dp", dp, "--bucket-size-mb", "0.05"], ref_grad_acc=grad_acc * dp,
                                   workdir=work, atol=1e-5)
    assert got[-1]["tokens"] == 10 * 2 * grad_acc * dp * 32  # the whole global batch is counted


def test_wrong_layout_fails_at_once(tmp_path):
    with pytest.raises(AssertionError) as e:
        run_step(STEP, 2, [*COMMON, "--dp", "4"], tmp_path, timeout=60)
    assert "error: --dp 4 needs 4 processes but torchrun started 2" in str(e.value)
