"""step06: context parallelism (alone and combined with dp, tp (+ sp), pp) reproduces step01."""
import pytest

from launch import TINY, assert_matches_step01, run_step

STEP = "step06_context_parallel"
COMMON = [*TINY, "--max-steps", "10", "--micro-batch-size", "2", "--grad-acc-steps", "2"]


@pytest.mark.parametrize("nproc, layout, extra", [
    (2, ["--cp", 2], []),
    (4, ["--cp", 4], []),
    (4, ["--dp", 2, "--cp", 2], []),
    (4, ["--cp", 2, "--tp", 2, "--sp"], []),  # sp: each rank holds T/(cp tp) tokens outside the blocks
    (4, ["--pp", 2, "--cp", 2], ["--tie-word-embeddings", "1"]),
    (8, ["--pp", 2, "--cp", 2, "--tp", 2], ["--num-layers", "3"]),
], ids=["cp2", "cp4", "dp2-cp2", "cp2-tp2-sp", "pp2-cp2-tied", "pp2-cp2-tp2"])
def test_cp_equals_step01(nproc, layout, extra, tmp_path_factory):
    dp = layout[layout.index("--dp") + 1] if "--dp" in layout else 1
    assert_matches_step01(STEP, nproc, [*COMMON, *extra], layout, ref_grad_acc=2 * dp,
                          workdir=tmp_path_factory.getbasetemp())


def test_seq_len_not_divisible_by_2cp_is_a_clear_error(tmp_path):
    with pytest.raises(AssertionError) as e:
        run_step(STEP, 4, [*TINY, "--max-steps", "1", "--cp", "4", "--seq-len", "36"], tmp_path, timeout=90)
    assert "error: seq_len 36 is not divisible by 2*cp = 8" in str(e.value)
