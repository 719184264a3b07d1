"""Text -> a token file on disk (tokenized once) -> memory-mapped rows of seq_len + 1 -> global batches.

The contract every step keeps: the documents, each followed by EOS, form one token stream in
corpus order; the stream is cut into N = n_tokens // (seq_len + 1) rows (inputs are the first
seq_len tokens of a row, targets the last seq_len); the rows are shuffled once per epoch by a
generator seeded with --seed, and optimizer step k consumes the global batch of rows
[k*G, (k+1)*G) of that order, G = micro_batch_size x grad_acc_steps (x dp later). Later steps
only decide which rank reads which rows of a global batch.

The stream lives in a token file, nanoGPT's train.bin: the ids one after the other (uint16 while
the vocabulary fits), built once per corpus and tokenizer into --data-cache and mapped by every
later run. How it is built once among many processes and checked is token_file.py's business.

Memory: a rank copies out of the map only the rows of its micro-batches (k x (seq_len + 1)
int64), and keeps the epoch's permutation (8 bytes per row).
"""
from pathlib import Path

import numpy as np
import torch

import token_file  # builds the token file once and checks it; you can skip it on first reading

DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_DATASET = str(DATA / "pydoc_topics.jsonl")
DEFAULT_TOKENIZER = str(DATA / "tokenizer")


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"tokenizer directory {name_or_path} does not exist; "
                                f"pass --tokenizer with a local directory or a hub name")
    return AutoTokenizer.from_pretrained(name_or_path)


def load_sequences(dataset, tokenizer, seq_len, G, max_tokens=None, cache_dir=None, text_column=None):
    """The corpus as rows of seq_len + 1 tokens, mapped from its token file (built first if needed).

    Reads the whole of a local corpus unless `max_tokens` is given, and the first max_tokens (by
    default 100M) tokens of a hub dataset. Checks that one global batch of G rows fits.
    """
    path, header = token_file.ensure(dataset, tokenizer, max_tokens, cache_dir, text_column)
    sequences = PackedSequences(path, header["dtype"], header["n_tokens"], seq_len)
    if len(sequences) < G:
        raise ValueError(f"--dataset {dataset} packs into {len(sequences)} sequences of {seq_len + 1} tokens but "
                         f"one global batch needs {G}; use a larger corpus or --max-tokens, or lower "
                         f"--micro-batch-size, --grad-acc-steps or --seq-len")
    return sequences


class PackedSequences:
    """The token file as N rows of seq_len + 1 tokens; indexing copies only the rows it names."""

    def __init__(self, path, dtype, n_tokens, seq_len):
        self.path, self.dtype, self.width = path, np.dtype(dtype), seq_len + 1
        self.n = n_tokens // self.width  # the tail shorter than a row is never read

    def __len__(self):
        return self.n

    def __getitem__(self, rows):
        # A fresh map per read: the pages a long-lived map has touched count in this process's
        # RSS until it is unmapped, so an epoch would pull in the whole file (nanoGPT does this too).
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n * self.width,))
        picked = tokens.reshape(self.n, self.width)[np.asarray(rows)]  # (k, T + 1): a copy of these rows only
        return torch.from_numpy(picked.astype(np.int64))  # (k, T + 1)


# --- global batches ---
_ORDER = {}  # (N, seed, epoch) -> that epoch's permutation, drawn once instead of once per step


def global_batch(n_sequences, step, G, seed):
    """The row indices of optimizer step `step`'s global batch -> LongTensor (G,), the same on every rank."""
    if n_sequences < G:
        raise ValueError(f"the dataset packs into only {n_sequences} sequences but one global batch needs {G}; "
                         f"lower --micro-batch-size/--grad-acc-steps or --seq-len")
    per_epoch = n_sequences // G  # the tail that does not fill a global batch is skipped each epoch
    epoch, k = divmod(step, per_epoch)
    if (n_sequences, seed, epoch) not in _ORDER:
        _ORDER.clear()  # keep only the current epoch's
        _ORDER[n_sequences, seed, epoch] = torch.randperm(
            n_sequences, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return _ORDER[n_sequences, seed, epoch][k * G:(k + 1) * G]
