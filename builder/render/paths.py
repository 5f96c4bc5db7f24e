"""The one table of paths inside an image (and inside the build VM).

Every Python module takes its in-image paths from here, and the shell scripts read
the same values from ``/etc/meshbake/paths.env``, which ``paths_env()`` renders from
this table. ``markdown_table()`` renders it for the README.

>>> SIDECAR_TOKEN
'/etc/envoy/token'
>>> "MESHBAKE_SIDECAR_TOKEN_FILE=/etc/envoy/token" in paths_env()
True
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Each path is written out in full exactly once, so `git grep` finds its one definition.
CONSUL_BIN = "/usr/bin/consul"
ENVOY_BIN = "/usr/bin/envoy"
CONSUL_CONFIG_DIR = "/etc/consul.d"
CONSUL_SECRETS = "/etc/consul.d/zz-meshbake-secrets.json"
#: ``retry_join`` from ``meshbake userdata --join``, written at first boot (root:consul
#: 0640, as the baked Consul config files are).
CONSUL_JOIN = "/etc/consul.d/50-join.json"
CONSUL_TLS_DIR = "/etc/consul.d/tls"
CONSUL_DATA_DIR = "/var/lib/consul"
ENVOY_CONFIG_DIR = "/etc/envoy"
SIDECAR_TOKEN = "/etc/envoy/token"
MESHBAKE_CONFIG_DIR = "/etc/meshbake"
MESH_ENV = "/etc/meshbake/mesh.env"
REDIRECT_TOKEN = "/etc/meshbake/redirect-token"
PATHS_ENV = "/etc/meshbake/paths.env"
STATE_DIR = "/var/lib/meshbake"
FIRSTBOOT_MARKER = "/var/lib/meshbake/firstboot.done"
CARRIER = "/run/meshbake/firstboot.env"
LIBEXEC = "/usr/libexec/meshbake"
FETCH_TOKEN = "/usr/libexec/meshbake/meshbake-fetch-token"
#: Sourced by the runtime scripts from their own folder (so a checkout's scripts find
#: theirs too); listed here for the bake and the README.
LIB = "/usr/libexec/meshbake/meshbake-lib.sh"
UNIT_DIR = "/etc/systemd/system"
CLOUD_CFG_DROPIN = "/etc/cloud/cloud.cfg.d/90-meshbake.cfg"
BASE_CLOUD_CFG_DROPIN = "/etc/cloud/cloud.cfg.d/50-meshbake-base.cfg"
RESOLVED_DROPIN = "/etc/systemd/resolved.conf.d/consul.conf"
#: Makes /run/meshbake 0700 root before cloud-init writes the carrier into it.
TMPFILES_DROPIN = "/usr/lib/tmpfiles.d/meshbake.conf"
#: Orders cloud-init's network stage (which runs write_files) after tmpfiles.
CLOUD_INIT_DROPIN = "/etc/systemd/system/cloud-init.service.d/10-meshbake.conf"
CARRIER_DIR = "/run/meshbake"
#: Where Packer uploads the stage folder inside the build VM (gone from the image).
BAKE_STAGE = "/tmp/meshbake"
#: The hygiene script Packer runs as the shutdown command (in the build VM only).
FINALIZE = "/run/meshbake-finalize"


@dataclass(frozen=True)
class ImagePath:
    """One row of the table: the shell variable scripts read, the path, what it is."""

    variable: str
    path: str
    what: str


#: The table, in the order the README shows it.
TABLE: tuple[ImagePath, ...] = (
    ImagePath("MESHBAKE_CONSUL_BIN", CONSUL_BIN, "Consul binary (checksum-verified at bake)"),
    ImagePath("MESHBAKE_ENVOY_BIN", ENVOY_BIN, "Envoy binary"),
    ImagePath("MESHBAKE_CONSUL_CONFIG_DIR", CONSUL_CONFIG_DIR, "Consul client config, no secret"),
    ImagePath("MESHBAKE_SECRETS_FILE", CONSUL_SECRETS, "ACL tokens and gossip key (first boot)"),
    ImagePath("MESHBAKE_JOIN_FILE", CONSUL_JOIN, "retry_join from userdata --join (first boot)"),
    ImagePath("MESHBAKE_TLS_DIR", CONSUL_TLS_DIR, "TLS CA, cert and key (first boot)"),
    ImagePath("MESHBAKE_CONSUL_DATA_DIR", CONSUL_DATA_DIR, "Consul data dir, empty in the image"),
    ImagePath("MESHBAKE_ENVOY_CONFIG_DIR", ENVOY_CONFIG_DIR, "the sidecar's own folder"),
    ImagePath("MESHBAKE_SIDECAR_TOKEN_FILE", SIDECAR_TOKEN, "the sidecar's ACL token (first boot)"),
    ImagePath("MESHBAKE_CONFIG_DIR", MESHBAKE_CONFIG_DIR, "meshbake's runtime parameters"),
    ImagePath("MESHBAKE_MESH_ENV", MESH_ENV, "parameters of the runtime scripts, no secret"),
    ImagePath("MESHBAKE_REDIRECT_TOKEN_FILE", REDIRECT_TOKEN, "the redirect's token (first boot)"),
    ImagePath("MESHBAKE_PATHS_ENV", PATHS_ENV, "this table, for the scripts"),
    ImagePath("MESHBAKE_STATE_DIR", STATE_DIR, "meshbake's state"),
    ImagePath("MESHBAKE_MARKER_FILE", FIRSTBOOT_MARKER, "first boot done: later runs are no-ops"),
    ImagePath("MESHBAKE_CARRIER_FILE", CARRIER, "first-boot secrets from user data (tmpfs)"),
    ImagePath("MESHBAKE_LIBEXEC_DIR", LIBEXEC, "the runtime scripts"),
    ImagePath("MESHBAKE_FETCH_TOKEN", FETCH_TOKEN, "token fetcher (secret-store images only)"),
    ImagePath("MESHBAKE_LIB", LIB, "the scripts' shared library (say, die, env files)"),
    ImagePath("MESHBAKE_UNIT_DIR", UNIT_DIR, "the rendered systemd units"),
    ImagePath("MESHBAKE_CLOUD_CFG", CLOUD_CFG_DROPIN, "cloud-init settings of every image"),
    ImagePath("MESHBAKE_BASE_CLOUD_CFG", BASE_CLOUD_CFG_DROPIN, "cloud-init settings of the base"),
    ImagePath("MESHBAKE_RESOLVED_DROPIN", RESOLVED_DROPIN, "*.consul lookups go to Consul"),
    ImagePath("MESHBAKE_TMPFILES_DROPIN", TMPFILES_DROPIN, "/run/meshbake is 0700 root"),
    ImagePath("MESHBAKE_CLOUD_INIT_DROPIN", CLOUD_INIT_DROPIN, "write_files runs after tmpfiles"),
    ImagePath("MESHBAKE_STAGE", BAKE_STAGE, "the uploaded stage, in the build VM only"),
    ImagePath("MESHBAKE_FINALIZE", FINALIZE, "the last hygiene step, in the build VM only"),
)

# Plain absolute paths need no quoting in shell or in a systemd EnvironmentFile=.
_PLAIN = re.compile(r"^/[A-Za-z0-9._/-]+$")


def rel(path: str) -> str:
    """``path`` relative to the image's root, to join onto a rootfs folder.

    >>> rel(SIDECAR_TOKEN)
    'etc/envoy/token'
    """
    return path.lstrip("/")


def paths_env() -> str:
    """``/etc/meshbake/paths.env``: ``VARIABLE=/path`` lines the scripts source.

    Every value is a plain absolute path, so the file reads the same to ``sh`` and to
    systemd's ``EnvironmentFile=``.
    """
    lines = ["# Rendered by meshbake from builder/render/paths.py: where things are."]
    for row in TABLE:
        if not _PLAIN.match(row.path):  # a guard for whoever edits the table
            raise ValueError(f"{row.variable}: {row.path!r} is not a plain absolute path")
        lines.append(f"{row.variable}={row.path}")
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The table as Markdown, for the README.

    >>> markdown_table().splitlines()[0]
    '| path | variable | what |'
    """
    rows = ["| path | variable | what |", "|---|---|---|"]
    rows += [f"| `{r.path}` | `{r.variable}` | {r.what} |" for r in TABLE]
    return "\n".join(rows) + "\n"


# --- what a spec's files and app may not claim -------------------------------------------

#: Every systemd unit meshbake may render (whether or not one spec renders it). The app's
#: unit may not take one of these names, nor may a spec file drop into their ``.d/``.
MESHBAKE_UNITS = (
    "consul.service",
    "envoy-sidecar.service",
    "meshbake-imds.service",
    "meshbake-conntrack.service",
    "meshbake-warm.service",
    "meshbake-fail-closed.service",
    "meshbake-firstboot.service",
)
#: Stock units meshbake changes with a drop-in, or that must run as shipped for the
#: mesh to come up (the carrier arrives through cloud-init; tmpfiles makes its folder).
STOCK_UNITS = (
    "cloud-init.service",
    "cloud-init-local.service",
    "cloud-config.service",
    "cloud-final.service",
    "systemd-tmpfiles-setup.service",
    "systemd-resolved.service",
    "systemd-sysctl.service",
    "ssh.service",
)
#: Where systemd looks for units and their drop-ins on the image's disk (``/run`` is
#: not on the disk, and the spec may not write there anyway).
UNIT_SEARCH_DIRS = (
    UNIT_DIR,
    "/etc/systemd/system.control",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
)
#: Files and folders that change, for the whole system, how meshbake's files and units
#: are treated: a spec file may not be one of these or sit under one.
#: tmpfiles.d can reopen the carrier's folder, sysctl.d can undo the redirect's
#: settings, system.conf(.d) sets every unit's environment, cloud.cfg(.d) changes how
#: the carrier is written, resolved.conf(.d) where *.consul resolves.
OWNED_WHOLE = (
    "/etc/tmpfiles.d",
    "/usr/lib/tmpfiles.d",
    "/usr/local/lib/tmpfiles.d",
    "/etc/sysctl.conf",
    "/etc/sysctl.d",
    "/usr/lib/sysctl.d",
    "/usr/local/lib/sysctl.d",
    "/etc/systemd/system.conf",
    "/etc/systemd/system.conf.d",
    "/usr/lib/systemd/system.conf.d",
    "/usr/local/lib/systemd/system.conf.d",
    "/etc/systemd/resolved.conf",
    "/etc/systemd/resolved.conf.d",
    "/etc/cloud/cloud.cfg",
    "/etc/cloud/cloud.cfg.d",
    "/etc/environment",
    "/etc/security/pam_env.conf",
    CONSUL_CONFIG_DIR,
    ENVOY_CONFIG_DIR,
    MESHBAKE_CONFIG_DIR,
    STATE_DIR,
    CONSUL_DATA_DIR,
    LIBEXEC,
    CARRIER_DIR,
    CONSUL_BIN,
    ENVOY_BIN,
)
#: Debian and Ubuntu merge /usr: ``/lib/x`` is ``/usr/lib/x`` on the disk.
USR_MERGED = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def on_disk(path: str) -> str:
    """The path a normalised absolute ``path`` names on a /usr-merged disk.

    >>> on_disk("/lib/systemd/system/consul.service.d/x.conf")
    '/usr/lib/systemd/system/consul.service.d/x.conf'
    """
    for alias in USR_MERGED:
        if path == alias or path.startswith(alias + "/"):
            return "/usr" + path
    return path


def _protected_units() -> frozenset[str]:
    return frozenset((*MESHBAKE_UNITS, *STOCK_UNITS))


def _unit_claim(unit: str) -> str | None:
    """Why a unit file or a ``.d/`` folder named ``unit`` (in a unit folder) reaches one
    of the protected units, or None. systemd also reads ``service.d/`` (every service)
    and ``a-.service.d/`` (every unit named ``a-...``, per ``-`` of the name)."""
    protected = _protected_units()
    if unit in protected:
        return f"{unit} is a unit meshbake installs or relies on"
    name, dot, kind = unit.rpartition(".")
    if not dot and unit in ("service", "socket", "target", "timer", "path"):
        return f"{unit}.d/ drop-ins apply to every {unit}, meshbake's too"
    if name.endswith("-"):
        hit = sorted(u for u in protected if u.startswith(name) and u.endswith("." + kind))
        if hit:
            return f"{unit} drop-ins apply to {hit[0]}, which meshbake installs or relies on"
    if unit.startswith("meshbake-") or unit.startswith("meshbake."):
        return f"{unit}: the name meshbake- is meshbake's own"
    return None


def claim_problem(dest: str) -> str | None:
    """Why a spec file at normalised absolute ``dest`` would replace or change something
    meshbake installs, or None. The one table above decides (with the rendered files,
    which ``builder.render.escape.protected_conflict`` compares)."""
    path = on_disk(dest)
    for owned in OWNED_WHOLE:
        owned = on_disk(owned)
        if path == owned or path.startswith(owned + "/"):
            return f"{dest} is {'under ' if path != owned else ''}{owned}, which meshbake owns"
        if owned.startswith(path + "/"):
            return f"{dest} is a folder meshbake installs into ({owned})"
    for folder in UNIT_SEARCH_DIRS:
        folder = on_disk(folder)
        if not path.startswith(folder + "/"):
            continue
        unit = path[len(folder) + 1 :].split("/")[0]
        for suffix in (".d", ".wants", ".requires", ".upholds"):
            unit = unit.removesuffix(suffix)
        problem = _unit_claim(unit)
        if problem is not None:
            return f"{dest}: {problem}"
    return None


def app_unit_problem(name: str) -> str | None:
    """Why the app may not be the unit ``name.service``, or None.

    >>> app_unit_problem("consul")
    'consul.service is a unit meshbake installs or relies on'
    """
    return _unit_claim(f"{name}.service")
