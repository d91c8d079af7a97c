"""Lion (Chen et al. 2023, *Symbolic Discovery of Optimization Algorithms*): the update is
the sign of an interpolation between the momentum and the gradient, so every element moves
by exactly the learning rate; the momentum is updated after, with its own β₂. Decoupled
weight decay. Defaults as the paper's and optax's ``lion`` (lr 1e-4, β = (0.9, 0.99),
weight decay 0): no torch.optim twin. A NaN in the interpolation has sign 0 (as torch.sign)."""
from ..spec import Hyper, Rule, State, ops, pair_in_unit_interval


def scalars(h, t):
    beta1, beta2 = h.betas
    return dict(lr=h.lr, beta1=beta1, beta2=beta2, weight_decay=h.weight_decay)


def update(x, k, opt):
    g = -x.grad if opt.maximize else x.grad
    c = k.beta1 * x.exp_avg + (1 - k.beta1) * g
    p = x.param * (1 - k.lr * k.weight_decay) if opt.use_weight_decay else x.param
    return {"exp_avg": k.beta2 * x.exp_avg + (1 - k.beta2) * g,
            "param": p - k.lr * ops.sign(c)}


RULE = Rule(
    name="Lion",
    doc=__doc__,
    formula=("g ← ±g; c = β₁m + (1−β₁)g; p ← p(1−ηλ) − η·sign(c); "
             "m ← β₂m + (1−β₂)g"),
    hypers=dict(lr=Hyper(1e-4, doc="learning rate η"),
                betas=Hyper((0.9, 0.99), check=pair_in_unit_interval, doc="(β₁, β₂)"),
                weight_decay=Hyper(0.0, doc="decoupled weight decay λ")),
    options=dict(maximize=False),
    states=(State("exp_avg", doc="m"),),
    scalars=scalars,
    update=update,
    flags=lambda h, opt: dict(use_weight_decay=h.weight_decay != 0),
    test_options=({}, {"weight_decay": 1e-2, "maximize": True}),
    differs="no torch.optim twin; the paper's and optax's defaults",
)
