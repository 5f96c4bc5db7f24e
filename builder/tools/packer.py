"""A thin wrapper around the installed Packer: one method per verb, typed results.

>>> Packer().version().supports_plugins        # Debian 12 ships 1.6.6
False
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder import proc
from builder.errors import UserError


@dataclass(frozen=True, order=True)
class PackerVersion:
    major: int
    minor: int
    patch: int

    @property
    def supports_plugins(self) -> bool:
        """Packer 1.7+ needs ``required_plugins`` (and ``packer init``); 1.6 rejects them."""
        return (self.major, self.minor) >= (1, 7)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class GateResult:
    """Outcome of a check-style verb (``validate``, ``fmt -check``)."""

    ok: bool
    output: str


@dataclass(frozen=True)
class MachineEvent:
    """One ``-machine-readable`` line: ``timestamp,target,type,data...``."""

    timestamp: int
    target: str
    type: str
    data: tuple[str, ...]


def parse_machine_line(line: str) -> MachineEvent | None:
    """Parse one machine-readable line; None for anything else.

    >>> parse_machine_line("1700000000,qemu.web,ui,say,hello%!(PACKER_COMMA) world").data
    ('say', 'hello, world')
    """
    parts = line.rstrip("\n").split(",")
    if len(parts) < 3 or not parts[0].isdigit():
        return None
    data = tuple(p.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n") for p in parts[3:])
    return MachineEvent(int(parts[0]), parts[1], parts[2], data)


@dataclass(frozen=True)
class PackerRun:
    """What one ``packer build`` ended with: its exit code, the artifacts of its manifest
    and the errors it printed (not the meshbake-level ``build.run.BuildResult``)."""

    returncode: int
    artifacts: Mapping[str, str] = field(default_factory=dict)
    errors: tuple[str, ...] = ()


#: Packer versions already read in this process, by the binary's full path.
_VERSIONS: dict[str, PackerVersion] = {}
_VERSIONS_LOCK = threading.Lock()


class Packer:
    """The Packer CLI. ``binary`` may name another packer for tests.

    ``validate`` and ``build`` run ``init`` on their folder first (Packer 1.7+), once
    per folder, so the template's ``required_plugins`` are installed before either.
    """

    def __init__(self, binary: str = "packer") -> None:
        self.binary = binary
        self._initialised: set[Path] = set()

    def version(self) -> PackerVersion:
        """The installed Packer's version, read once per process (per binary)."""
        path = proc.which(self.binary)
        with _VERSIONS_LOCK:  # parallel builds share one read
            if path not in _VERSIONS:
                _VERSIONS[path] = self._read_version(path)
            return _VERSIONS[path]

    @staticmethod
    def _read_version(path: str) -> PackerVersion:
        out = proc.run([path, "version"]).stdout
        match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
        if match is None:
            raise UserError(f"cannot read the Packer version from {out.strip()!r}")
        major, minor, patch = (int(g) for g in match.groups())
        return PackerVersion(major, minor, patch)

    def init(self, folder: Path) -> None:
        """Install required plugins (Packer 1.7+ only; 1.6 has them built in).

        Runs once per folder; ``validate`` and ``build`` call it themselves.
        """
        folder = folder.resolve()
        if folder in self._initialised:
            return
        if self.version().supports_plugins:
            proc.run([self.binary, "init", folder], cwd=folder)
        self._initialised.add(folder)

    def fmt(self, folder: Path, *, check: bool = False) -> GateResult:
        argv = [self.binary, "fmt"] + (["-check", "-diff"] if check else []) + [folder]
        done = proc.run(argv, check=False)
        return GateResult(done.returncode == 0, (done.stdout + done.stderr).strip())

    def validate(
        self,
        folder: Path,
        *,
        only: Sequence[str] = (),
        variables: Mapping[str, str] | None = None,
    ) -> GateResult:
        self.init(folder)
        argv: list[str | Path] = [self.binary, "validate"]
        if only:
            argv.append("-only=" + ",".join(only))
        argv += [f"-var={k}={v}" for k, v in (variables or {}).items()]
        done = proc.run([*argv, folder], check=False, cwd=folder)
        return GateResult(done.returncode == 0, (done.stdout + done.stderr).strip())

    def build(
        self,
        folder: Path,
        *,
        only: Sequence[str],
        variables: Mapping[str, str],
        env: Mapping[str, str],
        log_file: Path,
        on_event: Callable[[MachineEvent], None],
    ) -> PackerRun:
        """Run ``packer build -machine-readable``; every event goes to ``on_event``.

        Packer's full log (PACKER_LOG=1) goes to ``log_file``; artifact ids come from
        the ``artifact`` events (the manifest post-processor writes them too).
        """
        self.init(folder)
        argv: list[str | Path] = [self.binary, "build", "-machine-readable", "-color=false"]
        argv += ["-only=" + ",".join(only)]
        argv += [f"-var={k}={v}" for k, v in variables.items()]
        artifacts: dict[str, str] = {}
        errors: list[str] = []

        def handle(line: str) -> None:
            event = parse_machine_line(line)
            if event is None:
                return
            if event.type == "artifact" and len(event.data) >= 3 and event.data[1] == "id":
                artifacts[event.target] = event.data[2]
            if event.type == "error" and event.data:
                errors.append(event.data[0])
            on_event(event)

        full_env = {**env, "PACKER_LOG": "1", "PACKER_LOG_PATH": str(log_file)}
        code = proc.stream([*argv, folder], on_line=handle, env=full_env, cwd=folder)
        return PackerRun(code, artifacts, tuple(errors))
