"""The fixture release's ``consul`` zipapp as a server, started with MESH-CONTRACT.md's
command line under Debian 12's /usr/bin/python3, and its ``connect envoy`` giving a
registered service a real Envoy whose public listener speaks mutual TLS only.

A TEST of the TEST DOUBLE, on loopback: no VM, no namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.release import double_server, mesh_tokens, zipapp_bytes
from tests.integration.test_netns import envoy_binary

pytestmark = pytest.mark.integration

DC = "dc1"
APP_ANSWER = b"hello from the upstream app\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    consul: Path
    process: subprocess.Popen[str]
    http: int
    folder: Path

    def call(self, method: str, path: str, body: Any = None, token: str = "") -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data, method=method)
        if token:
            request.add_header("X-Consul-Token", token)
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                text = reply.read().decode()
                return reply.status, json.loads(text) if text else None
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def ok(self, method: str, path: str, body: Any = None, token: str = "") -> Any:
        status, value = self.call(method, path, body, token)
        assert status == 200, (method, path, status, value)
        return value


def zipapp(folder: Path) -> Path:
    consul = folder / "consul"
    if not consul.exists():
        consul.write_bytes(zipapp_bytes("2.1.0"))
        consul.chmod(0o755)
    return consul


@contextlib.contextmanager
def run_server(folder: Path, http: int = 0) -> Iterator[Server]:
    """The zipapp, run as real Consul's server is run (MESH-CONTRACT.md)."""
    consul = zipapp(folder)
    assert consul.read_bytes().startswith(b"#!/usr/bin/python3 -I\n")
    http, dns = http or free_port(), free_port()
    config = folder / "server.json"
    config.write_text(json.dumps({
        "acl": {"enabled": True, "default_policy": "deny", "enable_token_persistence": True},
        "connect": {"enabled": True},
        "ports": {"http": http, "dns": dns, "grpc": 8502},
    }))  # fmt: skip
    process = subprocess.Popen(
        [consul, "agent", "-server", "-bootstrap-expect=1", "-node=meshbake-server",
         f"-datacenter={DC}", "-bind=127.0.0.1", "-client=127.0.0.1",
         f"-data-dir={folder / 'data'}", f"-config-file={config}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={"PATH": "/usr/bin:/bin", "CONSUL_FIXTURE_LOG_DIR": str(folder / "log")},
    )  # fmt: skip
    running = Server(consul, process, http, folder)
    try:
        for _ in range(200):
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if running.call("GET", "/v1/status/leader") == (200, "127.0.0.1:8300"):
                    break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            raise AssertionError("the double server never had a leader")
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with run_server(tmp_path) as running:
        yield running


def test_bad_server_config_is_one_line_naming_the_field(tmp_path: Path) -> None:
    consul = zipapp(tmp_path)
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"acl": {"enabled": True, "default_policy": "allow"},
                                  "connect": {"enabled": True}}))  # fmt: skip
    done = subprocess.run(
        [consul, "agent", "-server", "-bootstrap-expect=1", f"-config-file={config}"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f'{config}: acl.default_policy: the double models "deny" only'
    ]


def test_the_server_agent_registers_a_sidecar_only_with_service_write(server: Server) -> None:
    root = server.ok("PUT", "/v1/acl/bootstrap")["SecretID"]
    other = server.ok("PUT", "/v1/acl/token", {"ServiceIdentities": [{"ServiceName": "other"}]},
                      root)  # fmt: skip
    body = {"Name": "meshbake-upstream", "Port": 9, "Connect": {"SidecarService": {}}}
    status, text = server.call("PUT", "/v1/agent/service/register", body, other["SecretID"])
    assert (status, text) == (
        403,
        f"Permission denied: token with AccessorID '{other['AccessorID']}' lacks permission "
        "'service:write' on \"meshbake-upstream\"",
    )
    identity = {"ServiceIdentities": [{"ServiceName": "meshbake-upstream"}]}
    mine = server.ok("PUT", "/v1/acl/token", identity, root)
    server.ok("PUT", "/v1/agent/service/register", body, mine["SecretID"])
    services = server.ok("GET", "/v1/agent/services", token=mine["SecretID"])
    sidecar = services["meshbake-upstream-sidecar-proxy"]
    assert (sidecar["Kind"], sidecar["Port"]) == ("connect-proxy", 21000)
    assert sidecar["Proxy"]["DestinationServiceName"] == "meshbake-upstream"
    assert set(server.ok("GET", "/v1/catalog/services", token=root)) == {
        "consul", "meshbake-upstream", "meshbake-upstream-sidecar-proxy",
    }  # fmt: skip
    # The leaf needs service:write; the anonymous token is refused with Consul's text.
    status, text = server.call("GET", "/v1/agent/connect/ca/leaf/meshbake-upstream")
    assert status == 403 and "anonymous token lacks permission 'service:write'" in text
    leaf = server.ok("GET", "/v1/agent/connect/ca/leaf/meshbake-upstream", token=mine["SecretID"])
    assert leaf["ServiceURI"].endswith(f"/ns/default/dc/{DC}/svc/meshbake-upstream")
    assert "PRIVATE KEY" in leaf["PrivateKeyPEM"]
    asked = [{"Resource": "service", "Segment": "meshbake-upstream", "Access": "write"},
             {"Resource": "service", "Segment": "other", "Access": "write"}]  # fmt: skip
    answers = server.ok("POST", "/v1/internal/acl/authorize", asked, mine["SecretID"])
    assert [a["Allow"] for a in answers] == [True, False]


def _serve_app(port: int, stop: threading.Event) -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                # Client first, as HTTP is: Envoy's network RBAC decides on the first
                # bytes from the client, so a server-first app would greet anyone.
                conn.settimeout(5)
                try:
                    if conn.recv(100):
                        conn.sendall(APP_ANSWER)
                except OSError:
                    pass


def _plain(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.settimeout(5)
        try:
            conn.sendall(b"hello\n")
            return conn.recv(100)
        except OSError:
            return b""


def _mtls(port: int, folder: Path, leaf: dict[str, Any], root_pem: str) -> bytes:
    (folder / "cert.pem").write_text(leaf["CertPEM"])
    (folder / "key.pem").write_text(leaf["PrivateKeyPEM"])
    (folder / "root.pem").write_text(root_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(folder / "root.pem")
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="meshbake-upstream") as conn:
                conn.settimeout(5)
                conn.sendall(b"hello\n")
                return conn.recv(100)
        except (OSError, ssl.SSLError):
            return b""


def test_connect_envoy_gives_the_sidecar_a_mutual_tls_public_listener(
    server: Server, tmp_path: Path
) -> None:
    root = server.ok("PUT", "/v1/acl/bootstrap")["SecretID"]
    up = server.ok("PUT", "/v1/acl/token",
                   {"ServiceIdentities": [{"ServiceName": "meshbake-upstream"}]}, root)  # fmt: skip
    app_port, public_port, admin_port = free_port(), free_port(), free_port()
    stop = threading.Event()
    threading.Thread(target=_serve_app, args=(app_port, stop), daemon=True).start()
    body = {"Name": "meshbake-upstream", "Port": app_port, "Address": "127.0.0.1",
            "Connect": {"SidecarService": {"Port": public_port}}}  # fmt: skip
    server.ok("PUT", "/v1/agent/service/register", body, up["SecretID"])
    sources = [{"Name": "meshbake-verify", "Action": "allow"},
               {"Name": "meshbake-intruder", "Action": "deny"}]  # fmt: skip
    entry = {"Kind": "service-intentions", "Name": "meshbake-upstream", "Sources": sources}
    server.ok("PUT", "/v1/config", entry, root)
    token_file = tmp_path / "token"
    token_file.write_text(up["SecretID"])
    log = (tmp_path / "envoy.log").open("w")
    envoy = subprocess.Popen(
        [server.consul, "connect", "envoy", "-sidecar-for=meshbake-upstream",
         f"-http-addr=http://127.0.0.1:{server.http}", f"-token-file={token_file}",
         f"-admin-bind=127.0.0.1:{admin_port}", f"-envoy-binary={envoy_binary()}",
         "--", "--log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT,
        env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path),
             "CONSUL_FIXTURE_LOG_DIR": str(tmp_path / "log")},
    )  # fmt: skip
    try:
        for _ in range(600):
            assert envoy.poll() is None, (tmp_path / "envoy.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=2):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("envoy never became ready")
        bootstrap = next((tmp_path / f"consul-envoy-{_uid()}").glob("*-bootstrap.json"))
        assert up["SecretID"] not in bootstrap.read_text()  # never a token in the bootstrap
        root_pem = server.ok("GET", "/v1/connect/ca/roots")["Roots"][0]["RootCert"]
        verify = server.ok("GET", "/v1/agent/connect/ca/leaf/meshbake-verify", token=root)
        intruder = server.ok("GET", "/v1/agent/connect/ca/leaf/meshbake-intruder", token=root)
        # A plain client gets nothing from the app; a client with an allowed leaf does;
        # a leaf that a deny intention names is closed by RBAC.
        # (the plain client gets at most a TLS alert record, never the app's bytes)
        assert APP_ANSWER not in _plain(public_port)
        assert _mtls(public_port, tmp_path, verify, root_pem) == APP_ANSWER
        assert _mtls(public_port, tmp_path, intruder, root_pem) == b""
        # The app itself still answers directly: the refusals are the sidecar's.
        assert _plain(app_port) == APP_ANSWER
    finally:
        stop.set()
        envoy.send_signal(signal.SIGTERM)
        envoy.wait(timeout=30)
        log.close()


def _uid() -> int:
    return os.geteuid()


def test_a_client_agent_is_ready_only_after_joining_and_asks_the_server(tmp_path: Path) -> None:
    """agent/retry_join.go, lib/systemd (#4380), agent/local/state.go, agent/dns.go."""
    consul = zipapp(tmp_path)
    server_http, agent_http, agent_dns, app = free_port(), free_port(), free_port(), free_port()
    agent_token, web_token, dns_token = (str(uuid.uuid4()) for _ in range(3))
    config_dir = tmp_path / "consul.d"
    config_dir.mkdir()
    (config_dir / "10-agent.json").write_text(json.dumps({
        "node_name": "web-1", "datacenter": DC, "bind_addr": "127.0.0.1",
        "retry_join": ["provider=aws tag_key=consul tag_value=meshbake"], "retry_interval": "1s",
        "ports": {"http": agent_http, "dns": agent_dns, "grpc": 8502},
        "acl": {"enabled": True, "default_policy": "deny",
                "tokens": {"agent": agent_token, "config_file_service_registration": web_token,
                           "dns": dns_token}},
        "service": {"name": "web", "port": app, "check": {"tcp": f"127.0.0.1:{app}",
                                                          "interval": "1s"},
                    "connect": {"sidecar_service": {"proxy": {"mode": "transparent"}}}},
    }))  # fmt: skip
    # Consul appends list values across files: the second entry names the server.
    (config_dir / "50-join.json").write_text(
        json.dumps({"retry_join": [f"127.0.0.1:{server_http}"]})
    )
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    listener = socket.socket()
    listener.bind(("127.0.0.1", app))
    listener.listen()
    out = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(
        [consul, "agent", f"-config-dir={config_dir}"], stdout=out, stderr=subprocess.STDOUT,
        env={"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": str(notify_path),
             "CONSUL_FIXTURE_LOG_DIR": str(tmp_path / "log")},
    )  # fmt: skip
    local = Server(consul, agent, agent_http, tmp_path)
    try:
        # Up, but not joined: its log shows the failed provider discovery and join
        # attempts, and no READY=1 has been sent.
        for _ in range(600):
            log_text = (tmp_path / "agent.log").read_text()
            if "Join cluster failed, will retry" in log_text and (
                'Cannot discover address: cluster=LAN address="provider=aws' in log_text
            ):
                break
            assert agent.poll() is None, log_text
            time.sleep(0.1)
        else:
            raise AssertionError((tmp_path / "agent.log").read_text())
        notify.setblocking(False)
        with pytest.raises(BlockingIOError):
            notify.recv(100)
        # Without a server the sidecar cannot start: no leaf, no roots.
        unjoined = subprocess.run(
            [consul, "connect", "envoy", "-sidecar-for=web", "-bootstrap",
             f"-http-addr=127.0.0.1:{agent_http}", f"-token={web_token}"],
            capture_output=True, text=True, timeout=120,
            env={"PATH": "/usr/bin:/bin", "CONSUL_FIXTURE_LOG_DIR": str(tmp_path / "log")},
        )  # fmt: skip
        assert unjoined.returncode == 1
        assert "Unexpected response code: 500 (No known Consul servers)" in unjoined.stderr
        notify.setblocking(True)
        notify.settimeout(120)
        with run_server(tmp_path, server_http) as server:
            root = server.ok("PUT", "/v1/acl/bootstrap")["SecretID"]
            rules = json.dumps({"node": {"web-1": {"policy": "write"}},
                                "agent": {"web-1": {"policy": "read"}},
                                "service_prefix": {"": {"policy": "read"}}})  # fmt: skip
            server.ok("PUT", "/v1/acl/policy", {"Name": "web-1-agent", "Rules": rules}, root)
            minted = {
                agent_token: {"Policies": [{"Name": "web-1-agent"}]},
                web_token: {"ServiceIdentities": [{"ServiceName": "web"}]},
                dns_token: {"TemplatedPolicies": [{"TemplateName": "builtin/dns"}]},
            }
            for secret, fields in minted.items():
                server.ok("PUT", "/v1/acl/token", {"SecretID": secret, **fields}, root)
            assert notify.recv(200).startswith(b"READY=1")
            # The node and the service are in the server's catalog, synced by the agent.
            for _ in range(600):
                if server.ok("GET", "/v1/health/service/web?passing", token=root):
                    break
                time.sleep(0.1)
            else:
                raise AssertionError((tmp_path / "agent.log").read_text())
            nodes = [n["Node"] for n in server.ok("GET", "/v1/catalog/nodes", token=root)]
            assert "web-1" in nodes
            sidecars = server.ok("GET", "/v1/catalog/service/web-sidecar-proxy", token=root)
            assert [(s["Node"], s["ServicePort"]) for s in sidecars] == [("web-1", 21000)]
            # A token without service:write on the service is refused, asked of the server.
            status, text = local.call("PUT", "/v1/agent/service/register",
                                      {"Name": "api", "Port": 1}, web_token)  # fmt: skip
            accessor = server.ok("GET", "/v1/acl/token/self", token=web_token)["AccessorID"]
            assert (status, text) == (
                403,
                f"Permission denied: token with AccessorID '{accessor}' lacks permission "
                "'service:write' on \"api\"",
            )
            # agent:read on web-1 for the agent token; none for the service token.
            assert local.call("GET", "/v1/agent/self", token=agent_token)[0] == 200
            assert local.call("GET", "/v1/agent/self", token=web_token)[0] == 403
            # connect envoy through the joined agent: its leaf signed by the server, and
            # the upstream an intention allows (registered on the server's own agent,
            # its sidecar listening) as an outbound chain on the upstream's VIP.
            upstream_sidecar = socket.socket()
            upstream_sidecar.bind(("127.0.0.1", 0))
            upstream_sidecar.listen()
            side_port = upstream_sidecar.getsockname()[1]
            body = {"Name": "meshbake-upstream", "Port": 9, "Address": "127.0.0.1",
                    "Connect": {"SidecarService": {"Port": side_port}}}  # fmt: skip
            server.ok("PUT", "/v1/agent/service/register", body, root)
            for name, action in (("meshbake-upstream", "allow"), ("api", "deny")):
                entry = {"Kind": "service-intentions", "Name": name,
                         "Sources": [{"Name": "web", "Action": action}]}  # fmt: skip
                server.ok("PUT", "/v1/config", entry, root)
            for _ in range(600):
                if server.ok("GET", "/v1/health/connect/meshbake-upstream?passing", token=root):
                    break
                time.sleep(0.1)
            vip = server.ok("GET", "/v1/double/catalog/virtual-ip/meshbake-upstream",
                            token=root)["VirtualIP"]  # fmt: skip
            token_file = tmp_path / "web-token"
            token_file.write_text(web_token)
            printed = subprocess.run(
                [consul, "connect", "envoy", "-sidecar-for=web", "-bootstrap",
                 f"-http-addr=127.0.0.1:{agent_http}", f"-token-file={token_file}"],
                capture_output=True, text=True, timeout=120,
                env={"PATH": "/usr/bin:/bin", "CONSUL_FIXTURE_LOG_DIR": str(tmp_path / "log")},
            )  # fmt: skip
            upstream_sidecar.close()
            assert printed.returncode == 0, printed.stderr
            assert web_token not in printed.stdout
            listeners = json.loads(printed.stdout)["static_resources"]["listeners"]
            public = listeners[0]["filter_chains"][0]["transport_socket"]["typed_config"]
            assert public["require_client_certificate"] is True
            outbound = [chain["filter_chain_match"]["prefix_ranges"][0]["address_prefix"]
                        for chain in listeners[1]["filter_chains"]]  # fmt: skip
            assert outbound == [vip]
            # DNS under the DNS token; after the token is removed, anonymous reads nothing.
            assert dns_a(agent_dns, "web.service.consul") == (0, ["127.0.0.1"])
            local.ok("PUT", "/v1/agent/token/dns", {"Token": ""}, root)
            assert dns_a(agent_dns, "web.service.consul") == (3, [])
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
        out.close()
        notify.close()
        listener.close()


def dns_a(port: int, name: str) -> tuple[int, list[str]]:
    """One A query over UDP: (rcode, addresses)."""
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    packet = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(packet, ("127.0.0.1", port))
        reply = sock.recv(512)
    flags, answers = struct.unpack("!H", reply[2:4])[0], struct.unpack("!H", reply[6:8])[0]
    at = 12 + len(question) + 4
    found = []
    for _ in range(answers):
        found.append(socket.inet_ntoa(reply[at + 12 : at + 16]))
        at += 16
    return flags & 0xF, found


def test_verify_tokens_minted_through_the_server_serve_a_joined_agent(tmp_path: Path) -> None:
    """release.py's double_server + MeshTokens.mint: the tokens verify hands a VM exist in
    the server, so the VM's agent (joined, no baked table) registers with them."""
    tokens = mesh_tokens(["web"])
    with double_server(tmp_path / "server") as server:
        agent_http, app = free_port(), free_port()
        config_dir = tmp_path / "consul.d"
        config_dir.mkdir()
        (config_dir / "agent.json").write_text(json.dumps({
            "node_name": "verify-abc123", "datacenter": DC, "bind_addr": "127.0.0.1",
            "retry_join": [server.join], "retry_interval": "1s",
            "ports": {"http": agent_http, "dns": -1},
            "acl": {"enabled": True, "default_policy": "deny",
                    "tokens": {"agent": tokens.agent, "default": tokens.service}},
            "service": {"name": "web", "port": app},
        }))  # fmt: skip
        agent_log = tmp_path / "agent.log"
        agent = subprocess.Popen(
            [server_zipapp(tmp_path), "agent", f"-config-dir={config_dir}"],
            stdout=agent_log.open("w"), stderr=subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin", "CONSUL_FIXTURE_LOG_DIR": str(tmp_path / "log")},
        )  # fmt: skip
        try:
            # Joined before the tokens exist: the sync is refused, logged, and retried
            # (agent/ae) until the operator has minted them.
            for _ in range(600):
                if "blocked by ACLs" in agent_log.read_text():
                    break
                assert agent.poll() is None
                time.sleep(0.1)
            assert server.call("GET", "/v1/catalog/service/web", token=server.root) == []
            tokens.mint(server)
            for _ in range(600):
                found = server.call("GET", "/v1/catalog/service/web", token=server.root)
                if found:
                    break
                assert agent.poll() is None
                time.sleep(0.1)
            assert [(s["Node"], s["ServicePort"]) for s in found] == [("verify-abc123", app)]
            local = Server(server_zipapp(tmp_path), agent, agent_http, tmp_path)
            assert local.call("GET", "/v1/agent/self", token=tokens.agent)[0] == 200
            status, text = local.call("GET", "/v1/agent/self", token=tokens.service)
            assert status == 403 and "lacks permission 'agent:read'" in text
            # An unknown token is refused by the server, as real Consul refuses it.
            assert local.call("GET", "/v1/agent/self", token=str(uuid.uuid4())) == (
                403, "ACL not found",
            )  # fmt: skip
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)


def server_zipapp(folder: Path) -> Path:
    return folder / "server" / "consul"
