"""The data contract: packed sequences of seq_len+1 and global batch k = sequences [kG, (k+1)G)."""
import torch

from launch import REPO
from test_step01_model import load_step_module

D = load_step_module("step01_single_gpu", "data")


def test_bundled_corpus_offline_and_documented_batches(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tok = D.load_tokenizer(D.DEFAULT_TOKENIZER)
    assert len(tok) == 1024 and tok.eos_token == "<|endoftext|>"
    seqs = D.load_sequences(D.DEFAULT_DATASET, tok, seq_len=32)
    assert seqs.shape[1] == 33 and seqs.shape[0] > 4000 and seqs.dtype == torch.long
    assert int(seqs.max()) < 1024
    # the packing is the token stream cut into rows: row 0 starts with the first document
    first = tok(D.load_texts(D.DEFAULT_DATASET).__next__())["input_ids"]
    assert seqs[0].tolist() == first[:33]
    G = 12
    per_epoch = seqs.shape[0] // G
    order = torch.randperm(seqs.shape[0], generator=torch.Generator().manual_seed(5 * 1000))
    for k in (0, 1, per_epoch - 1):
        assert torch.equal(D.global_batch(seqs, k, G, seed=5), seqs[order[k * G:(k + 1) * G]])
    # the next epoch reshuffles
    assert not torch.equal(D.global_batch(seqs, per_epoch, G, 5), D.global_batch(seqs, 0, G, 5))
    assert torch.equal(D.global_batch(seqs, 3, G, 5), D.global_batch(seqs, 3, G, 5))


def test_local_text_file(tmp_path):
    tok = D.load_tokenizer(D.DEFAULT_TOKENIZER)
    f = tmp_path / "t.txt"
    f.write_text("def f(x):\n    return x\n" * 200)
    seqs = D.load_sequences(str(f), tok, seq_len=16)
    assert seqs.shape[1] == 17 and seqs.shape[0] > 10
