"""Render a self-contained bake context: everything Packer needs, nothing secret.

Layout of ``DIR``::

    packer/*.pkr.hcl            the template (packer fmt-ed)
    stage/                      uploaded into the VM as /tmp/meshbake
        bake.env paths.env users.list groups.list keys/  parameters of meshbake-bake
        rootfs/... files.tsv    every rendered file, with its mode and owner
        scripts/                meshbake-bake, meshbake-finalize, meshbake-lib.sh
        artifacts/              consul.zip, envoy, SHA256SUMS (added by ``build``)
    artifacts/<source>/         the same per AWS source, i.e. per architecture
    cloudinit/seed/             the qemu build seed (user-data, meta-data)
    cloudinit/first-boot.tftpl  the first-boot user data as a templatefile()
    meshbake.json               what was rendered from which spec

>>> from builder.spec.model import load_spec
>>> ctx = render_context(load_spec("images/web.yaml"), Path("/tmp/ctx-doctest"))
>>> (ctx.packer_dir / "build.pkr.hcl").is_file()
True
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from builder import __version__
from builder.errors import UserError, reason
from builder.render import baked as bake
from builder.render import cloudconfig, escape, paths
from builder.render.hcl import aws_source_name, packer_files
from builder.spec import boundary
from builder.spec.model import BUILD_USER, LoadedSpec
from builder.tools.packer import Packer, PackerVersion

MARKER = "meshbake.json"
STAGE_SCRIPTS = ("meshbake-bake", "meshbake-finalize", bake.SCRIPT_LIB)


@dataclass(frozen=True)
class BakeFolder:
    """A rendered bake folder on disk: what Packer builds from (not run state)."""

    root: Path

    @property
    def packer_dir(self) -> Path:
        return self.root / "packer"

    @property
    def stage_dir(self) -> Path:
        return self.root / "stage"

    def aws_artifacts_dir(self, source: str) -> Path:
        """Where ``build`` stages the artifacts of the AWS source ``source`` (one per
        architecture; the template uploads them into that AMI's stage only)."""
        return self.root / "artifacts" / source

    @property
    def seed_dir(self) -> Path:
        return self.root / "cloudinit" / "seed"

    @property
    def rootfs(self) -> Path:
        return self.stage_dir / "rootfs"

    def units(self) -> list[Path]:
        return sorted((self.rootfs / paths.rel(paths.UNIT_DIR)).glob("*.service"))

    def scripts(self) -> list[Path]:
        """Every rendered shell script: stage scripts and the runtime scripts."""
        found = [self.stage_dir / "scripts" / name for name in STAGE_SCRIPTS]
        found += sorted((self.rootfs / paths.rel(paths.LIBEXEC)).iterdir())
        return found

    def cloud_configs(self) -> list[Path]:
        return [
            self.seed_dir / "user-data",
            self.root / "cloudinit" / "first-boot.tftpl",
            self.rootfs / paths.rel(paths.CLOUD_CFG_DROPIN),
        ]


def render_context(
    loaded: LoadedSpec,
    out: Path,
    *,
    packer: Packer | None = None,
    packer_version: PackerVersion | None = None,
    public_key: str | None = None,
) -> BakeFolder:
    """Render ``loaded`` into ``out`` and return the ``BakeFolder``.

    The context is built in a sibling temp folder and swapped in whole, so ``out``
    is never left half-written. An existing ``out`` that is not a meshbake context is
    refused rather than overwritten. With ``packer`` the template is ``packer fmt``-ed.
    """
    if packer_version is None:
        packer_version = packer.version() if packer is not None else PackerVersion(1, 6, 6)
    out = resolve_out(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise UserError(f"{out}: cannot create the bake folder here: {reason(exc)}") from None
    try:
        ctx = BakeFolder(tmp)
        _write_packer(ctx, loaded, packer_version)
        _write_stage(ctx, loaded)
        write_seed(ctx, loaded, public_key)
        _write(
            ctx.root / "cloudinit" / "first-boot.tftpl", cloudconfig.user_data_template(loaded.spec)
        )
        _write(ctx.root / MARKER, json.dumps(_summary(loaded, packer_version), indent=2) + "\n")
        if packer is not None:
            packer.fmt(ctx.packer_dir)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BakeFolder(out)


#: What the marker says, so that only a folder meshbake rendered is ever replaced.
MARKER_KIND = "meshbake bake folder"

#: File systems that are not storage: an output folder there is refused.
_NOT_STORAGE = ("/proc", "/sys", "/dev")


def resolve_out(out: Path) -> Path:
    """``out`` as the absolute folder it names, once checked that meshbake may (re)write
    it; nothing is created or removed before this returns.

    The path is resolved first (symbolic links of its parents and every ``..``), so
    ``nosuch/../victim`` is judged as ``victim``, the folder it would replace, and
    ``.`` as the current folder; all later steps use the resolved path only.
    """
    _check_out(out)
    try:
        real = Path(os.path.realpath(out))
    except (OSError, ValueError) as exc:
        raise UserError(f"{out}: cannot resolve this folder: {reason(exc)}") from None
    if real != Path(os.path.normpath(Path.cwd() / out)) and ".." in out.parts:
        # The kernel would resolve it differently (or not at all: a missing folder
        # before '..'); say which folder it is rather than guess.
        raise UserError(f"{out}: has a '..' segment; give the folder itself ({real})")
    cwd = Path.cwd().resolve()
    if cwd == real or cwd.is_relative_to(real):
        raise UserError(
            f"{out}: is the current folder or holds it; run from elsewhere or give another folder"
        )
    _check_out(real)
    _check_replaceable(real, out)
    return real


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot be a folder of files: under /proc, /sys or /dev,
    the root itself, a symbolic link, or under something that is not a folder."""
    absolute = Path.cwd() / out  # lexical: a symlink is judged below, not followed
    real = out.resolve()
    for root in _NOT_STORAGE:
        if absolute.is_relative_to(root) or real.is_relative_to(root):
            raise UserError(f"{out}: is under {root}, which holds no files; choose another folder")
    if absolute == absolute.parent or real == real.parent:
        raise UserError(f"{out}: is the root folder; choose a folder of its own")
    if out.is_symlink():
        raise UserError(f"{out}: is a symbolic link; give the folder it points to")
    for parent in absolute.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise UserError(f"{out}: {parent} is a file, not a folder")
            break


def _check_replaceable(out: Path, shown: Path) -> None:
    if not os.path.lexists(out):
        return
    if not out.is_dir() or (any(out.iterdir()) and not is_bake_folder(out)):
        raise UserError(
            f"{shown}: exists and is not a meshbake context (no {MARKER} written by meshbake);"
            " refusing to overwrite it"
        )


def is_bake_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a marker that meshbake wrote (its ``kind`` says so)."""
    marker = folder / MARKER
    if marker.is_symlink():
        return False
    try:
        data = json.loads(boundary.read_regular(marker, boundary.MAX_SECRET_BYTES))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == MARKER_KIND


def _summary(loaded: LoadedSpec, packer_version: PackerVersion) -> dict[str, object]:
    spec = loaded.spec
    return {
        "kind": MARKER_KIND,
        "image": spec.name,
        "spec": str(loaded.path),
        "spec_hash": loaded.digest,
        "consul": spec.consul.version,
        "envoy": spec.envoy.version,
        "packer": str(packer_version),
        "meshbake": __version__,
    }


def _write(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    path.chmod(mode)


def _write_packer(ctx: BakeFolder, loaded: LoadedSpec, version: PackerVersion) -> None:
    for name, text in packer_files(loaded, version).items():
        _write(ctx.packer_dir / name, text)


def _write_stage(ctx: BakeFolder, loaded: LoadedSpec) -> None:
    spec = loaded.spec
    stage = ctx.stage_dir
    files = [
        *bake.baked_files(loaded),
        bake.BakedFile(paths.CLOUD_CFG_DROPIN, cloudconfig.baked_cloud_cfg()),
    ]
    for file in files:
        _write(escape.inside(ctx.rootfs, escape.image_rel(file.dest)), file.content, file.mode)
    _write(stage / "files.tsv", _files_tsv(files))
    _write(stage / "bake.env", bake.bake_env(spec, BUILD_USER))
    # The bake runs before the rootfs is installed, so it gets the paths beside bake.env.
    _write(stage / "paths.env", paths.paths_env())
    _write(stage / "users.list", bake.users_list(spec))
    _write(stage / "groups.list", bake.groups_list(spec))
    (stage / "keys").mkdir(parents=True, exist_ok=True)
    for user, keys in bake.authorized_keys(spec).items():
        _write(escape.inside(stage / "keys", f"{user}.pub"), keys)
    for name in STAGE_SCRIPTS:
        # The library is sourced by meshbake-bake from its folder, never run.
        mode = 0o644 if name == bake.SCRIPT_LIB else 0o755
        _write(stage / "scripts" / name, bake.shipped_script(name), mode)
    (stage / "artifacts").mkdir(exist_ok=True)
    if spec.targets.aws is not None:
        for arch in spec.targets.aws.arches:
            ctx.aws_artifacts_dir(aws_source_name(spec, arch)).mkdir(parents=True, exist_ok=True)


def _files_tsv(files: Iterable[bake.BakedFile]) -> str:
    return "".join(escape.record([f"{f.mode:04o}", f.owner, f.group, f.dest], "\t") for f in files)


def write_seed(ctx: BakeFolder, loaded: LoadedSpec, public_key: str | None) -> None:
    """(Re)write the qemu build seed, e.g. with a build's ephemeral public key."""
    name = loaded.spec.name
    _write(ctx.seed_dir / "user-data", cloudconfig.seed_user_data(public_key))
    _write(ctx.seed_dir / "meta-data", cloudconfig.seed_meta_data(name, f"meshbake-build-{name}"))
