"""The GPU benchmark: hwoptim's CuPy kernels against the copy bandwidth, each rule's floor
kernel and PyTorch's fused CUDA optimizers, measured on one device in one run.

Every timed step streams from device memory: fresh random data (never zeros), rotating among
buffer sets whose total exceeds twice the L2 cache; times are medians of CUDA-event intervals
after warm-up. A rule must move ``(reads + writes) * itemsize`` bytes per element per step
(``plan.reads``, ``plan.outputs``); effective GB/s is that over the time.

Sections of :func:`run`'s result:

* ``copy_gbps``: device-to-device copy (bytes read + written), the ceiling;
* ``records``: rule x option set x dtype x implementation (``hwoptim-cupy`` through the public
  ``opt.step``, ``hwoptim-cupy-elementwise``, ``floor`` (the rule's own bytes, no math),
  ``torch-fused``, ``torch-foreach``, ``copy-memcpy``, ``copy-kernel``), in the schema the
  CPU report shares: ``device, rule, options, impl, dtype, n, time_s, bytes, gbps, frac_copy,
  frac_floor, vs_torch`` (``vs_torch``: torch's time over this one's, > 1 is faster than
  torch; fused torch where it exists, else foreach);
* ``models``: the CPU report's two 200-tensor models ("large" ~5e7 and "small" ~1e6
  elements), stepped as one ``FlatParams`` buffer (one launch), per tensor, by the floor
  over the flat buffer, and by torch over the same tensors;
* ``overhead``: host time and wall time (synchronised) per step at small N, and kernel
  launches per step;
* ``capturable``: one step captured in a CUDA graph and replayed, against eager steps.

``python -m hwoptim.gpubench OUTDIR [--quick] [--budget S]`` writes
``OUTDIR/<card>-<date>.json`` and ``.md`` and prints a short table.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import gc
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import codegen
from .rules import RULES

THREADS = 256
GiB = 1 << 30


# ----------------------------------------------------------------------------- pure helpers

def option_name(kwargs: dict) -> str:
    """``"default"`` or ``"k=v,k=v"``: the names ``hwoptim.testing.option_sets`` uses."""
    return ",".join(f"{k}={v}" for k, v in kwargs.items()) or "default"


def split_kwargs(rule, kwargs: dict):
    """(hypers, options, static flags) of one option set of ``rule``."""
    h = {n: hy.default for n, hy in rule.hypers.items()}
    opt = dict(rule.options)
    for k, v in kwargs.items():
        (opt if k in rule.options else h)[k] = v
    return h, opt, rule.static_flags(h, opt)


def plan_for(rule, kwargs: dict) -> codegen.KernelPlan:
    return codegen.plan(rule, split_kwargs(rule, kwargs)[2])


def bytes_per_element(plan, dtype) -> int:
    """Bytes one step must move per element: every array read, every array written."""
    return (len(plan.reads) + len(plan.outputs)) * np.dtype(dtype).itemsize


# the heaviest option set worth timing besides the default, per rule (as hwoptim.report
# times on the CPU, so the records compare)
HEAVIEST = {"Adam": {"amsgrad": True},
            "AdamW": {"amsgrad": True},
            "RMSprop": {"centered": True, "momentum": 0.9},
            "SGD": {"momentum": 0.9, "nesterov": True}}


def bench_option_sets(rule) -> list:
    """The default option set, plus the heaviest one when it moves more arrays than the
    default: ``HEAVIEST`` (Adam amsgrad, RMSprop centered + momentum, SGD nesterov), else
    the spec's test option set with the most arrays (then the most operations)."""
    def arrays(o):
        p = plan_for(rule, o)
        return len(p.reads) + len(p.outputs)
    heavy = HEAVIEST.get(rule.name)
    if heavy is None:
        heavy = max((dict(o) for o in rule.test_options),
                    key=lambda o: (arrays(o), len(plan_for(rule, o).order)))
    out = [{}]
    if arrays(heavy) > arrays({}):
        out.append(dict(heavy))
    return out


MODELS = {"small": 1_000_000, "large": 50_000_000}   # as hwoptim.report names them


def model_shapes(total: int) -> list:
    """The CPU report's model (200 tensors), so GPU and CPU numbers are over the same tensors."""
    from .report import model_shapes as cpu_shapes
    return [tuple(int(d) for d in s) for s in cpu_shapes(total)]


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
    return out


def _fmt(v, spec=".3g"):
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _us(s):
    return "-" if s is None else f"{s * 1e6:.1f}"


def _md_table(head: list, records: list, cells) -> list:
    """Markdown lines: a header, then ``cells(record)`` per record (an error, if the record
    has one, follows the last cell)."""
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        row = [str(c) for c in cells(r)]
        if r.get("error"):
            row[-1] += f" ({r['error']})"
        out.append("| " + " | ".join(row) + " |")
    return out


def format_markdown(result: dict) -> str:
    d = result.get("device", {})
    lines = [f"# hwoptim GPU benchmark: {d.get('name', '?')}", "",
             f"{d.get('name', '?')}, {d.get('sm_count', '?')} SMs, L2 "
             f"{_fmt((d.get('l2_bytes') or 0) / 2**20)} MiB, memory "
             f"{_fmt((d.get('memory_bytes') or 0) / GiB)} GiB; driver {d.get('driver')}, "
             f"CUDA runtime {d.get('cuda_runtime')}, CuPy {d.get('cupy')}, torch "
             f"{d.get('torch')}. {result.get('date', '')}", "",
             f"Copy bandwidth (read + write): {_fmt(result.get('copy_gbps'), '.1f')} GB/s.",
             f"Run took {_fmt(result.get('seconds'), '.0f')} s"
             + (" (quick mode)." if result.get("quick") else "."), ""]
    s = result.get("summary") or {}
    if s:
        lines += ["## Summary", "", "```", json.dumps(s, indent=1, default=str), "```", ""]
    ms = lambda r: _fmt(r["time_s"] * 1e3 if r.get("time_s") else None, ".4g")  # noqa: E731
    lines += ["## Update rules", "",
              "vs torch: torch's time / this one's (> 1: faster than torch).", ""]
    lines += _md_table(
        ["rule", "options", "dtype", "n", "impl", "time (ms)", "GB/s", "of copy", "of floor",
         "vs torch"], result.get("records", []),
        lambda r: [r.get("rule") or "-", r.get("options") or "-", r["dtype"], r["n"],
                   r["impl"], ms(r), _fmt(r.get("gbps"), ".0f"),
                   _fmt(r.get("frac_copy"), ".2f"), _fmt(r.get("frac_floor"), ".2f"),
                   _fmt(r.get("vs_torch"), ".2f")])
    lines += ["", "## Models (one step over every tensor)", "",
              f"Shapes: {result.get('model_shapes', '?')}.", ""]
    lines += _md_table(
        ["model", "rule", "impl", "tensors", "elements", "time (ms)", "GB/s", "of floor",
         "vs torch", "launches/step"], result.get("models", []),
        lambda r: [r["model"], f"{r['rule']}[{r['options']}]", r["impl"], r["tensors"],
                   r["n"], ms(r), _fmt(r.get("gbps"), ".0f"),
                   _fmt(r.get("frac_floor"), ".2f"), _fmt(r.get("vs_torch"), ".2f"),
                   _fmt(r.get("launches"))])
    lines += ["", "## Per-step overhead (small N)", "",
              "host: until step() returns; wall: step() + synchronize; gpu: CUDA events.", ""]
    lines += _md_table(
        ["rule", "n", "impl", "host (us)", "wall (us)", "gpu (us)", "launches/step"],
        result.get("overhead", []),
        lambda r: [r["rule"], r["n"], r["impl"], _us(r.get("host_s")), _us(r.get("wall_s")),
                   _us(r.get("gpu_s")), _fmt(r.get("launches"))])
    lines += ["", "## CUDA graphs (capturable=True)", "",
              "Wall time per step over back-to-back steps, synchronised once at the end.", ""]
    lines += _md_table(
        ["case", "eager (us)", "eager capturable (us)", "graph replay (us)", "saved (us)",
         "launches captured"], result.get("capturable", []),
        lambda r: [r["case"], _us(r.get("eager_s")), _us(r.get("eager_capturable_s")),
                   _us(r.get("graph_s")), _us(r.get("saved_s")), _fmt(r.get("launches"))])
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
                   f"{_fmt(r.get('gbps'), '.0f'):>7} {_fmt(r.get('frac_copy'), '.2f'):>5} "
                   f"{_fmt(r.get('frac_floor'), '.2f'):>5} {_fmt(r.get('vs_torch'), '.2f'):>5}")
    for r in result.get("models", []):
        out.append(f"model {r['model']:<10} {r['rule']}[{r['options']}] {r['impl']:<22} "
                   f"{_fmt((r.get('time_s') or 0) * 1e3, '.3f')} ms  "
                   f"launches {_fmt(r.get('launches'))} {r.get('error', '')}")
    for r in result.get("overhead", []):
        out.append(f"overhead n={r['n']:<8} {r['impl']:<26} host {_us(r.get('host_s'))} us "
                   f"wall {_us(r.get('wall_s'))} us launches {_fmt(r.get('launches'))} "
                   f"{r.get('error', '')}")
    for r in result.get("capturable", []):
        out.append(f"graph {r['case']:<34} eager {_us(r.get('eager_capturable_s'))} us  "
                   f"replay {_us(r.get('graph_s'))} us {r.get('error', '')}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- GPU helpers

@contextlib.contextmanager
def count_launches(*optimizers):
    """Count kernel launches of the hwoptim CuPy backends inside the block, by kernel name.

    ``cupy.RawModule`` and ``cupy.ElementwiseKernel`` are replaced by wrappers that count
    every launch, and hwoptim's kernel cache is emptied for the duration, so kernels built
    inside the block are counted ones (compiled code comes from CuPy's cache). An optimizer
    keeps the kernels of its first step: pass the ones that stepped before the block, and
    they step with counted kernels inside it and with their own again after it."""
    import cupy
    from . import optim
    counts = collections.Counter()
    real_module, real_ek = cupy.RawModule, cupy.ElementwiseKernel

    class CountedModule:
        def __init__(self, *args, **kwargs):
            self._module = real_module(*args, **kwargs)

        def get_function(self, name):
            f = self._module.get_function(name)

            def launch(*args, **kwargs):
                counts[name] += 1
                return f(*args, **kwargs)
            return launch

        def __getattr__(self, name):
            return getattr(self._module, name)

    class CountedElementwise:
        def __init__(self, *args, **kwargs):
            self._kernel = real_ek(*args, **kwargs)
            self._name = kwargs.get("name", "elementwise")

        def __call__(self, *args, **kwargs):
            counts[self._name] += 1
            return self._kernel(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._kernel, name)

    saved = dict(optim._kernels)
    own = [(o, o.__dict__.get("_kern")) for o in optimizers]
    optim._kernels.clear()
    for o in optimizers:
        o._kern = None
    cupy.RawModule, cupy.ElementwiseKernel = CountedModule, CountedElementwise
    try:
        yield counts
    finally:
        cupy.RawModule, cupy.ElementwiseKernel = real_module, real_ek
        optim._kernels.clear()
        optim._kernels.update(saved)
        for o, _ in own:
            o._kern = None          # rebuilt from the restored cache at the next step


def prewarm(raw_jobs, elementwise_jobs=(), workers=None) -> dict:
    """Compile the ``RawModule`` of each (plan, dtype) in ``raw_jobs`` and the
    ``ElementwiseKernel`` of each in ``elementwise_jobs`` on a thread pool, filling CuPy's
    on-disk kernel cache, so later launches load kernels instead of compiling one by one.

    Best effort: a failure here is counted and left for the real launch to report."""
    import cupy
    from .backends import cupy as cupy_backend
    from .backends import cupy_elementwise
    dev = cupy.cuda.runtime.getDevice()
    t0 = time.perf_counter()

    def raw(plan, dtype):
        with cupy.cuda.Device(dev):
            cupy.RawModule(code=codegen.cuda_source(plan, dtype).source,
                           options=cupy_backend.NVRTC_OPTIONS).compile()

    def ew(plan, dtype):
        with cupy.cuda.Device(dev):
            run = cupy_elementwise.kernel(plan, dtype)
            arrays = [cupy.ones(8, dtype=dtype) for _ in plan.arrays]
            run(arrays, tuple(np.dtype(dtype).type(0.5) for _ in plan.scalars))
            cupy.cuda.get_current_stream().synchronize()

    seen, tasks = set(), []
    for f, jobs in ((raw, raw_jobs), (ew, elementwise_jobs)):
        for plan, dtype in jobs:
            if (f, plan.key, dtype) not in seen:
                seen.add((f, plan.key, dtype))
                tasks.append((f, plan, dtype))
    failed = 0
    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        futures = [ex.submit(f, p, d) for f, p, d in tasks]
        for fu in futures:
            try:
                fu.result()
            except Exception:      # noqa: BLE001 - reported by the real launch
                failed += 1
    return {"modules": len(tasks), "failed": failed, "seconds": time.perf_counter() - t0}


def _free():
    import cupy
    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _is_oom(e: BaseException) -> bool:
    import cupy
    if isinstance(e, cupy.cuda.memory.OutOfMemoryError):
        return True
    name = type(e).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(e).lower()


def _cupy_timer(stream):
    import cupy

    def make():
        return cupy.cuda.Event()

    def record(e):
        e.record(stream)

    def elapsed(a, b):
        return cupy.cuda.get_elapsed_time(a, b) / 1e3
    return make, record, elapsed


def _torch_timer():
    import torch

    def make():
        return torch.cuda.Event(enable_timing=True)

    def record(e):
        e.record()

    def elapsed(a, b):
        return a.elapsed_time(b) / 1e3
    return make, record, elapsed


def time_steps(step, n_sets, warmup, repeats, timer) -> float:
    """Median seconds per ``step(i)`` (``i``: which buffer set) between CUDA events."""
    make, record, elapsed = timer
    for i in range(warmup):
        step(i % n_sets)
    marks = [(make(), make()) for _ in range(repeats)]
    for i, (a, b) in enumerate(marks):
        record(a)
        step((warmup + i) % n_sets)
        record(b)
    marks[-1][1].synchronize()
    return float(np.median([elapsed(a, b) for a, b in marks]))


def n_sets_for(set_bytes: int, l2_bytes: int, cap: int = 64) -> int:
    """Buffer sets to rotate among so that their total is at least twice the L2 cache."""
    return max(1, min(cap, -(-2 * l2_bytes // max(1, set_bytes))))


_COPY_SRC = r"""
extern "C" __global__ void hw_bench_copy16(const float4* __restrict__ src,
                                           float4* __restrict__ dst, const long long n)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = src[i];
}
"""


class _Bench:
    def __init__(self, quick, progress, budget_s):
        import cupy
        self.cupy = cupy
        self.quick = quick
        self.progress = progress or (lambda msg: None)
        self.t0 = time.perf_counter()
        self.deadline = None if budget_s is None else self.t0 + budget_s
        self.dev = cupy.cuda.runtime.getDevice()
        props = cupy.cuda.runtime.getDeviceProperties(self.dev)
        name = props.get("name", b"GPU")
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.sm = int(props.get("multiProcessorCount", 0)) or 1
        self.l2 = int(props.get("l2CacheSize", 0)) or 50 * 2**20
        self.mem = int(props.get("totalGlobalMem", 0))
        self.stream = cupy.cuda.get_current_stream()
        self.timer = _cupy_timer(self.stream)
        self.rng = cupy.random.default_rng(12345)
        self.skipped = []
        try:
            import torch
            self.torch = torch if torch.cuda.is_available() else None
            self.torch_version = torch.__version__
        except ImportError:
            self.torch, self.torch_version = None, None

    # -- bookkeeping
    def torch_has(self, rule, impl) -> bool:
        """Whether torch has ``rule`` (with ``fused=`` for torch-fused); fused kernels that
        torch rejects on this device are recorded as errors, not skipped."""
        if self.torch is None or rule.torch is None:
            return False
        import inspect
        params = inspect.signature(getattr(self.torch.optim, rule.torch)).parameters
        return ("fused" if impl == "torch-fused" else "foreach") in params

    def over_budget(self, what) -> bool:
        if self.deadline is not None and time.perf_counter() > self.deadline:
            self.skipped.append(what)
            self.progress(f"skipped (time budget): {what}")
            return True
        return False

    def device_info(self) -> dict:
        cupy = self.cupy
        free, total = cupy.cuda.Device(self.dev).mem_info
        return {"name": self.name, "driver": cupy.cuda.runtime.driverGetVersion(),
                "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
                "cupy": cupy.__version__, "torch": self.torch_version,
                "sm_count": self.sm, "l2_bytes": self.l2, "memory_bytes": total,
                "memory_free_bytes": free, "python": sys.version.split()[0]}

    def blocks(self, work):
        return max(1, min(-(-work // THREADS), self.sm * 32))

    # -- data
    def fill_normal(self, a):
        try:
            self.rng.standard_normal(dtype=a.dtype, out=a)
        except (TypeError, ValueError, NotImplementedError):
            a[...] = self.cupy.random.standard_normal(a.shape, dtype=a.dtype)
        return a

    def normal(self, shape, dtype):
        return self.fill_normal(self.cupy.empty(shape, dtype=dtype))

    def positive(self, a):
        """Fill ``a`` (a state buffer) with values in [0.5, 1.5): nonzero, valid for every
        state (second moments must be >= 0)."""
        try:
            self.rng.random(dtype=a.dtype, out=a)
        except (TypeError, ValueError, NotImplementedError):
            a[...] = self.cupy.random.random(a.shape, dtype=a.dtype)
        a += 0.5
        return a

    # -- measurements
    def copy(self, n_bytes) -> list:
        cupy = self.cupy
        recs = []
        # n_bytes is far above the L2 size: one source and one destination stream from memory
        src = self.positive(self.cupy.empty(n_bytes // 4, dtype=np.float32))
        dst = cupy.empty_like(src)
        rep = 10 if self.quick else 20

        def memcpy(i):
            dst.data.copy_from_device_async(src.data, n_bytes, self.stream)
        t = time_steps(memcpy, 1, 3, rep, self.timer)
        recs.append(self._rec(None, None, "copy-memcpy", "float32", n_bytes // 4, t, 2 * n_bytes))
        k = cupy.RawKernel(_COPY_SRC, "hw_bench_copy16")
        n16 = n_bytes // 16

        def launch(i):
            k((self.blocks(n16),), (THREADS,), (src, dst, np.int64(n16)))
        t = time_steps(launch, 1, 3, rep, self.timer)
        recs.append(self._rec(None, None, "copy-kernel", "float32", n_bytes // 4, t, 2 * n_bytes))
        src = dst = None
        _free()
        return recs

    def _rec(self, rule, options, impl, dtype, n, t, nbytes, **extra):
        return {"device": self.name, "rule": rule, "options": options, "impl": impl,
                "dtype": dtype, "n": int(n), "time_s": t, "bytes": int(nbytes), **extra}

    def rule_impl(self, rule, kwargs, dtype, n, impl) -> dict:
        """One record: ``rule`` with option set ``kwargs`` at ``n`` elements, by ``impl``."""
        plan = plan_for(rule, kwargs)
        nbytes = bytes_per_element(plan, dtype) * n
        opts = option_name(kwargs)
        rep = 8 if self.quick else 15
        try:
            if impl.startswith("torch"):
                t = self._torch_rule(rule, kwargs, dtype, n, impl, nbytes, rep)
            else:
                t = self._hw_rule(rule, kwargs, plan, dtype, n, impl, nbytes, rep)
            return self._rec(rule.name, opts, impl, dtype, n, t, nbytes)
        except Exception as e:   # noqa: BLE001 - recorded, the run goes on
            err = "out of memory" if _is_oom(e) else f"{type(e).__name__}: {e}"[:300]
            return self._rec(rule.name, opts, impl, dtype, n, None, nbytes, error=err)
        finally:
            _free()

    def _hw_rule(self, rule, kwargs, plan, dtype, n, impl, nbytes, rep):
        import hwoptim
        from .backends import cupy as cupy_backend
        cls = getattr(hwoptim, rule.name)
        sets = []
        for _ in range(n_sets_for(nbytes, self.l2)):
            if impl == "floor":
                arrays = [self.normal(n, dtype) for _ in plan.arrays[:2]]
                arrays += [self.positive(self.cupy.empty(n, dtype=dtype))
                           for _ in plan.arrays[2:]]
                sets.append(arrays)
            else:
                w, g = self.normal(n, dtype), self.normal(n, dtype)
                backend = {"hwoptim-cupy": "cupy",
                           "hwoptim-cupy-elementwise": "cupy-elementwise"}[impl]
                opt = cls(w, backend=backend, **kwargs)
                for buf in opt.state[0].values():
                    self.positive(buf)
                sets.append((opt, g))
        if impl == "floor":
            run = cupy_backend.kernel(codegen.floor_plan(plan), dtype)
            step = lambda i: run(sets[i], ())
        else:
            step = lambda i: sets[i][0].step(sets[i][1])
        return time_steps(step, len(sets), 3, rep, self.timer)

    def _torch_rule(self, rule, kwargs, dtype, n, impl, nbytes, rep):
        torch = self.torch
        if torch is None or rule.torch is None:
            raise RuntimeError("torch with CUDA is not available" if torch is None
                               else f"torch has no {rule.name}")
        tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
        cls = getattr(torch.optim, rule.torch)
        kw = {k: v for k, v in kwargs.items() if k not in rule.torch_skip}
        kw["fused" if impl == "torch-fused" else "foreach"] = True
        opts = []
        for _ in range(n_sets_for(nbytes, self.l2)):
            p = torch.randn(n, device="cuda", dtype=tdt)
            p.grad = torch.randn_like(p)
            opt = cls([p], **kw)
            opt.step()                           # creates the state
            for v in opt.state[p].values():
                if torch.is_tensor(v) and v.numel() == n:
                    v.uniform_(0.5, 1.5)
            opts.append(opt)
        torch.cuda.synchronize()
        return time_steps(lambda i: opts[i].step(), len(opts), 3, rep, _torch_timer())

    # -- models
    def model(self, label, shapes, rule, kwargs, dtype, impl) -> dict:
        import hwoptim
        cupy = self.cupy
        plan = plan_for(rule, kwargs)
        n = int(sum(int(np.prod(s)) for s in shapes))
        nbytes = bytes_per_element(plan, dtype) * n
        rec = {"device": self.name, "model": label, "rule": rule.name,
               "options": option_name(kwargs), "impl": impl, "dtype": dtype,
               "tensors": len(shapes), "n": n, "bytes": nbytes, "time_s": None,
               "gbps": None, "launches": None}
        rep = 10 if self.quick else 30
        try:
            sets = []
            cls = getattr(hwoptim, rule.name)
            for _ in range(n_sets_for(nbytes, self.l2)):
                if impl in ("hwoptim-cupy-flat", "floor"):
                    flat = hwoptim.FlatParams(shapes, dtype, xp=cupy)
                    self.fill_normal(flat.params)
                    self.fill_normal(flat.grads)
                    if impl == "floor":       # the rule's arrays over the flat vector
                        arrays = [flat.params, flat.grads] + [
                            self.positive(cupy.empty(flat.size, dtype=dtype))
                            for _ in plan.arrays[2:]]
                        sets.append((arrays, flat))
                        continue
                    opt = cls(flat.params, backend="cupy", **kwargs)
                    sets.append((opt, flat.grads, flat))
                elif impl == "hwoptim-cupy-per-tensor":
                    ps = [self.normal(s, dtype) for s in shapes]
                    gs = [self.normal(s, dtype) for s in shapes]
                    opt = cls(ps, backend="cupy", **kwargs)
                    sets.append((opt, gs, ps))
                else:
                    sets.append(self._torch_model(rule, kwargs, shapes, dtype, impl))
                if impl.startswith("hwoptim"):
                    for st in opt.state:
                        for buf in st.values():
                            self.positive(buf)
            if impl == "floor":
                from .backends import cupy as cupy_backend
                run = cupy_backend.kernel(codegen.floor_plan(plan), dtype)
                rec["time_s"] = time_steps(lambda i: run(sets[i][0], ()), len(sets), 3, rep,
                                           self.timer)
                rec["launches"] = 1
            elif impl.startswith("hwoptim"):
                step = lambda i: sets[i][0].step(sets[i][1])
                rec["time_s"] = time_steps(step, len(sets), 3, rep, self.timer)
                with count_launches(sets[0][0]) as c:
                    step(0)
                self.stream.synchronize()
                rec["launches"] = sum(c.values())
            else:
                rec["time_s"] = time_steps(lambda i: sets[i].step(), len(sets), 3, rep,
                                           _torch_timer())
            rec["gbps"] = nbytes / rec["time_s"] / 1e9
        except Exception as e:   # noqa: BLE001
            rec["error"] = "out of memory" if _is_oom(e) else f"{type(e).__name__}: {e}"[:300]
        finally:
            sets = None
            _free()
        return rec

    def _torch_model(self, rule, kwargs, shapes, dtype, impl):
        torch = self.torch
        if torch is None or rule.torch is None:
            raise RuntimeError("torch with CUDA is not available")
        tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
        ps = []
        for s in shapes:
            p = torch.randn(*s, device="cuda", dtype=tdt)
            p.grad = torch.randn_like(p)
            ps.append(p)
        kw = {k: v for k, v in kwargs.items() if k not in rule.torch_skip}
        kw["fused" if impl == "torch-fused" else "foreach"] = True
        opt = getattr(torch.optim, rule.torch)(ps, **kw)
        opt.step()
        for p in ps:
            for v in opt.state[p].values():
                if torch.is_tensor(v) and v.numel() == p.numel() and v.numel() > 1:
                    v.uniform_(0.5, 1.5)
        torch.cuda.synchronize()
        return opt

    # -- overhead
    def overhead(self, rule, n, impl, dtype="float32") -> dict:
        import hwoptim
        rec = {"device": self.name, "rule": rule.name, "n": int(n), "impl": impl,
               "dtype": dtype, "host_s": None, "wall_s": None, "gpu_s": None,
               "launches": None}
        rep = 30 if self.quick else 100
        try:
            if impl.startswith("torch"):
                torch = self.torch
                if torch is None:
                    raise RuntimeError("torch with CUDA is not available")
                tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
                p = torch.randn(int(n), device="cuda", dtype=tdt)
                p.grad = torch.randn_like(p)
                kw = {"fused" if impl == "torch-fused" else "foreach": True}
                opt = getattr(torch.optim, rule.torch)([p], **kw)
                step, sync, timer = opt.step, torch.cuda.synchronize, _torch_timer()
            else:
                w, g = self.normal(int(n), dtype), self.normal(int(n), dtype)
                backend = "cupy-elementwise" if impl == "hwoptim-cupy-elementwise" else "cupy"
                opt = getattr(hwoptim, rule.name)(w, backend=backend,
                                                  capturable=impl == "hwoptim-cupy-capturable")
                step = lambda: opt.step(g)
                sync, timer = self.stream.synchronize, self.timer
            for _ in range(5):
                step()
            sync()
            host, wall = [], []
            for _ in range(rep):
                t0 = time.perf_counter()
                step()
                t1 = time.perf_counter()
                sync()
                t2 = time.perf_counter()
                host.append(t1 - t0)
                wall.append(t2 - t0)
            rec["host_s"], rec["wall_s"] = float(np.median(host)), float(np.median(wall))
            rec["gpu_s"] = time_steps(lambda i: step(), 1, 2, rep, timer)
            if not impl.startswith("torch"):
                with count_launches(opt) as c:
                    step()
                sync()
                rec["launches"] = sum(c.values())
                rec["launch_names"] = dict(c)
        except Exception as e:   # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
        finally:
            _free()
        return rec

    # -- CUDA graphs
    def graph(self, label, make, rep=None) -> dict:
        """``make(capturable)`` returns (optimizer, grads). Wall time per step of eager
        steps (plain and capturable) and of replays of one captured step."""
        rep = rep or (50 if self.quick else 200)
        cupy = self.cupy
        rec = {"device": self.name, "case": label, "eager_s": None,
               "eager_capturable_s": None, "graph_s": None, "saved_s": None,
               "launches": None}
        s = cupy.cuda.Stream(non_blocking=True)

        def per_step(fn):
            for _ in range(5):
                fn()
            s.synchronize()
            t0 = time.perf_counter()
            for _ in range(rep):
                fn()
            s.synchronize()
            return (time.perf_counter() - t0) / rep

        try:
            with s:
                opt, grads = make(False)
                rec["eager_s"] = per_step(lambda: opt.step(grads))
                opt, grads = make(True)
                rec["eager_capturable_s"] = per_step(lambda: opt.step(grads))
                with count_launches(opt) as c:
                    opt.step(grads)
                s.synchronize()
                rec["launches"] = sum(c.values())
                # captured with hwoptim's own cached kernels (loaded by the eager steps
                # above, and kept alive by its kernel cache while the graph is replayed)
                s.begin_capture()
                try:
                    opt.step(grads)
                finally:
                    graph = s.end_capture()
                rec["graph_s"] = per_step(lambda: graph.launch(s))
                rec["saved_s"] = rec["eager_capturable_s"] - rec["graph_s"]
        except Exception as e:   # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
        finally:
            s.synchronize()
            _free()
        return rec


def run(quick: bool = False, out_dir: str | None = None, progress=None,
        budget_s: float | None = None, log2_n: int | None = None) -> dict:
    """Run the benchmark on CuPy's current device; see the module docstring.

    ``budget_s``: sections that would start after this many seconds are skipped (listed
    under ``"skipped"``). ``out_dir``: also write the JSON and Markdown reports there.
    ``log2_n``: the largest size (float32 Adam; default 28, quick 26)."""
    import hwoptim
    say = progress or (lambda msg: None)
    b = _Bench(quick, say, budget_s)
    result = {"device": b.device_info(), "quick": bool(quick),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "copy_gbps": None, "records": [], "models": [], "overhead": [],
              "capturable": [], "skipped": b.skipped}
    say(f"device: {result['device']}")

    # cases: (rule, kwargs, dtype, n); float32 Adam at 2^28, the rest smaller
    big = 1 << (log2_n if log2_n is not None else (26 if quick else 28))
    cases = []
    for dtype in ("float32",) if quick else ("float32", "float64"):
        for rule in RULES.values():
            for kw in ([{}] if quick else bench_option_sets(rule)):
                elems = big if rule.name in ("Adam", "AdamW") else big // 2
                if dtype == "float64":
                    elems //= 2
                cases.append((rule, kw, dtype, elems))
    # the headline first: Adam float32 default
    cases.sort(key=lambda c: (c[2] != "float32", c[0].name != "Adam", bool(c[1])))

    rule_jobs = [(plan_for(r, kw), dt) for r, kw, dt, _ in cases]
    pw = prewarm(rule_jobs + [(codegen.floor_plan(p), dt) for p, dt in rule_jobs], rule_jobs)
    say(f"prewarm: {pw}")
    result["prewarm"] = pw

    try:
        copy = b.copy(big * 4)
        result["records"] += copy
        copy_gbps = max(r["bytes"] / r["time_s"] / 1e9 for r in copy)
        say(f"copy: {copy_gbps:.0f} GB/s")
    except Exception as e:   # noqa: BLE001 - the fractions of copy are then left out
        copy_gbps = None
        result["copy_error"] = f"{type(e).__name__}: {e}"[:300]
        say(f"copy failed: {result['copy_error']}")
        _free()
    result["copy_gbps"] = copy_gbps

    impls = ["hwoptim-cupy", "hwoptim-cupy-elementwise", "floor", "torch-fused",
             "torch-foreach"]

    def rule_cases(selected):
        for rule, kw, dtype, n in selected:
            if b.over_budget(f"{rule.name}[{option_name(kw)}] {dtype}"):
                continue
            for impl in impls:
                if impl.startswith("torch") and not b.torch_has(rule, impl):
                    continue
                r = b.rule_impl(rule, kw, dtype, n, impl)
                result["records"].append(r)
                say(f"{rule.name}[{option_name(kw)}] {dtype} n={n} {impl}: "
                    + (f"{r['bytes'] / r['time_s'] / 1e9:.0f} GB/s" if r.get("time_s")
                       else r.get("error", "?")))

    f32 = [c for c in cases if c[2] == "float32"]
    rule_cases(f32)

    # per-step overhead and launches at small N
    adam = RULES["Adam"]
    for n in ((10_000, 1_000_000) if quick else (10_000, 100_000, 1_000_000)):
        if b.over_budget(f"overhead n={n}"):
            break
        for impl in ("hwoptim-cupy", "hwoptim-cupy-capturable", "hwoptim-cupy-elementwise",
                     "torch-fused"):
            if impl.startswith("torch") and b.torch is None:
                continue
            r = b.overhead(adam, n, impl)
            result["overhead"].append(r)
            say(f"overhead n={n} {impl}: host {_us(r.get('host_s'))} us, wall "
                f"{_us(r.get('wall_s'))} us, launches {r.get('launches')}"
                + (f" {r['error']}" if r.get("error") else ""))

    # CUDA graphs: one step captured and replayed
    small_model = model_shapes(MODELS["small"])
    result["model_shapes"] = "hwoptim.report.model_shapes"
    graph_cases = [(f"Adam float32 n={n}", n) for n in
                   ((10_000,) if quick else (10_000, 1_000_000))]
    for label, n in graph_cases:
        if b.over_budget(f"graph {label}"):
            break

        def make(capturable, n=n):
            w, g = b.normal(n, "float32"), b.normal(n, "float32")
            return hwoptim.Adam(w, capturable=capturable), g
        r = b.graph(label, make)
        result["capturable"].append(r)
        say(f"graph {label}: eager {_us(r.get('eager_capturable_s'))} us, replay "
            f"{_us(r.get('graph_s'))} us" + (f" {r['error']}" if r.get("error") else ""))
    if not b.over_budget("graph model small per tensor"):
        def make_model(capturable):
            ps = [b.normal(s, "float32") for s in small_model]
            gs = [b.normal(s, "float32") for s in small_model]
            return hwoptim.Adam(ps, capturable=capturable), gs
        r = b.graph(f"Adam float32 model small, {len(small_model)} tensors", make_model,
                    rep=20 if quick else 50)
        result["capturable"].append(r)
        say(f"graph model: eager {_us(r.get('eager_capturable_s'))} us, replay "
            f"{_us(r.get('graph_s'))} us" + (f" {r['error']}" if r.get("error") else ""))

    # models
    models = [("small", small_model)]
    if not quick:
        models.insert(0, ("large", model_shapes(MODELS["large"])))
    model_rules = [(adam, {})] + ([] if quick else [(RULES["SGD"], {"momentum": 0.9})])
    for label, shapes in models:
        for rule, kw in model_rules:
            if b.over_budget(f"model {label} {rule.name}"):
                continue
            recs = []
            for impl in ("hwoptim-cupy-flat", "hwoptim-cupy-per-tensor", "floor",
                         "torch-fused", "torch-foreach"):
                if impl.startswith("torch") and not b.torch_has(rule, impl):
                    continue
                r = b.model(label, shapes, rule, kw, "float32", impl)
                recs.append(r)
                say(f"model {label} {rule.name} {impl}: "
                    + (f"{r['time_s'] * 1e3:.3f} ms, launches {r['launches']}"
                       if r.get("time_s") else r.get("error", "?")))
            result["models"] += finish_models(recs)

    rule_cases([c for c in cases if c[2] != "float32"])

    finish_records(result["records"], copy_gbps)
    result["seconds"] = time.perf_counter() - b.t0
    result["summary"] = summary(result)
    if out_dir is not None:
        result["files"] = write_reports(result, out_dir)
    return result


def write_reports(result: dict, out_dir: str) -> list:
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{card_name(result['device']['name'])}-{datetime.date.today().isoformat()}"
    paths = [os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".md")]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths[1], "w") as f:
        f.write(format_markdown(result))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hwoptim.gpubench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="folder for <card>-<date>.json and .md")
    ap.add_argument("--quick", action="store_true", help="fewer cases, smaller sizes (< 1 min)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds; later sections are skipped past it (default: 170, quick 50)")
    ap.add_argument("--log2-n", type=int, default=None,
                    help="log2 of the largest size (float32 Adam); default 28, quick 26")
    args = ap.parse_args(argv)
    from .backends import unavailable
    why = unavailable("cupy")
    if why is not None:
        print(f"gpubench: the cupy backend is unavailable: {why}", file=sys.stderr)
        return 2
    budget = args.budget if args.budget is not None else (50.0 if args.quick else 170.0)
    result = run(quick=args.quick, out_dir=args.out_dir, budget_s=budget, log2_n=args.log2_n,
                 progress=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True))
    print()
    print(format_table(result))
    print()
    print("summary: " + json.dumps(result["summary"], default=str))
    print("wrote " + ", ".join(result.get("files", [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
