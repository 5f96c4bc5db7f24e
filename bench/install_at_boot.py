"""The baseline meshbake replaces: a stock image whose user data installs everything at
boot. Measures VM start -> mesh ready, to compare with a golden image's first boot.
Not a test.

    .venv/bin/python bench/install_at_boot.py [--spec images/web.yaml]

To be fair to the baseline it is the *same* install (scripts/meshbake-bake with
MESHBAKE_AT_BOOT=true, the same configs and units), fetched at boot from a local mirror,
so no internet latency is counted. It boots the cached Debian 12 base that golden images
start from, into the same local mesh as verify's first boot (``mesh_vm``): a Consul
server on a private network (the fixture release's, a TEST DOUBLE, as the VM's Consul
is), which the VM's agent joins and which holds the tokens an operator minted for it;
the mirror is served on that network too. Envoy is real. Prints JSON. It also reports
the size of a self-contained user data document (every config, unit and script inline,
no binaries), which is what the install-at-boot way must ship when no mirror holds the
configs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import http.server
import json
import socket
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
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
from builder.verify.imagetests import helpers  # noqa: E402
from builder.verify.localmesh import MeshInputs, VerifyMesh  # noqa: E402
from builder.verify.runner import ServiceProbe, Vm, _poll, boot_vm, verify_user_data  # noqa: E402
from tests.fixtures.release import make_fixture_release  # noqa: E402

#: Builds the VM's extra user data from the carrier's values (the mesh's tokens and the
#: server to join) and the mirror's URL ("" when there is no mirror).
ExtraFor = Callable[[Mapping[str, str], str], dict[str, Any]]


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@dataclass
class MeshVm:
    """A VM booted into a local mesh; ``probe`` (a mesh client that an intention allows,
    probing the service port from VM start) when asked for."""

    vm: Vm
    probe: ServiceProbe | None


@contextlib.contextmanager
def mesh_vm(
    image: Path,
    loaded: LoadedSpec,
    inputs: MeshInputs,
    extra_for: ExtraFor,
    *,
    mirror: Path | None = None,
    probe: bool = False,
) -> Iterator[MeshVm]:
    """Boot ``image`` into the local mesh of verify's first boot (``VerifyMesh``: the
    server from ``inputs.consul_zip``, the VM's tokens minted there, intentions, upstreams),
    with the carrier's values and the join address handed to ``extra_for``, as verify
    does; ``mirror``, when given, is served over HTTP on the mesh's network."""
    with tempfile.TemporaryDirectory(prefix="meshbake-bench-") as tmp, ExitStack() as ends:
        work = Path(tmp)
        mesh = ends.enter_context(VerifyMesh(loaded, inputs, work, say))
        network = mesh.network
        assert network is not None
        values = cloudconfig.carrier_values(
            loaded.spec, mesh.secrets, where="bench"
        ) | cloudconfig.join_values([mesh.server_address])
        url = ""
        if mirror is not None:
            port = ends.enter_context(serve(mirror, network.listen()))
            url = f"http://{mesh.server_address}:{port}"
        extra = extra_for(values, url)
        prober = None
        if probe:
            guest = network.lease(mesh.node).address.ip
            inbound = network.forward(guest, loaded.spec.service.port)
            expect = mesh.expect(str(guest))
            allowed = helpers.MeshIdentity.from_expect(expect["clients"]["allowed"])

            def exchange() -> helpers.Exchange:
                return helpers.tls_exchange(
                    "127.0.0.1", inbound, helpers.HTTP_PROBE, allowed, expect["server_name"],
                    timeout=5,
                )[0]  # fmt: skip

            prober = ends.enter_context(ServiceProbe(inbound, exchange=exchange))
        vm = ends.enter_context(
            boot_vm(
                image,
                work,
                lambda key: verify_user_data(key, extra),
                Accelerator.AUTO,
                say,
                network=network,
                instance=mesh.node,
            )  # fmt: skip
        )
        yield MeshVm(vm, prober)


@contextlib.contextmanager
def serve(folder: Path, listener: socket.socket) -> Iterator[int]:
    """Serve ``folder`` over HTTP on ``listener`` (made in the mesh's namespace); its port."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(
        listener.getsockname()[:2], handler, bind_and_activate=False
    )
    server.socket.close()
    server.socket = listener
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class AtBoot:
    """The install-at-boot way, ready to boot: the local mirror's folder, the Consul zip
    and Envoy of the install (for the mesh's server and upstreams too), and the sizes."""

    mirror: Path
    inputs: MeshInputs
    app: str
    inline: int
    inline_gz: int

    def extra(self, values: Mapping[str, str], url: str) -> dict[str, Any]:
        """The user data that fetches the install from ``url`` and runs it at boot."""
        fetch = (
            "import urllib.request; urllib.request.urlretrieve("
            f"'{url}/stage.tar.gz', '/tmp/stage.tar.gz')"
        )
        return {
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
                    f"{self.app}.service",
                ],
            ],
        }


def prepare(loaded: LoadedSpec, work: Path) -> AtBoot:
    """Stage the same install meshbake bakes into a mirror folder (``mesh_vm`` serves it
    on the mesh's network) and keep what the mesh needs of it."""
    spec = loaded.spec
    cache = base.default_cache_dir()
    release = make_fixture_release(work / "fixture", spec.consul.version)
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
    inputs = MeshInputs(release.zip_path, envoy.path)
    return AtBoot(mirror, inputs, spec.app.name, inline, inline_gz)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", type=Path, default=REPO / "images" / "web.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results-install-at-boot.json")
    args = parser.parse_args()
    loaded = load_spec(args.spec)
    at_boot = prepare(loaded, Path(tempfile.mkdtemp(prefix="bench-at-boot-")))
    base_image = base.build_base(base.default_cache_dir())
    with mesh_vm(
        base_image.path, loaded, at_boot.inputs, at_boot.extra, mirror=at_boot.mirror
    ) as booted:
        vm = booted.vm
        ssh = time.monotonic() - vm.started
        ready = _poll(
            vm, "systemctl is-active envoy-sidecar.service", "active", time.monotonic() + 900
        )
        mesh = time.monotonic() - vm.started
    # The size as a VM would get it, with stand-ins of the same shape for the secrets.
    stand_in = cloudconfig.Secrets(agent_token="00000000-0000-4000-8000-000000000000")
    values = cloudconfig.carrier_values(loaded.spec, stand_in) | cloudconfig.join_values(
        ["198.18.0.1"]
    )
    extra = at_boot.extra(values, "http://198.18.0.1:40000")
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
