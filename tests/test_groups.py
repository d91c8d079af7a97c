"""Hyperparameters, groups and state can't be changed behind the optimizer's back: every way
of changing them validates, rebuilds what the change needs, or refuses with a clear error and
changes nothing; copies and pickles own their arrays."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import hwoptim
from hwoptim.testing import random_values

BACKENDS = [b for b in ("numpy", "numba") if b in hwoptim.backends.available()]


def _snap(opt):
    return ([p.tobytes() for p in opt._params],
            [{k: v.tobytes() for k, v in st.items()} for st in opt.state],
            opt.step_count,
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def _refused(opt, exc, fn, *fragments):
    before = _snap(opt)
    with pytest.raises(exc) as info:
        fn()
    for f in fragments:
        assert f in str(info.value), (f, str(info.value))
    assert _snap(opt) == before
    return str(info.value)


def _pair(rng, backend, n=300, **kw):
    """Two optimizers with equal params and state, on copies of the same arrays."""
    w = random_values(rng, (n,))
    a = hwoptim.Adam(w.copy(), backend=backend, **kw)
    b = hwoptim.Adam(w.copy(), backend=backend, **kw)
    return a, b


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_way_of_changing_a_group_validates(backend, rng):
    opt, _ = _pair(rng, backend)
    opt.step(random_values(rng, (300,)))
    g = opt.param_groups[0]
    _refused(opt, ValueError, lambda: g.update(lr=float("nan")), "param_groups[0]", "lr=nan")
    _refused(opt, ValueError, lambda: g.update(lr=0.5, eps=-1.0), "eps=-1.0")  # none applied
    _refused(opt, ValueError, lambda: g.__ior__({"weight_decay": -1}), "weight_decay=-1")
    _refused(opt, ValueError, lambda: g.update(lr=10 ** 400), "lr=", "finite number")
    _refused(opt, TypeError, lambda: g.pop("lr"), "'lr'", "cannot be removed")
    _refused(opt, TypeError, lambda: g.__delitem__("betas"), "'betas'", "cannot be removed")
    _refused(opt, TypeError, lambda: g.popitem(), "popitem")
    _refused(opt, TypeError, lambda: g.clear(), "clear")
    _refused(opt, ValueError, lambda: g.update(params=[]), "'params' cannot be replaced")
    _refused(opt, TypeError, lambda: g["params"].append(np.zeros(3)), "add_param_group")
    _refused(opt, TypeError, lambda: g["params"].__setitem__(0, np.zeros(300)),
             "param_groups[0]['params'] cannot be changed")
    _refused(opt, TypeError, lambda: opt.param_groups.append({"params": []}), "add_param_group")
    _refused(opt, TypeError, lambda: opt.param_groups.pop(), "add_param_group")
    _refused(opt, ValueError, lambda: g.update(amsgrad=True), "state buffers",
             "max_exp_avg_sq", "new optimizer")
    g.update(lr=0.25)
    g |= {"eps": 1e-6}
    assert g.setdefault("lr", 9.0) == 0.25 and (g["lr"], g["eps"]) == (0.25, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_option_change_picks_the_other_kernel(backend, rng):
    """update(maximize=True) used to be shown but ignored by the built kernel."""
    a, b = _pair(rng, backend)
    g1 = random_values(rng, (300,))
    a.step(g1)
    b.step(g1)
    a.param_groups[0].update(maximize=True)
    g2 = random_values(rng, (300,))
    a.step(g2)
    b.step(-g2)                                  # maximize: the same step on -g, exactly
    np.testing.assert_array_equal(a._params[0], b._params[0])
    # and the other way round: SGD's nesterov flag swaps the kernel, same buffers
    w = random_values(rng, (50,))
    s = hwoptim.SGD(w.copy(), lr=0.1, momentum=0.9, backend=backend)
    t = hwoptim.SGD(w.copy(), lr=0.1, momentum=0.9, nesterov=True, backend=backend)
    s.param_groups[0]["nesterov"] = True
    g = random_values(rng, (50,))
    s.step(g)
    t.step(g)
    np.testing.assert_array_equal(s._params[0], t._params[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_assigning_a_state_buffer_is_used_saved_and_loaded(backend, rng):
    """opt.state[i]['exp_avg'] = new_array used to disconnect the state silently."""
    a, b = _pair(rng, backend)
    for _ in range(3):
        g = random_values(rng, (300,))
        a.step(g)
        b.step(g)
    fresh = np.zeros(300)
    a.state[0]["exp_avg"] = fresh                    # the way torch users reset a moment
    b.state[0]["exp_avg"][...] = 0.0                 # the in-place reset, for comparison
    g = random_values(rng, (300,))
    a.step(g)
    b.step(g)
    assert a.state[0]["exp_avg"] is fresh
    np.testing.assert_array_equal(fresh, b.state[0]["exp_avg"])     # the kernel wrote it
    np.testing.assert_array_equal(a._params[0], b._params[0])
    np.testing.assert_array_equal(a.state_dict()["state"][0]["exp_avg"], fresh)
    sd = b.state_dict()
    a.load_state_dict(sd)
    np.testing.assert_array_equal(fresh, sd["state"][0]["exp_avg"])  # loaded into it


def test_a_bad_state_buffer_is_refused(rng):
    opt, _ = _pair(rng, "numpy")
    st = opt.state[0]
    p = opt._params[0]
    _refused(opt, ValueError, lambda: st.__setitem__("exp_avg", np.zeros(300, np.float32)),
             "state[0]['exp_avg']", "float32", "expected float64 (300,)")
    _refused(opt, ValueError, lambda: st.__setitem__("exp_avg", np.zeros(299)), "(299,)")
    _refused(opt, ValueError, lambda: st.__setitem__("exp_avg", np.zeros(600)[::2]),
             "C-contiguous")
    _refused(opt, ValueError, lambda: st.__setitem__("exp_avg", p), "overlaps", "params[0]")
    _refused(opt, ValueError, lambda: st.__setitem__("exp_avg", st["exp_avg_sq"]), "overlaps")
    _refused(opt, TypeError, lambda: st.__setitem__("exp_avg", [0.0] * 300), "expected a NumPy")
    _refused(opt, TypeError, lambda: st.__setitem__("exp_avg", np.ma.zeros(300)), "subclass")
    _refused(opt, KeyError, lambda: st.__setitem__("momentum_buffer", np.zeros(300)),
             "would not be used")
    _refused(opt, TypeError, lambda: st.pop("exp_avg"), "reset it in place")
    _refused(opt, TypeError, lambda: opt.state.__setitem__(0, {}), "opt.state cannot")
    ro = np.zeros(300)
    ro.flags.writeable = False
    _refused(opt, ValueError, lambda: st.__setitem__("exp_avg", ro), "writeable")


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group(backend, rng):
    w, b = random_values(rng, (40,)), random_values(rng, (7,))
    opt = hwoptim.Adam(w, lr=1e-2, backend=backend)
    opt.step(random_values(rng, (40,)))
    before = _snap(opt)
    # refused, and nothing changes: overlap, dtype, bad hyperparameter, not a dict
    _refused(opt, ValueError, lambda: opt.add_param_group({"params": [w[:10]]}), "overlaps")
    _refused(opt, ValueError, lambda: opt.add_param_group({"params": [opt.state[0]["exp_avg"]]}),
             "overlaps", "state[0]")
    _refused(opt, TypeError, lambda: opt.add_param_group({"params": [b.astype(np.float32)]}),
             "float32")
    _refused(opt, ValueError, lambda: opt.add_param_group({"params": [b], "lr": -1}),
             "param_groups[1]", "lr=-1")
    _refused(opt, TypeError, lambda: opt.add_param_group([b]), "expected a dict")
    assert _snap(opt) == before and len(opt.param_groups) == 1
    opt.add_param_group({"params": [b], "lr": 0.5, "name": "bias"})
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["name"] == "bias"
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)       # the optimizer's defaults
    gb = random_values(rng, (7,))
    b0 = b.copy()
    opt.step([random_values(rng, (40,)), gb])
    ref = hwoptim.Adam(b0, lr=0.5, backend="numpy")
    ref._step = 1                                            # bias correction at step 2
    ref.step(gb)
    np.testing.assert_allclose(b, b0, rtol=1e-15)
    assert opt.step_count == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_own_their_params_and_state(backend, how, rng):
    """copy.deepcopy(opt) and pickle.dumps(opt) failed with 'cannot pickle module'."""
    w = random_values(rng, (64,))
    opt = hwoptim.AdamW([{"params": [w], "name": "w"}], lr=0.01, amsgrad=True,
                        backend=backend)
    for _ in range(2):
        opt.step(random_values(rng, (64,)))
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert twin._params[0] is not w and twin.state[0]["exp_avg"] is not opt.state[0]["exp_avg"]
    assert twin.step_count == 2 and twin.param_groups[0]["name"] == "w"
    assert twin.backend_name == backend and twin.param_groups[0]["amsgrad"] is True
    before = w.copy()
    g = random_values(rng, (64,))
    twin.step(g)
    np.testing.assert_array_equal(w, before)              # the original's arrays untouched
    opt.step(g)
    np.testing.assert_array_equal(twin._params[0], w)     # and the copy steps the same
    for k in opt.state[0]:
        np.testing.assert_array_equal(twin.state[0][k], opt.state[0][k])
    twin.param_groups[0]["lr"] = 0.5                       # its groups are its own
    assert opt.param_groups[0]["lr"] == 0.01


def test_step_no_longer_keeps_the_grads_alive(rng):
    import gc
    import weakref
    opt = hwoptim.SGD(random_values(rng, (10,)), lr=0.1, backend="numpy")
    g = random_values(rng, (10,))
    opt.step(g)
    opt.step(g)                                            # the fast path
    ref = weakref.ref(g)
    del g
    gc.collect()
    assert ref() is None
