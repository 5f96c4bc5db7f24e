"""End-to-end fixtures: bake images/web.yaml once per session with the real pipeline.

The Consul inside is the fixture release (a TEST DOUBLE, see tests/fixtures), unless
MESHBAKE_CONSUL_ZIP names a real Consul zip. Envoy, Packer, qemu, cloud-init and the
Debian base are all real. ``MESHBAKE_E2E_OUT`` keeps the build folder between runs
(useful while developing: a second session reuses the image through the no-op path).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.build.run import BuildOptions, BuildResult, build_image
from tests.fixtures.release import FixtureRelease
from tests.paths import REPO

SPEC = REPO / "images" / "web.yaml"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e" in str(item.path):
            item.add_marker(pytest.mark.image)


@pytest.fixture(scope="session")
def e2e_options(
    fixture_release: FixtureRelease, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BuildOptions]:
    if os.geteuid() != 0:
        pytest.fail("the end-to-end tests bake with loop devices and need root")
    keep = os.environ.get("MESHBAKE_E2E_OUT")
    out = Path(keep) if keep else tmp_path_factory.mktemp("e2e") / "web"
    yield BuildOptions(
        out=out,
        consul_mirror=str(fixture_release.mirror),
        consul_key=fixture_release.key,
        consul_zip=fixture_release.zip_override,
    )
    if not keep:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def built(e2e_options: BuildOptions) -> BuildResult:
    """The web image, baked for real (TCG here: a few minutes)."""
    return build_image(SPEC, e2e_options)


@pytest.fixture(scope="session")
def golden_image(built: BuildResult) -> Path:
    assert built.output is not None and built.output.is_file()
    return built.output
