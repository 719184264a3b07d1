"""You can skip this on first reading: how the token file that data.py maps is built once, shared
safely by every process that needs it, and checked before anyone reads it. data.py states what the
file holds; nothing here changes which tokens a row gets.

File format (nanoGPT's train.bin): CACHE/NAME-KEY.bin is the stream, token after token, uint16
when the vocabulary fits in 16 bits, else uint32. CACHE/NAME-KEY.json is its header: tokenizer,
vocab_size, eos_id, dtype, n_tokens, n_documents, text_column, source, build_s, a checksum of
sampled blocks, and `key`, the sha256 of what the file is built from: the corpus's path, sizes
and mtimes (or hub name and revision), the tokenizer's content, --max-tokens and --text-column
(when given). CACHE is --data-cache (default: a folder in the `datasets` cache). The file depends
neither on seq_len nor on G nor on --max-steps: one file serves every run on that corpus and tokenizer.

Build once, the others wait. The process that creates NAME-KEY.lock first (O_CREAT|O_EXCL is
atomic, also across nodes on a shared filesystem and across concurrent launches) tokenizes, in
a forked child; it writes under temporary names and renames (os.replace) the .bin, then the
.json, so a header means a complete file. The others poll for the header. A builder that fails
writes its one-line error to NAME-KEY.error before it drops the lock, and the waiters stop with
that line. A lock whose process is gone (same host) is taken over; one that its builder (on
another host) has not refreshed for STALE_S seconds stops the waiters with a line naming it.

Memory: the builder's child streams the corpus through `datasets` in batches of 100 documents
(~200 bytes of tokenizer output per token of a batch), via Arrow files in a temporary folder
next to the token file (about 3x its size on disk, deleted when done).
"""
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from contextlib import suppress
from itertools import chain
from pathlib import Path

import numpy as np

BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}
HUB_MAX_TOKENS = 100_000_000  # a hub dataset is streamed up to --max-tokens, by default this many
FORMAT = 1  # bump when the file layout changes: every cached file is then rebuilt
POOL_BYTES = 16 * 2**20  # a smaller corpus is tokenized in one process: starting a pool would cost more
STALE_S = 300  # a lock its builder has not refreshed for this long belongs to a dead builder


def ensure(dataset, tokenizer, max_tokens=None, cache_dir=None, text_column=None):
    """The token file of this corpus and tokenizer, built first if no process has: -> (path, header)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path} has no EOS token to separate documents; "
                         f"pass a --tokenizer that has one")
    path, source, key = locate(dataset, tokenizer, max_tokens, cache_dir, text_column)
    build_once(path, lambda: in_child(lambda: tokenize(dataset, tokenizer, source, path, key)))
    return path, check_header(path, key, tokenizer)


# --- the key: what a token file is built from ---
def locate(dataset, tokenizer, max_tokens=None, cache_dir=None, text_column=None):
    """Where the token file of (dataset, tokenizer, max_tokens, text_column) lives: -> (path, source, key)."""
    source = describe_source(dataset, max_tokens)
    if text_column is not None:  # only when given: a default run keeps the key it always had
        source["text_column"] = text_column
    key = hashlib.sha256(json.dumps({"format": FORMAT, "source": source, "tokenizer": tokenizer_hash(tokenizer)},
                                    sort_keys=True).encode()).hexdigest()
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    if cache.exists() and not cache.is_dir():
        raise OSError(f"--data-cache {cache} is a file, not a folder; pass a folder for the token files")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on its path, no permission, ...
        raise OSError(f"--data-cache {cache} cannot be created ({e.strerror}); "
                      f"pass a folder you can write to") from None
    name = re.sub(r"[^\w.@-]+", "_", f"{Path(dataset).name}-{Path(tokenizer.name_or_path).name}")
    return cache / f"{name}-{key[:16]}.bin", source, key


def default_cache_dir():
    """The `datasets` cache (HF_DATASETS_CACHE, else HF_HOME/datasets), in a folder of its own."""
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.environ.get("HF_DATASETS_CACHE") or os.path.join(hf_home, "datasets")).expanduser() / "course_tokens"


def describe_source(dataset, max_tokens):
    """What a token file is built from, found without reading the corpus: -> dict."""
    p = Path(dataset).expanduser()
    if p.is_file() and p.suffix not in BUILDERS:
        raise ValueError(f"--dataset {p}: unknown file type {p.suffix!r}; use one of {sorted(BUILDERS)}")
    if p.exists():  # a file, or a directory's files (not hidden ones, as `datasets` skips them)
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(p).parts))
        stats = [[f.name if f == p else f.relative_to(p).as_posix(), f.stat().st_size, f.stat().st_mtime_ns]
                 for f in files]
        if sum(size for _, size, _ in stats) == 0:
            raise ValueError(f"--dataset {p} is empty; pass a corpus with at least one document")
        return {"path": str(p.resolve()), "files": stats, "max_tokens": max_tokens or None}
    if dataset.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--dataset {dataset} does not exist; pass a local file/directory "
                                f"or a hub dataset name")
    name, _, revision = dataset.partition("@")  # NAME@REVISION pins a hub revision
    return {"hub": name, "revision": revision or "main", "max_tokens": max_tokens or HUB_MAX_TOKENS}


def tokenizer_hash(tokenizer):
    """sha256 of what decides the ids: a fast tokenizer's own serialization (its tokenizer.json)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    state += json.dumps([type(tokenizer).__name__, len(tokenizer), tokenizer.eos_token_id])
    return hashlib.sha256(state.encode()).hexdigest()


# --- building it: one process tokenizes, the others wait ---
def build_once(path, build):
    """Run build() in exactly one process of all that need `path`; the others wait for it."""
    header, lock, error = path.with_suffix(".json"), path.with_suffix(".lock"), path.with_suffix(".error")
    me, waited, seen = f"{socket.gethostname()} {os.getpid()}", False, (None, 0.0)  # seen: (lock mtime, when)
    while not header.exists():
        if waited and error.exists() and not lock.exists():  # the builder we waited for failed
            raise ValueError(error.read_text().strip())
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except PermissionError as e:  # a read-only cache serves built files, but cannot build one
            raise OSError(f"--data-cache {path.parent} is not writable ({e.strerror}) and holds no token file "
                          f"of this corpus yet; pass a folder you can write to") from None
        except FileExistsError:
            try:
                owner, mtime = lock.read_text(), lock.stat().st_mtime_ns
            except FileNotFoundError:  # it just finished or failed: look again
                continue
            host, _, pid = owner.partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not alive(int(pid)):
                if lock.read_text() == owner:  # its builder died: take the lock over
                    lock.unlink(missing_ok=True)
                continue
            if not waited and os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node, not per rank
                print(f"waiting for process {owner} to tokenize into {path.name}", flush=True)
            waited = True
            if mtime != seen[0]:
                seen = (mtime, time.monotonic())
            elif time.monotonic() - seen[1] > STALE_S:
                raise OSError(f"{lock}: its builder ({owner}) has shown no progress for {STALE_S}s; "
                              f"if that process is gone, delete {lock} and launch again")
            time.sleep(0.2)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        stop = threading.Event()

        def heartbeat():  # touch the lock every 10 s: waiters on other hosts see the builder is alive
            while not stop.wait(10):
                with suppress(OSError):
                    os.utime(lock)

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            if not header.exists():  # another builder may have finished since we looked
                error.unlink(missing_ok=True)
                build()
        except Exception as e:
            msg = one_line(e)
            write_atomic(error, msg)  # before the lock goes, so waiters find it
            raise ValueError(msg) from None
        finally:
            stop.set()
            beat.join()
            lock.unlink(missing_ok=True)


def alive(pid):
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user
        pass
    return True


def in_child(fn):
    """Run fn() in a forked process; its error is raised here, as one line. The trainer's own memory
    then never holds `datasets`, pyarrow or a batch of the tokenizer's output, and map()'s workers
    fork from a process without communication threads. macOS and Windows run it here (fork is unsafe)."""
    if sys.platform in ("darwin", "win32"):
        return fn()
    sys.stdout.flush(), sys.stderr.flush()  # else the child would print our buffered lines again
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: build, report, leave without running the trainer's exit handlers
        os.close(r)
        try:
            fn()
            code = 0
        except BaseException as e:
            os.write(w, one_line(e).encode())
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()  # until the child exits
    if os.waitpid(pid, 0)[1] != 0:
        raise ValueError(msg or f"the tokenizing process {pid} died")


def tokenize(dataset, tokenizer, source, path, key):
    """Build path (.bin) and its header (.json) from the corpus. Runs in one process only."""
    import datasets

    t0 = time.perf_counter()
    print(f"tokenizing {dataset} into {path} (once; later runs map it)", flush=True)
    for old in path.parent.glob(f".{path.stem}.build*"):  # what a killed builder left behind
        shutil.rmtree(old, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.stem}.build", dir=path.parent))  # datasets' Arrow files
    try:
        bound = source["max_tokens"]
        if "hub" in source:  # read only what we keep: stream it
            ds = datasets.load_dataset(source["hub"], split="train", streaming=True, revision=source["revision"])
        else:  # streamed if bounded, else converted to Arrow so that map can split it over processes
            p = Path(source["path"])
            builder, files = (BUILDERS[p.suffix], str(p)) if p.is_file() else (str(p), None)
            ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=str(work),
                                       streaming=bound is not None)
        first = next(iter(ds), None)
        column, names = text_column(first, dataset, source.get("text_column")), ds.column_names or list(first)
        print(f"text column {column!r} (columns: {', '.join(names)})", flush=True)
        dtype, eos = token_dtype(len(tokenizer)), tokenizer.eos_token_id

        def encode(batch):  # documents -> one flat array of their ids, each document followed by EOS
            ids = tokenizer([t or "" for t in batch[column]], return_attention_mask=False)["input_ids"]
            return {"ids": [np.fromiter(chain.from_iterable((*x, eos) for x in ids), dtype)], "docs": [len(ids)]}

        kw = dict(batched=True, batch_size=100, remove_columns=names)
        if isinstance(ds, datasets.Dataset):  # split over processes, one Arrow row per batch of documents
            num_proc = min(8, os.cpu_count() or 1) if ds.data.nbytes > POOL_BYTES else 1
            table = ds.map(encode, **kw, num_proc=num_proc, writer_batch_size=10, desc="tokenizing",
                           cache_file_name=str(work / "ids.arrow"), new_fingerprint=key[:32]).data
            rows = ({"ids": b["ids"].flatten().to_numpy(), "docs": sum(b["docs"].to_pylist())}
                    for b in table.to_batches())  # views of the memory-mapped Arrow file, in corpus order
        else:
            from tqdm.auto import tqdm

            rows = tqdm(ds.map(encode, **kw), desc="tokenizing", unit=" batches")
        n_tokens = n_docs = 0
        tmp = work / path.name
        with open(tmp, "wb") as f:
            for row in rows:
                ids = np.asarray(row["ids"][: bound - n_tokens] if bound else row["ids"], dtype)
                ids.tofile(f)
                n_tokens, n_docs = n_tokens + len(ids), n_docs + int(row["docs"])
                if bound and n_tokens >= bound:
                    break
        header = {"key": key, "format": FORMAT, "tokenizer": tokenizer.name_or_path, "vocab_size": len(tokenizer),
                  "eos_id": eos, "dtype": np.dtype(dtype).name, "n_tokens": n_tokens, "n_documents": n_docs,
                  "text_column": column, "source": source, "build_s": round(time.perf_counter() - t0, 2),
                  "checksum": spot_checksum(tmp)}
        os.replace(tmp, path)  # atomic: the .bin is complete before any header points at it
        write_atomic(path.with_suffix(".json"), json.dumps(header, indent=1))
        print(f"tokenized {n_docs:,} documents into {n_tokens:,} tokens ({header['dtype']}) in "
              f"{header['build_s']:.1f}s: {n_tokens / header['build_s']:,.0f} tokens/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def text_column(first, dataset, chosen=None):
    """The column that holds the documents: --text-column, else `text`, else the only one holding strings."""
    if first is None:
        raise ValueError(f"--dataset {dataset} has no documents; pass a corpus with at least one")
    if chosen is not None and chosen not in first:
        raise ValueError(f"--text-column {chosen}: --dataset {dataset} has no such column "
                         f"(columns: {', '.join(first)})")
    column = chosen or "text"
    if column in first and not isinstance(first[column], str):
        raise ValueError(f"--dataset {dataset}: column {column!r} holds {type(first[column]).__name__}, not text; "
                         + ("pass a column of strings as --text-column" if chosen else
                            "give the corpus a 'text' column of strings"))
    if column in first:
        return column
    strings = [k for k, v in first.items() if isinstance(v, str)]
    if len(strings) > 1:  # which one holds the documents is the user's call, not ours
        raise ValueError(f"--dataset {dataset} has no 'text' column but {len(strings)} columns of strings "
                         f"({', '.join(strings)}); choose one with --text-column")
    if not strings:
        raise ValueError(f"--dataset {dataset} has no text column (columns: {', '.join(first)}); "
                         f"give the corpus a 'text' column of strings")
    return strings[0]


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32  # ids 0..vocab_size-1 must fit


def one_line(e):
    """An exception as one line, with its cause (datasets wraps the parse error that matters)."""
    lines = [str(x).strip().splitlines()[0] for x in (e, e.__cause__) if x is not None and str(x).strip()]
    return ": ".join(lines) or type(e).__name__


def write_atomic(path, text):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see no file or the whole file


def spot_checksum(path):
    """sha256 of 64 evenly spaced 4 KiB blocks and the tail: catches an edited file without reading it all."""
    size, h = os.path.getsize(path), hashlib.sha256()
    with open(path, "rb") as f:
        for offset in [size * i // 64 for i in range(64)] + [max(0, size - 4096)]:
            f.seek(offset)
            h.update(f.read(4096))
    return h.hexdigest()


# --- checking it ---
def check_header(path, key, tokenizer):
    """The header of a built file, after checking the file against it and against this run."""
    fix = f"delete {path} and {path.with_suffix('.json').name} to rebuild it, or pass another --data-cache"
    try:
        h = json.loads(path.with_suffix(".json").read_text())
        size, itemsize = path.stat().st_size, np.dtype(h["dtype"]).itemsize
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable token file or header ({one_line(e)}); {fix}") from None
    if h.get("key") != key:
        problem = "was built from other data or with another tokenizer than this run's"
    elif (h["vocab_size"], h["eos_id"]) != (len(tokenizer), tokenizer.eos_token_id):
        problem = f"was built with another tokenizer ({h['vocab_size']} tokens, eos {h['eos_id']})"
    elif h["dtype"] != np.dtype(token_dtype(h["vocab_size"])).name:
        problem = f"holds {h['dtype']} but a {h['vocab_size']}-token vocabulary needs {token_dtype(h['vocab_size'])}"
    elif size != h["n_tokens"] * itemsize:
        problem = f"has {size:,} bytes but its header says {h['n_tokens']:,} tokens x {itemsize} (truncated?)"
    elif spot_checksum(path) != h["checksum"]:
        problem = "does not match its header's checksum (edited?)"
    else:
        return h
    raise ValueError(f"{path} {problem}; {fix}")
