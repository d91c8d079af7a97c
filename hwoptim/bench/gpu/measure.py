"""Bandwidth on the GPU: the copy ceiling, every rule by every implementation, and the
model-like tensor lists. Each measurement returns a record; a failure is recorded in it.

Every timed step streams from device memory: fresh random data (never zeros), rotating among
buffer sets whose total exceeds twice the L2 cache; times are medians of CUDA-event
intervals after warm-up.
"""
from __future__ import annotations

import time

import numpy as np

import hwoptim
from hwoptim import codegen
from hwoptim.backends import cupy as cupy_backend

from ..workload import bytes_per_element, option_name, plan_for
from .device import THREADS, error_text, free, n_sets_for, time_steps, torch_timer
from .kernels import count_launches


COPY_SRC = r"""
extern "C" __global__ void hw_bench_copy16(const float4* __restrict__ src,
                                           float4* __restrict__ dst, const long long n)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = src[i];
}
"""


def copy(ctx, n_bytes) -> list:
    """Records of a device-to-device copy of ``n_bytes``: ``cudaMemcpy`` and a 16-byte-load
    kernel; bytes moved are read + written."""
    cupy = ctx.cupy
    recs = []
    # n_bytes is far above the L2 size: one source and one destination stream from memory
    src = ctx.positive(ctx.cupy.empty(n_bytes // 4, dtype=np.float32))
    dst = cupy.empty_like(src)
    rep = 10 if ctx.quick else 20

    def memcpy(i):
        dst.data.copy_from_device_async(src.data, n_bytes, ctx.stream)
    t = time_steps(memcpy, 1, 3, rep, ctx.timer)
    recs.append(_rec(ctx, None, None, "copy-memcpy", "float32", n_bytes // 4, t, 2 * n_bytes))
    k = cupy.RawKernel(COPY_SRC, "hw_bench_copy16")
    n16 = n_bytes // 16

    def launch(i):
        k((ctx.blocks(n16),), (THREADS,), (src, dst, np.int64(n16)))
    t = time_steps(launch, 1, 3, rep, ctx.timer)
    recs.append(_rec(ctx, None, None, "copy-kernel", "float32", n_bytes // 4, t, 2 * n_bytes))
    src = dst = None
    free()
    return recs


def _rec(ctx, rule, options, impl, dtype, n, t, nbytes, **extra):
    return {"device": ctx.name, "rule": rule, "options": options, "impl": impl,
            "dtype": dtype, "n": int(n), "time_s": t, "bytes": int(nbytes), **extra}


def rule_impl(ctx, rule, kwargs, dtype, n, impl) -> dict:
    """One record: ``rule`` with option set ``kwargs`` at ``n`` elements, by ``impl``."""
    plan = plan_for(rule, kwargs)
    nbytes = bytes_per_element(plan, dtype) * n
    opts = option_name(kwargs)
    rep = 8 if ctx.quick else 15
    try:
        if impl.startswith("torch"):
            t = _torch_rule(ctx, rule, kwargs, dtype, n, impl, nbytes, rep)
        else:
            t = _hw_rule(ctx, rule, kwargs, plan, dtype, n, impl, nbytes, rep)
        return _rec(ctx, rule.name, opts, impl, dtype, n, t, nbytes)
    except Exception as e:   # noqa: BLE001 - recorded, the run goes on
        return _rec(ctx, rule.name, opts, impl, dtype, n, None, nbytes, error=error_text(e))
    finally:
        free()


def _hw_rule(ctx, rule, kwargs, plan, dtype, n, impl, nbytes, rep):
    cls = getattr(hwoptim, rule.name)
    sets = []
    for _ in range(n_sets_for(nbytes, ctx.l2)):
        if impl == "floor":
            arrays = [ctx.normal(n, dtype) for _ in plan.arrays[:2]]
            arrays += [ctx.positive(ctx.cupy.empty(n, dtype=dtype))
                       for _ in plan.arrays[2:]]
            sets.append(arrays)
        else:
            w, g = ctx.normal(n, dtype), ctx.normal(n, dtype)
            backend = {"hwoptim-cupy": "cupy",
                       "hwoptim-cupy-elementwise": "cupy-elementwise"}[impl]
            opt = cls(w, backend=backend, **kwargs)
            for buf in opt.state[0].values():
                ctx.positive(buf)
            sets.append((opt, g))
    if impl == "floor":
        run = cupy_backend.kernel(codegen.floor_plan(plan), dtype)
        step = lambda i: run(sets[i], ())
    else:
        step = lambda i: sets[i][0].step(sets[i][1])
    return time_steps(step, len(sets), 3, rep, ctx.timer)


def _torch_rule(ctx, rule, kwargs, dtype, n, impl, nbytes, rep):
    torch = ctx.torch
    if torch is None or rule.torch is None:
        raise RuntimeError("torch with CUDA is not available" if torch is None
                           else f"torch has no {rule.name}")
    tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    cls = getattr(torch.optim, rule.torch)
    kw = {k: v for k, v in kwargs.items() if k not in rule.torch_skip}
    kw["fused" if impl == "torch-fused" else "foreach"] = True
    opts = []
    for _ in range(n_sets_for(nbytes, ctx.l2)):
        p = torch.randn(n, device="cuda", dtype=tdt)
        p.grad = torch.randn_like(p)
        opt = cls([p], **kw)
        opt.step()                           # creates the state
        for v in opt.state[p].values():
            if torch.is_tensor(v) and v.numel() == n:
                v.uniform_(0.5, 1.5)
        opts.append(opt)
    torch.cuda.synchronize()
    return time_steps(lambda i: opts[i].step(), len(opts), 3, rep, torch_timer())


def host_time(step, n_sets, sync, repeats, busy=None) -> float:
    """Median seconds until ``step(i)`` returns, the GPU idle before each call: the host
    work of a step, which a model's many small tensors make the cost that matters. With
    ``busy``, called before each step to queue device work: a step that waits for the
    stream's earlier work (as in a training loop, after the backward pass) shows it here."""
    out = []
    for i in range(repeats):
        sync()
        if busy is not None:
            busy()
        t0 = time.perf_counter()
        step(i % n_sets)
        out.append(time.perf_counter() - t0)
    sync()
    return float(np.median(out))


def model(ctx, label, shapes, rule, kwargs, dtype, impl) -> dict:
    """One record: a step of ``rule`` over tensors of ``shapes`` by ``impl`` (one
    ``FlatParams`` vector, the list of separate arrays, ``hwoptim.torch`` over torch CUDA
    tensors, the floor over the flat vector, or torch), with its host time per step."""
    cupy = ctx.cupy
    plan = plan_for(rule, kwargs)
    n = int(sum(int(np.prod(s)) for s in shapes))
    nbytes = bytes_per_element(plan, dtype) * n
    rec = {"device": ctx.name, "model": label, "rule": rule.name,
           "options": option_name(kwargs), "impl": impl, "dtype": dtype,
           "tensors": len(shapes), "n": n, "bytes": nbytes, "time_s": None,
           "gbps": None, "launches": None, "host_s": None, "host_busy_s": None}
    rep = 10 if ctx.quick else 30
    try:
        sets = []
        cls = getattr(hwoptim, rule.name)
        for _ in range(n_sets_for(nbytes, ctx.l2)):
            if impl in ("hwoptim-cupy-flat", "floor"):
                flat = hwoptim.FlatParams(shapes, dtype, xp=cupy)
                ctx.fill_normal(flat.params)
                ctx.fill_normal(flat.grads)
                if impl == "floor":       # the rule's arrays over the flat vector
                    arrays = [flat.params, flat.grads] + [
                        ctx.positive(cupy.empty(flat.size, dtype=dtype))
                        for _ in plan.arrays[2:]]
                    sets.append((arrays, flat))
                    continue
                opt = cls(flat.params, backend="cupy", **kwargs)
                sets.append((opt, flat.grads, flat))
            elif impl == "hwoptim-cupy-per-tensor":
                ps = [ctx.normal(s, dtype) for s in shapes]
                gs = [ctx.normal(s, dtype) for s in shapes]
                opt = cls(ps, backend="cupy", **kwargs)
                sets.append((opt, gs, ps))
            elif impl == "hwoptim-torch":
                opt = _torch_model(ctx, rule, kwargs, shapes, dtype, impl)
                sets.append(opt)
            else:
                sets.append(_torch_model(ctx, rule, kwargs, shapes, dtype, impl))
            if impl in ("hwoptim-cupy-flat", "hwoptim-cupy-per-tensor"):
                for st in opt.state:
                    for buf in st.values():
                        ctx.positive(buf)
        if impl == "floor":
            run = cupy_backend.kernel(codegen.floor_plan(plan), dtype)
            rec["time_s"] = time_steps(lambda i: run(sets[i][0], ()), len(sets), 3, rep,
                                       ctx.timer)
            rec["launches"] = 1
        elif impl in ("hwoptim-cupy-flat", "hwoptim-cupy-per-tensor"):
            step = lambda i: sets[i][0].step(sets[i][1])
            rec["time_s"] = time_steps(step, len(sets), 3, rep, ctx.timer)
            rec["host_s"] = host_time(step, len(sets), ctx.stream.synchronize, rep)
            rec["host_busy_s"] = host_time(step, len(sets), ctx.stream.synchronize, rep,
                                           ctx.busy)
            with count_launches(sets[0][0]) as c:
                step(0)
            ctx.stream.synchronize()
            rec["launches"] = sum(c.values())
        else:                     # torch's tensors: hwoptim.torch or torch.optim
            step = lambda i: sets[i].step()
            rec["time_s"] = time_steps(step, len(sets), 3, rep, torch_timer())
            rec["host_s"] = host_time(step, len(sets), ctx.torch.cuda.synchronize, rep)
            rec["host_busy_s"] = host_time(step, len(sets), ctx.torch.cuda.synchronize, rep,
                                           ctx.busy)
            if impl == "hwoptim-torch":
                with count_launches() as c:
                    step(0)
                ctx.torch.cuda.synchronize()
                rec["launches"] = sum(c.values())
        rec["gbps"] = nbytes / rec["time_s"] / 1e9
    except Exception as e:   # noqa: BLE001
        rec["error"] = error_text(e)
    finally:
        sets = None
        free()
    return rec


def _torch_model(ctx, rule, kwargs, shapes, dtype, impl):
    torch = ctx.torch
    if torch is None or rule.torch is None:
        raise RuntimeError("torch with CUDA is not available")
    tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    ps = []
    for s in shapes:
        p = torch.randn(*s, device="cuda", dtype=tdt)
        p.grad = torch.randn_like(p)
        ps.append(p)
    kw = {k: v for k, v in kwargs.items() if k not in rule.torch_skip}
    if impl == "hwoptim-torch":
        import hwoptim.torch as hwoptim_torch
        opt = getattr(hwoptim_torch, rule.name)(ps, **kw)
    else:
        kw["fused" if impl == "torch-fused" else "foreach"] = True
        opt = getattr(torch.optim, rule.torch)(ps, **kw)
    opt.step()
    for p in ps:
        for v in opt.state[p].values():
            if torch.is_tensor(v) and v.numel() == p.numel() and v.numel() > 1:
                v.uniform_(0.5, 1.5)
    torch.cuda.synchronize()
    return opt


# Storage formats on the GPU (hwoptim.formats), Adam: CuPy has no bfloat16, so the 16-bit
# params and grads here are float16 (the same bytes; bfloat16 differs only in the bits the
# conversions keep)
FORMATS = [
    ("fp32", "float32", {}),
    ("fp16 p+g, fp32 state", "float16", {}),
    ("fp16 p+g, bf16 state", "float16", {"state_dtype": "bfloat16"}),
    ("fp32 master, fp16 p+g", "float16", {"master_weights": True}),
    ("fp16 p+g + SR, fp32 state", "float16", {"stochastic_rounding": True}),
    ("fp32, int8 state", "float32", {"state_dtype": "int8"}),
    ("fp16 p+g, int8 state", "float16", {"state_dtype": "int8"}),
    ("fp16 p+g + SR, int8 state", "float16", {"stochastic_rounding": True,
                                               "state_dtype": "int8"}),
]


def format_step(ctx, label, dtype, opts, n) -> dict:
    """One record: Adam at ``n`` elements in a storage format (params of ``dtype``, the
    optimizer options ``opts``) through ``opt.step``: its bytes per element (loads and
    stores, int8's absmax included), state bytes per element measured from the arrays."""
    from hwoptim.bench.formats import bytes_per_element as format_bytes
    cupy = ctx.cupy
    rec = {"device": ctx.name, "rule": "Adam", "format": label, "dtype": dtype, "n": int(n),
           "time_s": None, "bytes": None, "gbps": None, "state_bytes": None}
    rep = 8 if ctx.quick else 15
    try:
        def make():
            w = ctx.normal(n, "float32").astype(dtype)
            g = (ctx.normal(n, "float32") * 1e-2).astype(dtype)
            opt = hwoptim.Adam(w, lr=1e-3, **opts)
            opt.step(g)                          # state in its steady form
            return opt, g
        opt, g = make()
        plan = codegen.plan(opt.rule, opt._flags[0])
        per = format_bytes(plan, opt._format_of(opt._params[0]))
        rec["bytes"] = int(per * n)
        rec["state_bytes"] = sum(int(a.nbytes) for a in opt.state[0].values()) / n
        sets = [(opt, g)] + [make() for _ in range(n_sets_for(rec["bytes"], ctx.l2) - 1)]
        rec["time_s"] = time_steps(lambda i: sets[i][0].step(sets[i][1]), len(sets), 3, rep,
                                   ctx.timer)
        rec["gbps"] = rec["bytes"] / rec["time_s"] / 1e9
        cupy.cuda.get_current_stream().synchronize()
    except Exception as e:   # noqa: BLE001 - recorded, the run goes on
        rec["error"] = error_text(e)
    finally:
        sets = opt = g = None
        free()
    return rec


# Adafactor's factored matrices (the staged kernels): what each float32 element costs. The
# step must read p and g and write p (12 bytes); the staged schedule reads p twice and g
# three times (RMS(p) and both means of g² in one sweep, RMS(u) in a second read of g, then
# the store), 24 bytes: a floor of each, against the copy bandwidth
ADAFACTOR_BYTES = {"schedule": 24, "minimum": 12}


def adafactor_step(ctx, side: int, impl: str) -> dict:
    """One record: Adafactor on a ``side`` x ``side`` float32 matrix (factored), by
    ``impl``: ``hwoptim-cupy`` (the staged kernels) or ``torch`` (torch.optim.Adafactor,
    foreach)."""
    n = side * side
    rec = {"device": ctx.name, "rule": "Adafactor", "impl": impl, "shape": [side, side],
           "n": n, "time_s": None, "bytes": ADAFACTOR_BYTES["schedule"] * n}
    rep = 8 if ctx.quick else 15
    sets = []
    try:
        for _ in range(n_sets_for(rec["bytes"], ctx.l2)):
            if impl == "torch":
                torch = ctx.torch
                if torch is None:
                    raise RuntimeError("torch with CUDA is not available")
                p = torch.randn(side, side, device="cuda")
                p.grad = torch.randn_like(p) * 1e-2
                opt = torch.optim.Adafactor([p], foreach=True)
                opt.step()
                sets.append(opt)
            else:
                w = ctx.normal(n, "float32").reshape(side, side)
                g = (ctx.normal(n, "float32") * 1e-2).reshape(side, side)
                opt = hwoptim.Adafactor(w, backend="cupy")
                opt.step(g)
                sets.append((opt, g))
        if impl == "torch":
            ctx.torch.cuda.synchronize()
            rec["time_s"] = time_steps(lambda i: sets[i].step(), len(sets), 3, rep,
                                       torch_timer())
        else:
            rec["time_s"] = time_steps(lambda i: sets[i][0].step(sets[i][1]), len(sets), 3,
                                       rep, ctx.timer)
        rec["gbps"] = rec["bytes"] / rec["time_s"] / 1e9
    except Exception as e:   # noqa: BLE001 - recorded, the run goes on
        rec["error"] = error_text(e)
    finally:
        sets = None
        free()
    return rec
