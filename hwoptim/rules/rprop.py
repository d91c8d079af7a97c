"""Rprop (Riedmiller & Braun 1993): each element keeps its own step size, grown by η₊ while
the gradient keeps its sign and shrunk by η₋ when it flips (that step is then skipped); the
update uses only the gradient's sign. torch.optim.Rprop's math (the step size clamped to
``step_sizes`` every step, a flipped gradient stored as 0), including what torch does with a
NaN gradient: its sign is 0, so that element neither steps nor changes its step size."""
import numbers

from ..spec import Hyper, Rule, State, ops


def _etas(v):
    ok = (isinstance(v, (tuple, list)) and len(v) == 2
          and all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in v)
          and 0 < v[0] < 1 < v[1])
    return None if ok else "a pair (etaminus, etaplus) with 0 < etaminus < 1 < etaplus"


def _step_sizes(v):
    ok = (isinstance(v, (tuple, list)) and len(v) == 2
          and all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in v)
          and 0 <= v[0] <= v[1])
    return None if ok else "a pair (min, max) with 0 <= min <= max"


def scalars(h, t):
    etaminus, etaplus = h.etas
    step_min, step_max = h.step_sizes
    return dict(etaminus=etaminus, etaplus=etaplus, step_min=step_min, step_max=step_max)


def update(x, k, opt):
    g = -x.grad if opt.maximize else x.grad
    s = ops.sign(g * x.prev)          # 0 for NaN, as torch.sign: a NaN changes nothing
    # η₊ where the sign held, η₋ where it flipped, 1 where either is 0
    factor = ops.where(s > 0, k.etaplus, ops.where(s < 0, k.etaminus, 1.0))
    size = ops.minimum(ops.maximum(x.step_size * factor, k.step_min), k.step_max)
    g = ops.where(s < 0, 0.0, g)              # a flipped gradient: no step, and forgotten
    return {"prev": g, "step_size": size, "param": x.param - ops.sign(g) * size}


RULE = Rule(
    name="Rprop",
    doc=__doc__,
    formula=("g ← ±g; s = sign(g·g₋); η ← clamp(η·(η₊ if s > 0, η₋ if s < 0, else 1), "
             "Γmin, Γmax); g ← 0 where s < 0; p ← p − sign(g)·η; g₋ ← g"),
    hypers=dict(lr=Hyper(1e-2, doc="initial step size η₀"),
                etas=Hyper((0.5, 1.2), check=_etas, doc="(η₋, η₊)"),
                step_sizes=Hyper((1e-6, 50.0), check=_step_sizes, doc="(Γmin, Γmax)")),
    options=dict(maximize=False),
    states=(State("prev", doc="g₋, the last gradient"),
            State("step_size", init="lr", doc="η, per element")),
    scalars=scalars,
    update=update,
    torch="Rprop",
    test_options=({}, {"maximize": True, "etas": (0.3, 1.5), "step_sizes": (1e-4, 0.5)}),
)
