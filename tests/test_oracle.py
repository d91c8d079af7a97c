"""The NumPy backend against a second, independent oracle (tests/oracles.py): each rule as
torch.optim's docs write it, in plain float64 NumPy, sharing no code with the specs.

Every rule x every option set (all boolean options crossed with each hyperparameter that
switches part of the math at zero: weight decay, momentum, dampening, lr_decay, the initial
accumulator), with random hyperparameters, random params and fresh random grads for STEPS
steps, lr and the other hyperparameters changed mid-run. Params and every state buffer are
compared after every step. Both sides are float64, so they differ by rounding only, which
accumulates in absolute terms from the largest values a buffer held. So with ``s`` the
elementwise maximum of ``|ref|`` over this step and all before it (the initial value included;
it keeps cancellation covered, e.g. ``β1·m + (1-β1)·g`` near 0): norm-wise
``||got - ref|| <= NORM_TOL ||s||`` and elementwise ``|got - ref| <= ELEM_REL s + ELEM_FLOOR
max(s)``. A slip in the math misses these by orders of magnitude.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import hwoptim
from hwoptim.rules import RULES
from hwoptim.testing import random_values

try:
    from oracles import DEFAULTS, ORACLES
except ImportError:       # pytest --import-mode=importlib leaves tests/ off sys.path
    import importlib.util
    import pathlib
    _spec = importlib.util.spec_from_file_location(
        "oracles", pathlib.Path(__file__).with_name("oracles.py"))
    _oracles = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_oracles)
    ORACLES, DEFAULTS = _oracles.ORACLES, _oracles.DEFAULTS

STEPS = 30
CHANGE_AT = (11, 21)      # before these steps: new lr and new values of the other hypers
NORM_TOL = 1e-12
ELEM_REL = 1e-11
ELEM_FLOOR = 1e-14

# hyperparameters whose zero / non-zero value switches part of the math: crossed with the
# boolean options, and kept zero / non-zero when changed mid-run (a change of that may be
# refused, where it needs other state buffers)
SWITCHES = ("weight_decay", "momentum", "dampening", "lr_decay", "initial_accumulator_value")

# random values of each hyperparameter (non-zero ones for the SWITCHES)
SAMPLERS = {
    "lr": lambda r: 10 ** r.uniform(-4, -0.5),
    "betas": lambda r: (r.uniform(0.5, 0.99), r.uniform(0.9, 0.9999)),
    "eps": lambda r: 10 ** r.uniform(-10, -5),
    "rho": lambda r: r.uniform(0.8, 0.99),
    "alpha": lambda r: r.uniform(0.9, 0.999),
    "weight_decay": lambda r: 10 ** r.uniform(-4, -1),
    "momentum": lambda r: r.uniform(0.5, 0.99),
    "dampening": lambda r: r.uniform(0.05, 0.5),
    "lr_decay": lambda r: 10 ** r.uniform(-3, -1),
    "initial_accumulator_value": lambda r: r.uniform(0.01, 1.0),
    "etas": lambda r: (r.uniform(0.2, 0.9), r.uniform(1.05, 2.0)),
    "step_sizes": lambda r: (10 ** r.uniform(-7, -4), 10 ** r.uniform(-1, 2)),
    "momentum_decay": lambda r: 10 ** r.uniform(-3, -0.5),
    "lambd": lambda r: 10 ** r.uniform(-4, 0),
    "t0": lambda r: float(r.integers(0, 25)),         # averaging starts within the run
    "trust_coefficient": lambda r: 10 ** r.uniform(-4, 0),
    "beta2_decay": lambda r: -r.uniform(0.3, 1.0),
    "d": lambda r: r.uniform(1.0, 3.0),
    # Adafactor's (eps1, eps2): eps1 None (the dtype's epsilon) or drawn
    "eps pair": lambda r: (None if r.random() < 0.5 else 10 ** r.uniform(-30, -8),
                           10 ** r.uniform(-4, -2)),
}


def _sample(rule, h, rng):
    key = "eps pair" if h == "eps" and isinstance(rule.hypers[h].default, tuple) else h
    return SAMPLERS[key](rng)


def _rejected(name, kw) -> bool:
    """Option sets the class refuses (ValueError), as torch does."""
    return (name in ("SGD", "LARS") and kw["nesterov"]
            and (kw["momentum"] == 0 or kw["dampening"] != 0))


def _cases():
    out = []
    for rule in RULES.values():
        bools = [k for k, v in rule.options.items() if isinstance(v, bool)]
        switches = [h for h in SWITCHES if h in rule.hypers]
        for bv in itertools.product((False, True), repeat=len(bools)):
            for sv in itertools.product((False, True), repeat=len(switches)):
                opts, nonzero = dict(zip(bools, bv)), dict(zip(switches, sv))
                cid = ",".join([f"{k}={v}" for k, v in opts.items()]
                               + [f"{k}{'!=0' if v else '=0'}" for k, v in nonzero.items()])
                out.append(pytest.param(rule.name, opts, nonzero, id=f"{rule.name}[{cid}]"))
    return out


def test_every_rule_has_an_oracle():
    assert set(RULES) == set(ORACLES), (
        f"rules without an independent reference: {sorted(set(RULES) - set(ORACLES))}; "
        f"oracles without a rule: {sorted(set(ORACLES) - set(RULES))}. Adding a rule means "
        f"adding its independent reference (from the published formula, not the spec) to "
        f"tests/oracles.py")


@pytest.mark.parametrize("name", sorted(RULES))
def test_defaults_are_the_published_ones(name, rng):
    """Each class's signature defaults are the published ones (tests/oracles.py DEFAULTS),
    and a class made with no arguments steps as the oracle does with them."""
    import inspect
    assert name in DEFAULTS, f"{name}: add its published defaults to tests/oracles.py"
    cls = getattr(hwoptim, name)
    sig = {k: v.default for k, v in inspect.signature(cls).parameters.items()
           if k not in ("params", "backend", "capturable", "max_grad_norm", "skip_nonfinite")}
    assert sig == DEFAULTS[name], f"{name}: defaults {sig}, published {DEFAULTS[name]}"
    p = random_values(rng, (40,), np.float64)
    ref, st = p.copy(), {}
    opt = cls(p, backend="numpy")
    for t in range(1, 6):
        g = random_values(rng, (40,), np.float64)
        opt.step(g)
        ORACLES[name](ref, st, g, t, **DEFAULTS[name])
    np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-14 * np.abs(ref).max())


def _draw(rule, rng, nonzero) -> dict:
    missing = sorted(set(rule.hypers) - set(SAMPLERS))
    assert not missing, f"{rule.name}: no sampler for {missing}; add one to SAMPLERS"
    return {h: (_sample(rule, h, rng) if nonzero.get(h, True) else 0.0) for h in rule.hypers}


def _check(where, got, ref, scale, observed, key):
    """Raise with a message naming ``where`` if ``got`` is not ``ref`` up to rounding;
    ``scale``: the largest ``|ref|`` so far, elementwise."""
    got, ref, scale = (np.asarray(a, np.float64).reshape(-1) for a in (got, ref, scale))
    err = np.abs(got - ref)
    bound = ELEM_REL * scale + ELEM_FLOOR * np.max(scale, initial=0.0)
    nerr, nref = float(np.linalg.norm(err)), float(np.linalg.norm(scale))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(err == 0, 0.0, err / bound)
        norm_ratio = 0.0 if nerr == 0 else nerr / (NORM_TOL * nref)
    ratios = np.where(np.isnan(ratios), np.inf, ratios)
    j = int(np.argmax(ratios))
    observed.max("oracle elementwise ratio", key, ratios[j])
    observed.max("oracle norm ratio", key, norm_ratio)
    if not (ratios[j] <= 1 and norm_ratio <= 1):
        raise AssertionError(
            f"{where}: ||got - ref|| = {nerr:.3g} vs ||max |ref| so far|| = {nref:.3g} "
            f"(ratio to the bound, {NORM_TOL:g} times that: {norm_ratio:.3g}); "
            f"worst element [{j}]: got {got[j]!r}, ref {ref[j]!r}, |err| {err[j]:.3g} vs "
            f"bound {bound[j]:.3g} (ratio {ratios[j]:.3g})")


@pytest.mark.parametrize("name, opts, nonzero", _cases())
def test_numpy_backend_matches_oracle(name, opts, nonzero, rng, observed, request):
    rule = RULES[name]
    oracle = ORACLES.get(name)
    if oracle is None:
        pytest.fail(f"{name} has no independent reference in tests/oracles.py")
    hp = _draw(rule, rng, nonzero)
    shapes = [tuple(int(n) for n in rng.integers(1, 12, size=rng.integers(1, 4)))
              for _ in range(3)]
    params = [random_values(rng, s, np.float64) for s in shapes]
    if _rejected(name, {**hp, **opts}):
        with pytest.raises(ValueError, match="nesterov"):
            getattr(hwoptim, name)(params, backend="numpy", **hp, **opts)
        return
    opt = getattr(hwoptim, name)(params, backend="numpy", **hp, **opts)
    ref = [p.copy() for p in params]
    ref_state = [{} for _ in params]
    seen = [{"param": np.abs(p)} for p in params]      # largest |ref| so far, per buffer
    key = request.node.callspec.id
    # the hypers that may change mid-run without changing which state buffers exist
    changeable = [h for h in rule.hypers
                  if h not in ("lr", "initial_accumulator_value")
                  and not (h in SWITCHES and hp[h] == 0)]
    for t in range(1, STEPS + 1):
        if t in CHANGE_AT:
            new = {h: _sample(rule, h, rng) for h in ("lr", *changeable)}
            for h, v in new.items():
                opt.param_groups[0][h] = v
            hp.update(new)
        grads = [random_values(rng, s, np.float64) for s in shapes]
        opt.step(grads)
        for i, (p, g) in enumerate(zip(ref, grads)):
            oracle(p, ref_state[i], g, t, **hp, **opts)
        for i, (p, r) in enumerate(zip(params, ref)):
            setting = ", ".join(f"{k}={v!r}" for k, v in {**opts, **hp}.items())
            where = f"{name}({setting}) step {t}, param {i} of shape {shapes[i]}"
            got_state = dict(opt.state[i])
            carried = opt.state_dict().get("carry", [{}])[0] or {}
            got_state.update({f"_{k}": np.float64(v) for k, v in carried.items()})
            assert set(got_state) == set(ref_state[i]), (
                f"{where}: state buffers {sorted(got_state)}, the oracle has "
                f"{sorted(ref_state[i])}")
            for buf, want in [("param", r), *ref_state[i].items()]:
                got = p if buf == "param" else got_state[buf]
                s = seen[i][buf] = np.maximum(seen[i].get(buf, 0.0), np.abs(want))
                _check(f"{where}, buffer {buf!r}", got, want, s, observed, key)
