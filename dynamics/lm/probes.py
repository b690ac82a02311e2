"""Probe-set evaluation: clean log-probabilities of chosen / rejected responses and max_conf → metric rows [ours].

A probe set is a fixed list of preference batches (the layout of `dynamics.lm.data.collate_pairs`). Every
value is computed on the **clean** logits of one forward pass per batch, no gradient (experiments.md, "The
max_conf metric": log the clean log-probabilities; max_conf is keyed to the chosen rows).

Row fields (means over the probe pairs): `logp_chosen`, `logp_rejected` (summed log π of the response),
`logp_max_conf` (Σ over chosen-response positions of max_v log p(v | chosen prefix)), `loss` (the training
loss on the whole probe set), `margin` (mean reward margin β[(log π − log π_ref)(y⁺) − (…)(y⁻)]),
`accuracy` (fraction of pairs with a positive margin), `n` (pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dynamics.lm.logps import max_conf_logps, response_lengths, sequence_logps
from dynamics.lm.losses import AVERAGES_LOGPS, NEEDS_REFERENCE, check_hyperparameters, preference_loss

Batch = Mapping[str, torch.Tensor]


@dataclass
class PairLogps:
    """Per-pair clean log-probabilities of a probe set, each (n,): summed log π(y⁺), log π(y⁻), max_conf,
    and the response token counts (for the length-averaged losses)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    max_conf: torch.Tensor
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor


def batch_to(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """A copy of `batch` with its tensors moved to `device` (other values kept as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def pair_logps(model: nn.Module, batches: Sequence[Batch]) -> PairLogps:
    """One clean forward per batch → `PairLogps` over all pairs, float32 on the CPU.

    Each batch: input_ids, attention_mask, response_mask (2B, T), chosen rows first.
    """
    if len(batches) == 0:
        raise ValueError("expected at least one probe batch (input_ids, attention_mask, response_mask)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {f: [] for f in ("chosen", "rejected", "max_conf", "cl", "rl")}
    try:
        for batch in batches:
            b = batch_to(batch, device)
            logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits
            ids, mask = b["input_ids"], b["response_mask"]
            half = ids.shape[0] // 2
            seq = sequence_logps(logits, ids, mask).float().cpu()
            lens = response_lengths(mask).cpu()
            parts["chosen"].append(seq[:half])
            parts["rejected"].append(seq[half:])
            parts["max_conf"].append(max_conf_logps(logits[:half], ids[:half], mask[:half]).float().cpu())
            parts["cl"].append(lens[:half])
            parts["rl"].append(lens[half:])
    finally:
        model.train(was_training)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return PairLogps(cat["chosen"], cat["rejected"], cat["max_conf"], cat["cl"], cat["rl"])


def probe_metrics(
    policy: PairLogps, reference: PairLogps | None, loss: str = "sigmoid", beta: float = 0.1
) -> dict:
    """Means over the probe pairs (module docstring) from per-pair log-probs; the loss as training uses it
    (length-averaged log-probs for "ipo" / "simpo"; the reference only where the loss needs it)."""
    check_hyperparameters(loss, beta, {})
    average = AVERAGES_LOGPS[loss]

    def used(p: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
        if not average:
            return p.chosen, p.rejected
        return p.chosen / p.chosen_len.clamp_min(1.0), p.rejected / p.rejected_len.clamp_min(1.0)

    pc, pr = used(policy)
    rc = rr = None
    if NEEDS_REFERENCE[loss]:
        if reference is None:
            raise ValueError(f"loss {loss!r} needs reference log-probs for the probe set")
        rc, rr = used(reference)
    chosen_nll = -policy.chosen.sum() / policy.chosen_len.sum().clamp_min(1.0)
    value, rewards = preference_loss(loss, pc, pr, rc, rr, beta=beta, chosen_nll=chosen_nll)
    return {
        "logp_chosen": float(policy.chosen.mean()),
        "logp_rejected": float(policy.rejected.mean()),
        "logp_max_conf": float(policy.max_conf.mean()),
        "loss": float(value),
        "margin": float(rewards["margins"].mean()),
        "accuracy": float(rewards["accuracies"].mean()),
        "n": int(policy.chosen.numel()),
    }


def run_probes(
    model: nn.Module,
    probe_sets: Mapping[str, Sequence[Batch]],
    reference: Mapping[str, PairLogps | None],
    loss: str = "sigmoid",
    beta: float = 0.1,
    extra: Callable[[nn.Module, Sequence[Batch], str], dict] | None = None,
) -> dict[str, dict]:
    """{split: metrics} for each named probe set; `extra(model, batches, split)` adds fields (e.g. curvature)."""
    rows = {}
    for split, batches in probe_sets.items():
        row = probe_metrics(pair_logps(model, batches), reference.get(split), loss=loss, beta=beta)
        if extra is not None:
            row.update(extra(model, batches, split))
        rows[split] = row
    return rows
