"""LARS (You, Gitman & Ginsburg 2017, *Large Batch Training of Convolutional Networks*): SGD
whose step for each array is scaled by the local rate c·‖p‖/(‖g‖ + λ‖p‖) (1 where either
norm is 0). The paper's form as torchlars (kakaobrain) implements it around torch.optim.SGD:
the grad plus L2 weight decay is scaled, then SGD's momentum (first step: the buffer is the
scaled grad) and step. ``trust_ratio=False`` on a group (biases, norms) is plain SGD."""
from ..spec import Hyper, Rule, State, ops


def scalars(h, t):
    first = t <= 1
    return dict(lr=h.lr, weight_decay=h.weight_decay, momentum=h.momentum,
                trust_coefficient=h.trust_coefficient, eps=h.eps,
                buf_decay=ops.where(first, 0.0, h.momentum),
                grad_part=ops.where(first, 1.0, 1 - h.dampening))


def update(x, k, opt):
    g = -x.grad if opt.maximize else x.grad
    d = g + k.weight_decay * x.param if opt.use_weight_decay else g
    if opt.trust_ratio:
        p_norm, g_norm = ops.norm(x.param), ops.norm(g)
        local = k.trust_coefficient * p_norm / (g_norm + k.weight_decay * p_norm + k.eps)
        d = d * ops.where(p_norm > 0, ops.where(g_norm > 0, local, 1.0), 1.0)
    out = {}
    if opt.use_momentum:
        buf = k.buf_decay * x.momentum_buffer + k.grad_part * d
        out["momentum_buffer"] = buf
        d = d + k.momentum * buf if opt.nesterov else buf
    out["param"] = x.param - k.lr * d
    return out


def check(h, opt):
    if opt.nesterov and (h.momentum <= 0 or h.dampening != 0):
        return [("nesterov", True, "momentum > 0 and dampening == 0 (Nesterov momentum "
                 f"needs them; got momentum={h.momentum}, dampening={h.dampening})")]
    return []


RULE = Rule(
    name="LARS",
    doc=__doc__,
    formula=("g ← ±g; d = (g + λp)·(c‖p‖/(‖g‖ + λ‖p‖ + ε) if both norms > 0, else 1); "
             "b ← μb + (1−τ)d (b₁ = d); p ← p − η·(d + μb if nesterov else b)"),
    hypers=dict(lr=Hyper(1e-3, doc="learning rate η"),
                momentum=Hyper(0.9, doc="momentum μ"),
                dampening=Hyper(0.0, doc="dampening τ"),
                weight_decay=Hyper(0.0, doc="L2 penalty λ"),
                trust_coefficient=Hyper(1e-3, doc="trust coefficient c"),
                eps=Hyper(1e-8, doc="ε")),
    options=dict(nesterov=False, trust_ratio=True, maximize=False),
    states=(State("momentum_buffer", when=lambda f: f.use_momentum, doc="b"),),
    scalars=scalars,
    update=update,
    flags=lambda h, opt: dict(use_momentum=h.momentum != 0,
                              use_weight_decay=h.weight_decay != 0),
    check=check,
    test_options=({}, {"weight_decay": 1e-2, "nesterov": True},
                  {"momentum": 0.0, "maximize": True, "weight_decay": 1e-3},
                  {"trust_ratio": False, "dampening": 0.1}),
    differs="no torch.optim twin; torchlars' variant (around torch.optim.SGD)",
)
