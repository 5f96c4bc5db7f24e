"""What the image suites share: waiting, failure text, traffic probes, Envoy's counters.

Imported relatively (``from .helpers import ...``), so the suites work from a checkout
and from the installed wheel alike; like ``conftest.py`` it needs nothing but pytest,
testinfra and the standard library. The runner (``builder/verify/runner.py``) uses
:func:`tcp_exchange` for its own first-boot probe, so both measure a connection the same
way.

The traffic probes prove the mesh by what crosses it, not by its configuration:

* a TCP exchange from outside the VM (here, the machine that runs the suite);
* a TCP exchange made inside the VM as a given user (``setpriv``, numeric ids);
* Envoy's own counters from its admin interface, read inside the VM.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from testinfra.host import Host

#: Envoy's admin interface, on loopback only (the sidecar's -admin-bind).
ADMIN = "127.0.0.1:19000"

#: Envoy's counters for the two listeners Consul gives a transparent sidecar
#: (stat_prefix of their tcp_proxy filters; see /tmp/envoy-spike/README.md).
INBOUND_CX = "tcp.public_listener.downstream_cx_total"
OUTBOUND_CX = "tcp.upstream.original-destination.downstream_cx_total"
#: Envoy accepted but could not reach the app / the original destination.
APP_CONNECT_FAIL = "cluster.local_app.upstream_cx_connect_fail"
ORIGINAL_DST_CONNECT_FAIL = "cluster.original-destination.upstream_cx_connect_fail"
COUNTERS = (INBOUND_CX, OUTBOUND_CX, APP_CONNECT_FAIL, ORIGINAL_DST_CONNECT_FAIL)

#: Consul's chains, by backend: iptables' nat table (sdk/iptables) and nft's
#: ``table inet consul_tproxy`` (sdk/nftables, Consul 2.1 and later).
IPTABLES_CHAINS = (
    "CONSUL_PROXY_INBOUND",
    "CONSUL_PROXY_IN_REDIRECT",
    "CONSUL_PROXY_OUTPUT",
    "CONSUL_PROXY_REDIRECT",
    "CONSUL_DNS_REDIRECT",
)
NFT_TABLE = "inet consul_tproxy"
NFT_CHAINS = (*IPTABLES_CHAINS, "CONSUL_NAT_OUTPUT", "CONSUL_NAT_PREROUTING")


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
    """An extended regex that matches ``text`` but does not contain it.

    The search runs through sudo, which logs its command line; with the token spelled
    this way the log never holds the very string being searched for.

    >>> unliteral("4d3c-1")
    '[4]d3c-1'
    """
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


# --- failure text ---------------------------------------------------------------------


class CheckFailed(AssertionError):
    """A failed check, worded for the report: what was expected, what was seen."""

    def __init__(self, expected: str, seen: str) -> None:
        super().__init__(f"expected: {expected}\nseen: {seen}")
        self.expected = expected
        self.seen = seen


def require(ok: bool, expected: str, seen: str) -> None:
    """Raise :class:`CheckFailed` unless ``ok``.

    >>> require(1 + 1 == 3, "1 + 1 == 3", "2")
    Traceback (most recent call last):
    CheckFailed: expected: 1 + 1 == 3
    seen: 2
    """
    if not ok:
        raise CheckFailed(expected, seen)


# --- connections ----------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One TCP connection: did it connect, what came back, what went wrong."""

    connected: bool
    reply: str = ""
    error: str = ""

    @property
    def answered(self) -> bool:
        return bool(self.reply)

    def describe(self) -> str:
        if self.answered:
            first = self.reply.splitlines()[0] if self.reply.strip() else repr(self.reply)
            return f"answered {first[:120]!r}"
        if self.connected:
            return "connected, then closed without a reply" + (
                f" ({self.error})" if self.error else ""
            )
        return f"no connection ({self.error or 'refused'})"


#: A request that any HTTP app answers and any TCP app at least reads.
HTTP_PROBE = b"GET / HTTP/1.0\r\nHost: meshbake-verify\r\nUser-Agent: meshbake-verify\r\n\r\n"


def tcp_exchange(address: str, port: int, payload: bytes, timeout: float = 5.0) -> Exchange:
    """Connect to ``address:port``, send ``payload``, read until the peer closes."""
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        return Exchange(False, error=f"{type(exc).__name__}: {exc}")
    data = b""
    error = ""
    with sock:
        try:
            sock.sendall(payload)
            while len(data) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
    return Exchange(True, data.decode("utf-8", "replace"), error)


@dataclass(frozen=True)
class MeshIdentity:
    """A mesh client's certificate: a leaf of the mesh CA (or of another CA) for a
    service, and the CA that the client trusts for the server's certificate."""

    service: str
    cert: str
    key: str
    ca: str

    @classmethod
    def from_expect(cls, entry: Mapping[str, str]) -> MeshIdentity:
        return cls(entry["service"], entry["cert"], entry["key"], entry["ca"])


def spiffe_uris(peer: Mapping[str, Any] | None) -> list[str]:
    """The URI SANs of a peer certificate as ``ssl`` decodes it.

    >>> spiffe_uris({"subjectAltName": (("URI", "spiffe://t/ns/default/dc/dc1/svc/web"),)})
    ['spiffe://t/ns/default/dc/dc1/svc/web']
    """
    return [value for kind, value in (peer or {}).get("subjectAltName", ()) if kind == "URI"]


def tls_exchange(
    address: str,
    port: int,
    payload: bytes,
    identity: MeshIdentity,
    server_name: str,
    timeout: float = 5.0,
) -> tuple[Exchange, list[str]]:
    """Connect with mutual TLS as ``identity`` (SNI ``server_name``), send ``payload``,
    read until the peer closes: (the exchange, the server certificate's URI SANs).

    The server's certificate must chain to ``identity.ca``; its SPIFFE ID is returned
    for the caller to compare (Python's ``ssl`` checks DNS names only). A refused
    handshake is a connection without a reply, with the TLS error.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # Consul's leaves carry SPIFFE URIs, not host names
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(identity.ca)
    context.load_cert_chain(identity.cert, identity.key)
    try:
        raw = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        return Exchange(False, error=f"{type(exc).__name__}: {exc}"), []
    data = b""
    uris: list[str] = []
    with contextlib.closing(raw):
        try:
            with context.wrap_socket(raw, server_hostname=server_name) as sock:
                uris = spiffe_uris(sock.getpeercert())
                sock.sendall(payload)
                while len(data) < 65536:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
        except (OSError, ssl.SSLError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            return Exchange(True, data.decode("utf-8", "replace"), error), uris
    return Exchange(True, data.decode("utf-8", "replace")), uris


def http_call(
    sock: Any, method: str, host_port: str, path: str, token: str, body: Any = None
) -> tuple[int, str]:
    """One HTTP/1.0 request on a connected socket (or SSH channel) to Consul's API:
    (status, body). The token goes in ``X-Consul-Token``, never in a URL or an argv."""
    data = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{method} {path} HTTP/1.0\r\nHost: {host_port}\r\nX-Consul-Token: {token}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    reply = b""
    while len(reply) < 4 * 1024 * 1024:
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    header, _, payload = reply.partition(b"\r\n\r\n")
    status = header.split(b" ", 2)[1:2]
    return (int(status[0]) if status and status[0].isdigit() else 0), payload.decode(
        "utf-8", "replace"
    )


def agent_call(
    host: Host, method: str, path: str, token: str, body: Any = None, port: int = 8500
) -> tuple[int, str]:
    """Call the VM's own Consul agent (127.0.0.1:``port`` inside the VM) through an SSH
    channel of the suite's connection, so that no token appears in a command line, a
    process list or the VM's journal (sudo logs the commands it runs)."""
    transport = host.backend.client.get_transport()
    channel = transport.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0))
    channel.settimeout(30)
    try:
        return http_call(channel, method, f"127.0.0.1:{port}", path, token, body)
    finally:
        channel.close()


def api_call(url: str, method: str, path: str, token: str) -> tuple[int, Any]:
    """Call a Consul server's HTTP API at ``url`` (``http://127.0.0.1:PORT``): (status,
    the decoded JSON body, or its text when it is not JSON)."""
    address, _, port = url.removeprefix("http://").partition(":")
    with socket.create_connection((address, int(port)), timeout=30) as sock:
        status, text = http_call(sock, method, f"{address}:{port}", path, token)
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


#: Runs inside the VM (python3, which cloud-init needs anyway): the guest side of
#: :func:`tcp_exchange`, printed as JSON with the guest's CLOCK_MONOTONIC at connect.
_GUEST_EXCHANGE = """
import json, socket, sys, time
address, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode() + b"\\n"
out = {"connected": False, "reply": "", "error": "", "monotonic": time.monotonic()}
try:
    s = socket.create_connection((address, port), timeout=5)
    out["connected"] = True
    s.settimeout(5)
    s.sendall(payload)
    data = b""
    while len(data) < 65536:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    out["reply"] = data.decode("utf-8", "replace")
except OSError as exc:
    out["error"] = type(exc).__name__ + ": " + str(exc)
print(json.dumps(out))
"""


def guest_exchange(host: Host, user: str, address: str, port: int, line: str) -> Exchange:
    """A TCP exchange made inside the VM as ``user`` (its own uid, gid, no groups)."""
    ids = host.check_output("id -u %s && id -g %s", user, user).split()
    argv = [
        "setpriv",
        f"--reuid={ids[0]}",
        f"--regid={ids[1]}",
        "--clear-groups",
        "python3",
        "-c",
        _GUEST_EXCHANGE,
        address,
        str(port),
        line,
    ]
    result = host.run(shlex.join(argv))
    try:
        out = json.loads(result.stdout)
    except ValueError:
        return Exchange(False, error=f"the probe did not run (rc {result.rc}): {result.stderr}")
    return Exchange(bool(out["connected"]), str(out["reply"]), str(out["error"]))


# --- Envoy's counters -----------------------------------------------------------------

#: Run inside the VM with argv: the admin address, a counter-name regex.
_GUEST_STATS = """
import sys, urllib.parse, urllib.request
url = "http://" + sys.argv[1] + "/stats?filter=" + urllib.parse.quote(sys.argv[2])
try:
    print(urllib.request.urlopen(url, timeout=5).read().decode())
except OSError as exc:
    print("ERROR", exc)
    sys.exit(3)
"""

#: Run inside the VM with argv: the admin address. Prints LIVE once Envoy is ready.
_GUEST_READY = """
import sys, urllib.request
try:
    print(urllib.request.urlopen("http://" + sys.argv[1] + "/ready", timeout=3).read().decode())
except Exception as exc:
    print("ERROR", exc)
"""


#: Run inside the VM with argv: the admin address, a path. Prints the admin's answer.
_GUEST_ADMIN = """
import sys, urllib.request
try:
    print(urllib.request.urlopen("http://" + sys.argv[1] + sys.argv[2], timeout=10).read().decode())
except OSError as exc:
    print("ERROR", exc)
    sys.exit(3)
"""


def admin_command(path: str) -> str:
    """A shell command, run in the VM, that prints Envoy's admin ``path`` (``/clusters``)."""
    return shlex.join(["python3", "-c", _GUEST_ADMIN, ADMIN, path])


def parse_stats(text: str) -> dict[str, int]:
    """Counters from Envoy's plain ``/stats`` (``name: value`` lines; others are skipped).

    >>> parse_stats("tcp.public_listener.downstream_cx_total: 3\\nserver.state: 0\\nh: P0(nan)")
    {'tcp.public_listener.downstream_cx_total': 3, 'server.state': 0}
    """
    counters = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.strip().isdigit():
            counters[name.strip()] = int(value)
    return counters


def stats_command(names: tuple[str, ...] = COUNTERS) -> str:
    """A shell command, run in the VM, that prints the counters ``names`` (``/stats``)."""
    pattern = "^(" + "|".join(re.escape(n) for n in names) + ")$"
    return shlex.join(["python3", "-c", _GUEST_STATS, ADMIN, pattern])


def envoy_counters(host: Host, names: tuple[str, ...] = COUNTERS) -> dict[str, int]:
    """The counters ``names`` from Envoy's admin inside the VM.

    Raises :class:`CheckFailed` when the admin does not answer (Envoy is not running)
    or a counter is missing (a listener or cluster Consul would configure is absent).
    """
    result = host.run(stats_command(names))
    require(
        result.rc == 0,
        f"Envoy's admin at {ADMIN} answers /stats",
        (result.stdout + result.stderr).strip() or f"rc {result.rc}",
    )
    counters = parse_stats(result.stdout)
    missing = [n for n in names if n not in counters]
    require(not missing, f"Envoy counters {', '.join(names)}", f"missing: {', '.join(missing)}")
    return counters


def envoy_ready(host: Host) -> bool:
    """Envoy's admin ``/ready`` says LIVE."""
    return bool(host.run("python3 -c %s %s", _GUEST_READY, ADMIN).stdout.strip() == "LIVE")


def deltas(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """``after - before`` per counter.

    >>> deltas({"a": 1, "b": 2}, {"a": 4, "b": 2})
    {'a': 3, 'b': 0}
    """
    return {name: after[name] - before.get(name, 0) for name in after}


def short(counters: Mapping[str, int]) -> str:
    """``name +n`` for each counter, for failure text."""
    return ", ".join(f"{name} {value:+d}" for name, value in counters.items())


# --- is a unit still coming up? -------------------------------------------------------

#: Failed starts after which a unit that never became active counts as down for good.
#: Each of the sidecar's starts has already waited out meshbake-redirect's own retries
#: (15 tries, 2 s apart), so three of them in a row are no slow start.
GIVE_UP_RESTARTS = 3

#: The properties :func:`down_for_good` reads, one ``Name=value`` line each.
UNIT_PROPERTIES = ("Id", "ActiveState", "SubState", "Result", "NRestarts")


def unit_state_command(*units: str) -> str:
    """A shell command, run in the VM, that prints what :func:`down_for_good` reads."""
    props = [arg for name in UNIT_PROPERTIES for arg in ("-p", name)]
    return shlex.join(["systemctl", "show", *props, *units])


def unit_states(show: str) -> dict[str, dict[str, str]]:
    """unit -> its properties, from ``systemctl show`` output (a blank line between units)."""
    states = {}
    for block in show.strip().split("\n\n"):
        props = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
        states[props.get("Id", "?")] = props
    return states


def restarts(show: str) -> dict[str, int]:
    """unit -> how often systemd restarted it (``NRestarts``)."""
    return {unit: int(p.get("NRestarts") or 0) for unit, p in unit_states(show).items()}


def down_for_good(
    show: str, give_up: int = GIVE_UP_RESTARTS, since: Mapping[str, int] | None = None
) -> list[str]:
    r"""Why each unit in ``systemctl show`` output will not come up (empty: all still may).

    A unit is down for good when it failed and systemd will not restart it, when it was
    skipped or stopped after a failure (an ExecCondition said no), or when it has been
    restarted ``give_up`` times without becoming active (counted from ``since``, the
    :func:`restarts` of an earlier look, e.g. before a manual start).

    >>> down_for_good("Id=a.service\nActiveState=failed\nSubState=failed\nResult=exit-code\n")
    ['a.service failed (exit-code)']
    >>> down_for_good("Id=a.service\nActiveState=activating\nSubState=start-pre\nNRestarts=1\n")
    []
    """
    causes = []
    counts = restarts(show)
    for unit, props in unit_states(show).items():
        state, sub, result = (props.get(k, "") for k in ("ActiveState", "SubState", "Result"))
        failures = counts[unit] - (since or {}).get(unit, 0)
        if state == "active":
            continue
        if state == "failed" and sub != "auto-restart":
            causes.append(f"{unit} failed ({result})")
        elif state == "inactive" and result not in ("", "success"):
            causes.append(f"{unit} did not start ({result})")
        elif failures >= give_up:
            causes.append(
                f"{unit} restarted {failures} times without becoming active (last: {result})"
            )
    return causes


# --- Consul's rules, either backend ---------------------------------------------------


def iptables_consul_rules(host: Host) -> list[str]:
    """Lines of ``iptables -t nat -S`` that belong to Consul (its chains and jumps)."""
    rules = [" ".join(rule.split()) for rule in host.iptables.rules("nat")]
    return [rule for rule in rules if any(chain in rule.split() for chain in IPTABLES_CHAINS)]


def nft_table(host: Host, table: str = NFT_TABLE) -> str | None:
    """``nft -nn list table <table>``, or ``None`` when there is no such table (or no nft)."""
    if host.run("command -v nft").rc != 0:
        return None
    result = host.run(f"nft -nn list table {table}")
    return str(result.stdout) if result.rc == 0 else None


def consul_rules(host: Host) -> dict[str, list[str]]:
    """Consul's redirect rules that exist now, per backend (empty lists: none)."""
    table = nft_table(host)
    return {
        "iptables": iptables_consul_rules(host),
        "nftables": [" ".join(line.split()) for line in (table or "").splitlines() if line.strip()],
    }
