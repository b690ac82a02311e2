"""T-step GD / SAM trajectories for several (name, η, ρ) settings, and their save / load.

Logit space (S2, exact) by default; parameter space optionally. A trajectory holds one row per step, step 0
(the initial state) included.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynamics._validate import as_float_array, as_label, as_logits, as_scalar
from dynamics.logit_space import hessian_eigh, modal_coefficients, one_hot, softmax
from dynamics.steps import effective_radius, sam_logit_step, sam_param_step

_ARRAY_FIELDS = ("logits", "probs", "residuals", "eigenvalues", "modal", "rho_tilde")


@dataclass(frozen=True)
class Setting:
    """One optimizer setting: a display name, learning rate η (≠ 0, either sign) and SAM radius ρ (0 = GD)."""

    name: str
    eta: float
    rho: float = 0.0


@dataclass
class Trajectory:
    """Per-step record of one run; T+1 rows (step 0 included), K classes.

    logits, probs, residuals (g = p − e_y), modal (e = Vᵀ g in the eigenbasis of H_z at that step), all (T+1, K);
    eigenvalues (T+1, K) ascending (column 0 is the null mode 𝟙/√K); rho_tilde (T+1,): ρ̃ = ρ√μ/‖g‖ at that
    step (the radius the next step would use). ``weights`` (T+1, K, d) only for parameter-space runs.
    """

    name: str
    eta: float
    rho: float
    mu: float
    label: int
    logits: np.ndarray
    probs: np.ndarray
    residuals: np.ndarray
    eigenvalues: np.ndarray
    modal: np.ndarray
    rho_tilde: np.ndarray
    weights: np.ndarray | None = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        """Number of steps T (rows − 1)."""
        return self.logits.shape[0] - 1

    def to_dict(self) -> dict:
        """Plain-JSON dict (floats are written with full round-trip precision by ``json``)."""
        out = {"name": self.name, "eta": self.eta, "rho": self.rho, "mu": self.mu, "label": self.label}
        for key in _ARRAY_FIELDS:
            out[key] = getattr(self, key).tolist()
        if self.weights is not None:
            out["weights"] = self.weights.tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Trajectory:
        """Inverse of ``to_dict``."""
        arrays = {key: np.asarray(data[key], dtype=np.float64) for key in _ARRAY_FIELDS}
        weights = data.get("weights")
        return cls(
            name=str(data["name"]),
            eta=float(data["eta"]),
            rho=float(data["rho"]),
            mu=float(data["mu"]),
            label=int(data["label"]),
            weights=None if weights is None else np.asarray(weights, dtype=np.float64),
            **arrays,
        )


def _record(
    logits: np.ndarray, label: int, mu: float, setting: Setting, weights: np.ndarray | None
) -> Trajectory:
    """Derived per-step quantities of a logit path (T+1, K)."""
    probs = softmax(logits)
    residuals = probs - one_hot(label, logits.shape[1])
    eigenvalues = np.empty_like(logits)
    modal = np.empty_like(logits)
    rho_tilde = np.empty(logits.shape[0])
    for t, (p, g) in enumerate(zip(probs, residuals, strict=True)):
        eigenvalues[t], vecs = hessian_eigh(p)
        modal[t] = modal_coefficients(vecs, g)
        rho_tilde[t] = effective_radius(setting.rho, mu, g)
    return Trajectory(
        name=setting.name,
        eta=setting.eta,
        rho=setting.rho,
        mu=mu,
        label=label,
        logits=logits,
        probs=probs,
        residuals=residuals,
        eigenvalues=eigenvalues,
        modal=modal,
        rho_tilde=rho_tilde,
        weights=weights,
    )


def _as_setting(setting: Setting | tuple) -> Setting:
    if isinstance(setting, Setting):
        out = setting
    elif isinstance(setting, (tuple, list)) and len(setting) in (2, 3):
        out = Setting(*setting)
    else:
        raise ValueError(f"setting: expected Setting or (name, eta, rho), got {setting!r}")
    as_scalar(out.eta, "eta", nonzero=True)
    as_scalar(out.rho, "rho")
    return Setting(str(out.name), float(out.eta), float(out.rho))


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps: expected a nonnegative int, got {steps!r}")
    return int(steps)


def simulate_logits(
    z0: np.ndarray, label: int, mu: float, setting: Setting | tuple, steps: int
) -> Trajectory:
    """Run T exact logit-space steps z_{t+1} = z_t − η μ (softmax(z_t + ρ̃_t g_t) − e_y) (S2) from z0 (K,)."""
    z = as_logits(z0, "z0").copy()
    label = as_label(label, z.shape[0])
    mu = as_scalar(mu, "mu", nonnegative=True)
    setting = _as_setting(setting)
    steps = _check_steps(steps)
    logits = np.empty((steps + 1, z.shape[0]))
    logits[0] = z
    for t in range(steps):
        z = sam_logit_step(z, label, mu, setting.eta, setting.rho)
        logits[t + 1] = z
    return _record(logits, label, mu, setting, None)


def simulate_params(
    W0: np.ndarray, phi: np.ndarray, label: int, setting: Setting | tuple, steps: int
) -> Trajectory:
    """Run T exact parameter-space steps (``sam_param_step``) from W0 (K, d) with fixed features φ (d,).

    Records logits z_t = W_t φ and the weights W_t (T+1, K, d); μ = ‖φ‖².
    """
    W = as_float_array(W0, "W0", ndim=2).copy()
    phi = as_float_array(phi, "phi", ndim=1, size=W.shape[1])
    label = as_label(label, W.shape[0])
    setting = _as_setting(setting)
    steps = _check_steps(steps)
    weights = np.empty((steps + 1, *W.shape))
    weights[0] = W
    for t in range(steps):
        W = sam_param_step(W, phi, label, setting.eta, setting.rho)
        weights[t + 1] = W
    logits = weights @ phi
    return _record(logits, label, float(phi @ phi), setting, weights)


def simulate(
    z0: np.ndarray, label: int, mu: float, settings: Sequence[Setting | tuple], steps: int
) -> list[Trajectory]:
    """Logit-space trajectories (``simulate_logits``) for several (name, η, ρ) settings from the same z0."""
    if isinstance(settings, Setting) or not isinstance(settings, Sequence) or len(settings) == 0:
        raise ValueError("settings: expected a list of at least one (name, eta, rho) setting")
    return [simulate_logits(z0, label, mu, setting, steps) for setting in settings]


def save_trajectories(path: str | Path, trajectories: Sequence[Trajectory]) -> Path:
    """Write trajectories to a JSON file (exact float round trip); returns the path."""
    path = Path(path)
    payload = {"format": "dynamics.trajectories/1", "runs": [traj.to_dict() for traj in trajectories]}
    path.write_text(json.dumps(payload))
    return path


def load_trajectories(path: str | Path) -> list[Trajectory]:
    """Read trajectories written by ``save_trajectories``."""
    try:
        payload = json.loads(Path(path).read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: expected a 'dynamics.trajectories/1' JSON file ({err})") from None
    if not isinstance(payload, dict) or payload.get("format") != "dynamics.trajectories/1":
        raise ValueError(f"{path}: expected a 'dynamics.trajectories/1' JSON file")
    try:
        return [Trajectory.from_dict(run) for run in payload["runs"]]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: a run lacks a field or has a wrong type ({err!r})") from None
