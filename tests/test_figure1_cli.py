"""figures/figure1.py: files, schema, determinism, running from another folder, one-line usage errors."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "figures" / "figure1.py"
OUTPUTS = ("figure1a.png", "figure1b.png", "figure1_toy.json")


def _load_script():
    spec = importlib.util.spec_from_file_location("figure1_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(args, cwd):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs from a folder outside the repository, into two output folders."""
    work = tmp_path_factory.mktemp("elsewhere")
    results = [_run(["--panels", "a", "b", "--out", f"out{i}"], cwd=work) for i in (1, 2)]
    return work, results


def test_writes_panels_and_json_from_another_folder(two_runs):
    work, results = two_runs
    for result in results:
        assert result.returncode == 0, result.stderr
    for name in OUTPUTS:
        path = work / "out1" / name
        assert path.is_file() and path.stat().st_size > 0
    for name in OUTPUTS[:2]:
        assert (work / "out1" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_runs_give_identical_files(two_runs):
    work, _ = two_runs
    for name in OUTPUTS:
        assert (work / "out1" / name).read_bytes() == (work / "out2" / name).read_bytes(), name


def test_json_schema_and_committed_copy_is_current(two_runs):
    work, _ = two_runs
    record = json.loads((work / "out1" / "figure1_toy.json").read_text())
    assert set(record) == {"mu", "label", "z0", "runs"}
    assert isinstance(record["mu"], float) and isinstance(record["label"], int) and len(record["z0"]) == 3
    for run in record["runs"]:
        assert set(run) == {"name", "eta", "rho", "probs", "residuals", "eigenvalues", "modal"}
        assert run["eta"] < 0
        assert all(
            len(row) == 3 for key in ("probs", "residuals", "eigenvalues", "modal") for row in run[key]
        )
    assert {run["rho"] > 0 for run in record["runs"] if run["rho"] != 0} == {True, False}
    committed = REPO / "figures" / "figure1_toy.json"
    assert committed.read_text() == (work / "out1" / "figure1_toy.json").read_text(), "regenerate figures/"


def test_bad_flag_exits_2_with_one_line():
    result = _run(["--panels", "e"], cwd=REPO)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus"], "unrecognized arguments"),
        (["--panels"], "expected at least one argument"),
        (["--eta", "0"], "nonzero rate"),
        (["--eta", "nan"], "finite"),
        (["--rho", "-1"], "nonnegative"),
        (["--steps", "0"], "positive int"),
        (["--steps", "x"], "invalid int value"),
    ],
)
def test_flag_validation_in_process(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _load_script().main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_out_must_be_a_folder(tmp_path, capsys):
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    with pytest.raises(SystemExit) as exc:
        _load_script().main(["--out", str(not_a_folder)])
    assert exc.value.code == 2 and "expected a folder" in capsys.readouterr().err


def test_caption_names_the_defaults(capsys):
    assert _load_script().main(["--caption"]) == 0
    text = capsys.readouterr().out
    for piece in ("η = -0.25", "ρ = +1", "ρ = −1", "p₀ = (0.2, 0.5, 0.3)", "40 steps", "R^1000"):
        assert piece in text, piece
