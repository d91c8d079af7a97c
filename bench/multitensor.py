"""Multi-tensor apply on the CPU: one ``Kernel.many`` call for a list of separate arrays,
against a per-array loop of ``Kernel.launcher`` calls and against one flat array of the
same total (the memory floor a list can reach). Adam float32, side by side in one process,
the variants interleaved round by round; medians. Run by hand, not in CI:

    python bench/multitensor.py                   # the three workloads below
    python bench/multitensor.py --chunks 4096,16384,65536   # chunk sizes of the multi kernel
    python bench/multitensor.py --threads 1 --rounds 41

Workloads: (a) 200 tensors, log-uniform sizes, ~1e6 elements in all; (b) 10,000 tensors of
3 elements; (c) 200 tensors, log-uniform sizes, ~5e7 elements; (d) the tensors of (a)
sorted largest first (a prange over raw chunks would give one thread the large ones). The
pointer table, rows and scalars are built once, outside the timing (a step in an optimizer
reuses them).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hwoptim import backends, codegen, threads  # noqa: E402
from hwoptim.rules import RULES  # noqa: E402


def log_uniform_sizes(rng, n_tensors: int, total: float, low: float = 1.0) -> np.ndarray:
    """``n_tensors`` sizes, log-uniform over four decades, scaled to about ``total``."""
    raw = np.exp(rng.uniform(np.log(low), np.log(low * 1e4), n_tensors))
    return np.maximum(1, np.round(raw * total / raw.sum())).astype(np.int64)


class Group:
    """Separate arrays (one set per tensor), plus one flat set of the same total."""

    def __init__(self, plan, dtype, sizes, rng):
        self.sizes = np.asarray(sizes, np.int64)
        total = int(self.sizes.sum())
        flat = [rng.standard_normal(total).astype(dtype) if a in ("param", "grad")
                else np.full(total, 0.1, dtype) for a in plan.arrays]
        self.flat = flat
        offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        # separate allocations, not views of one buffer (what a list of tensors looks like)
        self.arrays = [[f[offsets[i]:offsets[i + 1]].copy() for f in flat]
                       for i in range(len(self.sizes))]
        self.ptrs = np.array([[a.ctypes.data for a in arrs] for arrs in self.arrays], np.int64)
        self.rows = np.zeros(len(self.sizes), np.int64)
        self.total = total


def timed(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def run(name, variants: dict, rounds: int, budget_s: float = 0.05):
    """Each variant timed ``rounds`` times, interleaved; every timing a batch sized to
    about ``budget_s``. Prints medians (µs) and interquartile ranges."""
    reps = {}
    for v, fn in variants.items():
        fn()
        fn()                                    # warm (compile, first touch, chunk table)
        one = timed(fn, 3)
        reps[v] = max(1, int(budget_s / max(one, 1e-7)))
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for v, fn in variants.items():
            times[v].append(timed(fn, reps[v]))
    med = {v: statistics.median(t) for v, t in times.items()}
    print(f"\n{name}")
    first = next(iter(med))
    for v, t in times.items():
        q = statistics.quantiles(t, n=4)
        print(f"  {v:<44s} {med[v] * 1e6:11.1f} µs  (IQR {q[0] * 1e6:.1f}-{q[2] * 1e6:.1f})"
              f"  {med[v] / med[first]:6.2f}x of {first}")
    return med


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--chunks", default=None,
                    help="comma-separated chunk sizes to compare (default: MULTI_CHUNK only)")
    ap.add_argument("--only", default="a,b,c,d", help="workloads to run, from a,b,c,d")
    args = ap.parse_args(argv)
    NB = backends.load("numba")
    if args.threads:
        threads.set_num_threads(args.threads)
    T = threads.current_threads()
    rule = RULES["Adam"]
    h = {n: hy.default for n, hy in rule.hypers.items()}
    plan = codegen.plan(rule, rule.static_flags(h, dict(rule.options)))
    dtype = "float32"
    k = NB.kernel(plan, dtype)
    sc = k.prepare(h, 10)
    scalars = np.array([sc], dtype)
    chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else [NB.MULTI_CHUNK]
    print(f"Adam float32, {T} threads, layer {threads.threading_layer()['layer']}, "
          f"MULTI_CHUNK {NB.MULTI_CHUNK}, serial below {k.serial_below(T):.0f} elements; "
          f"median of {args.rounds} interleaved rounds")
    rng = np.random.default_rng(0)
    work = {"a": ("(a) 200 tensors, log-uniform, ~1e6 elements",
                  log_uniform_sizes(rng, 200, 1e6)),
            "b": ("(b) 10,000 tensors of 3 elements", np.full(10_000, 3, np.int64)),
            "c": ("(c) 200 tensors, log-uniform, ~5e7 elements",
                  log_uniform_sizes(rng, 200, 5e7))}
    work["d"] = ("(d) the tensors of (a), largest first", np.sort(work["a"][1])[::-1].copy())
    for key in args.only.split(","):
        title, sizes = work[key]
        g = Group(plan, dtype, sizes, rng)
        variants = {}
        for c in chunks:
            tables = codegen.ChunkTables(c, row_cost=NB.MULTI_ROW_COST)
            f = k.many_launcher(g.total, T)
            label = f"many (chunk {c})" if len(chunks) > 1 else "many"
            variants[label] = (lambda tables=tables, f=f: f(
                g.ptrs, tables.get(g.sizes).table, tables.get(g.sizes).groups, g.rows,
                scalars))
            if c == NB.MULTI_CHUNK:
                variants["many, through Kernel.many"] = (
                    lambda: k.many(g.ptrs, g.sizes, g.rows, scalars, T))
        launchers = [k.launcher(int(n), T) for n in g.sizes]
        pairs = list(zip(launchers, g.arrays))

        def loop():
            for f, arrs in pairs:
                f(*arrs, *sc)
        variants["per-array loop (launcher per tensor)"] = loop
        flat_f = k.launcher(g.total, T)
        variants["one flat array of the same total"] = lambda: flat_f(*g.flat, *sc)
        tab = codegen.ChunkTables(NB.MULTI_CHUNK).get(g.sizes)
        print(f"\n{title}: {g.total} elements, sizes {int(g.sizes.min())}-"
              f"{int(g.sizes.max())}, {tab.n_chunks} chunks of <= {NB.MULTI_CHUNK}")
        run(title, variants, args.rounds, budget_s=0.02 if key != "c" else 0.2)
        del g, pairs, variants


if __name__ == "__main__":
    main()
