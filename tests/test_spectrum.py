"""Vocabulary-scale spectrum of H_z = diag(p) − ppᵀ (dynamics.spectrum) against dense numpy eigh.

Tolerances. numpy's eigh is backward stable: its eigenvalues are exact for H_z + E with ‖E‖ ≲ c·V·eps·‖H_z‖,
‖H_z‖ ≤ max p ≤ 1, so by Weyl two correct solvers differ by ≲ c·V·eps; we allow 64·V·eps. The same bound holds
for the residual ‖H_z v − λv‖ of a backward-stable eigenpair. Orthogonality of two computed eigenvectors is
bounded by Davis–Kahan: sin∠(v_i, exact) ≤ ‖r_i‖ / gap_i, so |v_iᵀv_j| ≤ ‖r_i‖/gap_i + ‖r_j‖/gap_j.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamics.logit_space import modal_coefficients
from dynamics.spectrum import (
    full_spectrum,
    hz_matvec,
    near_flat_probs,
    secular_function,
    top_mode_batched,
    top_mode_share,
    top_modes,
    zipf_probs,
)

EPS = np.finfo(np.float64).eps


def dense_hz(p: np.ndarray) -> np.ndarray:
    return np.diag(p) - np.outer(p, p)


@st.composite
def probs(draw, min_size: int = 2, max_size: int = 40) -> np.ndarray:
    """Peaked (Zipf-like), flat, repeated-value, tiny/zero-entry distributions and K = 2."""
    size = draw(st.integers(min_size, max_size))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["zipf", "flat", "repeated", "tiny", "dirichlet"]))
    if kind == "zipf":
        p = zipf_probs(size, exponent=draw(st.floats(0.5, 3.0)), seed=seed)
    elif kind == "flat":
        p = near_flat_probs(size, scale=draw(st.sampled_from([1e-6, 1e-3, 0.1])), seed=seed)
    elif kind == "repeated":
        levels = rng.uniform(0.1, 1.0, size=draw(st.integers(1, 4)))
        p = levels[rng.integers(0, levels.size, size=size)]
        p = p / p.sum()
    elif kind == "tiny":
        p = rng.dirichlet(np.ones(size))
        tiny = rng.random(size) < 0.4
        p[tiny] = rng.choice([0.0, 1e-300, 1e-160, 1e-30, 1e-12], size=int(tiny.sum()))
        if p.sum() == 0.0:
            p[0] = 1.0
        p = p / p.sum()
    else:
        p = rng.dirichlet(np.full(size, draw(st.sampled_from([0.05, 1.0, 20.0]))))
    return p


def check_eigenpairs(
    p: np.ndarray,
    values: np.ndarray,
    vectors: np.ndarray,
    reference: np.ndarray,
    spectrum: np.ndarray | None = None,
) -> None:
    """The checker: eigenvalues vs a reference (sorted the same way), residuals, unit norms, orthogonality.
    `spectrum` (all eigh eigenvalues, for the gaps) is recomputed when not given."""
    size = p.shape[0]
    tol = 64 * size * EPS
    dense = dense_hz(p)
    assert vectors.shape == (size, values.shape[0])
    assert np.max(np.abs(values - reference)) <= tol
    residual = np.linalg.norm(dense @ vectors - vectors * values, axis=0)
    assert np.max(residual) <= tol
    assert np.allclose(np.linalg.norm(vectors, axis=0), 1.0, rtol=0, atol=16 * EPS * size)
    spectrum = np.linalg.eigvalsh(dense) if spectrum is None else spectrum
    gaps = np.array(
        [np.min(np.abs(np.delete(spectrum, np.argmin(np.abs(spectrum - v))) - v)) for v in values]
    )
    gaps = np.maximum(gaps, 1e-300)
    gram = np.abs(vectors.T @ vectors - np.eye(values.shape[0]))
    bound = 16 * size * EPS + tol / gaps[:, None] + tol / gaps[None, :]
    assert np.all(gram <= bound)


@given(probs(), st.integers(0, 2**31 - 1))
def test_matvec_matches_dense(p, seed):
    x = np.random.default_rng(seed).standard_normal((p.shape[0], 3))
    expected = dense_hz(p) @ x
    # Both sides are sums of V products of numbers ≤ 1 in size: error ≲ V·eps·‖x‖.
    assert np.allclose(hz_matvec(p, x), expected, rtol=0, atol=8 * p.shape[0] * EPS * np.abs(x).max())
    assert np.allclose(
        hz_matvec(p, x[:, 0]), expected[:, 0], rtol=0, atol=8 * p.shape[0] * EPS * np.abs(x).max()
    )


@given(probs())
def test_full_spectrum_matches_eigh(p):
    values, vectors = full_spectrum(p)
    assert values.shape == p.shape and np.all(np.diff(values) >= 0)
    spectrum = np.linalg.eigvalsh(dense_hz(p))
    check_eigenpairs(p, values, vectors, spectrum, spectrum)


@settings(max_examples=40)
@given(probs(min_size=20, max_size=120), st.integers(1, 16))
def test_top_modes_match_eigh(p, k):
    k = min(k, p.shape[0])
    values, vectors = top_modes(p, k)
    assert np.all(np.diff(values) <= 0)
    spectrum = np.linalg.eigvalsh(dense_hz(p))
    check_eigenpairs(p, values, vectors, spectrum[::-1][:k], spectrum)


@given(probs())
def test_interlacing_and_null_mode(p):
    """0 = λ_1 ≤ p_(1) ≤ λ_2 ≤ p_(2) ≤ … ≤ λ_V ≤ p_(V) (theory.md §1), and v_1 = 𝟙/√V."""
    values, vectors = full_spectrum(p)
    sorted_p = np.sort(p)
    tol = 64 * p.shape[0] * EPS
    assert values[0] == 0.0
    assert np.all(values[1:] >= sorted_p[:-1] - tol) and np.all(values <= sorted_p + tol)
    assert np.allclose(vectors[:, 0], 1.0 / np.sqrt(p.shape[0]), rtol=0, atol=EPS)


@given(probs(min_size=3), st.data())
def test_modal_share_matches_dense(p, data):
    """The top-k share equals the dense eigh projection share; the null mode carries no residual (S4).

    (Roots of f are checked through the eigenvector residual in `check_eigenpairs`: evaluating f itself at a
    rounded λ̂ next to a pole is ill-conditioned, f' ~ p²/(p − λ)², so it is not a usable check.)
    """
    values, vectors = full_spectrum(p)
    label = data.draw(st.integers(0, p.shape[0] - 1))
    g = p.copy()
    g[label] -= 1.0
    k = data.draw(st.integers(1, p.shape[0]))
    share = top_mode_share(p, g, k)
    w, U = np.linalg.eigh(dense_hz(p))
    coeffs = modal_coefficients(vectors, g)
    # S4: the null mode carries no residual: 𝟙ᵀg = Σp − 1, zero up to how exactly the stored p sums to 1
    # (math.fsum), plus the rounding of the float sum, ≤ V·eps·Σ|g|.
    exact_sum = abs(math.fsum(g)) / np.sqrt(p.shape[0])
    assert abs(coeffs[0]) <= exact_sum + p.shape[0] * EPS * np.abs(g).sum()
    if k < p.shape[0] and w[-k] - w[-k - 1] > 1e-6:  # the top-k subspace is well defined
        dense_share = float(np.sum((U[:, -k:].T @ g) ** 2) / (g @ g))
        assert abs(share - dense_share) <= 1e-8
    assert 0.0 <= share <= 1.0 + 1e-12


def test_cross_check_with_core_hessian_eigh():
    from dynamics.logit_space import hessian_eigh

    for p in (zipf_probs(30, seed=3), near_flat_probs(30, seed=3), np.array([0.25, 0.75])):
        values, _ = full_spectrum(p)
        core_values, _ = hessian_eigh(p)
        assert np.max(np.abs(values - core_values)) <= 64 * p.shape[0] * EPS


def test_k_equal_2_closed_form():
    """K = 2: eigenvalues 0 and 2 p_1 p_2 = tr H_z, eigenvector (1, −1)/√2."""
    p = np.array([0.3, 0.7])
    values, vectors = full_spectrum(p)
    assert np.allclose(values, [0.0, 2 * 0.3 * 0.7], rtol=0, atol=4 * EPS)
    assert np.allclose(np.abs(vectors[:, 1]), 1 / np.sqrt(2), rtol=0, atol=4 * EPS)


@pytest.mark.parametrize("maker", [zipf_probs, near_flat_probs])
def test_top16_at_gpt2_vocab(maker):
    """V = 50,257 (no dense reference possible): residuals via the O(V) matvec, orthonormality, interlacing."""
    p = maker(50257, seed=1)
    values, vectors = top_modes(p, 16)
    residual = np.linalg.norm(hz_matvec(p, vectors) - vectors * values, axis=0)
    assert np.max(residual) <= 1e-12  # observed ~1e-17; eigh-class bound 64·V·eps ≈ 7e-10 is far looser
    assert np.max(np.abs(vectors.T @ vectors - np.eye(16))) <= 1e-10
    top = np.sort(p)[::-1][:17]
    assert np.all(values <= top[:16]) and np.all(values >= top[1:17])


def test_top_modes_agree_with_full_spectrum_large():
    p = zipf_probs(1500, seed=5)
    top_values, top_vectors = top_modes(p, 16)
    values, vectors = full_spectrum(p)
    assert np.max(np.abs(top_values - values[::-1][:16])) <= 1e-15
    assert np.max(np.abs(np.abs(np.sum(top_vectors * vectors[:, ::-1][:, :16], axis=0)) - 1.0)) <= 1e-10


def test_checker_rejects_wrong_variants():
    """The checker must fail on plausible bugs: v ∝ 1/(p_i − λ) (numerator dropped), and roots of the
    wrong secular equation 1 = Σ p_i/(p_i − λ) (weights p_i instead of p_i²)."""
    p = zipf_probs(12, seed=2)
    reference = np.linalg.eigh(dense_hz(p))[0]
    values, vectors = full_spectrum(p)
    check_eigenpairs(p, values, vectors, reference)  # the right answer passes
    bad_vectors = vectors.copy()
    for j in range(1, p.shape[0]):
        u = 1.0 / (p - values[j])
        bad_vectors[:, j] = u / np.linalg.norm(u)
    with pytest.raises(AssertionError):
        check_eigenpairs(p, values, bad_vectors, reference)
    # Wrong weights: H' = diag(p) − √p √pᵀ has those roots; its eigenpairs are not those of H_z.
    wrong_values, wrong_vectors = np.linalg.eigh(np.diag(p) - np.outer(np.sqrt(p), np.sqrt(p)))
    with pytest.raises(AssertionError):
        check_eigenpairs(p, wrong_values, wrong_vectors, reference)


@pytest.mark.parametrize(
    "bad",
    [
        np.array([0.5, np.nan]),
        np.array([0.5, 0.6]),
        np.array([1.2, -0.2]),
        np.ones((2, 2)) / 4,
        np.array([1.0]),
    ],
)
def test_invalid_probabilities_raise(bad):
    with pytest.raises(ValueError):
        top_modes(bad, 1)
    with pytest.raises(ValueError):
        full_spectrum(bad)


@pytest.mark.parametrize("k", [0, 5, 1.5, True])
def test_invalid_k_raises(k):
    with pytest.raises(ValueError, match="k:"):
        top_modes(np.array([0.2, 0.3, 0.5, 0.0]), k)


def test_secular_function_vanishes_at_zero_and_changes_sign():
    """f(0) = 1 − Σp = 0 (the null mode), and f runs from +∞ to −∞ between consecutive poles."""
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert abs(float(secular_function(p, 0.0))) <= 4 * EPS
    f = secular_function(p, np.array([0.1 + 1e-9, 0.2 - 1e-9]))
    assert f[0] > 0 > f[1]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_top_modes_with_few_positive_entries_at_large_v(k):
    """A near-one-hot token (only 3 entries above TINY) at V = 50,257: no O(V²) fallback, and modes past the
    positive structure are null vectors (λ = 0), orthonormal and orthogonal to the positive modes."""
    size = 50257
    p = np.zeros(size)
    p[[5, 70, 900]] = [0.7, 0.2, 0.1 - 1e-200]
    p[1000] = 1e-200
    values, vectors = top_modes(p, k)
    dense = dense_hz(p[[5, 70, 900]])
    expected = np.concatenate([np.linalg.eigh(dense)[0][::-1][:2], np.zeros(max(0, k - 2))])[:k]
    assert np.max(np.abs(values - expected)) <= 1e-15
    assert np.max(np.linalg.norm(hz_matvec(p, vectors) - vectors * values, axis=0)) <= 1e-15
    assert np.max(np.abs(vectors.T @ vectors - np.eye(k))) <= 1e-13


def test_top_mode_batched_matches_per_row():
    """Batched top-1 over rows (distinct and tied maxima) equals `top_modes(row, 1)` up to sign."""
    rows = [zipf_probs(200, seed=i) for i in range(4)] + [near_flat_probs(200, seed=9)]
    tied = np.full(200, 0.5 / 198)
    tied[[3, 17]] = 0.25
    probs = np.stack(rows + [tied])
    values, vectors = top_mode_batched(probs)
    for row in range(probs.shape[0]):
        ref_values, ref_vectors = top_modes(probs[row], 1)
        assert abs(values[row] - ref_values[0]) <= 1e-16
        assert abs(abs(vectors[row] @ ref_vectors[:, 0]) - 1.0) <= 1e-13
    with pytest.raises(ValueError):
        top_mode_batched(np.ones((2, 3)))
