"""Preference losses (dynamics.lm.losses), each against its formula written out independently with `math`."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamics.lm.logps import sequence_logps
from dynamics.lm.losses import LOSSES, NEEDS_REFERENCE, PreferenceObjective, preference_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def expected_loss(name, pc, pr, rc, rr, beta, gamma=0.5, ls=0.0, nll=0.0, alpha=1.0):
    """Batch mean of each loss from the published formula, in plain Python floats."""
    vals = []
    for c, r, c0, r0 in zip(pc, pr, rc, rr, strict=True):
        if name == "sigmoid":  # DPO
            u = (c - c0) - (r - r0)
            vals.append(-(1 - ls) * log_sigmoid(beta * u) - ls * log_sigmoid(-beta * u))
        elif name == "ipo":
            u = (c - c0) - (r - r0)
            vals.append((u - 1 / (2 * beta)) ** 2)
        elif name == "hinge":  # SLiC-HF as in TRL
            u = (c - c0) - (r - r0)
            vals.append(max(0.0, 1 - beta * u))
        elif name == "cpo":  # reference-free
            vals.append(-(1 - ls) * log_sigmoid(beta * (c - r)) - ls * log_sigmoid(-beta * (c - r)))
        elif name == "simpo":  # reference-free, margin γ
            x = beta * (c - r) - gamma
            vals.append(-(1 - ls) * log_sigmoid(x) - ls * log_sigmoid(-x))
    mean = sum(vals) / len(vals)
    return mean + (alpha * nll if name == "cpo" else 0.0)


finite = st.floats(-60.0, 0.0, allow_nan=False)


@settings(max_examples=25)
@given(
    name=st.sampled_from(sorted(LOSSES)),
    values=st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=5),
    beta=st.floats(0.01, 3.0),
    ls=st.sampled_from([0.0, 0.2]),
)
def test_each_loss_matches_its_formula(name, values, beta, ls):
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float64) for col in zip(*values, strict=True))
    kw = {"label_smoothing": ls} if name in ("sigmoid", "cpo", "simpo") else {}
    nll = torch.tensor(1.7, dtype=torch.float64)
    loss, rewards = preference_loss(name, pc, pr, rc, rr, beta=beta, chosen_nll=nll, **kw)
    want = expected_loss(name, pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta, ls=ls, nll=1.7)
    assert float(loss) == pytest.approx(want, rel=1e-10, abs=1e-10)
    ref = NEEDS_REFERENCE[name]
    assert torch.allclose(rewards["chosen"], beta * (pc - (rc if ref else 0)))
    assert torch.allclose(rewards["margins"], rewards["chosen"] - rewards["rejected"])


def test_reference_free_losses_ignore_the_reference():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    for name in ("cpo", "simpo"):
        a, _ = preference_loss(name, pc, pr, beta=2.0, chosen_nll=torch.tensor(0.0))
        b, _ = preference_loss(name, pc, pr, pc + 7, pr - 3, beta=2.0, chosen_nll=torch.tensor(0.0))
        assert torch.equal(a, b)


def test_simpo_gamma_and_cpo_alpha():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-1.5])
    loss, _ = preference_loss("simpo", pc, pr, beta=2.0, gamma=1.0)
    assert float(loss) == pytest.approx(-log_sigmoid(2.0 * 0.5 - 1.0))
    loss, _ = preference_loss("cpo", pc, pr, beta=0.1, chosen_nll=torch.tensor(2.0), cpo_alpha=0.5)
    assert float(loss) == pytest.approx(-log_sigmoid(0.1 * 0.5) + 1.0)
    loss, _ = preference_loss("cpo", pc, pr, beta=0.1, cpo_alpha=0.0)  # no NLL needed
    assert float(loss) == pytest.approx(-log_sigmoid(0.05))


def test_objective_uses_trl_conventions():
    """IPO and SimPO on length-averaged log-probs, DPO / hinge / CPO on summed ones; CPO's NLL is the
    token-mean NLL of the chosen responses over the batch."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 13, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 13, (4, 9), generator=gen)
    mask = torch.zeros(4, 9, dtype=torch.long)
    mask[:, 3:] = 1
    mask[0, 7:] = 0  # chosen responses of different lengths
    batch = {"input_ids": ids, "response_mask": mask}
    summed = sequence_logps(logits, ids, mask)
    avg = sequence_logps(logits, ids, mask, average=True)
    ref = {
        "ref_chosen_logps": torch.tensor([-20.0, -21.0]),
        "ref_rejected_logps": torch.tensor([-22.0, -19.0]),
    }
    for name, lp in [("sigmoid", summed), ("hinge", summed), ("ipo", avg)]:
        got, _ = PreferenceObjective(name, beta=0.3)(logits, {**batch, **ref})
        want, _ = preference_loss(
            name, lp[:2], lp[2:], ref["ref_chosen_logps"], ref["ref_rejected_logps"], beta=0.3
        )
        assert torch.allclose(got, want)
    got, _ = PreferenceObjective("simpo", beta=2.0)(logits, batch)
    assert torch.allclose(got, preference_loss("simpo", avg[:2], avg[2:], beta=2.0)[0])
    nll = -summed[:2].sum() / mask[:2, 1:].sum()
    got, _ = PreferenceObjective("cpo", beta=0.1)(logits, batch)
    assert torch.allclose(got, preference_loss("cpo", summed[:2], summed[2:], beta=0.1, chosen_nll=nll)[0])


def test_bad_inputs_raise_value_error():
    pc = torch.tensor([-1.0, -2.0])
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss("dpo", pc, pc)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        preference_loss("sigmoid", pc, pc)
    with pytest.raises(ValueError, match="beta"):
        preference_loss("cpo", pc, pc, beta=0.0, cpo_alpha=0.0)
    with pytest.raises(ValueError, match="finite"):
        preference_loss("simpo", pc, torch.tensor([-1.0, float("nan")]))
    with pytest.raises(ValueError, match="shape"):
        preference_loss("simpo", pc, pc[:1])
    with pytest.raises(ValueError, match="chosen_nll"):
        preference_loss("cpo", pc, pc)
    with pytest.raises(ValueError, match="unknown preference loss"):
        PreferenceObjective("kto")
    with pytest.raises(ValueError, match="2B rows"):
        PreferenceObjective("simpo")(
            torch.zeros(3, 4, 5),
            {"input_ids": torch.zeros(3, 4, dtype=torch.long), "response_mask": torch.zeros(3, 4)},
        )


PC, PR = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: preference_loss("sigmoid", [1.0, 2.0], [1.0, 2.0], PC, PR), "must be torch tensors"),
        (lambda: preference_loss("sigmoid", PC, PR, PC, PR, beta=float("inf")), "beta must be a finite"),
        (lambda: preference_loss("sigmoid", PC, PR, PC, PR, beta="0.1"), "beta must be a finite"),
        (lambda: preference_loss("sigmoid", PC, PR, PC * math.nan, PR), "reference log-probs must be finite"),
        (lambda: preference_loss("sigmoid", PC, PR, [1.0, 2.0], PR), "reference log-probs must be torch"),
        (
            lambda: preference_loss("sigmoid", PC, PR, PC, PR, gama=1.0),
            r"takes the keywords \['label_smoothing'\]",
        ),
        (lambda: preference_loss("ipo", PC, PR, PC, PR, label_smoothing=0.1), r"takes the keywords \[\]"),
        (
            lambda: preference_loss("sigmoid", PC, PR, PC, PR, label_smoothing=2.0),
            r"label_smoothing must lie",
        ),
        (lambda: preference_loss("simpo", PC, PR, gamma=math.nan), "gamma must be a finite"),
        (
            lambda: preference_loss("cpo", PC, PR, chosen_nll=torch.tensor(1.0), cpo_alpha=math.nan),
            "cpo_alpha",
        ),
        (
            lambda: preference_loss("cpo", PC, PR, chosen_nll=torch.tensor(math.inf)),
            "chosen_nll must be finite",
        ),
        (lambda: preference_loss("sigmoid", *[torch.zeros(0)] * 4), r"shape \(B,\) with B >= 1"),
        (lambda: preference_loss("sigmoid", PC[None], PR[None], PC[None], PR[None]), r"shape \(B,\)"),
    ],
)
def test_preference_loss_rejects_bad_input_early(call, message):
    """Before: AttributeError/TypeError from torch, or a silently ignored keyword / NaN loss / flipped loss."""
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": math.nan}, "beta must be a finite"),
        ({"beta": -1.0}, "beta must be a finite number > 0"),
        ({"loss_kwargs": {"gama": 1.0}}, "takes the keywords"),
        ({"name": "dpo"}, "unknown preference loss 'dpo'"),
    ],
)
def test_preference_objective_checks_at_construction(kwargs, message):
    """Before: a NaN/negative β or a misspelt keyword surfaced only at the first step (or never)."""
    with pytest.raises(ValueError, match=message):
        PreferenceObjective(**kwargs)


def test_preference_objective_names_missing_batch_keys():
    """Before: KeyError('response_mask')."""
    ids = torch.randint(0, 7, (4, 5))
    with pytest.raises(ValueError, match=r"the batch lacks \['response_mask'\]"):
        PreferenceObjective("simpo")(torch.randn(4, 5, 7), {"input_ids": ids})
