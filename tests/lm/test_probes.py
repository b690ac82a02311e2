"""Probe metrics on clean logits (dynamics.lm.probes) [ours]."""

import math

import pytest
import torch

from dynamics.lm.data import collate_pairs, synthetic_pairs
from dynamics.lm.models import build_offline_tokenizer, build_tiny_model
from dynamics.lm.probes import PairLogps, pair_logps, probe_metrics, run_probes


@pytest.fixture(scope="module")
def setup():
    tok = build_offline_tokenizer()
    model = build_tiny_model("gpt2", n_embd=32, n_layer=1)
    records = synthetic_pairs("train", n=6, seed=1)
    return tok, model, records


def _independent(model, batch):
    """log π of each row and max_conf of each row, written out with log_softmax, one row at a time."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = torch.log_softmax(logits, -1)
    seq, top = [], []
    for r in range(logits.shape[0]):
        pos = batch["response_mask"][r].nonzero().flatten().tolist()
        seq.append(sum(float(logp[r, t - 1, batch["input_ids"][r, t]]) for t in pos))
        top.append(sum(float(logp[r, t - 1].max()) for t in pos))
    return torch.tensor(seq, dtype=torch.float64), torch.tensor(top, dtype=torch.float64)


def test_pair_logps_match_an_independent_computation(setup):
    tok, model, records = setup
    batch = collate_pairs(records, tok, max_length=40, max_prompt_length=8)
    got = pair_logps(model, [batch])
    seq, top = _independent(model, batch)
    b = len(records)
    # float32 forward, float64 reference: sums of ~20 terms of size ~5, float32 rounding ~1e-6 relative
    assert torch.allclose(got.chosen.double(), seq[:b], atol=1e-4)
    assert torch.allclose(got.rejected.double(), seq[b:], atol=1e-4)
    # max_conf is keyed to the chosen rows (the known bug: it was overwritten by another probe's value)
    assert torch.allclose(got.max_conf.double(), top[:b], atol=1e-4)
    assert not torch.allclose(got.max_conf.double(), top[b:][:b], atol=1e-2)
    assert (got.max_conf >= got.chosen).all()  # the argmax is at least as likely as any token


def test_pair_logps_do_not_depend_on_chunking(setup):
    tok, model, records = setup
    whole = pair_logps(model, [collate_pairs(records, tok, 40, 8)])
    parts = pair_logps(
        model, [collate_pairs(records[:2], tok, 40, 8), collate_pairs(records[2:], tok, 40, 8)]
    )
    for name in ("chosen", "rejected", "max_conf"):
        assert torch.allclose(
            getattr(whole, name), getattr(parts, name), atol=1e-5
        )  # padding changes nothing


def test_probe_metrics_formula():
    pol = PairLogps(
        *(torch.tensor(v) for v in ([-1.0, -2.0], [-3.0, -1.5], [-0.5, -0.7], [2.0, 4.0], [3.0, 1.0]))
    )
    ref = PairLogps(
        *(torch.tensor(v) for v in ([-1.5, -2.0], [-2.0, -2.0], [-0.6, -0.6], [2.0, 4.0], [3.0, 1.0]))
    )
    beta = 0.5
    row = probe_metrics(pol, ref, loss="sigmoid", beta=beta)
    u = [(-1.0 + 1.5) - (-3.0 + 2.0), (-2.0 + 2.0) - (-1.5 + 2.0)]  # [1.5, -0.5]
    loss = sum(-math.log(1 / (1 + math.exp(-beta * x))) for x in u) / 2
    assert row["loss"] == pytest.approx(loss, rel=1e-6)
    assert row["margin"] == pytest.approx(beta * sum(u) / 2, rel=1e-6)
    assert row["accuracy"] == 0.5
    assert row["logp_chosen"] == pytest.approx(-1.5) and row["logp_rejected"] == pytest.approx(-2.25)
    assert row["logp_max_conf"] == pytest.approx(-0.6) and row["n"] == 2
    ipo = probe_metrics(pol, ref, loss="ipo", beta=beta)  # length-averaged log-probs
    ua = [(-0.5 + 0.75) - (-1.0 + 2.0 / 3), (-0.5 + 0.5) - (-1.5 + 2.0)]
    assert ipo["loss"] == pytest.approx(sum((x - 1 / (2 * beta)) ** 2 for x in ua) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="needs reference"):
        probe_metrics(pol, None, loss="sigmoid")


def test_run_probes_rows_and_extra(setup):
    tok, model, records = setup
    sets = {
        "heldout": [collate_pairs(records[:3], tok, 40, 8)],
        "train_probe": [collate_pairs(records[3:], tok, 40, 8)],
    }
    ref = {k: pair_logps(model, v) for k, v in sets.items()}
    model.train()
    rows = run_probes(model, sets, ref, extra=lambda m, b, split: {"extra_field": 1.0, "split_seen": split})
    assert set(rows) == {"heldout", "train_probe"}
    for split, row in rows.items():
        assert row["margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
        assert row["loss"] == pytest.approx(math.log(2), rel=1e-6) and row["extra_field"] == 1.0
        assert row["split_seen"] == split
    assert model.training  # the probes evaluate in eval mode and restore the mode


def test_probe_inputs_are_checked():
    """Before: KeyError('dpo') for an unknown loss and torch.cat's error for an empty probe set."""
    per_pair = PairLogps(*[torch.randn(3) for _ in range(5)])
    with pytest.raises(ValueError, match="unknown preference loss 'dpo'"):
        probe_metrics(per_pair, per_pair, "dpo")
    with pytest.raises(ValueError, match="expected at least one probe batch"):
        pair_logps(torch.nn.Linear(2, 2), [])
