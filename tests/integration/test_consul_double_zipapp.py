"""The fixture release's ``consul`` zipapp as a server, started with MESH-CONTRACT.md's
command line under Debian 12's /usr/bin/python3, and its ``connect envoy`` giving a
registered service a real Envoy whose public listener speaks mutual TLS only.

A TEST of the TEST DOUBLE, on loopback: no VM, no namespace.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.release import zipapp_bytes
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


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """The zipapp, run as real Consul's server is run (MESH-CONTRACT.md)."""
    consul = tmp_path / "consul"
    consul.write_bytes(zipapp_bytes("2.1.0"))
    consul.chmod(0o755)
    assert consul.read_bytes().startswith(b"#!/usr/bin/python3 -I\n")
    http, dns = free_port(), free_port()
    config = tmp_path / "server.json"
    config.write_text(json.dumps({
        "acl": {"enabled": True, "default_policy": "deny", "enable_token_persistence": True},
        "connect": {"enabled": True},
        "ports": {"http": http, "dns": dns, "grpc": 8502},
    }))  # fmt: skip
    process = subprocess.Popen(
        [consul, "agent", "-server", "-bootstrap-expect=1", "-node=meshbake-server",
         f"-datacenter={DC}", "-bind=127.0.0.1", "-client=127.0.0.1",
         f"-data-dir={tmp_path / 'data'}", f"-config-file={config}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={"PATH": "/usr/bin:/bin", "CONSUL_FIXTURE_LOG_DIR": str(tmp_path / "log")},
    )  # fmt: skip
    running = Server(consul, process, http, tmp_path)
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


def test_bad_server_config_is_one_line_naming_the_field(tmp_path: Path) -> None:
    consul = tmp_path / "consul"
    consul.write_bytes(zipapp_bytes("2.1.0"))
    consul.chmod(0o755)
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
