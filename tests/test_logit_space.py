"""S1 (Proposition 3.1, Kronecker structure of H_W) and the geometry of theory.md §1."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamics.logit_space import (
    hessian_eigh,
    log_softmax,
    logit_hessian,
    modal_coefficients,
    ntk,
    one_hot,
    param_hessian,
    residual,
    softmax,
)

# Exact formulas evaluated in float64: differences to an independent float64 computation are round-off only,
# a few ulps of the largest entry. 1e-12 relative leaves a 1e3 margin over that and is far below any real error.
ROUND_OFF = 1e-12


def _instance(seed: int, num_classes: int, dim: int, logit_scale: float):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((num_classes, dim)) * logit_scale / np.sqrt(dim)
    phi = rng.standard_normal(dim)
    return W, phi, int(rng.integers(num_classes))


def _autograd_hessian(W: np.ndarray, phi: np.ndarray, label: int) -> np.ndarray:
    """Independent Hessian of L(W) = -log softmax(Wφ)_y, float64 torch autograd, shape (K, d, K, d)."""
    phi_t = torch.tensor(phi, dtype=torch.float64)

    def loss(w: torch.Tensor) -> torch.Tensor:
        return -torch.log_softmax(w @ phi_t, dim=0)[label]

    return torch.autograd.functional.hessian(loss, torch.tensor(W, dtype=torch.float64)).numpy()


def _as_vec_order(hess4: np.ndarray, vec: str) -> np.ndarray:
    """Flatten a (K, d, K, d) Hessian for row-major vec (W.reshape(-1)) or column-stacking vec."""
    K, d = hess4.shape[:2]
    if vec == "row":
        return hess4.reshape(K * d, K * d)
    return hess4.transpose(1, 0, 3, 2).reshape(K * d, K * d)


def hessian_matches(candidate: np.ndarray, reference: np.ndarray) -> bool:
    """The S1 checker: agreement to round-off relative to the largest entry."""
    scale = max(1.0, float(np.max(np.abs(reference))))
    return candidate.shape == reference.shape and bool(
        np.max(np.abs(candidate - reference)) <= ROUND_OFF * scale
    )


dims = st.integers(1, 6)
classes = st.integers(2, 8)
seeds = st.integers(0, 2**32 - 1)
scales = st.floats(0.1, 6.0)


@settings(max_examples=40)
@given(seed=seeds, num_classes=classes, dim=dims, logit_scale=scales, vec=st.sampled_from(["col", "row"]))
def test_s1_kronecker_matches_autograd(seed, num_classes, dim, logit_scale, vec):
    W, phi, label = _instance(seed, num_classes, dim, logit_scale)
    reference = _as_vec_order(_autograd_hessian(W, phi, label), vec)
    assert hessian_matches(param_hessian(phi, softmax(W @ phi), vec=vec), reference)


@settings(max_examples=20)
@given(seed=seeds, num_classes=classes, dim=st.integers(2, 6), logit_scale=scales)
def test_s1_checker_rejects_wrong_vec_order(seed, num_classes, dim, logit_scale):
    """Companion: the Kronecker factors in the wrong order for the vec convention must be rejected."""
    W, phi, label = _instance(seed, num_classes, dim, logit_scale)
    p = softmax(W @ phi)
    hess4 = _autograd_hessian(W, phi, label)
    # The two orders coincide only for degenerate H_z (p one-hot to round-off): skip those, they prove nothing.
    if np.max(logit_hessian(p)) < 1e-6:
        return
    assert not hessian_matches(param_hessian(phi, p, vec="row"), _as_vec_order(hess4, "col"))
    assert not hessian_matches(param_hessian(phi, p, vec="col"), _as_vec_order(hess4, "row"))


@given(seed=seeds, num_classes=classes, dim=dims, logit_scale=scales)
def test_s1_quadratic_form_and_rank(seed, num_classes, dim, logit_scale):
    """vec(ΔW)ᵀ H_W vec(ΔW) = (ΔWφ)ᵀ H_z (ΔWφ) in both vec orders, and rank H_W = rank H_z (φ ≠ 0)."""
    W, phi, _ = _instance(seed, num_classes, dim, logit_scale)
    delta = np.random.default_rng(seed + 1).standard_normal(W.shape)
    p = softmax(W @ phi)
    h_z = logit_hessian(p)
    logit_change = delta @ phi
    expected = logit_change @ h_z @ logit_change
    col = delta.T.reshape(-1) @ param_hessian(phi, p, "col") @ delta.T.reshape(-1)
    row = delta.reshape(-1) @ param_hessian(phi, p, "row") @ delta.reshape(-1)
    scale = np.linalg.norm(delta) ** 2 * (phi @ phi) * max(np.max(p), 1e-300)
    assert abs(col - expected) <= ROUND_OFF * scale
    assert abs(row - expected) <= ROUND_OFF * scale
    tol = 1e-10 * (phi @ phi)
    assert np.linalg.matrix_rank(param_hessian(phi, p), tol=tol) == np.linalg.matrix_rank(h_z, tol=1e-10)


@given(
    z=st.lists(st.floats(-1e4, 1e4), min_size=2, max_size=8),
    batch=st.integers(1, 3),
)
def test_softmax_stable_and_normalised(z, batch):
    z = np.tile(np.array(z), (batch, 1))
    p = softmax(z)
    assert np.all(np.isfinite(p)) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=0, atol=1e-15 * z.shape[-1])
    log_p = log_softmax(z)
    assert np.all(np.isfinite(log_p))
    np.testing.assert_allclose(np.exp(log_p), p, rtol=1e-12, atol=1e-300)


def test_softmax_extreme_values():
    p = softmax(np.array([1e4, -1e4, 0.0]))
    np.testing.assert_array_equal(p, [1.0, 0.0, 0.0])
    assert log_softmax(np.array([1e4, -1e4]))[1] == -2e4


@given(seed=seeds, num_classes=classes, logit_scale=scales)
def test_logit_hessian_facts(seed, num_classes, logit_scale):
    """H_z symmetric PSD, H_z 𝟙 = 0, 𝟙ᵀ g = 0, tr H_z = 1 − ‖p‖², eigenvalues interlace with sorted p."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(num_classes) * logit_scale
    label = int(rng.integers(num_classes))
    p = softmax(z)
    h_z = logit_hessian(p)
    np.testing.assert_array_equal(h_z, h_z.T)
    assert np.max(np.abs(h_z @ np.ones(num_classes))) <= 1e-15
    assert abs(residual(z, label).sum()) <= 1e-15
    assert abs(np.trace(h_z) - (1 - p @ p)) <= 1e-15
    lam, vecs = hessian_eigh(p)
    p_sorted = np.sort(p)
    assert np.all(np.diff(lam) >= 0) and lam[0] == 0.0 and np.all(lam >= 0)
    assert np.all(lam <= p_sorted + 1e-15)
    assert np.all(lam[1:] >= p_sorted[:-1] - 1e-15)
    # Orthonormal, reconstructs H_z, null mode exact in column 0, sign convention.
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(num_classes), atol=1e-14)
    np.testing.assert_allclose(vecs @ np.diag(lam) @ vecs.T, h_z, atol=1e-15)
    np.testing.assert_array_equal(vecs[:, 0], np.full(num_classes, 1 / np.sqrt(num_classes)))
    largest = vecs[np.argmax(np.abs(vecs), axis=0), np.arange(num_classes)]
    assert np.all(largest > 0)
    e = modal_coefficients(vecs, residual(z, label))
    assert abs(e[0]) <= 1e-15  # the null mode carries no residual (S4)
    np.testing.assert_allclose(np.linalg.norm(e), np.linalg.norm(residual(z, label)), rtol=1e-14)


@pytest.mark.parametrize(
    "p",
    [
        np.full(5, 0.2),  # all nonzero eigenvalues equal (1/K, multiplicity K-1)
        np.array([0.25, 0.25, 0.25, 0.25 - 1e-17, 1e-17]),
        np.array([0.5, 0.5, 0.0, 0.0]),  # repeated zero eigenvalue besides the null mode
        np.array([1.0, 0.0, 0.0]),  # H_z = 0
        np.array([0.3, 0.3, 0.4]),
    ],
)
def test_hessian_eigh_repeated_eigenvalues(p):
    lam, vecs = hessian_eigh(p)
    h_z = logit_hessian(p)
    assert np.all(np.isfinite(vecs)) and np.all(np.diff(lam) >= 0)
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(p.size), atol=1e-14)
    np.testing.assert_allclose(vecs @ np.diag(lam) @ vecs.T, h_z, atol=1e-15)
    assert lam[0] == 0.0


def test_uniform_spectrum_value():
    lam, _ = hessian_eigh(np.full(4, 0.25))
    np.testing.assert_allclose(lam, [0, 0.25, 0.25, 0.25], atol=1e-16)


def test_ntk():
    assert ntk(np.array([3.0, 4.0])) == 25.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: softmax(np.array([1.0, np.nan])), "finite"),
        (lambda: softmax(1.0), "class axis"),
        (lambda: residual(np.array([1.0, 2.0]), 2), r"\[0, 2\)"),
        (lambda: residual(np.array([1.0, 2.0]), -1), r"\[0, 2\)"),
        (lambda: residual(np.array([1.0, 2.0]), 0.0), "int class index"),
        (lambda: residual(np.array([1.0, 2.0]), True), "int class index"),
        (lambda: residual(np.ones((2, 2)), 0), "1-d"),
        (lambda: residual(np.array([1.0]), 0), "at least 2"),
        (lambda: logit_hessian(np.array([0.5, 0.6])), "probability"),
        (lambda: logit_hessian(np.array([1.5, -0.5])), "probability"),
        (lambda: param_hessian(np.ones(3), np.array([0.5, 0.5]), vec="colum"), "'col' or 'row'"),
        (lambda: param_hessian(np.ones((3, 1)), np.array([0.5, 0.5])), "1-d"),
        (lambda: ntk(np.array([np.inf])), "finite"),
        (lambda: modal_coefficients(np.eye(3), np.ones(2)), "length 3"),
        (lambda: modal_coefficients(np.ones((3, 2)), np.ones(3)), r"\(K, K\)"),
        (lambda: softmax("abc"), "numeric"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("num_classes", [3.0, "3", None, 0, True])
def test_one_hot_rejects_a_bad_number_of_classes(num_classes):
    """Before: numpy's TypeError ('cannot be interpreted as an integer') or an IndexError."""
    with pytest.raises(ValueError, match="num_classes: expected an int >= 1"):
        one_hot(0, num_classes)
