"""Linters as tests: ruff on builder/, tests/, bench/ and examples/, mypy --strict on
builder/ and the Consul double's package (tests/fixtures/consul_double), the
import-linter layering contract, and shellcheck on every shipped script."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder.bake.gates import shellcheck, shipped_scripts
from tests.paths import REPO


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a linter from this venv (``python -m ...``) in the checkout."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, check=False
    )


#: What ruff checks: the package, the tests, the benchmarks and the example pipelines.
RUFF_PATHS = ("builder", "tests", "bench", "examples")


def test_ruff_check() -> None:
    done = run_module("ruff", "check", "--no-cache", *RUFF_PATHS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format() -> None:
    done = run_module("ruff", "format", "--check", "--no-cache", *RUFF_PATHS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict() -> None:
    # strict = true and packages (builder, tests.fixtures.consul_double) come from
    # pyproject.toml.
    done = run_module("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success" in done.stdout


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter's ``lint-imports`` with the contracts in ``root``/pyproject.toml."""
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )


def test_layers_hold() -> None:
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "crossing"),
    [
        ("builder/spec/model.py", "from builder.render import hcl"),  # down reaches up
        ("builder/verify/runner.py", "from builder.aws import client"),  # siblings
        ("builder/render/hcl.py", "from builder.bake import run"),
        ("builder/cli/common.py", "from builder.cli import main"),  # a cycle
    ],
)
def test_a_crossing_breaks_the_contract(tmp_path: Path, module: str, crossing: str) -> None:
    shutil.copytree(REPO / "builder", tmp_path / "builder")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{crossing}  # injected by the test\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout
    assert "BROKEN" in done.stdout


def test_cli_uses_no_private_names() -> None:
    """The CLI talks to the library through public names only (``_x`` stays inside)."""
    found = []
    for path in sorted((REPO / "builder" / "cli").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        modules = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("builder")
            for alias in node.names
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("builder"):
                found += [
                    f"{path.name}: {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
            elif (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
            ):
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert found == []


def test_there_are_scripts_to_check() -> None:
    names = {p.name for p in shipped_scripts()}
    assert {"meshbake-bake", "meshbake-firstboot", "meshbake-redirect"} <= names


@pytest.mark.integration
@pytest.mark.parametrize("script", shipped_scripts(), ids=lambda p: p.name)
def test_shellcheck(script: Path) -> None:
    findings = shellcheck([script])
    assert findings == [], "\n".join(findings)
