"""Logit-space curvature on real LM tokens, and the multi-token head-step bridge (issue 6, part 2).

Per-token probe (theory.md §1, S1, S4, S5 applied to each token of a causal-LM batch; float64 internally):

- ``trace_hz``        tr H_z = 1 − ‖p‖²                                   (§1)
- ``feature_sq_norm`` μ = ‖h‖² (+1 with a head bias: the bias is a constant feature 1)
- ``head_trace``      μ · tr H_z = tr H_W, the head's Hessian trace: S1 [paper], H_W = (hhᵀ) ⊗ H_z, and
                      tr(A ⊗ B) = tr A · tr B; with a bias the head acts on [h; 1], hence ‖h‖² + 1.
- ``top_modal_share`` Σ_{j≤k} (v_jᵀ g)² / ‖g‖² for g = p − e_target and the k top-curvature modes of H_z
                      (S4 [paper]; computed by `dynamics.spectrum.top_modes`, O(kV) per token)
- ``alpha_target``, ``alpha_argmax``, ``alpha_top_other``: confidence ratios α = p_after / p_before (S5
                      [reconstructed]) of the target token, of the argmax token of the *before* logits, and of
                      the most likely non-target token y* = argmax_{k≠target} p_before (S5's y*), between two
                      checkpoints' logits on the same tokens.

Bridge at scale [ours; a multi-token form of S2/S3, derived here, not taken from the paper]. Frozen backbone:
fixed features h_i (N × d), head W (V × d), optional bias b; summed loss L = Σ_i CE(z_i, y_i), z_i = W h_i + b,
g_i = p_i − e_{y_i}, H_i = diag(p_i) − p_i p_iᵀ. Then ∇_W L = G = Σ_j g_j h_jᵀ and ∇_b L = Σ_j g_j.

- NTK coupling: Θ^W_ij = h_iᵀ h_j and, for the step, Θ_ij = Θ^W_ij (+1 with a bias that is trained).
- SAM perturbation (W only; the bias is not perturbed, theory.md §4): ε = ρ G / ‖G‖_F with
  ‖G‖_F² = Σ_ij Θ^W_ij g_iᵀ g_j. It moves the logits of token i by exactly
      δ_i = ε h_i = ρ Σ_j Θ^W_ij g_j / ‖G‖_F                                         (exact, as S2)
  For N = 1: δ = ρ μ g / (√μ ‖g‖) = ρ̃ g with ρ̃ = ρ√μ/‖g‖, which is S2.
- Exact step: W⁺ = W − η Σ_j g̃_j h_jᵀ, b⁺ = b − η Σ_j g̃_j, g̃_j = softmax(z_j + δ_j) − e_{y_j}, so
      Δz_i = −η Σ_j Θ_ij g̃_j                                                          (exact)
- First order, g̃_j = g_j + H_j δ_j + O(‖δ‖²):
      Δz_i = −η Σ_j Θ_ij (g_j + H_j δ_j) + r_z,         r_z = O(|η| ρ²)              (logit form)
      g_i⁺ = g_i − η H_i Σ_j Θ_ij (g_j + H_j δ_j) + r_g, r_g = O(|η|ρ² + η²)         (residual form)
  With ρ = κ√|η| the SAM term is O(|η|^{3/2}) and both remainders O(η²) (theory.md S3's check); with ρ = 0
  the logit form is exact. Dropping the H_j δ_j term, flipping its sign, or dropping the cross-token coupling
  (Θ → diag Θ) leaves an O(|η|^{3/2}) or O(|η|) error instead.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from dynamics.spectrum import top_mode_batched, top_modes

STAT_KEYS = (
    "trace_hz",
    "feature_sq_norm",
    "head_trace",
    "top_modal_share",
    "alpha_target",
    "alpha_argmax",
    "alpha_top_other",
)


def _flatten(
    logits: torch.Tensor, hidden: torch.Tensor, target_ids: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Validate and flatten to (N, V), (N, d), (N,), (N,) bool; returns the token shape (B, T) or (N,)."""
    if not isinstance(logits, torch.Tensor) or logits.ndim not in (2, 3):
        raise ValueError(
            f"logits: expected a tensor of shape (B, T, V) or (N, V), got {getattr(logits, 'shape', None)}"
        )
    token_shape = tuple(logits.shape[:-1])
    if (
        not isinstance(hidden, torch.Tensor)
        or tuple(hidden.shape[:-1]) != token_shape
        or hidden.ndim != logits.ndim
    ):
        raise ValueError(
            f"hidden: expected shape {token_shape + ('d',)}, got {getattr(hidden, 'shape', None)}"
        )
    if not isinstance(target_ids, torch.Tensor) or tuple(target_ids.shape) != token_shape:
        raise ValueError(
            f"target_ids: expected shape {token_shape}, got {getattr(target_ids, 'shape', None)}"
        )
    if target_ids.dtype.is_floating_point or target_ids.dtype == torch.bool:
        raise ValueError(f"target_ids: expected integer token ids, got dtype {target_ids.dtype}")
    vocab = logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"logits: expected a vocabulary of at least 2, got {vocab}")
    if mask is None:
        mask = torch.ones(token_shape, dtype=torch.bool, device=logits.device)
    elif not isinstance(mask, torch.Tensor) or tuple(mask.shape) != token_shape:
        raise ValueError(f"mask: expected shape {token_shape}, got {getattr(mask, 'shape', None)}")
    flat_mask = mask.reshape(-1).to(torch.bool)
    flat_targets = target_ids.reshape(-1)
    chosen = flat_targets[flat_mask]
    if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= vocab):
        raise ValueError(f"target_ids: expected ids in [0, {vocab}) on masked-in tokens")
    flat_logits = logits.detach().reshape(-1, vocab).to(torch.float64)
    flat_hidden = hidden.detach().reshape(-1, hidden.shape[-1]).to(torch.float64)
    if not torch.isfinite(flat_logits[flat_mask]).all() or not torch.isfinite(flat_hidden[flat_mask]).all():
        raise ValueError("logits/hidden: expected finite values on masked-in tokens")
    return flat_logits, flat_hidden, flat_targets.clamp(0, vocab - 1), flat_mask, token_shape


def token_curvature_stats(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    target_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    logits_after: torch.Tensor | None = None,
    head_bias: bool = False,
    top_k: int = 1,
    modal_share: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-token curvature probe (module docstring; §1, S1, S4, S5).

    logits (B, T, V) or (N, V): the logits that predict ``target_ids`` (B, T) or (N,) (for a causal LM, the
    caller shifts: logits[:, t] predicts input_ids[:, t + 1]); hidden (..., d): the states entering lm_head at
    the same positions; mask (...) bool/0-1, default all; logits_after (same shape as logits): a second
    checkpoint's logits on the same tokens, for the α ratios; head_bias: whether lm_head has a bias (μ gets +1);
    top_k: modes used for ``top_modal_share`` (on the CPU, float64; top_k = 1 is batched over tokens, about
    0.3 s for 64 tokens at V = 50,257 on one busy core; top_k > 1 loops over tokens, O(top_k·V) each);
    modal_share=False skips it. Returns float64 tensors of the token shape, NaN on masked-out tokens, plus
    ``mask`` (bool). The α keys appear only with ``logits_after``.
    """
    flat_logits, flat_hidden, targets, flat_mask, token_shape = _flatten(logits, hidden, target_ids, mask)
    num_tokens, vocab = flat_logits.shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
        raise ValueError(f"top_k: expected an int in [1, {vocab}], got {top_k!r}")
    log_p = torch.log_softmax(flat_logits, dim=-1)
    p = log_p.exp()
    nan = torch.full((num_tokens,), float("nan"), dtype=torch.float64, device=flat_logits.device)
    trace_hz = 1.0 - (p * p).sum(-1)
    mu = (flat_hidden * flat_hidden).sum(-1) + (1.0 if head_bias else 0.0)
    stats = {"trace_hz": trace_hz, "feature_sq_norm": mu, "head_trace": mu * trace_hz}
    if modal_share:
        share = nan.clone()
        rows = torch.nonzero(flat_mask).flatten()
        if rows.numel():
            p_rows = p[rows].cpu().numpy()
            p_rows /= p_rows.sum(axis=1, keepdims=True)
            residual = p_rows.copy()
            residual[np.arange(rows.numel()), targets[rows].cpu().numpy()] -= 1.0
            share[rows] = torch.as_tensor(_shares(p_rows, residual, top_k), device=share.device)
        stats["top_modal_share"] = share
    if logits_after is not None:
        if not isinstance(logits_after, torch.Tensor) or logits_after.shape != logits.shape:
            raise ValueError(
                f"logits_after: expected shape {tuple(logits.shape)}, got {getattr(logits_after, 'shape', None)}"
            )
        after = logits_after.detach().reshape(-1, vocab).to(torch.float64).to(flat_logits.device)
        if not torch.isfinite(after[flat_mask]).all():
            raise ValueError("logits_after: expected finite values on masked-in tokens")
        stats.update(_alphas(_snapshot(log_p, targets), torch.log_softmax(after, dim=-1)))
    out = {key: torch.where(flat_mask, value, nan).reshape(token_shape) for key, value in stats.items()}
    out["mask"] = flat_mask.reshape(token_shape)
    return out


ALPHA_KEYS = ("alpha_target", "alpha_argmax", "alpha_top_other")


def _snapshot(log_p: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Indices (N, 3) of the target, the argmax and y* = argmax_{k≠target} under log_p (N, V), and their
    log-probabilities (N, 3): all that the α ratios need from the *before* checkpoint (O(N), not O(N·V))."""
    argmax = log_p.argmax(-1)
    others = log_p.scatter(-1, targets[:, None], float("-inf")).argmax(-1)
    index = torch.stack([targets, argmax, others], dim=-1)
    return {"index": index, "log_p": log_p.gather(-1, index)}


def _alphas(snapshot: dict[str, torch.Tensor], log_p_after: torch.Tensor) -> dict[str, torch.Tensor]:
    """α = p_after / p_before for the snapshot's three tokens (S5 [reconstructed]); each (N,)."""
    index = snapshot["index"].to(log_p_after.device)
    log_ratio = log_p_after.gather(-1, index) - snapshot["log_p"].to(log_p_after)
    return {key: log_ratio[:, i].exp() for i, key in enumerate(ALPHA_KEYS)}


def confidence_snapshot(
    logits: torch.Tensor, target_ids: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """What `confidence_ratios_since` needs from one checkpoint's logits (..., V) on target_ids (...): per token
    the indices and log-probabilities of the target, the argmax and y* (S5's most likely other class), plus the
    mask. O(N) memory, so a training loop can keep it between probes at vocabulary scale."""
    flat_logits, _, targets, flat_mask, token_shape = _flatten(logits, logits[..., :1], target_ids, mask)
    log_p = torch.log_softmax(flat_logits.detach().to(torch.float64), dim=-1)
    shape = torch.tensor((*token_shape, flat_logits.shape[-1]))  # token shape, then the vocabulary size
    return {**_snapshot(log_p, targets), "mask": flat_mask, "shape": shape}


def confidence_ratios_since(
    snapshot: dict[str, torch.Tensor], logits: torch.Tensor
) -> dict[str, torch.Tensor]:
    """α_target, α_argmax, α_top_other (S5 [reconstructed]) between the checkpoint of ``snapshot`` and the
    current ``logits`` (same tokens), NaN on masked-out tokens, plus ``mask``: the same keys and values as
    `token_curvature_stats(..., logits_after=...)` gives, summarised by `summarize_curvature`."""
    *shape, vocab = (int(n) for n in snapshot["shape"])
    shape = tuple(shape)
    if tuple(logits.shape) != (*shape, vocab):
        raise ValueError(
            f"logits: expected token shape {shape} and vocabulary {vocab} (the snapshot's), got {tuple(logits.shape)}"
        )
    log_p = torch.log_softmax(logits.detach().reshape(-1, vocab).to(torch.float64), dim=-1)
    mask = snapshot["mask"].to(log_p.device)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=log_p.device)
    out = {
        key: torch.where(mask, value, nan).reshape(shape) for key, value in _alphas(snapshot, log_p).items()
    }
    out["mask"] = mask.reshape(shape)
    return out


def _shares(probs: np.ndarray, residual: np.ndarray, top_k: int) -> np.ndarray:
    """Σ_{j≤k} (v_jᵀ g)² / ‖g‖² per row on the top-k modes of H_z (S4); (N, V), (N, V) -> (N,); 0 where g = 0.
    top_k = 1 is solved for all rows at once (`top_mode_batched`); larger k row by row (`top_modes`)."""
    totals = np.einsum("nv,nv->n", residual, residual)
    if top_k == 1:
        _, vectors = top_mode_batched(probs)
        coeffs_sq = np.einsum("nv,nv->n", vectors, residual) ** 2
    else:
        coeffs_sq = np.empty(probs.shape[0])
        for row in range(probs.shape[0]):
            _, vectors = top_modes(probs[row], top_k)
            coeffs = vectors.T @ residual[row]
            coeffs_sq[row] = coeffs @ coeffs
    return np.divide(coeffs_sq, totals, out=np.zeros_like(totals), where=totals > 0)


def summarize_curvature(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Masked means of `token_curvature_stats` output: {key: mean over masked-in tokens} for each stat present,
    plus ``n_tokens``. The α means are arithmetic means of the per-token ratios. NaN when no token is in."""
    if "mask" not in stats:
        raise ValueError("stats: expected the output of token_curvature_stats (with a 'mask' entry)")
    mask = stats["mask"].to(torch.bool)
    count = int(mask.sum())
    summary: dict[str, float] = {"n_tokens": float(count)}
    for key in STAT_KEYS:
        if key in stats:
            summary[key] = float(stats[key][mask].mean()) if count else float("nan")
    return summary


@torch.no_grad()
def model_token_curvature(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    *,
    logits_before: torch.Tensor | None = None,
    top_k: int = 1,
    modal_share: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`token_curvature_stats` for a Hugging Face causal LM on one batch, in one forward pass, no gradient.

    input_ids, attention_mask, loss_mask: (B, T). Next-token alignment: position t (t < T − 1) predicts
    input_ids[:, t + 1]; a token counts when attention_mask and loss_mask (e.g. a response mask) are 1 at t + 1.
    The features h are the inputs of ``model.get_output_embeddings()`` (captured by a forward hook, so any
    final norm is included); a head bias is detected. logits_before: next-token logits (B, T − 1, V) of an
    earlier checkpoint on the same batch (the second return value of an earlier call): the α ratios are then
    p_now / p_before. Returns (stats over (B, T − 1), next-token logits (B, T − 1, V) of this model).
    """
    head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        handle.remove()
    hidden = captured[-1][:, :-1]
    logits = logits[:, :-1]
    mask = torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    if attention_mask is not None:
        mask &= attention_mask[:, 1:].to(torch.bool)
    if loss_mask is not None:
        mask &= loss_mask[:, 1:].to(torch.bool)
    head_bias = getattr(head, "bias", None) is not None
    targets = input_ids[:, 1:]
    stats = token_curvature_stats(
        logits, hidden, targets, mask, head_bias=head_bias, top_k=top_k, modal_share=modal_share
    )
    if logits_before is not None:
        ratios = token_curvature_stats(
            logits_before, hidden, targets, mask, logits_after=logits, modal_share=False
        )
        stats.update({key: value for key, value in ratios.items() if key.startswith("alpha_")})
    return stats, logits.detach()


def ntk_gram(hidden: torch.Tensor, head_bias: bool = False) -> torch.Tensor:
    """Θ_ij = h_iᵀ h_j (+1 with a head bias): the head's empirical NTK between tokens; hidden (N, d) -> (N, N)."""
    if hidden.ndim != 2:
        raise ValueError(f"hidden: expected shape (N, d), got {tuple(hidden.shape)}")
    gram = hidden @ hidden.T
    return gram + 1.0 if head_bias else gram


def _check_head_step_inputs(
    logits: torch.Tensor, hidden: torch.Tensor, target_ids: torch.Tensor, **scalars: float
) -> None:
    """ValueError unless logits (N, V), hidden (N, d), target_ids (N,) in [0, V) are finite and consistent
    (the checks of `token_curvature_stats`, all tokens in) and every named scalar is a finite real number."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ValueError(f"logits: expected a tensor of shape (N, V), got {getattr(logits, 'shape', None)}")
    _flatten(logits, hidden, target_ids, None)
    for name, value in scalars.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
            raise ValueError(f"{name}: expected a finite real number, got {value!r}")


def _residuals(logits: torch.Tensor, target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.softmax(logits, dim=-1)
    return p, p - torch.nn.functional.one_hot(target_ids, logits.shape[-1]).to(p.dtype)


def _hz_apply(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Row-wise H_z x = p ⊙ x − p (pᵀx) in O(V); p, x (N, V) -> (N, V)."""
    return p * x - p * (p * x).sum(-1, keepdim=True)


def sam_logit_perturbation(
    logits: torch.Tensor, hidden: torch.Tensor, target_ids: torch.Tensor, rho: float
) -> torch.Tensor:
    """δ_i = ε h_i = ρ Σ_j Θ^W_ij g_j / ‖G‖_F, exact [ours; multi-token S2]; (N, V), (N, d), (N,) -> (N, V).

    G = Σ_j g_j h_jᵀ is the summed-CE gradient of W; ‖G‖_F² = Σ_ij Θ^W_ij g_iᵀ g_j; δ = 0 when G = 0.
    """
    _check_head_step_inputs(logits, hidden, target_ids, rho=rho)
    _, g = _residuals(logits, target_ids)
    return _perturbation(g, hidden, rho)


def _perturbation(g: torch.Tensor, hidden: torch.Tensor, rho: float) -> torch.Tensor:
    """`sam_logit_perturbation` from the residuals g (N, V), inputs already checked."""
    coupled = ntk_gram(hidden) @ g  # (Θ^W g)_i = G h_i
    norm_sq = (g * coupled).sum()
    if float(norm_sq) <= 0.0:
        return torch.zeros_like(g)
    return rho * coupled / norm_sq.sqrt()


def predicted_head_step(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    target_ids: torch.Tensor,
    lr: float,
    rho: float = 0.0,
    *,
    head_bias: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order multi-token head step of GD (ρ = 0) or SAM [ours; module docstring, multi-token S3].

    logits (N, V), hidden (N, d), target_ids (N,), lr = η (either sign), rho = ρ (either sign), head_bias:
    whether the head has a trained (unperturbed) bias. Returns (Δz (N, V), g⁺ (N, V)):
        Δz_i = −η Σ_j Θ_ij (g_j + H_j δ_j),   g⁺_i = g_i + H_i Δz_i,   δ = `sam_logit_perturbation`.
    """
    _check_head_step_inputs(logits, hidden, target_ids, lr=lr, rho=rho)
    p, g = _residuals(logits, target_ids)
    delta = _perturbation(g, hidden, rho)  # inputs checked above, residuals computed once
    effective = g + _hz_apply(p, delta)
    dz = -lr * (ntk_gram(hidden, head_bias) @ effective)
    return dz, g + _hz_apply(p, dz)
