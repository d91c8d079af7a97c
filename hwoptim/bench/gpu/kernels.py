"""hwoptim's CuPy kernels, seen from outside: launches counted, modules compiled ahead."""
from __future__ import annotations

import collections
import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from hwoptim import codegen


@contextlib.contextmanager
def count_launches(*optimizers):
    """Count kernel launches of the hwoptim CuPy backends inside the block, by kernel name.

    ``cupy.RawModule`` and ``cupy.ElementwiseKernel`` are replaced by wrappers that count
    every launch, and hwoptim's kernel cache is emptied for the duration, so kernels built
    inside the block are counted ones (compiled code comes from CuPy's cache). An optimizer
    keeps the kernels of its first step: pass the ones that stepped before the block, and
    they step with counted kernels inside it and with their own again after it."""
    import cupy
    from hwoptim import optim
    counts = collections.Counter()
    real_module, real_ek = cupy.RawModule, cupy.ElementwiseKernel

    class CountedModule:
        def __init__(self, *args, **kwargs):
            self._module = real_module(*args, **kwargs)

        def get_function(self, name):
            f = self._module.get_function(name)

            def launch(*args, **kwargs):
                counts[name] += 1
                return f(*args, **kwargs)
            return launch

        def __getattr__(self, name):
            return getattr(self._module, name)

    class CountedElementwise:
        def __init__(self, *args, **kwargs):
            self._kernel = real_ek(*args, **kwargs)
            self._name = kwargs.get("name", "elementwise")

        def __call__(self, *args, **kwargs):
            counts[self._name] += 1
            return self._kernel(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._kernel, name)

    # the one place the benchmark reaches into the core's private state: hwoptim has no
    # public way to empty its kernel cache or an optimizer's kernels
    saved = dict(optim._kernels)
    own = [(o, o.__dict__.get("_kern")) for o in optimizers]
    optim._kernels.clear()
    for o in optimizers:
        o._kern = o._tables = None      # the multi-tensor tables hold kernels too
    cupy.RawModule, cupy.ElementwiseKernel = CountedModule, CountedElementwise
    try:
        yield counts
    finally:
        cupy.RawModule, cupy.ElementwiseKernel = real_module, real_ek
        optim._kernels.clear()
        optim._kernels.update(saved)
        for o, _ in own:
            o._kern = o._tables = None      # rebuilt from the restored cache at the next step


def prewarm(raw_jobs, elementwise_jobs=(), workers=None) -> dict:
    """Compile the ``RawModule`` of each (plan, dtype) in ``raw_jobs`` and the
    ``ElementwiseKernel`` of each in ``elementwise_jobs`` on a thread pool, filling CuPy's
    on-disk kernel cache, so later launches load kernels instead of compiling one by one.

    Best effort: a failure here is counted and left for the real launch to report."""
    import cupy
    from hwoptim.backends import cupy as cupy_backend
    from hwoptim.backends import cupy_elementwise
    dev = cupy.cuda.runtime.getDevice()
    t0 = time.perf_counter()

    def raw(plan, dtype):
        with cupy.cuda.Device(dev):
            cupy.RawModule(code=codegen.cuda_source(plan, dtype).source,
                           options=cupy_backend.NVRTC_OPTIONS).compile()

    def ew(plan, dtype):
        with cupy.cuda.Device(dev):
            run = cupy_elementwise.kernel(plan, dtype)
            arrays = [cupy.ones(8, dtype=dtype) for _ in plan.arrays]
            run(arrays, tuple(np.dtype(dtype).type(0.5) for _ in plan.scalars))
            cupy.cuda.get_current_stream().synchronize()

    seen, tasks = set(), []
    for f, jobs in ((raw, raw_jobs), (ew, elementwise_jobs)):
        for plan, dtype in jobs:
            if (f, plan.key, dtype) not in seen:
                seen.add((f, plan.key, dtype))
                tasks.append((f, plan, dtype))
    failed = 0
    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        futures = [ex.submit(f, p, d) for f, p, d in tasks]
        for fu in futures:
            try:
                fu.result()
            except Exception:      # noqa: BLE001 - reported by the real launch
                failed += 1
    return {"modules": len(tasks), "failed": failed, "seconds": time.perf_counter() - t0}
