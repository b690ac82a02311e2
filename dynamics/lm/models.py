"""Model presets, tiny random-weight models and the offline tokenizer [ours].

Nothing here downloads anything unless a hub id is asked for *and* the hub is reachable. The tiny presets
(`tiny-gpt2`, `tiny-pythia`) are built from a `transformers` config with random weights and a byte-level
tokenizer that the project builds itself with the `tokenizers` library: deterministic, 256 byte tokens plus
`<|endoftext|>` (eos, also bos) and `<|pad|>`.

Real presets (`gpt2`, `pythia-2.8b`) resolve to a hub id; without a local copy and without network they fail
fast with :class:`ModelUnavailableError`, a one-line message saying how to provide the weights.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TINY_ARCHS = ("gpt2", "gpt-neox")


class ModelUnavailableError(RuntimeError):
    """The weights of a model are neither on disk nor reachable; the message says how to provide them."""


@dataclass(frozen=True)
class Preset:
    """A model preset with the hyperparameters of its paper run and where each number comes from.

    Fields: `model_id` (hub id, or "tiny:<arch>" for a random-weight model built here), `dataset` (a name known
    to `dynamics.lm.data`), `lr`, `beta` (DPO β), `batch_size` (pairs per optimizer step, all processes and
    accumulation together), `steps` (preference-training optimizer steps), `rho` (logits-SAM radius),
    `sft_steps` (SFT steps before preference training; 0 when `model_id` is already an SFT checkpoint),
    `sft_lr` (the SFT learning rate),
    `max_length` / `max_prompt_length` (tokens), `source` (one line per number: its origin).
    """

    name: str
    model_id: str
    dataset: str
    lr: float
    beta: float
    batch_size: int
    steps: int
    rho: float
    sft_steps: int = 0
    sft_lr: float = 3e-6
    max_length: int = 512
    max_prompt_length: int = 256
    source: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The preset as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


_TINY = dict(
    dataset="synthetic",
    lr=1e-4,
    beta=0.1,
    batch_size=8,
    steps=200,
    rho=0.1,
    sft_steps=200,
    sft_lr=1e-3,
    max_length=64,
    max_prompt_length=32,
    source={
        "all": "[ours] CPU-sized values for the offline default run (experiments/squeezing.py): SFT reaches "
        "the data entropy (peaked on the filler letter), then DPO at lr 1e-4 runs 200 steps (~6 epochs of "
        "the 256 synthetic pairs), long enough for the squeezing phase (held-out chosen log-prob falls "
        "~10 nats, max_conf rises) and the start of the length-learning phase",
        "rho": "[ours] 0.1: the tiny head has ||W||_F ~ 3, so the paper's 1e-4..1e-3 would be invisible; "
        "the largest of the grid {±0.01, ±0.03, ±0.1} tried with a visible effect on the probes",
    },
)


PRESETS: dict[str, Preset] = {
    "gpt2": Preset(
        name="gpt2",
        model_id="openai-community/gpt2",
        dataset="webgpt",
        lr=1e-6,
        beta=0.1,
        batch_size=64,
        steps=306,
        rho=1e-4,
        sft_steps=300,
        max_length=512,
        max_prompt_length=256,
        source={
            "figure": "Figure 1(c): GPT-2 trained with DPO on WebGPT Comparisons (experiments.md, What the paper ran)",
            "lr": "[ours] no GPT-2 value is published; Pythia's lr 1e-6 (experiments.md, Hyperparameters)",
            "beta": "0.1, the DPO paper's value (experiments.md, Hyperparameters)",
            "batch_size": "[ours] Pythia's batch 64 (experiments.md, Hyperparameters)",
            "steps": "[ours] one epoch: 19,578 WebGPT pairs (ties dropped leave fewer) / 64 ~ 306",
            "rho": "1e-4, the best rho of the sensitivity table (experiments.md, rho sensitivity)",
            "sft_steps": "[ours] GPT-2 has no public WebGPT SFT checkpoint: SFT on chosen answers first",
            "sft_lr": "3e-6, Huang et al.'s SFT lr for Pythia-2.8B (experiments.md, Public recipes)",
            "max_length": "512 / 256 prompt, the DPO paper's recipe (experiments.md, Public recipes)",
        },
    ),
    "pythia-2.8b": Preset(
        name="pythia-2.8b",
        model_id="cleanrl/EleutherAI_pythia-2.8b-deduped__sft__tldr",
        dataset="tldr",
        lr=1e-6,
        beta=0.1,
        batch_size=64,
        steps=1451,
        rho=1e-4,
        sft_steps=0,
        max_length=512,
        max_prompt_length=256,
        source={
            "figure": "Figure 1(d): Pythia-2.8B on TL;DR (experiments.md, What the paper ran)",
            "model_id": "a ready TL;DR SFT start point (experiments.md, Hub identifiers); "
            "base EleutherAI/pythia-2.8b-deduped needs --sft-steps",
            "lr": "1e-6, Pythia (experiments.md, Hyperparameters)",
            "beta": "0.1, the DPO paper's value for Pythia (experiments.md, Hyperparameters)",
            "batch_size": "64, Pythia (experiments.md, Hyperparameters)",
            "steps": "one epoch, as Huang et al.: 92,858 trl-lib/tldr-preference pairs / 64 ~ 1451",
            "rho": "1e-4, best for Pythia-2.8B (experiments.md, rho sensitivity)",
            "max_length": "512 / 256 prompt, the DPO paper's recipe (experiments.md, Public recipes)",
        },
    ),
    # The two tiny presets differ only in architecture: one shared set of CPU-sized values.
    "tiny-gpt2": Preset(name="tiny-gpt2", model_id="tiny:gpt2", **_TINY),
    "tiny-pythia": Preset(name="tiny-pythia", model_id="tiny:gpt-neox", **_TINY),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError listing the known ones otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def build_offline_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level tokenizer built offline: 256 byte tokens, then `<|endoftext|>`, `<|pad|>`.

    Every UTF-8 string round-trips (encode then decode gives it back). Token ids 0..255 are the bytes in the
    order of `pre_tokenizers.ByteLevel.alphabet()` sorted; eos = bos = 256, pad = 257; vocabulary size 258.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS_TOKEN, PAD_TOKEN])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    tok.padding_side = "right"
    return tok


def build_tiny_model(
    arch: str = "gpt2", vocab_size: int | None = None, seed: int | None = 0, **overrides: Any
) -> PreTrainedModel:
    """A small causal LM with random weights from a `transformers` config; no download.

    `arch` is "gpt2" (GPT2LMHeadModel, tied embeddings, as GPT-2) or "gpt-neox" (GPTNeoXForCausalLM, untied,
    as Pythia). Defaults: 2 layers, 2 heads, width 64, 256 positions, vocabulary of `build_offline_tokenizer()`
    (258), no dropout (preference training disables it; it also keeps runs reproducible). `overrides` are config fields by their `transformers` names (e.g. `n_embd=32` for gpt2,
    `hidden_size=32` for gpt-neox). `seed` fixes the initial weights (None: the current torch RNG).
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {TINY_ARCHS}")
    vocab = vocab_size if vocab_size is not None else 258
    tok_ids = {"bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 257} if vocab_size is None else {}
    if arch == "gpt2":
        no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        kwargs = dict(
            n_layer=2, n_head=2, n_embd=64, n_positions=256, vocab_size=vocab, **no_dropout, **tok_ids
        )
        kwargs.update(overrides)
        config, cls = GPT2Config(**kwargs), GPT2LMHeadModel
    else:
        kwargs = dict(
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_size=64,
            intermediate_size=256,
            max_position_embeddings=256,
            vocab_size=vocab,
            tie_word_embeddings=False,
            **tok_ids,
        )
        kwargs.update(overrides)
        config, cls = GPTNeoXConfig(**kwargs), GPTNeoXForCausalLM
    if seed is None:
        return cls(config)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = cls(config)
    finally:
        torch.random.set_rng_state(state)
    return model


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub endpoint accepts a TCP connection within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    """Whether `repo_id`'s config.json is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id, an unreadable cache: treat as absent
        return False
    return isinstance(found, str)


def _unavailable_message(name: str, repo_id: str) -> str:
    return (
        f"model {name!r} ({repo_id}) is not in the local Hugging Face cache and the hub is unreachable: "
        f"download it where there is network (`huggingface-cli download {repo_id}`) and copy the cache "
        f"(HF_HOME), or pass a local directory (--model /path/to/model), then rerun (HF_HUB_OFFLINE=1 "
        f"reads the cache only)"
    )


def _finish_tokenizer(tok: Any) -> Any:
    """Give a tokenizer a pad token (its eos when it has none) and right padding."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(
    name_or_path: str, dtype: torch.dtype | str | None = None, seed: int | None = 0
) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) for a preset name, a local directory or any hub id.

    Tiny presets are built offline (random weights, `seed`). A local directory is loaded with
    `from_pretrained`. A hub id (or a real preset's id) loads from the local cache when present, from the hub
    when reachable, and otherwise raises :class:`ModelUnavailableError` at once (no retries, no traceback from
    inside `huggingface_hub`). `dtype`: a torch dtype, "bfloat16"/"float16"/"float32", or None (the default).
    """
    if isinstance(dtype, str):
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
        dtype = getattr(torch, dtype)
    if name_or_path in PRESETS and PRESETS[name_or_path].model_id.startswith("tiny:"):
        model = build_tiny_model(PRESETS[name_or_path].model_id.split(":", 1)[1], seed=seed)
        if dtype is not None:
            model = model.to(dtype)
        return model, build_offline_tokenizer()
    repo = PRESETS[name_or_path].model_id if name_or_path in PRESETS else name_or_path
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    if Path(repo).is_dir():
        source, local_only = repo, True
    elif Path(repo).exists() or repo.startswith(("/", "./", "../")):
        raise ValueError(f"--model {repo!r}: expected a directory holding config.json and weights")
    elif _in_hub_cache(repo):
        source, local_only = repo, True
    elif _hub_reachable():
        source, local_only = repo, False
    else:
        raise ModelUnavailableError(_unavailable_message(name_or_path, repo))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only, **kwargs)
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelUnavailableError(f"could not load {repo!r}: {first}") from None
    return model, _finish_tokenizer(tok)
