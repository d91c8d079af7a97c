"""How the GPU backends launch their kernels, checked on any machine (no GPU, no CuPy).

The kernels' source is checked by tests/test_cuda_source.py (NVRTC, and the update function
run as C++) and their results on a GPU by tests/test_gpu.py. What neither sees on a CPU is
the launch itself: which stream, which kernel, what grid, which arguments in which order.
Here the CuPy calls the backends make are answered by a small stand-in for the part of CuPy
they use (``RawModule``, ``ElementwiseKernel``, the current stream, the device query), which
records every launch with the stream that was current when it was made, as CuPy launches
``RawKernel`` and ``ElementwiseKernel`` calls on its current stream. The backends' code runs
unchanged; only CuPy and the driver are stand-ins. test_gpu.py's
``test_current_stream_honoured`` checks the same promise on a real device.
"""
from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest

from hwoptim import codegen
from hwoptim.rules import RULES

SM = 132


class _Stream:
    def __init__(self, name):
        self.name = name
        self._prev = []

    def __enter__(self):
        self._prev.append(_FakeCupy.current)
        _FakeCupy.current = self
        return self

    def __exit__(self, *exc):
        _FakeCupy.current = self._prev.pop()

    def synchronize(self):
        _FakeCupy.syncs.append(self)

    def __repr__(self):
        return f"<stream {self.name}>"


class _Ptr:
    def __init__(self, ptr):
        self.ptr = ptr


class _Array:
    """What the backends read of a device array: size and address."""

    def __init__(self, n, ptr):
        self.size, self.data = n, _Ptr(ptr)

    def __repr__(self):
        return f"<array n={self.size} at {self.data.ptr:#x}>"


class _Upload(_Array):
    """What ``cupy.asarray(host_array)`` gives: a device array holding a copy of the host
    data, made on the stream current at the time."""

    def __init__(self, host, ptr, stream):
        super().__init__(host.size, ptr)
        self.host, self.stream = host.copy(), stream


class _FakeCupy(types.ModuleType):
    current = None
    launches: list = []
    uploads: list = []
    syncs: list = []
    allocs = 0

    def __init__(self):
        super().__init__("cupy")
        self.modules = []
        fake = self

        class RawModule:
            def __init__(self, code, options=()):
                self.code, self.options = code, tuple(options)
                fake.modules.append(self)

            def get_function(self, name):
                assert f'extern "C" __global__ void {name}(' in self.code, name

                def launch(grid, block, args, **kw):
                    assert not kw, f"unexpected launch options {kw}"
                    fake.launches.append(dict(kernel=name, grid=grid, block=block,
                                              args=args, stream=_FakeCupy.current))
                return launch

        class ElementwiseKernel:
            def __init__(self, in_params, out_params, operation, name, **kw):
                self.name, self.kw = name, kw
                fake.modules.append(self)

            def __call__(self, *args, **kw):
                assert not kw, f"unexpected launch options {kw}"
                fake.launches.append(dict(kernel=self.name, grid=None, block=None,
                                          args=args, stream=_FakeCupy.current))

        stream_mod = types.SimpleNamespace(
            Stream=types.SimpleNamespace(null=_Stream("null")),
            ExternalStream=lambda ptr, device_id=-1: _Stream(f"external {ptr:#x}"),
            get_current_stream=lambda: _FakeCupy.current)
        runtime = types.SimpleNamespace(
            getDevice=lambda: 0, getDeviceCount=lambda: 1,
            getDeviceProperties=lambda dev: {"multiProcessorCount": SM},
            deviceSynchronize=lambda: _FakeCupy.syncs.append("device"))
        self.cuda = types.SimpleNamespace(runtime=runtime, Device=_Device, **vars(stream_mod))
        self.RawModule, self.ElementwiseKernel = RawModule, ElementwiseKernel
        self.empty = _empty

    @staticmethod
    def asarray(a):
        assert isinstance(a, np.ndarray), f"only host arrays are uploaded here, got {type(a)}"
        up = _Upload(a, 0x7E0000000000 + (len(_FakeCupy.uploads) << 24), _FakeCupy.current)
        _FakeCupy.uploads.append(up)
        return up

    @staticmethod
    def zeros(n, dtype):
        z = _Zeros(n, dtype, 0x7D0000000000 + (len(_FakeCupy.uploads) << 24),
                   _FakeCupy.current)
        _FakeCupy.uploads.append(z)
        return z


class _Empty(_Array):
    """What ``cupy.empty`` gives: a device array of ``dtype``, not written."""

    def __init__(self, n, dtype, ptr):
        super().__init__(n, ptr)
        self.dtype = np.dtype(dtype)


class _Zeros(_Array):
    """What ``cupy.zeros`` gives: a device array, zero-filled on the stream current then."""

    def __init__(self, n, dtype, ptr, stream):
        super().__init__(n, ptr)
        self.dtype, self.stream = np.dtype(dtype), stream


def _empty(n, dtype):
    _FakeCupy.allocs += 1
    return _Empty(n, dtype, 0x7C0000000000 + (_FakeCupy.allocs << 24))


class _Device:
    def __init__(self, dev):
        assert dev == 0, dev

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = _FakeCupy()
    _FakeCupy.current = fake.cuda.Stream.null
    _FakeCupy.launches = []
    _FakeCupy.uploads = []
    _FakeCupy.syncs = []
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return fake


def _backend(name):
    return importlib.import_module(f"hwoptim.backends.{name}")


def _plan(rule_name, **opts):
    rule = RULES[rule_name]
    h = {n: hy.default for n, hy in rule.hypers.items()}
    h.update({k: v for k, v in opts.items() if k in rule.hypers})
    o = dict(rule.options)
    o.update({k: v for k, v in opts.items() if k in rule.options})
    return codegen.plan(rule, rule.static_flags(h, o)), h


def _arrays(plan, n, base=0x7F0000000000, misalign=0):
    """One device array per plan array, 16-byte aligned unless ``misalign``."""
    return [_Array(n, base + (i << 32) + (misalign if i == 1 else 0))
            for i in range(len(plan.arrays))]


CASES = [("Adam", {}), ("Adam", {"amsgrad": True}), ("SGD", {"momentum": 0.9}),
         ("RMSprop", {"centered": True, "momentum": 0.9}), ("Adagrad", {}), ("Adadelta", {})]


@pytest.mark.parametrize("backend", ["cupy", "cupy-elementwise"])
@pytest.mark.parametrize("rule_name, opts", CASES, ids=[f"{r}{o or ''}" for r, o in CASES])
def test_launches_go_to_the_current_stream(backend, rule_name, opts, fake_cupy):
    """Every launch (plain, misaligned, device-scalar, advance) is made while the caller's
    current stream is current: never the null stream, never a stream of hwoptim's own."""
    mod = _backend(backend.replace("-", "_"))
    plan, h = _plan(rule_name, **opts)
    dtype = "float32"
    run = mod.kernel(plan, dtype)
    scalars = run.prepare(h, 3)
    side = fake_cupy.cuda.ExternalStream(0xABC0)
    calls = [lambda: run(_arrays(plan, 10_000), scalars),
             lambda: run(_arrays(plan, 10_000, misalign=4), scalars)]
    if hasattr(run, "device"):
        calls += [lambda: run.device(_arrays(plan, 10_000), _Array(len(plan.scalars), 0x10)),
                  lambda: run.advance(_Array(8, 0x20), _Array(1, 0x30), _Array(4, 0x40))]
    for call in calls:
        for stream in (side, fake_cupy.cuda.ExternalStream(0xDEF0)):
            _FakeCupy.launches.clear()
            with stream:
                call()
            assert [L["stream"] for L in _FakeCupy.launches] == [stream], (
                f"{backend}: launched on {[L['stream'] for L in _FakeCupy.launches]}, expected "
                f"one launch on the caller's current stream {stream}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [1, 3, 255, 256 * 4 + 1, 1_000_003])
def test_launch_configuration(n, dtype, fake_cupy):
    """The vectorised kernel for 16-byte aligned arrays, the element-wise one otherwise; one
    thread per 16-byte vector (per element when misaligned), 256 threads a block; the arrays
    the kernel uses, in the source's order, then the scalars, then n as a 64-bit integer;
    hwoptim's NVRTC options passed to the compiler."""
    mod = _backend("cupy")
    plan, h = _plan("Adam", amsgrad=True)
    run = mod.kernel(plan, dtype)
    (module,) = fake_cupy.modules
    assert set(mod.NVRTC_OPTIONS) <= set(module.options) and "--fmad=false" in module.options
    src = codegen.cuda_source(plan, dtype)
    assert module.code == src.source
    used = codegen._c_used(plan)
    scalars = run.prepare(h, 2)
    vec = 16 // np.dtype(dtype).itemsize
    for misalign, kernel, per_thread in ((0, src.main, vec), (8, src.unaligned, 1),
                                         (4, src.unaligned, 1)):
        _FakeCupy.launches.clear()
        arrays = _arrays(plan, n, misalign=misalign)
        run(arrays, scalars)
        (launch,) = _FakeCupy.launches
        assert launch["kernel"] == kernel, (misalign, launch["kernel"])
        assert launch["block"] == (mod.THREADS,) and mod.THREADS == 256
        threads = -(-n // per_thread)
        assert launch["grid"] == (max(1, -(-threads // 256)),), (n, misalign, launch["grid"])
        args = launch["args"]
        assert list(args[:len(used)]) == [arrays[plan.arrays.index(a)] for a in used]
        assert list(args[len(used):-1]) == list(scalars)
        assert [type(s) for s in args[len(used):-1]] == [np.dtype(dtype).type] * len(scalars)
        assert type(args[-1]) is np.int64 and args[-1] == n


def test_device_scalar_kernels(fake_cupy):
    """Capturable mode: the device-scalar kernel gets the scalar array instead of scalars;
    misaligned arrays are refused before anything is launched; ``advance`` runs one thread."""
    mod = _backend("cupy")
    plan, _ = _plan("Adam")
    run = mod.kernel(plan, "float32")
    src = codegen.cuda_source(plan, "float32")
    k_dev = _Array(len(plan.scalars), 0x10)
    arrays = _arrays(plan, 4096)
    run.device(arrays, k_dev)
    (launch,) = _FakeCupy.launches
    assert launch["kernel"] == src.device
    assert launch["args"][-2] is k_dev and launch["args"][-1] == 4096
    _FakeCupy.launches.clear()
    with pytest.raises(ValueError, match="16-byte aligned"):
        run.device(_arrays(plan, 4096, misalign=4), k_dev)
    assert _FakeCupy.launches == []
    run.advance(_Array(8, 0x20), _Array(1, 0x30), _Array(4, 0x40))
    (launch,) = _FakeCupy.launches
    assert launch["kernel"] == src.advance and launch["grid"] == (1,) == launch["block"]


# ----------------------------------------------------------------------------- many arrays

def _group(plan, rng, sizes, base=0x7F0000000000):
    """(ptrs, sizes, rows, scalars) for a group of tensors: distinct 16-byte aligned device
    addresses (one misaligned tensor), rows at different steps."""
    n = len(sizes)
    ptrs = np.array([[base + (i << 36) + (j << 30) + (4 if i == 1 else 0)
                      for j in range(len(plan.arrays))] for i in range(n)], np.int64)
    rows = rng.integers(0, 3, n).astype(np.int64)
    return ptrs, np.asarray(sizes, np.int64), rows


def _scalar_rows(run, h, dtype, steps=(1, 2, 3)):
    return np.array([run.prepare(h, t) for t in steps], dtype=dtype)


@pytest.mark.parametrize("rule_name, opts", CASES, ids=[f"{r}{o or ''}" for r, o in CASES])
def test_many_launches_once_on_the_current_stream(rule_name, opts, fake_cupy, rng):
    """``run.many``: one launch for the whole group, and every upload (the chunk table the
    first time, the packed pointer table every time) on the caller's current stream."""
    mod = _backend("cupy")
    plan, h = _plan(rule_name, **opts)
    run = mod.kernel(plan, "float32")
    sizes = [5000, 0, 3, 70_000, 1]
    ptrs, sizes, rows = _group(plan, rng, sizes)
    scalars = _scalar_rows(run, h, "float32")
    for stream in (fake_cupy.cuda.ExternalStream(0xABC0), fake_cupy.cuda.ExternalStream(0xDEF0)):
        _FakeCupy.launches.clear()
        _FakeCupy.uploads.clear()
        with stream:
            run.many(ptrs, sizes, rows, scalars)
        assert [L["stream"] for L in _FakeCupy.launches] == [stream], (
            f"launched on {[L['stream'] for L in _FakeCupy.launches]}; expected one launch on "
            f"the caller's current stream {stream}")
        assert _FakeCupy.uploads and all(u.stream is stream for u in _FakeCupy.uploads), (
            f"uploads on {[u.stream for u in _FakeCupy.uploads]}; expected {stream}")


NORM_CASES = [("LAMB", {}), ("LARS", {"weight_decay": 1e-2})]


@pytest.mark.parametrize("rule_name, opts", NORM_CASES, ids=[r for r, _ in NORM_CASES])
def test_norms_reduce_then_update_on_the_current_stream(rule_name, opts, fake_cupy, rng):
    """A rule taking norms (LAMB, LARS), one array or many: the sums are zeroed on the
    caller's stream, the reduction kernel adds into them, the update kernel reads them: two
    launches on that stream, in that order, the same table, chunks and sums, nothing waiting
    on the host (no synchronisation after the first upload of a chunk table)."""
    mod = _backend("cupy")
    plan, h = _plan(rule_name, **opts)
    run = mod.kernel(plan, "float32")
    src = codegen.cuda_multi_source(plan, "float32")
    assert src.reduce
    ptrs, sizes, rows = _group(plan, rng, [5000, 0, 3, 70_000])
    scalars = _scalar_rows(run, h, "float32")
    calls = [lambda: run.many(ptrs, sizes, rows, scalars),
             lambda: run(_arrays(plan, 10_000, misalign=4), scalars[0])]
    for call, n in zip(calls, (len(sizes), 1)):
        for stream in (fake_cupy.cuda.ExternalStream(0xABC0), fake_cupy.cuda.ExternalStream(0xDEF0)):
            _FakeCupy.launches.clear()
            _FakeCupy.uploads.clear()
            with stream:
                call()
            red, upd = _FakeCupy.launches
            assert (red["kernel"], upd["kernel"]) == (src.reduce, src.name)
            assert red["stream"] is stream and upd["stream"] is stream
            assert red["args"][:4] == upd["args"][:4] and red["args"][4] is upd["args"][4]
            sums = red["args"][4]
            assert isinstance(sums, _Zeros) and sums.stream is stream
            assert sums.size == n * len(plan.norms) and sums.dtype == np.float64
            assert red["grid"] == upd["grid"] and red["block"] == (mod.THREADS,)


def test_norms_capturable_kernels_and_no_elementwise_kernel(fake_cupy):
    """LAMB on cupy-elementwise: refused. Capturable: per array, the device reduction (the
    reduction's arrays, k_dev, n, the sums, the verdict or a null pointer; a block's
    partial each, at most NORM_BLOCKS), one warp adding the partials in order, then the
    update reading k_dev and the sums, all on the current stream; a sums array too small
    for the partials: refused before any launch."""
    plan, h = _plan("LAMB")
    with pytest.raises(ValueError, match="'cupy-elementwise' backend cannot compute"):
        _backend("cupy_elementwise").kernel(plan, "float32")
    run = _backend("cupy").kernel(plan, "float32")
    src = codegen.cuda_source(plan, "float32")
    arrays, k_dev = _arrays(plan, 100_000), _Array(len(plan.scalars), 0x10)
    mod = _backend("cupy")
    need = mod.norm_scratch(len(plan.norms), 100_000)
    assert need == len(plan.norms) * (1 + 391)
    for small in (None, _Array(need - 1, 0x20)):
        with pytest.raises(ValueError, match="float64 device array"):
            run.device(arrays, k_dev, sums=small)
    assert not _FakeCupy.launches
    sums, guard = _Array(need, 0x20), _Array(4, 0x30)
    side = fake_cupy.cuda.ExternalStream(0xABC0)
    with side:
        run.device(arrays, k_dev, sums=sums)
        run.device_guard(arrays, k_dev, guard, sums=sums)
    red, fin, upd, red2, fin2, upd2 = _FakeCupy.launches
    assert all(x["stream"] is side for x in _FakeCupy.launches)
    reads = [arrays[plan.arrays.index(a)] for a in plan.reduce_reads]
    assert red["kernel"] == red2["kernel"] == src.reduce_dev
    assert list(red["args"]) == reads + [k_dev, 100_000, sums, 0]
    assert red2["args"][-1] is guard and red["grid"] == (391,)
    assert fin["kernel"] == src.reduce_dev_finish and fin["grid"] == (1,) == (fin["block"][0] // 32,)
    assert list(fin["args"]) == [sums, 391, 0] and fin2["args"][-1] is guard
    assert mod.norm_scratch(1, 10**9) == 1 + mod.NORM_BLOCKS
    assert mod.norm_scratch(1, 300) == 1 + codegen.FORMAT_REDUCE_WARPS     # (a format's warps)
    assert upd["kernel"] == src.device and upd["args"][-3:] == (k_dev, 100_000, sums)
    assert upd2["kernel"] == src.device_guard and upd2["args"][-4:] == (k_dev, 100_000, sums,
                                                                        guard)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_many_launch_configuration(dtype, fake_cupy, rng):
    """The multi-tensor kernel of ``codegen.cuda_multi_source`` (its own module, hwoptim's
    NVRTC options), one block of 256 threads per chunk; arguments: the packed table (the
    pointers exactly as passed, then the rows, then the scalars in ``dtype``), the chunk
    table, then n_tensors and n_chunks as 64-bit integers. The chunk table is uploaded
    (and the stream synchronised) once per distinct sizes; the packed table every call."""
    mod = _backend("cupy")
    plan, h = _plan("Adam", amsgrad=True)
    run = mod.kernel(plan, dtype)
    src = codegen.cuda_multi_source(plan, dtype)
    chunk = mod.MULTI_CHUNK_BYTES // np.dtype(dtype).itemsize
    sizes = [int(x) for x in np.exp(rng.uniform(0, np.log(40_000), 30))] + [0, chunk, chunk + 1]
    ptrs, sizes, rows = _group(plan, rng, sizes)
    scalars = _scalar_rows(run, h, dtype)
    want_chunks = codegen.chunk_table(sizes, chunk)
    n_chunks = want_chunks.shape[0]
    for call in range(3):
        _FakeCupy.launches.clear()
        _FakeCupy.uploads.clear()
        _FakeCupy.syncs.clear()
        rows = rng.integers(0, len(scalars), len(sizes)).astype(np.int64)
        run.many(ptrs, sizes, rows, scalars)
        (launch,) = _FakeCupy.launches
        multi = [m for m in fake_cupy.modules if m.code == src.source]
        assert len(multi) == 1 and set(mod.NVRTC_OPTIONS) <= set(multi[0].options)
        assert launch["kernel"] == src.name
        assert launch["block"] == (mod.THREADS,) and launch["grid"] == (n_chunks,)
        table, chunks_dev, n, nc = launch["args"]
        assert type(n) is np.int64 and n == len(sizes)
        assert type(nc) is np.int64 and nc == n_chunks
        assert isinstance(table, _Upload) and table in _FakeCupy.uploads
        words = table.host
        assert words.dtype == np.int64
        na = len(plan.arrays)
        assert np.array_equal(words[:len(sizes) * na].reshape(len(sizes), na), ptrs), (
            "the uploaded pointer table differs from ptrs")
        assert np.array_equal(words[len(sizes) * na:len(sizes) * (na + 1)], rows)
        got = words[len(sizes) * (na + 1):].view(dtype)[:scalars.size]
        assert np.array_equal(got.reshape(scalars.shape).view(np.uint8),
                              scalars.astype(dtype).view(np.uint8))
        assert np.array_equal(chunks_dev.host, want_chunks)
        if call == 0:
            assert _FakeCupy.uploads == [chunks_dev, table], "expected two uploads at first"
            assert _FakeCupy.syncs == [_FakeCupy.current], (
                "the first upload of a chunk table must be synchronised on the current stream")
        else:
            assert _FakeCupy.uploads == [table], "the chunk table was uploaded again"
            assert _FakeCupy.syncs == []


def test_many_refuses_bad_input_before_anything_runs(fake_cupy, rng):
    mod = _backend("cupy")
    plan, h = _plan("Adam")
    run = mod.kernel(plan, "float32")
    ptrs, sizes, rows = _group(plan, rng, [10, 20, 30])
    scalars = _scalar_rows(run, h, "float32")
    bad = [(ptrs[:, :2], sizes, rows, scalars, ValueError),
           (ptrs, sizes, rows[:2], scalars, ValueError),
           (ptrs, sizes, rows, scalars[:, :2], ValueError),
           (ptrs, sizes, np.array([0, 3, 1]), scalars, IndexError),
           (ptrs, sizes, np.array([0, -1, 1]), scalars, IndexError)]
    for args in bad:
        with pytest.raises(args[-1]):
            run.many(*args[:-1])
    assert _FakeCupy.launches == [] and _FakeCupy.uploads == []
    run.many(ptrs, np.zeros(3, np.int64), rows, scalars)        # all empty: nothing to do
    run.many(ptrs[:0], sizes[:0], rows[:0], scalars)
    assert _FakeCupy.launches == [] and _FakeCupy.uploads == []


def test_many_drops_old_chunk_tables_only_when_the_device_is_done(fake_cupy, rng):
    """Chunk tables are kept for the last few distinct size lists; dropping one (its device
    copy may still be read by a kernel queued on another stream) synchronises the device."""
    mod = _backend("cupy")
    plan, h = _plan("SGD")
    run = mod.kernel(plan, "float32")
    scalars = _scalar_rows(run, h, "float32")
    keep = run.many_tables.keep
    for i in range(keep):
        ptrs, sizes, rows = _group(plan, rng, [100 + i, 7])
        run.many(ptrs, sizes, rows, scalars)
    assert "device" not in _FakeCupy.syncs
    ptrs, sizes, rows = _group(plan, rng, [99, 7])
    run.many(ptrs, sizes, rows, scalars)
    assert _FakeCupy.syncs.count("device") == 1
    assert len(_FakeCupy.launches) == keep + 1


FORMAT_CASES = [("Adam", "bfloat16_sint8_sr"), ("SGD", "float16_sfloat32_master"),
                ("LAMB", "float16_sbfloat16")]


@pytest.mark.parametrize("rule_name, key", FORMAT_CASES, ids=[f"{r}-{k}" for r, k in FORMAT_CASES])
def test_storage_formats_launch_the_format_module(rule_name, key, fake_cupy, rng):
    """A storage format (``codegen.cuda_format_source``): one array or many, every launch is
    its multi-tensor kernel (after its reduction kernel for LAMB) on the current stream, one
    256-thread block per chunk of 4096 elements (whole int8 blocks, never across 2**32), the
    packed table holding each tensor's addresses in ``Format.arrays`` order (absmax, master
    copy, stochastic-rounding key included), its row and the float32 scalars; capturable
    steps launch its device-scalar kernel over a table uploaded once (LAMB: after the
    device reduction and its finishing warp)."""
    from hwoptim.formats import Format
    mod = _backend("cupy")
    plan, h = _plan(rule_name, **({"momentum": 0.9} if rule_name == "SGD" else {}))
    fmt = Format.parse(key)
    run = mod.kernel(plan, key)
    src = codegen.cuda_format_source(plan, fmt)
    assert [m.code for m in fake_cupy.modules] == []             # built when first launched
    names = fmt.arrays(plan.arrays)
    sizes = [5000, 0, 3, 70_000]
    ptrs = np.array([[0x7F0000000000 + (i << 36) + (j << 30) for j in range(len(names))]
                     for i in range(len(sizes))], np.int64)
    rows = np.array([2, 0, 1, 1], np.int64)
    scalars = np.array([run.prepare(h, t) for t in (1, 2, 3)], np.float32)
    stream = fake_cupy.cuda.ExternalStream(0xABC0)
    with stream:
        run.many(ptrs, np.asarray(sizes, np.int64), rows, scalars)
    assert [m.code for m in fake_cupy.modules] == [src.source]
    kernels = [src.reduce, src.name] if plan.norms else [src.name]
    assert [L["kernel"] for L in _FakeCupy.launches] == kernels
    chunks = codegen.chunk_table(sizes, mod.FORMAT_CHUNK)
    assert mod.FORMAT_CHUNK % 256 == 0 and 2**32 % mod.FORMAT_CHUNK == 0
    for L in _FakeCupy.launches:
        assert L["stream"] is stream and L["block"] == (mod.THREADS,)
        assert L["grid"] == (len(chunks),)
        table, chunk_dev, n, n_chunks = L["args"][:4]
        assert (n, n_chunks) == (len(sizes), len(chunks))
        assert np.array_equal(chunk_dev.host, chunks)
        words = table.host
        assert np.array_equal(words[:ptrs.size].reshape(ptrs.shape), ptrs)
        assert np.array_equal(words[ptrs.size:ptrs.size + len(sizes)], rows)
        got = words[ptrs.size + len(sizes):].view(np.float32)[:scalars.size]
        assert np.array_equal(got, scalars.reshape(-1))
    _FakeCupy.launches.clear()
    one = [_Array(10_000, 0x7F0000000000 + (j << 30) + 2) for j in range(len(names))]
    run(one, scalars[0])                       # one array (any alignment): a table of one
    assert [L["kernel"] for L in _FakeCupy.launches] == kernels
    assert _FakeCupy.launches[-1]["args"][2] == 1
    _FakeCupy.launches.clear()
    with pytest.raises(ValueError, match=r"ptrs \(n, %d\)" % len(names)):
        run.many(ptrs[:, :-1], np.asarray(sizes, np.int64), rows, scalars)
    assert _FakeCupy.launches == []
    # capturable: the device-scalar kernel over a table made once per param (the key column
    # holds the param's number); for rules taking norms, first the device reduction (a
    # block per chunk, each warp's partial into the sums after the K totals) and the warp
    # adding the partials, then the update reading the sums
    k_dev, step_dev = _Array(len(plan.scalars), 0x10), _Array(1, 0x18)
    guard = _Array(4, 0x20)
    sr = (2**40 + 3, step_dev, 5) if fmt.sr else None
    sums = None
    if plan.norms:
        need = mod.norm_scratch(len(plan.norms), 10_000)
        for small in (None, _Array(need - 1, 0x40)):
            with pytest.raises(ValueError, match="float64 device array"):
                run.device(one, k_dev, sums=small, sr=sr)
        assert _FakeCupy.launches == []
        sums = _Array(need, 0x40)
    uploads = len(_FakeCupy.uploads)
    with stream:
        run.device(one, k_dev, sums=sums, sr=sr)
        run.device_guard(one, k_dev, guard, sums=sums, sr=sr)
    assert len(_FakeCupy.uploads) == uploads + 2          # its table and chunks, once
    if plan.norms:
        red, fin, a, red2, fin2, b = _FakeCupy.launches
        assert red["kernel"] == red2["kernel"] == src.reduce_dev and red["grid"] == (3,)
        assert red["block"] == (mod.THREADS,) and red["stream"] is stream
        assert list(red["args"][4:]) == [k_dev, 0, sums] and red2["args"][5] is guard
        assert red["args"][:4] == a["args"][:4]
        assert fin["kernel"] == src.reduce_dev_finish and fin["grid"] == (1,)
        assert fin["block"] == (32,) and list(fin["args"]) == [sums, 24, 10_000, 0]
        assert fin2["args"][3] is guard
        assert a["args"][-1] is sums and b["args"][-1] is sums
    else:
        a, b = _FakeCupy.launches
    assert a["kernel"] == b["kernel"] == src.device and a["stream"] is stream
    table, chunk_dev, n, n_chunks, kd, sd, g, lo, hi = a["args"][:9]
    assert (n, n_chunks, kd) == (1, 3, k_dev) and g == 0 and b["args"][6] is guard
    row = table.host[:len(names)]
    assert list(row) == [5 if x == "_srkey" else one[j].data.ptr for j, x in enumerate(names)]
    if fmt.sr:
        assert sd is step_dev and (lo, hi) == (3, 2**8)
    _FakeCupy.launches.clear()
    run.advance(_Array(8, 0x30), step_dev, k_dev)          # the plain module's, in float32
    (adv,) = _FakeCupy.launches
    assert adv["kernel"] == codegen.cuda_source(plan, "float32").advance


class _Shaped(_Array):
    def __init__(self, shape, ptr):
        super().__init__(int(np.prod(shape)), ptr)
        self.shape = tuple(shape)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16_sint8_master",
                                   "bfloat16_sbfloat16_sr"])
@pytest.mark.parametrize("shape", [(3, 37, 45), (70, 1), (1, 1100)])
def test_staged_launches_in_order(shape, dtype, fake_cupy):
    """A factored Adafactor param: the staged module's kernels, each once, in its launch
    order, on the caller's stream; every kernel gets the same arguments (the arrays in the
    format's order, the sums' scratch arrays of the sizes ``codegen.staged_scratch`` gives,
    an int8 state's float32 scratch, B, m, n as int64, the scalars in the compute dtype); a
    warp per tile, result or block of 256, a thread per stored element; an empty matrix
    launches nothing."""
    from hwoptim.formats import Format
    mod = _backend("cupy")
    rule = RULES["Adafactor"]
    fmt = Format.parse(dtype)
    cd = np.dtype(fmt.compute)
    h = {n: hy.default for n, hy in rule.hypers.items()}
    h["eps"] = (1e-7, 1e-3)
    flags = rule.array_flags(rule.static_flags(h, dict(rule.options)), shape)
    plan = codegen.plan(rule, flags)
    run = mod.kernel(plan, dtype)
    k = codegen.cuda_staged_source(plan, dtype)
    scalars = run.prepare(h, 4)
    B = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    m, n = shape[-2:]
    shapes = {"param": shape, "grad": shape, "row_var": shape[:-1] + (1,),
              "col_var": shape[:-2] + (1, n), "master": shape, "_srkey": (1,)}
    shapes.update({f"{a}_absmax": (-(-int(np.prod(shapes[a])) // 256),)
                   for a in ("row_var", "col_var")})
    arrays = [_Shaped(shapes[a], 0x7F0000000000 + (j << 32))
              for j, a in enumerate(fmt.arrays(plan.arrays))]
    side = fake_cupy.cuda.ExternalStream(0xABC0)
    with side:
        run(arrays, scalars)
    L = _FakeCupy.launches
    assert [x["kernel"] for x in L] == [name for name, _, _ in k.launches]
    assert all(x["stream"] is side for x in L) and all(x["block"] == (256,) for x in L)
    vs, ps = codegen.staged_scratch(plan, B, m, n)
    ts = codegen.staged_quant_scratch(plan, fmt, B, m, n)
    assert ts == ([B * m, B * n] if fmt.quantized else [])
    na, nv = len(arrays), len(vs)
    args = L[0]["args"]
    assert all(x["args"] is args or x["args"] == args for x in L)
    assert list(args[:na]) == arrays
    assert [(a.size, a.dtype) for a in args[na:na + nv]] == [(v, cd) for v in vs]
    assert [(a.size, a.dtype) for a in args[na + nv:na + nv + len(ps)]] == \
        [(q, np.dtype(np.float64)) for q in ps]
    at = na + nv + len(ps)
    assert [(a.size, a.dtype) for a in args[at:at + len(ts)]] == \
        [(t, np.dtype(np.float32)) for t in ts]
    tail = args[at + len(ts):]
    assert [type(x) for x in tail[:3]] == [np.int64] * 3 and list(tail[:3]) == [B, m, n]
    assert all(type(x) is cd.type for x in tail[3:])
    assert list(tail[3:]) == [cd.type(x) for x in scalars]
    tiles = B * -(-m // 32) * -(-n // 32)
    threads = {"bcr": B * m * n, "br": B * m, "bc": B * n}
    kinds = [kind for _, kind, _ in k.launches]
    assert kinds.count("quant") == len(ts) and kinds[-len(ts) - 3:][:3] == ["store"] * 3
    for x, (_, kind, what) in zip(L, k.launches):
        work = (32 * tiles if kind == "sweep" else threads[what] if kind == "store"
                else 32 * -(-ts[what] // 256) if kind == "quant" else 32 * vs[what])
        assert x["grid"] == (-(-work // 256),), (x["kernel"], x["grid"], work)
    L.clear()
    empty = {**shapes, "param": (0, 5), "grad": (0, 5)}
    run([_Shaped(empty[a], 0x10 * (j + 1)) for j, a in enumerate(fmt.arrays(plan.arrays))],
        scalars)
    assert L == []


def _stride_cases():
    from hwoptim import formats
    out = []
    for name, rule in RULES.items():
        if rule.shape_flags is not None and name != "Adafactor":
            continue
        plan, _ = _plan(name)
        out.append(pytest.param(plan, None, id=f"{name}-plain"))
        for sd, sr in ((None, False), ("int8", True), ("bfloat16", False)):
            fmt = formats.make("float16", sd, False, sr)
            out.append(pytest.param(plan, fmt, id=f"{name}-{fmt.key}"))
    return out


@pytest.mark.parametrize("plan, fmt", _stride_cases())
def test_kernels_read_the_table_as_the_backend_packs_it(plan, fmt):
    """Every multi-tensor kernel (update and reduction) reads its tensor's addresses, rows
    and scalars at the strides the backend packs them with (``many``: one address per
    column, ``fmt.arrays`` for a storage format, then a row per tensor, then the scalars).
    Found wanting once: format kernels stepped through the table by the plain plan's
    column count, reading a state's absmax address as the row."""
    import re
    src = (codegen.cuda_multi_source(plan, "float32") if fmt is None
           else codegen.cuda_format_source(plan, fmt)).source
    cols = len(plan.arrays if fmt is None else fmt.arrays(plan.arrays))
    kernels = [k for k in src.split('extern "C" __global__')[1:]
               if "const long long* __restrict__ table" in k]     # (not the norms' finish)
    assert kernels
    for k in kernels:
        assert re.findall(r"table \+ t \* (\d+)", k) == [str(cols)], k[:200]
        tabs = re.findall(r"table \+ n_tensors \* (\d+)", k)
        if "k_dev" in k.split(")")[0]:       # capturable: the scalars from k_dev
            assert tabs == [], tabs
        elif plan.scalars:
            assert tabs == [str(cols), str(cols + 1)], (tabs, cols)
