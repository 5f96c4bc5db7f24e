"""Shared pytest wiring: the ``--update-golden`` option, the ``repo`` fixture and the
fixture-release plugin (a TEST DOUBLE of a Consul release, see tests/fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.paths import REPO

pytest_plugins = ["tests.fixtures.plugin"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/<name>/ from the current renderers instead of comparing",
    )


@pytest.fixture(scope="session")
def repo() -> Path:
    """The root of the meshbake checkout."""
    return REPO
