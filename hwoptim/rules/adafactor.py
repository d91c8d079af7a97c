"""Adafactor (Shazeer & Stern 2018, *Adafactor: Adaptive Learning Rates with Sublinear
Memory Cost*) as torch.optim.Adafactor computes it: for a param of ≥ 2 dimensions the second
moment is kept factored, as row and column means of g² (m + n numbers for an m×n matrix);
a vector keeps it whole. The step is relative to the param's RMS and clipped by the RMS of
the update; ``lr`` caps the relative step and scales the decoupled weight decay."""
import numbers

import numpy as np

from ..spec import Hyper, Rule, State, ops


def scalars(h, t):
    eps1, eps2 = h.eps
    return dict(w=t ** h.beta2_decay,                 # 1 − β̂₂ₜ: the weight of the new g²
                rho=ops.minimum(h.lr, 1 / t ** 0.5), eps1=eps1, eps1sq=eps1 * eps1, eps2=eps2,
                d=h.d, decay=1 - h.lr * h.weight_decay)


def lerp(a, b, w):
    """torch's lerp: a + w(b − a) for w < 0.5, else b − (b − a)(1 − w), exact at both ends
    (w = 1, Adafactor's first step and beta2_decay=0, gives b itself, not a rounding of
    a + (b − a) that cancels)."""
    return ops.where(w < 0.5, a + w * (b - a), b - (b - a) * (1 - w))


def update(x, k, opt):
    g = -x.grad if opt.maximize else x.grad
    # torch takes these two maxima with Python's max(a, b): b only where b > a, so a NaN
    # RMS gives a, and a non-finite element spoils only itself, as in torch
    rms_p = ops.rms(x.param)
    alpha = ops.where(rms_p > k.eps2, rms_p, k.eps2) * k.rho    # the param's RMS before decay
    p = x.param * k.decay if opt.use_weight_decay else x.param
    if opt.factored:
        row = lerp(x.row_var, ops.mean(g * g, axis=-1), k.w)
        col = lerp(x.col_var, ops.mean(g * g, axis=-2), k.w)
        # one reciprocal per matrix, a product per element (torch divides per element:
        # within an ulp, and 15% faster here)
        var = row * col * (1 / ops.maximum(ops.mean(row, axis=-2), k.eps1))
        new = {"row_var": row, "col_var": col}
    else:
        var = lerp(x.variance, g * g, k.w)
        new = {"variance": var}
    u = g * (1 / ops.sqrt(ops.maximum(var, k.eps1sq)))
    ratio = ops.rms(u) / k.d
    denom = ops.where(ratio > 1.0, ratio, 1.0)
    return {**new, "param": p - alpha / denom * u}


def _eps_pair(v):
    ok = (isinstance(v, (tuple, list)) and len(v) == 2
          and (v[0] is None or (isinstance(v[0], numbers.Real) and not isinstance(v[0], bool)
                                and v[0] >= 0))
          and isinstance(v[1], numbers.Real) and not isinstance(v[1], bool) and v[1] >= 0)
    return None if ok else "a pair (eps1, eps2) with eps1 None or >= 0 and eps2 >= 0"


def _at_most_zero(v):
    return None if isinstance(v, numbers.Real) and v <= 0 else "a number <= 0"


def _at_least_one(v):
    return None if isinstance(v, numbers.Real) and v >= 1 else "a number >= 1"


def _resolve(h, dtype):
    """eps1=None: the params' machine epsilon, as torch takes it."""
    eps1, eps2 = h["eps"]
    return h if eps1 is not None else {**h, "eps": (float(np.finfo(dtype).eps), eps2)}


RULE = Rule(
    name="Adafactor",
    doc=__doc__,
    formula=("g ← ±g; w = t^τ; α = max(ε₂, RMS(p))·min(η, 1/√t); p ← p(1−ηλ); "
             "≥ 2-D: R ← R + w(mean_c(g²) − R), C ← C + w(mean_r(g²) − C), "
             "V = R·C/max(mean_r(R), ε₁); else V ← V + w(g² − V); "
             "u = g/√max(V, ε₁²); p ← p − α·u/max(1, RMS(u)/d)"),
    hypers=dict(lr=Hyper(1e-2, doc="learning rate η (caps the relative step, scales λ)"),
                beta2_decay=Hyper(-0.8, check=_at_most_zero, doc="τ: w = t^τ"),
                eps=Hyper((None, 1e-3), check=_eps_pair,
                          doc="(ε₁, ε₂); ε₁ None: the params' dtype's machine epsilon"),
                d=Hyper(1.0, check=_at_least_one, doc="clipping threshold d"),
                weight_decay=Hyper(0.0, doc="decoupled weight decay λ")),
    options=dict(maximize=False),
    states=(State("row_var", shape="rows", when=lambda f: f.factored,
                  doc="R: row means of g², (…, m, 1)"),
            State("col_var", shape="cols", when=lambda f: f.factored,
                  doc="C: column means of g², (…, 1, n)"),
            State("variance", when=lambda f: not f.factored, doc="V, for params of < 2 dims")),
    scalars=scalars,
    update=update,
    flags=lambda h, opt: dict(use_weight_decay=h.weight_decay != 0, factored=False),
    shape_flags=lambda shape: dict(factored=len(shape) >= 2),
    resolve=_resolve,
    torch="Adafactor",
    differs=("a param with no elements is left as it is (torch writes NaN into the column "
             "factor of a (0, n) param); factored params: no capturable=True yet"),
    # eps1 given: tests compare float32 kernels with a float64 reference, which would
    # resolve eps1=None to another epsilon (test_adafactor.py covers None)
    test_options=({"eps": (1e-7, 1e-3)},
                  {"eps": (1e-10, 1e-2), "beta2_decay": -0.5, "weight_decay": 1e-2,
                   "maximize": True, "d": 2.0}),
)
