"""Print the rules table (formulas, state, defaults) from the specs, as Markdown."""
from __future__ import annotations

from .rules import RULES


def rules_table() -> str:
    rows = ["| rule | update (per element, step t) | state | defaults | differs from torch |",
            "| --- | --- | --- | --- | --- |"]
    for r in RULES.values():
        state = ", ".join(f"`{s.name}`" + (f" ({s.doc})" if s.doc else "") for s in r.states)
        state += "".join(f", `{c.name}` ({c.doc}; a host scalar)" for c in r.carry)
        defaults = ", ".join(f"{n}={h.default!r}" for n, h in r.hypers.items())
        if r.options:
            defaults += ", " + ", ".join(f"{n}={v}" for n, v in r.options.items())
        rows.append(f"| `{r.name}` | {r.formula} | {state} | {defaults} | "
                    f"{r.differs or '—'} |")
    return "\n".join(rows)


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    print(rules_table())
    return 0
