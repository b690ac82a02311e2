"""The Figure 1(a)–(b) toy: the qualitative claims of theory.md §3, asserted on the default run."""

import json

import numpy as np
import pytest

from dynamics.logit_space import hessian_eigh
from dynamics.theory import runner_up
from dynamics.toy import (
    ToyConfig,
    class_roles,
    run_toy,
    toy_features,
    toy_initial_logits,
    toy_initial_weights,
    toy_record,
    toy_settings,
)

CONFIG = ToyConfig()


@pytest.fixture(scope="module")
def runs():
    return {traj.name: traj for traj in run_toy(CONFIG)}


def test_defaults_match_theory_section_3():
    assert (CONFIG.d, len(CONFIG.p0), CONFIG.label) == (1000, 3, 0)
    assert CONFIG.eta < 0
    assert [s.rho for s in toy_settings(CONFIG)] == [0.0, CONFIG.rho, -CONFIG.rho]
    np.testing.assert_allclose(toy_features(CONFIG) @ toy_features(CONFIG), CONFIG.mu, rtol=1e-15)
    np.testing.assert_allclose(
        toy_initial_weights(CONFIG) @ toy_features(CONFIG), toy_initial_logits(CONFIG), atol=1e-15
    )
    assert class_roles(CONFIG) == {0: "y", 1: "y*", 2: "other"}


def test_gd_residual_grows_fastest_along_top_curvature_mode(runs):
    """S4 on the toy: measured one-step gains |v_kᵀ g_{t+1}| / |v_kᵀ g_t| (basis of step t), top mode largest."""
    gd = runs["GD"]
    for t in range(gd.steps):
        _, vecs = hessian_eigh(gd.probs[t])
        gains = np.abs((vecs.T @ gd.residuals[t + 1])[1:] / (vecs.T @ gd.residuals[t])[1:])
        assert gains[-1] > 1.0, t  # the residual expands (η < 0)
        assert gains[-1] > gains[0], t  # fastest along the top-curvature mode


def test_gd_squeezes_onto_y_star(runs):
    gd = runs["GD"]
    y_star = runner_up(gd.probs[0], CONFIG.label)
    assert y_star == 1
    assert np.all(np.diff(gd.probs[:, y_star]) > 0)  # p_{y*} rises at every step ...
    assert gd.probs[-1, y_star] > 0.999  # ... toward 1
    assert np.all(np.diff(gd.probs[:, CONFIG.label]) < 0)  # the trained (rejected) label falls


def test_sam_sign_controls_squeezing_at_every_step(runs):
    y_star = runner_up(runs["GD"].probs[0], CONFIG.label)
    gd = runs["GD"].probs[:, y_star]
    same = runs["SAM rho<0"].probs[:, y_star]  # η < 0, ρ < 0: same sign
    opposite = runs["SAM rho>0"].probs[:, y_star]
    assert same[0] == gd[0] == opposite[0]
    assert np.all(same[1:] < gd[1:])
    assert np.all(opposite[1:] > gd[1:])


def test_null_mode_carries_no_residual(runs):
    for traj in runs.values():
        assert np.max(np.abs(traj.modal[:, 0])) <= 1e-15
        assert np.all(traj.eigenvalues[:, 0] == 0.0)


def test_parameter_space_run_agrees(runs):
    """S2 on the toy: the d = 1000 parameter-space run gives the same logits (round-off ≲ 1e-13 here)."""
    for traj in run_toy(CONFIG, space="param"):
        assert np.max(np.abs(traj.logits - runs[traj.name].logits)) <= 1e-10


def test_record_schema_and_determinism(runs):
    record = toy_record(CONFIG, list(runs.values()))
    assert set(record) == {"mu", "label", "z0", "runs"}
    assert record["label"] == 0 and len(record["z0"]) == 3
    assert [r["name"] for r in record["runs"]] == ["GD", "SAM rho>0", "SAM rho<0"]
    for run in record["runs"]:
        assert set(run) == {"name", "eta", "rho", "probs", "residuals", "eigenvalues", "modal"}
        for key in ("probs", "residuals", "eigenvalues", "modal"):
            assert np.asarray(run[key]).shape == (CONFIG.steps + 1, 3)
        assert np.all(np.diff(np.asarray(run["eigenvalues"]), axis=1) >= 0)
    assert json.dumps(record) == json.dumps(toy_record(CONFIG, run_toy(CONFIG)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eta": 0.0}, "nonzero rate"),
        ({"rho": -1.0}, "nonnegative"),
        ({"steps": 0}, "positive int"),
        ({"d": 0}, "positive int"),
        ({"p0": (0.5, 0.6)}, "probability"),
        ({"p0": (1.0, 0.0)}, "strictly positive"),
        ({"label": 3}, r"\[0, 3\)"),
        ({"mu": 0.0}, "positive"),
    ],
)
def test_bad_config_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToyConfig(**kwargs)


def test_run_toy_bad_space():
    with pytest.raises(ValueError, match="'logit' or 'param'"):
        run_toy(CONFIG, space="weights")
