"""Run hwoptim optimizers on a landscape and keep the path.

``run(landscape, method, steps)`` starts at ``landscape.start`` (or ``start``), takes
``steps`` steps with the method's optimizer on the chosen backend, and returns a
:class:`Trajectory`: the ``steps + 1`` points visited (start included) and the loss at each.
``run_many`` does this for several methods, each with its own hyperparameters.

A :class:`Method` is a label, an hwoptim optimizer class name and hyperparameters;
``parse_method("Momentum=SGD(lr=0.01, momentum=0.9)")`` reads one from text, and
``LESSON_METHODS`` are the seven of the lesson's animation. ``match_first_step`` sets each
method's learning rate so that its first step from the start has a given length, which is
how the pictures and the tests compare methods fairly.
"""
from __future__ import annotations

import ast
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

import hwoptim
from hwoptim import backends as _backends
from hwoptim import formats
from .landscapes import Landscape, array_module

__all__ = ["Method", "Trajectory", "LESSON_METHODS", "ALIASES", "parse_method", "run",
           "run_many", "first_step", "match_first_step"]


@dataclass(frozen=True)
class Method:
    """An optimizer to run: ``label`` for legends, ``optimizer`` an hwoptim class name
    (``"SGD"``, ``"Adam"``, ...), ``hypers`` its keyword arguments (``lr`` included or not:
    without it the class default applies, or ``match_first_step`` sets it)."""
    label: str
    optimizer: str
    hypers: dict = field(default_factory=dict)

    def cls(self):
        if self.optimizer not in hwoptim.RULES:
            raise ValueError(f"method {self.label!r}: no optimizer is called "
                             f"{self.optimizer!r}; expected one of {', '.join(hwoptim.RULES)}")
        return getattr(hwoptim, self.optimizer)

    def make(self, params, backend=None, **override):
        """The optimizer over ``params`` (``override`` replaces hyperparameters; ``dtype``,
        the params' storage, is the run's, not the optimizer's)."""
        kw = {k: v for k, v in {**self.hypers, **override}.items() if k != "dtype"}
        return self.cls()(params, backend=backend, **kw)

    @property
    def storage(self):
        """The params' dtype this method asks for (``dtype='bfloat16'``, ``'float16'``,
        ``'float32'``: a storage format, hwoptim.formats), or ``None``: the run's."""
        return self.hypers.get("dtype")

    def with_hypers(self, **hypers) -> "Method":
        return replace(self, hypers={**self.hypers, **hypers})

    @property
    def lr(self) -> float:
        if "lr" in self.hypers:
            return float(self.hypers["lr"])
        return float(hwoptim.RULES[self.optimizer].hypers["lr"].default)

    def __str__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hypers.items())
        return f"{self.label}={self.optimizer}({args})"


# the names the lesson uses, and what they are in hwoptim (momentum 0.9, as in the lesson's
# animations and most texts; every other hyperparameter is torch.optim's default)
ALIASES = {
    "SGD": ("SGD", {}),
    "Momentum": ("SGD", {"momentum": 0.9}),
    "Nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}),
    "AdaGrad": ("Adagrad", {}),
    "Adadelta": ("Adadelta", {}),
    "RMSProp": ("RMSprop", {}),
    "Adam": ("Adam", {}),
    "AdamW": ("AdamW", {}),
}
LESSON_METHODS = tuple(Method(name, *ALIASES[name]) for name in
                       ("SGD", "Momentum", "Nesterov", "AdaGrad", "Adadelta", "RMSProp", "Adam"))


def parse_method(text: str) -> Method:
    """A method from text: ``[LABEL=]NAME[(key=value, ...)]``.

    ``NAME`` is one of the lesson's names (``SGD``, ``Momentum``, ``Nesterov``, ``AdaGrad``,
    ``Adadelta``, ``RMSProp``, ``Adam``, ``AdamW``; any case) or an hwoptim class name;
    values are Python literals (``betas=(0.9, 0.99)``, ``nesterov=True``); the storage
    format's options are keyword arguments too, and ``dtype=`` the params' dtype
    (``'bfloat16'``, ``'float16'``, ``'float32'``; README, "Storage formats"). Examples:
    ``"Adam(lr=0.05)"``, ``"slow=SGD(lr=0.001)"``, ``"Momentum(momentum=0.5)"``,
    ``"bf16 SR=Adam(lr=0.01, dtype='bfloat16', stochastic_rounding=True)"``.
    """
    s = text.strip()
    head, paren, rest = s.partition("(")
    label = None
    if "=" in head:
        label, head = (t.strip() for t in head.split("=", 1))
        if not label:
            raise ValueError(f"method {text!r}: empty label before '='")
    try:
        tree = ast.parse(head + paren + rest, mode="eval").body
    except SyntaxError:
        raise ValueError(f"method {text!r}: expected [LABEL=]NAME[(key=value, ...)], e.g. "
                         f"'Adam(lr=0.05)' or 'fast=SGD(lr=0.1, momentum=0.9)'") from None
    if isinstance(tree, ast.Name):
        name, kw = tree.id, {}
    elif (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and not tree.args
          and all(k.arg for k in tree.keywords)):
        name = tree.func.id
        kw = {}
        for k in tree.keywords:
            try:
                kw[k.arg] = ast.literal_eval(k.value)
            except ValueError:
                raise ValueError(f"method {text!r}: {k.arg}= must be a number, a tuple or "
                                 f"True/False") from None
    else:
        raise ValueError(f"method {text!r}: expected [LABEL=]NAME[(key=value, ...)] with "
                         f"keyword arguments only")
    known = {k.lower(): k for k in ALIASES}
    known_cls = {k.lower(): k for k in hwoptim.RULES}
    if name.lower() in known:
        alias = known[name.lower()]
        cls, preset = ALIASES[alias]
    elif name.lower() in known_cls:
        alias = cls = known_cls[name.lower()]
        preset = {}
    else:
        raise ValueError(f"method {text!r}: unknown optimizer {name!r}; expected one of "
                         f"{', '.join(ALIASES)} or {', '.join(hwoptim.RULES)}")
    hypers = {k: tuple(v) if isinstance(v, list) else v for k, v in {**preset, **kw}.items()}
    if label is None:
        extra = {k: v for k, v in kw.items() if k != "lr"}
        label = alias + (f"({', '.join(f'{k}={v}' for k, v in extra.items())})"
                         if extra else "")
    m = Method(label, cls, hypers)
    if m.storage is not None and formats.dtype_name(_np_dtype(m.storage)) is None:
        raise ValueError(f"method {text!r}: dtype={m.storage!r}; expected one of "
                         f"{', '.join(formats.PARAM_DTYPES)}")
    # hwoptim checks the hyperparameters, with its messages
    m.make(np.zeros(1, _np_dtype(m.storage or "float64")), backend="numpy")
    return m


@dataclass
class Trajectory:
    """What ``run`` returns.

    Attributes:
        method: the method run (with its learning rate).
        landscape: the landscape's name.
        backend: the hwoptim backend that did every update.
        path: ``(steps + 1, dim)`` float64 host array of the points visited, start first;
            ``None`` when not recorded (large N-d runs); for a ``record`` function, its
            values stacked.
        losses: ``(steps + 1,)`` float64, the loss at each point.
        seconds: wall time of the whole run (gradients, updates and losses).
        optimizer: the optimizer after the run (its ``state`` can be read).
    """
    method: Method
    landscape: str
    backend: str
    path: np.ndarray | None
    losses: np.ndarray
    seconds: float
    optimizer: object = None

    @property
    def steps(self) -> int:
        return len(self.losses) - 1

    @property
    def final(self):
        return None if self.path is None else self.path[-1]


def _np_dtype(name):
    return formats.np_dtype(name) if name in formats.PARAM_DTYPES else np.dtype(name)


def _array_module_for(backend):
    if backend is None:
        return np
    mod = _backends.load(backend)
    if mod.FAMILY == "cuda":
        import cupy   # the caller asked for a GPU backend
        return cupy
    return np


def _host(a) -> np.ndarray:
    """A float64 NumPy copy."""
    xp = array_module(a)
    return np.array(a.get() if xp is not np else a, dtype=np.float64, copy=True)


def run(landscape: Landscape, method: Method, steps: int, *, start=None, backend=None,
        dtype=np.float64, record="auto", progress=None) -> Trajectory:
    """Take ``steps`` steps of ``method`` on ``landscape`` from ``start``.

    Args:
        landscape: a :class:`hwoptim.lesson.landscapes.Landscape` (2-D or N-d).
        method: a :class:`Method` (or text for :func:`parse_method`).
        steps: the number of updates; the path has ``steps + 1`` points.
        start: the first point (default ``landscape.start``); any array-like of ``dim``
            values, or a CuPy array (which then picks the GPU).
        backend: an hwoptim backend name (``None``: the fastest for the arrays; a GPU
            backend such as ``"cupy"`` puts the point on the GPU).
        dtype: float64 (default) or float32.
        record: ``"point"`` (every point, to ``path``), ``None`` (losses only), a function
            of the point returning a small array (recorded instead), or ``"auto"``: points
            up to 64 dimensions, else nothing.
        progress: called as ``progress(k)`` after each step, if given.
    """
    if isinstance(method, str):
        method = parse_method(method)
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps={steps}: expected a number >= 0")
    src = landscape.start if start is None else start
    xp = array_module(src) if array_module(src) is not np else _array_module_for(backend)
    stored = None
    if method.storage is not None:      # params in a storage format: math in float64 here
        stored, dtype = _np_dtype(method.storage), np.float64
    p = xp.array(src, dtype=dtype).reshape(-1)
    if p.shape != (landscape.dim,):
        raise ValueError(f"start has {p.size} values; {landscape.name} has {landscape.dim} "
                         f"variables")
    g = xp.zeros_like(p)
    if stored is not None:
        p_s, g_s = p.astype(stored), xp.zeros(p.shape, stored)
        opt = method.make(p_s, backend=backend)
        inner = opt.step

        class _Stored:             # the landscape sees float64; the optimizer its storage
            backend_name, param_groups, state = opt.backend_name, opt.param_groups, opt.state

            @staticmethod
            def step(grad):
                g_s[...] = grad.astype(stored)
                inner([g_s])
                p[...] = p_s.astype(np.float64)
        opt = _Stored
    else:
        opt = method.make(p, backend=backend)
    if record == "auto":
        record = "point" if landscape.dim <= 64 else None
    take = (lambda q: _host(q)) if record == "point" else \
           (lambda q: _host(xp.asarray(record(q)))) if callable(record) else None
    path = [take(p)] if take else None
    losses = np.empty(steps + 1)
    t0 = time.perf_counter()
    with np.errstate(over="ignore", invalid="ignore"):
        losses[0] = float(landscape.value(p))
        for k in range(1, steps + 1):
            landscape.gradient(p, out=g)
            opt.step(g)
            losses[k] = float(landscape.value(p))
            if take:
                path.append(take(p))
            if progress is not None:
                progress(k)
    seconds = time.perf_counter() - t0
    lr = method.hypers.get("lr", opt.param_groups[0]["lr"])
    return Trajectory(method.with_hypers(lr=lr), landscape.name, opt.backend_name,
                      None if path is None else np.stack(path), losses, seconds, opt)


def run_many(landscape: Landscape, methods, steps: int, **kwargs) -> list:
    """``run`` for each method (a Method or text), same landscape, start and backend."""
    return [run(landscape, m, steps, **kwargs) for m in methods]


def first_step(landscape: Landscape, method: Method, *, start=None, backend=None,
               dtype=np.float64) -> np.ndarray:
    """The displacement of ``method``'s first step from ``start`` with ``lr = 1`` (host
    float64), measured by taking the step with hwoptim."""
    if isinstance(method, str):
        method = parse_method(method)
    t = run(landscape, method.with_hypers(lr=1.0), 1, start=start, backend=backend,
            dtype=dtype, record="point" if landscape.dim <= 64 else (lambda q: q))
    return t.path[1] - t.path[0]


def match_first_step(landscape: Landscape, methods, length: float, *, start=None,
                     backend=None, dtype=np.float64, keep_lr: bool = True) -> list:
    """The methods with ``lr`` set so that each one's first step from ``start`` has
    Euclidean length ``length``.

    Every rule's first step here is ``lr`` times a vector that does not depend on ``lr``
    (SGD: ``g``; Nesterov: ``(1 + μ)g``; AdaGrad, Adam: ``g/(|g| + eps)``; RMSProp:
    ``g/(√(1−α)|g| + eps)``; Adadelta: ``√eps/√((1−ρ)g² + eps)·g``), so one measured step
    with ``lr = 1`` gives the learning rate. With ``keep_lr``, methods that already set
    ``lr`` keep it.
    """
    out = []
    for m in methods:
        if isinstance(m, str):
            m = parse_method(m)
        if keep_lr and "lr" in m.hypers:
            out.append(m)
            continue
        d = float(np.linalg.norm(first_step(landscape, m, start=start, backend=backend,
                                            dtype=dtype)))
        if not (d > 0 and math.isfinite(d)):
            raise ValueError(f"{m.label}: its first step from the start has length {d}; "
                             f"cannot scale it to {length}")
        out.append(m.with_hypers(lr=length / d))
    return out
