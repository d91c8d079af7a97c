"""The CPU backend: Numba ``@njit(parallel=True)`` kernels printed from the spec.

Each kernel is written to a real ``.py`` file in the cache folder (``HWOPTIM_CACHE_DIR``,
default ``~/.cache/hwoptim``) and imported from there, so Numba's ``cache=True`` keeps the
machine code on disk and a new process does not recompile. Scalars are typed arguments:
a new learning rate or step never recompiles. Constants are typed globals, so float32
math stays float32.
"""
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from .. import codegen
from .numpy import address, copy_from_host, full, to_host  # noqa: F401  (same host arrays)

FAMILY = "host"

# Below this many elements one thread beats waking the pool (measured: see bench/).
SERIAL_BELOW = int(os.environ.get("HWOPTIM_SERIAL_BELOW", 32768))


def unavailable():
    try:
        import numba  # noqa: F401
    except ImportError as e:
        return f"numba is not installed ({e}); pip install numba"
    return None


def cache_dir() -> Path:
    root = os.environ.get("HWOPTIM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "hwoptim")
    return Path(root) / "numba"


def load_module(source: str, stem: str):
    """Import generated ``source`` from a file named after its content."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    name = f"hwoptim_kernel_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(source)
        os.replace(tmp, path)          # atomic: a concurrent process never sees half a file
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def kernel(plan, dtype):
    mod = load_module(codegen.numba_source(plan, dtype), f"{plan.key}_{dtype}")
    parallel, serial = mod.parallel, mod.serial

    def run(arrays, scalars):
        f = serial if arrays[0].shape[0] < SERIAL_BELOW else parallel
        f(*arrays, *scalars)
    run.prepare = codegen.host_scalar_function(plan, dtype)   # (h, t) -> typed scalars
    run.parallel, run.serial = parallel, serial
    return run
