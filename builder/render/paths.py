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
CONSUL_TLS_DIR = "/etc/consul.d/tls"
CONSUL_DATA_DIR = "/var/lib/consul"
ENVOY_CONFIG_DIR = "/etc/envoy"
SIDECAR_TOKEN = "/etc/envoy/token"
MESHBAKE_CONFIG_DIR = "/etc/meshbake"
MESH_ENV = "/etc/meshbake/mesh.env"
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
    ImagePath("MESHBAKE_TLS_DIR", CONSUL_TLS_DIR, "TLS CA, cert and key (first boot)"),
    ImagePath("MESHBAKE_CONSUL_DATA_DIR", CONSUL_DATA_DIR, "Consul data dir, empty in the image"),
    ImagePath("MESHBAKE_ENVOY_CONFIG_DIR", ENVOY_CONFIG_DIR, "the sidecar's own folder"),
    ImagePath("MESHBAKE_SIDECAR_TOKEN_FILE", SIDECAR_TOKEN, "the sidecar's ACL token (first boot)"),
    ImagePath("MESHBAKE_CONFIG_DIR", MESHBAKE_CONFIG_DIR, "meshbake's runtime parameters"),
    ImagePath("MESHBAKE_MESH_ENV", MESH_ENV, "parameters of the runtime scripts, no secret"),
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
