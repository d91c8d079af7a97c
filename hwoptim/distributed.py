"""Optimizer state sharded across processes over MPI (ZeRO stage 1).

``ShardedOptimizer(hwoptim.Adam, params, comm)`` wraps any native hwoptim rule class (or a
``hwoptim.torch`` class, whose native twin it runs; params may be NumPy arrays or CPU torch
tensors). Every rank holds the full params; each group's params, flattened in order, are cut
into R equal slices (rounded up to 64 bytes, the last one shorter), and rank r owns slice r:
the wrapped optimizer is made over views of the pieces of the params in that slice, so its
state exists for that slice only (1/R of the state per rank). A step

1. checks every rank's grads (shape, dtype, contiguity) and hyperparameters and agrees on
   the outcome, so a bad grad on one rank raises the same error on every rank before any
   collective moves data;
2. sums the grads across ranks with non-blocking reduce-scatters, one per bucket of every
   rank's segment (``Ireduce_scatter_block``: each rank receives the sum of its own slice),
   and divides the sum by R, as torch's DDP averages; :meth:`ShardedOptimizer.reduce_grads`
   starts this and returns, so the caller can overlap it with other work;
3. runs the wrapped rule's kernels on the owned slice; whole-param and all-grads reductions
   (LAMB's and LARS's norms, ``max_grad_norm``, ``skip_nonfinite``) add every rank's partial
   sums, all-gathered and summed in rank order, so every rank decides the same;
4. all-gathers the updated slices into every rank's params, bucket by bucket, so params are
   the same bytes on every rank after each step.

Faults: every wait gives up after ``timeout`` seconds and aborts the job (``MPI_Abort``)
with a message, and a rank that fails inside the update (when the others have updated their
slices) aborts it at once; a failure the ranks agree on before any data moved raises on
every rank and changes nothing.

State formats (``state_dtype="bfloat16"`` or ``"int8"``) apply to each rank's slice; the
consolidated and saved states hold values (int8 decoded), which any format loads. 16-bit
params (host arrays) have their grads summed and averaged in float32, rounded once to their
dtype for the rule, and their params all-gathered through float32 buffers.

The sliced layout never needs a param to fit one rank: a slice may start or end inside a
param. A rank that owns no element of a group (a group smaller than R slices) steps a
one-element stand-in for it, so every rank's wrapped optimizer has the same groups and
validates the same hyperparameters the same way. The core does not import this module;
it needs ``mpi4py`` (``pip install "hwoptim[distributed]"``, which brings MPICH's ``mpiexec``).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import pickle
import shutil
import sys
import time
import zlib

import numpy as np

from . import interop

ALIGN_BYTES = 64


def _plain(st: dict) -> dict:
    """One piece's state buffers as values (int8 codes decoded with their blocks' absmax,
    which belong to the piece's blocks and mean nothing beside another rank's): what
    consolidated and saved states hold, whatever the number of ranks that load them."""
    from . import formats
    st = {k: np.asarray(v) for k, v in st.items()}
    out = {}
    for k, v in st.items():
        if isinstance(k, str) and k.endswith("_absmax"):
            continue
        q = f"{k}_absmax"
        out[k] = formats.dequantize(v.reshape(-1), st[q].reshape(-1)) if q in st else v
    return out


def _world():
    from mpi4py import MPI
    return MPI.COMM_WORLD


class ShardedOptimizer:
    """ZeRO stage 1 over MPI for a native hwoptim rule class: see the module docstring."""

    def __init__(self, opt_class, params, comm=None, *, bucket_bytes: int = 16 << 20,
                 timeout: float | None = 600.0, transport: str | None = None,
                 **hyperparameters):
        self.comm = comm = _world() if comm is None else comm
        self.world, self.rank = comm.Get_size(), comm.Get_rank()
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout={timeout!r}; expected a number of seconds > 0, or None "
                             f"to wait forever")
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={bucket_bytes!r}; expected an int >= 1")
        self.timeout = timeout
        self._torch_class = opt_class if opt_class is not _native(opt_class, {})[0] else None
        opt_class, hyperparameters = _native(opt_class, hyperparameters)
        if hyperparameters.get("capturable"):  # the same on every rank: every rank raises
            raise ValueError("ShardedOptimizer: capturable is not supported (a step waits "
                             "on MPI on the host)")
        rule = getattr(opt_class, "rule", None)
        if rule is not None and rule.shape_flags is not None:
            raise ValueError(f"ShardedOptimizer: {rule.name} is not supported yet: its step "
                             f"depends on each param's shape and RMS (factored row and "
                             f"column moments), which a rank's flat slice of the param does "
                             f"not have; step it unsharded on every rank")
        groups, self._torch = self._agree("ShardedOptimizer()", lambda: _groups(params))
        self._stream = interop.torch_stream(self._torch) if self._torch else None
        self.groups = groups
        self.dtype = np.dtype(groups[0]["params"][0].dtype)
        # what the collectives move: 16-bit params' grads are summed in float32 (MPI has no
        # 16-bit sum), their params all-gathered through it too (exactly: they are float32
        # values)
        self._bdtype = np.dtype(np.float32) if self.dtype.itemsize == 2 else self.dtype
        self.transport = self._agree("ShardedOptimizer()",
                                     lambda: _transport(transport, groups[0]["params"][0]))
        first = groups[0]["params"][0]
        self._xp = np if isinstance(first, np.ndarray) else sys.modules["cupy"]
        layout = [(str(self.dtype), [tuple(p.shape) for p in g["params"]]) for g in groups]
        theirs = comm.allgather(layout)
        for rk, lay in enumerate(theirs):
            if lay != layout:
                raise ValueError(f"rank {rk} has params {lay}; rank {self.rank} has {layout}: "
                                 f"expected the same dtype, groups and shapes on every rank")
        self._plan_slices()
        # buckets: ranges of every rank's segment, each reduce-scattered and all-gathered
        # by its own non-blocking collective (bucket_bytes of one rank's slice)
        align = max(1, ALIGN_BYTES // self._bdtype.itemsize)
        b = max(align, bucket_bytes // self._bdtype.itemsize // align * align)
        self._buckets = [(s0, min(s0 + b, self._seg)) for s0 in range(0, self._seg, b)]
        xp = self._xp
        with _on_device(first):
            self._send = xp.empty(self.world * self._seg, self._bdtype)
            self._recv = xp.empty(self._seg, self._bdtype)
            # 16-bit params: the averaged grads rounded to their dtype, what the rule takes
            self._grad16 = (xp.empty(self._seg, self.dtype) if self._bdtype != self.dtype
                            else None)
        if self.transport == "nccl":          # one communicator, its id sent over MPI
            from cupy.cuda import nccl
            uid = comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
            with _on_device(first):
                self._nccl = self._agree("ShardedOptimizer()", lambda: nccl.NcclCommunicator(
                    self.world, uid, self.rank))
            self._nccl_type = {4: nccl.NCCL_FLOAT32, 8: nccl.NCCL_FLOAT64}[self._bdtype.itemsize]
        # what MPI reads and writes: the buffers themselves, or host copies of them
        self._send_h, self._recv_h = ((_host_buffer(self._send), _host_buffer(self._recv))
                                      if self.transport == "staged"
                                      else (self._send, self._recv))
        self._flat_params = [p.reshape(-1) for g in groups for p in g["params"]]
        self._plan_copies()
        inner_groups, self._pieces = [], []
        for g, sl in zip(groups, self._slices):
            views = [g["params"][i].reshape(-1)[a:b] for i, a, b in sl["pieces"]]
            if not views:                     # a one-element stand-in (see the docstring)
                with _on_device(first):
                    sl["standin"] = xp.zeros(1, self.dtype)
                    views = [sl["standin"]]
                    self._pieces.append(xp.zeros(1, self.dtype))
            grads = self._recv if self._grad16 is None else self._grad16
            for i, a, b in sl["pieces"]:      # this slice's averaged grads, in _recv
                start = sl["at"] + int(sl["offs"][i]) + a - sl["lo"]
                self._pieces.append(grads[start:start + b - a])
            inner_groups.append({**{k: v for k, v in g.items() if k != "params"},
                                 "params": views})
        self.inner = self._agree(f"{opt_class.__name__}()",
                                 lambda: self._wire(opt_class(inner_groups, **hyperparameters)))
        self._piece_sizes = np.array([v.size for g in self.inner.param_groups
                                      for v in g["params"]], np.int64)
        self._pending = None
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
    def _agree(self, what, make, same=None):
        """``make()`` on every rank; if it raises on any rank, every rank raises (the first
        failing rank's error), so no rank goes on to a collective the others never reach.
        ``same``: a text that must be equal on every rank (else every rank raises). A rank
        that does not arrive within ``timeout`` seconds aborts the job."""
        try:
            out, err = make(), None
        except Exception as e:                 # noqa: BLE001 - every rank must hear of it
            out, err = None, (type(e).__name__, str(e))
        digest = zlib.crc32(same.encode()) if same is not None else 0
        flags = self._flags_of(err is not None, what, digest)
        if flags[:, 0].any():
            errs = self.comm.allgather(err)
            for rk, e in enumerate(errs):
                if e is not None:
                    kind = {"TypeError": TypeError, "KeyError": KeyError, "OSError": OSError,
                            "FileNotFoundError": FileNotFoundError}.get(e[0], ValueError)
                    raise kind(f"{what} failed on rank {rk}: {e[0]}: {e[1]}")
        if (flags[:, 1] != digest).any():
            theirs = self.comm.allgather(same)
            rk = next(r for r, t in enumerate(theirs) if t != same)
            raise ValueError(f"{what}: param_groups or grad_scale differ across ranks: rank "
                             f"{rk} has {theirs[rk]}, rank {self.rank} has {same}; set them "
                             f"the same on every rank")
        return out

    def _flags_of(self, flag: bool, what: str, digest: int = 0) -> np.ndarray:
        """Every rank's ``(flag, digest)`` (one small all-gather, waited for under the
        timeout), a (ranks x 2) array."""
        mine = np.array([int(flag), digest], np.int64)
        out = np.empty((self.world, 2), np.int64)
        self._wait([self.comm.Iallgather(mine, out)], what)
        return out

    def _wait(self, reqs, what) -> None:
        """Wait for ``reqs`` (MPI requests, or CUDA events after NCCL's collectives); past
        ``timeout`` seconds, abort every rank with a message saying what did not complete
        (a rank that died, hangs, or stopped calling the collective would otherwise leave
        the others waiting forever)."""
        if self.timeout is None:
            if reqs and hasattr(reqs[0], "synchronize"):
                for e in reqs:
                    e.synchronize()
            else:
                from mpi4py import MPI
                MPI.Request.Waitall(reqs)
            return
        start = time.monotonic()
        while not _test_all(reqs):
            if time.monotonic() - start > self.timeout:
                self._abort(f"{what} did not complete within timeout={self.timeout} s: "
                            f"another rank has died, hangs, or did not call it")
            _pause(start)

    def _abort(self, message: str):
        """Say why on stderr, then ``MPI_Abort`` the communicator: every rank ends, this one
        without returning."""
        sys.stderr.write(f"hwoptim.distributed: rank {self.rank} of {self.world}: {message}; "
                         f"aborting all ranks (MPI_Abort)\n")
        sys.stderr.flush()
        # the process manager kills every rank on the abort, and may do so before it has
        # forwarded what this rank just wrote (seen: 1 run in 10 lost the message); give it
        # a moment to pass the message on first
        time.sleep(0.5)
        self.comm.Abort(1)
        os._exit(1)      # MPICH's MPI_Abort may return before the process manager acts:
        # this rank must not go on (its params would differ from the others')

    # ------------------------------------------------------------------ stepping
    @property
    def param_groups(self):
        """The wrapped optimizer's groups (the same on every rank): set a group's values
        here, on every rank, as with the wrapped class."""
        return self.inner.param_groups

    @property
    def step_count(self) -> int:
        return self.inner.step_count

    def reduce_grads(self, grads=None):
        """Start averaging this rank's ``grads`` across ranks and return: the reduce-scatter
        runs in buckets of ``bucket_bytes``, non-blocking, while the caller does other work
        (call :meth:`poll` now and then to let MPI progress it); :meth:`step` then finishes
        it and updates. ``grads`` default to the ``.grad`` of torch params."""
        with self._on_stream():
            self._reduce_grads(grads)

    def _on_stream(self):
        """CUDA torch tensors: the device work on torch's current stream (ordered with the
        caller's backward), as the plain classes do; else nothing."""
        return self._stream() if self._stream is not None else contextlib.nullcontext()

    def _reduce_grads(self, grads=None, *, _also=None, _same=""):
        if self._pending is not None:
            raise RuntimeError("reduce_grads() was already called; call step() (without "
                               "grads) to finish that step first")
        t0 = time.perf_counter()
        flat, also = self._agree("step()", lambda: (self._check(grads), _also and _also()),
                                 same=_same + repr([{k: v for k, v in g.items()
                                                     if k != "params"}
                                                    for g in self.inner.param_groups]))
        from mpi4py import MPI
        reqs, w = [], self.world
        for k, (s0, s1) in enumerate(self._buckets):
            if w == 1:          # one rank: the sum is its grads; no collective to copy them
                self._gather_into(self._recv, self._rs_plan[k], flat)
                continue
            self._gather_into(self._send, self._rs_plan[k], flat)
            reqs.append(self._start(k, gather=False))
            if len(reqs) > 1:
                _test_all(reqs)               # lets MPI move the buckets already started
        self._pending = reqs
        self._t_start = (t0, time.perf_counter())
        return also

    def poll(self) -> bool:
        """Let MPI progress a started :meth:`reduce_grads`; whether it has completed."""
        return self._pending is None or _test_all(self._pending)

    def _start(self, k, gather: bool):
        """Start bucket ``k``'s reduce-scatter (grads, ``_send`` -> ``_recv``) or all-gather
        (params, ``_recv`` -> ``_send``): an MPI request, or with NCCL a CUDA event recorded
        after the collective on the current stream."""
        s0, s1 = self._buckets[k]
        w, n = self.world, s1 - s0
        whole, mine = slice(w * s0, w * s1), slice(s0, s1)
        if self.transport == "nccl":
            import cupy
            from cupy.cuda import nccl
            stream = cupy.cuda.get_current_stream()
            if gather:
                self._nccl.allGather(self._recv[mine].data.ptr, self._send[whole].data.ptr, n,
                                     self._nccl_type, stream.ptr)
            else:
                self._nccl.reduceScatter(self._send[whole].data.ptr, self._recv[mine].data.ptr,
                                         n, self._nccl_type, nccl.NCCL_SUM, stream.ptr)
            done = cupy.cuda.Event(block=False, disable_timing=True)
            done.record(stream)
            return done
        from mpi4py import MPI
        if gather:
            return self.comm.Iallgather(self._recv_h[mine], self._send_h[whole])
        self._d2h(self._send[whole], self._send_h[whole])
        return self.comm.Ireduce_scatter_block(self._send_h[whole], self._recv_h[mine],
                                               op=MPI.SUM)

    def step(self, grads=None, grad_scale=None, found_inf=None) -> None:
        """One step with this rank's local ``grads`` (matching params; torch params' ``.grad``
        where omitted), or finishing a :meth:`reduce_grads` started before (then without
        grads): the grads averaged across ranks, the owned slice updated, the params
        all-gathered in buckets. ``grad_scale`` (the same on every rank) and ``found_inf``
        as the wrapped class takes them; a ``found_inf`` on any rank skips the step on all."""
        with self._on_stream():
            self._step(grads, grad_scale, found_inf)

    def _step(self, grads, grad_scale, found_inf) -> None:
        from .optim import check_amp
        amp = grad_scale is not None or found_inf is not None

        def checked():
            return check_amp(grad_scale, found_inf, "step(): ") if amp else (None, False)
        if self._pending is None:
            skip = self._reduce_grads(grads, _also=checked, _same=repr(grad_scale))[1]
        elif grads is not None:
            raise RuntimeError("reduce_grads() already took this step's grads; call step() "
                               "without grads")
        else:
            skip = self._agree("step()", checked, same=repr(grad_scale))[1]
        if found_inf is not None:                # found anywhere: skipped everywhere
            skip = bool(self._flags_of(skip, "step(): found_inf")[:, 0].any())
        reqs, self._pending = self._pending, None
        t0, t1 = self._t_start
        self._wait(reqs, "step(): the grads' reduce-scatter")
        if self.world > 1:
            self._h2d(self._recv_h, self._recv)
            self._xp.divide(self._recv, self.world, out=self._recv)   # the sum / R, as DDP
        if self._grad16 is not None:           # rounded once, to nearest, into their dtype
            from . import formats
            self._grad16[...] = formats.round_nearest(self._recv, formats.dtype_name(
                self.dtype))
        kw = {} if not amp else dict(grad_scale=grad_scale, found_inf=1.0 if skip else None)
        t2 = time.perf_counter()
        err = None
        try:
            self.inner.step(self._pieces, **kw)
        except BaseException as e:           # noqa: BLE001 - see below
            err = e
        failed = self._flags_of(err is not None, "step(): the update")[:, 0]
        if failed.all():     # the same refusal everywhere (a bad hyperparameter on every
            raise err        # rank): nothing has changed on any rank
        if failed.any():     # some ranks updated their slice, some did not: the params can
            self._abort(f"step() failed on rank(s) {np.flatnonzero(failed).tolist()} "
                        f"inside the update" + (f" ({type(err).__name__}: {err})"
                                                if err is not None else ""))
        t3 = time.perf_counter()
        if self.world > 1 and not self.inner.last_step_skipped:   # every rank agrees
            self._all_gather()     # (one rank: its slice is the params, updated in place)
        t4 = time.perf_counter()
        self.last_timings = {"check and pack": t1 - t0, "reduce-scatter": t2 - t1,
                             "update": t3 - t2, "all-gather": t4 - t3}

    @property
    def skipped_steps(self) -> int:
        """Steps skipped by ``skip_nonfinite`` or a non-finite norm (``max_grad_norm``)."""
        return self.inner.skipped_steps

    @property
    def last_step_skipped(self) -> bool:
        return self.inner.last_step_skipped

    @property
    def last_grad_norm(self):
        """The 2-norm of the last step's averaged grads, all ranks' (``max_grad_norm`` or
        ``skip_nonfinite``); NaN where they held a NaN or an infinity."""
        return self.inner.last_grad_norm

    def _wire(self, inner):
        """Hook the wrapped optimizer's whole-array reductions up to every rank: the grad
        guard (``max_grad_norm``, ``skip_nonfinite``) and per-param norms (LAMB, LARS)."""
        from . import codegen
        if inner.max_grad_norm is not None or inner.skip_nonfinite:
            inner._grad_guard = self._global_guard      # the norm of all ranks' slices
        if any(codegen.plan(inner.rule, f).norms for f in inner._flags):
            if self._xp is not np:
                raise ValueError(f"{inner.rule.name} takes per-param norms, which span ranks: "
                                 f"sharded, they run on the CPU (numba) only yet")
            if not hasattr(inner._kernels()[0], "many"):
                raise ValueError(f"{inner.rule.name} takes per-param norms, which span "
                                 f"ranks: sharded, they need the multi-tensor kernels of "
                                 f"the numba backend (backend={inner.backend_name!r} has "
                                 f"none)")
            inner._norm_combine = self._combine_norms
            self._owner = []           # per group: each inner tensor's param (-1: stand-in)
            for g, sl in zip(self.groups, self._slices):
                self._owner.append(np.array([i for i, _, _ in sl["pieces"]]
                                            if sl["standin"] is None else [-1], np.int64))
        return inner

    def _combine_norms(self, gi, sums):
        """The reduction pass's float64 sums of squares of this rank's pieces of group
        ``gi`` -> the sums over each piece's whole param: every rank's per-param sums,
        all-gathered and added in rank order (the same bits on every rank)."""
        owner = self._owner[gi]
        n = len(self.groups[gi]["params"])
        mine = np.zeros((n, sums.shape[1]))
        real = owner >= 0
        np.add.at(mine, owner[real], sums[real])
        every = np.empty((self.world, n, sums.shape[1]))
        self._wait([self.comm.Iallgather(mine, every)], "step(): the per-param norms")
        total = every[0].copy()
        for r in range(1, self.world):
            total += every[r]
        out = sums.copy()
        out[real] = total[owner[real]]
        return out

    def _global_guard(self, flat, inv_scale=None):
        """The wrapped optimizer's grad guard over the averaged grads of every rank: each
        rank's float64 sum of squares and non-finite test of its slice, all-gathered and
        added in rank order (the same bits on every rank, so every rank takes the same
        decision: clip by the same factor, or skip)."""
        from .optim import guard_verdict
        inner = self.inner
        sumsq, finite = inner.backend.grad_stats(flat, self._piece_sizes, inner.dtype)
        if inv_scale is not None:             # the unscaled grads' (as the wrapped class)
            sumsq *= inv_scale * inv_scale
        mine = np.array([sumsq, 0.0 if finite else 1.0])
        every = np.empty((self.world, 2))
        self._wait([self.comm.Iallgather(mine, every)], "step(): the grads' norm")
        total = 0.0
        for s in every[:, 0]:
            total += float(s)
        return guard_verdict(inner, total, not every[:, 1].any())

    def _check(self, grads):
        """This rank's grads as flat views per group, or an error naming the bad one."""
        params = [p for g in self.groups for p in g["params"]]
        if grads is None:
            if self._torch is None:
                raise ValueError("step() needs grads (one per param); only torch params "
                                 "have a .grad to take them from")
            grads = [t.grad for t in self._torch]
            for i, gr in enumerate(grads):
                if gr is None:
                    raise ValueError(f"params[{i}].grad is None; expected every param to "
                                     f"have a grad (run backward first)")
        if isinstance(grads, (np.ndarray, self._xp.ndarray)) or interop.foreign(grads):
            grads = [grads]
        grads = [interop.as_array(gr, f"grads[{i}]") if interop.foreign(gr) else gr
                 for i, gr in enumerate(grads)]
        if len(grads) != len(params):
            raise ValueError(f"step() got {len(grads)} grads; expected {len(params)}, one "
                             f"per param")
        for i, (gr, p) in enumerate(zip(grads, params)):
            if type(gr) is not type(p) or gr.dtype != p.dtype or gr.shape != p.shape \
                    or not gr.flags.c_contiguous or _device_of(gr) != _device_of(p):
                what = (f"{gr.dtype} {gr.shape}" if hasattr(gr, "dtype")
                        else type(gr).__name__)
                raise ValueError(f"grads[{i}] is {what} ({type(gr).__module__}, "
                                 f"{_device_of(gr)}); expected a C-contiguous {p.dtype} "
                                 f"array of shape {p.shape} like params[{i}] "
                                 f"({type(p).__module__}, {_device_of(p)})")
        return [gr.reshape(-1) for gr in grads]

    def _copies(self, rk, s0, s1, base):
        """Rank ``rk``'s segment ``[s0, s1)`` (its slices of every group, in group order)
        laid at ``base`` of a buffer: ``(copies, zeros)``, ``copies`` as ``(param, start,
        stop, at)`` (elements ``[start, stop)`` of flattened param ``param`` at buffer index
        ``at``), ``zeros`` the ``(start, stop)`` buffer ranges past a group's end. Computed
        once: the layout is fixed, so a step only copies."""
        copies, zeros, first = [], [], 0
        for sl, g in zip(self._slices, self.groups):
            a, b = max(s0, sl["at"]), min(s1, sl["at"] + sl["chunk"])
            if a < b:
                lo = rk * sl["chunk"] + a - sl["at"]          # group elements [lo, hi)
                hi = min(lo + b - a, sl["n"])
                at = base + a - s0
                for i, o in enumerate(sl["offs"][:-1]):
                    x, y = max(lo, int(o)), min(hi, int(sl["offs"][i + 1]))
                    if x < y:
                        copies.append((first + i, x - int(o), y - int(o), at + x - lo))
                if max(hi, lo) < lo + b - a:
                    zeros.append((at + max(hi - lo, 0), at + b - a))
            first += len(g["params"])
        return copies, zeros

    def _plan_copies(self):
        w = self.world
        self._rs_plan, self._ag_plan = [], []
        for s0, s1 in self._buckets:
            n = s1 - s0
            rs = [self._copies(rk, s0, s1, w * s0 + rk * n) for rk in range(w)]
            self._rs_plan.append(([c for r in rs for c in r[0]], [z for r in rs for z in r[1]]))
            self._ag_plan.append([c for rk in range(w) if rk != self.rank
                                  for c in self._copies(rk, s0, s1, w * s0 + rk * n)[0]])
        self._own_plan = self._copies(self.rank, 0, self._seg, 0)

    def _d2h(self, dev, host):
        """``transport="staged"``: a buffer's bytes into its host copy, for MPI to read."""
        if self.transport == "staged":
            if isinstance(dev, np.ndarray):
                np.copyto(host, dev)
            else:
                dev.get(out=host)         # waits for the stream: the packing is done

    def _h2d(self, host, dev):
        """``transport="staged"``: what MPI wrote into a host copy, back into the buffer."""
        if self.transport == "staged":
            if isinstance(dev, np.ndarray):
                np.copyto(dev, host)
            else:
                dev.set(host)             # ordered before the kernels that read it

    @staticmethod
    def _gather_into(buf, plan, arrays):
        copies, zeros = plan
        for j, a, b, at in copies:
            buf[at:at + b - a] = arrays[j][a:b]
        for a, b in zeros:
            buf[a:b] = 0

    def _all_gather(self):
        from mpi4py import MPI
        mine, w, params = self._recv, self.world, self._flat_params   # _recv: grads consumed
        self._gather_into(mine, self._own_plan, params)
        self._d2h(mine, self._recv_h)          # (staged: all buckets' bytes at once)
        reqs = [self._start(k, gather=True) for k in range(len(self._buckets))]
        left, waited, full = list(range(len(reqs))), time.monotonic(), self._send
        while left:             # unpack each bucket as it arrives, while the others fly
            k = self._next_done(reqs, left, waited)
            left.remove(k)
            s0, s1 = self._buckets[k]
            self._h2d(self._send_h[w * s0:w * s1], full[w * s0:w * s1])
            for j, a, b, at in self._ag_plan[k]:
                params[j][a:b] = full[at:at + b - a]

    def _next_done(self, reqs, left, since):
        """The index in ``left`` of a completed request (waiting for one), under the
        timeout."""
        while True:
            for k in left:
                if _test_all([reqs[k]]):
                    return k
            if self.timeout is not None and time.monotonic() - since > self.timeout:
                self._abort(f"step(): the params' all-gather did not complete within "
                            f"timeout={self.timeout} s: another rank has died or hangs")
            _pause(since)

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
        in one process, and :meth:`load_state_dict` on any number of ranks. For a
        ``hwoptim.torch`` class: torch's format (``torch.optim``'s twin loads it too)."""
        out = self._consolidated(root)
        if out is not None and self._torch_class is not None:
            out = _to_torch(out, self._torch_class)
        return out

    def _consolidated(self, root):
        shard = _on_host(self.state_dict())
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
                    for name, buf in _plain(sh["inner"]["state"][k]).items():
                        full = state[j].setdefault(name, np.empty(params[j].size, buf.dtype))
                        full[a:b] = buf.reshape(-1)
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
        if isinstance(full, dict) and "rule" not in full and "state" in full:
            full = self._agree("load_state_dict()", lambda: _from_torch(
                full, self.inner, [tuple(p.shape) for p in params],
                [len(g["params"]) for g in self.groups]))

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
                state.append({n: self._xp.ascontiguousarray(self._xp.asarray(v))
                              for n, v in fetch(gi, i, a, b).items()})
                k += 1
        inner.pop("format", None)             # (the pieces: plain values, converted on load)
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
        inner = _on_host(self.inner.state_dict())
        version = self.comm.bcast(f"v{inner['step']}-{os.urandom(4).hex()}"
                                  if self.rank == 0 else None, root=0)
        flat, k = [], 0
        for sl in self._slices:
            bufs = {}
            if sl["standin"] is not None:
                k += 1
            for _ in sl["pieces"]:
                for n, v in _plain(inner["state"][k]).items():
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
            meta["torch_class"] = getattr(self._torch_class, "__name__", None)
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
    format, in one process without MPI: ``hwoptim.Adam(params).load_state_dict(it)`` (torch's
    format where a ``hwoptim.torch`` class was wrapped)."""
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
    if meta.get("torch_class"):               # saved from a hwoptim.torch class: its format
        from . import torch as ht
        out = _to_torch(out, getattr(ht, meta["torch_class"]))
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


TRANSPORTS = ("direct", "staged", "nccl")


def _test_all(reqs) -> bool:
    """Whether every request has completed (MPI requests: progressing them; CUDA events)."""
    if reqs and hasattr(reqs[0], "synchronize"):
        return all(e.done for e in reqs)
    from mpi4py import MPI
    return MPI.Request.Testall(reqs)


def _pause(since: float) -> None:
    """Between polls of a wait that began at ``since``: yield at first (collectives of a step
    finish in milliseconds), then sleep a little, growing to 1 ms, so a rank waiting for a
    slow peer (its backward pass still running) leaves the cores to the process's other
    threads (BLAS, torch) and to ranks sharing them, instead of spinning."""
    waited = time.monotonic() - since
    if waited < 2e-3:
        os.sched_yield()
    else:
        time.sleep(min(1e-3, waited / 100))


def _transport(name, first) -> str:
    """The transport for params like ``first``: ``"direct"`` (MPI reads and writes the
    arrays: NumPy ones, or CuPy ones where the MPI is CUDA-aware), ``"staged"`` (through
    host copies: CuPy arrays and an MPI that is not), or ``"nccl"`` (CuPy arrays, one GPU
    per rank; only when asked for). ``name`` forces one."""
    if name is not None:
        if name not in TRANSPORTS:
            raise ValueError(f"transport={name!r}; expected None or one of {TRANSPORTS}")
        if name == "nccl":
            if isinstance(first, np.ndarray):
                raise ValueError("transport='nccl' moves CuPy arrays; these params are NumPy's")
            from cupy.cuda import nccl
            if not nccl.available:
                raise ValueError("transport='nccl': this CuPy has no NCCL (pip install "
                                 "nvidia-nccl-cu12, or use 'staged')")
        return name
    if isinstance(first, np.ndarray):
        return "direct"
    from mpi4py import MPI
    query = getattr(MPI, "Query_cuda_support", None)
    return "direct" if query is not None and query() else "staged"


def _on_device(a):
    """The context that allocates on ``a``'s device (nothing to do for NumPy)."""
    dev = getattr(a, "device", None)
    return dev if hasattr(dev, "__enter__") else contextlib.nullcontext()


def _device_of(a) -> str:
    """``"cpu"`` or ``"cuda:N"`` for an array (hwoptim.optim's naming); the type's name for
    anything else, for messages."""
    from .backends import family
    from .optim import _device
    fam = family(a)
    return _device(a, fam) if fam is not None else type(a).__name__


def _host_buffer(a) -> np.ndarray:
    """A host array like ``a`` for MPI to use: page-locked where ``a`` is CuPy's (faster
    copies to and from the device)."""
    if isinstance(a, np.ndarray):
        return np.empty_like(a)
    import cupyx
    return cupyx.empty_pinned(a.shape, a.dtype)


def _on_host(sd):
    """A state_dict with its arrays as NumPy arrays (CuPy ones copied to the host)."""
    if isinstance(sd, dict):
        return {k: _on_host(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_on_host(v) for v in sd]
    if hasattr(sd, "get") and hasattr(sd, "__cuda_array_interface__"):
        return sd.get()
    return sd


def _to_torch(full: dict, torch_class) -> dict:
    """A native consolidated state_dict in torch's format for ``torch_class`` (a
    ``hwoptim.torch`` class): per param ``step`` and the carried scalars as 0-d tensors of
    torch's scalar dtype, the buffers as tensors; the groups as the class writes them."""
    import torch

    from . import torch as ht
    sdt, rule = ht._scalar_dtype(), torch_class.rule
    dtype = getattr(torch, full["dtype"])
    state = {}
    for gi, g in enumerate(full["param_groups"]):
        c = (full.get("carry") or [None] * len(full["param_groups"]))[gi]
        for i in g["params"]:
            if full["step"] == 0 and rule.name not in ht._EAGER_STATE:
                continue                     # torch creates state at a param's first step
            st = {} if rule.name in ht._NO_STEP else {
                "step": torch.tensor(float(full["step"]), dtype=sdt)}
            st.update({k: torch.tensor(float(v), dtype=sdt) for k, v in (c or {}).items()})
            st.update({k: torch.from_numpy(np.array(v)) for k, v in full["state"][i].items()})
            state[i] = st
    template = torch_class([{**{k: v for k, v in g.items() if k != "params"},
                             "params": [torch.zeros(full["shapes"][i], dtype=dtype)
                                        for i in g["params"]]}
                            for g in full["param_groups"]])
    return {"state": state, "param_groups": template.state_dict()["param_groups"]}


def _from_torch(sd: dict, inner, shapes, group_sizes) -> dict:
    """A torch-format state_dict (``hwoptim.torch``'s or ``torch.optim``'s twin's) as the
    native consolidated one ``inner`` (the wrapped optimizer) loads; a param without state
    (torch creates it at the param's first step) gets the rule's initial buffers."""
    rule, groups = inner.rule, sd["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    if sizes != list(group_sizes):
        raise ValueError(f"the state_dict has groups of {sizes} params; expected "
                         f"{list(group_sizes)}")
    states = [sd["state"].get(i, {}) for g in groups for i in g["params"]]
    steps = {float(st["step"]) for st in states if "step" in st}
    if len(steps) > 1:
        raise ValueError(f"the params' step counts differ ({sorted(steps)}); a sharded "
                         f"optimizer keeps one")
    carried = {c.name for c in rule.carry}
    # torch's SGD keeps no count: a momentum buffer means at least one step was taken
    buffered = any(v is not None for st in states for v in st.values())
    out = {"rule": rule.name, "step": int(steps.pop()) if steps else int(buffered),
           "dtype": inner.dtype,
           "shapes": shapes, "param_groups": [], "state": []}
    carry, k = [], 0
    for gi, g in enumerate(groups):
        h = {x: g[x] for x in (*rule.hypers, *rule.options) if x in g}
        out["param_groups"].append({**h, "params": list(range(k, k + len(g["params"])))})
        first = states[k]
        carry.append({c: float(first[c]) for c in carried if c in first} or None)
        for j in range(k, k + len(g["params"])):
            st = {x: v.detach().cpu().numpy().reshape(shapes[j]) for x, v in states[j].items()
                  if x not in carried and x != "step" and v is not None}
            for b in rule.active_states(inner._flags[gi]):
                if b.name not in st:          # torch has not created it yet
                    init = h[b.init] if isinstance(b.init, str) else b.init
                    st[b.name] = np.full(shapes[j], init, inner.dtype)
            out["state"].append(st)
        k += len(g["params"])
    if rule.carry:
        out["carry"] = carry
    return out


def _native(opt_class, hyper):
    """A ``hwoptim.torch`` class's native twin (the same rule), with the torch class's
    defaults for what ``hyper`` leaves out; torch-only switches (``foreach``, ``fused``) that
    change nothing there are dropped. A native class as it is."""
    import sys
    torch_mod = sys.modules.get("hwoptim.torch")
    if torch_mod is None or not (isinstance(opt_class, type)
                                 and issubclass(opt_class, torch_mod.Optimizer)):
        return opt_class, hyper
    import inspect

    import hwoptim
    native = getattr(hwoptim, opt_class.rule.name)
    sig = inspect.signature(opt_class.__init__).parameters
    out = {n: sig[n].default for n in opt_class.rule.hypers if n in sig
           and sig[n].default is not inspect.Parameter.empty}
    out.update({k: v for k, v in hyper.items() if k not in ("foreach", "fused")})
    return native, out


def _groups(params) -> tuple:
    """(groups as dicts with ``"params"``: lists of C-contiguous NumPy float arrays, the
    torch tensors they view or ``None``): NumPy arrays as they are, torch CPU tensors (and
    other DLPack arrays) as zero-copy views."""
    from .backends import family
    if family(params) is not None or interop.foreign(params):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError("params is empty; expected arrays or parameter groups")
    groups = ([dict(g) for g in params] if isinstance(params[0], dict)
              else [{"params": params}])
    dtype, originals = None, []
    for gi, g in enumerate(groups):
        ps = g.get("params")
        ps = [ps] if family(ps) is not None or interop.foreign(ps) else list(ps or ())
        if not ps:
            raise ValueError(f"param_groups[{gi}] has no params")
        originals += ps
        ps = [interop.as_array(p, f"param_groups[{gi}] params[{j}]")
              if interop.foreign(p) else p for j, p in enumerate(ps)]
        for p in ps:
            if family(p) is None or not p.flags.c_contiguous or p.dtype.kind not in "fV" or \
                    (p.dtype.kind == "V" and str(p.dtype) != "bfloat16") or \
                    (isinstance(p, np.ndarray) and not p.flags.writeable):
                raise TypeError(f"param_groups[{gi}] holds {type(p).__name__}; expected "
                                f"writeable C-contiguous float arrays (NumPy, CuPy, or torch "
                                f"tensors)")
            if p.dtype.itemsize < 4 and not isinstance(p, np.ndarray):
                raise TypeError(f"param_groups[{gi}] holds {p.dtype} GPU arrays; "
                                f"ShardedOptimizer shards 16-bit params on the host only yet "
                                f"(NumPy arrays, CPU tensors); float32 and float64 anywhere")
            if dtype is None:
                dtype, kind = p.dtype, (type(p), _device_of(p))
            elif p.dtype != dtype:
                raise TypeError(f"params are {dtype} and {p.dtype}; expected one dtype")
            elif (type(p), _device_of(p)) != kind:
                raise TypeError(f"params are on {kind[1]} and {_device_of(p)}; expected one "
                                f"device")
        g["params"] = ps
    torch_params = originals if any(interop.foreign(p) for p in originals) else None
    return groups, torch_params


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
