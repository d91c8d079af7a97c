"""Checking thousands of NumPy grads per step without thousands of Python calls.

``step()`` must check every grad (a plain ``numpy.ndarray``, the params' dtype and shape,
C-contiguous) and know its address (for the overlap check and the multi-tensor launch).
Done per array in Python that is 1-2 µs each, and with 10,000 small arrays it is most of
the step. Here one compiled pass reads the same facts from each array's header: NumPy's
``PyArrayObject_fields`` (data, nd, dimensions, strides, descr, flags), a layout NumPy keeps
stable for compiled extensions, found through ``id()`` (the object's address in CPython).

Trust, but verify: at first use the reader is checked against Python's own answers on probe
arrays of several dtypes, shapes, strides and subclasses; if any answer differs (another
Python implementation, a free-threaded build's larger object header, a future NumPy), it is
not used, and ``step()`` takes the per-array path, which is always correct. A grad the reader
flags is re-checked on that path, which names the problem. ``HWOPTIM_FAST_CHECKS=0`` turns it
off.
"""
from __future__ import annotations

import os
import sys
import threading

import numpy as np

_lock = threading.Lock()
_state = {"checked": False, "reader": None}

# byte offsets in PyArrayObject_fields on 64-bit CPython (ndarraytypes.h)
_TYPE, _DATA, _ND, _DIMS, _DESCR, _FLAGS = 8, 16, 24, 32, 56, 64
_C_CONTIGUOUS = 0x0001


_SOURCE = """\
# hwoptim's grad-header reader (hwoptim/_fastcheck.py); not generated from a spec.
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def load_i64(typingctx, addr):
    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], ir.IntType(64).as_pointer()))
    return types.int64(types.int64), codegen


@intrinsic
def load_i32(typingctx, addr):
    def codegen(context, builder, signature, args):
        v = builder.load(builder.inttoptr(args[0], ir.IntType(32).as_pointer()))
        return builder.sext(v, ir.IntType(64))
    return types.int64(types.int64), codegen


@njit(nogil=False, cache={cache})   # the GIL keeps every header alive and still
def read(ids, type_ptr, descr_ptr, shape_ptr, shape_nd, shape_vals, data_out):
    # for each object address in ids: exactly type_ptr, descr descr_ptr, C-contiguous, the
    # shape at shape_vals[shape_ptr[i]:][:shape_nd[i]]; its data address into data_out.
    # Returns the first index that fails, or -1.
    for i in range(ids.shape[0]):
        a = ids[i]
        if load_i64(a + {TYPE}) != type_ptr or load_i64(a + {DESCR}) != descr_ptr:
            return i
        if (load_i32(a + {FLAGS}) & {C_CONTIGUOUS}) == 0:
            return i
        nd = load_i32(a + {ND})
        if nd != shape_nd[i]:
            return i
        dims = load_i64(a + {DIMS})
        for d in range(nd):
            if load_i64(dims + 8 * d) != shape_vals[shape_ptr[i] + d]:
                return i
        data_out[i] = load_i64(a + {DATA})
    return -1
"""


def _build():
    from .backends import diskcache
    src = lambda cache: _SOURCE.format(   # noqa: E731
        cache=bool(cache), TYPE=_TYPE, DESCR=_DESCR, FLAGS=_FLAGS, C_CONTIGUOUS=_C_CONTIGUOUS,
        ND=_ND, DIMS=_DIMS, DATA=_DATA)
    mod = diskcache.load_module(src, "grad_headers")
    none = np.zeros(0, np.int64)          # compiled (or loaded) without reading anything
    diskcache.first_call(mod, mod.read, (none, 0, 0, none, none, none, none.copy()))
    return mod.read


def _verify(read) -> bool:
    """The reader's answers equal Python's on probe arrays, or it must not be used."""
    f32 = np.dtype(np.float32)
    good = [np.zeros(5, np.float32), np.ones((3, 4), np.float32), np.empty((2, 0, 3), np.float32),
            np.zeros(7, np.float32)[2:]]
    bad = [np.zeros(10, np.float32)[::2], np.zeros((4, 3), np.float32).T,
           np.zeros(5, np.float64), np.zeros(5, np.float32).view(np.recarray),
           np.ma.zeros(5, np.float32), np.zeros(4, np.float32).reshape(4, 1)]
    shapes = [a.shape for a in good] + [(5,), (3, 4), (5,), (5,), (5,), (4,)]
    arrays = good + bad
    ptr, vals = [], []
    for s in shapes:
        ptr.append(len(vals))
        vals += list(s)
    for i, a in enumerate(arrays):
        out = np.full(1, -1, np.int64)
        r = read(np.array([id(a)], np.int64), id(np.ndarray), id(f32),
                 np.array([0], np.int64), np.array([len(shapes[i])], np.int64),
                 np.array(vals[ptr[i]:ptr[i] + len(shapes[i])] or [0], np.int64), out)
        want_ok = i < len(good)
        if (r == -1) != want_ok:
            return False
        if want_ok and out[0] != a.__array_interface__["data"][0]:
            return False
    return True


def reader():
    """The compiled header reader, or ``None`` where it must not be used."""
    if _state["checked"]:
        return _state["reader"]
    with _lock:
        if not _state["checked"]:
            r = None
            gil = getattr(sys, "_is_gil_enabled", None)      # free-threaded builds: no
            ok_platform = (sys.implementation.name == "cpython" and sys.maxsize > 2 ** 32
                           and (gil is None or gil())
                           and os.environ.get("HWOPTIM_FAST_CHECKS", "1") != "0")
            if ok_platform:
                try:
                    cand = _build()
                    r = cand if _verify(cand) else None
                except Exception:       # no numba, or it cannot compile this: not used
                    r = None
            _state["reader"], _state["checked"] = r, True
    return _state["reader"]
