"""step01's model against transformers.LlamaForCausalLM, and its initialisation."""
import importlib.util
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launch import REPO


def load_step_module(step, name):
    """Import `name`.py from a step folder under a unique module name."""
    spec = importlib.util.spec_from_file_location(f"{step}_{name}", REPO / step / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


M = load_step_module("step01_single_gpu", "model")


def make_cfg(hidden=64, layers=2, heads=4, kv=2, tie=False, vocab=97, inter=96, theta=10000.0):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128,
                      tie_word_embeddings=tie, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    cfg._attn_implementation = "eager"
    return cfg


CONFIGS = [dict(), dict(kv=4), dict(kv=1, tie=True), dict(hidden=48, heads=6, kv=3, layers=3, theta=500000.0),
           dict(hidden=32, heads=2, kv=2, tie=True, vocab=128)]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("T", [1, 7, 33])
def test_logits_match_transformers(kw, T):
    torch.manual_seed(0)
    cfg = make_cfg(**kw)
    hf = LlamaForCausalLM(cfg).eval()
    ours = M.Llama(cfg)
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    assert {n for n, _ in ours.named_parameters()} == {n for n, _ in hf.named_parameters()}
    x = torch.randint(0, cfg.vocab_size, (3, T))
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert (got - ref).abs().max().item() <= 1e-5


def test_loads_save_pretrained_dir(tmp_path):
    torch.manual_seed(1)
    cfg = make_cfg(tie=True)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)  # safetensors; drops the tied lm_head
    assert list(tmp_path.glob("*.safetensors"))
    with torch.device("meta"):
        ours = M.Llama(LlamaConfig.from_pretrained(tmp_path))
    M.materialize(ours, "cpu")
    M.load_hf_weights(ours, tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-5


def test_load_rejects_mismatched_shapes(tmp_path):
    LlamaForCausalLM(make_cfg(hidden=32, heads=2)).save_pretrained(tmp_path)
    ours = M.Llama(make_cfg())
    with pytest.raises(ValueError, match="does not match"):
        M.load_hf_weights(ours, tmp_path)


def fresh(cfg, seed):
    with torch.device("meta"):
        m = M.Llama(cfg)
    M.materialize(m, "cpu")
    M.init_weights(m, seed)
    return m


def test_init_is_a_function_of_seed_and_name():
    cfg = make_cfg()
    torch.manual_seed(123)
    a = fresh(cfg, 7)
    torch.manual_seed(999)  # the global RNG must not matter
    b = fresh(cfg, 7)
    c = fresh(cfg, 8)
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
        if not n.endswith("norm.weight"):
            assert not torch.equal(p, r), n
    # different parameters never get the same values (no shared generator state)
    assert not torch.equal(a.model.layers["0"].self_attn.k_proj.weight, a.model.layers["1"].self_attn.k_proj.weight)
    assert abs(a.model.layers["0"].mlp.up_proj.weight.std().item() - cfg.initializer_range) < 0.003


def test_init_of_a_shard_is_the_slice_of_the_full_tensor():
    cfg = make_cfg()
    full = fresh(cfg, 3)
    with torch.device("meta"):
        m = M.Llama(cfg)
    lin = m.model.layers["1"].mlp.down_proj
    lin.weight = torch.nn.Parameter(torch.empty(cfg.hidden_size, cfg.intermediate_size // 4, device="meta"))
    lin.weight.shard = (1, 2, 4)  # what a tensor-parallel layer will declare
    M.materialize(m, "cpu")
    assert m.model.layers["1"].mlp.down_proj.weight.shard == (1, 2, 4)
    M.init_weights(m, 3)
    ref = full.model.layers["1"].mlp.down_proj.weight.chunk(4, dim=1)[2]
    assert torch.equal(m.model.layers["1"].mlp.down_proj.weight, ref)


def test_materialize_keeps_ties():
    m = fresh(make_cfg(tie=True), 0)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert len(list(m.parameters())) == len({id(p) for p in m.parameters()})
