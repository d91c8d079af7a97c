"""NAdam (Dozat 2016, *Incorporating Nesterov Momentum into Adam*): Adam whose step looks one
momentum step ahead, with the momentum coefficient μₜ warmed up by ``momentum_decay``; the
product of the μₜ so far is carried from step to step (``mu_product``). torch.optim.NAdam's
math, with L2 or decoupled (``decoupled_weight_decay``, as NAdamW) weight decay."""
from ..spec import Carry, Hyper, Rule, State, ops, pair_in_unit_interval


def scalars(h, t):
    beta1, beta2 = h.betas
    mu = beta1 * (1 - 0.5 * 0.96 ** (t * h.momentum_decay))
    mu_next = beta1 * (1 - 0.5 * 0.96 ** ((t + 1) * h.momentum_decay))
    mu_product = h.mu_product * mu
    return dict(lr=h.lr, beta1=beta1, beta2=beta2, eps=h.eps, weight_decay=h.weight_decay,
                bias_correction2=1 - beta2 ** t, mu_product=mu_product,
                grad_step=-h.lr * (1 - mu) / (1 - mu_product),
                avg_step=-h.lr * mu_next / (1 - mu_product * mu_next))


def update(x, k, opt):
    g = -x.grad if opt.maximize else x.grad
    p = x.param
    if opt.decoupled_weight_decay:
        p = p * (1 - k.lr * k.weight_decay)
    elif opt.use_weight_decay:        # torch skips the term at 0: 0·Inf would be NaN
        g = g + k.weight_decay * p
    m = x.exp_avg + (1 - k.beta1) * (g - x.exp_avg)          # torch's lerp
    v = k.beta2 * x.exp_avg_sq + (1 - k.beta2) * g * g
    denom = ops.sqrt(v / k.bias_correction2) + k.eps
    p = p + k.grad_step * (g / denom)
    return {"exp_avg": m, "exp_avg_sq": v, "param": p + k.avg_step * (m / denom)}


RULE = Rule(
    name="NAdam",
    doc=__doc__,
    formula=("g ← ±g (+ λp, or p ← p(1−ηλ) if decoupled); μₜ = β₁(1 − ½·0.96^(tψ)); "
             "Πₜ = Πₜ₋₁μₜ; m ← m + (1−β₁)(g−m); v ← β₂v + (1−β₂)g²; "
             "d = √(v/(1−β₂ᵗ)) + ε; p ← p − η(1−μₜ)/(1−Πₜ)·g/d − ημₜ₊₁/(1−Πₜμₜ₊₁)·m/d"),
    hypers=dict(lr=Hyper(2e-3, doc="learning rate η"),
                betas=Hyper((0.9, 0.999), check=pair_in_unit_interval, doc="(β₁, β₂)"),
                eps=Hyper(1e-8, doc="ε"),
                weight_decay=Hyper(0.0, doc="weight decay λ"),
                momentum_decay=Hyper(4e-3, doc="momentum decay ψ")),
    options=dict(decoupled_weight_decay=False, maximize=False),
    states=(State("exp_avg", doc="m"), State("exp_avg_sq", doc="v")),
    carry=(Carry("mu_product", 1.0, doc="Πₜ, the product of the μ so far"),),
    scalars=scalars,
    update=update,
    flags=lambda h, opt: dict(use_weight_decay=h.weight_decay != 0),
    torch="NAdam",
    test_options=({}, {"weight_decay": 1e-2, "momentum_decay": 0.05},
                  {"decoupled_weight_decay": True, "weight_decay": 1e-2, "maximize": True}),
)
