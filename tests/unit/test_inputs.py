"""Issue 16: every input besides the spec's strings (claims on meshbake's own units and
paths, ``--out``, CLI arguments, environment variables, files read and build folders)
is refused with one line and exit 1, or used as given; none writes outside its folder.

Each class is a table: one parametrised test sends every row through the real CLI or
the one function that guards it.
"""

from __future__ import annotations

import shutil
import typing
from pathlib import Path

import pytest

from builder.build import gates
from builder.cli import main as cli
from builder.render import baked as bake
from builder.render import paths
from builder.render.context import render_context
from builder.spec.model import LoadedSpec, load_spec
from tests.unit.test_boundary import Data, one_line_error, set_dest, write_spec


@pytest.fixture
def images(repo: Path, tmp_path: Path) -> Path:
    out = tmp_path / "images"
    shutil.copytree(repo / "images", out)
    return out


def set_app_name(name: str) -> typing.Callable[[Data], None]:
    def mutate(d: Data) -> None:
        d["app"]["name"] = name

    return mutate


# --- 2. a spec may not replace or change meshbake's own units and paths -------------------

#: (field, value) -> the render (and validate) refuses it naming the field.
CLAIMS: list[tuple[str, str]] = [
    *(("app.name", unit.removesuffix(".service")) for unit in paths.MESHBAKE_UNITS),
    ("app.name", "cloud-init"),
    ("app.name", "systemd-tmpfiles-setup"),
    ("app.name", "meshbake-extra"),
    ("app.name", "envoy-"),
    ("files[0].dest", "/etc/systemd/system/consul.service.d/override.conf"),
    ("files[0].dest", "/etc/systemd/system/envoy-sidecar.service.d/10-x.conf"),
    ("files[0].dest", "/etc/systemd/system/meshbake-imds.service.d/x.conf"),
    ("files[0].dest", "/etc/systemd/system/meshbake-fail-closed.service"),
    ("files[0].dest", "/etc/systemd/system/cloud-init.service.d/99-x.conf"),
    ("files[0].dest", "/usr/lib/systemd/system/consul.service.d/x.conf"),
    ("files[0].dest", "/lib/systemd/system/consul.service.d/x.conf"),
    ("files[0].dest", "/etc/systemd/system/service.d/x.conf"),
    ("files[0].dest", "/etc/systemd/system/envoy-.service.d/x.conf"),
    ("files[0].dest", "/etc/systemd/system/meshbake-.service.d/x.conf"),
    ("files[0].dest", "/etc/systemd/system.control/consul.service.d/x.conf"),
    ("files[0].dest", "/etc/tmpfiles.d/open.conf"),
    ("files[0].dest", "/usr/lib/tmpfiles.d/zz.conf"),
    ("files[0].dest", "/lib/tmpfiles.d/meshbake.conf"),
    ("files[0].dest", "/etc/sysctl.d/99-x.conf"),
    ("files[0].dest", "/etc/sysctl.conf"),
    ("files[0].dest", "/etc/systemd/system.conf.d/env.conf"),
    ("files[0].dest", "/etc/systemd/resolved.conf.d/other.conf"),
    ("files[0].dest", "/etc/cloud/cloud.cfg.d/99-x.cfg"),
    ("files[0].dest", "/etc/consul.d/tls/ca.pem"),
    ("files[0].dest", "/etc/envoy/bootstrap.json"),
    ("files[0].dest", "/var/lib/meshbake/x"),
    ("files[0].dest", "/var/lib/consul/x"),
    ("files[0].dest", "/bin/consul"),
    ("files[0].dest", "/usr/libexec/meshbake/extra"),
    ("files[0].dest", "/etc/environment"),
]


@pytest.mark.parametrize(("field", "value"), CLAIMS, ids=[v for _, v in CLAIMS])
def test_a_spec_cannot_claim_what_meshbake_installs(
    images: Path, capsys: pytest.CaptureFixture[str], field: str, value: str
) -> None:
    mutate = set_app_name(value) if field == "app.name" else set_dest(value)
    spec = write_spec(images, mutate)
    out = images.parent / "out"
    line = one_line_error(["render", str(spec), "--out", str(out)], capsys)
    assert f"{field}:" in line, line
    assert not out.exists()
    assert cli.main(["validate", str(spec)]) == 1


@pytest.mark.parametrize(
    "dest",
    [
        "/etc/systemd/system/web.service.d/10-limits.conf",
        "/etc/systemd/system/other.service",
        "/etc/consul.dx",
        "/srv/web/extra.html",
        "/etc/tmpfiles.dx",
    ],
)
def test_neighbours_of_what_meshbake_installs_are_allowed(images: Path, dest: str) -> None:
    loaded = load_spec(write_spec(images, set_dest(dest)))
    assert dest in [f.dest for f in bake.baked_files(loaded)]


def test_validate_fails_when_the_rendered_units_differ_from_the_spec(
    example: LoadedSpec, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = render_context(example, tmp_path / "ctx")
    ok = gates.gate_units(folder, example, None, tmp_path)  # type: ignore[arg-type]
    assert ok.ok, ok.detail
    # One unit missing, one extra: each is a failure.
    unit_dir = folder.rootfs / paths.rel(paths.UNIT_DIR)
    (unit_dir / "meshbake-warm.service").unlink()
    gone = gates.gate_units(folder, example, None, tmp_path)  # type: ignore[arg-type]
    assert not gone.ok and "meshbake-warm.service" in gone.detail
    # An app that takes a meshbake unit's name, had the name check let it through.
    monkeypatch.setattr(paths, "app_unit_problem", lambda name: None)
    taken = load_spec(write_spec(images, set_app_name("consul")))
    folder = render_context(taken, tmp_path / "ctx2")
    report = gates.gate_units(folder, taken, None, tmp_path)  # type: ignore[arg-type]
    assert not report.ok and "consul.service would be rendered twice" in report.detail
