"""Trajectories: per-step records, consistency with the one-step functions, save / load round trip."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamics.logit_space import hessian_eigh, softmax
from dynamics.simulate import (
    Setting,
    Trajectory,
    load_trajectories,
    save_trajectories,
    simulate,
    simulate_logits,
    simulate_params,
)
from dynamics.steps import effective_radius, sam_logit_step


def _case(seed: int, num_classes: int):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal(num_classes) * 2.0,
        int(rng.integers(num_classes)),
        float(rng.uniform(0.2, 3.0)),
    )


@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_classes=st.integers(2, 8),
    eta=st.sampled_from([-0.4, -0.05, 0.05, 0.4]),
    rho=st.sampled_from([-0.5, 0.0, 0.5]),
    steps=st.integers(0, 12),
)
def test_trajectory_rows_match_one_step_functions(seed, num_classes, eta, rho, steps):
    z0, label, mu = _case(seed, num_classes)
    traj = simulate_logits(z0, label, mu, Setting("run", eta, rho), steps)
    assert traj.steps == steps
    for key in ("logits", "probs", "residuals", "eigenvalues", "modal"):
        assert getattr(traj, key).shape == (steps + 1, num_classes)
    assert traj.rho_tilde.shape == (steps + 1,)
    np.testing.assert_array_equal(traj.logits[0], z0)
    z = z0
    for t in range(steps + 1):
        if t > 0:
            z = sam_logit_step(z, label, mu, eta, rho)
        np.testing.assert_array_equal(traj.logits[t], z)  # the same computation, so bit-identical
        p = softmax(z)
        lam, vecs = hessian_eigh(p)
        np.testing.assert_array_equal(traj.eigenvalues[t], lam)
        assert np.all(np.diff(traj.eigenvalues[t]) >= 0)
        np.testing.assert_allclose(traj.modal[t], vecs.T @ traj.residuals[t], atol=1e-15)
        assert abs(traj.modal[t, 0]) <= 1e-15  # S4: the null mode carries no residual at any step
        assert traj.rho_tilde[t] == effective_radius(rho, mu, traj.residuals[t])


def test_simulate_several_settings_in_order():
    z0, label, mu = _case(3, 4)
    settings_ = [("GD", -0.2, 0.0), Setting("SAM+", -0.2, 0.3), ("SAM-", -0.2, -0.3)]
    runs = simulate(z0, label, mu, settings_, 5)
    assert [r.name for r in runs] == ["GD", "SAM+", "SAM-"]
    assert [r.rho for r in runs] == [0.0, 0.3, -0.3]
    assert not np.array_equal(runs[1].logits, runs[2].logits)


def test_param_space_trajectory_records_weights():
    rng = np.random.default_rng(0)
    W0, phi = rng.standard_normal((3, 5)), rng.standard_normal(5)
    traj = simulate_params(W0, phi, 1, ("SAM", -0.1, 0.2), 7)
    assert traj.weights.shape == (8, 3, 5)
    np.testing.assert_array_equal(traj.logits, traj.weights @ phi)
    assert traj.mu == float(phi @ phi)


def test_save_load_round_trip_is_exact(tmp_path):
    z0, label, mu = _case(7, 5)
    runs = simulate(z0, label, mu, [("GD", -0.3, 0.0), ("SAM", -0.3, -0.5)], 9)
    rng = np.random.default_rng(1)
    runs.append(simulate_params(rng.standard_normal((3, 4)), rng.standard_normal(4), 2, ("P", 0.2, 0.1), 3))
    path = save_trajectories(tmp_path / "runs.json", runs)
    loaded = load_trajectories(path)
    assert len(loaded) == len(runs)
    for a, b in zip(runs, loaded, strict=True):
        assert isinstance(b, Trajectory)
        assert (a.name, a.eta, a.rho, a.mu, a.label) == (b.name, b.eta, b.rho, b.mu, b.label)
        for key in ("logits", "probs", "residuals", "eigenvalues", "modal", "rho_tilde"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
        assert (a.weights is None) == (b.weights is None)
        if a.weights is not None:
            np.testing.assert_array_equal(a.weights, b.weights)


def test_load_rejects_foreign_json(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"runs": []}))
    with pytest.raises(ValueError, match="dynamics.trajectories/1"):
        load_trajectories(path)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: simulate_logits(np.ones(3), 0, 1.0, ("x", 0.0, 0.1), 3), "nonzero rate"),
        (lambda: simulate_logits(np.ones(3), 0, 1.0, ("x", 0.1), -1), "nonnegative int"),
        (lambda: simulate_logits(np.ones(3), 0, 1.0, ("x", 0.1), 2.5), "nonnegative int"),
        (lambda: simulate_logits(np.ones(3), 0, 1.0, "GD", 3), "Setting or"),
        (lambda: simulate_logits(np.ones(3), 3, 1.0, ("x", 0.1), 3), r"\[0, 3\)"),
        (lambda: simulate_logits(np.array([1.0, np.inf]), 0, 1.0, ("x", 0.1), 3), "finite"),
        (lambda: simulate(np.ones(3), 0, 1.0, [], 3), "at least one"),
        (lambda: simulate_params(np.ones((3, 2)), np.ones(4), 0, ("x", 0.1), 3), "length 2"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_simulate_rejects_a_single_setting_or_none():
    """Before: a bare Setting iterated over its fields, and None raised TypeError from len()."""
    z0 = np.array([0.0, 1.0, 0.5])
    for settings_arg in (Setting("GD", -0.1), None):
        with pytest.raises(ValueError, match="settings: expected a list of at least one"):
            simulate(z0, 0, 1.0, settings_arg, 2)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "expected a 'dynamics.trajectories/1' JSON file"),
        ("[1, 2]", "expected a 'dynamics.trajectories/1' JSON file"),
        ('{"format": "dynamics.trajectories/1", "runs": [{"name": "GD"}]}', "a run lacks a field"),
    ],
)
def test_load_trajectories_rejects_malformed_files(tmp_path, text, message):
    """Before: AttributeError ('list' has no 'get') or KeyError from deep inside from_dict."""
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_trajectories(path)
