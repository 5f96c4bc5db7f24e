"""The pipeline-at-scale subcommands: ``plan``, ``collect``, ``promote``, ``revoke`` and
``channels``.

``builder.cli.main`` lists their ``add_*`` functions in its command table. An image's
channels live in SSM Parameter Store when ``--region`` is given (AMIs) and in the
local registry (``--registry``, default ``build/``) otherwise (qcow2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from builder.cli import common
from builder.errors import UserError
from builder.release import plan as release_plan

if TYPE_CHECKING:
    # boto3 comes with the channels: loaded only when a channel command runs.
    from builder.release import channels as rel

#: Where the qcow2 channel registry lives unless ``--registry`` says otherwise.
DEFAULT_REGISTRY = Path("build")


def cmd_plan(args: argparse.Namespace) -> int:
    jobs = release_plan.plan(common.spec_paths(args.specs))
    if args.json:
        print(json.dumps([j.to_json() for j in jobs], indent=2))
    else:
        for job in jobs:
            how = " ".join(job.command) if job.command else f"(copied by {job.built_by})"
            print(f"{job.id}\t{how}")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    record = release_plan.collect(args.folders, args.out)
    builds = record["builds"]
    assert isinstance(builds, list)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"{args.out / release_plan.RECORD}: {len(builds)} builds")
    return 0


def _image_and_store(
    value: str, regions: list[str], registry: Path | None
) -> tuple[str, rel.Store]:
    """The image name, and its channel store: SSM with ``--region``, else the registry."""
    from builder.aws import client as aws
    from builder.release import channels as rel

    path = Path(value)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        spec = common.load(path).spec
        name = spec.name
        if not regions and registry is None and spec.targets.qemu is None:
            regions = list(aws.image_regions(spec))
    else:
        name = value
        if not rel.NAME.match(name):
            raise UserError(f"{value}: neither a spec file nor an image name")
    if regions:
        if registry is not None:
            raise UserError("give --region (AMI channels) or --registry (qcow2), not both")
        return name, rel.SsmStore(regions)
    return name, rel.LocalRegistry(registry or DEFAULT_REGISTRY)


def cmd_promote(args: argparse.Namespace) -> int:
    from builder.release import channels as rel

    build = rel.load_build(args.build)
    store: rel.Store
    if build.target == "aws":
        regions = args.region or [r for r in build.ids if r]
        wanted = {r: build.ids[r] for r in regions if r in build.ids}
        missing = [r for r in regions if r not in build.ids]
        if missing:
            raise UserError(f"{args.build}: amis: no AMI in {', '.join(missing)}")
        build = rel.Build(
            build.image, build.target, build.spec_hash, build.parent, wanted, build.manifest
        )
        store = rel.SsmStore(regions)
    else:
        store = rel.LocalRegistry(args.registry or DEFAULT_REGISTRY)
    done = rel.promote(store, args.image, args.channel, build, args.by or rel.default_actor())
    for p in done:
        print(p.line())
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from builder.release import channels as rel

    if not args.reason.strip():
        raise UserError("--reason: say why the build is revoked (it is shown wherever it is)")
    name, store = _image_and_store(args.image, args.region, args.registry)
    for build in store.revoke(name, args.build, args.reason, args.by or rel.default_actor()):
        print(f"revoked {build}: {args.reason}")
    return 0


def cmd_channels(args: argparse.Namespace) -> int:
    from builder.release import channels as rel

    name, store = _image_and_store(args.image, args.region, args.registry)
    if args.resolve is not None:
        region = args.region[0] if args.region else None
        if region is None and isinstance(store, rel.SsmStore):
            region = store.regions[0]
        current = rel.resolve(store, name, args.resolve, region)
        print(current.path or current.build)
        return 0
    state = store.read(name)
    if args.affected_by is not None:
        affected = state.affected_by(args.affected_by)
        if args.json:
            print(json.dumps([p.to_json() for p in affected], indent=2))
        elif affected:
            for p in affected:
                print(f"{p.line()}  built on {args.affected_by}")
        else:
            print(f"no channel of {name} points to a build on {args.affected_by}")
        return 0
    if args.json:
        print(json.dumps(state.to_json(), indent=2))
        return 0
    if not state.history:
        print(f"{name} has no channels yet; 'meshbake promote' makes one")
        return 0
    for (_channel, _region), entries in sorted(state.history.items(), key=lambda kv: str(kv[0])):
        current = entries[-1]
        revoked = state.revoked.get(current.build)
        flag = f"  REVOKED: {revoked.reason}" if revoked else ""
        sys.stdout.write(f"{current.line()}{flag}\n")
        for earlier in reversed(entries[:-1]):
            gone = "  (revoked)" if earlier.build in state.revoked else ""
            sys.stdout.write(f"    was {earlier.build} by {earlier.by} at {earlier.at}{gone}\n")
    return 0


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--region", action="append", default=[], help="AMI channels (repeatable)")
    p.add_argument("--registry", type=Path, help="qcow2 channels: the folder (default build/)")


def _by(p: argparse.ArgumentParser) -> None:
    p.add_argument("--by", help="who or what does this (default: the CI run, else user@host)")


def add_plan(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``meshbake plan``."""
    p = sub.add_parser("plan", help="list the build jobs for a CI matrix")
    p.add_argument("specs", type=Path, nargs="+", metavar="SPEC", help="spec files or folders")
    p.add_argument("--json", action="store_true", help="one JSON entry per job")
    p.set_defaults(handler=cmd_plan)


def add_collect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``meshbake collect``."""
    p = sub.add_parser("collect", help="merge the jobs' manifests into one release record")
    p.add_argument("folders", type=Path, nargs="+", metavar="BUILD_FOLDER")
    p.add_argument("--out", type=Path, required=True, help="folder for release.json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_collect)


def add_promote(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``meshbake promote``."""
    p = sub.add_parser("promote", help="point a release channel of an image at a build")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--channel", required=True, help="e.g. dev, prod")
    p.add_argument("--build", type=Path, required=True, metavar="MANIFEST")
    _store_args(p)
    _by(p)
    p.set_defaults(handler=cmd_promote)


def add_revoke(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``meshbake revoke``."""
    p = sub.add_parser("revoke", help="mark a build revoked: never launched again")
    p.add_argument("image", metavar="IMAGE|SPEC")
    p.add_argument("build", metavar="BUILD", help="an AMI id, or a qcow2's sha256")
    p.add_argument("--reason", required=True)
    _store_args(p)
    _by(p)
    p.set_defaults(handler=cmd_revoke)


def add_channels(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``meshbake channels``."""
    p = sub.add_parser("channels", help="each channel's build, its history and who moved it")
    p.add_argument("image", metavar="IMAGE|SPEC")
    _store_args(p)
    p.add_argument("--affected-by", metavar="PARENT", help="base digest or source AMI")
    p.add_argument("--resolve", metavar="CHANNEL", help="print the channel's build (not revoked)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_channels)
