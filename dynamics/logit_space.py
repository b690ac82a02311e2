"""Geometry of the logit space of one example (theory.md §1 and S1).

All functions are float64, take arrays and return arrays. Shapes: K classes, d features.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from dynamics._validate import as_count, as_float_array, as_label, as_logits, as_probs


def softmax(z: np.ndarray) -> np.ndarray:
    """p = softmax(z) along the last axis, shape (..., K) -> (..., K).

    Stable: the max is subtracted first, so it is finite for any finite z (e.g. |z| up to 1e4 and beyond).
    """
    z = as_float_array(z, "z")
    if z.ndim == 0:
        raise ValueError("z: expected an array with a class axis, got a scalar")
    shifted = z - np.max(z, axis=-1, keepdims=True)
    expz = np.exp(shifted)
    return expz / np.sum(expz, axis=-1, keepdims=True)


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log p = z - logsumexp(z) along the last axis, shape (..., K) -> (..., K); stable."""
    z = as_float_array(z, "z")
    if z.ndim == 0:
        raise ValueError("z: expected an array with a class axis, got a scalar")
    shifted = z - np.max(z, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def one_hot(label: int, num_classes: int) -> np.ndarray:
    """e_y, shape (K,)."""
    e = np.zeros(as_count(num_classes, "num_classes"))
    e[as_label(label, num_classes)] = 1.0
    return e


def residual(z: np.ndarray, label: int) -> np.ndarray:
    """g = softmax(z) - e_y = ∇_z L for L = -log p_y (theory.md §1); z (K,) -> g (K,)."""
    z = as_logits(z)
    return softmax(z) - one_hot(label, z.shape[0])


def logit_hessian(p: np.ndarray) -> np.ndarray:
    """H_z = diag(p) - p pᵀ = ∇²_z L (theory.md §1); p (K,) -> (K, K), symmetric PSD, H_z 𝟙 = 0."""
    p = as_probs(p)
    return np.diag(p) - np.outer(p, p)


def ntk(phi: np.ndarray) -> float:
    """μ = ‖φ‖², the example's empirical NTK with itself (theory.md §1); phi (d,) -> float."""
    phi = as_float_array(phi, "phi", ndim=1)
    return float(phi @ phi)


def param_hessian(phi: np.ndarray, p: np.ndarray, vec: Literal["col", "row"] = "col") -> np.ndarray:
    """S1, Proposition 3.1 [paper]: the Hessian of L(W) = -log softmax(Wφ)_y in W, shape (K·d, K·d).

    vec="col" (vec stacks the columns of W, the paper's convention):   H_W = (φ φᵀ) ⊗ H_z
    vec="row" (row-major flattening, PyTorch's ``W.reshape(-1)``):     H_W = H_z ⊗ (φ φᵀ)
    phi (d,), p = softmax(Wφ) (K,).
    """
    phi = as_float_array(phi, "phi", ndim=1)
    h_z = logit_hessian(p)
    gram = np.outer(phi, phi)
    if vec == "col":
        return np.kron(gram, h_z)
    if vec == "row":
        return np.kron(h_z, gram)
    raise ValueError(f"vec: expected 'col' or 'row', got {vec!r}")


def _null_complement_basis(num_classes: int) -> np.ndarray:
    """Orthonormal basis (K, K-1) of 𝟙^⊥: columns 2..K of the Householder reflection sending e_1 to 𝟙/√K."""
    u = np.full(num_classes, 1.0 / np.sqrt(num_classes))
    w = u.copy()
    w[0] -= 1.0  # w = u - e_1 is never 0 for K >= 2
    reflection = np.eye(num_classes) - 2.0 * np.outer(w, w) / (w @ w)
    return reflection[:, 1:]


def hessian_eigh(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of H_z = Σ_k λ_k v_k v_kᵀ (used by S4); p (K,) -> (λ (K,), V (K, K)).

    Eigenvalues ascending; eigenvectors are the columns of V, orthonormal. The null mode (λ = 0,
    v = 𝟙/√K) is put in column 0 explicitly and exactly; the other K-1 pairs come from a symmetric
    eigensolver on H_z restricted to 𝟙^⊥, so they are exactly orthogonal to 𝟙 up to round-off whatever the
    multiplicities. Round-off negatives (H_z is PSD) are clipped to 0 so the order stays ascending.
    Sign convention: the entry of largest magnitude of each eigenvector is positive (first such entry on ties).
    Within a repeated eigenvalue the basis is any orthonormal one (the modal energy in that eigenspace is
    what is well defined).
    """
    h_z = logit_hessian(p)
    num_classes = h_z.shape[0]
    basis = _null_complement_basis(num_classes)
    reduced = basis.T @ h_z @ basis
    reduced = 0.5 * (reduced + reduced.T)
    lam, u = np.linalg.eigh(reduced)
    lam = np.maximum(lam, 0.0)
    vecs = basis @ u
    eigenvalues = np.concatenate([[0.0], lam])
    eigenvectors = np.concatenate([np.full((num_classes, 1), 1.0 / np.sqrt(num_classes)), vecs], axis=1)
    idx = np.argmax(np.abs(eigenvectors), axis=0)
    signs = np.sign(eigenvectors[idx, np.arange(num_classes)])  # never 0: a unit vector has |entry| >= 1/√K
    return eigenvalues, eigenvectors * signs


def modal_coefficients(eigenvectors: np.ndarray, g: np.ndarray) -> np.ndarray:
    """S4 [paper]: modal coefficients e = Vᵀ g, i.e. e_k = v_kᵀ g; V (K, K) columns, g (K,) -> e (K,)."""
    eigenvectors = as_float_array(eigenvectors, "eigenvectors", ndim=2)
    num_classes = eigenvectors.shape[0]
    if eigenvectors.shape != (num_classes, num_classes):
        raise ValueError(f"eigenvectors: expected a square (K, K) matrix, got shape {eigenvectors.shape}")
    g = as_float_array(g, "g", ndim=1, size=num_classes)
    return eigenvectors.T @ g
