"""Model-like parameter lists: ~200 tensors (a weight and a bias per layer) with ~5·10^7
elements in all ("large": bandwidth-bound) and ~10^6 ("small": per-tensor overhead
dominates). Adam, float32: hwoptim over one flat vector (``hwoptim.FlatParams``; one
kernel launch per step), hwoptim over the list (one launch per tensor), torch fused and
foreach over the list, and the floor over the flat vector.

Targets (bench/NOTES.md): one launch per step; large: >= 0.9 of the floor; small: >= 5x
torch fused over the same list."""
from __future__ import annotations

import pytest

from hwoptim import bench as hb

from conftest import MODELS, host_backends, record, time_paired, torch_or_none

IMPLS = ("floor", "hwoptim-numba-flat", "hwoptim-numba-per-tensor", "torch-fused",
         "torch-foreach")
PARAMS = [pytest.param(m, i, id=f"{m}-{i}") for m in MODELS for i in IMPLS]


@pytest.mark.parametrize("model,impl", PARAMS)
def test_model_step(benchmark, groups, results, fixed_threads, model, impl):
    total = hb.MODELS[model]
    torch = torch_or_none()
    if impl.startswith("torch-") and torch is None:
        pytest.skip("torch not installed")
    variants = tuple(v for v in hb.TORCH_VARIANTS if v != "forloop") if torch else ()
    need = total * 4 * (2 + 3 * (2 + len(variants)) + 4)
    avail = hb.mem_available()
    if avail is not None and need > 0.8 * avail:
        pytest.skip(f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available")
    fns, skipped, n, nbytes, count = groups.get(("model", model), lambda: hb.build_model(
        model, total, "float32", host_backends(), variants, groups.rng))
    if impl not in fns:
        pytest.skip(skipped.get(impl, "not built"))
    launches = (hb.count_launches(fns[impl]) if impl.startswith("hwoptim") else None)
    med, ratios = time_paired(benchmark, fns, impl)
    frac = 1.0 if impl == "floor" else ratios.get("floor")
    vs_fused = ratios.get("torch-fused")
    torch_r = [v for k, v in ratios.items() if k.startswith("torch-")]
    record(benchmark, results, group=f"model {model} ({count} tensors, n={n:,})", impl=impl,
           rule="Adam", options="default", dtype="float32", n=n, time_s=med, bytes=nbytes,
           gbps=nbytes / med / 1e9, frac_floor=frac,
           vs_torch=min(torch_r) if torch_r else None, vs_torch_fused=vs_fused, launches=launches, ratios=ratios, tensors=count, threads=fixed_threads)
    print(f"\n{model} {impl}: {med * 1e6:.1f} µs, launches {launches}, x floor "
          f"{frac if frac is None else round(frac, 3)}, x torch fused "
          f"{vs_fused if vs_fused is None else round(vs_fused, 2)}")
    if impl == "hwoptim-numba-flat":
        assert launches == 1

