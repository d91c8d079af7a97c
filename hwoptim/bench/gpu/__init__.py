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
* ``capturable``: one step captured in a CUDA graph and replayed, against eager steps;
* ``formats``: Adam at the largest size in each storage format (``measure.FORMATS``: 16-bit
  params and grads, bfloat16 and int8 state, master weights, stochastic rounding) through
  ``opt.step``: bytes per element, GB/s, fraction of copy bandwidth, state bytes per
  element, and torch's fused float32 Adam at that size over it;
* ``adafactor``: Adafactor on one square float32 matrix of about the largest size (the
  staged kernels of its factored state), GB/s of the 24 bytes per element they move, the
  fraction of copy bandwidth for those and for the 12 bytes any step must move, and
  torch.optim.Adafactor (foreach) on the same matrix.

``python -m hwoptim.bench.gpu OUTDIR [--quick] [--budget S]`` writes
``OUTDIR/<card>-<date>.json`` and ``.md`` and prints a short table.

Modules: ``device`` (the device, its timer, random data, the time budget), ``kernels``
(launch counting, prewarming), ``measure`` (bandwidth: copy, rules, models), ``overhead``
(host overhead, CUDA graphs), ``results`` (ratios, summary, Markdown, files), ``sections``
(the run, section by section), ``cli`` (the command). CuPy is imported only when something
runs.
"""
from ..workload import (HEAVIEST, MODELS, bench_option_sets, bytes_per_element,
                     model_shapes, option_name, plan_for, split_kwargs)
from .device import GiB, THREADS, n_sets_for, time_steps
from .kernels import count_launches, prewarm
from .results import (card_name, finish_models, finish_records, format_markdown,
                      format_table, summary, write_reports)
from .cli import main
from .sections import run

__all__ = ["HEAVIEST", "MODELS", "bench_option_sets", "bytes_per_element", "model_shapes",
           "option_name", "plan_for", "split_kwargs", "GiB", "THREADS", "n_sets_for",
           "time_steps", "count_launches", "prewarm", "card_name", "finish_models",
           "finish_records", "format_markdown", "format_table", "summary", "write_reports",
           "main", "run"]
