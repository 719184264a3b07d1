"""Rebuild the bundled corpus and tokenizer (the outputs are committed; run this only to remake them).

Corpus: the help topics of the Python documentation that every CPython install carries as
`pydoc_data.topics` (Python Software Foundation License 2, which allows redistribution).
This file was built from CPython 3.11.7: topics differ slightly between Python versions,
which is why the prepared file is shipped rather than rebuilt at run time.
Tokenizer: byte-level BPE with 1,024 tokens trained on that corpus with `tokenizers`,
saved as a transformers fast tokenizer; <|endoftext|> separates documents.
"""
import json
from pathlib import Path

import pydoc_data.topics
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
EOS = "<|endoftext|>"

docs = [{"topic": k, "text": v.strip()} for k, v in sorted(pydoc_data.topics.topics.items())]
with open(HERE / "pydoc_topics.jsonl", "w") as f:
    for d in docs:
        f.write(json.dumps(d) + "\n")

tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=[EOS],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator((d["text"] for d in docs), trainer)
fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
fast.save_pretrained(HERE / "tokenizer")
n_tokens = sum(len(fast(d["text"])["input_ids"]) + 1 for d in docs)
print(f"{len(docs)} documents, {sum(len(d['text']) for d in docs):,} characters, "
      f"{n_tokens:,} tokens with a {len(fast)}-token vocabulary")
