"""Adamax (Kingma & Ba 2015, section 7.1): Adam with the second moment replaced by an
exponentially weighted infinity norm, ``u ← max(β₂u, |g| + ε)``, which needs no bias
correction. torch.optim.Adamax's math (its ε inside the max, L2 weight decay)."""
from ..spec import Hyper, Rule, State, ops, pair_in_unit_interval


def scalars(h, t):
    beta1, beta2 = h.betas
    return dict(beta1=beta1, beta2=beta2, eps=h.eps, weight_decay=h.weight_decay,
                clr=h.lr / (1 - beta1 ** t))


def update(x, k, opt):
    g = -x.grad if opt.maximize else x.grad
    if opt.use_weight_decay:          # torch skips the term at 0: 0·Inf would be NaN
        g = g + k.weight_decay * x.param
    m = x.exp_avg + (1 - k.beta1) * (g - x.exp_avg)          # torch's lerp
    u = ops.maximum(k.beta2 * x.exp_inf, ops.abs(g) + k.eps)
    return {"exp_avg": m, "exp_inf": u, "param": x.param - k.clr * (m / u)}


RULE = Rule(
    name="Adamax",
    doc=__doc__,
    formula=("g ← ±g + λp; m ← m + (1−β₁)(g−m); u ← max(β₂u, |g| + ε); "
             "p ← p − η/(1−β₁ᵗ) · m/u"),
    hypers=dict(lr=Hyper(2e-3, doc="learning rate η"),
                betas=Hyper((0.9, 0.999), check=pair_in_unit_interval, doc="(β₁, β₂)"),
                eps=Hyper(1e-8, doc="ε"),
                weight_decay=Hyper(0.0, doc="L2 penalty λ")),
    options=dict(maximize=False),
    states=(State("exp_avg", doc="m"), State("exp_inf", doc="u")),
    scalars=scalars,
    update=update,
    flags=lambda h, opt: dict(use_weight_decay=h.weight_decay != 0),
    torch="Adamax",
    test_options=({}, {"weight_decay": 1e-2, "maximize": True}),
)
