"""The small language update rules are written in.

A rule is data plus two pure functions (see ``hwoptim/rules/``):

* ``scalars(h, t)`` turns hyperparameters ``h`` and the step count ``t`` into the per-step
  scalars the element kernel needs (bias corrections, step size, ...).
* ``update(x, k, opt)`` is the per-element math: ``x`` holds the element's ``param``,
  ``grad`` and state values, ``k`` the per-step scalars, ``opt`` the static options (plain
  Python bools, so ``if opt.maximize:`` picks code when a kernel is built). It returns the
  new values of ``param`` and of every state buffer it changes.

The same functions run three ways: on NumPy arrays (the reference backend), on Python floats
(per-step scalars on the host), and on :class:`Expr` placeholders, which records an
expression graph that ``hwoptim.codegen`` prints as Numba, C++ or CUDA source.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np

# ----------------------------------------------------------------------------- expressions

_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/",
           "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


class Expr:
    """One node of a traced expression graph.

    ``op`` is ``"array"``/``"scalar"`` for inputs (``value`` holds the name), ``"const"``
    for numbers (``value`` holds the float), otherwise an operation over ``args``.
    """

    __slots__ = ("op", "args", "value")

    def __init__(self, op: str, args: tuple = (), value=None):
        self.op, self.args, self.value = op, args, value

    def __repr__(self):
        if self.op in ("array", "scalar", "const"):
            return f"{self.op}({self.value!r})"
        return f"{self.op}{self.args!r}"

    def __bool__(self):
        raise TypeError("a traced value has no truth value inside a rule spec: use "
                        "ops.where(...) for data-dependent choices, and the static options "
                        "(opt.*) to choose code")

    # arithmetic and comparisons build nodes; constants are folded
    def __add__(self, o): return _binary("add", self, o)
    def __radd__(self, o): return _binary("add", o, self)
    def __sub__(self, o): return _binary("sub", self, o)
    def __rsub__(self, o): return _binary("sub", o, self)
    def __mul__(self, o): return _binary("mul", self, o)
    def __rmul__(self, o): return _binary("mul", o, self)
    def __truediv__(self, o): return _binary("div", self, o)
    def __rtruediv__(self, o): return _binary("div", o, self)
    def __pow__(self, o): return _node("pow", self, o)
    def __rpow__(self, o): return _node("pow", o, self)
    def __neg__(self): return _node("neg", self)
    def __lt__(self, o): return _binary("lt", self, o)
    def __le__(self, o): return _binary("le", self, o)
    def __gt__(self, o): return _binary("gt", self, o)
    def __ge__(self, o): return _binary("ge", self, o)
    __hash__ = object.__hash__


def _wrap(x) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, (bool, np.bool_)):
        return Expr("const", value=float(x))
    if isinstance(x, (int, float, np.integer, np.floating)):
        return Expr("const", value=float(x))
    raise TypeError(f"cannot use {type(x).__name__} {x!r} in a traced rule")


def _node(op, *args):
    args = tuple(_wrap(a) for a in args)
    if all(a.op == "const" for a in args):        # fold in float64, as the host would
        return Expr("const", value=float(_eval(op, [a.value for a in args], math_ops)))
    return Expr(op, args)


def _binary(op, a, b):
    a, b = _wrap(a), _wrap(b)
    # x*1, x+0, x-0, x/1 are exact identities; drop them so generated code stays short
    if op in ("mul", "div") and b.op == "const" and b.value == 1.0:
        return a
    if op == "mul" and a.op == "const" and a.value == 1.0:
        return b
    return _node(op, a, b)


# ----------------------------------------------------------------------------- ops

class _MathOps:
    """Element operations on host floats and NumPy arrays (NumPy semantics)."""
    sqrt = staticmethod(np.sqrt)
    abs = staticmethod(np.abs)
    maximum = staticmethod(np.maximum)
    minimum = staticmethod(np.minimum)
    @staticmethod
    def sign(x):
        """-1, 0 or 1, and 0 for NaN as torch.sign gives (numpy.sign gives NaN)."""
        if isinstance(x, np.ndarray):
            return np.where(x > 0, 1.0, np.where(x < 0, -1.0, 0.0)).astype(x.dtype)
        return float((x > 0) - (x < 0))

    @staticmethod
    def norm(x):
        """The 2-norm of all of ``x`` (one array: a param, or a buffer of it), summed in
        float64 and rounded once to ``x``'s dtype."""
        if isinstance(x, np.ndarray):
            x64 = x.astype(np.float64, copy=False).reshape(-1)
            return x.dtype.type(np.sqrt(np.dot(x64, x64)))
        return abs(x)

    @staticmethod
    def rms(x):
        """The root mean square of all of ``x`` (one array), summed in float64 and rounded
        once to ``x``'s dtype: ``norm(x) / sqrt(x.size)``."""
        if isinstance(x, np.ndarray):
            x64 = x.astype(np.float64, copy=False).reshape(-1)
            return x.dtype.type(np.sqrt(np.dot(x64, x64) / x64.size) if x64.size else np.nan)
        return abs(x)

    @staticmethod
    def mean(x, axis):
        """The mean along ``axis`` (-1: over each row's columns, -2: over each matrix's
        rows), kept as an axis of length 1, summed in float64 and rounded once to ``x``'s
        dtype."""
        if isinstance(x, np.ndarray):
            return np.mean(x, axis=axis, dtype=np.float64, keepdims=True).astype(x.dtype)
        return x

    @staticmethod
    def where(c, a, b):
        if isinstance(c, (bool, np.bool_)):
            return a if c else b
        return np.where(c, a, b)


math_ops = _MathOps()


def _eval(op, a, m):
    """Apply ``op`` to evaluated operands ``a`` with the operation set ``m``."""
    if op == "add": return a[0] + a[1]
    if op == "sub": return a[0] - a[1]
    if op == "mul": return a[0] * a[1]
    if op == "div": return a[0] / a[1]
    if op == "neg": return -a[0]
    if op == "pow": return a[0] ** a[1]
    if op == "lt": return a[0] < a[1]
    if op == "le": return a[0] <= a[1]
    if op == "gt": return a[0] > a[1]
    if op == "ge": return a[0] >= a[1]
    if op == "sqrt": return m.sqrt(a[0])
    if op == "abs": return m.abs(a[0])
    if op == "max": return m.maximum(a[0], a[1])
    if op == "min": return m.minimum(a[0], a[1])
    if op == "where": return m.where(a[0], a[1], a[2])
    if op == "norm": return m.norm(a[0])
    if op == "rms": return m.rms(a[0])
    raise ValueError(f"unknown operation {op!r}")


def _dispatch(op, name):
    def f(*args):
        if any(isinstance(a, Expr) for a in args):
            return _node(op, *args)
        return getattr(math_ops, name)(*args)
    f.__name__ = name
    return f


def _sign(x):
    """-1, 0 or 1; 0 for NaN too, as torch.sign (sign-based rules then treat a NaN as no
    information, as torch's do). Traced, it is two ``where``s, so every backend computes it
    with the same comparisons."""
    if isinstance(x, Expr):
        return _node("where", x > 0, 1.0, _node("where", x < 0, -1.0, 0.0))
    return math_ops.sign(x)


class ops:
    """The operations a rule may use besides + - * / ** and comparisons."""
    sqrt = staticmethod(_dispatch("sqrt", "sqrt"))
    abs = staticmethod(_dispatch("abs", "abs"))
    maximum = staticmethod(_dispatch("max", "maximum"))
    minimum = staticmethod(_dispatch("min", "minimum"))
    sign = staticmethod(_sign)
    where = staticmethod(_dispatch("where", "where"))
    # a reduction: the 2-norm of a whole array's values of an element expression (LAMB's
    # ‖p‖ and ‖u‖); the kernels compute it in a pass before the update (codegen)
    norm = staticmethod(_dispatch("norm", "norm"))
    # the root mean square of a whole array's values (Adafactor's RMS(p), RMS(u)): a norm
    # divided by the square root of the array's size
    rms = staticmethod(_dispatch("rms", "rms"))

    @staticmethod
    def mean(x, axis: int):
        """The mean along the last axis (``axis=-1``: one value per row) or the one before
        (``axis=-2``: one per column, or per matrix of a row-shaped value), as in
        ``x.mean(axis, keepdims=True)``: Adafactor's factored second moments. A rule using
        it runs on the param's shape (``Rule.shape_flags``), in stages (codegen)."""
        if axis not in (-1, -2):
            raise ValueError(f"ops.mean(x, axis={axis!r}): expected axis -1 or -2")
        if isinstance(x, Expr):
            return Expr("mean", (x,), axis)
        return math_ops.mean(x, axis)


# ----------------------------------------------------------------------------- rule data

def nonneg(v):
    return None if (isinstance(v, numbers.Real) and v >= 0) else "a number >= 0"


def unit_interval(v):
    return None if (isinstance(v, numbers.Real) and 0 <= v < 1) else "a number in [0, 1)"


def pair_in_unit_interval(v):
    ok = (isinstance(v, (tuple, list)) and len(v) == 2
          and all(isinstance(b, numbers.Real) and not isinstance(b, bool) and 0 <= b < 1
                  for b in v))
    return None if ok else "a pair (beta1, beta2) with each in [0, 1)"


@dataclass(frozen=True)
class Hyper:
    """A numeric hyperparameter: default, check (returns what was expected, or None), doc."""
    default: object
    check: Callable = nonneg
    doc: str = ""


@dataclass(frozen=True)
class State:
    """A state buffer: torch.optim's name, its initial value (a number or a hyperparameter
    name), whether the options need it, and its dtype (``None``: the params' dtype)."""
    name: str
    init: float | str = 0.0
    when: Callable | None = None
    dtype: str | None = None
    doc: str = ""
    shape: str | None = None       # None: the param's; "rows": (..., m, 1); "cols": (..., 1, n)

    def shape_for(self, shape: tuple) -> tuple:
        """The buffer's shape for a param of ``shape``."""
        if self.shape == "rows":
            return tuple(shape[:-1]) + (1,)
        if self.shape == "cols":
            return tuple(shape[:-2]) + (1, shape[-1])
        return tuple(shape)


@dataclass(frozen=True)
class Carry:
    """A per-step host scalar the rule carries from one step to the next (NAdam's
    ``mu_product``, ASGD's ``eta`` and ``mu``): torch.optim's name, its value before the first
    step (a number, or a hyperparameter's name: its value at the first step). ``scalars``
    reads the value left by the last step as ``h.<name>`` and returns the new one under the
    same name."""
    name: str
    init: float | str = 0.0
    doc: str = ""


@dataclass(frozen=True)
class Rule:
    """Everything hwoptim knows about one update rule."""
    name: str                      # public class name, e.g. "Adam"
    doc: str                       # one paragraph, with the source
    formula: str                   # Markdown, for the docs table
    hypers: dict                   # name -> Hyper (numbers; lr first)
    options: dict                  # name -> default bool (choose code at build time)
    states: tuple                  # State, ...
    scalars: Callable              # (h, t) -> dict of per-step scalars
    update: Callable               # (x, k, opt) -> dict of new values
    flags: Callable | None = None  # (h, opt) -> extra static flags derived from numbers
    check: Callable | None = None  # (h, opt) -> list of (argument, value, expected)
    torch: str | None = None       # torch.optim class with the same math, if any
    torch_skip: tuple = ()         # options torch does not have
    test_options: tuple = ({},)    # option sets tests and benchmarks cover
    differs: str = ""              # where hwoptim differs from torch, for the docs
    carry: tuple = ()              # Carry, ...: host scalars carried from step to step
    # static flags that depend on a param's shape (Adafactor: factored for >= 2 dims), as
    # (shape) -> dict; the group's flags hold the values for a flat (1-D) array
    shape_flags: Callable | None = None
    # (h, dtype) -> h: hyperparameters whose value depends on the params' dtype (Adafactor's
    # eps1=None: that dtype's machine epsilon), resolved before the per-step scalars
    resolve: Callable | None = None

    # -- derived facts, all from the functions above
    def static_flags(self, h: dict, opt: dict) -> SimpleNamespace:
        flags = dict(opt)
        if self.flags is not None:
            flags.update(self.flags(SimpleNamespace(**h), SimpleNamespace(**opt)))
        return SimpleNamespace(**flags)

    def active_states(self, flags) -> tuple:
        return tuple(s for s in self.states if s.when is None or s.when(flags))

    def scalar_names(self, flags) -> tuple:
        return tuple(trace_scalars(self, flags)[0])

    def array_flags(self, flags, shape: tuple):
        """``flags`` for a param of ``shape``: the group's, with the shape's own facts."""
        if self.shape_flags is None:
            return flags
        extra = self.shape_flags(tuple(shape))
        if all(getattr(flags, k) == v for k, v in extra.items()):
            return flags
        return SimpleNamespace(**{**vars(flags), **extra})


def resolve_hypers(rule: Rule, h: dict, dtype) -> dict:
    """``h`` with the dtype-dependent hyperparameters resolved for ``dtype`` (no copy where
    the rule has none)."""
    return h if rule.resolve is None else rule.resolve(h, str(np.dtype(dtype)))



def evaluate(e: Expr, env: dict, memo: dict | None = None):
    """Value of ``e`` with leaves named in ``env`` (host floats or NumPy arrays)."""
    memo = {} if memo is None else memo
    if id(e) in memo:
        return memo[id(e)]
    if e.op in ("array", "scalar"):
        v = env[e.value]
    elif e.op == "const":
        v = e.value
    elif e.op == "mean":
        v = math_ops.mean(evaluate(e.args[0], env, memo), e.value)
    else:
        v = _eval(e.op, [evaluate(a, env, memo) for a in e.args], math_ops)
    memo[id(e)] = v
    return v


def substitute(e: Expr, mapping: dict, memo: dict | None = None) -> Expr:
    """``e`` with scalar leaves replaced by the expressions in ``mapping``."""
    memo = {} if memo is None else memo
    if id(e) not in memo:
        if e.op == "scalar" and e.value in mapping:
            memo[id(e)] = mapping[e.value]
        elif e.op in ("array", "scalar", "const"):
            memo[id(e)] = e
        else:
            memo[id(e)] = Expr(e.op, tuple(substitute(a, mapping, memo) for a in e.args),
                               e.value)
    return memo[id(e)]


REPLAY_LIMIT = 100_000


def carry_init(rule: Rule, h: dict) -> dict:
    """The carried scalars before a first step with hyperparameters ``h``."""
    return {c.name: float(h[c.init] if isinstance(c.init, str) else c.init)
            for c in rule.carry}


def with_carry(rule: Rule, h: dict, t: int) -> dict:
    """``h`` with the carried scalars step ``t`` starts from: as given in ``h``, or, where
    ``h`` has none, those of a run that had ``h`` from its first step (replayed: a
    convenience for tests and benchmarks that name a step without running the ones before;
    optimizers carry the real values)."""
    if not rule.carry or all(c.name in h for c in rule.carry):
        return h
    if not 1 <= t <= REPLAY_LIMIT:
        raise ValueError(f"{rule.name}: the carried scalars "
                         f"({', '.join(c.name for c in rule.carry)}) of step {t} are not "
                         f"given; they are replayed only up to step {REPLAY_LIMIT}")
    c = carry_init(rule, h)
    for s in range(1, int(t)):
        out = rule.scalars(SimpleNamespace(**{**h, **c}), s)
        c = {n: float(out[n]) for n in c}
    return {**h, **c}


def host_scalars(rule: Rule, h: dict, t: int, dtype="float64") -> dict:
    """Per-step scalars in float64 on the host (carried ones: their values after step t);
    dtype-dependent hyperparameters left unset are resolved for ``dtype``."""
    h = with_carry(rule, resolve_hypers(rule, h, dtype), t)
    return {k: float(v) for k, v in rule.scalars(SimpleNamespace(**h), t).items()}


def trace_scalars(rule: Rule, flags) -> tuple[dict, tuple]:
    """Trace ``rule.scalars`` on placeholders: (name -> Expr, input names: hyperparameters
    in spec order, then the carried scalars)."""
    h, names = {}, []
    for n, hy in rule.hypers.items():
        if isinstance(hy.default, tuple):
            h[n] = tuple(Expr("scalar", value=f"{n}{i}") for i in range(len(hy.default)))
            names += [f"{n}{i}" for i in range(len(hy.default))]
        else:
            h[n] = Expr("scalar", value=n)
            names.append(n)
    for c in rule.carry:
        h[c.name] = Expr("scalar", value=c.name)
        names.append(c.name)
    out = rule.scalars(SimpleNamespace(**h), Expr("scalar", value="step"))
    out = {k: _wrap(v) for k, v in out.items()}
    if getattr(flags, "_clip", False):      # max_grad_norm: the step's clip factor
        out["_clip"] = Expr("scalar", value="_clip")
        names.append("_clip")
    return out, tuple(names)


def trace_update(rule: Rule, flags) -> tuple[dict, tuple, tuple]:
    """Trace ``rule.update``: (buffer name -> new value Expr, array names, scalar names).

    Array names are ``param``, ``grad``, then the active states in spec order. Outputs are
    ordered like the arrays; a buffer the update leaves alone is not an output. With the
    flag ``_clip`` (set by optimizers with ``max_grad_norm``) the rule's ``x.grad`` is
    the grad times the scalar ``_clip``, rounded in the kernel's dtype as
    ``clip_grad_norm_``'s in-place multiply would be.
    """
    states = rule.active_states(flags)
    arrays = ("param", "grad") + tuple(s.name for s in states)
    x = SimpleNamespace(**{n: Expr("array", value=n) for n in arrays})
    if getattr(flags, "_clip", False):      # max_grad_norm: the rule sees clipped grads
        x.grad = x.grad * Expr("scalar", value="_clip")
    scalar_names = rule.scalar_names(flags)
    k = SimpleNamespace(**{n: Expr("scalar", value=n) for n in scalar_names})
    new = rule.update(x, k, flags)
    unknown = set(new) - set(arrays) or ({"grad"} & set(new))
    if unknown:
        raise ValueError(f"rule {rule.name} writes {sorted(unknown)}, which are not its "
                         f"param or state buffers")
    out = {n: _wrap(new[n]) for n in arrays if n in new}
    return out, arrays, scalar_names
