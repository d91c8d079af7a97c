"""Cold and hot kernel times per threading layer (run once per layer: NUMBA_THREADING_LAYER=omp|tbb
python bench/threads_cold.py): "cold" right after a 0.5 ms NumPy call, "hot" the call after."""
import time, numpy as np, hwoptim, statistics as st, sys
hwoptim.threading_layer()
from hwoptim import codegen
from hwoptim.backends import numba as nb
from hwoptim.rules import RULES
x = np.random.rand(300000)
layer = hwoptim.threading_layer()["layer"]
for rname in ("SGD", "Adam"):
    rule = RULES[rname]
    flags = rule.static_flags({n: h.default for n, h in rule.hypers.items()}, dict(rule.options))
    plan = codegen.plan(rule, flags)
    k = nb.kernel(plan, "float32"); ser = k._build(False); par = k._build(True)
    row = []
    for n in (10**5, 3*10**5, 10**6, 3*10**6, 10**7):
        arrs = [np.random.rand(n).astype(np.float32) for _ in plan.arrays]; sc = [0.001] * len(plan.scalars)
        res = {}
        for name, e in (("s", ser), ("p", par)):
            hot, cold = [], []
            for _ in range(31):
                np.sin(x)
                t0 = time.perf_counter(); e(*arrs, *sc); t1 = time.perf_counter(); e(*arrs, *sc); t2 = time.perf_counter()
                cold.append(t1 - t0); hot.append(t2 - t1)
            res[name] = (st.median(cold) * 1e6, st.median(hot) * 1e6)
        row.append(f"{n:.0e} ser {res['s'][0]:.0f}/{res['s'][1]:.0f} par {res['p'][0]:.0f}/{res['p'][1]:.0f}")
    print(layer, rname, " | ".join(row))
