"""The native classes take any writable DLPack array, zero-copy: torch CPU tensors (and
``torch.nn.Parameter``s, through ``detach()``) as params and grads, updated in place at their
own address, with results equal to the same run on NumPy arrays; other exporters through
``numpy.from_dlpack``; arrays that cannot be updated in place refused with the reason.
(Torch CUDA tensors: tests/test_gpu.py.)"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import hwoptim
from hwoptim.rules import RULES
from hwoptim.testing import option_sets, random_values

from conftest import import_torch

BACKENDS = [b for b in ("numpy", "numba") if b in hwoptim.backends.available()]


class _Exporter:
    """A minimal DLPack exporter of another library (its memory is a NumPy array's)."""

    def __init__(self, a):
        self._a = a
        self.shape, self.dtype = a.shape, a.dtype

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rule", list(RULES.values()), ids=list(RULES))
def test_torch_tensors_updated_in_place(rule, dtype, backend, rng, torch):
    opts = option_sets(rule)[-1][1]
    shapes = [(7, 5), (13,), (1,)]
    init = [random_values(rng, s, dtype) for s in shapes]
    ts = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]   # requires grad
    ptrs = [t.data_ptr() for t in ts]
    nps = [a.copy() for a in init]
    ot = getattr(hwoptim, rule.name)(ts, backend=backend, **opts)
    on = getattr(hwoptim, rule.name)(nps, backend=backend, **opts)
    assert ot.param_groups[0]["params"][0] is ts[0]          # the caller's objects
    for step in range(6):
        gs = [random_values(rng, s, dtype) for s in shapes]
        # torch grads, new tensors or the same ones; a single-kind mix also works
        tg = [torch.from_numpy(g.copy()) for g in gs]
        if step % 3 == 2:
            tg[1] = gs[1].copy()
        ot.step(tg)
        on.step(gs)
    assert [t.data_ptr() for t in ts] == ptrs
    for t, a in zip(ts, nps):
        assert np.array_equal(t.detach().numpy(), a)
    for st_t, st_n in zip(ot.state, on.state):
        for k in st_n:
            assert np.array_equal(st_t[k], st_n[k]), k


def test_other_dlpack_exporters(rng):
    p = random_values(rng, (50,))
    ref = p.copy()
    opt = hwoptim.SGD(_Exporter(p), lr=0.1, momentum=0.9)
    same = hwoptim.SGD(ref, lr=0.1, momentum=0.9)
    for _ in range(3):
        g = random_values(rng, (50,))
        opt.step(_Exporter(g.copy()))
        same.step(g)
    assert np.array_equal(p, ref)           # the exporter's memory was updated


def test_refused_exports_change_nothing(rng, torch):
    p = torch.from_numpy(random_values(rng, (6,)))
    before = p.clone()
    # read-only
    ro = random_values(rng, (6,))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        hwoptim.Adam(_Exporter(ro))
    # an immutable library's arrays
    Jax = type("ArrayImpl", (_Exporter,), {"__module__": "jax._src.array"})
    with pytest.raises(TypeError, match="immutable"):
        hwoptim.Adam(Jax(random_values(rng, (6,))))
    # a dtype hwoptim does not update (bfloat16, which NumPy cannot take from DLPack, is
    # a storage format: tests/test_formats.py)
    with pytest.raises(TypeError, match="expected float32, float64, float16 or bfloat16"):
        hwoptim.Adam(torch.zeros(6, dtype=torch.int32))
    # mixed dtypes, and grads of the wrong dtype or shape: as for NumPy arrays
    with pytest.raises(TypeError, match="one dtype"):
        hwoptim.Adam([p, torch.zeros(3, dtype=torch.float32)])
    opt = hwoptim.Adam([p])
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype float32"):
        opt.step([torch.zeros(6, dtype=torch.float32)])
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(5,\)"):
        opt.step([torch.zeros(5, dtype=torch.float64)])
    with pytest.raises(ValueError, match="not C-contiguous"):
        opt.step([torch.zeros(12, dtype=torch.float64)[::2]])
    assert torch.equal(p, before) and opt.step_count == 0
    # params and grads that share memory are refused as with NumPy arrays
    with pytest.raises(ValueError, match="overlaps"):
        opt.step([p])


def test_detection_imports_nothing():
    """Taking NumPy arrays imports neither torch nor CuPy."""
    code = ("import sys, numpy as np, hwoptim; o = hwoptim.Adam(np.zeros(4)); "
            "o.step(np.ones(4)); print(sorted(m for m in ('torch', 'cupy', 'jax') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out


def test_a_torch_model_trains_through_the_native_class(rng):
    """A torch MLP's parameters, stepped by hwoptim.Adam with its grads after backward():
    the same float64 run as torch.optim.Adam."""
    torch = import_torch()
    torch.manual_seed(0)
    x = torch.from_numpy(random_values(rng, (64, 10)))
    y = torch.from_numpy(random_values(rng, (64, 1)))

    def model():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(),
                                   torch.nn.Linear(16, 1)).double()
    a, b = model(), model()
    ours = hwoptim.Adam(list(a.parameters()), lr=1e-2)
    theirs = torch.optim.Adam(b.parameters(), lr=1e-2)
    for _ in range(30):
        for m in (a, b):
            m.zero_grad()
            ((m(x / 100) - y / 1000) ** 2).mean().backward()
        ours.step([p.grad for p in a.parameters()])
        theirs.step()
    for p, q in zip(a.parameters(), b.parameters()):
        d = float(((p - q).abs().max() / q.abs().max()).detach())
        assert d <= 1e-12, d
