"""meshbake-imds closes the metadata address to every local user but root and the
allowed ones, with real nft and iptables in network namespaces this test creates.

Two namespaces joined by a veth pair: the "instance" runs the rules, the "cloud" holds
a TCP listener on the metadata address. Connections are made as real uids (setpriv).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.paths import REPO

IMDS = REPO / "builder" / "image" / "scripts" / "meshbake-imds"
ADDRESS = "169.254.169.254"
#: Two users every Debian system has: one to allow, one to refuse.
ALLOWED, REFUSED = "daemon", "nobody"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]


@dataclass
class Pair:
    instance: str
    cloud: str

    def run(
        self, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.instance, *argv],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )

    def connect_as(self, user: str) -> str:
        """What a TCP connection to the metadata address, made as ``user``, got."""
        return self._as(user, "print('connected')")

    def exchange_as(self, user: str) -> str:
        """The reply to one line sent to the metadata address as ``user``, or the error."""
        return self._as(user, "s.sendall(b'x\\n'); print(s.recv(4096).decode().strip())")

    def _as(self, user: str, then: str) -> str:
        code = (
            "import socket,sys\n"
            "s=socket.socket(); s.settimeout(5)\n"
            f"try:\n s.connect(('{ADDRESS}', 80)); {then}\n"
            "except OSError as e: print(type(e).__name__)\n"
        )
        done = self.run(
            "setpriv",
            f"--reuid={pwd.getpwnam(user).pw_uid}",
            f"--regid={pwd.getpwnam(user).pw_gid}",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            code,
        )
        return done.stdout.strip() or done.stderr.strip()


@pytest.fixture
def pair() -> Iterator[Pair]:
    tag = uuid.uuid4().hex[:6]
    p = Pair(f"mbi{tag}", f"mbc{tag}")
    sh = ["ip"]
    try:
        for ns in (p.instance, p.cloud):
            subprocess.run([*sh, "netns", "add", ns], check=True)
            subprocess.run([*sh, "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(
            [
                *sh,
                "link",
                "add",
                f"vi{tag}",
                "netns",
                p.instance,
                "type",
                "veth",
                "peer",
                "name",
                f"vc{tag}",
                "netns",
                p.cloud,
            ],
            check=True,
        )
        for ns, dev, addr in (
            (p.instance, f"vi{tag}", "169.254.0.2/16"),
            (p.cloud, f"vc{tag}", "169.254.0.1/16"),
        ):
            subprocess.run([*sh, "-n", ns, "addr", "add", addr, "dev", dev], check=True)
            subprocess.run([*sh, "-n", ns, "link", "set", dev, "up"], check=True)
        subprocess.run(
            [*sh, "-n", p.cloud, "addr", "add", f"{ADDRESS}/32", "dev", "lo"], check=True
        )
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                p.cloud,
                "/usr/bin/python3",
                "-c",
                "import socket\ns=socket.socket()\n"
                "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(('{ADDRESS}', 80)); s.listen(64)\n"
                "while True:\n c,_=s.accept(); c.close()\n",
            ],
        )
        try:
            assert p.run("/usr/bin/python3", "-c", _wait_for_listener()).returncode == 0
            yield p
        finally:
            server.terminate()
            server.wait(timeout=10)
    finally:
        for ns in (p.instance, p.cloud):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def _wait_for_listener() -> str:
    return (
        "import socket,time\n"
        "for _ in range(100):\n"
        f" try: socket.create_connection(('{ADDRESS}', 80), 1).close(); break\n"
        " except OSError: time.sleep(0.05)\n"
        "else: raise SystemExit(1)\n"
    )


def imds(pair: Pair, backend: str, action: str = "apply", **settings: str) -> None:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "MESHBAKE_REDIRECT_BACKEND": backend,
        "MESHBAKE_IMDS_RESTRICT": "true",
        **settings,
    }
    done = pair.run("sh", str(IMDS), action, env=env)
    assert done.returncode == 0, done.stderr


def ruleset(pair: Pair) -> str:
    """nft's ruleset and iptables' rules, without comments or counters."""
    saved = pair.run("iptables-save").stdout.splitlines()
    rules = [line for line in saved if not line.startswith(("#", ":"))]
    return pair.run("nft", "list", "ruleset").stdout + "\n".join(rules)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_only_root_and_allowed_users_reach_imds(pair: Pair, backend: str) -> None:
    assert pair.connect_as(REFUSED) == "connected"  # open before the rules
    imds(pair, backend, MESHBAKE_IMDS_ALLOW_USERS=ALLOWED)
    assert pair.connect_as("root") == "connected"
    assert pair.connect_as(ALLOWED) == "connected"
    assert pair.connect_as(REFUSED) == "ConnectionRefusedError"


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_apply_is_idempotent_and_remove_leaves_others_alone(pair: Pair, backend: str) -> None:
    # Someone else's table and chain, which meshbake-imds must never touch.
    assert pair.run("nft", "add", "table", "inet", "site").returncode == 0
    assert pair.run("iptables", "-N", "SITE_OUT").returncode == 0
    imds(pair, backend)
    once = sorted(ruleset(pair).splitlines())  # iptables-nft may list chains in a new order
    imds(pair, backend)
    assert sorted(ruleset(pair).splitlines()) == once
    assert pair.connect_as(REFUSED) == "ConnectionRefusedError"
    imds(pair, backend, "remove")
    after = ruleset(pair)
    assert "meshbake_imds" not in after and "MESHBAKE_IMDS" not in after
    assert "table inet site" in after and "chain SITE_OUT" in after
    assert pair.connect_as(REFUSED) == "connected"


def test_restrict_off_removes_the_rules(pair: Pair) -> None:
    imds(pair, "nftables")
    imds(pair, "nftables", MESHBAKE_IMDS_RESTRICT="false")
    assert pair.connect_as(REFUSED) == "connected"


def test_an_unknown_allowed_user_fails_loudly(pair: Pair) -> None:
    done = pair.run(
        "sh",
        str(IMDS),
        "apply",
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "MESHBAKE_IMDS_RESTRICT": "true",
            "MESHBAKE_IMDS_ALLOW_USERS": "no-such-user-here",
        },
    )
    assert done.returncode == 1
    assert "no-such-user-here" in done.stderr


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_the_address_on_the_instance_itself_works_both_ways(backend: str) -> None:
    """verify serves a stand-in on the VM's own loopback. Then the reset a refusal sends
    goes to the metadata address itself and must not be refused in turn (a timeout),
    and the ownerless last packets of root's exchanges must not be refused either (the
    stand-in's side of the first exchange was reset, and it stopped serving)."""
    ns = f"mbl{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{ADDRESS}/32", "dev", "lo"], check=True)
        local = Pair(ns, ns)
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "/usr/bin/python3",
                "-c",
                "import socket\ns=socket.socket()\n"
                f"s.bind(('{ADDRESS}', 80)); s.listen(16)\n"
                "while True:\n"
                " c,_=s.accept(); c.recv(4096); c.sendall(b'metadata\\n'); c.close()\n",
            ]
        )
        try:
            assert local.run("/usr/bin/python3", "-c", _wait_for_listener()).returncode == 0
            imds(local, backend)
            assert local.connect_as(REFUSED) == "ConnectionRefusedError"
            answers = [local.exchange_as("root") for _ in range(5)]
            assert answers == ["metadata"] * 5
        finally:
            server.terminate()
            server.wait(10)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
