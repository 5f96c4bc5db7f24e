"""Static gates run before any VM starts; every failure is reported together.

The gates check a rendered ``BakeFolder``: ``build`` hands them the very folder Packer
then builds from, and ``meshbake validate`` renders one into a temporary folder.

>>> report = validate_spec(Path("images/web.yaml"))
>>> report.ok, [g.name for g in report.gates][:2]
(True, ['spec', 'consul/envoy'])
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from builder import proc
from builder.errors import MeshbakeError, SpecError, SpecProblem
from builder.render import baked as bake
from builder.render import cloudconfig, paths
from builder.render.context import BakeFolder, render_context
from builder.render.hcl import enabled_sources
from builder.spec.model import LoadedSpec, load_spec
from builder.tools.packer import Packer


@dataclass(frozen=True)
class Gate:
    """One gate's outcome: ``ok`` None means it could not run."""

    name: str
    ok: bool | None
    detail: str

    def line(self) -> str:
        status = {True: "ok  ", False: "FAIL", None: "skip"}[self.ok]
        return f"{status}  {self.name}: {self.detail}"


@dataclass
class Report:
    spec: Path
    gates: list[Gate] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: What the spec implies that is worth a line but is no problem (``meshbake: note:``).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(g.ok for g in self.gates)

    def failures(self) -> list[str]:
        return [g.line() for g in self.gates if not g.ok]


def validate_spec(path: Path, packer: Packer | None = None) -> Report:
    """``meshbake validate``: load ``path`` once, render it once into a temporary
    folder and run every gate on that folder; never raises for a failed gate."""
    try:
        loaded = load_spec(path)
    except SpecError as exc:
        return Report(path, [Gate("spec", False, _problems(exc))])
    packer = packer or Packer()
    with tempfile.TemporaryDirectory(prefix="meshbake-validate-") as tmp:
        scratch = Path(tmp)
        try:
            folder = render_context(loaded, scratch / "context", packer=packer)
        except MeshbakeError as exc:
            report = _spec_report(loaded)
            detail = _problems(exc) if isinstance(exc, SpecError) else str(exc)
            report.gates.append(Gate("render", False, detail))
            return report
        return check_folder(loaded, folder, packer, scratch)


def _problems(exc: SpecError) -> str:
    """Each problem on its own indented line under the gate's name."""
    return "\n    " + "\n    ".join(map(str, exc.problems))


def check_folder(loaded: LoadedSpec, folder: BakeFolder, packer: Packer, scratch: Path) -> Report:
    """Run every gate on ``folder``, rendered from ``loaded``; never raises for a failed
    gate. ``scratch`` is an empty folder the gates may write into (keys, unit copies)."""
    report = _spec_report(loaded)
    report.gates.append(Gate("render", True, f"bake folder {folder.root}"))
    for gate in GATES:
        report.gates.append(_guarded(gate, folder, loaded, packer, scratch))
    return report


def _spec_report(loaded: LoadedSpec) -> Report:
    """The spec and pair gates, from what loading the spec found (nothing is re-checked)."""
    spec = loaded.spec
    report = Report(loaded.path, warnings=[str(w) for w in loaded.warnings])
    shown = str(loaded.path)
    report.notes = [str(SpecProblem(shown, *note)) for note in spec.notes()]
    report.gates.append(Gate("spec", True, f"{loaded.path} is a valid image spec"))
    pair = f"Consul {spec.consul.version} with Envoy {spec.envoy.version}"
    # The load refused an unsupported pair unless the spec allows it, and then warned.
    allowed = any(w.path == "envoy.allow_unsupported" for w in loaded.warnings)
    detail = f"{pair}: allowed by the spec" if allowed else f"{pair} is a supported pair"
    report.gates.append(Gate("consul/envoy", True, detail))
    return report


def _guarded(
    gate: Callable[[BakeFolder, LoadedSpec, Packer, Path], Gate],
    folder: BakeFolder,
    loaded: LoadedSpec,
    packer: Packer,
    work: Path,
) -> Gate:
    try:
        return gate(folder, loaded, packer, work)
    except MeshbakeError as exc:  # a missing tool, for one: say so and go on
        return Gate(GATE_NAMES[gate], False, str(exc))


def gate_packer_fmt(folder: BakeFolder, loaded: LoadedSpec, packer: Packer, work: Path) -> Gate:
    result = packer.fmt(folder.packer_dir, check=True)
    detail = "template is packer fmt-clean" if result.ok else result.output
    return Gate("packer fmt -check", result.ok, detail)


def gate_packer_validate(
    folder: BakeFolder, loaded: LoadedSpec, packer: Packer, work: Path
) -> Gate:
    key = work / "validate-key"
    proc.ssh_keygen(key, "validate")
    sources = enabled_sources(loaded.spec)
    variables = {"ssh_private_key_file": str(key), "base_image": str(work / "base.qcow2")}
    result = packer.validate(folder.packer_dir, variables=variables)
    version = packer.version()
    detail = f"Packer {version} accepts {', '.join(sources)}" if result.ok else result.output
    return Gate("packer validate", result.ok, detail)


def gate_cloud_init_schema(
    folder: BakeFolder, loaded: LoadedSpec, packer: Packer, work: Path
) -> Gate:
    example = work / "first-boot.example.yaml"
    example.write_text(cloudconfig.user_data_template(loaded.spec).replace("${", "x"))
    failures = []
    docs = [*folder.cloud_configs(), example]
    for doc in docs:
        done = proc.run(["cloud-init", "schema", "--config-file", doc], check=False)
        if done.returncode != 0:
            failures.append(f"{doc.name}: {(done.stdout + done.stderr).strip()}")
    detail = "; ".join(failures) or f"{len(docs)} documents are valid cloud-config"
    return Gate("cloud-init schema", not failures, detail)


def shipped_scripts() -> list[Path]:
    """Every shell script that ships in ``scripts/``: they start with a shebang, and the
    sourced library with a ``shellcheck shell=`` line."""
    found = []
    for entry in resources.files("builder.image").joinpath("scripts").iterdir():
        path = Path(str(entry))
        if path.is_file() and path.read_bytes().startswith((b"#!", b"# shellcheck shell=")):
            found.append(path)
    return sorted(found)


def gate_shellcheck(folder: BakeFolder, loaded: LoadedSpec, packer: Packer, work: Path) -> Gate:
    scripts = [*shipped_scripts(), *folder.scripts()]
    env_files = [
        folder.stage_dir / "bake.env",
        folder.stage_dir / "paths.env",
        folder.rootfs / paths.rel(paths.MESH_ENV),
        folder.rootfs / paths.rel(paths.PATHS_ENV),
    ]
    # The env files are sourced by scripts, so unused-variable warnings do not apply.
    problems = shellcheck(scripts) + shellcheck(env_files, "--shell=sh", "--exclude=SC2034")
    detail = "\n".join(problems) or f"{len(scripts)} scripts and {len(env_files)} env files clean"
    return Gate("shellcheck", not problems, detail)


def shellcheck(paths: list[Path], *options: str) -> list[str]:
    """Run shellcheck on ``paths``; return its findings (empty when clean)."""
    if not paths:
        return []
    # --external-sources: follow each script's `source=` directive into meshbake-lib.sh.
    done = proc.run(
        ["shellcheck", "--format=gcc", "--external-sources", *options, *paths], check=False
    )
    return [line for line in done.stdout.splitlines() if line.strip()]


_EXEC = re.compile(r"^(Exec[A-Za-z]+=)([-+@!:]*)(/\S+)(.*)$")


def gate_systemd_analyze(
    folder: BakeFolder, loaded: LoadedSpec, packer: Packer, work: Path
) -> Gate:
    units = folder.units()
    stderr = systemd_verify(units, folder.rootfs, work / "units")
    detail = stderr or f"{len(units)} units verified with no warning"
    return Gate("systemd-analyze verify", not stderr, detail)


def systemd_verify(units: list[Path], rootfs: Path, scratch: Path) -> str:
    """``systemd-analyze verify`` the units; return its stderr ('' means clean).

    It exits 0 on warnings, so any stderr counts as a failure. It also insists that
    every executable exists on *this* host, so commands that only exist inside the
    image (what the bake installs: consul, envoy, meshbake's own scripts, or what the
    spec's packages bring) are pointed at placeholders in a scratch copy; every other
    directive is verified exactly as rendered.
    """
    with _placeholders(rootfs, scratch) as rewrite:
        copies = []
        for unit in units:
            copy = scratch / unit.name
            copy.write_text("\n".join(rewrite(line) for line in unit.read_text().splitlines()))
            copies.append(copy)
        done = proc.run(["systemd-analyze", "verify", "--man=no", *copies], check=False)
    return "\n".join(s for s in (done.stderr.strip(), _failed(done.returncode)) if s)


def _failed(code: int) -> str:
    return "" if code == 0 else f"systemd-analyze exited {code}"


@contextmanager
def _placeholders(rootfs: Path, scratch: Path) -> Iterator[Callable[[str], str]]:
    bin_dir = scratch / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)

    def rewrite(line: str) -> str:
        match = _EXEC.match(line)
        if match is None:
            return line
        key, prefix, command, rest = match.groups()
        if Path(command).exists() and not (rootfs / command.lstrip("/")).exists():
            return line
        stand_in = bin_dir / command.strip("/").replace("/", "_")
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
        return f"{key}{prefix}{stand_in}{rest}"

    try:
        yield rewrite
    finally:
        shutil.rmtree(bin_dir, ignore_errors=True)


#: The gates after render, in order, with the names reports use for them.
def gate_units(folder: BakeFolder, loaded: LoadedSpec, packer: Packer, work: Path) -> Gate:
    """The rendered units are exactly the ones the spec implies: none overwritten by
    another of the same name, none missing, none extra."""
    expected = bake.expected_units(loaded.spec)
    rendered = sorted(p.name for p in folder.units())
    problems = []
    twice = sorted({u for u in expected if expected.count(u) > 1})
    if twice:
        problems.append(f"{', '.join(twice)} would be rendered twice (one overwrites the other)")
    missing = sorted(set(expected) - set(rendered))
    extra = sorted(set(rendered) - set(expected))
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if extra:
        problems.append(f"not implied by the spec: {', '.join(extra)}")
    detail = "; ".join(problems) or f"the {len(expected)} units the spec implies, no other"
    return Gate("units", not problems, detail)


GATE_NAMES: dict[Callable[[BakeFolder, LoadedSpec, Packer, Path], Gate], str] = {
    gate_packer_fmt: "packer fmt -check",
    gate_packer_validate: "packer validate",
    gate_cloud_init_schema: "cloud-init schema",
    gate_shellcheck: "shellcheck",
    gate_systemd_analyze: "systemd-analyze verify",
    gate_units: "units",
}
GATES = tuple(GATE_NAMES)
