"""Bad input: a ValueError or TypeError whose message names the argument, the value received
and what was expected; params and optimizer state byte-for-byte unchanged afterwards (and
the step count and hyperparameters too); a valid step afterwards still works.

Params on different devices need a GPU (tests/test_gpu.py).
"""
from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest

import hwoptim
from hwoptim import backends
from hwoptim.rules import RULES
from hwoptim.testing import option_sets, random_values

SHAPES = [(4, 5), (3,)]
RULE_LIST = list(RULES.values())
RULE_IDS = list(RULES)


def _flags(rule, opts):
    h = {n: opts.get(n, hy.default) for n, hy in rule.hypers.items()}
    return rule.static_flags(h, {n: opts.get(n, v) for n, v in rule.options.items()})


def _stateful_options(rule) -> dict:
    """The first option set of ``rule`` that keeps state (SGD: with momentum)."""
    for _, opts in option_sets(rule):
        if rule.active_states(_flags(rule, opts)):
            return opts
    return {}


def _grads(rng, opt):
    return [random_values(rng, p.shape, p.dtype) for g in opt.param_groups for p in g["params"]]


def _params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def make(rule, rng, dtype=np.float64, shapes=SHAPES, warm=2, **kwargs):
    """An optimizer for ``rule`` over random params, with state, after ``warm`` steps."""
    kwargs = {**_stateful_options(rule), **kwargs}
    params = [random_values(rng, s, dtype) for s in shapes]
    opt = getattr(hwoptim, rule.name)(params, **kwargs)
    for _ in range(warm):
        opt.step(_grads(rng, opt))
    return opt


def snapshot(opt):
    """Everything a rejected call must leave alone, as bytes."""
    return {
        "step": opt.step_count,
        "params": [(p.dtype, p.shape, p.tobytes()) for p in _params(opt)],
        "state": [{k: (v.dtype, v.shape, v.tobytes()) for k, v in st.items()}
                  for st in opt.state],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "group_params": [[id(p) for p in g["params"]] for g in opt.param_groups],
    }


def assert_unchanged(opt, before, rng):
    after = snapshot(opt)
    assert after["step"] == before["step"]
    assert after["params"] == before["params"], "params changed"
    assert after["state"] == before["state"], "optimizer state changed"
    assert after["groups"] == before["groups"], "hyperparameters changed"
    assert after["group_params"] == before["group_params"]
    # and a valid step still works
    old = [p.copy() for p in _params(opt)]
    opt.step(_grads(rng, opt))
    assert opt.step_count == before["step"] + 1
    assert any(not np.array_equal(a, p) for a, p in zip(old, _params(opt)))
    assert all(np.isfinite(p).all() for p in _params(opt))


def raises(exc, fn, *fragments):
    """``fn()`` raises ``exc`` (only); its message holds every fragment. Returns the message."""
    with pytest.raises(exc) as info:
        fn()
    assert type(info.value) in (ValueError, TypeError)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in message {msg!r}"
    return msg


def rejected(opt, rng, exc, fn, *fragments):
    before = snapshot(opt)
    msg = raises(exc, fn, *fragments)
    assert_unchanged(opt, before, rng)
    return msg


# ----------------------------------------------------------------------------- grads

@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_wrong_number_of_grads(rule, rng):
    opt = make(rule, rng)
    g = _grads(rng, opt)
    rejected(opt, rng, ValueError, lambda: opt.step(g[:1]), "got 1 grads", "expected 2")
    rejected(opt, rng, ValueError, lambda: opt.step(g + [g[1].copy()]), "got 3 grads",
             "expected 2")
    rejected(opt, rng, ValueError, lambda: opt.step([]), "got 0 grads", "expected 2")
    rejected(opt, rng, ValueError, lambda: opt.step(g[0]), "one array", "2 params")


@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_grad_shape_mismatch(rule, rng):
    opt = make(rule, rng)
    g = _grads(rng, opt)
    rejected(opt, rng, ValueError, lambda: opt.step([g[0], np.ones(4)]),
             "grads[1]", "shape (4,)", "expected (3,)")
    # same size, other shape: no silent reshape
    rejected(opt, rng, ValueError, lambda: opt.step([g[0].reshape(5, 4).copy(), g[1]]),
             "grads[0]", "(5, 4)", "(4, 5)")


@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_grad_dtype_mismatch(rule, rng):
    opt = make(rule, rng)
    g = _grads(rng, opt)
    rejected(opt, rng, TypeError, lambda: opt.step([g[0].astype(np.float32), g[1]]),
             "grads[0]", "float32", "expected float64")
    opt32 = make(rule, rng, dtype=np.float32)
    g = _grads(rng, opt32)
    rejected(opt32, rng, TypeError, lambda: opt32.step([g[0], g[1].astype(np.float64)]),
             "grads[1]", "float64", "expected float32")


@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_non_contiguous_grads(rule, rng):
    opt = make(rule, rng)
    g = _grads(rng, opt)
    strided = random_values(rng, (4, 10))[:, ::2]
    fortran = np.asfortranarray(g[0])
    for bad in (strided, fortran):
        assert bad.shape == (4, 5) and not bad.flags.c_contiguous
        rejected(opt, rng, ValueError, lambda: opt.step([bad, g[1]]),
                 "grads[0]", "not C-contiguous", "numpy.ascontiguousarray")


@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_grads_that_are_params(rule, rng):
    opt = make(rule, rng)
    p, g = _params(opt), _grads(rng, opt)
    rejected(opt, rng, ValueError, lambda: opt.step([p[0], g[1]]),
             "grads[0] overlaps params[0]", "own memory")
    rejected(opt, rng, ValueError, lambda: opt.step([g[0], p[1]]),
             "grads[1] overlaps params[1]")
    rejected(opt, rng, ValueError, lambda: opt.step(p), "overlaps params[")


def test_grads_that_overlap_params_through_a_view(rng):
    buf = random_values(rng, (200,))
    p = buf[:100]
    opt = hwoptim.Adam(p)
    opt.step(random_values(rng, (100,)))
    rejected(opt, rng, ValueError, lambda: opt.step(buf[50:150]),
             "grads[0] overlaps params[0]")
    # a view that ends where the param begins is fine
    other = np.empty(300)
    q = other[100:200]
    q[:] = random_values(rng, (100,))
    opt2 = hwoptim.SGD(q, lr=0.1)
    g = other[:100]
    g[:] = random_values(rng, (100,))
    before = q.copy()
    opt2.step(g)
    np.testing.assert_array_equal(q, before - 0.1 * g)


def test_grads_that_overlap_each_other(rng):
    opt = hwoptim.RMSprop([random_values(rng, (100,)), random_values(rng, (100,))])
    opt.step([random_values(rng, (100,)), random_values(rng, (100,))])
    buf = random_values(rng, (200,))
    msg = rejected(opt, rng, ValueError, lambda: opt.step([buf[:100], buf[50:150]]),
                   "grads[0]", "grads[1]", "overlaps")
    assert "each other" in msg
    # the same array twice
    g = random_values(rng, (100,))
    rejected(opt, rng, ValueError, lambda: opt.step([g, g]), "grads[0]", "grads[1]")


@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_grads_that_overlap_state(rule, rng):
    opt = make(rule, rng)
    g = _grads(rng, opt)
    for i in range(len(SHAPES)):
        for name in opt.state[i]:
            if opt.state[i][name].shape != g[i].shape:
                continue                   # (Adafactor's row and column factors)
            bad = list(g)
            bad[i] = opt.state[i][name]
            rejected(opt, rng, ValueError, lambda: opt.step(bad),
                     f"grads[{i}] overlaps state[{i}][{name!r}]")
    # a view into state[0] passed as grads[1]
    name = max(opt.state[0], key=lambda n: opt.state[0][n].size)
    view = opt.state[0][name].reshape(-1)[-3:]
    rejected(opt, rng, ValueError, lambda: opt.step([g[0], view]),
             f"grads[1] overlaps state[0][{name!r}]")


def test_grad_that_is_not_an_array(rng):
    opt = make(RULES["Adam"], rng)
    g = _grads(rng, opt)
    rejected(opt, rng, TypeError, lambda: opt.step([g[0].tolist(), g[1]]),
             "grads[0]", "list", "expected a NumPy array")
    rejected(opt, rng, TypeError, lambda: opt.step([g[0], 1.5]),
             "grads[1]", "float", "expected a NumPy array")
    rejected(opt, rng, TypeError, lambda: opt.step({"a": g[0], "b": g[1]}),
             "grads is", "dict", "expected an array or a list")
    rejected(opt, rng, TypeError, lambda: opt.step(None), "grads is", "NoneType")


def test_ndarray_subclasses_step(rng, tmp_path):
    """np.memmap params are accepted at construction; stepping them with plain grads, or
    plain params with memmap grads, works (or is refused with a message that says why)."""
    mm = np.memmap(tmp_path / "p", dtype=np.float64, mode="w+", shape=(10,))
    mm[:] = random_values(rng, (10,))
    opt = hwoptim.SGD(mm, lr=0.1)
    g = random_values(rng, (10,))
    before = np.array(mm)
    opt.step(g)
    np.testing.assert_array_equal(np.asarray(mm), before - 0.1 * g)
    gm = np.memmap(tmp_path / "g", dtype=np.float64, mode="w+", shape=(10,))
    gm[:] = g
    p = random_values(rng, (10,))
    hwoptim.SGD(p, lr=0.1).step(gm)


# ----------------------------------------------------------------------------- params

def _no_change_on_construct(fn, arrays, exc, *fragments):
    before = [(a.dtype, a.shape, a.tobytes()) for a in arrays]
    msg = raises(exc, fn, *fragments)
    assert [(a.dtype, a.shape, a.tobytes()) for a in arrays] == before
    return msg


@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_non_contiguous_params(rule, rng):
    cls = getattr(hwoptim, rule.name)
    base = random_values(rng, (4, 10))
    for bad in (base[:, ::2], np.asfortranarray(base)):
        good = random_values(rng, (3,))
        _no_change_on_construct(lambda: cls([good, bad]), [base, good], ValueError,
                                "params[1]", f"shape {bad.shape}", "not C-contiguous",
                                "a contiguous copy would not update the caller's array")


def test_read_only_params(rng):
    p = random_values(rng, (4, 5))
    p.flags.writeable = False
    for rule in RULE_LIST:
        cls = getattr(hwoptim, rule.name)
        _no_change_on_construct(lambda: cls([random_values(rng, (3,)), p]), [p], ValueError,
                                "params[1]", "read-only", "expected a writeable array")


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.longdouble, np.complex128, np.bool_])
def test_non_float_params(dtype, rng):
    """(float16 and bfloat16 are storage formats: tests/test_formats.py)"""
    p = (random_values(rng, (4, 5)) * 10).astype(dtype)
    for rule in RULE_LIST:
        cls = getattr(hwoptim, rule.name)
        _no_change_on_construct(lambda: cls(p), [p], TypeError, "params[0]",
                                f"dtype {np.dtype(dtype)}",
                                "expected float32, float64, float16 or bfloat16")


def test_params_of_mixed_dtypes(rng):
    a = random_values(rng, (4, 5), np.float64)
    b = random_values(rng, (3,), np.float32)
    for rule in RULE_LIST:
        cls = getattr(hwoptim, rule.name)
        _no_change_on_construct(lambda: cls([a, b]), [a, b], TypeError,
                                "params[1]", "float32", "params[0]", "float64",
                                "one dtype")


def test_params_that_overlap(rng):
    buf = random_values(rng, (200,))
    _no_change_on_construct(lambda: hwoptim.Adam([buf[:100], buf[50:150]]), [buf],
                            ValueError, "params[1] overlaps params[0]")
    _no_change_on_construct(lambda: hwoptim.Adam([buf, buf]), [buf], ValueError, "overlaps")


def test_params_that_are_not_arrays(rng):
    raises(TypeError, lambda: hwoptim.Adam([[1.0, 2.0]]), "params[0]", "list",
           "expected a numpy.ndarray")
    raises(TypeError, lambda: hwoptim.Adam(None), "params is", "NoneType")
    raises(ValueError, lambda: hwoptim.Adam([]), "params is empty")


# ----------------------------------------------------------------------------- hyperparameters

def _hyper_cases():
    out = []

    def add(rule, kwargs, exc, *fragments):
        rid = ",".join(f"{k}={v!r}" for k, v in kwargs.items())
        out.append(pytest.param(rule, kwargs, exc, fragments, id=f"{rule}[{rid}]"))

    for name, rule in RULES.items():
        add(name, {"lr": -0.1}, ValueError, "lr=-0.1", "expected a number >= 0")
        add(name, {"lr": float("nan")}, ValueError, "lr=nan", "expected")
        add(name, {"lr": "0.1"}, TypeError, "lr='0.1'", "expected a real number")
        add(name, {"lr": None}, TypeError, "lr=None", "expected a real number")
        add(name, {"lr": True}, TypeError, "lr=True", "expected a real number")
        if "weight_decay" in rule.hypers:
            add(name, {"weight_decay": -1e-2}, ValueError, "weight_decay=-0.01", ">= 0")
        if "eps" in rule.hypers and not isinstance(rule.hypers["eps"].default, tuple):
            add(name, {"eps": -1e-8}, ValueError, "eps=-1e-08", ">= 0")
            add(name, {"eps": [1e-8]}, TypeError, "eps=[1e-08]", "real number")
        add(name, {"maximize": "yes"}, TypeError, "maximize='yes'", "True or False")
        add(name, {"mommentum": 0.9}, TypeError, "'mommentum'", "expected", "lr, ")
    for name in ("Adam", "AdamW", "Adamax", "RAdam"):
        for betas in ((0.9, 1.0), (-0.1, 0.999), (0.9,), (0.9, 0.99, 0.999), "ab"):
            add(name, {"betas": betas}, ValueError, f"betas={betas!r}", "[0, 1)")
    for name in ("Adam", "AdamW"):
        add(name, {"amsgrad": 1}, TypeError, "amsgrad=1", "True or False")
    for etas in ((1.2, 0.5), (0.5, 1.0), (0.0, 1.2), (0.5,), "ab"):
        add("Rprop", {"etas": etas}, ValueError, f"etas={etas!r}", "0 < etaminus < 1 < etaplus")
    for sizes in ((-1e-6, 50.0), (1.0, 0.5), (1e-6, 50.0, 1.0)):
        add("Rprop", {"step_sizes": sizes}, ValueError, f"step_sizes={sizes!r}",
            "0 <= min <= max")
    for rho in (1.0, -0.1, 1.5):
        add("Adadelta", {"rho": rho}, ValueError, f"rho={rho!r}", "[0, 1)")
    for eps in ((-1e-3, 1e-3), (None, -1e-3), (None,), 1e-3, (None, None)):
        add("Adafactor", {"eps": eps}, ValueError, f"eps={eps!r}", "eps1 None or >= 0")
    add("Adafactor", {"eps": (float("nan"), 1e-3)}, ValueError, "eps=(nan", "expected")
    add("Adafactor", {"beta2_decay": 0.5}, ValueError, "beta2_decay=0.5", "<= 0")
    add("Adafactor", {"d": 0.5}, ValueError, "d=0.5", ">= 1")
    add("Adagrad", {"lr_decay": -1.0}, ValueError, "lr_decay=-1.0", ">= 0")
    add("Adagrad", {"initial_accumulator_value": -1.0}, ValueError,
        "initial_accumulator_value=-1.0", ">= 0")
    add("SGD", {"nesterov": True}, ValueError, "nesterov=True", "momentum > 0",
        "momentum=0.0")
    add("SGD", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError,
        "nesterov=True", "dampening == 0", "dampening=0.1")
    add("SGD", {"momentum": -0.9}, ValueError, "momentum=-0.9", ">= 0")
    add("SGD", {"dampening": -0.5}, ValueError, "dampening=-0.5", ">= 0")
    add("SGD", {"momentum": "0.9"}, TypeError, "momentum='0.9'", "real number")
    add("RMSprop", {"momentum": -0.9}, ValueError, "momentum=-0.9", ">= 0")
    add("RMSprop", {"alpha": -0.9}, ValueError, "alpha=-0.9", ">= 0")
    add("RMSprop", {"centered": None}, TypeError, "centered=None", "True or False")
    return out


@pytest.mark.parametrize("name, kwargs, exc, fragments", _hyper_cases())
def test_invalid_hyperparameters(name, kwargs, exc, fragments, rng):
    cls = getattr(hwoptim, name)
    p = random_values(rng, (4, 5))
    _no_change_on_construct(lambda: cls(p, **kwargs), [p], exc, *fragments)
    # the same in a param group: named with the group's index
    q = random_values(rng, (3,))
    make = lambda: cls([{"params": [q]}, {"params": [p], **kwargs}])  # noqa: E731
    if "mommentum" in kwargs:
        # a group keeps keys that are no hyperparameter untouched, as torch does (names,
        # schedulers' keys); one that looks misspelt gets a warning naming the likely one
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt = make()
        assert opt.param_groups[1]["mommentum"] == 0.9
        near = [m for m in ("momentum",) if m in {*RULES[name].hypers}]
        assert [str(x.message) for x in w if "did you mean" in str(x.message)] == (
            [f"param_groups[1]: 'mommentum' is not a hyperparameter of {name} (did you mean "
             f"'momentum'?); it is kept in the group, and the kernels do not use it"]
            if near else [])
        return
    msg = _no_change_on_construct(make, [p, q], exc, *fragments)
    assert "param_groups[1]" in msg


def test_numpy_scalars_in_betas_are_accepted(rng):
    p = random_values(rng, (3,))
    opt = hwoptim.Adam(p, betas=(np.float32(0.9), np.float32(0.999)))
    opt.step(random_values(rng, (3,)))
    assert opt.step_count == 1


def test_too_many_positional_hyperparameters(rng):
    p = random_values(rng, (3,))
    raises(TypeError, lambda: hwoptim.SGD(p, 0.1, 0.9, 0.0, 0.0, False, False, 7),
           "at most 6", "got 7")
    raises(TypeError, lambda: hwoptim.SGD(p, 0.1, lr=0.2), "'lr'", "both")


def test_groups_keep_keys_that_are_no_hyperparameter(rng):
    """torch users keep names and schedulers' keys in groups: kept untouched, saved and
    restored, and never mistaken for hyperparameters."""
    p, q = random_values(rng, (4, 5)), random_values(rng, (3,))
    opt = hwoptim.SGD([{"params": [p], "name": "weights"},
                       {"params": [q], "initial_lr": 0.1, "max_lr": 0.3}], lr=0.1)
    opt.param_groups[0]["initial_lr"] = 0.1
    opt.param_groups[0].setdefault("base_momentum", 0.85)
    assert opt.param_groups[0]["name"] == "weights"
    assert opt.param_groups[1]["max_lr"] == 0.3
    del opt.param_groups[0]["base_momentum"]
    assert "base_momentum" not in opt.param_groups[0]
    sd = opt.state_dict()
    assert sd["param_groups"][0]["name"] == "weights"
    sd["param_groups"][1]["max_lr"] = 0.5
    opt.load_state_dict(sd)
    assert opt.param_groups[1]["max_lr"] == 0.5
    raises(TypeError, lambda: opt.param_groups[0].pop("lr"), "'lr'", "cannot be removed")


@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_callable_lr_returning_a_bad_value(rule, rng):
    bad = {"value": None}
    base = rule.hypers["lr"].default

    def lr(t):
        return base if bad["value"] is None else bad["value"]

    opt = make(rule, rng, lr=lr)
    for value, shown in ((-1.0, "-1.0"), (float("nan"), "nan"), ("0.1", "'0.1'"),
                         (True, "True")):
        bad["value"] = value
        rejected_step = opt.step_count + 1
        before = snapshot(opt)
        raises(ValueError, lambda: opt.step(_grads(rng, opt)),
               "param_groups[0]", f"lr({rejected_step}) returned {shown}",
               "expected a finite number >= 0")
        bad["value"] = None
        assert_unchanged(opt, before, rng)


@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_setting_a_bad_hyperparameter_on_a_group(rule, rng):
    opt = make(rule, rng)
    g = opt.param_groups[0]
    rejected(opt, rng, ValueError, lambda: g.__setitem__("lr", -1), "param_groups[0]",
             "lr=-1", "expected a number >= 0")
    rejected(opt, rng, TypeError, lambda: g.__setitem__("lr", "x"), "lr='x'", "real number")
    if "weight_decay" in rule.hypers:
        rejected(opt, rng, ValueError, lambda: g.__setitem__("weight_decay", -0.5),
                 "weight_decay=-0.5", ">= 0")
    rejected(opt, rng, ValueError, lambda: g.__setitem__("params", []), "'params'")
    if "betas" in rule.hypers:
        rejected(opt, rng, ValueError, lambda: g.__setitem__("betas", (1.0, 0.5)),
                 "betas=(1.0, 0.5)", "[0, 1)")


def test_setting_a_hyperparameter_that_changes_the_kernel(rng):
    opt = make(RULES["SGD"], rng, momentum=0.0)
    assert opt.state[0] == {}
    rejected(opt, rng, ValueError,
             lambda: opt.param_groups[0].__setitem__("momentum", 0.9),
             "momentum=0.9", "state buffers", "[] -> ['momentum_buffer']", "new optimizer")
    opt = make(RULES["SGD"], rng, momentum=0.9, nesterov=True)
    rejected(opt, rng, ValueError,
             lambda: opt.param_groups[0].__setitem__("dampening", 0.5),
             "nesterov=True", "dampening=0.5")


# ----------------------------------------------------------------------------- backends

def test_unknown_backend(rng):
    p = random_values(rng, (3,))
    for bad in ("nope", "NumPy", 3):
        _no_change_on_construct(lambda: hwoptim.Adam(p, backend=bad), [p], ValueError,
                                f"backend={bad!r}", "unknown", "'numpy'", "'numba'")


def test_unavailable_backend(rng):
    if "cupy" in backends.available():
        pytest.skip("cupy is available here (tests/test_gpu.py covers it)")
    why = backends.unavailable("cupy")
    assert why and re.search(r"driver|device|not installed|No module", why), why
    p = random_values(rng, (3,))
    _no_change_on_construct(lambda: hwoptim.Adam(p, backend="cupy"), [p], ValueError,
                            "backend='cupy'", "not available", why)


def test_a_backend_of_another_family(rng, monkeypatch):
    """backend= naming a usable backend for other arrays (a stand-in registered as a GPU
    backend, so the check runs without a GPU): refused, naming both kinds."""
    import sys
    import types
    mod = types.ModuleType("hwoptim_test_gpu_backend")
    mod.FAMILY, mod.unavailable = "cuda", lambda: None
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(backends._REGISTRY, "test-gpu", mod.__name__)
    monkeypatch.setattr(backends, "_loaded", dict(backends._loaded))
    monkeypatch.setattr(backends, "_why_not", dict(backends._why_not))
    assert "test-gpu" in backends.available()
    p = random_values(rng, (3,))
    _no_change_on_construct(lambda: hwoptim.Adam(p, backend="test-gpu"), [p], TypeError,
                            "backend='test-gpu'", "runs on CuPy arrays", "params are NumPy")


def test_default_backend_is_the_fastest_here(rng):
    """NumPy arrays get Numba where it runs (the reference only without it)."""
    want = "numba" if "numba" in backends.available() else "numpy"
    for rule in RULES.values():
        opt = getattr(hwoptim, rule.name)(random_values(rng, (5,)))
        assert opt.backend_name == want, (rule.name, opt.backend_name)


def test_the_step_count_stops_at_2_to_the_53(rng):
    """The step count travels to the kernels as a float64: 2**53 steps are allowed, the
    next one is refused and changes nothing."""
    opt = hwoptim.Adam(random_values(rng, (4,)))
    opt.step(random_values(rng, (4,)))
    sd = opt.state_dict()
    sd["step"] = 2 ** 53 - 1
    opt.load_state_dict(sd)
    opt.step(random_values(rng, (4,)))
    assert opt.step_count == 2 ** 53
    before = snapshot(opt)
    raises(ValueError, lambda: opt.step(random_values(rng, (4,))), "step count", "2**53")
    assert snapshot(opt) == before


def test_capturable_needs_the_cupy_backend(rng):
    p = random_values(rng, (3,))
    _no_change_on_construct(lambda: hwoptim.Adam(p, capturable=True), [p], ValueError,
                            "capturable=True", "cupy")
    _no_change_on_construct(lambda: hwoptim.Adam(p, capturable=1), [p], TypeError,
                            "capturable=1", "True or False")


# ----------------------------------------------------------------------------- load_state_dict

def _saved(rule, rng, dtype=np.float64, shapes=SHAPES, **kwargs):
    src = make(rule, rng, dtype=dtype, shapes=shapes, warm=3, **kwargs)
    return src.state_dict()


@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_load_state_dict_from_another_rule(rule, rng):
    other = RULE_LIST[(RULE_LIST.index(rule) + 1) % len(RULE_LIST)]
    opt = make(rule, rng)
    sd = _saved(other, rng)
    rejected(opt, rng, ValueError, lambda: opt.load_state_dict(sd),
             "state_dict['rule']", repr(other.name), f"expected {rule.name!r}")


@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_load_state_dict_of_another_size(rule, rng):
    opt = make(rule, rng)
    sd = _saved(rule, rng, shapes=[(4, 6), (3,)])
    rejected(opt, rng, ValueError, lambda: opt.load_state_dict(sd),
             "state_dict['shapes']", "(4, 6)", "expected [(4, 5), (3,)]")
    sd = _saved(rule, rng, shapes=[(4, 5)])
    rejected(opt, rng, ValueError, lambda: opt.load_state_dict(sd),
             "state_dict['shapes']", "[(4, 5)]", "expected [(4, 5), (3,)]")


@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_load_state_dict_with_another_layout_of_groups(rule, rng):
    opt = make(rule, rng)
    cls = getattr(hwoptim, rule.name)
    two = cls([{"params": [random_values(rng, s)]} for s in SHAPES],
              **_stateful_options(rule))
    two.step(_grads(rng, two))
    rejected(opt, rng, ValueError, lambda: opt.load_state_dict(two.state_dict()),
             "param groups of sizes [1, 1]", "expected [2]")


@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_load_state_dict_of_another_dtype(rule, rng):
    opt = make(rule, rng, dtype=np.float64)
    sd = _saved(rule, rng, dtype=np.float32)
    rejected(opt, rng, TypeError, lambda: opt.load_state_dict(sd),
             "state_dict['dtype']", "float32", "expected 'float64'")
    # a state_dict whose dtype entry was edited still has float32 arrays: refused too
    sd["dtype"] = "float64"
    name = next(iter(sd["state"][0]))
    rejected(opt, rng, ValueError, lambda: opt.load_state_dict(sd),
             f"state_dict['state'][0][{name!r}]", "float32", "expected float64")


@pytest.mark.parametrize("rule", RULE_LIST, ids=RULE_IDS)
def test_load_state_dict_with_other_options(rule, rng):
    """A state_dict whose options need other state buffers is refused; one whose options
    only pick another kernel over the same buffers loads, and its options take effect."""
    sets = option_sets(rule)
    mine = _flags(rule, {**_stateful_options(rule), **sets[0][1]})
    buffers = lambda f: [s.name for s in rule.active_states(f)]  # noqa: E731
    seen = 0
    for _, opts in sets[1:]:
        theirs = _flags(rule, {**_stateful_options(rule), **opts})
        if vars(theirs) == vars(mine):
            continue
        opt = make(rule, rng, **sets[0][1])
        sd = _saved(rule, rng, **opts)
        if buffers(theirs) != buffers(mine):
            rejected(opt, rng, ValueError, lambda: opt.load_state_dict(sd),
                     "state_dict['param_groups'][0]", "make it with the same options")
        else:
            opt.load_state_dict(sd)
            assert vars(opt._flags[0]) == vars(theirs)
            assert all(opt.param_groups[0][k] == v for k, v in opts.items())
        seen += 1
    assert seen


@pytest.mark.parametrize("key", ["rule", "step", "shapes", "param_groups", "state"])
def test_load_state_dict_with_a_missing_key(key, rng):
    rule = RULES["Adam"]
    opt = make(rule, rng)
    sd = _saved(rule, rng)
    del sd[key]
    rejected(opt, rng, TypeError, lambda: opt.load_state_dict(sd), "state_dict", key)


@pytest.mark.parametrize("key", ["step", "state"])
def test_load_state_dict_missing_key_message_names_it(key, rng):
    rule = RULES["Adam"]
    opt = make(rule, rng)
    sd = _saved(rule, rng)
    del sd[key]
    msg = raises(TypeError, lambda: opt.load_state_dict(sd))
    assert re.search(rf"missing[^.;]*'?{key}'?|'?{key}'?[^.;]* missing|has keys .*\[", msg), msg


def test_load_state_dict_with_missing_or_bad_entries(rng):
    rule = RULES["Adam"]
    opt = make(rule, rng)
    sd = _saved(rule, rng)
    bad = copy.deepcopy(sd)
    del bad["state"][0]["exp_avg"]
    rejected(opt, rng, ValueError, lambda: opt.load_state_dict(bad),
             "state_dict['state'][0]", "['exp_avg_sq']", "expected ['exp_avg', 'exp_avg_sq']")
    bad = copy.deepcopy(sd)
    bad["state"].pop()
    rejected(opt, rng, ValueError, lambda: opt.load_state_dict(bad),
             "state_dict['state']", "1 entries", "expected 2")
    bad = copy.deepcopy(sd)
    bad["state"][1]["exp_avg"] = np.zeros(4)
    rejected(opt, rng, ValueError, lambda: opt.load_state_dict(bad),
             "state_dict['state'][1]['exp_avg']", "(4,)", "expected float64 (3,)")
    bad = copy.deepcopy(sd)
    bad["step"] = -1
    rejected(opt, rng, ValueError, lambda: opt.load_state_dict(bad),
             "state_dict['step']", "-1", "integer from 0 to 2**53")
    bad = copy.deepcopy(sd)
    bad["step"] = 2.5
    rejected(opt, rng, ValueError, lambda: opt.load_state_dict(bad),
             "state_dict['step']", "2.5", "integer from 0 to 2**53")
    bad = copy.deepcopy(sd)
    bad["step"] = 2 ** 2000
    rejected(opt, rng, ValueError, lambda: opt.load_state_dict(bad),
             "state_dict['step']", "integer from 0 to 2**53")
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["lr"] = 10 ** 400
    rejected(opt, rng, ValueError, lambda: opt.load_state_dict(bad),
             "state_dict['param_groups'][0]", "lr=", "expected a finite number")
    rejected(opt, rng, TypeError, lambda: opt.load_state_dict([sd]), "state_dict",
             "expected a dict")


def test_load_state_dict_checks_everything_before_changing_anything(rng):
    """Valid new hyperparameters and state, then one bad buffer at the end: nothing loads."""
    rule = RULES["Adam"]
    opt = make(rule, rng)
    sd = _saved(rule, rng)
    sd["param_groups"][0]["lr"] = 0.5
    sd["param_groups"][0]["betas"] = (0.5, 0.6)
    sd["step"] = 77
    sd["state"][1]["exp_avg_sq"] = sd["state"][1]["exp_avg_sq"].astype(np.float32)
    rejected(opt, rng, ValueError, lambda: opt.load_state_dict(sd),
             "state_dict['state'][1]['exp_avg_sq']", "float32")
    sd = _saved(rule, rng)
    sd["param_groups"][0]["lr"] = 0.5
    sd["param_groups"][0]["eps"] = -1.0
    rejected(opt, rng, ValueError, lambda: opt.load_state_dict(sd),
             "state_dict['param_groups'][0]", "eps=-1.0", ">= 0")
