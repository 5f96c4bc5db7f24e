"""``meshbake build``: spec -> golden image, with a content key that makes re-runs no-ops.

The stages are render, validate, download, base, bake. Everything a build writes
lives in a private work folder inside the output folder until the very end. The
finished image is renamed into place only after Packer succeeded, and the work folder
(the ephemeral SSH key, a partial disk) is removed whatever happens, and so is Packer's
own short TMPDIR (its plugin sockets and the seed ISO).

>>> result = build_image(Path("images/web.yaml"), BuildOptions())  # doctest: +SKIP
>>> result.status
'built'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict as asdataclass
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from builder import __version__, proc
from builder.bake import artifacts, base, gates
from builder.bake.arch import target_arches
from builder.digest import sha256_file
from builder.errors import CommandError, MeshbakeError, UserError, reason
from builder.progress import Progress, to_stderr
from builder.render.context import BakeFolder, render_context, write_seed
from builder.render.hcl import (
    aws_source_name,
    aws_sources,
    manifest_name,
    qcow2_name,
    qemu_sources,
)
from builder.spec import boundary
from builder.spec.model import Accelerator, Arch, LoadedSpec, load_spec
from builder.tools.packer import MachineEvent, Packer
from builder.tools.qemu import check_tools, choose_accelerator, cpu_model, host_arch


@dataclass(frozen=True)
class BuildOptions:
    """What the user chose on the command line (the spec says the rest)."""

    target: str = "qemu"
    out: Path | None = None
    cache: Path | None = None
    consul_mirror: str | None = None
    consul_key: artifacts.TrustedKey | None = None
    consul_zip: Path | None = None
    accelerator: Accelerator | None = None
    force: bool = False
    dry_run: bool = False
    #: Build only this architecture (Debian's name) of the target's; None: all of them.
    arch: str | None = None


@dataclass
class BuildRun:
    """Run state of one build (apart from the frozen spec): folders and timings."""

    loaded: LoadedSpec
    options: BuildOptions
    out_dir: Path
    cache: Path
    progress: Progress
    timings: dict[str, float] = field(default_factory=dict)

    def arches(self) -> tuple[Arch, ...]:
        """The architectures this run builds: the target's, or the one ``--arch`` picks."""
        spec = self.loaded.spec
        listed = tuple(Arch(a) for a in target_arches(spec, self.options.target))
        field = "targets.qemu.arch" if self.options.target == "qemu" else "targets.aws.arch"
        if self.options.arch is not None:
            if self.options.arch not in listed:
                raise UserError(
                    f"{self.loaded.path}: {field}: lists {', '.join(listed)}, not"
                    f" {self.options.arch} (--arch)"
                )
            listed = (Arch(self.options.arch),)
        if self.options.consul_zip is not None and len(listed) > 1:
            raise UserError(
                f"--consul-zip is one Consul binary, but {field} lists {', '.join(listed)}:"
                " give --arch, or leave --consul-zip out"
            )
        return listed

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.progress(f"{self.loaded.spec.name}: {name}: {what}")
        start = time.monotonic()
        try:
            yield
        except CommandError as exc:
            # A tool failed in this stage: say which stage, and keep its full output.
            if exc.stage is None:
                exc.stage = name
                exc.write_log(self.out_dir / "logs" / f"{name}-{exc.tool}.log")
            raise
        finally:
            self.timings[name] = round(time.monotonic() - start, 1)


@dataclass(frozen=True)
class BuildResult:
    image: str
    spec: Path
    status: str  # built | up-to-date | planned | failed
    output: Path | None = None
    manifest: Path | None = None
    error: str | None = None
    log: Path | None = None
    seconds: float = 0.0
    #: ``build --target aws --dry-run``: the plan, for the caller to show.
    plan: str | None = None
    #: qemu: every architecture's qcow2, ``output`` first (one per ``targets.qemu.arch``).
    outputs: tuple[Path, ...] = ()

    def to_json(self) -> dict[str, object]:
        found: dict[str, object] = {}
        for key, value in asdataclass(self).items():
            if isinstance(value, tuple):
                found[key] = [str(v) for v in value]
            else:
                found[key] = str(value) if isinstance(value, Path) else value
        return found


class BuildFailed(UserError):
    """A build stage failed; the message names the stage and the log."""


class Target(Protocol):
    """A build target: ``qemu`` (local qcow2) or ``aws`` (AMIs)."""

    name: str

    def build(self, run: BuildRun) -> BuildResult: ...


# --- shared steps ----------------------------------------------------------------------


def _fetch_artifacts(
    run: BuildRun, arch: Arch, *, for_host: bool = False
) -> list[artifacts.Artifact]:
    """Consul and Envoy for ``arch``, verified (see ``builder.bake.artifacts``).

    ``for_host``: the same versions for verify's local mesh on this machine, which runs
    them itself (never the given ``--consul-zip``, which is the image's)."""
    spec = run.loaded.spec
    options = run.options
    what = f"Consul {spec.consul.version} and Envoy {spec.envoy.version} ({arch.value})"
    if for_host:
        what += " for verify's local mesh on this host"
    with run.stage("download-host" if for_host else "download", what):
        consul = artifacts.fetch_consul(
            spec.consul.version,
            run.cache,
            mirror=options.consul_mirror or spec.consul.source.mirror,
            key=options.consul_key,
            zip_override=None if for_host else options.consul_zip,
            arch=arch.value,
            progress=run.progress,
        )
        envoy = artifacts.fetch_envoy(
            spec.envoy.version,
            run.cache,
            source=spec.envoy.source,
            arch=arch.value,
            progress=run.progress,
        )
    return [consul, envoy]


def tree_digest(*roots: Path) -> str:
    """A hash of every file (path, mode, bytes) under ``roots``."""
    h = hashlib.sha256()
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            h.update(
                f"{path.relative_to(root.parent)}\0{path.stat().st_mode & 0o7777:o}\0".encode()
            )
            h.update(path.read_bytes())
    return h.hexdigest()


def content_key(
    run: BuildRun,
    ctx: BakeFolder,
    arts: Sequence[artifacts.Artifact],
    base_id: str,
    arch: Arch = Arch.AMD64,
) -> str:
    """Changes when anything that ends up in the image changes: the rendered context
    (template, configs, units, scripts), the artifacts, the base and meshbake itself
    (and the architecture, for all but amd64, whose keys stay what they were)."""
    parts: dict[str, object] = {
        "target": run.options.target,
        "context": tree_digest(ctx.packer_dir, ctx.stage_dir),
        "artifacts": sorted(a.sha256 for a in arts),
        "base": base_id,
        "meshbake": __version__,
    }
    if arch is not Arch.AMD64:
        parts["arch"] = arch.value
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    boundary.write_output(tmp, json.dumps(data, indent=2, sort_keys=True) + "\n")
    try:
        tmp.replace(path)
    except OSError as exc:  # a folder where the manifest goes, say
        raise UserError(f"{path}: cannot write the manifest: {reason(exc)}") from None


def _up_to_date(manifest: Path, key: str) -> dict[str, object] | None:
    """The previous manifest when it describes this exact build and its output is intact."""
    try:
        previous = boundary.read_json_object(manifest, "build manifest")
    except UserError:  # none, or not ours to trust: build again (and write it anew)
        return None
    if previous.get("content_key") != key:
        return None
    output = previous.get("output")
    if not isinstance(output, dict) or not isinstance(output.get("path"), str):
        return None
    path = manifest.parent / output["path"]
    if not path.is_file() or sha256_file(path) != output.get("sha256"):
        return None
    return dict(previous)


def _validate(run: BuildRun, packer: Packer, folder: BakeFolder, work: Path) -> None:
    """Gate ``folder``, the very folder Packer builds from next."""
    scratch = work / "gates"
    scratch.mkdir()
    with run.stage("validate", "static gates (packer, cloud-init, shellcheck, systemd)"):
        report = gates.check_folder(run.loaded, folder, packer, scratch)
    if not report.ok:
        raise BuildFailed(f"validate: {'; '.join(report.failures())}")


# --- qemu -------------------------------------------------------------------------------


#: Packer ``ui`` messages that start a stage the user should see.
_MILESTONES = (
    ("Starting VM", "boot", "booting the build VM"),
    ("Waiting for SSH", "boot", "waiting for SSH (about a minute under TCG)"),
    ("Connected to SSH", "provision", "connected; running the bake"),
    ("Gracefully halting", "shutdown", "hygiene done; shutting the VM down"),
    ("Converting hard drive", "compress", "compressing the qcow2"),
    ("Running post-processor", "compress", "writing Packer's manifest"),
)


class QemuBuild:
    """The ``qemu`` target: a local qcow2 baked on the Debian base."""

    name = "qemu"

    def build(self, run: BuildRun) -> BuildResult:
        """One qcow2 per architecture, one after the other (a machine this size runs one
        build VM at a time), each with its own manifest; one result for them all."""
        spec = run.loaded.spec
        if spec.targets.qemu is None:
            raise UserError(
                f"{run.loaded.path}: targets.qemu is not set; the spec has no qemu target"
            )
        started = time.monotonic()
        arches = run.arches()
        for arch in arches:  # before anything is fetched or built: one line, not a traceback
            check_tools(arch)
        results = [self._build_arch(run, arch, started) for arch in arches]
        first = results[0]
        built = any(r.status == "built" for r in results)
        return BuildResult(
            first.image,
            first.spec,
            "built" if built else first.status,
            first.output,
            first.manifest,
            log=first.log,
            seconds=round(time.monotonic() - started, 1),
            outputs=tuple(r.output for r in results if r.output is not None),
        )

    def _build_arch(self, run: BuildRun, arch: Arch, started: float) -> BuildResult:
        spec = run.loaded.spec
        qemu = spec.targets.qemu
        assert qemu is not None
        packer = Packer()
        arts = _fetch_artifacts(run, arch)
        mesh_arts = self._mesh_artifacts(run, arch)
        base_id, base_ref = self._base_ref(run, arch)
        boundary.own_folder(run.out_dir, "build folder")
        manifest_path = run.out_dir / manifest_name(arch)
        work = Path(tempfile.mkdtemp(prefix=".work-", dir=run.out_dir))
        try:
            with run.stage("render", "bake context"):
                ctx = render_context(run.loaded, work / "context", packer=packer)
            key = content_key(run, ctx, arts, base_id, arch)
            if not run.options.force and _up_to_date(manifest_path, key) is not None:
                run.progress(
                    f"{spec.name}: {arch.value}: up to date (content key {key[:12]}); nothing to do"
                )
                return BuildResult(
                    spec.name,
                    run.loaded.path,
                    "up-to-date",
                    run.out_dir / qcow2_name(spec, arch),
                    manifest_path,
                )
            # The seed gets the build key before the gates, so they check what boots.
            key_file = self._build_key(run, ctx, work)
            _validate(run, packer, ctx, work)
            base_path, base_sha = self._base(run, base_ref, arch)
            accel = choose_accelerator(run.options.accelerator or qemu.accelerator, arch)
            log_dir = run.out_dir / "logs"
            log_dir.mkdir(exist_ok=True)
            log = log_dir / f"packer{_log_suffix(arch)}.log"
            artifacts.stage(arts, ctx.stage_dir / "artifacts")
            output = self._packer_build(
                run, packer, ctx, work, log, key_file, base_path, accel, arch
            )
            final = run.out_dir / qcow2_name(spec, arch)
            digest = sha256_file(output)
            manifest = {
                "image": spec.name,
                "target": "qemu",
                "spec": str(run.loaded.path),
                "spec_hash": run.loaded.digest,
                "content_key": key,
                "artifacts": [
                    {"name": a.name, "version": a.version, "sha256": a.sha256, "source": a.source}
                    for a in arts
                ],
                "versions": {
                    "consul": spec.consul.version,
                    "envoy": spec.envoy.version,
                    "packer": str(packer.version()),
                    "meshbake": __version__,
                },
                "base": {"id": base_id, "path": str(base_path), "sha256": base_sha},
                "arch": arch.value,
                "machine": self._machine_record(arch),
                # Ancestry: what this build was baked on (release channels show it).
                "parent": {"kind": "base-image", "id": f"sha256:{base_sha}"},
                "accelerator": accel.value,
                "stages": dict(run.timings),
                "output": {"path": final.name, "sha256": digest, "size": output.stat().st_size},
                "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            if mesh_arts:
                # verify's local mesh runs these on the host: an image of another
                # architecture has its own Consul and Envoy, which this host cannot run.
                manifest["mesh_artifacts"] = {
                    "arch": mesh_arts[0].value,
                    "artifacts": [
                        {"name": a.name, "version": a.version, "sha256": a.sha256}
                        for a in mesh_arts[1]
                    ],
                }
            # The image goes into place first, then the manifest that vouches for it.
            manifest_path.unlink(missing_ok=True)
            output.replace(final)
            _write_json(manifest_path, manifest)
        finally:
            with proc.shielded():  # an interrupt now must not leave the key or the disk
                kill_strays(work)
                shutil.rmtree(work, ignore_errors=True)
        return BuildResult(
            spec.name,
            run.loaded.path,
            "built",
            final,
            manifest_path,
            log=log,
            seconds=round(time.monotonic() - started, 1),
        )

    def _mesh_artifacts(
        self, run: BuildRun, arch: Arch
    ) -> tuple[Arch, list[artifacts.Artifact]] | None:
        """The host's own Consul and Envoy of the image's versions, when the image is of
        another architecture (verify's mesh server and upstreams run on the host)."""
        host = host_arch()
        if host is None or host is arch:
            return None
        try:
            return host, _fetch_artifacts(run, host, for_host=True)
        except UserError as exc:
            # Not the image's own: the bake goes on, and verify asks for them instead.
            run.progress(
                f"{run.loaded.spec.name}: warning: no {host.value} Consul and Envoy for"
                f" verify's local mesh ({exc}); verify will need --consul-zip and --envoy"
            )
            return None

    @staticmethod
    def _machine_record(arch: Arch) -> dict[str, str]:
        """How the image boots, for whoever boots it next (verify reads ``arch``)."""
        facts = check_tools(arch)
        return {
            "qemu": facts.binary,
            "machine": facts.machine or "pc",
            "firmware": "uefi" if facts.firmware is not None else "bios",
            "console": facts.console,
        }

    def _base_ref(self, run: BuildRun, arch: Arch) -> tuple[str, Path | None]:
        """The base's identity without building it (so a no-op stays cheap)."""
        qemu = run.loaded.spec.targets.qemu
        assert qemu is not None
        ref = qemu.base_image
        if ref is None:
            return f"meshbake-base:{base.base_key(arch=arch)}", None
        if len(qemu.arch) > 1:
            raise UserError(
                f"{run.loaded.path}: targets.qemu.base_image: one base image cannot boot"
                f" {', '.join(a.value for a in qemu.arch)}; leave it out (meshbake builds"
                " a base per architecture) or list one architecture"
            )
        if ref.url is not None:
            raise UserError(
                f"{run.loaded.path}: targets.qemu.base_image.url: downloading bases is not"
                " supported yet; download it and give its path"
            )
        assert ref.path is not None
        path = (run.loaded.root / ref.path).resolve()
        if not path.is_file():
            raise UserError(f"{run.loaded.path}: targets.qemu.base_image.path: {path} not found")
        return f"file:{ref.sha256 or sha256_file(path)}", path

    def _base(self, run: BuildRun, ref: Path | None, arch: Arch) -> tuple[Path, str]:
        if ref is not None:
            with run.stage("base", f"checking {ref}"):
                digest = sha256_file(ref)
                want = run.loaded.spec.targets.qemu.base_image.sha256  # type: ignore[union-attr]
                if want is not None and want != digest:
                    raise UserError(f"{ref}: sha256 is {digest}, the spec says {want}")
            return ref, digest
        what = f"Debian 12 {arch.value} base image (cached after the first build)"
        with run.stage("base", what):
            built = base.build_base(run.cache, arch=arch, progress=run.progress)
        return built.path, built.sha256

    def _build_key(self, run: BuildRun, ctx: BakeFolder, work: Path) -> Path:
        """An ephemeral SSH key for the build user, in the private work folder."""
        keys = work / "ssh"
        keys.mkdir(mode=0o700)
        key_file = keys / "build_ed25519"
        public = proc.ssh_keygen(key_file, "meshbake-build")
        write_seed(ctx, run.loaded, public.read_text())
        return key_file

    def _packer_build(
        self,
        run: BuildRun,
        packer: Packer,
        ctx: BakeFolder,
        work: Path,
        log: Path,
        key_file: Path,
        base_path: Path,
        accel: Accelerator,
        arch: Arch,
    ) -> Path:
        spec = run.loaded.spec
        output_dir = work / "output"  # Packer insists that it does not exist yet
        serial_log = run.out_dir / "logs" / f"serial{_log_suffix(arch)}.log"
        variables = {
            "base_image": str(base_path),
            "base_checksum": "none",  # checked above, and Packer copies it anyway
            "output_directory": str(output_dir),
            "accelerator": accel.value,
            "cpu_model": cpu_model(accel, arch),
            "ssh_private_key_file": str(key_file),
            "manifest": str(work / "packer-manifest.json"),
            "serial_log": str(serial_log),
        }
        firmware = check_tools(arch).firmware
        if firmware is not None:
            # The build VM's own UEFI variables, in the work folder that goes with it.
            efi_vars = work / "efi-vars.fd"
            shutil.copyfile(firmware.vars_template, efi_vars)
            variables["efi_vars"] = str(efi_vars)
        seen: set[str] = set()

        def on_event(event: MachineEvent) -> None:
            if event.type != "ui" or len(event.data) < 2:
                return
            message = event.data[1].strip()
            for needle, stage, text in _MILESTONES:
                if needle in message and needle not in seen:
                    seen.add(needle)
                    run.progress(f"{spec.name}: {stage}: {text}")
            if "meshbake-bake:" in message:
                run.progress(f"{spec.name}: {message.split('meshbake-bake:', 1)[1].strip()}")

        what = f"Packer qemu builder ({arch.value}, {accel.value})"
        with run.stage("bake", what), packer_tmpdir() as tmp:
            result = packer.build(
                ctx.packer_dir,
                only=[qemu_sources(spec)[arch]],
                variables=variables,
                env={"TMPDIR": str(tmp), "PACKER_CACHE_DIR": str(work / "packer_cache")},
                log_file=log,
                on_event=on_event,
            )
        image = output_dir / qcow2_name(spec, arch)
        if result.returncode != 0 or not image.is_file():
            reason = (result.errors[-1] if result.errors else "no image").strip()
            reason = reason.splitlines()[-1] if reason else "no image"
            raise BuildFailed(
                f"{spec.name}: bake failed (packer exit {result.returncode}): {reason};"
                f" see {log} and {serial_log}"
            )
        return image


def _log_suffix(arch: Arch) -> str:
    """amd64's logs keep their names (``packer.log``); others carry the arch."""
    return "" if arch is Arch.AMD64 else f"-{arch.value}"


@contextmanager
def packer_tmpdir() -> Iterator[Path]:
    """A private, short TMPDIR for one Packer run, removed whatever happens.

    Packer leaves the seed ISO (our user data) there, so it must not be shared /tmp.
    It must also be short: Packer puts its plugin sockets in it, and a unix socket path
    may not exceed 108 bytes, which a deep build folder easily would.
    """
    tmp = Path(tempfile.mkdtemp(prefix="meshbake-packer-", dir=_short_tmp_root()))
    try:
        yield tmp
    finally:
        with proc.shielded():
            kill_strays(tmp)
            shutil.rmtree(tmp, ignore_errors=True)


#: Packer's plugin sockets are named ``<TMPDIR>/packer-plugin<10 digits>``; a unix
#: socket path has room for 107 bytes.
_SOCKET_ROOM = 107 - len("/meshbake-packer-xxxxxxxx/packer-plugin0123456789")


def _short_tmp_root() -> str:
    """The temp folder, unless its path leaves no room for Packer's sockets: then /tmp
    (the folder is private, 0700, either way).

    >>> len(_short_tmp_root()) <= _SOCKET_ROOM
    True
    """
    root = tempfile.gettempdir()
    return root if len(os.fsencode(root)) <= _SOCKET_ROOM else "/tmp"


def kill_strays(work: Path) -> list[int]:
    """Kill processes still using this build's work folder (a qemu Packer left behind).

    Only processes whose command line names ``work`` are touched: we started them.
    """
    killed: list[int] = []
    # Scan again until a scan finds nothing: a process forked or exec'd while the
    # previous scan ran (Packer starting qemu as the interrupt lands) is caught next time.
    for _ in range(_STRAY_SCANS):
        found = proc.processes_naming(str(work))
        if not found:
            break
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    return killed


#: At most this many scans for processes naming a work folder (see ``kill_strays``).
_STRAY_SCANS = 40


# --- aws ----------------------------------------------------------------------------


class AwsBuild:
    """The ``aws`` target: AMIs baked by Packer's amazon-ebs builder."""

    name = "aws"

    def build(self, run: BuildRun) -> BuildResult:
        from builder.aws import client as aws  # boto3 is only imported when the aws target is used

        spec = run.loaded.spec
        if spec.targets.aws is None:
            raise UserError(
                f"{run.loaded.path}: targets.aws is not set; the spec has no aws target"
            )
        arches = run.arches()  # refuses a bad --arch before anything is rendered
        packer = Packer()
        if run.options.dry_run:
            # Nothing is written into the output folder for a plan.
            with tempfile.TemporaryDirectory(prefix="meshbake-plan-") as tmp:
                with run.stage("render", "bake context"):
                    ctx = render_context(run.loaded, Path(tmp) / "context", packer=packer)
                _validate(run, packer, ctx, Path(tmp))
            with run.stage("plan", "resolving the source AMI"):
                plan = aws.aws_dry_run(run.loaded, packer=packer.version())
            return BuildResult(spec.name, run.loaded.path, "planned", plan=plan)
        boundary.own_folder(run.out_dir, "build folder")
        (run.out_dir / "logs").mkdir(exist_ok=True)
        log = run.out_dir / "logs" / "packer-aws.log"
        work = Path(tempfile.mkdtemp(prefix=".work-", dir=run.out_dir))
        try:
            with run.stage("render", "bake context"):
                ctx = render_context(run.loaded, work / "context", packer=packer)
            _validate(run, packer, ctx, work)
            sources = aws_sources(spec)
            parents: dict[Arch, aws.ResolvedAmi] = {}
            arts: dict[Arch, list[artifacts.Artifact]] = {}
            for arch in arches:
                arts[arch] = _fetch_artifacts(run, arch)
                artifacts.stage(arts[arch], ctx.aws_artifacts_dir(aws_source_name(spec, arch)))
                # The same lookup as the template's source_ami_filter, just before
                # Packer's: the build's parent, for ancestry (a newer AMI published in
                # between would make this name the one before Packer's pick).
                parents[arch] = aws.resolve_source_ami(spec, arch=arch)
            packer_manifest = work / "packer-manifest.json"
            what = f"Packer amazon-ebs builder ({', '.join(a.value for a in arches)})"
            with run.stage("bake", what), packer_tmpdir() as tmp:
                result = packer.build(
                    ctx.packer_dir,
                    only=[sources[a] for a in arches],
                    variables={"manifest": str(packer_manifest)},
                    env={"TMPDIR": str(tmp)},
                    log_file=log,
                    on_event=lambda e: None,
                )
            if result.returncode != 0:
                raise BuildFailed(f"{spec.name}: AMI bake failed; see {log}")
            by_source = aws.record_amis_by_source(packer_manifest)
            images = []
            for arch in arches:
                amis = by_source.get(aws_source_name(spec, arch))
                if not amis:
                    raise BuildFailed(
                        f"{spec.name}: Packer reported no {arch.value} AMI; see {log}"
                    )
                source = parents[arch]
                images.append(
                    {
                        "arch": arch.value,
                        "amis": amis,
                        "parent": {"kind": "source-ami", "id": source.id, "name": source.name},
                        "artifacts": [{"name": a.name, "sha256": a.sha256} for a in arts[arch]],
                    }
                )
            manifest: dict[str, object] = {
                "image": spec.name,
                "target": "aws",
                "spec_hash": run.loaded.digest,
                # One entry per architecture, each with its AMI per region.
                "images": images,
                "versions": {"consul": spec.consul.version, "envoy": spec.envoy.version},
                "stages": dict(run.timings),
            }
            if len(images) == 1:
                # A one-architecture build (a plan job's): the fields promote reads.
                manifest |= {k: images[0][k] for k in ("arch", "amis", "parent", "artifacts")}
            manifest_path = run.out_dir / "manifest.json"
            _write_json(manifest_path, manifest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return BuildResult(spec.name, run.loaded.path, "built", None, manifest_path, log=log)


#: The build targets, by name.
TARGETS: dict[str, Target] = {"qemu": QemuBuild(), "aws": AwsBuild()}


# --- entry points -------------------------------------------------------------------


def build_image(
    spec_path: Path, options: BuildOptions, progress: Progress = to_stderr
) -> BuildResult:
    """Build one spec for ``options.target``. Raises ``UserError`` on failure."""
    target = TARGETS.get(options.target)
    if target is None:
        raise UserError(f"unknown target {options.target!r}; choose one of {', '.join(TARGETS)}")
    loaded = load_spec(spec_path)
    for warning in loaded.warnings:
        progress(f"warning: {warning}")
    # Absolute: Packer runs with the context as its working directory.
    given = options.out or Path("build") / loaded.spec.name
    if given.is_symlink():
        raise UserError(f"{given}: the build folder is a symbolic link; give a folder of its own")
    out_dir = boundary.own_folder(given.resolve(), "build folder", create=False)
    cache = base.cache_folder(options.cache).resolve()
    run = BuildRun(loaded, options, out_dir, cache, progress)
    return target.build(run)


def build_many(
    specs: Sequence[Path], options: BuildOptions, jobs: int, progress: Progress = to_stderr
) -> list[BuildResult]:
    """Build several specs with at most ``jobs`` at once; one failure loses no other result."""
    if options.out is not None and len(specs) > 1:
        raise UserError("--out names one image's folder; leave it out when building several")
    lock = threading.Lock()

    def locked_progress(message: str) -> None:
        with lock:
            progress(message)

    def one(path: Path) -> BuildResult:
        started = time.monotonic()
        try:
            return build_image(path, options, locked_progress)
        except MeshbakeError as exc:
            elapsed = round(time.monotonic() - started, 1)
            return BuildResult(path.stem, path, "failed", error=str(exc), seconds=elapsed)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, specs))


def summary_table(results: Sequence[BuildResult]) -> str:
    rows = [("IMAGE", "STATUS", "SECONDS", "OUTPUT / ERROR")]
    for r in results:
        detail = r.error or (str(r.output or r.manifest or ""))
        rows.append(
            (r.image, r.status, f"{r.seconds:.0f}", detail.splitlines()[0] if detail else "")
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows
    )
