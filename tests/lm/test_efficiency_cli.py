"""experiments/efficiency.py (Figure 2 benchmark) and figures/figure2.py: schema, files, flag validation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "efficiency.py"
TINY = {
    "model_type": "gpt_neox",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 96,
    "max_position_embeddings": 32,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_benchmark_writes_schema_and_figure(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "out"
    proc = _run(
        "--out",
        str(out),
        "--model",
        str(config),
        "--reps",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--seq-len",
        "12",
        "--prompt-len",
        "4",
        "--no-gram",
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "efficiency.json").read_text())
    assert (out / "figure2.png").stat().st_size > 1000
    head = TINY["vocab_size"] * TINY["hidden_size"]
    assert 0 < doc["head_share"] < 1 and doc["config"]["n_params"] > head
    assert doc["head_share"] == pytest.approx(head / doc["config"]["n_params"])
    for v in ("adamw", "logits-sam", "sam"):
        assert doc["variants"][v]["step_time_s"] > 0 and doc["variants"][v]["peak_mem_mb"] > 0
    for r in ("logits-sam/adamw", "sam/adamw"):
        assert {"time", "memory"} <= set(doc["ratios"][r])  # the schema of issue 3 (extra keys allowed)
        assert doc["ratios"][r]["time"] == pytest.approx(
            doc["variants"][r.split("/")[0]]["step_time_s"] / doc["variants"]["adamw"]["step_time_s"]
        )
    assert doc["variants"]["logits-sam"]["route"] in ("dense", "gram")
    assert doc["config"]["timing"] == "interleaved"  # the CPU default: step-level interleaving in one process
    assert all(len(doc["variants"][v]["step_times_s"]) == 1 for v in ("adamw", "logits-sam", "sam"))


def test_figure2_is_a_pure_function_of_the_json(tmp_path):
    sys.path.insert(0, str(ROOT))
    from figures.figure2 import plot_efficiency

    doc = {
        "head_share": 0.05,
        "config": {"model": "m", "batch_pairs": 2, "seq_len": 8, "device": "cpu"},
        "variants": {
            v: {"step_time_s": t, "peak_mem_mb": 100.0 * t}
            for v, t in [("adamw", 1.0), ("logits-sam", 1.03), ("sam", 2.0)]
        },
        "ratios": {},
        "gram_vs_dense": {
            "cases": [
                {
                    "tokens": 16,
                    "vocab": 64,
                    "hidden": 512,
                    "dense_s": 1.1,
                    "gram_s": 0.5,
                    "auto_route": "gram",
                }
            ]
        },
    }
    path = plot_efficiency(doc, tmp_path / "f.png")
    assert path.stat().st_size > 1000


@pytest.mark.parametrize(
    "args,message",
    [
        (["--reps", "0"], "--reps must be >= 1"),
        (["--prompt-len", "64"], "--prompt-len"),
        (["--loss", "kto"], "--loss must be one of"),
        (["--model", "no-such-model"], "--model 'no-such-model'"),
        (["--device", "tpu"], "--device"),
        (["--rho", "nan"], "--rho: expected a finite number"),  # was exit 1 after starting the benchmark
        (["--steps", "-1"], "--steps must be >= 1"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, message, efficiency, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        efficiency.main(["--out", str(tmp_path), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "efficiency.json").exists()


def test_unknown_model_type_and_bad_out_exit_2_with_one_line(efficiency, tmp_path, capsys):
    """Before: an unknown model_type failed in the worker (exit 1), --out below a file raised from mkdir."""
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({**TINY, "model_type": "no_such_arch"}))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for argv, message in (
        (["--out", str(tmp_path), "--model", str(config)], "unknown model_type 'no_such_arch'"),
        (["--out", str(a_file / "sub")], "--out: cannot create the folder"),
        (["--out", str(a_file)], "--out: expected a folder"),
    ):
        with pytest.raises(SystemExit) as exc:
            efficiency.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_cuda_unavailable_exits_1_with_one_line(efficiency, tmp_path, capsys, monkeypatch):
    """No CUDA device is runtime unavailability (exit 1), not a usage error."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        efficiency.main(["--out", str(tmp_path), "--device", "cuda"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]


@pytest.fixture
def efficiency():
    """experiments/efficiency.py loaded as a module (it is a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("experiments_efficiency", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
