"""step07: the 4D trainer equals step01; checkpoints resume exactly under the same layout and under
others (also after a crash or a failed save); Hugging Face weights go in and come out unchanged; MFU
arithmetic; config files; bad input is one line.

The equality layouts use 8 processes and mix the four dimensions (8 = 2 x 2 x 2: each leaves one
out, together they cover all four). The dp2 x pp2 x tp2 run also saves at step 4, and the resumes
from it (the same layout, bit for bit; tp4 x pp2, dp2 x cp2 x tp2, pp4 x tp2 and dp8 at rel 1e-4)
reuse its uninterrupted losses and final weights. Crash, failure and bad-input cases use a 2-stage
pipeline on 2 processes: what they check (which files exist, what `latest` says, one line) does not
depend on the layout. COURSE_CRASH_AT_STEP=k / COURSE_CRASH_IN_SAVE=n make every rank exit
abruptly (os._exit) inside optimizer step k, or after writing its file of checkpoint n but before
`latest` moves; COURSE_FAIL_SAVE_RANK=r (COURSE_FAIL_SAVE_STEP=n) makes rank r's write fail with
ENOSPC, a full disk.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import (REPO, TINY, assert_same_losses, child_env, load_full_params, read_metrics, run_step,
                    step01_reference, torchrun, _with_flag)

STEP = "step07_4d_combined"
DIR = REPO / STEP
TOOLS = DIR / "tools"  # the stand-alone programs: train.py imports none of them
COMMON = [*TINY, "--max-steps", "10", "--grad-acc-steps", "4"]


def load(name):
    spec = importlib.util.spec_from_file_location(f"{STEP}_{name}", DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(DIR))  # its own imports find their siblings, as under train.py
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(DIR))
    return mod


def compare_with_step01(got, common, dp, workdir, params_dir=None, what=""):
    ga = int(common[common.index("--grad-acc-steps") + 1]) if "--grad-acc-steps" in common else 1
    ref, ref_params = step01_reference(_with_flag(common, "--grad-acc-steps", ga * dp), workdir)
    assert_same_losses(ref, got, what=what)
    if params_dir:
        full = load_full_params(params_dir)
        if "lm_head.weight" in full and "lm_head.weight" not in ref_params:  # tied, pp > 1: the last
            tied = full.pop("lm_head.weight")  # stage's copy of the embedding must still equal it
            assert torch.equal(tied, full["model.embed_tokens.weight"]), f"{what}: tied copies differ"
        assert set(full) == set(ref_params)
        for name, t in ref_params.items():
            assert (full[name] - t).abs().max().item() <= 5e-5, f"{what}: {name}"


def expect_one_line(proc, text):
    """The run failed, and every rank said why in one `error:` line, without a Python traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("error: ")]
    assert lines and all(text in line for line in lines), out[-3000:]
    assert 'File "' + str(DIR) not in out, out[-3000:]  # no traceback through our files


# ------------------------------------------------------------------ 4D layouts equal step01
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("s7")


# 4 layers and 4 kv heads, so that pp4 and tp4 can resume its checkpoints; global batch 8 = 2 x 2 x dp 2
BASE = [*TINY, "--max-steps", "8", "--grad-acc-steps", "2", "--num-layers", "4", "--num-kv-heads", "4",
        "--tie-word-embeddings", "1"]


@pytest.fixture(scope="module")
def dp_pp_tp(work):
    """dp2 x pp2 x tp2 with --sp, tied embeddings, 1F1B; checkpoints at steps 4 and 8; MFU against 1 GFLOP/s."""
    d = work / "dp_pp_tp"
    args = [*BASE, "--dp", "2", "--pp", "2", "--tp", "2", "--sp", "--save-dir", d / "ckpt", "--save-every", "4",
            "--peak-tflops", "0.001", "--dump-params", d / "params"]
    return d, args, run_step(STEP, 8, args, d)


@pytest.fixture(scope="module")
def pp_cp_tp(work):
    """pp2 x cp2 x tp2, untied, all-forward-all-backward."""
    d = work / "pp_cp_tp"
    args = [*COMMON, "--pp", "2", "--cp", "2", "--tp", "2", "--pp-engine", "afab", "--dump-params", d / "params"]
    return d, args, run_step(STEP, 8, args, d)


def test_dp_pp_tp_equals_step01(dp_pp_tp, work):
    d, _, got = dp_pp_tp
    compare_with_step01(got, BASE, 2, work, d / "params", "dp2 pp2 tp2 sp")


def test_pp_cp_tp_equals_step01(pp_cp_tp, work):
    d, _, got = pp_cp_tp
    compare_with_step01(got, COMMON, 1, work, d / "params", "pp2 cp2 tp2")


def test_dp_pp_cp_from_a_config_file_equals_step01(work):
    """tools/config_maker.py writes the layout; a command-line flag overrides the file (--max-steps)."""
    cfg = work / "dp_pp_cp.json"
    subprocess.run([sys.executable, TOOLS / "config_maker.py", "--dp", "2", "--pp", "2", "--cp", "2",
                    "--model", "tiny", "--num-kv-heads", "4", "--max-steps", "50", "--out", cfg], check=True)
    raw = json.loads(cfg.read_text())
    assert raw["distributed"] == {"dp": 2, "pp": 2, "cp": 2} and raw["training"]["max_steps"] == 50
    got = run_step(STEP, 8, ["--config", cfg, *COMMON, "--tie-word-embeddings", "1"], work / "dp_pp_cp")
    assert len(got) == 10
    compare_with_step01(got, [*COMMON, "--tie-word-embeddings", "1", "--num-kv-heads", "4"], 2, work,
                        what="dp2 pp2 cp2 (config file)")


def test_reference_lists_every_flag():
    """REFERENCE.md's flag table: every flag train.py --help shows."""
    out = subprocess.run([sys.executable, DIR / "train.py", "--help"], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=120).stdout
    flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", out)) - {"--help"}
    reference = (DIR / "REFERENCE.md").read_text()
    assert len(flags) > 40 and not {f for f in flags if f"`{f}" not in reference}, flags


def test_config_maker_set_checks_the_key(tmp_path):
    """--set KEY=VALUE writes only flags train.py has: its own example works, a typo is one line."""
    out = tmp_path / "c.json"
    ok = subprocess.run([sys.executable, TOOLS / "config_maker.py", "--set", "bucket_size_mb=50", "--out", out],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(out.read_text())["extra"] == {"bucket_size_mb": 50}
    bad = subprocess.run([sys.executable, TOOLS / "config_maker.py", "--set", "pp_schedule=1f1b", "--out", out],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    expect_one_line(bad, "--set pp_schedule=1f1b: train.py has no flag --pp-schedule")


def test_mfu_and_tokens_per_gpu_in_the_log(dp_pp_tp):
    flops = 1_474_560  # tiny with 4 layers and 4 kv heads at T=32: as in test_mfu_arithmetic, 4 x 40,960 per layer
    for m in dp_pp_tp[2]:
        assert m["tokens_per_s_per_gpu"] == pytest.approx(m["tokens_per_s"] / 8, abs=0.051)  # logged to 0.1
        slack = 0.005 + 100 * flops * 0.05 / 1e9  # mfu is rounded to 0.01, tokens_per_s_per_gpu to 0.1
        assert m["mfu"] == pytest.approx(100 * flops * m["tokens_per_s_per_gpu"] / 1e9, abs=slack)


# ------------------------------------------------------------------ checkpoints
def assert_usual_mode(path):
    """safetensors creates 0600 files; what the trainer writes gets 0666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, oct(path.stat().st_mode)


def test_resume_equals_an_uninterrupted_run(dp_pp_tp):
    d, args, straight = dp_pp_tp
    assert (d / "ckpt" / "latest").read_text() == "step_000008"
    for f in (d / "ckpt" / "step_000008").glob("rank*.safetensors"):
        assert_usual_mode(f)
    run = [*_without(args, "--save-dir", "--save-every", "--dump-params"), "--resume", d / "ckpt" / "step_000004"]
    resumed = run_step(STEP, 8, [*run, "--dump-params", d / "params_resumed"], d, tag="resumed")
    assert [m["step"] for m in resumed] == list(range(4, 8))
    assert_same_losses(straight[4:], resumed, rtol=1e-6, what="resumed at 4")
    a, b = load_full_params(d / "params"), load_full_params(d / "params_resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit: Adam moments and step were restored


def test_a_run_extended_with_more_steps_resumes(tmp_path):
    """The usual way to continue a run: resume its checkpoint with a larger --max-steps. The packed
    dataset does not depend on --max-steps, so the checkpoint accepts it and step k still reads global
    batch k. (The lr schedule does depend on --max-steps: --warmup-steps 8 keeps steps 0-7 on the same lr.)"""
    args = [*_with_flag(TINY, "--warmup-steps", 8), "--grad-acc-steps", "2", "--pp", "2"]
    six = run_step(STEP, 2, [*args, "--max-steps", "6", "--save-dir", tmp_path / "ckpt", "--save-every", "4"],
                   tmp_path, tag="six")
    longer = run_step(STEP, 2, [*args, "--max-steps", "8", "--resume", tmp_path / "ckpt" / "step_000004"],
                      tmp_path, tag="extended")
    assert [m["step"] for m in longer] == list(range(4, 8))
    assert_same_losses(six[4:], longer[:2], rtol=1e-6, what="resumed with --max-steps 8")


def test_checkpoint_reads_without_the_course_code(dp_pp_tp):
    """meta.json + safetensors are the whole format: rebuild every global tensor from its pieces and
    get the run's final weights; one copy of each piece (dp 1 and the tied lm_head write none)."""
    from safetensors import safe_open

    d, _, _ = dp_pp_tp
    ckpt = d / "ckpt" / "step_000008"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["layout"] == {"dp": 2, "pp": 2, "cp": 1, "tp": 2} and meta["step"] == 8
    final = load_full_params(d / "params")
    assert torch.equal(final.pop("lm_head.weight"), final["model.embed_tokens.weight"])  # tied: one key saved
    assert {k for k in meta["tensors"] if k.startswith("model/")} == {f"model/{k}" for k in final}
    for key, entry in meta["tensors"].items():
        full = torch.full(entry["shape"], float("nan"))
        for fname, k, region in entry["pieces"]:
            assert "flat" not in region and int(fname[4:9]) < 4  # tp chunks, written by dp rank 0 only
            with safe_open(ckpt / fname, "pt") as f:
                full[tuple(slice(s, e) for s, e in region["box"])] = f.get_tensor(k)
        assert not full.isnan().any(), key  # the pieces tile the global tensor
        if key.startswith("model/"):
            assert torch.equal(full, final[key[len("model/"):]]), key
        elif key.endswith("/step"):
            assert full.item() == 8.0, key
    for r in range(4, 8):  # dp rank 1: replicas, only their RNG state
        with safe_open(ckpt / f"rank{r:05d}.safetensors", "pt") as f:
            assert set(f.keys()) == {"rng/cpu"}


# the same global batch, 8 = micro-batch x grad-acc x dp, under each layout (--sp changes no saved tensor)
RESHARD = {"tp4 pp2": ["--tp", "4", "--pp", "2", "--sp", "--micro-batch-size", "2", "--grad-acc-steps", "4"],
           "dp2 cp2 tp2": ["--dp", "2", "--cp", "2", "--tp", "2", "--micro-batch-size", "2", "--grad-acc-steps", "2"],
           "pp4 tp2": ["--pp", "4", "--tp", "2", "--sp", "--micro-batch-size", "2", "--grad-acc-steps", "4"],
           "dp8": ["--dp", "8", "--micro-batch-size", "1", "--grad-acc-steps", "1"],
           "dp4 tp2 zero1": ["--dp", "4", "--tp", "2", "--zero", "1", "--micro-batch-size", "1",
                             "--grad-acc-steps", "2"]}


@pytest.mark.parametrize("layout", list(RESHARD))
def test_resume_under_another_layout(dp_pp_tp, layout):
    """Saved at step 4 under dp2 x pp2 x tp2 (--sp); steps 4-7 under `layout` are the uninterrupted run's,
    and so are the final weights (the tied lm_head copy of pp > 1 is rebuilt from the embedding)."""
    d, args, straight = dp_pp_tp
    tag = layout.replace(" ", "_")
    kept = [a for a in _without(args, "--save-dir", "--save-every", "--dump-params", "--dp", "--pp", "--tp",
                                "--micro-batch-size", "--grad-acc-steps") if a != "--sp"]
    run = [*kept, *RESHARD[layout],
           "--resume", d / "ckpt" / "step_000004", "--dump-params", d / f"params_{tag}"]
    resumed = run_step(STEP, 8, run, d, tag=tag)
    assert [m["step"] for m in resumed] == list(range(4, 8))
    assert_same_losses(straight[4:], resumed, rtol=1e-4, what=f"saved dp2 pp2 tp2, resumed {layout}")
    a, b = load_full_params(d / "params"), load_full_params(d / f"params_{tag}")
    for params in (a, b):
        if "lm_head.weight" in params:  # pp > 1, tied: the last stage's copy still equals the embedding
            assert (params.pop("lm_head.weight") - params["model.embed_tokens.weight"]).abs().max() <= 1e-6
    assert set(a) == set(b)
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 5e-5, f"{layout}: {k}"


def test_keep_last_keeps_the_newest(tmp_path):
    """5 saves with --keep-last 2 leave the two newest; an older incomplete folder (a failed save)
    goes too; a newer one (a run that went further) is left alone."""
    ckpt = tmp_path / "ckpt"
    for stale in ("step_000000", "step_000009"):
        (ckpt / stale).mkdir(parents=True)
        (ckpt / stale / "rank00000.safetensors").write_bytes(b"partial")
    run_step(STEP, 1, [*TINY, "--max-steps", "5", "--save-dir", ckpt, "--save-every", "1", "--keep-last", "2"],
             tmp_path)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_000004", "step_000005", "step_000009"]
    assert (ckpt / "latest").read_text() == "step_000005"


@pytest.fixture(scope="module")
def pp2_ckpt(work):
    """A small 2-stage pipeline run that saves at steps 2, 4, 6, 8: crashes and bad input start here."""
    d = work / "pp2"
    args = [*TINY, "--max-steps", "8", "--grad-acc-steps", "2", "--pp", "2", "--save-dir", d / "ckpt",
            "--save-every", "2"]
    return d, args, run_step(STEP, 2, args, d)


def test_killed_mid_step_resumes_from_last_complete_checkpoint(pp2_ckpt, tmp_path):
    _, args, straight = pp2_ckpt
    run, log = _with_flag(args, "--save-dir", tmp_path / "ckpt"), tmp_path / "crashed.jsonl"
    proc = torchrun(DIR / "train.py", 2, [*run, "--log-file", log], env={"COURSE_CRASH_AT_STEP": "5"}, check=False)
    assert proc.returncode != 0
    assert [m["step"] for m in read_metrics(log)] == list(range(5))  # died inside step 5
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_000004"
    resumed = run_step(STEP, 2, [*run, "--resume", "latest"], tmp_path, tag="after_crash")
    assert [m["step"] for m in resumed] == list(range(4, 8))
    assert_same_losses(straight[4:], resumed, rtol=1e-6, what="resumed after a crash mid-step")


def test_crash_while_saving_keeps_latest_on_the_previous_checkpoint(pp2_ckpt, tmp_path):
    _, args, straight = pp2_ckpt
    run = _with_flag(args, "--save-dir", tmp_path / "ckpt")
    proc = torchrun(DIR / "train.py", 2, run, env={"COURSE_CRASH_IN_SAVE": "4"}, check=False)
    assert proc.returncode != 0
    assert (tmp_path / "ckpt" / "step_000004.tmp" / "rank00001.safetensors").exists()  # files written...
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_000002"  # ...but never declared complete
    resumed = run_step(STEP, 2, [*run, "--resume", "latest"], tmp_path)
    assert [m["step"] for m in resumed] == list(range(2, 8))
    assert_same_losses(straight[2:], resumed, rtol=1e-6, what="resumed after a crash in save")


def test_failed_write_on_one_rank_keeps_latest_and_stops_every_rank(pp2_ckpt, tmp_path):
    _, args, straight = pp2_ckpt
    run = _with_flag(args, "--save-dir", tmp_path / "ckpt")
    env = {"COURSE_FAIL_SAVE_RANK": "1", "COURSE_FAIL_SAVE_STEP": "4"}  # rank 1's disk is full at step 4
    proc = torchrun(DIR / "train.py", 2, run, timeout=60, env=env, check=False)  # no hang in a collective
    expect_one_line(proc, "error: checkpoint step_000004 not saved: rank 1 could not write ")
    assert "rank00001.safetensors (No space left on device); latest still names step_000002" in proc.stderr
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_000002"
    assert not (tmp_path / "ckpt" / "step_000004" / "meta.json").exists()
    resumed = run_step(STEP, 2, [*run, "--resume", "latest"], tmp_path)
    assert [m["step"] for m in resumed] == list(range(2, 8))
    assert_same_losses(straight[2:], resumed, rtol=1e-6, what="resumed after a failed save")


@pytest.mark.parametrize("damage, expect", [
    ("missing", "checkpoint step_000006: rank00001.safetensors is missing"),
    ("truncated", "checkpoint step_000006: rank00000.safetensors is truncated or changed"),
    ("batch", "checkpoint step_000006 was trained with a global batch of 4 sequences (--micro-batch-size 2 x "
              "--grad-acc-steps 2 x dp 1), this run has 8 (2 x 2 x dp 2); use --micro-batch-size 2 "
              "--grad-acc-steps 1 with dp 2 so step k reads global batch k"),
])
def test_bad_checkpoint_is_one_clear_line(pp2_ckpt, tmp_path, damage, expect):
    d, args, _ = pp2_ckpt
    ckpt = tmp_path / "step_000006"
    shutil.copytree(d / "ckpt" / "step_000006", ckpt)
    layout = ["--pp", "2"]
    if damage == "missing":
        (ckpt / "rank00001.safetensors").unlink()
    elif damage == "truncated":
        f = ckpt / "rank00000.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        layout = ["--dp", "2"]
    run = [*_without(args, "--save-dir", "--save-every", "--pp"), *layout, "--resume", ckpt]
    expect_one_line(torchrun(DIR / "train.py", 2, run, timeout=120, check=False), expect)


# ------------------------------------------------------------------ Hugging Face
def hf_config(tie):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=tie, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def llama3_config(tie):
    """A reduced Llama 3.x with everything the plain config leaves out: llama3 RoPE (scaled below 16 tokens
    of wavelength), q/k/v/o and MLP biases, head_dim 16 (not 32 / 4: q is (64, 32)), GQA 4:2."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       tie_word_embeddings=tie, rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 16})


def save_hf(path, tie=True, seed=0, config=hf_config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config(tie)).eval()
    with torch.no_grad():  # transformers starts biases at 0 and norms at 1: draw them, so a lost one shows
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.5)
    model.save_pretrained(path)
    return model


def first_batch_loss(hf, tokenizer_dir, seq_len=32, G=4):
    """transformers' loss on global batch 0 of the bundled corpus (seed 42), as the trainer sees it."""
    from transformers import AutoTokenizer

    data = load("data")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    sequences = data.load_sequences(data.DEFAULT_DATASET, tok, seq_len, G)
    batch = sequences[data.global_batch(len(sequences), 0, G, 42)]  # (G, T + 1)
    with torch.no_grad():
        logits = hf(batch[:, :-1]).logits  # (G, T, V)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item(), batch


def tensors(path):
    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors")


def test_hf_round_trip_tp_pp(tmp_path):
    """transformers -> --init-from-hf (tp2 x pp2, tied) -> --export-hf: the same tensors, bit for bit,
    and the first batch's loss is transformers' loss on it. --lr 0 makes the one step an exact
    identity (AdamW with lr 0 multiplies by 1 and adds 0), so the step logs the loss of the
    loaded weights and the export must equal the import."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf = save_hf(tmp_path / "in")
    args = ["--init-from-hf", tmp_path / "in", "--pp", "2", "--tp", "2", "--seq-len", "32", "--micro-batch-size", "2",
            "--grad-acc-steps", "2", "--max-steps", "1", "--lr", "0", "--dtype", "float32", "--device", "cpu",
            "--export-hf", tmp_path / "out"]
    got = run_step(STEP, 4, args, tmp_path)
    a, b = tensors(tmp_path / "in"), tensors(tmp_path / "out")
    assert set(a) == set(b) and "lm_head.weight" not in b  # tied: written once
    assert all(torch.equal(a[k], b[k]) for k in a)
    back, info = LlamaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    data = load("data")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")  # the export carries the run's tokenizer
    sequences = data.load_sequences(data.DEFAULT_DATASET, tok, 32, 4)
    batch = sequences[data.global_batch(len(sequences), 0, 4, 42)]  # (G, T + 1)
    with torch.no_grad():
        logits = hf(batch[:, :-1]).logits  # (G, T, V)
        assert torch.equal(back(batch[:, :-1]).logits, logits)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert abs(got[0]["loss"] - ref) <= 1e-5 * ref, (got[0]["loss"], ref)


def test_hf_export_with_zero_steps_untied(tmp_path):
    save_hf(tmp_path / "in", tie=False, seed=1)
    args = ["--init-from-hf", tmp_path / "in", "--seq-len", "32", "--max-steps", "0", "--device", "cpu",
            "--export-hf", tmp_path / "out"]
    torchrun(DIR / "train.py", 1, args)
    a, b = tensors(tmp_path / "in"), tensors(tmp_path / "out")
    assert set(a) == set(b) and "lm_head.weight" in b and all(torch.equal(a[k], b[k]) for k in a)
    assert_usual_mode(tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("layout, tie", [(["--tp", "2", "--pp", "2"], True), (["--pp", "2", "--cp", "2"], False)],
                         ids=["tp2xpp2,tied", "pp2xcp2,untied"])
def test_hf_round_trip_llama3_biases_head_dim(tmp_path, layout, tie):
    """A Llama 3.x-style transformers model (llama3 RoPE, attention and MLP biases, explicit head_dim, GQA)
    -> --init-from-hf -> --export-hf with --lr 0: the same tensors bit for bit (column biases sliced over
    tp and put back together, row biases whole), and the first batch's loss is transformers' loss."""
    from transformers import LlamaForCausalLM

    hf = save_hf(tmp_path / "in", tie=tie, seed=2, config=llama3_config)
    args = ["--init-from-hf", tmp_path / "in", *layout, "--seq-len", "32", "--micro-batch-size", "2",
            "--grad-acc-steps", "2", "--max-steps", "1", "--lr", "0", "--dtype", "float32", "--device", "cpu",
            "--export-hf", tmp_path / "out"]
    got = run_step(STEP, 4, args, tmp_path)
    a, b = tensors(tmp_path / "in"), tensors(tmp_path / "out")
    assert set(a) == set(b) and ("lm_head.weight" in b) != tie
    assert {"model.layers.2.self_attn.o_proj.bias", "model.layers.0.mlp.up_proj.bias"} <= set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    back, info = LlamaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    assert back.config.rope_parameters == hf.config.rope_parameters and back.config.head_dim == 16
    ref, batch = first_batch_loss(hf, tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(back(batch[:, :-1]).logits, hf(batch[:, :-1]).logits)
    assert abs(got[0]["loss"] - ref) <= 1e-5 * ref, (got[0]["loss"], ref)


def test_llama3_with_biases_trains_like_step01(tmp_path):
    """The same kind of model trained under tp2 (--sp) x cp2: step01's losses and final weights, so every
    bias gets its whole gradient (a row-parallel bias under --sp: summed over tp) and RoPE its global
    zig-zag positions. The first loss is transformers' on the same batch."""
    hf = save_hf(tmp_path / "in", tie=False, seed=3, config=llama3_config)
    common = ["--model", tmp_path / "in", "--seq-len", "32", "--micro-batch-size", "2", "--grad-acc-steps", "2",
              "--max-steps", "4", "--lr", "3e-3", "--warmup-steps", "2", "--dtype", "float32", "--device", "cpu"]
    got = run_step(STEP, 4, [*common, "--tp", "2", "--sp", "--cp", "2", "--dump-params", tmp_path / "params"],
                   tmp_path)
    ref, ref_params = step01_reference(common, tmp_path)
    assert_same_losses(ref, got, what="tp2 sp x cp2, llama3 + biases + head_dim")
    full = load_full_params(tmp_path / "params")
    assert set(full) == set(ref_params) and "model.layers.1.mlp.down_proj.bias" in full
    for name, t in ref_params.items():
        assert (full[name] - t).abs().max().item() <= 5e-5, name
    loss, _ = first_batch_loss(hf, load("data").DEFAULT_TOKENIZER)  # the run's (bundled) tokenizer
    assert abs(got[0]["loss"] - loss) <= 1e-5 * loss, (got[0]["loss"], loss)


def test_hf_dir_whose_shapes_do_not_match_is_one_clear_line(tmp_path):
    save_hf(tmp_path / "in")
    cfg = json.loads((tmp_path / "in" / "config.json").read_text())
    cfg["intermediate_size"] = 96  # config.json now disagrees with the safetensors
    (tmp_path / "in" / "config.json").write_text(json.dumps(cfg))
    proc = torchrun(DIR / "train.py", 2, ["--init-from-hf", tmp_path / "in", "--tp", "2", "--seq-len", "32",
                                          "--max-steps", "1", "--device", "cpu"], timeout=120, check=False)
    expect_one_line(proc, "model.layers.0.mlp.gate_proj.weight: checkpoint shape [64, 32] != model shape [96, 32]")


# ------------------------------------------------------------------ pure functions and scripts
def test_mfu_arithmetic():
    from transformers import LlamaConfig

    mfu = load("mfu")
    utils = load("utils")
    cfg = LlamaConfig.from_pretrained(utils.MODELS / "smollm-135m")
    # by hand: per layer q 576*576 + k,v 2*576*192 + o 576*576 + mlp 3*576*1536 = 3,538,944;
    # x 30 layers + head 49152*576 = 134,479,872 (the tied embedding counted once, as the head)
    assert mfu.matmul_params(cfg) == 134_479_872
    assert mfu.flops_per_token(cfg, 2048) == 6 * 134_479_872 + 12 * 30 * 576 * 2048 == 1_231_552_512
    untied = LlamaConfig.from_pretrained(utils.MODELS / "smollm-135m", tie_word_embeddings=False)
    assert mfu.flops_per_token(untied, 2048) == 1_231_552_512  # same math, so the same FLOPs
    tiny = LlamaConfig.from_pretrained(utils.MODELS / "tiny")
    # 2 layers x (3 x 64*64 + 64*32 + ... ) : q 4096 + k,v 2*2048 + o 4096 + mlp 3*8192 = 36,864 per layer
    assert mfu.flops_per_token(tiny, 32) == 6 * (2 * 36_864 + 1024 * 64) + 12 * 2 * 64 * 32 == 884_736
    m = mfu.MFU(tiny, 32, n_devices=2, device="cpu", override_tflops=884_736 * 500 / 0.4 / 1e12)
    assert m(1000.0) == {"tokens_per_s_per_gpu": 500.0, "mfu": 40.0}
    assert mfu.MFU(tiny, 32, 2, "cpu")(1000.0) == {"tokens_per_s_per_gpu": 500.0}  # CPU: no peak, no MFU
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.5),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.05),
                       ("NVIDIA A10G", None), ("Tesla T4", None)]:
        assert mfu.peak_tflops(name) == peak, name


def test_mfu_counts_head_dim_and_not_biases():
    from transformers import LlamaConfig

    mfu = load("mfu")
    utils = load("utils")
    # head_dim 32 with hidden 64 and 4 heads: q (128, 64), k/v (64, 64), o (64, 128), mlp 3 x (96, 64);
    # the biases are elementwise adds, not matmuls: the same N with and without them
    shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=96,
                 num_hidden_layers=2, vocab_size=128)
    per_layer = 64 * 128 + 2 * 64 * 64 + 128 * 64 + 3 * 64 * 96  # 43,008
    for bias in (False, True):
        cfg = LlamaConfig(**shape, attention_bias=bias, mlp_bias=bias)
        assert mfu.matmul_params(cfg) == 2 * per_layer + 128 * 64 == 94_208
        assert mfu.flops_per_token(cfg, 32) == 6 * 94_208 + 12 * 2 * (4 * 32) * 32
    # llama3.2-1b: per layer q 2048^2 + k,v 2 x 2048 x 512 + o 2048^2 + mlp 3 x 2048 x 8192 = 60,817,408;
    # x 16 layers + the head 128256 x 2048 = the published 1,235,814,400 less its 33 norm gains of 2048
    # (the tied table is counted once, as the head)
    cfg = LlamaConfig.from_pretrained(utils.MODELS / "llama3.2-1b")
    assert mfu.matmul_params(cfg) == 16 * 60_817_408 + 128_256 * 2048 == 1_235_814_400 - 33 * 2048 == 1_235_746_816
    assert mfu.flops_per_token(cfg, 8192) == 6 * 1_235_746_816 + 12 * 16 * 2048 * 8192


def test_unknown_config_key_is_one_clear_line(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"training": {"seq_len": 32, "learning_rate": 1e-3}}))
    proc = subprocess.run([sys.executable, DIR / "train.py", "--config", cfg], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    expect_one_line(proc, "unknown key(s) learning_rate")


# ------------------------------------------------------------------ --compile and --profile (speed.py)
SPEED = _with_flag(COMMON, "--max-steps", "5")


@pytest.mark.parametrize("nproc, layout, dp", [
    (4, ["--pp", "2", "--tp", "2", "--sp", "--recompute"], 1),  # tp's collectives traced into the graphs
    (4, ["--dp", "2", "--cp", "2", "--zero", "1"], 2),  # cp's ring runs eager between compiled parts
], ids=["pp2-tp2-sp-recompute", "dp2-cp2-zero1"])
def test_compiled_layers_equal_step01(work, nproc, layout, dp):
    d = work / f"compiled_{dp}"
    got = run_step(STEP, nproc, [*SPEED, *layout, "--compile", "--profile", d / "profile",
                                 "--dump-params", d / "params"], d)
    compare_with_step01(got, SPEED, dp, work, d / "params", f"{' '.join(layout)} --compile")
    for rank in range(nproc):  # a Chrome trace per rank: the profiled steps 1-3 and their ops
        events = json.loads((d / "profile" / f"rank{rank}.json").read_text())["traceEvents"]
        names = {e.get("name", "") for e in events}
        assert {f"ProfilerStep#{i}" for i in (1, 2, 3)} <= names, sorted(n for n in names if "Step" in n)
        assert "aten::mm" in names or "aten::addmm" in names


@pytest.mark.parametrize("flags, text", [
    (["--compile", "--memory-report"], "drop --compile (or --memory-report)"),
    (["--profile", "PROFILE", "--max-steps", "1"], "--profile records the steps after the first"),
])
def test_speed_flags_refuse_what_they_cannot_do(tmp_path, flags, text):
    flags = [str(tmp_path / "p") if f == "PROFILE" else f for f in flags]
    proc = torchrun(DIR / "train.py", 1, [*TINY, "--max-steps", "3", *flags], timeout=180, check=False)
    expect_one_line(proc, text)


def test_gpu_check_script_runs_its_parts_on_cpu(tmp_path):
    """gpu_check.sh, tried as its header says (CHECK_DEVICE=cpu), on the parts that need no compiler."""
    run = lambda *parts: subprocess.run(["bash", TOOLS / "gpu_check.sh", tmp_path / "out", *parts], cwd=REPO,
                                        env=child_env({"CHECK_DEVICE": "cpu"}), capture_output=True, text=True,
                                        timeout=300)
    proc = run("versions", "bench", "summary")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    status = (tmp_path / "out" / "status.txt").read_text()
    assert all(f"{part} ok" in status for part in ("versions", "bench", "summary")), status
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| transformers (LlamaForCausalLM), eager |" in summary and "| course (benchmark.py), eager |" in summary
    proc = run("versions", "nosuch")
    assert proc.returncode == 2 and "error: unknown part nosuch" in proc.stdout


def test_benchmark_runs_on_cpu(tmp_path):
    cmd = [sys.executable, TOOLS / "benchmark.py", "--device", "cpu", "--model", "tiny", "--seq-len", "32",
           "--micro-batch-size", "2", "--steps", "2", "--warmup", "1", "--peak-tflops", "0.001"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for who in ("course", "transformers"):
        assert out[who]["tokens_per_s"] > 0 and out[who]["mfu"] > 0 and out[who]["loss"] > 5, out
    assert out["flops_per_token"] == 884_736


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
@pytest.mark.parametrize("script", ["benchmark.py", "gpu_smoke.py"])
def test_gpu_scripts_fail_clearly_without_a_gpu(script):
    proc = subprocess.run([sys.executable, TOOLS / script], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "GPU" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_slurm_script_launches_train_py(tmp_path):
    """slurm.sbatch with stand-ins for srun/scontrol/nvidia-smi: one node, 2 CPU processes, c10d rendezvous."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {"scontrol": 'echo 127.0.0.1', "nvidia-smi": 'printf "GPU 0\\nGPU 1\\n"',
             "srun": 'while [[ "$1" == --* ]]; do shift; done; exec "$@"'}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    from launch import free_port

    env = child_env({"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1",
                     "SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "t", "MASTER_PORT": str(free_port()),
                     "SAVE_DIR": str(tmp_path / "ckpt")})
    log = tmp_path / "m.jsonl"
    proc = subprocess.run(["bash", TOOLS / "slurm.sbatch", *TINY, "--max-steps", "2", "--dp", "2", "--log-file", log],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [m["step"] for m in read_metrics(log)] == [0, 1]
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_000002"


def _without(args, *flags):
    """args minus each flag in `flags` and its value."""
    args, out = list(args), []
    i = 0
    while i < len(args):
        if str(args[i]) in flags:
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out
