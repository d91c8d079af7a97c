"""Number formats and Markdown tables, shared by the CPU and GPU reports."""
from __future__ import annotations

import math


def fmt_n(n: int) -> str:
    """An element count: ``1e7``, ``5e7``, else with thousands separators."""
    e = int(math.floor(math.log10(n))) if n > 0 else 0
    m = n / 10 ** e
    return f"1e{e}" if m == 1 else (f"{m:g}e{e}" if m == int(m) else f"{n:,}")


def fmt_t(s) -> str:
    """Seconds as microseconds, three significant figures or so."""
    if s is None:
        return "—"
    us = s * 1e6
    return f"{us:.2f}" if us < 10 else f"{us:.1f}" if us < 100 else f"{us:,.0f}"


def fmt_x(x) -> str:
    return "—" if x is None else f"{x:.2f}×"


def fmt(v, spec=".3g") -> str:
    """A number in ``spec``, ``-`` for None, anything else as text."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def fmt_us(s) -> str:
    return "-" if s is None else f"{s * 1e6:.1f}"


def table(head, rows) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
