"""Batch gradient descent (BGD), stochastic (SGD) and mini-batch (MBGD): one iterator.

``Batches(n, batch_size, seed=...)`` splits ``range(n)`` into batches for each epoch:
``batch_size = n`` is BGD (one batch, the whole data set), ``1`` is SGD (one sample per
step), anything between is MBGD. Each epoch visits every sample exactly once, in an order
shuffled from ``(seed, epoch)``: the same seed gives the same batches, and any epoch can be
replayed alone.

For the lesson's demo the module also has two small models written with NumPy
(least-squares linear regression and L2-regularised logistic regression: loss and
gradient over a batch, the exact optimum), a loader for the small data sets scikit-learn
ships (``load_dataset``; scikit-learn is optional, ``pip install 'hwoptim[lesson]'``), and
``train``, where every update is an hwoptim optimizer step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Batches", "mode", "batch_sizes", "LinearRegression", "LogisticRegression",
           "load_dataset", "DATASETS", "train", "History"]


def mode(batch_size: int, n: int) -> str:
    """``"BGD"``, ``"SGD"`` or ``"MBGD"`` for batches of ``batch_size`` out of ``n``."""
    if batch_size >= n:
        return "BGD"
    return "SGD" if batch_size == 1 else "MBGD"


class Batches:
    """Index batches over ``n`` samples, epoch after epoch.

    Args:
        n: the number of samples.
        batch_size: samples per batch (``>= n``: one batch of all, BGD).
        shuffle: a new random order every epoch (default); ``False``: ``0..n-1`` in order.
        seed: the order of epoch ``e`` comes from ``numpy.random.default_rng([seed, e])``;
            ``None`` draws a seed once (kept in ``self.seed``).
        drop_last: leave out the last, smaller batch when ``batch_size`` does not divide
            ``n`` (then those samples are skipped that epoch).

    Iterating gives the batches of the next epoch; ``epoch(e)`` those of epoch ``e``.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool = True, seed=None,
                 drop_last: bool = False):
        n, b = int(n), int(batch_size)
        if n < 1:
            raise ValueError(f"n={n}: expected at least one sample")
        if b < 1:
            raise ValueError(f"batch_size={batch_size}: expected an integer >= 1")
        self.n, self.batch_size = n, min(b, n)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.seed = int(np.random.SeedSequence().entropy) if seed is None else int(seed)
        self.next_epoch = 0

    @property
    def mode(self) -> str:
        return mode(self.batch_size, self.n)

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def order(self, epoch: int) -> np.ndarray:
        """The sample order of epoch ``epoch``."""
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.n)

    def epoch(self, epoch: int):
        """The batches (index arrays) of epoch ``epoch``."""
        idx = self.order(epoch)
        for i in range(len(self)):
            yield idx[i * self.batch_size:(i + 1) * self.batch_size]

    def __iter__(self):
        e = self.next_epoch
        self.next_epoch += 1
        return self.epoch(e)

    def __repr__(self):
        return (f"Batches(n={self.n}, batch_size={self.batch_size}: {self.mode}, "
                f"{len(self)} per epoch, seed={self.seed})")


def batch_sizes(n: int, middle: int = 32) -> dict:
    """``{"BGD": n, "MBGD": middle, "SGD": 1}``."""
    return {"BGD": int(n), "MBGD": int(middle), "SGD": 1}


# ----------------------------------------------------------------------------- two models

class LinearRegression:
    """Least squares: ``L(w) = ‖Xw − y‖² / (2N)``; the last weight is the bias."""

    name = "linear regression"

    def __init__(self, X, y):
        self.X = np.hstack([np.asarray(X, np.float64), np.ones((len(X), 1))])
        self.y = np.asarray(y, np.float64)
        self.n, self.dim = self.X.shape

    def loss(self, w, idx=None) -> float:
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        r = X @ w - y
        return float(r @ r) / (2 * len(y))

    def gradient(self, w, idx=None, out=None):
        """The mean gradient over samples ``idx`` (all when ``None``)."""
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        g = X.T @ (X @ w - y) / len(y)
        if out is None:
            return g
        out[...] = g
        return out

    def sample_gradients(self, w) -> np.ndarray:
        """``(N, dim)``: each sample's own gradient."""
        return self.X * (self.X @ w - self.y)[:, None]

    def optimum(self):
        """``(w*, L(w*))``, from least squares."""
        w = np.linalg.lstsq(self.X, self.y, rcond=None)[0]
        return w, self.loss(w)


class LogisticRegression:
    """Logistic loss with an L2 penalty: ``L(w) = mean(log(1 + e^z) − y·z) + λ/2·‖w‖²``,
    ``z = Xw``, labels 0/1, the last weight the bias. The penalty keeps the optimum finite
    on separable data."""

    name = "logistic regression"

    def __init__(self, X, y, l2: float = 1e-3):
        self.X = np.hstack([np.asarray(X, np.float64), np.ones((len(X), 1))])
        self.y = np.asarray(y, np.float64)
        self.l2 = float(l2)
        self.n, self.dim = self.X.shape

    def loss(self, w, idx=None) -> float:
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        z = X @ w
        return float(np.mean(np.logaddexp(0.0, z) - y * z)) + 0.5 * self.l2 * float(w @ w)

    def gradient(self, w, idx=None, out=None):
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        p = 0.5 * (1.0 + np.tanh(0.5 * (X @ w)))          # the logistic function, no overflow
        g = X.T @ (p - y) / len(y) + self.l2 * w
        if out is None:
            return g
        out[...] = g
        return out

    def sample_gradients(self, w) -> np.ndarray:
        p = 0.5 * (1.0 + np.tanh(0.5 * (self.X @ w)))
        return self.X * (p - self.y)[:, None] + self.l2 * w

    def optimum(self, iterations: int = 50):
        """``(w*, L(w*))`` by Newton's method (the loss is strictly convex)."""
        w = np.zeros(self.dim)
        for _ in range(iterations):
            p = 0.5 * (1.0 + np.tanh(0.5 * (self.X @ w)))
            H = (self.X * (p * (1 - p))[:, None]).T @ self.X / self.n + self.l2 * np.eye(self.dim)
            step = np.linalg.solve(H, self.gradient(w))
            w = w - step
            if np.max(np.abs(step)) < 1e-13:
                break
        return w, self.loss(w)


# ----------------------------------------------------------------------------- data

DATASETS = {
    "diabetes": ("load_diabetes", LinearRegression,
                 "scikit-learn's diabetes data: 442 patients, 10 features, a disease "
                 "progression score (regression)"),
    "breast-cancer": ("load_breast_cancer", LogisticRegression,
                      "scikit-learn's breast-cancer data: 569 tumours, 30 features, "
                      "malignant or benign (classification)"),
}


def load_dataset(name: str):
    """``(model, description)`` for a data set bundled with scikit-learn (read from the
    installed package, no download), features standardised (and the diabetes target
    too), as a model over all of it."""
    if name not in DATASETS:
        raise ValueError(f"no data set {name!r}; expected one of {', '.join(DATASETS)}")
    try:
        from sklearn import datasets
    except ImportError:
        raise ImportError("the batching demo's data sets ship with scikit-learn: "
                          "pip install 'hwoptim[lesson]' (or scikit-learn)") from None
    loader, model, doc = DATASETS[name]
    X, y = getattr(datasets, loader)(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    if model is LinearRegression:
        y = (y - y.mean()) / y.std()
    return model(X, y), doc


# ----------------------------------------------------------------------------- training

@dataclass
class History:
    """A training run: the full-data loss after each epoch (``losses[0]``: at the start)
    and the wall time spent training up to then (loss evaluations excluded)."""
    label: str
    mode: str
    batch_size: int
    losses: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    steps: int = 0


def train(model, method, batch_size: int, epochs: int, *, seed: int = 0, backend=None,
          w0=None, label: str | None = None) -> History:
    """Train ``model`` with ``method`` (a :class:`hwoptim.lesson.trajectories.Method`) on batches
    of ``batch_size``, shuffled with ``seed``; every update is ``optimizer.step``."""
    w = np.zeros(model.dim) if w0 is None else np.array(w0, dtype=np.float64)
    g = np.zeros_like(w)
    method.make(np.zeros_like(w), backend=backend).step(g)   # build the kernel before timing
    opt = method.make(w, backend=backend)
    batches = Batches(model.n, batch_size, seed=seed)
    h = History(label or method.label, batches.mode, batches.batch_size)
    h.losses.append(model.loss(w))
    h.seconds.append(0.0)
    spent = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(int(epochs)):
            t0 = time.perf_counter()
            for idx in batches:
                model.gradient(w, idx, out=g)
                opt.step(g)
                h.steps += 1
            spent += time.perf_counter() - t0
            h.losses.append(model.loss(w))
            h.seconds.append(spent)
    return h
