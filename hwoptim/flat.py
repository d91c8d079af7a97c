"""Flat parameter buffers: many arrays as views into one contiguous vector.

An optimizer over ``FlatParams.params`` updates every array with one kernel launch per step.
Grads get the same layout (``grads`` and ``grad_views``): write each gradient into its view
and step with the flat vector, so no gather is needed per step.
"""
from __future__ import annotations

import numpy as np

ALIGN = 16  # bytes: every view starts on a 16-byte boundary, so GPU kernels can use 16-byte loads


class FlatParams:
    """Contiguous storage for arrays of the given ``shapes``.

    Args:
        shapes: one shape (tuple of ints) per array.
        dtype: float32 or float64.
        xp: the array module to allocate with, ``numpy`` (default) or ``cupy``.

    Attributes:
        params, grads: the 1-D vectors to pass to an optimizer and to ``step``.
        views, grad_views: per-array views of them, in ``shapes`` order.
        offsets: where each array starts in the vectors (elements).
    """

    def __init__(self, shapes, dtype=np.float32, xp=np):
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype={dtype}: expected float32 or float64")
        shapes = [tuple(int(d) for d in (s if isinstance(s, (tuple, list)) else (s,)))
                  for s in shapes]
        if not shapes:
            raise ValueError("shapes is empty; expected at least one shape")
        for i, s in enumerate(shapes):
            if any(d < 0 for d in s):
                raise ValueError(f"shapes[{i}]={s}: expected non-negative sizes")
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
        """A buffer holding copies of ``arrays`` (one dtype); use its views from now on."""
        arrays = list(arrays)
        if xp is None:
            xp = np if isinstance(arrays[0], np.ndarray) else __import__("cupy")
        flat = cls([a.shape for a in arrays], arrays[0].dtype, xp)
        for v, a in zip(flat.views, arrays):
            v[...] = a
        return flat

    def __len__(self):
        return len(self.shapes)

    def __repr__(self):
        return f"FlatParams({len(self.shapes)} arrays, {self.size} elements, {self.dtype})"
