"""How many CPU threads the Numba kernels use, and which threading layer runs them.

hwoptim runs inside other people's programs, next to BLAS and torch thread pools, on cores
that other processes share. A parallel step must therefore never wait for a thread that the
operating system has descheduled. Numba's TBB layer gives that: its pool steals work, so the
calling thread does whatever work no other running thread has taken, and its idle threads
sleep instead of spinning against other pools. It is also safe after ``fork`` and from
several Python threads at once. The ``tbb`` wheel (a dependency) installs ``libtbb.so.12``
in the environment's ``lib/`` folder, where the dynamic loader does not look; hwoptim loads
it before Numba starts its pool, so Numba's default choice finds it.

Where TBB cannot be loaded, Numba falls back to its OpenMP or workqueue layer and hwoptim
warns once; it then keeps its promises by other means: after ``fork`` a child of a process
that ran GNU OpenMP kernels runs the one-thread kernels (OpenMP would abort it), and with the
workqueue layer (which aborts on concurrent use) a parallel launch that finds another one
running in another Python thread runs the one-thread kernel instead.

``NUMBA_THREADING_LAYER`` (or ``numba.config.THREADING_LAYER`` set before the first
parallel kernel) chooses a layer explicitly; hwoptim respects it.

``NUMBA_NUM_THREADS`` (read by Numba at import) sets how many threads the pool has; by
default one per core. :func:`set_num_threads` uses fewer, up to that many, from now on in
the calling Python thread (Numba's setting is per Python thread, and so is the size below
which hwoptim runs its one-thread kernels).
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
import warnings

_TBB_NAMES = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}
_MIN_TBB_INTERFACE = 12060          # Numba needs oneTBB 2021.6 or later
_tbb = {"loaded": None, "why": None}
_state = {"launched": False, "layer": None, "why": None}
_forked_from_omp = False            # this process is a fork() child of a GNU OpenMP user
_launch_lock = threading.Lock()     # serialises Numba's own pool start-up with ours
_workqueue_lock = threading.Lock()  # the workqueue layer: one parallel launch at a time
_get_threads = None                 # Numba's per-thread thread count, as a C function


def _numba():
    try:
        import numba
    except ImportError as e:
        raise RuntimeError(f"numba is not installed ({e}); pip install numba") from None
    return numba


def _tbb_candidates():
    name = _TBB_NAMES.get(sys.platform, "libtbb.so.12")
    yield name                                    # the loader's own search path
    sub = ("Library", "bin") if sys.platform == "win32" else ("lib",)
    for prefix in (sys.prefix, sys.base_prefix):  # a venv's lib/, where pip puts the wheel's
        yield os.path.join(prefix, *sub, name)
    try:                                           # wherever pip put the tbb wheel's files
        from importlib.metadata import PackageNotFoundError, files
        try:
            for f in files("tbb") or ():
                if f.name == name:
                    yield str(f.locate())
        except PackageNotFoundError:
            pass
    except ImportError:
        pass


def load_tbb() -> bool:
    """Load oneTBB's library globally, so Numba's TBB layer can start; ``True`` if it did.

    Safe to call more than once; :func:`threading_layer` says why it failed."""
    if _tbb["loaded"] is not None:
        return _tbb["loaded"]
    reasons = []
    for path in dict.fromkeys(_tbb_candidates()):
        if os.sep in path and not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            version = lib.TBB_runtime_interface_version
            version.restype = ctypes.c_int
            v = int(version())
        except (OSError, AttributeError) as e:
            reasons.append(f"{path}: {e}")
            continue
        if v < _MIN_TBB_INTERFACE:
            reasons.append(f"{path} is TBB interface {v}; Numba needs {_MIN_TBB_INTERFACE}+")
            continue
        _tbb.update(loaded=True, why=f"oneTBB interface {v} from {path}")
        return True
    _tbb.update(loaded=False, why="; ".join(reasons) or "no libtbb found (pip install tbb)")
    return False


def _requested_layer() -> str:
    numba = _numba()
    return str(numba.config.THREADING_LAYER).lower()


def _launch() -> None:
    """Start Numba's pool (once), with TBB loaded first; warn once if TBB did not run."""
    global _get_threads
    if _state["launched"]:
        return
    with _launch_lock:
        if _state["launched"]:
            return
        numba = _numba()
        from numba.np.ufunc import parallel
        requested = _requested_layer()
        if not parallel._is_initialized and requested in ("default", "tbb", "safe",
                                                          "threadsafe"):
            load_tbb()
        numba.get_num_threads()                    # launches the pool, choosing the layer
        try:
            layer = numba.threading_layer()
        except ValueError:
            layer = None
        if layer == "tbb":
            why = f"work stealing; {_tbb['why'] or 'TBB found by the loader'}"
        elif requested != "default":
            why = f"NUMBA_THREADING_LAYER={requested} chosen by the user"
        else:
            why = f"TBB could not be loaded ({_tbb['why']}); Numba fell back to {layer}"
            warnings.warn(
                f"hwoptim: Numba's TBB threading layer could not be loaded ({_tbb['why']}); "
                f"parallel kernels run on Numba's {layer!r} layer, whose steps can wait for "
                f"threads the OS has descheduled on a busy machine. pip install tbb, or set "
                f"NUMBA_NUM_THREADS=1 on shared cores.", RuntimeWarning, stacklevel=3)
        _get_threads = getattr(parallel, "_get_num_threads", None) or numba.get_num_threads
        _state.update(layer=layer, why=why)
        _state["launched"] = True


def current_threads() -> int:
    """Threads a parallel kernel launched now, from this Python thread, would use; 1 where
    this process must not run parallel kernels (a fork child of a GNU OpenMP user)."""
    if not _state["launched"]:
        _launch()
    if _forked_from_omp:
        if _forked_from_omp == "warn":
            _warn_forked()
        return 1
    return _get_threads()


def _warn_forked():
    global _forked_from_omp
    _forked_from_omp = True
    warnings.warn("hwoptim: this process was forked from one that ran Numba kernels on GNU "
                  "OpenMP, which aborts forked children that start it again; hwoptim runs "
                  "its one-thread kernels here (pip install tbb to keep threads after fork)",
                  RuntimeWarning, stacklevel=3)


def parallel_guard():
    """A lock to hold around a parallel launch, or ``None`` where the layer needs none
    (the workqueue layer aborts the process on concurrent launches)."""
    return _workqueue_lock if _state["layer"] == "workqueue" else None


def _after_fork_in_child():
    global _forked_from_omp, _workqueue_lock
    _workqueue_lock = threading.Lock()
    if _state["launched"] and _state["layer"] == "omp" and not _forked_from_omp:
        _forked_from_omp = "warn"                 # once, at this child's first launch
        _state["why"] = (f"{_state['why']}; this process is a fork() child of a process "
                         f"that ran GNU OpenMP kernels, where OpenMP would abort it: one-"
                         f"thread kernels only")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def max_threads() -> int:
    """The size of Numba's thread pool: ``NUMBA_NUM_THREADS``, else the core count."""
    return int(_numba().config.NUMBA_NUM_THREADS)


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (1 to ``max_threads()``) for parallel kernels from now on, in the
    calling Python thread.

    With one thread hwoptim runs its serial kernels at every size (no pool to wake)."""
    import numbers
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads({n!r}): expected an integer")
    top = max_threads()
    if not 1 <= n <= top:
        raise ValueError(f"set_num_threads({n}): expected 1 to {top} (the pool has "
                         f"NUMBA_NUM_THREADS={top} threads; set that variable before "
                         f"importing numba for more)")
    _launch()
    _numba().set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads the parallel kernels use now in this Python thread (starts Numba's pool)."""
    return current_threads()


def threading_layer() -> dict:
    """What runs the parallel kernels, and why: ``{"layer", "why", "threads",
    "max_threads", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER"}``. Starts the pool."""
    threads = current_threads()
    return {"layer": _state["layer"], "why": _state["why"], "threads": int(threads),
            "max_threads": max_threads(),
            "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
            "NUMBA_THREADING_LAYER": os.environ.get("NUMBA_THREADING_LAYER")}
