"""A broken image fails as fast as a good one passes: ``meshbake verify`` of a good
image against a copy whose sidecar is fenced. Not a test.

    sudo .venv/bin/python bench/broken_verify.py [--spec images/web.yaml] [--image IMAGE]

The copy is made the way tests/e2e/test_broken_image.py makes its broken images (the
good qcow2 converted to raw, its root file system mounted through a loop device, edited,
converted back), with one edit: a drop-in ``IPAddressDeny=any`` on
``envoy-sidecar.service``, so the sidecar can reach nothing, not even the agent on
loopback, and restarts for ever. Each image is verified by the CLI as a user runs it
(``python -m builder verify IMAGE --spec SPEC --phase firstboot``); the wall-clock time,
the exit code and the failed checks of each go to stdout as a Markdown table and to
``--out`` as JSON. Needs root (losetup, mount) and a VM (qemu). Without ``--image`` the
spec is baked first (into build/bench/), as bench/firstboot.py does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from firstboot import golden_image  # noqa: E402

from builder.cli.main import mesh_inputs  # noqa: E402
from builder.spec.model import load_spec  # noqa: E402
from builder.verify.localmesh import MeshInputs  # noqa: E402
from tests.e2e.test_broken_image import edited_copy, fence_sidecar, raw_disk  # noqa: E402
from tests.fixtures.release import make_fixture_release  # noqa: E402


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def timed_verify(
    image: Path, spec: Path, phases: list[str], report: Path, mesh: MeshInputs
) -> dict[str, Any]:
    """``meshbake verify`` of ``image``: seconds, exit code and the checks that failed.
    The copy has no manifest beside it, so both get the good image's Consul zip and
    Envoy for verify's local mesh."""
    argv = [sys.executable, "-m", "builder", "verify", str(image), "--spec", str(spec)]
    argv += ["--consul-zip", str(mesh.consul_zip), "--envoy", str(mesh.envoy)]
    argv += [arg for phase in phases for arg in ("--phase", phase)]
    argv += ["--report", str(report)]
    say(f"verify {image}")
    started = time.monotonic()
    done = subprocess.run(argv, cwd=REPO, check=False)
    seconds = round(time.monotonic() - started, 1)
    failed: list[str] = []
    if report.is_file():
        for phase in json.loads(report.read_text())["phases"]:
            failed += [
                f"{phase['phase']}: {c['name']} ({c['seconds']:.0f}s)"
                for c in phase["checks"]
                if c["outcome"] in ("failed", "error")
            ]
    return {"image": str(image), "seconds": seconds, "exit": done.returncode, "failed": failed}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, default=REPO / "images" / "web.yaml")
    parser.add_argument("--image", type=Path, help="a golden image of --spec (default: bake it)")
    parser.add_argument("--phase", action="append", choices=("baked", "firstboot"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results-broken-verify.json")
    args = parser.parse_args()
    phases = args.phase or ["firstboot"]
    good: Path = args.image
    if good is None:
        # Baked with a fixture release of the spec's Consul, as bench/firstboot.py does.
        version = load_spec(args.spec).spec.consul.version
        release = make_fixture_release(Path(tempfile.mkdtemp(prefix="bench-fixture-")), version)
        good = golden_image(args.spec, None, release)
    mesh = mesh_inputs(good, None, None, None)
    with tempfile.TemporaryDirectory(prefix="meshbake-bench-broken-") as tmp:
        folder = Path(tmp)
        say(f"fencing the sidecar of a copy of {good}")
        fenced = edited_copy(raw_disk(good, folder), folder, fence_sidecar)
        results = {
            "good": timed_verify(good, args.spec, phases, folder / "good.json", mesh),
            "fenced sidecar": timed_verify(fenced, args.spec, phases, folder / "fenced.json", mesh),
        }
    args.out.write_text(json.dumps({"phases": phases, "results": results}, indent=2) + "\n")
    print("| image | verify (s) | exit | failed checks |")
    print("|---|---|---|---|")
    for name, result in results.items():
        failed = "; ".join(result["failed"]) or "none"
        print(f"| {name} | {result['seconds']} | {result['exit']} | {failed} |")
    # The good image must pass and the fenced one must fail, or the times compare nothing.
    return 0 if results["good"]["exit"] == 0 and results["fenced sidecar"]["exit"] == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
