"""``meshbake up``: boot images into a local mesh and keep it running until a signal.

The mesh is the one verify's first boot joins (``localmesh.py``), without the upstreams
and clients that only the checks need: a private network of meshbake's own
(``builder/mesh/localnet.py``), a Consul server on it (``builder/mesh/controlplane.py``)
from the Consul zip given, else from the first image's own, bootstrapped with ACLs on
and default deny, and each image booted on its own tap with the same minimal first-boot
user data ``meshbake userdata`` prints, carrying the tokens the server minted for it and
the server's address to join.

Intentions are service-intentions config entries: by default each image's service may
reach every other one's; ``--intention SRC=DST`` and ``--deny SRC=DST`` say otherwise.
Once every VM's sidecar is active and passing in the server's catalog (routable), one
line says where everything is (``--json``: one JSON object). Then it runs until SIGINT,
SIGTERM or SIGHUP, and on the way out stops the VMs, the server and the network, and
removes the work folder with the SSH keys and the token file.
"""

from __future__ import annotations

import functools
import json
import secrets
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import UserError
from builder.mesh.controlplane import ControlPlane, extract_consul
from builder.mesh.localnet import LocalNetwork
from builder.progress import Progress
from builder.render import baked, cloudconfig
from builder.spec.model import Accelerator, LoadedSpec
from builder.tools.qemu import patience
from builder.verify import runner
from builder.verify.localmesh import wants_dns_token

#: Seconds each VM's sidecar has to become active once SSH answers.
SIDECAR_TIMEOUT = 300.0


@dataclass(frozen=True)
class Intention:
    source: str
    destination: str
    allow: bool

    @classmethod
    def parse(cls, value: str, allow: bool) -> Intention:
        """``SRC=DST`` as ``--intention``/``--deny`` take it.

        >>> Intention.parse("web=api", True)
        Intention(source='web', destination='api', allow=True)
        """
        flag = "--intention" if allow else "--deny"
        source, eq, destination = value.partition("=")
        if not eq or not source or not destination:
            raise UserError(f"{flag} {value!r}: give SRC=DST, two service names")
        return cls(source, destination, allow)


def intentions_for(services: Sequence[str], given: Sequence[Intention]) -> list[Intention]:
    """Allow between every two different services, then what ``given`` says, last wins.

    >>> [(i.source, i.destination, i.allow) for i in intentions_for(
    ...     ["web", "api"], [Intention("web", "api", False)])]
    [('web', 'api', False), ('api', 'web', True)]
    """
    decided = {(a, b): True for a in services for b in services if a != b}
    for intention in given:
        decided[(intention.source, intention.destination)] = intention.allow
    return [Intention(src, dst, allow) for (src, dst), allow in decided.items()]


@dataclass(frozen=True)
class Guest:
    name: str
    image: Path
    address: str
    ssh_port: int
    key_file: Path
    service: str
    service_port: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": str(self.image),
            "address": self.address,
            "ssh": {"host": "127.0.0.1", "port": self.ssh_port, "user": runner.VERIFY_USER},
            "private_key": str(self.key_file),
            "service": {"name": self.service, "host": "127.0.0.1", "port": self.service_port},
        }


def up(
    images: Sequence[tuple[Path, LoadedSpec]],
    consul_zip: Path,
    *,
    intentions: Sequence[Intention] = (),
    accelerator: Accelerator = Accelerator.AUTO,
    progress: Progress,
    say: Callable[[str], None] = print,
    as_json: bool = False,
    until: threading.Event | None = None,
) -> None:
    """Run the mesh until a signal (``Interrupted``) or ``until`` is set."""
    services = [loaded.spec.service.name for _, loaded in images]
    twice = sorted({s for s in services if services.count(s) > 1})
    if twice:
        raise UserError(f"up: service {', '.join(twice)} is in more than one image")
    datacenters = {loaded.spec.consul.datacenter for _, loaded in images}
    if len(datacenters) > 1:
        raise UserError(f"up: the images name different datacenters: {sorted(datacenters)}")
    known = set(services)
    for intention in intentions:
        for name in (intention.source, intention.destination):
            if name not in known:
                raise UserError(f"up: intention names {name!r}, which no image serves")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meshbake-up-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        (work / "consul").mkdir(mode=0o700)
        consul = extract_consul(consul_zip, work / "consul")
        network = stack.enter_context(LocalNetwork(tag="up"))
        control = stack.enter_context(
            ControlPlane(network, consul, datacenter=datacenters.pop(), log_dir=work)
        )
        progress(f"up: Consul server on {network.server_address} ({network.name})")
        for _, loaded in images:
            defaults = baked.service_defaults(loaded.spec)
            if defaults["MutualTLSMode"] == "permissive":
                control.allow_permissive()
            control.call("PUT", "/v1/config", defaults)
        for intention in intentions_for(services, intentions):
            control.intention(intention.source, intention.destination, allow=intention.allow)
        guests = []
        slowest = 1.0  # the patience of the slowest VM's architecture
        for image, loaded in images:
            spec = loaded.spec
            node = f"{spec.name}-{secrets.token_hex(3)}"
            tokens = cloudconfig.Secrets(
                agent_token=control.node_token(node, spec.service.name),
                service_token=None
                if spec.tokens.shared
                else control.service_token(spec.service.name),
                dns_token=control.dns_token() if wants_dns_token(spec) else None,
            )
            values = cloudconfig.carrier_values(spec, tokens, where=str(loaded.path))
            values |= cloudconfig.join_values([str(network.server_address.ip)])
            document = cloudconfig.first_boot_document(values)
            folder = work / node
            folder.mkdir(mode=0o700)
            # Each VM boots as its own architecture (qemu-system-aarch64 for arm64); the
            # server runs on this host, from the host's build of Consul.
            arch = runner.image_arch(image)
            slowest = max(slowest, patience(arch))
            vm = stack.enter_context(
                runner.boot_vm(
                    image,
                    folder,
                    functools.partial(_user_data, document=document),
                    accelerator,
                    progress,
                    network=network,
                    instance=node,
                    cpus=runner.vm_cpus(len(images)),
                    arch=arch,
                )
            )
            assert vm.address is not None
            guests.append(
                Guest(
                    node,
                    image,
                    vm.address,
                    vm.port,
                    vm.key_file,
                    spec.service.name,
                    network.forward(vm.address, spec.service.port),
                )
            )
            progress(f"up: {node} answers SSH on 127.0.0.1:{vm.port}")
            down = runner.wait_sidecar(vm, time.monotonic() + SIDECAR_TIMEOUT * patience(arch))
            if down:
                raise UserError(f"up: {node}: the sidecar is not up: {'; '.join(down)}")
        # Ready means routable: each service's sidecar passes its checks in the server's
        # catalog, which is when Consul gives the other sidecars its endpoint.
        deadline = time.monotonic() + SIDECAR_TIMEOUT * slowest
        for guest in guests:
            _wait_passing(control, guest, deadline)
        token_file = control.token_file("management", control.management_token)
        summary = {
            "server": {
                "address": str(network.server_address.ip),
                "http": f"http://127.0.0.1:{control.api_port}",
                "token_file": str(token_file),
                "network": network.name,
            },
            "vms": [guest.to_json() for guest in guests],
            "ready_after_s": round(time.monotonic() - started, 1),
        }
        if as_json:
            say(json.dumps(summary))
        else:
            say(_describe(summary))
        stop = until or threading.Event()
        while not stop.wait(1.0):
            pass  # a signal arrives as Interrupted and unwinds everything above


def _wait_passing(control: ControlPlane, guest: Guest, deadline: float) -> None:
    path = f"/v1/health/connect/{urllib.parse.quote(guest.service, safe='')}?passing"
    while not control.call("GET", path):
        if time.monotonic() > deadline:
            raise UserError(
                f"up: {guest.name}: {guest.service}'s sidecar is up but not passing in the "
                f"server's catalog after {SIDECAR_TIMEOUT:.0f}s"
            )
        time.sleep(1.0)


def _user_data(public_key: str, *, document: dict[str, Any]) -> str:
    return runner.verify_user_data(public_key, document)


def _describe(summary: dict[str, Any]) -> str:
    server = summary["server"]
    lines = [
        f"Consul server: {server['http']} (token in {server['token_file']})",
    ]
    for vm in summary["vms"]:
        ssh = vm["ssh"]
        lines.append(
            f"{vm['name']}: ssh -i {vm['private_key']} -p {ssh['port']} {ssh['user']}@127.0.0.1;"
            f" {vm['service']['name']} on 127.0.0.1:{vm['service']['port']} (mTLS only)"
        )
    lines.append("Ctrl-C stops the VMs and the server and removes everything up made.")
    return "\n".join(lines)
