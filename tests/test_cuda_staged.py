"""The GPU kernels of staged rules (Adafactor's factored matrices), checked without a GPU in
every CI run.

a. NVRTC: ``codegen.cuda_staged_source`` of every factored plan (each option set, and with
   the loss-scale grad factor) compiles for sm_80 and sm_90 with CuPy's options; the module
   holds exactly the kernels ``backends/cupy.py`` launches, each taking the arguments it
   passes; row sums reduce across the warp with shuffles, and no kernel uses atomics.
b. C++: the same device functions and kernel statements
   (``codegen.cpp_staged_test_source``: each warp's 32 lanes in a loop, its shuffles as
   index arithmetic, the kernels in launch order) step matrices of several shapes (partial
   tiles, one row, one column, a batch) from the state the last step left: each step within
   32 units of rounding of the float64 NumPy reference's step from the same state, in
   float32 and float64, with flush-to-zero off and on. And the run is deterministic: the
   same inputs give the same bits (no atomics, a fixed order of sums).
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
import zlib

import numpy as np
import pytest

import hwoptim
from hwoptim import codegen, formats, testing

import test_cuda_source as tcs
from test_cuda_source import compiler, nvrtc     # noqa: F401  (fixtures)

RULE = hwoptim.RULES["Adafactor"]
CLIP = 0.375
SHAPES = [(3, 37, 45), (70, 33), (1, 5), (33, 1), (2, 1, 40), (64, 96),
          (1050, 7), (5, 1060), (9, 40, 40)]      # (more than 32 tiles a column, row, array)
STEPS = 3
DTYPES = ("float32", "float64")


def _cases():
    out = []
    for cid, kw in testing.option_sets(RULE) + [("Adafactor[grad factor]", {})]:
        h, _, flags = tcs._split(RULE, kw)
        flags = RULE.array_flags(flags, (2, 2))
        if cid.endswith("[grad factor]"):
            flags._clip = True
            kw = {**kw, "_clip": CLIP}
        out.append(pytest.param(kw, flags, codegen.plan(RULE, flags), id=cid))
    return out


CASES = _cases()


def _source(plan, dtype):
    return codegen.cuda_staged_source(plan, dtype)


@pytest.mark.parametrize("arch", tcs.ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw,flags,plan", CASES)
def test_staged_kernels_compile(compiler, kw, flags, plan, dtype, arch):
    k = _source(plan, dtype)
    what = f"{plan.key} {dtype} sm_{arch}"
    res = compiler.result(k.source, (f"-arch=sm_{arch}",) + tcs.CUPY_OPTIONS)
    assert res.ok, (f"{what}: NVRTC failed ({res.status}) with options {res.options}; "
                    f"expected the source to compile. Log:\n{res.log}")
    entries = tcs._entries(res.ptx)
    names = [n for n, _, _ in k.launches]
    assert sorted(entries) == sorted(names), (f"{what}: PTX kernels {sorted(entries)}; "
                                              f"expected exactly {sorted(names)}")
    # what backends/cupy.py passes: arrays, _V, _P (pointers), B, m, n, scalars (the dtype)
    _, ps = codegen.staged_scratch(plan, 1, 1, 1)
    n_ptr = len(plan.arrays) + len(plan.stages.reductions) + len(ps)
    fp = {"float32": "f32", "float64": "f64"}[dtype]
    want = ["u64"] * (n_ptr + 3) + [fp] * len(plan.scalars)
    for name in names:
        params, body = entries[name]
        assert params == want, f"{what}: {name} takes {params}; expected {want}"
        assert not re.search(r"\b(atom|red)\.", body), (
            f"{what}: {name} uses atomics; expected a fixed order of sums")
    kinds = {n: kind for n, kind, _ in k.launches}
    sweeps = [n for n in names if kinds[n] in ("sweep", "finish", "small")]
    assert sweeps and all("shfl.sync.bfly" in entries[n][1] for n in sweeps), (
        f"{what}: expected warp shuffles (shfl.sync.bfly) in {sweeps}")
    assert [kinds[n] for n in names][-3:] == ["store"] * 3


# ----------------------------------------------------------------------------- C++

_LIB = {}


def _compiled_run(plan, key):
    """``run`` of the C++ harness of ``plan``'s staged kernels in ``key`` (a dtype or a
    storage format's key), compiled once per process, without its argument types."""
    why = tcs._cxx_unavailable()
    if why:
        pytest.skip(why)
    if (plan.key, key) not in _LIB:
        tmp = tempfile.mkdtemp(prefix="hwoptim-cppstaged-")
        src, so = os.path.join(tmp, "staged.cpp"), os.path.join(tmp, "staged.so")
        with open(src, "w") as f:
            f.write(codegen.cpp_staged_test_source(plan, key))
        cmd = [os.environ.get("CXX", "g++"), "-O2", "-std=c++17", "-shared", "-fPIC",
               "-ffp-contract=off", src, "-o", so]
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode == 0, (f"{' '.join(cmd)} failed; expected the generated C++ to "
                                   f"compile:\n{p.stdout}{p.stderr}")
        _LIB[(plan.key, key)] = ctypes.CDLL(so).run
        shutil.rmtree(tmp, ignore_errors=True)          # (the loaded library stays)
    return _LIB[(plan.key, key)]


def _lib(plan, dtype):
    f = _compiled_run(plan, dtype)
    c = ctypes.c_float if dtype == "float32" else ctypes.c_double
    _, ps = codegen.staged_scratch(plan, 1, 1, 1)
    arr = np.ctypeslib.ndpointer(dtype=dtype, flags="C_CONTIGUOUS")
    dbl = np.ctypeslib.ndpointer(dtype=np.float64, flags="C_CONTIGUOUS")
    f.argtypes = ([arr] * (len(plan.arrays) + len(plan.stages.reductions)) + [dbl] * len(ps)
                  + [ctypes.c_longlong] * 3 + [c] * len(plan.scalars) + [ctypes.c_int])
    f.restype = None
    return f


def _run(f, plan, dtype, bufs, shape, scalars, ftz):
    """One step of the harness on ``bufs`` (name -> array on its shape, updated in place)."""
    B = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    m, n = shape[-2], shape[-1]
    vs, ps = codegen.staged_scratch(plan, B, m, n)
    flat = [np.ascontiguousarray(bufs[a]).reshape(-1) for a in plan.arrays]
    V = [np.full(v, np.nan, dtype) for v in vs]
    P = [np.full(q, np.nan) for q in ps]      # every partial is written before it is read
    typ = np.dtype(dtype).type
    f(*flat, *V, *P, B, m, n, *[typ(s) for s in scalars], ftz)
    for a, x in zip(plan.arrays, flat):
        bufs[a][...] = x.reshape(bufs[a].shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw,flags,plan", CASES)
def test_cpp_staged_steps_near_the_float64_reference(kw, flags, plan, dtype):
    """Steps of every shape, each from the state the harness left, against the NumPy
    float64 step from the same (rounded) state: params within 32u of |p| + |Δp|, row and
    column factors within 32u of themselves (as tests/test_adafactor.py holds the CPU
    kernels). Flush-to-zero off and on; the two runs and a repeat agree bit for bit where
    no value is subnormal."""
    f = _lib(plan, dtype)
    u = np.finfo(dtype).eps / 2
    opts = {k: v for k, v in kw.items() if k != "_clip"}
    prepare = codegen.host_scalar_function(plan, dtype)
    for shape in SHAPES:
        rng = np.random.default_rng(zlib.crc32(repr((plan.key, dtype, shape)).encode()))
        p0 = rng.standard_normal(shape).astype(dtype)
        ref_opt = hwoptim.Adafactor([p0.astype(np.float64)], backend="numpy", **opts)
        h = {**ref_opt.param_groups[0], **({"_clip": CLIP} if "_clip" in kw else {})}
        runs = {ftz: {"param": p0.copy()} for ftz in (0, 1)}
        for bufs in runs.values():
            bufs["grad"] = np.zeros(shape, dtype)
            bufs["row_var"] = np.zeros(shape[:-1] + (1,), dtype)
            bufs["col_var"] = np.zeros(shape[:-2] + (1,) + shape[-1:], dtype)
        for t in range(1, STEPS + 1):
            g = rng.standard_normal(shape).astype(dtype)
            before = {k: v.copy() for k, v in runs[0].items()}
            for ftz, bufs in runs.items():
                bufs["grad"][...] = g
                _run(f, plan, dtype, bufs, shape, prepare(h, t), ftz)
            again = {k: v.copy() for k, v in before.items()}
            again["grad"][...] = g
            _run(f, plan, dtype, again, shape, prepare(h, t), 0)
            # the reference: the float64 step from the same state
            ref = hwoptim.Adafactor([before["param"].astype(np.float64)], backend="numpy",
                                    **opts)
            ref.state[0]["row_var"] = before["row_var"].astype(np.float64)
            ref.state[0]["col_var"] = before["col_var"].astype(np.float64)
            ref.load_state_dict({**ref.state_dict(), "step": t - 1})
            gr = g.astype(np.float64)
            ref.step([gr * CLIP if "_clip" in kw else gr])
            want = ref.param_groups[0]["params"][0]
            p_before = before["param"].astype(np.float64)
            where = f"{plan.key} {dtype} {shape} step {t}"
            for k in ("param", "row_var", "col_var"):
                assert np.array_equal(runs[0][k], again[k]), f"{where}: {k} not repeatable"
                assert np.array_equal(runs[0][k], runs[1][k]), f"{where}: {k} differs with ftz"
            bound = 32 * u * (np.abs(p_before) + np.abs(want - p_before))
            err = np.abs(runs[0]["param"] - want)
            assert np.all(err <= bound), (f"{where}: param off by {np.max(err / bound):.2f} of "
                                          f"its bound")
            for k in ("row_var", "col_var"):
                r = ref.state[0][k]
                assert np.all(np.abs(runs[0][k] - r) <= 32 * u * np.abs(r)), f"{where}: {k}"


def test_cpp_harness_leaves_the_floating_point_mode_as_it_was():
    """A run with flush-to-zero on restores the caller's MXCSR (later tests depend on it):
    a float32 subnormal survives arithmetic after it."""
    kw, flags, plan = CASES[0].values
    f = _lib(plan, "float32")
    bufs = {"param": np.ones((4, 4), np.float32), "grad": np.ones((4, 4), np.float32),
            "row_var": np.zeros((4, 1), np.float32), "col_var": np.zeros((1, 4), np.float32)}
    prepare = codegen.host_scalar_function(plan, "float32")
    h = {**hwoptim.Adafactor([np.ones(2)], backend="numpy", **kw).param_groups[0]}
    _run(f, plan, "float32", bufs, (4, 4), prepare(h, 1), 1)
    tiny = np.array([1e-20], np.float32)
    assert (tiny * tiny)[0] > 0            # 1e-40: a float32 subnormal, unless flushed


# ----------------------------------------------------------------------------- formats
#
# The staged kernels in storage formats (16-bit params and grads, bfloat16 or int8 state,
# master weights, stochastic rounding): every kind of load and store, with int8 states
# encoded by the quantize kernels. The chain: the float32 kernels are held to the float64
# reference above; a format's step is the float32 step from the same (upcast) values, with
# the same sums in the same order, each result rounded into its storage by
# hwoptim.formats' NumPy conversions: bit for bit.

FORMAT_KEYS = ("float16_sfloat32", "bfloat16_sbfloat16", "float16_sfloat32_master",
               "bfloat16_sfloat32_sr", "float16_sint8_sr", "bfloat16_sint8_master")
FORMAT_SHAPES = [(3, 37, 45), (70, 33), (1, 300), (300, 17)]   # (300: two int8 blocks)


def _storage(fmt, name):
    return np.uint8 if fmt.storage(name) == "uint8" else formats.np_dtype(fmt.storage(name))


@pytest.mark.parametrize("arch", tcs.ARCHS)
@pytest.mark.parametrize("key", FORMAT_KEYS)
def test_staged_format_kernels_compile(compiler, key, arch):
    """Each format's staged module compiles for sm_80 and sm_90 with exactly the kernels
    the backend launches (int8 state: a quantize kernel per state, after the stores, its
    block's absmax reduced by shuffles) and no atomics."""
    kw, flags, plan = CASES[0].values
    k = codegen.cuda_staged_source(plan, key)
    res = compiler.result(k.source, (f"-arch=sm_{arch}",) + tcs.CUPY_OPTIONS)
    assert res.ok, f"{key} sm_{arch}: NVRTC failed ({res.status}):\n{res.log}"
    entries = tcs._entries(res.ptx)
    names = [n for n, _, _ in k.launches]
    assert sorted(entries) == sorted(names)
    quant = [n for n, kind, _ in k.launches if kind == "quant"]
    assert len(quant) == (2 if "int8" in key else 0)
    for name in names:
        assert not re.search(r"\b(atom|red)\.", entries[name][1]), name
    assert all("shfl.sync.bfly" in entries[n][1] for n in quant)


def _format_lib(plan, key):
    f = _compiled_run(plan, key)
    fmt = formats.Format.parse(key)

    def ptr(dt):
        return np.ctypeslib.ndpointer(dtype=dt, flags="C_CONTIGUOUS")
    vs, ps = codegen.staged_scratch(plan, 1, 1, 1)
    ts = codegen.staged_quant_scratch(plan, fmt, 1, 1, 1)
    f.argtypes = ([ptr(np.uint16 if fmt.storage(a) in ("float16", "bfloat16")
                       else _storage(fmt, a)) for a in fmt.arrays(plan.arrays)]
                  + [ptr(np.float32)] * len(vs) + [ptr(np.float64)] * len(ps)
                  + [ptr(np.float32)] * len(ts) + [ctypes.c_longlong] * 3
                  + [ctypes.c_float] * len(plan.scalars) + [ctypes.c_int])
    f.restype = None
    return f


@pytest.mark.parametrize("key", FORMAT_KEYS)
def test_cpp_staged_format_step_is_the_float32_step_rounded(key):
    """From random (warmed-up) buffers in format ``key``, the format kernels' step equals
    the float32 kernels' step from the upcast values (a master copy: itself), each result
    rounded into its storage by hwoptim.formats: params to nearest or stochastically with
    the element's bits, the master copy the float32 result itself, bfloat16 factors to
    nearest, int8 factors encoded as formats.quantize encodes them; flush-to-zero off and
    on."""
    fmt = formats.Format.parse(key)
    kw, flags, plan = CASES[0].values
    f32, ff = _lib(plan, "float32"), _format_lib(plan, key)
    prepare = codegen.host_scalar_function(plan, "float32")
    h = {**hwoptim.Adafactor([np.ones(2)], backend="numpy", **kw).param_groups[0]}
    scalars = prepare(h, 3)
    for shape in FORMAT_SHAPES:
        rng = np.random.default_rng(zlib.crc32(repr((key, shape)).encode()))
        B = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        m, n = shape[-2:]
        vals = {"param": rng.standard_normal(shape), "grad": rng.standard_normal(shape),
                "row_var": rng.uniform(0.1, 3, shape[:-1] + (1,)),
                "col_var": rng.uniform(0.1, 3, shape[:-2] + (1, n))}
        bufs = {}                                  # the format's buffers (flat)
        for a, v in vals.items():
            if fmt.quantized and a not in ("param", "grad"):
                bufs[a], bufs[f"{a}_absmax"] = formats.quantize(v.astype(np.float32))
            else:
                bufs[a] = formats.round_nearest(v.astype(np.float32).reshape(-1),
                                                fmt.storage(a))
        if fmt.master:
            bufs["master"] = (bufs["param"].astype(np.float32)
                              + np.float32(1e-3) * rng.standard_normal(bufs["param"].size)
                              .astype(np.float32))
        bufs["_srkey"] = rng.integers(0, 2**32, 1, dtype=np.uint64).astype(np.uint32)
        up = {a: (bufs["master"] if a == "param" and fmt.master else
                  formats.dequantize(bufs[a], bufs[f"{a}_absmax"]) if f"{a}_absmax" in bufs
                  else bufs[a].astype(np.float32)) for a in plan.arrays}
        for ftz in (0, 1):
            vs, ps = codegen.staged_scratch(plan, B, m, n)
            ts = codegen.staged_quant_scratch(plan, fmt, B, m, n)
            want = {a: v.copy() for a, v in up.items()}
            f32(*[want[a] for a in plan.arrays], *[np.full(v, np.nan, np.float32) for v in vs],
                *[np.full(q, np.nan) for q in ps], B, m, n, *scalars, ftz)
            got = {a: v.copy() for a, v in bufs.items()}
            ff(*[got[a].view(np.uint16) if got[a].dtype.itemsize == 2 else got[a]
                 for a in fmt.arrays(plan.arrays)],
               *[np.full(v, np.nan, np.float32) for v in vs], *[np.full(q, np.nan) for q in ps],
               *[np.full(t, np.nan, np.float32) for t in ts], B, m, n, *scalars, ftz)
            where = f"{key} {shape} ftz={ftz}"
            assert not np.array_equal(want["param"], up["param"]), where      # it moved
            if fmt.sr:
                bits = formats.element_bits(bufs["_srkey"][0], np.arange(want["param"].size))
                p = formats.round_stochastic(want["param"], fmt.param, bits)
            else:
                p = formats.round_nearest(want["param"], fmt.param)
            assert np.array_equal(got["param"].view(np.uint16), p.view(np.uint16)), where
            if fmt.master:
                assert np.array_equal(got["master"], want["param"]), where
            assert np.array_equal(got["grad"], bufs["grad"]), where
            for a in ("row_var", "col_var"):
                if fmt.quantized:
                    codes, absmax = formats.quantize(want[a])
                    assert np.array_equal(got[a], codes), (where, a)
                    assert np.array_equal(got[f"{a}_absmax"], absmax), (where, a)
                else:
                    r = formats.round_nearest(want[a], fmt.storage(a))
                    assert np.array_equal(got[a].view(r.dtype), r), (where, a)
