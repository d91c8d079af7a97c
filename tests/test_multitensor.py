"""Multi-tensor apply on the CPU: ``Kernel.many`` updates a list of separate arrays in one
kernel call (a table of their addresses and sizes, a prange over chunks of all of them).

Its promise is bit-identity with the per-array kernels: every rule and option set, float32
and float64, ~50 tensors of log-uniform sizes (some empty), per-tensor step counts and
learning rates (rows of the scalar table), several steps, totals below and above the
serial cutoff; the serial and parallel multi kernels agree bit for bit; and the chunk
table covers every element exactly once. (The CUDA multi kernel is checked by
tests/test_cuda_source.py, NVRTC, and tests/test_cuda_launch.py, its launch.)
"""
from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from hwoptim import backends, codegen  # noqa: E402
from hwoptim.rules import RULES  # noqa: E402
from hwoptim.testing import option_sets, random_values  # noqa: E402

if "numba" not in backends.available():
    pytest.skip(f"numba backend unavailable: {backends.unavailable('numba')}",
                allow_module_level=True)

NB = backends.load("numba")
DTYPES = ("float32", "float64")
STEPS = 3
THREADS = 2            # the thread count the launches are chosen for (parallel above cutoff)


def _cases():
    return [pytest.param(rule, opts, id=oid)
            for rule in RULES.values() for oid, opts in option_sets(rule)]


def _setup(rule, opts, dtype):
    h = {n: opts.get(n, hy.default) for n, hy in rule.hypers.items()}
    o = {n: opts.get(n, v) for n, v in rule.options.items()}
    flags = rule.static_flags(h, o)
    plan = codegen.plan(rule, flags)
    return plan, flags, h, NB.kernel(plan, dtype)


def _sizes(rng, n, high, total_below=None):
    """``n`` log-uniform sizes in [1, high], two of them empty; with ``total_below``, cut
    so that they add up to less than it."""
    sizes = np.exp(rng.uniform(0, np.log(high), n)).astype(np.int64)
    sizes[rng.choice(n, 2, replace=False)] = 0
    if total_below is not None:
        while sizes.sum() >= total_below:
            sizes //= 2
    return sizes


def _buffers(rule, flags, plan, h, sizes, dtype, rng):
    """Per tensor, its buffers in ``plan.arrays`` order: random params, states at the spec's
    initial values (grads are written before each step)."""
    init = {s.name: (h[s.init] if isinstance(s.init, str) else s.init)
            for s in rule.active_states(flags)}
    out = []
    for n in sizes:
        bufs = []
        for a in plan.arrays:
            if a == "param":
                bufs.append(random_values(rng, (n,), dtype))
            elif a == "grad":
                bufs.append(np.zeros(n, dtype))
            else:
                bufs.append(np.full(n, init[a], dtype))
        out.append(bufs)
    return out


def _ptrs(bufs) -> np.ndarray:
    return np.array([[b.ctypes.data for b in tensor] for tensor in bufs],
                    np.int64).reshape(len(bufs), -1)


def _same_bits(a, b) -> bool:
    u = {4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return a.shape == b.shape and np.array_equal(a.view(u), b.view(u))


def _rows(rng, h, k, n_tensors, step):
    """Scalar rows for four (step count, learning rate) pairs, and each tensor's row: the
    tensors of one call are at different steps, with different rates."""
    combos = [(step + d, h["lr"] * s) for d, s in ((0, 1.0), (1, 1.0), (5, 0.5), (17, 2.0))]
    scalars = np.array([k.prepare({**h, "lr": lr}, t) for t, lr in combos], dtype=k.dtype)
    return scalars, rng.integers(0, len(combos), n_tensors).astype(np.int64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule, opts", _cases())
def test_many_equals_the_per_array_kernels(rule, opts, dtype, rng):
    """``k.many`` on one set of buffers against ``k.launcher(n, threads)`` on each array
    of a copy: every buffer bit-identical after each step, for a group whose total is below
    the serial cutoff (the serial multi kernel) and one above it (the parallel one)."""
    plan, flags, h, k = _setup(rule, opts, dtype)
    cutoff = k.serial_below(THREADS)
    c = NB.MULTI_CHUNK                 # and tensors cut into several chunks
    large = np.concatenate([_sizes(rng, 50, 20_000), [c + 1, 2 * c + 5]])
    rng.shuffle(large)
    while large.sum() < min(cutoff, 10**6):
        large = np.append(large, 20_000)
    groups = [large]
    if cutoff > 1_000:                 # (not so only with HWOPTIM_SERIAL_BELOW set low)
        groups.insert(0, _sizes(rng, 50, 2_000, total_below=cutoff))
    if len(groups) == 2 and cutoff <= 10**6:           # the default cutoffs: both kernels
        assert [g.sum() >= cutoff for g in groups] == [False, True], (cutoff, groups)
    for sizes in groups:
        total = int(sizes.sum())
        which = "above the cutoff" if total >= cutoff else "below the cutoff"
        ran_parallel = k.many_launcher(total, THREADS) is not k.many_launcher(0, 1)
        assert ran_parallel == (total >= cutoff), (total, cutoff)
        ours = _buffers(rule, flags, plan, h, sizes, dtype, rng)
        theirs = [[b.copy() for b in tensor] for tensor in ours]
        ptrs = _ptrs(ours)
        for step in range(1, STEPS + 1):
            for a, b in zip(ours, theirs):
                a[1][:] = random_values(rng, a[1].shape, dtype)
                b[1][:] = a[1]
            scalars, rows = _rows(rng, h, k, len(sizes), step)
            k.many(ptrs, sizes, rows, scalars, n_threads=THREADS)
            for n, r, b in zip(sizes, rows, theirs):
                k.launcher(int(n), THREADS)(*b, *scalars[r])
            for i, (a, b) in enumerate(zip(ours, theirs)):
                for name, x, y in zip(plan.arrays, a, b):
                    assert _same_bits(x, y), (
                        f"{which}, step {step}, tensor {i} ({sizes[i]} elements, row "
                        f"{rows[i]}), buffer {name!r}: many() differs from the per-array "
                        f"kernel at {np.flatnonzero(x != y)[:5]}")
        changed = np.concatenate([a[0] for a in ours])
        assert np.isfinite(changed).mean() > 0.9


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule_name, opts", [("Adam", {"amsgrad": True}),
                                             ("SGD", {"momentum": 0.9, "nesterov": True}),
                                             ("RMSprop", {"centered": True, "momentum": 0.5})])
def test_parallel_many_equals_serial_many(rule_name, opts, dtype, rng):
    """The same group through the parallel multi kernel (``n_threads=2``, above the cutoff)
    and the serial one (``n_threads=1``): bit-identical, tensors in any order, with chunk
    boundaries inside tensors and tensors of exactly one chunk."""
    rule = RULES[rule_name]
    plan, flags, h, k = _setup(rule, opts, dtype)
    c = NB.MULTI_CHUNK
    sizes = np.concatenate([[0, c, c + 1, 3 * c - 1, 1], _sizes(rng, 60, 40_000)])
    rng.shuffle(sizes)
    assert k.many_launcher(int(sizes.sum()), 2) is not k.many_launcher(0, 1)
    par = _buffers(rule, flags, plan, h, sizes, dtype, rng)
    ser = [[b.copy() for b in tensor] for tensor in par]
    for step in range(1, STEPS + 1):
        for a, b in zip(par, ser):
            a[1][:] = random_values(rng, a[1].shape, dtype)
            b[1][:] = a[1]
        scalars, rows = _rows(rng, h, k, len(sizes), step)
        k.many(_ptrs(par), sizes, rows, scalars, n_threads=2)
        k.many(_ptrs(ser), sizes, rows, scalars, n_threads=1)
    for a, b in zip(par, ser):
        for name, x, y in zip(plan.arrays, a, b):
            assert _same_bits(x, y), name


def test_many_touches_only_the_tensors_it_is_given(rng):
    """Elements just outside every tensor (a larger buffer, the tensor a slice inside it)
    are left alone: the kernels write exactly ``sizes[i]`` elements from each address."""
    rule = RULES["Adam"]
    plan, flags, h, k = _setup(rule, {}, "float32")
    sizes = np.array([NB.MULTI_CHUNK + 3, 1, 0, 70_000, 5], np.int64)
    outer = [[np.full(n + 8, 7.0, np.float32) for _ in plan.arrays] for n in sizes]
    for tensor in outer:
        tensor[1][:] = 1.0                     # grads: every element of the tensors changes
    inner = [[b[4:4 + n] for b in tensor] for n, tensor in zip(sizes, outer)]
    scalars = np.array([k.prepare(h, 1)], np.float32)
    for n_threads in (1, 2):
        k.many(_ptrs(inner), sizes, np.zeros(len(sizes), np.int64), scalars, n_threads)
    for n, tensor in zip(sizes, outer):
        for b in tensor:
            assert (b[:4] == b[-4:]).all() and b[0] in (7.0, 1.0), "wrote outside a tensor"
        assert n == 0 or (tensor[0][4:4 + n] != 7.0).all(), "a param element was not updated"


def test_many_refuses_bad_input_before_writing(rng):
    rule = RULES["Adam"]
    plan, flags, h, k = _setup(rule, {}, "float32")
    sizes = np.array([100, 30_000], np.int64)
    bufs = _buffers(rule, flags, plan, h, sizes, "float32", rng)
    before = [[b.copy() for b in t] for t in bufs]
    ptrs = _ptrs(bufs)
    scalars = np.array([k.prepare(h, 1), k.prepare(h, 2)], np.float32)
    rows = np.array([0, 1], np.int64)
    for args, err in [((ptrs[:, :3], sizes, rows, scalars), ValueError),
                      ((ptrs, sizes, rows[:1], scalars), ValueError),
                      ((ptrs, sizes, rows, scalars[:, :3]), ValueError),
                      ((ptrs, sizes, rows, scalars[0]), ValueError),
                      ((ptrs, sizes, np.array([0, 2]), scalars), IndexError),
                      ((ptrs, sizes, np.array([-1, 0]), scalars), IndexError),
                      ((ptrs, np.array([100, -5]), rows, scalars), ValueError)]:
        for n_threads in (1, 2):
            with pytest.raises(err):
                k.many(*args, n_threads=n_threads)
    for a, b in zip(bufs, before):
        for x, y in zip(a, b):
            assert _same_bits(x, y)
    k.many(ptrs[:0], sizes[:0], rows[:0], scalars)          # nothing to do
    k.many(ptrs, np.zeros(2, np.int64), rows, scalars)      # every tensor empty


# ----------------------------------------------------------------------------- chunk table

@pytest.mark.parametrize("chunk", [1, 7, 4096, NB.MULTI_CHUNK])
def test_chunk_table_covers_every_element_once(chunk, rng):
    sizes = np.concatenate([[0, chunk, chunk - 1, chunk + 1, 2 * chunk, 0],
                            _sizes(rng, 100, 50_000), [0]]).astype(np.int64)
    table = codegen.chunk_table(sizes, chunk)
    assert table.dtype == np.int64 and table.shape == (table.shape[0], 3)
    assert table.flags.c_contiguous
    t, lo, hi = table.T
    assert (np.diff(t) >= 0).all(), "chunks are not in tensor order"
    assert (lo < hi).all() and (hi - lo <= chunk).all() and (lo % chunk == 0).all()
    assert (hi <= sizes[t]).all()
    for i, n in enumerate(sizes):
        mine = table[t == i]
        covered = np.zeros(n, np.int64)
        for _, a, b in mine:
            covered[a:b] += 1
        assert (covered == 1).all(), f"tensor {i} ({n} elements): covered {covered.max()}x"
        assert len(mine) == -(-n // chunk)
    assert codegen.chunk_table(np.zeros(0, np.int64), chunk).shape == (0, 3)
    with pytest.raises(ValueError):
        codegen.chunk_table(np.array([3, -1]), chunk)


@pytest.mark.parametrize("order", ["shuffled", "big first", "small first"])
def test_chunk_groups_split_work_evenly(order, rng):
    """Every row in exactly one non-empty group, groups in order; and ``k`` consecutive
    groups hold ``k·w`` of work give or take ``w``, so a prange's equal split of the groups
    gives each thread its share whatever the order of the tensors."""
    sizes = np.concatenate([np.full(40, 200_000), np.full(5_000, 2), _sizes(rng, 300, 30_000)])
    if order == "shuffled":
        rng.shuffle(sizes)
    elif order == "small first":
        sizes = np.sort(sizes)
    chunk, row_cost = NB.MULTI_CHUNK, NB.MULTI_ROW_COST
    table = codegen.chunk_table(sizes, chunk)
    g = codegen.chunk_groups(table, chunk, row_cost)
    assert g[0] == 0 and g[-1] == len(table) and (np.diff(g) > 0).all()
    work = table[:, 2] - table[:, 1] + row_cost
    w = max(chunk, work.max())
    ends = np.cumsum(work)[g[1:] - 1]                  # work done at the end of each group
    k = np.arange(1, len(ends))
    assert (ends[:-1] >= k * w).all() and (ends[:-1] < k * w + w).all()
    per_group = np.add.reduceat(work, g[:-1])
    for threads in (2, 3, 8, 16):
        shares = np.array([p.sum() for p in np.array_split(per_group, threads)])
        ideal = work.sum() / threads
        assert np.abs(shares - ideal).max() <= 3 * w, (threads, shares / ideal)
        assert shares.max() / ideal < 1.1, (threads, shares / ideal)


def test_chunk_tables_are_cached_by_sizes(rng):
    evicted = []
    tables = codegen.ChunkTables(100, keep=3, on_evict=evicted.append)
    short = np.array([5, 0, 250], np.int64)
    long = rng.integers(0, 500, codegen.ChunkTables.SHORT + 10).astype(np.int64)
    for sizes in (short, long):
        e = tables.get(sizes)
        assert tables.get(sizes.copy()) is e, "the same sizes built a new table"
        assert np.array_equal(e.table, codegen.chunk_table(sizes, 100))
        assert e.total == sizes.sum() and e.n_chunks == len(e.table) and e.groups is None
        changed = sizes.copy()
        changed[-1] += 1
        assert tables.get(changed) is not e
        assert tables.get(changed).table[-1, 2] == changed[-1]
    for i in range(5):
        tables.get(np.array([i + 1000], np.int64))
    assert len(evicted) >= 2 and all(x.n_chunks >= 1 for x in evicted)
    grouped = codegen.ChunkTables(100, row_cost=3).get(short)
    assert np.array_equal(grouped.groups,
                          codegen.chunk_groups(grouped.table, 100, 3))
