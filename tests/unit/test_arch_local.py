"""The local arm64 path's pure parts: the per-architecture qemu facts and the argv they
make, the accelerator choice, the Packer sources rendered from the same facts, the
base image's key and name per architecture, the per-architecture file names, and
verify's mesh inputs for an image this host cannot run itself."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from builder.bake import base
from builder.cli.main import mesh_inputs
from builder.errors import UserError
from builder.release.plan import collect
from builder.render import hcl
from builder.render.context import render_context
from builder.spec.model import Accelerator, Arch, load_spec
from builder.tools import qemu
from builder.tools.packer import PackerVersion
from tests.paths import REPO

#: The amd64 base's key before there were several architectures: caches built then
#: must still be found, so this must never change by accident.
AMD64_BASE_KEY = "8f26152f5699d0b4af12a8d4f9559defb62fbbc234eafc8765f2bd74bbeb2619"


def _arm64(vars_value: str) -> list[str]:
    """arm64's argv under TCG: the virt board, UEFI code read-only, the VM's own vars."""
    return [
        "qemu-system-aarch64",
        "-machine",
        "virt,accel=tcg,pflash0=efi-code,pflash1=efi-vars",
        "-blockdev",
        "node-name=efi-code,driver=file,filename=/usr/share/AAVMF/AAVMF_CODE.fd,read-only=on",
        "-blockdev",
        f"node-name=efi-vars,driver=file,filename={vars_value}",
        "-cpu",
        "max,pauth-impdef=on",
    ]


@pytest.mark.parametrize(
    ("arch", "accel", "vars_file", "want"),
    [
        # amd64: exactly the argv verify always had (qemu's default pc machine, BIOS).
        (Arch.AMD64, Accelerator.TCG, None, ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max"]),
        (
            Arch.AMD64,
            Accelerator.KVM,
            None,
            ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host"],
        ),
        (Arch.ARM64, Accelerator.TCG, Path("/w/efi-vars.fd"), _arm64("/w/efi-vars.fd")),
        # A comma in a path would end qemu's option value: it is doubled.
        (Arch.ARM64, Accelerator.TCG, Path("/w,x/vars.fd"), _arm64("/w,,x/vars.fd")),
    ],
)
def test_vm_argv_per_architecture(
    arch: Arch, accel: Accelerator, vars_file: Path | None, want: list[str]
) -> None:
    assert qemu.accel_args(qemu.machine_for(arch), accel, vars_file) == want


def test_a_uefi_machine_refuses_to_boot_without_its_own_vars() -> None:
    with pytest.raises(ValueError, match="vars"):
        qemu.machine_args(qemu.machine_for(Arch.ARM64), "tcg", None)


@pytest.mark.parametrize(
    ("host", "guest", "choice", "kvm", "want"),
    [
        (Arch.AMD64, Arch.AMD64, Accelerator.AUTO, True, Accelerator.KVM),
        (Arch.AMD64, Arch.AMD64, Accelerator.AUTO, False, Accelerator.TCG),
        (Arch.AMD64, Arch.AMD64, Accelerator.KVM, False, Accelerator.KVM),  # asked for
        # Another architecture's guest is always translated, whatever was asked.
        (Arch.AMD64, Arch.ARM64, Accelerator.AUTO, True, Accelerator.TCG),
        (Arch.AMD64, Arch.ARM64, Accelerator.KVM, True, Accelerator.TCG),
        (Arch.ARM64, Arch.ARM64, Accelerator.AUTO, True, Accelerator.KVM),
        (Arch.ARM64, Arch.AMD64, Accelerator.KVM, True, Accelerator.TCG),
        (None, Arch.AMD64, Accelerator.AUTO, True, Accelerator.TCG),
    ],
)
def test_kvm_only_for_the_hosts_own_architecture(
    monkeypatch: pytest.MonkeyPatch,
    host: Arch | None,
    guest: Arch,
    choice: Accelerator,
    kvm: bool,
    want: Accelerator,
) -> None:
    monkeypatch.setattr(qemu, "host_arch", lambda: host)
    monkeypatch.setattr(qemu, "kvm_usable", lambda: kvm)
    assert qemu.choose_accelerator(choice, guest) is want


@pytest.mark.parametrize(("arch", "patience"), [(Arch.AMD64, 1.0), (Arch.ARM64, 3.0)])
def test_a_translated_guest_gets_longer_deadlines(
    monkeypatch: pytest.MonkeyPatch, arch: Arch, patience: float
) -> None:
    monkeypatch.setattr(qemu, "host_arch", lambda: Arch.AMD64)
    assert qemu.patience(arch) == patience


def _sources(spec: str) -> dict[str, dict[str, object]]:
    loaded = load_spec(REPO / "images" / spec)
    text = hcl.sources_file(loaded, PackerVersion(1, 6, 6))
    parsed = hcl.hcl2.loads(text)
    found: dict[str, dict[str, object]] = {}
    for block in parsed["source"]:
        for kind, named in block.items():
            for name, body in named.items():
                found[f"{_unquote(kind)}.{_unquote(name)}"] = _unquote(body)
    return found


def _unquote(value: object) -> object:
    """python-hcl2 keeps a string's quotes; a ``var.x`` reference comes as ``${var.x}``."""
    if isinstance(value, str):
        return json.loads(value) if value.startswith('"') else value
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, dict):
        return {k: _unquote(v) for k, v in value.items()}
    return value


def test_the_template_has_a_qemu_source_per_architecture_from_the_same_facts() -> None:
    sources = _sources("api.yaml")
    assert sorted(s for s in sources if s.startswith("qemu.")) == ["qemu.api", "qemu.api-arm64"]
    arm = sources["qemu.api-arm64"]
    facts = qemu.machine_for(Arch.ARM64)
    assert arm["qemu_binary"] == facts.binary
    assert arm["machine_type"] == facts.machine
    assert arm["vm_name"] == "api-arm64.qcow2"
    args = arm["qemuargs"]
    assert isinstance(args, list)
    tail = [value for pair in args[-3:] for value in pair]
    assert tail == qemu.machine_args(facts, "${var.accelerator}", "${var.efi_vars}")
    # amd64's source is what it always was: Packer's own machine and BIOS.
    amd = sources["qemu.api"]
    assert "qemu_binary" not in amd and "machine_type" not in amd
    assert amd["vm_name"] == "api.qcow2"
    assert all(pair[0] != "-machine" for pair in amd["qemuargs"])  # type: ignore[attr-defined]


@pytest.mark.parametrize(("spec", "has_vars"), [("api.yaml", True), ("web.yaml", False)])
def test_only_a_uefi_source_brings_the_efi_vars_variable(spec: str, has_vars: bool) -> None:
    text = hcl.variables_file(load_spec(REPO / "images" / spec).spec)
    assert ('variable "efi_vars"' in text) is has_vars


def test_the_build_runs_each_architecture_alone() -> None:
    spec = load_spec(REPO / "images" / "api.yaml").spec
    assert hcl.qemu_sources(spec) == {Arch.AMD64: "qemu.api", Arch.ARM64: "qemu.api-arm64"}
    assert hcl.enabled_sources(spec) == ["qemu.api", "qemu.api-arm64"]


def test_the_amd64_base_keeps_its_key_and_name() -> None:
    assert base.base_key() == AMD64_BASE_KEY
    assert base.base_key(arch=Arch.AMD64) == AMD64_BASE_KEY
    assert base.base_name() == f"debian-bookworm-{AMD64_BASE_KEY}-4g"
    assert base.base_packages(Arch.AMD64) == base.BASE_PACKAGES


def test_the_arm64_base_has_its_own_key_name_kernel_and_grub() -> None:
    key = base.base_key(arch=Arch.ARM64)
    assert key != AMD64_BASE_KEY
    # The architecture is in the key itself, not only in the package names.
    assert key != base.base_key(packages=base.base_packages(Arch.ARM64))
    assert base.base_name(arch=Arch.ARM64) == f"debian-bookworm-arm64-{key}-4g"
    packages = set(base.base_packages(Arch.ARM64))
    assert {"linux-image-cloud-arm64", "grub-efi-arm64"} <= packages
    assert not packages & {"linux-image-cloud-amd64", "grub-pc"}
    assert packages - {"linux-image-cloud-arm64", "grub-efi-arm64"} == set(base.BASE_PACKAGES) - {
        "linux-image-cloud-amd64",
        "grub-pc",
    }


@pytest.mark.parametrize(
    ("image", "arch", "manifest"),
    [
        ("api.qcow2", Arch.AMD64, "manifest.json"),
        ("api-arm64.qcow2", Arch.ARM64, "manifest-arm64.json"),
        ("arm64.qcow2", Arch.AMD64, "manifest.json"),  # a name, not a suffix
    ],
)
def test_per_architecture_file_names(image: str, arch: Arch, manifest: str) -> None:
    assert hcl.qcow2_arch(image) is arch
    assert hcl.manifest_name(arch) == manifest


def _arm64_build(tmp_path: Path, mesh: object) -> Path:
    """A build folder with an arm64 qcow2's manifest; the cache holds its artifacts."""
    cache = tmp_path / "cache"
    blobs = cache / "artifacts" / "sha256"
    blobs.mkdir(parents=True)
    digests = {}
    for name in ("consul-arm64", "envoy-arm64", "consul-host", "envoy-host"):
        data = name.encode()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        digests[name] = digest
    folder = tmp_path / "build"
    folder.mkdir()
    (folder / "api-arm64.qcow2").write_bytes(b"")
    manifest: dict[str, object] = {
        "image": "api",
        "target": "qemu",
        "spec_hash": "0" * 64,
        "arch": "arm64",
        "output": {"path": "api-arm64.qcow2"},
        "artifacts": [
            {"name": "consul", "sha256": digests["consul-arm64"]},
            {"name": "envoy", "sha256": digests["envoy-arm64"]},
        ],
    }
    if mesh == "host":
        manifest["mesh_artifacts"] = {
            "arch": Arch.AMD64.value,
            "artifacts": [
                {"name": "consul", "sha256": digests["consul-host"]},
                {"name": "envoy", "sha256": digests["envoy-host"]},
            ],
        }
    elif mesh is not None:
        manifest["mesh_artifacts"] = mesh
    (folder / "manifest-arm64.json").write_text(json.dumps(manifest))
    return folder


def test_verify_mesh_of_an_arm64_image_runs_the_hosts_binaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builder.cli.main as cli_main

    monkeypatch.setattr(cli_main, "host_arch", lambda: Arch.AMD64)
    folder = _arm64_build(tmp_path, "host")
    inputs = mesh_inputs(folder / "api-arm64.qcow2", None, None, tmp_path / "cache")
    assert inputs.consul_zip.read_bytes() == b"consul-host"
    assert inputs.envoy.read_bytes() == b"envoy-host"


@pytest.mark.parametrize("mesh", [None, {"arch": "arm64", "artifacts": []}, "not a mapping"])
def test_verify_mesh_without_the_hosts_binaries_says_what_to_give(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mesh: object
) -> None:
    import builder.cli.main as cli_main

    monkeypatch.setattr(cli_main, "host_arch", lambda: Arch.AMD64)
    folder = _arm64_build(tmp_path, mesh)
    with pytest.raises(UserError) as caught:
        mesh_inputs(folder / "api-arm64.qcow2", None, None, tmp_path / "cache")
    message = str(caught.value)
    assert "manifest-arm64.json: the image is arm64" in message
    assert "give --consul-zip and --envoy" in message
    assert "\n" not in message


def test_collect_takes_every_architectures_manifest_of_a_folder(tmp_path: Path) -> None:
    folder = _arm64_build(tmp_path, "host")
    amd = json.loads((folder / "manifest-arm64.json").read_text())
    amd |= {"arch": "amd64", "output": {"path": "api.qcow2"}}
    (folder / "manifest.json").write_text(json.dumps(amd))
    record = collect([folder], tmp_path / "release")
    builds = record["builds"]
    assert isinstance(builds, list)
    assert sorted(b["arch"] for b in builds) == ["amd64", "arm64"]


def test_the_rendered_api_context_names_both_sources(tmp_path: Path) -> None:
    loaded = load_spec(REPO / "images" / "api.yaml")
    ctx = render_context(loaded, tmp_path / "ctx", packer=None)
    build = (ctx.packer_dir / "build.pkr.hcl").read_text()
    assert '"source.qemu.api"' in build and '"source.qemu.api-arm64"' in build
    assert yaml.safe_load((REPO / "images" / "api.yaml").read_text())["targets"]["qemu"][
        "arch"
    ] == ["amd64", "arm64"]


def test_a_foreign_base_without_qemu_user_names_the_packages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where binfmt_misc has no qemu-user entry for the architecture, the base build
    stops in one line before anything is made."""
    facts = dataclasses.replace(qemu.machine_for(Arch.ARM64), uname="meshbake-no-such-machine")
    monkeypatch.setattr(base, "host_arch", lambda: Arch.AMD64)
    monkeypatch.setattr(base, "machine_for", lambda arch: facts)
    with pytest.raises(UserError) as caught:
        base._check_foreign_exec(Arch.ARM64)
    message = str(caught.value)
    assert "qemu-meshbake-no-such-machine is not enabled" in message
    assert "apt-get install qemu-user-static binfmt-support" in message
    # On the architecture's own host nothing is asked of binfmt_misc.
    monkeypatch.setattr(base, "host_arch", lambda: Arch.ARM64)
    base._check_foreign_exec(Arch.ARM64)


@pytest.mark.parametrize(
    ("manifest", "want"),
    [
        (None, Arch.ARM64),  # no manifest: the file name says
        ({"arch": "arm64"}, Arch.ARM64),
        ({"arch": "amd64"}, Arch.AMD64),  # the manifest has the last word
    ],
)
def test_verify_boots_the_architecture_the_manifest_records(
    tmp_path: Path, manifest: dict[str, str] | None, want: Arch
) -> None:
    from builder.verify.runner import image_arch

    image = tmp_path / "api-arm64.qcow2"
    image.write_bytes(b"")
    if manifest is not None:
        (tmp_path / "manifest-arm64.json").write_text(json.dumps(manifest))
    assert image_arch(image) is want


def test_verify_refuses_a_manifest_naming_no_architecture_in_one_line(tmp_path: Path) -> None:
    from builder.verify.runner import image_arch

    image = tmp_path / "api-arm64.qcow2"
    image.write_bytes(b"")
    (tmp_path / "manifest-arm64.json").write_text(json.dumps({"arch": "riscv64\n"}))
    with pytest.raises(UserError) as caught:
        image_arch(image)
    assert str(caught.value).startswith(f"{tmp_path / 'manifest-arm64.json'}: arch: ")
    assert "is not amd64 or arm64" in str(caught.value)


def test_an_arm64_bake_goes_on_without_the_hosts_mesh_binaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host's Consul and Envoy are verify's, not the image's: when they cannot be
    had (a user's --consul-zip, no mirror), the bake says so and goes on."""
    from builder.bake import run as build

    def unavailable(run: build.BuildRun, arch: Arch, *, for_host: bool = False) -> list[object]:
        assert for_host and arch is Arch.AMD64
        raise UserError("consul 2.0.0: no route to releases.hashicorp.com")

    said: list[str] = []
    monkeypatch.setattr(build, "host_arch", lambda: Arch.AMD64)
    monkeypatch.setattr(build, "_fetch_artifacts", unavailable)
    loaded = load_spec(REPO / "images" / "api.yaml")
    run = build.BuildRun(loaded, build.BuildOptions(), tmp_path, tmp_path, said.append)
    assert build.QemuBuild()._mesh_artifacts(run, Arch.ARM64) is None
    assert said == [
        "api: warning: no amd64 Consul and Envoy for verify's local mesh (consul 2.0.0: no"
        " route to releases.hashicorp.com); verify will need --consul-zip and --envoy"
    ]
    # An image of the host's own architecture needs none.
    assert build.QemuBuild()._mesh_artifacts(run, Arch.AMD64) is None
