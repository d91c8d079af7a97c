"""Flat parameter buffers: many arrays as views into one contiguous vector.

An optimizer over ``FlatParams.params`` updates every array with one kernel launch per step.
Grads get the same layout (``grads`` and ``grad_views``): write each gradient into its view
and step with the flat vector, so no gather is needed per step.
"""
from __future__ import annotations

import numbers
import sys

import numpy as np

from . import backends as _backends
from . import formats

ALIGN = 16  # bytes: every view starts on a 16-byte boundary, so GPU kernels can use 16-byte loads
_DTYPES = ("float32", "float64", "float16", "bfloat16")   # (bfloat16: ml_dtypes', NumPy only)
_EXPECTED = "float32, float64, float16 or bfloat16"
_KIND = {"host": "a NumPy array", "cuda": "a CuPy array"}


def _module_family(xp) -> str | None:
    """``"host"`` for the numpy module, ``"cuda"`` for cupy (never imported here), else None."""
    if xp is np:
        return "host"
    if xp is not None and xp is sys.modules.get("cupy"):
        return "cuda"
    return None


def _check_xp(xp):
    fam = _module_family(xp)
    if fam is None:
        raise TypeError(f"xp={xp!r}: expected the numpy or the cupy module (import cupy; "
                        f"xp=cupy)")
    return fam


def _check_dtype(dtype, fam: str = "host") -> np.dtype:
    try:                 # np.dtype(None) is float64, and None == np.dtype(float64) is True
        dt = np.dtype(dtype) if dtype is not None else None
    except TypeError:
        dt = None
    if dt is None or formats.dtype_name(dt) not in _DTYPES:
        raise TypeError(f"dtype={dt if dt is not None else repr(dtype)}: expected {_EXPECTED}")
    if fam == "cuda" and formats.dtype_name(dt) == "bfloat16":
        raise TypeError("dtype=bfloat16 with xp=cupy: CuPy has no bfloat16; expected float32, "
                        "float64 or float16")
    return dt


def _dim(d) -> bool:
    return isinstance(d, (numbers.Integral, np.integer)) and not isinstance(d, (bool, np.bool_))


def _check_shape(i, s) -> tuple:
    """``s`` (an int, or a tuple or list of ints) as a tuple of Python ints."""
    dims = s if isinstance(s, (tuple, list)) else (s,)
    if not all(_dim(d) for d in dims):
        raise TypeError(f"shapes[{i}]={s!r}: expected a shape, a tuple of ints (or one int)")
    dims = tuple(int(d) for d in dims)
    if any(d < 0 for d in dims):
        raise ValueError(f"shapes[{i}]={s!r}: expected non-negative sizes")
    return dims


class FlatParams:
    """Contiguous storage for arrays of the given ``shapes``.

    Args:
        shapes: one shape (a tuple of ints, or an int) per array.
        dtype: float32, float64, float16, or ``ml_dtypes.bfloat16`` (NumPy only): a storage
            format's params (``state_dtype=``, ``stochastic_rounding=`` ... on the
            optimizer).
        xp: the array module to allocate with, ``numpy`` (default) or ``cupy``.

    Attributes:
        params, grads: the 1-D vectors to pass to an optimizer and to ``step``.
        views, grad_views: per-array views of them, in ``shapes`` order.
        offsets: where each array starts in the vectors (elements).
    """

    def __init__(self, shapes, dtype=np.float32, xp=np):
        dtype = _check_dtype(dtype, _check_xp(xp))
        if isinstance(shapes, (str, bytes)) or not hasattr(shapes, "__iter__"):
            raise TypeError(f"shapes={shapes!r}: expected a list of shapes (tuples of ints)")
        shapes = [_check_shape(i, s) for i, s in enumerate(shapes)]
        if not shapes:
            raise ValueError("shapes is empty; expected at least one shape")
        step = ALIGN // dtype.itemsize
        self.shapes, self.dtype, self.offsets = shapes, dtype, []
        end = 0
        for s in shapes:
            self.offsets.append(end)
            size = int(np.prod(s, dtype=np.int64))
            end += -(-size // step) * step          # round up to the next aligned start
        self.size = end
        self.params = xp.zeros(end, dtype=dtype)
        self.grads = xp.zeros(end, dtype=dtype)
        self.views = self._views(self.params)
        self.grad_views = self._views(self.grads)

    def _views(self, vec) -> list:
        out = []
        for off, s in zip(self.offsets, self.shapes):
            size = int(np.prod(s, dtype=np.int64))
            out.append(vec[off:off + size].reshape(s))
        return out

    @classmethod
    def from_arrays(cls, arrays, xp=None):
        """A buffer holding copies of ``arrays`` (float32, float64, float16 or bfloat16, one
        dtype, all NumPy or all CuPy on one device); use its views from now on.

        ``xp``: ``None`` (the arrays' own module), or that module; a buffer is never made
        on another device than the arrays'."""
        fam = _backends.family(arrays)
        if fam is not None:
            raise TypeError(f"arrays is {_KIND[fam]} of shape {tuple(arrays.shape)}; "
                            f"expected a list of arrays (pass [array] for one)")
        if isinstance(arrays, (str, bytes, dict)) or not hasattr(arrays, "__iter__"):
            raise TypeError(f"arrays is a {type(arrays).__module__}.{type(arrays).__name__}; "
                            f"expected a list of arrays")
        arrays = list(arrays)
        if not arrays:
            raise ValueError("arrays is empty; expected at least one array")
        for i, a in enumerate(arrays):
            f = _backends.family(a)
            if f is None:
                raise TypeError(f"arrays[{i}] is a {type(a).__module__}.{type(a).__name__}; "
                                f"expected a NumPy or CuPy array (numpy.asarray it first)")
            if formats.dtype_name(a.dtype) not in _DTYPES:
                raise TypeError(f"arrays[{i}] has dtype {a.dtype}; expected {_EXPECTED} "
                                f"(convert it with .astype first)")
            if f != _backends.family(arrays[0]):
                raise TypeError(f"arrays[{i}] is {_KIND[f]} but arrays[0] is "
                                f"{_KIND[_backends.family(arrays[0])]}; expected one kind")
            if f == "cuda" and a.device.id != arrays[0].device.id:
                raise TypeError(f"arrays[{i}] is on cuda:{a.device.id} but arrays[0] is on "
                                f"cuda:{arrays[0].device.id}; expected one device")
            if a.dtype != arrays[0].dtype:
                raise TypeError(f"arrays[{i}] has dtype {a.dtype} but arrays[0] has "
                                f"{arrays[0].dtype}; expected one dtype for all arrays (make "
                                f"one FlatParams per dtype)")
        fam = _backends.family(arrays[0])
        if xp is None:
            xp = np if fam == "host" else sys.modules["cupy"]
        elif _check_xp(xp) != fam:
            raise TypeError(f"xp={xp.__name__} but the arrays are {_KIND[fam]}s; expected "
                            f"xp=None or their own module (move them first: hwoptim never "
                            f"copies across devices silently)")
        shapes = [a.shape for a in arrays]
        if fam == "cuda":
            with arrays[0].device:                   # on the arrays' device, not the current one
                flat = cls(shapes, arrays[0].dtype, xp)
        else:
            flat = cls(shapes, arrays[0].dtype, xp)
        for v, a in zip(flat.views, arrays):
            v[...] = a
        return flat

    def __len__(self):
        return len(self.shapes)

    def __repr__(self):
        n = len(self.shapes)
        return (f"FlatParams({n} array{'' if n == 1 else 's'}, {self.size} elements, "
                f"{self.dtype})")
