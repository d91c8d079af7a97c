"""Data-parallel training with the optimizer state sharded across MPI ranks (ZeRO stage 1):
softmax regression on scikit-learn's digits, each rank computing the gradient of its own
part of every mini-batch, ``hwoptim.distributed.ShardedOptimizer(hwoptim.Adam, ...)``
averaging the grads across ranks, updating the slice of the weights whose Adam state this
rank holds, and gathering the weights back to every rank.

    mpiexec -n 4 python examples/sharded_mpi.py          # 4 ranks, 20 epochs
    mpiexec -n 2 python examples/sharded_mpi.py --quick  # 5 epochs (what the tests run)
    python examples/sharded_mpi.py                       # one process works too

Rank 0 prints the loss and accuracy before and after, and each rank's share of the Adam
state; the run exits 1 if the training loss did not fall at least 5 times or the weights
differ between ranks.
"""
from __future__ import annotations

import argparse
import sys
import zlib

import numpy as np
from mpi4py import MPI
from sklearn.datasets import load_digits

import hwoptim
from hwoptim.distributed import ShardedOptimizer

LOSS_FACTOR = 5.0


def loss_and_grads(W, b, X, y):
    """Mean cross-entropy of softmax(XW + b) over the rows of X, and its gradients."""
    z = X @ W + b
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y] + 1e-12).mean()
    p[np.arange(len(y)), y] -= 1
    p /= len(y)
    return loss, X.T @ p, p.sum(axis=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=None, help="default 20 (5 with --quick)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    epochs = args.epochs or (5 if args.quick else 20)
    comm = MPI.COMM_WORLD
    R, rank = comm.Get_size(), comm.Get_rank()
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)                       # the same on every rank
    W = (rng.standard_normal((64, 10)) * 0.01).astype(np.float32)
    b = np.zeros(10, np.float32)
    opt = ShardedOptimizer(hwoptim.Adam, [W, b], comm, lr=0.01)
    before = loss_and_grads(W, b, X, y)[0]
    batch = 64
    for epoch in range(epochs):
        order = rng.permutation(len(y))
        for s in range(0, len(y) - batch + 1, batch):
            rows = order[s:s + batch][rank::R]           # this rank's part of the batch
            _, gW, gb = loss_and_grads(W, b, X[rows], y[rows])
            opt.step([gW.astype(np.float32), gb.astype(np.float32)])
    after = loss_and_grads(W, b, X, y)[0]
    acc = float(((X @ W + b).argmax(axis=1) == y).mean())
    same = len(set(comm.allgather(zlib.crc32(W.tobytes() + b.tobytes())))) == 1
    shares = comm.gather(opt.state_bytes(), root=0)
    if rank == 0:
        print(f"{R} rank{'s' if R > 1 else ''}, Adam state bytes per rank: {shares} "
              f"(one process would hold {2 * (W.nbytes + b.nbytes)})")
        print(f"before: train loss {before:.4f}")
        print(f"after:  train loss {after:.4f}, accuracy {acc:.3f} ({epochs} epochs)")
        print(f"weights the same on every rank: {same}")
        ok = same and before / after >= LOSS_FACTOR
        print(f"loss reduced {before / after:.1f}x (required: {LOSS_FACTOR:g}x): "
              f"{'ok' if ok else 'FAILED'}")
    else:
        ok = True
    return 0 if comm.bcast(ok, root=0) else 1


if __name__ == "__main__":
    sys.exit(main())
