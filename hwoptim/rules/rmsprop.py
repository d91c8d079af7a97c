"""RMSProp (Tieleman & Hinton 2012): divide each step by the root of an exponentially
decaying average of squared gradients. torch.optim.RMSprop's math, with two differences:
centered RMSProp clamps the variance estimate at 0 (torch takes the root of a negative
rounding residue and returns NaN), and ``eps_in_sqrt=True`` gives the textbook
``g / sqrt(eps + r)``."""
from ..spec import Hyper, Rule, State, ops


def scalars(h, t):
    return dict(lr=h.lr, alpha=h.alpha, eps=h.eps, weight_decay=h.weight_decay,
                momentum=h.momentum)


def update(x, k, opt):
    g = -x.grad if opt.maximize else x.grad
    if opt.use_weight_decay:          # torch skips the term at 0: 0·Inf would be NaN
        g = g + k.weight_decay * x.param
    v = k.alpha * x.square_avg + (1 - k.alpha) * g * g
    out = {"square_avg": v}
    if opt.centered:
        m = x.grad_avg + (1 - k.alpha) * (g - x.grad_avg)   # torch's lerp
        out["grad_avg"] = m
        v = ops.maximum(v - m * m, 0.0)
    avg = ops.sqrt(v + k.eps) if opt.eps_in_sqrt else ops.sqrt(v) + k.eps
    if opt.use_momentum:
        buf = k.momentum * x.momentum_buffer + g / avg
        out["momentum_buffer"] = buf
        out["param"] = x.param - k.lr * buf
    else:
        out["param"] = x.param - k.lr * (g / avg)
    return out


RULE = Rule(
    name="RMSprop",
    doc=__doc__,
    formula=("g ← ±g + λp; r ← αr + (1−α)g²; centered: m ← m + (1−α)(g−m), "
             "r̂ = max(r − m², 0); d = √r̂ + ε (or √(r̂+ε)); "
             "b ← μb + g/d, p ← p − ηb (μ > 0) else p ← p − η·g/d"),
    hypers=dict(lr=Hyper(1e-2, doc="learning rate η"),
                alpha=Hyper(0.99, doc="smoothing α (the lesson's ρ)"),
                eps=Hyper(1e-8, doc="ε"),
                weight_decay=Hyper(0.0, doc="L2 penalty λ"),
                momentum=Hyper(0.0, doc="momentum μ")),
    options=dict(centered=False, maximize=False, eps_in_sqrt=False),
    states=(State("square_avg", doc="r"),
            State("grad_avg", when=lambda f: f.centered, doc="m"),
            State("momentum_buffer", when=lambda f: f.use_momentum, doc="b")),
    scalars=scalars,
    update=update,
    flags=lambda h, opt: dict(use_momentum=h.momentum > 0,
                              use_weight_decay=h.weight_decay != 0),
    torch="RMSprop",
    torch_skip=("eps_in_sqrt",),
    differs="centered clamps r − m² at 0 (torch: NaN when rounding makes it negative); "
            "eps_in_sqrt is hwoptim's",
    test_options=({}, {"centered": True}, {"momentum": 0.9},
                  {"centered": True, "momentum": 0.9, "weight_decay": 1e-2},
                  {"eps_in_sqrt": True}, {"maximize": True}),
)
