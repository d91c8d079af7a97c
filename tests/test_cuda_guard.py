"""The step guard on the GPU (capturable steps: ``max_grad_norm``, ``skip_nonfinite``,
``grad_scale`` and ``found_inf`` decided on the device), checked without a GPU.

a. NVRTC: ``codegen.cuda_guard_source`` compiles for sm_80 and sm_90 with CuPy's options,
   its two kernels taking what ``backends/cupy.step_guard`` passes; the statistics add in
   a fixed tree (no atomics).
b. C++: the verdict's device function (``hw_guard_decide``) against the host's decision
   (``optim.check_amp`` and ``optim.guard_verdict``, what the CPU backends do) over every
   combination of finite and non-finite grads, clipping, loss scale (numbers and invalid
   ones) and found_inf (0, 1, NaN); the per-element statistics against NumPy's.
c. Launches (a stand-in for CuPy, as tests/test_cuda_launch.py): statistics then verdict on
   the caller's stream, the tables uploaded once per list of grads, the guarded update and
   advance kernels given the verdict.
"""
from __future__ import annotations

import ctypes
import itertools
import math
import os
import re
import shutil
import subprocess
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest

from hwoptim import codegen
from hwoptim.backends import cupy as cupy_backend
from hwoptim.optim import check_amp, guard_verdict

import test_cuda_source as tcs
from test_cuda_source import compiler, nvrtc     # noqa: F401  (fixtures)
from test_cuda_launch import _FakeCupy, _arrays, _plan, fake_cupy   # noqa: F401

MODE = codegen.GUARD_MODE


@pytest.mark.parametrize("arch", tcs.ARCHS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
def test_guard_kernels_compile(compiler, dtype, arch):
    res = compiler.result(codegen.cuda_guard_source(dtype),
                          (f"-arch=sm_{arch}",) + tcs.CUPY_OPTIONS)
    assert res.ok, f"NVRTC failed:\n{res.log}"
    entries = tcs._entries(res.ptx)
    assert entries[f"hw_guard_stats_{dtype}"][0] == ["u64"] * 5
    assert entries["hw_guard_verdict"][0] == ["u64", "u64", "u64", "u32", "f64", "u64", "u32",
                                              "f64", "f64", "u32", "u64"]
    assert sorted(entries) == sorted([f"hw_guard_stats_{dtype}", "hw_guard_verdict"])
    for _, body in entries.values():
        assert not re.search(r"\b(atom|red)\.", body)


_LIB = {}


def _lib():
    why = tcs._cxx_unavailable()
    if why:
        pytest.skip(why)
    if "lib" not in _LIB:
        tmp = tempfile.mkdtemp(prefix="hwoptim-cppguard-")
        src, so = os.path.join(tmp, "guard.cpp"), os.path.join(tmp, "guard.so")
        with open(src, "w") as f:
            f.write(codegen.cpp_guard_test_source())
        cmd = [os.environ.get("CXX", "g++"), "-O2", "-std=c++17", "-shared", "-fPIC",
               "-ffp-contract=off", src, "-o", so]
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
        lib = ctypes.CDLL(so)
        shutil.rmtree(tmp, ignore_errors=True)
        d = ctypes.c_double
        dp = np.ctypeslib.ndpointer(dtype=np.float64, flags="C_CONTIGUOUS")
        lib.decide.argtypes = [d, d, d, d, d, ctypes.c_int, dp]
        lib.decide.restype = None
        for dt in ("float32", "float64", "bfloat16", "float16"):
            f = getattr(lib, f"stats_{dt}")
            f.argtypes = [ctypes.c_void_p, ctypes.c_longlong, dp]
            f.restype = None
        _LIB["lib"] = lib
    return _LIB["lib"]


def _host_verdict(sumsq, finite, max_norm, skip_nonfinite, fi, sc):
    """What a CPU optimizer's step decides (optim.step: check_amp, then the guard):
    (skipped, the grads' factor or None, last_grad_norm or 'unchanged')."""
    opt = SimpleNamespace(max_grad_norm=max_norm, skip_nonfinite=skip_nonfinite,
                          skipped_steps=0, last_step_skipped=False, last_grad_norm="unchanged")
    inv = None
    if fi is not None or sc is not None:
        inv, skip = check_amp(sc, fi, "")
        if skip:
            return True, None, "unchanged"
    if max_norm is None and not skip_nonfinite:
        return False, inv if inv is not None else 1.0, "unchanged"
    s = sumsq * (inv * inv) if inv is not None else sumsq
    f = guard_verdict(opt, s, finite)
    if f is None:
        return True, None, opt.last_grad_norm
    return False, (inv if inv is not None else 1.0) * (f if max_norm is not None else 1.0), \
        opt.last_grad_norm


def test_cpp_verdict_decides_as_the_host():
    """Every combination: the device verdict's skip, factor, norm and skipped-step count
    equal the host's decision (grad_scale invalid on the device: skipped, where the host
    refuses the call)."""
    lib = _lib()
    sums = [(0.0, True), (2.25, True), (1e6, True), (1e300 * 1e10, True), (math.nan, False),
            (math.inf, False)]
    cases = itertools.product(sums, [None, 1.0, 0.5], [False, True], [None, 0.0, 1.0, math.nan],
                              [None, 1.0, 1024.0, 0.0, -2.0, math.inf, math.nan])
    n = 0
    for (sumsq, finite), max_norm, skip_nf, fi, sc in cases:
        mode = ((MODE["stats"] if (max_norm is not None or skip_nf) else 0)
                | (MODE["clip"] if max_norm is not None else 0)
                | (MODE["found_inf"] if fi is not None else 0)
                | (MODE["grad_scale"] if sc is not None else 0))
        guard = np.array([0.0, 1.0, -1.0, 3.0])
        lib.decide(sumsq, 0.0 if finite else 1.0, 0.0 if fi is None else fi,
                   1.0 if sc is None else sc, max_norm or 0.0, mode, guard)
        what = (sumsq, finite, max_norm, skip_nf, fi, sc)
        if sc is not None and not (math.isfinite(sc) and sc > 0):
            with pytest.raises(ValueError):
                check_amp(sc, fi, "")
            assert guard[0] == 1.0 and guard[3] == 4.0, what
            continue
        skip, factor, norm = _host_verdict(sumsq, finite, max_norm, skip_nf, fi, sc)
        assert guard[0] == float(skip), what
        assert guard[3] == 3.0 + skip, what
        if not skip:
            assert guard[1] == factor, (what, guard[1], factor)
        if norm == "unchanged":
            assert guard[2] == -1.0, what
        elif math.isnan(norm):
            assert math.isnan(guard[2]), what
        else:
            assert guard[2] == norm, what
        n += 1
    assert n > 300


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
def test_cpp_statistics_of_the_grads(dtype, rng):
    """The per-element statistics (16-bit grads of storage formats read through their
    conversions): the float64 sum of squares (within summation error of NumPy's) and the
    count of NaN and infinite elements, exactly."""
    from hwoptim import formats
    lib = _lib()
    np_dtype = formats.np_dtype(dtype)
    stats = getattr(lib, f"stats_{dtype}")
    g = (rng.standard_normal(10_000) * 3).astype(np_dtype)
    out = np.zeros(2)
    stats(g.ctypes.data, g.size, out)
    want = float(np.sum(g.astype(np.float64) ** 2))
    assert abs(out[0] - want) <= 1e-12 * want and out[1] == 0
    g[[3, 70, 9000]] = np.array([np.nan, np.inf, -np.inf]).astype(np_dtype)
    out[:] = 0
    stats(g.ctypes.data, g.size, out)
    assert out[1] == 3 and not math.isfinite(out[0])
    big = np.full(4, float(np.finfo(np_dtype).max)).astype(np_dtype)
    out[:] = 0
    stats(big.ctypes.data, 4, out)
    assert out[1] == 0                      # finite, however large (float32: no overflow)
    assert (out[0] > 0) if dtype != "float64" else math.isinf(out[0])


class _Grad:
    def __init__(self, n, ptr, dtype="float32"):
        self.size, self.dtype = n, np.dtype(dtype)
        self.data = SimpleNamespace(ptr=ptr)


def test_step_guard_launches(fake_cupy):
    """Statistics (a block per chunk of ``GUARD_CHUNK``) then the verdict (one warp), on the
    caller's stream; the address and chunk tables uploaded once per list of grads; a device
    found_inf is passed by address, a number by value; no statistics without their bit."""
    cupy_backend._guard_tables.clear()
    cupy_backend._guard_modules.clear()
    grads = [_Grad(100_000, 0x7F0000000000), _Grad(3, 0x7F1000000000)]
    guard = SimpleNamespace(size=4, data=SimpleNamespace(ptr=0x20))
    side = fake_cupy.cuda.ExternalStream(0xABC0)
    fi = SimpleNamespace(size=1, dtype=np.dtype(np.float32), data=SimpleNamespace(ptr=0x30))
    mode = MODE["stats"] | MODE["clip"] | MODE["found_inf"] | MODE["grad_scale"]
    with side:
        cupy_backend.step_guard(grads, guard, mode, found_inf=fi, grad_scale=512.0,
                                max_norm=1.5)
    stats, verdict = _FakeCupy.launches
    n_chunks = -(-100_000 // cupy_backend.GUARD_CHUNK) + 1
    assert stats["kernel"] == "hw_guard_stats_float32" and stats["grid"] == (n_chunks,)
    assert stats["block"] == (256,) and stats["stream"] is side and verdict["stream"] is side
    table, chunks, n, nc, part = stats["args"]
    assert list(table.host) == [g.data.ptr for g in grads] and n == 2 and nc == n_chunks
    assert chunks.host.reshape(-1, 3).tolist()[-1] == [1, 0, 3]
    assert verdict["kernel"] == "hw_guard_verdict"
    assert verdict["grid"] == (1,) and verdict["block"] == (32,)
    v = verdict["args"]
    assert v[0] is part and v[1] == n_chunks
    assert (v[2], v[3]) == (0x30, 1) and (v[5], v[6], v[7]) == (0, 3, 512.0)
    assert v[8] == 1.5 and v[9] == mode and v[10] is guard
    uploads = len(_FakeCupy.uploads)
    _FakeCupy.launches.clear()
    with side:
        cupy_backend.step_guard(grads, guard, mode, found_inf=fi, grad_scale=512.0,
                                max_norm=1.5)
    assert len(_FakeCupy.uploads) == uploads       # cached: nothing uploaded (graph capture)
    assert [x["kernel"] for x in _FakeCupy.launches] == ["hw_guard_stats_float32",
                                                        "hw_guard_verdict"]
    _FakeCupy.launches.clear()
    cupy_backend.step_guard(grads, guard, MODE["found_inf"], found_inf=0.0)
    (only,) = _FakeCupy.launches
    assert only["kernel"] == "hw_guard_verdict" and only["args"][1] == 0
    with pytest.raises(TypeError, match="found_inf is a float16 array"):
        cupy_backend.step_guard(grads, guard, MODE["found_inf"], found_inf=SimpleNamespace(
            size=1, dtype=np.dtype(np.float16), data=SimpleNamespace(ptr=0x40)))


def test_guarded_update_and_advance_kernels(fake_cupy):
    """The guarded variants: the update kernel gets the verdict after ``n``; the advance
    kernel after the scalars; one thread; a plan with the grads' factor reads it there."""
    mod = cupy_backend
    plan, _ = _plan("Adam")
    run = mod.kernel(plan, "float32")
    src = codegen.cuda_source(plan, "float32")
    k_dev, guard = _FakeCupy.zeros(len(plan.scalars), "float32"), _FakeCupy.zeros(4, "float64")
    _FakeCupy.launches.clear()
    run.device_guard(_arrays(plan, 4096), k_dev, guard)
    run.advance_guard(_FakeCupy.zeros(8, "float64"), _FakeCupy.zeros(1, "float64"), k_dev,
                      guard)
    up, adv = _FakeCupy.launches
    assert up["kernel"] == src.device_guard and up["args"][-3:] == (k_dev, 4096, guard)
    assert adv["kernel"] == src.advance_guard and adv["grid"] == (1,) == adv["block"]
    assert adv["args"][-1] is guard
    with pytest.raises(ValueError, match="16-byte aligned"):
        run.device_guard(_arrays(plan, 4096, misalign=4), k_dev, guard)
    assert "if (guard[0] != 0.0) return;" in src.source
    rule = plan.rule
    h = {n: hy.default for n, hy in rule.hypers.items()}
    flags = rule.static_flags(h, dict(rule.options))
    flags._clip = True
    clipped = codegen.cuda_source(codegen.plan(rule, flags), "float32")
    assert "h[5] = guard[1];" in clipped.source   # lr, betas, eps, weight_decay, _clip
