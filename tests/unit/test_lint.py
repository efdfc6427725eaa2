"""The tree is clean under the linter and the formatter (ruff.toml): the test command checks them, as CI
runs only the README's set-up and test command."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(command):
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", *command], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    if "No module named ruff" in proc.stderr:
        pytest.fail("ruff is not installed: pip install -e '.[dev]' (setup.py's dev extra has it)")
    assert proc.returncode == 0, f"ruff {' '.join(command)}:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
