"""Before/after measurements for the threading change: one code version per process
(PYTHONPATH=<checkout> python bench/threads_ab.py quiet|busy K|blas); prints JSON."""
import json, os, statistics as st, subprocess, sys, time
import numpy as np
import hwoptim
from hwoptim import codegen
from hwoptim.rules import RULES
from hwoptim.backends import load
nb = load("numba")

def med(f, reps, rounds=9):
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps): f()
        ts.append((time.perf_counter() - t0) / reps)
    return st.median(ts)

def adam(n):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(n, dtype=np.float32); g = rng.standard_normal(n, dtype=np.float32)
    o = hwoptim.Adam(w); o.step(g); o.step(g)
    return lambda: o.step(g)

def floor(n):
    rule = RULES["Adam"]
    flags = rule.static_flags({k: h.default for k, h in rule.hypers.items()}, dict(rule.options))
    p = codegen.floor_plan(codegen.plan(rule, flags))
    k = nb.kernel(p, "float32")
    arrs = [np.random.rand(n).astype(np.float32) for _ in p.arrays]
    sc = [np.float32(0.001)] * len(p.scalars)
    k.parallel(*arrs, *sc)
    return lambda: k.parallel(*arrs, *sc)

REPS = {10**4: 2000, 10**5: 300, 10**6: 40, 10**7: 4}
out = {"layer": hwoptim.threading_layer()["layer"]}
mode = sys.argv[1]
if mode == "quiet":
    s4 = adam(10**4); out["adam_1e4_us"] = med(s4, 3000, 15) * 1e6
    s7, f7 = adam(10**7), floor(10**7)
    a, b = [], []
    for _ in range(9):
        a.append(med(s7, 3, 1)); b.append(med(f7, 3, 1))
    out["adam_1e7_ms"] = st.median(a) * 1e3; out["floor_1e7_ms"] = st.median(b) * 1e3
    out["x_floor_1e7"] = st.median(b) / st.median(a)
elif mode == "busy":
    k = int(sys.argv[2])
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]
    try:
        time.sleep(0.3)
        for n, reps in REPS.items():
            s = adam(n)
            d, one = [], []
            def timed(f, budget=0.05):
                t0 = time.perf_counter(); f(); t1 = time.perf_counter() - t0
                r = max(1, min(reps, int(budget / max(t1, 1e-7))))
                return med(f, r, 1)
            for _ in range(7):
                d.append(timed(s))
                hwoptim.set_num_threads(1); one.append(timed(s)); hwoptim.set_num_threads(2)
            out[f"{n:.0e}"] = {"default_us": st.median(d) * 1e6, "one_us": st.median(one) * 1e6,
                               "ratio": st.median(d) / st.median(one)}
    finally:
        for p in spin: p.kill()
elif mode == "blas":
    for n, m in ((10**5, 256), (10**7, 1024)):
        s = adam(n)
        A = np.random.rand(m, m); B = np.random.rand(m, m)
        mm = lambda: A @ B
        mm(); s()
        rounds = 300 if n == 10**5 else 10
        t_mm = med(mm, rounds, 5); t_s = med(s, rounds, 5)
        both = lambda: (mm(), s())
        t_both = med(both, rounds, 5)
        out[f"{n:.0e}"] = {"matmul_ms": t_mm * 1e3, "step_ms": t_s * 1e3, "interleaved_ms": t_both * 1e3,
                           "ratio": t_both / (t_mm + t_s)}
    try:
        import torch
        torch.set_num_threads(2)
        for n, m in ((10**5, 256), (10**7, 1024)):
            s = adam(n)
            A = torch.rand(m, m); B = torch.rand(m, m)
            mm = lambda: A @ B
            mm(); s()
            rounds = 300 if n == 10**5 else 10
            t_mm = med(mm, rounds, 5); t_s = med(s, rounds, 5)
            t_both = med(lambda: (mm(), s()), rounds, 5)
            out[f"torch {n:.0e}"] = {"matmul_ms": t_mm * 1e3, "step_ms": t_s * 1e3,
                                     "interleaved_ms": t_both * 1e3, "ratio": t_both / (t_mm + t_s)}
    except ImportError:
        pass
print(json.dumps(out))
