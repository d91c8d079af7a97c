"""LAMB (You et al. 2020, *Large Batch Optimization for Deep Learning*): Adam's update plus
decoupled weight decay, scaled per array by the trust ratio ‖p‖/‖u‖ (1 where either norm is
0), so every layer moves by about the same fraction of its weights. optax.lamb's variant
(``eps_root`` 0, φ the identity, no clipping of the ratio); ``trust_ratio=False`` on a group
(biases, norms) leaves its arrays unscaled, as optax's mask does."""
from ..spec import Hyper, Rule, State, ops, pair_in_unit_interval


def scalars(h, t):
    beta1, beta2 = h.betas
    # reciprocals, so the element does one divide: m̂ and v̂ within an ulp of optax's
    return dict(lr=h.lr, beta1=beta1, beta2=beta2, eps=h.eps, weight_decay=h.weight_decay,
                inv_bc1=1 / (1 - beta1 ** t), inv_bc2=1 / (1 - beta2 ** t))


def update(x, k, opt):
    g = -x.grad if opt.maximize else x.grad
    m = k.beta1 * x.exp_avg + (1 - k.beta1) * g
    v = k.beta2 * x.exp_avg_sq + (1 - k.beta2) * g * g
    u = (m * k.inv_bc1) / (ops.sqrt(v * k.inv_bc2) + k.eps)
    if opt.use_weight_decay:
        u = u + k.weight_decay * x.param
    if opt.trust_ratio:
        p_norm, u_norm = ops.norm(x.param), ops.norm(u)
        # optax's: 1 where a norm is 0, and a NaN norm gives a NaN ratio
        u = u * ops.where(p_norm <= 0, 1.0, ops.where(u_norm <= 0, 1.0, p_norm / u_norm))
    return {"exp_avg": m, "exp_avg_sq": v, "param": x.param - k.lr * u}


RULE = Rule(
    name="LAMB",
    doc=__doc__,
    formula=("g ← ±g; m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; "
             "u = (m/(1−β₁ᵗ))/(√(v/(1−β₂ᵗ)) + ε) + λp; "
             "p ← p − η·(‖p‖/‖u‖ if both > 0, else 1)·u (norms of the whole array)"),
    hypers=dict(lr=Hyper(1e-3, doc="learning rate η"),
                betas=Hyper((0.9, 0.999), check=pair_in_unit_interval, doc="(β₁, β₂)"),
                eps=Hyper(1e-6, doc="ε"),
                weight_decay=Hyper(0.0, doc="decoupled weight decay λ")),
    options=dict(trust_ratio=True, maximize=False),
    states=(State("exp_avg", doc="m"), State("exp_avg_sq", doc="v")),
    scalars=scalars,
    update=update,
    flags=lambda h, opt: dict(use_weight_decay=h.weight_decay != 0),
    test_options=({}, {"weight_decay": 1e-2, "maximize": True},
                  {"trust_ratio": False, "weight_decay": 1e-2}),
    differs="no torch.optim twin; optax.lamb's variant and defaults (eps 1e-6)",
)
