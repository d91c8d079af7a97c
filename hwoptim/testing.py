"""What the tests (CPU and GPU) share: random inputs, the float64 reference step, and the
stated tolerances. Kept in the package so ``ci/gpu-check`` runs the same checks on a GPU.

Tolerances (README, "Tolerances"): with ``u`` the unit roundoff of the dtype under test
(2^-24 for float32, 2^-53 for float64), each step is compared with the NumPy float64
reference started from the same (tested) state, for every output buffer ``x``:

* elementwise: ``|x - ref| <= K_STEP * u * C(x)``, where ``C(x)`` is the running error
  bound of the spec's own expression for ``x``: every rounded operation contributes
  ``|result| + TINY/u`` (``TINY``: the dtype's smallest normal number, what flush-to-zero
  may drop), propagated to ``x`` through the operations after it (first order). For the
  last operation of a step, ``p + Δp``, this is ``|p| + |Δp| + ...``: the
  ``u·(|p| + |Δp|)`` form, extended to the cancellations inside the step (``g + λp``,
  ``m + (1-β)(g - m)``) that a bound on the final sum alone misses. A choice
  (``ops.where``, and ``ops.sign``, which is two) whose comparison is within rounding of
  its threshold — the operands differ, but by less than their own error bound, as a
  product flushed to zero in float32 against its float64 value — may go either way: there
  ``C(x)`` also counts the distance between the two branches, so either is accepted;
* norm-wise: ``||x - ref|| <= K_NORM * u * ||C(x)||``: with ``K_NORM = 1`` this is
  tighter than the elementwise bound on average, and catches an error spread thinly over
  every element (a scalar rounded wrongly, say);

and after ``STEPS`` steps run independently (no resynchronisation), norm-wise:
``||x - ref|| <= K_RUN * u * STEPS * ||ref||``.
"""
from __future__ import annotations

import numpy as np

from .spec import resolve_hypers

K_STEP = 2.0
K_NORM = 1.0
K_RUN = 4.0
STEPS = 100


def unit_roundoff(dtype) -> float:
    return float(np.finfo(dtype).eps) / 2


def tiny(dtype) -> float:
    return float(np.finfo(dtype).tiny)


def random_values(rng, shape, dtype=np.float64, zeros=0.05, tinies=0.05):
    """Signed values with magnitudes log-uniform in [1e-4, 1e3], plus exact zeros and tiny
    values near 1e-20 (whose squares are subnormal or zero in float32)."""
    n = int(np.prod(shape))
    mag = 10.0 ** rng.uniform(-4, 3, n)
    out = mag * rng.choice([-1.0, 1.0], n)
    r = rng.random(n)
    out[r < zeros] = 0.0
    small = (r >= zeros) & (r < zeros + tinies)
    out[small] = rng.choice([-1.0, 1.0], small.sum()) * 10.0 ** rng.uniform(-21, -19, small.sum())
    return out.reshape(shape).astype(dtype)


def option_sets(rule):
    """(id, kwargs) for each option set a rule's spec asks tests to cover."""
    out = []
    for opts in rule.test_options:
        name = ",".join(f"{k}={v}" for k, v in opts.items()) or "default"
        out.append((f"{rule.name}[{name}]", dict(opts)))
    return out


def worst_element(got, ref, cond, dtype) -> tuple:
    """(index, error / bound) of the element of one buffer furthest over its elementwise
    bound, for failure messages."""
    x = np.asarray(got, np.float64).reshape(-1)
    bound = K_STEP * unit_roundoff(dtype) * np.asarray(cond)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(x - ref) / bound
    j = int(np.argmax(np.where(np.isnan(ratio), np.inf, ratio)))
    return j, float(ratio[j])


BOUNDS_TEXT = (f"|x - ref| <= {K_STEP:g} u C(x), ||x - ref|| <= {K_NORM:g} u ||C(x)||")


def reference_step(rule, flags, hypers: dict, t: int, before: dict, grad) -> dict:
    """One float64 NumPy step from ``before`` (param and state, any dtype): new values."""
    from . import codegen
    from .backends import numpy as ref
    plan = codegen.plan(rule, flags)
    arrays = [np.array(before["param"], dtype=np.float64).reshape(-1),
              np.array(grad, dtype=np.float64).reshape(-1)]
    arrays += [np.array(before[n], dtype=np.float64).reshape(-1) for n in plan.arrays[2:]]
    run = ref.kernel(plan, "float64")
    # hyperparameters the run's dtype resolves (Adafactor's eps1=None): as that run does
    hypers = resolve_hypers(rule, hypers, np.asarray(before["param"]).dtype)
    run(arrays, run.prepare(hypers, t))
    return dict(zip(plan.arrays[:1] + plan.arrays[2:], arrays[:1] + arrays[2:]))


def condition(plan, before: dict, grad, kernel_scalars, dtype) -> dict:
    """``C(x)`` for each output (module docstring): a first-order bound, in units of ``u``,
    on the rounding error of evaluating the spec's graph in ``dtype`` from exact inputs."""
    u, tn = unit_roundoff(dtype), tiny(dtype)
    vals = {"param": before["param"], "grad": grad, **before}
    env = {n: (np.asarray(vals[n], dtype=np.float64).reshape(-1), 0.0) for n in plan.arrays}
    # a kernel scalar is rounded to the dtype once, exactly where it is representable
    exact = np.dtype(dtype).type
    env.update({n: (v, 0.0 if float(exact(v)) == v else abs(v) + tn / u)
                for n, v in zip(plan.scalars, kernel_scalars)})
    memo = {}

    def ev(e):
        if id(e) in memo:
            return memo[id(e)]
        if e.op in ("array", "scalar"):
            r = env[e.value]
        elif e.op == "const":
            r = (e.value, abs(e.value))
        else:
            a = [ev(x) for x in e.args]
            v = [x[0] for x in a]
            er = [x[1] for x in a]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                if e.op in ("add", "sub"):
                    out = v[0] + v[1] if e.op == "add" else v[0] - v[1]
                    err = er[0] + er[1] + np.abs(out) + tn / u
                elif e.op == "mul":
                    out = v[0] * v[1]
                    err = (np.abs(v[1]) * er[0] + np.abs(v[0]) * er[1] + np.abs(out) + tn / u
                           + u * er[0] * er[1])   # second order: both may be a branch off
                    # times an exact zero: exactly zero (a sign-based rule's first step)
                    zero = ((np.asarray(v[0]) == 0) & (np.asarray(er[0]) == 0)) | (
                        (np.asarray(v[1]) == 0) & (np.asarray(er[1]) == 0))
                    err = np.where(zero, 0.0, err)
                elif e.op == "div":
                    out = v[0] / v[1]
                    err = (er[0] / np.abs(v[1]) + np.abs(v[0]) * er[1] / v[1] ** 2
                           + np.abs(out) + tn / u)
                elif e.op == "sqrt":
                    out = np.sqrt(v[0])
                    err = np.minimum(er[0] / (2 * out), np.sqrt(er[0] / u)) + out + tn / u
                elif e.op in ("max", "min"):
                    out = np.maximum(v[0], v[1]) if e.op == "max" else np.minimum(v[0], v[1])
                    err = np.maximum(er[0], er[1])
                elif e.op in ("neg", "abs"):
                    out = -v[0] if e.op == "neg" else np.abs(v[0])
                    err = er[0]
                elif e.op == "where":
                    out = np.where(v[0], v[1], v[2])
                    err = np.where(v[0], er[1], er[2])
                    # an undecided comparison: either branch (README, "Tolerances")
                    err = np.where(er[0], np.maximum(er[1], er[2])
                                   + np.abs(np.asarray(v[1]) - v[2]) / u, err)
                elif e.op in ("lt", "le", "gt", "ge"):
                    from .spec import _eval, math_ops
                    out = _eval(e.op, v, math_ops)
                    # the "error" of a comparison: whether rounding may flip it
                    gap = np.abs(np.asarray(v[0], np.float64) - v[1])
                    err = gap < K_STEP * u * (np.asarray(er[0]) + er[1])
                elif e.op in ("norm", "rms"):   # of the whole array, summed in float64
                    x = np.asarray(v[0], np.float64)
                    ex = np.broadcast_to(np.asarray(er[0], np.float64), x.shape)
                    if e.op == "rms":           # the same bound, over sqrt(size)
                        x, ex = x / np.sqrt(max(x.size, 1)), ex / np.sqrt(max(x.size, 1))
                    out = np.sqrt(np.sum(x * x))
                    # ‖x̂‖ - ‖x‖ <= ‖x̂ - x‖; the float64 sums (kernel's and reference's,
                    # each at most (n-1)/2 u64 relative in the norm); one rounding to dtype
                    sums = (x.size - 1) * unit_roundoff(np.float64) / u
                    err = np.sqrt(np.sum(ex * ex)) + out * (1 + sums) + tn / u
                else:
                    raise ValueError(f"no error model for {e.op!r}")
            r = (out, err)
        memo[id(e)] = r
        return r

    return {n: np.broadcast_to(ev(plan.roots[n])[1], env["param"][0].shape)
            for n in plan.outputs}


def step_errors(got: dict, ref: dict, dtype, cond: dict) -> dict:
    """Per buffer: (worst elementwise ratio to its bound, norm-wise ratio to its bound).

    A ratio above 1 fails; see the module docstring for the bounds."""
    u, tn = unit_roundoff(dtype), tiny(dtype)
    out = {}
    for name, r in ref.items():
        x = np.asarray(got[name], dtype=np.float64).reshape(-1)
        err = np.abs(x - r)
        with np.errstate(divide="ignore", invalid="ignore"):
            elem = err / (K_STEP * u * cond[name])
        elem = np.where(err == 0, 0.0, elem)
        elem = np.where(np.isfinite(r) & ~np.isfinite(x), np.inf, elem)
        c = np.where(np.isfinite(cond[name]), cond[name], 0.0)
        norm = np.linalg.norm(err) / max(K_NORM * u * np.linalg.norm(c), tn)
        out[name] = (float(np.nanmax(elem)) if elem.size else 0.0, float(norm))
    return out
