"""Drop-in ``torch.optim`` optimizers: ``from hwoptim.torch import AdamW`` and train as with
``torch.optim.AdamW``. One class per rule spec (every rule with a torch twin has torch's
name, signature, defaults and state layout), each a real ``torch.optim.Optimizer`` subclass,
so ``zero_grad``, ``add_param_group``, ``state_dict``/``load_state_dict`` (interchangeable with
torch's own optimizers), step hooks, LR schedulers and ``torch.amp.GradScaler`` work unchanged.

``step()`` runs hwoptim's generated kernels on the tensors' memory, zero-copy: the Numba
backend (or NumPy, ``backend="numpy"``) for CPU tensors, CuPy for CUDA tensors, on torch's
current stream. The extra arguments are ``backend=`` and, for CPU tensors, the storage
formats' ``state_dtype=``, ``master_weights=``, ``stochastic_rounding=``, ``seed=`` and
``min_8bit_size=`` (README, "Storage formats"). torch's ``foreach`` and ``fused``
are accepted and change nothing (hwoptim's kernels are always fused); ``capturable=True`` and
``differentiable=True`` are refused.

What follows torch exactly: params whose ``.grad`` is ``None`` are skipped and their state is
neither created nor advanced; state is created where torch creates it (Adagrad: in the
constructor, for every param; the others: at a param's first step with a grad); the step
count is per param (a 0-d float tensor ``state[p]["step"]``, as torch keeps it; SGD keeps
none); sparse grads are refused.
"""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import torch
from torch.optim import Optimizer as _TorchOptimizer

from . import backends as _backends
from . import formats, interop
from .optim import _kernel, _plan, check_amp, check_guard, check_value, guard_verdict
from .spec import carry_init, host_scalars
from .rules import RULES

__all__ = []

# torch facts per rule (not math): where torch creates state, and whether it counts steps
_EAGER_STATE = {"Adagrad"}          # state for every param in the constructor
_NO_STEP = {"SGD"}                  # no state["step"]; the first step is the buffer's first
_TORCH_ONLY = ("foreach", "fused", "capturable", "differentiable")   # accepted torch args
_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_SIXTEEN = {torch.bfloat16: "bfloat16", torch.float16: "float16"}   # (storage formats)
_STRIDED = torch.strided


def _scalar_dtype():
    """The dtype torch gives ``state["step"]``: float64 under a float64 default dtype."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _host(v):
    """A hyperparameter as a host number (0-d tensors and tuples of them included)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"expected a number or a one-element tensor, got shape "
                             f"{tuple(v.shape)}")
        return float(v.item())
    if isinstance(v, (tuple, list)):
        return tuple(_host(b) for b in v)
    return v


def _view(t):
    """A NumPy (CPU) or CuPy (CUDA) view of tensor ``t``'s memory (bfloat16: as
    ``ml_dtypes.bfloat16``, which NumPy cannot take from torch directly)."""
    t = t.detach()
    if t.device.type == "cpu":
        if t.dtype is torch.bfloat16:
            return t.view(torch.int16).numpy().view(formats.np_dtype("bfloat16"))
        return t.numpy()
    return interop.as_array(t, "tensor")


class Optimizer(_TorchOptimizer):
    """Base class of the drop-in optimizers; see :mod:`hwoptim.torch`."""

    rule = None
    _torch_defaults: dict = {}
    # torch.amp.GradScaler hands the loss scale and its inf check to step() (as the
    # attributes grad_scale and found_inf) instead of unscaling the grads itself
    _step_supports_amp_scaling = True
    _grad_factor = False          # kernels multiply grads by a per-step factor (_clip)

    def __init__(self, params, *args, backend: str | None = None, max_grad_norm=None,
                 skip_nonfinite: bool = False, state_dtype=None, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0,
                 min_8bit_size: int = formats.MIN_8BIT_SIZE, **kwargs):
        rule = self.rule
        where = f"{type(self).__name__}(): "
        formats.make("bfloat16", state_dtype, master_weights, stochastic_rounding, where)
        for name, v, top in (("seed", seed, 2**64), ("min_8bit_size", min_8bit_size, 2**63)):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or \
                    not 0 <= v < top:
                raise ValueError(f"{where}{name}={v!r} is invalid: expected an integer >= 0")
        self._storage = {"state_dtype": state_dtype, "master_weights": bool(master_weights),
                         "stochastic_rounding": bool(stochastic_rounding), "seed": int(seed),
                         "min_8bit_size": int(min_8bit_size)}
        self.max_grad_norm, self.skip_nonfinite = check_guard(
            max_grad_norm, skip_nonfinite, f"{type(self).__name__}(): ")
        self.skipped_steps, self.last_step_skipped, self.last_grad_norm = 0, False, None
        names = [n for n in self._signature_names() if n != "params"]
        if len(args) > len(self._positional):
            raise TypeError(f"{type(self).__name__}() takes at most {len(self._positional)} "
                            f"positional arguments after params; got {len(args)}")
        for n, v in zip(self._positional, args):
            if n in kwargs:
                raise TypeError(f"{type(self).__name__}() got {n!r} both by position and by "
                                f"name")
            kwargs[n] = v
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            raise TypeError(f"{type(self).__name__}() got an unexpected argument "
                            f"{unknown[0]!r}; expected one of {', '.join(names)}, backend, "
                            f"max_grad_norm, skip_nonfinite, state_dtype, master_weights, "
                            f"stochastic_rounding, seed, min_8bit_size")
        defaults = {n: p.default for n, p in self._parameters.items() if n != "params"}
        defaults.update(kwargs)
        for k in ("capturable", "differentiable"):
            if defaults.get(k):
                raise ValueError(f"{type(self).__name__}({k}=True) is not supported by "
                                 f"hwoptim.torch; use torch.optim for it, or hwoptim's native "
                                 f"classes (capturable=True with CuPy arrays)")
        self._check_group(defaults, f"{type(self).__name__}(): ")
        if backend is not None and backend not in _backends.names():
            raise ValueError(f"backend={backend!r} is unknown; expected None or one of "
                             f"{', '.join(repr(n) for n in _backends.names())}")
        self._backend_request = backend
        self._checked_groups = {}
        self._steps, self._step_index, self._need = _StepBank(), {}, {}
        super().__init__(params, defaults)      # calls add_param_group for each group

    # ------------------------------------------------------------------ formats
    def _format_of(self, p) -> formats.Format:
        """Param ``p``'s storage format (hwoptim.formats) from the constructor's options:
        master weights and stochastic rounding apply to its 16-bit params, ``state_dtype``
        to all but float64 ones, int8 from ``min_8bit_size`` elements."""
        st = self._storage
        name = _DTYPES.get(p.dtype) or _SIXTEEN.get(p.dtype)
        if name is None or name == "float64":
            return formats.make(name or "float64")
        sixteen = name in formats.SIXTEEN
        state = st["state_dtype"]
        if state == "int8" and p.numel() < st["min_8bit_size"]:
            state = None
        return formats.make(name, state, st["master_weights"] and sixteen,
                            st["stochastic_rounding"] and sixteen)

    def _sr_index(self, p) -> int:
        """``p``'s number over all groups (its stochastic-rounding stream)."""
        index = self.__dict__.get("_param_numbers")
        if index is None or id(p) not in index:
            index = self.__dict__["_param_numbers"] = {
                id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
        return index[id(p)]

    def state_dict(self):
        """torch's state dict, with ``"hwoptim_format"``: the storage options (and the
        stochastic-rounding seed), which :meth:`load_state_dict` takes back."""
        sd = super().state_dict()
        sd["hwoptim_format"] = dict(self._storage)
        return sd

    def load_state_dict(self, state_dict):
        """torch's, keeping each state buffer's saved dtype, then converting every buffer
        to this optimizer's storage format (float to nearest, int8 quantized or decoded; a
        missing master copy from the params); a saved seed continues its stream."""
        super().load_state_dict(state_dict)
        # torch cast floating state to the params' dtype: put the saved buffers back
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        mine = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, mine):
            for k, v in (state_dict["state"].get(i) or {}).items():
                if k != "step" and isinstance(v, torch.Tensor) and p in self.state:
                    self.state[p][k] = v.detach().to(device=p.device).clone()
        saved = state_dict.get("hwoptim_format") or {}
        if self._storage["stochastic_rounding"] and isinstance(saved.get("seed"), int):
            self._storage["seed"] = saved["seed"]
        self._to_formats()

    def _to_formats(self):
        """Every param's state buffers in its format's storage."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                f = self._format_of(p)
                flags = self.rule.array_flags(self._flags(group, "")[1], p.shape)
                for s in self.rule.active_states(flags):
                    if s.name not in st:
                        continue
                    v, q = st[s.name], f"{s.name}_absmax"
                    if q in st:                         # int8 codes: decoded (on the host)
                        v = torch.from_numpy(formats.dequantize(
                            _view(v.cpu()), _view(st.pop(q).cpu()))).to(p.device)
                        v = v.reshape(s.shape_for(p.shape) if s.shape else p.shape)
                    if f.quantized:
                        codes, absmax = formats.quantize(_view(v.float().cpu()).reshape(-1))
                        st[s.name] = torch.from_numpy(codes).to(p.device)
                        st[q] = torch.from_numpy(absmax).to(p.device)
                    else:
                        st[s.name] = v.to(dtype=_torch_dtype(f.state if p.dtype is not
                                                             torch.float64 else "float64"))
                if f.master and "master" not in st:
                    st["master"] = p.detach().float().clone()
                elif not f.master:
                    st.pop("master", None)

    # ------------------------------------------------------------------ signature
    @classmethod
    def _signature_names(cls):
        return list(cls._parameters)

    # ------------------------------------------------------------------ checks
    def _check_group(self, group, where):
        """The group's hyperparameters and options, checked (as hwoptim's native classes
        check them): a dict of host values, or an error naming the bad one."""
        rule = self.rule
        out = {}
        for n in list(rule.hypers) + list(rule.options):
            if n not in group:
                continue
            v = group[n]
            try:
                v = _host(v)
            except ValueError as e:
                raise ValueError(f"{where}{n}: {e}") from None
            out[n] = check_value(rule, n, v, where)
        h = SimpleNamespace(**{n: out[n] for n in rule.hypers})
        o = SimpleNamespace(**{n: out[n] for n in rule.options})
        if rule.check is not None:
            for arg, value, expected in rule.check(h, o):
                raise ValueError(f"{where}{arg}={value!r} is invalid: expected {expected}")
        return out

    def _flags(self, group, where):
        """(host hyperparameters, static flags) of ``group``, checked when they changed."""
        rule = self.rule
        key = tuple(_host(group[n]) if isinstance(group[n], torch.Tensor) else group[n]
                    for n in self._keys)
        hit = self._checked_groups.get(id(group))
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        vals = self._check_group(group, where)
        h = {n: vals[n] for n in rule.hypers}
        flags = rule.static_flags(h, {n: vals[n] for n in rule.options})
        if self.max_grad_norm is not None or self._grad_factor:
            flags._clip = True                 # grads times the step's factor
        self._checked_groups[id(group)] = (key, h, flags)
        return h, flags

    def add_param_group(self, param_group):
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        where = f"param_groups[{len(self.param_groups)}]: "
        self._check_group(merged, where)
        super().add_param_group(param_group)
        if self.rule.name in _EAGER_STATE and hasattr(self, "_checked_groups"):
            group = self.param_groups[-1]
            for p in group["params"]:
                self._init_state(p, group, self._flags(group, where))

    def __getstate__(self):
        return {**super().__getstate__(), "_guard": (self.max_grad_norm, self.skip_nonfinite,
                                                     self.skipped_steps)}

    def __setstate__(self, state):
        """Also what ``load_state_dict`` ends with: groups saved by torch.optim lack
        hwoptim's own options (RMSprop's eps_in_sqrt); they get this optimizer's defaults."""
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        self.__dict__.setdefault("_checked_groups", {})
        self.__dict__.setdefault("_backend_request", None)
        self.__dict__.setdefault("_steps", _StepBank())
        self.__dict__.setdefault("_need", {})
        self.__dict__["_step_index"] = {}
        guard = self.__dict__.pop("_guard", (None, False, 0))
        for k, v in zip(("max_grad_norm", "skip_nonfinite", "skipped_steps"), guard):
            self.__dict__.setdefault(k, v)
        self.__dict__.setdefault("last_step_skipped", False)
        self.__dict__.setdefault("last_grad_norm", None)

    # ------------------------------------------------------------------ state
    def _init_state(self, p, group, hf):
        """torch's state for ``p``: the step count and the rule's buffers."""
        h, flags = hf
        state = self.state[p]
        if self.rule.name not in _NO_STEP and "step" not in state:
            state["step"] = self._steps.new(_scalar_dtype())
        for c, v in carry_init(self.rule, h).items():   # 0-d CPU tensors, as torch's
            if c not in state:
                state[c] = torch.tensor(v, dtype=_scalar_dtype())
        f = self._format_of(p)
        for s in self.rule.active_states(self.rule.array_flags(flags, p.shape)):
            if s.name not in state:
                init = h[s.init] if isinstance(s.init, str) else s.init
                if f.quantized:                  # codes, and a scale per 256 elements
                    codes, absmax = formats.quantize(
                        np.full(s.shape_for(p.shape), init, np.float32))
                    state[s.name] = torch.from_numpy(codes).to(p.device)
                    state[f"{s.name}_absmax"] = torch.from_numpy(absmax).to(p.device)
                elif not f.plain:
                    state[s.name] = torch.full(s.shape_for(p.shape), init,
                                               dtype=_torch_dtype(f.state), device=p.device)
                elif s.shape is None:
                    state[s.name] = torch.full_like(p, init,
                                                    memory_format=torch.preserve_format)
                else:                            # Adafactor's row and column factors
                    state[s.name] = torch.full(s.shape_for(p.shape), init, dtype=p.dtype,
                                               device=p.device)
        if f.master and "master" not in state:   # the float32 copy the rule updates
            state["master"] = p.detach().float().clone()

    def _advance_steps(self, group, states) -> list:
        """Each state's ``step`` advanced by one, as torch advances it; the new counts.

        Counts this optimizer created are 0-d views of one buffer (``_StepBank``), so a
        group's are advanced by one vectorised add; other step tensors (loaded from a
        state_dict, or set by hand) are moved into the buffer first, keeping their value
        and dtype."""
        steps = [st["step"] for st in states]
        ids = list(map(id, steps))
        hit = self._step_index.get(id(group))
        if hit is None or hit[0] != ids:
            for st, t in zip(states, steps):
                if not self._steps.owns(t):
                    st["step"] = self._steps.new(t.dtype, float(t))
            steps = [st["step"] for st in states]
            hit = (list(map(id, steps)), self._steps.index(steps), steps)
            self._step_index[id(group)] = hit
        index = hit[1]
        if index is None:                  # views of several buffers: one add per tensor
            torch._foreach_add_(steps, 1)
            return [int(v) for v in torch.stack(steps).tolist()]
        values, idx = index
        values[idx] += 1
        return values[idx].astype(np.int64).tolist()

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param that has a grad; ``closure`` re-evaluates the loss
        (with grad enabled) and its value is returned, as in torch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inv_scale, skip = None, False
        grad_scale, found_inf = (getattr(self, "grad_scale", None),
                                 getattr(self, "found_inf", None))
        if grad_scale is not None or found_inf is not None:   # set by torch.amp.GradScaler
            inv_scale, skip = check_amp(grad_scale, found_inf, f"{type(self).__name__}"
                                                               f".step(): ")
            if inv_scale == 1.0:
                inv_scale = None
            if inv_scale is not None and not self._grad_factor:
                self._grad_factor = True       # from now on, kernels with a grad factor
                self._checked_groups.clear()   # (a factor of 1 changes no bit)
        work = []
        for gi, group in enumerate(self.param_groups):     # check everything first
            where = f"param_groups[{gi}]: "
            hf = self._flags(group, where)
            items = []
            for j, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if (g.layout is _STRIDED and g.dtype is p.dtype and (
                        p.dtype in _DTYPES or p.dtype in _SIXTEEN)
                        and g.shape == p.shape and g.get_device() == p.get_device()
                        and p.is_contiguous() and g.is_contiguous()):
                    items.append((p, g))        # the common case, checked in one go
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{where}params[{j}] has a sparse grad; "
                                       f"{type(self).__name__} does not support sparse "
                                       f"gradients (torch.optim.SparseAdam does)")
                if p.dtype not in _DTYPES and p.dtype not in _SIXTEEN:
                    raise TypeError(f"{where}params[{j}] is {p.dtype} on {p.device}; "
                                    f"hwoptim.torch updates float32, float64, bfloat16 and "
                                    f"float16 params")
                if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                    raise ValueError(f"{where}params[{j}].grad is {g.dtype} {tuple(g.shape)} "
                                     f"on {g.device}; expected {p.dtype} {tuple(p.shape)} on "
                                     f"{p.device} like the param")
                if not (p.is_contiguous() and g.is_contiguous()):
                    raise ValueError(f"{where}params[{j}] or its grad is not contiguous "
                                     f"(channels_last?); hwoptim's kernels update contiguous "
                                     f"memory: model.to(memory_format=torch.contiguous_format)")
                items.append((p, g))
            work.append((group, hf, items))
        if skip:                              # found_inf: the whole step is skipped
            self.skipped_steps += 1
            self.last_step_skipped = True
            return loss
        clip = None
        if self.max_grad_norm is not None or self.skip_nonfinite:
            clip = self._grad_guard([g for _, _, items in work for _, g in items], inv_scale)
            if clip is None:                  # a non-finite grad: the whole step is skipped
                return loss
        else:
            self.last_step_skipped = False
        factor = (1.0 if clip is None or self.max_grad_norm is None else clip) * \
            (1.0 if inv_scale is None else inv_scale)     # unscaled, then clipped
        for group, (h, flags), items in work:
            if items:
                if self.max_grad_norm is not None or self._grad_factor:
                    h = {**h, "_clip": factor}
                self._step_group(group, (h, flags), items)
        return loss

    def _grad_guard(self, grads, inv_scale=None):
        """``max_grad_norm`` / ``skip_nonfinite`` (as the native classes'): one read of every
        grad on the host backend; the factor grads are multiplied by, or ``None`` where the
        step is skipped. With a loss scale: the unscaled grads' norm."""
        if any(g.device.type != "cpu" for g in grads):
            raise ValueError(f"{type(self).__name__}: max_grad_norm and skip_nonfinite run "
                             f"on CPU tensors only yet (CUDA grads: clip with "
                             f"torch.nn.utils.clip_grad_norm_)")
        backend = _backends.pick("host", self._backend_request)
        sumsq, finite = 0.0, True
        for dtype in {g.dtype for g in grads}:
            views = [_view(g).reshape(-1) for g in grads if g.dtype is dtype]
            sizes = np.array([v.size for v in views], np.int64)
            s, f = backend.grad_stats(views, sizes, _DTYPES.get(dtype) or _SIXTEEN[dtype])
            sumsq, finite = sumsq + s, finite and f
        if inv_scale is not None:
            sumsq *= inv_scale * inv_scale
        return guard_verdict(self, sumsq, finite)

    def _step_group(self, group, hf, items):
        """Update ``items`` ((param, grad) pairs, checked) of one group: state created where
        missing, step counts advanced, then per (device, dtype) one multi-tensor launch
        (backends with ``many``; the arrays' addresses go straight from the tensors) or one
        launch per array. Params whose shape changes the flags (Adafactor's factored
        arrays) are stepped apart, with their own kernels."""
        rule, (h, flags) = self.rule, hf
        if rule.shape_flags is not None:
            kinds = {}
            for item in items:
                f = rule.array_flags(flags, item[0].shape)
                kinds.setdefault(tuple(sorted(vars(f).items())), (f, []))[1].append(item)
            if len(kinds) > 1 or next(iter(kinds.values()))[0] is not flags:
                for f, part in kinds.values():
                    self._step_kind(group, (h, f), part)
                return
        self._step_kind(group, hf, items)

    def _step_kind(self, group, hf, items):
        """:meth:`_step_group` for params of one kind (one plan)."""
        rule = self.rule
        h, flags = hf
        plan = _plan(rule, flags)
        names = plan.arrays[2:]
        need = self._need.get(id(plan))     # plans are cached: one object per flags
        if need is None:                     # the keys of a complete state
            need = self._need[id(plan)] = frozenset(names) | (
                frozenset() if rule.name in _NO_STEP else {"step"}) | {
                c.name for c in rule.carry}
        state = self.state
        states = [state[p] for p, _ in items]
        fresh = [not need <= st.keys() for st in states]
        if any(fresh):
            for (p, _), new in zip(items, fresh):
                if new:
                    self._init_state(p, group, hf)
        if rule.name in _NO_STEP:            # SGD: the first step is the one creating state
            ts = [1 if new else 2 for new in fresh]
        else:
            ts = self._advance_steps(group, states)
        if rule.carry:                       # per param: (step, carried scalars)
            ts = [(t, *(float(st[c.name]) for c in rule.carry)) for st, t in zip(states, ts)]
        by_kernel = {}
        for (p, g), st, t in zip(items, states, ts):
            key = _DTYPES[p.dtype] if (p.dtype in _DTYPES and not self._storage["state_dtype"]
                                       ) else self._format_of(p).key
            by_kernel.setdefault((p.device, key), []).append((p, g, t, st))
        for (dev, dtype), work in by_kernel.items():
            fam = "host" if dev.type == "cpu" else "cuda"
            k = _kernel(_backends.pick(fam, self._backend_request), plan, dtype)
            stream = None
            if fam == "cuda":
                import cupy
                stream = cupy.cuda.ExternalStream(
                    torch.cuda.current_stream(dev).cuda_stream, dev.index)
            with (stream if stream is not None else _nullcontext()):
                self._launch(k, h, names, work, dtype, plan.stages is not None)
        if rule.carry:                       # each param's carried scalars, after its step
            after = {}
            for st, key in zip(states, ts):
                if key not in after:
                    new = host_scalars(rule, self._with_carry(h, key), key[0])
                    after[key] = [new[c.name] for c in rule.carry]
                for c, v in zip(rule.carry, after[key]):
                    st[c.name].fill_(v)

    def _with_carry(self, h, key):
        """``h`` and the carried scalars of a launch key (step, carried values...)."""
        if not self.rule.carry:
            return h
        return {**h, **{c.name: v for c, v in zip(self.rule.carry, key[1:])}}

    def _launch(self, k, h, names, work, dtype, staged=False):
        """One launch per kernel (``many``) or per array, with the scalars of each param's
        launch key: its step count, and for rules that carry scalars, their values."""
        distinct = sorted({w[2] for w in work})
        step_of = (lambda key: key[0]) if self.rule.carry else (lambda key: key)
        fmt = formats.Format.parse(dtype)
        names = fmt.arrays(("param", "grad") + tuple(names))[2:]
        keys = None
        if fmt.sr:                          # each param's key for its step
            keys = formats.sr_key(self._storage["seed"],
                                  [step_of(t) for p, g, t, st in work],
                                  [self._sr_index(p) for p, g, t, st in work])
        dtype = fmt.compute

        if keys is not None and work[0][0].device.type == "cuda" and not hasattr(k, "many"):
            # (staged kernels, one param at a time: the keys on the device, on torch's stream)
            keys = _view(torch.from_numpy(keys.view(np.int32)).to(work[0][0].device))

        def buf(j, st, n):
            return keys[j:j + 1] if n == "_srkey" else st[n]
        if hasattr(k, "many"):
            row_of = {t: r for r, t in enumerate(distinct)}
            if keys is not None:            # the keys where the kernel reads them: a CUDA
                dev = work[0][0].device     # copy on torch's stream, ordered before it
                keys_t = torch.from_numpy(keys.view(np.int32)).to(dev)
                at = keys_t.data_ptr()
            ptrs = np.array([[p.data_ptr(), g.data_ptr(),
                              *[(at + 4 * j if n == "_srkey" else st[n].data_ptr())
                                for n in names]]
                             for j, (p, g, _, st) in enumerate(work)], np.int64)
            sizes = np.array([p.numel() for p, *_ in work], np.int64)
            rows = (np.zeros(len(work), np.int64) if len(distinct) == 1 else
                    np.array([row_of[w[2]] for w in work], np.int64))
            scalars = np.array([k.prepare(self._with_carry(h, t), step_of(t))
                                for t in distinct], dtype=dtype)
            k.many(ptrs, sizes, rows, scalars)
            return
        for t in distinct:
            scal = k.prepare(self._with_carry(h, t), step_of(t))
            flat = (lambda a: a) if staged else (lambda a: a.reshape(-1))
            items = [[flat(_view(p)), _view(g).reshape(-1)] + [
                         buf(j, st, n) if n == "_srkey" else flat(_view(st[n])) for n in names]
                     for j, (p, g, tt, st) in enumerate(work) if tt == t]
            if hasattr(k, "run_list"):        # staged (Adafactor's matrices): together
                k.run_list(items, scal)
                continue
            for arrays in items:
                k(arrays, scal)


def _torch_dtype(name: str):
    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


class _StepBank:
    """Where this optimizer's ``state["step"]`` tensors live: 0-d views of CPU buffers of
    ``SIZE`` counts per dtype, so that one add advances a whole group's counts (one
    ``torch._foreach_add_`` over separate CPU scalars costs microseconds per tensor). Each
    view is its own count, a float tensor as torch keeps it; state_dict saves them as such."""

    SIZE = 4096

    def __init__(self):
        self._cur = {}                     # dtype -> (buffer, its NumPy view, counts used)
        self._bufs = {}                    # id(buffer) -> (buffer, its NumPy view)

    def new(self, dtype, value=0.0):
        buf, arr, used = self._cur.get(dtype, (None, None, self.SIZE))
        if used == self.SIZE:
            buf = torch.zeros(self.SIZE, dtype=dtype)
            arr, used = buf.numpy(), 0
            self._bufs[id(buf)] = (buf, arr)
        self._cur[dtype] = (buf, arr, used + 1)
        arr[used] = value
        return buf[used]

    def __deepcopy__(self, memo):
        return _StepBank()       # a copied optimizer moves its (copied) counts into its own

    def __reduce__(self):
        return _StepBank, ()

    def owns(self, t) -> bool:
        base = t._base
        return base is not None and id(base) in self._bufs and t.dim() == 0

    def index(self, steps):
        """(NumPy view of the one buffer holding every count, their indices), or ``None``
        when they span several buffers."""
        if not steps:
            return None
        bases = {id(t._base) for t in steps}
        if len(bases) != 1:
            return None
        arr = self._bufs[bases.pop()][1]
        return arr, np.array([t.storage_offset() for t in steps], np.int64)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _make(rule):
    twin = getattr(torch.optim, rule.torch, None) if rule.torch else None
    params = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if twin is not None:
        tsig = inspect.signature(twin)
        for n, p in tsig.parameters.items():
            if n == "params" or n in _TORCH_ONLY or n in rule.hypers or n in rule.options:
                if n != "params":
                    params.append(p.replace(annotation=inspect.Parameter.empty,
                                            default=_torch_default(rule, n, p.default)))
        have = {p.name for p in params}
        extra = [n for n in list(rule.hypers) + list(rule.options) if n not in have]
    else:
        extra = list(rule.hypers) + list(rule.options)
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY,
                                     default=_torch_default(rule, n, None))
                   for n in ("foreach", "fused")]
    kind = inspect.Parameter.KEYWORD_ONLY
    for n in extra:           # hwoptim's own options (RMSprop's eps_in_sqrt)
        params.append(inspect.Parameter(n, kind, default=_torch_default(rule, n, None)))
    positional = [p.name for p in params[1:]
                  if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    sig = inspect.Signature(params + [inspect.Parameter("backend", kind, default=None),
                                      inspect.Parameter("max_grad_norm", kind, default=None),
                                      inspect.Parameter("skip_nonfinite", kind,
                                                        default=False)])
    doc = (f"{rule.doc.strip()}\n\nA drop-in for torch.optim.{rule.torch or rule.name} "
           f"(hwoptim.torch): torch's signature and state, hwoptim's kernels.\n\n"
           f"Update: {rule.formula}\n")
    cls = type(rule.name, (Optimizer,), {
        "rule": rule, "__doc__": doc, "__module__": __name__,
        "_parameters": {p.name: p for p in params}, "_positional": positional,
        "_keys": tuple(list(rule.hypers) + list(rule.options))})
    cls.__signature__ = sig
    return cls


def _torch_default(rule, name, torch_default):
    if name in rule.hypers:
        return rule.hypers[name].default
    if name in rule.options:
        return rule.options[name]
    return torch_default


for _rule in RULES.values():
    globals()[_rule.name] = _make(_rule)
    __all__.append(_rule.name)
del _rule
