"""Integration-test wiring: the AWS doubles (tests/fixtures/aws.py) as fixtures here,
and the table of in-image paths that the scripts read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.render import paths
from tests.fixtures.aws import fake_imds, moto, moto_server

__all__ = ["fake_imds", "moto", "moto_server", "paths_env"]


@pytest.fixture(scope="session", autouse=True)
def paths_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``paths.env`` as the image has it, named by ``MESHBAKE_PATHS_ENV`` for every
    script a test runs from the checkout (which has no ``/etc/meshbake/paths.env``)."""
    rendered = tmp_path_factory.mktemp("paths") / "paths.env"
    rendered.write_text(paths.paths_env())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MESHBAKE_PATHS_ENV", str(rendered))
        yield rendered
