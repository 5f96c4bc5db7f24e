"""First boot, measured the way verify measures it: from VM start to the first
connection that crossed the sidecar. Not a test.

    .venv/bin/python bench/firstboot.py [--spec images/web.yaml] [--image IMAGE] [--rounds 3]

Each round boots, in an order that rotates from round to round so that a warm or busy
machine favours no one:

- golden: the golden image with the minimal first-boot user data; VM start to the
  first proxied connection (a probe connects to the service port through a qemu
  forward every half second, and Envoy's own counter says which connection was the
  first to cross it), and meshbake's own share: the end of cloud-init's network stage
  to that connection, on the guest's systemd clock;
- bare: the same Debian base booted with no mesh, until cloud-init is done;
- install-at-boot: the same base, with user data that installs everything at boot from
  a mirror on this host's loopback (bench/install_at_boot.py), to the first proxied
  connection.

Medians go to stdout as a Markdown table and to ``--out`` as JSON with every sample.
The Consul inside is the fixture release (a TEST DOUBLE); Envoy is real. The golden and
install-at-boot ways boot into the local mesh of verify's first boot
(``install_at_boot.mesh_vm``): their agent joins a server there and is ready only then,
with the tokens an operator minted for the VM, and the probe is a mesh client that an
intention allows (mutual TLS), as the sidecar's public listener takes no other. Without
``--image`` the spec is baked first (into build/bench/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from install_at_boot import ExtraFor, mesh_vm, prepare, say  # noqa: E402

from builder.bake import base  # noqa: E402
from builder.bake.run import BuildOptions, build_image  # noqa: E402
from builder.render import cloudconfig  # noqa: E402
from builder.spec.model import Accelerator, LoadedSpec, load_spec  # noqa: E402
from builder.tools.qemu import choose_accelerator  # noqa: E402
from builder.verify.localmesh import MeshInputs  # noqa: E402
from builder.verify.runner import (  # noqa: E402
    Vm,
    _envoy_counter,
    _poll,
    boot_vm,
    first_boot_timeline,
    verify_user_data,
)
from tests.fixtures.release import FixtureRelease, make_fixture_release  # noqa: E402

#: Envoy's counters of connections to the app, and of those that failed to connect.
APP_CX = "cluster.local_app.upstream_cx_total"
APP_CONNECT_FAIL = "cluster.local_app.upstream_cx_connect_fail"

Sample = dict[str, float | None]


def first_proxied(
    image: Path,
    loaded: LoadedSpec,
    inputs: MeshInputs,
    extra_for: ExtraFor,
    mirror: Path | None = None,
    timeout: float = 900,
) -> Sample:
    """Boot ``image`` into the local mesh with the user data of ``extra_for``; VM start
    to the first proxied connection."""
    with mesh_vm(image, loaded, inputs, extra_for, mirror=mirror, probe=True) as booted:
        vm, probe = booted.vm, booted.probe
        assert probe is not None

        # Connections Envoy took before the app listened (install-at-boot starts both at
        # once) were never answered: count only those Envoy got through to the app.
        def reached() -> int:
            total = _envoy_counter(vm, APP_CX) or 0
            return total - (_envoy_counter(vm, APP_CONNECT_FAIL) or 0)

        deadline = time.monotonic() + timeout
        while reached() <= 0:
            if time.monotonic() > deadline:
                return {"vm_start_to_first_proxied_s": None}
            time.sleep(1)
        # The probe is a mesh client: only the sidecar's public listener answers it, so
        # its first answered connection is the first that crossed the sidecar.
        answered = probe.stop()
        first = answered[0] if answered else None
        timeline = first_boot_timeline(vm, first)
    network, crossed = (
        timeline.get("cloud_init_network_done"),
        timeline.get("first_proxied_connection"),
    )
    return {
        "vm_start_to_first_proxied_s": None if first is None else round(first - vm.started, 1),
        "network_stage_to_first_proxied_s": (
            None if network is None or crossed is None else round(crossed - network, 1)
        ),
        "first_boot_unit_to_sidecar_active_s": _span(
            timeline, "meshbake_firstboot_done", "sidecar_active"
        ),
    }


def _span(timeline: dict[str, float | None], start: str, end: str) -> float | None:
    a, b = timeline.get(start), timeline.get(end)
    return None if a is None or b is None else round(b - a, 1)


def bare(base_image: Path) -> Sample:
    """The base with no mesh: VM start until cloud-init is done."""
    with (
        tempfile.TemporaryDirectory(prefix="meshbake-bench-") as work,
        boot_vm(base_image, Path(work), verify_user_data, Accelerator.AUTO, say) as vm,
    ):
        done = _until(vm, "cloud-init status --wait >/dev/null 2>&1; echo done", "done")
    return {"vm_start_to_cloud_init_done_s": done}


def _until(vm: Vm, command: str, want: str) -> float | None:
    if _poll(vm, command, want, time.monotonic() + 900):
        return round(time.monotonic() - vm.started, 1)
    return None


def golden_image(spec: Path, given: Path | None, release: FixtureRelease) -> Path:
    if given is not None:
        return given
    options = BuildOptions(
        out=REPO / "build" / "bench" / spec.stem,
        consul_mirror=str(release.mirror),
        consul_key=release.key,
    )
    built = build_image(spec, options)
    assert built.output is not None, built.status
    return built.output


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, default=REPO / "images" / "web.yaml")
    parser.add_argument("--image", type=Path, help="a golden image of --spec (default: bake it)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results-firstboot.json")
    args = parser.parse_args()
    loaded = load_spec(args.spec)
    at_boot = prepare(loaded, Path(tempfile.mkdtemp(prefix="bench-at-boot-")))
    # The golden image's Consul is the same fixture release as the install's, so the
    # mesh's server (the image's own Consul, as in verify) serves both ways.
    release = make_fixture_release(
        Path(tempfile.mkdtemp(prefix="bench-fixture-")), loaded.spec.consul.version
    )
    image = golden_image(args.spec, args.image, release)
    inputs = MeshInputs(release.zip_path, at_boot.inputs.envoy)
    base_image = base.build_base().path

    def golden_extra(values: Mapping[str, str], url: str) -> dict[str, Any]:
        return cloudconfig.first_boot_document(values)

    ways: dict[str, Callable[[], Sample]] = {
        "golden": lambda: first_proxied(image, loaded, inputs, golden_extra),
        "bare": lambda: bare(base_image),
        "install-at-boot": lambda: first_proxied(
            base_image, loaded, at_boot.inputs, at_boot.extra, at_boot.mirror
        ),
    }
    samples: dict[str, list[Sample]] = {name: [] for name in ways}
    names = list(ways)
    for round_ in range(args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            say(f"round {round_ + 1}/{args.rounds}: {name}")
            samples[name].append(ways[name]())
            say(f"{name}: {samples[name][-1]}")

    medians: dict[str, dict[str, float | None]] = {}
    for name, runs in samples.items():
        keys = sorted({k for run in runs for k in run})
        medians[name] = {}
        for key in keys:
            values_ = [v for run in runs if (v := run.get(key)) is not None]
            medians[name][key] = round(statistics.median(values_), 1) if values_ else None
    result = {
        "cores": os.cpu_count(),
        "accelerator": choose_accelerator(Accelerator.AUTO).value,
        "spec": str(args.spec.relative_to(REPO) if args.spec.is_relative_to(REPO) else args.spec),
        "rounds": args.rounds,
        "medians": medians,
        "samples": samples,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| way | figure | median |\n|---|---|---|")
    for name, figures in medians.items():
        for key, value in figures.items():
            print(f"| {name} | {key} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
