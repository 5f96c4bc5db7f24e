"""``meshbake plan`` and ``meshbake collect``: the CI's own matrix around ``meshbake build``.

``plan`` turns specs into jobs, one per image x target x architecture (x region for
AWS), each with what a runner needs to build it and nothing secret (a spec holds no
secret: tokens arrive at first boot). ``collect`` merges the manifests the jobs wrote
into one release record, refusing duplicates and builds of different spec versions.

>>> [j.id for j in plan([Path("images/web.yaml")])]
['web-qemu-amd64', 'web-aws-amd64-us-east-1']
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from builder.bake.arch import DEFAULT, target_arches
from builder.errors import UserError
from builder.render.hcl import manifest_name, qcow2_name
from builder.spec import boundary
from builder.spec.model import Arch, load_spec

#: The targets in the order jobs are listed.
TARGET_ORDER = ("qemu", "aws")


@dataclass(frozen=True)
class Job:
    """One matrix entry. ``command`` is null for an AWS copy region: the home region's
    job bakes and copies (Packer's ``ami_regions``), the entry says where it lands."""

    id: str
    image: str
    spec: str
    spec_hash: str
    target: str
    arch: str
    region: str | None
    out: str
    command: list[str] | None
    built_by: str
    #: A qemu job's qcow2 (``<out>/<name>.qcow2``, ``<out>/<name>-arm64.qcow2``); None
    #: for AMIs.
    output: str | None = None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def plan(specs: Sequence[Path]) -> list[Job]:
    """The jobs for ``specs`` (files, as ``spec_paths`` expands them), in a stable order."""
    jobs: list[Job] = []
    for path in specs:
        loaded = load_spec(path)
        spec = loaded.spec
        for target in TARGET_ORDER:
            for arch in target_arches(spec, target):
                base_id = f"{spec.name}-{target}-{arch}"
                if target == "qemu":
                    regions: tuple[str | None, ...] = (None,)
                else:
                    aws = spec.targets.aws
                    assert aws is not None
                    regions = tuple(dict.fromkeys((aws.region, *aws.ami_regions)))
                home = f"{base_id}-{regions[0]}" if regions[0] else base_id
                out = f"build/{home}"
                command = ["meshbake", "build", str(path), "--target", target, "--arch", arch]
                command += ["--out", out]
                for region in regions:
                    job_id = f"{base_id}-{region}" if region else base_id
                    jobs.append(
                        Job(
                            id=job_id,
                            image=spec.name,
                            spec=str(path),
                            spec_hash=loaded.digest,
                            target=target,
                            arch=arch,
                            region=region,
                            out=out,
                            command=command if job_id == home else None,
                            built_by=home,
                            output=(
                                f"{out}/{qcow2_name(spec, Arch(arch))}"
                                if target == "qemu"
                                else None
                            ),
                        )
                    )
    seen: dict[str, str] = {}
    for job in jobs:
        if job.id in seen:
            raise UserError(
                f"{job.spec}: name: image {job.image} is also defined in {seen[job.id]};"
                " each image needs its own name"
            )
        seen[job.id] = job.spec
    return jobs


# --- collect -----------------------------------------------------------------------------

RECORD = "release.json"


def _read_manifests(folder: Path) -> list[dict[str, object]]:
    """The manifests of a build folder (one per architecture's qcow2: ``manifest.json``,
    ``manifest-arm64.json``), or the one manifest file given."""
    if not folder.is_dir():
        return [_read_manifest(folder)]
    found = [folder / manifest_name(a) for a in Arch]
    present = [p for p in found if p.exists() or p.is_symlink()]
    return [_read_manifest(p) for p in present or found[:1]]


def _read_manifest(path: Path) -> dict[str, object]:
    if not path.exists() and not path.is_symlink():
        raise UserError(f"{path}: no manifest here (did this job's build finish?)")
    data = boundary.read_json_object(path, "build manifest")
    for field in ("image", "target", "spec_hash"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise UserError(f"{path}: {field}: missing or not a string")
    if data["target"] == "aws" and not isinstance(data.get("amis"), dict | None):
        raise UserError(f"{path}: amis: not a mapping of regions to AMI ids")
    if data["target"] == "aws" and data.get("amis") is None and not data.get("images"):
        raise UserError(f"{path}: amis: missing (an aws manifest maps regions to AMI ids)")
    if data["target"] == "aws" and data.get("amis") is None:
        _check_images(path, data["images"])
    if data["target"] == "qemu" and not isinstance(data.get("output"), dict):
        raise UserError(f"{path}: output: missing (a qemu manifest names its image)")
    data["_path"] = str(path)
    return data


def _check_images(path: Path, images: object) -> None:
    """The ``images`` of a several-architecture aws manifest: arch, amis, parent each."""
    if not isinstance(images, list):
        raise UserError(f"{path}: images: not a list")
    for i, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("arch"), str):
            raise UserError(f"{path}: images[{i}].arch: missing or not a string")
        if not isinstance(image.get("amis"), dict) or not image["amis"]:
            raise UserError(f"{path}: images[{i}].amis: missing (regions to AMI ids)")


def _per_arch(manifest: dict[str, object]) -> list[dict[str, object]]:
    """A manifest per architecture: an aws build of several gives one for each, in the
    one-architecture shape (``arch``, ``amis``, ``parent``) that promote reads."""
    images = manifest.get("images")
    if manifest.get("amis") is not None or not isinstance(images, list):
        return [manifest]
    rest = {k: v for k, v in manifest.items() if k != "images"}
    return [{**rest, **image} for image in images if isinstance(image, dict)]


def collect(folders: Sequence[Path], out: Path) -> dict[str, object]:
    """Merge the manifests in ``folders`` into ``out``/release.json and return it.

    Each build is keyed by image, target and architecture; a key seen twice is refused,
    and so are two builds of one image from different spec hashes (a job built from
    another commit). Each manifest is copied beside the record, so ``promote --build``
    can take it from there.
    """
    if not folders:
        raise UserError("collect: give at least one build folder")
    builds: dict[str, dict[str, object]] = {}
    hashes: dict[str, tuple[str, str]] = {}
    manifests = (
        m for folder in folders for each in _read_manifests(folder) for m in _per_arch(each)
    )
    for manifest in manifests:
        where = str(manifest.pop("_path"))
        image, target = str(manifest["image"]), str(manifest["target"])
        arch = str(manifest.get("arch") or DEFAULT)
        spec_hash = str(manifest["spec_hash"])
        key = f"{image}-{target}-{arch}"
        if key in builds:
            raise UserError(
                f"{where}: image: {image} ({target}, {arch}) is already collected from"
                f" {builds[key]['from']}; give each build once"
            )
        if image in hashes and hashes[image][0] != spec_hash:
            other_hash, other = hashes[image]
            raise UserError(
                f"{where}: spec_hash: {spec_hash[:12]} differs from {other_hash[:12]} in"
                f" {other}; every job must build the same spec"
            )
        hashes[image] = (spec_hash, where)
        # A qemu manifest names its image relative to its own folder; keep that folder.
        manifest.setdefault("folder", str(Path(where).parent.resolve()))
        builds[key] = {"from": where, "manifest": f"manifests/{key}.json", **manifest}
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifests").mkdir(exist_ok=True)
    for key, build in builds.items():
        fields = {k: v for k, v in build.items() if k not in ("from", "manifest")}
        _write_atomically(out / "manifests" / f"{key}.json", fields)
    record: dict[str, object] = {
        "collected_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "builds": [builds[k] for k in sorted(builds)],
    }
    _write_atomically(out / RECORD, record)
    return record


def _write_atomically(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
