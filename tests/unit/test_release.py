"""meshbake plan, collect and the local (qcow2) release channels.

The channel registry is exercised through the CLI and in separate processes: several
promotes at once must all land, and a writer killed mid-write must leave the
registry as it was, never a torn file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from builder.cli.main import main
from builder.release import channels as rel
from tests.paths import REPO

WEB = REPO / "images" / "web.yaml"


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``meshbake`` in its own process, as a CI job runs it."""
    return subprocess.run(
        [sys.executable, "-m", "builder", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def qemu_build(folder: Path, image: str = "web", spec_hash: str = "a" * 64, n: int = 0) -> Path:
    """A finished qemu build folder: a (tiny) qcow2 and the manifest vouching for it."""
    folder.mkdir(parents=True, exist_ok=True)
    disk = folder / f"{image}.qcow2"
    disk.write_bytes(f"disk {image} {n}".encode())
    manifest = {
        "image": image,
        "target": "qemu",
        "arch": "amd64",
        "spec_hash": spec_hash,
        "parent": {"kind": "base-image", "id": f"sha256:{'b' * 63}{n % 2}"},
        "output": {"path": disk.name, "sha256": hashlib.sha256(disk.read_bytes()).hexdigest()},
    }
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def aws_build(folder: Path, amis: dict[str, str], spec_hash: str = "a" * 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.json"
    manifest = {"image": "web", "target": "aws", "spec_hash": spec_hash, "amis": amis}
    path.write_text(json.dumps(manifest))
    return path


# --- plan -----------------------------------------------------------------------------


def test_plan_lists_one_job_per_image_target_arch_region() -> None:
    done = run_cli("plan", "images", "--json")
    assert done.returncode == 0, done.stderr
    jobs = json.loads(done.stdout)
    ids = [j["id"] for j in jobs]
    assert len(ids) == len(set(ids))
    web = [j for j in jobs if j["image"] == "web"]
    assert {(j["target"], j["arch"], j["region"]) for j in web} == {
        ("qemu", "amd64", None),
        ("aws", "amd64", "us-east-1"),
    }
    for job in jobs:
        # Everything a runner needs, and the command really is meshbake's own.
        assert job["command"][:3] == ["meshbake", "build", job["spec"]]
        assert job["command"][job["command"].index("--target") + 1] == job["target"]
        assert len(job["spec_hash"]) == 64


def test_plan_gives_aws_copy_regions_their_own_entry(tmp_path: Path) -> None:
    spec = tmp_path / "web.yaml"
    spec.write_text(
        WEB.read_text().replace(
            "region: us-east-1", "region: us-east-1\n    ami_regions: [eu-west-1]"
        )
    )
    shutil.copytree(REPO / "images" / "files", tmp_path / "files")
    done = run_cli("plan", str(spec), "--json")
    assert done.returncode == 0, done.stderr
    aws = [j for j in json.loads(done.stdout) if j["target"] == "aws"]
    assert [(j["region"], j["command"] is not None) for j in aws] == [
        ("us-east-1", True),
        ("eu-west-1", False),
    ]
    assert aws[1]["built_by"] == aws[0]["id"]


def test_plan_holds_nothing_secret(tmp_path: Path) -> None:
    done = run_cli("plan", "images", "--json")
    text = done.stdout.lower()
    for word in ("token", "secret", "password", "private"):
        assert word not in text


# --- collect ----------------------------------------------------------------------------


def test_collect_merges_manifests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qemu_build(tmp_path / "web-qemu")
    aws_build(tmp_path / "web-aws", {"us-east-1": "ami-1"})
    out = tmp_path / "release"
    assert (
        main(["collect", str(tmp_path / "web-qemu"), str(tmp_path / "web-aws"), "--out", str(out)])
        == 0
    )
    record = json.loads((out / "release.json").read_text())
    assert [b["manifest"] for b in record["builds"]] == [
        "manifests/web-aws-amd64.json",
        "manifests/web-qemu-amd64.json",
    ]
    # A collected manifest still finds its qcow2 (and promote takes it from there).
    build = rel.load_build(out / "manifests" / "web-qemu-amd64.json")
    assert build.image_file == (tmp_path / "web-qemu" / "web.qcow2").resolve()


def test_collect_refuses_a_duplicate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qemu_build(tmp_path / "a")
    qemu_build(tmp_path / "b")
    assert (
        main(["collect", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        f"{tmp_path / 'b' / 'manifest.json'}: image: web (qemu, amd64) is already collected" in err
    )
    assert not (tmp_path / "r" / "release.json").exists()


def test_collect_refuses_mismatched_spec_hashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qemu_build(tmp_path / "a", spec_hash="a" * 64)
    aws_build(tmp_path / "b", {"us-east-1": "ami-1"}, spec_hash="c" * 64)
    assert (
        main(["collect", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "b/manifest.json: spec_hash: cccccccccccc differs from aaaaaaaaaaaa" in err


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("{not json", "the build manifest is not JSON"),
        ("[]", "the build manifest is a JSON list, not an object"),
        ('{"target": "qemu", "spec_hash": "x"}', "image: missing"),
        ('{"image": "web", "target": "aws", "spec_hash": "x"}', "amis: missing"),
    ],
)
def test_collect_bad_manifest_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, field: str
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text(content)
    assert main(["collect", str(tmp_path / "a"), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"meshbake: error: {tmp_path / 'a' / 'manifest.json'}: ")
    assert field in err and len(err.splitlines()) == 1


# --- local channels -------------------------------------------------------------------------


def test_promote_revoke_and_channels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry = tmp_path / "build"
    first = qemu_build(tmp_path / "one", n=0)
    second = qemu_build(tmp_path / "two", n=1)
    reg = ["--registry", str(registry)]
    assert (
        main(["promote", "web", "--channel", "prod", "--build", str(first), *reg, "--by", "ci#1"])
        == 0
    )
    assert (
        main(["promote", "web", "--channel", "prod", "--build", str(second), *reg, "--by", "ci#2"])
        == 0
    )
    capsys.readouterr()
    # The channel resolves to a kept copy: rebuilding into the folder cannot change it.
    (tmp_path / "two" / "web.qcow2").write_bytes(b"rebuilt")
    assert main(["channels", "web", *reg, "--resolve", "prod"]) == 0
    kept = Path(capsys.readouterr().out.strip())
    assert kept.parent == registry / "builds" and kept.read_bytes() == b"disk web 1"

    assert main(["channels", "web", *reg, "--json"]) == 0
    state = json.loads(capsys.readouterr().out)["channels"]["prod"]
    assert [e["by"] for e in state["history"]] == ["ci#1", "ci#2"]
    digest = state["current"]["build"]

    assert (
        main(["revoke", "web", digest.removeprefix("sha256:"), "--reason", "CVE-2026-1", *reg]) == 0
    )
    capsys.readouterr()
    assert main(["channels", "web", *reg, "--resolve", "prod"]) == 1
    err = capsys.readouterr().err.strip()
    assert f"channel prod of web points to {digest}, which is revoked (CVE-2026-1)" in err
    assert len(err.splitlines()) == 1
    # ...and a revoked build cannot be promoted again.
    assert main(["promote", "web", "--channel", "dev", "--build", str(second), *reg]) == 1
    assert "is revoked (CVE-2026-1); not promoted" in capsys.readouterr().err


def test_channels_show_what_a_base_affects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = ["--registry", str(tmp_path / "build")]
    one = qemu_build(tmp_path / "one", n=0)
    two = qemu_build(tmp_path / "two", n=1)
    assert main(["promote", "web", "--channel", "prod", "--build", str(one), *registry]) == 0
    assert main(["promote", "web", "--channel", "dev", "--build", str(two), *registry]) == 0
    capsys.readouterr()
    base = json.loads(one.read_text())["parent"]["id"]
    assert main(["channels", "web", *registry, "--affected-by", base, "--json"]) == 0
    assert [p["channel"] for p in json.loads(capsys.readouterr().out)] == ["prod"]


def test_a_rebuilt_image_is_not_promoted_under_the_old_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = qemu_build(tmp_path / "one")
    (tmp_path / "one" / "web.qcow2").write_bytes(b"something else")
    args = ["promote", "web", "--channel", "prod", "--build", str(manifest)]
    assert main([*args, "--registry", str(tmp_path / "build")]) == 1
    assert f"{manifest}: output.sha256: " in capsys.readouterr().err


def test_promote_bad_input_names_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = qemu_build(tmp_path / "one")
    registry = tmp_path / "build"
    registry.mkdir()
    (registry / "channels.json").write_text(
        json.dumps({"images": {"web": {"channels": {"prod": [{"channel": "prod"}]}}}})
    )
    assert main(["channels", "web", "--registry", str(registry)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"meshbake: error: {registry / 'channels.json'}: images.web.channels.prod[0].build:"
        " missing or not a string"
    )
    assert main(["promote", "api", "--channel", "prod", "--build", str(manifest)]) == 1
    assert f"{manifest}: image: the build is of web, not api" in capsys.readouterr().err
    assert main(["promote", "web", "--channel", "Prod!", "--build", str(manifest)]) == 1
    assert "--channel 'Prod!'" in capsys.readouterr().err


def test_concurrent_promotes_lose_no_entry(tmp_path: Path) -> None:
    """Separate processes promote at once; every one of them is in the history."""
    registry = tmp_path / "build"
    count = 8
    manifests = [qemu_build(tmp_path / f"b{i}", n=i) for i in range(count)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "builder", "promote", "web", "--channel", "prod",
             "--build", str(m), "--registry", str(registry), "--by", f"job-{i}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for i, m in enumerate(manifests)
    ]  # fmt: skip
    for p in procs:
        _out, err = p.communicate()
        assert p.returncode == 0, err
    history = rel.LocalRegistry(registry).read("web").history[("prod", None)]
    assert sorted(e.by for e in history) == sorted(f"job-{i}" for i in range(count))


#: A promote that stops for good inside its write: the new registry is in its temp
#: file, flushed, but not yet renamed over the old one.
_STOPS_MID_WRITE = """
import os, sys, time
from pathlib import Path
from builder.cli.main import main
real_fsync = os.fsync
def stop(fd):
    Path(sys.argv[1]).write_text("writing")
    time.sleep(3600)
os.fsync = stop
sys.exit(main(sys.argv[2:]))
"""


def test_a_writer_killed_mid_write_leaves_the_registry_whole(tmp_path: Path) -> None:
    registry = tmp_path / "build"
    first = qemu_build(tmp_path / "one", n=0)
    second = qemu_build(tmp_path / "two", n=1)
    assert run_cli("promote", "web", "--channel", "prod", "--build", str(first),
                   "--registry", str(registry)).returncode == 0  # fmt: skip
    before = (registry / "channels.json").read_bytes()
    marker = tmp_path / "in-write"
    child = subprocess.Popen(
        [sys.executable, "-c", _STOPS_MID_WRITE, str(marker), "promote", "web", "--channel",
         "prod", "--build", str(second), "--registry", str(registry)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        while not marker.exists():
            assert child.poll() is None, "the writer ended before it wrote"
            time.sleep(0.05)
        assert list(registry.glob(".channels.json.*.tmp")), "the write is under way"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    # The old registry, byte for byte, and it still reads.
    assert (registry / "channels.json").read_bytes() == before
    assert len(rel.LocalRegistry(registry).read("web").history[("prod", None)]) == 1
    # The dead writer's lock went with it; the next promote lands and tidies up.
    done = run_cli("promote", "web", "--channel", "prod", "--build", str(second),
                   "--registry", str(registry))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(rel.LocalRegistry(registry).read("web").history[("prod", None)]) == 2
    assert not list(registry.glob(".channels.json.*.tmp"))


def test_a_build_records_its_parent_and_is_promoted_from_its_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``build`` (with the Packer double) writes arch and parent; promote takes that."""
    from tests.unit.test_pipeline import make_pipeline

    pipeline = make_pipeline(tmp_path, monkeypatch, "1.6.6")
    result = pipeline.build(WEB)
    assert result.manifest is not None
    written = json.loads(result.manifest.read_text())
    assert written["arch"] == "amd64"
    assert written["parent"] == {"kind": "base-image", "id": "sha256:" + "0" * 64}
    registry = ["--registry", str(tmp_path / "registry")]
    assert (
        main(["promote", "web", "--channel", "dev", "--build", str(result.manifest), *registry])
        == 0
    )
    capsys.readouterr()
    assert main(["channels", "web", *registry, "--affected-by", "sha256:" + "0" * 64]) == 0
    assert capsys.readouterr().out.startswith("dev  sha256:")


def _with_targets(tmp_path: Path, targets: dict[str, object]) -> Path:
    """web.yaml with ``targets`` replaced, beside a copy of its files."""
    data = yaml.safe_load(WEB.read_text())
    data["targets"] = targets
    shutil.copytree(REPO / "images" / "files", tmp_path / "files", dirs_exist_ok=True)
    spec = tmp_path / "web.yaml"
    spec.write_text(yaml.safe_dump(data))
    return spec


@pytest.mark.parametrize(
    ("targets", "qemu", "aws"),
    [
        ({"qemu": {}}, ("amd64",), ()),
        ({"aws": {"region": "us-east-1", "source_ami": {"architecture": "arm64"}}}, (), ("arm64",)),
        ({"aws": {"region": "us-east-1", "arch": ["x86_64", "arm64"]}}, (), ("amd64", "arm64")),
        ({"aws": {"region": "us-east-1", "arch": "aarch64"}}, (), ("arm64",)),
        ({"qemu": {"arch": "x86_64"}, "aws": {"region": "us-east-1"}}, ("amd64",), ("amd64",)),
    ],
)
def test_arches_come_from_the_spec_and_may_be_a_list(
    tmp_path: Path, targets: dict[str, object], qemu: tuple[str, ...], aws: tuple[str, ...]
) -> None:
    from builder.bake.arch import target_arches
    from builder.spec.model import load_spec

    spec = load_spec(_with_targets(tmp_path, targets)).spec
    assert target_arches(spec, "qemu") == qemu
    assert target_arches(spec, "aws") == aws


def test_plan_lists_one_aws_job_per_arch_and_region_each_building_its_arch(
    tmp_path: Path,
) -> None:
    spec = _with_targets(
        tmp_path,
        {"aws": {"region": "us-east-1", "ami_regions": ["eu-west-1"], "arch": ["amd64", "arm64"]}},
    )
    done = run_cli("plan", str(spec), "--json")
    assert done.returncode == 0, done.stderr
    jobs = {j["id"]: j for j in json.loads(done.stdout)}
    assert sorted(jobs) == [
        "web-aws-amd64-eu-west-1",
        "web-aws-amd64-us-east-1",
        "web-aws-arm64-eu-west-1",
        "web-aws-arm64-us-east-1",
    ]
    # Each architecture's home-region job builds that architecture only, into its own
    # folder; the copy region's entry points at it.
    arm = jobs["web-aws-arm64-us-east-1"]
    assert arm["command"][arm["command"].index("--arch") + 1] == "arm64"
    assert jobs["web-aws-arm64-eu-west-1"]["command"] is None
    assert jobs["web-aws-arm64-eu-west-1"]["built_by"] == "web-aws-arm64-us-east-1"
    assert len({j["out"] for j in jobs.values()}) == 2


def test_plan_gives_each_local_architecture_its_job(tmp_path: Path) -> None:
    spec = _with_targets(tmp_path, {"qemu": {"arch": ["amd64", "arm64"]}})
    done = run_cli("plan", str(spec), "--json")
    assert done.returncode == 0, done.stderr
    jobs = {j["id"]: j for j in json.loads(done.stdout)}
    assert sorted(jobs) == ["web-qemu-amd64", "web-qemu-arm64"]
    for arch in ("amd64", "arm64"):
        command = jobs[f"web-qemu-{arch}"]["command"]
        assert command[command.index("--arch") + 1] == arch
    assert jobs["web-qemu-amd64"]["out"] != jobs["web-qemu-arm64"]["out"]
    # The CI examples verify the job's own qcow2, whose name carries the architecture.
    for arch, name in (("amd64", "web.qcow2"), ("arm64", "web-arm64.qcow2")):
        job = jobs[f"web-qemu-{arch}"]
        assert job["output"] == f"{job['out']}/{name}"


def test_plan_refuses_two_specs_of_one_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(REPO / "images" / "files", tmp_path / "files")
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(WEB.read_text())
    assert main(["plan", str(tmp_path), "--json"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"meshbake: error: {tmp_path / 'b.yaml'}: name: image web is also defined in"
        f" {tmp_path / 'a.yaml'}; each image needs its own name\n"
    )
