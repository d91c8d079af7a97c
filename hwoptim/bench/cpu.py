"""The CPU run: every case x dtype x size, then the model-like tensor lists, measured into
report records, one group at a time (a group's implementations interleaved, on the same
data; only the current group held in memory)."""
from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass, field

import numpy as np

from .workload import MODEL_TENSORS, MODELS, bytes_moved, group_bytes, plan_of
from .impls import build, build_model, build_real_model, kernel_kinds, real_model_bytes
from .machine import mem_available
from .timing import compare, count_launches, measure, records_from


@dataclass
class Settings:
    """What every CPU measurement shares."""
    device: str                  # the CPU model, the records' "device"
    host: tuple                  # hwoptim's host backends to time ("numba", "numpy")
    torch_variants: tuple        # torch's optimizers to time ("fused", ...), () for none
    pairs: int                   # interleaved rounds per measurement
    sample_s: float              # length of one timed sample
    numpy_max: int               # largest size for the numpy backend
    threads: int
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))


def _fits(need: int) -> tuple:
    """(whether ``need`` bytes fit in 80% of available memory, GiB available or None)."""
    avail = mem_available()
    return avail is None or need <= 0.8 * avail, avail


def _first_call_excess(timings: dict, case, dtype, compile_s: dict) -> None:
    """Compile or cache load: the first call's excess over a normal call, summed over sizes
    (a size that switches to the parallel kernel loads or compiles it)."""
    for impl in timings:
        if impl in ("hwoptim-numba", "floor"):     # the compiled ones
            key = f"{case.label} {dtype} {impl}"
            extra = timings[impl]["first_call_s"] - statistics.median(
                timings[impl]["samples"])
            compile_s[key] = compile_s.get(key, 0.0) + max(0.0, extra)


def measure_case(s: Settings, case, dtype: str, n: int, notes: list,
                 compile_s: dict) -> list:
    """Records of one case, dtype and size (skipped ones say why); [] if it would not fit
    in memory (and a note)."""
    plan = plan_of(case)
    need = group_bytes(plan, dtype, n, 1 + len(s.host) + len(s.torch_variants),
                       "numpy" in s.host and n <= s.numpy_max)
    ok, avail = _fits(need)
    if not ok:
        notes.append(f"{case.label} {dtype} n={n}: skipped, needs ~{need / 2**30:.1f} "
                     f"GiB of {avail / 2**30:.1f} GiB available")
        return []
    fns, skipped = build(case, dtype, n, s.host, s.torch_variants, s.rng, s.numpy_max)
    timings = measure(fns, s.pairs, s.sample_s)
    _first_call_excess(timings, case, dtype, compile_s)
    recs = records_from(timings, device=s.device, rule=case.rule, options=case.options,
                        dtype=dtype, n=n, nbytes=bytes_moved(plan, dtype, n),
                        extra={"threads": s.threads})
    kinds = kernel_kinds(plan, dtype, n)
    for r in recs:
        if r["impl"] in kinds:
            r["kernel"] = kinds[r["impl"]]
    for impl, why in skipped.items():
        recs.append({"device": s.device, "rule": case.rule, "options": case.options,
                     "impl": impl, "dtype": dtype, "n": n, "skipped": why})
    return recs


def measure_model(s: Settings, name: str, notes: list) -> list:
    """Records of one model-like list (Adam, float32); [] if it would not fit (a note)."""
    total = MODELS[name]
    need = total * 4 * (2 + 3 * (2 + len(s.torch_variants)) + 4)
    ok, _ = _fits(need)
    if not ok:
        notes.append(f"model {name}: skipped, needs ~{need / 2**30:.1f} GiB")
        return []
    fns, skipped, n, nbytes, count = build_model(name, total, "float32", s.host,
                                                 s.torch_variants, s.rng)
    launches = {k: count_launches(f) for k, f in fns.items() if k.startswith("hwoptim")}
    timings = measure(fns, s.pairs, s.sample_s)
    recs = records_from(timings, device=s.device, rule="Adam", options="default",
                        dtype="float32", n=n, nbytes=nbytes,
                        extra={"model": name, "tensors": count, "threads": s.threads})
    for r in recs:
        r["launches"] = launches.get(r["impl"])
        if "torch-fused" in timings:
            c = compare(timings["torch-fused"]["samples"], r["samples_s"])
            r["vs_torch_fused"], r["vs_torch_fused_paired"] = c["ratio"], c["paired"]
            if c["noisy"]:
                r["noisy"].append("vs_torch_fused")
    for impl, why in skipped.items():
        recs.append({"device": s.device, "rule": "Adam", "options": "default",
                     "impl": impl, "dtype": "float32", "n": n, "model": name,
                     "skipped": why})
    return recs


def measure_real_model(s: Settings, name: str, torch, notes: list) -> list:
    """Records of one real model's parameter tensors (``real_models``), AdamW float32:
    hwoptim.torch.AdamW, hwoptim.AdamW over the flat vector, torch.optim.AdamW fused and
    foreach, and the floor, interleaved; [] (and a note) if it would not fit or torch is
    missing."""
    from . import real_models
    if torch is None:
        notes.append(f"real model {name}: skipped, needs torch (torch.nn builds its "
                     f"shapes; hwoptim.torch and torch.optim step them)")
        return []
    try:
        shapes = real_models.shapes(name, torch)
    except Exception as e:       # a torch too old for the meta device, or a count mismatch
        notes.append(f"real model {name}: skipped, {type(e).__name__}: {e}")
        return []
    n = sum(int(np.prod(sh)) for sh in shapes)
    need = real_model_bytes(n)
    ok, avail = _fits(need)
    if not ok:
        notes.append(f"real model {name}: skipped, needs ~{need / 2**30:.1f} GiB of "
                     f"{avail / 2**30:.1f} GiB available")
        return []
    fns, skipped, n, nbytes, count, sharing = build_real_model(shapes, torch, s.rng)
    if not sharing:
        notes.append(f"real model {name}: an optimizer did not keep the shared state "
                     f"buffers and holds its own (more memory than the ~{need / 2**30:.1f} "
                     f"GiB planned; the timings stand)")
    launches = {k: count_launches(f) for k, f in fns.items() if k.startswith("hwoptim")}
    timings = measure(fns, s.pairs, s.sample_s)
    published = real_models.PUBLISHED[name]
    recs = records_from(timings, device=s.device, rule="AdamW", options="default",
                        dtype="float32", n=n, nbytes=nbytes,
                        extra={"model": name, "tensors": count, "threads": s.threads,
                               "published": {"params": published[0],
                                             "tensors": published[1]},
                               "description": real_models.DESCRIPTION[name],
                               "shared_state": sharing})
    for r in recs:
        r["launches"] = launches.get(r["impl"])
        for v in ("fused", "foreach"):
            other = f"torch-{v}"
            if other in timings:
                c = compare(timings[other]["samples"], r["samples_s"])
                r[f"vs_torch_{v}"], r[f"vs_torch_{v}_paired"] = c["ratio"], c["paired"]
                if c["noisy"]:
                    r["noisy"].append(f"vs_torch_{v}")
    for impl, why in skipped.items():
        recs.append({"device": s.device, "rule": "AdamW", "options": "default",
                     "impl": impl, "dtype": "float32", "n": n, "model": name,
                     "tensors": count, "skipped": why})
    return recs


def measure_all(s: Settings, groups: list, models: list, progress, notes: list,
                real: tuple = (), torch=None):
    """``(records, model records, real-model records, compile or load seconds)`` of every
    (case, dtype, n) in ``groups``, every model name in ``models`` and every real model in
    ``real``."""
    records, model_records, real_records, compile_s = [], [], [], {}
    for case, dtype, n in groups:
        progress.start(f"{case.label} {dtype} n={n:.0e}")
        records += measure_case(s, case, dtype, n, notes, compile_s)
        gc.collect()
        progress.advance()
    for m in models:
        progress.start(f"model {m} ({MODEL_TENSORS} tensors, {MODELS[m]:.0e})")
        model_records += measure_model(s, m, notes)
        gc.collect()
        progress.advance()
    for m in real:
        progress.start(f"real model {m}")
        real_records += measure_real_model(s, m, torch, notes)
        gc.collect()
        progress.advance()
    return records, model_records, real_records, compile_s
