"""cloud-init documents: the qemu build seed and the minimal first-boot user data.

Documents are built as dicts and dumped with ``yaml.safe_dump``, never templated as
YAML text. The first-boot user data carries only the secrets (or a secret store
reference) in one ``write_files`` entry; the baked ``meshbake-firstboot.service``
notices the file, so no ``runcmd`` trigger is needed.

>>> doc = first_boot_user_data({"MESHBAKE_AGENT_TOKEN": "4d3c2b1a-0000-4000-8000-000000000000"})
>>> doc.startswith("#cloud-config")
True
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from builder.errors import UserError, reason
from builder.render import escape, paths
from builder.render.paths import CARRIER
from builder.spec import boundary
from builder.spec.model import BUILD_USER, ImageSpec, TokenSource

EC2_LIMIT = 16 * 1024
WARN_ABOVE = 1024

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def dump(document: Mapping[str, object]) -> str:
    """Dump a cloud-config dict under its ``#cloud-config`` header."""
    return escape.yaml_document(document, header="#cloud-config\n")


def baked_cloud_cfg() -> bytes:
    """The cloud.cfg.d drop-in baked into every image (``paths.CLOUD_CFG_DROPIN``)."""
    return cloud_cfg_dropin(paths.CLOUD_CFG_DROPIN)


def cloud_cfg_dropin(dest: str) -> bytes:
    """A shipped ``builder/image/cloud.cfg.d`` file, by where it goes in an image."""
    name = PurePosixPath(dest).name
    return resources.files("builder.image").joinpath("cloud.cfg.d", name).read_bytes()


def seed_user_data(public_key: str | None) -> str:
    """The qemu build seed: a throwaway build user reachable with an ephemeral key.

    The key pair lives only for one build; the user is deleted before shutdown.
    """
    user: dict[str, object] = {
        "name": BUILD_USER,
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "shell": "/bin/bash",
        "lock_passwd": True,
    }
    if public_key:
        user["ssh_authorized_keys"] = [public_key.strip()]
    return dump({"locale": "C.UTF-8", "ssh_pwauth": False, "users": [user]})


def seed_meta_data(name: str, instance_id: str) -> str:
    return yaml.safe_dump({"instance-id": instance_id, "local-hostname": f"{name}-build"})


@dataclass(frozen=True)
class Secrets:
    """What a first boot may need, each as read from the user's files."""

    agent_token: str | None = None
    service_token: str | None = None
    #: The token DNS queries are answered with (``acl.tokens.dns``). With
    #: ``tokens.shared`` the shared token fills this role unless one is given.
    dns_token: str | None = None
    gossip_key: str | None = None
    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None


def carrier_values(
    spec: ImageSpec, secrets: Secrets, *, where: str = "userdata", check_pem: bool = True
) -> dict[str, str]:
    """Check ``secrets`` against what ``spec`` needs; return the carrier's KEY=VALUE map.

    Every missing, malformed or unwanted secret is reported together in one
    ``UserError``: a secret the spec does not use is refused, never dropped. With
    ``check_pem`` the TLS files are parsed, and the key must match the certificate.
    """
    problems: list[str] = []
    values: dict[str, str] = {}
    acl = spec.consul.acl.enabled
    if acl and spec.tokens.source is TokenSource.USERDATA:
        if secrets.agent_token is None:
            problems.append("the spec has ACLs on: give the token with --token-file")
        else:
            values["MESHBAKE_AGENT_TOKEN"] = _token(secrets.agent_token, "agent", problems)
        if not spec.tokens.shared:
            if secrets.service_token is None:
                problems.append("tokens are separate: give --token-file service=FILE too")
            else:
                service = _token(secrets.service_token, "service", problems)
                values["MESHBAKE_SERVICE_TOKEN"] = service
        elif secrets.service_token is not None and secrets.service_token != secrets.agent_token:
            problems.append("tokens.shared is true, so give one token, not two different ones")
        problems += _dns_token(spec, secrets, values)
    elif acl and spec.tokens.source is TokenSource.SSM:
        assert spec.tokens.ssm_parameter is not None
        values["MESHBAKE_TOKEN_SSM_PARAMETER"] = spec.tokens.ssm_parameter
    elif acl and spec.tokens.source is TokenSource.SECRETSMANAGER:
        assert spec.tokens.secret_id is not None
        values["MESHBAKE_TOKEN_SECRET_ID"] = spec.tokens.secret_id
    given_token = any(
        t is not None for t in (secrets.agent_token, secrets.service_token, secrets.dns_token)
    )
    if given_token and not acl:
        problems.append("the spec has ACLs off, so it takes no token")
    elif given_token and spec.tokens.source is not TokenSource.USERDATA:
        problems.append(
            f"tokens.source is {spec.tokens.source.value}: the instance fetches its token at"
            " first boot, so give no --token-file"
        )
    if not spec.consul.gossip.enabled and secrets.gossip_key is not None:
        problems.append("the spec has gossip encryption off, so it takes no --gossip-key-file")
    unused = {"ca": secrets.tls_ca} if not spec.consul.tls.enabled else {}
    if not (spec.consul.tls.enabled and spec.consul.tls.client_cert):
        unused |= {"cert": secrets.tls_cert, "key": secrets.tls_key}
    for part, pem in unused.items():
        if pem is not None:
            why = "TLS off" if not spec.consul.tls.enabled else "no client certificate"
            problems.append(f"the spec has {why}, so it takes no --tls-{part}-file")

    if spec.consul.gossip.enabled:
        if secrets.gossip_key is None:
            problems.append("gossip encryption is on: give the key with --gossip-key-file")
        else:
            values["MESHBAKE_GOSSIP_KEY"] = _gossip(secrets.gossip_key, problems)
    if spec.consul.tls.enabled:
        needed = {"CA": secrets.tls_ca}
        if spec.consul.tls.client_cert:
            needed |= {"CERT": secrets.tls_cert, "KEY": secrets.tls_key}
        for part, pem in needed.items():
            flag = f"--tls-{part.lower()}-file"
            if pem is None:
                problems.append(f"TLS is on: give {flag}")
                continue
            normal = normal_pem(pem, "key" if part == "KEY" else "cert")
            if isinstance(normal, str):
                problems.append(f"{flag} {normal}")
                swapped = {"CERT": "PRIVATE KEY", "KEY": "CERTIFICATE"}.get(part, "-")
                if swapped in normal:
                    problems[-1] += " (are --tls-cert-file and --tls-key-file swapped?)"
                needed[part] = None
            else:
                needed[part] = normal
                values[f"MESHBAKE_TLS_{part}_B64"] = base64.b64encode(normal).decode()
        if check_pem:
            problems += _pem_problems(needed)
    if problems:
        raise UserError(f"{where}: " + "; ".join(problems))
    return values


_PEM_BEGIN = re.compile(r"^-----BEGIN ([A-Z ]+)-----$")
_PEM_LINE = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_PEM_LABELS = {
    "cert": ("CERTIFICATE",),
    "key": ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"),
}


def normal_pem(pem: bytes, kind: str) -> bytes | str:
    """The PEM blocks of ``pem`` as first boot reads them, or why it refuses them.

    The one grammar both ends apply (``pem()`` in ``scripts/meshbake-firstboot`` is its
    shell twin): CRs are dropped, so is text outside the blocks (OpenSSL's "Bag
    Attributes" preamble); a block is base64 lines between matching BEGIN and END lines,
    with no header (an encrypted key has ``Proc-Type:``). ``kind`` "cert" takes one or
    more certificates, "key" exactly one private key.
    """
    try:
        text = pem.decode("ascii").replace("\r", "")
    except UnicodeDecodeError:
        return "is not a PEM file (not ASCII text)"
    blocks: list[str] = []
    inside = ""
    count = 0
    for line in text.split("\n"):
        if not inside:
            begin = _PEM_BEGIN.match(line)
            if begin is None:
                continue
            inside = begin.group(1)
            count += 1
            if inside not in _PEM_LABELS[kind]:
                wanted = "a certificate" if kind == "cert" else "an unencrypted private key"
                return f"holds a PEM {inside} block, not {wanted}"
        elif line == f"-----END {inside}-----":
            inside = ""
        elif not _PEM_LINE.match(line):
            return "has a line inside a PEM block that is not base64 (a header: encrypted?)"
        blocks.append(line)
    if inside or count == 0:
        return "is not a PEM file (no complete BEGIN/END block)"
    if kind == "key" and count != 1:
        return f"holds {count} private keys, not one"
    return ("\n".join(blocks) + "\n").encode()


def _pem_problems(pems: Mapping[str, bytes | None]) -> list[str]:
    """Parse the CA, certificate and key; say which is not what its flag promises
    (a swapped certificate and key included) and whether the key fits the cert."""
    problems: list[str] = []
    loaded: dict[str, Any] = {}
    for part, pem in pems.items():
        if pem is None or b"-----BEGIN " not in pem:
            continue
        flag = f"--tls-{part.lower()}-file"
        is_key = b"PRIVATE KEY-----" in pem
        if part in ("CA", "CERT") and is_key:
            swapped = " (are --tls-cert-file and --tls-key-file swapped?)" if part == "CERT" else ""
            problems.append(f"{flag} holds a private key, not a certificate{swapped}")
            continue
        try:
            if part == "KEY":
                if not is_key:
                    problems.append(
                        f"{flag} holds no private key (are --tls-cert-file and"
                        " --tls-key-file swapped?)"
                    )
                    continue
                key = serialization.load_pem_private_key(pem, password=None)
                loaded[part] = _spki(key.public_key())
            else:
                loaded[part] = _spki(x509.load_pem_x509_certificate(pem).public_key())
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # UnsupportedAlgorithm: a curve or key type this cryptography cannot use.
            what = "an unencrypted private key" if part == "KEY" else "a PEM certificate"
            problems.append(f"{flag} is not {what} ({' '.join(str(exc).split())[:80]})")
    if "CERT" in loaded and "KEY" in loaded and loaded["KEY"] != loaded["CERT"]:
        problems.append("--tls-key-file is not the key of the certificate in --tls-cert-file")
    return problems


def takes_dns_token(spec: ImageSpec) -> bool:
    """Whether the user data must carry a DNS token of its own: separate tokens from user
    data on Consul 1.15+ (with shared tokens first boot gives DNS the shared token, and
    before 1.15 the service's default token answers DNS)."""
    return (
        spec.consul.acl.enabled
        and spec.tokens.source is TokenSource.USERDATA
        and not spec.tokens.shared
        and spec.consul.release.separate_dns_token
    )


def _dns_token(spec: ImageSpec, secrets: Secrets, values: dict[str, str]) -> list[str]:
    """Put the DNS token into ``values`` when it differs from what first boot derives.

    With ``tokens.shared`` first boot gives DNS the shared token itself, so the carrier
    (and the user data) carries a DNS token only when it is a different one. Before
    Consul 1.15 the default token registers the service, so it cannot also be a
    separate DNS token; there the service's token answers DNS.
    """
    problems: list[str] = []
    release = spec.consul.release
    if secrets.dns_token is None:
        if takes_dns_token(spec):
            problems.append(
                "tokens are separate: give --token-file dns=FILE too (DNS queries carry no"
                " token, so without it every lookup is the anonymous token's)"
            )
        return problems
    dns = _token(secrets.dns_token, "dns", problems)
    registers = secrets.agent_token if spec.tokens.shared else secrets.service_token
    if not release.separate_dns_token:
        if dns != (registers or "").strip():
            problems.append(
                f"Consul {release.version} registers the service with the default token,"
                " which also answers DNS before 1.17, so it takes no separate dns token"
            )
    elif not (spec.tokens.shared and dns == (secrets.agent_token or "").strip()):
        values["MESHBAKE_DNS_TOKEN"] = dns
    return problems


def _spki(public_key: Any) -> bytes:
    """A public key as DER SubjectPublicKeyInfo, to compare a key with a certificate."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return bytes(public_key.public_bytes(serialization.Encoding.DER, spki))


def _token(raw: str, role: str, problems: list[str]) -> str:
    token = raw.strip()
    if not _UUID.match(token):
        problems.append(f"the {role} token is not a Consul token (a lowercase UUID)")
    return token


def _gossip(raw: str, problems: list[str]) -> str:
    key = raw.strip()
    try:
        ok = len(base64.b64decode(key, validate=True)) == 32
    except ValueError:
        ok = False
    if not ok:
        problems.append("the gossip key is not 32 bytes of base64 (see 'consul keygen')")
    return key


#: The carrier key of the ``--join`` addresses, separated by spaces; first boot writes
#: them as ``retry_join`` into ``paths.CONSUL_JOIN`` (``MESHBAKE_JOIN_FILE``).
JOIN_KEY = "MESHBAKE_RETRY_JOIN"


def join_values(addresses: Sequence[str], where: str = "--join") -> dict[str, str]:
    """The carrier entry for the server addresses the agent joins besides the baked
    ``consul.retry_join`` (Consul appends list values across config files,
    agent/config/merge.go), or nothing. Each address passes ``boundary.join_address``;
    one given twice is an error, never a silent choice.

    >>> join_values(["198.18.0.1", "consul.example"])
    {'MESHBAKE_RETRY_JOIN': '198.18.0.1 consul.example'}
    """
    seen: dict[str, str] = {}
    for raw in addresses:
        address = boundary.join_address(raw, where)
        if address in seen:
            raise UserError(
                f"{where} {raw}: the address is already given ({where} {seen[address]})"
            )
        seen[address] = raw
    return {JOIN_KEY: " ".join(seen)} if seen else {}


def first_boot_document(values: Mapping[str, str]) -> dict[str, Any]:
    """The first-boot cloud-config as a dict: one tmpfs file, readable by root only."""
    content = escape.carrier_file(values)
    return {
        "write_files": [
            {"path": CARRIER, "permissions": "0600", "owner": "root:root", "content": content}
        ]
    }


def first_boot_user_data(values: Mapping[str, str]) -> str:
    """The minimal first-boot user data, ready to hand to a VM or an instance."""
    return dump(first_boot_document(values))


def user_data_for(
    spec: ImageSpec,
    secrets: Secrets,
    *,
    joins: Sequence[str] = (),
    where: str = "userdata",
    notes: list[str] | None = None,
) -> str:
    """The minimal first-boot user data ``meshbake userdata`` prints, for any caller (the
    CLI, ``meshbake up``): the checked secrets, the ``--join`` addresses, the size limit
    (anything over 1 KiB noted in ``notes``)."""
    values = carrier_values(spec, secrets, where=where) | join_values(joins)
    user_data = first_boot_user_data(values)
    check_size(user_data, [] if notes is None else notes)
    return user_data


def check_size(user_data: str, warn: list[str]) -> None:
    """Refuse user data over EC2's 16 KiB limit; note anything over 1 KiB in ``warn``."""
    size = len(user_data.encode())
    if size > EC2_LIMIT:
        raise UserError(f"user data is {size} bytes, over EC2's limit of {EC2_LIMIT} bytes")
    if size > WARN_ABOVE:
        warn.append(f"user data is {size} bytes; meshbake aims for a few hundred")


def user_data_template(spec: ImageSpec) -> str:
    """The first-boot user data as a Terraform ``templatefile`` template.

    Placeholders are ``${agent_token}``, ``${service_token}``, ``${dns_token}``,
    ``${gossip_key}`` and
    ``${tls_ca_b64}`` (and cert/key) as the spec needs them.
    """
    names = {
        "MESHBAKE_AGENT_TOKEN": "agent_token",
        "MESHBAKE_SERVICE_TOKEN": "service_token",
        "MESHBAKE_DNS_TOKEN": "dns_token",
        "MESHBAKE_GOSSIP_KEY": "gossip_key",
        "MESHBAKE_TLS_CA_B64": "tls_ca_b64",
        "MESHBAKE_TLS_CERT_B64": "tls_cert_b64",
        "MESHBAKE_TLS_KEY_B64": "tls_key_b64",
    }
    # Stand-ins for exactly what the spec takes (the carrier refuses anything more).
    tokens = spec.consul.acl.enabled and spec.tokens.source is TokenSource.USERDATA
    tls = spec.consul.tls
    client = tls.enabled and tls.client_cert
    dummy = Secrets(
        agent_token="00000000-0000-4000-8000-000000000000" if tokens else None,
        service_token=None
        if spec.tokens.shared or not tokens
        else "00000000-0000-4000-8000-000000000001",
        dns_token="00000000-0000-4000-8000-000000000002" if takes_dns_token(spec) else None,
        gossip_key=base64.b64encode(bytes(32)).decode() if spec.consul.gossip.enabled else None,
        tls_ca=_stand_in("CERTIFICATE") if tls.enabled else None,
        tls_cert=_stand_in("CERTIFICATE") if client else None,
        tls_key=_stand_in("PRIVATE KEY") if client else None,
    )
    values = carrier_values(spec, dummy, where="template", check_pem=False)
    return first_boot_user_data(
        {k: ("${" + names[k] + "}" if k in names else v) for k, v in values.items()}
    )


def _stand_in(label: str) -> bytes:
    return f"-----BEGIN {label}-----\nAA==\n-----END {label}-----\n".encode()


def read_secret(path: Path, what: str) -> str:
    """Read a secret file for ``userdata``; a clear one-line error if it cannot be read."""
    try:
        return boundary.read_regular(path, boundary.MAX_SECRET_BYTES).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError, boundary.UnreadableFile) as exc:
        raise UserError(f"{path}: cannot read the {what}: {reason(exc)}") from None
