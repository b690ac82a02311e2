"""logits-SAM / full SAM / plain training (dynamics.lm.perturb) tied to the math (theory.md §4, S2)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynamics.lm.losses import PreferenceObjective
from dynamics.lm.perturb import (
    PreferenceStep,
    choose_route,
    compute_step,
    logits_sam_loss,
    make_trainer_step,
    perturbed_head_logits,
    plain_loss,
)
from dynamics.steps import sam_logit_step

VOCAB, HIDDEN = 64, 32  # the tiny models of tests/lm/conftest.py

# float64 round-off on these tiny models (losses, gradients of O(1), sums of a few hundred products): measured
# ≤ 4e-15, so 1e-12 (well inside the bound 1e-6). Each test also checks that the perturbation changes
# the compared quantity by more than MOVED = 1e-3 (so the comparison can fail).
TOL64 = 1e-12
MOVED = 1e-3


def _untied_reference(model):
    """A copy of `model` whose head weight is its own Parameter (untied), and the name of the tied weight."""
    ref = copy.deepcopy(model)
    head = ref.get_output_embeddings()
    tied_name = None
    emb = ref.get_input_embeddings().weight
    if head.weight is emb:
        tied_name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
        head.weight = torch.nn.Parameter(emb.detach().clone())
    return ref, tied_name


def _independent_route(model, batch, loss_fn, rho):
    """Copy, untie, W ← W + ρ G/‖G‖ with G = ∂ℓ/∂W_head by autograd of the clean loss, recompute. Returns
    (clean loss, perturbed loss, {name: grad of the original model's parameter})."""
    ref, tied_name = _untied_reference(model)
    model_kwargs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    head = ref.get_output_embeddings()
    clean, _ = loss_fn(ref(**model_kwargs).logits, batch)
    (grad_w,) = torch.autograd.grad(clean, head.weight)
    with torch.no_grad():
        head.weight.add_(rho * grad_w / torch.linalg.vector_norm(grad_w))
    ref.zero_grad()
    perturbed, _ = loss_fn(ref(**model_kwargs).logits, batch)
    perturbed.backward()
    ref_grads = dict(ref.named_parameters())
    head_name = next(n for n, p in ref.named_parameters() if p is head.weight)
    grads = {}
    for name, _ in model.named_parameters():
        g = ref_grads[name].grad.clone()
        if name == tied_name:
            g = g + ref_grads[head_name].grad  # the tied weight collects both uses' gradients
        grads[name] = g
    return clean.detach(), perturbed.detach(), grads


CASES = [("gpt2", False), ("gpt-neox", False), ("gpt2", True)]  # (arch, head bias)


@pytest.mark.parametrize("arch,head_bias", CASES)
@pytest.mark.parametrize("route", ["dense", "gram"])
@pytest.mark.parametrize("loss_name,rho", [("sigmoid", 0.3), ("sigmoid", -0.3), ("ipo", 0.2), ("cpo", 0.3)])
def test_logits_sam_matches_independent_route_float64(
    arch, head_bias, route, loss_name, rho, make_lm, make_batch
):
    model = make_lm(arch, dtype=torch.float64, head_bias=head_bias)
    batch = make_batch()
    loss_fn = PreferenceObjective(loss_name, beta=0.5)
    clean, perturbed, expected = _independent_route(model, batch, loss_fn, rho)
    plain = copy.deepcopy(model)
    plain_loss(plain, batch, loss_fn).loss.backward()
    out = logits_sam_loss(model, batch, loss_fn, rho, route=route)
    out.loss.backward()
    assert abs(float(out.metrics["loss_clean"]) - float(clean)) < TOL64
    assert abs(float(out.loss.detach()) - float(perturbed)) < TOL64
    assert abs(float(perturbed) - float(clean)) > MOVED  # the perturbation matters
    moved = 0.0
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(p.grad, expected[name], rtol=0, atol=TOL64), name
        moved = max(moved, float((p.grad - q.grad).abs().max()))
    assert moved > MOVED  # perturbed gradients differ from clean ones: the comparison can fail


def test_bias_is_not_perturbed_logit_shift_is_h_eps():
    """With a head bias, Z̃ − Z = h εᵀ exactly (no bias term), ε = ρ G_W/‖G_W‖ with G_W = G_Zᵀ h."""
    torch.manual_seed(0)
    n, d, v = 6, 5, 7
    h = torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(v, d, dtype=torch.float64)
    b = torch.randn(v, dtype=torch.float64)
    g = torch.randn(n, v, dtype=torch.float64)
    g[2] = 0.0
    for route in ("dense", "gram"):
        z_clean = F.linear(h, w, b)
        z_pert, _ = perturbed_head_logits(h, w, b, g, 0.7, route=route)
        grad_w = g.T @ h
        eps = 0.7 * grad_w / torch.linalg.vector_norm(grad_w)
        assert torch.allclose(z_pert - z_clean, h @ eps.T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [3, 12, 40])  # fewer and more tokens than the hidden size d = 12
def test_gram_route_equals_dense_route(n):
    """‖G_W‖² = Σ (hhᵀ ⊙ G_Z G_Zᵀ) and hεᵀ ∝ hhᵀG_Z: both routes give the same logits and gradients."""
    gen = torch.Generator().manual_seed(n)
    d, v = 12, 50
    h = torch.randn(n, d, dtype=torch.float64, generator=gen)
    w = torch.randn(v, d, dtype=torch.float64, generator=gen)
    g = torch.randn(n, v, dtype=torch.float64, generator=gen)
    g[::3] = 0.0  # rows without gradient (prompt, padding) are dropped by the Gram route
    cot = torch.randn(n, v, dtype=torch.float64, generator=gen)
    results = {}
    for route in ("dense", "gram"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        z, info = perturbed_head_logits(hh, ww, None, g, -0.4, route=route)
        (z * cot).sum().backward()
        results[route] = (z.detach(), hh.grad, ww.grad, float(info["perturbation_norm"]))
    for a, b in zip(results["dense"], results["gram"], strict=True):
        assert np.allclose(a, b, rtol=1e-12, atol=1e-12)  # same math in float64, different summation order


def test_route_is_chosen_automatically_per_batch(make_lm, make_batch):
    assert choose_route(16, 8, 50304, 2560) == "gram"  # few tokens, wide model
    assert choose_route(65536, 32768, 50304, 2560) == "dense"  # many tokens
    model = make_lm("gpt-neox")
    loss_fn = PreferenceObjective("sigmoid")
    small = make_batch(n_pairs=1, seq_len=8, prompt_len=6, pad=0)  # N = 16 < d = 32
    large = make_batch(n_pairs=4, seq_len=32, prompt_len=8, pad=0)  # N = 256 > d
    assert float(logits_sam_loss(model, small, loss_fn, 0.1).metrics["route"]) == 2.0
    assert float(logits_sam_loss(model, large, loss_fn, 0.1).metrics["route"]) == 1.0


class _Counter:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


@pytest.mark.parametrize("method,passes", [("adamw", 1), ("logits-sam", 1), ("sam", 2)])
@pytest.mark.parametrize("n_micro", [1, 2])
def test_backbone_forward_count(method, passes, n_micro, make_lm, make_batch):
    model = make_lm("gpt2")
    backbone, head = _Counter(model.base_model), _Counter(model.get_output_embeddings())
    step = make_trainer_step(
        model, torch.optim.SGD(model.parameters(), lr=0.01), method, 0.1, PreferenceObjective()
    )
    batch = make_batch()
    step([batch] * n_micro)
    assert backbone.calls == passes * n_micro
    assert head.calls == 0  # the head's weight is used directly (F.linear), never its module forward


def test_plain_logits_equal_model_forward(lm_arch, make_lm, make_batch):
    """The head route head(base_model(x)) is the model's own logits (the assumption logits-SAM relies on)."""
    model = make_lm(lm_arch)
    batch = make_batch()
    captured = {}

    def loss_fn(logits, b):
        captured["z"] = logits
        return logits.sum() * 0.0, {}

    plain_loss(model, batch, loss_fn)
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(captured["z"], expected)


@pytest.mark.parametrize("rho", [0.3, -0.3])
@pytest.mark.parametrize("route", ["dense", "gram"])
def test_bridge_with_math_core_sam_logit_step(rho, route, make_lm):
    """S2: frozen backbone, no head bias, single-token cross-entropy, SGD on the head: one logits-SAM step moves
    the logits exactly as dynamics.steps.sam_logit_step(z, y, μ = ‖h‖², η, ρ)."""
    model = make_lm("gpt-neox", dtype=torch.float64)
    head = model.get_output_embeddings()
    assert head.bias is None
    for p in model.parameters():
        p.requires_grad_(p is head.weight)
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids}
    pos, label, eta = 3, 17, 0.05

    def ce_one_token(logits, b):
        return -torch.log_softmax(logits[0, pos], dim=-1)[label], {}

    with torch.no_grad():
        z = model(input_ids=ids).logits[0, pos].numpy().copy()
        h = model.base_model(input_ids=ids)[0][0, pos].numpy().copy()
    step = PreferenceStep(
        model, torch.optim.SGD([head.weight], lr=eta), ce_one_token, "logits-sam", rho, route=route
    )
    step(batch)
    with torch.no_grad():
        z_next = model(input_ids=ids).logits[0, pos].numpy()
        h_next = model.base_model(input_ids=ids)[0][0, pos].numpy()
    assert np.array_equal(h, h_next)  # backbone frozen
    predicted = sam_logit_step(z, label, float(h @ h), eta, rho)
    # float64 round-off of d=32 / V=64 matmuls: ~1e-14; the SAM-vs-GD difference is ~1e-3 (asserted below).
    assert np.allclose(z_next, predicted, rtol=0, atol=1e-11)
    gd = sam_logit_step(z, label, float(h @ h), eta, 0.0)
    assert np.abs(predicted - gd).max() > 1e-5


def _train(make_lm, make_batch, method, rho, route, steps=4, micro=1, arch="gpt2", dtype=torch.float32):
    model = make_lm(arch, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = PreferenceStep(model, opt, PreferenceObjective("sigmoid"), method, rho, route=route)
    for i in range(steps):
        batch = make_batch(seed=10 + i)
        step([batch] * micro if micro > 1 else batch)
    return model


def test_rho_zero_reproduces_plain_training_bit_exactly(make_lm, make_batch):
    plain = _train(make_lm, make_batch, "adamw", 0.0, "auto")
    for method, route in [("logits-sam", "dense"), ("logits-sam", "gram"), ("sam", "auto")]:
        other = _train(make_lm, make_batch, method, 0.0, route)
        for (name, p), q in zip(plain.named_parameters(), other.parameters(), strict=True):
            assert torch.equal(p, q), (method, route, name)
    moved = _train(make_lm, make_batch, "logits-sam", 0.05, "dense")
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), moved.parameters(), strict=True))


@pytest.mark.parametrize("method", ["adamw", "logits-sam", "sam"])
def test_gradient_accumulation_of_equal_micro_batches(method, make_lm, make_batch):
    """Two identical micro-batches give the same update as the batch alone (losses divided by the count; the
    logits-SAM perturbation of each micro-batch is the batch's; SAM's accumulated gradient is the batch's)."""
    one = _train(make_lm, make_batch, method, 0.2, "dense", steps=2, micro=1, dtype=torch.float64)
    two = _train(make_lm, make_batch, method, 0.2, "dense", steps=2, micro=2, dtype=torch.float64)
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.allclose(
            p, q, rtol=0, atol=1e-12
        )  # float64 round-off of (g/2 + g/2) vs g: exact or 1 ulp


def test_full_sam_gradient_is_gradient_at_perturbed_parameters(make_lm, make_batch):
    """SAM step's gradient = ∇ℓ(θ + ρ g/‖g‖); parameters are restored bit-exactly before the optimizer step."""
    model = make_lm("gpt-neox", dtype=torch.float64)
    batch = make_batch()
    loss_fn = PreferenceObjective("sigmoid", beta=0.5)
    rho = 0.1
    ref = copy.deepcopy(model)
    plain_loss(ref, batch, loss_fn).loss.backward()
    params = list(ref.parameters())
    gnorm = torch.sqrt(sum((p.grad**2).sum() for p in params))
    with torch.no_grad():
        for p in params:
            p.add_(rho * p.grad / gnorm)
    ref.zero_grad()
    plain_loss(ref, batch, loss_fn).loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    lr = 0.5
    PreferenceStep(model, torch.optim.SGD(model.parameters(), lr=lr), loss_fn, "sam", rho)(batch)
    for p0, p, r in zip(before, model.parameters(), params, strict=True):
        assert torch.allclose(p, p0 - lr * r.grad, rtol=0, atol=1e-12)


def test_metrics_are_on_clean_logits(make_lm, make_batch):
    model = make_lm("gpt2")
    batch = make_batch()
    loss_fn = PreferenceObjective("sigmoid")
    plain = plain_loss(model, batch, loss_fn).metrics
    for method in ("logits-sam", "sam"):
        m = copy.deepcopy(model)
        metrics = make_trainer_step(m, torch.optim.SGD(m.parameters(), lr=0.0), method, 0.5, loss_fn)(batch)
        for key in ("chosen_logps", "rejected_logps", "max_conf", "loss_clean", "margin", "accuracy"):
            assert metrics[key] == pytest.approx(float(plain[key]), rel=1e-6, abs=1e-6), (method, key)
        assert metrics["loss_perturbed"] > metrics["loss_clean"] + 1e-3  # ascent direction, ρ > 0


@pytest.mark.parametrize("route", ["dense", "gram"])
def test_bf16_autocast_keeps_the_perturbation(route, make_lm, make_batch):
    """Under bf16 autocast the perturbation is added in float32 (W + ε in bf16 would round ε away): the loss
    increase ℓ(Z̃) − ℓ(Z), which is first order in δ = hεᵀ, matches float32's to a few bf16 roundings of δ
    (unit round-off 2⁻⁸ ≈ 0.4%; measured 0.07%), hence rel 2%."""
    model = make_lm("gpt-neox")
    batch = make_batch()
    loss_fn = PreferenceObjective("sigmoid")
    rho = 0.02
    ref = logits_sam_loss(model, batch, loss_fn, rho, route=route)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits_sam_loss(model, batch, loss_fn, rho, route=route)
    out.loss.backward()
    rise_ref = float(ref.metrics["loss_perturbed"] - ref.metrics["loss_clean"])
    rise = float(out.metrics["loss_perturbed"] - out.metrics["loss_clean"])
    assert rise_ref > 1e-3
    assert rise == pytest.approx(rise_ref, rel=0.02)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("route", ["dense", "gram"])
def test_zero_gradient_is_guarded(route, make_lm, make_batch):
    model = make_lm("gpt2")
    batch = make_batch()

    def flat(logits, b):  # a loss whose gradient w.r.t. the logits is exactly zero
        return (logits * 0.0).sum() + 1.0, {}

    out = logits_sam_loss(model, batch, flat, 0.5, route=route)
    out.loss.backward()
    assert float(out.loss.detach()) == 1.0 and float(out.metrics["perturbation_norm"]) == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_user_errors_raise_value_error(make_lm, make_batch):
    model = make_lm("gpt2")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = PreferenceObjective()
    with pytest.raises(ValueError, match="method"):
        PreferenceStep(model, opt, loss_fn, "adam", 0.1)
    with pytest.raises(ValueError, match="route"):
        PreferenceStep(model, opt, loss_fn, "logits-sam", 0.1, route="fast")
    with pytest.raises(ValueError, match="norm"):
        PreferenceStep(model, opt, loss_fn, "logits-sam", 0.1, norm="all")
    with pytest.raises(ValueError, match="rho"):
        PreferenceStep(model, opt, loss_fn, "logits-sam", float("nan"))
    with pytest.raises(ValueError, match="two backward"):
        compute_step(model, make_batch(), loss_fn, method="sam", rho=0.1)
    with pytest.raises(ValueError, match="input_ids"):
        plain_loss(model, {"response_mask": torch.ones(2, 3)}, loss_fn)
    with pytest.raises(ValueError, match="weight"):
        perturbed_head_logits(
            torch.zeros(3, HIDDEN), torch.zeros(VOCAB, HIDDEN + 1), None, torch.zeros(3, VOCAB), 0.1
        )


def _ddp_rank(rank, world, port, norm, model, batches, queue):
    """One replica (forked): logits-SAM loss on its own batch under torch.distributed (gloo), then one
    PreferenceStep (plain, SGD lr 1) whose gradient PreferenceStep all-reduces itself."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # no OpenMP parallel region in a forked child
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loss_fn = PreferenceObjective("sigmoid", beta=0.5)
        out = logits_sam_loss(model, batches[rank], loss_fn, 0.3, norm=norm)
        before = [p.detach().clone() for p in model.parameters()]
        PreferenceStep(model, torch.optim.SGD(model.parameters(), lr=1.0), loss_fn, "adamw")(batches[rank])
        update = [
            (b - p.detach()).numpy() for b, p in zip(before, model.parameters(), strict=True)
        ]  # by value
        queue.put((rank, float(out.loss.detach()), float(out.metrics["perturbation_norm"]), update))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_distributed_local_and_global_norm(make_lm, make_batch):
    """norm="local": each replica perturbs with its own G_W (= single-process logits-SAM on its batch);
    norm="global": with ε = ρ ΣG_W/‖ΣG_W‖ over replicas (= one big batch). Two gloo ranks, float64."""
    import multiprocessing
    import socket

    model = make_lm("gpt-neox", dtype=torch.float64)
    batches = [make_batch(seed=21), make_batch(seed=22)]
    loss_fn = PreferenceObjective("sigmoid", beta=0.5)
    # expectations in this process
    local = [float(logits_sam_loss(model, b, loss_fn, 0.3).loss.detach()) for b in batches]
    weight = model.get_output_embeddings().weight
    grad_w = [
        torch.autograd.grad(plain_loss(model, b, loss_fn).loss, weight)[0] for b in batches
    ]  # G_Zᵀh each
    total = grad_w[0] + grad_w[1]
    eps = 0.3 * total / torch.linalg.vector_norm(total)
    with torch.no_grad():
        hidden = [
            model.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0] for b in batches
        ]
        glob = [float(loss_fn(F.linear(h, weight + eps), b)[0]) for h, b in zip(hidden, batches, strict=True)]
    ctx = multiprocessing.get_context("fork")
    results = {}
    for norm in ("local", "global"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        queue = ctx.Queue()
        procs = [
            ctx.Process(target=_ddp_rank, args=(r, 2, port, norm, model, batches, queue)) for r in range(2)
        ]
        for p in procs:
            p.start()
        got = {r: (loss, gn, upd) for r, loss, gn, upd in (queue.get(timeout=120) for _ in procs)}
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        results[norm] = got
    for r in range(2):  # float64 round-off only (1e-12); local and global differ by far more (checked)
        assert results["local"][r][0] == pytest.approx(local[r], abs=1e-12)
        assert results["local"][r][1] == pytest.approx(float(torch.linalg.vector_norm(grad_w[r])), rel=1e-12)
        assert results["global"][r][0] == pytest.approx(glob[r], abs=1e-12)
        assert results["global"][r][1] == pytest.approx(float(torch.linalg.vector_norm(total)), rel=1e-12)
        assert abs(local[r] - glob[r]) > 1e-6
    # PreferenceStep averages the replicas' gradients: both apply the mean of the single-process gradients
    mean_grad = []
    for b in batches:
        m = copy.deepcopy(model)
        plain_loss(m, b, loss_fn).loss.backward()
        mean_grad.append([p.grad for p in m.parameters()])
    for r in range(2):
        for upd, g0, g1 in zip(results["local"][r][2], *mean_grad, strict=True):
            assert np.allclose(upd, ((g0 + g1) / 2).numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rho": "0.1"}, "rho must be a finite real number"),  # before: TypeError from math.isfinite
        ({"rho": math.nan}, "rho must be a finite real number"),
        ({"bias": torch.zeros(3)}, r"expected bias \(V,\) = \(5,\)"),  # before: RuntimeError from F.linear
        # before: NaN rows of G_Z were dropped by the G_Z ≠ 0 row selection and Z̃ came back finite
        ({"grad_logits": torch.full((4, 5), math.nan)}, "grad_logits must be finite"),
    ],
)
def test_perturbed_head_logits_rejects_bad_input(change, message):
    gen = torch.Generator().manual_seed(0)
    args = {
        "h": torch.randn(4, 3, generator=gen),
        "weight": torch.randn(5, 3, generator=gen),
        "bias": None,
        "grad_logits": torch.randn(4, 5, generator=gen),
        "rho": 0.1,
    }
    args.update(change)
    for route in ("dense", "gram"):
        with pytest.raises(ValueError, match=message):
            perturbed_head_logits(**args, route=route)


def test_preference_step_rejects_a_non_numeric_rho(make_lm):
    """Before: TypeError from math.isfinite; a one-element tensor ρ is accepted as its value."""
    model = make_lm("gpt2")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="rho must be a finite real number"):
        PreferenceStep(model, opt, PreferenceObjective(), "logits-sam", "0.1")
    assert PreferenceStep(model, opt, PreferenceObjective(), "logits-sam", torch.tensor(0.25)).rho == 0.25
