"""Linters as tests: ruff on builder/ and tests/, mypy --strict on builder/ and
shellcheck on every shipped script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from builder.validate import shellcheck, shipped_scripts

REPO = Path(__file__).resolve().parents[2]


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a linter from this venv (``python -m ...``) in the checkout."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, check=False
    )


def test_ruff_check() -> None:
    done = run_module("ruff", "check", "--no-cache", "builder", "tests")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format() -> None:
    done = run_module("ruff", "format", "--check", "--no-cache", "builder", "tests")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict() -> None:
    # strict = true and packages = ["builder"] come from pyproject.toml.
    done = run_module("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success" in done.stdout


def test_there_are_scripts_to_check() -> None:
    names = {p.name for p in shipped_scripts()}
    assert {"meshbake-bake", "meshbake-firstboot", "meshbake-redirect"} <= names


@pytest.mark.integration
@pytest.mark.parametrize("script", shipped_scripts(), ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    findings = shellcheck([script])
    assert findings == [], "\n".join(findings)
