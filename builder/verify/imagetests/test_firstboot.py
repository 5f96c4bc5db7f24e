"""Phase "firstboot": a golden image booted WITH the minimal first-boot user data.

First boot must have moved the token from the carrier into files only consul and
envoy can read, removed the carrier, left its marker and started the mesh; the
redirect must have run once with exactly the expected arguments, SSH must survive it,
re-runs must be no-ops, stopping the sidecar must remove Consul's chains and nothing
else, and a reboot must apply the redirection again, once.

The checks run in file order and change the host near the end: the sidecar is
stopped and started, then the host reboots (the LAST check). Commands run as root (the
suite turns testinfra's ``--sudo`` on). Where ``expect["fixture"]`` is true, consul is
the fixture test double, whose argv log is read; with a real consul the journal of the
sidecar unit (meshbake-redirect logs the argv it runs) stands in for it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from testinfra.host import Host

SECRETS = "/etc/consul.d/zz-meshbake-secrets.json"
SIDECAR_TOKEN = "/etc/envoy/token"
CARRIER = "/run/meshbake/firstboot.env"
MARKER = "/var/lib/meshbake/firstboot.done"
MESH_ENV = "/etc/meshbake/mesh.env"
FIRSTBOOT = "/usr/libexec/meshbake/meshbake-firstboot"
FIXTURE_ROOT_LOG = "/var/tmp/consul-fixture/calls-root.log"
SIDECAR = "envoy-sidecar.service"

#: The chains Consul's redirect-traffic creates in the nat table.
CONSUL_CHAINS = (
    "CONSUL_PROXY_INBOUND",
    "CONSUL_PROXY_IN_REDIRECT",
    "CONSUL_PROXY_OUTPUT",
    "CONSUL_PROXY_REDIRECT",
    "CONSUL_DNS_REDIRECT",
)

#: Where a leaked secret could sit; searched like the baked phase does.
SEARCH_ROOTS = ("/etc", "/var", "/home", "/root", "/opt", "/srv", "/usr/libexec")

#: cloud-init keeps its own copy of the user data (root-only) for the instance's life.
#: It is not meshbake's to remove; the check asserts it stays root-only.
CLOUD_INIT_COPY = re.compile(
    r"^/var/lib/cloud/instances/[^/]+/(user-data\.txt(\.i)?|cloud-config\.txt)$"
)

#: An unrelated nat rule that stopping the sidecar must leave alone.
TEST_CHAIN = "MESHBAKE_TEST"
TEST_JUMP = f"OUTPUT -p udp --dport 9 -j {TEST_CHAIN}"


def wait_for(probe: Callable[[], bool], timeout: float, interval: float = 2.0) -> bool:
    """Call ``probe`` until it returns true or ``timeout`` seconds have passed.

    >>> wait_for(lambda: host.service("consul.service").is_running, 60)
    True
    """
    deadline = time.monotonic() + timeout
    while True:
        if probe():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def unliteral(text: str) -> str:
    """An extended regex that matches ``text`` but does not contain it (see test_baked)."""
    out = []
    bracketed = False
    for ch in text:
        if ch.isalnum() and not bracketed:
            out.append(f"[{ch}]")
            bracketed = True
        elif ch.isalnum() or ch in "-_:@/,=%":
            out.append(ch)
        else:
            out.append("\\" + ch)
    return "".join(out)


def active(host: Host, unit: str) -> bool:
    return bool(host.run("systemctl is-active %s", unit).stdout.strip() == "active")


def uid(host: Host, user: str) -> int:
    return int(host.check_output("id -u %s", user))


def nat_rules(host: Host) -> list[str]:
    return [" ".join(rule.split()) for rule in host.iptables.rules("nat")]


def layout_problems(rules: list[str], expect: dict[str, Any], uids: dict[str, int]) -> list[str]:
    """What is wrong with Consul's chain layout in ``rules`` (``iptables -t nat -S``).

    Each chain and each jump into it must be there exactly once (twice means a redirect
    ran over a stale layout), with the RETURN rules of the exclusions.
    """
    problems = []

    def once(what: str, pattern: str) -> None:
        n = sum(1 for rule in rules if re.fullmatch(pattern, rule))
        if n != 1:
            problems.append(f"{what}: {n} times")

    for chain in CONSUL_CHAINS:
        once(f"chain {chain}", f"-N {chain}")
    once("jump PREROUTING -> CONSUL_PROXY_INBOUND", r"-A PREROUTING .*-j CONSUL_PROXY_INBOUND")
    once("jump OUTPUT -> CONSUL_PROXY_OUTPUT", r"-A OUTPUT .*-j CONSUL_PROXY_OUTPUT")
    for port in expect["inbound_exclusions"]:
        once(f"inbound exclusion {port}", rf"-A CONSUL_PROXY_INBOUND .*--dport {port} -j RETURN")
    for port in expect["outbound_ports"]:
        once(f"outbound exclusion {port}", rf"-A CONSUL_PROXY_OUTPUT .*--dport {port} -j RETURN")
    for name, number in uids.items():
        once(
            f"uid exclusion {name} ({number})",
            rf"-A CONSUL_PROXY_OUTPUT -m owner --uid-owner {number} -j RETURN",
        )
    return problems


def mesh_uids(host: Host, expect: dict[str, Any]) -> dict[str, int]:
    """The uids whose traffic is never redirected: envoy's, consul's and the extras."""
    uids = {"envoy": uid(host, "envoy"), "consul": uid(host, "consul")}
    for extra in expect["exclude_uids"]:
        uids.setdefault(f"uid {extra}", int(extra))
    return uids


# --- the argv of the redirect ---------------------------------------------------------


def fixture_redirect_calls(host: Host) -> list[list[str]]:
    """argv of every ``connect redirect-traffic`` the fixture consul logged as root."""
    log = host.file(FIXTURE_ROOT_LOG)
    if not log.exists:
        return []
    calls = []
    for line in log.content_string.splitlines():
        _, _, quoted = line.partition("\t")
        argv = shlex.split(quoted)
        if argv[:2] == ["connect", "redirect-traffic"]:
            calls.append(argv)
    return calls


def journal_redirect_calls(host: Host) -> list[list[str]]:
    """argv of every redirect this boot, from meshbake-redirect's lines in the journal."""
    journal = host.check_output("journalctl -b --no-pager -o cat -u %s", SIDECAR)
    pattern = re.compile(r"applying redirection \(attempt \d+ of \d+\): \S+ (.*)$")
    return [m.group(1).split() for m in map(pattern.search, journal.splitlines()) if m]


def redirect_lines(host: Host, expect: dict[str, Any]) -> list[str]:
    """The raw lines that record redirect calls (to show that no token is on them)."""
    if expect["fixture"]:
        log = host.file(FIXTURE_ROOT_LOG)
        text = log.content_string if log.exists else ""
        return [line for line in text.splitlines() if "redirect-traffic" in line]
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
        argv.append(f"-token-file={SIDECAR_TOKEN}")
    return argv


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh_up(host: Host) -> dict[str, bool]:
    """Wait (up to 60 s) for consul and the sidecar; map unit -> active at the end."""
    units = ("consul.service", SIDECAR)
    wait_for(lambda: all(active(host, u) for u in units), 60)
    return {unit: active(host, unit) for unit in units}


def digests(host: Host) -> str:
    """sha256sum lines of the first-boot files that exist (to show they did not change)."""
    return str(
        host.check_output(
            f"for f in {SECRETS} {SIDECAR_TOKEN} {MARKER}; do "
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
    allowed = {SECRETS, SIDECAR_TOKEN}
    copies = {path for path in found if CLOUD_INIT_COPY.match(path)}
    stray = sorted(found - allowed - copies)
    assert not stray, f"the token is also in: {stray}"
    loose = {p: f"{host.file(p).user} {host.file(p).mode:04o}" for p in copies}
    loose = {p: m for p, m in loose.items() if m != "root 0600"}
    assert not loose, f"cloud-init's copies of the user data are not root-only: {loose}"


# --- the mesh is up and the redirect ran once, right ----------------------------------


def test_consul_and_sidecar_active(mesh_up: dict[str, bool]) -> None:
    down = [unit for unit, up in mesh_up.items() if not up]
    assert not down, f"not active 60 s after boot: {down}"


def test_redirect_argv(host: Host, expect: dict[str, Any], mesh_up: dict[str, bool]) -> None:
    calls = fixture_redirect_calls(host) if expect["fixture"] else journal_redirect_calls(host)
    assert calls, "consul connect redirect-traffic never ran"
    argv = calls[-1]
    if not expect["fixture"]:
        assert argv[:2] == ["connect", "redirect-traffic"], argv
    wanted = expected_redirect_argv(host, expect)
    assert sorted(argv[2:]) == sorted(wanted), f"redirect-traffic ran as {argv}"
    lines = redirect_lines(host, expect)
    assert not [line for line in lines if expect["token"] in line], "the token is on the line"
    assert not [a for a in argv if a == "-token" or a.startswith("-token=")]


def test_nat_chains_exactly_once(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool]
) -> None:
    problems = layout_problems(nat_rules(host), expect, mesh_uids(host, expect))
    assert not problems, "Consul's nat layout is wrong: " + "; ".join(problems)


def test_app_answers_through_the_redirect(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool]
) -> None:
    # Loopback traffic is not redirected, so the app stays reachable locally.
    code = (
        "import urllib.request\n"
        f"print(urllib.request.urlopen('http://127.0.0.1:{int(expect['port'])}/', timeout=5)"
        ".status)\n"
    )
    if host.run("command -v python3").rc != 0:
        pytest.skip("no python3 in the image to make the request")
    status = host.run("python3 -c %s", code).stdout.strip()
    assert status == "200", f"GET 127.0.0.1:{expect['port']} gave {status!r}"


def test_ssh_survives_redirect(
    host: Host, connect: Callable[[], Host], mesh_up: dict[str, bool]
) -> None:
    assert host.run("true").succeeded, "the suite's own SSH connection broke"
    fresh = connect()
    assert fresh.run("true").succeeded, "a new SSH connection fails after the redirect"


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


def test_stopping_sidecar_removes_only_consul_chains(
    host: Host, expect: dict[str, Any], mesh_up: dict[str, bool]
) -> None:
    host.check_output(f"iptables -w -t nat -N {TEST_CHAIN} && iptables -w -t nat -A {TEST_JUMP}")
    try:
        host.check_output("systemctl stop %s", SIDECAR)
        rules = nat_rules(host)
        left = [rule for rule in rules if "CONSUL_" in rule]
        assert not left, f"stopping the sidecar left Consul rules: {left}"
        assert f"-N {TEST_CHAIN}" in rules, "stopping the sidecar removed an unrelated chain"
        assert any(r.startswith("-A OUTPUT") and r.endswith(f"-j {TEST_CHAIN}") for r in rules), (
            "stopping the sidecar removed an unrelated OUTPUT rule"
        )
        host.check_output("systemctl start %s", SIDECAR)
        assert wait_for(lambda: active(host, SIDECAR), 60), "the sidecar did not start again"
        problems = layout_problems(nat_rules(host), expect, mesh_uids(host, expect))
        assert not problems, "after a restart: " + "; ".join(problems)
    finally:
        host.run(f"iptables -w -t nat -D {TEST_JUMP}; iptables -w -t nat -X {TEST_CHAIN}")
        host.run("systemctl start %s", SIDECAR)


def run_with_deadline(call: Callable[[], Any], seconds: float) -> Any:
    """``call()`` in a thread; ``None`` when it raises or outlives ``seconds``.

    An SSH command can hang forever when the VM resets under it.
    """
    box: list[Any] = []

    def target() -> None:
        # Any failure (refused, reset, banner timeout) only means "not back yet".
        with contextlib.suppress(Exception):
            box.append(call())

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return box[0] if box else None


def test_reboot_reapplies_redirect_once(
    host: Host, expect: dict[str, Any], connect: Callable[[], Host], mesh_up: dict[str, bool]
) -> None:
    boot_id = host.check_output("cat /proc/sys/kernel/random/boot_id")
    calls_before = len(fixture_redirect_calls(host)) if expect["fixture"] else 0
    secrets_before = digests(host)
    # A timer lets this command return before the connection drops.
    run_with_deadline(lambda: host.run("systemd-run --no-block --on-active=2 systemctl reboot"), 30)

    def back() -> Host | None:
        fresh = connect()
        now = fresh.check_output("cat /proc/sys/kernel/random/boot_id")
        return fresh if now and now != boot_id else None

    deadline = time.monotonic() + 420
    rebooted: Host | None = None
    while rebooted is None and time.monotonic() < deadline:
        rebooted = run_with_deadline(back, 45)
        if rebooted is None:
            time.sleep(5)
    assert rebooted is not None, "the host did not come back within 420 s of the reboot"

    assert wait_for(lambda: active(rebooted, SIDECAR), 90), "the sidecar is not active after reboot"
    problems = layout_problems(nat_rules(rebooted), expect, mesh_uids(rebooted, expect))
    assert not problems, "after reboot: " + "; ".join(problems)
    if expect["fixture"]:
        calls_after = len(fixture_redirect_calls(rebooted))
        assert calls_after == calls_before + 1, (
            f"{calls_after - calls_before} redirect calls at reboot, not 1"
        )
    else:
        assert applied_this_boot(rebooted) == 1, "the redirect was not applied exactly once"
    assert digests(rebooted) == secrets_before, "the reboot changed the secrets or the marker"
