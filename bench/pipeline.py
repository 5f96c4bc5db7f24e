"""Measure meshbake's pipeline and the figures users care about. Not a test.

    .venv/bin/python bench/pipeline.py [--spec images/web.yaml] [--out bench/results.json]

It times each stage (render, validate, base cached, bake, no-op rebuild, verify), the
size of the first-boot user data, and compares the golden image's first boot (VM start
to mesh ready) with a bare boot of the same Debian base (VM start to SSH). The Consul
inside is the fixture release (a TEST DOUBLE), as in the test suite, unless
MESHBAKE_CONSUL_ZIP names a real zip. Results go to stdout as a Markdown table and to
--out as JSON, with the machine's core count and accelerator.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from builder.bake import base  # noqa: E402
from builder.bake.gates import validate_spec  # noqa: E402
from builder.bake.run import BuildOptions, build_image  # noqa: E402
from builder.render import cloudconfig  # noqa: E402
from builder.render.context import render_context  # noqa: E402
from builder.spec.model import Accelerator, load_spec  # noqa: E402
from builder.tools.packer import Packer  # noqa: E402
from builder.tools.qemu import choose_accelerator  # noqa: E402
from builder.verify.runner import boot_vm, verify_image, verify_user_data  # noqa: E402
from tests.fixtures.release import make_fixture_release, mesh_tokens  # noqa: E402


def timed(label: str, results: dict[str, float], fn):  # type: ignore[no-untyped-def]
    start = time.monotonic()
    value = fn()
    results[label] = round(time.monotonic() - start, 1)
    print(f"bench: {label}: {results[label]}s", file=sys.stderr)
    return value


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, default=REPO / "images" / "web.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument("--build-dir", type=Path, default=REPO / "build" / "bench")
    args = parser.parse_args()

    times: dict[str, float] = {}
    loaded = load_spec(args.spec)
    with tempfile.TemporaryDirectory() as tmp:
        timed("render", times, lambda: render_context(loaded, Path(tmp) / "ctx", packer=Packer()))
    report = timed("validate", times, lambda: validate_spec(args.spec))
    assert report.ok, [g.line() for g in report.gates]
    built_base = timed("base (cached after the first)", times, lambda: base.build_base())

    # Verify's first boot mints the VM's tokens in its own server (builder/verify/
    # localmesh.py); these stand in where no server is (the baked phase, the user data size).
    tokens = mesh_tokens([loaded.spec.service.name])
    release = make_fixture_release(
        Path(tempfile.mkdtemp(prefix="bench-fixture-")), loaded.spec.consul.version
    )
    options = BuildOptions(
        out=args.build_dir,
        consul_mirror=str(release.mirror),
        consul_key=release.key,
        consul_zip=Path(os.environ["MESHBAKE_CONSUL_ZIP"])
        if os.environ.get("MESHBAKE_CONSUL_ZIP")
        else None,
        force=True,
    )
    built = timed("bake (forced full build)", times, lambda: build_image(args.spec, options))
    noop = BuildOptions(**{**options.__dict__, "force": False})
    timed("no-op rebuild", times, lambda: build_image(args.spec, noop))
    assert built.output is not None

    verify = timed(
        "verify (two boots)",
        times,
        lambda: verify_image(built.output, spec=args.spec, token=tokens.agent),
    )
    baked, firstboot = verify.phases

    def bare_boot() -> float:
        with (
            tempfile.TemporaryDirectory() as work,
            boot_vm(
                built_base.path, Path(work), verify_user_data, Accelerator.AUTO, lambda m: None
            ) as vm,
        ):
            return round(time.monotonic() - vm.started, 1)

    bare = bare_boot()
    secrets = cloudconfig.Secrets(agent_token=tokens.agent)
    user_data = cloudconfig.first_boot_user_data(cloudconfig.carrier_values(loaded.spec, secrets))
    figures = {
        "cores": os.cpu_count(),
        "accelerator": choose_accelerator(Accelerator.AUTO).value,
        "stages_seconds": times,
        "build_manifest_stages": json.loads(built.manifest.read_text())["stages"]
        if built.manifest
        else {},
        "first_boot_user_data_bytes": len(user_data.encode()),
        "golden_image_bytes": built.output.stat().st_size,
        "golden_boot_to_ssh_seconds": baked.boot_to_ssh,
        "golden_vm_start_to_mesh_ready_seconds": firstboot.first_boot,
        "bare_base_boot_to_ssh_seconds": bare,
        "verify_ok": verify.ok,
    }
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print("| figure | value |\n|---|---|")
    for key, value in figures.items():
        print(f"| {key} | {value} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
