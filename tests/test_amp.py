"""Loss scaling fused into the step: ``step(grads, grad_scale=, found_inf=)`` on every native
class, and ``torch.amp.GradScaler`` handing both to the ``hwoptim.torch`` classes
(``_step_supports_amp_scaling``), as torch's fused optimizers take them.

* ``grad_scale=s``: the step uses grads / s. With a power of 2 (what GradScaler uses) it is
  the unscaled step bit for bit, for every rule, host backend and dtype, with and without
  ``max_grad_norm`` (whose norm is then the unscaled grads'); with any other scale, within
  an ulp of dividing first.
* ``found_inf`` non-zero: the whole step is skipped (params, state, carried scalars, step
  count unchanged, bit for bit) and counted in ``skipped_steps``, as ``skip_nonfinite``.
* Bad values are refused before anything changes.
* With GradScaler, hwoptim.torch's Adam and SGD follow torch's fused CPU optimizers through a
  training run with an overflowing step (the scale halves, that step is skipped).
"""
from __future__ import annotations

import numpy as np
import pytest

import hwoptim
from conftest import assert_same_snapshot, snapshot
from hwoptim import backends
from hwoptim.rules import RULES
from hwoptim.testing import option_sets, random_values

HOST = [n for n in backends.available() if backends.load(n).FAMILY == "host"]
DTYPES = ["float32", "float64"]
SHAPES = [(13, 7), (5,), (40,)]
CASES = [pytest.param(rule, opts, id=oid) for rule in RULES.values()
         for oid, opts in option_sets(rule)]


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("rule, opts", CASES)
def test_scaled_step_is_the_unscaled_step(rule, opts, clip, dtype, backend, rng):
    """Power-of-2 scales (GradScaler's): bit for bit the step on the unscaled grads, the
    scale changing from step to step and one step unscaled in between; a found_inf step
    changes nothing."""
    init = [random_values(rng, s, np.float64).astype(dtype) for s in SHAPES]
    mine, plain = [p.copy() for p in init], [p.copy() for p in init]
    cls = getattr(hwoptim, rule.name)
    kw = dict(backend=backend, max_grad_norm=clip, **opts)
    a, b = cls(mine, **kw), cls(plain, **kw)
    for t, scale in enumerate([2.0 ** 16, 2.0 ** 15, None, 2.0 ** -3, 1.0]):
        g = [random_values(rng, s, np.float64).astype(dtype) for s in SHAPES]
        if scale is None:
            a.step(g)
        else:
            a.step([x * x.dtype.type(scale) for x in g], grad_scale=np.float32(scale))
        b.step(g)
        tol = {} if not rule_takes_norms(rule, opts) else dict(rtol=1e-5, atol=0)
        for x, y in zip(mine, plain):
            if tol:
                np.testing.assert_allclose(x, y, **tol)
            else:
                assert np.array_equal(x, y), (rule.name, t, scale)
        if clip is not None:
            assert a.last_grad_norm == pytest.approx(b.last_grad_norm, rel=1e-12)
    before = snapshot(a, mine)
    a.step([np.full(s, np.inf, dtype) for s in SHAPES], grad_scale=8.0,
           found_inf=np.array(1.0, np.float32))
    assert_same_snapshot(snapshot(a, mine), before)
    assert a.skipped_steps == 1 and a.last_step_skipped


def rule_takes_norms(rule, opts):
    """Rules whose update takes norms of whole arrays (their reduction pass reassociates,
    so a scaled grad's norm may differ from the unscaled one's in the last bits)."""
    return "trust_ratio" in rule.options and opts.get("trust_ratio", True)


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", DTYPES)
def test_any_scale_is_dividing_first(dtype, backend, rng):
    """A scale that is not a power of 2: within an ulp of the step on grads divided first
    (the kernel multiplies by 1/s, rounded once)."""
    init = [random_values(rng, s, np.float64).astype(dtype) for s in SHAPES]
    mine, plain = [p.copy() for p in init], [p.copy() for p in init]
    a = hwoptim.AdamW(mine, lr=1e-2, backend=backend)
    b = hwoptim.AdamW(plain, lr=1e-2, backend=backend)
    for _ in range(4):
        g = [random_values(rng, s, np.float64).astype(dtype) for s in SHAPES]
        a.step(g, grad_scale=3.0)
        b.step([x / x.dtype.type(3.0) for x in g])
    eps = np.finfo(dtype).eps
    for x, y in zip(mine, plain):
        np.testing.assert_allclose(x, y, rtol=64 * eps, atol=0)


@pytest.mark.parametrize("found_inf", [1.0, np.float32(1.0), np.array([2.0]), True,
                                       float("nan")])
def test_found_inf_skips_everything(found_inf, rng):
    params = [random_values(rng, s, np.float64).astype(np.float32) for s in SHAPES]
    opt = hwoptim.NAdam(params, lr=1e-2)
    g = [random_values(rng, s, np.float64).astype(np.float32) for s in SHAPES]
    opt.step(g)
    before = snapshot(opt, params)
    opt.step(g, found_inf=found_inf)
    assert_same_snapshot(snapshot(opt, params), before)
    assert opt.step_count == 1 and opt.skipped_steps == 1 and opt.last_step_skipped
    opt.step(g, found_inf=0.0)              # no inf found: a normal step
    assert opt.step_count == 2 and not opt.last_step_skipped


@pytest.mark.parametrize("kw, match", [
    (dict(grad_scale=0.0), "grad_scale=0.0 is invalid: expected a finite number > 0"),
    (dict(grad_scale=-2.0), "grad_scale=-2.0 is invalid"),
    (dict(grad_scale=float("inf")), "grad_scale=inf is invalid"),
    (dict(grad_scale=float("nan")), "grad_scale=nan is invalid"),
    (dict(grad_scale=np.ones(2)), "grad_scale is ndarray of 2 elements; expected a number"),
    (dict(grad_scale="8"), "grad_scale is str; expected a number"),
    (dict(found_inf=np.zeros(3)), "found_inf is ndarray of 3 elements"),
    (dict(grad_scale=0.0, found_inf=1.0), "grad_scale=0.0 is invalid"),
])
def test_bad_scale_is_refused_and_changes_nothing(kw, match, rng):
    params = [random_values(rng, s, np.float64).astype(np.float32) for s in SHAPES]
    opt = hwoptim.Adam(params, lr=1e-2)
    g = [random_values(rng, s, np.float64).astype(np.float32) for s in SHAPES]
    opt.step(g)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(".", r"\.")):
        opt.step(g, **kw)
    assert_same_snapshot(snapshot(opt, params), before)
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("name, make", [
    ("Adam", lambda torch, ps, **kw: torch.optim.Adam(ps, lr=1e-2, **kw)),
    ("SGD", lambda torch, ps, **kw: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, **kw)),
])
def test_grad_scaler_drives_hwoptim_torch_like_torch_fused(name, make, torch):
    """torch.amp.GradScaler with hwoptim.torch's class against torch's fused CPU optimizer
    (GradScaler hands both the scale and found_inf): 12 steps of a small MLP, step 5's
    grads overflowing (skipped, the scale halves), the same params and scale at the end."""
    import hwoptim.torch as ht
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    twin = __import__("copy").deepcopy(net)
    ours = make(torch, net.parameters(), fused=False)
    ours = getattr(ht, name)(net.parameters(), **{k: v for k, v in ours.defaults.items()
                                                 if k in ("lr", "momentum")})
    ref = make(torch, twin.parameters(), fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2)]
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for t in range(12):
        for model, opt, sc in ((net, ours, scalers[0]), (twin, ref, scalers[1])):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            sc.scale(loss).backward()
            if t == 5:
                next(model.parameters()).grad[0, 0] = float("inf")
            sc.step(opt)
            sc.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0 ** 9
    assert ours.skipped_steps == 1
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=1e-7)
    assert not hasattr(ours, "grad_scale") and not hasattr(ours, "found_inf")


@pytest.mark.parametrize("backend", HOST)
def test_many_arrays_scaled(backend, rng):
    """200 arrays (the multi-tensor launch, grads checked by address): the first scaled
    step switches kernels after the grads' check, and still gives the unscaled bits."""
    shapes = [(int(n),) for n in rng.integers(1, 300, 200)]
    init = [random_values(rng, s, np.float64).astype(np.float32) for s in shapes]
    mine, plain = [p.copy() for p in init], [p.copy() for p in init]
    a = hwoptim.Adam(mine, lr=1e-2, backend=backend)
    b = hwoptim.Adam(plain, lr=1e-2, backend=backend)
    for t in range(3):
        g = [random_values(rng, s, np.float64).astype(np.float32) for s in shapes]
        a.step([x * np.float32(2.0 ** 12) for x in g], grad_scale=2.0 ** 12)
        b.step(g)
    assert all(np.array_equal(x, y) for x, y in zip(mine, plain))
