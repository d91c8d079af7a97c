"""Arrays from other libraries, zero-copy: anything that exports DLPack (torch tensors, on the
CPU or a CUDA device, and every other array library that speaks the protocol) becomes a NumPy
or CuPy view of the same memory, so the kernels update the caller's array in place.

Nothing here imports an optional library the caller has not imported: detection looks at the
``__dlpack__`` and ``__dlpack_device__`` attributes only; CuPy is imported only to take a
CUDA array, which needs it.
"""
from __future__ import annotations

import sys

import numpy as np

_CPU, _CUDA, _CUDA_HOST, _CUDA_MANAGED = 1, 2, 3, 13
_IMMUTABLE = ("jax", "jaxlib", "tensorflow")


def _lib(a) -> str:
    return type(a).__module__.split(".")[0]


def foreign(a) -> bool:
    """Whether ``a`` is an array to take through DLPack (not NumPy's, not CuPy's)."""
    if isinstance(a, np.ndarray):
        return False
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(a, cp.ndarray):
        return False
    return hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__")


def _name(a) -> str:
    dt = getattr(a, "dtype", None)
    return f"a {type(a).__module__}.{type(a).__name__}" + (f" of dtype {dt}" if dt else "")


def as_array(a, what: str):
    """A NumPy (CPU) or CuPy (CUDA) view of the memory of DLPack exporter ``a`` (a torch
    tensor that requires grad through ``detach()``, the same memory); a clear error for what
    cannot be updated in place."""
    lib = _lib(a)
    if lib in _IMMUTABLE:
        raise TypeError(f"{what} is {_name(a)}: {lib} arrays are immutable, and hwoptim "
                        f"updates params in place; expected NumPy, CuPy or torch arrays (or "
                        f"any writable DLPack array)")
    if getattr(a, "requires_grad", False):
        a = a.detach()                # torch exports no tensor that requires grad: the
        # detached tensor is the same memory (a torch.nn.Parameter's, say)
    layout = getattr(a, "layout", None)
    if layout is not None and str(layout) != "torch.strided":
        raise TypeError(f"{what} is {_name(a)} with layout {layout}; expected a dense "
                        f"(strided) array")
    try:
        dev, dev_id = a.__dlpack_device__()
    except Exception as e:
        raise TypeError(f"{what} is {_name(a)} whose __dlpack_device__() failed ({e})") from None
    dev = int(dev)
    try:
        if dev in (_CPU, _CUDA_HOST):
            if lib == "torch" and str(a.dtype) == "torch.bfloat16":
                # NumPy takes no bfloat16 export: the bits, seen as ml_dtypes.bfloat16
                import torch
                from .formats import np_dtype
                out = a.view(torch.int16).numpy().view(np_dtype("bfloat16"))
            elif lib == "torch":
                out = a.numpy()              # the same view as np.from_dlpack, 4x cheaper
            else:
                out = np.from_dlpack(a)
        elif dev in (_CUDA, _CUDA_MANAGED):
            try:
                import cupy
            except ImportError:
                raise TypeError(f"{what} is {_name(a)} on a CUDA device, which hwoptim "
                                f"updates through CuPy; pip install 'hwoptim[gpu]'") from None
            with cupy.cuda.Device(int(dev_id)):
                out = cupy.from_dlpack(a)
        else:
            raise TypeError(f"{what} is {_name(a)} on DLPack device type {dev}; hwoptim runs "
                            f"on the CPU and on CUDA devices")
    except (BufferError, RuntimeError, ValueError, TypeError) as e:
        if isinstance(e, TypeError) and str(e).startswith(what):
            raise
        raise TypeError(f"{what} is {_name(a)}, which hwoptim cannot take as a float32 or "
                        f"float64 array ({type(e).__name__}: {e})") from None
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError(f"{what} is {_name(a)} exported read-only; expected a writable array "
                         f"(the update is in place)")
    return out


def torch_stream(arrays):
    """A context that makes CuPy launch on torch's current stream for the device of
    ``arrays`` (torch CUDA tensors), so the step is ordered with the caller's torch work and
    nothing synchronises; ``None`` when the arrays are not torch CUDA tensors."""
    first = arrays[0]
    if _lib(first) != "torch" or not getattr(first, "is_cuda", False):
        return None
    torch, cupy = sys.modules["torch"], sys.modules["cupy"]
    device = first.device

    def enter():
        s = torch.cuda.current_stream(device)
        return cupy.cuda.ExternalStream(s.cuda_stream, device.index)
    return enter
