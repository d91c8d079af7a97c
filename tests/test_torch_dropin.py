"""hwoptim.torch: drop-in torch.optim optimizers, checked against torch.optim itself by training
real torch.nn models (float64: max relative difference <= 1e-12 over >= 100 steps, with a
scheduler in the loop), and for everything a training loop leans on: grads that are None,
per-param step counts, state created where torch creates it, state_dicts that interchange
with torch's own optimizers, torch.save round trips, schedulers, GradScaler, closures, hooks,
param-group edits and clear errors that change nothing."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest

from conftest import import_torch

torch = import_torch()

import hwoptim.torch as ht  # noqa: E402
from hwoptim.rules import RULES  # noqa: E402
from hwoptim.testing import option_sets  # noqa: E402

TOL = 1e-12          # params, relative to their largest element
STATE_TOL = 1e-10    # state buffers: RMSprop's momentum buffer sums g/avg terms whose
                     # rounding is ~5e-12 of its largest element after 100 steps
HOST = [b for b in ("numba", "numpy") if b in __import__("hwoptim").backends.available()]
CASES = [pytest.param(rule, opts, id=oid) for rule in RULES.values() if rule.torch
         for oid, opts in option_sets(rule) if not any(k in rule.torch_skip for k in opts)]
TWINLESS = [pytest.param(rule, opts, id=oid) for rule in RULES.values() if not rule.torch
            for oid, opts in option_sets(rule)]


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 12, generator=g), torch.randn(64, 3, generator=g)


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _rel(a, b) -> float:
    return max(float(((p - q).abs().max() / q.abs().max().clamp_min(1e-300)).detach())
               for p, q in zip(a, b))


def _state_rel(oa, ob, pa, pb) -> float:
    worst = 0.0
    for p, q in zip(pa, pb):
        sa, sb = oa.state.get(p, {}), ob.state.get(q, {})
        assert set(sa) == set(sb), (sorted(sa), sorted(sb))
        for k in sb:
            if k == "step":
                assert float(sa[k]) == float(sb[k]) and sa[k].dtype == sb[k].dtype, k
            else:
                worst = max(worst, _rel([sa[k]], [sb[k]]))
    return worst


def _train(opt, model, sched, steps, x, y, drop=True):
    # maximize=True climbs the negated loss: the same well-conditioned descent (climbing the
    # loss itself diverges, and rounding differences then grow without bound)
    sign = -1.0 if opt.param_groups[0].get("maximize") else 1.0
    for i in range(steps):
        opt.zero_grad()
        (sign * _loss(model, x, y)).backward()
        if drop and i % 7 == 3:                   # a param without a grad this step
            model[2].bias.grad = None
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.torch
@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("rule, opts", CASES)
def test_trains_like_torch(rule, opts, backend):
    """>= 100 steps of a real MLP with StepLR in the loop and a param whose grad is
    sometimes None: params and every state buffer within 1e-12 of torch.optim's, step
    counts equal (per param: the skipped bias has fewer)."""
    x, y = _data()
    a, b = _mlp(), _mlp()
    oa = getattr(ht, rule.name)(a.parameters(), backend=backend, **opts)
    ob = getattr(torch.optim, rule.torch)(b.parameters(), **opts)
    assert isinstance(oa, torch.optim.Optimizer)
    sa = torch.optim.lr_scheduler.StepLR(oa, 25, 0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, 25, 0.5)
    _train(oa, a, sa, 100, x, y)
    _train(ob, b, sb, 100, x, y)
    assert _rel(a.parameters(), b.parameters()) <= TOL
    assert _state_rel(oa, ob, list(a.parameters()), list(b.parameters())) <= STATE_TOL
    if rule.name != "SGD":
        assert float(oa.state[a[2].bias]["step"]) < float(oa.state[a[0].weight]["step"]) == 100


@pytest.mark.torch
@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("rule, opts", TWINLESS)
def test_a_rule_without_a_torch_twin_trains_like_its_oracle(rule, opts, backend):
    """A rule torch.optim lacks (Lion) is still a torch Optimizer in hwoptim.torch: the
    same 100-step MLP run as above against the rule's independent float64 oracle
    (tests/oracles.py) applied per param, per-param step counts, StepLR and a None grad."""
    from oracles import DEFAULTS, ORACLES

    class Oracle(torch.optim.Optimizer):
        def __init__(self, params, **kw):
            super().__init__(params, {**DEFAULTS[rule.name], **kw})

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                hyp = {k: g[k] for k in DEFAULTS[rule.name]}
                for p in g["params"]:
                    if p.grad is None:
                        continue
                    st = self.state[p]
                    st["t"] = st.get("t", 0) + 1
                    ORACLES[rule.name](p.detach().numpy(), st.setdefault("s", {}),
                                       p.grad.numpy(), st["t"], **hyp)

    x, y = _data()
    a, b = _mlp(), _mlp()
    oa = getattr(ht, rule.name)(a.parameters(), backend=backend, **opts)
    ob = Oracle(b.parameters(), **opts)
    assert isinstance(oa, torch.optim.Optimizer)
    _train(oa, a, torch.optim.lr_scheduler.StepLR(oa, 25, 0.5), 100, x, y)
    _train(ob, b, torch.optim.lr_scheduler.StepLR(ob, 25, 0.5), 100, x, y)
    assert _rel(a.parameters(), b.parameters()) <= TOL
    for p, q in zip(a.parameters(), b.parameters()):
        assert float(oa.state[p]["step"]) == ob.state[q]["t"]
        for k, v in ob.state[q]["s"].items():
            assert _rel([oa.state[p][k]], [torch.from_numpy(np.asarray(v))]) <= STATE_TOL, k


@pytest.mark.torch
@pytest.mark.parametrize("rule, opts", [c for c in CASES if c.id.endswith("[default]")])
def test_state_dicts_interchange_with_torch(rule, opts):
    """A state_dict saved by hwoptim.torch loads into torch.optim (and the reverse), through
    torch.save / torch.load(weights_only=True); the continued runs agree within 1e-12; the
    same backend resumes bit for bit."""
    x, y = _data()
    mine, theirs = getattr(ht, rule.name), getattr(torch.optim, rule.torch)

    def run(cls, model, sd=None, steps=30):
        opt = cls(model.parameters(), **opts)
        if sd is not None:                       # torch's load adopts the tensors: a copy,
            opt.load_state_dict(copy.deepcopy(sd))   # so two runs do not share state
        _train(opt, model, None, steps, x, y)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        return opt, torch.load(buf, weights_only=True)

    for first, second in ((mine, theirs), (theirs, mine)):
        m1 = _mlp()
        _, sd = run(first, m1)
        m2 = _mlp()
        m2.load_state_dict(m1.state_dict())
        m3 = _mlp()
        m3.load_state_dict(m1.state_dict())
        o2, _ = run(second, m2, sd)              # continued by the other library
        o3, _ = run(first, m3, sd)               # continued by the same one
        assert _rel(m2.parameters(), m3.parameters()) <= TOL, (first, second)
        assert _state_rel(o2, o3, list(m2.parameters()), list(m3.parameters())) <= STATE_TOL

    # the same backend resumes bit-identically
    m1, whole = _mlp(), _mlp()
    _, sd = run(mine, m1)
    o_whole = mine(whole.parameters(), **opts)
    _train(o_whole, whole, None, 30, x, y)
    _train(o_whole, whole, None, 30, x, y)
    run(mine, m1, sd)
    for p, q in zip(m1.parameters(), whole.parameters()):
        assert torch.equal(p, q)


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, 10, 0.7),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + 0.05 * t)),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.01, total_steps=120),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 40),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=20),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.98)], milestones=[20]),
}


@pytest.mark.torch
@pytest.mark.parametrize("name", ["AdamW", "SGD", "RMSprop"])
@pytest.mark.parametrize("sched", [*SCHEDULERS, "ReduceLROnPlateau"])
def test_schedulers(name, sched):
    """Every scheduler drives hwoptim.torch as it drives torch.optim (OneCycleLR also cycles
    betas or momentum): the same lrs, the same params within 1e-12."""
    opts = {"SGD": {"lr": 0.05, "momentum": 0.9}, "RMSprop": {"momentum": 0.5},
            "AdamW": {}}[name]
    x, y = _data()
    out = []
    for cls in (getattr(ht, name), getattr(torch.optim, name)):
        model = _mlp()
        opt = cls(model.parameters(), **opts)
        s = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=2, factor=0.5)
             if sched == "ReduceLROnPlateau" else SCHEDULERS[sched](opt))
        lrs = []
        for i in range(120):
            opt.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            opt.step()
            if sched == "ReduceLROnPlateau":
                s.step(float(loss.detach()))
            else:
                s.step()
            lrs.append(opt.param_groups[0]["lr"])
        out.append((model, lrs))
    assert out[0][1] == out[1][1]
    assert _rel(out[0][0].parameters(), out[1][0].parameters()) <= TOL


@pytest.mark.torch
def test_grad_scaler_skips_inf_steps_and_unscales():
    """torch.amp.GradScaler: a scaled run equals the unscaled one (the scale is a power of
    two), and a step with an Inf grad is skipped: params, state and step counts unchanged."""
    x, y = _data()
    a, b = _mlp(), _mlp()
    oa, ob = ht.AdamW(a.parameters()), ht.AdamW(b.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    for i in range(20):
        oa.zero_grad()
        scaler.scale(_loss(a, x, y)).backward()
        scaler.step(oa)
        scaler.update()
        ob.zero_grad()
        _loss(b, x, y).backward()
        ob.step()
    assert _rel(a.parameters(), b.parameters()) <= TOL
    before = [p.clone() for p in a.parameters()]
    state = {k: v.clone() for k, v in oa.state[a[0].weight].items()}
    oa.zero_grad()
    scaler.scale(_loss(a, x, y)).backward()
    a[0].weight.grad[0, 0] = float("inf")
    scaler.step(oa)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    for k, v in oa.state[a[0].weight].items():
        assert torch.equal(v, state[k]), k
    assert scaler.get_scale() == 2.0 ** 9


@pytest.mark.torch
def test_state_created_where_torch_creates_it():
    m = _mlp()
    ad = ht.Adagrad(m.parameters(), initial_accumulator_value=0.3)
    assert len(ad.state) == len(list(m.parameters()))          # Adagrad: in the constructor
    ref = torch.optim.Adagrad(_mlp().parameters(), initial_accumulator_value=0.3)
    for (p, s), (q, r) in zip(ad.state.items(), ref.state.items()):
        assert set(s) == set(r) and torch.equal(s["sum"], r["sum"])
        assert s["step"].dtype == r["step"].dtype and float(s["step"]) == 0
    adam = ht.Adam(m.parameters())
    assert len(adam.state) == 0                                  # the others: lazily
    x, y = _data()
    adam.zero_grad()
    _loss(m, x, y).backward()
    m[0].weight.grad = None
    adam.step()
    assert m[0].weight not in adam.state and float(adam.state[m[0].bias]["step"]) == 1
    sgd = ht.SGD(m.parameters(), momentum=0.9)
    sgd.step()
    assert "step" not in sgd.state[m[0].bias] and "momentum_buffer" in sgd.state[m[0].bias]


@pytest.mark.torch
def test_closure_hooks_groups_and_repr():
    x, y = _data()
    m = _mlp()
    opt = ht.Adam([{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 1e-2}],
                  lr=1e-3)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = _loss(m, x, y)
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    opt.add_param_group({"params": m[4].parameters(), "betas": (0.8, 0.99)})
    assert opt.param_groups[2]["betas"] == (0.8, 0.99) and opt.param_groups[2]["lr"] == 1e-3
    opt.param_groups[1]["lr"] = 0.5
    opt.param_groups[0]["weight_decay"] = 0.1
    opt.step(closure)
    assert "Adam (" in repr(opt) and "lr: 0.5" in repr(opt)
    named = ht.SGD(m.named_parameters(), lr=0.1)
    assert named.param_groups[0]["param_names"][0] == "0.weight"


@pytest.mark.torch
def test_bad_values_are_refused_and_change_nothing():
    m = _mlp()
    with pytest.raises(ValueError, match="lr=-1"):
        ht.Adam(m.parameters(), lr=-1)
    with pytest.raises(ValueError, match="betas"):
        ht.Adam(m.parameters(), betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="nesterov"):
        ht.SGD(m.parameters(), nesterov=True)
    with pytest.raises(TypeError, match="unexpected argument 'bogus'"):
        ht.Adam(m.parameters(), bogus=1)
    with pytest.raises(ValueError, match="differentiable"):
        ht.Adam(m.parameters(), differentiable=True)
    opt = ht.Adam(m.parameters())
    x, y = _data()
    opt.zero_grad()
    _loss(m, x, y).backward()
    opt.step()
    snap = ([p.clone() for p in m.parameters()],
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})
    opt.param_groups[0]["eps"] = float("nan")
    with pytest.raises(ValueError, match=r"param_groups\[0\]: eps=nan"):
        opt.step()
    opt.param_groups[0]["eps"] = 1e-8
    m[0].weight.grad = m[0].weight.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), snap[0]))
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, snap[1][id(p)][k]), k


@pytest.mark.torch
def test_float32_within_tolerance():
    """float32 training: the same run as torch.optim.AdamW within float32 rounding over 100
    steps (relative 1e-5; the kernels round in another order than torch's)."""
    torch.set_default_dtype(torch.float32)
    x, y = _data()
    a, b = _mlp(), _mlp()
    oa, ob = ht.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    _train(oa, a, None, 100, x, y)
    _train(ob, b, None, 100, x, y)
    assert a[0].weight.dtype == torch.float32
    assert _rel(a.parameters(), b.parameters()) <= 1e-5


def test_address_unchanged_and_no_copies():
    m = _mlp()
    ptrs = [p.data_ptr() for p in m.parameters()]
    opt = ht.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    for _ in range(3):
        opt.zero_grad()
        _loss(m, x, y).backward()
        opt.step()
    assert [p.data_ptr() for p in m.parameters()] == ptrs
    bufs = [opt.state[p]["momentum_buffer"].data_ptr() for p in m.parameters()]
    opt.step()
    assert [opt.state[p]["momentum_buffer"].data_ptr() for p in m.parameters()] == bufs
    np.testing.assert_array_equal(np.isfinite(m[0].weight.detach().numpy()), True)


@pytest.mark.torch
def test_step_counts_advance_like_torchs_however_they_were_set():
    """The step counts hwoptim.torch keeps (views of one buffer, advanced by one add) stay
    per-param torch tensors: set by hand, loaded from torch.optim's state_dict, or in a deep
    copy, each advances as torch.optim.Adam's does, and the copy is independent."""
    x, y = _data()
    ma, mb = _mlp(), _mlp()
    a, b = ht.Adam(ma.parameters(), lr=1e-3), torch.optim.Adam(mb.parameters(), lr=1e-3)

    def steps(opt, model):
        for _ in range(3):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
    steps(a, ma)
    steps(b, mb)
    pa, pb = list(ma.parameters()), list(mb.parameters())
    a.state[pa[0]]["step"] = torch.tensor(40.0)                  # by hand: a new tensor
    b.state[pb[0]]["step"] = torch.tensor(40.0)
    a.state[pa[1]]["step"].add_(5)                               # by hand: in place
    b.state[pb[1]]["step"].add_(5)
    c = copy.deepcopy(a)
    steps(a, ma)
    steps(b, mb)
    got = [float(a.state[p]["step"]) for p in pa]
    assert got == [float(b.state[q]["step"]) for q in pb] == [43.0, 11.0] + [6.0] * (len(pa) - 2)
    assert _rel(pa, pb) < 1e-5, "the bias corrections did not follow the step counts"
    assert [float(c.state[p]["step"]) for p in c.state] == [40.0, 8.0] + [3.0] * (len(pa) - 2)
    b2 = torch.optim.Adam(mb.parameters(), lr=1e-3)
    b2.load_state_dict(b.state_dict())
    a.load_state_dict(copy.deepcopy(b.state_dict()))              # plain tensors come in
    steps(a, ma)
    steps(b2, mb)
    assert [float(a.state[p]["step"]) for p in pa] == [46.0, 14.0] + [9.0] * (len(pa) - 2)
    assert all(a.state[p]["step"].dtype == b2.state[q]["step"].dtype for p, q in zip(pa, pb))
