"""Print a rule's traced math as source code: Numba (Python) and C++ / CUDA.

Everything here is derived from ``rule.update`` and ``rule.scalars`` through
``hwoptim.spec``; no rule's math is written in this file.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .spec import Expr, Rule, evaluate, substitute, trace_scalars, trace_update

C_TYPES = {"float32": "float", "float64": "double"}
_C_FUNCS = {"sqrt": "sqrt", "abs": "fabs", "max": "fmax", "min": "fmin", "pow": "pow"}
_NB_FUNCS = {"sqrt": "np.sqrt", "abs": "np.abs", "max": "np.maximum", "min": "np.minimum",
             "sign": "np.sign"}
_CMP = {"lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_ARITH = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


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
        key = (e.op, tuple(id(a) for a in args))
        if key not in canon:
            canon[key] = Expr(e.op, args)
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
    if e.op == "sign":
        return f"(TC)(({a[0]} > (TC)0) - ({a[0]} < (TC)0))"
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
        return Expr(e.op, tuple(visit(a) for a in e.args))

    return {n: visit(e) for n, e in outputs.items()}, derived


def plan(rule: Rule, flags) -> KernelPlan:
    outputs, arrays, base = trace_update(rule, flags)
    if "param" not in outputs:
        raise ValueError(f"rule {rule.name} does not update param")
    outputs, derived = _hoist(outputs)
    order, roots = schedule(outputs)
    used = {a.value for e in order for a in e.args if a.op == "scalar"}
    used |= {e.value for e in roots.values() if e.op == "scalar"}
    scalars = tuple(n for n in base if n in used) + tuple(derived)
    return KernelPlan(rule, flags, arrays, tuple(outputs), scalars, tuple(order), roots,
                      derived)


# ----------------------------------------------------------------------------- Numba

def numba_source(p: KernelPlan, dtype: str, cache: bool = True) -> str:
    """A Python module with two Numba kernels over 1-D arrays: ``parallel`` (prange) and
    ``serial``. Arguments: the arrays in ``p.arrays`` order, then ``p.scalars``.
    ``cache``: whether Numba keeps their machine code on disk, beside the module's file."""
    consts = {}

    def const(v):
        if v not in consts:
            consts[v] = f"_K{len(consts)}"
        return consts[v]

    nm = _Namer(const)
    lines = [f"{nm.new(e)} = {_nb_expr(e, nm)}" for e in p.order]
    loads = [f"x_{a} = {a}[i]" for a in p.reads]
    stores = [f"{o}[i] = {nm(p.roots[o])}" for o in p.outputs]
    body = loads + lines + stores
    args = ", ".join(list(p.arrays) + [f"k_{s}" for s in p.scalars])
    head = [f"# Generated by hwoptim from the {p.rule.name} spec "
            f"({', '.join(f'{k}={v}' for k, v in sorted(vars(p.flags).items()))}), {dtype}.",
            "# Edit the spec in hwoptim/rules, not this file.",
            "import numpy as np",
            "from numba import njit, prange", ""]
    # typed constants: a bare Python literal would promote float32 math to float64
    head += [f"{name} = np.{dtype}({v!r})" for v, name in consts.items()]
    out = head + [""]
    for fname, par, rng in (("parallel", True, "prange"), ("serial", False, "range")):
        out += [f"@njit(parallel={par}, cache={bool(cache)}, error_model='numpy', nogil=True)",
                f"def {fname}({args}):",
                f"    for i in {rng}(param.shape[0]):"]
        out += [f"        {line}" for line in body]
        out.append("")
    return "\n".join(out) + "\n"


def host_scalar_function(p: KernelPlan, dtype: str, boxed: bool = True):
    """``f(h, t)``: the kernel's scalar arguments for step ``t`` as a tuple of ``dtype``
    numbers (``boxed=False``: Python floats, for a callee that rounds them itself),
    computed in float64 from the hyperparameter dict ``h``.

    Printed from the traced ``rule.scalars`` and the hoisted scalars, so a step spends
    about a microsecond here instead of re-running the spec through the tracer's evaluator.
    """
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
    lines.append("k_step = t")
    for e in order:
        lines.append(f"{nm.new(e)} = {_nb_expr(e, nm).replace('np.sqrt', '_sqrt')}")
    outs = ", ".join(f"_T({nm(roots[s])})" for s in p.scalars)
    src = "def scalars(h, t):\n" + "".join(f"    {ln}\n" for ln in lines)
    src += f"    return ({outs}{',' if len(p.scalars) == 1 else ''})\n"
    import math
    env = {"_T": np.dtype(dtype).type if boxed else float, "_sqrt": math.sqrt, "np": np}
    exec(compile(src, f"<hwoptim scalars {p.key}>", "exec"), env)
    env["scalars"].source = src
    return env["scalars"]


# ----------------------------------------------------------------------------- C / CUDA

def _c_signature(p: KernelPlan, ref: str = "&") -> list:
    parts = []
    for a in p.arrays:
        if a not in p.reads and a not in p.outputs:
            continue
        t = _array_ctype(a)
        parts.append(f"{t}{ref} {a}" if a in p.outputs else f"const {t} {a}")
    return parts + [f"const TC k_{s}" for s in p.scalars]


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


def c_scalar_function(p: KernelPlan) -> str:
    """``rule.scalars`` (and the hoisted scalars) as C: double hyperparameters and step
    in, the kernel's scalar arguments out."""
    exprs, hyper_names = trace_scalars(p.rule, p.flags)
    wanted = {k: substitute(p.derived[k], exprs) if k in p.derived else exprs[k]
              for k in p.scalars}
    order, roots = schedule(wanted)
    nm = _Namer(lambda v: f"{v!r}")
    lines = [f"const double k_{h} = hyper[{i}];" for i, h in enumerate(hyper_names)]
    lines.append("const double k_step = step;")
    for e in order:
        t = "bool" if _is_bool(e) else "double"
        lines.append(f"const {t} {nm.new(e)} = {_c_expr(e, nm).replace('(TC)', '(double)')};")
    for i, s in enumerate(p.scalars):
        lines.append(f"out[{i}] = (TC)({nm(roots[s])});")
    body = "\n".join(f"    {ln}" for ln in lines)
    return (f"__device__ __forceinline__ void {p.key}_scalars(\n"
            f"    const double* hyper, const double step, TC* out)\n{{\n{body}\n}}\n")


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

    def kernel(name, vectorised, device_scalars):
        scal = (["const TC* __restrict__ k_dev"] if device_scalars
                else [f"const TC k_{s}" for s in p.scalars])
        args = ",\n    ".join(ptr_args + scal + ["const long long n"])
        pre = ""
        if device_scalars:
            pre = "".join(f"    const TC k_{s} = k_dev[{i}];\n"
                          for i, s in enumerate(p.scalars))
        call_v = ", ".join([f"v_{a}.v[l]" for a in used] + [f"k_{s}" for s in p.scalars])
        call_e = ", ".join([f"{a}[i]" for a in used] + [f"k_{s}" for s in p.scalars])
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

    advance = (f'extern "C" __global__ void {base}_advance(\n'
               f"    const double* __restrict__ hyper, double* __restrict__ step, "
               f"TC* __restrict__ out)\n{{\n"
               f"    if (blockIdx.x == 0 && threadIdx.x == 0) {{\n"
               f"        const double t = step[0] + 1.0;\n"
               f"        step[0] = t;\n"
               f"        {p.key}_scalars(hyper, t, out);\n    }}\n}}\n")
    src = "\n".join([
        f"// Generated by hwoptim from the {p.rule.name} spec ({_flag_text(p)}), {dtype}.",
        "// Edit the spec in hwoptim/rules, not this file.",
        _typedefs(dtypes_for(dtype)),
        "template <typename T, int V> struct alignas(16) hw_vec { T v[V]; };\n",
        c_update_function(p),
        c_scalar_function(p),
        kernel(base, True, False),
        kernel(base + "_unaligned", False, False),
        kernel(base + "_dev", True, True),
        advance,
    ])
    return CudaKernels(src, base, base + "_unaligned", base + "_dev", base + "_advance", vec)


def _flag_text(p: KernelPlan) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(vars(p.flags).items()))


def cpp_test_source(p: KernelPlan, dtype: str) -> str:
    """A C++ translation unit running ``<key>_update`` over arrays on the CPU, with
    flush-to-zero switchable, for checking the GPU arithmetic without a GPU."""
    used = _c_used(p)
    ptr_args = [f"{_array_ctype(a)}* {a}" for a in used]
    args = ", ".join(ptr_args + [f"const TC k_{s}" for s in p.scalars]
                     + ["long long n", "int ftz"])
    call = ", ".join([f"{a}[i]" for a in used] + [f"k_{s}" for s in p.scalars])
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
    adding the values read (so no load can be dropped). Any backend runs it like a rule."""
    reads = [Expr("array", value=a) for a in p.reads]
    total = reads[0]
    for r in reads[1:]:
        total = Expr("add", (total, r))
    order, roots = schedule({o: total for o in p.outputs})
    return KernelPlan(p.rule, p.flags, p.arrays, p.outputs, (), tuple(order), roots, {})
