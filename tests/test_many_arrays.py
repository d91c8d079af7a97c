"""Many separate arrays in one optimizer (a torch model's tensors, say): from
``optim.FAST_MIN`` arrays on, ``step()`` checks the grads in one compiled pass over their
headers (hwoptim/_fastcheck.py) and updates each group with one multi-tensor launch. Both must
be invisible: bit-identical results to the per-array path, the same errors for the same bad
grads, nothing changed by a refused step."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import hwoptim
from hwoptim import _fastcheck, optim
from hwoptim.rules import RULES
from hwoptim.testing import option_sets, random_values

pytestmark = pytest.mark.skipif("numba" not in hwoptim.backends.available(),
                                reason="the multi-tensor path is the Numba backend's")


def _shapes(rng, n):
    """Model-like: log-uniform sizes, 1-D and 2-D, a few empty."""
    out = []
    for i in range(n):
        size = int(10 ** rng.uniform(0, 3.7))
        out.append((0,) if i % 37 == 5 else ((size,) if i % 3 else (size // 7 + 1, 7)))
    return out


def _per_array(monkeypatch_value=10 ** 9):
    old = optim.FAST_MIN
    optim.FAST_MIN = monkeypatch_value
    return old


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rule, opts", [pytest.param(r, o, id=i) for r in RULES.values()
                                        for i, o in option_sets(r)])
def test_bit_identical_to_the_per_array_path(rule, opts, dtype, rng):
    shapes = _shapes(rng, 60)
    init = [random_values(rng, s, dtype) for s in shapes]
    cls = getattr(hwoptim, rule.name)
    groups = lambda ps: [{"params": ps[:40]}, {"params": ps[40:], "lr": 0.5 * rule.hypers["lr"].default}]  # noqa: E731
    fast_p, slow_p = [a.copy() for a in init], [a.copy() for a in init]
    fast, slow = cls(groups(fast_p), **opts), cls(groups(slow_p), **opts)
    for step in range(4):
        gs = [random_values(rng, s, dtype) for s in shapes]
        fast.step(gs if step % 2 else [g.copy() for g in gs])   # new and re-used grads
        old = _per_array()
        try:
            slow.step([g.copy() for g in gs])
        finally:
            optim.FAST_MIN = old
    # (staged params, Adafactor's matrices, take the per-array path by design)
    assert (fast._tables is not None or _fastcheck.reader() is None
            or len(fast._slot_group) > len(fast.param_groups))
    for a, b in zip(fast_p, slow_p):
        assert np.array_equal(a, b)
    for sa, sb in zip(fast.state, slow.state):
        for k in sa:
            assert np.array_equal(sa[k], sb[k]), k


def _bad_grads(rng, shapes, dtype):
    gs = [random_values(rng, s, dtype) for s in shapes]
    k = len(gs) // 2
    wrong_dtype = list(gs)
    wrong_dtype[k] = gs[k].astype(np.float64 if dtype == "float32" else np.float32)
    wrong_shape = list(gs)
    wrong_shape[k] = gs[k].reshape(-1)[:-1].copy() if gs[k].size else np.zeros(1, dtype)
    strided = list(gs)
    strided[k] = np.repeat(gs[k].reshape(-1), 2)[::2].reshape(gs[k].shape)
    swapped = list(gs)
    swapped[k] = gs[k].astype(gs[k].dtype.newbyteorder(">"))
    sub = list(gs)
    sub[k] = gs[k].view(np.ma.MaskedArray)
    overlap = list(gs)
    big = np.concatenate([gs[k].reshape(-1), gs[k + 1].reshape(-1)])
    overlap[k] = big[:gs[k].size].reshape(gs[k].shape)
    overlap[k + 1] = big[1:gs[k + 1].size + 1].reshape(gs[k + 1].shape)
    return {"dtype": (TypeError, wrong_dtype), "shape": (ValueError, wrong_shape),
            "contiguity": (ValueError, strided), "byte order": (TypeError, swapped),
            "subclass": (TypeError, sub), "overlap": (ValueError, overlap), "count": (
                ValueError, gs[:-1])}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bad_grads_get_the_same_error_and_change_nothing(dtype, rng):
    shapes = [s if 0 not in s else (3,) for s in _shapes(rng, 50)]
    ps = [random_values(rng, s, dtype) for s in shapes]
    opt = hwoptim.Adam(ps)
    opt.step([random_values(rng, s, dtype) for s in shapes])
    for what, (exc, gs) in _bad_grads(rng, shapes, dtype).items():
        before = ([p.copy() for p in ps], [{k: v.copy() for k, v in s.items()} for s in opt.state])
        with pytest.raises(exc) as fast_err:
            opt.step(gs)
        old = _per_array()
        try:
            with pytest.raises(exc) as slow_err:
                opt.step(gs)
        finally:
            optim.FAST_MIN = old
        assert str(fast_err.value) == str(slow_err.value), what
        assert all(np.array_equal(a, b) for a, b in zip(ps, before[0])), what
        for s, b in zip(opt.state, before[1]):
            assert all(np.array_equal(s[k], b[k]) for k in b), what
        assert opt.step_count == 1, what
    # grads that are params, or views of the state
    gs = [random_values(rng, s, dtype) for s in shapes]
    gs[7] = ps[7]
    with pytest.raises(ValueError, match=r"grads\[7\] overlaps params\[7\]"):
        opt.step(gs)
    gs[7] = opt.state[7]["exp_avg"]
    with pytest.raises(ValueError, match=r"grads\[7\] overlaps state\[7\]"):
        opt.step(gs)
    assert opt.step_count == 1


def test_the_header_reader_is_verified_or_not_used():
    """The reader passes its own verification here (CPython, 64-bit, NumPy 2); with
    HWOPTIM_FAST_CHECKS=0 it is not used and results stay the same."""
    assert _fastcheck.reader() is not None
    code = ("import numpy as np, hwoptim; from hwoptim import _fastcheck\n"
            "ps = [np.full(5, float(i)) for i in range(40)]\n"
            "o = hwoptim.Adam(ps); o.step([np.ones(5)] * 1 + [np.full(5, 2.0) for _ in range(39)])\n"
            "print(_fastcheck.reader() is None, o._tables is None, float(ps[3][0]))")
    outs = []
    for env in ({"HWOPTIM_FAST_CHECKS": "0"}, {}):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**__import__("os").environ, **env}, check=True)
        outs.append(r.stdout.split())
    assert outs[0][:2] == ["True", "True"] and outs[1][:2] == ["False", "False"]
    assert outs[0][2] == outs[1][2]


def test_bad_grads_with_extra_dims_are_refused(rng):
    """A grad with one more dimension than its param, whose extra size happens to equal
    the next param's: the shape table must not be read past the param's own dims."""
    shapes = [(4,), (1,)] + [(3,)] * 20
    ps = [random_values(rng, s, "float32") for s in shapes]
    opt = hwoptim.Adam(ps)
    gs = [random_values(rng, s, "float32") for s in shapes]
    gs[0] = gs[0].reshape(4, 1)
    before = [p.copy() for p in ps]
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(4, 1\); expected \(4,\)"):
        opt.step(gs)
    assert all(np.array_equal(a, b) for a, b in zip(ps, before)) and opt.step_count == 0
