"""Real models' parameter tensors (``hwoptim.bench.real_models``: GPT-2 small, ResNet-50, a
~1e6-parameter CNN, built with torch.nn on the meta device and checked against their
published counts), AdamW float32: ``hwoptim.torch.AdamW`` (default backend),
``torch.optim.AdamW`` fused and foreach, ``hwoptim.AdamW`` over the flat vector, and the
floor over the same bytes, on shared memory (``hwoptim.bench.impls.build_real_model``); the
same measurements as ``hwoptim bench --models real``.

``HWOPTIM_BENCH_REAL``: the models (default ``cnn-1m,resnet50,gpt2-small``; with
``HWOPTIM_BENCH_SMOKE=1`` only ``cnn-1m``; ``none`` for none). Needs torch; GPT-2 small
needs ~4 GiB of memory."""
from __future__ import annotations

import os

import pytest

from hwoptim import bench as hb
from hwoptim.bench import real_models
from hwoptim.bench.impls import REAL_IMPLS, build_real_model, real_model_bytes

from conftest import SMOKE, record, time_paired, torch_or_none

_default = "cnn-1m" if SMOKE else ",".join(real_models.REAL_MODELS)
REAL = tuple(m for m in (os.environ.get("HWOPTIM_BENCH_REAL") or _default).split(",")
             if m and m != "none")
PARAMS = [pytest.param(m, i, id=f"{m}-{i}") for m in REAL for i in REAL_IMPLS]


@pytest.mark.parametrize("model,impl", PARAMS)
def test_real_model_step(benchmark, groups, results, fixed_threads, model, impl):
    torch = torch_or_none()
    if torch is None:
        pytest.skip("torch not installed (it builds the shapes and runs hwoptim.torch)")
    shapes = real_models.shapes(model, torch)        # raises unless the published count
    n = sum(int(torch.Size(s).numel()) for s in shapes)
    assert (n, len(shapes)) == real_models.PUBLISHED[model]
    need = real_model_bytes(n)
    avail = hb.mem_available()
    if avail is not None and need > 0.8 * avail:
        pytest.skip(f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available")
    fns, skipped, n, nbytes, count, sharing = groups.get(
        ("real", model), lambda: build_real_model(shapes, torch, groups.rng))
    if impl not in fns:
        pytest.skip(skipped.get(impl, "not built"))
    launches = hb.count_launches(fns[impl]) if impl.startswith("hwoptim") else None
    med, ratios = time_paired(benchmark, fns, impl)
    frac = 1.0 if impl == "floor" else ratios.get("floor")
    torch_r = [v for k, v in ratios.items() if k.startswith("torch-")]
    record(benchmark, results, group=f"real {model} ({count} tensors, n={n:,})", impl=impl,
           rule="AdamW", options="default", dtype="float32", n=n, time_s=med, bytes=nbytes,
           gbps=nbytes / med / 1e9, frac_floor=frac,
           vs_torch=min(torch_r) if torch_r else None,
           vs_torch_fused=ratios.get("torch-fused"),
           vs_torch_foreach=ratios.get("torch-foreach"), launches=launches, ratios=ratios,
           tensors=count, threads=fixed_threads, shared_state=sharing)
    print(f"\n{model} {impl}: {med * 1e3:.3f} ms, launches {launches}, x floor "
          f"{frac if frac is None else round(frac, 3)}, x torch fused "
          f"{ratios.get('torch-fused') and round(ratios['torch-fused'], 2)}")
    if impl == "hwoptim-flat":
        assert launches == 1
