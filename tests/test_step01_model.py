"""step01's model against transformers.LlamaForCausalLM, its initialisation, the presets and the
configs make_config refuses."""
import importlib.util
import json
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launch import REPO


def load_step_module(step, name):
    """Import `name`.py from a step folder under a unique module name. The folder is first on sys.path
    while it runs, as train.py puts it, so the module's own imports find their siblings."""
    spec = importlib.util.spec_from_file_location(f"{step}_{name}", REPO / step / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    sys.path.insert(0, str(REPO / step))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(REPO / step))
    return mod


M = load_step_module("step01_single_gpu", "model")
U = load_step_module("step01_single_gpu", "utils")


def make_cfg(hidden=64, layers=2, heads=4, kv=2, tie=False, vocab=97, inter=96, theta=10000.0, rope=None, **extra):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128,
                      tie_word_embeddings=tie, rms_norm_eps=1e-5,
                      rope_parameters=rope or {"rope_type": "default", "rope_theta": theta}, **extra)
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


# ------------------------------------------------------------------ every LlamaForCausalLM config
HD = 16  # head_dim of make_cfg's default shape (64 / 4)
ROPES = {  # one of each RoPE type, with parameters that move the frequencies at T <= 33
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
                 "short_factor": [1.0 + i / HD for i in range(HD // 2)], "long_factor": [4.0] * (HD // 2)},
}
FEATURES = {
    **{f"rope={k}": dict(rope=v) for k, v in ROPES.items()},
    "attention_bias": dict(attention_bias=True),
    "mlp_bias": dict(mlp_bias=True),
    "head_dim=32": dict(head_dim=32),  # q/o are (128, 64) and (64, 128): not hidden / heads
    "head_dim=8": dict(head_dim=8),
    "gqa=4:1": dict(kv=1),
    "tied": dict(tie=True),
    "all,tied": dict(rope=ROPES["llama3"], attention_bias=True, mlp_bias=True, head_dim=32, kv=1, tie=True),
    "all,untied": dict(rope=ROPES["yarn"], attention_bias=True, mlp_bias=True, head_dim=8, heads=8, kv=2),
}


def randomized(hf):
    """transformers starts biases at 0 and norms at 1, where a mistake in them cannot show: draw them."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.5)
    return hf


@pytest.mark.parametrize("kw", FEATURES.values(), ids=FEATURES.keys())
def test_each_feature_matches_transformers(kw):
    """Logits equal LlamaForCausalLM's (float32, 1e-5) for each RoPE type, bias and shape, alone and together;
    the names and shapes of parameters and state_dict are exactly transformers' (RoPE's buffer is not in it)."""
    torch.manual_seed(0)
    cfg = make_cfg(**kw)
    hf = randomized(LlamaForCausalLM(cfg).eval())
    ours = M.Llama(cfg)
    ours.load_state_dict(hf.state_dict())  # strict: the same keys
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in hf.named_parameters()}
    assert ours.state_dict().keys() == hf.state_dict().keys()
    x = torch.randint(0, cfg.vocab_size, (3, 33))
    with torch.no_grad():
        err = (ours(x) - hf(x).logits).abs().max().item()
    assert err <= 1e-5, err
    # RoPE comes from transformers' own initialisation: the same frequencies and scaling, bit for bit
    assert torch.equal(ours.rope_inv_freq, hf.model.rotary_emb.inv_freq)
    assert ours.rope_attention_scaling == hf.model.rotary_emb.attention_scaling


def test_plain_rope_is_transformers_default_bit_for_bit():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for hd, theta in [(16, 10000.0), (64, 100000), (128, 500000.0), (8, 130000.0)]:
        cfg = make_cfg(hidden=hd * 4, theta=theta)
        inv_freq, scaling = M.rope_frequencies(cfg)
        want, want_scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
        assert torch.equal(inv_freq, want) and scaling == want_scaling == 1.0
    for kind in ("linear", "llama3", "yarn"):  # and the scaled types really move the frequencies
        assert not torch.equal(M.rope_frequencies(make_cfg(rope=ROPES[kind]))[0], M.rope_frequencies(make_cfg())[0])


def test_rope_buffer_is_real_after_materialize_and_biases_start_at_zero():
    """The model is built on the meta device: RoPE's frequencies are real from the start, move with
    materialize, and never enter the state_dict; biases start at 0, as in transformers' _init_weights."""
    cfg = make_cfg(rope=ROPES["llama3"], attention_bias=True, mlp_bias=True)
    m = fresh(cfg, 5)
    assert m.rope_inv_freq.device.type == "cpu" and torch.equal(m.rope_inv_freq, M.Llama(cfg).rope_inv_freq)
    assert "rope_inv_freq" not in m.state_dict()
    biases = [(n, p) for n, p in m.named_parameters() if n.endswith(".bias")]
    assert len(biases) == 2 * 7 and all(not p.any() for _, p in biases), [n for n, _ in biases]


@pytest.mark.parametrize("kw", [dict(tie=True), dict(rope=ROPES["llama3"], attention_bias=True, mlp_bias=True,
                                                   head_dim=32)], ids=["tied", "llama3,biases,head_dim"])
def test_loads_save_pretrained_dir(tmp_path, kw):
    torch.manual_seed(1)
    cfg = make_cfg(**kw)
    hf = randomized(LlamaForCausalLM(cfg).eval())
    hf.save_pretrained(tmp_path)  # safetensors; drops the tied lm_head
    assert list(tmp_path.glob("*.safetensors"))
    with torch.device("meta"):
        ours = M.Llama(LlamaConfig.from_pretrained(tmp_path))
    M.materialize(ours, "cpu")
    M.load_hf_weights(ours, tmp_path)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == cfg.tie_word_embeddings
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


# ------------------------------------------------------------------ make_config: what the trainers accept
def make_config(tmp_path, cfg=None, argv=()):
    """utils.make_config on a config.json written from `cfg` (a dict), or on argv's --model -> config or
    the one-line message it stopped with."""
    if cfg is not None:
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        argv = ["--model", str(tmp_path), *argv]
    args = U.base_parser("test").parse_args(["--seq-len", "32", *map(str, argv)])
    try:
        return U.make_config(args)
    except SystemExit as e:
        assert str(e).startswith("error: ") and "\n" not in str(e), str(e)
        return str(e)


LLAMA_JSON = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=97, max_position_embeddings=128)


@pytest.mark.parametrize("change, expect", [
    (dict(model_type="mistral"), "model_type='mistral'"),
    (dict(sliding_window=4096), "sliding_window=4096 is not implemented"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not implemented"),
    (dict(attention_dropout=0.1), "attention_dropout=0.1 is not implemented"),
    (dict(rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, partial_rotary_factor=0.5),
     "partial_rotary_factor=0.5 is not implemented"),
    (dict(rope_parameters={"rope_type": "su", "rope_theta": 10000.0}), "rope_type 'su' is not one of"),
    (dict(rope_parameters=dict(ROPES["longrope"], original_max_position_embeddings=16)),
     "rope_type 'longrope' switches to its long_factor beyond original_max_position_embeddings=16"),
    (dict(hidden_size=66), "hidden size (66) is not a multiple of the number of attention heads (4)"),
])
def test_a_config_the_course_cannot_train_is_one_line_naming_the_key(tmp_path, change, expect):
    msg = make_config(tmp_path, {**LLAMA_JSON, **change})
    assert isinstance(msg, str) and expect in msg, msg


def test_configs_the_course_trains_load(tmp_path):
    """Legacy rope_scaling + rope_theta, dynamic RoPE (fixed up to max_position_embeddings), keys set to
    what the course does anyway."""
    cfg = make_config(tmp_path, {**LLAMA_JSON, "rope_theta": 500000.0, "rope_interleaved": False,
                                 "sliding_window": None, "attention_dropout": 0.0, "hidden_act": "silu",
                                 "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    assert cfg.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500000.0}
    too_long = make_config(tmp_path, argv=["--model", tmp_path, "--seq-len", "256"])
    assert "--seq-len 256 exceeds the model's max_position_embeddings=128" in too_long


def test_head_dim_follows_shape_overrides_unless_explicit(tmp_path):
    assert make_config(tmp_path, LLAMA_JSON, ["--hidden-size", "128"]).head_dim == 32  # 16 = 64 / 4: follows
    assert make_config(tmp_path, argv=["--model", "llama3.2-1b", "--hidden-size", "128", "--num-heads", "4",
                                       "--num-kv-heads", "2"]).head_dim == 32  # the preset's 64 = 2048 / 32: follows
    explicit = {**LLAMA_JSON, "head_dim": 32}  # not 64 / 4: kept
    assert make_config(tmp_path, explicit, ["--num-heads", "2", "--num-kv-heads", "1"]).head_dim == 32
    assert make_config(tmp_path, explicit, ["--head-dim", "24"]).head_dim == 24
    assert "head_dim=7 must be even" in make_config(tmp_path, explicit, ["--head-dim", "7"])
    assert "is not divisible by num_heads=3" in make_config(tmp_path, explicit, ["--num-heads", "3"])


# Parameter totals of the published checkpoints (the hub's safetensors counts; the model cards round them
# to 135M, 362M, 1.71B, 1.24B, 8.03B, 6.74B, 70.6B and 406B). SmolLM2 has SmolLM's shapes and another rope_theta (1e5,
# 1.3e5 for 1.7B), which holds no parameters: the same counts. tiny is the course's own (README: 0.21M).
PUBLISHED = {"smollm-135m": 134_515_008, "smollm-360m": 361_821_120, "smollm-1.7b": 1_711_376_384,
             "smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120, "smollm2-1.7b": 1_711_376_384,
             "llama3.2-1b": 1_235_814_400, "llama3.1-8b": 8_030_261_248, "llama2-7b": 6_738_415_616,
             "llama3.1-70b": 70_553_706_496, "llama3.1-405b": 405_853_388_800, "tiny": 205_120}


def test_presets_are_the_folders_of_data_models():
    """A preset is data/models/NAME/config.json, nothing else: adding one is adding a folder."""
    assert U.PRESETS == sorted(p.parent.name for p in (REPO / "data" / "models").glob("*/config.json"))
    assert set(PUBLISHED) <= set(U.PRESETS)
    for name in U.PRESETS:
        assert json.loads((U.MODELS / name / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize("name", U.PRESETS)
def test_preset_builds_with_the_published_parameter_count(tmp_path, name):
    """Every preset builds as transformers builds it (a new folder too); those with a published count have it."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = make_config(tmp_path, argv=["--model", name])
    with torch.device("meta"):
        ours, hf = M.Llama(cfg), LlamaForCausalLM(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (a tied matrix counts once)
    assert count(ours) == count(hf) == PUBLISHED.get(name, count(hf))
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in hf.named_parameters()}
    rope = LlamaRotaryEmbedding(cfg)  # transformers' (hd/2,) frequencies for this preset, on the CPU
    assert torch.equal(ours.rope_inv_freq, rope.inv_freq) and ours.rope_attention_scaling == rope.attention_scaling
