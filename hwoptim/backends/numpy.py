"""The reference backend: the rule's ``update`` evaluated directly on NumPy arrays.

Simple and obviously correct, not fast: every intermediate is a temporary array.
"""
from types import SimpleNamespace

import numpy as np

from .. import formats
from ..formats import Format
from ..spec import host_scalars, resolve_hypers

FAMILY = "host"
STAGED = True      # runs staged rules (Adafactor's factored arrays) on their shapes


def unavailable():
    return None


def kernel(plan, dtype):
    """Runs ``rule.update`` itself (not the traced graph), so the reference checks codegen.

    Scalars stay Python floats: NumPy then does scalar-only arithmetic (``1 - beta2``) in
    float64, as the generated kernels do on the host."""
    rule, flags, names, outputs = plan.rule, plan.flags, plan.arrays, plan.outputs

    scaled = getattr(flags, "_clip", False)      # max_grad_norm's clip factor
    staged = plan.stages is not None              # Adafactor's factored arrays
    fmt = Format.parse(dtype)

    def run_format(arrays, k):
        """A storage format: every buffer loaded into the compute dtype, the rule's math,
        each output rounded into its storage (hwoptim.formats' conversions)."""
        bufs = dict(zip(fmt.arrays(names), arrays))
        if staged and bufs["param"].size == 0:      # (as run: nothing to update)
            return
        work = [bufs["master"] if (n == "param" and fmt.master) else
                formats.dequantize(bufs[n], bufs[f"{n}_absmax"]).reshape(shape_of(n, bufs))
                if (fmt.quantized and n not in ("param", "grad")) else
                bufs[n].astype(fmt.compute) for n in names]
        new = {}
        run([*work], k, out=new)
        for name in outputs:
            v, dst = new[name], bufs[name]
            if name == "param" and fmt.master:
                np.copyto(bufs["master"], v.reshape(bufs["master"].shape))
                dst[...] = formats.round_nearest(v, fmt.param).reshape(dst.shape)
            elif name == "param" and fmt.sr:
                bits = formats.element_bits(bufs["_srkey"][0], np.arange(v.size))
                dst[...] = formats.round_stochastic(v, fmt.param,
                                                    bits.reshape(v.shape)).reshape(dst.shape)
            elif fmt.quantized and name != "param":
                dst[...], bufs[f"{name}_absmax"][...] = formats.quantize(v)
            else:
                dst[...] = formats.round_nearest(v, fmt.storage(name)).reshape(dst.shape)

    def shape_of(name, bufs):
        """State ``name``'s shape (int8 codes are kept flat; a staged rule's states have
        shapes of their own: Adafactor's row and column factors)."""
        if not staged:
            return (-1,)
        state = next(s for s in rule.states if s.name == name)
        return state.shape_for(bufs["param"].shape)

    def run(arrays, k, out=None):
        if staged:                    # on the param's shape: the grad (given flat) too
            if arrays[0].size == 0:   # (a mean over no rows: no update, no NaN factors)
                return
            arrays = [a.reshape(arrays[0].shape) if a.size == arrays[0].size else a
                      for a in arrays]
        buf = dict(zip(names, arrays))
        if scaled:                    # clip_grad_norm_'s multiply, rounded in the dtype
            buf["grad"] = buf["grad"] * buf["grad"].dtype.type(getattr(k, "_clip"))
        # non-finite values propagate per element, as in the compiled kernels: no warnings,
        # and no FloatingPointError (under np.seterr(all="raise")) half-way through a step
        with np.errstate(all="ignore"):
            new = rule.update(SimpleNamespace(**buf), k, flags)
        if out is not None:           # (a format's run stores them itself)
            out.update({n: np.asarray(new[n], fmt.compute) for n in outputs})
            return
        for name in outputs:          # every value is computed before any buffer is written
            np.copyto(buf[name], new[name], casting="same_kind")
    def prepare(h, t):
        k = host_scalars(rule, resolve_hypers(rule, h, fmt.compute), t)
        if scaled:
            k["_clip"] = float(h["_clip"])
        return SimpleNamespace(**k)
    if not fmt.plain:
        run_format.prepare = prepare
        return run_format
    run.prepare = prepare
    return run


def full(like, value, shape=None):
    """An array of ``value`` like ``like`` (its shape, or ``shape``)."""
    return np.full(like.shape if shape is None else shape, value, dtype=like.dtype)


def to_host(a):
    return np.array(a, copy=True)


def copy_from_host(dst, src):
    np.copyto(dst, src)


def address(a):
    """(device, first byte, one past the last byte) of a contiguous array."""
    start = a.__array_interface__["data"][0]
    return ("host", start, start + a.nbytes)


def grad_stats(grads, sizes, dtype: str) -> tuple[float, bool]:
    """(sum of squares in float64, whether every element is finite) over the 1-D arrays
    ``grads``: the plain reference of what ``max_grad_norm`` and ``skip_nonfinite`` read."""
    total, finite = 0.0, True
    with np.errstate(all="ignore"):
        for g in grads:
            g = np.asarray(g, np.float64)
            total += float(np.dot(g, g))
            finite = finite and bool(np.isfinite(g).all())
    return total, finite
