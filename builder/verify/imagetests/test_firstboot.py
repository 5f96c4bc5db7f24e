"""Phase "firstboot": a golden image booted WITH the minimal first-boot user data.

First boot must have moved the token from the carrier into files only consul and
envoy can read, removed the carrier, left its marker and started the mesh. Then the
mesh is proved by traffic, through Envoy's own counters (its admin, read in the VM):

- inbound: a connection from outside the VM to the service port is answered by the
  app, and Envoy's public listener counted it;
- outbound: a connection the app's user makes to an address outside the VM (a listener
  the runner keeps on the host) arrives, and Envoy's outbound listener counted it;
- bypass: the same connection as the consul user, and SSH, leave Envoy's counters alone;
- DNS: a lookup of ``<service>.service.consul`` reaches the agent's DNS port;
- sidecar down: no Consul rule is left, and the app answers directly (fail-open) or
  not at all (fail_closed); the sidecar then comes back;
- reboot: the same traffic checks pass after a reboot, with the redirect applied once.

The redirect's argv and Consul's rule layout (iptables or nft, per ``redirect_backend``)
are checked as well. The checks run in file order and change the host near the end: the
sidecar is stopped and started, then the host reboots (the LAST check). Commands run as
root (the suite turns testinfra's ``--sudo`` on). The redirect's argv is read from the
journal of the sidecar unit (meshbake-redirect logs the argv it runs), which exists
with any Consul: nothing here asks whether Consul is the real one or the test double.

``expect["traffic"]`` says where the outside ends of the connections are: ``inbound``
(an address and port on this machine that reaches the service port in the VM) and
``outbound`` (the guest's address of the runner's listener, its banner and its log).
A check whose outside end is ``null`` (``verify --host``: no listener the instance can
reach) is skipped and says so. Each traffic check records its figures (connection
counts) with ``record_property``; the runner reads them from the JUnit file.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from testinfra.host import Host

from .helpers import (
    ADMIN,
    APP_CONNECT_FAIL,
    HTTP_PROBE,
    INBOUND_CX,
    IPTABLES_CHAINS,
    NFT_CHAINS,
    ORIGINAL_DST_CONNECT_FAIL,
    OUTBOUND_CX,
    CheckFailed,
    Exchange,
    MeshIdentity,
    agent_call,
    api_call,
    consul_rules,
    deltas,
    down_for_good,
    envoy_counters,
    envoy_ready,
    guest_exchange,
    iptables_consul_rules,
    nft_table,
    require,
    restarts,
    run_with_deadline,
    short,
    tcp_exchange,
    tls_exchange,
    unit_state_command,
    unliteral,
    wait_for,
)

Record = Callable[[str, object], None]

#: The request line the guest sends to an upstream (the guest adds the final newline,
#: which ends the headers of this HTTP/1.0 request).
HTTP_LINE = "GET / HTTP/1.0\r\nHost: meshbake-verify\r\n\r"

SECRETS = "/etc/consul.d/zz-meshbake-secrets.json"
SIDECAR_TOKEN = "/etc/envoy/token"
#: The agent token, for meshbake-redirect (redirect-traffic asks GET /v1/agent/self).
REDIRECT_TOKEN = "/etc/meshbake/redirect-token"
CARRIER = "/run/meshbake/firstboot.env"
MARKER = "/var/lib/meshbake/firstboot.done"
MESH_ENV = "/etc/meshbake/mesh.env"
FIRSTBOOT = "/usr/libexec/meshbake/meshbake-firstboot"
SIDECAR = "envoy-sidecar.service"

#: Where a leaked secret could sit; searched like the baked phase does.
SEARCH_ROOTS = ("/etc", "/var", "/home", "/root", "/opt", "/srv", "/usr/libexec")

#: cloud-init keeps its own copy of the user data (root-only) for the instance's life.
#: It is not meshbake's to remove; the check asserts it stays root-only.
CLOUD_INIT_COPY = re.compile(
    r"^/var/lib/cloud/instances/[^/]+/(user-data\.txt(\.i)?|cloud-config\.txt)$"
)

#: Unrelated rules that stopping the sidecar must leave alone: an iptables nat chain
#: with a jump from OUTPUT, and an nft table with a nat chain of the same name as one of
#: Consul's (cleanup must go by table and name, not by name alone).
TEST_CHAIN = "MESHBAKE_TEST"
TEST_JUMP = f"OUTPUT -p udp --dport 9 -j {TEST_CHAIN}"
TEST_NFT_TABLE = "inet meshbake_test"

#: How long the mesh may take to come up (units active, Envoy LIVE).
MESH_TIMEOUT = 90


def active(host: Host, unit: str) -> bool:
    return bool(host.run("systemctl is-active %s", unit).stdout.strip() == "active")


def uid(host: Host, user: str) -> int:
    return int(host.check_output("id -u %s", user))


def mesh_uids(host: Host, expect: dict[str, Any]) -> dict[str, int]:
    """The uids whose traffic is never redirected: envoy's, consul's and the extras."""
    uids = {"envoy": uid(host, "envoy"), "consul": uid(host, "consul")}
    for extra in expect["exclude_uids"]:
        uids.setdefault(f"uid {extra}", int(extra))
    return uids


# --- Consul's rule layout, per backend ------------------------------------------------


class Layout:
    """Consul's rules, each expected exactly once, and nothing else in Consul's chains.

    The rules are those of ``SetupWithAdditionalRules`` in hashicorp/consul
    sdk/iptables/iptables.go and sdk/nftables/nftables.go, with the flags meshbake
    passes (command/connect/redirecttraffic/redirect_traffic.go adds DNS rules only for
    ``-consul-dns-ip``/``-consul-dns-port``, which meshbake never passes, so Consul's
    DNS chain stays empty). A rule of anyone else's inside one of Consul's chains (a
    ``return`` that bypasses the sidecar, a second redirect) is a problem too: Consul's
    redirect never writes one.
    """

    def __init__(self, chains: dict[str, list[str]]) -> None:
        self.chains = chains
        self.problems: list[str] = []
        self.matched: set[tuple[str, int]] = set()

    def once(self, chain: str, what: str, pattern: str) -> None:
        hits = [
            (chain, i)
            for i, rule in enumerate(self.chains.get(chain, []))
            if re.fullmatch(pattern, rule)
        ]
        self.matched.update(hits)
        if len(hits) != 1:
            self.problems.append(f"{what}: {len(hits)} times")

    def strangers(self, chains: tuple[str, ...]) -> list[str]:
        """The problems, with every rule of ``chains`` that no ``once`` explained."""
        return self.problems + [
            f"a rule Consul does not install, in {chain}: {rule}"
            for chain in chains
            for i, rule in enumerate(self.chains.get(chain, []))
            if (chain, i) not in self.matched
        ]


def iptables_layout_problems(
    rules: list[str], expect: dict[str, Any], uids: dict[str, int]
) -> list[str]:
    """What is wrong with Consul's chain layout in ``rules`` (``iptables -t nat -S``).

    Each chain and each jump into it must be there exactly once (twice means a redirect
    ran over a stale layout), with the RETURN rules of the exclusions, and nothing else.
    """
    chains: dict[str, list[str]] = {}
    for rule in rules:
        words = rule.split()
        if len(words) > 1 and words[0] in ("-N", "-A"):
            chains.setdefault(words[1], [])
            if words[0] == "-A":
                chains[words[1]].append(" ".join(words[2:]))
    layout = Layout(chains)
    layout.problems += [
        f"chain {c}: {n} times"
        for c in IPTABLES_CHAINS
        if (n := sum(1 for rule in rules if rule == f"-N {c}")) != 1
    ]
    layout.once(
        "PREROUTING", "jump PREROUTING -> CONSUL_PROXY_INBOUND", r".*-j CONSUL_PROXY_INBOUND"
    )
    layout.once("OUTPUT", "jump OUTPUT -> CONSUL_PROXY_OUTPUT", r".*-j CONSUL_PROXY_OUTPUT")
    inbound, output = "CONSUL_PROXY_INBOUND", "CONSUL_PROXY_OUTPUT"
    for port in dict.fromkeys(expect["inbound_exclusions"]):
        layout.once(inbound, f"inbound exclusion {port}", rf".*--dport {port} -j RETURN")
    layout.once(inbound, "inbound jump", r"-p tcp -j CONSUL_PROXY_IN_REDIRECT")
    layout.once(
        "CONSUL_PROXY_IN_REDIRECT", "inbound redirect", r"-p tcp -j REDIRECT --to-ports \d+"
    )
    for port in dict.fromkeys(expect["outbound_ports"]):
        layout.once(output, f"outbound exclusion {port}", rf".*--dport {port} -j RETURN")
    for cidr in dict.fromkeys(expect["outbound_cidrs"]):
        host = cidr if "/" in cidr else f"{cidr}/32"
        layout.once(output, f"outbound exclusion {cidr}", rf"-d {re.escape(host)} -j RETURN")
    for name, number in uids.items():
        layout.once(
            output,
            f"uid exclusion {name} ({number})",
            rf"-m owner --uid-owner {number} -j RETURN",
        )
    layout.once(output, "loopback exclusion", r"-d 127\.0\.0\.1/32 -j RETURN")
    layout.once(output, "outbound jump", r"-j CONSUL_PROXY_REDIRECT")
    layout.once("CONSUL_PROXY_REDIRECT", "outbound redirect", r"-p tcp -j REDIRECT --to-ports \d+")
    return layout.strangers(IPTABLES_CHAINS)


def nft_chains(listing: str) -> dict[str, list[str]]:
    """chain -> its rule lines, from ``nft list table`` output (a chain seen twice: ``#2``).

    >>> nft_chains("table inet t {\n chain A {\n  tcp dport 22 return\n }\n}")
    {'A': ['tcp dport 22 return']}
    """
    chains: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in listing.splitlines():
        line = " ".join(raw.split())
        match = re.fullmatch(r"chain (\S+) \{", line)
        if match:
            name = match.group(1)
            while name in chains:
                name += "#2"
            current = chains[name] = []
        elif line == "}":
            current = None
        elif current is not None and line and not line.startswith("type "):
            current.append(line)
    return chains


def nft_layout_problems(
    listing: str | None, expect: dict[str, Any], uids: dict[str, int]
) -> list[str]:
    """What is wrong with Consul's ``table inet consul_tproxy`` (``nft -nn list table``)."""
    if listing is None:
        return ["table inet consul_tproxy: missing"]
    chains = nft_chains(listing)
    layout = Layout(chains)
    layout.problems += [
        f"chain {c}: {n} times"
        for c in NFT_CHAINS
        if (n := sum(k.split("#")[0] == c for k in chains)) != 1
    ]
    nat_output, nat_prerouting = "CONSUL_NAT_OUTPUT", "CONSUL_NAT_PREROUTING"
    inbound, output = "CONSUL_PROXY_INBOUND", "CONSUL_PROXY_OUTPUT"
    tcp = r"meta l4proto (6|tcp)"
    for chain in (nat_output, nat_prerouting):
        # Not dual stack: IPv6 leaves Consul's chains at once (nfproto 10 is ipv6).
        layout.once(chain, f"IPv6 return in {chain}", r"meta nfproto (10|ipv6) return")
    layout.once(nat_prerouting, "jump -> CONSUL_PROXY_INBOUND", rf"{tcp} jump {inbound}")
    layout.once(nat_output, "jump -> CONSUL_PROXY_OUTPUT", rf"{tcp} jump {output}")
    for port in dict.fromkeys(expect["inbound_exclusions"]):
        layout.once(inbound, f"inbound exclusion {port}", rf"tcp dport {port} return")
    layout.once(inbound, "inbound jump", rf"{tcp} jump CONSUL_PROXY_IN_REDIRECT")
    layout.once("CONSUL_PROXY_IN_REDIRECT", "inbound redirect", rf"{tcp} redirect to :\d+")
    for port in dict.fromkeys(expect["outbound_ports"]):
        layout.once(output, f"outbound exclusion {port}", rf"tcp dport {port} return")
    for cidr in dict.fromkeys(expect["outbound_cidrs"]):
        # nft prints a single address without its /32 (or /128).
        address = re.sub(r"/(32|128)$", "", cidr)
        family = "ip6" if ":" in cidr else "ip"
        layout.once(
            output, f"outbound exclusion {cidr}", rf"{family} daddr {re.escape(address)} return"
        )
    for name, number in uids.items():
        layout.once(output, f"uid exclusion {name} ({number})", rf"meta skuid {number} return")
    layout.once(output, "loopback exclusion", r"ip daddr 127\.0\.0\.1 return")
    layout.once(output, "IPv6 loopback exclusion", r"ip6 daddr ::1 return")
    layout.once(output, "outbound jump", r"jump CONSUL_PROXY_REDIRECT")
    layout.once("CONSUL_PROXY_REDIRECT", "outbound redirect", rf"{tcp} redirect to :\d+")
    return layout.strangers(NFT_CHAINS)


def layout_problems(host: Host, expect: dict[str, Any]) -> list[str]:
    """Consul's rules exist exactly once, in the backend its version uses, and only there."""
    uids = mesh_uids(host, expect)
    if expect["redirect_backend"] == "nftables":
        problems = nft_layout_problems(nft_table(host), expect, uids)
        stale = iptables_consul_rules(host)
        if stale:
            problems.append(f"iptables rules of an older Consul are left too: {stale}")
        return problems
    problems = iptables_layout_problems(
        [" ".join(rule.split()) for rule in host.iptables.rules("nat")], expect, uids
    )
    if nft_table(host) is not None:
        problems.append("an nft table inet consul_tproxy exists too")
    return problems


# --- the argv of the redirect ---------------------------------------------------------


def journal_redirect_calls(host: Host) -> list[list[str]]:
    """argv of every redirect this boot, from meshbake-redirect's lines in the journal."""
    journal = host.check_output("journalctl -b --no-pager -o cat -u %s", SIDECAR)
    pattern = re.compile(r"applying redirection \(attempt \d+ of \d+\): \S+ (.*)$")
    return [m.group(1).split() for m in map(pattern.search, journal.splitlines()) if m]


def redirect_lines(host: Host) -> list[str]:
    """The raw lines that record redirect calls (to show that no token is on them)."""
    journal = host.check_output("journalctl -b --no-pager -o cat -u %s", SIDECAR)
    return [line for line in journal.splitlines() if "redirect-traffic" in line]


def applied_this_boot(host: Host) -> int:
    journal = host.check_output("journalctl -b --no-pager -o cat -u %s", SIDECAR)
    return int(journal.count("traffic redirection applied"))


def expected_redirect_argv(host: Host, expect: dict[str, Any]) -> list[str]:
    uids = mesh_uids(host, expect)
    argv = [
        f"-proxy-id={expect['proxy_id']}",
        f"-proxy-uid={uids['envoy']}",
        f"-exclude-uid={uids['consul']}",
    ]
    argv += [f"-exclude-inbound-port={p}" for p in dict.fromkeys(expect["inbound_exclusions"])]
    argv += [f"-exclude-outbound-port={p}" for p in expect["outbound_ports"]]
    argv += [f"-exclude-outbound-cidr={c}" for c in expect["outbound_cidrs"]]
    argv += [
        f"-exclude-uid={u}" for u in dict.fromkeys(expect["exclude_uids"]) if u != uids["consul"]
    ]
    if expect["acl"]:
        argv.append(f"-token-file={REDIRECT_TOKEN}")
    return argv


# --- traffic --------------------------------------------------------------------------


def mesh_state(host: Host) -> dict[str, bool]:
    """consul and the sidecar active, and Envoy's admin saying LIVE."""
    state = {unit: active(host, unit) for unit in ("consul.service", SIDECAR)}
    state["Envoy LIVE"] = state[SIDECAR] and envoy_ready(host)
    return state


def mesh_units(host: Host) -> str:
    """``systemctl show`` of consul and the sidecar, as :func:`down_for_good` reads it."""
    return str(host.run(unit_state_command("consul.service", SIDECAR)).stdout)


def wait_mesh(
    host: Host, timeout: float = MESH_TIMEOUT, since: dict[str, int] | None = None
) -> dict[str, bool]:
    """Wait for the mesh, but no longer once a unit of it is down for good: restarts
    count from ``since`` (``{}``: from boot), by default from the start of this wait, so
    that a check's own stops and restarts are never taken for failed starts."""
    if since is None:
        since = restarts(mesh_units(host))

    def settled() -> bool:
        return all(mesh_state(host).values()) or bool(down_for_good(mesh_units(host), since=since))

    wait_for(settled, timeout)
    return mesh_state(host)


def until(probe: Callable[[], bool], timeout: float) -> bool:
    """``wait_for`` with a pause between tries that suits a VM coming back."""
    return wait_for(probe, timeout, interval=5)


def require_mesh(mesh: dict[str, bool]) -> None:
    down = [what for what, up in mesh.items() if not up]
    require(not down, "consul and the sidecar active, Envoy LIVE", f"not up: {', '.join(down)}")


def require_sidecar(mesh: dict[str, bool], needs: str) -> None:
    """Fail at once, naming the cause, when the mesh was already seen down (``mesh_up``
    waited for it once): a check that needs the sidecar would only wait out its own
    deadline and then fail for that same reason."""
    down = [what for what, up in mesh.items() if not up]
    require(
        not down,
        needs,
        f"not tried: the sidecar is down (not up: {', '.join(down)}), so Envoy's admin at"
        f" {ADMIN} cannot count this check's traffic",
    )


def traffic_target(expect: dict[str, Any], end: str) -> dict[str, Any]:
    target = expect["traffic"][end]
    if target is None:
        pytest.skip(f"no {end} end reachable from here (verify --host): traffic not checked")
    return dict(target)


def inbound_exchange(expect: dict[str, Any]) -> Exchange:
    """One connection from outside the VM to the service port, with an HTTP request."""
    target = traffic_target(expect, "inbound")
    return tcp_exchange(target["address"], int(target["port"]), HTTP_PROBE)


def mesh_target(expect: dict[str, Any]) -> dict[str, Any]:
    """The control plane's side of the mesh checks (clients, upstreams, its API)."""
    mesh = expect.get("mesh")
    if mesh is None:
        pytest.skip("no control plane reachable from here (verify --host): mesh not checked")
    return dict(mesh)


def mesh_exchange(expect: dict[str, Any], client: str) -> tuple[Exchange, list[str]]:
    """One mutual-TLS connection from outside the VM to the service port, as the mesh
    client ``client`` (``allowed``, ``denied`` or ``foreign``): (exchange, the server
    certificate's SPIFFE IDs)."""
    mesh = mesh_target(expect)
    target = traffic_target(expect, "inbound")
    identity = MeshIdentity.from_expect(mesh["clients"][client])
    return tls_exchange(
        target["address"], int(target["port"]), HTTP_PROBE, identity, mesh["server_name"]
    )


def check_inbound(host: Host, expect: dict[str, Any]) -> dict[str, int]:
    """A mesh client that an intention allows reaches the app from outside the VM,
    through Envoy's public listener, which shows the service's own SPIFFE ID."""
    mesh = mesh_target(expect)
    client = mesh["clients"]["allowed"]["service"]
    before = envoy_counters(host)
    exchange, uris = mesh_exchange(expect, "allowed")
    moved = deltas(before, envoy_counters(host))
    require(
        exchange.answered
        and uris == [mesh["spiffe_id"]]
        and moved[INBOUND_CX] >= 1
        and moved[APP_CONNECT_FAIL] == 0,
        f"a mesh client ({client}, mutual TLS) from outside to port {expect['port']} is"
        f" answered by the app through Envoy's public listener, which presents"
        f" {mesh['spiffe_id']} ({INBOUND_CX} +1, {APP_CONNECT_FAIL} +0)",
        f"{exchange.describe()}; server presented {uris or 'nothing'}; {short(moved)}",
    )
    return {"inbound_connections": moved[INBOUND_CX], "inbound_reply_bytes": len(exchange.reply)}


def listener_lines(expect: dict[str, Any]) -> list[str]:
    """What the runner's host listener has received so far, one line per connection."""
    log = Path(traffic_target(expect, "outbound")["log"])
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []


def outbound_exchange(host: Host, expect: dict[str, Any], user: str) -> tuple[Exchange, bool]:
    """A connection made in the VM as ``user`` to the host listener: (exchange, arrived)."""
    target = traffic_target(expect, "outbound")
    marker = f"meshbake-verify {user} {uuid.uuid4().hex[:12]}"
    exchange = guest_exchange(host, user, target["address"], int(target["port"]), marker)
    arrived = marker in listener_lines(expect) and target["banner"] in exchange.reply
    return exchange, arrived


def check_outbound(host: Host, expect: dict[str, Any]) -> dict[str, int]:
    """The app's user reaches an address outside the VM through Envoy's outbound listener."""
    target = traffic_target(expect, "outbound")
    user = expect["app_user"]
    before = envoy_counters(host)
    exchange, arrived = outbound_exchange(host, expect, user)
    moved = deltas(before, envoy_counters(host))
    require(
        arrived and moved[OUTBOUND_CX] >= 1 and moved[ORIGINAL_DST_CONNECT_FAIL] == 0,
        f"a connection as {user} to {target['address']}:{target['port']} arrives at the"
        f" host listener through Envoy's outbound listener ({OUTBOUND_CX} +1)",
        f"{'arrived' if arrived else 'did not arrive'}, {exchange.describe()}; {short(moved)}",
    )
    return {"outbound_connections": moved[OUTBOUND_CX]}


def check_consul_bypass(host: Host, expect: dict[str, Any]) -> dict[str, int]:
    """The same connection as the consul user arrives without touching Envoy's outbound
    listener. (The inbound counter is not watched: the agent's TCP check of the sidecar,
    every 10 s, connects to the public listener, as Consul's does.)"""
    before = envoy_counters(host)
    exchange, arrived = outbound_exchange(host, expect, "consul")
    moved = deltas(before, envoy_counters(host))
    require(
        arrived and moved[OUTBOUND_CX] == 0 and moved[ORIGINAL_DST_CONNECT_FAIL] == 0,
        f"a connection as consul arrives at the host listener, and Envoy's outbound"
        f" listener does not see it ({OUTBOUND_CX} +0)",
        f"{'arrived' if arrived else 'did not arrive'}, {exchange.describe()}; {short(moved)}",
    )
    return {"consul_connections_through_envoy": moved[OUTBOUND_CX]}


def check_ssh_bypass(host: Host, connect: Callable[[], Host]) -> dict[str, int]:
    """A new SSH connection works, so port 22 is not redirected: the sidecar's public
    listener would have wanted a TLS handshake (and only the app's port has a plain path
    in permissive mode). Envoy's outbound counter does not move either. (The inbound
    counter is not watched: the agent's TCP check of the sidecar moves it every 10 s.)"""
    before = envoy_counters(host)
    fresh = connect()
    ok = bool(fresh.run("true").succeeded)
    moved = deltas(before, envoy_counters(host))
    require(
        ok and moved[OUTBOUND_CX] == 0,
        f"a new SSH connection works, and Envoy's outbound listener does not see it"
        f" ({OUTBOUND_CX} +0)",
        f"SSH {'works' if ok else 'fails'}; {short(moved)}",
    )
    return {"ssh_connections_through_envoy": moved[OUTBOUND_CX]}


def record_all(record_property: Record, figures: dict[str, int], prefix: str = "") -> None:
    for name, value in figures.items():
        record_property(prefix + name, value)


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh_up(host: Host, expect: dict[str, Any]) -> dict[str, bool]:
    """Wait (up to MESH_TIMEOUT s) for consul, the sidecar and Envoy; what is up at the end.
    The first wait after boot: every restart since boot was a failed start. Verify may
    already have found the sidecar down for good (``expect["sidecar_down"]``): then what
    is up now, at once."""
    if expect.get("sidecar_down"):
        return mesh_state(host)
    return wait_mesh(host, since={})


def digests(host: Host) -> str:
    """sha256sum lines of the first-boot files that exist (to show they did not change)."""
    return str(
        host.check_output(
            f"for f in {SECRETS} {SIDECAR_TOKEN} {REDIRECT_TOKEN} {MARKER}; do "
            'if [ -e "$f" ]; then sha256sum "$f"; fi; done'
        )
    )


# --- the secrets ----------------------------------------------------------------------


def test_consul_secrets_file(host: Host, expect: dict[str, Any]) -> None:
    if not expect["acl"]:
        pytest.skip("ACLs are off in this image: no token to deliver")
    secrets = host.file(SECRETS)
    assert secrets.exists, f"{SECRETS} is missing"
    assert (secrets.user, secrets.group, secrets.mode) == ("consul", "consul", 0o600)
    tokens = json.loads(secrets.content_string)["acl"]["tokens"]
    assert tokens["agent"] == expect["token"], f"{SECRETS} does not hold the delivered token"
    # DNS queries carry no token: the DNS token delivered answers them, else the shared
    # token, under the key this Consul answers DNS with (expect.json, from the release),
    # or every lookup is anonymous.
    want = expect["dns_token"] or (expect["token"] if expect["tokens"] == "shared" else None)
    if want is not None:
        key = expect["dns_token_key"]
        assert tokens.get(key) == want, f"{SECRETS}: not the delivered DNS token (acl.tokens.{key})"


def test_sidecar_token_file(host: Host, expect: dict[str, Any]) -> None:
    if not expect["acl"]:
        pytest.skip("ACLs are off in this image: no token to deliver")
    token = host.file(SIDECAR_TOKEN)
    assert token.exists, f"{SIDECAR_TOKEN} is missing"
    assert (token.user, token.group, token.mode) == ("envoy", "envoy", 0o600)
    value = token.content_string.strip()
    if expect["tokens"] == "shared":
        assert value == expect["token"], f"{SIDECAR_TOKEN} does not hold the delivered token"
    else:
        assert re.fullmatch(r"[0-9a-f-]{36}", value), f"{SIDECAR_TOKEN} holds no token"
        assert value != expect["token"], "tokens are separate but the sidecar has the agent's"


def test_redirect_token_file(host: Host, expect: dict[str, Any]) -> None:
    if not expect["acl"]:
        pytest.skip("ACLs are off in this image: no token to deliver")
    token = host.file(REDIRECT_TOKEN)
    assert token.exists, f"{REDIRECT_TOKEN} is missing"
    assert (token.user, token.group, token.mode) == ("root", "root", 0o600)
    value = token.content_string.strip()
    assert value == expect["token"], f"{REDIRECT_TOKEN} does not hold the agent token"


def test_carrier_removed(host: Host) -> None:
    assert not host.file(CARRIER).exists, f"the carrier {CARRIER} is still there"


def test_first_boot_marker(host: Host) -> None:
    assert host.file(MARKER).exists, f"the marker {MARKER} is missing"


def test_token_only_in_secret_files(host: Host, expect: dict[str, Any]) -> None:
    if not expect["acl"]:
        pytest.skip("ACLs are off in this image: no token was delivered")
    present = " ".join(shlex.quote(r) for r in SEARCH_ROOTS)
    result = host.run(
        f'set --; for d in {present}; do [ -d "$d" ] && set -- "$@" "$d"; done; '
        f'grep -rIlsE --devices=skip -e {shlex.quote(unliteral(expect["token"]))} -- "$@"'
    )
    found = set(result.stdout.split())
    allowed = {SECRETS, SIDECAR_TOKEN, REDIRECT_TOKEN}
    copies = {path for path in found if CLOUD_INIT_COPY.match(path)}
    stray = sorted(found - allowed - copies)
    assert not stray, f"the token is also in: {stray}"
    loose = {p: f"{host.file(p).user} {host.file(p).mode:04o}" for p in copies}
    loose = {p: m for p, m in loose.items() if m != "root 0600"}
    assert not loose, f"cloud-init's copies of the user data are not root-only: {loose}"


# --- the mesh is up and the redirect ran once, right ----------------------------------


def test_consul_and_sidecar_active(mesh_up: dict[str, bool]) -> None:
    require_mesh(mesh_up)


def monotonic(host: Host, unit: str, prop: str) -> int:
    """A unit's property in microseconds of CLOCK_MONOTONIC (0 when it never happened)."""
    return int(host.check_output("systemctl show -p %s --value %s", prop, unit) or 0)


def test_app_started_after_the_redirect(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool]
) -> None:
    """app.wait_for_mesh, from systemd's own timestamps: the app's main process started
    after the sidecar's ExecStartPre (meshbake-redirect) had put the rules in place.

    It needs the redirect to have run, not the whole mesh to be up (``mesh_up`` only
    waits for it): the order holds even when Envoy itself then fails."""
    if not expect["wait_for_mesh"]:
        pytest.skip("app.wait_for_mesh is false: the app starts without waiting for the mesh")
    app = expect["app_unit"]
    app_main = monotonic(host, app, "ExecMainStartTimestampMonotonic")
    assert app_main > 0, f"{app} never started its main process"
    restarts = monotonic(host, SIDECAR, "NRestarts")
    if restarts == 0:
        # systemd forks Envoy only once the ExecStartPre redirect has exited 0.
        envoy_main = monotonic(host, SIDECAR, "ExecMainStartTimestampMonotonic")
        assert app_main > envoy_main > 0, (
            f"{app} started at {app_main} us, before the sidecar's redirect was done "
            f"(Envoy started at {envoy_main} us)"
        )
    else:
        # The sidecar restarted: its latest start says nothing about the first one, so
        # take the first redirect of this boot from its journal line instead.
        entries = host.check_output(
            "journalctl -b --no-pager -o json --output-fields=MESSAGE -u %s", SIDECAR
        )
        applied = [
            int(entry["__MONOTONIC_TIMESTAMP"])
            for entry in map(json.loads, entries.splitlines())
            if "traffic redirection applied for" in str(entry.get("MESSAGE", ""))
        ]
        assert applied, "meshbake-redirect never applied the redirect this boot"
        assert app_main > applied[0], f"{app} started before the first redirect was applied"
    if restarts == 0 and all(mesh_up.values()):
        # The sidecar was up when the app started, and the app's journal says so.
        said = host.check_output("journalctl -b --no-pager -o cat -u %s", app)
        assert "meshbake: app: starting with the mesh" in said, f"{app}: {said[-500:]}"
        assert "starting WITHOUT the mesh" not in said, f"{app}: {said[-500:]}"


def test_redirect_argv(host: Host, expect: dict[str, Any], mesh_up: dict[str, bool]) -> None:
    calls = journal_redirect_calls(host)
    assert calls, "consul connect redirect-traffic never ran"
    argv = calls[-1]
    assert argv[:2] == ["connect", "redirect-traffic"], argv
    wanted = expected_redirect_argv(host, expect)
    require(
        sorted(argv[2:]) == sorted(wanted),
        f"redirect-traffic {' '.join(sorted(wanted))}",
        f"redirect-traffic {' '.join(sorted(argv[2:]))}",
    )
    lines = redirect_lines(host)
    assert not [line for line in lines if expect["token"] in line], "the token is on the line"
    assert not [a for a in argv if a == "-token" or a.startswith("-token=")]


def test_consul_rules_exactly_once(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool]
) -> None:
    # The rules exist exactly while the sidecar runs: without it there is nothing to see.
    require_mesh(mesh_up)
    problems = layout_problems(host, expect)
    require(
        not problems,
        f"Consul's {expect['redirect_backend']} rules exactly once, with every exclusion",
        "; ".join(problems),
    )


# --- traffic through the sidecar ------------------------------------------------------
# Outbound and the upstream come after the bypass checks: where Envoy's own connections
# are not excluded from the redirect (a broken image), an outbound connection starts a
# loop that keeps Envoy's counters moving until Envoy stops, and the bypass checks,
# which watch those counters, would fail for a reason that is not theirs.


def test_inbound_crosses_the_sidecar(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool], record_property: Record
) -> None:
    traffic_target(expect, "inbound")
    require_sidecar(mesh_up, f"a connection from outside to port {expect['port']} crosses Envoy")
    record_all(record_property, check_inbound(host, expect))


def test_plain_inbound_per_mtls_mode(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool], record_property: Record
) -> None:
    """No direct access: in strict mode a plain client from outside the VM does not
    reach the app (the public listener wants mutual TLS); in permissive mode it does."""
    mode = mesh_target(expect)["mtls_mode"]
    require_sidecar(mesh_up, f"a plain connection to port {expect['port']} meets Envoy")
    before = envoy_counters(host)
    exchange = inbound_exchange(expect)
    moved = deltas(before, envoy_counters(host))
    if mode == "strict":
        require(
            exchange.connected and not exchange.answered,
            f"strict mTLS: a plain client from outside to port {expect['port']} is taken"
            " by the sidecar and gets nothing from the app",
            f"{exchange.describe()}; {short(moved)}",
        )
    else:
        require(
            exchange.answered,
            f"permissive mTLS: a plain client from outside to port {expect['port']} is"
            " answered by the app",
            f"{exchange.describe()}; {short(moved)}",
        )
    record_property("plain_inbound_answered", int(exchange.answered))


@pytest.mark.parametrize(
    "client,why",
    [
        ("denied", "an intention denies its service"),
        ("foreign", "its certificate is signed by another CA"),
    ],
    ids=["denied", "foreign"],
)
def test_mesh_client_refused(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool], client: str, why: str
) -> None:
    """A mutual-TLS client that the mesh must refuse gets nothing from the app."""
    mesh = mesh_target(expect)
    service = mesh["clients"][client]["service"]
    require_sidecar(mesh_up, f"the sidecar refuses {service}")
    before = envoy_counters(host)
    exchange, _ = mesh_exchange(expect, client)
    moved = deltas(before, envoy_counters(host))
    # Not Envoy's counters: its TCP proxy dials the app as soon as a connection is
    # accepted, before the handshake and the RBAC filter decide.
    require(
        not exchange.answered,
        f"a mesh client as {service} ({why}) gets nothing from the app",
        f"{exchange.describe()}; {short(moved)}",
    )


def test_consul_user_bypasses_the_sidecar(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool], record_property: Record
) -> None:
    traffic_target(expect, "outbound")
    require_sidecar(mesh_up, "a connection as consul bypasses a running Envoy")
    record_all(record_property, check_consul_bypass(host, expect))


def test_ssh_bypasses_the_sidecar(
    host: Host, connect: Callable[[], Host], mesh_up: dict[str, bool], record_property: Record
) -> None:
    assert host.run("true").succeeded, "the suite's own SSH connection broke"
    require_sidecar(mesh_up, "a new SSH connection bypasses a running Envoy")
    record_all(record_property, check_ssh_bypass(host, connect))


def test_outbound_crosses_the_sidecar(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool], record_property: Record
) -> None:
    traffic_target(expect, "outbound")
    require_sidecar(mesh_up, f"a connection as {expect['app_user']} crosses Envoy outbound")
    record_all(record_property, check_outbound(host, expect))


def test_upstream_by_virtual_name(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool], record_property: Record
) -> None:
    """The app's user reaches an upstream by ``<upstream>.virtual.consul`` through its
    own sidecar when an intention allows, and not when one denies."""
    mesh = mesh_target(expect)
    user = expect["app_user"]
    require_sidecar(mesh_up, f"a connection as {user} to an upstream crosses Envoy")
    seen = {}
    for which in ("allowed", "denied"):
        upstream = mesh["upstreams"][which]
        name = f"{upstream['service']}.virtual.consul"
        exchange = guest_exchange(host, user, name, int(upstream["port"]), HTTP_LINE)
        seen[which] = (upstream, name, exchange)
    allowed, allowed_name, allowed_exchange = seen["allowed"]
    denied, denied_name, denied_exchange = seen["denied"]
    require(
        allowed["banner"] in allowed_exchange.reply,
        f"as {user}, {allowed_name} answers with {allowed['service']}'s banner",
        allowed_exchange.describe(),
    )
    require(
        denied["banner"] not in denied_exchange.reply,
        f"as {user}, {denied_name} (an intention denies it) does not answer",
        denied_exchange.describe(),
    )
    record_property("upstream_reply_bytes", len(allowed_exchange.reply))


def resolve(host: Host, name: str) -> tuple[list[str], str]:
    """The IPv4 addresses resolved (systemd-resolved, no cache) gives for ``name``, and
    what resolvectl said."""
    result = host.run("resolvectl query -4 --cache=no --legend=no %s", name)
    said = (result.stdout + result.stderr).strip()
    if result.rc != 0:
        return [], said
    return re.findall(r"\b\d+\.\d+\.\d+\.\d+\b", result.stdout), said


def dns_answers(host: Host, expect: dict[str, Any]) -> dict[str, tuple[list[str], str]]:
    mesh = mesh_target(expect)
    names = [
        f"{expect['service']}.service.consul",
        f"{mesh['upstreams']['allowed']['service']}.virtual.consul",
    ]
    return {name: resolve(host, name) for name in names}


def dns_problems(expect: dict[str, Any], answers: dict[str, tuple[list[str], str]]) -> list[str]:
    """Why the answers are not the mesh's: the service's name must give the VM's own
    address, the upstream's virtual name an address in 240.0.0.0/4."""
    mesh = mesh_target(expect)
    problems = []
    for name, (addresses, said) in answers.items():
        if name.endswith(".service.consul"):
            good = mesh["vm_address"] in addresses
        else:
            good = bool(addresses) and all(
                ipaddress.IPv4Address(a) in ipaddress.IPv4Network("240.0.0.0/4") for a in addresses
            )
        if not good:
            problems.append(f"{name}: {said[:200]}")
    return problems


def set_dns_token(host: Host, expect: dict[str, Any], token: str) -> None:
    """``PUT /v1/agent/token/dns`` on the VM's agent, as the operator (its management
    token: the call needs agent:write)."""
    mesh = mesh_target(expect)
    status, body = agent_call(
        host, "PUT", "/v1/agent/token/dns", read_secret(mesh["api"]["token_file"]),
        {"Token": token},
    )  # fmt: skip
    require(status == 200, "the agent takes a new DNS token (PUT /v1/agent/token/dns)",
            f"HTTP {status}: {body[:200]}")  # fmt: skip


def read_secret(path: str) -> str:
    return Path(path).read_text(encoding="utf-8").strip()


def test_dns_answers_under_the_dns_token(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool], record_property: Record
) -> None:
    """resolved asks the agent for ``<service>.service.consul`` and
    ``<upstream>.virtual.consul`` and gets the mesh's answers, which the agent gives
    under its DNS token: once that token is removed, neither name resolves; once it is
    back, both do again."""
    if not expect["dns_forward"]:
        pytest.skip("the spec turns DNS forwarding off: resolved does not ask Consul")
    mesh = mesh_target(expect)
    require(
        mesh_up["consul.service"],
        "a running agent to answer DNS",
        "not tried: consul.service is not active",
    )
    problems = dns_problems(expect, dns_answers(host, expect))
    require(not problems, "both names resolve to the mesh's addresses", "; ".join(problems))
    set_dns_token(host, expect, "")
    try:
        without = dns_answers(host, expect)
    finally:
        set_dns_token(host, expect, read_secret(mesh["dns_token_file"]))
    resolved = [f"{name}: {said[:120]}" for name, (addresses, said) in without.items() if addresses]
    require(not resolved, "with the agent's DNS token removed, neither name resolves",
            "; ".join(resolved))  # fmt: skip
    problems = dns_problems(expect, dns_answers(host, expect))
    require(not problems, "with the DNS token back, both names resolve again",
            "; ".join(problems))  # fmt: skip
    record_property("dns_names_checked", len(without))


def test_catalog_has_the_node_and_passing_instances(
    expect: dict[str, Any], mesh_up: dict[str, bool]
) -> None:
    """The server's catalog holds this VM's node, its service and its sidecar, each
    instance on this node with every health check passing."""
    mesh = mesh_target(expect)
    # Asked even with the sidecar down: the catalog then says so itself (its check).
    url, token = mesh["api"]["url"], read_secret(mesh["api"]["token_file"])
    problems = []
    status, nodes = api_call(url, "GET", "/v1/catalog/nodes", token)
    names = [n.get("Node") for n in nodes] if status == 200 and isinstance(nodes, list) else []
    if mesh["node"] not in names:
        problems.append(f"node {mesh['node']} not in /v1/catalog/nodes (HTTP {status}: {names})")
    for service in (expect["service"], expect["proxy_id"]):
        status, entries = api_call(url, "GET", f"/v1/health/service/{service}", token)
        mine = [
            e for e in (entries if isinstance(entries, list) else [])
            if e.get("Node", {}).get("Node") == mesh["node"]
        ]  # fmt: skip
        states = [c.get("Status") for e in mine for c in e.get("Checks", [])]
        if not mine or not states or any(state != "passing" for state in states):
            problems.append(f"{service} on {mesh['node']}: HTTP {status}, checks {states}")
    require(not problems, "the node, the service and its sidecar in the catalog, passing",
            "; ".join(problems))  # fmt: skip


#: A stand-in for the instance metadata service: the check adds the metadata address
#: to the VM's loopback and serves it there, so the connections go through the image's
#: real meshbake-imds rules without any cloud.
IMDS_ADDRESS = "169.254.169.254"
IMDS_PORT = 80
_IMDS_STAND_IN = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("169.254.169.254", 80))
s.listen(16)
s.settimeout(60)
while True:
    try:
        c, _ = s.accept()
    except OSError:  # a minute without callers: the check is over
        break
    try:
        c.recv(4096)
        c.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\nstand-in metadata\\n")
    except OSError as exc:  # one caller's trouble is the check's to see, not the end
        print("stand-in:", exc, flush=True)
    finally:
        c.close()
"""


def test_imds_only_for_root_and_allowed_users(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool], record_property: Record
) -> None:
    """Only root and the allowed users (imds.allow_users, and consul when retry_join uses
    cloud auto-join: runner.py's imds_allow_users) reach the metadata address once the
    token came in user data; everyone else is refused at once (a stand-in the check
    serves)."""
    host.check_output("ip addr replace %s/32 dev lo", IMDS_ADDRESS)
    server = host.run(
        "systemd-run --unit=meshbake-verify-imds --collect python3 -c %s", _IMDS_STAND_IN
    )
    require(server.succeeded, "the stand-in metadata server starts", server.stderr)
    try:
        up = wait_for(
            lambda: guest_exchange(host, "root", IMDS_ADDRESS, IMDS_PORT, "x").connected, 30, 1
        )
        require(up, "the stand-in metadata server accepts connections", "none within 30 s")
        seen = {
            user: guest_exchange(host, user, IMDS_ADDRESS, IMDS_PORT, "GET / HTTP/1.0\r\n")
            for user in ("root", *expect["imds_allow_users"], expect["app_user"], "nobody")
        }
        allowed = {"root", *expect["imds_allow_users"]} if expect["imds_restricted"] else set(seen)
        for user, exchange in seen.items():
            if user in allowed:
                require(
                    exchange.answered, f"{user} reaches the metadata address", exchange.describe()
                )
            else:
                require(
                    not exchange.connected and "Refused" in exchange.error,
                    f"{user} is refused at once by the metadata address",
                    exchange.describe(),
                )
        record_property("imds_refused_users", sum(u not in allowed for u in seen))
    finally:
        host.run("systemctl stop meshbake-verify-imds")
        host.run("ip addr del %s/32 dev lo", IMDS_ADDRESS)


def test_envoy_admin_only_for_root_and_envoy(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool], record_property: Record
) -> None:
    """Envoy's admin port (config_dump, quitquitquit) refuses every local user but root
    and envoy at once, and a refused POST /quitquitquit leaves the sidecar running."""
    require_mesh(mesh_up)
    address, port = ADMIN.rsplit(":", 1)
    pid = host.check_output("systemctl show -p MainPID --value %s", SIDECAR)
    for user in ("root", "envoy"):
        exchange = guest_exchange(host, user, address, int(port), "GET /ready HTTP/1.0\r\n")
        require(exchange.connected, f"{user} reaches Envoy's admin", exchange.describe())
    refused = ("consul", expect["app_user"], "nobody")
    for user in refused:
        for line in ("GET /config_dump HTTP/1.0\r\n", "POST /quitquitquit HTTP/1.0\r\n"):
            exchange = guest_exchange(host, user, address, int(port), line)
            require(
                not exchange.connected and "Refused" in exchange.error,
                f"{user} is refused at once by Envoy's admin ({line.split()[1]})",
                exchange.describe(),
            )
    now = host.check_output("systemctl show -p MainPID --value %s", SIDECAR)
    require(now == pid and envoy_ready(host), "the sidecar still runs", f"MainPID {pid} -> {now}")
    record_property("admin_refused_users", len(refused))


#: Run inside the VM as root: ask Envoy's admin (argv[1]) to quit, as any user could.
_GUEST_QUIT = """
import sys, urllib.request
url = "http://" + sys.argv[1] + "/quitquitquit"
print(urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5).status)
"""


def test_token_not_in_processes(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool]
) -> None:
    token = expect["token"]
    args = host.check_output("ps -eo args")
    assert token not in args, "the token is on a command line"
    units = host.check_output("systemctl show -p Environment consul.service %s", SIDECAR)
    assert token not in units, "the token is in a unit's Environment="
    environ = host.run(
        "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < \"$f\"; done 2>/dev/null"
    ).stdout
    assert token not in environ, "the token is in a process environment"


def test_token_not_in_journal(host: Host, expect: dict[str, Any]) -> None:
    journal = host.check_output("journalctl -b --no-pager -o cat")
    assert expect["token"] not in journal, "the token is in the journal"


# --- re-runs, stop, reboot (these change the host; keep them last, reboot at the end) ---


def test_firstboot_rerun_is_noop(host: Host, mesh_up: dict[str, bool]) -> None:
    before = digests(host)
    # A carrier with a different (dummy, non-secret) token must be ignored and removed.
    dummy = "00000000-0000-4000-8000-00000000beef"
    host.check_output(
        f"mkdir -p /run/meshbake && (umask 077 && "
        f"printf 'MESHBAKE_AGENT_TOKEN=%s\\n' {dummy} > {CARRIER})"
    )
    result = host.run(f"MESHBAKE_ENV_FILE={MESH_ENV} {FIRSTBOOT}")
    assert result.rc == 0, f"re-run failed (rc {result.rc}): {result.stderr}"
    assert "already ran" in result.stderr, result.stderr
    assert digests(host) == before, "a re-run changed the secrets or the marker"
    assert not host.file(CARRIER).exists, "a re-run left the carrier behind"


def add_unrelated_rules(host: Host, backend: str) -> None:
    if backend == "nftables":
        host.check_output(
            f"nft add table {TEST_NFT_TABLE} && nft add chain {TEST_NFT_TABLE}"
            " CONSUL_PROXY_OUTPUT '{ type nat hook output priority 100 ; }'"
        )
    else:
        host.check_output(
            f"iptables -w -t nat -N {TEST_CHAIN} && iptables -w -t nat -A {TEST_JUMP}"
        )


def unrelated_rules_left(host: Host, backend: str) -> bool:
    if backend == "nftables":
        listing = nft_table(host, TEST_NFT_TABLE) or ""
        return "chain CONSUL_PROXY_OUTPUT" in listing
    rules = [" ".join(rule.split()) for rule in host.iptables.rules("nat")]
    return f"-N {TEST_CHAIN}" in rules and any(
        r.startswith("-A OUTPUT") and r.endswith(f"-j {TEST_CHAIN}") for r in rules
    )


def remove_unrelated_rules(host: Host, backend: str) -> None:
    if backend == "nftables":
        host.run(f"nft delete table {TEST_NFT_TABLE}")
    else:
        host.run(f"iptables -w -t nat -D {TEST_JUMP}; iptables -w -t nat -X {TEST_CHAIN}")


def test_sidecar_restarts_after_a_clean_exit(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool], record_property: Record
) -> None:
    """POST /quitquitquit makes Envoy exit 0; systemd restarts the sidecar all the same
    (Restart=always), and the mesh is up again."""
    require_mesh(mesh_up)

    def show(prop: str) -> str:
        return str(host.check_output("systemctl show -p %s --value %s", prop, SIDECAR))

    pid, restarts = show("MainPID"), int(show("NRestarts") or 0)
    quit_ = host.run("python3 -c %s %s", _GUEST_QUIT, ADMIN)
    require(quit_.succeeded, "root's POST /quitquitquit is answered", quit_.stderr)
    back = wait_for(
        lambda: int(show("NRestarts") or 0) > restarts and show("MainPID") not in ("0", pid),
        60,
        1,
    )
    require(
        back, "systemd restarts the sidecar after Envoy exits 0", f"NRestarts {show('NRestarts')}"
    )
    # test_sidecar_down checks the rules after a restart; here only that it came back.
    require_mesh(wait_mesh(host))
    record_property("sidecar_restarts", int(show("NRestarts") or 0) - restarts)


def test_sidecar_down(
    host: Host,
    expect: dict[str, Any],
    connect: Callable[[], Host],
    mesh_up: dict[str, bool],
    record_property: Record,
) -> None:
    """Stop the sidecar: Consul's rules go, nothing else; the app answers directly
    (fail-open) or not at all (fail_closed); then the sidecar comes back and carries
    traffic again."""
    require_sidecar(mesh_up, "a running sidecar to stop and start again")
    backend = expect["redirect_backend"]
    add_unrelated_rules(host, backend)
    try:
        host.check_output("systemctl stop %s", SIDECAR)
        left = {name: rules for name, rules in consul_rules(host).items() if rules}
        require(not left, "no Consul rule once the sidecar stopped", f"left: {left}")
        require(
            unrelated_rules_left(host, backend),
            f"an unrelated {backend} rule survives the sidecar's stop",
            "it was removed",
        )
        exchange = inbound_exchange(expect)
        if expect["fail_closed"]:
            require(
                not exchange.answered,
                f"fail_closed: a connection from outside to port {expect['port']} is refused",
                exchange.describe(),
            )
            fresh = connect()
            require(bool(fresh.run("true").succeeded), "SSH still works", "it does not")
        else:
            require(
                exchange.answered,
                f"fail-open: the app answers a connection to port {expect['port']} directly",
                exchange.describe(),
            )
        record_property("answered_with_sidecar_down", int(exchange.answered))
    finally:
        remove_unrelated_rules(host, backend)
        before_start = restarts(mesh_units(host))
        host.run("systemctl start %s", SIDECAR)
    require_mesh(wait_mesh(host, since=before_start))
    problems = layout_problems(host, expect)
    require(not problems, "after a restart, Consul's rules once", "; ".join(problems))
    record_all(record_property, check_inbound(host, expect), "after_restart_")


def test_reboot_keeps_the_mesh(
    host: Host,
    expect: dict[str, Any],
    connect: Callable[[], Host],
    mesh_up: dict[str, bool],
    record_property: Record,
) -> None:
    """After a reboot the redirect is applied once and traffic crosses the sidecar again."""
    require_sidecar(mesh_up, "a mesh that came up, to come up again after a reboot")
    boot_id = host.check_output("cat /proc/sys/kernel/random/boot_id")
    secrets_before = digests(host)
    # A timer lets this command return before the connection drops.
    run_with_deadline(lambda: host.run("systemd-run --no-block --on-active=2 systemctl reboot"), 30)

    def back() -> bool:
        fresh = connect()
        now = fresh.check_output("cat /proc/sys/kernel/random/boot_id")
        return bool(now and now != boot_id)

    def up() -> bool:
        return all(mesh_state(connect()).values())

    # Every probe uses a new connection with a deadline: a connection made before the
    # redirect is applied at boot stops answering once it is (its replies are NATed
    # into Envoy), so the checks below use one made after the mesh came up.
    require(
        until(lambda: bool(run_with_deadline(back, 45)), 420),
        "the host back within 420 s of the reboot",
        "it is not",
    )
    until(lambda: bool(run_with_deadline(up, 45)), MESH_TIMEOUT)
    rebooted = connect()
    require_mesh(mesh_state(rebooted))
    problems = layout_problems(rebooted, expect)
    require(not problems, "after reboot, Consul's rules once", "; ".join(problems))
    applied = applied_this_boot(rebooted)
    require(applied == 1, "the redirect applied once this boot", f"{applied} times")
    require(digests(rebooted) == secrets_before, "secrets and marker unchanged", "they changed")
    figures: dict[str, int] = {}
    failures: list[str] = []
    # In file order: outbound last, since a redirect loop it may start would move the
    # counters the bypass checks watch.
    checks: list[Callable[[], dict[str, int]]] = []
    if expect["traffic"]["inbound"] is not None:
        checks.append(lambda: check_inbound(rebooted, expect))
    if expect["traffic"]["outbound"] is not None:
        checks.append(lambda: check_consul_bypass(rebooted, expect))
    checks.append(lambda: check_ssh_bypass(rebooted, connect))
    if expect["traffic"]["outbound"] is not None:
        checks.append(lambda: check_outbound(rebooted, expect))
    for check in checks:
        try:
            figures |= check()
        except CheckFailed as exc:
            failures.append(str(exc).replace("\n", "; "))
    record_all(record_property, figures, "after_reboot_")
    require(not failures, "the traffic checks pass after the reboot", " | ".join(failures))
