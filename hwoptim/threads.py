"""How many CPU threads the Numba kernels use, and which threading layer runs them.

``NUMBA_NUM_THREADS`` (read by Numba at import) sets how many threads the pool has; by
default one per core. :func:`set_num_threads` uses fewer, up to that many, from now on in
the calling Python thread (Numba's setting is per Python thread). Reports record
:func:`threading_layer`.
"""
from __future__ import annotations

import os


def _numba():
    try:
        import numba
    except ImportError as e:
        raise RuntimeError(f"numba is not installed ({e}); pip install numba") from None
    return numba


def max_threads() -> int:
    """The size of Numba's thread pool: ``NUMBA_NUM_THREADS``, else the core count."""
    return int(_numba().config.NUMBA_NUM_THREADS)


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (1 to ``max_threads()``) for parallel kernels from now on.

    With one thread hwoptim runs its serial kernels at every size (no pool to wake)."""
    import numbers
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads({n!r}): expected an integer")
    top = max_threads()
    if not 1 <= n <= top:
        raise ValueError(f"set_num_threads({n}): expected 1 to {top} (the pool has "
                         f"NUMBA_NUM_THREADS={top} threads; set that variable before "
                         f"importing numba for more)")
    _numba().set_num_threads(int(n))
    from .backends import numba as nb
    nb.set_threads(int(n))


def get_num_threads() -> int:
    """Threads the parallel kernels use now (starts Numba's pool if it is not running)."""
    return int(_numba().get_num_threads())


def threading_layer() -> dict:
    """What runs the parallel kernels: ``{"layer", "threads", "max_threads",
    "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER"}``. Starts the pool if needed."""
    numba = _numba()
    threads = numba.get_num_threads()          # launches the pool, choosing the layer
    try:
        layer = numba.threading_layer()
    except ValueError:                         # not started (should not happen after the above)
        layer = None
    return {"layer": layer, "threads": int(threads), "max_threads": max_threads(),
            "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
            "NUMBA_THREADING_LAYER": os.environ.get("NUMBA_THREADING_LAYER")}
