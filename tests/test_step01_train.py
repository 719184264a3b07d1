"""step01 end to end: the loss falls, python and torchrun agree, bad input fails in one line."""
import pytest

from launch import TINY, read_metrics, run_python, run_step

STEP = "step01_single_gpu"


def test_short_run_loss_falls_and_metrics_contract(tmp_path):
    log = tmp_path / "m.jsonl"
    proc = run_python(STEP, [*TINY, "--max-steps", "40", "--log-file", log])
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(log)
    assert [r["step"] for r in m] == list(range(40))
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s"):
        assert key in m[0], key
    assert m[-1]["tokens"] == 40 * 2 * 32
    assert m[0]["loss"] > 6.5  # ~ln(1024) at init
    assert sum(r["loss"] for r in m[-10:]) / 10 < sum(r["loss"] for r in m[:3]) / 3 - 0.5
    assert "step   39 | loss" in proc.stdout


def test_torchrun_single_process_equals_python(tmp_path):
    args = [*TINY, "--max-steps", "5", "--grad-acc-steps", "2"]
    log = tmp_path / "py.jsonl"
    assert run_python(STEP, [*args, "--log-file", log]).returncode == 0
    ref = read_metrics(log)
    got = run_step(STEP, 1, args, tmp_path)
    assert [r["loss"] for r in ref] == [r["loss"] for r in got]


@pytest.mark.parametrize("args, expect", [
    (["--model", "gpt5"], "neither a preset"),
    (["--model", "tiny", "--seq-len", "4096"], "--seq-len 4096 exceeds"),
    (["--vocab-size", "512"], "pass --vocab-size 1024"),
    (["--dataset", "/no/such/file.jsonl"], "does not exist"),
    (["--tokenizer", "/no/such/dir"], "does not exist"),
    (["--num-heads", "3"], "not divisible"),
])
def test_bad_input_is_one_clear_line(args, expect):
    proc = run_python(STEP, [*args, "--max-steps", "1"], timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err and err[-1].startswith("error: ") and expect in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_peak_memory_units_per_platform(monkeypatch):
    """ru_maxrss is KiB on Linux and bytes on macOS: both read as the same GiB."""
    from test_step01_model import load_step_module

    utils = load_step_module("step01_single_gpu", "utils")
    usage = type("Usage", (), {})
    for platform, maxrss in (("linux", 2**20), ("darwin", 2**30)):  # 1 GiB either way
        usage.ru_maxrss = maxrss
        monkeypatch.setattr(utils.sys, "platform", platform)
        monkeypatch.setattr(utils.resource, "getrusage", lambda who: usage)
        assert utils.memory_gib("cpu") == 1.0, platform
