"""The public optimizers: torch.optim's names, hyperparameters and defaults, one class per rule
spec, all sharing :class:`Optimizer`.

``step(grads)`` validates everything first (arrays, devices, overlap, learning rate), and
only then advances the step count and launches one kernel per parameter array, so a
rejected call leaves parameters and state exactly as they were.
"""
from __future__ import annotations

import inspect
import numbers
from types import SimpleNamespace

import numpy as np

from . import backends as _backends
from . import codegen
from .spec import Rule

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_KIND = {"host": "NumPy", "cuda": "CuPy"}
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


class ParamGroup(dict):
    """One parameter group: its arrays under ``"params"`` and its hyperparameters.

    Setting a hyperparameter validates it at once; a rejected value changes nothing.
    """

    def __init__(self, opt, data):
        super().__init__(data)
        self._opt = opt

    def __setitem__(self, key, value):
        self._opt._set_hyper(self, key, value)

    def __reduce__(self):
        return (dict, (dict(self),))


class Optimizer:
    """Base class of the generated optimizers; see the rule specs for the math."""

    rule: Rule = None

    def __init__(self, params, *args, backend: str | None = None, capturable: bool = False,
                 **kwargs):
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
                                f"one of {', '.join(names)}, backend, capturable")
            kwargs[name] = self._check_value(name, value, f"{rule.name}(): ")
        defaults.update(kwargs)

        groups = self._normalize_params(params)
        arrays = [a for g in groups for a in g["params"]]
        fam = self._check_params(arrays)
        self.backend = _backends.pick(fam, backend)
        self.backend_name = next(n for n in _backends.names()
                                 if _backends._loaded.get(n) is self.backend)
        self.dtype = str(arrays[0].dtype)
        self._family = fam
        if not isinstance(capturable, (bool, np.bool_)):
            raise TypeError(f"capturable={capturable!r}: expected True or False")
        if capturable and self.backend_name != "cupy":
            raise ValueError(f"capturable=True needs backend='cupy' (device-side scalars for "
                             f"CUDA graphs); this optimizer uses {self.backend_name!r}")
        self.capturable = bool(capturable)

        # hyperparameters per group, checked before anything is allocated
        self.param_groups, self._flags = [], []
        for gi, g in enumerate(groups):
            merged = dict(defaults)
            for k, v in g.items():
                if k == "params":
                    continue
                if k not in defaults:
                    raise TypeError(f"param_groups[{gi}] has an unknown key {k!r}; expected "
                                    f"'params' and any of {', '.join(names)}")
                merged[k] = self._check_value(k, v, f"param_groups[{gi}]: ")
            flags = self._check_group(merged, f"param_groups[{gi}]: ")
            if self.capturable and callable(merged["lr"]):
                raise ValueError(f"param_groups[{gi}]: lr is a callable, which a captured CUDA "
                                 f"graph cannot call; with capturable=True set a number, and "
                                 f"change it on the device (device_hypers)")
            self._flags.append(flags)
            self.param_groups.append(ParamGroup(self, {"params": list(g["params"]), **merged}))

        # state, flat views, and the byte ranges that grads must not overlap
        self.state, self._views, self._group_of = [], [], []
        owned = []
        for gi, g in enumerate(self.param_groups):
            plan = _plan(rule, self._flags[gi])
            for p in g["params"]:
                i = len(self.state)
                st = {}
                for s in rule.active_states(self._flags[gi]):
                    init = g[s.init] if isinstance(s.init, str) else s.init
                    st[s.name] = self.backend.full(p, init)
                    owned.append((self.backend.address(st[s.name]), f"state[{i}][{s.name!r}]"))
                owned.append((self.backend.address(p), f"params[{i}]"))
                self.state.append(st)
                self._views.append([p.reshape(-1)] + [st[n].reshape(-1) for n in plan.arrays[2:]])
                self._group_of.append(gi)
        self._owned = owned
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._array_type = np.ndarray if fam == "host" else type(self._params[0])
        self._checked_spans = None
        self._checked_grads = ()
        self._kern = None
        self._step = 0
        if self.capturable:
            self._init_device_scalars()

    # ------------------------------------------------------------------ validation helpers
    def _check_value(self, name, value, where):
        """``value`` as stored (Python bools and floats, so per-step host arithmetic stays
        float64 whatever NumPy scalars came in), or an error naming what was expected."""
        rule = self.rule
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
            return tuple(float(b) for b in value)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"{where}{name}={value!r}: expected a real number")
        bad = hy.check(float(value))
        if bad or value != value:
            raise ValueError(f"{where}{name}={value!r} is invalid: expected {bad or 'a number'}")
        return float(value)

    def _check_group(self, merged: dict, where: str):
        rule = self.rule
        h = {n: (0.0 if (n == "lr" and callable(merged[n])) else merged[n])
             for n in rule.hypers}
        opt = {n: merged[n] for n in rule.options}
        if rule.check is not None:
            for arg, value, expected in rule.check(SimpleNamespace(**h), SimpleNamespace(**opt)):
                raise ValueError(f"{where}{arg}={value!r} is invalid: expected {expected}")
        return rule.static_flags(h, opt)

    def _set_hyper(self, group: ParamGroup, key, value):
        gi = self.param_groups.index(group)
        where = f"param_groups[{gi}]: "
        if key == "params":
            raise ValueError(f"{where}'params' cannot be replaced; make a new optimizer")
        if key not in self.rule.hypers and key not in self.rule.options:
            raise ValueError(f"{where}{key!r} is not a hyperparameter of {self.rule.name}; "
                             f"expected one of {', '.join([*self.rule.hypers, *self.rule.options])}")
        value = self._check_value(key, value, where)
        if self.capturable and key == "lr" and callable(value):
            raise ValueError(f"{where}lr is a callable, which a captured CUDA graph cannot call")
        merged = {**group, key: value}
        flags = self._check_group(merged, where)
        if vars(flags) != vars(self._flags[gi]):
            raise ValueError(f"{where}{key}={value!r} would change which kernel and state "
                             f"buffers this group needs ({key} was {group[key]!r}); make a "
                             f"new optimizer with it instead")
        dict.__setitem__(group, key, value)
        if self.capturable:
            self._hyper_dev[gi].set(self._hyper_vector(group))

    @staticmethod
    def _normalize_params(params) -> list:
        if _backends.family(params) is not None:
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
            for gi, g in enumerate(params):
                if "params" not in g:
                    raise ValueError(f"param_groups[{gi}] has no 'params' key")
                ps = g["params"]
                ps = [ps] if _backends.family(ps) is not None else list(ps)
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
            if a.dtype not in _DTYPES:
                raise TypeError(f"params[{i}] has dtype {a.dtype}; expected float32 or float64 "
                                f"(gradient steps need floating-point parameters)")
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

        The common case (right type, dtype, shape, contiguity, same memory as last step)
        costs about a microsecond per array; anything else takes the slow path that
        names the problem."""
        params = self._params
        n = len(params)
        if type(grads) is not list and type(grads) is not tuple:
            if _backends.family(grads) is not None:
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
        last = self._checked_grads
        if len(last) == n and all(g is h for g, h in zip(grads, last)):
            # the same arrays as last step (held, so their memory is too): only what an
            # array object can change in place, its shape and flags, needs a look again
            for g, p in zip(grads, params):
                if g.shape != p.shape or not g.flags.c_contiguous:
                    break
            else:
                return [g.reshape(-1) for g in grads]
        atype, cuda = self._array_type, self._family == "cuda"
        for i, g in enumerate(grads):
            p = params[i]
            if ((type(g) is not atype and not isinstance(g, atype)) or g.dtype != p.dtype
                    or g.shape != p.shape or not g.flags.c_contiguous
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
        self._checked_grads = tuple(grads)
        return [g.reshape(-1) for g in grads]

    def _explain_bad_grad(self, i, g, p):
        fam = _backends.family(g)
        if fam is None:
            raise TypeError(f"grads[{i}] is {_describe(g)}; expected a "
                            f"{_KIND[self._family]} array like params[{i}]")
        if fam != self._family or _device(g, fam) != _device(p, self._family):
            raise TypeError(f"grads[{i}] is on {_device(g, fam)} but params[{i}] is on "
                            f"{_device(p, self._family)}; expected both on one device "
                            f"(move the grad: hwoptim never copies silently)")
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
                or not value >= 0):
            raise ValueError(f"param_groups[{gi}]: lr({t}) returned {value!r}; "
                             f"expected a number >= 0")
        return float(value)

    def _kernels(self) -> list:
        """Each group's kernel, built (or loaded from the disk cache) on first use."""
        if self._kern is None:
            self._kern = [_kernel(self.backend, _plan(self.rule, f), self.dtype)
                          for f in self._flags]
            # backends may offer a launch that skips re-checking what step() has checked
            self._launch = [getattr(k, "unchecked", k) for k in self._kern]
            self._prepare = [getattr(k, "prepare_unchecked", k.prepare) for k in self._kern]
        return self._kern

    # ------------------------------------------------------------------ stepping
    def step(self, grads) -> None:
        """Apply one update to every param in place, with ``grads`` matching params."""
        flat = self._check_grads(grads)
        kernels = self._kernels()
        t = self._step + 1
        if self.capturable:
            self._check_aligned(flat)        # the device kernels need it: check before any
            self._step = t                   # launch, so a rejected step changes nothing
            return self._step_device(kernels, flat)
        scal = []
        for gi, g in enumerate(self.param_groups):
            lr = g["lr"]
            h = {**g, "lr": self._call_lr(gi, lr, t)} if callable(lr) else g
            scal.append(self._prepare[gi](h, t))
        self._step = t                       # everything is checked: from here on, update
        launch = self._launch
        for views, gi, gr in zip(self._views, self._group_of, flat):
            launch[gi]([views[0], gr, *views[1:]], scal[gi])

    # ------------------------------------------------------------------ capturable (CuPy)
    def _hyper_vector(self, group):
        vals = []
        for n, hy in self.rule.hypers.items():
            v = group[n]
            vals += list(v) if isinstance(hy.default, tuple) else [v]
        return np.asarray(vals, dtype=np.float64)

    def _init_device_scalars(self):
        import cupy
        with self.param_groups[0]["params"][0].device:
            self._hyper_dev = [cupy.asarray(self._hyper_vector(g)) for g in self.param_groups]
            self._step_dev = [cupy.zeros(1, dtype=np.float64) for _ in self.param_groups]
            self._k_dev = [cupy.zeros(len(_plan(self.rule, f).scalars), dtype=self.dtype)
                           for f in self._flags]

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

    def _step_device(self, kernels, flat):
        for gi in range(len(self.param_groups)):
            kernels[gi].advance(self._hyper_dev[gi], self._step_dev[gi], self._k_dev[gi])
        for i, views in enumerate(self._views):
            gi = self._group_of[i]
            kernels[gi].device([views[0], flat[i], *views[1:]], self._k_dev[gi])

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
            "shapes": [tuple(p.shape) for g in self.param_groups for p in g["params"]],
            "param_groups": groups,
            "state": [{k: self.backend.to_host(v) for k, v in st.items()} for st in self.state],
        }

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
        if sd["dtype"] != self.dtype:
            raise TypeError(f"state_dict['dtype'] is {sd['dtype']!r}; expected {self.dtype!r} "
                            f"(the params' dtype)")
        if sd["rule"] != self.rule.name:
            raise ValueError(f"state_dict['rule'] is {sd['rule']!r}; expected "
                             f"{self.rule.name!r} (a state_dict loads into the same rule)")
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
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"state_dict['step'] is {step!r}; expected an integer >= 0")
        new_groups = []
        for gi, (mine, theirs) in enumerate(zip(self.param_groups, sd["param_groups"])):
            merged = dict(mine)
            for k, v in theirs.items():
                if k == "params":
                    continue
                if k not in self.rule.hypers and k not in self.rule.options:
                    raise ValueError(f"state_dict['param_groups'][{gi}] has unknown key {k!r}")
                v = self._check_value(k, v, f"state_dict['param_groups'][{gi}]: ")
                if not (k == "lr" and callable(mine["lr"])):
                    merged[k] = v
            flags = self._check_group(merged, f"state_dict['param_groups'][{gi}]: ")
            if vars(flags) != vars(self._flags[gi]):
                raise ValueError(f"state_dict['param_groups'][{gi}] needs kernel options "
                                 f"{vars(flags)}; this optimizer's group has "
                                 f"{vars(self._flags[gi])}: make it with the same options")
            new_groups.append(merged)
        if len(sd["state"]) != len(self.state):
            raise ValueError(f"state_dict['state'] has {len(sd['state'])} entries; expected "
                             f"{len(self.state)}")
        for i, (mine, theirs) in enumerate(zip(self.state, sd["state"])):
            if set(theirs) != set(mine):
                raise ValueError(f"state_dict['state'][{i}] holds {sorted(theirs)}; expected "
                                 f"{sorted(mine)}")
            for k, v in theirs.items():
                v = np.asarray(v)
                if v.shape != tuple(mine[k].shape) or v.dtype != mine[k].dtype:
                    raise ValueError(f"state_dict['state'][{i}][{k!r}] is {v.dtype} "
                                     f"{v.shape}; expected {mine[k].dtype} "
                                     f"{tuple(mine[k].shape)}")
        # all checked: now change things
        for mine, theirs in zip(self.state, sd["state"]):
            for k, v in theirs.items():
                self.backend.copy_from_host(mine[k], np.asarray(v))
        for g, merged in zip(self.param_groups, new_groups):
            for k, v in merged.items():
                if k != "params":
                    dict.__setitem__(g, k, v)
        self._step = int(step)
        if self.capturable:
            for gi, g in enumerate(self.param_groups):
                self._hyper_dev[gi].set(self._hyper_vector(g))
                self._step_dev[gi].fill(float(step))

    def __repr__(self):
        n = sum(len(g["params"]) for g in self.param_groups)
        return (f"{self.rule.name}({n} arrays, {self.dtype}, backend={self.backend_name!r}, "
                f"step={self._step})")


def make_optimizer_class(rule: Rule) -> type:
    """The public class for ``rule``: torch.optim's name, signature and defaults."""
    params = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=h.default)
               for n, h in rule.hypers.items()]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v)
               for n, v in rule.options.items()]
    params += [inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None),
               inspect.Parameter("capturable", inspect.Parameter.KEYWORD_ONLY, default=False)]
    hyper_doc = "\n".join(f"    {n}: {h.doc} (default {h.default!r})"
                          for n, h in rule.hypers.items())
    doc = (f"{rule.doc.strip()}\n\nUpdate: {rule.formula}\n\nArgs:\n    params: an array, a "
           f"list of arrays, or a list of parameter groups.\n{hyper_doc}\n"
           + "".join(f"    {n}: option (default {v})\n" for n, v in rule.options.items())
           + "    backend: None (fastest available), or a name from "
             "hwoptim.backends.available().\n"
           + "    capturable: keep per-step scalars on the device (CuPy), for CUDA graphs.\n")
    cls = type(rule.name, (Optimizer,), {"rule": rule, "__doc__": doc, "__module__": "hwoptim"})
    cls.__signature__ = inspect.Signature(params)
    return cls
