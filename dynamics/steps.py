"""Exact one-step GD / SAM updates in parameter space and in logit space (S2).

ρ = 0 takes literally the same code path as a SAM step (the perturbation is then exactly zero), so it is the
GD step bit for bit. A zero gradient gives a zero perturbation, never NaN. η and ρ may have either sign.
"""

from __future__ import annotations

import numpy as np

from dynamics._validate import as_float_array, as_label, as_logits, as_scalar
from dynamics.logit_space import one_hot, residual, softmax


def effective_radius(rho: float, mu: float, g: np.ndarray) -> float:
    """S2 [ours]: ρ̃ = ρ √μ / ‖g‖, the logit-space SAM radius (εφ = ρ̃ g); 0.0 when g = 0. g (K,) -> float."""
    rho = as_scalar(rho, "rho")
    mu = as_scalar(mu, "mu", nonnegative=True)
    g = as_float_array(g, "g", ndim=1)
    norm = float(np.linalg.norm(g))
    if norm == 0.0:
        return 0.0
    return rho * np.sqrt(mu) / norm


def sam_perturbation(grad: np.ndarray, rho: float) -> np.ndarray:
    """ε = ρ ∇/‖∇‖_F (Foret et al.), any shape; exactly zero when ρ = 0 or the gradient is zero."""
    grad = as_float_array(grad, "grad")
    rho = as_scalar(rho, "rho")
    norm = float(np.linalg.norm(grad))
    if norm == 0.0:
        return np.zeros_like(grad)
    return (rho / norm) * grad


def sam_param_step(W: np.ndarray, phi: np.ndarray, label: int, eta: float, rho: float = 0.0) -> np.ndarray:
    """One SAM step in parameter space (theory.md §1; GD when ρ = 0, bit for bit).

        ε = ρ g φᵀ / ‖g φᵀ‖_F,   W⁺ = W − η (softmax((W + ε) φ) − e_y) φᵀ
    W (K, d), phi (d,) -> W⁺ (K, d).
    """
    W = as_float_array(W, "W", ndim=2)
    phi = as_float_array(phi, "phi", ndim=1, size=W.shape[1])
    label = as_label(label, W.shape[0])
    eta = as_scalar(eta, "eta", nonzero=True)
    rho = as_scalar(rho, "rho")
    if W.shape[0] < 2:
        raise ValueError(f"W: expected at least 2 classes (rows), got shape {W.shape}")
    grad = np.outer(residual(W @ phi, label), phi)
    perturbed = W + sam_perturbation(grad, rho)
    grad_at_perturbed = np.outer(residual(perturbed @ phi, label), phi)
    return W - eta * grad_at_perturbed


def sam_logit_increment(z: np.ndarray, label: int, mu: float, eta: float, rho: float = 0.0) -> np.ndarray:
    """S2 [ours]: Δz = z⁺ − z = −η μ (softmax(z + ρ̃ g) − e_y), computed directly (no cancellation).

    z (K,) -> Δz (K,). ρ = 0 gives the GD increment −η μ g bit for bit.
    """
    z = as_logits(z)
    label = as_label(label, z.shape[0])
    mu = as_scalar(mu, "mu", nonnegative=True)
    eta = as_scalar(eta, "eta", nonzero=True)
    rho = as_scalar(rho, "rho")
    g = softmax(z) - one_hot(label, z.shape[0])
    rho_tilde = effective_radius(rho, mu, g)
    g_at_perturbed = softmax(z + rho_tilde * g) - one_hot(label, z.shape[0])
    return -eta * mu * g_at_perturbed


def sam_logit_step(z: np.ndarray, label: int, mu: float, eta: float, rho: float = 0.0) -> np.ndarray:
    """S2 [ours]: the exact SAM step in logit space, z⁺ = z − η μ (softmax(z + ρ̃ g) − e_y), ρ̃ = ρ√μ/‖g‖.

    z (K,) -> z⁺ (K,). Equals Wφ after ``sam_param_step`` when z = Wφ and μ = ‖φ‖² (to round-off).
    """
    z = as_logits(z)
    return z + sam_logit_increment(z, label, mu, eta, rho)
