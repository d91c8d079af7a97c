"""A rule for the tests only: every element operation the spec language has, so the code
printers (C/CUDA and Numba) are checked on operations no shipped rule uses yet (``sign``,
``abs``, ``minimum``, comparisons in ``where``). Not a real optimizer; never registered in
``hwoptim.rules``."""
from hwoptim.spec import Hyper, Rule, State, ops


def scalars(h, t):
    return dict(lr=h.lr, eps=h.eps, decay=h.decay ** t)


def update(x, k, opt):
    g = x.grad
    step = ops.sign(g) * k.lr + ops.where(g < x.acc, k.eps, -k.eps)    # sign, lt, neg
    big = ops.maximum(x.acc, ops.abs(g))                                  # max, abs
    small = ops.minimum(x.acc, -ops.abs(g))                               # min
    acc = ops.where(x.param >= 0, big, small) * k.decay                   # ge
    scale = ops.sqrt(ops.abs(acc) + k.eps)
    p = x.param - step / scale
    p = ops.where(g > 0, p, ops.where(g <= -1, p - k.eps, p + k.eps * 0.5))  # gt, le
    return {"acc": acc, "param": p}


RULE = Rule(
    name="EveryOp",
    doc=__doc__,
    formula="(tests only)",
    hypers=dict(lr=Hyper(1e-2), eps=Hyper(1e-3), decay=Hyper(0.99)),
    options={},
    states=(State("acc", init=0.5),),
    scalars=scalars,
    update=update,
)
