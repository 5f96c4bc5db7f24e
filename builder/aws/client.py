"""AWS through boto3: find the source AMI, list, launch and prune meshbake AMIs.

Packer's amazon-ebs builder bakes, copies and shares the AMI; this module covers the
rest. Every function takes the frozen spec model (or plain names), never raw dicts,
and every AWS failure a user can fix comes out as a one-line ``UserError``:

>>> from builder.spec.model import load_spec
>>> loaded = load_spec("images/web.yaml")
>>> image_regions(loaded.spec)
('us-east-1',)
>>> resolve_source_ami(loaded.spec).name  # doctest: +SKIP
'debian-12-amd64-20240717-1811'

boto3 reads ``AWS_ENDPOINT_URL`` (the tests point it at a moto server on loopback),
the usual credential chain and the region we pass per call.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    SSOTokenLoadError,
    TokenRetrievalError,
    UnauthorizedSSOTokenError,
    WaiterError,
)

from builder.errors import UserError

# Tag names come from one module, so what the template writes is what we read.
from builder.render import cloudconfig
from builder.render import tags as tag
from builder.render.hcl import AMI_DEFAULTS, ami_name_pattern, image_tags
from builder.spec import boundary
from builder.spec.model import Arch, AwsTarget, ImageSpec, LoadedSpec
from builder.tools.packer import PackerVersion

if TYPE_CHECKING:
    from mypy_boto3_ec2.client import EC2Client
    from mypy_boto3_ec2.type_defs import (
        FilterTypeDef,
        ImageTypeDef,
        InstanceTypeDef,
        RunInstancesRequestTypeDef,
        TagTypeDef,
    )
    from mypy_boto3_ssm.client import SSMClient

log = logging.getLogger(__name__)

#: The template's ami_name: ``<image>-<spec hash, 12>-<YYYYMMDD-hhmmss>``.
_BAKED_NAME = re.compile(r"^(?P<image>[a-z][a-z0-9-]*)-[0-9a-f]{12}-\d{8}-\d{6}$")

#: Instance states in which an AMI still backs an instance that may start again.
IN_USE_STATES = ("pending", "running", "stopping", "stopped")

DEFAULT_MAX_ATTEMPTS = 8

_AUTH_CODES = frozenset(
    {
        "AuthFailure",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
    }
)
_EXPIRED_CODES = frozenset({"ExpiredToken", "ExpiredTokenException", "RequestExpired"})
_DENIED_CODES = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"})
# The codes botocore's standard retry mode treats as throttling; seeing one here means
# every retry was spent.
_THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "SlowDown",
        "EC2ThrottledException",
        "BandwidthLimitExceeded",
        "PriorRequestNotComplete",
    }
)


# --- session and clients ---------------------------------------------------------------


class Aws:
    """One boto3 session with meshbake's retry policy, handing out one client per region.

    ``max_attempts`` counts the first call: throttled or failing calls are retried
    with botocore's *standard* mode (exponential backoff with jitter). The waiter
    settings bound how long ``launch`` waits for ``running``.

    >>> Aws(max_attempts=3).ec2("eu-west-1").meta.region_name
    'eu-west-1'
    """

    def __init__(
        self,
        *,
        session: boto3.Session | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        endpoint_url: str | None = None,
        waiter_delay: int = 5,
        waiter_max_attempts: int = 60,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts counts the first call, so it is at least 1")
        if session is None:
            with translated("reading the AWS configuration"):
                session = boto3.Session()
        self.session = session
        self.max_attempts = max_attempts
        # None lets botocore apply AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_EC2 itself.
        self.endpoint_url = endpoint_url
        self.waiter_delay = waiter_delay
        self.waiter_max_attempts = waiter_max_attempts
        self._ec2: dict[str, EC2Client] = {}
        self._ssm: dict[str, SSMClient] = {}

    def config(self) -> Config:
        # total_max_attempts counts the first call; botocore's "max_attempts" key would
        # count only the retries (one more call than it reads like).
        return Config(retries={"mode": "standard", "total_max_attempts": self.max_attempts})

    def ec2(self, region: str) -> EC2Client:
        """The EC2 client for ``region`` (cached, so event hooks stay registered)."""
        if region not in self._ec2:
            with translated("connecting to EC2", region):
                self._ec2[region] = self.session.client(
                    "ec2", region_name=region, endpoint_url=self.endpoint_url, config=self.config()
                )
        return self._ec2[region]

    def ssm(self, region: str) -> SSMClient:
        """The SSM client for ``region`` (release channels live in Parameter Store)."""
        if region not in self._ssm:
            with translated("connecting to SSM", region):
                self._ssm[region] = self.session.client(
                    "ssm", region_name=region, endpoint_url=self.endpoint_url, config=self.config()
                )
        return self._ssm[region]


@contextmanager
def translated(action: str, region: str | None = None) -> Iterator[None]:
    """Turn botocore failures inside the block into one-line ``UserError``s.

    >>> with translated("listing images", "us-east-1"):
    ...     pass
    """
    where = f" in {region}" if region else ""
    try:
        yield
    except (NoCredentialsError, PartialCredentialsError):
        raise UserError(
            f"{action}{where}: no AWS credentials found: set AWS_PROFILE, or"
            " AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where an instance role"
            " or SSO session provides them"
        ) from None
    except (
        CredentialRetrievalError,
        ProfileNotFound,
        SSOTokenLoadError,
        TokenRetrievalError,
        UnauthorizedSSOTokenError,
    ) as exc:
        raise UserError(
            f"{action}{where}: cannot get AWS credentials: {_one_line(str(exc))}: fix the"
            " profile, or log in again (aws sso login)"
        ) from None
    except (
        EndpointConnectionError,
        ConnectTimeoutError,
        ReadTimeoutError,
        ConnectionClosedError,
    ) as exc:
        raise UserError(
            f"{action}{where}: cannot reach AWS ({_one_line(str(exc))}): check the network,"
            " the proxy settings and AWS_ENDPOINT_URL"
        ) from None
    except ClientError as exc:
        raise UserError(_client_error_message(action, where, exc)) from None
    except WaiterError as exc:
        raise UserError(f"{action}{where}: {_one_line(str(exc))}") from None
    # Anything else from botocore (a ParamValidationError, say) is a meshbake bug.


def _client_error_message(action: str, where: str, exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    code = error.get("Code", "Unknown")
    message = _one_line(error.get("Message", ""))
    operation = exc.operation_name
    if code in _AUTH_CODES:
        return (
            f"{action}{where}: AWS rejected the credentials ({code}): check AWS_PROFILE or"
            " AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, e.g. with 'aws sts get-caller-identity'"
        )
    if code in _EXPIRED_CODES:
        return f"{action}{where}: the AWS credentials have expired ({code}): refresh them"
    if code in _DENIED_CODES:
        return (
            f"{action}{where}: the credentials are not allowed to call {operation} ({code}):"
            f" grant ec2:{operation} to this identity (see IAM permissions in the README)"
        )
    if code in _THROTTLE_CODES:
        attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
        return (
            f"{action}{where}: AWS kept throttling {operation} ({code}) after {attempts}"
            " attempts: try again later, or run fewer meshbake commands against this account"
            " at once"
        )
    # EC2 error messages can carry an encoded authorization blob; keep the line short.
    return f"{action}{where}: {operation} failed: {code}: {message[:300]}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- spec-derived facts -------------------------------------------------------------


def _aws_target(spec: ImageSpec) -> AwsTarget:
    if spec.targets.aws is None:
        raise UserError(f"image {spec.name}: the spec has no targets.aws section")
    return spec.targets.aws


def image_regions(spec: ImageSpec) -> tuple[str, ...]:
    """The build region first, then the regions the AMI is copied to (no repeats)."""
    aws = _aws_target(spec)
    return tuple(dict.fromkeys((aws.region, *aws.ami_regions)))


@dataclass(frozen=True)
class AmiFilter:
    """The source AMI filter, exactly as the Packer template's ``source_ami_filter``.

    >>> from builder.spec.model import load_spec
    >>> source_filter(load_spec("images/web.yaml").spec).name
    'debian-12-amd64-*'
    """

    owners: tuple[str, ...]
    name: str
    architecture: str

    def filters(self) -> list[FilterTypeDef]:
        return [
            {"Name": "name", "Values": [self.name]},
            {"Name": "architecture", "Values": [self.architecture]},
            {"Name": "virtualization-type", "Values": ["hvm"]},
            {"Name": "root-device-type", "Values": ["ebs"]},
        ]

    def describe(self) -> str:
        owners = ", ".join(self.owners)
        return f"owners {owners}, name {self.name!r}, {self.architecture}, hvm, ebs, most recent"


def source_filter(spec: ImageSpec, arch: Arch | None = None) -> AmiFilter:
    """The owners and name pattern from ``targets.aws.source_ami`` or the base's default,
    for ``arch`` (default: the target's first architecture).

    >>> from builder.spec.model import load_spec
    >>> source_filter(load_spec("images/web.yaml").spec, Arch.ARM64).describe()
    "owners 136693071363, name 'debian-12-arm64-*', arm64, hvm, ebs, most recent"
    """
    aws = _aws_target(spec)
    arch = arch or aws.arches[0]
    owner, _pattern, _user = AMI_DEFAULTS[spec.base]
    return AmiFilter(
        owners=aws.source_ami.owners or (owner,),
        name=aws.source_ami.name or ami_name_pattern(spec.base, arch),
        architecture=arch.ec2,
    )


# --- source AMI ------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedAmi:
    """The base AMI a bake starts from, as resolved in AWS (the spec's query that
    finds it is ``spec.model.SourceAmi``)."""

    id: str
    name: str
    creation_date: datetime
    owner: str


def _created(image: ImageTypeDef) -> datetime:
    # EC2 returns CreationDate as an ISO 8601 string, not a timestamp.
    raw = image.get("CreationDate", "")
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        return datetime.min


def _describe_images(
    ec2: EC2Client, *, owners: Sequence[str], filters: Sequence[FilterTypeDef]
) -> list[ImageTypeDef]:
    images: list[ImageTypeDef] = []
    pages = ec2.get_paginator("describe_images").paginate(
        Owners=list(owners), Filters=list(filters)
    )
    for page in pages:
        images += page.get("Images", [])
    return images


def resolve_source_ami(
    spec: ImageSpec, *, arch: Arch | None = None, aws: Aws | None = None
) -> ResolvedAmi:
    """The most recent AMI matching the template's source filter for ``arch`` (default:
    the target's first architecture), in the build region.

    >>> resolve_source_ami(spec).id  # doctest: +SKIP
    'ami-0123456789abcdef0'
    """
    aws = aws or Aws()
    target = _aws_target(spec)
    wanted = source_filter(spec, arch)
    with translated("looking up the source AMI", target.region):
        images = _describe_images(
            aws.ec2(target.region), owners=wanted.owners, filters=wanted.filters()
        )
    if not images:
        raise UserError(
            f"no source AMI in {target.region} matches {wanted.describe()}: fix"
            " targets.aws.source_ami (owners, name, architecture) or check that this"
            " account can see that AMI in that region"
        )
    newest = max(images, key=_created)
    return ResolvedAmi(
        id=newest["ImageId"],
        name=newest.get("Name", ""),
        creation_date=_created(newest),
        owner=newest.get("OwnerId", ""),
    )


# --- listing ------------------------------------------------------------------------


@dataclass(frozen=True)
class AmiRecord:
    """One AMI meshbake baked, in one region."""

    id: str
    region: str
    name: str
    creation_date: datetime
    state: str
    tags: Mapping[str, str]
    snapshot_ids: tuple[str, ...]
    #: Debian's name for the AMI's architecture (EC2's ``Architecture``).
    arch: str = Arch.AMD64.value

    @property
    def spec_hash(self) -> str:
        return self.tags.get(tag.SPEC_HASH, "")

    @property
    def consul(self) -> str:
        return self.tags.get(tag.CONSUL, "")

    @property
    def envoy(self) -> str:
        return self.tags.get(tag.ENVOY, "")

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "region": self.region,
            "name": self.name,
            "creation_date": self.creation_date.isoformat(),
            "state": self.state,
            "arch": self.arch,
            "spec_hash": self.spec_hash,
            "consul": self.consul,
            "envoy": self.envoy,
            "tags": dict(self.tags),
            "snapshot_ids": list(self.snapshot_ids),
        }


def _tags(tags: Iterable[TagTypeDef]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in tags if "Key" in t and "Value" in t}


def _record(image: ImageTypeDef, region: str) -> AmiRecord:
    snapshots = tuple(
        m["Ebs"]["SnapshotId"]
        for m in image.get("BlockDeviceMappings", [])
        if "Ebs" in m and "SnapshotId" in m["Ebs"]
    )
    return AmiRecord(
        id=image["ImageId"],
        region=region,
        name=image.get("Name", ""),
        creation_date=_created(image),
        state=image.get("State", ""),
        tags=_tags(image.get("Tags", [])),
        snapshot_ids=snapshots,
        arch=_ami_arch(image).value,
    )


def list_images(name: str, regions: Sequence[str], *, aws: Aws | None = None) -> list[AmiRecord]:
    """This account's AMIs tagged ``meshbake:image=<name>``, per region, newest first.

    >>> [r.id for r in list_images("web", ["us-east-1"])]  # doctest: +SKIP
    ['ami-0b2...', 'ami-07f...']
    """
    aws = aws or Aws()
    records: list[AmiRecord] = []
    for region in dict.fromkeys(regions):
        with translated(f"listing the AMIs of {name}", region):
            images = _describe_images(
                aws.ec2(region),
                owners=["self"],
                filters=[{"Name": f"tag:{tag.IMAGE}", "Values": [name]}],
            )
        found = [_record(i, region) for i in images]
        # Only what carries our tag, even if a filter ever matched more.
        found = [r for r in found if r.tags.get(tag.IMAGE) == name]
        records += sorted(found, key=lambda r: (r.creation_date, r.name), reverse=True)
    return records


# --- launching ----------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """A launched instance once it is running."""

    id: str
    region: str
    image_id: str
    state: str
    private_ip: str | None
    public_ip: str | None

    @property
    def address(self) -> str | None:
        return self.public_ip or self.private_ip

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "region": self.region,
            "image_id": self.image_id,
            "state": self.state,
            "private_ip": self.private_ip,
            "public_ip": self.public_ip,
            "address": self.address,
        }


def _instance(raw: InstanceTypeDef, region: str) -> Instance:
    return Instance(
        id=raw["InstanceId"],
        region=region,
        image_id=raw.get("ImageId", ""),
        state=raw.get("State", {}).get("Name", "unknown"),
        private_ip=raw.get("PrivateIpAddress"),
        public_ip=raw.get("PublicIpAddress"),
    )


def _ami_arch(image: ImageTypeDef) -> Arch:
    """The AMI's architecture in Debian's names (EC2 says ``x86_64`` or ``arm64``)."""
    return Arch.ARM64 if image.get("Architecture") == Arch.ARM64.ec2 else Arch.AMD64


def launch(
    loaded: LoadedSpec,
    ami: str,
    user_data: str,
    *,
    subnet: str | None = None,
    key_name: str | None = None,
    instance_profile: str | None = None,
    instance_type: str | None = None,
    security_group_ids: Sequence[str] = (),
    region: str | None = None,
    aws: Aws | None = None,
) -> Instance:
    """Start one instance of ``ami`` with ``user_data``, IMDSv2 required; wait for running.

    The user data is size-checked before any API call. ``ami`` must be an AMI meshbake
    baked for this image (its ``meshbake:image`` tag or, for an AMI shared from another
    account, whose tags are not visible, its name), since the user data only makes
    sense to that image's first-boot script. ``instance_profile`` is a name or an ARN.

    >>> launch(loaded, "ami-0123", user_data, subnet="subnet-1").state  # doctest: +SKIP
    'running'
    """
    cloudconfig.check_size(user_data, [])  # refuses over 16 KiB; the CLI shows the notes
    spec = loaded.spec
    target = _aws_target(spec)
    region = region or target.region
    aws = aws or Aws()
    ec2 = aws.ec2(region)
    with translated(f"checking {ami}", region):
        images = ec2.describe_images(ImageIds=[ami]).get("Images", [])
    if not images:
        raise UserError(f"{ami} does not exist in {region} (or this account cannot see it)")
    baked_for = _tags(images[0].get("Tags", [])).get(tag.IMAGE)
    # Tags do not cross accounts: an AMI shared from a build account shows none here,
    # but its name still follows the template's ami_name.
    named_for = _BAKED_NAME.match(images[0].get("Name", ""))
    if baked_for is None and named_for:
        baked_for = named_for["image"]
    if baked_for != spec.name:
        what = f"was baked for image {baked_for}" if baked_for else "was not baked by meshbake"
        raise UserError(
            f"{ami} {what}, so this spec's first-boot user data does not fit it: pick an AMI"
            f" from 'meshbake images {spec.name}'"
        )
    revoked = _tags(images[0].get("Tags", [])).get(tag.REVOKED)
    if revoked is not None:
        raise UserError(f"{ami} in {region} is revoked ({revoked}); it is never launched")
    tags: list[TagTypeDef] = [
        {"Key": "Name", "Value": spec.name},
        {"Key": tag.IMAGE, "Value": spec.name},
        {"Key": tag.SPEC_HASH, "Value": loaded.digest},
    ]
    request: RunInstancesRequestTypeDef = {
        "ImageId": ami,
        "MinCount": 1,
        "MaxCount": 1,
        "InstanceType": instance_type or target.instance_type_for(_ami_arch(images[0])),  # type: ignore[typeddict-item]
        "UserData": user_data,  # botocore base64-encodes it
        "MetadataOptions": {
            "HttpTokens": "required",
            "HttpPutResponseHopLimit": 1,
            "HttpEndpoint": "enabled",
        },
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tags},
            {"ResourceType": "volume", "Tags": tags},
        ],
    }
    subnet = subnet or target.subnet_id
    if subnet:
        request["SubnetId"] = subnet
    if key_name:
        request["KeyName"] = key_name
    if security_group_ids:
        request["SecurityGroupIds"] = list(security_group_ids)
    if instance_profile:
        if instance_profile.startswith("arn:"):
            request["IamInstanceProfile"] = {"Arn": instance_profile}
        else:
            request["IamInstanceProfile"] = {"Name": instance_profile}
    with translated(f"launching {ami}", region):
        started = ec2.run_instances(**request)["Instances"][0]
    instance_id = started["InstanceId"]
    log.info("launched %s from %s in %s", instance_id, ami, region)
    waiter = ec2.get_waiter("instance_running")
    with translated(f"waiting for {instance_id} to run (it is left as it is)", region):
        waiter.wait(
            InstanceIds=[instance_id],
            WaiterConfig={"Delay": aws.waiter_delay, "MaxAttempts": aws.waiter_max_attempts},
        )
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return _instance(reservations[0]["Instances"][0], region)


# --- pruning ------------------------------------------------------------------------


class PruneStep(StrEnum):
    KEEP = "keep"
    SKIP = "skip"
    DEREGISTER = "deregister"
    DELETE_SNAPSHOT = "delete-snapshot"


@dataclass(frozen=True)
class PruneAction:
    """One decision of ``prune``: kept, skipped (and why), or a deletion step."""

    step: PruneStep
    region: str
    image_id: str
    image_name: str
    snapshot_id: str | None = None
    reason: str = ""
    done: bool = False

    def line(self) -> str:
        """A readable line; dry-run steps read "would ...".

        >>> PruneAction(PruneStep.DEREGISTER, "us-east-1", "ami-1", "web-x").line()
        'would deregister ami-1 (web-x) in us-east-1'
        """
        target = self.snapshot_id or f"{self.image_id} ({self.image_name})"
        where = f" in {self.region}"
        why = f": {self.reason}" if self.reason else ""
        if self.step is PruneStep.KEEP:
            return f"keep {target}{where}{why}"
        if self.step is PruneStep.SKIP:
            return f"skip {target}{where}{why}"
        verb = "deregister" if self.step is PruneStep.DEREGISTER else "delete snapshot"
        if self.step is PruneStep.DELETE_SNAPSHOT:
            why = why or f" (of {self.image_id})"
        prefix = "" if self.done else "would "
        past = {"deregister": "deregistered", "delete snapshot": "deleted snapshot"}
        return f"{past[verb] if self.done else prefix + verb} {target}{where}{why}"

    def to_json(self) -> dict[str, object]:
        return {
            "step": self.step.value,
            "region": self.region,
            "image_id": self.image_id,
            "image_name": self.image_name,
            "snapshot_id": self.snapshot_id,
            "reason": self.reason,
            "done": self.done,
        }


def _instances_using(ec2: EC2Client, image_ids: Sequence[str]) -> dict[str, list[str]]:
    """AMI id -> ids of instances in ``IN_USE_STATES`` launched from it."""
    using: dict[str, list[str]] = {}
    ids = list(image_ids)
    for start in range(0, len(ids), 195):  # a filter takes at most 200 values
        pages = ec2.get_paginator("describe_instances").paginate(
            Filters=[
                {"Name": "image-id", "Values": ids[start : start + 195]},
                {"Name": "instance-state-name", "Values": list(IN_USE_STATES)},
            ]
        )
        for page in pages:
            for reservation in page.get("Reservations", []):
                for instance in reservation.get("Instances", []):
                    if instance.get("State", {}).get("Name") in IN_USE_STATES:
                        using.setdefault(instance.get("ImageId", ""), []).append(
                            instance["InstanceId"]
                        )
    return using


def prune(
    name: str,
    keep: int,
    regions: Sequence[str],
    *,
    dry_run: bool = False,
    protected: Mapping[str, str] | None = None,
    aws: Aws | None = None,
) -> list[PruneAction]:
    """Per region and architecture, keep the ``keep`` newest available AMIs of ``name``;
    remove the rest (so a newer amd64 build never prunes the last arm64 AMIs).

    Only AMIs tagged ``meshbake:image=<name>`` are considered, so nothing meshbake
    did not bake is ever touched. An AMI still behind a pending, running, stopping or
    stopped instance is skipped, and so is one not ``available`` (a build may be
    writing it). Each removal deregisters the AMI first, then deletes its EBS
    snapshots (EC2 refuses to delete the snapshot of a registered AMI). ``dry_run``
    returns the same actions without doing them. ``protected`` maps AMI ids that must
    stay (a release channel points to them, or did) to the reason; they are kept
    whatever their age.

    >>> [a.line() for a in prune("web", 2, ["us-east-1"], dry_run=True)]  # doctest: +SKIP
    ['keep ami-3 (web-...) in us-east-1: one of the 2 newest', 'would deregister ami-1 ...']
    """
    if keep < 1:
        raise UserError("prune: --keep must be at least 1, so the newest image survives")
    aws = aws or Aws()
    actions: list[PruneAction] = []
    records = list_images(name, regions, aws=aws)
    for region in dict.fromkeys(regions):
        ec2 = aws.ec2(region)
        here = [r for r in records if r.region == region]
        with translated(f"finding instances that use {name} AMIs", region):
            using = _instances_using(ec2, [r.id for r in here]) if here else {}
        kept: dict[str, int] = {}
        for record in here:  # newest first
            base = PruneAction(PruneStep.KEEP, region, record.id, record.name)
            if record.state != "available":
                actions.append(_with(base, PruneStep.SKIP, f"state is {record.state}"))
                continue
            if kept.get(record.arch, 0) < keep:
                kept[record.arch] = kept.get(record.arch, 0) + 1
                actions.append(_with(base, PruneStep.KEEP, f"one of the {keep} newest"))
                continue
            if protected and record.id in protected:
                actions.append(_with(base, PruneStep.KEEP, protected[record.id]))
                continue
            if record.id in using:
                users = ", ".join(sorted(using[record.id]))
                actions.append(_with(base, PruneStep.SKIP, f"in use by {users}"))
                continue
            actions += _remove(ec2, record, dry_run)
    return actions


def _with(base: PruneAction, step: PruneStep, reason: str) -> PruneAction:
    return PruneAction(step, base.region, base.image_id, base.image_name, reason=reason)


def _remove(ec2: EC2Client, record: AmiRecord, dry_run: bool) -> list[PruneAction]:
    region = record.region
    done = not dry_run
    if done:
        with translated(f"deregistering {record.id}", region):
            ec2.deregister_image(ImageId=record.id)
        log.info("deregistered %s in %s", record.id, region)
    steps = [PruneAction(PruneStep.DEREGISTER, region, record.id, record.name, done=done)]
    for snapshot in record.snapshot_ids:
        reason = ""
        ok = done
        if done:
            try:
                with translated(f"deleting snapshot {snapshot} of {record.id}", region):
                    ec2.delete_snapshot(SnapshotId=snapshot)
            except UserError as exc:
                # The AMI is gone already; report the leftover instead of stopping halfway.
                ok, reason = False, f"not deleted: {exc}"
        step = PruneStep.DELETE_SNAPSHOT if ok or dry_run else PruneStep.SKIP
        steps.append(PruneAction(step, region, record.id, record.name, snapshot, reason, ok))
    return steps


# --- after a build -----------------------------------------------------------------------


def record_amis(packer_manifest: Path) -> dict[str, str]:
    """Region -> AMI id from the manifest post-processor's last amazon-ebs build (of a
    template with one AMI source; see ``record_amis_by_source`` for several).

    >>> record_amis(Path("packer-manifest.json"))  # doctest: +SKIP
    {'us-east-1': 'ami-123', 'eu-west-1': 'ami-456'}
    """
    by_source = record_amis_by_source(packer_manifest)
    return by_source[list(by_source)[-1]]


def record_amis_by_source(packer_manifest: Path) -> dict[str, dict[str, str]]:
    """Packer source name -> region -> AMI id, from the last Packer run's amazon-ebs
    builds (one per architecture: ``web``, ``web-arm64``).

    >>> record_amis_by_source(Path("packer-manifest.json"))  # doctest: +SKIP
    {'web': {'us-east-1': 'ami-123'}, 'web-arm64': {'us-east-1': 'ami-456'}}
    """
    manifest = boundary.read_json_object(packer_manifest, "Packer manifest")
    builds = manifest.get("builds") if isinstance(manifest, dict) else None
    if not isinstance(builds, list):
        raise UserError(f"{packer_manifest}: not a Packer manifest (no builds list)")
    last_run = manifest.get("last_run_uuid")
    found: dict[str, dict[str, str]] = {}
    for build in builds:
        if not isinstance(build, dict) or build.get("builder_type") != "amazon-ebs":
            continue
        if last_run and build.get("packer_run_uuid") != last_run:
            continue
        amis: dict[str, str] = {}
        for part in str(build.get("artifact_id", "")).split(","):
            region, sep, ami = part.strip().partition(":")
            if not sep or not ami.startswith("ami-"):
                raise UserError(
                    f"{packer_manifest}: artifact_id part {part!r} is not REGION:ami-ID"
                )
            amis[region] = ami
        found[str(build.get("name", ""))] = amis
    if not found:
        raise UserError(f"{packer_manifest}: no amazon-ebs artifact from the last Packer run")
    return found


def check_published(
    loaded: LoadedSpec, amis: Mapping[str, str], *, aws: Aws | None = None
) -> list[str]:
    """Problems with the AMIs a build reported (empty when all is well).

    Checks, per region, that the AMI exists, is available, carries this spec's
    ``meshbake:image`` and ``meshbake:spec-hash`` tags, and is shared with every
    account, organization and OU in ``targets.aws.share``.

    >>> check_published(loaded, {"us-east-1": "ami-123"})  # doctest: +SKIP
    []
    """
    aws = aws or Aws()
    share = _aws_target(loaded.spec).share
    problems: list[str] = []
    for region in image_regions(loaded.spec):
        ami = amis.get(region)
        if ami is None:
            problems.append(f"{region}: the build reported no AMI")
            continue
        ec2 = aws.ec2(region)
        with translated(f"checking {ami}", region):
            images = ec2.describe_images(ImageIds=[ami]).get("Images", [])
        if not images:
            problems.append(f"{region}: {ami} does not exist")
            continue
        record = _record(images[0], region)
        if record.state != "available":
            problems.append(f"{region}: {ami} is {record.state}, not available")
        if record.tags.get(tag.IMAGE) != loaded.spec.name:
            problems.append(f"{region}: {ami} lacks the tag {tag.IMAGE}={loaded.spec.name}")
        if record.spec_hash != loaded.digest:
            problems.append(f"{region}: {ami} has a {tag.SPEC_HASH} other than this spec's")
        if share.accounts or share.orgs or share.ous:
            with translated(f"reading the launch permissions of {ami}", region):
                granted = ec2.describe_image_attribute(ImageId=ami, Attribute="launchPermission")
            seen: set[str] = set()
            for permission in granted.get("LaunchPermissions", []):
                seen.add(permission.get("UserId", ""))
                seen.add(permission.get("OrganizationArn", ""))
                seen.add(permission.get("OrganizationalUnitArn", ""))
            for who in (*share.accounts, *share.orgs, *share.ous):
                if who not in seen:
                    problems.append(f"{region}: {ami} is not shared with {who}")
    return problems


# --- the dry-run plan ----------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    label: str
    value: str


def aws_dry_run(
    loaded: LoadedSpec, *, packer: PackerVersion | None = None, aws: Aws | None = None
) -> str:
    """A readable plan of ``build --target aws``; the only AWS call is the AMI lookup.

    ``packer`` says whether IMDSv2 can be set on the build instance (Packer 1.7+ with
    the amazon plugin); without it both cases are described.

    >>> print(aws_dry_run(load_spec("images/web.yaml")))  # doctest: +SKIP
    aws build plan for web (images/web.yaml, spec hash 3f2a...):
      source AMI      ami-0123 debian-12-amd64-20240717-1811 (owner 136693071363, ...)
    """
    spec = loaded.spec
    target = _aws_target(spec)
    per_arch: list[_Row] = []
    for arch in target.arches:
        wanted = source_filter(spec, arch)
        source = resolve_source_ami(spec, arch=arch, aws=aws)
        per_arch += [
            _Row(
                f"source AMI ({arch.value})",
                f"{source.id} {source.name} (owner {source.owner},"
                f" created {source.creation_date.isoformat()})",
            ),
            _Row(f"source filter ({arch.value})", wanted.describe()),
            _Row(f"instance type ({arch.value})", target.instance_type_for(arch)),
        ]
    _owner, _pattern, default_user = AMI_DEFAULTS[spec.base]
    share = target.share
    shared = [
        *(f"account {a}" for a in share.accounts),
        *(f"organization {o}" for o in share.orgs),
        *(f"OU {u}" for u in share.ous),
    ]
    if packer is None:
        imds = (
            "required (HttpTokens=required, hop limit 1) on the build instance and the AMI"
            " with Packer 1.7+; Packer 1.6 cannot set it on the build, instances from"
            " 'meshbake launch' always require it"
        )
    elif packer.supports_plugins:
        imds = "required on the build instance (hop limit 1); the AMI is marked imds_support v2.0"
    else:
        imds = (
            f"not settable with Packer {packer} on the build instance; instances from"
            " 'meshbake launch' require it (HttpTokens=required, hop limit 1)"
        )
    fixed = {k: v for k, v in image_tags(loaded).items() if k != tag.BUILD_TIME}
    kms = f"KMS key {target.kms_key_id}" if target.kms_key_id else "the account's default EBS key"
    rows = [
        _Row("architectures", ", ".join(a.value for a in target.arches) + " (one AMI each)"),
        *per_arch,
        _Row("build region", target.region),
        _Row("copies to", ", ".join(target.ami_regions) or "no other region"),
        _Row("shared with", ", ".join(shared) or "nobody (private to this account)"),
        _Row("subnet", target.subnet_id or "the default VPC's"),
        _Row("ssh user", target.ssh_username or default_user),
        _Row(
            "root volume",
            f"{target.volume_size_gib} GiB gp3, encrypted, deleted with the build instance",
        ),
        _Row("AMI encryption", f"encrypted (encrypt_boot) with {kms}"),
        _Row("IMDSv2", imds),
        _Row("AMI name", f"{spec.name}-{loaded.digest[:12]}-<YYYYMMDD-hhmmss>"),
        _Row("tags", ", ".join([*(f"{k}={v}" for k, v in fixed.items()), tag.BUILD_TIME])),
    ]
    width = max(len(r.label) for r in rows) + 2
    lines = [f"aws build plan for {spec.name} ({loaded.path}, spec hash {loaded.digest[:12]}):"]
    lines += [f"  {r.label.ljust(width)}{r.value}" for r in rows]
    return "\n".join(lines) + "\n"
