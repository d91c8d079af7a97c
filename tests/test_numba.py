"""The Numba backend's promises: float32 kernels compute in float32 (no ``fpext`` in the LLVM
IR of the loop that runs, parallel and serial), and a new process reuses the kernels
compiled by an earlier one (Numba's disk cache under ``HWOPTIM_CACHE_DIR``).

Where the IR is: Numba's disk cache keeps machine code only (``inspect_llvm`` on a kernel
loaded from the cache returns a placeholder), so the check compiles each kernel's own Python
function (``dispatcher.py_func``, the generated source) again with the same options and no
cache, for the exact signature the optimizer ran. For ``parallel=True`` the prange loop is
outlined into a separate "parfor gufunc" library, linked into the kernel's library
(``overloads[sig].library._linking_libraries``) and, after linking, into its final module:
the check reads the final module and every linked library, and requires the gufunc to be
there.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

numba = pytest.importorskip("numba")

import hwoptim  # noqa: E402
from hwoptim import backends, codegen  # noqa: E402
from hwoptim.rules import RULES  # noqa: E402
from hwoptim.testing import option_sets, random_values  # noqa: E402

if "numba" not in backends.available():
    pytest.skip(f"numba backend unavailable: {backends.unavailable('numba')}",
                allow_module_level=True)

NB = backends.load("numba")
FPEXT = re.compile(r"\bfpext\b\s*\(?\s*(<\d+ x )?(half|float)\b")
FLOAT_MATH = re.compile(r"\bf(add|sub|mul|div)\b[^\n]*\b(<\d+ x )?float\b"
                        r"|@llvm\.sqrt\.(v\d+)?f32|@sqrtf\b")


def library_ir(dispatcher, sig) -> str:
    """LLVM IR of one compiled overload: its final module and every library linked into it
    (the parfor gufunc for prange loops), recursively."""
    seen, out = set(), []

    def walk(lib):
        if id(lib) in seen:
            return
        seen.add(id(lib))
        out.append(lib.get_llvm_str())
        for sub in getattr(lib, "_linking_libraries", ()):
            walk(sub)

    walk(dispatcher.overloads[sig].library)
    return "\n".join(out)


def fresh_ir(dispatcher, sig) -> str:
    """Compile ``dispatcher``'s function again, same options, no disk cache; its IR."""
    opts = {k: v for k, v in dispatcher.targetoptions.items() if k not in ("cache", "nopython")}
    again = numba.njit(**opts)(dispatcher.py_func)
    again.compile(sig)
    return library_ir(again, sig)


def _cases():
    return [pytest.param(rule, opts, id=oid)
            for rule in RULES.values() for oid, opts in option_sets(rule)]


SMALL, LARGE = 64, 65536     # elements: the serial kernel, the parallel kernel (2+ threads)


@pytest.mark.parametrize("rule, opts", _cases())
def test_float32_kernels_have_no_fpext(rule, opts, rng):
    sizes = (SMALL, LARGE)
    ps = [random_values(rng, (n,), np.float32) for n in sizes]
    opt = getattr(hwoptim, rule.name)(ps, backend="numba", **opts)
    opt.step([random_values(rng, (n,), np.float32) for n in sizes])
    g0 = opt.param_groups[0]
    flags = rule.static_flags({n: g0[n] for n in rule.hypers}, {n: g0[n] for n in rule.options})
    k = NB.kernel(codegen.plan(rule, flags), "float32")
    ran = {name: getattr(k, name).signatures for name in ("parallel", "serial")}
    assert ran["serial"], "the small array did not run the serial kernel"
    sig = ran["serial"][0]
    assert all(str(t).startswith(("float32", "array(float32")) for t in sig), sig
    for name in ("parallel", "serial"):
        d = getattr(k, name)
        # the signature the optimizer ran (the parallel kernel's too, unless one thread)
        assert ran[name] in ([sig], []), (name, ran[name])
        ir = fresh_ir(d, sig)
        if name == "parallel":
            assert "__numba_parfor_gufunc" in ir, "the prange loop body is not in the IR"
        assert FLOAT_MATH.search(ir), f"{name}: no float32 arithmetic found in the IR"
        bad = [ln.strip() for ln in ir.splitlines() if FPEXT.search(ln)]
        assert not bad, f"{name}: float32 promoted to float64:\n" + "\n".join(bad[:5])


@pytest.mark.parametrize("rule, opts", _cases())
def test_float32_multi_kernels_have_no_fpext(rule, opts, rng):
    """The same check for the multi-tensor kernels (``Kernel.many``): both, as ``many`` ran
    them (a group below the serial cutoff, one above it), compute in float32; the parallel
    one's prange body is in the IR."""
    h = {n: opts.get(n, hy.default) for n, hy in rule.hypers.items()}
    o = {n: opts.get(n, v) for n, v in rule.options.items()}
    k = NB.kernel(codegen.plan(rule, rule.static_flags(h, o)), "float32")
    for sizes, n_threads in (([SMALL, 3], 1), ([LARGE, SMALL], 2)):
        bufs = [[random_values(rng, (n,), np.float32) for _ in k.plan.arrays] for n in sizes]
        for b in bufs:
            for x in b[2:]:
                np.abs(x, out=x)                  # states: no square roots of negatives
        ptrs = np.array([[x.ctypes.data for x in b] for b in bufs], np.int64)
        k.many(ptrs, np.array(sizes), np.zeros(len(sizes), np.int64),
               np.array([k.prepare(h, 1)], np.float32), n_threads=n_threads)
    mod = k.multi_module()
    for name in ("parallel", "serial"):
        d = getattr(mod, name)
        assert len(d.signatures) == 1, (name, d.signatures)
        sig = d.signatures[0]
        assert [str(t) for t in sig] == ["array(int64, 2d, C)", "array(int64, 2d, C)",
                                         "array(int64, 1d, C)", "array(int64, 1d, C)",
                                         "array(float32, 2d, C)"], sig
        ir = fresh_ir(d, sig)
        if name == "parallel":
            assert "__numba_parfor_gufunc" in ir, "the prange loop body is not in the IR"
        assert FLOAT_MATH.search(ir), f"multi {name}: no float32 arithmetic found in the IR"
        bad = [ln.strip() for ln in ir.splitlines() if FPEXT.search(ln)]
        assert not bad, f"multi {name}: float32 promoted to float64:\n" + "\n".join(bad[:5])


# -- the check can fail: a float64 literal in float32 code shows up as fpext, serial and in
#    the parfor gufunc (source written to a file: Numba's parfors need real source lines)

_PROBE = '''
import numpy as np
from numba import njit, prange

HALF = np.float32(0.1)


@njit(parallel=PAR)
def mixed(x):
    for i in RANGE(x.shape[0]):
        x[i] = x[i] * 0.1 + np.float32(1)


@njit(parallel=PAR)
def pure(x):
    for i in RANGE(x.shape[0]):
        x[i] = x[i] * HALF + np.float32(1)
'''


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_fpext_check_detects_float64_literals(parallel, tmp_path):
    src = _PROBE.replace("PAR", str(parallel)).replace("RANGE", "prange" if parallel else "range")
    path = tmp_path / f"hwoptim_promotion_probe_{int(parallel)}.py"
    path.write_text(src)
    import importlib.util
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = np.ones(100, np.float32)
    for f in (mod.mixed, mod.pure):
        f(x)
    ir_mixed = library_ir(mod.mixed, mod.mixed.signatures[0])
    ir_pure = library_ir(mod.pure, mod.pure.signatures[0])
    assert FLOAT_MATH.search(ir_pure)
    assert FPEXT.search(ir_mixed)
    assert not FPEXT.search(ir_pure)
    if parallel:
        assert "__numba_parfor_gufunc" in ir_mixed
        # the promotion is inside the outlined loop body
        gufuncs = [lib.get_llvm_str() for lib in
                   mod.mixed.overloads[mod.mixed.signatures[0]].library._linking_libraries
                   if "parfor_gufunc" in lib.name]
        assert gufuncs and any(FPEXT.search(g) for g in gufuncs)


# -- a new process reuses the disk cache

_CHILD = textwrap.dedent('''
    import json, time
    t0 = time.perf_counter()
    import numpy as np
    import hwoptim
    from hwoptim import backends, codegen
    nb = backends.load("numba")
    t_import = time.perf_counter() - t0
    import numba
    t = time.perf_counter()
    numba.njit(lambda x: x + 1)(1.0)       # Numba's one-time set-up, apart from our kernels
    t_init = time.perf_counter() - t
    rule = hwoptim.RULES["Adam"]
    from hwoptim.backends import diskcache
    out = {"import_s": t_import, "numba_init_s": t_init, "cache_dir": str(diskcache.folder())}
    ws = []
    for path, n in (("serial", 1000), ("parallel", 65536)):
        w = np.linspace(-1, 1, n, dtype=np.float32)
        opt = hwoptim.Adam(w, amsgrad=True)
        t = time.perf_counter()
        opt.step(np.cos(w))
        out[path + "_first_step_s"] = time.perf_counter() - t
        ws.append(w)
    g = opt.param_groups[0]
    flags = rule.static_flags({n: g[n] for n in rule.hypers}, {n: g[n] for n in rule.options})
    k = nb.kernel(codegen.plan(rule, flags), "float32")
    for path in ("serial", "parallel"):
        d = getattr(k, path)
        out[path + "_hits"] = sum(d.stats.cache_hits.values())
        out[path + "_misses"] = sum(d.stats.cache_misses.values())
    out["w"] = [w[:4].tolist() for w in ws]
    print(json.dumps(out))
''')


def _child(cache: Path) -> dict:
    env = dict(os.environ, HWOPTIM_CACHE_DIR=str(cache))
    root = str(Path(hwoptim.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_new_process_reuses_the_disk_cache(tmp_path, observed):
    cache = tmp_path / "cache"
    cold = _child(cache)
    warm = _child(cache)
    assert cold["cache_dir"] == warm["cache_dir"] == str(cache / "numba")
    assert list((cache / "numba").glob("hwoptim_kernel_adam_*_float32_*.py"))
    for path in ("serial", "parallel"):
        assert cold[path + "_misses"] >= 1 and cold[path + "_hits"] == 0, cold
        assert warm[path + "_hits"] >= 1 and warm[path + "_misses"] == 0, warm
    assert warm["w"] == cold["w"]          # and the cached kernels compute the same
    for k in ("serial_first_step_s", "parallel_first_step_s", "import_s", "numba_init_s"):
        observed.max("numba cache, cold process (s)", k, cold[k])
        observed.max("numba cache, warm process (s)", k, warm[k])
    print(f"\ncold process: first step serial {cold['serial_first_step_s']:.3f} s, parallel "
          f"{cold['parallel_first_step_s']:.3f} s (compile); warm process: serial "
          f"{warm['serial_first_step_s']:.3f} s, parallel {warm['parallel_first_step_s']:.3f} s "
          f"(cache hits); before them, import {cold['import_s']:.2f} / {warm['import_s']:.2f} s "
          f"and Numba's one-time set-up {cold['numba_init_s']:.2f} / "
          f"{warm['numba_init_s']:.2f} s")


@pytest.mark.skipif(bool(os.environ.get("HWOPTIM_SERIAL_WORK")),
                    reason="HWOPTIM_SERIAL_WORK overrides the cutoff")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_small_arrays_run_serial_large_ones_parallel(dtype):
    """The serial/parallel cutoff of every kernel sits where it was measured to pay off
    (bench/NOTES.md: crossovers of 1e4 to 6e4 elements with 2 to 16 threads): a 1000-element
    array runs the serial kernel, a 65536-element one the parallel kernel, and with one
    thread every size runs serial."""
    for rule in RULES.values():
        for oid, opts in option_sets(rule):
            h = {n: opts.get(n, hy.default) for n, hy in rule.hypers.items()}
            o = {n: opts.get(n, v) for n, v in rule.options.items()}
            k = NB.kernel(codegen.plan(rule, rule.static_flags(h, o)), dtype)
            serial = k.launcher(0, 1)
            for t in (2, 4, 16):
                below = k.serial_below(t)
                assert 4_000 <= below <= 65_536, (oid, dtype, t, below)
                assert k.launcher(1_000, t) is serial, (oid, dtype, t)
                assert k.launcher(65_536, t) is not serial, (oid, dtype, t)
            assert k.launcher(10 ** 9, 1) is serial, (oid, dtype)


@pytest.mark.parametrize("parallel", [False, True])
def test_every_operation_prints_right(parallel, rng):
    """The Numba printer on every element operation of the spec language (tests/every_op.py,
    including those no shipped rule uses yet): float64 kernels equal the NumPy reference,
    which runs the rule's own Python, bit for bit over 20 steps."""
    from every_op import RULE
    from hwoptim.backends import numpy as ref_backend
    plan = codegen.plan(RULE, RULE.static_flags({}, {}))
    h = {"lr": 0.03, "eps": 1e-3, "decay": 0.97}
    k = NB.kernel(plan, "float64")
    ref = ref_backend.kernel(plan, "float64")
    n = 70_000 if parallel else 999
    assert (k.launcher(n, 2) is k.launcher(0, 1)) != parallel     # the kernel meant
    ours = [random_values(rng, (n,)), None, np.full(n, 0.5)]
    start = ours[0].copy()
    theirs = [a.copy() if a is not None else None for a in ours]
    for t in range(1, 21):
        g = random_values(rng, (n,))
        ours[1], theirs[1] = g, g.copy()
        k.launcher(n, 2)(*ours, *k.prepare_unchecked(h, t))
        ref(theirs, ref.prepare(h, t))
        for name, a, b in zip(plan.arrays, ours, theirs):
            assert np.array_equal(a, b), (t, name, np.flatnonzero(a != b)[:5])
    assert np.isfinite(ours[0]).all() and (ours[0] != start).mean() > 0.9
