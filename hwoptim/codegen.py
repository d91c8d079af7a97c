"""Print a rule's traced math as source code: Numba (Python) and C++ / CUDA.

Everything here is derived from ``rule.update`` and ``rule.scalars`` through
``hwoptim.spec``; no rule's math is written in this file.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace

import numpy as np

from .formats import Format
from .spec import (Expr, Rule, evaluate, resolve_hypers, substitute, trace_scalars,
                   trace_update, with_carry)

C_TYPES = {"float32": "float", "float64": "double"}
_C_FUNCS = {"sqrt": "sqrt", "abs": "fabs", "max": "fmax", "min": "fmin", "pow": "pow"}
_NB_FUNCS = {"sqrt": "np.sqrt", "abs": "np.abs", "max": "np.maximum", "min": "np.minimum"}
_CMP = {"lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_ARITH = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
# whole-array reductions: the reduction pass sums squares; "norm" takes their square root,
# "rms" divides by the array's size first
_REDUCTIONS = ("norm", "rms")


def schedule(outputs: dict) -> list:
    """Operation nodes reachable from ``outputs``, deduplicated, in evaluation order.

    Structurally equal subexpressions become one node (common-subexpression elimination),
    so a value the spec computes twice is computed once in every backend.
    """
    canon, order = {}, []

    def visit(e: Expr) -> Expr:
        if e.op in ("array", "scalar", "const"):
            key = (e.op, e.value)
            return canon.setdefault(key, e)
        args = tuple(visit(a) for a in e.args)
        key = (e.op, e.value, tuple(id(a) for a in args))
        if key not in canon:
            canon[key] = Expr(e.op, args, e.value)
            order.append(canon[key])
        return canon[key]

    roots = {name: visit(e) for name, e in outputs.items()}
    return order, roots


def _is_bool(e: Expr) -> bool:
    return e.op in _CMP


class _Namer:
    """Names for leaves and temporaries in printed code."""

    def __init__(self, const):
        self.names, self.const, self.n = {}, const, 0

    def __call__(self, e: Expr) -> str:
        if e.op == "array":
            return f"x_{e.value}"
        if e.op == "scalar":
            return f"k_{e.value}"
        if e.op in _REDUCTIONS:              # computed by the reduction pass: an argument
            return f"k__n{e.value}"
        if e.op == "const":
            return self.const(e.value)
        return self.names[id(e)]

    def new(self, e: Expr) -> str:
        name = f"t{self.n}"
        self.n += 1
        self.names[id(e)] = name
        return name


def _c_expr(e: Expr, nm: _Namer) -> str:
    a = [nm(x) for x in e.args]
    if e.op in _ARITH:
        return f"{a[0]} {_ARITH[e.op]} {a[1]}"
    if e.op in _CMP:
        return f"{a[0]} {_CMP[e.op]} {a[1]}"
    if e.op == "neg":
        return f"-{a[0]}"
    if e.op == "where":
        return f"{a[0]} ? {a[1]} : {a[2]}"
    if e.op in ("max", "min"):
        # NaN in either argument gives NaN, as numpy.maximum/minimum and the Numba kernels
        # do (fmax/fmin would drop it: AMSGrad's maximum would forget a NaN gradient)
        cmp = ">" if e.op == "max" else "<"
        return f"(({a[0]} != {a[0]} || {a[0]} {cmp} {a[1]}) ? {a[0]} : {a[1]})"
    return f"{_C_FUNCS[e.op]}({', '.join(a)})"


def _nb_expr(e: Expr, nm: _Namer) -> str:
    a = [nm(x) for x in e.args]
    if e.op in _ARITH:
        return f"{a[0]} {_ARITH[e.op]} {a[1]}"
    if e.op in _CMP:
        return f"{a[0]} {_CMP[e.op]} {a[1]}"
    if e.op == "neg":
        return f"-{a[0]}"
    if e.op == "where":
        return f"{a[1]} if {a[0]} else {a[2]}"
    if e.op == "pow":
        return f"{a[0]} ** {a[1]}"
    return f"{_NB_FUNCS[e.op]}({', '.join(a)})"


@dataclass(frozen=True)
class KernelPlan:
    """What every backend needs to know to run one rule with one set of flags."""
    rule: Rule
    flags: object               # SimpleNamespace of static bools
    arrays: tuple               # "param", "grad", states...
    outputs: tuple              # arrays the update writes (param first)
    scalars: tuple              # kernel scalar arguments, in order
    order: tuple                # scheduled operation nodes
    roots: dict                 # output name -> node
    derived: dict               # hoisted kernel scalar -> Expr over rule.scalars' outputs
    norms: tuple = ()           # per-array reductions: the Expr each 2-norm is taken of
    reduce_order: tuple = ()    # scheduled nodes the reduction pass evaluates
    norm_kinds: tuple = ()      # per norm: "norm" (sqrt of the sum of squares) or "rms"
    stages: object = None       # staged rules (ops.mean, shaped state): the Stages

    def norm_scale(self, sizes) -> np.ndarray:
        """float64 ``(len(sizes), len(norms))``: what each tensor's sums of squares are
        multiplied by before the square root (1, or 1/size for an RMS)."""
        sizes = np.asarray(sizes, np.float64).reshape(-1, 1)
        with np.errstate(divide="ignore"):
            inv = 1.0 / sizes
        return np.concatenate([inv if k == "rms" else np.ones_like(sizes)
                               for k in self.norm_kinds], axis=1) if self.norm_kinds else \
            np.ones((sizes.shape[0], 0))

    @property
    def norm_names(self) -> tuple:
        """The update's per-array scalar arguments computed by the reduction pass."""
        return tuple(f"_n{j}" for j in range(len(self.norms)))

    @property
    def all_scalars(self) -> tuple:
        """Every scalar argument of the element update: ``scalars``, then ``norm_names``."""
        return self.scalars + self.norm_names

    @cached_property
    def reduce_reads(self) -> tuple:
        """Arrays the reduction pass reads."""
        used = {a.value for e in self.reduce_order for a in e.args if a.op == "array"}
        used |= {e.value for e in self.norms if e.op == "array"}
        return tuple(n for n in self.arrays if n in used)

    def kernel_scalars(self, base: dict) -> list:
        """The kernel's scalar arguments, as float64 host numbers, from the per-step
        scalars ``base`` that ``rule.scalars`` returned (the slow, obvious way; kernels use
        ``host_scalar_function``, which tests check against this)."""
        return [float(evaluate(self.derived[n], base)) if n in self.derived else base[n]
                for n in self.scalars]

    @cached_property
    def key(self) -> str:
        """A short name that differs whenever the generated math differs."""
        text = repr((self.rule.name, sorted(vars(self.flags).items()), self.arrays,
                     self.scalars, [(n, _describe(e)) for n, e in self.roots.items()]))
        return f"{self.rule.name.lower()}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"

    @cached_property
    def reads(self) -> tuple:
        """Arrays whose values the math uses (the others are only written)."""
        used = {a.value for e in self.order for a in e.args if a.op == "array"}
        used |= {e.value for e in self.roots.values() if e.op == "array"}
        return tuple(n for n in self.arrays if n in used)


def _describe(e: Expr, memo=None) -> str:
    memo = {} if memo is None else memo
    if id(e) in memo:
        return memo[id(e)]
    if e.op in ("array", "scalar", "const"):
        s = f"{e.op}:{e.value!r}"
    else:
        s = f"{e.op}({','.join(_describe(a, memo) for a in e.args)})"
        if e.op == "mean":
            s += f"@{e.value}"
    memo[id(e)] = s
    return s


def _hoist(outputs: dict) -> tuple[dict, dict]:
    """Move every subexpression that depends on no array out of the element loop.

    ``1 - beta2`` written in a spec becomes a kernel argument computed on the host in
    float64: in float32 it would cost ~200 ulp through cancellation (0.999f), and it
    would be recomputed per element.
    """
    derived, names, memo = {}, {}, {}

    def uniform(e):
        if id(e) not in memo:
            memo[id(e)] = e.op != "array" and all(uniform(a) for a in e.args)
        return memo[id(e)]

    def visit(e):
        if e.op in ("array", "scalar", "const"):
            return e
        if uniform(e):
            key = _describe(e)
            if key not in names:
                names[key] = f"u{len(names)}"
                derived[names[key]] = e
            return Expr("scalar", value=names[key])
        return Expr(e.op, tuple(visit(a) for a in e.args), e.value)

    return {n: visit(e) for n, e in outputs.items()}, derived


def _reach(starts, through_norm: bool) -> set:
    """ids of the operation nodes ``starts`` depend on (a norm node's argument only where
    ``through_norm``)."""
    seen, stack = set(), list(starts)
    while stack:
        e = stack.pop()
        if id(e) in seen or e.op in ("array", "scalar", "const"):
            continue
        seen.add(id(e))
        if e.op not in _REDUCTIONS or through_norm:
            stack.extend(e.args)
    return seen


def plan(rule: Rule, flags) -> KernelPlan:
    """Trace ``rule`` with ``flags`` into what the backends print. A rule using ``ops.norm``
    gets two passes: the reduction (``reduce_order``: the norms' arguments, from the step's
    inputs) and the update (``order``), where each norm is a scalar argument."""
    outputs, arrays, base = trace_update(rule, flags)
    if "param" not in outputs:
        raise ValueError(f"rule {rule.name} does not update param")
    outputs, derived = _hoist(outputs)
    order, roots = schedule(outputs)
    if any(e.op == "mean" for e in order) or any(
            getattr(s, "shape", None) for s in rule.active_states(flags)):
        return staged_plan(rule, flags, outputs, arrays, base, derived, order, roots)
    norms = [e for e in order if e.op in _REDUCTIONS]
    for j, e in enumerate(norms):
        e.value = j
    update_ids = _reach(roots.values(), through_norm=False)
    reduce_ids = _reach([e.args[0] for e in norms], through_norm=True)
    if any(id(e) in reduce_ids for e in norms):
        raise ValueError(f"rule {rule.name} takes a norm of an expression with a norm in it; "
                         f"the reduction pass computes norms of the step's inputs only")
    reduce_order = tuple(e for e in order if id(e) in reduce_ids)
    order = [e for e in order if id(e) in update_ids and e.op not in _REDUCTIONS]
    used = {a.value for e in (*order, *reduce_order) for a in e.args if a.op == "scalar"}
    used |= {e.value for e in (*roots.values(), *(n.args[0] for n in norms))
             if e.op == "scalar"}
    scalars = tuple(n for n in base if n in used) + tuple(derived)
    return KernelPlan(rule, flags, arrays, tuple(outputs), scalars, tuple(order), roots,
                      derived, tuple(e.args[0] for e in norms), reduce_order,
                      tuple(e.op for e in norms))


# ----------------------------------------------------------------------------- Numba

def _numba_namer() -> tuple:
    """(constants, namer) for printing Numba code: each distinct constant gets a name
    (``_K0``, ...) in ``constants`` (value -> name), defined by :func:`_typed_constants`."""
    consts = {}

    def const(v):
        if v not in consts:
            consts[v] = f"_K{len(consts)}"
        return consts[v]

    return consts, _Namer(const)


def _numba_element(p: KernelPlan, dtype: str, index: str = "i") -> tuple[list, list]:
    """(typed constant definitions, per-element statements) of ``p`` for the Numba kernels:
    the statements update element ``i`` of arrays named as in ``p.arrays`` (and
    ``Format.extras``), with the kernel scalars in ``k_<name>``. Every Numba kernel (one
    array, many arrays) prints these. ``dtype``: the compute dtype, or a format's key
    (:mod:`hwoptim.formats`): 16-bit buffers are ``uint16`` arrays of their bits, loaded
    into float32 and rounded back (``index``: the element's index in its tensor, which
    stochastic rounding draws its bits from)."""
    fmt = Format.parse(dtype)
    consts, nm = _numba_namer()
    lines = [f"{nm.new(e)} = {_nb_expr(e, nm)}" for e in p.order]
    loads = [_nb_load_line(p, fmt, a) for a in p.reads]
    stores = []
    for o in p.outputs:
        v = nm(p.roots[o])
        if fmt.quantized and o not in ("param", "grad"):   # encoded with the block's scale
            j = p.arrays.index(o) - 2
            stores.append(f"{o}[i] = _q_code({v}, _pre{j}, _inv{j}, _u{j})")
        elif o == "param" and fmt.master:
            stores += [f"master[i] = {v}", f"param[i] = {_nb_store(fmt, 'param', v)}"]
        elif o == "param" and fmt.sr:
            stores.append(f"param[i] = {_nb_sr(fmt, v, index)}")
        else:
            stores.append(f"{o}[i] = {_nb_store(fmt, o, v)}")
    defs = _typed_constants(consts, fmt.compute)
    if not fmt.plain:
        defs = _NB_FORMAT_HELPERS.splitlines() + [""] + defs
    return defs, loads + lines + stores


def _nb_load_line(p: KernelPlan, fmt: Format, a: str, absmax: str = "block") -> str:
    """``x_<a> = ...``: buffer ``a``'s element ``i`` in the compute dtype (an int8 state:
    decoded with its block's absmax, ``_s<j>`` hoisted per block, or ``absmax="element"``:
    read per element)."""
    if a == "param" and fmt.master:
        return "x_param = master[i]"
    if fmt.quantized and a not in ("param", "grad"):
        j = p.arrays.index(a) - 2
        s = f"_s{j}" if absmax == "block" else f"{a}_absmax[i >> 8]"
        return f"x_{a} = _q_load({a}[i], {s})"
    return f"x_{a} = {_nb_load(fmt, a, f'{a}[i]')}"


def _nb_blocks(p: KernelPlan, body: list, rng: str) -> list:
    """The int8-state loop (``rng``: "prange" or "range") over blocks of 256 elements
    (``_n`` of them from ``i = 0``), two passes per block. The first evaluates only what
    the new states need (the statements their outputs reach: for Adam the two moments, no
    square root or divide), keeps each new state in a 256-float scratch array ``_q<j>``
    (allocated by the caller) and reduces it to its absmax (the largest bit pattern of a
    finite |x|: non-negative floats order as integers, int32 lanes) and whether it has a
    negative value; :func:`_q_scale` turns those into the map and scale; the second runs
    the rest of the update, reading the new states back (their decoding and math are not
    repeated), and stores each state's code directly. Both are plain loops that LLVM
    vectorises; the block's buffers stay in L1 between them."""
    qs = [a for a in p.arrays[2:] if a in p.outputs]
    need = _reach([p.roots[a] for a in qs], through_norm=False)
    temps = {f"t{k}" for k in range(len(p.order))}
    # the loads (LLVM drops those the states do not use), then the states' statements
    first = [ln for ln in body if ln.startswith("x_")]
    first += [ln for ln in body if ln.split(" = ")[0] in temps and _stmt_id(p, ln) in need]
    block = ["_bl = _b << 8",
             "_m = min(256, _n - _bl)"]
    block += [f"_s{j} = {a}_absmax[_b]" for j, a in enumerate(p.arrays[2:])]
    block += [f"_A{j} = _Z32" for j, a in enumerate(p.arrays[2:]) if a in qs]
    block += [f"_N{j} = False" for j, a in enumerate(p.arrays[2:]) if a in qs]
    block += ["for _j in range(_m):", "    i = _bl + _j"] + [f"    {ln}" for ln in first]
    second = list(body)
    for j, a in enumerate(p.arrays[2:]):
        if a in qs:
            v = _stored_value(body, a)
            block += [f"    _q{j}[_j] = {v}",
                      f"    _A{j} = max(_A{j}, _abs_bits({v}))",
                      f"    _N{j} = _N{j} | ({v} < 0)"]
            if v in temps:          # the second pass reads it back (LLVM drops the rest)
                second = [f"{v} = _q{j}[_j]" if ln.startswith(f"{v} = ") else ln
                          for ln in second]
    for j, a in enumerate(p.arrays[2:]):
        if a in qs:
            block.append(f"_pre{j}, _inv{j}, _u{j}, _a{j} = _q_scale(np.uint64(_A{j}), _N{j})")
    block += ["for _j in range(_m):", "    i = _bl + _j"] + [f"    {ln}" for ln in second]
    block += [f"{a}_absmax[_b] = _a{j}" for j, a in enumerate(p.arrays[2:]) if a in qs]
    return [f"for _b in {rng}((_n + 255) >> 8):"] + [f"    {ln}" for ln in block]


def _stmt_id(p: KernelPlan, line: str):
    """id of the scheduled node a body statement ``t<k> = ...`` defines."""
    return id(p.order[int(line.split(" = ")[0][1:])])


def _stored_value(body: list, a: str) -> str:
    """The value the element statements ``body`` encode into int8 state ``a``."""
    head = f"{a}[i] = _q_code("
    line = next(ln for ln in body if ln.startswith(head))
    return line[len(head):].split(", _pre")[0]


def _nb_load(fmt: Format, a: str, ref: str) -> str:
    st = fmt.storage(a)
    return {"bfloat16": f"_bf_load({ref})", "float16": f"_h_load({ref})"}.get(st, ref)


def _nb_store(fmt: Format, a: str, v: str) -> str:
    st = fmt.storage(a)
    return {"bfloat16": f"_bf_round({v})", "float16": f"_h_round({v})"}.get(st, v)


def _nb_sr(fmt: Format, v: str, index: str) -> str:
    f = "_bf_sr" if fmt.param == "bfloat16" else "_h_sr"
    return f"{f}({v}, _mix32(np.uint64({index}) ^ _kh))"


def _nb_array_type(fmt: Format, a: str) -> str:
    """The Numba element type of buffer ``a``'s array (16-bit buffers: ``uint16``)."""
    st = fmt.storage(a)
    return "uint16" if st in ("bfloat16", "float16") else st


# Conversions between float32 and 16-bit storage, and the stochastic-rounding bits, as
# Numba code: the same operations as hwoptim.formats' NumPy reference, bit for bit. Integer
# work is uint64 with typed constants (Numba widens uint32 arithmetic); float16 goes through
# LLVM's half type (one vcvtph2ps / vcvtps2ph with F16C).
_NB_FORMAT_HELPERS = '''\
from llvmlite import ir as _ir
_U16 = np.uint64(16)
_U23 = np.uint64(23)
_U32 = np.uint64(32)
_M24 = np.uint64(0xFFFFFF)
_SIGN = np.uint64(0x80000000)
_INF = np.uint64(0x7F800000)
_ONE = np.uint64(1)
_TWO24 = np.float32(2.0 ** 24)
_TWOM24 = np.float32(2.0 ** -24)
_SMALL = np.uint64(0x03800000)         # the bits of 2**-120 (absmax below: prescaled)
_Z32 = np.int32(0)


def _i32(builder, v):
    if v.type.width > 32:
        return builder.trunc(v, _ir.IntType(32))
    return builder.zext(v, _ir.IntType(32)) if v.type.width < 32 else v


def _c32(v):
    return _ir.Constant(_ir.IntType(32), v)


@intrinsic
def _f32_of(typingctx, u):
    \"\"\"float32 with the low 32 bits of integer ``u``.\"\"\"
    def lower(context, builder, sig, args):
        return builder.bitcast(_i32(builder, args[0]), _ir.FloatType())
    return types.float32(u), lower


@intrinsic
def _bits_of(typingctx, x):
    \"\"\"The bits of float32 ``x`` as a uint64.\"\"\"
    def lower(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], _ir.IntType(32)), _ir.IntType(64))
    return types.uint64(types.float32), lower


@intrinsic
def _mix32(typingctx, x):
    \"\"\"hwoptim.formats.mix32 of the low 32 bits of ``x``, in 32-bit integer operations.\"\"\"
    def lower(context, builder, sig, args):
        v = _i32(builder, args[0])
        v = builder.xor(v, builder.lshr(v, _c32(16)))
        v = builder.mul(v, _c32(0x7FEB352D))
        v = builder.xor(v, builder.lshr(v, _c32(15)))
        v = builder.mul(v, _c32(0x846CA68B))
        v = builder.xor(v, builder.lshr(v, _c32(16)))
        return builder.zext(v, _ir.IntType(64))
    return types.uint64(x), lower


@intrinsic
def _h_load(typingctx, u):
    \"\"\"float16 bits (uint16) as float32.\"\"\"
    def lower(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], _ir.HalfType()), _ir.FloatType())
    return types.float32(types.uint16), lower


@intrinsic
def _h_round(typingctx, x):
    \"\"\"float32 ``x`` rounded to nearest float16, as its bits.\"\"\"
    def lower(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], _ir.HalfType()), _ir.IntType(16))
    return types.uint16(types.float32), lower


@intrinsic
def _bf_load(typingctx, u):
    \"\"\"bfloat16 bits (uint16) as float32.\"\"\"
    def lower(context, builder, sig, args):
        v = builder.shl(builder.zext(args[0], _ir.IntType(32)), _c32(16))
        return builder.bitcast(v, _ir.FloatType())
    return types.float32(types.uint16), lower


def _bf_nearest(builder, b):
    \"\"\"i32 bits ``b`` of a float32 -> i16 bits of its bfloat16, to nearest (ties to even);
    NaN: the sign and 0x7FC0, as ml_dtypes.\"\"\"
    top = builder.lshr(b, _c32(16))
    r = builder.lshr(builder.add(builder.add(b, _c32(0x7FFF)),
                                 builder.and_(top, _c32(1))), _c32(16))
    nan = builder.icmp_unsigned(">", builder.and_(b, _c32(0x7FFFFFFF)), _c32(0x7F800000))
    q = builder.or_(builder.and_(top, _c32(0x8000)), _c32(0x7FC0))
    return builder.trunc(builder.select(nan, q, r), _ir.IntType(16))


@intrinsic
def _bf_round(typingctx, x):
    \"\"\"float32 ``x`` rounded to nearest bfloat16, as its bits.\"\"\"
    def lower(context, builder, sig, args):
        return _bf_nearest(builder, builder.bitcast(args[0], _ir.IntType(32)))
    return types.uint16(types.float32), lower


@intrinsic
def _bf_sr(typingctx, x, r):
    \"\"\"float32 ``x`` rounded stochastically to bfloat16 with the random bits ``r`` (the
    low 16 are used), as its bits; NaN, infinities and a rounding up to infinity take the
    round-to-nearest result.\"\"\"
    def lower(context, builder, sig, args):
        b = builder.bitcast(args[0], _ir.IntType(32))
        s = builder.and_(b, _c32(0x80000000))
        a = builder.xor(b, s)
        up = builder.lshr(builder.add(a, builder.and_(_i32(builder, args[1]), _c32(0xFFFF))),
                          _c32(16))
        special = builder.or_(builder.icmp_unsigned(">=", a, _c32(0x7F800000)),
                              builder.icmp_unsigned(">=", up, _c32(0x7F80)))
        sr = builder.trunc(builder.or_(up, builder.lshr(s, _c32(16))), _ir.IntType(16))
        return builder.select(special, _bf_nearest(builder, b), sr)
    return types.uint16(types.float32, r), lower


def _q_special(builder, u):
    """(top code, top - 1) of the map ``u`` (i1: unsigned) as i32."""
    return (builder.select(u, _c32(0xFF), _c32(0x7F)),
            builder.select(u, _c32(0xFE), _c32(0x7E)))


@intrinsic
def _q_load(typingctx, c, a):
    """An int8 state's code ``c`` decoded with its block's absmax ``a`` (negative: the
    unsigned map), as hwoptim.formats.dequantize: the code's magnitude bits placed where a
    float32 keeps its exponent and mantissa (the signed map's sign in the sign bit) give
    2^(e-127)(1 + m/8), or m 2^-129 for e = 0, so times 2^112 (signed, bias 15) or 2^96
    (unsigned, bias 31) it is the map's value exactly; one rounding, times |a|. Selects
    only (vectorises)."""
    def lower(context, builder, sig, args):
        f32 = _ir.FloatType()
        cc = builder.zext(args[0], _ir.IntType(32))
        ab = builder.bitcast(args[1], _ir.IntType(32))
        u = builder.icmp_unsigned("!=", builder.lshr(ab, _c32(31)), _c32(0))
        signed = builder.or_(builder.shl(builder.and_(cc, _c32(0x80)), _c32(24)),
                             builder.shl(builder.and_(cc, _c32(0x7F)), _c32(20)))
        bits = builder.select(u, builder.shl(cc, _c32(20)), signed)
        scale = builder.select(u, _ir.Constant(f32, 2.0 ** 96), _ir.Constant(f32, 2.0 ** 112))
        aa = builder.bitcast(builder.and_(ab, _c32(0x7FFFFFFF)), f32)
        res = builder.fmul(builder.fmul(builder.bitcast(bits, f32), scale), aa)
        mag = builder.select(u, cc, builder.and_(cc, _c32(0x7F)))
        neg = builder.and_(builder.not_(u), builder.icmp_unsigned(">=", cc, _c32(0x80)))
        top, inf_code = _q_special(builder, u)
        inf = builder.select(neg, _ir.Constant(f32, float("-inf")), _ir.Constant(f32, float("inf")))
        res = builder.select(builder.icmp_unsigned("==", mag, inf_code), inf, res)
        return builder.select(builder.icmp_unsigned("==", mag, top),
                              _ir.Constant(f32, float("nan")), res)
    return types.float32(types.uint8, types.float32), lower


@intrinsic
def _q_code(typingctx, v, pre, inv, u):
    """The code of ``v`` in a block with absmax A: ``(v * pre) * inv``, ``inv = 1 / (A *
    pre)`` (``pre``: 2**64 for a subnormal A, else 1), in map ``u`` (unsigned), as
    hwoptim.formats.quantize; selects only (vectorises)."""
    def lower(context, builder, sig, args):
        f32, i32 = _ir.FloatType(), _ir.IntType(32)
        x, inv = args[0], args[2]
        u = builder.icmp_unsigned("!=", args[3], _ir.Constant(args[3].type, 0))
        vb = builder.bitcast(x, i32)
        va = builder.and_(vb, _c32(0x7FFFFFFF))
        isnan = builder.icmp_unsigned(">", va, _c32(0x7F800000))
        isinf = builder.icmp_unsigned("==", va, _c32(0x7F800000))
        sign = builder.select(builder.or_(u, isnan), _c32(0),
                              builder.shl(builder.lshr(vb, _c32(31)), _c32(7)))
        bias = builder.select(u, _c32(31), _c32(15))
        y = builder.fmul(builder.fmul(x, args[1]), inv)
        a = builder.bitcast(builder.and_(builder.bitcast(y, i32), _c32(0x7FFFFFFF)), f32)
        E = builder.sub(builder.lshr(builder.bitcast(a, i32), _c32(23)), _c32(127))
        e = builder.add(E, bias)
        e = builder.select(builder.icmp_signed("<", e, _c32(1)), _c32(1), e)
        scale = builder.bitcast(builder.shl(builder.sub(builder.add(bias, _c32(130)), e),
                                            _c32(23)), f32)
        rint = builder.module.declare_intrinsic("llvm.rint", [f32])
        k = builder.fptosi(builder.call(rint, [builder.fmul(a, scale)]), i32)
        mag = builder.add(builder.mul(builder.sub(e, _c32(1)), _c32(8)), k)
        top, inf_code = _q_special(builder, u)
        mag = builder.select(isinf, inf_code, mag)
        mag = builder.select(isnan, top, mag)
        return builder.trunc(builder.or_(mag, sign), _ir.IntType(8))
    return types.uint8(types.float32, types.float32, types.float32, types.boolean), lower


@intrinsic
def _abs_bits(typingctx, x):
    """The bits of float32 |x| where x is finite, else 0, as an int32 (non-negative floats
    order as integers; a 32-bit max vectorises where a 64-bit one does not)."""
    def lower(context, builder, sig, args):
        b = builder.and_(builder.bitcast(args[0], _ir.IntType(32)), _c32(0x7FFFFFFF))
        return builder.select(builder.icmp_unsigned("<", b, _c32(0x7F800000)), b, _c32(0))
    return types.int32(types.float32), lower


@njit(inline="always")
def _q_scale(A, neg):
    """(pre, inv, unsigned?, stored absmax) of a block whose largest finite |x| has the
    bits ``A`` and which holds a negative value where ``neg``: codes are
    ``_q_code(x, pre, inv, unsigned)``, as hwoptim.formats.quantize."""
    Af = _f32_of(A)
    pre = np.float32(2.0 ** 64) if A < _SMALL else np.float32(1.0)
    inv = np.float32(1.0) / (Af * pre) if A > 0 else np.float32(0.0)
    u = not neg
    return pre, inv, u, (-Af if u else Af)


@njit(inline="always")
def _h_sr(x, r):
    b = _bits_of(x)
    s = b & _SIGN
    a = b ^ s
    if a >= _INF:
        return _h_round(x)
    e = np.int64(a >> _U23)
    if e < 103:
        t = _TWOM24 if np.float32(r & _M24) * _TWOM24 < np.abs(x) * _TWO24 else np.float32(0.0)
        y = -t if s != 0 else t
    else:
        drop = np.uint64(13 if e >= 113 else 126 - e)
        mask = (_ONE << drop) - _ONE
        y = _f32_of(((a + (r & mask)) & ~mask) | s)
    out = _h_round(y)
    if (out & np.uint16(0x7FFF)) == np.uint16(0x7C00):
        return _h_round(x)
    return out
'''


def _nb_at_lines(p: KernelPlan, fmt: Format, names, doc: bool = True) -> list:
    """``_at`` (plain formats: one element type) or ``_at_<type>`` per element type of
    ``names``: an int64 address as a typed pointer (unchecked)."""
    types_ = sorted({_nb_array_type(fmt, a) for a in names}) if not fmt.plain \
        else [fmt.compute]
    out = []
    for t in types_:
        name = "_at" if fmt.plain else f"_at_{t}"
        out += ["@intrinsic",
                f"def {name}(typingctx, address):",
                *([f'    """An int64 address as a {t} pointer (unchecked)."""'] if doc else []),
                "    def lower(context, builder, sig, args):",
                "        return builder.inttoptr(args[0], context.get_value_type("
                "sig.return_type))",
                f"    return types.CPointer(types.{t})(types.int64), lower", ""]
    return out[:-1] + ([""] if doc else [""])


def _nb_chunk_array(fmt: Format, a: str, j: int) -> str:
    """The statement that makes chunk ``_c``'s array of buffer ``a`` (column ``j`` of the
    pointer table); the stochastic-rounding key is one number per tensor."""
    if fmt.plain:
        return f"{a} = carray(_at(_ptrs[_t, {j}] + _lo * {np.dtype(fmt.compute).itemsize}), _n)"
    t = _nb_array_type(fmt, a)
    if a.endswith("_absmax"):              # a block's scale: blocks from the chunk's start
        return (f"{a} = carray(_at_{t}(_ptrs[_t, {j}] + (_lo >> 8) * 4), "
                f"(_n + 255) >> 8)")
    if a == "_srkey":
        # (a chunk never crosses a multiple of 2**32: the high word is the chunk's)
        return (f"_kh = np.uint64(carray(_at_{t}(_ptrs[_t, {j}]), 1)[0]) ^ "
                f"_mix32(np.uint64(_lo) >> np.uint64(32))")
    return f"{a} = carray(_at_{t}(_ptrs[_t, {j}] + _lo * {np.dtype(t).itemsize}), _n)"


def _typed_constants(consts: dict, dtype: str) -> list:
    """Module-level definitions of a kernel's constants (value -> name), typed: a bare
    Python literal would promote float32 math to float64."""
    return [f"{name} = np.{dtype}({v!r})" for v, name in consts.items()]


def _njit_line(par: bool, cache: bool) -> str:
    return f"@njit(parallel={par}, cache={bool(cache)}, error_model='numpy', nogil=True)"


def numba_source(p: KernelPlan, dtype: str, cache: bool = True) -> str:
    """A Python module with two Numba kernels over 1-D arrays: ``parallel`` (prange) and
    ``serial``. Arguments: the arrays in ``p.arrays`` order, then ``p.scalars``.
    ``cache``: whether Numba keeps their machine code on disk, beside the module's file."""
    fmt = Format.parse(dtype)
    consts, body = _numba_element(p, dtype)
    args = ", ".join(list(fmt.arrays(p.arrays)) + [f"k_{s}" for s in p.all_scalars])
    head = [f"# Generated by hwoptim from the {p.rule.name} spec "
            f"({', '.join(f'{k}={v}' for k, v in sorted(vars(p.flags).items()))}), {dtype}.",
            "# Edit the spec in hwoptim/rules, not this file.",
            "import numpy as np",
            "from numba import njit, prange" + ("" if fmt.plain else ", types"),
            *([] if fmt.plain else ["from numba.extending import intrinsic"]), ""]
    out = head + consts + [""]
    if fmt.quantized:
        return "\n".join(out + _numba_blocked_kernels(p, fmt, args, cache)) + "\n"
    for fname, par, rng in (("parallel", True, "prange"), ("serial", False, "range")):
        out += [_njit_line(par, cache), f"def {fname}({args}):"]
        if fmt.sr:      # elements below 2**32 (the index's high word mixes in as 0; the
            # backend runs larger arrays through the multi-tensor kernel, chunk by chunk)
            out.append("    _kh = np.uint64(_srkey[0])")
        out.append(f"    for i in {rng}(param.shape[0]):")
        out += [f"        {line}" for line in body]
        out.append("")
    return "\n".join(out) + "\n"


def _numba_blocked_kernels(p: KernelPlan, fmt: Format, args: str, cache: bool) -> list:
    """int8 state's one-array kernels: ``_blocks(_off, ...)`` runs the blocks of its
    arrays in order (``_off``: the index of their first element, which stochastic rounding
    draws its bits from); ``serial`` is ``_blocks`` over everything, ``parallel`` a prange
    over up to 256 runs of whole blocks, each ``_blocks`` on slices (a prange over the blocks
    themselves compiled to code 5x slower than the serial loop)."""
    names = [a for a in fmt.arrays(p.arrays) if a != "_srkey"]
    scal = [f"k_{s}" for s in p.all_scalars]
    out = _nb_blocks_function(p, fmt, cache)
    key = "np.uint64(_srkey[0])" if fmt.sr else "np.uint64(0)"
    out += ["", _njit_line(False, cache), f"def serial({args}):",
            f"    _blocks(0, {key}, {', '.join(names + scal)})", ""]
    sliced = [f"{a}[_b0:_b1]" if a.endswith("_absmax") else f"{a}[_lo:_hi]" for a in names]
    out += [_njit_line(True, cache), f"def parallel({args}):",
            "    _nb = (param.shape[0] + 255) >> 8",
            "    _nc = min(_nb, 256)",
            "    for _c in prange(_nc):",
            "        _b0 = _c * _nb // _nc",
            "        _b1 = (_c + 1) * _nb // _nc",
            "        _lo = _b0 << 8",
            "        _hi = min(param.shape[0], _b1 << 8)",
            f"        _blocks(_lo, {key}, {', '.join(sliced + scal)})", ""]
    return out


def _nb_blocks_function(p: KernelPlan, fmt: Format, cache: bool) -> list:
    """``_blocks(_off, _kh, arrays..., scalars...)``: int8 state's blocks of the arrays in
    order, two passes each (:func:`_nb_blocks`); ``_off``: the tensor index of their first
    element, ``_kh``: the stochastic-rounding key with that index's high word mixed in."""
    _, body = _numba_element(p, fmt.key, index="_off + i")
    names = [a for a in fmt.arrays(p.arrays) if a != "_srkey"]
    args = ", ".join(names + [f"k_{s}" for s in p.all_scalars])
    out = [_njit_line(False, cache), f"def _blocks(_off, _kh, {args}):",
           "    _n = param.shape[0]"]
    out += [f"    _q{j} = np.empty(256, np.float32)"            # the new states' scratch
            for j, a in enumerate(p.arrays[2:]) if a in p.outputs]
    return out + [f"    {line}" for line in _nb_blocks(p, body, "range")]


def numba_multi_source(p: KernelPlan, dtype: str, cache: bool = True) -> str:
    """A Python module with two Numba multi-tensor kernels, ``parallel`` (prange over
    chunks) and ``serial``, each updating many separate arrays in one call.

    Arguments: ``ptrs`` (int64, tensors x ``len(p.arrays)``: each tensor's buffer
    addresses in ``p.arrays`` order), ``chunks`` (int64, chunks x 3: tensor, start, stop;
    :func:`chunk_table`), ``groups`` (int64: the chunks of group ``g`` are rows
    ``groups[g]:groups[g+1]``, :func:`chunk_groups`; the prange runs over groups, which
    hold about equal work), ``rows`` (int64, per tensor: its row of ``scalars``) and
    ``scalars`` (``dtype``, rows x ``len(p.scalars)``). A chunk's arrays are built from the
    addresses (``_at``: an int64 address as a typed pointer, then ``numba.carray``) and
    updated by the very statements :func:`numba_source` prints, so every element gets the
    same arithmetic as the one-array kernels: bit-identical results."""
    fmt = Format.parse(dtype)
    consts, body = _numba_element(p, dtype, index="_lo + i")
    head = [f"# Generated by hwoptim from the {p.rule.name} spec ({_flag_text(p)}), {dtype}: "
            f"multi-tensor kernels.",
            "# Edit the spec in hwoptim/rules, not this file.",
            "import numpy as np",
            "from numba import carray, njit, prange, types",
            "from numba.extending import intrinsic", ""]
    names = list(fmt.arrays(p.arrays))
    out = head + consts + ([""] if consts else []) + [""] + _nb_at_lines(p, fmt, names) + [""]
    if fmt.quantized:
        out += _nb_blocks_function(p, fmt, cache) + ["", ""]
    per_chunk = ["_t = _chunks[_c, 0]",
                 "_lo = _chunks[_c, 1]",
                 "_n = _chunks[_c, 2] - _lo",
                 "_r = _rows[_t]"]
    per_chunk += [f"k_{s} = _scalars[_r, {j}]" for j, s in enumerate(p.all_scalars)]
    per_chunk += [_nb_chunk_array(fmt, a, j) for j, a in enumerate(names)]
    for fname, par, rng in (("parallel", True, "prange"), ("serial", False, "range")):
        out += [_njit_line(par, cache),
                f"def {fname}(_ptrs, _chunks, _groups, _rows, _scalars):",
                "    for _j in range(_rows.shape[0]):",
                "        if _rows[_j] < 0 or _rows[_j] >= _scalars.shape[0]:",
                "            raise IndexError('hwoptim: a row index is not a row of scalars')",
                f"    for _g in {rng}(_groups.shape[0] - 1):",
                "        for _c in range(_groups[_g], _groups[_g + 1]):"]
        out += [f"            {line}" for line in per_chunk]
        if fmt.quantized:        # (chunks start at multiples of 16384: whole blocks)
            args = [a for a in names if a != "_srkey"] + [f"k_{s}" for s in p.all_scalars]
            out.append(f"            _blocks(_lo, {'_kh' if fmt.sr else 'np.uint64(0)'}, "
                       f"{', '.join(args)})")
        else:
            out.append("            for i in range(_n):")
            out += [f"                {line}" for line in body]
        out.append("")
    return "\n".join(out) + "\n"


def numba_reduce_source(p: KernelPlan, dtype: str, cache: bool = True) -> str:
    """A Python module with ``parallel`` and ``serial`` Numba kernels for the reduction pass of
    a rule that takes norms (``p.norms``): per chunk of many arrays, the float64 sum of
    squares of each norm's argument, evaluated from the step's inputs by the statements the
    update prints (in ``dtype``). ``f(ptrs, chunks, rows, scalars, out)``: as the
    multi-tensor kernels' (``numba_multi_source``), with ``scalars`` the rows of
    ``p.scalars`` and ``out`` float64, chunks x ``len(p.norms)``."""
    fmt = Format.parse(dtype)
    consts, nm = _numba_namer()
    body = [_nb_load_line(p, fmt, a, absmax="element") for a in p.reduce_reads]
    body += [f"{nm.new(e)} = {_nb_expr(e, nm)}" for e in p.reduce_order]
    for j, e in enumerate(p.norms):
        body += [f"_v{j} = np.float64({nm(e)})", f"_s{j} += _v{j} * _v{j}"]
    out = [f"# Generated by hwoptim from the {p.rule.name} spec ({_flag_text(p)}), {dtype}: "
           f"the reduction pass (norms).",
           "# Edit the spec in hwoptim/rules, not this file.",
           "import numpy as np",
           "from numba import carray, njit, prange, types",
           "from numba.extending import intrinsic", ""]
    if not fmt.plain:
        out += _NB_FORMAT_HELPERS.splitlines() + [""]
    out += _typed_constants(consts, fmt.compute)
    reads = list(p.reduce_reads)
    if fmt.master and "param" in reads:
        reads[reads.index("param")] = "master"
    if fmt.quantized:
        reads += [f"{a}_absmax" for a in p.reduce_reads if a not in ("param", "grad")]
    out += ["", ""] + _nb_at_lines(p, fmt, reads, doc=False)
    for fname, par, rng in (("parallel", True, "prange"), ("serial", False, "range")):
        # reassociation lets LLVM vectorise the float64 sums (and the element math with
        # them: a product chain may round differently from the update's, within the norm's
        # error bound; sums of two terms, all a spec's norm arguments hold, cannot change)
        out += ["", _njit_line(par, cache).replace("nogil=True", "nogil=True, "
                                                    "fastmath={'reassoc'}"),
                f"def {fname}(_ptrs, _chunks, _rows, _scalars, _out):",
                f"    for _c in {rng}(_chunks.shape[0]):",
                "        _t = _chunks[_c, 0]",
                "        _lo = _chunks[_c, 1]",
                "        _n = _chunks[_c, 2] - _lo",
                "        _r = _rows[_t]"]
        out += [f"        k_{n} = _scalars[_r, {j}]" for j, n in enumerate(p.scalars)]
        names = list(fmt.arrays(p.arrays))
        out += [f"        {_nb_chunk_array(fmt, a, names.index(a))}" for a in reads]
        out += [f"        _s{j} = 0.0" for j in range(len(p.norms))]
        out.append("        for i in range(_n):")
        out += [f"            {line}" for line in body]
        out += [f"        _out[_c, {j}] = _s{j}" for j in range(len(p.norms))]
    return "\n".join(out) + "\n"


def numba_stats_source(dtype: str, cache: bool = True) -> str:
    """A Python module with ``parallel`` and ``serial`` Numba kernels that read many arrays
    once for what ``max_grad_norm`` and ``skip_nonfinite`` need: per chunk (the chunk table
    of the multi-tensor kernels), the float64 sum of squares and the sum of ``x * 0`` (0,
    or NaN exactly where the chunk holds a NaN or an infinity). ``f(ptrs, chunks, out)``:
    ``ptrs`` int64 addresses of the arrays (``dtype``), ``chunks`` :func:`chunk_table`
    rows, ``out`` float64 (chunks x 2). Only reassociation is allowed (``fastmath``
    ``reassoc``: vectorised sums, still IEEE for NaN and infinities); a chunk's sum depends
    on the chunk alone, so the total does not depend on the thread count."""
    sixteen = dtype in ("float16", "bfloat16")         # their bits, loaded as float32
    size = 2 if sixteen else np.dtype(dtype).itemsize
    flag = "cache=True, " if cache else ""
    lines = ["# Generated by hwoptim: sums of squares and a non-finite test over many arrays.",
             "import numpy as np",
             "from numba import carray, njit, prange, types",
             "from numba.extending import intrinsic", ""]
    if sixteen:
        lines += _NB_FORMAT_HELPERS.splitlines()
    lines += ["",
              "@intrinsic",
              "def _at(typingctx, address):",
              "    def lower(context, builder, sig, args):",
              "        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))",
              f"    return types.CPointer(types.{'uint16' if sixteen else dtype})(types.int64), "
              f"lower", ""]
    load = {"float16": "_h_load(a[i])", "bfloat16": "_bf_load(a[i])"}.get(dtype, "a[i]")
    for fname, par, rng in (("parallel", True, "prange"), ("serial", False, "range")):
        lines += ["",
                  f"@njit({flag}parallel={par}, fastmath={{'reassoc'}}, nogil=True)",
                  f"def {fname}(_ptrs, _chunks, _out):",
                  f"    for _c in {rng}(_chunks.shape[0]):",
                  "        _lo = _chunks[_c, 1]",
                  "        _n = _chunks[_c, 2] - _lo",
                  f"        a = carray(_at(_ptrs[_chunks[_c, 0]] + _lo * {size}), _n)",
                  "        s = 0.0",
                  "        z = 0.0",
                  "        for i in range(_n):",
                  f"            v = np.float64({load})",
                  "            s += v * v",
                  "            z += v * 0.0",
                  "        _out[_c, 0] = s",
                  "        _out[_c, 1] = z"]
    return "\n".join(lines) + "\n"


def chunk_table(sizes, chunk: int) -> np.ndarray:
    """The chunks a multi-tensor kernel runs over: int64 rows ``(tensor, start, stop)``,
    tensor by tensor in order, each tensor cut at multiples of ``chunk`` elements (a tensor
    of at most ``chunk`` elements is one chunk; an empty one has none). Every element of
    every tensor is in exactly one chunk."""
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 element; got {chunk}")
    if sizes.size and sizes.min() < 0:
        raise ValueError(f"sizes must be >= 0; got {int(sizes.min())} for tensor "
                         f"{int(np.argmin(sizes))}")
    per = -(-sizes // chunk)                          # chunks per tensor
    tensor = np.repeat(np.arange(sizes.size, dtype=np.int64), per)
    first = np.cumsum(per) - per                      # each tensor's first chunk
    start = (np.arange(tensor.size, dtype=np.int64) - first[tensor]) * chunk
    stop = np.minimum(start + chunk, sizes[tensor])
    return np.ascontiguousarray(np.stack([tensor, start, stop], axis=1))


def pack_table(ptrs: np.ndarray, rows: np.ndarray, scalars: np.ndarray) -> np.ndarray:
    """The one buffer a multi-tensor CUDA kernel reads its tensors from (``table``): int64
    words, ``ptrs`` (``(n, columns)`` addresses) row by row, then ``rows`` (each tensor's
    row of ``scalars``), then ``scalars`` (``(n_rows, n_scalars)`` in their dtype), padded
    to whole words."""
    n = rows.shape[0]
    words = ptrs.size + n
    packed = np.empty(words + -(-scalars.size * scalars.itemsize // 8), dtype=np.int64)
    packed[words:] = 0                     # the padding after an odd float32 count
    packed[:ptrs.size] = ptrs.reshape(-1)
    packed[ptrs.size:words] = rows
    packed[words:].view(scalars.dtype)[:scalars.size] = scalars.reshape(-1)
    return packed


def chunk_groups(table: np.ndarray, work: int, row_cost: int = 0) -> np.ndarray:
    """Consecutive rows of a chunk ``table`` gathered into groups, counting a row's work as
    its elements plus ``row_cost`` (what starting a row costs, in elements): int64 bounds,
    group ``g`` being rows ``bounds[g]:bounds[g+1]``; every row in exactly one group, no
    group empty. Group ``g`` ends with the row where the running work first reaches
    ``(g+1)·w``, ``w`` being ``work`` or the largest row's work if that is more, so any
    ``k`` consecutive groups hold ``k·w`` work give or take ``w``.

    A parallel loop over groups therefore hands every thread about the same work, whatever
    the order and sizes of the tensors: a prange splits its iterations into equal counts,
    and over raw chunks a list with its small tensors last would leave one thread most of
    the work."""
    each = table[:, 2] - table[:, 1] + row_cost
    if each.size == 0:
        return np.zeros(1, np.int64)
    work = max(int(work), int(each.max()), 1)
    cost = np.cumsum(each)
    targets = np.arange(1, -(-int(cost[-1]) // work), dtype=np.int64) * work
    cuts = np.searchsorted(cost, targets, side="left") + 1
    bounds = np.unique(np.concatenate([[0], cuts, [cost.size]]))
    return np.ascontiguousarray(bounds[bounds <= cost.size], dtype=np.int64)


class ChunkTables:
    """:func:`chunk_table` for one chunk size, cached by the ``sizes`` it was built from,
    so that steady-state calls (the same group, step after step) do not rebuild it.

    ``get(sizes)`` (``sizes``: a 1-D int64 array) returns the cached entry: ``table``
    (callers must not write it), ``groups`` (:func:`chunk_groups` of about ``chunk``
    elements, with ``row_cost``; ``None`` without), ``total`` elements, ``n_chunks``, and
    ``extra``, a dict where a backend may keep per-table data (device copies). The last
    ``keep`` tables are kept; ``on_evict(entry)`` is called for one dropped. Lookup costs
    one hash of the sizes' bytes for short lists, one comparison with each kept list of the
    same length for long ones (hashing 10^4 sizes costs ~20 µs, comparing them ~5 µs)."""

    SHORT = 512              # sizes per list up to which their bytes are the key

    def __init__(self, chunk: int, keep: int = 8, on_evict=None, row_cost: int | None = None):
        if int(chunk) < 1:
            raise ValueError(f"chunk must be at least 1 element; got {chunk}")
        self.chunk, self.keep, self.on_evict = int(chunk), keep, on_evict
        self.row_cost = row_cost          # None: no groups (entry.groups is None)
        self._short: dict = {}          # sizes bytes -> entry, oldest first
        self._long: list = []           # [(sizes copy, entry)], most recent first
        self._lock = threading.Lock()

    def get(self, sizes: np.ndarray):
        with self._lock:
            if sizes.shape[0] <= self.SHORT:
                key = sizes.tobytes()
                entry = self._short.get(key)
                if entry is None:
                    entry = self._short[key] = self._build(sizes)
                    while len(self._short) > self.keep:
                        self._evict(self._short.pop(next(iter(self._short))))
                return entry
            for i, (known, entry) in enumerate(self._long):
                if known.shape == sizes.shape and (known == sizes).all():
                    if i:
                        self._long.insert(0, self._long.pop(i))
                    return entry
            entry = self._build(sizes)
            self._long.insert(0, (sizes.copy(), entry))
            while len(self._long) > self.keep:
                self._evict(self._long.pop()[1])
            return entry

    def _build(self, sizes):
        table = chunk_table(sizes, self.chunk)
        groups = (None if self.row_cost is None
                  else chunk_groups(table, self.chunk, self.row_cost))
        return SimpleNamespace(table=table, groups=groups, total=int(sizes.sum()),
                               n_chunks=table.shape[0], extra={})

    def _evict(self, entry):
        if self.on_evict is not None:
            self.on_evict(entry)


def host_scalar_function(p: KernelPlan, dtype: str, boxed: bool = True):
    """``f(h, t)``: the kernel's scalar arguments for step ``t`` as a tuple of ``dtype``
    numbers (``boxed=False``: Python floats, for a callee that rounds them itself),
    computed in float64 from the hyperparameter dict ``h``.

    Printed from the traced ``rule.scalars`` and the hoisted scalars, so a step spends
    about a microsecond here instead of re-running the spec through the tracer's evaluator.
    """
    dtype = Format.parse(dtype).compute          # (a format: its scalars are computed in)
    exprs, hyper_names = trace_scalars(p.rule, p.flags)
    wanted = {k: substitute(p.derived[k], exprs) if k in p.derived else exprs[k]
              for k in p.scalars}
    order, roots = schedule(wanted)
    nm = _Namer(lambda v: repr(v))
    lines = []
    for n, hy in p.rule.hypers.items():
        if isinstance(hy.default, tuple):
            names = ", ".join(f"k_{n}{i}" for i in range(len(hy.default)))
            lines.append(f"{names}, = h[{n!r}]")
        else:
            lines.append(f"k_{n} = h[{n!r}]")
    if p.rule.carry:            # carried scalars: given in h, or replayed (spec.with_carry)
        first = p.rule.carry[0].name
        lines.insert(0, f"if {first!r} not in h: h = _with_carry(_rule, h, t)")
        lines += [f"k_{c.name} = h[{c.name!r}]" for c in p.rule.carry]
    if getattr(p.flags, "_clip", False):
        lines.append("k__clip = h['_clip']")
    lines.append("k_step = t")
    for e in order:
        lines.append(f"{nm.new(e)} = {_nb_expr(e, nm).replace('np.sqrt', '_sqrt')}")
    outs = ", ".join(f"_T({nm(roots[s])})" for s in p.scalars)
    src = "def scalars(h, t):\n" + "".join(f"    {ln}\n" for ln in lines)
    src += f"    return ({outs}{',' if len(p.scalars) == 1 else ''})\n"
    import math
    env = {"_T": np.dtype(dtype).type if boxed else float, "_sqrt": math.sqrt, "np": np,
           "_with_carry": with_carry, "_rule": p.rule}
    exec(compile(src, f"<hwoptim scalars {p.key}>", "exec"), env)
    f = env["scalars"]
    if p.rule.resolve is not None:        # dtype-dependent hyperparameters (eps1=None)
        inner, resolve, rule = f, resolve_hypers, p.rule
        f = lambda h, t: inner(resolve(rule, h, dtype), t)     # noqa: E731
    f.source = src
    return f


# ----------------------------------------------------------------------------- C / CUDA

def _c_signature(p: KernelPlan, ref: str = "&") -> list:
    parts = []
    for a in p.arrays:
        if a not in p.reads and a not in p.outputs:
            continue
        t = _array_ctype(a)
        parts.append(f"{t}{ref} {a}" if a in p.outputs else f"const {t} {a}")
    return parts + [f"const TC k_{s}" for s in p.all_scalars]


def _array_ctype(a: str) -> str:
    return {"param": "TP", "grad": "TG"}.get(a, "TS")


def _c_used(p: KernelPlan) -> tuple:
    return tuple(a for a in p.arrays if a in p.reads or a in p.outputs)


def c_update_function(p: KernelPlan) -> str:
    """The per-element update as one C++/CUDA function, ``<name>_update``.

    This function is the GPU kernel's whole arithmetic; the CPU tests compile exactly this
    text as C++ and run it against the reference.
    """
    nm = _Namer(lambda v: f"(TC){v!r}")
    lines = []
    for a in p.reads:
        lines.append(f"const TC x_{a} = (TC){a};")
    for e in p.order:
        t = "bool" if _is_bool(e) else "TC"
        lines.append(f"const {t} {nm.new(e)} = {_c_expr(e, nm)};")
    for o in p.outputs:
        lines.append(f"{o} = ({_array_ctype(o)}){nm(p.roots[o])};")
    sig = ",\n    ".join(_c_signature(p))
    body = "\n".join(f"    {ln}" for ln in lines)
    return (f"__device__ __forceinline__ void {p.key}_update(\n    {sig})\n{{\n{body}\n}}\n")


def _c_step_function(p: KernelPlan, name: str, wanted: dict, out_type: str) -> str:
    """``<key>_<name>(hyper, step, out)``: the scalar expressions ``wanted`` (name -> Expr
    over the hyperparameters, carried scalars and ``step``), computed in double from the
    device hyperparameter vector ``hyper``, stored into ``out`` as ``out_type``."""
    _, hyper_names = trace_scalars(p.rule, p.flags)
    order, roots = schedule(wanted)
    nm = _Namer(lambda v: f"{v!r}")
    lines = [f"const double k_{h} = hyper[{i}];" for i, h in enumerate(hyper_names)]
    lines.append("const double k_step = step;")
    for e in order:
        t = "bool" if _is_bool(e) else "double"
        lines.append(f"const {t} {nm.new(e)} = {_c_expr(e, nm).replace('(TC)', '(double)')};")
    for i, s in enumerate(wanted):
        lines.append(f"out[{i}] = ({out_type})({nm(roots[s])});")
    body = "\n".join(f"    {ln}" for ln in lines)
    return (f"__device__ __forceinline__ void {p.key}_{name}(\n"
            f"    const double* hyper, const double step, {out_type}* out)\n{{\n{body}\n}}\n")


def c_scalar_function(p: KernelPlan) -> str:
    """``rule.scalars`` (and the hoisted scalars) as C: double hyperparameters and step
    in, the kernel's scalar arguments out."""
    exprs, _ = trace_scalars(p.rule, p.flags)
    return _c_step_function(p, "scalars", {
        k: substitute(p.derived[k], exprs) if k in p.derived else exprs[k] for k in p.scalars},
        "TC")


def c_carry_function(p: KernelPlan) -> str:
    """Rules that carry scalars from step to step (NAdam's ``mu_product``, ASGD's ``eta`` and
    ``mu``): their values after the step, as C (``<key>_carry(hyper, step, out)``; ``hyper``
    as :func:`c_scalar_function` takes it, the carried values after the hyperparameters)."""
    exprs, _ = trace_scalars(p.rule, p.flags)
    return _c_step_function(p, "carry", {c.name: exprs[c.name] for c in p.rule.carry},
                            "double")


def _typedefs(dtypes: dict) -> str:
    c = {k: C_TYPES[v] for k, v in dtypes.items()}
    return (f"typedef {c['param']} TP;\ntypedef {c['grad']} TG;\n"
            f"typedef {c['state']} TS;\ntypedef {c['compute']} TC;\n")


def dtypes_for(dtype: str) -> dict:
    """Per-buffer dtypes: today every buffer has the params' dtype."""
    return {"param": dtype, "grad": dtype, "state": dtype, "compute": dtype}


@dataclass(frozen=True)
class CudaKernels:
    source: str
    main: str          # vectorised, scalars by value
    unaligned: str     # element loop, scalars by value
    device: str        # vectorised, scalars read from a device array
    advance: str       # one thread: step += 1, per-step scalars from device hypers
    vec: int
    device_guard: str = ""    # as device, skipped where the step's verdict says so
    advance_guard: str = ""   # as advance, unless skipped; the clip factor from the verdict
    reduce_dev: str = ""      # rules taking norms: an array's sums of squares, for the above
    reduce_dev_finish: str = ""   # (per block, then added in order by this one warp)


def cuda_source(p: KernelPlan, dtype: str) -> CudaKernels:
    """The full CUDA source the cupy backend launches (``RawModule``)."""
    base = f"hw_{p.key}_{dtype}"
    size = np.dtype(dtype).itemsize
    vec = 16 // size
    used = _c_used(p)
    ptr_args = []
    for a in used:
        t = _array_ctype(a)
        ptr_args.append(f"{t}* __restrict__ {a}" if a in p.outputs
                        else f"const {t}* __restrict__ {a}")

    def kernel(name, vectorised, device_scalars, guard=False):
        scal = (["const TC* __restrict__ k_dev"] if device_scalars
                else [f"const TC k_{s}" for s in p.all_scalars])
        extra = (["const double* __restrict__ sums"] if device_scalars and p.norms else []) + \
            (["const double* __restrict__ guard"] if guard else [])
        args = ",\n    ".join(ptr_args + scal + ["const long long n"] + extra)
        # the step's verdict (codegen.cuda_guard_source): 1 skips every kernel of the step
        pre = "    if (guard[0] != 0.0) return;\n" if guard else ""
        if device_scalars:
            pre += "".join(f"    const TC k_{s} = k_dev[{i}];\n"
                           for i, s in enumerate(p.scalars))
            # the norms the device reduction (<base>_reduce_dev) summed for this array
            pre += "".join(f"    const TC k_{s} = (TC)sqrt(sums[{j}]"   # (× 1/size: as the
                           f"{' * (1.0 / (double)n)' if kind == 'rms' else ''});\n"   # host)
                           for j, (s, kind) in enumerate(zip(p.norm_names, p.norm_kinds)))
        call_v = ", ".join([f"v_{a}.v[l]" for a in used] + [f"k_{s}" for s in p.all_scalars])
        call_e = ", ".join([f"{a}[i]" for a in used] + [f"k_{s}" for s in p.all_scalars])
        text = [f'extern "C" __global__ void {name}(\n    {args})\n{{\n{pre}',
                "    const long long stride = (long long)gridDim.x * blockDim.x;\n",
                "    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n"]
        if vectorised:
            text.append(f"    const long long nv = n / {vec};\n"
                        f"    for (long long j = tid; j < nv; j += stride) {{\n")
            for a in used:
                t = _array_ctype(a)
                text.append(f"        hw_vec<{t}, {vec}> v_{a} = "
                            f"reinterpret_cast<const hw_vec<{t}, {vec}>*>({a})[j];\n")
            text.append(f"        #pragma unroll\n        for (int l = 0; l < {vec}; ++l)\n"
                        f"            {p.key}_update({call_v});\n")
            for a in used:
                if a in p.outputs:
                    t = _array_ctype(a)
                    text.append(f"        reinterpret_cast<hw_vec<{t}, {vec}>*>({a})[j] "
                                f"= v_{a};\n")
            text.append("    }\n")
            start = f"nv * {vec} + tid"
        else:
            start = "tid"
        text.append(f"    for (long long i = {start}; i < n; i += stride)\n"
                    f"        {p.key}_update({call_e});\n}}\n")
        return "".join(text)

    # step += 1, then the step's scalars from the hyperparameters on the device (and the
    # carried scalars after them, updated in place). Guarded: nothing where the verdict
    # skips the step (the step count stays), the grads' factor (loss scale, clipping: the
    # hyper "_clip", last) from the verdict; unguarded, a factor of 1
    _, hyper_names = trace_scalars(p.rule, p.flags)
    nh, nc = len(hyper_names), len(p.rule.carry)
    clip = getattr(p.flags, "_clip", False)
    first_carry = nh - nc - (1 if clip else 0)

    def advance_kernel(name, guard):
        args = [f"{'' if nc else 'const '}double* __restrict__ hyper",
                "double* __restrict__ step", "TC* __restrict__ out"]
        args += ["const double* __restrict__ guard"] if guard else []
        cond = "blockIdx.x == 0 && threadIdx.x == 0" + (" && guard[0] == 0.0" if guard else "")
        lines, h = [], "hyper"
        if clip:
            lines += [f"double h[{nh}];", f"for (int j = 0; j < {nh - 1}; ++j) h[j] = hyper[j];",
                      f"h[{nh - 1}] = {'guard[1]' if guard else '1.0'};"]
            h = "h"
        lines += ["const double t = step[0] + 1.0;", "step[0] = t;",
                  f"{p.key}_scalars({h}, t, out);"]
        if nc:
            lines += [f"double c[{nc}];", f"{p.key}_carry({h}, t, c);"]
            lines += [f"hyper[{first_carry + j}] = c[{j}];" for j in range(nc)]
        body = "".join(f"        {ln}\n" for ln in lines)
        return (f'extern "C" __global__ void {name}(\n    ' + ",\n    ".join(args)
                + f")\n{{\n    if ({cond}) {{\n{body}    }}\n}}\n")

    reduce_dev = ""
    if p.norms:                # per array on the device: the sums of squares the norms need,
        # each block's into its own partial (after the K totals), then one warp adds the
        # partials in a fixed order: the same bits every run (a replayed graph's too)
        k = len(p.norms)
        reads = [f"const {_array_ctype(a)}* __restrict__ {a}" for a in p.reduce_reads]
        call = ", ".join([f"{a}[i]" for a in p.reduce_reads] + [f"k_{s}" for s in p.scalars]
                         + ["acc"])
        reduce_dev = (
            f'extern "C" __global__ void {base}_reduce_dev(\n    '
            + ",\n    ".join(reads + ["const TC* __restrict__ k_dev", "const long long n",
                                       "double* __restrict__ sums",
                                       "const double* __restrict__ guard"])
            + ")\n{\n"
            "    if (guard != nullptr && guard[0] != 0.0) return;\n"
            + "".join(f"    const TC k_{s} = k_dev[{i}];\n" for i, s in enumerate(p.scalars))
            + f"    __shared__ double part[{k}][32];\n"
            f"    double acc[{k}] = {{{', '.join(['0.0'] * k)}}};\n"
            "    const long long stride = (long long)gridDim.x * blockDim.x;\n"
            "    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; "
            "i += stride)\n"
            f"        {p.key}_reduce({call});\n"
            f"    #pragma unroll\n"
            f"    for (int j = 0; j < {k}; ++j) {{\n"
            "        double v = acc[j];\n"
            "        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);\n"
            "        if ((threadIdx.x & 31) == 0) part[j][threadIdx.x >> 5] = v;\n"
            "    }\n"
            "    __syncthreads();\n"
            "    if (threadIdx.x < 32) {\n"
            f"        #pragma unroll\n"
            f"        for (int j = 0; j < {k}; ++j) {{\n"
            "            double v = threadIdx.x < (blockDim.x >> 5) ? part[j][threadIdx.x] : 0.0;\n"
            "            for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);\n"
            f"            if (threadIdx.x == 0) sums[{k} + blockIdx.x * {k} + j] = v;\n"
            "        }\n"
            "    }\n}\n"
            f'extern "C" __global__ void {base}_reduce_dev_finish(\n'
            "    double* __restrict__ sums, const long long n_blocks,\n"
            "    const double* __restrict__ guard)\n{\n"
            "    if (guard != nullptr && guard[0] != 0.0) return;\n"
            "    const int lane = threadIdx.x & 31;\n"
            f"    for (int j = 0; j < {k}; ++j) {{\n"
            "        double v = 0.0;\n"
            f"        for (long long b = lane; b < n_blocks; b += 32) v += sums[{k} + b * {k} + j];\n"
            "        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);\n"
            "        if (lane == 0) sums[j] = v;\n"
            "    }\n}\n")
    src = "\n".join([
        f"// Generated by hwoptim from the {p.rule.name} spec ({_flag_text(p)}), {dtype}.",
        "// Edit the spec in hwoptim/rules, not this file.",
        _typedefs(dtypes_for(dtype)),
        "template <typename T, int V> struct alignas(16) hw_vec { T v[V]; };\n",
        c_update_function(p),
        c_scalar_function(p),
        c_carry_function(p) if nc else "",
        c_reduce_function(p) if p.norms else "",
        kernel(base, True, False),
        kernel(base + "_unaligned", False, False),
        kernel(base + "_dev", True, True),
        advance_kernel(base + "_advance", False),
        kernel(base + "_dev_guard", True, True, guard=True),
        advance_kernel(base + "_advance_guard", True),
        reduce_dev,
    ])
    return CudaKernels(src, base, base + "_unaligned", base + "_dev", base + "_advance", vec,
                       base + "_dev_guard", base + "_advance_guard",
                       base + "_reduce_dev" if p.norms else "",
                       base + "_reduce_dev_finish" if p.norms else "")


@dataclass(frozen=True)
class CudaMulti:
    source: str
    name: str          # the multi-tensor kernel
    vec: int           # elements per 16-byte vector
    reduce: str = ""   # rules taking norms: the reduction kernel, launched first
    device: str = ""   # storage formats: the capturable variant (scalars, keys on the device)
    reduce_dev: str = ""          # its norms: each warp's partial sums of squares,
    reduce_dev_finish: str = ""   # then added in order by one warp


def c_reduce_function(p: KernelPlan) -> str:
    """The reduction pass's per-element work as one C++/CUDA function, ``<key>_reduce``:
    from one element's inputs (the arrays the norms read) and the kernel scalars, add the
    square of each norm's argument, in double, to ``acc[j]``. The CPU tests compile exactly
    this text as C++."""
    nm = _Namer(lambda v: f"(TC){v!r}")
    lines = [f"const TC x_{a} = (TC){a};" for a in p.reduce_reads]
    for e in p.reduce_order:
        t = "bool" if _is_bool(e) else "TC"
        lines.append(f"const {t} {nm.new(e)} = {_c_expr(e, nm)};")
    for j, e in enumerate(p.norms):
        lines.append(f"{{ const double v = (double)({nm(e)}); acc[{j}] += v * v; }}")
    sig = ",\n    ".join([f"const {_array_ctype(a)} {a}" for a in p.reduce_reads]
                          + [f"const TC k_{s}" for s in p.scalars] + ["double* acc"])
    body = "\n".join(f"    {ln}" for ln in lines)
    return f"__device__ __forceinline__ void {p.key}_reduce(\n    {sig})\n{{\n{body}\n}}\n"


def _chunk_loop_head(p: KernelPlan, name: str, extra_arg: str = "", prologue: str = "",
                     columns: int | None = None, device_scalars: bool = False) -> list:
    """The opening every multi-tensor CUDA kernel shares: the signature (``table``,
    ``chunks``, ``n_tensors``, ``n_chunks``, then ``extra_arg``), ``prologue``, the row and
    scalar tables, and the grid-stride loop over chunks down to this chunk's tensor ``t``,
    start ``lo``, length ``n``, addresses ``at`` and kernel scalars ``k_<name>``. The caller
    writes the loop's body and closes both braces. ``columns``: the table's addresses per
    tensor (``len(p.arrays)``; a storage format's: ``len(fmt.arrays(p.arrays))``).
    ``device_scalars``: every tensor's scalars from the device array ``k_dev`` (an
    argument), not the table (capturable steps)."""
    na, ns = (len(p.arrays) if columns is None else columns), len(p.scalars)
    extra = f",\n    {extra_arg}" if extra_arg else ""
    text = [f'extern "C" __global__ void {name}(\n'
            f"    const long long* __restrict__ table,\n"
            f"    const long long* __restrict__ chunks,\n"
            f"    const long long n_tensors,\n"
            f"    const long long n_chunks{extra})\n{{\n{prologue}"]
    if ns and not device_scalars:
        text.append(f"    const long long* const rows = table + n_tensors * {na};\n"
                    f"    const TC* const scalars = reinterpret_cast<const TC*>"
                    f"(table + n_tensors * {na + 1});\n")
    text.append("    for (long long c = blockIdx.x; c < n_chunks; c += gridDim.x) {\n"
                "        const long long t = chunks[3 * c];\n"
                "        const long long lo = chunks[3 * c + 1];\n"
                "        const long long n = chunks[3 * c + 2] - lo;\n"
                f"        const long long* const at = table + t * {na};\n")
    if ns:
        text.append("        const TC* const k_row = k_dev;\n" if device_scalars else
                    f"        const TC* const k_row = scalars + rows[t] * {ns};\n")
        text += [f"        const TC k_{s} = k_row[{i}];\n" for i, s in enumerate(p.scalars)]
    return text


def _cuda_reduce_kernel(p: KernelPlan, name: str, pointers=None, call=None,
                        columns: int | None = None) -> str:
    """The reduction kernel: one block per chunk (grid-stride over chunks), each thread
    summing its elements' squares in double, the block's sums combined (warp shuffles, then
    shared memory) and added atomically to ``sums[tensor * K + j]`` (zeroed by the caller).
    Arguments as the multi-tensor kernel's, then ``sums``. ``pointers`` (lines) and ``call``
    (the reduce function's arguments): a storage format's, instead of the plain ones."""
    k = len(p.norms)
    idx = {a: p.arrays.index(a) for a in p.reduce_reads}
    text = _chunk_loop_head(p, name, "double* __restrict__ sums",
                            f"    __shared__ double part[{k}][32];\n", columns)
    if pointers is None:
        for a in p.reduce_reads:
            t = _array_ctype(a)
            text.append(f"        const {t}* const {a} = reinterpret_cast<const {t}*>"
                        f"(at[{idx[a]}]) + lo;\n")
    else:
        text += [f"        {ln}\n" for ln in pointers]
    if call is None:
        call = ", ".join([f"{a}[i]" for a in p.reduce_reads] + [f"k_{s}" for s in p.scalars]
                         + ["acc"])
    text.append(f"        double acc[{k}] = {{{', '.join(['0.0'] * k)}}};\n"
                f"        for (long long i = threadIdx.x; i < n; i += blockDim.x)\n"
                f"            {p.key}_reduce({call});\n"
                f"        #pragma unroll\n"
                f"        for (int j = 0; j < {k}; ++j) {{\n"
                f"            double v = acc[j];\n"
                f"            for (int o = 16; o > 0; o >>= 1)\n"
                f"                v += __shfl_down_sync(0xffffffffu, v, o);\n"
                f"            if ((threadIdx.x & 31) == 0) part[j][threadIdx.x >> 5] = v;\n"
                f"        }}\n"
                f"        __syncthreads();\n"
                f"        if (threadIdx.x < 32) {{\n"
                f"            #pragma unroll\n"
                f"            for (int j = 0; j < {k}; ++j) {{\n"
                f"                double v = threadIdx.x < (blockDim.x >> 5) ? "
                f"part[j][threadIdx.x] : 0.0;\n"
                f"                for (int o = 16; o > 0; o >>= 1)\n"
                f"                    v += __shfl_down_sync(0xffffffffu, v, o);\n"
                f"                if (threadIdx.x == 0) atomicAdd(&sums[t * {k} + j], v);\n"
                f"            }}\n"
                f"        }}\n"
                f"        __syncthreads();\n"
                f"    }}\n}}\n")
    return "".join(text)


def cuda_multi_source(p: KernelPlan, dtype: str) -> CudaMulti:
    """A CUDA source (its own ``RawModule``) with one multi-tensor kernel, ``<base>_multi``:
    one thread block per chunk (grid-stride over chunks), updating chunks of many separate
    arrays in one launch with the same ``<key>_update`` function as :func:`cuda_source`.

    Arguments: ``table`` (int64 words: ``n_tensors x len(p.arrays)`` device addresses in
    ``p.arrays`` order, then ``n_tensors`` row indices, then the scalar rows, ``n_rows x
    len(p.scalars)`` values of the compute type), ``chunks`` (int64, ``n_chunks x 3``:
    tensor, start, stop; :func:`chunk_table`), ``n_tensors``, ``n_chunks``. A chunk whose
    arrays are all 16-byte aligned runs 16-byte vector loads and stores (then an element
    loop for its tail); any other chunk runs the element loop."""
    base = f"hw_{p.key}_{dtype}"
    name = base + "_multi"
    vec = 16 // np.dtype(dtype).itemsize
    used = _c_used(p)
    k = len(p.norms)
    idx = {a: p.arrays.index(a) for a in used}
    text = _chunk_loop_head(p, name, "const double* __restrict__ sums" if k else "")
    # the norms the reduction kernel summed, for this tensor
    text += [f"        const TC k_{s} = (TC)sqrt(sums[t * {k} + {j}]);\n"
             for j, s in enumerate(p.norm_names)]
    for a in used:
        t = _array_ctype(a)
        q = "" if a in p.outputs else "const "
        text.append(f"        {q}{t}* const {a} = reinterpret_cast<{q}{t}*>(at[{idx[a]}]) + lo;\n")
    # pointers read from memory are generic; global ones give global loads and stores
    text += [f"        __builtin_assume(__isGlobal({a}));\n" for a in used]
    either = " | ".join(f"reinterpret_cast<unsigned long long>({a})" for a in used)
    text.append(f"        long long done = 0;\n"
                f"        if ((({either}) & 15) == 0) {{\n"
                f"            const long long nv = n / {vec};\n"
                f"            for (long long j = threadIdx.x; j < nv; j += blockDim.x) {{\n")
    for a in used:
        t = _array_ctype(a)
        text.append(f"                hw_vec<{t}, {vec}> v_{a} = "
                    f"reinterpret_cast<const hw_vec<{t}, {vec}>*>({a})[j];\n")
    call_v = ", ".join([f"v_{a}.v[l]" for a in used] + [f"k_{s}" for s in p.all_scalars])
    call_e = ", ".join([f"{a}[i]" for a in used] + [f"k_{s}" for s in p.all_scalars])
    text.append(f"                #pragma unroll\n"
                f"                for (int l = 0; l < {vec}; ++l)\n"
                f"                    {p.key}_update({call_v});\n")
    for a in used:
        if a in p.outputs:
            t = _array_ctype(a)
            text.append(f"                reinterpret_cast<hw_vec<{t}, {vec}>*>({a})[j] = v_{a};\n")
    text.append(f"            }}\n"
                f"            done = nv * {vec};\n"
                f"        }}\n"
                f"        for (long long i = done + threadIdx.x; i < n; i += blockDim.x)\n"
                f"            {p.key}_update({call_e});\n"
                f"    }}\n}}\n")
    parts = [
        f"// Generated by hwoptim from the {p.rule.name} spec ({_flag_text(p)}), {dtype}: "
        f"multi-tensor kernel{'s (reduction, then update)' if k else ''}.",
        "// Edit the spec in hwoptim/rules, not this file.",
        _typedefs(dtypes_for(dtype)),
        "template <typename T, int V> struct alignas(16) hw_vec { T v[V]; };\n",
        c_update_function(p),
        "".join(text),
    ]
    if k:
        parts += [c_reduce_function(p), _cuda_reduce_kernel(p, base + "_reduce")]
    return CudaMulti("\n".join(parts), name, vec, base + "_reduce" if k else "")


# ----------------------------------------------------------------------------- CUDA formats
#
# A storage format (hwoptim.formats) on the GPU: the same element statements as the plain
# kernels, between loads that turn each buffer's storage into float32 and stores that round
# back (16-bit buffers are ``unsigned short`` arrays of their bits; int8 states ``unsigned
# char`` codes with a float32 absmax per 256-element block). The conversions are integer
# bit operations written once below, in C++ that compiles both as CUDA and on the CPU (the
# tests run these very lines against hwoptim.formats' NumPy reference, bit for bit), and
# none of them depends on flush-to-zero.
#
# Kernels: one warp per 256-element tile, each lane taking elements lane, lane + 32, ...
# (eight each: every load instruction of the warp reads 32 consecutive elements, whatever
# the buffers' alignment). An int8 state's new values stay in registers while the warp
# reduces their absmax (shuffles) and whether one is negative; then each lane stores its
# codes. Every launch is a multi-tensor one (one tensor or many; chunks of 4096 elements,
# whole tiles).

_C_FORMAT_HELPERS = r'''// Storage formats: hwoptim.formats' conversions, bit for bit, in integer operations.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
__device__ __forceinline__ unsigned hw_bits(const float x) { return __float_as_uint(x); }
__device__ __forceinline__ float hw_float(const unsigned u) { return __uint_as_float(u); }
#else
inline unsigned hw_bits(const float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float hw_float(const unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
#endif
// hwoptim.formats.mix32 ("lowbias32")
__device__ __forceinline__ unsigned hw_mix32(unsigned x)
{
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
    return x;
}
// formats.sr_key: the key of tensor ``tensor`` at step ``step`` (capturable steps: the
// step count on the device) of a run seeded with ``seed_hi << 32 | seed_lo``
__device__ __forceinline__ unsigned hw_sr_key(const unsigned seed_lo, const unsigned seed_hi,
                                              const double step, const long long tensor)
{
    const unsigned long long t = (unsigned long long)step;
    unsigned k = hw_mix32(seed_lo ^ 0x9E3779B9u);
    k = hw_mix32(k ^ seed_hi);
    k = hw_mix32(k ^ (unsigned)(t & 0xFFFFFFFFull));
    k = hw_mix32(k ^ (unsigned)(t >> 32));
    return hw_mix32(k ^ hw_mix32((unsigned)tensor));
}
__device__ __forceinline__ float hw_bf_load(const unsigned short u)
{
    return hw_float((unsigned)u << 16);
}
// to nearest, ties to even; NaN: its sign and 0x7FC0 (as ml_dtypes)
__device__ __forceinline__ unsigned short hw_bf_round(const float x)
{
    const unsigned b = hw_bits(x);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)(((b >> 16) & 0x8000u) | 0x7FC0u);
    return (unsigned short)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
// stochastic: up where the low 16 bits of r are below the dropped fraction; NaN, the
// infinities and a rounding up to infinity take round-to-nearest's result
__device__ __forceinline__ unsigned short hw_bf_sr(const float x, const unsigned r)
{
    const unsigned b = hw_bits(x), s = b & 0x80000000u, a = b ^ s;
    const unsigned up = (a + (r & 0xFFFFu)) >> 16;
    if (a >= 0x7F800000u || up >= 0x7F80u) return hw_bf_round(x);
    return (unsigned short)(up | (s >> 16));
}
__device__ __forceinline__ float hw_h_load(const unsigned short h)
{
    const unsigned s = (unsigned)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1Fu) return hw_float(s | 0x7F800000u | (m ? 0x400000u | (m << 13) : 0u));
    if (e) return hw_float(s | ((e + 112u) << 23) | (m << 13));
    return hw_float(s | hw_bits((float)m * 5.9604644775390625e-8f));    // m 2^-24: exact
}
// to nearest, ties to even (subnormals included); NaN stays NaN (quiet)
__device__ __forceinline__ unsigned short hw_h_round(const float x)
{
    const unsigned b = hw_bits(x), s = (b >> 16) & 0x8000u, a = b & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (unsigned short)(s | 0x7E00u | ((a >> 13) & 0x3FFu));
    if (a >= 0x477FF000u) return (unsigned short)(s | 0x7C00u);          // from 65520: inf
    if (a >= 0x38800000u)                                                 // normal: >= 2^-14
        return (unsigned short)(s | ((a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13));
    if (a < 0x33000000u) return (unsigned short)s;                        // <= 2^-25: zero
    const unsigned m = (a & 0x7FFFFFu) | 0x800000u, sh = 126u - (a >> 23);   // 14..24
    const unsigned q = m >> sh, rem = m & ((1u << sh) - 1u), half = 1u << (sh - 1u);
    return (unsigned short)(s | (q + (rem > half || (rem == half && (q & 1u)))));
}
// stochastic, as hw_bf_sr; below 2^-24 the neighbours are 0 and 2^-24, taken with
// probability |x| / 2^-24 from the low 24 bits of r
__device__ __forceinline__ unsigned short hw_h_sr(const float x, const unsigned r)
{
    const unsigned b = hw_bits(x), s = b & 0x80000000u, a = b ^ s;
    if (a >= 0x7F800000u) return hw_h_round(x);
    const unsigned e = a >> 23;
    if (e < 103u) {            // up where (r mod 2^24) 2^-24 < |x| 2^24 = m 2^(e' - 102)
        const unsigned long long m = e ? (a & 0x7FFFFFu) | 0x800000u : a;
        const unsigned sh = (e ? 102u - e : 101u) < 40u ? (e ? 102u - e : 101u) : 40u;
        const bool up = ((unsigned long long)(r & 0xFFFFFFu) << sh) < m;
        return (unsigned short)((s >> 16) | (up ? 1u : 0u));
    }
    const unsigned drop = e >= 113u ? 13u : 126u - e, mask = (1u << drop) - 1u;
    const unsigned short out = hw_h_round(hw_float(((a + (r & mask)) & ~mask) | s));
    return (out & 0x7FFFu) == 0x7C00u ? hw_h_round(x) : out;
}
// int8 state: the code c of a block with absmax A (negative: the unsigned map)
__device__ __forceinline__ float hw_q_load(const unsigned char c, const float A)
{
    const unsigned ab = hw_bits(A), cc = c;
    const bool u = (ab >> 31) != 0u, neg = !u && cc >= 0x80u;
    const unsigned mag = u ? cc : (cc & 0x7Fu), e = mag >> 3, m = mag & 7u;
    if (mag == (u ? 0xFFu : 0x7Fu)) return hw_float(0x7FC00000u);
    if (mag == (u ? 0xFEu : 0x7Eu)) return hw_float(neg ? 0xFF800000u : 0x7F800000u);
    const float v = (float)(e ? m + 8u : m)
                    * hw_float(((e ? e : 1u) + 124u - (u ? 31u : 15u)) << 23);
    return (neg ? -v : v) * hw_float(ab & 0x7FFFFFFFu);
}
// the bits of |v| where v is finite, else 0 (non-negative floats order as integers)
__device__ __forceinline__ unsigned hw_abs_bits(const float v)
{
    const unsigned a = hw_bits(v) & 0x7FFFFFFFu;
    return a < 0x7F800000u ? a : 0u;
}
// a block's map from the bits A of its largest finite |x| and whether it holds a negative
// value: codes are hw_q_code(x, pre, inv, u); the stored absmax is sa. Where A < 2^-120,
// 1/A would overflow: pre = 2^64 (A 2^64 built from its bits: exact under flush-to-zero)
__device__ __forceinline__ void hw_q_scale(const unsigned A, const bool neg, float& pre,
                                           float& inv, bool& u, float& sa)
{
    const bool small = A < 0x03800000u;
    pre = small ? 18446744073709551616.0f : 1.0f;
    const float scaled = !small ? hw_float(A)
                         : A >= 0x00800000u ? hw_float(A + (64u << 23))
                         : (float)A * 2.5849394142282115e-26f;        // A 2^-149 2^64 = A 2^-85
    inv = A ? 1.0f / scaled : 0.0f;
    u = !neg;
    sa = u ? -hw_float(A) : hw_float(A);
}
__device__ __forceinline__ unsigned char hw_q_code(const float x, const float pre,
                                                   const float inv, const bool u)
{
    const unsigned vb = hw_bits(x), va = vb & 0x7FFFFFFFu;
    if (va > 0x7F800000u) return (unsigned char)(u ? 0xFFu : 0x7Fu);
    const unsigned sign = u ? 0u : (vb >> 31) << 7;
    if (va == 0x7F800000u) return (unsigned char)((u ? 0xFEu : 0x7Eu) | sign);
    const unsigned bias = u ? 31u : 15u;
    const unsigned a = hw_bits((x * pre) * inv) & 0x7FFFFFFFu;
    const int E = (int)(a >> 23) - 127 + (int)bias;
    const unsigned e = E < 1 ? 1u : (unsigned)E;
    const int k = (int)rintf(hw_float(a) * hw_float((bias + 130u - e) << 23));
    return (unsigned char)(((e - 1u) * 8u + (unsigned)k) | sign);
}
'''

_C_STORAGE = {"float32": "float", "float64": "double", "float16": "unsigned short",
              "bfloat16": "unsigned short", "uint8": "unsigned char", "uint32": "unsigned"}


def _c_format_typedefs(fmt: Format) -> str:
    c = {"param": fmt.param, "grad": fmt.param, "state": fmt.storage("state"),
         "compute": fmt.compute}
    return (f"typedef {_C_STORAGE[c['param']]} TP;\ntypedef {_C_STORAGE[c['grad']]} TG;\n"
            f"typedef {_C_STORAGE[c['state']]} TS;\ntypedef {_C_STORAGE[c['compute']]} TC;\n")


def _c_load(fmt: Format, p: KernelPlan, a: str, absmax: str = "") -> str:
    """Buffer ``a``'s element ``i`` in the compute type (an int8 state decoded with its
    block's absmax: ``s<j>``, or the expression ``absmax``)."""
    if a == "param" and fmt.master:
        return "master[i]"
    if fmt.quantized and a not in ("param", "grad"):
        return f"hw_q_load({a}[i], {absmax or f's{p.arrays.index(a) - 2}'})"
    f = {"bfloat16": "hw_bf_load", "float16": "hw_h_load"}.get(fmt.storage(a))
    return f"{f}({a}[i])" if f else f"{a}[i]"


def _c_round(fmt: Format, a: str, v: str) -> str:
    f = {"bfloat16": "hw_bf_round", "float16": "hw_h_round"}.get(fmt.storage(a))
    return f"{f}({v})" if f else v


def _c_format_args(p: KernelPlan, fmt: Format) -> tuple:
    """(pointer parameters, their names) of the element function and the kernels' arrays:
    ``fmt.arrays(p.arrays)`` less the int8 absmax arrays (blocks' scales: the tile reads
    them) and ``_srkey`` (its value, ``kh``, is an argument)."""
    names = [a for a in fmt.arrays(p.arrays) if not a.endswith("_absmax") and a != "_srkey"]
    out = []
    for a in names:
        t = "float" if a == "master" else _array_ctype(a)
        const = "" if (a in p.outputs or a == "master") else "const "
        out.append(f"{const}{t}* __restrict__ {a}")
    return out, names


def _quantized_outputs(p: KernelPlan, fmt: Format) -> list:
    return [a for a in p.arrays[2:] if fmt.quantized and a in p.outputs]


def c_format_element_function(p: KernelPlan, fmt: Format) -> str:
    """``<key>_element``: element ``i`` of one tensor in storage format ``fmt``: the loads,
    the rule's statements (as :func:`c_update_function`'s), the stores; an int8 state's new
    value goes to ``q<j>`` (the tile encodes it once its block's absmax is known).
    Arguments: the buffers (see :func:`_c_format_args`), ``i``; with stochastic rounding
    ``gi`` (the element's index in its tensor, low word) and ``kh`` (the tensor's key, the
    index's high word mixed in); int8: each state's block absmax ``s<j>``; the kernel
    scalars; int8: ``q<j>`` out."""
    nm = _Namer(lambda v: f"(TC){v!r}")
    ptrs, _ = _c_format_args(p, fmt)
    args = ptrs + ["const long long i"]
    if fmt.sr:
        args += ["const unsigned gi", "const unsigned kh"]
    if fmt.quantized:
        args += [f"const float s{j}" for j, a in enumerate(p.arrays[2:])]
    args += [f"const TC k_{s}" for s in p.all_scalars]
    qs = _quantized_outputs(p, fmt)
    args += [f"TC& q{p.arrays.index(a) - 2}" for a in qs]
    lines = [f"const TC x_{a} = {_c_load(fmt, p, a)};" for a in p.reads]
    for e in p.order:
        t = "bool" if _is_bool(e) else "TC"
        lines.append(f"const {t} {nm.new(e)} = {_c_expr(e, nm)};")
    for o in p.outputs:
        v = nm(p.roots[o])
        if o in qs:
            lines.append(f"q{p.arrays.index(o) - 2} = {v};")
        elif o == "param" and fmt.master:
            lines += [f"master[i] = {v};", f"param[i] = {_c_round(fmt, 'param', v)};"]
        elif o == "param" and fmt.sr:
            f = "hw_bf_sr" if fmt.param == "bfloat16" else "hw_h_sr"
            lines.append(f"param[i] = {f}({v}, hw_mix32(gi ^ kh));")
        else:
            lines.append(f"{o}[i] = {_c_round(fmt, o, v)};")
    sig = ",\n    ".join(args)
    body = "\n".join(f"    {ln}" for ln in lines)
    return f"__device__ __forceinline__ void {p.key}_element(\n    {sig})\n{{\n{body}\n}}\n"


def c_format_reduce_function(p: KernelPlan, fmt: Format) -> str:
    """The reduction pass's element function for format ``fmt``: as
    :func:`c_reduce_function`, over element ``i`` of the buffers (int8 states: absmax
    arrays ``<name>_absmax`` of the tensor's blocks)."""
    nm = _Namer(lambda v: f"(TC){v!r}")
    lines = [f"const TC x_{a} = {_c_load(fmt, p, a, f'{a}_absmax[i >> 8]')};"
             for a in p.reduce_reads]
    for e in p.reduce_order:
        t = "bool" if _is_bool(e) else "TC"
        lines.append(f"const {t} {nm.new(e)} = {_c_expr(e, nm)};")
    for j, e in enumerate(p.norms):
        lines.append(f"{{ const double v = (double)({nm(e)}); acc[{j}] += v * v; }}")
    args = []
    for a in p.reduce_reads:
        if a == "param" and fmt.master:
            args.append("const float* __restrict__ master")
            continue
        args.append(f"const {_array_ctype(a)}* __restrict__ {a}")
        if fmt.quantized and a not in ("param", "grad"):
            args.append(f"const float* __restrict__ {a}_absmax")
    sig = ",\n    ".join(args + ["const long long i"] + [f"const TC k_{s}" for s in p.scalars]
                          + ["double* acc"])
    body = "\n".join(f"    {ln}" for ln in lines)
    return f"__device__ __forceinline__ void {p.key}_reduce(\n    {sig})\n{{\n{body}\n}}\n"


def _c_format_reduce_call(p: KernelPlan, fmt: Format) -> str:
    args = []
    for a in p.reduce_reads:
        if a == "param" and fmt.master:
            args.append("master")
            continue
        args.append(a)
        if fmt.quantized and a not in ("param", "grad"):
            args.append(f"{a}_absmax")
    return ", ".join(args + ["i"] + [f"k_{s}" for s in p.scalars] + ["acc"])


def _c_tile(p: KernelPlan, fmt: Format, lanes: str) -> list:
    """The statements updating tile ``b`` (elements ``base = b * 256`` on, below ``n``) of
    one chunk. ``lanes``: "warp" (the CUDA kernel: this lane's eight elements, an int8
    state's absmax reduced by shuffles) or "loop" (the C++ test harness: each lane in turn,
    the same reduction, max and or, in a loop)."""
    _, names = _c_format_args(p, fmt)
    qs = _quantized_outputs(p, fmt)
    qj = [p.arrays.index(a) - 2 for a in qs]
    warp = lanes == "warp"
    qref = "[k]" if warp else "[lane][k]"
    call = names + ["i"]
    if fmt.sr:
        call += ["(unsigned)(lo + i)", "kh"]
    if fmt.quantized:
        call += [f"s{j}" for j in range(len(p.arrays) - 2)]
    call += [f"k_{s}" for s in p.all_scalars] + [f"q{j}{qref}" for j in qj]
    out = ["const long long base = b << 8;"]
    if fmt.quantized:
        out += [f"const float s{j} = {a}_absmax[b];" for j, a in enumerate(p.arrays[2:])]
    out += [f"TC q{j}{'[8]' if warp else '[32][8]'}; unsigned A{j} = 0u; bool N{j} = false;"
            for j in qj]
    each = ["#pragma unroll", "for (int k = 0; k < 8; ++k) {",
            "    const long long i = base + lane + 32 * k;",
            "    if (i < n) {",
            f"        {p.key}_element({', '.join(call)});"]
    for j in qj:
        q = f"q{j}{qref}"
        each += [f"        A{j} = A{j} > hw_abs_bits({q}) ? A{j} : hw_abs_bits({q});",
                 f"        N{j} = N{j} || {q} < (TC)0;"]
    each += ["    }", "}"]

    def over_lanes(lines):
        if warp:
            return lines
        return (["for (int lane = 0; lane < 32; ++lane) {"] + [f"    {ln}" for ln in lines]
                + ["}"])

    out += over_lanes(each)
    if not qs:
        return out
    if warp:
        for j in qj:
            out += ["#pragma unroll", "for (int o = 16; o > 0; o >>= 1) {",
                    f"    const unsigned y = __shfl_xor_sync(0xffffffffu, A{j}, o);",
                    f"    A{j} = A{j} > y ? A{j} : y;", "}",
                    f"N{j} = __any_sync(0xffffffffu, N{j});"]
    for j in qj:
        out += [f"float pre{j}, inv{j}, sa{j}; bool u{j};",
                f"hw_q_scale(A{j}, N{j}, pre{j}, inv{j}, u{j}, sa{j});"]
    enc = ["#pragma unroll", "for (int k = 0; k < 8; ++k) {",
           "    const long long i = base + lane + 32 * k;"]
    enc += [f"    if (i < n) {a}[i] = hw_q_code(q{j}{qref}, pre{j}, inv{j}, u{j});"
            for a, j in zip(qs, qj)]
    out += over_lanes(enc + ["}"])
    return out + [f"{'if (lane == 0) ' if warp else ''}{a}_absmax[b] = sa{j};"
                  for a, j in zip(qs, qj)]


def _c_chunk_pointers(p: KernelPlan, fmt: Format, used, device_keys: bool = False) -> list:
    """Pointers to one chunk (tensor ``t``, elements ``lo`` on) of buffers ``used`` (names
    in ``fmt.arrays(p.arrays)``), from the address row ``at``; ``kh`` for ``_srkey`` (the
    address of the tensor's key; ``device_keys``: the tensor's number, its key made from
    the seed and the device step count)."""
    allnames = fmt.arrays(p.arrays)
    out = []
    for a in used:
        j = allnames.index(a)
        if a == "_srkey":
            key = (f"hw_sr_key(seed_lo, seed_hi, step_dev[0], at[{j}])" if device_keys else
                   f"*reinterpret_cast<const unsigned*>(at[{j}])")
            out.append(f"const unsigned kh = {key} ^ hw_mix32((unsigned)(lo >> 32));")
            continue
        t = "float" if (a == "master" or a.endswith("_absmax")) else _array_ctype(a)
        q = "" if (a in p.outputs or a == "master" or (
            a.endswith("_absmax") and a[:-7] in p.outputs)) else "const "
        off = "(lo >> 8)" if a.endswith("_absmax") else "lo"
        out.append(f"{q}{t}* const {a} = reinterpret_cast<{q}{t}*>(at[{j}]) + {off};")
    return out


def cuda_format_source(p: KernelPlan, fmt) -> CudaMulti:
    """The CUDA module of plan ``p`` in storage format ``fmt`` (not plain): a multi-tensor
    kernel ``<base>_multi`` with :func:`cuda_multi_source`'s arguments (the table's address
    rows in ``fmt.arrays(p.arrays)`` order) and, for rules taking norms, the reduction
    kernel ``<base>_reduce`` before it. One warp per 256-element tile; chunks must start at
    multiples of 256 (the multi-tensor chunks do: 4096 elements)."""
    fmt = Format.parse(fmt)
    base = f"hw_{p.key}_{fmt.key}"
    name = base + "_multi"
    k = len(p.norms)
    parts = [
        f"// Generated by hwoptim from the {p.rule.name} spec ({_flag_text(p)}), format "
        f"{fmt.key}: multi-tensor kernel{'s (reduction, then update)' if k else ''}.",
        "// Edit the spec in hwoptim/rules, not this file.",
        _c_format_typedefs(fmt), _C_FORMAT_HELPERS, c_format_element_function(p, fmt),
        _format_multi_kernel(p, fmt, name, "warp")]
    if k:
        parts += [c_format_reduce_function(p, fmt), _cuda_format_reduce_kernel(p, fmt, base),
                  _format_reduce_dev_kernel(p, fmt, base + "_reduce_dev", True),
                  _format_reduce_finish_kernel(p, base + "_reduce_dev_finish", True)]
    # capturable steps: scalars and keys from the device (norms: reduced there first)
    parts.append(_format_multi_kernel(p, fmt, name + "_dev", "warp", device=True))
    return CudaMulti("\n".join(parts), name, 0, base + "_reduce" if k else "",
                     name + "_dev", base + "_reduce_dev" if k else "",
                     base + "_reduce_dev_finish" if k else "")


_FORMAT_DEV_ARGS = ("const TC* __restrict__ k_dev,\n    const double* __restrict__ step_dev,\n"
                    "    const double* __restrict__ guard,\n    const unsigned seed_lo,\n"
                    "    const unsigned seed_hi")


def _format_multi_kernel(p: KernelPlan, fmt: Format, name: str, lanes: str,
                         device: bool = False) -> str:
    """The multi-tensor kernel of a storage format: the chunk loop, each chunk's pointers,
    its warps' tiles (``lanes`` as :func:`_c_tile` takes it: "loop" for the C++ test
    harness, which runs this very text a warp at a time). ``device``: the capturable
    variant, its scalars from ``k_dev``, stochastic-rounding keys from the seed, the device
    step count and each tensor's number (the table's key column), nothing done where the
    step's verdict ``guard`` (may be null) skips it."""
    used = fmt.arrays(p.arrays)
    k = len(p.norms)
    sums = "const double* __restrict__ sums" if k else ""
    if device:              # (norms: of the table's one tensor, finished and scaled)
        text = _chunk_loop_head(p, name, _FORMAT_DEV_ARGS + (f",\n    {sums}" if k else ""),
                                "    if (guard != nullptr && guard[0] != 0.0) return;\n",
                                columns=len(used), device_scalars=True)
        text += [f"        const TC k_{s} = (TC)sqrt(sums[{j}]);\n"
                 for j, s in enumerate(p.norm_names)]
    else:
        text = _chunk_loop_head(p, name, sums, columns=len(used))
        text += [f"        const TC k_{s} = (TC)sqrt(sums[t * {k} + {j}]);\n"
                 for j, s in enumerate(p.norm_names)]
    text += [f"        {ln}\n" for ln in _c_chunk_pointers(p, fmt, used, device)]
    text += [f"        __builtin_assume(__isGlobal({a}));\n" for a in used if a != "_srkey"]
    text.append("        const int lane = threadIdx.x & 31;\n"
                "        for (long long b = threadIdx.x >> 5; (b << 8) < n; "
                "b += blockDim.x >> 5) {\n")
    text += [f"            {ln}\n" for ln in _c_tile(p, fmt, lanes)]
    text.append("        }\n    }\n}\n")
    return "".join(text)


def cpp_format_launch_test_source(p: KernelPlan, fmt) -> str:
    """A C++ translation unit running :func:`cuda_format_source`'s multi-tensor kernels as
    the GPU would be launched with them, on the CPU: the same kernel text (its tiles with
    the warp's lanes in a loop), entered once per warp of every block (256 threads, one
    block per chunk), reading the same packed table (``pack_table``) and chunk table
    (``chunk_table``). ``launch(table, chunks, n_tensors, n_chunks, ftz)`` and the capturable
    ``launch_dev(..., k_dev, step_dev, guard, seed_lo, seed_hi, ftz)``. For rules taking
    norms only the capturable launch (its reduction is warp by warp; the other's cooperates
    across a block): ``launch_dev(..., sums, n_blocks, n_elements, ftz)`` runs the
    reduction over ``n_blocks`` blocks, the finishing warp, then the update."""
    fmt = Format.parse(fmt)
    name = f"hw_{p.key}_{fmt.key}_multi"
    base = f"hw_{p.key}_{fmt.key}"

    def launch(fn, calls, extra=""):
        out = [f'extern "C" void {fn}(const long long* table, const long long* chunks, '
               f"long long n_tensors, long long n_chunks{extra}, int ftz) {{",
               "    const unsigned int csr = _mm_getcsr();",
               "    if (ftz) _mm_setcsr(csr | 0x8040);",
               "    blockDim.x = 256;"]
        for grid, call in calls:
            out += [f"    gridDim.x = {grid};",
                    f"    for (long long b = 0; b < {grid}; ++b) {{",
                    "        blockIdx.x = b;",
                    "        for (long long w = 0; w < 8; ++w) {",
                    "            threadIdx.x = 32 * w;",
                    f"            {call};",
                    "        }", "    }"]
        return out + ["    _mm_setcsr(csr);", "}"]
    dev_args = (", const TC* k_dev, const double* step_dev, const double* guard, "
                "unsigned seed_lo, unsigned seed_hi")
    dev_call = (f"{name}_dev(table, chunks, n_tensors, n_chunks, k_dev, step_dev, guard, "
                f"seed_lo, seed_hi{', sums' if p.norms else ''})")
    if p.norms:
        kernels = [c_format_reduce_function(p, fmt),
                   _format_reduce_dev_kernel(p, fmt, base + "_reduce_dev", False),
                   _format_reduce_finish_kernel(p, base + "_reduce_dev_finish", False)]
        launches = launch(
            "launch_dev",
            [("n_blocks", f"{base}_reduce_dev(table, chunks, n_tensors, n_chunks, k_dev, "
                          f"guard, sums)"),
             ("1", f"if (w == 0) {base}_reduce_dev_finish(sums, n_blocks * "
                   f"{FORMAT_REDUCE_WARPS}, n_elements, guard)"),
             ("n_chunks", dev_call)],
            dev_args + ", double* sums, long long n_blocks, long long n_elements")
    else:
        kernels = [_format_multi_kernel(p, fmt, name, "loop")]
        launches = (launch("launch", [("n_chunks", f"{name}(table, chunks, n_tensors, "
                                                   f"n_chunks)")])
                    + launch("launch_dev", [("n_chunks", dev_call)], dev_args))
    return "\n".join([
        "#include <cmath>", "#include <cstring>", "#include <xmmintrin.h>",
        "#define __device__", "#define __forceinline__ inline", "#define __global__",
        "#define __builtin_assume(x) ((void)0)", "#define __isGlobal(x) 1",
        "struct hw_dim3 { long long x; };",
        "static hw_dim3 blockIdx, threadIdx, blockDim, gridDim;",
        "using std::sqrt; using std::fabs; using std::fmax; using std::fmin; using std::pow;",
        "using std::rintf;",
        _c_format_typedefs(fmt), _C_FORMAT_HELPERS, c_format_element_function(p, fmt)]
        + kernels + [_format_multi_kernel(p, fmt, name + "_dev", "loop", device=True)]
        + launches) + "\n"


def _format_reduce_used(p: KernelPlan, fmt: Format) -> list:
    """The buffers (``fmt.arrays`` names) a format's reduction pass reads."""
    reads = []
    for a in p.reduce_reads:
        reads.append("master" if (a == "param" and fmt.master) else a)
        if fmt.quantized and a not in ("param", "grad"):
            reads.append(f"{a}_absmax")
    return [a for a in fmt.arrays(p.arrays) if a in reads]


def _cuda_format_reduce_kernel(p: KernelPlan, fmt: Format, base: str) -> str:
    """:func:`_cuda_reduce_kernel` over the format's buffers."""
    used = _format_reduce_used(p, fmt)
    return _cuda_reduce_kernel(p, base + "_reduce", _c_chunk_pointers(p, fmt, used),
                               _c_format_reduce_call(p, fmt), len(fmt.arrays(p.arrays)))


# Capturable steps of rules taking norms in a format: the table's one tensor's sums of
# squares, each warp's into its own partial (no shared memory, no atomics: a warp's work is
# what the C++ harness runs with its lanes in a loop), then one warp adds the partials in a
# fixed order and stores each total (an RMS's times 1/size): the same bits every run.
FORMAT_REDUCE_WARPS = 8      # warps per block of the reduction (256 threads)


def _format_reduce_dev_kernel(p: KernelPlan, fmt: Format, name: str, warp: bool) -> str:
    """``<base>_reduce_dev(table, chunks, n_tensors, n_chunks, k_dev, guard, sums)``: the
    partials ``sums[K + (block * 8 + warp) * K + j]``; ``warp``: the GPU's text, else the
    C++ harness's (entered once per warp, its lanes in a loop)."""
    k = len(p.norms)
    r = "" if warp else "[lane]"
    used = _format_reduce_used(p, fmt)
    head = _chunk_loop_head(
        p, name, "const TC* __restrict__ k_dev,\n    const double* __restrict__ guard,\n"
                 "    double* __restrict__ sums",
        "    if (guard != nullptr && guard[0] != 0.0) return;\n"
        "    const long long w = threadIdx.x >> 5;\n"
        + ("    const int lane = threadIdx.x & 31;\n" if warp else "")
        + f"    double acc{'' if warp else '[32]'}[{k}];\n"
        + "".join(f"    {ln}\n" for ln in _warp_lanes(
            [f"for (int j = 0; j < {k}; ++j) acc{r}[j] = 0.0;"], warp)),
        columns=len(fmt.arrays(p.arrays)), device_scalars=True)
    call = _c_format_reduce_call(p, fmt)
    call = call[:-len("acc")] + f"acc{r}"         # (its last argument)
    body = [f"{ln}" for ln in _c_chunk_pointers(p, fmt, used)]
    body += _warp_lanes([f"for (long long i = (w << 5) + lane; i < n; i += blockDim.x) "
                         f"{p.key}_reduce({call});"], warp)
    if warp:
        tail = [f"double v{j} = acc[{j}];" for j in range(k)]
    else:
        tail = [f"double v{j}[32];" for j in range(k)] + _warp_lanes(
            [f"v{j}[lane] = acc[lane][{j}];" for j in range(k)], False)
    for j in range(k):
        tail += _warp_butterfly(f"v{j}", warp)
        tail.append(_warp_lane0(
            f"sums[{k} + (blockIdx.x * {FORMAT_REDUCE_WARPS} + w) * {k} + {j}] = "
            f"v{j}{'' if warp else '[0]'};", warp))
    return "".join(head + [f"        {ln}\n" for ln in body] + ["    }\n"]
                   + [f"    {ln}\n" for ln in tail] + ["}\n"])


def _format_reduce_finish_kernel(p: KernelPlan, name: str, warp: bool) -> str:
    """``<base>_reduce_dev_finish(sums, n_parts, n_elements, guard)``: one warp adds each
    norm's ``n_parts`` partials in order into ``sums[j]`` (an RMS's times 1/n_elements, as
    the plain kernels scale it)."""
    k = len(p.norms)
    r = "" if warp else "[lane]"
    lines = ["if (guard != nullptr && guard[0] != 0.0) return;"]
    lines += ["const int lane = threadIdx.x & 31;"] if warp else []
    for j, kind in enumerate(p.norm_kinds):
        lines.append(f"double s{j}{'' if warp else '[32]'};")
        lines += _warp_lanes([f"s{j}{r} = 0.0;",
                              f"for (long long b = lane; b < n_parts; b += 32) "
                              f"s{j}{r} += sums[{k} + b * {k} + {j}];"], warp)
        lines += _warp_butterfly(f"s{j}", warp)
        v = f"s{j}{'' if warp else '[0]'}"
        lines.append(_warp_lane0(
            f"sums[{j}] = {v}{' * (1.0 / (double)n_elements)' if kind == 'rms' else ''};",
            warp))
    return (f'extern "C" __global__ void {name}(\n    double* __restrict__ sums, '
            f"const long long n_parts, const long long n_elements,\n"
            f"    const double* __restrict__ guard)\n{{\n"
            + "".join(f"    {ln}\n" for ln in lines) + "}\n")


def cpp_format_test_source(p: KernelPlan, fmt) -> str:
    """A C++ translation unit running tiles of :func:`cuda_format_source`'s kernel on the
    CPU (the same element function, helpers and tile statements; the warp's lanes in a
    loop): ``run(buffers in fmt.arrays(p.arrays) order, kernel scalars, lo, n, nscale,
    ftz)`` updates elements ``lo`` to ``lo + n`` of one tensor (the buffers point at
    element ``lo``; ``lo`` a multiple of 256), rules taking norms summing them first
    (``nscale``: what each sum is multiplied by before the square root)."""
    fmt = Format.parse(fmt)
    ctype = {"master": "float", "_srkey": "unsigned"}
    ptrs = [f"{ctype.get(a, 'float' if a.endswith('_absmax') else _array_ctype(a))}* {a}"
            for a in fmt.arrays(p.arrays)]
    args = ", ".join(ptrs + [f"const TC k_{s}" for s in p.scalars]
                     + ["const long long lo", "const long long n", "const double* nscale",
                        "int ftz"])
    body = ["const unsigned int csr = _mm_getcsr();",
            "if (ftz) _mm_setcsr(csr | 0x8040);  // flush-to-zero and denormals-are-zero"]
    if fmt.sr:
        body.append("const unsigned kh = _srkey[0] ^ hw_mix32((unsigned)(lo >> 32));")
    if p.norms:
        body += [f"double acc[{len(p.norms)}] = {{{', '.join(['0.0'] * len(p.norms))}}};",
                 f"for (long long i = 0; i < n; ++i) {p.key}_reduce("
                 f"{_c_format_reduce_call(p, fmt)});"]
        body += [f"const TC k_{s} = (TC)sqrt(acc[{j}] * nscale[{j}]);"
                 for j, s in enumerate(p.norm_names)]
    body += ["for (long long b = 0; (b << 8) < n; ++b) {"]
    body += [f"    {ln}" for ln in _c_tile(p, fmt, "loop")]
    body += ["}", "_mm_setcsr(csr);"]
    return "\n".join([
        "#include <cmath>", "#include <cstring>", "#include <xmmintrin.h>",
        "#define __device__", "#define __forceinline__ inline",
        "using std::sqrt; using std::fabs; using std::fmax; using std::fmin; using std::pow;",
        "using std::rintf;",
        _c_format_typedefs(fmt), _C_FORMAT_HELPERS, c_format_element_function(p, fmt),
        c_format_reduce_function(p, fmt) if p.norms else "",
        f'extern "C" void run({args}) {{'] + [f"    {ln}" for ln in body] + ["}"]) + "\n"


def _flag_text(p: KernelPlan) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(vars(p.flags).items()))


def cpp_test_source(p: KernelPlan, dtype: str) -> str:
    """A C++ translation unit running ``<key>_update`` over arrays on the CPU, with
    flush-to-zero switchable, for checking the GPU arithmetic without a GPU."""
    used = _c_used(p)
    ptr_args = [f"{_array_ctype(a)}* {a}" for a in used]
    args = ", ".join(ptr_args + [f"const TC k_{s}" for s in p.all_scalars]
                     + ["long long n", "int ftz"])
    call = ", ".join([f"{a}[i]" for a in used] + [f"k_{s}" for s in p.all_scalars])
    return "\n".join([
        "#include <cmath>",
        "#include <xmmintrin.h>",
        "#define __device__",
        "#define __forceinline__ inline",
        "using std::sqrt; using std::fabs; using std::fmax; using std::fmin; using std::pow;",
        _typedefs(dtypes_for(dtype)),
        c_update_function(p),
        f'extern "C" void run({args}) {{',
        "    const unsigned int csr = _mm_getcsr();",
        "    if (ftz) _mm_setcsr(csr | 0x8040);  // flush-to-zero and denormals-are-zero",
        f"    for (long long i = 0; i < n; ++i) {p.key}_update({call});",
        "    _mm_setcsr(csr);",
        "}",
    ]) + "\n"


def floor_plan(p: KernelPlan) -> KernelPlan:
    """The benchmark yardstick for ``p``: the same arrays read and written, no math beyond
    adding the values read (so no load can be dropped), and for a rule taking norms a
    reduction pass reading the same arrays as its own. Any backend runs it like a rule."""
    reads = [Expr("array", value=a) for a in p.reads]
    total = reads[0]
    for r in reads[1:]:
        total = Expr("add", (total, r))
    order, roots = schedule({o: total for o in p.outputs})
    norms, reduce_order = (), ()
    if p.norms:             # the reduction pass's reads too: one sum of them, reduced
        rr = [Expr("array", value=a) for a in p.reduce_reads]
        s = rr[0]
        for r in rr[1:]:
            s = Expr("add", (s, r))
        reduce_order, found = schedule({"s": s})
        norms = (found["s"],)
    return KernelPlan(p.rule, p.flags, p.arrays, p.outputs, (), tuple(order), roots, {},
                      norms, tuple(reduce_order), ("norm",) if norms else ())


# ----------------------------------------------------------------------------- staged rules
#
# A rule that takes means along an axis (``ops.mean``) or keeps state of another shape than
# its param (``State(shape="rows" | "cols")``: Adafactor's factored second moments) runs on
# the param's shape, seen as a stack of matrices ``(B, m, n)``. Every value of its traced
# graph varies over some of the three axes b, r, c (its *class*: the param and grad over
# all three, a row-shaped state over b and r, a mean over the columns loses c, an RMS of
# the whole array varies over none) and is available after some number of *sweeps*: a
# reduction's value after the sweep that computes it, one more than the latest it depends
# on. Sweep by sweep, each reduction's argument is evaluated over its class's index space
# and summed in float64; then one loop per output buffer's class stores the outputs
# (elements, then rows, then columns: a row or column output reads only old row and column
# state, which the element loop has not changed). Intermediate values are recomputed
# where they are needed (from the inputs and the reductions' results), never stored, so
# every loop evaluates the very statements of the spec's graph.

_FULL = frozenset("brc")
_STATE_CLASS = {None: _FULL, "rows": frozenset("br"), "cols": frozenset("bc")}
STAGE_ROWS = 32          # rows per block of an element sweep (fixed: sums do not depend on
                         # the thread count)


@dataclass(frozen=True)
class Stages:
    """The staged schedule of a plan (``KernelPlan.stages``)."""
    classes: dict        # id(node) -> frozenset of the axes it varies over
    shapes: dict         # array name -> class
    reductions: tuple    # reduction nodes (mean, rms, norm), in schedule order
    levels: tuple        # per reduction: the sweep that computes it (1, 2, ...)

    def cls(self, e: Expr) -> frozenset:
        if e.op == "array":
            return self.shapes[e.value]
        if e.op in ("scalar", "const"):
            return frozenset()
        return self.classes[id(e)]

    def sweeps(self) -> list:
        """[(level, domain class, [reduction indices])] in the order they run."""
        out = {}
        for j, (e, lv) in enumerate(zip(self.reductions, self.levels)):
            out.setdefault((lv, self.cls(e.args[0])), []).append(j)
        order = sorted(out, key=lambda k: (k[0], -len(k[1]), sorted(k[1])))
        return [(lv, dom, out[(lv, dom)]) for lv, dom in order]


def staged_plan(rule: Rule, flags, outputs, arrays, base, derived, order, roots) -> KernelPlan:
    """The :class:`KernelPlan` of a staged rule (see above), ``stages`` set."""
    shapes = {"param": _FULL, "grad": _FULL}
    shapes.update({s.name: _STATE_CLASS[s.shape] for s in rule.active_states(flags)})
    classes, levels = {}, {}

    def cls(e):
        if e.op == "array":
            return shapes[e.value]
        return frozenset() if e.op in ("scalar", "const") else classes[id(e)]

    for e in order:
        arg = frozenset().union(*(cls(a) for a in e.args))
        lv = max((levels.get(id(a), 0) for a in e.args), default=0)
        if e.op == "mean":
            axis = "c" if e.value == -1 else "r"
            if axis not in arg:
                raise ValueError(f"rule {rule.name} takes ops.mean(..., axis={e.value}) of a "
                                 f"value that does not vary along that axis")
            classes[id(e)], levels[id(e)] = arg - {axis}, lv + 1
        elif e.op in _REDUCTIONS:
            if not arg:
                raise ValueError(f"rule {rule.name} takes ops.{e.op} of a single number")
            classes[id(e)], levels[id(e)] = frozenset(), lv + 1
        else:
            classes[id(e)], levels[id(e)] = arg, lv
    for name, e in roots.items():
        if cls(e) - shapes[name]:
            raise ValueError(f"rule {rule.name} writes {name} ({''.join(sorted(shapes[name]))}"
                             f"-shaped) with a value that varies along more axes "
                             f"({''.join(sorted(cls(e)))})")
    reductions = [e for e in order if e.op == "mean" or e.op in _REDUCTIONS]
    for j, e in enumerate(reductions):
        if e.op in _REDUCTIONS:
            e.value = j                       # its name in printed code: k__n<j>
    used = {a.value for e in order for a in e.args if a.op == "scalar"}
    used |= {e.value for e in roots.values() if e.op == "scalar"}
    scalars = tuple(n for n in base if n in used) + tuple(derived)
    stages = Stages(classes, shapes, tuple(reductions),
                    tuple(levels[id(e)] for e in reductions))
    return KernelPlan(rule, flags, arrays, tuple(outputs), scalars, tuple(order), roots,
                      derived, stages=stages)


def stack_dims(shape) -> tuple:
    """A param of ``shape`` seen as a stack of matrices: (B, m, n)."""
    n = shape[-1] if len(shape) else 1
    m = shape[-2] if len(shape) > 1 else 1
    b = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return b, m, n


def _stage_closure(targets, reductions: set) -> tuple:
    """(ids of the nodes ``targets`` need, the arrays they read), reductions (ids in
    ``reductions``) taken as leaves: what a staged loop evaluates for them."""
    need, arrs, stack = set(), set(), list(targets)
    while stack:
        e = stack.pop()
        if id(e) in need or e.op in ("scalar", "const"):
            continue
        need.add(id(e))
        if e.op == "array":
            arrs.add(e.value)
        elif id(e) not in reductions:
            stack.extend(e.args)
    return need, arrs


def _stage_index(k: frozenset) -> str:
    """The flat index of a value of class ``k`` in a loop that has ``i``, ``_row``, ``_b``
    and ``_c`` as it needs them."""
    if k == _FULL:
        return "i"
    return {frozenset("br"): "_row", frozenset("bc"): "_b * _n + _c",
            frozenset("b"): "_b", frozenset(): "0"}[k]


def _stage_size(k: frozenset) -> str:
    return {_FULL: "_B * _m * _n", frozenset("br"): "_B * _m", frozenset("bc"): "_B * _n",
            frozenset("b"): "_B", frozenset(): "1"}[k]


def numba_staged_source(p: KernelPlan, dtype: str, cache: bool = True) -> str:
    """A Python module running a staged plan (``p.stages``) on one param, as ``run(arrays,
    B, m, n, scalars, par)``: ``arrays`` flat (in ``Format.arrays(p.arrays)`` order; row- and
    column-shaped states of ``B*m`` and ``B*n`` elements), ``scalars`` the kernel scalars
    (the compute dtype), ``par`` whether the element loops run in parallel. One Numba
    function per sweep and per output loop (parallel and serial twins); ``run`` allocates
    the sums and calls them. ``dtype``: the compute dtype or a storage format's key: loads
    convert into the compute dtype and stores round back, as the flat kernels'; an int8
    state's new values go to a float32 scratch array that a last loop encodes block by
    block (a block's scale needs all of its values, and the stores visit a state's
    elements in rows, not in blocks)."""
    fmt = Format.parse(dtype)
    dtype = fmt.compute
    names = fmt.arrays(p.arrays)
    qs = [o for o in p.outputs if fmt.quantized and o not in ("param", "grad")]
    st = p.stages
    # int8 row and column states, decoded into float32 arrays before the sweeps (an
    # element loop would decode a column factor's element once per row: 4x slower); the
    # stores write int8 states only at the end, so the decoded values stay current
    dq = [a for a in p.arrays[2:] if fmt.quantized and st.shapes[a] != _FULL]
    consts, nm = _numba_namer()
    red_ids = {id(e): j for j, e in enumerate(st.reductions)}
    for j, e in enumerate(st.reductions):
        if e.op == "mean":
            nm.names[id(e)] = f"_q{j}"
    body_of = {}
    for e in p.order:                       # one statement per node, printed once
        if id(e) not in red_ids:
            body_of[id(e)] = f"{nm.new(e)} = {_nb_expr(e, nm)}"

    def tier(k: frozenset) -> int:
        """Where an element loop computes a value of class ``k``: once per block (it
        varies with b at most), per row, or per element."""
        return 2 if "c" in k else (1 if "r" in k else 0)

    def statements(targets, elem: bool) -> tuple:
        """Loads and statements computing ``targets`` (nodes), reductions as loads, as
        (per block, per row, per element) lines for an element loop (``elem``; a row or
        column loop runs all three per index). Hoisting what does not vary along a row,
        and reading each row through a view indexed by the column alone (an index Numba
        knows is not negative), lets LLVM vectorise the element loop: 3x faster."""
        out = ([], [], [])
        for t, ln in _statements(targets, elem):
            out[t if elem else 2].append(ln)
        return out

    def _at(name: str, k: frozenset, elem: bool) -> str:
        """``name``'s element for a value of class ``k``: in an element loop, through the
        row's view (``<name>_r``) or the matrix's column view (``<name>_bc``)."""
        if elem and k == _FULL:
            return f"{name}_r[_c]"
        if elem and k == frozenset("bc"):
            return f"{name}_bc[_c]"
        return f"{name}[{_stage_index(k)}]"

    def views(elem: bool) -> tuple:
        """(per block, per row) view definitions an element loop indexes through."""
        if not elem:
            return [], []
        blk = [f"{a}_bc = {a}[_b * _n:_b * _n + _n]" for a in p.arrays
               if st.shapes[a] == frozenset("bc")]
        blk += [f"_D{j}_bc = _D{j}[_b * _n:_b * _n + _n]" for j, a in enumerate(dq)
                if st.shapes[a] == frozenset("bc")]
        blk += [f"_V{j}_bc = _V{j}[_b * _n:_b * _n + _n]" for j, e in enumerate(st.reductions)
                if st.cls(e) == frozenset("bc")]
        row = [f"{a}_r = {a}[_row * _n:_row * _n + _n]" for a in p.arrays
               if st.shapes[a] == _FULL]
        row += ["master_r = master[_row * _n:_row * _n + _n]"] if fmt.master else []
        return blk, row

    def flat(k: frozenset, elem: bool) -> str:
        """The flat index of a class ``k`` value (in an element loop: of ``_row``, ``_c``)."""
        return "_row * _n + _c" if (elem and k == _FULL) else _stage_index(k)

    def load(a: str, elem: bool) -> str:
        """Buffer ``a``'s value in the compute dtype (its format's load)."""
        k = st.shapes[a]
        if a == "param" and fmt.master:
            return _at("master", k, elem)
        if a in dq:                             # (decoded once, before the sweeps)
            return _at(f"_D{dq.index(a)}", k, elem)
        if fmt.quantized and a not in ("param", "grad"):
            return f"_q_load({_at(a, k, elem)}, {a}_absmax[({flat(k, elem)}) >> 8])"
        return _nb_load(fmt, a, _at(a, k, elem))

    def store(o: str, elem: bool, v: str) -> list:
        """Output ``o``'s new value ``v`` into its storage."""
        k, ref = st.shapes[o], _at(o, st.shapes[o], elem)
        if o in qs:                             # (encoded by the quantize loops)
            return [f"_T{qs.index(o)}[{flat(k, elem)}] = {v}"]
        if o == "param" and fmt.master:
            return [f"{_at('master', k, elem)} = {v}",
                    f"{ref} = {_nb_store(fmt, 'param', v)}"]
        if o == "param" and fmt.sr:             # element i's bits: (i mod 2**32) ^ key ^
            f = "_bf_sr" if fmt.param == "bfloat16" else "_h_sr"    # mix32(i >> 32)
            return [f"_ix = np.uint64({flat(k, elem)})",
                    f"{ref} = {f}({v}, _mix32(_ix ^ _kh ^ _mix32(_ix >> _U32)))"]
        return [f"{ref} = {_nb_store(fmt, o, v)}"]

    def _statements(targets, elem: bool) -> list:
        need, arrs = _stage_closure(targets, red_ids)
        lines = [(tier(st.shapes[a]), f"x_{a} = {load(a, elem)}")
                 for a in p.arrays if a in arrs]
        for e in st.reductions:
            if id(e) in need:
                j = red_ids[id(e)]
                name = f"_q{j}" if e.op == "mean" else f"k__n{j}"
                lines.append((tier(st.cls(e)), f"{name} = {_at(f'_V{j}', st.cls(e), elem)}"))
        lines += [(tier(st.cls(e)), body_of[id(e)]) for e in p.order
                  if id(e) in need and id(e) in body_of]
        return lines

    n_red = len(st.reductions)
    args = ", ".join(list(names) + ["_B", "_m", "_n"] + [f"k_{s}" for s in p.scalars]
                     + [f"_V{j}" for j in range(n_red)] + [f"_S{j}" for j in range(n_red)]
                     + [f"_P{j}" for j in range(n_red)] + [f"_T{j}" for j in range(len(qs))]
                     + [f"_D{j}" for j in range(len(dq))])
    funcs, calls = [], []

    def value(j):
        e = st.reductions[j]
        v = nm(e.args[0])
        return f"np.float64({v})" if e.op == "mean" else f"np.float64({v}) * np.float64({v})"

    def loop(dom: frozenset, inner: list, par: bool, acc_before=(), acc_after=(),
             block_before=(), block_after=()) -> list:
        """A loop over the index space of class ``dom`` running ``inner`` per index."""
        rng = "prange" if par else "range"
        if dom == _FULL:
            out = ["_nbm = (_m + %d - 1) // %d" % (STAGE_ROWS, STAGE_ROWS),
                   f"for _k in {rng}(_B * _nbm):",
                   "    _b = _k // _nbm",
                   f"    _r0 = _b * _m + (_k - _b * _nbm) * {STAGE_ROWS}",
                   f"    _r1 = min(_b * _m + _m, _r0 + {STAGE_ROWS})"]
            out += [f"    {ln}" for ln in block_before]
            out += ["    for _row in range(_r0, _r1):"]
            out += [f"        {ln}" for ln in acc_before]
            out += ["        for _c in range(_n):"]
            out += [f"            {ln}" for ln in inner]
            out += [f"        {ln}" for ln in acc_after]
            out += [f"    {ln}" for ln in block_after]
            return out
        if dom == frozenset("br"):
            out = [f"for _row in {rng}(_B * _m):", "    _b = _row // _m"]
        elif dom == frozenset("bc"):
            out = [f"for _j in {rng}(_B * _n):", "    _b = _j // _n", "    _c = _j - _b * _n"]
        else:
            raise ValueError(f"rule {p.rule.name}: no loop over a {sorted(dom)} value")
        return out + [f"    {ln}" for ln in inner]

    for s, (lv, dom, js) in enumerate(st.sweeps()):
        for par in (True, False):
            elem = dom == _FULL
            blk, per_row, inner = statements([st.reductions[j].args[0] for j in js], elem)
            vb, vr = views(elem)
            inner += [f"_v{j} = {value(j)}" for j in js]
            acc_before, acc_after, block_before, block_after = vr + per_row, [], vb + blk, []
            for j in js:
                k = st.cls(st.reductions[j])
                if dom == _FULL and k == frozenset("br"):      # a row: summed in one block
                    acc_before.append(f"_a{j} = 0.0")
                    inner.append(f"_a{j} += _v{j}")
                    acc_after.append(f"_S{j}[_row] = _a{j}")
                elif dom == _FULL and k == frozenset("bc"):    # columns: a partial per block
                    block_before.append(f"_P{j}_k = _P{j}[_k]")
                    inner.append(f"_P{j}_k[_c] += _v{j}")
                elif dom == _FULL:                             # per matrix or whole array
                    block_before.append(f"_a{j} = 0.0")
                    inner.append(f"_a{j} += _v{j}")
                    block_after.append(f"_P{j}[_k, 0] = _a{j}")
                else:                                          # small: serial, in order
                    inner.append(f"_S{j}[{_stage_index(k)}] += _v{j}")
            name = f"sweep{s}_{'p' if par else 's'}"
            par_here = par and dom == _FULL
            funcs += [_njit_line(par_here, cache).replace(
                          "nogil=True", "nogil=True, fastmath={'reassoc'}"),
                      f"def {name}({args}):"]
            funcs += [f"    {ln}" for ln in loop(dom, inner, par_here, acc_before, acc_after,
                                                 block_before, block_after)]
            funcs.append("")
        calls.append((s, dom, js))
    out_loops = []
    for dom in (_FULL, frozenset("br"), frozenset("bc")):
        outs = [o for o in p.outputs if st.shapes[o] == dom]
        if not outs:
            continue
        for par in (True, False):
            elem = dom == _FULL
            blk, per_row, inner = statements([p.roots[o] for o in outs], elem)
            vb, vr = views(elem)
            blk, per_row = vb + blk, vr + per_row
            inner += [ln for o in outs for ln in store(o, elem, nm(p.roots[o]))]
            if fmt.sr and "param" in outs:
                blk = ["_kh = np.uint64(_srkey[0])"] + blk
            name = f"store_{''.join(sorted(dom))}_{'p' if par else 's'}"
            funcs += [_njit_line(par, cache), f"def {name}({args}):"]
            funcs += [f"    {ln}" for ln in loop(dom, inner, par, acc_before=per_row,
                                                 block_before=blk)]
            funcs.append("")
        out_loops.append("".join(sorted(dom)))
    for par in (True, False):                   # int8 states: each block's scale, codes
        funcs += [_njit_line(par, cache), "def quant_%s(_T, codes, absmax):" % "sp"[par],
                  f"    for _k in {'prange' if par else 'range'}((_T.shape[0] + 255) >> 8):",
                  "        _lo = _k << 8",
                  "        _hi = min(_T.shape[0], _lo + 256)",
                  "        _A = _Z32",
                  "        _N = False",
                  "        for i in range(_lo, _hi):",
                  "            _A = max(_A, _abs_bits(_T[i]))",
                  "            _N = _N | (_T[i] < 0)",
                  "        _pre, _inv, _u, _a = _q_scale(np.uint64(_A), _N)",
                  "        for i in range(_lo, _hi):",
                  "            codes[i] = _q_code(_T[i], _pre, _inv, _u)",
                  "        absmax[_k] = _a", ""] if qs else []
        funcs += [_njit_line(par, cache), "def dequant_%s(codes, absmax, _D):" % "sp"[par],
                  f"    for i in {'prange' if par else 'range'}(_D.shape[0]):",
                  "        _D[i] = _q_load(codes[i], absmax[i >> 8])", ""] if dq else []
    # the drivers (one per variant, compiled): sums, sweeps, each reduction finished from
    # its block partials in block order, then the stores; one call per param
    arrays = ", ".join(names)
    scal = "".join(f", k_{s}" for s in p.scalars)
    drv = []
    for sfx in ("p", "s"):
        drv += [_njit_line(False, cache), f"def run_{sfx}({arrays}, _B, _m, _n{scal}):",
                f"    _nbm = (_m + {STAGE_ROWS} - 1) // {STAGE_ROWS}",
                "    _nblk = _B * _nbm"]
        drv += [f"    _T{j} = np.empty({_stage_size(st.shapes[o])}, np.float32)"
                for j, o in enumerate(qs)]
        for j, a in enumerate(dq):
            drv += [f"    _D{j} = np.empty({_stage_size(st.shapes[a])}, np.float32)",
                    f"    dequant_{sfx}({a}, {a}_absmax, _D{j})"]
        for j, e in enumerate(st.reductions):
            k, dom = st.cls(e), st.cls(e.args[0])
            width = "_n" if (dom == _FULL and k == frozenset("bc")) else "1"
            rows = "_nblk" if dom == _FULL and k != frozenset("br") else "0"
            drv += [f"    _V{j} = np.empty({_stage_size(k)}, np.{dtype})",
                    f"    _S{j} = np.zeros({_stage_size(k)})",
                    f"    _P{j} = np.zeros(({rows}, {width}))"]
        rest = (f"{arrays}, _B, _m, _n{scal}, "
                + ", ".join([f"_V{j}" for j in range(n_red)] + [f"_S{j}" for j in range(n_red)]
                            + [f"_P{j}" for j in range(n_red)]
                            + [f"_T{j}" for j in range(len(qs))]
                            + [f"_D{j}" for j in range(len(dq))]))
        for s_, dom, js in calls:
            drv.append(f"    sweep{s_}_{sfx}({rest})")
            for j in js:
                e, k = st.reductions[j], st.cls(st.reductions[j])
                if dom == _FULL and k == frozenset("bc"):     # column partials, in block order
                    drv += ["    for _b in range(_B):",
                            "        for _kk in range(_b * _nbm, (_b + 1) * _nbm):",
                            "            for _c in range(_n):",
                            f"                _S{j}[_b * _n + _c] += _P{j}[_kk, _c]"]
                elif dom == _FULL and k == frozenset("b"):
                    drv += ["    for _kk in range(_nblk):",
                            f"        _S{j}[_kk // _nbm] += _P{j}[_kk, 0]"]
                elif dom == _FULL and not k:
                    drv += ["    for _kk in range(_nblk):", f"        _S{j}[0] += _P{j}[_kk, 0]"]
                count = ("_n" if e.value == -1 else "_m") if e.op == "mean" else \
                    _stage_size(dom)
                fin = {"mean": f"_S{j}[_q] / ({count})",
                       "rms": f"np.sqrt(_S{j}[_q] / ({count}))"}.get(e.op, f"np.sqrt(_S{j}[_q])")
                drv += [f"    for _q in range(_V{j}.shape[0]):",
                        f"        _V{j}[_q] = np.{dtype}({fin})"]
        drv += [f"    store_{dom}_{sfx}({rest})" for dom in out_loops]
        drv += [f"    quant_{sfx}(_T{j}, {o}, {o}_absmax)" for j, o in enumerate(qs)]
        drv.append("")
    drv += ["", "def run(arrays, _B, _m, _n, scalars, par):",
            "    (run_p if par else run_s)(*arrays, _B, _m, _n, *scalars)", ""]
    # many params at once: a prange over them, each stepped by the serial driver (the same
    # bits as alone); arrays as addresses (``_at``), their (B, m, n) in ``_dims``
    size_of = {_FULL: "_B * _m * _n", frozenset("br"): "_B * _m", frozenset("bc"): "_B * _n"}

    def carr(a, j):
        at = "_at" if fmt.plain else f"_at_{_nb_array_type(fmt, a)}"
        if a == "_srkey":
            n = "1"
        elif a.endswith("_absmax"):
            n = f"({size_of[st.shapes[a[:-7]]]} + 255) >> 8"
        else:
            n = size_of[st.shapes["param" if a == "master" else a]]
        return f"        {a} = carray({at}(_ptrs[_t, {j}]), {n})"
    drv += [""] + _nb_at_lines(p, fmt, names, doc=False) + [
            "",
            _njit_line(True, cache),
            "def run_many(_ptrs, _dims, _scalars):",
            "    for _t in prange(_ptrs.shape[0]):",
            "        _B = _dims[_t, 0]",
            "        _m = _dims[_t, 1]",
            "        _n = _dims[_t, 2]"]
    drv += [carr(a, j) for j, a in enumerate(names)]
    drv.append(f"        run_s({arrays}, _B, _m, _n"
               + "".join(f", _scalars[{j}]" for j in range(len(p.scalars))) + ")")
    head = [f"# Generated by hwoptim from the {p.rule.name} spec ({_flag_text(p)}), "
            f"{fmt.key}: staged (sweeps, then stores).",
            "# Edit the spec in hwoptim/rules, not this file.",
            "import numpy as np",
            "from numba import carray, njit, prange, types",
            "from numba.extending import intrinsic", ""]
    if not fmt.plain:
        head += _NB_FORMAT_HELPERS.splitlines() + [""]
    head += _typed_constants(consts, dtype)
    return "\n".join(head + ["", ""] + funcs + [""] + drv) + "\n"



# ----------------------------------------------------------------------------- staged, CUDA
#
# A staged plan on the GPU, kernel by kernel in the Numba driver's order. Each sweep over
# the elements gives one warp a tile of 32 rows x 32 columns of one matrix: lane l takes
# column l of the tile, row after row (every load of the warp reads 32 consecutive
# elements). Per row, a row sum is reduced across the warp by shuffles and written as the
# tile's partial; a column sum stays in the lane's register over the tile's rows; a sum of
# the whole array stays in registers until the tile ends. A "finish" kernel then sums each
# reduction's partials in a fixed order (one warp per result: lanes take every 32nd
# partial, then shuffles) and stores its value (mean, RMS or norm, in the kernel dtype).
# A sweep over rows or columns (a mean of a row-shaped value: small) is one warp per
# result. Then the stores: elements, rows, columns, as the Numba driver. No atomics, no
# shared memory: the same partials in the same order every run, and a warp's work is
# plain enough that the C++ test harness runs the very statements with the 32 lanes in a
# loop and the shuffles as index arithmetic (lane l adds lane l ^ o's value to its own, as
# __shfl_xor_sync does).

_TILE = 32              # the tile's rows and columns (a warp's width)


@dataclass(frozen=True)
class CudaStaged:
    source: str
    launches: tuple       # (kernel name, kind, reduction index or dom) in launch order


def _c_staged_load(p: KernelPlan, fmt: Format, a: str) -> str:
    """Buffer ``a``'s value at its class's index, in the compute type (its format's load)."""
    idx = _stage_index(p.stages.shapes[a])
    if fmt.plain:
        return f"(TC){a}[{idx}]"
    if a == "param" and fmt.master:
        return f"master[{idx}]"
    if fmt.quantized and a not in ("param", "grad"):
        return f"hw_q_load({a}[{idx}], {a}_absmax[({idx}) >> 8])"
    f = {"bfloat16": "hw_bf_load", "float16": "hw_h_load"}.get(fmt.storage(a))
    return f"{f}({a}[{idx}])" if f else f"{a}[{idx}]"


def _c_staged_store(p: KernelPlan, fmt: Format, o: str, v: str) -> list:
    """Output ``o``'s new value ``v`` into its storage at its class's index; an int8
    state's into its float32 scratch ``_T<j>`` (the quantize kernels encode it)."""
    idx = _stage_index(p.stages.shapes[o])
    qs = _staged_quantized(p, fmt)
    if fmt.plain:
        return [f"{o}[{idx}] = ({_array_ctype(o)}){v};"]
    if o in qs:
        return [f"_T{qs.index(o)}[{idx}] = {v};"]
    if o == "param" and fmt.master:
        return [f"master[{idx}] = {v};", f"param[{idx}] = {_c_round(fmt, 'param', v)};"]
    if o == "param" and fmt.sr:      # element i's bits: (i mod 2^32) ^ key ^ mix32(i >> 32)
        f = "hw_bf_sr" if fmt.param == "bfloat16" else "hw_h_sr"
        return [f"param[{idx}] = {f}({v}, hw_mix32((unsigned)({idx}) ^ _srkey[0] ^ "
                f"hw_mix32((unsigned)(({idx}) >> 32))));"]
    return [f"{o}[{idx}] = {_c_round(fmt, o, v)};"]


def _warp_lanes(lines, warp: bool) -> list:
    """A warp's statements: as they are on the GPU (``warp``), or for the C++ harness with
    the 32 lanes in a loop (each lane's values then arrays indexed by ``lane``)."""
    if warp:
        return lines
    return (["for (int lane = 0; lane < 32; ++lane) {"] + [f"    {ln}" for ln in lines]
            + ["}"])


def _warp_butterfly(x: str, warp: bool) -> list:
    """Every lane's ``x`` summed across the warp (``__shfl_xor_sync``; in the C++ harness
    lane l adds lane l ^ o's value to its own, as the shuffle does)."""
    if warp:
        return [f"for (int o = 16; o > 0; o >>= 1) {x} += __shfl_xor_sync(0xffffffffu, "
                f"{x}, o);"]
    return ["for (int o = 16; o > 0; o >>= 1) {",
            "    double y[32];",
            f"    for (int l = 0; l < 32; ++l) y[l] = {x}[l] + {x}[l ^ o];",
            f"    for (int l = 0; l < 32; ++l) {x}[l] = y[l];", "}"]


def _warp_lane0(line: str, warp: bool) -> str:
    return f"if (lane == 0) {line}" if warp else line


def _staged_quantized(p: KernelPlan, fmt: Format) -> list:
    """The int8 states a staged step writes (each through a float32 scratch array)."""
    return [o for o in p.outputs if fmt.quantized and o not in ("param", "grad")]


def _c_staged_lines(p: KernelPlan, targets, fmt: Format) -> list:
    """C statements computing ``targets`` (nodes of the staged plan ``p``) at the indices
    ``i``, ``_row``, ``_b``, ``_c``: the arrays' and the reductions' values loaded by their
    class (reductions' results from ``_V<j>``), then the spec's statements each printed
    once, as :func:`numba_staged_source`'s loops evaluate them."""
    st = p.stages
    nm = _Namer(lambda v: f"(TC){v!r}")
    red = {id(e): j for j, e in enumerate(st.reductions)}
    for j, e in enumerate(st.reductions):
        if e.op == "mean":
            nm.names[id(e)] = f"_q{j}"
    need, arrs = _stage_closure(targets, red)
    lines = [f"const TC x_{a} = {_c_staged_load(p, fmt, a)};" for a in p.arrays if a in arrs]
    for e in st.reductions:
        if id(e) in need:
            lines.append(f"const TC {nm(e)} = _V{red[id(e)]}[{_stage_index(st.cls(e))}];")
    for e in p.order:
        if id(e) in need and id(e) not in red:
            t = "bool" if _is_bool(e) else "TC"
            lines.append(f"const {t} {nm.new(e)} = {_c_expr(e, nm)};")
    return lines, nm


def _staged_parts(p: KernelPlan, fmt: Format) -> tuple:
    """(kernel arguments, device functions, [(name, kind, what, body lines of the "warp"
    and "loop" variants, work-item count)]) of :func:`cuda_staged_source`."""
    st = p.stages
    full_js = [j for j, e in enumerate(st.reductions) if st.cls(e.args[0]) == _FULL]
    qs = _staged_quantized(p, fmt)
    arrays, written = [], set(p.outputs) | {f"{o}_absmax" for o in qs}
    if "param" in p.outputs:
        written.add("master")
    for a in fmt.arrays(p.arrays):
        t = ("float" if a == "master" or a.endswith("_absmax") else
             "unsigned" if a == "_srkey" else _array_ctype(a))
        arrays.append(f"{'' if a in written else 'const '}{t}* __restrict__ {a}")
    args = (arrays + [f"TC* __restrict__ _V{j}" for j in range(len(st.reductions))]
            + [f"double* __restrict__ _P{j}" for j in full_js]
            + [f"float* __restrict__ _T{j}" for j in range(len(qs))]
            + ["const long long _B", "const long long _m", "const long long _n"]
            + [f"const TC k_{s}" for s in p.scalars])
    names = (list(fmt.arrays(p.arrays)) + [f"_V{j}" for j in range(len(st.reductions))]
             + [f"_P{j}" for j in full_js] + [f"_T{j}" for j in range(len(qs))]
             + ["_B", "_m", "_n"] + [f"k_{s}" for s in p.scalars])
    idx_args = ["const long long i", "const long long _row", "const long long _b",
                "const long long _c"]
    funcs = []
    sweeps = st.sweeps()
    for s, (lv, dom, js) in enumerate(sweeps):
        lines, nm = _c_staged_lines(p, [st.reductions[j].args[0] for j in js], fmt)
        for j in js:
            v = nm(st.reductions[j].args[0])
            lines.append(f"v{j} = (double)({v});" if st.reductions[j].op == "mean"
                         else f"v{j} = (double)({v}) * (double)({v});")
        sig = ",\n    ".join(args + idx_args + [f"double& v{j}" for j in js])
        funcs.append(f"__device__ __forceinline__ void {p.key}_sweep{s}(\n    {sig})\n{{\n"
                     + "\n".join(f"    {ln}" for ln in lines) + "\n}\n")
    stores = []
    for dom in (_FULL, frozenset("br"), frozenset("bc")):
        outs = [o for o in p.outputs if st.shapes[o] == dom]
        if not outs:
            continue
        tag = "".join(sorted(dom))
        lines, nm = _c_staged_lines(p, [p.roots[o] for o in outs], fmt)
        lines += [ln for o in outs for ln in _c_staged_store(p, fmt, o, nm(p.roots[o]))]
        sig = ",\n    ".join(args + idx_args)
        funcs.append(f"__device__ __forceinline__ void {p.key}_store_{tag}(\n    {sig})\n{{\n"
                     + "\n".join(f"    {ln}" for ln in lines) + "\n}\n")
        stores.append((dom, tag))
    call = ", ".join(names)
    lanes, butterfly, lane0 = _warp_lanes, _warp_butterfly, _warp_lane0

    def fin(j, total):
        e, dom = st.reductions[j], st.cls(st.reductions[j].args[0])
        if e.op == "mean":
            return f"{total} / (double)({'_n' if e.value == -1 else '_m'})"
        if e.op == "rms":
            return f"sqrt({total} / (double)({_stage_size(dom)}))"
        return f"sqrt({total})"

    kernels = []
    for s, (lv, dom, js) in enumerate(sweeps):
        if dom == _FULL:
            for warp in (True, False):
                r = "" if warp else "[lane]"
                body = ["const long long kt = w / nbn;", "const long long ct = w - kt * nbn;",
                        "const long long _b = kt / nbm;",
                        f"const long long r0 = _b * _m + (kt - _b * nbm) * {_TILE};",
                        f"const long long r1 = r0 + {_TILE} < _b * _m + _m ? r0 + {_TILE} "
                        f": _b * _m + _m;"]
                keep = [j for j in js if st.cls(st.reductions[j]) != frozenset("br")]
                body += [f"double a{j}{'' if warp else '[32]'};" for j in keep]
                body += lanes([f"a{j}{r} = 0.0;" for j in keep], warp)
                body += ["for (long long _row = r0; _row < r1; ++_row) {"]
                row = [f"double v{j}{'' if warp else '[32]'};" for j in js]
                each = [f"v{j}{r} = 0.0;" for j in js]
                each += ["const long long _c = ct * 32 + lane;",
                         f"if (_c < _n) {p.key}_sweep{s}({call}, _row * _n + _c, _row, _b, _c, "
                         f"{', '.join(f'v{j}{r}' for j in js)});"]
                each += [f"a{j}{r} += v{j}{r};" for j in keep]
                row += lanes(each, warp)
                for j in js:
                    if st.cls(st.reductions[j]) == frozenset("br"):
                        row += butterfly(f"v{j}", warp)
                        row.append(lane0(f"_P{j}[_row * nbn + ct] = v{j}{'' if warp else '[0]'};",
                                         warp))
                body += [f"    {ln}" for ln in row] + ["}"]
                cols = [j for j in keep if st.cls(st.reductions[j]) == frozenset("bc")]
                if cols:
                    body += lanes(["const long long _c = ct * 32 + lane;"]
                                  + [f"if (_c < _n) _P{j}[kt * _n + _c] = a{j}{r};" for j in cols],
                                  warp)
                for j in keep:
                    if j not in cols:
                        body += butterfly(f"a{j}", warp)
                        body.append(lane0(f"_P{j}[w] = a{j}{'' if warp else '[0]'};", warp))
                if warp:
                    warp_body = body
            kernels.append((f"sweep{s}", "sweep", s, warp_body, body, "_B * nbm * nbn"))
            for j in js:
                k = st.cls(st.reductions[j])
                if k == frozenset("br"):
                    head, cnt, at = [], "nbn", "q * nbn + x"
                elif k == frozenset("bc"):
                    head = ["const long long _b = q / _n;", "const long long _c = q - _b * _n;"]
                    cnt, at = "nbm", "(_b * nbm + x) * _n + _c"
                elif not k:
                    head, cnt, at = [], "_B * nbm * nbn", "x"
                else:
                    raise ValueError(f"rule {p.rule.name}: no GPU sweep gives a "
                                     f"{''.join(sorted(k))}-shaped sum of the elements")
                kernels.append((f"finish{j}", "finish", j)
                               + _finish_bodies(head, cnt, f"_P{j}[{at}]", j, fin, lanes,
                                                butterfly, lane0)
                               + (_stage_size(k),))
        else:
            for j in js:
                k = st.cls(st.reductions[j])
                spaces = {(frozenset("br"), frozenset("b")):
                          ("_m", ["const long long _row = q * _m + x;", "const long long _b = q;",
                                  "const long long _c = 0;"]),
                          (frozenset("br"), frozenset()):
                          ("_B * _m", ["const long long _row = x;",
                                       "const long long _b = x / _m;", "const long long _c = 0;"]),
                          (frozenset("bc"), frozenset("b")):
                          ("_n", ["const long long _row = 0;", "const long long _b = q;",
                                  "const long long _c = x;"]),
                          (frozenset("bc"), frozenset()):
                          ("_B * _n", ["const long long _row = 0;",
                                       "const long long _b = x / _n;",
                                       "const long long _c = x - _b * _n;"]),
                          (frozenset("b"), frozenset()):
                          ("_B", ["const long long _row = 0;", "const long long _b = x;",
                                  "const long long _c = 0;"])}
                if (dom, k) not in spaces:
                    raise ValueError(f"rule {p.rule.name}: no GPU sweep sums a "
                                     f"{''.join(sorted(dom))}-shaped value into a "
                                     f"{''.join(sorted(k))}-shaped one")
                cnt, head = spaces[(dom, k)]
                value = (head + [f"double v{jj};" for jj in js]
                         + [f"{p.key}_sweep{s}({call}, 0, _row, _b, _c, "
                            f"{', '.join(f'v{jj}' for jj in js)});"])
                kernels.append((f"small{j}", "small", j)
                               + _finish_bodies([], cnt, value, j, fin, lanes, butterfly, lane0,
                                                f"v{j}")
                               + (_stage_size(k),))
    for dom, tag in stores:
        if dom == _FULL:
            body = ["const long long _row = i / _n;", "const long long _b = _row / _m;",
                    "const long long _c = i - _row * _n;"]
        elif dom == frozenset("br"):
            body = ["const long long _row = i;", "const long long _b = i / _m;",
                    "const long long _c = 0;"]
        else:
            body = ["const long long _row = 0;", "const long long _b = i / _n;",
                    "const long long _c = i - _b * _n;"]
        body.append(f"{p.key}_store_{tag}({call}, i, _row, _b, _c);")
        kernels.append((f"store_{tag}", "store", tag, body, body, _stage_size(dom)))
    for j, o in enumerate(qs):      # int8 states: a warp per block of 256 (8 elements a
        size = _stage_size(st.shapes[o])        # lane), its absmax by shuffles, then codes
        bodies = []
        for warp in (True, False):
            r = "" if warp else "[lane]"
            body = ["const long long base = q << 8;",
                    f"unsigned A{'' if warp else '[32]'}; bool N{'' if warp else '[32]'};"]
            body += lanes([f"A{r} = 0u;", f"N{r} = false;",
                           "for (int k = 0; k < 8; ++k) {",
                           "    const long long i = base + lane + 32 * k;",
                           f"    if (i < {size}) {{",
                           f"        A{r} = A{r} > hw_abs_bits(_T{j}[i]) ? A{r} : "
                           f"hw_abs_bits(_T{j}[i]);",
                           f"        N{r} = N{r} || _T{j}[i] < 0.0f;", "    }", "}"], warp)
            if warp:
                body += ["for (int o = 16; o > 0; o >>= 1) {",
                         "    const unsigned y = __shfl_xor_sync(0xffffffffu, A, o);",
                         "    A = A > y ? A : y;", "}", "N = __any_sync(0xffffffffu, N);"]
            else:               # (max and or: exact in any order)
                body += ["for (int l = 1; l < 32; ++l) {", "    A[0] = A[0] > A[l] ? A[0] : A[l];",
                         "    N[0] = N[0] || N[l];", "}"]
            a0, n0 = ("A", "N") if warp else ("A[0]", "N[0]")
            body += ["float pre, inv, sa; bool u;",
                     f"hw_q_scale({a0}, {n0}, pre, inv, u, sa);"]
            body += lanes(["for (int k = 0; k < 8; ++k) {",
                           "    const long long i = base + lane + 32 * k;",
                           f"    if (i < {size}) {o}[i] = hw_q_code(_T{j}[i], pre, inv, u);",
                           "}"], warp)
            body.append(lane0(f"{o}_absmax[q] = sa;", warp))
            bodies.append(body)
        kernels.append((f"quant{j}", "quant", j, *bodies, f"(({size}) + 255) >> 8"))
    return args, funcs, kernels


def _finish_bodies(head, cnt, term, j, fin, lanes, butterfly, lane0, value=None) -> tuple:
    """The warp-per-result bodies ("warp", "loop") summing ``cnt`` terms for result ``q``:
    ``term`` an expression of ``x`` (a partial), or (``value`` set) statements computing
    the term ``value`` at ``x``; then result ``q`` of reduction ``j`` stored."""
    out = []
    for warp in (True, False):
        r = "" if warp else "[lane]"
        body = list(head) + [f"double s{'' if warp else '[32]'};"]
        if value is None:
            each = [f"s{r} = 0.0;", f"for (long long x = lane; x < {cnt}; x += 32) "
                                    f"s{r} += {term};"]
        else:
            each = [f"s{r} = 0.0;", f"for (long long x = lane; x < {cnt}; x += 32) {{"]
            each += [f"    {ln}" for ln in term] + [f"    s{r} += {value};", "}"]
        body += lanes(each, warp) + butterfly("s", warp)
        body.append(lane0(f"_V{j}[q] = (TC)({fin(j, 's' if warp else 's[0]')});", warp))
        out.append(body)
    return tuple(out)


def cuda_staged_source(p: KernelPlan, dtype: str) -> CudaStaged:
    """The CUDA module of a staged plan (Adafactor's factored matrices; see the comment
    above): every kernel takes ``p.arrays`` (on their shapes, flat), the reductions' results
    ``_V<j>`` (kernel dtype, sized by their class), the element sweeps' partials ``_P<j>``
    (float64: per row and column tile for a row sum, per row tile and column for a column
    sum, per tile for a whole-array sum), ``_B, _m, _n`` and the kernel scalars; launched
    in ``launches`` order, each over its work items (tiles, results or elements)."""
    fmt = Format.parse(dtype)
    args, funcs, kernels = _staged_parts(p, fmt)
    base = f"hw_{p.key}_{fmt.key}_staged"
    sig = ",\n    ".join(args)
    text, launches = [], []
    for name, kind, what, warp_body, _, _count in kernels:
        per_warp = kind in ("sweep", "finish", "small", "quant")
        head = [f'extern "C" __global__ void {base}_{name}(\n    {sig})\n{{',
                f"    const long long nbm = (_m + {_TILE - 1}) / {_TILE};",
                f"    const long long nbn = (_n + {_TILE - 1}) / {_TILE};",
                "    (void)nbm; (void)nbn;"]
        if per_warp:
            v = "w" if kind == "sweep" else "q"
            count = "_B * nbm * nbn" if kind == "sweep" else _count
            head += ["    const int lane = threadIdx.x & 31;",
                     f"    for (long long {v} = ((long long)blockIdx.x * blockDim.x + "
                     f"threadIdx.x) >> 5; {v} < {count};",
                     f"         {v} += ((long long)gridDim.x * blockDim.x) >> 5) {{"]
        else:
            head += [f"    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;"
                     f" i < {_count};", "         i += (long long)gridDim.x * blockDim.x) {"]
        text.append("\n".join(head + [f"        {ln}" for ln in warp_body] + ["    }", "}", ""]))
        launches.append((f"{base}_{name}", kind, what))
    src = "\n".join([
        f"// Generated by hwoptim from the {p.rule.name} spec ({_flag_text(p)}), {fmt.key}: "
        f"staged (sweeps, then stores).",
        "// Edit the spec in hwoptim/rules, not this file.",
        _staged_typedefs(fmt)] + funcs + text)
    return CudaStaged(src, tuple(launches))


def _staged_typedefs(fmt: Format) -> str:
    """The buffer types (and, for a storage format, its conversions)."""
    if fmt.plain:
        return _typedefs(dtypes_for(fmt.compute))
    return _c_format_typedefs(fmt) + _C_FORMAT_HELPERS


def cpp_staged_test_source(p: KernelPlan, dtype: str) -> str:
    """A C++ translation unit running :func:`cuda_staged_source`'s kernels on the CPU, in
    its launch order: the same device functions, and each kernel's statements with the
    warp's lanes in a loop and its shuffles as index arithmetic. ``run(arrays, _V..., _P...,
    _B, _m, _n, scalars, ftz)``, the arguments as the kernels'."""
    fmt = Format.parse(dtype)
    args, funcs, kernels = _staged_parts(p, fmt)
    body = ["const unsigned int csr = _mm_getcsr();",
            "if (ftz) _mm_setcsr(csr | 0x8040);  // flush-to-zero and denormals-are-zero",
            f"const long long nbm = (_m + {_TILE - 1}) / {_TILE};",
            f"const long long nbn = (_n + {_TILE - 1}) / {_TILE};", "(void)nbm; (void)nbn;"]
    for name, kind, what, _, loop_body, count in kernels:
        v = {"sweep": "w", "finish": "q", "small": "q", "quant": "q"}.get(kind, "i")
        count = "_B * nbm * nbn" if kind == "sweep" else count
        body += [f"for (long long {v} = 0; {v} < {count}; ++{v}) {{  // {name}"]
        body += [f"    {ln}" for ln in loop_body] + ["}"]
    body.append("_mm_setcsr(csr);")
    sig = ", ".join(a.replace("__restrict__ ", "") for a in args)
    return "\n".join([
        "#include <cmath>", "#include <cstring>", "#include <xmmintrin.h>",
        "#define __device__", "#define __forceinline__ inline",
        "using std::sqrt; using std::fabs; using std::fmax; using std::fmin; using std::pow;",
        _staged_typedefs(fmt)] + funcs + [
        f'extern "C" void run({sig}, int ftz) {{'] + [f"    {ln}" for ln in body] + ["}"]) + "\n"


def staged_scratch(p: KernelPlan, B: int, m: int, n: int) -> tuple:
    """The element counts of :func:`cuda_staged_source`'s scratch arrays for one (B, m, n)
    param: (``_V<j>`` per reduction, ``_P<j>`` per reduction over the elements)."""
    st = p.stages
    nbm, nbn = -(-m // _TILE), -(-n // _TILE)
    size = {frozenset("br"): B * m, frozenset("bc"): B * n, frozenset("b"): B,
            frozenset(): 1}
    part = {frozenset("br"): B * m * nbn, frozenset("bc"): B * nbm * n,
            frozenset(): B * nbm * nbn}
    vs = [size[st.cls(e)] for e in st.reductions]
    ps = [part[st.cls(e)] for e in st.reductions if st.cls(e.args[0]) == _FULL]
    return vs, ps


def staged_quant_scratch(p: KernelPlan, fmt, B: int, m: int, n: int) -> list:
    """The element counts of :func:`cuda_staged_source`'s float32 scratch arrays ``_T<j>``
    in storage format ``fmt``: one per int8 state the step writes, its size."""
    size = {_FULL: B * m * n, frozenset("br"): B * m, frozenset("bc"): B * n}
    return [size[p.stages.shapes[o]] for o in _staged_quantized(p, Format.parse(fmt))]


# ----------------------------------------------------------------------------- step guard, CUDA
#
# The step's verdict on the device (capturable mode: nothing reaches the host): one kernel
# sums the grads' squares and counts their non-finite elements (a block per chunk of the
# multi-tensor chunk table, a fixed tree in shared memory: the same partials every run), a
# second (one warp) adds the partials in a fixed order and decides, as the host decides in
# optim.check_amp and optim.guard_verdict: ``guard = [skip, factor, grad norm, skipped steps]``
# (factor: what the step multiplies grads by, 1/grad_scale times the clip factor). The
# update and advance kernels of the step read guard[0] (``cuda_source``'s guarded variants).

GUARD_MODE = {"stats": 1, "clip": 2, "found_inf": 4, "grad_scale": 8}

_C_GUARD_DECIDE = r'''#ifdef __CUDACC__
__device__ __forceinline__ double hw_nan() { return __longlong_as_double(0x7ff8000000000000LL); }
#else
inline double hw_nan() { return std::nan(""); }
#endif
__device__ __forceinline__ void hw_guard_decide(
    const double sumsq, const double bad, const double fi, const double sc,
    const double max_norm, const int mode, double* guard)
{
    // mode: 1 the grads' statistics (skip_nonfinite or max_grad_norm), 2 clip to max_norm,
    // 4 found_inf given (non-zero or NaN skips), 8 grad_scale given (the grads divided by it;
    // not a finite number > 0: skipped, as the host refuses it)
    bool skip = (mode & 4) && fi != 0.0;
    double inv = 1.0;
    if (mode & 8) {
        if (sc > 0.0 && sc <= 1.7976931348623157e308) inv = 1.0 / sc;
        else skip = true;
    }
    double factor = inv;
    if (!skip && (mode & 1)) {
        const double norm = sqrt(sumsq * (inv * inv));
        const bool finite = bad == 0.0;
        guard[2] = finite ? norm : hw_nan();
        if (!finite || ((mode & 2) && !(norm <= 1.7976931348623157e308))) {
            skip = true;
        } else if (mode & 2) {
            const double c = max_norm / (norm + 1e-6);
            factor = inv * (c < 1.0 ? c : 1.0);
        }
    }
    guard[0] = skip ? 1.0 : 0.0;
    guard[1] = factor;
    if (skip) guard[3] += 1.0;
}
'''


_GUARD_GRADS = {"float32": ("float", "g"), "float64": ("double", "g"),
                "bfloat16": ("unsigned short", "hw_bf_load(g)"),
                "float16": ("unsigned short", "hw_h_load(g)")}


def _c_guard_element(dtype: str) -> str:
    ctype, load = _GUARD_GRADS[dtype]
    return (f"__device__ __forceinline__ void hw_guard_element(const {ctype} g, double& s, "
            f"double& bad)\n{{\n"
            f"    const double v = (double){load};\n"
            f"    s += v * v;\n"
            f"    if (!(fabs(v) <= 1.7976931348623157e308)) bad += 1.0;\n}}\n")


def cuda_guard_source(dtype: str) -> str:
    """The step guard's CUDA module for grads of ``dtype`` (see above): kernels
    ``hw_guard_stats_<dtype>(table, chunks, n_tensors, n_chunks, part)`` (``table``: the
    grads' addresses; ``chunks``: :func:`chunk_table`'s; ``part``: 2 doubles per chunk,
    written) and ``hw_guard_verdict(part, n_chunks, fi, fi_kind, fi_value, sc, sc_kind,
    sc_value, max_norm, mode, guard)`` (``*_kind``: 0 absent, 1 a float32 and 2 a float64
    on the device, 3 the value given). Launch the stats kernel with 256 threads a block,
    the verdict with one block of 32. 16-bit grads (storage formats) are read through the
    formats' conversions."""
    ctype = _GUARD_GRADS[dtype][0]
    sixteen = dtype in ("bfloat16", "float16")
    return "\n".join([
        f"// Generated by hwoptim: the step guard for {dtype} grads.",
        _C_FORMAT_HELPERS if sixteen else "", _C_GUARD_DECIDE, _c_guard_element(dtype),
        f'extern "C" __global__ void hw_guard_stats_{dtype}(\n'
        f"    const long long* __restrict__ table, const long long* __restrict__ chunks,\n"
        f"    const long long n_tensors, const long long n_chunks, "
        f"double* __restrict__ part)\n{{\n"
        f"    __shared__ double ss[256], sb[256];\n"
        f"    for (long long c = blockIdx.x; c < n_chunks; c += gridDim.x) {{\n"
        f"        const long long t = chunks[3 * c];\n"
        f"        const long long lo = chunks[3 * c + 1];\n"
        f"        const long long n = chunks[3 * c + 2] - lo;\n"
        f"        const {ctype}* const g = reinterpret_cast<const {ctype}*>(table[t]) + lo;\n"
        f"        double s = 0.0, bad = 0.0;\n"
        f"        for (long long i = threadIdx.x; i < n; i += blockDim.x)\n"
        f"            hw_guard_element(g[i], s, bad);\n"
        f"        ss[threadIdx.x] = s;\n"
        f"        sb[threadIdx.x] = bad;\n"
        f"        __syncthreads();\n"
        f"        for (int o = 128; o > 0; o >>= 1) {{\n"
        f"            if (threadIdx.x < o) {{\n"
        f"                ss[threadIdx.x] += ss[threadIdx.x + o];\n"
        f"                sb[threadIdx.x] += sb[threadIdx.x + o];\n"
        f"            }}\n"
        f"            __syncthreads();\n"
        f"        }}\n"
        f"        if (threadIdx.x == 0) {{ part[2 * c] = ss[0]; part[2 * c + 1] = sb[0]; }}\n"
        f"        __syncthreads();\n"
        f"    }}\n}}\n",
        'extern "C" __global__ void hw_guard_verdict(\n'
        "    const double* __restrict__ part, const long long n_chunks,\n"
        "    const void* fi, const int fi_kind, const double fi_value,\n"
        "    const void* sc, const int sc_kind, const double sc_value,\n"
        "    const double max_norm, const int mode, double* __restrict__ guard)\n{\n"
        "    const int lane = threadIdx.x & 31;\n"
        "    double s = 0.0, bad = 0.0;\n"
        "    for (long long c = lane; c < n_chunks; c += 32) {\n"
        "        s += part[2 * c];\n"
        "        bad += part[2 * c + 1];\n"
        "    }\n"
        "    for (int o = 16; o > 0; o >>= 1) {\n"
        "        s += __shfl_xor_sync(0xffffffffu, s, o);\n"
        "        bad += __shfl_xor_sync(0xffffffffu, bad, o);\n"
        "    }\n"
        "    if (threadIdx.x != 0) return;\n"
        "    const double f = fi_kind == 1 ? (double)*static_cast<const float*>(fi)\n"
        "                   : fi_kind == 2 ? *static_cast<const double*>(fi) : fi_value;\n"
        "    const double k = sc_kind == 1 ? (double)*static_cast<const float*>(sc)\n"
        "                   : sc_kind == 2 ? *static_cast<const double*>(sc) : sc_value;\n"
        "    hw_guard_decide(s, bad, f, k, max_norm, mode, guard);\n"
        "}\n"])


def cpp_guard_test_source() -> str:
    """C++ running the guard's device functions on the CPU: ``decide(sumsq, bad, fi, sc,
    max_norm, mode, guard)`` and ``stats_<dtype>(g, n, out)`` (``out``: the sum of squares
    and the non-finite count over ``g``)."""
    out = ["#include <cmath>", "#include <cstring>", "#define __device__",
           "#define __forceinline__ inline", "using std::sqrt; using std::fabs; using std::rintf;",
           _C_FORMAT_HELPERS, _C_GUARD_DECIDE,
           'extern "C" void decide(double sumsq, double bad, double fi, double sc, '
           'double max_norm, int mode, double* guard) '
           "{ hw_guard_decide(sumsq, bad, fi, sc, max_norm, mode, guard); }"]
    for dtype, (ctype, _) in _GUARD_GRADS.items():
        out += [f"namespace g_{dtype} {{", _c_guard_element(dtype), "}",
                f'extern "C" void stats_{dtype}(const {ctype}* g, long long n, double* out) '
                f"{{ for (long long i = 0; i < n; ++i) g_{dtype}::hw_guard_element(g[i], "
                f"out[0], out[1]); }}"]
    return "\n".join(out) + "\n"
