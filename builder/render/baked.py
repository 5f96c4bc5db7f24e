"""What goes into a golden image: configs, units, parameters and the bake plan.

Everything here is derived from the spec alone and contains no secret: tokens, the
gossip key and TLS keys arrive at first boot (see ``scripts/meshbake-firstboot``).

>>> from builder.spec.model import load_spec
>>> files = baked_files(load_spec("images/web.yaml"))
>>> [f.dest for f in files if f.dest.endswith(".service")][:2]
['/etc/systemd/system/consul.service', '/etc/systemd/system/envoy-sidecar.service']
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jinja2

from builder.spec import compat
from builder.spec.model import ImageSpec, LoadedSpec, TokenSource

CONSUL_BIN = "/usr/bin/consul"
ENVOY_BIN = "/usr/bin/envoy"
CONSUL_DIR = "/etc/consul.d"
CONSUL_DATA = "/var/lib/consul"
LIBEXEC = "/usr/libexec/meshbake"
SIDECAR_TOKEN = "/etc/envoy/token"
ENVOY_ADMIN = "127.0.0.1:19000"
UNIT_DIR = "/etc/systemd/system"

#: Runtime scripts from ``scripts/`` installed into every image.
RUNTIME_SCRIPTS = ("meshbake-firstboot", "meshbake-redirect", "meshbake-cleanup", "meshbake-check")

#: Installed too when the tokens come from a secret store (tokens.source ssm or
#: secretsmanager), with what it needs besides python3 (cloud-init's own interpreter):
#: curl signs the request (--aws-sigv4), the CA bundle lets it trust AWS's endpoints.
FETCH_TOKEN_SCRIPT = "meshbake-fetch-token"
FETCH_TOKEN_PACKAGES = ("curl", "ca-certificates")


def _secret_store(spec: ImageSpec) -> bool:
    return spec.tokens.source is not TokenSource.USERDATA


def runtime_scripts(spec: ImageSpec) -> tuple[str, ...]:
    """The scripts from ``scripts/`` that go into ``/usr/libexec/meshbake``."""
    return (*RUNTIME_SCRIPTS, FETCH_TOKEN_SCRIPT) if _secret_store(spec) else RUNTIME_SCRIPTS


@dataclass(frozen=True)
class BakedFile:
    """One file installed into the image with its owner and mode."""

    dest: str
    content: bytes
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"


def _jinja() -> jinja2.Environment:
    # StrictUndefined: a typo in a template fails the render instead of shipping.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("builder.render", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render_template(name: str, **values: Any) -> str:
    """Render ``builder/templates/<name>`` strictly."""
    return _jinja().get_template(name).render(**values)


def systemd_escape(word: str) -> str:
    """Escape one word for an ``ExecStart=`` line: quote it and double ``%`` and ``$``.

    >>> systemd_escape("50%")
    '"50%%"'
    """
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"' if escaped != word or not word or any(c.isspace() for c in word) else word


def exec_line(argv: Sequence[str]) -> str:
    return " ".join(systemd_escape(a) for a in argv)


def consul_config(spec: ImageSpec) -> dict[str, Any]:
    """The Consul client config, with no token, key or certificate value in it."""
    c = spec.consul
    config: dict[str, Any] = {
        "datacenter": c.datacenter,
        "data_dir": CONSUL_DATA,
        "server": False,
        "retry_join": list(c.retry_join),
        "client_addr": "127.0.0.1",
        "log_level": c.log_level.upper(),
        "ports": {"grpc": 8502, "dns": c.dns.port if c.dns.forward else -1},
        "connect": {"enabled": True},
        "disable_update_check": True,
    }
    if c.acl.enabled:
        # The tokens themselves arrive at first boot in zz-meshbake-secrets.json.
        config["acl"] = {
            "enabled": True,
            "default_policy": c.acl.default_policy.value,
            "down_policy": "extend-cache",
        }
    if c.gossip.enabled:
        config["encrypt_verify_incoming"] = True
        config["encrypt_verify_outgoing"] = True
    if c.tls.enabled:
        config.update(_tls_config(spec))
    return config


def _tls_config(spec: ImageSpec) -> dict[str, Any]:
    tls = spec.consul.tls
    tls_dir = f"{CONSUL_DIR}/tls"
    files: dict[str, Any] = {"ca_file": f"{tls_dir}/ca.pem"}
    if tls.client_cert:
        files |= {"cert_file": f"{tls_dir}/cert.pem", "key_file": f"{tls_dir}/key.pem"}
    out: dict[str, Any] = {}
    if compat.parse_version(spec.consul.version) >= (1, 12, 0):
        out["tls"] = {
            "defaults": {**files, "verify_outgoing": tls.verify_outgoing},
            "internal_rpc": {"verify_server_hostname": tls.verify_server_hostname},
        }
    else:  # 1.11 still has the flat keys
        out |= files | {
            "verify_outgoing": tls.verify_outgoing,
            "verify_server_hostname": tls.verify_server_hostname,
        }
    if tls.auto_encrypt and not tls.client_cert:
        out["auto_encrypt"] = {"tls": True}
    return out


def service_definition(spec: ImageSpec) -> dict[str, Any]:
    """The mesh service with its transparent sidecar."""
    s = spec.service
    check: dict[str, Any] = {
        "id": f"{s.name}-health",
        "name": f"{s.name} health",
        "interval": s.check.interval,
        "timeout": s.check.timeout,
    }
    if s.check.http is not None:
        check["http"] = s.check.http
    else:
        check["tcp"] = s.check.tcp
    service: dict[str, Any] = {
        "name": s.name,
        "port": s.port,
        "tags": list(s.tags),
        "meta": dict(s.meta),
        "check": check,
        "connect": {"sidecar_service": {"proxy": {"mode": "transparent"}}},
    }
    return {"service": service}


def resolved_dropin(spec: ImageSpec) -> str:
    return (
        "# Rendered by meshbake: send *.consul lookups to the local Consul agent.\n"
        "[Resolve]\n"
        f"DNS=127.0.0.1:{spec.consul.dns.port}\n"
        f"Domains=~{spec.consul.dns.domain}\n"
        "DNSSEC=false\n"
    )


def mesh_env(spec: ImageSpec) -> str:
    """``/etc/meshbake/mesh.env``: the runtime scripts' parameters (never a secret)."""
    tproxy = spec.service.transparent_proxy
    values: dict[str, str] = {
        "MESHBAKE_SERVICE": spec.service.name,
        "MESHBAKE_PROXY_ID": spec.service.proxy_id,
        "MESHBAKE_CONSUL_USER": "consul",
        "MESHBAKE_ENVOY_USER": "envoy",
        "MESHBAKE_EXCLUDE_INBOUND_PORTS": _words(tproxy.inbound_exclusions),
        "MESHBAKE_EXCLUDE_OUTBOUND_PORTS": _words(tproxy.exclude_outbound_ports),
        "MESHBAKE_EXCLUDE_OUTBOUND_CIDRS": _words(tproxy.exclude_outbound_cidrs),
        "MESHBAKE_EXCLUDE_UIDS": _words(tproxy.exclude_uids),
        "MESHBAKE_ACL": _bool(spec.consul.acl.enabled),
        "MESHBAKE_TOKENS": "shared" if spec.tokens.shared else "separate",
        "MESHBAKE_TOKEN_SOURCE": spec.tokens.source.value,
        "MESHBAKE_GOSSIP": _bool(spec.consul.gossip.enabled),
        "MESHBAKE_TLS": _bool(spec.consul.tls.enabled),
        "MESHBAKE_TLS_CLIENT_CERT": _bool(spec.consul.tls.enabled and spec.consul.tls.client_cert),
        "MESHBAKE_CONSUL_BIN": CONSUL_BIN,
        "MESHBAKE_SIDECAR_TOKEN_FILE": SIDECAR_TOKEN,
    }
    lines = ["# Rendered by meshbake: parameters of the first-boot and redirect scripts."]
    lines += [f'{key}="{value}"' for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _words(items: Iterable[object]) -> str:
    return " ".join(str(i) for i in items)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def sidecar_argv(spec: ImageSpec) -> list[str]:
    argv = [CONSUL_BIN, "connect", "envoy", f"-sidecar-for={spec.service.name}"]
    if spec.consul.acl.enabled:
        argv.append(f"-token-file={SIDECAR_TOKEN}")
    argv += [f"-admin-bind={ENVOY_ADMIN}", f"-envoy-binary={ENVOY_BIN}"]
    return argv


def units(spec: ImageSpec) -> dict[str, str]:
    """systemd unit name -> text."""
    needs_network = spec.tokens.source.value != "userdata"
    environment = [
        systemd_escape(f"{key}={value}") for key, value in sorted(spec.app.environment.items())
    ]
    return {
        "consul.service": render_template("consul.service.j2", image=spec.name),
        "envoy-sidecar.service": render_template(
            "envoy-sidecar.service.j2",
            image=spec.name,
            service=spec.service.name,
            exec_start=exec_line(sidecar_argv(spec)),
        ),
        "meshbake-firstboot.service": render_template(
            "meshbake-firstboot.service.j2", image=spec.name, network=needs_network
        ),
        f"{spec.app.name}.service": render_template(
            "app.service.j2",
            image=spec.name,
            description=spec.app.description or f"{spec.app.name} (baked by meshbake)",
            user=spec.app.run_as,
            working_directory=spec.app.working_directory or "",
            environment=environment,
            exec_start=_exec_start(spec.app.exec_start),
        ),
    }


def _exec_start(command: str) -> str:
    return exec_line(shlex.split(command))


def enabled_units(spec: ImageSpec) -> tuple[str, ...]:
    return tuple(units(spec))


def _json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def baked_files(loaded: LoadedSpec) -> list[BakedFile]:
    """Every rendered file the image gets, in install order."""
    spec = loaded.spec
    files = [
        BakedFile(f"{CONSUL_DIR}/consul.json", _json(consul_config(spec)), 0o640, "root", "consul"),
        BakedFile(
            f"{CONSUL_DIR}/service-{spec.service.name}.json",
            _json(service_definition(spec)),
            0o640,
            "root",
            "consul",
        ),
        BakedFile("/etc/meshbake/mesh.env", mesh_env(spec).encode()),
    ]
    if spec.consul.dns.forward:
        files.append(
            BakedFile("/etc/systemd/resolved.conf.d/consul.conf", resolved_dropin(spec).encode())
        )
    files += [BakedFile(f"{UNIT_DIR}/{name}", text.encode()) for name, text in units(spec).items()]
    for script in runtime_scripts(spec):
        files.append(BakedFile(f"{LIBEXEC}/{script}", shipped_script(script), 0o755))
    for file in spec.all_files:
        files.append(
            BakedFile(file.dest, loaded.read_file(file), int(file.mode, 8), file.owner, file.group)
        )
    return files


def shipped_script(name: str) -> bytes:
    """The bytes of a script shipped in ``scripts/`` (works from a wheel too)."""
    return resources.files("builder.image").joinpath("scripts", name).read_bytes()


def image_packages(spec: ImageSpec) -> tuple[str, ...]:
    """The spec's packages, plus curl when the tokens come from a secret store.

    >>> from builder.spec.model import load_spec
    >>> image_packages(load_spec("images/web.yaml").spec)
    ('python3',)
    """
    extra = FETCH_TOKEN_PACKAGES if _secret_store(spec) else ()
    return tuple(dict.fromkeys((*spec.all_packages, *extra)))


def bake_env(spec: ImageSpec, build_user: str) -> str:
    """Parameters of ``scripts/meshbake-bake`` (sourced inside the build VM)."""
    values = {
        "MESHBAKE_IMAGE": spec.name,
        "MESHBAKE_PACKAGES": _words(image_packages(spec)),
        "MESHBAKE_APP_USER": spec.app.run_as,
        "MESHBAKE_UNITS": _words(enabled_units(spec)),
        "MESHBAKE_BUILD_USER": build_user,
        "MESHBAKE_DNS_FORWARD": _bool(spec.consul.dns.forward),
    }
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


def groups_list(spec: ImageSpec) -> str:
    """``name|gid|system`` lines for the bake script."""
    return "".join(f"{g.name}|{g.gid or ''}|{_bool(g.system)}\n" for g in spec.groups)


def users_list(spec: ImageSpec) -> str:
    """``name|uid|system|shell|groups`` lines for the bake script."""
    return "".join(
        f"{u.name}|{u.uid or ''}|{_bool(u.system)}|{u.shell}|{','.join(u.groups)}\n"
        for u in spec.users
    )


def authorized_keys(spec: ImageSpec) -> dict[str, str]:
    return {
        u.name: "".join(k.strip() + "\n" for k in u.ssh_authorized_keys)
        for u in spec.users
        if u.ssh_authorized_keys
    }
