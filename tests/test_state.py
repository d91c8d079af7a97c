"""Checkpoints: ``state_dict()`` (NumPy copies of the state, the step count, the
hyperparameters) survives pickling, and loading it into a fresh optimizer over the saved
params resumes the run bit-identically on the same backend, and within the per-step
tolerance on another backend."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

import hwoptim
from hwoptim import backends, codegen
from hwoptim.rules import RULES
from hwoptim.spec import host_scalars
from hwoptim.testing import condition, option_sets, random_values, reference_step, step_errors

SHAPES = [(37, 29), (11,)]
HOST = [n for n in backends.available() if backends.load(n).FAMILY == "host"]
DTYPES = ("float32", "float64")
BEFORE, AFTER = 7, 8          # steps before the checkpoint, and after it


def _params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _run(opt, grads):
    for gs in grads:
        opt.step([g.copy() for g in gs])


def _grads(rng, n, dtype):
    return [[random_values(rng, s, dtype) for s in SHAPES] for _ in range(n)]


def _checkpoint(opt):
    """state_dict through pickle, and copies of the params (what a checkpoint file holds)."""
    blob = pickle.dumps((opt.state_dict(), [p.copy() for p in _params(opt)]))
    return pickle.loads(blob)


def _cases():
    return [pytest.param(rule, opts, backend, dtype, id=f"{oid}-{backend}-{dtype}")
            for rule in RULES.values() for oid, opts in option_sets(rule)
            for backend in HOST for dtype in DTYPES]


@pytest.mark.parametrize("rule, opts, backend, dtype", _cases())
def test_resume_is_bit_identical(rule, opts, backend, dtype, rng):
    cls = getattr(hwoptim, rule.name)
    init = [random_values(rng, s, dtype) for s in SHAPES]
    grads = _grads(rng, BEFORE + AFTER, dtype)

    whole = cls([a.copy() for a in init], backend=backend, **opts)
    _run(whole, grads)

    first = cls([a.copy() for a in init], backend=backend, **opts)
    _run(first, grads[:BEFORE])
    sd, saved = _checkpoint(first)

    # what the state_dict holds
    assert sd["rule"] == rule.name and sd["step"] == BEFORE and sd["dtype"] == dtype
    assert [tuple(s) for s in sd["shapes"]] == SHAPES
    for k, v in sd["param_groups"][0].items():
        if k != "params":
            assert v == first.param_groups[0][k], k
    assert len(sd["state"]) == len(SHAPES)
    for mine, theirs in zip(first.state, sd["state"]):
        assert set(mine) == set(theirs)
        for k, v in theirs.items():
            assert type(v) is np.ndarray and v.dtype == np.dtype(dtype), k
            assert np.array_equal(v, mine[k]), k

    resumed_params = [a.copy() for a in saved]
    resumed = cls(resumed_params, backend=backend, **opts)
    resumed.load_state_dict(sd)
    assert resumed.step_count == BEFORE
    _run(resumed, grads[BEFORE:])

    assert resumed.step_count == whole.step_count == BEFORE + AFTER
    for a, b in zip(resumed_params, _params(whole)):
        assert np.array_equal(a, b)
    for st_a, st_b in zip(resumed.state, whole.state):
        assert st_a.keys() == st_b.keys()
        for k in st_a:
            assert np.array_equal(st_a[k], st_b[k]), k
    if first.state[0]:       # resuming mattered: without the state, the run differs
        cold = cls([a.copy() for a in saved], backend=backend, **opts)
        _run(cold, grads[BEFORE:])
        assert not all(np.array_equal(a, b) for a, b in zip(_params(cold), resumed_params))


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("rule", [r for r in RULES.values()], ids=list(RULES))
def test_state_dict_owns_its_arrays(rule, backend, rng):
    """A state_dict taken now keeps today's numbers: its arrays are copies (checked on the
    state_dict itself, not after a pickle, which always copies), and later steps, loads and
    in-place edits of the state_dict change neither side."""
    cls = getattr(hwoptim, rule.name)
    opts = next((o for _, o in option_sets(rule) if o), {})
    opt = cls([random_values(rng, s) for s in SHAPES], backend=backend, **opts)
    opt.step([random_values(rng, s) for s in SHAPES])
    sd = opt.state_dict()
    kept = pickle.loads(pickle.dumps(sd))
    assert any(sd["state"]), "the option set has no state: the check would be empty"
    for mine, theirs in zip(opt.state, sd["state"]):
        for k, v in theirs.items():
            assert not np.shares_memory(v, mine[k]), k
            for p in _params(opt):
                assert not np.shares_memory(v, p), k
    groups = [g["params"] for g in opt.param_groups]
    assert all(d["params"] is not g for d, g in zip(sd["param_groups"], groups))
    opt.step([random_values(rng, s) for s in SHAPES])
    for theirs, saved in zip(sd["state"], kept["state"]):
        for k in saved:
            assert np.array_equal(theirs[k], saved[k]), f"state {k!r} changed after step()"
    before = [{k: v.copy() for k, v in st.items()} for st in opt.state]
    for st in sd["state"]:
        for v in st.values():
            v += 1.0
    for st, b in zip(opt.state, before):
        for k in b:
            assert np.array_equal(st[k], b[k]), f"editing the state_dict changed state {k!r}"
    # loading does not adopt the caller's arrays either
    opt.load_state_dict(kept)
    for st, theirs in zip(opt.state, kept["state"]):
        for k, v in theirs.items():
            assert not np.shares_memory(st[k], v), k


def _cross_cases():
    return [pytest.param(rule, opts, src, dst, dtype, id=f"{oid}-{src}-to-{dst}-{dtype}")
            for rule in RULES.values() for oid, opts in option_sets(rule)[:1]
            for src in HOST for dst in HOST if src != dst for dtype in DTYPES]


@pytest.mark.parametrize("rule, opts, src, dst, dtype", _cross_cases())
def test_resume_on_another_backend(rule, opts, src, dst, dtype, rng):
    """Saved on one host backend, resumed on the other: every step after loading within the
    per-step tolerance of the float64 reference from the resumed state."""
    cls = getattr(hwoptim, rule.name)
    init = [random_values(rng, s, dtype) for s in SHAPES]
    first = cls(init, backend=src, **opts)
    _run(first, _grads(rng, BEFORE, dtype))
    sd, saved = _checkpoint(first)
    resumed = cls(saved, backend=dst, **opts)
    assert resumed.backend_name == dst
    resumed.load_state_dict(sd)
    for i in range(len(SHAPES)):
        for k, v in resumed.state[i].items():
            assert np.array_equal(v, first.state[i][k])
    g0 = resumed.param_groups[0]
    h = {n: g0[n] for n in rule.hypers}
    flags = rule.static_flags(h, {n: g0[n] for n in rule.options})
    plan = codegen.plan(rule, flags)
    for t in range(BEFORE + 1, BEFORE + AFTER + 1):
        grads = [random_values(rng, s, dtype) for s in SHAPES]
        before = [{"param": p.copy(), **{k: v.copy() for k, v in st.items()}}
                  for p, st in zip(saved, resumed.state)]
        resumed.step(grads)
        ks = plan.kernel_scalars(host_scalars(rule, h, t))
        for i, (p, st) in enumerate(zip(saved, resumed.state)):
            if rule.array_flags(flags, p.shape) is not flags:
                continue            # Adafactor's matrices: resumed in test_adafactor.py
            ref = reference_step(rule, flags, h, t, before[i], grads[i])
            cond = condition(plan, before[i], grads[i], ks, dtype)
            errs = step_errors({"param": p, **st}, ref, dtype, cond)
            for name, (elem, norm) in errs.items():
                assert elem <= 1 and norm <= 1, (t, i, name, elem, norm)


@pytest.mark.parametrize("backend", HOST)
def test_callable_lr_is_saved_by_its_current_value(backend, rng):
    sched = lambda t: 0.1 / t            # noqa: E731
    init = random_values(rng, (50,))
    opt = hwoptim.Adam(init.copy(), lr=sched, backend=backend)
    assert opt.state_dict()["param_groups"][0]["lr"] == sched(1)
    grads = [random_values(rng, (50,)) for _ in range(10)]
    for g in grads[:3]:
        opt.step(g.copy())
    sd = pickle.loads(pickle.dumps(opt.state_dict()))
    assert sd["param_groups"][0]["lr"] == sched(3)
    assert opt.param_groups[0]["lr"] is sched      # the optimizer keeps the callable

    # loaded into an optimizer with a number: the number replaces it
    p = _params(opt)[0].copy()
    fixed = hwoptim.Adam(p, lr=0.5, backend=backend)
    fixed.load_state_dict(sd)
    assert fixed.param_groups[0]["lr"] == sched(3)

    # loaded into an optimizer with the callable: the callable is kept, and the schedule
    # resumes from the restored step exactly
    q = _params(opt)[0].copy()
    again = hwoptim.Adam(q, lr=sched, backend=backend)
    again.load_state_dict(sd)
    assert again.param_groups[0]["lr"] is sched
    whole = hwoptim.Adam(init.copy(), lr=sched, backend=backend)
    for g in grads:
        whole.step(g.copy())
    for g in grads[3:]:
        again.step(g.copy())
        opt.step(g.copy())
    assert np.array_equal(q, _params(whole)[0])
    assert np.array_equal(q, _params(opt)[0])


@pytest.mark.parametrize("backend", HOST)
def test_param_groups_resume_with_their_own_hyperparameters(backend, rng):
    groups = lambda ps: [{"params": [ps[0]], "lr": 0.05, "momentum": 0.9},   # noqa: E731
                         {"params": [ps[1]], "lr": 0.01, "weight_decay": 0.1}]
    init = [random_values(rng, s) for s in SHAPES]
    grads = _grads(rng, BEFORE + AFTER, np.float64)
    whole = hwoptim.SGD(groups([a.copy() for a in init]), backend=backend)
    _run(whole, grads)
    first = hwoptim.SGD(groups([a.copy() for a in init]), backend=backend)
    _run(first, grads[:BEFORE])
    sd, saved = _checkpoint(first)
    assert [g["params"] for g in sd["param_groups"]] == [[0], [1]]
    assert sd["state"][1] == {}
    # a fresh optimizer made with other numbers for the same kernels: the saved ones win
    other = [{"params": [saved[0]], "lr": 1.0, "momentum": 0.5},
             {"params": [saved[1]], "lr": 1.0}]
    resumed = hwoptim.SGD(other, backend=backend)
    resumed.load_state_dict(sd)
    assert resumed.param_groups[0]["lr"] == 0.05 and resumed.param_groups[0]["momentum"] == 0.9
    assert resumed.param_groups[1]["weight_decay"] == 0.1
    _run(resumed, grads[BEFORE:])
    for a, b in zip(saved, _params(whole)):
        assert np.array_equal(a, b)
