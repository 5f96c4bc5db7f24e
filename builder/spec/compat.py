"""Which Envoy releases each Consul release supports.

Consul only tests and supports a few Envoy major.minor lines per release; a pair outside
them may start but misbehave in ways that are hard to see. The table mirrors Consul's
``envoyextensions/xdscommon/ENVOY_VERSIONS`` (1.15+) and its older ``proxysupport``
list; for 1.21.x and 1.22.x it is DESIGN.md's list.

>>> supported_envoy("1.22.1")
('1.38', '1.37', '1.35')
>>> check_pair("1.22.1", "1.38.3") is None
True
"""

from __future__ import annotations

import re

#: Consul major.minor -> supported Envoy major.minor lines, newest first.
SUPPORTED_ENVOY: dict[str, tuple[str, ...]] = {
    "1.22": ("1.38", "1.37", "1.35"),
    "1.21": ("1.38", "1.37", "1.35"),
    "1.20": ("1.32", "1.31", "1.30", "1.29"),
    "1.19": ("1.29", "1.28", "1.27", "1.26"),
    "1.18": ("1.28", "1.27", "1.26", "1.25"),
    "1.17": ("1.27", "1.26", "1.25", "1.24"),
    "1.16": ("1.26", "1.25", "1.24", "1.23"),
    "1.15": ("1.25", "1.24", "1.23", "1.22"),
    "1.14": ("1.24", "1.23", "1.22", "1.21"),
    "1.13": ("1.23", "1.22", "1.21", "1.20"),
    "1.12": ("1.22", "1.21", "1.20", "1.19"),
    "1.11": ("1.20", "1.19", "1.18", "1.17"),
}

#: The first Consul release with transparent proxy on VMs (``redirect-traffic``).
MIN_CONSUL = (1, 11, 1)

VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def parse_version(text: str) -> tuple[int, int, int]:
    """Parse ``X.Y.Z`` into a tuple; raise ``ValueError`` otherwise.

    >>> parse_version("1.22.1")
    (1, 22, 1)
    """
    match = VERSION_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a version like 1.22.1")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def minor_of(version: str) -> str:
    """``1.38.3`` -> ``1.38``."""
    major, minor, _ = parse_version(version)
    return f"{major}.{minor}"


def supported_envoy(consul_version: str) -> tuple[str, ...] | None:
    """The Envoy lines a Consul version supports, or None when the table lacks it."""
    return SUPPORTED_ENVOY.get(minor_of(consul_version))


def check_pair(consul_version: str, envoy_version: str) -> str | None:
    """Return a plain message when the pair is unsupported, else None."""
    lines = supported_envoy(consul_version)
    if lines is None:
        known = ", ".join(sorted(SUPPORTED_ENVOY, key=lambda v: parse_version(v + ".0")))
        return (
            f"Consul {minor_of(consul_version)}.x is not in meshbake's supported-Envoy table"
            f" (known: {known}); set envoy.allow_unsupported: true to bake it anyway"
        )
    if minor_of(envoy_version) not in lines:
        return (
            f"Envoy {envoy_version} is not supported by Consul {consul_version}"
            f" (supported: {', '.join(lines)}); set envoy.allow_unsupported: true to bake it anyway"
        )
    return None
