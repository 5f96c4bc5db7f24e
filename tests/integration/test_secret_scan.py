"""meshbake-secret-scan finds secrets that anything but first boot put into Consul's
and Envoy's config, units and env files, and finds none in what meshbake renders."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from builder.render.baked import baked_files
from builder.spec.model import load_spec
from tests.paths import REPO

SCAN = REPO / "builder" / "image" / "scripts" / "meshbake-secret-scan"
TOKEN = "0b4c3f4e-1111-4222-8333-444455556666"
GOSSIP = "aGVsbG8gd29ybGQgaGVsbG8gd29ybGQgaGVsbG8hIQ=="

pytestmark = pytest.mark.integration


def tokens_json(role: str) -> str:
    return json.dumps({"acl": {"tokens": {role: TOKEN}}})


def scan(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(SCAN)],
        env={
            "PATH": "/usr/bin:/bin",
            "MESHBAKE_PATHS_ENV": os.environ["MESHBAKE_PATHS_ENV"],  # see conftest.py
            "MESHBAKE_ROOT": str(root),
            **env,
        },
        capture_output=True,
        text=True,
        check=False,
    )


def plant(root: Path, path: str, text: str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


@pytest.mark.parametrize("image", ["web", "api"])
def test_what_meshbake_renders_scans_clean(tmp_path: Path, image: str) -> None:
    loaded = load_spec(REPO / "images" / f"{image}.yaml")
    for file in baked_files(loaded):
        target = tmp_path / file.dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.content)
    done = scan(tmp_path)
    assert (done.returncode, done.stdout) == (0, "")


#: Where someone else's secret could sit, and how it would look there.
PLANTED = {
    "default token in JSON": (
        "/etc/consul.d/extra.json",
        tokens_json("default"),
    ),
    "agent token in HCL": ("/etc/consul.d/acl.hcl", 'acl {\n  tokens {\n    agent = "x"\n  }\n}\n'),
    "gossip key in HCL": ("/etc/consul.d/gossip.hcl", f'encrypt = "{GOSSIP}"\n'),
    "gossip key in JSON": ("/etc/consul.d/gossip.json", f'{{"encrypt": "{GOSSIP}"}}'),
    "token variable in an env file": ("/etc/default/consul", "CONSUL_HTTP_TOKEN=secret\n"),
    "token variable in mesh.env": ("/etc/meshbake/extra.env", "CONSUL_HTTP_TOKEN_FILE=/x\n"),
    "token on the sidecar's command line": (
        "/etc/systemd/system/envoy-sidecar.service.d/override.conf",
        f"[Service]\nExecStart=\nExecStart=/usr/bin/consul connect envoy -token={TOKEN}\n",
    ),
    "token in a unit's environment": (
        "/etc/systemd/system/consul.service",
        "[Service]\nEnvironment=CONSUL_HTTP_TOKEN=abc\n",
    ),
    "a bare UUID in Envoy's folder": ("/etc/envoy/token-backup", TOKEN + "\n"),
}


@pytest.mark.parametrize("case", list(PLANTED))
def test_a_planted_secret_is_found_and_not_printed(tmp_path: Path, case: str) -> None:
    path, text = PLANTED[case]
    plant(tmp_path, "/etc/consul.d/consul.json", '{"acl": {"default_policy": "deny"}}\n')
    plant(tmp_path, path, text)
    done = scan(tmp_path)
    assert done.returncode == 1
    assert done.stdout.startswith(f"{path}:"), done.stdout
    assert TOKEN not in done.stdout and GOSSIP not in done.stdout


def test_first_boot_secrets_are_skipped_only_when_asked(tmp_path: Path) -> None:
    plant(
        tmp_path,
        "/etc/consul.d/zz-meshbake-secrets.json",
        tokens_json("agent"),
    )
    plant(tmp_path, "/etc/envoy/token", TOKEN + "\n")
    assert scan(tmp_path).returncode == 1
    done = scan(tmp_path, MESHBAKE_SCAN_SKIP_FIRSTBOOT="true")
    assert (done.returncode, done.stdout) == (0, "")
    plant(tmp_path, "/etc/consul.d/other.json", tokens_json("agent"))
    assert scan(tmp_path, MESHBAKE_SCAN_SKIP_FIRSTBOOT="true").returncode == 1


#: Issue 16: secrets that reach Consul or the sidecar through systemd itself, or through
#: a file a drop-in loads from elsewhere. (extra files planted, the file found)
REACHED = {
    "DefaultEnvironment= in system.conf": (
        {"/etc/systemd/system.conf": "[Manager]\nDefaultEnvironment=CONSUL_HTTP_TOKEN=abc\n"},
        "/etc/systemd/system.conf",
    ),
    "DefaultEnvironment= in a system.conf drop-in": (
        {"/etc/systemd/system.conf.d/10-x.conf": f"[Manager]\nDefaultEnvironment=X={TOKEN}\n"},
        "/etc/systemd/system.conf.d/10-x.conf",
    ),
    "EnvironmentFile= of a consul drop-in, elsewhere": (
        {
            "/etc/systemd/system/consul.service.d/env.conf": (
                "[Service]\nEnvironmentFile=-/opt/app/consul.env\n"
            ),
            "/opt/app/consul.env": "CONSUL_HTTP_TOKEN=abc\n",
        },
        "/opt/app/consul.env",
    ),
    "EnvironmentFile= of a vendor drop-in, with a space": (
        {
            "/usr/lib/systemd/system/envoy-sidecar.service.d/env.conf": (
                "[Service]\nEnvironmentFile=/srv/my app/env\n"
            ),
            "/srv/my app/env": f"X={TOKEN}\n",
        },
        "/srv/my app/env",
    ),
    "EnvironmentFile= of a prefix drop-in": (
        {
            "/etc/systemd/system/envoy-.service.d/env.conf": (
                "[Service]\nEnvironmentFile=/var/lib/app/env\n"
            ),
            "/var/lib/app/env": "CONSUL_GRPC_TOKEN=abc\n",
        },
        "/var/lib/app/env",
    ),
    "a drop-in for every service": (
        {"/etc/systemd/system/service.d/x.conf": "[Service]\nEnvironment=CONSUL_TOKEN=abc\n"},
        "/etc/systemd/system/service.d/x.conf",
    ),
}


@pytest.mark.parametrize("case", list(REACHED))
def test_a_secret_systemd_hands_to_the_units_is_found(tmp_path: Path, case: str) -> None:
    planted, found = REACHED[case]
    for path, text in planted.items():
        plant(tmp_path, path, text)
    done = scan(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{found}:" in done.stdout, done.stdout
    assert TOKEN not in done.stdout


def test_an_environment_file_is_scanned_once(tmp_path: Path) -> None:
    plant(
        tmp_path,
        "/etc/systemd/system/consul.service",
        "[Service]\nEnvironmentFile=/etc/default/consul\n",
    )
    plant(tmp_path, "/etc/default/consul", "CONSUL_HTTP_TOKEN=abc\n")
    done = scan(tmp_path)
    assert done.stdout.count("/etc/default/consul:") == 1, done.stdout
