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

from builder.errors import SpecError, SpecProblem
from builder.render import escape, paths
from builder.spec import boundary, compat
from builder.spec.compat import ConsulRelease, Feature
from builder.spec.model import BaseDistro, ImageSpec, LoadedSpec, TokenSource, file_fields

ENVOY_ADMIN = "127.0.0.1:19000"

#: Runtime scripts from ``scripts/`` installed into every image.
RUNTIME_SCRIPTS = (
    "meshbake-firstboot",
    "meshbake-redirect",
    "meshbake-cleanup",
    "meshbake-check",
    "meshbake-secret-scan",
    "meshbake-imds",
    "meshbake-conntrack",
)

#: The library the scripts share (say, die, env-file loading); installed beside them.
SCRIPT_LIB = "meshbake-lib.sh"

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
    # Every template may name an in-image path as {{ paths.MESH_ENV }} and the like.
    return _jinja().get_template(name).render(paths=paths, **values)


def systemd_escape(word: str) -> str:
    """Escape one word for an ``ExecStart=`` line (see ``escape.unit_word``).

    >>> systemd_escape("50%")
    '"50%%"'
    """
    return escape.unit_word(word)


def exec_line(argv: Sequence[str]) -> str:
    return escape.unit_exec(argv)


def consul_config(spec: ImageSpec) -> dict[str, Any]:
    """The Consul client config, with no token, key or certificate value in it."""
    c = spec.consul
    config: dict[str, Any] = {
        "datacenter": c.datacenter,
        "data_dir": paths.CONSUL_DATA_DIR,
        "server": False,
        "retry_join": list(c.retry_join),
        "client_addr": "127.0.0.1",
        "log_level": c.log_level.upper(),
        "ports": {**grpc_ports(spec), "dns": c.dns.port if c.dns.forward else -1},
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


#: The agent's gRPC ports: plaintext, and TLS (``ports.grpc_tls``, Consul 1.14+).
GRPC_PORT = 8502
GRPC_TLS_PORT = 8503


def _grpc_tls(spec: ImageSpec) -> bool:
    return spec.consul.tls.enabled and spec.consul.release.has(Feature.GRPC_TLS)


def grpc_ports(spec: ImageSpec) -> dict[str, int]:
    """Client agents serve no gRPC by default, and the sidecar needs it for xDS."""
    if _grpc_tls(spec):
        return {"grpc": -1, "grpc_tls": GRPC_TLS_PORT}
    return {"grpc": GRPC_PORT}


def grpc_address(spec: ImageSpec) -> str:
    """What ``connect envoy -grpc-addr`` gets, so it never guesses the xDS port."""
    if _grpc_tls(spec):
        return f"https://127.0.0.1:{GRPC_TLS_PORT}"
    return f"127.0.0.1:{GRPC_PORT}"


def _tls_config(spec: ImageSpec) -> dict[str, Any]:
    tls = spec.consul.tls
    tls_dir = paths.CONSUL_TLS_DIR
    files: dict[str, Any] = {"ca_file": f"{tls_dir}/ca.pem"}
    if tls.client_cert:
        files |= {"cert_file": f"{tls_dir}/cert.pem", "key_file": f"{tls_dir}/key.pem"}
    out: dict[str, Any] = {}
    if spec.consul.release.has(Feature.TLS_STANZA):
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


def service_defaults(spec: ImageSpec) -> dict[str, Any]:
    """The service-defaults config entry that gives the service its MutualTLSMode
    (``service.transparent_proxy.mtls_mode``), for the operator to write on the server
    (``PUT /v1/config``; ``meshbake up`` does).

    It is not baked into the service definition: Consul takes MutualTLSMode only from
    service-defaults and proxy-defaults entries (``MutualTLSMode`` with alias
    ``mutual_tls_mode`` in agent/structs/config_entry.go), and merges it into the proxy
    from there (agent/configentry/merge_service_config.go). The proxy's own field is
    ``json:"-"`` (agent/structs/connect_proxy_config.go), agent/config/config.go's
    ``ServiceProxy`` has no such key, and agent/config/builder.go refuses an unknown key in
    a config file ("invalid config key"), so the agent would not start. Writing
    ``permissive`` also needs the mesh entry's ``AllowEnablingPermissiveMutualTLS``
    (agent/consul/state/config_entry.go, ``checkMutualTLSMode``).

    >>> from builder.spec.model import load_spec
    >>> service_defaults(load_spec("images/web.yaml").spec)
    {'Kind': 'service-defaults', 'Name': 'web', 'MutualTLSMode': 'strict'}
    """
    mode = spec.service.transparent_proxy.mtls_mode
    return {"Kind": "service-defaults", "Name": spec.service.name, "MutualTLSMode": mode.value}


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
        "MESHBAKE_EXCLUDE_OUTBOUND_CIDRS": _words(outbound_cidr_exclusions(spec)),
        "MESHBAKE_EXCLUDE_UIDS": _words(tproxy.exclude_uids),
        "MESHBAKE_ACL": _bool(spec.consul.acl.enabled),
        "MESHBAKE_TOKENS": "shared" if spec.tokens.shared else "separate",
        "MESHBAKE_TOKEN_SOURCE": spec.tokens.source.value,
        "MESHBAKE_GOSSIP": _bool(spec.consul.gossip.enabled),
        "MESHBAKE_TLS": _bool(spec.consul.tls.enabled),
        "MESHBAKE_TLS_CLIENT_CERT": _bool(spec.consul.tls.enabled and spec.consul.tls.client_cert),
        **release_env(spec.consul.release),
        "MESHBAKE_SERVICE_PORT": str(spec.service.port),
        "MESHBAKE_FAIL_CLOSED": _bool(tproxy.fail_closed),
        "MESHBAKE_IMDS_RESTRICT": _bool(spec.imds_restricted),
        "MESHBAKE_IMDS_ADDRESS": IMDS_ADDRESS,
        "MESHBAKE_IMDS_ADDRESS6": IMDS_ADDRESS6,
        "MESHBAKE_IMDS_ALLOW_USERS": _words(spec.imds_users),
        "MESHBAKE_ENVOY_ADMIN_PORT": ENVOY_ADMIN.rpartition(":")[2],
    }
    header = "Rendered by meshbake: parameters of the first-boot and redirect scripts."
    return escape.shell_env_file(values, header)


def release_env(release: ConsulRelease) -> dict[str, str]:
    """mesh.env's facts about the Consul release, so the scripts decide nothing about
    versions: the backend ``redirect-traffic`` drives (meshbake-cleanup) and the
    ``acl.tokens`` keys of the registering and the DNS token (meshbake-firstboot; the
    same key means DNS is answered by the registering token)."""
    return {
        "MESHBAKE_CONSUL_VERSION": release.version,
        "MESHBAKE_REDIRECT_BACKEND": release.backend.value,
        "MESHBAKE_REGISTRATION_TOKEN_KEY": release.registration_token_key,
        "MESHBAKE_DNS_TOKEN_KEY": release.dns_token_key,
    }


#: The instance metadata service (EC2, and the same address on other clouds).
IMDS_ADDRESS = "169.254.169.254"
#: EC2 serves it on IPv6 too, when the instance enables its IPv6 endpoint.
IMDS_ADDRESS6 = "fd00:ec2::254"


def outbound_cidr_exclusions(spec: ImageSpec) -> tuple[str, ...]:
    """The spec's outbound exclusions, plus IMDS when it is restricted: through Envoy
    every connection would come from the envoy user, whom the restriction refuses."""
    cidrs = tuple(str(c) for c in spec.service.transparent_proxy.exclude_outbound_cidrs)
    if spec.imds_restricted:
        cidrs = tuple(dict.fromkeys((*cidrs, f"{IMDS_ADDRESS}/32")))
    return cidrs


def _words(items: Iterable[object]) -> str:
    return " ".join(str(i) for i in items)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def sidecar_argv(spec: ImageSpec) -> list[str]:
    argv = [paths.CONSUL_BIN, "connect", "envoy", f"-sidecar-for={spec.service.name}"]
    argv.append(f"-grpc-addr={grpc_address(spec)}")
    if _grpc_tls(spec):
        argv.append(f"-grpc-ca-file={paths.CONSUL_TLS_DIR}/ca.pem")
    if spec.consul.acl.enabled:
        argv.append(f"-token-file={paths.SIDECAR_TOKEN}")
    argv += [f"-admin-bind={ENVOY_ADMIN}", f"-envoy-binary={paths.ENVOY_BIN}"]
    if envoy_check_skipped(spec):
        argv.append("-ignore-envoy-compatibility")
    return argv


def envoy_check_skipped(spec: ImageSpec) -> bool:
    """Whether the sidecar must pass ``-ignore-envoy-compatibility``: the spec allowed a
    pair that ``connect envoy`` of this Consul would otherwise refuse at every start."""
    # Short-circuit: without allow_unsupported the load already refused a bad pair.
    if not spec.envoy.allow_unsupported:
        return False
    return compat.check_pair(spec.consul.release, spec.envoy.version) is not None


def units(spec: ImageSpec) -> dict[str, str]:
    """systemd unit name -> text."""
    needs_network = spec.tokens.source.value != "userdata"
    environment = [
        escape.unit_environment(key, value) for key, value in sorted(spec.app.environment.items())
    ]
    problem = paths.app_unit_problem(spec.app.name)
    if problem is not None:  # check_spec_files said so with the file's name first
        raise escape.Unrepresentable(f"app.name: {problem}")
    return {
        "consul.service": render_template("consul.service.j2", image=spec.name),
        "envoy-sidecar.service": render_template(
            "envoy-sidecar.service.j2",
            image=spec.name,
            service=spec.service.name,
            exec_start=exec_line(sidecar_argv(spec)),
        ),
        "meshbake-imds.service": render_template("meshbake-imds.service.j2", image=spec.name),
        "meshbake-conntrack.service": render_template(
            "meshbake-conntrack.service.j2", image=spec.name
        ),
        "meshbake-warm.service": render_template("meshbake-warm.service.j2", image=spec.name),
        **fail_closed_unit(spec),
        "meshbake-firstboot.service": render_template(
            "meshbake-firstboot.service.j2", image=spec.name, network=needs_network
        ),
        f"{spec.app.name}.service": render_template(
            "app.service.j2",
            image=spec.name,
            description=escape.unit_text(
                spec.app.description or f"{spec.app.name} (baked by meshbake)"
            ),
            user=spec.app.run_as,
            working_directory=escape.unit_path(spec.app.working_directory)
            if spec.app.working_directory
            else "",
            environment=environment,
            exec_start=_exec_start(spec.app.exec_start),
            wait_for_mesh=spec.app.wait_for_mesh,
        ),
    }


def fail_closed_unit(spec: ImageSpec) -> dict[str, str]:
    """With ``fail_closed``, a oneshot that blocks the service from early boot on, so
    there is no window before the sidecar's first start in which it answers directly."""
    if not spec.service.transparent_proxy.fail_closed:
        return {}
    text = render_template(
        "meshbake-fail-closed.service.j2",
        image=spec.name,
        service=spec.service.name,
        app_unit=f"{spec.app.name}.service",
    )
    return {"meshbake-fail-closed.service": text}


def _exec_start(command: str) -> str:
    # The model checked that the command splits (balanced quotes, no trailing '\').
    return escape.unit_exec(shlex.split(command))


def enabled_units(spec: ImageSpec) -> tuple[str, ...]:
    return tuple(units(spec))


def expected_units(spec: ImageSpec) -> list[str]:
    """The units ``spec`` implies, from ``paths.MESHBAKE_UNITS`` and the app alone (not
    from ``units()``), so that a unit one name overwrote shows up as a difference."""
    fail_closed = spec.service.transparent_proxy.fail_closed
    own = [u for u in paths.MESHBAKE_UNITS if fail_closed or u != "meshbake-fail-closed.service"]
    return [*own, f"{spec.app.name}.service"]


def _json(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def carrier_guard() -> list[BakedFile]:
    """The first-boot carrier's folder exists, 0700 root, before cloud-init's
    write_files creates the carrier in it: cloud-init writes the file with the default
    umask before it applies 0600, and in a 0755 folder others could read it meanwhile."""
    tmpfiles = f"# Rendered by meshbake.\nd {paths.CARRIER_DIR} 0700 root root -\n"
    ordering = (
        "# Rendered by meshbake: write_files (this stage) must find /run/meshbake 0700.\n"
        "[Unit]\nAfter=systemd-tmpfiles-setup.service\n"
    )
    return [
        BakedFile(paths.TMPFILES_DROPIN, tmpfiles.encode()),
        BakedFile(paths.CLOUD_INIT_DROPIN, ordering.encode()),
    ]


def baked_files(loaded: LoadedSpec) -> list[BakedFile]:
    """Every rendered file the image gets, in install order."""
    spec = loaded.spec
    app_problem = paths.app_unit_problem(spec.app.name)
    if app_problem is not None:
        raise SpecError([SpecProblem(str(loaded.path), "app.name", app_problem)])
    files = [
        BakedFile(
            f"{paths.CONSUL_CONFIG_DIR}/consul.json",
            _json(consul_config(spec)),
            0o640,
            "root",
            "consul",
        ),
        BakedFile(
            f"{paths.CONSUL_CONFIG_DIR}/service-{spec.service.name}.json",
            _json(service_definition(spec)),
            0o640,
            "root",
            "consul",
        ),
        BakedFile(paths.MESH_ENV, mesh_env(spec).encode()),
        BakedFile(paths.PATHS_ENV, paths.paths_env().encode()),
    ]
    if spec.consul.dns.forward:
        files.append(BakedFile(paths.RESOLVED_DROPIN, resolved_dropin(spec).encode()))
    files += carrier_guard()
    files += [
        BakedFile(f"{paths.UNIT_DIR}/{name}", text.encode()) for name, text in units(spec).items()
    ]
    for script in runtime_scripts(spec):
        files.append(BakedFile(f"{paths.LIBEXEC}/{script}", shipped_script(script), 0o755))
    # Sourced by the scripts from their own folder, never run.
    files.append(BakedFile(paths.LIB, shipped_script(SCRIPT_LIB)))
    check_spec_files(loaded, [f.dest for f in files])
    for file in spec.all_files:
        files.append(
            BakedFile(file.dest, loaded.read_file(file), int(file.mode, 8), file.owner, file.group)
        )
    return files


#: Folders in ``paths.TABLE`` that the system shares with others: only meshbake's own
#: files in them are protected, not the whole folder.
_SHARED_FOLDERS = frozenset({paths.UNIT_DIR})


def protected_paths(own: Iterable[str]) -> list[str]:
    """Every path meshbake renders into the image: ``own`` (the rendered files) and
    each path in ``paths.TABLE`` (binaries, its folders, drop-ins, the marker, ...)."""
    table = [row.path for row in paths.TABLE if row.path not in _SHARED_FOLDERS]
    return list(dict.fromkeys((*own, *table)))


def check_spec_files(loaded: LoadedSpec, own: Iterable[str]) -> None:
    """Refuse every spec file that would replace (or sit under, or be a folder of)
    something meshbake renders, or change it (``paths.claim_problem``); all of them in
    one ``SpecError``."""
    protected = protected_paths(own)
    problems = []
    for where, file in file_fields(loaded.spec):
        message = escape.protected_conflict(file.dest, protected) or paths.claim_problem(
            boundary.normal_path(file.dest)
        )
        if message is not None:
            problems.append(SpecProblem(str(loaded.path), f"{where}.dest", message))
    if problems:
        raise SpecError(problems)


def shipped_script(name: str) -> bytes:
    """The bytes of a script shipped in ``scripts/`` (works from a wheel too)."""
    return resources.files("builder.image").joinpath("scripts", name).read_bytes()


def image_packages(spec: ImageSpec) -> tuple[str, ...]:
    """The spec's packages, the tools the mesh needs at runtime, and curl when the
    tokens come from a secret store. Every target gets the packet filter its Consul's
    ``redirect-traffic`` drives (stock AMIs may lack it) and, with DNS forwarding,
    systemd-resolved (part of the systemd package on Ubuntu 22.04).

    >>> from builder.spec.model import load_spec
    >>> image_packages(load_spec("images/web.yaml").spec)
    ('python3', 'nftables', 'systemd-resolved')
    """
    mesh = [spec.consul.release.backend.value]
    if spec.consul.dns.forward and spec.base is not BaseDistro.UBUNTU_2204:
        mesh.append("systemd-resolved")
    extra = FETCH_TOKEN_PACKAGES if _secret_store(spec) else ()
    return tuple(dict.fromkeys((*spec.all_packages, *mesh, *extra)))


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
    return escape.shell_env_file(values)


def groups_list(spec: ImageSpec) -> str:
    """``name|gid|system`` lines for the bake script."""
    return "".join(
        escape.record([g.name, str(g.gid or ""), _bool(g.system)], "|") for g in spec.groups
    )


def users_list(spec: ImageSpec) -> str:
    """``name|uid|system|shell|groups`` lines for the bake script."""
    return "".join(
        escape.record(
            [u.name, str(u.uid or ""), _bool(u.system), u.shell, escape.record(u.groups, ",")[:-1]],
            "|",
        )
        for u in spec.users
    )


def authorized_keys(spec: ImageSpec) -> dict[str, str]:
    return {
        u.name: "".join(k.strip() + "\n" for k in u.ssh_authorized_keys)
        for u in spec.users
        if u.ssh_authorized_keys
    }
