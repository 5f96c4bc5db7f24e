"""Phase "baked": a golden image booted WITHOUT first-boot user data.

Everything the bake put in must be there, and nothing that only first boot may bring:
no token, no secret file, no redirection, consul and the sidecar down (and the journal
says why). What the bake's hygiene removed must have come back fresh at this boot
(machine-id, SSH host keys), and the build user must be gone.

One test function per check; ``expect`` (conftest.py) holds the image's facts.
Commands run as root (the suite turns testinfra's ``--sudo`` on).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from typing import Any

import pytest
from testinfra.host import Host

from .helpers import consul_rules, unliteral, wait_for

#: Where a leaked secret could sit in an image; the whole tree is searched.
SEARCH_ROOTS = ("/etc", "/var", "/home", "/root", "/opt", "/srv", "/usr/libexec")

#: Files that only first boot may create.
FIRST_BOOT_ONLY = (
    "/etc/consul.d/zz-meshbake-secrets.json",
    "/etc/consul.d/tls",
    "/etc/envoy/token",
    "/run/meshbake/firstboot.env",
    "/var/lib/meshbake/firstboot.done",
)

#: The throwaway user the qemu build seed creates (builder/cloudconfig.py BUILD_USER).
BUILD_USER = "packer"

CONSUL_CONFIG = "/etc/consul.d/consul.json"


def grep_tree(host: Host, regex: str, roots: tuple[str, ...] = SEARCH_ROOTS) -> list[str]:
    """Text files under ``roots`` with a line matching the extended ``regex``.

    Binary files, devices, and roots that do not exist are skipped.
    """
    present = " ".join(shlex.quote(r) for r in roots)
    script = (
        f'set --; for d in {present}; do [ -d "$d" ] && set -- "$@" "$d"; done; '
        f'grep -rIlsE --devices=skip -e {shlex.quote(regex)} -- "$@"'
    )
    result = host.run(script)
    # grep: 0 found, 1 nothing found, 2 trouble (files that vanished mid-scan, ...).
    found = [line for line in result.stdout.splitlines() if line]
    assert found or result.rc in (0, 1), f"the search failed (rc {result.rc}): {result.stderr}"
    return found


def keys_named(data: Any, words: tuple[str, ...], path: str = "") -> Iterator[str]:
    """JSON paths in ``data`` whose key contains one of ``words``."""
    if isinstance(data, dict):
        for key, value in data.items():
            here = f"{path}.{key}" if path else str(key)
            if any(w in str(key).lower() for w in words):
                yield here
            yield from keys_named(value, words, here)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from keys_named(value, words, f"{path}[{i}]")


def read_json(host: Host, path: str) -> Any:
    return json.loads(host.file(path).content_string)


def owner_mode(host: Host, path: str) -> str:
    """``user:group 0mode`` of ``path``, e.g. ``root:consul 0640``."""
    f = host.file(path)
    return f"{f.user}:{f.group} {f.mode:04o}"


def assert_system_nologin_user(host: Host, name: str) -> None:
    user = host.user(name)
    assert user.exists, f"user {name} does not exist"
    assert user.uid < 1000, f"{name} has uid {user.uid}; a system user has one below 1000"
    assert user.shell in ("/usr/sbin/nologin", "/sbin/nologin"), (
        f"{name} has the login shell {user.shell}"
    )


# --- users and binaries ---------------------------------------------------------------


def test_consul_user_is_system_nologin(host: Host) -> None:
    assert_system_nologin_user(host, "consul")


def test_envoy_user_is_system_nologin(host: Host) -> None:
    assert_system_nologin_user(host, "envoy")
    assert owner_mode(host, "/etc/envoy") == "envoy:envoy 0750"


def test_consul_binary(host: Host, expect: dict[str, Any]) -> None:
    assert owner_mode(host, "/usr/bin/consul") == "root:root 0755"
    first = host.check_output("/usr/bin/consul version").splitlines()[0]
    assert first == f"Consul v{expect['consul_version']}"


def test_envoy_binary(host: Host, expect: dict[str, Any]) -> None:
    assert owner_mode(host, "/usr/bin/envoy") == "root:root 0755"
    # Really run it: a binary for the wrong libc or CPU fails here, not at first boot.
    result = host.run("/usr/bin/envoy --version")
    assert result.rc == 0, f"envoy --version failed (rc {result.rc}): {result.stderr}"
    # e.g. "envoy  version: <sha>/1.38.3/Clean/RELEASE/BoringSSL"
    assert f"/{expect['envoy_version']}/" in result.stdout, result.stdout


# --- configuration --------------------------------------------------------------------


def test_consul_config(host: Host, expect: dict[str, Any]) -> None:
    assert owner_mode(host, "/etc/consul.d") == "root:consul 0750"
    assert owner_mode(host, CONSUL_CONFIG) == "root:consul 0640"
    config = read_json(host, CONSUL_CONFIG)
    assert config.get("connect", {}).get("enabled") is True, "connect is not enabled"
    assert config.get("ports", {}).get("grpc") == 8502, "gRPC is not on 8502"
    assert bool(config.get("acl", {}).get("enabled")) is expect["acl"]
    secrets = list(keys_named(config, ("token", "encrypt", "key_file", "cert_file")))
    assert not secrets, f"{CONSUL_CONFIG} carries secrets or their paths: {secrets}"


def test_service_definition(host: Host, expect: dict[str, Any]) -> None:
    path = f"/etc/consul.d/service-{expect['service']}.json"
    assert owner_mode(host, path) == "root:consul 0640"
    service = read_json(host, path)["service"]
    assert service["name"] == expect["service"]
    assert service["port"] == expect["port"]
    proxy = service["connect"]["sidecar_service"]["proxy"]
    assert proxy.get("mode") == "transparent"
    assert not list(keys_named(service, ("token",))), f"{path} carries a token"


def test_mesh_env(host: Host, expect: dict[str, Any]) -> None:
    path = "/etc/meshbake/mesh.env"
    assert owner_mode(host, path) == "root:root 0644"
    env = {}
    for line in host.file(path).content_string.splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.lstrip().startswith("#"):
            env[key.strip()] = " ".join(shlex.split(value))
    assert env.get("MESHBAKE_PROXY_ID") == expect["proxy_id"]
    assert env.get("MESHBAKE_SERVICE") == expect["service"]
    assert env.get("MESHBAKE_ACL") == ("true" if expect["acl"] else "false")
    assert env.get("MESHBAKE_TOKENS") == expect["tokens"]
    inbound = {int(p) for p in env.get("MESHBAKE_EXCLUDE_INBOUND_PORTS", "").split()}
    # meshbake-redirect always adds 22 itself.
    assert inbound | {22} == {int(p) for p in expect["inbound_exclusions"]} | {22}


def test_units_enabled(host: Host, expect: dict[str, Any]) -> None:
    states = {
        unit: host.run("systemctl is-enabled %s", unit).stdout.strip() or "unknown"
        for unit in expect["units"]
    }
    not_enabled = {unit: state for unit, state in states.items() if state != "enabled"}
    assert not not_enabled, f"units not enabled: {not_enabled}"


# --- nothing runs that needs a token --------------------------------------------------


def test_consul_not_running_and_journal_says_why(host: Host, expect: dict[str, Any]) -> None:
    if not expect["acl"]:
        pytest.skip("ACLs are off in this image: consul may start without first boot")
    assert not host.service("consul.service").is_running, "consul runs without a token"
    assert host.run("pgrep -u consul").rc == 1, "a process runs as consul"
    journal = host.check_output("journalctl -b --no-pager -o cat -u consul.service")
    assert "no ACL token delivered yet" in journal, (
        f"the journal does not say why consul is down:\n{journal[-2000:]}"
    )


def test_sidecar_not_running(host: Host, expect: dict[str, Any]) -> None:
    if not expect["acl"]:
        pytest.skip("ACLs are off in this image: the sidecar may start without first boot")
    assert not host.service("envoy-sidecar.service").is_running, "the sidecar runs without a token"


def test_no_consul_chains(host: Host) -> None:
    # Both backends: iptables' nat table and nft's table inet consul_tproxy.
    left = {backend: rules for backend, rules in consul_rules(host).items() if rules}
    assert not left, f"traffic is redirected before first boot: {left}"


# --- no secret anywhere ---------------------------------------------------------------


def test_token_nowhere(host: Host, expect: dict[str, Any]) -> None:
    token = expect["token"]
    assert token, "expect.json has no token to search for"
    found = grep_tree(host, unliteral(token))
    assert not found, f"the token is in the image: {found}"


def test_no_foreign_secret(host: Host) -> None:
    """No ACL token, gossip key or token variable that anything else put into Consul's
    or Envoy's config, units or env files: meshbake itself puts none there at bake."""
    scan = host.run("/usr/libexec/meshbake/meshbake-secret-scan")
    assert scan.rc == 0 and scan.stdout == "", f"secrets baked into the image:\n{scan.stdout}"


def test_carrier_folder_is_private_before_first_boot(host: Host) -> None:
    folder = host.file("/run/meshbake")
    assert folder.is_directory, "tmpfiles did not create /run/meshbake"
    assert (folder.user, folder.group, folder.mode) == ("root", "root", 0o700)


def test_boot_has_no_ordering_cycle(host: Host) -> None:
    journal = host.check_output("journalctl -b --no-pager -o cat")
    cycles = [line for line in journal.splitlines() if "ordering cycle" in line.lower()]
    assert cycles == [], "\n".join(cycles)


def test_no_secret_files(host: Host) -> None:
    present = [path for path in FIRST_BOOT_ONLY if host.file(path).exists]
    assert not present, f"files only first boot may create are present: {present}"


def test_no_private_keys_outside_ssh(host: Host) -> None:
    found = grep_tree(host, r"^-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----$")
    # The SSH host keys are allowed: test_ssh_host_keys_fresh shows they are this boot's.
    found = [path for path in found if not path.startswith("/etc/ssh/")]
    assert not found, f"private keys in the image: {found}"


def test_consul_data_dir_empty(host: Host) -> None:
    assert owner_mode(host, "/var/lib/consul") == "consul:consul 0750"
    entries = host.check_output("find /var/lib/consul -mindepth 1")
    assert not entries, f"/var/lib/consul is not empty (a baked node-id?): {entries}"


# --- per-instance identity, fresh at this boot ----------------------------------------


def test_machine_id_fresh(host: Host) -> None:
    machine_id = host.file("/etc/machine-id").content_string.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id), f"bad machine-id: {machine_id!r}"


def boot_time(host: Host) -> int:
    for line in host.file("/proc/stat").content_string.splitlines():
        if line.startswith("btime "):
            return int(line.split()[1])
    raise AssertionError("no btime in /proc/stat")


def test_ssh_host_keys_fresh(host: Host) -> None:
    listing = host.run("stat -c '%Y %n' /etc/ssh/ssh_host_*_key").stdout.splitlines()
    keys = {name: int(mtime) for mtime, _, name in (line.partition(" ") for line in listing)}
    assert keys, "no SSH host keys"
    booted = boot_time(host)
    # btime is rounded to the second and the clock may step at boot: allow a little.
    stale = {name: mtime for name, mtime in keys.items() if mtime < booted - 5}
    assert not stale, f"SSH host keys older than this boot ({booted}): {stale}"


def test_build_user_removed(host: Host) -> None:
    assert not host.user(BUILD_USER).exists, f"the build user {BUILD_USER} exists"
    assert not host.file(f"/home/{BUILD_USER}").exists, f"/home/{BUILD_USER} exists"
    sudoers = host.file("/etc/sudoers.d/90-cloud-init-users")
    if sudoers.exists:
        assert BUILD_USER not in sudoers.content_string, f"{BUILD_USER} is still in sudoers"


# --- DNS, the app, cloud-init -------------------------------------------------------


def test_resolved_forwards_consul(host: Host, expect: dict[str, Any]) -> None:
    dropin = host.file("/etc/systemd/resolved.conf.d/consul.conf")
    if not expect["dns_forward"]:
        assert not dropin.exists, "DNS forwarding is off but the resolved drop-in exists"
        return
    assert dropin.exists, "the resolved drop-in is missing"
    port = read_json(host, CONSUL_CONFIG)["ports"]["dns"]
    assert f"DNS=127.0.0.1:{port}" in dropin.content_string
    domains = host.check_output("resolvectl domain")
    servers = host.check_output("resolvectl dns")
    assert "~consul" in domains, f"resolved does not route ~consul:\n{domains}"
    assert f"127.0.0.1:{port}" in servers, f"resolved does not use Consul's DNS:\n{servers}"


def http_status(host: Host, port: int) -> str:
    """The status line of ``GET /`` on 127.0.0.1:``port`` (python3 if present, else bash)."""
    url = f"http://127.0.0.1:{port}/"
    python = (
        "import sys, urllib.request\n"
        f"r = urllib.request.urlopen({url!r}, timeout=5)\n"
        "print(r.status)\n"
    )
    bash = (
        f"exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 "
        "&& head -n 1 <&3"
    )
    script = (
        f"if command -v python3 >/dev/null; then python3 -c {shlex.quote(python)}; "
        f"else bash -c {shlex.quote(bash)}; fi"
    )
    return str(host.run(script).stdout.strip())


def test_app_answers(host: Host, expect: dict[str, Any]) -> None:
    unit = host.service(expect["app_unit"])
    assert wait_for(lambda: unit.is_running, 60), f"{expect['app_unit']} is not active"
    user = host.check_output("systemctl show -p User --value %s", expect["app_unit"])
    assert user == expect["app_user"]
    port = int(expect["port"])
    status = ""

    def answers() -> bool:
        nonlocal status
        status = http_status(host, port)
        return status == "200" or " 200 " in status

    assert wait_for(answers, 30), f"GET http://127.0.0.1:{port}/ gave {status!r}"


def test_cloud_init_done(host: Host) -> None:
    # The runner may come in while cloud-init's last stage still runs.
    host.run("timeout 180 cloud-init status --wait")
    status = host.run("cloud-init status --long")
    assert re.search(r"^status: done$", status.stdout, re.M), status.stdout + status.stderr
