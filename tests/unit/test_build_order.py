"""The Consul<->Envoy compatibility check runs before anything is downloaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from builder.bake import artifacts
from builder.bake.run import BuildOptions, build_image
from builder.errors import SpecError


def test_unsupported_pair_stops_before_any_download(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = tmp_path / "images"
    shutil.copytree(repo / "images", images)
    spec = images / "web.yaml"
    data = yaml.safe_load(spec.read_text())
    data["envoy"]["version"] = "1.30.0"
    spec.write_text(yaml.safe_dump(data))
    fetched: list[str] = []
    monkeypatch.setattr(artifacts, "fetch_consul", lambda *a, **k: fetched.append("consul"))
    monkeypatch.setattr(artifacts, "fetch_envoy", lambda *a, **k: fetched.append("envoy"))
    with pytest.raises(
        SpecError, match=r"envoy\.version: Consul 2\.1\.0 refuses Envoy 1\.30\.0: .*1\.35-1\.38"
    ):
        build_image(spec, BuildOptions(out=tmp_path / "out", cache=tmp_path / "cache"))
    assert fetched == []
    assert not (tmp_path / "out").exists()
