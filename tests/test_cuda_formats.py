"""The GPU kernels in storage formats (16-bit params, bfloat16 and int8 state, master
weights, stochastic rounding), checked without a GPU in every CI run.

a. NVRTC: ``codegen.cuda_format_source`` of every rule in five formats (each kind of storage
   once) and of three rules in all eleven compiles for sm_80 and sm_90 with CuPy's options;
   the module holds exactly the kernels ``backends/cupy.py`` launches, with the arguments it
   passes; int8 state reduces its blocks' absmax with warp shuffles.
b. C++: the same element function, conversion helpers and tile statements
   (``codegen.cpp_format_test_source``: the warp's 32 lanes in a loop) run four steps over
   random inputs and give the NumPy reference's bits (``backends.numpy``'s formats, which
   the Numba kernels match bit for bit) in the params and every state buffer, with
   flush-to-zero off and on (the GPU's -ftz=true: no value here is subnormal, and no
   conversion depends on it). The conversions themselves are compared with
   ``hwoptim.formats`` over every 16-bit pattern and millions of float32 ones, subnormal
   and special values included; stochastic rounding's bits at indices past 2**32 too.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

import hwoptim
from hwoptim import backends, codegen, formats
from hwoptim.formats import Format

import test_cuda_source as tcs
from test_cuda_source import compiler, nvrtc     # noqa: F401  (fixtures)
from test_formats import (MODES, MODE_IDS, RULE_CASES, _EVERY_MODE, _EVERY_RULE, _close,
                          _kwargs, _mostly_close)

ml_dtypes = pytest.importorskip("ml_dtypes")
N = 4096 + 300              # elements: int8 state at the default min_8bit_size, a part tile
STEPS = 4
_FORMAT_KW = ("state_dtype", "master_weights", "stochastic_rounding", "seed", "min_8bit_size")
# rules whose NumPy reference rounds less often than the float32 kernels (Rprop's factors,
# in plain float32 too): a sign decision may then differ in a few elements
LOOSE = ("Rprop",)


def _case(rule_case, mode):
    name, opts = rule_case
    rule = hwoptim.RULES[name.split("[")[0]]
    dtype, fopts = mode
    kw = _kwargs(rule, opts)
    h, _, flags = tcs._split(rule, kw)
    fmt = formats.make(dtype, fopts.get("state_dtype"), fopts.get("master_weights", False),
                       fopts.get("stochastic_rounding", False))
    return rule, h, flags, codegen.plan(rule, flags), fmt, fopts.get("seed", 0)


CASES = [pytest.param(c, m, id=f"{c[0]}-{mid}") for c in RULE_CASES
         for m, mid in zip(MODES, MODE_IDS)
         if mid in _EVERY_RULE or c[0].split("[")[0] in _EVERY_MODE]
CASE_ARCH = [pytest.param(*p.values, arch, id=f"{p.id}-sm_{arch}")
             for p in CASES for arch in tcs.ARCHS]


# ----------------------------------------------------------------------------- NVRTC

@pytest.mark.parametrize("rule_case, mode, arch", CASE_ARCH)
def test_format_kernels_compile(compiler, rule_case, mode, arch):   # noqa: F811
    rule, h, flags, plan, fmt, _ = _case(rule_case, mode)
    k = codegen.cuda_format_source(plan, fmt)
    what = f"{rule.name} {fmt.key} sm_{arch}"
    assert codegen.c_format_element_function(plan, fmt) in k.source, what
    assert codegen.c_format_element_function(plan, fmt) in \
        codegen.cpp_format_test_source(plan, fmt), f"{what}: the C++ harness runs another body"
    res = compiler.result(k.source, (f"-arch=sm_{arch}",) + tcs.CUPY_OPTIONS)
    assert res.ok, (f"{what}: NVRTC failed ({res.status}); expected the source to compile. "
                    f"Log:\n{res.log}")
    entries = tcs._entries(res.ptx)
    want = {k.name, k.device} | ({k.reduce, k.reduce_dev, k.reduce_dev_finish}
                                 if plan.norms else set())
    assert set(entries) == want, f"{what}: PTX kernels are {sorted(entries)}; expected {want}"
    n_args = 5 if plan.norms else 4          # table, chunks, n_tensors, n_chunks (, sums)
    for name in {k.name, k.reduce} - {""}:
        assert entries[name][0] == ["u64"] * n_args, (
            f"{what}: {name} takes PTX parameters {entries[name][0]}; expected "
            f"{n_args} x u64 (what backends/cupy.py passes)")
    # capturable: then k_dev, step_dev, guard, the seed's two words (, the finished sums)
    assert entries[k.device][0] == ["u64"] * 7 + ["u32"] * 2 + ["u64"] * bool(plan.norms), \
        entries[k.device][0]
    if plan.norms:           # the device reduction: table..., k_dev, guard, sums; the finish:
        assert entries[k.reduce_dev][0] == ["u64"] * 7         # sums, parts, n, guard
        assert entries[k.reduce_dev_finish][0] == ["u64"] * 4
        for name in (k.reduce_dev, k.reduce_dev_finish):     # the same sums in any run
            assert "shfl.sync.bfly" in entries[name][1], (what, name)
            assert not re.search(r"\b(atom|red)\.", entries[name][1]), (what, name)
    body = entries[k.name][1]
    if fmt.quantized and any(a in plan.outputs for a in plan.arrays[2:]):
        assert "shfl.sync.bfly" in body and "vote.sync.any" in body, (
            f"{what}: expected each block's absmax and sign reduced across the warp")
    if fmt.param in formats.SIXTEEN:          # 16-bit params: 2-byte accesses
        assert "ld.global.nc.u16" in body or "ld.global.u16" in body, what


# ----------------------------------------------------------------------------- C++

def _storage(fmt: Format, name: str) -> np.dtype:
    st = fmt.storage(name)
    return np.dtype(np.uint8) if st == "uint8" else formats.np_dtype(st)


def _buffers(rule, h, flags, plan, fmt, rng, n=None) -> dict:
    """Every buffer of one tensor of ``n`` (default ``N``) elements in ``fmt``, as an
    optimizer starts: random params, state at its initial value, the master copy from the
    params."""
    N = n or globals()["N"]
    p32 = (rng.standard_normal(N) * 10.0 ** rng.uniform(-2, 1, N)).astype(np.float32)
    b = {"param": formats.round_nearest(p32, fmt.param), "grad": None}
    for s in rule.active_states(flags):
        init = h[s.init] if isinstance(s.init, str) else s.init
        v = np.full(N, init, np.float32)
        if fmt.quantized:
            b[s.name], b[f"{s.name}_absmax"] = formats.quantize(v)
        else:
            b[s.name] = formats.round_nearest(v, fmt.state)
    if fmt.master:
        b["master"] = b["param"].astype(np.float32)
    if fmt.sr:
        b["_srkey"] = np.zeros(1, np.uint32)
    return {a: b[a] for a in fmt.arrays(plan.arrays)}


def _unit(entries) -> str:
    out = ["#include <cmath>", "#include <cstring>", "#include <xmmintrin.h>"]
    for sym, plan, fmt in entries:
        out += [f"#define run run_{sym}", f"namespace f_{sym} {{",
                codegen.cpp_format_test_source(plan, fmt), "}", "#undef run", ""]
    return "\n".join(out)


_LIB = {}


def _build(name, source, flags=("-ffp-contract=off",)):
    why = tcs._cxx_unavailable()
    if why:
        pytest.skip(why)
    if name not in _LIB:
        tmp = tempfile.mkdtemp(prefix="hwoptim-cppfmt-")
        src, so = os.path.join(tmp, f"{name}.cpp"), os.path.join(tmp, f"{name}.so")
        with open(src, "w") as f:
            f.write(source)
        cmd = [os.environ.get("CXX", "g++"), "-O2", "-std=c++17", "-shared", "-fPIC", *flags,
               src, "-o", so]
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode == 0, (f"{' '.join(cmd)} failed; expected the generated C++ to "
                                   f"compile:\n{p.stdout}{p.stderr}")
        _LIB[name] = ctypes.CDLL(so)
        shutil.rmtree(tmp, ignore_errors=True)          # (the loaded library stays)
    return _LIB[name]


def _sym(plan, fmt) -> str:
    return f"{plan.key}_{fmt.key}"


@pytest.fixture(scope="module")
def cpp_formats():
    """One library with the harness of every case (the GPU's arithmetic: no contraction)."""
    entries, seen = [], set()
    for p in CASES:
        _, _, _, plan, fmt, _ = _case(*p.values)
        if _sym(plan, fmt) not in seen:
            seen.add(_sym(plan, fmt))
            entries.append((_sym(plan, fmt), plan, fmt))
    return _build("formats", _unit(entries))


def _run_cpp(lib, plan, fmt, bufs, scalars, lo=0, ftz=0):
    f = getattr(lib, f"run_{_sym(plan, fmt)}")
    names = fmt.arrays(plan.arrays)
    f.argtypes = ([ctypes.c_void_p] * len(names) + [ctypes.c_float] * len(plan.scalars)
                  + [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_int])
    f.restype = None
    n = bufs["param"].size
    nscale = np.ascontiguousarray(plan.norm_scale([n]).reshape(-1), np.float64) \
        if plan.norms else np.zeros(1)
    f(*[bufs[a].ctypes.data for a in names], *[float(s) for s in scalars], lo, n,
      nscale.ctypes.data, ftz)


def _same_bits(a, b) -> bool:
    return a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("rule_case, mode", CASES)
def test_cpp_format_steps_are_the_reference(cpp_formats, rule_case, mode):
    rule, h, flags, plan, fmt, seed = _case(rule_case, mode)
    rng = np.random.default_rng(zlib.crc32(f"{rule_case[0]} {fmt.key}".encode()))
    ref = backends.load("numpy").kernel(plan, fmt.key)
    scal = codegen.host_scalar_function(plan, fmt.compute)
    start = _buffers(rule, h, flags, plan, fmt, rng)
    want = {k: (v.copy() if v is not None else None) for k, v in start.items()}
    got = {ftz: {k: (v.copy() if v is not None else None) for k, v in start.items()}
           for ftz in (0, 1)}
    names = fmt.arrays(plan.arrays)
    for t in range(1, STEPS + 1):
        g32 = (rng.standard_normal(N) * 10.0 ** rng.uniform(-2, 1, N)).astype(np.float32)
        grad = formats.round_nearest(g32, fmt.param)
        for b in (want, *got.values()):
            b["grad"] = grad.copy()
            if fmt.sr:
                b["_srkey"][0] = formats.sr_key(seed, t, [0])[0]
        ref([want[a] for a in names], ref.prepare(h, t))
        for ftz, b in got.items():
            _run_cpp(cpp_formats, plan, fmt, b, scal(h, t), ftz=ftz)
        for ftz, b in got.items():
            for a in names:
                x, y = b[a], want[a]
                what = f"{rule.name} {fmt.key} step {t} {a} (ftz={ftz})"
                if plan.norms:           # norms summed in another order: to rounding
                    ok = x.dtype == y.dtype and _close([x], [y])
                elif rule.name in LOOSE:
                    ok = x.dtype == y.dtype and _mostly_close([x], [y])
                else:
                    ok = _same_bits(x, y)
                if not ok:
                    bad = np.flatnonzero(x.view(np.uint8) != y.view(np.uint8))
                    pytest.fail(f"{what}: C++ differs from the NumPy reference at bytes "
                                f"{bad[:8]} (of {bad.size}); expected the same bits")
    assert not _same_bits(want["param"], start["param"])                 # it moved


# ----------------------------------------------------------------------------- conversions

_CONV = r'''
#include <cmath>
#include <cstring>
#include <xmmintrin.h>
#define __device__
#define __forceinline__ inline
using std::rintf;
%s
extern "C" {
void bf_load(const unsigned short* u, float* out, long long n)
{ for (long long i = 0; i < n; ++i) out[i] = hw_bf_load(u[i]); }
void h_load(const unsigned short* u, float* out, long long n)
{ for (long long i = 0; i < n; ++i) out[i] = hw_h_load(u[i]); }
void bf_round(const float* x, unsigned short* out, long long n)
{ for (long long i = 0; i < n; ++i) out[i] = hw_bf_round(x[i]); }
void h_round(const float* x, unsigned short* out, long long n)
{ for (long long i = 0; i < n; ++i) out[i] = hw_h_round(x[i]); }
void bf_sr(const float* x, const unsigned* r, unsigned short* out, long long n)
{ for (long long i = 0; i < n; ++i) out[i] = hw_bf_sr(x[i], r[i]); }
void h_sr(const float* x, const unsigned* r, unsigned short* out, long long n)
{ for (long long i = 0; i < n; ++i) out[i] = hw_h_sr(x[i], r[i]); }
void bits(unsigned key, long long lo, long long n, unsigned* out)
{
    const unsigned kh = key ^ hw_mix32((unsigned)(lo >> 32));
    for (long long i = 0; i < n; ++i) out[i] = hw_mix32((unsigned)(lo + i) ^ kh);
}
void quantize(const float* x, long long n, unsigned char* codes, float* absmax, int ftz)
{
    const unsigned int csr = _mm_getcsr();
    if (ftz) _mm_setcsr(csr | 0x8040);
    for (long long b = 0; (b << 8) < n; ++b) {
        unsigned A = 0u; bool neg = false;
        for (long long i = b << 8; i < n && i < ((b + 1) << 8); ++i) {
            A = A > hw_abs_bits(x[i]) ? A : hw_abs_bits(x[i]);
            neg = neg || x[i] < 0.0f;
        }
        float pre, inv, sa; bool u;
        hw_q_scale(A, neg, pre, inv, u, sa);
        for (long long i = b << 8; i < n && i < ((b + 1) << 8); ++i)
            codes[i] = hw_q_code(x[i], pre, inv, u);
        absmax[b] = sa;
    }
    _mm_setcsr(csr);
}
void dequantize(const unsigned char* codes, const float* absmax, long long n, float* out)
{ for (long long i = 0; i < n; ++i) out[i] = hw_q_load(codes[i], absmax[i >> 8]); }
void sr_keys(unsigned seed_lo, unsigned seed_hi, const double* steps, const long long* tensors,
             long long n, unsigned* out)
{ for (long long i = 0; i < n; ++i) out[i] = hw_sr_key(seed_lo, seed_hi, steps[i], tensors[i]); }
}
'''


@pytest.fixture(scope="module")
def conv():
    lib = _build("conversions", _CONV % codegen._C_FORMAT_HELPERS)
    p = ctypes.c_void_p
    for name, args in {"bf_load": [p, p, ctypes.c_longlong], "h_load": [p, p, ctypes.c_longlong],
                       "bf_round": [p, p, ctypes.c_longlong],
                       "h_round": [p, p, ctypes.c_longlong],
                       "bf_sr": [p, p, p, ctypes.c_longlong], "h_sr": [p, p, p, ctypes.c_longlong],
                       "bits": [ctypes.c_uint, ctypes.c_longlong, ctypes.c_longlong, p],
                       "quantize": [p, ctypes.c_longlong, p, p, ctypes.c_int],
                       "dequantize": [p, p, ctypes.c_longlong, p],
                       "sr_keys": [ctypes.c_uint, ctypes.c_uint, p, p, ctypes.c_longlong,
                                   p]}.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    return lib


def _float32_patterns(rng) -> np.ndarray:
    """Float32 values whose 16-bit roundings are hard: every exponent with the mantissa's
    low bits at, just below and just above each tie, random bit patterns, subnormals, the
    infinities and NaNs, signed."""
    e = np.arange(256, dtype=np.uint32) << np.uint32(23)
    low = np.array([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000,
                    0x8001, 0xFFFF, 0x10000, 0x18000, 0x7FFFFF, 0x400000, 0x7FE000,
                    0x7FF000, 0x7FEFFF, 0x7FF001], np.uint32)
    hi = rng.integers(0, 1 << 23, 64, dtype=np.uint32) & np.uint32(0x7F0000)
    grid = (e[:, None, None] | hi[None, :, None] | low[None, None, :]).reshape(-1)
    rand = rng.integers(0, 1 << 32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    bits = np.concatenate([grid, rand])
    bits = np.concatenate([bits, bits ^ np.uint32(0x80000000)])
    return bits.view(np.float32)


def test_conversions_are_the_reference(conv):
    """hw_bf_load/hw_h_load over all 65536 patterns, hw_bf_round/hw_h_round over the hard
    float32 patterns: the bits of ml_dtypes' and NumPy's conversions (NaN: NaN)."""
    rng = np.random.default_rng(5)
    u = np.arange(65536, dtype=np.uint16)
    for fn, dt in (("bf_load", formats.np_dtype("bfloat16")), ("h_load", np.float16)):
        out = np.empty(u.size, np.float32)
        getattr(conv, fn)(u.ctypes.data, out.ctypes.data, u.size)
        want = u.view(dt).astype(np.float32)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(out), nan), fn
        assert np.array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32)), fn
    x = _float32_patterns(rng)
    for fn, st in (("bf_round", "bfloat16"), ("h_round", "float16")):
        out = np.empty(x.size, np.uint16)
        getattr(conv, fn)(x.ctypes.data, out.ctypes.data, x.size)
        want = formats.round_nearest(x, st).view(np.uint16)
        nan = np.isnan(x)
        bad = np.flatnonzero((out != want) & ~nan)
        assert bad.size == 0, (f"{fn}: {bad.size} values differ, e.g. float32 bits "
                               f"{x[bad[:4]].view(np.uint32)}: {out[bad[:4]]} vs {want[bad[:4]]}")
        assert np.isnan(out[nan].view(formats.np_dtype(st)).astype(np.float32)).all(), fn


def test_stochastic_rounding_is_the_reference(conv):
    """hw_bf_sr/hw_h_sr with random bits: formats.round_stochastic's bits (the float16
    subnormal range and the edges to infinity included); the per-element bits at indices
    past 2**32: formats.element_bits's."""
    rng = np.random.default_rng(6)
    x = _float32_patterns(rng)
    tiny = (rng.uniform(0, 2.0 ** -23, 200_000) * rng.choice([-1, 1], 200_000))
    x = np.concatenate([x, tiny.astype(np.float32),
                        np.float32([65504, 65519.9, 65520, 3.3895e38, 3.39e38])])
    r = rng.integers(0, 1 << 32, x.size, dtype=np.uint64).astype(np.uint32)
    for fn, st in (("bf_sr", "bfloat16"), ("h_sr", "float16")):
        out = np.empty(x.size, np.uint16)
        getattr(conv, fn)(x.ctypes.data, r.ctypes.data, out.ctypes.data, x.size)
        want = formats.round_stochastic(x, st, r).view(np.uint16)
        nan = np.isnan(x)
        bad = np.flatnonzero((out != want) & ~nan)
        assert bad.size == 0, (f"{fn}: {bad.size} values differ, e.g. {x[bad[:4]]}: "
                               f"{out[bad[:4]]} vs {want[bad[:4]]}")
    for lo in (0, 2**32 - 256, 2**32, 3 * 2**32 + 4096):    # (a chunk: within 2**32)
        out = np.empty(256, np.uint32)
        conv.bits(0x9E3779B9, lo, 256, out.ctypes.data)
        want = formats.element_bits(0x9E3779B9, lo + np.arange(256, dtype=np.int64))
        assert np.array_equal(out, want), lo


def test_device_keys_are_the_reference(conv):
    """hw_sr_key (capturable steps make each tensor's key on the device from the seed, the
    device step count and the tensor's number): formats.sr_key's bits, seeds and steps
    past 2**32 included."""
    rng = np.random.default_rng(8)
    for seed in (0, 11, 2**40 + 3, 2**64 - 1, int(rng.integers(0, 2**63))):
        steps = np.concatenate([np.arange(1, 200), [2**31, 2**32, 2**32 + 7, 2**53]]
                               ).astype(np.float64)
        tensors = rng.integers(0, 5000, steps.size).astype(np.int64)
        out = np.empty(steps.size, np.uint32)
        conv.sr_keys(seed & 0xFFFFFFFF, seed >> 32, steps.ctypes.data, tensors.ctypes.data,
                     steps.size, out.ctypes.data)
        want = np.array([formats.sr_key(seed, int(t), [int(j)])[0]
                         for t, j in zip(steps, tensors)], np.uint32)
        assert np.array_equal(out, want), seed


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e-37, 1e-39, 1e30])
@pytest.mark.parametrize("ftz", [0, 1])
def test_int8_codes_are_the_reference(conv, scale, ftz):
    """The tile's quantization (hw_q_scale, hw_q_code) and decoding (hw_q_load): the codes
    and absmax of formats.quantize, values of formats.dequantize, bit for bit, for signed
    and non-negative blocks with NaN and infinities among them, blocks whose absmax is below
    2**-120 (1e-37: prescaled by 2**64) or subnormal (1e-39: the prescaled absmax built from
    its bits). With flush-to-zero the values are those the kernel's float arithmetic gives
    there: subnormals flushed."""
    rng = np.random.default_rng(7)
    n = 256 * 40 + 17
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 0, n) * scale).astype(np.float32)
    x[256:512] = np.abs(x[256:512])                          # non-negative blocks
    x[1024:1280] = np.abs(x[1024:1280])
    x[1024 + 3], x[2048 + 5], x[2048 + 9], x[3000] = np.nan, np.inf, -np.inf, 0.0
    x[1024 + 7] = np.inf                                     # a non-negative block's inf
    if ftz:
        x = np.where(np.abs(x) < np.float32(2.0 ** -126), np.copysign(np.float32(0), x), x)
    codes, absmax = np.empty(n, np.uint8), np.empty(-(-n // 256), np.float32)
    conv.quantize(x.ctypes.data, n, codes.ctypes.data, absmax.ctypes.data, ftz)
    wc, wa = formats.quantize(x)
    assert np.array_equal(absmax.view(np.uint32), wa.view(np.uint32)), scale
    assert np.array_equal(codes, wc), (scale, np.flatnonzero(codes != wc)[:8])
    out = np.empty(n, np.float32)
    conv.dequantize(wc.ctypes.data, wa.ctypes.data, n, out.ctypes.data)
    want = formats.dequantize(wc, wa)
    assert np.array_equal(np.isnan(out), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(out[ok].view(np.uint32), want[ok].view(np.uint32)), scale


# ----------------------------------------------------------------------------- launches

_LAUNCH_RULES = {"Adam": MODES, "SGD": [m for m in MODES if m[1].get("state_dtype")],
                 "Lion": [m for m in MODES if m[1].get("stochastic_rounding")]}
LAUNCH_CASES = [pytest.param(next(c for c in RULE_CASES if c[0].startswith(name + "[")), m,
                             id=f"{name}-{MODE_IDS[MODES.index(m)]}")
                for name, modes in _LAUNCH_RULES.items() for m in modes]


LAUNCH_SIZES = [4396, 300, 9000]


def _launch_case(rule_case, mode, salt, sizes=LAUNCH_SIZES):
    """A launch test's case: the harness library, the reference kernel and scalar function,
    and per tensor (``sizes``) its buffers and the reference's copies of them."""
    rule, h, flags, plan, fmt, seed = _case(rule_case, mode)
    lib = _build(f"launch_{_sym(plan, fmt)}", codegen.cpp_format_launch_test_source(plan, fmt))
    rng = np.random.default_rng(zlib.crc32(f"{salt} {rule_case[0]} {fmt.key}".encode()))
    got = []
    for n in sizes:
        b = _buffers(rule, h, flags, plan, fmt, rng, n)
        b["grad"] = np.zeros(n, formats.np_dtype(fmt.param))     # (an address of its own)
        got.append(b)
    want = [{k: v.copy() for k, v in b.items()} for b in got]
    return SimpleNamespace(rule=rule, h=h, plan=plan, fmt=fmt, seed=seed, lib=lib, rng=rng,
                           sizes=sizes,
                           names=fmt.arrays(plan.arrays), got=got, want=want,
                           ref=backends.load("numpy").kernel(plan, fmt.key),
                           scal=codegen.host_scalar_function(plan, fmt.compute))


def _new_grads(c, t, steps):
    """Step ``t``'s grads into every tensor, and the reference's step of each (tensor j at
    step ``steps[j]``, its key from the seed)."""
    for j, n in enumerate(c.sizes):
        g32 = (c.rng.standard_normal(n) * 10.0 ** c.rng.uniform(-2, 1, n)).astype(np.float32)
        c.got[j]["grad"][...] = formats.round_nearest(g32, c.fmt.param)
        c.want[j]["grad"] = c.got[j]["grad"].copy()
        if c.fmt.sr:
            c.want[j]["_srkey"][0] = formats.sr_key(c.seed, steps[j], [j])[0]
        c.ref([c.want[j][a] for a in c.names], c.ref.prepare(c.h, steps[j]))


def _assert_reference(c, t, what):
    for j in range(len(LAUNCH_SIZES)):
        for a in c.names:
            if a != "_srkey":
                assert _same_bits(c.got[j][a], c.want[j][a]), (
                    f"{c.rule.name} {c.fmt.key} step {t} tensor {j} {a}: {what} differs "
                    f"from the NumPy reference")


@pytest.mark.parametrize("rule_case, mode", LAUNCH_CASES)
def test_format_launch_on_the_cpu_is_the_reference(rule_case, mode):
    """The whole GPU launch of a storage format, run on the CPU: the multi-tensor kernel's
    own text (``codegen.cpp_format_launch_test_source``), entered for every warp of one
    block per chunk, reading the table the backend packs (``codegen.pack_table``: three
    tensors' addresses in ``fmt.arrays`` order, a stochastic-rounding key's address, a row
    per tensor, the scalar rows) and its chunk table (``FORMAT_CHUNK``): each tensor's
    buffers after 3 steps are the NumPy reference's bits, one tensor a step ahead of the
    others (its own scalar row)."""
    from hwoptim.backends.cupy import FORMAT_CHUNK
    c = _launch_case(rule_case, mode, "launch")
    f = c.lib.launch
    i64 = np.ctypeslib.ndpointer(dtype=np.int64, flags="C_CONTIGUOUS")
    f.argtypes = [i64, i64, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int]
    f.restype = None
    keys = np.zeros(len(LAUNCH_SIZES), np.uint32)
    chunks = codegen.chunk_table(LAUNCH_SIZES, FORMAT_CHUNK)
    rows = np.array([0, 1, 0], np.int64)
    ptrs = np.array([[keys.ctypes.data + 4 * j if a == "_srkey" else c.got[j][a].ctypes.data
                      for a in c.names] for j in range(len(LAUNCH_SIZES))], np.int64)
    for t in range(1, 4):
        steps = [t, t + 1, t]                     # tensor 1 a step ahead: its own row
        _new_grads(c, t, steps)
        if c.fmt.sr:
            keys[:] = [formats.sr_key(c.seed, s_, [j])[0] for j, s_ in enumerate(steps)]
        scalars = np.array([c.scal(c.h, t), c.scal(c.h, t + 1)], dtype=c.fmt.compute)
        f(codegen.pack_table(ptrs, rows, scalars), chunks, len(LAUNCH_SIZES),
          chunks.shape[0], t % 2)
        _assert_reference(c, t, "the launch")


@pytest.mark.parametrize("rule_case, mode", LAUNCH_CASES)
def test_capturable_format_launch_on_the_cpu_is_the_reference(rule_case, mode):
    """The capturable variant of the launch (``<base>_multi_dev``), run whole on the CPU as
    above: scalars from ``k_dev``, each tensor's stochastic-rounding key made in the kernel
    from the seed, the device step count and the tensor's number (the table's key column):
    three tensors after 3 steps are the NumPy reference's bits; a step whose verdict says
    skip changes no byte."""
    from hwoptim.backends.cupy import FORMAT_CHUNK
    c = _launch_case(rule_case, mode, "launch-dev")
    f = c.lib.launch_dev
    i64 = np.ctypeslib.ndpointer(dtype=np.int64, flags="C_CONTIGUOUS")
    tc = np.ctypeslib.ndpointer(dtype=c.fmt.compute, flags="C_CONTIGUOUS")
    f64 = np.ctypeslib.ndpointer(dtype=np.float64, flags="C_CONTIGUOUS")
    f.argtypes = [i64, i64, ctypes.c_longlong, ctypes.c_longlong, tc, f64, ctypes.c_void_p,
                  ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
    f.restype = None
    chunks = codegen.chunk_table(LAUNCH_SIZES, FORMAT_CHUNK)
    ptrs = np.array([[j if a == "_srkey" else c.got[j][a].ctypes.data for a in c.names]
                     for j in range(len(LAUNCH_SIZES))], np.int64)
    table = codegen.pack_table(ptrs, np.zeros(len(LAUNCH_SIZES), np.int64),
                               np.zeros((1, len(c.plan.scalars)), c.fmt.compute))
    skip = np.array([1.0, 1.0, np.nan, 0.0])
    seed = (c.seed & 0xFFFFFFFF, c.seed >> 32)
    for t in range(1, 4):
        _new_grads(c, t, [t] * len(LAUNCH_SIZES))
        k_dev = np.ascontiguousarray(c.scal(c.h, t), dtype=c.fmt.compute)
        step_dev = np.array([float(t)])
        before = [{a: v.copy() for a, v in b.items()} for b in c.got]
        f(table, chunks, len(LAUNCH_SIZES), chunks.shape[0], k_dev, step_dev,
          skip.ctypes.data, *seed, 0)
        for b, b0 in zip(c.got, before):
            assert all(_same_bits(b[a], b0[a]) for a in b0), "a skipped step changed bytes"
        f(table, chunks, len(LAUNCH_SIZES), chunks.shape[0], k_dev, step_dev, None, *seed,
          t % 2)
        _assert_reference(c, t, "the capturable launch")


_NORM_LAUNCH = [pytest.param(next(c for c in RULE_CASES if c[0].startswith(name + "[")), m,
                             id=f"{name}-{MODE_IDS[MODES.index(m)]}")
                for name in ("LAMB", "LARS", "Adafactor")
                for m in (MODES[7], MODES[6], MODES[4])]     # int8; float16 SR; master+bf16


@pytest.mark.parametrize("rule_case, mode", _NORM_LAUNCH)
def test_capturable_format_launch_with_norms_on_the_cpu(rule_case, mode):
    """Rules taking norms (LAMB, LARS, Adafactor's vectors), capturable in a storage
    format, run whole on the CPU as the backend launches them per param (a table of one
    tensor): the reduction over ``format_norm_blocks(n)`` blocks (step 2: at most 5, step 3:
    one, so a block takes many chunks), each warp's partial into the scratch (NaN
    beforehand: every partial read is written, none past them), one warp adding them in
    order (an RMS times 1/n), then the update reading them: three tensors after 3 steps are
    the NumPy reference's values to rounding (the sums run in another order), a step whose
    verdict says skip changes no byte, and a repeat gives the same bits."""
    from hwoptim.backends.cupy import FORMAT_CHUNK, format_norm_blocks, norm_scratch
    sizes = [4396, 300, 70_000]                 # (18 chunks: more partials than a warp)
    c = _launch_case(rule_case, mode, "launch-norms", sizes)
    assert c.plan.norms
    f = c.lib.launch_dev
    i64 = np.ctypeslib.ndpointer(dtype=np.int64, flags="C_CONTIGUOUS")
    tc = np.ctypeslib.ndpointer(dtype=c.fmt.compute, flags="C_CONTIGUOUS")
    f64 = np.ctypeslib.ndpointer(dtype=np.float64, flags="C_CONTIGUOUS")
    f.argtypes = [i64, i64, ctypes.c_longlong, ctypes.c_longlong, tc, f64, ctypes.c_void_p,
                  ctypes.c_uint, ctypes.c_uint, f64, ctypes.c_longlong, ctypes.c_longlong,
                  ctypes.c_int]
    f.restype = None
    k = len(c.plan.norms)
    seed = (c.seed & 0xFFFFFFFF, c.seed >> 32)
    skip = np.array([1.0, 1.0, np.nan, 0.0])

    def launch(j, t, guard, ftz):
        n = sizes[j]
        chunks = codegen.chunk_table([n], FORMAT_CHUNK)
        table = codegen.pack_table(
            np.array([[j if a == "_srkey" else c.got[j][a].ctypes.data for a in c.names]],
                     np.int64), np.zeros(1, np.int64),
            np.zeros((1, len(c.plan.scalars)), c.fmt.compute))
        k_dev = np.ascontiguousarray(c.scal(c.h, t), dtype=c.fmt.compute)
        sums = np.full(norm_scratch(k, n), np.nan)
        blocks = min(format_norm_blocks(n), {1: n, 2: 5, 3: 1}[t])
        f(table, chunks, 1, chunks.shape[0], k_dev, np.array([float(t)]), guard, *seed,
          sums, blocks, n, ftz)
        return sums, k * (1 + 8 * blocks)

    for t in range(1, 4):
        _new_grads(c, t, [t] * len(sizes))
        for j in range(len(sizes)):
            before = {a: v.copy() for a, v in c.got[j].items()}
            launch(j, t, skip.ctypes.data, 0)
            assert all(_same_bits(c.got[j][a], before[a]) for a in before), \
                "a skipped step changed bytes"
            sums, used = launch(j, t, None, t % 2)
            assert np.isfinite(sums[:used]).all() and np.isnan(sums[used:]).all()
            if t == 3:                              # the same inputs: the same bits
                again = {a: v.copy() for a, v in c.got[j].items()}
                for a in before:
                    c.got[j][a][...] = before[a]
                launch(j, t, None, t % 2)
                assert all(_same_bits(c.got[j][a], again[a]) for a in again)
        for j in range(len(sizes)):
            for a in c.names:
                if a != "_srkey":
                    x, y = c.got[j][a], c.want[j][a]
                    assert x.dtype == y.dtype and _close([x], [y]), (
                        f"{c.rule.name} {c.fmt.key} step {t} tensor {j} {a}: the capturable "
                        f"launch differs from the NumPy reference beyond rounding")
    assert not _same_bits(c.got[0]["param"], _launch_case(rule_case, mode, "launch-norms",
                                                          sizes).got[0]["param"])
