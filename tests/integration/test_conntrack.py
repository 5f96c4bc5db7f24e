"""Why meshbake-conntrack runs at early boot: a connection opened before Consul's nat
rules load (an SSH session made during boot) keeps working once they load, instead of
having its replies redirected into Envoy's outbound port mid-stream.

Two namespaces this test creates, a veth between them, and a root-owned line server in
the "vm" namespace standing in for sshd; Consul's OUTPUT redirect is loaded with real
nft or iptables while a client connection from the "peer" namespace is open.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.paths import REPO

CONNTRACK = REPO / "builder" / "image" / "scripts" / "meshbake-conntrack"
VM, PEER, PORT = "10.213.0.1", "10.213.0.2", 2222

pytestmark = [
    pytest.mark.integration,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

#: A root-owned server that answers every line with "ok <line>", like a shell would;
#: a "wait" line is answered only once the trigger file exists, so that after the test
#: loads the redirect the first packet of the session comes from the server, as sshd's
#: output to an idle session does.
SERVER = """
import os, socket, sys, threading, time
vm, port, trigger = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((vm, port)); s.listen(4)
def serve(c):
    f = c.makefile("rwb", 0)
    for line in f:
        while line == b"wait\\n" and not os.path.exists(trigger):
            time.sleep(0.05)
        f.write(b"ok " + line)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

#: Consul's OUTPUT redirect, reduced to its effect on a root-owned reply.
REDIRECT = {
    "nftables": [
        ["nft", "add", "table", "inet", "consul_tproxy"],
        [
            "nft",
            "add",
            "chain",
            "inet",
            "consul_tproxy",
            "CONSUL_NAT_OUTPUT",
            "{ type nat hook output priority -100 ; }",
        ],
        [
            "nft",
            "add",
            "rule",
            "inet",
            "consul_tproxy",
            "CONSUL_NAT_OUTPUT",
            "meta",
            "l4proto",
            "tcp",
            "redirect",
            "to",
            ":15001",
        ],
    ],
    "iptables": [
        [
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-port",
            "15001",
        ],
    ],
}


@dataclass
class Pair:
    vm: str
    peer: str

    def run(self, ns: str, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env},
        )


@pytest.fixture
def pair() -> Iterator[Pair]:
    tag = uuid.uuid4().hex[:6]
    p = Pair(f"mbv{tag}", f"mbp{tag}")
    try:
        for ns in (p.vm, p.peer):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                f"tv{tag}",
                "netns",
                p.vm,
                "type",
                "veth",
                "peer",
                "name",
                f"tp{tag}",
                "netns",
                p.peer,
            ],
            check=True,
        )
        for ns, dev, addr in ((p.vm, f"tv{tag}", VM), (p.peer, f"tp{tag}", PEER)):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        yield p
    finally:
        for ns in (p.vm, p.peer):
            subprocess.run(["ip", "netns", "del", ns], check=False)


#: The client, in the peer namespace: one session; a line before the test loads the
#: redirect, then a "wait" line whose answer comes after.
CLIENT = f"""
import socket, sys, time
for _ in range(100):
    try:
        c = socket.create_connection(("{VM}", {PORT}), timeout=2)
        break
    except OSError:
        time.sleep(0.05)
c.settimeout(3)
c.sendall(b"before\\n"); print(c.recv(100).decode().strip(), flush=True)
c.sendall(b"wait\\n"); print("sent", flush=True)
sys.stdin.readline()
try:
    print(c.recv(100).decode().strip() or "closed", flush=True)
except OSError as e:
    print(type(e).__name__, flush=True)
"""


def session_survives_the_redirect(pair: Pair, backend: str, trigger: Path) -> bool:
    """Open a session, load the redirect, and see whether the session still answers."""
    server = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            pair.vm,
            "/usr/bin/python3",
            "-c",
            SERVER,
            VM,
            str(PORT),
            str(trigger),
        ]
    )
    try:
        client = subprocess.Popen(
            ["ip", "netns", "exec", pair.peer, "/usr/bin/python3", "-c", CLIENT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdin is not None and client.stdout is not None
        try:
            assert client.stdout.readline().strip() == "ok before"
            assert client.stdout.readline().strip() == "sent"
            for argv in REDIRECT[backend]:
                done = pair.run(pair.vm, *argv)
                assert done.returncode == 0, done.stderr
            trigger.touch()
            client.stdin.write("go\n")
            client.stdin.flush()
            return client.stdout.readline().strip() == "ok wait"
        finally:
            client.kill()
            client.wait(10)
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_without_tracking_a_boot_time_session_hangs(
    pair: Pair, backend: str, tmp_path: Path
) -> None:
    # The problem this script exists for, shown with the real tools.
    assert not session_survives_the_redirect(pair, backend, tmp_path / "go")


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_with_tracking_from_early_boot_the_session_survives(
    pair: Pair, backend: str, tmp_path: Path
) -> None:
    done = pair.run(pair.vm, "sh", str(CONNTRACK), MESHBAKE_REDIRECT_BACKEND=backend)
    assert done.returncode == 0, done.stderr
    again = pair.run(pair.vm, "sh", str(CONNTRACK), MESHBAKE_REDIRECT_BACKEND=backend)
    assert again.returncode == 0, again.stderr  # idempotent, as at every boot
    assert session_survives_the_redirect(pair, backend, tmp_path / "go")
