"""Carried scalars (``spec.Carry``: NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``): kept
per group by the native classes and saved in ``state_dict()["carry"]``; a bad saved value is
refused and changes nothing; a fresh group starts from the carry's initial value; replaying
(``spec.with_carry``) agrees with running the steps."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

import hwoptim
from hwoptim import backends
from hwoptim.rules import RULES
from hwoptim.spec import carry_init, host_scalars, with_carry
from hwoptim.testing import random_values

HOST = [n for n in backends.available() if backends.load(n).FAMILY == "host"]
CARRYING = [r for r in RULES.values() if r.carry]


def test_some_rules_carry():
    assert {r.name for r in CARRYING} >= {"NAdam", "ASGD"}


@pytest.mark.parametrize("rule", CARRYING, ids=lambda r: r.name)
def test_carry_is_per_group_and_saved(rule, rng):
    a, b = random_values(rng, (20,), np.float64), random_values(rng, (7,), np.float64)
    opt = getattr(hwoptim, rule.name)([{"params": [a]}, {"params": [b], "lr": 0.5}])
    assert opt.state_dict()["carry"] == [None, None]          # nothing before a first step
    opt.step([random_values(rng, (20,)), random_values(rng, (7,))])
    carry = opt.state_dict()["carry"]
    h0 = {**opt.param_groups[0]}
    want = host_scalars(rule, {**h0, **carry_init(rule, h0)}, 1)
    assert carry[0] == {c.name: want[c.name] for c in rule.carry}
    if rule.name == "ASGD":        # eta starts at each group's own lr, so the groups differ
        assert carry[0]["eta"] != carry[1]["eta"]


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("rule", CARRYING, ids=lambda r: r.name)
def test_replayed_carry_is_the_run_carry(rule, backend, rng):
    """``with_carry`` (what tests and benchmarks use to name a step without running the ones
    before) gives what an optimizer carries after really running them, constant hypers."""
    p = random_values(rng, (10,), np.float64)
    kw = {"t0": 3.0} if rule.name == "ASGD" else {}
    opt = getattr(hwoptim, rule.name)(p, backend=backend, **kw)
    for t in range(1, 13):
        h = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        assert with_carry(rule, h, t) == {**h, **(opt.state_dict()["carry"][0]
                                                  or carry_init(rule, h))}
        opt.step(random_values(rng, (10,)))


BAD_CARRY = [
    ("missing", lambda c: None, "state_dict is missing 'carry'"),
    ("short", lambda c: [], "one entry per param group"),
    ("key", lambda c: [{"wrong": 1.0}], "state_dict\\['carry'\\]\\[0\\]"),
    ("nan", lambda c: [{k: math.nan for k in c[0]}], "finite numbers"),
    ("text", lambda c: [{k: "1" for k in c[0]}], "finite numbers"),
    ("bool", lambda c: [{k: True for k in c[0]}], "finite numbers"),
]


@pytest.mark.parametrize("how, spoil, match", BAD_CARRY, ids=[b[0] for b in BAD_CARRY])
@pytest.mark.parametrize("rule", CARRYING, ids=lambda r: r.name)
def test_bad_saved_carry_is_refused_and_changes_nothing(rule, how, spoil, match, rng):
    p = random_values(rng, (9,), np.float64)
    opt = getattr(hwoptim, rule.name)(p)
    for _ in range(3):
        opt.step(random_values(rng, (9,)))
    sd = opt.state_dict()
    bad = pickle.loads(pickle.dumps(sd))
    new = spoil(sd["carry"])
    if new is None:
        del bad["carry"]
    else:
        bad["carry"] = new
    other = getattr(hwoptim, rule.name)(random_values(rng, (9,), np.float64))
    other.step(random_values(rng, (9,)))
    before = pickle.dumps(other.state_dict())
    with pytest.raises(TypeError if how == "missing" else ValueError, match=match):
        other.load_state_dict(bad)
    assert pickle.dumps(other.state_dict()) == before
    other.load_state_dict(sd)
    assert other.state_dict()["carry"] == sd["carry"]


@pytest.mark.parametrize("rule", CARRYING, ids=lambda r: r.name)
def test_copies_keep_the_carry(rule, rng):
    p = random_values(rng, (9,), np.float64)
    opt = getattr(hwoptim, rule.name)(p)
    for _ in range(4):
        opt.step(random_values(rng, (9,)))
    g = random_values(rng, (9,))
    twin = pickle.loads(pickle.dumps(opt))
    assert twin.state_dict()["carry"] == opt.state_dict()["carry"]
    opt.step(g)
    twin.step(g)
    assert np.array_equal(twin.param_groups[0]["params"][0], p)


def test_replay_has_a_limit():
    rule = RULES["NAdam"]
    h = {n: hy.default for n, hy in rule.hypers.items()}
    with pytest.raises(ValueError, match="replayed only up to step"):
        with_carry(rule, h, 10 ** 9)
