"""Non-finite numbers (README, "Non-finite numbers"): hwoptim neither checks for NaN or ±Inf
nor stops on them. A non-finite grad or param element makes that element's param and state
non-finite, and nothing else changes:

* every other element is bit-identical to the same run without the bad elements;
* NaN, +Inf and -Inf land where the float64 NumPy reference puts them, on every backend and
  dtype, and the finite values stay within the reference's run tolerance;
* Numba's parallel kernel (large arrays) keeps them apart too;
* non-finite elements classify (NaN, +Inf, -Inf, finite) as in torch.optim;
* a step with them raises nothing and warns nothing;
* the CUDA update function, compiled as C++ (as tests/test_cuda_source.py does), puts them
  where the NumPy backend does, also where a rule takes a maximum.

Every rule x option set x host backend x dtype, a few steps of 64 elements, and a few g++
builds: a few seconds.
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import warnings

import numpy as np
import pytest

import hwoptim
from hwoptim import backends, codegen
from hwoptim.rules import RULES
from hwoptim.spec import host_scalars
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


CASES_BY_RULE = [(rule, opts) for rule, _, opts in CASES]


def _cases(names=HOST, dtypes=DTYPES, local_only=False):
    """``local_only``: leave out option sets whose update takes a norm (LAMB, LARS): there a
    non-finite element makes the array's norm non-finite, which reaches every element."""
    return [pytest.param(rule, opts, b, d, id=f"{oid}-{b}-{d}")
            for rule, oid, opts in CASES for b in names for d in dtypes
            if not (local_only and _takes_norm(rule, opts))]


def _takes_norm(rule, opts) -> bool:
    h = {n: opts.get(n, hy.default) for n, hy in rule.hypers.items()}
    flags = rule.static_flags(h, {n: opts.get(n, v) for n, v in rule.options.items()})
    return bool(codegen.plan(rule, flags).norms)


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


# Rules that step by a sign (README, "Non-finite numbers"): a NaN has sign 0, as in torch,
# and an infinite gradient still has a sign, so a non-finite input may leave its element
# finite; every other element is still untouched by it.
SIGN_BASED = {"Rprop", "Lion"}


def _assert_only_bad_elements_differ(bad, clean, positions, sign_based=False):
    good = np.ones(next(iter(bad.values())).size, bool)
    good[list(positions)] = False
    for name, x in bad.items():
        assert np.array_equal(x[good], clean[name][good]), (
            f"{name}: elements with finite inputs changed: "
            f"{np.flatnonzero(good & (x != clean[name]))[:10]}")
        assert np.isfinite(clean[name]).all(), name
    if sign_based:
        return
    assert not np.isfinite(bad["param"][~good]).any(), (
        f"param: a non-finite input became finite at "
        f"{np.flatnonzero(~good & np.isfinite(bad['param']))}")


@pytest.mark.parametrize("rule, opts, backend, dtype", _cases(local_only=True))
def test_a_non_finite_input_stays_in_its_element(rule, opts, backend, dtype, rng):
    p, gs, bp, bgs = _inputs(rng, dtype)
    _assert_only_bad_elements_differ(_run(rule, opts, backend, bp, bgs),
                                     _run(rule, opts, backend, p, gs), BAD,
                                     rule.name in SIGN_BASED)


@pytest.mark.parametrize("rule, opts, backend, dtype",
                         _cases(["numba"] if "numba" in HOST else [], DTYPES,
                                local_only=True))
def test_a_non_finite_input_stays_in_its_element_in_the_parallel_kernel(rule, opts, backend,
                                                                         dtype, rng):
    p, gs, bp, bgs = _inputs(rng, dtype, LARGE)
    _assert_only_bad_elements_differ(_run(rule, opts, backend, bp, bgs),
                                     _run(rule, opts, backend, p, gs),
                                     {**_spread(LARGE, GRAD_BAD), **_spread(LARGE, PARAM_BAD),
                                      **_spread(LARGE, ONCE_BAD)}, rule.name in SIGN_BASED)


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


@pytest.mark.parametrize("rule, opts", [c for c in CASES_BY_RULE if _takes_norm(*c)])
@pytest.mark.parametrize("backend", HOST)
def test_a_non_finite_grad_reaches_every_element_through_a_norm(rule, opts, backend, rng):
    """LAMB, LARS (README): one NaN grad element makes the array's norm NaN. LAMB (optax's
    ratio) then has a NaN ratio: the whole param is NaN; LARS (torchlars' test, ``‖g‖ > 0``)
    falls back to a ratio of 1: only that element. Another array of the step is untouched."""
    a, b = random_values(rng, (300,)), random_values(rng, (40,))
    clean = [a.copy(), b.copy()]
    g = [random_values(rng, (300,)), random_values(rng, (40,))]
    opt = getattr(hwoptim, rule.name)([a, b], backend=backend, **opts)
    ref = getattr(hwoptim, rule.name)(clean, backend=backend, **opts)
    ref.step([x.copy() for x in g])
    bad = int(rng.integers(300))
    g[0][bad] = np.nan
    with np.errstate(all="ignore"):
        opt.step(g)
    assert np.isnan(a).all() if rule.name == "LAMB" else np.flatnonzero(np.isnan(a)) == [bad]
    assert np.array_equal(b, clean[1])


def _torch_cases():
    out = []
    for rule, oid, opts in CASES:
        if not rule.torch or set(opts) & set(rule.torch_skip):
            continue
        # (weight_decay=0 used to compute g + 0·p, NaN for an Inf param: now skipped as in
        # torch, through the rules' use_weight_decay flag)
        out.append(pytest.param(rule, opts, id=oid))
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


# ----------------------------------------------------------------------------- the CUDA update

def _cuda_cases():
    """Every option set whose update takes a maximum or minimum (NaN handling differs there),
    and two that do not, so the harness itself is checked."""
    out = []
    for rule, oid, opts in CASES:
        h = {n: opts.get(n, hy.default) for n, hy in rule.hypers.items()}
        flags = rule.static_flags(h, {n: opts.get(n, v) for n, v in rule.options.items()})
        plan = codegen.plan(rule, flags)
        if any(e.op in ("max", "min") for e in plan.order):
            # fmax/fmin used to drop a NaN here (AMSGrad's max_exp_avg_sq kept its old
            # value; centered RMSprop clamped Inf - Inf to 0)
            out.append(pytest.param(rule, opts, plan, id=oid))
        elif oid in ("Adam[default]", "RMSprop[default]"):
            out.append(pytest.param(rule, opts, plan, id=oid))
    return out


def _cxx_unavailable():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "the generated C++ switches flush-to-zero through MXCSR (x86-64 only)"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++, or $CXX) on PATH"
    return None


@pytest.mark.skipif(_cxx_unavailable() is not None, reason=str(_cxx_unavailable()))
@pytest.mark.parametrize("rule, opts, plan", _cuda_cases())
def test_the_cuda_update_puts_non_finite_numbers_where_numpy_does(rule, opts, plan, rng,
                                                                   tmp_path):
    """``codegen.cpp_test_source`` (the CUDA kernel's per-element update, unchanged) built by
    g++ without contraction, stepped next to the NumPy backend on the same bad inputs, float64:
    NaN, +Inf and -Inf at the same elements after every step."""
    src, lib = tmp_path / "update.cpp", tmp_path / "update.so"
    src.write_text(codegen.cpp_test_source(plan, "float64"))
    subprocess.run([os.environ.get("CXX", "g++"), "-O2", "-std=c++17", "-shared", "-fPIC",
                    "-ffp-contract=off", str(src), "-o", str(lib)], check=True)
    run = ctypes.CDLL(str(lib)).run
    used = codegen._c_used(plan)
    run.argtypes = ([np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")] * len(used)
                    + [ctypes.c_double] * len(plan.scalars) + [ctypes.c_longlong, ctypes.c_int])
    _, _, bp, bgs = _inputs(rng, "float64")
    p = bp.copy()
    opt = getattr(hwoptim, rule.name)(p, backend="numpy", **opts)
    h = {n: opt.param_groups[0][n] for n in rule.hypers}
    mine = {"param": bp.copy(), **{k: v.copy() for k, v in opt.state[0].items()}}
    for t, g in enumerate(bgs, 1):
        bufs = {**mine, "grad": g.copy()}
        run(*[bufs[a] for a in used], *plan.kernel_scalars(host_scalars(rule, h, t)), N, 0)
        opt.step(g.copy())
        for name, r in {"param": p, **opt.state[0]}.items():
            differ = np.flatnonzero(_kind(mine[name]) != _kind(r))
            assert not differ.size, (f"step {t}, {name}: elements {differ} are "
                                     f"{mine[name][differ]}; NumPy has {r[differ]}")
