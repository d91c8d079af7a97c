"""``max_grad_norm`` and ``skip_nonfinite``: the grad guard every class has.

* ``max_grad_norm=M``: the step is exactly the plain step on grads multiplied (in their dtype)
  by ``min(1, M / (‖g‖ + 1e-6))``, ``‖g‖`` the 2-norm of all of the step's grads in float64
  (``torch.nn.utils.clip_grad_norm_``'s factor), for every rule, host backend and dtype, bit
  for bit (a few ulp where the update takes norms: their reduction pass may reassociate);
  and it matches torch's ``clip_grad_norm_`` followed by torch's step.
* ``skip_nonfinite=True``: a NaN or ±Inf anywhere in any grad skips the whole step (params,
  state, carried scalars, step count unchanged, bit for bit), counted in ``skipped_steps``;
  the next finite step goes on as if the bad one never came. A non-finite norm under
  ``max_grad_norm`` skips the step too.
"""
from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest

import hwoptim
from conftest import assert_same_snapshot, snapshot
from hwoptim import backends, codegen
from hwoptim.rules import RULES
from hwoptim.testing import option_sets, random_values

HOST = [n for n in backends.available() if backends.load(n).FAMILY == "host"]
DTYPES = ["float32", "float64"]
SHAPES = [(13, 7), (5,), (40,)]
CASES = [pytest.param(rule, opts, id=oid) for rule in RULES.values()
         for oid, opts in option_sets(rule)]


def _grads(rng, dtype, scale):
    return [(random_values(rng, s, np.float64) * scale).astype(dtype) for s in SHAPES]


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule, opts", CASES)
def test_clipped_step_is_the_plain_step_on_scaled_grads(rule, opts, dtype, backend, rng):
    """Bit for bit: the fused clip equals scaling the grads first, with the factor from the
    float64 norm of all grads; grads both above and below the limit."""
    init = [random_values(rng, s, np.float64).astype(dtype) for s in SHAPES]
    mine, plain = [p.copy() for p in init], [p.copy() for p in init]
    limit = 0.5
    a = getattr(hwoptim, rule.name)(mine, backend=backend, max_grad_norm=limit, **opts)
    b = getattr(hwoptim, rule.name)(plain, backend=backend, **opts)
    norms = backend != "numpy" and bool(codegen.plan(rule, b._flags[0]).norms)
    clipped = 0
    for t in range(12):
        grads = _grads(rng, dtype, 10.0 ** rng.uniform(-7, -1))   # norms 1e-4 to 1e3
        norm = math.sqrt(sum(float(np.dot(g.astype(np.float64).ravel(),
                                          g.astype(np.float64).ravel())) for g in grads))
        a.step(grads)
        assert a.last_grad_norm == pytest.approx(norm, rel=1e-12)
        # the factor from the optimizer's own norm (its float64 sum is taken per chunk, so
        # its last bits may differ from numpy.dot's)
        factor = min(1.0, limit / (a.last_grad_norm + 1e-6))
        clipped += factor < 1
        b.step([g * np.dtype(dtype).type(factor) for g in grads])
        assert not a.last_step_skipped
        for i, (x, y) in enumerate(zip(mine, plain)):
            _equal(x, y, norms, dtype, f"step {t}, params[{i}]")
    assert 0 < clipped < 12, "the draw should clip some steps and not others"
    for sa, sb in zip(a.state, b.state):
        for k in sa:
            _equal(sa[k], sb[k], norms, dtype, k)


def _equal(x, y, norms, dtype, what):
    """Bit for bit; where the update takes norms (LAMB, LARS), whose reduction pass may
    reassociate the grad's scaling (README), within a few ulp norm-wise."""
    if not norms:
        assert np.array_equal(x, y, equal_nan=True), what
        return
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.linalg.norm(x - y) <= 16 * np.finfo(dtype).eps * np.linalg.norm(y), what


@pytest.mark.torch
@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("rule", [r for r in RULES.values() if r.torch], ids=lambda r: r.name)
def test_matches_clip_grad_norm_then_torch_step(rule, backend, torch, rng, request):
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    request.addfinalizer(lambda: torch.set_default_dtype(default))
    init = [random_values(rng, s, np.float64) for s in SHAPES]
    mine = [p.copy() for p in init]
    opt = getattr(hwoptim, rule.name)(mine, backend=backend, max_grad_norm=2.0)
    theirs = [torch.tensor(p.copy()) for p in init]
    topt = getattr(torch.optim, rule.torch)(theirs, foreach=False)
    for _ in range(30):
        grads = _grads(rng, np.float64, 10.0 ** rng.uniform(-3, 1))
        for p, g in zip(theirs, grads):
            p.grad = torch.from_numpy(g.copy())
        norm = torch.nn.utils.clip_grad_norm_(theirs, 2.0)
        topt.step()
        opt.step(grads)
        assert opt.last_grad_norm == pytest.approx(float(norm), rel=1e-12)
    for p, tp in zip(mine, theirs):
        ref = tp.numpy()
        assert np.max(np.abs(p - ref)) <= 1e-10 * np.max(np.abs(ref))


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule, opts", CASES)
@pytest.mark.parametrize("guard", [dict(skip_nonfinite=True), dict(max_grad_norm=1.0)],
                         ids=["skip_nonfinite", "max_grad_norm"])
def test_nonfinite_grad_skips_the_whole_step(rule, opts, dtype, backend, guard, rng):
    init = [random_values(rng, s, np.float64).astype(dtype) for s in SHAPES]
    mine, ref = [p.copy() for p in init], [p.copy() for p in init]
    opt = getattr(hwoptim, rule.name)(mine, backend=backend, **guard, **opts)
    twin = getattr(hwoptim, rule.name)(ref, backend=backend, **guard, **opts)
    skipped = 0
    for t in range(8):
        grads = _grads(rng, dtype, 1.0)
        if t in (0, 3, 4, 7):              # the first step too: state made, nothing moved
            bad = [g.copy() for g in grads]
            i = int(rng.integers(len(bad)))
            bad[i].reshape(-1)[rng.integers(bad[i].size)] = rng.choice([np.nan, np.inf, -np.inf])
            before = snapshot(opt, mine)
            opt.step(bad)
            skipped += 1
            assert opt.last_step_skipped and opt.skipped_steps == skipped
            assert math.isnan(opt.last_grad_norm)
            assert_same_snapshot(before, snapshot(opt, mine))
        opt.step(grads)
        twin.step(grads)
        assert not opt.last_step_skipped
        assert_same_snapshot(snapshot(opt, mine), snapshot(twin, ref))


@pytest.mark.parametrize("backend", HOST)
def test_overflowing_norm_skips_under_max_grad_norm(backend, rng):
    """float64 grads whose squares overflow: the norm is infinite, so the step is skipped
    (torch's clip_grad_norm_ would scale every grad by 0 instead; README)."""
    p = random_values(rng, (50,), np.float64)
    before = p.copy()
    opt = hwoptim.SGD(p, lr=0.1, backend=backend, max_grad_norm=1.0)
    g = np.full(50, 1e200)
    opt.step(g)
    assert opt.last_step_skipped and opt.step_count == 0 and np.array_equal(p, before)
    # every element is finite: skip_nonfinite alone steps
    opt = hwoptim.SGD(p, lr=0.1, backend=backend, skip_nonfinite=True)
    opt.step(g)
    assert not opt.last_step_skipped and opt.step_count == 1 and not np.array_equal(p, before)


@pytest.mark.parametrize("value, error", [
    (0.0, ValueError), (-1.0, ValueError), (math.nan, ValueError), (math.inf, ValueError),
    (True, ValueError), ("1", ValueError), ([1.0], ValueError)])
def test_bad_max_grad_norm_is_refused(value, error, rng):
    with pytest.raises(error, match=r"Adam\(\): max_grad_norm=.*expected None or a finite "
                                    r"number > 0"):
        hwoptim.Adam(random_values(rng, (4,)), max_grad_norm=value)


def test_bad_skip_nonfinite_is_refused(rng):
    with pytest.raises(TypeError, match=r"skip_nonfinite='yes': expected True or False"):
        hwoptim.Adam(random_values(rng, (4,)), skip_nonfinite="yes")


@pytest.mark.parametrize("backend", HOST)
def test_rejected_step_with_a_guard_changes_nothing(backend, rng):
    params = [random_values(rng, s, np.float64) for s in SHAPES]
    opt = hwoptim.Adam(params, backend=backend, max_grad_norm=1.0, skip_nonfinite=True)
    opt.step(_grads(rng, np.float64, 1.0))
    before = snapshot(opt, params)
    bad = _grads(rng, np.float64, 1.0)
    bad[1] = np.zeros(6)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(6,\); expected \(5,\)"):
        opt.step(bad)
    assert_same_snapshot(before, snapshot(opt, params))
    assert opt.skipped_steps == 0 and not opt.last_step_skipped


@pytest.mark.parametrize("backend", HOST)
def test_copies_keep_the_guard(backend, rng):
    params = [random_values(rng, s, np.float64) for s in SHAPES]
    opt = hwoptim.NAdam(params, backend=backend, max_grad_norm=0.25, skip_nonfinite=True)
    bad = _grads(rng, np.float64, 1.0)
    bad[0][0, 0] = np.nan
    opt.step(bad)
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (other.max_grad_norm, other.skip_nonfinite, other.skipped_steps) == (0.25, True, 1)


def test_stats_do_not_depend_on_the_thread_count(rng):
    """The Numba pass sums per chunk, so the norm is the same bits on 1 or 2 threads."""
    nb = pytest.importorskip("numba")
    from hwoptim.backends import numba as hb
    grads = [random_values(rng, (n,), np.float32) for n in (3, 70_000, 200_001)]
    sizes = np.array([g.size for g in grads], np.int64)
    got = []
    before = hwoptim.get_num_threads()
    try:
        for n in (1, nb.config.NUMBA_NUM_THREADS):
            hwoptim.set_num_threads(n)
            got.append(hb.grad_stats(grads, sizes, "float32"))
    finally:
        hwoptim.set_num_threads(before)
    assert got[0] == got[1]
    want = sum(float(np.dot(g.astype(np.float64), g.astype(np.float64))) for g in grads)
    assert got[0][0] == pytest.approx(want, rel=1e-12) and got[0][1] is True


@pytest.mark.torch
def test_torch_classes_clip_and_skip(torch, rng):
    """hwoptim.torch: max_grad_norm equals clip_grad_norm_ then torch's step; a non-finite
    grad skips the step and creates no state."""
    import hwoptim.torch as ht
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(),
                                    torch.nn.Linear(9, 2))
        twin = copy.deepcopy(model)
        ours = ht.AdamW(model.parameters(), lr=0.05, max_grad_norm=0.3, skip_nonfinite=True)
        ref = torch.optim.AdamW(twin.parameters(), lr=0.05, foreach=False)
        x = torch.from_numpy(rng.standard_normal((32, 6)) * 3)
        model(x).pow(2).sum().backward()
        next(model.parameters()).grad[0, 0] = float("nan")
        ours.step()
        assert ours.skipped_steps == 1 and len(ours.state) == 0
        for _ in range(20):
            x = torch.from_numpy(rng.standard_normal((32, 6)) * 3)
            for m, o in ((model, ours), (twin, ref)):
                o.zero_grad()
                m(x).pow(2).sum().backward()
            norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.3)
            ref.step()
            ours.step()
            assert ours.last_grad_norm == pytest.approx(float(norm), rel=1e-12)
        for a, b in zip(model.parameters(), twin.parameters()):
            assert (a - b).abs().max().item() <= 1e-10 * b.abs().max().item()
    finally:
        torch.set_default_dtype(default)
