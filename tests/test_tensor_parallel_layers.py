"""Tensor-parallel building blocks (step03) against their unsharded PyTorch versions.

The module under test is found through COURSE_TP_DIR (default: step03_tensor_parallel/).
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from launch import REPO, torchrun

TP_DIR = Path(os.environ.get("COURSE_TP_DIR", REPO / "step03_tensor_parallel"))
WORKER = Path(__file__).resolve().parent / "workers" / "tp_layers.py"


def load_tp():
    spec = importlib.util.spec_from_file_location("course_tensor_parallel", TP_DIR / "tensor_parallel.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(TP_DIR))  # as train.py has it: its own imports find their siblings
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(TP_DIR))
    return mod


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_layers_match_unsharded(tp):
    """Column/row linear, SwiGLU MLP, vocab embedding, vocab-parallel CE, apply_tensor_parallel, and
    their sequence-parallel forms (--sp): block entry, lm_head gather, row reduce-scatter, embedding,
    norm grads summed over tp, a whole block; biased column/row linears with and without --sp (a
    row bias added once, its --sp grad summed over tp), and apply_tensor_parallel with biases and head_dim."""
    proc = torchrun(WORKER, tp, [TP_DIR], timeout=180)
    assert proc.stdout.count("TP_LAYERS_OK") == tp, proc.stdout[-2000:]


@pytest.mark.parametrize("cfg, tp, message", [
    (dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=256), 4,
     "--tp 4 does not divide num_key_value_heads=2; use --tp 1 or 2"),
    (dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=6, intermediate_size=128,
          vocab_size=256), 4,
     "--tp 4 does not divide num_attention_heads=6; use --tp 1 or 2"),
    (dict(num_attention_heads=4, num_key_value_heads=4, intermediate_size=128, vocab_size=250), 4,
     "--tp 4 does not divide vocab_size=250; use --tp 1 or 2 (or pad vocab_size to a multiple of 4)"),
    (dict(num_attention_heads=8, num_key_value_heads=8, intermediate_size=96, vocab_size=256), 16,
     "--tp 16 does not divide num_attention_heads=8; use --tp 1, 2, 4 or 8"),
])
def test_divisibility_error_is_one_clear_line(cfg, tp, message):
    tp_mod = load_tp()
    config = LlamaConfig(**{"hidden_size": 64, **cfg})
    with pytest.raises(ValueError) as err:
        tp_mod.check_tp_divisibility(config, tp)
    assert str(err.value) == message


def test_divisibility_accepts_dividing_shapes():
    tp_mod = load_tp()
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256)
    for tp in (1, 2):
        tp_mod.check_tp_divisibility(config, tp)


def test_sequence_parallel_split_error_is_one_clear_line():
    tp_mod = load_tp()
    tp_mod.check_sp(16, 4)
    with pytest.raises(ValueError) as err:
        tp_mod.check_sp(18, 4)
    assert str(err.value) == ("--sp splits the 18 tokens of a sequence on each rank over --tp 4, which does "
                              "not divide them; change --seq-len")
