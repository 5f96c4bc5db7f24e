"""Render a self-contained bake context: everything Packer needs, nothing secret.

Layout of ``DIR``::

    packer/*.pkr.hcl            the template (packer fmt-ed)
    stage/                      uploaded into the VM as /tmp/meshbake
        bake.env users.list groups.list keys/  parameters of scripts/meshbake-bake
        rootfs/... files.tsv    every rendered file, with its mode and owner
        scripts/                meshbake-bake, meshbake-finalize
        artifacts/              consul.zip, envoy, SHA256SUMS (added by ``build``)
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
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from builder import __version__
from builder.errors import UserError
from builder.render import baked as bake
from builder.render import cloudconfig
from builder.render.hcl import packer_files
from builder.spec.model import LoadedSpec
from builder.tools.packer import Packer, PackerVersion

MARKER = "meshbake.json"
STAGE_SCRIPTS = ("meshbake-bake", "meshbake-finalize")


@dataclass(frozen=True)
class Context:
    """A rendered bake context on disk."""

    root: Path

    @property
    def packer_dir(self) -> Path:
        return self.root / "packer"

    @property
    def stage_dir(self) -> Path:
        return self.root / "stage"

    @property
    def seed_dir(self) -> Path:
        return self.root / "cloudinit" / "seed"

    @property
    def rootfs(self) -> Path:
        return self.stage_dir / "rootfs"

    def units(self) -> list[Path]:
        return sorted((self.rootfs / "etc/systemd/system").glob("*.service"))

    def scripts(self) -> list[Path]:
        """Every rendered shell script: stage scripts and the runtime scripts."""
        found = [self.stage_dir / "scripts" / name for name in STAGE_SCRIPTS]
        found += sorted((self.rootfs / bake.LIBEXEC.lstrip("/")).iterdir())
        return found

    def cloud_configs(self) -> list[Path]:
        return [
            self.seed_dir / "user-data",
            self.root / "cloudinit" / "first-boot.tftpl",
            self.rootfs / "etc/cloud/cloud.cfg.d/90-meshbake.cfg",
        ]


def render_context(
    loaded: LoadedSpec,
    out: Path,
    *,
    packer: Packer | None = None,
    packer_version: PackerVersion | None = None,
    public_key: str | None = None,
) -> Context:
    """Render ``loaded`` into ``out`` and return the ``Context``.

    The context is built in a sibling temp folder and swapped in whole, so ``out``
    is never left half-written. An existing ``out`` that is not a meshbake context is
    refused rather than overwritten. With ``packer`` the template is ``packer fmt``-ed.
    """
    if packer_version is None:
        packer_version = packer.version() if packer is not None else PackerVersion(1, 6, 6)
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ctx = Context(tmp)
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
    return Context(out)


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise UserError(f"{out}: exists and is not a meshbake context; refusing to overwrite it")


def _summary(loaded: LoadedSpec, packer_version: PackerVersion) -> dict[str, object]:
    spec = loaded.spec
    return {
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


def _write_packer(ctx: Context, loaded: LoadedSpec, version: PackerVersion) -> None:
    for name, text in packer_files(loaded, version).items():
        _write(ctx.packer_dir / name, text)


def _write_stage(ctx: Context, loaded: LoadedSpec) -> None:
    spec = loaded.spec
    stage = ctx.stage_dir
    files = [
        *bake.baked_files(loaded),
        bake.BakedFile("/etc/cloud/cloud.cfg.d/90-meshbake.cfg", cloudconfig.baked_cloud_cfg()),
    ]
    for file in files:
        _write(ctx.rootfs / file.dest.lstrip("/"), file.content, file.mode)
    _write(stage / "files.tsv", _files_tsv(files))
    _write(stage / "bake.env", bake.bake_env(spec, cloudconfig.BUILD_USER))
    _write(stage / "users.list", bake.users_list(spec))
    _write(stage / "groups.list", bake.groups_list(spec))
    (stage / "keys").mkdir(parents=True, exist_ok=True)
    for user, keys in bake.authorized_keys(spec).items():
        _write(stage / "keys" / f"{user}.pub", keys)
    for name in STAGE_SCRIPTS:
        _write(stage / "scripts" / name, bake.shipped_script(name), 0o755)
    (stage / "artifacts").mkdir(exist_ok=True)


def _files_tsv(files: Iterable[bake.BakedFile]) -> str:
    return "".join(f"{f.mode:04o}\t{f.owner}\t{f.group}\t{f.dest}\n" for f in files)


def write_seed(ctx: Context, loaded: LoadedSpec, public_key: str | None) -> None:
    """(Re)write the qemu build seed, e.g. with a build's ephemeral public key."""
    name = loaded.spec.name
    _write(ctx.seed_dir / "user-data", cloudconfig.seed_user_data(public_key))
    _write(ctx.seed_dir / "meta-data", cloudconfig.seed_meta_data(name, f"meshbake-build-{name}"))
