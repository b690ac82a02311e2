"""The training loop (dynamics.lm.train): rows, resume after kill -9, NaN guard, ρ = 0 [ours]."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dynamics.lm.train as train_mod
from dynamics.lm.models import build_offline_tokenizer, build_tiny_model
from dynamics.lm.train import (
    NonFiniteLossError,
    TrainConfig,
    batch_indices,
    load_checkpoint,
    resolve_config,
    train,
)

ROOT = Path(__file__).resolve().parents[2]
FIELDS = (
    "step",
    "split",
    "optimizer",
    "rho",
    "logp_chosen",
    "logp_rejected",
    "logp_max_conf",
    "loss",
    "margin",
    "accuracy",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 1-layer, width-32 GPT-2 saved as a local model directory (fast to train on CPU)."""
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_model("gpt2", n_embd=32, n_layer=1).save_pretrained(path)
    build_offline_tokenizer().save_pretrained(path)
    return path


def _cfg(tiny_dir, out, **kw):
    base = dict(
        model=str(tiny_dir),
        dataset="synthetic",
        n_train=32,
        n_probe=4,
        sft_steps=0,
        batch_size=4,
        steps=4,
        eval_every=2,
        max_length=32,
        max_prompt_length=8,
        out=str(out),
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_resolve_config_validates():
    assert resolve_config(TrainConfig()).lr == 1e-4  # filled from the tiny-gpt2 preset
    for bad, match in (
        (dict(optimizer="sgd"), "optimizer"),
        (dict(batch_size=6, grad_accum=4), "divisible"),
        (dict(lr=-1.0), "lr"),
        (dict(rho=float("nan")), "rho"),
        (dict(steps=0), "steps"),
        (dict(loss="nope"), "loss"),
    ):
        with pytest.raises(ValueError, match=match):
            resolve_config(TrainConfig(**bad))


def test_batch_indices_are_epoch_permutations():
    n, b = 10, 4
    seen = [i for step in range(1, 6) for i in batch_indices(step, b, n, seed=3)]  # 20 draws = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert batch_indices(3, b, n, seed=3) == batch_indices(3, b, n, seed=3)
    assert batch_indices(1, b, n, seed=3) != batch_indices(1, b, n, seed=4)


def test_run_writes_every_step_once_and_probes(tiny_dir, tmp_path):
    out = train(
        _cfg(tiny_dir, tmp_path / "run", optimizer="logits-sam", rho=0.05, sft_steps=3, checkpoint_every=2)
    )
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    for split in ("heldout", "train_probe"):
        assert [r["step"] for r in rows if r["split"] == split] == [0, 2, 4]
    for r in rows:
        assert all(k in r for k in FIELDS) and r["optimizer"] == "logits-sam" and r["rho"] == 0.05
    step0 = [r for r in rows if r["step"] == 0]
    assert all(abs(r["margin"]) < 1e-6 for r in step0)  # policy = reference at step 0
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == "logits-sam" and config["world_size"] == 1
    assert (out / "sft" / "DONE").is_file() and load_checkpoint(out / "checkpoint")["step"] == 4
    with pytest.raises(ValueError, match="--resume"):
        train(_cfg(tiny_dir, tmp_path / "run"))  # never overwrite a run's metrics silently


def test_rho_zero_logits_sam_reproduces_adamw(tiny_dir, tmp_path):
    plain = _rows(train(_cfg(tiny_dir, tmp_path / "a", optimizer="adamw")) / "metrics.jsonl")
    zero = _rows(train(_cfg(tiny_dir, tmp_path / "b", optimizer="logits-sam", rho=0.0)) / "metrics.jsonl")
    strip = ("optimizer", "rho", "loss_perturbed")
    assert [{k: v for k, v in r.items() if k not in strip} for r in plain] == [
        {k: v for k, v in r.items() if k not in strip} for r in zero
    ]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_mod.PreferenceObjective

    class NanAfterTwoSteps(real):
        def __call__(self, logits, batch):
            calls["n"] += 1
            if calls["n"] > 2:  # adamw: one loss call per step, so step 3 diverges
                logits = logits * float("nan")
            return super().__call__(logits, batch)

    monkeypatch.setattr(train_mod, "PreferenceObjective", NanAfterTwoSteps)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="step 3") as info:
        train(_cfg(tiny_dir, out, optimizer="adamw", steps=6, checkpoint_every=1))
    assert "last good checkpoint" in str(info.value)
    state = load_checkpoint(out / "checkpoint")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert max(r["step"] for r in _rows(out / "metrics.jsonl")) == 2


def _cli(tiny_dir, out, *extra):
    return [
        sys.executable,
        str(ROOT / "experiments" / "squeezing.py"),
        *("--model", str(tiny_dir), "--dataset", "synthetic", "--optimizer", "logits-sam", "--rho", "0.05"),
        *(
            "--sft-steps",
            "0",
            "--steps",
            "12",
            "--eval-every",
            "3",
            "--checkpoint-every",
            "2",
            "--batch-size",
            "4",
        ),
        *("--n-train", "32", "--n-probe", "4", "--max-length", "32", "--max-prompt-length", "8"),
        *("--out", str(out), "--no-progress", *extra),
    ]


def test_resume_after_kill_matches_an_uninterrupted_run(tiny_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(
        _cli(tiny_dir, tmp_path / "full"), env=env, capture_output=True, text=True, timeout=300
    )
    assert full.returncode == 0, full.stderr[-2000:]
    metrics = tmp_path / "killed" / "logits-sam-rho0.05" / "metrics.jsonl"
    proc = subprocess.Popen(
        _cli(tiny_dir, tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 7
        ):  # step 3 written, a checkpoint at step 2
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("the run finished before it could be killed: make it longer")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = _rows(metrics)
    assert max(r["step"] for r in partial) < 12  # it really was interrupted
    resumed = subprocess.run(
        _cli(tiny_dir, tmp_path / "killed", "--resume"), env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = _rows(metrics)
    want = _rows(tmp_path / "full" / "logits-sam-rho0.05" / "metrics.jsonl")
    steps = [(r["step"], r["split"]) for r in got]
    assert len(steps) == len(set(steps))  # every (step, split) exactly once
    assert got == want  # CPU, same seed: bit-identical floats after the resume


def test_curvature_probe_adds_fields(tiny_dir, tmp_path):
    out = train(_cfg(tiny_dir, tmp_path / "curv", steps=2, curvature_probe=True))
    probe = [r for r in _rows(out / "metrics.jsonl") if r["split"] == "heldout"]
    assert [r["step"] for r in probe] == [0, 2]
    for r in probe:
        assert 0.0 < r["curv_trace_hz"] < 1.0  # tr H_z = 1 − ‖p‖² lies in (0, 1)
        assert r["curv_head_trace"] > 0 and 0.0 <= r["curv_top_modal_share"] <= 1.0
    # α since the previous probe: absent at the first probe, present (and moved by training) after it
    assert "curv_alpha_target" not in probe[0]
    alphas = [probe[1][f"curv_alpha_{k}"] for k in ("target", "argmax", "top_other")]
    assert all(0.0 < a < float("inf") for a in alphas) and any(abs(a - 1.0) > 1e-6 for a in alphas)


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(tiny_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo), logits-SAM with the global ‖G_W‖: the probe rows equal a
    single-process run on the same global batch up to float32 summation order (the gradient and G_W are
    all-reduced, so only rounding differs; measured ≤ 7.6e-6 after 6 steps at ρ = 0.05, one float32 ulp at
    the largest values compared, |log π(y⁻)| ≈ 106). The tolerance is absolute, 1e-4 ≈ 13 such ulps."""
    argv = _cli(tiny_dir, tmp_path / "x")[2:-3] + ["--no-progress"]  # drop python, script, --out OUT
    argv[argv.index("--steps") + 1] = "6"
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    script = str(ROOT / "experiments" / "squeezing.py")
    two = subprocess.run(
        [*launch, script, *argv, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300
    )
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run(
        [sys.executable, script, *argv, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    run = "logits-sam-rho0.05"
    assert json.loads((tmp_path / "two" / run / "config.json").read_text())["world_size"] == 2
    a, b = _rows(tmp_path / "one" / run / "metrics.jsonl"), _rows(tmp_path / "two" / run / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for x, y in zip(a, b, strict=True):
        for key in ("logp_chosen", "logp_rejected", "logp_max_conf", "loss", "margin"):
            assert x[key] == pytest.approx(y[key], abs=1e-4), (x["step"], x["split"], key)


def test_bf16_autocast_and_gradient_checkpointing_run(tiny_dir, tmp_path):
    out = train(
        _cfg(
            tiny_dir,
            tmp_path / "bf16",
            optimizer="logits-sam",
            rho=0.05,
            steps=2,
            bf16=True,
            gradient_checkpointing=True,
        )
    )
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert all(
        abs(r[k]) < 1e4 for r in rows for k in ("logp_chosen", "logp_rejected", "loss")
    )  # finite, sane


@pytest.mark.parametrize(
    "fields, message",
    [
        # Before: a data file with the (default) synthetic data set was silently ignored and the run trained.
        ({"data_file": "x.jsonl"}, "the synthetic task reads no file"),
        ({"dataset": "tldr", "data_file": "/no/such/file.jsonl"}, "does not exist"),
        ({"dataset": "tldr", "eval_data_file": "/no/such/file.jsonl"}, "eval_data_file /no/such"),
        ({"init_from": "/no/such/model_dir"}, "init_from /no/such/model_dir is not a folder"),
        ({"n_train": 0}, "n_train must be >= 1"),
    ],
)
def test_resolve_config_rejects_bad_paths_early(fields, message):
    with pytest.raises(ValueError, match=message):
        resolve_config(TrainConfig(**fields))


def test_out_that_cannot_be_created_is_a_one_line_value_error(tmp_path):
    """Before: train() raised NotADirectoryError from mkdir (a traceback in squeezing.py)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="out: expected a folder"):
        resolve_config(TrainConfig(out=str(a_file)))
    with pytest.raises(ValueError, match="out: cannot create the folder") as info:
        train(TrainConfig(out=str(a_file / "sub"), steps=1, sft_steps=0, device="cpu", progress=False))
    assert "\n" not in str(info.value)
