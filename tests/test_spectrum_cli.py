"""`python experiments/spectrum.py`: schema of spectrum.json, flag validation, and the committed figures/ result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "spectrum.py"
SMALL = ["--dense-v", "64", "--speed-v", "96", "--top-v", "500", "800", "--k", "4", "--repeats", "2"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def check_schema(results: dict, dense_v: int, speed_v: int, top_key: str, top_v: list[int]) -> None:
    assert set(results) == {"dense_check", "speedup_vs_dense", top_key}
    assert set(results["dense_check"]) == {"V", "max_eigenvalue_error", "max_eigenvector_residual"}
    assert results["dense_check"]["V"] == dense_v
    assert set(results["speedup_vs_dense"]) == {"V", "ratio", "full_spectrum_ratio"}
    assert results["speedup_vs_dense"]["V"] == speed_v
    assert set(results[top_key]) == {str(v) for v in top_v}
    for entry in results[top_key].values():
        assert set(entry) == {"time_s", "peak_mem_mb"}
        assert entry["time_s"] > 0 and entry["peak_mem_mb"] > 0


def test_cli_small_run_writes_schema(tmp_path):
    proc = run_cli("--out", str(tmp_path / "out"), *SMALL, "--dense-repeats", "1")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "spectrum.json").read_text())
    check_schema(results, 64, 96, "top4", [500, 800])
    # Backward-stable eigenpairs at V = 64: errors ≲ 64·V·eps ≈ 1e-12 (see tests/test_spectrum.py).
    assert results["dense_check"]["max_eigenvalue_error"] <= 1e-12
    assert results["dense_check"]["max_eigenvector_residual"] <= 1e-12
    config = json.loads((tmp_path / "out" / "spectrum_config.json").read_text())
    assert config["k"] == 4 and "tracemalloc" in config["measures"]


@pytest.mark.parametrize(
    "flags",
    [["--k", "0"], ["--dense-v", "3"], ["--top-v", "5"], ["--repeats", "0"], ["--k", "x"]],
)
def test_cli_bad_flags_exit_2_without_traceback(tmp_path, flags):
    proc = run_cli("--out", str(tmp_path), *flags)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0]  # one line: OneLineErrorParser prints no usage dump


def test_committed_result_meets_issue_targets():
    """figures/spectrum.json (produced by `python experiments/spectrum.py`) meets issue 6's targets."""
    results = json.loads((ROOT / "figures" / "spectrum.json").read_text())
    check_schema(results, 2048, 4096, "top16", [50257, 256000])
    assert results["dense_check"]["max_eigenvalue_error"] <= 1e-10
    assert results["dense_check"]["max_eigenvector_residual"] <= 1e-10
    assert results["speedup_vs_dense"]["ratio"] >= 500
    assert results["speedup_vs_dense"]["full_spectrum_ratio"] > 1
    assert results["top16"]["50257"]["time_s"] < 1.0
    assert results["top16"]["50257"]["peak_mem_mb"] < 100
