"""The CPU backend: Numba ``@njit(parallel=True)`` kernels printed from the spec.

Each kernel is written to a real ``.py`` file in the cache folder (``HWOPTIM_CACHE_DIR``,
default ``~/.cache/hwoptim``) and imported from there, so Numba's ``cache=True`` keeps the
machine code on disk and a new process does not recompile. Scalars are typed arguments:
a new learning rate or step never recompiles. Constants are typed globals, so float32
math stays float32.

Each rule has a parallel (``prange``) kernel and a serial one. Waking the thread pool
costs microseconds (about 2 to 3 with 2 threads, about 9 with 16), so below some size one
thread is faster; that size depends on how much work an element is: on a 2-core AMD EPYC
Adam's two divides and square root make it cross over near 4·10^3 elements, a floor kernel
(only loads, adds and stores) near 1.5·10^4, plain SGD near 3·10^4 (bench/NOTES.md). The
threshold is ``SERIAL_WORK / element_work(plan)`` elements, scaled for the thread count
(:func:`thread_scale`) and at most ``MAX_SERIAL``; ``HWOPTIM_SERIAL_BELOW`` fixes one
threshold for every kernel instead.
"""
import hashlib
import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np

from .. import codegen
from .numpy import address, copy_from_host, full, to_host  # noqa: F401  (same host arrays)

FAMILY = "host"

# Measured on a 2-core AMD EPYC (Zen 1), float32, OpenMP layer: a parallel launch costs
# about as much as SERIAL_WORK units of element work, one unit being one array element
# loaded or stored (bench/NOTES.md, "serial or parallel").
SERIAL_WORK = float(os.environ.get("HWOPTIM_SERIAL_WORK", 128_000))
# above this many elements the parallel kernel won for every rule on every machine measured
# (SGD, the lightest, crossed at ~3·10^4 with 2 threads and ~6·10^4 with 16)
MAX_SERIAL = 65_536
_HEAVY = {"div": 5.0, "sqrt": 5.0, "pow": 20.0}   # units per element; other ops 0.3
# a fixed threshold (elements) for every kernel, overriding the model; None: the model
SERIAL_BELOW = (int(float(os.environ["HWOPTIM_SERIAL_BELOW"]))
                if os.environ.get("HWOPTIM_SERIAL_BELOW") else None)
# threshold multiplier for the thread count (1 for 2 threads; inf for one thread: the
# serial kernel at every size); hwoptim.set_num_threads keeps it current
_THREAD_SCALE = None


def thread_scale(threads: int) -> float:
    """How the crossover moves with the thread count ``T``, relative to two threads.

    With ``T`` threads the parallel kernel saves ``(T-1)/T`` of the serial time, and the
    launch costs more: measured 2-3 µs with 2 threads (EPYC), about 9 µs with 16 (Xeon),
    which ``(T/2)**0.8`` follows. One thread: infinite (the serial kernel at every size)."""
    if threads <= 1:
        return math.inf
    return threads / (2.0 * (threads - 1)) * (threads / 2.0) ** 0.8


def set_threads(threads: int) -> None:
    global _THREAD_SCALE
    _THREAD_SCALE = thread_scale(threads)


def element_work(plan, dtype) -> float:
    """Work per element of ``plan`` in units of one float32 array access: every array read
    or written is 1, a divide or square root 5, any other operation 0.3; float64 doubles it
    (half as many lanes per vector, slower divides)."""
    w = len(plan.reads) + len(plan.outputs)
    w += sum(_HEAVY.get(e.op, 0.3) for e in plan.order)
    return w * (np.dtype(dtype).itemsize / 4)


def serial_below(plan, dtype) -> float:
    """Elements below which ``plan``'s serial kernel runs (for the current thread count)."""
    if _THREAD_SCALE is None:
        import numba
        set_threads(int(numba.config.NUMBA_NUM_THREADS))
    if SERIAL_BELOW is not None:
        return SERIAL_BELOW if _THREAD_SCALE != math.inf else math.inf
    if _THREAD_SCALE == math.inf:
        return math.inf
    return min(MAX_SERIAL, SERIAL_WORK / element_work(plan, dtype) * _THREAD_SCALE)


def unavailable():
    try:
        import numba  # noqa: F401
    except ImportError as e:
        return f"numba is not installed ({e}); pip install numba"
    return None


def cache_dir() -> Path:
    root = os.environ.get("HWOPTIM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "hwoptim")
    return Path(root) / "numba"


def load_module(source: str, stem: str):
    """Import generated ``source`` from a file named after its content."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    name = f"hwoptim_kernel_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(source)
        os.replace(tmp, path)          # atomic: a concurrent process never sees half a file
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def kernel(plan, dtype):
    """``run(arrays, scalars)``: arrays in ``plan.arrays`` order, 1-D and contiguous."""
    mod = load_module(codegen.numba_source(plan, dtype), f"{plan.key}_{dtype}")
    parallel, serial = mod.parallel, mod.serial
    below = [serial_below(plan, dtype), _THREAD_SCALE]   # threshold, for this scale

    def threshold():
        if below[1] is not _THREAD_SCALE:             # set_num_threads since: recompute
            below[:] = [serial_below(plan, dtype), _THREAD_SCALE]
        return below[0]

    def run(arrays, scalars):
        if below[1] is not _THREAD_SCALE:
            threshold()
        if arrays[0].shape[0] < below[0]:
            serial(*arrays, *scalars)
        else:
            parallel(*arrays, *scalars)

    entry = {}
    typ, n_arrays = np.dtype(dtype).type, len(plan.arrays)

    def unchecked(arrays, scalars):
        """``run`` without Numba's argument dispatch (about 1 µs of 11 arguments), for
        callers that have checked the arrays are 1-D, C-contiguous and of ``dtype``.
        Scalars may be Python floats: the compiled entry point converts them like
        ``numpy.float32(x)`` (round to nearest), so they need no NumPy scalar boxing."""
        if below[1] is not _THREAD_SCALE:
            threshold()
        par = arrays[0].shape[0] >= below[0]
        e = entry.get(par)
        if e is None:                                 # compile or load through the dispatcher
            f = parallel if par else serial
            f(*arrays, *[typ(s) for s in scalars])
            entry[par] = _entry_point(f, dtype) or (
                lambda *a, f=f: f(*a[:n_arrays], *[typ(s) for s in a[n_arrays:]]))
            return
        e(*arrays, *scalars)

    run.prepare = codegen.host_scalar_function(plan, dtype)   # (h, t) -> typed scalars
    run.prepare_unchecked = codegen.host_scalar_function(plan, dtype, boxed=False)
    run.parallel, run.serial, run.unchecked = parallel, serial, unchecked
    run.serial_below = threshold
    return run


def _entry_point(dispatcher, dtype):
    """The compiled function for contiguous 1-D ``dtype`` arrays and ``dtype`` scalars."""
    from numba import types
    want = getattr(types, dtype)
    for sig, cres in dispatcher.overloads.items():
        arrays = [a for a in sig if isinstance(a, types.Array)]
        if all(a.layout == "C" and a.ndim == 1 and a.dtype == want for a in arrays) and \
                all(a == want for a in sig if not isinstance(a, types.Array)):
            return cres.entry_point
    return None
