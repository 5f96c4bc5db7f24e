"""A private L2 network for local runs: a bridge in a network namespace of meshbake's own.

``LocalNetwork`` makes a namespace ``meshbake-<tag>-<id>`` with a bridge in it that holds
the server's address, and one tap device per VM on that bridge. The VMs and whatever
runs in the namespace (the Consul server) reach each other both ways, as on a LAN; no
route, rule or link of the host's own namespace changes. The host reaches the guests
only through TCP forwards that listen on 127.0.0.1 and connect from inside the namespace.

- qemu runs inside the namespace: ``exec_prefix`` (``ip netns exec NAME``) goes in front
  of its argv. ``ip netns exec`` execs the command in place (it forks only in batch
  mode), so under ``proc.spawn`` the guard stays the parent of qemu itself and ends it
  as it ends any VM, also when meshbake is SIGKILLed.
- The guest gets its static address from a NoCloud ``network-config`` (v2), matched by
  the MAC that ``Tap.qemu_args`` gives its NIC: there is no DHCP on the bridge.
- Teardown (``close``, also on the way out of ``with``) ends the forwards and the
  processes started in the namespace, then removes the taps, the bridge and the
  namespace. It is idempotent and runs under ``proc.shielded``, so SIGINT, SIGTERM or
  SIGHUP under ``proc.handle_signals`` (as the CLI runs every command) unwind into it and
  cannot cut it short.
- A meshbake that was SIGKILLed cannot clean up: each network is recorded (owner pid
  and its start time) in ``STATE_DIR`` before its namespace exists, and ``sweep`` removes
  the namespaces whose owner is gone. Entering a ``LocalNetwork`` sweeps first.

>>> sorted(yaml.safe_load(network_config(Lease("vm", 0, ipaddress.IPv4Interface(
...     "198.18.0.10/24"), "52:54:00:12:00:0a"), ipaddress.IPv4Address("198.18.0.1"))))
['ethernets', 'version']
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from builder import proc
from builder.errors import UserError, reason
from builder.mesh.forward import Forward, enter_netns

log = logging.getLogger(__name__)

#: Where each live network is recorded with its owner, for ``sweep``.
STATE_DIR = Path("/run/meshbake-up")

#: The range the network's /24 is taken from: RFC 2544's benchmarking block, which no
#: LAN or internet route normally covers. A /24 that a host route overlaps is skipped.
ADDRESS_RANGE = ipaddress.IPv4Network("198.18.0.0/15")

BRIDGE = "mesh-br0"
#: The first guest's host number in the /24 (the server has .1).
FIRST_GUEST = 10


_NAME = re.compile(r"^meshbake-[a-z0-9]+-[0-9a-f]{8}$")
_TAG = re.compile(r"^[a-z0-9]{1,20}$")


@dataclass(frozen=True)
class Lease:
    """A guest's place on the network: its address (with the prefix) and NIC's MAC."""

    vm_name: str
    index: int
    address: ipaddress.IPv4Interface
    mac: str


@dataclass(frozen=True)
class Tap:
    """A tap device in the namespace, on the bridge, for one VM."""

    lease: Lease
    ifname: str
    gateway: ipaddress.IPv4Address

    @property
    def qemu_args(self) -> list[str]:
        """qemu's NIC on this tap; qemu must run inside the namespace (``exec_prefix``)."""
        netdev = f"mesh{self.lease.index}"
        return [
            "-netdev",
            f"tap,id={netdev},ifname={self.ifname},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev={netdev},mac={self.lease.mac}",
        ]

    @property
    def network_config(self) -> str:
        return network_config(self.lease, self.gateway)


def network_config(lease: Lease, gateway: ipaddress.IPv4Address) -> str:
    """The NoCloud ``network-config`` (v2) that gives the guest its static address.

    The NIC is matched by MAC and named ``mesh0``. Its default route points at the
    server's address, so that connections to virtual IPs (240.0.0.0/4) have a route
    before the transparent proxy's redirect rewrites them; nothing routes on from the
    namespace, so no packet leaves it.
    """
    document: dict[str, Any] = {
        "version": 2,
        "ethernets": {
            "mesh0": {
                "match": {"macaddress": lease.mac},
                "set-name": "mesh0",
                "dhcp4": False,
                "dhcp6": False,
                "addresses": [str(lease.address)],
                "routes": [{"to": "0.0.0.0/0", "via": str(gateway)}],
            }
        },
    }
    return yaml.safe_dump(document, sort_keys=False)


def choose_subnet(routes: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first /24 of ``ADDRESS_RANGE`` that no route but a default one overlaps.

    >>> str(choose_subnet([ipaddress.IPv4Network("198.18.0.0/23")]))
    '198.18.2.0/24'
    """
    taken = [r for r in routes if r.prefixlen > 0]
    for subnet in ADDRESS_RANGE.subnets(new_prefix=24):
        if not any(subnet.overlaps(route) for route in taken):
            return subnet
    raise UserError(f"no free /24 in {ADDRESS_RANGE} for the local network: host routes cover it")


def host_routes() -> list[ipaddress.IPv4Network]:
    """The IPv4 destinations of every route in every table of the host's namespace."""
    listed = json.loads(proc.run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout)
    found = []
    for route in listed:
        dst = route.get("dst", "")
        with contextlib.suppress(ValueError):
            found.append(ipaddress.IPv4Network("0.0.0.0/0" if dst == "default" else dst))
    return found


# --- owners and the sweep ----------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def _owner_alive(record: dict[str, Any]) -> bool:
    pid = record.get("pid")
    return isinstance(pid, int) and _start_time(pid) == record.get("start")


def namespaces() -> list[str]:
    """The names of the host's named network namespaces."""
    listed = proc.run(["ip", "-j", "netns", "list"]).stdout.strip()
    return [entry["name"] for entry in json.loads(listed or "[]")]


def sweep(state_dir: Path = STATE_DIR) -> list[str]:
    """Remove the namespaces of networks whose owner is gone (a SIGKILLed meshbake).

    Only namespaces recorded in ``state_dir`` with a dead owner are touched; returns
    their names. A process the dead owner started inside is ended by its guard.
    """
    removed: list[str] = []
    if not state_dir.is_dir():
        return removed
    for record_file in sorted(state_dir.glob("*.json")):
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            log.warning("meshbake: ignoring unreadable record %s", record_file)
            continue
        name = record.get("netns") if isinstance(record, dict) else None
        if not isinstance(name, str) or not _NAME.match(name) or record_file.stem != name:
            log.warning("meshbake: ignoring record %s: no meshbake namespace in it", record_file)
            continue
        if _owner_alive(record):
            continue
        with proc.shielded():
            if name in namespaces():
                proc.run(["ip", "netns", "delete", name])
            record_file.unlink(missing_ok=True)
        removed.append(name)
    return removed


# --- the network ---------------------------------------------------------------------------


class LocalNetwork:
    """A bridge in a namespace of its own, with taps for VMs and forwards from 127.0.0.1.

    Use it as a context manager; ``close`` tears everything down, also after an error
    or an interrupt. ``tag`` goes into the namespace's name (``meshbake-<tag>-<id>``).
    """

    def __init__(
        self,
        *,
        tag: str = "up",
        state_dir: Path = STATE_DIR,
        subnet: ipaddress.IPv4Network | None = None,
    ) -> None:
        if not _TAG.match(tag):
            raise ValueError(f"tag {tag!r}: 1 to 20 lowercase letters or digits")
        self.name = f"meshbake-{tag}-{secrets.token_hex(4)}"
        self.state_dir = state_dir
        self._subnet = subnet
        # Chosen against the host's routes on open, unless given.
        self.subnet = subnet or next(ADDRESS_RANGE.subnets(new_prefix=24))
        self._leases: dict[str, Lease] = {}
        self._taps: list[Tap] = []
        self._forwards: list[Forward] = []
        self._processes: list[subprocess.Popen[str]] = []
        self._opened = False
        self._recorded = False
        self._closed = False

    # Addresses.

    @property
    def record(self) -> Path:
        return self.state_dir / f"{self.name}.json"

    @property
    def server_address(self) -> ipaddress.IPv4Interface:
        """The bridge's address: where the server (anything ``run_in``) is reached."""
        return ipaddress.IPv4Interface(f"{self.subnet[1]}/{self.subnet.prefixlen}")

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.name

    @property
    def exec_prefix(self) -> list[str]:
        """Put in front of an argv to run it inside the namespace (qemu, the server)."""
        return ["ip", "netns", "exec", self.name]

    def lease(self, vm_name: str) -> Lease:
        """The address and MAC of ``vm_name``'s NIC (the same on every call)."""
        if vm_name in self._leases:
            return self._leases[vm_name]
        index = len(self._leases)
        host = FIRST_GUEST + index
        if host >= self.subnet.num_addresses - 1:
            raise UserError(f"the local network {self.subnet} has no address left for {vm_name}")
        address = self.subnet[host]
        # qemu's locally administered prefix, then the address's last three bytes.
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in address.packed[1:])
        interface = ipaddress.IPv4Interface(f"{address}/{self.subnet.prefixlen}")
        lease = Lease(vm_name, index, interface, mac)
        self._leases[vm_name] = lease
        return lease

    # Life cycle.

    def __enter__(self) -> LocalNetwork:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        if self._opened:
            return
        self._opened = True
        sweep(self.state_dir)
        if self._subnet is None:
            self.subnet = choose_subnet(host_routes())
        try:
            # Recorded before it exists: a SIGKILL at any later point leaves it sweepable.
            record = {"netns": self.name, "pid": os.getpid(), "start": _start_time(os.getpid())}
            try:
                self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                # Whole or not at all: a record cut short by a SIGKILL would name nothing.
                partial = self.record.with_suffix(".tmp")
                partial.write_text(json.dumps(record) + "\n")
                partial.replace(self.record)
                self._recorded = True
            except OSError as exc:
                raise UserError(
                    f"{self.record}: cannot record the local network: {reason(exc)}"
                    " (a local network needs root)"
                ) from exc
            proc.run(["ip", "netns", "add", self.name])
            self._ip("link", "set", "lo", "up")
            self._ip("link", "add", BRIDGE, "type", "bridge")
            self._ip("addr", "add", str(self.server_address), "dev", BRIDGE)
            self._ip("link", "set", BRIDGE, "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Forwards, processes, taps, bridge, namespace, record: all gone (idempotent)."""
        if self._closed or not self._opened:
            self._closed = True
            return
        self._closed = True
        with proc.shielded():
            for forward in self._forwards:
                forward.stop()
            self._forwards.clear()
            for child in self._processes:
                proc.terminate_group(child)
            self._processes.clear()
            exists = self.name in namespaces()
            if exists:
                for tap in self._taps:
                    self._ip("link", "delete", tap.ifname, check=False)
                self._ip("link", "delete", BRIDGE, check=False)
                proc.run(["ip", "netns", "delete", self.name])
            self._taps.clear()
            if self._recorded:
                self.record.unlink(missing_ok=True)

    def _ip(self, *args: str, check: bool = True) -> proc.Completed:
        return proc.run(["ip", "-n", self.name, *args], check=check)

    def _live(self) -> None:
        if not self._opened or self._closed:
            raise RuntimeError(f"{self.name} is not open")

    # What runs on it.

    def add_tap(self, vm_name: str) -> Tap:
        """A tap device on the bridge for ``vm_name``; start its qemu with ``exec_prefix``
        and ``Tap.qemu_args``."""
        self._live()
        lease = self.lease(vm_name)
        if any(tap.lease == lease for tap in self._taps):
            raise ValueError(f"{vm_name} has its tap already")
        ifname = f"mesh-tap{lease.index}"
        self._ip("tuntap", "add", "dev", ifname, "mode", "tap")
        tap = Tap(lease, ifname, self.server_address.ip)
        self._taps.append(tap)
        self._ip("link", "set", ifname, "master", BRIDGE, "up")
        return tap

    def run_in(self, argv: Sequence[proc.StrPath], *, log_file: Path) -> subprocess.Popen[str]:
        """Start ``argv`` inside the namespace under the guard; it ends with the network."""
        self._live()
        child = proc.spawn([*self.exec_prefix, *argv], log_file=log_file)
        self._processes.append(child)
        return child

    def forward(self, guest_ip: str | ipaddress.IPv4Address, guest_port: int) -> int:
        """Forward 127.0.0.1:PORT (host) to ``guest_ip:guest_port`` here; return PORT."""
        self._live()
        # An address, never a name: a name would be resolved (blocking) in the namespace.
        address = ipaddress.IPv4Address(guest_ip)
        if not 0 < guest_port < 65536:
            raise ValueError(f"port {guest_port}: not a TCP port")
        forward = Forward(self.netns_path, (str(address), guest_port))
        self._forwards.append(forward)
        return forward.port

    def listen(self, port: int = 0) -> socket.socket:
        """A TCP listener on the bridge's address, made inside the namespace, for a
        host-side end that the guests must reach (a socket keeps the namespace it was
        made in, so the caller's own thread stays where it is). Close it when done."""
        self._live()
        made: list[socket.socket] = []
        failed: list[OSError] = []

        def make() -> None:
            try:
                enter_netns(self.netns_path)
                sock = socket.socket()
                try:
                    sock.bind((str(self.server_address.ip), port))
                    sock.listen(16)
                except OSError:
                    sock.close()
                    raise
                made.append(sock)
            except OSError as exc:
                failed.append(exc)

        # A thread of its own: setns moves only the calling thread, which then ends.
        worker = threading.Thread(target=make, name=f"listen-{self.name}")
        worker.start()
        worker.join()
        if failed:
            raise UserError(f"{self.name}: cannot listen on port {port}: {reason(failed[0])}")
        return made[0]
