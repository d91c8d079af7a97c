"""The CPU benchmark suite (pytest-benchmark); not part of ``tests/``.

    pytest bench/ --benchmark-only                       # everything (tens of minutes)
    HWOPTIM_BENCH_SMOKE=1 pytest bench/ --benchmark-only # about 1.5 minutes
    pytest bench/ --benchmark-only --benchmark-json=out.json

Every rule (default options and the heaviest) x implementation (hwoptim's host backends
through ``opt.step(g)``, the floor kernel, torch fused / foreach / for-loop) x dtype x
size, on the same data. pytest-benchmark times each implementation; then the test times
it again in 15 interleaved rounds beside the floor (and, for hwoptim, beside every torch
variant), and ``extra_info`` gets effective GB/s (bytes the rule must move / time), the
paired median fraction of the floor ("frac_floor") and speedup over torch's fastest
variant ("vs_torch"). A table of them ends the run.

Environment (each optional):

* ``HWOPTIM_BENCH_SIZES``: element counts, e.g. ``1e3,1e4`` (default 1e3,...,1e7,5e7)
* ``HWOPTIM_BENCH_DTYPES``: ``float32,float64`` (default both)
* ``HWOPTIM_BENCH_RULES``: rule names (default all); ``HWOPTIM_BENCH_OPTIONS``:
  ``default``, ``heavy`` or ``all`` (default)
* ``HWOPTIM_BENCH_MODELS``: ``small,large`` (default), ``small`` or ``none``
* ``HWOPTIM_BENCH_REAL``: real models' tensors (``test_bench_real_models.py``):
  ``cnn-1m,resnet50,gpt2-small`` (default), any of them, or ``none``
* ``HWOPTIM_BENCH_SECONDS``: time budget per test (default 0.4); at least 15 rounds
* ``HWOPTIM_BENCH_THREADS``: threads for Numba and torch (default: Numba's pool)
* ``HWOPTIM_BENCH_NUMPY_MAX``: largest size for the numpy backend (default 1e7)
* ``HWOPTIM_BENCH_SMOKE=1``: defaults become 1e3,1e4 / float32 / Adam,SGD default /
  small model / cnn-1m only / 0.05 s per test, and the subprocess tests (cold compile,
  first step) skip
"""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from hwoptim.bench.workload import cases
from hwoptim.bench.impls import TORCH_VARIANTS, torch_or_why
from hwoptim.bench.timing import measure, paired_ratio, sample

SMOKE = os.environ.get("HWOPTIM_BENCH_SMOKE") == "1"


def _env(name, default):
    v = os.environ.get(name)
    return v if v not in (None, "") else default


SIZES = tuple(int(float(s)) for s in _env(
    "HWOPTIM_BENCH_SIZES", "1e3,1e4" if SMOKE else "1e3,1e4,1e5,1e6,1e7,5e7").split(","))
DTYPES = tuple(_env("HWOPTIM_BENCH_DTYPES", "float32" if SMOKE else "float32,float64")
               .split(","))
RULES = tuple(r for r in _env("HWOPTIM_BENCH_RULES", "Adam,SGD" if SMOKE else "").split(",")
              if r) or None
OPTIONS = _env("HWOPTIM_BENCH_OPTIONS", "default" if SMOKE else "all")
MODELS = tuple(m for m in _env("HWOPTIM_BENCH_MODELS", "small" if SMOKE else "small,large")
               .split(",") if m and m != "none")
SECONDS = float(_env("HWOPTIM_BENCH_SECONDS", "0.05" if SMOKE else "0.4"))
NUMPY_MAX = int(float(_env("HWOPTIM_BENCH_NUMPY_MAX", "1e7")))
MIN_ROUNDS = 15

CASES = cases(RULES, OPTIONS)


def host_backends():
    from hwoptim import backends
    return tuple(b for b in ("numba", "numpy") if backends.unavailable(b) is None)


def torch_or_none():
    torch, _ = torch_or_why()
    return torch


def impl_names():
    return (["floor"] + [f"hwoptim-{b}" for b in host_backends()]
            + [f"torch-{v}" for v in TORCH_VARIANTS])


RESULTS = []          # every timed test's numbers, for the summary at the end
LINES = {}            # {section title: [lines]}: other tests' results, printed at the end


@pytest.fixture(scope="session", autouse=True)
def fixed_threads():
    """Numba and torch use the same thread count for the whole run; torch's pool is set
    first (Numba's OpenMP pool started first makes torch's foreach and for-loop
    optimizers ~25x slower in the same process: see hwoptim.bench.cli.fix_threads)."""
    from hwoptim import threads
    import numba
    n = int(os.environ.get("HWOPTIM_BENCH_THREADS") or numba.config.NUMBA_NUM_THREADS)
    torch = torch_or_none()
    if torch is not None:
        torch.set_num_threads(n)
    threads.set_num_threads(n)
    return threads.get_num_threads()


# ----------------------------------------------------------------------------- groups

class Groups:
    """Builds every implementation of one group (a case, dtype and size, or a model) on the
    same data, and keeps only the current group alive (a group's tests run together)."""

    def __init__(self):
        self.key, self.value = None, None
        self.rng = np.random.default_rng(0)

    def get(self, key, build):
        if key != self.key:
            self.key, self.value = None, None
            gc.collect()
            self.value = build()
            self.key = key
        return self.value


@pytest.fixture(scope="session")
def groups():
    return Groups()


@pytest.fixture(scope="session")
def results():
    return RESULTS


def time_one(benchmark, fn, seconds=None) -> float:
    """Time ``fn`` with pytest-benchmark (calls batched so a round lasts ~1 ms; its
    statistics are per call), for about ``seconds`` (at least 15 rounds); the median."""
    seconds = SECONDS if seconds is None else seconds
    for _ in range(3):
        fn()
    t = sample(fn, 1)
    if t < 1e-4:
        t = sample(fn, max(1, int(1e-4 / max(t, 1e-9))))
    per_round = max(1, int(1e-3 / max(t, 1e-9)))
    rounds = max(MIN_ROUNDS, min(2000, int(seconds / (t * per_round))))
    benchmark.pedantic(fn, rounds=rounds, iterations=per_round, warmup_rounds=1)
    return benchmark.stats.stats.median


def time_paired(benchmark, fns: dict, impl: str, seconds=None, sample_s=None):
    """Time ``fns[impl]`` with pytest-benchmark (calls batched so a round lasts ~1 ms;
    its statistics are per call), then, in one interleaved measurement (15 rounds), the
    implementation beside the floor and, for hwoptim, beside every torch variant.

    Returns (median s per call from pytest-benchmark, {other: paired median of
    t_other / t_impl})."""
    fn = fns[impl]
    med = time_one(benchmark, fn, seconds)
    others = [k for k in fns if k != impl and (k == "floor" or (
        impl.startswith("hwoptim-") and k.startswith("torch-")))]
    ratios = {}
    if others:
        m = measure({impl: fn, **{k: fns[k] for k in others}}, pairs=MIN_ROUNDS,
                    sample_s=sample_s or (0.0005 if SMOKE else 0.002), warmup=1)
        ratios = {k: paired_ratio(m[k]["samples"], m[impl]["samples"]) for k in others}
    return med, ratios


def record(benchmark, results, **kw):
    benchmark.extra_info.update({k: v for k, v in kw.items() if k != "group"})
    results.append(kw)


# ----------------------------------------------------------------------------- summary

def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    for title, lines in LINES.items():
        tr.section(title)
        for line in lines:
            tr.write_line(line)
    rs = RESULTS
    if not rs:
        return
    tr.section("hwoptim: effective bandwidth, fraction of the floor, speedup over torch")
    by = {}
    for r in rs:
        by.setdefault(r["group"], []).append(r)
    head = (f"{'group':40s} {'impl':28s} {'µs':>10s} {'GB/s':>7s} {'×floor':>7s} "
            f"{'×torch':>7s}")
    tr.write_line(head)
    for g, items in by.items():
        for r in items:
            vs = f"{r['vs_torch']:.2f}" if r.get("vs_torch") is not None else "—"
            fr = f"{r['frac_floor']:.2f}" if r.get("frac_floor") is not None else "—"
            tr.write_line(f"{g:40s} {r['impl']:28s} {r['time_s'] * 1e6:10.2f} "
                          f"{r['gbps']:7.1f} {fr:>7s} {vs:>7s}")
    tr.write_line("×floor: t_floor / t; ×torch: t of torch's fastest variant / t; both "
                  "medians of 15 interleaved per-round ratios")
