"""Which Envoy releases each Consul release line *runs*, as the Consul binary decides.

Before it execs Envoy, ``consul connect envoy`` runs ``envoy --version`` and refuses
any version below the lowest minor listed in ``envoyextensions/xdscommon/ENVOY_VERSIONS``
of its release branch, or at or above the highest listed minor + 1
(``checkEnvoyVersionCompatibility`` in ``command/connect/envoy/envoy.go``; the bounds
come from ``GetMinEnvoyMajorVersion``/``GetMaxEnvoyMajorVersion`` in
``envoyextensions/xdscommon/proxysupport.go``). ``-ignore-envoy-compatibility`` skips
the check. The documentation's compatibility table disagrees with these files for
1.21.x and 1.22.x (hashicorp/consul issue #23929); the binary is what counts, so the
table below follows the files.

>>> accepted_range("1.22.1")
EnvoyRange(low=(1, 33), high=(1, 36))
>>> print(check_pair("1.22.1", "1.38.3"))  # doctest: +ELLIPSIS
Consul 1.22.1 refuses Envoy 1.38.3: ... 1.33.0 up to but not including 1.36.0 (1.33-1.35); ...
>>> check_pair("2.1.0", "1.38.3") is None
True
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class ConsulLine:
    """One Consul release line and its branch's ``ENVOY_VERSIONS``, newest first."""

    envoy_versions: tuple[str, ...]
    source: str


#: Consul major.minor -> the ENVOY_VERSIONS of that release branch, with where it was read.
CONSUL_LINES: dict[str, ConsulLine] = {
    "2.1": ConsulLine(
        ("1.38.2", "1.37.4", "1.36.8", "1.35.12"),
        "release/2.1.x was cut from main after hashicorp/consul PR #23664, whose "
        "envoyextensions/xdscommon/ENVOY_VERSIONS lists 1.38.2/1.37.4/1.36.8/1.35.12 "
        "(tabulated in issue #23929); no later change to that file on release/2.1.x was found",
    ),
    "2.0": ConsulLine(
        ("1.37.2", "1.36.6", "1.35.10", "1.34.14"),
        "envoyextensions/xdscommon/ENVOY_VERSIONS on release/2.0.x "
        "(hashicorp/consul PR #23469, backported by #23499)",
    ),
    "1.22": ConsulLine(
        ("1.35.9", "1.34.13", "1.33.14"),
        "envoyextensions/xdscommon/ENVOY_VERSIONS on release/1.22.x (hashicorp/consul #23929)",
    ),
    "1.21": ConsulLine(
        ("1.34.7", "1.33.9", "1.32.12", "1.31.10"),
        "envoyextensions/xdscommon/ENVOY_VERSIONS on release/1.21.x (hashicorp/consul #23929)",
    ),
    "1.20": ConsulLine(
        ("1.31.2", "1.30.6", "1.29.9", "1.28.7"),
        "envoyextensions/xdscommon/ENVOY_VERSIONS at hashicorp/consul 66247ed2 (1.20 era)",
    ),
}

#: The first Consul release with transparent proxy on VMs (``redirect-traffic``).
MIN_CONSUL = (1, 11, 1)

#: The first Consul release whose ``redirect-traffic`` uses nftables (``sdk/nftables``;
#: CHANGELOG 2.1.0: "Migrated the consul connect redirect-traffic command ... to nftables").
NFTABLES_SINCE = (2, 1, 0)

#: The first Consul release whose service registrations from config files use their own
#: token (``acl.tokens.config_file_service_registration``); before it, the default token.
REGISTRATION_TOKEN_SINCE = (1, 15, 0)

#: The first Consul release with ``acl.tokens.dns``, the token DNS queries are answered
#: with (CHANGELOG 1.17.0: "acl: Add new `acl.tokens.dns` config field", GH-17936).
#: Before it, DNS uses the default token.
DNS_TOKEN_SINCE = (1, 17, 0)

VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")

Minor = tuple[int, int]


class RedirectBackend(StrEnum):
    """The packet filter that ``consul connect redirect-traffic`` drives."""

    IPTABLES = "iptables"
    NFTABLES = "nftables"


@dataclass(frozen=True)
class EnvoyRange:
    """Envoy versions from ``low``.0 up to, but not including, ``high``.0."""

    low: Minor
    high: Minor

    def __contains__(self, version: object) -> bool:
        if not isinstance(version, str):
            return False
        major, minor, _ = parse_version(version)
        return self.low <= (major, minor) < self.high

    def describe(self) -> str:
        last = (self.high[0], self.high[1] - 1)
        return (
            f"{_fmt(self.low)}.0 up to but not including {_fmt(self.high)}.0"
            f" ({_fmt(self.low)}-{_fmt(last)})"
        )


def _fmt(minor: Minor) -> str:
    return f"{minor[0]}.{minor[1]}"


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


def accepted_range(consul_version: str) -> EnvoyRange | None:
    """What ``consul connect envoy`` of this version accepts, or None when unknown.

    The lowest listed minor is the floor; the highest listed minor + 1 is the
    exclusive ceiling (``checkEnvoyVersionCompatibility``).
    """
    line = CONSUL_LINES.get(minor_of(consul_version))
    if line is None:
        return None
    minors = [parse_version(v)[:2] for v in line.envoy_versions]
    top = max(minors)
    return EnvoyRange(low=min(minors), high=(top[0], top[1] + 1))


def check_pair(consul_version: str, envoy_version: str) -> str | None:
    """Return one plain line when real Consul would refuse the pair, else None."""
    accepted = accepted_range(consul_version)
    if accepted is None:
        known = ", ".join(sorted(CONSUL_LINES, key=lambda v: parse_version(v + ".0")))
        return (
            f"Consul {minor_of(consul_version)}.x is not in meshbake's compatibility table"
            f" (known lines: {known}); set envoy.allow_unsupported: true to bake it anyway"
        )
    if envoy_version not in accepted:
        return (
            f"Consul {consul_version} refuses Envoy {envoy_version}: its connect envoy accepts"
            f" Envoy {accepted.describe()}; pick an Envoy in that range or set"
            " envoy.allow_unsupported: true"
        )
    return None


def redirect_backend(consul_version: str) -> RedirectBackend:
    """iptables before Consul 2.1, nftables from 2.1 on.

    >>> redirect_backend("2.0.0"), redirect_backend("2.1.0")
    (<RedirectBackend.IPTABLES: 'iptables'>, <RedirectBackend.NFTABLES: 'nftables'>)
    """
    if parse_version(consul_version) >= NFTABLES_SINCE:
        return RedirectBackend.NFTABLES
    return RedirectBackend.IPTABLES


def outbound_cidr_problem(consul_version: str, cidr: str) -> str | None:
    """Why this Consul's ``redirect-traffic`` refuses (or misreads) an outbound CIDR
    exclusion that the spec's own check accepted, or None.

    - nftables (2.1+), ``validateCIDR`` in ``sdk/nftables/nftables.go``: the address is
      parsed with Go's ``net.ParseIP``, which reads an IPv4-mapped IPv6 address
      (``::ffff:10.0.0.1``) as IPv4, so its prefix may be at most 32 and the rule
      matches IPv4 (``ipFamilyKeyword``); the prefix length must be a decimal number
      (``strconv.Atoi``), never a netmask.
    - iptables (before 2.1), ``sdk/iptables/iptables.go``: each exclusion goes to
      ``iptables -t nat -I CONSUL_PROXY_OUTPUT -d CIDR``; the agent's redirect is IPv4
      (IPv6 rules are ip6tables', written only for a dual-stack agent), and iptables
      refuses an IPv6 address there, so the redirect fails.

    >>> outbound_cidr_problem("2.0.0", "10.0.0.0/8") is None
    True
    >>> print(outbound_cidr_problem("2.1.0", "::ffff:10.0.0.1/120"))  # doctest: +ELLIPSIS
    Consul 2.1 refuses it: ... at most 32 ...
    """
    line = minor_of(consul_version)
    address, _, prefix = cidr.partition("/")
    ip = ipaddress.ip_address(address)
    if redirect_backend(consul_version) is RedirectBackend.IPTABLES:
        if ip.version == 6:
            return (
                f"Consul {line} refuses it: before 2.1 redirect-traffic passes each exclusion"
                " to IPv4 iptables (-d, sdk/iptables/iptables.go), which takes no IPv6"
                " address; exclude IPv4 CIDRs only, or use Consul 2.1+"
            )
        return None
    if prefix and not prefix.isdigit():
        network = ipaddress.ip_network(cidr, strict=False)
        return (
            f"Consul {line} refuses it: sdk/nftables takes the prefix length as a number"
            f" (validateCIDR), not {prefix!r}; write it as {network}"
        )
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    if mapped is None:
        return None
    if prefix and int(prefix) > 32:
        return (
            f"Consul {line} refuses it: sdk/nftables (validateCIDR) reads the IPv4-mapped"
            f" address as IPv4 {mapped}, whose prefix length is at most 32, not {prefix};"
            " write the IPv4 CIDR instead"
        )
    ipv4 = f"{mapped}/{prefix}" if prefix else str(mapped)
    return (
        f"Consul {line} reads it as the IPv4 CIDR {ipv4} (sdk/nftables validateCIDR reads an"
        " IPv4-mapped address as IPv4), not as the IPv6 range written; write that instead"
    )
