"""The static gates, run with the real tools: the worked example passes every one, and
each gate fails on an input broken on purpose."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from builder import proc
from builder.bake.gates import (
    gate_cloud_init_schema,
    gate_packer_fmt,
    gate_packer_validate,
    gate_shellcheck,
    gate_systemd_analyze,
    shellcheck,
    systemd_verify,
    validate_spec,
)
from builder.errors import ToolNotFound
from builder.render.context import BakeFolder, render_context
from builder.spec.model import LoadedSpec, load_spec
from builder.tools.packer import Packer

pytestmark = pytest.mark.integration

ALL_GATES = [
    "spec",
    "consul/envoy",
    "render",
    "packer fmt -check",
    "packer validate",
    "cloud-init schema",
    "shellcheck",
    "systemd-analyze verify",
    "units",
]


@pytest.fixture(scope="module")
def loaded(repo: Path) -> LoadedSpec:
    return load_spec(repo / "images" / "web.yaml")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    out = tmp_path / "work"
    out.mkdir()
    return out


@pytest.fixture
def ctx(loaded: LoadedSpec, tmp_path: Path) -> BakeFolder:
    """The example's context, packer fmt-ed by the real Packer as ``render`` does."""
    return render_context(loaded, tmp_path / "ctx", packer=Packer())


def test_example_passes_every_gate(repo: Path) -> None:
    report = validate_spec(repo / "images" / "web.yaml")
    assert [g.name for g in report.gates] == ALL_GATES
    failed = [g.line() for g in report.gates if g.ok is not True]
    assert not failed, "\n".join(failed)
    assert report.ok
    assert report.warnings == []
    # retry_join: provider=aws opens IMDS to the consul user: one line says so.
    (note,) = report.notes
    assert "retry_join[0]" in note and "consul user" in note


def test_broken_spec_fails_the_spec_gate(tmp_path: Path) -> None:
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: Web!\n")
    report = validate_spec(spec)
    assert not report.ok
    (gate,) = report.gates
    assert gate.name == "spec"
    assert gate.ok is False
    assert f"{spec}: name: 'Web!' is not a lowercase name" in gate.detail


# --- packer ----------------------------------------------------------------------------


def test_packer_validate_rejects_bad_hcl(ctx: BakeFolder, loaded: LoadedSpec, work: Path) -> None:
    packer = Packer()
    assert gate_packer_validate(ctx, loaded, packer, work).ok is True
    (ctx.packer_dir / "broken.pkr.hcl").write_text('source "qemu" "x" {\n  cpus = \n')
    again = work / "again"  # a fresh folder: ssh-keygen would ask before overwriting a key
    again.mkdir()
    gate = gate_packer_validate(ctx, loaded, packer, again)
    assert gate.ok is False
    assert "broken.pkr.hcl" in gate.detail
    assert packer.validate(ctx.packer_dir).ok is False


def test_packer_validate_rejects_an_unknown_attribute(
    ctx: BakeFolder, loaded: LoadedSpec, work: Path
) -> None:
    sources = ctx.packer_dir / "sources.pkr.hcl"
    sources.write_text(sources.read_text().replace("headless", "headles"))
    gate = gate_packer_validate(ctx, loaded, Packer(), work)
    assert gate.ok is False
    assert "headles" in gate.detail


def test_packer_fmt_check_rejects_unformatted_hcl(
    ctx: BakeFolder, loaded: LoadedSpec, work: Path
) -> None:
    packer = Packer()
    assert gate_packer_fmt(ctx, loaded, packer, work).ok is True
    (ctx.packer_dir / "ugly.pkr.hcl").write_text('locals {\nx = "a"\n      yy="b"\n}\n')
    gate = gate_packer_fmt(ctx, loaded, packer, work)
    assert gate.ok is False
    assert "ugly.pkr.hcl" in gate.detail


def test_unformatted_render_is_caught_by_fmt_check(
    loaded: LoadedSpec, tmp_path: Path, work: Path
) -> None:
    # Without a Packer binary, render_context leaves the Builder's own layout.
    raw = render_context(loaded, tmp_path / "raw")
    assert gate_packer_fmt(raw, loaded, Packer(), work).ok is False


# --- cloud-init --------------------------------------------------------------------------


def test_cloud_init_schema_rejects_a_bad_document(
    ctx: BakeFolder, loaded: LoadedSpec, work: Path
) -> None:
    assert gate_cloud_init_schema(ctx, loaded, Packer(), work).ok is True
    seed = ctx.seed_dir / "user-data"
    seed.write_text("#cloud-config\nusers: 5\nwrite_files:\n- path: /x\n  bogus: 1\n")
    gate = gate_cloud_init_schema(ctx, loaded, Packer(), work)
    assert gate.ok is False
    assert gate.detail.startswith("user-data: ")
    assert "bogus" in gate.detail


def test_cloud_init_schema_rejects_bad_yaml(
    ctx: BakeFolder, loaded: LoadedSpec, work: Path
) -> None:
    (ctx.root / "cloudinit" / "first-boot.tftpl").write_text("#cloud-config\nfoo: [\n")
    gate = gate_cloud_init_schema(ctx, loaded, Packer(), work)
    assert gate.ok is False
    assert "first-boot.tftpl" in gate.detail


# --- shellcheck -----------------------------------------------------------------------


def test_shellcheck_rejects_a_bad_script(tmp_path: Path) -> None:
    good = tmp_path / "good.sh"
    good.write_text('#!/bin/sh\nset -eu\nprintf "%s\\n" "$1"\n')
    assert shellcheck([good]) == []
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/sh\nfor f in $(ls $1); do echo $f; done\n")
    findings = shellcheck([bad])
    assert findings
    assert all(line.startswith(f"{bad}:") for line in findings)
    assert any("SC2045" in line or "SC2086" in line for line in findings)


def test_shellcheck_gate_rejects_a_bad_stage_script(
    ctx: BakeFolder, loaded: LoadedSpec, work: Path
) -> None:
    assert gate_shellcheck(ctx, loaded, Packer(), work).ok is True
    finalize = ctx.stage_dir / "scripts" / "meshbake-finalize"
    finalize.write_text(finalize.read_text() + "\nrm -rf $TARGET/*\n")
    gate = gate_shellcheck(ctx, loaded, Packer(), work)
    assert gate.ok is False
    assert "meshbake-finalize" in gate.detail


# --- systemd-analyze -----------------------------------------------------------------


def write_unit(folder: Path, name: str, service: str) -> Path:
    unit = folder / name
    unit.write_text(f"[Unit]\nDescription=test unit\n\n[Service]\n{service}\n")
    return unit


def test_systemd_verify_accepts_a_good_unit(tmp_path: Path) -> None:
    unit = write_unit(tmp_path, "good.service", "Type=oneshot\nExecStart=/bin/true")
    assert systemd_verify([unit], tmp_path / "rootfs", tmp_path / "scratch") == ""


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("ExecStart=/bin/true\nFrobnicate=yes", "Frobnicate"),
        ("ExecStart=/bin/true\nRestart=sometimes", "sometimes"),
        ("Type=oneshot", "ExecStart"),
    ],
    ids=["unknown directive", "bad value", "no ExecStart"],
)
def test_systemd_verify_rejects_a_bad_unit(tmp_path: Path, service: str, expected: str) -> None:
    unit = write_unit(tmp_path, "bad.service", service)
    stderr = systemd_verify([unit], tmp_path / "rootfs", tmp_path / "scratch")
    assert stderr
    assert expected in stderr


def test_systemd_gate_rejects_a_bad_rendered_unit(
    ctx: BakeFolder, loaded: LoadedSpec, work: Path
) -> None:
    assert gate_systemd_analyze(ctx, loaded, Packer(), work).ok is True
    (unit,) = [u for u in ctx.units() if u.name == "envoy-sidecar.service"]
    unit.write_text(unit.read_text().replace("Restart=always", "Restart=sometimes"))
    gate = gate_systemd_analyze(ctx, loaded, Packer(), work / "again")
    assert gate.ok is False
    assert "sometimes" in gate.detail


# --- missing tools ---------------------------------------------------------------------


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", os.fspath(empty))


@pytest.mark.usefixtures("empty_path")
def test_missing_tool_names_its_debian_package() -> None:
    with pytest.raises(ToolNotFound) as info:
        proc.run(["packer", "version"])
    assert str(info.value) == "packer not found: install it with 'apt-get install packer'"
    with pytest.raises(ToolNotFound, match="apt-get install systemd"):
        proc.run(["systemd-analyze", "--version"])


@pytest.mark.usefixtures("empty_path")
def test_missing_tool_fails_a_gate_without_raising(repo: Path) -> None:
    report = validate_spec(repo / "images" / "web.yaml")
    assert not report.ok
    render = report.gates[-1]
    assert render.name == "render"
    assert render.ok is False
    assert "packer not found" in render.detail
