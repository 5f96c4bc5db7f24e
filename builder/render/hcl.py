"""The Packer HCL2 template, written with python-hcl2's ``Builder``.

One build block bakes for every enabled target with the same provisioners, so the
qemu image and the AMI get exactly the same bake. String values carry their own quotes
(``json.dumps``): ``q`` for meshbake's own strings, which may interpolate on purpose
(``${path.root}``), and ``lit`` for text from the spec, which never does.

>>> from builder.spec.model import load_spec
>>> files = packer_files(load_spec("images/web.yaml"), PackerVersion(1, 6, 6))
>>> sorted(files)
['build.pkr.hcl', 'sources.pkr.hcl', 'variables.pkr.hcl']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import hcl2

from builder import __version__
from builder.render import escape, paths, tags
from builder.spec.model import BUILD_USER, Arch, BaseDistro, ImageSpec, LoadedSpec
from builder.tools.packer import PackerVersion
from builder.tools.qemu import machine_args, machine_for

STAGE_IN_VM = paths.BAKE_STAGE
FINALIZE_IN_VM = paths.FINALIZE
BUILD_TIME_TAG = tags.BUILD_TIME

#: Source AMI owners, name patterns (``{arch}``: Debian's name, which both Debian's and
#: Canonical's AMI names use) and login users per base.
AMI_DEFAULTS: dict[BaseDistro, tuple[str, str, str]] = {
    BaseDistro.DEBIAN_12: ("136693071363", "debian-12-{arch}-*", "admin"),
    BaseDistro.UBUNTU_2204: (
        "099720109477",
        "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-{arch}-server-*",
        "ubuntu",
    ),
    BaseDistro.UBUNTU_2404: (
        "099720109477",
        "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-{arch}-server-*",
        "ubuntu",
    ),
}

#: Where each AWS source's artifacts are staged, relative to the template's folder:
#: ``artifacts/<source name>/`` beside ``stage/`` (Consul and Envoy differ per arch).
AWS_ARTIFACTS = "${path.root}/../artifacts/${source.name}/"


def ami_name_pattern(base: BaseDistro, arch: Arch) -> str:
    """The default source AMI name pattern of ``base`` for ``arch``.

    >>> ami_name_pattern(BaseDistro.DEBIAN_12, Arch.ARM64)
    'debian-12-arm64-*'
    """
    return AMI_DEFAULTS[base][1].format(arch=arch.value)


def source_name(spec: ImageSpec, arch: Arch) -> str:
    """The Packer source of ``arch``'s image (AMI or qcow2): the image's name for amd64
    (as before there were several), ``<name>-<arch>`` for the others.

    >>> from builder.spec.model import load_spec
    >>> source_name(load_spec("images/web.yaml").spec, Arch.ARM64)
    'web-arm64'
    """
    return spec.name + arch_suffix(arch)


def arch_suffix(arch: Arch) -> str:
    """What names of ``arch``'s files and sources carry: nothing for amd64.

    >>> arch_suffix(Arch.AMD64), arch_suffix(Arch.ARM64)
    ('', '-arm64')
    """
    return "" if arch is Arch.AMD64 else f"-{arch.value}"


#: An AMI's source is named as any other.
aws_source_name = source_name


def qcow2_name(spec: ImageSpec, arch: Arch) -> str:
    """The file name of ``arch``'s qcow2 (``web.qcow2``, ``web-arm64.qcow2``)."""
    return f"{source_name(spec, arch)}.qcow2"


def manifest_name(arch: Arch) -> str:
    """The build manifest of ``arch``'s qcow2, beside it in the build folder.

    >>> manifest_name(Arch.AMD64), manifest_name(Arch.ARM64)
    ('manifest.json', 'manifest-arm64.json')
    """
    return f"manifest{arch_suffix(arch)}.json"


def qcow2_arch(image_name: str) -> Arch:
    """The architecture a qcow2's file name says (``web-arm64.qcow2``: arm64); amd64
    when it names none. The manifest beside the image has the last word.

    >>> qcow2_arch("api-arm64.qcow2"), qcow2_arch("api.qcow2")
    (<Arch.ARM64: 'arm64'>, <Arch.AMD64: 'amd64'>)
    """
    stem = image_name.removesuffix(".qcow2")
    return next(
        (a for a in Arch if a is not Arch.AMD64 and stem.endswith(arch_suffix(a))), Arch.AMD64
    )


def qemu_sources(spec: ImageSpec) -> dict[Arch, str]:
    """Architecture -> Packer ``-only`` name of its qemu source (none without qemu)."""
    if spec.targets.qemu is None:
        return {}
    return {a: f"qemu.{source_name(spec, a)}" for a in spec.targets.qemu.arch}


def aws_sources(spec: ImageSpec) -> dict[Arch, str]:
    """Architecture -> Packer ``-only`` name of its amazon-ebs source (none without aws)."""
    if spec.targets.aws is None:
        return {}
    return {a: f"amazon-ebs.{aws_source_name(spec, a)}" for a in spec.targets.aws.arches}


def q(value: str) -> str:
    """Quote meshbake's own text for HCL (see ``escape.hcl_string``).

    >>> q('a "b"')
    '"a \\\\"b\\\\""'
    """
    return escape.hcl_string(value)


def lit(value: str) -> str:
    """Quote spec text for HCL so Packer reads it literally (see ``escape.hcl_literal``).

    >>> lit("costs ${x}")
    '"costs $${x}"'
    """
    return escape.hcl_literal(value)


def _qlist(values: Iterable[object]) -> list[str]:
    return [lit(str(v)) for v in values]


def _dump(builder: hcl2.Builder) -> str:
    document: dict[str, Any] = builder.build()  # type: ignore[no-untyped-call]
    text: str = hcl2.dumps(document)
    return text.strip() + "\n"


def source_ref(kind: str, name: str) -> str:
    return f"source.{kind}.{name}"


def enabled_sources(spec: ImageSpec) -> list[str]:
    """Packer ``-only`` names of the enabled targets, e.g. ``qemu.web``."""
    return [*qemu_sources(spec).values(), *aws_sources(spec).values()]


def _uefi(spec: ImageSpec) -> bool:
    """Whether one of the qemu sources boots UEFI firmware (and so needs its vars)."""
    arches = spec.targets.qemu.arch if spec.targets.qemu is not None else ()
    return any(machine_for(a).firmware is not None for a in arches)


def variables_file(spec: ImageSpec | None = None) -> str:
    b = hcl2.Builder()
    variables: dict[str, tuple[str, str]] = {
        "base_image": ("", "Path or URL of the base qcow2 (qemu)."),
        "base_checksum": ("none", "Checksum of the base qcow2, e.g. sha256:..."),
        "output_directory": ("output", "Where Packer writes the qcow2; must not exist."),
        "accelerator": ("tcg", "qemu accelerator: kvm where it really works, else tcg."),
        "cpu_model": ("max", "qemu -cpu: host with kvm, max with tcg."),
        "ssh_private_key_file": ("", "Ephemeral key of the build user (qemu)."),
        "manifest": ("packer-manifest.json", "Where the manifest post-processor writes."),
        "serial_log": ("serial.log", "The build VM's serial console log (qemu)."),
    }
    if spec is not None and _uefi(spec):
        variables["efi_vars"] = ("", "The build VM's own copy of its UEFI variables (qemu).")
    for name, (default, description) in variables.items():
        b.block(
            "variable", [q(name)], type="string", default=q(default), description=q(description)
        )
    b.block("locals", None, stamp='formatdate("YYYYMMDD-hhmmss", timestamp())')
    return _dump(b)


def plugins_file() -> str:
    """``packer { required_plugins }``: only for Packer 1.7+ (1.6 rejects the block)."""
    b = hcl2.Builder()
    packer = b.block("packer", None)
    packer.block(
        "required_plugins",
        None,
        qemu={"version": q(">= 1.1.0"), "source": q("github.com/hashicorp/qemu")},
        amazon={"version": q(">= 1.3.0"), "source": q("github.com/hashicorp/amazon")},
    )
    return _dump(b)


def sources_file(loaded: LoadedSpec, packer: PackerVersion) -> str:
    spec = loaded.spec
    b = hcl2.Builder()
    if spec.targets.qemu is not None:
        for arch in spec.targets.qemu.arch:
            _qemu_source(b, spec, arch)
    if spec.targets.aws is not None:
        for arch in spec.targets.aws.arches:
            _aws_source(b, loaded, packer, arch)
    return _dump(b)


def _qemu_source(b: hcl2.Builder, spec: ImageSpec, arch: Arch) -> None:
    qemu = spec.targets.qemu
    assert qemu is not None
    facts = machine_for(arch)
    netdev = "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"
    # Other architectures than amd64 name their qemu, machine and firmware (from
    # builder.tools.qemu); amd64 keeps Packer's defaults, as it always had.
    machine: dict[str, Any] = {}
    extra: list[list[str]] = []
    if facts.machine is not None:
        machine = {"qemu_binary": q(facts.binary), "machine_type": q(facts.machine)}
        # Packer's own -machine is replaced (one flag, one value): the firmware is in it.
        args = machine_args(facts, "${var.accelerator}", "${var.efi_vars}")
        extra = [[q(flag), q(value)] for flag, value in zip(args[::2], args[1::2], strict=True)]
    b.block(
        "source",
        [q("qemu"), q(source_name(spec, arch))],
        **machine,
        iso_url="var.base_image",
        iso_checksum="var.base_checksum",
        disk_image=True,
        # Packer 1.6.6 does not pass -F to qemu-img, so a backing file breaks: copy.
        use_backing_file=False,
        format=q("qcow2"),
        disk_size=q(qemu.disk_size),
        disk_interface=q("virtio"),
        disk_compression=True,
        accelerator="var.accelerator",
        cpus=qemu.cpus,
        memory=qemu.memory,
        headless=True,
        vnc_bind_address=q("127.0.0.1"),
        output_directory="var.output_directory",
        vm_name=q(qcow2_name(spec, arch)),
        cd_files=[
            q("${path.root}/../cloudinit/seed/user-data"),
            q("${path.root}/../cloudinit/seed/meta-data"),
        ],
        cd_label=q("cidata"),
        communicator=q("ssh"),
        ssh_username=q(BUILD_USER),
        ssh_private_key_file="var.ssh_private_key_file",
        ssh_timeout=q("20m"),
        shutdown_command=q(f"sudo /bin/sh {FINALIZE_IN_VM}"),
        shutdown_timeout=q("10m"),
        # Bind the SSH forward to loopback (Packer's default listens on every
        # interface) and keep the serial console for the build log.
        qemuargs=[
            [q("-netdev"), q(netdev)],
            [q("-device"), q("virtio-net,netdev=user.0")],
            [q("-cpu"), "var.cpu_model"],
            [q("-serial"), q("file:${var.serial_log}")],
            *extra,
        ],
    )


def _aws_source(b: hcl2.Builder, loaded: LoadedSpec, packer: PackerVersion, arch: Arch) -> None:
    spec = loaded.spec
    aws = spec.targets.aws
    assert aws is not None
    owner, _, user = AMI_DEFAULTS[spec.base]
    owners = aws.source_ami.owners or (owner,)
    # Only meshbake's build-time tag interpolates; every other key and value is literal.
    tags = {lit(k): q(v) if k == BUILD_TIME_TAG else lit(v) for k, v in image_tags(loaded).items()}
    attributes: dict[str, Any] = {
        "region": q(aws.region),
        "instance_type": q(aws.instance_type_for(arch)),
        "ami_name": q(f"{spec.name}-{loaded.digest[:12]}-${{local.stamp}}"),
        "ami_description": lit(spec.description or f"{spec.name}, baked by meshbake"),
        "ssh_username": q(aws.ssh_username or user),
        "encrypt_boot": True,
        "ami_regions": _qlist(aws.ami_regions),
        "ami_users": _qlist(aws.share.accounts),
        "tags": tags,
        "snapshot_tags": tags,
        "run_tags": {q("Name"): q(f"meshbake-build-{aws_source_name(spec, arch)}")},
    }
    if aws.share.orgs:
        attributes["ami_org_arns"] = _qlist(aws.share.orgs)
    if aws.share.ous:
        attributes["ami_ou_arns"] = _qlist(aws.share.ous)
    if aws.kms_key_id:
        attributes["kms_key_id"] = lit(aws.kms_key_id)
    if aws.subnet_id:
        attributes["subnet_id"] = lit(aws.subnet_id)
    if packer.supports_plugins:
        # The AMI itself requires IMDSv2 (amazon plugin 1.2+; not in Packer 1.6).
        attributes["imds_support"] = q("v2.0")
    source = b.block("source", [q("amazon-ebs"), q(aws_source_name(spec, arch))], **attributes)
    source.block(
        "source_ami_filter",
        None,
        filters={
            q("name"): lit(aws.source_ami.name or ami_name_pattern(spec.base, arch)),
            q("architecture"): q(arch.ec2),
            q("virtualization-type"): q("hvm"),
            q("root-device-type"): q("ebs"),
        },
        owners=_qlist(owners),
        most_recent=True,
    )
    if packer.supports_plugins:
        # IMDSv2 on the build instance; Packer 1.6's amazon-ebs has no such block.
        source.block(
            "metadata_options",
            None,
            http_endpoint=q("enabled"),
            http_tokens=q("required"),
            http_put_response_hop_limit=1,
        )
    source.block(
        "launch_block_device_mappings",
        None,
        device_name=q("/dev/xvda"),
        volume_size=aws.volume_size_gib,
        volume_type=q("gp3"),
        # Packer 1.6 validates gp3 throughput even when left at its default.
        throughput=125,
        iops=3000,
        delete_on_termination=True,
        encrypted=True,
    )


def image_tags(loaded: LoadedSpec) -> dict[str, str]:
    """Tags every AMI (and its snapshots) carries; meshbake's own are prefixed."""
    spec = loaded.spec
    found = dict(spec.targets.aws.tags) if spec.targets.aws else {}
    found |= {
        "Name": spec.name,
        tags.IMAGE: spec.name,
        tags.SPEC_HASH: loaded.digest,
        tags.CONSUL: spec.consul.version,
        tags.ENVOY: spec.envoy.version,
        tags.VERSION: __version__,
        tags.BUILD_TIME: "${local.stamp}",
    }
    return found


def build_file(loaded: LoadedSpec) -> str:
    spec = loaded.spec
    b = hcl2.Builder()
    build = b.block("build", None)
    build.attributes["sources"] = [
        q(source_ref(*name.split(".", 1))) for name in enabled_sources(spec)
    ]
    build.block("provisioner", [q("shell")], inline=[q(f"mkdir -p {STAGE_IN_VM}")])
    build.block(
        "provisioner",
        [q("file")],
        source=q("${path.root}/../stage/"),
        destination=q(STAGE_IN_VM),
    )
    aws = list(aws_sources(spec).values())
    if aws:
        # Each AMI gets its own architecture's Consul and Envoy (the qemu build's are
        # in stage/artifacts already).
        build.block(
            "provisioner",
            [q("file")],
            only=[q(name) for name in aws],
            source=q(AWS_ARTIFACTS),
            destination=q(f"{STAGE_IN_VM}/artifacts"),
        )
    # PACKER_BUILDER_TYPE tells the bake whether the build user is deleted (qemu) or
    # only loses its keys (amazon-ebs, where it is the distribution's default user).
    bake = f"sudo MESHBAKE_BUILDER=$PACKER_BUILDER_TYPE sh {STAGE_IN_VM}/scripts/meshbake-bake"
    build.block("provisioner", [q("shell")], inline=[q(bake)])
    build.block(
        "post-processor",
        [q("manifest")],
        output="var.manifest",
        strip_path=True,
        custom_data={
            q("spec_hash"): q(loaded.digest),
            q("consul"): q(spec.consul.version),
            q("envoy"): q(spec.envoy.version),
            q("meshbake"): q(__version__),
        },
    )
    return _dump(b)


def packer_files(loaded: LoadedSpec, packer: PackerVersion) -> dict[str, str]:
    """File name -> HCL text for ``DIR/packer/`` (not yet ``packer fmt``-ed)."""
    files = {
        "variables.pkr.hcl": variables_file(loaded.spec),
        "sources.pkr.hcl": sources_file(loaded, packer),
        "build.pkr.hcl": build_file(loaded),
    }
    if packer.supports_plugins:
        files["plugins.pkr.hcl"] = plugins_file()
    return files
