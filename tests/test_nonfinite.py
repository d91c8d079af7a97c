"""Non-finite numbers (README, "Non-finite numbers"): hwoptim neither checks for NaN or ±Inf
nor stops on them. A non-finite grad or param element makes that element's param and state
non-finite, and nothing else changes:

* every other element is bit-identical to the same run without the bad elements;
* NaN, +Inf and -Inf land where the float64 NumPy reference puts them, on every backend and
  dtype, and the finite values stay within the reference's run tolerance;
* Numba's parallel kernel (large arrays) keeps them apart too;
* non-finite elements classify (NaN, +Inf, -Inf, finite) as in torch.optim;
* a step with them raises nothing and warns nothing.

Every rule x option set x host backend x dtype, a few steps of 64 elements: about a second.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import hwoptim
from hwoptim import backends
from hwoptim.rules import RULES
from hwoptim.testing import K_RUN, option_sets, random_values, unit_roundoff

N = 64
STEPS = 4
LARGE = 70_000            # above the Numba backend's parallel threshold for every kernel
nan, inf = np.nan, np.inf
# element -> value: in the grad at every step, in the param from the start, in the grad at
# step 2 only (the state carries it on); the first and last elements included
GRAD_BAD = {0: inf, 5: nan, 12: inf, 19: -inf}
PARAM_BAD = {26: nan, 33: inf, 40: -inf}
ONCE_BAD = {47: nan, 54: inf, N - 1: -inf}
BAD = sorted({*GRAD_BAD, *PARAM_BAD, *ONCE_BAD})

HOST = [n for n in backends.available() if backends.load(n).FAMILY == "host"]
DTYPES = ("float32", "float64")
CASES = [(rule, oid, opts) for rule in RULES.values() for oid, opts in option_sets(rule)]


def _cases(names=HOST, dtypes=DTYPES):
    return [pytest.param(rule, opts, b, d, id=f"{oid}-{b}-{d}")
            for rule, oid, opts in CASES for b in names for d in dtypes]


def _spread(n, k):
    """``k`` bad positions in ``n`` elements, mapped from the N-element layout."""
    return {round(i * (n - 1) / (N - 1)): v for i, v in k.items()}


def _inputs(rng, dtype, n=N):
    """(clean params, clean grads per step, bad params, bad grads per step)."""
    p = random_values(rng, (n,), dtype)
    gs = [random_values(rng, (n,), dtype) for _ in range(STEPS)]
    bp = p.copy()
    for i, v in _spread(n, PARAM_BAD).items():
        bp[i] = v
    bgs = [g.copy() for g in gs]
    for t, g in enumerate(bgs, 1):
        for i, v in {**_spread(n, GRAD_BAD), **(_spread(n, ONCE_BAD) if t == 2 else {})}.items():
            g[i] = v
    return p, gs, bp, bgs


def _run(rule, opts, backend, p, grads):
    """Param and state after ``grads``; NumPy's floating-point warnings are
    ``test_a_step_with_non_finite_numbers_is_silent``'s subject, not this one's."""
    p = p.copy()
    opt = getattr(hwoptim, rule.name)(p, backend=backend, **opts)
    with np.errstate(all="ignore"):
        for g in grads:
            opt.step(g.copy())
    assert opt.step_count == len(grads)
    return {"param": p, **{k: v.copy() for k, v in opt.state[0].items()}}


def _kind(x):
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf, per element."""
    x = np.asarray(x)
    return np.select([np.isnan(x), np.isposinf(x), np.isneginf(x)], [1, 2, 3], 0)


def _assert_only_bad_elements_differ(bad, clean, positions):
    good = np.ones(next(iter(bad.values())).size, bool)
    good[list(positions)] = False
    for name, x in bad.items():
        assert np.array_equal(x[good], clean[name][good]), (
            f"{name}: elements with finite inputs changed: "
            f"{np.flatnonzero(good & (x != clean[name]))[:10]}")
        assert np.isfinite(clean[name]).all(), name
    assert not np.isfinite(bad["param"][~good]).any(), (
        f"param: a non-finite input became finite at "
        f"{np.flatnonzero(~good & np.isfinite(bad['param']))}")


@pytest.mark.parametrize("rule, opts, backend, dtype", _cases())
def test_a_non_finite_input_stays_in_its_element(rule, opts, backend, dtype, rng):
    p, gs, bp, bgs = _inputs(rng, dtype)
    _assert_only_bad_elements_differ(_run(rule, opts, backend, bp, bgs),
                                     _run(rule, opts, backend, p, gs), BAD)


@pytest.mark.parametrize("rule, opts, backend, dtype",
                         _cases(["numba"] if "numba" in HOST else [], DTYPES))
def test_a_non_finite_input_stays_in_its_element_in_the_parallel_kernel(rule, opts, backend,
                                                                         dtype, rng):
    p, gs, bp, bgs = _inputs(rng, dtype, LARGE)
    _assert_only_bad_elements_differ(_run(rule, opts, backend, bp, bgs),
                                     _run(rule, opts, backend, p, gs),
                                     {**_spread(LARGE, GRAD_BAD), **_spread(LARGE, PARAM_BAD),
                                      **_spread(LARGE, ONCE_BAD)})


@pytest.mark.parametrize("rule, opts, backend, dtype", _cases())
def test_non_finite_elements_land_where_the_reference_puts_them(rule, opts, backend, dtype,
                                                                 rng):
    """NaN, +Inf and -Inf at the same elements as the float64 NumPy reference; the finite
    elements within the independent-run bound ``K_RUN u STEPS ||ref||``."""
    _, _, bp, bgs = _inputs(rng, dtype)
    got = _run(rule, opts, backend, bp, bgs)
    ref = _run(rule, opts, "numpy", bp.astype(np.float64), [g.astype(np.float64) for g in bgs])
    bound = K_RUN * unit_roundoff(dtype) * STEPS
    for name, r in ref.items():
        x = got[name]
        differ = np.flatnonzero(_kind(x) != _kind(r))
        assert not differ.size, (f"{name}: elements {differ} are {x[differ]}; the reference "
                                 f"has {r[differ]}")
        fin = np.isfinite(r)
        err = np.linalg.norm(x[fin] - r[fin])
        assert err <= bound * np.linalg.norm(r[fin]), (name, err / np.linalg.norm(r[fin]))


def _torch_cases():
    out = []
    for rule, oid, opts in CASES:
        if not rule.torch or set(opts) & set(rule.torch_skip):
            continue
        h = {n: opts.get(n, hy.default) for n, hy in rule.hypers.items()}
        flags = rule.static_flags(h, {n: opts.get(n, v) for n, v in rule.options.items()})
        marks = []
        if h["weight_decay"] == 0 and not getattr(flags, "decoupled_weight_decay", False):
            marks = [pytest.mark.xfail(strict=True, reason=(
                "weight_decay=0 still computes g + 0*p, and 0*(±Inf or NaN) is NaN: a "
                "non-finite param makes its grad, state and param NaN where torch, which "
                "skips the term, keeps ±Inf and finite state"))]
        out.append(pytest.param(rule, opts, id=oid, marks=marks))
    return out


@pytest.mark.torch
@pytest.mark.parametrize("rule, opts", _torch_cases())
def test_non_finite_elements_classify_as_in_torch(rule, opts, torch, rng):
    """The same bad inputs through torch.optim (float64, for-loop): NaN, +Inf, -Inf and
    finite at the same elements, params and every state buffer torch keeps."""
    _, _, bp, bgs = _inputs(rng, "float64")
    mine = _run(rule, opts, "numpy", bp, bgs)
    tp = torch.tensor(bp.copy())
    topt = getattr(torch.optim, rule.torch)([tp], foreach=False, **opts)
    for g in bgs:
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
    theirs = {"param": tp.numpy(), **{k: v.numpy() for k, v in topt.state[tp].items()
                                      if k in mine}}
    assert set(theirs) == set(mine)
    for name, r in theirs.items():
        differ = np.flatnonzero(_kind(mine[name]) != _kind(r))
        assert not differ.size, (f"{name}: elements {differ} are {mine[name][differ]}; torch "
                                 f"has {r[differ]}")


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("rule", list(RULES.values()), ids=list(RULES))
def test_a_step_with_non_finite_numbers_is_silent(rule, backend, rng):
    """No warning and no exception, even where the caller turns NumPy's floating-point
    warnings into errors; two params, the bad one second, so a step that stopped part-way
    would show."""
    _, _, bp, bgs = _inputs(rng, "float64")
    first = random_values(rng, (N,))
    opt = getattr(hwoptim, rule.name)([first, bp], backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            for g in bgs:
                opt.step([random_values(rng, (N,)), g])
    assert opt.step_count == STEPS
