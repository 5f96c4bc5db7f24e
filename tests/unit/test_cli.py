"""The command line, called in-process through ``builder.cli.main``."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from builder import proc
from builder.cli import main as cli
from builder.render import cloudconfig
from builder.render.context import MARKER
from builder.spec.model import Arch
from builder.tools import qemu as qemu_tools
from tests.paths import REPO

AGENT = "6f1c3d2e-8a4b-4c5d-9e0f-1a2b3c4d5e6f"
SERVICE = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
DNS = "d0d5d0d5-1111-4222-8333-444455556666"


@pytest.fixture
def web(repo: Path) -> Path:
    return repo / "images" / "web.yaml"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "agent.token"
    path.write_text(AGENT + "\n")
    return path


@pytest.fixture
def images(repo: Path, tmp_path: Path) -> Path:
    out = tmp_path / "images"
    shutil.copytree(repo / "images", out)
    return out


@pytest.fixture
def broken(images: Path) -> Path:
    """A spec with three problems."""
    data = yaml.safe_load((images / "web.yaml").read_text())
    data["colour"] = "red"
    data["consul"]["version"] = "1.9.0"
    data["service"]["port"] = 70000
    path = images / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_broken_spec_exits_1_with_one_line_per_problem(
    broken: Path, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["userdata", str(broken), "--token-file", str(token_file)])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"meshbake: error: {broken}: ")
    paths = {line.removeprefix("meshbake: error: ").split(": ")[1] for line in lines}
    assert paths == {"colour", "consul.version", "service.port"}


def test_userdata_prints_cloud_config(
    web: Path, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["userdata", str(web), "--token-file", str(token_file)])
    out, err = capsys.readouterr()
    assert code == 0
    assert err == ""
    assert out.startswith("#cloud-config\n")
    (entry,) = yaml.safe_load(out)["write_files"]
    assert entry["path"] == cloudconfig.CARRIER
    assert entry["content"] == f"MESHBAKE_AGENT_TOKEN={AGENT}\n"


def test_userdata_with_separate_tokens(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = yaml.safe_load((images / "web.yaml").read_text())
    data["tokens"]["shared"] = False
    spec = images / "separate.yaml"
    spec.write_text(yaml.safe_dump(data))
    agent = tmp_path / "agent"
    agent.write_text(AGENT)
    service = tmp_path / "service"
    service.write_text(SERVICE)
    dns = tmp_path / "dns"
    dns.write_text(DNS)
    argv = ["userdata", str(spec), "--token-file", f"agent={agent}"]
    argv += ["--token-file", f"service={service}"]
    assert cli.main([*argv, "--token-file", f"dns={dns}"]) == 0
    out, _ = capsys.readouterr()
    content = yaml.safe_load(out)["write_files"][0]["content"]
    assert content == (
        f"MESHBAKE_AGENT_TOKEN={AGENT}\nMESHBAKE_SERVICE_TOKEN={SERVICE}\n"
        f"MESHBAKE_DNS_TOKEN={DNS}\n"
    )
    # Without the DNS token every lookup would be anonymous: refused, in one line.
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "give --token-file dns=FILE" in err
    assert len(err.splitlines()) == 1


def test_userdata_shared_token_with_a_dns_token(
    web: Path, token_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dns = tmp_path / "dns"
    dns.write_text(DNS + "\n")
    argv = ["userdata", str(web), "--token-file", str(token_file), "--token-file", f"dns={dns}"]
    assert cli.main(argv) == 0
    out, _ = capsys.readouterr()
    content = yaml.safe_load(out)["write_files"][0]["content"]
    assert content == f"MESHBAKE_AGENT_TOKEN={AGENT}\nMESHBAKE_DNS_TOKEN={DNS}\n"
    assert len(out.encode()) < 1024


def test_userdata_bad_token_role(
    web: Path, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["userdata", str(web), "--token-file", f"sidecar={token_file}"]) == 1
    assert "the role must be agent=, service= or dns=" in capsys.readouterr().err


def test_userdata_without_a_token(web: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["userdata", str(web)])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err == (
        f"meshbake: error: {web}: the spec has ACLs on: give the token with --token-file\n"
    )


def test_userdata_with_an_unreadable_token_file(
    web: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    assert cli.main(["userdata", str(web), "--token-file", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"meshbake: error: {missing}: cannot read the ACL token: ")
    assert len(err.splitlines()) == 1


def test_warnings_go_to_stderr(
    images: Path, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = yaml.safe_load((images / "web.yaml").read_text())
    data["mesh"] = {"destinations_only": True}
    spec = images / "closed.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert cli.main(["userdata", str(spec), "--token-file", str(token_file)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("#cloud-config")
    assert err.startswith(f"meshbake: warning: {spec}: mesh.destinations_only: ")


def test_unexpected_exception_exits_3_with_the_hint(
    web: Path,
    token_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def bug(values: object) -> str:
        raise RuntimeError("a bug, simulated")

    monkeypatch.setattr(cloudconfig, "first_boot_user_data", bug)
    code = cli.main(["userdata", str(web), "--token-file", str(token_file)])
    out, err = capsys.readouterr()
    assert code == 3
    assert out == ""
    assert "Traceback (most recent call last)" in err
    assert "RuntimeError: a bug, simulated" in err
    assert err.rstrip().endswith("please report it with the traceback above")


def test_missing_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent.yaml"
    assert cli.main(["userdata", str(missing)]) == 1
    assert capsys.readouterr().err == (
        f"meshbake: error: {missing}: cannot read: No such file or directory\n"
    )


def test_folder_without_specs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(tmp_path)]) == 1
    assert "no *.yaml image specs in this folder" in capsys.readouterr().err


def test_validate_broken_spec_exits_1(broken: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The spec gate fails before any tool runs.
    assert cli.main(["validate", str(broken)]) == 1
    out, err = capsys.readouterr()
    assert "FAIL  spec:" in out
    assert f"{broken}: consul.version: 1.9.0 is older than 1.11.1" in out
    assert out.rstrip().endswith("some gates failed")
    assert "Traceback" not in out + err


def test_validate_refuses_an_exclusion_consul_21_refuses(
    images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = yaml.safe_load((images / "web.yaml").read_text())  # Consul 2.1 (nftables)
    data["service"]["transparent_proxy"]["exclude_outbound_cidrs"] = ["::ffff:10.0.0.1/120"]
    spec = images / "mapped.yaml"
    spec.write_text(yaml.safe_dump(data))
    assert cli.main(["validate", str(spec)]) == 1
    out, err = capsys.readouterr()
    field = "service.transparent_proxy.exclude_outbound_cidrs[0]"
    assert f"{spec}: {field}: Consul 2.1 refuses it" in out
    assert "Traceback" not in out + err


# --- with the real tools ------------------------------------------------------------------


@pytest.mark.integration
def test_validate_example(web: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["validate", str(web)])
    out, _ = capsys.readouterr()
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{web}:"
    for gate in ("spec", "packer validate", "cloud-init schema", "shellcheck", "systemd-analyze"):
        assert any(line.startswith(f"  ok    {gate}") for line in lines), gate
    assert lines[-1] == "all gates passed"


@pytest.mark.integration
def test_validate_json(web: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", "--json", str(web)]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["spec"] == str(web)
    assert result["ok"] is True
    assert {g["name"] for g in result["gates"]} >= {"packer validate", "shellcheck"}
    assert all(g["ok"] is True for g in result["gates"])


@pytest.mark.integration
def test_userdata_passes_cloud_init_schema(
    web: Path, token_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["userdata", str(web), "--token-file", str(token_file)]) == 0
    user_data = tmp_path / "user-data"
    user_data.write_text(capsys.readouterr().out)
    done = proc.run(["cloud-init", "schema", "--config-file", user_data], check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Valid cloud-config" in done.stdout


@pytest.mark.integration
def test_render_writes_a_context(
    web: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "ctx"
    assert cli.main(["render", str(web), "--out", str(out_dir)]) == 0
    assert capsys.readouterr().out == f"{out_dir}\n"
    assert (out_dir / MARKER).is_file()
    assert (out_dir / "packer" / "sources.pkr.hcl").is_file()
    # render runs packer fmt: the template has no trailing blanks left by the Builder
    for hcl in (out_dir / "packer").glob("*.pkr.hcl"):
        assert not any(line != line.rstrip() for line in hcl.read_text().splitlines()), hcl


@pytest.mark.integration
def test_render_refuses_a_foreign_folder(
    web: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["render", str(web), "--out", str(tmp_path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_verify_host_needs_the_token_it_checks_for(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = str(repo / "images" / "web.yaml")
    assert cli.main(["verify", "--host", "ssh://admin@192.0.2.1", "--spec", spec]) == 1
    err = capsys.readouterr().err
    assert "--token-file" in err and "Traceback" not in err


def test_dry_run_is_refused_for_the_qemu_target(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["build", str(repo / "images" / "web.yaml"), "--dry-run"]) == 1
    assert "--target aws" in capsys.readouterr().err


def _imports_inside_functions(path: Path) -> set[str]:
    """Modules that ``path`` imports inside a function body (its lazy imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module:
                    names |= {f"{inner.module}.{a.name}" for a in inner.names} | {inner.module}
                elif isinstance(inner, ast.Import):
                    names |= {a.name for a in inner.names}
    return names


def test_lazy_imports_of_the_cli_are_not_loaded_by_its_start() -> None:
    """An import inside a command's function only pays off if starting the CLI has not
    loaded that module already; otherwise it belongs at the top."""
    lazy = set()
    for path in (REPO / "builder" / "cli").glob("*.py"):
        lazy |= _imports_inside_functions(path)
    assert lazy, "no lazy import found: this test would prove nothing"
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, builder.cli.main; print(*sys.modules)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    # "from builder.aws import client" names builder.aws (a package the start may load)
    # and builder.aws.client (the module that must not be loaded yet).
    modules = {name for name in lazy if name.count(".") >= 2 or name not in loaded}
    assert sorted(modules & set(loaded)) == []


@pytest.mark.integration
def test_userdata_with_join_passes_cloud_init_schema(
    web: Path, token_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["userdata", str(web), "--token-file", str(token_file)]
    assert cli.main([*argv, "--join", "198.18.0.1", "--join", "consul.mesh.example"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    (entry,) = yaml.safe_load(out)["write_files"]
    assert entry["content"].endswith("\nMESHBAKE_RETRY_JOIN=198.18.0.1 consul.mesh.example\n")
    user_data = tmp_path / "user-data"
    user_data.write_text(out)
    done = proc.run(["cloud-init", "schema", "--config-file", user_data], check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _two_arch(images: Path, **aws: object) -> Path:
    """web.yaml with AMIs for amd64 and arm64 (and no instance type, so each gets its own)."""
    data = yaml.safe_load((images / "web.yaml").read_text())
    target = data["targets"]["aws"]
    target.pop("instance_type")
    target |= {"arch": ["amd64", "arm64"], "ami_regions": ["eu-west-1"], **aws}
    spec = images / "graviton.yaml"
    spec.write_text(yaml.safe_dump(data))
    return spec


@pytest.mark.integration
def test_validate_two_architectures_with_the_real_packer(
    images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Packer (the installed one) accepts the template with one AMI source per arch,
    and each source looks for its own architecture's AMI on its own instance type."""
    import hcl2

    from builder.render.context import render_context
    from builder.spec.model import load_spec

    spec = _two_arch(images)
    assert cli.main(["validate", str(spec)]) == 0, capsys.readouterr().out
    ctx = render_context(load_spec(spec), images / "ctx")
    sources = hcl2.loads((ctx.packer_dir / "sources.pkr.hcl").read_text())["source"]

    def unq(text: str) -> str:  # python-hcl2 keeps a string's quotes
        return str(json.loads(text))

    ebs = {unq(name): body for s in sources for kind, named in s.items()
           if unq(kind) == "amazon-ebs" for name, body in named.items()}  # fmt: skip
    assert set(ebs) == {"web", "web-arm64"}
    shape = {}
    for name, body in ebs.items():
        filters = {unq(k): unq(v) for k, v in body["source_ami_filter"][0]["filters"].items()}
        shape[name] = (unq(body["instance_type"]), filters["name"], filters["architecture"])
    assert shape == {
        "web": ("t3.small", "debian-12-amd64-*", "x86_64"),
        "web-arm64": ("t4g.small", "debian-12-arm64-*", "arm64"),
    }
    # Each source uploads its own architecture's artifacts, staged beside the template.
    assert (ctx.root / "artifacts" / "web-arm64").is_dir()
    build = (ctx.packer_dir / "build.pkr.hcl").read_text()
    assert '"amazon-ebs.web-arm64"' in build
    assert "${path.root}/../artifacts/${source.name}/" in build


@pytest.mark.parametrize(
    ("missing", "package"),
    [
        ("binary", "qemu-system-arm"),
        ("code", "qemu-efi-aarch64"),
        ("vars", "qemu-efi-aarch64"),
    ],
)
def test_a_local_arm64_bake_without_its_qemu_names_the_package(
    images: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    missing: str,
    package: str,
) -> None:
    """The spec may ask for arm64 (the model does not look at the host); build, needing
    qemu and the firmware, says in one line which package to install, before it fetches
    or writes anything."""
    data = yaml.safe_load((images / "web.yaml").read_text())
    data["targets"]["qemu"]["arch"] = "arm64"
    spec = images / "pi.yaml"
    spec.write_text(yaml.safe_dump(data))
    facts = qemu_tools.MACHINES[Arch.ARM64]
    assert facts.firmware is not None
    absent = images / "no-such-firmware.fd"
    if missing == "binary":
        facts = dataclasses.replace(facts, binary="meshbake-no-such-qemu-system-aarch64")
    elif missing == "code":
        facts = dataclasses.replace(
            facts, firmware=dataclasses.replace(facts.firmware, code=absent)
        )
    else:
        facts = dataclasses.replace(
            facts, firmware=dataclasses.replace(facts.firmware, vars_template=absent)
        )
    monkeypatch.setitem(qemu_tools.MACHINES, Arch.ARM64, facts)
    assert cli.main(["build", str(spec), "--out", str(images / "b")]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert f"install it with 'apt-get install {package}'" in err
    assert "Traceback" not in err
    assert not (images / "b").exists()
