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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dynamics.lm.logps import check_logps_inputs, max_conf_logps, token_logps

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


def _check_name(name: str) -> None:
    if name not in LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; expected one of {sorted(LOSSES)}")


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
    _check_name(name)
    pc, pr = policy_chosen_logps, policy_rejected_logps
    if pc.dim() != 1 or pc.shape != pr.shape:
        raise ValueError(
            f"policy log-probs must both have shape (B,), got {tuple(pc.shape)} and {tuple(pr.shape)}"
        )
    if not (torch.isfinite(pc).all() and torch.isfinite(pr).all()):
        raise ValueError("policy log-probs must be finite")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    rc, rr = ref_chosen_logps, ref_rejected_logps
    if NEEDS_REFERENCE[name]:
        if rc is None or rr is None:
            raise ValueError(f"loss {name!r} needs ref_chosen_logps and ref_rejected_logps of shape (B,)")
        if rc.shape != pc.shape or rr.shape != pc.shape:
            raise ValueError(
                f"reference log-probs must have shape {tuple(pc.shape)}, got {tuple(rc.shape)}, {tuple(rr.shape)}"
            )
        rc, rr = rc.to(pc.dtype), rr.to(pc.dtype)
    else:
        rc = rr = None
    loss = LOSSES[name](pc, pr, rc, rr, beta=beta, **kw).mean()
    if name == "cpo" and cpo_alpha != 0:
        if chosen_nll is None:
            raise ValueError(
                "loss 'cpo' needs chosen_nll (token-mean NLL of the chosen responses) when cpo_alpha != 0"
            )
        loss = loss + cpo_alpha * chosen_nll
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
        _check_name(self.name)

    @property
    def averages(self) -> bool:
        return AVERAGES_LOGPS[self.name] if self.average is None else self.average

    def __call__(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        ids, mask = batch["input_ids"], batch["response_mask"]
        check_logps_inputs(logits, ids, mask)
        if logits.shape[0] % 2:
            raise ValueError(f"a preference batch has 2B rows (chosen then rejected), got {logits.shape[0]}")
        b = logits.shape[0] // 2
        tok = token_logps(logits, ids)  # (2B, T-1)
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
                "max_conf": max_conf_logps(logits[:b].detach(), ids[:b], mask[:b]).mean(),
                "margin": rewards["margins"].mean(),
                "accuracy": rewards["accuracies"].mean(),
            }
        return loss, metrics
