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


class _FakeCupy(types.ModuleType):
    current = None
    launches: list = []

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
            getDeviceProperties=lambda dev: {"multiProcessorCount": SM})
        self.cuda = types.SimpleNamespace(runtime=runtime, **vars(stream_mod))
        self.RawModule, self.ElementwiseKernel = RawModule, ElementwiseKernel


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = _FakeCupy()
    _FakeCupy.current = fake.cuda.Stream.null
    _FakeCupy.launches = []
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
