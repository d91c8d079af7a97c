"""Timing on the CPU: interleaved rounds of samples, medians and ratios, records.

A sample is a batch of back-to-back calls; every implementation of a group is sampled once
per round, the order rotating, so slow drifts of the machine hit all of them alike.
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import time

import hwoptim.backends


def torch_on_our_threads():
    """``torch`` with as many threads as hwoptim's kernels use (comparisons side by side),
    or ``None`` where it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    import hwoptim
    torch.set_num_threads(hwoptim.get_num_threads())
    return torch


def sample(fn, reps: int) -> float:
    """Seconds per call of ``fn``, over ``reps`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _calibrate(fn, sample_s: float, warmup: int, max_reps: int) -> dict:
    """First call (timed: compile or cache load), warm-up, and the calls per sample that
    make one sample last about ``sample_s``."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    t = sample(fn, 1)
    if t < sample_s / 10:
        t = sample(fn, max(1, min(max_reps, int(sample_s / 10 / max(t, 1e-9)))))
    reps = max(1, min(max_reps, int(round(sample_s / max(t, 1e-9)))))
    return {"samples": [], "reps": reps, "first_call_s": first}


def measure(fns: dict, pairs: int = 15, sample_s: float = 0.005, warmup: int = 3,
            max_reps: int = 100_000) -> dict:
    """Interleaved timing: ``{impl: {"samples": [s per call, one per round], "reps",
    "first_call_s"}}``.

    Each implementation is called once (its first call: compile or cache load, timed), then
    ``warmup`` more times; then ``reps`` is chosen so the slowest implementation's sample
    lasts about ``sample_s``, the same for all (so each sample leaves the caches the same
    way: a faster implementation with more calls per sample would find its arrays in cache
    more often); then ``pairs`` rounds each take one sample of every implementation, the
    order rotating by one per round. The garbage collector is off while sampling."""
    names = list(fns)
    out = {name: _calibrate(fns[name], sample_s, warmup, max_reps) for name in names}
    common = min(v["reps"] for v in out.values())
    for v in out.values():
        v["reps"] = common
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(pairs):
            for j in range(len(names)):
                name = names[(j + r) % len(names)]
                out[name]["samples"].append(sample(fns[name], out[name]["reps"]))
    finally:
        if enabled:
            gc.enable()
    return out


# A figure is flagged noisy (and the report says so) when a time's interquartile range is
# above NOISY_SPREAD of its median, or when the median of per-round ratios and the ratio of
# the medians disagree by more than NOISY_DISAGREE: both happen when another process shares
# the cores during the run, and then no single ratio describes the run.
NOISY_SPREAD = 0.10
NOISY_DISAGREE = 0.10


def quartiles(samples) -> tuple:
    """(first quartile, median, third quartile) of ``samples``."""
    xs = sorted(samples)
    if len(xs) < 2:
        return (xs[0],) * 3
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, med, q3


def spread(samples) -> float:
    """Interquartile range over median."""
    q1, med, q3 = quartiles(samples)
    return (q3 - q1) / med if med > 0 else 0.0


def paired_ratio(num: list, den: list) -> float:
    """Median over rounds of ``num[r] / den[r]``."""
    return float(statistics.median(a / b for a, b in zip(num, den)))


def compare(num: list, den: list) -> dict:
    """``num``'s time over ``den``'s (> 1: ``den`` is faster) as the ratio of their medians
    (what a report prints beside those medians), the median of per-round ratios, and
    whether the figure is noisy (either spread, or the two ratios disagreeing)."""
    ratio = statistics.median(num) / statistics.median(den)
    paired = paired_ratio(num, den)
    noisy = (spread(num) > NOISY_SPREAD or spread(den) > NOISY_SPREAD
             or abs(paired / ratio - 1) > NOISY_DISAGREE)
    return {"ratio": float(ratio), "paired": paired, "noisy": bool(noisy)}


_BACKENDS_DIR = os.path.dirname(os.path.abspath(hwoptim.backends.__file__))
# the modules the Numba backend generates its kernels in are named so
_KERNEL_MODULE_PREFIX = "hwoptim_kernel"


def _is_launch_frame(frame) -> bool:
    return frame.f_code.co_name in ("run", "unchecked") and \
        os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _BACKENDS_DIR


def count_launches(fn) -> int:
    """How many backend kernel launches one call of ``fn`` makes: calls of a backend's
    ``run`` or ``unchecked`` (in hwoptim/backends), and direct calls of a compiled kernel's
    entry point (what a step makes on its fast path), each launch counted once."""
    count, inside = 0, 0

    def prof(frame, event, arg):
        nonlocal count, inside
        if event in ("call", "return") and _is_launch_frame(frame):
            if event == "call":
                count += inside == 0
                inside += 1
            else:
                inside -= 1
        elif event == "c_call" and inside == 0 and str(
                getattr(arg, "__module__", None)).startswith(_KERNEL_MODULE_PREFIX):
            count += 1

    old = sys.getprofile()
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(old)
    return count


def records_from(timings: dict, *, device: str, rule: str, options: str, dtype: str, n: int,
                 nbytes: int, extra: dict | None = None) -> list:
    """Report records for one group of interleaved timings.

    ``time_s`` is the median, ``time_q1_s`` and ``time_q3_s`` the quartiles; the ratios
    (``frac_floor``: the floor's time over this one's, ``vs_torch``: torch's fastest
    variant's, ``vs_numpy``: the numpy backend's) are ratios of the medians, with the
    median of per-round ratios beside each (``*_paired``). ``noisy`` lists the figures
    flagged by :func:`compare` (and ``time_s`` where its own spread is too wide)."""
    med = {k: float(statistics.median(v["samples"])) for k, v in timings.items()}
    torch_impls = [k for k in timings if k.startswith("torch-")]
    best_torch = min(torch_impls, key=med.get) if torch_impls else None
    others = {"frac_floor": "floor", "vs_torch": best_torch, "vs_numpy": "hwoptim-numpy"}
    out = []
    for impl, t in timings.items():
        s = t["samples"]
        q1, _, q3 = quartiles(s)
        rec = {"device": device, "rule": rule, "options": options, "impl": impl,
               "dtype": dtype, "n": int(n), "time_s": med[impl], "time_q1_s": q1,
               "time_q3_s": q3, "bytes": int(nbytes), "gbps": nbytes / med[impl] / 1e9,
               "torch_best": best_torch, "noisy": []}
        if spread(s) > NOISY_SPREAD:
            rec["noisy"].append("time_s")
        for key, other in others.items():
            rec[key] = rec[key + "_paired"] = None
            if other in timings:
                c = compare(timings[other]["samples"], s)
                rec[key], rec[key + "_paired"] = c["ratio"], c["paired"]
                if c["noisy"]:
                    rec["noisy"].append(key)
        rec.update({"pairs": len(s), "reps": t["reps"], "first_call_s": t["first_call_s"],
                    "samples_s": s})
        rec.update(extra or {})
        out.append(rec)
    return out
