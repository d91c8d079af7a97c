"""AdaGrad (Duchi, Hazan & Singer 2011): divide each step by the root of the sum of all past
squared gradients. torch.optim.Adagrad's math, including its learning-rate decay."""
from ..spec import Hyper, Rule, State, ops


def scalars(h, t):
    return dict(clr=h.lr / (1 + (t - 1) * h.lr_decay), eps=h.eps,
                weight_decay=h.weight_decay)


def update(x, k, opt):
    g = -x.grad if opt.maximize else x.grad
    if opt.use_weight_decay:          # torch skips the term at 0: 0·Inf would be NaN
        g = g + k.weight_decay * x.param
    s = x.sum + g * g
    return {"sum": s, "param": x.param - k.clr * (g / (ops.sqrt(s) + k.eps))}


RULE = Rule(
    name="Adagrad",
    doc=__doc__,
    formula="g ← ±g + λp; r ← r + g²; p ← p − η/(1+(t−1)·δ) · g/(√r + ε)",
    hypers=dict(lr=Hyper(1e-2, doc="learning rate η"),
                lr_decay=Hyper(0.0, doc="learning-rate decay δ"),
                weight_decay=Hyper(0.0, doc="L2 penalty λ"),
                initial_accumulator_value=Hyper(0.0, doc="initial r"),
                eps=Hyper(1e-10, doc="ε")),
    options=dict(maximize=False),
    states=(State("sum", init="initial_accumulator_value", doc="r"),),
    scalars=scalars,
    update=update,
    flags=lambda h, opt: dict(use_weight_decay=h.weight_decay != 0),
    torch="Adagrad",
    test_options=({}, {"lr_decay": 1e-2, "weight_decay": 1e-2,
                       "initial_accumulator_value": 0.1},
                  {"maximize": True}),
)
