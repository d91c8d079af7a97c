"""Steps on busy cores (``hwoptim.bench.contention``; ``hwoptim bench --contention`` writes
the same as a report): Adam float32 at the default thread count against one thread, with
none, one or every core kept busy by ``while True: pass`` child processes.

    pytest bench/test_bench_contention.py --benchmark-only
    HWOPTIM_BENCH_SMOKE=1 pytest bench/test_bench_contention.py --benchmark-only

pytest-benchmark times the default step; ``extra_info`` and the table at the end get the
ratio of medians default / one thread from interleaved rounds (target: at most 1.5).
``HWOPTIM_BENCH_CONTENTION_SIZES`` sets the sizes (default 1e4,1e5,1e6,1e7; smoke 1e4,1e5).
"""
from __future__ import annotations

import numpy as np
import pytest

from hwoptim.bench import contention
from hwoptim.bench.impls import adam_step
from hwoptim.bench.tables import fmt_n, fmt_t

from conftest import LINES, SMOKE, _env, time_one

SIZES = tuple(int(float(s)) for s in _env(
    "HWOPTIM_BENCH_CONTENTION_SIZES", "1e4,1e5" if SMOKE else "1e4,1e5,1e6,1e7").split(","))
ROUNDS = 5 if SMOKE else 15
SAMPLE_S = 0.005 if SMOKE else 0.02
TITLE = f"hwoptim: default threads / one thread on busy cores (target ≤ {contention.TARGET})"


@pytest.fixture(scope="module", params=list(contention.busy_cases().items()),
                ids=lambda kv: kv[0].replace(" ", "-"))
def busy(request):
    """(case, busy cores), the spinners running for every test of the case."""
    case, cores = request.param
    with contention.Spinners(cores):
        yield case, cores


@pytest.fixture(scope="module")
def steps():
    rng = np.random.default_rng(0)
    made = {}

    def get(n):
        if n not in made:
            made[n] = adam_step(n, rng)
        return made[n]
    return get


@pytest.mark.parametrize("n", SIZES, ids=fmt_n)
def test_default_threads_against_one_thread(benchmark, fixed_threads, busy, steps, n):
    case, cores = busy
    step = steps(n)
    time_one(benchmark, step, seconds=0.05 if SMOKE else 0.3)
    r = contention.row(case, cores, n, contention.default_and_one_thread(step, ROUNDS,
                                                                        SAMPLE_S))
    benchmark.extra_info.update({k: v for k, v in r.items() if k != "samples_s"})
    LINES.setdefault(TITLE, []).append(
        f"{case:16s} n={fmt_n(n):5s} default {fmt_t(r['default_s']):>8s} µs  one thread "
        f"{fmt_t(r['one_thread_s']):>8s} µs  ratio {r['ratio']:.2f}"
        + (" (noisy)" if r["noisy"] else "") + ("" if r["meets_target"] else "  OVER TARGET"))
