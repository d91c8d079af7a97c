"""GPU results: ratios filled in from times and bytes, the key numbers, and the report as
Markdown, a console table and files."""
from __future__ import annotations

import datetime
import json
import os
import re

import numpy as np

from ..tables import fmt, fmt_us, table
from .device import GiB


def card_name(name: str) -> str:
    """A file-name-safe card name: "NVIDIA H100 80GB HBM3" -> "NVIDIA-H100-80GB-HBM3"."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", str(name)).strip("-") or "GPU"


def finish_records(records: list, copy_gbps: float | None) -> list:
    """Fill ``gbps``, ``frac_copy``, ``frac_floor`` and ``vs_torch`` from times and bytes."""
    key = lambda r: (r.get("rule"), r.get("options"), r.get("dtype"), r.get("n"))
    floor, torch_t = {}, {}
    for r in records:
        if r.get("time_s"):
            r["gbps"] = r["bytes"] / r["time_s"] / 1e9
    for r in records:
        if not r.get("time_s"):
            continue
        if r["impl"] == "floor":
            floor[key(r)] = r["gbps"]
        elif r["impl"] == "torch-fused":
            torch_t[key(r)] = r["time_s"]
    for r in records:
        if not r.get("time_s") or r["impl"] != "torch-foreach":
            continue
        torch_t.setdefault(key(r), r["time_s"])
    for r in records:
        ok = bool(r.get("time_s"))
        r.setdefault("gbps", None)
        r["frac_copy"] = r["gbps"] / copy_gbps if ok and copy_gbps else None
        f = floor.get(key(r))
        r["frac_floor"] = (r["gbps"] / f if ok and f and r["impl"] not in ("floor",)
                           and not r["impl"].startswith("copy") else None)
        t = torch_t.get(key(r))
        r["vs_torch"] = (t / r["time_s"] if ok and t and r["impl"].startswith("hwoptim")
                         else None)
    return records


def finish_models(recs: list) -> list:
    """Model records of one (model, rule): ``frac_floor`` (floor time / this time) and
    ``vs_torch`` (torch fused, else foreach, time / this time) for the hwoptim ones."""
    t = {r["impl"]: r["time_s"] for r in recs if r.get("time_s")}
    torch_t = t.get("torch-fused") or t.get("torch-foreach")
    for r in recs:
        ok = bool(r.get("time_s")) and r["impl"].startswith("hwoptim")
        r["frac_floor"] = t["floor"] / r["time_s"] if ok and t.get("floor") else None
        r["vs_torch"] = torch_t / r["time_s"] if ok and torch_t else None
    return recs


def summary(result: dict) -> dict:
    """The key numbers: Adam float32 at the largest size as a fraction of copy bandwidth, the
    worst hwoptim-cupy fraction of its floor, and the ratios to torch's fused optimizers."""
    recs = [r for r in result.get("records", []) if r.get("time_s")]
    hw = [r for r in recs if r["impl"] == "hwoptim-cupy"]
    out = {"copy_gbps": result.get("copy_gbps")}
    adam = [r for r in hw if r["rule"] == "Adam" and r["options"] == "default"
            and r["dtype"] == "float32"]
    if adam:
        a = max(adam, key=lambda r: r["n"])
        out["adam_fp32"] = {"n": a["n"], "gbps": a["gbps"], "frac_copy": a["frac_copy"],
                            "frac_floor": a["frac_floor"], "vs_torch": a["vs_torch"]}
    others = [r for r in hw if r.get("frac_floor") is not None
              and not (adam and r is max(adam, key=lambda r: r["n"]))]
    if others:
        w = min(others, key=lambda r: r["frac_floor"])
        out["worst_frac_floor"] = {k: w[k] for k in ("rule", "options", "dtype", "n",
                                                     "frac_floor", "gbps")}
    fused = {(r["rule"], r["options"], r["dtype"], r["n"]) for r in recs
             if r["impl"] == "torch-fused"}
    vs = [(r["vs_torch"], r) for r in hw if r.get("vs_torch") is not None
          and (r["rule"], r["options"], r["dtype"], r["n"]) in fused]
    if vs:
        lo, hi = min(vs, key=lambda x: x[0]), max(vs, key=lambda x: x[0])
        out["vs_torch_fused"] = {
            "min": lo[0], "min_case": f"{lo[1]['rule']}[{lo[1]['options']}] {lo[1]['dtype']}",
            "max": hi[0], "max_case": f"{hi[1]['rule']}[{hi[1]['options']}] {hi[1]['dtype']}",
            "geomean": float(np.exp(np.mean([np.log(v) for v, _ in vs])))}
    by_model = {}
    for r in result.get("models", []):
        if r.get("time_s"):
            by_model.setdefault(f"{r['model']} {r['rule']}", {})[r["impl"]] = r
    models = {}
    for case, m in by_model.items():
        flat, many, ht = (m.get(k) for k in ("hwoptim-cupy-flat", "hwoptim-cupy-per-tensor",
                                             "hwoptim-torch"))
        models[case] = {
            "list_vs_flat": flat["time_s"] / many["time_s"] if flat and many else None,
            "list_host_s": many["host_s"] if many else None,
            "list_launches": many["launches"] if many else None,
            "list_host_busy_s": many.get("host_busy_s") if many else None,
            "torch_frac_floor": ht["frac_floor"] if ht else None,
            "torch_vs_fused": ht["vs_torch"] if ht else None,
            "torch_host_s": ht["host_s"] if ht else None,
            "torch_host_busy_s": ht.get("host_busy_s") if ht else None}
    if models:
        out["models"] = models
    fm = {r["format"]: {k: r.get(k) for k in ("n", "gbps", "frac_copy", "vs_torch_fused_fp32",
                                              "state_bytes")}
          for r in result.get("formats", []) if r.get("time_s")}
    if fm:
        out["formats_adam"] = fm
    af = {r["impl"]: {k: r.get(k) for k in ("shape", "gbps", "frac_copy", "frac_minimum",
                                             "vs_torch")}
          for r in result.get("adafactor", []) if r.get("time_s")}
    if af:
        out["adafactor_factored"] = af
    return out


def _md_table(head: list, records: list, cells) -> list:
    """Markdown lines: a header, then ``cells(record)`` per record (an error, if the record
    has one, follows the last cell)."""
    rows = []
    for r in records:
        row = [str(c) for c in cells(r)]
        if r.get("error"):
            row[-1] += f" ({r['error']})"
        rows.append(row)
    return table(head, rows).splitlines()


def format_markdown(result: dict) -> str:
    d = result.get("device", {})
    lines = [f"# hwoptim GPU benchmark: {d.get('name', '?')}", "",
             f"{d.get('name', '?')}, {d.get('sm_count', '?')} SMs, L2 "
             f"{fmt((d.get('l2_bytes') or 0) / 2**20)} MiB, memory "
             f"{fmt((d.get('memory_bytes') or 0) / GiB)} GiB; driver {d.get('driver')}, "
             f"CUDA runtime {d.get('cuda_runtime')}, CuPy {d.get('cupy')}, torch "
             f"{d.get('torch')}. {result.get('date', '')}", "",
             f"Copy bandwidth (read + write): {fmt(result.get('copy_gbps'), '.1f')} GB/s.",
             f"Run took {fmt(result.get('seconds'), '.0f')} s"
             + (" (quick mode)." if result.get("quick") else "."), ""]
    s = result.get("summary") or {}
    if s:
        lines += ["## Summary", "", "```", json.dumps(s, indent=1, default=str), "```", ""]
    ms = lambda r: fmt(r["time_s"] * 1e3 if r.get("time_s") else None, ".4g")  # noqa: E731
    lines += ["## Update rules", "",
              "vs torch: torch's time / this one's (> 1: faster than torch).", ""]
    lines += _md_table(
        ["rule", "options", "dtype", "n", "impl", "time (ms)", "GB/s", "of copy", "of floor",
         "vs torch"], result.get("records", []),
        lambda r: [r.get("rule") or "-", r.get("options") or "-", r["dtype"], r["n"],
                   r["impl"], ms(r), fmt(r.get("gbps"), ".0f"),
                   fmt(r.get("frac_copy"), ".2f"), fmt(r.get("frac_floor"), ".2f"),
                   fmt(r.get("vs_torch"), ".2f")])
    lines += ["", "## Models (one step over every tensor)", "",
              f"Shapes: {result.get('model_shapes', '?')}. host: until step() returns, the GPU "
              f"idle; GPU busy: the same with ~0.5 ms of work queued before the step (a step "
              f"that waits for the stream shows it there).", ""]
    lines += _md_table(
        ["model", "rule", "impl", "tensors", "elements", "time (ms)", "host (us)",
         "host, GPU busy (us)", "GB/s", "of floor", "vs torch", "launches/step"],
        result.get("models", []),
        lambda r: [r["model"], f"{r['rule']}[{r['options']}]", r["impl"], r["tensors"],
                   r["n"], ms(r), fmt_us(r.get("host_s")), fmt_us(r.get("host_busy_s")),
                   fmt(r.get("gbps"), ".0f"),
                   fmt(r.get("frac_floor"), ".2f"), fmt(r.get("vs_torch"), ".2f"),
                   fmt(r.get("launches"))])
    lines += ["", "## Storage formats (Adam)", "",
              "bytes: what the step must load and store per element (int8: each block's "
              "absmax too); of copy: its GB/s over the copy bandwidth (the floor of the same "
              "bytes); vs torch fused fp32: torch.optim.Adam(fused=True) in float32 at the "
              "same size, its time / this one's. fp16 stands for both 16-bit types (CuPy has "
              "no bfloat16; the bytes are the same).", ""]
    lines += _md_table(
        ["format", "n", "time (ms)", "bytes/element", "GB/s", "of copy",
         "vs torch fused fp32", "state B/element"], result.get("formats", []),
        lambda r: [r["format"], r["n"], ms(r),
                   fmt(r["bytes"] / r["n"] if r.get("bytes") else None, ".2f"),
                   fmt(r.get("gbps"), ".0f"), fmt(r.get("frac_copy"), ".2f"),
                   fmt(r.get("vs_torch_fused_fp32"), ".2f"), fmt(r.get("state_bytes"), ".2f")])
    lines += ["", "## Adafactor, factored (one float32 matrix)", "",
              "GB/s and of copy: of the 24 bytes per element the staged kernels move (p read "
              "twice, g three times, p written); of minimum: the 12 bytes any step must move "
              "(p, g read, p written) at copy bandwidth, over the time; vs torch: "
              "torch.optim.Adafactor (foreach) on the same matrix, its time / this one's.", ""]
    lines += _md_table(
        ["impl", "shape", "time (ms)", "GB/s", "of copy", "of minimum", "vs torch"],
        result.get("adafactor", []),
        lambda r: [r["impl"], "x".join(map(str, r["shape"])), ms(r), fmt(r.get("gbps"), ".0f"),
                   fmt(r.get("frac_copy"), ".2f"), fmt(r.get("frac_minimum"), ".2f"),
                   fmt(r.get("vs_torch"), ".2f")])
    lines += ["", "## Per-step overhead (small N)", "",
              "host: until step() returns; wall: step() + synchronize; gpu: CUDA events.", ""]
    lines += _md_table(
        ["rule", "n", "impl", "host (us)", "wall (us)", "gpu (us)", "launches/step"],
        result.get("overhead", []),
        lambda r: [r["rule"], r["n"], r["impl"], fmt_us(r.get("host_s")), fmt_us(r.get("wall_s")),
                   fmt_us(r.get("gpu_s")), fmt(r.get("launches"))])
    lines += ["", "## CUDA graphs (capturable=True)", "",
              "Wall time per step over back-to-back steps, synchronised once at the end.", ""]
    lines += _md_table(
        ["case", "eager (us)", "eager capturable (us)", "graph replay (us)", "saved (us)",
         "launches captured"], result.get("capturable", []),
        lambda r: [r["case"], fmt_us(r.get("eager_s")), fmt_us(r.get("eager_capturable_s")),
                   fmt_us(r.get("graph_s")), fmt_us(r.get("saved_s")), fmt(r.get("launches"))])
    if result.get("skipped"):
        lines += ["", "Skipped (time budget): " + ", ".join(result["skipped"])]
    return "\n".join(lines) + "\n"


def format_table(result: dict) -> str:
    """A short plain-text table for the console."""
    out = [f"{'rule':<9} {'options':<28} {'dtype':<7} {'n':>10} {'impl':<24} {'GB/s':>7} "
           f"{'copy':>5} {'floor':>5} {'torch':>5}"]
    for r in result.get("records", []):
        if r.get("error"):
            out.append(f"{r.get('rule') or '-':<9} {(r.get('options') or '-')[:28]:<28} "
                       f"{r['dtype']:<7} {r['n']:>10} {r['impl']:<24} {r['error']}")
            continue
        out.append(f"{r.get('rule') or '-':<9} {(r.get('options') or '-')[:28]:<28} "
                   f"{r['dtype']:<7} {r['n']:>10} {r['impl']:<24} "
                   f"{fmt(r.get('gbps'), '.0f'):>7} {fmt(r.get('frac_copy'), '.2f'):>5} "
                   f"{fmt(r.get('frac_floor'), '.2f'):>5} {fmt(r.get('vs_torch'), '.2f'):>5}")
    for r in result.get("models", []):
        out.append(f"model {r['model']:<10} {r['rule']}[{r['options']}] {r['impl']:<23} "
                   f"{fmt((r.get('time_s') or 0) * 1e3, '.3f')} ms  "
                   f"host {fmt_us(r.get('host_s'))} us  "
                   f"launches {fmt(r.get('launches'))} {r.get('error', '')}")
    for r in result.get("formats", []):
        out.append(f"format {r['format']:<27} n={r['n']:<10} "
                   + (f"{fmt(r.get('gbps'), '.0f'):>5} GB/s  copy {fmt(r.get('frac_copy'), '.2f')}"
                      f"  vs torch fused fp32 {fmt(r.get('vs_torch_fused_fp32'), '.2f')}  "
                      f"state {fmt(r.get('state_bytes'), '.2f')} B/el"
                      if r.get("time_s") else r.get("error", "?")))
    for r in result.get("adafactor", []):
        out.append(f"adafactor {'x'.join(map(str, r['shape'])):<21} {r['impl']:<13} "
                   + (f"{fmt(r.get('gbps'), '.0f'):>5} GB/s  copy {fmt(r.get('frac_copy'), '.2f')}"
                      f"  of minimum {fmt(r.get('frac_minimum'), '.2f')}  vs torch "
                      f"{fmt(r.get('vs_torch'), '.2f')}"
                      if r.get("time_s") else r.get("error", "?")))
    for r in result.get("overhead", []):
        out.append(f"overhead n={r['n']:<8} {r['impl']:<26} host {fmt_us(r.get('host_s'))} us "
                   f"wall {fmt_us(r.get('wall_s'))} us launches {fmt(r.get('launches'))} "
                   f"{r.get('error', '')}")
    for r in result.get("capturable", []):
        out.append(f"graph {r['case']:<34} eager {fmt_us(r.get('eager_capturable_s'))} us  "
                   f"replay {fmt_us(r.get('graph_s'))} us {r.get('error', '')}")
    return "\n".join(out)


def write_reports(result: dict, out_dir: str) -> list:
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{card_name(result['device']['name'])}-{datetime.date.today().isoformat()}"
    paths = [os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".md")]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths[1], "w") as f:
        f.write(format_markdown(result))
    return paths
