"""Per-step cost on the GPU beyond bandwidth: host overhead at small sizes, kernel
launches per step, and one step captured in a CUDA graph and replayed."""
from __future__ import annotations

import time

import numpy as np

import hwoptim

from .device import free, time_steps, torch_timer
from .kernels import count_launches


def overhead(ctx, rule, n, impl, dtype="float32") -> dict:
    """One record: host time (until ``step`` returns), wall time (``step`` and a
    synchronise) and device time per step of ``rule`` at ``n`` elements, and launches."""
    rec = {"device": ctx.name, "rule": rule.name, "n": int(n), "impl": impl,
           "dtype": dtype, "host_s": None, "wall_s": None, "gpu_s": None,
           "launches": None}
    rep = 30 if ctx.quick else 100
    try:
        if impl.startswith("torch"):
            torch = ctx.torch
            if torch is None:
                raise RuntimeError("torch with CUDA is not available")
            tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
            p = torch.randn(int(n), device="cuda", dtype=tdt)
            p.grad = torch.randn_like(p)
            kw = {"fused" if impl == "torch-fused" else "foreach": True}
            opt = getattr(torch.optim, rule.torch)([p], **kw)
            step, sync, timer = opt.step, torch.cuda.synchronize, torch_timer()
        else:
            w, g = ctx.normal(int(n), dtype), ctx.normal(int(n), dtype)
            backend = "cupy-elementwise" if impl == "hwoptim-cupy-elementwise" else "cupy"
            opt = getattr(hwoptim, rule.name)(w, backend=backend,
                                              capturable=impl == "hwoptim-cupy-capturable")
            step = lambda: opt.step(g)
            sync, timer = ctx.stream.synchronize, ctx.timer
        for _ in range(5):
            step()
        sync()
        host, wall = [], []
        for _ in range(rep):
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            sync()
            t2 = time.perf_counter()
            host.append(t1 - t0)
            wall.append(t2 - t0)
        rec["host_s"], rec["wall_s"] = float(np.median(host)), float(np.median(wall))
        rec["gpu_s"] = time_steps(lambda i: step(), 1, 2, rep, timer)
        if not impl.startswith("torch"):
            with count_launches(opt) as c:
                step()
            sync()
            rec["launches"] = sum(c.values())
            rec["launch_names"] = dict(c)
    except Exception as e:   # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        free()
    return rec


def graph(ctx, label, make, rep=None) -> dict:
    """``make(capturable)`` returns (optimizer, grads). Wall time per step of eager
    steps (plain and capturable) and of replays of one captured step."""
    rep = rep or (50 if ctx.quick else 200)
    cupy = ctx.cupy
    rec = {"device": ctx.name, "case": label, "eager_s": None,
           "eager_capturable_s": None, "graph_s": None, "saved_s": None,
           "launches": None}
    s = cupy.cuda.Stream(non_blocking=True)

    def per_step(fn):
        for _ in range(5):
            fn()
        s.synchronize()
        t0 = time.perf_counter()
        for _ in range(rep):
            fn()
        s.synchronize()
        return (time.perf_counter() - t0) / rep

    try:
        with s:
            opt, grads = make(False)
            rec["eager_s"] = per_step(lambda: opt.step(grads))
            opt, grads = make(True)
            rec["eager_capturable_s"] = per_step(lambda: opt.step(grads))
            with count_launches(opt) as c:
                opt.step(grads)
            s.synchronize()
            rec["launches"] = sum(c.values())
            # captured with hwoptim's own cached kernels (loaded by the eager steps
            # above, and kept alive by its kernel cache while the graph is replayed)
            s.begin_capture()
            try:
                opt.step(grads)
            finally:
                graph = s.end_capture()
            rec["graph_s"] = per_step(lambda: graph.launch(s))
            rec["saved_s"] = rec["eager_capturable_s"] - rec["graph_s"]
    except Exception as e:   # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        s.synchronize()
        free()
    return rec
