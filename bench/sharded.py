"""ShardedOptimizer's step split into its phases, under ``mpiexec -n R``: packing the grads,
the reduce-scatter (with the division by R), the update of the owned slice, the all-gather;
Adam, float32, a 200-tensor model; medians over steps; state bytes per rank. With
``--torch``, the same model through torch.distributed (gloo, on the same ranks): the grads
all-reduced as one flat bucket (as DDP does) and averaged, then
``ZeroRedundancyOptimizer(Adam)``'s step, which itself broadcasts the updated params.

    mpiexec -n 2 python bench/sharded.py --n 1e7 [--steps 15] [--torch]

It also times the two collectives alone at several sizes, for the alpha-beta model in
bench/NOTES.md (``--collectives``), and, with ``--overlap``, how much of the reduce-scatter
hides behind other work: a stand-in for the caller's compute (float32 matmuls in pieces,
``opt.poll()`` between them) run alone, a blocking ``step(grads)`` alone, and
``reduce_grads(grads)`` + the compute + ``step()``; hidden = (alone + alone - together) /
the reduce-scatter's time. ``--bucket-mb`` and ``--no-timeout`` (plain ``Waitall``) set the
ShardedOptimizer's options.
"""
from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
from mpi4py import MPI

import hwoptim
from hwoptim.bench.workload import model_shapes
from hwoptim.distributed import ShardedOptimizer

COMM = MPI.COMM_WORLD


def _median_over(fn, steps):
    times = []
    for i in range(steps + 2):
        COMM.Barrier()
        t0 = MPI.Wtime()
        extra = fn()
        t = MPI.Wtime() - t0
        if i >= 2:
            times.append({**(extra or {}), "step": t})
    return {k: statistics.median(r[k] for r in times) for k in times[0]}


def _sharded(shapes, opts):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    rule = opts.pop("rule", "Adam")
    return ShardedOptimizer(getattr(hwoptim, rule), params, COMM, lr=1e-3, **opts), grads


def hwoptim_step(shapes, steps, opts):
    opt, grads = _sharded(shapes, dict(opts))

    def one():
        opt.step(grads)
        return opt.last_timings
    return _median_over(one, steps), opt.state_bytes()


def overlap(shapes, steps, opts, pieces=40):
    """Medians (s) of: the compute alone, a blocking step alone (with its reduce-scatter),
    and reduce_grads + the compute (poll between pieces) + step()."""
    opt, grads = _sharded(shapes, dict(opts))
    a = np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)
    reps = [1]

    def compute():
        for _ in range(pieces):
            for _ in range(reps[0]):
                a @ a
            opt.poll()
    alone = _median_over(lambda: opt.step(grads) or opt.last_timings, steps)
    t = _median_over(compute, 3)["step"]      # size the compute like the reduce-scatter
    reps[0] = max(1, round(alone["reduce-scatter"] / t))
    work = _median_over(compute, steps)["step"]

    def both():
        opt.reduce_grads(grads)
        compute()
        opt.step()
    together = _median_over(both, steps)["step"]
    return {"compute": work, "step": alone["step"], "reduce-scatter": alone["reduce-scatter"],
            "together": together}


def torch_step(shapes, steps):
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517",
                            rank=COMM.Get_rank(), world_size=COMM.Get_size())
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape)
    opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.Adam, lr=1e-3)
    flat = torch.empty(sum(p.numel() for p in params))
    R = COMM.Get_size()

    def one():
        t0 = MPI.Wtime()
        torch.cat([p.grad.reshape(-1) for p in params], out=flat)
        dist.all_reduce(flat)
        flat.div_(R)
        o = 0
        for p in params:
            p.grad.copy_(flat[o:o + p.numel()].view_as(p))
            o += p.numel()
        t1 = MPI.Wtime()
        opt.step()
        return {"all-reduce": t1 - t0, "ZeRO step": MPI.Wtime() - t1}
    med = _median_over(one, steps)
    state = sum(t.numel() * t.element_size() for st in opt.optim.state.values()
                for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    dist.destroy_process_group()
    return med, state


# Ranks sharing two cores slow each other where phases overlap (packing the next bucket
# while MPI copies the last, every rank's collective against the others' updates): the sum
# of the phases measured alone falls short of the step by this factor where R > 1. Fitted
# once, on 10^7 params at R = 2 (predicted/measured 0.69 there, bench/NOTES.md); the other
# configurations are predictions. On a cluster (a rank per core set, the network card moving
# the bytes) it would be about 1.
INTERFERENCE = 1.45


def model_check(shapes, steps, opts):
    """The alpha-beta model fitted and checked in one run. Measured alone, with every rank
    doing the same at once (so sharing the cores is in every figure): the two collectives at
    64 B and at this run's bucket size (alpha from the small one, beta from the difference),
    a copy's time per byte, and the wrapped optimizer's update of this rank's slice. The
    step is predicted from those as the bytes each phase moves, and set beside its
    measurement (medians, slowest rank)."""
    opt, grads = _sharded(shapes, dict(opts))
    R = COMM.Get_size()
    step = _median_over(lambda: opt.step(grads) or opt.last_timings, steps)
    n = sum(int(np.prod(s)) for s in shapes)
    seg, nb = opt._seg, len(opt._buckets)
    width = opt._buckets[0][1] - opt._buckets[0][0]
    last = opt._buckets[-1][1] - opt._buckets[-1][0]

    def coll(el):
        send, recv = np.ones(R * el, np.float32), np.empty(el, np.float32)
        full = np.empty(R * el, np.float32)
        rs = _median_over(lambda: COMM.Reduce_scatter_block(send, recv, op=MPI.SUM), 7)
        ag = _median_over(lambda: COMM.Allgather(recv, full), 7)
        return rs["step"], ag["step"]
    hops, share = max(R - 1, 1), (R - 1) / R
    fit = {"rs": (0.0, 1.0), "ag": (0.0, 1.0)}
    if R > 1:
        (rs0, ag0), (rs1, ag1) = coll(16), coll(width)
        big = R * width * 4                  # bytes of one bucket's whole vector
        fit = {k: (t0 / hops, share * big / max(t1 - t0, 1e-9))
               for k, t0, t1 in (("rs", rs0, rs1), ("ag", ag0, ag1))}

    def t_coll(k):                           # every bucket's collective
        alpha, beta = fit[k]
        return sum(hops * alpha + share * R * el * 4 / beta
                   for el in [width] * (nb - 1) + [last]) if R > 1 else 0.0
    a = np.ones(max(seg, 1 << 22), np.float32)
    b = np.empty_like(a)
    per_byte = _median_over(lambda: np.copyto(b, a), 5)["step"] / a.nbytes   # copy s/B
    update = _median_over(lambda: opt.inner.step(opt._pieces), steps)["step"]
    div = 4 * seg * per_byte if R > 1 else 0.0
    pred = {"pack + reduce-scatter": 4 * n * per_byte + t_coll("rs") + div,
            "update": update,
            "all-gather": (4 * seg * R * per_byte + t_coll("ag")) if R > 1 else 0.0}
    pred["step"] = sum(pred.values())
    pred["step, with interference"] = pred["step"] * (INTERFERENCE if R > 1 else 1.0)
    meas = {"pack + reduce-scatter": step["check and pack"] + step["reduce-scatter"],
            "update": step["update"], "all-gather": step["all-gather"], "step": step["step"],
            "step, with interference": step["step"]}
    return {"measured": meas, "predicted": pred, "fit": fit, "copy": 1 / per_byte}


def collectives(sizes, reps=9):
    R = COMM.Get_size()
    out = []
    for n in sizes:
        n = -(-n // R) * R
        send = np.ones(n, np.float32)
        recv = np.empty(n // R, np.float32)
        full = np.empty(n, np.float32)
        rs = _median_over(lambda: COMM.Reduce_scatter_block(send, recv, op=MPI.SUM), reps)
        ag = _median_over(lambda: COMM.Allgather(recv, full), reps)
        out.append((n * 4, rs["step"], ag["step"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="1e7")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--torch", action="store_true")
    ap.add_argument("--collectives", action="store_true")
    ap.add_argument("--overlap", action="store_true")
    ap.add_argument("--model", action="store_true", help="fit and check the alpha-beta model")
    ap.add_argument("--bucket-mb", type=float, default=None)
    ap.add_argument("--no-timeout", action="store_true")
    ap.add_argument("--rule", default="Adam", help="a hwoptim rule (LAMB: norms across ranks)")
    ap.add_argument("--max-grad-norm", type=float, default=None)
    args = ap.parse_args(argv)
    R, rank = COMM.Get_size(), COMM.Get_rank()
    opts = {"rule": args.rule}
    if args.max_grad_norm is not None:
        opts["max_grad_norm"] = args.max_grad_norm
    if args.bucket_mb is not None:
        opts["bucket_bytes"] = int(args.bucket_mb * 2**20)
    if args.no_timeout:
        opts["timeout"] = None
    if args.collectives:
        rows = collectives([int(x) for x in (1e4, 1e5, 1e6, 1e7, 4e7)])
        if rank == 0:
            print(f"R={R}: bytes, reduce-scatter s, all-gather s")
            for b, rs, ag in rows:
                print(f"{R} {b} {rs:.6g} {ag:.6g}")
        return 0
    shapes = model_shapes(int(float(args.n)))
    n = sum(int(np.prod(s)) for s in shapes)
    if args.model:
        rows = COMM.gather(model_check(shapes, args.steps, opts), root=0)
        if rank == 0:
            r0 = rows[0]
            meas = {k: max(r["measured"][k] for r in rows) for k in r0["measured"]}
            fit = ", ".join(f"{k}: alpha {a * 1e6:.1f} us, beta {b / 1e9:.2f} GB/s"
                            for k, (a, b) in r0["fit"].items())
            print(f"model R={R} n={n:.3g}: {fit}; copy {r0['copy'] / 1e9:.1f} GB/s per rank")
            print("| phase | measured ms | predicted ms | predicted / measured |")
            print("| --- | --- | --- | --- |")
            pred = {k: max(r["predicted"][k] for r in rows) for k in r0["predicted"]}
            for k, v in pred.items():
                ratio = f"{v / meas[k]:.2f}" if meas[k] > 1e-4 else "-"
                print(f"| {k} | {meas[k] * 1e3:.1f} | {v * 1e3:.1f} | {ratio} |")
        return 0
    if args.overlap:
        rows = COMM.gather(overlap(shapes, args.steps, opts), root=0)
        if rank == 0:
            m = {k: max(r[k] for r in rows) for k in rows[0]}
            hidden = (m["compute"] + m["step"] - m["together"]) / m["reduce-scatter"]
            print(f"overlap R={R} n={n:.3g} {opts}: compute {m['compute'] * 1e3:.1f} ms, step "
                  f"{m['step'] * 1e3:.1f} ms (reduce-scatter {m['reduce-scatter'] * 1e3:.1f}), "
                  f"together {m['together'] * 1e3:.1f} ms: {hidden:.0%} of the reduce-scatter "
                  f"hidden")
        return 0
    med, state = (torch_step(shapes, args.steps) if args.torch
                  else hwoptim_step(shapes, args.steps, opts))
    meds, states = COMM.gather(med, root=0), COMM.gather(state, root=0)
    if rank == 0:
        who = "torch ZeroRedundancyOptimizer (gloo) + flat all-reduce" if args.torch \
            else f"hwoptim ShardedOptimizer {opts}"
        keys = list(med)
        print(f"{who}: R={R}, {n:.3g} float32 params in {len(shapes)} tensors, "
              f"threads per rank {os.environ.get('NUMBA_NUM_THREADS', '?')}; medians of "
              f"{args.steps} steps, slowest rank per phase (ms):")
        print("| " + " | ".join(keys) + " | state MB per rank |")
        print("|" + " --- |" * (len(keys) + 1))
        print("| " + " | ".join(f"{max(m[k] for m in meds) * 1e3:.1f}" for k in keys)
              + f" | {max(states) / 1e6:.1f} (of {8 * n / 1e6:.1f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
