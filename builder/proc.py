"""The one place that runs external commands.

>>> run(["true"]).returncode
0
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.errors import CommandError, ToolNotFound

log = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]

#: The Debian package that provides each tool meshbake calls, for the hint in
#: ``ToolNotFound``.
DEBIAN_PACKAGES: Mapping[str, str] = {
    "packer": "packer",
    "qemu-system-x86_64": "qemu-system-x86",
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
    try:
        proc = subprocess.run(
            args,
            stdout=pipe,
            stderr=pipe,
            input=input,
            # Never our stdin: a tool that prompts (ssh-keygen, say) must not hang CI.
            stdin=subprocess.DEVNULL if input is None else None,
            text=True,
            env=full_env,
            cwd=None if cwd is None else Path(cwd),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandError(args, -1, _text(exc.stdout), f"timed out after {timeout}s") from exc
    result = Completed(tuple(args), proc.returncode, proc.stdout or "", proc.stderr or "")
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, result.stdout, result.stderr)
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

    The child gets its own process group. If we are interrupted (Ctrl-C) or
    ``on_line`` raises, the whole group gets SIGTERM, then SIGKILL after 30 s, so no
    helper process (qemu under Packer, say) outlives us.
    """
    args = [os.fspath(a) for a in argv]
    which(args[0])
    log.debug("+ %s", shlex.join(args))
    full_env = None if env is None else {**os.environ, **env}
    child = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=full_env,
        cwd=None if cwd is None else Path(cwd),
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        for line in child.stdout:
            on_line(line)
        return child.wait()
    except BaseException:
        terminate_group(child)
        raise


def terminate_group(child: subprocess.Popen[str], grace: float = 30.0) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after ``grace``."""
    if child.poll() is not None:
        return
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    except ProcessLookupError:
        pass


def spawn(argv: Sequence[StrPath], *, log_file: Path) -> subprocess.Popen[str]:
    """Start a long-running ``argv`` in its own process group, output into ``log_file``.

    The caller owns it and must end it with ``terminate_group`` (in a ``finally``).
    """
    args = [os.fspath(a) for a in argv]
    which(args[0])
    log.debug("+ %s &", shlex.join(args))
    with log_file.open("w") as out:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
