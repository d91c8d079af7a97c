"""One rule's step in every storage format (hwoptim.formats), side by side in one run
(``hwoptim.bench.timing.measure``: interleaved rounds, the order rotating, medians).

    hwoptim bench --formats [--rules Adam] [--sizes 1e7,5e7] [--pairs 9] [--no-torch]

For each format: bytes per element the step must move (from the kernel's loads and stores;
int8 state: a byte per element and a float32 absmax per 256), ns per element of hwoptim's
step on one param of N elements, of a floor kernel that moves the same bytes (the same
arrays, element types as stored: each element read, summed as float32 and written back,
no conversion beyond an int/float cast), and of the step's own
arithmetic (the serial kernel on 32768 elements that stay in L2, per core, divided by the
thread count: what the math alone costs with every core busy); and torch's fused float32
Adam (``torch.optim.Adam(fused=True)``) in the same rounds. State bytes per element are
measured from the arrays.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import hwoptim
from hwoptim import codegen, formats
from hwoptim.backends import numba as nb
from hwoptim.bench.timing import measure, torch_on_our_threads

FORMATS = [   # (label, param dtype, options)
    ("fp32", "float32", {}),
    ("bf16 p+g, fp32 state", "bfloat16", {}),
    ("bf16 p+g, bf16 state", "bfloat16", {"state_dtype": "bfloat16"}),
    ("fp32 master, bf16 p+g", "bfloat16", {"master_weights": True}),
    ("bf16 p+g + SR, fp32 state", "bfloat16", {"stochastic_rounding": True}),
    ("bf16 p+g + SR, bf16 state", "bfloat16", {"stochastic_rounding": True,
                                               "state_dtype": "bfloat16"}),
    ("fp16 p+g, fp32 state", "float16", {}),
    ("fp32, int8 state", "float32", {"state_dtype": "int8"}),
    ("bf16 p+g, int8 state", "bfloat16", {"state_dtype": "int8"}),
    ("bf16 p+g + SR, int8 state", "bfloat16", {"stochastic_rounding": True,
                                               "state_dtype": "int8"}),
]


def _byte_floor(n_reads: int, writes: list):
    """A Numba kernel ``f(*reads, *writes)``: every element of ``n_reads`` arrays read and
    summed (float32), the sum stored into the arrays ``writes`` (their positions among the
    reads, or -1 for a write-only array, appended after the reads)."""
    from numba import njit
    ins = [f"r{j}" for j in range(n_reads)]
    outs = [f"w{j}" for j in range(sum(1 for w in writes if w < 0))]
    body = ["        s = " + " + ".join(f"np.float32({r}[i])" for r in ins)]
    k = 0
    for w in writes:
        tgt = ins[w] if w >= 0 else outs[k]
        k += w < 0
        body.append(f"        {tgt}[i] = s")
    src = (f"def f({', '.join(ins + outs)}):\n    for i in prange(r0.shape[0]):\n"
           + "\n".join(body) + "\n")
    env = {"np": np, "prange": __import__("numba").prange}
    exec(src, env)
    return njit(parallel=True, nogil=True)(env["f"])


def bytes_per_element(plan, fmt) -> float:
    size = {a: formats.np_dtype(fmt.storage(a)).itemsize for a in fmt.arrays(plan.arrays)}
    reads = ["master" if (a == "param" and fmt.master) else a for a in plan.reads]
    writes = list(plan.outputs) + (["master"] if fmt.master else [])
    total = sum(size[a] for a in reads) + sum(size[a] for a in writes)
    if fmt.quantized:                       # each state's absmax, read and written
        total += sum(2 * 4 / formats.BLOCK for a in plan.arrays[2:] if a in writes)
    return total


def _views(opt):
    return opt._views[0]


def case(rule, dtype, opts, n, torch):
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(np.float32).astype(formats.np_dtype(dtype))
    g = (rng.standard_normal(n) * 1e-2).astype(np.float32).astype(formats.np_dtype(dtype))
    opt = getattr(hwoptim, rule)([p], **opts)
    opt.step([g])
    fmt = opt.format
    plan = codegen.plan(opt.rule, opt._flags[0])
    names = fmt.arrays(plan.arrays)
    bufs = dict(zip(names, [nb._bits16(a) for a in [_views(opt)[0], g] + _views(opt)[1:]]))
    reads = ["master" if (a == "param" and fmt.master) else a for a in plan.reads]
    writes = list(plan.outputs) + (["master"] if fmt.master else [])
    order = reads + [w for w in writes if w not in reads]
    arrays = [bufs[a] for a in order]        # (absmax: a 256th of the bytes, left out)
    floor = _byte_floor(len(reads), [reads.index(w) if w in reads else -1 for w in writes])
    floor(*arrays)
    fns = {"hwoptim": lambda: opt.step([g]), "floor": lambda: floor(*arrays)}
    return opt, plan, fmt, fns


def arithmetic_ns(rule, dtype, opts) -> float:
    """ns per element of the serial kernel on 32768 elements (in L2), per core / threads."""
    n = 32768
    p = np.ones(n, formats.np_dtype(dtype))
    g = np.full(n, 1e-3, formats.np_dtype(dtype))
    o = getattr(hwoptim, rule)([p], **opts)
    o.step([g])
    f = o._kernels()[0].serial
    arrays = [nb._bits16(a) for a in [o._views[0][0], g] + list(o._views[0][1:])]
    sc = [np.dtype(o.format.compute).type(x) for x in o._prepare[0](o.param_groups[0], 2)]
    f(*arrays, *sc)
    reps, best = 300, np.inf
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            f(*arrays, *sc)
        best = min(best, (time.perf_counter() - t0) / reps / n * 1e9)
    return best / hwoptim.get_num_threads()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rule", default="Adam")
    ap.add_argument("--sizes", default="1e7,5e7")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--no-torch", action="store_true")
    return run(ap.parse_args(argv))


def run(args) -> int:
    """The tables (``args``: rule, sizes, rounds, no_torch)."""
    if not hasattr(hwoptim, args.rule):
        print(f"hwoptim bench --formats: no rule {args.rule!r}", file=sys.stderr)
        return 2
    torch = None if args.no_torch else torch_on_our_threads()
    print(f"threads {hwoptim.get_num_threads()}, {args.rule}, medians of {args.rounds} "
          f"interleaved rounds; ns per element")
    for n in (int(float(s)) for s in args.sizes.split(",")):
        cases, fns = [], {}
        for label, dtype, opts in FORMATS:
            opt, plan, fmt, f = case(args.rule, dtype, opts, n, torch)
            cases.append((label, opt, plan, fmt, dtype, opts))
            fns[label] = f["hwoptim"]
            fns[label + " floor"] = f["floor"]
        if torch is not None and args.rule in ("Adam", "AdamW"):
            tp = torch.randn(n)
            tp.grad = torch.randn(n) * 1e-2
            fused = getattr(torch.optim, args.rule)([tp], fused=True)
            fused.step()
            fns["torch fused fp32"] = fused.step
        times = measure(fns, pairs=args.rounds, sample_s=0.05)
        med = {k: statistics.median(v["samples"]) / n * 1e9 for k, v in times.items()}
        tf = med.get("torch fused fp32")
        print(f"\nN = {n:.3g}" + (f"; torch.optim.{args.rule}(fused=True) float32: "
                                 f"{tf:.3f} ns/element" if tf else ""))
        print("| format | B/element | state B/element | hwoptim ns | floor ns | floor/hwoptim "
              "| arithmetic ns | torch fused fp32 / hwoptim |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, opt, plan, fmt, dtype, opts in cases:
            b = bytes_per_element(plan, fmt)
            state = sum(a.nbytes for a in opt.state[0].values()) / n
            ar = arithmetic_ns(args.rule, dtype, opts)
            ours, fl = med[label], med[label + " floor"]
            print(f"| {label} | {b:.3g} | {state:.3g} | {ours:.3f} | {fl:.3f} | {fl / ours:.2f} | "
                  f"{ar:.3f} | {'—' if not tf else f'{tf / ours:.2f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
