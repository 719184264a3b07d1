"""The token file: built once (one builder among concurrent processes), reused, checked against its
header; bad data and a failing builder stop every process with one line. Each test uses its own
cache folder (tmp_path), so it sees a cold cache."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from launch import REPO, TINY, child_env, torchrun
from test_step01_model import load_step_module

D = load_step_module("step01_single_gpu", "data")
T = D.token_file  # how the file is built, shared and checked (the same module data.py calls)
TOK = D.load_tokenizer(D.DEFAULT_TOKENIZER)


def corpus(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def docs(n):
    return [f"def f{i}(x):\n    return x * {i}  # document {i}\n" for i in range(n)]


def one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


# ------------------------------------------------------------------ reuse
def test_second_load_maps_the_file_without_tokenizing(tmp_path, monkeypatch):
    data = corpus(tmp_path / "c.jsonl", docs(300))
    first = D.load_sequences(data, TOK, 16, G=4, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(T, "tokenize", lambda *a: pytest.fail("the second load tokenized again"))
    again = D.load_sequences(data, TOK, 16, G=4, cache_dir=tmp_path / "cache")
    rows = torch.arange(len(first))
    assert len(again) == len(first) and torch.equal(again[rows], first[rows])
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 1


def test_a_warm_process_does_not_import_datasets(tmp_path):
    """A fresh interpreter, as every rank of a later launch: it maps the file and never needs `datasets`."""
    code = ("import sys; sys.path.insert(0, 'step01_single_gpu'); import data as D; "
            "s = D.load_sequences(D.DEFAULT_DATASET, D.load_tokenizer(D.DEFAULT_TOKENIZER), 64, 8, "
            "cache_dir=sys.argv[1]); "
            "print(len(s), 'datasets' in sys.modules)")
    run = lambda: subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=child_env(),
                                 capture_output=True, text=True, timeout=120)
    cold, warm = run(), run()
    assert cold.returncode == 0 and "tokenizing" in cold.stdout, cold.stderr[-2000:]
    assert warm.returncode == 0 and "tokenizing" not in warm.stdout, warm.stderr[-2000:]
    assert warm.stdout.splitlines()[-1] == "2447 False"


def test_the_key_follows_the_corpus_and_max_tokens(tmp_path):
    cache = tmp_path / "cache"
    data = corpus(tmp_path / "c.jsonl", docs(300))
    whole = D.load_sequences(data, TOK, 16, G=4, cache_dir=cache)
    capped = D.load_sequences(data, TOK, 16, G=4, max_tokens=170, cache_dir=cache)  # 10 rows of 17
    assert len(capped) == 10 and torch.equal(capped[torch.arange(10)], whole[torch.arange(10)])
    corpus(tmp_path / "c.jsonl", docs(301))  # the corpus changed (size, mtime): a new file
    assert len(D.load_sequences(data, TOK, 16, G=4, cache_dir=cache)) > len(whole)
    assert len(list(cache.glob("*.bin"))) == 3 and not list(cache.glob(".*"))  # no temporary left over


def test_a_vocabulary_over_65536_tokens_is_stored_as_uint32(tmp_path):
    class BigVocab:  # 70,000 ids: one token per character, shifted past uint16
        name_or_path, eos_token_id = "big-vocab", 69_999

        def __len__(self):
            return 70_000

        def get_vocab(self):
            return {}

        def __call__(self, texts, return_attention_mask=False):
            return {"input_ids": [[66_000 + ord(c) % 3000 for c in t] for t in texts]}

    texts = docs(50)
    seqs = D.load_sequences(corpus(tmp_path / "c.jsonl", texts), BigVocab(), 16, G=2, cache_dir=tmp_path)
    header = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert header["dtype"] == "uint32" and next(tmp_path.glob("*.bin")).stat().st_size == 4 * header["n_tokens"]
    stream = [66_000 + ord(c) % 3000 for c in texts[0]] + [69_999]
    assert seqs[0].tolist() == stream[:17]


def test_tokenizing_in_several_processes_keeps_the_corpus_order(tmp_path, monkeypatch):
    data = corpus(tmp_path / "c.jsonl", docs(3000))
    alone = D.load_sequences(data, TOK, 16, G=4, cache_dir=tmp_path / "one")
    monkeypatch.setattr(T, "POOL_BYTES", 0)  # any corpus is big enough for the pool of processes
    pooled = D.load_sequences(data, TOK, 16, G=4, cache_dir=tmp_path / "pool")
    rows = torch.arange(len(alone))
    assert len(pooled) == len(alone) and torch.equal(pooled[rows], alone[rows])


# ------------------------------------------------------------------ a file that does not match its header
@pytest.fixture
def built(tmp_path):
    data = corpus(tmp_path / "c.jsonl", docs(300))
    D.load_sequences(data, TOK, 16, G=4, cache_dir=tmp_path / "cache")
    return data, next((tmp_path / "cache").glob("*.bin"))


def test_truncated_file_is_one_line_naming_it(built):
    data, path = built
    os.truncate(path, path.stat().st_size - 2)
    with pytest.raises(ValueError) as e:
        D.load_sequences(data, TOK, 16, G=4, cache_dir=path.parent)
    one_line_error(e, str(path), "truncated", "delete")


def test_edited_file_is_one_line_naming_it(built):
    data, path = built
    with open(path, "r+b") as f:
        f.write(b"\xff\xff")  # same size, other tokens
    with pytest.raises(ValueError) as e:
        D.load_sequences(data, TOK, 16, G=4, cache_dir=path.parent)
    one_line_error(e, str(path), "checksum", "delete")


def test_a_file_of_another_tokenizer_is_one_line_naming_it(built):
    data, path = built
    other = D.load_tokenizer(D.DEFAULT_TOKENIZER)
    other.add_tokens(["<extra>"])  # another vocabulary: another key, another file name
    theirs, _, _ = T.locate(data, other, cache_dir=path.parent)
    for suffix in (".bin", ".json"):  # put this tokenizer's file where the other one's belongs
        theirs.with_suffix(suffix).write_bytes(path.with_suffix(suffix).read_bytes())
    with pytest.raises(ValueError) as e:
        D.load_sequences(data, other, 16, G=4, cache_dir=path.parent)
    one_line_error(e, str(theirs), "another tokenizer", "delete")


# ------------------------------------------------------------------ bad data
@pytest.mark.parametrize("content, words", [
    ("", ["is empty"]),
    ('{"n": 1}\n{"n": 2}\n', ["has no text column (columns: n)", "'text' column of strings"]),
    ('{"text": 7}\n', ["column 'text' holds int, not text"]),
], ids=["empty", "no-text-column", "text-not-strings"])
def test_bad_corpus_is_one_line(tmp_path, content, words):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(ValueError) as e:
        D.load_sequences(str(tmp_path / "c.jsonl"), TOK, 16, G=4, cache_dir=tmp_path)
    one_line_error(e, *words)


def test_a_chosen_text_column_is_checked_and_keyed(tmp_path):
    rows = [{"topic": f"t{i}", "content": d, "n": i} for i, d in enumerate(docs(60))]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for column, words in (("body", ["--text-column body", "has no such column (columns: topic, content, n)"]),
                          ("n", ["column 'n' holds int, not text", "--text-column"])):
        with pytest.raises(ValueError) as e:
            D.load_sequences(str(path), TOK, 16, G=4, cache_dir=tmp_path / "cache", text_column=column)
        one_line_error(e, *words)
    content = D.load_sequences(str(path), TOK, 16, G=4, cache_dir=tmp_path / "cache", text_column="content")
    topic = D.load_sequences(str(path), TOK, 16, G=4, cache_dir=tmp_path / "cache", text_column="topic")
    assert len(content) > len(topic)  # another column, another token file
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 2
    # the column is in the key only when it is given: a default run keeps the key (and the file) it had
    _, source, key = T.locate(str(path), TOK, cache_dir=tmp_path / "cache")
    _, chosen, chosen_key = T.locate(str(path), TOK, cache_dir=tmp_path / "cache", text_column="text")
    assert "text_column" not in source and chosen["text_column"] == "text" and chosen_key != key


def train_once(tmp_path, *args):
    """step01's train.py for one step on the tiny model, as a user runs it -> (returncode, stdout, stderr)."""
    proc = subprocess.run([sys.executable, str(REPO / "step01_single_gpu" / "train.py"), *TINY, "--max-steps", "1",
                           *map(str, args)], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_error_line(result, *words):
    rc, out, err = result
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert rc != 0 and last.startswith("error: ") and all(w in last for w in words), err[-2000:]
    assert "Traceback" not in err and sum(line.startswith("error: ") for line in err.splitlines()) == 1, err[-2000:]


def test_a_corpus_without_text_column_names_its_columns_and_the_flag(tmp_path):
    """topic and content, both strings: no guess. --text-column content trains, and says what it read."""
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"topic": f"topic {i}", "content": d}) + "\n" for i, d in enumerate(docs(80))))
    cache = tmp_path / "cache"
    assert_one_error_line(train_once(tmp_path, "--dataset", path, "--data-cache", cache),
                          "no 'text' column", "topic, content", "--text-column")
    rc, out, err = train_once(tmp_path, "--dataset", path, "--data-cache", cache, "--text-column", "content")
    assert rc == 0 and "text column 'content' (columns: topic, content)" in out and "step    0 |" in out, err[-2000:]


def test_a_data_cache_that_is_a_file_is_one_line_naming_the_flag(tmp_path):
    (tmp_path / "not_a_folder").write_text("")
    assert_one_error_line(train_once(tmp_path, "--data-cache", tmp_path / "not_a_folder"),
                          "--data-cache", "is a file, not a folder")
    with pytest.raises(OSError) as e:  # a file on its path: the same line, from the data module
        D.load_sequences(D.DEFAULT_DATASET, TOK, 16, G=4, cache_dir=tmp_path / "not_a_folder" / "below")
    one_line_error(e, "--data-cache", "cannot be created (Not a directory)")


def test_corpus_smaller_than_one_global_batch_is_one_line(tmp_path):
    with pytest.raises(ValueError) as e:
        D.load_sequences(corpus(tmp_path / "c.jsonl", docs(3)), TOK, 16, G=64, cache_dir=tmp_path)
    one_line_error(e, "one global batch needs 64", "--micro-batch-size")


def test_tokenizer_without_eos_is_one_line(tmp_path):
    tok = D.load_tokenizer(D.DEFAULT_TOKENIZER)
    tok.eos_token = None
    with pytest.raises(ValueError) as e:
        D.load_sequences(D.DEFAULT_DATASET, tok, 16, G=4, cache_dir=tmp_path)
    one_line_error(e, "has no EOS token", "--tokenizer")


# ------------------------------------------------------------------ one builder, the others wait
WORKER = ("import sys; sys.path.insert(0, 'step01_single_gpu'); import data as D; "
          "s = D.load_sequences(sys.argv[1], D.load_tokenizer(D.DEFAULT_TOKENIZER), 16, 4, cache_dir=sys.argv[2]); "
          "print('rows', len(s), s[0].tolist())")


def start(args, log):
    return subprocess.Popen(args, cwd=REPO, env=child_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_concurrent_processes_build_the_file_once(tmp_path):
    data = corpus(tmp_path / "c.jsonl", docs(2000))
    procs = [start([sys.executable, "-c", WORKER, data, tmp_path / "cache"], tmp_path / f"{i}.log") for i in range(4)]
    assert all(p.wait(timeout=240) == 0 for p in procs), [(tmp_path / f"{i}.log").read_text()[-1500:] for i in range(4)]
    logs = [(tmp_path / f"{i}.log").read_text() for i in range(4)]
    assert sum(log.count("tokenizing /") for log in logs) == 1, logs  # exactly one builder
    assert len({log.splitlines()[-1] for log in logs}) == 1  # everyone mapped the same rows
    assert not list((tmp_path / "cache").glob("*.lock"))


def test_waiters_stop_with_the_builders_error(tmp_path):
    """This test is the builder (it takes the lock first); three step01 trainers wait for it, then
    it fails: each trainer stops with the builder's line, without a traceback and without rebuilding."""
    data = corpus(tmp_path / "c.jsonl", docs(100))
    path, _, _ = T.locate(data, TOK, cache_dir=tmp_path / "cache")
    logs = [tmp_path / f"{i}.log" for i in range(3)]
    procs = []

    def failing_build():
        args = [str(REPO / "step01_single_gpu" / "train.py"), *TINY, "--dataset", data, "--max-steps", "1",
                "--data-cache", tmp_path / "cache"]
        procs.extend(start([sys.executable, *map(str, args)], log) for log in logs)
        while not all("waiting for process" in log.read_text() for log in logs):
            assert all(p.poll() is None for p in procs), [log.read_text()[-1500:] for log in logs]
            time.sleep(0.2)
        raise RuntimeError("the corpus server went away")

    with pytest.raises(ValueError, match="the corpus server went away"):
        T.build_once(path, failing_build)
    assert all(p.wait(timeout=60) != 0 for p in procs)
    for log in logs:
        out = log.read_text()
        assert "error: the corpus server went away" in out.splitlines() and "Traceback" not in out, out[-1500:]
        assert "tokenizing" not in out
    assert path.with_suffix(".error").read_text() == "the corpus server went away"
    assert not path.with_suffix(".lock").exists() and not path.with_suffix(".json").exists()


def test_a_corpus_that_fails_mid_way_leaves_its_error_and_no_lock(tmp_path):
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs(500)) + "{broken\n")  # fails at line 501
    with pytest.raises(ValueError) as e:
        D.load_sequences(str(data), TOK, 16, G=4, cache_dir=tmp_path / "cache")
    msg = one_line_error(e, "JSON parse error")
    path, _, _ = T.locate(str(data), TOK, cache_dir=tmp_path / "cache")
    assert path.with_suffix(".error").read_text() == msg
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [path.with_suffix(".error").name]


def test_a_dead_builders_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    data = corpus(tmp_path / "c.jsonl", docs(100))
    path, _, _ = T.locate(data, TOK, cache_dir=tmp_path)
    path.with_suffix(".lock").write_text(f"{socket.gethostname()} {dead.pid}")
    assert len(D.load_sequences(data, TOK, 16, G=4, cache_dir=tmp_path)) > 4
    assert not path.with_suffix(".lock").exists()


def test_a_lock_from_another_host_that_stops_moving_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "STALE_S", 0.5)
    data = corpus(tmp_path / "c.jsonl", docs(100))
    path, _, _ = T.locate(data, TOK, cache_dir=tmp_path)
    path.with_suffix(".lock").write_text("some-other-node 4242")
    with pytest.raises(OSError) as e:
        D.load_sequences(data, TOK, 16, G=4, cache_dir=tmp_path)
    one_line_error(e, str(path.with_suffix(".lock")), "some-other-node 4242", "delete")


def test_a_torchrun_job_on_a_cold_cache_tokenizes_once(tmp_path):
    data = corpus(tmp_path / "c.jsonl", docs(2000))
    proc = torchrun(REPO / "step02_data_parallel" / "train.py", 2,
                    [*TINY, "--dp", "2", "--max-steps", "2", "--dataset", data, "--data-cache", tmp_path / "cache"])
    out = proc.stdout + proc.stderr
    assert out.count("tokenizing /") == 1 and "step    1 |" in out, out[-3000:]
