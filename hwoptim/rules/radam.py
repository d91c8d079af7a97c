"""RAdam (Liu et al. 2020, *On the Variance of the Adaptive Learning Rate and Beyond*):
Adam whose adaptive step is switched on only once the variance of its second moment is
tractable (ρₜ > 5), and then scaled by the rectification term rₜ; before that, SGD with
bias-corrected momentum. torch.optim.RAdam's math, in the form of its capturable path (one
kernel for both branches, the branch chosen per step on the host)."""
from ..spec import Hyper, Rule, State, ops, pair_in_unit_interval


def scalars(h, t):
    beta1, beta2 = h.betas
    bc2 = 1 - beta2 ** t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2 ** t / bc2
    # rₜ only matters where ρₜ > 5, so ρ∞ > 5 there: elsewhere a harmless denominator
    den = ops.where(rho_inf > 5.0, (rho_inf - 4) * (rho_inf - 2) * rho_t, 1.0)
    rect = ops.sqrt(ops.maximum((rho_t - 4) * (rho_t - 2) * rho_inf / den, 0.0))
    return dict(lr=h.lr, beta1=beta1, beta2=beta2, eps=h.eps, weight_decay=h.weight_decay,
                bias_correction1=1 - beta1 ** t, bias_correction2_sqrt=ops.sqrt(bc2),
                rect=rect, rectify=ops.where(rho_t > 5.0, 1.0, 0.0))


def update(x, k, opt):
    g = -x.grad if opt.maximize else x.grad
    p = x.param
    if opt.decoupled_weight_decay:
        p = p * (1 - k.lr * k.weight_decay)
    elif opt.use_weight_decay:        # torch skips the term at 0: 0·Inf would be NaN
        g = g + k.weight_decay * p
    m = x.exp_avg + (1 - k.beta1) * (g - x.exp_avg)          # torch's lerp
    v = k.beta2 * x.exp_avg_sq + (1 - k.beta2) * g * g
    adaptive = k.rect * (k.bias_correction2_sqrt / (ops.sqrt(v) + k.eps))
    scale = ops.where(k.rectify > 0, adaptive, 1.0)
    return {"exp_avg": m, "exp_avg_sq": v,
            "param": p - m / k.bias_correction1 * k.lr * scale}


RULE = Rule(
    name="RAdam",
    doc=__doc__,
    formula=("g ← ±g (+ λp, or p ← p(1−ηλ) if decoupled); m ← m + (1−β₁)(g−m); "
             "v ← β₂v + (1−β₂)g²; ρₜ = ρ∞ − 2tβ₂ᵗ/(1−β₂ᵗ); "
             "p ← p − η·m/(1−β₁ᵗ) · (rₜ√(1−β₂ᵗ)/(√v + ε) if ρₜ > 5, else 1)"),
    hypers=dict(lr=Hyper(1e-3, doc="learning rate η"),
                betas=Hyper((0.9, 0.999), check=pair_in_unit_interval, doc="(β₁, β₂)"),
                eps=Hyper(1e-8, doc="ε"),
                weight_decay=Hyper(0.0, doc="weight decay λ")),
    options=dict(decoupled_weight_decay=False, maximize=False),
    states=(State("exp_avg", doc="m"), State("exp_avg_sq", doc="v")),
    scalars=scalars,
    update=update,
    flags=lambda h, opt: dict(use_weight_decay=h.weight_decay != 0),
    torch="RAdam",
    test_options=({}, {"weight_decay": 1e-2},
                  {"decoupled_weight_decay": True, "weight_decay": 1e-2, "maximize": True}),
)
