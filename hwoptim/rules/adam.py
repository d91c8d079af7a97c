"""Adam (Kingma & Ba 2015): RMSProp with momentum and a bias correction for the cold start.
torch.optim.Adam's math: ``denom = sqrt(v)/sqrt(1-β2^t) + eps``, step ``lr/(1-β1^t)``;
L2 weight decay, or decoupled ``p ← p·(1 − lr·wd)`` (Loshchilov & Hutter 2019); AMSGrad
(Reddi et al. 2018) keeps the running maximum of ``v``."""
from ..spec import Hyper, Rule, State, ops, pair_in_unit_interval


def scalars(h, t):
    beta1, beta2 = h.betas
    return dict(lr=h.lr, beta1=beta1, beta2=beta2, eps=h.eps, weight_decay=h.weight_decay,
                step_size=h.lr / (1 - beta1 ** t),
                bias_correction2_sqrt=ops.sqrt(1 - beta2 ** t))


def update(x, k, opt):
    g = -x.grad if opt.maximize else x.grad
    p = x.param
    if opt.decoupled_weight_decay:
        p = p * (1 - k.lr * k.weight_decay)
    elif opt.use_weight_decay:        # torch skips the term at 0: 0·Inf would be NaN
        g = g + k.weight_decay * p
    m = x.exp_avg + (1 - k.beta1) * (g - x.exp_avg)          # torch's lerp
    v = k.beta2 * x.exp_avg_sq + (1 - k.beta2) * g * g
    out = {"exp_avg": m, "exp_avg_sq": v}
    if opt.amsgrad:
        v = ops.maximum(x.max_exp_avg_sq, v)
        out["max_exp_avg_sq"] = v
    denom = ops.sqrt(v) / k.bias_correction2_sqrt + k.eps
    out["param"] = p - k.step_size * (m / denom)
    return out


RULE = Rule(
    name="Adam",
    doc=__doc__,
    formula=("g ← ±g (+ λp, or p ← p(1−ηλ) if decoupled); m ← m + (1−β₁)(g−m); "
             "v ← β₂v + (1−β₂)g²; v̂ = max(v̂, v) if amsgrad; "
             "p ← p − η/(1−β₁ᵗ) · m/(√v̂/√(1−β₂ᵗ) + ε)"),
    hypers=dict(lr=Hyper(1e-3, doc="learning rate η"),
                betas=Hyper((0.9, 0.999), check=pair_in_unit_interval, doc="(β₁, β₂)"),
                eps=Hyper(1e-8, doc="ε"),
                weight_decay=Hyper(0.0, doc="weight decay λ")),
    options=dict(amsgrad=False, maximize=False, decoupled_weight_decay=False),
    states=(State("exp_avg", doc="m"), State("exp_avg_sq", doc="v"),
            State("max_exp_avg_sq", when=lambda f: f.amsgrad, doc="v̂")),
    scalars=scalars,
    update=update,
    flags=lambda h, opt: dict(use_weight_decay=h.weight_decay != 0),
    torch="Adam",
    test_options=({}, {"amsgrad": True}, {"weight_decay": 1e-2},
                  {"decoupled_weight_decay": True, "weight_decay": 1e-2},
                  {"maximize": True, "amsgrad": True}),
)
