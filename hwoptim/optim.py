"""The public optimizers: torch.optim's names, hyperparameters and defaults, one class per rule
spec, all sharing :class:`Optimizer`.

``step(grads)`` validates everything first (arrays, devices, overlap, learning rate), and
only then advances the step count and launches one kernel per parameter array, so a
rejected call leaves parameters and state exactly as they were.
"""
from __future__ import annotations

import difflib
import inspect
import math
import numbers
import warnings
import weakref
from types import SimpleNamespace

import numpy as np

from . import backends as _backends
from . import _fastcheck, codegen, formats, interop
from .spec import Rule, carry_init, host_scalars, resolve_hypers

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_KIND = {"host": "NumPy", "cuda": "CuPy"}
_MAX_STEP = 2 ** 53                  # the step count travels as a float64 (bias corrections)
# From this many host arrays on, step() checks grads in one compiled pass over their headers
# and launches one multi-tensor kernel per group (backends with ``many``); below it, the
# per-array path (measured: bench/NOTES.md, "Many arrays").
FAST_MIN = 16
# CuPy: from this many arrays in a step, one multi-tensor launch (pointer table uploaded per
# step) instead of one launch per array; a single array keeps the vectorised grid kernel.
CUDA_MULTI_MIN = 2
_plans: dict = {}
_kernels: dict = {}


def _plan(rule: Rule, flags) -> codegen.KernelPlan:
    key = (rule.name, tuple(sorted(vars(flags).items())))
    if key not in _plans:
        _plans[key] = codegen.plan(rule, flags)
    return _plans[key]


def _kernel(backend, plan, dtype: str):
    key = (backend.__name__, plan.key, dtype)
    if key not in _kernels:
        _kernels[key] = backend.kernel(plan, dtype)
    return _kernels[key]


def _describe(a) -> str:
    fam = _backends.family(a)
    if fam is None:
        return f"a {type(a).__module__}.{type(a).__name__}"
    return f"a {_KIND[fam]} array of shape {tuple(a.shape)} and dtype {a.dtype}"


def _is_array(a) -> bool:
    """A NumPy or CuPy array, or an array of another library that exports DLPack."""
    return _backends.family(a) is not None or interop.foreign(a)


def _device(a, fam) -> str:
    return "cpu" if fam == "host" else f"cuda:{a.device.id}"


def _overlaps(items) -> tuple | None:
    """First pair of labels whose byte ranges overlap; ``items`` are (addr, label)."""
    spans = sorted((a for a in items if a[0][2] > a[0][1]), key=lambda x: (x[0][0], x[0][1]))
    end, owner = {}, {}                # sweep: the furthest end seen so far, per device
    for (dev, s, e), label in spans:
        if dev in end and s < end[dev]:
            return owner[dev], label
        if e > end.get(dev, -1):
            end[dev], owner[dev] = e, label
    return None


def _pointer_overlap(start, nbytes, own_start, own_end) -> bool:
    """Whether any of the byte ranges ``[start, start + nbytes)`` (non-empty ones) overlaps
    another, or one of the sorted, disjoint ranges ``[own_start, own_end)``; vectorised."""
    keep = nbytes > 0
    s, e = start[keep], start[keep] + nbytes[keep]
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    if s.size > 1 and np.any(s[1:] < e[:-1]):
        return True
    if own_start.size == 0 or s.size == 0:
        return False
    j = np.searchsorted(own_start, s, side="right")        # first owned range after s
    before = j - 1
    if np.any((before >= 0) & (own_end[np.maximum(before, 0)] > s)):
        return True
    inside = j < own_start.size
    return bool(np.any(inside & (own_start[np.minimum(j, own_start.size - 1)] < e)))


def _fits_float(v) -> bool:
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _finite(v, what, expected: str) -> float:
    """``float(v)``, or a ValueError naming ``what`` (a string, or a function giving it:
    the message is built only for an error) where it is not a finite float."""
    if type(v) is float and math.isfinite(v):        # the common case, checked cheaply
        return v
    if not _fits_float(v):
        raise ValueError(f"{what() if callable(what) else what} is invalid: expected "
                         f"{expected}")
    return float(v)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else f"{r[:18]}...{r[-8:]} ({len(r)} characters)"


def _data_address(a) -> int:
    """The address of a NumPy or CuPy array's first element."""
    data = getattr(a, "__array_interface__", None)
    return data["data"][0] if data is not None else a.data.ptr


def _device_pointers(grads) -> np.ndarray:
    """CuPy grads' addresses as int64: the grad column of the multi-tensor launch."""
    return np.fromiter([g.data.ptr for g in grads], np.int64, len(grads))


class _Seen:
    """The CuPy grads of the last fully checked step: their ids and addresses, and whether
    any of them has died since (weak references with a callback; a type without weak
    references is held strongly, so it cannot die)."""

    def __init__(self, grads):
        self.died = False
        self.ids = list(map(id, grads))
        self.ptrs = _device_pointers(grads)
        me = weakref.ref(self)

        def died(_r):
            s = me()
            if s is not None:
                s.died = True
        try:
            self.refs = [weakref.ref(g, died) for g in grads]
        except TypeError:
            self.refs = list(grads)


def _ref(a):
    """A weak reference to ``a`` (a strong one where the type allows none)."""
    try:
        return weakref.ref(a)
    except TypeError:
        return lambda: a


def _plain_host(a) -> bool:
    """A NumPy array whose operators and reshape are NumPy's own: ``numpy.ndarray`` or
    ``numpy.memmap`` (a file-backed ndarray); subclasses such as ``numpy.matrix`` or masked
    arrays redefine them, and a kernel would update a reshaped copy or the wrong part."""
    return type(a) is np.ndarray or isinstance(a, np.memmap)


def _refuse_subclass(what: str, a):
    raise TypeError(f"{what} is a {type(a).__module__}.{type(a).__name__}, an ndarray "
                    f"subclass with its own operators and indexing; expected a numpy.ndarray "
                    f"(or numpy.memmap): pass numpy.asarray(x), a plain view of the same "
                    f"memory, so the update still lands in x (a masked array: its .data; "
                    f"the mask is not used)")


def check_guard(max_grad_norm, skip_nonfinite, where: str) -> tuple:
    """``max_grad_norm`` (None or a finite number > 0, as a float) and ``skip_nonfinite``
    (a bool), checked."""
    if not isinstance(skip_nonfinite, (bool, np.bool_)):
        raise TypeError(f"{where}skip_nonfinite={skip_nonfinite!r}: expected True or False")
    if max_grad_norm is not None:
        if isinstance(max_grad_norm, (bool, np.bool_)) or \
                not isinstance(max_grad_norm, numbers.Real) or not _fits_float(max_grad_norm) \
                or not max_grad_norm > 0:
            raise ValueError(f"{where}max_grad_norm={max_grad_norm!r} is invalid: expected "
                             f"None or a finite number > 0")
        max_grad_norm = float(max_grad_norm)
    return max_grad_norm, bool(skip_nonfinite)


def _is_device_array(x) -> bool:
    """A CuPy array, or another library's CUDA array (``__cuda_array_interface__``)."""
    return _backends.family(x) == "cuda" or hasattr(x, "__cuda_array_interface__")


def _one_number(v, name: str, where: str) -> float:
    """``v`` (a number, or a one-element NumPy/CuPy/torch array) as a host float."""
    if isinstance(v, (numbers.Real, np.bool_)):
        return float(v)
    size = getattr(v, "size", None)
    size = size() if callable(size) else size       # torch: size() is the shape
    if getattr(v, "numel", None) is not None:
        size = v.numel()
    if size != 1 or not hasattr(v, "item"):
        raise ValueError(f"{where}{name} is {type(v).__name__}"
                         f"{' of ' + str(size) + ' elements' if size is not None else ''}; "
                         f"expected a number or a one-element array")
    return float(v.item() if not hasattr(v, "reshape") else v.reshape(-1)[0].item())


def check_amp(grad_scale, found_inf, where: str) -> tuple:
    """(1 / ``grad_scale`` as a float or ``None``, whether ``found_inf`` skips the step),
    checked: a scale must be a finite number > 0."""
    inv, skip = None, False
    if found_inf is not None:
        f = _one_number(found_inf, "found_inf", where)
        skip = f != 0.0                              # NaN too: something was not finite
    if grad_scale is not None:
        s = _one_number(grad_scale, "grad_scale", where)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"{where}grad_scale={s!r} is invalid: expected a finite "
                             f"number > 0")
        inv = 1.0 / s
    return inv, skip


def guard_verdict(opt, sumsq: float, finite: bool):
    """From the grads' float64 sum of squares and whether all are finite: the factor a step
    multiplies grads by (``clip_grad_norm_``'s, 1 without ``max_grad_norm``), or ``None``
    where the step is skipped; ``opt``'s ``last_grad_norm``, ``last_step_skipped`` and
    ``skipped_steps`` updated (native and hwoptim.torch optimizers alike)."""
    norm = math.sqrt(sumsq)
    opt.last_grad_norm = norm if finite else math.nan
    if not finite or (opt.max_grad_norm is not None and not math.isfinite(norm)):
        opt.skipped_steps += 1
        opt.last_step_skipped = True
        return None
    opt.last_step_skipped = False
    if opt.max_grad_norm is None:
        return 1.0
    return min(1.0, opt.max_grad_norm / (norm + 1e-6))


def check_value(rule: Rule, name, value, where: str):
    """``value`` as stored (Python bools and floats, so per-step host arithmetic stays
    float64 whatever NumPy scalars came in), or an error naming what was expected."""
    if name in rule.options:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{where}{name}={value!r}: expected True or False")
        return bool(value)
    if name == "lr" and callable(value):
        return value
    hy = rule.hypers[name]
    if isinstance(hy.default, tuple):
        bad = hy.check(tuple(value) if isinstance(value, (list, tuple)) else value)
        if bad:
            raise ValueError(f"{where}{name}={value!r} is invalid: expected {bad}")
        # None where the default has it (Adafactor's eps1: resolved per dtype, Rule.resolve)
        return tuple(None if b is None and d is None else
                     _finite(b, lambda: f"{where}{name}={_short(value)}", "finite numbers")
                     for b, d in zip(value, hy.default))
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}{name}={value!r}: expected a real number")
    x = _finite(value, lambda: f"{where}{name}={_short(value)}", "a finite number")
    bad = hy.check(x)
    if bad:
        raise ValueError(f"{where}{name}={value!r} is invalid: expected {bad}")
    return x


class _Frozen(list):
    """A list that refuses changes with a message saying what to do instead."""

    def __init__(self, items, why):
        super().__init__(items)
        self._why = why

    def _refuse(self, *args, **kwargs):
        raise TypeError(self._why)

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce__(self):
        return (list, (list(self),))

    def __copy__(self):
        return list(self)

    def __deepcopy__(self, memo):
        import copy
        return [copy.deepcopy(x, memo) for x in self]


class ParamGroup(dict):
    """One parameter group: its arrays under ``"params"``, its hyperparameters and options,
    and any other keys a user or a scheduler keeps there (``name``, ``initial_lr``, ...).

    Every way of changing a hyperparameter or option (``g[k] = v``, ``update``, ``|=``,
    ``setdefault``) validates the new values first; a rejected change changes nothing. An
    option change that picks another kernel with the same state buffers takes effect at
    the next step. Hyperparameters cannot be deleted, and ``params`` cannot be replaced."""

    def __init__(self, opt, data):
        super().__init__(data)
        self._opt = opt

    def __setitem__(self, key, value):
        self._opt._set_hypers(self, {key: value})

    def update(self, *args, **kwargs):
        self._opt._set_hypers(self, dict(*args, **kwargs))

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def _remove(self, key):
        if key == "params" or key in self._opt._known:
            raise TypeError(f"{key!r} cannot be removed from a parameter group of "
                            f"{self._opt.rule.name}; set another value instead")

    def __delitem__(self, key):
        self._remove(key)
        super().__delitem__(key)

    def pop(self, key, *default):
        if key in self:
            self._remove(key)
        return super().pop(key, *default)

    def popitem(self):
        raise TypeError("popitem() would remove a hyperparameter or 'params' from a "
                        "parameter group; remove other keys by name")

    def clear(self):
        raise TypeError("clear() would remove the hyperparameters and 'params' of a "
                        "parameter group")

    def __reduce__(self):
        return (dict, (dict(self),))


class _StateDict(dict):
    """One param's state buffers. Assigning a buffer (``state[i]["exp_avg"] = a``) checks
    it like a param (type, dtype, shape, contiguity, device, no overlap) and makes the
    kernels use it; a bad one is refused and changes nothing."""

    def __init__(self, opt, index, data):
        super().__init__(data)
        self._opt, self._index = opt, index

    def __setitem__(self, key, value):
        self._opt._set_state(self._index, key, value)

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"state[{self._index}] holds the buffers {sorted(self)}, which the "
                        f"kernels need; assign a buffer (state[{self._index}][name] = array) "
                        f"or reset it in place (state[{self._index}][name][...] = 0)")

    __delitem__ = pop = popitem = clear = update = setdefault = __ior__ = _refuse

    def __reduce__(self):
        return (dict, (dict(self),))


class Optimizer:
    """Base class of the generated optimizers; see the rule specs for the math."""

    rule: Rule = None

    def __init__(self, params, *args, backend: str | None = None, capturable: bool = False,
                 max_grad_norm=None, skip_nonfinite: bool = False, state_dtype=None,
                 master_weights: bool = False, stochastic_rounding: bool = False, seed: int = 0,
                 min_8bit_size: int = formats.MIN_8BIT_SIZE, **kwargs):
        self._setup(params, self._parse_args(args, kwargs), backend, capturable,
                    guard=(max_grad_norm, skip_nonfinite),
                    storage=(state_dtype, master_weights, stochastic_rounding, seed,
                             min_8bit_size))

    def _parse_args(self, args, kwargs) -> dict:
        """The constructor's hyperparameters and options, checked, over the defaults."""
        rule = self.rule
        names = list(rule.hypers) + list(rule.options)
        if len(args) > len(names):
            raise TypeError(f"{rule.name}() takes at most {len(names)} positional "
                            f"hyperparameters after params ({', '.join(names)}); got "
                            f"{len(args)}")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{rule.name}() got {name!r} both by position and by name")
            kwargs[name] = value
        defaults = {n: h.default for n, h in rule.hypers.items()}
        defaults.update(rule.options)
        for name, value in kwargs.items():
            if name not in defaults:
                raise TypeError(f"{rule.name}() got an unexpected argument {name!r}; expected "
                                f"one of {', '.join(names)}, backend, capturable, max_grad_norm, "
                                f"skip_nonfinite")
            kwargs[name] = self._check_value(name, value, f"{rule.name}(): ")
        defaults.update(kwargs)
        return defaults

    def _setup(self, params, defaults, backend, capturable, states=None, guard=(None, False),
               storage=(None, False, False, 0, formats.MIN_8BIT_SIZE)):
        rule = self.rule
        self.max_grad_norm, self.skip_nonfinite = check_guard(*guard, f"{rule.name}(): ")
        self._skipped, self._last_skipped, self._last_norm = 0, False, None
        self._guard_mode = None        # capturable: the last step's verdict mode (None: none)
        self._grad_factor = False      # kernels multiply grads by a per-step factor (_clip)
        self._known = frozenset(rule.hypers) | frozenset(rule.options)
        self._defaults = defaults
        groups = self._normalize_params(params)
        arrays = [a for g in groups for a in g["params"]]
        fam = self._check_params(arrays)
        self.backend = _backends.pick(fam, backend)
        self.backend_name = next(n for n in _backends.names()
                                 if _backends._loaded.get(n) is self.backend)
        self.dtype = str(arrays[0].dtype)
        self._family = fam
        self._set_format(arrays, storage)
        self._stream = interop.torch_stream([a for g in groups for a in g["_given"]])
        if not isinstance(capturable, (bool, np.bool_)):
            raise TypeError(f"capturable={capturable!r}: expected True or False")
        if (self.max_grad_norm is not None or self.skip_nonfinite) and not (
                hasattr(self.backend, "grad_stats")
                or (capturable and hasattr(self.backend, "step_guard"))):
            raise ValueError(
                f"max_grad_norm and skip_nonfinite are not supported by the "
                f"{self.backend_name!r} backend " + (
                    "without capturable=True: on the GPU their verdict stays on the device "
                    "with the step count; use capturable=True" if
                    hasattr(self.backend, "step_guard") else
                    "yet (they run on the host backends, numba and numpy, and on cupy with "
                    "capturable=True)"))
        if capturable and self.backend_name != "cupy":
            raise ValueError(f"capturable=True needs backend='cupy' (device-side scalars for "
                             f"CUDA graphs); this optimizer uses {self.backend_name!r}")
        self.capturable = bool(capturable)
        self._check_staged(arrays, "")
        self.param_groups = _Frozen([], "param_groups cannot be changed directly; add a "
                                        "group with opt.add_param_group({'params': [...], "
                                        "...}), or change a group's values in place")
        self.state = _Frozen([], "opt.state cannot be changed directly; assign a buffer "
                                 "(opt.state[i]['exp_avg'] = array) or reset one in place "
                                 "(opt.state[i]['exp_avg'][...] = 0)")
        self._flags, self._views, self._group_of, self._owned = [], [], [], []
        self._srkeys = None                  # stochastic rounding: every param's key
        self._carry = []                     # per group: carried host scalars (None: fresh)
        self._sizes = None                   # params' sizes, for the grad guard
        # norms across processes (hwoptim.distributed): per group, a function of the
        # reduction pass's sums of squares; set, the multi-tensor launch always runs
        self._norm_combine = None
        self._params = []
        self._array_type = np.ndarray if fam == "host" else type(arrays[0])
        self._checked_spans = None
        self._checked, self._seen = (), None
        self._kern = None
        self._launch_key, self._entries = None, None
        self._fast, self._tables = None, None
        self._step = 0
        self._add_groups(groups, 0, states)
        if self.capturable:
            self._init_device_scalars()

    def _check_staged(self, arrays, where: str, first: int = 0):
        """Params a rule updates in stages (Adafactor's matrices: state of other shapes)
        need a backend that runs them, and there no device scalars yet."""
        rule = self.rule
        if rule.shape_flags is None:
            return
        shaped = [i for i, a in enumerate(arrays, first)
                  if rule.shape_flags(tuple(a.shape)) != rule.shape_flags((1,))]
        if not shaped:
            return
        i = shaped[0]
        what = (f"{where}params[{i}] has shape {tuple(arrays[i - first].shape)}, which "
                f"{rule.name} updates in stages (factored state)")
        if not getattr(self.backend, "STAGED", False):
            raise ValueError(f"{what}: the {self.backend_name!r} backend cannot run that yet "
                             f"(numba, numpy and cupy can); flatten it into a vector")
        if self.capturable:
            raise ValueError(f"{what}: capturable=True has no kernels for that yet; use "
                             f"capturable=False, or flatten it into a vector")

    def _set_format(self, arrays, storage):
        """The storage format (hwoptim.formats) from the params' dtype and the options
        ``(state_dtype, master_weights, stochastic_rounding, seed, min_8bit_size)``,
        checked."""
        where = f"{self.rule.name}(): "
        state_dtype, master, sr, seed, min_8bit = storage
        self.format = formats.make(formats.dtype_name(arrays[0].dtype), state_dtype, master,
                                   sr, where)
        if isinstance(min_8bit, (bool, np.bool_)) or not isinstance(min_8bit, numbers.Integral) \
                or min_8bit < 0:
            raise ValueError(f"{where}min_8bit_size={min_8bit!r} is invalid: expected an "
                             f"integer >= 0 (arrays with fewer elements keep float32 state)")
        self.min_8bit_size = int(min_8bit)
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) \
                or not 0 <= seed < 2 ** 64:
            raise ValueError(f"{where}seed={seed!r} is invalid: expected an integer from 0 to "
                             f"2**64 - 1 (the stochastic-rounding stream)")
        self.seed = int(seed)
        self._kdtype = self.format.key       # what the kernels are built for
        self._cdtype = self.format.compute   # their math and scalars
        if self.format.plain:
            return
        if self._family != "host" and self.backend_name != "cupy":
            raise ValueError(f"{where}params of dtype {self.dtype} with state_dtype="
                             f"{self.format.state!r}, master_weights={self.format.master}, "
                             f"stochastic_rounding={self.format.sr}: the "
                             f"{self.backend_name!r} backend keeps one dtype for every "
                             f"buffer; use backend='cupy'")

    def _on_device(self, host: np.ndarray, like):
        """A host array of state, as this optimizer keeps it: itself on the CPU, a copy on
        the GPU of param ``like`` (bfloat16 as ``uint16``: its bits; CuPy has no
        bfloat16)."""
        if self._family == "host":
            return host
        import cupy
        with like.device:
            return cupy.asarray(host.view(np.uint16) if formats.dtype_name(host.dtype) ==
                                "bfloat16" else host)

    def _storage_dtype(self, a) -> np.dtype:
        """The dtype a state buffer's values have (a GPU's ``uint16`` bfloat16 state: its
        bfloat16), as state_dict() gives them."""
        if self._family != "host" and a.dtype == np.uint16:
            return formats.np_dtype("bfloat16")
        return a.dtype

    def _format_of(self, p) -> formats.Format:
        """Param ``p``'s storage format: the optimizer's, but float32 state where int8
        state is asked for and the param has fewer than ``min_8bit_size`` elements (the
        param's count, as bitsandbytes: Adafactor's factors follow their matrix)."""
        f = self.format
        if f.quantized and p.size < self.min_8bit_size:
            return formats.Format(f.param, f.compute, f.master, f.sr)
        return f

    def _add_groups(self, groups, first: int, states=None):
        """Check every group's values, then make its state; ``first``: its index."""
        rule, merged_all = self.rule, []
        for gi, g in enumerate(groups, first):
            where = f"param_groups[{gi}]: "
            merged = dict(self._defaults)
            for k, v in g.items():
                if k in ("params", "_given"):
                    continue
                merged[k] = (self._check_value(k, v, where) if k in self._known
                             else self._extra_key(k, v, where))
            flags = self._check_group(merged, where)
            if self.capturable and callable(merged["lr"]):
                raise ValueError(f"{where}lr is a callable, which a captured CUDA "
                                 f"graph cannot call; with capturable=True set a number, and "
                                 f"change it on the device (device_hypers)")
            merged_all.append((merged, flags))
        # everything is checked: now allocate and record
        for g, (merged, flags) in zip(groups, merged_all):
            gi = len(self.param_groups)
            ps = _Frozen(g.get("_given", g["params"]),
                         f"param_groups[{gi}]['params'] cannot be changed; add params with "
                         f"opt.add_param_group(...), or make a new optimizer")
            self._flags.append(flags)
            self._carry.append(None)
            list.append(self.param_groups, ParamGroup(self, {"params": ps, **merged}))
            for p in g["params"]:
                i = len(self.state)
                st = {}
                for s in rule.active_states(rule.array_flags(flags, p.shape)):
                    if states is not None:
                        st[s.name] = states[i][s.name]
                        if f"{s.name}_absmax" in states[i]:
                            st[f"{s.name}_absmax"] = states[i][f"{s.name}_absmax"]
                        continue
                    init = merged[s.init] if isinstance(s.init, str) else s.init
                    if callable(init):           # a state starting at lr: the first step's
                        init = self._call_lr(gi, init, 1)
                    fp = self._format_of(p)
                    if fp.plain:
                        st[s.name] = self.backend.full(p, init, s.shape_for(p.shape))
                    elif fp.quantized:           # codes, and a scale per block
                        st[s.name], st[f"{s.name}_absmax"] = (
                            self._on_device(a, p) for a in formats.quantize(
                                np.full(s.shape_for(p.shape), init, np.float32)))
                    else:                        # (rounded into the state's storage)
                        st[s.name] = self._on_device(formats.round_nearest(
                            np.full(s.shape_for(p.shape), init, np.float32), fp.state), p)
                if self.format.master:           # the float32 copy the rule updates
                    st["master"] = (states[i]["master"] if states is not None
                                    else p.astype(np.float32))
                list.append(self.state, _StateDict(self, i, st))
                self._params.append(p)
                self._group_of.append(gi)
                self._views.append(None)
            self._refresh_views(gi)
        if states is not None:                  # a copy's buffers: check them as assigned
            for i, st in enumerate(self.state):
                for k, v in st.items():
                    self._check_buffer(i, k, v)
        self._refresh_owned()

    def _refresh_views(self, gi: int):
        """Flat views of each param of group ``gi`` and its state, in its kernel's order
        (a staged rule's arrays on their shapes)."""
        self._tables = None                  # pointer tables of the multi-tensor launch
        for i, g in enumerate(self._group_of):
            if g == gi:
                st, p = self.state[i], self._params[i]
                plan = _plan(self.rule, self.rule.array_flags(self._flags[gi], p.shape))
                names = [n for n in self._format_of(p).arrays(plan.arrays)[2:]
                         if n not in ("master", "_srkey")]
                if plan.stages is not None:
                    self._views[i] = [p] + [st[n] for n in names]
                else:
                    self._views[i] = [p.reshape(-1)] + [st[n].reshape(-1) for n in names]
                if self.format.master:
                    self._views[i].append(st["master"] if plan.stages is not None
                                          else st["master"].reshape(-1))
                if self.format.sr:              # this param's key, written every step
                    self._views[i].append(self._key_view(i, p))

    def _key_view(self, i: int, like):
        """Param ``i``'s stochastic-rounding key: element ``i`` of one uint32 array for
        every param (on the device of param ``like``), so a step writes all keys with one
        copy; grown (and every view moved) when params are added."""
        keys = self._srkeys
        if keys is None or keys.shape[0] <= i:
            keys = self._srkeys = self._on_device(np.zeros(max(8, 2 * i), np.uint32), like)
            for j, v in enumerate(self._views):
                if v is not None and j != i:
                    v[-1] = keys[j:j + 1]
        return keys[i:i + 1]

    def _refresh_owned(self):
        """The byte ranges that grads must not overlap: every param and state buffer."""
        self._fast, self._tables = None, None      # the fast check's tables, rebuilt lazily
        addr = self.backend.address
        self._owned = [(addr(a), f"state[{i}][{k!r}]")
                       for i, st in enumerate(self.state) for k, a in st.items()]
        self._owned += [(addr(p), f"params[{i}]") for i, p in enumerate(self._params)]
        self._checked_spans, self._seen = None, None

    def add_param_group(self, param_group: dict) -> None:
        """Add a group of params (a dict with ``"params"``, and any hyperparameters, options
        and other keys), as torch does; everything is checked before anything changes."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group is {_describe(param_group)}; expected a dict with "
                            f"'params'")
        gi = len(self.param_groups)
        groups = self._normalize_params([param_group], first=gi)
        new = groups[0]["params"]
        fam = self._check_params(self._params + list(new))
        if fam != self._family:
            raise TypeError(f"param_groups[{gi}] holds {_KIND[fam]} arrays; this optimizer "
                            f"updates {_KIND[self._family]} arrays")
        if new[0].dtype != self.dtype:
            raise TypeError(f"param_groups[{gi}] has dtype {new[0].dtype}; expected "
                            f"{self.dtype} like the other params (one dtype per optimizer)")
        self._check_staged(list(new), f"param_groups[{gi}]: ", len(self._params))
        addr = self.backend.address
        hit = _overlaps([a for a in self._owned if a[1].startswith("state")]
                        + [(addr(p), f"new params[{j}]") for j, p in enumerate(new)])
        if hit:
            raise ValueError(f"{hit[1]} overlaps {hit[0]} in memory; expected new params "
                             f"apart from the optimizer's state")
        if self.capturable:                   # allocated before anything changes
            import cupy
            with self._params[0].device:
                step_dev = cupy.full(1, float(self.step_count), dtype=np.float64)
        self._add_groups(groups, gi)
        self._kern, self._launch_key, self._checked, self._seen = None, None, (), None
        if self.capturable:
            with self._params[0].device:
                self._hyper_dev.append(cupy.asarray(self._device_hypers_host(gi)))
                self._step_dev.append(step_dev)
            self._alloc_k_dev()

    # ------------------------------------------------------------------ validation helpers
    def _check_value(self, name, value, where):
        return check_value(self.rule, name, value, where)

    def _extra_key(self, key, value, where):
        """A key that is no hyperparameter (``name``, ``initial_lr``, a scheduler's): kept
        untouched. One that looks like a misspelt hyperparameter gets a warning."""
        if isinstance(key, str):
            near = difflib.get_close_matches(key, sorted(self._known), n=1, cutoff=0.8)
            if near:
                warnings.warn(f"{where}{key!r} is not a hyperparameter of {self.rule.name} "
                              f"(did you mean {near[0]!r}?); it is kept in the group, and "
                              f"the kernels do not use it", stacklevel=4)
        return value

    def _check_group(self, merged: dict, where: str):
        rule = self.rule
        h = {n: (0.0 if (n == "lr" and callable(merged[n])) else merged[n])
             for n in rule.hypers}
        opt = {n: merged[n] for n in rule.options}
        if rule.check is not None:
            for arg, value, expected in rule.check(SimpleNamespace(**h), SimpleNamespace(**opt)):
                raise ValueError(f"{where}{arg}={value!r} is invalid: expected {expected}")
        flags = rule.static_flags(h, opt)
        if self.max_grad_norm is not None or getattr(self, "_grad_factor", False):
            flags._clip = True
        return flags

    def _buffers(self, flags) -> list:
        """The names of the state buffers a group with ``flags`` needs."""
        return [s.name for s in self.rule.active_states(flags)]

    def _group_index(self, group) -> int:
        return next(i for i, g in enumerate(self.param_groups) if g is group)

    def _set_hypers(self, group: ParamGroup, changes: dict):
        """Change some of a group's values, all checked first; see :class:`ParamGroup`."""
        gi = self._group_index(group)
        where = f"param_groups[{gi}]: "
        if "params" in changes:
            raise ValueError(f"{where}'params' cannot be replaced; add params with "
                             f"opt.add_param_group(...), or make a new optimizer")
        checked = {k: (self._check_value(k, v, where) if k in self._known
                       else self._extra_key(k, v, where)) for k, v in changes.items()}
        if self.capturable and callable(checked.get("lr")):
            raise ValueError(f"{where}lr is a callable, which a captured CUDA graph cannot call")
        merged = {**group, **checked}
        flags = self._check_group(merged, where)
        old = self._flags[gi]
        if vars(flags) != vars(old) and self._buffers(flags) != self._buffers(old):
            keys = ", ".join(f"{k}={v!r}" for k, v in changes.items())
            raise ValueError(f"{where}{keys} would change the state buffers this group "
                             f"needs ({self._buffers(old)} -> {self._buffers(flags)}); "
                             f"make a new optimizer with it instead")
        # checked: from here on, change things
        for k, v in checked.items():
            dict.__setitem__(group, k, v)
        if vars(flags) != vars(old):
            self._flags[gi] = flags
            self._refresh_views(gi)
            self._kern, self._launch_key = None, None     # the next step builds the kernel
            if self.capturable:                           # (its scalars and sums, resized)
                self._alloc_k_dev()
        if self.capturable:                  # (before a first step: the carried scalars' start
            self._upload_hypers(gi, carry=self._step == 0)      # follows the hypers)

    def _check_buffer(self, i: int, key, value):
        """``value`` checked as a replacement for ``state[i][key]``."""
        st, p = self.state[i], self._params[i]
        where = f"state[{i}][{key!r}]"
        if key not in st:
            raise KeyError(f"{where}: params[{i}] has the state buffers {sorted(st)}; a "
                           f"new one would not be used by the kernels")
        fam = _backends.family(value)
        if fam != self._family or (fam == "host" and not _plain_host(value)):
            if fam == "host" and fam == self._family:
                _refuse_subclass(where, value)
            raise TypeError(f"{where} is {_describe(value)}; expected a {_KIND[self._family]} "
                            f"array like params[{i}]")
        if _device(value, fam) != _device(p, fam):
            raise TypeError(f"{where} is on {_device(value, fam)}; expected "
                            f"{_device(p, fam)} like params[{i}]")
        if value.dtype != st[key].dtype or tuple(value.shape) != tuple(st[key].shape):
            raise ValueError(f"{where} is {value.dtype} {tuple(value.shape)}; expected "
                             f"{st[key].dtype} {tuple(st[key].shape)}")
        if not value.flags.c_contiguous or (fam == "host" and not value.flags.writeable):
            raise ValueError(f"{where} is not a writeable C-contiguous array; expected one "
                             f"(the kernels update it in place)")
        addr = self.backend.address
        others = [a for a in self._owned if a[1] != where]
        hit = _overlaps(others + [(addr(value), where)])
        if hit:
            raise ValueError(f"{where} overlaps {[h for h in hit if h != where][0]} in "
                             f"memory; expected a buffer of its own")

    def _set_state(self, i: int, key, value):
        self._check_buffer(i, key, value)
        dict.__setitem__(self.state[i], key, value)
        self._refresh_views(self._group_of[i])
        self._refresh_owned()

    @staticmethod
    def _normalize_params(params, first: int = 0) -> list:
        """Groups as dicts whose ``"params"`` are NumPy or CuPy arrays (DLPack arrays taken as
        views of the same memory), with the objects the caller gave under ``"_given"``."""
        groups = Optimizer._groups(params, first)
        for gi, g in enumerate(groups, first):
            given = g["params"]
            g["params"] = [interop.as_array(a, f"param_groups[{gi}]['params'][{j}]")
                           if interop.foreign(a) else a for j, a in enumerate(given)]
            g["_given"] = given
        return groups

    @staticmethod
    def _groups(params, first: int) -> list:
        if _is_array(params):
            return [{"params": [params]}]
        if isinstance(params, dict):
            params = [params]
        if not isinstance(params, (list, tuple)):
            try:
                params = list(params)
            except TypeError:
                raise TypeError(f"params is {_describe(params)}; expected an array, a list of "
                                f"arrays, or a list of parameter groups (dicts with "
                                f"'params')") from None
        if len(params) == 0:
            raise ValueError("params is empty; expected at least one array")
        if all(isinstance(g, dict) for g in params):
            groups = []
            for gi, g in enumerate(params, first):
                if "params" not in g:
                    raise ValueError(f"param_groups[{gi}] has no 'params' key")
                ps = g["params"]
                if _is_array(ps):
                    ps = [ps]
                else:
                    try:
                        ps = list(ps)
                    except TypeError:
                        raise TypeError(f"param_groups[{gi}]['params'] is {_describe(ps)}; "
                                        f"expected an array or a list of arrays") from None
                if not ps:
                    raise ValueError(f"param_groups[{gi}]['params'] is empty")
                groups.append({**g, "params": ps})
            return groups
        if any(isinstance(g, dict) for g in params):
            raise TypeError("params mixes arrays and parameter groups; pass either a list of "
                            "arrays or a list of dicts with 'params'")
        return [{"params": list(params)}]

    def _check_params(self, arrays) -> str:
        fams = set()
        for i, a in enumerate(arrays):
            fam = _backends.family(a)
            if fam is None:
                raise TypeError(f"params[{i}] is {_describe(a)}; expected a numpy.ndarray or "
                                f"cupy.ndarray of float32 or float64")
            if fam == "host" and not _plain_host(a):
                _refuse_subclass(f"params[{i}]", a)
            if a.dtype not in _DTYPES and formats.dtype_name(a.dtype) is None:
                more = ", float16 or bfloat16" if fam == "host" else " or float16"
                raise TypeError(f"params[{i}] has dtype {a.dtype}; expected float32, float64"
                                f"{more} (gradient steps need floating-point parameters)")
            if not a.flags.c_contiguous:
                raise ValueError(f"params[{i}] (shape {tuple(a.shape)}) is not C-contiguous; "
                                 f"hwoptim updates params in place, and a contiguous copy "
                                 f"would not update the caller's array: keep the parameters "
                                 f"in contiguous arrays (hwoptim.FlatParams gives views that "
                                 f"are)")
            if fam == "host" and not a.flags.writeable:
                raise ValueError(f"params[{i}] is read-only; expected a writeable array "
                                 f"(the update is in place)")
            fams.add((fam, _device(a, fam)))
            if a.dtype != arrays[0].dtype:
                raise TypeError(f"params[{i}] has dtype {a.dtype} but params[0] has "
                                f"{arrays[0].dtype}; expected one dtype for all params (make "
                                f"one optimizer per dtype)")
        if len(fams) > 1:
            raise TypeError(f"params are on several devices ({', '.join(sorted(d for _, d in fams))}); "
                            f"expected one device per optimizer")
        fam = fams.pop()[0]
        mod = {"host": "hwoptim.backends.numpy", "cuda": "hwoptim.backends.cupy"}[fam]
        address = __import__(mod, fromlist=["address"]).address
        hit = _overlaps([(address(a), f"params[{i}]") for i, a in enumerate(arrays)])
        if hit:
            raise ValueError(f"{hit[1]} overlaps {hit[0]} in memory; expected distinct arrays "
                             f"(one update per element)")
        return fam

    def _check_grads(self, grads) -> list:
        """Flat views of ``grads`` after checking them all; raises before anything changes.

        The common case (the same grad arrays as last step, still of the right dtype,
        shape and contiguity) costs a fraction of a microsecond per array; anything else
        takes the slow path that names the problem."""
        params = self._params
        n = len(params)
        if type(grads) is not list and type(grads) is not tuple:
            if _is_array(grads):
                if n != 1:
                    raise ValueError(f"step() got one array but the optimizer has {n} params; "
                                     f"expected a list of {n} grads")
                grads = (grads,)
            elif isinstance(grads, (list, tuple)):
                grads = tuple(grads)
            else:
                raise TypeError(f"grads is {_describe(grads)}; expected an array or a list of "
                                f"{n} arrays matching params")
        if len(grads) != n:
            raise ValueError(f"step() got {len(grads)} grads; expected {n}, one per param")
        if n and type(grads[0]) is not self._array_type:     # DLPack arrays: their views
            grads = [interop.as_array(g, f"grads[{i}]") if interop.foreign(g) else g
                     for i, g in enumerate(grads)]
        if n >= FAST_MIN and self._family == "host":
            ptrs = self._grad_pointers(grads)
            if ptrs is not None:
                return ptrs
        cuda = self._family == "cuda"
        many = cuda and n >= CUDA_MULTI_MIN and self._multi_ok()
        seen = self._seen
        if many and seen is not None and not seen.died and list(map(id, grads)) == seen.ids:
            # The same CuPy arrays as last step, every one still alive (a death would have
            # set ``died``, so no id can belong to a new array): their memory, dtype and
            # strides cannot change in place (a shape set in place keeps the size and the
            # contiguity, all that a flat update reads), so last step's addresses hold.
            return seen.ptrs
        last = self._checked
        if len(last) == n:
            # The same array objects as last step: their memory has not moved (a weak
            # reference makes NumPy refuse resize(), and a dead array's id cannot come
            # back as a live one), so only what an array can change in place needs a look.
            for r, g, p in zip(last, grads, params):
                if (r() is not g or g is None or g.dtype != p.dtype or g.shape != p.shape
                        or not g.flags.c_contiguous):
                    break
            else:
                return _device_pointers(grads) if many else [g.reshape(-1) for g in grads]
        for i, g in enumerate(grads):
            p = params[i]
            if ((not _plain_host(g) if not cuda else not isinstance(g, self._array_type))
                    or g.dtype != p.dtype or g.shape != p.shape or not g.flags.c_contiguous
                    or (cuda and g.device.id != p.device.id)):
                self._explain_bad_grad(i, g, p)
        spans = tuple(self.backend.address(g) for g in grads)
        if spans != self._checked_spans:      # overlap depends only on the byte ranges
            hit = _overlaps(self._owned + [(a, f"grads[{i}]") for i, a in enumerate(spans)])
            if hit:
                a, b = sorted(hit, key=lambda s: not s.startswith("grads"))
                raise ValueError(f"{a} overlaps {b} in memory; expected grads in their own "
                                 f"memory, apart from params, state and each other")
            self._checked_spans = spans
        self._checked = tuple(_ref(g) for g in grads)
        if many:
            self._seen = _Seen(grads)
            return self._seen.ptrs
        return [g.reshape(-1) for g in grads]

    def _grad_pointers(self, grads):
        """The fast check (hwoptim/_fastcheck.py): the grads' data addresses as an int64
        array when every grad passes and none overlaps params, state or another grad;
        ``None`` to let the per-array path check (and name the problem)."""
        read = _fastcheck.reader()
        if read is None or not self._multi_ok():
            return None
        fc = self._fast
        if fc is None:
            shapes = [p.shape for p in self._params]
            nd = np.array([len(s) for s in shapes], np.int64)
            ptr = np.concatenate([[0], np.cumsum(nd)[:-1]]).astype(np.int64)
            vals = np.array([d for s in shapes for d in s] or [0], np.int64)
            nbytes = np.array([p.nbytes for p in self._params], np.int64)
            own = sorted((a[1], a[2]) for a, _ in self._owned if a[2] > a[1])
            fc = self._fast = SimpleNamespace(
                nd=nd, ptr=ptr, vals=vals, nbytes=nbytes, last=None,
                own_start=np.array([a for a, _ in own], np.int64),
                own_end=np.array([b for _, b in own], np.int64),
                descr=id(formats.np_dtype(self.dtype)))
        n = len(grads)
        out = np.empty(n, np.int64)
        ids = np.fromiter(map(id, grads), np.int64, n)
        if read(ids, id(np.ndarray), fc.descr, fc.ptr, fc.nd, fc.vals, out) != -1:
            return None
        if fc.last is not None and np.array_equal(out, fc.last):
            return out                    # the same memory as last step: overlap checked
        if _pointer_overlap(out, fc.nbytes, fc.own_start, fc.own_end):
            return None
        fc.last = out
        return out

    def _multi_ok(self) -> bool:
        """Whether this optimizer's kernels take a multi-tensor launch."""
        return not self.capturable and all(hasattr(k, "many") for k in self._kernels())

    def _multi_tables(self):
        """Per kernel slot: (kernel, pointer table with the grad column to fill, sizes,
        rows, the slot's param indices), or None for a slot without params; built once per
        set of buffers."""
        if self._tables is None:
            tabs = []
            for si, k in enumerate(self._kernels()):
                idx = np.array([i for i, s in enumerate(self._slot_of) if s == si], np.int64)
                if not idx.size:
                    tabs.append(None)
                    continue
                cols = [[_data_address(v) for v in self._views[i]] for i in idx]
                tab = np.zeros((len(idx), len(cols[0]) + 1), np.int64)
                for r, c in enumerate(cols):
                    tab[r, 0], tab[r, 2:] = c[0], c[1:]
                sizes = np.array([self._views[i][0].shape[0] for i in idx], np.int64)
                tabs.append((k, tab, sizes, np.zeros(len(idx), np.int64), idx))
            self._tables = tabs
        return self._tables

    def _explain_bad_grad(self, i, g, p):
        fam = _backends.family(g)
        if fam is None:
            raise TypeError(f"grads[{i}] is {_describe(g)}; expected a "
                            f"{_KIND[self._family]} array like params[{i}]")
        if fam != self._family or _device(g, fam) != _device(p, self._family):
            raise TypeError(f"grads[{i}] is on {_device(g, fam)} but params[{i}] is on "
                            f"{_device(p, self._family)}; expected both on one device "
                            f"(move the grad: hwoptim never copies silently)")
        if fam == "host" and not _plain_host(g):
            _refuse_subclass(f"grads[{i}]", g)
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{i}] has dtype {g.dtype}; expected {p.dtype} like "
                            f"params[{i}]")
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}; expected "
                             f"{tuple(p.shape)} like params[{i}]")
        xp = "numpy" if fam == "host" else "cupy"
        raise ValueError(f"grads[{i}] is not C-contiguous; expected a contiguous array: "
                         f"pass {xp}.ascontiguousarray(grad)")

    def _call_lr(self, gi: int, lr, t: int) -> float:
        value = lr(t)
        if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
                or not value >= 0 or not _fits_float(value)):
            raise ValueError(f"param_groups[{gi}]: lr({t}) returned {value!r}; "
                             f"expected a finite number >= 0")
        return float(value)

    def _kernels(self) -> list:
        """Each kernel slot's kernel, built (or loaded from the disk cache) on first use: a
        slot per group, then one per group and kind of param whose shape changes the
        flags (Adafactor's factored arrays); ``_slot_of[i]``: param ``i``'s slot."""
        if self._kern is None:
            plans = [_plan(self.rule, f) for f in self._flags]
            keys = [self._kdtype] * len(plans)
            slot_group, slot_of, index = list(range(len(plans))), [], {}
            for p, gi in zip(self._params, self._group_of):
                f = self.rule.array_flags(self._flags[gi], p.shape)
                fkey = self._format_of(p).key
                if f is self._flags[gi] and fkey == self._kdtype:
                    slot_of.append(gi)
                    continue
                pl = _plan(self.rule, f)
                if (gi, pl.key, fkey) not in index:
                    index[(gi, pl.key, fkey)] = len(plans)
                    plans.append(pl)
                    keys.append(fkey)
                    slot_group.append(gi)
                slot_of.append(index[(gi, pl.key, fkey)])
            self._slot_of, self._slot_group = slot_of, slot_group
            kern = [_kernel(self.backend, pl, k) for pl, k in zip(plans, keys)]
            # backends may offer a launch that skips re-checking what step() has checked
            self._launch = [getattr(k, "unchecked", k) for k in kern]
            self._prepare = [getattr(k, "prepare_unchecked", k.prepare) for k in kern]
            self._kern, self._launch_key = kern, None
        return self._kern

    def _launchers(self):
        """Per param, the compiled launch this step will make (backends with ``launcher``:
        the entry point for its size at this thread's thread count), every one built before
        the step changes anything; ``None`` for backends that launch through ``kernel``."""
        kern = self._kernels()
        key = getattr(self.backend, "launch_key", None)
        if key is None:
            return None
        key = key()
        if key != self._launch_key:
            self._entries = [kern[s].launcher(v[0].size, key)       # (flat, but for staged
                             for v, s in zip(self._views, self._slot_of)]  # rules' arrays)
            self._launch_key = key
        return self._entries

    # ------------------------------------------------------------------ stepping
    def step(self, grads, grad_scale=None, found_inf=None) -> None:
        """Apply one update to every param in place, with ``grads`` matching params.

        ``grad_scale`` (loss scaling, as torch's fused optimizers take it): the kernels use
        each grad divided by it; ``found_inf`` non-zero: the whole step is skipped (params,
        state and step count unchanged), as a non-finite grad under ``skip_nonfinite``.
        Each a number or a one-element array.

        Everything is checked and every kernel is built before anything changes: a step
        either updates every param and advances the step count, or raises and changes
        nothing."""
        flat = self._check_grads(grads)
        if self.capturable:
            return self._step_capturable(flat, grad_scale, found_inf)
        inv_scale = None
        if grad_scale is not None or found_inf is not None:
            inv_scale, skip = check_amp(grad_scale, found_inf, f"{self.rule.name}.step(): ")
            if skip:
                self.skipped_steps += 1
                self.last_step_skipped = True
                return
            self.last_step_skipped = False
            if inv_scale == 1.0:
                inv_scale = None
            elif not self._grad_factor:
                self._use_grad_factor()
        elif self.last_step_skipped and not (self.max_grad_norm is not None
                                             or self.skip_nonfinite):
            self.last_step_skipped = False   # (a guard sets it itself)
        if self._norm_combine is not None and not isinstance(flat, np.ndarray):
            flat = np.fromiter((g.ctypes.data for g in flat), np.int64, len(flat))
        entries = None if isinstance(flat, np.ndarray) else self._launchers()
        t = self._next_step()
        scale = None
        if self.max_grad_norm is not None or self.skip_nonfinite:
            scale = self._grad_guard(flat, inv_scale)
            if scale is None:                # a non-finite grad: the whole step is skipped
                return
        if inv_scale is not None:            # the unscaled grads, then the clip factor
            scale = inv_scale * (scale if self.max_grad_norm is not None else 1.0)
        elif self.max_grad_norm is None:
            scale = None
        self._kernels()                      # (rebuilt after a change of flags)
        hs, carry = [], self._carry
        for gi, g in enumerate(self.param_groups):
            lr = g["lr"]
            h = {**g, "lr": self._call_lr(gi, lr, t)} if callable(lr) else g
            if self._grad_factor or self.max_grad_norm is not None:
                h = {**h, "_clip": 1.0 if scale is None else scale}
            if self.rule.carry:
                h, carry = self._carried(gi, h, t, carry)
            hs.append(h)
        scal = [prep(hs[gi], t) for prep, gi in zip(self._prepare, self._slot_group)]
        tables = self._multi_tables() if isinstance(flat, np.ndarray) else None
        self._step, self._carry = t, carry   # everything is checked: from here on, update
        if self._stream is not None:         # torch CUDA tensors: on torch's current stream
            with self._stream():
                self._write_keys(t)
                return self._launch_all(entries, flat, scal, tables)
        self._write_keys(t)
        self._launch_all(entries, flat, scal, tables)

    def _next_step(self) -> int:
        """The step about to be taken, checked."""
        t = self._step + 1
        if t > _MAX_STEP:
            raise ValueError(f"step count {self._step} is at its limit (2**53: the step "
                             f"travels to the kernels as a float64)")
        return t

    def _write_keys(self, t: int):
        """Stochastic rounding: step ``t``'s key of every param, one copy (on a GPU, on the
        current stream: after the kernels that read the last step's keys)."""
        if self.format.sr:
            n = len(self._views)
            self.backend.copy_from_host(self._srkeys[:n],
                                        formats.sr_key(self.seed, t, np.arange(n)))

    def _grad_guard(self, flat, inv_scale=None):
        """``max_grad_norm`` / ``skip_nonfinite``: one read of every grad, then the factor
        the step multiplies grads by (1 without clipping), or ``None`` where the step is
        skipped (a NaN or infinity in a grad, or a norm that is not finite). With a loss
        scale, the norm is the unscaled grads': the scaled grads' divided by the scale."""
        sizes = self._sizes
        if sizes is None:
            sizes = self._sizes = np.array([p.size for p in self._params], np.int64)
        sumsq, finite = self.backend.grad_stats(flat, sizes, self.dtype)     # (its storage)
        if inv_scale is not None:
            sumsq *= inv_scale * inv_scale
        return guard_verdict(self, sumsq, finite)

    def _use_grad_factor(self):
        """From the first step with a loss scale on: kernels that multiply grads by a
        per-step factor (``1 / grad_scale``, times the clip factor with ``max_grad_norm``),
        built once; steps without a scale pass 1, which changes no bit."""
        for gi, f in enumerate(self._flags):
            self._flags[gi] = SimpleNamespace(**{**vars(f), "_clip": True})  # plans keep theirs
            self._refresh_views(gi)
        self._grad_factor = True
        self._kern, self._launch_key = None, None
        if self.capturable:                  # (the factor is one more device scalar)
            self._alloc_k_dev()

    def _carried(self, gi, h, t, carry):
        """(``h`` with group ``gi``'s carried scalars, the carry list after this step)."""
        rule = self.rule
        c = carry[gi] if carry[gi] is not None else carry_init(rule, h)
        h = {**h, **c}
        new = host_scalars(rule, h, t)
        after = {n: new[n] for n in c}
        if not all(map(math.isfinite, after.values())):
            raise ValueError(f"param_groups[{gi}]: step {t} would carry {after}; expected "
                             f"finite numbers (check the hyperparameters)")
        return h, carry[:gi] + [after] + carry[gi + 1:]

    def _launch_all(self, entries, flat, scal, tables=None):
        if tables is not None:               # grad addresses: one launch per group
            combine = self._norm_combine
            for gi, (table, sc) in enumerate(zip(tables, scal)):
                if table is None:
                    continue
                k, tab, sizes, rows, idx = table
                tab[:, 1] = flat[idx]
                if combine is None:
                    k.many(tab, sizes, rows, np.array([sc], dtype=self._cdtype))
                else:
                    k.many(tab, sizes, rows, np.array([sc], dtype=self._cdtype),
                           combine=lambda total, gi=gi: combine(gi, total))
            return
        batched = {}                         # staged slots (Adafactor's matrices): together
        kern = self._kern
        if entries is not None:
            for views, s, gr, e in zip(self._views, self._slot_of, flat, entries):
                if hasattr(kern[s], "run_list"):
                    batched.setdefault(s, []).append([views[0], gr, *views[1:]])
                else:
                    e(views[0], gr, *views[1:], *scal[s])
        else:
            launch = self._launch
            for views, s, gr in zip(self._views, self._slot_of, flat):
                if hasattr(kern[s], "run_list"):
                    batched.setdefault(s, []).append([views[0], gr, *views[1:]])
                else:
                    launch[s]([views[0], gr, *views[1:]], scal[s])
        for s, items in batched.items():
            kern[s].run_list(items, scal[s])

    # ------------------------------------------------------------------ capturable (CuPy)
    def _hyper_vector(self, group):
        """The hyperparameters as the device scalar function reads them (float64, spec
        order; dtype-dependent ones resolved, as the host resolves them: Adafactor's
        eps1=None is the params' machine epsilon)."""
        group = resolve_hypers(self.rule, group, self._cdtype)
        vals = []
        for n, hy in self.rule.hypers.items():
            v = group[n]
            vals += list(v) if isinstance(hy.default, tuple) else [v]
        return np.asarray(vals, dtype=np.float64)

    def _init_device_scalars(self):
        import cupy
        with self._params[0].device:
            self._hyper_dev = [cupy.asarray(self._device_hypers_host(gi))
                               for gi in range(len(self.param_groups))]
            self._step_dev = [cupy.zeros(1, dtype=np.float64) for _ in self.param_groups]
            # the step's verdict: skip, the grads' factor, the grad norm, skipped steps
            self._guard_dev = cupy.asarray(np.array([0.0, 1.0, np.nan, 0.0]))
        self._dev_tables = {}          # device tables of capturable steps (grads' addresses)
        self._alloc_k_dev()

    def _alloc_k_dev(self):
        """Each group's per-step kernel scalars on the device (sized by its plan), and for
        rules taking norms each param's sums of squares. Arrays of the right size are kept:
        a graph captured before (a group added since) goes on reading them."""
        import cupy

        def sized(old, n, dtype):
            return old if old is not None and old.size == n else cupy.zeros(n, dtype=dtype)
        old_k = list(getattr(self, "_k_dev", []))
        old_s = list(getattr(self, "_sums_dev", []))
        with self._params[0].device:
            self._k_dev = [sized(old_k[gi] if gi < len(old_k) else None,
                                 len(_plan(self.rule, f).scalars), self._cdtype)
                           for gi, f in enumerate(self._flags)]
            norms = [len(_plan(self.rule, f).norms) for f in self._flags]
            self._sums_dev = [
                sized(old_s[i] if i < len(old_s) else None,
                      self.backend.norm_scratch(norms[gi], p.size), np.float64)
                if norms[gi] else None
                for i, (gi, p) in enumerate(zip(self._group_of, self._params))]

    def _device_hypers_host(self, gi: int) -> np.ndarray:
        """Group ``gi``'s device hyperparameter vector: the hyperparameters, then the
        carried scalars (their values now, or those a first step starts from)."""
        g = self.param_groups[gi]
        vec = self._hyper_vector(g)
        if self.rule.carry:
            c = self._carry[gi] if self._carry[gi] is not None else carry_init(self.rule, g)
            vec = np.concatenate([vec, [c[x.name] for x in self.rule.carry]])
        return vec

    def _upload_hypers(self, gi: int, carry: bool):
        """Group ``gi``'s hyperparameters to the device, on the current stream (in order with
        its steps); the carried scalars too where ``carry`` (otherwise the device's values,
        which the steps update, stay)."""
        vec = self._device_hypers_host(gi)
        if carry or not self.rule.carry:
            self._hyper_dev[gi].set(vec)
        else:
            n = len(vec) - len(self.rule.carry)
            self._hyper_dev[gi][:n].set(vec[:n])

    def _carry_now(self) -> list:
        """Each group's carried scalars after the last step (``None``: none taken yet; in
        capturable mode read from the device, where the steps update them)."""
        if not (self.capturable and self.rule.carry):
            return [None if c is None else dict(c) for c in self._carry]
        if self.step_count == 0:
            return [None] * len(self.param_groups)
        nc = len(self.rule.carry)
        return [dict(zip((c.name for c in self.rule.carry), map(float, h[-nc:].get())))
                for h in self._hyper_dev]

    # ------------------------------------------------------------------ the guard's record
    @property
    def skipped_steps(self) -> int:
        """Steps skipped (found_inf, a non-finite grad under ``skip_nonfinite``, a norm that
        is not finite under ``max_grad_norm``); capturable: counted on the device."""
        if self.capturable:
            return int(self._guard_dev[3].get())
        return self._skipped

    @skipped_steps.setter
    def skipped_steps(self, n):
        if self.capturable:
            self._guard_dev[3] = float(n)
        else:
            self._skipped = n

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last step was skipped (capturable: read from the device)."""
        if self.capturable:
            return self._guard_mode is not None and bool(self._guard_dev[0].get() != 0)
        return self._last_skipped

    @last_step_skipped.setter
    def last_step_skipped(self, v):
        self._last_skipped = v

    @property
    def last_grad_norm(self):
        """The grads' 2-norm the guard measured at the last step it ran (NaN where one was
        not finite; ``None`` before); capturable: read from the device."""
        if self.capturable:
            if self._guard_mode is None or not self._guard_mode & codegen.GUARD_MODE["stats"]:
                return None
            return float(self._guard_dev[2].get())
        return self._last_norm

    @last_grad_norm.setter
    def last_grad_norm(self, v):
        self._last_norm = v

    @property
    def device_hypers(self) -> list:
        """Capturable mode: each group's hyperparameters on the device (float64, in spec
        order, ``lr`` first). A device-side schedule writes the learning rate here."""
        if not self.capturable:
            raise ValueError("device_hypers exist only with capturable=True")
        return self._hyper_dev

    def _check_aligned(self, flat):
        for i, (views, g) in enumerate(zip(self._views, flat)):
            for what, a in (("params", views[0]), ("grads", g)):
                if a.data.ptr % 16:
                    raise ValueError(f"{what}[{i}] does not start on a 16-byte boundary; "
                                     f"capturable steps need 16-byte aligned arrays (CuPy "
                                     f"allocations and hwoptim.FlatParams views are): pass "
                                     f"an aligned copy")

    def _step_capturable(self, flat, grad_scale, found_inf):
        """A capturable step (CuPy): every decision on the device. With ``max_grad_norm``,
        ``skip_nonfinite``, ``grad_scale`` or ``found_inf`` (numbers, or one-element device
        arrays read there), the step's verdict first (``backends.cupy.step_guard``), then
        the guarded kernels: a skipped step changes no param, state or step count, and
        nothing waits on the host."""
        where = f"{self.rule.name}.step(): "
        amp = []
        for name, x in (("found_inf", found_inf), ("grad_scale", grad_scale)):
            if x is not None and _is_device_array(x):
                if _backends.family(x) != "cuda":        # torch: a zero-copy CuPy view
                    import cupy
                    x = cupy.asarray(x)
                self._check_amp_array(x, name, where)
            elif x is not None:
                x = _one_number(x, name, where)
                if name == "grad_scale":
                    check_amp(x, None, where)           # a number: finite and > 0
            amp.append(x)
        found_inf, grad_scale = amp
        t = self._next_step()
        self._check_aligned(flat)            # the device kernels need it: check before any
        mode = 0                             # change, so a rejected step changes nothing
        if self.max_grad_norm is not None or self.skip_nonfinite:
            mode |= codegen.GUARD_MODE["stats"]
        if self.max_grad_norm is not None:
            mode |= codegen.GUARD_MODE["clip"]
        if found_inf is not None:
            mode |= codegen.GUARD_MODE["found_inf"]
        if grad_scale is not None:
            mode |= codegen.GUARD_MODE["grad_scale"]
        if mode or self._grad_factor or grad_scale is not None:
            self.backend.step_guard_kernels(flat[0].dtype if len(flat) else self._cdtype)
        if grad_scale is not None and not self._grad_factor:
            self._use_grad_factor()          # (kernels taking the grads' factor, built once)
        self._kernels()
        self._step = t
        amp = (mode, found_inf, grad_scale) if (mode or self._grad_factor) else None
        if self._stream is not None:
            with self._stream():
                return self._step_device(self._kern, flat, amp)
        return self._step_device(self._kern, flat, amp)

    def _sr_of(self, i: int):
        """Capturable stochastic rounding: (seed, the device step count, param ``i``'s
        number), from which its kernel makes the step's key (``formats.sr_key``)."""
        if not self.format.sr:
            return None
        return self.seed, self._step_dev[self._group_of[i]], i

    def _check_amp_array(self, x, name: str, where: str):
        """A device ``found_inf`` / ``grad_scale`` for a capturable step: one float32 or
        float64 element on the params' device (read by the verdict kernel, not here)."""
        p = self._params[0]
        if _backends.family(x) != self._family or _device(x, self._family) != \
                _device(p, self._family):
            raise TypeError(f"{where}{name} is {_describe(x)}; expected a number or a "
                            f"one-element array on {_device(p, self._family)}")
        if x.size != 1 or str(x.dtype) not in ("float32", "float64"):
            raise TypeError(f"{where}{name} is a {x.dtype} array of {x.size} elements; "
                            f"expected one float32 or float64 element")

    def _step_device(self, kernels, flat, amp=None):
        """The device kernels of a capturable step; ``amp``: (verdict mode, found_inf,
        grad_scale), or ``None`` for an unguarded step."""
        if amp is None:
            for gi in range(len(self.param_groups)):
                kernels[gi].advance(self._hyper_dev[gi], self._step_dev[gi], self._k_dev[gi])
            for i, views in enumerate(self._views):     # (a param's slot: its format's)
                kernels[self._slot_of[i]].device(
                    [views[0], flat[i], *views[1:]], self._k_dev[self._group_of[i]],
                    sums=self._sums_dev[i], sr=self._sr_of(i), tables=self._dev_tables)
            self._guard_mode = None
            return
        mode, found_inf, grad_scale = amp
        guard = self._guard_dev
        self.backend.step_guard(list(flat), guard, mode, found_inf, grad_scale,
                                self.max_grad_norm or 0.0, tables=self._dev_tables)
        for gi in range(len(self.param_groups)):
            kernels[gi].advance_guard(self._hyper_dev[gi], self._step_dev[gi],
                                      self._k_dev[gi], guard)
        for i, views in enumerate(self._views):
            kernels[self._slot_of[i]].device_guard(
                [views[0], flat[i], *views[1:]], self._k_dev[self._group_of[i]], guard,
                sums=self._sums_dev[i], sr=self._sr_of(i), tables=self._dev_tables)
        self._guard_mode = mode

    # ------------------------------------------------------------------ checkpoints
    @property
    def step_count(self) -> int:
        """Steps taken (read from the device in capturable mode, where graph replays step)."""
        if self.capturable:
            return int(self._step_dev[0].get()[0])
        return self._step

    def state_dict(self) -> dict:
        """Host (NumPy) copies of the state, the step count and the hyperparameters.

        A callable ``lr`` is recorded by its value at the current step."""
        t = self.step_count
        groups, start = [], 0
        for gi, g in enumerate(self.param_groups):
            d = {k: v for k, v in g.items() if k != "params"}
            if callable(d["lr"]):
                d["lr"] = float(g["lr"](max(t, 1)))
            d["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(d)
        return {
            "rule": self.rule.name,
            "step": t,
            "dtype": self.dtype,
            **({} if self.format.plain else {"format": {
                "state_dtype": self.format.state, "master_weights": self.format.master,
                "stochastic_rounding": self.format.sr, "seed": self.seed}}),
            "shapes": [tuple(p.shape) for g in self.param_groups for p in g["params"]],
            "param_groups": groups,
            "state": [{k: self._host_state(v) for k, v in st.items()} for st in self.state],
            **({"carry": self._carry_now()} if self.rule.carry else {}),
        }

    def _host_state(self, a) -> np.ndarray:
        """A host copy of state buffer ``a`` with its values' dtype (bfloat16 for a GPU's
        ``uint16`` bfloat16 state)."""
        h = self.backend.to_host(a)
        return h.view(self._storage_dtype(a))

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`, from any backend; everything is checked first.

        Saved hyperparameters replace the current ones, except that a callable ``lr`` here
        is kept (the schedule resumes from the restored step)."""
        sd = state_dict
        keys = ("rule", "step", "dtype", "shapes", "param_groups", "state")
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict is {_describe(sd)}; expected a dict, as "
                            f"Optimizer.state_dict() returns")
        missing = [k for k in keys if k not in sd]
        if missing:
            raise TypeError(f"state_dict is missing {', '.join(map(repr, missing))}; it has "
                            f"keys {sorted(map(str, sd))}, expected {list(keys)}")
        if sd["dtype"] != self.dtype and _compute_of(sd["dtype"]) != self._cdtype:
            raise TypeError(f"state_dict['dtype'] is {sd['dtype']!r}; expected {self.dtype!r} "
                            f"(the params' dtype), or another dtype whose math is "
                            f"{self._cdtype} (a checkpoint converts between storage formats)")
        if sd["rule"] != self.rule.name:
            raise ValueError(f"state_dict['rule'] is {sd['rule']!r}; expected "
                             f"{self.rule.name!r} (a state_dict loads into the same rule)")
        if self.rule.carry and "carry" not in sd:
            raise TypeError(f"state_dict is missing 'carry'; {self.rule.name} carries "
                            f"{', '.join(c.name for c in self.rule.carry)} from step to step "
                            f"(Optimizer.state_dict() saves them)")
        shapes = [tuple(p.shape) for g in self.param_groups for p in g["params"]]
        got = [tuple(s) for s in sd["shapes"]]
        if got != shapes:
            raise ValueError(f"state_dict['shapes'] is {got}; expected {shapes} (the same "
                             f"params, in the same order)")
        layout = [len(g["params"]) for g in self.param_groups]
        got_layout = [len(g.get("params", ())) for g in sd["param_groups"]]
        if got_layout != layout:
            raise ValueError(f"state_dict has param groups of sizes {got_layout}; expected "
                             f"{layout}")
        step = sd["step"]
        if (isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral)
                or not 0 <= step <= _MAX_STEP):
            raise ValueError(f"state_dict['step'] is {step!r}; expected an integer from 0 "
                             f"to 2**53 (the step count travels as a float64)")
        new_groups = []
        for gi, (mine, theirs) in enumerate(zip(self.param_groups, sd["param_groups"])):
            merged = dict(mine)
            for k, v in theirs.items():
                if k == "params":
                    continue
                if k not in self._known:          # a user's or scheduler's key: as saved
                    merged[k] = v
                    continue
                v = self._check_value(k, v, f"state_dict['param_groups'][{gi}]: ")
                if not (k == "lr" and callable(mine["lr"])):
                    merged[k] = v
            flags = self._check_group(merged, f"state_dict['param_groups'][{gi}]: ")
            if self._buffers(flags) != self._buffers(self._flags[gi]):
                raise ValueError(f"state_dict['param_groups'][{gi}] needs the state buffers "
                                 f"{self._buffers(flags)} (options {vars(flags)}); this "
                                 f"optimizer's group has {self._buffers(self._flags[gi])}: "
                                 f"make it with the same options")
            new_groups.append(merged)
        if len(sd["state"]) != len(self.state):
            raise ValueError(f"state_dict['state'] has {len(sd['state'])} entries; expected "
                             f"{len(self.state)}")
        carry = self._check_carry(sd) if self.rule.carry else []
        loaded = [self._loaded_state(i, mine, theirs)
                  for i, (mine, theirs) in enumerate(zip(self.state, sd["state"]))]
        fmt = sd.get("format") or {}
        # all checked: now change things
        for mine, new in zip(self.state, loaded):
            for k, v in new.items():                     # (bfloat16: its bits on a GPU)
                self.backend.copy_from_host(mine[k], v.view(mine[k].dtype))
        if self.format.sr and isinstance(fmt.get("seed"), numbers.Integral) and \
                not isinstance(fmt.get("seed"), (bool, np.bool_)) and 0 <= fmt["seed"] < 2**64:
            self.seed = int(fmt["seed"])     # the run's stream resumes
        for g, merged in zip(self.param_groups, new_groups):   # checked above: cannot fail
            self._set_hypers(g, {k: v for k, v in merged.items() if k != "params"})
        self._step = int(step)
        if self.rule.carry:
            self._carry = carry
        if self.capturable:
            for gi in range(len(self.param_groups)):
                self._upload_hypers(gi, carry=True)
                self._step_dev[gi].fill(float(step))

    def _loaded_state(self, i, mine, theirs) -> dict:
        """``state_dict['state'][i]`` checked against ``state[i]`` and converted to its
        storage: {name: host array to copy in}. Another storage format of the same math
        converts: float storage to nearest, int8 codes dequantized, float into int8
        quantized; a master copy the checkpoint lacks starts from the params."""
        where = f"state_dict['state'][{i}]"
        if not isinstance(theirs, dict):
            raise ValueError(f"{where} is {_describe(theirs)}; expected a dict of arrays")

        def base(st):
            return {k for k in st if not (isinstance(k, str) and k.endswith("_absmax"))} \
                - {"master"}
        if base(theirs) != base(mine):
            raise ValueError(f"{where} holds {sorted(map(str, theirs))}; expected "
                             f"{sorted(mine)}")
        new = {}
        for k in [k for k in theirs if k in base(mine)] + (
                ["master"] if "master" in mine and "master" in theirs else []):
            v, q = np.asarray(theirs[k]), f"{k}_absmax"
            want, want_dtype = mine[k], self._storage_dtype(mine[k])
            if q in theirs and q not in mine:           # int8 there: decoded
                a = np.asarray(theirs[q])
                if v.dtype != np.uint8 or v.size != want.size or a.dtype != np.float32 or \
                        a.size != -(-want.size // formats.BLOCK):
                    raise ValueError(f"{where}[{k!r}] is {v.dtype} {v.shape} with absmax "
                                     f"{a.dtype} {a.shape}; expected uint8 codes of "
                                     f"{want.size} elements and float32 absmax of "
                                     f"{-(-want.size // formats.BLOCK)} blocks")
                v = formats.dequantize(v, a).reshape(want.shape)
            if q in mine and q not in theirs:           # int8 here: quantized
                if v.size != want.size or formats.dtype_name(v.dtype) is None or \
                        _compute_of(formats.dtype_name(v.dtype)) != self._cdtype:
                    raise ValueError(f"{where}[{k!r}] is {v.dtype} {v.shape}; expected "
                                     f"{want.size} elements of a {self._cdtype} format")
                new[k], new[q] = formats.quantize(v.astype(np.float32).reshape(-1))
                continue
            if q in mine:                               # int8 on both sides: as stored
                new[q] = np.asarray(theirs[q])
            elif v.dtype != want_dtype and v.shape == tuple(want.shape) and \
                    formats.dtype_name(v.dtype) is not None and \
                    _compute_of(formats.dtype_name(v.dtype)) == self._cdtype:
                v = formats.round_nearest(v, formats.dtype_name(want_dtype))
            new[k] = v
        for k, v in new.items():
            want_dtype = self._storage_dtype(mine[k])
            if v.shape != tuple(mine[k].shape) or v.dtype != want_dtype:
                raise ValueError(f"{where}[{k!r}] is {v.dtype} {v.shape}; expected "
                                 f"{want_dtype} {tuple(mine[k].shape)}")
        if "master" in mine and "master" not in new:    # it starts from the params
            new["master"] = self.backend.to_host(self._params[i]).astype(np.float32)
        return new

    def _check_carry(self, sd) -> list:
        """``state_dict['carry']`` checked: per group, None or {name: finite float}."""
        names = sorted(c.name for c in self.rule.carry)
        got = sd.get("carry")
        if not isinstance(got, (list, tuple)) or len(got) != len(self.param_groups):
            raise ValueError(f"state_dict['carry'] is {_short(got)}; expected a list with one "
                             f"entry per param group ({len(self.param_groups)}), each None or "
                             f"a dict of {names}")
        out = []
        for gi, c in enumerate(got):
            if c is not None and (not isinstance(c, dict) or sorted(c) != names or not all(
                    isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
                    and _fits_float(v) for v in c.values())):
                raise ValueError(f"state_dict['carry'][{gi}] is {_short(c)}; expected None or "
                                 f"a dict of {names} holding finite numbers")
            out.append(None if c is None else {n: float(v) for n, v in c.items()})
        return out

    def __repr__(self):
        n = len(self._params)
        return (f"{self.rule.name}({n} array{'s' if n != 1 else ''}, {self.dtype}, "
                f"backend={self.backend_name!r}, step={self._step})")

    # ------------------------------------------------------------------ copies
    def __reduce_ex__(self, protocol):
        """``copy.deepcopy`` and ``pickle`` give an optimizer that owns copies of the
        params and state (and the same hyperparameters, step count and backend)."""
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])}
                  for g in self.param_groups]
        state = [dict(st) for st in self.state]
        return (_rebuild, (type(self), groups, state, self.step_count, self.backend_name,
                           self.capturable, self._carry_now(),
                           (self.max_grad_norm, self.skip_nonfinite, self.skipped_steps),
                           (None if self.format.state == self.format.compute
                            else self.format.state, self.format.master, self.format.sr,
                            self.seed, self.min_8bit_size)))


def _compute_of(dtype_name) -> str | None:
    """The dtype the math of params of ``dtype_name`` runs in (None: not a params dtype)."""
    if dtype_name not in formats.PARAM_DTYPES:
        return None
    return "float64" if dtype_name == "float64" else "float32"


def _rebuild(cls, groups, state, step, backend, capturable, carry=None,
             guard=(None, False, 0), storage=(None, False, False, 0, formats.MIN_8BIT_SIZE)):
    opt = cls.__new__(cls)
    opt._setup(groups, opt._parse_args((), {}), backend, capturable, states=state,
               guard=guard[:2], storage=storage)
    opt.skipped_steps = guard[2]
    opt._step = int(step)
    if carry is not None:
        opt._carry = carry
    if opt.capturable:
        for gi, s in enumerate(opt._step_dev):
            s.fill(float(step))
            opt._upload_hypers(gi, carry=True)
    return opt


def make_optimizer_class(rule: Rule) -> type:
    """The public class for ``rule``: torch.optim's name, signature and defaults."""
    params = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=h.default)
               for n, h in rule.hypers.items()]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v)
               for n, v in rule.options.items()]
    params += [inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None),
               inspect.Parameter("capturable", inspect.Parameter.KEYWORD_ONLY, default=False),
               inspect.Parameter("max_grad_norm", inspect.Parameter.KEYWORD_ONLY, default=None),
               inspect.Parameter("skip_nonfinite", inspect.Parameter.KEYWORD_ONLY,
                                 default=False)]
    hyper_doc = "\n".join(f"    {n}: {h.doc} (default {h.default!r})"
                          for n, h in rule.hypers.items())
    doc = (f"{rule.doc.strip()}\n\nUpdate: {rule.formula}\n\nArgs:\n    params: an array, a "
           f"list of arrays, or a list of parameter groups.\n{hyper_doc}\n"
           + "".join(f"    {n}: option (default {v})\n" for n, v in rule.options.items())
           + "    backend: None (fastest available), or a name from "
             "hwoptim.backends.available().\n"
           + "    capturable: keep per-step scalars on the device (CuPy), for CUDA graphs.\n"
           + "    max_grad_norm: clip all grads by their global 2-norm first, as "
             "torch.nn.utils.clip_grad_norm_ would (fused; a non-finite norm skips the "
             "step).\n"
           + "    skip_nonfinite: skip the whole step (params, state, step count unchanged) "
             "when any grad element is NaN or ±Inf; see skipped_steps.\n"
           + "\nNon-finite numbers: a NaN or ±Inf in an element of a grad or param goes into "
             "that element of the param and its state and never into another; the step "
             "neither checks, warns nor stops (README, 'Non-finite numbers', says where this "
             "differs from torch).\n")
    cls = type(rule.name, (Optimizer,), {"rule": rule, "__doc__": doc, "__module__": "hwoptim"})
    cls.__signature__ = inspect.Signature(params)
    return cls
