"""meshbake-firstboot and meshbake-check, run against a tmp dir standing in for the image's /.

Nothing outside tmp is touched: MESHBAKE_ROOT moves every path of the table (paths.env,
see conftest.py; ``Image`` takes the same paths from builder.render.paths) under the tmp dir, and
the file owners come from mesh.env's MESHBAKE_CONSUL_USER / MESHBAKE_ENVOY_USER, so
existing users stand in for consul and envoy (daemon and nobody when run as root, the
current user for both otherwise). No user is created on the host and no mount
namespace is needed.

The TLS material here is PEM-shaped (the right armour around base64), not real
certificates: meshbake-firstboot checks the armour, not the X.509 inside.
"""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.errors import UserError
from builder.render import baked, cloudconfig, paths
from builder.spec import boundary
from builder.spec.compat import ConsulRelease
from tests.paths import REPO

FIRSTBOOT = REPO / "builder" / "image" / "scripts" / "meshbake-firstboot"
CHECK = REPO / "builder" / "image" / "scripts" / "meshbake-check"

pytestmark = pytest.mark.integration

AGENT_TOKEN = "6f1c3d2e-8a4b-4c5d-9e0f-1a2b3c4d5e6f"
SERVICE_TOKEN = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
DNS_TOKEN = "d0d5d0d5-1111-4222-8333-444455556666"
GOSSIP_KEY = base64.b64encode(bytes(range(32))).decode()


def pem(label: str, seed: int) -> str:
    body = base64.encodebytes(bytes((seed + i) % 256 for i in range(300))).decode()
    return f"-----BEGIN {label}-----\n{body}-----END {label}-----\n"


CA_PEM = pem("CERTIFICATE", 1)
CERT_PEM = pem("CERTIFICATE", 2)
KEY_PEM = pem("PRIVATE KEY", 3)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


ALL_SECRETS = (AGENT_TOKEN, SERVICE_TOKEN, DNS_TOKEN, GOSSIP_KEY)
ALL_SECRETS += (b64(CA_PEM), b64(CERT_PEM), b64(KEY_PEM))


@dataclass(frozen=True)
class Image:
    """A tmp dir laid out like the image's /, with the users that own the secrets.

    >>> image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN)
    >>> image.firstboot().returncode
    0
    """

    root: Path
    consul_user: str
    envoy_user: str

    def at(self, path: str) -> Path:
        """Where the image's ``path`` (from builder.render.paths) is under the tmp dir."""
        return self.root / paths.rel(path)

    @property
    def carrier(self) -> Path:
        return self.at(paths.CARRIER)

    @property
    def secrets_file(self) -> Path:
        return self.at(paths.CONSUL_SECRETS)

    @property
    def token_file(self) -> Path:
        return self.at(paths.SIDECAR_TOKEN)

    @property
    def redirect_token_file(self) -> Path:
        return self.at(paths.REDIRECT_TOKEN)

    @property
    def tls_dir(self) -> Path:
        return self.at(paths.CONSUL_TLS_DIR)

    @property
    def marker(self) -> Path:
        return self.at(paths.FIRSTBOOT_MARKER)

    @property
    def join_file(self) -> Path:
        return self.at(paths.CONSUL_JOIN)

    def outputs(self) -> list[Path]:
        """Every file first boot may write that exists now."""
        candidates = [self.secrets_file, self.token_file, self.redirect_token_file, self.marker]
        candidates.append(self.join_file)
        candidates += [self.tls_dir / name for name in ("ca.pem", "cert.pem", "key.pem")]
        return [path for path in candidates if path.exists()]

    def env(self, **settings: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("MESHBAKE_")}
        env |= {
            "MESHBAKE_PATHS_ENV": os.environ["MESHBAKE_PATHS_ENV"],  # see conftest.py
            "MESHBAKE_ROOT": str(self.root),
            "MESHBAKE_CONSUL_USER": self.consul_user,
            "MESHBAKE_ENVOY_USER": self.envoy_user,
            "MESHBAKE_ACL": "true",
            "MESHBAKE_TOKENS": "shared",
            "MESHBAKE_GOSSIP": "false",
            "MESHBAKE_TLS": "false",
            "MESHBAKE_TLS_CLIENT_CERT": "false",
            **on_consul("2.1.0"),
        }
        return env | settings

    def deliver_text(self, text: str) -> None:
        """Write the carrier as cloud-init's write_files would (0600)."""
        self.carrier.parent.mkdir(parents=True, exist_ok=True)
        self.carrier.write_text(text)
        self.carrier.chmod(0o600)

    def deliver(self, **values: str) -> None:
        self.deliver_text("".join(f"{key}={value}\n" for key, value in values.items()))

    def firstboot(self, **settings: str) -> subprocess.CompletedProcess[str]:
        return run(FIRSTBOOT, env=self.env(**settings))

    def check(self, unit: str, **settings: str) -> subprocess.CompletedProcess[str]:
        return run(CHECK, unit, env=self.env(**settings))


def on_consul(version: str) -> dict[str, str]:
    """mesh.env's facts about this Consul release, as the render writes them, without the
    version itself: first boot must decide from the facts alone (issue 17)."""
    facts = baked.release_env(ConsulRelease.of(version))
    del facts["MESHBAKE_CONSUL_VERSION"]
    return facts


def run(*argv: str | os.PathLike[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [os.fspath(arg) for arg in argv],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.fixture
def image(tmp_path: Path) -> Image:
    if os.geteuid() == 0:
        return Image(tmp_path / "root", consul_user="daemon", envoy_user="nobody")
    me = pwd.getpwuid(os.geteuid()).pw_name
    return Image(tmp_path / "root", consul_user=me, envoy_user=me)


def assert_private(path: Path, user: str) -> None:
    """PATH is a regular file, mode 0600, owned by USER and USER's login group."""
    info = path.lstat()
    assert stat.S_ISREG(info.st_mode), path
    assert stat.S_IMODE(info.st_mode) == 0o600, (path, oct(info.st_mode))
    entry = pwd.getpwnam(user)
    assert pwd.getpwuid(info.st_uid).pw_name == user, path
    assert info.st_gid == entry.pw_gid, (path, grp.getgrgid(info.st_gid).gr_name)


def assert_no_secret_in(result: subprocess.CompletedProcess[str]) -> None:
    for secret in ALL_SECRETS:
        assert secret not in result.stdout + result.stderr


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def test_separate_tokens_gossip_and_tls_are_written_private(image: Image) -> None:
    image.deliver(
        MESHBAKE_AGENT_TOKEN=AGENT_TOKEN,
        MESHBAKE_SERVICE_TOKEN=SERVICE_TOKEN,
        MESHBAKE_GOSSIP_KEY=GOSSIP_KEY,
        MESHBAKE_TLS_CA_B64=b64(CA_PEM),
        MESHBAKE_TLS_CERT_B64=b64(CERT_PEM),
        MESHBAKE_TLS_KEY_B64=b64(KEY_PEM),
    )
    result = image.firstboot(
        MESHBAKE_TOKENS="separate",
        MESHBAKE_GOSSIP="true",
        MESHBAKE_TLS="true",
        MESHBAKE_TLS_CLIENT_CERT="true",
    )
    assert_ok(result)
    assert_no_secret_in(result)

    assert json.loads(image.secrets_file.read_text()) == {
        "acl": {"tokens": {"agent": AGENT_TOKEN, REGISTRATION: SERVICE_TOKEN}},
        "encrypt": GOSSIP_KEY,
    }
    assert_private(image.secrets_file, image.consul_user)
    assert image.token_file.read_text() == SERVICE_TOKEN + "\n"
    assert_private(image.token_file, image.envoy_user)
    # The redirect asks GET /v1/agent/self, which the agent token's agent:read allows.
    assert image.redirect_token_file.read_text() == AGENT_TOKEN + "\n"
    assert_private(image.redirect_token_file, "root")
    for name, content in (("ca.pem", CA_PEM), ("cert.pem", CERT_PEM), ("key.pem", KEY_PEM)):
        assert (image.tls_dir / name).read_text() == content
        assert_private(image.tls_dir / name, image.consul_user)

    assert not image.carrier.exists()
    assert image.marker.is_file()
    assert stat.S_IMODE(image.marker.stat().st_mode) == 0o644
    # Directories first boot had to create: the service can enter, others cannot.
    assert stat.S_IMODE(image.tls_dir.stat().st_mode) == 0o750
    assert stat.S_IMODE(image.token_file.parent.stat().st_mode) == 0o750
    # No temporary copy of a secret is left behind.
    leftovers = [p for p in image.root.rglob(".meshbake-firstboot.*")]
    assert leftovers == []


#: Consul 1.15+ registers config-file services with this token; no default token is set.
REGISTRATION = "config_file_service_registration"


def test_before_consul_1_15_the_default_token_registers_the_service(image: Image) -> None:
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN, MESHBAKE_SERVICE_TOKEN=SERVICE_TOKEN)
    assert_ok(image.firstboot(MESHBAKE_TOKENS="separate", **on_consul("1.14.9")))
    tokens = json.loads(image.secrets_file.read_text())["acl"]["tokens"]
    assert tokens == {"agent": AGENT_TOKEN, "default": SERVICE_TOKEN}


def test_shared_token_serves_agent_and_sidecar(image: Image) -> None:
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN)
    result = image.firstboot()
    assert_ok(result)
    assert json.loads(image.secrets_file.read_text()) == {
        "acl": {"tokens": {"agent": AGENT_TOKEN, REGISTRATION: AGENT_TOKEN, "dns": AGENT_TOKEN}}
    }
    assert image.token_file.read_text() == AGENT_TOKEN + "\n"
    assert_private(image.token_file, image.envoy_user)
    assert not image.tls_dir.exists()


# DNS queries carry no token: Consul answers them with acl.tokens.dns (1.17+, CHANGELOG
# 1.17.0, GH-17936); 1.15 and 1.16 use the default token, which then holds the DNS
# token only; before 1.15 the default token registers the service and answers DNS.
@pytest.mark.parametrize(
    ("version", "tokens", "carrier", "expected"),
    [
        (
            "2.1.0",
            "separate",
            {"MESHBAKE_SERVICE_TOKEN": SERVICE_TOKEN, "MESHBAKE_DNS_TOKEN": DNS_TOKEN},
            {REGISTRATION: SERVICE_TOKEN, "dns": DNS_TOKEN},
        ),
        (
            "1.17.0",
            "separate",
            {"MESHBAKE_SERVICE_TOKEN": SERVICE_TOKEN, "MESHBAKE_DNS_TOKEN": DNS_TOKEN},
            {REGISTRATION: SERVICE_TOKEN, "dns": DNS_TOKEN},
        ),
        (
            "1.16.3",
            "separate",
            {"MESHBAKE_SERVICE_TOKEN": SERVICE_TOKEN, "MESHBAKE_DNS_TOKEN": DNS_TOKEN},
            {REGISTRATION: SERVICE_TOKEN, "default": DNS_TOKEN},
        ),
        ("2.0.0", "shared", {}, {REGISTRATION: AGENT_TOKEN, "dns": AGENT_TOKEN}),
        ("1.15.0", "shared", {}, {REGISTRATION: AGENT_TOKEN, "default": AGENT_TOKEN}),
        (
            "2.1.0",
            "shared",
            {"MESHBAKE_DNS_TOKEN": DNS_TOKEN},
            {REGISTRATION: AGENT_TOKEN, "dns": DNS_TOKEN},
        ),
        ("1.14.9", "shared", {}, {"default": AGENT_TOKEN}),
    ],
)
def test_the_dns_token_answers_dns_per_consul_line(
    image: Image, version: str, tokens: str, carrier: dict[str, str], expected: dict[str, str]
) -> None:
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN, **carrier)
    result = image.firstboot(MESHBAKE_TOKENS=tokens, **on_consul(version))
    assert_ok(result)
    assert_no_secret_in(result)
    secrets = json.loads(image.secrets_file.read_text())
    assert secrets["acl"]["tokens"] == {"agent": AGENT_TOKEN, **expected}
    assert_private(image.secrets_file, image.consul_user)


def test_before_consul_1_15_a_separate_dns_token_is_refused(image: Image) -> None:
    image.deliver(
        MESHBAKE_AGENT_TOKEN=AGENT_TOKEN,
        MESHBAKE_SERVICE_TOKEN=SERVICE_TOKEN,
        MESHBAKE_DNS_TOKEN=DNS_TOKEN,
    )
    result = image.firstboot(MESHBAKE_TOKENS="separate", **on_consul("1.14.9"))
    assert result.returncode == 1
    assert "MESHBAKE_DNS_TOKEN" in result.stderr
    assert_no_secret_in(result)
    assert image.outputs() == []


def test_a_malformed_dns_token_is_refused(image: Image) -> None:
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN, MESHBAKE_DNS_TOKEN="not-a-token")
    result = image.firstboot()
    assert result.returncode == 1
    assert "MESHBAKE_DNS_TOKEN is not a UUID" in result.stderr
    assert image.outputs() == []


def test_carrier_is_parsed_not_sourced(image: Image, tmp_path: Path) -> None:
    sentinel = tmp_path / "sourced"
    image.deliver_text(f"MESHBAKE_AGENT_TOKEN=$(touch {sentinel})\n")
    result = image.firstboot()
    assert result.returncode == 1
    assert "MESHBAKE_AGENT_TOKEN is not a UUID" in result.stderr
    assert not sentinel.exists()


def test_quotes_crlf_and_comments_in_the_carrier_are_accepted(image: Image) -> None:
    image.deliver_text(f'# written by cloud-init\r\n\r\nMESHBAKE_AGENT_TOKEN="{AGENT_TOKEN}"\r\n')
    assert_ok(image.firstboot())
    assert image.token_file.read_text() == AGENT_TOKEN + "\n"


def test_second_run_is_a_noop(image: Image) -> None:
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN)
    assert_ok(image.firstboot())
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in image.outputs()}

    image.deliver(MESHBAKE_AGENT_TOKEN=SERVICE_TOKEN)
    result = image.firstboot()
    assert_ok(result)
    assert "already ran" in result.stderr
    assert not image.carrier.exists()
    after = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in image.outputs()}
    assert after == before


MALFORMED = {
    "token not a UUID": ({"MESHBAKE_AGENT_TOKEN": "not-a-token"}, {}),
    "token with a trailing extra": ({"MESHBAKE_AGENT_TOKEN": AGENT_TOKEN + "0"}, {}),
    "service token not a UUID": (
        {"MESHBAKE_AGENT_TOKEN": AGENT_TOKEN, "MESHBAKE_SERVICE_TOKEN": "x" * 36},
        {"MESHBAKE_TOKENS": "separate"},
    ),
    "gossip key of 16 bytes": (
        {
            "MESHBAKE_AGENT_TOKEN": AGENT_TOKEN,
            "MESHBAKE_GOSSIP_KEY": base64.b64encode(bytes(16)).decode(),
        },
        {"MESHBAKE_GOSSIP": "true"},
    ),
    "gossip key not base64": (
        {"MESHBAKE_AGENT_TOKEN": AGENT_TOKEN, "MESHBAKE_GOSSIP_KEY": "!" * 43 + "="},
        {"MESHBAKE_GOSSIP": "true"},
    ),
    "CA not PEM": (
        {"MESHBAKE_AGENT_TOKEN": AGENT_TOKEN, "MESHBAKE_TLS_CA_B64": b64("hello\n")},
        {"MESHBAKE_TLS": "true"},
    ),
    "CA not base64": (
        {"MESHBAKE_AGENT_TOKEN": AGENT_TOKEN, "MESHBAKE_TLS_CA_B64": "%%%"},
        {"MESHBAKE_TLS": "true"},
    ),
    "key that is a certificate": (
        {
            "MESHBAKE_AGENT_TOKEN": AGENT_TOKEN,
            "MESHBAKE_TLS_CA_B64": b64(CA_PEM),
            "MESHBAKE_TLS_CERT_B64": b64(CERT_PEM),
            "MESHBAKE_TLS_KEY_B64": b64(CERT_PEM),
        },
        {"MESHBAKE_TLS": "true", "MESHBAKE_TLS_CLIENT_CERT": "true"},
    ),
    "unknown key": ({"MESHBAKE_AGENT_TOKEN": AGENT_TOKEN, "MESHBAKE_AGNET_TOKEN": "x"}, {}),
}


@pytest.mark.parametrize("values,settings", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_carrier_is_refused_and_nothing_written(
    image: Image, values: dict[str, str], settings: dict[str, str]
) -> None:
    image.deliver(**values)
    result = image.firstboot(**settings)
    assert result.returncode == 1, result.stderr
    assert "refusing" in result.stderr
    assert_no_secret_in(result)
    assert image.outputs() == []
    # Kept for inspection: root-only and on tmpfs in the image.
    assert image.carrier.exists()


def test_duplicate_key_and_garbage_line_are_refused(image: Image) -> None:
    image.deliver_text(f"MESHBAKE_AGENT_TOKEN={AGENT_TOKEN}\nMESHBAKE_AGENT_TOKEN={AGENT_TOKEN}\n")
    result = image.firstboot()
    assert result.returncode == 1
    assert "appears twice" in result.stderr
    image.deliver_text(f"MESHBAKE_AGENT_TOKEN={AGENT_TOKEN}\nexport FOO\n")
    result = image.firstboot()
    assert result.returncode == 1
    assert "line 2: not a KEY=VALUE line" in result.stderr
    assert image.outputs() == []


def test_missing_required_gossip_key_is_refused(image: Image) -> None:
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN)
    result = image.firstboot(MESHBAKE_GOSSIP="true")
    assert result.returncode == 1
    assert "MESHBAKE_GOSSIP_KEY is missing" in result.stderr
    assert image.outputs() == []


@pytest.mark.parametrize("carrier", [None, "# no token in here\n"], ids=["absent", "no token"])
def test_acl_on_without_token_leaves_the_mesh_down(image: Image, carrier: str | None) -> None:
    if carrier is not None:
        image.deliver_text(carrier)
    result = image.firstboot()
    assert_ok(result)
    assert "the mesh stays down" in result.stderr
    assert image.outputs() == []
    assert not image.carrier.exists()


def test_acl_off_writes_no_tokens(image: Image) -> None:
    result = image.firstboot(MESHBAKE_ACL="false")
    assert_ok(result)
    assert image.outputs() == [image.marker]


def test_check_skips_units_until_secrets_arrive(image: Image) -> None:
    for unit in ("consul", "sidecar"):
        result = image.check(unit)
        assert result.returncode == 1
        assert result.stderr == (
            f"meshbake: {unit}: no ACL token delivered yet; the mesh stays down until first "
            "boot delivers one (see meshbake userdata)\n"
        )
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN)
    assert_ok(image.firstboot())
    for unit in ("consul", "sidecar"):
        result = image.check(unit)
        assert_ok(result)
        assert result.stderr == ""


def test_check_with_acl_off_always_passes(image: Image) -> None:
    for unit in ("consul", "sidecar"):
        assert_ok(image.check(unit, MESHBAKE_ACL="false"))


def test_check_waits_for_gossip_key_and_tls(image: Image) -> None:
    settings = {"MESHBAKE_ACL": "false", "MESHBAKE_GOSSIP": "true", "MESHBAKE_TLS": "true"}
    result = image.check("consul", **settings)
    assert result.returncode == 1
    assert "no gossip key delivered yet" in result.stderr
    image.deliver(MESHBAKE_GOSSIP_KEY=GOSSIP_KEY, MESHBAKE_TLS_CA_B64=b64(CA_PEM))
    assert_ok(image.firstboot(**settings))
    assert_ok(image.check("consul", **settings))


def test_check_app_always_lets_the_app_start_and_says_the_mesh_is_down(image: Image) -> None:
    # No systemd runs envoy-sidecar.service here, as on a VM that got no token.
    result = image.check("app")
    assert_ok(result)
    assert result.stderr.startswith(
        "meshbake: app: starting WITHOUT the mesh: envoy-sidecar.service is "
    )


def test_check_misuse_fails_the_unit(image: Image) -> None:
    # 255 is what systemd treats as a failure rather than a skip.
    assert image.check("envoy").returncode == 255
    assert image.check("consul", MESHBAKE_ACL="yes").returncode == 255


def test_secret_store_route_without_helper_fails_clearly(image: Image) -> None:
    image.deliver(MESHBAKE_TOKEN_SSM_PARAMETER="/mesh/web/token")
    result = image.firstboot()
    assert result.returncode == 1
    assert "meshbake-fetch-token is missing" in result.stderr
    assert image.outputs() == []


def test_secret_store_route_uses_the_helper(image: Image, tmp_path: Path) -> None:
    calls = tmp_path / "helper-calls"
    helper = image.at(paths.FETCH_TOKEN)
    helper.parent.mkdir(parents=True)
    # A stand-in for the helper another part of meshbake provides.
    helper.write_text(
        "#!/bin/sh\n"
        f'printf "%s %s\\n" "$1" "$MESHBAKE_TOKEN_SSM_PARAMETER" >>{calls}\n'
        f"case $1 in agent) echo {AGENT_TOKEN} ;; service) echo {SERVICE_TOKEN} ;; esac\n"
    )
    helper.chmod(0o755)
    image.deliver(MESHBAKE_TOKEN_SSM_PARAMETER="/mesh/web/token")

    result = image.firstboot(MESHBAKE_TOKENS="separate")
    assert_ok(result)
    assert_no_secret_in(result)
    assert calls.read_text() == "agent /mesh/web/token\nservice /mesh/web/token\n"
    assert json.loads(image.secrets_file.read_text())["acl"]["tokens"] == {
        "agent": AGENT_TOKEN,
        REGISTRATION: SERVICE_TOKEN,
    }
    assert image.token_file.read_text() == SERVICE_TOKEN + "\n"


# --- where the paths come from ----------------------------------------------------------


def test_the_scripts_take_their_paths_from_the_table(image: Image, tmp_path: Path) -> None:
    """A table with other paths moves what first boot writes and what check looks for."""
    moved = {"MESHBAKE_SIDECAR_TOKEN_FILE": "/srv/sidecar/token"}
    table = tmp_path / "paths.env"
    table.write_text(
        "".join(f"{row.variable}={moved.get(row.variable, row.path)}\n" for row in paths.TABLE)
    )
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN)
    assert_ok(image.firstboot(MESHBAKE_PATHS_ENV=str(table)))
    assert (image.root / "srv/sidecar/token").read_text() == AGENT_TOKEN + "\n"
    assert not image.token_file.exists()
    assert image.check("sidecar", MESHBAKE_PATHS_ENV=str(table)).returncode == 0
    assert image.check("sidecar").returncode == 1


def test_a_path_set_by_the_caller_wins_over_the_table(image: Image, tmp_path: Path) -> None:
    secrets = tmp_path / "elsewhere" / "secrets.json"
    token = tmp_path / "elsewhere" / "token"
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN)
    overrides = {"MESHBAKE_SECRETS_FILE": str(secrets), "MESHBAKE_SIDECAR_TOKEN_FILE": str(token)}
    assert_ok(image.firstboot(**overrides))
    assert token.read_text() == AGENT_TOKEN + "\n"
    assert json.loads(secrets.read_text())["acl"]["tokens"]["agent"] == AGENT_TOKEN
    assert not image.secrets_file.exists() and not image.token_file.exists()
    assert image.check("consul", **overrides).returncode == 0
    assert image.check("consul").returncode == 1


def test_without_the_table_the_scripts_refuse_clearly(image: Image, tmp_path: Path) -> None:
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN)
    missing = str(tmp_path / "no-paths.env")
    message = f"cannot read {missing}, the table of in-image paths"
    firstboot = image.firstboot(MESHBAKE_PATHS_ENV=missing)
    assert firstboot.returncode == 1 and message in firstboot.stderr
    assert image.outputs() == []
    # 255, a failure: the unit must not be skipped as if the secrets were merely missing.
    check = image.check("consul", MESHBAKE_PATHS_ENV=missing)
    assert check.returncode == 255 and message in check.stderr


# --- userdata --join: retry_join for Consul, written before it starts --------------------


def test_join_addresses_from_userdata_become_consuls_retry_join(image: Image) -> None:
    """The carrier ``meshbake userdata --join`` makes (the same code renders it) gives
    /etc/consul.d/50-join.json: JSON with the list, root:consul 0640 like the baked
    Consul config; a second run changes nothing."""
    carrier = cloudconfig.join_values(["198.18.0.1", "2001:DB8::1", "consul.mesh.example"])
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN, **carrier)
    result = image.firstboot()
    assert_ok(result)
    info = image.join_file.lstat()
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o640, oct(info.st_mode)
    assert info.st_uid == 0
    assert info.st_gid == pwd.getpwnam(image.consul_user).pw_gid
    assert json.loads(image.join_file.read_text()) == {
        "retry_join": ["198.18.0.1", "2001:db8::1", "consul.mesh.example"]
    }
    before = image.join_file.read_bytes(), info.st_mtime_ns
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN, MESHBAKE_RETRY_JOIN="203.0.113.9")
    again = image.firstboot()
    assert_ok(again)
    assert "already ran" in again.stderr
    assert (image.join_file.read_bytes(), image.join_file.stat().st_mtime_ns) == before


def test_without_join_addresses_no_join_file_is_written(image: Image) -> None:
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN)
    assert_ok(image.firstboot())
    assert not image.join_file.exists()


#: Values userdata refuses (boundary.join_address), as a forged carrier would bring them.
HOSTILE_JOINS = {
    "json break-out": '198.18.0.1"],"acl":{"enabled":false},"x":["',
    "command": "$(touch /tmp/meshbake-specjoin-sourced)",
    "cloud auto-join": "provider=aws",
    "port": "198.18.0.1:8301",
    "brackets": "[2001:db8::1]",
    "zone id": "fe80::1%eth0",
    "octet over 255": "1.2.3.999",
    "empty label": "a..example",
    "backslash": "consul\\.example",
    "glob": "*",
}


@pytest.mark.parametrize("value", HOSTILE_JOINS.values(), ids=HOSTILE_JOINS.keys())
def test_a_hostile_join_value_is_refused_and_nothing_written(image: Image, value: str) -> None:
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN, MESHBAKE_RETRY_JOIN=f"198.18.0.1 {value}")
    result = image.firstboot()
    assert result.returncode == 1, result.stderr
    assert "not an IP address or a DNS name; refusing the carrier" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert_no_secret_in(result)
    assert image.outputs() == []
    assert not Path("/tmp/meshbake-specjoin-sourced").exists()


#: Addresses at the edges of the grammar that userdata and first boot share.
JOIN_EDGES = [
    "198.18.0.1", "0.0.0.0", "255.255.255.255", "256.1.1.1", "01.2.3.4", "1.2.3",
    "1.2.3.4.5", "::", "::1", "1::", "2001:DB8::1", "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7::",
    "1:2:3:4:5:6:7:8::", "1:2:3:4:5:6:7", "1:2", "1::2::3", "12345::1", "::ffff:1.2.3.4",
    "fe80::1%eth0", "localhost", "consul-1.mesh.example", "a" * 63 + ".example",
    "a" * 64 + ".example", ".".join(["a" * 63] * 4)[:253], ".".join(["a" * 63] * 4),
    "-a.example", "a-.example", "a.1", "1a.example", "a_b.example", "xn--bcher-kva.example",
]  # fmt: skip


def _userdata_takes(value: str) -> bool:
    try:
        boundary.join_address(value)
    except UserError:
        return False
    return True


@pytest.mark.parametrize("value", JOIN_EDGES)
def test_userdata_and_firstboot_take_the_same_join_addresses(image: Image, value: str) -> None:
    """What ``userdata --join`` takes, first boot takes as it is; what it refuses, first
    boot refuses too (a forged carrier)."""
    image.deliver(MESHBAKE_AGENT_TOKEN=AGENT_TOKEN, MESHBAKE_RETRY_JOIN=value)
    result = image.firstboot()
    if _userdata_takes(value):
        assert_ok(result)
        assert json.loads(image.join_file.read_text()) == {"retry_join": [value]}
    else:
        assert result.returncode == 1, result.stderr
        assert "not an IP address or a DNS name" in result.stderr
        assert image.outputs() == []
