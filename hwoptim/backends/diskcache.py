"""Where the Numba backend keeps its generated kernels: one ``.py`` file per kernel in the
cache folder (``HWOPTIM_CACHE_DIR``, default ``~/.cache/hwoptim``), with Numba's own index
and machine-code files beside it in ``__pycache__``.

The Numba backend uses three calls: :func:`folder`, :func:`load_module` and
:func:`first_call`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path


def folder() -> Path | None:
    """The folder for kernel files, or ``None`` to keep no disk cache."""
    root = os.environ.get("HWOPTIM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "hwoptim")
    return Path(root) / "numba"


def load_module(make_source, stem: str):
    """The kernel module for ``make_source(cache)`` (generated source; ``cache``: whether
    the kernels may use Numba's disk cache), imported from a file named after its content."""
    source = make_source(True)
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    name = f"hwoptim_kernel_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    where = folder()
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(source)
        os.replace(tmp, path)          # atomic: a concurrent process never sees half a file
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def first_call(mod, dispatcher, args) -> None:
    """Call ``dispatcher`` (a kernel of ``mod``) once with ``args``, so that it is compiled,
    or loaded from Numba's disk cache, for their types."""
    dispatcher(*args)
