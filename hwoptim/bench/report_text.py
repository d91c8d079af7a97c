"""The CPU report as Markdown, and its summary for the console."""
from __future__ import annotations

import json
import re

from .files import json_default
from .tables import fmt_n, fmt_t, fmt_x, table


def timed(records):
    return [r for r in records if r.get("time_s") and r.get("gbps")]


def groups(records):
    """{(device, rule, options, dtype, n): {impl: record}} in first-seen order."""
    g = {}
    for r in timed(records):
        g.setdefault((r["device"], r["rule"], r["options"], r["dtype"], r["n"]),
                     {})[r["impl"]] = r
    return g


def best_hwoptim(by_impl: dict):
    """The row a summary shows: the backend hwoptim picks by default (numba on a CPU,
    cupy on a GPU), else the fastest hwoptim implementation there is."""
    for pref in ("hwoptim-numba", "hwoptim-cupy"):
        if pref in by_impl:
            return by_impl[pref]
    hw = [r for k, r in by_impl.items() if k.startswith("hwoptim-")]
    return min(hw, key=lambda r: r["time_s"]) if hw else None


NOISY = " (noisy)"


def flag(rec, key) -> str:
    """``" (noisy)"`` where ``rec``'s figure ``key`` was flagged (``timing.compare``)."""
    return NOISY if key in (rec.get("noisy") or ()) else ""


def fmt_time(rec) -> str:
    """A record's median µs per step with its interquartile range: ``27.7 [27.1–28.4]``."""
    t = fmt_t(rec.get("time_s"))
    if rec.get("time_q1_s") is not None and rec.get("time_q3_s") is not None:
        t += f" [{fmt_t(rec['time_q1_s'])}–{fmt_t(rec['time_q3_s'])}]"
    return t + flag(rec, "time_s")


def noisy_note(records) -> str | None:
    """A line saying how many figures were flagged noisy, or None."""
    rs = timed(records)
    flagged = sum(len(r.get("noisy") or ()) for r in rs)
    if not flagged:
        return None
    return (f"noisy run: {flagged} figures in {len(rs)} timed rows are marked (noisy): a "
            f"time's interquartile range is over 10% of its median, or the median of "
            f"per-round ratios differs from the ratio of the medians by over 10%. Another "
            f"process probably shared the cores; rerun on a quiet machine.")


def summary_rows(records, cpu=None, torch_missing=None) -> list:
    rows = []
    for (dev, rule, opts, dtype, n), by in groups(records).items():
        hw = best_hwoptim(by)
        fl = by.get("floor")
        if hw is None:
            continue
        tb = hw.get("torch_best")
        impl = hw["impl"].replace("hwoptim-", "")
        if hw.get("kernel"):
            impl += f" ({hw['kernel']})"
        if cpu is not None and dev != cpu:
            impl += f" on {dev}"
        nb = by.get("hwoptim-numba")
        rows.append([rule, opts, dtype, fmt_n(n), impl,
                     fmt_time(hw), f"{hw['gbps']:.1f}",
                     fmt_time(fl) if fl else "—", f"{fl['gbps']:.1f}" if fl else "—",
                     fmt_x(hw.get("frac_floor")) + flag(hw, "frac_floor"),
                     (f"{fmt_x(hw['vs_torch'])}"
                      + (f" ({tb.replace('torch-', '')})" if tb else "") + flag(hw, "vs_torch")
                      if hw.get("vs_torch") is not None else torch_missing or "—"),
                     fmt_x(nb.get("vs_numpy")) + flag(nb, "vs_numpy") if nb else "—"])
    return rows


SUMMARY_HEAD = ["rule", "options", "dtype", "n", "hwoptim", "µs/step [IQR]", "GB/s",
                "floor µs/step [IQR]", "floor GB/s", "× floor", "× torch best", "× numpy"]


def fmt_ms(s) -> str:
    """Seconds as milliseconds, three significant figures or so."""
    if s is None:
        return "—"
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 \
        else f"{ms:,.0f}"


def fmt_time_ms(rec) -> str:
    """A record's median ms per step with its interquartile range: ``125 [123–128]``."""
    if rec is None:
        return "—"
    t = fmt_ms(rec.get("time_s"))
    if rec.get("time_q1_s") is not None and rec.get("time_q3_s") is not None:
        t += f" [{fmt_ms(rec['time_q1_s'])}–{fmt_ms(rec['time_q3_s'])}]"
    return t + flag(rec, "time_s")


REAL_IMPL = "hwoptim-torch"      # the implementation the real-model summary is about
REAL_HEAD = ["model", "tensors", "params", "hwoptim.torch ms [IQR]", "torch fused ms [IQR]",
             "torch foreach ms [IQR]", "floor ms [IQR]", "× floor", "× torch fused",
             "× torch foreach", "hwoptim flat ms [IQR]"]
REAL_DETAIL_HEAD = ["model", "impl", "launches/step", "ms/step [IQR]", "spread", "GB/s",
                    "× floor", "× torch fused", "× torch foreach"]


def real_by_model(records) -> dict:
    """{model: {impl: record}} of the timed real-model records, in first-seen order."""
    out = {}
    for r in timed(records):
        out.setdefault(r["model"], {})[r["impl"]] = r
    return out


def real_rows(records) -> list:
    """One row per real model: hwoptim.torch.AdamW against torch's and the floor.
    × floor = floor time / hwoptim.torch's (the fraction of the floor's speed it reaches);
    × torch = torch's time / hwoptim.torch's (> 1: hwoptim.torch is faster)."""
    rows = []
    for model, by in real_by_model(records).items():
        hw = by.get(REAL_IMPL)
        any_r = next(iter(by.values()))
        rows.append([model, any_r.get("tensors", "—"), f"{any_r['n']:,}",
                     fmt_time_ms(hw), fmt_time_ms(by.get("torch-fused")),
                     fmt_time_ms(by.get("torch-foreach")), fmt_time_ms(by.get("floor")),
                     (fmt_x(hw.get("frac_floor")) + flag(hw, "frac_floor")) if hw else "—",
                     (fmt_x(hw.get("vs_torch_fused")) + flag(hw, "vs_torch_fused"))
                     if hw else "—",
                     (fmt_x(hw.get("vs_torch_foreach")) + flag(hw, "vs_torch_foreach"))
                     if hw else "—",
                     fmt_time_ms(by.get("hwoptim-flat"))])
    return rows


def real_detail_rows(records) -> list:
    from .timing import spread
    rows = []
    for model, by in real_by_model(records).items():
        for impl, r in by.items():
            rows.append([model, impl, r.get("launches") if r.get("launches") is not None
                         else "—", fmt_time_ms(r), f"{spread(r['samples_s']):.1%}",
                         f"{r['gbps']:.1f}",
                         fmt_x(r.get("frac_floor")) + flag(r, "frac_floor"),
                         fmt_x(r.get("vs_torch_fused")) + flag(r, "vs_torch_fused"),
                         fmt_x(r.get("vs_torch_foreach")) + flag(r, "vs_torch_foreach")])
    return rows


REAL_METHOD = (
    "AdamW (torch's defaults: lr 1e-3, weight decay 1e-2), float32, random params and "
    "grads, over the parameter tensors of real models (`hwoptim.bench.real_models`: built "
    "with torch.nn on the meta device, counts checked against the published ones). "
    "**hwoptim.torch** is `hwoptim.torch.AdamW(params)` (default backend) stepping the list "
    "of tensors as a training script would; **torch fused** / **foreach** are "
    "`torch.optim.AdamW(params, fused=True)` / `(foreach=True)` over the same tensors; "
    "**hwoptim flat** is `hwoptim.AdamW` over the one flat vector the tensors are views "
    "of (one launch per step); the **floor** is the benchmark's floor kernel (AdamW's reads "
    "and writes, one add per element) over a vector of the same size. Params, grads and "
    "both state buffers are shared by the four optimizers (the floor has its own), so a "
    "model's memory is held once. × floor = floor time / hwoptim.torch time; × torch = "
    "torch's time / hwoptim.torch's (> 1: hwoptim.torch is faster); all ratios of the "
    "medians shown.")


def summary_text(report) -> str:
    out = []
    info = report["machine"]
    th = info.get("numba_threading", {})
    out.append(f"{info['cpu_model']}, {info['cpus_usable']} CPUs; numba "
               f"{th.get('layer')} x{th.get('threads')}; "
               f"{report['pairs']} interleaved rounds per number")
    rows = summary_rows(report["records"], info["cpu_model"], report.get("torch_missing"))
    if rows:
        out.append(table(SUMMARY_HEAD, rows))
    if report["models"]:
        out.append("")
        out.append(table(MODEL_HEAD, model_rows(report["models"], info["cpu_model"])))
    if report.get("real_models"):
        out.append("")
        out.append("Real models' tensors, AdamW float32 (ms per step, median [IQR]):")
        out.append(table(REAL_HEAD, real_rows(report["real_models"])))
    for n in report["notes"]:
        out.append(f"note: {n}")
    return "\n".join(out)


MODEL_HEAD = ["model", "tensors", "n", "impl", "launches/step", "µs/step [IQR]", "GB/s",
              "× floor", "× torch fused"]


def model_rows(records, cpu=None) -> list:
    rows = []
    for r in timed(records):
        rows.append([r.get("model", "—"), r.get("tensors", "—"), fmt_n(r["n"]),
                     r["impl"] + ("" if r.get("device") in (None, cpu) else " (GPU)"),
                     r.get("launches") if r.get("launches") is not None else "—",
                     fmt_time(r), f"{r['gbps']:.1f}",
                     fmt_x(r.get("frac_floor")) + flag(r, "frac_floor"),
                     fmt_x(r.get("vs_torch_fused", r.get("vs_torch")))
                     + flag(r, "vs_torch_fused" if "vs_torch_fused" in r else "vs_torch")])
    return rows


def markdown(report, pngs=()) -> str:
    info = report["machine"]
    th = info.get("numba_threading", {})
    v = info["versions"]
    mem = info.get("memory_bytes")
    lines = [f"# hwoptim bench: {info['cpu_model']}", "",
             f"{report['created']} · `{report['command'].strip()}` · "
             f"{report['elapsed_s']:.0f} s", "",
             "## Machine", "",
             f"- CPU: {info['cpu_model']}, {info['cpu_count']} logical CPUs "
             f"({info['cpus_usable']} usable), SIMD {', '.join(info['simd']) or '?'}"
             + (f", {mem / 2**30:.0f} GiB memory" if mem else ""),
             f"- Numba {v.get('numba')} (llvmlite {v.get('llvmlite')}): threading layer "
             f"{th.get('layer')}, {th.get('threads')} threads of {th.get('max_threads')}; "
             f"serial kernel below {info.get('serial_below')}",
             f"- NumPy {v.get('numpy')}, torch {v.get('torch') or 'not installed'}"
             + (f" ({info['torch_threads']} threads)" if info.get("torch_threads") else "")
             + f", hwoptim {v.get('hwoptim')}, Python {info['python']}, {info['platform']}"]
    gpu = report.get("gpu")
    if gpu:
        dev = gpu.get("device", {})
        lines.append(f"- GPU: {dev.get('name', dev)}"
                     + (f", driver {dev.get('driver')}" if isinstance(dev, dict)
                        and dev.get("driver") else "")
                     + (f"; device-to-device copy {gpu['copy_gbps']:.0f} GB/s"
                        if gpu.get("copy_gbps") else ""))
    else:
        lines.append("- GPU: " + next((n for n in report["notes"] if n.startswith("no GPU")
                                        or n.startswith("GPU")), "none"))
    lines += ["", "## Method", "",
              f"Each time is the median of {report['pairs']} interleaved rounds (every "
              f"implementation sampled once per round, rotating order, one process, "
              f"{report['threads']} threads, after warm-up; a sample is a batch of calls "
              f"≥ {report['sample_s'] * 1e3:g} ms). hwoptim is timed through `opt.step(g)`. "
              "GB/s is effective bandwidth: the bytes the rule must move, (arrays read + "
              "arrays written) × itemsize × n, over the time. The **floor** is a kernel "
              "with the same arrays, threads, reads and writes and one add per element: "
              "what a step costs if its math were free. Times show the median and, in "
              "brackets, the interquartile range of the rounds. × floor, × torch (the "
              "fastest torch variant at that size) and × numpy are ratios of the medians "
              "shown (> 1: hwoptim is faster; × floor = floor µs / hwoptim µs); the JSON "
              "also keeps the median of per-round ratios (`*_paired`). A figure is marked "
              "(noisy) when a time's interquartile range is over 10% of its median or the "
              "two ratios differ by over 10%.", "",
              "## Summary", ""]
    noisy = next((n for n in report["notes"] if n.startswith("noisy run")), None)
    if noisy:
        lines += [f"**{noisy[0].upper()}{noisy[1:]}**", ""]
    summary = summary_rows(report["records"], info["cpu_model"], report.get("torch_missing"))
    if summary:
        lines += [table(SUMMARY_HEAD, summary), ""]
    impls = []
    for r in timed(report["records"]):
        if r["impl"] not in impls:
            impls.append(r["impl"])
    rows = []
    for (dev, rule, opts, dtype, n), by in groups(report["records"]).items():
        rows.append([rule, opts, dtype, fmt_n(n)] + [fmt_time(by[i]) if i in by else "—"
                                                      for i in impls])
    if rows:
        lines += ["## Every implementation (µs per step, median [interquartile range])", "",
                  table(["rule", "options", "dtype", "n"] + impls, rows), ""]
    if report.get("real_models") and timed(report["real_models"]):
        lines += ["## Real models' parameter tensors (AdamW, float32)", "", REAL_METHOD, "",
                  table(REAL_HEAD, real_rows(report["real_models"])), "",
                  "Every implementation (spread: interquartile range over median):", "",
                  table(REAL_DETAIL_HEAD, real_detail_rows(report["real_models"])), ""]
    if report["models"]:
        lines += ["## Model-like parameter lists (Adam, float32)", "",
                  "hwoptim over one flat vector (`hwoptim.FlatParams`), hwoptim over the list "
                  "of arrays, torch over the list of tensors; the floor runs over the flat "
                  "vector.", "",
                  table(MODEL_HEAD, model_rows(report["models"], info["cpu_model"])), ""]
    if gpu:
        lines += ["## GPU (hwoptim.bench.gpu)", ""]
        md = report.get("gpu_markdown")
        if md:   # its own report, headings one level down
            lines += [re.sub(r"^(#+)", r"#\1", ln) for ln in md.strip().splitlines()]
        else:
            for k in ("overhead", "capturable"):
                if gpu.get(k):
                    lines.append(f"- {k}: `{json.dumps(gpu[k], default=json_default)[:400]}`")
        lines.append("")
    if report["compile_or_load_s"]:
        lines += ["## Compile or cache load", "",
                  "Seconds the first calls took beyond a normal call, summed over sizes "
                  "(a size that switches to the parallel kernel loads or compiles it). "
                  "With a warm disk cache (`~/.cache/hwoptim`) this is a load.", "",
                  table(["kernels", "s"], [[k, f"{v:.2f}"] for k, v in
                                           report["compile_or_load_s"].items()]), ""]
    skipped = [r for r in report["records"] + report["models"]
               + list(report.get("real_models") or ()) if "skipped" in r]
    whys = {}
    for r in skipped:
        whys.setdefault(f"{r['impl']}: {r['skipped']}", 0)
        whys[f"{r['impl']}: {r['skipped']}"] += 1
    if report["notes"] or whys:
        lines += ["## Notes", ""]
        lines += [f"- {n}" for n in report["notes"]]
        lines += [f"- {w} ({c}×)" for w, c in whys.items()]
        lines.append("")
    if pngs:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    return "\n".join(lines)
