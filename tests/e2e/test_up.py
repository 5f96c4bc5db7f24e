"""``meshbake up`` with both example images: web (Consul 2.1, nftables) reaches api
(Consul 2.0, iptables) by ``api.virtual.consul`` through both sidecars, as the intention
``up`` made by default allows; after SIGTERM nothing of the mesh is left.

web boots first: its sidecar starts before api is in the catalog, and must learn of it
once api's sidecar is registered, as Consul's xDS would push it (the double's
``connect envoy`` watcher). One test (two VMs under TCG are slow: see the README's
figures). The images are the session's bakes (tests/e2e/conftest.py); the server runs
web's own Consul zip, the fixture release (a TEST DOUBLE) in server mode.
"""

from __future__ import annotations

import json
import os
import selectors
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest

from builder.mesh.localnet import namespaces
from tests.paths import REPO

from .conftest import Example

pytestmark = [pytest.mark.image, pytest.mark.root]

#: How long ``up`` may take to print its line: two TCG boots one after the other.
UP_TIMEOUT = 1200
#: How long web's sidecar may take to be given api's endpoint once up is ready.
PUSH_TIMEOUT = 60
#: How long it may take to stop everything after SIGTERM.
STOP_TIMEOUT = 120


def ssh(vm: dict[str, object], command: str) -> tuple[int, str]:
    info = vm["ssh"]
    assert isinstance(info, dict)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # a throwaway VM
    try:
        client.connect(
            str(info["host"]),
            port=int(info["port"]),
            username=str(info["user"]),
            key_filename=str(vm["private_key"]),
            timeout=30,
            allow_agent=False,
            look_for_keys=False,
        )
        _, stdout, stderr = client.exec_command(command, timeout=60)
        out = stdout.read().decode(errors="replace") + stderr.read().decode(errors="replace")
        return stdout.channel.recv_exit_status(), out
    finally:
        client.close()


#: Run in the web VM as the web user: connect to the upstream by its virtual name.
FETCH = (
    "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10);"
    " s.sendall(b'GET /health.json HTTP/1.0\\r\\n\\r\\n'); d=b''\n"
    "while True:\n c=s.recv(4096)\n if not c: break\n d+=c\n"
    "sys.stdout.write(d.decode(errors='replace'))"
)


def test_up_two_images_web_reaches_api_by_virtual_name(
    bake: Callable[[str], Example], tmp_path: Path
) -> None:
    web, api = bake("web"), bake("api")
    assert web.built.output is not None and api.built.output is not None
    web_reaches_api(web.built.output, api.built.output, web.options.cache, tmp_path)


def web_reaches_api(web: Path, api: Path, cache: Path | None, tmp_path: Path) -> None:
    """``meshbake up WEB API``: web's user reaches api by its virtual name, a plain
    client gets nothing from web, and SIGTERM leaves nothing behind (tests/e2e/
    test_arm64.py runs it with api's arm64 image)."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    before = set(ours())
    child = subprocess.Popen(
        [
            sys.executable, "-m", "builder", "up", str(web), str(api), "--json",
            "--cache", str(cache),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "up.stderr").open("w"),
        text=True,
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(tmpdir)},
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),
    )  # fmt: skip
    try:
        assert child.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(child.stdout, selectors.EVENT_READ)
        line = ""
        if selector.select(UP_TIMEOUT):
            line = child.stdout.readline()
        stderr = (tmp_path / "up.stderr").read_text()
        assert line, f"up printed nothing within {UP_TIMEOUT}s:\n{stderr[-3000:]}"
        summary = json.loads(line)
        vms = {vm["service"]["name"]: vm for vm in summary["vms"]}
        assert sorted(vms) == ["api", "web"], summary
        work = Path(vms["web"]["private_key"]).parent.parent
        # From web, as the web user: api by its virtual name, through both sidecars.
        # up is ready once api passes in the catalog; web's sidecar learns of api's
        # endpoint after that (Consul's xDS push; the double's watcher), so ask again
        # for a bounded while.
        deadline = time.monotonic() + PUSH_TIMEOUT
        while True:
            code, out = ssh(
                vms["web"],
                f"sudo -u web python3 -c {shlex.quote(FETCH)} api.virtual.consul 9090",
            )
            if (code == 0 and '"service": "api"' in out) or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert code == 0 and '"service": "api"' in out, out[-2000:]
        # A plain client from the host to web's service port meets the sidecar's strict
        # mTLS listener, not the app.
        plain = subprocess.run(
            [sys.executable, "-c", FETCH, "127.0.0.1", str(vms["web"]["service"]["port"])],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "baked_by" not in plain.stdout and "<html" not in plain.stdout.lower(), plain
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            code = child.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            pytest.fail(f"up did not stop within {STOP_TIMEOUT}s of SIGTERM")
    assert code == 128 + signal.SIGTERM, (tmp_path / "up.stderr").read_text()[-2000:]
    time.sleep(1)
    assert set(ours()) - before == set(), "a namespace of up is left"
    assert not work.exists(), f"{work} (keys, tokens) is left"
    assert not list(tmpdir.iterdir()), list(tmpdir.iterdir())
    qemus = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _names(p, str(work))]
    assert not qemus, qemus


def ours() -> set[str]:
    """The namespaces ``up`` makes (``LocalNetwork(tag="up")``); the other layers of the
    suite may run beside this one (tools/run-tests) and make namespaces of their own."""
    return {name for name in namespaces() if name.startswith("meshbake-up-")}


def _names(proc: Path, text: str) -> bool:
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False
