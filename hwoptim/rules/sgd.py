"""Stochastic gradient descent, with heavy-ball momentum or Nesterov momentum.

torch.optim.SGD's math (Sutskever et al. 2013 for the momentum form). As in torch, the first
step sets the momentum buffer to the gradient, after maximize and weight decay, undamped.
"""
from ..spec import Hyper, Rule, State, ops


def scalars(h, t):
    first = t <= 1
    return dict(lr=h.lr, weight_decay=h.weight_decay, momentum=h.momentum,
                # on the first step buf = 0·buf + 1·g = g exactly, with no branch per element
                buf_decay=ops.where(first, 0.0, h.momentum),
                grad_scale=ops.where(first, 1.0, 1 - h.dampening))


def update(x, k, opt):
    g = -x.grad if opt.maximize else x.grad
    if opt.use_weight_decay:          # torch skips the term at 0: 0·Inf would be NaN
        g = g + k.weight_decay * x.param
    out = {}
    if opt.use_momentum:
        buf = k.buf_decay * x.momentum_buffer + k.grad_scale * g
        out["momentum_buffer"] = buf
        g = g + k.momentum * buf if opt.nesterov else buf
    out["param"] = x.param - k.lr * g
    return out


def check(h, opt):
    bad = []
    if opt.nesterov and (h.momentum <= 0 or h.dampening != 0):
        bad.append(("nesterov", True, "momentum > 0 and dampening == 0 (Nesterov momentum "
                    f"needs them; got momentum={h.momentum}, dampening={h.dampening})"))
    return bad


RULE = Rule(
    name="SGD",
    doc=__doc__,
    formula=("g ← ±g + λp; b ← μb + (1−τ)g (b₁ = g); "
             "p ← p − η·(g + μb if nesterov else b); without momentum p ← p − η·g"),
    hypers=dict(lr=Hyper(1e-3, doc="learning rate η"),
                momentum=Hyper(0.0, doc="momentum μ"),
                dampening=Hyper(0.0, doc="dampening τ"),
                weight_decay=Hyper(0.0, doc="L2 penalty λ")),
    options=dict(nesterov=False, maximize=False),
    states=(State("momentum_buffer", when=lambda f: f.use_momentum, doc="b"),),
    scalars=scalars,
    update=update,
    flags=lambda h, opt: dict(use_momentum=h.momentum != 0,
                              use_weight_decay=h.weight_decay != 0),
    check=check,
    torch="SGD",
    test_options=({}, {"momentum": 0.9},
                  {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2},
                  {"momentum": 0.9, "nesterov": True},
                  {"maximize": True, "weight_decay": 1e-2}),
)
