"""Wiring of the image suites (shipped in the wheel as ``builder.verify.imagetests``).

The runner (``builder/verify/runner.py``) calls::

    python -m pytest <this dir> -p no:cacheprovider --hosts=<uri> --expect=<expect.json> \
        --junitxml=<file> -q

``--expect`` names a JSON file that says what the image should contain and which
phase to check: ``"baked"`` runs ``test_baked.py`` (booted without user data),
``"firstboot"`` runs ``test_firstboot.py`` (booted with the minimal first-boot user
data). The other module is deselected, not skipped, so reports list only real checks.

Every check needs root on the target, so testinfra's ``--sudo`` is always on: commands
run as ``sudo /bin/sh -c '...'`` through the SSH user, which needs passwordless sudo
(the verify user on a local VM, ``admin`` on a Debian EC2 instance).

This file and ``helpers.py`` (which the suites import relatively) need nothing but
pytest, testinfra and the standard library: they also run from an installed wheel,
where no ``tests`` package exists.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
import pytest
import testinfra.backend
import testinfra.backend.paramiko
import testinfra.host

#: Where pytest_configure keeps the loaded --expect file.
EXPECT = pytest.StashKey[dict[str, Any]]()

#: phase -> the module that checks it.
PHASE_MODULES = {"baked": "test_baked.py", "firstboot": "test_firstboot.py"}

#: Keys every expect.json carries (written by builder/verify/runner.py).
EXPECT_KEYS = frozenset(
    {
        "phase",
        "image",
        "service",
        "port",
        "proxy_id",
        "consul_version",
        "envoy_version",
        "app_user",
        "app_unit",
        "wait_for_mesh",
        "units",
        "acl",
        "tokens",
        "inbound_exclusions",
        "outbound_ports",
        "outbound_cidrs",
        "exclude_uids",
        "dns_forward",
        "token",
        "dns_token",
        "redirect_backend",
        "dns_token_key",
        "fail_closed",
        "imds_restricted",
        "imds_allow_users",
        "traffic",
        "mesh",
    }
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--expect",
        action="store",
        default=None,
        metavar="FILE",
        help="meshbake image suites: JSON file with the expected image facts and the phase",
    )


def load_expect(path: str | None) -> dict[str, Any]:
    """Read and check ``--expect``; a bad file is a usage error, not a failed check."""
    if not path:
        raise pytest.UsageError("the meshbake image suites need --expect=FILE (see conftest.py)")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise pytest.UsageError(f"--expect={path}: {exc}") from None
    if not isinstance(data, dict):
        raise pytest.UsageError(f"--expect={path}: not a JSON object")
    missing = sorted(EXPECT_KEYS - data.keys())
    if missing:
        raise pytest.UsageError(f"--expect={path}: missing keys: {', '.join(missing)}")
    if data["phase"] not in PHASE_MODULES:
        raise pytest.UsageError(
            f"--expect={path}: phase must be one of {', '.join(PHASE_MODULES)},"
            f" not {data['phase']!r}"
        )
    return data


#: Longest any one command may take over SSH before its connection counts as dead.
COMMAND_TIMEOUT = 200.0


def _exec_command_with_timeout(
    self: testinfra.backend.paramiko.ParamikoBackend, command: bytes
) -> tuple[int, bytes, bytes]:
    """testinfra's ``ParamikoBackend._exec_command``, with a deadline.

    An SSH connection made while no redirect is in place stops answering when one is
    applied (the kernel picks the connection up mid-stream and NATs sshd's replies into
    Envoy, as the rules say for any root-owned TCP). testinfra would wait forever; with
    the deadline the dead connection is closed and testinfra reconnects once and runs the
    command again (its own recovery for a connection that went away).
    """
    transport = self.client.get_transport()
    assert transport is not None
    chan = transport.open_session(timeout=COMMAND_TIMEOUT)
    chan.settimeout(COMMAND_TIMEOUT)
    if self.get_pty:
        chan.get_pty()
    chan.exec_command(command)
    try:
        stdout = b"".join(chan.makefile("rb"))
        stderr = b"".join(chan.makefile_stderr("rb"))
    except TimeoutError as exc:
        transport.close()
        raise paramiko.SSHException(
            f"no answer over SSH for {COMMAND_TIMEOUT:.0f} s; the connection is dead"
        ) from exc
    return chan.recv_exit_status(), stdout, stderr


def pytest_configure(config: pytest.Config) -> None:
    config.stash[EXPECT] = load_expect(config.getoption("--expect"))
    testinfra.backend.paramiko.ParamikoBackend._exec_command = _exec_command_with_timeout
    # Root is needed for nearly every check (0600 files, iptables, the journal).
    if hasattr(config.option, "sudo"):
        config.option.sudo = True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = PHASE_MODULES[config.stash[EXPECT]["phase"]]
    keep = [item for item in items if item.path.name == wanted]
    drop = [item for item in items if item.path.name != wanted]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def expect(pytestconfig: pytest.Config) -> dict[str, Any]:
    """The expected image facts (``--expect``), e.g. ``expect["service"] == "web"``."""
    return pytestconfig.stash[EXPECT]


@pytest.fixture(scope="session")
def host_uri(pytestconfig: pytest.Config) -> str:
    """The ``--hosts`` URI of the target (one host), for fresh connections."""
    hosts = pytestconfig.getoption("hosts")
    if not hosts or "," in hosts:
        raise pytest.UsageError("the meshbake image suites need exactly one --hosts=URI")
    return str(hosts)


@pytest.fixture(scope="session")
def connect(pytestconfig: pytest.Config, host_uri: str) -> Callable[[], testinfra.host.Host]:
    """A factory of new, uncached connections to the target.

    The ``host`` fixture keeps one connection per module; checks that need a fresh one
    (SSH still answers after the redirect, the host is back after a reboot) call this.

    >>> fresh = connect()
    >>> fresh.run("true").succeeded
    True
    """
    option = pytestconfig.option
    # The same options the testinfra plugin passes to its own hosts; the URI's own
    # query parameters (ssh_identity_file=...) take precedence, as they do there.
    given = {
        "connection": option.connection,
        "ssh_config": option.ssh_config,
        "ssh_identity_file": option.ssh_identity_file,
        "sudo_user": option.sudo_user,
    }
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    options["sudo"] = True

    def new_host() -> testinfra.host.Host:
        backend = testinfra.backend.get_backend(host_uri, **options)
        fresh = testinfra.host.Host(backend)
        backend.set_host(fresh)
        return fresh

    return new_host
