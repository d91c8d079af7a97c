#!/usr/bin/env python3
"""Mutation check: plant plausible bugs, one at a time, and see whether the tests notice.

Each mutant below replaces one piece of text in one file of a temporary copy of the
checkout, then runs the tests that should catch it there (``python -m pytest -x``, with the
copy first on ``sys.path``). A mutant is *killed* when those tests fail, *survives* when they
pass. Every mutant's text must occur in its file exactly as written (``nth`` picks among
repeats), so a refactor that moves the code makes the script fail loudly instead of
planting nothing. Before the mutants, each test selection runs once on the unchanged copy:
a selection that fails there would "kill" every mutant and prove nothing.

    python ci/mutants.py            # every CPU mutant (about 15-25 minutes on 2 cores)
    python ci/mutants.py --quick    # a fixed sample, under 3 minutes: what .ci/run runs
    python ci/mutants.py --gpu      # the GPU-only mutants, against tests/test_gpu.py
    python ci/mutants.py --list     # the table, nothing run
    python ci/mutants.py --only adam-bc2-beta1,sgd-nesterov-b -j 2

Exit status: 0 when every mutant run was killed (equivalent mutants are listed with the
reason and not run), 1 when one survived, 2 when the setup failed (a mutant's text not
found, or a selection failing on the unchanged code).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600               # seconds per mutant run; a run past it counts as killed


@dataclass(frozen=True)
class Mutant:
    id: str
    area: str
    file: str
    old: str
    new: str
    tests: tuple            # pytest arguments, relative to the checkout
    why: str = ""           # the bug it stands for
    nth: int | None = None  # which occurrence of ``old`` (None: it must be unique)
    gpu: bool = False       # only a real GPU can tell: run by --gpu (ci/gpu-check)
    equivalent: str = ""    # the reason it cannot change any result; not run
    quick: bool = False     # in the --quick sample


ORACLE = ("tests/test_oracle.py",)
STATE = ("tests/test_state.py",)
LAUNCH = ("tests/test_cuda_launch.py",)
CPP = ("tests/test_cuda_source.py", "-k", "cpp")
ERRORS = ("tests/test_errors.py",)
GPU = ("tests/test_gpu.py",)

MUTANTS = [
    # ---------------------------------------------------------------- rule math
    Mutant("adam-bc2-beta1", "rule math", "hwoptim/rules/adam.py",
           "ops.sqrt(1 - beta2 ** t)", "ops.sqrt(1 - beta1 ** t)", ORACLE,
           "Adam's second bias correction with β₁ for β₂", quick=True),
    Mutant("adam-amsgrad-min", "rule math", "hwoptim/rules/adam.py",
           "ops.maximum(x.max_exp_avg_sq, v)", "ops.minimum(x.max_exp_avg_sq, v)", ORACLE,
           "AMSGrad keeps the running minimum"),
    Mutant("adam-decoupled-no-lr", "rule math", "hwoptim/rules/adam.py",
           "p * (1 - k.lr * k.weight_decay)", "p * (1 - k.weight_decay)", ORACLE,
           "decoupled weight decay not scaled by the learning rate"),
    Mutant("adam-m-lerp-beta", "rule math", "hwoptim/rules/adam.py",
           "x.exp_avg + (1 - k.beta1) * (g - x.exp_avg)", "x.exp_avg + k.beta1 * (g - x.exp_avg)",
           ORACLE, "first moment weighted by β₁ instead of 1-β₁"),
    Mutant("sgd-nesterov-b", "rule math", "hwoptim/rules/sgd.py",
           "g = g + k.momentum * buf if opt.nesterov else buf", "g = buf", ORACLE,
           "Nesterov steps with b instead of g + μb", quick=True),
    Mutant("sgd-dampened-first-step", "rule math", "hwoptim/rules/sgd.py",
           "ops.where(first, 1.0, 1 - h.dampening)", "1 - h.dampening", ORACLE,
           "the first momentum buffer dampened (torch: b₁ = g)"),
    Mutant("sgd-maximize-ignored", "rule math", "hwoptim/rules/sgd.py",
           "g = -x.grad if opt.maximize else x.grad", "g = x.grad", ORACLE,
           "SGD ignores maximize"),
    Mutant("adagrad-lr-decay-t", "rule math", "hwoptim/rules/adagrad.py",
           "(t - 1) * h.lr_decay", "t * h.lr_decay", ORACLE,
           "Adagrad's lr_decay one step off", quick=True),
    Mutant("adagrad-eps-in-root", "rule math", "hwoptim/rules/adagrad.py",
           "ops.sqrt(s) + k.eps", "ops.sqrt(s + k.eps)", ORACLE,
           "Adagrad's eps inside the root"),
    Mutant("adadelta-eps-outside", "rule math", "hwoptim/rules/adadelta.py",
           "ops.sqrt(x.acc_delta + k.eps)", "ops.sqrt(x.acc_delta) + k.eps", ORACLE,
           "Adadelta's eps outside the root"),
    Mutant("adadelta-old-delta", "rule math", "hwoptim/rules/adadelta.py",
           "(1 - k.rho) * delta * delta", "(1 - k.rho) * g * g", ORACLE,
           "Adadelta accumulates g² where Δ² belongs"),
    Mutant("rmsprop-maximize-ignored", "rule math", "hwoptim/rules/rmsprop.py",
           "g = -x.grad if opt.maximize else x.grad", "g = x.grad", ORACLE,
           "RMSprop ignores maximize"),
    Mutant("rmsprop-centered-no-mean", "rule math", "hwoptim/rules/rmsprop.py",
           "ops.maximum(v - m * m, 0.0)", "ops.maximum(v, 0.0)", ORACLE,
           "centered RMSprop forgets to subtract the squared mean"),
    Mutant("rmsprop-momentum-lr", "rule math", "hwoptim/rules/rmsprop.py",
           "out[\"param\"] = x.param - k.lr * buf", "out[\"param\"] = x.param - buf", ORACLE,
           "RMSprop with momentum steps without the learning rate"),
    Mutant("adamw-wd-default", "rule math", "hwoptim/rules/adamw.py",
           'Hyper(1e-2, doc="decoupled weight decay λ")',
           'Hyper(1e-3, doc="decoupled weight decay λ")', ("tests/test_oracle.py",),
           "AdamW's default weight decay differs from torch's 1e-2"),
    Mutant("nadam-mu-product-reset", "rule math", "hwoptim/rules/nadam.py",
           "mu_product = h.mu_product * mu", "mu_product = mu", ORACLE,
           "NAdam forgets its carried μ product (uses this step's μ alone)", quick=True),
    Mutant("asgd-eta-this-step", "rule math", "hwoptim/rules/asgd.py",
           "return dict(eta_now=h.eta,",
           "return dict(eta_now=h.lr / (1 + h.lambd * h.lr * t) ** h.alpha,",
           ORACLE, "ASGD's step size from this step's count, not the one the step before set"),
    Mutant("lamb-ratio-inverted", "rule math", "hwoptim/rules/lamb.py",
           "p_norm / u_norm))", "u_norm / p_norm))", ORACLE,
           "LAMB's trust ratio upside down", quick=True),
    Mutant("lars-norm-of-update", "rule math", "hwoptim/rules/lars.py",
           "p_norm, g_norm = ops.norm(x.param), ops.norm(g)",
           "p_norm, g_norm = ops.norm(x.param), ops.norm(d)",
           ("tests/test_reductions.py", "-k", "torchlars"),
           "LARS takes the norm of g + λp (optax's form), not of g (the paper's, torchlars')"),
    # ---------------------------------------------------------------- reductions, guard
    Mutant("reduce-sum-not-squared", "reductions", "hwoptim/codegen.py",
           'body += [f"_v{j} = np.float64({nm(e)})", f"_s{j} += _v{j} * _v{j}"]',
           'body += [f"_v{j} = np.float64({nm(e)})", f"_s{j} += abs(_v{j})"]',
           ("tests/test_backends.py", "-k", "each_step and LAMB"),
           "the Numba reduction pass sums |x| where the 2-norm needs x²"),
    Mutant("norms-of-first-chunk", "reductions", "hwoptim/backends/numba.py",
           "np.add.at(total, chunks.table[:, 0], out)", "total[:, :] = out[:1]",
           ("tests/test_reductions.py", "-k", "each_arrays_norms"),
           "a large array's norm from its first chunk alone"),
    Mutant("clip-factor-unclamped", "guard", "hwoptim/optim.py",
           "return min(1.0, opt.max_grad_norm / (norm + 1e-6))",
           "return opt.max_grad_norm / (norm + 1e-6)",
           ("tests/test_guard.py", "-k", "clip_grad_norm_then"),
           "max_grad_norm scales small grads up (torch clamps the factor at 1)", quick=True),
    Mutant("amp-found-inf-ignored", "loss scaling", "hwoptim/optim.py",
           "        skip = f != 0.0                              # NaN too",
           "        skip = False                              # NaN too",
           ("tests/test_amp.py", "-k", "found_inf_skips"),
           "a found_inf step goes ahead (GradScaler's overflow lands in the params)",
           quick=True),
    Mutant("amp-norm-of-scaled-grads", "loss scaling", "hwoptim/optim.py",
           "            sumsq *= inv_scale * inv_scale\n        return guard_verdict",
           "            pass\n        return guard_verdict",
           ("tests/test_amp.py", "-k", "scaled_step_is and 0.5 and Adam and numba"),
           "max_grad_norm clips by the scaled grads' norm (loss scale 2^16: everything "
           "clipped)"),
    Mutant("amp-scale-multiplied", "loss scaling", "hwoptim/optim.py",
           "        inv = 1.0 / s", "        inv = s",
           ("tests/test_amp.py", "-k", "scaled_step_is and None and SGD and numba"),
           "the grads multiplied by the loss scale instead of divided"),
    Mutant("skip-still-steps", "guard", "hwoptim/optim.py",
           "            if scale is None:                # a non-finite grad: the whole step is skipped\n"
           "                return",
           "            if scale is None:                # a non-finite grad: the whole step is skipped\n"
           "                scale = 1.0",
           ("tests/test_guard.py", "-k", "nonfinite_grad_skips and Adam"),
           "a non-finite grad is detected but the step runs anyway"),
    Mutant("stats-nan-blind", "guard", "hwoptim/codegen.py",
           '"            z += v * 0.0",', '"            z += 0.0",',
           ("tests/test_guard.py", "-k", "nonfinite_grad_skips and SGD and numba"),
           "the Numba stats pass never sees a NaN (skip_nonfinite blind on that backend)"),
    Mutant("carry-not-saved", "state copies", "hwoptim/optim.py",
           "        if self.rule.carry:\n            self._carry = carry\n",
           "", ("tests/test_state.py", "-k", "NAdam or ASGD"),
           "load_state_dict restores buffers but not the carried scalars"),
    # ---------------------------------------------------------------- distributed
    Mutant("sharded-mean-by-reciprocal", "distributed", "hwoptim/distributed.py",
           "self._xp.divide(self._recv, self.world, out=self._recv)",
           "self._xp.multiply(self._recv, 1.0 / self.world, out=self._recv)",
           ("tests/test_distributed.py", "-k", "averaged_grads and 3"),
           "grads averaged by multiplying by 1/R (DDP divides: different bits for R = 3)"),
    Mutant("sharded-no-all-gather", "distributed", "hwoptim/distributed.py",
           "                params[j][a:b] = full[at:at + b - a]\n",
           "                pass\n",
           ("tests/test_distributed.py", "-k", "averaged_grads and 2"),
           "each rank keeps only its own slice's update (params drift apart across ranks)"),
    Mutant("sharded-norms-local", "distributed", "hwoptim/distributed.py",
           "        total = every[0].copy()\n        for r in range(1, self.world):\n"
           "            total += every[r]\n",
           "        total = mine\n",
           ("tests/test_distributed.py", "-k", "averaged_grads and 2"),
           "LAMB/LARS take the norm of this rank's piece of a param, not of the whole param",
           quick=True),
    Mutant("sharded-guard-local", "distributed", "hwoptim/distributed.py",
           "return guard_verdict(inner, total, not every[:, 1].any())",
           "return guard_verdict(inner, sumsq, finite)",
           ("tests/test_distributed.py", "-k", "averaged_grads and 2"),
           "max_grad_norm/skip_nonfinite decided on this rank's slice alone (ranks disagree)"),
    Mutant("sharded-no-abort", "distributed", "hwoptim/distributed.py",
           "        if failed.any():     # some ranks", "        if False:     # some ranks",
           ("tests/test_distributed.py", "-k", "failing_inside"),
           "a rank that failed inside the update goes on to the all-gather as if it had not"),
    Mutant("sharded-no-timeout", "distributed", "hwoptim/distributed.py",
           "            if time.monotonic() - start > self.timeout:", "            if False:",
           ("tests/test_distributed.py", "-k", "never_arrives"),
           "a rank that never arrives leaves the others waiting forever"),
    Mutant("sharded-save-no-rename-guard", "distributed", "hwoptim/distributed.py",
           '            if old.is_dir() and old.name != version and old.name.startswith("v"):',
           '            if old.is_dir() and old.name.startswith("v"):',
           ("tests/test_distributed.py", "-k", "checkpoint"),
           "a save removes the version its own index names"),
    # ---------------------------------------------------------------- code printers
    Mutant("cuda-max-as-min", "code printer (C/CUDA)", "hwoptim/codegen.py",
           'cmp = ">" if e.op == "max" else "<"', 'cmp = "<" if e.op == "max" else "<"', CPP,
           "the C printer writes min for max (the NVRTC compile still passes)", quick=True),
    Mutant("c-operands-swapped", "code printer (C/CUDA)", "hwoptim/codegen.py",
           'return f"{a[0]} {_ARITH[e.op]} {a[1]}"', 'return f"{a[1]} {_ARITH[e.op]} {a[0]}"',
           CPP, "the C printer swaps the operands of - and /", nth=0),
    Mutant("reference-sign-nan", "rule math", "hwoptim/spec.py",
           "return np.where(x > 0, 1.0, np.where(x < 0, -1.0, 0.0)).astype(x.dtype)",
           "return np.sign(x)", ("tests/test_nonfinite.py", "-k", "Rprop and torch"),
           "the NumPy reference's sign() gives NaN for NaN, where torch's (and the compiled "
           "backends') give 0"),
    Mutant("sign-inverted", "rule math", "hwoptim/spec.py",
           'return _node("where", x > 0, 1.0, _node("where", x < 0, -1.0, 0.0))',
           'return _node("where", x > 0, -1.0, _node("where", x < 0, 1.0, 0.0))',
           ("tests/test_backends.py", "-k", "Rprop"),
           "the traced sign() every compiled backend prints is inverted (the NumPy "
           "reference's own sign is not)"),
    Mutant("numba-min-as-max", "code printer (Numba)", "hwoptim/codegen.py",
           '"min": "np.minimum"}', '"min": "np.maximum"}',
           ("tests/test_numba.py", "-k", "every_operation"),
           "the Numba printer writes maximum for minimum (no shipped rule uses minimum)"),
    Mutant("cuda-unaligned-kernel-vectorised", "code printer (C/CUDA)", "hwoptim/codegen.py",
           'kernel(base + "_unaligned", False, False)', 'kernel(base + "_unaligned", True, False)',
           ("tests/test_cuda_source.py", "-k", "test_rule_kernels_compile"),
           "the kernel for misaligned arrays makes 16-byte loads"),
    Mutant("cuda-tail-from-zero", "code printer (C/CUDA)", "hwoptim/codegen.py",
           'start = f"nv * {vec} + tid"', 'start = f"tid"', GPU,
           "the scalar tail loop starts at 0 and updates vectorised elements twice", gpu=True),
    Mutant("cuda-stride-one-block", "code printer (C/CUDA)", "hwoptim/codegen.py",
           "const long long stride = (long long)gridDim.x * blockDim.x;",
           "const long long stride = (long long)blockDim.x;", GPU,
           "the grid-stride loop strides by one block: elements updated several times",
           gpu=True, nth=0),
    Mutant("numba-fastmath-parallel", "code printer (Numba)", "hwoptim/codegen.py",
           "@njit(parallel={par}, cache={bool(cache)}, error_model='numpy', nogil=True)",
           "@njit(parallel={par}, fastmath={par}, cache={bool(cache)}, error_model='numpy', "
           "nogil=True)", ("tests/test_backends.py", "-k", "parallel_kernel_equals_serial"),
           "the parallel kernel compiled with fastmath", quick=True),
    Mutant("numba-where-swapped", "code printer (Numba)", "hwoptim/codegen.py",
           'return f"{a[1]} if {a[0]} else {a[2]}"', 'return f"{a[2]} if {a[0]} else {a[1]}"',
           ("tests/test_backends.py", "-k", "SGD"), "the Numba printer swaps where()'s branches"),
    Mutant("numba-untyped-constants", "code printer (Numba)", "hwoptim/codegen.py",
           'return [f"{name} = np.{dtype}({v!r})" for v, name in consts.items()]',
           'return [f"{name} = {v!r}" for v, name in consts.items()]',
           ("tests/test_numba.py", "-k", "fpext"),
           "bare Python constants promote float32 kernels to float64 math"),
    # ---------------------------------------------------------------- host scalars
    Mutant("host-scalars-in-dtype", "host scalars", "hwoptim/codegen.py",
           'lines.append(f"k_{n} = h[{n!r}]")', 'lines.append(f"k_{n} = _T(h[{n!r}])")',
           ("tests/test_backends.py", "-k", "rounded_once"),
           "per-step scalars computed in float32 for float32 params", quick=True),
    Mutant("param-groups-raw-values", "host scalars", "hwoptim/optim.py",
           "        for k, v in checked.items():\n            dict.__setitem__(group, k, v)",
           "        for k, v in changes.items():\n            dict.__setitem__(group, k, v)",
           ("tests/test_backends.py", "-k", "python_floats or float64"),
           "param_groups[i][k] = v stores NumPy scalars raw (float32 host math)", quick=True),
    Mutant("step-count-lags", "host scalars", "hwoptim/optim.py",
           "scal = [prep(hs[gi], t) for", "scal = [prep(hs[gi], t - 1 or 1) for",
           ORACLE, "the per-step scalars use the previous step's count"),
    # ---------------------------------------------------------------- validation order
    Mutant("step-advances-before-check", "validation order", "hwoptim/optim.py",
           "        flat = self._check_grads(grads)\n",
           "        self._step += 1\n        flat = self._check_grads(grads)\n"
           "        self._step -= 1\n",
           ERRORS, "a rejected step() still advances the step count", quick=True),
    Mutant("load-state-before-check", "validation order", "hwoptim/optim.py",
           "        new_groups = []\n        for gi, (mine, theirs)",
           "        self._step = int(step)\n        new_groups = []\n        for gi, (mine, theirs)",
           ERRORS + ("tests/test_groups.py",),
           "a rejected load_state_dict() still sets the step count"),
    Mutant("grad-dtype-unchecked", "validation order", "hwoptim/optim.py",
           "                    or g.dtype != p.dtype or g.shape != p.shape or not "
           "g.flags.c_contiguous\n",
           "                    or g.shape != p.shape or not g.flags.c_contiguous\n",
           ERRORS, "grads of another dtype are not refused"),
    Mutant("fastcheck-shape-ignored", "validation order", "hwoptim/_fastcheck.py",
           "        if nd != shape_nd[i]:\n            return i\n",
           "        if nd != shape_nd[i] and False:\n            return i\n",
           ("tests/test_many_arrays.py", "-k", "bad_grads"),
           "the many-array grad check ignores a wrong number of dims"),
    Mutant("fastcheck-overlap-never", "overlap checks", "hwoptim/optim.py",
           "    if s.size > 1 and np.any(s[1:] < e[:-1]):\n        return True\n",
           "    if s.size > 1 and np.any(s[1:] < e[:-1]) and False:\n        return True\n",
           ("tests/test_many_arrays.py", "-k", "bad_grads"),
           "many grads overlapping each other are not refused"),
    Mutant("multi-rows-ignored", "host scalars", "hwoptim/torch.py",
           "np.array([row_of[w[2]] for w in work], np.int64))",
           "np.zeros(len(work), np.int64))",
           ("tests/test_torch_dropin.py", "-k", "trains_like_torch and Adam and numba"),
           "the torch drop-in gives every tensor the first step count's scalars"),
    Mutant("step-bank-stale", "host scalars", "hwoptim/torch.py",
           "        if hit is None or hit[0] != ids:", "        if hit is None:",
           ("tests/test_torch_dropin.py", "-k", "step_counts"),
           "the drop-in keeps advancing step counts that were replaced by hand or loaded"),
    # ---------------------------------------------------------------- state copies
    Mutant("state-dict-views", "state copies", "hwoptim/backends/numpy.py",
           "return np.array(a, copy=True)", "return np.asarray(a)", STATE,
           "state_dict() returns views: a later step rewrites a checkpoint", quick=True),
    Mutant("load-adopts-arrays", "state copies", "hwoptim/optim.py",
           "                self.backend.copy_from_host(mine[k], v.view(mine[k].dtype))",
           "                dict.__setitem__(mine, k, v)", STATE,
           "load_state_dict() keeps the caller's arrays instead of copying into its buffers"),
    # ---------------------------------------------------------------- overlap checks
    Mutant("overlap-never", "overlap checks", "hwoptim/optim.py",
           "        if dev in end and s < end[dev]:\n            return owner[dev], label",
           "        if dev in end and s < end[dev] and False:\n            return owner[dev], label",
           ERRORS, "overlapping params or grads are never refused", quick=True),
    Mutant("overlap-touching", "overlap checks", "hwoptim/optim.py",
           "if dev in end and s < end[dev]:", "if dev in end and s <= end[dev]:", ERRORS,
           "arrays that merely touch (one ends where the next starts) count as overlapping"),
    Mutant("overlap-cache-ignores-spans", "overlap checks", "hwoptim/optim.py",
           "if spans != self._checked_spans:", "if self._checked_spans is None:", ERRORS,
           "grads that moved onto a param after the first step are not re-checked"),
    # ---------------------------------------------------------------- backend choice
    Mutant("prefer-numpy", "backend choice", "hwoptim/backends/__init__.py",
           '_PREFERENCE = {"host": ("numba", "numpy")', '_PREFERENCE = {"host": ("numpy", "numba")',
           ("tests/test_errors.py", "-k", "backend"),
           "NumPy arrays get the slow reference backend by default", quick=True),
    Mutant("family-mismatch-allowed", "backend choice", "hwoptim/backends/__init__.py",
           "        if mod.FAMILY != fam:\n", "        if mod.FAMILY != fam and False:\n",
           ("tests/test_errors.py", "-k", "backend"),
           "backend='cupy' accepted for NumPy arrays"),
    # ---------------------------------------------------------------- streams
    Mutant("cupy-null-stream", "streams", "hwoptim/backends/cupy.py",
           "        if all(a.data.ptr % 16 == 0 for a in args):\n            fn(k.main)",
           "        if all(a.data.ptr % 16 == 0 for a in args):\n"
           "          with cupy.cuda.Stream.null:\n            fn(k.main)", LAUNCH,
           "the CuPy backend launches on the null stream, not the current one", quick=True),
    Mutant("cupy-alignment-8", "streams", "hwoptim/backends/cupy.py",
           "if all(a.data.ptr % 16 == 0 for a in args):",
           "if all(a.data.ptr % 8 == 0 for a in args):", LAUNCH,
           "8-byte aligned arrays get the 16-byte vector kernel"),
    Mutant("cupy-ew-null-stream", "streams", "hwoptim/backends/cupy_elementwise.py",
           "        ek(*[arrays[i] for i in i_in], *scalars, *[arrays[i] for i in i_out])",
           "        with cupy.cuda.Stream.null:\n"
           "            ek(*[arrays[i] for i in i_in], *scalars, *[arrays[i] for i in i_out])",
           LAUNCH, "the ElementwiseKernel backend launches on the null stream"),
    Mutant("cupy-fmad-on", "streams", "hwoptim/backends/cupy.py",
           'NVRTC_OPTIONS = ("--fmad=false",)', "NVRTC_OPTIONS = ()", GPU,
           "FMA contraction on: GPU results differ from the host's by an ulp", gpu=True),
    # ---------------------------------------------------------------- thresholds
    Mutant("serial-cutoff-zero", "thresholds", "hwoptim/backends/numba.py",
           'SERIAL_WORK_BY_LAYER = {"omp": 128_000, "tbb": 512_000, "workqueue": 512_000}',
           'SERIAL_WORK_BY_LAYER = {"omp": 0, "tbb": 0, "workqueue": 0}',
           ("tests/test_numba.py", "-k", "small_arrays"),
           "every size runs the parallel kernel (small steps pay a pool wake-up)", quick=True),
    Mutant("test-tolerance-loose", "thresholds", "hwoptim/testing.py",
           "K_STEP = 2.0", "K_STEP = 2.0e6",
           ("tests/test_properties.py", "-k", "can_fail or bound_alone"),
           "the per-step tolerance loosened a millionfold: tests stop seeing real errors", quick=True),
    Mutant("max-step-off", "thresholds", "hwoptim/optim.py",
           "if t > _MAX_STEP:", "if t > _MAX_STEP + 1:", ERRORS,
           "one step past 2**53 allowed (the step count no longer exact as a float64)"),
    Mutant("cache-mode-group-write", "thresholds", "hwoptim/backends/diskcache.py",
           "    if st.st_mode & 0o022:\n        return f\"it is writable by",
           "    if st.st_mode & 0o002:\n        return f\"it is writable by",
           ("tests/test_cache.py",), "a group-writable kernel cache folder is trusted"),
    # storage formats (hwoptim/formats.py, the Numba conversions printed by codegen)
    Mutant("bf16-round-no-ties-to-even", "codegen", "hwoptim/codegen.py",
           "builder.and_(top, _c32(1))), _c32(16))",
           "_c32(0)), _c32(16))",
           ("tests/test_formats.py", "-k", "round_nearest"),
           "the kernels' bfloat16 rounding breaks ties upward, not to even", quick=True),
    Mutant("sr-bits-without-key", "codegen", "hwoptim/codegen.py",
           'return f"{f}({v}, _mix32(np.uint64({index}) ^ _kh))"',
           'return f"{f}({v}, _mix32(np.uint64({index})))"',
           ("tests/test_formats.py", "-k", "float32_step and stochastic and bfloat16"),
           "stochastic rounding draws the same bits every step (the key left out)"),
    Mutant("cuda-h-round-ties-up", "codegen", "hwoptim/codegen.py",
           "(a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13",
           "(a + 0x1000u - 0x38000000u) >> 13",
           ("tests/test_cuda_formats.py", "-k", "conversions"),
           "the GPU's float16 rounding breaks ties upward, not to even", quick=True),
    Mutant("cuda-int8-absmax-one-lane", "codegen", "hwoptim/codegen.py",
           'f"        A{j} = A{j} > hw_abs_bits({q}) ? A{j} : hw_abs_bits({q});"',
           'f"        A{j} = hw_abs_bits({q});"',
           ("tests/test_cuda_formats.py", "-k", "cpp_format and int8"),
           "the GPU's int8 block scale is the last element's |x|, not the block's largest"),
    Mutant("cuda-format-table-stride", "codegen", "hwoptim/codegen.py",
           "        text = _chunk_loop_head(p, name, sums, columns=len(used))",
           "        text = _chunk_loop_head(p, name, sums)",
           ("tests/test_cuda_launch.py", "-k", "table"),
           "the GPU's format kernels step through the packed table by the plain plan's column "
           "count (the bug fixed on 2026-12-05: int8 and SR tables have more columns)"),
    Mutant("cuda-staged-finish-skips", "codegen", "hwoptim/codegen.py",
           'f"for (long long x = lane; x < {cnt}; x += 32) "',
           'f"for (long long x = lane; x < {cnt}; x += 64) "',
           ("tests/test_cuda_staged.py", "-k", "cpp"),
           "the GPU's staged sums skip every other run of partials (Adafactor's factors)"),
    Mutant("cuda-guard-clip-drops-scale", "codegen", "hwoptim/codegen.py",
           "factor = inv * (c < 1.0 ? c : 1.0);",
           "factor = (c < 1.0 ? c : 1.0);",
           ("tests/test_cuda_guard.py", "-k", "decides"),
           "the device verdict clips the scaled grads but forgets the loss scale"),
    Mutant("int8-encode-truncates", "formats", "hwoptim/formats.py",
           "k = np.rint(a * _pow2(bias + 3 - e)).astype(np.int64)",
           "k = np.floor(a * _pow2(bias + 3 - e)).astype(np.int64)",
           ("tests/test_formats.py", "-k", "int8_error_bound"),
           "int8 codes truncated instead of rounded to nearest (twice the error bound)"),
    Mutant("master-not-stored", "codegen", "hwoptim/codegen.py",
           'stores += [f"master[i] = {v}", f"param[i] = {_nb_store(fmt, \'param\', v)}"]',
           'stores += [f"param[i] = {_nb_store(fmt, \'param\', v)}"]',
           ("tests/test_formats.py", "-k", "numba_is_the and SGD and master"),
           "the float32 master copy is never written back"),
    # Adafactor: the staged code generator and the rule's torch details
    Mutant("adafactor-python-max", "rules", "hwoptim/rules/adafactor.py",
           "denom = ops.where(ratio > 1.0, ratio, 1.0)", "denom = ops.maximum(1.0, ratio)",
           ("tests/test_adafactor.py", "-k", "non_finite"),
           "a NaN RMS(u) spreads to every element (torch's Python max keeps 1)", quick=True),
    Mutant("adafactor-lerp-far-end", "rules", "hwoptim/rules/adafactor.py",
           "b - (b - a) * (1 - w))", "b - (b - a) * w)",
           ("tests/test_adafactor.py", "-k", "torch_in_float64"),
           "torch's lerp for weights >= 0.5 weighted the wrong way"),
    Mutant("adafactor-eps-float64", "rules", "hwoptim/rules/adafactor.py",
           "float(np.finfo(dtype).eps)", "float(np.finfo(np.float64).eps)",
           ("tests/test_adafactor.py", "-k", "eps1_none"),
           "eps1=None resolved to float64's epsilon whatever the params' dtype"),
    Mutant("staged-cols-first-matrix", "codegen", "hwoptim/codegen.py",
           "for _kk in range(_b * _nbm, (_b + 1) * _nbm):", "for _kk in range(0, _nbm):",
           ("tests/test_adafactor.py", "-k", "torch_in_float64 and numba"),
           "every matrix of a batch takes the first matrix's column sums"),
    Mutant("staged-rms-count", "codegen", "hwoptim/codegen.py",
           "    return {_FULL: \"_B * _m * _n\", frozenset(\"br\"): \"_B * _m\"",
           "    return {_FULL: \"_m * _n\", frozenset(\"br\"): \"_B * _m\"",
           ("tests/test_adafactor.py", "-k", "torch_in_float64 and numba"),
           "an RMS over a batch of matrices divided by one matrix's size"),
    Mutant("staged-sr-row-index", "codegen", "hwoptim/codegen.py",
           'return [f"_ix = np.uint64({flat(k, elem)})",',
           'return [f"_ix = np.uint64(_c)",',
           ("tests/test_formats.py", "-k", "factored_step and stochastic and numba"),
           "stochastic rounding of a factored matrix draws each row's bits again (the "
           "column index, not the element's)"),
    Mutant("staged-master-not-stored", "codegen", "hwoptim/codegen.py",
           "            return [f\"{_at('master', k, elem)} = {v}\",\n",
           "            return [\n",
           ("tests/test_formats.py", "-k", "factored_step and master and numba"),
           "a factored matrix's float32 master copy is never written back"),
    Mutant("cuda-format-norm-finish-skips", "codegen", "hwoptim/codegen.py",
           'f"for (long long b = lane; b < n_parts; b += 32) "',
           'f"for (long long b = lane; b < n_parts; b += 64) "',
           ("tests/test_cuda_formats.py", "-k", "launch_with_norms"),
           "capturable norms in a format add every other run of the warps' partials"),
    Mutant("cuda-format-norm-rms-unscaled", "codegen", "hwoptim/codegen.py",
           "f\"sums[{j}] = {v}{' * (1.0 / (double)n_elements)' if kind == 'rms' else ''};\",",
           "f\"sums[{j}] = {v};\",",
           ("tests/test_cuda_formats.py", "-k", "launch_with_norms and Adafactor"),
           "a capturable RMS in a format left a sum of squares (Adafactor's vectors)"),
    Mutant("cuda-staged-quant-lane-max", "codegen", "hwoptim/codegen.py",
           '"    A[0] = A[0] > A[l] ? A[0] : A[l];",', '"    A[0] = A[l];",',
           ("tests/test_cuda_staged.py", "-k", "format_step and int8"),
           "the GPU's int8 factor blocks scaled by the last lane's largest |x|, not the "
           "block's (the C++ harness's lane loop stands for the shuffles)"),

]


def _find(text: str, m: Mutant) -> int:
    """Index of the mutant's occurrence of ``old`` in ``text``; raises if not as stated."""
    hits, i = [], text.find(m.old)
    while i >= 0:
        hits.append(i)
        i = text.find(m.old, i + 1)
    if not hits:
        raise SystemExit(f"mutant {m.id}: text not found in {m.file}:\n{m.old}")
    if m.nth is None and len(hits) > 1:
        raise SystemExit(f"mutant {m.id}: text occurs {len(hits)} times in {m.file}; "
                         f"set nth or make it unique")
    if (m.nth or 0) >= len(hits):
        raise SystemExit(f"mutant {m.id}: occurrence {m.nth} of {len(hits)} in {m.file}")
    return hits[m.nth or 0]


def _copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split("\n")
    for f in files:
        if not f or f.startswith("bench/results/") or not (ROOT / f).is_file():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)


def _env(copy: Path, cache: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + os.pathsep + env.get("PYTHONPATH", "")
    env["HWOPTIM_CACHE_DIR"] = str(cache)     # shared: kernel files are named by their source
    env.setdefault("HYPOTHESIS_PROFILE", "ci")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def _pytest(copy: Path, cache: Path, tests, timeout=TIMEOUT) -> tuple[str, float, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "--no-header", "-o", "addopts=", *tests]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=copy, env=_env(copy, cache), capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0, ""
    tail = (r.stdout + r.stderr).strip().splitlines()
    status = {0: "passed", 1: "failed"}.get(r.returncode, f"error (pytest exit {r.returncode})")
    if status == "passed" and not re.search(r"\b\d+ passed\b", r.stdout):
        status = "error (no test ran: all skipped?)"      # a pass that tested nothing
    return status, time.time() - t0, "\n".join(tail[-15:])


def run_one(m: Mutant, work: Path, cache: Path, tests=None) -> dict:
    copy = work / m.id
    _copy_tree(copy)
    path = copy / m.file
    text = path.read_text()
    i = _find(text, m)
    path.write_text(text[:i] + m.new + text[i + len(m.old):])
    tests = tests or m.tests
    status, secs, tail = _pytest(copy, cache, tests)
    shutil.rmtree(copy, ignore_errors=True)
    verdict = {"failed": "killed", "timeout": "killed (timeout)",
               "passed": "SURVIVED"}.get(status, status)
    return {"id": m.id, "area": m.area, "verdict": verdict, "seconds": round(secs, 1),
            "why": m.why, "tests": " ".join(tests), "tail": tail if verdict != "killed" else ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the fixed sample (.ci/run)")
    ap.add_argument("--gpu", action="store_true", help="the GPU-only mutants (with --only: "
                    "let GPU-only ones in)")
    ap.add_argument("--list", action="store_true", help="print the table and stop")
    ap.add_argument("--only", help="comma-separated mutant ids")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="do not run the selections on the unchanged code first (when the "
                    "caller has just run them: ci/gpu-check)")
    ap.add_argument("--tests", help="run the chosen mutants against these pytest arguments "
                    "(space-separated, e.g. 'tests') instead of their own selections")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="mutants run side by side")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)

    for m in MUTANTS:                                   # every mutant still applies
        _find((ROOT / m.file).read_text(), m)
    equivalent = [m for m in MUTANTS if m.equivalent]
    if a.list:
        for m in MUTANTS:
            tag = ("equivalent" if m.equivalent else "gpu" if m.gpu else
                   "quick" if m.quick else "")
            print(f"{m.id:34} {m.area:24} {tag:10} {m.why}")
        print(f"{len(MUTANTS)} mutants: {sum(not m.gpu and not m.equivalent for m in MUTANTS)} "
              f"CPU, {sum(m.gpu for m in MUTANTS)} GPU-only, {len(equivalent)} equivalent")
        return 0
    if a.only:
        ids = a.only.split(",")
        unknown = set(ids) - {m.id for m in MUTANTS}
        if unknown:
            raise SystemExit(f"unknown mutant ids: {', '.join(sorted(unknown))}")
        chosen = [m for m in MUTANTS if m.id in ids and (a.gpu or not m.gpu)]
    elif a.gpu:
        chosen = [m for m in MUTANTS if m.gpu]
    else:
        chosen = [m for m in MUTANTS if not m.gpu and (m.quick or not a.quick)]
    run = [m for m in chosen if not m.equivalent]

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="hwoptim-mutants-") as tmp:
        work, cache = Path(tmp), Path(tmp) / "cache"
        cache.mkdir(mode=0o700)
        mine = os.environ.get("HWOPTIM_CACHE_DIR", "")
        if mine and mine.lower() != "off":
            cache = Path(mine)      # kernel files are named by a hash of their source: the
            # mutated kernels get files of their own, the unchanged ones are reused
        base = work / "unchanged"
        _copy_tree(base)
        where = subprocess.run([sys.executable, "-c", "import hwoptim; print(hwoptim.__file__)"],
                               cwd=base, env=_env(base, cache), capture_output=True, text=True)
        if not where.stdout.strip().startswith(str(base)):
            print(f"the copy's hwoptim is not the one imported: {where.stdout}{where.stderr}")
            return 2
        override = tuple(a.tests.split()) if a.tests else None
        selections = [override] if override else sorted({m.tests for m in run})
        print(f"{len(run)} mutants ({len(chosen) - len(run)} equivalent, not run); first the "
              f"{len(selections)} test selections on the unchanged code", flush=True)
        bad = []
        with ThreadPoolExecutor(max(1, a.jobs)) as pool:
            for sel, (status, secs, tail) in zip(selections, pool.map(
                    lambda s: _pytest(base, cache, s), [] if a.skip_baseline else selections)):
                print(f"  {status:8} {secs:6.1f} s  {' '.join(sel)}", flush=True)
                if status != "passed":
                    bad.append((sel, tail))
        if bad:
            for sel, tail in bad:
                print(f"\n{' '.join(sel)} fails on the unchanged code:\n{tail}")
            return 2
        results = []
        with ThreadPoolExecutor(max(1, a.jobs)) as pool:
            for r in pool.map(lambda m: run_one(m, work, cache, override), run):
                print(f"  {r['verdict']:16} {r['seconds']:6.1f} s  {r['id']}", flush=True)
                results.append(r)

    killed = sum(r["verdict"].startswith("killed") for r in results)
    survivors = [r for r in results if not r["verdict"].startswith("killed")]
    print(f"\n{'area':24} {'mutant':34} {'verdict':16} seconds")
    for r in results:
        print(f"{r['area']:24} {r['id']:34} {r['verdict']:16} {r['seconds']:7.1f}")
    for m in chosen:
        if m.equivalent:
            print(f"{m.area:24} {m.id:34} {'equivalent':16}     -   ({m.equivalent})")
    print(f"\nscore: {killed}/{len(results)} killed "
          f"({100 * killed / max(1, len(results)):.0f}%) in {time.time() - t0:.0f} s"
          + (f"; {len(chosen) - len(run)} equivalent, not counted" if len(chosen) > len(run)
             else ""))
    for r in survivors:
        print(f"\n{r['verdict']}: {r['id']} ({r['why']}); tests: {r['tests']}\n{r['tail']}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
