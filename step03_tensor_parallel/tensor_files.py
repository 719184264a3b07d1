"""You can skip this on first reading: tensors written so that a reader sees the old file or the
new one, never half of one (atomic_save_file), a file's checksum (file_crc32), and each rank's
parameters at the end of a run, for the tests (--dump-params).
"""
import os
import zlib
from pathlib import Path


def atomic_save_file(tensors, path, metadata=None):
    """safetensors' save_file under a temporary name, synced, given the usual mode, then renamed.

    Readers see the old file or the new one, never half of one; safetensors creates files 0600,
    this gives them 0666 minus the umask like any other file."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())  # on disk before it gets its final name
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)  # atomic on POSIX


def file_crc32(path, chunk=16 * 2**20):
    """zlib.crc32 of a whole file, read in 16 MiB chunks (memory stays flat)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def dump_params(model, directory, rank=0):
    """Write this rank's parameters (and how each is sliced) to DIR/rank{N}.safetensors (tests)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    tensors, meta = {}, {}
    for name, p in model.named_parameters():
        tensors[name] = p.detach().float().cpu().contiguous()
        meta[name] = ",".join(map(str, getattr(p, "shard", ())))  # step03+: (dim, index, count) of a slice
    atomic_save_file(tensors, os.path.join(directory, f"rank{rank}.safetensors"), meta)
