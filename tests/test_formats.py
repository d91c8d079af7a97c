"""Storage formats (hwoptim.formats): 16-bit params and grads, bfloat16 state, float32
master weights, stochastic rounding.

The chain of evidence: the float32 kernels are checked against the float64 reference by the
rest of the suite; here a format's step is checked, bit for bit, against the float32
optimizer's step from the same (upcast) values, rounded into the format's storage by
hwoptim.formats' NumPy conversions; and the Numba kernels (one array, many arrays, serial
and parallel) against the NumPy backend, bit for bit. The conversions themselves are checked
against ml_dtypes/NumPy and against their definition (unbiased, never a new infinity).
"""
from __future__ import annotations

import numpy as np
import pytest

import hwoptim
from hwoptim import backends, formats
from hwoptim.rules import RULES
from hwoptim.testing import option_sets

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HOST = [n for n in backends.available() if backends.load(n).FAMILY == "host"]
# (param dtype, options): every kind of storage, each 16-bit dtype at least twice
MODES = [
    ("float16", {}),
    ("bfloat16", {}),
    ("bfloat16", {"state_dtype": "bfloat16"}),
    ("float16", {"master_weights": True}),
    ("bfloat16", {"master_weights": True, "state_dtype": "bfloat16"}),
    ("bfloat16", {"stochastic_rounding": True, "seed": 11}),
    ("float16", {"stochastic_rounding": True, "seed": 2**40 + 3}),
    ("bfloat16", {"state_dtype": "int8", "min_8bit_size": 0}),
    ("float32", {"state_dtype": "int8", "min_8bit_size": 0}),
    ("float16", {"state_dtype": "int8", "master_weights": True, "min_8bit_size": 0}),
    ("bfloat16", {"state_dtype": "int8", "stochastic_rounding": True}),   # (small: float32)
]
MODE_IDS = [f"{d}-{','.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for d, o in MODES]
# one option set per rule (its first)
RULE_CASES = [option_sets(r)[0] for _, r in sorted(RULES.items())]
# every rule in five formats (each kind of storage once), three rules in every format: the
# kernels print a format's loads and stores apart from the rule's math, and each case
# compiles its own kernels (CI time)
_EVERY_RULE = ("float16-default", "bfloat16-state_dtype=bfloat16",
               "bfloat16-master_weights=True,state_dtype=bfloat16",
               "float16-stochastic_rounding=True,seed=1099511627779",
               "bfloat16-state_dtype=int8,min_8bit_size=0")
_EVERY_MODE = ("Adam", "SGD", "Lion")
CASES = [pytest.param(c, m, id=f"{c[0]}-{mid}") for c in RULE_CASES
         for m, mid in zip(MODES, MODE_IDS)
         if mid in _EVERY_RULE or c[0].split("[")[0] in _EVERY_MODE]


def _kwargs(rule, opts):
    kw = dict(opts)
    if rule.name == "SGD":
        kw.setdefault("momentum", 0.9)
    return kw


def _values(rng, n, positive=False):
    v = rng.standard_normal(n) * 10.0 ** rng.uniform(-2, 1, n)
    return np.abs(v) if positive else v


def _problem(rng, sizes, dtype):
    params = [_values(rng, n).astype(dtype) for n in sizes]
    grads = [[_values(rng, n).astype(dtype) for n in sizes] for _ in range(3)]
    return params, grads


def _takes_norms(rule, opts) -> bool:
    """Whether the rule's update reads norms (LAMB, LARS, Adafactor's RMS): the kernels sum
    them in another order than NumPy, so the results agree to rounding, not to the bit."""
    from hwoptim.optim import _plan
    h = {k: v.default for k, v in rule.hypers.items()}
    o = dict(rule.options)
    for k, v in _kwargs(rule, opts).items():
        (h if k in h else o)[k] = v
    return bool(_plan(rule, rule.static_flags(h, o)).norms)


def _close(a, b):
    """Equal within one unit in the last place of each array's own storage (and a few
    float32 ulps for float32 buffers, whose sums of norms round differently)."""
    for x, y in zip(a, b):
        x32, y32 = np.asarray(x, np.float32), np.asarray(y, np.float32)
        eps = np.finfo(np.asarray(x).dtype).eps if np.asarray(x).dtype.itemsize == 2 \
            else 8 * np.finfo(np.float32).eps
        if not np.allclose(x32, y32, rtol=eps, atol=0, equal_nan=True):
            return False
    return True


def _mostly_close(a, b):
    """:func:`_close` for 99% of the elements of every array."""
    for x, y in zip(a, b):
        x32, y32 = np.asarray(x, np.float32), np.asarray(y, np.float32)
        eps = np.finfo(np.asarray(x).dtype).eps if np.asarray(x).dtype.itemsize == 2 \
            else 8 * np.finfo(np.float32).eps
        if np.mean(np.isclose(x32, y32, rtol=eps, atol=0, equal_nan=True)) < 0.99:
            return False
    return True


def _same(a, b):
    return all(np.array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32),
                              equal_nan=True) for x, y in zip(a, b))


@pytest.mark.parametrize("case, mode", CASES)
def test_numba_is_the_numpy_reference_bit_for_bit(case, mode, rng):
    """Three steps of every rule in five formats (three rules in all): Numba's
    multi-tensor kernels (17 params, serial and parallel) give the NumPy backend's bits in
    params and every state buffer."""
    if "numba" not in HOST:
        pytest.skip("numba is not available")
    name, opts = case
    rule = RULES[name.split("[")[0]]
    dtype, fmt = mode

    def run(sizes, dtype, fmt):
        out = {}
        for backend in ("numpy", "numba"):
            r = np.random.default_rng(1)
            params, grads = _problem(r, sizes, formats.np_dtype(dtype))
            opt = getattr(hwoptim, rule.name)(params, backend=backend, **_kwargs(rule, opts),
                                              **fmt)
            for g in grads:
                opt.step(g)
            out[backend] = (params, opt.state_dict())
        return out["numpy"], out["numba"]

    # 17 params: the multi-tensor kernel (the one-array kernel: the test below); with one
    # of 70000 elements the parallel one, for the rules run in every format
    sizes = [1, 7, 64, 100, 3, 2, 5, 9, 33, 300] + [50] * 7
    for sizes in [sizes] + ([sizes[:-1] + [70_000]] if rule.name in _EVERY_MODE else []):
        (pa, sa), (pb, sb) = run(sizes, dtype, fmt)
        same = _same
        if _takes_norms(rule, opts):     # norms sum in another order: agree to rounding
            same = _close
        elif not _same(*(r[0] for r in run(sizes, "float32", {}))):
            # the NumPy reference of some rules rounds less often than the float32 kernels
            # (Rprop's factors), in plain float32 too, and a sign decision then may differ
            # (the main suites bound that); the test above is bit-exact per backend
            same = _mostly_close
        assert same(pa, pb), (name, dtype, fmt, sizes)
        for x, y in zip(sa["state"], sb["state"]):
            assert x.keys() == y.keys()
            assert same([x[k] for k in x], [y[k] for k in x]), (name, sorted(x))
        assert not _same(pa, _problem(np.random.default_rng(1), sizes,
                                      formats.np_dtype(dtype))[0])      # it moved


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("case, mode", CASES)
def test_a_step_is_the_float32_step_rounded_into_the_format(case, mode, backend, rng):
    """From a warmed-up state, one step in a format equals the float32 optimizer's step
    from the same values (the format's buffers upcast: a checkpoint loads across formats),
    with each result rounded into its storage: to nearest, or stochastically with the
    step's bits (the master copy: the float32 result itself)."""
    name, opts = case
    rule = RULES[name.split("[")[0]]
    dtype, fmt = mode
    sizes = [40, 513]
    params, grads = _problem(rng, sizes, formats.np_dtype(dtype))
    opt = getattr(hwoptim, rule.name)(params, backend=backend, **_kwargs(rule, opts), **fmt)
    for g in grads[:2]:
        opt.step(g)
    sd = opt.state_dict()
    base = [(p.astype(np.float32) if not fmt.get("master_weights")
             else opt.state[i]["master"].copy()) for i, p in enumerate(params)]
    ref = getattr(hwoptim, rule.name)(base, backend=backend, **_kwargs(rule, opts))
    ref.load_state_dict(sd)                       # bfloat16 state upcast, int8 decoded
    for i, st in enumerate(ref.state):
        for k in st:
            mine = opt.state[i][k]
            if f"{k}_absmax" in opt.state[i]:
                mine = formats.dequantize(mine, opt.state[i][f"{k}_absmax"]).reshape(
                    st[k].shape)
            assert np.array_equal(st[k], np.asarray(mine, np.float32), equal_nan=True)
    opt.step(grads[2])
    ref.step([g.astype(np.float32) for g in grads[2]])
    f = opt.format
    for i, (p, q) in enumerate(zip(params, base)):
        if f.sr:
            key = formats.sr_key(opt.seed, opt.step_count, [i])[0]
            want = formats.round_stochastic(q, dtype,
                                            formats.element_bits(key, np.arange(q.size)))
        else:
            want = formats.round_nearest(q, dtype)
        assert np.array_equal(p.view(np.uint16), want.view(np.uint16)) or _same([p], [want])
        for k, v in ref.state[i].items():
            mine = opt.state[i][k]
            if f"{k}_absmax" in opt.state[i]:            # int8: the float32 state, encoded
                codes, absmax = formats.quantize(v.reshape(-1))
                assert np.array_equal(mine, codes), k
                assert np.array_equal(opt.state[i][f"{k}_absmax"], absmax), k
                continue
            assert _same([mine], [formats.round_nearest(v, formats.dtype_name(mine.dtype))]), k
        if f.master:
            assert np.array_equal(opt.state[i]["master"], q, equal_nan=True)


# Adafactor's factored matrices (staged kernels: sweeps, then stores) in every format, with
# vectors beside them; (37, 45) and (70, 64) straddle min_8bit_size's 4096 elements
FACTORED = [(37, 45), (3, 20, 33), (300,), (70, 64)]


def _factored(rng, dtype):
    params = [_values(rng, int(np.prod(s))).reshape(s).astype(dtype) for s in FACTORED]
    grads = [[_values(rng, int(np.prod(s))).reshape(s).astype(dtype) for s in FACTORED]
             for _ in range(3)]
    return params, grads


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_factored_step_is_the_float32_step_rounded_into_the_format(mode, backend, rng):
    """Adafactor's factored matrices: from a warmed-up state, a step in a format is the
    float32 optimizer's step from the same values (the same staged kernels, the same sums),
    each result rounded into its storage, bit for bit: the row and column factors too
    (int8: encoded by the reference quantizer)."""
    dtype, fmt = mode
    params, grads = _factored(rng, formats.np_dtype(dtype))
    opt = hwoptim.Adafactor(params, backend=backend, lr=1e-2, **fmt)
    for g in grads[:2]:
        opt.step(g)
    base = [(p.astype(np.float32) if not fmt.get("master_weights")
             else opt.state[i]["master"].copy()) for i, p in enumerate(params)]
    ref = hwoptim.Adafactor(base, backend=backend, lr=1e-2)
    ref.load_state_dict(opt.state_dict())
    opt.step(grads[2])
    ref.step([g.astype(np.float32) for g in grads[2]])
    f, moved = opt.format, 0
    for i, (p, q) in enumerate(zip(params, base)):
        if f.sr:
            key = formats.sr_key(opt.seed, opt.step_count, [i])[0]
            bits = formats.element_bits(key, np.arange(q.size)).reshape(q.shape)
            want = formats.round_stochastic(q, dtype, bits)
        else:
            want = formats.round_nearest(q, dtype)
        assert p.shape == q.shape and _same([p], [want]), (i, p.shape)
        if f.master:                                     # the float32 result itself
            assert np.array_equal(opt.state[i]["master"], q), i
        for k, v in ref.state[i].items():
            mine = opt.state[i][k]
            if f"{k}_absmax" in opt.state[i]:            # int8: the float32 state, encoded
                codes, absmax = formats.quantize(v)
                assert np.array_equal(mine, codes), (i, k)
                assert np.array_equal(opt.state[i][f"{k}_absmax"], absmax), (i, k)
                moved += 1
                continue
            assert mine.shape == v.shape, (i, k)
            assert _same([mine], [formats.round_nearest(v, formats.dtype_name(mine.dtype))]), \
                (i, k)
    assert moved == (0 if not f.quantized else
                     2 * sum(len(s) > 1 and np.prod(s) >= opt.min_8bit_size for s in FACTORED)
                     + sum(len(s) == 1 and s[0] >= opt.min_8bit_size for s in FACTORED))


@pytest.mark.skipif("numba" not in HOST, reason="numba is not available")
@pytest.mark.parametrize("mode", [m for m, mid in zip(MODES, MODE_IDS) if mid in (
    "bfloat16-state_dtype=bfloat16", "bfloat16-stochastic_rounding=True,seed=11",
    "float16-state_dtype=int8,master_weights=True,min_8bit_size=0")], ids=str)
def test_factored_numba_is_the_numpy_reference(mode):
    """Three steps of factored Adafactor in three formats (every kind of load and store;
    the test above holds each format to its float32 step): Numba's staged kernels (serial,
    parallel, many matrices in one call) against the NumPy reference. Their sums of the
    row and column means run in another order: params and float states within one unit
    of their storage, int8 states within one step of the map (2^-3 relative)."""
    dtype, fmt = mode
    out = {}
    for backend in ("numpy", "numba"):
        params, grads = _factored(np.random.default_rng(5), formats.np_dtype(dtype))
        big = (1030, 1030)               # stepped alone, its element loops in parallel
        params.append(_values(np.random.default_rng(6), 1030 * 1030).reshape(big)
                      .astype(formats.np_dtype(dtype)))
        opt = hwoptim.Adafactor(params, backend=backend, lr=1e-2, **fmt)
        for g in grads:
            opt.step(g + [np.cos(np.arange(1030 * 1030)).reshape(big).astype(g[0].dtype)])
        out[backend] = (params, opt.state)
    (pa, sa), (pb, sb) = out["numpy"], out["numba"]
    assert _close(pa, pb)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in x:
            if f"{k}_absmax" in x:
                u, v = (formats.dequantize(s[k], s[f"{k}_absmax"]) for s in (x, y))
                assert np.allclose(u, v, rtol=2 ** -3, atol=0), k
            elif not k.endswith("_absmax"):
                assert _close([x[k]], [y[k]]), k


# ----------------------------------------------------------------------------- conversions

def _bits_of_every_float16():
    return np.arange(2**16, dtype=np.uint32).astype(np.uint16)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_nearest_matches_the_libraries_and_the_kernels(dtype):
    """Round to nearest (ties to even) of float32 values spread over every exponent, the
    neighbours of every 16-bit number and their midpoints, NaN and infinities: NumPy's and
    ml_dtypes' own conversions, and the Numba kernels' (a master copy holding the values,
    stored into the params by SGD with lr=0)."""
    every = _bits_of_every_float16().view(formats.np_dtype(dtype)).astype(np.float32)
    every = every[np.isfinite(every)]
    up = np.nextafter(every, np.float32(np.inf))
    mid = (every.astype(np.float64) + np.concatenate([every[1:], every[-1:]]).astype(
        np.float64)) / 2
    x = np.concatenate([every, up, mid.astype(np.float32),
                        np.float32([np.nan, np.inf, -np.inf, 3.4e38, -3.4e38])])
    want = formats.round_nearest(x, dtype)
    # NumPy / ml_dtypes directly, the definition of the reference
    assert np.array_equal(want.astype(np.float32), x.astype(formats.np_dtype(dtype)).astype(
        np.float32), equal_nan=True)
    if "numba" in HOST:
        p = np.zeros(x.size, formats.np_dtype(dtype))
        opt = hwoptim.SGD([p], lr=0.0, master_weights=True, backend="numba")
        opt.state[0]["master"][...] = x
        opt.step([np.zeros_like(p)])
        assert np.array_equal(p.astype(np.float32), want.astype(np.float32), equal_nan=True)


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stochastic_rounding_is_unbiased(dtype, backend):
    """10^6 roundings of one value (every element of one param, an SGD step away from a
    16-bit number): the mean is within 3σ of the value, and every result is one of the two
    neighbours. Also near the bottom of float16 (subnormals, below 2^-24)."""
    n = 10**6
    for start, step in ((1.0, 0.3 * 2.0**-8), (-3.0, 0.7 * 2.0**-7), (2.0**-20, 0.37 * 2.0**-24),
                        (0.0, -0.3 * 2.0**-24)):
        p = np.full(n, start, formats.np_dtype(dtype))
        g = np.full(n, -step, formats.np_dtype(dtype))         # p - lr*g, lr=1
        exact = np.float32(np.float32(start) - np.float32(g[0].astype(np.float32)))
        opt = hwoptim.SGD([p], lr=1.0, stochastic_rounding=True, seed=5, backend=backend)
        opt.step([g])
        lo = formats.round_stochastic(np.float32([exact]), dtype, np.zeros(1, np.uint32))
        hi = formats.round_stochastic(np.float32([exact]), dtype,
                                      np.full(1, 2**32 - 1, np.uint32))
        lo, hi = sorted([float(lo[0].astype(np.float32)), float(hi[0].astype(np.float32))])
        got = p.astype(np.float64)
        assert set(np.unique(got)) <= {lo, hi}, (dtype, start, step)
        if lo == hi:
            continue
        f = (float(exact) - lo) / (hi - lo)
        sigma = (hi - lo) * np.sqrt(f * (1 - f) / n)
        assert abs(got.mean() - float(exact)) <= 3 * sigma, (dtype, start, step)


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stochastic_rounding_keeps_nan_and_makes_no_new_infinity(dtype, backend):
    """NaN stays NaN and ±Inf stays; a value between the largest finite 16-bit number and
    the round-to-nearest overflow threshold never becomes infinite (an SGD step from the
    largest number, 5000 elements each); past the threshold it may round down to the
    largest finite number or up to infinity, as round-to-nearest does. The kernels give
    the reference's bits."""
    dt = formats.np_dtype(dtype)
    big = float(np.finfo(dt).max)
    ulp = big - float(np.nextafter(dt.type(big), dt.type(0)))
    steps = [0.3, 0.49, 0.7, np.nan, -np.inf]        # p - lr*g with p = ±big, lr = 1
    g = np.repeat(np.array([-c * ulp for c in steps], np.float32), 5000).astype(dt)
    p = np.full(g.size, big, dt)
    p[1::2] = -big
    g[1::2] = -g[1::2]
    exact = p.astype(np.float32) - g.astype(np.float32)
    opt = hwoptim.SGD([p], lr=1.0, stochastic_rounding=True, seed=3, backend=backend)
    opt.step([g])
    key = formats.sr_key(3, 1, [0])[0]
    want = formats.round_stochastic(exact, dtype, formats.element_bits(key, np.arange(p.size)))
    got = p.astype(np.float32)
    assert np.array_equal(got, want.astype(np.float32), equal_nan=True)
    near = formats.round_nearest(exact, dtype).astype(np.float32)
    assert np.array_equal(np.isnan(got), np.isnan(exact))
    assert not (np.isinf(got) & ~np.isinf(near)).any()
    assert np.isinf(got[-5000:]).all()                    # -inf grads: ±inf results
    past = slice(2 * 5000, 3 * 5000)                      # 0.7 ulp past: both outcomes
    assert np.isinf(got[past]).any() and np.isfinite(got[past]).any()


def _lowbias32(x: int) -> int:
    """The hash written out on Python ints, apart from hwoptim.formats."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_the_random_bits_are_the_specified_function():
    """The key and per-element bits are fixed functions (a run resumes bit-identically in a
    later version): pinned values, and the definition on Python ints."""
    for x in (0, 1, 0xDEADBEEF, 2**32 - 1):
        assert int(formats.mix32(x)) == _lowbias32(x)
    assert [int(k) for k in formats.sr_key(0, 1, [0, 1])] == [0x7D2B5EA8, 0xCCE08BDE]
    idx = [0, 1, 2**32 + 5]
    got = formats.element_bits(0x12345678, np.array(idx))
    assert [int(b) for b in got] == [0xF5E71C96, 0x3F779F73, 0x5B0B410F]
    assert [int(b) for b in got] == [
        _lowbias32((i & 0xFFFFFFFF) ^ 0x12345678 ^ _lowbias32(i >> 32)) for i in idx]
    # a bijection of the index within 2**32: no repeated bits over 2**16 elements
    assert np.unique(formats.element_bits(0x7D2B5EA8, np.arange(2**16))).size == 2**16


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("kw, match", [
    (dict(state_dtype="int4"), "state_dtype='int4' is invalid: expected None, 'float32', "),
    (dict(master_weights=True), "master_weights=True needs 16-bit params"),
    (dict(stochastic_rounding=True), "stochastic_rounding=True needs 16-bit params"),
    (dict(master_weights="yes"), "master_weights='yes': expected True or False"),
    (dict(seed=-1), "seed=-1 is invalid: expected an integer from 0"),
])
def test_bad_format_options_name_the_argument(kw, match):
    p = np.zeros(8, np.float32)
    with pytest.raises((TypeError, ValueError), match=match.replace("(", r"\(").replace(
            ")", r"\)").replace("*", r"\*")):
        hwoptim.Adam([p], **kw)
    assert not p.any()


def test_master_and_stochastic_rounding_together_are_refused():
    p = np.zeros(8, BF16)
    with pytest.raises(ValueError, match="master_weights=True and stochastic_rounding=True"):
        hwoptim.Adam([p], master_weights=True, stochastic_rounding=True)


@pytest.mark.parametrize("backend", HOST)
def test_a_grad_of_another_dtype_is_refused_and_changes_nothing(backend, rng):
    p = rng.standard_normal(100).astype(BF16)
    before = p.copy()
    opt = hwoptim.Adam([p], backend=backend, state_dtype="bfloat16")
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype float32; expected bfloat16"):
        opt.step([rng.standard_normal(100).astype(np.float32)])
    assert np.array_equal(p.view(np.uint16), before.view(np.uint16))
    assert opt.step_count == 0 and not np.asarray(opt.state[0]["exp_avg"], np.float32).any()


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_state_memory_per_element(mode, backend):
    """Adam's state bytes per element, measured from the arrays: 8 with float32 state, 4
    with bfloat16, +4 for a master copy."""
    dtype, fmt = mode
    p = np.zeros(40 * 256, formats.np_dtype(dtype))
    opt = hwoptim.Adam([p], backend=backend, **fmt)
    per = sum(a.nbytes for a in opt.state[0].values()) / p.size
    state = {"bfloat16": 4, "int8": 2 + 2 * 4 / 256}.get(fmt.get("state_dtype"), 8)
    assert per == state + 4 * fmt.get("master_weights", False)
    assert fmt.get("state_dtype") != "int8" or per - 4 * fmt.get("master_weights", 0) <= 2.05


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_a_run_resumes_bit_identically(mode, backend, rng):
    """Six steps straight, or three, a state_dict, a new optimizer (another seed given:
    the checkpoint's wins) and three more: the same bits."""
    dtype, fmt = mode
    params, _ = _problem(rng, [33, 2000], formats.np_dtype(dtype))
    grads = [[_values(rng, p.size).astype(p.dtype) for p in params] for _ in range(6)]
    a = [p.copy() for p in params]
    opt = hwoptim.Adam(a, lr=1e-2, backend=backend, **fmt)
    for g in grads:
        opt.step(g)
    b = [p.copy() for p in params]
    opt = hwoptim.Adam(b, lr=1e-2, backend=backend, **fmt)
    for g in grads[:3]:
        opt.step(g)
    sd = opt.state_dict()
    other = {**fmt, "seed": 99} if "seed" in fmt else fmt
    opt2 = hwoptim.Adam(b, lr=1e-2, backend=backend, **other)
    opt2.load_state_dict(sd)
    for g in grads[3:]:
        opt2.step(g)
    assert all(np.array_equal(x.view(np.uint16), y.view(np.uint16)) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", HOST)
def test_params_added_later_draw_the_same_bits(backend, rng):
    """Stochastic rounding numbers params in order over all groups: an optimizer that got
    eleven of its twelve params by add_param_group (the keys' array grows past its first
    size, every param's key view moves) steps to the bits of one given all twelve at once,
    and every param's bits differ from round-to-nearest's somewhere (its key is used)."""
    params, _ = _problem(rng, [300] * 12, BF16)
    grads = [[_values(rng, 300).astype(BF16) for _ in params] for _ in range(3)]
    a, b, c = ([p.copy() for p in params] for _ in range(3))
    one = hwoptim.Adam(a, lr=1e-2, backend=backend, stochastic_rounding=True, seed=5)
    grown = hwoptim.Adam(b[:1], lr=1e-2, backend=backend, stochastic_rounding=True, seed=5)
    for i in range(1, 12, 4):
        grown.add_param_group({"params": b[i:i + 4]})
    near = hwoptim.Adam(c, lr=1e-2, backend=backend)
    for g in grads:
        one.step(g)
        grown.step(g)
        near.step(g)
    assert all(np.array_equal(x.view(np.uint16), y.view(np.uint16)) for x, y in zip(a, b))
    assert all(not np.array_equal(x.view(np.uint16), y.view(np.uint16)) for x, y in zip(a, c))


@pytest.mark.parametrize("backend", HOST)
def test_checkpoints_convert_between_formats(backend, rng):
    """A float32-state checkpoint loads into a bfloat16-state optimizer (rounded to
    nearest) and back (exactly); a master copy missing from a checkpoint starts from the
    params; float32 and float64 optimizers still refuse each other's state."""
    p = rng.standard_normal(500).astype(BF16)
    opt = hwoptim.Adam([p], backend=backend)
    opt.step([rng.standard_normal(500).astype(BF16)])
    sd = opt.state_dict()
    small = hwoptim.Adam([p.copy()], backend=backend, state_dtype="bfloat16")
    small.load_state_dict(sd)
    assert small.state[0]["exp_avg"].dtype == BF16
    assert np.array_equal(small.state[0]["exp_avg"],
                          sd["state"][0]["exp_avg"].astype(BF16))
    back = hwoptim.Adam([p.copy()], backend=backend)
    back.load_state_dict(small.state_dict())
    assert np.array_equal(back.state[0]["exp_avg"],
                          small.state[0]["exp_avg"].astype(np.float32))
    q = p.copy()
    m = hwoptim.Adam([q], backend=backend, master_weights=True)
    m.state[0]["master"][...] = 7.0
    m.load_state_dict(sd)
    assert np.array_equal(m.state[0]["master"], q.astype(np.float32))
    assert m.step_count == 1
    f64 = hwoptim.Adam([np.zeros(500)], backend=backend)
    with pytest.raises(TypeError, match="state_dict"):
        f64.load_state_dict(hwoptim.Adam([np.zeros(500, np.float32)],
                                         backend=backend).state_dict())


# ----------------------------------------------------------------------------- loss scaling

@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_found_inf_skips_and_grad_scale_unscales(mode, backend, rng):
    """found_inf: params, state and step count byte-identical. grad_scale=s with grads
    scaled by s (a power of two: exact in 16 bits) gives the unscaled step's bits."""
    dtype, fmt = mode
    params, grads = _problem(rng, [100, 3000], formats.np_dtype(dtype))
    a = [p.copy() for p in params]
    opt = hwoptim.Adam(a, lr=1e-2, backend=backend, **fmt)
    opt.step(grads[0])
    before = ([x.copy() for x in a], opt.state_dict())
    opt.step(grads[1], grad_scale=1.0, found_inf=1.0)
    assert all(np.array_equal(x.view(np.uint16), y.view(np.uint16))
               for x, y in zip(a, before[0]))
    assert opt.step_count == 1
    for x, y in zip(opt.state_dict()["state"], before[1]["state"]):
        assert all(np.array_equal(x[k], y[k], equal_nan=True) for k in x)
    b = [p.copy() for p in params]
    opt_b = hwoptim.Adam(b, lr=1e-2, backend=backend, **fmt)
    opt_b.step(grads[0])
    opt.step([(g.astype(np.float32) * 64).astype(g.dtype) for g in grads[1]], grad_scale=64.0)
    opt_b.step(grads[1])
    assert all(np.array_equal(x.view(np.uint16), y.view(np.uint16)) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_max_grad_norm_and_skip_nonfinite_read_16_bit_grads(dtype, backend, rng):
    """The global norm of 16-bit grads is the float32 optimizer's of the same values (the
    same float64 sums); the clipped step is its step rounded to nearest; a NaN in one
    16-bit grad skips the whole step, byte-identical."""
    sizes = [20] * 17 + [3000]
    params, grads = _problem(rng, sizes, formats.np_dtype(dtype))
    up = [p.astype(np.float32) for p in params]
    opt = hwoptim.Adam(params, backend=backend, max_grad_norm=0.5, skip_nonfinite=True)
    ref = hwoptim.Adam(up, backend=backend, max_grad_norm=0.5, skip_nonfinite=True)
    opt.step(grads[0])
    ref.step([g.astype(np.float32) for g in grads[0]])
    assert opt.last_grad_norm == ref.last_grad_norm > 0.5
    assert _same(params, [formats.round_nearest(q, dtype) for q in up])
    before = [p.copy() for p in params], opt.state_dict()
    grads[1][5][2] = np.nan
    opt.step(grads[1])
    assert opt.skipped_steps == 1 and opt.step_count == 1
    assert all(np.array_equal(x.view(np.uint16), y.view(np.uint16))
               for x, y in zip(params, before[0]))


@pytest.mark.skipif("numba" not in HOST, reason="numba is not available")
def test_large_arrays_with_stochastic_rounding_step_in_chunks(monkeypatch, rng):
    """From SR_SINGLE_MAX (2**32) elements a stochastically rounded array steps through the
    multi-tensor kernel (whose chunks mix the index's high word into the bits): lowered
    here to 1000, the bits are the one-array kernel's, as the spec's are below 2**32."""
    from hwoptim.backends import numba as nb
    params, grads = _problem(rng, [5000], BF16)
    a, b = [params[0].copy()], [params[0].copy()]
    for arr, limit in ((a, 2**32), (b, 1000)):
        monkeypatch.setattr(nb, "SR_SINGLE_MAX", limit)
        opt = hwoptim.Adam(arr, backend="numba", stochastic_rounding=True, seed=4)
        for g in grads:
            opt.step(g)
    assert np.array_equal(a[0].view(np.uint16), b[0].view(np.uint16))


# ----------------------------------------------------------------------------- int8 state

def test_int8_maps_pinned_and_round_trip():
    """The two maps' values at a few codes (the README's table), every code decodes and
    encodes back to itself, NaN and ±Inf have codes of their own."""
    s = formats.decode(np.uint8([0, 1, 8, 0x40, 0x78, 0x80 | 0x78, 0x7E, 0xFE, 0x7F]), False)
    assert s[:6].tolist() == [0.0, 2.0**-17, 2.0**-14, 2.0**-7, 1.0, -1.0]
    assert s[6] == np.inf and s[7] == -np.inf and np.isnan(s[8])
    u = formats.decode(np.uint8([0, 1, 8, 0xF8, 0xFE, 0xFF]), True)
    assert u[:4].tolist() == [0.0, 2.0**-33, 2.0**-30, 1.0]
    assert u[4] == np.inf and np.isnan(u[5])
    for unsigned in (False, True):
        codes = np.arange(256, dtype=np.uint8)
        v = formats.decode(codes, unsigned)
        ok = np.isinf(v) | (np.abs(v) <= 1)          # (NaN: one code, whatever the sign)
        assert np.array_equal(formats.encode(v[ok], unsigned), codes[ok])
        assert np.isnan(formats.decode(formats.encode(np.float32([np.nan]), unsigned),
                                       unsigned)).all()
        assert (~ok).sum() == (12 if not unsigned else 6)    # unused codes above 1, NaN


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e6])
def test_int8_error_bound(scale, rng):
    """The README's bound, on values spread over eight decades (signed blocks) and their
    squares (non-negative blocks, the unsigned map): |x^ - x| <= max(2^-4 |x|, 2^-18 A)
    signed, max(2^-4 |x|, 2^-34 A) unsigned, A the block's absmax; a quarter of a
    block's elements are NaN, ±Inf or 0 and stay so, and do not change the others."""
    n = 50 * 256 + 77
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 0, n) * scale).astype(np.float32)
    for vals, bias in ((x, 18), (x * x, 34)):
        codes, absmax = formats.quantize(vals)
        assert absmax.size == -(-n // 256) and np.signbit(absmax).all() == (bias == 34)
        back = formats.dequantize(codes, absmax)
        A = np.repeat(np.abs(absmax), 256)[:n]
        assert np.all(np.abs(back - vals) <= np.maximum(2.0**-4 * np.abs(vals),
                                                        2.0**-bias * A))
        special = vals.copy()
        special[::4] = rng.choice(np.float32([np.nan, np.inf, -np.inf, 0.0]), special[::4].size)
        c2, a2 = formats.quantize(special)
        b2 = formats.dequantize(c2, a2)
        assert np.array_equal(b2[::4], special[::4], equal_nan=True)


@pytest.mark.parametrize("backend", HOST)
def test_int8_state_keeps_float32_under_min_8bit_size(backend, rng):
    """bitsandbytes' rule: arrays under min_8bit_size (4096) elements keep float32 state;
    min_8bit_size=0 quantizes them all; one optimizer holds both kinds."""
    ps = [rng.standard_normal(n).astype(BF16) for n in (4095, 4096, 10)]
    opt = hwoptim.Adam(ps, backend=backend, state_dtype="int8")
    kinds = [st["exp_avg"].dtype for st in opt.state]
    assert kinds == [np.float32, np.uint8, np.float32]
    opt.step([rng.standard_normal(p.size).astype(BF16) for p in ps])
    opt = hwoptim.Adam(ps, backend=backend, state_dtype="int8", min_8bit_size=0)
    assert all(st["exp_avg"].dtype == np.uint8 for st in opt.state)
    with pytest.raises(ValueError, match="min_8bit_size=-1 is invalid: expected an integer"):
        hwoptim.Adam(ps, state_dtype="int8", min_8bit_size=-1)


@pytest.mark.parametrize("backend", HOST)
def test_int8_checkpoints_convert(backend, rng):
    """float32 state into an int8 optimizer quantizes; int8 into float32 dequantizes; int8
    into int8 keeps the codes; bad codes are refused before anything changes."""
    p = rng.standard_normal(5000).astype(np.float32)
    f32 = hwoptim.Adam([p.copy()], backend=backend)
    f32.step([rng.standard_normal(5000).astype(np.float32)])
    sd = f32.state_dict()
    q = hwoptim.Adam([p.copy()], backend=backend, state_dtype="int8")
    q.load_state_dict(sd)
    codes, absmax = formats.quantize(sd["state"][0]["exp_avg"])
    assert np.array_equal(q.state[0]["exp_avg"], codes)
    assert np.array_equal(q.state[0]["exp_avg_absmax"], absmax)
    back = hwoptim.Adam([p.copy()], backend=backend)
    back.load_state_dict(q.state_dict())
    assert np.array_equal(back.state[0]["exp_avg"], formats.dequantize(codes, absmax))
    q2 = hwoptim.Adam([p.copy()], backend=backend, state_dtype="int8")
    q2.load_state_dict(q.state_dict())
    assert np.array_equal(q2.state[0]["exp_avg_sq"], q.state[0]["exp_avg_sq"])
    bad = q.state_dict()
    bad["state"][0]["exp_avg_absmax"] = bad["state"][0]["exp_avg_absmax"][:-1]
    before = back.state_dict()
    with pytest.raises(ValueError, match="expected uint8 codes of 5000 elements"):
        back.load_state_dict(bad)
    assert np.array_equal(back.state[0]["exp_avg"], before["state"][0]["exp_avg"])


# ----------------------------------------------------------------------------- hwoptim.torch

TORCH_MODES = [("bfloat16", {}), ("bfloat16", {"state_dtype": "int8", "min_8bit_size": 0}),
               ("float16", {"master_weights": True}),
               ("bfloat16", {"stochastic_rounding": True, "seed": 9,
                             "state_dtype": "bfloat16"}),
               ("float32", {"state_dtype": "int8"})]


@pytest.mark.torch
@pytest.mark.parametrize("name", ["Adam", "Adafactor"])
@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("mode", TORCH_MODES, ids=[f"{d}-{o}" for d, o in TORCH_MODES])
def test_torch_class_steps_16_bit_tensors_as_the_native_class(mode, backend, name, torch,
                                                               rng):
    """hwoptim.torch.Adam and .Adafactor (its (64, 80) matrix factored: the staged kernels)
    on CPU tensors of 16-bit dtypes, in each format, give the native class's bits on the
    same values (params numbered as the native class numbers them: the same
    stochastic-rounding streams); the state_dict goes through torch.save/torch.load and a
    new optimizer resumes bit-identically."""
    import io
    import hwoptim.torch as ht
    dtype, fmt = mode
    tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    shapes = [(64, 80), (80,), (5000,)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(4)]
    tp = [torch.nn.Parameter(torch.tensor(a).to(tdt)) for a in init]
    opt = getattr(ht, name)(tp, lr=1e-2, backend=backend, **fmt)
    mine = [torch.tensor(a).to(tdt).float().numpy().astype(formats.np_dtype(dtype))
            for a in init]
    ref = getattr(hwoptim, name)(mine, lr=1e-2, backend=backend, **fmt)
    for g in grads[:2]:
        for t, a in zip(tp, g):
            t.grad = torch.tensor(a).to(tdt)
        opt.step()
        ref.step([a.astype(formats.np_dtype(dtype)) for a in g])
    for t, m in zip(tp, mine):
        assert np.array_equal(t.detach().float().numpy(), m.astype(np.float32).reshape(t.shape))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    tp2 = [torch.nn.Parameter(t.detach().clone()) for t in tp]
    opt2 = getattr(ht, name)(tp2, lr=1e-2, backend=backend, **{**fmt, "seed": 1})
    opt2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    for g in grads[2:]:
        for ps in (tp, tp2):
            for t, a in zip(ps, g):
                t.grad = torch.tensor(a).to(tdt)
        opt.step()
        opt2.step()
    for a, b in zip(tp, tp2):
        assert torch.equal(a.detach().view(torch.int16 if tdt != torch.float32 else torch.int32),
                           b.detach().view(torch.int16 if tdt != torch.float32 else torch.int32))
    for i in (0, 2):
        for k, v in opt.state[tp[i]].items():
            assert torch.equal(v, opt2.state[tp2[i]][k]), k


@pytest.mark.torch
def test_torch_class_loads_torch_optim_state_into_int8(torch, rng):
    """torch.optim.Adam's state_dict (float32 moments) into hwoptim.torch.Adam with int8
    state: the moments quantized; back into torch.optim.Adam: decoded (float32)."""
    import hwoptim.torch as ht
    p = torch.nn.Parameter(torch.randn(6000))
    p.grad = torch.randn(6000)
    ta = torch.optim.Adam([p], lr=1e-3)
    ta.step()
    sd = ta.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    mine = ht.Adam([q], lr=1e-3, state_dtype="int8")
    mine.load_state_dict(sd)
    codes, absmax = formats.quantize(sd["state"][0]["exp_avg"].numpy())
    assert np.array_equal(mine.state[q]["exp_avg"].numpy(), codes)
    assert np.array_equal(mine.state[q]["exp_avg_absmax"].numpy(), absmax)
    back = torch.optim.Adam([torch.nn.Parameter(p.detach().clone())], lr=1e-3)
    # hwoptim's int8 state decoded by a float32 hwoptim.torch optimizer, then into torch
    f32 = ht.Adam([torch.nn.Parameter(p.detach().clone())], lr=1e-3)
    f32.load_state_dict(mine.state_dict())
    back.load_state_dict(f32.state_dict())
    got = back.state_dict()["state"][0]["exp_avg"].numpy()
    assert np.array_equal(got, formats.dequantize(codes, absmax))


# ----------------------------------------------------------------------------- the lesson

def test_lesson_runs_methods_in_storage_formats():
    """``hwoptim viz``'s methods take ``dtype=`` and the format's options: the path holds
    values of the storage dtype; on the valley with a small lr, bfloat16 with
    round-to-nearest stalls where float32 and stochastic rounding go on."""
    from hwoptim.lesson import landscapes as L, trajectories as T
    ls = L.get("valley")
    runs = {}
    for label, extra in (("fp32", "dtype='float32'"), ("rne", "dtype='bfloat16'"),
                         ("sr", "dtype='bfloat16', stochastic_rounding=True"),
                         ("int8", "dtype='float32', state_dtype='int8', min_8bit_size=0")):
        m = T.parse_method(f"{label}=Adam(lr=0.001, {extra})")
        runs[label] = T.run(ls, m, 1000, backend="numpy")
    bf = runs["rne"].path.astype(np.float32)
    assert np.array_equal(bf, bf.astype(BF16).astype(np.float32))      # bfloat16 values
    assert runs["rne"].losses[-1] > 2 * runs["fp32"].losses[-1]
    assert runs["sr"].losses[-1] < 0.5 * runs["rne"].losses[-1]
    assert runs["int8"].losses[-1] < 0.5 * runs["rne"].losses[-1]
    with pytest.raises(ValueError, match="dtype='int4'"):
        T.parse_method("Adam(dtype='int4')")


@pytest.mark.skipif("numba" not in HOST, reason="numba is not available")
@pytest.mark.parametrize("many", [False, True])
def test_int8_parallel_kernels_are_the_reference(many, rng):
    """int8 state with stochastic rounding on arrays large enough for the parallel kernels
    (one array: a prange over runs of blocks; many: the multi-tensor chunks), against the
    NumPy backend, bit for bit."""
    sizes = [300_000] if not many else [200_000, 70_001] + [100] * 15
    out = []
    for backend in ("numpy", "numba"):
        r = np.random.default_rng(3)
        params, grads = _problem(r, sizes, BF16)
        opt = hwoptim.Adam(params, backend=backend, state_dtype="int8",
                           stochastic_rounding=True, seed=8)
        for g in grads:
            opt.step(g)
        out.append((params, opt.state_dict()))
    assert _same(out[0][0], out[1][0])
    for x, y in zip(out[0][1]["state"], out[1][1]["state"]):
        assert all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("backend", HOST)
def test_a_copied_optimizer_keeps_its_format(backend, rng):
    """copy.deepcopy (and pickle) keep the format, the seed and min_8bit_size: the copy
    steps to the original's bits."""
    import copy
    params, grads = _problem(rng, [5000, 100], BF16)
    opt = hwoptim.Adam(params, backend=backend, state_dtype="int8", stochastic_rounding=True,
                       seed=77, min_8bit_size=1000)
    opt.step(grads[0])
    twin = copy.deepcopy(opt)
    assert twin.format == opt.format and twin.seed == 77 and twin.min_8bit_size == 1000
    assert twin.state[1]["exp_avg"].dtype == np.float32          # under min_8bit_size
    opt.step(grads[1])
    twin.step(grads[1])
    assert _same(params, twin._params)


@pytest.mark.skipif("numba" not in HOST, reason="numba is not available")
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_a_checkpoint_resumes_on_the_other_backend(mode, rng):
    """Three steps on Numba, the state_dict loaded into a NumPy-backend optimizer, three
    more: the bits of six steps on Numba."""
    dtype, fmt = mode
    params, _ = _problem(rng, [33, 3000], formats.np_dtype(dtype))
    grads = [[_values(rng, p.size).astype(p.dtype) for p in params] for _ in range(6)]
    a = [p.copy() for p in params]
    opt = hwoptim.Adam(a, lr=1e-2, backend="numba", **fmt)
    for g in grads:
        opt.step(g)
    b = [p.copy() for p in params]
    first = hwoptim.Adam(b, lr=1e-2, backend="numba", **fmt)
    for g in grads[:3]:
        first.step(g)
    second = hwoptim.Adam(b, lr=1e-2, backend="numpy", **fmt)
    second.load_state_dict(first.state_dict())
    for g in grads[3:]:
        second.step(g)
    assert _same(a, b)


@pytest.mark.torch
@pytest.mark.parametrize("backend", HOST)
def test_native_class_steps_torch_16_bit_tensors_in_place(backend, torch, rng):
    """torch CPU tensors of bfloat16 and float16 as the native class's params and grads
    (DLPack; bfloat16's bits reinterpreted, as NumPy takes no bfloat16 export): updated in
    place, the bits of the same step on NumPy arrays."""
    for tdt, dtype in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        init = rng.standard_normal(3000).astype(np.float32)
        g = rng.standard_normal(3000).astype(np.float32)
        t = torch.tensor(init).to(tdt)
        opt = hwoptim.Adam([t], backend=backend, stochastic_rounding=True)
        opt.step([torch.tensor(g).to(tdt)])
        a = torch.tensor(init).to(tdt).float().numpy().astype(formats.np_dtype(dtype))
        ref = hwoptim.Adam([a], backend=backend, stochastic_rounding=True)
        ref.step([torch.tensor(g).to(tdt).float().numpy().astype(formats.np_dtype(dtype))])
        assert np.array_equal(t.float().numpy(), a.astype(np.float32))
        assert not np.array_equal(t.float().numpy(), init)


@pytest.mark.skipif("numba" not in HOST, reason="numba is not available")
def test_bench_formats_prints_every_format(capsys):
    """``hwoptim bench --formats``: a row per format with its bytes per element (plain SGD
    reads p and g and writes p: 12 B in float32); an unknown rule is a usage error."""
    from hwoptim.cli import main

    def bench_main(args):
        return main(["bench", *args])
    assert bench_main(["--formats", "--rules", "SGD", "--sizes", "3000", "--pairs", "1",
                       "--no-torch"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    from hwoptim.bench.formats import FORMATS
    assert len(rows) == len(FORMATS)
    assert rows[0].split("|")[2].strip() == "12"          # fp32 SGD without momentum
    assert bench_main(["--formats", "--rules", "NoSuchRule", "--no-torch"]) == 2


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_flat_params_hold_16_bit_params(dtype, backend, rng):
    """FlatParams of float16/bfloat16 (from_arrays: copies, every view 16-byte aligned): an
    optimizer in a format over its vector steps its views in place, to the bits of the same
    optimizer over a copy of the vector."""
    dt = formats.np_dtype(dtype)
    shapes = [(3, 5), (300,), (64, 80), (7,)]
    arrays = [_values(rng, int(np.prod(s))).astype(dt).reshape(s) for s in shapes]
    flat = hwoptim.FlatParams.from_arrays(arrays)
    assert flat.dtype == dt and _same(flat.views, arrays)
    assert all(v.ctypes.data % 16 == 0 for v in flat.views)
    copy = flat.params.copy()
    kw = dict(lr=1e-2, backend=backend, state_dtype="int8", stochastic_rounding=True, seed=3,
              min_8bit_size=0)
    a, b = hwoptim.Adam(flat.params, **kw), hwoptim.Adam(copy, **kw)
    for _ in range(3):
        for g in flat.grad_views:
            g[...] = _values(rng, g.size).astype(dt).reshape(g.shape)
        a.step(flat.grads)
        b.step(flat.grads.copy())
    assert np.array_equal(flat.params.view(np.uint16), copy.view(np.uint16))
    assert not _same(flat.views, arrays)                   # the views moved with it
    with pytest.raises(TypeError, match="expected float32, float64, float16 or bfloat16"):
        hwoptim.FlatParams([(3,)], np.int16)
