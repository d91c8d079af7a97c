"""Optimizer state sharded across processes over MPI (ZeRO stage 1).

``ShardedOptimizer(hwoptim.Adam, params, comm)`` wraps any native hwoptim rule class. Every
rank holds the full params; each group's params, flattened in order, are cut into R equal
slices (rounded up to 64 bytes, the last one shorter), and rank r owns slice r: the wrapped
optimizer is made over views of the pieces of the params in that slice, so its state exists
for that slice only (1/R of the state per rank). A step

1. checks every rank's grads (shape, dtype, contiguity) and agrees on the outcome, so a bad
   grad on one rank raises the same error on every rank before any collective moves data;
2. sums the grads across ranks with one reduce-scatter (``Reduce_scatter_block``: each rank
   receives the sum of its own slice) and divides the sum by R, as torch's DDP averages;
3. runs the wrapped rule's kernels on the owned slice;
4. all-gathers the updated slices into every rank's params (``Allgather``), so params are the
   same bytes on every rank after each step.

The sliced layout never needs a param to fit one rank: a slice may start or end inside a
param. A rank that owns no element of a group (a group smaller than R slices) steps a
one-element stand-in for it, so every rank's wrapped optimizer has the same groups and
validates the same hyperparameters the same way. The core does not import this module;
it needs ``mpi4py`` (``pip install "hwoptim[distributed]"``, which brings MPICH's ``mpiexec``).
"""
from __future__ import annotations

import os
import pathlib
import pickle
import shutil
import time

import numpy as np

ALIGN_BYTES = 64


def _world():
    from mpi4py import MPI
    return MPI.COMM_WORLD


def _sum_op():
    from mpi4py import MPI
    return MPI.SUM


class ShardedOptimizer:
    """ZeRO stage 1 over MPI for a native hwoptim rule class: see the module docstring."""

    def __init__(self, opt_class, params, comm=None, **hyperparameters):
        self.comm = comm = _world() if comm is None else comm
        self.world, self.rank = comm.Get_size(), comm.Get_rank()
        for k in ("max_grad_norm", "skip_nonfinite", "capturable"):
            if hyperparameters.get(k):   # the same on every rank: every rank raises
                raise ValueError(f"ShardedOptimizer: {k} is not supported yet (a rank sees "
                                 f"only its slice of the grads)")
        groups = self._agree("ShardedOptimizer()", lambda: _groups(params))
        self.groups = groups
        self.dtype = np.dtype(groups[0]["params"][0].dtype)
        layout = [(str(self.dtype), [tuple(p.shape) for p in g["params"]]) for g in groups]
        theirs = comm.allgather(layout)
        for rk, lay in enumerate(theirs):
            if lay != layout:
                raise ValueError(f"rank {rk} has params {lay}; rank {self.rank} has {layout}: "
                                 f"expected the same dtype, groups and shapes on every rank")
        self._plan_slices()
        inner_groups = []
        for g, sl in zip(groups, self._slices):
            views = [g["params"][i].reshape(-1)[a:b] for i, a, b in sl["pieces"]]
            if not views:                     # a one-element stand-in (see the docstring)
                sl["standin"] = np.zeros(1, self.dtype)
                views = [sl["standin"]]
            inner_groups.append({**{k: v for k, v in g.items() if k != "params"},
                                 "params": views})
        self.inner = self._agree(f"{opt_class.__name__}()",
                                 lambda: _no_norms(opt_class(inner_groups, **hyperparameters)))
        self._send = np.empty(self.world * self._seg, self.dtype)
        self._recv = np.empty(self._seg, self.dtype)
        self.last_timings = {}     # seconds per phase of the last step (bench/sharded.py)

    # ------------------------------------------------------------------ layout
    def _plan_slices(self):
        """Per group: element offsets of its params in the flattened group, the slice size
        (``chunk``, the same on every rank), this rank's slice ``[lo, hi)`` and its pieces
        ``(param index, start, stop)``; ``_seg``: one rank's share of all groups."""
        align = max(1, ALIGN_BYTES // self.dtype.itemsize)
        self._slices, seg = [], 0
        for g in self.groups:
            sizes = [p.size for p in g["params"]]
            offs = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            n = int(offs[-1])
            chunk = max(align, _ceil_div(_ceil_div(n, self.world), align) * align)
            lo, hi = min(self.rank * chunk, n), min((self.rank + 1) * chunk, n)
            pieces = [(i, int(max(lo, o) - o), int(min(hi, o + s) - o))
                      for i, (o, s) in enumerate(zip(offs[:-1], sizes))
                      if s and o < hi and o + s > lo]
            self._slices.append(dict(offs=offs, n=n, chunk=chunk, lo=lo, hi=hi,
                                     pieces=pieces, at=seg, standin=None))
            seg += chunk
        self._seg = seg

    # ------------------------------------------------------------------ agreement
    def _agree(self, what, make):
        """``make()`` on every rank; if it raises on any rank, every rank raises (the first
        failing rank's error), so no rank goes on to a collective the others never reach."""
        try:
            out, err = make(), None
        except Exception as e:                 # noqa: BLE001 - every rank must hear of it
            out, err = None, (type(e).__name__, str(e))
        errs = self.comm.allgather(err)
        for rk, e in enumerate(errs):
            if e is not None:
                kind = {"TypeError": TypeError, "KeyError": KeyError, "OSError": OSError,
                        "FileNotFoundError": FileNotFoundError}.get(e[0], ValueError)
                raise kind(f"{what} failed on rank {rk}: {e[0]}: {e[1]}")
        return out

    # ------------------------------------------------------------------ stepping
    @property
    def param_groups(self):
        """The wrapped optimizer's groups (the same on every rank): set a group's values
        here, on every rank, as with the wrapped class."""
        return self.inner.param_groups

    @property
    def step_count(self) -> int:
        return self.inner.step_count

    def step(self, grads) -> None:
        """One step with this rank's local ``grads`` (matching params): averaged across
        ranks, the owned slice updated, the params all-gathered."""
        t0 = time.perf_counter()
        flat = self._agree("step()", lambda: self._check(grads))
        send, seg = self._send, self._seg
        for gs, sl in zip(flat, self._slices):
            for rk in range(self.world):      # rank rk's share of this group, zero-padded
                lo, hi = min(rk * sl["chunk"], sl["n"]), min((rk + 1) * sl["chunk"], sl["n"])
                dst = send[rk * seg + sl["at"]:rk * seg + sl["at"] + sl["chunk"]]
                _copy_range(gs, sl["offs"], lo, hi, dst, True)
        t1 = time.perf_counter()
        self.comm.Reduce_scatter_block(send, self._recv, op=_sum_op())
        np.divide(self._recv, self.world, out=self._recv)       # the sum / R, as DDP
        t2 = time.perf_counter()
        pieces = []
        for sl in self._slices:
            if sl["standin"] is not None:
                pieces.append(np.zeros(1, self.dtype))
                continue
            for i, a, b in sl["pieces"]:
                start = sl["at"] + int(sl["offs"][i]) + a - sl["lo"]
                pieces.append(self._recv[start:start + b - a])
        self.inner.step(pieces)
        t3 = time.perf_counter()
        self._all_gather()
        t4 = time.perf_counter()
        self.last_timings = {"check and pack": t1 - t0, "reduce-scatter": t2 - t1,
                             "update": t3 - t2, "all-gather": t4 - t3}

    def _check(self, grads):
        """This rank's grads as flat views per group, or an error naming the bad one."""
        params = [p for g in self.groups for p in g["params"]]
        if isinstance(grads, np.ndarray):
            grads = [grads]
        grads = list(grads)
        if len(grads) != len(params):
            raise ValueError(f"step() got {len(grads)} grads; expected {len(params)}, one "
                             f"per param")
        for i, (gr, p) in enumerate(zip(grads, params)):
            if not isinstance(gr, np.ndarray) or gr.dtype != p.dtype or gr.shape != p.shape \
                    or not gr.flags.c_contiguous:
                what = (f"{gr.dtype} {gr.shape}" if isinstance(gr, np.ndarray)
                        else type(gr).__name__)
                raise ValueError(f"grads[{i}] is {what}; expected a C-contiguous {p.dtype} "
                                 f"array of shape {p.shape} like params[{i}]")
        out, k = [], 0
        for g in self.groups:
            out.append([gr.reshape(-1) for gr in grads[k:k + len(g["params"])]])
            k += len(g["params"])
        return out

    def _all_gather(self):
        mine = self._recv                      # reused: the grads are consumed
        for g, sl in zip(self.groups, self._slices):
            dst = mine[sl["at"]:sl["at"] + sl["chunk"]]
            _copy_range([p.reshape(-1) for p in g["params"]], sl["offs"], sl["lo"],
                        sl["hi"], dst, True)
        full = self._send
        self.comm.Allgather(mine, full)
        for g, sl in zip(self.groups, self._slices):
            for rk in range(self.world):
                lo, hi = min(rk * sl["chunk"], sl["n"]), min((rk + 1) * sl["chunk"], sl["n"])
                if rk == self.rank or hi <= lo:
                    continue
                src = full[rk * self._seg + sl["at"]:rk * self._seg + sl["at"] + hi - lo]
                _copy_range([p.reshape(-1) for p in g["params"]], sl["offs"], lo, hi, src,
                            False)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """This rank's shard: the wrapped optimizer's state_dict for the owned slice, and
        which slice of which group it covers (stand-ins marked)."""
        return {"world": self.world, "rank": self.rank,
                "slices": [dict(lo=sl["lo"], hi=sl["hi"], pieces=list(sl["pieces"]),
                                standin=sl["standin"] is not None) for sl in self._slices],
                "inner": self.inner.state_dict()}

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (stand-ins included)."""
        return sum(a.nbytes for st in self.inner.state for a in st.values())

    def consolidated_state_dict(self, root: int = 0):
        """The full state in the wrapped class's own ``state_dict`` format, on ``root``
        (``None`` elsewhere): ``opt_class(params).load_state_dict(it)`` resumes the same run
        in one process, and :meth:`load_state_dict` on any number of ranks."""
        shard = self.state_dict()
        shards = self.comm.gather(shard, root=root)
        if self.rank != root:
            return None
        inner0 = shards[0]["inner"]
        params = [p for g in self.groups for p in g["params"]]
        state = [dict() for _ in params]
        first = [sum(len(g["params"]) for g in self.groups[:gi])
                 for gi in range(len(self.groups))]
        carry = [None] * len(self.groups)
        for sh in shards:
            k = 0
            for gi, sl in enumerate(sh["slices"]):
                c = sh["inner"].get("carry")
                if sl["standin"]:
                    k += 1
                    continue
                if c is not None and carry[gi] is None:
                    carry[gi] = c[gi]
                for i, a, b in sl["pieces"]:
                    j = first[gi] + i
                    for name, buf in sh["inner"]["state"][k].items():
                        full = state[j].setdefault(name, np.empty(params[j].size, buf.dtype))
                        full[a:b] = buf
                    k += 1
        state = [{n: v.reshape(params[j].shape) for n, v in st.items()}
                 for j, st in enumerate(state)]
        groups, start = [], 0
        for gi, g in enumerate(self.groups):
            d = {k: v for k, v in inner0["param_groups"][gi].items() if k != "params"}
            d["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(d)
        out = {"rule": inner0["rule"], "step": inner0["step"], "dtype": inner0["dtype"],
               "shapes": [tuple(p.shape) for p in params], "param_groups": groups,
               "state": state}
        if "carry" in inner0:
            out["carry"] = carry
        return out

    def load_state_dict(self, full: dict, root: int = 0) -> None:
        """Resume from a :meth:`consolidated_state_dict` (given on ``root``, or on every
        rank): each rank takes its own slice, whatever the number of ranks that saved it."""
        full = self.comm.bcast(full if self.rank == root else None, root=root)
        params = [p for g in self.groups for p in g["params"]]
        first = np.cumsum([0] + [len(g["params"]) for g in self.groups])

        def fetch(gi, i, a, b):
            return {n: np.asarray(v).reshape(-1)[a:b]
                    for n, v in full["state"][first[gi] + i].items()}
        meta = {k: full.get(k) for k in ("step", "shapes", "param_groups", "carry")}
        self._agree("load_state_dict()", lambda: self._load(meta, fetch, params))

    def _load(self, meta, fetch, params):
        """The wrapped optimizer's state from ``fetch(group, param, start, stop)`` (each
        state buffer's values of that param's elements ``[start, stop)``) and ``meta``."""
        if [tuple(s) for s in meta["shapes"]] != [tuple(p.shape) for p in params]:
            raise ValueError(f"the saved state is for params of shapes {meta['shapes']}; "
                             f"expected {[tuple(p.shape) for p in params]}")
        inner = self.inner.state_dict()
        state, k = [], 0
        for gi, sl in enumerate(self._slices):
            if sl["standin"] is not None:
                state.append(inner["state"][k])
                k += 1
                continue
            for i, a, b in sl["pieces"]:
                state.append({n: np.ascontiguousarray(v) for n, v in fetch(gi, i, a, b).items()})
                k += 1
        shard = {**inner, "step": meta["step"], "state": state,
                 "param_groups": [{**g, "params": ig["params"]} for g, ig in
                                  zip(meta["param_groups"], inner["param_groups"])]}
        if meta.get("carry") is not None:
            shard["carry"] = meta["carry"]
        self.inner.load_state_dict(shard)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path) -> None:
        """Write this run's state under the folder ``path``: one file per rank (its slice of
        every group's state) in a new version folder, then, once every rank has written, an
        index (``index.pkl``) naming that version, put in place by an atomic rename; older
        versions are removed after. A crash before the rename leaves the previous checkpoint
        whole and loadable."""
        path = pathlib.Path(path)
        inner = self.inner.state_dict()
        version = self.comm.bcast(f"v{inner['step']}-{os.urandom(4).hex()}"
                                  if self.rank == 0 else None, root=0)
        flat, k = [], 0
        for sl in self._slices:
            bufs = {}
            if sl["standin"] is not None:
                k += 1
            for _ in sl["pieces"]:
                for n, v in inner["state"][k].items():
                    bufs.setdefault(n, []).append(np.asarray(v).reshape(-1))
                k += 1
            flat.append({n: np.concatenate(v) for n, v in bufs.items()})
        shard = {"slices": [(sl["lo"], sl["hi"]) for sl in self._slices], "state": flat}

        def write():
            (path / version).mkdir(parents=True, exist_ok=True)
            _write_atomic(path / version / f"rank-{self.rank}.pkl", shard)
        self._agree("save()", write)          # every rank's file is there (or all raise)
        if self.rank == 0:
            meta = {k: inner.get(k) for k in ("rule", "step", "dtype", "param_groups",
                                                 "carry")}
            meta["param_groups"] = [{k: v for k, v in g.items() if k != "params"}
                                    for g in meta["param_groups"]]
            meta["shapes"] = [tuple(p.shape) for g in self.groups for p in g["params"]]
            meta["group_sizes"] = [len(g["params"]) for g in self.groups]
            index = {"format": 1, "version": version, "world": self.world,
                     "slices": self.comm.gather(shard["slices"], root=0), "meta": meta}
        else:
            self.comm.gather(shard["slices"], root=0)

        def publish():
            if self.rank == 0:
                _write_atomic(path / "index.pkl", index)
                for old in path.iterdir():
                    if old.is_dir() and old.name != version and old.name.startswith("v"):
                        shutil.rmtree(old, ignore_errors=True)
        self._agree("save()", publish)

    def load(self, path) -> None:
        """Resume from a :meth:`save`d folder, on any number of ranks: each rank reads the
        files of the old ranks whose slices overlap its own."""
        index, files = load_index(path), {}

        def fetch(gi, i, a, b):
            o = int(self._slices[gi]["offs"][i])
            lo, hi, parts = o + a, o + b, {}
            for rk, sl in enumerate(index["slices"]):
                s_lo, s_hi = sl[gi]
                x, y = max(lo, s_lo), min(hi, s_hi)
                if x < y:
                    if rk not in files:
                        files[rk] = _read(pathlib.Path(path) / index["version"]
                                          / f"rank-{rk}.pkl")
                    for n, v in files[rk]["state"][gi].items():
                        parts.setdefault(n, np.empty(hi - lo, v.dtype))[x - lo:y - lo] = \
                            v[x - s_lo:y - s_lo]
            return parts
        params = [p for g in self.groups for p in g["params"]]
        self._agree("load()", lambda: self._load(index["meta"], fetch, params))


def load_index(path) -> dict:
    """The index of a :meth:`ShardedOptimizer.save`d folder."""
    return _read(pathlib.Path(path) / "index.pkl")


def load_consolidated(path) -> dict:
    """A :meth:`ShardedOptimizer.save`d folder as one state_dict in the wrapped class's own
    format, in one process without MPI: ``hwoptim.Adam(params).load_state_dict(it)``."""
    index = load_index(path)
    meta = index["meta"]
    sizes = [int(np.prod(s, dtype=np.int64)) for s in meta["shapes"]]
    shards = [_read(pathlib.Path(path) / index["version"] / f"rank-{rk}.pkl")
              for rk in range(index["world"])]
    n_groups, per_group = len(meta["group_sizes"]), meta["group_sizes"]
    state, start = [], 0
    for gi in range(n_groups):
        full = {}
        for sh in shards:
            lo, hi = sh["slices"][gi]
            for n, v in sh["state"][gi].items():
                total = sum(sizes[start:start + per_group[gi]])
                full.setdefault(n, np.empty(total, v.dtype))[lo:hi] = v
        o = 0
        for j in range(start, start + per_group[gi]):
            state.append({n: v[o:o + sizes[j]].reshape(meta["shapes"][j]).copy()
                          for n, v in full.items()})
            o += sizes[j]
        start += per_group[gi]
    groups, start = [], 0
    for gi, g in enumerate(meta["param_groups"]):
        groups.append({**g, "params": list(range(start, start + per_group[gi]))})
        start += per_group[gi]
    out = {"rule": meta["rule"], "step": meta["step"], "dtype": meta["dtype"],
           "shapes": [tuple(s) for s in meta["shapes"]], "param_groups": groups,
           "state": state}
    if meta.get("carry") is not None:
        out["carry"] = meta["carry"]
    return out


def _write_atomic(path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read(path):
    with open(path, "rb") as f:
        return pickle.load(f)


_replace = os.replace            # tests stand in a failing one to crash a save half-way


def _no_norms(opt):
    """``opt``, unless a group's rule takes norms of whole arrays (LAMB, LARS with
    trust_ratio): a slice's norm is not the param's, and the cross-rank reduction they need
    is not built yet."""
    from . import codegen
    for gi, flags in enumerate(opt._flags):
        if codegen.plan(opt.rule, flags).norms:
            raise ValueError(f"param_groups[{gi}]: {opt.rule.name} takes per-param norms "
                             f"(trust_ratio), which span ranks; ShardedOptimizer does not "
                             f"support them yet (trust_ratio=False does)")
    return opt


def _groups(params) -> list:
    """Groups as dicts with ``"params"``: a list of C-contiguous NumPy float arrays."""
    if isinstance(params, np.ndarray):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError("params is empty; expected arrays or parameter groups")
    groups = ([dict(g) for g in params] if isinstance(params[0], dict)
              else [{"params": params}])
    dtype = None
    for gi, g in enumerate(groups):
        ps = g.get("params")
        ps = [ps] if isinstance(ps, np.ndarray) else list(ps or ())
        if not ps:
            raise ValueError(f"param_groups[{gi}] has no params")
        for p in ps:
            if not isinstance(p, np.ndarray) or not p.flags.c_contiguous or \
                    not p.flags.writeable or p.dtype.kind != "f":
                raise TypeError(f"param_groups[{gi}] holds {type(p).__name__}; expected "
                                f"writeable C-contiguous NumPy float arrays")
            if dtype is None:
                dtype = p.dtype
            elif p.dtype != dtype:
                raise TypeError(f"params are {dtype} and {p.dtype}; expected one dtype")
        g["params"] = ps
    return groups


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _copy_range(flat_params, offs, lo, hi, buf, to_buf: bool):
    """Between elements ``[lo, hi)`` of the params flattened in order and ``buf[:hi-lo]``:
    into ``buf`` (the rest of it zeroed) where ``to_buf``, else out of it into the params."""
    k = 0
    for i, p in enumerate(flat_params):
        o, s = int(offs[i]), p.size
        a, b = max(lo, o), min(hi, o + s)
        if a < b:
            if to_buf:
                buf[k:k + b - a] = p[a - o:b - o]
            else:
                p[a - o:b - o] = buf[k:k + b - a]
            k += b - a
    if to_buf:
        buf[k:] = 0
