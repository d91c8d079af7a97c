"""Every rule x option set x CPU backend x dtype against the float64 NumPy reference, with the
stated tolerances of ``hwoptim.testing`` (never loosened here):

* per step, from the tested state: elementwise ``|x - ref| <= K_STEP u C(x)`` and norm-wise
  ``||x - ref|| <= K_NORM u || |x_old| + |ref - x_old| ||`` for params and every state buffer;
* after ``STEPS`` steps run independently: ``||x - ref|| <= K_RUN u STEPS ||ref||``.

Plus: Numba's parallel kernel (large arrays) is bit-identical to its serial kernel, the checks
can fail, param groups equal separate optimizers, a callable lr equals setting the numbers by
hand, and changing hyperparameters never recompiles.
"""
from __future__ import annotations

import numpy as np
import pytest

import hwoptim
from hwoptim import backends, codegen, optim
from hwoptim.rules import RULES
from hwoptim.spec import host_scalars
from hwoptim.testing import (K_RUN, STEPS, condition, option_sets, random_values,
                             reference_step, step_errors, unit_roundoff)

SMALL = (24, 40)          # 960 elements, 2-D: below the Numba backend's parallel threshold
LARGE = (256, 256)        # 65536 elements: above it (for every kernel, with >= 2 threads)
CHUNK = 512               # LARGE as separate arrays of this size: the serial kernel
STEP_CHECKS = 50          # steps per case in the per-step check
DTYPES = ("float32", "float64")

# every host backend, on SMALL arrays; Numba's parallel kernel (LARGE arrays) is compared
# with its serial one below (per-step checks on 65536 elements cost seconds per case here)
HOST = [(name, name, SMALL) for name in backends.available()
        if backends.load(name).FAMILY == "host"]
CASES = [(rule, oid, opts) for rule in RULES.values() for oid, opts in option_sets(rule)]


def _params(cases, variants, dtypes):
    return [pytest.param(rule, opts, name, _flat(rule, shape), dtype, id=f"{oid}-{vid}-{dtype}")
            for rule, oid, opts in cases for vid, name, shape in variants for dtype in dtypes]


def _flat(rule, shape):
    """``shape``, or for a rule whose math depends on it (Adafactor factors matrices) the
    same elements as a vector: these tests compare elementwise paths; test_adafactor.py
    covers the factored one."""
    return (int(np.prod(shape)),) if rule.shape_flags is not None else shape


def _flags(rule, group):
    h = {n: group[n] for n in rule.hypers}
    return h, rule.static_flags(h, {n: group[n] for n in rule.options})


def _snapshot(opt, i=0):
    p = [p for g in opt.param_groups for p in g["params"]][i]
    return {"param": p.copy(), **{k: np.array(v, copy=True) for k, v in opt.state[i].items()}}


def _current(opt, i=0):
    p = [p for g in opt.param_groups for p in g["params"]][i]
    return {"param": p, **opt.state[i]}


# ----------------------------------------------------------------------------- per step

@pytest.mark.parametrize("rule, opts, backend, shape, dtype", _params(CASES, HOST, DTYPES))
def test_each_step_within_bound(rule, opts, backend, shape, dtype, rng, observed, request):
    p = random_values(rng, shape, dtype)
    opt = getattr(hwoptim, rule.name)(p, backend=backend, **opts)
    assert opt.backend_name == backend
    h, flags = _flags(rule, opt.param_groups[0])
    plan = codegen.plan(rule, flags)
    assert tuple(opt.state[0]) == plan.arrays[2:]
    worst = {}
    for t in range(1, STEP_CHECKS + 1):
        before = _snapshot(opt)
        grad = random_values(rng, shape, dtype)
        opt.step(grad)
        assert opt.step_count == t
        ref = reference_step(rule, flags, h, t, before, grad)
        cond = condition(plan, before, grad, plan.kernel_scalars(host_scalars(rule, h, t)),
                         dtype)
        errs = step_errors(_current(opt), ref, dtype, cond)
        assert set(errs) == set(plan.outputs)
        for name, (elem, norm) in errs.items():
            w = worst.setdefault(name, [0.0, 0.0])
            w[0], w[1] = max(w[0], elem), max(w[1], norm)
            assert elem <= 1 and norm <= 1, (
                f"step {t}, {name}: elementwise ratio {elem:.3g}, norm ratio {norm:.3g} "
                f"(> 1 fails)")
    for name, (elem, norm) in worst.items():
        key = f"{request.node.callspec.id}:{name}"
        observed.max(f"step elementwise ratio {dtype}", key, elem)
        observed.max(f"step norm ratio {dtype}", key, norm)
    # the inputs were not trivial: params moved, and every state buffer holds data
    assert not np.array_equal(p, before["param"])
    for name, v in opt.state[0].items():
        assert np.count_nonzero(v) > v.size // 2, name


def _numba_thresholds():
    if "numba" not in backends.available():
        pytest.skip("no numba backend")
    mod = backends.load("numba")
    out = []
    for rule, oid, opts in CASES:
        h = {n: opts.get(n, hy.default) for n, hy in rule.hypers.items()}
        flags = rule.static_flags(h, {n: opts.get(n, v) for n, v in rule.options.items()})
        for dtype in DTYPES:
            run = mod.kernel(codegen.plan(rule, flags), dtype)
            below = getattr(run, "serial_below", None)
            if below is None:
                pytest.skip("this numba backend does not report its threshold")
            out.append((oid, dtype, below()))
    return out


def test_small_and_large_straddle_the_parallel_threshold():
    """SMALL arrays and CHUNK run the Numba backend's serial kernel, LARGE its parallel one,
    for every kernel, where the backend says what its threshold is (``run.serial_below()``)."""
    for oid, dtype, n in _numba_thresholds():
        if n == float("inf"):
            pytest.skip("one thread: the serial kernel at every size")
        assert max(np.prod(SMALL), CHUNK) < n <= np.prod(LARGE), (oid, dtype, n)


@pytest.mark.parametrize("rule, opts, backend, shape, dtype",
                         _params(CASES, [("numba-large", "numba", LARGE)], DTYPES)
                         if "numba" in backends.available() else [])
def test_parallel_kernel_equals_serial_kernel(rule, opts, backend, shape, dtype, rng,
                                             monkeypatch):
    """One LARGE array (the parallel kernel) against the same values as separate CHUNK-sized
    arrays (the serial kernel), for a few steps: bit-identical, params and state. The serial
    kernel is the one checked against the reference above."""
    cls = getattr(hwoptim, rule.name)
    n = int(np.prod(shape))
    p = random_values(rng, shape, dtype)
    chunks = [c.copy() for c in np.split(p.reshape(-1), n // CHUNK)]
    # the chunks through the per-array serial kernel, not the multi-tensor launch that many
    # arrays get (tests/test_many_arrays.py checks that one against this path)
    monkeypatch.setattr(optim, "FAST_MIN", 10 ** 9)
    big = cls(p, backend=backend, **opts)
    norms = bool(codegen.plan(rule, big._flags[0]).norms)
    if norms:           # a norm is of the whole array: the same array, on one thread
        chunks = [p.reshape(-1).copy()]
    small = cls(chunks, backend=backend, **opts)
    for _ in range(5):
        g = random_values(rng, shape, dtype)
        big.step(g)
        if norms:
            before = hwoptim.get_num_threads()
            hwoptim.set_num_threads(1)
            try:
                small.step([g.reshape(-1).copy()])
            finally:
                hwoptim.set_num_threads(before)
        else:
            small.step([c.copy() for c in np.split(g.reshape(-1), n // CHUNK)])
    assert np.array_equal(p.reshape(-1), np.concatenate(chunks))
    for name, v in big.state[0].items():
        assert np.array_equal(v.reshape(-1), np.concatenate([st[name] for st in small.state]))
    assert np.isfinite(p).all()


# ----------------------------------------------------------------------------- 100 steps

@pytest.mark.parametrize("rule, opts, backend, shape, dtype", _params(CASES, HOST, DTYPES))
def test_independent_run_within_bound(rule, opts, backend, shape, dtype, rng, observed,
                                      request):
    cls = getattr(hwoptim, rule.name)
    p = random_values(rng, shape, dtype)
    p_ref = p.astype(np.float64)
    opt = cls(p, backend=backend, **opts)
    ref = cls(p_ref, backend="numpy", **opts)
    for _ in range(STEPS):
        g = random_values(rng, shape, dtype)
        opt.step(g)
        ref.step(g.astype(np.float64))
    u = unit_roundoff(dtype)
    for name, x in _current(opt).items():
        r = _current(ref)[name]
        err, scale = np.linalg.norm(x - r), np.linalg.norm(r)
        ratio = err / (K_RUN * u * STEPS * scale)
        observed.max(f"{STEPS}-step run ratio {dtype}", f"{request.node.callspec.id}:{name}",
                     ratio)
        assert ratio <= 1, (f"{name}: ||x - ref|| = {err:.3g}, bound K_RUN*u*STEPS*||ref|| = "
                            f"{K_RUN * u * STEPS * scale:.3g} (ratio {ratio:.3g})")


# ----------------------------------------------------------------------------- the checks can fail

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", list(RULES.values()), ids=list(RULES))
def test_step_check_detects_a_few_ulps(rule, dtype, rng):
    """A correct step passes; the same step with the params off by 8u fails. (No tiny
    inputs here: a sign-based rule's decisions on products that may underflow are
    undecided, and their branches' distance rightly loosens the bound. A step relative to
    an RMS, Adafactor's, moves small elements by far more than themselves, and the bound
    counts the worst case of the RMS's sum, (n - 1) u: 64 elements there.)"""
    rms = "rms" in codegen.plan(rule, rule.static_flags(
        {n: hy.default for n, hy in rule.hypers.items()}, rule.options)).norm_kinds
    p = random_values(rng, (64,) if rms else _flat(rule, SMALL), dtype, tinies=0)
    opt = getattr(hwoptim, rule.name)(p, backend="numpy")
    h, flags = _flags(rule, opt.param_groups[0])
    plan = codegen.plan(rule, flags)
    u = unit_roundoff(dtype)
    for t in (1, 2, 3):
        before = _snapshot(opt)
        grad = random_values(rng, p.shape, dtype, tinies=0)
        opt.step(grad)
        ref = reference_step(rule, flags, h, t, before, grad)
        cond = condition(plan, before, grad, plan.kernel_scalars(host_scalars(rule, h, t)),
                         dtype)
        good = step_errors(_current(opt), ref, dtype, cond)
        assert all(e <= 1 and n <= 1 for e, n in good.values()), good
    bad = dict(_current(opt), param=(p * (1 + 8 * u)).astype(dtype))
    assert not np.array_equal(bad["param"], p)
    elem, norm = step_errors(bad, ref, dtype, cond)["param"]
    assert elem > 1 and norm > 1, (elem, norm)


@pytest.mark.parametrize("rule", list(RULES.values()), ids=list(RULES))
def test_run_check_detects_a_drift(rule, rng):
    """Two float64 reference runs, one started from params off by 2*K_RUN*u*STEPS (float32
    u): the 100-step check at float32 tolerance fails."""
    cls = getattr(hwoptim, rule.name)
    u = unit_roundoff("float32")
    p = random_values(rng, SMALL, np.float64)
    q = p * (1 + 2 * K_RUN * u * STEPS)
    a, b = cls(p, backend="numpy"), cls(q, backend="numpy")
    for _ in range(STEPS):
        g = random_values(rng, SMALL, np.float64)
        a.step(g)
        b.step(g.copy())
    ratio = np.linalg.norm(q - p) / (K_RUN * u * STEPS * np.linalg.norm(p))
    assert ratio > 1, ratio


# ----------------------------------------------------------------------------- param groups

def _group_hypers(rule, i, opts):
    extra = {"lr": rule.hypers["lr"].default * (1 + 0.5 * i)}
    if "weight_decay" in rule.hypers and "weight_decay" not in opts:
        extra["weight_decay"] = 0.01 * i
    return {**opts, **extra}


HOST_NAMES = [name for _, name, _ in HOST]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_NAMES)
@pytest.mark.parametrize("rule", list(RULES.values()), ids=list(RULES))
def test_param_groups_equal_separate_optimizers(rule, backend, dtype, rng):
    """One group per option set of the rule (different options, lr and weight_decay), two
    arrays per group: bit-identical to one optimizer per group."""
    cls = getattr(hwoptim, rule.name)
    sets = [_group_hypers(rule, i, opts) for i, (oid, opts) in enumerate(option_sets(rule))]
    shapes = [(7, 5), (33,)]
    init = [[random_values(rng, s, dtype) for s in shapes] for _ in sets]
    grouped = [[a.copy() for a in arrays] for arrays in init]
    single = [[a.copy() for a in arrays] for arrays in init]
    opt = cls([{"params": ps, **hy} for ps, hy in zip(grouped, sets)], backend=backend)
    for g, hy in zip(opt.param_groups, sets):
        for k, v in hy.items():
            assert g[k] == v
    singles = [cls(ps, backend=backend, **hy) for ps, hy in zip(single, sets)]
    for _ in range(10):
        grads = [[random_values(rng, s, dtype) for s in shapes] for _ in sets]
        opt.step([g for gs in grads for g in gs])
        for o, gs in zip(singles, grads):
            o.step([g.copy() for g in gs])
    for gi, o in enumerate(singles):
        for j in range(len(shapes)):
            assert np.array_equal(grouped[gi][j], single[gi][j]), (gi, j)
            mine = opt.state[gi * len(shapes) + j]
            assert mine.keys() == o.state[j].keys()
            for k in mine:
                assert np.array_equal(mine[k], o.state[j][k]), (gi, j, k)
    # the groups really differ (else this test could not fail)
    assert not np.array_equal(grouped[0][0] - init[0][0], grouped[1][0] - init[1][0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_NAMES)
@pytest.mark.parametrize("rule", list(RULES.values()), ids=list(RULES))
def test_callable_lr_equals_setting_lr_by_hand(rule, backend, dtype, rng):
    cls = getattr(hwoptim, rule.name)
    base = rule.hypers["lr"].default
    calls = []

    def schedule(t):
        calls.append(t)
        return base * (0.5 + 0.1 * t) * 0.9 ** t

    p0 = random_values(rng, _flat(rule, SMALL), dtype)
    a, b, c = p0.copy(), p0.copy(), p0.copy()
    by_fn = cls(a, lr=schedule, backend=backend)
    by_hand = cls(b, lr=schedule(1), backend=backend)
    constant = cls(c, lr=schedule(1), backend=backend)
    calls.clear()
    for t in range(1, 21):
        g = random_values(rng, p0.shape, dtype)
        by_hand.param_groups[0]["lr"] = schedule(t)
        by_fn.step(g)
        by_hand.step(g)
        constant.step(g)
    assert calls[::2] == list(range(1, 21))     # lr(t) gets the 1-based step being taken
    assert np.array_equal(a, b)
    for k in by_fn.state[0]:
        assert np.array_equal(by_fn.state[0][k], by_hand.state[0][k]), k
    h = {n: hy.default for n, hy in rule.hypers.items()}
    if host_scalars(rule, {**h, "lr": base}, 1) != host_scalars(rule, {**h, "lr": 2 * base}, 1):
        assert not np.array_equal(a, c)         # the schedule mattered
    else:                                       # lr only seeds a state (Rprop's step sizes)
        assert np.array_equal(a, c)


def _dispatchers():
    out = {}
    for key, run in optim._kernels.items():
        for attr in ("parallel", "serial"):
            d = getattr(run, attr, None)
            if d is not None:
                out[(key, attr)] = d
    return out


def _signatures():
    return {k: (len(d.signatures), sum(d.stats.cache_misses.values()))
            for k, d in _dispatchers().items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", HOST_NAMES)
@pytest.mark.parametrize("rule", list(RULES.values()), ids=list(RULES))
def test_changing_hyperparameters_never_recompiles(rule, backend, dtype, rng):
    """A small and a large array (Numba: the serial and the parallel kernel each step); lr as
    float, int, NumPy scalars and a callable, weight_decay and the step count changing."""
    cls = getattr(hwoptim, rule.name)
    shapes = [_flat(rule, s) for s in ([SMALL, LARGE] if backend == "numba" else [SMALL])]
    ps = [random_values(rng, s, dtype) for s in shapes]
    # weight decay on (turning it on or off picks the kernel with or without the term)
    wd = {"weight_decay": 0.01} if "weight_decay" in rule.hypers else {}
    opt = cls(ps, backend=backend, **wd)

    def step():
        opt.step([random_values(rng, s, dtype) for s in shapes])

    step()
    kernels, sigs = len(optim._kernels), _signatures()
    lr = rule.hypers["lr"].default
    for i, v in enumerate([lr * 0.5, 1, np.float32(lr), np.float64(lr * 2), lr * 3, 0.0,
                           2 * lr, lambda t: lr / t]):
        opt.param_groups[0]["lr"] = v
        if "weight_decay" in rule.hypers:
            opt.param_groups[0]["weight_decay"] = 0.001 * (i + 1)
        step()
    assert len(optim._kernels) == kernels
    assert _signatures() == sigs
    if backend == "numba":                  # both kernels ran, each compiled for one signature
        plan_key = codegen.plan(rule, _flags(rule, opt.param_groups[0])[1]).key
        mine = {attr: d.signatures for (key, attr), d in _dispatchers().items()
                if key[1] == plan_key and key[2] == dtype and "numba" in key[0]}
        assert set(mine) == {"parallel", "serial"}, mine
        assert all(len(s) == 1 for s in mine.values()), mine
    assert all(np.isfinite(p).all() for p in ps)


def _as_float32_scalars(rule, opts, to):
    out = dict(opts)
    for n, hy in rule.hypers.items():
        v = opts.get(n, hy.default)
        # pairs (betas) stay Python floats: NumPy scalars in them are refused (test_errors)
        out[n] = (tuple(float(np.float32(b)) for b in v) if isinstance(v, tuple)
                  else to(np.float32(v)))
    return out


def test_numpy_scalar_hyperparameters_are_computed_in_float64(rng):
    """lr=np.float32(x) (and every other number hyperparameter as a NumPy float32) gives the same
    float64 run as lr=float(np.float32(x)): the README promises per-step scalars computed in
    float64 on the host."""
    differ = []
    for rule, oid, opts in CASES:
        cls = getattr(hwoptim, rule.name)
        for backend in HOST_NAMES:
            p0 = random_values(rng, SMALL, np.float64)
            a, b = p0.copy(), p0.copy()
            oa = cls(a, backend=backend, **_as_float32_scalars(rule, opts, lambda v: v))
            ob = cls(b, backend=backend, **_as_float32_scalars(rule, opts, float))
            for _ in range(5):
                g = random_values(rng, SMALL, np.float64)
                oa.step(g)
                ob.step(g.copy())
            if not np.array_equal(a, b):
                differ.append(f"{oid}-{backend}: max rel diff "
                              f"{np.abs(a - b).max() / np.abs(b).max():.2g}")
    assert not differ, "\n".join(differ)



@pytest.mark.parametrize("how", ["setitem", "update", "ior", "add_param_group"])
def test_numpy_scalars_set_later_are_stored_as_python_floats(how, rng):
    """The same promise for values set after construction (``param_groups[i][k] = v``,
    ``update``, ``|=``, ``add_param_group``): stored as Python floats, and the float64 run is
    bit-identical to one given the same numbers as floats."""
    differ = []
    for rule, oid, opts in CASES:
        cls = getattr(hwoptim, rule.name)
        base = _as_float32_scalars(rule, opts, float)
        for backend in HOST_NAMES:
            p0 = [random_values(rng, SMALL, np.float64) for _ in range(2)]
            ps = {kind: [a.copy() for a in p0] for kind in ("np", "float")}
            changes = {"np": _as_float32_scalars(rule, opts, lambda v: v),
                       "float": _as_float32_scalars(rule, opts, float)}
            os = {}
            for kind in ("np", "float"):
                if how == "add_param_group":
                    o = cls([ps[kind][0]], backend=backend, **base)
                    o.add_param_group({"params": [ps[kind][1]], **changes[kind]})
                else:
                    o = cls([{"params": ps[kind]}], backend=backend, **base)
                    g = o.param_groups[0]
                    if how == "setitem":
                        for k, v in changes[kind].items():
                            g[k] = v
                    elif how == "update":
                        g.update(changes[kind])
                    else:
                        g |= changes[kind]
                os[kind] = o
            g = os["np"].param_groups[-1]
            stored = {k: type(g[k]) for k in rule.hypers if not isinstance(g[k], tuple)}
            assert set(stored.values()) == {float}, (oid, how, stored)
            for _ in range(5):
                gs = [random_values(rng, SMALL, np.float64) for _ in range(2)]
                os["np"].step(gs)
                os["float"].step([a.copy() for a in gs])
            if not all(np.array_equal(a, b) for a, b in zip(ps["np"], ps["float"])):
                differ.append(f"{oid}-{backend}-{how}")
    assert not differ, "\n".join(differ)

@pytest.mark.parametrize("dtype", DTYPES)
def test_printed_host_scalars_are_float64_math_rounded_once(dtype, rng):
    """The printed per-step scalar function (what the Numba and CuPy backends call each step)
    gives the spec's scalars computed in float64 and rounded once to the dtype: bit for bit,
    for random hyperparameters and step counts up to 10^6 (a float32 1 - β₂ᵗ would not)."""
    for rule, oid, opts in CASES:
        h0 = {n: opts.get(n, hy.default) for n, hy in rule.hypers.items()}
        flags = rule.static_flags(h0, {n: opts.get(n, v) for n, v in rule.options.items()})
        plan = codegen.plan(rule, flags)
        boxed = codegen.host_scalar_function(plan, dtype)
        plain = codegen.host_scalar_function(plan, dtype, boxed=False)
        for _ in range(20):
            h = {n: (tuple(float(b) * rng.uniform(0.9, 1.0) for b in v)
                     if isinstance(v, tuple) else float(v) * rng.uniform(0.5, 2.0))
                 for n, v in h0.items()}
            h.update({c.name: rng.uniform(0.05, 1.0) for c in rule.carry})   # carried scalars
            t = int(rng.integers(1, 10 ** 6)) if rng.random() < 0.7 else int(rng.integers(1, 5))
            want = [np.dtype(dtype).type(x)
                    for x in plan.kernel_scalars(host_scalars(rule, h, t))]
            got = boxed(h, t)
            assert [type(x) for x in got] == [np.dtype(dtype).type] * len(want), oid
            assert np.array_equal(np.array(got), np.array(want)), (oid, t, h, got, want)
            assert np.array_equal(np.array(plain(h, t)).astype(dtype), np.array(want)), oid
