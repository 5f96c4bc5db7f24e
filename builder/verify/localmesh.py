"""The mesh a first-boot verify joins: a control plane, two upstreams and mesh clients.

A verify boot of phase ``firstboot`` is the image's first launch into a real mesh, not
into a relay. Before the VM starts, :class:`VerifyMesh` makes, on a private network of
its own (``builder/mesh/localnet.py``):

- a Consul server from the image's own Consul zip (``builder/mesh/controlplane.py``),
  ACLs on with default deny, bootstrapped;
- the tokens an operator would mint for this VM through the server's ACL API: the
  agent's (node identity, service identity, ``agent:read`` for the redirect), the
  sidecar's when the spec's tokens are separate, and the DNS token (``builtin/dns``);
- intentions as service-intentions config entries: the image's service may reach
  ``meshbake-upstream`` and may not reach ``meshbake-upstream-denied``;
  ``meshbake-verify`` may reach the image's service and ``meshbake-intruder`` may not;
- the two upstreams, each a small app behind its real Envoy sidecar
  (``builder/mesh/upstream.py``), in the network's namespace;
- the mesh clients' certificates: leaves of the mesh CA for ``meshbake-verify`` and
  ``meshbake-intruder``, and a leaf for ``meshbake-verify`` from a CA of its own (the
  "foreign" client), all in 0600 files of the caller's private work folder.

The checks then get ``expectations()["mesh"]`` (see ``imagetests/test_firstboot.py``);
nothing in it depends on whether the Consul binary is the real one.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from builder.errors import UserError
from builder.mesh.controlplane import ControlPlane, extract_consul, write_private
from builder.mesh.localnet import LocalNetwork
from builder.mesh.upstream import Upstream
from builder.progress import Progress
from builder.render import baked, cloudconfig
from builder.spec.model import ImageSpec, LoadedSpec, TokenSource

#: The mesh client an intention allows to reach the image's service, and the one an
#: intention denies.
VERIFY_CLIENT = "meshbake-verify"
INTRUDER = "meshbake-intruder"
#: The upstream the image's service may reach, and the one it may not.
UPSTREAM = "meshbake-upstream"
UPSTREAM_DENIED = "meshbake-upstream-denied"
#: The port the guest dials on an upstream's virtual IP. Transparent proxy matches the
#: virtual IP whatever the port (agent/xds/listeners.go: the filter chain matches the
#: prefix range only).
UPSTREAM_PORT = 80


@dataclass(frozen=True)
class MeshInputs:
    """What the control plane is made of: the image's own Consul release zip (the
    server runs the binary the image bakes) and an Envoy binary that this Consul
    accepts (the image's own)."""

    consul_zip: Path
    envoy: Path


def spiffe_id(trust_domain: str, datacenter: str, service: str) -> str:
    """A service's SPIFFE ID (hashicorp/consul agent/connect/uri_service.go).

    >>> spiffe_id("11111111-2222-3333-4444-555555555555.consul", "dc1", "web")
    'spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web'
    """
    return f"spiffe://{trust_domain}/ns/default/dc/{datacenter}/svc/{service}"


def service_sni(trust_domain: str, datacenter: str, service: str) -> str:
    """The SNI a mesh client sends to reach ``service`` (agent/connect/sni.go
    ``ServiceSNI`` with the default namespace and partition).

    >>> service_sni("abc.consul", "dc1", "web")
    'web.default.dc1.internal.abc.consul'
    """
    return f"{service}.default.{datacenter}.internal.{trust_domain}"


def foreign_leaf(uri: str) -> tuple[str, str, str]:
    """A CA that is not the mesh's, and a leaf of it that carries ``uri``: (CA PEM, leaf
    PEM, leaf key PEM). The leaf looks like a mesh leaf in every way but its signer."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshbake foreign CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return ca.public_bytes(pem).decode(), leaf.public_bytes(pem).decode(), key_pem


def wants_dns_token(spec: ImageSpec) -> bool:
    """Whether the operator gives the image a DNS token of its own (``builtin/dns``, the
    least policy for the role): whenever its Consul answers DNS with a token other than
    the registering one (``acl.tokens.dns``, 1.17+), also beside a shared token."""
    return (
        spec.consul.acl.enabled
        and spec.tokens.source is TokenSource.USERDATA
        and spec.consul.release.separate_dns_token
    )


class VerifyMesh:
    """The control plane, upstreams and mesh clients of one first-boot verify.

    Use it as a context manager; on the way out the upstreams, the server and the
    network go, in that order. ``work`` is the caller's private (0700) folder, which
    the caller removes; the certificates and token files go there.
    """

    def __init__(
        self, loaded: LoadedSpec, inputs: MeshInputs, work: Path, progress: Progress
    ) -> None:
        self.loaded = loaded
        self.inputs = inputs
        self.work = work
        self.progress = progress
        self.node = f"verify-{secrets.token_hex(4)}"
        self._stack = ExitStack()
        self.network: LocalNetwork | None = None
        self.control: ControlPlane | None = None
        self.trust_domain = ""
        self.secrets = cloudconfig.Secrets(agent_token="")
        self._files: dict[str, str] = {}

    def __enter__(self) -> VerifyMesh:
        try:
            self.open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    @property
    def server_address(self) -> str:
        if self.network is None:
            raise RuntimeError("the verify mesh is not open")
        return str(self.network.server_address.ip)

    def open(self) -> None:
        spec = self.loaded.spec
        service = spec.service.name
        folder = self.work / "mesh"
        folder.mkdir(mode=0o700)
        (folder / "consul").mkdir(mode=0o700)
        consul = extract_consul(self.inputs.consul_zip, folder / "consul")
        self.network = self._stack.enter_context(LocalNetwork(tag="verify"))
        self.progress(
            f"verify: firstboot: a Consul server from {self.inputs.consul_zip.name} on"
            f" {self.network.server_address} ({self.network.name})"
        )
        control = self._stack.enter_context(
            ControlPlane(
                self.network,
                consul,
                datacenter=spec.consul.datacenter,
                log_dir=self.work,
            )
        )
        self.control = control
        # The service's mTLS mode is a service-defaults entry, which an operator
        # writes on the server (permissive needs the mesh entry's consent first).
        defaults = baked.service_defaults(spec)
        if defaults["MutualTLSMode"] == "permissive":
            control.allow_permissive()
        control.call("PUT", "/v1/config", defaults)
        # Intentions first: a sidecar's intentions are read when it starts.
        control.intention(service, UPSTREAM, allow=True)
        control.intention(service, UPSTREAM_DENIED, allow=False)
        control.intention(VERIFY_CLIENT, service, allow=True)
        control.intention(INTRUDER, service, allow=False)
        self.upstreams = {
            "allowed": self._stack.enter_context(
                Upstream(control, self.inputs.envoy, service=UPSTREAM)
            ),
            "denied": self._stack.enter_context(
                Upstream(control, self.inputs.envoy, service=UPSTREAM_DENIED)
            ),
        }
        roots = control.call("GET", "/v1/connect/ca/roots")
        self.trust_domain = str(roots.get("TrustDomain") or "") if isinstance(roots, dict) else ""
        if not self.trust_domain:
            raise UserError("the verify mesh's server names no TrustDomain in its CA roots")
        self._certificates(control, folder)
        self.secrets = cloudconfig.Secrets(
            agent_token=control.node_token(self.node, service),
            service_token=None if spec.tokens.shared else control.service_token(service),
            dns_token=control.dns_token() if wants_dns_token(spec) else None,
        )
        self._files["management"] = str(control.token_file("management", control.management_token))
        # The token that answers DNS in the VM: its own, else the one first boot gives
        # the DNS role (the shared token).
        dns = self.secrets.dns_token or self.secrets.agent_token or ""
        self._files["dns"] = str(control.token_file("dns", dns))

    def _certificates(self, control: ControlPlane, folder: Path) -> None:
        root = control.roots()[0]
        self._files["ca"] = str(write_private(folder / "mesh-ca.pem", root))
        for client in (VERIFY_CLIENT, INTRUDER):
            leaf = control.leaf(client)
            self._files[f"{client}.cert"] = str(
                write_private(folder / f"{client}.pem", leaf.cert_pem)
            )
            self._files[f"{client}.key"] = str(
                write_private(folder / f"{client}-key.pem", leaf.key_pem)
            )
        uri = spiffe_id(self.trust_domain, self.loaded.spec.consul.datacenter, VERIFY_CLIENT)
        _, foreign_cert, foreign_key = foreign_leaf(uri)
        self._files["foreign.cert"] = str(write_private(folder / "foreign.pem", foreign_cert))
        self._files["foreign.key"] = str(write_private(folder / "foreign-key.pem", foreign_key))

    def expect(self, vm_address: str) -> dict[str, Any]:
        """``expectations()["mesh"]``: what the mesh checks need."""
        if self.control is None:
            raise RuntimeError("the verify mesh is not open")
        spec = self.loaded.spec
        datacenter = spec.consul.datacenter
        service = spec.service.name
        files = self._files

        def client(name: str, key: str) -> dict[str, str]:
            return {
                "service": name,
                "cert": files[f"{key}.cert"],
                "key": files[f"{key}.key"],
                "ca": files["ca"],
            }

        return {
            "mtls_mode": baked.service_defaults(spec)["MutualTLSMode"],
            "server_name": service_sni(self.trust_domain, datacenter, service),
            "spiffe_id": spiffe_id(self.trust_domain, datacenter, service),
            "node": self.node,
            "vm_address": str(ipaddress.IPv4Address(vm_address)),
            "clients": {
                "allowed": client(VERIFY_CLIENT, VERIFY_CLIENT),
                "denied": client(INTRUDER, INTRUDER),
                "foreign": client(VERIFY_CLIENT, "foreign"),
            },
            "upstreams": {
                which: {"service": up.service, "banner": up.body, "port": UPSTREAM_PORT}
                for which, up in self.upstreams.items()
            },
            "api": {
                "url": f"http://127.0.0.1:{self.control.api_port}",
                "token_file": files["management"],
            },
            "dns_token_file": files["dns"],
        }
