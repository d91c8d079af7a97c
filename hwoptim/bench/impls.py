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


REAL_CASE = Case("AdamW", "default", {})
REAL_IMPLS = ("floor", "hwoptim-torch", "hwoptim-flat", "torch-fused", "torch-foreach")


def real_model_bytes(n: int, dtype: str = "float32") -> int:
    """Memory :func:`build_real_model` holds for ``n`` parameters: the shared param, grad and
    two state vectors, the floor's own param and state, hwoptim's flat optimizer's state
    until it is replaced (built before the floor), and a state-sized temporary of torch's
    foreach step."""
    return int(n) * np.dtype(dtype).itemsize * 8


def build_real_model(shapes, torch, rng, dtype: str = "float32"):
    """One AdamW step over a real model's parameter tensors, five ways, on shared memory.

    The params, grads and both state buffers live once, in flat vectors (a
    ``FlatParams`` buffer and two like it); every implementation steps that memory:

    * ``hwoptim-torch``: ``hwoptim.torch.AdamW`` (default backend) over the list of tensors
      (``torch.from_numpy`` views of the flat vectors), as a training script would use it;
    * ``torch-fused`` and ``torch-foreach``: ``torch.optim.AdamW(fused=True)`` and
      ``(foreach=True)`` over the same tensors;
    * ``hwoptim-flat``: ``hwoptim.AdamW`` over the flat vector (one launch per step: what
      hwoptim does with a ``FlatParams`` model);
    * ``floor``: the benchmark's floor kernel (the rule's reads and writes, one add per
      element) over a flat vector of the same size, with its own param and state (its adds
      would overflow the others' values) and the shared grad.

    Each optimizer gets the shared ``exp_avg`` and ``exp_avg_sq`` tensors as its state
    before its first step (torch's and hwoptim.torch's optimizers create state only where
    it is missing), so the three torch-facing implementations hold one copy of the model's
    memory, not three: GPT-2 small is ~2 GB, not ~6. They keep their own step counts.
    Sharing changes no timing: the same bytes are read and written, in the same places.

    Returns ``(fns, skipped, elements, bytes per step, tensors, sharing)``; ``sharing`` says
    whether every torch-facing optimizer really kept the shared buffers (checked after a
    first step)."""
    plan = plan_of(REAL_CASE)
    flat = hwoptim.FlatParams(shapes, dtype)
    rng.random(out=flat.params, dtype=flat.params.dtype)
    flat.params -= 0.5
    rng.random(out=flat.grads, dtype=flat.grads.dtype)
    flat.grads -= 0.5
    flat.grads *= 1e-2
    state = {"exp_avg": np.zeros(flat.size, dtype), "exp_avg_sq": np.zeros(flat.size, dtype)}
    views = {k: [v[o:o + int(np.prod(sh))].reshape(sh)
                 for o, sh in zip(flat.offsets, flat.shapes)] for k, v in state.items()}
    tensors = []
    for pv, gv in zip(flat.views, flat.grad_views):
        t = torch.from_numpy(pv)
        t.grad = torch.from_numpy(gv)
        tensors.append(t)
    n = int(sum(int(np.prod(s)) for s in shapes))
    fns, skipped, opts = {}, {}, {}

    def share(opt):
        for i, t in enumerate(tensors):
            opt.state[t].update({k: torch.from_numpy(v[i]) for k, v in views.items()})
        return opt

    try:
        import hwoptim.torch as ht
        opts["hwoptim-torch"] = share(ht.AdamW(tensors))
    except Exception as e:          # an import or construction failure: say so, go on
        skipped["hwoptim-torch"] = f"hwoptim.torch.AdamW failed: {type(e).__name__}: {e}"
    flat_opt = hwoptim.AdamW(flat.params)
    for k, v in state.items():      # its own zeros are dropped before the floor allocates
        flat_opt.state[0][k] = v
    _floor_step(plan, dtype, flat.params, flat.grads, flat.size, fns, skipped)
    for v in ("fused", "foreach"):
        try:
            opts[f"torch-{v}"] = share(torch.optim.AdamW(tensors, **{v: True}))
        except Exception as e:      # a torch without this variant
            skipped[f"torch-{v}"] = f"n/a in torch {torch.__version__}: {e}"
            continue
        # torch.optim creates a param's state only when it is empty: give it the step
        # count it would have made (a 0-d float32 tensor, fused or not)
        for t in tensors:
            opts[f"torch-{v}"].state[t].setdefault("step", torch.tensor(0.0,
                                                                        dtype=torch.float32))
    sharing = True
    for k, opt in list(opts.items()):   # a first step each; check that the state is shared
        try:
            opt.step()
        except Exception as e:
            skipped[k] = f"its first step failed: {type(e).__name__}: {e}"
            del opts[k]
            continue
        for i, t in enumerate(tensors):
            st = opt.state[t]
            if any(st[s].data_ptr() != views[s][i].ctypes.data for s in views):
                sharing = False
    for k in ("hwoptim-torch", "hwoptim-flat", "torch-fused", "torch-foreach"):
        if k == "hwoptim-flat":
            fns[k] = lambda o=flat_opt, g=flat.grads: o.step(g)
        elif k in opts:
            fns[k] = opts[k].step
    return fns, skipped, n, bytes_moved(plan, dtype, n), len(shapes), sharing
