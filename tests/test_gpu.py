"""GPU tests: the CuPy backends on a real CUDA device (``pytest -m gpu``, run by
``ci/gpu-check``). Without a device they skip, unless ``HWOPTIM_REQUIRE_GPU=1``, when they
fail.

* every rule x option set x float32/float64, >= 50 steps, for ``cupy`` (RawModule),
  ``cupy-elementwise`` and ``cupy`` with ``capturable=True`` (device-side scalars): every
  step against the NumPy float64 reference under the stated per-step tolerances
  (``hwoptim.testing``; CuPy compiles with -ftz=true and FMA contraction), inputs with zeros
  and tiny values;
* a size large enough that the grid-stride loops go round more than once;
* state_dict GPU -> CPU (loaded into a host optimizer) -> GPU resumes bit-identically;
* mixed devices rejected with a TypeError and nothing changed;
* state on the params' device; work enqueued on CuPy's current stream;
* CUDA graphs: one captured step replayed N times == N eager capturable steps, bitwise,
  with ``step_count`` read from the device;
* unaligned views run the element-wise kernel and are still correct; launches per step;
* a list of separate arrays: one multi-tensor launch per step, each array within the
  reference's tolerances;
* storage formats (float16 params, bfloat16 and int8 state, master weights, stochastic
  rounding): the NumPy reference's bits, one param or many; checkpoints continue on the CPU;
* Adafactor's factored matrices (the staged kernels): each step near the float64 reference,
  repeatable bit for bit; the drop-in class against torch.optim.Adafactor on CUDA;
* capturable steps with max_grad_norm / skip_nonfinite / device grad_scale and found_inf:
  the verdict on the device, as the CPU decides; a skip inside a replayed CUDA graph.
"""
from __future__ import annotations

import math
import os
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

import hwoptim
from hwoptim import backends, codegen, testing
from hwoptim.backends import numpy as reference_backend
from hwoptim.spec import host_scalars, substitute, trace_scalars

_WHY = backends.unavailable("cupy")
_REQUIRE = os.environ.get("HWOPTIM_REQUIRE_GPU") == "1"
if _WHY is None:
    import cupy
else:
    cupy = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_WHY is not None and not _REQUIRE,
                       reason=f"needs a CUDA device and CuPy: {_WHY}"),
]

DTYPES = ("float32", "float64")
STEPS = 50
N = 10007                # odd and prime: the vectorised kernels' scalar tails run too
MODES = ("cupy", "cupy-elementwise", "cupy-capturable")


# ----------------------------------------------------------------------------- cases

def _split(rule, kwargs):
    h = {n: hy.default for n, hy in rule.hypers.items()}
    opt = dict(rule.options)
    for k, v in kwargs.items():
        (opt if k in rule.options else h)[k] = v
    return h, rule.static_flags(h, opt)


class Case:
    def __init__(self, rule, cid, kwargs):
        self.rule, self.id, self.kwargs = rule, cid, kwargs
        self.h, self.flags = _split(rule, kwargs)
        self.plan = codegen.plan(rule, self.flags)

    def make(self, params, mode="cupy", **extra):
        if self.plan.norms and mode == "cupy-elementwise":
            pytest.skip(f"{self.id}: per-array norms need backend='cupy' (the refusal: "
                        f"tests/test_cuda_launch.py)")
        backend = "cupy" if mode == "cupy-capturable" else mode
        return getattr(hwoptim, self.rule.name)(params, backend=backend,
                                                capturable=mode == "cupy-capturable",
                                                **self.kwargs, **extra)


CASES = [Case(rule, cid, kw) for rule in hwoptim.RULES.values()
         for cid, kw in testing.option_sets(rule)]
CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]
DEFAULTS = [pytest.param(c, id=c.id) for c in CASES if not c.kwargs]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


@pytest.fixture(scope="session", autouse=True)
def _device():
    """Fail (HWOPTIM_REQUIRE_GPU=1 without a device), then compile every module the tests
    launch on a thread pool instead of one test at a time."""
    if _WHY is not None:
        pytest.fail(f"HWOPTIM_REQUIRE_GPU=1 but the cupy backend is unavailable: {_WHY}")
    from hwoptim.bench.gpu import prewarm
    jobs = [(c.plan, dt) for c in CASES for dt in DTYPES]
    info = prewarm(jobs, jobs)
    print(f"\nprewarm: {info['modules']} modules in {info['seconds']:.1f} s "
          f"({info['failed']} failed, left to the tests to report)")
    yield


def _snapshot(opt) -> dict:
    """Host copies of every param and state buffer, and the step count."""
    out = {"step": opt.step_count}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        out[f"params[{i}]"] = p.get() if hasattr(p, "get") else np.array(p)
    for i, st in enumerate(opt.state):
        for k, v in st.items():
            out[f"state[{i}][{k!r}]"] = v.get() if hasattr(v, "get") else np.array(v)
    return out


def _assert_same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), f"{what}: buffers {sorted(a)} vs {sorted(b)}"
    for k in a:
        if k == "step":
            assert a[k] == b[k], f"{what}: step count {a[k]}, expected {b[k]}"
            continue
        x, y = np.asarray(a[k]), np.asarray(b[k])
        same = x.dtype == y.dtype and x.shape == y.shape and np.array_equal(
            x.view(np.uint8), y.view(np.uint8))
        if not same:
            diff = np.flatnonzero(x.reshape(-1) != y.reshape(-1))
            j = int(diff[0]) if diff.size else 0
            pytest.fail(f"{what}: {k} differs in {diff.size} of {x.size} elements; expected "
                        f"bitwise equality (first at {j}: {x.reshape(-1)[j]!r} vs "
                        f"{y.reshape(-1)[j]!r})")


def _device_scalars(opt, plan) -> dict:
    """Capturable mode: the kernel scalars the last step used, read from the device."""
    values = opt._k_dev[0].get().astype(np.float64).tolist()
    assert len(values) == len(plan.scalars)
    return dict(zip(plan.scalars, values))


def _scalar_error_bounds(plan, h, t) -> dict:
    """Kernel scalar -> (float64 value, running error bound in units of float64's u) as
    ``codegen.c_scalar_function`` computes it in double on the device: every rounded
    operation adds ``|result|``, ``pow`` adds ``4 |result|`` (CUDA's double pow is within
    2 ulp), and errors of operands propagate to first order (the model of
    ``hwoptim.testing.condition``). FMA contraction only removes roundings."""
    exprs, names = trace_scalars(plan.rule, plan.flags)
    wanted = {k: substitute(plan.derived[k], exprs) if k in plan.derived else exprs[k]
              for k in plan.scalars}
    env = {"step": (float(t), 0.0)}
    for n, hy in plan.rule.hypers.items():
        vals = h[n] if isinstance(hy.default, tuple) else (h[n],)
        keys = [f"{n}{i}" for i in range(len(vals))] if isinstance(hy.default, tuple) else [n]
        env.update({k: (float(v), 0.0) for k, v in zip(keys, vals)})
    memo = {}

    def ev(e):
        if id(e) in memo:
            return memo[id(e)]
        if e.op == "scalar":
            r = env[e.value]
        elif e.op == "const":
            r = (e.value, 0.0)
        else:
            a = [ev(x) for x in e.args]
            v = [x[0] for x in a]
            er = [x[1] for x in a]
            if e.op in ("add", "sub"):
                out = v[0] + v[1] if e.op == "add" else v[0] - v[1]
                r = (out, er[0] + er[1] + abs(out))
            elif e.op == "mul":
                out = v[0] * v[1]
                r = (out, abs(v[1]) * er[0] + abs(v[0]) * er[1] + abs(out))
            elif e.op == "div":
                out = v[0] / v[1]
                r = (out, er[0] / abs(v[1]) + abs(v[0]) * er[1] / v[1] ** 2 + abs(out))
            elif e.op == "pow":
                out = v[0] ** v[1]
                prop = (abs(v[1] * out / v[0]) * er[0] if v[0] else 0.0)
                prop += abs(out * math.log(v[0])) * er[1] if v[0] > 0 else 0.0
                r = (out, 4 * abs(out) + prop)
            elif e.op == "sqrt":
                out = math.sqrt(v[0])
                u = testing.unit_roundoff(np.float64)
                r = (out, (min(er[0] / (2 * out), math.sqrt(er[0] / u)) if out > 0
                           else math.sqrt(er[0] / u)) + out)
            elif e.op in ("neg", "abs"):
                r = (-v[0] if e.op == "neg" else abs(v[0]), er[0])
            elif e.op in ("max", "min"):
                r = ((max if e.op == "max" else min)(v[0], v[1]), max(er[0], er[1]))
            elif e.op == "where":
                r = (v[1], er[1]) if v[0] else (v[2], er[2])
            elif e.op in ("lt", "le", "gt", "ge"):
                from hwoptim.spec import _eval, math_ops
                r = (_eval(e.op, v, math_ops), 0.0)
            else:
                raise AssertionError(f"no error model for {e.op!r} in rule.scalars")
        memo[id(e)] = r
        return r

    return {k: ev(e) for k, e in wanted.items()}


def _check_device_scalars(case, dtype, t, dev: dict, what):
    """Capturable mode: the scalars ``advance`` computed on the device agree with the host's:
    float32 within 1 ulp (two roundings of nearly equal doubles); float64 within
    ``2 u C``, ``C`` the running error bound of the device's computation (the host's
    evaluation is at least as accurate), so a 1-ulp pow difference amplified by
    ``1 - beta^t`` is allowed and nothing more."""
    plan = case.plan
    host = dict(zip(plan.scalars, plan.kernel_scalars(host_scalars(case.rule, case.h, t))))
    if dtype == "float32":
        for k in plan.scalars:
            a, b = np.float32(dev[k]), np.float32(host[k])
            ulps = abs(int(a.view(np.int32)) - int(b.view(np.int32)))
            assert ulps <= 1 or a == b, (
                f"{what}, step {t}: device scalar {k} = {a!r}; expected the host's {b!r} "
                f"within 1 ulp (off by {ulps})")
        return
    bounds = _scalar_error_bounds(plan, case.h, t)
    u = testing.unit_roundoff(np.float64)
    for k in plan.scalars:
        tol = 2 * u * bounds[k][1]
        assert abs(dev[k] - host[k]) <= tol, (
            f"{what}, step {t}: device scalar {k} = {dev[k]!r}; expected the host's "
            f"{host[k]!r} within {tol!r} (2 u C, C = {bounds[k][1]:.3g})")


def _check_step(case, dtype, t, before, got, grad, what, device_scalars=None):
    """One step against the float64 reference under the per-step tolerances; returns the
    largest (elementwise, norm-wise) error ratios.

    ``device_scalars`` (capturable mode): the kernel scalars the device computed, checked
    against the host's on their own. In float64 the reference then steps with them
    (rule.scalars' outputs replaced by the device's values), so a pow a few ulp off, which
    ``1 - beta^t`` amplifies far beyond float64's u, is not charged to the update; in float32
    the device's scalars are the host's to 1 ulp, which the scalars' own rounding budget
    covers (and substituting float32-rounded scalars would make the reference recompute
    hoisted ``1 - beta2`` from a rounded ``beta2``)."""
    plan, rule = case.plan, case.rule
    base = host_scalars(rule, case.h, t)
    if device_scalars is not None:
        _check_device_scalars(case, dtype, t, device_scalars, what)
    if device_scalars is None or dtype != "float64":
        ref = testing.reference_step(rule, case.flags, case.h, t, before, grad)
        ks = plan.kernel_scalars(base)
    else:
        base.update({k: v for k, v in device_scalars.items() if k in base})
        arrays = [np.array(before["param"], dtype=np.float64).reshape(-1),
                  np.array(grad, dtype=np.float64).reshape(-1)]
        arrays += [np.array(before[n], dtype=np.float64).reshape(-1) for n in plan.arrays[2:]]
        reference_backend.kernel(plan, "float64")(arrays, SimpleNamespace(**base))
        ref = dict(zip(plan.arrays[:1] + plan.arrays[2:], arrays[:1] + arrays[2:]))
        ks = [device_scalars[k] for k in plan.scalars]
    cond = testing.condition(plan, before, grad, ks, dtype)
    for a in plan.arrays[2:]:
        if a not in plan.outputs:
            assert np.array_equal(got[a], before[a]), f"{what}: {a} changed but is no output"
    errs = testing.step_errors(got, {o: ref[o] for o in plan.outputs}, dtype, cond)
    assert set(errs) == set(plan.outputs), f"{what}: checked {sorted(errs)}"
    worst = [0.0, 0.0]
    for name, (elem, norm) in errs.items():
        worst = [max(worst[0], elem), max(worst[1], norm)]
        if elem <= 1 and norm <= 1:
            continue
        x = np.asarray(got[name], np.float64).reshape(-1)
        j, over = testing.worst_element(x, ref[name], cond[name], dtype)
        pytest.fail(
            f"{what}, step {t}, buffer {name!r}: error ratio elementwise {elem:.3g}, "
            f"norm-wise {norm:.3g}; expected both <= 1 ({testing.BOUNDS_TEXT}). Worst "
            f"element {j}: got {x[j]!r}, reference {ref[name][j]!r}, {over:.3g} of its "
            f"bound; inputs "
            + ", ".join(f"{k}={np.asarray(v).reshape(-1)[j]!r}" for k, v in before.items())
            + f", grad={np.asarray(grad).reshape(-1)[j]!r}; kernel scalars "
              f"{dict(zip(plan.scalars, ks))}")
    return worst


def _run_against_reference(case, dtype, mode, n, steps, param_view=None, grad_view=None):
    """``steps`` steps of a fresh optimizer, each checked against the reference."""
    rng = np.random.default_rng(_seed(case.id, dtype, mode, n))
    p0 = testing.random_values(rng, (n,), dtype)
    w = param_view(p0) if param_view else cupy.asarray(p0)
    opt = case.make(w, mode)
    assert opt.backend_name == ("cupy" if mode == "cupy-capturable" else mode)
    names = case.plan.arrays[2:]
    worst = [0.0, 0.0]
    for t in range(1, steps + 1):
        g = testing.random_values(rng, (n,), dtype)
        gd = grad_view(g) if grad_view else cupy.asarray(g)
        before = {"param": w.get(), **{k: opt.state[0][k].get() for k in names}}
        opt.step(gd)
        got = {"param": w.get(), **{k: opt.state[0][k].get() for k in names}}
        assert opt.step_count == t, f"step_count is {opt.step_count} after {t} steps"
        dev = _device_scalars(opt, case.plan) if mode == "cupy-capturable" else None
        e = _check_step(case, dtype, t, before, got, g, f"{case.id} {dtype} {mode} n={n}",
                        dev)
        worst = [max(worst[0], e[0]), max(worst[1], e[1])]
    assert not np.array_equal(w.get(), p0), f"{case.id} {dtype} {mode}: the params never moved"
    return worst


# ----------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_matches_reference(case, dtype, mode, observed):
    elem, norm = _run_against_reference(case, dtype, mode, N, STEPS)
    observed.max(f"GPU step elementwise ratio {dtype} ({mode})", case.id, elem)
    observed.max(f"GPU step norm ratio {dtype} ({mode})", case.id, norm)
    print(f"{case.id} {dtype} {mode}: worst error ratios elementwise {elem:.3g}, "
          f"norm-wise {norm:.3g}")


@pytest.mark.parametrize("mode", ["cupy", "cupy-capturable"])
@pytest.mark.parametrize("case,dtype", [
    pytest.param(c, dt, id=f"{c.id}-{dt}") for c, dt in
    [(next(c for c in CASES if c.id == "Adam[amsgrad=True]"), "float32"),
     (next(c for c in CASES if c.id == "SGD[momentum=0.9,nesterov=True]"), "float64")]])
def test_grid_stride_loops_wrap(case, dtype, mode):
    """More elements than one grid covers (the backend caps blocks at 32 per SM): the first
    threads' loops go round twice, and one element is left for the scalar tail."""
    sm = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())[
        "multiProcessorCount"]
    vec = 16 // np.dtype(dtype).itemsize
    n = sm * 32 * 256 * vec + 2 * vec + 1
    _run_against_reference(case, dtype, mode, n, 2)


@pytest.mark.parametrize("which", ["param", "grad"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DEFAULTS)
def test_unaligned_views(case, dtype, which):
    """A view starting one element into an allocation runs the element-wise kernel and is
    still correct; aligned arrays run the vectorised kernel."""
    from hwoptim.bench.gpu import count_launches

    def offset_view(values):
        base = cupy.empty(values.size + 1, dtype=values.dtype)
        v = base[1:]
        v.set(values)
        assert v.data.ptr % 16 != 0 and v.flags.c_contiguous
        return v

    k = codegen.cuda_source(case.plan, dtype)
    with count_launches() as counts:
        _run_against_reference(case, dtype, "cupy", N, STEPS,
                               param_view=offset_view if which == "param" else None,
                               grad_view=offset_view if which == "grad" else None)
    assert dict(counts) == {k.unaligned: STEPS}, (
        f"launches {dict(counts)}; expected {STEPS} of the element-wise kernel {k.unaligned} "
        f"(one per step) for a misaligned {which}")
    with count_launches() as counts:
        _run_against_reference(case, dtype, "cupy", N, 2)
    assert dict(counts) == {k.main: 2}, (
        f"launches {dict(counts)}; expected 2 of the vectorised kernel {k.main} for aligned "
        f"arrays")


# ----------------------------------------------------------------------------- many arrays

MANY_SIZES = (1, 3, 4096, 4101, 10007, 70001)    # one chunk, a chunk and a bit, several


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_many_arrays_one_launch_match_reference(case, dtype):
    """A list of separate arrays (sizes across the chunk boundaries, one param and one grad
    a misaligned view) steps with one multi-tensor launch per step, every array within the
    reference's tolerances at every step."""
    from hwoptim.bench.gpu import count_launches
    rng = np.random.default_rng(_seed(case.id, dtype, "many"))
    steps = 8
    p0 = [testing.random_values(rng, (n,), dtype) for n in MANY_SIZES]

    def offset(values):
        v = cupy.empty(values.size + 1, dtype=values.dtype)[1:]
        v.set(values)
        return v
    ws = [offset(x) if i == 3 else cupy.asarray(x) for i, x in enumerate(p0)]
    opt = case.make(ws)
    names = case.plan.arrays[2:]
    for t in range(1, steps + 1):
        gs = [testing.random_values(rng, (n,), dtype) for n in MANY_SIZES]
        gd = [offset(g) if i == 4 else cupy.asarray(g) for i, g in enumerate(gs)]
        before = [{"param": w.get(), **{k: opt.state[i][k].get() for k in names}}
                  for i, w in enumerate(ws)]
        if t == 1:
            with count_launches(opt) as c:
                opt.step(gd)
            assert sum(c.values()) == 1, f"launches {dict(c)}; expected one multi-tensor launch"
        else:
            opt.step(gd)
        for i, w in enumerate(ws):
            got = {"param": w.get(), **{k: opt.state[i][k].get() for k in names}}
            _check_step(case, dtype, t, before[i], got, gs[i],
                        f"{case.id} {dtype} many arrays, array {i} (n={MANY_SIZES[i]})")
    for w, x in zip(ws, p0):
        assert not np.array_equal(w.get(), x), f"{case.id} {dtype}: an array never moved"


def test_many_arrays_new_grads_checked_again():
    """After steps with the same grad arrays (their addresses reused unchecked), a list with
    one new array of the wrong shape or dtype is refused and nothing changes; a grad that
    died and was replaced is checked again."""
    rng = np.random.default_rng(_seed("many-recheck"))
    ps = [cupy.asarray(testing.random_values(rng, (n,), "float32")) for n in MANY_SIZES]
    gs = [cupy.asarray(testing.random_values(rng, (n,), "float32")) for n in MANY_SIZES]
    opt = hwoptim.Adam(ps)
    for _ in range(3):
        opt.step(gs)
    before = [p.get() for p in ps]
    for bad, err in ((cupy.zeros(MANY_SIZES[2] + 1, cupy.float32), ValueError),
                     (cupy.zeros(MANY_SIZES[2], cupy.float64), TypeError)):
        with pytest.raises(err, match=r"grads\[2\]"):
            opt.step(gs[:2] + [bad] + gs[3:])
    assert all(np.array_equal(p.get(), b) for p, b in zip(ps, before))
    assert opt.step_count == 3
    gs[2] = None                              # dies; a new array takes its place
    gs[2] = cupy.zeros((MANY_SIZES[2], 1), cupy.float32)
    with pytest.raises(ValueError, match=r"grads\[2\]"):
        opt.step(gs)
    gs[2] = cupy.asarray(testing.random_values(rng, (MANY_SIZES[2],), "float32"))
    opt.step(gs)
    assert opt.step_count == 4


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_state_dict_gpu_cpu_gpu_resumes_exactly(case, mode):
    dtype, n, k_steps, total = "float32", 1001, 7, 15
    rng = np.random.default_rng(_seed(case.id, mode, "sd"))
    p0 = testing.random_values(rng, (n,), dtype)
    grads = [testing.random_values(rng, (n,), dtype) for _ in range(total)]

    wa = cupy.asarray(p0)
    a = case.make(wa, mode)
    for g in grads:
        a.step(cupy.asarray(g))

    wb = cupy.asarray(p0)
    b = case.make(wb, mode)
    for g in grads[:k_steps]:
        b.step(cupy.asarray(g))
    sd = b.state_dict()
    assert sd["step"] == k_steps
    for st in sd["state"]:
        for key, v in st.items():
            assert isinstance(v, np.ndarray), f"state_dict state {key!r} is {type(v)}; " \
                                              f"expected a NumPy array (host copy)"
    host = "numba" if backends.unavailable("numba") is None else "numpy"
    wc = wb.get()
    c = getattr(hwoptim, case.rule.name)(wc, backend=host, **case.kwargs)
    c.load_state_dict(sd)
    sd2 = c.state_dict()
    assert sd2["step"] == k_steps
    wd = cupy.asarray(wc)
    d = case.make(wd, mode)
    d.load_state_dict(sd2)
    assert d.step_count == k_steps
    for g in grads[k_steps:]:
        d.step(cupy.asarray(g))
    _assert_same(_snapshot(d), _snapshot(a),
                 f"{case.id} {mode}: resumed after GPU -> CPU ({host}) -> GPU at step {k_steps}")


# ----------------------------------------------------------------------------- devices

@pytest.mark.parametrize("capturable", [False, True])
def test_numpy_grads_for_cupy_params_rejected(capturable):
    rng = np.random.default_rng(3)
    w = cupy.asarray(testing.random_values(rng, (257,), np.float32))
    opt = hwoptim.Adam(w, capturable=capturable)
    opt.step(cupy.asarray(testing.random_values(rng, (257,), np.float32)))
    before = _snapshot(opt)
    with pytest.raises(TypeError, match=r"grads\[0\] is on cpu but params\[0\] is on cuda:\d"):
        opt.step(testing.random_values(rng, (257,), np.float32))
    _assert_same(_snapshot(opt), before, "after a rejected step with a NumPy grad")


def test_mixed_grads_list_rejected_before_any_update():
    rng = np.random.default_rng(4)
    ws = [cupy.asarray(testing.random_values(rng, (s,), np.float64)) for s in (100, 33)]
    opt = hwoptim.SGD(ws, lr=0.1, momentum=0.9)
    before = _snapshot(opt)
    grads = [cupy.asarray(testing.random_values(rng, (100,), np.float64)),
             testing.random_values(rng, (33,), np.float64)]
    with pytest.raises(TypeError, match=r"grads\[1\] is on cpu but params\[1\] is on cuda"):
        opt.step(grads)
    _assert_same(_snapshot(opt), before, "after a rejected step (grads[1] on the host)")


def test_mixed_params_rejected():
    rng = np.random.default_rng(5)
    host = testing.random_values(rng, (10,), np.float32)
    dev = cupy.asarray(testing.random_values(rng, (12,), np.float32))
    host0, dev0 = host.copy(), dev.get()
    with pytest.raises(TypeError, match=r"params are on several devices \(cpu, cuda:\d\)"):
        hwoptim.Adam([dev, host])
    with pytest.raises(TypeError, match=r"params are on several devices"):
        hwoptim.Adam([host, dev])
    assert np.array_equal(host, host0) and np.array_equal(dev.get(), dev0)


def test_host_backend_rejects_cupy_params():
    w = cupy.zeros(8, np.float32)
    with pytest.raises(TypeError, match="runs on NumPy arrays, but the params are CuPy arrays"):
        hwoptim.Adam(w, backend="numpy")


def test_what_has_no_gpu_path_yet_is_refused_and_changes_nothing():
    """Norms (LAMB, LARS) on cupy-elementwise, and max_grad_norm / skip_nonfinite without
    capturable=True are refused on CuPy arrays with a clear error, before anything
    changes."""
    w = cupy.asarray(testing.random_values(np.random.default_rng(3), (64,), np.float32))
    w0 = w.get()
    opt = hwoptim.LAMB(w, backend="cupy-elementwise")
    with pytest.raises(ValueError, match="takes per-array norms"):
        opt.step(cupy.ones_like(w))
    assert opt.step_count == 0 and np.array_equal(w.get(), w0)
    with pytest.raises(ValueError, match="max_grad_norm and skip_nonfinite are not supported"
                                         ".*use capturable=True"):
        hwoptim.Adam(w, max_grad_norm=1.0)


@pytest.mark.parametrize("mode", MODES)
def test_state_on_the_params_device(mode):
    """Every state buffer (and capturable mode's device scalars) lives on the params' device,
    whichever device is current; each device steps correctly when current."""
    case = next(c for c in CASES if c.id == "Adam[amsgrad=True]")
    for dev in range(cupy.cuda.runtime.getDeviceCount()):
        with cupy.cuda.Device(dev):
            rng = np.random.default_rng(dev)
            p0 = testing.random_values(rng, (N,), np.float32)
            w = cupy.asarray(p0)
        assert w.device.id == dev
        with cupy.cuda.Device(0):             # another device current while allocating
            opt = case.make(w, mode)
        for k, v in opt.state[0].items():
            assert v.device.id == dev, f"state {k!r} on device {v.device.id}; expected {dev}"
        if mode == "cupy-capturable":
            for arr in (*opt._hyper_dev, *opt._step_dev, *opt._k_dev):
                assert arr.device.id == dev, (f"device scalars on device {arr.device.id}; "
                                              f"expected the params' device {dev}")
        with cupy.cuda.Device(dev):
            g = testing.random_values(rng, (N,), np.float32)
            before = {"param": w.get(), **{k: v.get() for k, v in opt.state[0].items()}}
            opt.step(cupy.asarray(g))
            got = {"param": w.get(), **{k: v.get() for k, v in opt.state[0].items()}}
            _check_step(case, "float32", 1, before, got, g, f"device {dev} {mode}",
                        _device_scalars(opt, case.plan) if mode == "cupy-capturable"
                        else None)


_SPIN = r"""
extern "C" __global__ void hw_test_spin(const unsigned long long ns)
{
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}
"""


@pytest.mark.parametrize("mode", MODES)
def test_current_stream_honoured(mode):
    """The step is enqueued on CuPy's current stream: queued behind a 0.3 s kernel on a
    non-blocking stream, it has not happened when another stream looks, and after
    ``synchronize`` the result is bitwise that of the same step on the default stream."""
    case = next(c for c in CASES if c.id == "Adam[default]")
    spin = cupy.RawKernel(_SPIN, "hw_test_spin")
    rng = np.random.default_rng(11)
    p0 = testing.random_values(rng, (N,), np.float32)
    g = cupy.asarray(testing.random_values(rng, (N,), np.float32))
    ref_w = cupy.asarray(p0)
    ref = case.make(ref_w, mode)
    ref.step(g)                                     # compiles and loads the kernels
    spin((1,), (1,), (np.uint64(1000),))
    cupy.cuda.Device().synchronize()

    w = cupy.asarray(p0)
    opt = case.make(w, mode)
    cupy.cuda.Device().synchronize()
    s = cupy.cuda.Stream(non_blocking=True)
    other = cupy.cuda.Stream(non_blocking=True)
    with s:
        spin((1,), (1,), (np.uint64(300_000_000),))
        opt.step(g)
    import cupyx
    early = cupyx.empty_pinned(w.shape, dtype=w.dtype)   # pinned: a truly async copy
    w.get(stream=other, out=early)                  # on another stream: does not wait for s
    s.synchronize()
    assert np.array_equal(early, p0), (
        f"{mode}: the params changed before the work queued ahead of the step on the current "
        f"stream finished; expected the step to be enqueued on cupy's current stream")
    assert opt.step_count == 1
    _assert_same(_snapshot(opt), _snapshot(ref), f"{mode}: step on a side stream")


# ----------------------------------------------------------------------------- CUDA graphs

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_cuda_graph_replays_equal_eager_steps(case, dtype):
    """One step captured in a CUDA graph and replayed R times == R eager capturable steps,
    bitwise (a learning-rate change halfway included); step_count reads the device step."""
    replays, n = 9, 4099
    rng = np.random.default_rng(_seed(case.id, dtype, "graph"))
    p0 = testing.random_values(rng, (n,), dtype)
    grads = [testing.random_values(rng, (n,), dtype) for _ in range(replays)]
    warm = case.make(cupy.asarray(p0), "cupy-capturable")
    warm.step(cupy.asarray(grads[0]))               # kernels compiled and loaded
    cupy.cuda.Device().synchronize()

    wa = cupy.asarray(p0)
    eager = case.make(wa, "cupy-capturable")
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        wb = cupy.asarray(p0)
        captured = case.make(wb, "cupy-capturable")
        g_static = cupy.zeros(n, dtype=dtype)
        s.synchronize()
        s.begin_capture()
        try:
            captured.step(g_static)
        finally:
            graph = s.end_capture()
        s.synchronize()
        assert captured.step_count == 0, "capturing must record the step, not run it"
        _assert_same({"p": wb.get()}, {"p": p0}, "params after capture (nothing may run)")
        new_lr = captured.param_groups[0]["lr"] * 0.5
        for i, g in enumerate(grads):
            if i == replays // 2:
                captured.param_groups[0]["lr"] = new_lr    # device copy on s, in order
                with cupy.cuda.Stream.null:
                    eager.param_groups[0]["lr"] = new_lr
            g_static.set(g)
            graph.launch(s)
            with cupy.cuda.Stream.null:
                eager.step(cupy.asarray(g))
        s.synchronize()
    cupy.cuda.Device().synchronize()
    assert captured.step_count == replays, (f"step_count {captured.step_count} after "
                                            f"{replays} replays; expected {replays}")
    assert captured.state_dict()["step"] == replays
    _assert_same(_snapshot(captured), _snapshot(eager),
                 f"{case.id} {dtype}: {replays} graph replays vs eager capturable steps")


def test_capturable_rejects_unaligned_grad_unchanged():
    """A rejected capturable step (misaligned grad) must leave params, state and the step
    count as they were, like every rejected step."""
    rng = np.random.default_rng(21)
    w = cupy.asarray(testing.random_values(rng, (N,), np.float32))
    opt = hwoptim.Adam(w, capturable=True)
    opt.step(cupy.asarray(testing.random_values(rng, (N,), np.float32)))
    before = _snapshot(opt)
    k_before = opt._k_dev[0].get()
    base = cupy.asarray(testing.random_values(rng, (N + 1,), np.float32))
    with pytest.raises(ValueError, match="aligned"):
        opt.step(base[1:])
    _assert_same(_snapshot(opt), before, "after a rejected capturable step (misaligned grad)")
    assert np.array_equal(opt._k_dev[0].get(), k_before), "device scalars changed"


# ----------------------------------------------------------------------------- launches

@pytest.mark.parametrize("mode", MODES)
def test_launches_per_step(mode):
    """A list of arrays: one multi-tensor launch per step (capturable: one launch per array,
    plus one ``advance`` per group); a FlatParams buffer is one array, so one launch, with
    results bitwise equal to stepping the arrays in a list."""
    from hwoptim.bench.gpu import count_launches
    case = next(c for c in CASES if c.id == "Adam[default]")
    shapes = [(33, 7), (64,), (5, 5, 5), (1,)]
    rng = np.random.default_rng(31)
    values = [testing.random_values(rng, s, np.float32) for s in shapes]
    grads = [[testing.random_values(rng, s, np.float32) for s in shapes] for _ in range(4)]
    flat = hwoptim.FlatParams(shapes, np.float32, xp=cupy)
    for v, x in zip(flat.views, values):
        v[...] = cupy.asarray(x)
    per = [cupy.asarray(x) for x in values]
    o_flat, o_per = case.make(flat.params, mode), case.make(per, mode)
    k = codegen.cuda_source(case.plan, "float32")
    extra = 1 if mode == "cupy-capturable" else 0
    for gs in grads:
        for gv, gx in zip(flat.grad_views, gs):
            gv[...] = cupy.asarray(gx)
        g_per = [cupy.asarray(x) for x in gs]
        with count_launches(o_flat) as c_flat:
            o_flat.step(flat.grads)
        with count_launches(o_per) as c_per:
            o_per.step(g_per)
        assert sum(c_flat.values()) == 1 + extra, (
            f"{mode}: FlatParams step made launches {dict(c_flat)}; expected {1 + extra}")
        # separate arrays: one multi-tensor launch (capturable and element-wise kernels:
        # one launch per array)
        want = 1 if mode == "cupy" else len(shapes) + extra
        assert sum(c_per.values()) == want, (
            f"{mode}: per-array step made launches {dict(c_per)}; expected {want}")
        if mode == "cupy-capturable":
            assert c_flat[k.advance] == 1 and c_flat[k.device] == 1, dict(c_flat)
    for i, (v, p) in enumerate(zip(flat.views, per)):
        _assert_same({"p": v.get()}, {"p": p.get()}, f"{mode}: FlatParams view {i} vs array")


# ----------------------------------------------------------------------------- torch CUDA

def _torch_cuda():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    return torch


def test_torch_cuda_tensors_zero_copy_on_torchs_stream():
    """torch CUDA tensors in a native class: updated in place (same address), equal to the
    same run on CuPy arrays, and enqueued on torch's current stream (a side stream here):
    the result is only visible after that stream is synchronised with."""
    torch = _torch_cuda()
    rng = np.random.default_rng(3)
    p0 = testing.random_values(rng, (N,), np.float32)
    g0 = testing.random_values(rng, (N,), np.float32)
    t = torch.from_numpy(p0.copy()).cuda()
    ptr = t.data_ptr()
    ref = cupy.asarray(p0)
    hwoptim.Adam(ref).step(cupy.asarray(g0))
    opt = hwoptim.Adam(t)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)               # keeps the side stream busy
        opt.step(torch.from_numpy(g0).to("cuda", non_blocking=False))
    side.synchronize()
    assert t.data_ptr() == ptr
    assert np.array_equal(t.cpu().numpy(), cupy.asnumpy(ref))


def test_torch_dropin_on_cuda_equals_cpu():
    """hwoptim.torch.AdamW on CUDA tensors trains a small MLP like on the CPU (float64,
    1e-12), and like torch.optim.AdamW on CUDA."""
    torch = _torch_cuda()
    import hwoptim.torch as ht
    x = torch.randn(64, 12, dtype=torch.float64)
    y = torch.randn(64, 3, dtype=torch.float64)
    out = []
    for dev, cls in (("cpu", ht.AdamW), ("cuda", ht.AdamW), ("cuda", torch.optim.AdamW)):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 3)).double().to(dev)
        opt = cls(m.parameters(), lr=1e-2)
        xd, yd = x.to(dev), y.to(dev)
        for _ in range(50):
            opt.zero_grad()
            ((m(xd) - yd) ** 2).mean().backward()
            opt.step()
        out.append([p.detach().cpu() for p in m.parameters()])
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert float((a - b).abs().max() / b.abs().max()) <= 1e-12


@pytest.mark.parametrize("dtype, opts", [
    ("bfloat16", {"state_dtype": "int8", "stochastic_rounding": True, "min_8bit_size": 256}),
    ("bfloat16", {"state_dtype": "bfloat16"}),
    ("float16", {"master_weights": True}),
    ("float32", {"state_dtype": "int8", "min_8bit_size": 0})])
def test_torch_dropin_formats_on_cuda_are_the_cpu_bits(dtype, opts):
    """hwoptim.torch.AdamW in a storage format on CUDA tensors (bfloat16 params included:
    the format kernels take addresses, no CuPy dtype needed) against the same on CPU
    tensors: the same bits in params and every state buffer after 5 steps."""
    torch = _torch_cuda()
    import hwoptim.torch as ht
    tdt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(11)
    shapes = [(300, 7), (1000,), (5,)]
    init = [torch.randn(s, generator=gen).to(tdt) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(tdt) for s in shapes] for _ in range(5)]
    out = []
    for dev in ("cpu", "cuda"):
        ps = [torch.nn.Parameter(p.clone().to(dev)) for p in init]
        opt = ht.AdamW(ps, lr=1e-2, seed=7, **opts)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(dev)
            opt.step()
        torch.cuda.synchronize()
        out.append(([p.detach().cpu() for p in ps],
                    [{k: v.detach().cpu() for k, v in opt.state[p].items()} for p in ps]))
    (pa, sa), (pb, sb) = out
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
    for x, y in zip(sa, sb):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


# ----------------------------------------------------------------------------- loss scaling

@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_scale_and_found_inf_on_the_gpu(dtype):
    """step(grads, grad_scale=2^10) on CuPy arrays is the unscaled step bit for bit; a
    found_inf step changes nothing (read on the host: one synchronisation, for now)."""
    rng = np.random.default_rng(5)
    init = rng.standard_normal(N).astype(dtype)
    a_p, b_p = cupy.asarray(init), cupy.asarray(init)
    a, b = hwoptim.Adam(a_p, lr=1e-2), hwoptim.Adam(b_p, lr=1e-2)
    for _ in range(5):
        g = cupy.asarray(rng.standard_normal(N).astype(dtype))
        a.step(g * 1024, grad_scale=1024.0)
        b.step(g)
    assert cupy.array_equal(a_p, b_p)
    before = a_p.copy()
    a.step(g, grad_scale=cupy.asarray([1024.0], np.float32), found_inf=cupy.ones(1))
    assert cupy.array_equal(a_p, before) and a.step_count == 5 and a.skipped_steps == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule_name, kw", [("Adam", {}), ("SGD", {"momentum": 0.9})])
def test_capturable_guard_decides_on_the_device_as_the_cpu(rule_name, kw, dtype):
    """capturable=True with max_grad_norm and skip_nonfinite (the verdict on the device):
    each step as a NumPy-backend optimizer's with the same options (clip factor from a norm
    summed in another order: within 1e-12 in float64, 1e-5 in float32), a NaN grad skipping
    the whole step there as here; step_count, skipped_steps, last_step_skipped and
    last_grad_norm as the CPU's."""
    rng = np.random.default_rng(zlib.crc32(f"guard-{rule_name}-{dtype}".encode()))
    sizes = [5000, 300, 17]
    init = [rng.standard_normal(n).astype(dtype) for n in sizes]
    cls = getattr(hwoptim, rule_name)
    opts = dict(kw, max_grad_norm=0.5, skip_nonfinite=True)
    gpu = cls([cupy.asarray(p) for p in init], capturable=True, **opts)
    cpu = cls([p.copy() for p in init], backend="numpy", **opts)
    tol = 1e-12 if dtype == "float64" else 1e-5
    for t in range(8):
        gs = [rng.standard_normal(n).astype(dtype) for n in sizes]
        if t == 3:
            gs[1][7] = np.nan
        gpu.step([cupy.asarray(g) for g in gs])
        cpu.step(gs)
        assert gpu.last_step_skipped == cpu.last_step_skipped, t
        assert gpu.skipped_steps == cpu.skipped_steps and gpu.step_count == cpu.step_count, t
        if math.isnan(cpu.last_grad_norm):
            assert math.isnan(gpu.last_grad_norm), t
        else:
            assert abs(gpu.last_grad_norm - cpu.last_grad_norm) <= 1e-12 * cpu.last_grad_norm
        for a, b in zip(gpu.param_groups[0]["params"], cpu.param_groups[0]["params"]):
            np.testing.assert_allclose(a.get(), b, rtol=tol, atol=tol)
    assert cpu.skipped_steps == 1 and gpu.step_count == 7


@pytest.mark.parametrize("dtype", DTYPES)
def test_capturable_loss_scale_and_found_inf_on_the_device(dtype):
    """capturable=True with grad_scale and found_inf as device arrays (nothing read on the
    host): a scaled step is the unscaled step within rounding of the division; found_inf
    non-zero skips everything (params, state and the device step count, byte for byte);
    captured in a CUDA graph, each replay takes the found_inf value then on the device."""
    rng = np.random.default_rng(zlib.crc32(f"amp-capturable-{dtype}".encode()))
    init = rng.standard_normal(N).astype(dtype)
    a_p, b_p = cupy.asarray(init), cupy.asarray(init)
    a, b = hwoptim.Adam(a_p, lr=1e-2, capturable=True), hwoptim.Adam(b_p, lr=1e-2,
                                                                     capturable=True)
    scale = cupy.asarray([1024.0], np.float32)
    fi = cupy.zeros(1, np.float32)
    for _ in range(5):
        g = cupy.asarray(rng.standard_normal(N).astype(dtype))
        a.step(g * 1024, grad_scale=scale, found_inf=fi)
        b.step(g)
    assert cupy.array_equal(a_p, b_p)
    before = (a_p.copy(), {k: v.copy() for k, v in a.state[0].items()})
    fi.fill(1.0)
    a.step(g, grad_scale=scale, found_inf=fi)
    assert cupy.array_equal(a_p, before[0]) and a.step_count == 5 and a.skipped_steps == 1
    assert all(cupy.array_equal(v, before[1][k]) for k, v in a.state[0].items())
    assert a.last_step_skipped
    # one step captured, replayed with found_inf 0, 1, 0 set on the device between replays
    g_static = cupy.asarray(rng.standard_normal(N).astype(dtype))
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        c_p = cupy.asarray(init)
        c = hwoptim.Adam(c_p, lr=1e-2, capturable=True)
        c.step(g_static, grad_scale=scale, found_inf=fi * 0)     # (eager: builds the tables)
        s.synchronize()
        s.begin_capture()
        try:
            c.step(g_static, grad_scale=scale, found_inf=fi)
        finally:
            graph = s.end_capture()
        for v in (0.0, 1.0, 0.0):
            fi.fill(v)
            graph.launch(s)
        s.synchronize()
    assert c.step_count == 3 and c.skipped_steps == 1


# ----------------------------------------------------------------------------- formats

# storage formats CuPy can hold (float16 and float32 params; bfloat16 state kept as its bits)
GPU_FORMATS = [("float16", {}), ("float16", {"state_dtype": "bfloat16"}),
               ("float16", {"master_weights": True}),
               ("float16", {"stochastic_rounding": True, "seed": 2**40 + 3}),
               ("float32", {"state_dtype": "int8", "min_8bit_size": 0}),
               ("float16", {"state_dtype": "int8", "stochastic_rounding": True,
                            "min_8bit_size": 1000}),
               ("float32", {"state_dtype": "bfloat16"})]
_FORMAT_IDS = [f"{d}-{','.join(f'{k}={v}' for k, v in o.items()) or 'default'}"
               for d, o in GPU_FORMATS]
# every rule (its first option set) in two formats, Adam, SGD and Lion in all
FORMAT_CASES = [pytest.param(c, m, id=f"{c.id}-{mid}") for c in CASES
                if c is next(x for x in CASES if x.rule is c.rule)
                for i, (m, mid) in enumerate(zip(GPU_FORMATS, _FORMAT_IDS))
                if c.rule.name in ("Adam", "SGD", "Lion") or i in (3, 5)]


def _format_values(rng, n, dtype):
    return (rng.standard_normal(n) * 10.0 ** rng.uniform(-2, 1, n)).astype(dtype)


def _equal_bits(rule, opt, a, b) -> bool:
    """The same bits; for rules taking norms (summed in another order) and Rprop (whose
    NumPy reference rounds less often), 99% of the elements within one unit of their
    storage (codes: equal)."""
    from hwoptim.optim import _plan
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not (rule.name == "Rprop" or _plan(rule, opt._flags[0]).norms):
        return a.tobytes() == b.tobytes()
    if a.dtype.kind == "u":
        return np.mean(a == b) > 0.99
    eps = np.finfo(np.float16).eps if a.itemsize == 2 else 8 * np.finfo(np.float32).eps
    return np.mean(np.isclose(a.astype(np.float32), b.astype(np.float32), rtol=eps, atol=0,
                              equal_nan=True)) > 0.99


@pytest.mark.parametrize("case, mode", FORMAT_CASES)
def test_formats_on_the_gpu_are_the_cpu_bits(case, mode):
    """Storage formats on CuPy arrays (codegen.cuda_format_source): five steps of a list of
    params (the multi-tensor launch) and of one param (a table of one) give the NumPy
    reference's bits in params and state (16-bit params, bfloat16 state, master weights,
    stochastic rounding, int8 state; the GPU flushes subnormals, which these values avoid),
    and the state_dict loads into a CPU optimizer that continues bit for bit."""
    dtype, fopts = mode
    if "bfloat16" in repr(fopts):
        pytest.importorskip("ml_dtypes")
    rule, cls = case.rule, getattr(hwoptim, case.rule.name)
    kw = dict(case.kwargs, **fopts)
    if rule.name == "SGD":
        kw.setdefault("momentum", 0.9)
    rng = np.random.default_rng(_seed(case.id, dtype, repr(fopts)))
    for sizes in ([5000, 3, 70_000, 256], [70_000]):
        host = [_format_values(rng, n, dtype) for n in sizes]
        dev = [cupy.asarray(h) for h in host]
        a, b = cls(dev, backend="cupy", **kw), cls(host, backend="numpy", **kw)
        for _ in range(5):
            gs = [_format_values(rng, n, dtype) for n in sizes]
            a.step([cupy.asarray(g) for g in gs])
            b.step(gs)
        for i, (d, h) in enumerate(zip(dev, host)):
            assert _equal_bits(rule, b, d.get(), h), f"{case.id} {mode} params[{i}]"
        sa, sb = a.state_dict(), b.state_dict()
        for i, (x, y) in enumerate(zip(sa["state"], sb["state"])):
            assert sorted(x) == sorted(y)
            for k in x:
                assert _equal_bits(rule, b, x[k], y[k]), f"{case.id} {mode} state[{i}][{k!r}]"
        c = cls([h.copy() for h in host], backend="numpy", **kw)
        c.load_state_dict(sa)
        gs = [_format_values(rng, n, dtype) for n in sizes]
        c.step(gs)
        b.step(gs)
        assert all(x.tobytes() == y.tobytes() for x, y in zip(c._params, b._params))


def test_formats_refused_where_the_gpu_has_no_kernel():
    """The ElementwiseKernel backend with a storage format: refused at construction,
    naming the option."""
    w = cupy.asarray(np.ones(64, np.float16))
    with pytest.raises(ValueError, match="use backend='cupy'"):
        hwoptim.Adam(w, backend="cupy-elementwise")


@pytest.mark.parametrize("name", ["LAMB", "Adafactor"])
@pytest.mark.parametrize("mode", GPU_FORMATS, ids=_FORMAT_IDS)
def test_capturable_formats_with_norms(mode, name):
    """Rules taking norms (LAMB's trust ratio, Adafactor's RMS over vectors), capturable in
    a storage format (the device reduction, each warp's partial added in order by one
    warp): five eager steps are the NumPy reference's values to rounding; a step captured
    in a CUDA graph and replayed equals eager steps byte for byte."""
    dtype, fopts = mode
    rng = np.random.default_rng(_seed("capturable-norms", name, dtype, repr(fopts)))
    rule, cls = hwoptim.RULES[name], getattr(hwoptim, name)
    sizes = [5000, 3, 300_000]
    host = [_format_values(rng, n, dtype) for n in sizes]
    dev = [cupy.asarray(h) for h in host]
    kw = dict(lr=1e-3, **fopts)
    a, b = cls(dev, capturable=True, **kw), cls(host, backend="numpy", **kw)
    for _ in range(5):
        gs = [_format_values(rng, n, dtype) for n in sizes]
        a.step([cupy.asarray(g) for g in gs])
        b.step(gs)
    for i, (d, h) in enumerate(zip(dev, host)):
        assert _equal_bits(rule, b, d.get(), h), f"{name} {mode} params[{i}]"
    g_static = [cupy.asarray(_format_values(rng, n, dtype)) for n in sizes]
    c, e = _replayed_and_eager(cls, dev, kw, a.state_dict(), g_static)
    pairs = zip(c.param_groups[0]["params"], e.param_groups[0]["params"])
    assert all(x.get().tobytes() == y.get().tobytes() for x, y in pairs)


@pytest.mark.parametrize("mode", GPU_FORMATS, ids=_FORMAT_IDS)
def test_capturable_formats_are_the_cpu_bits(mode):
    """capturable=True in a storage format (scalars and stochastic-rounding keys made on
    the device): five eager steps of Adam over three params are the NumPy reference's bits;
    one step captured in a CUDA graph and replayed three times equals three eager steps,
    byte for byte."""
    dtype, fopts = mode
    rng = np.random.default_rng(_seed("capturable-format", dtype, repr(fopts)))
    sizes = [5000, 3, 70_000]
    host = [_format_values(rng, n, dtype) for n in sizes]
    dev = [cupy.asarray(h) for h in host]
    kw = dict(lr=1e-2, **fopts)
    a, b = hwoptim.Adam(dev, capturable=True, **kw), hwoptim.Adam(host, backend="numpy", **kw)
    for _ in range(5):
        gs = [_format_values(rng, n, dtype) for n in sizes]
        a.step([cupy.asarray(g) for g in gs])
        b.step(gs)
    for i, (d, h) in enumerate(zip(dev, host)):
        assert d.get().tobytes() == h.tobytes(), f"{mode} params[{i}]"
    for x, y in zip(a.state_dict()["state"], b.state_dict()["state"]):
        assert all(np.asarray(x[k]).tobytes() == np.asarray(y[k]).tobytes() for k in x)
    g_static = [cupy.asarray(_format_values(rng, n, dtype)) for n in sizes]
    c, e = _replayed_and_eager(hwoptim.Adam, dev, kw, a.state_dict(), g_static)
    assert c.step_count == e.step_count == 9
    pairs = zip(c.param_groups[0]["params"], e.param_groups[0]["params"])
    assert all(x.get().tobytes() == y.get().tobytes() for x, y in pairs)


def _replayed_and_eager(cls, dev, kw, sd, grads):
    """Two capturable ``cls`` optimizers over copies of ``dev``, from checkpoint ``sd``,
    on a side stream: each takes an eager step (its device tables made before the
    capture), then one's next step is captured in a CUDA graph and replayed three times
    while the other takes three eager steps. Returns (replayed, eager)."""
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        c = cls([d.copy() for d in dev], capturable=True, **kw)
        e = cls([d.copy() for d in dev], capturable=True, **kw)
        c.load_state_dict(sd)
        e.load_state_dict(sd)
        c.step(grads)
        e.step(grads)
        s.synchronize()
        s.begin_capture()
        try:
            c.step(grads)
        finally:
            graph = s.end_capture()
        for _ in range(3):
            graph.launch(s)
            e.step(grads)
        s.synchronize()
    return c, e


# ----------------------------------------------------------------------------- Adafactor

_STAGED_SHAPES = [(3, 37, 45), (300, 257), (1, 2000), (2000, 1), (2, 1, 40), (40,)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_adafactor_matrices_on_the_gpu(dtype):
    """Factored Adafactor on CuPy matrices (the staged kernels: partial tiles, a batch, one
    row, one column; a vector beside them): every step within 32u of the NumPy float64
    step from the same state (as tests/test_adafactor.py holds the CPU kernels), and a
    second GPU optimizer on the same inputs gives the same bits (no atomics)."""
    rng = np.random.default_rng(zlib.crc32(f"adafactor-gpu-{dtype}".encode()))
    u = np.finfo(dtype).eps / 2
    host = [rng.standard_normal(s).astype(dtype) for s in _STAGED_SHAPES]
    ps, twin = [cupy.asarray(p) for p in host], [cupy.asarray(p) for p in host]
    kw = dict(weight_decay=1e-2, eps=(1e-7, 1e-3))
    opt, opt2 = hwoptim.Adafactor(ps, **kw), hwoptim.Adafactor(twin, **kw)
    assert opt.backend_name == "cupy"
    for t in range(1, 11):
        before = [p.get().astype(np.float64) for p in ps]
        st = [{k: v.get().astype(np.float64) for k, v in s.items()} for s in opt.state]
        gs = [rng.standard_normal(s).astype(dtype) for s in _STAGED_SHAPES]
        ref = hwoptim.Adafactor([b.copy() for b in before], backend="numpy", **kw)
        for i, s in enumerate(st):
            for k, v in s.items():
                ref.state[i][k] = v
        ref.load_state_dict({**ref.state_dict(), "step": t - 1})
        ref.step([g.astype(np.float64) for g in gs])
        opt.step([cupy.asarray(g) for g in gs])
        opt2.step([cupy.asarray(g) for g in gs])
        refs = ref.param_groups[0]["params"]
        for i, p in enumerate(ps):
            got = p.get()
            bound = 32 * u * (np.abs(before[i]) + np.abs(refs[i] - before[i]))
            assert np.all(np.abs(got - refs[i]) <= bound), (t, i, _STAGED_SHAPES[i])
            assert np.array_equal(got, twin[i].get()), (t, i, "not repeatable")
            for k, v in opt.state[i].items():
                r = ref.state[i][k]
                assert np.all(np.abs(v.get() - r) <= 32 * u * np.abs(r)), (t, i, k)


@pytest.mark.parametrize("dtype, fopts", [
    ("float16", {}), ("float16", {"master_weights": True}),
    ("float16", {"stochastic_rounding": True, "seed": 5, "state_dtype": "bfloat16"}),
    ("float16", {"state_dtype": "int8", "min_8bit_size": 0}),
    ("float32", {"state_dtype": "int8", "min_8bit_size": 0})], ids=str)
def test_adafactor_matrices_in_formats_on_the_gpu(dtype, fopts):
    """Factored Adafactor in storage formats on CuPy arrays (the staged kernels' loads and
    stores, int8 factors through the quantize kernels): from a warmed-up state, a step is
    the float32 GPU step from the upcast values (the same kernels, the same sums), each
    result rounded into its storage by hwoptim.formats, bit for bit."""
    if fopts.get("state_dtype") == "bfloat16":
        pytest.importorskip("ml_dtypes")
    from hwoptim import formats
    rng = np.random.default_rng(zlib.crc32(f"adafactor-gpu-{dtype}-{fopts}".encode()))
    shapes = [(3, 37, 45), (300, 257), (40,)]
    dev = [cupy.asarray(rng.standard_normal(s).astype(dtype)) for s in shapes]
    opt = hwoptim.Adafactor(dev, lr=1e-2, **fopts)
    for _ in range(2):
        opt.step([cupy.asarray(rng.standard_normal(s).astype(dtype)) for s in shapes])
    base = [opt.state[i]["master"].copy() if fopts.get("master_weights")
            else p.astype(np.float32) for i, p in enumerate(dev)]
    ref = hwoptim.Adafactor(base, lr=1e-2)
    ref.load_state_dict(opt.state_dict())
    gs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    opt.step([cupy.asarray(g) for g in gs])
    ref.step([cupy.asarray(g.astype(np.float32)) for g in gs])
    cupy.cuda.Device().synchronize()
    for i, (p, q) in enumerate(zip(dev, base)):
        q = q.get()
        if opt.format.sr:
            key = formats.sr_key(opt.seed, opt.step_count, [i])[0]
            bits = formats.element_bits(key, np.arange(q.size)).reshape(q.shape)
            want = formats.round_stochastic(q, dtype, bits)
        else:
            want = formats.round_nearest(q, dtype)
        assert p.get().tobytes() == want.tobytes(), (i, shapes[i])
        if opt.format.master:
            assert opt.state[i]["master"].get().tobytes() == q.tobytes(), i
        for k, v in ref.state[i].items():
            v, mine = v.get(), opt.state[i][k]
            if f"{k}_absmax" in opt.state[i]:
                codes, absmax = formats.quantize(v)
                assert mine.get().tobytes() == codes.tobytes(), (i, k)
                assert opt.state[i][f"{k}_absmax"].get().tobytes() == absmax.tobytes()
            else:
                r = formats.round_nearest(v, formats.dtype_name(mine.dtype))
                assert np.asarray(mine.get()).tobytes() == r.tobytes(), (i, k)


def test_adafactor_dropin_on_cuda_equals_torch():
    """hwoptim.torch.Adafactor on CUDA tensors (an MLP: weights factored, biases not)
    against torch.optim.Adafactor on CUDA, float64: within 1e-10 after 50 steps."""
    torch = _torch_cuda()
    import hwoptim.torch as ht
    x = torch.randn(64, 12, dtype=torch.float64)
    y = torch.randn(64, 3, dtype=torch.float64)
    out = []
    for cls in (ht.Adafactor, torch.optim.Adafactor):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(),
                                torch.nn.Linear(40, 3)).double().to("cuda")
        opt = cls(m.parameters(), lr=1e-2, weight_decay=1e-2)
        xd, yd = x.to("cuda"), y.to("cuda")
        for _ in range(50):
            opt.zero_grad()
            ((m(xd) - yd) ** 2).mean().backward()
            opt.step()
        out.append([p.detach().cpu() for p in m.parameters()])
    for a, b in zip(*out):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-10


def test_adafactor_matrices_refused_where_the_gpu_has_no_kernel():
    """capturable=True and the ElementwiseKernel backend with a factored param: refused at
    construction (or when the group is added), nothing changed."""
    w = cupy.asarray(np.ones((8, 8), np.float32))
    with pytest.raises(ValueError, match="capturable=True has no kernels"):
        hwoptim.Adafactor(w, capturable=True)
    with pytest.raises(ValueError, match="cannot run that yet"):
        hwoptim.Adafactor(w, backend="cupy-elementwise")
    opt = hwoptim.Adafactor(cupy.asarray(np.ones(8, np.float32)), capturable=True)
    with pytest.raises(ValueError, match="param_groups\\[1\\]: params\\[1\\]"):
        opt.add_param_group({"params": [w]})
    assert len(opt.param_groups) == 1 and len(opt.state) == 1


# ----------------------------------------------------------------------------- sharded

def test_sharded_ranks_share_one_gpu():
    """ShardedOptimizer with CuPy params, 2 and 3 mpiexec ranks on the one GPU: the
    host-staged transport (the MPICH wheel is not CUDA-aware), the same bytes as one
    process (tests/mpi_sharded.py's ``gpu`` mode); and NCCL's transport on one rank where
    CuPy has NCCL. Needs mpi4py and mpiexec there."""
    import pathlib
    import shutil
    import subprocess
    import sys
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        pytest.skip(f"mpi4py is not installed here ({e}): pip install mpi4py mpich")
    exe = shutil.which("mpiexec", path=os.pathsep.join(
        [str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if exe is None:
        pytest.skip("no mpiexec on PATH")
    here = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, NUMBA_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(here.parent), os.environ.get("PYTHONPATH", "")]))
    from cupy.cuda import nccl
    runs = [(2, []), (3, [])] + ([(1, ["nccl"])] if nccl.available else [])
    for ranks, extra in runs:       # NCCL wants a GPU per rank: one rank on this one
        res = subprocess.run([exe, "-n", str(ranks), sys.executable,
                              str(here / "mpi_sharded.py"), "gpu", *extra],
                             capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0 and f"OK gpu R={ranks}" in res.stdout, \
            f"{res.stdout}\n{res.stderr[-4000:]}"
