"""The collectives of the course on a few numbers, run under torchrun (gloo, CPU).

usage: python -m torch.distributed.run --nproc_per_node 4 collectives_demo.py OUT_DIR
Every rank writes OUT_DIR/rank{R}.json: its tensor before and after each collective, and the
state of a hand-written ring all-reduce (reduce-scatter then all-gather, with send/recv only)
after every ring step. Rank r contributes 2**r to the ring, so a value's binary digits name
the ranks already summed into it.
"""
import json
import os
import sys

import torch
import torch.distributed as dist


def ring_all_reduce(x, states):
    """Sum x over all ranks in 2(n-1) neighbour exchanges; append x after each one to `states`.

    x holds n chunks (here one number each). Reduce-scatter: in step s rank r sends chunk
    (r - s) mod n to r + 1 and adds the chunk it receives from r - 1; after n - 1 steps rank r
    owns the full sum of chunk (r + 1) mod n. All-gather: n - 1 more steps pass the finished
    chunks around the ring. Each rank sends 2(n-1)/n of x in total, whatever n is.
    """
    r, n = dist.get_rank(), dist.get_world_size()
    chunks = list(x.chunk(n))
    nxt, prv = (r + 1) % n, (r - 1) % n
    for phase in ("reduce-scatter", "all-gather"):
        for s in range(n - 1):
            send_c = (r - s) % n if phase == "reduce-scatter" else (r + 1 - s) % n
            recv_c = (r - s - 1) % n if phase == "reduce-scatter" else (r - s) % n
            buf = torch.empty_like(chunks[recv_c])
            ops = [dist.P2POp(dist.isend, chunks[send_c].contiguous(), nxt), dist.P2POp(dist.irecv, buf, prv)]
            for work in dist.batch_isend_irecv(ops):  # both directions at once: no deadlock
                work.wait()
            if phase == "reduce-scatter":
                chunks[recv_c] += buf  # a partial sum grows by one rank per step
            else:
                chunks[recv_c].copy_(buf)  # a finished sum is copied along
            states.append({"phase": phase, "step": s, "sent": send_c, "received": recv_c,
                           "x": torch.cat(chunks).tolist()})
    return torch.cat(chunks)


def main():
    dist.init_process_group("gloo")
    r, n = dist.get_rank(), dist.get_world_size()
    out = {"rank": r, "world": n, "ops": {}}

    def show(name, before, after):
        out["ops"][name] = {"before": before.tolist(), "after": after.tolist()}

    x = torch.full((n,), float(r + 1))  # rank r holds r + 1 everywhere
    y = x.clone()
    dist.all_reduce(y)  # every rank gets the sum
    show("all_reduce", x, y)

    x = torch.arange(n, dtype=torch.float32) + 10 * r  # element c of rank r = 10 r + c
    y = torch.empty(1)
    dist.reduce_scatter_tensor(y, x)  # rank r gets the sum of element r
    show("reduce_scatter", x, y)

    x = torch.tensor([10.0 * r])
    y = torch.empty(n)
    dist.all_gather_into_tensor(y, x)  # every rank gets everybody's element, in rank order
    show("all_gather", x, y)

    x = torch.arange(n, dtype=torch.float32) + 10 * r
    y = torch.empty(n)
    dist.all_to_all_single(y, x)  # element c of rank r goes to rank c: a transpose
    show("all_to_all", x, y)

    x = torch.full((n,), float(r))
    y = x.clone()
    dist.broadcast(y, src=0)
    show("broadcast (src 0)", x, y)

    x = torch.full((n,), float(r))
    y = torch.empty(n)
    ops = [dist.P2POp(dist.isend, x, (r + 1) % n), dist.P2POp(dist.irecv, y, (r - 1) % n)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    show("send/recv (to r+1)", x, y)

    states = []
    x = torch.full((n,), float(2 ** r))
    got = ring_all_reduce(x.clone(), states)
    ref = x.clone()
    dist.all_reduce(ref)
    assert torch.equal(got, ref), (got, ref)
    out["ring"] = {"before": x.tolist(), "states": states}
    with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
