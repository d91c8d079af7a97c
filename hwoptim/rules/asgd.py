"""ASGD (Polyak & Juditsky 1992; step sizes after Bottou 2012): SGD with a decaying step
ηₜ = η/(1 + ληt)^α and a running average ``ax`` of the iterates, which is the estimate to use
once averaging starts at step t₀. torch.optim.ASGD's math: the step size ``eta`` and the
averaging weight ``mu`` a step uses were set by the step before (carried host scalars)."""
from ..spec import Carry, Hyper, Rule, State, ops


def _real(v):
    return None  # check_value has already made it a finite real number


def scalars(h, t):
    return dict(eta_now=h.eta, mu_now=h.mu, decay=1 - h.lambd * h.eta,
                average=ops.where(h.mu < 1.0, 1.0, 0.0), weight_decay=h.weight_decay,
                eta=h.lr / (1 + h.lambd * h.lr * t) ** h.alpha,
                mu=1 / ops.maximum(1.0, t - h.t0))


def update(x, k, opt):
    g = -x.grad if opt.maximize else x.grad
    if opt.use_weight_decay:          # torch skips the term at 0: 0·Inf would be NaN
        g = g + k.weight_decay * x.param
    p = x.param * k.decay - k.eta_now * g
    ax = ops.where(k.average > 0, x.ax + (p - x.ax) * k.mu_now, p)
    return {"param": p, "ax": ax}


RULE = Rule(
    name="ASGD",
    doc=__doc__,
    formula=("g ← ±g (+ λ₂p); p ← p(1 − ληₜ) − ηₜg; ā ← ā + μₜ(p − ā) (ā ← p while μₜ = 1); "
             "then ηₜ₊₁ = η/(1 + ληt)^α, μₜ₊₁ = 1/max(1, t − t₀)"),
    hypers=dict(lr=Hyper(1e-2, doc="learning rate η"),
                lambd=Hyper(1e-4, doc="decay term λ"),
                alpha=Hyper(0.75, check=_real, doc="power α of the step-size decay"),
                t0=Hyper(1e6, check=_real, doc="step t₀ at which averaging starts"),
                weight_decay=Hyper(0.0, doc="weight decay λ₂")),
    options=dict(maximize=False),
    states=(State("ax", doc="ā, the averaged params"),),
    carry=(Carry("eta", "lr", doc="ηₜ, this step's step size (η at the first)"),
           Carry("mu", 1.0, doc="μₜ, this step's averaging weight")),
    scalars=scalars,
    update=update,
    flags=lambda h, opt: dict(use_weight_decay=h.weight_decay != 0),
    torch="ASGD",
    differs=("`eta, mu` in float64 in the native classes (torch: its default dtype, float32 "
             "unless changed); `hwoptim.torch` keeps torch's 0-d tensors"),
    test_options=({}, {"weight_decay": 1e-2, "maximize": True, "t0": 3.0, "lambd": 0.5},
                  {"t0": 0.0, "alpha": 0.5, "lambd": 1e-2}),
)
