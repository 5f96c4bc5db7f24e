"""The AWS subcommands: ``meshbake images``, ``meshbake launch`` and ``meshbake prune``.

``builder.cli.main`` lists their ``add_*`` functions in its command table; each handler
calls a typed function of ``builder.aws.client``. boto3 is imported only when one of
them runs, so the other subcommands start fast.

>>> from builder.cli.main import main
>>> main(["images", "images/web.yaml", "--json"])  # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from builder.cli import common
from builder.errors import UserError
from builder.spec import boundary

if TYPE_CHECKING:
    from builder.aws.client import AmiRecord

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


def _spec_or_name(value: str, regions: list[str]) -> tuple[str, tuple[str, ...]]:
    """An image name and its regions, from a spec file or a bare name plus ``--region``."""
    from builder.aws import client as aws

    regions = [boundary.aws_region(r) for r in regions]
    path = Path(value)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        loaded = common.load(path)
        return loaded.spec.name, tuple(regions) or aws.image_regions(loaded.spec)
    if not _NAME.match(value):
        raise UserError(f"{value}: neither a spec file nor an image name")
    if not regions:
        raise UserError(f"{value}: give --region (or a spec file, which names its regions)")
    return value, tuple(regions)


def _table(records: list[AmiRecord]) -> str:
    header = ("REGION", "AMI", "CREATED", "STATE", "CONSUL", "ENVOY", "SPEC", "NAME")
    rows = [
        (
            r.region,
            r.id,
            r.creation_date.strftime("%Y-%m-%d %H:%M"),
            r.state,
            r.consul or "-",
            r.envoy or "-",
            r.spec_hash[:12] or "-",
            r.name,
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in (header, *rows)
    )


def cmd_images(args: argparse.Namespace) -> int:
    from builder.aws import client as aws

    name, regions = _spec_or_name(args.image, args.region)
    records = aws.list_images(name, regions)
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2))
    elif records:
        sys.stdout.write(_table(records))
    else:
        print(f"no AMIs of {name} in {', '.join(regions)}")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from builder.aws import client as aws

    loaded = common.load(args.spec)
    if args.region is not None:
        boundary.aws_region(args.region)
    user_data = common.user_data_from_args(loaded, args)
    ami = args.ami
    if (ami is None) == (args.channel is None):
        raise UserError("launch: give --ami or --channel (exactly one)")
    if args.channel is not None:
        from builder.release import channels

        region = args.region or aws.image_regions(loaded.spec)[0]
        store = channels.SsmStore([region])
        ami = channels.resolve(store, loaded.spec.name, args.channel, region).build
    common.progress(f"launching {ami} and waiting for it to run")
    instance = aws.launch(
        loaded,
        ami,
        user_data,
        subnet=args.subnet,
        key_name=args.key_name,
        instance_profile=args.instance_profile,
        instance_type=args.instance_type,
        security_group_ids=args.security_group,
        region=args.region,
    )
    if args.json:
        print(json.dumps(instance.to_json(), indent=2))
    else:
        print(f"{instance.id} {instance.state} {instance.address or '(no address yet)'}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from builder.aws import client as aws
    from builder.release import channels

    name, regions = _spec_or_name(args.image, args.region)
    state = channels.SsmStore(regions).read(name)
    keep = channels.protected(state, args.channel_history)
    actions = aws.prune(name, args.keep, regions, dry_run=args.dry_run, protected=keep)
    if args.json:
        print(json.dumps([a.to_json() for a in actions], indent=2))
    elif actions:
        for action in actions:
            print(action.line())
    else:
        print(f"no AMIs of {name} in {', '.join(regions)}")
    return 0


def add_images(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``meshbake images``."""
    p = sub.add_parser("images", help="list the AMIs meshbake baked for an image")
    p.add_argument("image", metavar="SPEC|NAME", help="a spec file, or an image name with --region")
    p.add_argument("--region", action="append", default=[], help="region to look in (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable results")
    p.set_defaults(handler=cmd_images)


def add_launch(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``meshbake launch``."""
    p = sub.add_parser("launch", help="launch one instance of a baked AMI with its user data")
    p.add_argument("spec", type=Path)
    p.add_argument("--ami", help="the AMI id, e.g. from 'meshbake images'")
    p.add_argument("--channel", help="launch what this release channel points to (not --ami)")
    common.add_secret_args(p)
    p.add_argument("--subnet", help="subnet id (default: targets.aws.subnet_id, else default VPC)")
    p.add_argument("--key-name", help="EC2 key pair for SSH")
    p.add_argument(
        "--instance-profile",
        help="instance profile name or ARN (needed for the ssm/secretsmanager token route)",
    )
    p.add_argument("--instance-type", help="default: targets.aws.instance_type")
    p.add_argument(
        "--security-group", action="append", default=[], help="security group id (repeatable)"
    )
    p.add_argument("--region", help="default: targets.aws.region")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(handler=cmd_launch)


def add_prune(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``meshbake prune``."""
    p = sub.add_parser("prune", help="remove old AMIs of an image and their snapshots")
    p.add_argument("image", metavar="NAME|SPEC", help="a spec file, or an image name with --region")
    p.add_argument("--keep", type=int, required=True, help="newest AMIs to keep per region")
    p.add_argument("--dry-run", action="store_true", help="list the actions, change nothing")
    p.add_argument(
        "--channel-history",
        type=int,
        metavar="N",
        help="also keep what each channel pointed to in its last N moves (default: all)",
    )
    p.add_argument("--region", action="append", default=[], help="region to prune in (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable results")
    p.set_defaults(handler=cmd_prune)
