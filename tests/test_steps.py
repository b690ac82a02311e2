"""S2 (exact SAM logit perturbation): parameter-space vs logit-space steps; GD as ρ = 0; bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamics.logit_space import one_hot, residual, softmax
from dynamics.simulate import simulate_logits, simulate_params
from dynamics.steps import (
    effective_radius,
    sam_logit_increment,
    sam_logit_step,
    sam_param_step,
    sam_perturbation,
)

# S2 is exact, so the two simulations differ by round-off only: ~1e-16 per step, amplified over T = 50 steps
# by at most the step Jacobian's norm 1 + |η|μ·max p ≤ 1.2 (|η|μ ≤ 0.2 below), 1.2⁵⁰ ≈ 9e3, times |z| ≲ 10:
# ≲ 1e-11. The spec's 1e-10 bound is therefore a real check, not a tuned tolerance.
AGREEMENT = 1e-10
STEPS = 50


def wrong_logit_step_flipped_rho(z, label, mu, eta, rho):
    """Deliberately wrong S2: the logit perturbation with ρ̃'s sign flipped."""
    g = residual(z, label)
    rho_tilde = -effective_radius(rho, mu, g)
    return z - eta * mu * (softmax(z + rho_tilde * g) - one_hot(label, z.size))


def _setup(seed, num_classes, dim, step_scale, radius, eta_sign, rho_sign):
    rng = np.random.default_rng(seed)
    phi = rng.standard_normal(dim)
    mu = float(phi @ phi)
    W0 = rng.standard_normal((num_classes, dim)) * (2.0 / np.sqrt(mu))
    label = int(rng.integers(num_classes))
    eta = eta_sign * step_scale / mu  # |η| μ = step_scale
    rho = rho_sign * radius / np.sqrt(mu)  # |ρ| √μ = radius: the logit displacement ‖εφ‖
    return W0, phi, mu, label, eta, rho


def max_disagreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """The S2 checker statistic: max over steps and classes of |z_a − z_b|."""
    return float(np.max(np.abs(logits_a - logits_b)))


setup_args = {
    "seed": st.integers(0, 2**32 - 1),
    "num_classes": st.integers(2, 8),
    "dim": st.integers(1, 20),
    "step_scale": st.floats(1e-3, 0.2),
    "radius": st.floats(0.0, 1.0),
    "eta_sign": st.sampled_from([-1.0, 1.0]),
    "rho_sign": st.sampled_from([-1.0, 1.0]),
}


@settings(max_examples=40)
@given(**setup_args)
def test_s2_param_and_logit_simulations_agree(**kwargs):
    W0, phi, mu, label, eta, rho = _setup(**kwargs)
    by_params = simulate_params(W0, phi, label, ("sam", eta, rho), STEPS)
    by_logits = simulate_logits(W0 @ phi, label, mu, ("sam", eta, rho), STEPS)
    assert max_disagreement(by_params.logits, by_logits.logits) <= AGREEMENT


@settings(max_examples=20)
@given(**{**setup_args, "radius": st.floats(0.05, 1.0)})
def test_s2_checker_rejects_flipped_rho_tilde(**kwargs):
    """Companion: the logit step with ρ̃'s sign flipped drifts away from the parameter-space run."""
    W0, phi, mu, label, eta, rho = _setup(**kwargs)
    by_params = simulate_params(W0, phi, label, ("sam", eta, rho), STEPS)
    z = W0 @ phi
    wrong = [z]
    for _ in range(STEPS):
        z = wrong_logit_step_flipped_rho(z, label, mu, eta, rho)
        wrong.append(z)
    assert max_disagreement(by_params.logits, np.array(wrong)) > AGREEMENT


@given(**setup_args)
def test_s2_perturbation_moves_logits_by_rho_tilde_g(**kwargs):
    """ε φ = ρ̃ g with ρ̃ = ρ√μ/‖g‖ (S2), to round-off."""
    W0, phi, mu, label, _, rho = _setup(**kwargs)
    g = residual(W0 @ phi, label)
    eps = sam_perturbation(np.outer(g, phi), rho)
    # ‖εφ‖ = |ρ|√μ: agreement to round-off relative to that size.
    np.testing.assert_allclose(
        eps @ phi, effective_radius(rho, mu, g) * g, rtol=0, atol=1e-14 * abs(rho) * np.sqrt(mu) + 1e-300
    )


@given(**setup_args)
def test_rho_zero_is_gd_bit_for_bit(**kwargs):
    W0, phi, mu, label, eta, _ = _setup(**kwargs)
    gd_param = W0 - eta * np.outer(residual(W0 @ phi, label), phi)
    assert np.array_equal(sam_param_step(W0, phi, label, eta, 0.0), gd_param)
    assert np.array_equal(sam_param_step(W0, phi, label, eta), gd_param)
    z = W0 @ phi
    gd_logit = z - eta * mu * residual(z, label)
    assert np.array_equal(sam_logit_step(z, label, mu, eta, 0.0), gd_logit)
    assert np.array_equal(sam_logit_step(z, label, mu, eta), gd_logit)
    assert np.array_equal(sam_logit_increment(z, label, mu, eta, 0.0), -eta * mu * residual(z, label))


@pytest.mark.parametrize("rho", [-0.7, 0.0, 0.7])
@pytest.mark.parametrize("eta", [-0.3, 0.3])
def test_zero_gradient_gives_no_nan(eta, rho):
    z = np.array([1000.0, 0.0, -3.0])  # p = e_0 exactly in float64, so g = 0
    assert np.array_equal(residual(z, 0), np.zeros(3))
    assert effective_radius(rho, 2.0, residual(z, 0)) == 0.0
    assert np.array_equal(sam_logit_step(z, 0, 2.0, eta, rho), z)
    W = np.outer(z, [1.0, 0.0])
    assert np.array_equal(sam_param_step(W, np.array([1.0, 0.0]), 0, eta, rho), W)
    # φ = 0: the parameter gradient g φᵀ is zero although g is not.
    W = np.ones((3, 2))
    assert np.array_equal(sam_param_step(W, np.zeros(2), 1, eta, rho), W)


def test_effective_radius_value():
    g = np.array([0.6, -0.8, 0.2]) / np.linalg.norm([0.6, -0.8, 0.2]) * 2.0
    assert effective_radius(-3.0, 4.0, g) == pytest.approx(-3.0 * 2.0 / 2.0, rel=1e-15)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: sam_param_step(np.ones((3, 2)), np.ones(3), 0, 0.1), "length 2"),
        (lambda: sam_param_step(np.ones(3), np.ones(3), 0, 0.1), "2-d"),
        (lambda: sam_param_step(np.ones((3, 2)), np.ones(2), 3, 0.1), r"\[0, 3\)"),
        (lambda: sam_param_step(np.ones((3, 2)), np.ones(2), 0, 0.0), "nonzero rate"),
        (lambda: sam_param_step(np.ones((3, 2)), np.array([1.0, np.nan]), 0, 0.1), "finite"),
        (lambda: sam_param_step(np.ones((1, 2)), np.ones(2), 0, 0.1), "at least 2"),
        (lambda: sam_logit_step(np.ones(3), 0, 1.0, 0.0), "nonzero rate"),
        (lambda: sam_logit_step(np.ones(3), 0, 1.0, float("nan")), "finite"),
        (lambda: sam_logit_step(np.ones(3), 0, -1.0, 0.1), "nonnegative"),
        (lambda: sam_logit_step(np.ones(3), 0, 1.0, 0.1, rho=float("inf")), "finite"),
        (lambda: sam_logit_step(np.ones(3), 5, 1.0, 0.1), r"\[0, 3\)"),
        (lambda: sam_logit_step(np.ones((2, 3)), 0, 1.0, 0.1), "1-d"),
        (lambda: sam_logit_step(np.ones(3), 0, 1.0, "0.1"), "real scalar"),
        (lambda: effective_radius(1.0, 1.0, np.ones((2, 2))), "1-d"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "grad, rho, message",
    [
        (None, 0.1, "grad: expected a real numeric array"),
        ([1.0, float("nan")], 0.1, "grad: expected finite values"),
        ([1.0, 2.0], "0.1", "rho: expected a real scalar"),
        ([1.0, 2.0], float("inf"), "rho: expected a finite number"),
    ],
)
def test_sam_perturbation_rejects_bad_input(grad, rho, message):
    """Before: a TypeError from `rho / norm` or a NaN ε returned silently."""
    with pytest.raises(ValueError, match=message):
        sam_perturbation(grad, rho)


def test_sam_perturbation_accepts_a_list():
    """Before: a list gradient raised TypeError ('can't multiply sequence by non-int')."""
    assert np.allclose(sam_perturbation([3.0, 4.0], 1.0), [0.6, 0.8])
