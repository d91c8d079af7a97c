"""Steps between other thread pools' work: ``hwoptim bench --interleaved``.

A training loop alternates an optimizer step with work from other libraries' thread pools:
BLAS matrix products in NumPy (OpenBLAS), or torch's CPU operations (its OpenMP pool). Each
pool's threads may still be spinning, or asleep, when the other one starts. For Adam,
float32, at each size, three things are sampled in interleaved rounds: the other work
alone, the step alone, and the two one after the other; the figure is the time of the pair
over the sum of the two alone (ratios of medians). Target: at most 1.2.

The other work: a square matrix product sized so that it takes about as long as the step,
and a small MLP-like forward pass (128 x 512 inputs, 512 x 512 and 512 x 128 weights).
"""
from __future__ import annotations

import ctypes
import os
import statistics
import time

import numpy as np

import hwoptim

from .impls import adam_step
from .tables import fmt_n, fmt_t, table
from .timing import NOISY_DISAGREE, NOISY_SPREAD, measure, paired_ratio, quartiles, spread

TARGET = 1.2
SIZES = (100_000, 10_000_000)
MATMUL_SIZES = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
MLP = (128, 512, 512, 128)        # batch, inputs, hidden, outputs
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER")


# ----------------------------------------------------------------------------- the pools

def _openblas_threads():
    """(OpenBLAS's configuration, its thread count) from the library NumPy loaded, else
    (None, None). Linux only: the library is found in /proc/self/maps."""
    try:
        with open("/proc/self/maps") as f:
            libs = {ln.split()[-1] for ln in f if "openblas" in ln.lower()}
    except OSError:
        return None, None
    for path in sorted(libs):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"),
                               ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            if get is None:
                continue
            conf = getattr(lib, f"{prefix}_get_config{suffix}", None)
            if conf is not None:
                conf.restype = ctypes.c_char_p
            return (conf().decode() if conf else path), int(get())
    return None, None


def pools_info(torch=None) -> dict:
    """The thread pools in this process: NumPy's BLAS, torch's, hwoptim's, and the
    environment variables that size them."""
    blas = {}
    try:
        blas = dict(np.show_config(mode="dicts")["Build Dependencies"]["blas"])
        blas = {k: blas.get(k) for k in ("name", "version")}
    except Exception:
        pass
    blas["config"], blas["threads"] = _openblas_threads()
    info = {"numpy_blas": blas, "hwoptim": {"threads": hwoptim.get_num_threads(),
                                            "threading": hwoptim.threading_layer()},
            "env": {k: os.environ.get(k) for k in THREAD_ENV}}
    if torch is not None:
        info["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                         "interop_threads": torch.get_num_interop_threads()}
        try:
            par = torch.__config__.parallel_info()
            info["torch"]["parallel_backend"] = next(
                (ln.split(":", 1)[1].strip() for ln in par.splitlines()
                 if ln.startswith("ATen parallel backend")), None)
        except Exception:
            pass
    return info


def numpy_matmul(m: int, rng):
    a, b = (rng.standard_normal((m, m), dtype=np.float32) for _ in range(2))
    c = np.empty((m, m), np.float32)
    return lambda: np.matmul(a, b, out=c)


def numpy_mlp(rng):
    batch, n_in, hidden, n_out = MLP
    x = rng.standard_normal((batch, n_in), dtype=np.float32)
    w1 = rng.standard_normal((n_in, hidden), dtype=np.float32) / np.sqrt(n_in)
    w2 = rng.standard_normal((hidden, n_out), dtype=np.float32) / np.sqrt(hidden)
    h = np.empty((batch, hidden), np.float32)
    y = np.empty((batch, n_out), np.float32)

    def forward():
        np.matmul(x, w1, out=h)
        np.maximum(h, 0, out=h)
        np.matmul(h, w2, out=y)
    return forward


def torch_matmul(torch, m: int):
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(m, m, generator=gen) for _ in range(2))
    c = torch.empty(m, m)
    return lambda: torch.matmul(a, b, out=c)


def torch_mlp(torch):
    batch, n_in, hidden, n_out = MLP
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n_in, generator=gen)
    w1 = torch.randn(n_in, hidden, generator=gen) / n_in ** 0.5
    w2 = torch.randn(hidden, n_out, generator=gen) / hidden ** 0.5
    h = torch.empty(batch, hidden)
    y = torch.empty(batch, n_out)

    def forward():
        torch.matmul(x, w1, out=h)
        torch.relu_(h)
        torch.matmul(h, w2, out=y)
    return forward


def median_call(fn, calls: int = 5) -> float:
    """Median seconds of ``calls`` calls of ``fn``, after one."""
    fn()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def matched_size(make, target_s: float, sizes=MATMUL_SIZES) -> tuple:
    """(m, seconds): the matrix size whose product ``make(m)()`` takes closest to
    ``target_s`` (on a log scale), trying sizes upwards until one takes twice as long."""
    best = None
    for m in sizes:
        t = median_call(make(m))
        if best is None or abs(np.log(t / target_s)) < abs(np.log(best[1] / target_s)):
            best = (m, t)
        if t > 2 * target_s:
            break
    return best


# ----------------------------------------------------------------------------- measuring

def work_step_pair(work, step, rounds: int, sample_s: float) -> dict:
    """Interleaved samples of ``work`` alone, ``step`` alone and the two in turn, and the
    pair's time over the sum of the two alone (ratio of medians, and per round)."""
    def both():
        work()
        step()
    t = measure({"work": work, "step": step, "together": both}, rounds, sample_s)
    s = {k: v["samples"] for k, v in t.items()}
    med = {k: statistics.median(v) for k, v in s.items()}
    ratio = med["together"] / (med["work"] + med["step"])
    paired = paired_ratio(s["together"], [a + b for a, b in zip(s["work"], s["step"])])
    noisy = (any(spread(v) > NOISY_SPREAD for v in s.values())
             or abs(paired / ratio - 1) > NOISY_DISAGREE)
    q = {k: quartiles(v) for k, v in s.items()}
    return {"work_s": med["work"], "step_s": med["step"], "together_s": med["together"],
            "quartiles_s": q, "ratio": ratio, "ratio_paired": paired, "noisy": bool(noisy),
            "meets_target": ratio <= TARGET, "reps": t["work"]["reps"], "samples_s": s}


def other_work(torch, rng) -> dict:
    """{name: (make(m) for a square product, or None; a fixed piece of work, or None)}."""
    out = {"numpy matmul": (lambda m: numpy_matmul(m, rng), None),
           "numpy MLP": (None, numpy_mlp(rng))}
    if torch is not None:
        out["torch matmul"] = (lambda m: torch_matmul(torch, m), None)
        out["torch MLP"] = (None, torch_mlp(torch))
    return out


def run(sizes=SIZES, rounds: int = 15, sample_s: float = 0.02, torch=None,
        progress=None) -> dict:
    """Every pool x size; see the module docstring. ``torch``: the module, or None."""
    say = progress or (lambda msg: None)
    rng = np.random.default_rng(0)
    result = {"section": "interleaved", "rule": "Adam", "dtype": "float32",
              "pools": pools_info(torch), "rounds": rounds, "sample_s": sample_s,
              "target": TARGET, "mlp": dict(zip(("batch", "inputs", "hidden", "outputs"), MLP)),
              "rows": []}
    t0 = time.perf_counter()
    for n in sizes:
        step = adam_step(n, rng)
        step_s = median_call(step)
        for name, (make, fixed) in other_work(torch, rng).items():
            say(f"interleaved: {name}, n={fmt_n(n)}")
            if make is not None:
                m, _ = matched_size(make, step_s)
                work, what = make(m), f"{m}×{m} @ {m}×{m}"
            else:
                work, what = fixed, "MLP {}×{} → {} → {}".format(*MLP)
            r = work_step_pair(work, step, rounds, sample_s)
            result["rows"].append({"pool": name, "work": what, "n": int(n), **r})
    result["seconds"] = time.perf_counter() - t0
    # read again: a pool may have started its threads during the run
    result["pools"] = pools_info(torch)
    return result


# ----------------------------------------------------------------------------- output

HEAD = ["other work", "n", "work µs", "step µs", "pair µs", "pair / (work + step)",
        f"≤ {TARGET}"]


def rows(result) -> list:
    out = []
    for r in result["rows"]:
        q = r["quartiles_s"]
        cell = lambda k: f"{fmt_t(q[k][1])} [{fmt_t(q[k][0])}–{fmt_t(q[k][2])}]"  # noqa: E731
        out.append([f"{r['pool']}: {r['work']}", fmt_n(r["n"]), cell("work"), cell("step"),
                    cell("together"),
                    f"{r['ratio']:.2f}×" + (" (noisy)" if r["noisy"] else ""),
                    "yes" if r["meets_target"] else "**no**"])
    return out


def _pools_line(p) -> str:
    b = p.get("numpy_blas", {})
    h = p.get("hwoptim", {})
    line = (f"NumPy BLAS {b.get('name')} {b.get('version') or ''} ({b.get('threads') or '?'} "
            f"threads); hwoptim {h.get('threading', {}).get('layer')} layer, "
            f"{h.get('threads')} threads")
    t = p.get("torch")
    if t:
        line += (f"; torch {t['version']} ({t['threads']} threads, "
                 f"{t.get('parallel_backend') or '?'})")
    env = {k: v for k, v in p.get("env", {}).items() if v}
    if env:
        line += "; " + ", ".join(f"{k}={v}" for k, v in env.items())
    return line


def summary_text(result) -> str:
    return (f"Adam float32 steps between other pools' work; {_pools_line(result['pools'])}; "
            f"{result['rounds']} interleaved rounds\n" + table(HEAD, rows(result)))


def markdown(result, info: dict) -> str:
    lines = [f"# hwoptim bench --interleaved: {info['cpu_model']}", "",
             f"{result.get('created', '')} · {result['seconds']:.0f} s", "",
             f"- {info['cpu_model']}, {info['cpu_count']} logical CPUs "
             f"({info['cpus_usable']} usable)",
             f"- {_pools_line(result['pools'])}", "",
             "Adam, float32, through `opt.step(g)`, alternating with other libraries' "
             "work: a square matrix product sized to take about as long as the step, or a "
             "small MLP-like forward pass. Each time is the median [interquartile range] of "
             f"{result['rounds']} interleaved rounds of the work alone, the step alone and "
             "the two in turn; the ratio is the pair's median over the sum of the two "
             f"medians alone (> 1: switching pools costs time). Target: ≤ {TARGET}. "
             f"(noisy): an interquartile range over {NOISY_SPREAD:.0%} of its median, or "
             "the per-round ratios disagreeing with the ratio of the medians.", "",
             table(HEAD, rows(result)), ""]
    if "torch" not in result["pools"]:
        lines += ["torch is not installed (or --no-torch): its rows are left out.", ""]
    return "\n".join(lines)
