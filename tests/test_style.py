"""The code follows the ruff rules in pyproject.toml."""

import shutil
import subprocess

import pytest

from support import REPO


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (scripts/setup.sh installs it)")
def test_ruff_finds_nothing():
    result = subprocess.run(["ruff", "check", "--output-format", "concise", "."], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
