"""The data contract: documents + EOS packed into rows of seq_len+1; global batch k = rows [kG, (k+1)G)
of a per-epoch permutation seeded by --seed. The reference below is that contract written out with
plain json and a tokenizer call, so the token file must reproduce today's rows bit for bit."""
import json

import numpy as np
import torch

from test_step01_model import load_step_module

D = load_step_module("step01_single_gpu", "data")
T = D.token_file


def documented_packing(corpus, tok, seq_len):
    """The packing as the contract states it: each document's ids + EOS, in corpus order, cut into rows."""
    texts = [json.loads(line)["text"] for line in open(corpus)]
    stream = [i for ids in tok(texts)["input_ids"] for i in (*ids, tok.eos_token_id)]
    N = len(stream) // (seq_len + 1)
    return torch.tensor(stream[:N * (seq_len + 1)]).view(N, seq_len + 1)  # (N, seq_len + 1)


def test_bundled_corpus_packs_bit_for_bit_as_documented():
    tok = D.load_tokenizer(D.DEFAULT_TOKENIZER)
    assert len(tok) == 1024 and tok.eos_token == "<|endoftext|>"
    for seq_len in (32, 64):  # one token file serves every --seq-len
        seqs = D.load_sequences(D.DEFAULT_DATASET, tok, seq_len, G=8)
        ref = documented_packing(D.DEFAULT_DATASET, tok, seq_len)
        everything = seqs[torch.arange(len(seqs))]  # (N, seq_len + 1)
        assert len(seqs) == len(ref) > 2000 and everything.dtype == torch.long
        assert torch.equal(everything, ref)
    assert len(seqs) == 2447  # step01/README.md: "2447 sequences of 64 tokens"


def test_global_batch_is_a_slice_of_the_epochs_permutation():
    N, G, seed = 4820, 12, 5
    per_epoch = N // G
    for epoch in (0, 1):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for k in (0, 1, per_epoch - 1):
            got = D.global_batch(N, epoch * per_epoch + k, G, seed)
            assert got.shape == (G,) and torch.equal(got, order[k * G:(k + 1) * G])
    # the next epoch reshuffles; the same step is the same batch whenever it is asked for
    assert not torch.equal(D.global_batch(N, per_epoch, G, seed), D.global_batch(N, 0, G, seed))
    assert torch.equal(D.global_batch(N, 3, G, seed), D.global_batch(N, 3, G, seed))
    assert torch.equal(D.global_batch(N, 3, G, seed + 1), D.global_batch(N, 3, G, seed + 1))


def test_rows_are_read_by_index_and_dp_shares_partition_the_batch():
    tok = D.load_tokenizer(D.DEFAULT_TOKENIZER)
    seqs = D.load_sequences(D.DEFAULT_DATASET, tok, 32, G=8)
    ref = documented_packing(D.DEFAULT_DATASET, tok, 32)
    batch = D.global_batch(len(seqs), 7, 8, 42)  # (G,)
    shares = [seqs[share] for share in batch.chunk(4)]  # what 4 dp ranks read: (2, 33) each
    assert torch.equal(torch.cat(shares), ref[batch])
    assert torch.equal(seqs[5], ref[5])


def test_local_text_file(tmp_path):
    tok = D.load_tokenizer(D.DEFAULT_TOKENIZER)
    f = tmp_path / "t.txt"
    f.write_text("def f(x):\n    return x\n" * 200)
    seqs = D.load_sequences(str(f), tok, seq_len=16, G=4)
    assert len(seqs) > 10 and seqs[torch.arange(4)].shape == (4, 17)


def test_token_dtype_is_uint16_while_the_vocabulary_fits():
    assert T.token_dtype(1024) == np.uint16 and T.token_dtype(49152) == np.uint16
    assert T.token_dtype(2**16) == np.uint16  # ids 0..65535
    assert T.token_dtype(2**16 + 1) == np.uint32 and T.token_dtype(151_936) == np.uint32
