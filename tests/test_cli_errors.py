"""Bad input to the command-line entry points: exit 2 (usage) or 1 (unavailable) with ONE line, no traceback.

Each case below failed before the fix that added it (a traceback from mkdir, json or a KeyError, or exit 1
after launching the benchmark), so the tests can fail.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dynamics._cli import finite_float, write_json

ROOT = Path(__file__).resolve().parents[1]


def _load(relpath: str):
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(f"cli_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def figure1():
    return _load("figures/figure1.py")


@pytest.fixture(scope="module")
def figure2():
    return _load("figures/figure2.py")


@pytest.fixture(scope="module")
def spectrum():
    return _load("experiments/spectrum.py")


def _one_line_exit(main, argv, capsys, code: int = 2) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line: no usage dump, no traceback
    return err[0]


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


# ---------------------------------------------------------------------------------------------- figure1.py
def test_figure1_out_below_a_file(figure1, a_file, capsys):
    line = _one_line_exit(figure1.main, ["--out", str(a_file / "sub")], capsys)
    assert "--out: cannot create the folder" in line


def _run_dir(tmp_path: Path, config: object, lines: list[str]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


GOOD_CONFIG = {"optimizer": "adamw", "rho": 0.0, "model": "tiny-gpt2", "dataset": "synthetic"}
GOOD_ROW = {"step": 0, "split": "heldout", "logp_chosen": -1.0, "logp_rejected": -2.0, "logp_max_conf": -0.5}


@pytest.mark.parametrize(
    "config, lines, message",
    [
        ("{not json", [json.dumps(GOOD_ROW)], "config.json is not valid JSON"),
        (
            {"optimizer": "adamw"},
            [json.dumps(GOOD_ROW)],
            "config.json: expected a JSON object with the fields",
        ),
        (GOOD_CONFIG, [json.dumps(GOOD_ROW), "garbage"], "metrics.jsonl line 2 is not JSON"),
        (GOOD_CONFIG, [json.dumps({"step": 0})], "metrics.jsonl line 1: expected the fields"),
    ],
)
def test_figure1_malformed_run(figure1, tmp_path, capsys, config, lines, message):
    run = _run_dir(tmp_path, config, lines)
    argv = ["--panels", "c", "--runs", str(run), "--out", str(tmp_path / "out")]
    assert message in _one_line_exit(figure1.main, argv, capsys)


def test_figure1_good_run_still_draws(figure1, tmp_path):
    run = _run_dir(tmp_path, GOOD_CONFIG, [json.dumps(GOOD_ROW), json.dumps({**GOOD_ROW, "step": 1})])
    assert figure1.main(["--panels", "c", "--runs", str(run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "figure1c.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------- figure2.py
@pytest.mark.parametrize(
    "doc, message",
    [
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"variants": {"adamw": {}}, "head_share": 0.1}', "expected a number at variants.adamw.step_time_s"),
        ('{"variants": {}, "head_share": 0.1}', "expected a 'variants' object"),
        ('{"variants": {"adamw": {"step_time_s": 1, "peak_mem_mb": 2}}}', "head_share"),
    ],
)
def test_figure2_malformed_json(figure2, tmp_path, capsys, doc, message):
    src = tmp_path / "efficiency.json"
    src.write_text(doc)
    line = _one_line_exit(figure2.main, [str(src)], capsys)
    assert "not an efficiency.json" in line and message in line


def test_figure2_out_below_a_file_and_usage_is_one_line(figure2, a_file, capsys):
    src = str(ROOT / "figures" / "efficiency.json")
    assert "--out: expected a folder" in _one_line_exit(
        figure2.main, [src, "--out", str(a_file / "f.png")], capsys
    )
    assert "no such file" in _one_line_exit(figure2.main, [str(a_file) + ".missing"], capsys)


# --------------------------------------------------------------------------------------------- spectrum.py
def test_spectrum_out_below_a_file_is_one_line(spectrum, a_file, capsys):
    line = _one_line_exit(spectrum.main, ["--out", str(a_file / "sub")], capsys)
    assert "--out: cannot create the folder" in line


def test_spectrum_bad_flag_is_one_line(spectrum, tmp_path, capsys):
    """Before: argparse printed its usage (4 lines) before the error; and --k -1 reported 'k + 2 = 1'."""
    line = _one_line_exit(spectrum.main, ["--out", str(tmp_path), "--k", "-1"], capsys)
    assert "--k: expected a positive integer" in line


# ------------------------------------------------------------------------------------------ shared helpers
@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "x"])
def test_finite_float_rejects(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="expected a"):
        finite_float(text)


def test_write_json_is_atomic_and_leaves_no_temporary(tmp_path):
    path = write_json(tmp_path / "x.json", {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
