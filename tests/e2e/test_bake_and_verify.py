"""The whole round, for both examples (web: Consul 2.1 with nftables; api: Consul 2.0
with iptables, failing closed): bake a qcow2, rebuild as a no-op, boot it twice (no
token; then the minimal user data) and prove it with the shipped Testinfra suites: at
first boot, connections cross the real Envoy behind the Consul double both ways, and
the report says so with Envoy's own counters and a first-boot timeline.
"""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from builder.bake.run import BuildResult, build_image
from builder.digest import sha256_file
from builder.verify.runner import VerifyReport, verify_image

from .conftest import EXAMPLES, VM_CPUS, Example, mesh_for, selected_params


@pytest.fixture(scope="module", params=EXAMPLES)
def example(request: pytest.FixtureRequest, bake: Callable[[str], Example]) -> Example:
    return bake(request.param)


@pytest.fixture(scope="module")
def built(example: Example) -> BuildResult:
    return example.built


def test_build_writes_image_and_manifest(built: BuildResult, example: Example) -> None:
    assert built.status in ("built", "up-to-date")
    assert built.output is not None and built.manifest is not None
    manifest = json.loads(built.manifest.read_text())
    assert manifest["image"] == example.spec.stem
    assert manifest["output"]["sha256"] == sha256_file(built.output)
    assert {a["name"] for a in manifest["artifacts"]} == {"consul", "envoy"}
    assert all(len(a["sha256"]) == 64 for a in manifest["artifacts"])
    spec = yaml.safe_load(example.spec.read_text())
    assert manifest["versions"]["consul"] == spec["consul"]["version"]
    assert manifest["versions"]["envoy"] == spec["envoy"]["version"]
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


def test_second_build_is_a_noop(built: BuildResult, example: Example) -> None:
    again = build_image(example.spec, example.options)
    assert again.status == "up-to-date"
    assert again.output == built.output


@pytest.fixture(scope="module")
def reports(
    request: pytest.FixtureRequest, bake: Callable[[str], Example], vm_pool: ThreadPoolExecutor
) -> dict[str, Future[VerifyReport]]:
    """The verify of each selected example, started as soon as it is baked: the next
    example bakes while the first one verifies."""
    started = {}
    for name in selected_params(request, "test_bake_and_verify", "example"):
        example = bake(name)
        assert example.built.output is not None
        # First boot joins a local mesh whose server, from the image's own Consul zip,
        # mints the tokens the first boot delivers.
        started[name] = vm_pool.submit(
            verify_image,
            example.built.output,
            spec=example.spec,
            mesh_inputs=mesh_for(example.built.output, example.options),
            cpus=VM_CPUS,
        )
    return started


@pytest.fixture(scope="module")
def report(example: Example, reports: dict[str, Future[VerifyReport]]) -> VerifyReport:
    return reports[example.spec.stem].result()


def test_verify_both_phases_pass(report: VerifyReport) -> None:
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


def test_verify_reports_timings(report: VerifyReport) -> None:
    baked, firstboot = report.phases
    assert baked.boot_to_ssh is not None and baked.boot_to_ssh > 0
    assert firstboot.first_boot is not None and firstboot.first_boot > 0
    assert len(baked.checks) >= 10 and len(firstboot.checks) >= 8


def test_report_counts_connections_through_envoy(report: VerifyReport) -> None:
    firstboot = report.phases[1]
    figures = {c.name: c.figures for c in firstboot.checks}
    inbound = figures["test_inbound_crosses_the_sidecar"]["inbound_connections"]
    outbound = figures["test_outbound_crosses_the_sidecar"]["outbound_connections"]
    assert inbound >= 1 and outbound >= 1, report.summary()
    # Nothing traffic checked was skipped: every check ran for real.
    skipped = [c.name for c in firstboot.checks if c.outcome == "skipped"]
    assert not skipped, report.summary()
    assert firstboot.figures["probe_connections_proxied"] >= 1, firstboot.figures
    assert firstboot.figures["vm_start_to_first_proxied_s"] > 0, firstboot.figures


def test_report_has_the_first_boot_timeline_and_plot(report: VerifyReport) -> None:
    firstboot = report.phases[1]
    t = firstboot.timeline
    slack = t["clock_uncertainty"] or 0.0
    order = [
        "vm_start",
        "cloud_init_network_done",
        "meshbake_firstboot_done",
        "consul_active",
        "sidecar_active",
        "first_proxied_connection",
    ]
    values = [t[k] for k in order]
    assert all(v is not None for v in values), t
    # systemd's own order (the units are ordered After= each other), and the first
    # proxied connection after the sidecar started (within the clock mapping's slack).
    assert values[:5] == sorted(values[:5]), t
    assert values[5] + slack >= values[4], t
    assert firstboot.figures["network_stage_to_first_proxied_s"] > 0, firstboot.figures
    assert firstboot.plot is not None
    assert "<svg" in Path(firstboot.plot).read_text()[:2000]


def test_junit_has_both_phases(report: VerifyReport) -> None:
    root = ET.fromstring(report.to_junit())
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert set(suites) == {"baked", "firstboot"}
    for phase in report.phases:
        assert suites[phase.phase].get("tests") == str(len(phase.checks))
        assert suites[phase.phase].get("failures") == "0"


def test_sidecar_down_fails_open_or_closed_as_the_spec_says(
    report: VerifyReport, example: Example
) -> None:
    spec = yaml.safe_load(example.spec.read_text())
    fail_closed = spec["service"].get("transparent_proxy", {}).get("fail_closed", False)
    firstboot = report.phases[1]
    (down,) = [c for c in firstboot.checks if c.name == "test_sidecar_down"]
    assert down.outcome == "passed", report.summary()
    assert down.figures["answered_with_sidecar_down"] == (0 if fail_closed else 1), down.figures
