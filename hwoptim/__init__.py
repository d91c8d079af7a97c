"""hwoptim: gradient-descent update rules as fused kernels on the hardware at hand.

Each rule's math is written once (``hwoptim/rules``); NumPy, Numba and CuPy kernels are
generated from it. ``hwoptim.Adam(w, lr=1e-3).step(g)`` updates ``w`` in place.
"""
from . import _compat, backends
from .flat import FlatParams
from .threads import get_num_threads, set_num_threads, threading_layer
from .optim import Optimizer, make_optimizer_class
from .rules import RULES

__version__ = "0.1.0"

# old paths (hwoptim.report, hwoptim.landscapes, ...) of modules now in bench/ and lesson/
_compat.install()
__getattr__ = _compat.module_getattr

for _name, _rule in RULES.items():
    globals()[_name] = make_optimizer_class(_rule)

__all__ = ["FlatParams", "Optimizer", "get_num_threads", "set_num_threads", "threading_layer", "RULES", "backends", *RULES]
