"""Release channels for AMIs against a moto server: SSM parameters are the channels,
their history the channel history, AMI tags the membership and the revocation.

The moto server is the real HTTP server of tests/fixtures/aws.py; the promotes that
race each other run in separate processes, as CI jobs would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from builder.cli.main import main
from builder.release import channels as rel
from builder.spec.model import LoadedSpec
from tests.fixtures.aws import HOME, Moto
from tests.integration.test_aws import WEB_SPEC, _next_second, bake, ec2, spec_variant
from tests.paths import REPO

pytestmark = pytest.mark.integration

COPY = "eu-west-1"
TOKEN = "6f1c3d2e-8a4b-4c5d-9e0f-1a2b3c4d5e6f"


@pytest.fixture
def web() -> LoadedSpec:
    return spec_variant()


def manifest(folder: Path, loaded: LoadedSpec, amis: dict[str, str]) -> Path:
    """The manifest ``build --target aws`` writes for these AMIs."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.json"
    path.write_text(
        json.dumps(
            {
                "image": loaded.spec.name,
                "target": "aws",
                "arch": "amd64",
                "spec_hash": loaded.digest,
                "amis": amis,
                "parent": {"kind": "source-ami", "id": "ami-de12000000000002"},
            }
        )
    )
    return path


def tags_of(ami: str, region: str = HOME) -> dict[str, str]:
    image = ec2(region).describe_images(ImageIds=[ami])["Images"][0]
    return {t["Key"]: t["Value"] for t in image.get("Tags", [])}


def instances() -> list[str]:
    reservations = ec2().describe_instances()["Reservations"]
    return [i["InstanceId"] for r in reservations for i in r["Instances"]]


def test_promote_writes_the_parameter_its_history_and_the_tags(
    moto: Moto, web: LoadedSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = bake(web, "20250101-000000", copy_to=COPY)
    _next_second()
    second = bake(web, "20250102-000000", copy_to=COPY)
    for n, amis in enumerate((first, second)):
        built = manifest(tmp_path / f"b{n}", web, amis)
        argv = ["promote", "web", "--channel", "prod", "--build", str(built), "--by", f"ci#{n}"]
        assert main(argv) == 0
    # Any tool resolves the channel: the parameter's value is the AMI id, per region.
    for region in (HOME, COPY):
        ssm = boto3.client("ssm", region_name=region)
        value = ssm.get_parameter(Name="/meshbake/web/channels/prod")["Parameter"]["Value"]
        assert value == second[region]
        history = ssm.get_parameter_history(Name="/meshbake/web/channels/prod")["Parameters"]
        assert [v["Value"] for v in history] == [first[region], second[region]]
        # Membership moved with the channel.
        assert "meshbake:channel:prod" in tags_of(second[region], region)
        assert "meshbake:channel:prod" not in tags_of(first[region], region)
    capsys.readouterr()
    assert main(["channels", "web", "--region", HOME, "--region", COPY, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["channels"]
    prod = shown[f"prod@{HOME}"]
    assert prod["current"]["build"] == second[HOME]
    assert [e["by"] for e in prod["history"]] == ["ci#0", "ci#1"]
    assert prod["current"]["parent"] == "ami-de12000000000002"
    assert shown[f"prod@{COPY}"]["current"]["build"] == second[COPY]


def test_concurrent_promotes_lose_no_entry(moto: Moto, web: LoadedSpec, tmp_path: Path) -> None:
    """Processes promote at once; each promotion is a version of the parameter."""
    count = 6
    amis = [bake(web, f"2025010{i}-000000")[HOME] for i in range(1, count + 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "builder", "promote", "web", "--channel", "prod",
             "--build", str(manifest(tmp_path / f"b{i}", web, {HOME: ami})), "--by", f"job-{i}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for i, ami in enumerate(amis)
    ]  # fmt: skip
    for p in procs:
        _out, err = p.communicate()
        assert p.returncode == 0, err
    state = rel.SsmStore([HOME]).read("web")
    history = state.history[("prod", HOME)]
    assert sorted(e.by for e in history) == sorted(f"job-{i}" for i in range(count))
    assert sorted(e.build for e in history) == sorted(amis)
    # Exactly one AMI carries the channel tag: the one the parameter names now.
    tagged = [a for a in amis if "meshbake:channel:prod" in tags_of(a)]
    assert tagged == [history[-1].build]


def test_a_revoked_ami_is_never_launched(
    moto: Moto, web: LoadedSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    amis = bake(web, "20250101-000000", copy_to=COPY)
    built = manifest(tmp_path / "b", web, amis)
    assert main(["promote", "web", "--channel", "prod", "--build", str(built)]) == 0
    capsys.readouterr()
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    launch = ["launch", str(WEB_SPEC), "--token-file", str(token), "--json"]
    assert main([*launch, "--channel", "prod"]) == 0
    launched = json.loads(capsys.readouterr().out)
    assert launched["image_id"] == amis[HOME]
    before = instances()

    revoke = [
        "revoke",
        "web",
        amis[HOME],
        "--reason",
        "CVE-2026-0001 in the base",
        "--region",
        HOME,
    ]
    assert main([*revoke, "--region", COPY]) == 0
    capsys.readouterr()
    # Revoked in every region the build was copied to.
    for region in (HOME, COPY):
        assert tags_of(amis[region], region)["meshbake:revoked"] == "CVE-2026-0001 in the base"

    assert main([*launch, "--channel", "prod"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"meshbake: error: channel prod of web points to {amis[HOME]} in {HOME}, which is"
        " revoked (CVE-2026-0001 in the base); promote another build\n"
    )
    # Not by its id either.
    assert main([*launch, "--ami", amis[HOME]]) == 1
    assert "is revoked (CVE-2026-0001 in the base); it is never launched" in capsys.readouterr().err
    assert instances() == before
    # And not promoted again.
    assert main(["promote", "web", "--channel", "dev", "--build", str(built)]) == 1
    assert "is revoked" in capsys.readouterr().err
    assert main(["channels", "web", "--region", HOME]) == 0
    assert "REVOKED: CVE-2026-0001 in the base" in capsys.readouterr().out


def test_prune_never_deletes_a_channel_build(
    moto: Moto, web: LoadedSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    amis = []
    for day in range(1, 6):
        amis.append(bake(web, f"2025010{day}-000000")[HOME])
        _next_second()
    oldest, in_history, prod, _x, newest = amis
    for n, ami in enumerate((in_history, prod)):
        assert main(["promote", "web", "--channel", "prod", "--build",
                     str(manifest(tmp_path / f"p{n}", web, {HOME: ami}))]) == 0  # fmt: skip
    assert main(["promote", "web", "--channel", "dev", "--build",
                 str(manifest(tmp_path / "d", web, {HOME: oldest}))]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["prune", "web", "--keep", "1", "--region", HOME, "--json"]) == 0
    actions = {(a["step"], a["image_id"]) for a in json.loads(capsys.readouterr().out)}
    gone = {image for step, image in actions if step == "deregister"}
    assert gone == {amis[3]}
    left = {i["ImageId"] for i in ec2().describe_images(Owners=["self"])["Images"]}
    assert {oldest, in_history, prod, newest} <= left
    # With no history kept, only what a channel points to now is spared.
    assert main(["prune", "web", "--keep", "1", "--region", HOME, "--channel-history", "0"]) == 0
    out = capsys.readouterr().out
    assert f"deregistered {in_history}" in out
    assert f"keep {prod}" in out and f"keep {oldest}" in out


def test_promote_bad_input_is_one_line(
    moto: Moto, web: LoadedSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    built = manifest(tmp_path / "b", web, {HOME: "not-an-ami"})
    assert main(["promote", "web", "--channel", "prod", "--build", str(built)]) == 1
    assert capsys.readouterr().err == (
        f"meshbake: error: {built}: amis.{HOME}: 'not-an-ami' is not an AMI id\n"
    )
    built = manifest(tmp_path / "c", web, {HOME: "ami-12345678"})
    argv = ["promote", "web", "--channel", "prod", "--build", str(built), "--region", COPY]
    assert main(argv) == 1
    assert capsys.readouterr().err == f"meshbake: error: {built}: amis: no AMI in {COPY}\n"
    assert main(["revoke", "web", "ami-0000000000000000f", "--reason", "x", "--region", HOME]) == 1
    err = capsys.readouterr().err
    assert "ami-0000000000000000f: not an AMI of web in us-east-1" in err
    assert err.count("\n") == 1
