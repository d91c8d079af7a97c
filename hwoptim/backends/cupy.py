"""The GPU backend: CUDA kernels printed from the spec, launched through CuPy.

``codegen.cuda_source`` prints one ``RawModule``: the per-element update function, a
vectorised grid-stride kernel (16-byte loads and stores), an element-wise kernel for
misaligned arrays, a variant that reads its per-step scalars from device memory (for CUDA
graph capture) and a one-thread kernel that advances those scalars on the device. Kernels
run on CuPy's current device and stream. The same source is compiled with NVRTC and the
update function run as C++ in every CI run (tests/test_cuda_source.py).

``run.many`` updates a list of separate arrays with one launch of a second module's kernel
(``codegen.cuda_multi_source``: the same update function, one block per chunk of any
tensor), from a device pointer table uploaded per call and a chunk table cached per list
of sizes.

A storage format (16-bit params, bfloat16 or int8 state, master weights, stochastic
rounding: ``hwoptim.formats``) has its own module, ``codegen.cuda_format_source``: the same
element statements between loads and stores that convert each buffer bit for bit as the
NumPy reference does, one warp per 256-element tile, launched as a multi-tensor kernel for
one array or many (``_format_kernel``). Its element function, conversions and tiles run as
C++ in CI too (tests/test_cuda_formats.py).

A staged rule (Adafactor's factored matrices) runs ``codegen.cuda_staged_source``'s kernels
in order (sweeps a warp per 32x32 tile, sums finished a warp per result, then the stores),
one param at a time on its shape (``_staged_kernel``), in any storage format (the same
loads and stores; an int8 state's new values go through float32 scratch that a last kernel
encodes a warp per block); tests/test_cuda_staged.py runs them as C++.
"""
import numpy as np

from .. import codegen
from ..formats import Format

FAMILY = "cuda"
STAGED = True      # runs staged rules (Adafactor's factored arrays) on their shapes
THREADS = 256
# Added to CuPy's own NVRTC options (-ftz=true, -arch=sm_XX). No FMA contraction: the
# kernels are memory-bound, so it costs nothing, and a result then no longer depends on
# where the compiler inlined the update (vector loop or tail: seen to differ by an ulp
# with contraction on an H100), and float64 results equal the NumPy reference bit for bit.
NVRTC_OPTIONS = ("--fmad=false",)
# Multi-tensor launches (run.many): one block per chunk of MULTI_CHUNK_BYTES per array
# (4096 float32 / 2048 float64 elements: four 16-byte vectors per thread, so each block's
# table look-ups are spread over four loads per array). On an H200 a 200-array list of
# ~5e7 elements steps at 0.95 of the one-buffer step (bench/results/NVIDIA-H200-*).
MULTI_CHUNK_BYTES = 16_384
# Storage formats (codegen.cuda_format_source): chunks of 4096 elements, sixteen tiles of
# 256 (an int8 block each), so each of a block's 8 warps takes two
FORMAT_CHUNK = 4096
_sm_count = {}


def unavailable():
    try:
        import cupy
    except ImportError as e:
        return f"cupy is not installed ({e}); pip install 'hwoptim[gpu]'"
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "no CUDA device is visible"
    except Exception as e:  # CUDARuntimeError without a driver
        return f"no usable CUDA driver or device ({e})"
    return None


def _blocks(work: int) -> int:
    import cupy
    dev = cupy.cuda.runtime.getDevice()
    if dev not in _sm_count:
        _sm_count[dev] = cupy.cuda.runtime.getDeviceProperties(dev)["multiProcessorCount"]
    # one 16-byte vector per thread (measured on an H100: capping the grid at 32 blocks per
    # SM and looping left 5% of copy bandwidth unused); the loop only matters past 2^31 blocks
    return max(1, min(-(-work // THREADS), 2**31 - 1))


def used_indices(plan) -> tuple:
    used = codegen._c_used(plan)
    return tuple(plan.arrays.index(a) for a in used)


def refuse_norms(plan, backend: str):
    """For ``backend``s without a reduction pass (the ElementwiseKernel one)."""
    if plan.norms:
        raise ValueError(f"{plan.rule.name} takes per-array norms (trust_ratio), which the "
                         f"{backend!r} backend cannot compute; use backend='cupy', or set "
                         f"trust_ratio=False")


def kernel(plan, dtype):
    fmt = Format.parse(dtype)
    if plan.stages is not None:
        return _staged_kernel(plan, dtype)
    if not fmt.plain:
        return _format_kernel(plan, fmt)
    import cupy
    k = codegen.cuda_source(plan, dtype)
    module = cupy.RawModule(code=k.source, options=NVRTC_OPTIONS)
    idx = used_indices(plan)
    funcs = {}

    def fn(name):
        key = (cupy.cuda.runtime.getDevice(), name)
        if key not in funcs:
            funcs[key] = module.get_function(name)
        return funcs[key]

    def run(arrays, scalars):
        if plan.norms:                 # the reduction, then the update: through many()
            many(np.array([[a.data.ptr for a in arrays]], np.int64),
                 np.array([arrays[0].size], np.int64), np.zeros(1, np.int64),
                 np.array([scalars], dtype=dtype))
            return
        n = arrays[0].size
        args = [arrays[i] for i in idx]
        if all(a.data.ptr % 16 == 0 for a in args):
            fn(k.main)((_blocks(-(-n // k.vec)),), (THREADS,), (*args, *scalars, np.int64(n)))
        else:
            fn(k.unaligned)((_blocks(n),), (THREADS,), (*args, *scalars, np.int64(n)))

    ridx = tuple(plan.arrays.index(a) for a in plan.reduce_reads)

    def _device_args(arrays):
        args = [arrays[i] for i in idx]
        if not all(a.data.ptr % 16 == 0 for a in args):
            raise ValueError("capturable steps need 16-byte aligned arrays (CuPy allocations "
                             "and hwoptim.FlatParams views are)")
        return args

    def _norms(arrays, k_dev, n, sums, guard):
        """Rules taking norms: the array's sums of squares into ``sums[:K]`` (each block's
        partial after them, added in order by one warp), on the current stream, for the
        update to read."""
        need = norm_scratch(len(plan.norms), n)
        if sums is None or sums.size < need:
            raise ValueError(f"{plan.rule.name}: capturable steps of a rule taking norms need "
                             f"a float64 device array of {need} elements per array "
                             f"(backends.cupy.norm_scratch)")
        blocks = _norm_blocks(n)
        g = np.uint64(0) if guard is None else guard
        fn(k.reduce_dev)((blocks,), (THREADS,),
                         (*[arrays[i] for i in ridx], k_dev, np.int64(n), sums, g))
        fn(k.reduce_dev_finish)((1,), (32,), (sums, np.int64(blocks), g))

    def run_device(arrays, k_dev, sums=None, sr=None, tables=None, guard=None):
        """Like ``run``, with the per-step scalars read from the device array ``k_dev``
        (rules taking norms: their sums of squares in ``sums``, computed first); with
        ``guard`` (the step's verdict, written by :func:`step_guard`), the guarded kernel,
        which does nothing where it skips the step."""
        n = arrays[0].size
        args = _device_args(arrays)
        extra = ()
        if plan.norms:
            _norms(arrays, k_dev, n, sums, guard)
            extra = (sums,)
        if guard is None:
            fn(k.device)((_blocks(-(-n // k.vec)),), (THREADS,),
                         (*args, k_dev, np.int64(n), *extra))
        else:
            fn(k.device_guard)((_blocks(-(-n // k.vec)),), (THREADS,),
                               (*args, k_dev, np.int64(n), *extra, guard))

    def advance(hyper_dev, step_dev, k_dev):
        """On the device: step += 1, then the per-step scalars from the hyperparameters
        (carried scalars updated in place after them)."""
        fn(k.advance)((1,), (1,), (hyper_dev, step_dev, k_dev))

    def run_device_guard(arrays, k_dev, guard, sums=None, sr=None, tables=None):
        run_device(arrays, k_dev, sums, sr, tables, guard)

    def advance_guard(hyper_dev, step_dev, k_dev, guard):
        """``run.advance`` unless the verdict skips the step; the grads' factor from it."""
        fn(k.advance_guard)((1,), (1,), (hyper_dev, step_dev, k_dev, guard))

    multi = {}

    def multi_fn():
        if "module" not in multi:
            m = codegen.cuda_multi_source(plan, dtype)
            multi["kernels"] = m
            multi["module"] = cupy.RawModule(code=m.source, options=NVRTC_OPTIONS)
        key = (cupy.cuda.runtime.getDevice(), "multi")
        if key not in funcs:
            funcs[key] = (multi["module"].get_function(multi["kernels"].name),
                          multi["module"].get_function(multi["kernels"].reduce)
                          if plan.norms else None)
        return funcs[key]

    many, tables = _many(plan, multi_fn, len(plan.arrays), dtype,
                         MULTI_CHUNK_BYTES // np.dtype(dtype).itemsize)

    run.prepare = codegen.host_scalar_function(plan, dtype)   # (h, t) -> typed scalars
    run.device, run.advance, run.source = run_device, advance, k.source
    run.device_guard, run.advance_guard = run_device_guard, advance_guard
    run.many, run.many_tables = many, tables
    return run


NORM_BLOCKS = 1024      # capturable norms: at most this many blocks (partials) per array


def _norm_blocks(n: int) -> int:
    return max(1, min(-(-n // THREADS), NORM_BLOCKS))


def format_norm_blocks(n: int) -> int:
    """Blocks of a storage format's capturable reduction over ``n`` elements: a chunk each
    or more, their warps' partials at most NORM_BLOCKS."""
    return min(-(-n // FORMAT_CHUNK), NORM_BLOCKS // codegen.FORMAT_REDUCE_WARPS)


def norm_scratch(k: int, n: int) -> int:
    """float64 elements a capturable step of a rule taking ``k`` norms needs per array of
    ``n`` elements: the totals, then the partials (each block's; in a storage format, each
    warp's)."""
    return k * (1 + max(_norm_blocks(n),
                        codegen.FORMAT_REDUCE_WARPS * format_norm_blocks(n)))


# The step guard (codegen.cuda_guard_source): statistics over chunks of this many elements
# (a block each), partials summed by one warp
GUARD_CHUNK = 1 << 16
# capturable steps' device tables (grads' addresses) kept per cache: grads at fixed
# addresses (a captured graph's) need one each; grads that move make one per step
_TABLES_KEPT = 1024
_guard_modules: dict = {}
_guard_tables: dict = {}


def _guard_kernels(dtype: str):
    import cupy
    key = (cupy.cuda.runtime.getDevice(), dtype)
    if key not in _guard_modules:
        m = cupy.RawModule(code=codegen.cuda_guard_source(dtype), options=NVRTC_OPTIONS)
        _guard_modules[key] = (m.get_function(f"hw_guard_stats_{dtype}"),
                               m.get_function("hw_guard_verdict"))
    return _guard_modules[key]


def step_guard_kernels(dtype) -> None:
    """Build (or load) the guard's kernels for grads of ``dtype`` now: a step checks that
    they compile before it changes anything."""
    from ..formats import dtype_name
    _guard_kernels(dtype_name(np.dtype(dtype)) or str(dtype))


def _guard_table(grads, dtype, cache=None):
    """(address table, chunk table, partials, chunk count) for a list of grads, uploaded
    once per list of addresses and sizes (a captured graph replays with the same buffers;
    nothing is uploaded while a graph is captured after the first, eager, step). ``cache``:
    where they are kept (the optimizer's own, so a graph it captured never outlives them)."""
    import cupy
    cache = _guard_tables if cache is None else cache
    dev = cupy.cuda.runtime.getDevice()
    key = ("guard", dev, dtype, tuple(g.data.ptr for g in grads),
           tuple(g.size for g in grads))
    ent = cache.get(key)
    if ent is None:
        _make_room(cache)
        chunks = codegen.chunk_table([g.size for g in grads], GUARD_CHUNK)
        n = chunks.shape[0]
        ent = (cupy.asarray(np.array([g.data.ptr for g in grads], np.int64)),
               cupy.asarray(chunks if n else np.zeros((1, 3), np.int64)),
               cupy.empty(2 * max(n, 1), dtype=np.float64), n)
        cupy.cuda.get_current_stream().synchronize()    # uploaded before any stream reads
        cache[key] = ent
    return ent


def _make_room(cache: dict, keep: int = _TABLES_KEPT):
    """Past ``keep`` cached device tables (grads that move every step make one per step):
    wait for the device, which may still read some, then forget them all."""
    import cupy
    if len(cache) >= keep:
        cupy.cuda.runtime.deviceSynchronize()
        cache.clear()


def _amp_arg(x, name: str) -> tuple:
    """(address, kind, value) of ``found_inf`` / ``grad_scale`` for the verdict kernel:
    absent (kind 0), a one-element float32 (1) or float64 (2) array on the current device,
    read there, or a number (3)."""
    if x is None:
        return np.uint64(0), np.int32(0), np.float64(0.0)
    if hasattr(x, "data") and hasattr(x.data, "ptr"):
        if x.size != 1 or x.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} is a {x.dtype} array of {x.size} elements; expected one "
                            f"float32 or float64 element (or a number)")
        return (np.uint64(x.data.ptr), np.int32(1 if x.dtype == np.float32 else 2),
                np.float64(0.0))
    return np.uint64(0), np.int32(3), np.float64(x)


def step_guard(grads, guard, mode: int, found_inf=None, grad_scale=None,
               max_norm: float = 0.0, tables=None):
    """One step's verdict into ``guard`` (float64 ``[skip, factor, grad norm, skipped
    steps]``), on the current stream, nothing read on the host: with ``mode`` &
    ``codegen.GUARD_MODE["stats"]`` the grads' sum of squares and non-finite count first
    (deterministic: a block per chunk, the partials in a fixed order). ``found_inf`` and
    ``grad_scale``: numbers, or one-element device arrays read by the kernel. ``tables``:
    the caller's cache of device tables (see ``_guard_table``)."""
    from ..formats import dtype_name
    dtype = (dtype_name(grads[0].dtype) or str(grads[0].dtype)) if grads else "float32"
    stats, verdict = _guard_kernels(dtype)
    fi, sc = _amp_arg(found_inf, "found_inf"), _amp_arg(grad_scale, "grad_scale")
    part, n_chunks = guard, 0
    if mode & codegen.GUARD_MODE["stats"] and grads:
        table, chunks, part, n_chunks = _guard_table(grads, dtype, tables)
        if n_chunks:
            stats((min(n_chunks, 2**31 - 1),), (THREADS,),
                  (table, chunks, np.int64(len(grads)), np.int64(n_chunks), part))
    verdict((1,), (32,), (part, np.int64(n_chunks), *fi, *sc, np.float64(max_norm),
                          np.int32(mode), guard))


def _many(plan, kernels, n_arrays: int, dtype: str, chunk: int):
    """(``many``, its chunk tables) for multi-tensor launches of ``kernels()`` (on the
    current device: the update kernel, and the reduction kernel for rules taking norms),
    whose tables have ``n_arrays`` address columns and ``dtype`` scalars, over chunks of
    ``chunk`` elements."""
    import cupy

    def forget(entry):
        # a dropped chunk table may still be read by a kernel queued on some stream
        for dev in entry.extra:
            with cupy.cuda.Device(dev):
                cupy.cuda.runtime.deviceSynchronize()

    tables = codegen.ChunkTables(chunk, on_evict=forget)
    n_scalars = len(plan.scalars)

    def many(ptrs, sizes, rows, scalars, n_threads=None):
        """Update many separate arrays with one kernel launch on CuPy's current stream.

        ``ptrs``: int64, ``(n_tensors, n_arrays)``, device addresses (on the current device)
        of each tensor's buffers (``plan.arrays``, or a storage format's
        ``Format.arrays(plan.arrays)``), each tensor ``sizes[i]`` elements; ``sizes``,
        ``rows`` (the row of ``scalars`` each tensor uses): int64, ``(n_tensors,)``;
        ``scalars``: ``(n_rows, len(plan.scalars))``, host values (converted to ``dtype``).
        ``n_threads`` is ignored (CPU only).

        The chunk table (``codegen.chunk_table``) is built and uploaded once per distinct
        ``sizes`` and device; every call uploads one packed host buffer (pointers, rows,
        scalars: one host-to-device copy on the current stream), then launches one block
        per chunk. Nothing is launched when every tensor is empty."""
        ptrs = np.ascontiguousarray(ptrs, dtype=np.int64)
        sizes = np.ascontiguousarray(sizes, dtype=np.int64)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        scalars = np.ascontiguousarray(scalars, dtype=dtype)
        n = sizes.shape[0] if sizes.ndim == 1 else -1
        if ptrs.shape != (n, n_arrays) or rows.shape != (n,) or scalars.ndim != 2 or \
                scalars.shape[1] != n_scalars:
            raise ValueError(
                f"many(): expected sizes (n,), ptrs (n, {n_arrays}), rows (n,) and scalars "
                f"(rows, {n_scalars}); got sizes {sizes.shape}, ptrs {ptrs.shape}, rows "
                f"{rows.shape}, scalars {scalars.shape}")
        if n and rows.view(np.uint64).max() >= scalars.shape[0]:    # negatives wrap: huge
            raise IndexError(f"many(): rows must index the {scalars.shape[0]} rows of "
                             f"scalars; got {rows.min()}..{rows.max()}")
        chunks = tables.get(sizes)
        if chunks.n_chunks == 0:
            return
        f, reduce = kernels()
        dev = cupy.cuda.runtime.getDevice()
        chunks_dev = chunks.extra.get(dev)
        if chunks_dev is None:
            chunks_dev = cupy.asarray(chunks.table)
            # later calls may run on other streams: the table must be there before them
            cupy.cuda.get_current_stream().synchronize()
            chunks.extra[dev] = chunks_dev
        table_dev = cupy.asarray(codegen.pack_table(ptrs, rows, scalars))
        grid = (min(chunks.n_chunks, 2**31 - 1),)
        args = (table_dev, chunks_dev, np.int64(n), np.int64(chunks.n_chunks))
        if plan.norms:
            # per tensor, the norms' sums of squares: zeroed, summed by the reduction
            # kernel, read by the update, all on this stream (nothing waits on the host)
            sums = cupy.zeros(n * len(plan.norms), dtype=np.float64)
            reduce(grid, (THREADS,), args + (sums,))
            if "rms" in plan.norm_kinds:       # an RMS: the mean square (1/size, kept with
                scale = chunks.extra.get((dev, "scale"))     # the chunk table)
                if scale is None:
                    scale = cupy.asarray(plan.norm_scale(sizes).reshape(-1))
                    cupy.cuda.get_current_stream().synchronize()
                    chunks.extra[(dev, "scale")] = scale
                sums *= scale
            args += (sums,)
        f(grid, (THREADS,), args)

    return many, tables


def _format_kernel(plan, fmt: Format):
    """A storage format's kernels (``codegen.cuda_format_source``): every launch is a
    multi-tensor one, over ``fmt.arrays(plan.arrays)`` (one tensor: a table of one row)."""
    import cupy
    k = codegen.cuda_format_source(plan, fmt)
    module, funcs = {}, {}

    def kernels():
        dev = cupy.cuda.runtime.getDevice()
        if dev not in funcs:
            if "m" not in module:
                module["m"] = cupy.RawModule(code=k.source, options=NVRTC_OPTIONS)
            m = module["m"]
            funcs[dev] = (m.get_function(k.name),
                          m.get_function(k.reduce) if plan.norms else None)
        return funcs[dev]

    # chunks of whole 256-element tiles (int8 blocks), never across a multiple of 2**32
    many, tables = _many(plan, kernels, len(fmt.arrays(plan.arrays)), fmt.compute,
                         FORMAT_CHUNK)

    def run(arrays, scalars):
        many(np.array([[a.data.ptr for a in arrays]], np.int64),
             np.array([arrays[0].size], np.int64), np.zeros(1, np.int64),
             np.array([scalars], dtype=fmt.compute))

    names = fmt.arrays(plan.arrays)
    static = {}                  # capturable: each param's table, uploaded once

    def run_device(arrays, k_dev, sums=None, guard=None, sr=None, tables=None):
        """A capturable step of one param in this format: its scalars read from ``k_dev``
        (the plain module's ``advance`` writes them), its stochastic-rounding key made on
        the device from ``sr = (seed, step_dev, param number)``, nothing done where
        ``guard`` (the step's verdict) skips the step. The param's address table is
        uploaded once (the graph a capture records reads it at every replay) and kept in
        ``tables`` (the optimizer's: a graph it captured never outlives it)."""
        n = arrays[0].size
        need = norm_scratch(len(plan.norms), n)
        if plan.norms and (sums is None or sums.size < need):
            raise ValueError(f"{plan.rule.name}: capturable steps of a rule taking norms need "
                             f"a float64 device array of {need} elements per array "
                             f"(norm_scratch); got {None if sums is None else sums.size}")
        if fmt.sr and sr is None:
            raise ValueError("a capturable step with stochastic rounding needs sr=(seed, "
                             "step_dev, param number)")
        if n == 0:
            return
        cache = static if tables is None else tables
        dev = cupy.cuda.runtime.getDevice()
        ptrs = [(int(sr[2]) if a == "_srkey" else x.data.ptr) for a, x in zip(names, arrays)]
        key = (k.device, dev, tuple(ptrs), n)
        ent = cache.get(key)
        if ent is None:
            _make_room(cache)
            chunks = codegen.chunk_table([n], FORMAT_CHUNK)
            table = codegen.pack_table(np.array([ptrs], np.int64), np.zeros(1, np.int64),
                                       np.zeros((1, len(plan.scalars)), fmt.compute))
            ent = cache[key] = (cupy.asarray(table), cupy.asarray(chunks), chunks.shape[0])
            cupy.cuda.get_current_stream().synchronize()
        table, chunks, n_chunks = ent
        seed = int(sr[0]) if sr is not None else 0
        step_dev = sr[1] if sr is not None else k_dev          # (unread without SR)
        g = np.uint64(0) if guard is None else guard
        args = (table, chunks, np.int64(1), np.int64(n_chunks))
        extra = ()
        if plan.norms:       # the sums of squares: each warp's partial, added in order
            blocks = format_norm_blocks(n)
            device_fn(k.reduce_dev)((blocks,), (THREADS,), args + (k_dev, g, sums))
            device_fn(k.reduce_dev_finish)((1,), (32,), (
                sums, np.int64(blocks * codegen.FORMAT_REDUCE_WARPS), np.int64(n), g))
            extra = (sums,)
        device_fn(k.device)((min(n_chunks, 2**31 - 1),), (THREADS,),
                            args + (k_dev, step_dev, g, np.uint32(seed & 0xFFFFFFFF),
                                    np.uint32(seed >> 32)) + extra)

    def device_fn(name):
        kernels()
        dev = cupy.cuda.runtime.getDevice()
        if (dev, name) not in funcs:
            funcs[(dev, name)] = module["m"].get_function(name)
        return funcs[(dev, name)]

    plain = {}

    def advance(*args):          # the per-step scalars: the plain module's (compute dtype)
        if "k" not in plain:
            plain["k"] = kernel(plan, fmt.compute)
        plain["k"].advance(*args)

    def advance_guard(*args):
        if "k" not in plain:
            plain["k"] = kernel(plan, fmt.compute)
        plain["k"].advance_guard(*args)

    run.prepare = codegen.host_scalar_function(plan, fmt.compute)
    run.device, run.advance, run.source = run_device, advance, k.source
    run.device_guard = lambda arrays, k_dev, guard, sums=None, sr=None, tables=None: \
        run_device(arrays, k_dev, sums, guard, sr, tables)
    run.advance_guard = advance_guard
    run.many, run.many_tables = many, tables
    return run


def _staged_kernel(plan, key: str):
    """A staged rule's kernels (``codegen.cuda_staged_source``: Adafactor's factored
    matrices), for one param at a time on its shape: ``run(arrays, scalars)``, ``arrays`` in
    ``plan.arrays`` order (contiguous; the grad may be flat). Each call launches the
    module's kernels in order on the current stream, with scratch arrays for the sums
    (CuPy's memory pool); nothing waits on the host."""
    import cupy
    k = codegen.cuda_staged_source(plan, key)
    module, funcs = {}, {}
    dtype = Format.parse(key).compute       # (a storage format's key: its math's dtype)
    typ = np.dtype(dtype).type

    def kernels():
        dev = cupy.cuda.runtime.getDevice()
        if dev not in funcs:
            if "m" not in module:
                module["m"] = cupy.RawModule(code=k.source, options=NVRTC_OPTIONS)
            funcs[dev] = [module["m"].get_function(name) for name, _, _ in k.launches]
        return funcs[dev]

    def run(arrays, scalars):
        b, m, n = codegen.stack_dims(arrays[0].shape)
        if b * m * n == 0:
            return
        vs, ps = codegen.staged_scratch(plan, b, m, n)
        ts = codegen.staged_quant_scratch(plan, key, b, m, n)
        V = [cupy.empty(v, dtype=dtype) for v in vs]
        P = [cupy.empty(q, dtype=np.float64) for q in ps]
        T = [cupy.empty(t, dtype=np.float32) for t in ts]     # int8 states, before encoding
        args = (*arrays, *V, *P, *T, np.int64(b), np.int64(m), np.int64(n),
                *[typ(x) for x in scalars])
        tiles = b * -(-m // 32) * -(-n // 32)
        store = {"bcr": b * m * n, "br": b * m, "bc": b * n}
        for f, (_, kind, what) in zip(kernels(), k.launches):
            # a warp per tile, result or block of 256; a thread per element, row or column
            work = {"sweep": 32 * tiles, "store": store.get(what),
                    "quant": 32 * -(-ts[what] // 256) if kind == "quant" else 0}.get(kind)
            f((_blocks(32 * vs[what] if work is None else work),), (THREADS,), args)

    def run_list(items, scalars):
        for arrays in items:
            run(arrays, scalars)

    def no_device(*args):
        raise ValueError(f"capturable=True: {plan.rule.name}'s factored (staged) params have "
                         f"no device-scalar kernels yet; use capturable=False")

    run.prepare = codegen.host_scalar_function(plan, key)
    run.device, run.advance, run.source = no_device, no_device, k.source
    run.run_list = run_list
    return run


def full(like, value, shape=None):
    import cupy
    with like.device:
        return cupy.full(like.shape if shape is None else shape, value, dtype=like.dtype)


def to_host(a):
    return a.get()


def copy_from_host(dst, src):
    """``src`` into device array ``dst``, on the current stream (ordered after the kernels
    queued there: a step's new stochastic-rounding keys wait for the last step's kernels)."""
    import cupy
    dst.set(np.ascontiguousarray(src, dtype=dst.dtype), stream=cupy.cuda.get_current_stream())


def address(a):
    return (f"cuda:{a.device.id}", a.data.ptr, a.data.ptr + a.nbytes)
