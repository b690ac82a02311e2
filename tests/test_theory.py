"""S3 (Theorem 3.2), S4 (Corollary 3.4), S5 (Lemma 3.5, reconstructed), S6 (Corollary 3.6) and its sign fact."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamics.logit_space import hessian_eigh, logit_hessian, modal_coefficients, one_hot, softmax
from dynamics.steps import effective_radius, sam_logit_increment, sam_param_step
from dynamics.theory import (
    confidence_ratios,
    log_confidence_ratios,
    modal_gains,
    predicted_logit_increment,
    predicted_logit_step,
    predicted_modal_step,
    predicted_param_increment,
    predicted_param_step,
    predicted_residual,
    predicted_residual_increment,
    runner_up,
    s6_sign_fact,
    s6_sign_vector,
    step_confidence_ratios,
)

# ---------------------------------------------------------------------------------------------------------------
# S3 / S4: remainder-order fit. With ρ = κ√|η| the SAM term is O(|η|^{3/2}) and the remainder O(η²), so the
# slope of log‖r‖ against log|η| over (η, η/4, η/16) is 2 for the right formula and 1.5 when the SAM term is
# wrong (ρ̃ sign flipped, H_z² dropped). Regime (theory.md numerical notes): |η₀|μ ∈ [1e-5, 1e-4] and
# |ρ̃(η₀)| ∈ [1e-3, 5e-3], ‖g‖ ≳ 0.1. Then the next-order correction to the slope is O(√(|η|μ) + |ρ̃|) ≲ 0.01, and
# a wrong SAM term, ~|η|μρ̃, stands ≥ 10× above the O(η²μ²) remainder, so it shows its own order 1.5. The median
# over 24 instances must lie within SLOPE_TOL = 0.1 of 2 (right) and of 1.5 (wrong): the two are 5 tolerances apart.
# Remainders are computed from increments (never z⁺ − z or p⁺ − p by subtraction), so their round-off is
# relative (≈1e-16·‖Δz‖ ≈ 1e-22) while ‖r‖ ≳ 1e-14; only the parameter form subtracts W⁺ − W (error ≈1e-17).
# ---------------------------------------------------------------------------------------------------------------
SLOPE_TOL = 0.1
ETA_FACTORS = np.array([1.0, 1 / 4, 1 / 16])
INSTANCES = 24


def fitted_order(etas: np.ndarray, remainders: np.ndarray) -> float:
    """Least-squares slope of log‖r‖ against log|η|."""
    return float(np.polyfit(np.log(np.abs(etas)), np.log(remainders), 1)[0])


def order_is_two(slopes: list[float]) -> bool:
    """The S3/S4 checker: the median fitted order is 2 (within SLOPE_TOL)."""
    return abs(float(np.median(slopes)) - 2.0) <= SLOPE_TOL


def _instance(rng: np.random.Generator, eta_sign: float, rho_sign: float):
    """One asymptotic-regime instance: z (K,), label, μ, η₀ (|η₀|μ ≤ 1e-4), signed κ (|ρ̃(η₀)| ≤ 5e-3)."""
    num_classes = int(rng.integers(2, 9))
    label = int(rng.integers(num_classes))
    z = rng.standard_normal(num_classes) * rng.uniform(0.1, 3.0)
    if softmax(z)[label] > 0.9:  # keep ‖g‖ ≥ ~0.1: tiny ‖g‖ makes ρ̃ huge and the instance non-asymptotic
        z[label] -= 3.0
    g = softmax(z) - one_hot(label, num_classes)
    mu = float(rng.uniform(0.1, 10.0))
    eta0 = eta_sign * rng.uniform(1e-5, 1e-4) / mu
    rho_tilde0 = rng.uniform(1e-3, 5e-3)
    kappa = rho_tilde0 * np.linalg.norm(g) / (np.sqrt(mu) * np.sqrt(abs(eta0)))
    return z, label, mu, eta0, rho_sign * kappa


def _rho(kappa_signed: float, eta: float) -> float:
    return kappa_signed * np.sqrt(abs(eta))


def exact_residual_increment(z, label, mu, eta, rho):
    """g⁺ − g = p ∘ (α − 1), with α from the exact S2 increment: no cancellation."""
    p = softmax(z)
    return p * np.expm1(log_confidence_ratios(p, sam_logit_increment(z, label, mu, eta, rho)))


def remainder_logit(z, label, mu, eta, rho, flip=False):
    prediction = predicted_logit_increment(z, label, mu, eta, -rho if flip else rho)
    return np.linalg.norm(sam_logit_increment(z, label, mu, eta, rho) - prediction)


def remainder_residual(z, label, mu, eta, rho, drop_h2=False):
    if drop_h2:  # wrong: g⁺ ≈ (I − ημH_z) g, the H_z² term dropped
        prediction = predicted_residual_increment(z, label, mu, eta, 0.0)
    else:
        prediction = predicted_residual_increment(z, label, mu, eta, rho)
    return np.linalg.norm(exact_residual_increment(z, label, mu, eta, rho) - prediction)


def remainder_modal(z, label, mu, eta, rho, drop_h2=False):
    p = softmax(z)
    g = p - one_hot(label, z.size)
    lam, vecs = hessian_eigh(p)
    rho_tilde = 0.0 if drop_h2 else effective_radius(rho, mu, g)
    # v_kᵀ g⁺ − gain_k e_k = v_kᵀ (g⁺ − g) − (gain_k − 1) e_k, with gain_k − 1 = −ημ(λ_k + ρ̃λ_k²)
    increment = modal_coefficients(vecs, exact_residual_increment(z, label, mu, eta, rho))
    return np.linalg.norm(increment + eta * mu * (lam + rho_tilde * lam**2) * modal_coefficients(vecs, g))


def _param_instance(rng, z, label, mu):
    dim = int(rng.integers(1, 8))
    phi = rng.standard_normal(dim)
    phi *= np.sqrt(mu) / np.linalg.norm(phi)
    # W with Wφ = z plus a component orthogonal to φ (invisible to the logits)
    W = np.outer(z, phi) / (phi @ phi) + rng.standard_normal((z.size, dim)) * 0.1
    W -= np.outer(W @ phi - z, phi) / (phi @ phi)
    return W, phi


def remainder_param(W, phi, label, eta, rho, flip=False):
    exact = sam_param_step(W, phi, label, eta, rho) - W
    return np.linalg.norm(exact - predicted_param_increment(W, phi, label, eta, -rho if flip else rho))


def median_slopes(seed: int, eta_sign: float, rho_sign: float, remainder, **variant) -> list[float]:
    rng = np.random.default_rng(seed)
    slopes = []
    for _ in range(INSTANCES):
        z, label, mu, eta0, kappa = _instance(rng, eta_sign, rho_sign)
        etas = eta0 * ETA_FACTORS
        if remainder is remainder_param:
            W, phi = _param_instance(rng, z, label, mu)
            rs = [remainder_param(W, phi, label, eta, _rho(kappa, eta), **variant) for eta in etas]
        else:
            rs = [remainder(z, label, mu, eta, _rho(kappa, eta), **variant) for eta in etas]
        slopes.append(fitted_order(etas, np.array(rs)))
    return slopes


signs = st.sampled_from([-1.0, 1.0])
seeds = st.integers(0, 2**32 - 1)
FORMS = {
    "logit": (remainder_logit, {"flip": True}),
    "residual": (remainder_residual, {"drop_h2": True}),
    "modal": (remainder_modal, {"drop_h2": True}),
    "param": (remainder_param, {"flip": True}),
}


@settings(max_examples=32)
@given(seed=seeds, eta_sign=signs, rho_sign=signs, form=st.sampled_from(sorted(FORMS)))
def test_s3_s4_remainder_is_second_order(seed, eta_sign, rho_sign, form):
    """S3 (param, logit, residual forms) and S4 (modal): ‖r‖ = O(η²) with ρ = κ√|η|, both signs of η and ρ."""
    remainder, _ = FORMS[form]
    slopes = median_slopes(seed, eta_sign, rho_sign, remainder)
    assert order_is_two(slopes), (form, np.median(slopes))


@settings(max_examples=32)
@given(seed=seeds, eta_sign=signs, rho_sign=signs, form=st.sampled_from(sorted(FORMS)))
def test_s3_s4_checker_rejects_wrong_sam_term(seed, eta_sign, rho_sign, form):
    """Companion: ρ̃'s sign flipped (param, logit) or the H_z² term dropped (residual, modal) is rejected."""
    remainder, wrong = FORMS[form]
    slopes = median_slopes(seed, eta_sign, rho_sign, remainder, **wrong)
    assert not order_is_two(slopes), (form, np.median(slopes))
    assert abs(np.median(slopes) - 1.5) <= SLOPE_TOL  # the wrong variant has the SAM term's order, 3/2


@settings(max_examples=32)
@given(seed=seeds, eta_sign=signs)
def test_s3_gd_remainder_is_second_order(seed, eta_sign):
    """ρ = 0: g⁺ = (I − ημH_z) g + O(η²) (exact: the logit form has no remainder at all)."""
    slopes = median_slopes(seed, eta_sign, 0.0, remainder_residual)
    assert order_is_two(slopes)


@given(seed=seeds, eta=st.floats(-2.0, 2.0).filter(lambda x: abs(x) > 1e-3), rho=st.floats(-2.0, 2.0))
def test_prediction_functions_are_consistent(seed, eta, rho):
    """The step/increment/modal forms agree with one another (same formula, different packaging)."""
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(2, 9))
    z = rng.standard_normal(num_classes)
    label = int(rng.integers(num_classes))
    W, phi = _param_instance(rng, z, label, 1.7)
    mu = float(phi @ phi)
    np.testing.assert_allclose(
        predicted_param_step(W, phi, label, eta, rho) @ phi,
        predicted_logit_step(z, label, mu, eta, rho),
        atol=1e-12,
    )
    g_next = predicted_residual(z, label, mu, eta, rho)
    modal_next, lam, vecs = predicted_modal_step(z, label, mu, eta, rho)
    np.testing.assert_allclose(vecs @ modal_next, g_next, atol=1e-12)
    g = softmax(z) - one_hot(label, num_classes)
    h_z = logit_hessian(softmax(z))
    rt = effective_radius(rho, mu, g)
    np.testing.assert_allclose(g_next, g - eta * mu * (h_z @ g + rt * h_z @ h_z @ g), atol=1e-12)
    np.testing.assert_allclose(modal_gains(lam, mu, eta, rt), 1 - eta * mu * (lam + rt * lam**2), atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# S5: one-step confidence ratios under GD [reconstructed].
# ---------------------------------------------------------------------------------------------------------------
# Strictness of the S5 inequalities needs p_y < 1 (theory.md: keep p_y ≤ 1 − 1e-9); α is computed in log space
# with expm1/log1p, so log α carries relative (not absolute) round-off, and margins below 1e-12·|Δz| are
# treated as ties.
TIE = 1e-12


def s5_holds(p: np.ndarray, label: int, log_alpha: np.ndarray, eta: float, step: float) -> bool:
    """The S5 checker, for Δz = −η μ g with step = |η|μ; returns True iff every claim of S5 holds."""
    others = [k for k in range(p.size) if k != label]
    if eta > 0:
        return bool(log_alpha[label] > 0)
    ok = log_alpha[label] < 0 and log_alpha[runner_up(p, label)] > 0
    for k in others:
        for j in others:
            if p[k] > p[j] and step * (p[k] - p[j]) > TIE:
                ok &= bool(log_alpha[k] > log_alpha[j])  # rich get richer
        # loses probability exactly when |η|μ p_k < log Σ_j p_j exp(Δz_j)
        log_norm = step * p[k] - log_alpha[k]
        if abs(step * p[k] - log_norm) > TIE:
            ok &= bool((log_alpha[k] < 0) == (np.exp(step * p[k]) < np.exp(log_norm)))
    return bool(ok)


@st.composite
def s5_cases(draw):
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    num_classes = draw(st.integers(2, 8))
    label = draw(st.integers(0, num_classes - 1))
    z = rng.standard_normal(num_classes) * draw(st.floats(0.1, 6.0))
    if softmax(z)[label] > 1 - 1e-9:
        z[label] = np.max(np.delete(z, label))
    mu = draw(st.floats(0.1, 10.0))
    step = draw(st.floats(1e-3, 5.0))  # |η| μ
    return z, label, mu, step


@given(case=s5_cases(), eta_sign=signs)
def test_s5_confidence_ratios_under_gd(case, eta_sign):
    z, label, mu, step = case
    eta = eta_sign * step / mu
    p = softmax(z)
    log_alpha = log_confidence_ratios(p, sam_logit_increment(z, label, mu, eta, 0.0))
    assert s5_holds(p, label, log_alpha, eta, step)
    np.testing.assert_allclose(np.exp(log_alpha), step_confidence_ratios(z, label, mu, eta), rtol=1e-14)


@given(case=s5_cases(), eta_sign=signs)
def test_s5_checker_rejects_wrong_sign(case, eta_sign):
    """Companion: ratios computed with the update's sign flipped (Δz = +ημg) violate S5."""
    z, label, mu, step = case
    eta = eta_sign * step / mu
    p = softmax(z)
    wrong = log_confidence_ratios(p, -sam_logit_increment(z, label, mu, eta, 0.0))
    assert not s5_holds(p, label, wrong, eta, step)


def test_confidence_ratios_definition():
    p = np.array([0.2, 0.5, 0.3])
    dz = np.array([-1.0, 2.0, 0.5])
    expected = np.exp(dz) / (p @ np.exp(dz))
    np.testing.assert_allclose(confidence_ratios(p, dz), expected, rtol=1e-15)
    np.testing.assert_allclose(
        confidence_ratios(p, dz * 1e-3), np.exp(dz * 1e-3) / (p @ np.exp(dz * 1e-3)), rtol=1e-15
    )
    p_next = softmax(np.log(p) + dz)
    np.testing.assert_allclose(confidence_ratios(p, dz) * p, p_next, rtol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# S6: SAM suppresses squeezing, and its first-order sign fact.
# ---------------------------------------------------------------------------------------------------------------
# First-order: log α^{SAM} − log α^{GD} = −ημρ̃ c + O(η²) with c = H_z g − (pᵀH_z g)𝟙 and ρ̃ ∝ √|η|. "|η| small
# enough" is checked as: over |η|μ = 1e-2·4^{-j}, j = 0..7, the inequalities hold for every j from some j₀ on,
# including the three smallest, and the gap scales like |η|^{3/2} there. Logits in [−3, 3]·scale keep c away from
# 0 (c → 0 only as some p_k → 0), so the first-order term dominates well above round-off.
S6_STEPS = 1e-2 * 4.0 ** -np.arange(8)


def s6_gaps(z, label, mu, eta_sign, kappa, rho_sign):
    """Per |η|: (log α^{GD}_{y*} − log α^{SAM}_{y*},  log α^{SAM}_y − log α^{GD}_y); both ≥ 0 under S6."""
    p = softmax(z)
    y_star = runner_up(p, label)
    gaps = []
    for step in S6_STEPS:
        eta = eta_sign * step / mu
        rho = rho_sign * kappa * np.sqrt(abs(eta))
        gd = log_confidence_ratios(p, sam_logit_increment(z, label, mu, eta, 0.0))
        sam = log_confidence_ratios(p, sam_logit_increment(z, label, mu, eta, rho))
        gaps.append((gd[y_star] - sam[y_star], sam[label] - gd[label]))
    return np.array(gaps)


def s6_holds(gaps: np.ndarray) -> bool:
    """The S6 checker: both gaps ≥ 0 on the tail (three smallest |η|) and from the first index they hold on."""
    ok = np.all(gaps >= 0, axis=1)
    tail_ok = bool(np.all(ok[-3:]))
    first_bad_after = np.nonzero(~ok)[0]
    return tail_ok and (first_bad_after.size == 0 or first_bad_after[-1] < len(ok) - 3)


@st.composite
def s6_cases(draw):
    rng = np.random.default_rng(draw(seeds))
    num_classes = draw(st.integers(2, 8))
    label = draw(st.integers(0, num_classes - 1))
    z = rng.uniform(-3.0, 3.0, num_classes) * draw(st.floats(0.1, 1.0))
    mu = draw(st.floats(0.1, 10.0))
    kappa = draw(st.floats(0.01, 3.0))
    return z, label, mu, kappa


@given(case=s6_cases(), eta_sign=signs)
def test_s6_sam_suppresses_squeezing(case, eta_sign):
    z, label, mu, kappa = case
    gaps = s6_gaps(z, label, mu, eta_sign, kappa, rho_sign=eta_sign)  # ηρ > 0
    assert s6_holds(gaps), gaps
    # Order of the gap on the tail: |η|^{3/2} (first-order SAM term, ρ ∝ √|η|), within the slope tolerance.
    slope = fitted_order(S6_STEPS[-3:], np.maximum(gaps[-3:, 0], 1e-300))
    assert abs(slope - 1.5) <= SLOPE_TOL, slope


@given(case=s6_cases(), eta_sign=signs)
def test_s6_checker_rejects_opposite_sign(case, eta_sign):
    """Companion: with ηρ < 0 (ρ̃'s sign flipped) SAM amplifies squeezing and the checker rejects it."""
    z, label, mu, kappa = case
    gaps = s6_gaps(z, label, mu, eta_sign, kappa, rho_sign=-eta_sign)
    assert not s6_holds(gaps)


@st.composite
def probability_cases(draw):
    rng = np.random.default_rng(draw(seeds))
    num_classes = draw(st.integers(2, 8))
    label = draw(st.integers(0, num_classes - 1))
    z = rng.standard_normal(num_classes) * draw(st.floats(0.01, 30.0))
    if draw(st.booleans()):  # ties among the other classes, a common near-degenerate case
        others = [k for k in range(num_classes) if k != label]
        z[others[-1]] = z[others[0]]
    return softmax(z), label


def exact_sign_vector(p: np.ndarray, label: int) -> list[Fraction]:
    """c = H_z g − (pᵀH_z g)𝟙 in exact rational arithmetic, for p renormalised exactly to sum 1.

    Near-degenerate p (e.g. (1e-12, ½, ½)) make c_{y*} ~ 1e-24 while float64 round-off in c is ~1e-17, so the
    sign fact itself is checked exactly; the float64 implementation is checked to round-off separately.
    """
    q = [Fraction(float(x)) for x in p]
    total = sum(q)
    q = [x / total for x in q]
    g = [x - (1 if k == label else 0) for k, x in enumerate(q)]
    s = sum(x * gk for x, gk in zip(q, g, strict=True))
    h_g = [x * (gk - s) for x, gk in zip(q, g, strict=True)]
    mean = sum(x * h for x, h in zip(q, h_g, strict=True))
    return [h - mean for h in h_g]


def sign_fact_holds(c, p: np.ndarray, label: int) -> bool:
    """The sign-fact checker: c_{y*} ≥ 0 and c_y ≤ 0."""
    return bool(c[runner_up(p, label)] >= 0 and c[label] <= 0)


@settings(max_examples=200)
@given(case=probability_cases())
def test_s6_sign_fact(case):
    p, label = case
    exact = exact_sign_vector(p, label)
    assert sign_fact_holds(exact, p, label), [float(x) for x in exact]
    c = s6_sign_vector(p, label)
    # float64 implementation: entries are sums of O(max p²) ≤ 1 terms, round-off a few 1e-16
    np.testing.assert_allclose(c, [float(x) for x in exact], rtol=0, atol=1e-15)
    assert s6_sign_fact(p, label) == (c[runner_up(p, label)], c[label])
    # Independent float formula: c_k = p_k (g_k − pᵀg) − Σ_j p_j² (g_j − pᵀg)
    g = p - one_hot(label, p.size)
    h_g = p * (g - p @ g)
    np.testing.assert_allclose(c, h_g - p @ h_g, atol=1e-15)


@given(case=probability_cases())
def test_s6_sign_fact_checker_rejects_flipped(case):
    """Companion: the sign vector with ρ̃'s sign flipped (−c) fails the checker wherever c is not 0."""
    p, label = case
    exact = exact_sign_vector(p, label)
    if exact[runner_up(p, label)] == 0 and exact[label] == 0:
        return
    assert not sign_fact_holds([-x for x in exact], p, label)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: predicted_logit_step(np.ones(3), 0, 1.0, 0.0), "nonzero rate"),
        (lambda: predicted_residual(np.ones(3), 3, 1.0, 0.1), r"\[0, 3\)"),
        (lambda: predicted_param_step(np.ones((3, 2)), np.ones(3), 0, 0.1), "length 2"),
        (lambda: modal_gains(np.ones((2, 2)), 1.0, 0.1, 0.0), "1-d"),
        (lambda: modal_gains(np.ones(3), 1.0, 0.0, 0.0), "nonzero rate"),
        (lambda: confidence_ratios(np.array([0.5, 0.5]), np.ones(3)), "length 2"),
        (lambda: confidence_ratios(np.array([0.5, 0.7]), np.ones(2)), "probability"),
        (lambda: log_confidence_ratios(np.array([0.5, 0.5]), np.array([0.0, np.inf])), "finite"),
        (lambda: step_confidence_ratios(np.ones(3), 0, 1.0, 0.0), "nonzero rate"),
        (lambda: s6_sign_vector(np.array([0.5, 0.5]), 2), r"\[0, 2\)"),
        (lambda: runner_up(np.array([0.5, np.nan]), 0), "finite"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
