"""Benchmark the update rules on this machine and write a report (JSON, Markdown, plots).

    hwoptim bench --quick                  # Adam, SGD, RMSprop, float32, 3 sizes: < 1 minute
    hwoptim bench                          # every rule, default and heaviest options,
                                           # float32 and float64, 1e3 ... 5e7 elements
    hwoptim bench --rules Adam,SGD --sizes 1e4,1e7 --dtypes float32 --threads 2

Every step goes through the public API (``opt.step(g)``). Beside each rule runs its floor:
a kernel with the same arrays, threads, reads and writes and one add per element, the most
a step could cost if the rule's math were free (``hwoptim.codegen.floor_plan``). PyTorch's
CPU optimizers (fused, foreach, for-loop, where torch has them) step the same data.

A number is the median of --pairs interleaved rounds (every implementation once per round,
in rotating order, one process, threads fixed, after warm-up). A sample is a batch of calls
long enough to time well. Effective bandwidth is the bytes the rule must move,
(reads + writes) x itemsize x n, over the time; "x floor" and "x torch" are medians of the
per-round ratios. On a GPU machine (CuPy usable) ``hwoptim.gpubench`` adds the CUDA results.

Writes <out>/<machine>-<date>.json (raw per-round timings, the machine, library versions),
.md (the tables) and -*.png (GB/s against size; speedups over torch).
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

# ----------------------------------------------------------------------------- what runs

# the heaviest option set of each rule: the most arrays and the most math
HEAVY = {
    "Adam": {"amsgrad": True},
    "AdamW": {"amsgrad": True},
    "RMSprop": {"centered": True, "momentum": 0.9},
    "SGD": {"momentum": 0.9, "nesterov": True},
}
SIZES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000, 50_000_000)
DTYPES = ("float32", "float64")
QUICK = dict(rules=("Adam", "SGD", "RMSprop"), sizes=(10_000, 1_000_000, 10_000_000),
             dtypes=("float32",), options="default", sample_s=0.002, models=("small",))
FULL_SAMPLE_S = 0.005
QUICK_GPU_BUDGET_S = 30      # --quick on a GPU machine: gpubench skips what starts later
TORCH_VARIANTS = ("fused", "foreach", "forloop")
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
    return ",".join(f"{k}={v}" for k, v in kwargs.items()) or "default"


def cases(rules=None, which: str = "all") -> list:
    """Cases for ``rules`` (names, any case; None: every rule): ``which`` is "default",
    "heavy" (the heaviest option set, or default for a rule without one) or "all"."""
    from .rules import RULES
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
    from .rules import RULES
    return RULES[case.rule]


def hypers_of(case: Case) -> dict:
    """Every numeric hyperparameter (the spec's defaults, overridden by the case)."""
    rule = rule_of(case)
    h = {n: hy.default for n, hy in rule.hypers.items()}
    h.update({k: v for k, v in case.kwargs.items() if k in rule.hypers})
    return h


def plan_of(case: Case):
    """The kernel plan an optimizer with ``case``'s options runs."""
    from . import codegen
    rule = rule_of(case)
    opt = dict(rule.options)
    opt.update({k: v for k, v in case.kwargs.items() if k in rule.options})
    return codegen.plan(rule, rule.static_flags(hypers_of(case), opt))


def bytes_moved(plan, dtype, n: int) -> int:
    """Bytes a step must move: each array it reads and each it writes, once."""
    return (len(plan.reads) + len(plan.outputs)) * np.dtype(dtype).itemsize * int(n)


def group_bytes(plan, dtype, n: int, impls: int, with_numpy: bool) -> int:
    """Memory one measured group holds: the shared grad and initial params, every
    implementation's params and state, and the numpy backend's temporaries."""
    per_impl = len(plan.arrays) - 1
    return int(n) * np.dtype(dtype).itemsize * (2 + per_impl * impls
                                                + (len(plan.order) if with_numpy else 0))


# ----------------------------------------------------------------------------- implementations

def _torch():
    """``(torch, None)`` or ``(None, why not)``."""
    try:
        import torch
    except Exception as e:           # ImportError, or a broken install
        return None, f"torch not installed ({type(e).__name__}: {e})"
    return torch, None


def torch_step(torch, case: Case, variant: str, params: list, grads: list):
    """``opt.step`` of torch.optim's version of ``case`` over NumPy ``params`` (copied)
    with NumPy ``grads`` (shared); raises if torch lacks the rule or the variant."""
    rule = rule_of(case)
    if rule.torch is None:
        raise ValueError(f"torch has no {rule.name}")
    kw = hypers_of(case)
    kw.update({k: v for k, v in case.kwargs.items() if k in rule.options})
    kw = {k: v for k, v in kw.items() if k not in rule.torch_skip}
    kw.update({"fused": {"fused": True}, "foreach": {"foreach": True},
               "forloop": {"foreach": False}}[variant])
    tps = []
    for p, g in zip(params, grads):
        tp = torch.from_numpy(p.copy())
        tp.grad = torch.from_numpy(g)
        tps.append(tp)
    opt = getattr(torch.optim, rule.torch)(tps, **kw)
    opt._hwoptim_tensors = tps        # keep them alive with the optimizer
    return opt.step


def floor_kernel(plan, dtype):
    """The numba floor kernel for ``plan`` (None, why) if numba is not usable."""
    from . import backends, codegen
    why = backends.unavailable("numba")
    if why is not None:
        return None, f"floor needs numba: {why}"
    return backends.load("numba").kernel(codegen.floor_plan(plan), dtype), None


def build(case: Case, dtype: str, n: int, host_backends, torch_variants, rng,
          numpy_max: int):
    """``({impl: step callable}, {impl: why skipped})`` for one case, dtype and size, all
    on the same initial data. The floor is ``"floor"``; hwoptim backends
    ``"hwoptim-<name>"``; torch ``"torch-<variant>"``."""
    import hwoptim
    plan = plan_of(case)
    p0 = (rng.random(n, dtype=np.float64) - 0.5).astype(dtype)
    g = ((rng.random(n, dtype=np.float64) - 0.5) * 1e-2).astype(dtype)
    fns, skipped = {}, {}
    k, why = floor_kernel(plan, dtype)
    if k is None:
        skipped["floor"] = why
    else:
        arrays = [p0.copy(), g] + [np.zeros(n, dtype) for _ in plan.arrays[2:]]
        fns["floor"] = lambda k=k, a=arrays: k(a, ())
    cls = getattr(hwoptim, case.rule)
    for b in host_backends:
        if b == "numpy" and n > numpy_max:
            skipped[f"hwoptim-{b}"] = f"n > --numpy-max {numpy_max:.0e}"
            continue
        opt = cls(p0.copy(), **case.kwargs, backend=b)
        fns[f"hwoptim-{b}"] = lambda o=opt: o.step(g)
    torch, why = _torch() if torch_variants else (None, None)
    for v in torch_variants:
        if torch is None:
            skipped[f"torch-{v}"] = why
            continue
        try:
            fns[f"torch-{v}"] = torch_step(torch, case, v, [p0], [g])
        except Exception as e:     # no such rule or variant in this torch
            skipped[f"torch-{v}"] = f"n/a in torch {torch.__version__}: {e}"
    return fns, skipped


# ----------------------------------------------------------------------------- timing

def sample(fn, reps: int) -> float:
    """Seconds per call of ``fn``, over ``reps`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def measure(fns: dict, pairs: int = 15, sample_s: float = 0.005, warmup: int = 3,
            max_reps: int = 100_000) -> dict:
    """Interleaved timing: ``{impl: {"samples": [s per call, one per round], "reps",
    "first_call_s"}}``.

    Each implementation is called once (its first call: compile or cache load, timed), then
    ``warmup`` more times; then ``reps`` is chosen so the slowest implementation's sample
    lasts about ``sample_s``, the same for all (so each sample leaves the caches the same
    way: a faster implementation with more calls per sample would find its arrays in cache
    more often); then ``pairs`` rounds each take one sample of every implementation, the
    order rotating by one per round. The garbage collector is off while sampling."""
    names = list(fns)
    out = {}
    for name in names:
        t0 = time.perf_counter()
        fns[name]()
        first = time.perf_counter() - t0
        for _ in range(warmup):
            fns[name]()
        t = sample(fns[name], 1)
        if t < sample_s / 10:
            t = sample(fns[name], max(1, min(max_reps, int(sample_s / 10 / max(t, 1e-9)))))
        reps = max(1, min(max_reps, int(round(sample_s / max(t, 1e-9)))))
        out[name] = {"samples": [], "reps": reps, "first_call_s": first}
    common = min(v["reps"] for v in out.values())
    for v in out.values():
        v["reps"] = common
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(pairs):
            for j in range(len(names)):
                name = names[(j + r) % len(names)]
                out[name]["samples"].append(sample(fns[name], out[name]["reps"]))
    finally:
        if enabled:
            gc.enable()
    return out


def paired_ratio(num: list, den: list) -> float:
    """Median over rounds of ``num[r] / den[r]``."""
    return float(statistics.median(a / b for a, b in zip(num, den)))


def count_launches(fn) -> int:
    """How many backend kernel launches (``run`` or ``unchecked`` calls in hwoptim/backends)
    one call of ``fn`` makes."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "backends")
    count = 0

    def prof(frame, event, arg):
        nonlocal count
        if event == "call" and frame.f_code.co_name in ("run", "unchecked") and \
                os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
            count += 1

    old = sys.getprofile()
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(old)
    return count


def records_from(timings: dict, *, device: str, rule: str, options: str, dtype: str, n: int,
                 nbytes: int, extra: dict | None = None) -> list:
    """Report records for one group of interleaved timings."""
    med = {k: float(statistics.median(v["samples"])) for k, v in timings.items()}
    torch_impls = [k for k in timings if k.startswith("torch-")]
    best_torch = min(torch_impls, key=med.get) if torch_impls else None
    out = []
    for impl, t in timings.items():
        s = t["samples"]
        rec = {"device": device, "rule": rule, "options": options, "impl": impl,
               "dtype": dtype, "n": int(n), "time_s": med[impl], "bytes": int(nbytes),
               "gbps": nbytes / med[impl] / 1e9,
               "frac_floor": (paired_ratio(timings["floor"]["samples"], s)
                              if "floor" in timings else None),
               "vs_torch": (paired_ratio(timings[best_torch]["samples"], s)
                            if best_torch else None),
               "torch_best": best_torch,
               "vs_numpy": (paired_ratio(timings["hwoptim-numpy"]["samples"], s)
                            if "hwoptim-numpy" in timings else None),
               "pairs": len(s), "reps": t["reps"], "first_call_s": t["first_call_s"],
               "samples_s": s}
        rec.update(extra or {})
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- the machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def mem_available() -> int | None:
    """Bytes of memory available to a new allocation (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mem_total() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _version(mod: str):
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:
        return None


def machine_info(torch=None) -> dict:
    import hwoptim
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "simd": [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f") if f in flags],
        "memory_bytes": _mem_total(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"hwoptim": hwoptim.__version__, "numpy": np.__version__,
                     "numba": _version("numba"), "llvmlite": _version("llvmlite"),
                     "torch": getattr(torch, "__version__", None),
                     "cupy": _version("cupy-cuda12x") or _version("cupy"),
                     "matplotlib": _version("matplotlib")},
    }
    try:
        from . import threads
        info["numba_threading"] = threads.threading_layer()
    except Exception as e:
        info["numba_threading"] = {"error": str(e)}
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    try:
        from .backends import numba as nb
        info["serial_below"] = (f"{nb.SERIAL_BELOW} elements (HWOPTIM_SERIAL_BELOW)"
                                if getattr(nb, "SERIAL_BELOW", None) else
                                f"SERIAL_WORK/work(rule) elements, SERIAL_WORK="
                                f"{getattr(nb, 'SERIAL_WORK', '?'):g}")
    except Exception as e:
        info["serial_below"] = f"? ({e})"
    return info


def machine_slug(info: dict) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", info["cpu_model"].lower()).strip("-")
    s = re.sub(r"-(processor|cpu|with-radeon.*|\d+-core)$", "", s)
    return f"{s[:40] or 'cpu'}-{info['cpus_usable']}c"


# ----------------------------------------------------------------------------- progress

class Progress:
    """A one-line progress bar on stderr (a line per item when stderr is not a terminal).

    Also callable as ``progress(done, total, label)`` or ``progress(label)`` (for
    ``hwoptim.gpubench``)."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done, self.stream = max(total, 1), 0, stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.label = ""

    def _draw(self):
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        el = time.perf_counter() - self.t0
        eta = f"{el / frac - el:4.0f}s left" if 0 < frac < 1 else f"{el:4.0f}s"
        width = 24
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        line = f"[{bar}] {self.done:>3}/{self.total} {eta}  {self.label}"
        if self.tty:
            self.stream.write("\r" + line[:118].ljust(118))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def start(self, label: str):
        self.label = label
        if self.tty:
            self._draw()

    def advance(self, k: int = 1):
        self.done += k
        self._draw()

    def __call__(self, *args, **kw):
        if len(args) >= 3:
            done, total, label = args[:3]
            self.label = f"GPU {done}/{total} {label}"
        elif args:
            self.label = f"GPU {args[0]}"
        if self.tty:
            self._draw()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------- models

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


def build_model(name: str, total: int, dtype: str, host_backends, torch_variants, rng):
    """Implementations over one model-like list: hwoptim flat (one vector), hwoptim per
    tensor (a list), torch over the list, and the floor over the flat vector."""
    import hwoptim
    case = Case("Adam", "default", {})
    plan = plan_of(case)
    shapes = model_shapes(total)
    inits = [(rng.random(s, dtype=np.float64) - 0.5).astype(dtype) for s in shapes]
    grads = [((rng.random(s, dtype=np.float64) - 0.5) * 1e-2).astype(dtype) for s in shapes]
    flat = hwoptim.FlatParams.from_arrays(inits)
    for v, gr in zip(flat.grad_views, grads):
        v[...] = gr
    n = int(sum(int(np.prod(s)) for s in shapes))
    fns, skipped = {}, {}
    k, why = floor_kernel(plan, dtype)
    if k is None:
        skipped["floor"] = why
    else:
        arrays = [flat.params.copy(), flat.grads] + [np.zeros(flat.size, dtype)
                                                     for _ in plan.arrays[2:]]
        fns["floor"] = lambda k=k, a=arrays: k(a, ())
    for b in host_backends:
        if b != "numba":
            continue
        opt = hwoptim.Adam(flat.params, backend=b)
        fns[f"hwoptim-{b}-flat"] = lambda o=opt, g=flat.grads: o.step(g)
        opt2 = hwoptim.Adam([a.copy() for a in inits], backend=b)
        fns[f"hwoptim-{b}-per-tensor"] = lambda o=opt2: o.step(grads)
    torch, why = _torch() if torch_variants else (None, None)
    for v in torch_variants:
        if v == "forloop":
            continue
        if torch is None:
            skipped[f"torch-{v}"] = why
            continue
        fns[f"torch-{v}"] = torch_step(torch, case, v, inits, grads)
    return fns, skipped, n, bytes_moved(plan, dtype, n), len(shapes)


# ----------------------------------------------------------------------------- the run

def _parse_sizes(text: str) -> tuple:
    out = []
    for s in text.split(","):
        s = s.strip()
        if not s:
            continue
        try:
            v = float(s)
        except ValueError:
            raise SystemExit(f"hwoptim bench: --sizes: {s!r} is not a number") from None
        if v < 1 or v != int(v):
            raise SystemExit(f"hwoptim bench: --sizes: {s!r} is not a positive integer")
        out.append(int(v))
    return tuple(out)


def _csv(text):
    return tuple(s.strip() for s in text.split(",") if s.strip()) if text else None


def add_arguments(parser) -> None:
    import argparse
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--rules", help="comma-separated rule names (default: every rule)")
    parser.add_argument("--options", choices=("default", "heavy", "all"), default=None,
                        help="option sets per rule: default, heavy (amsgrad, centered + "
                             "momentum, nesterov), all (both; the default)")
    parser.add_argument("--backends", help="comma-separated backends (default: every "
                        "available one; cupy runs hwoptim.gpubench)")
    parser.add_argument("--sizes", help="comma-separated element counts, e.g. 1e4,1e7 "
                        "(default 1e3,1e4,1e5,1e6,1e7,5e7)")
    parser.add_argument("--dtypes", help="float32,float64 (default both)")
    parser.add_argument("--quick", action="store_true",
                        help="Adam, SGD, RMSprop; float32; 1e4, 1e6, 1e7; the small model "
                             "(under a minute)")
    parser.add_argument("--out", default="hwoptim-report", help="output folder "
                        "(default ./hwoptim-report)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for Numba and torch (default: Numba's pool size, "
                             "NUMBA_NUM_THREADS or the core count)")
    parser.add_argument("--pairs", type=int, default=15,
                        help="interleaved rounds per measurement (default 15)")
    parser.add_argument("--sample-ms", type=float, default=None,
                        help="length of one timed sample (default 5, --quick 2)")
    parser.add_argument("--numpy-max", type=float, default=1e7,
                        help="largest size for the (slow) numpy backend (default 1e7)")
    parser.add_argument("--models", default=None,
                        help="model-like 200-tensor lists (Adam, float32): small "
                             "(1e6 elements), large (5e7), both, or none (default: both "
                             "in a full run, small with --quick, none with --sizes or "
                             "--rules)")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def run(args) -> int:
    from . import backends
    t_start = time.perf_counter()
    quick = bool(args.quick)
    try:
        case_list = cases(_csv(args.rules) or (QUICK["rules"] if quick else None),
                          args.options or ("default" if quick else "all"))
    except ValueError as e:
        print(f"hwoptim bench: --rules: {e}", file=sys.stderr)
        return 2
    sizes = _parse_sizes(args.sizes) if args.sizes else (QUICK["sizes"] if quick else SIZES)
    dtypes = _csv(args.dtypes) or (QUICK["dtypes"] if quick else DTYPES)
    for d in dtypes:
        if d not in DTYPES:
            print(f"hwoptim bench: --dtypes: {d!r}; expected float32 or float64",
                  file=sys.stderr)
            return 2
    if args.pairs < 1:
        print("hwoptim bench: --pairs must be at least 1 (15 or more for the targets)",
              file=sys.stderr)
        return 2
    sample_s = (args.sample_ms / 1e3 if args.sample_ms else
                QUICK["sample_s"] if quick else FULL_SAMPLE_S)
    if args.models is not None:
        models = _csv(args.models)
    elif quick:
        models = QUICK["models"]
    elif args.sizes or args.rules:          # a chosen subset: no models unless asked
        models = ()
    else:
        models = tuple(MODELS)
    models = tuple(m for m in models or () if m != "none")
    if "both" in models:
        models = tuple(MODELS)
    for m in models:
        if m not in MODELS:
            print(f"hwoptim bench: --models: {m!r}; expected small, large or none",
                  file=sys.stderr)
            return 2

    notes = []
    requested = _csv(args.backends)
    if requested:
        for b in requested:
            if b not in backends.names():
                print(f"hwoptim bench: --backends: no backend {b!r}; expected some of "
                      f"{', '.join(backends.names())}", file=sys.stderr)
                return 2
    host = []
    for b in requested or backends.names():
        why = backends.unavailable(b)
        if b in ("numpy", "numba"):
            if why is None:
                host.append(b)
            else:
                notes.append(f"backend {b} skipped: {why}")
    want_gpu = requested is None or "cupy" in requested

    # threads: numba's and torch's the same, fixed for the run. torch's pool is set up
    # first: starting Numba's OpenMP pool before torch's first set_num_threads makes torch's
    # foreach and for-loop optimizers ~25x slower in this process (one shared libgomp;
    # bench/NOTES.md), which would flatter hwoptim.
    from . import threads
    torch = None
    torch_variants = () if args.no_torch else TORCH_VARIANTS
    torch_missing = "torch skipped" if args.no_torch else None
    if args.no_torch:
        notes.append("torch skipped (--no-torch)")
    else:
        torch, why = _torch()
        if torch is None:
            notes.append(why)
            torch_variants = ()
            torch_missing = "torch not installed"
    if args.threads is not None and args.threads < 1:
        print("hwoptim bench: --threads must be at least 1", file=sys.stderr)
        return 2
    if "numba" in host:
        import numba
        pool = int(numba.config.NUMBA_NUM_THREADS)
        if args.threads is not None and args.threads > pool:
            print(f"hwoptim bench: --threads {args.threads}: Numba's pool has {pool} "
                  f"threads (set NUMBA_NUM_THREADS for more)", file=sys.stderr)
            return 2
        nthreads = args.threads or pool
    else:
        nthreads = args.threads or os.cpu_count()
    if torch is not None:
        torch.set_num_threads(nthreads)
    if "numba" in host:
        threads.set_num_threads(nthreads)
        nthreads = threads.get_num_threads()

    info = machine_info(torch)
    device = info["cpu_model"]
    numpy_max = int(args.numpy_max)
    groups = [(c, d, n) for c in case_list for d in dtypes for n in sizes]
    progress = Progress(len(groups) + len(models) + (1 if want_gpu else 0))
    records, model_records, compile_s = [], [], {}
    rng = np.random.default_rng(0)
    avail = mem_available()

    for case, dtype, n in groups:
        progress.start(f"{case.label} {dtype} n={n:.0e}")
        plan = plan_of(case)
        need = group_bytes(plan, dtype, n, 1 + len(host) + len(torch_variants),
                           "numpy" in host and n <= numpy_max)
        avail = mem_available()
        if avail is not None and need > 0.8 * avail:
            notes.append(f"{case.label} {dtype} n={n}: skipped, needs ~{need / 2**30:.1f} "
                         f"GiB of {avail / 2**30:.1f} GiB available")
            progress.advance()
            continue
        fns, skipped = build(case, dtype, n, host, torch_variants, rng, numpy_max)
        timings = measure(fns, args.pairs, sample_s)
        for impl in fns:        # compile or cache load: the first call's excess, all sizes
            if impl in ("hwoptim-numba", "floor"):   # the compiled ones
                key = f"{case.label} {dtype} {impl}"
                extra = timings[impl]["first_call_s"] - statistics.median(
                    timings[impl]["samples"])
                compile_s[key] = compile_s.get(key, 0.0) + max(0.0, extra)
        recs = records_from(timings, device=device, rule=case.rule, options=case.options,
                            dtype=dtype, n=n, nbytes=bytes_moved(plan, dtype, n),
                            extra={"threads": nthreads})
        kinds = _kernel_kinds(plan, dtype, n)
        for r in recs:
            if r["impl"] in kinds:
                r["kernel"] = kinds[r["impl"]]
        for impl, why in skipped.items():
            recs.append({"device": device, "rule": case.rule, "options": case.options,
                         "impl": impl, "dtype": dtype, "n": n, "skipped": why})
        records += recs
        del fns, timings
        gc.collect()
        progress.advance()

    for m in models:
        total = MODELS[m]
        progress.start(f"model {m} ({MODEL_TENSORS} tensors, {total:.0e})")
        need = total * 4 * (2 + 3 * (2 + len(torch_variants)) + 4)
        avail = mem_available()
        if avail is not None and need > 0.8 * avail:
            notes.append(f"model {m}: skipped, needs ~{need / 2**30:.1f} GiB")
            progress.advance()
            continue
        fns, skipped, n, nbytes, count = build_model(m, total, "float32", host,
                                                     torch_variants, rng)
        launches = {k: count_launches(f) for k, f in fns.items() if k.startswith("hwoptim")}
        timings = measure(fns, args.pairs, sample_s)
        recs = records_from(timings, device=device, rule="Adam", options="default",
                            dtype="float32", n=n, nbytes=nbytes,
                            extra={"model": m, "tensors": count, "threads": nthreads})
        for r in recs:
            r["launches"] = launches.get(r["impl"])
            if "torch-fused" in timings:
                r["vs_torch_fused"] = paired_ratio(timings["torch-fused"]["samples"],
                                                   r["samples_s"])
        for impl, why in skipped.items():
            recs.append({"device": device, "rule": "Adam", "options": "default",
                         "impl": impl, "dtype": "float32", "n": n, "model": m,
                         "skipped": why})
        model_records += recs
        del fns, timings
        gc.collect()
        progress.advance()

    gpu = None
    if want_gpu:
        progress.start("GPU")
        gpu = _run_gpu(quick, args.out, progress, notes)
        if gpu:
            records += list(gpu.get("records") or [])
            model_records += [dict(r, device=r.get("device", gpu.get("device", {})
                                                   .get("name", "GPU")))
                              for r in (gpu.get("models") or []) if isinstance(r, dict)]
        progress.advance()
    else:
        notes.append("no GPU: cupy not in --backends")
    progress.close()

    elapsed = time.perf_counter() - t_start
    report = {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": _command(args),
        "quick": quick,
        "machine": info,
        "threads": nthreads,
        "torch_missing": torch_missing,
        "pairs": args.pairs,
        "sample_s": sample_s,
        "elapsed_s": elapsed,
        "method": ("median of interleaved rounds; bytes = (reads + writes) x itemsize x n; "
                   "floor = same arrays and threads, one add per element; ratios are "
                   "medians of per-round ratios"),
        "records": records,
        "models": model_records,
        "compile_or_load_s": compile_s,
        "gpu": ({k: v for k, v in gpu.items() if k not in ("records", "models", "_markdown")}
                if gpu else None),
        "notes": notes,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{machine_slug(info)}-{time.strftime('%Y%m%d-%H%M%S')}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1, default=_json_default)
    pngs = []
    if not args.no_plots:
        pngs = plots(report, stem, notes)
    if gpu and gpu.get("_markdown"):
        report["gpu_markdown"] = gpu["_markdown"]
    md = markdown(report, [os.path.basename(p) for p in pngs])
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(summary_text(report))
    print(f"\nwrote {stem}.json, {stem}.md" + "".join(f", {p}" for p in pngs)
          + f" ({elapsed:.0f} s)")
    return 0


def _kernel_kinds(plan, dtype, n) -> dict:
    """Which numba kernel (serial or parallel) the rule and its floor run at ``n``."""
    from . import backends, codegen
    if backends.unavailable("numba"):
        return {}
    nb = backends.load("numba")
    if not hasattr(nb, "serial_below"):
        return {}
    kind = lambda p: "serial" if n < nb.serial_below(p, dtype) else "parallel"  # noqa: E731
    return {"hwoptim-numba": kind(plan), "floor": kind(codegen.floor_plan(plan))}


def _command(args) -> str:
    """The command line that reproduces this run (options that differ from defaults)."""
    parts = ["hwoptim bench"]
    defaults = {"options": None, "out": "hwoptim-report", "pairs": 15, "numpy_max": 1e7}
    for k, v in vars(args).items():
        if k in ("command", "func") or v in (None, False) or defaults.get(k, object()) == v:
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {v}")
    return " ".join(parts)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _run_gpu(quick, out_dir, progress, notes):
    from . import backends
    why = backends.unavailable("cupy")
    if why is not None:
        notes.append(f"no GPU: {why}")
        return None
    try:
        from . import gpubench
    except ImportError as e:
        notes.append(f"no GPU: hwoptim.gpubench cannot be imported ({e})")
        return None
    import inspect
    kw = {}
    if quick and "budget_s" in inspect.signature(gpubench.run).parameters:
        kw["budget_s"] = QUICK_GPU_BUDGET_S
    try:
        result = gpubench.run(quick=quick, out_dir=out_dir, progress=progress, **kw)
    except Exception as e:      # report what happened, keep the CPU results
        notes.append(f"GPU benchmark failed: {type(e).__name__}: {e}")
        return None
    try:
        result["_markdown"] = gpubench.format_markdown(result)
    except Exception:
        pass
    return result


# ----------------------------------------------------------------------------- output

def _fmt_n(n: int) -> str:
    e = int(math.floor(math.log10(n))) if n > 0 else 0
    m = n / 10 ** e
    return f"1e{e}" if m == 1 else (f"{m:g}e{e}" if m == int(m) else f"{n:,}")


def _fmt_t(s) -> str:
    if s is None:
        return "—"
    us = s * 1e6
    return f"{us:.2f}" if us < 10 else f"{us:.1f}" if us < 100 else f"{us:,.0f}"


def _fmt_x(x) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _timed(records):
    return [r for r in records if r.get("time_s") and r.get("gbps")]


def _groups(records):
    """{(device, rule, options, dtype, n): {impl: record}} in first-seen order."""
    g = {}
    for r in _timed(records):
        g.setdefault((r["device"], r["rule"], r["options"], r["dtype"], r["n"]),
                     {})[r["impl"]] = r
    return g


def _best_hwoptim(by_impl: dict):
    """The row a summary shows: the backend hwoptim picks by default (numba on a CPU,
    cupy on a GPU), else the fastest hwoptim implementation there is."""
    for pref in ("hwoptim-numba", "hwoptim-cupy"):
        if pref in by_impl:
            return by_impl[pref]
    hw = [r for k, r in by_impl.items() if k.startswith("hwoptim-")]
    return min(hw, key=lambda r: r["time_s"]) if hw else None


def summary_rows(records, cpu=None, torch_missing=None) -> list:
    rows = []
    for (dev, rule, opts, dtype, n), by in _groups(records).items():
        hw = _best_hwoptim(by)
        fl = by.get("floor")
        if hw is None:
            continue
        tb = hw.get("torch_best")
        impl = hw["impl"].replace("hwoptim-", "")
        if hw.get("kernel"):
            impl += f" ({hw['kernel']})"
        if cpu is not None and dev != cpu:
            impl += f" on {dev}"
        rows.append([rule, opts, dtype, _fmt_n(n), impl,
                     _fmt_t(hw["time_s"]), f"{hw['gbps']:.1f}",
                     f"{fl['gbps']:.1f}" if fl else "—", _fmt_x(hw.get("frac_floor")),
                     (f"{_fmt_x(hw['vs_torch'])}"
                      + (f" ({tb.replace('torch-', '')})" if tb else "")
                      if hw.get("vs_torch") is not None else torch_missing or "—"),
                     _fmt_x(by["hwoptim-numba"].get("vs_numpy"))
                     if "hwoptim-numba" in by else "—"])
    return rows


SUMMARY_HEAD = ["rule", "options", "dtype", "n", "hwoptim", "µs/step", "GB/s",
                "floor GB/s", "× floor", "× torch best", "× numpy"]


def summary_text(report) -> str:
    out = []
    info = report["machine"]
    th = info.get("numba_threading", {})
    out.append(f"{info['cpu_model']}, {info['cpus_usable']} CPUs; numba "
               f"{th.get('layer')} x{th.get('threads')}; "
               f"{report['pairs']} interleaved rounds per number")
    out.append(_table(SUMMARY_HEAD, summary_rows(report["records"], info["cpu_model"],
                                             report.get("torch_missing"))))
    if report["models"]:
        out.append("")
        out.append(_table(MODEL_HEAD, model_rows(report["models"], info["cpu_model"])))
    for n in report["notes"]:
        out.append(f"note: {n}")
    return "\n".join(out)


MODEL_HEAD = ["model", "tensors", "n", "impl", "launches/step", "µs/step", "GB/s",
              "× floor", "× torch fused"]


def model_rows(records, cpu=None) -> list:
    rows = []
    for r in _timed(records):
        rows.append([r.get("model", "—"), r.get("tensors", "—"), _fmt_n(r["n"]),
                     r["impl"] + ("" if r.get("device") in (None, cpu) else " (GPU)"),
                     r.get("launches") if r.get("launches") is not None else "—",
                     _fmt_t(r["time_s"]), f"{r['gbps']:.1f}", _fmt_x(r.get("frac_floor")),
                     _fmt_x(r.get("vs_torch_fused", r.get("vs_torch")))])
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
              "what a step costs if its math were free. × floor, × torch (the fastest torch "
              "variant at that size) and × numpy are medians of per-round time ratios "
              "(> 1: hwoptim is faster).", "",
              "## Summary", "", _table(SUMMARY_HEAD, summary_rows(report["records"], info["cpu_model"],
                                             report.get("torch_missing"))), ""]
    impls = []
    for r in _timed(report["records"]):
        if r["impl"] not in impls:
            impls.append(r["impl"])
    rows = []
    for (dev, rule, opts, dtype, n), by in _groups(report["records"]).items():
        rows.append([rule, opts, dtype, _fmt_n(n)] + [_fmt_t(by[i]["time_s"]) if i in by
                                                      else "—" for i in impls])
    lines += ["## Every implementation (µs per step)", "",
              _table(["rule", "options", "dtype", "n"] + impls, rows), ""]
    if report["models"]:
        lines += ["## Model-like parameter lists (Adam, float32)", "",
                  "hwoptim over one flat vector (`hwoptim.FlatParams`), hwoptim over the list "
                  "of arrays, torch over the list of tensors; the floor runs over the flat "
                  "vector.", "",
                  _table(MODEL_HEAD, model_rows(report["models"], info["cpu_model"])), ""]
    if gpu:
        lines += ["## GPU (hwoptim.gpubench)", ""]
        md = report.get("gpu_markdown")
        if md:   # its own report, headings one level down
            lines += [re.sub(r"^(#+)", r"#\1", ln) for ln in md.strip().splitlines()]
        else:
            for k in ("overhead", "capturable"):
                if gpu.get(k):
                    lines.append(f"- {k}: `{json.dumps(gpu[k], default=_json_default)[:400]}`")
        lines.append("")
    if report["compile_or_load_s"]:
        lines += ["## Compile or cache load", "",
                  "Seconds the first calls took beyond a normal call, summed over sizes "
                  "(a size that switches to the parallel kernel loads or compiles it). "
                  "With a warm disk cache (`~/.cache/hwoptim`) this is a load.", "",
                  _table(["kernels", "s"], [[k, f"{v:.2f}"] for k, v in
                                           report["compile_or_load_s"].items()]), ""]
    skipped = [r for r in report["records"] + report["models"] if "skipped" in r]
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


_STYLE = {"floor": dict(color="black", ls="--", lw=1.5),
          "torch-fused": dict(color="#d62728", ls=":", marker="s"),
          "torch-foreach": dict(color="#ff7f0e", ls=":", marker="^"),
          "torch-forloop": dict(color="#8c564b", ls=":", marker="v"),
          "hwoptim-numba": dict(color="#1f77b4", ls="-", marker="o", lw=2),
          "hwoptim-numpy": dict(color="#2ca02c", ls="-", marker="o")}


def plots(report, stem: str, notes: list) -> list:
    """GB/s against size (one panel per rule and option set; one file per device kind and
    dtype) and speedups over torch's fastest variant. Returns the PNG paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        notes.append(f"plots skipped: matplotlib cannot be imported ({e}); "
                     f"pip install 'hwoptim[viz]'")
        return []
    recs = _timed(report["records"])
    cpu = report["machine"]["cpu_model"]
    out = []
    kinds = {}
    for r in recs:
        kinds.setdefault(("cpu" if r["device"] == cpu else "gpu", r["dtype"]), []).append(r)
    for (kind, dtype), rs in kinds.items():
        panels = []
        for r in rs:
            if (r["rule"], r["options"]) not in panels:
                panels.append((r["rule"], r["options"]))
        cols = min(4, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
        for ax, (rule, opts) in zip(axes.flat, panels):
            by = {}
            for r in rs:
                if (r["rule"], r["options"]) == (rule, opts):
                    by.setdefault(r["impl"], []).append((r["n"], r["gbps"]))
            for impl, pts in by.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=impl,
                        **_STYLE.get(impl, dict(marker=".")))
            ax.set_xscale("log")
            ax.set_title(rule if opts == "default" else f"{rule} [{opts}]", fontsize=9)
            ax.set_xlabel("elements")
            ax.set_ylabel("effective GB/s")
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        handles, labels = [], []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)),
                   fontsize=8, frameon=False)
        fig.suptitle(f"{cpu if kind == 'cpu' else rs[0]['device']}, {dtype}: effective "
                     f"bandwidth (bytes the rule must move / time)", fontsize=10)
        fig.tight_layout(rect=(0, 0.06, 1, 0.95))
        path = f"{stem}-{kind}-gbps-{dtype}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        out.append(path)

    # speedup of hwoptim (its default backend) over torch's fastest variant
    bars = {}
    for (dev, rule, opts, dtype, n), by in _groups(recs).items():
        hw = _best_hwoptim(by)
        if hw is None or hw.get("vs_torch") is None:
            continue
        label = (rule if opts == "default" else f"{rule}[{opts}]") + f"\n{dtype}"
        if dev != cpu:
            label += "\nGPU"
        bars.setdefault(label, {})[n] = hw["vs_torch"]
    if bars:
        sizes = sorted({n for v in bars.values() for n in v})
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars) * max(1, len(sizes)) / 3), 4))
        w = 0.8 / len(sizes)
        cmap = plt.get_cmap("viridis")
        for j, n in enumerate(sizes):
            xs = [i + (j - (len(sizes) - 1) / 2) * w for i in range(len(bars))]
            ys = [v.get(n, float("nan")) for v in bars.values()]
            ax.bar(xs, ys, width=w, label=f"n={_fmt_n(n)}",
                   color=cmap(j / max(1, len(sizes) - 1)))
        ax.axhline(1.0, color="black", lw=1)
        ax.set_yscale("log")
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels(list(bars), fontsize=7)
        ax.set_ylabel("speedup over torch's fastest CPU variant")
        ax.legend(fontsize=7, ncol=min(6, len(sizes)))
        ax.grid(True, axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        path = f"{stem}-speedup.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        out.append(path)
    return out
