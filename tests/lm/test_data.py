"""Preference data loaders, the synthetic task and collation (dynamics.lm.data) [ours]."""

from pathlib import Path

import pytest
import torch

from dynamics.lm.data import (
    KNOWN_DATASETS,
    DataUnavailableError,
    collate_pairs,
    collate_sft,
    load_preference_data,
    read_rows,
    split_common_prefix,
    synthetic_pairs,
)
from dynamics.lm.models import build_offline_tokenizer

FIX = Path(__file__).parent / "fixtures"


def test_webgpt_drops_ties_and_orders_by_score():
    records = load_preference_data("webgpt", path=FIX / "webgpt.jsonl")
    assert len(records) == 2  # the tie (score 0 / 0) is dropped
    assert records[0]["prompt"] == "Question: Why is the sky blue?\n\nAnswer:"
    assert records[0]["chosen"] == " Rayleigh scattering favours short wavelengths."  # score_0 = 1 > -1
    assert records[1]["chosen"] == " Aligned electron spins add up to a field."  # score_1 = 0.5 > -0.5
    assert records[1]["rejected"] == " Magic."


def test_webgpt_parquet_with_flat_question_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_rows(FIX / "webgpt.jsonl")
    flat = [
        {
            "question.full_text": r["question"]["full_text"],
            **{k: r[k] for k in ("answer_0", "answer_1", "score_0", "score_1")},
        }
        for r in rows
    ]
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "webgpt.parquet")
    nested = load_preference_data("webgpt", path=FIX / "webgpt.jsonl")
    assert load_preference_data("webgpt", path=tmp_path / "webgpt.parquet") == nested


def test_tldr_both_schemas():
    trl = load_preference_data("tldr", path=FIX / "tldr.jsonl")
    assert len(trl) == 2 and all(r["prompt"].endswith("TL;DR:") for r in trl)
    carper = load_preference_data("tldr-carper", path=FIX / "tldr_carper.jsonl")
    assert carper[0]["prompt"].endswith("TL;DR:")  # the marker moved from the responses into the prompt
    assert carper[0]["chosen"] == " rice keeps burning at the bottom" and carper[0]["rejected"] == " cooking"
    assert carper[1]["chosen"] == " I buy books faster than I read them"


def test_hh_splits_the_common_prefix():
    records = load_preference_data("hh", path=FIX / "hh.jsonl")
    assert len(records) == 2  # the identical pair is dropped
    assert records[0]["prompt"] == "\n\nHuman: What is a good name for a dog?\n\nAssistant:"
    assert records[0]["chosen"] == " Rex or Luna are popular choices."
    assert records[0]["rejected"] == " Dogs do not need names."
    assert records[1]["prompt"].endswith(
        "Tell me a fact.\n\nAssistant:"
    )  # the last assistant turn, not the first
    assert records[1]["rejected"] == " Assistants are facts."


def test_split_common_prefix_without_marker():
    assert split_common_prefix("abcX", "abcY") == ("abc", "X", "Y")


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="missing column 'rejected'"):
        load_preference_data("tldr", path=FIX / "missing_column.jsonl")
    with pytest.raises(ValueError, match="empty"):
        load_preference_data("hh", path=FIX / "empty.jsonl")
    with pytest.raises(ValueError, match="known data sets: webgpt"):
        load_preference_data("imdb")
    with pytest.raises(ValueError, match="does not exist"):
        load_preference_data("tldr", path=tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no usable pairs"):
        load_preference_data("webgpt", path=_only_ties(tmp_path))
    assert set(KNOWN_DATASETS) == {"webgpt", "tldr", "tldr-carper", "hh", "synthetic"}


def _only_ties(tmp_path):
    path = tmp_path / "ties.jsonl"
    path.write_text(
        '{"question": {"full_text": "q"}, "answer_0": "a", "answer_1": "b", "score_0": 0, "score_1": 0}\n'
    )
    return path


def test_hub_unreachable_gives_a_one_line_error(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("dynamics.lm.models._hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataUnavailableError, match="--data-file") as info:
        load_preference_data("tldr")
    assert "\n" not in str(info.value)


def test_synthetic_task_is_deterministic_and_shaped():
    sft = synthetic_pairs("sft", n=400, seed=3)
    assert sft == synthetic_pairs("sft", n=400, seed=3)
    letters = "".join(r["chosen"] for r in sft)
    assert 0.85 < letters.count("a") / len(letters) < 0.95  # filler probability 0.9: the SFT argmax is "a"
    train, test = synthetic_pairs("train", n=50), synthetic_pairs("test", n=50)
    assert train != test
    for r in train:  # two similar off-manifold responses: content letters only, never the SFT argmax "a"
        assert set(r["chosen"]) <= set("bcdefghijk") and set(r["rejected"]) <= set("bcdefghijk")
        assert len(r["chosen"]) == 6 and len(r["rejected"]) == 18
    letters = "".join(r["chosen"] + r["rejected"] for r in synthetic_pairs("train", n=400))
    assert set(letters) == set("bcdefghijk")  # one shared letter set for chosen and rejected
    with pytest.raises(ValueError, match="synthetic split"):
        synthetic_pairs("valid")


def test_collate_pairs_layout_and_masks():
    tok = build_offline_tokenizer()
    records = load_preference_data("tldr", path=FIX / "tldr.jsonl")
    batch = collate_pairs(records, tok, max_length=64, max_prompt_length=16)
    b = len(records)
    assert batch["input_ids"].shape[0] == 2 * b and batch["input_ids"].shape == batch["response_mask"].shape
    for i, rec in enumerate(records):
        for row, key in ((i, "chosen"), (b + i, "rejected")):
            mask = batch["response_mask"][row]
            resp = batch["input_ids"][row][mask].tolist()
            assert resp[-1] == tok.eos_token_id
            expected = tok(rec[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert resp == expected[: len(resp)]
            n_prompt = int(batch["attention_mask"][row].sum()) - int(mask.sum())
            assert n_prompt == 16  # prompt truncated from the left to max_prompt_length
            assert not mask[0]  # position 0 is never a response token
    assert torch.equal(batch["input_ids"][0][:16], batch["input_ids"][b][:16])  # same prompt in both rows
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()


def test_collate_sft_and_truncation_errors():
    tok = build_offline_tokenizer()
    recs = synthetic_pairs("sft", n=3)
    sft = collate_sft(recs, tok, max_length=8, max_prompt_length=4)
    assert sft["input_ids"].shape == (3, 8)  # "Q123:" keeps 4 tokens, responses (>= 6 letters) cut to 4
    assert sft["response_mask"].sum(1).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="max_prompt_length"):
        collate_pairs(recs, tok, max_length=4, max_prompt_length=4)
    with pytest.raises(ValueError, match="missing 'rejected'"):
        collate_pairs([{"prompt": "p", "chosen": "c"}], tok)


@pytest.mark.parametrize("content", ['"just a string"', "42", '{"data": 3}'])
def test_json_file_that_is_not_a_list_of_rows_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "rows.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="expected a JSON list of rows"):
        read_rows(path)
