"""Tiny causal LMs built directly from transformers configs (no download) and preference batches for them."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

VOCAB = 64
HIDDEN = 32
ARCHS = ("gpt2", "gpt-neox")


def make_tiny_lm(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, head_bias: bool = False):
    """GPT-2 (tied head) or GPT-NeoX (untied, as Pythia): vocab 64, d 32, 2 layers, 2 heads, no dropout.

    ``head_bias=True`` replaces the head by an untied nn.Linear with a bias (to test that it is never perturbed).
    """
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=2,
            n_head=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    elif arch == "gpt-neox":
        config = GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPTNeoXForCausalLM(config)
    else:
        raise ValueError(arch)
    if head_bias:
        head = torch.nn.Linear(HIDDEN, VOCAB, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.get_output_embeddings().weight)
            head.bias.normal_(0.0, 0.5)
        model.set_output_embeddings(head)
    return model.to(dtype)


def make_pref_batch(
    n_pairs: int = 2, seq_len: int = 10, prompt_len: int = 4, *, seed: int = 1, ref: bool = True, pad: int = 2
) -> dict[str, torch.Tensor]:
    """A (2B, T) preference batch, chosen rows first, right-padded: the last ``pad`` tokens of the odd rows
    are padding (attention 0, response 0), so padding is exercised."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * n_pairs
    ids = torch.randint(1, VOCAB, (rows, seq_len), generator=gen)
    attn = torch.ones(rows, seq_len, dtype=torch.long)
    resp = torch.zeros(rows, seq_len, dtype=torch.long)
    resp[:, prompt_len:] = 1
    if pad:
        attn[1::2, -pad:] = 0
        resp[1::2, -pad:] = 0
        ids[1::2, -pad:] = 0
    batch = {"input_ids": ids, "attention_mask": attn, "response_mask": resp}
    if ref:
        batch["ref_chosen_logps"] = -25.0 + torch.randn(n_pairs, generator=gen, dtype=torch.float64)
        batch["ref_rejected_logps"] = -25.0 + torch.randn(n_pairs, generator=gen, dtype=torch.float64)
    return batch


@pytest.fixture(params=ARCHS)
def lm_arch(request) -> str:
    """Both tiny architectures: "gpt2" (tied head) and "gpt-neox" (untied, Pythia)."""
    return request.param


@pytest.fixture
def pref_batch() -> dict[str, torch.Tensor]:
    return make_pref_batch()


@pytest.fixture
def make_lm():
    """Factory fixture: ``make_lm(arch, *, seed, dtype, head_bias)`` (test modules cannot import conftest)."""
    return make_tiny_lm


@pytest.fixture
def make_batch():
    """Factory fixture: ``make_batch(n_pairs, seq_len, prompt_len, *, seed, ref, pad)``."""
    return make_pref_batch
