"""The GPU backend as a CuPy ``ElementwiseKernel``: the spec's update function as the
kernel's preamble, one call to it as the operation. Kept beside the ``RawModule`` backend
(``cupy``) as its yardstick: CuPy builds the indexing, the spec builds the math."""
from .. import codegen
from .cupy import NVRTC_OPTIONS, address, copy_from_host, full, to_host, unavailable  # noqa: F401

FAMILY = "cuda"


def kernel(plan, dtype):
    import cupy
    from .cupy import refuse_norms
    refuse_norms(plan, "cupy-elementwise")
    used = codegen._c_used(plan)
    ins = [a for a in used if a not in plan.outputs]
    outs = [a for a in used if a in plan.outputs]
    ek = cupy.ElementwiseKernel(
        ", ".join([f"{dtype} {a}" for a in ins] + [f"{dtype} k_{s}" for s in plan.all_scalars]),
        ", ".join(f"{dtype} {a}" for a in outs),
        f"{plan.key}_update({', '.join(list(used) + [f'k_{s}' for s in plan.all_scalars])})",
        name=f"hw_{plan.key}_{dtype}_ew",
        preamble=codegen._typedefs(codegen.dtypes_for(dtype)) + codegen.c_update_function(plan),
        no_return=True, options=NVRTC_OPTIONS)
    i_in = [plan.arrays.index(a) for a in ins]
    i_out = [plan.arrays.index(a) for a in outs]


    def run(arrays, scalars):
        ek(*[arrays[i] for i in i_in], *scalars, *[arrays[i] for i in i_out])
    run.prepare = codegen.host_scalar_function(plan, dtype)   # (h, t) -> typed scalars
    return run
