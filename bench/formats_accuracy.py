"""Issue 10's accuracy target: what each storage format costs in final loss, with float32 Adam
as the yardstick, on the digits MLP and on a model of 1.1M parameters.

    python bench/formats_accuracy.py [--seeds 0,1,2] [--tasks digits,teacher]

* ``digits``: the 64-256-256-10 MLP (85k parameters) on scikit-learn's digits (1,437
  training images), mini-batches of 64, 500 steps (22 epochs); the loss is the
  cross-entropy over the whole training set after the last step.
* ``teacher``: a 64-1024-1024-1 MLP (1.1M parameters) regressing a fixed random teacher
  network (64-256-1, tanh) plus noise of variance 0.01, a fresh mini-batch of 64 inputs
  per step, 2000 steps; the loss is the mean squared error on 8192 held-out inputs (the
  noise floor is 0.01), so it measures how far the optimizer got, not how well it memorised.

Adam lr 1e-3, the same initial weights and batches for every format of a seed. torch does
the forward and backward passes in float32 from the params upcast; the params live in the
format's dtype and hwoptim's native Adam steps them (the grads rounded to the params' dtype
first, as a 16-bit model's backward would give them). The table gives the final loss per
seed, its median and the median's relative difference from float32's. bfloat16 with
round-to-nearest is shown beside stochastic rounding: most of Adam's steps at lr 1e-3 are
smaller than half a bfloat16 ulp of the weight, so round-to-nearest drops them.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import hwoptim
from hwoptim import formats

FORMATS = [   # (label, params' dtype, options)
    ("fp32", "float32", {}),
    ("bf16, round to nearest", "bfloat16", {}),
    ("bf16 + stochastic rounding", "bfloat16", {"stochastic_rounding": True}),
    ("fp32 master + bf16", "bfloat16", {"master_weights": True}),
    ("int8 state", "float32", {"state_dtype": "int8"}),
    ("bf16 + SR + int8 state", "bfloat16", {"stochastic_rounding": True,
                                            "state_dtype": "int8"}),
]


def _mlp(torch, sizes, seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def train(torch, task, dtype, opts, seed, lr=1e-3):
    """The final loss of one run, and the model's parameter count."""
    model = _mlp(torch, task["sizes"], seed)
    tparams = list(model.parameters())
    dt = formats.np_dtype(dtype)
    params = [t.detach().numpy().astype(dt) for t in tparams]
    opt = hwoptim.Adam(params, lr=lr, seed=seed, **opts)
    batches = task["batches"](seed)

    def load():
        with torch.no_grad():
            for t, p in zip(tparams, params):
                t.copy_(torch.from_numpy(p.astype(np.float32)))
    for xb, yb in batches:
        load()
        model.zero_grad(set_to_none=False)
        task["loss"](model(xb), yb).backward()
        opt.step([t.grad.numpy().astype(dt) for t in tparams])
    load()
    with torch.no_grad():
        return float(task["loss"](model(task["eval"][0]), task["eval"][1])), \
            sum(p.size for p in params)


def digits_task(torch, steps=500, batch=64):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    xtr, _, ytr, _ = train_test_split(x / 16.0, y, test_size=0.2, random_state=0, stratify=y)
    xtr, ytr = torch.tensor(xtr, dtype=torch.float32), torch.tensor(ytr)

    def batches(seed):
        rng = np.random.default_rng(seed)
        order = np.concatenate([rng.permutation(len(ytr))
                                for _ in range(steps * batch // len(ytr) + 1)])
        for s in range(steps):
            idx = torch.from_numpy(order[s * batch:(s + 1) * batch])
            yield xtr[idx], ytr[idx]
    return {"name": f"digits MLP, {steps} steps of {batch}", "sizes": [64, 256, 256, 10],
            "batches": batches, "loss": torch.nn.CrossEntropyLoss(), "eval": (xtr, ytr)}


def teacher_task(torch, steps=2000, batch=64):
    g = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(64, 256, generator=g) / 8, torch.randn(256, 1, generator=g) / 16

    def teacher(x):
        return torch.tanh(x @ w1) @ w2

    xe = torch.randn(8192, 64, generator=g)
    ye = teacher(xe) + 0.1 * torch.randn(8192, 1, generator=g)

    def batches(seed):
        gb = torch.Generator().manual_seed(10_000 + seed)
        for _ in range(steps):
            xb = torch.randn(batch, 64, generator=gb)
            yield xb, teacher(xb) + 0.1 * torch.randn(batch, 1, generator=gb)
    return {"name": f"teacher-student MLP, {steps} steps of {batch}",
            "sizes": [64, 1024, 1024, 1], "batches": batches,
            "loss": torch.nn.MSELoss(), "eval": (xe, ye)}


def main(argv=None) -> int:
    import torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default="digits,teacher")
    args = ap.parse_args(argv)
    torch.set_num_threads(hwoptim.get_num_threads())
    seeds = [int(s) for s in args.seeds.split(",")]
    for name in args.tasks.split(","):
        task = {"digits": digits_task, "teacher": teacher_task}[name](torch)
        rows, n = {}, 0
        t0 = time.time()
        for label, dtype, opts in FORMATS:
            rows[label] = []
            for seed in seeds:
                loss, n = train(torch, task, dtype, opts, seed)
                rows[label].append(loss)
        base = statistics.median(rows["fp32"])
        print(f"\n{task['name']} ({'-'.join(map(str, task['sizes']))}, {n:,} parameters), "
              f"Adam lr 1e-3, seeds {args.seeds} ({time.time() - t0:.0f} s)")
        print("| format | final loss, per seed | median | vs fp32 |")
        print("| --- | --- | --- | --- |")
        for label, losses in rows.items():
            med = statistics.median(losses)
            print(f"| {label} | {', '.join(f'{v:.4g}' for v in losses)} | {med:.4g} | "
                  f"{(med - base) / base:+.2%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
