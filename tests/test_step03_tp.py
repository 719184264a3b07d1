"""step03: tensor parallelism (with and without dp, with and without --sp) reproduces step01 exactly."""
import pytest

from launch import TINY, assert_matches_step01, run_step

STEP = "step03_tensor_parallel"
COMMON = [*TINY, "--max-steps", "10", "--micro-batch-size", "2", "--grad-acc-steps", "2"]


@pytest.mark.parametrize("nproc, layout, kv", [
    (2, ["--tp", "2"], "2"),             # GQA: 4 query heads share 2 kv heads, one kv head per rank
    (2, ["--tp", "2", "--sp"], "4"),     # MHA, sequence parallel
    (4, ["--tp", "4"], "4"),             # MHA, one head per rank
    (4, ["--dp", "2", "--tp", "2", "--sp"], "2"),  # dp x tp, sequence parallel
], ids=["tp2-gqa", "tp2-mha-sp", "tp4-mha", "dp2-tp2-gqa-sp"])
def test_tp_equals_step01(nproc, layout, kv, tmp_path_factory):
    dp = int(layout[layout.index("--dp") + 1]) if "--dp" in layout else 1
    common = [*COMMON, "--num-kv-heads", kv]
    assert_matches_step01(STEP, nproc, common, layout, ref_grad_acc=2 * dp, workdir=tmp_path_factory.getbasetemp())


def test_tied_embeddings_tp2(tmp_path_factory):
    common = [*COMMON, "--tie-word-embeddings", "1"]
    assert_matches_step01(STEP, 2, common, ["--tp", "2"], ref_grad_acc=2, workdir=tmp_path_factory.getbasetemp())


def test_shapes_that_do_not_divide_fail_before_any_collective(tmp_path):
    with pytest.raises(AssertionError) as e:
        run_step(STEP, 4, [*COMMON, "--tp", "4"], tmp_path, timeout=90)  # tiny has 2 kv heads
    assert "error: --tp 4 does not divide num_key_value_heads=2; use --tp 1 or 2" in str(e.value)


def test_sequence_that_does_not_split_over_tp_is_a_clear_error(tmp_path):
    with pytest.raises(AssertionError) as e:
        run_step(STEP, 2, [*COMMON, "--tp", "2", "--sp", "--seq-len", "33"], tmp_path, timeout=90)
    assert "error: --sp splits the 33 tokens of a sequence on each rank over --tp 2" in str(e.value)
