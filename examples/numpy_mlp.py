"""A NumPy-only MLP on scikit-learn's digits, trained with ``hwoptim.Adam``: every weight
and bias is a view into one ``hwoptim.FlatParams`` buffer, the hand-written backward pass
writes each gradient into its view of the flat gradient, and one ``opt.step(flat.grads)``
(one kernel launch) updates the whole model. No torch anywhere.

    python examples/numpy_mlp.py                 # float32, 30 epochs
    python examples/numpy_mlp.py --quick         # 5 epochs (what the tests run)
    python examples/numpy_mlp.py --dtype float64 --backend numpy

Before training, the hand-written gradient is checked against central differences (float64,
a small batch, a few coordinates of every array). It prints loss and accuracy before and
after, and exits 1 if the gradient check fails or if training did not reduce the training
loss at least ``LOSS_FACTOR`` (10) times (it starts at ~2.6; measured, 5 epochs cut it
30-50 times, to ~0.06, and 30 epochs to ~0.001).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import hwoptim

LOSS_FACTOR = 10.0       # training must cut the training loss at least this many times
GRAD_TOL = 1e-6          # the gradient check: relative error, float64


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--epochs", type=int, default=None, help="default 30 (5 with --quick)")
    p.add_argument("--quick", action="store_true", help="5 epochs: a second or two")
    p.add_argument("--hidden", type=int, default=128, help="hidden width (default 128)")
    p.add_argument("--batch", type=int, default=32, help="mini-batch size (default 32)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None,
                   help="hwoptim backend: numba, numpy (default: hwoptim's choice)")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 5 if args.quick else 30
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


class MLP:
    """64 -> hidden -> hidden -> 10, ReLU, softmax cross-entropy; parameters in one
    ``FlatParams`` buffer (``self.flat``), gradients written into its ``grad_views``."""

    def __init__(self, hidden, dtype, rng):
        self.shapes = [(64, hidden), (hidden,), (hidden, hidden), (hidden,), (hidden, 10),
                       (10,)]
        self.flat = hwoptim.FlatParams(self.shapes, dtype)
        for v in self.flat.views[0::2]:                   # He initialisation, zero biases
            v[...] = rng.standard_normal(v.shape) * np.sqrt(2.0 / v.shape[0])

    def loss_and_grad(self, x, y, grad=True):
        """Mean cross-entropy of ``(x, y)``; with ``grad``, its gradient is written into
        ``self.flat.grad_views`` (each view overwritten; the alignment padding between them
        stays 0)."""
        w1, b1, w2, b2, w3, b3 = self.flat.views
        z1 = x @ w1 + b1
        h1 = np.maximum(z1, 0)
        z2 = h1 @ w2 + b2
        h2 = np.maximum(z2, 0)
        z3 = h2 @ w3 + b3
        z3 = z3 - z3.max(axis=1, keepdims=True)          # log-softmax, stably
        logp = z3 - np.log(np.exp(z3).sum(axis=1, keepdims=True))
        n = len(y)
        loss = -logp[np.arange(n), y].mean()
        if not grad:
            return float(loss), logp
        g1, gb1, g2, gb2, g3, gb3 = self.flat.grad_views
        d3 = np.exp(logp)                                 # softmax - onehot, over n
        d3[np.arange(n), y] -= 1
        d3 /= n
        np.matmul(h2.T, d3, out=g3)
        d3.sum(axis=0, out=gb3)
        d2 = d3 @ w3.T
        d2 *= z2 > 0
        np.matmul(h1.T, d2, out=g2)
        d2.sum(axis=0, out=gb2)
        d1 = d2 @ w2.T
        d1 *= z1 > 0
        np.matmul(x.T, d1, out=g1)
        d1.sum(axis=0, out=gb1)
        return float(loss), logp

    def evaluate(self, x, y):
        loss, logp = self.loss_and_grad(x, y, grad=False)
        return loss, float((logp.argmax(axis=1) == y).mean())


def grad_check(x, y, hidden, seed, per_array=4, eps=1e-5) -> float:
    """Largest relative error of the hand-written gradient against central differences
    (float64), over ``per_array`` random coordinates of every array; a gradient below 1e-3
    of the largest is compared relative to that (central differences carry ~1e-10 of
    rounding error whatever the gradient's size)."""
    rng = np.random.default_rng(seed)
    m = MLP(hidden, np.float64, rng)
    for v in m.flat.views[1::2]:              # non-zero biases, so their gradients show
        v[...] = rng.standard_normal(v.shape) * 0.1
    m.loss_and_grad(x, y)
    analytic = m.flat.grads.copy()
    floor = 1e-3 * float(np.abs(analytic).max())   # tiny gradients: relative to the largest
    worst = 0.0
    for off, shape in zip(m.flat.offsets, m.flat.shapes):
        size = int(np.prod(shape))
        for j in rng.choice(size, min(per_array, size), replace=False):
            i = off + int(j)
            keep = m.flat.params[i]
            m.flat.params[i] = keep + eps
            up = m.loss_and_grad(x, y, grad=False)[0]
            m.flat.params[i] = keep - eps
            down = m.loss_and_grad(x, y, grad=False)[0]
            m.flat.params[i] = keep
            numeric = (up - down) / (2 * eps)
            err = abs(numeric - analytic[i]) / max(abs(numeric), abs(analytic[i]), floor)
            worst = max(worst, err)
    return worst


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    dtype = np.dtype(args.dtype)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(dtype)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=args.seed,
                                          stratify=y)
    err = grad_check(xtr[:16].astype(np.float64), ytr[:16], 16, args.seed)
    print(f"gradient check (float64, central differences): largest relative error "
          f"{err:.2e} (tolerance {GRAD_TOL:g})")
    if not err <= GRAD_TOL:
        print("FAILED: the hand-written gradient does not match the loss")
        return 1

    rng = np.random.default_rng(args.seed)
    model = MLP(args.hidden, dtype, rng)
    opt = hwoptim.Adam(model.flat.params, lr=args.lr, backend=args.backend)
    print(f"digits: {len(xtr)} train, {len(xte)} test; MLP 64-{args.hidden}-{args.hidden}-10 "
          f"in {model.flat!r}; {opt!r} ({opt.backend_name}), batch {args.batch}, "
          f"{args.epochs} epochs")
    loss0, acc0 = model.evaluate(xtr, ytr)
    print(f"before: train loss {loss0:.4f}, train accuracy {acc0:.3f}, test accuracy "
          f"{model.evaluate(xte, yte)[1]:.3f}")
    t_step, t_total = [], []
    for _ in range(args.epochs):
        perm = rng.permutation(len(xtr))
        for i in range(0, len(xtr), args.batch):
            b = perm[i:i + args.batch]
            t0 = time.perf_counter()
            model.loss_and_grad(xtr[b], ytr[b])
            t1 = time.perf_counter()
            opt.step(model.flat.grads)              # one launch updates all six arrays
            t2 = time.perf_counter()
            t_step.append(t2 - t1)
            t_total.append(t2 - t0)
    loss1, acc1 = model.evaluate(xtr, ytr)
    print(f"after:  train loss {loss1:.4f}, train accuracy {acc1:.3f}, test accuracy "
          f"{model.evaluate(xte, yte)[1]:.3f}")
    med = lambda ts: statistics.median(ts[3:] or ts) * 1e6                # noqa: E731
    print(f"{len(t_step)} steps; opt.step {med(t_step):.0f} µs of {med(t_total):.0f} µs per "
          f"training step (forward, backward, step; medians over steps, the first 3 "
          f"left out)")
    factor = loss0 / loss1 if loss1 > 0 else float("inf")
    ok = factor >= LOSS_FACTOR
    print(f"loss reduced {factor:.1f}x (required: {LOSS_FACTOR:g}x): "
          f"{'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
