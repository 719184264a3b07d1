"""Bad input never breaks a run (issue 22): it ends non-zero with one `error:` line that names the fix,
never with a traceback through the course's files, a hang, a silent accept or a silent loss.

Three launches in all. tests/workers/parse_flags.py runs every flag case of every step, the
world-1 resumes of damaged checkpoints and the non-finite guard in one Python process. A 2-rank
pipeline saves the checkpoint they damage (over a stale folder of the same name: the save must
replace it whole), and a 2-rank resume of a checkpoint that lacks a tensor only the second stage
reads must stop both ranks with that rank's line, before any training collective.
"""
import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from launch import REPO, STEPS, TINY, child_env, torchrun

STEP07 = REPO / "step07_4d_combined"
RUN = [*TINY, "--max-steps", "4", "--grad-acc-steps", "2"]  # global batch 4: pp2 and world 1 alike
# Every numeric flag, and the steps that have it; 0 is a documented meaning for these.
BASE = ["--num-layers", "--hidden-size", "--num-heads", "--num-kv-heads", "--head-dim", "--intermediate-size",
        "--vocab-size", "--tie-word-embeddings", "--max-tokens", "--seq-len", "--micro-batch-size",
        "--grad-acc-steps", "--max-steps", "--warmup-steps", "--seed", "--lr", "--weight-decay", "--grad-clip"]
LAYOUT = {"--dp": 2, "--bucket-size-mb": 2, "--tp": 3, "--pp": 4, "--cp": 6}  # flag: the step that adds it
STEP07_ONLY = ["--save-every", "--keep-last", "--peak-tflops"]
ZERO_MEANS_SOMETHING = {"--tie-word-embeddings", "--max-steps", "--lr", "--warmup-steps", "--seed",
                        "--weight-decay", "--save-every", "--keep-last"}
HUGE_IS_REFUSED = {"--num-layers", "--hidden-size", "--num-heads", "--num-kv-heads", "--head-dim",
                   "--intermediate-size", "--vocab-size", "--tie-word-embeddings", "--seq-len", "--seed", "--lr",
                   "--dp", "--tp", "--pp", "--cp"}  # the others take any size (a long run, a big bucket)


def flags_of(i, step):
    return BASE + [f for f, first in LAYOUT.items() if i + 1 >= first] + (STEP07_ONLY if i == 6 else [])


def one_error_line(text, what):
    """A SystemExit message: exactly one line, an `error:` one."""
    assert text and text.startswith("error: ") and "\n" not in text, f"{what}: {text!r}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """pp2 saves at steps 2 and 4 into a folder where a stale step_000004 (another run's) already is."""
    d = tmp_path_factory.mktemp("bad_input")
    stale = d / "ckpt" / "step_000004"
    stale.mkdir(parents=True)
    (stale / "rank00007.safetensors").write_bytes(b"a run with 8 ranks")
    (stale / "meta.json").write_text("{}")
    torchrun(STEP07 / "train.py", 2, [*RUN, "--pp", "2", "--save-dir", d / "ckpt", "--save-every", "2"],
             timeout=180)
    assert sorted(p.name for p in stale.iterdir()) == ["meta.json", "rank00000.safetensors",
                                                      "rank00001.safetensors"], "old and new files mixed"
    return d


def damaged(saved, name, edit=None, file_edit=None):
    """A copy of step_000004 with its meta.json (a dict) and/or one of its files changed."""
    ckpt = saved / name
    shutil.copytree(saved / "ckpt" / "step_000004", ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    if edit:
        edit(meta)
        (ckpt / "meta.json").write_text(json.dumps(meta))
    if file_edit:
        file_edit(ckpt, meta)
    return ckpt


def nan_in_place(ckpt, meta):
    """Overwrite the first float32 tensor of rank00000 with NaN: the file keeps its size."""
    f = ckpt / "rank00000.safetensors"
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    key, entry = next((k, v) for k, v in header.items() if k.startswith("model/") and v["dtype"] == "F32")
    a, b = entry["data_offsets"]
    data[8 + n + a:8 + n + b] = struct.pack("<f", float("nan")) * ((b - a) // 4)
    f.write_bytes(bytes(data))


def drop(*keys):
    def edit(meta):
        for k in keys:
            meta["tensors"].pop(k)
    return edit


def test_every_flag_damaged_checkpoints_and_nan_in_one_process(saved, tmp_path):
    cases, expect = [], []  # expect: (what, the text the error line must hold, or None: it must pass)
    for i, step in enumerate(STEPS):
        for flag in flags_of(i, step):
            huge = "1e300" if flag in ("--lr", "--weight-decay", "--grad-clip", "--bucket-size-mb",
                                       "--peak-tflops") else str(10**12)
            for value in ("0", "-1", huge, *(["nan"] if "e" in huge else [])):
                argv = [a for j, a in enumerate(TINY) if flag not in (a, TINY[j - 1])] + [flag, value]
                refused = (value in ("-1", "nan") or (value == "0" and flag not in ZERO_MEANS_SOMETHING)
                           or (value == huge and flag in HUGE_IS_REFUSED))
                cases.append([step, argv, False])
                expect.append((f"{step[:6]} {flag} {value}", flag if value in ("0", "-1", "nan") else "", refused))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"training": {"grad_acc_steps": 0}}))  # a default, not through the flag's type
    cases.append(["step07_4d_combined", [*TINY, "--config", str(config)], False])
    expect.append(("--config with grad_acc_steps 0", "--grad-acc-steps: 0 is not an integer >= 1", True))

    resume = lambda ckpt, *more: ["step07_4d_combined", [*RUN, "--resume", str(ckpt), *more], True]  # noqa: E731
    for name, edit, file_edit, text in [
        ("no_files", lambda m: m.pop("files"), None, "meta.json: files is missing"),
        ("step_eight", lambda m: m.update(step="eight"), None, "meta.json: step should be of type int, it is 'eight'"),
        ("nan_in_place", None, nan_in_place, "rank00000.safetensors does not match its checksum"),
        ("no_moment", drop("adam/model.norm.weight/exp_avg_sq"), None,
         "has no adam/model.norm.weight/exp_avg_sq: AdamW's state is incomplete; resume from another checkpoint, "
         "or pass --reset-optimizer"),
    ]:
        cases.append(resume(damaged(saved, name, edit, file_edit)))
        expect.append((f"checkpoint {name}", text, True))
    cases.append(resume(saved / "no_moment", "--reset-optimizer", "--max-steps", "6", "--log-file",
                        str(tmp_path / "reset.jsonl")))
    expect.append(("--reset-optimizer resumes", "", False))
    nan = tmp_path / "nan"  # the guard: step07 saves every step until the loss is NaN
    for step, more in (("step01_single_gpu", []), ("step07_4d_combined", ["--save-dir", nan, "--save-every", "1"])):
        cases.append([step, [*RUN, "--lr", "1000", "--max-steps", "20", *map(str, more)], True])
        expect.append((f"{step[:6]} --lr 1000", "is nan", True))

    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, REPO / "tests" / "workers" / "parse_flags.py", tmp_path / "cases.json", out],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert not {f for r in results for f in r["unchecked"]}, "numeric flags without a range"
    for (what, text, refused), r in zip(expect, results):
        assert "traceback" not in r, f"{what}: {r['traceback']}"
        if refused:
            one_error_line(r["exit"], what)
            assert text in r["exit"], f"{what}: {r['exit']}"
        else:
            assert r["exit"] is None, f"{what} is meaningful but was refused: {r['exit']}"
    assert [json.loads(line)["step"] for line in (tmp_path / "reset.jsonl").read_text().splitlines()] == [4, 5]
    bad = int(results[-1]["exit"].split()[2].rstrip(":"))  # step07's first non-finite step: nothing saved of it
    assert "stopped, nothing saved" in results[-1]["exit"] and bad < 20, results[-1]["exit"]
    assert sorted(p.name for p in nan.glob("step_*")) == [f"step_{s:06d}" for s in range(1, bad + 1)]
    assert f"(the last good checkpoint is {nan / f'step_{bad:06d}'})" in results[-1]["exit"]


def test_a_tensor_only_one_rank_reads_stops_every_rank(saved):
    """The last stage alone reads model.norm.weight: without it, both ranks print its line, and
    neither reaches a training collective (none hangs, none dies in gloo)."""
    ckpt = damaged(saved, "no_norm", drop("model/model.norm.weight"))
    proc = torchrun(STEP07 / "train.py", 2, [*RUN, "--pp", "2", "--resume", ckpt], timeout=120, check=False)
    out = proc.stdout + proc.stderr
    # the ranks share one pipe, and Python writes a SystemExit's text and its newline apart: two
    # ranks' lines can land on one line, so split at each "error: "
    lines = [m for line in out.splitlines() for m in re.split(r"(?=error: )", line) if m.startswith("error: ")]
    assert proc.returncode != 0 and len(lines) == 2 and len(set(lines)) == 1, out[-3000:]
    assert "has no model/model.norm.weight" in lines[0] and "(rank 1; every rank stopped)" in lines[0], lines
    assert 'File "' + str(STEP07) not in out and "step    " not in out, out[-3000:]


def test_a_read_only_data_cache_names_the_flag(tmp_path, monkeypatch):
    """A cache it cannot write to serves token files already built, but cannot build one: the line
    names --data-cache (root writes anywhere, so the refusal is simulated where the lock is created)."""
    from test_step01_model import load_step_module

    T = load_step_module("step01_single_gpu", "data").token_file
    real = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, flags, *args)

    with monkeypatch.context() as m, pytest.raises(OSError) as e:
        m.setattr(T.os, "open", read_only)
        T.build_once(tmp_path / "corpus-tok.bin", lambda: None)
    assert str(e.value) == (f"--data-cache {tmp_path} is not writable (Permission denied) and holds no token file "
                            f"of this corpus yet; pass a folder you can write to")
