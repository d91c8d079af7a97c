"""Steps on busy cores: ``hwoptim bench --contention``.

Other processes keep some cores busy (plain ``while True: pass`` children): none, one, or
one per core. A parallel step that waits for a thread the operating system has descheduled
can then take many times longer than the same step on one thread; with a work-stealing
threading layer it should not. For Adam, float32, at each size, the default step (the
default thread count) and the one-thread step (``hwoptim.set_num_threads(1)``, restored
after) are sampled in interleaved rounds; the figure is the ratio of their medians,
default over one thread. Target: at most 1.5 in every case.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

import hwoptim

from .impls import adam_step
from .tables import fmt_n, fmt_t, table
from .timing import NOISY_SPREAD, compare, quartiles, sample

TARGET = 1.5
SIZES = (10_000, 100_000, 1_000_000, 10_000_000)


def busy_cases() -> dict:
    """{case: how many cores other processes keep busy}."""
    return {"quiet": 0, "one core busy": 1, "every core busy": os.cpu_count() or 1}


def _die_with_parent():            # in the child, before exec: killed if the parent dies
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except Exception:
        pass


class Spinners:
    """``n`` child processes spinning on a core each, for the duration of a ``with`` block;
    stopped on the way out, whatever happened (an error, Ctrl-C)."""

    def __init__(self, n: int, settle_s: float = 0.2):
        self.n, self.settle_s, self.procs = n, settle_s, []

    def __enter__(self):
        try:
            for _ in range(self.n):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", "while True: pass"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None))
            if self.n:
                time.sleep(self.settle_s)      # let them reach their loops
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []


def _sample_at(step, reps: int, threads: int | None) -> float:
    """Seconds per step over ``reps`` steps, at ``threads`` threads (None: as set)."""
    if threads is None:
        return sample(step, reps)
    old = hwoptim.get_num_threads()
    hwoptim.set_num_threads(threads)
    try:
        return sample(step, reps)
    finally:
        hwoptim.set_num_threads(old)


def default_and_one_thread(step, rounds: int, sample_s: float, warmup: int = 3) -> dict:
    """Interleaved samples of ``step`` at the default thread count and on one thread:
    ``{"default": [s], "one-thread": [s], "reps": calls per sample}``."""
    modes = {"default": None, "one-thread": 1}
    slowest = 0.0
    for threads in modes.values():
        for _ in range(warmup):
            _sample_at(step, 1, threads)
        slowest = max(slowest, _sample_at(step, 1, threads))
    reps = max(1, int(round(sample_s / max(slowest, 1e-9))))
    out = {m: [] for m in modes}
    names = list(modes)
    for r in range(rounds):
        for j in range(len(names)):
            m = names[(j + r) % len(names)]
            out[m].append(_sample_at(step, reps, modes[m]))
    out["reps"] = reps
    return out


def row(case: str, busy: int, n: int, samples: dict) -> dict:
    """One result row: medians, quartiles, the ratio default / one thread and its flags."""
    c = compare(samples["default"], samples["one-thread"])
    q = {m: quartiles(samples[m]) for m in ("default", "one-thread")}
    return {"case": case, "busy_cores": busy, "n": int(n), "reps": samples["reps"],
            "default_s": q["default"][1], "default_q1_s": q["default"][0],
            "default_q3_s": q["default"][2], "one_thread_s": q["one-thread"][1],
            "one_thread_q1_s": q["one-thread"][0], "one_thread_q3_s": q["one-thread"][2],
            "ratio": c["ratio"], "ratio_paired": c["paired"], "noisy": c["noisy"],
            "meets_target": c["ratio"] <= TARGET,
            "samples_s": {m: samples[m] for m in ("default", "one-thread")}}


def run(sizes=SIZES, rounds: int = 15, sample_s: float = 0.02, cases=None,
        progress=None) -> dict:
    """Every case x size; see the module docstring. ``progress(label)`` is told each step."""
    say = progress or (lambda msg: None)
    cases = cases or busy_cases()
    rng = np.random.default_rng(0)
    steps = {n: adam_step(n, rng) for n in sizes}
    result = {"section": "contention", "rule": "Adam", "dtype": "float32",
              "threading": hwoptim.threading_layer(), "threads": hwoptim.get_num_threads(),
              "cpu_count": os.cpu_count(), "rounds": rounds, "sample_s": sample_s,
              "target": TARGET, "rows": []}
    t0 = time.perf_counter()
    for case, busy in cases.items():
        with Spinners(busy):
            for n in sizes:
                say(f"contention: {case}, n={fmt_n(n)}")
                samples = default_and_one_thread(steps[n], rounds, sample_s)
                result["rows"].append(row(case, busy, n, samples))
    result["seconds"] = time.perf_counter() - t0
    return result


HEAD = ["case", "n", "default µs [IQR]", "one thread µs [IQR]", "default / one thread",
        f"≤ {TARGET}"]


def _us(med, q1, q3) -> str:
    return f"{fmt_t(med)} [{fmt_t(q1)}–{fmt_t(q3)}]"


def rows(result) -> list:
    out = []
    for r in result["rows"]:
        out.append([r["case"], fmt_n(r["n"]),
                    _us(r["default_s"], r["default_q1_s"], r["default_q3_s"]),
                    _us(r["one_thread_s"], r["one_thread_q1_s"], r["one_thread_q3_s"]),
                    f"{r['ratio']:.2f}×" + (" (noisy)" if r["noisy"] else ""),
                    "yes" if r["meets_target"] else "**no**"])
    return out


def summary_text(result) -> str:
    th = result["threading"]
    return (f"Adam float32, default {result['threads']} threads vs 1, numba layer "
            f"{th.get('layer')}; {result['rounds']} interleaved rounds\n"
            + table(HEAD, rows(result)))


def markdown(result, info: dict) -> str:
    th = result["threading"]
    worst = max(result["rows"], key=lambda r: r["ratio"], default=None)
    lines = [f"# hwoptim bench --contention: {info['cpu_model']}", "",
             f"{result.get('created', '')} · {result['seconds']:.0f} s", "",
             f"- {info['cpu_model']}, {info['cpu_count']} logical CPUs "
             f"({info['cpus_usable']} usable)",
             f"- Numba threading layer **{th.get('layer')}** ({th.get('why', '')}); default "
             f"{result['threads']} threads",
             "- Busy cores: `while True: pass` child processes, started before and "
             "stopped after each case.", "",
             "Adam, float32, through `opt.step(g)`. Each time is the median [interquartile "
             f"range] of {result['rounds']} interleaved rounds of the default step and the "
             "one-thread step (`hwoptim.set_num_threads(1)`, restored after each sample). "
             f"The ratio is default over one thread (> 1: the threads cost time). Target: "
             f"≤ {TARGET} in every case. (noisy): an interquartile range over "
             f"{NOISY_SPREAD:.0%} of its median, or the per-round ratios disagreeing with the "
             "ratio of the medians.", "",
             table(HEAD, rows(result)), ""]
    if worst is not None:
        lines += [f"Worst: {worst['ratio']:.2f}× ({worst['case']}, n = {fmt_n(worst['n'])}); "
                  + ("every case meets the target." if all(r["meets_target"]
                                                           for r in result["rows"])
                     else "the target is not met everywhere."), ""]
    return "\n".join(lines)

