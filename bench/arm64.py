"""Measure the local arm64 path once, under TCG on this x86 machine. Not a test.

    sudo .venv/bin/python bench/arm64.py [--stages base,bake,verify] [--out F]

Stages, each timed and merged into --out (default bench/results-arm64.json), so a run
of one stage keeps the figures of the others:

- ``base``: the arm64 Debian base (mmdebstrap through qemu-user, GPT + EFI grub) in
  meshbake's cache; ``reused`` in the results says whether it was a cache hit (then
  the figure is no build time: remove the cached file first);
- ``base-boot``: a bare boot of that base under qemu-system-aarch64 (UEFI, TCG), VM
  start to SSH, as verify boots it (``boot_vm``);
- ``bake``: ``meshbake build images/api.yaml --arch arm64`` on that base (Packer's
  qemu builder running qemu-system-aarch64, TCG);
- ``verify``: ``meshbake verify`` of the baked qcow2, phase ``baked`` and then
  ``firstboot`` (into the local mesh, whose server and upstreams run the host's amd64
  binaries), each with its time to SSH from the verify's own timeline.

The Consul inside is the fixture release (a TEST DOUBLE), as in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from builder.bake import base  # noqa: E402
from builder.bake.run import BuildOptions, build_image  # noqa: E402
from builder.cli.main import mesh_inputs  # noqa: E402
from builder.spec.model import Accelerator, Arch  # noqa: E402
from builder.verify.runner import boot_vm, ssh_run, verify_image, verify_user_data  # noqa: E402
from tests.fixtures.release import make_fixture_release  # noqa: E402

SPEC = REPO / "images" / "api.yaml"

STAGES = ("base", "base-boot", "bake", "verify")


def _load(path: Path) -> dict[str, object]:
    if path.is_file():
        data = json.loads(path.read_text())
        assert isinstance(data, dict)
        return data
    return {}


def _save(path: Path, results: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def bench_base(cache: Path) -> dict[str, object]:
    start = time.monotonic()
    built = base.build_base(cache, arch=Arch.ARM64, progress=lambda m: print(m, file=sys.stderr))
    seconds = round(time.monotonic() - start, 1)
    return {
        "command": f"build_base({cache}, arch=Arch.ARM64) (meshbake base --arch arm64)",
        "seconds": seconds,
        "reused": built.reused,
        "path": str(built.path),
        "size_bytes": built.path.stat().st_size,
        "sha256": built.sha256,
    }


def bench_base_boot(cache: Path) -> dict[str, object]:
    image = base.build_base(cache, arch=Arch.ARM64).path
    with (
        tempfile.TemporaryDirectory(prefix="bench-arm64-boot-") as work,
        boot_vm(
            image,
            Path(work),
            verify_user_data,
            Accelerator.AUTO,
            lambda m: print(m, file=sys.stderr),
            arch=Arch.ARM64,
        ) as vm,
    ):
        to_ssh = round(time.monotonic() - vm.started, 1)
        _, uname = ssh_run(vm, "uname -rm")
        _, efi = ssh_run(vm, "test -d /sys/firmware/efi && echo uefi || echo bios")
    return {
        "command": "boot_vm(<arm64 base>, arch=Arch.ARM64) from bench/arm64.py",
        "boot_to_ssh": to_ssh,
        "uname": uname.strip(),
        "firmware": efi.strip(),
    }


def bench_bake(cache: Path, out: Path) -> dict[str, object]:
    """api's arm64 bake with its Consul as the fixture release (a TEST DOUBLE): an arm64
    zip for the image and an amd64 one for verify's mesh on this host. The release (and
    its throwaway key) goes once the bake is done; both zips stay in the cache."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fixture-release-", dir=out.parent) as folder:
        release = make_fixture_release(Path(folder), "2.0.0", also=("arm64",))
        options = BuildOptions(
            out=out,
            consul_mirror=str(release.mirror),
            consul_key=release.key,
            cache=cache,
            arch="arm64",
            force=True,
        )
        start = time.monotonic()
        result = build_image(SPEC, options, progress=lambda m: print(m, file=sys.stderr))
        seconds = round(time.monotonic() - start, 1)
    assert result.output is not None and result.manifest is not None
    manifest = json.loads(result.manifest.read_text())
    return {
        "command": f"meshbake build images/api.yaml --arch arm64 --out {out} --force"
        " (fixture Consul mirror)",
        "seconds": seconds,
        "status": result.status,
        "stages": manifest["stages"],
        "accelerator": manifest["accelerator"],
        "output": str(result.output),
        "size_bytes": result.output.stat().st_size,
    }


def bench_verify(cache: Path, out: Path) -> dict[str, object]:
    image = out / "api-arm64.qcow2"
    mesh = mesh_inputs(image, None, None, cache)
    phases: dict[str, object] = {}
    for phase in ("baked", "firstboot"):
        start = time.monotonic()
        report = verify_image(
            image,
            spec=SPEC,
            phases=(phase,),
            mesh_inputs=mesh,
            progress=lambda m: print(m, file=sys.stderr),
        )
        seconds = round(time.monotonic() - start, 1)
        (result,) = report.phases
        outcomes: dict[str, int] = {}
        for check in result.checks:
            outcomes[check.outcome] = outcomes.get(check.outcome, 0) + 1
        phases[phase] = {
            "command": f"meshbake verify {image} --phase {phase}",
            "seconds": seconds,
            "ok": result.ok,
            "boot_to_ssh": result.boot_to_ssh,
            "first_boot_mesh_ready": result.first_boot,
            "figures": result.figures,
            "timeline": result.timeline,
            "checks": outcomes,
            "error": result.error,
            "failed": [
                f"{c.name}: {c.message.splitlines()[0] if c.message else ''}"
                for c in result.checks
                if c.outcome in ("failed", "error")
            ],
        }
    return phases


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results-arm64.json")
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="meshbake's cache folder (default: meshbake's own, /var/cache/meshbake for root)",
    )
    parser.add_argument("--build-dir", type=Path, default=REPO / "build" / "bench-arm64")
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")

    results = _load(args.out)
    results["machine"] = {
        "cores": os.cpu_count(),
        "host": platform.machine(),
        "accelerator": "tcg (qemu-system-aarch64 on an x86 host)",
    }
    cache = args.cache or base.default_cache_dir()
    out = args.build_dir / "api"
    for stage in stages:
        print(f"bench: {stage} ...", file=sys.stderr)
        if stage == "base":
            figure = bench_base(cache)
        elif stage == "base-boot":
            figure = bench_base_boot(cache)
        elif stage == "bake":
            figure = bench_bake(cache, out)
        else:
            figure = bench_verify(cache, out)
        figure["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        results[stage] = figure
        _save(args.out, results)
        print(f"bench: {stage}: {json.dumps(figure)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
