"""The one place that runs external commands.

>>> run(["true"]).returncode
0
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from builder.errors import CommandError, Interrupted, ToolNotFound

log = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]

#: The Debian package that provides each tool meshbake calls, for the hint in
#: ``ToolNotFound``.
DEBIAN_PACKAGES: Mapping[str, str] = {
    "packer": "packer",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-aarch64": "qemu-system-arm",
    "mkfs.vfat": "dosfstools",
    "mmd": "mtools",
    "mcopy": "mtools",
    "qemu-img": "qemu-utils",
    "mmdebstrap": "mmdebstrap",
    "cloud-init": "cloud-init",
    "shellcheck": "shellcheck",
    "systemd-analyze": "systemd",
    "xorriso": "xorriso",
    "genisoimage": "genisoimage",
    "iptables": "iptables",
    "ip": "iproute2",
    "gpg": "gnupg",
    "gpgv": "gpgv",
    "gpgconf": "gpgconf",
    "sha256sum": "coreutils",
    "sfdisk": "fdisk",
    "losetup": "mount",
    "mkfs.ext4": "e2fsprogs",
    "grub-mkimage": "grub-pc-bin grub2-common",
    "ssh-keygen": "openssh-client",
    "unzip": "unzip",
    "mount": "mount",
    "umount": "mount",
    "unshare": "util-linux",
    "fstrim": "util-linux",
    "chroot": "coreutils",
    "systemctl": "systemd",
}


@dataclass(frozen=True)
class Completed:
    """The result of a finished command."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def which(tool: str) -> str:
    """Return the full path of ``tool`` or raise ``ToolNotFound`` with an install hint.

    >>> which("sh")
    '/usr/bin/sh'
    """
    found = shutil.which(tool)
    if found is None:
        package = DEBIAN_PACKAGES.get(tool, tool)
        raise ToolNotFound(f"{tool} not found: install it with 'apt-get install {package}'")
    return found


def run(
    argv: Sequence[StrPath],
    *,
    check: bool = True,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: StrPath | None = None,
    input: str | None = None,
    timeout: float | None = None,
) -> Completed:
    """Run ``argv`` (never through a shell) and return its ``Completed`` result.

    ``env`` is added to the current environment. With ``check`` a non-zero exit raises
    ``CommandError``; with ``capture=False`` output goes straight to our stdout/stderr.
    """
    args = [os.fspath(a) for a in argv]
    which(args[0])
    log.debug("+ %s", shlex.join(args))
    full_env = None if env is None else {**os.environ, **env}
    pipe = subprocess.PIPE if capture else None
    child = subprocess.Popen(
        args,
        stdout=pipe,
        stderr=pipe,
        # Never our stdin: a tool that prompts (ssh-keygen, say) must not hang CI.
        stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=None if cwd is None else Path(cwd),
    )
    with _tracked(child):
        try:
            stdout, stderr = child.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            child.kill()
            child.communicate()
            raise CommandError(args, -1, _text(exc.stdout), f"timed out after {timeout}s") from exc
        except BaseException:  # interrupted: the command must not outlive the call
            child.kill()
            child.wait()
            raise
    result = Completed(tuple(args), child.returncode, stdout or "", stderr or "")
    if check and child.returncode != 0:
        raise CommandError(args, child.returncode, result.stdout, result.stderr)
    return result


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def stream(
    argv: Sequence[StrPath],
    *,
    on_line: Callable[[str], None],
    env: Mapping[str, str] | None = None,
    cwd: StrPath | None = None,
) -> int:
    """Run ``argv`` and hand each stdout line to ``on_line``; return the exit code.

    The child runs under the guard (``builder/guard.py``) in a process group of its own. If
    we are interrupted or ``on_line`` raises, the whole group is ended
    (``terminate_group``), so no helper process (qemu under Packer, say) outlives us;
    if we die outright (SIGKILL), the guard ends it.
    """
    args = [os.fspath(a) for a in argv]
    which(args[0])
    log.debug("+ %s", shlex.join(args))
    child = _start_guarded(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=None if env is None else {**os.environ, **env},
        cwd=cwd,
    )
    try:
        assert child.stdout is not None
        for line in child.stdout:
            on_line(line)
        return child.wait()
    except BaseException:
        terminate_group(child)
        raise
    finally:
        _forget(child)


def terminate_group(child: subprocess.Popen[str], grace: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after ``grace``.

    Safe to call while an interrupt unwinds: if one arrives during the wait, the
    group is killed before it propagates. The guard that leads the group ends every
    member before it exits, so a reaped child leaves no group behind to signal.
    """
    if child.poll() is not None:
        return
    try:
        _killpg(child, signal.SIGTERM)
        child.wait(timeout=grace)
    except BaseException as exc:  # the grace ran out, or we were interrupted meanwhile
        _killpg(child, signal.SIGKILL)
        child.wait()
        if not isinstance(exc, subprocess.TimeoutExpired):
            raise
    finally:
        _forget(child)


def _killpg(child: subprocess.Popen[str], sig: int) -> None:
    # Only while the leader is unreaped: its pid (the group id) cannot be reused then.
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)


def spawn(argv: Sequence[StrPath], *, log_file: Path) -> subprocess.Popen[str]:
    """Start a long-running ``argv`` under the guard, output into ``log_file``.

    The caller owns it and must end it with ``terminate_group`` (in a ``finally``).
    """
    args = [os.fspath(a) for a in argv]
    which(args[0])
    log.debug("+ %s &", shlex.join(args))
    # Never through a link planted where the log goes (a tampered build folder).
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(os.open(log_file, flags, 0o644), "w") as out:  # noqa: PTH123 - an fd
        return _start_guarded(args, stdout=out, stderr=subprocess.STDOUT)


# --- the guard -------------------------------------------------------------------------

#: Seconds the guard gives its group between SIGTERM and SIGKILL.
GUARD_GRACE = 8.0

#: The leader of each long-running child's process group: see ``builder/guard.py``.
_GUARD = Path(__file__).with_name("guard.py")


def _start_guarded(
    args: Sequence[str],
    *,
    stdout: int | object,
    stderr: int,
    env: Mapping[str, str] | None = None,
    cwd: StrPath | None = None,
) -> subprocess.Popen[str]:
    """Start ``args`` under the guard, in a new session (so a new process group)."""
    if _state.signum is not None:
        # Interrupted while another thread was about to start a bake or a VM.
        raise Interrupted(_state.signum)
    guard = [sys.executable, "-I", os.fspath(_GUARD), str(os.getpid()), str(GUARD_GRACE), *args]
    child = subprocess.Popen(
        guard,
        stdin=subprocess.DEVNULL,
        stdout=stdout,  # type: ignore[arg-type]
        stderr=stderr,
        text=True,
        env=None if env is None else dict(env),
        cwd=None if cwd is None else Path(cwd),
        start_new_session=True,
    )
    _remember(child, group=True)
    return child


# --- signals ----------------------------------------------------------------------------


class _State:
    """Children alive now, and how far an interrupt has got (shared by all threads)."""

    def __init__(self) -> None:
        # Reentrant: the signal handler takes it in the main thread, maybe mid-update.
        self.lock = threading.RLock()
        self.children: dict[subprocess.Popen[str], bool] = {}  # child -> leads a group
        self.signum: int | None = None  # the signal being handled, once one arrived
        self.shield = 0  # > 0 while cleanup runs that an interrupt must not cut short
        self.pending: int | None = None  # a signal that arrived under the shield


_state = _State()

#: What ``handle_signals`` turns into ``Interrupted``: Ctrl-C, a CI cancel or
#: ``timeout`` (SIGTERM), a closed terminal (SIGHUP).
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _remember(child: subprocess.Popen[str], *, group: bool = False) -> None:
    with _state.lock:
        _state.children[child] = group


def _forget(child: subprocess.Popen[str]) -> None:
    with _state.lock:
        _state.children.pop(child, None)


@contextlib.contextmanager
def _tracked(child: subprocess.Popen[str]) -> Iterator[None]:
    _remember(child)
    try:
        yield
    finally:
        _forget(child)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _state.signum is not None or _state.pending is not None:
        return  # already stopping: the cleanup under way is bounded, let it finish
    if _state.shield:
        _state.pending = signum
        return
    _state.signum = signum
    # Other threads (build -j) block in their children: end those children so the
    # threads unwind too. This thread's own child is ended as the interrupt unwinds.
    with _state.lock:
        children = list(_state.children.items())
    for child, group in children:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(child.pid, signal.SIGTERM)
                else:
                    child.send_signal(signal.SIGTERM)
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into ``Interrupted`` (main thread only).

    SIGINT is handled even when our parent ignored it: a shell script's background
    job inherits SIGINT ignored, and a build that ignores an explicit interrupt runs on
    with its VM (the Ctrl-C "hang"). SIGHUP stays ignored under ``nohup``. A second
    signal while the first one's cleanup runs is ignored: that cleanup is bounded
    (``terminate_group``). The previous handlers come back on the way out.
    """
    previous = {}
    for sig in HANDLED_SIGNALS:
        current = signal.getsignal(sig)
        if sig == signal.SIGHUP and current == signal.SIG_IGN:
            continue
        previous[sig] = current
        signal.signal(sig, _on_signal)
    _state.signum = _state.pending = None
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Hold back an interrupt while cleanup runs; raise it once the cleanup is done.

    For the removal of work folders and the like: an interrupt that cut such a
    cleanup short would leave the very folder it is meant to remove.
    """
    with _state.lock:
        _state.shield += 1
    try:
        yield
    finally:
        with _state.lock:
            _state.shield -= 1
            pending = _state.pending if _state.shield == 0 else None
            if pending is not None:
                _state.pending = None
                _state.signum = pending
        if pending is not None:
            raise Interrupted(pending)


def ssh_keygen(key: Path, comment: str) -> Path:
    """Make an ephemeral ed25519 key pair at ``key`` (no passphrase); return the public key.

    >>> ssh_keygen(Path("/tmp/k"), "meshbake-build")  # doctest: +SKIP
    PosixPath('/tmp/k.pub')
    """
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", key])
    return key.with_name(key.name + ".pub")


def processes_naming(*needles: str) -> list[int]:
    """PIDs of live processes (not this one) whose command line contains one of
    ``needles``, e.g. a work folder that only processes we started name.

    >>> os.getpid() in processes_naming(str(os.getpid()))
    False
    """
    wanted = [n.encode() for n in needles]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if any(n in cmdline for n in wanted):
            found.append(int(entry.name))
    return found
