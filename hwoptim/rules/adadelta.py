"""Adadelta (Zeiler 2012): RMSProp whose step is scaled by a running average of past
squared updates, so the units of the update match the parameter's. torch.optim.Adadelta's
math."""
from ..spec import Hyper, Rule, State, ops, unit_interval


def scalars(h, t):
    return dict(lr=h.lr, rho=h.rho, eps=h.eps, weight_decay=h.weight_decay)


def update(x, k, opt):
    g = -x.grad if opt.maximize else x.grad
    if opt.use_weight_decay:          # torch skips the term at 0: 0·Inf would be NaN
        g = g + k.weight_decay * x.param
    v = k.rho * x.square_avg + (1 - k.rho) * g * g
    delta = ops.sqrt(x.acc_delta + k.eps) / ops.sqrt(v + k.eps) * g
    return {"square_avg": v,
            "acc_delta": k.rho * x.acc_delta + (1 - k.rho) * delta * delta,
            "param": x.param - k.lr * delta}


RULE = Rule(
    name="Adadelta",
    doc=__doc__,
    formula=("g ← ±g + λp; r ← ρr + (1−ρ)g²; Δ = √(a + ε)/√(r + ε) · g; "
             "a ← ρa + (1−ρ)Δ²; p ← p − ηΔ"),
    hypers=dict(lr=Hyper(1.0, doc="learning rate η"),
                rho=Hyper(0.9, check=unit_interval, doc="decay ρ"),
                eps=Hyper(1e-6, doc="ε"),
                weight_decay=Hyper(0.0, doc="L2 penalty λ")),
    options=dict(maximize=False),
    states=(State("square_avg", doc="r"), State("acc_delta", doc="a")),
    scalars=scalars,
    update=update,
    flags=lambda h, opt: dict(use_weight_decay=h.weight_decay != 0),
    torch="Adadelta",
    test_options=({}, {"weight_decay": 1e-2, "maximize": True}),
)
