"""A failed or interrupted build, base or verify leaves nothing behind.

No qemu, no Packer, no partial image that looks good, no work folder (Packer's TMPDIR
with the seed, the ephemeral SSH key, verify's overlay and seed with the token); a
failure names the stage and the log.

Signals: SIGINT exits 130, SIGTERM 143 and SIGHUP 129 (128 + the signal, as a shell
reports it), each after the same cleanup. Every test sends its signal as soon as the
stage's progress line appears on stderr (or its VM shows up), gives meshbake a TMPDIR
of its own, and then requires, within 30 s of the signal: the exit, no process whose
argv names the test's folders, no ``meshbake-*`` folder in that TMPDIR and no output.
The cached base and artifacts are reused; only the real-VM stages (boot, provision,
verify) boot qemu. Shutdown and compress come last in a bake (minutes in), so they run
against a TEST DOUBLE of Packer that stops at that stage, with a stand-in "qemu" that
left Packer's process group, as a re-parented qemu does.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import queue
import re
import shutil
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import yaml

from builder.bake.base import BaseImage
from builder.bake.run import BuildOptions, build_image
from builder.errors import UserError
from builder.mesh.localnet import namespaces
from builder.proc import processes_naming
from tests.fixtures.signals import dispositions
from tests.paths import REPO

from .conftest import mesh_for

#: What meshbake exits with after each signal (128 + signal).
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
#: The issue's bound: everything is gone within this many seconds of the signal.
CLEANUP_SECONDS = 30.0
SPEC = REPO / "images" / "web.yaml"


# --- helpers -----------------------------------------------------------------------------


def short_tmp(tmp_path: Path) -> Path:
    """The TMPDIR a test gives meshbake: short, as a user's is, so Packer's plugin sockets
    fit in it (/tmp/pytest-of-root/... would not), and tied to this test's tmp_path."""
    return Path("/tmp") / f"mbt-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:10]}"


@pytest.fixture(autouse=True)
def _remove_short_tmp(tmp_path: Path) -> Iterator[None]:
    yield
    shutil.rmtree(short_tmp(tmp_path), ignore_errors=True)


def _processes_naming(*folders: Path) -> list[str]:
    """Live processes (not us) whose argv names one of ``folders``."""
    found = []
    for pid in processes_naming(*map(str, folders)):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
            found.append(f"{pid}: {shown}")
    return found


def _wait_gone(since: float, *folders: Path) -> list[str]:
    """Processes naming ``folders`` that are still there ``CLEANUP_SECONDS`` after ``since``
    (a process just killed may take a moment to go)."""
    left = _processes_naming(*folders)
    while left and time.monotonic() < since + CLEANUP_SECONDS:
        time.sleep(0.2)
        left = _processes_naming(*folders)
    return left


def _qemus_naming(folder: Path) -> list[str]:
    return [p for p in _processes_naming(folder) if "qemu-system" in p]


#: The network namespace verify's progress names: "... on 198.18.0.1/24 (NAME)".
VERIFY_NETNS = re.compile(r"\((meshbake-verify-[0-9a-f]+)\)")


class Meshbake:
    """A ``python -m builder`` child whose stderr lines the test can wait for."""

    def __init__(
        self,
        argv: Sequence[str],
        tmpdir: Path,
        *,
        env: dict[str, str] | None = None,
        ignore_sigint: bool = False,
        wrap: Sequence[str] = (),
    ) -> None:
        tmpdir.mkdir(parents=True, exist_ok=True)
        self.tmpdir = tmpdir
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()

        self.child = subprocess.Popen(
            [*wrap, sys.executable, "-m", "builder", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "TMPDIR": str(tmpdir), **(env or {})},
            # Each signal a test sends is at its default in the child, whatever the suite
            # was started with (nohup ignores SIGHUP); ``ignore_sigint`` is how a shell
            # script's background job (or many CI runners) starts us.
            preexec_fn=dispositions({signal.SIGINT} if ignore_sigint else ()),
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.child.stderr is not None
        for line in self.child.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, needle: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if needle in line:
                return
        self.stop()
        pytest.fail(f"never saw {needle!r}; stderr:\n{self.stderr()}")

    def wait_until(self, ready: Callable[[], object], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if self.child.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"{what} never happened; stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)

    def stop(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
            self.child.wait()

    def interrupt(self, sig: signal.Signals, *folders: Path) -> None:
        """Send ``sig``; require the exit code and a clean slate within the bound."""
        sent = time.monotonic()
        self.child.send_signal(sig)
        try:
            code = self.child.wait(timeout=CLEANUP_SECONDS)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"no exit within {CLEANUP_SECONDS}s of {sig.name}:\n{self.stderr()}")
        assert code == EXIT_CODES[sig], self.stderr()
        assert "Traceback" not in self.stderr(), self.stderr()
        assert _wait_gone(sent, self.tmpdir, *folders) == []
        assert sorted(p.name for p in self.tmpdir.glob("meshbake-*")) == []


def _assert_no_output(out: Path) -> None:
    if out.exists():
        assert sorted(p.name for p in out.glob("*.qcow2")) == []
        assert not (out / "manifest.json").exists()
        assert sorted(p.name for p in out.glob(".work-*")) == []


def _build_argv(
    e2e_options: BuildOptions, out: Path, *extra: str, mirror: str | None = None
) -> list[str]:
    argv = ["build", str(SPEC), "--out", str(out), "--force", *extra]
    if "--cache" not in extra and e2e_options.cache is not None:
        # The session's cache, so the bake reuses the session's one base image.
        argv += ["--cache", str(e2e_options.cache)]
    argv += ["--consul-mirror", mirror or str(e2e_options.consul_mirror)]
    if e2e_options.consul_key is not None:
        argv += [
            "--consul-key",
            str(e2e_options.consul_key.path),
            "--consul-key-fingerprint",
            e2e_options.consul_key.fingerprint,
        ]
    if e2e_options.consul_zip is not None and mirror is None:
        argv += ["--consul-zip", str(e2e_options.consul_zip)]
    return argv


def _spec_with(tmp_path: Path, **changes: object) -> Path:
    images = tmp_path / "images"
    shutil.copytree(REPO / "images", images)
    spec = images / "web.yaml"
    data = yaml.safe_load(spec.read_text())
    data.update(changes)
    spec.write_text(yaml.safe_dump(data))
    return spec


@pytest.fixture(scope="module")
def cached_base(session_base: BaseImage) -> Path:
    """The session's one Debian base (tests/conftest.py)."""
    return session_base.path


# --- a failed bake -------------------------------------------------------------------------


def test_failed_bake_names_stage_and_log_and_leaves_nothing(
    tmp_path: Path, e2e_options: BuildOptions
) -> None:
    spec = _spec_with(tmp_path, packages=["meshbake-no-such-package"])
    # Deep on purpose: Packer's plugin sockets must not end up in it (108-byte limit).
    out = tmp_path / ("deep-" * 15) / "out"
    options = BuildOptions(**{**e2e_options.__dict__, "out": out})
    with pytest.raises(UserError) as caught:
        build_image(spec, options)
    message = str(caught.value)
    assert "bake failed" in message
    assert str(out / "logs" / "packer.log") in message
    # The failure came from inside the VM (apt), so Packer itself ran properly.
    assert "meshbake-no-such-package" in (out / "logs" / "packer.log").read_text()
    assert _qemus_naming(out) == []
    _assert_no_output(out)


# --- download: a mirror that never answers ---------------------------------------------------


class _Stalling(http.server.BaseHTTPRequestHandler):
    """Reads the request, then never answers: a mirror that hangs mid-download."""

    def do_GET(self) -> None:
        self.server.stalled.wait()  # type: ignore[attr-defined]

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stalling_mirror() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Stalling)
    server.daemon_threads = True
    server.stalled = threading.Event()  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/consul"
    finally:
        server.stalled.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("sig", "ignore_sigint"),
    [
        (signal.SIGINT, False),
        # The Ctrl-C "hang": started with SIGINT ignored (a background job of a script),
        # Python keeps ignoring it and the build ran on with its VM. It must not.
        (signal.SIGINT, True),
        (signal.SIGTERM, False),
        (signal.SIGHUP, False),
    ],
    ids=["INT", "INT-inherited-ignored", "TERM", "HUP"],
)
def test_signal_during_download(
    tmp_path: Path,
    e2e_options: BuildOptions,
    stalling_mirror: str,
    sig: signal.Signals,
    ignore_sigint: bool,
) -> None:
    out = tmp_path / "out"
    # A fresh cache, so the mirror is asked (and no --consul-zip either).
    argv = _build_argv(e2e_options, out, "--cache", str(tmp_path / "cache"), mirror=stalling_mirror)
    run = Meshbake(
        argv, short_tmp(tmp_path), env={"MESHBAKE_CONSUL_ZIP": ""}, ignore_sigint=ignore_sigint
    )
    run.wait_for(f"from {stalling_mirror}")
    run.interrupt(sig, out, tmp_path / "cache")
    _assert_no_output(out)
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.zip")) == []


# --- base: mmdebstrap running ---------------------------------------------------------------


def _loops_backed_under(folder: Path) -> list[str]:
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        path = backing.read_text().strip()
        if path.startswith(str(folder)):
            found.append(f"{backing.parent.parent.name}: {path}")
    return found


def _mounts_under(folder: Path) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line for line in lines if str(folder) in line.split()[4]]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_signal_during_base(tmp_path: Path, sig: signal.Signals) -> None:
    cache = tmp_path / "cache"
    run = Meshbake(["base", "--cache", str(cache)], short_tmp(tmp_path))
    run.wait_for("base: mmdebstrap")
    run.interrupt(sig, cache)
    assert _mounts_under(cache) == []
    assert _loops_backed_under(cache) == []
    assert sorted(p.name for p in (cache / "base").iterdir() if not p.name.endswith(".lock")) == []


# --- bake: real Packer and qemu (boot, provision) -----------------------------------------


# Both signals go through one handler (proc.handle_signals), and each is proved at the
# other stages (download, base, shutdown, compress, verify); here, where each case costs
# a VM boot, one signal per stage.
@pytest.mark.parametrize(
    ("stage", "sig"),
    [("boot", signal.SIGINT), ("provision", signal.SIGTERM)],
    ids=["boot-INT", "provision-TERM"],
)
def test_signal_during_bake(
    tmp_path: Path, e2e_options: BuildOptions, stage: str, sig: signal.Signals
) -> None:
    out = tmp_path / "out"
    run = Meshbake(_build_argv(e2e_options, out), short_tmp(tmp_path))
    if stage == "boot":
        run.wait_for("booting the build VM")
        run.wait_until(lambda: _qemus_naming(out), "qemu starting")
    else:
        run.wait_for("provision: connected")
    run.interrupt(sig, out)
    _assert_no_output(out)


def test_sigkill_during_bake_leaves_no_packer_and_no_vm(
    tmp_path: Path, e2e_options: BuildOptions
) -> None:
    """meshbake cannot clean up after SIGKILL, but Packer and its VM must not run on."""
    out = tmp_path / "out"
    run = Meshbake(_build_argv(e2e_options, out), short_tmp(tmp_path))
    run.wait_for("booting the build VM")
    run.wait_until(lambda: _qemus_naming(out), "qemu starting")
    killed = time.monotonic()
    run.child.kill()
    run.child.wait()
    assert _wait_gone(killed, out) == []


# --- bake: shutdown and compress, against a Packer double -----------------------------------

# A TEST DOUBLE of ``packer`` (Packer 1.6's CLI). The ui messages are the qemu builder's
# own: hashicorp/packer builder/qemu/step_run.go ("Starting VM, booting from disk
# image"), step_shutdown.go ("Gracefully halting virtual machine..."),
# and step_convert_disk.go ("Converting hard drive..."); the line
# format is Packer's -machine-readable one (timestamp,target,type,data...). At
# $FAKE_PACKER_STOP it starts a stand-in "qemu" in a session of its own (so it has left
# Packer's process group, like a qemu whose plugin died), naming the output disk in its
# argv, and waits.
_FAKE_PACKER = r"""#!/bin/sh
verb=$1
case $verb in
  version) echo "Packer v1.6.6"; exit 0 ;;
  init|fmt|validate) exit 0 ;;
  build) ;;
  *) echo "fake packer: unknown verb $verb" >&2; exit 1 ;;
esac
out=
for arg in "$@"; do
  case $arg in -var=output_directory=*) out=${arg#-var=output_directory=} ;; esac
done
say() { echo "1700000000,,ui,say,==> qemu.web: $1"; }
say "Starting VM%!(PACKER_COMMA) booting from disk image"
say "Waiting for SSH to become available..."
say "Connected to SSH!"
if [ "$FAKE_PACKER_STOP" = compress ]; then say "Gracefully halting virtual machine..."; fi
mkdir -p "$out"
setsid python3 -c 'import time; time.sleep(600)' qemu-standin "$out/web.qcow2" \
  </dev/null >/dev/null 2>&1 &
case $FAKE_PACKER_STOP in
  shutdown) say "Gracefully halting virtual machine..." ;;
  compress) say "Converting hard drive..." ;;
esac
exec sleep 600
"""

_STAGE_LINES = {"shutdown": "shutdown: hygiene done", "compress": "compress: compressing"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
@pytest.mark.parametrize("stage", ["shutdown", "compress"])
def test_signal_during_late_bake_stage(
    tmp_path: Path, e2e_options: BuildOptions, cached_base: Path, stage: str, sig: signal.Signals
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    packer = bin_dir / "packer"
    packer.write_text(_FAKE_PACKER)
    packer.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_PACKER_STOP": stage}
    run = Meshbake(_build_argv(e2e_options, out), short_tmp(tmp_path), env=env)
    run.wait_for(_STAGE_LINES[stage])
    run.wait_until(
        lambda: [p for p in _processes_naming(out) if "standin" in p], "the stand-in qemu"
    )
    run.interrupt(sig, out)
    _assert_no_output(out)


# --- verify: both phases --------------------------------------------------------------------


def _image(tmp_path: Path, cached_base: Path) -> Path:
    """Any bootable qcow2 will do for an interrupt: the cached base, by a link (verify
    writes its logs beside the image, and they must not go into the cache)."""
    image = tmp_path / "image" / "web.qcow2"
    image.parent.mkdir()
    image.symlink_to(cached_base)
    return image


def _mesh_args(golden_image: Path, options: BuildOptions) -> list[str]:
    """verify's local mesh for a stand-in image: the web bake's own Consul and Envoy."""
    mesh = mesh_for(golden_image, options)
    return ["--consul-zip", str(mesh.consul_zip), "--envoy", str(mesh.envoy)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
@pytest.mark.parametrize("phase", ["baked", "firstboot"])
def test_signal_during_verify(
    tmp_path: Path,
    cached_base: Path,
    golden_image: Path,
    e2e_options: BuildOptions,
    phase: str,
    sig: signal.Signals,
) -> None:
    """Verify is interrupted once its VM started; in phase firstboot with its mesh (a
    server, two upstreams with their Envoys, a network namespace) up: all of it must go."""
    image = _image(tmp_path, cached_base)
    tmpdir = short_tmp(tmp_path)
    argv = ["verify", str(image), "--spec", str(SPEC), "--phase", phase]
    argv += _mesh_args(golden_image, e2e_options)
    run = Meshbake(argv, tmpdir)
    run.wait_for("verify: booting")
    # Its own namespace, by the name verify printed: the other layers of the suite may
    # run beside this one (tools/run-tests) and make namespaces of their own.
    named = {m for line in run.lines for m in VERIFY_NETNS.findall(line)}
    assert len(named) == (phase == "firstboot"), run.stderr()
    assert named <= set(namespaces())
    run.wait_until(lambda: _qemus_naming(tmpdir), "the verify VM starting")
    run.interrupt(sig, image.parent)
    assert not named & set(namespaces()), "verify's network namespace is left"


def test_timeout_sends_term_to_verify(
    tmp_path: Path, cached_base: Path, golden_image: Path, e2e_options: BuildOptions
) -> None:
    """``timeout -s TERM 30 meshbake verify IMAGE``, as a CI job step would run it."""
    image = _image(tmp_path, cached_base)
    tmpdir = short_tmp(tmp_path)
    argv = ["verify", str(image), "--spec", str(SPEC), *_mesh_args(golden_image, e2e_options)]
    run = Meshbake(argv, tmpdir, wrap=["timeout", "-s", "TERM", "30"])
    try:
        code = run.child.wait(timeout=30 + CLEANUP_SECONDS)
    except subprocess.TimeoutExpired:
        run.stop()
        pytest.fail(f"no exit within {CLEANUP_SECONDS}s of timeout's SIGTERM:\n{run.stderr()}")
    assert code == 124, run.stderr()  # timeout's own code: it had to send the signal
    assert "interrupted (SIGTERM)" in run.stderr()
    assert _wait_gone(time.monotonic(), tmpdir, image.parent) == []
    assert sorted(p.name for p in tmpdir.glob("meshbake-*")) == []
