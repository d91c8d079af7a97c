"""Update-rule specs, one module each. Every module here that defines ``RULE`` is a rule.

Adding a rule is adding a module: the optimizer class, every backend's kernels, the docs
table and the cross-backend tests all come from the spec.
"""
import importlib
import pkgutil

from ..spec import Rule

RULES: dict[str, Rule] = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    _mod = importlib.import_module(f"{__name__}.{_info.name}")
    if isinstance(getattr(_mod, "RULE", None), Rule):
        RULES[_mod.RULE.name] = _mod.RULE
