"""What every GPU measurement needs: the device and its properties, the stream and its
event timer, random data, torch (where it has CUDA), and the run's time budget."""
from __future__ import annotations

import gc
import inspect
import sys
import time

import numpy as np

THREADS = 256
GiB = 1 << 30


class Context:
    """CuPy's current device, as the measurements see it. ``quick``: fewer repeats."""

    def __init__(self, quick: bool = False):
        import cupy
        self.cupy = cupy
        self.quick = quick
        self.dev = cupy.cuda.runtime.getDevice()
        props = cupy.cuda.runtime.getDeviceProperties(self.dev)
        name = props.get("name", b"GPU")
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.sm = int(props.get("multiProcessorCount", 0)) or 1
        self.l2 = int(props.get("l2CacheSize", 0)) or 50 * 2**20
        self.mem = int(props.get("totalGlobalMem", 0))
        self.stream = cupy.cuda.get_current_stream()
        self.timer = cupy_timer(self.stream)
        self.rng = cupy.random.default_rng(12345)
        try:
            import torch
            self.torch = torch if torch.cuda.is_available() else None
            self.torch_version = torch.__version__
        except ImportError:
            self.torch, self.torch_version = None, None

    def busy(self):
        """Queue about half a millisecond of device work on the current stream (torch's
        current stream too, where neither was changed: both are the default stream)."""
        if getattr(self, "_busy", None) is None:
            self._busy = self.cupy.zeros(1 << 26, dtype=self.cupy.float32)
        for _ in range(4):
            self._busy *= 1.0

    def torch_has(self, rule, impl) -> bool:
        """Whether torch has ``rule`` (with ``fused=`` for torch-fused); fused kernels that
        torch rejects on this device are recorded as errors, not skipped."""
        if self.torch is None or rule.torch is None:
            return False
        params = inspect.signature(getattr(self.torch.optim, rule.torch)).parameters
        return ("fused" if impl == "torch-fused" else "foreach") in params

    def device_info(self) -> dict:
        cupy = self.cupy
        free, total = cupy.cuda.Device(self.dev).mem_info
        return {"name": self.name, "driver": cupy.cuda.runtime.driverGetVersion(),
                "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
                "cupy": cupy.__version__, "torch": self.torch_version,
                "sm_count": self.sm, "l2_bytes": self.l2, "memory_bytes": total,
                "memory_free_bytes": free, "python": sys.version.split()[0]}

    def blocks(self, work):
        return max(1, min(-(-work // THREADS), self.sm * 32))

    def fill_normal(self, a):
        try:
            self.rng.standard_normal(dtype=a.dtype, out=a)
        except (TypeError, ValueError, NotImplementedError):
            a[...] = self.cupy.random.standard_normal(a.shape, dtype=a.dtype)
        return a

    def normal(self, shape, dtype):
        return self.fill_normal(self.cupy.empty(shape, dtype=dtype))

    def positive(self, a):
        """Fill ``a`` (a state buffer) with values in [0.5, 1.5): nonzero, valid for every
        state (second moments must be >= 0)."""
        try:
            self.rng.random(dtype=a.dtype, out=a)
        except (TypeError, ValueError, NotImplementedError):
            a[...] = self.cupy.random.random(a.shape, dtype=a.dtype)
        a += 0.5
        return a


class Budget:
    """Sections that would start after ``budget_s`` seconds are skipped and listed."""

    def __init__(self, budget_s: float | None, progress=None):
        self.t0 = time.perf_counter()
        self.deadline = None if budget_s is None else self.t0 + budget_s
        self.progress = progress or (lambda msg: None)
        self.skipped = []

    def over(self, what) -> bool:
        if self.deadline is not None and time.perf_counter() > self.deadline:
            self.skipped.append(what)
            self.progress(f"skipped (time budget): {what}")
            return True
        return False


def free():
    """Give CuPy's and torch's cached device memory back between measurements."""
    import cupy
    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def is_oom(e: BaseException) -> bool:
    import cupy
    if isinstance(e, cupy.cuda.memory.OutOfMemoryError):
        return True
    name = type(e).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(e).lower()


def error_text(e: BaseException) -> str:
    """What a record says about a failed measurement."""
    return "out of memory" if is_oom(e) else f"{type(e).__name__}: {e}"[:300]


def cupy_timer(stream):
    import cupy

    def make():
        return cupy.cuda.Event()

    def record(e):
        e.record(stream)

    def elapsed(a, b):
        return cupy.cuda.get_elapsed_time(a, b) / 1e3
    return make, record, elapsed


def torch_timer():
    import torch

    def make():
        return torch.cuda.Event(enable_timing=True)

    def record(e):
        e.record()

    def elapsed(a, b):
        return a.elapsed_time(b) / 1e3
    return make, record, elapsed


def time_steps(step, n_sets, warmup, repeats, timer) -> float:
    """Median seconds per ``step(i)`` (``i``: which buffer set) between CUDA events."""
    make, record, elapsed = timer
    for i in range(warmup):
        step(i % n_sets)
    marks = [(make(), make()) for _ in range(repeats)]
    for i, (a, b) in enumerate(marks):
        record(a)
        step((warmup + i) % n_sets)
        record(b)
    marks[-1][1].synchronize()
    return float(np.median([elapsed(a, b) for a, b in marks]))


def n_sets_for(set_bytes: int, l2_bytes: int, cap: int = 64) -> int:
    """Buffer sets to rotate among so that their total is at least twice the L2 cache."""
    return max(1, min(cap, -(-2 * l2_bytes // max(1, set_bytes))))
