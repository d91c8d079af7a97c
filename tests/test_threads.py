"""A step is all-or-nothing, and hwoptim is a good neighbour: TBB loads from a plain venv,
children of fork() can step, several Python threads can step at once on every threading
layer, and each thread's set_num_threads decides its own serial/parallel cutoff.

Processes are real (subprocess, os.fork); a fault inside a kernel build is injected by
raising from the disk cache's first call, the one place every build goes through."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import hwoptim
from hwoptim.testing import random_values

pytestmark = pytest.mark.skipif("numba" not in hwoptim.backends.available(),
                                reason="needs the numba backend")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(hwoptim.__file__)))
BIG = 200_000            # above every rule's serial cutoff: the parallel kernel


def _run(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter (no LD_LIBRARY_PATH, the test's cache folder);
    the last line it prints is JSON."""
    e = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD")}
    e.update(env)
    e["PYTHONPATH"] = os.pathsep.join([ROOT, e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=e,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["stderr"] = r.stderr
    return out


def _tbb_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return bool(version("tbb"))
    except PackageNotFoundError:
        return False


@pytest.mark.skipif(not _tbb_installed(), reason="the tbb wheel is not installed here (it is "
                    "a dependency on x86-64 only)")
def test_tbb_runs_from_a_plain_environment():
    out = _run("""
        import json, hwoptim, numpy as np
        w = np.ones(200_000, np.float32)
        hwoptim.Adam(w).step(np.ones_like(w))
        print(json.dumps(hwoptim.threading_layer()))
    """)
    assert out["layer"] == "tbb", out
    assert "work stealing" in out["why"]


_FORK = """
    import json, os, warnings, numpy as np, hwoptim
    rng = np.random.default_rng(1)
    w = rng.standard_normal(200_000); g = rng.standard_normal(200_000)
    opt = hwoptim.Adam(w.copy(), lr=0.01)
    opt.step(g)                                   # the parent ran a parallel kernel
    ref = hwoptim.Adam(w.copy(), lr=0.01, backend="numpy"); ref.step(g); ref.step(g)
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(g)
        ok = bool(np.allclose(opt._params[0], ref._params[0], rtol=1e-12, atol=0))
        os.write(wfd, json.dumps({"ok": ok, "threads": hwoptim.get_num_threads(),
                                  "warned": [str(c.message) for c in caught]}).encode())
        os._exit(0)
    os.close(wfd)
    _, status = os.waitpid(pid, 0)
    child = json.loads(os.read(r, 100000) or b"{}")
    print(json.dumps({"status": status, "child": child,
                      "layer": hwoptim.threading_layer()["layer"]}))
"""


@pytest.mark.parametrize("layer", ["default", "omp"])
def test_a_forked_child_can_step(layer):
    """With GNU OpenMP a child used to die: 'fork() called from a process already using GNU
    OpenMP, this is unsafe.'"""
    out = _run(_FORK, NUMBA_THREADING_LAYER=layer)
    assert out["status"] == 0 and out["child"]["ok"], out
    if out["layer"] == "omp":
        assert out["child"]["threads"] == 1
        assert any("forked" in m for m in out["child"]["warned"]), out
    else:
        assert out["layer"] == "tbb" and out["child"]["threads"] > 1, out


_THREADS = """
    import json, threading, numpy as np, hwoptim
    rng = np.random.default_rng(2)
    ws = [rng.standard_normal(200_000) for _ in range(4)]
    gs = [rng.standard_normal(200_000) for _ in range(4)]
    alone = []
    for w, g in zip(ws, gs):
        o = hwoptim.Adam(w.copy(), lr=0.01)
        for _ in range(30): o.step(g)
        alone.append(o._params[0])
    opts = [hwoptim.Adam(w.copy(), lr=0.01) for w in ws]
    def run(o, g):
        for _ in range(30): o.step(g)
    ts = [threading.Thread(target=run, args=(o, g)) for o, g in zip(opts, gs)]
    [t.start() for t in ts]; [t.join() for t in ts]
    same = all(np.array_equal(o._params[0], a) for o, a in zip(opts, alone))
    print(json.dumps({"same": same, "layer": hwoptim.threading_layer()["layer"]}))
"""


@pytest.mark.parametrize("layer", ["default", "omp", "workqueue"])
def test_concurrent_steps_from_python_threads(layer):
    """With the workqueue layer this used to abort the process ('Concurrent access')."""
    out = _run(_THREADS, NUMBA_THREADING_LAYER=layer)
    assert out["same"], out
    assert out["layer"] == ("tbb" if layer == "default" else layer)


def test_the_serial_cutoff_follows_the_calling_threads_setting(rng):
    w = random_values(rng, (BIG,))
    opt = hwoptim.Adam(w)
    kern = opt._kernels()[0]
    seen = {}

    def one_thread():
        hwoptim.set_num_threads(1)
        opt.step(random_values(rng, (BIG,)))
        seen["one"] = opt._entries[0]

    t = threading.Thread(target=one_thread)
    t.start()
    t.join()
    opt.step(random_values(rng, (BIG,)))             # this thread keeps its threads
    seen["main"] = opt._entries[0]
    if hwoptim.threads.max_threads() > 1:
        assert seen["main"] is kern.launcher(BIG, hwoptim.get_num_threads())
        assert seen["main"] is not seen["one"]
    assert seen["one"] is kern.launcher(BIG, 1)
    assert kern.serial_below(1) == float("inf")


# ----------------------------------------------------------------------------- all or nothing

def _snap(opt):
    return ([p.tobytes() for p in opt._params],
            [{k: v.tobytes() for k, v in st.items()} for st in opt.state], opt.step_count)


def test_a_failing_kernel_build_changes_nothing(rng, monkeypatch, tmp_path):
    """A build that fails for the second group's kernel (here Ctrl-C while compiling) used
    to leave the first group updated and the step count advanced."""
    from hwoptim import optim
    from hwoptim.backends import diskcache, numba as nb
    monkeypatch.setattr(nb, "_kernels", {})           # build again, in this test
    monkeypatch.setattr(optim, "_kernels", {})
    monkeypatch.setenv("HWOPTIM_CACHE_DIR", str(tmp_path))
    calls = []
    real = diskcache.first_call

    def interrupted(mod, dispatcher, args):
        calls.append(mod.__name__)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(mod, dispatcher, args)

    monkeypatch.setattr(diskcache, "first_call", interrupted)
    small, big = random_values(rng, (100,)), random_values(rng, (BIG,))
    opt = hwoptim.SGD([{"params": [small]}, {"params": [big], "momentum": 0.9}], lr=0.1)
    grads = [random_values(rng, (100,)), random_values(rng, (BIG,))]
    before = _snap(opt)
    with pytest.raises(KeyboardInterrupt):
        opt.step(grads)
    assert _snap(opt) == before and len(calls) == 2
    opt.step(grads)                                   # the next try builds and steps
    assert opt.step_count == 1 and not np.array_equal(small.tobytes(), before[0][0])


def test_numba_disable_jit_makes_the_backend_unavailable():
    out = _run("""
        import json, hwoptim, numpy as np
        w = np.ones(10)
        opt = hwoptim.SGD(w, lr=0.5); opt.step(np.ones(10))
        print(json.dumps({"why": hwoptim.backends.unavailable("numba"),
                          "picked": opt.backend_name, "w": float(w[0])}))
    """, NUMBA_DISABLE_JIT="1")
    assert out["picked"] == "numpy" and out["w"] == 0.5
    assert "NUMBA_DISABLE_JIT" in out["why"]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_array_subclasses_are_refused(backend, rng):
    """np.matrix used to be updated in its first row only (numba), masked arrays failed
    inside NumPy after the step count advanced."""
    w = random_values(rng, (4, 5))
    for bad in (np.matrix(w), np.ma.masked_array(w, mask=w > 0)):
        with pytest.raises(TypeError, match="subclass"):
            hwoptim.Adam(bad, backend=backend)
    opt = hwoptim.Adam(w, backend=backend)
    before = _snap(opt)
    for bad in (np.matrix(random_values(rng, (4, 5))), np.ma.masked_array(w.copy())):
        with pytest.raises(TypeError, match=r"grads\[0\].*subclass"):
            opt.step(bad)
        assert _snap(opt) == before


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_grad_changed_in_place_is_checked_again(backend, rng):
    """The fast path for a grad seen last step used to look at shape and contiguity only."""
    w = random_values(rng, (64,)).astype(np.float32)
    g = random_values(rng, (64,)).astype(np.float32)
    opt = hwoptim.Adam(w, backend=backend)
    opt.step(g)
    opt.step(g)
    before = _snap(opt)
    g.dtype = np.int32                                 # same bytes, another dtype
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype int32"):
        opt.step(g)
    g.dtype = np.float32
    g.shape = (8, 8)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(8, 8\)"):
        opt.step(g)
    g.shape = (64,)
    g2 = np.empty(128, np.float32)[::2]
    g2[...] = g
    with pytest.raises(ValueError, match="C-contiguous"):
        opt.step(g2)
    assert _snap(opt) == before
    with pytest.raises(ValueError, match="resize"):
        g.resize(128)                                  # the memory of a seen grad stays put
