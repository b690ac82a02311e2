"""Preference data → (prompt, chosen, rejected) records → token batches for `dynamics.lm.perturb` [ours].

Known data sets (`KNOWN_DATASETS`): each loads from its hub id when the hub is reachable (or its cache is
used with HF_HUB_OFFLINE=1), or from a local JSONL / JSON / parquet file in the data set's **raw schema**:

| name        | hub id                                  | raw schema                                                   |
|-------------|-----------------------------------------|--------------------------------------------------------------|
| webgpt      | openai/webgpt_comparisons (parquet conv)| question.full_text, answer_0, answer_1, score_0, score_1     |
| tldr        | trl-lib/tldr-preference                 | prompt, chosen, rejected                                     |
| tldr-carper | CarperAI/openai_summarize_comparisons   | prompt, chosen, rejected                                     |
| hh          | Anthropic/hh-rlhf                       | chosen, rejected (full dialogues; prompt = common prefix)    |
| synthetic   | (built here, no network)                | see `synthetic_pairs`                                        |

A record is a dict with string fields `prompt`, `chosen`, `rejected`. Batches follow the layout of
`dynamics.lm.losses` / `dynamics.lm.perturb`: `input_ids`, `attention_mask`, `response_mask` of shape (2B, T),
rows [0, B) the chosen sequences, rows [B, 2B) the rejected ones, right-padded.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

HUB_IDS: dict[str, str] = {
    "webgpt": "openai/webgpt_comparisons",
    "tldr": "trl-lib/tldr-preference",
    "tldr-carper": "CarperAI/openai_summarize_comparisons",
    "hh": "Anthropic/hh-rlhf",
}
KNOWN_DATASETS: tuple[str, ...] = (*HUB_IDS, "synthetic")
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "webgpt": ("question", "answer_0", "answer_1", "score_0", "score_1"),
    "tldr": ("prompt", "chosen", "rejected"),
    "tldr-carper": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
}
WEBGPT_PARQUET_REVISION = "refs/convert/parquet"
HH_ASSISTANT = "\n\nAssistant:"


class DataUnavailableError(RuntimeError):
    """A hub data set is unreachable and no local file was given; the message says how to provide one."""


# ----------------------------------------------------------------------------------------- raw rows → records
def _check_columns(name: str, rows: Sequence[Mapping[str, Any]], source: str) -> None:
    """ValueError naming the first missing column of the raw schema of `name`."""
    if not rows:
        raise ValueError(f"{source}: the split is empty (expected at least one {name} row)")
    for col in REQUIRED_COLUMNS[name]:
        if col not in rows[0] and not (col == "question" and "question.full_text" in rows[0]):
            raise ValueError(
                f"{source}: missing column {col!r} for data set {name!r}; expected columns "
                f"{list(REQUIRED_COLUMNS[name])}, found {sorted(rows[0])}"
            )


def webgpt_record(row: Mapping[str, Any]) -> dict[str, str] | None:
    """One WebGPT comparison → record, chosen = the higher-scored answer; None for a tie (score_0 = score_1).

    Prompt format [ours]: "Question: {question.full_text}\\n\\nAnswer:"; responses are " {answer}".
    Accepts `question` as a dict (the parquet conversion) or a flat `question.full_text` column.
    """
    question = row["question"]["full_text"] if "question" in row else row["question.full_text"]
    s0, s1 = float(row["score_0"]), float(row["score_1"])
    if s0 == s1:
        return None
    best, worst = (row["answer_0"], row["answer_1"]) if s0 > s1 else (row["answer_1"], row["answer_0"])
    return {
        "prompt": f"Question: {question.strip()}\n\nAnswer:",
        "chosen": " " + best.strip(),
        "rejected": " " + worst.strip(),
    }


def tldr_record(row: Mapping[str, Any]) -> dict[str, str] | None:
    """A TL;DR pair (prompt ends with "TL;DR:"). If the responses carry the "TL;DR:" marker themselves
    (some CarperAI rows), it is moved into the prompt. None when chosen equals rejected."""
    prompt, chosen, rejected = str(row["prompt"]), str(row["chosen"]), str(row["rejected"])
    marker = "TL;DR:"
    if not prompt.rstrip().endswith(marker) and chosen.startswith(marker) and rejected.startswith(marker):
        prompt, chosen, rejected = prompt + marker, chosen[len(marker) :], rejected[len(marker) :]
    if chosen == rejected:
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def split_common_prefix(chosen: str, rejected: str, marker: str = HH_ASSISTANT) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) from two full dialogues sharing a prefix.

    The prompt is the common prefix cut back to the end of its last `marker` (so both responses start with
    the assistant's turn); without a marker in the common prefix, the whole common prefix.
    """
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    common = chosen[:n]
    cut = common.rfind(marker)
    end = cut + len(marker) if cut >= 0 else n
    return chosen[:end], chosen[end:], rejected[end:]


def hh_record(row: Mapping[str, Any]) -> dict[str, str] | None:
    """An Anthropic HH pair of full dialogues → record (prompt = shared dialogue up to the last
    "\\n\\nAssistant:"). None when the two dialogues are identical or a response is empty."""
    prompt, chosen, rejected = split_common_prefix(str(row["chosen"]), str(row["rejected"]))
    if not chosen.strip() or not rejected.strip() or chosen == rejected:
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


RECORD_FNS = {"webgpt": webgpt_record, "tldr": tldr_record, "tldr-carper": tldr_record, "hh": hh_record}


def rows_to_records(
    name: str, rows: Sequence[Mapping[str, Any]], source: str = "data"
) -> list[dict[str, str]]:
    """Raw rows of data set `name` → records, dropping ties / identical pairs; ValueError if none remain."""
    _check_columns(name, rows, source)
    records = [r for r in (RECORD_FNS[name](row) for row in rows) if r is not None]
    if not records:
        raise ValueError(f"{source}: no usable pairs (all {len(rows)} rows were ties or identical)")
    return records


# ------------------------------------------------------------------------------------------- file / hub I/O
def _json_value(text: str, where: str) -> Any:
    """json.loads with the file (and line) named in the error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"data file {where}: not valid JSON ({err.msg}, column {err.colno})") from None


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local .jsonl / .json / .parquet file (a list of dicts)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist (expected .jsonl, .json or .parquet)")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    rows.append(_json_value(line, f"{path}:{number}"))
        return rows
    if suffix == ".json":
        data = _json_value(path.read_text(encoding="utf-8"), str(path))
        if isinstance(data, dict):
            data = data.get("data", [])
        if not isinstance(data, list):
            raise ValueError(
                f'data file {path}: expected a JSON list of rows (or {{"data": [...]}}), got {type(data).__name__}'
            )
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"data file {str(path)!r}: expected a .jsonl, .json or .parquet file")


def _hub_rows(name: str, split: str) -> list[dict[str, Any]]:
    """Rows of the hub data set `name` (split `split`); DataUnavailableError when it cannot be reached."""
    from huggingface_hub import constants

    from dynamics.lm.models import _hub_reachable

    # Offline mode is only honoured by `datasets` when set before import (constants are read then); with the
    # hub unreachable and no offline mode, `datasets` would retry for ~20 s before failing: fail now.
    if not constants.HF_HUB_OFFLINE and not _hub_reachable():
        raise DataUnavailableError(
            f"data set {name!r} ({HUB_IDS[name]}) needs the hub, which is unreachable: pass a local file in its "
            f"raw schema (--data-file PATH.jsonl|.parquet), or start with HF_HUB_OFFLINE=1 to read the datasets cache"
        )
    import datasets

    kwargs = {"revision": WEBGPT_PARQUET_REVISION} if name == "webgpt" else {}
    try:
        ds = datasets.load_dataset(HUB_IDS[name], split=split, **kwargs)
    except Exception as err:  # datasets raises many types (connection, missing split, script refused)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataUnavailableError(
            f"could not load {HUB_IDS[name]!r} split {split!r}: {first} (a local file works: --data-file PATH)"
        ) from None
    return ds.to_list()


def load_preference_data(
    name: str,
    split: str = "train",
    path: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Records {prompt, chosen, rejected} of data set `name` (one of KNOWN_DATASETS).

    `path`: a local file in the raw schema (used instead of the hub). `split`: the hub split, or for
    "synthetic" one of "sft", "train", "test". `limit`: keep the first `limit` records. Errors: ValueError
    for an unknown name (listing the known ones), a missing column, an empty split; DataUnavailableError when
    the hub is needed and unreachable.
    """
    if name not in KNOWN_DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(KNOWN_DATASETS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if name == "synthetic":
        records = synthetic_pairs(split=split, n=limit or 256, seed=seed)
    elif path is not None:
        records = rows_to_records(name, read_rows(path), source=str(path))
    else:
        records = rows_to_records(name, _hub_rows(name, split), source=f"{HUB_IDS[name]}[{split}]")
    return records[:limit] if limit is not None else records


# -------------------------------------------------------------------------------------------- synthetic task
SYNTH_FILLER = "a"
SYNTH_CONTENT = "bcdefghijk"


def synthetic_pairs(
    split: str = "train",
    n: int = 256,
    seed: int = 0,
    response_len: int = 6,
    rejected_len: int | None = None,
    filler_prob: float = 0.9,
) -> list[dict[str, str]]:
    """A preference task on which the theory predicts squeezing (S5 carried to an LM) [ours].

    Prompts "Q{3 digits}:" (the response does not depend on them). Responses are strings over the filler
    letter "a" and the ten content letters "b".."k".

    - split "sft": chosen = a string of uniform length in [`response_len`, `rejected_len`], each letter "a"
      with probability `filler_prob`, else a uniform content letter. SFT on these makes the model **peaked**:
      at every response position the argmax is "a" (p ≈ 0.9), each content letter ≈ 0.01, and the varying
      length keeps the end-of-text token below "a" until the longest length.
    - splits "train" / "test": chosen = `response_len` content letters, rejected = `rejected_len` (default
      3 × `response_len`) content letters, both uniform over the **same** ten letters: two similar,
      unlikely (off-manifold: no filler) responses, the chosen one shorter. Neither response contains the
      argmax "a" at any position. DPO's negative gradient on the rejected tokens is "GD with a negative
      learning rate" on labels with p ≈ 0.01 under a model peaked on "a": by S5 it lowers them and moves
      their mass onto "a" (α_{y*} > 1). The positive gradient on the chosen tokens raises the same letters,
      but on a third as many positions, so on the (shared) letter features the push is net negative and
      log π(chosen) falls while max_conf (the argmax "a" at the chosen positions) rises: the squeezing
      effect. What the model can learn to prefer is the length (end-of-text after `response_len` letters).
      (With disjoint letter sets for chosen and rejected the positive gradient raises the chosen letters
      directly and log π(chosen) rises; where chosen and rejected share a context, DPO's logit update is
      e_{y⁺} − e_{y⁻} and the two "−p" parts cancel, hence the different lengths.)
    Different seeds / splits give independent draws; "test" uses seed + 1_000_003.
    """
    if split not in ("sft", "train", "test"):
        raise ValueError(f"synthetic split must be 'sft', 'train' or 'test', got {split!r}")
    if not 0.0 < filler_prob < 1.0:
        raise ValueError(f"filler_prob must lie in (0, 1), got {filler_prob}")
    rejected_len = 3 * response_len if rejected_len is None else rejected_len
    if not 1 <= response_len <= rejected_len:
        raise ValueError(f"need 1 <= response_len <= rejected_len, got {response_len}, {rejected_len}")
    rng = random.Random(seed + {"sft": 7, "train": 0, "test": 1_000_003}[split])

    def draw(k: int) -> str:
        return "".join(rng.choice(SYNTH_CONTENT) for _ in range(k))

    records = []
    for _ in range(n):
        prompt = f"Q{rng.randrange(1000):03d}:"
        if split == "sft":
            length = rng.randint(response_len, rejected_len)
            chosen = "".join(
                SYNTH_FILLER if rng.random() < filler_prob else rng.choice(SYNTH_CONTENT)
                for _ in range(length)
            )
            records.append({"prompt": prompt, "chosen": chosen, "rejected": draw(rejected_len)})
        else:
            records.append({"prompt": prompt, "chosen": draw(response_len), "rejected": draw(rejected_len)})
    return records


# ----------------------------------------------------------------------------------------------- collation
def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(
    record: Mapping[str, str], tokenizer: Any, max_length: int = 512, max_prompt_length: int = 256
) -> tuple[list[int], list[int], list[int]]:
    """Token ids (prompt, chosen + eos, rejected + eos) truncated as TRL does: the prompt keeps its last
    `max_prompt_length` tokens, each response its first `max_length − len(prompt)` tokens. An empty prompt
    becomes the bos/eos token (a response token needs a predicting position)."""
    if max_prompt_length < 1 or max_length <= max_prompt_length:
        raise ValueError(f"need 1 <= max_prompt_length < max_length, got {max_prompt_length}, {max_length}")
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            raise ValueError(f"a preference record needs keys prompt, chosen, rejected; missing {key!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token")
    prompt = _encode(tokenizer, record["prompt"])[-max_prompt_length:]
    if not prompt:
        prompt = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos]
    room = max_length - len(prompt)
    chosen = (_encode(tokenizer, record["chosen"]) + [eos])[:room]
    rejected = (_encode(tokenizer, record["rejected"]) + [eos])[:room]
    return prompt, chosen, rejected


def _pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, response ids) rows → right-padded input_ids, attention_mask, response_mask (N, T)."""
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    resp = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attn[i, :n] = 1
        resp[i, len(p) : n] = True
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def _encode_all(
    caller: str, records: Sequence[Mapping[str, str]], tokenizer: Any, max_length: int, max_prompt_length: int
) -> tuple[int, list[tuple[list[int], list[int], list[int]]]]:
    """(pad id, `encode_pair` of each record) for the collate functions; ValueError for no records."""
    if not records:
        raise ValueError(f"{caller} needs at least one record")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad, [encode_pair(r, tokenizer, max_length, max_prompt_length) for r in records]


def collate_pairs(
    records: Sequence[Mapping[str, str]], tokenizer: Any, max_length: int = 512, max_prompt_length: int = 256
) -> dict[str, torch.Tensor]:
    """B records → the preference batch: input_ids, attention_mask (2B, T) long, response_mask (2B, T) bool;
    rows [0, B) chosen, [B, 2B) rejected (pair i ↔ rows i and B + i), right-padded with the pad token."""
    pad, enc = _encode_all("collate_pairs", records, tokenizer, max_length, max_prompt_length)
    return _pad_rows([(p, c) for p, c, _ in enc] + [(p, r) for p, _, r in enc], pad)


def collate_sft(
    records: Sequence[Mapping[str, str]], tokenizer: Any, max_length: int = 512, max_prompt_length: int = 256
) -> dict[str, torch.Tensor]:
    """B records → an SFT batch on the chosen responses: input_ids, attention_mask, response_mask (B, T)."""
    pad, enc = _encode_all("collate_sft", records, tokenizer, max_length, max_prompt_length)
    return _pad_rows([(p, c) for p, c, _ in enc], pad)
