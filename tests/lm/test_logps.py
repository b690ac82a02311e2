"""Sequence log-probabilities and max_conf (dynamics.lm.logps) against explicit per-token loops."""

from __future__ import annotations

import math

import pytest
import torch

from dynamics.lm.logps import max_conf_logps, sequence_logps, token_logps
from dynamics.lm.losses import PreferenceObjective


def _loop_logps(logits, ids, mask, average=False, top=False):
    """Written out: Σ over t with mask[t] = 1 of log p(ids[t] | logits[t-1]) (or of max_v log p(v))."""
    out = []
    for b in range(ids.shape[0]):
        total, count = 0.0, 0
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                z = [float(x) for x in logits[b, t - 1]]
                lse = math.log(sum(math.exp(x - max(z)) for x in z)) + max(z)
                total += (max(z) if top else z[int(ids[b, t])]) - lse
                count += 1
        out.append(total / max(count, 1) if average else total)
    return torch.tensor(out, dtype=torch.float64)


def _example(seed=0, b=3, t=7, v=11):
    gen = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(b, t, v, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, v, (b, t), generator=gen)
    mask = torch.zeros(b, t, dtype=torch.long)
    mask[0, 3:] = 1
    mask[1, 2:5] = 1  # right padding after position 4
    mask[2, 5:] = 1  # left-padded / long prompt
    return logits, ids, mask


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_loop(average):
    logits, ids, mask = _example()
    got = sequence_logps(logits, ids, mask, average=average)
    assert torch.allclose(got, _loop_logps(logits, ids, mask, average=average), rtol=1e-12, atol=1e-12)


def test_tokens_outside_the_response_do_not_matter():
    logits, ids, mask = _example()
    before = sequence_logps(logits, ids, mask)
    ids2, logits2 = ids.clone(), logits.clone()
    ids2[1, 5:] = 0  # padding tokens after the response
    logits2[1, 4:] = 100.0  # logits that predict padding positions
    logits2[0, :2] = -50.0  # logits that predict prompt tokens
    assert torch.equal(sequence_logps(logits2, ids2, mask), before)


def test_max_conf_matches_loop_and_is_at_least_logp():
    logits, ids, mask = _example(seed=4)
    got = max_conf_logps(logits, ids, mask)
    assert torch.allclose(got, _loop_logps(logits, ids, mask, top=True), rtol=1e-12, atol=1e-12)
    assert torch.all(got >= sequence_logps(logits, ids, mask) - 1e-12)
    # equality exactly when every response token is the argmax (teacher forcing on the greedy sequence)
    greedy = ids.clone()
    greedy[:, 1:] = logits[:, :-1].argmax(-1)
    assert torch.allclose(max_conf_logps(logits, greedy, mask), sequence_logps(logits, greedy, mask))


def test_max_conf_is_keyed_to_the_chosen_rows():
    """PreferenceObjective's max_conf uses the chosen rows [0, B) only, never the rejected ones."""
    logits, ids, mask = _example(seed=5, b=4)
    mask[:, 0] = 0
    mask[:, 3:] = 1
    batch = {"input_ids": ids, "response_mask": mask}
    _, metrics = PreferenceObjective("cpo")(logits, batch)
    chosen = max_conf_logps(logits[:2], ids[:2], mask[:2]).mean()
    rejected = max_conf_logps(logits[2:], ids[2:], mask[2:]).mean()
    assert float(metrics["max_conf"]) == pytest.approx(float(chosen), abs=1e-12)
    assert abs(float(chosen - rejected)) > 1e-3
    # the log-prob metrics are summed log π of chosen / rejected responses
    assert float(metrics["chosen_logps"]) == pytest.approx(
        float(sequence_logps(logits[:2], ids[:2], mask[:2]).mean())
    )
    assert float(metrics["rejected_logps"]) == pytest.approx(
        float(sequence_logps(logits[2:], ids[2:], mask[2:]).mean())
    )


def test_low_precision_logits_are_reduced_in_float32():
    logits, ids, mask = _example()
    got = sequence_logps(logits.to(torch.bfloat16), ids, mask)
    assert got.dtype == torch.float32
    ref = sequence_logps(logits.to(torch.bfloat16).double(), ids, mask)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-4)  # float32 accumulation of ~10 terms
    assert token_logps(logits.float(), ids).shape == (3, 6)


def test_gradients_flow_only_to_predicting_positions():
    logits, ids, mask = _example()
    logits.requires_grad_(True)
    sequence_logps(logits, ids, mask).sum().backward()
    predicting = torch.zeros_like(mask, dtype=torch.bool)
    predicting[:, :-1] = mask[:, 1:].bool()
    assert torch.all(logits.grad.abs().sum(-1)[~predicting] == 0)
    assert torch.all(logits.grad.abs().sum(-1)[predicting] > 0)


def test_bad_inputs_raise_value_error():
    logits, ids, mask = _example()
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        sequence_logps(logits[0], ids, mask)
    with pytest.raises(ValueError, match="shape"):
        sequence_logps(logits, ids[:, :-1], mask)
    bad = ids.clone()
    bad[0, 0] = 11
    with pytest.raises(ValueError, match="input_ids must lie"):
        sequence_logps(logits, bad, mask)
    first = mask.clone()
    first[0, 0] = 1
    with pytest.raises(ValueError, match="position 0"):
        max_conf_logps(logits, ids, first)


def _inputs():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.zeros(2, 5)
    mask[:, 2:] = 1
    return logits, ids, mask


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda L, i, m: (L.numpy(), i, m), "expected torch tensors"),  # before: AttributeError 'dim'
        (lambda L, i, m: (L, i.tolist(), m), "expected torch tensors"),  # before: AttributeError 'shape'
        (
            lambda L, i, m: (L, i.double() + 0.5, m),
            "input_ids must be an integer tensor",
        ),  # before: truncated
        (lambda L, i, m: (L, i, 2 * m), "response_mask must hold only 0/1"),  # before: counted twice
        (lambda L, i, m: (L, i, m.numpy()), "response_mask must be a tensor"),
        (lambda L, i, m: (L.long(), i, m), "logits must be a floating tensor"),
    ],
)
def test_sequence_logps_rejects_bad_inputs(change, message):
    with pytest.raises(ValueError, match=message):
        sequence_logps(*change(*_inputs()))


def test_token_logps_checks_its_inputs():
    """Before: IndexError / RuntimeError from inside torch.gather."""
    logits, ids, _ = _inputs()
    with pytest.raises(ValueError, match="input_ids must have shape"):
        token_logps(logits, ids[:, :3])
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 7\)"):
        token_logps(logits, ids + 10)
    with pytest.raises(ValueError, match="floating tensor of shape"):
        token_logps(logits[0], ids[0])
