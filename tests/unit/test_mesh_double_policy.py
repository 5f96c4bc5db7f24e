"""The consul_double's ACL authorizer, intention precedence, virtual IP table and CA, each
against the behaviour of the hashicorp/consul source its module cites."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from tests.fixtures.consul_double import acl, intentions, vip
from tests.fixtures.consul_double import ca as mesh_ca
from tests.fixtures.consul_double.intentions import Action, Intention

# --- ACL ------------------------------------------------------------------------------------


def token(**fields: Any) -> acl.Token:
    return acl.Token.from_json({"SecretID": "s3cret", **fields})


def test_node_identity_writes_its_node_in_its_datacenter_only() -> None:
    node = token(NodeIdentities=[{"NodeName": "web-1", "Datacenter": "dc1"}])
    here, there = acl.Authorizer(node, "dc1"), acl.Authorizer(node, "dc2")
    assert here.node_write("web-1")
    assert not here.node_write("web-2")
    assert here.service_read("anything")  # service_prefix "" read
    assert not here.service_write("web")
    assert not here.agent_read("web-1")  # a node identity grants no agent rule
    assert not here.node_read("web-2")  # and no node_prefix rule
    assert not there.node_write("web-1")


def test_service_identity_writes_the_service_and_its_sidecar() -> None:
    scoped = token(ServiceIdentities=[{"ServiceName": "web", "Datacenters": ["dc1"]}])
    everywhere = token(ServiceIdentities=[{"ServiceName": "web"}])
    authz = acl.Authorizer(scoped, "dc1")
    assert authz.service_write("web")
    assert authz.service_write("web-sidecar-proxy")
    assert not authz.service_write("api")
    assert authz.service_read("api") and authz.node_read("any-node")
    assert not authz.node_write("any-node")
    assert authz.intention_read("web") and not authz.intention_write("web")
    assert not acl.Authorizer(scoped, "dc2").service_write("web")
    assert acl.Authorizer(everywhere, "dc9").service_write("web")


def test_builtin_dns_reads_nodes_services_and_queries_and_writes_nothing() -> None:
    dns = acl.Authorizer(token(TemplatedPolicies=[{"TemplateName": "builtin/dns"}]), "dc1")
    assert dns.node_read("n") and dns.service_read("s") and dns.query_read("q")
    assert not dns.node_write("n") and not dns.service_write("s")
    assert not dns.agent_read("n")


def test_default_deny_for_anonymous_and_for_a_token_without_rules() -> None:
    table = acl.TokenTable([token()])
    for secret in (None, "", "s3cret"):
        authz = table.authorizer(secret, "dc1")
        assert not authz.node_read("n")
        assert not authz.service_read("s")
        assert not authz.agent_read("n")
        assert not authz.query_read("q")
        assert not authz.intention_read("s")
    with pytest.raises(acl.ACLNotFound, match="ACL not found"):
        table.authorizer("not-a-token", "dc1")


def test_no_token_runs_as_the_anonymous_token_and_its_policies() -> None:
    anonymous = acl.Token.from_json(
        {"SecretID": "anonymous", "TemplatedPolicies": [{"TemplateName": "builtin/dns"}]}
    )
    table = acl.TokenTable([anonymous])
    assert table.authorizer(None, "dc1").service_read("web")
    assert table.authorizer("", "dc1").node_read("n")


def rules(document: dict[str, Any]) -> dict[str, str]:
    return {"Name": "p", "Rules": json.dumps(document)}


def test_exact_rule_beats_prefix_and_longest_prefix_wins() -> None:
    policy = rules(
        {
            "service_prefix": {"": {"policy": "write"}, "we": {"policy": "deny"}},
            "service": {"web": {"policy": "read"}},
        }
    )
    authz = acl.Authorizer(token(Policies=[policy]), "dc1")
    assert authz.service_read("web") and not authz.service_write("web")  # exact
    assert not authz.service_read("wellness")  # longest prefix "we": deny
    assert authz.service_write("api")  # prefix ""


def test_merged_policies_deny_beats_write() -> None:
    allow = rules({"agent": {"n1": {"policy": "write"}}})
    deny = rules({"agent": {"n1": {"policy": "deny"}}})
    authz = acl.Authorizer(token(Policies=[allow, deny]), "dc1")
    assert not authz.agent_read("n1")
    identity = token(
        ServiceIdentities=[{"ServiceName": "web"}],
        Policies=[rules({"service": {"web": {"policy": "read"}}})],
    )
    assert acl.Authorizer(identity, "dc1").service_write("web")  # write beats read


def test_intentions_policy_is_explicit_or_derived() -> None:
    policy = rules(
        {
            "service": {
                "api": {"policy": "read", "intentions": "write"},
                "db": {"policy": "deny"},
            }
        }
    )
    authz = acl.Authorizer(token(Policies=[policy]), "dc1")
    assert authz.intention_write("api")
    assert not authz.intention_read("db")
    # Merged as Consul merges: the unset intentions of a deny rule do not override the
    # intentions another policy wrote out (acl/policy.go MergePolicies).
    deny = rules({"service": {"api": {"policy": "deny"}}})
    merged = acl.Authorizer(token(Policies=[policy, deny]), "dc1")
    assert not merged.service_read("api")
    assert merged.intention_write("api")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "SecretID"),
        ({"SecretID": "x", "NodeIdentities": [{"NodeName": "n"}]}, "NodeIdentities\\[0\\]"),
        ({"SecretID": "x", "TemplatedPolicies": [{"TemplateName": "builtin/nope"}]}, "nope"),
        ({"SecretID": "x", "Policies": [{"Rules": "not json"}]}, "Policies\\[0\\].Rules"),
        ({"SecretID": "x", "Policies": [rules({"key": {"": {"policy": "read"}}})]}, "key"),
        ({"SecretID": "x", "Policies": [rules({"node": {"n": {"policy": "list"}}})]}, "list"),
    ],
)
def test_bad_tokens_are_refused_with_the_field(document: dict[str, Any], message: str) -> None:
    with pytest.raises(acl.ACLError, match=message):
        acl.Token.from_json(document)


# --- intentions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "destination", "precedence"),
    [("web", "api", 9), ("*", "api", 8), ("web", "*", 6), ("*", "*", 5)],
)
def test_precedence_is_consuls_table(source: str, destination: str, precedence: int) -> None:
    assert Intention(source, destination, Action.ALLOW).precedence == precedence


def test_the_highest_precedence_match_decides_and_the_default_denies() -> None:
    rules_ = [
        Intention("*", "*", Action.ALLOW),
        Intention("web", "*", Action.DENY),
        Intention("*", "api", Action.DENY),
        Intention("web", "api", Action.ALLOW),
    ]
    assert intentions.decide(rules_, "web", "api").allowed  # 9 beats 8 and 6
    assert not intentions.decide(rules_, "db", "api").allowed  # 8
    assert not intentions.decide(rules_, "web", "db").allowed  # 6
    assert intentions.decide(rules_, "db", "cache").allowed  # 5
    nothing = intentions.decide([], "web", "api")
    assert not nothing.allowed and nothing.by is None
    assert intentions.decide([], "web", "api", default_allow=True).allowed


def test_config_entry_reads_sources_and_refuses_what_consul_refuses() -> None:
    entry = {
        "Kind": "service-intentions",
        "Name": "api",
        "Sources": [{"Name": "web", "Action": "allow"}, {"Name": "*", "Action": "deny"}],
    }
    assert intentions.from_config_entry(entry) == [
        Intention("web", "api", Action.ALLOW),
        Intention("*", "api", Action.DENY),
    ]
    for broken, field in (
        ({**entry, "Kind": "service-defaults"}, "Kind"),
        ({**entry, "Name": "we*"}, "Name"),
        ({**entry, "Sources": [{"Name": "web", "Action": "maybe"}]}, "Action"),
        ({**entry, "Sources": [{"Name": "web", "Action": "allow"}] * 2}, "more than once"),
    ):
        with pytest.raises(intentions.IntentionError, match=field):
            intentions.from_config_entry(broken)


def _principal_matches(principal: dict[str, Any], uri: str) -> bool:
    if "and_ids" in principal:
        return all(_principal_matches(p, uri) for p in principal["and_ids"]["ids"])
    if "not_id" in principal:
        return not _principal_matches(principal["not_id"], uri)
    regex = principal["authenticated"]["principal_name"]["safe_regex"]["regex"]
    return re.fullmatch(regex, uri) is not None


def rbac_allows(rbac: dict[str, Any], uri: str) -> bool:
    """Envoy's RBAC semantics: ALLOW lets in what a policy matches, DENY the rest."""
    hit = any(
        _principal_matches(p, uri) for pol in rbac["policies"].values() for p in pol["principals"]
    )
    return hit if rbac["action"] == "ALLOW" else not hit


NAMES = st.sampled_from(["web", "api", "db", "*"])


@given(
    st.lists(st.tuples(NAMES, NAMES, st.sampled_from(list(Action))), max_size=6),
    st.sampled_from(["web", "api", "db"]),
    st.booleans(),
)
def test_the_rbac_rules_decide_as_the_intentions_do(
    raw: list[tuple[str, str, Action]], source: str, default_allow: bool
) -> None:
    # One intention per (source, destination), as one config entry per destination holds.
    unique = {(s, d): Intention(s, d, a) for s, d, a in raw}
    rules_ = list(unique.values())
    domain = "11111111-2222-3333-4444-555555555555.consul"
    rbac = intentions.rbac_rules(rules_, "api", domain, default_allow)
    uri = f"spiffe://{domain}/ns/default/dc/dc1/svc/{source}"
    expected = intentions.decide(rules_, source, "api", default_allow).allowed
    assert rbac_allows(rbac, uri) is expected
    # Another trust domain never matches a policy.
    stranger = (
        f"spiffe://22222222-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/{source}"
    )
    assert rbac_allows(rbac, stranger) is default_allow


# --- virtual IPs ------------------------------------------------------------------------------


def test_virtual_ips_count_up_from_240_0_0_1_and_reuse_freed_ones() -> None:
    table = vip.VirtualIPTable()
    assert table.assign("api") == "240.0.0.1"
    assert table.assign("web") == "240.0.0.2"
    assert table.assign("api") == "240.0.0.1"  # stable
    table.free("api")
    assert table.lookup("api") is None
    assert table.assign("db") == "240.0.0.1"  # the freed offset first
    assert table.assign("cache") == "240.0.0.3"


def test_virtual_ips_run_out_before_the_last_offset() -> None:
    table = vip.VirtualIPTable()
    table._counter = vip.MAX_OFFSET - 2
    assert table.assign("a") == "255.255.255.253"
    with pytest.raises(vip.VirtualIPError, match="cannot allocate any more"):
        table.assign("b")


# --- CA -----------------------------------------------------------------------------------


def test_leaf_is_p256_signed_by_the_root_with_the_spiffe_id_and_sni() -> None:
    cluster = "11111111-2222-3333-4444-555555555555"
    authority = mesh_ca.MeshCA(cluster_id=cluster)
    leaf = authority.issue("web", "dc1")
    cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    cert.verify_directly_issued_by(authority.root)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{cluster}.consul/ns/default/dc/dc1/svc/web"
    ]
    root_uris = authority.root.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert root_uris.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{cluster}.consul"
    ]
    assert mesh_ca.sni("api", "dc1", authority.trust_domain) == (
        f"api.default.dc1.internal.{cluster}.consul"
    )
    other = mesh_ca.MeshCA(cluster_id=cluster).issue("web", "dc1")
    with pytest.raises(InvalidSignature):
        x509.load_pem_x509_certificate(other.cert_pem).verify_directly_issued_by(authority.root)
