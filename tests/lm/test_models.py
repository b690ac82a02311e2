"""Presets, tiny models, the offline tokenizer and the fail-fast loader (dynamics.lm.models) [ours]."""

import subprocess
import sys
import time

import pytest
import torch

from dynamics.lm.models import (
    PRESETS,
    ModelUnavailableError,
    build_offline_tokenizer,
    build_tiny_model,
    get_preset,
    load_model,
)


def test_offline_tokenizer_round_trips_and_is_deterministic():
    tok = build_offline_tokenizer()
    text = "Question: héllo 世界?\nTL;DR: ok"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert build_offline_tokenizer()(text)["input_ids"] == ids
    assert len(tok) == 258 and tok.eos_token_id == 256 and tok.pad_token_id == 257
    assert max(ids) < 256  # plain text never produces a special token


@pytest.mark.parametrize("arch", ["gpt2", "gpt-neox"])
def test_tiny_model_forward_and_seed(arch):
    model = build_tiny_model(arch)
    ids = torch.randint(0, 256, (2, 7))
    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 7, 258)
    again = build_tiny_model(arch)(input_ids=ids).logits
    assert torch.equal(logits, again)  # same seed, same weights
    other = build_tiny_model(arch, seed=1)(input_ids=ids).logits
    assert not torch.equal(logits, other)


def test_tiny_model_overrides_and_bad_arch():
    model = build_tiny_model("gpt2", n_embd=32, n_layer=1)
    assert model.config.n_embd == 32 and model.config.n_layer == 1
    with pytest.raises(ValueError, match="expected one of"):
        build_tiny_model("llama")


def test_presets_carry_hyperparameters_with_sources():
    for name in ("gpt2", "pythia-2.8b", "tiny-gpt2", "tiny-pythia"):
        preset = get_preset(name)
        assert preset.lr > 0 and preset.beta > 0 and preset.batch_size > 0 and preset.steps > 0
        assert preset.source  # every preset says where its numbers come from
    assert PRESETS["pythia-2.8b"].dataset == "tldr" and PRESETS["gpt2"].dataset == "webgpt"
    with pytest.raises(ValueError, match="known presets"):
        get_preset("nope")


def test_load_tiny_preset_and_local_dir(tmp_path):
    model, tok = load_model("tiny-pythia")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(str(tmp_path))
    ids = torch.tensor([tok("abc")["input_ids"]])
    assert torch.allclose(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert tok2("abc")["input_ids"] == tok("abc")["input_ids"]
    bf16, _ = load_model("tiny-gpt2", dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_real_preset_without_weights_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        load_model("pythia-2.8b")
    assert time.perf_counter() - start < 5.0  # no retries against an unreachable hub
    message = str(info.value)
    assert "\n" not in message and "local directory" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(ValueError, match="expected a directory"):
        load_model(str(tmp_path / "missing-model"))


def test_real_preset_fails_fast_in_a_fresh_process(tmp_path):
    """The same check end to end, without HF_HUB_OFFLINE: the hub is unreachable on CI machines."""
    code = (
        "from dynamics.lm.models import load_model, ModelUnavailableError\n"
        "try:\n    load_model('gpt2')\nexcept ModelUnavailableError as e:\n    print('FAST', e)\n"
    )
    env = {"HF_HUB_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    # where the hub *is* reachable this downloads GPT-2 instead; only assert the offline behaviour here
    if "FAST" not in out.stdout:
        pytest.skip("hub reachable from this machine: the offline path is not exercised")
    assert out.returncode == 0 and out.stdout.count("\n") == 1
