"""Backends: where kernels run. A registry maps names to backends, says which are usable
here and why not, and picks one for a group of arrays.

A backend is a module with ``FAMILY`` (the array family it runs on: ``"host"`` for NumPy
arrays, ``"cuda"`` for CuPy arrays), ``unavailable()`` (``None``, or why it cannot run here)
and ``kernel(plan, dtype)`` returning ``run(arrays, scalars)``; plus the array helpers
``full``, ``to_host``, ``copy_from_host``. New backends call :func:`register`; the rule
specs never change.
"""
from __future__ import annotations

import importlib
import sys

import numpy as np

_REGISTRY = {
    "numpy": "hwoptim.backends.numpy",
    "numba": "hwoptim.backends.numba",
    "cupy": "hwoptim.backends.cupy",
    "cupy-elementwise": "hwoptim.backends.cupy_elementwise",
}
_PREFERENCE = {"host": ("numba", "numpy"), "cuda": ("cupy",)}
_loaded = {}
_why_not = {}


def register(name: str, module: str, prefer: bool = False) -> None:
    """Make the backend in ``module`` (import path) available as ``name``."""
    _REGISTRY[name] = module
    _loaded.pop(name, None)
    _why_not.pop(name, None)
    if prefer:
        fam = load(name).FAMILY
        _PREFERENCE[fam] = (name,) + tuple(n for n in _PREFERENCE.get(fam, ()) if n != name)


def names() -> tuple:
    """Every registered backend name, usable here or not."""
    return tuple(_REGISTRY)


def unavailable(name: str) -> str | None:
    """``None`` if backend ``name`` can run here, else the reason it cannot."""
    if name not in _REGISTRY:
        return f"no backend is called {name!r}; the backends are {', '.join(_REGISTRY)}"
    if name not in _why_not:
        try:
            mod = importlib.import_module(_REGISTRY[name])
            _why_not[name] = mod.unavailable()
            if _why_not[name] is None:
                _loaded[name] = mod
        except ImportError as e:
            _why_not[name] = f"{e}"
    return _why_not[name]


def available() -> tuple:
    """The backends usable on this machine, in registry order."""
    return tuple(n for n in _REGISTRY if unavailable(n) is None)


def load(name: str):
    """The backend module ``name``; ``ValueError`` saying why if it cannot run here."""
    why = unavailable(name)
    if why is not None:
        raise ValueError(f"backend={name!r} is not available here: {why}")
    return _loaded[name]


def family(array) -> str | None:
    """``"host"`` for a NumPy array, ``"cuda"`` for a CuPy array, else ``None``.

    Never imports CuPy: an array cannot be a CuPy array unless CuPy is already loaded.
    """
    if isinstance(array, np.ndarray):
        return "host"
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(array, cp.ndarray):
        return "cuda"
    return None


def pick(fam: str, requested: str | None):
    """The backend module for arrays of family ``fam``: ``requested``, or the fastest here."""
    if requested is not None:
        if not isinstance(requested, str) or requested not in _REGISTRY:
            raise ValueError(f"backend={requested!r} is unknown; expected None or one of "
                             f"{', '.join(repr(n) for n in _REGISTRY)}")
        mod = load(requested)
        if mod.FAMILY != fam:
            kind = {"host": "NumPy arrays", "cuda": "CuPy arrays"}
            raise TypeError(f"backend={requested!r} runs on {kind[mod.FAMILY]}, but the "
                            f"params are {kind.get(fam, fam)}; move them, or pick another "
                            f"backend")
        return mod
    for name in _PREFERENCE.get(fam, ()):
        if unavailable(name) is None:
            return load(name)
    raise ValueError(f"no backend is available for {fam} arrays: " + "; ".join(
        f"{n}: {unavailable(n)}" for n in _PREFERENCE.get(fam, ())))
