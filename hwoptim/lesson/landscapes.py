"""Test functions for optimizers: 2-D landscapes to draw, and N-dimensional forms of the
saddle and the valley to run the same experiments on large vectors.

Every landscape has ``value(p)`` and ``gradient(p, out=None)`` over points ``p`` of shape
``(..., dim)`` (analytic gradients, vectorised over any number of points), a good
``start``, its ``minimum`` (``None`` for the saddles, which have none) and its
``min_value``. 2-D ones also have ``f(x, y)`` and ``grad(x, y)`` for grids, and their
standard plotting range ``xlim``, ``ylim``.

Arrays keep their array module: NumPy in, NumPy out; CuPy in, CuPy out. CuPy is never
imported here; a CuPy array can only arrive if CuPy is already loaded.

The 2-D landscapes (``get(name)`` or the functions below):

==================== =============================================== ====================
name                 f(x, y)                                         minimum
==================== =============================================== ====================
saddle               x² − y²                                         none (saddle at 0)
anisotropic-saddle   a·x² − b·y², a = 1, b = 0.1 (the lesson's)      none (saddle at 0)
valley               (x²/κ + y²) / 2, condition number κ = 100       (0, 0)
beale                Beale's function                                (3, 0.5)
rosenbrock           (1 − x)² + 100·(y − x²)²                        (1, 1)
rastrigin            20 + Σ (xᵢ² − 10·cos 2πxᵢ)                      (0, 0)
himmelblau           (x² + y − 11)² + (x + y² − 7)²                  four, all f = 0
styblinski-tang      ½ Σ (xᵢ⁴ − 16xᵢ² + 5xᵢ)                         (−2.9035, −2.9035),
                                                                     and 3 local ones
==================== =============================================== ====================

N-dimensional: :func:`saddle_nd` and :func:`valley_nd` (quadratics with ``n`` curvatures).
"""
from __future__ import annotations

import math
import sys

import numpy as np

__all__ = ["Landscape", "Quadratic", "Function2D", "LANDSCAPES", "get", "saddle",
           "anisotropic_saddle", "valley", "beale", "rosenbrock", "rastrigin", "himmelblau",
           "styblinski_tang", "saddle_nd", "valley_nd", "array_module"]


def array_module(a):
    """``cupy`` for a CuPy array (only if CuPy is already imported), else ``numpy``."""
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(a, cp.ndarray):
        return cp
    return np


class Landscape:
    """A differentiable function of ``dim`` variables, with where to start and where it ends.

    Attributes:
        name: the short name ``get`` knows it by.
        title: a line for plots.
        dim: the number of variables.
        start: a good starting point (a tuple, or a NumPy vector for N-d ones).
        minima: every local minimum, global first (``()`` for the saddles).
        minimum: the global minimum, or ``None`` where the function is unbounded below.
        min_value: ``value(minimum)``, or ``None``.
        critical_point: the saddle point of the saddles (``None`` otherwise).
        xlim, ylim: the standard plotting range (2-D only).
    """

    name = "landscape"
    title = ""
    dim = 2
    start = None
    minima: tuple = ()
    min_value = None
    critical_point = None
    xlim = ylim = None

    @property
    def minimum(self):
        return self.minima[0] if self.minima else None

    def value(self, p):
        raise NotImplementedError

    def gradient(self, p, out=None):
        raise NotImplementedError

    def __call__(self, p):
        return self.value(p)

    def _check(self, p):
        if p.shape[-1:] != (self.dim,):
            raise ValueError(f"{self.name}: points have shape {tuple(p.shape)}; expected "
                             f"(..., {self.dim})")

    def __repr__(self):
        return f"<landscape {self.name}: {self.title}>"


class Function2D(Landscape):
    """A 2-D landscape from ``f(xp, x, y)`` and ``grad(xp, x, y) -> (gx, gy)``."""

    def __init__(self, name, title, f, grad, *, start, minima=(), min_value=None,
                 xlim, ylim, critical_point=None):
        self.name, self.title = name, title
        self._f, self._grad = f, grad
        self.start = tuple(float(v) for v in start)
        self.minima = tuple(tuple(float(v) for v in m) for m in minima)
        self.min_value = min_value
        self.critical_point = critical_point
        self.xlim, self.ylim = tuple(xlim), tuple(ylim)

    def f(self, x, y):
        """The value at ``(x, y)`` (arrays broadcast together, or floats)."""
        return self._f(array_module(x), x, y)

    def grad(self, x, y):
        """``(df/dx, df/dy)`` at ``(x, y)``."""
        return self._grad(array_module(x), x, y)

    def value(self, p):
        self._check(p)
        return self._f(array_module(p), p[..., 0], p[..., 1])

    def gradient(self, p, out=None):
        self._check(p)
        xp = array_module(p)
        gx, gy = self._grad(xp, p[..., 0], p[..., 1])
        if out is None:
            return xp.stack([xp.broadcast_to(gx, p.shape[:-1]),
                             xp.broadcast_to(gy, p.shape[:-1])], axis=-1).astype(p.dtype)
        out[..., 0] = gx
        out[..., 1] = gy
        return out


class Quadratic(Landscape):
    """``f(p) = ½ Σ cᵢ pᵢ²``: curvature ``cᵢ`` along axis ``i`` (negative: the function goes
    down that way). Any ``dim``; the gradient is ``c ⊙ p``, computed with the input's array
    module and dtype (curvatures are copied to the device once and cached)."""

    def __init__(self, name, title, curvatures, *, start, xlim=None, ylim=None):
        self.name, self.title = name, title
        self.curvatures = np.asarray(curvatures, dtype=np.float64).reshape(-1)
        self.dim = self.curvatures.size
        self.start = np.asarray(start, dtype=np.float64).reshape(-1)
        if self.dim == 2:
            self.start = tuple(float(v) for v in self.start)
        bounded = bool(np.all(self.curvatures > 0))
        self.minima = ((0.0,) * self.dim,) if bounded and self.dim <= 2 else ()
        self._bounded = bounded
        self.min_value = 0.0 if bounded else None
        self.critical_point = None if bounded else (0.0,) * min(self.dim, 2)
        self.xlim, self.ylim = xlim, ylim
        self._on_device = {}

    @property
    def minimum(self):
        if not self._bounded:
            return None
        return (0.0,) * self.dim if self.dim <= 2 else np.zeros(self.dim)

    @property
    def condition_number(self) -> float:
        a = np.abs(self.curvatures)
        return float(a.max() / a.min())

    def _c(self, xp, dtype, p):
        if xp is np:
            key = (np.dtype(dtype).str, None)
        else:
            key = (np.dtype(dtype).str, p.device.id)
        c = self._on_device.get(key)
        if c is None:
            if xp is np:
                c = self.curvatures.astype(dtype)
            else:
                with p.device:
                    c = xp.asarray(self.curvatures.astype(dtype))
            self._on_device[key] = c
        return c

    def value(self, p):
        self._check(p)
        xp = array_module(p)
        c = self._c(xp, p.dtype, p)
        return 0.5 * (c * p * p).sum(axis=-1)

    def gradient(self, p, out=None):
        self._check(p)
        xp = array_module(p)
        c = self._c(xp, p.dtype, p)
        if out is None:
            return c * p
        return xp.multiply(c, p, out=out)

    def f(self, x, y):
        self._require_2d()
        c = self.curvatures
        return 0.5 * (c[0] * x * x + c[1] * y * y)

    def grad(self, x, y):
        self._require_2d()
        c = self.curvatures
        return c[0] * x, c[1] * y

    def _require_2d(self):
        if self.dim != 2:
            raise ValueError(f"{self.name} has {self.dim} variables; f(x, y) is for 2-D "
                             f"landscapes (use value(p))")


# ----------------------------------------------------------------------------- the saddles

def saddle(a: float = 1.0, b: float = 1.0, *, offset: float = 1e-3) -> Quadratic:
    """``a·x² − b·y²``: a ridge along the x axis (across it, y, the function goes down).

    The start is on the ridge near the right edge, ``offset`` across it: exactly on the
    ridge (y = 0) the y-gradient is 0 and no gradient method can ever leave.
    """
    if a <= 0 or b <= 0:
        raise ValueError(f"saddle(a={a}, b={b}): expected a > 0 and b > 0")
    name = "saddle" if (a, b) == (1.0, 1.0) else "anisotropic-saddle"
    title = f"saddle {_coef(a)}x² − {_coef(b)}y²"
    return Quadratic(name, title, (2 * a, -2 * b), start=(1.2, offset),
                     xlim=(-1.5, 1.5), ylim=(-1.5, 1.5))


def anisotropic_saddle(a: float = 1.0, b: float = 0.1, *, offset: float = 1e-3) -> Quadratic:
    """The lesson's saddle: ``a·x² − b·y²`` with ``b ≪ a``, so the way down (y) is nearly
    flat and its gradient tiny; plain gradient descent barely moves along it."""
    s = saddle(a, b, offset=offset)
    s.name = "anisotropic-saddle"
    return s


def saddle_nd(n: int, a: float = 1.0, b: float = 0.1, *, offset: float = 1e-3,
              x0: float = 1.2) -> Quadratic:
    """The saddle in ``n`` dimensions: ``Σ_{i<n/2} a·pᵢ² − Σ_{i≥n/2} b·pᵢ²``.

    The first half of the coordinates curve up (start ``x0``, like the 2-D ``x``), the
    second half down (start ``offset``, like ``y``): each (up, down) pair is the 2-D saddle,
    so elementwise optimizers follow the 2-D path in every pair.
    """
    n = int(n)
    if n < 2 or n % 2:
        raise ValueError(f"saddle_nd(n={n}): expected an even n >= 2")
    c = np.concatenate([np.full(n // 2, 2.0 * a), np.full(n // 2, -2.0 * b)])
    start = np.concatenate([np.full(n // 2, x0), np.full(n // 2, offset)])
    return Quadratic(f"saddle-{n}d", f"saddle in {n} dimensions, a={a}, b={b}", c,
                     start=start)


# ----------------------------------------------------------------------------- the valleys

def valley(kappa: float = 100.0) -> Quadratic:
    """A long narrow valley: ``(x²/κ + y²)/2``, curvature 1 across (y) and ``1/κ`` along
    (x), so the condition number is ``κ``. The start, ``(−√κ, 1)``, puts the same height
    (½) in each direction."""
    if kappa < 1:
        raise ValueError(f"valley(kappa={kappa}): expected kappa >= 1")
    r = math.sqrt(kappa)
    return Quadratic("valley", f"valley (x²/{_num(kappa)} + y²)/2, condition number "
                     f"{_num(kappa)}", (1.0 / kappa, 1.0), start=(-r, 1.0),
                     xlim=(-1.2 * r, 1.2 * r), ylim=(-1.5, 1.5))


def valley_nd(n: int, kappa: float = 100.0) -> Quadratic:
    """The valley in ``n`` dimensions: curvatures log-spaced from ``1/κ`` to 1 (condition
    number ``κ``), starting at ``1/√cᵢ`` (height ½ in every direction, as in 2-D)."""
    n = int(n)
    if n < 2 or kappa < 1:
        raise ValueError(f"valley_nd(n={n}, kappa={kappa}): expected n >= 2, kappa >= 1")
    c = np.logspace(-math.log10(kappa), 0.0, n)
    c[0], c[-1] = 1.0 / kappa, 1.0
    return Quadratic(f"valley-{n}d", f"valley in {n} dimensions, condition number "
                     f"{_num(kappa)}", c, start=1.0 / np.sqrt(c))


# ----------------------------------------------------------------------------- classics

def beale() -> Function2D:
    """Beale's function; minimum 0 at (3, 0.5), in a flat curved valley."""
    def f(xp, x, y):
        return ((1.5 - x + x * y) ** 2 + (2.25 - x + x * y * y) ** 2
                + (2.625 - x + x * y ** 3) ** 2)

    def grad(xp, x, y):
        a, b, c = 1.5 - x + x * y, 2.25 - x + x * y * y, 2.625 - x + x * y ** 3
        gx = 2 * a * (y - 1) + 2 * b * (y * y - 1) + 2 * c * (y ** 3 - 1)
        gy = 2 * a * x + 4 * b * x * y + 6 * c * x * y * y
        return gx, gy
    return Function2D("beale", "Beale's function", f, grad, start=(1.0, 1.4),
                      minima=[(3.0, 0.5)], min_value=0.0, xlim=(-4.5, 4.5), ylim=(-4.5, 4.5))


def rosenbrock(a: float = 1.0, b: float = 100.0) -> Function2D:
    """Rosenbrock's banana ``(a − x)² + b·(y − x²)²``; minimum 0 at (a, a²)."""
    def f(xp, x, y):
        return (a - x) ** 2 + b * (y - x * x) ** 2

    def grad(xp, x, y):
        return -2 * (a - x) - 4 * b * x * (y - x * x), 2 * b * (y - x * x)
    return Function2D("rosenbrock", "Rosenbrock (1 − x)² + 100(y − x²)²", f, grad,
                      start=(-1.2, 1.0), minima=[(a, a * a)], min_value=0.0,
                      xlim=(-2.0, 2.0), ylim=(-1.0, 3.0))


def rastrigin(A: float = 10.0) -> Function2D:
    """Rastrigin's function ``2A + Σ (xᵢ² − A·cos 2πxᵢ)``: minimum 0 at the origin among
    a grid of local minima near every integer point."""
    tau = 2 * math.pi

    def f(xp, x, y):
        return 2 * A + x * x - A * xp.cos(tau * x) + y * y - A * xp.cos(tau * y)

    def grad(xp, x, y):
        return 2 * x + A * tau * xp.sin(tau * x), 2 * y + A * tau * xp.sin(tau * y)
    return Function2D("rastrigin", "Rastrigin", f, grad, start=(-3.2, 2.6),
                      minima=[(0.0, 0.0)], min_value=0.0, xlim=(-5.12, 5.12),
                      ylim=(-5.12, 5.12))


_HIMMELBLAU_MINIMA = [(3.0, 2.0), (-2.805118086952745, 3.131312518250573),
                      (-3.779310253377747, -3.283185991286170),
                      (3.584428340330492, -1.848126526964404)]


def himmelblau() -> Function2D:
    """Himmelblau's function: four minima, all with value 0. Started near its local
    maximum (−0.2708, −0.9230), methods that step differently fall into different ones."""
    def f(xp, x, y):
        return (x * x + y - 11) ** 2 + (x + y * y - 7) ** 2

    def grad(xp, x, y):
        u, v = x * x + y - 11, x + y * y - 7
        return 4 * x * u + 2 * v, 2 * u + 4 * y * v
    return Function2D("himmelblau", "Himmelblau (four minima, all f = 0)", f, grad,
                      start=(-0.3, -0.85), minima=_HIMMELBLAU_MINIMA, min_value=0.0,
                      xlim=(-5.0, 5.0), ylim=(-5.0, 5.0))


def _st_roots():
    # the 1-D derivative 2x³ − 16x + 5/2 = 0: roots near −2.90 (global), 0.16 (max), 2.75
    r = np.sort(np.roots([2.0, 0.0, -16.0, 2.5]).real)
    return float(r[0]), float(r[2])


def styblinski_tang() -> Function2D:
    """Styblinski–Tang ``½ Σ (xᵢ⁴ − 16xᵢ² + 5xᵢ)``: four minima of different depths; the
    global one at ``xᵢ = −2.9035`` (f ≈ −78.332), three local ones where a coordinate is
    2.7468 instead."""
    lo, hi = _st_roots()

    def f(xp, x, y):
        return 0.5 * (x ** 4 - 16 * x * x + 5 * x + y ** 4 - 16 * y * y + 5 * y)

    def grad(xp, x, y):
        return 2 * x ** 3 - 16 * x + 2.5, 2 * y ** 3 - 16 * y + 2.5

    def f1(v):
        return 0.5 * (v ** 4 - 16 * v * v + 5 * v)
    minima = [(lo, lo), (lo, hi), (hi, lo), (hi, hi)]
    return Function2D("styblinski-tang", "Styblinski–Tang (one global, three local minima)",
                      f, grad, start=(0.3, 0.2), minima=minima, min_value=2 * f1(lo),
                      xlim=(-5.0, 5.0), ylim=(-5.0, 5.0))


def _num(v) -> str:
    return f"{v:g}"


def _coef(v) -> str:
    return "" if v == 1 else f"{v:g}·"


LANDSCAPES = {
    "anisotropic-saddle": anisotropic_saddle,
    "saddle": saddle,
    "valley": valley,
    "beale": beale,
    "rosenbrock": rosenbrock,
    "rastrigin": rastrigin,
    "himmelblau": himmelblau,
    "styblinski-tang": styblinski_tang,
}


def get(name: str, **params) -> Landscape:
    """The landscape called ``name`` (a key of ``LANDSCAPES``), made with ``params``
    (``get("valley", kappa=1000)``, ``get("anisotropic-saddle", b=0.01)``)."""
    if name not in LANDSCAPES:
        raise ValueError(f"no landscape is called {name!r}; expected one of "
                         f"{', '.join(LANDSCAPES)}")
    return LANDSCAPES[name](**params)
