"""Steps between other thread pools' work (``hwoptim.bench.interleaved``; ``hwoptim bench
--interleaved`` writes the same as a report): Adam float32 alternating with NumPy (OpenBLAS)
or torch CPU matrix products, against the two measured apart in the same run.

    pytest bench/test_bench_interleaved.py --benchmark-only
    HWOPTIM_BENCH_SMOKE=1 pytest bench/test_bench_interleaved.py --benchmark-only

pytest-benchmark times the pair (work, then step); ``extra_info`` and the table at the end
get the pair's median over the sum of the two medians apart (target: at most 1.2).
``HWOPTIM_BENCH_INTERLEAVED_SIZES`` sets the sizes (default 1e5,1e7; smoke 1e5).
"""
from __future__ import annotations

import numpy as np
import pytest

from hwoptim.bench import interleaved
from hwoptim.bench.impls import adam_step
from hwoptim.bench.tables import fmt_n, fmt_t

from conftest import LINES, SMOKE, _env, time_one, torch_or_none

SIZES = tuple(int(float(s)) for s in _env(
    "HWOPTIM_BENCH_INTERLEAVED_SIZES", "1e5" if SMOKE else "1e5,1e7").split(","))
ROUNDS = 5 if SMOKE else 15
SAMPLE_S = 0.005 if SMOKE else 0.02
POOLS = ("numpy matmul", "numpy MLP", "torch matmul", "torch MLP")
TITLE = (f"hwoptim: steps between other pools' work, pair / (work + step) "
         f"(target ≤ {interleaved.TARGET})")


@pytest.mark.parametrize("n", SIZES, ids=fmt_n)
@pytest.mark.parametrize("pool", POOLS, ids=lambda p: p.replace(" ", "-"))
def test_step_between_other_work(benchmark, fixed_threads, pool, n):
    torch = torch_or_none()
    if pool.startswith("torch") and torch is None:
        pytest.skip("torch not installed")
    rng = np.random.default_rng(0)
    step = adam_step(n, rng)
    make, fixed = interleaved.other_work(torch, rng)[pool]
    if make is not None:
        m, _ = interleaved.matched_size(make, interleaved.median_call(step))
        work, what = make(m), f"{m}x{m} matmul"
    else:
        work, what = fixed, "MLP"

    def both():
        work()
        step()
    time_one(benchmark, both, seconds=0.05 if SMOKE else 0.3)
    r = interleaved.work_step_pair(work, step, ROUNDS, SAMPLE_S)
    benchmark.extra_info.update({"pool": pool, "work": what, "n": n,
                                 **{k: v for k, v in r.items()
                                    if k not in ("samples_s", "quartiles_s")}})
    LINES.setdefault(TITLE, []).append(
        f"{pool + ' (' + what + ')':32s} n={fmt_n(n):5s} work {fmt_t(r['work_s']):>8s} µs  "
        f"step {fmt_t(r['step_s']):>8s} µs  pair {fmt_t(r['together_s']):>8s} µs  ratio "
        f"{r['ratio']:.2f}" + (" (noisy)" if r["noisy"] else "")
        + ("" if r["meets_target"] else "  OVER TARGET"))
