"""The benchmark: hwoptim measured through its public API, on the CPU and the GPU.

``hwoptim bench`` (:mod:`.cli`) writes a report; ``pytest bench/`` (in a checkout) runs the
same measurements as a pytest-benchmark suite; ``python -m hwoptim.bench.gpu`` runs the GPU
part alone. The core never imports this package.

Modules, each with one job: ``workload`` (what runs, and the bytes a step must move),
``real_models`` (real models' parameter shapes: GPT-2 small, ResNet-50, a 1e6 CNN),
``timing`` (interleaved rounds, medians, ratios), ``machine`` (CPU, memory, versions),
``impls`` (the step callables timed on the CPU), ``cpu`` (the CPU run), ``report_text``
and ``report_plots`` (the report), ``tables`` (number formats), ``progress``, ``cli`` (the
command), ``gpu`` (the GPU benchmark, a package of its own).

The names below are the old ``hwoptim.report`` module's, which is this package now.
"""
from .workload import (DTYPES, HEAVY, MODEL_TENSORS, MODELS, SIZES, Case, bytes_moved, cases,
                    group_bytes, hypers_of, model_shapes, options_text, plan_of, rule_of)
from .cli import FULL_SAMPLE_S, QUICK, QUICK_GPU_BUDGET_S, add_arguments, run
from .impls import (REAL_IMPLS, TORCH_VARIANTS, build, build_model, build_real_model,
                    floor_kernel, real_model_bytes, torch_step)
from .real_models import PUBLISHED, REAL_MODELS
from .machine import cpu_model, machine_info, machine_slug, mem_available
from .report_text import (MODEL_HEAD, SUMMARY_HEAD, markdown, model_rows, summary_rows,
                       summary_text)
from .report_plots import plots
from .progress import Progress
from .timing import count_launches, measure, paired_ratio, records_from, sample

__all__ = ["DTYPES", "HEAVY", "MODEL_TENSORS", "MODELS", "SIZES", "Case", "bytes_moved",
           "cases", "group_bytes", "hypers_of", "model_shapes", "options_text", "plan_of",
           "rule_of", "FULL_SAMPLE_S", "QUICK", "QUICK_GPU_BUDGET_S", "add_arguments", "run",
           "TORCH_VARIANTS", "build", "build_model", "floor_kernel", "torch_step",
           "REAL_IMPLS", "REAL_MODELS", "PUBLISHED", "build_real_model", "real_model_bytes",
           "cpu_model", "machine_info", "machine_slug", "mem_available", "MODEL_HEAD",
           "SUMMARY_HEAD", "markdown", "model_rows", "summary_rows", "summary_text", "plots",
           "Progress", "count_launches", "measure", "paired_ratio", "records_from", "sample"]
