"""Per-rule CPU benchmarks: every rule (default options and the heaviest) x implementation
x dtype x size on the same data; plus where the serial kernel beats the parallel one,
what a step allocates, how fast a new process takes its first step, and cold compile
times. See conftest.py for the knobs; bench/NOTES.md for results."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import tracemalloc

import numpy as np
import pytest

from hwoptim import bench as hb
from hwoptim.bench.tables import fmt_n

from conftest import (CASES, DTYPES, NUMPY_MAX, SIZES, SMOKE, host_backends, impl_names,
                      record, time_paired, torch_or_none)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _group_label(case, dtype, n):
    return f"{case.label} {dtype} n={fmt_n(n)}"


PARAMS = [pytest.param(c, d, n, impl, id=f"{c.label}-{d}-{fmt_n(n)}-{impl}")
          for c in CASES for d in DTYPES for n in SIZES for impl in impl_names()]


@pytest.mark.parametrize("case,dtype,n,impl", PARAMS)
def test_step(benchmark, groups, results, fixed_threads, case, dtype, n, impl):
    """One implementation's step, interleaved with the floor (setup of every round)."""
    plan = hb.plan_of(case)
    torch = torch_or_none()
    variants = hb.TORCH_VARIANTS if torch is not None else ()
    if impl.startswith("torch-") and torch is None:
        pytest.skip("torch not installed")
    need = hb.group_bytes(plan, dtype, n, 1 + len(host_backends()) + len(variants),
                              "numpy" in host_backends() and n <= NUMPY_MAX)
    avail = hb.mem_available()
    if avail is not None and need > 0.8 * avail:
        pytest.skip(f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available")
    fns, skipped = groups.get((case, dtype, n), lambda: hb.build(
        case, dtype, n, host_backends(), variants, groups.rng, NUMPY_MAX))
    if impl not in fns:
        pytest.skip(skipped.get(impl, "not built"))
    med, ratios = time_paired(benchmark, fns, impl)
    torch_r = [v for k, v in ratios.items() if k.startswith("torch-")]
    nbytes = hb.bytes_moved(plan, dtype, n)
    record(benchmark, results, group=_group_label(case, dtype, n), impl=impl,
           rule=case.rule, options=case.options, dtype=dtype, n=n, time_s=med,
           bytes=nbytes, gbps=nbytes / med / 1e9,
           frac_floor=1.0 if impl == "floor" else ratios.get("floor"),
           vs_torch=min(torch_r) if torch_r else None, ratios=ratios,
           threads=fixed_threads)


# ----------------------------------------------------------------------------- serial or parallel

GRID = [int(1000 * 2 ** (i / 2)) for i in range(15)]        # 1e3 ... 1.3e5


@pytest.mark.parametrize("case,dtype", [pytest.param(c, d, id=f"{c.label}-{d}")
                                        for c in CASES for d in DTYPES])
def test_serial_parallel_crossover(benchmark, results, fixed_threads, case, dtype):
    """Serial and parallel kernels at sizes around the crossover (15 interleaved pairs
    each): where parallel starts to win, the threshold the backend uses, and what that
    threshold costs at the worst grid size. Benchmarks the step at the threshold."""
    from hwoptim import backends
    if backends.unavailable("numba"):
        pytest.skip(backends.unavailable("numba"))
    nb = backends.load("numba")
    plan = hb.plan_of(case)
    k = nb.kernel(plan, dtype)
    scalars = k.prepare(hb.hypers_of(case), 3)
    rows = []
    for n in GRID:
        arrays = [np.full(n, 1e-3, dtype) for _ in plan.arrays]
        fs = {"serial": lambda a=arrays: k.serial(*a, *scalars),
              "parallel": lambda a=arrays: k.parallel(*a, *scalars)}
        t = hb.measure(fs, pairs=15, sample_s=0.001 if not SMOKE else 0.0003)
        rows.append((n, statistics.median(t["serial"]["samples"]),
                     statistics.median(t["parallel"]["samples"])))
    crossover = next((n for i, (n, s, p) in enumerate(rows)
                      if all(p2 < s2 for _, s2, p2 in rows[i:])), None)
    thr = k.serial_below()
    worst = max((s if n < thr else p) / min(s, p) for n, s, p in rows)
    n_at = int(min(max(thr, GRID[0]), GRID[-1]))
    arrays = [np.full(n_at, 1e-3, dtype) for _ in plan.arrays]
    benchmark.pedantic(lambda: k(arrays, scalars), rounds=200, iterations=1, warmup_rounds=5)
    benchmark.extra_info.update(
        crossover=crossover, threshold=thr if math.isfinite(thr) else None,
        worst_loss=worst, threads=fixed_threads,
        grid_us=[(n, round(s * 1e6, 2), round(p * 1e6, 2)) for n, s, p in rows])
    print(f"\n{case.label} {dtype}: parallel wins from ~{crossover}, threshold "
          f"{thr:.0f}, worst loss {worst:.2f}x; "
          + " ".join(f"{n}:{s * 1e6:.1f}/{p * 1e6:.1f}" for n, s, p in rows))


# ----------------------------------------------------------------------------- allocation

@pytest.mark.parametrize("case", [pytest.param(c, id=c.label) for c in CASES])
def test_step_allocations(benchmark, case):
    """What a step allocates after warm-up, traced by tracemalloc, at a serial size, a
    parallel size and a large size: the largest transient peak of one step, the memory
    left per step before and after a garbage collection. None may grow with n.

    (tracemalloc sees Python's allocators: NumPy's array data, Python objects. Numba's
    runtime and the OpenMP pool allocate with C malloc, outside its view.)"""
    import gc
    sizes = [1_000, 100_000, 1_000_000] if not SMOKE else [1_000, 100_000]
    import hwoptim
    out = {}
    for n in sizes:
        w = np.full(n, 0.5, np.float32)
        g = np.full(n, 1e-3, np.float32)
        opt = getattr(hwoptim, case.rule)(w, **case.kwargs)
        for _ in range(5):
            opt.step(g)
        steps = 200
        gc.collect()
        tracemalloc.start()
        start, _ = tracemalloc.get_traced_memory()
        worst = 0
        for _ in range(steps):
            c0, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            opt.step(g)
            _, pk = tracemalloc.get_traced_memory()
            worst = max(worst, pk - c0)
        left, _ = tracemalloc.get_traced_memory()
        gc.collect()
        after_gc, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[n] = {"step_peak_bytes": worst,
                  "left_per_step_bytes": (left - start) / steps,
                  "left_per_step_after_gc_bytes": (after_gc - start) / steps}
    benchmark.extra_info["tracemalloc"] = out
    benchmark.pedantic(lambda: opt.step(g), rounds=50, iterations=1)
    print(f"\n{case.label} float32: " + json.dumps(out))
    assert max(v["step_peak_bytes"] for v in out.values()) < min(sizes) * 4, out
    assert all(abs(v["left_per_step_after_gc_bytes"]) < 8 for v in out.values()), out


# ----------------------------------------------------------------------------- new processes

FIRST_STEP = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import hwoptim
t1 = time.perf_counter()
w = np.full({n}, 0.5, np.float32); g = np.full({n}, 1e-3, np.float32)
t2 = time.perf_counter()
opt = hwoptim.{rule}(w)
opt.step(g)
t3 = time.perf_counter()
opt.step(g)
t4 = time.perf_counter()
print(json.dumps(dict(import_s=t1 - t0, first_step_s=t3 - t2, second_step_s=t4 - t3,
                      numba_loaded="numba" in sys.modules)))
"""


def _run_child(code, env):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(SMOKE, reason="starts new processes (HWOPTIM_BENCH_SMOKE=1)")
@pytest.mark.parametrize("n", [10_000, 10_000_000])
def test_first_step_new_process(benchmark, n):
    """A new process with a warm disk cache: seconds from ``import hwoptim`` returning to
    the end of the first ``Adam.step`` (array creation excluded). Target: < 0.5 s."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = FIRST_STEP.format(n=n, rule="Adam")
    _run_child(code, env)                                   # warm the cache
    runs = []
    benchmark.pedantic(lambda: runs.append(_run_child(code, env)), rounds=5, iterations=1)
    first = statistics.median(r["first_step_s"] for r in runs)
    benchmark.extra_info.update(first_step_s=first, runs=runs)
    print(f"\nn={n}: import {statistics.median(r['import_s'] for r in runs):.3f} s, "
          f"first step {first:.3f} s after import")


COLD = r"""
import json, time
import numpy as np
import hwoptim
from hwoptim import bench as hb
out = {{}}
t = time.perf_counter()
import numba
numba.njit(lambda x: x + 1)(1)              # Numba's own start-up, paid once per process
out["numba_start_s"] = time.perf_counter() - t
case = hb.Case({rule!r}, {options!r}, {kwargs!r})
for n, what in ((100, "serial"), (1_000_000, "parallel")):
    w = np.full(n, 0.5, {dtype!r}); g = np.full(n, 1e-3, {dtype!r})
    opt = getattr(hwoptim, case.rule)(w, **case.kwargs)
    t = time.perf_counter(); opt.step(g); first = time.perf_counter() - t
    t = time.perf_counter(); opt.step(g); warm = time.perf_counter() - t
    out[what + "_compile_s"] = first - warm      # this size's kernel, cold cache
k, _ = hb.floor_kernel(hb.plan_of(case), {dtype!r})
a = [np.zeros(1_000_000, {dtype!r}) for _ in hb.plan_of(case).arrays]
t = time.perf_counter(); k(a, ()); first = time.perf_counter() - t
t = time.perf_counter(); k(a, ()); out["floor_parallel_compile_s"] = first - (time.perf_counter() - t)
print(json.dumps(out))
"""


@pytest.mark.skipif(SMOKE, reason="starts new processes (HWOPTIM_BENCH_SMOKE=1)")
@pytest.mark.parametrize("case,dtype", [pytest.param(c, d, id=f"{c.label}-{d}")
                                        for c in CASES for d in DTYPES])
def test_cold_compile(benchmark, case, dtype):
    """Compile time with an empty kernel cache, in a new process, after Numba's own
    start-up (timed apart): the first step at a serial size, then at a parallel size (each
    compiles its kernel), then the floor's parallel kernel; each less a warm call."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HWOPTIM_CACHE_DIR=tmp,
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        code = COLD.format(rule=case.rule, options=case.options, kwargs=case.kwargs,
                           dtype=dtype)
        benchmark.pedantic(lambda: runs.append(_run_child(code, env)), rounds=1,
                           iterations=1)
    benchmark.extra_info.update(runs[0])
    print(f"\n{case.label} {dtype} cold: " + json.dumps(runs[0]))
