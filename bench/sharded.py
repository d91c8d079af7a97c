"""ShardedOptimizer's step split into its phases, under ``mpiexec -n R``: packing the grads,
the reduce-scatter (with the division by R), the update of the owned slice, the all-gather;
Adam, float32, a 200-tensor model; medians over steps; state bytes per rank.

    mpiexec -n 2 python bench/sharded.py --n 1e7 [--steps 15]
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
from mpi4py import MPI

import hwoptim
from hwoptim.bench.workload import model_shapes
from hwoptim.distributed import ShardedOptimizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="1e7")
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in model_shapes(int(float(args.n)))]
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    opt = ShardedOptimizer(hwoptim.Adam, params, comm, lr=1e-3)
    rows = []
    for i in range(args.steps + 2):
        comm.Barrier()
        t0 = MPI.Wtime()
        opt.step(grads)
        t = MPI.Wtime() - t0
        if i >= 2:
            rows.append({**opt.last_timings, "step": t})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    all_med = comm.gather(med, root=0)
    state = comm.gather(opt.state_bytes(), root=0)
    if comm.Get_rank() == 0:
        n = sum(p.size for p in params)
        keys = list(med)
        print(f"R={comm.Get_size()}, {n:.3g} float32 params in {len(params)} tensors, Adam, "
              f"threads per rank {hwoptim.get_num_threads()}; medians of {args.steps} steps, "
              f"slowest rank per phase (ms):")
        print("| " + " | ".join(keys) + " | state MB per rank |")
        print("|" + " --- |" * (len(keys) + 1))
        print("| " + " | ".join(f"{max(m[k] for m in all_med) * 1e3:.1f}" for k in keys)
              + f" | {max(state) / 1e6:.1f} (of {8 * n / 1e6:.1f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
