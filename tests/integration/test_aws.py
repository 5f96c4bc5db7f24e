"""builder.aws, the AWS subcommands and meshbake-fetch-token against a moto server.

moto runs as a real HTTP server on 127.0.0.1 (``python -m moto.server``), started once
per session; every test resets its state. boto3 finds it through AWS_ENDPOINT_URL,
so the code under test is the code users run. Nothing here talks to AWS itself:
the metadata service is disabled for botocore, and meshbake-fetch-token gets a fake
IMDS on 127.0.0.1. Both doubles live in tests/fixtures/aws.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import boto3
import botocore.awsrequest
import hcl2
import pytest
import yaml

from builder.aws import client as aws
from builder.bake.gates import shellcheck
from builder.cli.main import main
from builder.errors import SpecError, UserError
from builder.render import cloudconfig
from builder.render.hcl import image_tags, packer_files
from builder.spec.model import Arch, LoadedSpec, parse_spec
from builder.tools.packer import PackerVersion
from tests.fixtures.aws import DEBIAN_OWNER, HOME, NEWEST_DEBIAN, FakeImds, Moto, free_port
from tests.paths import REPO

pytestmark = pytest.mark.integration

WEB_SPEC = REPO / "images" / "web.yaml"
FETCH_TOKEN = REPO / "builder" / "image" / "scripts" / "meshbake-fetch-token"

ACCOUNT = "123456789012"  # moto's default account
SHARE_WITH = "210987654321"
COPY = "eu-west-1"
TOKEN = "6f1c3d2e-8a4b-4c5d-9e0f-1a2b3c4d5e6f"
SERVICE_TOKEN = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"


def ec2(region: str = HOME) -> Any:
    return boto3.client("ec2", region_name=region)


def quick() -> aws.Aws:
    return aws.Aws(max_attempts=3, waiter_delay=1, waiter_max_attempts=10)


def spec_variant(**aws_target: Any) -> LoadedSpec:
    """images/web.yaml with its aws target changed (parsed as if it lived in images/)."""
    data = yaml.safe_load(WEB_SPEC.read_text())
    data["targets"]["aws"].update(aws_target)
    return parse_spec(yaml.safe_dump(data), WEB_SPEC)


@pytest.fixture
def web() -> LoadedSpec:
    return spec_variant()


# --- seeding AMIs the way Packer leaves them ------------------------------------------


def _next_second() -> None:
    """moto stamps AMIs to the second; wait so the next one is strictly newer."""
    now = time.time()
    time.sleep(1.02 - (now - int(now)))


def tag(client: Any, resource: str, tags: dict[str, str]) -> None:
    client.create_tags(Resources=[resource], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])


def snapshots_of(client: Any, image_id: str) -> list[str]:
    image = client.describe_images(ImageIds=[image_id])["Images"][0]
    return [m["Ebs"]["SnapshotId"] for m in image["BlockDeviceMappings"] if "Ebs" in m]


def bake(loaded: LoadedSpec, stamp: str, *, copy_to: str | None = None) -> dict[str, str]:
    """Register an AMI tagged as Packer tags a meshbake build, optionally copied."""
    tags = image_tags(loaded) | {"meshbake:build-time": stamp}
    name = f"{loaded.spec.name}-{loaded.digest[:12]}-{stamp}"
    home = ec2(HOME)
    ami = home.register_image(Name=name, RootDeviceName="/dev/xvda")["ImageId"]
    tag(home, ami, tags)
    for snapshot in snapshots_of(home, ami):
        tag(home, snapshot, tags)
    amis = {HOME: ami}
    if copy_to:
        there = ec2(copy_to)
        copy = there.copy_image(SourceImageId=ami, SourceRegion=HOME, Name=name)["ImageId"]
        tag(there, copy, tags)  # CopyImage does not carry tags over; Packer re-tags
        amis[copy_to] = copy
    return amis


# --- source AMI ----------------------------------------------------------------------


def test_source_filter_is_the_templates(web: LoadedSpec) -> None:
    sources = hcl2.loads(packer_files(web, PackerVersion(1, 6, 6))["sources.pkr.hcl"])
    # python-hcl2 8 keeps the quotes of labels, keys and strings.
    (ebs,) = [s['"amazon-ebs"']['"web"'] for s in sources["source"] if '"amazon-ebs"' in s]
    block = ebs["source_ami_filter"][0]
    filters = {json.loads(k): json.loads(v) for k, v in block["filters"].items()}
    wanted = aws.source_filter(web.spec)
    assert {f["Name"]: f["Values"][0] for f in wanted.filters()} == filters
    assert list(wanted.owners) == [json.loads(o) for o in block["owners"]]
    assert block["most_recent"] is True


def test_resolve_source_ami_picks_newest_matching(moto: Moto, web: LoadedSpec) -> None:
    found = aws.resolve_source_ami(web.spec, aws=quick())
    assert found.id == NEWEST_DEBIAN
    assert found.name == "debian-12-amd64-20240717-1811"
    assert found.owner == DEBIAN_OWNER
    assert found.creation_date.isoformat().startswith("2024-07-17T18:11")


def test_no_matching_source_ami_says_what_to_fix(moto: Moto) -> None:
    loaded = spec_variant(source_ami={"owners": ["999999999999"]})
    with pytest.raises(UserError) as caught:
        aws.resolve_source_ami(loaded.spec, aws=quick())
    message = str(caught.value)
    assert "no source AMI in us-east-1" in message
    assert "999999999999" in message and "debian-12-amd64-*" in message
    assert "targets.aws.source_ami" in message
    assert "\n" not in message


# --- launch --------------------------------------------------------------------------


def test_launch_sends_user_data_imdsv2_and_tags(moto: Moto, web: LoadedSpec) -> None:
    ami = bake(web, "20250101-000000")[HOME]
    user_data = cloudconfig.first_boot_user_data({"MESHBAKE_AGENT_TOKEN": TOKEN})
    instance = aws.launch(web, ami, user_data, key_name=None, aws=quick())

    assert instance.state == "running"
    assert instance.id.startswith("i-") and instance.image_id == ami
    assert instance.private_ip
    client = ec2()
    sent = client.describe_instance_attribute(InstanceId=instance.id, Attribute="userData")
    assert base64.b64decode(sent["UserData"]["Value"]).decode() == user_data
    raw = client.describe_instances(InstanceIds=[instance.id])["Reservations"][0]["Instances"][0]
    options = raw["MetadataOptions"]
    assert options["HttpTokens"] == "required"
    assert options["HttpPutResponseHopLimit"] == 1
    assert options["HttpEndpoint"] == "enabled"
    tags = {t["Key"]: t["Value"] for t in raw["Tags"]}
    assert tags == {"Name": "web", "meshbake:image": "web", "meshbake:spec-hash": web.digest}


def test_launch_refuses_oversized_user_data_before_any_call(moto: Moto, web: LoadedSpec) -> None:
    session = boto3.Session()
    calls: list[str] = []
    session.events.register("before-send", lambda request, **_: calls.append(request.url))
    with pytest.raises(UserError, match="over EC2's limit of 16384 bytes"):
        aws.launch(web, "ami-12345678", "#" * (17 * 1024), aws=aws.Aws(session=session))
    assert calls == []


def test_launch_refuses_an_ami_meshbake_did_not_bake(moto: Moto, web: LoadedSpec) -> None:
    foreign = ec2().register_image(Name="someone-else", RootDeviceName="/dev/xvda")["ImageId"]
    with pytest.raises(UserError, match="was not baked by meshbake"):
        aws.launch(web, foreign, "#cloud-config\n", aws=quick())
    api = bake(spec_variant(), "20250101-000000")[HOME]
    tag(ec2(), api, {"meshbake:image": "api"})
    with pytest.raises(UserError, match="was baked for image api"):
        aws.launch(web, api, "#cloud-config\n", aws=quick())
    assert ec2().describe_instances()["Reservations"] == []


def test_launch_accepts_a_shared_ami_by_its_name(moto: Moto, web: LoadedSpec) -> None:
    """Tags stay in the owner's account; a shared AMI is known by the template's name."""
    name = f"web-{web.digest[:12]}-20250101-000000"
    shared = ec2().register_image(Name=name, RootDeviceName="/dev/xvda")["ImageId"]
    assert aws.launch(web, shared, "#cloud-config\n", aws=quick()).state == "running"


# --- what Packer publishes: tags, copies, sharing ---------------------------------------


def test_tags_copies_and_sharing_are_visible(moto: Moto) -> None:
    loaded = spec_variant(
        ami_regions=[COPY], share={"accounts": [SHARE_WITH]}, kms_key_id="alias/meshbake"
    )
    amis = bake(loaded, "20250101-000000", copy_to=COPY)
    records = aws.list_images("web", aws.image_regions(loaded.spec), aws=quick())
    assert {(r.region, r.id) for r in records} == set(amis.items())
    for record in records:
        assert record.spec_hash == loaded.digest
        assert (record.consul, record.envoy) == ("2.1.0", "1.38.3")
        assert record.tags["team"] == "platform"
        assert record.snapshot_ids and record.state == "available"

    # Not shared yet: the check names every region's AMI.
    problems = aws.check_published(loaded, amis, aws=quick())
    assert problems == [
        f"{HOME}: {amis[HOME]} is not shared with {SHARE_WITH}",
        f"{COPY}: {amis[COPY]} is not shared with {SHARE_WITH}",
    ]
    for region, ami in amis.items():
        ec2(region).modify_image_attribute(
            ImageId=ami, LaunchPermission={"Add": [{"UserId": SHARE_WITH}]}
        )
    assert aws.check_published(loaded, amis, aws=quick()) == []
    # A different spec (another hash) is told apart.
    other = spec_variant(
        ami_regions=[COPY],
        share={"accounts": [SHARE_WITH]},
        kms_key_id="alias/meshbake",
        volume_size_gib=9,
    )
    assert all("meshbake:spec-hash" in p for p in aws.check_published(other, amis, aws=quick()))


def test_list_images_ignores_untagged_and_other_images(moto: Moto, web: LoadedSpec) -> None:
    ours = bake(web, "20250101-000000")[HOME]
    ec2().register_image(Name="web-lookalike", RootDeviceName="/dev/xvda")
    other = ec2().register_image(Name="api-1", RootDeviceName="/dev/xvda")["ImageId"]
    tag(ec2(), other, {"meshbake:image": "api"})
    assert [r.id for r in aws.list_images("web", [HOME], aws=quick())] == [ours]


# --- prune ---------------------------------------------------------------------------


@dataclass
class Estate:
    """Four generations of web AMIs in two regions, plus things prune must not touch."""

    home: list[str]  # oldest first
    copies: list[str]
    untagged: str
    running: str  # instance on home[0]
    stopped: str  # instance on copies[1]
    snapshots: dict[str, list[str]] = field(default_factory=dict)


@pytest.fixture
def estate(moto: Moto, web: LoadedSpec) -> Estate:
    untagged = ec2().register_image(Name="web-handmade", RootDeviceName="/dev/xvda")["ImageId"]
    home: list[str] = []
    copies: list[str] = []
    for generation in range(4):
        if generation:
            _next_second()
        amis = bake(web, f"2025010{generation + 1}-000000", copy_to=COPY)
        home.append(amis[HOME])
        copies.append(amis[COPY])
    running = ec2().run_instances(ImageId=home[0], MinCount=1, MaxCount=1)["Instances"][0]
    stopped = ec2(COPY).run_instances(ImageId=copies[1], MinCount=1, MaxCount=1)["Instances"][0]
    ec2(COPY).stop_instances(InstanceIds=[stopped["InstanceId"]])
    snapshots = {a: snapshots_of(ec2(HOME), a) for a in [*home, untagged]}
    snapshots |= {a: snapshots_of(ec2(COPY), a) for a in copies}
    return Estate(home, copies, untagged, running["InstanceId"], stopped["InstanceId"], snapshots)


def existing_images(region: str) -> set[str]:
    return {i["ImageId"] for i in ec2(region).describe_images(Owners=["self"])["Images"]}


def existing_snapshots(region: str) -> set[str]:
    return {s["SnapshotId"] for s in ec2(region).describe_snapshots(OwnerIds=["self"])["Snapshots"]}


def test_moto_refuses_deleting_a_registered_amis_snapshot(moto: Moto, web: LoadedSpec) -> None:
    """Why prune deregisters first: the snapshot of a registered AMI cannot go."""
    ami = bake(web, "20250101-000000")[HOME]
    with pytest.raises(ec2().exceptions.ClientError, match="InvalidSnapshot.InUse"):
        ec2().delete_snapshot(SnapshotId=snapshots_of(ec2(), ami)[0])


def test_prune_keeps_newest_and_spares_what_is_in_use(estate: Estate) -> None:
    before = {r: (existing_images(r), existing_snapshots(r)) for r in (HOME, COPY)}
    planned = aws.prune("web", 1, [HOME, COPY], dry_run=True, aws=quick())
    # The dry run changes nothing and says so.
    assert {r: (existing_images(r), existing_snapshots(r)) for r in (HOME, COPY)} == before
    assert not any(a.done for a in planned)
    lines = "\n".join(a.line() for a in planned)
    assert f"would deregister {estate.home[1]} (" in lines
    assert "deregistered" not in lines and "deleted" not in lines

    actions = aws.prune("web", 1, [HOME, COPY], aws=quick())
    # The dry run listed exactly what was then done.
    assert [(a.step, a.image_id, a.snapshot_id) for a in planned] == [
        (a.step, a.image_id, a.snapshot_id) for a in actions
    ]

    steps = {(a.step, a.region, a.image_id) for a in actions}
    home, copies = estate.home, estate.copies
    assert (aws.PruneStep.KEEP, HOME, home[3]) in steps
    assert (aws.PruneStep.KEEP, COPY, copies[3]) in steps
    skipped = {a.image_id: a.reason for a in actions if a.step is aws.PruneStep.SKIP}
    assert skipped == {
        home[0]: f"in use by {estate.running}",
        copies[1]: f"in use by {estate.stopped}",
    }
    removed = {home[1], home[2], copies[0], copies[2]}
    assert {a.image_id for a in actions if a.step is aws.PruneStep.DEREGISTER} == removed
    assert all(a.done for a in actions if a.step is aws.PruneStep.DEREGISTER)

    # Each AMI is deregistered before any of its snapshots is deleted.
    for ami in removed:
        order = [a.step for a in actions if a.image_id == ami]
        assert order[0] is aws.PruneStep.DEREGISTER
        assert order[1:] == [aws.PruneStep.DELETE_SNAPSHOT] * len(estate.snapshots[ami])

    assert existing_images(HOME) == {home[0], home[3], estate.untagged}
    assert existing_images(COPY) == {copies[1], copies[3]}
    gone = {s for ami in removed for s in estate.snapshots[ami]}
    assert not gone & (existing_snapshots(HOME) | existing_snapshots(COPY))
    kept = {s for ami in (home[0], home[3], estate.untagged) for s in estate.snapshots[ami]}
    assert kept <= existing_snapshots(HOME)
    # The untagged AMI is not even looked at.
    assert estate.untagged not in {a.image_id for a in actions}


def test_prune_refuses_keep_zero(moto: Moto) -> None:
    with pytest.raises(UserError, match="at least 1"):
        aws.prune("web", 0, [HOME], aws=quick())


# --- failures: credentials, permissions, throttling ---------------------------------------


def test_unknown_credentials_give_a_clear_message(moto: Moto, web: LoadedSpec) -> None:
    moto.require_auth(True)
    with pytest.raises(UserError) as caught:
        aws.resolve_source_ami(web.spec, aws=quick())
    message = str(caught.value)
    assert "AWS rejected the credentials (AuthFailure)" in message
    assert "AWS_ACCESS_KEY_ID" in message and "\n" not in message


def test_missing_permission_names_the_action(
    moto: Moto, web: LoadedSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    iam = boto3.client("iam", region_name=HOME)
    iam.create_user(UserName="reader")
    iam.put_user_policy(
        UserName="reader",
        PolicyName="describe-only",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "ec2:Describe*", "Resource": "*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    ami = bake(web, "20250101-000000")[HOME]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    moto.require_auth(True)
    # Describing is allowed, and the signature checks out.
    assert aws.resolve_source_ami(web.spec, aws=quick()).id == NEWEST_DEBIAN
    with pytest.raises(UserError) as caught:
        aws.launch(web, ami, "#cloud-config\n", aws=quick())
    message = str(caught.value)
    assert "not allowed to call RunInstances" in message
    assert "grant ec2:RunInstances" in message


def test_no_credentials_give_a_clear_message(
    moto: Moto, web: LoadedSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(UserError, match="no AWS credentials found: set AWS_PROFILE"):
        aws.resolve_source_ami(web.spec, aws=quick())


def test_unknown_profile_gives_a_clear_message(
    moto: Moto, web: LoadedSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(UserError, match="could not be found: fix the profile"):
        aws.resolve_source_ami(web.spec)


class Throttle:
    """A botocore ``before-send`` hook: answers RequestLimitExceeded ``times`` times,
    then lets requests through to moto."""

    BODY = (
        b"<Response><Errors><Error><Code>RequestLimitExceeded</Code>"
        b"<Message>Request limit exceeded.</Message></Error></Errors>"
        b"<RequestID>throttle-test</RequestID></Response>"
    )

    def __init__(self, times: int) -> None:
        self.times = times
        self.calls = 0

    def __call__(self, request: Any, **_: Any) -> botocore.awsrequest.AWSResponse | None:
        self.calls += 1
        if self.calls > self.times:
            return None
        raw = _Raw(self.BODY)
        return botocore.awsrequest.AWSResponse(request.url, 503, {}, raw)


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body

    def read(self, *_: Any) -> bytes:
        return self.body


def throttled(times: int, attempts: int) -> tuple[aws.Aws, Throttle]:
    session = boto3.Session()
    hook = Throttle(times)
    session.events.register("before-send.ec2.DescribeImages", hook)
    return aws.Aws(session=session, max_attempts=attempts), hook


def test_throttling_is_retried(moto: Moto, web: LoadedSpec) -> None:
    client, hook = throttled(times=2, attempts=4)
    assert aws.resolve_source_ami(web.spec, aws=client).id == NEWEST_DEBIAN
    assert hook.calls == 3  # two throttled, the third reached moto


def test_throttling_that_persists_ends_in_a_clear_message(moto: Moto, web: LoadedSpec) -> None:
    client, hook = throttled(times=100, attempts=2)
    with pytest.raises(UserError) as caught:
        aws.resolve_source_ami(web.spec, aws=client)
    assert hook.calls == 2
    message = str(caught.value)
    assert "kept throttling DescribeImages (RequestLimitExceeded) after 2 attempts" in message
    assert "try again later" in message


# --- after a build: manifest and the dry-run plan -----------------------------------------


def test_record_amis_reads_the_last_runs_amazon_artifact(tmp_path: Path) -> None:
    manifest = tmp_path / "packer-manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "builds": [
                    {"builder_type": "amazon-ebs", "artifact_id": "us-east-1:ami-old",
                     "packer_run_uuid": "run-1"},
                    {"builder_type": "qemu", "artifact_id": "web.qcow2",
                     "packer_run_uuid": "run-2"},
                    {"builder_type": "amazon-ebs", "packer_run_uuid": "run-2",
                     "artifact_id": "us-east-1:ami-123,eu-west-1:ami-456"},
                ],
                "last_run_uuid": "run-2",
            }
        )
    )  # fmt: skip
    assert aws.record_amis(manifest) == {"us-east-1": "ami-123", "eu-west-1": "ami-456"}
    manifest.write_text(json.dumps({"builds": [], "last_run_uuid": "x"}))
    with pytest.raises(UserError, match="no amazon-ebs artifact"):
        aws.record_amis(manifest)
    with pytest.raises(UserError, match="cannot read the Packer manifest"):
        aws.record_amis(tmp_path / "missing.json")


def test_dry_run_plan_names_what_the_build_will_do(moto: Moto) -> None:
    loaded = spec_variant(
        ami_regions=[COPY], share={"accounts": [SHARE_WITH]}, kms_key_id="alias/meshbake"
    )
    plan = aws.aws_dry_run(loaded, packer=PackerVersion(1, 6, 6), aws=quick())
    assert NEWEST_DEBIAN in plan and "debian-12-amd64-20240717-1811" in plan
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in plan.splitlines()[1:])
    assert rows["build region"] == HOME
    assert rows["copies to"] == COPY
    assert f"account {SHARE_WITH}" in plan
    assert "t3.small" in plan and "8 GiB gp3, encrypted" in plan
    assert "IMDSv2" in plan and "HttpTokens=required" in plan
    assert f"meshbake:spec-hash={loaded.digest}" in plan
    assert "alias/meshbake" in rows["AMI encryption"]


def graviton_variant(**aws_target: Any) -> LoadedSpec:
    """web.yaml baking amd64 and arm64 AMIs, each on its architecture's default type."""
    data = yaml.safe_load(WEB_SPEC.read_text())
    target = data["targets"]["aws"]
    target.pop("instance_type")
    target.update({"arch": ["amd64", "arm64"], **aws_target})
    return parse_spec(yaml.safe_dump(data), WEB_SPEC)


def test_each_architecture_resolves_its_own_source_ami(moto: Moto) -> None:
    loaded = graviton_variant()
    amd = aws.resolve_source_ami(loaded.spec, arch=Arch.AMD64, aws=quick())
    arm = aws.resolve_source_ami(loaded.spec, arch=Arch.ARM64, aws=quick())
    assert (amd.id, amd.name) == (NEWEST_DEBIAN, "debian-12-amd64-20240717-1811")
    assert (arm.id, arm.name) == ("ami-de12000000000003", "debian-12-arm64-20240901-0000")
    # A name pattern of the spec's own still filters by each architecture.
    named = graviton_variant(source_ami={"name": "debian-12-*"})
    found = aws.resolve_source_ami(named.spec, arch=Arch.ARM64, aws=quick())
    assert found.id == "ami-de12000000000003"


def test_dry_run_plan_shows_each_architecture(moto: Moto) -> None:
    plan = aws.aws_dry_run(graviton_variant(), packer=PackerVersion(1, 6, 6), aws=quick())
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in plan.splitlines()[1:])
    assert rows["architectures"] == "amd64, arm64 (one AMI each)"
    assert rows["source AMI (arm64)"].startswith("ami-de12000000000003 debian-12-arm64-")
    assert rows["source AMI (amd64)"].startswith(f"{NEWEST_DEBIAN} debian-12-amd64-")
    assert rows["instance type (arm64)"] == "t4g.small"
    assert rows["instance type (amd64)"] == "t3.small"
    assert "'debian-12-arm64-*', arm64" in rows["source filter (arm64)"]


def test_launch_of_an_arm64_ami_defaults_to_a_graviton_type(moto: Moto) -> None:
    loaded = graviton_variant()
    client = ec2()
    # moto's register_image records no architecture, so take a seeded arm64 AMI and
    # tag it as a meshbake build of this image.
    arm = "ami-de12000000000003"
    tag(client, arm, {"meshbake:image": "web"})
    instance = aws.launch(loaded, arm, "#cloud-config\n", aws=quick())
    raw = client.describe_instances(InstanceIds=[instance.id])["Reservations"][0]["Instances"][0]
    assert raw["InstanceType"] == "t4g.small"
    tag(client, NEWEST_DEBIAN, {"meshbake:image": "web"})
    instance = aws.launch(loaded, NEWEST_DEBIAN, "#cloud-config\n", aws=quick())
    raw = client.describe_instances(InstanceIds=[instance.id])["Reservations"][0]["Instances"][0]
    assert raw["InstanceType"] == "t3.small"


def test_record_amis_by_source_keeps_each_architecture_apart(tmp_path: Path) -> None:
    manifest = tmp_path / "packer-manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "builds": [
                    {"name": "web", "builder_type": "amazon-ebs", "packer_run_uuid": "r",
                     "artifact_id": "us-east-1:ami-a1,eu-west-1:ami-a2"},
                    {"name": "web-arm64", "builder_type": "amazon-ebs", "packer_run_uuid": "r",
                     "artifact_id": "us-east-1:ami-b1,eu-west-1:ami-b2"},
                ],
                "last_run_uuid": "r",
            }
        )
    )  # fmt: skip
    assert aws.record_amis_by_source(manifest) == {
        "web": {"us-east-1": "ami-a1", "eu-west-1": "ami-a2"},
        "web-arm64": {"us-east-1": "ami-b1", "eu-west-1": "ami-b2"},
    }


def test_sharing_without_a_customer_managed_key_is_a_spec_error() -> None:
    # AWS cannot share AMIs encrypted with the default aws/ebs key.
    with pytest.raises(SpecError, match="targets.aws.kms_key_id"):
        spec_variant(share={"accounts": [SHARE_WITH]})


# --- the CLI -------------------------------------------------------------------------


def test_cli_images_launch_prune(
    moto: Moto, web: LoadedSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = bake(web, "20250101-000000")[HOME]
    _next_second()
    new = bake(web, "20250102-000000")[HOME]

    assert main(["images", str(WEB_SPEC), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [i["id"] for i in listed] == [new, old]
    assert listed[0]["tags"]["meshbake:spec-hash"] == web.digest

    assert main(["images", "web", "--region", HOME]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["REGION", "AMI", "CREATED", "STATE", "CONSUL", "ENVOY", "SPEC",
                                "NAME"]  # fmt: skip
    assert new in table[1] and "2.1.0" in table[1]

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    argv = ["launch", str(WEB_SPEC), "--ami", new, "--token-file", str(token_file), "--json"]
    assert main(argv) == 0
    launched = json.loads(capsys.readouterr().out)
    assert launched["state"] == "running" and launched["address"]
    user_data = ec2().describe_instance_attribute(InstanceId=launched["id"], Attribute="userData")[
        "UserData"
    ]["Value"]
    assert f"MESHBAKE_AGENT_TOKEN={TOKEN}" in base64.b64decode(user_data).decode()

    assert main(["prune", "web", "--keep", "1", "--region", HOME, "--dry-run", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert [(a["step"], a["image_id"], a["done"]) for a in planned][:2] == [
        ("keep", new, False),
        ("deregister", old, False),
    ]
    assert main(["prune", str(WEB_SPEC), "--keep", "1"]) == 0
    out = capsys.readouterr().out
    assert f"deregistered {old}" in out and "deleted snapshot" in out
    assert existing_images(HOME) == {new}


def test_cli_reports_aws_errors_as_one_line(moto: Moto, capsys: pytest.CaptureFixture[str]) -> None:
    moto.require_auth(True)
    assert main(["images", "web", "--region", HOME]) == 1
    err = capsys.readouterr().err
    assert err.startswith("meshbake: error: listing the AMIs of web in us-east-1: AWS rejected")
    assert err.count("\n") == 1


def test_cli_needs_a_region_for_a_bare_name(moto: Moto, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "web", "--keep", "2"]) == 1
    assert "give --region" in capsys.readouterr().err


# --- meshbake-fetch-token: IMDSv2 credentials, a request signed by curl ---------------------


@pytest.fixture
def instance_role(moto: Moto) -> Callable[[list[str]], dict[str, str]]:
    """Make an IAM role allowed ``actions`` and return its temporary credentials."""

    def make(actions: list[str]) -> dict[str, str]:
        iam = boto3.client("iam", region_name=HOME)
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": "ec2.amazonaws.com"},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
        role = iam.create_role(RoleName="meshbake-web", AssumeRolePolicyDocument=json.dumps(trust))
        # moto checks SSM and Secrets Manager calls against Resource "*", so the policy
        # here cannot be narrowed to one parameter as the README's can.
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        }
        iam.put_role_policy(
            RoleName="meshbake-web", PolicyName="token", PolicyDocument=json.dumps(policy)
        )
        creds = boto3.client("sts", region_name=HOME).assume_role(
            RoleArn=role["Role"]["Arn"], RoleSessionName="i-0123456789abcdef0"
        )["Credentials"]
        return {
            "AccessKeyId": creds["AccessKeyId"],
            "SecretAccessKey": creds["SecretAccessKey"],
            "Token": creds["SessionToken"],
            "Expiration": creds["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    return make


def fetch_token(moto: Moto, imds: FakeImds, role: str = "agent", **env: str) -> Any:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MESHBAKE_"))}
    clean |= {
        "MESHBAKE_IMDS_ENDPOINT": imds.url,
        "MESHBAKE_AWS_ENDPOINT_URL": moto.url,
        "MESHBAKE_FETCH_ATTEMPTS": "2",
        **env,
    }
    return subprocess.run(
        [str(FETCH_TOKEN), role], capture_output=True, text=True, env=clean, timeout=60
    )


def test_fetch_token_from_ssm_with_a_signed_request(
    moto: Moto,
    instance_role: Callable[[list[str]], dict[str, str]],
    fake_imds: Callable[[dict[str, str]], FakeImds],
) -> None:
    boto3.client("ssm", region_name=HOME).put_parameter(
        Name="/meshbake/web/token", Value=TOKEN, Type="SecureString"
    )
    imds = fake_imds(instance_role(["ssm:GetParameter"]))
    # From here on moto checks every signature (and the session token) and the policy.
    moto.require_auth(True)
    done = fetch_token(moto, imds, MESHBAKE_TOKEN_SSM_PARAMETER="/meshbake/web/token")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{TOKEN}\n", "")
    # IMDSv2: a PUT for the session token first, then only GETs that carry it.
    assert imds.log[0] == ("PUT", "/latest/api/token", True)
    assert all(ok for method, _, ok in imds.log[1:] if method == "GET")
    assert [path for _, path, _ in imds.log[1:]] == [
        "/latest/meta-data/placement/region",
        "/latest/meta-data/iam/security-credentials/",
        "/latest/meta-data/iam/security-credentials/meshbake-web",
    ]


def test_fetch_token_from_secrets_manager_picks_the_role(
    moto: Moto,
    instance_role: Callable[[list[str]], dict[str, str]],
    fake_imds: Callable[[dict[str, str]], FakeImds],
) -> None:
    tokens = json.dumps({"agent": TOKEN, "service": SERVICE_TOKEN})
    boto3.client("secretsmanager", region_name=HOME).create_secret(
        Name="meshbake/web", SecretString=tokens
    )
    imds = fake_imds(instance_role(["secretsmanager:GetSecretValue"]))
    moto.require_auth(True)
    env = {"MESHBAKE_TOKEN_SECRET_ID": "meshbake/web", "MESHBAKE_AWS_REGION": HOME}
    agent = fetch_token(moto, imds, "agent", **env)
    service = fetch_token(moto, imds, "service", **env)
    assert (agent.returncode, agent.stdout) == (0, f"{TOKEN}\n")
    assert (service.returncode, service.stdout) == (0, f"{SERVICE_TOKEN}\n")
    # With MESHBAKE_AWS_REGION given, IMDS is not asked for the region.
    assert "/latest/meta-data/placement/region" not in {path for _, path, _ in imds.log}


def test_fetch_token_denied_says_which_permission(
    moto: Moto,
    instance_role: Callable[[list[str]], dict[str, str]],
    fake_imds: Callable[[dict[str, str]], FakeImds],
) -> None:
    boto3.client("secretsmanager", region_name=HOME).create_secret(
        Name="meshbake/web", SecretString=TOKEN
    )
    imds = fake_imds(instance_role(["ssm:GetParameter"]))
    moto.require_auth(True)
    done = fetch_token(moto, imds, MESHBAKE_TOKEN_SECRET_ID="meshbake/web")
    assert done.returncode == 1 and done.stdout == ""
    assert "may not call secretsmanager:GetSecretValue" in done.stderr
    assert TOKEN not in done.stderr


def test_fetch_token_plain_value_has_no_separate_service_token(
    moto: Moto,
    instance_role: Callable[[list[str]], dict[str, str]],
    fake_imds: Callable[[dict[str, str]], FakeImds],
) -> None:
    boto3.client("ssm", region_name=HOME).put_parameter(
        Name="meshbake-web-token", Value=TOKEN, Type="SecureString"
    )
    imds = fake_imds(instance_role(["ssm:GetParameter"]))
    done = fetch_token(moto, imds, "service", MESHBAKE_TOKEN_SSM_PARAMETER="meshbake-web-token")
    assert done.returncode == 1 and done.stdout == ""
    assert "separate tokens need a JSON object" in done.stderr
    assert TOKEN not in done.stderr
    missing = fetch_token(moto, imds, MESHBAKE_TOKEN_SSM_PARAMETER="meshbake-missing")
    assert missing.returncode == 1 and "does not exist in us-east-1" in missing.stderr


def test_fetch_token_without_imds_fails_cleanly(moto: Moto) -> None:
    nobody = FakeImds({}, url=f"http://127.0.0.1:{free_port()}")
    done = fetch_token(moto, nobody, MESHBAKE_TOKEN_SSM_PARAMETER="x", MESHBAKE_FETCH_ATTEMPTS="1")
    assert done.returncode == 1 and done.stdout == ""
    assert "no IMDSv2 session token" in done.stderr


def test_fetch_token_is_shellcheck_clean() -> None:
    # As the bake's gate runs it: following the script into meshbake-lib.sh.
    assert shellcheck([FETCH_TOKEN]) == []


def test_secret_store_images_get_curl_and_the_fetch_script() -> None:
    from builder.render import baked as bake

    data = yaml.safe_load(WEB_SPEC.read_text())
    data["tokens"] = {"source": "ssm", "ssm_parameter": "/meshbake/web/token"}
    loaded = parse_spec(yaml.safe_dump(data), WEB_SPEC)
    assert bake.image_packages(loaded.spec) == (
        "python3",
        "nftables",
        "systemd-resolved",
        "curl",
        "ca-certificates",
    )
    assert "curl" not in bake.image_packages(spec_variant().spec)
    assert bake.FETCH_TOKEN_SCRIPT not in bake.runtime_scripts(spec_variant().spec)
    script = {f.dest: f for f in bake.baked_files(loaded)}[
        "/usr/libexec/meshbake/meshbake-fetch-token"
    ]
    assert script.mode == 0o755 and script.content == FETCH_TOKEN.read_bytes()


def test_fetch_token_signature_is_really_checked(
    moto: Moto,
    instance_role: Callable[[list[str]], dict[str, str]],
    fake_imds: Callable[[dict[str, str]], FakeImds],
) -> None:
    """The SSM test above proves curl's signature only if a bad one fails: it does."""
    boto3.client("ssm", region_name=HOME).put_parameter(
        Name="meshbake-web-token", Value=TOKEN, Type="SecureString"
    )
    credentials = instance_role(["ssm:GetParameter"])
    secret = credentials["SecretAccessKey"]
    credentials["SecretAccessKey"] = secret[:-4] + ("AAAA" if secret[-4:] != "AAAA" else "BBBB")
    imds = fake_imds(credentials)
    moto.require_auth(True)
    done = fetch_token(moto, imds, MESHBAKE_TOKEN_SSM_PARAMETER="meshbake-web-token")
    assert done.returncode == 1 and done.stdout == ""
    assert "signature" in done.stderr
    assert TOKEN not in done.stderr and secret not in done.stderr


def test_cli_build_aws_dry_run(moto: Moto, capsys: pytest.CaptureFixture[str]) -> None:
    """render + every static gate + the source AMI lookup against the moto server."""
    assert main(["build", str(WEB_SPEC), "--target", "aws", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert NEWEST_DEBIAN in plan
    assert "us-east-1" in plan and "IMDSv2" in plan


# --- a whole aws build of two architectures (Packer double, moto, real wheels) -----------


def test_one_build_writes_one_ami_per_architecture_each_with_its_binaries(
    moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``build --target aws`` of amd64 + arm64: each AMI source is given its own
    architecture's Consul zip (from one signed release) and Envoy (the wheel's x86_64 and
    aarch64 builds), and the manifest records each AMI with its arch and source AMI;
    ``collect`` then keeps one record per architecture."""
    from builder.bake import run as build
    from builder.release.plan import collect
    from tests.fixtures.fake_packer import install_fake_packer
    from tests.fixtures.release import make_fixture_release

    images = tmp_path / "images"
    shutil.copytree(REPO / "images" / "files", images / "files")
    spec = images / "web.yaml"
    data = yaml.safe_load(WEB_SPEC.read_text())
    data["targets"] = {"aws": {"region": HOME, "arch": ["x86_64", "arm64"]}}
    data["consul"]["version"] = "2.1.0"
    spec.write_text(yaml.safe_dump(data))
    release = make_fixture_release(tmp_path / "mirror", "2.1.0", also=["arm64"])
    packer = install_fake_packer(tmp_path, monkeypatch, "1.6.6")
    uploads = tmp_path / "uploads"
    monkeypatch.setenv("FAKE_PACKER_UPLOADS", str(uploads))
    options = build.BuildOptions(
        target="aws",
        out=tmp_path / "out",
        cache=tmp_path / "cache",
        consul_mirror=str(release.mirror),
        consul_key=release.key,
    )
    result = build.build_image(spec, options, progress=lambda _: None)

    (call,) = [c for c in packer.calls() if c[0] == "build"]
    assert "-only=amazon-ebs.web,amazon-ebs.web-arm64" in call
    zips = {a: release.release_dir / f"consul_2.1.0_linux_{a}.zip" for a in ("amd64", "arm64")}
    for source, arch, machine in (("web", "amd64", 0x3E), ("web-arm64", "arm64", 0xB7)):
        staged = uploads / source
        assert (staged / "consul.zip").read_bytes() == zips[arch].read_bytes()
        assert int.from_bytes((staged / "envoy").read_bytes()[18:20], "little") == machine
        sums = (staged / "SHA256SUMS").read_text()
        assert hashlib.sha256((staged / "envoy").read_bytes()).hexdigest() in sums

    assert result.manifest is not None
    manifest = json.loads(result.manifest.read_text())
    assert "amis" not in manifest  # two architectures: only the per-arch list
    assert [(i["arch"], i["amis"], i["parent"]["id"]) for i in manifest["images"]] == [
        ("amd64", {HOME: "ami-00000000000000001"}, NEWEST_DEBIAN),
        ("arm64", {HOME: "ami-00000000000000002"}, "ami-de12000000000003"),
    ]
    record = collect([result.manifest.parent], tmp_path / "release")
    builds = {b["manifest"]: (b["arch"], b["amis"]) for b in record["builds"]}  # type: ignore[union-attr]
    assert builds == {
        "manifests/web-aws-amd64.json": ("amd64", {HOME: "ami-00000000000000001"}),
        "manifests/web-aws-arm64.json": ("arm64", {HOME: "ami-00000000000000002"}),
    }

    # A channel holds one AMI per region: promote takes one architecture's record.
    from builder.release.channels import load_build

    with pytest.raises(UserError, match="one AMI per architecture; collect it"):
        load_build(result.manifest)
    arm_record = load_build(tmp_path / "release" / "manifests" / "web-aws-arm64.json")
    assert (arm_record.ids, arm_record.parent) == (
        {HOME: "ami-00000000000000002"},
        "ami-de12000000000003",
    )
    # One Consul zip cannot serve two architectures, and --arch must be one of the spec's.
    with pytest.raises(UserError, match="--consul-zip is one Consul binary, but targets.aws"):
        build.build_image(spec, replace(options, consul_zip=zips["amd64"]), progress=print)
    with pytest.raises(UserError, match=r"targets\.aws\.arch: lists amd64, not arm64 \(--arch\)"):
        build.build_image(WEB_SPEC, replace(options, arch="arm64"), progress=print)

    # --arch builds one architecture, in the one-architecture shape promote reads.
    one = build.build_image(
        spec, replace(options, arch="arm64", out=tmp_path / "arm"), progress=lambda _: None
    )
    assert one.manifest is not None
    single = json.loads(one.manifest.read_text())
    assert (single["arch"], single["amis"]) == ("arm64", {HOME: "ami-00000000000000001"})
    last = [c for c in packer.calls() if c[0] == "build"][-1]
    assert "-only=amazon-ebs.web-arm64" in last


def test_prune_keeps_the_newest_of_each_architecture(moto: Moto, web: LoadedSpec) -> None:
    """Two newer amd64 builds do not push out the only arm64 AMI: --keep counts per arch."""
    client = ec2()
    # moto's register_image records no architecture; a copy of Debian's arm64 AMI
    # keeps it, as a baked arm64 AMI would have it.
    arm = client.copy_image(
        SourceImageId="ami-de12000000000003", SourceRegion=HOME, Name="web-arm-20250101"
    )["ImageId"]
    tag(client, arm, image_tags(web) | {"meshbake:build-time": "20250101-000000"})
    assert client.describe_images(ImageIds=[arm])["Images"][0]["Architecture"] == "arm64"
    _next_second()
    old = bake(web, "20250102-000000")[HOME]
    _next_second()
    new = bake(web, "20250103-000000")[HOME]
    listed = {r.id: r.arch for r in aws.list_images("web", [HOME], aws=quick())}
    assert listed == {arm: "arm64", old: "amd64", new: "amd64"}
    first: dict[str, str] = {}
    for action in aws.prune("web", 1, [HOME], dry_run=True, aws=quick()):
        first.setdefault(action.image_id, action.step.value)
    assert first == {
        new: "keep",
        arm: "keep",
        old: "deregister",
    }
