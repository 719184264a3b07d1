"""Text -> one token stream -> fixed-length training sequences -> global batches.

The contract every step keeps: the stream is packed into N sequences of seq_len + 1 tokens
(inputs are the first seq_len, targets the last seq_len), their order is shuffled once per
epoch by a generator seeded with --seed, and optimizer step k consumes the global batch of
sequences [k*G, (k+1)*G) of that order, G = micro_batch_size x grad_acc_steps (x dp later).
Later steps only decide which rank reads which rows of a global batch.
"""
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_DATASET = str(DATA / "pydoc_topics.jsonl")
DEFAULT_TOKENIZER = str(DATA / "tokenizer")
BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"tokenizer directory {name_or_path} does not exist; "
                                f"pass --tokenizer with a local directory or a hub name")
    return AutoTokenizer.from_pretrained(name_or_path)


def load_texts(name_or_path):
    """Documents as an iterable of strings: a local file or directory, or a hub dataset name."""
    import datasets

    datasets.disable_progress_bars()
    p = Path(name_or_path).expanduser()
    if p.is_file():
        if p.suffix not in BUILDERS:
            raise ValueError(f"--dataset {p}: unknown file type {p.suffix!r}; use one of {sorted(BUILDERS)}")
        ds = datasets.load_dataset(BUILDERS[p.suffix], data_files=str(p), split="train")
    elif p.is_dir():
        ds = datasets.load_dataset(str(p), split="train")
    elif name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--dataset {name_or_path} does not exist; pass a local file/directory "
                                f"or a hub dataset name")
    else:  # a hub name: stream it, we only read as many documents as we need
        ds = datasets.load_dataset(name_or_path, split="train", streaming=True)
    column = "text" if "text" in (ds.column_names or []) else None
    for row in ds:
        if column is None:
            column = next(k for k, v in row.items() if isinstance(v, str))
        yield row[column]


def load_sequences(dataset, tokenizer, seq_len, max_tokens=None):
    """Tokenise documents (EOS after each) and pack them: -> LongTensor (N, seq_len + 1).

    Stops after `max_tokens` tokens if given (for large hub datasets), else reads everything.
    """
    eos = tokenizer.eos_token_id
    chunks, n = [], 0
    batch = []

    def flush():
        nonlocal n
        for ids in tokenizer(batch)["input_ids"]:
            chunks.append(torch.tensor(ids + ([eos] if eos is not None else []), dtype=torch.long))
            n += len(chunks[-1])
        batch.clear()

    for text in load_texts(dataset):
        batch.append(text)
        if len(batch) == 256:
            flush()
            if max_tokens and n >= max_tokens:
                break
    if batch:
        flush()
    stream = torch.cat(chunks)  # (n_tokens,)
    N = len(stream) // (seq_len + 1)
    return stream[: N * (seq_len + 1)].view(N, seq_len + 1)  # (N, seq_len + 1)


def global_batch(sequences, step, G, seed):
    """The G sequences of optimizer step `step` -> (G, seq_len + 1), the same on every rank."""
    N = sequences.shape[0]
    if N < G:
        raise ValueError(f"the dataset packs into only {N} sequences but one global batch needs {G}; "
                         f"lower --micro-batch-size/--grad-acc-steps or --seq-len")
    per_epoch = N // G  # the tail that does not fill a global batch is skipped each epoch
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return sequences[order[k * G:(k + 1) * G]]
