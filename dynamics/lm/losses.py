"""Preference losses on sequence log-probabilities, named as TRL users know them. [paper §4 / published formulas]

Every per-example loss takes policy and reference log-probabilities of shape (B,) and returns (B,).
With u = (log π(y⁺) − log π_ref(y⁺)) − (log π(y⁻) − log π_ref(y⁻)) (reference-free losses: u = log π(y⁺) − log π(y⁻)):

| name      | loss per example                                        | log-probs         | reference |
|-----------|---------------------------------------------------------|-------------------|-----------|
| "sigmoid" | DPO: −(1−ls)·log σ(βu) − ls·log σ(−βu)                   | summed            | yes       |
| "ipo"     | IPO: (u − 1/(2β))²                                      | length-averaged   | yes       |
| "hinge"   | SLiC-HF: max(0, 1 − βu)                                 | summed            | yes (TRL) |
| "cpo"     | CPO: −(1−ls)·log σ(βu) − ls·log σ(−βu), + α·NLL(y⁺)       | summed            | no        |
| "simpo"   | SimPO: −(1−ls)·log σ(β(u − γ/β)) − ls·log σ(−β(u − γ/β))  | length-averaged   | no        |

CPO's NLL term is the token-mean negative log-likelihood of the chosen responses over the batch (as in TRL's
CPOTrainer); it is added once to the batch-mean loss. `PreferenceObjective` turns a loss into the
``loss_fn(logits, batch) -> (loss, metrics)`` callable that `dynamics.lm.perturb` expects.

Batch layout (used by `PreferenceObjective`, documented once here and in `dynamics.lm.perturb`): rows [0, B) of
``input_ids`` / ``attention_mask`` / ``response_mask`` (2B, T) are the chosen sequences, rows [B, 2B) the
rejected ones, pair i ↔ rows i and B + i; ``ref_chosen_logps`` / ``ref_rejected_logps`` (B,) are the
reference model's log-probabilities in the same form (summed or averaged) as the loss uses.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dynamics.lm.logps import _logps_parts, _max_conf, check_logps_inputs

__all__ = [
    "LOSSES",
    "AVERAGES_LOGPS",
    "NEEDS_REFERENCE",
    "dpo_sigmoid_losses",
    "ipo_losses",
    "hinge_losses",
    "cpo_losses",
    "simpo_losses",
    "preference_loss",
    "PreferenceObjective",
]


def _margin(
    pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor | None, rr: torch.Tensor | None
) -> torch.Tensor:
    """u = (pc − rc) − (pr − rr); the reference terms are dropped when both are None."""
    u = pc - pr
    if rc is not None and rr is not None:
        u = u - (rc - rr)
    return u


def _smoothed_logsigmoid(x: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """−(1−ls)·log σ(x) − ls·log σ(−x) (conservative DPO; ls = 0 is plain DPO)."""
    return -(1.0 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def dpo_sigmoid_losses(
    pc, pr, rc=None, rr=None, beta: float = 0.1, label_smoothing: float = 0.0, **_
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): −log σ(β u), with optional label smoothing. Shapes (B,) → (B,)."""
    return _smoothed_logsigmoid(beta * _margin(pc, pr, rc, rr), label_smoothing)


def ipo_losses(pc, pr, rc=None, rr=None, beta: float = 0.1, **_) -> torch.Tensor:
    """IPO (Azar et al. 2023): (u − 1/(2β))², on length-averaged log-probs as in TRL. (B,) → (B,)."""
    return (_margin(pc, pr, rc, rr) - 1.0 / (2.0 * beta)) ** 2


def hinge_losses(pc, pr, rc=None, rr=None, beta: float = 0.1, **_) -> torch.Tensor:
    """SLiC-HF hinge (Zhao et al. 2023), TRL's "hinge": max(0, 1 − β u). (B,) → (B,)."""
    return torch.relu(1.0 - beta * _margin(pc, pr, rc, rr))


def cpo_losses(
    pc, pr, rc=None, rr=None, beta: float = 0.1, label_smoothing: float = 0.0, **_
) -> torch.Tensor:
    """CPO preference part (Xu et al. 2024): −log σ(β (log π(y⁺) − log π(y⁻))), reference-free. (B,) → (B,).

    The NLL term is added by `preference_loss` (it is a batch-level token mean, not per example).
    """
    return _smoothed_logsigmoid(beta * (pc - pr), label_smoothing)


def simpo_losses(
    pc, pr, rc=None, rr=None, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0, **_
) -> torch.Tensor:
    """SimPO (Meng et al. 2024): −log σ(β(ū⁺ − ū⁻) − γ) on length-averaged log-probs, reference-free. (B,) → (B,).

    TRL writes it as β·(u − γ/β); γ is the target reward margin (TRL's ``simpo_gamma``, default 0.5).
    """
    return _smoothed_logsigmoid(beta * ((pc - pr) - gamma / beta), label_smoothing)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": dpo_sigmoid_losses,
    "ipo": ipo_losses,
    "hinge": hinge_losses,
    "cpo": cpo_losses,
    "simpo": simpo_losses,
}
# Which losses use length-averaged log-probabilities (TRL's convention) and which need a reference model.
AVERAGES_LOGPS: dict[str, bool] = {"sigmoid": False, "ipo": True, "hinge": False, "cpo": False, "simpo": True}
NEEDS_REFERENCE: dict[str, bool] = {"sigmoid": True, "ipo": True, "hinge": True, "cpo": False, "simpo": False}


# Extra keywords each loss accepts (anything else is a typo and is rejected, not silently ignored).
LOSS_KEYWORDS: dict[str, tuple[str, ...]] = {
    "sigmoid": ("label_smoothing",),
    "ipo": (),
    "hinge": (),
    "cpo": ("label_smoothing",),
    "simpo": ("label_smoothing", "gamma"),
}


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; expected one of {sorted(LOSSES)}")


def _finite_real(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite real number, got {value!r}")
    return float(value)


def check_hyperparameters(name: str, beta: float, loss_kwargs: Mapping[str, object]) -> None:
    """ValueError unless ``name`` ∈ LOSSES, β is finite and > 0, and ``loss_kwargs`` holds only the keywords the
    loss takes (LOSS_KEYWORDS), each finite, with 0 ≤ label_smoothing ≤ 0.5 (above 0.5 the preference flips)."""
    _check_name(name)
    if _finite_real(beta, "beta") <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    unknown = sorted(set(loss_kwargs) - set(LOSS_KEYWORDS[name]))
    if unknown:
        raise ValueError(f"loss {name!r} takes the keywords {list(LOSS_KEYWORDS[name])}, got {unknown}")
    for key, value in loss_kwargs.items():
        _finite_real(value, key)
    if not 0.0 <= loss_kwargs.get("label_smoothing", 0.0) <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {loss_kwargs['label_smoothing']!r}")


def _check_logps(what: str, *tensors: torch.Tensor | None, shape: tuple[int, ...] | None = None) -> None:
    """ValueError unless every tensor is a finite torch.Tensor of one (B,) shape, B ≥ 1 (or ``shape``)."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError(
            f"{what} must be torch tensors of shape (B,), got {[type(t).__name__ for t in tensors]}"
        )
    want = shape if shape is not None else tuple(tensors[0].shape)
    if len(want) != 1 or want[0] < 1 or any(tuple(t.shape) != want for t in tensors):
        raise ValueError(f"{what} must have shape (B,) with B >= 1, got {[tuple(t.shape) for t in tensors]}")
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError(f"{what} must be finite")


def preference_loss(
    name: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    *,
    chosen_nll: torch.Tensor | None = None,
    cpo_alpha: float = 1.0,
    **kw,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch-mean preference loss and detached rewards. Inputs (B,); returns (scalar, dict of (B,) tensors).

    ``name`` ∈ LOSSES. Reference log-probs are required where NEEDS_REFERENCE[name] and ignored (the loss is
    reference-free) otherwise. "cpo" needs ``chosen_nll`` (scalar, token-mean NLL of the chosen responses) when
    ``cpo_alpha`` ≠ 0. Extra keywords (``label_smoothing``, ``gamma``) go to the loss. Rewards follow TRL:
    chosen = β (log π(y⁺) − log π_ref(y⁺)) (reference term 0 when reference-free), likewise rejected;
    margins = chosen − rejected; accuracies = 1[chosen > rejected].
    """
    check_hyperparameters(name, beta, kw)
    pc, pr = policy_chosen_logps, policy_rejected_logps
    _check_logps("policy log-probs", pc, pr)
    rc, rr = ref_chosen_logps, ref_rejected_logps
    if NEEDS_REFERENCE[name]:
        if rc is None or rr is None:
            raise ValueError(f"loss {name!r} needs ref_chosen_logps and ref_rejected_logps of shape (B,)")
        _check_logps("reference log-probs", rc, rr, shape=tuple(pc.shape))
        rc, rr = rc.to(pc.dtype), rr.to(pc.dtype)
    else:
        rc = rr = None
    loss = LOSSES[name](pc, pr, rc, rr, beta=beta, **kw).mean()
    if name == "cpo" and _finite_real(cpo_alpha, "cpo_alpha") != 0:
        if not isinstance(chosen_nll, torch.Tensor) or chosen_nll.numel() != 1:
            raise ValueError(
                "loss 'cpo' needs chosen_nll (a scalar tensor: token-mean NLL of the chosen responses) "
                "when cpo_alpha != 0"
            )
        if not bool(torch.isfinite(chosen_nll).all()):
            raise ValueError(f"chosen_nll must be finite, got {float(chosen_nll)}")
        loss = loss + cpo_alpha * chosen_nll.reshape(())
    with torch.no_grad():
        chosen_rewards = beta * (pc - (rc if rc is not None else 0.0))
        rejected_rewards = beta * (pr - (rr if rr is not None else 0.0))
    rewards = {
        "chosen": chosen_rewards,
        "rejected": rejected_rewards,
        "margins": chosen_rewards - rejected_rewards,
        "accuracies": (chosen_rewards > rejected_rewards).to(pc.dtype),
    }
    return loss, rewards


@dataclass(frozen=True)
class PreferenceObjective:
    """``loss_fn(logits (2B,T,V), batch) -> (loss, metrics)`` for a named preference loss. [ours]

    Batch keys: ``input_ids``, ``response_mask`` (2B, T), chosen rows first; ``ref_chosen_logps``,
    ``ref_rejected_logps`` (B,) when the loss needs a reference. Log-probs are summed or length-averaged per
    AVERAGES_LOGPS[name] (override with ``average``); the reference log-probs must be given in the same form.
    Metrics (detached, float): ``chosen_logps`` and ``rejected_logps`` (always **summed** log π of the response,
    whatever the loss uses, so curves are comparable across losses), ``max_conf`` (keyed to the chosen rows),
    ``margin`` (mean reward margin), ``accuracy`` (mean reward accuracy), ``loss``.
    """

    name: str = "sigmoid"
    beta: float = 0.1
    average: bool | None = None
    loss_kwargs: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_hyperparameters(self.name, self.beta, self.loss_kwargs)

    @property
    def averages(self) -> bool:
        return AVERAGES_LOGPS[self.name] if self.average is None else self.average

    def __call__(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        missing = [key for key in ("input_ids", "response_mask") if key not in batch]
        if missing:
            raise ValueError(f"the batch lacks {missing}: expected input_ids and response_mask (2B, T)")
        ids, mask = batch["input_ids"], batch["response_mask"]
        check_logps_inputs(logits, ids, mask)
        if logits.shape[0] % 2:
            raise ValueError(f"a preference batch has 2B rows (chosen then rejected), got {logits.shape[0]}")
        b = logits.shape[0] // 2
        z, tok, lse = _logps_parts(logits, ids)  # (2B, T-1[, V]), inputs checked above
        m = mask[:, 1:].to(tok.dtype)
        summed = (tok * m).sum(-1)
        counts = m.sum(-1)
        used = summed / counts.clamp_min(1.0) if self.averages else summed
        nll = -summed[:b].sum() / counts[:b].sum().clamp_min(1.0)
        loss, rewards = preference_loss(
            self.name,
            used[:b],
            used[b:],
            batch.get("ref_chosen_logps"),
            batch.get("ref_rejected_logps"),
            beta=self.beta,
            chosen_nll=nll,
            **dict(self.loss_kwargs),
        )
        with torch.no_grad():
            metrics = {
                "loss": loss.detach(),
                "chosen_logps": summed[:b].detach().mean(),
                "rejected_logps": summed[b:].detach().mean(),
                "max_conf": _max_conf(z[:b], lse[:b], m[:b]).mean(),  # = max_conf_logps on the chosen rows
                "margin": rewards["margins"].mean(),
                "accuracy": rewards["accuracies"].mean(),
            }
        return loss, metrics
