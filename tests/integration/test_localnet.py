"""builder/mesh/localnet.py with real iproute2, in namespaces made here (root).

Two "VMs" are stood in by network namespaces plugged into the bridge with veth pairs (a
tap without a reader has no carrier); the taps themselves are checked apart, and with a
qemu that attaches one without ever running a vCPU (``-S``). Every namespace made here
is named ``meshbake-localnet-*`` and removed whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from builder.mesh import localnet
from builder.mesh.forward import Forward
from builder.mesh.localnet import Lease, LocalNetwork
from tests.fixtures.signals import dispositions
from tests.paths import REPO

pytestmark = pytest.mark.integration
# The CI runs as root, so this skip never hides anything there.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

TAG = "localnet"

#: A TCP peer: ``serve NAME PORT`` answers each connection with NAME and what it read
#: (until EOF), ``echo PORT`` sends back everything it reads; prints "ready" once it listens.
PEER = """
import socket, sys, threading
mode, args = sys.argv[1], sys.argv[2:]
server = socket.create_server(("0.0.0.0", int(args[-1])))
print("ready", flush=True)
def serve(conn):
    with conn:
        if mode == "echo":
            while data := conn.recv(65536):
                conn.sendall(data)
            return
        got = b""
        while data := conn.recv(65536):
            got += data
        conn.sendall(args[0].encode() + b" got " + got)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

#: A client: connects to HOST PORT, sends MESSAGE, half-closes, prints the answer.
CALL = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as s:
    s.sendall(sys.argv[3].encode())
    s.shutdown(socket.SHUT_WR)
    answer = b""
    while data := s.recv(65536):
        answer += data
print(answer.decode())
"""


def sh(*argv: str, check: bool = True) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    assert not check or result.returncode == 0, f"{argv} exited {result.returncode}: {result}"
    return result.stdout


def host_state() -> dict[str, str]:
    """What of the host's namespace the network must never change."""
    iptables = "\n".join(
        # Chain counters move with any traffic, and the header names the time.
        line.split(" [")[0]
        for line in sh("iptables-save").splitlines()
        if not line.startswith("#")
    )
    return {
        "ip route": sh("ip", "route", "show", "table", "all"),
        "ip -6 route": sh("ip", "-6", "route", "show", "table", "all"),
        "ip rule": sh("ip", "rule") + sh("ip", "-6", "rule"),
        "ip link": sh("ip", "-o", "link"),
        "ip addr": sh("ip", "-o", "addr"),
        "nft list ruleset": sh("nft", "list", "ruleset"),
        "iptables-save": iptables,
    }


def ours() -> list[str]:
    return [n for n in localnet.namespaces() if n.startswith(f"meshbake-{TAG}-")]


def in_netns(name: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", name, *argv]


def call(netns: str, host: str, port: int, message: str) -> str:
    return sh(*in_netns(netns, sys.executable, "-c", CALL, host, str(port), message)).strip()


def answer(conn: socket.socket) -> bytes:
    """What the connection gets before it ends; a reset ends it too."""
    with contextlib.suppress(ConnectionResetError):
        return conn.recv(4)
    return b""


def wait_ready(log: Path, child: subprocess.Popen[str]) -> None:
    for _ in range(1000):
        if log.exists() and "ready" in log.read_text():
            return
        assert child.poll() is None, f"peer exited {child.returncode}: {log.read_text()}"
        time.sleep(0.01)
    raise AssertionError(f"peer never listened: {log.read_text()}")


@dataclass(frozen=True)
class StandIn:
    """A namespace in a VM's place: a veth from the bridge, the VM's address and MAC."""

    netns: str
    lease: Lease

    @property
    def ip(self) -> str:
        return str(self.lease.address.ip)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[LocalNetwork]:
    network = LocalNetwork(tag=TAG, state_dir=tmp_path / "state")
    try:
        with network:
            yield network
    finally:
        network.close()
        if network.name in localnet.namespaces():
            subprocess.run(["ip", "netns", "delete", network.name], check=False)


@pytest.fixture
def stand_in(net: LocalNetwork) -> Iterator[Callable[[str], StandIn]]:
    made: list[str] = []

    def make(vm_name: str) -> StandIn:
        lease = net.lease(vm_name)
        name = f"meshbake-{TAG}-{secrets.token_hex(4)}"
        sh("ip", "netns", "add", name)
        made.append(name)
        outer = f"mesh-veth{lease.index}"
        # Made straight inside the two namespaces: never a link in the host's.
        sh("ip", "link", "add", outer, "netns", net.name, "type", "veth",
           "peer", "name", "eth0", "netns", name)  # fmt: skip
        sh("ip", "-n", net.name, "link", "set", outer, "master", localnet.BRIDGE, "up")
        sh("ip", "-n", name, "link", "set", "eth0", "address", lease.mac)
        sh("ip", "-n", name, "addr", "add", str(lease.address), "dev", "eth0")
        sh("ip", "-n", name, "link", "set", "eth0", "up")
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return StandIn(name, lease)

    try:
        yield make
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "delete", name], check=False)


@contextlib.contextmanager
def peer(netns: str, log: Path, *args: str) -> Iterator[None]:
    """A PEER in ``netns`` (not via LocalNetwork), ended on the way out."""
    with log.open("w") as out:
        child = subprocess.Popen(
            in_netns(netns, sys.executable, "-c", PEER, *args), stdout=out, stderr=out, text=True
        )
    try:
        wait_ready(log, child)
        yield
    finally:
        child.kill()
        child.wait()


@needs_root
def test_server_and_stand_ins_reach_each_other_both_ways(
    net: LocalNetwork, stand_in: Callable[[str], StandIn], tmp_path: Path
) -> None:
    vm1, vm2 = stand_in("vm1"), stand_in("vm2")
    server_log = tmp_path / "server.log"
    server = net.run_in(
        [sys.executable, "-c", PEER, "serve", "server", "7000"], log_file=server_log
    )
    wait_ready(server_log, server)
    places = {"server": (net.name, str(net.server_address.ip))}
    with (
        peer(vm1.netns, tmp_path / "vm1.log", "serve", "vm1", "7000"),
        peer(vm2.netns, tmp_path / "vm2.log", "serve", "vm2", "7000"),
    ):
        places |= {"vm1": (vm1.netns, vm1.ip), "vm2": (vm2.netns, vm2.ip)}
        for src, (src_ns, _) in places.items():
            for dst, (_, dst_ip) in places.items():
                if src != dst:
                    assert call(src_ns, dst_ip, 7000, f"from {src}") == f"{dst} got from {src}"


@needs_root
def test_a_forward_from_the_hosts_loopback_reaches_a_stand_in(
    net: LocalNetwork, stand_in: Callable[[str], StandIn], tmp_path: Path
) -> None:
    vm1 = stand_in("vm1")
    with peer(vm1.netns, tmp_path / "echo.log", "echo", "2222"):
        port = net.forward(vm1.lease.address.ip, 2222)
        # A megabyte, far more than the forward buffers, both ways at once.
        payload = secrets.token_bytes(1 << 20)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            sender = threading.Thread(
                target=lambda: (conn.sendall(payload), conn.shutdown(socket.SHUT_WR))
            )
            sender.start()
            echoed = bytearray()
            while data := conn.recv(65536):
                echoed += data
            sender.join()
        assert bytes(echoed) == payload


@needs_root
def test_a_forward_holds_a_bounded_number_of_connections(
    net: LocalNetwork, stand_in: Callable[[str], StandIn], tmp_path: Path
) -> None:
    vm1 = stand_in("vm1")
    with peer(vm1.netns, tmp_path / "echo.log", "echo", "2222"):
        forward = Forward(net.netns_path, (vm1.ip, 2222), max_connections=2)
        try:

            def connect() -> socket.socket:
                conn = socket.create_connection(("127.0.0.1", forward.port), timeout=20)
                conn.sendall(b"ping")
                return conn

            held = [connect(), connect()]
            assert [c.recv(4) for c in held] == [b"ping", b"ping"]
            with connect() as third:
                assert answer(third) == b""  # closed at once: the limit is reached
            held.pop().close()
            for _ in range(200):  # until the forward has seen the close
                with connect() as again:
                    if answer(again) == b"ping":
                        break
            else:
                raise AssertionError("a freed place was never taken again")
            held[0].close()
        finally:
            forward.stop()


@needs_root
def test_a_forward_to_a_closed_port_closes_the_client(
    net: LocalNetwork, stand_in: Callable[[str], StandIn]
) -> None:
    vm1 = stand_in("vm1")
    port = net.forward(vm1.ip, 2222)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        assert answer(conn) == b""


@needs_root
def test_a_tap_is_on_the_bridge_in_the_namespace_and_gone_after(tmp_path: Path) -> None:
    before = host_state()
    with LocalNetwork(tag=TAG, state_dir=tmp_path) as net:
        tap = net.add_tap("vm1")
        (link,) = json.loads(sh("ip", "-n", net.name, "-j", "-d", "link", "show", tap.ifname))
        assert link["master"] == localnet.BRIDGE
        assert link["linkinfo"]["info_kind"] == "tun"
        assert tap.ifname not in sh("ip", "-o", "link")
        assert host_state() == before
    assert net.name not in localnet.namespaces()
    assert tap.ifname not in sh("ip", "-o", "link")
    assert not list(tmp_path.iterdir())
    assert host_state() == before


@needs_root
def test_qemu_started_with_the_prefix_attaches_its_tap_inside_the_namespace(
    tmp_path: Path,
) -> None:
    """qemu under proc's guard, with ``exec_prefix`` and ``Tap.qemu_args``; ``-S`` keeps
    its vCPU stopped, so no guest runs. The tap gets its carrier only from a reader."""
    with LocalNetwork(tag=TAG, state_dir=tmp_path / "state") as net:
        tap = net.add_tap("vm1")

        def flags() -> list[str]:
            (link,) = json.loads(sh("ip", "-n", net.name, "-j", "link", "show", tap.ifname))
            return list(link["flags"])

        assert "NO-CARRIER" in flags()
        qemu = net.run_in(
            [
                "qemu-system-x86_64",
                "-S",
                "-nodefaults",
                "-display",
                "none",
                "-m",
                "64",
                "-accel",
                "tcg",
                *tap.qemu_args,
            ],  # fmt: skip
            log_file=tmp_path / "qemu.log",
        )
        for _ in range(1000):
            if "LOWER_UP" in flags() or qemu.poll() is not None:
                break
            time.sleep(0.01)
        assert "LOWER_UP" in flags(), (tmp_path / "qemu.log").read_text()
        # The guard's child is qemu itself (ip netns exec execs), in the namespace.
        child = child_of(qemu.pid)
        assert Path(f"/proc/{child}/exe").resolve().name == "qemu-system-x86_64"
        assert Path(f"/proc/{child}/ns/net").stat().st_ino == net.netns_path.stat().st_ino
    assert qemu.poll() is not None
    assert gone(child)


@needs_root
def test_the_hosts_namespace_is_the_same_before_during_and_after(tmp_path: Path) -> None:
    before = host_state()
    with LocalNetwork(tag=TAG, state_dir=tmp_path) as net:
        net.add_tap("vm1")
        net.forward(net.server_address.ip, 22)
        net.run_in(["sleep", "600"], log_file=tmp_path / "sleep.log")
        during = host_state()
    after = host_state()
    assert during == before
    assert after == before


CHILD = """
import json, signal, sys
from pathlib import Path
from builder import proc
from builder.errors import Interrupted
from builder.mesh.localnet import LocalNetwork
state = Path(sys.argv[1])
try:
    with proc.handle_signals(), LocalNetwork(tag="localnet", state_dir=state) as net:
        tap = net.add_tap("vm1")
        port = net.forward(net.server_address.ip, 7000)
        sleeper = net.run_in(["sleep", "600"], log_file=state / "sleep.log")
        print(json.dumps({"netns": net.name, "port": port, "guard": sleeper.pid}), flush=True)
        while True:
            signal.pause()
except Interrupted as exc:
    raise SystemExit(exc.exit_code)
"""


@contextlib.contextmanager
def child_network(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    state = tmp_path / "state"
    state.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        # Each signal sent here with its default action, whatever this run inherited.
        preexec_fn=dispositions(),
    )
    info: dict[str, object] = {}
    try:
        assert child.stdout is not None
        info = json.loads(child.stdout.readline())
        info["state"] = state
        info["sleep"] = child_of(int(str(info["guard"])))
        yield child, info
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        if info.get("netns") in localnet.namespaces():
            subprocess.run(["ip", "netns", "delete", str(info["netns"])], check=False)


def child_of(guard: int) -> int:
    """The one child of a guard (``builder/guard.py``), once it has started it."""
    for _ in range(1000):
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == guard and fields[0] != "Z":
                    found.append(int(stat.parent.name))
        if found:
            (pid,) = found
            return pid
        time.sleep(0.01)
    raise AssertionError(f"guard {guard} started no child")


def gone(pid: int) -> bool:
    for _ in range(1000):
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z":
            return True
        time.sleep(0.01)
    return False


@needs_root
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_to_the_owner_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    before = host_state()
    with child_network(tmp_path) as (child, info):
        assert info["netns"] in localnet.namespaces()
        child.send_signal(sig)
        assert child.wait(timeout=60) == 128 + sig
        assert info["netns"] not in localnet.namespaces()
        assert not list(Path(str(info["state"])).glob("*.json"))
        assert gone(int(str(info["sleep"])))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(str(info["port"]))), timeout=20).close()
    assert host_state() == before


@needs_root
def test_the_sweep_removes_what_a_sigkilled_owner_left(tmp_path: Path) -> None:
    with child_network(tmp_path) as (child, info):
        child.kill()
        child.wait()
        state = Path(str(info["state"]))
        assert info["netns"] in localnet.namespaces()  # it could not clean up itself
        assert gone(int(str(info["sleep"])))  # but the guard ended what ran inside
        assert localnet.sweep(state) == [info["netns"]]
        assert info["netns"] not in localnet.namespaces()
        assert not list(state.glob("*.json"))


@needs_root
def test_the_sweep_spares_a_live_owner_and_catches_a_reused_pid(tmp_path: Path) -> None:
    with LocalNetwork(tag=TAG, state_dir=tmp_path) as live:
        assert localnet.sweep(tmp_path) == []
        assert live.name in localnet.namespaces()
        # Our own pid, but another start time: the pid was reused, the owner is gone.
        record = json.loads(live.record.read_text())
        live.record.write_text(json.dumps(record | {"start": "1"}))
        assert localnet.sweep(tmp_path) == [live.name]
        assert live.name not in localnet.namespaces()
    assert not list(tmp_path.iterdir())


@needs_root
def test_entering_a_network_sweeps_first(tmp_path: Path) -> None:
    with child_network(tmp_path) as (child, info):
        child.kill()
        child.wait()
        with LocalNetwork(tag=TAG, state_dir=Path(str(info["state"]))):
            assert info["netns"] not in localnet.namespaces()


def test_network_config_is_what_cloud_inits_networkd_renderer_writes(tmp_path: Path) -> None:
    """cloud-init (the image's 22.4, whose ``schema`` takes no network-config) parses the
    document as NoCloud does and renders systemd-networkd's file from it."""
    lease = Lease("vm1", 0, localnet.ipaddress.IPv4Interface("198.18.0.10/24"), "52:54:00:12:00:0a")
    text = localnet.network_config(lease, localnet.ipaddress.IPv4Address("198.18.0.1"))
    render = (
        "import sys, yaml\n"
        "from cloudinit.net.network_state import parse_net_config_data\n"
        "from cloudinit.net.networkd import network_state_to_networkd\n"
        "state = parse_net_config_data(yaml.safe_load(sys.stdin.read()))\n"
        "print(''.join(f'{k}\\n{v}' for k, v in network_state_to_networkd(state).items()))\n"
    )
    out = subprocess.run(
        ["/usr/bin/python3", "-c", render], input=text, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "WARNING" not in out.stderr, out.stderr
    rendered = out.stdout.split()
    assert "MACAddress=52:54:00:12:00:0a" in rendered
    assert "Name=mesh0" in rendered
    assert "Address=198.18.0.10/24" in rendered
    assert "Gateway=198.18.0.1" in rendered
    assert not any(line.startswith("DHCP=") and line != "DHCP=no" for line in rendered)
    assert yaml.safe_load(text)["version"] == 2


@needs_root
def test_a_vm_gets_one_tap_and_a_forward_takes_only_an_address(net: LocalNetwork) -> None:
    net.add_tap("vm1")
    with pytest.raises(ValueError, match="vm1 has its tap already"):
        net.add_tap("vm1")
    with pytest.raises(ValueError):
        net.forward("localhost", 22)
    with pytest.raises(ValueError, match="not a TCP port"):
        net.forward(net.server_address.ip, 0)


@needs_root
def test_closing_the_network_ends_open_forwarded_connections(
    net: LocalNetwork, stand_in: Callable[[str], StandIn], tmp_path: Path
) -> None:
    vm1 = stand_in("vm1")
    with peer(vm1.netns, tmp_path / "echo.log", "echo", "2222"):
        port = net.forward(vm1.ip, 2222)
        with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
            conn.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            net.close()
            assert answer(conn) == b""
