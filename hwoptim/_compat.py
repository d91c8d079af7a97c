"""Module paths from before the benchmark and the lesson had their own subpackages.

``import hwoptim.landscapes``, ``from hwoptim import batching`` or ``hwoptim.report`` give the
module at its new path (the same object, not a copy), imported only when asked for: a
finder on ``sys.meta_path`` answers for the old names alone, and ``hwoptim.__getattr__``
for attribute access. ``python -m hwoptim.gpubench`` still runs the GPU benchmark.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

MOVED = {
    "hwoptim.landscapes": "hwoptim.lesson.landscapes",
    "hwoptim.trajectories": "hwoptim.lesson.trajectories",
    "hwoptim.batching": "hwoptim.lesson.batching",
    "hwoptim.viz": "hwoptim.lesson.viz",
    "hwoptim.report": "hwoptim.bench",
    "hwoptim.gpubench": "hwoptim.bench.gpu",
}

# old names that ran as ``python -m NAME``: the module whose ``main()`` they run now
RUNNABLE = {"hwoptim.gpubench": "hwoptim.bench.gpu.cli"}


class _Alias(importlib.abc.Loader):
    """Loads an old name as the module at its new path."""

    def __init__(self, target: str):
        self.target = target
        self.target_spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.target_spec = module.__spec__
        return module

    def exec_module(self, module):
        # the import system gave the module the old name's spec; it keeps its own
        module.__spec__ = self.target_spec

    def get_code(self, fullname):
        """What ``python -m`` runs for an old name."""
        main = RUNNABLE.get(fullname)
        if main is None:
            raise ImportError(f"{fullname} moved to {MOVED[fullname]} and has no command")
        return compile(f"import sys\nfrom {main} import main\nsys.exit(main())\n",
                       f"<{fullname}: {main}>", "exec")


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


_FINDER = _Finder()


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)


def module_getattr(name: str):
    """``hwoptim.<old name>`` as an attribute: imports the moved module."""
    if f"hwoptim.{name}" in MOVED:
        return importlib.import_module(f"hwoptim.{name}")
    raise AttributeError(f"module 'hwoptim' has no attribute {name!r}")
