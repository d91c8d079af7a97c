"""Rules that take per-array norms (``ops.norm``: LAMB, LARS).

The generic suites cover them like every rule (oracles, tolerances with the norm's error
model, parallel against serial, many arrays, ``hwoptim.torch``); here: LARS against torch
itself (torchlars' recipe: the local rate from torch's norms, then torch.optim.SGD), the
conventions where a norm is 0, norms taken per array, the reduction pass reading the step's
inputs, and the refusal where a backend has no reduction (``cupy-elementwise``).
"""
from __future__ import annotations

import numpy as np
import pytest

import hwoptim
from hwoptim import backends, codegen
from hwoptim.rules import RULES
from hwoptim.testing import random_values

HOST = [n for n in backends.available() if backends.load(n).FAMILY == "host"]
SHAPES = [(17, 9), (30,), (4, 5, 6)]


@pytest.mark.torch
@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=1e-2, nesterov=True),
                                dict(momentum=0.5, dampening=0.2, weight_decay=1e-3),
                                dict(momentum=0.0)], ids=str)
def test_lars_is_torchlars_around_torch_sgd(kw, backend, torch, rng, request):
    """torchlars: g += λp; g *= c‖p‖/(‖g₀‖ + λ‖p‖ + ε) (1 where a norm is 0; ‖g₀‖ the raw
    grad's), then torch.optim.SGD (no weight decay of its own) steps. float64, 40 steps."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    request.addfinalizer(lambda: torch.set_default_dtype(default))
    lr, tc, eps, wd = 0.05, 0.02, 1e-8, kw.get("weight_decay", 0.0)
    init = [random_values(rng, s, np.float64) for s in SHAPES]
    mine = [p.copy() for p in init]
    opt = hwoptim.LARS(mine, lr=lr, trust_coefficient=tc, eps=eps, backend=backend, **kw)
    theirs = [torch.tensor(p.copy()) for p in init]
    sgd = torch.optim.SGD(theirs, lr=lr, momentum=kw.get("momentum", 0.9),
                          dampening=kw.get("dampening", 0.0), nesterov=kw.get("nesterov", False),
                          foreach=False)
    for _ in range(40):
        grads = [random_values(rng, s, np.float64) for s in SHAPES]
        opt.step(grads)
        for p, g in zip(theirs, grads):
            g = torch.from_numpy(g.copy())
            pn, gn = p.norm(), g.norm()
            local = tc * pn / (gn + wd * pn + eps) if pn > 0 and gn > 0 else 1.0
            p.grad = (g + wd * p) * local
        sgd.step()
    for p, tp in zip(mine, theirs):
        ref = tp.numpy()
        assert np.max(np.abs(p - ref)) <= 1e-10 * np.max(np.abs(ref))


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["LAMB", "LARS"])
def test_a_zero_norm_gives_a_ratio_of_one(name, dtype, backend, rng):
    """A param that is all zeros (LAMB: ‖p‖ = 0; LARS: also a zero grad) steps as with
    ``trust_ratio=False``: bit for bit."""
    p = np.zeros(50, dtype)
    q = p.copy()
    a = getattr(hwoptim, name)(p, backend=backend, lr=0.1)
    b = getattr(hwoptim, name)(q, backend=backend, lr=0.1, trust_ratio=False)
    g = random_values(rng, (50,), dtype)
    a.step(g)
    b.step(g)
    assert np.array_equal(p, q) and np.any(p != 0)
    if name == "LARS":                  # ‖g‖ = 0 with ‖p‖ > 0: ratio 1 too
        z = np.zeros(50, dtype)
        a.step(z)
        b.step(z)
        assert np.array_equal(p, q)


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("name", ["LAMB", "LARS"])
def test_norms_are_per_array(name, backend, rng):
    """Two arrays stepped together move as each would alone: one ratio per array."""
    a, b = random_values(rng, (300,), np.float64), 1e3 * random_values(rng, (20,), np.float64)
    a1, b1 = a.copy(), b.copy()
    together = getattr(hwoptim, name)([a, b], backend=backend, lr=0.01)
    alone = [getattr(hwoptim, name)(x, backend=backend, lr=0.01) for x in (a1, b1)]
    for _ in range(5):
        ga, gb = random_values(rng, (300,)), random_values(rng, (20,))
        together.step([ga, gb])
        alone[0].step(ga.copy())
        alone[1].step(gb.copy())
    assert np.array_equal(a, a1) and np.array_equal(b, b1)


def test_the_reduction_pass_reads_the_step_inputs():
    """LAMB's ‖u‖ is of this step's update (from the new moments), computed in the reduction
    pass from the step's inputs, and its ‖p‖ of the param before the step."""
    rule = RULES["LAMB"]
    flags = rule.static_flags({n: h.default for n, h in rule.hypers.items()}, rule.options)
    plan = codegen.plan(rule, flags)
    assert plan.norm_names == ("_n0", "_n1")
    assert plan.reduce_reads == ("param", "grad", "exp_avg", "exp_avg_sq")
    assert plan.norms[0].op == "array" and plan.norms[0].value == "param"
    plain = codegen.plan(rule, rule.static_flags({n: h.default for n, h in rule.hypers.items()},
                                                 {**rule.options, "trust_ratio": False}))
    assert plain.norms == () and plain.reduce_order == ()


def test_nested_norms_are_refused():
    from types import SimpleNamespace
    from hwoptim.spec import ops
    base = RULES["SGD"]
    import dataclasses
    rule = dataclasses.replace(
        base, name="Nested",
        update=lambda x, k, opt: {"param": x.param - ops.norm(x.grad * ops.norm(x.param))})
    with pytest.raises(ValueError, match="norm of an expression with a norm in it"):
        codegen.plan(rule, SimpleNamespace(**vars(base.static_flags(
            {n: h.default for n, h in base.hypers.items()}, base.options))))


def test_elementwise_backend_refuses_norms_before_building():
    """``cupy-elementwise`` (an ElementwiseKernel: no reduction) refuses a plan with norms;
    ``cupy`` runs them (a reduction kernel, then the update: tests/test_cuda_launch.py)."""
    from hwoptim.backends import cupy as cb
    rule = RULES["LARS"]
    flags = rule.static_flags({n: h.default for n, h in rule.hypers.items()}, rule.options)
    with pytest.raises(ValueError, match="LARS takes per-array norms"):
        cb.refuse_norms(codegen.plan(rule, flags), "cupy-elementwise")
    cb.refuse_norms(codegen.plan(rule, rule.static_flags(
        {n: h.default for n, h in rule.hypers.items()}, {**rule.options, "trust_ratio": False})),
        "cupy-elementwise")


@pytest.mark.skipif("numba" not in HOST, reason="the Numba backend is not available")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_reduction_pass_gives_each_arrays_norms(dtype, rng):
    """``Kernel.norms`` over several arrays (one of many chunks, one empty, one tiny): each
    array's ‖p‖ and ‖g‖ (LARS) as float64 NumPy computes them, to float64 rounding."""
    from hwoptim.backends import numba as nb
    rule = RULES["LARS"]
    flags = rule.static_flags({n: h.default for n, h in rule.hypers.items()}, rule.options)
    plan = codegen.plan(rule, flags)
    k = nb.kernel(plan, dtype)
    sizes = [70_001, 0, 3, 16_384]
    arrays = [[random_values(rng, (n,), dtype) for _ in plan.arrays] for n in sizes]
    ptrs = np.array([[a.ctypes.data for a in arrs] for arrs in arrays], np.int64)
    scal = np.array([k.prepare({n: h.default for n, h in rule.hypers.items()}, 2)], dtype)
    got = k.norms(ptrs, np.array(sizes, np.int64), np.zeros(len(sizes), np.int64), scal)
    for arrs, row in zip(arrays, got):
        want = [np.linalg.norm(arrs[0].astype(np.float64)),
                np.linalg.norm(arrs[1].astype(np.float64))]
        assert row.tolist() == pytest.approx(want, rel=1e-13, abs=0)
