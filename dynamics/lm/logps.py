"""Sequence log-probabilities of responses from a causal LM's logits, and the `max_conf` probe.

Conventions (shared by every function here):

- ``logits`` (B, T, V): position t predicts token ``input_ids[:, t + 1]`` (the usual causal shift; the last
  position predicts nothing and is ignored).
- ``input_ids`` (B, T) integer token ids, prompt then response, right- or left-padded.
- ``response_mask`` (B, T) bool/0-1: marks the response tokens *of input_ids* (prompt and padding are 0).
  A response token at position 0 has no predicting position and is rejected.

All reductions are computed in float32 (float64 if the logits are float64), whatever the logits' dtype.
"""

from __future__ import annotations

import torch

__all__ = ["token_logps", "sequence_logps", "max_conf_logps", "response_lengths", "check_logps_inputs"]


def _check_logits_ids(logits: torch.Tensor, input_ids: torch.Tensor) -> None:
    """ValueError unless logits is a floating (B, T, V) tensor and input_ids an integer (B, T) tensor in [0, V).

    Finiteness of the logits is not checked here (a full pass over B·T·V): non-finite logits give non-finite
    log-probs, which the losses and the training loop's NaN guard reject.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(input_ids, torch.Tensor):
        raise ValueError(
            f"expected torch tensors logits (B, T, V) and input_ids (B, T), "
            f"got {type(logits).__name__} and {type(input_ids).__name__}"
        )
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating tensor of shape (B, T, V), got {logits.dtype} {tuple(logits.shape)}"
        )
    b, t, v = logits.shape
    if tuple(input_ids.shape) != (b, t):
        raise ValueError(f"input_ids must have shape (B, T) = {(b, t)}, got {tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor (token ids), got {input_ids.dtype}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= v):
        raise ValueError(
            f"input_ids must lie in [0, {v}), got range [{int(input_ids.min())}, {int(input_ids.max())}]"
        )


def check_logps_inputs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> None:
    """Raise ValueError unless logits (B,T,V), input_ids (B,T) in [0,V) and a 0/1 response_mask (B,T) agree."""
    _check_logits_ids(logits, input_ids)
    b, t, _ = logits.shape
    if not isinstance(response_mask, torch.Tensor) or tuple(response_mask.shape) != (b, t):
        shape = (
            tuple(response_mask.shape)
            if isinstance(response_mask, torch.Tensor)
            else type(response_mask).__name__
        )
        raise ValueError(f"response_mask must be a tensor of shape (B, T) = {(b, t)}, got {shape}")
    if response_mask.numel() and not bool(((response_mask == 0) | (response_mask == 1)).all()):
        raise ValueError("response_mask must hold only 0/1 (or bool) values")
    if t and bool(response_mask[:, 0].any()):
        raise ValueError(
            "response_mask marks position 0, which no logit predicts: prepend at least one prompt token"
        )


def _shifted_logits(logits: torch.Tensor) -> torch.Tensor:
    """logits[:, :-1] (the positions that predict a next token) in float32, or float64 for float64 logits."""
    return logits[:, :-1, :].to(torch.promote_types(logits.dtype, torch.float32))


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities log softmax(logits[:, t])[ids[:, t+1]], shape (B, T-1).

    Computed as z_label − logsumexp(z) so the (B, T, V) log-softmax is never materialised twice.
    """
    _check_logits_ids(logits, input_ids)
    return _token_logps(logits, input_ids)


def _logps_parts(
    logits: torch.Tensor, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shifted logits z, `token_logps`, logsumexp(z)), each (B, T-1[, V]), without the input checks (callers
    have run `check_logps_inputs`); z and the logsumexp are returned so `max_conf` can reuse them."""
    z = _shifted_logits(logits)
    lse = torch.logsumexp(z, dim=-1)
    labels = input_ids[:, 1:].long().unsqueeze(-1)
    return z, z.gather(-1, labels).squeeze(-1) - lse, lse


def _token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """`token_logps` without the input checks (callers have run `check_logps_inputs`)."""
    return _logps_parts(logits, input_ids)[1]


def _max_conf(z: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t mask[t] · max_v log p(v) per row, from shifted logits z, their logsumexp and the shifted mask."""
    return ((z.amax(-1) - lse) * mask).sum(-1)


def response_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """Number of response tokens per row, shape (B,), float32."""
    return response_mask[:, 1:].to(torch.float32).sum(-1)


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """log π(response | prompt) = Σ_{t ∈ response} log p(ids[t] | ids[<t]), shape (B,).

    ``average=True`` divides by the number of response tokens (the length-normalised form used by IPO in TRL
    and by SimPO). Rows with no response token give 0 (sum) or 0 (average, 0/1 guarded). [ours]
    """
    check_logps_inputs(logits, input_ids, response_mask)
    tok = _token_logps(logits, input_ids)
    mask = response_mask[:, 1:].to(tok.dtype)
    total = (tok * mask).sum(-1)
    if average:
        total = total / mask.sum(-1).clamp_min(1.0)
    return total


def max_conf_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """`max_conf` (experiments.md): Σ_{t ∈ response} max_v log p(v | ids[<t]), shape (B,).

    Teacher-forced on the sequence given (pass the **chosen** rows), the log-probability of the argmax token
    at each response position, summed. max_v log p(v) = max_v z_v − logsumexp(z). [ours, after Ren & Sutherland]
    """
    check_logps_inputs(logits, input_ids, response_mask)
    z = _shifted_logits(logits)
    return _max_conf(z, torch.logsumexp(z, dim=-1), response_mask[:, 1:].to(z.dtype))
