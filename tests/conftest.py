"""Shared pytest wiring: the ``--update-golden`` option, the ``repo`` fixture, the
session's one Debian base image (shared by the integration and e2e layers) and the
fixture-release plugin (a TEST DOUBLE of a Consul release, see tests/fixtures)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from builder.bake import base
from builder.bake.base import BaseImage
from tests.paths import REPO

pytest_plugins = ["tests.fixtures.plugin"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/<name>/ from the current renderers instead of comparing",
    )
    parser.addoption(
        "--arm64",
        action="store_true",
        default=False,
        help="also run the tests marked arm64: the local arm64 bake and verify (TCG, slow)",
    )


@pytest.fixture(scope="session")
def repo() -> Path:
    """The root of the meshbake checkout."""
    return REPO


# --- the session's one Debian base image ---------------------------------------------


@pytest.fixture(scope="session")
def base_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This session's meshbake cache: an empty ``base/``, where the session's one base
    image is built (tests/integration/test_base.py checks that build; the e2e bakes use
    it), and the default cache's ``artifacts/`` linked in, so that downloads (Envoy,
    Consul) stay shared between sessions. The base is removed at the end."""
    cache = tmp_path_factory.mktemp("meshbake-cache")
    artifacts = base.default_cache_dir() / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    (cache / "artifacts").symlink_to(artifacts)
    yield cache
    shutil.rmtree(cache / "base", ignore_errors=True)


@pytest.fixture(scope="session")
def base_builds(base_cache: Path) -> list[BaseImage]:
    """The session's base build, as two builds of the same key started together: the
    lock makes one wait and reuse. A work dir left by an "interrupted" earlier build is
    planted first; the build removes it. Whatever asks for the base first (the e2e
    bakes or tests/integration/test_base.py) starts this, so it is always a fresh build.
    """
    if os.geteuid() != 0:
        pytest.skip("building a base image needs root")
    stale = base_cache / "base" / f".build-debian-bookworm-{base.base_key()}-4g-stale"
    (stale / "root").mkdir(parents=True)
    (stale / "disk.raw").write_bytes(b"partial")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(base.build_base, base_cache, progress=print) for _ in range(2)]
        return [future.result() for future in futures]


@pytest.fixture(scope="session")
def session_base(base_builds: list[BaseImage]) -> BaseImage:
    """The session's one Debian base image (the build that was not a reuse)."""
    return next(image for image in base_builds if not image.reused)
