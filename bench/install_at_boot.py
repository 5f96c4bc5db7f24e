"""The baseline meshbake replaces: a stock image whose user data installs everything at
boot. Measures VM start -> mesh ready, to compare with a golden image's first boot.
Not a test.

    .venv/bin/python bench/install_at_boot.py [--spec images/web.yaml]

To be fair to the baseline it is the *same* install (scripts/meshbake-bake with
MESHBAKE_AT_BOOT=true, the same configs and units), fetched at boot from a local mirror
(an HTTP server on this host's loopback, reached from the VM as 10.0.2.2), so no
internet latency is counted. It boots the cached Debian 12 base that golden images start
from. The Consul is the fixture release (a TEST DOUBLE); Envoy is real. Prints JSON.
It also reports the size of a self-contained user data document (every config, unit and
script inline, no binaries), which is what the install-at-boot way must ship when no
mirror holds the configs.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import http.server
import json
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from builder.bake import artifacts, base  # noqa: E402
from builder.render import cloudconfig  # noqa: E402
from builder.render.context import render_context  # noqa: E402
from builder.spec.model import Accelerator, LoadedSpec, load_spec  # noqa: E402
from builder.tools.packer import Packer  # noqa: E402
from builder.verify.runner import _poll, boot_vm, verify_user_data  # noqa: E402
from tests.fixtures.release import make_fixture_release, mesh_tokens  # noqa: E402


@dataclass
class AtBoot:
    """The install-at-boot way, ready to boot: its user data and the local mirror."""

    extra: dict[str, Any]
    server: http.server.ThreadingHTTPServer
    inline: int
    inline_gz: int


def prepare(loaded: LoadedSpec, work: Path) -> AtBoot:
    """Stage the same install meshbake bakes, serve it from a mirror on this host's
    loopback (the VM reaches it as 10.0.2.2), and build the user data that installs it
    at boot. Shut ``server`` down when done."""
    spec = loaded.spec
    cache = base.default_cache_dir()
    # The double's agent checks ACLs: it must know the token the VM is given.
    tokens = mesh_tokens([spec.service.name])
    release = make_fixture_release(work / "fixture", spec.consul.version, acl_tokens=tokens.table())
    consul = artifacts.fetch_consul(
        spec.consul.version, cache, mirror=str(release.mirror), key=release.key
    )
    envoy = artifacts.fetch_envoy(spec.envoy.version, cache, source=spec.envoy.source)
    ctx = render_context(loaded, work / "ctx", packer=Packer())
    artifacts.stage([consul, envoy], ctx.stage_dir / "artifacts")
    mirror = work / "mirror"
    mirror.mkdir()
    with tarfile.open(mirror / "stage.tar.gz", "w:gz") as tar:
        tar.add(ctx.stage_dir, arcname="meshbake")

    # What the install-at-boot way must carry when no mirror holds its configs.
    files = sorted(
        p for p in ctx.stage_dir.rglob("*") if p.is_file() and "artifacts" not in p.parts
    )
    inline = sum(len(p.read_bytes()) for p in files)
    inline_gz = len(gzip.compress(b"".join(p.read_bytes() for p in files)))

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()

    values = cloudconfig.carrier_values(spec, cloudconfig.Secrets(agent_token=tokens.agent))
    fetch = (
        "import urllib.request; urllib.request.urlretrieve("
        f"'http://10.0.2.2:{port}/stage.tar.gz', '/tmp/stage.tar.gz')"
    )
    extra = {
        **cloudconfig.first_boot_document(values),
        "runcmd": [
            ["python3", "-c", fetch],
            ["tar", "-xzf", "/tmp/stage.tar.gz", "-C", "/tmp"],
            ["env", "MESHBAKE_AT_BOOT=true", "sh", "/tmp/meshbake/scripts/meshbake-bake"],
            [
                "systemctl",
                "start",
                "--no-block",
                "meshbake-imds.service",
                "meshbake-conntrack.service",
                "meshbake-firstboot.service",
                "consul.service",
                "envoy-sidecar.service",
                f"{spec.app.name}.service",
            ],
        ],
    }
    return AtBoot(extra, server, inline, inline_gz)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, default=REPO / "images" / "web.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results-install-at-boot.json")
    args = parser.parse_args()
    loaded = load_spec(args.spec)
    work = Path(tempfile.mkdtemp(prefix="bench-at-boot-"))
    at_boot = prepare(loaded, work)
    extra, server = at_boot.extra, at_boot.server
    cache = base.default_cache_dir()
    base_image = base.build_base(cache)
    try:
        with (
            tempfile.TemporaryDirectory() as vm_work,
            boot_vm(
                base_image.path,
                Path(vm_work),
                lambda key: verify_user_data(key, extra),
                Accelerator.AUTO,
                lambda m: print(m, file=sys.stderr),
            ) as vm,
        ):
            ssh = time.monotonic() - vm.started
            ready = _poll(
                vm, "systemctl is-active envoy-sidecar.service", "active", time.monotonic() + 900
            )
            mesh = time.monotonic() - vm.started
    finally:
        server.shutdown()
    user_data = verify_user_data("ssh-ed25519 AAAA placeholder", extra)
    figures = {
        "install_at_boot_boot_to_ssh_seconds": round(ssh, 1),
        "install_at_boot_vm_start_to_mesh_ready_seconds": round(mesh, 1) if ready else None,
        "install_at_boot_user_data_bytes_with_mirror": len(user_data.encode()),
        "self_contained_user_data_bytes_no_binaries": at_boot.inline,
        "self_contained_user_data_bytes_gzipped": at_boot.inline_gz,
    }
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0 if ready else 1


if __name__ == "__main__":
    raise SystemExit(main())
