"""The shipped image suites (``builder.imagetests``) collect the right module per phase.

The suites run against a booted image; here they are only collected, from a copy of
exactly the files the wheel ships (``*.py``), so that an accidental import from
``tests.*`` or a stray helper shows up as a collection error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

EXPECT = {
    "image": "web",
    "service": "web",
    "port": 8080,
    "proxy_id": "web-sidecar-proxy",
    "consul_version": "1.22.1",
    "envoy_version": "1.38.3",
    "app_user": "web",
    "app_unit": "web.service",
    "units": [
        "consul.service",
        "envoy-sidecar.service",
        "meshbake-firstboot.service",
        "web.service",
    ],
    "acl": True,
    "tokens": "shared",
    "inbound_exclusions": [22],
    "outbound_ports": [],
    "outbound_cidrs": [],
    "exclude_uids": [],
    "dns_forward": True,
    "token": "4d3c2b1a-0000-4000-8000-000000000000",
    "fixture": True,
}

#: Nothing listens here; collection must not connect.
URI = "paramiko://meshbake-verify@127.0.0.1:9?ssh_identity_file=/nonexistent/key"


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    """A copy of the shipped suite, as the wheel's package data has it."""
    shipped = resources.files("builder.verify.imagetests")
    out = tmp_path / "imagetests"
    out.mkdir()
    for entry in shipped.iterdir():
        if entry.name.endswith(".py"):
            (out / entry.name).write_bytes(entry.read_bytes())
    return out


def collect(suite: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(suite), "-p", "no:cacheprovider", "--collect-only"]
        + ["-q", f"--hosts={URI}", *options],
        cwd=suite.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def collected(output: str) -> list[str]:
    """``module.py::test`` ids (no folder, no host parameter) from ``--collect-only -q``."""
    ids = []
    for line in output.splitlines():
        if "::" in line:
            path, _, name = line.split("[", 1)[0].partition("::")
            ids.append(f"{Path(path).name}::{name}")
    return ids


@pytest.mark.parametrize(
    ("phase", "module", "other"),
    [
        ("baked", "test_baked.py", "test_firstboot.py"),
        ("firstboot", "test_firstboot.py", "test_baked.py"),
    ],
)
def test_phase_selects_its_module(suite: Path, phase: str, module: str, other: str) -> None:
    expect = suite.parent / "expect.json"
    expect.write_text(json.dumps({**EXPECT, "phase": phase}))
    result = collect(suite, f"--expect={expect}")
    assert result.returncode == 0, result.stdout + result.stderr
    ids = collected(result.stdout)
    assert ids, result.stdout
    assert {i.split("::")[0] for i in ids} == {module}, ids
    assert "deselected" in result.stdout, "the other module must be deselected, not skipped"
    assert all(f"{other}::" not in i for i in ids)
    if phase == "firstboot":
        # These change the host; the reboot must be last.
        assert ids[-2:] == [
            "test_firstboot.py::test_stopping_sidecar_removes_only_consul_chains",
            "test_firstboot.py::test_reboot_reapplies_redirect_once",
        ], ids
    # Each check runs once, against the one host.
    assert len(ids) == len(set(ids))
    assert all(
        "[paramiko://127.0.0.1]" in line for line in result.stdout.splitlines() if "::" in line
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"phase": "later"}, "phase must be one of"),
        ({"phase": "baked", "token": None, "acl": None}, None),
    ],
)
def test_bad_expect_is_a_usage_error(
    suite: Path, change: dict[str, object], message: str | None
) -> None:
    expect = suite.parent / "expect.json"
    data = {**EXPECT, **change}
    for key in [k for k, v in change.items() if v is None]:
        del data[key]
    expect.write_text(json.dumps(data))
    result = collect(suite, f"--expect={expect}")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert (message or "missing keys: acl, token") in result.stderr


def test_expect_is_required(suite: Path) -> None:
    result = collect(suite)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "--expect" in result.stderr


def test_suite_ships_nothing_but_python() -> None:
    # pyproject.toml ships "*.py" only; a data file next to the suites would be lost.
    shipped = resources.files("builder.verify.imagetests")
    others = [e.name for e in shipped.iterdir() if e.is_file() and not e.name.endswith(".py")]
    assert not others, others
