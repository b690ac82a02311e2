"""The toy of Figure 1(a)–(b) (theory.md §3): one example, fixed features in d = 1000, K = 3, negative η.

Defaults (chosen so the effect is clear; the paper gives no numbers): p₀ = (0.2, 0.5, 0.3) with the trained
label y = class 0 (so y* = class 1 is the most likely class and "other" = class 2), φ a fixed unit-norm random
feature (μ = ‖φ‖² = 1), η = −0.25, T = 40 steps, and three optimizers: GD (ρ = 0), SAM with ρ = +1 and SAM with
ρ = −1 (ρ of the same sign as η damps squeezing, S4/S6). Deterministic: φ comes from a seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from dynamics._validate import as_label, as_probs, as_scalar
from dynamics.simulate import Setting, Trajectory, simulate, simulate_params
from dynamics.theory import runner_up


@dataclass(frozen=True)
class ToyConfig:
    """Configuration of the Figure 1(a)–(b) toy (theory.md §3)."""

    d: int = 1000
    """feature dimension"""
    p0: tuple[float, ...] = (0.2, 0.5, 0.3)
    """initial probabilities (K = len(p0)); y below the most likely class"""
    label: int = 0
    """trained label y (the rejected response: trained with a negative rate)"""
    mu: float = 1.0
    """μ = ‖φ‖² (φ is a seeded Gaussian direction scaled to this squared norm)"""
    eta: float = -0.25
    """learning rate, negative: the y⁻ part of a DPO step"""
    rho: float = 1.0
    """SAM radius magnitude; runs use +rho and −rho"""
    steps: int = 40
    """number of steps T"""
    seed: int = 0
    """seed of the feature direction φ"""

    def __post_init__(self) -> None:
        if isinstance(self.d, bool) or not isinstance(self.d, int) or self.d < 1:
            raise ValueError(f"d: expected a positive int, got {self.d!r}")
        p0 = as_probs(self.p0, "p0")
        if np.any(p0 <= 0):
            raise ValueError("p0: expected strictly positive probabilities")
        as_label(self.label, p0.shape[0])
        if as_scalar(self.mu, "mu") <= 0:
            raise ValueError(f"mu: expected a positive number, got {self.mu}")
        as_scalar(self.eta, "eta", nonzero=True)
        as_scalar(self.rho, "rho", nonnegative=True)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps: expected a positive int, got {self.steps!r}")


def toy_features(config: ToyConfig = ToyConfig()) -> np.ndarray:
    """φ (d,): a seeded standard-normal direction scaled so that ‖φ‖² = μ exactly (up to round-off)."""
    direction = np.random.default_rng(config.seed).standard_normal(config.d)
    return direction * (np.sqrt(config.mu) / np.linalg.norm(direction))


def toy_initial_logits(config: ToyConfig = ToyConfig()) -> np.ndarray:
    """z₀ = log p₀ − mean(log p₀), shape (K,)."""
    log_p0 = np.log(np.asarray(config.p0, dtype=np.float64))
    return log_p0 - log_p0.mean()


def toy_initial_weights(config: ToyConfig = ToyConfig()) -> np.ndarray:
    """W₀ = z₀ φᵀ / μ (K, d), the minimum-norm output layer with W₀ φ = z₀."""
    phi = toy_features(config)
    return np.outer(toy_initial_logits(config), phi) / float(phi @ phi)


def toy_settings(config: ToyConfig = ToyConfig()) -> list[Setting]:
    """The three optimizers, in plotting order: GD, SAM (ρ > 0), SAM (ρ < 0)."""
    return [
        Setting("GD", config.eta, 0.0),
        Setting("SAM rho>0", config.eta, abs(config.rho)),
        Setting("SAM rho<0", config.eta, -abs(config.rho)),
    ]


def class_roles(config: ToyConfig = ToyConfig()) -> dict[int, str]:
    """Class index -> role: 'y' (trained label), 'y*' (most likely other class at step 0), 'other'."""
    p0 = np.asarray(config.p0, dtype=np.float64)
    y_star = runner_up(p0 / p0.sum(), config.label)
    return {k: ("y" if k == config.label else "y*" if k == y_star else "other") for k in range(p0.shape[0])}


def run_toy(config: ToyConfig = ToyConfig(), space: Literal["logit", "param"] = "logit") -> list[Trajectory]:
    """Run GD, SAM (ρ > 0), SAM (ρ < 0) for T steps; exact logit space (S2) or parameter space (K × d)."""
    phi = toy_features(config)
    mu = float(phi @ phi)
    if space == "logit":
        return simulate(toy_initial_logits(config), config.label, mu, toy_settings(config), config.steps)
    if space == "param":
        W0 = toy_initial_weights(config)
        return [simulate_params(W0, phi, config.label, s, config.steps) for s in toy_settings(config)]
    raise ValueError(f"space: expected 'logit' or 'param', got {space!r}")


def toy_record(config: ToyConfig, trajectories: list[Trajectory]) -> dict:
    """The data drawn in Figure 1(a)–(b), in issue 2's JSON schema (one row per step, step 0 included).

    {"mu", "label", "z0": [K], "runs": [{"name", "eta", "rho", "probs", "residuals", "eigenvalues", "modal"}]}
    """
    return {
        "mu": trajectories[0].mu,
        "label": config.label,
        "z0": trajectories[0].logits[0].tolist(),
        "runs": [
            {
                "name": traj.name,
                "eta": traj.eta,
                "rho": traj.rho,
                "probs": traj.probs.tolist(),
                "residuals": traj.residuals.tolist(),
                "eigenvalues": traj.eigenvalues.tolist(),
                "modal": traj.modal.tolist(),
            }
            for traj in trajectories
        ],
    }
