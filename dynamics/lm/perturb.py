"""logits-SAM, full SAM and plain training of a Hugging Face causal LM behind one interface. [paper §4, Algorithm 1]

Notation (theory.md §4): h (N, d) hidden states entering the output head, W (V, d) and optional bias b, clean
logits Z = h Wᵀ + b, ℓ(Z) a loss of the logits, G_Z = ∂ℓ/∂Z on detached Z, G_W = G_Zᵀ h,
ε = ρ G_W / ‖G_W‖_F (0 when G_W = 0), perturbed logits Z̃ = h (W + ε)ᵀ + b = Z + h εᵀ.

**Batch** (a mapping of tensors; chosen rows first, pair i ↔ rows i and B+i):

- ``input_ids`` (2B, T) long: prompt + response, padded;
- ``attention_mask`` (2B, T), optional: 1 on real tokens (passed to the backbone);
- ``response_mask`` (2B, T): 1 on the response tokens of ``input_ids`` (0 on prompt and padding);
- ``position_ids`` (2B, T), optional: passed to the backbone when present;
- ``ref_chosen_logps``, ``ref_rejected_logps`` (B,): reference log-probs, for losses that need them.

Only ``input_ids``, ``attention_mask`` and ``position_ids`` reach the model; the whole batch reaches the loss.

**Loss** ``loss_fn(logits (2B, T, V), batch) -> (loss scalar, metrics dict)``, e.g.
`dynamics.lm.losses.PreferenceObjective`. This module never knows which loss, dataset or trainer is used.

**Methods** (`METHODS`): ``"adamw"`` (plain training with whatever optimizer is passed), ``"logits-sam"``
(one backbone forward; only the head's *use* of W is perturbed, so tied input embeddings (GPT-2) are not; the
bias is never perturbed), ``"sam"`` (Foret et al.: two forward-backward passes, every trainable parameter
perturbed by ρ g/‖g‖ and restored bit-exactly before the optimizer step). ρ may be negative; ρ = 0 reproduces
plain training bit-exactly (see the tests).

**Routes** for logits-SAM: "dense" forms G_W (V × d); "gram" never does and uses the Ns × Ns Gram matrices of
the Ns rows where G_Z ≠ 0: ‖G_W‖² = Σ (h_s h_sᵀ) ⊙ (G_s G_sᵀ), h εᵀ = (ρ/‖G_W‖) (h h_sᵀ) G_s. "auto" (default)
picks the route with fewer flops for each batch (`choose_route`).

**Precision**: G_W (or the Gram matrices) come from products in the compute dtype (bf16 under bf16 autocast),
stored and reduced in float32 (float64 for a float64 model): the norm and ε are float32; ‖G_W‖ = 0 gives
ε = 0. In float32/float64 the perturbed logits are F.linear(h, W + ε, b): beyond plain training, one V×d×N
matmul for G_W and one for Z̃ (the clean logits are the plain forward's). Under autocast or with
low-precision weights W + ε would round ε away (per entry ‖ε‖ is far below bf16's spacing of W), so the
perturbation is added to the logits in float32 instead, Z̃ = float(Z) + float(h εᵀ), which costs one more
head-sized matmul in the backward (dh through h εᵀ).

**Modes**: `PreferenceStep` calls ``model.train()``; with dropout on, full SAM's two passes draw different
masks (as in every SAM implementation) — preference training usually sets dropout to 0.

**Distributed** (torch.distributed initialised, world size > 1): pass the *unwrapped* model; `PreferenceStep`
all-reduces (averages) the gradients itself after the last micro-batch. ``norm="local"`` (default, as the
official logits-SAM code does under DDP and as the paper's numbers were obtained) uses each replica's own
G_W (or, for full SAM, its own gradient); ``norm="global"`` all-reduces G_W (full SAM: the gradient) before the
norm, i.e. the perturbation of one big batch over all replicas (logits-SAM: dense route, one V×d all-reduce).
With gradient accumulation, logits-SAM perturbs each micro-batch with that micro-batch's G_W (as the official
code does); full SAM accumulates the clean gradient of all micro-batches first.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "METHODS",
    "ROUTES",
    "NORMS",
    "LossFn",
    "StepOutput",
    "output_head",
    "backbone_hidden",
    "choose_route",
    "perturbed_head_logits",
    "plain_loss",
    "logits_sam_loss",
    "compute_step",
    "PreferenceStep",
    "make_trainer_step",
]

METHODS = ("adamw", "logits-sam", "sam")
ROUTES = ("auto", "dense", "gram")
NORMS = ("local", "global")
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")

LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], tuple[torch.Tensor, dict]]


@dataclass
class StepOutput:
    """``loss``: the scalar to backpropagate; ``metrics``: detached values computed on the **clean** logits
    (whatever the loss function reports) plus ``loss_clean``, ``loss_perturbed``, ``perturbation_norm`` (‖G_W‖
    or ‖g‖, before ρ) and ``route`` (0 = none, 1 = dense, 2 = gram)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _check_choice(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {list(allowed)}, got {value!r}")


def _check_rho(rho: object) -> float:
    """ρ as a float; ValueError unless it is a finite real number (any sign)."""
    if isinstance(rho, torch.Tensor) and rho.numel() == 1:
        rho = rho.item()
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not math.isfinite(rho):
        raise ValueError(f"rho must be a finite real number (any sign), got {rho!r}")
    return float(rho)


def output_head(model: nn.Module) -> nn.Linear:
    """The output layer, found through ``get_output_embeddings()``; ValueError unless it is a Linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"expected a causal LM whose get_output_embeddings() is an nn.Linear, got {type(head).__name__}"
        )
    return head


def backbone_hidden(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One backbone forward: the hidden states entering the head, (2B, T, d). Uses ``model.base_model``.

    Assumes the model's logits are exactly ``head(base_model(...)[0])`` (true of GPT-2, GPT-NeoX/Pythia,
    Llama, Mistral, Qwen; not of models that soft-cap or rescale logits, e.g. Gemma-2: checked in the tests).
    """
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError("expected a Hugging Face *ForCausalLM model with a separate base_model (backbone)")
    if "input_ids" not in batch:
        raise ValueError("batch must contain 'input_ids' (2B, T)")
    kwargs = {k: batch[k] for k in MODEL_KEYS if k in batch and batch[k] is not None}
    out = base(**kwargs, use_cache=False)
    return out[0]


def choose_route(n_rows: int, n_selected: int, vocab: int, hidden: int) -> str:
    """ "gram" when its flop count is lower than the dense route's, else "dense". [ours]

    dense: 4·N·V·d + Ns·V·d (clean logits, G_W, perturbed forward, 2 backward matmuls);
    gram:  3·N·V·d + (Ns² + 2·N·Ns)·(V + d) (clean forward and backward, the two Gram matrices, h εᵀ forward
    and its backward through h). N rows, Ns rows with G_Z ≠ 0.
    """
    dense = (4 * n_rows + n_selected) * vocab * hidden
    gram = 3 * n_rows * vocab * hidden + (n_selected**2 + 2 * n_rows * n_selected) * (vocab + hidden)
    return "gram" if gram < dense else "dense"


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def perturbed_head_logits(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grad_logits: torch.Tensor,
    rho: float,
    *,
    route: str = "auto",
    norm: str = "local",
    clean_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Z̃ = h (W + ε)ᵀ + b with ε = ρ G_W/‖G_W‖_F, G_W = G_Zᵀ h (theory.md §4, steps 3–4). Shapes:
    h (N, d) attached to the graph, W (V, d), b (V,) or None, grad_logits G_Z (N, V) detached → Z̃ (N, V).

    ε is a constant (no gradient flows through it); gradients reach W, b and h. ``clean_logits`` (N, V), if
    given, must be F.linear(h, W, b) *attached* (the Gram and low-precision routes reuse it). Returns Z̃ and
    ``{"perturbation_norm": ‖G_W‖, "route": 1 dense | 2 gram}``.
    """
    _check_choice(route, ROUTES, "route")
    _check_choice(norm, NORMS, "norm")
    if h.dim() != 2 or grad_logits.dim() != 2 or grad_logits.shape[0] != h.shape[0]:
        raise ValueError(
            f"expected h (N, d) and grad_logits (N, V), got {tuple(h.shape)} and {tuple(grad_logits.shape)}"
        )
    if weight.shape != (grad_logits.shape[1], h.shape[1]):
        raise ValueError(
            f"expected weight (V, d) = {(grad_logits.shape[1], h.shape[1])}, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"expected bias (V,) = ({weight.shape[0]},) or None, got {tuple(bias.shape)}")
    rho = _check_rho(rho)
    if not bool(torch.isfinite(grad_logits).all()):
        # NaN rows would otherwise be dropped silently by the G_Z ≠ 0 row selection below
        raise ValueError("grad_logits must be finite (is the clean loss NaN or infinite?)")
    acc = _acc_dtype(h, weight)
    dev_type = h.device.type
    low_precision = torch.is_autocast_enabled(dev_type) or weight.dtype not in (torch.float32, torch.float64)
    # The large products run in the compute dtype (bf16 under autocast: a float32 V×d×N matmul would cost more
    # than the whole logits-SAM budget on a GPU); the norm and ε are reduced and kept in float32 (or float64).
    if torch.is_autocast_enabled(dev_type):
        mm = torch.get_autocast_dtype(dev_type)
    else:
        mm = acc if weight.dtype in (torch.float32, torch.float64) else weight.dtype
    n, d = h.shape
    v = weight.shape[0]
    with torch.no_grad(), torch.autocast(dev_type, enabled=False):
        sel = grad_logits.abs().amax(dim=1) > 0
        gs = grad_logits[sel].to(mm)
        hs = h.detach()[sel].to(mm)
    global_norm = norm == "global" and _distributed()
    if route == "auto":
        route = "dense" if global_norm else choose_route(n, int(gs.shape[0]), v, d)
    if route == "gram" and global_norm:
        raise ValueError("norm='global' under torch.distributed needs the dense route (G_W is all-reduced)")

    if route == "dense":
        with torch.no_grad(), torch.autocast(dev_type, enabled=False):
            grad_w = (gs.T @ hs).to(acc)  # (V, d)
            if global_norm:
                torch.distributed.all_reduce(grad_w)
            gnorm = torch.linalg.vector_norm(grad_w)
            scale = rho / gnorm if gnorm > 0 else torch.zeros((), dtype=acc, device=h.device)
            eps = grad_w.mul_(scale)
        if not low_precision:
            out = F.linear(h, weight + eps.to(weight.dtype), bias)
        else:
            z = clean_logits if clean_logits is not None else F.linear(h, weight, bias)
            out = z.to(acc) + F.linear(h, eps.to(weight.dtype)).to(acc)
        return out, {"perturbation_norm": gnorm.detach(), "route": torch.tensor(1)}

    # Gram route: never forms a V×d matrix.
    with torch.no_grad(), torch.autocast(dev_type, enabled=False):
        gram_h = (hs @ hs.T).to(acc)
        gram_g = (gs @ gs.T).to(acc)
        gnorm = torch.sqrt((gram_h * gram_g).sum().clamp_min(0))
        scale = rho / gnorm if gnorm > 0 else torch.zeros((), dtype=acc, device=h.device)
    z = clean_logits if clean_logits is not None else F.linear(h, weight, bias)
    with torch.autocast(dev_type, enabled=False):
        delta = ((h.to(mm) @ hs.T) @ gs).to(acc) * scale
    out = z.to(acc) + delta
    return out, {"perturbation_norm": gnorm.detach(), "route": torch.tensor(2)}


def _head_params(model: nn.Module) -> tuple[nn.Linear, torch.Tensor, torch.Tensor | None]:
    head = output_head(model)
    return head, head.weight, head.bias


def plain_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], loss_fn: LossFn) -> StepOutput:
    """Plain training loss: one backbone forward, clean logits = head(h), ℓ(Z). Metrics on those logits."""
    h = backbone_hidden(model, batch)
    _, weight, bias = _head_params(model)
    logits = F.linear(h, weight, bias)
    loss, metrics = loss_fn(logits, batch)
    return _step_output(loss, metrics, loss, route=torch.tensor(0))


def _step_output(
    loss: torch.Tensor,
    clean_metrics: Mapping[str, torch.Tensor],
    loss_clean: torch.Tensor,
    **info: torch.Tensor,
) -> StepOutput:
    """`StepOutput`: ``loss`` to backpropagate; the loss function's clean-logit metrics, detached, plus
    ``loss_clean``, ``loss_perturbed`` (= ``loss``) and ``info`` (route, perturbation_norm)."""
    metrics = {k: v.detach() for k, v in clean_metrics.items()}
    metrics.update(loss_clean=loss_clean.detach(), loss_perturbed=loss.detach(), **info)
    return StepOutput(loss, metrics)


def logits_sam_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    rho: float,
    *,
    route: str = "auto",
    norm: str = "local",
) -> StepOutput:
    """logits-SAM (theory.md §4, Algorithm 1): ℓ(Z̃) to backpropagate, metrics on the clean logits.

    Exactly one backbone forward; G_Z from autograd of ℓ on detached clean logits (no backward through the
    body); ε on the head's use of W only (never the bias, never tied input embeddings).
    """
    _check_choice(route, ROUTES, "route")
    _check_choice(norm, NORMS, "norm")
    rho = _check_rho(rho)
    h = backbone_hidden(model, batch)  # (2B, T, d)
    _, weight, bias = _head_params(model)
    shape = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])
    # Clean logits, computed once with the graph attached: the Gram and low-precision routes reuse them as the
    # base of Z̃; the float32/64 dense route recomputes Z̃ = h (W + ε)ᵀ + b and ignores them (no backward through).
    z_att = F.linear(h2, weight, bias)
    z_clean = z_att.detach()
    acc = _acc_dtype(h2, weight)
    z_leaf = z_clean.to(acc).reshape(*shape, -1).requires_grad_(True)
    with torch.enable_grad():
        loss_clean, metrics = loss_fn(z_leaf, batch)
        (grad_z,) = torch.autograd.grad(loss_clean, z_leaf)
    grad_z = grad_z.reshape(h2.shape[0], -1)
    z_pert, info = perturbed_head_logits(
        h2, weight, bias, grad_z, rho, route=route, norm=norm, clean_logits=z_att
    )
    del z_att, z_clean, z_leaf
    loss_pert, _ = loss_fn(z_pert.reshape(*shape, -1), batch)
    return _step_output(loss_pert, metrics, loss_clean, **info)


def compute_step(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    *,
    method: str = "adamw",
    rho: float = 0.0,
    route: str = "auto",
    norm: str = "local",
) -> StepOutput:
    """The loss to backpropagate for a single-pass method ("adamw" or "logits-sam"); full SAM needs two
    backward passes and an optimizer in between: use `PreferenceStep`."""
    _check_choice(method, METHODS, "method")
    if method == "sam":
        raise ValueError("method 'sam' needs two backward passes: use PreferenceStep / make_trainer_step")
    if method == "adamw":
        return plain_loss(model, batch, loss_fn)
    return logits_sam_loss(model, batch, loss_fn, rho, route=route, norm=norm)


class PreferenceStep:
    """One optimizer step of plain / logits-SAM / full-SAM training: ``step(batch or [micro-batches]) -> metrics``.

    Does forward, backward (each micro-batch's loss divided by the number of micro-batches, so equal-size
    micro-batches give the full-batch mean), optional gradient clipping (``max_grad_norm``), the gradient
    all-reduce under torch.distributed, ``optimizer.step()`` and ``optimizer.zero_grad(set_to_none=True)``.
    The caller owns learning-rate schedulers. ``autocast_dtype`` (e.g. torch.bfloat16) wraps the forward
    passes in torch.autocast on the model's device. Returned metrics are Python floats averaged over the
    micro-batches, computed on the clean logits (see `StepOutput`), plus ``grad_norm`` when clipping.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        method: str = "adamw",
        rho: float = 0.0,
        *,
        route: str = "auto",
        norm: str = "local",
        max_grad_norm: float | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        _check_choice(method, METHODS, "method")
        _check_choice(route, ROUTES, "route")
        _check_choice(norm, NORMS, "norm")
        rho = _check_rho(rho)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        output_head(model)
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.method, self.rho, self.route, self.norm = method, float(rho), route, norm
        self.max_grad_norm, self.autocast_dtype = max_grad_norm, autocast_dtype

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=self.autocast_dtype)

    def _params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _forward_backward(self, micro: Sequence[Mapping], single_pass: str) -> list[dict]:
        rows = []
        for mb in micro:
            with self._autocast():
                if single_pass == "logits-sam":
                    out = logits_sam_loss(
                        self.model, mb, self.loss_fn, self.rho, route=self.route, norm=self.norm
                    )
                else:
                    out = plain_loss(self.model, mb, self.loss_fn)
            (out.loss / len(micro)).backward()
            rows.append(out.metrics)
        return rows

    def _allreduce_grads(self, bucket_numel: int = 2**25) -> None:
        """Average the gradients over replicas: flattened buckets of ≤ bucket_numel elements per dtype."""
        if not _distributed():
            return
        world = torch.distributed.get_world_size()
        grads = [p.grad for p in self._params() if p.grad is not None]
        buckets: dict[tuple, list[list[torch.Tensor]]] = {}
        for g in grads:
            groups = buckets.setdefault((g.dtype, g.device), [[]])
            if groups[-1] and sum(t.numel() for t in groups[-1]) + g.numel() > bucket_numel:
                groups.append([])
            groups[-1].append(g)
        for groups in buckets.values():
            for group in groups:
                flat = torch.cat([g.reshape(-1) for g in group])
                torch.distributed.all_reduce(flat)
                flat.div_(world)
                offset = 0
                for g in group:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()

    def __call__(self, batch: Mapping | Sequence[Mapping]) -> dict[str, float]:
        micro = [batch] if isinstance(batch, Mapping) else list(batch)
        if not micro:
            raise ValueError("expected a batch or a non-empty list of micro-batches")
        self.model.train()
        if self.method == "sam":
            rows = self._sam_passes(micro)
        else:
            rows = self._forward_backward(micro, self.method)
            self._allreduce_grads()
        metrics = {k: float(sum(float(r[k]) for r in rows) / len(rows)) for k in rows[0]}
        if self.max_grad_norm is not None:
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self._params(), self.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def _sam_passes(self, micro: Sequence[Mapping]) -> list[dict]:
        """Full SAM: clean gradient → ε = ρ g/‖g‖ on every parameter → perturbed gradient → restore."""
        rows = self._forward_backward(micro, "adamw")
        if self.norm == "global":
            self._allreduce_grads()
        params = [p for p in self._params() if p.grad is not None]
        with torch.no_grad():
            acc = _acc_dtype(*[p for p in params]) if params else torch.float32
            sq = sum((p.grad.to(acc) ** 2).sum() for p in params) if params else torch.zeros(())
            gnorm = torch.sqrt(torch.as_tensor(sq))
            scale = self.rho / gnorm if gnorm > 0 else torch.zeros((), dtype=acc)
            backups = [p.detach().clone() for p in params]
            for p in params:
                p.add_((p.grad.to(acc) * scale).to(p.dtype))
        self.optimizer.zero_grad(set_to_none=True)
        perturbed = self._forward_backward(micro, "adamw")
        self._allreduce_grads()
        with torch.no_grad():
            for p, b in zip(params, backups, strict=True):
                p.copy_(b)
        for r, q in zip(rows, perturbed, strict=True):
            r["loss_perturbed"] = q["loss_clean"]
            r["perturbation_norm"] = gnorm.detach()
        return rows


def make_trainer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: str,
    rho: float,
    loss_fn: LossFn,
    **kwargs,
) -> PreferenceStep:
    """``step = make_trainer_step(model, optimizer, "logits-sam", 1e-3, PreferenceObjective("sigmoid"))``;
    ``metrics = step(batch)``. Keywords as `PreferenceStep`."""
    return PreferenceStep(model, optimizer, loss_fn, method, rho, **kwargs)
