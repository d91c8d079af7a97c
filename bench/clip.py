"""Issue 11's target for ``max_grad_norm``: a 200-array model's step with global-norm clipping
against the same model's plain step plus one read of its grads, side by side in one run
(interleaved rounds, the order rotating, medians). Also ``skip_nonfinite``, and torch's
``clip_grad_norm_`` + fused Adam over the same arrays as the outside yardstick; and loss
scaling (issue 10): the step with ``grad_scale`` (the kernels' grad factor) against the plain
step, and torch's fused Adam given a scale and ``found_inf`` as GradScaler hands them.

    python bench/clip.py [--rounds 21] [--sizes 1e6,5e7]

"read" is one streaming read of the grads' bytes (a vectorised Numba parallel sum over one
buffer holding them: the bandwidth floor of the clip's extra pass); the target is ``(plain + read) / clipped >= 0.85``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import hwoptim
from hwoptim.bench.workload import model_shapes


def _reader():
    """A parallel, vectorised read of one flat array (fastmath sum): the streaming-read
    floor of the grads' bytes."""
    from numba import njit, prange

    @njit(parallel=True, nogil=True, fastmath=True)
    def read(a):
        s = np.float32(0.0)
        for i in prange(a.shape[0]):
            s += a[i]
        return s
    return read


def case(total, rounds, torch):
    shapes = model_shapes(total)
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    n = sum(p.size for p in params)
    plain = hwoptim.Adam([p.copy() for p in params])
    clip = hwoptim.Adam([p.copy() for p in params], max_grad_norm=1.0)
    skip = hwoptim.Adam([p.copy() for p in params], skip_nonfinite=True)
    scaled = hwoptim.Adam([p.copy() for p in params])
    read = _reader()
    flat = np.concatenate([g.reshape(-1) for g in grads])    # the grads' bytes, one buffer
    fns = {
        "plain": lambda: plain.step(grads),
        "max_grad_norm": lambda: clip.step(grads),
        "skip_nonfinite": lambda: skip.step(grads),
        "grad_scale": lambda: scaled.step(grads, grad_scale=1024.0),
        "read": lambda: read(flat),
    }
    if torch is not None:
        tp = [torch.from_numpy(p.copy()) for p in params]
        for t, g in zip(tp, grads):
            t.grad = torch.from_numpy(g.copy())
        topt = torch.optim.Adam(tp, fused=True)

        def torch_clip():
            torch.nn.utils.clip_grad_norm_(tp, 1.0, foreach=True)
            topt.step()
        fns["torch clip+fused"] = torch_clip
        sp = [torch.from_numpy(p.copy()) for p in params]
        for t, g in zip(sp, grads):
            t.grad = torch.from_numpy(g.copy())
        sopt = torch.optim.Adam(sp, fused=True)
        scale, found = torch.tensor(1024.0), torch.tensor(0.0)

        def torch_scaled():               # what GradScaler hands a fused optimizer
            sopt.grad_scale, sopt.found_inf = scale, found
            sopt.step()
        fns["torch fused scaled"] = torch_scaled
    for f in fns.values():
        for _ in range(3):
            f()
    reps = max(1, int(2e7 // n))
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):
        for k in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            for _ in range(reps):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return n, len(shapes), med


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--sizes", default="1e6,5e7")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    if args.no_torch:
        torch = None
    print(f"threads {hwoptim.get_num_threads()}, Adam float32, medians of {args.rounds} "
          f"interleaved rounds")
    print("| elements | arrays | plain ms | read ms | max_grad_norm ms | (plain+read)/clip "
          "| skip_nonfinite ms | torch clip+fused ms | grad_scale ms | plain/scaled "
          "| torch fused scaled ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for total in (int(float(s)) for s in args.sizes.split(",")):
        n, k, m = case(total, args.rounds, torch)
        tc, ts = m.get("torch clip+fused"), m.get("torch fused scaled")
        print(f"| {n:.3g} | {k} | {m['plain'] * 1e3:.3f} | {m['read'] * 1e3:.3f} | "
              f"{m['max_grad_norm'] * 1e3:.3f} | "
              f"{(m['plain'] + m['read']) / m['max_grad_norm']:.2f} | "
              f"{m['skip_nonfinite'] * 1e3:.3f} | "
              f"{'—' if tc is None else f'{tc * 1e3:.3f}'} | "
              f"{m['grad_scale'] * 1e3:.3f} | {m['plain'] / m['grad_scale']:.2f} | "
              f"{'—' if ts is None else f'{ts * 1e3:.3f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
