"""The lesson's claims (shared/seed: "momentum and adaptive gradients"), measured.

Every claim test runs hwoptim's own kernels on every available backend (the GPU ones are
marked ``gpu`` and run by ci/gpu-check), states its parameters and the margin it asserts,
and compares the measurement with the number the math predicts, so it fails if the
behaviour changes. All in float64, so rounding never decides a claim.

1. Saddle: SGD on the ridge of ``x² − 0.1·y²`` stays near the top far longer than AdaGrad,
   RMSProp and Adam started at the same point with the same first-step length.
2. AdaGrad: under a steady gradient the step shrinks like ``1/√t`` (toward 0), while the
   distance travelled grows like ``√t`` (it slows, it does not stop).
3. RMSProp, ρ = 0.9: a gradient impulse's share of ``square_avg`` is ``0.9**100`` of its
   entry share 100 steps later.
4. Adam: the first step is ``lr·|g|/(|g| + eps) ≈ lr`` for any gradient; without the bias
   correction it would be ``(1 − β1)/√(1 − β2) ≈ 3.16`` times that.
5. Momentum: in the buffer an alternating component stays below its size and a steady one
   grows to ``1/(1 − μ)`` times its size; on valleys of condition number >= 100 momentum
   needs fewer steps than gradient descent at the same learning rate (not on mild ones).
6. BGD/SGD/MBGD: the batch gradient's spread around the full gradient is
   ``σ²/b·(N − b)/(N − 1)``.

Then light tests of hwoptim.lesson's landscapes, trajectories, batching and ``hwoptim viz``.
"""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

import hwoptim
from hwoptim import backends
from hwoptim.lesson import batching as B
from hwoptim.lesson import landscapes as L
from hwoptim.lesson import trajectories as T


def _backend_params():
    out = []
    for name in backends.names():
        why = backends.unavailable(name)
        if why is not None:
            out.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=why)))
        elif backends.load(name).FAMILY == "host":
            out.append(pytest.param(name, id=name))
        else:
            out.append(pytest.param(name, id=name, marks=pytest.mark.gpu))
    return out


BACKENDS = _backend_params()
_GPU_N = 10 ** 6           # N-d experiments on a GPU backend
_HOST_N = 1000             # on the host: small enough for Numba's serial kernels (its
                           # parallel ones cost seconds to compile and wake on 2 cores)


def _xp(backend):
    if backends.load(backend).FAMILY == "cuda":
        import cupy
        return cupy
    return np


def _host(a) -> np.ndarray:
    return np.array(a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a,
                    dtype=np.float64, copy=True)


def _nd(backend) -> int:
    return _GPU_N if _xp(backend) is not np else _HOST_N


# ============================================================================ 1. saddle

SADDLE_A, SADDLE_B = 1.0, 0.1     # x² − 0.1·y²: the way down (y) is 10 times flatter
OFFSET = 1e-3                      # start 1e-3 across the ridge: the y-gradient 2·b·1e-3 =
                                   # 2e-4 is 10^4 times eps (1e-8 Adam/RMSProp, 1e-10 AdaGrad)
X0 = 1.2                           # on the ridge, near the right edge of the picture
FIRST_STEP = 0.05                  # every method's first step has this length
K = 100                            # distance from the ridge compared after K steps
FACTOR = 100                       # ... and each adaptive method must be FACTOR times as far
LEAVE = 0.1                        # "left the top": 100 offsets (0.1) from the ridge
ADAPTIVE = ("AdaGrad", "RMSProp", "Adam")


def _saddle_methods(ls, backend):
    lesson = {m.label: m for m in T.LESSON_METHODS}
    return T.match_first_step(ls, [lesson[n] for n in ("SGD",) + ADAPTIVE], FIRST_STEP,
                              backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saddle_sgd_stays_on_the_ridge_adaptive_methods_leave(backend):
    """From (1.2, 1e-3) on x² − 0.1·y², first steps all 0.05 long: SGD's distance from the
    ridge after K = 100 steps is exactly 1e-3·(1 + 0.2·lr)^100 = 1.52e-3 (lr = 0.05/2.4),
    while AdaGrad's, RMSProp's and Adam's are each >= 100 times that (measured 0.964,
    1.021, 4.855). SGD needs 1108 steps to get 0.1 from the ridge (the first step past
    ln 100 / ln(1 + 0.2·lr)); the adaptive methods 3 or 4 (asserted: at most 5).
    Momentum (μ = 0.9, SGD's lr) leaves too, sooner than SGD by its growth factor per step,
    the root 1.0325 of z² − (1 + μ + 0.2·lr)z + μ against SGD's 1.0042: step 151
    (asserted: within 20% of ln 100 / ln 1.0325 = 144)."""
    ls = L.anisotropic_saddle(SADDLE_A, SADDLE_B, offset=OFFSET)
    assert ls.start == (X0, OFFSET)
    methods = _saddle_methods(ls, backend)
    lr_sgd = methods[0].lr
    assert lr_sgd == pytest.approx(FIRST_STEP / (2 * SADDLE_A * X0), rel=1e-6)
    sgd_rate = 1 + 2 * SADDLE_B * lr_sgd            # y ← y + lr·2b·y
    sgd_leaves = math.ceil(math.log(LEAVE / OFFSET) / math.log(sgd_rate))
    runs = {m.label: T.run(ls, m, sgd_leaves + 5 if m.label == "SGD" else K, backend=backend)
            for m in methods}
    for label, t in runs.items():                    # the matched first steps
        assert np.linalg.norm(t.path[1] - t.path[0]) == pytest.approx(FIRST_STEP, rel=1e-9)
    dist = {label: abs(t.path[K, 1]) for label, t in runs.items()}
    assert dist["SGD"] == pytest.approx(OFFSET * sgd_rate ** K, rel=1e-9)
    y = np.abs(runs["SGD"].path[:, 1])
    assert int(np.argmax(y > LEAVE)) == sgd_leaves        # exactly the predicted step
    report = {label: round(float(d), 6) for label, d in dist.items()}
    for label in ADAPTIVE:
        assert dist[label] >= FACTOR * dist["SGD"], (label, report)
        assert int(np.argmax(np.abs(runs[label].path[:, 1]) > LEAVE)) <= 5, (label, report)
    # momentum: the heavy ball's growth factor along the way down
    mom = T.run(ls, T.Method("Momentum", "SGD", {"lr": lr_sgd, "momentum": 0.9}), 300,
                backend=backend)
    z = max(np.roots([1, -(1 + 0.9 + 2 * SADDLE_B * lr_sgd), 0.9]).real)
    mom_leaves = int(np.argmax(np.abs(mom.path[:, 1]) > LEAVE))
    assert mom_leaves == pytest.approx(math.log(LEAVE / OFFSET) / math.log(z), rel=0.2)
    print(f"\nsaddle [{backend}] distance from the ridge after {K} steps: {report}; "
          f"|y| > {LEAVE} first at step: SGD {sgd_leaves}, momentum {mom_leaves}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_saddle_in_n_dimensions_follows_the_2d_path(backend):
    """The same experiment on the N-d saddle (N = 10^3 on the host, 10^6 on a GPU): each
    (up, down) coordinate pair follows the 2-D path, so SGD's down coordinates are
    1.52e-3 after 100 steps and Adam's 5.3, in every pair."""
    ls2 = L.anisotropic_saddle(SADDLE_A, SADDLE_B, offset=OFFSET)
    n = _nd(backend)
    lsn = L.saddle_nd(n, SADDLE_A, SADDLE_B, offset=OFFSET, x0=X0)
    half = n // 2
    for m in _saddle_methods(ls2, backend):
        if m.label not in ("SGD", "Adam"):
            continue
        want = T.run(ls2, m, K, backend=backend).path[-1]
        t = T.run(lsn, m, K, backend=backend, record=None)
        p = _host(t.optimizer.param_groups[0]["params"][0])
        np.testing.assert_allclose(p[:half], want[0], rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(p[half:], want[1], rtol=1e-10)


# ============================================================================ 2. AdaGrad

@pytest.mark.parametrize("backend", BACKENDS)
def test_adagrad_steps_shrink_like_inverse_sqrt_t_but_distance_grows_like_sqrt_t(backend):
    """A steady gradient g = (−1e-3, 1, 1e3) for T = 4096 steps, lr = 0.1, eps = 1e-10:
    step t is lr·|g|/(√t·|g| + eps) = lr/√t (to 1e-7), strictly shrinking, 1.56e-3 at the
    end (→ 0: the lesson's "learning stops"); but the distance travelled is
    lr·Σ 1/√s = lr·(2√T + ζ(1/2) + 1/(2√T) + ...) = 12.655, which keeps growing like √T
    (quadrupling T doubles it, ratio 2.02 here): learning slows, it does not stop."""
    xp, lr, eps, steps = _xp(backend), 0.1, 1e-10, 4096
    g_host = np.array([-1e-3, 1.0, 1e3])
    p = xp.asarray(np.zeros(3))
    g = xp.asarray(g_host)
    opt = hwoptim.Adagrad(p, lr=lr, eps=eps, backend=backend)
    path = [np.zeros(3)]
    for _ in range(steps):
        opt.step(g)
        path.append(_host(p))
    path = np.array(path)
    step = np.abs(np.diff(path, axis=0))                     # (T, 3)
    t = np.arange(1, steps + 1)[:, None]
    exact = lr * np.abs(g_host) / (np.sqrt(t) * np.abs(g_host) + eps)
    np.testing.assert_allclose(step, exact, rtol=1e-9)
    np.testing.assert_allclose(step * np.sqrt(t) / lr, 1.0, rtol=1e-6)
    assert np.all(np.diff(step, axis=0) < 0)                 # only ever shrinks
    assert step[-1] == pytest.approx(lr / math.sqrt(steps), rel=1e-6)
    dist = np.abs(path[:, 1])
    zeta_half = -1.4603545088095868
    for T_ in (steps // 4, steps):
        assert dist[T_] == pytest.approx(lr * (2 * math.sqrt(T_) + zeta_half
                                               + 0.5 / math.sqrt(T_)), rel=1e-5)
        assert dist[T_] >= 2 * lr * (math.sqrt(T_ + 1) - 1)  # unbounded
    ratio = dist[steps] / dist[steps // 4]
    assert abs(ratio - 2) < 0.03, ratio
    # the real (signed) updates point against the gradient in every coordinate
    assert np.all(np.sign(path[-1]) == -np.sign(g_host))
    print(f"\nAdaGrad [{backend}]: last step {step[-1, 1]:.4g} (lr/√T = "
          f"{lr / math.sqrt(steps):.4g}), distance {dist[steps]:.4f} after {steps} steps, "
          f"{dist[steps // 4]:.4f} after {steps // 4}: ratio {ratio:.4f}")


# ============================================================================ 3. RMSProp

@pytest.mark.parametrize("backend", BACKENDS)
def test_rmsprop_forgets_an_impulse_as_rho_to_the_100(backend):
    """ρ = alpha = 0.9. Two runs see the same random gradients (N(0, 1), 8 coordinates);
    one gets an impulse of 10 added at step 20. The impulse's contribution to square_avg
    (run B − run A, read from opt.state) is (1 − ρ)·((g+10)² − g²) when it enters and
    0.9**100 = 2.656e-5 of that 100 steps later (to 1e-9 relative). The lesson's 2.65e-5 is
    this number, truncated."""
    xp, alpha, t0, later, n = _xp(backend), 0.9, 20, 100, 8
    rng = np.random.default_rng(3)
    grads = rng.standard_normal((t0 + later + 1, n))
    impulse = np.zeros_like(grads)
    impulse[t0] = 10.0
    sq = []
    for seq in (grads, grads + impulse):
        p = xp.zeros(n)
        opt = hwoptim.RMSprop(p, lr=0.01, alpha=alpha, backend=backend)
        hist = []
        for g in seq:
            opt.step(xp.asarray(g))
            hist.append(_host(opt.state[0]["square_avg"]))
        sq.append(np.array(hist))
    contribution = sq[1] - sq[0]
    entered = contribution[t0]
    np.testing.assert_allclose(entered, (1 - alpha) * ((grads[t0] + 10) ** 2 - grads[t0] ** 2),
                               rtol=1e-12)
    assert np.all(contribution[:t0] == 0)
    ratio = contribution[t0 + later] / entered
    np.testing.assert_allclose(ratio, alpha ** later, rtol=1e-9)
    assert alpha ** later == pytest.approx(2.6561e-5, rel=1e-4)
    print(f"\nRMSProp [{backend}]: impulse share after {later} steps / at entry = "
          f"{ratio.mean():.6g} (0.9**100 = {alpha ** later:.6g})")


# ============================================================================ 4. Adam

@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_first_step_is_lr_and_would_be_3_16_lr_without_bias_correction(backend):
    """Adam(lr=1e-3), default betas (0.9, 0.999) and eps 1e-8, gradients of both signs with
    magnitudes log-uniform in [1e-4, 1e3] plus some near eps: the first step is
    lr·|g|/(|g| + eps) in every coordinate (to 1e-9), so within 1e-4 of lr wherever
    |g| >= 1e-4. The step an uncorrected Adam would take from the same state
    (lr·m/(√v + eps), m and v read from opt.state) is (1 − β1)/√(1 − β2)·(|g| + eps)/
    (|g| + eps/√(1 − β2)) times it: 3.1623 within 0.1% wherever |g| >= 1e-3."""
    xp, lr, b1, b2, eps = _xp(backend), 1e-3, 0.9, 0.999, 1e-8
    rng = np.random.default_rng(4)
    n = 4000
    g_host = 10.0 ** rng.uniform(-4, 3, n) * rng.choice([-1.0, 1.0], n)
    g_host[:8] = [1e-8, -1e-8, 3e-8, -1e-7, 1e-6, -1e-5, 5e-9, -2e-9]
    p0 = rng.standard_normal(n)
    p = xp.asarray(p0.copy())
    opt = hwoptim.Adam(p, lr=lr, betas=(b1, b2), eps=eps, backend=backend)
    opt.step(xp.asarray(g_host))
    step = _host(p) - p0
    a = np.abs(g_host)
    # rounding of p0 + step: |p0| ~ 1, so allow 4 ulps of p0 on top of the relative bound
    np.testing.assert_allclose(np.abs(step), lr * a / (a + eps), rtol=1e-9, atol=4e-16 * 4)
    assert np.all(np.sign(step) == -np.sign(g_host))
    big = a >= 1e-4
    assert np.all(np.abs(np.abs(step[big]) / lr - 1) <= 1.0001e-4)
    m, v = _host(opt.state[0]["exp_avg"]), _host(opt.state[0]["exp_avg_sq"])
    np.testing.assert_allclose(m, (1 - b1) * g_host, rtol=1e-12)
    np.testing.assert_allclose(v, (1 - b2) * g_host ** 2, rtol=1e-12)
    uncorrected = lr * np.abs(m) / (np.sqrt(v) + eps)
    ratio = uncorrected / (lr * a / (a + eps))
    c = (1 - b1) / math.sqrt(1 - b2)
    np.testing.assert_allclose(ratio, c * (a + eps) / (a + eps / math.sqrt(1 - b2)), rtol=1e-9)
    assert c == pytest.approx(3.16228, rel=1e-5)
    assert np.all(np.abs(ratio[a >= 1e-3] / c - 1) < 1e-3)
    print(f"\nAdam [{backend}]: first step / lr in [{np.abs(step[big]).min() / lr:.6f}, "
          f"{np.abs(step[big]).max() / lr:.6f}] for |g| >= 1e-4; uncorrected / corrected "
          f"= {np.median(ratio[a >= 1e-3]):.5f} (c = {c:.5f})")


# ============================================================================ 5. momentum

@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_buffer_cancels_oscillation_and_adds_up_agreement(backend):
    """SGD(momentum=0.9) fed g_t = (a·(−1)^(t+1), b), a = b = 1, for 200 steps: the buffer's
    alternating component is ±a·(1 − (−μ)^t)/(1 + μ): after the first step it stays
    below a (0.91·a at most, at t = 3; a/(1 + μ) = 0.526·a in the long run); the steady
    one is b·(1 − μ^t)/(1 − μ) → b/(1 − μ) = 10·b (9.99999993 after 200 steps)."""
    xp, mu, a, b, steps = _xp(backend), 0.9, 1.0, 1.0, 200
    p = xp.zeros(2)
    opt = hwoptim.SGD(p, lr=0.01, momentum=mu, backend=backend)
    buf = []
    for t in range(1, steps + 1):
        opt.step(xp.asarray([a * (-1) ** (t + 1), b]))
        buf.append(_host(opt.state[0]["momentum_buffer"]))
    buf = np.array(buf)
    t = np.arange(1, steps + 1)
    np.testing.assert_allclose(buf[:, 0], a * (-1) ** (t + 1) * (1 - (-mu) ** t) / (1 + mu),
                               rtol=1e-12)
    np.testing.assert_allclose(buf[:, 1], b * (1 - mu ** t) / (1 - mu), rtol=1e-12)
    assert np.all(np.abs(buf[1:, 0]) < a)
    assert abs(buf[-1, 0]) == pytest.approx(a / (1 + mu), rel=1e-9)
    assert buf[-1, 1] == pytest.approx(b / (1 - mu), rel=1e-8)
    print(f"\nmomentum buffer [{backend}]: alternating |{buf[-1, 0]:.4f}| (a/(1+μ) = "
          f"{a / (1 + mu):.4f}), steady {buf[-1, 1]:.8f} (b/(1−μ) = {b / (1 - mu):.1f})")


MU = 0.9
TOL = 1e-6           # "reached the minimum": distance <= 1e-6 of the start's, from then on
CROSSOVER = (1 + math.sqrt(MU)) / (1 - math.sqrt(MU))     # 38.0 for μ = 0.9


def _steps_to_minimum(path):
    d = np.linalg.norm(path, axis=1)
    above = np.nonzero(d > TOL * d[0])[0]
    return int(above[-1]) + 1


def _predicted_steps(kappa, lr, momentum):
    """ln(TOL) / ln(rate): GD's rate is max|1 − lr·λ|, heavy ball's the largest root of
    z² − (1 + μ − lr·λ)z + μ over λ in {1/κ, 1}."""
    lams = (1.0 / kappa, 1.0)
    if momentum:
        rate = max(max(abs(np.roots([1, -(1 + MU - lr * lam), MU]))) for lam in lams)
    else:
        rate = max(abs(1 - lr * lam) for lam in lams)
    return math.log(TOL) / math.log(rate)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kappa", [10, 100, 1000])
def test_momentum_beats_gradient_descent_on_narrow_valleys_only(backend, kappa):
    """The valley (x²/κ + y²)/2 from (−√κ, 1); both at lr = 2/(1 + 1/κ), plain gradient
    descent's best learning rate (its rate is then (κ−1)/(κ+1) per step); momentum
    μ = 0.9 contracts by √μ = 0.949 per step while lr·λ stays inside
    ((1 − √μ)², (1 + √μ)²). Steps until the distance to the minimum stays below 1e-6 of
    the start's, each within 5% of ln(1e-6)/ln(rate):
    κ = 10: GD 69, momentum 260 (gradient descent wins: the valley is mild);
    κ = 100: GD 691, momentum 262 (2.6 times fewer); κ = 1000: GD 6908, momentum 531 (13).
    The claim holds for κ > (1 + √μ)/(1 − √μ) = 38."""
    ls = L.valley(kappa)
    lr = 2 / (1 + 1 / kappa)
    steps = {}
    for name, mom in (("GD", 0.0), ("Momentum", MU)):
        want = _predicted_steps(kappa, lr, mom)
        t = T.run(ls, T.Method(name, "SGD", {"lr": lr, "momentum": mom}),
                  int(want * 1.1) + 20, backend=backend)
        steps[name] = _steps_to_minimum(t.path)
        assert steps[name] == pytest.approx(want, rel=0.05), (name, steps[name], want)
    if kappa > CROSSOVER:
        assert steps["Momentum"] < steps["GD"] / 2, steps
    else:
        assert steps["GD"] < steps["Momentum"] / 2, steps
    print(f"\nvalley κ={kappa} [{backend}] steps to 1e-6: {steps}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_beats_gradient_descent_on_the_n_dimensional_valley(backend):
    """valley_nd (N = 10^3 on the host, 10^6 on a GPU), κ = 100: curvatures λᵢ log-spaced in
    [1/κ, 1], start 1/√λᵢ, lr = 2/(1 + 1/κ) for both, μ = 0.9. Gradient descent's distance
    to the minimum is √Σ (xᵢ(1 − lr·λᵢ)^t)² at every step (to 1e-9): it reaches 1e-6 of
    the start's in about 610 steps (fewer than 2-D's 691: most coordinates are faster than the
    extreme ones). Every lr·λᵢ lies inside ((1 − √μ)², (1 + √μ)²), so momentum contracts
    every coordinate by √μ per step: 257 steps (ln 1e-6 / ln √μ = 262, within 5%), at
    most half of gradient descent's (measured ratio 2.37)."""
    kappa = 100
    ls = L.valley_nd(_nd(backend), kappa)
    lr = 2 / (1 + 1 / kappa)
    lam = ls.curvatures
    assert np.all(((1 - MU ** 0.5) ** 2 < lr * lam) & (lr * lam < (1 + MU ** 0.5) ** 2))
    norm = (lambda q: (q * q).sum() ** 0.5)
    steps = {}
    for name, mom in (("GD", 0.0), ("Momentum", MU)):
        t = T.run(ls, T.Method(name, "SGD", {"lr": lr, "momentum": mom}), 700,
                  backend=backend, record=lambda q: norm(q).reshape(1))
        steps[name] = _steps_to_minimum(t.path)
        if name == "GD":       # the closed form, at 25 steps up to the last one above TOL
            ks = np.unique(np.linspace(0, steps["GD"], 25).astype(int))
            x2, r2 = ls.start ** 2, (1 - lr * lam) ** 2
            want = [math.sqrt(float((x2 * r2 ** k).sum())) for k in ks]
            np.testing.assert_allclose(t.path[ks, 0], want, rtol=1e-9)
    assert steps["Momentum"] == pytest.approx(math.log(TOL) / math.log(MU ** 0.5), rel=0.05)
    assert steps["Momentum"] <= steps["GD"] / 2, steps
    print(f"\nvalley {ls.dim}-d κ={kappa} [{backend}] steps to 1e-6: {steps}")


# ============================================================================ 6. BGD/SGD/MBGD

N_SAMPLES = 240


def _variance_data():
    rng = np.random.default_rng(6)
    X = rng.standard_normal((N_SAMPLES, 4))
    y = X @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.5 * rng.standard_normal(N_SAMPLES) + 1.0
    return B.LinearRegression(X, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b", [1, 16, 60, N_SAMPLES])
def test_minibatch_gradient_variance_is_sigma2_over_b_times_finite_population(backend, b):
    """Linear regression on N = 240 synthetic samples (seed 6), 5 weights, at w = 0. Every
    batch of ``Batches(240, b, seed=0)`` over enough epochs for >= 4800 batches (b = N:
    20 epochs) feeds one SGD(lr=1) step from w = 0, so the update is exactly −g_B; the mean
    of ‖g_B − g‖² over the batches is within 10% of σ²/b·(N − b)/(N − 1), σ² the
    per-sample gradients' variance (trace): b = 1 gives σ² (every epoch sees each sample
    once), b = 16 and 60 within 0.4% (the spread over shuffling seeds is about 1%), b = N
    exactly 0 (to rounding). At b = 60 sampling with replacement (σ²/b) would be 33% off:
    the finite-population factor (N − b)/(N − 1) is measured, not assumed."""
    model = _variance_data()
    xp = _xp(backend)
    G = model.sample_gradients(np.zeros(model.dim))
    full = G.mean(axis=0)
    sigma2 = float(((G - full) ** 2).sum(axis=1).mean())
    expected = sigma2 / b * (N_SAMPLES - b) / (N_SAMPLES - 1)
    batches = B.Batches(N_SAMPLES, b, seed=0)
    epochs = 20 if b == N_SAMPLES else -(-4800 // len(batches))
    p = xp.zeros(model.dim)
    opt = hwoptim.SGD(p, lr=1.0, backend=backend)
    gbuf = np.zeros(model.dim)
    dev = []
    for _ in range(epochs):
        for idx in batches:
            p[...] = 0.0
            model.gradient(np.zeros(model.dim), idx, out=gbuf)
            opt.step(xp.asarray(gbuf))
            update = -_host(p)                       # = g_B
            dev.append(float(((update - full) ** 2).sum()))
    measured = float(np.mean(dev))
    if b == N_SAMPLES:
        assert measured <= 1e-24 * sigma2, measured
    else:
        assert measured == pytest.approx(expected, rel=0.10), (measured, expected)
    print(f"\nbatch variance b={b} [{backend}]: measured {measured:.5g}, "
          f"σ²/b·(N−b)/(N−1) = {expected:.5g} ({len(dev)} batches)")


# ============================================================================ landscapes

TWO_D = [L.get(name) for name in L.LANDSCAPES] + [L.valley(1000), L.saddle(2.0, 0.5)]


@pytest.mark.parametrize("ls", TWO_D, ids=lambda ls: f"{ls.name}")
def test_landscape_gradient_matches_finite_differences(ls):
    rng = np.random.default_rng(7)
    pts = np.column_stack([rng.uniform(*ls.xlim, 50), rng.uniform(*ls.ylim, 50)])
    h = 1e-6
    g = ls.gradient(pts)
    fd = np.empty_like(g)
    for j in range(2):
        e = np.zeros(2)
        e[j] = h
        fd[:, j] = (ls.value(pts + e) - ls.value(pts - e)) / (2 * h)
    scale = np.abs(g).max(axis=1, keepdims=True) + 1
    assert np.all(np.abs(g - fd) <= 1e-6 * scale)
    gx, gy = ls.grad(pts[:, 0], pts[:, 1])
    np.testing.assert_allclose(np.column_stack([gx, gy]), g, rtol=1e-12)
    np.testing.assert_allclose(ls.f(pts[:, 0], pts[:, 1]), ls.value(pts), rtol=1e-12)
    # vectorised over any shape, and into a given buffer
    grid = pts.reshape(5, 10, 2)
    assert ls.value(grid).shape == (5, 10)
    out = np.empty_like(grid)
    assert ls.gradient(grid, out=out) is out
    np.testing.assert_allclose(out.reshape(50, 2), g)


@pytest.mark.parametrize("ls", TWO_D, ids=lambda ls: f"{ls.name}")
def test_landscape_minima_start_and_range(ls):
    x0, y0 = ls.start
    assert ls.xlim[0] < x0 < ls.xlim[1] and ls.ylim[0] < y0 < ls.ylim[1]
    if ls.min_value is None:
        assert ls.minimum is None and ls.critical_point == (0.0, 0.0)
        assert np.allclose(ls.gradient(np.zeros(2)), 0)
        return
    for m in ls.minima:
        m = np.array(m)
        assert np.all(np.abs(ls.gradient(m)) < 1e-9), (ls.name, m)
        H = np.array([(ls.gradient(m + e) - ls.gradient(m - e)) / 2e-6
                      for e in np.eye(2) * 1e-6])
        assert np.all(np.linalg.eigvalsh((H + H.T) / 2) > 0), (ls.name, m)  # a minimum
    assert ls.value(np.array(ls.minimum)) == pytest.approx(ls.min_value, abs=1e-12)
    xs = np.linspace(*ls.xlim, 401)
    X, Y = np.meshgrid(xs, np.linspace(*ls.ylim, 401))
    assert ls.f(X, Y).min() >= ls.min_value - 1e-9         # global within the range


def test_stated_minima():
    assert L.beale().minimum == (3.0, 0.5) and L.rosenbrock().minimum == (1.0, 1.0)
    assert L.rastrigin().minimum == (0.0, 0.0) and L.valley(50).minimum == (0.0, 0.0)
    assert len(L.himmelblau().minima) == 4
    st = L.styblinski_tang()
    assert st.minimum == pytest.approx((-2.903534, -2.903534), abs=1e-6)
    assert st.min_value == pytest.approx(-78.33233, abs=1e-4) and len(st.minima) == 4
    assert L.valley(1000).condition_number == pytest.approx(1000)


@pytest.mark.parametrize("make", [lambda: L.saddle_nd(10, 1.0, 0.1),
                                  lambda: L.valley_nd(10, 100.0)], ids=["saddle", "valley"])
def test_nd_landscapes(make):
    ls = make()
    rng = np.random.default_rng(8)
    p = rng.standard_normal((3, ls.dim))
    g = ls.gradient(p)
    h = 1e-6
    for j in range(ls.dim):
        e = np.zeros(ls.dim)
        e[j] = h
        fd = (ls.value(p + e) - ls.value(p - e)) / (2 * h)
        np.testing.assert_allclose(g[:, j], fd, rtol=1e-6, atol=1e-8)
    assert ls.start.shape == (ls.dim,)
    f32 = ls.gradient(p[0].astype(np.float32))
    assert f32.dtype == np.float32
    if ls.name.startswith("valley"):
        assert ls.condition_number == pytest.approx(100.0)
        assert np.allclose(ls.value(ls.start), 0.5 * ls.dim)
    else:
        assert ls.minimum is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_nd_landscapes_keep_the_array_module(backend):
    xp = _xp(backend)
    n = _nd(backend)
    for ls in (L.saddle_nd(n), L.valley_nd(n, 100.0)):
        p = xp.asarray(ls.start)
        g = ls.gradient(p)
        assert type(g) is type(p)
        np.testing.assert_allclose(_host(g), ls.gradient(np.asarray(ls.start)), rtol=1e-15)
        out = xp.empty_like(p)
        assert ls.gradient(p, out=out) is out
        assert float(ls.value(p)) == pytest.approx(float(ls.value(np.asarray(ls.start))),
                                                   rel=1e-12)


def test_modules_stay_light_and_never_import_cupy():
    code = ("import sys, numpy as np\n"
            "import hwoptim, hwoptim.lesson.landscapes as L, hwoptim.lesson.trajectories as T\n"
            "import hwoptim.lesson.batching, hwoptim.lesson.viz\n"
            "T.run(L.valley_nd(100), 'Adam', 3)\n"
            "T.run(L.beale(), 'Momentum(lr=1e-4)', 3, backend='numpy')\n"
            "bad = [m for m in ('cupy', 'matplotlib', 'sklearn') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ============================================================================ trajectories

def test_trajectory_has_steps_plus_one_points_and_losses():
    ls = L.rosenbrock()
    t = T.run(ls, "Adam(lr=0.01)", 25, backend="numpy")
    assert t.path.shape == (26, 2) and t.losses.shape == (26,)
    assert tuple(t.path[0]) == ls.start
    np.testing.assert_allclose(t.losses, ls.value(t.path), rtol=1e-12)
    assert t.method.lr == 0.01 and t.backend == "numpy" and t.steps == 25
    t0 = T.run(ls, "SGD", 0, start=(0.5, 0.5))
    assert t0.path.shape == (1, 2) and tuple(t0.path[0]) == (0.5, 0.5)


def test_run_many_each_with_its_own_hyperparameters():
    ls = L.anisotropic_saddle()
    methods = [T.parse_method(s) for s in ("SGD(lr=0.01)", "fast=SGD(lr=0.05)",
                                           "Momentum(lr=0.01, momentum=0.5)")]
    assert methods[1].label == "fast" and methods[2].hypers == {"momentum": 0.5, "lr": 0.01}
    runs = T.run_many(ls, methods, 10)
    assert [r.method.label for r in runs] == ["SGD", "fast", "Momentum(momentum=0.5)"]
    assert runs[1].path[1, 0] == pytest.approx(ls.start[0] * (1 - 2 * 0.05))
    assert runs[0].path[1, 0] == pytest.approx(ls.start[0] * (1 - 2 * 0.01))
    with pytest.raises(ValueError, match="unknown optimizer"):
        T.parse_method("Shampoo(lr=1)")
    with pytest.raises(ValueError, match="lr"):
        T.parse_method("Adam(lr=-1)")


def test_match_first_step_gives_every_method_the_same_first_step():
    ls = L.beale()
    methods = T.match_first_step(ls, T.LESSON_METHODS, 0.02, backend="numpy")
    for m in methods:
        t = T.run(ls, m, 1, backend="numpy")
        assert np.linalg.norm(t.path[1] - t.path[0]) == pytest.approx(0.02, rel=1e-9), m
    kept = T.match_first_step(ls, [T.parse_method("Adam(lr=0.3)")], 0.02)
    assert kept[0].lr == 0.3


# ============================================================================ batching

@pytest.mark.parametrize("n,b,count,mode", [(100, 100, 1, "BGD"), (100, 500, 1, "BGD"),
                                            (100, 1, 100, "SGD"), (100, 32, 4, "MBGD"),
                                            (96, 32, 3, "MBGD")])
def test_batch_counts(n, b, count, mode):
    bt = B.Batches(n, b, seed=1)
    assert len(bt) == count and bt.mode == mode
    sizes = [len(i) for i in bt]
    assert len(sizes) == count and sum(sizes) == n
    assert B.Batches(n, b, seed=1, drop_last=True).__len__() == n // min(b, n)


def test_every_sample_once_per_epoch_and_shuffling_reproducible():
    bt = B.Batches(103, 10, seed=42)
    epochs = [np.concatenate(list(bt)) for _ in range(3)]
    for e in epochs:
        assert np.array_equal(np.sort(e), np.arange(103))
    assert not np.array_equal(epochs[0], epochs[1])           # a new order each epoch
    again = B.Batches(103, 10, seed=42)
    for e in epochs:
        assert np.array_equal(np.concatenate(list(again)), e)
    assert np.array_equal(np.concatenate(list(B.Batches(103, 10, seed=42).epoch(2))),
                          epochs[2])
    assert not np.array_equal(np.concatenate(list(B.Batches(103, 10, seed=43))), epochs[0])
    assert np.array_equal(np.concatenate(list(B.Batches(10, 3, shuffle=False))),
                          np.arange(10))
    with pytest.raises(ValueError):
        B.Batches(10, 0)


def test_models_gradients_and_optima():
    rng = np.random.default_rng(9)
    X = rng.standard_normal((50, 3))
    lin = B.LinearRegression(X, X @ [1.0, 2.0, -1.0] + rng.standard_normal(50))
    log = B.LogisticRegression(X, (X[:, 0] + 0.3 * rng.standard_normal(50) > 0) * 1.0)
    for model in (lin, log):
        w = rng.standard_normal(model.dim)
        g = model.gradient(w)
        np.testing.assert_allclose(model.sample_gradients(w).mean(0), g, rtol=1e-10,
                                   atol=1e-12)
        for j in range(model.dim):
            e = np.zeros(model.dim)
            e[j] = 1e-6
            fd = (model.loss(w + e) - model.loss(w - e)) / 2e-6
            assert fd == pytest.approx(g[j], rel=1e-5, abs=1e-8)
        w_star, best = model.optimum()
        assert np.abs(model.gradient(w_star)).max() < 1e-9
        assert model.loss(w) > best


def test_train_uses_batches_and_lowers_the_loss():
    model = _variance_data()
    for b, steps in ((N_SAMPLES, 3), (16, 45), (1, 720)):
        h = B.train(model, T.parse_method("SGD(lr=0.01)"), b, 3, seed=0, backend="numpy")
        assert h.steps == steps and len(h.losses) == 4 and len(h.seconds) == 4
        assert h.losses[-1] < h.losses[0]
        assert h.mode == B.mode(b, N_SAMPLES)


# ============================================================================ hwoptim viz

def _viz(tmp_path, *args):
    pytest.importorskip("matplotlib", reason="hwoptim viz needs matplotlib "
                        "(pip install 'hwoptim[viz]')")
    from hwoptim import cli
    return cli.main(["viz", *args, "--out", str(tmp_path), "--dpi", "40", "--grid", "40",
                     "-q"])


def test_viz_draws_the_lesson_saddle(tmp_path, capsys):
    assert _viz(tmp_path, "--steps", "12", "--frames", "4") == 0
    from PIL import Image
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["anisotropic-saddle-loss.png", "anisotropic-saddle.gif",
                     "anisotropic-saddle.png"]
    gif = Image.open(tmp_path / "anisotropic-saddle.gif")
    assert gif.n_frames >= 4
    assert (tmp_path / "anisotropic-saddle.gif").stat().st_size < 2_000_000
    assert Image.open(tmp_path / "anisotropic-saddle.png").size[0] > 100
    assert "anisotropic-saddle.png" in capsys.readouterr().out


def test_viz_options(tmp_path):
    assert _viz(tmp_path, "valley", "-p", "kappa=50", "--opt", "Adam(lr=0.1)",
                "--opt", "slow=SGD(lr=0.01)", "--start=-5,1", "--steps", "8",
                "--no-gif") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["valley-loss.png", "valley.png"]
    assert _viz(tmp_path, "beale", "--opt", "Nope(lr=1)", "--no-gif") == 2


def test_viz_batching(tmp_path):
    pytest.importorskip("sklearn", reason="the batching demo's data sets ship with "
                        "scikit-learn (pip install 'hwoptim[lesson]')")
    assert _viz(tmp_path, "batching", "--epochs", "1", "--opt", "Adam(lr=0.01)",
                "--repeat", "1") == 0
    assert (tmp_path / "batching.png").exists()


@pytest.mark.parametrize("name", sorted(hwoptim.RULES))
def test_every_rule_can_be_drawn(name):
    """``hwoptim viz --opt NAME`` for every rule, the newest included: a first step of the
    requested length on the valley, then a finite path that lowers the loss."""
    ls = L.valley()
    method = T.match_first_step(ls, [T.parse_method(name)], 0.1, backend="numpy")[0]
    run = T.run(ls, method, 60, backend="numpy")
    assert np.linalg.norm(run.path[1] - run.path[0]) == pytest.approx(0.1, rel=1e-6)
    assert np.isfinite(run.path).all()
    assert ls.f(*run.path[-1]) < ls.f(*run.path[0])


def test_a_method_without_a_fixed_colour_never_takes_one():
    """Adafactor beside Adam on one picture: two colours (the cycle skips the fixed ones)."""
    from hwoptim.lesson import viz
    fixed = set(viz.COLORS.values())
    assert all(viz._color("Adafactor", i) not in fixed for i in range(25))
    assert viz._color("Adam", 0) == viz.COLORS["Adam"]
