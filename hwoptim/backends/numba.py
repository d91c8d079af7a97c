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
threshold is ``serial_work() / element_work(plan)`` elements (the work a launch costs depends
on the threading layer), scaled for the thread count
(:func:`thread_scale`) and at most ``MAX_SERIAL``; ``HWOPTIM_SERIAL_BELOW`` fixes one
threshold for every kernel instead.

:meth:`Kernel.many` updates a list of separate arrays in one call (multi-tensor apply): a
table of their addresses, a cached chunk table over all of them, and a second generated
module (``codegen.numba_multi_source``, through the same disk cache) whose kernels print the
same per-element statements, so results are bit-identical to one call per array.
"""
import math
import os
import threading

import numpy as np

from .. import codegen, threads
from ..formats import Format
from . import diskcache
from .numpy import address, copy_from_host, full, to_host  # noqa: F401  (same host arrays)

FAMILY = "host"
STAGED = True      # runs staged rules (Adafactor's factored arrays) on their shapes

# A parallel launch costs about as much as SERIAL_WORK units of element work, one unit being
# one array element loaded or stored; measured per threading layer on a 2-core AMD EPYC
# (Zen 1), float32 (bench/NOTES.md, "serial or parallel"). TBB's launch (3-4 µs, against
# OpenMP's spinning team's 2) costs more, so its crossover sits higher: Adam crossed near
# 2.6·10^4 elements with TBB against 8·10^3 with OpenMP.
SERIAL_WORK_BY_LAYER = {"omp": 128_000, "tbb": 512_000, "workqueue": 512_000}
_SERIAL_WORK_ENV = os.environ.get("HWOPTIM_SERIAL_WORK")
# above this many elements the parallel kernel won for every rule on every machine measured
# (SGD, the lightest, crossed at ~3·10^4 with 2 threads and ~6·10^4 with 16)
MAX_SERIAL = 65_536
_HEAVY = {"div": 5.0, "sqrt": 5.0, "pow": 20.0}   # units per element; other ops 0.3
# The multi-tensor kernels (Kernel.many) cut every tensor at multiples of MULTI_CHUNK
# elements; the parallel one runs a prange over groups of consecutive chunks holding about
# MULTI_CHUNK elements of work each, a chunk costing MULTI_ROW_COST elements more than its
# size (setting up its arrays and scalars: ~12 ns, about 30 Adam elements, on the 2-core
# EPYC). Chunks of 4096 to 65536 elements measured the same there within noise
# (bench/multitensor.py --chunks); 16384 float32 elements are 64 KB per array.
MULTI_CHUNK = 16_384
MULTI_ROW_COST = 32
# stochastic rounding: arrays from this many elements step through the multi-tensor kernel
# (the one-array kernel mixes no high word of the index into the bits; the spec's bits of
# index i mix in i >> 32, which the chunks, never crossing a multiple of 2**32, do)
SR_SINGLE_MAX = 2**32
# a fixed threshold (elements) for every kernel, overriding the model; None: the model
SERIAL_BELOW = (int(float(os.environ["HWOPTIM_SERIAL_BELOW"]))
                if os.environ.get("HWOPTIM_SERIAL_BELOW") else None)


def serial_work() -> float:
    """SERIAL_WORK for the threading layer in use (``HWOPTIM_SERIAL_WORK`` overrides)."""
    if _SERIAL_WORK_ENV:
        return float(_SERIAL_WORK_ENV)
    threads.current_threads()                      # the layer is known once the pool runs
    return SERIAL_WORK_BY_LAYER.get(threads._state["layer"], 128_000)


def thread_scale(threads: int) -> float:
    """How the crossover moves with the thread count ``T``, relative to two threads.

    With ``T`` threads the parallel kernel saves ``(T-1)/T`` of the serial time, and the
    launch costs more: measured 2-3 µs with 2 threads (EPYC), about 9 µs with 16 (Xeon),
    which ``(T/2)**0.8`` follows. One thread: infinite (the serial kernel at every size)."""
    if threads <= 1:
        return math.inf
    return threads / (2.0 * (threads - 1)) * (threads / 2.0) ** 0.8


def element_work(plan, dtype) -> float:
    """Work per element of ``plan`` in units of one float32 array access: every array read
    or written is 1, a divide or square root 5, any other operation 0.3; float64 doubles it
    (half as many lanes per vector, slower divides)."""
    w = len(plan.reads) + len(plan.outputs)
    w += sum(_HEAVY.get(e.op, 0.3) for e in plan.order)
    return w * (np.dtype(dtype).itemsize / 4)


def serial_below(plan, dtype, n_threads: int | None = None) -> float:
    """Elements below which ``plan``'s serial kernel runs, for ``n_threads`` threads (by
    default the calling Python thread's setting)."""
    if n_threads is None:
        n_threads = threads.current_threads()
    scale = thread_scale(n_threads)
    if scale == math.inf:
        return math.inf
    if SERIAL_BELOW is not None:
        return SERIAL_BELOW
    return min(MAX_SERIAL, serial_work() / element_work(plan, dtype) * scale)


def unavailable():
    try:
        import numba
    except ImportError as e:
        return f"numba is not installed ({e}); pip install numba"
    if numba.config.DISABLE_JIT:
        return ("NUMBA_DISABLE_JIT=1 is set, so Numba would run the kernels as plain Python "
                "loops; unset it to use this backend")
    return None


class Kernel:
    """One rule's Numba kernels for one dtype: ``parallel`` (prange) and ``serial``.

    ``kernel(arrays, scalars)`` runs through Numba's dispatcher (arrays in ``plan.arrays``
    order, 1-D and contiguous; scalars of ``dtype``). :meth:`launcher` gives the compiled
    entry point for an array size, built (compiled, or loaded from the disk cache) before it
    is returned, so a caller can have every launch of a step in hand before it changes
    anything."""

    def __init__(self, plan, dtype: str):
        self.plan, self.dtype = plan, dtype
        # a storage format (hwoptim.formats) other than plain: 16-bit buffers travel as
        # uint16 arrays of their bits, the math and the scalars are in the compute dtype
        self.fmt = Format.parse(dtype)
        self.cdtype = self.fmt.compute
        self.names = self.fmt.arrays(plan.arrays)             # the kernels' array arguments
        self.module = diskcache.load_module(
            lambda cache: codegen.numba_source(plan, dtype, cache=cache),
            f"{plan.key}_{dtype}")
        self.parallel, self.serial = self.module.parallel, self.module.serial
        self.prepare = codegen.host_scalar_function(plan, dtype)   # (h, t) -> typed scalars
        self.prepare_unchecked = codegen.host_scalar_function(plan, dtype, boxed=False)
        self._entries = {}                     # parallel? -> compiled entry point
        self._below = {}                       # thread count -> serial threshold
        self._lock = threading.RLock()
        self._multi = None                     # the multi-tensor module, built at first use
        self._many_entries = {}                # parallel? -> its compiled entry point
        self._chunks = codegen.ChunkTables(MULTI_CHUNK, row_cost=MULTI_ROW_COST)
        self._reduce = {}                      # parallel? -> the reduction pass (norms)

    def serial_below(self, n_threads: int | None = None) -> float:
        """Elements below which the serial kernel runs (calling thread's setting)."""
        if n_threads is None:
            n_threads = threads.current_threads()
        below = self._below.get(n_threads)
        if below is None:
            below = self._below[n_threads] = serial_below(self.plan, self.cdtype, n_threads)
        return below

    def __call__(self, arrays, scalars):
        if self.fmt.sr and arrays[0].shape[0] >= SR_SINGLE_MAX:
            return self._chunked(threads.current_threads())(*arrays, *scalars)
        f = self.serial if arrays[0].shape[0] < self.serial_below() else self.parallel
        if not self.fmt.plain:
            arrays = [_bits16(a) for a in arrays]
            scalars = [np.dtype(self.cdtype).type(x) for x in scalars]
        if self.plan.norms:
            typ = np.dtype(self.cdtype).type
            scalars = [typ(x) for x in scalars] + [typ(x) for x in self.norms_of(arrays,
                                                                                  scalars)]
        f(*arrays, *scalars)

    # -- the reduction pass of rules with norms (LAMB, LARS)

    def norms_of(self, arrays, scalars) -> list:
        """The norms ``plan.norms`` of one array's step (``arrays`` in ``plan.arrays``
        order), in float64."""
        ptrs = np.array([[a.ctypes.data for a in arrays]], np.int64)
        return self.norms(ptrs, np.array([arrays[0].shape[0]], np.int64),
                          np.zeros(1, np.int64), np.array([scalars], self.cdtype))[0].tolist()

    def norms(self, ptrs, sizes, rows, scalars, n_threads: int | None = None,
              combine=None) -> np.ndarray:
        """float64 ``(tensors, len(plan.norms))``: each tensor's norms, from one pass over
        every tensor's inputs (arguments as :meth:`many`'s; ``scalars`` the rows of
        ``plan.scalars``). Sums are per chunk, so they do not depend on the thread count."""
        chunks = self._chunks.get(sizes)
        k = len(self.plan.norms)
        total = np.zeros((sizes.shape[0], k), np.float64)
        if chunks.n_chunks:
            if n_threads is None:
                n_threads = threads.current_threads()
            f = self._reduce_entry(chunks.total >= self.serial_below(n_threads))
            out = np.empty((chunks.n_chunks, k), np.float64)
            f(ptrs, chunks.table, rows, scalars, out)
            np.add.at(total, chunks.table[:, 0], out)
        if combine is not None:
            total = combine(total)
        if "rms" in self.plan.norm_kinds:      # an RMS: the mean square, over the size
            total *= self.plan.norm_scale(sizes)
        return np.sqrt(total)

    def _reduce_entry(self, par: bool):
        e = self._reduce.get(par)
        if e is not None:
            return e
        with self._lock:
            mod = self._reduce.get("module")
            if mod is None:
                plan, dtype = self.plan, self.dtype
                mod = self._reduce["module"] = diskcache.load_module(
                    lambda cache: codegen.numba_reduce_source(plan, dtype, cache=cache),
                    f"{plan.key}_{dtype}_reduce")
            f = mod.parallel if par else mod.serial
            diskcache.first_call(mod, f, [np.empty((0, len(self.names)), np.int64),
                                          np.empty((0, 3), np.int64), np.empty(0, np.int64),
                                          np.empty((0, len(self.plan.scalars)), self.cdtype),
                                          np.empty((0, len(self.plan.norms)), np.float64)])
            self._reduce[par] = f
            return f

    def launcher(self, n: int, n_threads: int):
        """The compiled entry point for ``n`` elements at ``n_threads`` threads: call it as
        ``f(*arrays, *scalars)`` with arrays checked to be 1-D, C-contiguous and of
        ``dtype``. Scalars may be Python floats: the entry point converts them like
        ``numpy.float32(x)`` (round to nearest), without Numba's argument dispatch (about
        1 µs of 11 arguments)."""
        if self.fmt.sr and n >= SR_SINGLE_MAX:
            return self._chunked(n_threads)
        par = n >= self.serial_below(n_threads)
        e = self._entries.get(par)
        return e if e is not None else self._build(par)

    def _chunked(self, n_threads: int):
        """``f(*arrays, *scalars)`` through the multi-tensor kernel: stochastic rounding's
        one-array kernel draws the bits of indices below 2**32 only (SR_SINGLE_MAX)."""
        self.many_launcher(SR_SINGLE_MAX, n_threads)          # built before it is returned
        k = len(self.names)

        def run(*args):
            arrays = [_bits16(a) for a in args[:k]]
            self.many(np.array([[a.ctypes.data for a in arrays]], np.int64),
                      np.array([arrays[0].shape[0]], np.int64), np.zeros(1, np.int64),
                      np.array([args[k:]], self.cdtype), n_threads)
        return run

    def _build(self, par: bool):
        with self._lock:                      # one compile per kernel, whatever the threads
            e = self._entries.get(par)
            if e is not None:
                return e
            f = self.parallel if par else self.serial
            typ = np.dtype(self.cdtype).type
            empty = [np.empty(0, _numba_dtype(self.fmt.storage(a))) for a in self.names]
            diskcache.first_call(self.module, f, empty + [typ(0)] * len(self.plan.all_scalars))
            n_arrays = len(self.names)
            if self.fmt.plain:
                e = _entry_point(f, self.dtype) or (
                    lambda *a: f(*a[:n_arrays], *[typ(s) for s in a[n_arrays:]]))
            else:                       # 16-bit arrays as their bits, through the dispatcher
                e = (lambda *a: f(*[_bits16(x) for x in a[:n_arrays]],
                                  *[typ(s) for s in a[n_arrays:]]))
            if par:
                e = _guarded(e, self._raw(self._build(False)))
            if self.plan.norms:                # the reduction pass first, then the update
                e = _with_norms(e, n_arrays, self.norms_of)
            self._entries[par] = e
            return e

    @staticmethod
    def _raw(entry):
        """The update entry inside a :func:`_with_norms` wrapper (itself if none)."""
        return getattr(entry, "raw", entry)

    def unchecked(self, arrays, scalars):
        """``kernel(arrays, scalars)`` through the entry point (Python-float scalars)."""
        self.launcher(arrays[0].shape[0], threads.current_threads())(*arrays, *scalars)

    # -- many arrays, one launch

    def many(self, ptrs, sizes, rows, scalars, n_threads: int | None = None, combine=None):
        """Update many separate arrays in one kernel call (multi-tensor apply).

        ``ptrs``: int64, ``(n_tensors, len(plan.arrays))``, the host address of each
        tensor's buffers in ``plan.arrays`` order; every buffer of tensor ``i`` holds
        ``sizes[i]`` contiguous elements of ``dtype`` (the caller checks; nothing here can).
        ``sizes``: int64, ``(n_tensors,)``, zeros allowed. ``rows``: int64, ``(n_tensors,)``,
        the row of ``scalars`` tensor ``i`` uses. ``scalars``: ``(n_rows,
        len(plan.scalars))``, each row what :attr:`prepare` returns for it (converted to
        ``dtype`` like ``numpy.float32(x)``). ``n_threads``: the calling thread's thread
        count (default :func:`threads.current_threads`).

        Below :meth:`serial_below` elements in all, the serial multi kernel runs, else the
        parallel one: a prange over groups of chunks of every tensor (:data:`MULTI_CHUNK`
        elements), built once per distinct ``sizes`` and cached. Results are bit-identical
        to running this kernel on each array in turn. A row index out of range raises
        ``IndexError`` before anything is written. ``combine``: for rules with norms, a
        function given the float64 sums of squares ``(n_tensors, len(plan.norms))`` that
        returns the sums to take the norms of (a sharded optimizer adds other processes'
        pieces of the same param there)."""
        ptrs = np.ascontiguousarray(ptrs, dtype=np.int64)
        sizes = np.ascontiguousarray(sizes, dtype=np.int64)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        scalars = np.ascontiguousarray(scalars, dtype=self.cdtype)
        n = sizes.shape[0] if sizes.ndim == 1 else -1
        if ptrs.shape != (n, len(self.names)) or rows.shape != (n,) or \
                scalars.ndim != 2 or scalars.shape[1] != len(self.plan.scalars):
            raise ValueError(
                f"many(): expected sizes (n,), ptrs (n, {len(self.names)}), rows (n,) "
                f"and scalars (rows, {len(self.plan.scalars)}); got sizes {sizes.shape}, "
                f"ptrs {ptrs.shape}, rows {rows.shape}, scalars {scalars.shape}")
        chunks = self._chunks.get(sizes)
        if chunks.n_chunks == 0:
            return
        if n_threads is None:
            n_threads = threads.current_threads()
        if self.plan.norms:                    # per tensor: its row of scalars, its norms
            norms = self.norms(ptrs, sizes, rows, scalars, n_threads, combine)
            scalars = np.concatenate([scalars[rows], norms.astype(self.cdtype)], axis=1)
            rows = np.arange(n, dtype=np.int64)
        self.many_launcher(chunks.total, n_threads)(ptrs, chunks.table, chunks.groups, rows,
                                                    scalars)

    def many_launcher(self, total: int, n_threads: int):
        """The compiled multi-tensor entry point for ``total`` elements at ``n_threads``
        threads: ``f(ptrs, chunks, groups, rows, scalars)`` with exactly the types
        :meth:`many` passes (``chunks``: :func:`codegen.chunk_table`, ``groups``:
        :func:`codegen.chunk_groups` of it). Built before it is returned."""
        par = total >= self.serial_below(n_threads)
        e = self._many_entries.get(par)
        return e if e is not None else self._build_many(par)

    def multi_module(self):
        """The module of multi-tensor kernels (``parallel``, ``serial``), built at first use."""
        if self._multi is None:
            with self._lock:
                if self._multi is None:
                    plan, dtype = self.plan, self.dtype
                    self._multi = diskcache.load_module(
                        lambda cache: codegen.numba_multi_source(plan, dtype, cache=cache),
                        f"{plan.key}_{dtype}_multi")
        return self._multi

    def _build_many(self, par: bool):
        with self._lock:
            e = self._many_entries.get(par)
            if e is not None:
                return e
            mod = self.multi_module()
            f = mod.parallel if par else mod.serial
            args = [np.empty((0, len(self.names)), np.int64), np.empty((0, 3), np.int64),
                    np.zeros(1, np.int64), np.empty(0, np.int64),
                    np.empty((0, len(self.plan.all_scalars)), self.cdtype)]
            diskcache.first_call(mod, f, args)
            e = _many_entry_point(f, self.cdtype) or f
            if par:
                e = _guarded(e, self._build_many(False))
            self._many_entries[par] = e
            return e


def _numba_dtype(storage: str):
    """The NumPy dtype of a buffer's array as the kernels take it (16-bit: ``uint16``)."""
    return np.uint16 if storage in ("float16", "bfloat16") else np.dtype(storage)


def _bits16(a):
    """A 16-bit float array as the ``uint16`` array of its bits (other arrays as they are)."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 and a.dtype.kind != "u" else a


def _with_norms(entry, n_arrays, norms_of):
    """``entry`` called with the norms of its arrays (``Kernel.norms_of``) appended."""
    def run(*args):
        return entry(*args, *norms_of(args[:n_arrays], args[n_arrays:]))
    run.raw = entry
    return run


def _guarded(parallel_entry, serial_entry):
    """``parallel_entry``, or where the threading layer forbids concurrent launches
    (workqueue), a wrapper that runs ``serial_entry`` while another thread's launch runs."""
    lock = threads.parallel_guard()
    if lock is None:
        return parallel_entry

    def entry(*args):
        if lock.acquire(blocking=False):
            try:
                return parallel_entry(*args)
            finally:
                lock.release()
        return serial_entry(*args)
    return entry


def launch_key() -> int:
    """What decides which compiled launch an array gets: this Python thread's thread count."""
    return threads.current_threads()


_kernels: dict = {}
_kernels_lock = threading.Lock()


class StagedKernel:
    """A staged rule's kernels (``plan.stages``: Adafactor's factored arrays), for one param
    at a time on its shape: ``kernel(arrays, scalars)`` with ``arrays`` in ``plan.arrays``
    order (the param and its state on their shapes; the grad may be flat), the element
    loops in parallel from :data:`STAGED_SERIAL_BELOW` elements; :meth:`run_list` steps
    many params in one call."""

    def __init__(self, plan, dtype: str):
        self.plan, self.fmt = plan, Format.parse(dtype)
        self.dtype = self.fmt.compute                 # the math's and the scalars' dtype
        self.names = self.fmt.arrays(plan.arrays)     # the kernels' array arguments
        self.module = diskcache.load_module(
            lambda cache: codegen.numba_staged_source(plan, dtype, cache=cache),
            f"{plan.key}_{dtype}_staged")
        self.prepare = codegen.host_scalar_function(plan, dtype)
        self.prepare_unchecked = codegen.host_scalar_function(plan, dtype, boxed=False)
        self._built = set()
        self._lock = threading.RLock()

    def _build(self, par: bool):
        """Every function of the module compiled (or loaded from the disk cache), by a run
        on a 1x1x1 problem of scratch arrays."""
        with self._lock:
            if par in self._built:
                return
            typ = np.dtype(self.dtype).type
            if par == "many":
                args = [np.zeros((0, len(self.names)), np.int64),
                        np.zeros((0, 3), np.int64), np.zeros(len(self.plan.scalars), self.dtype)]
                diskcache.first_call(self.module, self.module.run_many, args)
            else:
                args = ([np.zeros(1, _numba_dtype(self.fmt.storage(a))) for a in self.names]
                        + [1, 1, 1] + [typ(0)] * len(self.plan.scalars))
                diskcache.first_call(self.module,
                                     self.module.run_p if par else self.module.run_s, args)
            self._built.add(par)

    def __call__(self, arrays, scalars):
        b, m, n = codegen.stack_dims(arrays[0].shape)
        if b * m * n == 0:
            return
        typ = np.dtype(self.dtype).type
        flat, scal = [_bits16(a.reshape(-1)) for a in arrays], [typ(x) for x in scalars]
        if b * m * n >= STAGED_SERIAL_BELOW and threads.current_threads() > 1:
            lock = threads.parallel_guard()     # (workqueue: one parallel launch at a time)
            if lock is None or lock.acquire(blocking=False):
                try:
                    self._build(True)
                    self.module.run(flat, b, m, n, scal, True)
                    return
                finally:
                    if lock is not None:
                        lock.release()
        self._build(False)
        self.module.run(flat, b, m, n, scal, False)

    unchecked = __call__

    def launcher(self, n: int, n_threads: int):
        """An entry point ``f(*arrays, *scalars)`` for a param of ``n`` elements, built
        first: the variant :meth:`run_list` takes for it (stepped alone, in parallel, or
        with others on the serial kernels)."""
        self._build(("many" if n < STAGED_ALONE else n >= STAGED_SERIAL_BELOW) if n else False)
        self._build(False)        # (what runs where parallel launches may not: one thread,
        na = len(self.names)            # a fork child of OpenMP, a busy workqueue)
        return lambda *a: self(a[:na], a[na:])

    def run_list(self, items, scalars):
        """Step many params (``items``: each one's arrays, as :meth:`__call__` takes them)
        with the same ``scalars``: each of at least :data:`STAGED_ALONE` elements alone,
        its element loops in parallel; the others in one call, a parallel loop over them,
        each stepped by the serial kernels (the same bits either way). Launching the
        parallel loops of a 10⁵-element matrix costs about as much as stepping it."""
        small, dims = [], []
        for arrays in items:
            b, m, n = codegen.stack_dims(arrays[0].shape)
            if b * m * n >= STAGED_ALONE:
                self(arrays, scalars)
            elif b * m * n:
                small.append([a.ctypes.data for a in arrays])
                dims.append((b, m, n))
        if not small:
            return
        ptrs, dims = np.array(small, np.int64), np.array(dims, np.int64)
        scal = np.array(scalars, self.dtype)
        if threads.current_threads() > 1:
            lock = threads.parallel_guard()     # (workqueue: one parallel launch at a time)
            if lock is None or lock.acquire(blocking=False):
                try:
                    self._build("many")
                    self.module.run_many(ptrs, dims, scal)
                    return
                finally:
                    if lock is not None:
                        lock.release()
        self._build(False)
        for arrays in (a for a in items if a[0].size and a[0].size < STAGED_ALONE):
            self(arrays, scalars)


STAGED_SERIAL_BELOW = 1 << 15
STAGED_ALONE = 1 << 20        # run_list: params from this many elements are stepped alone


def kernel(plan, dtype) -> Kernel:
    """The :class:`Kernel` (:class:`StagedKernel` for a staged plan) for ``plan`` and
    ``dtype``, one per process."""
    key = (plan.key, dtype)
    k = _kernels.get(key)
    if k is None:
        with _kernels_lock:
            k = _kernels.get(key)
            if k is None:
                k = _kernels[key] = (StagedKernel if plan.stages is not None else Kernel)(
                    plan, dtype)
    return k


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


def _many_entry_point(dispatcher, dtype):
    """The compiled multi-tensor function for C-contiguous (int64 2-D, int64 2-D, int64 1-D,
    int64 1-D, ``dtype`` 2-D) arrays."""
    from numba import types
    want = [(types.int64, 2), (types.int64, 2), (types.int64, 1), (types.int64, 1),
            (getattr(types, dtype), 2)]
    for sig, cres in dispatcher.overloads.items():
        if len(sig) == len(want) and all(
                isinstance(a, types.Array) and a.layout == "C" and a.mutable
                and (a.dtype, a.ndim) == w for a, w in zip(sig, want)):
            return cres.entry_point
    return None


# -- what max_grad_norm and skip_nonfinite read: one pass over every grad

_stats: dict = {}                       # dtype -> (module, {parallel?: entry point})
_stat_chunks = codegen.ChunkTables(MULTI_CHUNK)
_STATS_WORK = 2.0                       # element work of the stats pass (one read, two adds)


def _stats_entry(dtype: str, par: bool):
    with _kernels_lock:
        mod, entries = _stats.get(dtype) or (None, {})
        if mod is None:
            mod = diskcache.load_module(
                lambda cache: codegen.numba_stats_source(dtype, cache=cache),
                f"grad_stats_{dtype}")
            _stats[dtype] = (mod, entries)
        e = entries.get(par)
        if e is None:
            f = mod.parallel if par else mod.serial
            diskcache.first_call(mod, f, [np.empty(0, np.int64), np.empty((0, 3), np.int64),
                                          np.empty((0, 2), np.float64)])
            e = entries[par] = f
    return e


def grad_stats(grads, sizes, dtype: str) -> tuple[float, bool]:
    """(sum of squares in float64, whether every element is finite) over ``grads``: a list
    of 1-D arrays, or an int64 array of addresses of ``sizes[i]`` contiguous ``dtype``
    elements each (checked by the caller). One read of every grad; the sum is taken per
    chunk (the multi-tensor chunks), so it does not depend on the thread count."""
    if not isinstance(grads, np.ndarray):
        grads = np.fromiter((g.ctypes.data for g in grads), np.int64, len(grads))
    chunks = _stat_chunks.get(np.ascontiguousarray(sizes, dtype=np.int64))
    if chunks.n_chunks == 0:
        return 0.0, True
    n_threads = threads.current_threads()
    below = serial_work() / (_STATS_WORK * np.dtype(dtype).itemsize / 4) * \
        thread_scale(n_threads)
    f = _stats_entry(dtype, chunks.total >= min(MAX_SERIAL, below))
    out = np.empty((chunks.n_chunks, 2), np.float64)
    f(grads, chunks.table, out)
    return float(out[:, 0].sum()), not np.isnan(out[:, 1].sum())
