"""Issue 9's targets for lists of separate arrays, measured side by side in one run:
hwoptim.Adam (float32) over a list of arrays (one header pass + one multi-tensor launch per
step) against the same elements in one FlatParams buffer and against torch.optim.Adam(fused=
True) over the same list; interleaved rounds (the order rotating), medians.

    python bench/many_arrays.py [--rounds 31]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import hwoptim


def _sizes(rng, n, total):
    s = 10 ** rng.uniform(0, 1, n)
    s = np.maximum(1, np.round(s / s.sum() * total)).astype(int)
    return [int(v) for v in s]


def _log_uniform(rng, n, total):
    s = 10 ** rng.uniform(1, 5, n)
    return [max(1, int(v)) for v in s / s.sum() * total]


def case(name, sizes, rounds, new_grads):
    import torch
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    flat = hwoptim.FlatParams([(n,) for n in sizes], np.float32)
    opt_list = hwoptim.Adam(arrays)
    opt_flat = hwoptim.Adam(flat.params)
    tp = [torch.from_numpy(a.copy()) for a in arrays]
    for t, g in zip(tp, grads):
        t.grad = torch.from_numpy(g.copy())
    opt_t = torch.optim.Adam(tp, fused=True)
    gsets = [[g.copy() for g in grads] for _ in range(4)] if new_grads else [grads]
    fns = {
        "list": lambda i: opt_list.step(gsets[i % len(gsets)]),
        "flat": lambda i: opt_flat.step(flat.grads),
        "torch fused": lambda i: opt_t.step(),
    }
    for f in fns.values():
        for i in range(3):
            f(i)
    times = {k: [] for k in fns}
    reps = max(1, int(2e6 // max(1, sum(sizes))))
    order = list(fns)
    for r in range(rounds):
        # each implementation runs right after torch's step as often as the others: on the
        # 2-core development VM whatever runs right after it is slower (bench/NOTES.md)
        for k in order[r % len(order):] + order[:r % len(order)]:
            f = fns[k]
            t0 = time.perf_counter()
            for i in range(reps):
                f(i)
            times[k].append((time.perf_counter() - t0) / reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in med.items())
          + f" | list/flat {med['list'] / med['flat']:.2f}, torch fused/list "
            f"{med['torch fused'] / med['list']:.1f}x")
    return med


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=31)
    a = ap.parse_args()
    rng = np.random.default_rng(1)
    case("200 arrays, ~1e6 elements", _log_uniform(rng, 200, 1_000_000), a.rounds, False)
    case("200 arrays, ~5e7 elements", _log_uniform(rng, 200, 50_000_000), max(5, a.rounds // 4),
         False)
    case("10,000 x 3, re-used grads", [3] * 10_000, a.rounds, False)
    case("10,000 x 3, new grad arrays", [3] * 10_000, a.rounds, True)


if __name__ == "__main__":
    main()
