"""What is timed on the CPU: one step callable per implementation, all on the same data.

The floor is ``"floor"`` (a generated kernel with the rule's own reads and writes and one
add per element); hwoptim's backends ``"hwoptim-<name>"`` (through ``opt.step(g)``);
PyTorch's CPU optimizers ``"torch-<variant>"``.
"""
from __future__ import annotations

import numpy as np

import hwoptim
from hwoptim import backends, codegen

from .workload import Case, bytes_moved, hypers_of, model_shapes, plan_of, rule_of

TORCH_VARIANTS = ("fused", "foreach", "forloop")


def torch_or_why():
    """``(torch, None)`` or ``(None, why not)``."""
    try:
        import torch
    except Exception as e:           # ImportError, or a broken install
        return None, f"torch not installed ({type(e).__name__}: {e})"
    return torch, None


def torch_step(torch, case: Case, variant: str, params: list, grads: list):
    """``opt.step`` of torch.optim's version of ``case`` over NumPy ``params`` (copied)
    with NumPy ``grads`` (shared); raises if torch lacks the rule or the variant."""
    rule = rule_of(case)
    if rule.torch is None:
        raise ValueError(f"torch has no {rule.name}")
    kw = hypers_of(case)
    kw.update({k: v for k, v in case.kwargs.items() if k in rule.options})
    kw = {k: v for k, v in kw.items() if k not in rule.torch_skip}
    kw.update({"fused": {"fused": True}, "foreach": {"foreach": True},
               "forloop": {"foreach": False}}[variant])
    tps = []
    for p, g in zip(params, grads):
        tp = torch.from_numpy(p.copy())
        tp.grad = torch.from_numpy(g)
        tps.append(tp)
    opt = getattr(torch.optim, rule.torch)(tps, **kw)
    opt._hwoptim_tensors = tps        # keep them alive with the optimizer
    return opt.step


def floor_kernel(plan, dtype):
    """The numba floor kernel for ``plan`` (None, why) if numba is not usable."""
    why = backends.unavailable("numba")
    if why is not None:
        return None, f"floor needs numba: {why}"
    return backends.load("numba").kernel(codegen.floor_plan(plan), dtype), None


def _floor_step(plan, dtype, params, grads, size, fns, skipped):
    """Add the floor over ``params`` (copied) and ``grads`` (shared) to ``fns``."""
    k, why = floor_kernel(plan, dtype)
    if k is None:
        skipped["floor"] = why
        return
    arrays = [params.copy(), grads] + [np.zeros(size, dtype) for _ in plan.arrays[2:]]
    fns["floor"] = lambda k=k, a=arrays: k(a, ())


def _torch_steps(case, variants, params, grads, fns, skipped, strict: bool):
    """Add torch's ``variants`` to ``fns``; ``strict``: a variant torch lacks raises."""
    torch, why = torch_or_why() if variants else (None, None)
    for v in variants:
        if torch is None:
            skipped[f"torch-{v}"] = why
            continue
        if strict:
            fns[f"torch-{v}"] = torch_step(torch, case, v, params, grads)
            continue
        try:
            fns[f"torch-{v}"] = torch_step(torch, case, v, params, grads)
        except Exception as e:     # no such rule or variant in this torch
            skipped[f"torch-{v}"] = f"n/a in torch {torch.__version__}: {e}"


def build(case: Case, dtype: str, n: int, host_backends, torch_variants, rng,
          numpy_max: int):
    """``({impl: step callable}, {impl: why skipped})`` for one case, dtype and size, all
    on the same initial data."""
    plan = plan_of(case)
    p0 = (rng.random(n, dtype=np.float64) - 0.5).astype(dtype)
    g = ((rng.random(n, dtype=np.float64) - 0.5) * 1e-2).astype(dtype)
    fns, skipped = {}, {}
    _floor_step(plan, dtype, p0, g, n, fns, skipped)
    cls = getattr(hwoptim, case.rule)
    for b in host_backends:
        if b == "numpy" and n > numpy_max:
            skipped[f"hwoptim-{b}"] = f"n > --numpy-max {numpy_max:.0e}"
            continue
        opt = cls(p0.copy(), **case.kwargs, backend=b)
        fns[f"hwoptim-{b}"] = lambda o=opt: o.step(g)
    _torch_steps(case, torch_variants, [p0], [g], fns, skipped, strict=False)
    return fns, skipped


def build_model(name: str, total: int, dtype: str, host_backends, torch_variants, rng):
    """Implementations over one model-like list: hwoptim flat (one vector), hwoptim per
    tensor (a list), torch over the list, and the floor over the flat vector.

    Returns ``(fns, skipped, elements, bytes per step, tensors)``."""
    case = Case("Adam", "default", {})
    plan = plan_of(case)
    shapes = model_shapes(total)
    inits = [(rng.random(s, dtype=np.float64) - 0.5).astype(dtype) for s in shapes]
    grads = [((rng.random(s, dtype=np.float64) - 0.5) * 1e-2).astype(dtype) for s in shapes]
    flat = hwoptim.FlatParams.from_arrays(inits)
    for v, gr in zip(flat.grad_views, grads):
        v[...] = gr
    n = int(sum(int(np.prod(s)) for s in shapes))
    fns, skipped = {}, {}
    _floor_step(plan, dtype, flat.params, flat.grads, flat.size, fns, skipped)
    for b in host_backends:
        if b != "numba":
            continue
        opt = hwoptim.Adam(flat.params, backend=b)
        fns[f"hwoptim-{b}-flat"] = lambda o=opt, g=flat.grads: o.step(g)
        opt2 = hwoptim.Adam([a.copy() for a in inits], backend=b)
        fns[f"hwoptim-{b}-per-tensor"] = lambda o=opt2: o.step(grads)
    _torch_steps(case, [v for v in torch_variants if v != "forloop"], inits, grads, fns,
                 skipped, strict=True)
    return fns, skipped, n, bytes_moved(plan, dtype, n), len(shapes)


def kernel_kinds(plan, dtype, n) -> dict:
    """Which numba kernel (serial or parallel) the rule and its floor run at ``n``."""
    if backends.unavailable("numba"):
        return {}
    nb = backends.load("numba")
    if not hasattr(nb, "serial_below"):
        return {}
    kind = lambda p: "serial" if n < nb.serial_below(p, dtype) else "parallel"  # noqa: E731
    return {"hwoptim-numba": kind(plan), "floor": kind(codegen.floor_plan(plan))}


def adam_step(n: int, rng):
    """An Adam float32 step over ``n`` elements, through the public API: a callable."""
    w = (rng.random(n, dtype=np.float64) - 0.5).astype(np.float32)
    g = ((rng.random(n, dtype=np.float64) - 0.5) * 1e-2).astype(np.float32)
    opt = hwoptim.Adam(w)
    return lambda: opt.step(g)
