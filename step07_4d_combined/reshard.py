"""Resharding: which region of a global tensor a rank holds, and filling it from pieces cut for another layout.

A checkpoint stores PIECES: each is a region of one global (unsharded) tensor, written by the
rank that held it. Resuming under another layout (dp, pp, cp, tp) means: for each tensor this
rank now holds, find the saved pieces that overlap its region and copy the overlaps in. Nothing
is gathered and no rank holds more than its own slices plus one overlap (the read buffer).

A region, as stored in meta.json (checkpoint.py), is plain integers:
    {"box": [[start, stop], ...]}       one range per dim of the global tensor. A tp shard
                                        (dim, index, count) is the box with dim cut to the
                                        index-th of count chunks; a whole tensor its full box;
                                        a scalar (Adam's step) the empty box [].
    {"box": ..., "flat": [a, b]}        elements a..b-1 of that box flattened row-major,
                                        stored as a 1-D tensor: how ZeRO shards optimizer state.
A flat region is split into at most 2 x ndim - 1 boxes, each contiguous in the 1-D storage;
then every overlap is a box intersection, read with safetensors' get_slice (only those rows
and columns leave the disk). torch.distributed.checkpoint's planner does the same with
"chunks" (offsets, sizes) of DTensors.
"""
import math

from model import full_shape


def region_of(p):
    """The box of its global tensor that parameter p holds: its .shard = (dim, index, count)."""
    shape = full_shape(p)
    box = [[0, n] for n in shape]
    if hasattr(p, "shard"):
        dim, index, count = p.shard
        n = shape[dim] // count
        box[dim] = [index * n, (index + 1) * n]
    return {"box": box}


def _flat_boxes(box, a, b, start):
    """Elements a..b-1 of `box` flattened row-major, as boxes: [(box, offset in the 1-D storage)]."""
    if a >= b:
        return []
    if not box:
        return [([], start)]
    (lo, _), rest = box[0], box[1:]
    inner = math.prod(e - s for s, e in rest)  # elements per row (dim 0)
    if a % inner:  # a partial first row, then the rest from the next row on
        row, end = a // inner, min(b, (a // inner + 1) * inner)
        head = [([[lo + row, lo + row + 1], *bx], st)
                for bx, st in _flat_boxes(rest, a - row * inner, end - row * inner, start)]
        return head + _flat_boxes(box, end, b, start + end - a)
    full = b // inner * inner
    out = [([[lo + a // inner, lo + full // inner], *rest], start)] if full > a else []
    if full < b:  # a partial last row
        row = full // inner
        out += [([[lo + row, lo + row + 1], *bx], st) for bx, st in _flat_boxes(rest, 0, b - full, start + full - a)]
    return out


def boxes(region):
    """A region as [(box, offset)]: offset None when the piece is stored in its box's shape."""
    if "flat" not in region:
        return [(region["box"], None)]
    a, b = region["flat"]
    return _flat_boxes(region["box"], a, b, 0)


def _slices(inter, box):
    return tuple(slice(i0 - s, i1 - s) for (i0, i1), (s, _) in zip(inter, box))


def _box_view(t, box, offset, inter):
    """The part `inter` of tensor t, where t (or t's 1-D storage from `offset`) holds `box`."""
    if offset is not None:
        shape = [e - s for s, e in box]
        t = t.view(-1)[offset:offset + math.prod(shape)].view(shape)
    return t[_slices(inter, box)]


def _read(sl, box, offset, inter):
    """Read the part `inter` of a saved piece (a safetensors slice) that holds `box`, and no more."""
    if offset is None:
        return sl[_slices(inter, box)]
    inner = math.prod(e - s for s, e in box[1:])  # stored 1-D: read the rows of dim 0 that `inter` touches
    r0, r1 = (inter[0][0] - box[0][0], inter[0][1] - box[0][0]) if box else (0, 1)
    rows = [[box[0][0] + r0, box[0][0] + r1], *box[1:]] if box else []
    return _box_view(sl[offset + r0 * inner:offset + r1 * inner], rows, 0, inter)


def read_region(dst, region, entry, open_file):
    """Fill dst, this rank's `region` of a global tensor, from the saved pieces that overlap it.
    entry: the tensor's meta.json index entry; open_file(name) -> safe_open handle. -> bytes read"""
    covered, nbytes = 0, 0
    for dbox, doff in boxes(region):
        for fname, key, src in entry["pieces"]:
            for sbox, soff in boxes(src):
                inter = [[max(d0, s0), min(d1, s1)] for (d0, d1), (s0, s1) in zip(dbox, sbox)]
                if any(i0 >= i1 for i0, i1 in inter):
                    continue
                data = _read(open_file(fname).get_slice(key), sbox, soff, inter)  # the one read buffer
                _box_view(dst, dbox, doff, inter).copy_(data)
                covered, nbytes = covered + data.numel(), nbytes + data.numel() * data.element_size()
    if covered != dst.numel():
        raise ValueError(f"its pieces cover {covered} of the {dst.numel()} elements this rank needs")
    return nbytes
