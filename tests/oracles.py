"""Independent float64 references for every rule: the algorithms as torch.optim 2.13's docs
write them (the pseudo-code on each optimizer's page), in plain NumPy, with nothing taken from
hwoptim's specs, code generator or reference step. Plus hwoptim's two documented extensions:
centered RMSprop clamps the variance at 0, and RMSprop's ``eps_in_sqrt``.

Each function does ONE step in place: ``p`` (float64 array) and ``state`` (dict of arrays,
created on the first call with torch's names and initial values), given the gradient, the
step number ``t`` (from 1) and the group's hyperparameters and options as keywords.
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
    "RMSprop": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                    centered=False, maximize=False, eps_in_sqrt=False),
}

ORACLES = {"SGD": sgd, "Adam": adam, "AdamW": adamw, "Adagrad": adagrad,
           "Adadelta": adadelta, "RMSprop": rmsprop}
