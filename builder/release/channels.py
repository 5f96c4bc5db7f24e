"""Release channels, revocation and ancestry, with no hosted service.

A channel (``dev``, ``prod``, ...) of an image points to one build at a time; every
promotion is kept, so a channel's history is the list of what it pointed to, when,
and who or what moved it. Two stores hold the same fields:

- ``SsmStore`` (AMIs): one SSM parameter per image, channel and region,
  ``/meshbake/<image>/channels/<channel>``, whose value is the AMI id (any tool can
  resolve it) and whose description carries the rest. Parameter history is channel
  history. AMI tags record membership (``meshbake:channel:<name>``) and revocation
  (``meshbake:revoked``).
- ``LocalRegistry`` (qcow2): ``channels.json`` in the output folder, rewritten under
  a lock through a temp file, fsync and rename, so a crash leaves the old file or the
  new one, never a torn one. A promoted qcow2 is copied to ``builds/`` by digest, so
  a rebuild into ``build/<name>/`` cannot change what a channel points to.

>>> Promotion("prod", "ami-1", "us-east-1", "ab" * 32, "ami-0", "ci", "t", "m").line()
'prod  ami-1  us-east-1  by ci at t (parent ami-0)'
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from builder.aws import client as aws
from builder.digest import sha256_file
from builder.errors import UserError
from builder.render import tags as tag
from builder.spec import boundary

#: Image and channel names: what an SSM parameter path and a tag key can carry.
NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


def check_channel(name: str) -> str:
    if not NAME.match(name):
        raise UserError(f"--channel {name!r}: lower-case letters, digits and '-', e.g. prod")
    return name


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_actor() -> str:
    """Who promotes or revokes: the CI run when there is one, else user@host."""
    env = os.environ
    if env.get("GITHUB_ACTIONS") == "true":
        return (
            f"github-actions:{env.get('GITHUB_REPOSITORY', '?')}"
            f"/actions/runs/{env.get('GITHUB_RUN_ID', '?')}"
        )
    if env.get("GITLAB_CI") == "true":
        return (
            f"gitlab-ci:{env.get('CI_PROJECT_PATH', '?')}"
            f"/pipelines/{env.get('CI_PIPELINE_ID', '?')}"
        )
    return f"{getpass.getuser()}@{socket.gethostname()}"


# --- records --------------------------------------------------------------------------


@dataclass(frozen=True)
class Promotion:
    """One move of a channel: in ``region`` (AMIs) or locally (``region`` is None)."""

    channel: str
    build: str  # the AMI id, or sha256:<qcow2 digest>
    region: str | None
    spec_hash: str
    parent: str  # base image digest or source AMI: ancestry
    by: str
    at: str
    manifest: str
    path: str | None = None  # qcow2: the kept copy

    def line(self) -> str:
        where = f"  {self.region}" if self.region else ""
        parent = f" (parent {self.parent})" if self.parent else ""
        return f"{self.channel}  {self.build}{where}  by {self.by} at {self.at}{parent}"

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Revocation:
    build: str
    reason: str
    by: str
    at: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Channels:
    """An image's channels: history per (channel, region), oldest first, and revocations."""

    image: str
    history: Mapping[tuple[str, str | None], Sequence[Promotion]]
    revoked: Mapping[str, Revocation] = field(default_factory=dict)

    def current(self, channel: str, region: str | None) -> Promotion | None:
        entries = self.history.get((channel, region), ())
        return entries[-1] if entries else None

    def affected_by(self, parent: str) -> list[Promotion]:
        """Current channel builds whose parent is ``parent`` (a revoked base's reach)."""
        found = []
        for entries in self.history.values():
            if entries and entries[-1].parent == parent:
                found.append(entries[-1])
        return found

    def to_json(self) -> dict[str, object]:
        channels: dict[str, object] = {}
        for (name, region), entries in sorted(self.history.items(), key=lambda kv: str(kv[0])):
            key = f"{name}@{region}" if region else name
            current = entries[-1] if entries else None
            channels[key] = {
                "channel": name,
                "region": region,
                "current": current.to_json() if current else None,
                "revoked": bool(current and current.build in self.revoked),
                "history": [e.to_json() for e in entries],
            }
        return {
            "image": self.image,
            "channels": channels,
            "revoked": {k: v.to_json() for k, v in self.revoked.items()},
        }


class Store(Protocol):
    def read(self, image: str) -> Channels: ...

    def promote(self, image: str, promotions: Sequence[Promotion]) -> None: ...

    def revoke(self, image: str, build: str, reason: str, by: str) -> list[str]: ...


# --- builds from manifests ----------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    """What ``promote --build MANIFEST`` promotes: one build id per region (or local)."""

    image: str
    target: str
    spec_hash: str
    parent: str
    ids: Mapping[str | None, str]
    manifest: Path
    image_file: Path | None = None


def load_build(path: Path) -> Build:
    """A build from its manifest (``build/<name>/manifest.json`` or a collected one)."""
    data = boundary.read_json_object(path, "build manifest")

    def text(key: str) -> str:
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise UserError(f"{path}: {key}: missing or not a string")
        return value

    image, target, spec_hash = text("image"), text("target"), text("spec_hash")
    parent_field = data.get("parent")
    parent = str(parent_field.get("id", "")) if isinstance(parent_field, dict) else ""
    if target == "aws":
        amis = data.get("amis")
        if amis is None and isinstance(data.get("images"), list):
            # A build of several architectures; a channel holds one AMI per region.
            raise UserError(
                f"{path}: amis: this build made one AMI per architecture; collect it"
                " ('meshbake collect') and promote one architecture's manifest from"
                " release/manifests/"
            )
        if not isinstance(amis, dict) or not amis:
            raise UserError(f"{path}: amis: missing (region -> AMI id)")
        ids: dict[str | None, str] = {}
        for region, ami in amis.items():
            if not isinstance(ami, str) or not ami.startswith("ami-"):
                raise UserError(f"{path}: amis.{region}: {ami!r} is not an AMI id")
            ids[str(region)] = ami
        return Build(image, target, spec_hash, parent, ids, path)
    if target == "qemu":
        output = data.get("output")
        if not isinstance(output, dict):
            raise UserError(f"{path}: output: missing")
        name, digest = output.get("path"), output.get("sha256")
        if not isinstance(name, str) or not isinstance(digest, str) or len(digest) != 64:
            raise UserError(f"{path}: output: needs path and a sha256")
        folder = Path(str(data.get("folder") or path.parent))
        return Build(
            image, target, spec_hash, parent, {None: f"sha256:{digest}"}, path, folder / name
        )
    raise UserError(f"{path}: target: {target!r} is neither qemu nor aws")


# --- the local registry ---------------------------------------------------------------------


class LocalRegistry:
    """``<folder>/channels.json``: the qcow2 channels, written atomically under a lock."""

    FILE = "channels.json"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / self.FILE

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / ".channels.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if we die
            yield
        finally:
            os.close(fd)

    def _load(self) -> dict[str, object]:
        if not self.path.exists() and not self.path.is_symlink():
            return {"version": 1, "images": {}}
        data = boundary.read_json_object(self.path, "channel registry")
        if not isinstance(data.get("images"), dict):
            raise UserError(f"{self.path}: images: missing (not a channel registry)")
        return data

    def _save(self, data: Mapping[str, object]) -> None:
        # Under the lock no other writer runs: a temp file left now is a dead one's.
        for stale in self.folder.glob(f".{self.FILE}.*.tmp"):
            stale.unlink(missing_ok=True)
        tmp = self.folder / f".{self.FILE}.{os.getpid()}.tmp"
        try:
            with tmp.open("w", encoding="utf-8") as f:
                f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    def _image(self, data: dict[str, object], image: str) -> dict[str, dict[str, object]]:
        images = data["images"]
        assert isinstance(images, dict)
        entry = images.setdefault(image, {"channels": {}, "revoked": {}})
        if not isinstance(entry, dict):
            raise UserError(f"{self.path}: images.{image}: not an object")
        for key in ("channels", "revoked"):
            if not isinstance(entry.setdefault(key, {}), dict):
                raise UserError(f"{self.path}: images.{image}.{key}: not an object")
        return entry

    def read(self, image: str) -> Channels:
        # No lock: every write is a rename, so a reader sees one whole version.
        data = self._load()
        entry = self._image(data, image)
        history: dict[tuple[str, str | None], list[Promotion]] = {}
        for name, entries in entry["channels"].items():
            where = f"{self.path}: images.{image}.channels.{name}"
            if not isinstance(entries, list):
                raise UserError(f"{where}: not a list")
            history[(name, None)] = [_promotion(e, f"{where}[{i}]") for i, e in enumerate(entries)]
        revoked = {
            build: _revocation(r, build, f"{self.path}: images.{image}.revoked.{build}")
            for build, r in entry["revoked"].items()
        }
        return Channels(image, history, revoked)

    def keep(self, build: Build) -> Path:
        """Keep a copy of the promoted qcow2 under ``builds/`` by digest.

        A copy, not a hard link: booting or rewriting the build folder's qcow2 in place
        would change a linked file under the channel."""
        assert build.image_file is not None
        digest = build.ids[None].removeprefix("sha256:")
        kept = self.folder / "builds" / f"{build.image}-{digest[:12]}.qcow2"
        if kept.is_file():
            return kept
        if not build.image_file.is_file():
            raise UserError(f"{build.manifest}: output.path: {build.image_file} is missing")
        if sha256_file(build.image_file) != digest:
            raise UserError(
                f"{build.manifest}: output.sha256: {build.image_file} is no longer that"
                " build (rebuilt since?); promote the manifest that describes it"
            )
        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
        try:
            shutil.copy2(build.image_file, tmp)
            if sha256_file(tmp) != digest:
                raise UserError(f"{build.image_file}: changed while it was copied; try again")
            tmp.replace(kept)
        finally:
            tmp.unlink(missing_ok=True)
        return kept

    def promote(self, image: str, promotions: Sequence[Promotion]) -> None:
        with self._locked():
            data = self._load()
            channels = self._image(data, image)["channels"]
            for p in promotions:
                entries = channels.setdefault(p.channel, [])
                assert isinstance(entries, list)
                entries.append(p.to_json())
            self._save(data)

    def revoke(self, image: str, build: str, reason: str, by: str) -> list[str]:
        with self._locked():
            data = self._load()
            entry = self._image(data, image)
            known = {
                str(e.get("build"))
                for entries in entry["channels"].values()
                if isinstance(entries, list)
                for e in entries
                if isinstance(e, dict)
            }
            wanted = build if build.startswith("sha256:") else f"sha256:{build}"
            matches = sorted(b for b in known if b in (build, wanted))
            if not matches and len(wanted) >= len("sha256:") + 12:
                matches = sorted(b for b in known if b.startswith(wanted))
            if len(matches) > 1:
                raise UserError(f"{self.path}: images.{image}: {build} names several builds")
            if not matches:
                raise UserError(
                    f"{self.path}: images.{image}: no promoted build {build}; see"
                    f" 'meshbake channels {image}'"
                )
            for match in matches:
                entry["revoked"][match] = Revocation(match, reason, by, now()).to_json()
            self._save(data)
        return matches


def _promotion(raw: object, where: str) -> Promotion:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: not an object")
    values: dict[str, str | None] = {}
    for name in ("channel", "build", "spec_hash", "parent", "by", "at", "manifest"):
        value = raw.get(name)
        if not isinstance(value, str):
            raise UserError(f"{where}.{name}: missing or not a string")
        values[name] = value
    for name in ("region", "path"):
        value = raw.get(name)
        if value is not None and not isinstance(value, str):
            raise UserError(f"{where}.{name}: not a string")
        values[name] = value
    return Promotion(**values)  # type: ignore[arg-type]


def _revocation(raw: object, build: str, where: str) -> Revocation:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: not an object")
    for name in ("reason", "by", "at"):
        if not isinstance(raw.get(name), str):
            raise UserError(f"{where}.{name}: missing or not a string")
    return Revocation(build, str(raw["reason"]), str(raw["by"]), str(raw["at"]))


# --- SSM Parameter Store and AMI tags -----------------------------------------------------------


#: How often ``_retag`` follows a channel that keeps moving under it.
_RETAG_ATTEMPTS = 20


def parameter(image: str, channel: str) -> str:
    """>>> parameter("web", "prod")
    '/meshbake/web/channels/prod'
    """
    return f"/meshbake/{image}/channels/{channel}"


class SsmStore:
    """The AMI channels: SSM parameters (history = channel history) plus AMI tags."""

    def __init__(self, regions: Sequence[str], client: aws.Aws | None = None) -> None:
        self.regions = tuple(dict.fromkeys(regions))
        self.aws = client or aws.Aws()

    def read(self, image: str) -> Channels:
        history: dict[tuple[str, str | None], list[Promotion]] = {}
        for region in self.regions:
            ssm = self.aws.ssm(region)
            with aws.translated(f"reading the channels of {image}", region):
                names = [
                    p["Name"]
                    for page in ssm.get_paginator("get_parameters_by_path").paginate(
                        Path=f"/meshbake/{image}/channels"
                    )
                    for p in page.get("Parameters", [])
                    if "Name" in p
                ]
                for name in sorted(names):
                    channel = name.rsplit("/", 1)[1]
                    versions = [
                        v
                        for page in ssm.get_paginator("get_parameter_history").paginate(Name=name)
                        for v in page.get("Parameters", [])
                    ]
                    versions.sort(key=lambda v: v.get("Version", 0))
                    history[(channel, region)] = [
                        _from_version(channel, region, v, name) for v in versions
                    ]
        revoked: dict[str, Revocation] = {}
        for record in aws.list_images(image, self.regions, aws=self.aws):
            if tag.REVOKED in record.tags:
                revoked[record.id] = Revocation(
                    record.id,
                    record.tags[tag.REVOKED],
                    record.tags.get(tag.REVOKED_BY, ""),
                    record.tags.get(tag.REVOKED_AT, ""),
                )
        return Channels(image, history, revoked)

    def promote(self, image: str, promotions: Sequence[Promotion]) -> None:
        for p in promotions:
            assert p.region is not None
            ssm = self.aws.ssm(p.region)
            about = {"by": p.by, "at": p.at, "spec_hash": p.spec_hash, "parent": p.parent}
            about["manifest"] = p.manifest[-(1000 - len(json.dumps(about))) :]
            with aws.translated(f"promoting {p.build} to {p.channel}", p.region):
                ssm.put_parameter(
                    Name=parameter(image, p.channel),
                    Value=p.build,
                    Type="String",
                    Overwrite=True,
                    Description=json.dumps(about, sort_keys=True),  # at most 1024 characters
                )
            self._retag(image, p.channel, p.region)

    def _retag(self, image: str, channel: str, region: str) -> None:
        """The channel tag on the AMI the parameter names now, and on no other.

        Promotes may race: each one re-reads the parameter after its tag writes and
        goes again if the channel moved meanwhile, so the last writer leaves the tags
        matching the parameter, whatever the interleaving.
        """
        ssm, ec2 = self.aws.ssm(region), self.aws.ec2(region)
        key = tag.CHANNEL_PREFIX + channel
        name = parameter(image, channel)
        with aws.translated(f"tagging the {channel} AMI of {image}", region):
            current = ssm.get_parameter(Name=name)["Parameter"]
            for _attempt in range(_RETAG_ATTEMPTS):
                ami = current.get("Value")
                modified = current.get("LastModifiedDate")
                at = modified.isoformat() if isinstance(modified, datetime) else now()
                for record in aws.list_images(image, [region], aws=self.aws):
                    if record.id == ami and key not in record.tags:
                        ec2.create_tags(Resources=[record.id], Tags=[{"Key": key, "Value": at}])
                    elif record.id != ami and key in record.tags:
                        ec2.delete_tags(Resources=[record.id], Tags=[{"Key": key}])
                again = ssm.get_parameter(Name=name)["Parameter"]
                if again.get("Version") == current.get("Version"):
                    return
                current = again

    def revoke(self, image: str, build: str, reason: str, by: str) -> list[str]:
        """Tag ``build`` and its copies in the other regions (same AMI name) revoked."""
        records = aws.list_images(image, self.regions, aws=self.aws)
        named = {r.name for r in records if r.id == build}
        if not named:
            raise UserError(
                f"{build}: not an AMI of {image} in {', '.join(self.regions)}; see"
                f" 'meshbake images {image}'"
            )
        at = now()
        done = []
        for record in records:
            if record.name in named:
                with aws.translated(f"revoking {record.id}", record.region):
                    self.aws.ec2(record.region).create_tags(
                        Resources=[record.id],
                        Tags=[
                            {"Key": tag.REVOKED, "Value": reason[:256]},
                            {"Key": tag.REVOKED_AT, "Value": at},
                            {"Key": tag.REVOKED_BY, "Value": by[:256]},
                        ],
                    )
                done.append(record.id)
        return done


def _from_version(channel: str, region: str, version: Mapping[str, object], name: str) -> Promotion:
    about: dict[str, object] = {}
    with contextlib.suppress(ValueError, TypeError):
        loaded = json.loads(str(version.get("Description") or "{}"))
        about = loaded if isinstance(loaded, dict) else {}
    modified = version.get("LastModifiedDate")
    at = modified.isoformat() if isinstance(modified, datetime) else str(modified or "")
    return Promotion(
        channel=channel,
        build=str(version.get("Value", "")),
        region=region,
        spec_hash=str(about.get("spec_hash", "")),
        parent=str(about.get("parent", "")),
        # Set by another tool, the version still says which principal wrote it.
        by=str(about.get("by") or version.get("LastModifiedUser") or "?"),
        at=str(about.get("at") or at),
        manifest=str(about.get("manifest", name)),
    )


# --- the operations ---------------------------------------------------------------------------


def promote(store: Store, image: str, channel: str, build: Build, by: str) -> list[Promotion]:
    """Point ``channel`` of ``image`` at ``build`` (in each of its regions)."""
    check_channel(channel)
    if build.image != image:
        raise UserError(f"{build.manifest}: image: the build is of {build.image}, not {image}")
    state = store.read(image)
    for build_id in build.ids.values():
        if build_id in state.revoked:
            why = state.revoked[build_id].reason
            raise UserError(f"{build.manifest}: {build_id} is revoked ({why}); not promoted")
    kept: str | None = None
    if isinstance(store, LocalRegistry):
        if build.target != "qemu":
            raise UserError(f"{build.manifest}: target: an AMI build is promoted with --region")
        kept = str(store.keep(build))
    elif build.target != "aws":
        raise UserError(f"{build.manifest}: target: a qcow2 build is promoted without --region")
    at = now()
    promotions = [
        Promotion(
            channel, build_id, region, build.spec_hash, build.parent, by, at,
            str(build.manifest), kept,
        )
        for region, build_id in build.ids.items()
    ]  # fmt: skip
    store.promote(image, promotions)
    return promotions


def resolve(store: Store, image: str, channel: str, region: str | None) -> Promotion:
    """The build ``channel`` points to now; a revoked one is refused."""
    check_channel(channel)
    state = store.read(image)
    current = state.current(channel, region)
    where = f" in {region}" if region else ""
    if current is None:
        raise UserError(f"channel {channel} of {image} points to no build{where}; promote one")
    revoked = state.revoked.get(current.build)
    if revoked is not None:
        raise UserError(
            f"channel {channel} of {image} points to {current.build}{where}, which is revoked"
            f" ({revoked.reason}); promote another build"
        )
    return current


def protected(state: Channels, history: int | None = None) -> dict[str, str]:
    """Build id -> why prune must keep it: a channel points to it now, or did within
    the last ``history`` promotions of that channel (None: all the store keeps)."""
    keep: dict[str, str] = {}
    for (channel, _region), entries in state.history.items():
        if not entries:
            continue
        keep.setdefault(entries[-1].build, f"channel {channel} points to it")
        recent = entries[:-1] if history is None else entries[-history - 1 : -1]
        for entry in recent:
            keep.setdefault(entry.build, f"in the history of channel {channel}")
    return keep
