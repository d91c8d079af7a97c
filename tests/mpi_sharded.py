"""Run by tests/test_distributed.py under ``mpiexec -n R``: ShardedOptimizer against one
process stepping on the averaged gradient, for every rule, float32 and float64, uneven sizes
(not divisible by R, arrays and a group smaller than R slices), two groups.

    mpiexec -n 3 python tests/mpi_sharded.py check
    mpiexec -n 4 python tests/mpi_sharded.py save PATH     # 3 steps, consolidated state
    mpiexec -n 3 python tests/mpi_sharded.py resume PATH   # load it, 3 more steps
    mpiexec -n 4 python tests/mpi_sharded.py checkpoint-save DIR   # save, then a crashed save
    mpiexec -n 3 python tests/mpi_sharded.py checkpoint-load DIR   # resume from the folder

Grads are small integers times 2^-6, so their sum is exact whatever order MPI adds them in,
and the single process steps on that sum divided by R in the grads' dtype: the params must be
the same bytes as the single process's. Prints ``OK ...`` on rank 0, or raises.
"""
from __future__ import annotations

import pickle
import sys
import traceback
import zlib

import numpy as np
from mpi4py import MPI

import hwoptim
from hwoptim.distributed import ShardedOptimizer

COMM = MPI.COMM_WORLD
R, RANK = COMM.Get_size(), COMM.Get_rank()
SHAPES = [[(7, 5), (3,), (1,), (40,)], [(2,)]]       # the second group: smaller than R slices
STEPS = 3


def _ints(rng, shape, dtype, scale=64):
    return np.array(rng.integers(-512, 512, shape) / scale, dtype=dtype)   # 0-d too


def _grads(step, dtype, salt, shapes=None):
    """(this rank's grads, the averaged grads): every rank's are small multiples of 2^-6, so
    their sum is exact in any order; the average is that sum divided by R in ``dtype``, as
    DDP divides (for R = 3 it is rounded, and dividing differs from multiplying by 1/R)."""
    out_mine, out_avg = [], []
    for gi, shapes in enumerate(shapes or SHAPES):
        for k, s in enumerate(shapes):
            seed = zlib.crc32(f"{salt}/{step}/{gi}/{k}".encode())
            rng = np.random.default_rng(seed)
            per_rank = [_ints(rng, s, dtype) for _ in range(R)]
            total = sum(g.astype(np.float64) for g in per_rank).astype(dtype)
            out_mine.append(per_rank[RANK])
            out_avg.append(np.asarray(np.divide(total, np.dtype(dtype).type(R))))
    return out_mine, out_avg


def _params(dtype, salt, shapes=None):
    rng = np.random.default_rng(zlib.crc32(f"params/{salt}".encode()))
    return [[_ints(rng, s, dtype, 16) for s in group] for group in shapes or SHAPES]


def _groups(ps, lr, **second):
    return [{"params": ps[0]}, {"params": ps[1], "lr": lr * 0.5, **second}]


def _same_everywhere(arrays, what):
    h = zlib.crc32(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))
    hs = COMM.allgather(h)
    assert len(set(hs)) == 1, f"{what}: params differ across ranks ({hs})"


def check():
    done = 0
    for ri, rule in enumerate(hwoptim.RULES.values()):
        cls = getattr(hwoptim, rule.name)
        if rule.shape_flags is not None:   # Adafactor: shape-dependent, refused on every rank
            try:
                ShardedOptimizer(cls, _groups(_params("float32", "x"), 1e-2), lr=1e-2)
            except ValueError as e:
                assert "is not supported yet" in str(e), str(e)
                continue
            raise AssertionError(f"{rule.name}: a shape-dependent rule was not refused")
        # per-param norms span ranks: summed across them (the numba backend's multi-tensor
        # kernels take the combined sums; the numpy reference has no such pass: refused)
        norms = "trust_ratio" in rule.options
        if norms:
            try:
                ShardedOptimizer(cls, _groups(_params("float32", "x"), 1e-2), lr=1e-2,
                                 backend="numpy")
            except ValueError as e:
                assert "takes per-param norms" in str(e), str(e)
            else:
                raise AssertionError(f"{rule.name}: numpy backend norms were not refused")
        extra = {}
        second = {"trust_ratio": False} if rule.name == "LARS" else {}   # as for biases
        for dtype in ("float32", "float64"):
            salt = f"{rule.name}/{dtype}"
            mine, ref = _params(dtype, salt), _params(dtype, salt)
            lr = 1e-2
            # buckets of 64 B (many), 128 B, the default (one); every other rule staged
            # through host copies of the buffers (what CuPy arrays take without a
            # CUDA-aware MPI), NumPy standing in for the device
            opt = ShardedOptimizer(cls, _groups(mine, lr, **second), lr=lr, **extra,
                                   bucket_bytes=(64, 128, 4 << 20)[ri % 3],
                                   transport=("direct", "staged")[ri % 2])
            one = cls(_groups(ref, lr, **second), lr=lr, **extra)
            for t in range(STEPS):
                g, avg = _grads(t, dtype, salt)
                if t % 2:                     # started early, finished by step()
                    opt.reduce_grads(g)
                    opt.poll()
                    opt.step()
                else:
                    opt.step(g)
                one.step(avg)
                flat_m = [p for grp in mine for p in grp]
                flat_r = [p for grp in ref for p in grp]
                for i, (a, b) in enumerate(zip(flat_m, flat_r)):
                    if norms:       # a norm's float64 sum is added in other pieces: ulps
                        np.testing.assert_allclose(
                            a, b, rtol=3e-6 if dtype == "float32" else 1e-13, atol=0,
                            err_msg=f"{rule.name} {dtype} R={R} step {t} params[{i}]")
                        continue
                    assert a.tobytes() == b.tobytes(), (
                        f"{rule.name} {dtype} R={R} step {t}: params[{i}] differ from one "
                        f"process on the averaged grads: {a} vs {b}")
                _same_everywhere(flat_m, f"{rule.name} {dtype} step {t}")
            # 1/R of the state per rank (up to the padding and stand-ins)
            total = sum(a.nbytes for st in one.state for a in st.values())
            per_rank = COMM.allgather(opt.state_bytes())
            nbuf = max((len(st) for st in one.state), default=0)
            slack = nbuf * (R * 64 + 2 * np.dtype(dtype).itemsize)
            assert abs(sum(per_rank) - total) <= slack, (rule.name, per_rank, total)
            full = opt.consolidated_state_dict()
            if RANK == 0:
                want = one.state_dict()
                assert full["step"] == want["step"] and full.get("carry") == want.get("carry")
                tol = dict(rtol=3e-6 if dtype == "float32" else 1e-13) if norms else \
                    dict(rtol=0, atol=0)
                for a, b in zip(full["state"], want["state"]):
                    assert a.keys() == b.keys(), f"{rule.name} consolidated"
                    for k in a:
                        np.testing.assert_allclose(a[k], b[k], **tol,
                                                   err_msg=f"{rule.name} consolidated {k}")
                fresh = cls(_groups(_params(dtype, salt), lr, **second), lr=lr, **extra)
                fresh.load_state_dict(full)           # the wrapped class's own format
            done += 1
    _bad_grad_is_refused_everywhere()
    _formats()
    _sixteen()
    _guard()
    _amp()
    _random_layouts()
    if RANK == 0:
        print(f"OK check R={R}: {done} rule x dtype runs")


def _formats():
    """state_dtype='bfloat16' (elementwise): the same bytes as one process with bfloat16
    state. 'int8': each rank quantizes its slice's pieces in blocks of 256 from each piece's
    start, so only one rank (whole params) gives one process's bytes; on more, params stay
    within 2e-3 of one process's (and nearer its int8 run than a float32-state run is).
    State per rank: 1/R of the int8 bytes, absmax included. The consolidated state holds
    values (int8 decoded) that load into one process in any format."""
    from hwoptim import formats
    shapes = [[(70, 90), (3000,), (5,)], [(2,)]]
    lr = 1e-2
    for rule_name in ("Adam", "Lion"):
        cls = getattr(hwoptim, rule_name)
        for sd in ("bfloat16", "int8"):
            salt = f"formats/{rule_name}/{sd}"
            mine, ref, plain = (_params("float32", salt, shapes) for _ in range(3))
            kw = dict(lr=lr, state_dtype=sd, min_8bit_size=0)
            opt = ShardedOptimizer(cls, _groups(mine, lr), **kw)
            one = cls(_groups(ref, lr), **kw)
            fp32 = cls(_groups(plain, lr), lr=lr)
            for t in range(STEPS):
                g, avg = _grads(t, "float32", salt, shapes)
                opt.step(g)
                one.step(avg)
                fp32.step(avg)
            flat_m = [p for grp in mine for p in grp]
            _same_everywhere(flat_m, f"{rule_name} {sd}")
            flat_r = [p for grp in ref for p in grp]
            flat_p = [p for grp in plain for p in grp]
            if sd == "bfloat16" or R == 1:
                assert all(a.tobytes() == b.tobytes() for a, b in zip(flat_m, flat_r)), \
                    f"{rule_name} {sd} R={R}: params differ from one process's"
            else:
                diff = np.concatenate([np.abs(a - b).reshape(-1) for a, b in zip(flat_m, flat_r)])
                d32 = max(float(np.max(np.abs(a - b))) for a, b in zip(flat_r, flat_p))
                assert d32 > 0, "int8 state changed nothing?"
                if rule_name == "Adam":
                    assert diff.max() <= 2e-3, (rule_name, sd, R, diff.max())
                else:      # Lion steps by ±lr: a sign near 0 may flip in a few elements
                    assert diff.max() <= 2 * lr * STEPS + 1e-6, (rule_name, R, diff.max())
                    assert np.mean(diff > 1e-6) < 0.05, (rule_name, R, np.mean(diff > 1e-6))
            n = sum(p.size for p in flat_m)
            per_rank = COMM.allgather(opt.state_bytes())
            nbuf = len(opt.inner.state[0]) // (2 if sd == "int8" else 1)
            per_el = {"bfloat16": 2, "int8": 1}[sd] * nbuf
            pieces = COMM.allgather(len(opt.inner.state))
            slack = nbuf * 4 * (sum(pieces) + R) if sd == "int8" else nbuf * 2 * (R + 1) * 16
            want = per_el * n + (nbuf * 4 * -(-n // formats.BLOCK) if sd == "int8" else 0)
            assert abs(sum(per_rank) - want) <= slack, (rule_name, sd, per_rank, want)
            full = opt.consolidated_state_dict()
            if RANK == 0:
                assert all(not k.endswith("_absmax") for st in full["state"] for k in st)
                mine_sd = one.state_dict()
                for a, b in zip(full["state"], mine_sd["state"]):
                    for k in a:
                        v = (formats.dequantize(b[k].reshape(-1), b[f"{k}_absmax"])
                             if f"{k}_absmax" in b else b[k].astype(np.float32))
                        x = a[k].astype(np.float32).reshape(-1)
                        if sd == "bfloat16" or R == 1:      # the same blocks: the same values
                            assert x.tobytes() == v.astype(np.float32).reshape(-1).tobytes(), k
                        else:                # other blocks: within the dynamic map's steps
                            np.testing.assert_allclose(x, v.reshape(-1), rtol=0,
                                                       atol=0.1 * np.abs(v).max(), err_msg=k)
                for other in ({}, {"state_dtype": "int8", "min_8bit_size": 0},
                              {"state_dtype": "bfloat16"}):
                    fresh = cls(_groups(_params("float32", salt, shapes), lr), lr=lr, **other)
                    fresh.load_state_dict(full)
            # a checkpoint folder (values) resumed on as many ranks: int8 requantized from its
            # decoded values in the same blocks gives the same codes, so the same state
            import tempfile
            path = COMM.bcast(tempfile.mkdtemp() if RANK == 0 else None, root=0)
            opt.save(path)
            again = ShardedOptimizer(cls, _groups(_params("float32", salt, shapes), lr), **kw)
            again.load(path)
            assert again.step_count == STEPS
            for x, y in zip(opt.inner.state, again.inner.state):
                assert x.keys() == y.keys()
                assert all(np.asarray(x[k]).tobytes() == np.asarray(y[k]).tobytes() for k in x)
            COMM.Barrier()
            if RANK == 0:
                import shutil
                shutil.rmtree(path, ignore_errors=True)
    try:
        ShardedOptimizer(hwoptim.Adam, _groups(_params("float32", "x"), 1e-2),
                         master_weights=True)
    except ValueError as e:
        assert "master_weights" in str(e) and "16-bit" in str(e), str(e)
    else:
        raise AssertionError("master_weights with float32 params was not refused")


def _sixteen():
    """16-bit params (bfloat16, float16): grads summed in float32 and divided by R there,
    rounded once to the params' dtype; params all-gathered exactly. Round-to-nearest modes
    (float32, bfloat16 or int8 state on one rank, master weights) are one process's bytes
    stepping on those rounded averages; with stochastic rounding each rank draws for its own
    pieces, so the params agree on every rank and stay within a few units of storage of the
    round-to-nearest run."""
    import ml_dtypes
    from hwoptim import formats
    shapes = [[(70, 90), (3000,), (5,)], [(2,)]]
    lr = 1e-2
    modes = [{}, {"state_dtype": "bfloat16"}, {"master_weights": True},
             {"stochastic_rounding": True, "seed": 5}]
    for dtype in ("bfloat16", "float16"):
        np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
        for mode in modes:
            salt = f"sixteen/{dtype}/{sorted(mode.items())}"
            mine, ref, near = ([[p.astype(np_dtype) for p in grp]
                                for grp in _params("float32", salt, shapes)] for _ in range(3))
            opt = ShardedOptimizer(hwoptim.Adam, _groups(mine, lr), lr=lr, **mode)
            one = hwoptim.Adam(_groups(ref, lr), lr=lr, **mode)
            rn = hwoptim.Adam(_groups(near, lr), lr=lr)
            for t in range(STEPS):
                g32, _ = _grads(t, "float32", salt, shapes)
                mine_g = [g.astype(np_dtype) for g in g32]
                every = COMM.allgather(mine_g)
                avg = [formats.round_nearest(
                    sum(e[k].astype(np.float32) for e in every) / np.float32(R), dtype)
                       for k in range(len(mine_g))]
                opt.step(mine_g)
                one.step(avg)
                rn.step(avg)
            flat_m = [p for grp in mine for p in grp]
            _same_everywhere(flat_m, f"{dtype} {mode}")
            flat_r = [p for grp in ref for p in grp]
            what = f"{dtype} {mode} R={R}"
            if not mode.get("stochastic_rounding") or R == 1:
                assert all(a.tobytes() == b.tobytes() for a, b in zip(flat_m, flat_r)), what
            else:
                eps = float(np.finfo(np_dtype).eps)
                for a, b in zip(flat_m, [p for grp in near for p in grp]):
                    a32, b32 = a.astype(np.float32), b.astype(np.float32)
                    assert np.all(np.abs(a32 - b32) <= 4 * eps * np.abs(b32) + 1e-6), what
            full = opt.consolidated_state_dict()
            if RANK == 0:
                fresh = hwoptim.Adam(_groups([[p.copy() for p in grp] for grp in ref], lr),
                                     lr=lr, **mode)
                fresh.load_state_dict(full)
                if "master_weights" in mode:
                    for a, b in zip(full["state"], one.state_dict()["state"]):
                        assert a["master"].tobytes() == b["master"].tobytes(), what


def _bad_grad_is_refused_everywhere():
    ps = _params("float32", "bad")
    opt = ShardedOptimizer(hwoptim.Adam, _groups(ps, 1e-2), lr=1e-2)
    g, _ = _grads(0, "float32", "bad")
    opt.step(g)
    before = [p.copy() for grp in ps for p in grp]
    sd = pickle.dumps(opt.state_dict())
    if RANK == R - 1:
        g[0] = np.zeros((5, 7), np.float32)
    try:
        opt.step(g)
    except ValueError as e:
        assert f"step() failed on rank {R - 1}: ValueError: grads[0] is float32 (5, 7)" in str(e), str(e)
    else:
        raise AssertionError("a bad grad on one rank was not refused on every rank")
    after = [p for grp in ps for p in grp]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(after, before))
    assert pickle.dumps(opt.state_dict()) == sd
    assert opt.step_count == 1
    g, _ = _grads(1, "float32", "bad")
    # hyperparameters set differently on one rank: refused on every rank before any data moves
    opt.param_groups[1]["lr"] = 0.5 if RANK == R - 1 else 1e-2
    if R > 1:
        try:
            opt.step(g)
        except ValueError as e:
            assert "differ across ranks" in str(e), str(e)
        else:
            raise AssertionError("param_groups that differ across ranks were not refused")
    opt.param_groups[1]["lr"] = 1e-2 * 0.5
    opt.step(g)                       # and it steps on
    assert opt.step_count == 2


def _guard():
    """max_grad_norm and skip_nonfinite over all ranks' grads: clipped by the norm of the
    averaged grads (the same as one process, byte for byte where the averages are exact,
    R a power of 2), and a NaN on one rank skips the step on every rank. 20 params (the
    many-param launch path) in float32, the usual 5 in float64."""
    many = [[(3,)] * 10 + [(7, 5)] + [(2,)] * 8, [(2,)]]
    for dtype, shapes in (("float32", many), ("float64", SHAPES)):
        mine, ref = _params(dtype, "guard", shapes), _params(dtype, "guard", shapes)
        kw = dict(lr=1e-2, max_grad_norm=2.0, skip_nonfinite=True)
        opt = ShardedOptimizer(hwoptim.AdamW, _groups(mine, 1e-2), bucket_bytes=64, **kw)
        one = hwoptim.AdamW(_groups(ref, 1e-2), **kw)
        for t in range(STEPS):
            g, avg = _grads(t, dtype, "guard", shapes)
            opt.step(g)
            one.step(avg)
            assert one.last_grad_norm > 2.0            # the clip is active
            assert opt.last_grad_norm == one.last_grad_norm or R & (R - 1), \
                (opt.last_grad_norm, one.last_grad_norm)
        flat_m, flat_r = [p for grp in mine for p in grp], [p for grp in ref for p in grp]
        for a, b in zip(flat_m, flat_r):
            if R & (R - 1) == 0:
                assert a.tobytes() == b.tobytes(), f"clipped {dtype} R={R}: {a} vs {b}"
            else:          # R = 3: the averages round, so the float64 sums may too
                np.testing.assert_allclose(a, b, rtol=1e-6 if dtype == "float32" else 1e-12)
        _same_everywhere(flat_m, f"clipped {dtype}")
        before, sd = [p.copy() for p in flat_m], pickle.dumps(opt.state_dict())
        g, _ = _grads(STEPS, dtype, "guard", shapes)
        if RANK == R - 1:
            g[10 if shapes is many else 0][3, 4] = np.nan
        opt.step(g)
        assert opt.last_step_skipped and opt.skipped_steps == 1 and opt.step_count == STEPS
        assert all(a.tobytes() == b.tobytes() for a, b in zip(flat_m, before))
        assert pickle.dumps(opt.state_dict()) == sd


def _random_layouts(cases=12):
    """The slicing and bucket copy plans on random layouts: 1 to 3 groups of 1 to 6 arrays
    of random shapes (empty arrays, scalars, arrays smaller and larger than a slice), random
    bucket sizes from one alignment unit up, direct or staged: two Adam steps byte-identical
    to one process on the averaged grads, on every rank."""
    rng = np.random.default_rng(zlib.crc32(f"layouts/{R}".encode()))
    for case in range(cases):
        dtype = ("float32", "float64")[case % 2]
        shapes = [[tuple(int(d) for d in rng.integers(0, 9, rng.integers(0, 3)))
                   for _ in range(rng.integers(1, 7))] for _ in range(rng.integers(1, 4))]
        mine = _params(dtype, f"layout/{case}", shapes)
        ref = [[p.copy() for p in grp] for grp in mine]
        bucket = int(rng.integers(1, 40)) * 64
        groups = lambda ps: [{"params": g, "lr": 1e-2 * (i + 1)} for i, g in enumerate(ps)]
        opt = ShardedOptimizer(hwoptim.Adam, groups(mine), lr=1e-2, bucket_bytes=bucket,
                               transport=("direct", "staged")[case % 3 == 0])
        one = hwoptim.Adam(groups(ref), lr=1e-2)
        for t in range(2):
            g, avg = _grads(t, dtype, f"layout/{case}", shapes)
            opt.step(g)
            one.step(avg)
        flat_m, flat_r = [p for grp in mine for p in grp], [p for grp in ref for p in grp]
        for i, (a, b) in enumerate(zip(flat_m, flat_r)):
            assert a.tobytes() == b.tobytes(), \
                f"layout {shapes} ({dtype}, buckets of {bucket} B) R={R}: params[{i}] differ"
        _same_everywhere(flat_m, f"layout {case}")


def _amp():
    """Loss scaling: grads scaled by 2^10 with grad_scale=2^10 give the unscaled step's
    bytes (on every rank, and as one process on the averaged unscaled grads); a found_inf on
    one rank skips the step on every rank."""
    mine, ref = _params("float32", "amp"), _params("float32", "amp")
    opt = ShardedOptimizer(hwoptim.Adam, _groups(mine, 1e-2), lr=1e-2, bucket_bytes=128)
    one = hwoptim.Adam(_groups(ref, 1e-2), lr=1e-2)
    for t in range(STEPS):
        g, avg = _grads(t, "float32", "amp")
        if t == 1:
            opt.reduce_grads([x * np.float32(1024) for x in g])
            opt.step(grad_scale=1024.0)
        else:
            opt.step([x * np.float32(1024) for x in g], grad_scale=np.float32(1024))
        one.step(avg)
    flat_m, flat_r = [p for grp in mine for p in grp], [p for grp in ref for p in grp]
    for a, b in zip(flat_m, flat_r):
        assert a.tobytes() == b.tobytes(), f"scaled steps on {R} ranks: {a} vs {b}"
    before = [p.copy() for p in flat_m]
    g, _ = _grads(STEPS, "float32", "amp")
    opt.step(g, grad_scale=1024.0, found_inf=1.0 if RANK == R - 1 else 0.0)
    assert opt.last_step_skipped and opt.step_count == STEPS
    assert all(a.tobytes() == b.tobytes() for a, b in zip(flat_m, before))
    opt.step(g, grad_scale=1024.0, found_inf=0.0)
    assert not opt.last_step_skipped and opt.step_count == STEPS + 1
    _same_everywhere(flat_m, "after found_inf")


def save(path):
    ps = _params("float32", "resume")
    opt = ShardedOptimizer(hwoptim.NAdam, _groups(ps, 1e-2), lr=1e-2)
    for t in range(3):
        opt.step(_grads(t, "float32", "resume")[0])
    full = opt.consolidated_state_dict()
    if RANK == 0:
        with open(path, "wb") as f:
            pickle.dump({"state": full, "params": ps}, f)
        print(f"OK save R={R}")


def resume(path):
    with open(path, "rb") as f:
        saved = pickle.load(f)
    ps = [[p.copy() for p in grp] for grp in saved["params"]]
    ref = [[p.copy() for p in grp] for grp in saved["params"]]
    opt = ShardedOptimizer(hwoptim.NAdam, _groups(ps, 1e-2), lr=1e-2)
    opt.load_state_dict(saved["state"] if RANK == 0 else None)
    one = hwoptim.NAdam(_groups(ref, 1e-2), lr=1e-2)
    one.load_state_dict(saved["state"])
    _continue_and_compare(opt, one, ps, ref, "resume", "resumed run")
    if RANK == 0:
        print(f"OK resume R={R}")


def _continue_and_compare(opt, one, ps, ref, salt, what):
    """Steps 3 to 5 on both, then the params byte for byte."""
    for t in range(3, 6):
        g, avg = _grads(t, "float32", salt)
        opt.step(g)
        one.step(avg)
    for a, b in zip([p for grp in ps for p in grp], [p for grp in ref for p in grp]):
        assert a.tobytes() == b.tobytes(), f"{what} on {R} ranks differs from one process"


def checkpoint(path, mode):
    """``save``: 3 steps, a checkpoint, 3 more steps, a second save crashed before its index
    (rank 0's rename fails): the first checkpoint must stay whole. ``load``: resume from it on
    this many ranks and step as one process resumed from ``load_consolidated`` does."""
    import hwoptim.distributed as D
    salt = "ckpt"
    if mode == "save":
        ps = _params("float32", salt)
        opt = ShardedOptimizer(hwoptim.NAdam, _groups(ps, 1e-2), lr=1e-2)
        for t in range(3):
            opt.step(_grads(t, "float32", salt)[0])
        opt.save(path)
        if RANK == 0:
            with open(f"{path}.params", "wb") as f:
                pickle.dump(ps, f)
        for t in range(3, 6):
            opt.step(_grads(t, "float32", salt)[0])

        def failing(src, dst):
            raise OSError("disk full (simulated)")
        if RANK == 0:
            D._replace = failing
        try:
            opt.save(path)
        except OSError as e:
            assert "save() failed on rank 0: OSError: disk full" in str(e), str(e)
        else:
            raise AssertionError("the simulated crash did not surface")
        assert D.load_index(path)["meta"]["step"] == 3
        if RANK == 0:
            print(f"OK checkpoint save R={R}")
        return
    with open(f"{path}.params", "rb") as f:
        saved = pickle.load(f)
    ps = [[p.copy() for p in grp] for grp in saved]
    ref = [[p.copy() for p in grp] for grp in saved]
    opt = ShardedOptimizer(hwoptim.NAdam, _groups(ps, 1e-2), lr=1e-2)
    opt.load(path)
    one = hwoptim.NAdam(_groups(ref, 1e-2), lr=1e-2)
    one.load_state_dict(D.load_consolidated(path))
    assert opt.step_count == one.step_count == 3
    _continue_and_compare(opt, one, ps, ref, salt, "a checkpoint resumed")
    if RANK == 0:
        print(f"OK checkpoint load R={R}")


def torch_params():
    """torch CPU tensors and hwoptim.torch classes (AdamW: torch's defaults, weight_decay
    1e-2; NAdam: a carried scalar; SGD with momentum: no step count): the grads taken from
    ``.grad``, the params the same bytes as the class stepping on the averaged grads in one
    process; the consolidated state in torch's format, equal to the one process's and
    loaded by torch.optim's twin; a torch-format state_dict resumed on R ranks."""
    import torch

    import hwoptim.torch as ht
    for name, kw in (("AdamW", {}), ("NAdam", {}), ("SGD", {"momentum": 0.9})):
        _torch_class(torch, getattr(ht, name), getattr(torch.optim, name), kw)
    if RANK == 0:
        print(f"OK torch R={R}")


def _torch_class(torch, cls, twin, kw):
    """One hwoptim.torch class (see torch_params). Carried scalars (NAdam's mu_product) are
    float64 in the native twin that runs sharded and float32 (torch's) in the class: those,
    and the params they steer, agree to float32's precision rather than bit for bit."""
    carried = {c.name for c in cls.rule.carry}

    def same(a, b, what):
        if carried:
            np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-6,
                                       atol=1e-7, err_msg=what)
        else:
            assert a.detach().numpy().tobytes() == b.detach().numpy().tobytes(), what
    shapes = [(33, 7), (5,), (1,)]
    rng = np.random.default_rng(7)
    init = [_ints(rng, s, "float32", 16) for s in shapes]
    mine = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    ref = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    opt = ShardedOptimizer(cls, mine, lr=1e-2, bucket_bytes=256, **kw)
    one = cls(ref, lr=1e-2, **kw)
    for t in range(4):
        g, avg = [], []
        for k, s in enumerate(shapes):
            per = [_ints(np.random.default_rng(zlib.crc32(f"t/{t}/{k}/{r}".encode())), s,
                         "float32") for r in range(R)]
            g.append(per[RANK])
            avg.append(np.divide(sum(x.astype(np.float64) for x in per).astype(np.float32),
                                 np.float32(R)))
        for p, x in zip(mine, g):
            p.grad = torch.from_numpy(x)
        for p, x in zip(ref, avg):
            p.grad = torch.from_numpy(x)
        opt.step()
        one.step()
        for a, b in zip(mine, ref):
            same(a, b, f"{cls.__name__}: torch params on {R} ranks differ from one process "
                       f"at step {t}")
    _same_everywhere([p.detach().numpy() for p in mine], "torch params")
    # the consolidated state in torch's format: hwoptim.torch's one-process state_dict, and
    # torch.optim.AdamW loads it
    full = opt.consolidated_state_dict()
    if RANK == 0:
        want = one.state_dict()
        assert full["param_groups"] == want["param_groups"], (full["param_groups"], want)
        assert full["state"].keys() == want["state"].keys()
        for i, st in want["state"].items():
            assert st.keys() == full["state"][i].keys(), (st.keys(), full["state"][i].keys())
            for k, v in st.items():
                got = full["state"][i][k]
                assert v.dtype == got.dtype, (k, v.dtype, got.dtype)
                if k in carried:    # float64 in the native twin, torch's float32 here
                    torch.testing.assert_close(got, v, rtol=1e-6, atol=0)
                else:
                    assert torch.equal(v, got), k
        twin([torch.nn.Parameter(p.detach().clone()) for p in ref], lr=1e-2,
             **kw).load_state_dict(full)
    # a checkpoint folder of a torch class: load_consolidated gives torch's format too
    import tempfile

    import hwoptim.distributed as D
    folder = COMM.bcast(tempfile.mkdtemp() if RANK == 0 else None, root=0)
    opt.save(folder)
    if RANK == 0:
        back = D.load_consolidated(folder)
        assert back["param_groups"] == full["param_groups"]
        for i, st in full["state"].items():
            assert all(torch.equal(v, back["state"][i][k]) for k, v in st.items()), i
    # a torch-format state_dict resumes on any number of ranks: continue both 2 steps
    again = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt2 = ShardedOptimizer(cls, again, lr=1e-2, **kw)
    opt2.load_state_dict(one.state_dict() if RANK == 0 else None)
    assert opt2.step_count == (1 if cls.rule.name == "SGD" else 4)   # torch's SGD: no count
    for t in range(4, 6):
        avg = [np.random.default_rng(zlib.crc32(f"r/{t}/{k}".encode())).standard_normal(s)
               .astype(np.float32) for k, s in enumerate(shapes)]
        for p, x in zip(again, avg):
            p.grad = torch.from_numpy(x.copy())
        for p, x in zip(ref, avg):
            p.grad = torch.from_numpy(x.copy())
        opt2.step()                   # the same grads on every rank: their average
        one.step()
    for a, b in zip(again, ref):
        same(a, b, f"{cls.__name__} resumed from a torch state_dict on {R} ranks: differs "
                   f"from one process")


def gpu(transport=None):
    """CuPy params on the one GPU every rank shares: the host-staged transport (or direct,
    where the MPI is CUDA-aware; or ``transport``, e.g. ``nccl`` on one rank); the params the
    same bytes as one process's CuPy optimizer on the averaged grads, for Adam and SGD,
    float32 and float64; the consolidated state on the host."""
    import cupy
    for name in ("Adam", "SGD"):
        cls = getattr(hwoptim, name)
        for dtype in ("float32", "float64"):
            host = _params(dtype, f"gpu/{name}")
            mine = [[cupy.asarray(p) for p in grp] for grp in host]
            ref = [[cupy.asarray(p) for p in grp] for grp in host]
            opt = ShardedOptimizer(cls, _groups(mine, 1e-2), lr=1e-2, bucket_bytes=128,
                                   transport=transport)
            one = cls(_groups(ref, 1e-2), lr=1e-2)
            for t in range(STEPS):
                g, avg = _grads(t, dtype, f"gpu/{name}")
                opt.step([cupy.asarray(x) for x in g])
                one.step([cupy.asarray(x) for x in avg])
            for a, b in zip([p for grp in mine for p in grp], [p for grp in ref for p in grp]):
                assert a.get().tobytes() == b.get().tobytes(), \
                    f"{name} {dtype} on the GPU, {R} ranks ({opt.transport})"
            _same_everywhere([p.get() for grp in mine for p in grp], f"gpu {name} {dtype}")
            full = opt.consolidated_state_dict()
            if RANK == 0:
                for a, b in zip(full["state"], one.state_dict()["state"]):
                    for k in a:
                        assert np.array_equal(np.asarray(a[k]), cupy.asnumpy(b[k])), k
    if RANK == 0:
        print(f"OK gpu R={R} ({opt.transport})")


def idle():
    """A rank that waits for a slow peer (here 2 s) does not spin a core meanwhile: its CPU
    time over the wait stays a fraction of the wall time (the waits sleep after the first
    milliseconds), leaving the cores to the process's other threads and to other ranks."""
    import time
    ps = _params("float32", "idle")
    opt = ShardedOptimizer(hwoptim.Adam, _groups(ps, 1e-2), lr=1e-2)
    opt.step(_grads(0, "float32", "idle")[0])
    COMM.Barrier()
    if RANK == R - 1:
        time.sleep(2.0)
    wall, cpu = time.perf_counter(), time.process_time()
    opt.step(_grads(1, "float32", "idle")[0])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if RANK == 0:
        assert wall > 1.5 and cpu < 0.25 * wall, f"waited {wall:.2f} s using {cpu:.2f} s CPU"
        print(f"OK idle R={R}: waited {wall:.2f} s using {cpu:.3f} s of CPU")


def fault(kind, timeout):
    """A rank that fails inside the update (``raise``), or never arrives (``hang``): the
    others must not wait forever. Ends the job through MPI_Abort; never prints OK."""
    import time
    ps = _params("float32", "fault")
    opt = ShardedOptimizer(hwoptim.Adam, _groups(ps, 1e-2), lr=1e-2, timeout=float(timeout))
    opt.step(_grads(0, "float32", "fault")[0])
    if RANK == 1:
        if kind == "hang":
            time.sleep(300)
        else:
            def broken(grads):
                raise RuntimeError("injected failure in the kernel")
            opt.inner.step = broken
    opt.step(_grads(1, "float32", "fault")[0])
    print(f"rank {RANK} stepped past the fault", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    try:
        {"check": check,
         "save": lambda: save(sys.argv[2]),
         "resume": lambda: resume(sys.argv[2]),
         "checkpoint-save": lambda: checkpoint(sys.argv[2], "save"),
         "checkpoint-load": lambda: checkpoint(sys.argv[2], "load"),
         "torch": torch_params,
         "idle": idle,
         "gpu": lambda: gpu(sys.argv[2] if len(sys.argv) > 2 else None),
         "fault": lambda: fault(sys.argv[2], sys.argv[3])}[mode]()
    except BaseException:             # a failed check on one rank ends every rank at once
        traceback.print_exc()
        sys.stderr.flush()
        COMM.Abort(1)
