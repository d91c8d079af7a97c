"""The GPU benchmark run: its sections in order, under a time budget."""
from __future__ import annotations

import datetime
import time

import hwoptim
from hwoptim import codegen
from hwoptim.rules import RULES

from ..workload import MODELS, bench_option_sets, model_shapes, option_name, plan_for
from ..tables import fmt_us
from . import measure, overhead
from .device import Budget, Context, free
from .kernels import prewarm
from .results import finish_models, finish_records, summary, write_reports

RULE_IMPLS = ("hwoptim-cupy", "hwoptim-cupy-elementwise", "floor", "torch-fused",
              "torch-foreach")
OVERHEAD_IMPLS = ("hwoptim-cupy", "hwoptim-cupy-capturable", "hwoptim-cupy-elementwise",
                  "torch-fused")
MODEL_IMPLS = ("hwoptim-cupy-flat", "hwoptim-cupy-per-tensor", "hwoptim-torch", "floor",
               "torch-fused", "torch-foreach")


def rule_cases(quick: bool, big: int) -> list:
    """(rule, kwargs, dtype, n): every rule, float32 Adam and AdamW at ``big`` elements,
    the rest at half (float64 at half again); the headline, Adam float32 default, first."""
    cases = []
    for dtype in ("float32",) if quick else ("float32", "float64"):
        for rule in RULES.values():
            for kw in ([{}] if quick else bench_option_sets(rule)):
                if plan_for(rule, kw).norms:       # not yet run on a GPU: tests first
                    continue
                elems = big if rule.name in ("Adam", "AdamW") else big // 2
                if dtype == "float64":
                    elems //= 2
                cases.append((rule, kw, dtype, elems))
    cases.sort(key=lambda c: (c[2] != "float32", c[0].name != "Adam", bool(c[1])))
    return cases


def _prewarm(cases, say) -> dict:
    rule_jobs = [(plan_for(r, kw), dt) for r, kw, dt, _ in cases]
    pw = prewarm(rule_jobs + [(codegen.floor_plan(p), dt) for p, dt in rule_jobs], rule_jobs)
    say(f"prewarm: {pw}")
    return pw


def _copy_section(ctx, big, result, say):
    try:
        copy = measure.copy(ctx, big * 4)
        result["records"] += copy
        copy_gbps = max(r["bytes"] / r["time_s"] / 1e9 for r in copy)
        say(f"copy: {copy_gbps:.0f} GB/s")
    except Exception as e:   # noqa: BLE001 - the fractions of copy are then left out
        copy_gbps = None
        result["copy_error"] = f"{type(e).__name__}: {e}"[:300]
        say(f"copy failed: {result['copy_error']}")
        free()
    result["copy_gbps"] = copy_gbps


def _rule_section(ctx, budget, selected, result, say):
    for rule, kw, dtype, n in selected:
        if budget.over(f"{rule.name}[{option_name(kw)}] {dtype}"):
            continue
        for impl in RULE_IMPLS:
            if impl.startswith("torch") and not ctx.torch_has(rule, impl):
                continue
            r = measure.rule_impl(ctx, rule, kw, dtype, n, impl)
            result["records"].append(r)
            say(f"{rule.name}[{option_name(kw)}] {dtype} n={n} {impl}: "
                + (f"{r['bytes'] / r['time_s'] / 1e9:.0f} GB/s" if r.get("time_s")
                   else r.get("error", "?")))


def _overhead_section(ctx, budget, quick, result, say):
    """Per-step overhead and launches of Adam at small sizes."""
    adam = RULES["Adam"]
    for n in ((10_000, 1_000_000) if quick else (10_000, 100_000, 1_000_000)):
        if budget.over(f"overhead n={n}"):
            break
        for impl in OVERHEAD_IMPLS:
            if impl.startswith("torch") and ctx.torch is None:
                continue
            r = overhead.overhead(ctx, adam, n, impl)
            result["overhead"].append(r)
            say(f"overhead n={n} {impl}: host {fmt_us(r.get('host_s'))} us, wall "
                f"{fmt_us(r.get('wall_s'))} us, launches {r.get('launches')}"
                + (f" {r['error']}" if r.get("error") else ""))


def _graph_section(ctx, budget, quick, small_model, result, say):
    """One Adam step captured in a CUDA graph and replayed: a vector, then the small model."""
    def report(label, r):
        result["capturable"].append(r)
        say(f"graph {label}: eager {fmt_us(r.get('eager_capturable_s'))} us, replay "
            f"{fmt_us(r.get('graph_s'))} us" + (f" {r['error']}" if r.get("error") else ""))

    for n in ((10_000,) if quick else (10_000, 1_000_000)):
        label = f"Adam float32 n={n}"
        if budget.over(f"graph {label}"):
            break

        def make(capturable, n=n):
            w, g = ctx.normal(n, "float32"), ctx.normal(n, "float32")
            return hwoptim.Adam(w, capturable=capturable), g
        report(label, overhead.graph(ctx, label, make))
    if not budget.over("graph model small per tensor"):
        def make_model(capturable):
            ps = [ctx.normal(s, "float32") for s in small_model]
            gs = [ctx.normal(s, "float32") for s in small_model]
            return hwoptim.Adam(ps, capturable=capturable), gs
        report("model", overhead.graph(
            ctx, f"Adam float32 model small, {len(small_model)} tensors", make_model,
            rep=20 if quick else 50))


def _formats_section(ctx, budget, big, result, say):
    """Adam in every storage format at the largest size, and torch's fused float32 Adam at
    that size (the rule section's record, or measured here), side by side."""
    adam = RULES["Adam"]
    torch_t = next((r["time_s"] for r in result["records"] if r.get("time_s") and
                    (r["rule"], r["options"], r["dtype"], r["n"], r["impl"]) ==
                    ("Adam", "default", "float32", big, "torch-fused")), None)
    if torch_t is None and ctx.torch_has(adam, "torch-fused"):
        torch_t = measure.rule_impl(ctx, adam, {}, "float32", big, "torch-fused").get("time_s")
    for label, dtype, opts in measure.FORMATS:
        if budget.over(f"format {label}"):
            continue
        r = measure.format_step(ctx, label, dtype, opts, big)
        r["frac_copy"] = (r["gbps"] / result["copy_gbps"]
                          if r.get("gbps") and result.get("copy_gbps") else None)
        r["vs_torch_fused_fp32"] = torch_t / r["time_s"] if torch_t and r.get("time_s") else None
        result["formats"].append(r)
        say(f"format {label} n={big}: " + (
            f"{r['time_s'] * 1e3:.3f} ms, {r['gbps']:.0f} GB/s, "
            f"{r['bytes'] / r['n']:.2f} B/element, state {r['state_bytes']:.2f} B/element"
            if r.get("time_s") else r.get("error", "?")))


def _adafactor_section(ctx, budget, big, result, say):
    """Adafactor on one square float32 matrix of about ``big`` elements (the staged
    kernels), beside torch.optim.Adafactor (foreach) on the same shape."""
    side = 1 << (int(big).bit_length() - 1) // 2
    recs = []
    for impl in ("hwoptim-cupy", "torch"):
        if budget.over(f"Adafactor {impl}"):
            continue
        r = measure.adafactor_step(ctx, side, impl)
        copy = result.get("copy_gbps")
        if r.get("time_s") and copy:
            r["frac_copy"] = r["gbps"] / copy
            r["frac_minimum"] = (measure.ADAFACTOR_BYTES["minimum"] * r["n"] / copy / 1e9
                                 / r["time_s"])
        recs.append(r)
        say(f"Adafactor {side}x{side} {impl}: " + (
            f"{r['time_s'] * 1e3:.3f} ms, {r['gbps']:.0f} GB/s of its 24 B/element"
            if r.get("time_s") else r.get("error", "?")))
    hw = next((r for r in recs if r["impl"] == "hwoptim-cupy" and r.get("time_s")), None)
    th = next((r for r in recs if r["impl"] == "torch" and r.get("time_s")), None)
    if hw and th:
        hw["vs_torch"] = th["time_s"] / hw["time_s"]
    result["adafactor"] = recs


def _model_section(ctx, budget, quick, small_model, result, say):
    """A step over a model's tensors by every implementation: the benchmark's model-like
    lists (Adam; SGD with momentum) and, where torch is here, the real models' shapes
    (AdamW)."""
    models = [("small", small_model, [(RULES["Adam"], {})])]
    if not quick:
        models.insert(0, ("large", model_shapes(MODELS["large"]),
                          [(RULES["Adam"], {}), (RULES["SGD"], {"momentum": 0.9})]))
        models[-1][2].append((RULES["SGD"], {"momentum": 0.9}))
    if ctx.torch is not None:
        from .. import real_models
        for name in ("gpt2-small", "resnet50"):
            try:
                models.append((name, real_models.shapes(name, ctx.torch),
                               [(RULES["AdamW"], {})]))
            except Exception as e:   # noqa: BLE001 - the other models still run
                say(f"model {name}: not built: {type(e).__name__}: {e}")
    for label, shapes, model_rules in models:
        for rule, kw in model_rules:
            if budget.over(f"model {label} {rule.name}"):
                continue
            recs = []
            for impl in MODEL_IMPLS:
                if impl.startswith("torch") and not ctx.torch_has(rule, impl):
                    continue
                if impl == "hwoptim-torch" and (ctx.torch is None or rule.torch is None):
                    continue
                r = measure.model(ctx, label, shapes, rule, kw, "float32", impl)
                recs.append(r)
                say(f"model {label} {rule.name} {impl}: "
                    + (f"{r['time_s'] * 1e3:.3f} ms, host {fmt_us(r.get('host_s'))} us, "
                       f"launches {r['launches']}"
                       if r.get("time_s") else r.get("error", "?")))
            result["models"] += finish_models(recs)


def run(quick: bool = False, out_dir: str | None = None, progress=None,
        budget_s: float | None = None, log2_n: int | None = None) -> dict:
    """Run the benchmark on CuPy's current device; see ``hwoptim.bench.gpu``.

    ``budget_s``: sections that would start after this many seconds are skipped (listed
    under ``"skipped"``). ``out_dir``: also write the JSON and Markdown reports there.
    ``log2_n``: the largest size (float32 Adam; default 28, quick 26)."""
    say = progress or (lambda msg: None)
    budget = Budget(budget_s, say)
    ctx = Context(quick)
    result = {"device": ctx.device_info(), "quick": bool(quick),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "copy_gbps": None, "records": [], "models": [], "overhead": [],
              "capturable": [], "formats": [], "adafactor": [],
              "skipped": budget.skipped}
    say(f"device: {result['device']}")

    big = 1 << (log2_n if log2_n is not None else (26 if quick else 28))
    cases = rule_cases(quick, big)
    result["prewarm"] = _prewarm(cases, say)
    _copy_section(ctx, big, result, say)
    _rule_section(ctx, budget, [c for c in cases if c[2] == "float32"], result, say)
    _formats_section(ctx, budget, big, result, say)
    _adafactor_section(ctx, budget, big, result, say)
    _overhead_section(ctx, budget, quick, result, say)
    small_model = model_shapes(MODELS["small"])   # the CPU report's tensors, as it times them
    result["model_shapes"] = ("large, small: hwoptim.bench.workload.model_shapes; gpt2-small, "
                              "resnet50: hwoptim.bench.real_models.shapes")
    _graph_section(ctx, budget, quick, small_model, result, say)
    _model_section(ctx, budget, quick, small_model, result, say)
    _rule_section(ctx, budget, [c for c in cases if c[2] != "float32"], result, say)

    finish_records(result["records"], result["copy_gbps"])
    result["seconds"] = time.perf_counter() - budget.t0
    result["summary"] = summary(result)
    if out_dir is not None:
        result["files"] = write_reports(result, out_dir)
    return result
