"""AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay, on by default.
torch.optim.AdamW's math; the spec is Adam's."""
import dataclasses

from ..spec import Hyper
from .adam import RULE as ADAM

RULE = dataclasses.replace(
    ADAM,
    name="AdamW",
    doc=__doc__,
    formula=("Adam's, with decoupled weight decay always: p ← p(1−ηλ); m ← m + (1−β₁)(g−m); "
             "v ← β₂v + (1−β₂)g²; v̂ = max(v̂, v) if amsgrad; "
             "p ← p − η/(1−β₁ᵗ) · m/(√v̂/√(1−β₂ᵗ) + ε)"),
    hypers={**ADAM.hypers, "weight_decay": Hyper(1e-2, doc="decoupled weight decay λ")},
    options={k: v for k, v in ADAM.options.items() if k != "decoupled_weight_decay"},
    flags=lambda h, opt: dict(decoupled_weight_decay=True),
    torch="AdamW",
    test_options=({}, {"amsgrad": True}, {"maximize": True, "weight_decay": 0.1}),
)
