"""The fixture consul (``tests/fixtures/consul``) is a TEST DOUBLE: these tests hold it
to what real Consul does, so that a test passing against the double means something.

The agent double runs on this host's loopback, on free ports (``ports.http`` in its
config, ``CONSUL_HTTP_ADDR`` for the commands), so no root is needed here; the
redirect rules are tested in network namespaces in test_netns.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from builder.spec import compat
from tests.fixtures.release import double_server
from tests.paths import REPO

FIXTURE_CONSUL = REPO / "tests" / "fixtures" / "consul"
TOKEN = "5d1c0f7e-0b4e-4a57-8f0c-2f7b0a4c9e11"
SVC_ACCESSOR = "3f0e8a52-1c7d-4b9e-a6f2-5d8c0b1e7a43"
NODE_ACCESSOR = "9b2d4f61-7e3a-4c8b-b1d5-0a6e2f9c3d87"

pytestmark = pytest.mark.integration


def load_double() -> SimpleNamespace:
    """The double's names, from the modules of its package that the tests read."""
    from tests.fixtures.consul_double import common, envoy

    return SimpleNamespace(**{**vars(common), **vars(envoy)})


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MESHBAKE_", "CONSUL_", "NOTIFY_SOCKET", "RUNTIME_DIRECTORY"))
    }
    env["CONSUL_FIXTURE_LOG_DIR"] = os.fspath(tmp_path / "log")
    env.update(extra)
    return env


SERVICE = {
    "service": {
        "name": "web",
        "port": 8080,
        "connect": {"sidecar_service": {"proxy": {"mode": "transparent"}}},
    }
}


@dataclass
class RunningAgent:
    process: subprocess.Popen[str]
    http: int
    dns: int
    tmp: Path

    def env(self, **extra: str) -> dict[str, str]:
        return base_env(self.tmp, CONSUL_HTTP_ADDR=f"127.0.0.1:{self.http}", **extra)

    def consul(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FIXTURE_CONSUL, *args],
            env=self.env(**extra),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def log(self, name: str = "calls") -> list[str]:
        logs = sorted((self.tmp / "log").glob(f"{name}-*.log"))
        return [line for path in logs for line in path.read_text().splitlines()]


@pytest.fixture(autouse=True)
def servers() -> Iterator[contextlib.ExitStack]:
    """The double servers this module's agents join, stopped after each test."""
    with contextlib.ExitStack() as stack:
        yield stack


def start_agent(
    tmp_path: Path, services: list[dict[str, Any]], servers: contextlib.ExitStack, **env: str
) -> RunningAgent:
    """A client agent joined to its own double server on loopback, with ACLs on: TOKEN is
    the identity of each service in ``services``, minted through the server's ACL API, as
    are the agent's node identity and its DNS token (``builtin/dns``)."""
    server = servers.enter_context(double_server(tmp_path / "server"))
    names = sorted({str(s["service"]["name"]) for s in services})
    agent_token, dns_token = str(uuid.uuid4()), str(uuid.uuid4())
    for fields in (
        {"SecretID": TOKEN, "ServiceIdentities": [{"ServiceName": name} for name in names]},
        {"SecretID": agent_token, "NodeIdentities": [{"NodeName": "web-1", "Datacenter": "dc1"}]},
        {"SecretID": dns_token, "TemplatedPolicies": [{"TemplateName": "builtin/dns"}]},
    ):
        server.call("PUT", "/v1/acl/token", fields, server.root)
    config_dir = tmp_path / "consul.d"
    config_dir.mkdir(exist_ok=True)
    http, dns = free_port(), free_port(socket.SOCK_DGRAM)
    config = {
        "node_name": "web-1", "datacenter": "dc1", "bind_addr": "127.0.0.1",
        "retry_join": [server.join], "retry_interval": "1s",
        "ports": {"http": http, "dns": dns, "grpc": 8502},
        "acl": {"enabled": True, "default_policy": "deny",
                "tokens": {"agent": agent_token, "default": TOKEN, "dns": dns_token}},
    }  # fmt: skip
    (config_dir / "consul.json").write_text(json.dumps(config))
    for i, service in enumerate(services):
        (config_dir / f"service-{i}.json").write_text(json.dumps(service))
    process = subprocess.Popen(
        [FIXTURE_CONSUL, "agent", f"-config-dir={config_dir}"],
        env=base_env(tmp_path, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    agent = RunningAgent(process, http, dns, tmp_path)
    for _ in range(500):
        if process.poll() is not None:
            raise AssertionError(
                f"agent double exited: {process.stdout.read() if process.stdout else ''}"
            )
        # Ready when its node is in the server's catalog: joined and synced.
        nodes = server.call("GET", "/v1/catalog/nodes", token=server.root)
        if "web-1" in [n["Node"] for n in nodes]:
            return agent
        time.sleep(0.05)
    raise AssertionError("agent double never joined its server")


@pytest.fixture
def agent(tmp_path: Path, servers: contextlib.ExitStack) -> Iterator[RunningAgent]:
    running = start_agent(tmp_path, [SERVICE], servers)
    try:
        yield running
    finally:
        stop(running.process)


def stop(process: subprocess.Popen[str]) -> int:
    """End an agent double this test started; never leave it running."""
    process.terminate()
    try:
        return process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def fake_envoy(tmp_path: Path, version: str) -> Path:
    """A stand-in ``envoy``: ``--version`` prints real Envoy's line; otherwise it records argv."""
    script = tmp_path / f"envoy-{version}"
    record = tmp_path / f"envoy-{version}.argv"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then\n'
        f"  printf '\\n%s  version: 9e5580933739775e8bce696a57a2e1bc99368f23/{version}"
        '/Clean/RELEASE/BoringSSL\\n\\n\' "$0"\n'
        "  exit 0\n"
        "fi\n"
        f'printf "%s\\n" "$@" > {shlex.quote(os.fspath(record))}\n'
    )
    script.chmod(0o755)
    return script


def connect_envoy(
    agent: RunningAgent, consul: str, envoy: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    runtime = agent.tmp / "runtime"
    runtime.mkdir(exist_ok=True)
    return agent.consul(
        "connect",
        "envoy",
        "-sidecar-for=web",
        "-grpc-addr=127.0.0.1:8502",
        "-admin-bind=127.0.0.1:19000",
        f"-envoy-binary={envoy}",
        *extra,
        CONSUL_FIXTURE_VERSION=consul,
        RUNTIME_DIRECTORY=os.fspath(runtime),
        CONSUL_HTTP_TOKEN=TOKEN,
    )


# --- the table ---------------------------------------------------------------------------


def test_double_carries_the_same_envoy_versions_as_compat() -> None:
    double = load_double()
    assert {
        line: row.envoy_versions for line, row in compat.CONSUL_LINES.items()
    } == double.ENVOY_VERSIONS
    for line in double.ENVOY_VERSIONS:
        low, high = double.envoy_range(f"{line}.0")
        expected = compat.ConsulRelease.of(f"{line}.0").envoy
        assert expected is not None, line
        assert (low, high) == (expected.low, expected.high), line


def edges() -> list[tuple[str, str, bool]]:
    """(consul, envoy, accepted) at both edges of every row, from the rows themselves."""
    cases = []
    for line, row in compat.CONSUL_LINES.items():
        low = tuple(int(p) for p in row.envoy_versions[-1].split(".")[:2])
        high = tuple(int(p) for p in row.envoy_versions[0].split(".")[:2])
        consul = f"{line}.1"
        cases += [
            (consul, f"{low[0]}.{low[1]}.0", True),
            (consul, f"{low[0]}.{low[1] - 1}.99", False),
            (consul, f"{high[0]}.{high[1]}.99", True),
            (consul, f"{high[0]}.{high[1] + 1}.0", False),
        ]
    return cases


@pytest.mark.parametrize(("consul", "envoy", "accepted"), edges())
def test_connect_envoy_applies_the_version_rule_at_its_edges(
    agent: RunningAgent, consul: str, envoy: str, accepted: bool
) -> None:
    binary = fake_envoy(agent.tmp, envoy)
    result = connect_envoy(agent, consul, binary)
    record = agent.tmp / f"envoy-{envoy}.argv"
    if accepted:
        assert result.returncode == 0, result.stderr
        assert record.exists(), "the double did not exec envoy"
    else:
        minor = ".".join(envoy.split(".")[:2])
        assert result.returncode == 1
        # command/connect/envoy/envoy.go, word for word.
        assert (
            f"Envoy version {minor}.x is not supported. If there is a reason you need to use "
            "this version of envoy use the ignore-envoy-compatibility flag." in result.stderr
        )
        assert not record.exists(), "a refused envoy was started"


def test_ignore_envoy_compatibility_starts_a_refused_envoy(agent: RunningAgent) -> None:
    binary = fake_envoy(agent.tmp, "1.38.3")
    refused = connect_envoy(agent, "1.22.1", binary)
    assert refused.returncode == 1
    started = connect_envoy(agent, "1.22.1", binary, "-ignore-envoy-compatibility")
    assert started.returncode == 0, started.stderr
    assert (agent.tmp / "envoy-1.38.3.argv").exists()


def test_unknown_consul_line_is_refused_by_the_double(agent: RunningAgent) -> None:
    result = connect_envoy(agent, "1.19.0", fake_envoy(agent.tmp, "1.28.0"))
    assert result.returncode == 1
    assert "no ENVOY_VERSIONS for Consul 1.19" in result.stderr


# --- connect envoy ---------------------------------------------------------------------


def test_connect_envoy_execs_envoy_with_a_bootstrap_and_its_lds_cds_files(
    agent: RunningAgent,
) -> None:
    token_file = agent.tmp / "token"
    token_file.write_text(TOKEN)
    binary = fake_envoy(agent.tmp, "1.38.3")
    result = connect_envoy(
        agent, "2.1.0", binary, f"-token-file={token_file}", "--", "--log-level", "warn"
    )
    assert result.returncode == 0, result.stderr
    argv = (agent.tmp / "envoy-1.38.3.argv").read_text().splitlines()
    bootstrap_path = agent.tmp / "runtime" / "web-sidecar-proxy-bootstrap.json"
    # command/connect/envoy/exec_unix.go: --config-path, --disable-hot-restart, then passthrough.
    assert argv == [
        "--config-path",
        os.fspath(bootstrap_path),
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]
    text = bootstrap_path.read_text()
    assert TOKEN not in text
    assert TOKEN not in "\n".join(agent.log())
    config = json.loads(text)
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 19000,
    }
    # Listeners and clusters come from LDS/CDS files that the watcher rewrites.
    files = agent.tmp / "runtime" / "web-sidecar-proxy-xds"
    assert config["dynamic_resources"]["lds_config"]["path_config_source"] == {
        "path": os.fspath(files / "lds.json")
    }
    assert config["dynamic_resources"]["cds_config"]["path_config_source"] == {
        "path": os.fspath(files / "cds.json")
    }
    lds, cds = (json.loads((files / name).read_text()) for name in ("lds.json", "cds.json"))
    assert TOKEN not in json.dumps([lds, cds])
    listeners = {item["name"]: item for item in lds["resources"]}
    public = listeners["public_listener:0.0.0.0:21000"]
    assert public["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 21000}
    # agent/xds/listeners.go: the public listener is mutual TLS with the leaf the agent
    # had the server sign for web, then RBAC from the intentions (none: default deny).
    tls = public["filter_chains"][0]["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    rbac = public["filter_chains"][0]["filters"][0]["typed_config"]["rules"]
    assert rbac == {"action": "ALLOW", "policies": {}}
    assert listeners["outbound_listener:127.0.0.1:15001"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 15001,
    }
    clusters = {item["name"]: item for item in cds["resources"]}
    app = clusters["local_app"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert app["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 8080,
    }
    assert clusters["original-destination"]["type"] == "ORIGINAL_DST"


def test_connect_envoy_without_a_registered_sidecar_fails_like_consul(
    agent: RunningAgent,
) -> None:
    result = agent.consul(
        "connect",
        "envoy",
        "-sidecar-for=api",
        f"-envoy-binary={fake_envoy(agent.tmp, '1.38.3')}",
        CONSUL_FIXTURE_VERSION="2.1.0",
    )
    assert result.returncode == 1
    # command/connect/proxy/proxy.go LookupProxyIDForSidecar
    assert result.stderr.strip() == "No sidecar proxy registered for api"


def test_connect_envoy_without_an_agent_fails(tmp_path: Path) -> None:
    result = subprocess.run(
        [FIXTURE_CONSUL, "connect", "envoy", "-sidecar-for=web"],
        env=base_env(tmp_path, CONSUL_HTTP_ADDR=f"127.0.0.1:{free_port()}"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "Failed looking up sidecar proxy info for web" in result.stderr
    assert "connection refused" in result.stderr.lower()


def test_a_sidecar_with_its_own_port_and_a_second_service(
    tmp_path: Path, servers: contextlib.ExitStack
) -> None:
    # agent/sidecar_service.go: an explicit port wins; others take the lowest free one.
    pinned = {
        "service": {
            "name": "api",
            "port": 9090,
            "connect": {"sidecar_service": {"port": 21005, "proxy": {"mode": "transparent"}}},
        }
    }
    running = start_agent(tmp_path, [SERVICE, pinned], servers)
    try:
        result = running.consul(
            "connect", "envoy", "-sidecar-for=api", "-bootstrap", CONSUL_HTTP_TOKEN=TOKEN
        )
        assert result.returncode == 0, result.stderr
        listeners = json.loads(result.stdout)["static_resources"]["listeners"]
        assert listeners[0]["address"]["socket_address"]["port_value"] == 21005
        web = running.consul(
            "connect", "envoy", "-sidecar-for=web", "-bootstrap", CONSUL_HTTP_TOKEN=TOKEN
        )
        port = json.loads(web.stdout)["static_resources"]["listeners"][0]["address"]
        assert port["socket_address"]["port_value"] == 21000
    finally:
        running.process.terminate()
        running.process.wait(10)


# --- version, log, readiness, DNS ------------------------------------------------------


@pytest.mark.parametrize("version", ["2.1.0", "2.0.0", "1.22.1"])
def test_version_is_shaped_like_consuls(tmp_path: Path, version: str) -> None:
    result = subprocess.run(
        [FIXTURE_CONSUL, "version"],
        env=base_env(tmp_path, CONSUL_FIXTURE_VERSION=version),
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == f"Consul v{version}"
    assert lines[1].startswith("Revision ")
    assert lines[3].startswith("Protocol 2 spoken by default")


def test_the_call_log_never_holds_a_token(tmp_path: Path) -> None:
    env = base_env(tmp_path, CONSUL_HTTP_ADDR=f"127.0.0.1:{free_port()}")
    for argv in (["-token", TOKEN], [f"-token={TOKEN}"], [f"--token={TOKEN}"]):
        subprocess.run(
            [FIXTURE_CONSUL, "connect", "envoy", *argv, "-sidecar-for=web"],
            env=env,
            capture_output=True,
            check=False,
        )
    text = "".join(p.read_text() for p in (tmp_path / "log").iterdir())
    assert TOKEN not in text
    assert text.count("<redacted>") == 3


def test_agent_notifies_systemd_when_ready(tmp_path: Path, servers: contextlib.ExitStack) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fspath(path))
        sock.settimeout(30)
        running = start_agent(tmp_path, [SERVICE], servers, NOTIFY_SOCKET=os.fspath(path))
        try:
            message = sock.recv(4096).decode()
        finally:
            assert stop(running.process) == 0
    assert "READY=1" in message.splitlines()


def dns_query(port: int, name: str, qtype: int = 1) -> tuple[int, list[str]]:
    """(rcode, A records) for one UDP query to 127.0.0.1:port."""
    query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    query += struct.pack("!HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(query, ("127.0.0.1", port))
        reply = sock.recv(4096)
    qid, flags, _, ancount = struct.unpack("!HHHH", reply[:8])
    assert qid == 0x1234 and flags & 0x8000
    records = []
    pos = len(query)
    for _ in range(ancount):
        rtype, _, _, rdlen = struct.unpack("!HHIH", reply[pos + 2 : pos + 12])
        data = reply[pos + 12 : pos + 12 + rdlen]
        if rtype == 1:
            records.append(socket.inet_ntoa(data))
        pos += 12 + rdlen
    return flags & 0xF, records


def test_agent_answers_service_lookups_over_dns(agent: RunningAgent) -> None:
    rcode, records = dns_query(agent.dns, "web.service.consul")
    assert rcode == 0
    assert len(records) == 1
    assert dns_query(agent.dns, "nope.service.consul") == (3, [])
    log = agent.log("dns")
    assert any("\tweb.service.consul.\t1\t" in line for line in log)
    assert any("\tnope.service.consul.\t1\tNXDOMAIN" in line for line in log)


def test_agent_stops_on_sigterm(agent: RunningAgent) -> None:
    assert stop(agent.process) == 0


# --- ACLs: Consul's rule evaluation, in the double server's state ------------------------


class ServerAcl:
    """The double server's ACL state (``state.py``), its tokens made through the calls
    behind ``PUT /v1/acl/policy`` and ``PUT /v1/acl/token`` with the bootstrap token.
    Each token is named by its ``SecretID`` here; the server gets a UUID for it."""

    def __init__(self, tokens: list[dict[str, Any]], datacenter: str) -> None:
        from tests.fixtures.consul_double.state import ServerState

        self.state = ServerState(datacenter, "server-1", "127.0.0.1")
        root = self.state.resolve(self.state.bootstrap()["SecretID"])
        self.secrets: dict[str, str] = {}
        for token in tokens:
            for policy in token.get("Policies", []):
                self.state.set_policy(root, policy)
            self.secrets[token["SecretID"]] = str(uuid.uuid4())
            document = {k: v for k, v in token.items() if k not in ("SecretID", "Policies")}
            links = [{"Name": policy["Name"]} for policy in token.get("Policies", [])]
            document |= {"SecretID": self.secrets[token["SecretID"]], "Policies": links}
            self.state.set_token(root, document)

    def check(self, name: str, resource: str, segment: str, access: str) -> str | None:
        """None when the token may, else Consul's refusal (acl/errors.go)."""
        from tests.fixtures.consul_double.state import Denied

        try:
            caller = self.state.resolve(self.secrets.get(name, name))
        except Denied as error:
            return str(error)
        if caller.authz.allows(resource, segment, access):
            return None
        return str(caller.denied(f"{resource}:{access}", segment))


def acl_table(*tokens: dict[str, Any], datacenter: str = "dc1") -> ServerAcl:
    return ServerAcl(list(tokens), datacenter)


def rules(**blocks: dict[str, str]) -> str:
    """Consul's JSON rule syntax: {"agent": {"n1": {"policy": "read"}}, ...}."""
    return json.dumps(
        {
            kind: {name: {"policy": level} for name, level in names.items()}
            for kind, names in blocks.items()
        }
    )


def test_identities_expand_to_consuls_synthetic_policies() -> None:
    # agent/structs/acl_ce.go: neither identity grants agent:read.
    table = acl_table(
        {
            "SecretID": "svc",
            "AccessorID": SVC_ACCESSOR,
            "ServiceIdentities": [{"ServiceName": "web"}],
        },
        {
            "SecretID": "node",
            "AccessorID": NODE_ACCESSOR,
            "NodeIdentities": [{"NodeName": "n1", "Datacenter": "dc1"}],
        },
        {"SecretID": "far", "NodeIdentities": [{"NodeName": "n1", "Datacenter": "dc2"}]},
    )
    assert table.check("svc", "service", "web-sidecar-proxy", "write") is None
    assert table.check("svc", "service", "api", "read") is None
    assert table.check("svc", "service", "api", "write") is not None
    assert table.check("svc", "node", "n1", "read") is None
    assert table.check("node", "node", "n1", "write") is None
    assert table.check("node", "service", "web", "read") is None
    assert table.check("node", "agent", "n1", "read") == (
        f"Permission denied: token with AccessorID '{NODE_ACCESSOR}' lacks permission "
        "'agent:read' on \"n1\""
    )
    assert table.check("svc", "agent", "n1", "read") is not None
    # A node identity holds only in its own datacenter.
    assert table.check("far", "node", "n1", "write") is not None


def test_exact_beats_prefix_and_deny_beats_write() -> None:
    table = acl_table(
        {
            "SecretID": "t",
            "Policies": [
                {"Name": "wide", "Rules": rules(agent_prefix={"": "read", "n": "write"})},
                {"Name": "narrow", "Rules": rules(agent={"n1": "deny"})},
                {"Name": "both", "Rules": rules(agent={"n2": "write"})},
                {"Name": "deny", "Rules": rules(agent={"n2": "deny"})},
            ],
        }
    )
    assert table.check("t", "agent", "n1", "read") is not None  # exact deny
    assert table.check("t", "agent", "n3", "write") is None  # longest prefix "n"
    assert table.check("t", "agent", "x", "read") is None  # prefix ""
    assert table.check("t", "agent", "x", "write") is not None
    assert table.check("t", "agent", "n2", "read") is not None  # deny wins the merge


def test_builtin_dns_reads_but_cannot_read_the_agent() -> None:
    table = acl_table({"SecretID": "dns", "TemplatedPolicies": [{"TemplateName": "builtin/dns"}]})
    assert table.check("dns", "service", "web", "read") is None
    assert table.check("dns", "node", "n1", "read") is None
    assert table.check("dns", "agent", "n1", "read") is not None


def test_unknown_and_missing_tokens_are_refused_with_consuls_words() -> None:
    table = acl_table()
    assert table.check("not-in-table", "service", "web", "read") == "ACL not found"
    assert table.check("", "agent", "n1", "read") == (
        "Permission denied: anonymous token lacks permission 'agent:read' on \"n1\". The "
        "anonymous token is used implicitly when a request does not specify a token."
    )


def test_a_hcl_rule_is_refused_not_guessed() -> None:
    from tests.fixtures.consul_double.state import BadRequest

    token = {
        "SecretID": "t",
        "Policies": [{"Name": "p", "Rules": 'agent "n1" { policy = "read" }'}],
    }
    with pytest.raises(BadRequest, match="not JSON rules.*this double reads JSON rules"):
        acl_table(token)


@pytest.mark.parametrize(
    "joins",
    [pytest.param(["provider=aws tag_key=consul tag_value=meshbake"], id="provider"),
     pytest.param([], id="none")],
)  # fmt: skip
def test_an_agent_with_no_server_to_join_is_never_ready(tmp_path: Path, joins: list[str]) -> None:
    """agent/retry_join.go: a ``provider=`` entry that discovers nothing fails each attempt
    with "No servers to join", retried every ``retry_interval``; no entry at all makes no
    attempt. agent/agent.go ``JoinLAN``: READY=1 only after a join, so neither is ready.
    agent/ae: the state sync finds "No known Consul servers", and so does every ACL check
    the agent would ask a server for."""
    http = free_port()
    config_dir = tmp_path / "consul.d"
    config_dir.mkdir()
    config = {
        "node_name": "web-1", "datacenter": "dc1", "retry_join": joins, "retry_interval": "1s",
        "ports": {"http": http, "dns": -1},
        "acl": {"enabled": True, "default_policy": "deny", "tokens": {"agent": TOKEN}},
    }  # fmt: skip
    (config_dir / "consul.json").write_text(json.dumps(config))
    (config_dir / "service.json").write_text(json.dumps(SERVICE))
    log = tmp_path / "agent.log"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        log.open("w") as out,
    ):
        notify.bind(os.fspath(tmp_path / "notify"))
        process = subprocess.Popen(
            [FIXTURE_CONSUL, "agent", f"-config-dir={config_dir}"],
            env=base_env(tmp_path, NOTIFY_SOCKET=os.fspath(tmp_path / "notify")),
            stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            for _ in range(300):
                text = log.read_text()
                if joins and text.count("Join cluster failed, will retry") >= 2:
                    break
                if not joins and "No known Consul servers" in text:
                    break
                assert process.poll() is None, text
                time.sleep(0.05)
            else:
                raise AssertionError(log.read_text())
            notify.setblocking(False)
            with pytest.raises(BlockingIOError):
                notify.recv(4096)
            request = urllib.request.Request(
                f"http://127.0.0.1:{http}/v1/agent/services", headers={"X-Consul-Token": TOKEN}
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 500
            assert refused.value.read().decode() == "No known Consul servers"
        finally:
            assert stop(process) == 0
    text = log.read_text()
    if joins:
        assert 'Cannot discover address: cluster=LAN address="provider=aws' in text
        assert 'error="No servers to join"' in text
    else:
        assert "Joining cluster" not in text
