"""step07's reshard.py without processes: any region of a global tensor is rebuilt exactly from
pieces cut another way (tp chunks along either dim, whole tensors, flat ZeRO-style ranges of a
tp chunk, scalars), reading the pieces from real safetensors files; a gap is an error."""
import importlib.util
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from launch import REPO

DIR = REPO / "step07_4d_combined"
_had_model = "model" in sys.modules
sys.path.insert(0, str(DIR))  # reshard.py imports model.py, as train.py does
spec = importlib.util.spec_from_file_location("step07_reshard", DIR / "reshard.py")
reshard = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reshard)
sys.path.remove(str(DIR))
if not _had_model:  # leave no `model` module behind for tests that import another step's
    sys.modules.pop("model", None)


def chunk_box(shape, dim, index, count):
    box = [[0, n] for n in shape]
    n = shape[dim] // count
    box[dim] = [index * n, (index + 1) * n]
    return box


def flat_ranges(numel, parts):
    """Uneven contiguous ranges covering 0..numel, as ZeRO would cut a flattened shard."""
    cuts = [0, *sorted(torch.randperm(numel - 1)[:parts - 1].add(1).tolist()), numel]
    return list(zip(cuts, cuts[1:]))


def regions(shape):
    """Every way this course cuts a tensor, plus ZeRO's: name -> list of regions that tile it."""
    whole = [[0, n] for n in shape]
    out = {"whole": [{"box": whole}],
           "tp2 rows": [{"box": chunk_box(shape, 0, i, 2)} for i in range(2)],
           "tp3 cols": [{"box": chunk_box(shape, 1, i, 3)} for i in range(3)],
           "zero3 of all": [{"box": whole, "flat": list(r)} for r in flat_ranges(shape[0] * shape[1], 3)]}
    out["zero3 of tp2 cols"] = [{"box": chunk_box(shape, 1, i, 2), "flat": list(r)}
                                for i in range(2) for r in flat_ranges(shape[0] * shape[1] // 2, 3)]
    return out


def write_pieces(tmp_path, full, cut):
    """One file per piece, as ranks write them; -> the meta.json index entry."""
    pieces = []
    for i, region in enumerate(cut):
        t = full[tuple(slice(s, e) for s, e in region["box"])]
        if "flat" in region:
            t = t.reshape(-1)[slice(*region["flat"])]
        save_file({"model/w": t.contiguous()}, tmp_path / f"rank{i:05d}.safetensors")
        pieces.append([f"rank{i:05d}.safetensors", "model/w", region])
    return {"shape": list(full.shape), "dtype": "float32", "pieces": pieces}


def opener(tmp_path):
    handles = {}
    return lambda f: handles.setdefault(f, safe_open(tmp_path / f, "pt"))


@pytest.mark.parametrize("saved", list(regions((12, 6))))
@pytest.mark.parametrize("wanted", list(regions((12, 6))))
def test_any_region_from_any_pieces(tmp_path, saved, wanted):
    torch.manual_seed(0)
    full = torch.randn(12, 6)
    entry = write_pieces(tmp_path, full, regions((12, 6))[saved])
    for region in regions((12, 6))[wanted]:
        expect = full[tuple(slice(s, e) for s, e in region["box"])]
        if "flat" in region:
            expect = expect.reshape(-1)[slice(*region["flat"])]
        dst = torch.full_like(expect, float("nan"))
        nbytes = reshard.read_region(dst, region, entry, opener(tmp_path))
        assert torch.equal(dst, expect), (saved, wanted, region)
        assert nbytes == 4 * expect.numel()  # every element read once: only the overlaps leave the disk


def test_scalar_and_missing_piece(tmp_path):
    save_file({"adam/w/step": torch.tensor(7.0)}, tmp_path / "rank00000.safetensors")
    entry = {"shape": [], "dtype": "float32", "pieces": [["rank00000.safetensors", "adam/w/step", {"box": []}]]}
    dst = torch.zeros(())
    reshard.read_region(dst, {"box": []}, entry, opener(tmp_path))
    assert dst.item() == 7.0
    full = torch.randn(12, 6)
    entry = write_pieces(tmp_path, full, regions((12, 6))["tp2 rows"][:1])  # the second half is not there
    with pytest.raises(ValueError, match="cover 36 of the 72 elements"):
        reshard.read_region(torch.empty(12, 6), {"box": [[0, 12], [0, 6]]}, entry, opener(tmp_path))
