"""A torch model trained data-parallel with its AdamW state sharded across MPI ranks: a small
MLP on scikit-learn's digits, each rank running forward and backward on its own part of every
mini-batch, then ``ShardedOptimizer(hwoptim.torch.AdamW, model.parameters(), ...)``: ``step()``
takes each param's ``.grad``, averages it across the ranks, clips the averaged grads by their
global norm (``max_grad_norm``, over every rank's slice), updates the slice whose state this
rank holds, and gathers the weights back to every rank. No torch.distributed, no DDP: MPI only.

    mpiexec -n 4 python -m mpi4py examples/sharded_torch_mpi.py          # 4 ranks, 15 epochs
    mpiexec -n 2 python -m mpi4py examples/sharded_torch_mpi.py --quick  # what the tests run

Rank 0 prints the loss and accuracy before and after; the run exits 1 if the training loss did
not fall at least 5 times or the weights differ between ranks.
"""
from __future__ import annotations

import argparse
import sys
import zlib

import numpy as np
import torch
from mpi4py import MPI
from sklearn.datasets import load_digits

import hwoptim.torch as ht
from hwoptim.distributed import ShardedOptimizer

LOSS_FACTOR = 5.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=None, help="default 15 (4 with --quick)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    epochs = args.epochs or (4 if args.quick else 15)
    comm = MPI.COMM_WORLD
    R, rank = comm.Get_size(), comm.Get_rank()
    torch.set_num_threads(1)                              # ranks share the cores
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)                                  # the same weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    opt = ShardedOptimizer(ht.AdamW, model.parameters(), comm, lr=3e-3, max_grad_norm=1.0)
    loss_fn = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        before = loss_fn(model(X), y).item()
    rng = np.random.default_rng(0)
    batch = 64
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for s in range(0, len(y) - batch + 1, batch):
            rows = torch.from_numpy(order[s:s + batch][rank::R])   # this rank's part
            for p in model.parameters():
                p.grad = None
            loss_fn(model(X[rows]), y[rows]).backward()
            opt.step()                                    # each param's .grad, averaged
    with torch.no_grad():
        out = model(X)
        after, acc = loss_fn(out, y).item(), (out.argmax(1) == y).float().mean().item()
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    same = len(set(comm.allgather(zlib.crc32(weights)))) == 1
    shares = comm.gather(opt.state_bytes(), root=0)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"{R} rank{'s' if R > 1 else ''}, AdamW state bytes per rank: {shares} (one "
              f"process would hold {8 * n}); last grad norm {opt.last_grad_norm:.3f}")
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
