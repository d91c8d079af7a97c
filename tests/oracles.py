"""Independent float64 references for every rule: the algorithms as torch.optim 2.13's docs
write them (the pseudo-code on each optimizer's page), in plain NumPy, with nothing taken from
hwoptim's specs, code generator or reference step. Plus hwoptim's two documented extensions:
centered RMSprop clamps the variance at 0, and RMSprop's ``eps_in_sqrt``.

Each function does ONE step in place: ``p`` (float64 array) and ``state`` (dict of arrays,
created on the first call with torch's names and initial values), given the gradient, the
step number ``t`` (from 1) and the group's hyperparameters and options as keywords. A scalar
carried from step to step (NAdam's μ product, ASGD's step size) is kept in ``state`` under its
torch name with a leading underscore.
Tests compare these with the NumPy backend: tests/test_oracle.py.
"""
import numpy as np


def sgd(p, state, grad, t, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """torch.optim.SGD docs: g = ±grad + λθ; b_1 = g, b_t = μb + (1−τ)g;
    g = g + μb (nesterov) or b; θ = θ − γg."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * p
    if momentum != 0:
        if t > 1:
            b = momentum * state["momentum_buffer"] + (1 - dampening) * g
        else:
            b = g.copy()
        state["momentum_buffer"] = b
        g = g + momentum * b if nesterov else b
    p -= lr * g


def adam(p, state, grad, t, *, lr, betas, eps, weight_decay, amsgrad, maximize,
         decoupled_weight_decay=False):
    """torch.optim.Adam docs (and AdamW's decoupled decay θ = θ − γλθ):
    m = β1·m + (1−β1)g; v = β2·v + (1−β2)g²; m̂ = m/(1−β1^t);
    v̂ = max(v̂_max, v)/(1−β2^t) (amsgrad) or v/(1−β2^t); θ = θ − γ·m̂/(√v̂ + ε)."""
    beta1, beta2 = betas
    g = -grad if maximize else grad
    if decoupled_weight_decay:
        p -= lr * weight_decay * p
    elif weight_decay != 0:
        g = g + weight_decay * p
    m = beta1 * state.get("exp_avg", 0.0) + (1 - beta1) * g
    v = beta2 * state.get("exp_avg_sq", 0.0) + (1 - beta2) * g * g
    state["exp_avg"], state["exp_avg_sq"] = m, v
    if amsgrad:
        v = np.maximum(state.get("max_exp_avg_sq", 0.0), v)
        state["max_exp_avg_sq"] = v
    m_hat = m / (1 - beta1 ** t)
    v_hat = v / (1 - beta2 ** t)
    p -= lr * m_hat / (np.sqrt(v_hat) + eps)


def adamw(p, state, grad, t, *, lr, betas, eps, weight_decay, amsgrad, maximize):
    """torch.optim.AdamW docs: θ = θ − γλθ, then Adam's moments and step (no L2 term)."""
    adam(p, state, grad, t, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
         amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True)


def adagrad(p, state, grad, t, *, lr, lr_decay, weight_decay, initial_accumulator_value,
            eps, maximize):
    """torch.optim.Adagrad docs: γ̃ = γ/(1+(t−1)η); g = ±grad + λθ; s = s + g²
    (s_0 = initial_accumulator_value); θ = θ − γ̃·g/(√s + ε)."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * p
    clr = lr / (1 + (t - 1) * lr_decay)
    s = state.get("sum", np.full_like(p, initial_accumulator_value)) + g * g
    state["sum"] = s
    p -= clr * g / (np.sqrt(s) + eps)


def adadelta(p, state, grad, t, *, lr, rho, eps, weight_decay, maximize):
    """torch.optim.Adadelta docs: g = ±grad + λθ; v = ρv + (1−ρ)g²;
    Δ = √(u + ε)/√(v + ε)·g; u = ρu + (1−ρ)Δ²; θ = θ − γΔ."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * p
    v = rho * state.get("square_avg", 0.0) + (1 - rho) * g * g
    u = state.get("acc_delta", np.zeros_like(p))
    delta = np.sqrt(u + eps) / np.sqrt(v + eps) * g
    state["square_avg"] = v
    state["acc_delta"] = rho * u + (1 - rho) * delta * delta
    p -= lr * delta


def rmsprop(p, state, grad, t, *, lr, alpha, eps, weight_decay, momentum, centered,
            maximize, eps_in_sqrt):
    """torch.optim.RMSprop docs: g = ±grad + λθ; v = αv + (1−α)g²; centered:
    g_ave = αg_ave + (1−α)g, ṽ = v − g_ave² (hwoptim: clamped at 0); d = √ṽ + ε
    (hwoptim's eps_in_sqrt: √(ṽ + ε)); μ > 0: b = μb + g/d, θ = θ − γb; else θ = θ − γg/d."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * p
    v = alpha * state.get("square_avg", 0.0) + (1 - alpha) * g * g
    state["square_avg"] = v
    var = v
    if centered:
        g_ave = alpha * state.get("grad_avg", 0.0) + (1 - alpha) * g
        state["grad_avg"] = g_ave
        var = np.maximum(v - g_ave * g_ave, 0.0)
    d = np.sqrt(var + eps) if eps_in_sqrt else np.sqrt(var) + eps
    if momentum > 0:
        b = momentum * state.get("momentum_buffer", 0.0) + g / d
        state["momentum_buffer"] = b
        p -= lr * b
    else:
        p -= lr * g / d


def adamax(p, state, grad, t, *, lr, betas, eps, weight_decay, maximize):
    """torch.optim.Adamax docs: g = ±grad + λθ; m = β₁m + (1−β₁)g; u = max(β₂u, |g| + ε);
    θ = θ − γ·m/((1−β₁ᵗ)u)."""
    b1, b2 = betas
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * p
    m = b1 * state.get("exp_avg", 0.0) + (1 - b1) * g
    u = np.maximum(b2 * state.get("exp_inf", np.zeros_like(p)), np.abs(g) + eps)
    state["exp_avg"], state["exp_inf"] = m, u
    p -= lr * m / ((1 - b1 ** t) * u)


def radam(p, state, grad, t, *, lr, betas, eps, weight_decay, decoupled_weight_decay,
          maximize):
    """torch.optim.RAdam docs: g = ±grad; θ ← θ(1−γλ) (decoupled) or g += λθ;
    m = β₁m + (1−β₁)g; v = β₂v + (1−β₂)g²; m̂ = m/(1−β₁ᵗ); ρ∞ = 2/(1−β₂) − 1;
    ρₜ = ρ∞ − 2tβ₂ᵗ/(1−β₂ᵗ); if ρₜ > 5: l = √(1−β₂ᵗ)/(√v + ε),
    r = √((ρₜ−4)(ρₜ−2)ρ∞/((ρ∞−4)(ρ∞−2)ρₜ)), θ = θ − γ·m̂·r·l; else θ = θ − γ·m̂."""
    b1, b2 = betas
    g = -grad if maximize else grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            p *= 1 - lr * weight_decay
        else:
            g = g + weight_decay * p
    m = b1 * state.get("exp_avg", 0.0) + (1 - b1) * g
    v = b2 * state.get("exp_avg_sq", 0.0) + (1 - b2) * g * g
    state["exp_avg"], state["exp_avg_sq"] = m, v
    m_hat = m / (1 - b1 ** t)
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2 ** t / (1 - b2 ** t)
    if rho_t > 5:
        l_t = np.sqrt(1 - b2 ** t) / (np.sqrt(v) + eps)
        r_t = np.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        p -= lr * m_hat * r_t * l_t
    else:
        p -= lr * m_hat


def rprop(p, state, grad, t, *, lr, etas, step_sizes, maximize):
    """torch.optim.Rprop docs: g = ±grad; if g·g₋ > 0: η = min(η·η₊, Γmax); if < 0:
    η = max(η·η₋, Γmin), g = 0; else η unchanged; θ = θ − η·sign(g); g₋ = g. η starts at
    lr. torch's implementation clamps η to [Γmin, Γmax] on every branch (the docs' form
    assumes η is in range; an lr outside it is clamped at the first step), as here."""
    em, ep = etas
    lo, hi = step_sizes
    g = -grad if maximize else grad
    prev = state.get("prev", np.zeros_like(p))
    eta = state.get("step_size", np.full_like(p, lr))
    prod = g * prev
    eta = np.clip(np.where(prod > 0, eta * ep, np.where(prod < 0, eta * em, eta)), lo, hi)
    g = np.where(prod < 0, 0.0, g)
    state["prev"], state["step_size"] = g, eta
    p -= np.sign(g) * eta


def lion(p, state, grad, t, *, lr, betas, weight_decay, maximize):
    """Chen et al. 2023, Algorithm 2 (and optax.lion): c = β₁m + (1−β₁)g;
    θ = θ − η(sign(c) + λθ); m = β₂m + (1−β₂)g. sign(NaN) taken as 0, as torch.sign."""
    b1, b2 = betas
    g = -grad if maximize else grad
    m = state.get("exp_avg", np.zeros_like(p))
    c = b1 * m + (1 - b1) * g
    s = np.sign(np.nan_to_num(c, nan=0.0, posinf=np.inf, neginf=-np.inf))
    p -= lr * (s + weight_decay * p)
    state["exp_avg"] = b2 * m + (1 - b2) * g


def nadam(p, state, grad, t, *, lr, betas, eps, weight_decay, momentum_decay,
          decoupled_weight_decay, maximize):
    """torch.optim.NAdam docs: g = ±grad; θ ← θ(1−γλ) (decoupled) or g += λθ;
    μₜ = β₁(1 − ½·0.96^(tψ)), μₜ₊₁ likewise; m = β₁m + (1−β₁)g; v = β₂v + (1−β₂)g²;
    m̂ = μₜ₊₁m/(1 − ∏ᵢ₌₁ᵗ⁺¹μᵢ) + (1−μₜ)g/(1 − ∏ᵢ₌₁ᵗμᵢ); v̂ = v/(1−β₂ᵗ);
    θ = θ − γm̂/(√v̂ + ε). The product so far is kept as ``_mu_product`` (a scalar)."""
    b1, b2 = betas
    g = -grad if maximize else grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            p *= 1 - lr * weight_decay
        else:
            g = g + weight_decay * p
    mu_t = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    prod = state.get("_mu_product", 1.0) * mu_t
    m = b1 * state.get("exp_avg", 0.0) + (1 - b1) * g
    v = b2 * state.get("exp_avg_sq", 0.0) + (1 - b2) * g * g
    state["exp_avg"], state["exp_avg_sq"], state["_mu_product"] = m, v, prod
    m_hat = mu_next * m / (1 - prod * mu_next) + (1 - mu_t) * g / (1 - prod)
    p -= lr * m_hat / (np.sqrt(v / (1 - b2 ** t)) + eps)


def asgd(p, state, grad, t, *, lr, lambd, alpha, t0, weight_decay, maximize):
    """torch.optim.ASGD (docs and implementation): g = ±grad + λ₂θ; with ηₜ, μₜ set by the
    step before (η₁ = γ, μ₁ = 1): θ = θ(1 − ληₜ) − ηₜg; ā = θ while μₜ = 1, else
    ā = ā + μₜ(θ − ā); then ηₜ₊₁ = γ/(1 + λγt)^α, μₜ₊₁ = 1/max(1, t − t₀). ā starts at 0;
    the step size and weight (scalars) are kept as ``_eta``, ``_mu``."""
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g + weight_decay * p
    eta, mu = state.get("_eta", lr), state.get("_mu", 1.0)
    p *= 1 - lambd * eta
    p -= eta * g
    ax = state.get("ax", np.zeros_like(p))
    state["ax"] = p.copy() if mu == 1 else ax + mu * (p - ax)
    state["_eta"] = lr / (1 + lambd * lr * t) ** alpha
    state["_mu"] = 1 / max(1, t - t0)


def lamb(p, state, grad, t, *, lr, betas, eps, weight_decay, trust_ratio, maximize):
    """optax.lamb (its docs: scale_by_adam, add_decayed_weights, scale_by_trust_ratio,
    scale_by_learning_rate): m = β₁m + (1−β₁)g; v = β₂v + (1−β₂)g²; u = m̂/(√v̂ + ε) + λθ;
    r = ‖θ‖/‖u‖, 1 where either norm is 0; θ = θ − γ·r·u. Norms over the whole array."""
    b1, b2 = betas
    g = -grad if maximize else grad
    m = (1 - b1) * g + b1 * state.get("exp_avg", 0.0)
    v = (1 - b2) * g * g + b2 * state.get("exp_avg_sq", 0.0)
    state["exp_avg"], state["exp_avg_sq"] = m, v
    u = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + weight_decay * p
    if trust_ratio:
        pn, un = np.linalg.norm(p.ravel()), np.linalg.norm(u.ravel())
        u = u * (1.0 if pn == 0 or un == 0 else pn / un)   # optax: NaN norms give NaN
    p -= lr * u


def lars(p, state, grad, t, *, lr, momentum, dampening, weight_decay, trust_coefficient,
         eps, nesterov, trust_ratio, maximize):
    """torchlars (kakaobrain) around torch.optim.SGD, i.e. the LARS paper's local rate:
    r = c‖θ‖/(‖g‖ + λ‖θ‖ + ε), 1 where a norm is 0; d = r(g + λθ); then SGD with momentum
    (buffer = d on the first step), dampening and Nesterov on d: θ = θ − γ·d."""
    g = -grad if maximize else grad
    d = g + weight_decay * p
    if trust_ratio:
        pn, gn = np.linalg.norm(p.ravel()), np.linalg.norm(g.ravel())
        d = d * (trust_coefficient * pn / (gn + weight_decay * pn + eps)
                 if pn > 0 and gn > 0 else 1.0)
    if momentum != 0:
        b = (momentum * state["momentum_buffer"] + (1 - dampening) * d) if t > 1 else d.copy()
        state["momentum_buffer"] = b
        d = d + momentum * b if nesterov else b
    p -= lr * d


def adafactor(p, state, grad, t, *, lr, beta2_decay, eps, d, weight_decay, maximize):
    """torch.optim.Adafactor docs: G = ±grad; β̂₂ = 1 − t^τ; ρ = min(γ, 1/√t);
    α = max(ε₂, RMS(θ))ρ; θ = θ − γλθ; ≥ 2 dims: R = β̂₂R + (1−β̂₂)·rowmean(G²),
    C = β̂₂C + (1−β̂₂)·colmean(G²), V̂ = RC/max(mean(R), ε₁); else V̂ = β̂₂V̂ + (1−β̂₂)G²;
    U = G/max(√V̂, ε₁); Û = U/max(1, RMS(U)/d); θ = θ − αÛ. ε₁ None: the dtype's epsilon."""
    eps1, eps2 = eps
    if eps1 is None:
        eps1 = np.finfo(p.dtype).eps
    g = -grad if maximize else grad
    b2 = 1 - t ** beta2_decay
    alpha = max(eps2, np.sqrt(np.mean(p * p))) * min(lr, 1 / np.sqrt(t))
    p -= lr * weight_decay * p
    if g.ndim > 1:
        r = b2 * state.get("row_var", 0.0) + (1 - b2) * np.mean(g * g, axis=-1, keepdims=True)
        c = b2 * state.get("col_var", 0.0) + (1 - b2) * np.mean(g * g, axis=-2, keepdims=True)
        state["row_var"], state["col_var"] = r, c
        v = r * c / np.maximum(np.mean(r, axis=-2, keepdims=True), eps1)
    else:
        v = state["variance"] = b2 * state.get("variance", 0.0) + (1 - b2) * g * g
    u = g / np.maximum(np.sqrt(v), eps1)
    p -= alpha * u / max(1.0, np.sqrt(np.mean(u * u)) / d)


# torch.optim 2.13's documented defaults (each optimizer's signature in its docs), plus
# hwoptim's own options (RMSprop's eps_in_sqrt, Adam's decoupled_weight_decay as in torch)
DEFAULTS = {
    "SGD": dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                maximize=False),
    "Adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False, decoupled_weight_decay=False),
    "AdamW": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                  maximize=False),
    "Adagrad": dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                    eps=1e-10, maximize=False),
    "Adadelta": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
    "Adamax": dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False),
    "RAdam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  decoupled_weight_decay=False, maximize=False),
    "Rprop": dict(lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), maximize=False),
    "NAdam": dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False),
    "ASGD": dict(lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0, maximize=False),
    # no torch.optim twin: the paper's defaults (optax.lion's too)
    "Lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False),
    # no torch.optim twin: optax.lamb's (eps 1e-6; lr as pytorch-optimizer's), and torchlars'
    # around torch.optim.SGD (trust 1e-3, eps 1e-8; momentum 0.9 as optax.lars)
    "LAMB": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, trust_ratio=True,
                 maximize=False),
    "LARS": dict(lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0,
                 trust_coefficient=1e-3, eps=1e-8, nesterov=False, trust_ratio=True,
                 maximize=False),
    "RMSprop": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                    centered=False, maximize=False, eps_in_sqrt=False),
    "Adafactor": dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0,
                      maximize=False),
}

ORACLES = {"SGD": sgd, "Adam": adam, "AdamW": adamw, "Adagrad": adagrad,
           "Adadelta": adadelta, "RMSprop": rmsprop, "Adamax": adamax,
           "RAdam": radam, "Rprop": rprop, "Lion": lion, "NAdam": nadam, "ASGD": asgd,
           "LAMB": lamb, "LARS": lars, "Adafactor": adafactor}
