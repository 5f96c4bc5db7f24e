"""The whole round: bake images/web.yaml into a qcow2, rebuild as a no-op, boot it twice
(no token; then the minimal user data) and prove it with the shipped Testinfra suites.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from builder.build.run import BuildOptions, BuildResult, build_image, sha256_file
from builder.verify.runner import verify_image

from .conftest import SPEC


def test_build_writes_image_and_manifest(built: BuildResult) -> None:
    assert built.status in ("built", "up-to-date")
    assert built.output is not None and built.manifest is not None
    manifest = json.loads(built.manifest.read_text())
    assert manifest["image"] == "web"
    assert manifest["output"]["sha256"] == sha256_file(built.output)
    assert {a["name"] for a in manifest["artifacts"]} == {"consul", "envoy"}
    assert all(len(a["sha256"]) == 64 for a in manifest["artifacts"])
    assert manifest["versions"]["consul"] == "1.22.1"
    assert manifest["versions"]["envoy"] == "1.38.3"
    assert manifest["versions"]["packer"]
    assert manifest["base"]["id"] and len(manifest["base"]["sha256"]) == 64
    for stage in ("download", "validate", "base", "render", "bake"):
        assert stage in manifest["stages"], stage
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(built.output)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(info.stdout)["format"] == "qcow2"


def test_no_workdir_or_partial_output_left(built: BuildResult) -> None:
    assert built.output is not None
    leftovers = [p.name for p in built.output.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_second_build_is_a_noop(built: BuildResult, e2e_options: BuildOptions) -> None:
    again = build_image(SPEC, e2e_options)
    assert again.status == "up-to-date"
    assert again.output == built.output


@pytest.fixture(scope="module")
def report(golden_image: Path):  # type: ignore[no-untyped-def]
    return verify_image(golden_image, spec=SPEC)


def test_verify_both_phases_pass(report) -> None:  # type: ignore[no-untyped-def]
    assert [p.phase for p in report.phases] == ["baked", "firstboot"]
    failures = [
        (p.phase, c.name, c.message[:300])
        for p in report.phases
        for c in p.checks
        if c.outcome not in ("passed", "skipped")
    ]
    errors = [(p.phase, p.error) for p in report.phases if p.error]
    assert not errors and not failures, report.summary()
    assert report.ok


def test_verify_reports_timings(report) -> None:  # type: ignore[no-untyped-def]
    baked, firstboot = report.phases
    assert baked.boot_to_ssh is not None and baked.boot_to_ssh > 0
    assert firstboot.first_boot is not None and firstboot.first_boot > 0
    assert len(baked.checks) >= 10 and len(firstboot.checks) >= 8
