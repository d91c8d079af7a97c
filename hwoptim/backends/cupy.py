"""The GPU backend: CUDA kernels printed from the spec, launched through CuPy.

``codegen.cuda_source`` prints one ``RawModule``: the per-element update function, a
vectorised grid-stride kernel (16-byte loads and stores), an element-wise kernel for
misaligned arrays, a variant that reads its per-step scalars from device memory (for CUDA
graph capture) and a one-thread kernel that advances those scalars on the device. Kernels
run on CuPy's current device and stream. The same source is compiled with NVRTC and the
update function run as C++ in every CI run (tests/test_cuda_source.py).
"""
import numpy as np

from .. import codegen

FAMILY = "cuda"
THREADS = 256
# Added to CuPy's own NVRTC options (-ftz=true, -arch=sm_XX). No FMA contraction: the
# kernels are memory-bound, so it costs nothing, and a result then no longer depends on
# where the compiler inlined the update (vector loop or tail: seen to differ by an ulp
# with contraction on an H100), and float64 results equal the NumPy reference bit for bit.
NVRTC_OPTIONS = ("--fmad=false",)
_sm_count = {}


def unavailable():
    try:
        import cupy
    except ImportError as e:
        return f"cupy is not installed ({e}); pip install 'hwoptim[gpu]'"
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "no CUDA device is visible"
    except Exception as e:  # CUDARuntimeError without a driver
        return f"no usable CUDA driver or device ({e})"
    return None


def _blocks(work: int) -> int:
    import cupy
    dev = cupy.cuda.runtime.getDevice()
    if dev not in _sm_count:
        _sm_count[dev] = cupy.cuda.runtime.getDeviceProperties(dev)["multiProcessorCount"]
    # one 16-byte vector per thread (measured on an H100: capping the grid at 32 blocks per
    # SM and looping left 5% of copy bandwidth unused); the loop only matters past 2^31 blocks
    return max(1, min(-(-work // THREADS), 2**31 - 1))


def used_indices(plan) -> tuple:
    used = codegen._c_used(plan)
    return tuple(plan.arrays.index(a) for a in used)


def kernel(plan, dtype):
    import cupy
    k = codegen.cuda_source(plan, dtype)
    module = cupy.RawModule(code=k.source, options=NVRTC_OPTIONS)
    idx = used_indices(plan)
    funcs = {}

    def fn(name):
        key = (cupy.cuda.runtime.getDevice(), name)
        if key not in funcs:
            funcs[key] = module.get_function(name)
        return funcs[key]

    def run(arrays, scalars):
        n = arrays[0].size
        args = [arrays[i] for i in idx]
        if all(a.data.ptr % 16 == 0 for a in args):
            fn(k.main)((_blocks(-(-n // k.vec)),), (THREADS,), (*args, *scalars, np.int64(n)))
        else:
            fn(k.unaligned)((_blocks(n),), (THREADS,), (*args, *scalars, np.int64(n)))

    def run_device(arrays, k_dev):
        """Like ``run``, with the per-step scalars read from the device array ``k_dev``."""
        n = arrays[0].size
        args = [arrays[i] for i in idx]
        if not all(a.data.ptr % 16 == 0 for a in args):
            raise ValueError("capturable steps need 16-byte aligned arrays (CuPy allocations "
                             "and hwoptim.FlatParams views are)")
        fn(k.device)((_blocks(-(-n // k.vec)),), (THREADS,), (*args, k_dev, np.int64(n)))

    def advance(hyper_dev, step_dev, k_dev):
        """On the device: step += 1, then the per-step scalars from the hyperparameters."""
        fn(k.advance)((1,), (1,), (hyper_dev, step_dev, k_dev))

    run.prepare = codegen.host_scalar_function(plan, dtype)   # (h, t) -> typed scalars
    run.device, run.advance, run.source = run_device, advance, k.source
    return run


def full(like, value):
    import cupy
    with like.device:
        return cupy.full(like.shape, value, dtype=like.dtype)


def to_host(a):
    return a.get()


def copy_from_host(dst, src):
    dst.set(np.ascontiguousarray(src, dtype=dst.dtype))


def address(a):
    return (f"cuda:{a.device.id}", a.data.ptr, a.data.ptr + a.nbytes)
