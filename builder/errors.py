"""The error tree.

``MeshbakeError`` is the root. ``UserError`` and its children are things a user can
fix (a bad spec, a missing tool, a failed check); the CLI prints them as one clear line
and exits 1. Anything else is a bug: the CLI prints the traceback and exits 3.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass


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


class CommandError(MeshbakeError):
    """An external command exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [f"command: {shlex.join(self.argv)}", f"return code: {self.returncode}"]
        for name, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            text = text.strip()
            if text:
                lines.append(f"{name}:")
                lines.extend(f"    {line}" for line in text.splitlines())
            else:
                lines.append(f"{name}: (none)")
        return "\n".join(lines)


class CheckFailed(UserError):
    """A validation gate or an image check failed."""
