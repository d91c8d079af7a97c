"""Benchmark the update rules on this machine and write a report (JSON, Markdown, plots).

    hwoptim bench --quick                  # Adam, SGD, RMSprop, float32, 3 sizes: < 1 minute
    hwoptim bench                          # every rule, default and heaviest options,
                                           # float32 and float64, 1e3 ... 5e7 elements
    hwoptim bench --rules Adam,SGD --sizes 1e4,1e7 --dtypes float32 --threads 2
    hwoptim bench --models real --sizes none   # AdamW on GPT-2 small, ResNet-50 and a
                                           # 1e6-parameter CNN's tensors, nothing else
    hwoptim bench --contention             # steps while other processes keep cores busy
    hwoptim bench --interleaved            # steps between NumPy/torch matrix products

Every step goes through the public API (``opt.step(g)``). Beside each rule runs its floor:
a kernel with the same arrays, threads, reads and writes and one add per element, the most
a step could cost if the rule's math were free (``hwoptim.codegen.floor_plan``). PyTorch's
CPU optimizers (fused, foreach, for-loop, where torch has them) step the same data.

A number is the median of --pairs interleaved rounds (every implementation once per round,
in rotating order, one process, threads fixed, after warm-up). A sample is a batch of calls
long enough to time well. Effective bandwidth is the bytes the rule must move,
(reads + writes) x itemsize x n, over the time; "x floor" and "x torch" are ratios of the
medians shown, and times show their interquartile range. A figure whose spread is over 10%
of its median, or whose median of per-round ratios differs from the ratio of the medians by
over 10%, is marked (noisy), and the report says the run was. On a GPU machine (CuPy
usable) ``hwoptim.bench.gpu`` adds the CUDA results.

--models real adds the parameter tensors of real models (``hwoptim.bench.real_models``:
GPT-2 small, ResNet-50, a ~1e6-parameter CNN; built with torch.nn on the meta device and
checked against the published counts), float32 AdamW: hwoptim.torch.AdamW (default
backend), torch.optim.AdamW fused and foreach, hwoptim.AdamW over one flat vector, and the
floor over the same bytes, interleaved on shared memory (``impls.build_real_model``).

Writes <out>/<machine>-<date>.json (raw per-round timings, the machine, library versions),
.md (the tables) and -*.png (GB/s against size; speedups over torch).

--contention and --interleaved run those sections instead (``hwoptim.bench.contention``,
``hwoptim.bench.interleaved``; --sizes, --pairs, --sample-ms, --threads and --no-torch apply)
and write <machine>-<date>-contention.json/.md and -interleaved.json/.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import hwoptim
from hwoptim import backends

from . import files
from .cpu import Settings, measure_all
from .impls import TORCH_VARIANTS, torch_or_why
from .machine import machine_info
from .progress import Progress
from .report_plots import plots
from .report_text import markdown, noisy_note, summary_text
from .real_models import REAL_MODELS
from .workload import DTYPES, MODELS, SIZES, cases

QUICK = dict(rules=("Adam", "SGD", "RMSprop"), sizes=(10_000, 1_000_000, 10_000_000),
             dtypes=("float32",), options="default", sample_s=0.002, models=("small",))
FULL_SAMPLE_S = 0.005
QUICK_GPU_BUDGET_S = 30      # --quick on a GPU machine: the GPU run skips what starts later


class UsageError(Exception):
    """A bad command-line value: the message names the option, the value and what fits."""


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--rules", help="comma-separated rule names (default: every rule)")
    parser.add_argument("--options", choices=("default", "heavy", "all"), default=None,
                        help="option sets per rule: default, heavy (amsgrad, centered + "
                             "momentum, nesterov), all (both; the default)")
    parser.add_argument("--backends", help="comma-separated backends (default: every "
                        "available one; cupy runs the GPU benchmark, hwoptim.bench.gpu)")
    parser.add_argument("--sizes", help="comma-separated element counts, e.g. 1e4,1e7 "
                        "(default 1e3,1e4,1e5,1e6,1e7,5e7), or none: no single-array "
                        "cases (only the models)")
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
                             "--rules); and real models' tensors (AdamW, float32, needs "
                             "torch): real (all of " + ", ".join(REAL_MODELS) + ") or "
                             "any of them by name")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--contention", action="store_true",
                        help="instead: Adam float32, default threads against one thread, "
                             "with none, one or every core kept busy by other processes "
                             "(sizes 1e4,1e5,1e6,1e7; target <= 1.5x)")
    parser.add_argument("--formats", action="store_true",
                        help="instead: one rule (--rules, default Adam) in every storage "
                             "format (16-bit params, bfloat16/int8 state, master weights, "
                             "stochastic rounding) against its byte floor, its arithmetic "
                             "and torch's fused float32 Adam (--sizes, default 1e7,5e7)")
    parser.add_argument("--interleaved", action="store_true",
                        help="instead: Adam float32 steps alternating with NumPy and torch "
                             "matrix products (sizes 1e5,1e7; target <= 1.2x the two apart)")


# ----------------------------------------------------------------------------- the options

def _csv(text):
    return tuple(s.strip() for s in text.split(",") if s.strip()) if text else None


def parse_sizes(text: str) -> tuple:
    if text.strip().lower() == "none":
        return ()
    out = []
    for s in text.split(","):
        s = s.strip()
        if not s:
            continue
        try:
            v = float(s)
        except ValueError:
            raise UsageError(f"--sizes: {s!r} is not a number") from None
        if v < 1 or v != int(v):
            raise UsageError(f"--sizes: {s!r} is not a positive integer")
        out.append(int(v))
    return tuple(out)


def _models(args, quick: bool) -> tuple:
    """(model-like lists, real models) named by --models."""
    if args.models is not None:
        models = _csv(args.models)
    elif quick:
        models = QUICK["models"]
    elif args.sizes or args.rules:          # a chosen subset: no models unless asked
        models = ()
    else:
        models = tuple(MODELS)
    models = tuple(m for m in models or () if m != "none")
    real = []
    for m in models:
        for r in (REAL_MODELS if m == "real" else (m,) if m in REAL_MODELS else ()):
            if r not in real:
                real.append(r)
    models = tuple(m for m in models if m != "real" and m not in REAL_MODELS)
    if "both" in models:
        models = tuple(MODELS)
    for m in models:
        if m not in MODELS:
            raise UsageError(f"--models: {m!r}; expected small, large, both, none, real "
                             f"or one of {', '.join(REAL_MODELS)}")
    return models, tuple(real)


def _host_backends(args, notes: list) -> tuple:
    """(host backends to time, whether to run the GPU benchmark)."""
    requested = _csv(args.backends)
    for b in requested or ():
        if b not in backends.names():
            raise UsageError(f"--backends: no backend {b!r}; expected some of "
                             f"{', '.join(backends.names())}")
    host = []
    for b in requested or backends.names():
        why = backends.unavailable(b)
        if b in ("numpy", "numba"):
            if why is None:
                host.append(b)
            else:
                notes.append(f"backend {b} skipped: {why}")
    return tuple(host), requested is None or "cupy" in requested


@dataclass
class Plan:
    """What one ``hwoptim bench`` run measures, from its options."""
    quick: bool
    cases: list
    sizes: tuple
    dtypes: tuple
    sample_s: float
    models: tuple
    host: tuple
    want_gpu: bool
    notes: list = field(default_factory=list)
    real: tuple = ()


def plan_from(args) -> Plan:
    """The run's plan; raises :class:`UsageError` for a bad option."""
    quick = bool(args.quick)
    try:
        case_list = cases(_csv(args.rules) or (QUICK["rules"] if quick else None),
                          args.options or ("default" if quick else "all"))
    except ValueError as e:
        raise UsageError(f"--rules: {e}") from None
    sizes = parse_sizes(args.sizes) if args.sizes else (QUICK["sizes"] if quick else SIZES)
    dtypes = _csv(args.dtypes) or (QUICK["dtypes"] if quick else DTYPES)
    for d in dtypes:
        if d not in DTYPES:
            raise UsageError(f"--dtypes: {d!r}; expected float32 or float64")
    if args.pairs < 1:
        raise UsageError("--pairs must be at least 1 (15 or more for the targets)")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be at least 1")
    sample_s = (args.sample_ms / 1e3 if args.sample_ms else
                QUICK["sample_s"] if quick else FULL_SAMPLE_S)
    notes = []
    models, real = _models(args, quick)
    host, want_gpu = _host_backends(args, notes)
    return Plan(quick, case_list, sizes, dtypes, sample_s, models, host, want_gpu, notes,
                real)


def fix_threads(requested, host, torch) -> int:
    """Numba's and torch's threads, the same, fixed for the run; returns the count.

    torch's pool is set up first: starting Numba's OpenMP pool before torch's first
    set_num_threads makes torch's foreach and for-loop optimizers ~25x slower in this
    process (one shared libgomp; bench/NOTES.md), which would flatter hwoptim."""
    if "numba" in host:
        import numba
        pool = int(numba.config.NUMBA_NUM_THREADS)
        if requested is not None and requested > pool:
            raise UsageError(f"--threads {requested}: Numba's pool has {pool} threads "
                             f"(set NUMBA_NUM_THREADS for more)")
        nthreads = requested or pool
    else:
        nthreads = requested or os.cpu_count()
    if torch is not None:
        torch.set_num_threads(nthreads)
    if "numba" in host:
        hwoptim.set_num_threads(nthreads)
        nthreads = hwoptim.get_num_threads()
    return nthreads


def _torch_for(args, notes: list):
    """(torch or None, its variants to time, what the tables say where torch is missing)."""
    if args.no_torch:
        notes.append("torch skipped (--no-torch)")
        return None, (), "torch skipped"
    torch, why = torch_or_why()
    if torch is None:
        notes.append(why)
        return None, (), "torch not installed"
    return torch, TORCH_VARIANTS, None


# ----------------------------------------------------------------------------- the GPU

def run_gpu(quick, out_dir, progress, notes):
    """The GPU benchmark's result, with its Markdown; None (and a note) without a GPU."""
    why = backends.unavailable("cupy")
    if why is not None:
        notes.append(f"no GPU: {why}")
        return None
    from . import gpu
    try:
        result = gpu.run(quick=quick, out_dir=out_dir, progress=progress,
                         budget_s=QUICK_GPU_BUDGET_S if quick else None)
    except Exception as e:      # report what happened, keep the CPU results
        notes.append(f"GPU benchmark failed: {type(e).__name__}: {e}")
        return None
    try:
        result["_markdown"] = gpu.format_markdown(result)
    except Exception:
        pass
    return result


def _merge_gpu(gpu, records, model_records):
    records += list(gpu.get("records") or [])
    name = gpu.get("device", {}).get("name", "GPU")
    model_records += [dict(r, device=r.get("device", name))
                      for r in (gpu.get("models") or []) if isinstance(r, dict)]


# ----------------------------------------------------------------------------- the report

def command_line(args) -> str:
    """The command line that reproduces this run (options that differ from defaults)."""
    parts = ["hwoptim bench"]
    defaults = {"options": None, "out": "hwoptim-report", "pairs": 15, "numpy_max": 1e7}
    for k, v in vars(args).items():
        if k in ("command", "func") or v in (None, False) or defaults.get(k, object()) == v:
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {v}")
    return " ".join(parts)


def write_report(report: dict, gpu, out: str, with_plots: bool) -> None:
    """<out>/<machine>-<date>.json, .md and the plots; prints the summary."""
    path = files.stem(out, report["machine"])
    with open(path + ".json", "w") as f:
        json.dump(report, f, indent=1, default=files.json_default)
    pngs = plots(report, path, report["notes"]) if with_plots else []
    if gpu and gpu.get("_markdown"):
        report["gpu_markdown"] = gpu["_markdown"]
    with open(path + ".md", "w") as f:
        f.write(markdown(report, [os.path.basename(p) for p in pngs]))
    print(summary_text(report))
    print(f"\nwrote {path}.json, {path}.md" + "".join(f", {p}" for p in pngs)
          + f" ({report['elapsed_s']:.0f} s)")


def _progress(total: int):
    """(a Progress, a ``say(label)`` that advances it by one item per new label)."""
    p = Progress(total)

    def say(label):
        if p.label:
            p.advance()
        p.start(label)
    return p, say


def run_sections(args) -> int:
    """--contention and --interleaved: each measured, printed and written on its own."""
    from . import contention, interleaved
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be at least 1")
    if args.pairs < 1:
        raise UsageError("--pairs must be at least 1 (15 or more for the targets)")
    sizes = parse_sizes(args.sizes) if args.sizes else None
    if args.threads is not None:
        hwoptim.set_num_threads(args.threads)
    sample_s = args.sample_ms / 1e3 if args.sample_ms else (0.005 if args.quick else 0.02)
    torch = None if args.no_torch else torch_or_why()[0]
    info = machine_info(torch)
    chosen = [(m, name) for m, name in ((contention, "contention"),
                                        (interleaved, "interleaved"))
              if getattr(args, name)]
    for mod, name in chosen:
        sz = sizes or mod.SIZES
        kw = {"torch": torch} if mod is interleaved else {}
        total = len(sz) * (len(contention.busy_cases()) if mod is contention
                           else 2 + 2 * (torch is not None))
        progress, say = _progress(total)
        try:
            result = mod.run(sz, rounds=args.pairs, sample_s=sample_s, progress=say, **kw)
        finally:
            progress.advance()
            progress.close()
        result.update(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      command=command_line(args), machine=info)
        paths = files.write_json_md(files.stem(args.out, info, f"-{name}"), result,
                                    mod.markdown(result, info))
        print(mod.summary_text(result))
        print(f"\nwrote {', '.join(paths)} ({result['seconds']:.0f} s)\n")
    return 0


def run(args) -> int:
    if getattr(args, "formats", False):
        from types import SimpleNamespace
        from . import formats
        rules = _csv(args.rules) or ("Adam",)
        code = 0
        for rule in rules:
            code |= formats.run(SimpleNamespace(
                rule=rule, sizes=args.sizes or "1e7,5e7", rounds=args.pairs,
                no_torch=args.no_torch))
        return code
    if getattr(args, "contention", False) or getattr(args, "interleaved", False):
        try:
            return run_sections(args)
        except UsageError as e:
            print(f"hwoptim bench: {e}", file=sys.stderr)
            return 2
    t_start = time.perf_counter()
    try:
        plan = plan_from(args)
        notes = plan.notes
        torch, torch_variants, torch_missing = _torch_for(args, notes)
        nthreads = fix_threads(args.threads, plan.host, torch)
    except UsageError as e:
        print(f"hwoptim bench: {e}", file=sys.stderr)
        return 2

    info = machine_info(torch)
    settings = Settings(device=info["cpu_model"], host=plan.host,
                        torch_variants=torch_variants, pairs=args.pairs,
                        sample_s=plan.sample_s, numpy_max=int(args.numpy_max),
                        threads=nthreads)
    groups = [(c, d, n) for c in plan.cases for d in plan.dtypes for n in plan.sizes]
    progress = Progress(len(groups) + len(plan.models) + len(plan.real)
                        + (1 if plan.want_gpu else 0))
    records, model_records, real_records, compile_s = measure_all(
        settings, groups, plan.models, progress, notes, plan.real, torch)
    gpu = None
    if plan.want_gpu:
        progress.start("GPU")
        gpu = run_gpu(plan.quick, args.out, progress, notes)
        if gpu:
            _merge_gpu(gpu, records, model_records)
        progress.advance()
    else:
        notes.append("no GPU: cupy not in --backends")
    progress.close()
    noisy = noisy_note(records + model_records + real_records)
    if noisy:
        notes.insert(0, noisy)

    report = {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command_line(args),
        "quick": plan.quick,
        "machine": info,
        "threads": nthreads,
        "torch_missing": torch_missing,
        "pairs": args.pairs,
        "sample_s": plan.sample_s,
        "elapsed_s": time.perf_counter() - t_start,
        "method": ("median and quartiles of interleaved rounds; bytes = (reads + writes) x "
                   "itemsize x n; floor = same arrays and threads, one add per element; "
                   "ratios are ratios of the medians (*_paired: medians of per-round "
                   "ratios); 'noisy' lists figures with an interquartile range over 10% of "
                   "the median or the two ratios differing by over 10%"),
        "records": records,
        "models": model_records,
        "real_models": real_records,
        "compile_or_load_s": compile_s,
        "gpu": ({k: v for k, v in gpu.items() if k not in ("records", "models", "_markdown")}
                if gpu else None),
        "notes": notes,
    }
    write_report(report, gpu, args.out, not args.no_plots)
    return 0
