"""The local mesh's control plane: one Consul server inside a ``LocalNetwork``'s namespace.

``ControlPlane`` starts the server as the same binary the image bakes (the ``consul``
member of the image's Consul zip, ``extract_consul``), with the command line of the
local mesh's contract::

    consul agent -server -bootstrap-expect=1 -node=meshbake-server -datacenter=DC
        -bind=ADDR -client=ADDR -data-dir=DIR -config-file=DIR/server.json

ACLs on with default deny, Connect on. It waits for a leader, bootstraps the ACL system
and then makes tokens, policies and intentions the way an operator does, through
Consul's HTTP API (``agent/http_register.go`` in hashicorp/consul lists the paths):

- ``node_token``: what an image's agent needs (README, "Tokens and the least policy
  each needs"): a node identity, the service identity of its service, and the
  redirect's ``agent "<node>" { policy = "read" }``;
- ``dns_token`` (the ``builtin/dns`` templated policy) and ``service_token``;
- ``intention`` (service-intentions config entries, one per destination, its sources
  merged) and ``allow_permissive`` (the mesh config entry);
- ``leaf`` (a service's certificate and key), ``roots``, ``catalog_nodes``, ``health``
  and ``connect_health``.

The server listens on the bridge's address inside the namespace, which the host's own
sockets cannot reach: every API call goes through a ``Forward`` from 127.0.0.1.

Secrets: the bootstrap (management) token and every token made stay in memory; only
``token_file`` writes one, 0600 in the 0700 work folder, for a command that reads a
token file (``consul connect envoy -token-file``). No token is logged or put in an
exception. ``close`` (also on the way out of ``with``, under ``proc.shielded``) stops
the server by its PID (SIGTERM, SIGKILL after ``STOP_GRACE``), ends the forward and
removes the work folder with every token file in it.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from builder import proc
from builder.errors import UserError, reason
from builder.mesh.forward import Forward
from builder.mesh.localnet import LocalNetwork

log = logging.getLogger(__name__)

#: The server's node name (the contract's command line).
SERVER_NODE = "meshbake-server"
#: The server's ports, in the namespace, on the bridge's address.
HTTP_PORT = 8500
DNS_PORT = 8600
GRPC_PORT = 8502
#: Seconds the server has to elect itself and accept the ACL bootstrap.
LEADER_TIMEOUT = 120.0
#: Seconds between SIGTERM and SIGKILL when the server (or an upstream) is stopped.
STOP_GRACE = 10.0
#: Seconds one API call may take.
HTTP_TIMEOUT = 30.0
#: The largest ``consul`` member ``extract_consul`` takes (Consul 1.22 is ~190 MB).
MAX_CONSUL_BYTES = 512 * 1024 * 1024
#: The first namespace-local port ``local_port`` hands out (apps, Envoy admins).
FIRST_LOCAL_PORT = 20000

_POLL = 0.2
_UNNAMEABLE = re.compile(r"[^A-Za-z0-9_-]")


class ConsulAPIError(UserError):
    """A Consul API call failed: ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Leaf:
    """A service's leaf certificate and its private key (PEM); never logged."""

    service: str
    cert_pem: str
    key_pem: str = ""

    def __repr__(self) -> str:
        return f"Leaf(service={self.service!r})"


def private_folder(prefix: str) -> Path:
    """A new 0700 folder in the system's temporary folder."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def write_private(path: Path, text: str) -> Path:
    """``text`` into a new file at ``path``, 0600 from its first byte, never via a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(os.open(path, flags, 0o600), "w") as out:  # noqa: PTH123 - an fd
        out.write(text)
    return path


def extract_consul(zip_path: Path, folder: Path) -> Path:
    """The ``consul`` member of a Consul release zip, as ``folder/consul`` (0700).

    ``folder`` must be a private folder (``private_folder``). A zip without the member,
    or a member larger than ``MAX_CONSUL_BYTES``, is refused with one line.
    """
    target = folder / "consul"
    try:
        with zipfile.ZipFile(zip_path) as archive:
            try:
                info = archive.getinfo("consul")
            except KeyError:
                raise UserError(f"{zip_path}: no member 'consul' in the Consul zip") from None
            if info.file_size > MAX_CONSUL_BYTES:
                raise UserError(
                    f"{zip_path}: member 'consul' is {info.file_size} bytes,"
                    f" more than {MAX_CONSUL_BYTES}"
                )
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with archive.open(info) as src, open(os.open(target, flags, 0o700), "wb") as dst:  # noqa: PTH123
                copied = 0
                while chunk := src.read(1 << 20):
                    copied += len(chunk)
                    if copied > MAX_CONSUL_BYTES:  # the header lied
                        raise UserError(f"{zip_path}: member 'consul' is larger than it says")
                    dst.write(chunk)
    except (OSError, zipfile.BadZipFile) as exc:
        target.unlink(missing_ok=True)
        raise UserError(f"{zip_path}: cannot extract consul: {reason(exc)}") from exc
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


def server_config() -> dict[str, Any]:
    """The contract's ``server.json``: ACLs on, default deny, Connect on."""
    return {
        "acl": {"enabled": True, "default_policy": "deny", "enable_token_persistence": True},
        "connect": {"enabled": True},
        "ports": {"http": HTTP_PORT, "dns": DNS_PORT, "grpc": GRPC_PORT},
    }


def server_argv(
    consul: Path, address: ipaddress.IPv4Address, datacenter: str, data_dir: Path
) -> list[str]:
    """The contract's server command line (the same for real Consul and the double).

    >>> server_argv(Path("/w/consul"), ipaddress.IPv4Address("198.18.0.1"), "dc1",
    ...             Path("/w/server"))[1:5]
    ['agent', '-server', '-bootstrap-expect=1', '-node=meshbake-server']
    """
    return [
        os.fspath(consul), "agent", "-server", "-bootstrap-expect=1",
        f"-node={SERVER_NODE}", f"-datacenter={datacenter}",
        f"-bind={address}", f"-client={address}",
        f"-data-dir={data_dir}", f"-config-file={data_dir / 'server.json'}",
    ]  # fmt: skip


def tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


class ControlPlane:
    """A Consul server in ``network``'s namespace, bootstrapped; the operator's calls.

    Use it as a context manager inside the network's. ``consul`` is the executable (see
    ``extract_consul``). Everything it starts or writes is gone after ``close``.
    """

    def __init__(
        self,
        network: LocalNetwork,
        consul: Path,
        *,
        datacenter: str = "dc1",
        log_dir: Path | None = None,
    ) -> None:
        self.network = network
        #: Where the server's (and upstreams') logs go; None: the work folder, which
        #: ``close`` removes (a failure then quotes the log's last lines).
        self.log_dir = log_dir
        self.consul = Path(consul)
        self.datacenter = datacenter
        self.address: ipaddress.IPv4Address = network.server_address.ip
        self.work: Path | None = None
        self.log_file = Path("/nonexistent")  # the server's, once it started
        self._server: subprocess.Popen[str] | None = None
        self._forward: Forward | None = None
        self._management = ""
        self._tokens: dict[str, str] = {}  # what -> secret, each minted once
        self._policies: set[str] = set()
        self._intentions: dict[str, dict[str, str]] = {}  # dst -> src -> action
        self._next_port = FIRST_LOCAL_PORT
        self._cleanups: list[Callable[[], None]] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"ControlPlane(network={self.network.name!r}, address={str(self.address)!r})"

    # Addresses.

    @property
    def http_addr(self) -> str:
        """The server's HTTP API as the namespace (and the VMs) reach it."""
        return f"http://{self.address}:{HTTP_PORT}"

    @property
    def api_port(self) -> int:
        """The host's 127.0.0.1 port that forwards to the server's HTTP API."""
        if self._forward is None:
            raise RuntimeError("the control plane is not open")
        return self._forward.port

    @property
    def management_token(self) -> str:
        """The bootstrap (management) token; keep it out of logs and files."""
        if not self._management:
            raise RuntimeError("the control plane is not bootstrapped")
        return self._management

    def local_port(self) -> int:
        """A port nothing else in the namespace uses (for an app or an Envoy admin)."""
        port = self._next_port
        self._next_port += 1
        return port

    def log_path(self, name: str) -> Path:
        """Where a process of this control plane logs (``log_dir``, else the work folder)."""
        if self.work is None:
            raise RuntimeError("the control plane is not open")
        return (self.log_dir or self.work) / name

    # Life cycle.

    def __enter__(self) -> ControlPlane:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        if self.work is not None:
            return
        try:
            self.work = private_folder("meshbake-cp-")
            data_dir = self.work / "server"
            data_dir.mkdir(mode=0o700)
            (self.work / "tokens").mkdir(mode=0o700)
            write_private(data_dir / "server.json", json.dumps(server_config(), indent=2) + "\n")
            self.log_file = self.log_path("server.log")
            self._forward = Forward(self.network.netns_path, (str(self.address), HTTP_PORT))
            argv = server_argv(self.consul, self.address, self.datacenter, data_dir)
            self._server = self.network.run_in(argv, log_file=self.log_file)
            self._wait_for_leader()
            self._bootstrap()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Server, forward, token files, work folder: all gone (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with proc.shielded():
            while self._cleanups:  # what runs on it (upstreams), newest first
                self._cleanups.pop()()
            if self._server is not None:
                proc.terminate_group(self._server, grace=STOP_GRACE)
            if self._forward is not None:
                self._forward.stop()
            if self.work is not None:
                shutil.rmtree(self.work, ignore_errors=True)
            self._management = ""
            self._tokens.clear()

    def on_close(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` first when the control plane closes (newest first)."""
        self._cleanups.append(cleanup)

    def _wait_for_leader(self) -> None:
        deadline = time.monotonic() + LEADER_TIMEOUT
        while True:
            assert self._server is not None
            if self._server.poll() is not None:
                raise UserError(
                    f"the Consul server exited {self._server.returncode} before it had a"
                    f" leader; see its log {self.log_file}: {tail(self.log_file)}"
                )
            with contextlib.suppress(ConsulAPIError):
                if self.call("GET", "/v1/status/leader", token=""):
                    return
            if time.monotonic() > deadline:
                raise UserError(
                    f"the Consul server had no leader after {LEADER_TIMEOUT:.0f}s;"
                    f" see its log {self.log_file}: {tail(self.log_file)}"
                )
            time.sleep(_POLL)

    def _bootstrap(self) -> None:
        # A new leader may still be setting up its ACL system: Consul answers 500
        # ("ACL system is currently in legacy mode", "The ACL system is not ready")
        # for a moment, so the bootstrap is retried until the leader's deadline.
        deadline = time.monotonic() + LEADER_TIMEOUT
        while True:
            try:
                answer = self.call("PUT", "/v1/acl/bootstrap", token="")
                break
            except ConsulAPIError as exc:
                if exc.status != 500 or time.monotonic() > deadline:
                    raise UserError(
                        f"the Consul server refused the ACL bootstrap: {exc};"
                        f" see its log {self.log_file}: {tail(self.log_file)}"
                    ) from None
            time.sleep(_POLL)
        self._management = _secret(answer, "PUT /v1/acl/bootstrap")
        # The server's own agent token, as an operator gives one to every agent: the
        # node identity of its node (agent/structs/acl.go, node identities).
        agent = self._mint(
            "server-agent",
            {"NodeIdentities": [{"NodeName": SERVER_NODE, "Datacenter": self.datacenter}]},
        )
        self.call("PUT", "/v1/agent/token/agent", {"Token": agent})

    # The HTTP API.

    def call(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Any:
        """One API call to the server; returns the decoded JSON (None for no body).

        ``token`` is the request's token (``X-Consul-Token``); None is the management
        token, "" none at all (anonymous). A failure raises ``ConsulAPIError`` with the
        status and Consul's answer, never the token.
        """
        if self._forward is None:
            raise RuntimeError("the control plane is not open")
        secret = self._management if token is None else token
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self._forward.port}{path}", data=data, method=method
        )
        if secret:
            request.add_header("X-Consul-Token", secret)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        # No proxy from the environment: the forward is on our own loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=HTTP_TIMEOUT) as response:
                text = response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            detail = (
                exc.read(2000).decode("utf-8", "replace").strip().replace(secret or "\0", "***")
            )
            raise ConsulAPIError(
                f"Consul {method} {path}: {exc.code} {' '.join(detail.split())}", exc.code
            ) from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise ConsulAPIError(f"Consul {method} {path}: no answer: {reason(exc)}", 0) from None
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise ConsulAPIError(f"Consul {method} {path}: not JSON", 200) from None

    # Tokens.

    def _mint(self, what: str, document: dict[str, Any]) -> str:
        if what not in self._tokens:
            answer = self.call(
                "PUT", "/v1/acl/token", {"Description": f"meshbake {what}", **document}
            )
            self._tokens[what] = _secret(answer, "PUT /v1/acl/token")
        return self._tokens[what]

    def _policy(self, name: str, rules: dict[str, Any]) -> str:
        """A policy with JSON rules (which real Consul parses as it parses HCL)."""
        if name not in self._policies:
            self.call("PUT", "/v1/acl/policy", {"Name": name, "Rules": json.dumps(rules)})
            self._policies.add(name)
        return name

    def node_token(self, node: str, service: str, dc: str | None = None) -> str:
        """An image's agent token (README: "Tokens and the least policy each needs").

        The node identity of ``node`` (``node "<node>"`` write, ``service_prefix ""``
        read), the service identity of ``service`` (it also fills the service role of a
        ``tokens.shared`` image) and ``agent "<node>" { policy = "read" }`` for the
        redirect (``GET /v1/agent/self``).
        """
        datacenter = dc or self.datacenter
        # A policy name is [A-Za-z0-9-_]{1,128} (agent/consul/acl_endpoint.go validPolicyName).
        name = _UNNAMEABLE.sub("-", f"meshbake-redirect-{node}")[:128]
        redirect = self._policy(name, {"agent": {node: {"policy": "read"}}})
        return self._mint(
            f"node {node} in {datacenter} for {service}",
            {
                "NodeIdentities": [{"NodeName": node, "Datacenter": datacenter}],
                "ServiceIdentities": [{"ServiceName": service}],
                "Policies": [{"Name": redirect}],
            },
        )

    def dns_token(self) -> str:
        """The DNS token: the ``builtin/dns`` templated policy (Consul 1.17+)."""
        return self._mint("dns", {"TemplatedPolicies": [{"TemplateName": "builtin/dns"}]})

    def service_token(self, service: str) -> str:
        """A token with the service identity of ``service`` (and of its sidecar)."""
        return self._mint(f"service {service}", {"ServiceIdentities": [{"ServiceName": service}]})

    def token_file(self, name: str, secret: str) -> Path:
        """``secret`` in a 0600 file in the work folder (removed by ``close``)."""
        if self.work is None or self._closed:
            raise RuntimeError("the control plane is not open")
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"token file name {name!r}: one plain file name")
        path = self.work / "tokens" / name
        path.unlink(missing_ok=True)
        return write_private(path, secret)

    def private_dir(self, name: str) -> Path:
        """A new 0700 folder in the work folder (removed by ``close``)."""
        if self.work is None or self._closed:
            raise RuntimeError("the control plane is not open")
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"folder name {name!r}: one plain file name")
        path = self.work / name
        path.mkdir(mode=0o700)
        return path

    # Intentions and the mesh.

    def intention(self, source: str, destination: str, *, allow: bool) -> None:
        """Allow or deny ``source`` -> ``destination``: the destination's
        service-intentions entry, with the sources given so far for it kept."""
        sources = self._intentions.setdefault(destination, {})
        sources[source] = "allow" if allow else "deny"
        self.call(
            "PUT",
            "/v1/config",
            {
                "Kind": "service-intentions",
                "Name": destination,
                "Sources": [{"Name": src, "Action": act} for src, act in sorted(sources.items())],
            },
        )

    def allow_permissive(self) -> None:
        """The mesh config entry that lets a service take ``mtls_mode: permissive``."""
        self.call(
            "PUT",
            "/v1/config",
            {"Kind": "mesh", "Name": "mesh", "AllowEnablingPermissiveMutualTLS": True},
        )

    # Certificates and the catalog.

    def leaf(self, service: str) -> Leaf:
        """``service``'s leaf certificate and key, asked for with its service token."""
        path = f"/v1/agent/connect/ca/leaf/{urllib.parse.quote(service, safe='')}"
        answer = self.call("GET", path, token=self.service_token(service))
        cert = answer.get("CertPEM") if isinstance(answer, dict) else None
        key = answer.get("PrivateKeyPEM") if isinstance(answer, dict) else None
        if not isinstance(cert, str) or not isinstance(key, str):
            raise ConsulAPIError(f"Consul GET {path}: no CertPEM and PrivateKeyPEM", 200)
        return Leaf(service, cert, key)

    def roots(self) -> list[str]:
        """The mesh CA's root certificates (PEM), the active one first."""
        answer = self.call("GET", "/v1/connect/ca/roots")
        roots = answer.get("Roots") if isinstance(answer, dict) else None
        if not isinstance(roots, list):
            raise ConsulAPIError("Consul GET /v1/connect/ca/roots: no Roots", 200)
        ordered = sorted(
            roots, key=lambda root: not (isinstance(root, dict) and root.get("Active"))
        )
        return [str(root["RootCert"]) for root in ordered if isinstance(root, dict)]

    def catalog_nodes(self) -> list[dict[str, Any]]:
        return _list(self.call("GET", "/v1/catalog/nodes"), "/v1/catalog/nodes")

    def catalog_services(self) -> dict[str, Any]:
        answer = self.call("GET", "/v1/catalog/services")
        return answer if isinstance(answer, dict) else {}

    def health(self, service: str) -> list[dict[str, Any]]:
        """The passing instances of ``service`` (``/v1/health/service/<svc>?passing``)."""
        path = f"/v1/health/service/{urllib.parse.quote(service, safe='')}?passing"
        return _list(self.call("GET", path), path)

    def connect_health(self, service: str) -> list[dict[str, Any]]:
        """The passing mesh-capable instances of ``service`` (its sidecars)."""
        path = f"/v1/health/connect/{urllib.parse.quote(service, safe='')}?passing"
        return _list(self.call("GET", path), path)


def _secret(answer: Any, what: str) -> str:
    secret = answer.get("SecretID") if isinstance(answer, dict) else None
    if not isinstance(secret, str) or not secret:
        raise ConsulAPIError(f"Consul {what}: no SecretID in the answer", 200)
    return secret


def _list(answer: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(answer, list):
        raise ConsulAPIError(f"Consul GET {what}: not a list", 200)
    return [item for item in answer if isinstance(item, dict)]
