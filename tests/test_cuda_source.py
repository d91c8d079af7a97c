"""The GPU kernels, checked on any machine (no GPU needed), in every CI run.

a. NVRTC: the full CUDA source ``codegen.cuda_source`` prints for every rule, option set and
   dtype, and the floor kernels (``codegen.floor_plan``, one per distinct set of arrays, as
   the floor depends on nothing else), compile with the NVRTC of the
   ``nvidia-cuda-nvrtc-cu12`` wheel (through ctypes) for sm_80 and sm_90 with the options
   CuPy's ``RawModule`` uses (``-arch=sm_XX -ftz=true --device-as-default-execution-space``)
   to cubins. Every kernel the cupy backend launches is in the output, with the argument
   list the backend passes, and the vectorised kernels really use 16-byte loads and stores.
   The ElementwiseKernel variant's preamble and operation (captured from
   ``backends/cupy_elementwise.py`` itself) compile inside a small wrapper kernel.
b. C++: the same per-element update function, compiled by g++ through
   ``codegen.cpp_test_source``, runs >= 50 steps over random inputs (zeros and tiny values
   included); every step is compared with the float64 NumPy reference under the stated
   per-step tolerances (``hwoptim.testing``), for four builds: FMA contraction off and on,
   each with flush-to-zero + denormals-are-zero off and on (the GPU runs with FMA and FTZ).
   The device-side scalar function (``codegen.c_scalar_function``, what capturable mode runs
   in its ``advance`` kernel) is checked against the host's per-step scalars.

Without the NVRTC wheel the NVRTC tests skip, unless ``HWOPTIM_REQUIRE_NVRTC=1``, when they
fail. Without g++ (or off x86-64, where the flush-to-zero switch is MXCSR) the C++ tests skip.
"""
from __future__ import annotations

import ctypes
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import hwoptim
from hwoptim import codegen, testing
from hwoptim.backends.cupy import NVRTC_OPTIONS
from hwoptim.spec import evaluate, host_scalars, with_carry

from every_op import RULE as EVERY_OP   # every element operation, for the printers

DTYPES = ("float32", "float64")
ARCHS = ("80", "90")
STEPS = 50                  # steps per C++ run (the brief: >= 50)
N = 2048                    # elements per C++ run
# CuPy 14 (cupy/cuda/compiler.py): RawModule passes -ftz=true, then -arch=sm_XX (cubin when
# NVRTC knows the architecture) and --device-as-default-execution-space (jitify off).
# hwoptim adds its own (backends/cupy.py NVRTC_OPTIONS: --fmad=false).
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space") + NVRTC_OPTIONS


# ----------------------------------------------------------------------------- cases

def _split(rule, kwargs):
    """(hypers, options, static flags) of one option set: the spec's defaults, overridden."""
    h = {n: hy.default for n, hy in rule.hypers.items()}
    opt = dict(rule.options)
    for k, v in kwargs.items():
        if k in rule.options:
            opt[k] = v
        elif k in rule.hypers:
            h[k] = v
        else:
            raise AssertionError(f"{rule.name}.test_options names {k!r}, which is neither a "
                                 f"hyperparameter nor an option")
    return h, opt, rule.static_flags(h, opt)


def _hyper_vector(rule, h) -> np.ndarray:
    """The device hyperparameter vector, as ``Optimizer._hyper_vector`` builds it."""
    vals = []
    for n, hy in rule.hypers.items():
        vals += list(h[n]) if isinstance(hy.default, tuple) else [h[n]]
    vals += [h[c.name] for c in rule.carry]       # carried scalars follow (spec.trace_scalars)
    return np.asarray(vals, dtype=np.float64)


class Case(types.SimpleNamespace):
    pass


# rules whose kernels are also built with a grad factor (the ``_clip`` flag: max_grad_norm's
# clip, loss scaling's 1/scale), at a factor exact in every dtype
CLIP_RULES, CLIP = ("Adam", "SGD", "LAMB", "Lion"), 0.375


def _cases():
    out = []
    for rule in [*hwoptim.RULES.values(), EVERY_OP]:
        for cid, kwargs in testing.option_sets(rule):
            h, opt, flags = _split(rule, kwargs)
            out.append(Case(id=cid, rule=rule, kwargs=kwargs, h=h, flags=flags,
                            plan=codegen.plan(rule, flags)))
    for name in CLIP_RULES:
        rule = hwoptim.RULES[name]
        h, opt, flags = _split(rule, {})
        flags._clip = True
        out.append(Case(id=f"{name}[grad factor]", rule=rule, kwargs={},
                        h={**h, "_clip": CLIP}, flags=flags, plan=codegen.plan(rule, flags)))
    return out


def _base(rule, h, t) -> dict:
    """The per-step scalars ``rule.scalars`` gives, and the grad factor where ``h`` has one."""
    out = host_scalars(rule, h, t)
    if "_clip" in h:
        out["_clip"] = h["_clip"]
    return out


CASES = _cases()
# floor kernels depend only on which arrays a plan reads and writes: one per distinct set
_FLOORS = {}
for _c in CASES:
    _FLOORS.setdefault((_c.rule.name, _c.plan.reads, _c.plan.outputs), _c)
FLOOR_DTYPE_ARCH = [pytest.param(c, dt, arch, id=f"{r}[{'+'.join(codegen._c_used(c.plan))}]"
                                                 f"-{dt}-sm_{arch}")
                    for (r, _, _), c in _FLOORS.items() for dt in DTYPES for arch in ARCHS]
CASE_DTYPE = [pytest.param(c, dt, id=f"{c.id}-{dt}") for c in CASES for dt in DTYPES]
CASE_DTYPE_ARCH = [pytest.param(c, dt, arch, id=f"{c.id}-{dt}-sm_{arch}")
                   for c in CASES for dt in DTYPES for arch in ARCHS]


# ----------------------------------------------------------------------------- NVRTC

def _nvrtc_candidates() -> list:
    """libnvrtc shared libraries of the installed NVIDIA wheels, newest major first."""
    dirs = []
    try:
        import nvidia.cuda_nvrtc as pkg            # nvidia-cuda-nvrtc-cu12
        dirs += [os.path.join(p, "lib") for p in pkg.__path__]
    except ImportError:
        pass
    try:
        import nvidia                              # CUDA 13 wheels: nvidia/cu13/lib
        for p in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(p, "cu*", "lib")))
    except ImportError:
        pass
    libs = []
    for d in dirs:
        for f in glob.glob(os.path.join(d, "libnvrtc.so*")):
            base = os.path.basename(f)
            if "builtins" in base or ".alt." in base:
                continue
            libs.append(f)
    def major(f):
        m = re.search(r"\.so\.(\d+)", f)
        return int(m.group(1)) if m else 0
    return sorted(set(libs), key=major, reverse=True)


class NVRTC:
    """The few NVRTC entry points the tests need, through ctypes."""

    def __init__(self, path):
        self.path = path
        lib = ctypes.CDLL(path)
        self.lib = lib
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)
        n = ctypes.c_int()
        self._check(lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)), "nvrtcGetNumSupportedArchs")
        archs = (ctypes.c_int * n.value)()
        self._check(lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
        self.archs = tuple(archs)

    def _check(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def _get(self, prog, size_fn, get_fn):
        size = ctypes.c_size_t()
        rc = getattr(self.lib, size_fn)(prog, ctypes.byref(size))
        if rc != 0:
            return None
        buf = ctypes.create_string_buffer(size.value)
        self._check(getattr(self.lib, get_fn)(prog, buf), get_fn)
        return buf.raw[:size.value]

    def compile(self, source: str, options: tuple) -> types.SimpleNamespace:
        """Compile ``source``: ok, log, ptx (text) and cubin (bytes, for sm_XX), seconds."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kern.cu",
                                                0, None, None), "nvrtcCreateProgram")
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            t0 = time.perf_counter()
            rc = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            seconds = time.perf_counter() - t0
            log = (self._get(prog, "nvrtcGetProgramLogSize", "nvrtcGetProgramLog") or b"")
            log = log.rstrip(b"\0").decode(errors="replace")
            ptx = cubin = None
            if rc == 0:
                ptx = self._get(prog, "nvrtcGetPTXSize", "nvrtcGetPTX")
                ptx = ptx.rstrip(b"\0").decode() if ptx else None
                cubin = self._get(prog, "nvrtcGetCUBINSize", "nvrtcGetCUBIN")
            status = self.lib.nvrtcGetErrorString(rc).decode()
            return types.SimpleNamespace(ok=rc == 0, status=status, log=log, ptx=ptx,
                                         cubin=cubin, seconds=seconds, options=options)
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


_NVRTC = {}


@pytest.fixture(scope="session")
def nvrtc():
    if "lib" not in _NVRTC:
        why = None
        cands = _nvrtc_candidates()
        if not cands:
            why = ("the NVRTC wheel is not installed (pip install nvidia-cuda-nvrtc-cu12, "
                   "part of hwoptim[test]): no libnvrtc.so under the nvidia package")
        else:
            try:
                _NVRTC["lib"] = NVRTC(cands[0])
            except OSError as e:
                why = f"{cands[0]} could not be loaded: {e}"
        _NVRTC["why"] = why
    if _NVRTC.get("why"):
        if os.environ.get("HWOPTIM_REQUIRE_NVRTC") == "1":
            pytest.fail(f"HWOPTIM_REQUIRE_NVRTC=1 but {_NVRTC['why']}")
        pytest.skip(_NVRTC["why"])
    return _NVRTC["lib"]


class _Compiler:
    """Compile jobs on a thread pool (NVRTC releases the GIL through ctypes), memoized by
    (source, options), so the many small programs share the machine's cores."""

    def __init__(self, nv):
        self.nv = nv
        self.pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
        self.futures = {}
        self.seconds = 0.0

    def submit(self, source, options):
        key = (source, tuple(options))
        if key not in self.futures:
            self.futures[key] = self.pool.submit(self.nv.compile, source, tuple(options))
        return self.futures[key]

    def result(self, source, options):
        return self.submit(source, options).result()


def _rule_source(case, dtype):
    return codegen.cuda_source(case.plan, dtype)


def _floor_source(case, dtype):
    return codegen.cuda_source(codegen.floor_plan(case.plan), dtype)


def _multi_source(case, dtype):
    return codegen.cuda_multi_source(case.plan, dtype)


def _capture_elementwise(plan, dtype):
    """The arguments ``backends.cupy_elementwise.kernel`` gives ``cupy.ElementwiseKernel``
    (captured by a stand-in class, so no GPU is needed)."""
    import hwoptim.backends.cupy_elementwise as ew
    captured = {}

    class Capture:
        def __init__(self, in_params, out_params, operation, name="kernel", reduce_dims=True,
                     preamble="", no_return=False, return_tuple=False, **kwargs):
            captured.update(in_params=in_params, out_params=out_params, operation=operation,
                            name=name, preamble=preamble, no_return=no_return)

        def __call__(self, *args, **kwargs):
            raise AssertionError("the capture stand-in is never launched")

    fake = types.ModuleType("cupy")
    fake.ElementwiseKernel = Capture
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = fake
    try:
        ew.kernel(plan, dtype)
    finally:
        if saved is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved
    return captured


def _elementwise_wrapper(plan, dtype) -> tuple[str, str]:
    """CuPy's ElementwiseKernel body, by hand: its preamble, then a loop binding every
    non-scalar parameter to the element (inputs as const references, outputs as references)
    and running its operation. Returns (source, kernel name)."""
    cap = _capture_elementwise(plan, dtype)
    ctype = {"float32": "float", "float64": "double"}
    scalars = {f"k_{s}" for s in plan.all_scalars}

    def params(text):
        out = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            t, name = part.split()
            out.append((ctype[t], name))
        return out

    ins, outs = params(cap["in_params"]), params(cap["out_params"])
    assert cap["no_return"], "the elementwise kernel's operation returns nothing"
    args, binds = [], []
    for t, name in ins:
        if name in scalars:
            args.append(f"const {t} {name}")
        else:
            args.append(f"const {t}* __restrict__ _raw_{name}")
            binds.append(f"const {t}& {name} = _raw_{name}[i];")
    for t, name in outs:
        args.append(f"{t}* __restrict__ _raw_{name}")
        binds.append(f"{t}& {name} = _raw_{name}[i];")
    name = cap["name"] + "_check"
    body = "\n        ".join(binds + [cap["operation"] + ";"])
    src = (f"{cap['preamble']}\n"
           f'extern "C" __global__ void {name}({", ".join(args + ["const long long n"])})\n'
           f"{{\n    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; "
           f"i < n; i += (long long)gridDim.x * blockDim.x) {{\n        {body}\n    }}\n}}\n")
    return src, name


@pytest.fixture(scope="session")
def compiler(nvrtc, request):
    """One compiler per session; every NVRTC job of the collected tests is queued at once."""
    c = _Compiler(nvrtc)
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if spec is None or item.module.__name__ != __name__:
            continue
        fn = item.originalname
        if fn in ("test_rule_kernels_compile", "test_floor_kernels_compile"):
            case, dtype, arch = (spec.params[k] for k in ("case", "dtype", "arch"))
            src = (_rule_source if fn.startswith("test_rule") else _floor_source)(case, dtype)
            c.submit(src.source, (f"-arch=sm_{arch}",) + CUPY_OPTIONS)
        elif fn == "test_multi_kernel_compiles":
            case, dtype, arch = (spec.params[k] for k in ("case", "dtype", "arch"))
            c.submit(_multi_source(case, dtype).source, (f"-arch=sm_{arch}",) + CUPY_OPTIONS)
        elif fn == "test_elementwise_update_compiles":
            case, dtype, arch = (spec.params[k] for k in ("case", "dtype", "arch"))
            if case.plan.norms:               # refused by the backend (see the test)
                continue
            c.submit(_elementwise_wrapper(case.plan, dtype)[0],
                     (f"-arch=sm_{arch}",) + CUPY_OPTIONS)
    yield c
    c.pool.shutdown(wait=True)
    done = [f.result() for f in c.futures.values() if f.done() and not f.exception()]
    if done:
        print(f"\nNVRTC {nvrtc.version[0]}.{nvrtc.version[1]} ({nvrtc.path}): "
              f"{len(done)} programs, {sum(r.seconds for r in done):.1f} s of compile time")


_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(([^)]*)\)")


def _entries(ptx: str) -> dict:
    """Kernel name -> (PTX parameter types, PTX body text up to the next entry)."""
    found = list(_ENTRY.finditer(ptx))
    out = {}
    for i, m in enumerate(found):
        end = found[i + 1].start() if i + 1 < len(found) else len(ptx)
        out[m.group(1)] = (re.findall(r"\.param\s+\.(\w+)", m.group(2)), ptx[m.end():end])
    return out


def _check_module(res, k: codegen.CudaKernels, plan, dtype, what):
    assert res.ok, (f"{what}: NVRTC failed ({res.status}) with options {res.options}; "
                    f"expected the source to compile. Log:\n{res.log}")
    assert res.cubin, f"{what}: expected a cubin for {res.options[0]} (CuPy loads cubins)"
    entries = _entries(res.ptx)
    names = {k.main, k.unaligned, k.device, k.advance, k.device_guard, k.advance_guard}
    names |= {k.reduce_dev, k.reduce_dev_finish} if plan.norms else set()
    assert set(entries) == names, (f"{what}: PTX kernels are {sorted(entries)}; expected "
                                   f"exactly {sorted(names)}")
    for name in names:
        assert name.encode() in res.cubin, f"{what}: kernel {name} missing from the cubin"
    # the argument lists backends/cupy.py passes: arrays, scalars (numpy scalars of the
    # dtype), then n (int64); the device variant reads the scalars through one pointer
    used = codegen._c_used(plan)
    fp = {"float32": "f32", "float64": "f64"}[dtype]
    ptr = ["u64"] * len(used)
    sums = ["u64"] if plan.norms else []      # device-scalar kernels: the norms' sums
    want = {k.main: ptr + [fp] * len(plan.all_scalars) + ["u64"],
            k.unaligned: ptr + [fp] * len(plan.all_scalars) + ["u64"],
            k.device: ptr + ["u64", "u64"] + sums,
            k.advance: ["u64", "u64", "u64"],
            k.device_guard: ptr + ["u64", "u64"] + sums + ["u64"],
            k.advance_guard: ["u64", "u64", "u64", "u64"]}
    if plan.norms:       # the reduction's inputs, k_dev, n, sums, guard (may be null)
        want[k.reduce_dev] = ["u64"] * len(plan.reduce_reads) + ["u64"] * 4
        want[k.reduce_dev_finish] = ["u64"] * 3        # sums, the block count, guard
        for name in (k.reduce_dev, k.reduce_dev_finish):   # the same sums in any run
            assert not re.search(r"\b(atom|red)\.", entries[name][1]), f"{what}: {name}"
    for name, params in want.items():
        assert entries[name][0] == params, (f"{what}: {name} takes PTX parameters "
                                            f"{entries[name][0]}; expected {params}")
    # 16-byte vector loads and stores in the vectorised kernels
    v = {"float32": r"v4\.f32", "float64": r"v2\.f64"}[dtype]
    for name in (k.main, k.device, k.device_guard):
        body = entries[name][1]
        loads = len(re.findall(rf"ld\.global(?:\.nc)?(?:\.L\w+::\w+)*\.{v}", body))
        stores = len(re.findall(rf"st\.global(?:\.L\w+::\w+)*\.{v}", body))
        assert loads >= len(used) and stores >= len(plan.outputs), (
            f"{what}: {name} has {loads} 16-byte loads and {stores} 16-byte stores; expected "
            f"at least {len(used)} and {len(plan.outputs)} (one per array)")
    # and none in the kernel for misaligned arrays: a vector access there faults on the GPU
    body = entries[k.unaligned][1]
    wide = re.findall(r"(?:ld|st)\.global\S*\.v\d\.\w+", body)
    assert not wide, (f"{what}: {k.unaligned} (for arrays not on a 16-byte boundary) makes "
                      f"vector accesses {sorted(set(wide))}; expected element-wise ones only")


@pytest.mark.parametrize("case,dtype,arch", CASE_DTYPE_ARCH)
def test_rule_kernels_compile(compiler, case, dtype, arch):
    k = _rule_source(case, dtype)
    res = compiler.result(k.source, (f"-arch=sm_{arch}",) + CUPY_OPTIONS)
    _check_module(res, k, case.plan, dtype, f"{case.id} {dtype} sm_{arch}")


@pytest.mark.parametrize("case,dtype,arch", FLOOR_DTYPE_ARCH)
def test_floor_kernels_compile(compiler, case, dtype, arch):
    fp = codegen.floor_plan(case.plan)
    assert fp.reads == case.plan.reads and fp.outputs == case.plan.outputs, (
        f"floor plan of {case.id} reads {fp.reads} and writes {fp.outputs}; expected the "
        f"rule's {case.plan.reads} and {case.plan.outputs}")
    k = _floor_source(case, dtype)
    res = compiler.result(k.source, (f"-arch=sm_{arch}",) + CUPY_OPTIONS)
    _check_module(res, k, fp, dtype, f"floor of {case.id} {dtype} sm_{arch}")


@pytest.mark.parametrize("case,dtype,arch", CASE_DTYPE_ARCH)
def test_multi_kernel_compiles(compiler, case, dtype, arch):
    """The multi-tensor kernel (``codegen.cuda_multi_source``, what ``run.many`` launches):
    it compiles to a cubin; it is the module's only kernel, with the parameters
    backends/cupy.py passes (the packed table and the chunk table as pointers, then
    n_tensors and n_chunks as 64-bit integers); it runs the very update function
    ``cuda_source`` prints (the one the C++ tests run); and its aligned path makes 16-byte
    loads and stores of every array it uses."""
    k = _multi_source(case, dtype)
    what = f"multi-tensor kernel of {case.id} {dtype} sm_{arch}"
    assert codegen.c_update_function(case.plan) in k.source, (
        f"{what}: expected the update function of cuda_source verbatim in the source")
    assert k.source.count(f"{case.plan.key}_update(") == 3, (
        f"{what}: expected the update function defined once and called twice (vector loop, "
        f"element loop)")
    res = compiler.result(k.source, (f"-arch=sm_{arch}",) + CUPY_OPTIONS)
    assert res.ok, (f"{what}: NVRTC failed ({res.status}) with options {res.options}; "
                    f"expected the source to compile. Log:\n{res.log}")
    assert res.cubin and k.name.encode() in res.cubin, f"{what}: {k.name} missing from the cubin"
    entries = _entries(res.ptx)
    if case.plan.norms:      # the reduction kernel too; both take the sums array last
        assert set(entries) == {k.name, k.reduce}, f"{what}: PTX kernels are {sorted(entries)}"
        assert k.source.count(f"{case.plan.key}_reduce(") == 2
        for name in (k.name, k.reduce):
            assert entries[name][0] == ["u64"] * 5, (f"{what}: {name} takes PTX parameters "
                                                     f"{entries[name][0]}; expected 5 x u64")
        assert "atom.global.add.f64" in entries[k.reduce][1], (
            f"{what}: expected the block sums added atomically in double")
    else:
        assert set(entries) == {k.name}, f"{what}: PTX kernels are {sorted(entries)}"
        assert entries[k.name][0] == ["u64"] * 4, (f"{what}: takes PTX parameters "
                                                   f"{entries[k.name][0]}; expected 4 x u64")
    used = codegen._c_used(case.plan)
    v = {"float32": r"v4\.f32", "float64": r"v2\.f64"}[dtype]
    body = entries[k.name][1]
    loads = len(re.findall(rf"ld\.global(?:\.nc)?(?:\.L\w+::\w+)*\.{v}", body))
    stores = len(re.findall(rf"st\.global(?:\.L\w+::\w+)*\.{v}", body))
    assert loads >= len(used) and stores >= len(case.plan.outputs), (
        f"{what}: {loads} 16-byte loads and {stores} 16-byte stores; expected at least "
        f"{len(used)} and {len(case.plan.outputs)} (one per array)")
    assert k.vec == 16 // np.dtype(dtype).itemsize


@pytest.mark.parametrize("case,dtype,arch", CASE_DTYPE_ARCH)
def test_elementwise_update_compiles(compiler, case, dtype, arch):
    if case.plan.norms:
        with pytest.raises(ValueError, match="takes per-array norms"):
            _capture_elementwise(case.plan, dtype)
        return
    src, name = _elementwise_wrapper(case.plan, dtype)
    res = compiler.result(src, (f"-arch=sm_{arch}",) + CUPY_OPTIONS)
    assert res.ok, (f"{case.id} {dtype}: the ElementwiseKernel preamble + operation failed "
                    f"to compile ({res.status}); expected it to. Log:\n{res.log}\n"
                    f"Source:\n{src}")
    assert name in _entries(res.ptx), f"{case.id} {dtype}: kernel {name} missing from the PTX"


def test_nvrtc_supports_the_target_architectures(nvrtc):
    for arch in ARCHS:
        assert int(arch) in nvrtc.archs, (f"NVRTC {nvrtc.version} supports {nvrtc.archs}; "
                                          f"expected sm_{arch} among them")


def test_nvrtc_reports_errors(nvrtc):
    """The harness itself: a broken source must fail, with its error in the log."""
    res = nvrtc.compile('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }',
                        ("-arch=sm_80",) + CUPY_OPTIONS)
    assert not res.ok and "undefined_name" in res.log, (
        f"expected NVRTC to reject an undefined identifier; got ok={res.ok}, log={res.log!r}")


# ----------------------------------------------------------------------------- C++ (g++)

BUILDS = {"contract-off": ("-ffp-contract=off",),
          "fma": ("-mfma", "-ffp-contract=fast")}
RUNS = [(b, ftz) for b in BUILDS for ftz in (0, 1)]     # the four builds


def _cpu_has_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"^flags\s*:.*\bfma\b", f.read(), re.M) is not None
    except OSError:
        return False


def _cxx_unavailable():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the C++ harness switches flush-to-zero through MXCSR (x86-64); this is {platform.machine()}"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++, or $CXX) on PATH"
    return None


def _sym(plan, dtype) -> str:
    return f"{plan.key}_{dtype}"


def _cpp_unit(entries) -> str:
    """One translation unit with every (plan, dtype): ``codegen.cpp_test_source`` verbatim
    (its ``run`` renamed by a macro, its typedefs kept apart by a namespace) and the device
    scalar function ``codegen.c_scalar_function`` with a C entry point."""
    out = ["#include <cmath>", "#include <xmmintrin.h>",
           "#define __device__", "#define __forceinline__ inline"]
    for sym, plan, dtype in entries:
        out += [f"#define run run_{sym}", f"namespace u_{sym} {{",
                codegen.cpp_test_source(plan, dtype), "}", "#undef run",
                f"namespace s_{sym} {{",
                "using std::sqrt; using std::fabs; using std::fmax; using std::fmin; "
                "using std::pow;",
                codegen._typedefs(codegen.dtypes_for(dtype)),
                codegen.c_scalar_function(plan),
                codegen.c_carry_function(plan) if plan.rule.carry else "",
                codegen.c_reduce_function(plan) if plan.norms else "", "}",
                f'extern "C" void scalars_{sym}(const double* hyper, double step, '
                f"s_{sym}::TC* out) {{ s_{sym}::{plan.key}_scalars(hyper, step, out); }}", ""]
        if plan.rule.carry:      # the carried scalars after a step (capturable's advance)
            out += [f'extern "C" void carry_{sym}(const double* hyper, double step, '
                    f"double* out) {{ s_{sym}::{plan.key}_carry(hyper, step, out); }}", ""]
        if plan.norms:           # the reduction pass's element function, over n elements
            ins = [f"const s_{sym}::{codegen._array_ctype(a)}* {a}" for a in plan.reduce_reads]
            ks = [f"const s_{sym}::TC k_{n}" for n in plan.scalars]
            call = ", ".join([f"{a}[i]" for a in plan.reduce_reads]
                             + [f"k_{n}" for n in plan.scalars] + ["acc"])
            out += [f'extern "C" void reduce_{sym}({", ".join(ins + ks)}, long long n, '
                    f"double* acc) {{ for (long long i = 0; i < n; ++i) "
                    f"s_{sym}::{plan.key}_reduce({call}); }}", ""]
    return "\n".join(out)


class _CppLib:
    def __init__(self, path, entries):
        self.lib = ctypes.CDLL(path)
        self.path = path
        self.fns, self.scal, self.reduce, self.carry = {}, {}, {}, {}
        for sym, plan, dtype in entries:
            c = ctypes.c_float if dtype == "float32" else ctypes.c_double
            arr = np.ctypeslib.ndpointer(dtype=dtype, flags="C_CONTIGUOUS")
            f = getattr(self.lib, f"run_{sym}")
            f.argtypes = ([arr] * len(codegen._c_used(plan)) + [c] * len(plan.all_scalars)
                          + [ctypes.c_longlong, ctypes.c_int])
            f.restype = None
            self.fns[sym] = f
            s = getattr(self.lib, f"scalars_{sym}")
            s.argtypes = [np.ctypeslib.ndpointer(dtype=np.float64, flags="C_CONTIGUOUS"),
                          ctypes.c_double, arr]
            s.restype = None
            self.scal[sym] = s
            if plan.rule.carry:
                c_ = getattr(self.lib, f"carry_{sym}")
                c_.argtypes = [np.ctypeslib.ndpointer(dtype=np.float64, flags="C_CONTIGUOUS"),
                               ctypes.c_double,
                               np.ctypeslib.ndpointer(dtype=np.float64, flags="C_CONTIGUOUS")]
                c_.restype = None
                self.carry[sym] = c_
            if plan.norms:
                r = getattr(self.lib, f"reduce_{sym}")
                r.argtypes = ([arr] * len(plan.reduce_reads) + [c] * len(plan.scalars)
                              + [ctypes.c_longlong,
                                 np.ctypeslib.ndpointer(dtype=np.float64, flags="C_CONTIGUOUS")])
                r.restype = None
                self.reduce[sym] = r


_CPP = {}


@pytest.fixture(scope="session")
def cpp():
    """The two C++ libraries (contract off, FMA), built once per session in parallel."""
    why = _cxx_unavailable()
    if why:
        pytest.skip(why)
    yield build_cpp()
    shutil.rmtree(_CPP.pop("tmp", ""), ignore_errors=True)    # the loaded libraries stay
    _CPP.clear()


def build_cpp() -> dict:
    if "libs" in _CPP:
        return _CPP["libs"]
    entries, seen = [], set()
    for c in CASES:
        for dt in DTYPES:
            sym = _sym(c.plan, dt)
            if sym not in seen:
                seen.add(sym)
                entries.append((sym, c.plan, dt))
    builds = dict(BUILDS)
    if not _cpu_has_fma():
        builds.pop("fma")
    tmp = tempfile.mkdtemp(prefix="hwoptim-cpp-")
    src = os.path.join(tmp, "update.cpp")
    with open(src, "w") as f:
        f.write(_cpp_unit(entries))
    cxx = os.environ.get("CXX", "g++")
    procs = {}
    t0 = time.perf_counter()
    for name, flags in builds.items():
        out = os.path.join(tmp, f"update_{name}.so")
        cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", *flags, src, "-o", out]
        procs[name] = (cmd, out, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True))
    libs = {}
    for name, (cmd, out, p) in procs.items():
        log, _ = p.communicate()
        assert p.returncode == 0, (f"{' '.join(cmd)} failed; expected the generated C++ "
                                   f"(codegen.cpp_test_source) to compile:\n{log}")
        libs[name] = _CppLib(out, entries)
    print(f"\ng++ builds {sorted(libs)}: {time.perf_counter() - t0:.1f} s ({tmp})")
    _CPP["libs"], _CPP["tmp"] = libs, tmp
    return libs


def _state0(case, dtype, rng):
    """Params (random) and state at its spec initial value, as the optimizer starts."""
    st = {"param": testing.random_values(rng, (N,), dtype)}
    for s in case.rule.active_states(case.flags):
        init = case.h[s.init] if isinstance(s.init, str) else s.init
        st[s.name] = np.full(N, init, dtype=dtype)
    return st


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _norms(plan, arrays, ks) -> list:
    """The norms the reduction pass hands the update (``plan.norms``), in float64 from the
    step's inputs (``arrays``: param, grad and state by name; ``ks``: kernel scalars)."""
    env = {n: np.asarray(arrays[n], np.float64) for n in plan.arrays}
    env.update(zip(plan.scalars, ks))
    out = []
    for e, kind in zip(plan.norms, plan.norm_kinds):
        with np.errstate(all="ignore"):
            x = np.broadcast_to(np.asarray(evaluate(e, env), np.float64), env["param"].shape)
        s = np.dot(x.ravel(), x.ravel())
        out.append(float(np.sqrt(s / x.size if kind == "rms" else s)))
    return out


@pytest.mark.parametrize("case,dtype", [c for c in CASE_DTYPE if c.values[0].plan.norms])
def test_cpp_reduction_matches_reference(cpp, case, dtype):
    """The GPU reduction kernel's element function (``codegen.c_reduce_function``) run as
    C++: each norm's sum of squares from one step's inputs, against the same sums in float64
    from the spec's graph (``_norms``): within the argument's rounding in ``dtype``."""
    plan, rule, h = case.plan, case.rule, case.h
    sym = _sym(plan, dtype)
    typ = np.dtype(dtype).type
    rng = np.random.default_rng(_seed(case.id, dtype, "reduce"))
    bufs = {**_state0(case, dtype, rng), "grad": testing.random_values(rng, (N,), dtype)}
    ks = plan.kernel_scalars(_base(rule, h, 3))
    want = np.square(_norms(plan, bufs, ks)) * [N if k == "rms" else 1 for k in plan.norm_kinds]
    # a sum of N positive terms in order, against NumPy's pairwise one: (N - 1) u relative
    # at worst (Higham's bound for recursive summation), and the arguments' rounding
    rel = max(64, N) * np.finfo(dtype).eps
    for build, lib in cpp.items():
        acc = np.zeros(len(plan.norms))
        lib.reduce[sym](*[bufs[a] for a in plan.reduce_reads], *[typ(v) for v in ks], N, acc)
        assert np.all(np.abs(acc - want) <= rel * want), (
            f"{case.id} {dtype} build {build}: sums of squares {acc}; expected {want}")


@pytest.mark.parametrize("case,dtype", CASE_DTYPE)
def test_cpp_update_matches_reference(cpp, case, dtype, observed):
    plan, rule, h = case.plan, case.rule, case.h
    sym = _sym(plan, dtype)
    used = codegen._c_used(plan)
    typ = np.dtype(dtype).type
    rng = np.random.default_rng(_seed(case.id, dtype))
    runs = [(b, ftz) for b, ftz in RUNS if b in cpp]
    start = _state0(case, dtype, rng)
    states = {r: {k: v.copy() for k, v in start.items()} for r in runs}
    worst = {r: (0.0, "") for r in runs}
    worst_en = {r: [0.0, 0.0] for r in runs}
    for t in range(1, STEPS + 1):
        grad = testing.random_values(rng, (N,), dtype)
        ks = plan.kernel_scalars(_base(rule, h, t))
        befores, gots = [], []
        for r in runs:
            before = {k: v.copy() for k, v in states[r].items()}
            bufs = {**states[r], "grad": grad.copy()}
            norms = _norms(plan, {**before, "grad": grad}, ks)   # the reduction pass's
            cpp[r[0]].fns[sym](*[bufs[a] for a in used], *[typ(v) for v in ks + norms], N,
                               r[1])
            assert np.array_equal(bufs["grad"], grad, equal_nan=True), "the update wrote grad"
            for a in plan.arrays[2:]:
                if a not in plan.outputs:
                    assert np.array_equal(bufs[a], before[a]), f"{a} changed, not an output"
            befores.append(before)
            gots.append(states[r])
        # one reference and one bound for all builds at once (elementwise: concatenate),
        # or, where the update takes norms (of a whole array), one per build
        together = [list(range(len(runs)))] if not plan.norms else [[i] for i in range(len(runs))]
        refs, conds = {}, {}
        for idx in together:
            cat = {k: np.concatenate([befores[i][k] for i in idx]) for k in start}
            gcat = np.tile(grad, len(idx))
            ref = testing.reference_step(rule, case.flags, h, t, cat, gcat)
            cond = testing.condition(plan, cat, gcat, ks, dtype)
            for j, i in enumerate(idx):
                sl = slice(j * N, (j + 1) * N)
                refs[i] = {o: ref[o][sl] for o in plan.outputs}
                conds[i] = {o: cond[o][sl] for o in plan.outputs}
        for i, r in enumerate(runs):
            ref_i, cond_i = refs[i], conds[i]
            errs = testing.step_errors(gots[i], ref_i, dtype, cond_i)
            for name, (elem, norm) in errs.items():
                worst_en[r] = [max(worst_en[r][0], elem), max(worst_en[r][1], norm)]
                m = max(elem, norm)
                if m > worst[r][0] or not np.isfinite(m):
                    worst[r] = (m, f"{name} step {t}")
                if elem <= 1 and norm <= 1:
                    continue
                got = np.asarray(gots[i][name], np.float64).reshape(-1)
                j, over = testing.worst_element(got, ref_i[name], cond_i[name], dtype)
                pytest.fail(
                    f"{case.id} {dtype}, build {r[0]} ftz={r[1]}, step {t}, buffer {name!r}: "
                    f"error ratio elementwise {elem:.3g}, norm-wise {norm:.3g}; expected both "
                    f"<= 1 ({testing.BOUNDS_TEXT}). Worst element {j}: got {got[j]!r}, "
                    f"reference {ref_i[name][j]!r}, {over:.3g} of its bound; "
                    f"inputs " + ", ".join(f"{k}={befores[i][k][j]!r}" for k in start)
                    + f", grad={grad[j]!r}, kernel scalars {dict(zip(plan.scalars, ks))}")
    for r in worst:
        observed.max(f"C++ step elementwise ratio {dtype} ({r[0]}, ftz={r[1]})", case.id,
                     worst_en[r][0])
        observed.max(f"C++ step norm ratio {dtype} ({r[0]}, ftz={r[1]})", case.id,
                     worst_en[r][1])
    print(f"{case.id} {dtype}: worst ratio " + ", ".join(
        f"{b}/ftz={f}: {w[0]:.3g}" for (b, f), w in worst.items()))


def test_cpp_builds_differ_as_intended(cpp):
    """The harness itself: the FMA build contracts, and ftz=1 flushes subnormals."""
    case = next(c for c in CASES if c.id == "Adam[default]")
    plan, sym = case.plan, _sym(case.plan, "float32")
    used = codegen._c_used(plan)
    ks = [np.float32(v) for v in plan.kernel_scalars(_base(case.rule, case.h, 3))]

    def run(build, ftz, grad, random_state):
        rng = np.random.default_rng(1)
        st = _state0(case, "float32", rng)
        if random_state:
            st["exp_avg"][:] = testing.random_values(rng, (N,), np.float32)
            st["exp_avg_sq"][:] = np.abs(testing.random_values(rng, (N,), np.float32))
        bufs = {**st, "grad": grad.copy()}
        cpp[build].fns[sym](*[bufs[a] for a in used], *ks, N, ftz)
        return bufs

    if "fma" in cpp:
        grad = testing.random_values(np.random.default_rng(2), (N,), np.float32)
        a, b = run("contract-off", 0, grad, True), run("fma", 0, grad, True)
        assert any(not np.array_equal(a[o], b[o]) for o in plan.outputs), (
            "the -mfma -ffp-contract=fast build gave bitwise the results of the "
            "-ffp-contract=off build; expected contracted multiply-adds to differ somewhere")
    tiny = np.full(N, 1e-20, dtype=np.float32)     # (1 - beta2) g^2 = 1e-43: subnormal
    off, on = run("contract-off", 0, tiny, False), run("contract-off", 1, tiny, False)
    assert np.all(off["exp_avg_sq"] > 0), (
        "ftz=0: expected (1 - beta2) * (1e-20)^2 to stay a nonzero subnormal in float32")
    assert np.all(on["exp_avg_sq"] == 0), (
        "ftz=1: expected flush-to-zero to make (1 - beta2) * (1e-20)^2 exactly 0")


def _ulps(a, b, dtype) -> np.ndarray:
    """Distance in units in the last place of ``dtype`` (+0 and -0 are the same point)."""
    it = {"float32": np.int32, "float64": np.int64}[dtype]
    low = np.int64(np.iinfo(it).min)

    def line(x):      # sign-magnitude bit patterns onto a monotone integer line
        i = np.asarray(x, dtype=dtype).view(it).astype(np.int64)
        return np.where(i < 0, low - i, i)
    return np.abs(line(a) - line(b))


def _perturbed(rule, h) -> dict:
    """The same hyperparameters made pairwise distinct (and still valid, with the same static
    flags), so a swapped index into the hyperparameter vector shows."""
    out, i = {}, 0
    for n, v in h.items():
        if isinstance(v, tuple):
            out[n] = tuple(x * (1 - 0.001 * (i + j + 1)) for j, x in enumerate(v))
            i += len(v)
        else:
            out[n] = v * (1 - 0.001 * (i + 1))
            i += 1
    return out


@pytest.mark.parametrize("case,dtype", [c for c in CASE_DTYPE
                                        if not getattr(c.values[0].flags, "_clip", False)])
def test_device_scalars_match_host(cpp, case, dtype):
    """``c_scalar_function`` (capturable mode's ``advance`` kernel) gives the host's kernel
    scalars: within 2 ulp of ``dtype`` after the cast, in both builds."""
    plan, rule = case.plan, case.rule
    sym = _sym(plan, dtype)
    for h in (case.h, _perturbed(rule, case.h)):
        assert vars(rule.static_flags(h, {k: getattr(case.flags, k) for k in rule.options})) \
            == vars(case.flags), "perturbing hyperparameters must keep the kernel"
        fast = codegen.host_scalar_function(plan, dtype)      # what host-scalar steps pass
        # a rule that carries scalars gets them replayed from step 1 (spec.with_carry)
        for t in (*range(1, STEPS + 1), 1000, *(() if rule.carry else (123456,))):
            h = with_carry(rule, {k: v for k, v in h.items()
                                  if k not in {c.name for c in rule.carry}}, t)
            hv = _hyper_vector(rule, h)
            want = np.asarray(plan.kernel_scalars(host_scalars(rule, h, t)), dtype=dtype)
            passed = np.asarray(fast(h, t), dtype=dtype)
            for build, lib in cpp.items():
                got = np.full(len(plan.scalars), np.nan, dtype=dtype)
                lib.scal[sym](hv, float(t), got)
                for ref, what in ((want, "plan.kernel_scalars"),
                                  (passed, "codegen.host_scalar_function")):
                    d = _ulps(got, ref, dtype)
                    assert np.all(d <= 2), (
                        f"{case.id} {dtype} build {build}, step {t}: device scalars "
                        f"{dict(zip(plan.scalars, got.tolist()))}; expected {what}'s "
                        f"{dict(zip(plan.scalars, ref.tolist()))} within 2 ulp (off by "
                        f"{dict(zip(plan.scalars, d.tolist()))} ulp) with hypers {h}")


@pytest.mark.parametrize("case", [c for c in CASES if c.rule.carry], ids=lambda c: c.id)
def test_device_carry_matches_host(cpp, case):
    """``c_carry_function`` (capturable mode's advance kernel writes its results back after
    the hyperparameters): chained on the device vector from the first step, the carried
    scalars stay within 4 ulp (float64) of the host's (spec.host_scalars) for 1000 steps."""
    plan, rule = case.plan, case.rule
    sym = _sym(plan, "float64")
    names = [c.name for c in rule.carry]
    for build, lib in cpp.items():
        h = with_carry(rule, {k: v for k, v in case.h.items() if k not in names}, 1)
        hv = _hyper_vector(rule, h)
        for t in range(1, 1001):
            want = host_scalars(rule, {**h, **dict(zip(names, hv[-len(names):]))}, t)
            got = np.zeros(len(names))
            lib.carry[sym](hv, float(t), got)
            ref = np.array([want[n] for n in names])
            assert np.all(_ulps(got, ref, "float64") <= 4), (case.id, build, t, got, ref)
            hv[-len(names):] = got          # as the advance kernel writes them back


def test_ulps_helper():
    assert _ulps(np.float32(1.0), np.nextafter(np.float32(1.0), np.float32(2)), "float32") == 1
    assert _ulps(np.float32(-0.0), np.float32(0.0), "float32") == 0
    tiny32 = np.nextafter(np.float32(0), np.float32(1))
    assert _ulps(-tiny32, tiny32, "float32") == 2
    assert _ulps(1.0, np.nextafter(1.0, 2.0) , "float64") == 1
    assert _ulps(-1.0, -np.nextafter(1.0, 2.0), "float64") == 1
    assert _ulps(-5e-324, 5e-324, "float64") == 2
    assert _ulps(1.0, 2.0, "float32") == 2 ** 23
