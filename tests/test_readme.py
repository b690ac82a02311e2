"""The README's commands stay true: the three top commands are what CI runs, and every flag a README command
uses is one its script accepts (each script's --help is asked once)."""

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_lines() -> list[str]:
    """Commands in the README's ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def script_invocations() -> list[tuple[str, list[str]]]:
    """(script path, flags) for every README line that runs one of the project's scripts."""
    out = []
    for line in bash_lines():
        words = shlex.split(line)
        scripts = [w for w in words if w.endswith(".py") and (ROOT / w).is_file()]
        if scripts:
            args = words[words.index(scripts[0]) + 1 :]
            # flags anywhere in the arguments, optional ones in [brackets] included
            out.append((scripts[0], re.findall(r"(?<![\w-])--[a-z][\w-]*", " ".join(args))))
    return out


@cache
def help_text(script: str) -> str:
    proc = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_top_commands_are_what_ci_runs():
    top = bash_lines()[:3]
    assert top[0].startswith("pip install") and top[2] == "pytest", top
    ci = (ROOT / ".ci" / "run").read_text()
    assert top[0] in ci and re.search(r"^pytest$", ci, flags=re.M), (
        "README set-up / test command differs from .ci/run"
    )
    assert top[1] == "python experiments/squeezing.py"


def test_readme_names_every_script():
    named = {script for script, _ in script_invocations()}
    assert named >= {
        "experiments/squeezing.py",
        "experiments/efficiency.py",
        "experiments/spectrum.py",
        "figures/figure1.py",
        "figures/figure2.py",
    }


@pytest.mark.parametrize("script,flags", script_invocations(), ids=lambda v: v if isinstance(v, str) else "")
def test_readme_flags_exist(script, flags):
    text = help_text(script)
    missing = [flag for flag in flags if not re.search(rf"{re.escape(flag)}\b", text)]
    assert not missing, f"{script} --help does not list {missing}"
