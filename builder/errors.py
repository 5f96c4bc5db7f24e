"""The error tree.

``MeshbakeError`` is the root. ``UserError`` and its children are things a user can
fix (a bad spec, a missing tool, a failed check); the CLI prints them as one clear line
and exits 1. Anything else is a bug: the CLI prints the traceback and exits 3.
"""

from __future__ import annotations

import os
import shlex
import signal
import stat
import urllib.error
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class MeshbakeError(Exception):
    """Root of every error meshbake raises on purpose."""


class UserError(MeshbakeError):
    """Something the user can fix: the message says what."""


@dataclass(frozen=True)
class SpecProblem:
    """One problem in a spec file, located by its field path.

    >>> str(SpecProblem("images/web.yaml", "consul.version", "must be at least 1.11.1"))
    'images/web.yaml: consul.version: must be at least 1.11.1'
    """

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        # A key or path from the file may hold a line break; keep one problem one line.
        text = f"{self.file}: {where}{self.message}"
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class SpecError(UserError):
    """A spec has one or more problems; all of them are reported at once."""

    def __init__(self, problems: Sequence[SpecProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ToolNotFound(UserError):
    """An external tool is not installed."""


def tool_name(argv: Sequence[str]) -> str:
    """The tool an argv runs, past wrappers such as ``unshare ... --`` and ``chroot``.

    >>> tool_name(["unshare", "--mount", "--", "mmdebstrap", "bookworm"])
    'mmdebstrap'
    >>> tool_name(["/usr/bin/qemu-img", "convert"])
    'qemu-img'
    """
    name = Path(argv[0]).name if argv else "?"
    if name == "unshare" and "--" in argv[:-1]:
        return tool_name(argv[list(argv).index("--") + 1 :])
    if name == "chroot" and len(argv) > 2:
        return tool_name(argv[2:])
    return name


class CommandError(UserError):
    """An external command exited non-zero.

    A user can act on it (a mirror that is down, a full disk), so it is a ``UserError``:
    the CLI prints one line naming the tool, the stage and the log with the full output
    (``details()``), and exits 1. ``stage`` and ``log`` are filled in by whoever knows
    them (``BuildRun.stage``, ``build_base``).
    """

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.stage: str | None = None
        self.log: Path | None = None
        super().__init__(self.details())

    @property
    def tool(self) -> str:
        return tool_name(self.argv)

    def details(self) -> str:
        """The full record: argv, return code, stdout and stderr (pre-commit's layout)."""
        lines = [f"command: {shlex.join(self.argv)}", f"return code: {self.returncode}"]
        for name, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            text = text.strip()
            if text:
                lines.append(f"{name}:")
                lines.extend(f"    {line}" for line in text.splitlines())
            else:
                lines.append(f"{name}: (none)")
        return "\n".join(lines)

    def write_log(self, path: Path) -> None:
        """Keep ``details()`` in ``path`` (best effort) and point the message at it."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.parent.is_symlink():
                return
            fd = os.open(path, flags | os.O_CLOEXEC, 0o644)  # never through a planted link
            with open(fd, "w") as out:  # noqa: PTH123 - an fd
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return
                out.write(self.details() + "\n")
        except OSError:
            return
        self.log = path

    def __str__(self) -> str:
        last = next(
            (
                line.strip()
                for line in reversed((self.stderr or self.stdout).splitlines())
                if line.strip()
            ),
            "",
        )
        code = "timed out" if self.returncode == -1 else f"exit {self.returncode}"
        text = f"{self.tool} failed ({code})"
        if self.stage:
            text += f" in stage {self.stage}"
        if last:
            text += f": {last[:300]}"
        if self.log is not None:
            text += f"; see {self.log}"
        return "".join(c if c.isprintable() else " " for c in text)


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived: unwind, clean up, exit ``128 + signum``.

    A ``KeyboardInterrupt``, so every ``finally`` and ``except BaseException`` that
    cleans up after Ctrl-C does the same for a CI cancel or a closed terminal.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def reason(exc: BaseException) -> str:
    """Why an I/O or network operation failed, in a few words for a one-line error.

    >>> reason(FileNotFoundError(2, "No such file or directory"))
    'No such file or directory'
    """
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__
