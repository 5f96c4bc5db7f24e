"""The Consul double in server mode (``python -m tests.fixtures.consul_double server``),
driven over HTTP and DNS on loopback the way an operator and the agents drive a real
server with ACLs on and default deny.

What these tests prove is that the double refuses what real Consul refuses and accepts
what it accepts, for each endpoint the mesh uses, with Consul's status and body. They say
nothing about a real Consul binary.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.test_consul_double import dns_query  # one DNS client for both doubles
from tests.paths import REPO

pytestmark = pytest.mark.integration

DC = "dc1"
ANONYMOUS_TAIL = ". The anonymous token is used implicitly when a request does not specify a token."


@dataclass(frozen=True)
class Reply:
    status: int
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)


@dataclass
class Server:
    process: subprocess.Popen[str]
    http: int
    dns: int

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """One HTTP request; ``token`` goes in ``X-Consul-Token``."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http}{path}", data=data, method=method
        )
        if token is not None:
            request.add_header("X-Consul-Token", token)
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return Reply(response.status, response.read().decode())
        except urllib.error.HTTPError as error:
            return Reply(error.code, error.read().decode())

    def ok(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        reply = self.call(method, path, body, token)
        assert reply.status == 200, reply
        return reply.json

    def token(self, root: str, **fields: Any) -> dict[str, Any]:
        created: dict[str, Any] = self.ok("PUT", "/v1/acl/token", fields, root)
        return created


def start(*extra: str) -> Server:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.consul_double", "server", "-bind",
         "127.0.0.1", "-http-port", "0", "-dns-port", "0", "-datacenter", DC, *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    found = re.fullmatch(
        r"consul-double server ready http=127\.0\.0\.1:(\d+) dns=127\.0\.0\.1:(\d+) "
        r"datacenter=dc1\n",
        line,
    )
    assert found, (line, process.stderr.read() if process.stderr else "")
    return Server(process, int(found[1]), int(found[2]))


@pytest.fixture
def server() -> Iterator[Server]:
    running = start()
    yield running
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=30) == 0


@dataclass(frozen=True)
class Mesh:
    """A bootstrapped server with the tokens an operator mints for one VM."""

    server: Server
    root: str
    node: dict[str, Any]  # node identity web-1
    web: dict[str, Any]  # service identity web
    dns: dict[str, Any]  # builtin/dns


@pytest.fixture
def mesh(server: Server) -> Mesh:
    root = server.ok("PUT", "/v1/acl/bootstrap")["SecretID"]
    node = server.token(root, NodeIdentities=[{"NodeName": "web-1", "Datacenter": DC}])
    web = server.token(root, ServiceIdentities=[{"ServiceName": "web"}])
    dns = server.token(root, TemplatedPolicies=[{"TemplateName": "builtin/dns"}])
    return Mesh(server, root, node, web, dns)


def denied(who: dict[str, Any] | None, permission: str, name: str | None = None) -> str:
    """Consul's body for a denial (acl/errors.go ``PermissionDeniedError.Error``)."""
    on = f' on "{name}"' if name is not None else ""
    if who is None:
        return f"Permission denied: anonymous token lacks permission '{permission}'{on}"
    return (
        f"Permission denied: token with AccessorID '{who['AccessorID']}' lacks permission "
        f"'{permission}'{on}"
    )


ROOT_NODE = {"Node": "web-1", "Address": "127.0.0.1", "Datacenter": DC}


def register_node(mesh: Mesh, node: str = "web-1", address: str = "127.0.0.1") -> Reply:
    body = {"Node": node, "Address": address, "Datacenter": DC}
    return mesh.server.call("PUT", "/v1/catalog/register", body, mesh.node["SecretID"])


def service(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"Service": name, "ID": name, "Port": port, **extra}


def sidecar(destination: str) -> dict[str, Any]:
    return service(
        f"{destination}-sidecar-proxy",
        21000,
        Kind="connect-proxy",
        Proxy={"DestinationServiceName": destination, "Mode": "transparent"},
    )


def register_service(
    mesh: Mesh, token: dict[str, Any] | None, svc: dict[str, Any], **extra: Any
) -> Reply:
    body = {"Node": "web-1", "Address": "127.0.0.1", "Datacenter": DC, "Service": svc, **extra}
    secret = None if token is None else token["SecretID"]
    return mesh.server.call("PUT", "/v1/catalog/register", body, secret)


# --- ACL: bootstrap, tokens, where the token comes from ---------------------------------------


def test_bootstrap_once_then_refused_as_consul_does(server: Server) -> None:
    first = server.ok("PUT", "/v1/acl/bootstrap")
    assert first["Policies"] == [
        {"ID": "00000000-0000-0000-0000-000000000001", "Name": "global-management"}
    ]
    again = server.call("PUT", "/v1/acl/bootstrap")
    assert again.status == 403
    assert re.fullmatch(
        r"Permission denied: ACL bootstrap no longer allowed \(reset index: \d+\)", again.text
    )
    # The first token still works: the refusal minted nothing.
    assert (
        server.ok("GET", "/v1/acl/token/self", token=first["SecretID"])["AccessorID"]
        == (first["AccessorID"])
    )


def test_the_token_is_read_from_query_header_and_bearer_in_consuls_order(mesh: Mesh) -> None:
    server, root = mesh.server, mesh.root
    policy = {"Name": "p", "Rules": json.dumps({"node_prefix": {"": {"policy": "read"}}})}
    by_query = server.call("PUT", f"/v1/acl/policy?token={root}", policy)
    assert by_query.status == 200, by_query
    policy["Name"] = "p2"
    bearer = server.call(
        "PUT", "/v1/acl/policy", policy, headers={"Authorization": f"bearer {root}"}
    )
    assert bearer.status == 200, bearer
    # ?token= wins over the header (agent/http.go parseTokenInternal).
    policy["Name"] = "p3"
    shadowed = server.call("PUT", "/v1/acl/policy?token=nope", policy, token=root)
    assert (shadowed.status, shadowed.text) == (403, "ACL not found")
    # Another scheme is no token at all: the anonymous token, denied.
    basic = server.call("PUT", "/v1/acl/policy", policy, headers={"Authorization": f"Basic {root}"})
    assert (basic.status, basic.text) == (403, denied(None, "acl:write") + ANONYMOUS_TAIL)


def test_minting_tokens_and_policies_needs_acl_write(mesh: Mesh) -> None:
    server = mesh.server
    for path, body in (
        ("/v1/acl/token", {"ServiceIdentities": [{"ServiceName": "api"}]}),
        ("/v1/acl/policy", {"Name": "x", "Rules": "{}"}),
    ):
        for who in (mesh.node, mesh.web, mesh.dns):
            reply = server.call("PUT", path, body, who["SecretID"])
            assert (reply.status, reply.text) == (403, denied(who, "acl:write"))
        assert server.call("PUT", path, body, mesh.root).status == 200


def test_token_self_shows_the_identities_and_refuses_an_unknown_secret(mesh: Mesh) -> None:
    server = mesh.server
    mine = server.ok("GET", "/v1/acl/token/self", token=mesh.node["SecretID"])
    assert mine["NodeIdentities"] == [{"NodeName": "web-1", "Datacenter": DC}]
    dns = server.ok("GET", "/v1/acl/token/self", token=mesh.dns["SecretID"])
    assert dns["TemplatedPolicies"] == [{"TemplateName": "builtin/dns"}]
    gone = server.call("GET", "/v1/acl/token/self", token="6b1f1d1e-0000-4000-8000-000000000000")
    assert (gone.status, gone.text) == (403, "ACL not found")


def test_a_token_links_a_policy_by_name_and_gets_its_rules(mesh: Mesh) -> None:
    server = mesh.server
    rules = json.dumps({"agent_prefix": {"": {"policy": "read"}}})
    server.ok("PUT", "/v1/acl/policy", {"Name": "agent-read", "Rules": rules}, mesh.root)
    reader = server.token(mesh.root, Policies=[{"Name": "agent-read"}])
    assert server.call("GET", "/v1/agent/self", token=reader["SecretID"]).status == 200
    refused = server.call("GET", "/v1/agent/self", token=mesh.node["SecretID"])
    assert (refused.status, refused.text) == (403, denied(mesh.node, "agent:read", "server-1"))
    missing = server.call("PUT", "/v1/acl/token", {"Policies": [{"Name": "nope"}]}, mesh.root)
    assert missing.status == 400


# --- catalog ------------------------------------------------------------------------------------


def test_node_registration_needs_node_write_on_that_node(mesh: Mesh) -> None:
    assert register_node(mesh).status == 200
    other = register_node(mesh, "web-2")
    assert (other.status, other.text) == (403, denied(mesh.node, "node:write", "web-2"))
    body = {"Node": "web-3", "Address": "127.0.0.3"}
    anonymous = mesh.server.call("PUT", "/v1/catalog/register", body)
    assert (anonymous.status, anonymous.text) == (
        403,
        denied(None, "node:write", "web-3") + ANONYMOUS_TAIL,
    )
    # A service token may not move a node it cannot write (vetRegisterWithACL).
    moved = register_node_as(mesh, mesh.web, address="127.0.0.9")
    assert (moved.status, moved.text) == (403, denied(mesh.web, "node:write", "web-1"))


def register_node_as(mesh: Mesh, who: dict[str, Any], address: str) -> Reply:
    body = {"Node": "web-1", "Address": address}
    return mesh.server.call("PUT", "/v1/catalog/register", body, who["SecretID"])


def test_service_registration_needs_service_write_and_the_proxy_its_destination(
    mesh: Mesh,
) -> None:
    assert register_node(mesh).status == 200
    assert register_service(mesh, mesh.web, service("web", 8080)).status == 200
    assert register_service(mesh, mesh.web, sidecar("web")).status == 200
    api = register_service(mesh, mesh.web, service("api", 9090))
    assert (api.status, api.text) == (403, denied(mesh.web, "service:write", "api"))
    # A proxy named as one the token may write, for a destination it may not.
    sneaky = sidecar("api")
    sneaky["Service"] = sneaky["ID"] = "web-sidecar-proxy"
    proxy = register_service(mesh, mesh.web, sneaky)
    assert (proxy.status, proxy.text) == (403, denied(mesh.web, "service:write", "api"))
    node_only = register_service(mesh, mesh.node, service("web", 8080))
    assert (node_only.status, node_only.text) == (403, denied(mesh.node, "service:write", "web"))
    # Taking over another service's ID deletes that service: it needs write on it too
    # (vetRegisterWithACL answers the bare "Permission denied" there).
    mesh.server.ok(
        "PUT", "/v1/catalog/register", {**ROOT_NODE, "Service": service("db", 5432)}, mesh.root
    )
    takeover = register_service(mesh, mesh.web, {**service("web", 8080), "ID": "db"})
    assert (takeover.status, takeover.text) == (403, "Permission denied")
    # A node-level check is the node's: the service token may not add one.
    check = {"CheckID": "serfHealth", "Name": "Serf", "Status": "passing"}
    with_check = register_service(mesh, mesh.web, service("web", 8080), Check=check)
    assert (with_check.status, with_check.text) == (403, denied(mesh.web, "node:write", "web-1"))


def test_catalog_reads_are_filtered_by_read_rights(mesh: Mesh) -> None:
    server = mesh.server
    assert register_node(mesh).status == 200
    assert register_service(mesh, mesh.web, service("web", 8080)).status == 200
    root_nodes = server.ok("GET", "/v1/catalog/nodes", token=mesh.root)
    # The server's own node is in the catalog too (agent/consul/leader.go reconcileMember).
    assert [n["Node"] for n in root_nodes] == ["server-1", "web-1"]
    # The DNS and service tokens read every node and service.
    for who in (mesh.dns, mesh.web):
        found = server.ok("GET", "/v1/catalog/service/web", token=who["SecretID"])
        assert [(s["Node"], s["ServiceID"], s["ServicePort"]) for s in found] == [
            ("web-1", "web", 8080)
        ]
        assert [n["Node"] for n in server.ok("GET", "/v1/catalog/nodes", token=who["SecretID"])]
    # The anonymous token reads nothing, and is not refused: the list is just empty.
    assert server.ok("GET", "/v1/catalog/service/web") == []
    assert server.ok("GET", "/v1/catalog/nodes") == []
    # A node identity reads services but no node of another name: node web-1 only.
    assert [
        n["Node"] for n in server.ok("GET", "/v1/catalog/nodes", token=mesh.node["SecretID"])
    ] == ["web-1"]
    assert server.call("GET", "/v1/catalog/nodes", token="not-a-token").text == "ACL not found"


def test_a_service_instance_needs_node_read_and_service_read(mesh: Mesh) -> None:
    """aclfilter: an instance is kept only when its node and its service are readable."""
    server = mesh.server
    assert register_node(mesh).status == 200
    assert register_service(mesh, mesh.web, service("web", 8080)).status == 200
    body = {"Node": "web-2", "Address": "127.0.0.2", "Service": service("web", 8080)}
    server.ok("PUT", "/v1/catalog/register", body, mesh.root)
    everyone = server.ok("GET", "/v1/catalog/service/web", token=mesh.root)
    assert [s["Node"] for s in everyone] == ["web-1", "web-2"]
    # The node identity reads every service but only its own node.
    mine = server.ok("GET", "/v1/catalog/service/web", token=mesh.node["SecretID"])
    assert [s["Node"] for s in mine] == ["web-1"]
    # Nodes but no service: no instance.
    rules = json.dumps({"node_prefix": {"": {"policy": "read"}}})
    server.ok("PUT", "/v1/acl/policy", {"Name": "nodes", "Rules": rules}, mesh.root)
    nodes_only = server.token(mesh.root, Policies=[{"Name": "nodes"}])["SecretID"]
    # web-1, web-2 and the server's own node (agent/consul/leader.go reconcileMember).
    assert len(server.ok("GET", "/v1/catalog/nodes", token=nodes_only)) == 3
    assert server.ok("GET", "/v1/catalog/service/web", token=nodes_only) == []


def test_health_passing_drops_an_instance_with_a_critical_check(mesh: Mesh) -> None:
    server = mesh.server
    assert register_node(mesh).status == 200
    check = {"CheckID": "service:web", "ServiceID": "web", "Status": "critical"}
    assert register_service(mesh, mesh.web, service("web", 8080), Check=check).status == 200
    secret = mesh.dns["SecretID"]
    assert len(server.ok("GET", "/v1/health/service/web", token=secret)) == 1
    assert server.ok("GET", "/v1/health/service/web?passing", token=secret) == []
    check["Status"] = "passing"
    assert register_service(mesh, mesh.web, service("web", 8080), Check=check).status == 200
    assert len(server.ok("GET", "/v1/health/service/web?passing", token=secret)) == 1


# --- intentions -----------------------------------------------------------------------------


def intentions(destination: str, **sources: str) -> dict[str, Any]:
    return {
        "Kind": "service-intentions",
        "Name": destination,
        "Sources": [{"Name": name, "Action": action} for name, action in sources.items()],
    }


def test_intentions_are_config_entries_that_need_intention_write(mesh: Mesh) -> None:
    server = mesh.server
    entry = intentions("api", web="allow")
    refused = server.call("PUT", "/v1/config", entry, mesh.web["SecretID"])
    assert (refused.status, refused.text) == (403, denied(mesh.web, "intention:write", "api"))
    assert server.ok("PUT", "/v1/config", entry, mesh.root) is True
    read = server.ok("GET", "/v1/config/service-intentions/api", token=mesh.web["SecretID"])
    assert read["Sources"] == [{"Name": "web", "Action": "allow"}]
    hidden = server.call("GET", "/v1/config/service-intentions/api")
    assert (hidden.status, hidden.text) == (
        403,
        denied(None, "intention:read", "api") + ANONYMOUS_TAIL,
    )
    missing = server.call("GET", "/v1/config/service-intentions/db", token=mesh.root)
    assert missing.status == 404


def check(mesh: Mesh, source: str, destination: str, token: str | None) -> Reply:
    query = urllib.parse.urlencode({"source": source, "destination": destination})
    return mesh.server.call("GET", f"/v1/connect/intentions/check?{query}", token=token)


def test_the_intention_decision_defaults_to_deny(mesh: Mesh) -> None:
    server, secret = mesh.server, mesh.web["SecretID"]
    assert check(mesh, "web", "api", secret).json == {"Allowed": False}  # default deny
    server.ok("PUT", "/v1/config", intentions("api", web="allow"), mesh.root)
    assert check(mesh, "web", "api", secret).json == {"Allowed": True}
    assert check(mesh, "db", "api", secret).json == {"Allowed": False}
    server.ok("PUT", "/v1/config", intentions("api", web="deny"), mesh.root)
    assert check(mesh, "web", "api", secret).json == {"Allowed": False}
    server.ok("PUT", "/v1/config", intentions("api", **{"*": "allow"}), mesh.root)
    assert check(mesh, "db", "api", secret).json == {"Allowed": True}
    # Check needs service:read on the destination only.
    anonymous = check(mesh, "web", "api", None)
    assert (anonymous.status, anonymous.text) == (
        403,
        denied(None, "service:read", "api") + ANONYMOUS_TAIL,
    )


# --- CA -------------------------------------------------------------------------------------


def csr(*uris: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


def test_leaf_signing_checks_service_write_and_the_spiffe_id(mesh: Mesh) -> None:
    server = mesh.server
    roots = server.ok("GET", "/v1/connect/ca/roots")  # roots need no token
    domain = roots["TrustDomain"]
    root = x509.load_pem_x509_certificate(roots["Roots"][0]["RootCert"].encode())

    def spiffe(svc: str, dc: str = DC, td: str = domain) -> str:
        return f"spiffe://{td}/ns/default/dc/{dc}/svc/{svc}"

    def sign(token: dict[str, Any] | None, pem: str) -> Reply:
        secret = None if token is None else token["SecretID"]
        return server.call("PUT", "/v1/double/connect/ca/sign", {"CSR": pem}, secret)

    issued = sign(mesh.web, csr(spiffe("web")))
    assert issued.status == 200, issued
    cert = x509.load_pem_x509_certificate(issued.json["CertPEM"].encode())
    cert.verify_directly_issued_by(root)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe("web")]
    assert issued.json["ServiceURI"] == spiffe("web")

    api = sign(mesh.web, csr(spiffe("api")))
    assert (api.status, api.text) == (403, denied(mesh.web, "service:write", "api"))
    dns = sign(mesh.dns, csr(spiffe("web")))
    assert (dns.status, dns.text) == (403, denied(mesh.dns, "service:write", "web"))
    anonymous = sign(None, csr(spiffe("web")))
    assert anonymous.status == 403
    other_dc = sign(mesh.web, csr(spiffe("web", dc="dc2")))
    assert (other_dc.status, other_dc.text) == (
        400,
        "SPIFFE ID in CSR from a different datacenter: dc2, we are dc1",
    )
    other_td = sign(mesh.web, csr(spiffe("web", td="other.consul")))
    assert other_td.status == 400
    assert other_td.text.startswith("SPIFFE ID in CSR from a different trust domain")
    two = sign(mesh.web, csr(spiffe("web"), spiffe("web-sidecar-proxy")))
    assert (two.status, two.text) == (400, "CSR SAN contains an invalid number of URIs: 2")


# --- virtual IPs and DNS ----------------------------------------------------------------------


def test_a_proxy_gives_its_destination_a_virtual_ip_that_needs_service_read(mesh: Mesh) -> None:
    server = mesh.server
    assert register_node(mesh).status == 200
    assert register_service(mesh, mesh.web, sidecar("web")).status == 200
    path = "/v1/double/catalog/virtual-ip/web"
    assert server.ok("GET", path, token=mesh.dns["SecretID"]) == {"VirtualIP": "240.0.0.1"}
    listed = server.ok("GET", "/v1/catalog/service/web-sidecar-proxy", token=mesh.root)
    assert listed[0]["ServiceTaggedAddresses"]["consul-virtual"]["Address"] == "240.0.0.1"
    anonymous = server.call("GET", path)
    assert (anonymous.status, anonymous.text) == (
        403,
        denied(None, "service:read", "web") + ANONYMOUS_TAIL,
    )
    # A plain service, with no proxy and not connect-native, has no virtual IP.
    body = {**ROOT_NODE, "Service": service("db", 5432)}
    server.ok("PUT", "/v1/catalog/register", body, mesh.root)
    db = "/v1/double/catalog/virtual-ip/db"
    assert server.ok("GET", db, token=mesh.dns["SecretID"]) == {"VirtualIP": ""}


def test_dns_answers_under_the_dns_token_and_not_without_it(mesh: Mesh) -> None:
    server = mesh.server
    assert register_node(mesh).status == 200
    assert register_service(mesh, mesh.web, service("web", 8080, Address="127.0.0.7")).status == 200
    assert register_service(mesh, mesh.web, sidecar("web")).status == 200
    # No DNS token: the anonymous token reads nothing.
    assert dns_query(server.dns, "web.service.consul") == (3, [])  # NXDOMAIN
    assert dns_query(server.dns, "web.virtual.consul") == (2, [])  # SERVFAIL: RPC denied
    # Setting the agent's DNS token needs agent:write on the server's node, as the
    # operator's token has and a node identity (of another node) has not.
    body = {"Token": mesh.dns["SecretID"]}
    refused = server.call("PUT", "/v1/agent/token/dns", body, mesh.node["SecretID"])
    assert (refused.status, refused.text) == (403, denied(mesh.node, "agent:write", "server-1"))
    assert server.call("PUT", "/v1/agent/token/dns", body, mesh.root).status == 200
    assert dns_query(server.dns, "web.service.consul") == (0, ["127.0.0.7"])
    assert dns_query(server.dns, "web.virtual.consul") == (0, ["240.0.0.1"])
    assert dns_query(server.dns, "nope.service.consul") == (3, [])
    # A critical instance is not answered.
    critical = {"CheckID": "service:web", "ServiceID": "web", "Status": "critical"}
    reply = register_service(
        mesh, mesh.web, service("web", 8080, Address="127.0.0.7"), Check=critical
    )
    assert reply.status == 200
    assert dns_query(server.dns, "web.service.consul") == (3, [])


def test_the_dns_token_can_be_given_on_the_command_line() -> None:
    running = start("-dns-token", "anonymous")  # the anonymous token's secret: no rights
    try:
        assert dns_query(running.dns, "web.service.consul") == (3, [])
    finally:
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(timeout=30) == 0


def test_status_leader_names_the_server(server: Server) -> None:
    assert server.ok("GET", "/v1/status/leader") == "127.0.0.1:8300"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["server", "-http-port", "http"], "-http-port: 'http' is not a port number"),
        (["server", "-bogus", "1"], "unknown argument '-bogus'"),
        (["agent"], "usage:"),
    ],
)
def test_bad_flags_are_one_line_and_exit_1(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.consul_double", *args],
        cwd=REPO, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and message in done.stderr
