"""Issue 11's targets for Adafactor's factored path (params of >= 2 dims), side by side in one
run (``hwoptim.bench.timing.measure``: interleaved rounds, the order rotating, medians): hwoptim's step against its own floor
and against torch.optim.Adafactor (for-loop and foreach), on a 200-array model (matrices
and their bias vectors, ``hwoptim.bench.workload.model_shapes``) and on one matrix.

    python bench/adafactor.py [--rounds 15] [--sizes 1e7,5e7] [--dtype float32]
    python bench/adafactor.py --formats [--sizes 1e7]      # one matrix in every format

The floor streams the bytes the factored step must move, over one flat buffer as large as
the params: the first sweep reads p and g (RMS(p), row and column means of g²), the second
reads g (RMS of the update), the store reads p and g and writes p: 5 reads and 1 write per
element (24 B in float32; the row and column factors, m + n numbers, are noise). Also the
state memory, measured from the arrays, against Adam's.
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np

import hwoptim
from hwoptim.bench.timing import measure, torch_on_our_threads
from hwoptim.bench.workload import model_shapes


def _floor():
    from numba import njit, prange

    @njit(parallel=True, nogil=True, fastmath=True)
    def read2(p, g):
        s = p.dtype.type(0.0)
        for i in prange(p.shape[0]):
            s += p[i] * p[i] + g[i] * g[i]
        return s

    @njit(parallel=True, nogil=True, fastmath=True)
    def read1(g):
        s = g.dtype.type(0.0)
        for i in prange(g.shape[0]):
            s += g[i] * g[i]
        return s

    @njit(parallel=True, nogil=True, fastmath=True)
    def update(p, g, c):
        for i in prange(p.shape[0]):
            p[i] = p[i] - c * g[i]

    def run(p, g):
        read2(p, g)
        read1(g)
        update(p, g, p.dtype.type(1e-12))
    return run


def case(shapes, rounds, dtype, torch):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    n = sum(p.size for p in params)
    ours = hwoptim.Adafactor([p.copy() for p in params])
    floor = _floor()
    fp = np.concatenate([p.reshape(-1) for p in params])
    fg = np.concatenate([g.reshape(-1) for g in grads])
    fns = {"hwoptim": lambda: ours.step(grads), "floor": lambda: floor(fp, fg)}
    if torch is not None:
        for foreach in (False, True):
            tp = [torch.from_numpy(p.copy()) for p in params]
            for t, g in zip(tp, grads):
                t.grad = torch.from_numpy(g.copy())
            fns[f"torch foreach={foreach}"] = torch.optim.Adafactor(tp, foreach=foreach).step
    times = measure(fns, pairs=rounds, sample_s=0.02)     # the project's interleaved timing
    state = sum(v.nbytes for st in ours.state for v in st.values())
    return n, {k: statistics.median(v["samples"]) for k, v in times.items()}, state


FORMATS = (("float32", {}), ("bfloat16", {}), ("bfloat16", {"stochastic_rounding": True}),
           ("bfloat16", {"master_weights": True}), ("bfloat16", {"state_dtype": "bfloat16"}),
           ("bfloat16", {"state_dtype": "int8"}))


def formats_table(total, rounds, torch) -> None:
    """One matrix of ``total`` elements stepped in each storage format (the staged kernels'
    loads and stores), side by side in one run with the float32 step and torch's."""
    from hwoptim import formats
    side = int(round(np.sqrt(total / 1.5)))
    shape = (side, int(1.5 * side))
    rng = np.random.default_rng(0)
    p0, g0 = rng.standard_normal(shape), rng.standard_normal(shape) * 1e-2
    fns, opts = {}, {}
    for dtype, fo in FORMATS:
        dt = formats.np_dtype(dtype)
        p, g = p0.astype(np.float32).astype(dt), g0.astype(np.float32).astype(dt)
        opt = hwoptim.Adafactor([p], **fo)
        key = f"{dtype} {','.join(f'{k}={v}' for k, v in fo.items()) or 'default'}"
        fns[key], opts[key] = (lambda o=opt, g=g: o.step([g])), opt
    if torch is not None:
        tp = torch.from_numpy(p0.astype(np.float32))
        tp.grad = torch.from_numpy(g0.astype(np.float32))
        fns["torch float32 (for-loop)"] = torch.optim.Adafactor([tp], foreach=False).step
    times = measure(fns, pairs=rounds, sample_s=0.02)
    m = {k: statistics.median(v["samples"]) for k, v in times.items()}
    n = side * int(1.5 * side)
    base = m["float32 default"]
    print(f"\none {shape[0]}x{shape[1]} matrix ({n:.3g} elements), Adafactor in storage formats")
    print("| format | ms | ns/element | float32 hwoptim / this | torch fp32 / this | "
          "state B/element |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, t in m.items():
        st = (sum(v.nbytes for v in opts[k].state[0].values()) / n) if k in opts else None
        tt = m.get("torch float32 (for-loop)")
        print(f"| {k} | {t * 1e3:.2f} | {t / n * 1e9:.3f} | {base / t:.2f} | "
              f"{'—' if tt is None else f'{tt / t:.2f}'} | "
              f"{'—' if st is None else f'{st:.4f}'} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--sizes", default="1e7,5e7")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--formats", action="store_true",
                    help="also one matrix in each storage format (16-bit params, bfloat16 "
                         "and int8 factors, master weights, stochastic rounding)")
    args = ap.parse_args(argv)
    torch = None if args.no_torch else torch_on_our_threads()
    if args.formats:
        for total in (int(float(s)) for s in args.sizes.split(",")):
            formats_table(total, args.rounds, torch)
        return 0
    dtype = np.dtype(args.dtype)
    print(f"threads {hwoptim.get_num_threads()}, Adafactor {dtype}, medians of {args.rounds} "
          f"interleaved rounds")
    print("| params | elements | hwoptim ms | floor ms | floor/hwoptim | torch for-loop ms "
          "| torch foreach ms | torch best/hwoptim | state B/element (Adam: "
          f"{2 * dtype.itemsize}) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for total in (int(float(s)) for s in args.sizes.split(",")):
        side = int(round(np.sqrt(total / 1.5)))
        for name, shapes in (("200-array model", model_shapes(total)),
                             (f"one {side}x{int(1.5 * side)} matrix", [(side, int(1.5 * side))])):
            n, m, state = case(shapes, args.rounds, dtype, torch)
            tl, tf = m.get("torch foreach=False"), m.get("torch foreach=True")
            best = min(t for t in (tl, tf) if t is not None) if torch is not None else None
            ratio = "—" if best is None else f"{best / m['hwoptim']:.2f}"
            print(f"| {name} | {n:.3g} | {m['hwoptim'] * 1e3:.2f} | {m['floor'] * 1e3:.2f} | "
                  f"{m['floor'] / m['hwoptim']:.2f} | "
                  f"{'—' if tl is None else f'{tl * 1e3:.1f}'} | "
                  f"{'—' if tf is None else f'{tf * 1e3:.1f}'} | "
                  f"{ratio} | "
                  f"{state / n:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
