"""Train a torch MLP on scikit-learn's digits with ``hwoptim.torch.AdamW`` and, beside it,
``torch.optim.AdamW``: the same initial weights, the same mini-batches, the same
``OneCycleLR`` schedule (which also cycles beta1, so the hyperparameters change every step).

    python examples/torch_digits.py                       # float32, 20 epochs
    python examples/torch_digits.py --dtype float64       # the strict check: <= 1e-12
    python examples/torch_digits.py --quick               # 3 epochs (what the tests run)

It prints the largest relative difference between the two runs' loss curves (the training
loss of every mini-batch, |hwoptim - torch| / |torch|) and exits 1 if it is over the
tolerance of the dtype. A third run, torch's other AdamW implementation (``fused=True``,
or the for-loop one when ``--torch-impl fused``), is the yardstick: how far apart two
correct implementations drift in that dtype.

* float64: 1e-12. The implementations differ only in rounding (hwoptim computes the
  scalar parts of a step in float64 on the host, torch in its own order), ~1e-16 per step,
  and the forward and backward passes are bit-identical given identical weights: measured,
  3e-16 after 3 epochs, 3e-15 to 2e-14 after 20 to 60.
* float32: 1e-4, or 10x the yardstick's own difference where that is larger. A step rounds
  some weights an ulp (u = 6e-8) differently, and training carries that on: after 20
  epochs the curves differ by 1e-6 to 4e-6 (seeds 0-4), as much as torch's fused and
  for-loop AdamW differ from each other. Longer runs at this learning rate amplify rounding
  chaotically (60 epochs, seed 1: torch fused against torch for-loop reaches 1.0 relative),
  which no fixed tolerance survives; the yardstick says when that happened. A wrong update
  is caught within 3 epochs: weight decay 10% off gives 2.5e-4, beta2 0.998 for 0.999 9e-3,
  eps 1e-7 for 1e-8 8e-3.
* float32 under CUDA autocast (float16 matmuls) with ``torch.amp.GradScaler``: 2e-2, or
  10x the yardstick's. A weight one float32 ulp off can round to another float16 value
  (u = 4.9e-4), so the forward passes themselves differ at float16's precision; 2e-2 is
  forty float16 ulps. Measured on an H200 (3 epochs): 8.6e-4, against 7.5e-3 between
  torch's own fused and for-loop AdamW.

It also times, per training step, ``opt.step()`` (``scaler.step(opt)`` under autocast)
against the whole step (zero_grad, forward, backward, step), for both optimizers, and
prints the medians over steps (the first steps, which load hwoptim's kernels, excluded).
The two models alternate which goes first at each step, so neither always follows the
other's work.

Without CUDA everything runs on the CPU; ``torch.optim.AdamW`` is then torch's for-loop
implementation (its default on the CPU), and ``--torch-impl`` picks another.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import hwoptim
import hwoptim.torch as ht

TOL = {"float64": 1e-12, "float32": 1e-4, "amp": 2e-2}
WARMUP_STEPS = 3        # steps left out of the timing medians (hwoptim loads its kernels)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("float64", "float32"), default="float32")
    p.add_argument("--epochs", type=int, default=None, help="default 20 (3 with --quick)")
    p.add_argument("--quick", action="store_true", help="3 epochs: a few seconds")
    p.add_argument("--hidden", type=int, default=256, help="hidden width (default 256)")
    p.add_argument("--batch", type=int, default=64, help="mini-batch size (default 64)")
    p.add_argument("--max-lr", type=float, default=3e-3, help="OneCycleLR's max_lr")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda if torch.cuda.is_available(), else cpu")
    p.add_argument("--torch-impl", choices=("default", "forloop", "foreach", "fused"),
                   default="default", help="torch.optim.AdamW's implementation (default: "
                   "torch's own choice: for-loop on the CPU, foreach on CUDA)")
    p.add_argument("--no-amp", action="store_true", help="on CUDA, skip the autocast run")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 20
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


def data(dtype, device, seed):
    """(x_train, y_train, x_test, y_test): the 1,797 8x8 digits, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    as_x = lambda a: torch.tensor(a, dtype=dtype, device=device)           # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long, device=device)      # noqa: E731
    return as_x(xtr), as_y(ytr), as_x(xte), as_y(yte)


def mlp(hidden, dtype, device, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10)).to(device=device, dtype=dtype)


def batches(n, batch, epochs, seed):
    """Every epoch's shuffled mini-batches of indices: one list, shared by all runs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        perm = rng.permutation(n)
        out += [torch.from_numpy(perm[i:i + batch]) for i in range(0, n, batch)]
    return out


class Run:
    """One model, its optimizer, its scheduler (and GradScaler): its losses and timings."""

    def __init__(self, name, model, opt, total_steps, max_lr, amp):
        self.name, self.model, self.opt, self.amp = name, model, opt, amp
        self.sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr,
                                                         total_steps=total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if amp else None
        self.losses, self.t_step, self.t_total = [], [], []

    def train_step(self, x, y, sync):
        model, opt = self.model, self.opt
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if self.amp:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            self.scaler.scale(loss).backward()
            sync()
            t1 = time.perf_counter()
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            sync()
            t1 = time.perf_counter()
            opt.step()
        sync()
        t2 = time.perf_counter()
        self.sched.step()
        self.losses.append(loss.detach())
        self.t_step.append(t2 - t1)
        self.t_total.append(t2 - t0)

    @torch.no_grad()
    def accuracy(self, x, y):
        return float((self.model(x).argmax(1) == y).float().mean())


def max_rel_diff(a, b) -> tuple:
    """(largest |a - b| / |b| over the curves, the step where it is)."""
    a = np.array([float(v) for v in a], dtype=np.float64)
    b = np.array([float(v) for v in b], dtype=np.float64)
    rel = np.abs(a - b) / np.maximum(np.abs(b), np.finfo(np.float64).tiny)
    i = int(np.argmax(rel))
    return float(rel[i]), i


def _quart(xs):
    xs = sorted(xs)
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    return tuple(statistics.quantiles(xs, n=4, method="inclusive"))


def timing_rows(runs):
    """Rows of the end-to-end table: median [quartiles] µs of opt.step and of the step."""
    rows = []
    for r in runs:
        st, tot = r.t_step[WARMUP_STEPS:] or r.t_step, r.t_total[WARMUP_STEPS:] or r.t_total
        (s1, sm, s3), (w1, wm, w3) = _quart(st), _quart(tot)
        share = statistics.median(a / b for a, b in zip(st, tot))
        rows.append((r.name, f"{sm * 1e6:,.0f} [{s1 * 1e6:,.0f}–{s3 * 1e6:,.0f}]",
                     f"{wm * 1e6:,.0f} [{w1 * 1e6:,.0f}–{w3 * 1e6:,.0f}]",
                     f"{share:.0%}", len(st)))
    return rows


def print_table(head, rows):
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def torch_adamw(params, impl, **kw):
    extra = {"default": {}, "forloop": {"foreach": False}, "foreach": {"foreach": True},
             "fused": {"fused": True}}[impl]
    return torch.optim.AdamW(params, **kw, **extra)


def yardstick_impl(impl: str) -> str:
    """torch's AdamW implementation the yardstick run uses: another one than ``impl``."""
    return "forloop" if impl == "fused" else "fused"


def train_runs(args, dtype, device, amp, data_):
    """torch, the yardstick (torch's other implementation) and hwoptim, side by side, step
    by step, from the same initial weights on the same mini-batches."""
    xtr, ytr, xte, yte = data_
    base = mlp(args.hidden, dtype, device, args.seed)
    idx = batches(len(xtr), args.batch, args.epochs, args.seed + 1)
    idx = [i.to(device) for i in idx]
    kw = dict(lr=args.max_lr, weight_decay=args.weight_decay)
    suffix = " + autocast" if amp else ""
    yard = yardstick_impl(args.torch_impl)
    makers = [(f"torch.optim.AdamW ({args.torch_impl}){suffix}",
               lambda ps: torch_adamw(ps, args.torch_impl, **kw)),
              (f"torch.optim.AdamW ({yard}, yardstick){suffix}",
               lambda ps: torch_adamw(ps, yard, **kw)),
              (f"hwoptim.torch.AdamW{suffix}", lambda ps: ht.AdamW(ps, **kw))]
    runs = []
    for name, make in makers:
        m = copy.deepcopy(base)
        runs.append(Run(name, m, make(m.parameters()), len(idx), args.max_lr, amp))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for k, i in enumerate(idx):
        x, y = xtr[i], ytr[i]
        for r in runs[k % 3:] + runs[:k % 3]:      # rotate who goes first
            r.train_step(x, y, sync)
    for r in runs:
        r.acc = (r.accuracy(xtr, ytr), r.accuracy(xte, yte))
    return runs


def report(runs, tol, label, yardstick_scales: bool) -> bool:
    """Print the comparison and the timings; whether hwoptim is within tolerance."""
    rt, ry, rh = runs
    rel, at = max_rel_diff(rh.losses, rt.losses)
    rel_y, at_y = max_rel_diff(ry.losses, rt.losses)
    limit = max(tol, 10 * rel_y) if yardstick_scales else tol
    ok = rel <= limit
    print(f"\n{label}: {len(rt.losses)} steps; loss {float(rt.losses[0]):.4f} -> "
          f"{float(rt.losses[-1]):.4f} (torch), {float(rh.losses[0]):.4f} -> "
          f"{float(rh.losses[-1]):.4f} (hwoptim)")
    print(f"accuracy train/test: torch {rt.acc[0]:.3f}/{rt.acc[1]:.3f}, hwoptim "
          f"{rh.acc[0]:.3f}/{rh.acc[1]:.3f}")
    print(f"yardstick, torch's two implementations: largest relative difference "
          f"{rel_y:.3g} (step {at_y + 1})")
    how = (f"tolerance {tol:g}" + (f", 10x the yardstick's {10 * rel_y:.3g}"
                                   if yardstick_scales and 10 * rel_y > tol else ""))
    print(f"largest relative difference of the loss curves: {rel:.3g} (step {at + 1}); "
          f"{how}: {'ok' if ok else 'OVER'}")
    print()
    print_table(("optimizer", "opt.step() µs, median [IQR]", "whole step µs, median [IQR]",
                 "step / whole", "steps"), timing_rows(runs))
    return ok


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        why = ("torch.cuda.is_available() is False" if not torch.cuda.is_available()
               else hwoptim.backends.unavailable("cupy"))   # hwoptim's CUDA kernels
        if why is not None:
            if args.device == "cuda":
                print(f"--device cuda: {why}", file=sys.stderr)
                return 2
            print(f"note: CUDA is there but hwoptim cannot use it ({why}); running on the CPU")
            device = torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    d = data(dtype, device, args.seed)
    h = args.hidden
    print(f"digits: {len(d[0])} train, {len(d[2])} test; MLP 64-{h}-{h}-10 "
          f"({65 * h + (h + 1) * h + (h + 1) * 10:,} params), {args.dtype}, {device.type}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), batch {args.batch}, {args.epochs} epochs, "
          f"OneCycleLR(max_lr={args.max_lr:g}), weight_decay={args.weight_decay:g}")
    ok = report(train_runs(args, dtype, device, False, d), TOL[args.dtype], args.dtype,
                yardstick_scales=args.dtype == "float32")
    if device.type == "cuda" and args.dtype == "float32" and not args.no_amp:
        ok &= report(train_runs(args, dtype, device, True, d), TOL["amp"],
                     "float32 + autocast(float16) + GradScaler", yardstick_scales=True)
    print("\nall within tolerance" if ok else "\nFAILED: a loss curve is over its tolerance")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
