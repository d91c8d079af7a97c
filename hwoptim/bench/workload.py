"""What the benchmark runs: rules with their option sets, sizes, dtypes, model-like tensor
lists, and the bytes a step must move. Shared by the CPU and the GPU runs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hwoptim import codegen
from hwoptim.rules import RULES

# the heaviest option set of each rule: the most arrays and the most math
HEAVY = {
    "Adam": {"amsgrad": True},
    "AdamW": {"amsgrad": True},
    "RMSprop": {"centered": True, "momentum": 0.9},
    "SGD": {"momentum": 0.9, "nesterov": True},
}
HEAVIEST = HEAVY          # the GPU benchmark's name for it
SIZES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000, 50_000_000)
DTYPES = ("float32", "float64")
MODELS = {"small": 1_000_000, "large": 50_000_000}   # ~200 tensors with this many elements
MODEL_TENSORS = 200


@dataclass(frozen=True)
class Case:
    """One rule with one option set: ``options`` is "default" or "k=v,..."."""
    rule: str
    options: str
    kwargs: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def label(self) -> str:
        return self.rule if self.options == "default" else f"{self.rule}[{self.options}]"


def options_text(kwargs: dict) -> str:
    """``"default"`` or ``"k=v,k=v"``: the names ``hwoptim.testing.option_sets`` uses."""
    return ",".join(f"{k}={v}" for k, v in kwargs.items()) or "default"


option_name = options_text     # the GPU benchmark's name for it


def cases(rules=None, which: str = "all") -> list:
    """Cases for ``rules`` (names, any case; None: every rule): ``which`` is "default",
    "heavy" (the heaviest option set, or default for a rule without one) or "all"."""
    by_lower = {n.lower(): n for n in RULES}
    names = list(RULES) if not rules else []
    for r in rules or ():
        if r.lower() not in by_lower:
            raise ValueError(f"no rule is called {r!r}; the rules are {', '.join(RULES)}")
        names.append(by_lower[r.lower()])
    out = []
    for n in names:
        sets = []
        if which in ("default", "all") or n not in HEAVY:
            sets.append({})
        if which in ("heavy", "all") and n in HEAVY:
            sets.append(HEAVY[n])
        out += [Case(n, options_text(s), dict(s)) for s in sets]
    return out


def rule_of(case: Case):
    return RULES[case.rule]


def hypers_of(case: Case) -> dict:
    """Every numeric hyperparameter (the spec's defaults, overridden by the case)."""
    rule = rule_of(case)
    h = {n: hy.default for n, hy in rule.hypers.items()}
    h.update({k: v for k, v in case.kwargs.items() if k in rule.hypers})
    return h


def split_kwargs(rule, kwargs: dict):
    """(hypers, options, static flags) of one option set of ``rule``."""
    h = {n: hy.default for n, hy in rule.hypers.items()}
    opt = dict(rule.options)
    for k, v in kwargs.items():
        (opt if k in rule.options else h)[k] = v
    return h, opt, rule.static_flags(h, opt)


def plan_for(rule, kwargs: dict) -> codegen.KernelPlan:
    """The kernel plan an optimizer of ``rule`` with options ``kwargs`` runs."""
    return codegen.plan(rule, split_kwargs(rule, kwargs)[2])


def plan_of(case: Case) -> codegen.KernelPlan:
    """The kernel plan an optimizer with ``case``'s options runs."""
    return plan_for(rule_of(case), case.kwargs)


def bytes_per_element(plan, dtype) -> int:
    """Bytes one step must move per element: every array read, every array written."""
    # a rule taking norms (LAMB, LARS) reads its reduction pass's arrays once more
    return ((len(plan.reads) + len(plan.reduce_reads) + len(plan.outputs))
            * np.dtype(dtype).itemsize)


def bytes_moved(plan, dtype, n: int) -> int:
    """Bytes a step must move: each array it reads and each it writes, once."""
    return bytes_per_element(plan, dtype) * int(n)


def group_bytes(plan, dtype, n: int, impls: int, with_numpy: bool) -> int:
    """Memory one measured group holds: the shared grad and initial params, every
    implementation's params and state, and the numpy backend's temporaries."""
    per_impl = len(plan.arrays) - 1
    return int(n) * np.dtype(dtype).itemsize * (2 + per_impl * impls
                                                + (len(plan.order) if with_numpy else 0))


def bench_option_sets(rule) -> list:
    """The default option set, plus the heaviest one when it moves more arrays than the
    default: ``HEAVY`` (Adam amsgrad, RMSprop centered + momentum, SGD nesterov), else
    the spec's test option set with the most arrays (then the most operations)."""
    def arrays(o):
        p = plan_for(rule, o)
        return len(p.reads) + len(p.outputs)
    heavy = HEAVY.get(rule.name)
    if heavy is None:
        heavy = max((dict(o) for o in rule.test_options),
                    key=lambda o: (arrays(o), len(plan_for(rule, o).order)))
    out = [{}]
    if arrays(heavy) > arrays({}):
        out.append(dict(heavy))
    return out


def model_shapes(total: int, tensors: int = MODEL_TENSORS) -> list:
    """``tensors`` shapes like a stack of transformer-ish layers (a weight and a bias per
    layer, widths d, 4d, 3d) with about ``total`` elements in all."""
    layers = tensors // 2
    pattern = [(1, 1), (1, 4), (4, 1), (1, 3)]        # (rows/d, cols/d)
    per = sum(a * b for a, b in pattern) / len(pattern)
    d = max(1, round(math.sqrt(total / (layers * per))))
    shapes = []
    for i in range(layers):
        a, b = pattern[i % len(pattern)]
        shapes += [(a * d, b * d), (a * d,)]
    return shapes[:tensors]
