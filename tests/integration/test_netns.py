"""meshbake-cleanup and meshbake-redirect against real iptables in a throwaway netns.

Each test gets its own network namespace (``ip netns add meshbake-test-<random>``), so
the host's own rules are never read or touched. Consul itself is played by the
fixture consul (``tests/fixtures/consul``), a test double: its ``connect
redirect-traffic`` builds Consul's nat chain layout with real iptables and, like the
real command, fails when the chains already exist. What these tests prove is
therefore about meshbake's scripts and that layout, not about a real Consul binary.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shlex
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

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

pytestmark = pytest.mark.integration
# The CI runs as root, so this skip never hides anything there.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any MESHBAKE_*/CONSUL_*/IPTABLES settings, plus extra."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MESHBAKE_", "CONSUL_", "IPTABLES", "IP6TABLES"))
    }
    env.update(extra)
    return env


@dataclass(frozen=True)
class Netns:
    """A network namespace created for one test.

    >>> ns.ok("iptables", "-t", "nat", "-S").stdout
    """

    name: str

    def run(
        self, *argv: str | os.PathLike[str], env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *map(os.fspath, argv)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def ok(
        self, *argv: str | os.PathLike[str], env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = self.run(*argv, env=env)
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


def _make_netns() -> Iterator[Netns]:
    name = f"meshbake-test-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
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
    return [line for line in text.splitlines() if "CONSUL_" in line]


@dataclass(frozen=True)
class Mesh:
    """A mesh.env, token file and fixture log directory in a tmp dir."""

    dir: Path
    env_file: Path
    token_file: Path
    log_dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        settings = {
            "MESHBAKE_ENV_FILE": str(self.env_file),
            "MESHBAKE_SIDECAR_TOKEN_FILE": str(self.token_file),
            "MESHBAKE_REDIRECT_ATTEMPTS": "1",
            "CONSUL_FIXTURE_LOG_DIR": str(self.log_dir),
        }
        return clean_env(**(settings | extra))

    def calls(self) -> list[list[str]]:
        """The fixture consul's logged argv lists, oldest first."""
        log = self.log_dir / f"calls-{pwd.getpwuid(os.geteuid()).pw_name}.log"
        if not log.exists():
            return []
        return [shlex.split(line.split("\t", 1)[1]) for line in log.read_text().splitlines()]


def write_mesh(tmp_path: Path, consul_bin: Path = FIXTURE_CONSUL, **settings: str) -> Mesh:
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
    }
    values.update(settings)
    env_file = tmp_path / "mesh.env"
    env_file.write_text("".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items()))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    return Mesh(tmp_path, env_file, token_file, tmp_path / "fixture-log")


# Rules that have nothing to do with Consul, some added before Consul's layout and
# some after it, so that Consul's jumps sit between them. The comment mentions a
# CONSUL_ chain on purpose: text is not a jump. CONSUL_NOT_NAT lives in filter,
# which cleanup must never touch.
UNRELATED_BEFORE = [
    ("nat", "-A PREROUTING -p tcp --dport 8080 -j DNAT --to-destination 127.0.0.1:8081"),
    ("nat", "-N MY_CHAIN"),
    ("nat", "-A MY_CHAIN -p tcp --dport 9000 -j RETURN"),
    ("nat", "-A OUTPUT -p tcp -j MY_CHAIN"),
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
    netns: Netns, reference_netns: Netns, tmp_path: Path
) -> None:
    add_rules(netns, UNRELATED_BEFORE)
    netns.ok(
        FIXTURE_CONSUL,
        "connect",
        "redirect-traffic",
        "-proxy-id=web-sidecar-proxy",
        f"-proxy-uid={uid(ENVOY_USER)}",
        f"-exclude-uid={uid(CONSUL_USER)}",
        "-exclude-inbound-port=22",
        "-exclude-outbound-port=5432",
        "-exclude-outbound-cidr=10.0.0.0/8",
        env=clean_env(CONSUL_FIXTURE_LOG_DIR=str(tmp_path)),
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

    netns.ok(CLEANUP, env=clean_env())

    after = netns.all_rules()
    for table in ("nat", "ip6 nat"):
        for line in after[table].splitlines():
            assert not line.startswith(("-N CONSUL_", "-A CONSUL_")), (table, line)
            assert not line.endswith(tuple(f"-j {chain}" for chain in CONSUL_CHAINS)), (table, line)
    assert after == reference_netns.all_rules()


@pytest.mark.root
@needs_root
def test_cleanup_with_nothing_there_is_a_noop(netns: Netns) -> None:
    add_rules(netns, UNRELATED_BEFORE)
    before = netns.all_rules()
    for _ in range(2):
        result = netns.ok(CLEANUP, env=clean_env())
        assert "nothing to remove" in result.stderr
    assert netns.all_rules() == before


@pytest.mark.root
@needs_root
def test_fixture_refuses_existing_chains_like_consul(netns: Netns, tmp_path: Path) -> None:
    # This is why meshbake-redirect must clean up first.
    env = clean_env(CONSUL_FIXTURE_LOG_DIR=str(tmp_path))
    argv = [
        FIXTURE_CONSUL,
        "connect",
        "redirect-traffic",
        "-proxy-id=web-sidecar-proxy",
        "-proxy-uid=65534",
    ]
    netns.ok(*argv, env=env)
    second = netns.run(*argv, env=env)
    assert second.returncode != 0
    assert "Chain already exists" in second.stderr


@pytest.mark.root
@needs_root
def test_redirect_twice_keeps_one_copy_of_each_rule(netns: Netns, tmp_path: Path) -> None:
    mesh = write_mesh(tmp_path)
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
def test_redirect_recovers_from_a_half_applied_crash(netns: Netns, tmp_path: Path) -> None:
    mesh = write_mesh(tmp_path)
    netns.ok(REDIRECT, env=mesh.env())
    expected = netns.rules("nat")
    netns.ok(CLEANUP, env=clean_env())
    # What a crash in the middle of redirect-traffic leaves behind.
    netns.iptables("nat", "-N CONSUL_PROXY_INBOUND")
    netns.iptables("nat", "-N CONSUL_PROXY_OUTPUT")
    netns.iptables("nat", "-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT")

    netns.ok(REDIRECT, env=mesh.env())
    assert netns.rules("nat") == expected


@pytest.mark.root
@needs_root
def test_redirect_honours_exclude_ssh_off(netns: Netns, tmp_path: Path) -> None:
    """exclude_ssh: false renders an empty list; SSH is then really redirected."""
    mesh = write_mesh(tmp_path, MESHBAKE_EXCLUDE_INBOUND_PORTS="")
    netns.ok(REDIRECT, env=mesh.env())
    (call,) = mesh.calls()
    assert not [a for a in call if a.startswith("-exclude-inbound-port")]
    nat = netns.ok("iptables", "-t", "nat", "-S").stdout
    assert "--dport 22 -j RETURN" not in nat


@pytest.mark.root
@needs_root
def test_redirect_argv_with_mesh_env_defaults(netns: Netns, tmp_path: Path) -> None:
    mesh = write_mesh(tmp_path)
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
def test_redirect_argv_with_spec_exclusions(netns: Netns, tmp_path: Path) -> None:
    mesh = write_mesh(
        tmp_path,
        MESHBAKE_EXCLUDE_INBOUND_PORTS="22 8080 9090:9099",
        MESHBAKE_EXCLUDE_OUTBOUND_PORTS="5432 6379",
        MESHBAKE_EXCLUDE_OUTBOUND_CIDRS="10.0.0.0/8 169.254.169.254/32",
        MESHBAKE_EXCLUDE_UIDS=f"1234 {uid(CONSUL_USER)}",
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
def test_redirect_without_acl_passes_no_token_file(netns: Netns, tmp_path: Path) -> None:
    mesh = write_mesh(tmp_path, MESHBAKE_ACL="false")
    netns.ok(REDIRECT, env=mesh.env())
    (argv,) = mesh.calls()
    assert not [arg for arg in argv if arg.startswith("-token")]


@pytest.mark.root
@needs_root
def test_redirect_refuses_to_run_without_a_token(netns: Netns, tmp_path: Path) -> None:
    mesh = write_mesh(tmp_path)
    mesh.token_file.unlink()
    result = netns.run(REDIRECT, env=mesh.env())
    assert result.returncode == 1
    assert result.stderr.startswith("meshbake-redirect: ACLs are on but the token file")
    assert mesh.calls() == []
    assert consul_lines(netns.rules("nat")) == []


@pytest.mark.root
@needs_root
def test_failed_redirect_leaves_no_half_applied_rules(netns: Netns, tmp_path: Path) -> None:
    # A consul that dies after its first chain, as the real one can when iptables fails.
    broken = tmp_path / "broken-consul"
    broken.write_text("#!/bin/sh\niptables -t nat -N CONSUL_PROXY_INBOUND\nexit 1\n")
    broken.chmod(0o755)
    mesh = write_mesh(tmp_path, consul_bin=broken)

    result = netns.run(
        REDIRECT, env=mesh.env(MESHBAKE_REDIRECT_ATTEMPTS="2", MESHBAKE_REDIRECT_DELAY="0")
    )
    assert result.returncode == 1
    assert "retrying" in result.stderr
    assert "after 2 attempt(s); traffic is NOT redirected" in result.stderr
    assert consul_lines(netns.rules("nat")) == []


def shebang_scripts() -> list[Path]:
    scripts = [
        path
        for path in sorted(SCRIPTS.iterdir())
        if path.is_file() and path.read_bytes().startswith(b"#!")
    ]
    return [*scripts, FIXTURE_CONSUL]


def test_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is part of the test toolchain: apt-get install shellcheck"
    files = shebang_scripts()
    assert REDIRECT in files and CLEANUP in files
    result = subprocess.run(
        [shellcheck, *map(os.fspath, files)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
