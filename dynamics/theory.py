"""First-order predictions of S3/S4 and the one-step confidence ratios of S5/S6 (theory.md §2).

Float64 arrays in, arrays out. K classes, d features; ``label`` is the trained class y.
"""

from __future__ import annotations

import numpy as np

from dynamics._validate import as_float_array, as_label, as_logits, as_probs, as_scalar
from dynamics.logit_space import hessian_eigh, logit_hessian, modal_coefficients, one_hot, residual, softmax
from dynamics.steps import effective_radius, sam_logit_increment


def _residual_and_hessian(z: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = as_logits(z)
    p = softmax(z)
    g = p - one_hot(label, z.shape[0])
    return p, g, logit_hessian(p)


def predicted_logit_increment(
    z: np.ndarray, label: int, mu: float, eta: float, rho: float = 0.0
) -> np.ndarray:
    """S3, Theorem 3.2 [reconstructed: logit form]: Δz ≈ −η μ (I + ρ̃ H_z) g, remainder O(|η| ρ̃²).

    z (K,) -> predicted z⁺ − z (K,), ρ̃ = ρ√μ/‖g‖.
    """
    mu = as_scalar(mu, "mu", nonnegative=True)
    eta = as_scalar(eta, "eta", nonzero=True)
    _, g, h_z = _residual_and_hessian(z, label)
    rho_tilde = effective_radius(rho, mu, g)
    return -eta * mu * (g + rho_tilde * (h_z @ g))


def predicted_logit_step(z: np.ndarray, label: int, mu: float, eta: float, rho: float = 0.0) -> np.ndarray:
    """S3, Theorem 3.2 [reconstructed: logit form]: z⁺ ≈ z − η μ (I + ρ̃ H_z) g; z (K,) -> (K,)."""
    return as_logits(z) + predicted_logit_increment(z, label, mu, eta, rho)


def predicted_param_increment(
    W: np.ndarray, phi: np.ndarray, label: int, eta: float, rho: float = 0.0
) -> np.ndarray:
    """S3, Theorem 3.2 [reconstructed: parameter form]: ΔW ≈ −η (g + ρ̃ H_z g) φᵀ, remainder O(|η| ρ̃²).

    W (K, d), phi (d,) -> predicted W⁺ − W (K, d), with g, H_z at z = Wφ and ρ̃ = ρ‖φ‖/‖g‖.
    """
    W = as_float_array(W, "W", ndim=2)
    phi = as_float_array(phi, "phi", ndim=1, size=W.shape[1])
    mu = float(phi @ phi)
    eta = as_scalar(eta, "eta", nonzero=True)
    _, g, h_z = _residual_and_hessian(W @ phi, label)
    rho_tilde = effective_radius(rho, mu, g)
    return -eta * np.outer(g + rho_tilde * (h_z @ g), phi)


def predicted_param_step(
    W: np.ndarray, phi: np.ndarray, label: int, eta: float, rho: float = 0.0
) -> np.ndarray:
    """S3, Theorem 3.2 [reconstructed: parameter form]: W⁺ ≈ W − η (g + ρ̃ H_z g) φᵀ; W (K, d) -> (K, d)."""
    return as_float_array(W, "W", ndim=2) + predicted_param_increment(W, phi, label, eta, rho)


def predicted_residual_increment(
    z: np.ndarray, label: int, mu: float, eta: float, rho: float = 0.0
) -> np.ndarray:
    """S3, Theorem 3.2 [paper: residual form]: g⁺ − g ≈ −η μ (H_z + ρ̃ H_z²) g, remainder O(η²) for ρ ∝ √|η|.

    z (K,) -> (K,).
    """
    mu = as_scalar(mu, "mu", nonnegative=True)
    eta = as_scalar(eta, "eta", nonzero=True)
    _, g, h_z = _residual_and_hessian(z, label)
    rho_tilde = effective_radius(rho, mu, g)
    h_g = h_z @ g
    return -eta * mu * (h_g + rho_tilde * (h_z @ h_g))


def predicted_residual(z: np.ndarray, label: int, mu: float, eta: float, rho: float = 0.0) -> np.ndarray:
    """S3, Theorem 3.2 [paper: residual form]: g⁺ ≈ (I − η μ H_z − η μ ρ̃ H_z²) g; z (K,) -> (K,)."""
    return residual(z, label) + predicted_residual_increment(z, label, mu, eta, rho)


def modal_gains(eigenvalues: np.ndarray, mu: float, eta: float, rho_tilde: float) -> np.ndarray:
    """S4, Corollary 3.4 [paper]: per-mode gains 1 − η μ (λ_k + ρ̃ λ_k²); eigenvalues (K,) -> (K,)."""
    lam = as_float_array(eigenvalues, "eigenvalues", ndim=1)
    mu = as_scalar(mu, "mu", nonnegative=True)
    eta = as_scalar(eta, "eta", nonzero=True)
    rho_tilde = as_scalar(rho_tilde, "rho_tilde")
    return 1.0 - eta * mu * (lam + rho_tilde * lam**2)


def predicted_modal_step(
    z: np.ndarray, label: int, mu: float, eta: float, rho: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S4, Corollary 3.4 [paper]: v_kᵀ g⁺ ≈ (1 − η μ (λ_k + ρ̃ λ_k²)) e_k in the eigenbasis of H_z at z.

    z (K,) -> (predicted v_kᵀ g⁺ (K,), eigenvalues (K,) ascending, eigenvectors (K, K) columns).
    """
    p, g, _ = _residual_and_hessian(z, label)
    eigenvalues, eigenvectors = hessian_eigh(p)
    rho_tilde = effective_radius(rho, mu, g)
    gains = modal_gains(eigenvalues, mu, eta, rho_tilde)
    return gains * modal_coefficients(eigenvectors, g), eigenvalues, eigenvectors


def log_confidence_ratios(p: np.ndarray, delta_z: np.ndarray) -> np.ndarray:
    """S5/S6: log α_k = Δz_k − log Σ_j p_j exp(Δz_j), where α_k = p_k⁺ / p_k; p (K,), Δz (K,) -> (K,).

    Accurate for small Δz (uses expm1/log1p: relative, not absolute, round-off in log α).
    """
    p = as_probs(p)
    delta_z = as_float_array(delta_z, "delta_z", ndim=1, size=p.shape[0])
    if np.max(np.abs(delta_z)) < 1.0:
        return delta_z - np.log1p(float(p @ np.expm1(delta_z)))
    shift = float(np.max(delta_z))
    return delta_z - shift - np.log(float(p @ np.exp(delta_z - shift)))


def confidence_ratios(p: np.ndarray, delta_z: np.ndarray) -> np.ndarray:
    """S5/S6: α_k = p_k⁺ / p_k = exp(Δz_k) / Σ_j p_j exp(Δz_j); p (K,), Δz (K,) -> (K,)."""
    return np.exp(log_confidence_ratios(p, delta_z))


def runner_up(p: np.ndarray, label: int) -> int:
    """y* = argmax_{k≠y} p_k, the most confident other class (first index on ties); p (K,) -> int."""
    p = as_probs(p)
    label = as_label(label, p.shape[0])
    masked = p.copy()
    masked[label] = -np.inf
    return int(np.argmax(masked))


def step_confidence_ratios(z: np.ndarray, label: int, mu: float, eta: float, rho: float = 0.0) -> np.ndarray:
    """S5 [reconstructed] (ρ = 0) and S6 [paper] (ρ ≠ 0): exact one-step ratios α = p⁺/p of the logit step.

    Δz = −η μ (softmax(z + ρ̃ g) − e_y) (S2); z (K,) -> α (K,).
    """
    z = as_logits(z)
    return confidence_ratios(softmax(z), sam_logit_increment(z, label, mu, eta, rho))


def s6_sign_vector(p: np.ndarray, label: int) -> np.ndarray:
    """S6, Corollary 3.6 [paper] first-order reason: c = H_z g − (pᵀ H_z g) 𝟙; p (K,) -> c (K,).

    Δlog p^{SAM} − Δlog p^{GD} = −η μ ρ̃ c + higher order; the sign fact is c_{y*} ≥ 0 and c_y ≤ 0.
    """
    p = as_probs(p)
    g = p - one_hot(label, p.shape[0])
    h_g = logit_hessian(p) @ g
    return h_g - float(p @ h_g)


def s6_sign_fact(p: np.ndarray, label: int) -> tuple[float, float]:
    """S6 [paper] sign fact: returns (c_{y*}, c_y) of ``s6_sign_vector``; the claim is c_{y*} ≥ 0 ≥ c_y."""
    c = s6_sign_vector(p, label)
    return float(c[runner_up(p, label)]), float(c[as_label(label, c.shape[0])])
